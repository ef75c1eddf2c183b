"""The cost and quality of the test-time finetuning methods, at the paper's setting and a cheaper one.

For each method, on the toy model over the first ``--per-task`` samples of every ``editeval-toy``
task (judged by the oracle against ground truth, as ``editeval.toylab.verify``): its optimisation
steps, NFE, backward passes and seconds per edit, its mean success and unedited-region PSNR, once
with the paper's defaults and once with the cheaper setting of :data:`CHEAPER` (a tenth of the
optimisation steps), so the cost-quality curve of each method is seen.

    python benchmarks/finetuning.py [--methods dds,cds,...] [--per-task 2] [--out runs/bench-finetuning]

Resumable: every (method, setting) is a benchmark run in its own folder under ``--out``. The
paper's settings of the finetuning methods take minutes per edit on a CPU: start with
``--per-task 1`` (7 edits each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHEAPER: dict[str, dict[str, int]] = {
    "dds": {"num_iterations": 20},
    "cds": {"num_iterations": 20},
    "forgedit": {"finetune_steps": 4},
    "imagic": {"embedding_steps": 100, "finetune_steps": 150},
}
"""The cheaper setting of each method: a tenth of its optimisation steps."""

STEPS: dict[str, tuple[str, ...]] = {
    "dds": ("num_iterations",),
    "cds": ("num_iterations",),
    "forgedit": ("finetune_steps",),
    "imagic": ("embedding_steps", "finetune_steps"),
}
"""The parameters that count a method's optimisation steps (summed in the table)."""


def main(argv: list[str] | None = None) -> None:
    from editeval.core import get_method
    from editeval.toylab.verify import verify

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(CHEAPER),
                        help=f"comma-separated, of {', '.join(CHEAPER)} (default: all)")
    parser.add_argument("--per-task", type=int, default=2, help="samples per task (default 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-finetuning"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CHEAPER]
    if unknown:
        parser.error(f"no cheaper setting for {', '.join(unknown)}; choose from "
                     f"{', '.join(CHEAPER)}")
    print("| method | setting | optimisation steps | NFE/edit | backward/edit | s/edit | success % "
          "| unedited PSNR (dB) | edits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        defaults = get_method(method).card.defaults
        for setting, params in (("paper", {}), ("cheaper", CHEAPER[method])):
            used = {**defaults, **params}
            row = verify([method], args.per_task, args.out / f"{method}-{setting}",
                         params={method: params})[method]
            steps = sum(int(used[name]) for name in STEPS[method])
            changed = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            print(f"| {method} | {setting} ({changed}) | {steps} | {row['nfe']:.0f} | "
                  f"{row['backward']:.0f} | {row['seconds']:.2f} | "
                  f"{100 * row['mean_success']:.1f} | {row['unedited_psnr']:.1f} | {row['n']} |",
                  flush=True)


if __name__ == "__main__":
    main()
