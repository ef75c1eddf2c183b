"""Imagic: fit a text embedding and the denoiser to the image, then generate from an embedding
interpolated towards the target text.

Paper: "Imagic: Text-Based Real Image Editing with Diffusion Models", Kawar, Zada, Lang, Tov,
Chang, Dekel, Mosseri and Irani, CVPR 2023, arXiv:2210.09276. No official code was released; the
defaults are the paper's for Stable Diffusion (section 3.3), the sampling settings those of
diffusers' community ``imagic_stable_diffusion`` pipeline. The survey files it under test-time
finetuning, hybrid finetuning (an embedding and the model's weights).

Algorithm (only the source image and the target prompt are used):

A. Text embedding optimisation: e_tgt, the target prompt's embedding, is optimised with the
   denoiser frozen to minimise the denoising loss at the source's latent (a timestep uniform in
   [0, T), a fresh noise each step): ``embedding_steps`` (1000) Adam steps of learning rate
   ``embedding_learning_rate`` (2e-3). Result: e_opt, close to e_tgt.
B. Model finetuning: every weight of a float32 copy of the denoiser
   (:func:`~editeval.diffusion.finetuning.trainable_copy`) is finetuned with the same loss,
   conditioned on the fixed e_opt: ``finetune_steps`` (1500) Adam steps of learning rate
   ``finetune_learning_rate`` (5e-7).
C. Generation: e = eta * e_tgt + (1 - eta) * e_opt; deterministic DDIM sampling
   (``num_inference_steps`` 50) with the finetuned copy from a standard normal latent drawn from
   the edit's generator, classifier-free guidance ``guidance_scale`` (7.5) with the empty prompt
   as the unconditional one. eta = 0 regenerates the source (the model was fitted to it there);
   the paper finds edits in eta in [0.6, 0.8] (its figure 9: below 0.4 the output is almost the
   input) and picks eta per image; the default 0.7 is the middle of that range.

Stages A and B do not depend on eta, the sampling steps or the guidance: their result (e_opt and
the finetuned weights) is kept in the run's cache
(:func:`~editeval.diffusion.finetuning.finetuned_state`, a bounded large entry), so a second
edit of the same image and prompt with another eta skips them. An entry holds the denoiser's
weights in float32 and e_opt: 3.4 GB for SD 1.5's UNet, 23 MB for the toy model's.

Deviations: the source latent is the VAE posterior's mean (diffusers' pipeline samples it); the
timesteps and noises of the fit come from the edit's generator; the fit runs in float32 whatever
the pipeline's dtype (diffusers: fp16 mixed precision); the Imagen-only parts (super-resolution
models finetuned on e_tgt) have no counterpart in a latent model. diffusers' pipeline defaults to
500 + 1000 steps at learning rates 1e-3 and 2e-6 and to eta (its ``alpha``) 1.2; we keep the
paper's values. DDIM sampling and guidance 7.5 are diffusers' (the paper gives none for SD).

NFE = embedding_steps + finetune_steps (one forward pass a fit step, batch 1; 0 when the fit is
cached) + 2 * num_inference_steps (sampling with guidance; 1x at guidance_scale 1). Backward
passes through the denoiser: embedding_steps + finetune_steps (0 when cached).
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

CARD = MethodCard(
    name="imagic",
    title="Imagic",
    paper=Paper("Imagic: Text-Based Real Image Editing with Diffusion Models", "CVPR", 2023,
                "2210.09276"),
    strategy="test-time-finetuning",
    subcategory="hybrid-finetuning",
    inputs=("target_prompt",),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"eta": 0.7, "embedding_steps": 1000, "embedding_learning_rate": 2e-3,
              "finetune_steps": 1500, "finetune_learning_rate": 5e-7,
              "num_inference_steps": 50, "guidance_scale": 7.5},
    nfe_formula="embedding_steps + finetune_steps (the fit: 0 when cached) + 2 * "
                "num_inference_steps (1x at guidance_scale 1)",
    backward_formula="embedding_steps + finetune_steps (0 when the fit is cached)",
    deviations="eta 0.7 by default (the middle of the paper's [0.6, 0.8]; it picks eta per "
               "image); VAE posterior mean, not a sample; fit in float32 (diffusers: fp16 mixed "
               "precision) with timesteps and noise from the edit's generator; no super-resolution "
               "stage (Imagen only); DDIM and guidance 7.5 from diffusers (the paper gives none "
               "for SD)",
    note="eta: 0 regenerates the source, 1 samples the target prompt with the finetuned model, "
         "above 1 extrapolates (diffusers' examples use 1 to 2); the paper edits at eta in "
         "[0.6, 0.8], chosen per image. The fit (embedding and "
         "finetuned weights) is cached per image, prompt, model and fit settings, not eta.",
)


def _check(*, eta: float, embedding_steps: int, embedding_learning_rate: float,
           finetune_steps: int, finetune_learning_rate: float, num_inference_steps: int,
           guidance_scale: float) -> None:
    if eta < 0:
        raise ValueError(f"imagic: eta must be >= 0 (0 regenerates the source, the paper edits "
                         f"in [0.6, 0.8]), got {eta}")
    if embedding_steps < 0 or finetune_steps < 0:
        raise ValueError(f"imagic: embedding_steps and finetune_steps must be >= 0, got "
                         f"{embedding_steps} and {finetune_steps}")
    if embedding_learning_rate < 0 or finetune_learning_rate < 0:
        raise ValueError(f"imagic: embedding_learning_rate and finetune_learning_rate must be "
                         f">= 0, got {embedding_learning_rate} and {finetune_learning_rate}")
    if num_inference_steps < 1:
        raise ValueError(f"imagic: num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"imagic: guidance_scale must be >= 0, got {guidance_scale}")


@register_method(CARD, check=_check)
def imagic(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, eta: float,
           embedding_steps: int, embedding_learning_rate: float, finetune_steps: int,
           finetune_learning_rate: float, num_inference_steps: int,
           guidance_scale: float) -> MethodOutput:
    """Edit ``inputs.image`` towards ``inputs.target_prompt`` (see the module docstring)."""
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    source = encode_image(pipe, inputs.image).float()
    target = encode_prompt(pipe, inputs.target_prompt).float()
    with trainable_copy(pipe) as unet:

        def fit() -> dict[str, torch.Tensor]:
            embedding = target.clone()
            fit_denoising_loss(unet, scheduler, source, embedding,
                               [{"params": [embedding], "lr": embedding_learning_rate}],
                               embedding_steps, generator, "imagic: text embedding")
            fit_denoising_loss(unet, scheduler, source, embedding,
                               [{"params": list(unet.parameters()), "lr": finetune_learning_rate}],
                               finetune_steps, generator, "imagic: denoiser")
            return {"embedding": embedding, "weights": weights_of(unet)}

        settings = {"embedding_steps": embedding_steps,
                    "embedding_learning_rate": embedding_learning_rate,
                    "finetune_steps": finetune_steps,
                    "finetune_learning_rate": finetune_learning_rate}
        state, cached = finetuned_state(inputs.inversion_cache, kind="imagic", pipe=pipe,
                                        image=inputs.image, prompt=inputs.target_prompt,
                                        settings=settings, generator=generator, compute=fit)
        if cached:
            load_weights(unet, state["weights"])
        optimised = state["embedding"].to(target.device)
        text = eta * target + (1.0 - eta) * optimised
        noise = torch.randn(source.shape, generator=generator).to(source.device)
        latents = ddim_sample(unet, noise, scheduler, text,
                              encode_prompt(pipe, "").float(), guidance_scale)
    return MethodOutput(decode_latents(pipe, latents), {
        "fit_cached": cached,
        "embedding_shift": float((optimised - target).norm() / target.norm()),
    })
