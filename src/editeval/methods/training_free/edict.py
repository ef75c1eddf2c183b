"""EDICT: exact inversion with coupled transformations, then denoising under the target prompt.

Paper: "EDICT: Exact Diffusion Inversion via Coupled Transformations", Wallace, Gokul and Naik,
CVPR 2023, arXiv:2211.12446.

Algorithm. EDICT carries two latents (x, y), both set to the source latents, through DDIM.
With ``D(z, eps)`` the DDIM update from the alpha-bar ``a_t`` to the next lower level ``a_prev``
(an affine map of ``z`` for a fixed noise prediction ``eps``) and the mixing weight ``p``, one
denoising step is::

    x_inter = D(x_t, eps(y_t))            # the noise is predicted at the *other* latent
    y_inter = D(y_t, eps(x_inter))
    x_prev  = p * x_inter + (1 - p) * y_inter      # mixing layers
    y_prev  = p * y_inter + (1 - p) * x_prev

Every line changes one latent by an affine map whose coefficients depend only on the other latent,
so the step inverts exactly, line by line in reverse order (un-mix y, un-mix x, undo the y
update with ``eps(x_inter)``, undo the x update with ``eps(y_t)``). As in the official code, the
two latents swap roles every step (odd steps update y first); the mixing always takes x first.

Editing, as in the paper: invert the source latents under the source prompt through the last
``floor(num_inference_steps * init_image_strength)`` DDIM steps (40 of 50), with classifier-free
guidance at ``guidance_scale``, then denoise the pair under the target prompt with the same guidance
over the same steps. The edit is the decoded x. Defaults are the paper's editing settings (checked
against the official code's ``EDICT_editing``): 50 steps, ``mix_weight`` 0.93,
``init_image_strength`` 0.8, ``guidance_scale`` 3.

Precision: the coupled latents and all EDICT arithmetic run in float64 (the official code runs the
whole model in float64); the UNet runs in its own dtype on the latents cast down to it. Inverting
then denoising under the same prompt and guidance returns the latents to float64 rounding (about
1e-15 relative on the tiny model).

Deviations from the paper / official code:
- Timesteps follow the pipeline's scheduler configuration (SD's ``steps_offset`` 1: 981, 961, ... 1)
  rather than the official code's own scheduler (980, 960, ... 0); the last step goes to SD's
  ``final_alpha_cumprod`` as there.
- The source latents are the VAE posterior mean (shared :func:`encode_image`), not a sample.
- The official code's optional Prompt-to-Prompt attention control (off by default) is not included.

NFE = 8 * floor(num_inference_steps * init_image_strength) with guidance (2 latents x a CFG batch
of 2, once to invert and once to denoise), 4 * floor(...) without; the inversion is half of it, so
an edit that reuses a cached inversion costs half.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import (
    Reconstruction,
    ddim_scheduler,
    ddim_step,
    noise_levels,
    predict_noise,
)
from editeval.diffusion.inversion_cache import cached_inversion, inversion_key
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="edict",
    title="EDICT",
    paper=Paper("EDICT: Exact Diffusion Inversion via Coupled Transformations", "CVPR", 2023,
                "2211.12446"),
    strategy="training-free",
    subcategory="inversion-sampling-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 3.0, "mix_weight": 0.93,
              "init_image_strength": 0.8},
    nfe_formula="8 * floor(num_inference_steps * init_image_strength)  (4x without guidance; "
                "the inversion is half)",
    deviations="timesteps from the pipeline's scheduler config (981..1 on SD) instead of the "
               "official 980..0; VAE posterior mean instead of a sample; no optional "
               "Prompt-to-Prompt control",
    note="Coupled latents and EDICT arithmetic in float64; exact inversion to ~1e-15.",
)

Pair = tuple[torch.Tensor, torch.Tensor]


def _steps(scheduler: Any, num_steps: int | None) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]]:
    """(timestep, a_t, a_prev) of the last ``num_steps`` DDIM steps, denoising order, float64."""
    count = len(scheduler.timesteps)
    num_steps = count if num_steps is None else num_steps
    if not 1 <= num_steps <= count:
        raise ValueError(f"num_steps must be in [1, {count}] (the scheduler's steps), "
                         f"got {num_steps}")
    _, alphas = noise_levels(scheduler)
    return [(scheduler.timesteps[k], alphas[count - k].double(), alphas[count - k - 1].double())
            for k in range(count - num_steps, count)]


def _noise(unet: Any, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor,
           cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The (guided) noise prediction at float64 ``latents``, as float64."""
    return predict_noise(unet, scheduler, latents.to(unet.dtype), timestep, cond, uncond,
                         guidance_scale).double()


def _check_mix_weight(mix_weight: float) -> None:
    if not 0.0 < mix_weight <= 1.0:
        raise ValueError(f"edict: mix_weight must be in (0, 1], got {mix_weight} (paper: 0.93)")


