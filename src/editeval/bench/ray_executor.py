"""The Ray executor: a run's jobs on the workers of a Ray cluster, one machine or many.

:class:`RayExecutor` starts a local Ray instance, or joins a cluster when given an address (or
``RAY_ADDRESS``), and starts one worker (a Ray actor) per GPU of the cluster, or, on a CPU-only
cluster or with ``--device cpu``, one per slot of ``cpus_per_worker`` CPUs. Each worker:

- runs torch at the driver's thread count, passed to it explicitly (Ray would set one thread per
  reserved CPU): every job is seeded by its own seed, never by the worker, so an edit on the CPU is
  bit-identical to the local executor's at the same thread count;
- loads a model kind on its first job of that kind and keeps it; the driver hands a worker jobs of
  a kind it has loaded while there are any (jobs are grouped by model kind), at most ``in_flight``
  at a time, and every kind of the run is loaded by some worker in :meth:`RayExecutor.prepare`, so
  a missing model fails the run before anything is written;
- returns each job's :class:`~editeval.bench.execute.Outcome` (images, NFE, intermediates moved
  to the CPU); the driver records it as it comes back. Workers never write the results store.
  They write one thing: the run's inversion cache, ``RUN_DIR/inversions`` when the worker sees
  the run directory at the driver's path (a shared filesystem; files are written under a temporary
  name and renamed, so workers on several machines share it safely), else a cache of that
  machine's own in its temporary folder (``editeval-inversions/``): the same results, only
  inversions are computed once per machine instead of once per run.

A worker that dies mid-job (killed, out of memory, crashed) is restarted by Ray and gets jobs
again once it answers; its job goes back to the front of the queue and runs on the first worker
free, at most ``retries`` times more, and is then an outcome with the error and the reason. Jobs
queued behind it on that worker go back to the queue without counting as a try. Judging and
metrics stay on the driver.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editeval.bench.execute import ExecutorError, Outcome, run_job
from editeval.bench.plan import Job
from editeval.core.registry import get_method
from editeval.core.tensors import to_cpu
from editeval.core.threads import configure_threads
from editeval.diffusion.inversion_cache import InversionCache
from editeval.models import ModelNotAvailableError, load_pipeline
from editeval.run import Run, RunConfig

INSTALL_HINT = "pip install 'editeval[ray]'"

try:
    import ray
    from ray.exceptions import (
        ObjectLostError,
        OutOfMemoryError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )
except ImportError as err:  # pragma: no cover - the CLI checks before importing this module
    raise ImportError("the Ray executor needs Ray, which is not installed: "
                      f"{INSTALL_HINT}") from err

# what ray.get raises when the process running a job is gone (killed, out of memory, crashed,
# its machine lost), as opposed to an error inside the job (RayTaskError)
WORKER_LOST = (RayActorError, WorkerCrashedError, OutOfMemoryError, ObjectLostError)


class EditWorker:
    """One Ray worker (run as an actor): edits jobs with the pipelines it has loaded, one per model
    kind, kept across jobs.

    Args:
        config: the run's configuration (model, device, dtype, method parameters).
        run_dir: the run directory's absolute path on the driver.
        threads: torch's CPU thread count, the driver's.
    """

    def __init__(self, config: RunConfig, run_dir: str, threads: int) -> None:
        configure_threads(threads)
        self.config = config
        self.run_dir = Path(run_dir)
        self.pipes: dict[str, Any] = {}
        self._cache: InversionCache | None = None

    def load(self, kind: str) -> None:
        """Load the pipeline of model kind ``kind`` (once).

        Raises:
            ModelNotAvailableError: the model cannot be loaded on this worker's machine.
            ValueError: the run's device is not there (``--device cuda`` without a GPU).
        """
        if kind not in self.pipes:
            self.pipes[kind] = load_pipeline(self.config.model, kind, device=self.config.device,
                                             dtype=self.config.dtype)

    def ready(self) -> None:
        """Return at once: answers when the worker is up (again, after a restart)."""

    def missing_methods(self, names: list[str]) -> tuple[str, list[str]]:
        """This machine's name and which of the methods ``names`` its registry lacks (a plugin
        package not installed here)."""
        missing = []
        for name in names:
            try:
                get_method(name)
            except KeyError:
                missing.append(name)
        return socket.gethostname(), missing

    def edit(self, job: Job, kind: str) -> Outcome:
        """Run ``job`` on the pipeline of ``kind`` (loaded first when needed); a model that cannot
        be loaded here is the job's error, like any error of the edit."""
        try:
            self.load(kind)
        except (ModelNotAvailableError, ValueError) as err:
            return Outcome(job, error=f"{type(err).__name__}: {err}")
        outcome = run_job(job, self.pipes[kind], self.config, self.inversion_cache())
        if outcome.result is not None:
            outcome.result.intermediates = to_cpu(outcome.result.intermediates)
        return outcome

    def inversion_cache(self) -> InversionCache:
        """``RUN_DIR/inversions`` when this machine sees the run directory (its ``config.json``,
        written by the driver before the first job), else this machine's own cache in its
        temporary folder."""
        if self._cache is None:
            if (self.run_dir / "config.json").is_file():
                folder = self.run_dir / "inversions"
            else:
                digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]
                folder = Path(tempfile.gettempdir()) / "editeval-inversions" / digest
            self._cache = InversionCache(folder)
        return self._cache


