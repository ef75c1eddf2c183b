"""Differentiable image losses on pretrained vision networks, for methods that optimise an edit
against them (DiffusionDisentanglement's objective, :mod:`editeval.methods.test_time_finetuning.
diffusion_disentanglement`).

- :class:`ClipGuide` and :func:`load_clip_guide`: a CLIP model whose image features carry
  gradients, with the directional CLIP loss (StyleGAN-NADA's, Gal et al., SIGGRAPH 2022,
  arXiv:2108.00946). Names: a hub id (``openai/clip-vit-base-patch32``, ViT-B/32, the CLIP of
  DiffusionDisentanglement's official code), a local folder in ``from_pretrained`` layout, or
  ``toy``: the toy world's CLIP (shipped, 64 px).
- :class:`VggPerceptual` and :func:`load_vgg_perceptual`: the L1 distance of VGG-16 features
  after the blocks ending at relu1_2, relu2_2, relu3_3 and relu4_3 (the perceptual loss of
  DiffusionDisentanglement's and StyleCLIP's code). ``vgg16``: torchvision's ImageNet weights
  (downloaded on first use into ``$TORCH_HOME/hub/checkpoints``); ``vgg16-random``: a stand-in
  for offline use, the same layers with torchvision's initialisation of VGG's convolutions
  (Kaiming normal, fan-out; zero biases) drawn under seed 0 (a fixed random-feature distance, not
  the published loss).
- :func:`load_lpips_loss`: LPIPS (Zhang et al., CVPR 2018, arXiv:1801.03924, version 0.1 on
  VGG-16, torchmetrics' network) as a differentiable loss (Blended Diffusion's background loss);
  ``vgg-random`` is its offline stand-in (random VGG-16 under seed 0, the paper's linear layers).
- :func:`offline_suite`: whether a pipeline is one of the offline model suites (``toy``,
  ``tiny``), on which only the offline networks (``toy``, ``vgg16-random``, ``vgg-random``) are
  available.

This is not the metrics' backbone loading (:mod:`editeval.metrics.backbones`): metrics score
finished images without gradients and sit in a higher layer than the methods.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editeval.core.cache import cache_dir
from editeval.models.loading import ModelNotAvailableError
from editeval.models.progress import quiet_progress_bars
from editeval.toyworld import models as toy_models

CLIP_VIT_B32 = "openai/clip-vit-base-patch32"
VGG_NETS = ("vgg16", "vgg16-random")
VGG_BLOCKS = ((0, 4), (4, 9), (9, 16), (16, 23))
"""Slices of torchvision's ``vgg16().features``: up to relu1_2, relu2_2, relu3_3, relu4_3."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VGG_INPUT = 224
STAND_IN_SEED = 0


def offline_suite(pipe: Any) -> str | None:
    """``"toy"`` or ``"tiny"`` when ``pipe`` was loaded from the shipped toy checkpoints or the
    built tiny ones (its ``name_or_path`` lies under their folders), else ``None``."""
    path = Path(str(getattr(pipe, "name_or_path", "") or ""))
    if not str(path) or not path.exists():
        return None
    path = path.resolve()
    for suite, root in (("toy", toy_models.WEIGHTS), ("tiny", cache_dir() / "tiny")):
        if path.is_relative_to(root.resolve()):
            return suite
    return None


def _tensor(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object (embeddings in pooler_output), 4 the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipGuide(nn.Module):
    """A frozen float32 CLIP model whose image features carry gradients to the image.

    Attributes:
        name: the name it was loaded by.
        size: the side of the square images its vision tower takes (224 for ViT-B/32, 64 toy).
    """

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.name, self.model, self.tokenizer, self.size = name, model, tokenizer, size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, float32 ``[N, D]`` (not normalised), of float images
        ``[N, 3, H, W]`` in [0, 1]: resized bilinearly to ``size`` x ``size`` and normalised with
        the processor's mean and std; differentiable."""
        pixels = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear",
                               align_corners=False)
        return _tensor(self.model.get_image_features(pixel_values=(pixels - self.mean) / self.std))

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings, float32 ``[N, D]`` (not normalised), of captions (truncated
        to 77 tokens)."""
        tokens = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        tokens = {key: value.to(self.mean.device) for key, value in tokens.items()}
        return _tensor(self.model.get_text_features(**tokens)).float()

    def directional_loss(self, source: torch.Tensor, edited: torch.Tensor,
                         source_text: torch.Tensor, target_text: torch.Tensor) -> torch.Tensor:
        """``1 - cos(E(edited) - E(source), T_target - T_source)``, a 0-dim tensor in [0, 2].

        Args:
            source, edited: images ``[1, 3, H, W]`` in [0, 1]; gradients flow to both.
            source_text, target_text: :meth:`text_features` of the two prompts, ``[1, D]``.
        The embeddings are differenced as they are (not L2-normalised first), as in
        DiffusionDisentanglement's code; a zero difference gives cosine 0 (loss 1).
        """
        change = self.image_features(edited) - self.image_features(source)
        return 1 - F.cosine_similarity(change, target_text - source_text).squeeze(0)


class VggPerceptual(nn.Module):
    """The VGG-16 perceptual loss: images normalised with ImageNet's mean and std, resized to
    224 x 224, then the sum over the four blocks of :data:`VGG_BLOCKS` of the mean absolute
    difference of their features. Frozen, float32.

    Attributes:
        name: ``vgg16`` or ``vgg16-random`` (see the module docstring).
    """

    def __init__(self, name: str, features: nn.Sequential) -> None:
        super().__init__()
        self.name = name
        self.blocks = nn.ModuleList(features[start:end] for start, end in VGG_BLOCKS)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The loss of float images ``[N, 3, H, W]`` in [0, 1] against ``reference`` (same shape;
        no gradient reaches it): a 0-dim float32 tensor, 0 for equal images."""
        x, y = ((F.interpolate((image.float() - self.mean) / self.std, size=(VGG_INPUT,) * 2,
                               mode="bilinear", align_corners=False))
                for image in (images, reference.detach()))
        loss = torch.zeros((), device=x.device)
        for block in self.blocks:
            x, y = block(x), block(y)
            loss = loss + F.l1_loss(x, y)
        return loss


