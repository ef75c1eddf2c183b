"""Image and mask I/O for diffusion image editing.

Loading
    :func:`load_image` turns a file path, encoded bytes, a PIL image or a numpy
    array into a new 8-bit RGB :class:`PIL.Image.Image`: EXIF orientation is
    applied, transparency is composited over white, and every Pillow mode
    (palette, grayscale, 16-bit, float, CMYK, YCbCr, LAB, HSV) is converted to
    8-bit RGB. ICC profiles are not applied. Every failure is raised as
    :class:`ImageLoadError`, whose message names the source and the reason.

Resolution policy
    :func:`fit_to_resolution` resizes an image, keeping its aspect ratio, so
    that its LONGER side equals ``resolution``; each side is then rounded to
    the nearest multiple of ``multiple`` (at least ``multiple``). There is no
    cropping and no padding: the rounding stretches each side by at most
    ``multiple / 2`` pixels, so the aspect distortion stays below one
    ``multiple`` of pixels per side. Lanczos is used when either side shrinks,
    bicubic when the image only grows. The returned :class:`Geometry` maps
    images between the source and the model size in both directions, so an
    edit made at the model size can be compared pixel-for-pixel with its
    source.

Masks
    :func:`load_mask` returns a binary mode-``"L"`` mask with values 0 (keep)
    and 255 (edit): white marks the region to edit; or a soft mask that keeps
    its grey levels (per-pixel edit strength, for methods such as Differential
    Diffusion). :func:`same_aspect` tells whether a mask has its image's aspect
    ratio.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MASK_RESAMPLING",
    "MAX_PIXELS",
    "Geometry",
    "ImageLoadError",
    "ImageSource",
    "MaskError",
    "fit_to_resolution",
    "load_image",
    "load_mask",
    "mask_to_array",
    "same_aspect",
    "source_name",
]

MAX_PIXELS = 64_000_000
"""Default largest ``width * height`` accepted by :func:`load_image`."""

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray
"""What :func:`load_image` and :func:`load_mask` accept."""

# Modes whose pixels carry an alpha channel. "P" is included because a palette
# may hold per-entry alpha; images whose alpha turns out opaque drop it again.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA", "P"})
# Modes with more than 8 bits per sample; converted through numpy (Pillow's own
# conversion to "L" clips instead of scaling).
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


class ImageLoadError(ValueError):
    """An image could not be loaded.

    The message always names the source (the file path, or ``"<bytes>"``,
    ``"<PIL image>"``, ``"<array>"``), the reason and, where there is one, the
    fix.
    """


class MaskError(ValueError):
    """A mask is unusable: empty, full, or not binary."""


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load an image as a new 8-bit RGB PIL image.

    Args:
        source: One of

            * ``str`` or ``os.PathLike``: path of an image file in any format
              Pillow reads (only the first frame of an animation is used);
            * ``bytes``: the encoded contents of such a file;
            * ``PIL.Image.Image`` in any mode; it is not modified;
            * ``numpy.ndarray`` of shape ``(H, W)``, ``(H, W, 1)`` (gray),
              ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA) and dtype ``uint8``
              (taken as is), ``uint16`` (divided by 257 and rounded, so
              0..65535 maps to 0..255), ``bool`` (False/True -> 0/255) or
              floating point with every value in [0, 1] (multiplied by 255 and
              rounded half up: 0.5 -> 128).
        max_pixels: Largest accepted ``width * height``. For files and bytes it
            is checked on the header, before any pixel data is decoded
            (protection against decompression bombs).

    Returns:
        A new ``PIL.Image.Image`` of mode ``"RGB"`` (uint8, 0..255) whose size
        is ``(width, height)`` after EXIF orientation has been applied.

    Conversions:
        * EXIF orientation is applied (``PIL.ImageOps.exif_transpose``).
        * Transparency (modes RGBA, LA, PA, P with a transparent index or
          palette alpha, and ``info["transparency"]`` colour keys) is
          composited over white: ``round((c * a + 255 * (255 - a)) / 255)``,
          so red at alpha 128 becomes (255, 127, 127).
        * 16-bit modes (``I;16``, ``I;16B``, 16-bit PNG/TIFF) are scaled
          0..65535 -> 0..255; mode ``I`` is read as 16-bit data (values
          clipped to 0..65535, then scaled); mode ``F`` follows the float
          array rule (values must be in [0, 1]).
        * ``1``, ``L``, CMYK, YCbCr, LAB and HSV are converted with Pillow.

    Raises:
        ImageLoadError: the file is missing, a directory, unreadable, of an
            unrecognised format, corrupt or truncated; the image exceeds
            ``max_pixels`` (or Pillow's hard limit of
            ``2 * PIL.Image.MAX_IMAGE_PIXELS``), is empty, or has an
            unsupported mode; an array has an unsupported shape or dtype, or
            float values outside [0, 1].
        TypeError: ``source`` is none of the accepted types.
    """
    image = _decode(source, max_pixels)
    return _over_white(image) if image.mode == "RGBA" else image


