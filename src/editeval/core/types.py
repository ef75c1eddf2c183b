"""The values every editing method shares: what to edit (:class:`EditRequest`), what the method
sees (:class:`EditInputs`) and returns (:class:`MethodOutput`), and what came out (:class:`EditResult`)."""

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
            A prompt of only whitespace counts as not given; one longer than the text encoder
            takes (77 tokens for CLIP, start and end tokens included) is refused, unless
            ``truncate_prompts``.
        task: the EditEval task id (``object_addition`` ...), when known.
        mask: the edit region (white = edit), for methods that take one; anything
            :func:`editeval.data.images.load_mask` accepts. It must mark some pixels to edit and
            some to keep, and have the image's aspect ratio (any resolution) unless
            ``resize_mask``.
        reference: a reference image, for methods that take one.
        seed: seeds every random draw; equal seeds give bit-identical edits on the CPU.
        params: method parameters overriding the method card's defaults (``strength``,
            ``guidance_scale``, ...); unknown names are an error.
        resize_mask: stretch a mask of another aspect ratio to the image instead of refusing it.
        truncate_prompts: cut an over-long prompt at the last whole word that fits (with a
            warning) instead of refusing it.
        from_dataset: the request is a dataset sample's, with every field the sample has whatever
            the method (the benchmark runner sets it): inputs the method does not use are left
            out without a warning, and an all-white mask marks a whole-image edit (a style
            change): no mask for a method whose mask is optional, the full mask for a method
            that needs one, instead of being refused.
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
    resize_mask: bool = False
    truncate_prompts: bool = False
    from_dataset: bool = False


@dataclass
class EditResult:
    """The outcome of one edit.

    Attributes:
        image: the edited image, RGB, at the source image's size (the inverse of the resolution policy).
        model_image: the edited image at the model's resolution, as the method produced it.
        method: the registry name of the method.
        model: the checkpoint the edit ran on (hub id or local path).
        nfe: denoiser (UNet or transformer) evaluations this edit spent (a classifier-free-guidance
            batch of 2 counts 2); an inversion found in the cache costs nothing here.
        uncached_nfe: the evaluations the edit costs on its own, with every cached inversion it
            reused counted at what computing it cost (:class:`~editeval.core.nfe.NFECounter`);
            unlike ``nfe`` it does not depend on which method of a run ran first.
        wall_seconds: wall-clock time of the method call, seconds (model loading excluded).
        params: the effective method parameters (card defaults updated by the request).
        seed: the seed used.
        backward_passes: backward passes through the denoiser (gradient steps that
            differentiate through it: guidance, embedding or weight optimisation), counted by
            :class:`~editeval.core.nfe.NFECounter`; 0 for a method that takes no gradient.
        intermediates: anything worth keeping (inverted latents, masks, ...), by name; the
            input warnings again under ``"warnings"`` (when there are any), so a run stores them;
            on CUDA the edit's peak allocated device memory under ``"peak_memory_mib"`` (MiB).
        warnings: what the edit noted about its inputs (an input the method does not use, a
            truncated prompt, identical prompts, a dataset's full mask taken as none), one
            sentence each; each was also issued as an :class:`editeval.editing.EditInputWarning`.
    """

    image: Image.Image
    model_image: Image.Image
    method: str
    model: str
    nfe: int
    uncached_nfe: int
    wall_seconds: float
    params: dict[str, Any]
    seed: int
    backward_passes: int = 0
    intermediates: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EditInputs:
    """A request's inputs as a method sees them: images already at the model's resolution.

    Attributes:
        image: RGB source image, sides multiples of 8 (the model's resolution).
        source_prompt, target_prompt, instruction: as in the request, stripped, within the text
            encoder's token limit ("" when not given, or when the method does not use it).
        task: EditEval task id or ``None``.
        mask: edit region, mode "L" with values 0/255 (255 = edit), same size as ``image``, with
            both values present (all 255 only for a dataset's whole-image edit), or ``None``;
            grey levels 0..255 (per-pixel strengths) for a method whose card reads soft masks
            (``soft_mask``).
        reference: RGB reference image at the same size, or ``None``.
        inversion_cache: an :class:`~editeval.diffusion.inversion_cache.InversionCache` shared by
            the methods of a run, or ``None`` (inversions are then computed every time).
    """

    image: Image.Image
    source_prompt: str = ""
    target_prompt: str = ""
    instruction: str = ""
    task: str | None = None
    mask: Image.Image | None = None
    reference: Image.Image | None = None
    inversion_cache: Any = None


@dataclass
class MethodOutput:
    """What a method function returns: the edit at the model's resolution, plus intermediates."""

    image: Image.Image
    intermediates: dict[str, Any] = field(default_factory=dict)
