"""Pix2Pix-Zero's regularised DDIM inversion: every noise prediction pushed towards white noise.

Parmar et al., "Zero-shot Image-to-Image Translation", SIGGRAPH 2023, arXiv:2302.03027, section 3.1
(official code: pix2pixzero/pix2pix-zero, ``src/utils/ddim_inv.py``). DDIM inversion
(:mod:`editeval.diffusion.ddim`) leaves inverted noise that is far from an i.i.d. Gaussian, which
makes it hard to edit. Before each inversion step the noise prediction ``eps`` is moved by
``num_reg_steps`` rounds of gradient steps on two losses:

- pairwise (auto-correlation): ``L_pair = sum_levels sum_channels [mean(n * roll(n, d, H))^2 +
  mean(n * roll(n, d, W))^2]`` over a pyramid of the channel (``n`` average-pooled by 2 until its
  height is at most 8), with a random shift ``d`` in [1, H/2) at every level; ``num_ac_rolls``
  draws per round, each a step ``eps -= lambda_ac * grad / num_ac_rolls``;
- KL divergence to N(0, 1): ``L_kl = var + mean^2 - 1 - log(var + 1e-7)`` over all elements, one
  step ``eps -= lambda_kl * grad`` per round.

Defaults of the official code: ``lambda_ac`` = ``lambda_kl`` = 20, 5 rounds of 5 rolls, guidance 1.
The shifts are drawn from the edit's generator (the official code draws them from Python's
unseeded ``random``), so an inversion is reproducible and cached by the generator's state.
Energy-Based Cross Attention inverts real images the same way (its code copies this inversion).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from editeval.diffusion.ddim import (
    ddim_scheduler,
    ddim_step,
    noise_levels,
    predict_noise,
)
from editeval.diffusion.inversion_cache import (
    cached_inversion,
    generator_digest,
    inversion_key,
)
from editeval.diffusion.latents import encode_image, encode_prompt

LAMBDA_AC, LAMBDA_KL, NUM_REG_STEPS, NUM_AC_ROLLS = 20.0, 20.0, 5, 5


def check_regularisation(method: str, *, lambda_ac: float, lambda_kl: float, num_reg_steps: int,
                         num_ac_rolls: int) -> None:
    """Refuse regularisation settings out of range, naming ``method`` (a method's parameter check).

    Raises:
        ValueError: a negative lambda or ``num_reg_steps``, or ``num_ac_rolls`` below 1.
    """
    for name, value in (("lambda_ac", lambda_ac), ("lambda_kl", lambda_kl)):
        if value < 0:
            raise ValueError(f"{method}: {name} must be >= 0, got {value}")
    if num_reg_steps < 0 or num_ac_rolls < 1:
        raise ValueError(f"{method}: num_reg_steps must be >= 0 and num_ac_rolls >= 1, got "
                         f"{num_reg_steps} and {num_ac_rolls}")


def auto_correlation_loss(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pix2Pix-Zero's pairwise loss of (1, C, H, W) ``noise`` (a 0-dim tensor, differentiable).

    Random shifts in [1, max(2, H // 2)) are drawn from ``generator``, one per channel and level.
    """
    loss = noise.new_zeros(())
    for channel in range(noise.shape[1]):
        level = noise[:, channel:channel + 1]
        while True:
            shift = int(torch.randint(1, max(2, level.shape[2] // 2), (1,), generator=generator))
            loss = loss + (level * torch.roll(level, shifts=shift, dims=2)).mean() ** 2
            loss = loss + (level * torch.roll(level, shifts=shift, dims=3)).mean() ** 2
            if level.shape[2] <= 8:
                break
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def kl_divergence(noise: torch.Tensor) -> torch.Tensor:
    """``var + mean^2 - 1 - log(var + 1e-7)`` over all elements of ``noise`` (0-dim tensor): twice
    the KL divergence of N(mean, var) from N(0, 1)."""
    mean, var = noise.mean(), noise.var()
    return var + mean ** 2 - 1 - torch.log(var + 1e-7)


def regularise_noise(noise: torch.Tensor, generator: torch.Generator, *,
                     lambda_ac: float = LAMBDA_AC, lambda_kl: float = LAMBDA_KL,
                     num_reg_steps: int = NUM_REG_STEPS,
                     num_ac_rolls: int = NUM_AC_ROLLS) -> torch.Tensor:
    """``noise`` (1, C, H, W) after ``num_reg_steps`` rounds of the pairwise and KL steps (see the
    module docstring), computed in float32; a loss whose lambda is 0 is skipped. Same shape and
    dtype, detached."""
    dtype, noise = noise.dtype, noise.detach().float()
    with torch.enable_grad():
        for _ in range(num_reg_steps):
            if lambda_ac > 0:
                for _ in range(num_ac_rolls):
                    var = noise.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(auto_correlation_loss(var, generator), var)
                    noise = noise - lambda_ac * grad / num_ac_rolls
            if lambda_kl > 0:
                var = noise.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_divergence(var), var)
                noise = noise - lambda_kl * grad
    return noise.detach().to(dtype)


@torch.no_grad()
def regularised_ddim_invert(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                            generator: torch.Generator, **regularisation: Any) -> torch.Tensor:
    """Regularised DDIM inversion (guidance 1) of clean ``latents`` (1, 4, h, w) under the text
    embeddings ``cond`` (1, 77, D); ``regularisation``: the keywords of :func:`regularise_noise`.

    Returns the inverted noise at the noisiest timestep (same shape and dtype). NFE = steps.
    """
    timesteps, alphas = noise_levels(scheduler)
    for i, t in enumerate(timesteps):
        noise = regularise_noise(predict_noise(unet, scheduler, latents, t, cond), generator,
                                 **regularisation)
        latents = ddim_step(latents, noise, alphas[i], alphas[i + 1])
    return latents


def regularised_inversion(pipe: Any, image: Image.Image, prompt: str, num_inference_steps: int,
                          generator: torch.Generator, cache: Any = None, *, lambda_ac: float,
                          lambda_kl: float, num_reg_steps: int,
                          num_ac_rolls: int) -> tuple[torch.Tensor, bool]:
    """:func:`regularised_ddim_invert` of ``image`` (RGB at the model's resolution) under
    ``prompt``, through the inversion cache (kind ``ddim-regularised``, keyed by the options and
    the generator's state).

    Returns the inverted noise ((1, 4, h, w), the UNet's device and dtype) and whether it came from
    the cache. NFE = ``num_inference_steps`` on a miss, 0 on a hit.

    Raises:
        ValueError: the regularisation diverged (non-finite noise). Its gradient steps scale with
            the square of the noise's variance over the number of latent pixels, so on small
            latents a noise prediction far from unit variance can overshoot; lower ``lambda_ac``
            and ``lambda_kl``.
    """
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    options = {"lambda_ac": lambda_ac, "lambda_kl": lambda_kl, "num_reg_steps": num_reg_steps,
               "num_ac_rolls": num_ac_rolls, "seed": generator.initial_seed(),
               "generator_state": generator_digest(generator)}
    key = inversion_key(kind="ddim-regularised", image=image, prompt=prompt, pipe=pipe,
                        scheduler=scheduler, num_inference_steps=num_inference_steps,
                        guidance_scale=1.0, options=options)

    def compute() -> dict[str, torch.Tensor]:
        latents = encode_image(pipe, image).to(pipe.unet.dtype)
        noise = regularised_ddim_invert(
            pipe.unet, latents, scheduler, encode_prompt(pipe, prompt), generator,
            lambda_ac=lambda_ac, lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
            num_ac_rolls=num_ac_rolls)
        if not torch.isfinite(noise).all():
            raise ValueError(f"the regularised DDIM inversion diverged (lambda_ac={lambda_ac}, "
                             f"lambda_kl={lambda_kl}: non-finite noise); lower lambda_ac and "
                             "lambda_kl")
        return {"noise": noise}

    value, hit = cached_inversion(cache, key, compute)
    return value["noise"].to(pipe.unet.device, pipe.unet.dtype), hit
