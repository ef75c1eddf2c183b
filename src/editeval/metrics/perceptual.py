"""LPIPS (Zhang, Isola, Efros, Shechtman and Wang, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", CVPR 2018, arXiv:1801.03924), on torchmetrics.

LPIPS compares unit-normalised deep features of the two images layer by layer, weights the squared
differences per channel with the paper's learned linear layers (version 0.1, shipped inside
torchmetrics), averages them spatially and sums over layers: 0 for identical images, larger is more
different (about 0.0-0.7 on natural images). Images go in as floats in [0, 1] (torchmetrics'
``normalize=True``, which maps them to [-1, 1] as the paper does).

Backbones (``--lpips-net``):

- ``alex`` (the paper's default and PIE-Bench's), ``vgg``, ``squeeze``: torchvision's ImageNet
  weights, which torchvision downloads on first use into ``$TORCH_HOME/hub/checkpoints`` (e.g.
  ``alexnet-owt-7be5be79.pth``); offline, copy the file there.
- ``alex-random``: a **stand-in** for offline use (the toy and tiny worlds' default): the same
  AlexNet layers with torchvision's random initialisation under seed 0, with the paper's alex linear
  layers on top. It is not LPIPS as published (the linear layers were fitted to ImageNet features),
  only a fixed random-feature perceptual distance, and it is recorded as ``lpips-alex-random-seed0``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.error import URLError

import numpy as np
import torch

from editeval.metrics.backbones import BackboneUnavailableError
from editeval.metrics.regions import to_unit

LPIPS_NETS = ("alex", "vgg", "squeeze")
STAND_IN_SEED = 0


def _weights_file(net: str) -> str:
    """The file torchvision caches ``net``'s ImageNet weights under (its download URL's name, as the
    installed torchvision has it, e.g. ``alexnet-owt-7be5be79.pth``)."""
    from urllib.parse import urlparse

    import torchvision

    weights = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights,
               "squeeze": torchvision.models.SqueezeNet1_1_Weights}[net].IMAGENET1K_V1
    return urlparse(weights.url).path.rsplit("/", 1)[-1]


class Lpips:
    """LPIPS with one backbone: ``lpips(sources, edits)`` gives one distance per image pair.

    Attributes:
        name: the id recorded with the scores (``lpips-alex``, ``lpips-alex-random-seed0``, ...).
    """

    def __init__(self, name: str, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.name = name
        self._distance = distance

    @torch.no_grad()
    def __call__(self, sources: list[np.ndarray], edits: list[np.ndarray]) -> np.ndarray:
        """LPIPS of each (source, edit) pair of uint8 ``H x W x 3`` images of one size: float64
        ``[N]``."""
        if len(sources) != len(edits):
            raise ValueError(f"{len(sources)} sources but {len(edits)} edits")
        values = self._distance(to_unit(sources, torch.float32), to_unit(edits, torch.float32))
        return values.reshape(-1).double().numpy()


def load_lpips(net: str) -> Lpips:
    """LPIPS on ``net`` (``alex``, ``vgg``, ``squeeze`` or the stand-in ``alex-random``).

    Raises:
        ValueError: unknown ``net``.
        BackboneUnavailableError: torchvision's ImageNet weights for ``net`` are neither in
            ``$TORCH_HOME/hub/checkpoints`` nor downloadable.
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    if net == "alex-random":
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        with torch.random.fork_rng():
            torch.manual_seed(STAND_IN_SEED)
            network = _NoTrainLpips(net="alex", pnet_rand=True)  # paper's linear layers on top
        return Lpips(f"lpips-alex-random-seed{STAND_IN_SEED}",
                     lambda a, b: network(a, b, normalize=True))
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS network {net!r}; expected one of "
                         f"{', '.join(LPIPS_NETS)} or the offline stand-in alex-random")
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none",
                                                       normalize=True)
    except (OSError, URLError, RuntimeError) as err:
        raise BackboneUnavailableError(
            f"LPIPS {net} needs torchvision's ImageNet {net} weights "
            f"({_weights_file(net)} in $TORCH_HOME/hub/checkpoints), which could not be "
            f"loaded ({err}); copy the file there, or pass --lpips-net alex-random (a clearly "
            "named random-backbone stand-in)") from None

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        metric.update(a, b)
        values = metric.compute()
        metric.reset()
        return values

    return Lpips(f"lpips-{net}", distance)
