"""Ready-to-send DATA datagrams for every chunk's symbol cycle, kept in a cache file.

Each chunk is RaptorQ-encoded once: K source symbols plus a repair pool of ``ceil(repair * K)``
symbols.  The cycle of chunk ``c`` is its ``C_c = K_c + P_c`` symbols in ESI order.  For each
symbol the cache stores the complete DATA datagram (header + payload id + symbol), chunk after
chunk, so the sender's hot loop is one ``pread`` of many consecutive datagrams and one GSO
``send``: no per-packet Python work.  All datagrams have the same size (the codec pads the last
source symbol), which is what UDP segmentation offload needs.

When the manifest lists a block index (`otacast.schemas.blockindex`), the file holds its
RaptorQ source blocks' cycles after the chunks' (TOI ``wire.INDEX_TOI``, SBN = the block,
`Manifest.index_part`), with the same repair fraction: to the layout and the sender's core they
are cycles ``chunks .. chunks+blocks-1``.

Each side session (`fdt.SideSession`: the delta lane, when the manifest has one, and the index
group) has a cache file of its own (`build_side`): the source blocks of its objects (the lane's
object and index patches, `fdt.lane_objects`; the index group's full index) in TOI order, framed
with its TSI, with the same repair fraction and trailer.  To its layout none of them is an image
chunk (``chunks`` = 0).

Why a file and not memory: a 1 GB image with a 50% pool is ~1.5 GB of datagrams.  Reading slices
with ``pread`` into one reused buffer keeps the sender's resident memory near one chunk while it
encodes and near one batch while it sends; the page cache does the rest.  (An ``mmap`` would be
as fast but counts every touched page as resident.)

The file is named after the session id and the parameters, written under a temporary name
(``mkstemp`` in the cache directory: exclusive, never following a planted link) and renamed when
complete, so an interrupted encode is never reused and a restart reuses a finished one.

Verified before reuse
---------------------
Whatever the cache holds is sent, and signed into AUTH pages, as this sender's genuine data, so
a cache file is verified before it is reused.  After the datagrams the file ends with a trailer
of one XXH3-128 digest per chunk, each over that chunk's whole cycle of framed datagrams,
computed from the bytes as they were written.  Reuse re-hashes every cycle (one sequential read
of the file) and compares it with the trailer; a file of the wrong size, a cycle whose digest
differs (a flipped byte, a truncated or foreign file under the name) or a damaged trailer is
re-encoded from the image, with a warning, rather than served.  Re-deriving costs a full
encode, and the chunk hashes of the manifest cover only the source symbols, not the repair
pool, so a checksum kept beside the data is the only cheap check.

Why XXH3-128 and not SHA-256: the trailer guards against accidents (a disk, a crash, a copy
gone wrong), not against an attacker (below), and at the sizes users have it is on every warm
start's path: a 500 MB image's 765 MB cache took 0.55 s to verify with SHA-256 at 1.4 GB/s,
more than the image's own check beside it, and XXH3 reads it at ~10 GB/s (page cache included,
measured here).  Against random damage 128 bits leave a damaged cycle undetected with odds
of 2^-128; XXH3 is not a cryptographic hash, so nothing bounds a chosen change, which is the
attacker below.  (A cache written with the SHA-256 trailer of earlier versions is 16 bytes per
chunk longer: its size does not match, so it is encoded again once, with the warning.)

What it does not cover: an attacker who can write the cache directory can rewrite the trailer
as well (no unkeyed check could stop that, and a keyed one would need a secret the sender does
not always have), so the directory must be writable by the publisher alone.  What such an
attacker could gain is bounded by the receivers: each decoded chunk is checked against the
signed manifest's hash, so forged symbols cost a failed decode (and HTTP repair), never a wrong
image.  The cache is verified once, when `build` opens it; it is not re-checked while serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from otacast.schemas import fdt, fec, wire
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.errors import ImageMismatch
from otacast.schemas.limits import PART_CHUNKS
from otacast.schemas.manifest import Manifest

from . import fileio
from .encoder import ChunkEncoder, raptorq_encode
from .errors import ReadError, WriteError

# The pool must be at least 50% of K (DESIGN 3.3); above 400% the cache grows for little gain
# because a receiver rarely needs more than one extra pass.
MIN_REPAIR_FRACTION = 0.5
MAX_REPAIR_FRACTION = 4.0

# The trailer's digest of each chunk's cycle (XXH3-128: module doc).
DIGEST_BYTES = 16

# Verification reads a cycle in pieces of this size: a cycle of an 8 MiB chunk with a 400% pool is
# 40 MiB, which need not be resident at once; at 1 MiB a read's overhead is negligible.
VERIFY_READ = 1 << 20


def repair_count(source: int, fraction: float) -> int:
    return max(1, math.ceil(source * fraction))


@dataclass(frozen=True)
class CycleLayout:
    """Where each chunk's datagrams sit in the cache file."""

    datagram_size: int
    cycles: tuple[int, ...]  # C_c for each chunk, then for each block of the index
    offsets: tuple[int, ...]  # byte offset of cycle c's first datagram
    sources: tuple[int, ...]  # K of each cycle
    chunks: int  # the image's chunks: the first cycles; any others are the index's blocks

    @classmethod
    def for_manifest(cls, manifest: Manifest, fraction: float) -> CycleLayout:
        sources = [manifest.source_symbols(index) for index in range(manifest.chunk_count)]
        sources += [k for _, k in index_blocks(manifest)]
        return cls._of(manifest, sources, fraction, manifest.chunk_count)

    @classmethod
    def for_side(cls, manifest: Manifest, side: fdt.SideSession, fraction: float) -> CycleLayout:
        """A side session's cycles: every source block of its objects (`side_blocks`); none
        of them is an image chunk."""
        return cls._of(manifest, [b.k for b in side_blocks(manifest, side)], fraction, 0)

    @classmethod
    def _of(
        cls, manifest: Manifest, sources: Sequence[int], fraction: float, chunks: int
    ) -> CycleLayout:
        size = wire.data_datagram_size(manifest.fec.symbol_size)
        cycles = []
        offsets = []
        position = 0
        for k in sources:
            cycle = k + repair_count(k, fraction)
            cycles.append(cycle)
            offsets.append(position)
            position += cycle * size
        return cls(size, tuple(cycles), tuple(offsets), tuple(sources), chunks)

    @property
    def total_bytes(self) -> int:
        """The datagrams' bytes (the trailer of digests follows them)."""
        return self.offsets[-1] + self.cycles[-1] * self.datagram_size

    @property
    def file_bytes(self) -> int:
        """The whole cache file: the datagrams, then one digest per chunk."""
        return self.total_bytes + len(self.cycles) * DIGEST_BYTES

    def span(self, chunk: int, first: int, count: int) -> tuple[int, int]:
        """(file offset, length) of datagrams first..first+count-1 of a chunk's cycle."""
        if first < 0 or count < 1 or first + count > self.cycles[chunk]:
            raise IndexError("symbol range outside the chunk's cycle")
        return self.offsets[chunk] + first * self.datagram_size, count * self.datagram_size


