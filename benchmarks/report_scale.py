"""`editeval report` at EditEval v2 size: 150 samples x 20 methods (3000 edits) of a fake run.

Fake edits are 512x512 PNGs (SD 1.5's resolution), every fourth method returns a 64x64 mask, one
job in 50 fails, every edit has a comparative judgement (one answer of about 1.5 kB per sample,
shared by its 20 edits) and three metric values. The script prints the time of a first build and
of a rebuild with nothing changed, the size of index.html and of the folder, and, where Chromium
and Playwright are installed, the page's load time and the time one filter change takes.

    python benchmarks/report_scale.py [--samples 150] [--methods 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import chromium_path  # noqa: E402

from editeval.core.lmm_score import FACTORS, overall  # noqa: E402
from editeval.data import load_dataset  # noqa: E402
from editeval.report import build_report  # noqa: E402
from editeval.run import Run, RunConfig  # noqa: E402


def make_run(out: Path, n_samples: int, n_methods: int) -> Run:
    samples = load_dataset("editeval-toy").select(per_task=-(-n_samples // 7))[:n_samples]
    methods = [f"method{m:02d}" for m in range(n_methods)]
    run = Run.for_config(RunConfig(dataset="editeval-toy", methods=methods, model="fake",
                                   out=out))
    run.save_config()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 512, dtype=np.float32)
    metrics = []
    for i, sample in enumerate(samples):
        raw = f"Sample {sample.id}. " + " ".join(
            f"Image {k + 1}: accuracy 7, preservation 8, quality 6, realism 7; the edit keeps "
            f"the layout." for k in range(n_methods))
        for position, method in enumerate(methods, start=1):
            job = f"{method}/{sample.id}/seed0"
            keys = dict(job_id=job, method=method, sample_id=sample.id, task=sample.task, seed=0)
            if (i + position) % 50 == 0:
                run.store.record_failed(**keys, error="RuntimeError: out of memory at step 17")
                continue
            pixels = np.stack([ramp[None, :].repeat(512, 0), ramp[:, None].repeat(512, 1),
                               np.full((512, 512), 40.0 * (position % 6))], axis=-1)
            pixels[128:384, 128:384] = rng.integers(0, 255, 3)
            intermediates = ({"edit_region": torch.rand(64, 64)} if position % 4 == 0 else None)
            run.store.record_done(**keys, image=Image.fromarray(pixels.astype(np.uint8)),
                                  nfe=50 * position, uncached_nfe=50 * position,
                                  wall_seconds=0.1 * position, model="fake", params={},
                                  intermediates=intermediates)
            scores = dict(zip(FACTORS, rng.integers(1, 11, 4).tolist()))
            run.store.record_judgement(job_id=job, judge="fake", protocol_version="v",
                                       mode="comparative", repeat=0, status="ok", scores=scores,
                                       s_all=overall(scores), position=position,
                                       group_size=n_methods, message="", raw=raw, cache_key=None)
            metrics += [(job, "clip_t", "fake", "whole", float(rng.normal(25, 3)), None),
                        (job, "psnr", "pixels", "unedited", float(rng.normal(25, 5)), None),
                        (job, "lpips", "fake", "unedited", float(rng.uniform(0, 0.5)), None)]
    run.store.record_metric_values(metrics)
    return run


def browse(index: Path) -> tuple[float, float]:
    """Seconds to load the page, and for one task-filter change, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        start = time.perf_counter()
        page.goto(index.as_uri(), wait_until="load")
        loaded = time.perf_counter() - start
        task = page.locator("#task-filter option").nth(1).get_attribute("value")
        start = time.perf_counter()
        page.select_option("#task-filter", task)
        page.evaluate("new Promise(r => requestAnimationFrame(() => r()))")
        filtered = time.perf_counter() - start
        browser.close()
    return loaded, filtered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--methods", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="make the run and report here and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="report-scale-"))
    try:
        start = time.perf_counter()
        with make_run(root / "run", args.samples, args.methods) as run:
            made = time.perf_counter() - start
            rows = run.rows()
            start = time.perf_counter()
            index = build_report(run, root / "report")
            first = time.perf_counter() - start
            start = time.perf_counter()
            build_report(run, root / "report")
            again = time.perf_counter() - start
        files = [p for p in (root / "report").rglob("*") if p.is_file()]
        thumbs = sum(p.stat().st_size for p in files if "thumbs" in p.parts)
        print(f"run: {args.samples} samples x {args.methods} methods = {len(rows)} jobs "
              f"({sum(r.status == 'failed' for r in rows)} failed), made in {made:.0f} s")
        print("| measure | value |\n|---|---|")
        print(f"| first build | {first:.1f} s |")
        print(f"| rebuild, nothing changed | {again:.1f} s |")
        print(f"| index.html | {index.stat().st_size / 1e6:.2f} MB |")
        print(f"| thumbnails | {thumbs / 1e6:.1f} MB in "
              f"{sum('thumbs' in p.parts for p in files)} files |")
        if chromium_path():
            loaded, filtered = browse(index)
            print(f"| page load in Chromium | {loaded:.1f} s |")
            print(f"| one task filter change | {filtered * 1000:.0f} ms |")
    finally:
        if args.keep is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
