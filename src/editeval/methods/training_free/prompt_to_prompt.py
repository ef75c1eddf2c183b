"""Prompt-to-Prompt: edit by giving the target prompt the source prompt's attention maps.

Paper: "Prompt-to-Prompt Image Editing with Cross Attention Control", Hertz, Mokady, Tenenbaum,
Aberman, Pritch and Cohen-Or, ICLR 2023, arXiv:2208.01626 (official code: google/prompt-to-prompt).

A source branch (source prompt) and a target branch (target prompt) are denoised together from the
inverted source (:func:`editeval.diffusion.dual_branch.sample_branches`, the UNet batch
[u_src, u_tgt, c_src, c_tgt], classifier-free guidance 7.5, 50 DDIM steps). In the conditional
half (the unconditional half is left alone, as in the official code),
:class:`PromptToPromptController` applies:

- **replace / refine**: for the first ``cross_replace_steps`` (0.8) of the steps (steps
  ``i < int(0.8 (steps + 1))``, the official schedule), the target's cross-attention probabilities
  are the source's, mapped by the aligner (:mod:`editeval.diffusion.p2p_align`: word swap when
  the prompts have as many tokens, refinement by global alignment otherwise); after that the
  target attends on its own;
- **self replace**: for the first ``self_replace_steps`` (0.4) of the steps (``i < int(0.4
  steps)``), the target's self-attention probabilities are the source's, in layers with at most
  16 x 16 query tokens (P2P's notebook; its null-text notebook uses 32 x 32);
- **re-weight**: ``equalizer`` ``"word:scale,..."`` scales the target's (mapped) attention to
  those words while the cross-attention replacement runs, without renormalising (P2P's
  ``AttentionReweight``);
- **local blend** (``local_blend``, threshold 0.3): after each step from ``blend_start`` on, the
  target branch keeps its own latents only where the cross-attention of the blend words, summed over
  the steps so far and the layers at one resolution, averaged over heads, max-pooled 3 x 3,
  resized to the latents and divided by its maximum, exceeds the threshold on either branch; the
  source branch's latents elsewhere. The blend words are the tokens that differ between the prompts
  (found by the aligner, no annotation) and the re-weighted ones.

``inversion`` picks how the source is inverted (:mod:`editeval.diffusion.inversion`): ``ddim``
(default), ``null-text``, ``negative-prompt``, ``proxedit`` or ``direct``; the last four are also
registered as their own methods with their papers' settings (``null-text``,
``negative-prompt-inversion``, ``proxedit``, ``direct-inversion``).

The default is DDIM inversion because that is the P2P paper's own real-image procedure (its
"Real Image Editing" section: deterministic DDIM inversion, with a mask from the attention maps
restoring the unedited regions); Prompt-to-Prompt with null-text inversion is the null-text paper's
method and is registered under that name, so ``p2p`` and ``null-text`` stay two methods with their
two papers' settings.

Deviations (on the method card too):
- Local blend resolution: P2P uses the 16 x 16 cross-attention maps of SD's 64 x 64 latents; we
  take the coarsest cross-attention resolution whose longer side has at least 16 tokens, else the
  finest (8 x 8 on the toy model, whose cross-attention runs at 8 x 8, 4 x 4 and 2 x 2).
- Local blend is on by default, with the blend words found by the aligner (P2P's is opt-in, with
  words given by hand); turn it off for global edits (style change).
- The aligner pairs padding with padding (see :mod:`editeval.diffusion.p2p_align`); word swaps are
  decided by token counts (P2P decides by word counts and spreads a word's attention over a
  replacement of a different token count; a pair of prompts with as many words but not as many
  tokens is refined here).

NFE = steps (DDIM inversion; 0 when cached) + 4 * steps (two branches with guidance); the
null-text inversion adds its optimisation (see ``null-text``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.attention import AttentionCall, AttentionController, control_attention
from editeval.diffusion.dual_branch import sample_branches
from editeval.diffusion.inversion import INVERSIONS, invert_source
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.p2p_align import PromptAlignment, align_prompts, parse_equalizer

BLEND_MIN_SIDE = 16  # P2P blends with SD's 16 x 16 maps (64 x 64 latents)


class PromptToPromptController(AttentionController):
    """Prompt-to-Prompt's attention edits on a [u_src, u_tgt, c_src, c_tgt] UNet batch.

    Args:
        alignment: the target-to-source token map
            (:func:`~editeval.diffusion.p2p_align.align_prompts`).
        num_inference_steps: the number of sampling steps (the schedules are fractions of it).
        cross_replace_steps, self_replace_steps: fractions of the steps (in [0, 1]).
        equalizer: (L,) per-target-token attention scales, or ``None``.
        self_replace_max_tokens: self-attention is replaced only in layers with at most this many
            query tokens.
        blend_threshold, blend_start: local blend's threshold (in (0, 1)) and first step as a
            fraction of the steps; used by :meth:`blend`.
    """

    def __init__(self, alignment: PromptAlignment, num_inference_steps: int,
                 cross_replace_steps: float, self_replace_steps: float,
                 equalizer: torch.Tensor | None = None, self_replace_max_tokens: int = 16 * 16,
                 blend_threshold: float = 0.3, blend_start: float = 0.0) -> None:
        super().__init__()
        self.alignment = alignment
        self.cross_end = int(cross_replace_steps * (num_inference_steps + 1))
        self.self_end = int(self_replace_steps * num_inference_steps)
        self.equalizer = equalizer
        self.self_replace_max_tokens = self_replace_max_tokens
        self.blend_threshold = blend_threshold
        self.blend_first = int(blend_start * num_inference_steps)
        words = torch.zeros(2, alignment.mapper.shape[0])
        words[0, list(alignment.source_blend)] = 1.0
        words[1, list(alignment.target_blend)] = 1.0
        if equalizer is not None:
            words[1, equalizer != 1] = 1.0
        self.blend_tokens = words
        self.blend_maps: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> (2, h*w, L) sums

    def wants(self, call: AttentionCall) -> bool:
        return call.is_cross or (call.step < self.self_end
                                 and call.height * call.width <= self.self_replace_max_tokens)

    def edit_probs(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        half = probs.shape[0] // 2
        source, target = probs[half], probs[half + 1]
        if call.is_cross:
            if call.step < self.cross_end:
                target = self.alignment.apply(source, target)
                if self.equalizer is not None:
                    target = target * self.equalizer.to(target)
            maps = torch.stack([source, target]).float().mean(dim=1)
            size = (call.height, call.width)
            self.blend_maps[size] = self.blend_maps.get(size, 0) + maps
        else:
            target = source
        return torch.cat([probs[:half], source[None], target[None], probs[half + 2:]])

    def blend_mask(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """(2, 1, h, w) 0/1 float mask: where each branch keeps its own latents (local blend).

        Raises:
            ValueError: no cross-attention was seen yet.
        """
        if not self.blend_maps:
            raise ValueError("local blend needs cross-attention maps: run a UNet step first")
        sizes = sorted(self.blend_maps, key=lambda s: s[0] * s[1])
        wide = [s for s in sizes if max(s) >= BLEND_MIN_SIDE]
        height, width = wide[0] if wide else sizes[-1]
        maps = self.blend_maps[(height, width)]
        weights = self.blend_tokens.to(maps)
        scores = (maps * weights[:, None, :]).sum(-1).reshape(2, 1, height, width)
        scores = F.max_pool2d(scores, 3, stride=1, padding=1)
        scores = F.interpolate(scores, size=latent_size)
        scores = scores / scores.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        mask = scores > self.blend_threshold
        return (mask[:1] | mask).float()

    def blend(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Local blend after step ``step``: the target keeps its latents only inside the mask."""
        if step + 1 <= self.blend_first:
            return latents
        mask = self.blend_mask(tuple(latents.shape[-2:])).to(latents)
        return latents[:1] + mask * (latents - latents[:1])