def index_blocks(manifest: Manifest) -> list[tuple[tuple[int, int], int]]:
    """((offset, length) in the index, K) of each RaptorQ source block of the index object."""
    part = manifest.index_part()
    if part is None:
        return []
    t = manifest.fec.symbol_size
    out = []
    for block in range(part.blocks):
        span = part.block_span(block, t)
        out.append((span, fec.source_symbols(span[1], t)))
    return out


@dataclass(frozen=True)
class SideBlock:
    """A RaptorQ source block of a side session's object (the delta lane's, the index group's):
    the object's TOI, the block's SBN, its
    (offset, length) in the object and its K; `chunk` is how datagrams number it."""

    toi: int
    sbn: int
    span: tuple[int, int]
    k: int

    @property
    def chunk(self) -> int:
        return (self.toi - 1) * PART_CHUNKS + self.sbn


def side_blocks(manifest: Manifest, side: fdt.SideSession) -> list[SideBlock]:
    """Every source block of a side session's objects (`SideSession.objects`), in TOI order."""
    t = manifest.fec.symbol_size
    out = []
    for toi, _, part in side.objects(manifest):
        for block in range(part.blocks):
            span = part.block_span(block, t)
            out.append(SideBlock(toi, block, span, fec.source_symbols(span[1], t)))
    return out


