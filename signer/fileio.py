"""File input and output for the publisher: bounded reads, atomic writes.

Outputs appear whole or not at all: the bytes go to a temporary file in the destination's
directory, are fsynced, then renamed over the destination, and the directory is fsynced so the
rename survives a crash.  On any failure the temporary file is removed and nothing is left.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import ReadError, WriteError


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """Read at most `limit` + 1 bytes, so the caller's size check sees oversize input."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as exc:
        raise ReadError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    if not overwrite and path.exists():
        raise WriteError(f"{path} exists; pass --force to replace it")
    directory = path.parent if str(path.parent) else Path()
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what we chose
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
