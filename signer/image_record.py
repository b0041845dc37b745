"""What ``serve`` remembers of the image it last checked, so that a warm start need not hash it.

Before it encodes the symbol cache, ``serve`` checks the image against the manifest (its SHA-256
and every chunk's, `otacast.signer.sign.check_image`).  On a later start whose cache verifies,
the image is not read for sending at all: hashing it again (two SHA-256 passes, ~0.4 s for
500 MB on this two-core machine, seconds for 4 GB or on a CPU without SHA instructions) would
only answer "is this still the file that was checked?".  The file system answers that for
nothing: a record beside the cache holds the manifest's digest and the image's identity and
times (device, inode, size, mtime and ctime in nanoseconds) as they were before a check that
passed and still were after it.  Every write to a file changes its ctime, which no user-space
call can set back, and a file put in its place has another inode, so a record that still
matches names the bytes that were checked.  (The quick check ``make``, ``rsync`` and git's index
rely on.)

Racy records: a file's times come from a clock that advances in ticks, so a write in the same
tick as the one before it leaves ctime as it was.  A check that began within `RACY_NS` (2 s) of
the image's last change therefore records nothing (the next start checks it again, and records
it then); 2 s covers the coarsest timestamps Linux file systems keep (FAT's two seconds).

These claims hold for local file systems, whose times come from this host's clock; on a network
file system the server's clock sets them and the 2 s margin holds only as well as the two
clocks agree (harmless: what a warm start sends is the verified cache either way).

Only ever a skip of the warm start's check: when the cache must be encoded, the image is read
and checked in full first, whatever the record says.  The record is as trustworthy as the
cache directory it sits in (`otacast.signer.symbol_cache`, "What it does not cover"): whoever
can write it can rewrite the cache as well, and what either gains is bounded by the devices,
which check every chunk against the signed manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from otacast.schemas.manifest import Manifest

from .errors import ReadError, WriteError
from .fileio import atomic_write, read_bounded

# A record is one line of six fields (a 64-digit hex digest and five decimal numbers of at most
# 20 digits): under 200 bytes; anything longer is not one.
MAX_RECORD_BYTES = 256

# Module doc, "Racy records" (nanoseconds, as file times are).
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's contents without reading them (module doc)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def settled(self, now_ns: int) -> bool:
        """Whether the file last changed long enough before `now_ns` for its stamp to change
        with any write after it (module doc, "Racy records")."""
        return now_ns - self.ctime_ns >= RACY_NS


def path_for(directory: Path, manifest: Manifest) -> Path:
    return directory / f"{manifest.session_id.hex()}.checked"


def _line(manifest: Manifest, stamp: FileStamp) -> bytes:
    digest = hashlib.sha256(manifest.signed_bytes).hexdigest()
    fields = (stamp.device, stamp.inode, stamp.size, stamp.mtime_ns, stamp.ctime_ns)
    return f"{digest} {' '.join(str(f) for f in fields)}\n".encode("ascii")


def matches(record: Path, manifest: Manifest, image: Path) -> bool:
    """Whether `record` says `image`, as it is now, passed the check against `manifest`."""
    stamp = FileStamp.of(image)
    if stamp is None:
        return False
    try:
        held = read_bounded(record, MAX_RECORD_BYTES, "image record")
    except ReadError:  # (none there, or unreadable: check the image)
        return False
    return held == _line(manifest, stamp)


def forget(record: Path) -> None:
    """No record (the image failed its check, or it cannot vouch for it): the next start
    checks the image again."""
    with contextlib.suppress(OSError):
        record.unlink(missing_ok=True)


def remember(
    record: Path, manifest: Manifest, image: Path, before: FileStamp | None, started_ns: int
) -> None:
    """Record that `image` passed the check against `manifest` begun at `started_ns`, if its
    stamp `before` the check is still its stamp and had settled when the check began;
    otherwise make sure no record claims it."""
    if before is None or before != FileStamp.of(image) or not before.settled(started_ns):
        forget(record)
        return
    with contextlib.suppress(OSError, WriteError):
        # Only a speed-up for the next start: a directory that cannot take it costs a check then.
        atomic_write(record, _line(manifest, before))