def cache_path(directory: Path, manifest: Manifest, fraction: float, suffix: str = "") -> Path:
    percent = round(fraction * 100)
    return directory / (
        f"{manifest.session_id.hex()}-t{manifest.fec.symbol_size}-r{percent}{suffix}.symbols"
    )


# An origin file holds one decimal number of seconds: a few dozen bytes; anything longer is not one.
MAX_ORIGIN_BYTES = 64


def index_path(directory: Path, manifest: Manifest) -> Path:
    """Where ``serve`` keeps the release's block index between starts (`sign.check_image`)."""
    return directory / f"{manifest.session_id.hex()}.blockindex"


def origin_path(directory: Path, manifest: Manifest) -> Path:
    return directory / f"{manifest.session_id.hex()}.origin"


def phase_origin(
    directory: Path, manifest: Manifest, wall: float, warn: Callable[[str], None] | None = None
) -> float:
    """The wall-clock time this release's carousel first started from `directory`: round 0 of a
    single sender's phase (`otacast.signer.schedule`, "Absolute phase").

    Written beside the cache the first time (`wall`) and read back on every later start, so a
    restarted sender goes on where its clock says it would be; a file that does not hold a
    finite number of seconds is replaced (with a warning), as if this were the first start.
    """
    path = origin_path(directory, manifest)
    if path.exists():
        raw = fileio.read_bounded(path, MAX_ORIGIN_BYTES, "phase origin")
        try:
            origin = float(raw.decode("ascii")) if len(raw) <= MAX_ORIGIN_BYTES else math.nan
        except (UnicodeDecodeError, ValueError):
            origin = math.nan
        if math.isfinite(origin):
            return origin
        if warn is not None:
            warn(f"phase origin {path} does not hold a time: starting the carousel's phase now")
    directory.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write(path, f"{wall:.6f}\n".encode("ascii"))
    return wall


def _reusable(target: Path, layout: CycleLayout, warn: Callable[[str], None] | None) -> bool:
    """Whether the cache file `target` exists and verifies (`warn` is told why one does not)."""
    if not target.exists():
        return False
    problem = verify(target, layout)
    if problem is None:
        return True
    if warn is not None:
        warn(f"symbol cache {target} is not usable ({problem}): encoding it again")
    return False


def build(
    manifest: Manifest,
    image: Path,
    directory: Path,
    fraction: float,
    *,
    encode: ChunkEncoder = raptorq_encode,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    index: BlockIndex | None = None,
    reusable: bool | None = None,
) -> Path:
    """Encode every chunk of `image` (and the block `index`, which the caller checked against
    the manifest, when it lists one) into the cache file, or reuse a complete one that verifies
    (one that does not is re-encoded, and `warn` told why).  `reusable` is `check`'s answer
    when the caller had it verified already (beside its own work), None to verify it here."""
    if (index is None) != (manifest.index is None):
        raise ValueError("the block index is needed exactly when the manifest lists one")
    layout = CycleLayout.for_manifest(manifest, fraction)
    target = cache_path(directory, manifest, fraction)
    if reusable is None:
        reusable = _reusable(target, layout, warn)
    if not reusable:
        _write(target, directory, _image_cycles(manifest, image, layout, encode, progress, index))
    return target