def source_name(source: object) -> str:
    """How error messages name ``source``: a path in quotes (``'photo.jpg'``), or ``<bytes>``,
    ``<PIL image>``, ``<array>``.

    Raises:
        TypeError: ``source`` is none of the types :func:`load_image` accepts.
    """
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, bytes):
        return "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    raise TypeError(
        "expected a file path, bytes, a PIL image or a numpy array, "
        f"got {type(source).__name__}"
    )


def _fail(name: str, reason: str) -> ImageLoadError:
    """The error for ``name``, which says what failed to load: ``"image 'x.png'"``, ``"mask <bytes>"``."""
    return ImageLoadError(f"cannot load {name}: {reason}")


def _decode(source: ImageSource, max_pixels: int, kind: str = "image") -> Image.Image:
    """Decode ``source`` into a new, oriented 8-bit image of mode RGB or RGBA.

    The result is RGBA only when some pixel is not fully opaque. Errors name the source as a
    ``kind`` (``"image"``, ``"mask"``).
    """
    name = f"{kind} {source_name(source)}"
    if isinstance(source, Image.Image):
        return _normalise(_read(source, name, max_pixels), name)
    if isinstance(source, np.ndarray):
        return _normalise(_read(_array_to_image(source, name), name, max_pixels), name)
    if isinstance(source, bytes):
        file: Path | io.BytesIO = io.BytesIO(source)
    else:
        file = Path(source)
        if not file.exists():
            raise _fail(name, "file not found; check the path")
        if file.is_dir():
            raise _fail(name, "it is a directory, not an image file")
    try:
        # max_pixels supersedes Pillow's DecompressionBombWarning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(file)
    except Image.DecompressionBombError as err:
        raise _fail(
            name,
            f"{err} Pillow refuses images above 2 * PIL.Image.MAX_IMAGE_PIXELS "
            "whatever max_pixels is; raise PIL.Image.MAX_IMAGE_PIXELS only if "
            "you trust this file",
        ) from err
    except UnidentifiedImageError as err:
        raise _fail(
            name, "not a recognised image format (unsupported format, or not an image)"
        ) from err
    except OSError as err:
        raise _fail(name, f"cannot read the file ({err})") from err
    with opened:
        oriented = _read(opened, name, max_pixels)
    return _normalise(oriented, name)


