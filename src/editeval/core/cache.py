"""Where editeval keeps what it builds on first use (tiny models, the offline tokenizer, the toy
split), and how a build is made safe when several processes start it at once."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where editeval keeps built models: ``$EDITEVAL_CACHE`` or ``~/.cache/editeval``."""
    return Path(os.environ.get("EDITEVAL_CACHE", Path.home() / ".cache" / "editeval"))


def build_once(path: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``path``, built by ``build(folder)`` unless ``path / marker`` exists; safe across processes.

    The folder is built under a temporary name and renamed into place, so a half-built model is
    never seen under ``path``; when another process finished first, its copy is kept.
    """
    if not (path / marker).exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        build(tmp)
        try:
            tmp.replace(path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp)
    return path