def check(
    manifest: Manifest, directory: Path, fraction: float, warn: Callable[[str], None] | None = None
) -> bool:
    """Whether `build` may reuse the cache file it would write (`warn` is told why not, for a
    file that is there but does not verify)."""
    layout = CycleLayout.for_manifest(manifest, fraction)
    return _reusable(cache_path(directory, manifest, fraction), layout, warn)


def build_side(
    manifest: Manifest,
    side: fdt.SideSession,
    objects: dict[int, Path | bytes],
    directory: Path,
    fraction: float,
    *,
    encode: ChunkEncoder = raptorq_encode,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Encode a side session's objects (by TOI: a file, or the bytes, each checked by the caller
    against the manifest) into a cache file of their own (``-NAME`` before ``.symbols``), or
    reuse a complete one that verifies.  Each source block is read and encoded on its own, so
    memory stays near one block's cycle whatever the objects' sizes."""
    layout = CycleLayout.for_side(manifest, side, fraction)
    target = cache_path(directory, manifest, fraction, "-" + side.name)
    if not _reusable(target, layout, warn):
        _write(target, directory, _side_cycles(manifest, side, objects, layout, encode))
    return target


def _side_cycles(
    manifest: Manifest,
    side: fdt.SideSession,
    objects: dict[int, Path | bytes],
    layout: CycleLayout,
    encode: ChunkEncoder,
) -> Iterator[bytes]:
    tsi = side.tsi(manifest)
    for number, block in enumerate(side_blocks(manifest, side)):
        offset, length = block.span
        source = objects[block.toi]
        if isinstance(source, bytes):
            data = source[offset : offset + length]
        else:
            with source.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        if len(data) != length:
            raise ReadError(f"{side.name} object {block.toi} ended early at its block {block.sbn}")
        packets = encode(data, manifest.fec.symbol_size, layout.cycles[number] - block.k)
        prefix = _prefix(wire.DataPacket(tsi, block.chunk, 0, b"\0"))
        yield b"".join(prefix + packet[1:] for packet in packets)


def _image_cycles(
    manifest: Manifest,
    image: Path,
    layout: CycleLayout,
    encode: ChunkEncoder,
    progress: Callable[[int, int], None] | None,
    index: BlockIndex | None,
) -> Iterator[bytes]:
    """The framed cycle of every chunk of `image`, then of every block of its `index`.

    Each chunk read is hashed against the manifest before it is encoded: the image was checked
    before, but an image replaced while a large cache is encoded (minutes at 4 GB) must not
    leave a cache of other bytes that a later start would reuse, its trailer matching."""
    try:
        source = image.open("rb")
    except OSError as exc:
        raise _unreadable(f"image {image}", exc) from None
    with source:
        for number in range(manifest.chunk_count):
            offset, length = manifest.chunk_span(number)
            try:
                source.seek(offset)
                chunk = source.read(length)
            except OSError as exc:
                raise _unreadable(f"image {image}", exc) from None
            if len(chunk) != length:
                raise ReadError(f"image {image} ended early at chunk {number}")
            if hashlib.sha256(chunk).digest() != manifest.chunks.sha256[number]:
                raise ImageMismatch(
                    f"image {image} changed while its symbols were encoded: chunk {number} "
                    "does not match the manifest"
                )
            k = manifest.source_symbols(number)
            packets = encode(chunk, manifest.fec.symbol_size, layout.cycles[number] - k)
            # The LCT header and the chunk's SBN in its FLUTE object; the encoder numbers
            # the chunk's own block 0.
            prefix = _prefix(wire.DataPacket(manifest.tsi, number, 0, b"\0"))
            yield b"".join(prefix + packet[1:] for packet in packets)
            if progress is not None:
                progress(number + 1, manifest.chunk_count)
    if index is not None:
        yield from index_cycles(manifest, index.build(), layout, encode)


def _unreadable(what: str, exc: OSError) -> ReadError:
    return ReadError(f"cannot read {what}: {exc.strerror or exc}")


def make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create cache directory {directory}: {exc.strerror}") from None


def _write(target: Path, directory: Path, cycles: Iterable[bytes]) -> None:
    """Write `cycles` and the trailer of their digests as the cache file `target`, atomically.

    The temporary file is locked (``flock``) while it is written.  One whose writer was
    killed (SIGKILL, a power cut: up to 1.5x the image each time) is removed by the next
    write of the same cache: it is unlocked and older than `ABANDONED_AFTER_SECONDS`."""
    make_directory(directory)
    _remove_abandoned(directory, target.name)
    try:
        # mkstemp: a fresh name, created exclusively (O_EXCL) with mode 0600, so nothing planted
        # at a predictable name (a symlink to a file the sender may write) is ever opened.
        fd, name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise WriteError(f"cannot write symbol cache in {directory}: {exc.strerror}") from None
    tmp = Path(name)
    with contextlib.suppress(OSError):  # (no locks, as on some NFS mounts: never swept young)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with os.fdopen(fd, "wb") as out:
            digests = []
            for cycle in cycles:
                digests.append(xxhash.xxh3_128_digest(cycle))
                out.write(cycle)
            out.write(b"".join(digests))
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"cannot write symbol cache {tmp}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# An unlocked temporary cache file older than this is abandoned: its writer locks it right
# after creating it (the age only covers that instant) and holds the lock until it is renamed.
ABANDONED_AFTER_SECONDS = 60.0


def _remove_abandoned(directory: Path, name: str) -> None:
    """Remove the temporary files of earlier writes of the cache file `name` that nothing
    writes any more (`_write`); a file that cannot be examined or removed is left."""
    ours = re.compile(rf"{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")  # (`tempfile.mkstemp`'s)
    for path in directory.glob(glob.escape(name) + ".*.tmp"):
        if not ours.fullmatch(path.name):
            continue
        try:  # (for writing, as an NFS lock needs; never written)
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < ABANDONED_AFTER_SECONDS:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live writer holds it
            path.unlink()
        except OSError:
            continue
        finally:
            os.close(fd)


def _prefix(packet: wire.DataPacket | wire.IndexPacket) -> bytes:
    """A datagram's LCT header and SBN: what goes before the codec's packet without its SBN."""
    return wire.build_datagram(packet)[: wire.CODEC_PACKET_OFFSET + 1]


def index_cycles(
    manifest: Manifest, data: bytes, layout: CycleLayout, encode: ChunkEncoder
) -> Iterator[bytes]:
    """The framed cycle of each source block of the index object `data`, one at a time."""
    for block, ((offset, length), k) in enumerate(index_blocks(manifest)):
        repair = layout.cycles[layout.chunks + block] - k
        packets = encode(data[offset : offset + length], manifest.fec.symbol_size, repair)
        prefix = _prefix(wire.IndexPacket(manifest.tsi, block, 0, b"\0"))
        yield b"".join(prefix + packet[1:] for packet in packets)


def _trailer(fd: int, layout: CycleLayout) -> bytes:
    """The trailer of the cache file open as `fd` (shorter if the file is)."""
    return os.pread(fd, len(layout.cycles) * DIGEST_BYTES, layout.total_bytes)


def verify(path: Path, layout: CycleLayout) -> str | None:
    """Why the cache file at `path` must not be used, or None when every cycle matches its
    digest in the trailer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        return f"cannot open it: {exc.strerror}"
    try:
        size = os.fstat(fd).st_size
        if size != layout.file_bytes:
            return f"{size} bytes, expected {layout.file_bytes}"
        trailer = _trailer(fd, layout)
        for chunk in range(len(layout.cycles)):
            offset, length = layout.span(chunk, 0, layout.cycles[chunk])
            digest = xxhash.xxh3_128()
            end = offset + length
            while offset < end:
                piece = os.pread(fd, min(VERIFY_READ, end - offset), offset)
                if not piece:
                    return f"truncated at chunk {chunk}"
                digest.update(piece)
                offset += len(piece)
            if digest.digest() != trailer[chunk * DIGEST_BYTES : (chunk + 1) * DIGEST_BYTES]:
                return f"chunk {chunk}'s symbols do not match their digest"
        return None
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    finally:
        os.close(fd)


