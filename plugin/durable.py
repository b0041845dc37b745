"""Files the device must never find half-written, or written somewhere it did not mean.

The installed record, an accepted trust set and the Mender module's deployment state decide
what the device accepts next, possibly after a power cut; a reader sees the old file or the
new one, never a torn one: the bytes go to a temporary file beside the destination, are synced,
and the temporary file is renamed over the destination.

The temporary file is made by `create_beside` (``tempfile.mkstemp`` in the destination's
directory): created exclusively (``O_CREAT | O_EXCL``, which never follows a symbolic link) with
mode 0600, under a name nobody can predict.  The device runs as root and some destinations lie
in directories other users can write (an ``--out`` in ``/tmp``): a temporary file at a
predictable name (``.NAME.PID.tmp``) could be a link planted there in advance, and opening,
writing or chmod-ing it by path would write through the link to whatever file it names.  After
creation everything is done through the descriptor (``fchmod``, ``fsync``), and the final
``rename`` replaces a link at the destination itself, never the file it points to.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import tempfile
import time
from pathlib import Path

from .errors import StateError

# Copies are made in reads of this size: large enough that the per-read cost vanishes, small
# enough to stay out of the resident set of a device copying a GB image.
COPY_BLOCK = 1 << 20


# A temporary file beside a destination that is unlocked and older than this was left by a
# process killed while it wrote (a power cut while a GB image is copied to `--out`): the next
# write of the same destination removes it.  Writers lock theirs (``flock``) right after
# creating it and hold the lock until the rename; the age only covers that first instant.
ABANDONED_AFTER_SECONDS = 60.0


def create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file in `path`'s directory to become `path`: its descriptor and name,
    locked for as long as the descriptor is open.  Temporary files of `path` that killed
    writers left are removed first (`remove_abandoned`).

    Raises OSError; the caller removes the file if it does not rename it over `path`.
    """
    remove_abandoned(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with contextlib.suppress(OSError):  # (no locks, as on some NFS mounts: never swept young)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, Path(name)


def remove_abandoned(path: Path) -> None:
    """Remove the unlocked temporary files of `path` older than `ABANDONED_AFTER_SECONDS`:
    those `create_beside` names (``tempfile.mkstemp``'s 8 characters) and those of the hard-link
    hand-off (`otacast.plugin.staging`: 16 hex digits), no other file.

    Nothing here follows a link or blocks on a FIFO that another user planted under such a
    name (``O_NOFOLLOW | O_NONBLOCK``; opened for writing, as an NFS lock needs, never
    written); unlinking a name removes only that name."""
    ours = re.compile(rf"\.{re.escape(path.name)}\.(?:[a-z0-9_]{{8}}|[0-9a-f]{{16}})\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not ours.fullmatch(tmp.name):
            continue
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime >= ABANDONED_AFTER_SECONDS:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a writer holds it
                tmp.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_into(fd: int, source: Path) -> None:
    """Append the whole of `source` to the file open at `fd`."""
    with source.open("rb") as handle:
        while block := handle.read(COPY_BLOCK):
            write_all(fd, block)


def sync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, what: str, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (mode `mode`) atomically, on disk before this returns."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_beside(path)
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
            tmp.replace(path)  # (still locked: no sweep takes it for abandoned meanwhile)
        finally:
            os.close(fd)
        sync_directory(path.parent)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise StateError(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