def _read(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Check the size of (possibly lazy) ``image``, decode it, apply EXIF orientation.

    Returns a new image; ``image`` itself is only loaded, never modified.
    """
    width, height = image.size
    if width * height > max_pixels:
        raise _fail(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, above the limit "
            f"of {max_pixels:,} pixels; if you trust this source, pass a larger "
            f"max_pixels= (e.g. max_pixels={width * height})",
        )
    if width == 0 or height == 0:
        raise _fail(name, f"image is empty ({width}x{height})")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as err:  # Pillow decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise _fail(
            name,
            f"cannot decode the pixel data ({type(err).__name__}: {err}); "
            "the data is corrupt or truncated, re-export or re-download it",
        ) from err


def _normalise(image: Image.Image, name: str) -> Image.Image:
    """Convert a decoded image of any mode to a new 8-bit RGB or RGBA image."""
    if image.mode in _HIGH_DEPTH_MODES:
        samples = np.asarray(image)
        if image.mode == "I":
            samples = np.clip(samples, 0, 65535).astype(np.uint16)
        image = _array_to_image(samples, name)
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    try:
        converted = image.convert("RGBA" if has_alpha else "RGB")
    except (ValueError, OSError) as err:
        raise _fail(
            name,
            f"unsupported image mode {image.mode!r} ({err}); convert it to RGB first",
        ) from err
    if has_alpha and converted.getchannel("A").getextrema() == (255, 255):
        return converted.convert("RGB")
    return converted


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """Convert an array (shape and dtype rules of :func:`load_image`) to an L/RGB/RGBA image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise _fail(
            name,
            f"unsupported array shape {array.shape}; expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4)",
        )
    if array.size == 0:
        raise _fail(name, f"array is empty (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.uint16):
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise _fail(
                name,
                f"float values range over [{low:g}, {high:g}], but float images must "
                "be finite and lie in 0..1 (divide 0..255 data by 255)",
            )
        array = np.floor(array.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise _fail(
            name,
            f"unsupported array dtype {array.dtype}; expected uint8, uint16, bool "
            "or float in 0..1 (cast integer data to uint8)",
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _over_white(image: Image.Image) -> Image.Image:
    """Composite an RGBA image over white: ``round((c * a + 255 * (255 - a)) / 255)``."""
    rgba = np.asarray(image, dtype=np.uint32)
    colour, alpha = rgba[..., :3], rgba[..., 3:]
    flat = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(flat.astype(np.uint8))


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Geometry:
    """How an image was resized for a model, and how to map images back.

    Attributes:
        source_size: ``(width, height)`` of the source image, in pixels.
        model_size: ``(width, height)`` of the image given to the model; each
            side a multiple of the ``multiple`` used by
            :func:`fit_to_resolution`.
    """

    source_size: tuple[int, int]  # (width, height) of the source
    model_size: tuple[int, int]  # (width, height) at the model

    def to_model(self, image: Image.Image) -> Image.Image:
        """Resize an image of ``source_size`` to ``model_size``.

        Uses Lanczos when either side shrinks, bicubic otherwise; the mode is
        kept. Returns a new image.

        Raises:
            ValueError: ``image.size != source_size``.
        """
        return _resize(image, self.source_size, self.model_size, "source")

    def to_source(self, image: Image.Image) -> Image.Image:
        """Resize an image of ``model_size`` back to ``source_size``.

        The inverse of :meth:`to_model`, so that an edit made at the model
        size can be compared pixel-for-pixel with its source. Same filter
        rule; returns a new image of the same mode.

        Raises:
            ValueError: ``image.size != model_size``.
        """
        return _resize(image, self.model_size, self.source_size, "model")


def fit_to_resolution(
    image: Image.Image, resolution: int, multiple: int = 8
) -> tuple[Image.Image, Geometry]:
    """Resize ``image`` for a model following the module's resolution policy.

    The longer side becomes ``resolution``; the shorter side keeps the aspect
    ratio and is rounded to the nearest multiple of ``multiple`` (half up, at
    least ``multiple``). No crop, no padding: the shorter side may be
    stretched by at most ``multiple / 2`` pixels. Lanczos is used when either
    side shrinks, bicubic when the image only grows.

    Args:
        image: Any PIL image (typically from :func:`load_image`); not modified.
        resolution: Target length of the longer side, in pixels; a positive
            multiple of ``multiple``.
        multiple: Each output side is a multiple of this (e.g. 8 for a VAE
            that downsamples by 8); positive.

    Returns:
        ``(resized, geometry)``: a new image of size ``geometry.model_size``
        and the same mode, and the :class:`Geometry` relating both sizes.
        E.g. 1024x768 at resolution 512 -> 512x384.

    Raises:
        ValueError: ``multiple`` is not a positive integer, ``resolution`` is
            not a positive multiple of it, or ``image`` is empty.
    """
    if not isinstance(multiple, numbers.Integral) or multiple <= 0:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if not isinstance(resolution, numbers.Integral) or resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"resolution must be a positive multiple of {multiple}, got {resolution!r}"
        )
    resolution, multiple = int(resolution), int(multiple)
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"cannot resize an empty image ({width}x{height})")
    scale = resolution / max(width, height)

    def snap(side: int) -> int:
        return max(multiple, math.floor(side * scale / multiple + 0.5) * multiple)

    geometry = Geometry(source_size=(width, height), model_size=(snap(width), snap(height)))
    return geometry.to_model(image), geometry


def _resize(
    image: Image.Image, expected: tuple[int, int], target: tuple[int, int], what: str
) -> Image.Image:
    """Resize ``image`` (which must have size ``expected``) to ``target``."""
    expected, target = tuple(expected), tuple(target)
    if image.size != expected:
        raise ValueError(
            f"expected an image of the {what} size {expected[0]}x{expected[1]}, "
            f"got {image.size[0]}x{image.size[1]}"
        )
    if target == expected:
        return image.copy()
    shrinks = target[0] < expected[0] or target[1] < expected[1]
    resample = Image.Resampling.LANCZOS if shrinks else Image.Resampling.BICUBIC
    return image.resize(target, resample)


# --------------------------------------------------------------------------- #
# Masks
# --------------------------------------------------------------------------- #


def load_mask(
    source: ImageSource,
    size: tuple[int, int] | None = None,
    *,
    threshold: int = 128,
    allow_empty: bool = False,
    allow_full: bool = False,
    soft: bool = False,
) -> Image.Image:
    """Load a binary edit mask: white (255) = edit, black (0) = keep; or, with ``soft``, a soft
    mask whose grey levels are kept (a per-pixel edit strength, 255 = full edit).

    The source is decoded like :func:`load_image` (same accepted types, EXIF
    orientation, 16-bit/float rules, ``MAX_PIXELS`` limit); then a grey level
    is taken per pixel:

    * Alpha as the mask: if the source has transparency and all its visible
      pixels (alpha > 0) share one colour, as in a brush-stroke layer, the
      alpha channel is the grey level (opaque = edit).
    * Otherwise: the luminance (ITU-R 601, Pillow's ``"L"``) of the image
      composited over white, so transparent pixels of a coloured image count
      as edit regions.

    The grey level is binarised with ``grey >= threshold`` -> 255, and the
    result resized to ``size`` with nearest-neighbour sampling, so it stays
    binary. A soft mask keeps its grey levels and is resized bilinearly.

    Args:
        source: Anything :func:`load_image` accepts.
        size: ``(width, height)`` to resize the mask to, e.g. the size of the
            image it belongs to; ``None`` keeps the source size.
        threshold: Grey level (1..255) from which a pixel counts as edit.
        allow_empty: Accept a mask with no edit pixel.
        allow_full: Accept a mask with only edit pixels.
        soft: Keep the grey levels 0..255 instead of binarising (``threshold`` unused).

    Returns:
        A new ``PIL.Image.Image`` of mode ``"L"`` with values only 0 and 255 (any of 0..255 when
        ``soft``).

    Raises:
        ImageLoadError: the source cannot be loaded (see :func:`load_image`); the message
            names it as a mask (``cannot load mask 'm.png': ...``).
        MaskError: the mask is all 0 and not ``allow_empty``, or all 255 and
            not ``allow_full``.
        ValueError: ``threshold`` is outside 1..255 or ``size`` is not two
            positive integers.
        TypeError: ``source`` is none of the accepted types.
    """
    if not isinstance(threshold, numbers.Integral) or not 1 <= threshold <= 255:
        raise ValueError(f"threshold must be an integer in 1..255, got {threshold!r}")
    if size is not None and not (
        len(size) == 2 and all(isinstance(s, numbers.Integral) and s > 0 for s in size)
    ):
        raise ValueError(f"size must be (width, height) with positive integers, got {size!r}")
    name = source_name(source)
    grey = _mask_grey(_decode(source, MAX_PIXELS, kind="mask"))
    mask = grey if soft else grey.point([0] * int(threshold) + [255] * (256 - int(threshold)))
    if size is not None:
        mask = mask.resize((int(size[0]), int(size[1])), MASK_RESAMPLING[soft])
    low, high = mask.getextrema()
    if high == 0 and not allow_empty:
        reach = "is above 0" if soft else f"reaches threshold {threshold}"
        raise MaskError(
            f"mask {name} is empty: no pixel {reach}, so there "
            "is nothing to edit; editing needs a mask with both edit (white) and "
            "keep (black) regions (pass allow_empty=True to accept it)"
        )
    if low == 255 and not allow_full:
        reach = "is 255" if soft else f"reaches threshold {threshold}"
        raise MaskError(
            f"mask {name} is full: every pixel {reach}, so "
            "nothing is kept; editing needs a mask with both edit (white) and keep "
            "(black) regions (pass allow_full=True to accept it)"
        )
    return mask


MASK_RESAMPLING = {False: Image.Resampling.NEAREST, True: Image.Resampling.BILINEAR}
"""How a mask is resized, by softness: nearest neighbour keeps a binary mask binary; a soft mask
(grey levels as strengths) is resized bilinearly."""


def _mask_grey(image: Image.Image) -> Image.Image:
    """Grey level ("L") of a decoded RGB/RGBA mask image, per :func:`load_mask`."""
    if image.mode == "RGBA":
        rgba = np.asarray(image)
        visible = rgba[..., :3][rgba[..., 3] > 0]
        if (visible == visible[:1]).all():  # one colour (or none visible)
            return image.getchannel("A")
        image = _over_white(image)
    return image.convert("L")


def same_aspect(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two ``(width, height)`` sizes have the same aspect ratio, up to the pixel of
    rounding that scaling one to the other's width or height leaves (120x90 and 61x45 match,
    120x90 and 60x47 do not): a mask saved at another resolution of its image passes, a mask of
    another shape does not.
    """
    (width, height), (other_width, other_height) = size, other
    return (abs(width * other_height / other_width - height) <= 1
            or abs(other_width * height / width - other_height) <= 1)


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """Convert a binary mask to a boolean array.

    Args:
        mask: A mode-``"L"`` image with values only 0 and 255 (as returned by
            :func:`load_mask`), or a mode-``"1"`` image.

    Returns:
        A new ``numpy.ndarray`` of dtype ``bool`` and shape ``(H, W)``; True
        where the mask is white (edit).

    Raises:
        MaskError: ``mask`` has another mode or grey values other than 0/255.
    """
    if mask.mode == "1":
        return np.array(mask, dtype=bool)
    if mask.mode != "L" or any(mask.histogram()[1:255]):
        raise MaskError(
            f"expected a binary mask (mode 'L' with values 0/255, or mode '1'), got "
            f"mode {mask.mode!r} with values {mask.getextrema()}; load it with load_mask"
        )
    return np.asarray(mask) == 255
