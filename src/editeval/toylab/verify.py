"""Does every method really edit? Each registered method on ``editeval-toy``, judged by the oracle.

    python -m editeval.toylab.verify --per-task 10 --write docs/methods.md

runs every method (or ``--methods a,b``) on the first ``--per-task`` samples of each of the 7 tasks
with the toy models and the method's defaults, through the resumable benchmark runner (the run
directory, default ``runs/toy-verify``, keeps edits and inversions: the same command again only adds
what is missing), then judges every edit against the ground truth and prints a Markdown table:
per method, the oracle's edit success per task and on average, the PSNR of the unedited region
against the ground-truth target (style change edits the whole image and is left out of it), the
uncached NFE per edit and the seconds per edit on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from editeval.core.samples import TASKS

SHORT = {"object_addition": "add", "object_replacement": "replace", "object_removal": "remove",
         "background_change": "background", "style_change": "style",
         "texture_change": "texture", "action_change": "action"}


def verify(methods: list[str], per_task: int, out: Path, model: str = "toy",
           params: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``methods`` on ``editeval-toy`` (resumable, in ``out``) and judge every edit.

    Returns ``{method: {"success": {task: rate}, "mean_success": rate, "unedited_psnr": dB,
    "nfe": mean uncached NFE, "backward": mean backward passes through the denoiser, "seconds":
    mean, "n": edits, "failed": jobs}}``; rates in [0, 1].
    The NFE is each edit's own cost, as if no inversion were cached (so it does not depend on
    which method of the run computed a shared inversion first).
    """
    from editeval.bench import run_bench
    from editeval.run import Run, RunConfig
    from editeval.toyworld.dataset import judge_sample

    run_bench(RunConfig(dataset="editeval-toy", methods=methods, model=model, out=out,
                        per_task=per_task, params=params or {}))
    success: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unedited: dict[str, list[float]] = defaultdict(list)
    cost: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    with Run.open(out) as run:
        samples = {s.id: s for s in run.dataset.select(per_task=per_task)}
        for row in run.rows():
            if row.method not in methods or row.sample_id not in samples:
                continue
            if row.status != "done":
                failed[row.method] += 1
                continue
            judged = judge_sample(samples[row.sample_id], Image.open(run.image_path(row)))
            success[row.method][row.task].append(judged.score.success)
            if not np.isnan(judged.unedited_psnr_vs_target):  # nan: no unedited region
                unedited[row.method].append(judged.unedited_psnr_vs_target)
            nfe = row.nfe if row.uncached_nfe is None else row.uncached_nfe
            cost[row.method].append((nfe, row.wall_seconds, row.backward_passes or 0))
    report = {}
    for method in methods:
        per = {task: float(np.mean(v)) for task, v in success[method].items()}
        report[method] = {
            "success": per,
            "mean_success": float(np.mean(list(per.values()))) if per else float("nan"),
            "unedited_psnr": _mean_psnr(unedited[method]),
            "nfe": float(np.mean([c[0] for c in cost[method]])) if cost[method] else float("nan"),
            "seconds": float(np.mean([c[1] for c in cost[method]])) if cost[method] else float("nan"),
            "backward": float(np.mean([c[2] for c in cost[method]])) if cost[method] else float("nan"),
            "n": len(cost[method]),
            "failed": failed[method],
        }
    return report


def _mean_psnr(values: list[float]) -> float:
    """The mean PSNR (dB) of the edits whose unedited region differs from the target; ``inf``
    when every one equals it exactly (a method that copies the region), ``nan`` with none."""
    finite = [v for v in values if np.isfinite(v)]
    if finite:
        return float(np.mean(finite))
    return float("inf") if values else float("nan")


def markdown(report: dict[str, dict[str, Any]]) -> str:
    """The report as a Markdown table, one row per method (success in %, PSNR in dB)."""
    from editeval.core import get_method

    header = ["method", "paper", *(SHORT[t] for t in TASKS), "mean", "unedited PSNR (dB)",
              "NFE/edit", "backward/edit", "s/edit", "edits", "failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in report.items():
        card = get_method(method).card
        cells = [method, f"{card.paper.venue} {card.paper.year}"]
        cells += [f"{100 * row['success'][t]:.0f}" if t in row["success"] else "-" for t in TASKS]
        cells += [f"{100 * row['mean_success']:.1f}", f"{row['unedited_psnr']:.1f}",
                  f"{row['nfe']:.0f}", f"{row['backward']:.0f}", f"{row['seconds']:.2f}",
                  str(row["n"]), str(row["failed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from editeval.core import list_methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all",
                        help="comma-separated registry names, or 'all' (default)")
    parser.add_argument("--per-task", type=int, default=10,
                        help="samples per task (max 30; at least 10 for a table to publish)")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--out", type=Path, default=Path("runs/toy-verify"),
                        help="run directory (resumable)")
    parser.add_argument("--write", type=Path, default=None,
                        help="also write the table, with the command and date, to this file "
                             "(an existing file keeps what follows its table)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    methods = ([card.name for card in list_methods()] if args.methods == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    table = markdown(verify(methods, args.per_task, args.out, args.model))
    print(table)
    if args.write is not None:
        command = " ".join(["python -m editeval.toylab.verify", *argv])
        old = args.write.read_text() if args.write.exists() else ""
        args.write.write_text(_document(table, command, args) + _after_table(old))


def _after_table(document: str) -> str:
    """What follows the first method table in ``document`` (the hand-written analysis that a
    rewrite keeps), or "" when it has none."""
    start = document.find("\n| method |")
    if start < 0:
        return ""
    end = document.find("\n\n", start + 1)
    return "" if end < 0 else document[end + 1:]


def _document(table: str, command: str, args: argparse.Namespace) -> str:
    return f"""# Methods, verified on the toy world

The methods below, each run with its paper's defaults on the toy models (`--model {args.model}`)
over the first {args.per_task} samples of each `editeval-toy` task, every edit judged by the oracle
against exact ground truth (docs/toyworld.md). A registered method without a row has not been
verified yet (`editeval methods` lists them all; the sections after the table say why).

- **Success**: the oracle reads every edited attribute as the target says (%, per task, and the
  mean of the 7 tasks).
- **Unedited PSNR**: the region outside the edit mask against the ground-truth target, in dB
  (style change, whose mask is the whole image, is left out), averaged over the edits where it
  differs from the target; `inf` when every edit keeps it exactly.
- **NFE/edit**: denoiser (UNet) evaluations per edit, a classifier-free-guidance batch of 2
  counting 2, uncached: the method's own cost, as if no inversion had been reused from the run's
  inversion cache, so it does not depend on which method of the run ran first (each card's
  formula: `editeval methods`).
- **backward/edit**: backward passes through the denoiser per edit (gradient steps of test-time
  finetuning and of guidance by gradients; 0 for the other methods).
- **s/edit**: wall time per edit as spent in the run (a method that reused an inversion from the
  run's cache did not spend the time to compute it), on this machine:
  {platform.processor() or platform.machine()}, CPU, {torch.get_num_threads()} torch thread(s).
- **edits, failed**: edits judged, and jobs that raised an error.

Produced by `{command}` on {datetime.date.today().isoformat()}.

{table}
"""


if __name__ == "__main__":
    main()
