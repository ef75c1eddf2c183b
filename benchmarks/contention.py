"""Seconds per edit on an idle machine and beside busy processes, per torch thread count.

Each setting runs in a fresh process (the thread count is fixed when torch starts): it loads the
toy InstructPix2Pix model, makes one warm-up edit, then times ``--edits`` edits, first with the
machine as it is, then with ``--busy`` competing processes that each spin one core. Settings:
torch's own default (one thread per core), editeval's default (:mod:`editeval.core.threads`) and
one thread. The ratio contended/idle is the slowdown that a user sharing the machine sees; the
goal for editeval's default is at most about 2.

    python benchmarks/contention.py [--edits 3] [--busy 1] [--steps 20]

Run it on an otherwise idle machine: the "idle" column assumes nothing else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(threads: str, edits: int, steps: int) -> None:
    """Time ``edits`` toy InstructPix2Pix edits with ``threads`` ("torch", "editeval" or a count)."""
    import torch

    from editeval import EditRequest, edit, load_pipeline
    from editeval.core.threads import configure_threads
    from editeval.toyworld.dataset import load_editeval_toy

    if threads == "editeval":
        configure_threads(None)
    elif threads != "torch":
        configure_threads(int(threads))
    pipe = load_pipeline("toy", "instruction")
    sample = load_editeval_toy().samples[0]
    request = EditRequest(sample.image_path, instruction=sample.instruction, seed=0,
                          params={"num_inference_steps": steps})
    edit(request, "instructpix2pix", pipe=pipe)  # warm-up: first-call allocations, lazy imports
    seconds = []
    for _ in range(edits):
        start = time.perf_counter()
        edit(request, "instructpix2pix", pipe=pipe)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": seconds}))


def measure(threads: str, edits: int, steps: int, busy: int) -> tuple[int, float]:
    """(torch threads, median seconds per edit) of one child process beside ``busy`` spinners."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        done = subprocess.run([sys.executable, __file__, "--child", threads, "--edits", str(edits),
                               "--steps", str(steps)], env=env, capture_output=True, text=True,
                              check=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["threads"], statistics.median(result["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=3, help="timed edits per measurement")
    parser.add_argument("--busy", type=int, default=1, help="competing busy processes")
    parser.add_argument("--steps", type=int, default=20, help="InstructPix2Pix steps per edit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.edits, args.steps)
        return
    print(f"toy InstructPix2Pix, {args.steps} steps, median of {args.edits} edits; "
          f"{os.cpu_count()} cores, {args.busy} busy process(es) for 'contended'")
    print(f"{'setting':<22}{'threads':>8}{'idle s':>10}{'contended s':>13}{'ratio':>8}")
    for label, threads in (("torch default", "torch"), ("editeval default", "editeval"),
                           ("one thread", "1")):
        count, idle = measure(threads, args.edits, args.steps, busy=0)
        _, contended = measure(threads, args.edits, args.steps, busy=args.busy)
        print(f"{label:<22}{count:>8}{idle:>10.2f}{contended:>13.2f}{contended / idle:>8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
