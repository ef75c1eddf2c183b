"""Forgedit: fit the source text embedding and the denoiser to the image together, edit with an
embedding built from the target prompt by vector subtraction or projection, and let the
finetuned denoiser forget part of what it learned.

Paper: "Forgedit: Text Guided Image Editing via Learning and Forgetting", Zhang, Xiao and Huang,
arXiv 2023, arXiv:2309.10556 (official code: github witcherofresearch/Forgedit, vanilla Forgedit:
``src/sample_forgedit_batch_textencoder.py`` and its pipeline
``pipelineattentionparallel_bsz=1.py``). The survey files it under test-time finetuning, hybrid
finetuning. Defaults are the official script's for Stable Diffusion.

Algorithm:

1. Joint fit: the source embedding e_src starts as the caption's text embedding and is fitted
   together with a float32 copy of the denoiser
   (:func:`~editeval.diffusion.finetuning.trainable_copy`) to the denoising loss at the image's
   latent: ``finetune_steps`` (40) Adam steps, each on a batch of ``batch_size`` (10) copies of
   the image with their own timesteps (uniform in [0, T)) and noises (400 samples in all, the
   script's 400 // 10). Learning rates differ: ``embedding_learning_rate`` (1e-3) for e_src,
   ``unet_learning_rate`` (6e-5) for the denoiser, of which only the down and up blocks after
   the first of each are fitted (in SD 1.x: ``down_blocks.1-3`` and ``up_blocks.1-3``; the
   input and output layers, the first down and up block and the middle block stay pretrained).
2. Edit embedding from the target prompt's embedding e_tgt and the fitted e_src
   (:func:`edit_embedding`), token by token (each of the 77 is a vector of the text width D):
   - ``interpolation="vs"``, vector subtraction: e = e_src + gamma (e_tgt - e_src).
   - ``interpolation="vp"``, vector projection: e_tgt = r e_src + e_perp with e_perp orthogonal
     to e_src (r e_src is e_tgt's projection onto e_src); e = alpha e_src + beta e_perp.
     alpha keeps the source's identity, beta sets the editing strength.
3. Forgetting (``forget``, :func:`forgets`): some fitted weights are reset to the pretrained ones
   before sampling. The paper finds that the UNet encoder (down blocks) learns the image's space
   and structure, the decoder (up blocks) its appearance and identity. The official strategies:
   ``encoderattn`` (forget the encoder except its attention layers), ``encoderattn+encoder1``
   (... and except down block 1), ``encoderkv`` (the encoder except the cross-attention keys and
   values), ``noencoder`` (the whole encoder), and the decoder counterparts ``decoderattn``,
   ``decoderattn+decoder2``, ``decoderkv``; ``none`` forgets nothing (the script's default,
   ``donotforget``).
4. Deterministic DDIM sampling (``num_inference_steps`` 50) with the finetuned (and forgetting)
   copy from a standard normal latent drawn from the edit's generator, classifier-free guidance
   ``guidance_scale`` (7.5), the empty prompt as the unconditional one.

The fit does not depend on the target prompt, the interpolation, gamma, alpha, beta, the
forgetting or the sampling settings: the fitted e_src and weights are kept in the run's cache
(:func:`~editeval.diffusion.finetuning.finetuned_state`, a bounded large entry) keyed by the
image, the source prompt, the model and the fit's settings, and forgetting is applied to the copy
after they are loaded. A second edit of the same image with another gamma or strategy skips the
fit.

Defaults: the official script sweeps gamma over 0, 0.1, ..., 1.6 (vector subtraction), and beta
over 1.0 ... 1.6 with alpha in {0.8, 0.9, 1.1} (vector projection; the paper's alpha and beta are
the code's ``textalpha`` and ``alpha``), at 4 seeds each, and the user picks the edit; we take one
setting, the middle of each sweep: gamma 0.8, alpha 0.9, beta 1.3.

Deviations: the source prompt is the request's (the paper captions the image with BLIP,
Salesforce/blip-image-captioning-base); one (gamma, or alpha and beta) setting and one seed
instead of the sweep and a human choice; no early stop (the official loop stops once a batch loss
is below 0.03 after 350 samples, which can drop the last 4 of 40 steps), so the cost is exact; the
source latent is the VAE posterior's mean (official: a sample); timesteps and noises from the
edit's generator. The fit runs in float32 whatever the pipeline's dtype (as the official code).

NFE = finetune_steps * batch_size (the fit: 0 when cached) + 2 * num_inference_steps (sampling
with guidance; 1x at guidance_scale 1). Backward passes through the denoiser: finetune_steps (0
when the fit is cached).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler
from editeval.diffusion.finetuning import (
    finetuned_state,
    fit_denoising_loss,
    load_weights,
    trainable_copy,
    weights_of,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

# strategy -> (the UNet half it forgets, substrings of the parameter names it keeps there), as
# the official pipeline's ``freeze`` options
FORGETTING: dict[str, tuple[str, tuple[str, ...]]] = {
    "none": ("", ()),
    "encoderattn": ("down_blocks.", ("attn",)),
    "encoderattn+encoder1": ("down_blocks.", ("attn", "down_blocks.1.")),
    "encoderkv": ("down_blocks.", ("attn2.to_k", "attn2.to_v")),
    "noencoder": ("down_blocks.", ()),
    "decoderattn": ("up_blocks.", ("attn",)),
    "decoderattn+decoder2": ("up_blocks.", ("attn", "up_blocks.2.")),
    "decoderkv": ("up_blocks.", ("attn2.to_k", "attn2.to_v")),
}
INTERPOLATIONS = ("vs", "vp")

CARD = MethodCard(
    name="forgedit",
    title="Forgedit",
    paper=Paper("Forgedit: Text Guided Image Editing via Learning and Forgetting", "arXiv", 2023,
                "2309.10556"),
    strategy="test-time-finetuning",
    subcategory="hybrid-finetuning",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"interpolation": "vs", "gamma": 0.8, "alpha": 0.9, "beta": 1.3, "forget": "none",
              "finetune_steps": 40, "batch_size": 10, "embedding_learning_rate": 1e-3,
              "unet_learning_rate": 6e-5, "num_inference_steps": 50, "guidance_scale": 7.5},
    nfe_formula="finetune_steps * batch_size (the joint fit: 0 when cached) + 2 * "
                "num_inference_steps (1x at guidance_scale 1)",
    backward_formula="finetune_steps (0 when the fit is cached)",
    deviations="the request's source prompt instead of a BLIP caption; one gamma (or alpha, "
               "beta) and one seed instead of the official sweep and a human choice; no early "
               "stop at loss 0.03; VAE posterior mean, not a sample; timesteps and noise from "
               "the edit's generator; fit in float32 (as the official code)",
    note="interpolation vs: e = e_src + gamma (e_tgt - e_src), gamma 0 regenerates the source "
         "(official sweep 0 to 1.6); vp: e = alpha e_src + beta e_perp (sweeps alpha 0.8 to 1.1, "
         f"beta 1.0 to 1.6). forget: {', '.join(FORGETTING)} (encoder* keeps the decoder's "
         "appearance and frees the structure, decoder* the reverse). The fit is cached per "
         "image, source prompt, model and fit settings: another target, gamma or forget reuses it.",
)


def forgets(name: str, strategy: str) -> bool:
    """Whether the forgetting ``strategy`` (a key of :data:`FORGETTING`) resets the denoiser
    parameter ``name`` (as ``UNet2DConditionModel.named_parameters`` names it) to its pretrained
    value."""
    half, kept = FORGETTING[strategy]
    return bool(half) and name.startswith(half) and not any(part in name for part in kept)


def fitted(name: str) -> bool:
    """Whether Forgedit's joint fit trains the denoiser parameter ``name``: those of every down
    and up block but the first of each (the official selection)."""
    parts = name.split(".")
    return parts[0] in ("down_blocks", "up_blocks") and parts[1] != "0"


def edit_embedding(source: torch.Tensor, target: torch.Tensor, interpolation: str, gamma: float,
                   alpha: float, beta: float) -> torch.Tensor:
    """The embedding Forgedit samples with, from the fitted source embedding and the target
    prompt's, both (1, 77, D) float tensors, token by token (see the module docstring).

    ``"vs"``: ``source + gamma * (target - source)``; ``"vp"``: ``alpha * source + beta *
    perp``, where ``perp`` is ``target`` minus its projection onto ``source`` (per token).

    Raises:
        ValueError: another ``interpolation``.
    """
    if interpolation == "vs":
        return source + gamma * (target - source)
    if interpolation == "vp":
        unit = torch.nn.functional.normalize(source, dim=-1)
        perpendicular = target - (target * unit).sum(-1, keepdim=True) * unit
        return alpha * source + beta * perpendicular
    raise ValueError(f"forgedit: interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                     f"{interpolation!r}")


def _check(*, interpolation: str, gamma: float, alpha: float, beta: float, forget: str,
           finetune_steps: int, batch_size: int, embedding_learning_rate: float,
           unet_learning_rate: float, num_inference_steps: int, guidance_scale: float) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"forgedit: interpolation must be vs (vector subtraction) or vp (vector "
                         f"projection), got {interpolation!r}")
    if forget not in FORGETTING:
        raise ValueError(f"forgedit: forget must be one of {', '.join(FORGETTING)}, got "
                         f"{forget!r}")
    if min(gamma, alpha, beta) < 0:
        raise ValueError(f"forgedit: gamma, alpha and beta must be >= 0, got {gamma}, {alpha} "
                         f"and {beta}")
    if finetune_steps < 0 or batch_size < 1:
        raise ValueError(f"forgedit: finetune_steps must be >= 0 and batch_size >= 1, got "
                         f"{finetune_steps} and {batch_size}")
    if embedding_learning_rate < 0 or unet_learning_rate < 0:
        raise ValueError(f"forgedit: embedding_learning_rate and unet_learning_rate must be >= 0, "
                         f"got {embedding_learning_rate} and {unet_learning_rate}")
    if num_inference_steps < 1:
        raise ValueError(f"forgedit: num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"forgedit: guidance_scale must be >= 0, got {guidance_scale}")


@register_method(CARD, check=_check)
def forgedit(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, interpolation: str,
             gamma: float, alpha: float, beta: float, forget: str, finetune_steps: int,
             batch_size: int, embedding_learning_rate: float, unet_learning_rate: float,
             num_inference_steps: int, guidance_scale: float) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (module docstring)."""
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    source = encode_image(pipe, inputs.image).float()
    caption = encode_prompt(pipe, inputs.source_prompt).float()
    with trainable_copy(pipe) as unet:
        parameters = dict(unet.named_parameters())
        names = [name for name in parameters if fitted(name)]
        pretrained = weights_of(unet, [name for name in names if forgets(name, forget)])

        def fit() -> dict[str, torch.Tensor]:
            embedding = caption.clone()
            losses = fit_denoising_loss(
                unet, scheduler, source, embedding,
                [{"params": [parameters[name] for name in names], "lr": unet_learning_rate},
                 {"params": [embedding], "lr": embedding_learning_rate}],
                finetune_steps, generator, "forgedit: joint fit", batch_size=batch_size)
            return {"embedding": embedding, "weights": weights_of(unet, names),
                    "losses": torch.tensor(losses)}

        settings = {"finetune_steps": finetune_steps, "batch_size": batch_size,
                    "embedding_learning_rate": embedding_learning_rate,
                    "unet_learning_rate": unet_learning_rate}
        state, cached = finetuned_state(inputs.inversion_cache, kind="forgedit", pipe=pipe,
                                        image=inputs.image, prompt=inputs.source_prompt,
                                        settings=settings, generator=generator, compute=fit)
        load_weights(unet, {**state["weights"], **pretrained})  # forgetting: pretrained wins
        fitted_source = state["embedding"].to(caption.device)
        text = edit_embedding(fitted_source, encode_prompt(pipe, inputs.target_prompt).float(),
                              interpolation, gamma, alpha, beta)
        noise = torch.randn(source.shape, generator=generator).to(source.device)
        latents = ddim_sample(unet, noise, scheduler, text, encode_prompt(pipe, "").float(),
                              guidance_scale)
    losses = state["losses"]
    return MethodOutput(decode_latents(pipe, latents), {
        "fit_cached": cached,
        "fit_loss": float(losses[-1]) if len(losses) else None,  # the last step's batch
        "embedding_shift": float((fitted_source - caption).norm() / caption.norm()),
        "forgotten_tensors": len(pretrained),
    })
