"""Blended Diffusion: CLIP-guided denoising inside the mask, the noised source blended outside it.

Paper: "Blended Diffusion for Text-driven Editing of Natural Images", Avrahami, Lischinski and
Fried, CVPR 2022, arXiv:2111.14818. Official code: github.com/omriav/blended-diffusion
(``optimization/image_editor.py`` and ``arguments.py`` give the defaults below).

Algorithm (the paper's Algorithm 2 as the official code runs it; z: latents, m: the edit mask,
1 = edit; the shared known region of :mod:`editeval.diffusion.masked_blending`):

1. Skip the first ``skip_timesteps`` of the ``num_inference_steps`` timesteps (official: 25 of
   100) and start from the source's latents noised to the first one kept.
2. Every step t (DDPM's ancestral sampler, eta 1): one denoiser call at z_t gives eps and the
   clean estimate ``z0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, decoded to ``x0`` (pixels in
   [-1, 1]); the loss::

       L = clip_guidance_lambda * mean_k d(E_I(aug_k(x0 * m)), E_T(target_prompt))
           + range_lambda * mean((x0 - clamp(x0, -1, 1))^2)
           [+ lpips_sim_lambda * LPIPS(x0 (1 - m), x_src (1 - m))
            + l2_sim_lambda * MSE(x0 (1 - m), x_src (1 - m))]   with background_preservation_loss

   with ``d`` the spherical distance ``2 arcsin(|u - v| / 2)^2`` of the unit embeddings and
   ``aug_k`` the official augmentations: the image average-pooled to CLIP's size, once as it is
   and ``aug_num - 1`` times through a random affine (15 degrees, 10 % shift) and a random
   perspective (0.7), each applied with probability 0.7. The gradient reaches z_t through the
   decoder and the denoiser; the step's mean moves against it by the step's variance
   (``mean - sigma_t^2 grad L``, guided-diffusion's ``condition_mean``), then
   ``z_{t-1} = mean + sigma_t noise`` (no noise at the last step).
3. Blend: outside the mask z_{t-1} is replaced by the source noised to the level the step
   reached (the clean source after the last step).
4. Decode; ``enforce_background`` (official default) pastes the source's pixels outside the mask.

Deviations, for latent text-to-image models (the paper guides a pixel-space unconditional
ImageNet model):

- The denoiser runs unconditionally (the empty prompt, ``guidance_scale`` 0), as the paper's
  model: CLIP is the only text signal. ``guidance_scale`` 1 conditions it on the target prompt,
  above 1 adds classifier-free guidance (twice the NFE).
- The CLIP, range and background losses read the VAE-decoded estimate x0 (the paper's x0); the
  official code feeds CLIP ``fac x0 + (1 - fac) x_t`` with ``fac = sqrt(1 - a_t)``.
- Blending at latent size with the nearest-neighbour latent mask, the source noised to the level
  each step lands on (paper and official code: the step's starting level, one step noisier).
- The denoiser's fixed posterior variance (the official ImageNet model learns it). One denoiser
  call a step serves the step and the gradient (the official code calls it twice: the same
  numbers at twice the NFE).
- torchvision's transforms with zero padding (official: kornia, border padding); every random
  draw from the edit's generator.
- One sample per edit: the official code samples batches of 4, 8 times, and ranks the 32 by CLIP
  distance.
- The background loss masks both images (the paper's formula; the official code compares the
  masked estimate with the whole source); LPIPS is torchmetrics' VGG-16 LPIPS with the same
  version-0.1 weights as the official ``lpips`` package. The loss is off by default, as in the
  official code and the paper's Algorithm 2 (blending keeps the background instead).
- ``clip_model`` "auto" is CLIP ViT-B/16 (the official code's) on real models and the toy CLIP
  on the offline toy and tiny models, where LPIPS is a random-weight VGG-16 stand-in.

NFE = num_inference_steps - skip_timesteps (x2 with classifier-free guidance, guidance_scale not
0 or 1). Backward passes through the denoiser: one a step, num_inference_steps - skip_timesteps
(0 when every loss weight is 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.progress import step_progress
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import (
    ddim_scheduler,
    model_noise,
    noise_level_terms,
    predict_noise,
)
from editeval.diffusion.ddpm import step_levels, stochastic_step_mean
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.masked_blending import (
    known_region,
    mask_image,
    paste_known_pixels,
)
from editeval.models.image_losses import load_clip_guide, load_lpips_loss, offline_suite

CLIP_VIT_B16 = "openai/clip-vit-base-patch16"
"""The official code's CLIP (ViT-B/16)."""

