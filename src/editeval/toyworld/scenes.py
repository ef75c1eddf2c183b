"""Toy-world scenes: sampling, anti-aliased rendering and captions.

A scene is a background (a low-frequency procedural texture: a vertical gradient plus two soft
waves, with its own seed), one to three objects in distinct horizontal slots (left, middle, right)
and a global style. Everything is deterministic from seeds, so an edited scene rendered with the same
seeds differs from its source only where the edit acts.

Objects: 5 shapes (circle, square, triangle, ellipse, diamond), 6 saturated colours, 3 surface
textures (plain, striped, dotted; the pattern uses a darker shade of the colour), 2 sizes, a slot,
a vertical position, and a pose for the shapes that have one (triangle pointing up or down, ellipse
standing or lying). Backgrounds are pale and desaturated (sky, grass, sand, snow, water), so object
pixels are told apart by saturation. Styles: ``photo`` (as rendered), ``night`` (darkened with a
blue tint), ``pixel`` (pixel art: 2x2-pixel blocks at 64 px, i.e. a 32x32 grid at any size).

Scale: objects are 13 to 19 px across at 64 px and patterns have an 8 px period, so that a small
VAE with SD's factor 8 (one latent cell per 8x8 pixels, aligned with the pattern
grid) can reproduce shapes, colours and textures; at smaller scales its reconstructions lose them.

Rendering draws at 4x the output size and box-filters down (anti-aliasing); the style is applied
last, per pixel (night) or per block (pixel).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "ellipse", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 205, 25),
    "green": (30, 150, 45),
    "blue": (35, 65, 210),
    "purple": (135, 45, 175),
}
TEXTURES = ("plain", "striped", "dotted")
SIZES = {"small": 0.105, "large": 0.145}  # object radius as a fraction of the image side
# Objects never cross these x boundaries (fractions of the side), so each slot is a column band.
SLOT_BANDS = {"left": (0.0, 0.35), "middle": (0.35, 0.65), "right": (0.65, 1.0)}
SLOTS = {"left": 0.2, "middle": 0.5, "right": 0.8}  # object centre x as a fraction of the side
POSES = {"triangle": ("up", "down"), "ellipse": ("standing", "lying")}
# (colour at the top, colour at the bottom) of each background's gradient
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "sky": ((150, 190, 235), (205, 225, 248)),
    "grass": ((120, 160, 100), (150, 185, 120)),
    "sand": ((215, 195, 155), (235, 220, 185)),
    "snow": ((228, 233, 240), (250, 250, 252)),
    "water": ((85, 130, 165), (115, 155, 190)),
}
STYLES = ("photo", "night", "pixel")
SHADE = 0.5  # the pattern colour of striped and dotted objects is the colour times SHADE
SUPERSAMPLE = 4
PIXEL_BLOCK = 1 / 32  # pixel-art block side as a fraction of the image side
NIGHT_GAIN, NIGHT_TINT = 0.35, (0.0, 0.0, 20.0)

_BACKGROUND_PHRASES = {"sky": "in the sky", "grass": "on grass", "sand": "on sand",
                       "snow": "on snow", "water": "on water"}
_STYLE_PHRASES = {"photo": "", "night": ", at night", "pixel": ", pixel art"}
_POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_POSE_PHRASES = {"up": "pointing up", "down": "pointing down", "standing": "standing",
                 "lying": "lying"}


@dataclass(frozen=True)
class ToyObject:
    """One object. ``y`` is the centre's height as a fraction of the side (0 = top);
    ``pose`` is ``None`` for shapes without poses."""

    shape: str
    colour: str
    texture: str
    size: str
    slot: str
    y: float
    pose: str | None = None

    @property
    def name(self) -> str:
        """How instructions refer to it: ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    def phrase(self) -> str:
        """Caption phrase: ``"a large red striped circle on the left"``."""
        words = [self.size, self.colour] + ([self.texture] if self.texture != "plain" else [])
        words.append(self.shape)
        if self.pose is not None:
            words.append(_POSE_PHRASES[self.pose])
        return f"a {' '.join(words)} {_POSITION_PHRASES[self.slot]}"


