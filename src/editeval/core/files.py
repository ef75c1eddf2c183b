"""Writing files safely: :func:`atomic_write`, and which write errors mean the disk takes no more.

Every file editeval writes through :func:`atomic_write` (edited images, intermediates, cached
inversions, a run's ``config.json``) gets the permissions a plain ``open(path, "w")`` gives: 0666
less the user's umask (0644 under the usual 022, 0600 under 077).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# Write errors that every later write to the same disk will repeat: no space left, a read-only
# file system, the user's disk quota used up. A run stops on them instead of failing job after job.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(handle)`` under a temporary name in the same folder, then
    rename it into place, so a process killed mid-write never leaves a half-written file under
    ``path``. The file's mode is 0666 less the umask, as for any file the user creates.

    Args:
        path: the file to write (its folder must exist); an existing file is replaced.
        write: called once with the temporary file, open for binary writing.

    Raises:
        OSError: the file cannot be written (no space, a read-only disk, no permission), with
            ``filename`` set to ``path``; the temporary file is removed. Errors ``write`` raises
            that are not about the file system (no errno) pass unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{secrets.token_hex(6)}{path.suffix}")
    created = False
    try:
        # O_EXCL: never another process's file; mode 0o666: the kernel applies the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException as err:
        if created:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise
