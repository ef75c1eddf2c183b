"""FID and KID of a set of edits against the set of their sources, on torchmetrics.

- **FID** (Heusel, Ramsauer, Unterthiner, Nessler and Hochreiter, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017, arXiv:1706.08500): the
  Fréchet distance of Gaussians fitted to the features of the two sets,
  ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``; 0 for equal sets, lower is closer.
- **KID** (Binkowski, Sutherland, Arbel and Gretton, "Demystifying MMD GANs", ICLR 2018,
  arXiv:1801.01401): the unbiased squared MMD with the cubic polynomial kernel
  ``(x.y / d + 1)^3``, averaged over 100 random subsets of ``min(1000, n)`` images (the paper's
  defaults; subsets drawn under a fixed seed, so a rerun gives the same value) with its standard
  deviation. With fewer than 1000 images every subset is the whole set and the deviation is 0.

Both are set metrics: a run's edits of one method (and one task, or all) against those edits'
sources. Few images make both biased and noisy (FID especially); compare only sets of one size.

Feature extractors (``--fid-model``):

- ``inception``: FID's Inception-v3 (``pt_inception-2015-12-05``, 2048-d pool features, through
  torch-fidelity as torchmetrics does). It needs ``pip install torch-fidelity`` and its weights
  (downloaded on first use); otherwise a clear error says so.
- a CLIP (``toy``, ``tiny``, a hub id or folder): the projected image embeddings of the CLIP image
  tower (``CLIPImageFeatures``), recorded as ``clip-image:<CLIP id>``. On toy runs this is the
  default: the toy CLIP's image tower, since no Inception is trained on the toy world.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from editeval.metrics.backbones import BackboneUnavailableError, ClipBackbone, load_clip
from editeval.metrics.regions import to_uint8_chw

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0
INCEPTION_ID = "inception-v3-compat:pt_inception-2015-12-05"


class CLIPImageFeatures(nn.Module):
    """A CLIP image tower as an FID/KID feature extractor: uint8 ``[N, 3, H, W]`` (0..255) to float
    ``[N, D]`` projected embeddings (not normalised)."""

    def __init__(self, clip: ClipBackbone) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"CLIPImageFeatures takes uint8 images, got {images.dtype}")
        return self.clip.image_embeddings([i.permute(1, 2, 0).numpy() for i in images])


class FeatureExtractor:
    """What FID/KID compare: ``feature`` (torchmetrics' ``feature=``: 2048 for Inception, or a
    module) and ``name``, the id recorded with the scores."""

    def __init__(self, name: str, feature: int | nn.Module) -> None:
        self.name = name
        self.feature = feature


def load_feature_extractor(name: str) -> FeatureExtractor:
    """``inception`` or a CLIP name (see the module docstring).

    Raises:
        BackboneUnavailableError: torch-fidelity is missing (Inception), or the CLIP is.
    """
    if name == "inception":
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise BackboneUnavailableError(
                "FID/KID's Inception-v3 needs torch-fidelity (`pip install torch-fidelity`; its "
                "weights download on first use); or pass --fid-model with a CLIP (e.g. toy on "
                "toy-world runs) to compare CLIP image features instead")
        return FeatureExtractor(INCEPTION_ID, 2048)
    clip = load_clip(name)
    return FeatureExtractor(f"clip-image:{clip.name}", CLIPImageFeatures(clip))


def _fill(metric, sources: list[np.ndarray], edits: list[np.ndarray]) -> None:
    if len(sources) < 2 or len(edits) < 2:
        raise ValueError(f"FID and KID need at least 2 sources and 2 edits, got {len(sources)} "
                         f"and {len(edits)}")
    for real, images in ((True, sources), (False, edits)):
        for image in images:  # one at a time: a dataset's images may differ in size
            metric.update(to_uint8_chw([image]), real=real)


def _metric_errors(err: Exception) -> BackboneUnavailableError:
    return BackboneUnavailableError(f"the Inception-v3 weights could not be loaded ({err}); "
                                    "download them once with network access, or pass "
                                    "--fid-model with a CLIP")


@torch.no_grad()
def fid(extractor: FeatureExtractor, sources: list[np.ndarray], edits: list[np.ndarray]) -> float:
    """FID of ``edits`` against ``sources`` (uint8 ``H x W x 3`` lists, at least 2 each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=extractor.feature)
    except (OSError, RuntimeError) as err:
        raise _metric_errors(err) from None
    _fill(metric, sources, edits)
    return float(metric.compute())


@torch.no_grad()
def kid(extractor: FeatureExtractor, sources: list[np.ndarray],
        edits: list[np.ndarray]) -> tuple[float, float]:
    """KID (mean, standard deviation over subsets) of ``edits`` against ``sources``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, len(sources), len(edits))
    try:
        with warnings.catch_warnings():  # it keeps every feature: fine for the sets scored here
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            metric = KernelInceptionDistance(feature=extractor.feature, subsets=KID_SUBSETS,
                                             subset_size=max(size, 1))
    except (OSError, RuntimeError) as err:
        raise _metric_errors(err) from None
    _fill(metric, sources, edits)
    with torch.random.fork_rng():
        torch.manual_seed(KID_SEED)
        mean, std = metric.compute()
    return float(mean), float(std)
