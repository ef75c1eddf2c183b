"""Edits per minute of the Ray executor with 1 and 2 workers on the toy model, as a ratio, and the
driver's overhead per job (Ray with one worker against the local executor).

Every configuration makes the same jobs (SDEdit on the first ``--samples`` editeval-toy samples)
in a fresh run directory and records every outcome as ``editeval bench`` does. Only the edits are
timed, from the first job handed out to the last outcome recorded: starting Ray and the workers
and loading the model are paid once per run and left out. The local run and every worker use one
torch thread; a local Ray instance gets ``--cpus`` CPUs (one per worker). Configurations are run
``--repeats`` times in turn and the median is taken.

The overhead is given all in (wall time per job, Ray against local) and split: the time per job
outside the edit itself (handing the job out, moving the result back, recording it; the edit's own
seconds are measured where it runs) against the local executor's.

    python benchmarks/scaling.py [--samples 24] [--steps 50] [--repeats 2] [--cpus 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def timed(executor, config) -> tuple[float, float]:
    """Seconds from the first job handed out to the last outcome recorded (the workers started and
    the model loaded before), and the edits' own seconds (the method calls, summed)."""
    from editeval.bench.plan import plan_run
    from editeval.bench.record import record
    from editeval.run import Run

    with Run.for_config(config) as run:
        plan = plan_run(config, run)
        executor.prepare(config, {"text-to-image"})
        run.save_config()
        start, editing = time.perf_counter(), 0.0
        for outcome in executor.execute(plan.pending, run, config):
            stored = record(run, outcome)
            if stored.error is not None:
                raise SystemExit(f"{outcome.job.job_id} failed: {stored.error}")
            editing += outcome.result.wall_seconds
        return time.perf_counter() - start, editing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    from editeval.core.threads import configure_threads

    configure_threads(1)
    import ray

    from editeval.bench import LocalExecutor
    from editeval.bench.ray_executor import RayExecutor
    from editeval.run import RunConfig

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    executors = {
        "local": LocalExecutor,
        "ray, 1 worker": lambda: RayExecutor(workers=1, threads=1),
        "ray, 2 workers": lambda: RayExecutor(workers=2, threads=1),
    }
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in executors}
    root = Path(tempfile.mkdtemp(prefix="editeval-scaling-"))
    try:
        for repeat in range(args.repeats):
            for name, make in executors.items():
                config = RunConfig(dataset="editeval-toy", methods=["sdedit"], model="toy",
                                   out=root / f"{name}-{repeat}", limit=args.samples,
                                   params={"sdedit": {"num_inference_steps": args.steps}})
                seconds[name].append(timed(make(), config))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    jobs = args.samples
    median = {name: statistics.median(wall for wall, _ in values)
              for name, values in seconds.items()}
    edit = {name: statistics.median(each for _, each in values) / jobs
            for name, values in seconds.items()}
    print(f"SDEdit on the toy model, {args.steps} steps, {jobs} jobs, one torch thread per "
          f"process, median of {args.repeats}")
    print(f"{'executor':<16} {'seconds':>8} {'edits/min':>10} {'s/edit in its process':>22}")
    for name, value in median.items():
        print(f"{name:<16} {value:>8.2f} {60 * jobs / value:>10.1f} {edit[name]:>22.3f}")
    print(f"2 workers against 1: x{median['ray, 1 worker'] / median['ray, 2 workers']:.2f} "
          "edits per minute")
    outside = {name: 1000 * (median[name] / jobs - edit[name])
               for name in ("local", "ray, 1 worker")}
    overhead = 1000 * (median["ray, 1 worker"] - median["local"]) / jobs
    print(f"per job, ray with 1 worker against local: {overhead:+.1f} ms all in "
          f"({100 * overhead * jobs / 1000 / median['local']:+.1f}%); time outside the edit "
          f"(handing out, transfer, recording): local {outside['local']:.1f} ms, "
          f"ray {outside['ray, 1 worker']:.1f} ms")


if __name__ == "__main__":
    main()