# Derived files
# -------------
# Data computed from a cache file's bytes (the AUTH pages' digests of every datagram,
# `otacast.signer.auth_pages`) is kept beside it, so that a restart reads it instead of reading
# and hashing the whole file again.  Such a file holds the data, then a copy of the cache
# file's trailer (its digest of every cycle: what the data was derived from), then an XXH3-128
# of both.  It is used only whole, with its own digest matching and the trailer copy equal to
# the trailer of the cache file being sent (read through the reader's descriptor: the file
# verified, or just written, by `build`); anything else is derived again.  How the data was
# derived is the caller's to check (`auth_pages.kept_release_digests` recomputes a sample).
# The same trust as the cache (module doc).


def derived_path(cache: Path, name: str) -> Path:
    return cache.with_name(f"{cache.name}.{name}")


def read_derived(reader: SymbolReader, name: str, length: int) -> bytes | None:
    """The `length` bytes `write_derived` kept beside the reader's cache file under `name`, if
    they were derived from the file it reads; else None (derive them again)."""
    try:
        trailer = reader.trailer()
        with derived_path(reader.path, name).open("rb") as handle:
            held = handle.read(length + len(trailer) + DIGEST_BYTES + 1)
    except (OSError, ReadError):
        return None
    body, digest = held[:-DIGEST_BYTES], held[-DIGEST_BYTES:]
    if len(held) != length + len(trailer) + DIGEST_BYTES:
        return None
    if xxhash.xxh3_128_digest(body) != digest or body[length:] != trailer:
        return None
    return body[:length]