@torch.no_grad()
def edict_invert(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, *,
                 mix_weight: float = 0.93, num_steps: int | None = None) -> Pair:
    """EDICT inversion of clean ``latents`` through the last ``num_steps`` steps of ``scheduler``.

    Args:
        unet: the pipeline's UNet. latents: (1, 4, h, w) clean latents, any float dtype.
        scheduler: a DDIM scheduler set to the number of steps (:func:`ddim_scheduler`).
        cond, uncond: (1, 77, D) text embeddings; ``uncond`` is needed when ``guidance_scale != 1``.
        mix_weight: the mixing weight p in (0, 1]. num_steps: how many of the least noisy steps to
            invert (default all).

    Returns:
        The coupled noisy latents (x, y) at the noisiest inverted timestep, float64, shape of
        ``latents``. NFE = 2 * num_steps (x2 with guidance).
    """
    _check_mix_weight(mix_weight)
    p = mix_weight
    pair = [latents.double(), latents.double()]
    steps = _steps(scheduler, num_steps)
    for i in reversed(range(len(steps))):
        t, alpha_t, alpha_prev = steps[i]
        pair[1] = (pair[1] - (1 - p) * pair[0]) / p  # un-mix, y then x
        pair[0] = (pair[0] - (1 - p) * pair[1]) / p
        first, second = i % 2, 1 - i % 2
        noise = _noise(unet, scheduler, pair[first], t, cond, uncond, guidance_scale)
        pair[second] = ddim_step(pair[second], noise, alpha_prev, alpha_t)
        noise = _noise(unet, scheduler, pair[second], t, cond, uncond, guidance_scale)
        pair[first] = ddim_step(pair[first], noise, alpha_prev, alpha_t)
    return pair[0], pair[1]


@torch.no_grad()
def edict_denoise(unet: Any, pair: Pair, scheduler: Any, cond: torch.Tensor,
                  uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, *,
                  mix_weight: float = 0.93, num_steps: int | None = None) -> Pair:
    """EDICT denoising of the coupled latents ``pair`` through the last ``num_steps`` steps.

    The exact inverse of :func:`edict_invert` with the same arguments. ``pair``: two (1, 4, h, w)
    latents at the noisiest of those steps. Returns the clean pair (x, y), float64.
    NFE = 2 * num_steps (x2 with guidance).
    """
    _check_mix_weight(mix_weight)
    p = mix_weight
    pair_ = [pair[0].double(), pair[1].double()]
    for i, (t, alpha_t, alpha_prev) in enumerate(_steps(scheduler, num_steps)):
        first, second = i % 2, 1 - i % 2
        noise = _noise(unet, scheduler, pair_[second], t, cond, uncond, guidance_scale)
        pair_[first] = ddim_step(pair_[first], noise, alpha_t, alpha_prev)
        noise = _noise(unet, scheduler, pair_[first], t, cond, uncond, guidance_scale)
        pair_[second] = ddim_step(pair_[second], noise, alpha_t, alpha_prev)
        pair_[0] = p * pair_[0] + (1 - p) * pair_[1]  # mixing layers, x then y
        pair_[1] = p * pair_[1] + (1 - p) * pair_[0]
    return pair_[0], pair_[1]


def edict_reconstruct(pipe: Any, image: Image.Image, prompt: str = "",
                      num_inference_steps: int = 50, guidance_scale: float = 1.0,
                      mix_weight: float = 0.93) -> Reconstruction:
    """Invert ``image`` with EDICT through all steps under ``prompt``, then denoise it back.

    ``image``: RGB, sides multiples of 8. Returns a :class:`Reconstruction` (``inverted`` is x at
    the noisiest step); its ``latent_error`` is float64 rounding, whatever the guidance.
    NFE = 4 x steps (x2 with guidance).
    """
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    cond = encode_prompt(pipe, prompt)
    uncond = encode_prompt(pipe, "") if guidance_scale != 1.0 else None
    latents = encode_image(pipe, image)
    inverted = edict_invert(pipe.unet, latents, scheduler, cond, uncond, guidance_scale,
                            mix_weight=mix_weight)
    restored, _ = edict_denoise(pipe.unet, inverted, scheduler, cond, uncond, guidance_scale,
                                mix_weight=mix_weight)
    return Reconstruction(decode_latents(pipe, restored), latents.double(), inverted[0], restored)


def _check(*, num_inference_steps: int, mix_weight: float, init_image_strength: float,
           **_: Any) -> None:
    _check_mix_weight(mix_weight)
    if not 0.0 < init_image_strength <= 1.0:
        raise ValueError(f"edict: init_image_strength must be in (0, 1], got {init_image_strength}")
    if int(num_inference_steps * init_image_strength) < 1:
        raise ValueError(
            f"edict: init_image_strength {init_image_strength} x num_inference_steps "
            f"{num_inference_steps} leaves no step to invert; raise either"
        )


@register_method(CARD, check=_check)
def edict(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_inference_steps: int,
          guidance_scale: float, mix_weight: float, init_image_strength: float) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (see the module)."""
    num_steps = int(num_inference_steps * init_image_strength)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    uncond = encode_prompt(pipe, "") if guidance_scale != 1.0 else None
    key = inversion_key(kind="edict", image=inputs.image, prompt=inputs.source_prompt, pipe=pipe,
                        scheduler=scheduler, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        options={"mix_weight": mix_weight, "inverted_steps": num_steps})

    def invert() -> dict[str, torch.Tensor]:
        x, y = edict_invert(pipe.unet, encode_image(pipe, inputs.image), scheduler,
                            encode_prompt(pipe, inputs.source_prompt), uncond, guidance_scale,
                            mix_weight=mix_weight, num_steps=num_steps)
        return {"x": x, "y": y}

    inverted, cached = cached_inversion(inputs.inversion_cache, key, invert)
    pair = (inverted["x"].to(pipe.device), inverted["y"].to(pipe.device))
    x, _ = edict_denoise(pipe.unet, pair, scheduler, encode_prompt(pipe, inputs.target_prompt),
                         uncond, guidance_scale, mix_weight=mix_weight, num_steps=num_steps)
    return MethodOutput(decode_latents(pipe, x), {"inversion_cached": cached})
