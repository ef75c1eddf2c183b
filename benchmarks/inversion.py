"""Inversions for editing and Prompt-to-Prompt word swaps on the toy model, against the bars.

    python benchmarks/inversion.py [--model toy] [--scenes 8] [--pairs 24] [--steps 50]

Prints a Markdown table:
- reconstruction PSNR of random scenes sampled back at guidance 7.5 from each inversion (DDIM at
  guidance 1, null-text with all 500 iterations, with early stopping at each of ``--epsilons`` and
  with 3 iterations at every step, negative-prompt, ProxEdit, Direct Inversion) beside the VAE's
  own reconstruction PSNR; bars: null-text within 1 dB of the VAE; null-text with early stopping
  at no more than a third of the 50 x 10 = 500 iterations and within 0.5 dB of the full run (3
  iterations at every step spend 150, a third, evenly: it shows what that budget buys);
- word swaps (one object's colour or shape word changed): the oracle's edit success and the PSNR
  of the unedited region for each method of the Prompt-to-Prompt family, beside the same judgement
  of the ground-truth targets passed through the VAE alone; bars: success >= 70%, PSNR >= 25 dB.

Null-text inversion with all 500 iterations costs about 45 s an image on 2 busy CPU cores (500
UNet forward and backward passes); the whole run with the defaults about an hour.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

METHODS = ("p2p", "null-text", "negative-prompt-inversion", "proxedit", "direct-inversion")


def main() -> None:
    from editeval.diffusion.inversion import NULL_TEXT_INNER_STEPS
    from editeval.diffusion.inversion_cache import InversionCache
    from editeval.models import load_pipeline
    from editeval.toylab.evaluate import vae_psnr
    from editeval.toylab.p2p_quality import (
        reconstruction_quality,
        vae_ceiling,
        word_swap_pairs,
        word_swap_quality,
    )
    from editeval.toyworld.scenes import sample_scene

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epsilons", default="1e-5,4e-3,1.6e-2,3e-2",
                        help="null-text early-stopping thresholds eps to try (step i stops below "
                             "eps + 2e-5 i; 1e-5: the paper's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["reconstruction", "word-swap"])
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    rows: list[tuple[str, str, str]] = []

    def row(measure: str, value: str, bar: str = "") -> None:
        rows.append((measure, value, bar))
        print(f"  {measure}: {value}", flush=True)

    if "reconstruction" not in args.skip:
        rng = np.random.default_rng(args.seed)
        scenes = [sample_scene(rng) for _ in range(args.scenes)]
        vae = vae_psnr(pipe, scenes)
        row("VAE reconstruction PSNR (dB)", f"{vae:.2f}")
        reference = args.steps * NULL_TEXT_INNER_STEPS
        results = {}
        early = [(f"null-text, early stopping (eps {eps})", "null-text",
                  {"early_stop_epsilon": float(eps)}) for eps in args.epsilons.split(",")]
        for label, kind, options in (
                ("DDIM inversion (guidance 1), sampled at 7.5", "ddim", {}),
                ("null-text, all iterations", "null-text", {"early_stop_epsilon": 0.0}),
                *early,
                ("null-text, 3 iterations at every step", "null-text",
                 {"early_stop_epsilon": 0.0, "null_text_inner_steps": 3}),
                ("negative-prompt inversion", "negative-prompt", {}),
                ("ProxEdit (NPI + proximal and inversion guidance)", "proxedit", {}),
                ("Direct Inversion", "direct", {})):
            start = time.perf_counter()
            results[label] = quality = reconstruction_quality(pipe, scenes, kind, args.steps,
                                                              7.5, **options)
            seconds = (time.perf_counter() - start) / len(scenes)
            iterations = (f", {quality['optimisation_steps']:.0f} of {reference} iterations"
                          if kind == "null-text" else "")
            bar = ""
            if label.startswith("null-text, all"):
                bar = f">= {vae - 1:.2f} (VAE - 1 dB)"
            elif kind == "null-text":  # early stopping, or a third of the iterations spent evenly
                full = results["null-text, all iterations"]["psnr"]
                bar = f">= {full - 0.5:.2f} (full - 0.5 dB), <= {reference // 3} iterations"
            row(f"reconstruction PSNR at guidance 7.5, {label} (dB)",
                f"{quality['psnr']:.2f}{iterations}; {seconds:.1f} s/image", bar)
    if "word-swap" not in args.skip:
        pairs = word_swap_pairs(args.pairs, seed=args.seed)
        ceiling = vae_ceiling(pipe, pairs)
        row("word swap, ground-truth target through the VAE: success / unedited PSNR",
            f"{100 * ceiling['success']:.1f}% / {ceiling['unedited_psnr']:.2f} dB")
        cache = InversionCache(memory_items=4 * args.pairs)
        for method in args.methods.split(","):
            start = time.perf_counter()
            quality = word_swap_quality(pipe, pairs, method, {"num_inference_steps": args.steps},
                                        cache)
            seconds = (time.perf_counter() - start) / len(pairs)
            tally: dict[str, list[bool]] = {}
            for ok, pair in zip(quality["successes"], pairs):
                tally.setdefault(pair.attribute, []).append(ok)
            by_word = "; ".join(f"{attribute} swaps {sum(oks)}/{len(oks)}"
                                for attribute, oks in sorted(tally.items()))
            row(f"word swap, {method}: success / unedited PSNR",
                f"{100 * quality['success']:.1f}% / {quality['unedited_psnr']:.2f} dB ({by_word}); "
                f"{seconds:.1f} s/edit", ">= 70% / >= 25 dB")
    print("\n| measure | value | bar |\n|---|---|---|")
    for measure, value, bar in rows:
        print(f"| {measure} | {value} | {bar} |")


if __name__ == "__main__":
    main()
