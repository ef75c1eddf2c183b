"""Inverting a real image for editing under classifier-free guidance, five ways.

Editing a real image with Prompt-to-Prompt starts from the image's inverted noise. DDIM inversion at
guidance 1 under the source prompt is nearly exact, but sampling back at the editing guidance
(7.5) drifts away from the image; each method below closes that gap its own way. All of them start
from the same DDIM trajectory, cached through :mod:`editeval.diffusion.inversion_cache` (kind
``ddim``), so several methods of a run invert an image once.

- ``ddim``: plain DDIM inversion (Song et al., ICLR 2021, arXiv:2010.02502), sampled with the empty
  prompt as the unconditional embedding. NFE = steps.
- ``null-text``: null-text inversion (Mokady et al., "NULL-text Inversion for Editing Real Images
  using Guided Diffusion Models", CVPR 2023, arXiv:2211.09794). The DDIM trajectory at guidance 1
  is the pivot; for each timestep the unconditional ("null-text") embedding is optimised so that one
  guided DDIM step from the current latent lands on the pivot's next latent: Adam, ``inner_steps``
  = N = 10 iterations per timestep, early stopping when the loss falls below the threshold, fp32
  always. As in the official code, the learning rate decays as 1e-2 (1 - i / 100) over the 50 steps
  (here 1e-2 (1 - i / (2 steps)), the same at 50) and the threshold of step i is the official
  eps + 2e-5 i, with the paper's eps = 1e-5 (deviation: eps = 0 turns early stopping off, where
  the official code would still stop below 2e-5 i); each step starts from the previous step's
  embedding (the first from the empty prompt's); after optimising, the latent advances with the
  guided step. Cached (kind ``null-text``, options in the key). NFE = steps (pivot) + sum over
  steps of (3 + the iterations run): one conditional pass, one per iteration, two for the guided
  step.
- ``negative-prompt``: negative-prompt inversion (Miyake et al., "Negative-prompt Inversion: Fast
  Image Inversion for Editing with Text-guided Diffusion Models", arXiv:2305.16807, 2023): the
  source prompt's embedding replaces the null-text embedding, the closed-form approximation of
  null-text inversion's optimum; no optimisation. NFE = steps.
- ``proxedit``: ProxEdit (Han et al., "ProxEdit: Improving Tuning-Free Real Image Editing with
  Proximal Guidance", WACV 2024, arXiv:2306.05414): negative-prompt inversion plus proximal
  guidance, eps_u + w prox(eps_c - eps_u), with prox the soft-thresholding operator at the
  ``quantile`` (0.7) of |eps_c - eps_u| over the batch; and inversion guidance: from timestep
  ``recon_t`` (400) down, where the thresholded guidance is small (|.| <= threshold, the edit mask
  dilated by ``dilate_mask`` = 1 latent pixel), the latents are pulled to the DDIM trajectory with
  step ``recon_lr`` (1 = replaced). Defaults from the official code (``prox="l0"``, whose update
  d - clip(d, -tau, tau) is this soft threshold). NFE = steps.
- ``direct``: Direct Inversion (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3
  Lines of Code", ICLR 2024, arXiv:2310.01506): after every step the difference between the DDIM
  trajectory's latent and the source branch's is added back to the source branch, which so stays on
  the trajectory (its reconstruction is exact); the target branch runs free. The official code
  computes these differences in a separate guided pass over the trajectory; computing them during
  the editing pass gives the same numbers (the source branch's inputs are the same: Prompt-to-Prompt
  never changes the source branch) without the extra 4 x steps NFE (that pass runs the source and
  the target prompt under guidance, a UNet batch of 4). NFE = steps.

Sampling under an inversion goes through :func:`editeval.diffusion.dual_branch.sample_branches`
with the :class:`~editeval.diffusion.dual_branch.BranchGuidance` of :class:`SourceInversion`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from editeval.diffusion.ddim import (
    ddim_invert,
    ddim_scheduler,
    ddim_step,
    model_noise,
    noise_levels,
)
from editeval.diffusion.dual_branch import BranchGuidance, sample_branches
from editeval.diffusion.inversion_cache import cached_inversion, inversion_key
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

INVERSIONS = ("ddim", "null-text", "negative-prompt", "proxedit", "direct")

NULL_TEXT_INNER_STEPS = 10
NULL_TEXT_EPSILON = 1e-5
NULL_TEXT_LR = 1e-2
PROX_QUANTILE, PROX_RECON_LR, PROX_RECON_T, PROX_DILATE = 0.7, 1.0, 400, 1


class NullTextGuidance(BranchGuidance):
    """Classifier-free guidance with one optimised null-text embedding per step.

    Args:
        embeddings: per sampling step (0 = noisiest), (1, 77, D) unconditional embeddings.
    """

    def __init__(self, embeddings: list[torch.Tensor], guidance_scale: float) -> None:
        super().__init__(embeddings[0], guidance_scale)
        self.embeddings = embeddings

    def uncond(self, step: int) -> torch.Tensor:
        return self.embeddings[step]


class ProximalGuidance(BranchGuidance):
    """ProxEdit: proximal guidance on negative-prompt inversion, plus inversion guidance.

    Args:
        uncond: the source prompt's embeddings (negative-prompt inversion).
        trajectory: the DDIM trajectory ``[z_0, ..., z_T]`` the inversion guidance pulls towards.
        quantile: the soft threshold is this quantile of |eps_c - eps_u| (in (0, 1)).
        recon_lr: inversion-guidance step (0 = off, 1 = replace the kept region by the trajectory).
        recon_t: inversion guidance runs at timesteps below this (0..1000).
        dilate_mask: the edit mask's dilation radius in latent pixels.
    """

    def __init__(self, uncond: torch.Tensor, guidance_scale: float, trajectory: list[torch.Tensor],
                 quantile: float = PROX_QUANTILE, recon_lr: float = PROX_RECON_LR,
                 recon_t: int = PROX_RECON_T, dilate_mask: int = PROX_DILATE) -> None:
        super().__init__(uncond, guidance_scale)
        self.trajectory = trajectory
        self.quantile, self.recon_lr, self.recon_t, self.dilate_mask = \
            quantile, recon_lr, recon_t, dilate_mask
        self._keep: torch.Tensor | None = None

    def combine(self, step: int, timestep: torch.Tensor, noise_uncond: torch.Tensor,
                noise_cond: torch.Tensor) -> torch.Tensor:
        delta = noise_cond - noise_uncond
        threshold = delta.abs().float().flatten().quantile(self.quantile).to(delta.dtype)
        delta = delta - delta.clamp(-threshold, threshold)  # soft threshold: prox of tau |.|_1
        self._keep = None
        if self.recon_lr > 0 and int(timestep) < self.recon_t:
            edited = (delta.abs() > threshold).to(delta.dtype)
            if self.dilate_mask > 0:
                size = 2 * self.dilate_mask + 1
                edited = F.max_pool2d(edited, size, stride=1, padding=self.dilate_mask)
            self._keep = 1 - edited
        return noise_uncond + self.guidance_scale * delta

    def correct(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self._keep is None:
            return latents
        reference = self.trajectory[-(step + 2)].to(latents)
        return latents - self.recon_lr * (latents - reference) * self._keep


class DirectInversionGuidance(BranchGuidance):
    """Direct Inversion: the source branch (batch entry 0) is put back on the DDIM trajectory."""

    def __init__(self, uncond: torch.Tensor, guidance_scale: float,
                 trajectory: list[torch.Tensor]) -> None:
        super().__init__(uncond, guidance_scale)
        self.trajectory = trajectory

    def correct(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        reference = self.trajectory[-(step + 2)].to(latents)
        # z_src + (z* - z_src), written as z* itself: exact in floating point
        return torch.cat([reference, latents[1:]])


@dataclass
class SourceInversion:
    """A source image inverted for editing.

    Attributes:
        kind: one of :data:`INVERSIONS`.
        scheduler: the DDIM scheduler it was inverted with (sample with the same one).
        trajectory: ``[z_0, ..., z_T]``, (1, 4, h, w) DDIM-inversion latents, clean to noisy.
        source_embeddings: (1, 77, D) embeddings of the source prompt.
        guidance: how sampling uses the inversion (pass to ``sample_branches``).
        cached: every part came from the inversion cache (no UNet evaluation was spent).
        optimisation_steps: null-text optimisation iterations run (0 for the other kinds).
    """

    kind: str
    scheduler: Any
    trajectory: list[torch.Tensor]
    source_embeddings: torch.Tensor
    guidance: BranchGuidance
    cached: bool
    optimisation_steps: int = 0


def ddim_trajectory(pipe: Any, image: Image.Image, prompt: str, num_inference_steps: int,
                    cache: Any = None) -> tuple[list[torch.Tensor], bool]:
    """DDIM inversion of ``image`` at guidance 1 under ``prompt``, through the inversion cache.

    Returns the trajectory ``[z_0, ..., z_T]`` ((1, 4, h, w) each, on the UNet's device and dtype)
    and whether it came from the cache. NFE = ``num_inference_steps`` on a miss, 0 on a hit.
    """
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    key = inversion_key(kind="ddim", image=image, prompt=prompt, pipe=pipe, scheduler=scheduler,
                        num_inference_steps=num_inference_steps, guidance_scale=1.0)

    def compute() -> dict:
        latents = encode_image(pipe, image).to(pipe.unet.dtype)
        return {"trajectory": ddim_invert(pipe.unet, latents, scheduler,
                                          encode_prompt(pipe, prompt))}

    value, hit = cached_inversion(cache, key, compute)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    return [z.to(device, dtype) for z in value["trajectory"]], hit


@contextmanager
def _fp32_frozen(unet: Any) -> Iterator[None]:
    """The UNet in float32 with frozen parameters inside the block; dtype and flags restored.

    Casting half precision to float32 and back is exact, so the shared pipeline is unchanged.
    """
    dtype = unet.dtype
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    cast = torch.nn.Module.to  # a plain cast; diffusers' ``to`` warns on every dtype change
    if dtype != torch.float32:
        cast(unet, torch.float32)
    try:
        yield
    finally:
        if dtype != torch.float32:
            cast(unet, dtype)
        for parameter, flag in zip(unet.parameters(), flags):
            parameter.requires_grad_(flag)


def null_text_threshold(early_stop_epsilon: float, step: int) -> float:
    """The loss below which null-text optimisation stops at sampling step ``step`` (0 = noisiest):
    the official ``eps + 2e-5 step``, or 0 (never stop early) when ``early_stop_epsilon`` is 0."""
    return early_stop_epsilon + 2e-5 * step if early_stop_epsilon > 0 else 0.0


def optimise_null_text(unet: Any, trajectory: list[torch.Tensor], scheduler: Any,
                       cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                       inner_steps: int = NULL_TEXT_INNER_STEPS,
                       early_stop_epsilon: float = NULL_TEXT_EPSILON
                       ) -> tuple[list[torch.Tensor], list[int]]:
    """Null-text optimisation (see the module docstring) along a DDIM pivot trajectory.

    Args:
        trajectory: ``[z_0, ..., z_T]`` from DDIM inversion at guidance 1 under the source prompt.
        cond: (1, 77, D) source prompt embeddings.
        uncond: (1, 77, D) the empty prompt's embeddings, where the optimisation starts.
        inner_steps: N, Adam iterations per timestep at most (>= 1).
        early_stop_epsilon: stop a timestep's iterations once the loss (the mean squared latent
            error) is below :func:`null_text_threshold` (``early_stop_epsilon + 2e-5 i`` at
            step i); 0 runs all N.

    Returns:
        per sampling step, the optimised float32 (1, 77, D) embeddings, and the iterations run.
        Runs in float32 whatever the UNet's dtype (restored after).
    """
    timesteps, alphas = noise_levels(scheduler)
    steps = len(timesteps)
    latent = trajectory[-1].float()
    cond, current = cond.float(), uncond.float()
    embeddings: list[torch.Tensor] = []
    iterations: list[int] = []
    with _fp32_frozen(unet), torch.enable_grad():
        for i, t in enumerate(scheduler.timesteps):
            level = steps - i
            alpha_t, alpha_prev = alphas[level], alphas[level - 1]
            target = trajectory[level - 1].float()
            with torch.no_grad():
                noise_cond = model_noise(unet, scheduler, latent, t, cond)
            current = current.detach().clone().requires_grad_(True)
            optimiser = torch.optim.Adam([current], lr=NULL_TEXT_LR * (1 - i / (2 * steps)))
            threshold = null_text_threshold(early_stop_epsilon, i)
            done = 0
            for _ in range(inner_steps):
                noise_uncond = model_noise(unet, scheduler, latent, t, current)
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                loss = F.mse_loss(ddim_step(latent, noise, alpha_t, alpha_prev), target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                done += 1
                if loss.item() < threshold:
                    break
            current = current.detach()
            embeddings.append(current.clone())
            iterations.append(done)
            with torch.no_grad():
                noise = model_noise(unet, scheduler, torch.cat([latent] * 2), t,
                                    torch.cat([current, cond]))
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latent = ddim_step(latent, noise, alpha_t, alpha_prev)
    return embeddings, iterations


def invert_source(pipe: Any, image: Image.Image, prompt: str, kind: str, *,
                  num_inference_steps: int = 50, guidance_scale: float = 7.5, cache: Any = None,
                  null_text_inner_steps: int = NULL_TEXT_INNER_STEPS,
                  early_stop_epsilon: float = NULL_TEXT_EPSILON,
                  proximal_quantile: float = PROX_QUANTILE, recon_lr: float = PROX_RECON_LR,
                  recon_t: int = PROX_RECON_T, dilate_mask: int = PROX_DILATE) -> SourceInversion:
    """Invert ``image`` (RGB at the model's resolution) under the source ``prompt`` for editing.

    ``kind`` is one of :data:`INVERSIONS`; ``guidance_scale`` is the editing guidance the
    inversion prepares for (null-text optimises for it, the others use it when sampling). The
    keyword options belong to the kind named in the module docstring and are ignored by the others.

    Raises:
        ValueError: an unknown ``kind`` or an option out of range (the message names it).
    """
    if kind not in INVERSIONS:
        raise ValueError(f"unknown inversion {kind!r}; expected one of {', '.join(INVERSIONS)}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if kind == "null-text" and (null_text_inner_steps < 1 or early_stop_epsilon < 0):
        raise ValueError("null-text inversion needs null_text_inner_steps >= 1 and "
                         f"early_stop_epsilon >= 0, got {null_text_inner_steps} and "
                         f"{early_stop_epsilon}")
    if kind == "proxedit" and not (0 < proximal_quantile < 1 and recon_lr >= 0
                                   and dilate_mask >= 0):
        raise ValueError("proxedit needs 0 < proximal_quantile < 1, recon_lr >= 0 and "
                         f"dilate_mask >= 0, got {proximal_quantile}, {recon_lr}, {dilate_mask}")
    trajectory, cached = ddim_trajectory(pipe, image, prompt, num_inference_steps, cache)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    cond = encode_prompt(pipe, prompt)
    empty = encode_prompt(pipe, "")
    optimisation_steps = 0
    if kind == "null-text":
        options = {"inner_steps": null_text_inner_steps, "early_stop_epsilon": early_stop_epsilon,
                   "lr": NULL_TEXT_LR, "schedule": "lr (1 - i / (2 steps)), eps + 2e-5 i"}
        key = inversion_key(kind="null-text", image=image, prompt=prompt, pipe=pipe,
                            scheduler=scheduler, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, options=options)

        def compute() -> dict:
            embeddings, iterations = optimise_null_text(
                pipe.unet, trajectory, scheduler, cond, empty, guidance_scale,
                null_text_inner_steps, early_stop_epsilon)
            return {"uncond_embeddings": embeddings, "iterations": iterations}

        value, hit = cached_inversion(cache, key, compute)
        cached = cached and hit
        optimisation_steps = int(sum(value["iterations"]))
        embeddings = [e.to(cond.device, cond.dtype) for e in value["uncond_embeddings"]]
        guidance: BranchGuidance = NullTextGuidance(embeddings, guidance_scale)
    elif kind == "negative-prompt":
        guidance = BranchGuidance(cond, guidance_scale)
    elif kind == "proxedit":
        guidance = ProximalGuidance(cond, guidance_scale, trajectory, proximal_quantile, recon_lr,
                                    recon_t, dilate_mask)
    elif kind == "direct":
        guidance = DirectInversionGuidance(empty, guidance_scale, trajectory)
    else:
        guidance = BranchGuidance(empty, guidance_scale)
    return SourceInversion(kind, scheduler, trajectory, cond, guidance, cached, optimisation_steps)


@torch.no_grad()
def reconstruct_source(pipe: Any, inversion: SourceInversion) -> Image.Image:
    """The source image sampled back from ``inversion`` at its guidance (the source branch alone).

    NFE = 2 x steps. Returns an RGB image at the model's resolution.
    """
    latents = sample_branches(pipe.unet, inversion.trajectory[-1], inversion.scheduler,
                              inversion.source_embeddings, inversion.guidance)
    return decode_latents(pipe, latents)
