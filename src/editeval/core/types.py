"""The two values every editing method shares: what to edit (:class:`EditRequest`) and what came out
(:class:`EditResult`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class EditRequest:
    """One edit to make.

    Attributes:
        image: the source image: a path, bytes, PIL image or array (anything
            :func:`editeval.data.images.load_image` accepts); any size: it is brought to the model's
            resolution by :func:`editeval.data.images.fit_to_resolution` and back.
        source_prompt: a caption of the source image (inversion-based methods).
        target_prompt: a caption of the wanted result (text-guided methods such as SDEdit).
        instruction: an imperative edit instruction (instruction-based methods such as InstructPix2Pix).
        task: the EditEval task id (``object_addition`` ...), when known.
        mask: the edit region (white = edit), for methods that take one; anything
            :func:`editeval.data.images.load_mask` accepts.
        reference: a reference image, for methods that take one.
        seed: seeds every random draw; equal seeds give bit-identical edits on the CPU.
        params: method parameters overriding the method card's defaults (``strength``,
            ``guidance_scale``, ...); unknown names are an error.
    """

    image: Any
    source_prompt: str = ""
    target_prompt: str = ""
    instruction: str = ""
    task: str | None = None
    mask: Any = None
    reference: Any = None
    seed: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class EditResult:
    """The outcome of one edit.

    Attributes:
        image: the edited image, RGB, at the source image's size (the inverse of the resolution policy).
        model_image: the edited image at the model's resolution, as the method produced it.
        method: the registry name of the method.
        model: the checkpoint the edit ran on (hub id or local path).
        nfe: UNet evaluations (a classifier-free-guidance batch of 2 counts 2).
        wall_seconds: wall-clock time of the method call, seconds (model loading excluded).
        params: the effective method parameters (card defaults updated by the request).
        seed: the seed used.
        intermediates: anything worth keeping (inverted latents, masks, ...), by name.
    """

    image: Image.Image
    model_image: Image.Image
    method: str
    model: str
    nfe: int
    wall_seconds: float
    params: dict[str, Any]
    seed: int
    intermediates: dict[str, Any] = field(default_factory=dict)
