"""SINE: finetune the denoiser on the one image, then sample with model-based guidance.

Paper: "SINE: SINgle Image Editing with Text-to-Image Diffusion Models", Zhang, Han, Ghosh,
Metaxas and Ren, CVPR 2023, arXiv:2212.04489 (official code: zhang-zx/SINE; the paper's results
come from its LDM scripts, ``main.py`` with ``configs/stable-diffusion/v1-finetune_picture.yaml``
and ``scripts/stable_txt2img_guidance.py``, whose settings we take). The survey files it under
test-time finetuning, hybrid finetuning.

Algorithm:

1. Finetuning (DreamBooth-like, on the source alone): ``num_finetune_steps`` (800) steps of the
   diffusion loss at the source's latents (batch 1, a uniform timestep and a fresh noise a step)
   on a float32 copy of the denoiser, all its weights, and on the finetuning prompt's text
   embedding c^ (the official code trains the text encoder too), learning rate 1e-6
   (:func:`editeval.diffusion.finetuning.fit_denoising_loss`). The finetuning prompt is the source
   prompt. Cached per (image, source prompt, model, steps, rate, seed): another guidance setting
   reuses the fit.
2. Model-based classifier-free guidance, DDIM (eta 0, ``num_inference_steps`` = 100) from pure
   Gaussian noise (the official script starts from a random code, not from the noised source).
   At every timestep t >= K (``model_guidance_t_min``, 500: the first half of the steps) the
   noise estimate mixes the finetuned model eps^ under c^ and the pretrained model eps under the
   target prompt c with weight v (``model_guidance_weight``, 0.6 = 1 - the script's
   ``cond_beta`` 0.4), inside classifier-free guidance of scale w (``guidance_scale``, 10) around
   the pretrained model's unconditional prediction::

       eps~ = eps(z_t, "") + w * (v * eps^(z_t, c^) + (1 - v) * eps(z_t, c) - eps(z_t, ""))

   Below K only the pretrained model guides (plain classifier-free guidance on c).

Deviations:
- The finetuning prompt is the source prompt, not the official ``photo of a sks <class word>``:
  editing requests give a caption, not a class word.
- The text encoder is not finetuned; its output for the finetuning prompt, the only text the
  finetuned model sees, is fitted instead (same learning rate).
- Adam, not AdamW (weight decay 0.01 x lr 1e-6 shrinks weights by < 1e-5 over 800 steps); the
  source's latents are the VAE posterior mean, not a fresh posterior sample a step; the official
  loop's prior-preservation batch has weight 0 and is not computed.
- The patch-based finetuning (random crops of the source with a sinusoidal position encoding
  added after the UNet's input convolution, 10,000 steps) is not implemented: it serves output
  resolutions other than the finetuning one, and editeval edits at the model's resolution.
- The finetuned model's unconditional prediction, computed and unused by the official sampler,
  is not computed. Optimisation in float32 whatever the pipeline's dtype.

NFE = num_finetune_steps (the fit; 0 when the run's cache holds it) + 2 * num_inference_steps
(pretrained model, unconditional and target prompt; 1x at guidance_scale 1) + the number of
sampling timesteps >= model_guidance_t_min (the finetuned model; num_inference_steps / 2 at the
defaults). Backward passes = num_finetune_steps (0 when cached).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler, model_noise
from editeval.diffusion.finetuning import (
    finetuned_state,
    fit_denoising_loss,
    load_weights,
    trainable_copy,
    weights_of,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="sine",
    title="SINE",
    paper=Paper("SINE: SINgle Image Editing with Text-to-Image Diffusion Models", "CVPR", 2023,
                "2212.04489"),
    strategy="test-time-finetuning",
    subcategory="hybrid-finetuning",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_finetune_steps": 800, "learning_rate": 1e-6, "num_inference_steps": 100,
              "guidance_scale": 10.0, "model_guidance_weight": 0.6, "model_guidance_t_min": 500},
    nfe_formula="num_finetune_steps (0 when cached) + 2 * num_inference_steps (1x at "
                "guidance_scale 1) + the sampling timesteps >= model_guidance_t_min "
                "(num_inference_steps / 2 at the defaults)",
    backward_formula="num_finetune_steps (0 when cached)",
    deviations="finetuning prompt = the source prompt (official: 'photo of a sks <class>'); the "
               "text encoder's output embedding fitted instead of the encoder; Adam instead of "
               "AdamW; VAE posterior mean; no patch-based finetuning; optimisation in float32",
    note="Samples from pure noise, as the official script: what the edit keeps of the source comes "
         "from the finetuned model's guidance in the first steps. The fitted denoiser is kept in "
         "the run's cache (a large entry), so another guidance setting skips the finetuning.",
)


def _check(*, num_finetune_steps: int, learning_rate: float, num_inference_steps: int,
           guidance_scale: float, model_guidance_weight: float, model_guidance_t_min: int) -> None:
    if num_finetune_steps < 0:
        raise ValueError(f"sine: num_finetune_steps must be >= 0, got {num_finetune_steps}")
    if learning_rate <= 0:
        raise ValueError(f"sine: learning_rate must be > 0, got {learning_rate}")
    if num_inference_steps < 1:
        raise ValueError(f"sine: num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"sine: guidance_scale must be >= 0, got {guidance_scale}")
    if not 0.0 <= model_guidance_weight <= 1.0:
        raise ValueError(f"sine: model_guidance_weight (the paper's v) must be in [0, 1], got "
                         f"{model_guidance_weight}")
    if model_guidance_t_min < 0:
        raise ValueError(f"sine: model_guidance_t_min (the paper's K, a timestep) must be >= 0, "
                         f"got {model_guidance_t_min}")


def model_based_guidance(uncond: torch.Tensor | None, target: torch.Tensor,
                         finetuned: torch.Tensor | None, guidance_scale: float,
                         weight: float) -> torch.Tensor:
    """SINE's noise estimate ``uncond + w * (v * finetuned + (1 - v) * target - uncond)``.

    Args:
        uncond: the pretrained model's prediction under the empty prompt, or ``None`` (no
            classifier-free guidance: ``guidance_scale`` is then ignored).
        target: the pretrained model's prediction under the target prompt.
        finetuned: the finetuned model's prediction under its prompt, or ``None`` (a step
            without model guidance: ``target`` alone).
        guidance_scale: w; weight: v in [0, 1]. All tensors of one shape and dtype.
    """
    cond = target if finetuned is None else weight * finetuned + (1 - weight) * target
    return cond if uncond is None else uncond + guidance_scale * (cond - uncond)


@register_method(CARD, check=_check)
def sine(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_finetune_steps: int,
         learning_rate: float, num_inference_steps: int, guidance_scale: float,
         model_guidance_weight: float, model_guidance_t_min: int) -> MethodOutput:
    """Edit ``inputs.image`` by finetuning on it, then model-based guidance (see the module)."""
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    latents = encode_image(pipe, inputs.image)
    target = encode_prompt(pipe, inputs.target_prompt)
    null = encode_prompt(pipe, "") if guidance_scale != 1.0 else None
    with trainable_copy(pipe) as finetuned:
        def fit() -> dict[str, torch.Tensor]:
            text = encode_prompt(pipe, inputs.source_prompt).float().clone()
            groups = [{"params": list(finetuned.parameters()), "lr": learning_rate},
                      {"params": [text], "lr": learning_rate}]
            fit_denoising_loss(finetuned, scheduler, latents, text, groups, num_finetune_steps,
                               generator, "SINE: finetuning the denoiser")
            return {"weights": weights_of(finetuned), "text": text.detach()}

        state, cached = finetuned_state(
            inputs.inversion_cache, kind="sine-finetune", pipe=pipe, image=inputs.image,
            prompt=inputs.source_prompt, generator=generator, compute=fit,
            settings={"num_finetune_steps": num_finetune_steps, "learning_rate": learning_rate})
        if cached:
            load_weights(finetuned, state["weights"])
        text = state["text"].to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        guided = [int(t) >= model_guidance_t_min for t in scheduler.timesteps]

        def predict(i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            if null is None:
                uncond, cond = None, model_noise(pipe.unet, scheduler, z, t, target)
            else:
                uncond, cond = model_noise(pipe.unet, scheduler, torch.cat([z, z]), t,
                                           torch.cat([null, target])).chunk(2)
            own = model_noise(finetuned, scheduler, z.float(), t, text).to(z.dtype) \
                if guided[i] else None
            return model_based_guidance(uncond, cond, own, guidance_scale, model_guidance_weight)

        edited = ddim_sample(pipe.unet, noise, scheduler, predict=predict)
    return MethodOutput(decode_latents(pipe, edited), intermediates={
        "finetune_cached": cached, "model_guided_steps": sum(guided), "initial_latents": noise})
