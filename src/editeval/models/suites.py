"""Named base models: short names for single checkpoints and *model suites*.

A model suite maps each kind of pipeline a method needs to one checkpoint, so that ``--model sd15``
gives SDEdit Stable Diffusion 1.5 and InstructPix2Pix the instruction-tuned model built on it.
Kinds:

- ``text-to-image``: a Stable Diffusion text-to-image checkpoint (SDEdit, inversion methods, ...).
- ``instruction``: an InstructPix2Pix-style checkpoint (8-channel UNet conditioned on the source image).
- ``inpainting``: an inpainting checkpoint (9-channel UNet: latents, mask, masked-image latents).

A checkpoint is a Hugging Face hub id, a local directory, or a builder that returns a local directory
(the offline ``tiny`` suite).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from editeval.models.tiny import tiny_checkpoint
from editeval.toyworld import models as toy_models

KINDS = ("text-to-image", "instruction", "inpainting")

Checkpoint = str | Callable[[], Path]


@dataclass(frozen=True)
class ModelSuite:
    """Checkpoints of one base-model family, by kind (see :data:`KINDS`)."""

    name: str
    description: str
    checkpoints: Mapping[str, Checkpoint]


SUITES: dict[str, ModelSuite] = {
    suite.name: suite
    for suite in (
        ModelSuite(
            "sd15",
            "Stable Diffusion 1.5 family (512 px)",
            {
                "text-to-image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "instruction": "timbrooks/instruct-pix2pix",
                "inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
            },
        ),
        ModelSuite(
            "sd21",
            "Stable Diffusion 2.1 base family (512 px)",
            {
                "text-to-image": "stabilityai/stable-diffusion-2-1-base",
                "inpainting": "stabilityai/stable-diffusion-2-inpainting",
            },
        ),
        ModelSuite(
            "sdxl",
            "Stable Diffusion XL family (1024 px)",
            {
                "text-to-image": "stabilityai/stable-diffusion-xl-base-1.0",
                "instruction": "diffusers/sdxl-instructpix2pix-768",
                "inpainting": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
            },
        ),
        ModelSuite(
            "toy",
            "editeval's own SD-architecture models trained on the toy world (64 px), shipped",
            {
                "text-to-image": lambda: toy_models.checkpoint("sd"),
                "instruction": lambda: toy_models.checkpoint("ip2p"),
                "inpainting": lambda: toy_models.checkpoint("inpaint"),
            },
        ),
        ModelSuite(
            "tiny",
            "Tiny random-weight SD 1.5 architecture, built offline (64 px; noise, for plumbing tests)",
            {
                "text-to-image": lambda: tiny_checkpoint("sd"),
                "instruction": lambda: tiny_checkpoint("ip2p"),
                "inpainting": lambda: tiny_checkpoint("inpaint"),
            },
        ),
    )
}

# Short names for a single checkpoint (``load_pipeline("ip2p")``).
ALIASES: dict[str, Checkpoint] = {
    "sd15": SUITES["sd15"].checkpoints["text-to-image"],
    "sd21": SUITES["sd21"].checkpoints["text-to-image"],
    "sdxl": SUITES["sdxl"].checkpoints["text-to-image"],
    "ip2p": SUITES["sd15"].checkpoints["instruction"],
    "sd15-inpaint": SUITES["sd15"].checkpoints["inpainting"],
    "toy": SUITES["toy"].checkpoints["text-to-image"],
    "toy-ip2p": SUITES["toy"].checkpoints["instruction"],
    "toy-inpaint": SUITES["toy"].checkpoints["inpainting"],
    "tiny": SUITES["tiny"].checkpoints["text-to-image"],
    "tiny-ip2p": SUITES["tiny"].checkpoints["instruction"],
    "tiny-inpaint": SUITES["tiny"].checkpoints["inpainting"],
}


def resolve_checkpoint(name_or_path: str, kind: str = "text-to-image") -> str:
    """Turn a suite name, short name, local path or hub id into a local path or hub id.

    A suite name picks the suite's checkpoint of ``kind``; a short name (:data:`ALIASES`) its
    checkpoint whatever ``kind``; anything else is returned unchanged. Raises ``ValueError`` for an
    unknown ``kind`` or a suite without a checkpoint of that kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    if name_or_path in SUITES:
        suite = SUITES[name_or_path]
        if kind not in suite.checkpoints:
            raise ValueError(
                f"model suite {suite.name!r} has no {kind} checkpoint (it has: "
                f"{', '.join(suite.checkpoints)}); pass a hub id or local path of a {kind} model"
            )
        checkpoint = suite.checkpoints[kind]
    else:
        checkpoint = ALIASES.get(name_or_path, name_or_path)
    return str(checkpoint()) if callable(checkpoint) else checkpoint
