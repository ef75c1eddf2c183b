"""SEGA's semantic guidance, and the edit concepts it steers by.

Paper: "SEGA: Instructing Text-to-Image Models using Semantic Guidance", Brack, Friedrich, Hintersdorf,
Struppek, Schramowski and Kersting, NeurIPS 2023, arXiv:2301.12247 (official code:
ml-research/semantic-image-editing, which became diffusers' ``SemanticStableDiffusionPipeline``).

**Edit concepts.** Each concept is a short text (``"red circle"``) and a direction: added (guided
towards) or removed (``reverse``: guided away from). A user writes them as ``"+red circle,-green
diamond"`` (:func:`parse_concepts`; an item without a sign is added, as in the LEDITS demo's
syntax). From a prompt pair, :func:`derive_concepts` reads them off the Prompt-to-Prompt aligner
(:func:`~editeval.diffusion.p2p_align.align_prompts`): every run of consecutive tokens of the target
prompt that the source lacks is a concept to add, every run of the source that the target lacks a
concept to remove ("a green diamond on grass" -> "a red circle on grass": ``+red circle``,
``-green diamond``), punctuation at a run's ends stripped.

**Semantic guidance** (:class:`SemanticGuidance`). With the noise estimates ``eps_u``
(unconditional), ``eps_p`` (the prompt) and ``eps_i`` (concept i) at one step::

    eps     = eps_u + s_g (eps_p - eps_u) + gamma
    gamma_i = mu_i * s_i * (eps_i - eps_u)          (times -1 for a concept to remove)

``mu_i`` keeps an element of the term where its magnitude is at least the ``lambda_i``-quantile of
the magnitudes of its latent channel (``edit_threshold`` 0.9 keeps the largest 10%), 0 elsewhere.
A concept guides from its warm-up step ``delta_i`` on. As in the official code, the terms of all
concepts are summed with a momentum that builds from the first step, ``gamma = sum_i gamma_i + s_m
v; v <- beta_m v + (1 - beta_m) gamma``, and ``gamma`` is applied once every concept is past its
warm-up; while only some are, the mean of theirs is applied, without momentum.

The UNet sees a batch of 2 (unconditional, prompt) and a batch of C (the concepts) per step: NFE =
2 + C per step. With every concept's scale 0 the estimate equals classifier-free guidance bit for
bit (the same batch of 2, plus an exact zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editeval.diffusion.ddim import model_noise
from editeval.diffusion.latents import encode_prompt
from editeval.diffusion.p2p_align import align_prompts, token_ids

_EDGE_PUNCTUATION = " ,.;:!?"


@dataclass(frozen=True)
class EditConcept:
    """A concept to add to the image (``reverse=False``) or to remove from it (``reverse=True``).

    ``str()`` gives the user's syntax: ``"+red circle"`` or ``"-green diamond"``.
    """

    text: str
    reverse: bool = False

    def __str__(self) -> str:
        return ("-" if self.reverse else "+") + self.text


def parse_concepts(text: str) -> tuple[EditConcept, ...]:
    """Edit concepts written as ``"+red circle,-green diamond"`` (no sign: added).

    Returns ``()`` for a blank string.

    Raises:
        ValueError: an item is empty (two commas in a row, or a sign alone), naming it.
    """
    if not text.strip():
        return ()
    concepts = []
    for item in text.split(","):
        item = item.strip()
        reverse = item.startswith("-")
        words = item[1:].strip() if item[:1] in "+-" and item else item
        if not words:
            raise ValueError(f"edit_concepts item {item!r} in {text!r} names no concept; write "
                             "'+words' to add and '-words' to remove, separated by commas")
        concepts.append(EditConcept(words, reverse))
    return tuple(concepts)


def _phrases(tokenizer: Any, tokens: Sequence[str], picked: Sequence[int]) -> list[str]:
    """The runs of consecutive ``picked`` token indices, as text, edge punctuation stripped."""
    runs: list[list[int]] = []
    for index in picked:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    phrases = [tokenizer.decode(tokenizer.convert_tokens_to_ids([tokens[i] for i in run]))
               .strip(_EDGE_PUNCTUATION) for run in runs]
    return [phrase for phrase in phrases if phrase]


def derive_concepts(tokenizer: Any, source_prompt: str,
                    target_prompt: str) -> tuple[EditConcept, ...]:
    """The edit concepts that turn ``source_prompt`` into ``target_prompt`` (module docstring):
    the target's new runs of words to add, then the source's lost runs to remove.

    Raises:
        ValueError: a prompt is longer than the text encoder takes.
    """
    alignment = align_prompts(tokenizer, source_prompt, target_prompt)
    added = _phrases(tokenizer, alignment.target_tokens, alignment.target_blend)
    removed = _phrases(tokenizer, alignment.source_tokens, alignment.source_blend)
    return tuple(EditConcept(p) for p in added) + tuple(EditConcept(p, True) for p in removed)


def resolve_concepts(tokenizer: Any, source_prompt: str, target_prompt: str,
                  explicit: str) -> tuple[EditConcept, ...]:
    """``explicit`` concepts (:func:`parse_concepts`) when given, else those derived from the
    prompt pair (:func:`derive_concepts`)."""
    if explicit.strip():
        return parse_concepts(explicit)
    return derive_concepts(tokenizer, source_prompt, target_prompt)


def concept_tokens(tokenizer: Any, concept: EditConcept) -> int:
    """How many tokens the concept's text has, without the start and end tokens."""
    return len(token_ids(tokenizer, concept.text)) - 2


