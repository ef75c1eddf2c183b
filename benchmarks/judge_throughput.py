"""Judge throughput with bounded concurrency against a local fake server with fixed latency.

A scripted OpenAI-compatible server on 127.0.0.1, in its own process (as a real server would
be), answers every request after ``--latency`` seconds; the same toy run is scored in per-image mode with concurrency 1 and 8 (fresh caches), and
the script prints requests per second and the speed-up (goal: at least 6x).

    python benchmarks/judge_throughput.py [--items 48] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from judge_server import JudgeServer, chat, images_of, scores_json  # noqa: E402

from editeval.data import load_dataset  # noqa: E402
from editeval.judge import Protocol, make_backend, score_run  # noqa: E402
from editeval.run import Run, RunConfig  # noqa: E402


def make_run(root: Path, items: int) -> Run:
    """A run whose "copy" method returned every source unchanged."""
    samples = load_dataset("editeval-toy", root / "toy").samples[:items]
    run = Run.for_config(RunConfig(dataset="editeval-toy", methods=["copy"], model="fake",
                                   out=root / "run", data_dir=root / "toy"))
    run.save_config()
    for sample in samples:
        run.store.record_done(job_id=f"copy/{sample.id}/seed0", method="copy",
                              sample_id=sample.id, task=sample.task, seed=0,
                              image=Image.open(sample.image_path), nfe=0, uncached_nfe=0,
                              wall_seconds=0.0, model="fake", params={})
    return run


def _reply(latency: float):
    def reply(body, call):
        return 200, {}, chat(scores_json([(7, 7, 7, 7)] * len(images_of(body)))), latency
    return reply


def serve(latency: float, urls: multiprocessing.Queue) -> None:
    with JudgeServer(_reply(latency)) as server:
        urls.put(server.url)
        while True:
            time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp())
    run = make_run(root, args.items)
    rates = {}
    urls: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(args.latency, urls), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    try:
        for concurrency in (1, 8):
            shutil.rmtree(run.judge_cache_dir, ignore_errors=True)
            with sqlite3.connect(run.path / "results.sqlite") as db:
                db.execute("DELETE FROM judge_scores")
            backend = make_backend("openai:fake", run, base_url=url)
            start = time.perf_counter()
            summary = score_run(run, backend, Protocol(mode="per-image"), concurrency=concurrency)
            seconds = time.perf_counter() - start
            rates[concurrency] = summary.requests / seconds
            print(f"concurrency {concurrency}: {summary.requests} requests in {seconds:.2f} s "
                  f"= {rates[concurrency]:.2f} req/s")
    finally:
        server.terminate()
        shutil.rmtree(root)
    print(f"speed-up 8 vs 1: {rates[8] / rates[1]:.2f}x (goal >= 6x)")


if __name__ == "__main__":
    main()
