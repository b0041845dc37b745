"""File input and output for the publisher: bounded reads, atomic writes.

Outputs appear whole or not at all: the bytes go to a temporary file in the destination's
directory, are fsynced, then renamed over the destination, and the directory is fsynced so the
rename survives a crash.  On any failure the temporary file is removed and nothing is left.

The temporary file comes from `create_beside` (``tempfile.mkstemp``): created exclusively
(``O_EXCL``, which never follows a symbolic link) under a name nobody can predict, then written
and chmod-ed through its descriptor only.  A publisher may run as root and write into directories
others can write (a web root, ``/tmp``): at a predictable name a planted link would either be
written through or, with ``O_EXCL`` alone, block the write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import ReadError, WriteError


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """Read at most `limit` + 1 bytes, so the caller's size check sees oversize input."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as exc:
        raise ReadError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    atomic_write_all([(path, data, mode)], overwrite=overwrite)


def atomic_write_all(files: list[tuple[Path, bytes, int]], *, overwrite: bool = True) -> None:
    """Write several files so that a failure leaves the old ones in place.

    Every file is first written and fsynced under a temporary name, and a target that is a
    directory is refused, before anything is renamed; the renames (which then cannot fail for
    want of space) happen in the order given, so callers put the most precious file last.
    """
    for path, _, _ in files:
        if path.is_dir():
            raise WriteError(f"cannot write {path}: it is a directory")
    existing = [str(path) for path, _, _ in files if path.exists()]
    if existing and not overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        raise WriteError(f"{' and '.join(existing)} {verb}; pass --force to replace")
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
        for tmp, path in staged:
            try:
                tmp.replace(path)
            except OSError as exc:
                raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()  # only files not renamed into place are still there
    for directory in {path.parent for _, path in staged}:
        _fsync_directory(directory)


@contextlib.contextmanager
def atomic_stream(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write (and seek in) that becomes `path` whole when the block ends without an
    exception, fsynced like `atomic_write`; on any failure nothing is left."""
    try:
        fd, tmp = create_beside(path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    renamed = False
    try:
        with os.fdopen(fd, "w+b") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        renamed = True
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                tmp.unlink()
    _fsync_directory(path.parent)


def create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file (mode 0600) in `path`'s directory to become `path`: its descriptor and
    name.  Raises OSError; the caller removes it unless it renames it over `path`."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, Path(name)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    try:
        fd, tmp = create_beside(path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we chose
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    return tmp


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable; a failure here cannot undo them, so it is not an error."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
