"""Edit pairs with exact ground truth for the 7 EditEval tasks.

A pair is a source scene and a target scene that differ by one edit, rendered with the same seeds,
so every pixel outside the edit-region mask is identical (style change excepted: it acts on the
whole image and its mask is full). Masks are semantic, not pixel differences: the footprint of the
objects involved (source and target) dilated by 2 px at 64 px (anti-aliasing and pixel-art blocks),
or for background change everything except the objects' interiors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from editeval.core.samples import TASKS
from editeval.toyworld.scenes import (
    BACKGROUNDS,
    POSES,
    SHAPES,
    SLOTS,
    STYLES,
    TEXTURES,
    Scene,
    ToyObject,
    coverage,
    render,
    sample_object,
    sample_scene,
)

STYLE_INSTRUCTIONS = {"photo": "make it a photo", "night": "make it night",
                      "pixel": "turn it into pixel art"}


@dataclass
class EditPair:
    """One ground-truth edit: scenes, images (uint8 RGB), instruction, mask (bool, True = edit)."""

    task: str
    source: Scene
    target: Scene
    instruction: str
    mask: np.ndarray
    source_image: np.ndarray
    target_image: np.ndarray


def _grow(mask: np.ndarray, size: int) -> np.ndarray:
    radius = max(1, round(2 * size / 64))
    return ndimage.binary_dilation(mask, structure=np.ones((2 * radius + 1,) * 2, dtype=bool))


def _objects_mask(objects: list[ToyObject], size: int) -> np.ndarray:
    return _grow(np.any([coverage(o, size) > 0 for o in objects], axis=0), size)


def _background_mask(scene: Scene, size: int) -> np.ndarray:
    if not scene.objects:
        return np.ones((size, size), dtype=bool)
    inside = np.any([coverage(o, size) >= 1.0 for o in scene.objects], axis=0)
    return _grow(~inside, size)


def _pick(rng: np.random.Generator, objects) -> ToyObject:
    return objects[int(rng.integers(0, len(objects)))]


def _other(rng: np.random.Generator, options, current):
    return str(rng.choice([o for o in options if o != current]))


def sample_pair(rng: np.random.Generator, task: str | None = None, size: int = 64) -> EditPair:
    """A random edit pair of ``task`` (random task when ``None``), rendered at ``size`` px."""
    task = task or str(rng.choice(TASKS))
    if task == "object_addition":
        source = sample_scene(rng, n_objects=int(rng.integers(1, 3)))
        free = [s for s in SLOTS if s not in {o.slot for o in source.objects}]
        new = sample_object(rng, str(rng.choice(free)), {o.name for o in source.objects})
        target = source.with_objects([*source.objects, new])
        instruction = f"add {new.phrase()}"
        mask = _objects_mask([new], size)
    elif task == "object_replacement":
        source = sample_scene(rng)
        old = _pick(rng, source.objects)
        taken = {o.name for o in source.objects}
        new = sample_object(rng, old.slot, taken, shape=_other(rng, SHAPES, old.shape),
                            texture=old.texture, size=old.size, y=old.y)
        target = source.with_objects([new if o is old else o for o in source.objects])
        instruction = f"replace the {old.name} with a {new.colour} {new.shape}"
        mask = _objects_mask([old, new], size)
    elif task == "object_removal":
        source = sample_scene(rng, n_objects=int(rng.integers(2, 4)))
        old = _pick(rng, source.objects)
        target = source.with_objects([o for o in source.objects if o is not old])
        instruction = f"remove the {old.name}"
        mask = _objects_mask([old], size)
    elif task == "background_change":
        source = sample_scene(rng)
        target = replace(source, background=_other(rng, BACKGROUNDS, source.background))
        instruction = f"change the background to {target.background}"
        mask = _background_mask(source, size)
    elif task == "style_change":
        source = sample_scene(rng)
        target = replace(source, style=_other(rng, STYLES, source.style))
        instruction = STYLE_INSTRUCTIONS[target.style]
        mask = np.ones((size, size), dtype=bool)
    elif task == "texture_change":
        source = sample_scene(rng)
        old = _pick(rng, source.objects)
        new = replace(old, texture=_other(rng, TEXTURES, old.texture))
        target = source.with_objects([new if o is old else o for o in source.objects])
        instruction = f"make the {old.name} {new.texture}"
        mask = _objects_mask([old], size)
    elif task == "action_change":
        source = sample_scene(rng)
        posed = [o for o in source.objects if o.pose is not None]
        if not posed:  # give one object a pose-able shape
            old = _pick(rng, source.objects)
            shape = str(rng.choice(list(POSES)))
            fresh = sample_object(rng, old.slot, {o.name for o in source.objects if o is not old},
                                  shape=shape, texture=old.texture, size=old.size, y=old.y)
            source = source.with_objects([fresh if o is old else o for o in source.objects])
            posed = [fresh]
        old = _pick(rng, posed)
        new = replace(old, pose=_other(rng, POSES[old.shape], old.pose))
        target = source.with_objects([new if o is old else o for o in source.objects])
        verb = {"up": "point up", "down": "point down", "standing": "stand up", "lying": "lie down"}
        instruction = f"make the {old.name} {verb[new.pose]}"
        mask = _objects_mask([old, new], size)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return EditPair(task, source, target, instruction, mask, render(source, size),
                    render(target, size))
