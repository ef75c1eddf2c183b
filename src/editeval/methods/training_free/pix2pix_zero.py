"""Pix2Pix-Zero: an edit direction in text-embedding space, with cross-attention guidance that keeps
the source's layout.

Paper: "Zero-shot Image-to-Image Translation", Parmar, Singh, Zhang, Li, Lu and Zhu, SIGGRAPH 2023,
arXiv:2302.03027 (official code: pix2pixzero/pix2pix-zero, the authors' diffusers reimplementation).

Algorithm (as the official ``edit_real.py``):

1. **Inversion**: regularised DDIM inversion of the source under its caption (the source prompt)
   at guidance 1 (:mod:`editeval.diffusion.regularised_inversion`).
2. **Edit direction**: ``dir = mean(E(target sentences)) - mean(E(source sentences))``, the
   difference of the mean CLIP text embeddings (77 x D, every token position) of two sets of
   sentences, one about the source and one about the target.
3. **Reference**: DDIM sampling from the inverted noise under the source prompt records the
   cross-attention maps ``M_ref`` of every cross-attention layer at every step.
4. **Edit**: DDIM sampling from the same noise with the edited text ``c_edit = c_src + dir`` and
   classifier-free guidance ``guidance_scale`` (5) whose negative prompt is the source prompt. At
   each step the latent, copied into the UNet's batch of two (negative prompt, edited prompt), takes
   one gradient step of size ``xa_guidance`` (0.1) on the cross-attention loss
   ``sum_layers mean_(batch, heads) ||M - M_ref||^2`` (each copy by the loss of its own maps); the
   noise is predicted again at the moved copies, and the step continues from the moved copy of the
   negative prompt, as the official code does.

Deviations:
- Sentence sets: the paper writes about 1000 sentences for each side with GPT-3. Offline, the sets
  are templates (:data:`SENTENCE_TEMPLATES`) filled with the source and the target prompt, so the
  direction is the prompts' difference averaged over contexts; a user may pass two files of
  sentences (one a line) as ``source_sentences`` and ``target_sentences`` instead.
- The caption is the source prompt (the official code writes it with BLIP).
- The reference pass runs the UNet on one latent: the official code's batch of two holds the
  source prompt twice (negative and conditional), which gives the same maps and noise, so its
  second half costs NFE for nothing.
- DDIM inversion as editeval's (every timestep, exact alpha-bars; the official loop skips the
  first and last timestep and its inverse scheduler reads the alpha-bar one timestep off); the
  pairwise loss's random shifts come from the edit's generator; the source latents are the VAE
  posterior mean (official: a posterior sample).

NFE = num_inference_steps (inversion; 0 when cached) + num_inference_steps (reference) +
      4 * num_inference_steps (edit: the guided pass and the prediction at the moved latents, each
      a batch of 2; 1 each when guidance_scale is 1; the guided pass is skipped when xa_guidance
      is 0), plus num_inference_steps backward passes through the UNet (on the same batch) for
      the guidance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.attention import (
    AttentionCall,
    AttentionController,
    control_attention,
)
from editeval.diffusion.ddim import (
    ddim_sample,
    ddim_scheduler,
    ddim_step,
    model_noise,
    noise_levels,
)
from editeval.diffusion.latents import decode_latents
from editeval.diffusion.regularised_inversion import (
    check_regularisation,
    regularised_inversion,
)

SENTENCE_TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a cropped photo of {}",
    "a good photo of {}",
    "a rendering of {}",
    "a painting of {}",
    "a drawing of {}",
)
"""Templates of the offline sentence sets: each filled with the source (target) prompt."""


def read_sentences(path: str, name: str) -> list[str]:
    """The non-empty lines of the UTF-8 text file at ``path``, stripped.

    Raises:
        ValueError: the file is missing, unreadable or holds no sentence (the message names the
            parameter ``name`` and the file).
    """
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = "not found" if isinstance(error, FileNotFoundError) else str(error)
        raise ValueError(f"pix2pix-zero: {name}={path!r}: cannot read the file ({reason}); give "
                         "a UTF-8 text file with one sentence a line") from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ValueError(f"pix2pix-zero: {name}={path!r} holds no sentence; give one sentence a "
                         "line")
    return sentences


def sentence_sets(source_prompt: str, target_prompt: str, source_sentences: str = "",
                  target_sentences: str = "") -> tuple[list[str], list[str]]:
    """The source and target sentence sets: read from the two files when given, else the
    :data:`SENTENCE_TEMPLATES` filled with each prompt."""
    if source_sentences:
        return (read_sentences(source_sentences, "source_sentences"),
                read_sentences(target_sentences, "target_sentences"))
    return ([t.format(source_prompt) for t in SENTENCE_TEMPLATES],
            [t.format(target_prompt) for t in SENTENCE_TEMPLATES])


@torch.no_grad()
def mean_text_embedding(pipe: Any, sentences: list[str]) -> torch.Tensor:
    """The mean of the sentences' CLIP text embeddings, (1, 77, D), as the pipeline encodes them
    (padded to the tokenizer's length; a sentence longer than that is cut, as in the official
    ``make_edit_direction.py``)."""
    total = None
    for start in range(0, len(sentences), 64):
        embeddings, _ = pipe.encode_prompt(sentences[start:start + 64], pipe.device, 1, False)
        part = embeddings.float().sum(dim=0, keepdim=True)
        total = part if total is None else total + part
    return (total / len(sentences)).to(embeddings.dtype)


def edit_direction(pipe: Any, source: list[str], target: list[str]) -> torch.Tensor:
    """``mean(E(target)) - mean(E(source))``, (1, 77, D): zero when the two sets are equal."""
    if source == target:
        return torch.zeros_like(mean_text_embedding(pipe, source[:1]))
    return mean_text_embedding(pipe, target) - mean_text_embedding(pipe, source)


class CrossAttentionGuide(AttentionController):
    """Records the reference pass's cross-attention maps and scores the edit pass's against them.

    ``mode``: ``"record"`` keeps the maps (detached) by timestep and layer; ``"guide"`` keeps the
    current call's maps with their graph for :meth:`loss`; ``"pass"`` keeps nothing. Every
    cross-attention layer runs through the explicit softmax in every mode, so the edit pass
    computes attention exactly as the reference pass did.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mode = "pass"
        self.reference: dict[int, dict[str, torch.Tensor]] = {}
        self.current: dict[str, torch.Tensor] = {}

    def wants(self, call: AttentionCall) -> bool:
        return call.is_cross

    def edit_probs(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if self.mode == "record":
            self.reference.setdefault(call.timestep, {})[call.layer] = probs.detach()
        elif self.mode == "guide":
            self.current[call.layer] = probs
        return probs

    def loss(self, timestep: int) -> torch.Tensor:
        """``sum_layers mean_(batch, heads) sum_(query, key) (M - M_ref)^2`` of the maps of the
        last guided call against the reference at ``timestep`` (a 0-dim float32 tensor)."""
        reference = self.reference[timestep]
        return sum(((maps.float() - reference[layer].float()) ** 2).sum(dim=(-2, -1)).mean()
                   for layer, maps in self.current.items())


def guide_latents(unet: Any, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor,
                  texts: torch.Tensor, guide: CrossAttentionGuide,
                  amount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One cross-attention guidance step: ``latents - amount * grad loss``.

    ``latents``: (B, 4, h, w), one copy per text of ``texts`` (B, 77, D); the UNet runs inside
    ``control_attention(unet, guide)``. Returns the moved latents (detached) and the loss before
    the move. NFE = B, plus one backward pass on the batch.
    """
    moving = latents.detach().clone().requires_grad_(True)
    guide.mode, guide.current = "guide", {}
    with torch.enable_grad():
        model_noise(unet, scheduler, moving, timestep, texts)
        loss = guide.loss(int(timestep))
        (grad,) = torch.autograd.grad(loss, moving)
    guide.mode, guide.current = "pass", {}
    return (moving - amount * grad.to(moving)).detach(), loss.detach()


CARD = MethodCard(
    name="pix2pix-zero",
    title="Pix2Pix-Zero",
    paper=Paper("Zero-shot Image-to-Image Translation", "SIGGRAPH", 2023, "2302.03027"),
    strategy="training-free",
    subcategory="attention-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 5.0, "xa_guidance": 0.1,
              "lambda_ac": 20.0, "lambda_kl": 20.0, "num_reg_steps": 5, "num_ac_rolls": 5,
              "source_sentences": "", "target_sentences": ""},
    nfe_formula="num_inference_steps (regularised inversion; 0 when cached) + num_inference_steps "
                "(reference) + 4 * num_inference_steps (guided pass and prediction, each a batch "
                "of 2; 1 each when guidance_scale is 1; no guided pass when xa_guidance is 0)",
    backward_formula="num_inference_steps (0 when xa_guidance is 0)",
    deviations="sentence sets from templates over the source and target prompts (paper: ~1000 "
               "GPT-3 sentences; files may be given); the source prompt as caption (official: "
               "BLIP); reference pass on one latent instead of a batch of two equal halves; "
               "editeval's DDIM inversion steps (official: skips the first and last timestep); "
               "shifts of the pairwise loss from the edit's generator; VAE posterior mean",
    note="source_sentences / target_sentences: files of sentences (one a line) for the edit "
         "direction, as the paper's; both or neither. The edit returns the reference pass's "
         "reconstruction as an intermediate.",
)


def _check(*, num_inference_steps: int, guidance_scale: float, xa_guidance: float,
           lambda_ac: float, lambda_kl: float, num_reg_steps: int, num_ac_rolls: int,
           source_sentences: str, target_sentences: str) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"pix2pix-zero: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")
    for name, value in (("guidance_scale", guidance_scale), ("xa_guidance", xa_guidance)):
        if value < 0:
            raise ValueError(f"pix2pix-zero: {name} must be >= 0, got {value}")
    check_regularisation("pix2pix-zero", lambda_ac=lambda_ac, lambda_kl=lambda_kl,
                         num_reg_steps=num_reg_steps, num_ac_rolls=num_ac_rolls)
    if bool(source_sentences) != bool(target_sentences):
        raise ValueError("pix2pix-zero: give both source_sentences and target_sentences (files "
                         "of sentences, one a line), or neither (sentences from templates over "
                         "the prompts)")
    if source_sentences:
        read_sentences(source_sentences, "source_sentences")
        read_sentences(target_sentences, "target_sentences")


@register_method(CARD, check=_check)
def pix2pix_zero(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                 num_inference_steps: int, guidance_scale: float, xa_guidance: float,
                 lambda_ac: float, lambda_kl: float, num_reg_steps: int, num_ac_rolls: int,
                 source_sentences: str, target_sentences: str) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (see the module)."""
    noise, cached = regularised_inversion(
        pipe, inputs.image, inputs.source_prompt, num_inference_steps, generator,
        inputs.inversion_cache, lambda_ac=lambda_ac, lambda_kl=lambda_kl,
        num_reg_steps=num_reg_steps, num_ac_rolls=num_ac_rolls)
    source_set, target_set = sentence_sets(inputs.source_prompt, inputs.target_prompt,
                                           source_sentences, target_sentences)
    direction = edit_direction(pipe, source_set, target_set)
    source, _ = pipe.encode_prompt(inputs.source_prompt, pipe.device, 1, False)
    edited = source + direction.to(source)
    texts = torch.cat([source, edited]) if guidance_scale != 1.0 else edited
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    timesteps, alphas = noise_levels(scheduler)
    guide = CrossAttentionGuide()
    with control_attention(pipe.unet, guide):
        guide.mode = "record"
        reconstruction = ddim_sample(pipe.unet, noise, scheduler, source)
        guide.mode = "pass"
        latents = noise
        for i, t in enumerate(scheduler.timesteps):
            level = len(timesteps) - i
            copies = latents.expand(texts.shape[0], *latents.shape[1:])
            if xa_guidance > 0:
                copies, _ = guide_latents(pipe.unet, scheduler, copies, t, texts, guide,
                                          xa_guidance)
            with torch.no_grad():
                predicted = model_noise(pipe.unet, scheduler, copies, t, texts)
            if guidance_scale != 1.0:
                uncond, cond = predicted.chunk(2)
                predicted = uncond + guidance_scale * (cond - uncond)
            latents = ddim_step(copies[:1], predicted, alphas[level], alphas[level - 1])
    return MethodOutput(decode_latents(pipe, latents), {
        "inversion_cached": cached,
        "reconstruction": decode_latents(pipe, reconstruction),
        "sentences": [len(source_set), len(target_set)],
        "edit_direction_norm": float(direction.float().norm()),
    })