def p2p_defaults(cross_replace_steps: float, self_replace_steps: float,
                 blend_start: float) -> dict[str, Any]:
    """The Prompt-to-Prompt parameters every card of the family shares, with a paper's schedule."""
    return {"num_inference_steps": 50, "guidance_scale": 7.5,
            "cross_replace_steps": cross_replace_steps, "self_replace_steps": self_replace_steps,
            "local_blend": True, "blend_threshold": 0.3, "blend_start": blend_start,
            "equalizer": ""}


def p2p_check(method: str) -> Callable[..., None]:
    """The parameter check of a Prompt-to-Prompt family card named ``method`` (for
    :func:`~editeval.core.registry.register_method`); ``inversion`` is checked where the card has it."""
    def check(*, num_inference_steps: int, cross_replace_steps: float, self_replace_steps: float,
              blend_threshold: float, blend_start: float, **params: Any) -> None:
        if params.get("inversion", INVERSIONS[0]) not in INVERSIONS:
            raise ValueError(f"{method}: inversion must be one of {', '.join(INVERSIONS)}, "
                             f"got {params['inversion']!r}")
        for name, value in (("cross_replace_steps", cross_replace_steps),
                            ("self_replace_steps", self_replace_steps),
                            ("blend_start", blend_start)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{method}: {name} is a fraction of the steps in [0, 1], "
                                 f"got {value}")
        if not 0.0 < blend_threshold < 1.0:
            raise ValueError(f"{method}: blend_threshold must be in (0, 1), got {blend_threshold}")
        if num_inference_steps < 1:
            raise ValueError(f"{method}: num_inference_steps must be >= 1, got "
                             f"{num_inference_steps}")
    return check


