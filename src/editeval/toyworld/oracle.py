"""The toy world's oracle: parse an image back into a scene, and judge edits against ground truth.

Parsing uses classical vision on the known palette, in this order:

1. Style. *pixel* when, along x and along y each, neighbouring pixels inside the 2x2 blocks of the
   32x32 grid differ far less than pixels across block borders (ratio < 0.5; one axis alone is not
   enough: stripes are blocky along y); *night* when the median luminance is below 110
   (photo scenes: 130 and above; night: 90 and below); else *photo*. A night image is un-styled by
   inverting its gain and tint before colours are read.
2. Objects: pixels whose saturation (max - min) / max exceeds 0.6 (backgrounds stay below 0.5,
   object colours and their shades above 0.7). Objects never cross their slot's column band, so the
   largest connected component in each band is that slot's object (components under 12 px at 64 px
   are noise).
3. Per object: the colour is the palette colour nearest to the median of its brighter pixels;
   shape, pose and size by analysis by synthesis: every (shape, pose, size) is rendered at the
   object's slot and height over the measured background colour, styled and thresholded like the
   image, and the best overlap (IoU, at least 0.5) wins; the texture is the one whose expected
   shade pattern (plain, striped, dotted) best fits the brightness inside the object.
4. Background: the palette background nearest to the median colour of the non-object pixels.

Edit scores, like an LMM judge's (integers 1..10), with S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real:

- accuracy = 1 + 9 x (share of the edited attributes, those that differ between the source and the
  target scene, that hold in the output); ``success`` means all of them hold.
- preservation = PSNR of the unedited region (outside the mask) against the source, mapped
  linearly from 10 dB (1) to 35 dB (10).
- quality = 1 + 9 x (share of the target scene's attributes that hold in the output).
- realism = 10 when the output parses as a valid scene (1-3 objects, a known background, every
  object's attributes recognised), minus 3 per violation, at least 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from editeval.core.lmm_score import FACTORS, overall

from editeval.toyworld.scenes import (
    BACKGROUNDS,
    COLOURS,
    NIGHT_GAIN,
    NIGHT_TINT,
    POSES,
    SHADE,
    SHAPES,
    SIZES,
    SLOT_BANDS,
    SLOTS,
    SUPERSAMPLE,
    TEXTURES,
    Scene,
    ToyObject,
    apply_style,
    attributes,
    downsample,
    footprint,
    pattern,
)

_BACKGROUND_MEANS = {k: (np.array(a) + np.array(b)) / 2 for k, (a, b) in BACKGROUNDS.items()}
_PALETTE = {k: np.array(v, dtype=np.float64) for k, v in COLOURS.items()}
SATURATION = 0.6  # object pixels are more saturated than this, background pixels less


@dataclass
class ParsedObject:
    """An object read from an image; attributes are ``None`` when they could not be recognised."""

    slot: str
    shape: str | None
    colour: str | None
    texture: str | None
    size: str | None
    pose: str | None
    area: int


@dataclass
class ParsedScene:
    """What the oracle sees in an image."""

    style: str
    background: str
    objects: dict[str, ParsedObject] = field(default_factory=dict)

    def attributes(self) -> dict[str, str | None]:
        """Flat attributes in the format of :func:`editeval.toyworld.scenes.attributes`."""
        flat: dict[str, str | None] = {"background": self.background, "style": self.style}
        for slot in SLOTS:
            obj = self.objects.get(slot)
            flat[f"{slot}.present"] = "yes" if obj else "no"
            for key in ("shape", "colour", "texture", "size", "pose"):
                flat[f"{slot}.{key}"] = getattr(obj, key) if obj else None
        return flat


def detect_style(image: np.ndarray) -> str:
    """``pixel``, ``night`` or ``photo`` for a uint8 RGB image (see the module docstring)."""
    pixels = image.astype(np.float64)
    side = image.shape[0]
    block = max(1, side // 32)
    if block >= 2:
        blocky = []
        for rows in (pixels, pixels.swapaxes(0, 1)):  # along x, then along y
            within = np.abs(rows[:, 1::block] - rows[:, 0::block]).mean()
            across = np.abs(rows[:, block::block] - rows[:, block - 1:-1:block]).mean()
            blocky.append(within < 0.5 * across)
        if all(blocky):
            return "pixel"
    luminance = pixels @ np.array([0.299, 0.587, 0.114])
    return "night" if np.median(luminance) < 110 else "photo"


def unstyle(image: np.ndarray, style: str) -> np.ndarray:
    """Float RGB with the style's colour change undone (night); pixel art keeps its colours."""
    pixels = image.astype(np.float64)
    if style == "night":
        return np.clip((pixels - np.array(NIGHT_TINT)) / NIGHT_GAIN, 0, 255)
    return pixels


def _nearest(colour: np.ndarray, palette: dict[str, np.ndarray]) -> str:
    return min(palette, key=lambda k: float(np.sum((palette[k] - colour) ** 2)))


def _candidates() -> list[tuple[str, str | None, str]]:
    """Every (shape, pose, size) an object can have."""
    return [(shape, pose, size) for shape in SHAPES for pose in POSES.get(shape, (None,))
            for size in SIZES]


def _styled_fraction(layer: np.ndarray, style: str) -> np.ndarray:
    """Per-pixel fraction of a supersampled boolean layer, in pixel-art blocks when so styled."""
    fraction = downsample(layer.astype(np.float64), SUPERSAMPLE)
    return apply_style(fraction[..., None], style)[..., 0] if style == "pixel" else fraction