CARD = MethodCard(
    name="blended-diffusion",
    title="Blended Diffusion",
    paper=Paper("Blended Diffusion for Text-driven Editing of Natural Images", "CVPR", 2022,
                "2111.14818"),
    strategy="training-free",
    subcategory="mask-guidance",
    inputs=("target_prompt", "mask"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 100, "skip_timesteps": 25, "clip_guidance_lambda": 1000.0,
              "range_lambda": 50.0, "aug_num": 8, "background_preservation_loss": False,
              "lpips_sim_lambda": 1000.0, "l2_sim_lambda": 10000.0, "enforce_background": True,
              "guidance_scale": 0.0, "clip_model": "auto"},
    nfe_formula="num_inference_steps - skip_timesteps  (x2 with classifier-free guidance: "
                "guidance_scale not 0 or 1)",
    backward_formula="num_inference_steps - skip_timesteps  (0 when every loss weight is 0)",
    deviations="latent model run unconditionally (guidance_scale 0; paper: pixel-space "
               "unconditional ImageNet model); losses on the VAE-decoded x0 (official: "
               "fac x0 + (1 - fac) x_t for CLIP); latent blending at the level each step lands "
               "on (official: one step noisier); fixed posterior variance; one denoiser call a "
               "step (official: two); torchvision augmentations with zero padding; one sample, "
               "no CLIP ranking; background loss masks both images; toy CLIP and random-VGG "
               "LPIPS on the toy and tiny models",
    note="guidance_scale 0: the unconditional denoiser (the paper's setting), 1: conditioned on "
         "the target prompt, > 1: classifier-free guidance. clip_model 'auto': ViT-B/16 on real "
         "models (download), the toy CLIP on toy/tiny. background_preservation_loss adds the "
         "paper's LPIPS + MSE loss outside the mask (off, as the official code).",
)


def _check(*, num_inference_steps: int, skip_timesteps: int, clip_guidance_lambda: float,
           range_lambda: float, aug_num: int, lpips_sim_lambda: float, l2_sim_lambda: float,
           guidance_scale: float, clip_model: str, **_: Any) -> None:
    name = CARD.name
    if num_inference_steps < 1:
        raise ValueError(f"{name}: num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0 <= skip_timesteps < num_inference_steps:
        raise ValueError(f"{name}: skip_timesteps must be in [0, num_inference_steps = "
                         f"{num_inference_steps}), got {skip_timesteps}")
    for option, value in (("clip_guidance_lambda", clip_guidance_lambda),
                          ("range_lambda", range_lambda), ("lpips_sim_lambda", lpips_sim_lambda),
                          ("l2_sim_lambda", l2_sim_lambda), ("guidance_scale", guidance_scale)):
        if value < 0:
            raise ValueError(f"{name}: {option} must be >= 0, got {value}")
    if aug_num < 1:
        raise ValueError(f"{name}: aug_num must be >= 1 (the image itself is the first), got "
                         f"{aug_num}")
    folder = Path(clip_model).expanduser()
    if not clip_model.strip() or (clip_model.startswith((".", "/", "~")) and not folder.is_dir()):
        raise ValueError(f"{name}: clip_model must be 'auto', 'toy', a hub id or an existing "
                         f"folder, got {clip_model!r}")


_BILINEAR = v2.InterpolationMode.BILINEAR
AUGMENT = v2.Compose([  # fill=None: zero padding without torchvision's in-place fill (no gradient)
    v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.1, 0.1), interpolation=_BILINEAR,
                                    fill=None)], p=0.7),
    v2.RandomPerspective(distortion_scale=0.7, p=0.7, interpolation=_BILINEAR, fill=None),
])
"""The official code's augmentations (kornia's ``RandomAffine(15, translate=0.1, p=0.7)`` and
``RandomPerspective(0.7, p=0.7)``), on one image ``[1, 3, S, S]``; differentiable."""


