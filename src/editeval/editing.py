"""``edit()``: run one registered method on one request.

This is the one place that prepares inputs (loading, the resolution policy, masks), seeds the
generator, counts NFE at the denoiser and times the call, so every method gets them the same way.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from editeval.core.nfe import count_nfe, denoiser
from editeval.core.registry import get_method
from editeval.core.types import EditInputs, EditRequest, EditResult
from editeval.data.images import fit_to_resolution, load_image, load_mask


class EditInputError(ValueError):
    """A request lacks an input its method needs, or holds one it cannot use."""


_FLAGS = {
    "source_prompt": "--source-prompt TEXT",
    "target_prompt": "--target-prompt TEXT",
    "instruction": "--instruction TEXT",
    "mask": "--mask FILE",
    "reference": "--reference FILE",
}


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


def prepare_inputs(request: EditRequest, resolution: int, needs: tuple[str, ...] = (),
                   inversion_cache: Any = None,
                   optional: tuple[str, ...] = ()) -> tuple[EditInputs, Any]:
    """Load the request's images and bring them to ``resolution``; returns the inputs and the
    :class:`~editeval.data.images.Geometry` that maps results back to the source size.

    The mask and the reference image are loaded only when ``needs`` (the method's required
    inputs) or ``optional`` (its optional ones) names them: a method that ignores masks is never
    refused for an empty or full one, and an optional mask may be empty or full (a benchmark
    passes every sample's mask, full ones included; the method decides what they mean).
    """
    image, geometry = fit_to_resolution(load_image(request.image), resolution)
    mask = None
    if request.mask is not None and ("mask" in needs or "mask" in optional):
        lenient = "mask" not in needs
        mask = load_mask(request.mask, size=image.size, allow_empty=lenient, allow_full=lenient)
    reference = None
    if request.reference is not None and ("reference" in needs or "reference" in optional):
        reference = load_image(request.reference).resize(image.size)
    inputs = EditInputs(
        image=image,
        source_prompt=request.source_prompt,
        target_prompt=request.target_prompt,
        instruction=request.instruction,
        task=request.task,
        mask=mask,
        reference=reference,
        inversion_cache=inversion_cache,
    )
    return inputs, geometry


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
        An :class:`EditResult` with the edit at the source's size and at the model's, its NFE and time.

    Raises:
        KeyError: unknown method. ValueError: unknown or ill-typed parameter.
        EditInputError: a required input is missing, or ``pipe`` is not of the method's model
            kind. ImageLoadError / MaskError: unreadable inputs.
        ModelNotAvailableError: the model cannot be loaded.
    """
    registered = get_method(method)
    card = registered.card
    params = card.resolve_params(request.params)
    missing = [name for name in card.inputs if not getattr(request, name)]
    if missing:
        needs = ", ".join(f"{name.replace('_', ' ')} ({_FLAGS[name]})" for name in missing)
        raise EditInputError(f"method {card.name!r} needs {needs}")
    if pipe is None:
        from editeval.models import load_pipeline

        pipe = load_pipeline(model, card.model_kind, device=device, dtype=dtype)
    check_model_kind(pipe, card.name, card.model_kind)
    inputs, geometry = prepare_inputs(request, model_resolution(pipe), card.inputs,
                                      inversion_cache, card.optional_inputs)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with count_nfe(denoiser(pipe)) as counter:
        start = time.perf_counter()
        output = registered.fn(pipe, inputs, generator, **params)
        wall = time.perf_counter() - start
    return EditResult(
        image=geometry.to_source(output.image),
        model_image=output.image,
        method=card.name,
        model=str(pipe.name_or_path),
        nfe=counter.nfe,
        uncached_nfe=counter.uncached,
        wall_seconds=wall,
        params=params,
        seed=request.seed,
        intermediates=output.intermediates,
    )