def _match_shape(component: np.ndarray, slot: str, style: str, colour: np.ndarray,
                 background: np.ndarray) -> tuple[tuple, float]:
    """Analysis by synthesis: the (shape, pose, size) whose rendering over the local background
    colour, thresholded like the image, best overlaps ``component`` (IoU)."""
    side = component.shape[0]
    ys = np.nonzero(component.any(1))[0]
    y = (ys.min() + ys.max() + 1) / 2 / side
    best, best_iou = None, -1.0
    for shape, pose, size in _candidates():
        obj = ToyObject(shape, "red", "plain", size, slot, y, pose)
        cover = _styled_fraction(footprint(obj, side * SUPERSAMPLE), style)[..., None]
        template = _saturation(cover * colour + (1 - cover) * background) > SATURATION
        iou = (template & component).sum() / max(1, (template | component).sum())
        if iou > best_iou:
            best, best_iou = (shape, pose, size), iou
    return best, best_iou


def _saturation(pixels: np.ndarray) -> np.ndarray:
    high = pixels.max(-1)
    return (high - pixels.min(-1)) / np.maximum(high, 1.0)


def _match_texture(brightness: np.ndarray, core: np.ndarray, colour: str, style: str) -> str:
    """The texture whose expected brightness pattern best fits the object's core pixels."""
    side = brightness.shape[0]
    peak = _PALETTE[colour].max()
    errors = {}
    for texture in TEXTURES:
        shaded = _styled_fraction(pattern(texture, side * SUPERSAMPLE), style)
        expected = peak * (1 - (1 - SHADE) * shaded)
        errors[texture] = float(np.mean((expected[core] - brightness[core]) ** 2))
    return min(errors, key=errors.get)


def parse(image: np.ndarray) -> ParsedScene:
    """Read a scene from a square uint8 RGB image (any size that is a multiple of 32)."""
    side = image.shape[0]
    style = detect_style(image)
    pixels = unstyle(image, style)
    high = pixels.max(-1)
    is_object = _saturation(pixels) > SATURATION
    background = np.median(pixels[~ndimage.binary_dilation(is_object, iterations=2)], axis=0) \
        if (~is_object).sum() > side else np.median(pixels.reshape(-1, 3), axis=0)
    min_area = 12 * (side / 64) ** 2
    objects: dict[str, ParsedObject] = {}
    for slot, (left, right) in SLOT_BANDS.items():
        band = np.zeros_like(is_object)
        band[:, round(left * side):round(right * side)] = True
        labels, count = ndimage.label(is_object & band, structure=np.ones((3, 3)))
        if count == 0:
            continue
        areas = ndimage.sum(np.ones_like(labels), labels, index=range(1, count + 1))
        best = int(np.argmax(areas)) + 1
        if areas[best - 1] < min_area:
            continue
        component = ndimage.binary_fill_holes(labels == best)
        colours = pixels[component]
        bright = colours[colours.max(-1) >= np.percentile(colours.max(-1), 60)]
        colour = _nearest(np.median(bright, axis=0), _PALETTE)
        (shape, pose, size), iou = _match_shape(component, slot, style, _PALETTE[colour],
                                                background)
        if iou < 0.5:
            shape = pose = size = None
        core = ndimage.binary_erosion(component, iterations=max(1, side // 64))
        texture = _match_texture(high, core if core.sum() >= 4 else component, colour, style)
        objects[slot] = ParsedObject(slot, shape, colour, texture, size, pose,
                                     int(component.sum()))
    return ParsedScene(style, _nearest(background, _BACKGROUND_MEANS), objects)


def attribute_accuracy(image: np.ndarray, scene: Scene) -> float:
    """Share of ``scene``'s attributes (see :func:`scenes.attributes`) that hold in ``image``."""
    expected, seen = attributes(scene), parse(image).attributes()
    return float(np.mean([seen[k] == v for k, v in expected.items()]))


@dataclass
class EditScore:
    """The oracle's judgement of one edit; sub-scores are integers 1..10."""

    accuracy: int
    preservation: int
    quality: int
    realism: int
    success: bool
    edited_correct: float  # share of edited attributes that hold
    unedited_psnr: float  # dB, outside the mask, against the source

    @property
    def overall(self) -> float:
        """S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real."""
        return overall({factor: getattr(self, factor) for factor in FACTORS})


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of two uint8 images over ``mask`` (True = counted; all pixels when None)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        diff = diff[mask]
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _to_score(fraction: float) -> int:
    return int(np.clip(round(1 + 9 * fraction), 1, 10))


def score_edit(output: np.ndarray, source_image: np.ndarray, source: Scene, target: Scene,
               mask: np.ndarray) -> EditScore:
    """Judge ``output`` (uint8 RGB, same size as the source) as an edit from ``source`` to ``target``.

    ``mask``: bool, True where the edit may change pixels. See the module docstring for formulas.
    """
    before, after = attributes(source), attributes(target)
    parsed = parse(output)
    seen = parsed.attributes()
    edited = [k for k in after if after[k] != before[k]]
    edited_correct = float(np.mean([seen[k] == after[k] for k in edited])) if edited else 1.0
    target_correct = float(np.mean([seen[k] == v for k, v in after.items()]))
    unedited = psnr(output, source_image, ~mask) if (~mask).any() else float("inf")
    preservation = 10 if not np.isfinite(unedited) else int(
        np.clip(round(1 + 9 * (unedited - 10) / 25), 1, 10))
    violations = int(not 1 <= len(parsed.objects) <= 3)
    violations += sum(any(getattr(o, k) is None for k in ("shape", "colour", "texture"))
                      for o in parsed.objects.values())
    return EditScore(
        accuracy=_to_score(edited_correct),
        preservation=preservation,
        quality=_to_score(target_correct),
        realism=max(1, 10 - 3 * violations),
        success=edited_correct == 1.0,
        edited_correct=edited_correct,
        unedited_psnr=unedited,
    )