def write_derived(reader: SymbolReader, name: str, data: bytes) -> None:
    """Keep `data`, derived from the bytes `reader` reads, beside its cache file under `name`."""
    body = data + reader.trailer()
    fileio.atomic_write(derived_path(reader.path, name), body + xxhash.xxh3_128_digest(body))


class SymbolReader:
    """Reads runs of datagrams from a finished cache file into one reused buffer."""

    def __init__(self, path: Path, layout: CycleLayout, max_batch: int) -> None:
        self.path = path
        self.layout = layout
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _unreadable(f"symbol cache {path}", exc) from None
        self._buffer = bytearray(max_batch * layout.datagram_size)
        self._view = memoryview(self._buffer)

    def read(self, chunk: int, first: int, count: int) -> memoryview:
        offset, length = self.layout.span(chunk, first, count)
        view = self._view[:length]
        try:
            got = os.preadv(self._fd, [view], offset)
        except OSError as exc:
            raise _unreadable(f"symbol cache {self.path}", exc) from None
        if got != length:
            raise ReadError(f"symbol cache is truncated at chunk {chunk}")
        return view

    def read_cycle(self, chunk: int) -> bytes:
        """A chunk's whole cycle of datagrams, in a buffer of its own (for AUTH pages)."""
        offset, length = self.layout.span(chunk, 0, self.layout.cycles[chunk])
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise _unreadable(f"symbol cache {self.path}", exc) from None
        if len(data) != length:
            raise ReadError(f"symbol cache is truncated at chunk {chunk}")
        return data

    def trailer(self) -> bytes:
        """The file's trailer: the digest of every cycle (module doc)."""
        try:
            data = _trailer(self._fd, self.layout)
        except OSError as exc:
            raise _unreadable(f"symbol cache {self.path}", exc) from None
        if len(data) != len(self.layout.cycles) * DIGEST_BYTES:
            raise ReadError("symbol cache is truncated in its trailer")
        return data

    def close(self) -> None:
        os.close(self._fd)
