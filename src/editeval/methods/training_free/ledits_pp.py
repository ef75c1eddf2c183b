"""LEDITS++: edit-friendly DPM-Solver++ inversion, several edit concepts, implicit masks.

Paper: "LEDITS++: Limitless Image Editing using Text-to-Image Models", Brack, Friedrich, Kornmeier,
Tsaban, Schramowski, Kersting and Passos, CVPR 2024, arXiv:2311.16711 (official code:
ml-research/ledits_pp; diffusers' ``LEditsPPPipelineStableDiffusion`` is the authors' port).

Algorithm (implemented on editeval's parts, not by wrapping diffusers' pipeline):

1. **Inversion** (:mod:`editeval.diffusion.dpm_solver_inversion`): the source is inverted without a
   prompt (the official default ``source_prompt=""``) for the second-order SDE-DPM-Solver++ over
   ``num_inference_steps`` timesteps spaced from ``1000 (1 - skip) - 1`` down to 1: independent
   noisy latents at every timestep and the noise maps that regenerate them exactly.
2. **Editing**: sampling with those noise maps from the noisiest latent, the noise estimate being
   ``eps_u + sum_i M_i s_i (eps_i - eps_u)`` (eq. 12), ``eps_u`` unconditional, ``eps_i`` that of
   edit concept i, ``s_i`` its ``edit_guidance_scale``, the direction reversed for a concept to
   remove (``reverse_editing_direction``), from its warm-up step on.
3. **Implicit masks** ``M_i = M1_i * M2_i`` (``masking="intersect"``): ``M1_i`` from
   cross-attention: concept i's maps over its words, averaged over heads and over the down- and
   up-block layers at their coarsest resolution (SD 1.5 at 512 px: 16 x 16, the paper's), summed
   over the words, smoothed by the official 3 x 3 Gaussian (weights ``exp(-(d / (2 sigma))^2)``,
   sigma 0.5), 1 where at least the ``edit_threshold``-quantile, resized (nearest) to the latents;
   ``M2_i`` from the noise estimate: 1 where the term's magnitude summed over latent channels is at
   least its ``edit_threshold``-quantile. ``masking="attention"`` uses ``M1`` alone, ``"noise"``
   ``M2`` alone (the official repository's default).

The edit concepts come from the prompt pair: the words the target adds are concepts to add, the
words it drops concepts to remove, one concept per run of differing words found by the
Prompt-to-Prompt aligner; ``edit_concepts="+words,-words"`` gives them explicitly. The source
prompt serves only to find them (the inversion needs no caption).

diffusers' pipeline has known faults that this implementation does not share, each tested: its
attention store keeps only maps of ``int(h / 4) x int(w / 4)`` query tokens (h x w the latent
size), so wherever the UNet's maps have another size (a latent side not divisible by 4 after its
rounding, as at 776 x 520 px, or a UNet with other levels) the store comes back empty and the call
crashes (diffusers issues #8826 and #10287; on the tiny model at 64, 192 x 96 and 768 x 256 px:
``torch.cat(): expected a non-empty list of Tensors``); it leaves its attention processors
installed after the call; with current transformers it counts a concept's words as the padded
length (77), so its mask sums attention over the padding too. Here the mask's resolution is read
off the maps the UNet produced, the processors are installed for the concepts' UNet call only and
always restored, and the words are counted without padding.

Defaults (the official code's ``invert`` and ``__call__``): 30 steps, skip 0.15, eta 1 (SDE), edit
guidance scale 5, threshold 0.9, warm-up 0, and the paper's intersected masks (diffusers' default
``use_intersect_mask=True``).

Deviations: concepts derived from the prompt pair; one scale, threshold and warm-up for every
concept; the sampler's last steps stay second order as in the inversion (the official scheduler
drops to first order under 15 steps, breaking exact reconstruction); the intersection holds at every
step (diffusers' port uses ``M1`` alone above timestep 800, the official repository does not).

NFE = num_inference_steps (the unconditional inversion; 0 when cached) + (1 + n_concepts) *
num_inference_steps (the unconditional estimate and one per concept).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.attention import (
    AttentionCall,
    AttentionController,
    control_attention,
)
from editeval.diffusion.ddim import ddim_scheduler, model_noise
from editeval.diffusion.dpm_solver_inversion import (
    dpm_solver_invert,
    dpm_solver_sample,
    dpm_solver_timesteps,
)
from editeval.diffusion.inversion_cache import (
    cached_inversion,
    generator_digest,
    inversion_key,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.diffusion.semantic_guidance import (
    EditConcept,
    concept_embeddings,
    concept_tokens,
    parse_concepts,
    resolve_concepts,
)

MASKINGS = ("intersect", "attention", "noise")

CARD = MethodCard(
    name="ledits++",
    title="LEDITS++",
    paper=Paper("LEDITS++: Limitless Image Editing using Text-to-Image Models", "CVPR", 2024,
                "2311.16711"),
    strategy="training-free",
    subcategory="inversion-sampling-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 30, "skip": 0.15, "edit_concepts": "",
              "edit_guidance_scale": 5.0, "edit_threshold": 0.9, "edit_warmup_steps": 0,
              "masking": "intersect"},
    nfe_formula="num_inference_steps (unconditional inversion; 0 when cached) + (1 + n_concepts) "
                "* num_inference_steps (n_concepts: the intermediates' edit_concepts)",
    deviations="edit concepts derived from the prompt pair by the P2P aligner (added words: "
               "concepts to add, dropped words: concepts to remove); one scale, threshold and "
               "warm-up for all concepts; second-order steps to the end in sampling as in the "
               "inversion (exact reconstruction at any step count); masks intersected at every "
               "step (diffusers: attention mask alone above t=800)",
    note="Implemented on editeval's parts; the attention mask resolution is the coarsest "
         "down/up cross-attention level actually computed, so any image size works. masking= "
         "intersect | attention | noise. edit_concepts='+words,-words' gives the concepts.",
)

# The official 3x3 Gaussian smoothing: per axis exp(-(d / (2 sigma))^2), sigma 0.5, d in {-1, 0, 1}.
_AXIS = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2)
SMOOTHING = torch.outer(_AXIS, _AXIS) / torch.outer(_AXIS, _AXIS).sum()


class ConceptAttention(AttentionController):
    """Records the concepts' cross-attention in the down and up blocks during one UNet call.

    Args:
        tokens: record only layers with this many query tokens (the mask's resolution, once
            known), or ``None`` for every resolution.
    """

    def __init__(self, tokens: int | None = None) -> None:
        super().__init__(record={"cross"}, record_max_tokens=sys.maxsize)
        self.tokens = tokens
        self.sizes: dict[int, tuple[int, int]] = {}  # query tokens -> (height, width)

    def wants(self, call: AttentionCall) -> bool:
        size = call.height * call.width
        return call.is_cross and call.block != "mid" and self.tokens in (None, size)

    def edit_probs(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.height * call.width == probs.shape[2]:
            self.sizes[probs.shape[2]] = (call.height, call.width)
        return probs

    def coarsest_maps(self) -> torch.Tensor:
        """(C, h, w, 77) float32 maps at the coarsest recorded resolution, averaged over layers
        and heads.

        Raises:
            ValueError: no down- or up-block cross-attention was recorded (a UNet without it).
        """
        if not self.sizes:
            raise ValueError("LEDITS++'s attention masks need cross-attention in the UNet's down "
                             "or up blocks; this UNet has none: use masking=noise")
        height, width = self.sizes[min(self.sizes)]
        return self.average_maps(height, width)


def attention_mask(maps: torch.Tensor, words: int, threshold: float,
                   size: tuple[int, int]) -> torch.Tensor:
    """``M1``: (1, 1, *size) 0/1 float mask from one concept's (h, w, 77) attention maps: tokens
    1..``words`` summed, smoothed, at least the ``threshold``-quantile, resized (nearest)."""
    summed = maps[..., 1:1 + words].sum(-1)[None, None]
    mode = "reflect" if min(summed.shape[-2:]) > 1 else "replicate"
    smooth = F.conv2d(F.pad(summed, (1, 1, 1, 1), mode=mode), SMOOTHING[None, None].to(summed))
    cut = torch.quantile(smooth.flatten(), threshold)
    return F.interpolate((smooth >= cut).float(), size=size)


def noise_mask(term: torch.Tensor, threshold: float) -> torch.Tensor:
    """``M2``: (1, 1, h, w) 0/1 float mask where the (1, 4, h, w) term's magnitude summed over the
    channels is at least its ``threshold``-quantile."""
    magnitude = term.abs().float().sum(dim=1, keepdim=True)
    cut = torch.quantile(magnitude.flatten(start_dim=2), threshold, dim=2)
    return (magnitude >= cut[:, :, None, None]).float()


class LeditsGuidance:
    """LEDITS++'s noise estimate for one sampling run: ``(step, timestep, latents) -> eps`` (the
    module docstring's steps 2 and 3).

    Args:
        unet, scheduler: the denoiser and a scheduler with the model's alpha-bars.
        uncond: (1, 77, D) unconditional embedding. concepts: the edit concepts;
        embeddings: their (C, 77, D) embeddings; words: their token counts (no start/end).
        scale, threshold, warmup: ``s_i``, the masks' quantile, the first step guided.
        masking: one of :data:`MASKINGS`.

    Per step the UNet sees the unconditional latent (a batch of 1, as in the inversion, so that
    with scale 0 the edit is the inversion's reconstruction bit for bit), then the concepts (a
    batch of C) with attention recorded; NFE = 1 + C per step. ``activation`` accumulates, per
    latent pixel, how often a concept's mask held it (see :meth:`mask_frequency`).
    """

    def __init__(self, unet: Any, scheduler: Any, uncond: torch.Tensor,
                 concepts: list[EditConcept], embeddings: torch.Tensor, words: list[int], *,
                 scale: float, threshold: float, warmup: int, masking: str) -> None:
        self.unet, self.scheduler, self.uncond = unet, scheduler, uncond
        self.signs = [-1.0 if c.reverse else 1.0 for c in concepts]
        self.embeddings, self.words = embeddings, words
        self.scale, self.threshold, self.warmup, self.masking = scale, threshold, warmup, masking
        self.tokens: int | None = None  # the attention mask's resolution, once seen
        self.activation: torch.Tensor | None = None
        self.guided = 0

    def _concept_noise(self, timestep: torch.Tensor,
                       latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = latents.expand(len(self.signs), *latents.shape[1:])
        if self.masking == "noise":
            return model_noise(self.unet, self.scheduler, batch, timestep, self.embeddings), None
        recorder = ConceptAttention(self.tokens)
        with control_attention(self.unet, recorder):
            noise = model_noise(self.unet, self.scheduler, batch, timestep, self.embeddings)
        maps = recorder.coarsest_maps()
        self.tokens = maps.shape[1] * maps.shape[2]
        return noise, maps

    def __call__(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        uncond_noise = model_noise(self.unet, self.scheduler, latents, timestep, self.uncond)
        if not self.signs:
            return uncond_noise
        concept_noise, maps = self._concept_noise(timestep, latents)
        edit = torch.zeros_like(uncond_noise)
        if step < self.warmup:
            return uncond_noise + edit
        for i, sign in enumerate(self.signs):
            term = (concept_noise[i:i + 1] - uncond_noise) * (sign * self.scale)
            mask = torch.ones_like(term[:, :1])
            if maps is not None:
                mask = attention_mask(maps[i], self.words[i], self.threshold,
                                      tuple(term.shape[-2:])).to(term)
            if self.masking != "attention":
                mask = mask * noise_mask(term, self.threshold).to(term)
            edit = edit + term * mask
            self.activation = mask[0, 0].float() + (0 if self.activation is None
                                                     else self.activation)
            self.guided += 1
        return uncond_noise + edit

    def mask_frequency(self) -> torch.Tensor | None:
        """(h, w) float32 in [0, 1]: the share of guided (step, concept) pairs whose mask held each
        latent pixel; ``None`` when nothing was guided."""
        return None if self.activation is None else (self.activation / self.guided).cpu()


def _check(*, num_inference_steps: int, skip: float, edit_concepts: str, edit_guidance_scale: float,
           edit_threshold: float, edit_warmup_steps: int, masking: str) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"ledits++: num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"ledits++: skip is the fraction of the schedule left out, in [0, 1), "
                         f"got {skip}")
    parse_concepts(edit_concepts)
    if not 0.0 <= edit_threshold <= 1.0:
        raise ValueError(f"ledits++: edit_threshold is a quantile in [0, 1], got {edit_threshold}")
    for name, value in (("edit_guidance_scale", edit_guidance_scale),
                        ("edit_warmup_steps", edit_warmup_steps)):
        if value < 0:
            raise ValueError(f"ledits++: {name} must be >= 0, got {value}")
    if masking not in MASKINGS:
        raise ValueError(f"ledits++: masking must be one of {', '.join(MASKINGS)}, got {masking!r}")


@register_method(CARD, check=_check)
def ledits_pp(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
              num_inference_steps: int, skip: float, edit_concepts: str,
              edit_guidance_scale: float, edit_threshold: float, edit_warmup_steps: int,
              masking: str) -> MethodOutput:
    """Edit ``inputs.image`` with LEDITS++ (module docstring)."""
    scheduler = ddim_scheduler(pipe)
    alphas = scheduler.alphas_cumprod
    timesteps = dpm_solver_timesteps(scheduler.config.num_train_timesteps, num_inference_steps,
                                     skip)
    uncond = encode_prompt(pipe, "")

    def unconditional(step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return model_noise(pipe.unet, scheduler, latents, timestep, uncond)

    key = inversion_key(kind="sde-dpmsolver++-edit-friendly", image=inputs.image, prompt="",
                        pipe=pipe, scheduler=scheduler, num_inference_steps=num_inference_steps,
                        guidance_scale=1.0,
                        options={"skip": skip, "seed": generator.initial_seed(),
                                 "generator_state": generator_digest(generator)})
    inverted, cached = cached_inversion(inputs.inversion_cache, key, lambda: dict(zip(
        ("noisy", "noise_maps"), dpm_solver_invert(encode_image(pipe, inputs.image), timesteps,
                                                   alphas, unconditional, generator=generator))))
    concepts = list(resolve_concepts(pipe.tokenizer, inputs.source_prompt, inputs.target_prompt,
                                     edit_concepts))
    guidance = LeditsGuidance(
        pipe.unet, scheduler, uncond, concepts, concept_embeddings(pipe, concepts),
        [concept_tokens(pipe.tokenizer, c) for c in concepts], scale=edit_guidance_scale,
        threshold=edit_threshold, warmup=edit_warmup_steps, masking=masking)
    latents = dpm_solver_sample(inverted["noisy"][0].to(pipe.device),
                                [z.to(pipe.device) for z in inverted["noise_maps"]], timesteps,
                                alphas, guidance)
    intermediates: dict[str, Any] = {"inversion_cached": cached,
                                     "edit_concepts": [str(c) for c in concepts]}
    frequency = guidance.mask_frequency()
    if frequency is not None:
        intermediates["mask_frequency"] = frequency
    return MethodOutput(decode_latents(pipe, latents), intermediates)
