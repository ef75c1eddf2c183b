"""PSNR, SSIM and MSE of an edit against its source, on torchmetrics.

Both images are uint8 ``H x W x 3``; they are compared as floats in [0, 1] (float64, so values agree
with scikit-image to 1e-10), with ``data_range`` 1. For the unedited region, pass images whose
edited region is zeroed (:func:`editeval.metrics.regions.keep`), as PIE-Bench does.

- MSE: mean over pixels and channels of the squared difference, in [0, 1] (PIE-Bench prints it
  x 10^4).
- PSNR (dB) = 10 log10(1 / MSE); ``inf`` for identical images.
- SSIM (Wang, Bovik, Sheikh and Simoncelli, "Image Quality Assessment: From Error Visibility to
  Structural Similarity", IEEE TIP 2004): torchmetrics' defaults, which are the paper's: an 11 x 11
  Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, per channel then averaged. The SSIM map is
  averaged without its border of half a window (5 px), as the paper's reference code ('valid'
  filtering) and scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` do; torchmetrics' own mean also counts the border,
  computed on reflect-padded images (about 5e-4 apart on 64 px noise), so the map comes from
  torchmetrics (``return_full_image=True``) and the crop is ours. In [-1, 1], 1 for identical
  images.
"""

from __future__ import annotations

import numpy as np
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from editeval.metrics.regions import to_unit

SSIM_WINDOW = 11  # torchmetrics' Gaussian window for sigma 1.5: 2 * int(3.5 * 1.5 + 0.5) + 1


def _pair(source: np.ndarray, edit: np.ndarray):
    if source.shape != edit.shape:
        raise ValueError(f"source {source.shape} and edit {edit.shape} differ in size; resize the "
                         "edit to the source's size first")
    return to_unit(edit).contiguous(), to_unit(source).contiguous()


def mse(source: np.ndarray, edit: np.ndarray) -> float:
    """Mean squared error in [0, 1] of two uint8 ``H x W x 3`` images (as floats in [0, 1])."""
    preds, target = _pair(source, edit)
    return float(mean_squared_error(preds, target))


def psnr(source: np.ndarray, edit: np.ndarray) -> float:
    """PSNR in dB of two uint8 ``H x W x 3`` images, data range 1; ``inf`` when identical."""
    preds, target = _pair(source, edit)
    return float(peak_signal_noise_ratio(preds, target, data_range=1.0))


def ssim(source: np.ndarray, edit: np.ndarray) -> float:
    """SSIM in [-1, 1] of two uint8 ``H x W x 3`` images (each side at least 11 px).

    Raises:
        ValueError: an image is smaller than the 11 x 11 window.
    """
    preds, target = _pair(source, edit)
    if min(source.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {source.shape[:2]}")
    _, full = structural_similarity_index_measure(preds, target, data_range=1.0,
                                                  return_full_image=True)
    pad = (SSIM_WINDOW - 1) // 2
    return float(full[..., pad:-pad, pad:-pad].mean())
