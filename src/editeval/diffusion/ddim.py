"""DDIM sampling and inversion, written from the paper's update rule.

Denoising Diffusion Implicit Models (Song, Meng and Ermon, ICLR 2021, arXiv:2010.02502). With
alpha-bar (cumulative product of the noise schedule) ``a_t``, the deterministic (eta = 0) update from
``x_t`` to the level ``a_s`` is::

    x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_s = sqrt(a_s) * x0 + sqrt(1 - a_s) * eps

It runs towards lower noise when sampling and towards higher noise when inverting; the inversion
evaluates the UNet at the current latent and the next (noisier) timestep, the usual approximation
eps(x_t) ~ eps(x_{t-1}) whose error falls as the number of steps rises. We do not use diffusers'
``DDIMInverseScheduler``, whose previous-timestep computation is wrong (diffusers issue #10695).

Timesteps follow the pipeline's own scheduler configuration (``steps_offset``, ``timestep_spacing``),
read through ``DDIMScheduler.set_timesteps``, and the level below the first timestep is the
scheduler's ``final_alpha_cumprod``, so sampling exactly mirrors inversion.

The denoiser's output is turned into the noise ``eps`` by :func:`predicted_noise`, following the
scheduler's ``prediction_type``: ``epsilon`` (SD 1.x, SD 2.x base), ``v_prediction`` (SD 2.x at
768 px: ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``) or ``sample`` (x0). Every sampler and inversion
of editeval goes through it, at the alpha-bar of the timestep the denoiser was called with.

Schedule quantities (``sqrt(a)``, ``sqrt(1 - a)``) are computed in float32 (float64 for float64
latents) and only then cast to the latents' dtype: in float16, ``1 - a`` near ``a = 1`` loses
most of its digits (``sqrt(1 - a)`` is 7 % off at SD's clean level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt


def ddim_scheduler(pipe: Any, num_inference_steps: int | None = None):
    """A ``DDIMScheduler`` with the pipeline's noise schedule and timestep spacing.

    ``clip_sample`` is off (SD checkpoints that ship PNDM do not say, and DDIM's default of
    clipping x0 to [-1, 1] is wrong for latents). Set to ``num_inference_steps`` when given.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def noise_level_terms(alpha: torch.Tensor | float,
                      like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(a), sqrt(1 - a))`` of the alpha-bar ``alpha`` (in (0, 1]), for tensors like ``like``.

    Computed in float32 (float64 when ``alpha`` or ``like`` is float64), then cast to ``like``'s
    dtype and device: 0-dim tensors.
    """
    alpha = torch.as_tensor(alpha)
    precise = torch.float64 if torch.float64 in (alpha.dtype, like.dtype) else torch.float32
    alpha = alpha.to(device=like.device, dtype=precise)
    return alpha.sqrt().to(like.dtype), (1 - alpha).sqrt().to(like.dtype)


def predicted_noise(output: torch.Tensor, latents: torch.Tensor, alpha: torch.Tensor | float,
                    prediction_type: str) -> torch.Tensor:
    """The noise ``eps`` a denoiser's ``output`` stands for, whatever it was trained to predict.

    Args:
        output: the denoiser's output at ``latents`` (same shape and dtype).
        latents: the noisy latents it was evaluated at.
        alpha: the alpha-bar of the timestep it was called with.
        prediction_type: the scheduler's ``prediction_type``: ``epsilon`` (returned as is),
            ``v_prediction`` (``eps = sqrt(a) v + sqrt(1 - a) x``) or ``sample`` (the clean
            latents x0: ``eps = (x - sqrt(a) x0) / sqrt(1 - a)``).

    Raises:
        ValueError: another ``prediction_type`` (the message names it).
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the model's scheduler has prediction_type={prediction_type!r}; editeval "
                         f"supports {', '.join(PREDICTION_TYPES)}")
    sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha, output)
    if prediction_type == "v_prediction":
        return sqrt_alpha * output + sqrt_one_minus * latents
    return (latents - sqrt_alpha * output) / sqrt_one_minus


def model_noise(unet: Any, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor | int,
                text: torch.Tensor) -> torch.Tensor:
    """The denoiser's noise prediction ``eps`` at ``latents`` (batch, 4, h, w) and ``timestep``
    under the text embeddings ``text`` (batch, 77, D): one UNet call (batch NFE), converted by
    :func:`predicted_noise` with ``scheduler``'s ``prediction_type`` and ``alphas_cumprod``."""
    output = unet(latents, timestep, encoder_hidden_states=text).sample
    return predicted_noise(output, latents, scheduler.alphas_cumprod[int(timestep)],
                           scheduler.config.prediction_type)


def ddim_step(latents: torch.Tensor, noise_pred: torch.Tensor, alpha_t: torch.Tensor,
              alpha_next: torch.Tensor) -> torch.Tensor:
    """Move ``latents`` from noise level ``alpha_t`` to ``alpha_next`` (alpha-bars in (0, 1]).

    Pass the alpha-bars in float32 (or float64): the step's coefficients are computed in that
    precision and cast to the latents' dtype (:func:`noise_level_terms`).
    """
    sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha_t, latents)
    sqrt_alpha_next, sqrt_one_minus_next = noise_level_terms(alpha_next, latents)
    x0 = (latents - sqrt_one_minus * noise_pred) / sqrt_alpha
    return sqrt_alpha_next * x0 + sqrt_one_minus_next * noise_pred