@dataclass
class _Slot:
    """The driver's view of one worker: its actor, the model kinds it holds, its jobs in flight
    (oldest first: a worker runs them in that order, so the first one is the one running), and
    whether it is up (after a death, Ray restarts it; a job sent before it answers again could
    fail without having run, and be blamed for a death it did not cause)."""

    actor: Any
    kinds: set[str] = field(default_factory=set)
    running: deque[tuple[Any, Job]] = field(default_factory=deque)
    up: bool = True


class RayExecutor:
    """Runs a run's jobs on Ray workers (see the module docstring).

    Args:
        address: the cluster to join (the head's ``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``);
            ``None`` takes ``RAY_ADDRESS``, and without it starts a local Ray instance on this
            machine (stopped again when the run ends). A driver already connected
            (``ray.init()`` called before) uses its cluster.
        workers: how many workers; default one per GPU of the cluster, or on a CPU-only cluster
            (or with ``config.device == "cpu"``) one per ``cpus_per_worker`` CPUs.
        cpus_per_worker: CPUs a worker reserves on a CPU-only cluster; default ``threads``.
        threads: torch's CPU thread count in the workers; default this process's
            (``torch.get_num_threads()``, which ``editeval --threads N`` sets).
        in_flight: jobs handed to a worker at once (>= 1): the next one waits in its queue while
            one runs, so a worker never idles between jobs.
        retries: how many times a job whose worker died is run again before it is recorded as
            failed (>= 0).

    Raises:
        ValueError: a count below its minimum.
    """

    def __init__(self, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: int | None = None, threads: int | None = None,
                 in_flight: int = 2, retries: int = 2) -> None:
        self.threads = threads or torch.get_num_threads()
        self.cpus_per_worker = cpus_per_worker or self.threads
        for name, value, least in (("workers", workers, 1), ("threads", self.threads, 1),
                                   ("cpus_per_worker", self.cpus_per_worker, 1),
                                   ("in_flight", in_flight, 1), ("retries", retries, 0)):
            if value is not None and value < least:
                raise ValueError(f"RayExecutor: {name} must be at least {least}, got {value}")
        self.address = address
        self.workers = workers
        self.in_flight = in_flight
        self.retries = retries
        self.loads: Counter[str] = Counter()  # model kind -> loads by workers (restarts count)
        self._slots: list[_Slot] = []
        self._started_ray = False

    def prepare(self, config: RunConfig, model_kinds: set[str]) -> None:
        """Connect to Ray (or start it), start the workers and have every model kind loaded by
        at least one of them.

        Raises:
            ExecutorError: the cluster cannot be reached, has too few GPUs or CPUs for the
                workers, a worker's machine lacks one of the run's methods (a plugin package not
                installed there), or a worker died while loading a model.
            ModelNotAvailableError, ValueError: a model cannot be loaded, or the run's device
                is not on the workers (as :meth:`EditWorker.load` raises them).
        """
        self._connect()
        try:
            count, options = self._worker_resources(config)
            actor = ray.remote(max_restarts=-1, max_task_retries=0, **options)(EditWorker)
            run_dir = str(Path(config.out).resolve())
            self._slots = [_Slot(actor.remote(config, run_dir, self.threads)) for _ in range(count)]
            checks = [slot.actor.missing_methods.remote(config.methods) for slot in self._slots]
            found = (_worker_get(ref, "starting") for ref in checks)
            lacking = {host: names for host, names in found if names}
            if lacking:
                raise ExecutorError(
                    "the Ray workers on " + "; ".join(f"{host} lack {', '.join(names)}"
                                                      for host, names in lacking.items())
                    + ": install the packages that provide these methods on every machine")
            self.loads = Counter()
            kinds = sorted(model_kinds)
            loading = []
            # worker i takes kind i (round robin both ways): each kind is loaded somewhere
            for index in range(max(count, len(kinds))):
                slot, kind = self._slots[index % count], kinds[index % len(kinds)]
                if kind not in slot.kinds:
                    slot.kinds.add(kind)
                    self.loads[kind] += 1
                    loading.append((kind, slot.actor.load.remote(kind)))
            for kind, ref in loading:
                _worker_get(ref, f"loading the {kind} model")
        except BaseException:
            self._release()
            raise

    def execute(self, jobs: Iterable[Job], run: Run, config: RunConfig) -> Iterator[Outcome]:
        """Run ``jobs`` on the workers of :meth:`prepare`; yield each outcome as it comes back.
        The workers are stopped (and a Ray instance this executor started) when the iteration
        ends or is abandoned."""
        queues: dict[str, deque[Job]] = {}
        for job in jobs:
            queues.setdefault(get_method(job.method).card.model_kind, deque()).append(job)
        tries: Counter[str] = Counter()
        pending: dict[Any, _Slot] = {}  # jobs in flight by result reference
        probes: dict[Any, _Slot] = {}  # workers restarting: "ready" calls by result reference
        try:
            self._fill(queues, pending)
            while pending or (probes and any(queues.values())):  # restarts: when jobs wait
                (ready,), _ = ray.wait([*pending, *probes], num_returns=1)
                if ready in probes:
                    slot = probes.pop(ready)
                    try:
                        ray.get(ready)
                        slot.up = True
                    except WORKER_LOST:  # not restarted yet: ask again shortly
                        time.sleep(0.1)
                        probes[slot.actor.ready.remote()] = slot
                else:
                    slot = pending[ready]
                    # a worker finishes its jobs in the order it got them: take its results in
                    # that order up to the ready one, so a death is blamed on the job running
                    while ready in pending:
                        ref, job = slot.running.popleft()
                        del pending[ref]
                        try:
                            outcome = ray.get(ref)
                        except RayTaskError as err:  # the worker's own code failed, not the edit
                            outcome = Outcome(job, error=_first_line(err.cause))
                        except WORKER_LOST as err:
                            outcome = self._worker_lost(slot, job, err, queues, pending, tries)
                            probes[slot.actor.ready.remote()] = slot  # jobs again once it answers
                        if outcome is not None:
                            yield outcome
                self._fill(queues, pending)
        finally:
            self._release()

    def _fill(self, queues: dict[str, deque[Job]], pending: dict[Any, _Slot]) -> None:
        """Hand out jobs, each to the least busy worker, until every worker has ``in_flight``
        or none is left: of a model kind the worker holds while there are any, else of the kind
        with the most jobs left (which it then loads, once)."""
        while any(queues.values()):
            up = [each for each in self._slots if each.up]
            if not up:
                return
            slot = min(up, key=lambda each: len(each.running))
            if len(slot.running) >= self.in_flight:
                return
            left = {kind: len(queue) for kind, queue in queues.items() if queue}
            kind = max([kind for kind in left if kind in slot.kinds] or left, key=left.__getitem__)
            if kind not in slot.kinds:
                slot.kinds.add(kind)
                self.loads[kind] += 1
            job = queues[kind].popleft()
            ref = slot.actor.edit.remote(job, kind)
            slot.running.append((ref, job))
            pending[ref] = slot

    def _worker_lost(self, slot: _Slot, culprit: Job, err: Exception,
                     queues: dict[str, deque[Job]], pending: dict[Any, _Slot],
                     tries: Counter[str]) -> Outcome | None:
        """The worker of ``slot`` died running ``culprit`` (Ray restarts it, with no model
        loaded): ``culprit`` goes back to the front of its queue, or, past the retry limit, is
        returned as failed; the jobs queued behind it go back to the queue untried."""
        for ref, job in reversed(slot.running):
            del pending[ref]  # their errors are not waited for
            queues[get_method(job.method).card.model_kind].appendleft(job)
        slot.running.clear()
        slot.kinds.clear()
        slot.up = False
        tries[culprit.job_id] += 1
        if tries[culprit.job_id] > self.retries:
            return Outcome(culprit, error=(
                f"WorkerDied: the Ray worker running this job died {tries[culprit.job_id]} times "
                "(killed, out of memory or crashed; its log is in the Ray session's logs folder "
                f"on its machine); last: {_first_line(err)}"))
        queues[get_method(culprit.method).card.model_kind].appendleft(culprit)
        return None

    def _connect(self) -> None:
        if ray.is_initialized():  # the caller's own Ray session (a notebook, the tests)
            return
        address = self.address or os.environ.get("RAY_ADDRESS")
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address is None:
            options["include_dashboard"] = False
        else:
            _check_reachable(address)
        try:
            ray.init(address=address or "local", **options)
        except (ConnectionError, RuntimeError) as err:
            where = (f"join the Ray cluster at {address}" if address
                     else "start a local Ray instance")
            raise ExecutorError(f"cannot {where}: {_first_line(err)}") from None
        self._started_ray = True

    def _worker_resources(self, config: RunConfig) -> tuple[int, dict[str, Any]]:
        """How many workers to start and what each reserves.

        Raises:
            ValueError: a CUDA device is asked for and the cluster has no GPU.
            ExecutorError: the cluster has no room for one worker, or for ``workers``.
        """
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        device = config.device or ""
        if device.startswith("cuda") and not gpus:
            raise ValueError(f"--device {device}: the Ray cluster has no GPU; use --device cpu "
                             "or join a cluster with GPUs")
        if device.startswith("cuda") or (gpus and not device):
            slots, options, unit = gpus, {"num_gpus": 1, "num_cpus": 1}, "1 GPU"
        else:
            slots = cpus // self.cpus_per_worker
            options = {"num_cpus": self.cpus_per_worker}
            unit = f"{self.cpus_per_worker} CPU{'s' * (self.cpus_per_worker > 1)}"
        count = self.workers or slots
        if not slots or count > slots:
            raise ExecutorError(
                f"the Ray cluster has {gpus} GPUs and {cpus} CPUs: room for {slots} workers at "
                f"{unit} each, not {count}; pass fewer --workers (or fewer --threads), or add "
                "machines to the cluster")
        return count, options

    def _release(self) -> None:
        """Stop the workers, and the Ray instance when this executor started or joined it."""
        for slot in self._slots:
            ray.kill(slot.actor)
        self._slots = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def _worker_get(ref: Any, doing: str) -> Any:
    """``ray.get(ref)`` for a worker's call in :meth:`RayExecutor.prepare`.

    Raises:
        ModelNotAvailableError, ValueError: as the worker raised them.
        ExecutorError: the worker failed otherwise, or died, ``doing`` what it did.
    """
    try:
        return ray.get(ref)
    except RayTaskError as err:
        if isinstance(err.cause, (ModelNotAvailableError, ValueError)):
            raise err.cause from None
        raise ExecutorError(f"a Ray worker failed {doing}: {_first_line(err.cause)}") from None
    except WORKER_LOST as err:
        raise ExecutorError(f"a Ray worker died {doing} ({_first_line(err)}); if it ran out of "
                            "memory, use fewer workers per machine") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once on a ``HOST:PORT`` nothing listens on (``ray.init`` would retry for minutes).

    Raises:
        ExecutorError: naming the address and how to start a cluster.
    """
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # ray://..., auto: Ray resolves and reports these itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start its head "
            "with `ray start --head` and pass the address it prints, or leave --ray-address out "
            "to start a local Ray instance") from None


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
