"""Prompt-to-Prompt's token alignment: which source token's attention each target token takes.

Prompt-to-Prompt (Hertz et al., ICLR 2023, arXiv:2208.01626) edits by giving the target prompt the
source prompt's cross-attention maps. That needs a map from target tokens to source tokens, computed
here from the two prompts alone, at the level of the pipeline's own (CLIP BPE) tokens:

- **word swap** (P2P's ``AttentionReplace``) when both prompts have the same number of tokens: token
  ``j`` of the target takes the attention of token ``j`` of the source (an identity map; P2P's
  replacement mapper is the identity whenever the swapped words have equal token counts);
- **refinement** (P2P's ``AttentionRefine``) otherwise: a global (Needleman-Wunsch) alignment of the
  two token sequences with P2P's scores (match +1, mismatch -1, gap 0), so only identical tokens are
  paired; a target token paired with a source token takes its attention, an unpaired (new) one keeps
  its own.

Both come out as one :class:`PromptAlignment`: a (77, 77) 0/1 matrix ``mapper`` (source token ->
target token) and per-target-token weights ``alphas`` (1 = take the source's attention), so that the
edited target probabilities are ``alphas * (source_probs @ mapper) + (1 - alphas) * target_probs``.

The **blend words** for P2P's local blending are the tokens that differ: source tokens with no
identical partner and target tokens with no identical partner, so free-form prompt pairs such as
"A wooden bench in front of a lush green hill with trees" -> "A lush green hill with trees" need no
hand annotation (blend words: "wooden bench in front of a" on the source side, none on the target).

Deviation from the official ``seq_aligner``: target padding tokens are paired with source padding
tokens (the official refinement mapper pairs padding position ``k`` with source position ``k``,
which is a word of the source when the source is the longer prompt). Ties in the alignment are
broken towards pairing the later occurrence of a repeated token (the one next to the rest of the
matched run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

MATCH, MISMATCH, GAP = 1, -1, 0  # P2P's alignment scores


@dataclass(frozen=True)
class PromptAlignment:
    """How the target prompt's cross-attention is taken from the source prompt's.

    Attributes:
        kind: ``"replace"`` (word swap, equal token counts) or ``"refine"`` (global alignment).
        source_tokens, target_tokens: the prompts' tokens as the tokenizer spells them, start and
            end tokens included, padding excluded.
        mapper: float32 (L, L) 0/1 matrix, ``mapper[i, j] = 1`` when target token ``j`` takes source
            token ``i``'s attention (L = the tokenizer's ``model_max_length``, 77 for CLIP).
        alphas: float32 (L,), 1 where the target token takes the source's attention, 0 where it
            keeps its own (refinement's new tokens).
        source_blend, target_blend: indices (into the padded token sequence) of the tokens that
            differ between the prompts, the local blend's words on each side.
    """

    kind: str
    source_tokens: tuple[str, ...]
    target_tokens: tuple[str, ...]
    mapper: torch.Tensor
    alphas: torch.Tensor
    source_blend: tuple[int, ...]
    target_blend: tuple[int, ...]

    @property
    def blend_words(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The differing tokens as words (``</w>`` stripped): (source side, target side)."""
        def words(tokens: tuple[str, ...], picked: tuple[int, ...]) -> tuple[str, ...]:
            return tuple(tokens[i].replace("</w>", "") for i in picked)

        return words(self.source_tokens, self.source_blend), words(self.target_tokens,
                                                                   self.target_blend)

    def apply(self, source_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        """The target's edited cross-attention probabilities.

        ``source_probs`` and ``target_probs``: (..., query_tokens, L) probabilities of the source
        and target branches; returns the same shape and dtype as ``target_probs``.
        """
        mapper = self.mapper.to(source_probs.device, source_probs.dtype)
        alphas = self.alphas.to(source_probs.device, source_probs.dtype)
        return alphas * (source_probs @ mapper) + (1 - alphas) * target_probs


def token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids with the start and end tokens, without padding.

    Raises:
        ValueError: the prompt has more tokens than the text encoder takes (77 for CLIP).
    """
    ids = list(tokenizer(prompt, truncation=False).input_ids)
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens, more than the text encoder's "
                         f"{limit}; shorten it")
    return ids


def global_alignment(x: Sequence[Any], y: Sequence[Any], match: int = MATCH,
                     mismatch: int = MISMATCH,
                     gap: int = GAP) -> list[tuple[int | None, int | None]]:
    """Needleman-Wunsch global alignment of two sequences.

    Returns the aligned pairs in order, ``(i, j)`` for paired elements (equal or mismatched),
    ``(i, None)`` for an element of ``x`` against a gap and ``(None, j)`` for one of ``y``. With
    P2P's scores (gap 0, mismatch -1) only equal elements are ever paired. Ties are broken in
    favour of pairing, then of gaps in ``y``, tracing back from the end.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pair = match if x[i - 1] == y[j - 1] else mismatch
            score[i][j] = max(score[i - 1][j - 1] + pair, score[i - 1][j] + gap,
                              score[i][j - 1] + gap)
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            pair = match if x[i - 1] == y[j - 1] else mismatch
            if score[i][j] == score[i - 1][j - 1] + pair:
                pairs.append((i - 1, j - 1))
                i, j = i - 1, j - 1
                continue
        if i > 0 and score[i][j] == score[i - 1][j] + gap:
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    return pairs[::-1]


def align_prompts(tokenizer: Any, source_prompt: str, target_prompt: str) -> PromptAlignment:
    """The word-swap or refinement alignment of two prompts (see the module docstring).

    Raises:
        ValueError: a prompt is longer than the text encoder takes.
    """
    length = tokenizer.model_max_length
    source, target = token_ids(tokenizer, source_prompt), token_ids(tokenizer, target_prompt)
    mapper = torch.zeros(length, length)
    alphas = torch.ones(length)
    if len(source) == len(target):
        kind = "replace"
        mapper += torch.eye(length)
        source_blend = target_blend = tuple(k for k in range(len(source))
                                            if source[k] != target[k])
    else:
        kind = "refine"
        paired_source, paired_target = set(), set()
        for i, j in global_alignment(source, target):
            if i is not None and j is not None and source[i] == target[j]:
                mapper[i, j] = 1.0
                paired_source.add(i)
                paired_target.add(j)
            elif j is not None:
                alphas[j] = 0.0
        for k in range(length - len(target)):  # padding takes the source's padding
            mapper[min(len(source) + k, length - 1), len(target) + k] = 1.0
        source_blend = tuple(i for i in range(len(source)) if i not in paired_source)
        target_blend = tuple(j for j in range(len(target)) if j not in paired_target)
    spell = tokenizer.convert_ids_to_tokens
    return PromptAlignment(kind, tuple(spell(source)), tuple(spell(target)), mapper, alphas,
                           source_blend, target_blend)


def parse_equalizer(tokenizer: Any, prompt: str, equalizer: str) -> torch.Tensor:
    """Prompt-to-Prompt's attention re-weighting ("equalizer") as per-token scales of ``prompt``.

    ``equalizer``: ``"word:scale"`` items separated by commas (``"red:2,circle:0.5"``); a word may
    span several tokens and every occurrence in the prompt is scaled; ``""`` scales nothing.
    Returns float32 (L,) scales, 1 for the other tokens.

    Raises:
        ValueError: an item is not ``word:scale``, the scale is not a number, or the word is not
            in the prompt.
    """
    scales = torch.ones(tokenizer.model_max_length)
    ids = token_ids(tokenizer, prompt)
    for item in filter(None, (part.strip() for part in equalizer.split(","))):
        word, sep, value = item.rpartition(":")
        try:
            scale = float(value)
        except ValueError:
            scale = None
        if not sep or not word.strip() or scale is None:
            raise ValueError(f"equalizer item {item!r} is not 'word:scale' (e.g. 'red:2'); "
                             "separate items with commas")
        word_ids = token_ids(tokenizer, word.strip())[1:-1]
        starts = [k for k in range(len(ids) - len(word_ids) + 1)
                  if ids[k:k + len(word_ids)] == word_ids]
        if not word_ids or not starts:
            raise ValueError(f"equalizer word {word.strip()!r} is not in the target prompt "
                             f"{prompt!r}")
        for k in starts:
            scales[k:k + len(word_ids)] = scale
    return scales
