"""Crash-safe staging of verified chunks in the state directory.

Layout: ``<state>/<session id>/`` holds ``manifest.json`` (the verified envelope), ``image.part``
(the image being assembled, full length, written in place) and ``chunks.log`` (4-byte big-endian
indices of chunks written).  A chunk is written with ``pwrite`` and made durable with
``fdatasync`` *before* its index is appended to the log (and that append is synced too), so after
a crash at any instant the log never names a chunk whose bytes are not on disk.

The log is only a hint: on resume every logged chunk is read back and hashed against the signed
manifest, so a torn write, a truncated log or a file corrupted between runs costs at most the
chunks affected, never a wrong byte.  The whole image is hashed once more before it is handed
on, and the output appears only by an atomic rename.  One process at a time uses a session
directory (``flock``).

*Hashing ahead.*  That last hash reads the whole image back, ~1 ms per MB of SHA-256 on a
device: at the end of a download, after the chunks' own hashes.  So it is taken while the
download runs instead, on a thread (``hashlib`` and ``pread`` let go of the GIL, so it uses
another core): whoever makes a chunk's bytes final in ``image.part`` (`final`, or
`record_written`) tells the hasher, which hashes the image in order as far as the chunks in
place reach.  A chunk final is never written again in this session.  `finish` stops the
thread and hashes what it did not reach, exactly as before: the check is the same, only done
earlier, and on a device with one core it costs what it did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from otacast.schemas.policy import VerifiedManifest

from .durable import copy_into, create_beside, remove_abandoned, write_durably
from .errors import StateError

_INDEX = struct.Struct(">I")
# A session directory is named by its release's session id (8 bytes, in hex).
_SESSION_DIR = re.compile(r"[0-9a-f]{16}")
# Read granularity when re-hashing: large enough to stream at disk speed, small enough to keep
# the receiver's memory flat.
READ_BLOCK = 1024 * 1024


def pwrite_all(fd: int, data: memoryview, position: int) -> None:
    """Write all of `data` at `position` (``pwrite`` may write less than asked)."""
    while data:
        written = os.pwrite(fd, data, position)
        data = data[written:]
        position += written


def session_directories(state_dir: Path) -> list[Path]:
    """The session directories in `state_dir` (each a download kept for resuming), sorted;
    none if `state_dir` cannot be listed (nothing was ever kept there)."""
    try:
        return sorted(p for p in state_dir.iterdir() if _SESSION_DIR.fullmatch(p.name))
    except OSError:
        return []


def _state_error(what: str, path: Path, exc: OSError) -> StateError:
    # The failing call names its file when it has one: say which, not just the directory.
    where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path else ""
    return StateError(f"cannot {what} {path}{where}: {exc.strerror or exc}")


class _Hasher:
    """The whole image's SHA-256, taken in order on a thread as its chunks become final
    (module doc, *Hashing ahead*)."""

    def __init__(self, fd: int, verified: VerifiedManifest) -> None:
        self._fd = fd
        self._manifest = verified.manifest
        self.digest = hashlib.sha256()
        self.position = 0  # bytes of the image hashed, from the start
        self._next = 0  # the next chunk to hash
        self._final: set[int] = set()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def final(self, indices: Iterable[int]) -> None:
        with self._wake:
            self._final.update(indices)
            if self._next not in self._final or self._stopping.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="otacast-image-hash", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        count = self._manifest.chunk_count
        while True:
            with self._wake:
                while not self._stopping.is_set() and self._next not in self._final:
                    self._wake.wait()
                if self._stopping.is_set():
                    return
                index = self._next
            offset, length = self._manifest.chunk_span(index)
            end = offset + length
            position = offset
            try:
                while position < end:
                    block = os.pread(self._fd, min(READ_BLOCK, end - position), position)
                    if not block:
                        return  # `finish` reads it again and says what is wrong
                    self.digest.update(block)
                    position += len(block)
                    self.position = position
                    if self._stopping.is_set():
                        return
            except OSError:
                return  # (as above)
            with self._wake:
                self._next = index + 1
                if self._next == count:
                    return

    def stop(self) -> None:
        """Stop the thread (at the end of a block): `digest` then covers `position` bytes."""
        with self._wake:
            self._stopping.set()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


class Staging:
    def __init__(self, state_dir: Path, verified: VerifiedManifest) -> None:
        self.manifest = verified.manifest
        self.directory = state_dir / self.manifest.session_id.hex()
        self.part = self.directory / "image.part"
        self.log_path = self.directory / "chunks.log"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _state_error("use state directory", self.directory, exc) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise StateError(f"another otacast process is using {self.directory}") from None
        # The manifest a later run resumes from (`otacast.plugin.resume`): replaced atomically
        # and durably, and only when it differs, so no power cut leaves it torn.
        manifest_path = self.directory / "manifest.json"
        manifest = verified.envelope.to_file_bytes()
        try:
            if _read_or_none(manifest_path) != manifest:
                write_durably(manifest_path, manifest, "the manifest", mode=0o600)
        except StateError:
            self.close()
            raise
        try:
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
            self._reserve()
            self._log = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self.close()
            raise _state_error("prepare staging in", self.directory, exc) from None
        self._hasher = _Hasher(self._fd, verified)

    def _reserve(self) -> None:
        """Allocate the whole image now, so a full disk is reported at the start, not midway.

        Without room, the downloads of other releases that no process is using are given up
        first (see `_remove_abandoned`) and the allocation is tried once more.
        """
        length = self.manifest.image.length
        try:
            os.posix_fallocate(self._fd, 0, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the filesystem cannot: sparse
                os.ftruncate(self._fd, max(length, os.fstat(self._fd).st_size))
            elif exc.errno == errno.ENOSPC and self._remove_abandoned():
                os.posix_fallocate(self._fd, 0, length)
            else:
                raise
        if os.fstat(self._fd).st_size > length:
            os.ftruncate(self._fd, length)

    def _remove_abandoned(self) -> bool:
        """Remove the partial downloads of other releases that no process holds; whether any.

        A download abandoned for a newer release (or never finished) keeps its whole image
        reserved; on a state partition sized for one image, every later release would then
        fail for want of space, for ever.  Its verified chunks are worth less than the release
        being fetched now: if that release is ever wanted again, it is fetched again.
        """
        removed = False
        for other in session_directories(self.directory.parent):
            if other == self.directory:
                continue
            try:
                lock = os.open(other / "lock", os.O_RDWR)
            except FileNotFoundError:
                lock = None  # made, never used: nothing can be holding it
            except OSError:
                continue
            try:
                if lock is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: in use
                shutil.rmtree(other)
                removed = True
            except OSError:
                continue
            finally:
                if lock is not None:
                    os.close(lock)
        return removed

    def resume(self) -> set[int]:
        """Chunks already on disk whose bytes still match their signed hashes."""
        try:
            with self.log_path.open("rb") as handle:
                log = handle.read()
        except OSError as exc:
            raise _state_error("read", self.log_path, exc) from None
        count = self.manifest.chunk_count
        claimed = {_INDEX.unpack_from(log, i)[0] for i in range(0, len(log) - len(log) % 4, 4)}
        try:
            resumed = {i for i in claimed if i < count and self._matches(i)}
        except OSError as exc:
            raise _state_error("read back", self.part, exc) from None
        self._hasher.final(resumed)
        return resumed

    def final(self, index: int) -> None:
        """Chunk `index`'s verified bytes are in ``image.part`` for good (durable or not yet):
        the image's hash may take them (module doc, *Hashing ahead*)."""
        self._hasher.final((index,))

    def _matches(self, index: int) -> bool:
        offset, length = self.manifest.chunk_span(index)
        digest = hashlib.sha256()
        position = offset
        while position < offset + length:
            block = os.pread(self._fd, min(READ_BLOCK, offset + length - position), position)
            if not block:
                return False
            digest.update(block)
            position += len(block)
        return digest.digest() == self.manifest.chunks.sha256[index]

    def write_chunk(self, index: int, data: bytes) -> None:
        """Persist a verified chunk durably, then record it."""
        offset, length = self.manifest.chunk_span(index)
        if len(data) != length:
            raise ValueError("chunk length does not match the manifest")
        try:
            pwrite_all(self._fd, memoryview(data), offset)
        except OSError as exc:
            raise _state_error("write chunk to", self.part, exc) from None
        self.mark_written(index)

    def mark_written(self, index: int) -> None:
        """Record chunk `index` as on disk, its bytes in ``image.part`` made durable first.

        Whoever wrote the bytes (`write_chunk`, or the symbol store completing a chunk in
        place) calls this only for bytes that match the chunk's signed hash.
        """
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _state_error("record chunk in", self.log_path, exc) from None
        self.record_written([index])

    def record_written(self, indices: Sequence[int]) -> None:
        """Record chunks whose verified bytes the caller has already made durable in
        ``image.part`` (``fdatasync``), with one append and one sync for all of them."""
        if not indices:
            return
        self._hasher.final(indices)
        entries = b"".join(_INDEX.pack(index) for index in indices)
        try:
            written = 0
            while written < len(entries):
                written += os.write(self._log, entries[written:])
            os.fdatasync(self._log)
        except OSError as exc:
            raise _state_error("record chunk in", self.log_path, exc) from None

    def finish(self, out: Path) -> None:
        """Hash the whole image once more (as far as it was not hashed ahead), then move it
        to `out` atomically."""
        hasher = self._hasher
        hasher.stop()
        digest, position = hasher.digest.copy(), hasher.position  # (kept for a later try)
        try:
            while position < self.manifest.image.length:
                block = os.pread(self._fd, READ_BLOCK, position)
                if not block:
                    break
                digest.update(block)
                position += len(block)
        except OSError as exc:
            raise _state_error("read back", self.part, exc) from None
        if position != self.manifest.image.length or digest.digest() != self.manifest.image.sha256:
            raise StateError(f"staged image in {self.directory} does not match the manifest")
        # Run as root, and `out` may lie in a directory other users can write: nothing here
        # opens, writes or chmods a path that a planted link could redirect (`durable`).
        tmp: Path | None = None
        try:
            os.fsync(self._fd)
            if out.parent.stat().st_dev == os.fstat(self._fd).st_dev:
                os.fchmod(self._fd, 0o644)
                # link(2) neither follows nor replaces what is at its new name (EEXIST), and
                # 64 random bits make the name one nobody can plant anything at in advance.
                # The image is locked first, as `durable.create_beside` locks its files: the
                # link is the same file, which no other write of `out` takes for abandoned.
                remove_abandoned(out)
                with contextlib.suppress(OSError):  # (nothing else locks it: never held up)
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
                os.link(self.part, tmp)
                tmp.replace(out)
            else:
                fd, tmp = create_beside(out)
                try:
                    os.fchmod(fd, 0o644)
                    copy_into(fd, self.part)
                    os.fsync(fd)
                    tmp.replace(out)  # (still locked: no sweep takes it for abandoned)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise _state_error("write", out, exc) from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def discard(self) -> None:
        """Remove the session's state (after the image has been handed on)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        hasher = getattr(self, "_hasher", None)
        if hasher is not None:
            hasher.stop()  # before its descriptor closes
        for name in ("_fd", "_log", "_lock"):
            fd = getattr(self, name, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