@dataclass(frozen=True)
class Scene:
    """A background kind with its seed, objects ordered left to right, and a style."""

    background: str
    background_seed: int
    objects: tuple[ToyObject, ...]
    style: str = "photo"

    def caption(self) -> str:
        """Plain-English caption, e.g. ``"a large red striped circle on the left and a small blue
        square in the middle, on sand, at night"``."""
        parts = [o.phrase() for o in self.objects]
        joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{joined}, {_BACKGROUND_PHRASES[self.background]}{_STYLE_PHRASES[self.style]}"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> Scene:
        objects = tuple(ToyObject(**o) for o in data["objects"])
        return Scene(data["background"], data["background_seed"], objects, data["style"])

    def with_objects(self, objects: list[ToyObject]) -> Scene:
        return replace(self, objects=tuple(sorted(objects, key=lambda o: SLOTS[o.slot])))


# every phrase an attribute of one object can take in a caption; shapes carry their poses, so a
# hard negative may change a shape, a pose or both
ATTRIBUTE_PHRASES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "texture": tuple(t for t in TEXTURES if t != "plain"),  # plain is not in captions
    "shape": tuple(f"{shape} {_POSE_PHRASES[pose]}" if shape in POSES else shape
                   for shape in SHAPES for pose in POSES.get(shape, (None,))),
}
_ATTRIBUTE_PATTERN = re.compile(r"\b(" + "|".join(sorted(
    (p for group in ATTRIBUTE_PHRASES.values() for p in group), key=len, reverse=True)) + r")\b")


def hard_negative(caption: str, rng: np.random.Generator, attribute: str | None = None,
                  pose_flip: float = 0.0) -> str:
    """``caption`` with one object attribute changed to another value: a caption that almost, but
    not quite, describes the image.

    Args:
        attribute: a key of :data:`ATTRIBUTE_PHRASES` ("colour", "size", "texture", "shape" with
            its pose), or None for any attribute the caption mentions.
        pose_flip: probability in [0, 1] that a shape with poses changes to its other pose alone
            ("triangle pointing up" -> "triangle pointing down") rather than to any other shape
            phrase. At 0, a triangle's pose is flipped in 1 negative of 130 on the training
            captions, and the CLIP trained so tells a triangle pointing up from one pointing
            down no better than chance (docs/toyworld.md); ``attribute="shape"`` with
            ``pose_flip=0.5`` flips one in 9.

    Raises:
        ValueError: the caption mentions no such attribute (e.g. "texture" when every object is
            plain).
    """
    found = [m for m in _ATTRIBUTE_PATTERN.finditer(caption)
             if attribute is None or m.group() in ATTRIBUTE_PHRASES[attribute]]
    if not found:
        raise ValueError(f"no object {attribute or 'attribute'} to change in caption {caption!r}")
    match = found[rng.integers(len(found))]
    phrase = match.group()
    group = next(g for g in ATTRIBUTE_PHRASES.values() if phrase in g)
    other_pose = [p for p in group if p != phrase and p.split()[0] == phrase.split()[0]]
    if pose_flip and other_pose and rng.random() < pose_flip:  # no draw at 0: same stream
        other = other_pose[0]
    else:
        other = str(rng.choice([p for p in group if p != phrase]))
    return caption[:match.start()] + other + caption[match.end():]


def sample_object(rng: np.random.Generator, slot: str, taken: set[str] = frozenset(),
                  **fixed) -> ToyObject:
    """A random object in ``slot`` whose ``name`` is not in ``taken``; ``fixed`` pins attributes."""
    while True:
        shape = fixed.get("shape") or str(rng.choice(SHAPES))
        colour = fixed.get("colour") or str(rng.choice(list(COLOURS)))
        if f"{colour} {shape}" in taken:
            continue
        pose = fixed.get("pose")
        if shape in POSES and pose not in POSES[shape]:
            pose = str(rng.choice(POSES[shape]))
        elif shape not in POSES:
            pose = None
        return ToyObject(
            shape=shape,
            colour=colour,
            texture=fixed.get("texture") or str(rng.choice(TEXTURES)),
            size=fixed.get("size") or str(rng.choice(list(SIZES))),
            slot=slot,
            y=float(fixed.get("y") or round(rng.uniform(0.35, 0.65), 3)),
            pose=pose,
        )


