"""Progress of long work inside one edit (an optimisation's steps and its loss).

A method reports its steps through :func:`step_progress`; whether anything is shown depends on
the caller: ``editeval edit`` installs a display with :func:`showing_progress` (a bar with the
step, the total and the latest loss), while a benchmark run, which has its own bar over jobs,
installs none, and then reporting costs nothing and prints nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

Update = Callable[..., None]
"""``update(**values)``: one step done; ``values`` (floats, such as ``loss=0.12``) are shown."""

Display = Callable[[str, int], AbstractContextManager[Update]]
"""``display(description, total)``: a context manager around a task of ``total`` steps that gives
its :data:`Update`."""

_DISPLAY: ContextVar[Display | None] = ContextVar("editeval_progress_display", default=None)


@contextmanager
def showing_progress(display: Display) -> Iterator[None]:
    """Show every :func:`step_progress` task run inside the block with ``display``."""
    token = _DISPLAY.set(display)
    try:
        yield
    finally:
        _DISPLAY.reset(token)


@contextmanager
def step_progress(description: str, total: int) -> Iterator[Update]:
    """A task of ``total`` steps (``description``: what runs, e.g. ``"imagic: text embedding"``);
    call the yielded update once a step. Shown only inside :func:`showing_progress`."""
    display = _DISPLAY.get()
    if display is None:
        yield _quiet
        return
    with display(description, total) as update:
        yield update


def _quiet(**values: float) -> None:
    return None