def run_prompt_to_prompt(pipe: Any, inputs: EditInputs, *, inversion: str,
                         num_inference_steps: int, guidance_scale: float,
                         cross_replace_steps: float, self_replace_steps: float, local_blend: bool,
                         blend_threshold: float, blend_start: float, equalizer: str,
                         self_replace_max_tokens: int = 16 * 16, method: str = "p2p",
                         **inversion_options: Any) -> MethodOutput:
    """Invert ``inputs.image`` with ``inversion`` and edit it with Prompt-to-Prompt.

    ``inversion_options`` go to :func:`~editeval.diffusion.inversion.invert_source`. Returns the
    target branch (RGB at the model's resolution) and intermediates: ``inversion``,
    ``inversion_cached``, ``alignment`` (replace/refine), ``blend_words`` (source, target) and
    ``null_text_iterations`` (null-text optimisation iterations; 0 for other inversions).

    Parameters are in range (:func:`p2p_check`, run by ``edit()`` before the model loads).

    Raises:
        ValueError: an equalizer word missing from the target prompt.
    """
    alignment = align_prompts(pipe.tokenizer, inputs.source_prompt, inputs.target_prompt)
    scales = parse_equalizer(pipe.tokenizer, inputs.target_prompt, equalizer) if equalizer else None
    source = invert_source(pipe, inputs.image, inputs.source_prompt, inversion,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           cache=inputs.inversion_cache, **inversion_options)
    conds = torch.cat([source.source_embeddings, encode_prompt(pipe, inputs.target_prompt)])
    controller = PromptToPromptController(alignment, num_inference_steps, cross_replace_steps,
                                          self_replace_steps, scales, self_replace_max_tokens,
                                          blend_threshold, blend_start)
    with control_attention(pipe.unet, controller):
        latents = sample_branches(pipe.unet, source.trajectory[-1], source.scheduler, conds,
                                  source.guidance, controller.blend if local_blend else None)
    source_words, target_words = alignment.blend_words
    return MethodOutput(decode_latents(pipe, latents[1:]), {
        "inversion": inversion,
        "inversion_cached": source.cached,
        "alignment": alignment.kind,
        "blend_words": [list(source_words), list(target_words)],
        "null_text_iterations": source.optimisation_steps,
    })


CARD = MethodCard(
    name="p2p",
    title="Prompt-to-Prompt",
    paper=Paper("Prompt-to-Prompt Image Editing with Cross Attention Control", "ICLR", 2023,
                "2208.01626"),
    strategy="training-free",
    subcategory="attention-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"inversion": "ddim", **p2p_defaults(0.8, 0.4, 0.0)},
    nfe_formula="num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps "
                "(source and target branches with guidance); inversion=null-text adds "
                "sum over steps of (3 + iterations run)",
    deviations="local blend on the coarsest cross-attention maps with a side of at least 16 "
               "tokens, else the finest (8x8 on the toy model; P2P: 16x16 on SD); word swap "
               "decided by token counts, refinement otherwise (P2P: by word counts); the aligner "
               "pairs padding with padding; local blend on by default with the blend words found "
               "by the aligner (P2P: opt-in, words given by hand)",
    note="Default inversion: DDIM, the P2P paper's own real-image procedure; P2P with null-text "
         "inversion is the 'null-text' method. inversion= ddim | null-text | negative-prompt | "
         "proxedit | direct. equalizer: 'word:scale,...' on the target prompt. local_blend=false "
         "for global edits (style change), where a blend mask would hold the edit back.",
)


@register_method(CARD, check=p2p_check(CARD.name))
def prompt_to_prompt(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                     inversion: str, **params: Any) -> MethodOutput:
    """Edit ``inputs.image`` from the source prompt to the target prompt (module docstring)."""
    return run_prompt_to_prompt(pipe, inputs, inversion=inversion, **params)
