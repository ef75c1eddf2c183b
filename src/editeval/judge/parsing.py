"""Strict parsing of a judge's answer into sub-scores; never a guessed score.

The answer must end with a JSON object ``{"scores": [{"image": i, "accuracy": a, "preservation": p,
"quality": q, "realism": r}, ...]}`` holding exactly one entry for each image 1..n and four integers
in 1..10 per entry.

Lenient only where the meaning is unambiguous:
- the JSON may sit inside a Markdown code fence and after prose (the last JSON object is taken);
- a score may be written as an integral float (``7.0``) or a numeric string (``"7"``);
- factor keys may use the survey's names (``S_acc``, ``S_pre``, ``S_qua``, ``S_real``), any case.

Everything else (an image missing or repeated, a score of 0, 11 or 7.5, prose only, truncated JSON)
is a :class:`ParseFailure` that keeps the raw text; no score is ever made up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from editeval.core.lmm_score import FACTORS

_ALIASES = {
    "accuracy": "accuracy", "s_acc": "accuracy", "editing_accuracy": "accuracy",
    "preservation": "preservation", "s_pre": "preservation",
    "contextual_preservation": "preservation",
    "quality": "quality", "s_qua": "quality", "visual_quality": "quality",
    "realism": "realism", "s_real": "realism", "logical_realism": "realism",
}


class ParseFailure(ValueError):
    """The answer does not hold valid scores; ``reason`` says why, ``raw`` is the full answer."""

    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True)
class ImageScores:
    """The four sub-scores of one image (integers 1..10)."""

    accuracy: int
    preservation: int
    quality: int
    realism: int

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in FACTORS}


def _last_json_object(text: str) -> dict | None:
    """The last top-level JSON object in ``text`` that decodes, or None."""
    decoder = json.JSONDecoder()
    found = None
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "scores" in value:
            found = value
    return found


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    return None


def parse_scores(text: str, n_images: int) -> list[ImageScores]:
    """Scores of images 1..``n_images``, in that order.

    Raises:
        ParseFailure: anything but exactly one valid entry per image (see the module docstring).
    """
    payload = _last_json_object(text)
    if payload is None:
        raise ParseFailure("no JSON object with 'scores' in the answer", text)
    entries = payload["scores"]
    if not isinstance(entries, list):
        raise ParseFailure("'scores' is not a list", text)
    by_image: dict[int, ImageScores] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ParseFailure(f"score entry {entry!r} is not an object", text)
        fields = {_ALIASES.get(str(k).lower()): v for k, v in entry.items()}
        image = _integer(entry.get("image", entry.get("Image")))
        if image is None or not 1 <= image <= n_images:
            raise ParseFailure(f"entry {entry!r} names no image in 1..{n_images}", text)
        if image in by_image:
            raise ParseFailure(f"image {image} is scored twice", text)
        values = {}
        for factor in FACTORS:
            value = _integer(fields.get(factor))
            if value is None or not 1 <= value <= 10:
                raise ParseFailure(
                    f"image {image}: {factor} is {fields.get(factor)!r}, not an integer in 1..10",
                    text)
            values[factor] = value
        by_image[image] = ImageScores(**values)
    missing = sorted(set(range(1, n_images + 1)) - set(by_image))
    if missing:
        raise ParseFailure(f"no scores for image(s) {missing}", text)
    return [by_image[i] for i in range(1, n_images + 1)]
