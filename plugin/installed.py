"""The record of what is installed: ``<state dir>/installed.json``.

It is what anti-rollback compares against: ``otacast fetch`` and ``otacast install`` refuse a
release whose sequence is not above the recorded one (unless ``--installed-sequence`` is given).
Written atomically after an installer reports success; a missing file means nothing installed
yet, an unreadable or malformed one is an error rather than a silent reset (which would reopen
the door to rollbacks).

Beside it, ``installed.blockindex`` is the installed release's block index
(`otacast.schemas.blockindex`), which the delta lane needs (`otacast.plugin.lane`: the index
patch for the installed release turns it into the new release's index).  `stage_index` builds
it from the verified image right after the installer succeeded (``installed.blockindex.pending``,
only when it equals the index the manifest signs), and `write_installed` moves it into place
with the record, or removes an older one, so the file on disk is always the recorded release's
or absent.  It is 16 bytes per 4 KiB of image (0.39%), never read beyond the length its own
header gives (at most ``MAX_INDEX_BYTES``), and a file that is missing, unreadable or does not
hash to what the lane expects only means the full index is taken instead (the index group).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from otacast.schemas import blockindex
from otacast.schemas.blockindex import BlockIndex, IndexBuilder
from otacast.schemas.errors import MalformedIndex
from otacast.schemas.limits import MAX_INDEX_BYTES
from otacast.schemas.policy import VerifiedManifest

from .durable import sync_directory, write_durably
from .errors import StateError

RECORD = "installed.json"
INDEX = "installed.blockindex"
PENDING_INDEX = INDEX + ".pending"
# Bytes per read while hashing an installed image for its index (sequential reads, bounded).
INDEX_READ_BYTES = 4 * 1024 * 1024
# The record is a few hundred bytes; never read more from a path that might be anything.
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Installed:
    sequence: int
    name: str
    version: str
    sha256: str
    status: str


def read_installed(state_dir: Path) -> Installed | None:
    path = state_dir / RECORD
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        record = json.loads(data)
        installed = Installed(
            sequence=record["sequence"],
            name=record["name"],
            version=record["version"],
            sha256=record["sha256"],
            status=record["status"],
        )
    except (ValueError, KeyError, TypeError):
        raise StateError(f"{path} is not a valid installed record; fix or remove it") from None
    if not isinstance(installed.sequence, int) or isinstance(installed.sequence, bool):
        raise StateError(f"{path} has a non-integer sequence; fix or remove it")
    return installed


def write_installed(state_dir: Path, verified: VerifiedManifest, status: str) -> Installed:
    m = verified.manifest
    installed = Installed(m.sequence, m.name, m.version, m.image.sha256.hex(), status)
    data = (json.dumps(installed.__dict__, sort_keys=True) + "\n").encode()
    write_durably(state_dir / RECORD, data, "the installed release")
    _promote_index(state_dir, verified)
    return installed


def stage_index(state_dir: Path, verified: VerifiedManifest, image: Path) -> bool:
    """Build the block index of `image` (verified, just installed) and keep it as the pending
    installed index when it is the one the manifest signs; whether it was kept.  Never fails
    the install: an image that cannot be read leaves no index (the lane then takes its own)."""
    info = verified.manifest.index
    if info is None:
        return False
    builder = IndexBuilder()
    try:
        with image.open("rb") as handle:
            while data := handle.read(INDEX_READ_BYTES):
                builder.update(data)
    except OSError:
        return False
    data = builder.finish().build()
    if hashlib.sha256(data).digest() != info.sha256:
        return False
    try:
        write_durably(state_dir / PENDING_INDEX, data, "the installed block index")
    except StateError:
        return False
    return True


def _promote_index(state_dir: Path, verified: VerifiedManifest) -> None:
    """The pending index becomes the installed one if it is this release's; otherwise no index
    is kept (an older release's would not describe what is installed)."""
    info = verified.manifest.index
    pending, target = state_dir / PENDING_INDEX, state_dir / INDEX
    try:
        ours = info is not None and _sha256_of(pending) == info.sha256
        if ours:
            pending.replace(target)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            with contextlib.suppress(FileNotFoundError):
                pending.unlink()
        sync_directory(state_dir)
    except OSError:
        with contextlib.suppress(OSError):
            target.unlink()  # at worst no index: the full index is taken instead


def _sha256_of(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return None
    return hashlib.sha256(data).digest() if len(data) <= MAX_INDEX_BYTES else None


def read_installed_index(state_dir: Path) -> tuple[BlockIndex, bytes] | None:
    """The installed release's block index and the SHA-256 of its bytes, or None when there is
    no usable one (absent, unreadable, malformed: never an error, see the module doc).  Reads
    the header first and then exactly the length it implies, at most ``MAX_INDEX_BYTES``."""
    path = state_dir / INDEX
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        header = os.pread(fd, blockindex.HEADER_SIZE, 0)
        if len(header) < blockindex.HEADER_SIZE:
            return None
        claimed = blockindex.HEADER.unpack(header)[-1]  # the image length (parse checks all)
        if blockindex.index_length(claimed) > MAX_INDEX_BYTES:
            return None
        data = os.pread(fd, blockindex.index_length(claimed) + 1, 0)
        index = blockindex.parse(data)
    except (OSError, MalformedIndex):
        return None
    finally:
        os.close(fd)
    return index, hashlib.sha256(data).digest()
