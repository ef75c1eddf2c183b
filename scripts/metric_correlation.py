"""How well each classic metric predicts real edit success on editeval-toy.

    python scripts/metric_correlation.py RUN_DIR [RUN_DIR ...] [--csv edits.csv]

Each RUN_DIR is an ``editeval bench --dataset editeval-toy`` run scored with
``editeval score RUN_DIR --metrics ...`` (and optionally ``--judge oracle``). Prints Markdown: the
per-edit Pearson / Spearman correlation of every stored metric with the oracle's ground truth
(edit success, share of edited attributes right, unedited-region PSNR against the ground-truth
target, oracle S_all), the success ROC AUC, and the per-(run, method, task) group correlations
that include FID and KID. See ``editeval.metrics.correlation``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from editeval.metrics.correlation import (
    TRUTHS,
    correlation_table,
    edit_table,
    group_table,
    settings_markdown,
    to_markdown,
)
from editeval.run import Run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="scored editeval-toy run directories")
    parser.add_argument("--csv", type=Path, help="also write the per-edit table here")
    args = parser.parse_args(argv)
    runs = [Run.open(path) for path in args.runs]
    edits = edit_table(runs)
    if args.csv:
        edits.to_csv(args.csv, index=False)
    truths = [t for t in TRUTHS if edits[t].notna().any()]
    print(f"{len(edits)} edits in {edits['setting'].nunique()} settings. Per setting, all tasks: "
          "ground truth, then each metric's mean over the edits that have a value:")
    print()
    print(settings_markdown(edits))
    print()
    print("Per edit, all settings and tasks pooled:")
    print()
    print(to_markdown(correlation_table(edits, tuple(truths)), truths))
    print()
    print("Per (setting, task) group: group means of the per-image metrics, and FID / KID:")
    print()
    print(to_markdown(group_table(runs, edits), ["group success", "group unedited_psnr"],
                      with_auc=False))


if __name__ == "__main__":
    main()