def predict_noise(unet: Any, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor,
                  cond: torch.Tensor, uncond: torch.Tensor | None = None,
                  guidance_scale: float = 1.0) -> torch.Tensor:
    """The noise prediction (:func:`model_noise`), with classifier-free guidance when
    ``guidance_scale != 1``.

    ``cond``/``uncond`` are text embeddings (1, 77, D); with guidance the UNet sees a batch of 2
    (2 NFE), without it a batch of 1.
    """
    if uncond is None or guidance_scale == 1.0:
        return model_noise(unet, scheduler, latents, timestep, cond)
    noise = model_noise(unet, scheduler, torch.cat([latents] * 2), timestep,
                        torch.cat([uncond, cond]))
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def noise_levels(scheduler: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Timesteps from least to most noisy and the alpha-bar before each (the clean level first).

    The alpha-bars are the scheduler's (float32 0-dim tensors on the CPU).
    """
    timesteps = scheduler.timesteps.flip(0)
    alphas = [torch.as_tensor(scheduler.final_alpha_cumprod)]
    alphas += [scheduler.alphas_cumprod[t] for t in timesteps]
    return timesteps, alphas


@torch.no_grad()
def ddim_invert(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                num_steps: int | None = None) -> list[torch.Tensor]:
    """DDIM inversion: the trajectory from clean ``latents`` to noise.

    Returns ``[z_0, z_1, ..., z_T]`` (T = number of scheduler steps + 1 entries), ``z_T`` being the
    inverted noise at the most noisy timestep; with ``num_steps``, only the first ``num_steps``
    steps (a partial inversion, to an intermediate time: ``[z_0, ..., z_num_steps]``).
    NFE = steps run (x2 with guidance).
    """
    timesteps, alphas = noise_levels(scheduler)
    trajectory = [latents]
    for i, t in enumerate(timesteps[:num_steps]):
        noise = predict_noise(unet, scheduler, trajectory[-1], t, cond, uncond, guidance_scale)
        trajectory.append(ddim_step(trajectory[-1], noise, alphas[i], alphas[i + 1]))
    return trajectory


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]
NoisePredictor = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(i, t, latents) -> eps``: a sampler's noise estimate at its step ``i`` (0 = the first
step it samples) and timestep ``t``, in place of classifier-free guidance (SEGA's semantic guidance,
:mod:`editeval.diffusion.semantic_guidance`)."""


@torch.no_grad()
def ddim_sample(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor | None = None,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                callback: StepCallback | None = None, *,
                predict: NoisePredictor | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling from ``latents`` at the most noisy timestep to clean latents.

    ``callback(i, t, latents)`` runs after step ``i`` and may return replacement latents (methods
    use it to blend or inject). ``predict``, when given, is the noise estimate instead of the
    guidance of ``cond``/``uncond`` (then not needed). NFE = steps (x2 with guidance; with
    ``predict``, its own).
    """
    timesteps, alphas = noise_levels(scheduler)
    for i, t in enumerate(scheduler.timesteps):
        level = len(timesteps) - i
        noise = predict(i, t, latents) if predict is not None else \
            predict_noise(unet, scheduler, latents, t, cond, uncond, guidance_scale)
        latents = ddim_step(latents, noise, alphas[level], alphas[level - 1])
        replaced = callback(i, t, latents) if callback is not None else None
        if replaced is not None:
            latents = replaced
    return latents


@dataclass
class Reconstruction:
    """DDIM inversion followed by sampling: the images and the latents at both ends."""

    image: Image.Image
    latents: torch.Tensor
    inverted: torch.Tensor
    reconstructed: torch.Tensor

    @property
    def latent_error(self) -> float:
        """Relative L2 error ||z0' - z0|| / ||z0|| of the reconstructed clean latents."""
        return float((self.reconstructed - self.latents).norm() / self.latents.norm())


def reconstruct(pipe: Any, image: Image.Image, prompt: str = "", num_inference_steps: int = 50,
                guidance_scale: float = 1.0) -> Reconstruction:
    """Invert ``image`` with DDIM under ``prompt``, then sample back; NFE = 2 x steps (x2 with CFG).

    ``image``: RGB, sides multiples of 8. ``guidance_scale`` 1 is the exact-as-possible setting;
    larger values show why null-text inversion exists.
    """
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    cond = encode_prompt(pipe, prompt)
    uncond = encode_prompt(pipe, "") if guidance_scale != 1.0 else None
    latents = encode_image(pipe, image)
    inverted = ddim_invert(pipe.unet, latents, scheduler, cond, uncond, guidance_scale)[-1]
    restored = ddim_sample(pipe.unet, inverted, scheduler, cond, uncond, guidance_scale)
    return Reconstruction(decode_latents(pipe, restored), latents, inverted, restored)