def concept_embeddings(pipe: Any, concepts: Sequence[EditConcept]) -> torch.Tensor:
    """(C, 77, D) text embeddings of the concepts' texts (``(0, 77, D)`` for none)."""
    if not concepts:
        return encode_prompt(pipe, "")[:0]
    return torch.cat([encode_prompt(pipe, c.text) for c in concepts])


def per_concept(value: float | Sequence[float], count: int, name: str) -> list[float]:
    """``value`` repeated for ``count`` concepts, or checked to hold one value per concept.

    Raises:
        ValueError: a sequence of another length, naming ``name``.
    """
    if isinstance(value, Sequence):
        if len(value) != count:
            raise ValueError(f"{name} needs one value per edit concept ({count}), got {len(value)}")
        return list(value)
    return [value] * count


class SemanticGuidance:
    """SEGA's noise estimate (module docstring) for one sampling run: a
    :data:`~editeval.diffusion.ddim.NoisePredictor` ``(step, timestep, latents) -> eps``.

    Stateful (the momentum): make one per sampling run, and call it once per step, in order.

    Args:
        unet, scheduler: the denoiser, called through :func:`~editeval.diffusion.ddim.model_noise`
            (any ``prediction_type``), and a scheduler with the model's alpha-bars.
        cond, uncond: (1, 77, D) embeddings of the prompt and of the unconditional prompt.
        guidance_scale: ``s_g``, classifier-free guidance of the prompt.
        concepts: the edit concepts (their directions). embeddings: their (C, 77, D) embeddings.
        scale, threshold, warmup: ``s_i`` (>= 0), ``lambda_i`` (in [0, 1]) and ``delta_i`` (steps,
            >= 0), one value for every concept or one per concept.
        momentum_scale, momentum_beta: ``s_m`` (>= 0) and ``beta_m`` (in [0, 1)).

    Raises:
        ValueError: a per-concept sequence of the wrong length.
    """

    def __init__(self, unet: Any, scheduler: Any, cond: torch.Tensor, uncond: torch.Tensor,
                 guidance_scale: float, concepts: Sequence[EditConcept], embeddings: torch.Tensor,
                 *, scale: float | Sequence[float], threshold: float | Sequence[float],
                 warmup: int | Sequence[int], momentum_scale: float,
                 momentum_beta: float) -> None:
        count = len(concepts)
        self.unet, self.scheduler = unet, scheduler
        self.text = torch.cat([uncond, cond])
        self.guidance_scale = guidance_scale
        self.embeddings = embeddings
        self.signs = [-1.0 if c.reverse else 1.0 for c in concepts]
        self.scales = per_concept(scale, count, "edit_guidance_scale")
        self.thresholds = per_concept(threshold, count, "edit_threshold")
        self.warmups = per_concept(warmup, count, "edit_warmup_steps")
        self.momentum_scale, self.momentum_beta = momentum_scale, momentum_beta
        self.momentum: torch.Tensor | None = None

    def concept_term(self, index: int, concept_noise: torch.Tensor,
                     uncond_noise: torch.Tensor) -> torch.Tensor:
        """``gamma_i``: concept ``index``'s thresholded, scaled direction, (1, 4, h, w)."""
        term = (concept_noise - uncond_noise) * (self.signs[index] * self.scales[index])
        magnitude = term.abs().float()
        cut = torch.quantile(magnitude.flatten(start_dim=2), self.thresholds[index], dim=2)
        return torch.where(magnitude >= cut[:, :, None, None], term, torch.zeros_like(term))

    def __call__(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        noise = model_noise(self.unet, self.scheduler, torch.cat([latents] * 2), timestep,
                            self.text)
        uncond_noise, cond_noise = noise.chunk(2)
        guidance = self.guidance_scale * (cond_noise - uncond_noise)
        count = len(self.signs)
        if count:
            concept_noise = model_noise(self.unet, self.scheduler,
                                        latents.expand(count, *latents.shape[1:]), timestep,
                                        self.embeddings)
            terms = [self.concept_term(i, concept_noise[i:i + 1], uncond_noise)
                     for i in range(count)]
            warm = [i for i in range(count) if step >= self.warmups[i]]
            if 0 < len(warm) < count:
                guidance = guidance + sum(terms[i] for i in warm) / len(warm)
            edit = sum(terms)
            if self.momentum is None:
                self.momentum = torch.zeros_like(edit)
            edit = edit + self.momentum_scale * self.momentum
            self.momentum = self.momentum_beta * self.momentum + (1 - self.momentum_beta) * edit
            if len(warm) == count:
                guidance = guidance + edit
        return uncond_noise + guidance
