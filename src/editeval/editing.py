"""``edit()``: run one registered method on one request.

This is the one place that prepares inputs (loading, the resolution policy, masks), seeds the
generator, counts NFE at the denoiser and times the call, so every method gets them the same way.
It also holds the input policy every method shares:

- Every input is checked before a model loads: the method and its parameters (names and types,
  against its card), the prompts, the image, the mask and the reference image, so a bad path or a
  typo is reported at once. Only a prompt's length waits for the pipeline (its tokenizer).
- Prompts: a prompt of only whitespace counts as not given, and a missing required one is refused
  naming its flag. A prompt with more tokens than the pipeline's text encoder takes
  (``tokenizer.model_max_length``: 77 for CLIP, start and end tokens included) is refused with its
  count, or cut at the last whole word that fits when the request asks (``truncate_prompts``).
  A prompt-pair method (one that needs a source and a target prompt, as Prompt-to-Prompt) given
  the same prompt twice (case and spacing aside) warns: there is nothing to edit.
- An input the method does not use (neither required nor optional on its card) is ignored with
  a warning, and not passed on; silently for a dataset's sample (``from_dataset``: the benchmark
  runner passes every field of every sample, whatever the method).
- A mask the method uses must mark pixels to edit (white) and pixels to keep (black): an all-black
  or all-white one is refused, naming the file, as is one whose edit region vanishes at the
  model's resolution. A mask must have the image's aspect ratio (at any resolution, up to a pixel
  of rounding) unless the request asks to stretch it (``resize_mask``). A dataset's mask
  (``from_dataset``) that is all white marks a whole-image edit, such as a style change: for a
  method whose mask is optional it means no mask; a method that needs a mask gets it as it is
  (edit everywhere).
- A mask is binarised (grey >= 128 is edit) and resized with nearest neighbour, except for a
  method whose card reads soft masks (``soft_mask``: grey levels as per-pixel strengths, as
  Differential Diffusion), which gets the grey levels, resized bilinearly.
- A method that extends the image (outpainting: its registered ``canvas``) gets the source on a
  canvas grown by the pixels ``canvas`` gives, the new area as its mask; the edit comes back at
  the canvas's size (larger than the source), with the source's pixels pasted back exactly where
  they were. Every other edit comes back at the source's size.
- Warnings are issued as :class:`EditInputWarning` (the command line prints each as one line) and
  kept in :attr:`EditResult.warnings` and in the result's intermediates under ``"warnings"``, so a
  benchmark run stores them with the job.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image, ImageOps

from editeval.core.nfe import count_nfe, denoiser
from editeval.core.registry import INPUTS, MethodCard, get_method
from editeval.core.types import EditInputs, EditRequest, EditResult
from editeval.data.images import (
    MASK_RESAMPLING,
    Geometry,
    MaskError,
    fit_to_resolution,
    load_image,
    load_mask,
    same_aspect,
    source_name,
)
from editeval.models.tokenizer import count_tokens, truncate_prompt


class EditInputError(ValueError):
    """A request lacks an input its method needs, or holds one it cannot use."""


class EditInputWarning(UserWarning):
    """An input is not used as given: ignored by the method, truncated, or taken as no mask."""


PROMPTS = ("source_prompt", "target_prompt", "instruction")
"""The request fields that hold text for the text encoder."""

_FLAGS = {
    "source_prompt": "--source-prompt TEXT",
    "target_prompt": "--target-prompt TEXT",
    "instruction": "--instruction TEXT",
    "mask": "--mask FILE",
    "reference": "--reference FILE",
}


def _label(name: str) -> str:
    return name.replace("_", " ")


# what each model kind's denoiser takes besides the noisy latents (in latent channels, c = the VAE's
# latent channels), and how to get the right checkpoint
_KINDS = {
    "text-to-image": (lambda c: c, "a text-to-image model", "use a suite name (--model sd15) or a "
                      "text-to-image checkpoint, not an instruction or inpainting one"),
    "instruction": (lambda c: 2 * c, "an instruction model", "use a suite's instruction "
                    "checkpoint (--model sd15) or an InstructPix2Pix checkpoint"),
    "inpainting": (lambda c: 2 * c + 1, "an inpainting model", "use a suite's inpainting "
                   "checkpoint (--model sd15) or an inpainting checkpoint"),
}


def check_model_kind(pipe: Any, method: str, model_kind: str) -> None:
    """Refuse a pipeline whose denoiser is not of ``model_kind``, told apart by its input channels:
    the VAE's latent channels c (text-to-image), 2c (instruction: the source's latents beside the
    noisy ones) or 2c + 1 (inpainting: latents, masked-image latents and the mask).

    Raises:
        EditInputError: the denoiser takes another number of input channels; the message says
            which checkpoint to use.
    """
    channels_of, label, fix = _KINDS[model_kind]
    channels = channels_of(int(pipe.vae.config.latent_channels))
    got = denoiser(pipe).config.in_channels
    if got != channels:
        raise EditInputError(f"{method} needs {label} ({channels}-channel denoiser), got a "
                             f"{got}-channel one: {fix}")


def model_resolution(pipe: Any) -> int:
    """The pipeline's native image side in pixels (denoiser sample size times the VAE factor)."""
    return int(denoiser(pipe).config.sample_size * pipe.vae_scale_factor)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check that needs no model (see :func:`check_request`).

    Attributes:
        image: the source image, RGB, at its own size.
        prompts: the prompts the method uses, stripped, by field name (:data:`PROMPTS`); ``""``
            for one not given or not used.
        mask: the mask the method uses, mode ``"L"`` (255 = edit; binary unless the card reads
            soft masks) at its own size, or ``None``; mask_name: how messages name it.
        reference: the reference image the method uses, RGB at its own size, or ``None``.
        warnings: the input warnings so far, one sentence each.
    """

    image: Image.Image
    prompts: dict[str, str]
    mask: Image.Image | None
    mask_name: str
    reference: Image.Image | None
    warnings: list[str]


def check_request(request: EditRequest, card: MethodCard) -> CheckedRequest:
    """Check and load everything of ``request`` that needs no model, following the input policy
    (module docstring): prompts present, images and mask readable, the mask usable.

    Raises:
        EditInputError: a required input is missing (whitespace-only prompts count as missing).
        ImageLoadError: the image, mask or reference cannot be read (the message says which).
        MaskError: the mask is all black or all white, or of another aspect ratio than the image.
    """
    notes: list[str] = []
    prompts = {name: (getattr(request, name) or "").strip() for name in PROMPTS}
    given = {name for name in PROMPTS if prompts[name]}
    given |= {name for name in ("mask", "reference") if getattr(request, name) is not None}
    missing = [name for name in card.inputs if name not in given]
    if missing:
        needs = ", ".join(f"{_label(name)} ({_FLAGS[name]})" for name in missing)
        raise EditInputError(f"method {card.name!r} needs {needs}")
    uses = set(card.inputs) | set(card.optional_inputs)
    ignored = [f"the {_label(name)} ({_FLAGS[name]})" for name in INPUTS
               if name in given and name not in uses]
    if ignored and not request.from_dataset:
        listed = ", ".join(ignored[:-1]) + " or " + ignored[-1] if len(ignored) > 1 else ignored[0]
        notes.append(f"{card.name} does not use {listed}; ignored")
    prompts = {name: text if name in uses else "" for name, text in prompts.items()}
    if ({"source_prompt", "target_prompt"} <= set(card.inputs)
            and _same_text(prompts["source_prompt"], prompts["target_prompt"])):
        notes.append(f"{card.name}: the source and target prompts are identical "
                     f"({prompts['target_prompt']!r}), so there is nothing to edit: the result is "
                     "the method's reconstruction of the source")
    image = load_image(request.image)
    mask, mask_name = None, ""
    if request.mask is not None and "mask" in uses:
        mask_name = source_name(request.mask)
        mask = load_mask(request.mask, allow_empty=True, allow_full=True, soft=card.soft_mask)
        if not request.resize_mask and not same_aspect(mask.size, image.size):
            (w, h), (iw, ih) = mask.size, image.size
            raise MaskError(
                f"mask {mask_name} is {w}x{h} (aspect {w / h:.3g}) but the image is {iw}x{ih} "
                f"({iw / ih:.3g}): make the mask from the image, or stretch it to the image with "
                "--resize-mask (resize_mask=True)")
        mask = _usable_mask(mask, mask_name, "", card, request, notes)
    reference = None
    if request.reference is not None and "reference" in uses:
        reference = load_image(request.reference)
    return CheckedRequest(image, prompts, mask, mask_name, reference, notes)


def _same_text(first: str, second: str) -> bool:
    """Equal up to case and spacing (what a CLIP tokenizer ignores); never for empty text."""
    return bool(first) and first.casefold().split() == second.casefold().split()


def _usable_mask(mask: Image.Image, name: str, where: str, card: MethodCard,
                 request: EditRequest, notes: list[str]) -> Image.Image | None:
    """``mask``, or ``None`` for a dataset's all-white optional mask; refuses an all-black one,
    and an all-white one not from a dataset. ``where`` qualifies the name (at the model's size)."""
    low, high = mask.getextrema()
    if high == 0:
        level = "above 0" if card.soft_mask else \
            "at grey level 128 or more (masks are binarised there: white = edit)"
        raise MaskError(f"mask {name}{where} is all black: no pixel is {level}, so it marks "
                        "nothing to edit; paint the region to edit white")
    if low < 255:
        return mask
    optional = "mask" in card.optional_inputs
    if request.from_dataset:  # a whole-image edit: no mask, or the full one for who needs one
        return None if optional else mask
    fix = ("leave --mask out to edit the whole image" if optional
           else f"{card.name} needs black where the image must be kept")
    raise MaskError(f"mask {name}{where} is all white: it keeps nothing; {fix}")


def fit_prompts(prompts: dict[str, str], tokenizer: Any, truncate: bool) -> tuple[dict[str, str],
                                                                                 list[str]]:
    """Check each prompt's length in ``tokenizer``'s tokens (start and end included) against its
    ``model_max_length`` (77 for CLIP); returns the prompts (over-long ones cut at the last whole
    word that fits when ``truncate``) and a warning per truncated prompt.

    Raises:
        EditInputError: a prompt is too long and ``truncate`` is false (the message gives its
            count), or cannot be cut at a word.
    """
    limit = tokenizer.model_max_length
    fitted, notes = dict(prompts), []
    for name, text in prompts.items():
        count = count_tokens(tokenizer, text) if text else 0
        if count <= limit:
            continue
        if not truncate:
            raise EditInputError(
                f"{_label(name)} ({_FLAGS[name]}) has {count} tokens, more than the text "
                f"encoder's {limit}; shorten it, or pass --truncate-prompts "
                "(truncate_prompts=True) to cut it at the last whole word that fits")
        try:
            fitted[name] = truncate_prompt(tokenizer, text, limit)
        except ValueError as err:
            raise EditInputError(f"{_label(name)} ({_FLAGS[name]}): {err}") from None
        notes.append(f"{_label(name)} truncated from {count} to "
                     f"{count_tokens(tokenizer, fitted[name])} tokens (the text encoder's "
                     f"limit): {fitted[name]!r}")
    return fitted, notes


def prepare_inputs(checked: CheckedRequest, card: MethodCard, request: EditRequest, pipe: Any,
                   inversion_cache: Any = None) -> tuple[EditInputs, Geometry, list[str]]:
    """Bring a checked request to ``pipe``: prompts fitted to its tokenizer (:func:`fit_prompts`),
    the image to its resolution (:func:`~editeval.data.images.fit_to_resolution`), the mask
    (nearest neighbour, so it stays binary, or bilinearly for a card that reads soft masks;
    checked again there) and the reference to the
    image's new size. Returns the inputs, the :class:`~editeval.data.images.Geometry` that maps
    results back to the source size, and the warnings this step adds.

    Raises:
        EditInputError: an over-long prompt (see :func:`fit_prompts`).
        MaskError: the mask's edit region vanishes at the model's resolution.
    """
    notes: list[str] = []
    prompts = checked.prompts
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None:
        prompts, notes = fit_prompts(prompts, tokenizer, request.truncate_prompts)
    image, geometry = fit_to_resolution(checked.image, model_resolution(pipe))
    mask = checked.mask
    if mask is not None:
        mask = mask.resize(image.size, MASK_RESAMPLING[card.soft_mask])
        where = f" at the model's {image.width}x{image.height}"
        mask = _usable_mask(mask, checked.mask_name, where, card, request, notes)
    reference = checked.reference.resize(image.size) if checked.reference is not None else None
    inputs = EditInputs(image=image, task=request.task, mask=mask, reference=reference,
                        inversion_cache=inversion_cache, **prompts)
    return inputs, geometry, notes


def extend_canvas(checked: CheckedRequest, border: tuple[int, int, int, int]) -> CheckedRequest:
    """``checked`` with its image on a canvas grown by ``border`` pixels (left, top, right,
    bottom), the new area mid-grey (0 in a VAE's [-1, 1]), and that area as its mask (255)."""
    left, top = border[:2]
    width, height = checked.image.size
    image = ImageOps.expand(checked.image, border, fill=(128, 128, 128))
    mask = Image.new("L", image.size, 255)
    mask.paste(0, (left, top, left + width, top + height))
    return replace(checked, image=image, mask=mask, mask_name="of the canvas's new area")


def _warn(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, EditInputWarning, stacklevel=3)  # at the caller of edit()


def edit(
    request: EditRequest,
    method: str,
    *,
    pipe: Any = None,
    model: str = "sd15",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    inversion_cache: Any = None,
) -> EditResult:
    """Edit ``request.image`` with the registered ``method``.

    Args:
        request: what to edit (see :class:`EditRequest`).
        method: a registry name (``editeval methods`` lists them).
        pipe: a loaded diffusers pipeline of the kind the method's card names; loaded from ``model``
            when ``None`` (pass it to edit many images without reloading).
        model: suite name, short name, local path or hub id (see :func:`editeval.models.load_pipeline`).
        device, dtype: passed to ``load_pipeline`` when ``pipe`` is ``None``.
        inversion_cache: an :class:`~editeval.diffusion.inversion_cache.InversionCache` to reuse
            inversions across calls (the benchmark runner keeps one per run directory).

    Returns:
        An :class:`EditResult` with the edit at the source's size (a canvas method's: the
        extended canvas's) and at the model's, its NFE and time.

    Raises:
        KeyError: unknown method. ValueError: an unknown, ill-typed or out-of-range parameter.
        EditInputError: a required input is missing, a prompt is too long, or ``pipe`` is not
            of the method's model kind. ImageLoadError: an unreadable image, mask or reference.
        MaskError: an unusable mask (all black, all white, another aspect ratio).
        ModelNotAvailableError: the model cannot be loaded.
        Only the prompt length and the model kind are checked after the model loads.

    Warns:
        EditInputWarning: an input the method does not use, a truncated prompt, identical
            prompts for a prompt-pair method (each also in the result's ``warnings``).
    """
    registered = get_method(method)
    card = registered.card
    params = registered.resolve_params(request.params)
    checked = check_request(request, card)
    _warn(checked.warnings)
    source = checked.image
    if registered.canvas is not None:
        border = registered.canvas(source.size, **params)
        checked = extend_canvas(checked, border)
    if pipe is None:
        from editeval.models import load_pipeline

        pipe = load_pipeline(model, card.model_kind, device=device, dtype=dtype)
    check_model_kind(pipe, card.name, card.model_kind)
    inputs, geometry, notes = prepare_inputs(checked, card, request, pipe, inversion_cache)
    _warn(notes)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    cuda = torch.device(pipe.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(pipe.device)
    with count_nfe(denoiser(pipe)) as counter:
        start = time.perf_counter()
        output = registered.fn(pipe, inputs, generator, **params)
        wall = time.perf_counter() - start
    notes = [*checked.warnings, *notes]
    intermediates = {**output.intermediates, "warnings": notes} if notes else output.intermediates
    if cuda:  # the device reports it; on the CPU there is no comparable figure
        intermediates = {**intermediates,
                         "peak_memory_mib": round(torch.cuda.max_memory_allocated(pipe.device)
                                                  / 2**20, 1)}
    image = geometry.to_source(output.image)
    if registered.canvas is not None:
        image.paste(source, border[:2])
    return EditResult(
        image=image,
        model_image=output.image,
        method=card.name,
        model=str(pipe.name_or_path),
        nfe=counter.nfe,
        uncached_nfe=counter.uncached,
        wall_seconds=wall,
        params=params,
        seed=request.seed,
        backward_passes=counter.backward,
        intermediates=intermediates,
        warnings=notes,
    )
