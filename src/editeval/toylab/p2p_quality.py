"""Quality of Prompt-to-Prompt and the inversions under it, measured on the toy world.

- :func:`word_swap_pairs`: ground-truth word swaps: a random scene and the same scene with one
  object's colour word or shape word changed (shapes without a pose: circle, square, diamond, so
  the captions differ in exactly one word), rendered with the same seeds; the mask is the object's
  footprint before and after, dilated as :mod:`editeval.toyworld.pairs` does.
- :func:`word_swap_quality`: a method on those pairs through :func:`editeval.core.edit`, judged by
  the oracle (:func:`editeval.toyworld.oracle.score_edit`): edit success and the PSNR of the
  unedited region (against the source, equal to the target outside the mask).
- :func:`vae_ceiling`: the same judgement of the ground-truth targets passed through the VAE
  alone, what the VAE leaves of a perfect edit.
- :func:`reconstruction_quality`: PSNR of a scene sampled back from its inversion at the editing
  guidance (the source branch alone), and the null-text optimisation iterations it took.

``benchmarks/inversion.py`` prints them; ``tests/test_p2p.py`` and ``tests/test_inversions.py``
assert them on small samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from editeval.toyworld.oracle import psnr, score_edit
from editeval.toyworld.pairs import _objects_mask
from editeval.toyworld.scenes import COLOURS, Scene, render, sample_scene

POSELESS_SHAPES = ("circle", "square", "diamond")


@dataclass
class WordSwapPair:
    """One word swap: scenes, prompts, images (uint8 RGB) and the edit mask (bool, True = edit)."""

    attribute: str
    source: Scene
    target: Scene
    source_prompt: str
    target_prompt: str
    mask: np.ndarray
    source_image: np.ndarray
    target_image: np.ndarray


def word_swap_pairs(count: int, seed: int = 0, size: int = 64,
                    attributes: tuple[str, ...] = ("colour", "shape")) -> list[WordSwapPair]:
    """``count`` random word swaps, cycling through ``attributes`` ("colour", "shape").

    Raises:
        ValueError: an attribute other than colour or shape.
    """
    unknown = set(attributes) - {"colour", "shape"}
    if unknown:
        raise ValueError(f"word swaps change 'colour' or 'shape', got {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    pairs: list[WordSwapPair] = []
    while len(pairs) < count:
        attribute = attributes[len(pairs) % len(attributes)]
        source = sample_scene(rng)
        names = {o.name for o in source.objects}
        candidates = [o for o in source.objects
                      if attribute == "colour" or o.shape in POSELESS_SHAPES]
        if not candidates:
            continue
        old = candidates[int(rng.integers(0, len(candidates)))]
        options = [v for v in (COLOURS if attribute == "colour" else POSELESS_SHAPES)
                   if v != getattr(old, attribute)
                   and replace(old, **{attribute: v}).name not in names]
        if not options:
            continue
        new = replace(old, **{attribute: str(rng.choice(options))})
        target = source.with_objects([new if o is old else o for o in source.objects])
        pairs.append(WordSwapPair(attribute, source, target, source.caption(), target.caption(),
                                  _objects_mask([old, new], size), render(source, size),
                                  render(target, size)))
    return pairs


def word_swap_quality(pipe: Any, pairs: list[WordSwapPair], method: str = "p2p",
                      params: dict[str, Any] | None = None,
                      inversion_cache: Any = None) -> dict[str, Any]:
    """Run ``method`` on each pair and judge it with the oracle.

    Returns ``{"success": rate in [0, 1], "unedited_psnr": mean dB, "successes": [bool],
    "unedited_psnrs": [dB], "nfe": [int]}``.
    """
    from editeval.core import EditRequest
    from editeval.editing import edit

    successes, unedited, nfe = [], [], []
    for pair in pairs:
        result = edit(EditRequest(Image.fromarray(pair.source_image),
                                  source_prompt=pair.source_prompt,
                                  target_prompt=pair.target_prompt, params=params or {}),
                      method, pipe=pipe, inversion_cache=inversion_cache)
        score = score_edit(np.asarray(result.image), pair.source_image, pair.source, pair.target,
                           pair.mask)
        successes.append(bool(score.success))
        unedited.append(float(score.unedited_psnr))
        nfe.append(result.nfe)
    return {"success": float(np.mean(successes)), "unedited_psnr": float(np.mean(unedited)),
            "successes": successes, "unedited_psnrs": unedited, "nfe": nfe}


def vae_ceiling(pipe: Any, pairs: list[WordSwapPair]) -> dict[str, float]:
    """The oracle's verdict on the ground-truth targets passed through the VAE alone: what the
    VAE leaves of a perfect edit, the reference level for any latent-space edit.
    Returns ``{"success": rate, "unedited_psnr": dB}``.
    """
    from editeval.diffusion.latents import decode_latents, encode_image

    successes, unedited = [], []
    for pair in pairs:
        image = np.asarray(decode_latents(pipe, encode_image(pipe, Image.fromarray(
            pair.target_image))))
        score = score_edit(image, pair.source_image, pair.source, pair.target, pair.mask)
        successes.append(bool(score.success))
        unedited.append(float(score.unedited_psnr))
    return {"success": float(np.mean(successes)), "unedited_psnr": float(np.mean(unedited))}


def reconstruction_quality(pipe: Any, scenes: list[Scene], inversion: str,
                           num_inference_steps: int = 50, guidance_scale: float = 7.5,
                           **options: Any) -> dict[str, float]:
    """Invert each scene under its caption, sample it back at ``guidance_scale``, compare.

    ``options`` go to :func:`editeval.diffusion.inversion.invert_source`. Returns ``{"psnr": mean
    dB, "optimisation_steps": mean null-text iterations per image (0 for other inversions)}``.
    """
    from editeval.diffusion.inversion import invert_source, reconstruct_source

    values, steps = [], []
    for scene in scenes:
        image = render(scene)
        source = invert_source(pipe, Image.fromarray(image), scene.caption(), inversion,
                               num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, **options)
        values.append(psnr(np.asarray(reconstruct_source(pipe, source)), image))
        steps.append(source.optimisation_steps)
    return {"psnr": float(np.mean(values)), "optimisation_steps": float(np.mean(steps))}
