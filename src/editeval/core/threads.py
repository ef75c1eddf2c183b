"""How many CPU threads torch uses for editeval's work.

torch's default is one intra-op thread per core. When another process keeps one of those cores
busy (a second job, a browser, a test run), every parallel region waits at its barrier for the
thread that lost its core, a scheduler time slice each time; a 64 px model runs thousands of small
parallel regions per edit, and an edit took 20 to 60 times its idle time
(``benchmarks/contention.py`` measures it). editeval's default therefore leaves room for one busy
process: **half the cores this process may run on, at least one**. With one competing process the
threads still each have a core, so an edit stays within about its idle time; on a GPU the thread
count hardly matters.

Precedence: an explicit count (``editeval --threads N``, :func:`configure_threads`) over the
``OMP_NUM_THREADS`` environment variable over the default.
"""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """The number of cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def default_threads() -> int:
    """Half the available cores, at least one: room for one other busy process."""
    return max(1, available_cores() // 2)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count for this process (and ``OMP_NUM_THREADS`` for the
    processes it starts) and return it.

    Args:
        threads: the count (>= 1); ``None`` takes ``OMP_NUM_THREADS`` when set, else
            :func:`default_threads`.

    Raises:
        ValueError: ``threads`` (or ``OMP_NUM_THREADS``) is not a positive integer.
    """
    source = "--threads"
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        source = "OMP_NUM_THREADS"
        try:
            threads = int(os.environ["OMP_NUM_THREADS"])
        except ValueError:
            threads = 0
    if threads is None:
        threads = default_threads()
    if threads < 1:
        raise ValueError(f"{source} must be a positive integer (the number of CPU threads), "
                         f"got {os.environ.get('OMP_NUM_THREADS') if source != '--threads' else threads!r}")
    # before torch starts, the variable sets OpenMP's and MKL's pools without importing torch (a
    # second on the command line); a torch already running is told directly
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