def augmented_views(images: torch.Tensor, size: int, count: int,
                    generator: torch.Generator) -> torch.Tensor:
    """``count`` views ``[count, 3, size, size]`` of ``images`` ``[1, 3, H, W]``: the image
    average-pooled to ``size`` first, then ``count - 1`` independent draws of :data:`AUGMENT` of
    it (seeded from ``generator``; torch's global generator is left as it was)."""
    pooled = F.adaptive_avg_pool2d(images, (size, size))
    views = [pooled]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        views += [AUGMENT(pooled) for _ in range(count - 1)]
    return torch.cat(views)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 arcsin(|u - v| / 2)^2`` of the L2-normalised rows u of ``a`` ``[N, D]`` and v of ``b``
    (``[N, D]`` or ``[1, D]``): ``[N]``, 0 for parallel embeddings, pi^2 / 2 for opposite ones
    (the squared great-circle distance over 2; the official code's ``d_clip_loss``)."""
    u, v = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (u - v).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def _pixels(image: Any, like: torch.Tensor) -> torch.Tensor:
    """A PIL image as ``[1, C, H, W]`` float32 in [-1, 1] on ``like``'s device (C = 1 for "L")."""
    return (v2.functional.pil_to_tensor(image)[None].float() / 127.5 - 1).to(like.device)


@register_method(CARD, check=_check)
def blended_diffusion(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                      num_inference_steps: int, skip_timesteps: int, clip_guidance_lambda: float,
                      range_lambda: float, aug_num: int, background_preservation_loss: bool,
                      lpips_sim_lambda: float, l2_sim_lambda: float, enforce_background: bool,
                      guidance_scale: float, clip_model: str) -> MethodOutput:
    """Edit ``inputs.image`` inside ``inputs.mask`` towards ``inputs.target_prompt`` (see the
    module docstring)."""
    known = known_region(pipe, inputs.image, inputs.mask, generator)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    scheduler.timesteps = scheduler.timesteps[skip_timesteps:]
    levels = step_levels(scheduler)
    unet, vae, device = pipe.unet, pipe.vae, pipe.unet.device
    cond, uncond = encode_prompt(pipe, inputs.target_prompt), encode_prompt(pipe, "")
    background = background_preservation_loss and (lpips_sim_lambda > 0 or l2_sim_lambda > 0)
    guided = clip_guidance_lambda > 0 or range_lambda > 0 or background
    offline = offline_suite(pipe) is not None
    if clip_guidance_lambda > 0:
        clip_name = ("toy" if offline else CLIP_VIT_B16) if clip_model == "auto" else clip_model
        clip = load_clip_guide(clip_name, str(device))
        text = clip.text_features([inputs.target_prompt])
    if background:
        lpips = load_lpips_loss("vgg-random" if offline else "vgg", str(device))
    inside = (_pixels(inputs.mask, known.latents) > 0).float()  # [1, 1, H, W], 1 = edit
    keep = 1 - inside
    source = _pixels(inputs.image, known.latents) * keep
    distances: list[float] = []  # the CLIP distance at every step

    def noise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 0:
            return model_noise(unet, scheduler, latents, t, uncond)
        return predict_noise(unet, scheduler, latents, t, cond, uncond, guidance_scale)

    def loss(latents: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """L of the module docstring at z_t (a 0-dim float32 tensor); records the CLIP
        distance."""
        sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha, latents)
        clean = (latents - sqrt_one_minus * eps) / sqrt_alpha
        x0 = vae.decode(clean.to(vae.dtype) / vae.config.scaling_factor).sample.float()
        total = torch.zeros((), device=device)
        if clip_guidance_lambda > 0:
            views = augmented_views(x0 * inside, clip.size, aug_num, generator)
            distance = spherical_distance(clip.image_features((views + 1) / 2), text).mean()
            distances.append(float(distance.detach()))
            total = total + clip_guidance_lambda * distance
        if range_lambda > 0:
            total = total + range_lambda * (x0 - x0.clamp(-1, 1)).pow(2).mean()
        if background:
            total = total + lpips_sim_lambda * lpips(x0 * keep, source).sum() \
                + l2_sim_lambda * F.mse_loss(x0 * keep, source)
        return total

    latents, last = known.noised(levels[0][1]), len(levels) - 1
    with step_progress(f"{CARD.name}: guided sampling", len(levels)) as update:
        for i, (t, alpha_t, alpha_prev) in enumerate(levels):
            current = latents.detach().requires_grad_(guided)
            with torch.set_grad_enabled(guided):
                eps = noise(current, t)
                if guided:
                    (gradient,) = torch.autograd.grad(loss(current, eps, alpha_t), current)
            mean, sigma = stochastic_step_mean(current.detach(), eps.detach(), alpha_t,
                                               alpha_prev, eta=1.0)
            if guided:
                mean = mean - sigma ** 2 * gradient.to(mean)
            if i < last:
                draw = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
                latents = known.blend(mean + sigma * draw.to(mean), alpha_prev)
            else:
                latents = known.blend(mean, 1.0)
            update(**({"clip_distance": distances[-1]} if distances else {}))
    image = decode_latents(pipe, latents)
    if enforce_background:
        image = paste_known_pixels(image, inputs.image, inputs.mask)
    return MethodOutput(image, intermediates={"latent_mask": mask_image(known.mask),
                                              "clip_distances": distances})
