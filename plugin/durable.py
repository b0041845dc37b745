"""Small records the device must never find half-written: written whole, synced, renamed.

The installed record, an accepted trust set and the Mender module's deployment state decide
what the device accepts next, possibly after a power cut; a reader sees the old file or the
new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import StateError


def write_durably(path: Path, data: bytes, what: str) -> None:
    """Replace `path` with `data` atomically, on disk before this returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself must survive a power cut
        finally:
            os.close(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
