"""Images as the metrics take them, and the edited / unedited regions, following PIE-Bench.

PIE-Bench (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code",
ICLR 2024, arXiv:2310.01506) scores background preservation on the *unedited region* ``1 - mask``
and CLIP similarity also on the *edited region* ``mask``. Like PIE-Bench, the other region's pixels
are **zeroed** (set to black) in both images, not cropped away: the images keep their size and every
pixel-averaged metric (MSE, PSNR, SSIM, LPIPS) averages over all pixels, the zeroed ones included
(where the two images agree exactly). A region with no pixel has no score: NaN, counted and
reported, never averaged (style edits, whose mask covers the whole image, have no unedited region).
Samples without a mask (EditEval v1) are scored on the whole image, recorded as region ``whole``.

Images are uint8 ``H x W x 3`` arrays (0..255) until a metric converts them; the conversion to
floats in [0, 1] divides by 255 in float64, so a saturated uint8 pixel (255) is 1.0, never an
overflowed or wrapped integer.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from editeval.data.images import load_image, load_mask, mask_to_array

WHOLE, UNEDITED, EDITED = "whole", "unedited", "edited"
REGIONS = (WHOLE, UNEDITED, EDITED)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as uint8 ``H x W x 3`` (any format :func:`load_image` reads)."""
    return np.array(load_image(path))


def read_mask(path: str | os.PathLike | None, size: tuple[int, int]) -> np.ndarray | None:
    """The edit mask at ``path`` (white = edit) as bool ``H x W`` at ``size`` = (width, height), or
    None when there is none."""
    if path is None:
        return None
    return mask_to_array(load_mask(path, size, allow_empty=True, allow_full=True))


def region_of(mask: np.ndarray | None, region: str) -> tuple[str, np.ndarray | None]:
    """``(recorded region, pixels kept)`` for ``region`` (``unedited`` or ``edited``) of ``mask``.

    Without a mask the whole image is kept: ``("whole", None)``. The kept pixels may be empty
    (a full mask has no unedited region): the metric is then NaN.
    """
    if region not in (UNEDITED, EDITED):
        raise ValueError(f"region must be {UNEDITED!r} or {EDITED!r}, not {region!r}")
    if mask is None:
        return WHOLE, None
    return region, (~mask if region == UNEDITED else mask)


def keep(image: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """``image`` (uint8 ``H x W x 3``) with the pixels outside ``kept`` zeroed (None: unchanged)."""
    if kept is None:
        return image
    if kept.shape != image.shape[:2]:
        raise ValueError(f"mask of shape {kept.shape} does not match the image "
                         f"{image.shape[:2]}; pass a mask of the image's size")
    return np.where(kept[..., None], image, np.uint8(0)).astype(np.uint8)


def to_unit(images: list[np.ndarray] | np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """uint8 ``H x W x 3`` image(s) as a float tensor ``[N, 3, H, W]`` in [0, 1] (255 -> 1.0).

    Raises:
        ValueError: an image is not uint8 ``H x W x 3``.
    """
    batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    for image in batch:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 H x W x 3 images, got {image.dtype} "
                             f"{image.shape}; load images with editeval.metrics.regions.read_rgb")
    stacked = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    return stacked.to(dtype) / 255.0


def chw(image: np.ndarray) -> torch.Tensor:
    """A uint8 ``H x W x 3`` image as a new uint8 tensor ``[3, H, W]`` (what CLIP and ViT image
    processors take; they rescale 0..255 to [0, 1] themselves)."""
    return torch.tensor(np.asarray(image)).permute(2, 0, 1)


def to_uint8_chw(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``H x W x 3`` images (one size) as a uint8 tensor ``[N, 3, H, W]``."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