def sample_scene(rng: np.random.Generator, n_objects: int | None = None,
                 style: str | None = None) -> Scene:
    """A random scene with 1-3 objects (``n_objects`` to fix it) and distinct object names."""
    n = n_objects or int(rng.integers(1, 4))
    slots = sorted(rng.choice(list(SLOTS), size=n, replace=False), key=SLOTS.get)
    objects: list[ToyObject] = []
    for slot in slots:
        objects.append(sample_object(rng, str(slot), {o.name for o in objects}))
    return Scene(
        background=str(rng.choice(list(BACKGROUNDS))),
        background_seed=int(rng.integers(0, 2**31)),
        objects=tuple(objects),
        style=style or str(rng.choice(STYLES)),
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _background(kind: str, seed: int, side: int) -> np.ndarray:
    """Float RGB (side, side, 3): vertical gradient plus two soft waves of the background's seed."""
    rng = np.random.default_rng(seed)
    top, bottom = (np.array(c, dtype=np.float64) for c in BACKGROUNDS[kind])
    y, x = np.mgrid[0:side, 0:side] / side
    image = top + (bottom - top) * y[..., None]
    for _ in range(2):
        fx, fy = rng.uniform(0.5, 2.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        amplitude = rng.uniform(4, 9)
        image += amplitude * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    return image


def footprint(obj: ToyObject, side: int) -> np.ndarray:
    """Boolean (side, side) mask of the object's shape at this resolution."""
    y, x = (np.mgrid[0:side, 0:side] + 0.5) / side
    cx, cy, r = SLOTS[obj.slot], obj.y, SIZES[obj.size]
    dx, dy = x - cx, y - cy
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        half = 0.85 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if obj.shape == "ellipse":
        a, b = (r, r / 2) if obj.pose == "lying" else (r / 2, r)
        return (dx / a) ** 2 + (dy / b) ** 2 <= 1
    if obj.shape == "triangle":
        t = (dy + r) / (2 * r)  # 0 at the top of the bounding box, 1 at the bottom
        if obj.pose == "down":
            t = 1 - t
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    raise ValueError(f"unknown shape {obj.shape!r}")


def pattern(texture: str, side: int) -> np.ndarray:
    """Boolean (side, side): where a textured object shows its darker shade."""
    y, x = (np.mgrid[0:side, 0:side] + 0.5) / side
    period = 8 / 64  # 8 px at 64 px: one latent cell of SD's factor-8 VAE
    if texture == "plain":
        return np.zeros((side, side), dtype=bool)
    if texture == "striped":
        return (y / period) % 1.0 < 0.5
    if texture == "dotted":
        fx, fy = (x / period) % 1.0 - 0.5, (y / period) % 1.0 - 0.5
        return fx**2 + fy**2 <= 0.3**2
    raise ValueError(f"unknown texture {texture!r}")


def downsample(array: np.ndarray, factor: int) -> np.ndarray:
    h, w = array.shape[:2]
    return array.reshape(h // factor, factor, w // factor, factor, *array.shape[2:]).mean((1, 3))


def coverage(obj: ToyObject, size: int) -> np.ndarray:
    """Fraction of each output pixel covered by ``obj`` (float (size, size) in [0, 1])."""
    big = size * SUPERSAMPLE
    return downsample(footprint(obj, big).astype(np.float64), SUPERSAMPLE)


def apply_style(image: np.ndarray, style: str) -> np.ndarray:
    """Apply a global style to a float RGB image (values 0..255); returns a new array."""
    if style == "photo":
        return image.copy()
    if style == "night":
        return image * NIGHT_GAIN + np.array(NIGHT_TINT)
    if style == "pixel":
        block = max(1, round(image.shape[0] * PIXEL_BLOCK))
        blocks = downsample(image, block)
        return np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)
    raise ValueError(f"unknown style {style!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as uint8 RGB (size, size, 3); ``size`` must be a multiple of 32."""
    if size % 32:
        raise ValueError(f"toy scenes render at multiples of 32 px, got {size}")
    big = size * SUPERSAMPLE
    canvas = _background(scene.background, scene.background_seed, big)
    for obj in scene.objects:
        colour = np.array(COLOURS[obj.colour], dtype=np.float64)
        paint = np.where(pattern(obj.texture, big)[..., None], colour * SHADE, colour)
        canvas = np.where(footprint(obj, big)[..., None], paint, canvas)
    image = apply_style(downsample(canvas, SUPERSAMPLE), scene.style)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def attributes(scene: Scene) -> dict[str, str | None]:
    """The scene as flat attributes: ``background``, ``style`` and, per slot, ``SLOT.present``
    ("yes"/"no"), ``SLOT.shape``, ``.colour``, ``.texture``, ``.size``, ``.pose`` (None when absent
    or not applicable). The oracle compares scenes through these."""
    flat: dict[str, str | None] = {"background": scene.background, "style": scene.style}
    by_slot = {o.slot: o for o in scene.objects}
    for slot in SLOTS:
        obj = by_slot.get(slot)
        flat[f"{slot}.present"] = "yes" if obj else "no"
        for key in ("shape", "colour", "texture", "size", "pose"):
            flat[f"{slot}.{key}"] = getattr(obj, key) if obj else None
    return flat
