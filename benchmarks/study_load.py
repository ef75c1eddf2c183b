"""Load on the study app: concurrent raters on loopback, each rating a fixed number of pages.

A toy run with fake edits (5 methods x 20 samples = 100 edits, per-edit layout, every edit rated
by k = raters x pages / 100 raters) is served by ``editeval study serve`` in its own process, as
in a real study; :func:`editeval.study.load.run_load` lets one client per rater GET its page and
POST its ratings (then submit its last page once more, which must be refused). The script prints
the response times (p50, p95, p99) per request kind and checks the store: ratings stored, lost
(acknowledged but not stored, or stored with other values) and duplicated.

    python benchmarks/study_load.py [--raters 50] [--pages 20]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from study_helpers import fake_run  # noqa: E402

from editeval.core.lmm_score import FACTORS  # noqa: E402
from editeval.run import Run  # noqa: E402
from editeval.study import StudyStore  # noqa: E402
from editeval.study.app import free_port  # noqa: E402
from editeval.study.load import run_load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", type=int, default=50)
    parser.add_argument("--pages", type=int, default=20, help="pages (ratings) per rater")
    args = parser.parse_args()
    edits = 100
    k = max(1, args.raters * args.pages // edits)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = fake_run(Path(tmp) / "run", {f"m{i}": "target" for i in range(5)},
                           per_task=3, limit=edits // 5)
        with Run.open(run_dir) as run, StudyStore(run) as store:
            store.configure(k, "per-edit")
            raters = store.add_raters(args.raters)
            keys = {e.edit_key: e.job_id for e in store.edits()}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "editeval.cli", "study", "serve",
                                   str(run_dir), "--port", str(port)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(url, timeout=1)
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        sys.exit("the study server did not start")
                    time.sleep(0.2)
            result = run_load(url, [r.token for r in raters], args.pages)
        finally:
            server.terminate()
            server.wait(timeout=20)
        with sqlite3.connect(run_dir / "results.sqlite") as db:
            rows = db.execute("SELECT rater_id, job_id, accuracy, preservation, quality, realism "
                              "FROM study_ratings").fetchall()
    ids = {r.token: r.rater_id for r in raters}
    stored = {(row[0], row[1]): tuple(row[2:]) for row in rows}
    lost = sum(stored.get((ids[token], keys[key])) != tuple(scores[f] for f in FACTORS)
               for (token, key), scores in result.acknowledged.items())
    requests = sum(len(v) for v in result.latencies.values())
    print(f"{args.raters} concurrent raters x {args.pages} pages on loopback (server in its own "
          f"process): {requests} requests in {result.seconds:.1f} s "
          f"({requests / result.seconds:.0f} requests/s)")
    print(f"ratings acknowledged {len(result.acknowledged)}, stored {len(rows)}, lost {lost}, "
          f"duplicated {len(rows) - len(stored)}, double submits refused "
          f"{result.duplicates_refused}/{args.raters}, errors {len(result.errors)}")
    print()
    print("| request | n | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for kind in [*result.latencies, None]:
        n = len(result.latencies[kind]) if kind else requests
        print(f"| {kind or 'all'} | {n} | {result.percentile(50, kind):.0f} | "
              f"{result.percentile(95, kind):.0f} | {result.percentile(99, kind):.0f} |")


if __name__ == "__main__":
    main()