def _frozen(module: nn.Module, device: torch.device | str) -> nn.Module:
    return module.to(device=device, dtype=torch.float32).requires_grad_(False).eval()


@lru_cache(maxsize=2)
def load_clip_guide(name: str, device: str = "cpu") -> ClipGuide:
    """The CLIP model ``name`` (hub id, folder or ``toy``) as a :class:`ClipGuide` on ``device``,
    kept loaded (the two most recent).

    Raises:
        ModelNotAvailableError: not cached and no network, or not a CLIP checkpoint (the message
            names the ``clip_model`` parameter and the offline choice).
    """
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as transformers_logging

    checkpoint = str(toy_models.checkpoint("clip")) if name == "toy" else name
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with quiet_progress_bars():
            model = CLIPModel.from_pretrained(checkpoint, dtype=torch.float32)
            processor = CLIPProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotAvailableError(
            f"CLIP model {name!r} could not be loaded ({reason}); download it once with network "
            "access, pass -p clip_model=FOLDER with a local copy, or -p clip_model=toy on the toy "
            "world") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    images = processor.image_processor
    return _frozen(ClipGuide(name, model, processor.tokenizer, int(images.crop_size["height"]),
                             tuple(images.image_mean), tuple(images.image_std)), device)


@lru_cache(maxsize=2)
def load_vgg_perceptual(name: str, device: str = "cpu") -> VggPerceptual:
    """The perceptual loss on ``name`` (``vgg16`` or ``vgg16-random``) on ``device``, kept loaded.

    Raises:
        ValueError: another name.
        ModelNotAvailableError: torchvision's ImageNet VGG-16 weights are neither in
            ``$TORCH_HOME/hub/checkpoints`` nor downloadable.
    """
    import torchvision

    if name not in VGG_NETS:
        raise ValueError(f"unknown perceptual network {name!r}; expected one of "
                         f"{', '.join(VGG_NETS)}")
    if name == "vgg16-random":
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])[:VGG_BLOCKS[-1][1]]
        generator = torch.Generator().manual_seed(STAND_IN_SEED)
        with torch.no_grad():
            for layer in features:
                if isinstance(layer, nn.Conv2d):  # torchvision's initialisation of VGG's convs
                    fan_out = layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
                    layer.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
                    layer.bias.zero_()
    else:
        weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
        try:
            features = torchvision.models.vgg16(weights=weights).features
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise ModelNotAvailableError(
                f"torchvision's ImageNet VGG-16 weights could not be loaded ({err}); put "
                f"{weights.url.rsplit('/', 1)[-1]} into $TORCH_HOME/hub/checkpoints, or pass -p "
                "perceptual_net=vgg16-random (an offline stand-in)") from None
    return _frozen(VggPerceptual(name, features), device)


LPIPS_NETS = ("vgg", "vgg-random")


@lru_cache(maxsize=2)
def load_lpips_loss(name: str, device: str = "cpu") -> nn.Module:
    """LPIPS on ``name`` (``vgg``: torchvision's ImageNet VGG-16; ``vgg-random``: the offline
    stand-in, the same layers randomly initialised under seed 0) with the paper's linear layers,
    frozen, float32, on ``device``, kept loaded. ``loss(a, b)`` of float images ``[N, 3, H, W]``
    in [-1, 1] gives ``[N, 1, 1, 1]`` distances (0 for equal images), differentiable in both.

    Raises:
        ValueError: another name.
        ModelNotAvailableError: the ImageNet VGG-16 weights are neither in
            ``$TORCH_HOME/hub/checkpoints`` nor downloadable.
    """
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    if name not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS network {name!r}; expected one of "
                         f"{', '.join(LPIPS_NETS)}")
    try:
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.manual_seed(STAND_IN_SEED)
            network = _NoTrainLpips(net="vgg", pnet_rand=name == "vgg-random")
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise ModelNotAvailableError(
            f"LPIPS needs torchvision's ImageNet VGG-16 weights, which could not be loaded "
            f"({err}); put them into $TORCH_HOME/hub/checkpoints, or switch the background loss "
            "off (-p background_preservation_loss=false)") from None
    return _frozen(network, device)
