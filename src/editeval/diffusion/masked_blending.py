"""The known region of mask-guided sampling: the source kept outside an edit mask at every step.

Blended Latent Diffusion (Avrahami, Fried and Lischinski, SIGGRAPH 2023, arXiv:2206.02779) and
RePaint (Lugmayr et al., CVPR 2022, arXiv:2201.09865) generate only inside an edit mask. After
every denoising step the latents outside the mask are replaced by the source's latents
forward-noised to the noise level the step reached::

    z_t <- m * z_t + (1 - m) * (sqrt(a_t) z_src + sqrt(1 - a_t) eps),   eps ~ N(0, I) drawn afresh

(``m``: the edit mask at latent size, 1 = generate; ``a_t``: the alpha-bar of the level). The
denoiser so always sees a background at its own noise level, and the edit region is generated in
harmony with it; at the clean level (``a = 1``) the known region is the source's latents exactly,
so the result decodes to the source's VAE round trip outside the mask, up to the decoder's reach
across the mask's border (its convolutions and attention see the edited latents too).

- :func:`latent_mask`: the pixel mask at latent size, by nearest neighbour (BLD's official code).
- :func:`diffuse`: the forward process ``q(z_to | z_from)`` between two noise levels.
- :class:`KnownRegion`: the source's latents, the latent mask and the generator; ``noised`` and
  ``blend``; :func:`known_region` builds it from an image and a mask, :func:`mask_image` shows
  the latent mask.
- Pixel-level preservation after decoding: :func:`paste_known_pixels` (the source's pixels copied
  outside the mask) and :func:`finetune_decoder` (BLD's background reconstruction: a per-image
  fit of a copy of the VAE decoder).

Schedule terms are computed in float32 (:func:`~editeval.diffusion.ddim.noise_level_terms`); every
random draw comes from the caller's CPU generator.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editeval.core.progress import step_progress
from editeval.data.images import MaskError
from editeval.diffusion.ddim import noise_level_terms
from editeval.diffusion.latents import decode_latents, encode_image


def latent_mask(mask: Image.Image, latents: torch.Tensor) -> torch.Tensor:
    """The edit mask at the latents' size: shape (1, 1, h, w), values 0.0 or 1.0 (1 = edit), in
    the latents' dtype and on their device.

    ``mask``: mode "L" (255 = edit) at the image's size. Downsampled by nearest neighbour and
    thresholded at 128, as Blended Latent Diffusion's official code does: each latent cell takes
    the pixel at (about) its centre, so a mask thinner than the VAE's factor (8 px) may vanish.
    """
    height, width = latents.shape[-2:]
    small = np.asarray(mask.convert("L").resize((width, height), Image.Resampling.NEAREST))
    values = torch.from_numpy((small >= 128).astype(np.float32))[None, None]
    return values.to(device=latents.device, dtype=latents.dtype)


def diffuse(latents: torch.Tensor, alpha_to: torch.Tensor | float, generator: torch.Generator,
            alpha_from: torch.Tensor | float = 1.0) -> torch.Tensor:
    """A draw of the forward process from the noise level ``alpha_from`` to the noisier
    ``alpha_to`` (alpha-bars, ``0 < alpha_to <= alpha_from <= 1``)::

        sqrt(r) * latents + sqrt(1 - r) * eps,   r = alpha_to / alpha_from,   eps ~ N(0, I)

    ``alpha_from`` 1 (the default) noises clean latents: ``q(z_t | z_0)``. Same shape and dtype as
    ``latents``; ``eps`` is drawn in float32 from the CPU ``generator``. ``alpha_to ==
    alpha_from`` returns ``latents`` exactly (the draw is still made).

    Raises:
        ValueError: ``alpha_to`` above ``alpha_from`` (that is denoising, not diffusion).
    """
    ratio = torch.as_tensor(alpha_to, dtype=torch.float32) / torch.as_tensor(alpha_from,
                                                                              dtype=torch.float32)
    if not 0 < float(ratio) <= 1:
        raise ValueError(f"diffuse: alpha_to / alpha_from = {float(ratio):.4g} is not in (0, 1]")
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    sqrt_ratio, sqrt_rest = noise_level_terms(ratio, latents)
    return sqrt_ratio * latents + sqrt_rest * noise


@dataclass
class KnownRegion:
    """The source's clean latents to keep outside an edit mask.

    Attributes:
        latents: the source's clean latents, (1, 4, h, w).
        mask: the edit mask at latent size, (1, 1, h, w), 1 = generate, 0 = keep
            (:func:`latent_mask`).
        generator: the CPU generator every forward-noise draw comes from.
    """

    latents: torch.Tensor
    mask: torch.Tensor
    generator: torch.Generator

    def noised(self, alpha: torch.Tensor | float) -> torch.Tensor:
        """The source's latents forward-noised to the level ``alpha`` (a fresh draw each call);
        ``alpha`` 1 gives them exactly."""
        return diffuse(self.latents, alpha, self.generator)

    def blend(self, latents: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
        """``latents`` (at the level ``alpha``) inside the mask, the source noised to ``alpha``
        outside it; same shape and dtype."""
        return self.mask * latents + (1 - self.mask) * self.noised(alpha)


def known_region(pipe: Any, image: Image.Image, mask: Image.Image,
                 generator: torch.Generator) -> KnownRegion:
    """The :class:`KnownRegion` of ``image`` (RGB, sides multiples of 8) outside ``mask`` (mode
    "L", 255 = edit, same size): its latents (:func:`~editeval.diffusion.latents.encode_image`) and
    the mask at their size (:func:`latent_mask`). An all-black mask keeps everything.

    Raises:
        MaskError: the mask marks pixels but no latent cell (it is thinner than the VAE's factor).
    """
    latents = encode_image(pipe, image)
    small = latent_mask(mask, latents)
    if not small.any() and mask.getextrema()[1] > 0:
        height, width = small.shape[-2:]
        raise MaskError(
            f"the mask marks no cell of the {width}x{height} latents (nearest-neighbour "
            f"downsampling keeps one pixel of each {image.width // width} px block): widen the "
            "edit region")
    return KnownRegion(latents, small, generator)


def mask_image(mask: torch.Tensor) -> Image.Image:
    """A latent mask (1, 1, h, w) in [0, 1] as a mode "L" image (255 = generated), h x w pixels:
    what a method keeps among its intermediates."""
    return Image.fromarray((mask[0, 0].float().cpu().numpy() * 255).round().astype(np.uint8), "L")


def paste_known_pixels(edited: Image.Image, source: Image.Image, mask: Image.Image) -> Image.Image:
    """``edited`` inside ``mask`` (mode "L", 255 = edit), ``source``'s pixels outside it: all
    three at the same size; an RGB image. Outside the mask the result is the source bit for bit;
    the seam at the mask's border is not blended."""
    keep = np.asarray(mask.convert("L"))[..., None] < 128
    pixels = np.where(keep, np.asarray(source.convert("RGB")), np.asarray(edited.convert("RGB")))
    return Image.fromarray(pixels)


DECODER_LEARNING_RATE = 1e-4
"""Adam's learning rate for :func:`finetune_decoder` (BLD's official code)."""
BACKGROUND_WEIGHT = 100.0
"""The weight of the background term in :func:`finetune_decoder`'s loss (BLD's official code)."""


def _pixels(image: Image.Image, like: torch.Tensor) -> torch.Tensor:
    """``image`` (RGB) as (1, 3, H, W) values in [-1, 1], in ``like``'s dtype and device."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1)[None].to(like)


def finetune_decoder(pipe: Any, latents: torch.Tensor, source: Image.Image, mask: Image.Image,
                     steps: int, description: str = "decoder finetuning") -> Image.Image:
    """Blended Latent Diffusion's background reconstruction: decode ``latents`` with a copy of the
    pipeline's VAE whose decoder was fitted, for this image only, to keep the edit inside
    ``mask`` and the source outside it.

    With ``D`` the copy's decoder, ``x_edit = D(latents)`` before fitting and ``m`` the pixel
    mask, ``steps`` Adam steps (learning rate :data:`DECODER_LEARNING_RATE`) minimise::

        mse(D(latents) m, x_edit m) + BACKGROUND_WEIGHT * mse(D(latents) (1 - m), source (1 - m))

    Args:
        pipe: a pipeline with a ``vae`` (AutoencoderKL). Its VAE is never changed: the copy is
            made in float32 (optimisation in half precision diverges) and dropped afterwards.
        latents: the edit's clean latents, (1, 4, h, w).
        source, mask: the source image (RGB) and the edit mask (mode "L", 255 = edit) at the
            decoded image's size (8 h x 8 w).
        steps: Adam steps (>= 0; 0 decodes with the unchanged copy).
        description: what :func:`~editeval.core.progress.step_progress` shows.

    Returns:
        The decoded RGB image. Cost: ``steps`` forward and backward passes of the decoder (no
        denoiser evaluation, so no NFE).
    """
    vae = copy.deepcopy(pipe.vae).float().requires_grad_(False)
    vae.decoder.requires_grad_(True)
    scaled = latents.detach().float() / vae.config.scaling_factor
    with torch.no_grad():
        edited = vae.decode(scaled).sample
    background = _pixels(source, edited)
    keep = 1 - (_pixels(mask.convert("RGB"), edited)[:, :1] > 0).float()
    optimiser = torch.optim.Adam(vae.decoder.parameters(), lr=DECODER_LEARNING_RATE)
    with torch.enable_grad(), step_progress(description, steps) as update:
        for _ in range(steps):
            decoded = vae.decode(scaled).sample
            loss = (F.mse_loss(decoded * (1 - keep), edited * (1 - keep))
                    + BACKGROUND_WEIGHT * F.mse_loss(decoded * keep, background * keep))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            update(loss=loss.item())
    return decode_latents(SimpleNamespace(vae=vae), latents.float())
