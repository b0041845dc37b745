"""Local reuse (delta delivery, issue 15): the 4 KiB blocks a device already holds become symbols.

A device updating from one release to the next usually holds most of the new image already: the
previous release in its other slot, the file it installed last time.  The signed manifest binds a
*block index* of the new image (`otacast.schemas.blockindex`: the first 16 bytes of the SHA-256
of each 4 KiB block, in image order).  This module finds, for every block of the new image, a
local copy whose hash equals the index entry at that position, and turns what is covered into
RaptorQ source symbols the receiver no longer needs from the network.

The pure core (no files, testable with bytes):

* `BlockTable`: a lookup table built from the *new* index: a sorted ``array('Q')`` of keys,
  each an entry's first 8 bytes with its low bits replaced by its block number, searched with
  `bisect` per local block (8 bytes per block of the new image; a dict would cost ~110), and
  sorted bucket by bucket so that building it holds no list of every entry.  A prefix hit is
  confirmed on all 16 bytes.  Equal blocks (zeros) are one prefix with several positions.
* `Placement`: for each block of the new image, the local copy found for it (source number and
  block number in that source), filled by `place_blocks` from a source's bytes: every aligned
  4 KiB block of the source, its last partial block zero-padded (as the index hashes the image's
  last block), whatever the source's length.
* `known_symbols` / `compose`: the image's chunks are RFC 6330 source blocks (`schemas.fec`); the
  source symbol ESI ``e`` of a chunk at ``offset`` covers image bytes ``[offset + e*T,
  min(offset + (e+1)*T, chunk end))``, one or two 4 KiB blocks (T < 4096 and does not divide it).
  A symbol is *known* when every block it touches is placed; `compose` builds it (zero-padded to
  T, as the codec pads a chunk's short last symbol) from those blocks' bytes.

The driver (`ReuseWorker`, a thread): gets the index (`index_for`), scans each source with large
sequential reads (`SCAN_READ_BYTES`), then for each chunk reads its placed blocks again and checks
each one's hash once more (a source may change between the scan and the read: a block that no
longer matches is not used), composes the known symbols and hands them to the receive loop
(`LocalChunk`).  A chunk whose every source symbol is known is hashed here and handed over whole
only if it matches its signed SHA-256 (the loop completes it as it does an HTTP chunk); otherwise
the loop adds its known symbols to the symbol store, where the received ones complete it.

Why a thread: reading and hashing a 4 GiB slot takes tens of seconds, and the receive loop must
not stall; ``hashlib`` releases the GIL while hashing a 4 KiB block and file reads do too, so
the loop keeps its share.  The worker touches no receiver state: it reads the manifest and the
index (immutable), its own files, `done_elsewhere` (chunks the loop completed: a set, whose ``in``
is atomic) and `stop`.

What a forged input costs.  A local block is used only at positions whose index entry equals its
own hash, checked at scan and again at read; every chunk is still checked against its signed
SHA-256 before it is kept (a chunk completed locally here; a partly local one by the receiver's
decode).  A chunk that fails is fetched from the network without its local symbols, once (no
retry).  An index that is not signed (fetched from a mirror before manifests carried its hash)
can make every chunk fail once: the cost of a full download, never a wrong image; so only an
index the manifest signs (``manifest.index``) is taken from the network: the carousel's
(`otacast.plugin.core`, *The block index*: the driver hands the worker the core's
``IndexReady``), or the mirrors' when there is no multicast (``--fallback only``).  A release
signed without one gets no local pass unless an index is given with ``--block-index``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sys
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from otacast.schemas import blockindex, fec
from otacast.schemas.blockindex import BlockIndex, block_digest
from otacast.schemas.errors import MalformedDelta, MalformedIndex
from otacast.schemas.limits import INDEX_BLOCK_SIZE, INDEX_HASH_BYTES, MAX_INDEX_BYTES
from otacast.schemas.manifest import Manifest

from .delta import LaneDecoder, StoredObject, lane_header_of
from .errors import FetchError
from .object_file import return_free_memory

BLOCK = INDEX_BLOCK_SIZE
# Bytes per read while scanning a source: large sequential reads keep a disk or flash at its
# streaming rate (4 MiB: ~1 ms of syscall per 4 ms of reading at 1 GB/s), and bound what the scan
# holds at once.
SCAN_READ_BYTES = 4 * 1024 * 1024
# Local chunks waiting for the receive loop (each at most a chunk, 8 MiB): the worker waits when
# the loop is busy rather than holding the whole image in memory.
RESULT_QUEUE = 1
# Chunks handed over and not yet dealt with by the loop (`drain`), the one the worker is building
# included: each is 8 MiB of the device's peak (there were four: one built, one waiting to be
# queued, one queued, one kept by the loop).  Two: the worker reads and hashes one while the loop
# keeps the other, and the loop, which looks at the queue once a turn, finds the next ready.
CHUNKS_IN_FLIGHT = 2
# A read of placed blocks for one chunk joins neighbouring blocks of a source into one pread of
# at most this many bytes.
READ_RUN_BYTES = 1024 * 1024
# Compressed bytes of the lane object given to its decoder at once (it yields at most
# DELTA_DECODE_STEP of blocks per call): the blocks written per pwrite stay small.
LANE_FEED_BYTES = 64 * 1024
_NOWHERE = -1
# The lookup table is sorted in 2^this buckets of its keys' top bits (`BlockTable`).
_BUCKET_BITS = 10
_SOURCE_SHIFT = 40  # a placement is source << 40 | block in that source (2^40 blocks = 4 PiB)


# --- The pure core -----------------------------------------------------------------------------


class BlockTable:
    """The new image's index as a lookup table: digest -> the image blocks that have it."""

    __slots__ = ("_low", "_mask", "index", "keys")

    def __init__(self, index: BlockIndex) -> None:
        self.index = index
        count = index.blocks
        shift = max(1, (count - 1).bit_length())  # the low bits hold the block number
        self._low = (1 << shift) - 1
        self._mask = ((1 << 64) - 1) ^ self._low
        # Bucketed by the top bits and each bucket sorted on its own: no list of every entry
        # (a list of 307k ints is ~12 MB beside the 2.4 MB array).
        buckets = [array("Q") for _ in range(1 << _BUCKET_BITS)]
        halves = array("Q")
        halves.frombytes(index.digests)  # two native words per 16-byte entry
        mask, top = self._mask, 64 - _BUCKET_BITS
        for block in range(count):
            key = (halves[2 * block] & mask) | block
            buckets[key >> top].append(key)
        del halves
        self.keys = array("Q")
        for bucket in buckets:
            self.keys.extend(sorted(bucket))
            del bucket[:]

    @property
    def nbytes(self) -> int:
        """What the table holds (the index itself aside)."""
        return len(self.keys) * self.keys.itemsize

    def positions(self, digest: bytes) -> Iterator[int]:
        """The blocks of the new image whose entry is `digest` (16 bytes), ascending."""
        mask, low = self._mask, self._low
        key = int.from_bytes(digest[:8], sys.byteorder) & mask  # as `frombytes` read the entries
        keys, entry = self.keys, self.index.digests
        at = bisect_left(keys, key)
        while at < len(keys) and keys[at] & mask == key:
            block = keys[at] & low
            start = block * INDEX_HASH_BYTES
            if entry[start : start + INDEX_HASH_BYTES] == digest:
                yield block
            at += 1


class Placement:
    """For each block of the new image, the local copy found for it, if any."""

    __slots__ = ("_where", "placed")

    def __init__(self, blocks: int) -> None:
        self._where = array("q", [_NOWHERE]) * blocks
        self.placed = 0

    def __len__(self) -> int:
        return len(self._where)

    def known(self, block: int) -> bool:
        return self._where[block] != _NOWHERE

    def get(self, block: int) -> tuple[int, int] | None:
        """(source number, block number in that source) of block `block`'s local copy."""
        where = self._where[block]
        if where == _NOWHERE:
            return None
        return where >> _SOURCE_SHIFT, where & ((1 << _SOURCE_SHIFT) - 1)

    def offer(self, table: BlockTable, digest: bytes, source: int, local: int) -> int:
        """Place local block `local` of `source` (whose hash is `digest`) at every position of
        the new image that has it and has no copy yet; how many it took."""
        where, taken = (source << _SOURCE_SHIFT) | local, 0
        for block in table.positions(digest):
            if self._where[block] != _NOWHERE:
                # The positions of one digest are all placed by the first copy offered, so
                # the rest of them are too (only a prefix collision could interleave another).
                break
            self._where[block] = where
            taken += 1
        self.placed += taken
        return taken

    def put(self, block: int, source: int, local: int) -> bool:
        """Place block `local` of `source` at image block `block` (its hash checked by the
        caller) unless a copy is there already; whether it was placed."""
        if self._where[block] != _NOWHERE:
            return False
        self._where[block] = (source << _SOURCE_SHIFT) | local
        self.placed += 1
        return True

    def forget(self, block: int) -> None:
        """Block `block`'s copy no longer matches (the source changed): use none."""
        if self._where[block] != _NOWHERE:
            self._where[block] = _NOWHERE
            self.placed -= 1


def place_blocks(
    table: BlockTable, placement: Placement, source: int, first: int, data: bytes | memoryview
) -> int:
    """Offer each 4 KiB block of `data` (block `first` of `source` on; the last may be short,
    and is hashed zero-padded); how many positions of the new image they took."""
    view = memoryview(data)
    taken = 0
    for number, start in enumerate(range(0, len(view), BLOCK), first):
        if placement.placed == len(placement):
            break
        taken += placement.offer(table, block_digest(view[start : start + BLOCK]), source, number)
    return taken


@dataclass(frozen=True)
class Layout:
    """What places symbols in the image: the three signed numbers of `schemas.fec`."""

    length: int
    chunk_size: int
    symbol_size: int

    @classmethod
    def of(cls, manifest: Manifest) -> Layout:
        return cls(manifest.image.length, manifest.chunks.size, manifest.fec.symbol_size)

    @property
    def chunks(self) -> int:
        return fec.chunk_count(self.length, self.chunk_size, self.symbol_size)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        return fec.chunk_span(self.length, self.chunk_size, self.symbol_size, chunk)

    def symbol_span(self, chunk: int, esi: int) -> tuple[int, int]:
        """Image bytes [start, end) of source symbol `esi` of `chunk` (end cut at the chunk's)."""
        offset, length = self.chunk_span(chunk)
        start = offset + esi * self.symbol_size
        return start, min(start + self.symbol_size, offset + length)


def symbol_blocks(start: int, end: int) -> range:
    """The 4 KiB blocks that image bytes [start, end) touch."""
    return range(start // BLOCK, (end - 1) // BLOCK + 1)


def known_symbols(layout: Layout, chunk: int, known: Callable[[int], bool]) -> list[int]:
    """The source ESIs of `chunk` whose every block is `known`, ascending."""
    offset, length = layout.chunk_span(chunk)
    size = layout.symbol_size
    end_of_chunk = offset + length
    esis = []
    if size > BLOCK:  # (no such symbol size is signed today: a symbol spans 1 or 2 blocks)
        for esi in range(fec.source_symbols(length, size)):
            start = offset + esi * size
            if all(known(b) for b in symbol_blocks(start, min(start + size, end_of_chunk))):
                esis.append(esi)
        return esis
    for start in range(offset, end_of_chunk, size):
        if known(start // BLOCK) and known((min(start + size, end_of_chunk) - 1) // BLOCK):
            esis.append((start - offset) // size)
    return esis


def compose(layout: Layout, chunk: int, esi: int, blocks: Mapping[int, bytes]) -> bytes:
    """Source symbol `esi` of `chunk` from the bytes of the blocks it touches (`blocks`: image
    block number -> its 4 KiB, verified), zero-padded to the symbol size."""
    start, end = layout.symbol_span(chunk, esi)
    parts = []
    for block in symbol_blocks(start, end):
        base = block * BLOCK
        parts.append(blocks[block][max(start, base) - base : min(end, base + BLOCK) - base])
    return b"".join(parts).ljust(layout.symbol_size, b"\0")


# --- Reading the sources ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A local file or block device that may hold blocks of the new image, and who named it."""

    path: Path
    why: str


class _Opened:
    """A source open for reading (descriptor), and its length in bytes."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.fd = os.open(source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.length = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            os.close(self.fd)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def scan_source(
    opened: _Opened,
    number: int,
    table: BlockTable,
    placement: Placement,
    stop: threading.Event | None = None,
) -> int:
    """Read `opened` from start to end and place its blocks; the positions taken."""
    taken, position = 0, 0
    with contextlib.suppress(OSError):  # fadvise is a hint; some files cannot take it
        os.posix_fadvise(opened.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    while position < opened.length and placement.placed < len(placement):
        if stop is not None and stop.is_set():
            break
        data = os.pread(opened.fd, SCAN_READ_BYTES, position)
        if not data:
            break
        taken += place_blocks(table, placement, number, position // BLOCK, data)
        position += len(data)
    return taken


def read_placed(
    opened: Sequence[_Opened],
    index: BlockIndex,
    placement: Placement,
    blocks: range,
    into: bytearray,
) -> list[int]:
    """Copy the placed `blocks` (image block numbers), read again from their sources and checked
    against the index once more, into `into` (block ``blocks.start`` at 0, the last partial one
    zero-padded); the blocks copied.  A block that no longer matches is forgotten in `placement`
    and left out.  Neighbouring local blocks are read with one pread."""
    wanted = sorted((where, b) for b in blocks if (where := placement.get(b)) is not None)
    found: list[int] = []
    at = 0
    while at < len(wanted):
        (source, first), _ = wanted[at]
        end = at + 1
        while (
            end < len(wanted)
            and wanted[end][0][0] == source
            and wanted[end][0][1] - first < READ_RUN_BYTES // BLOCK
        ):
            end += 1
        last = wanted[end - 1][0][1]
        try:
            data = os.pread(opened[source].fd, (last - first + 1) * BLOCK, first * BLOCK)
        except OSError:
            data = b""
        for (_, local), block in wanted[at:end]:
            piece = memoryview(data)[(local - first) * BLOCK : (local - first + 1) * BLOCK]
            if piece and block_digest(piece) == index.digest(block):
                at = (block - blocks.start) * BLOCK
                into[at : at + len(piece)] = piece
                found.append(block)
            else:
                placement.forget(block)
        at = end
    return found


# --- Getting the index -------------------------------------------------------------------------


def signed_index(manifest: Manifest) -> tuple[int, bytes | None]:
    """What the manifest binds the index to: the image length, and the index's SHA-256 (None
    for a release signed without an index: then only an index given as a file is used)."""
    info = manifest.index
    return manifest.image.length, info.sha256 if info is not None else None


def index_url(mirror: str) -> str:
    """Where a mirror publishes the index of the image at `mirror` (``IMAGE.blockindex``)."""
    return mirror + ".blockindex"


def read_index_file(path: Path, manifest: Manifest) -> BlockIndex:
    """An index from a file (``--block-index``), checked as one from the network would be."""
    length, digest = signed_index(manifest)
    limit = min(MAX_INDEX_BYTES, blockindex.index_length(length))
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise MalformedIndex(f"cannot read block index {path}: {exc.strerror or exc}") from None
    return blockindex.parse(data, length=length, sha256=digest)


def fetch_index(manifest: Manifest, timeout: float) -> BlockIndex:
    """The index from the manifest's mirrors (`index_url`), bounded by its exact length."""
    from .fetcher import HttpFetcher  # (requests costs start-up time: only when used)

    length, digest = signed_index(manifest)
    limit = min(MAX_INDEX_BYTES, blockindex.index_length(length))
    failures = []
    with HttpFetcher((), timeout=timeout, attempts=1) as fetcher:
        for mirror in manifest.http:
            try:
                data = fetcher.fetch_manifest(index_url(mirror), limit)
                return blockindex.parse(data, length=length, sha256=digest)
            except (FetchError, MalformedIndex) as exc:
                failures.append(str(exc))
    raise FetchError("no mirror served a usable block index: " + "; ".join(failures or ["none"]))


def index_for(
    manifest: Manifest, *, index_file: Path | None = None, timeout: float = 10.0
) -> BlockIndex:
    """The new image's block index for the local pass: from `index_file` when given (tests,
    offline devices), else from the manifest's HTTP mirrors, checked against the index the
    manifest signs.  Raises `MalformedIndex` or `FetchError` (one line) when there is none.

    The multicast carousel's index (the receiver core's ``IndexReady`` event) does not come
    through here: the driver hands that one to `ReuseWorker.offer_index`."""
    if index_file is not None:
        return read_index_file(index_file, manifest)
    if manifest.index is None:
        raise FetchError("the release signs no block index")
    if not manifest.http:
        raise FetchError("the manifest lists no HTTP mirror to fetch the block index from")
    return fetch_index(manifest, timeout)


# --- The worker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalChunk:
    """What the local sources give of one chunk: its data, verified against its signed hash
    (every source symbol was known; a view of the buffer it was read into, not a copy), or
    else its known source symbols ``(esi, T bytes)``."""

    chunk: int
    data: bytes | memoryview | None = None
    symbols: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class ReuseNote:
    """A line for the operator (a skipped source, what the scan found)."""

    text: str


@dataclass(frozen=True)
class ReuseDone:
    """The worker has handed over everything it found."""

    blocks_found: int = 0
    blocks: int = 0
    scanned_bytes: int = 0
    scan_seconds: float = 0.0
    table_bytes: int = 0
    changed: int = 0  # placed blocks whose bytes no longer matched at read time
    chunk_mismatch: list[int] = field(default_factory=list)  # fully local chunks that failed
    lane_blocks: int = 0  # blocks of the delta lane placed (those no local source had)


ReuseItem = LocalChunk | ReuseNote | ReuseDone


class ReuseWorker(threading.Thread):
    """Scans the sources for blocks of the new image and queues what they give, chunk by chunk
    (module doc); `results` ends with one `ReuseDone`."""

    def __init__(
        self,
        manifest: Manifest,
        sources: Sequence[Source],
        get_index: Callable[[], BlockIndex] | None,
        lane_file: Path | None = None,
    ) -> None:
        """With `lane_file`, the delta lane's object is awaited after the scan (`offer_lane`)
        and its blocks, decoded into that file, are placed beside the local ones."""
        super().__init__(name="otacast-reuse", daemon=True)
        self.manifest = manifest
        self.sources = tuple(sources)
        self.layout = Layout.of(manifest)
        self.results: queue.Queue[ReuseItem] = queue.Queue(RESULT_QUEUE)
        self.done_elsewhere: set[int] = set()
        self.stop = threading.Event()
        self._get_index = get_index
        self._offered: queue.Queue[BlockIndex] = queue.Queue(1)
        # Set when the driver stops waiting for an offered index (multicast failed).
        self.no_more_index = threading.Event()
        self.lane_file = lane_file
        self._lane: queue.Queue[bytes | StoredObject | None] = queue.Queue(1)
        self._in_flight = threading.Semaphore(CHUNKS_IN_FLIGHT)

    def offer_lane(self, data: bytes | StoredObject | None) -> None:
        """The verified delta lane object, in memory or stored (None: none will come), for a
        worker with a `lane_file`."""
        with contextlib.suppress(queue.Full):
            self._lane.put_nowait(data)

    def offer_index(self, index: BlockIndex) -> None:
        """An index verified elsewhere (the carousel's), for a worker started without one."""
        with contextlib.suppress(queue.Full):
            self._offered.put_nowait(index)

    def chunk_dealt_with(self) -> None:
        """The loop is done with a `LocalChunk` taken from `results` and holds it no more: room
        for the next (`drain` says so for each chunk it gives)."""
        self._in_flight.release()

    def _room(self) -> bool:
        """Wait until fewer than ``CHUNKS_IN_FLIGHT`` chunks are out (or `stop`); whether
        there is room for one more, now counted."""
        while not self.stop.is_set():
            if self._in_flight.acquire(timeout=0.2):
                return True
        return False

    def _put(self, item: ReuseItem) -> bool:
        while not self.stop.is_set():
            try:
                self.results.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _index(self) -> BlockIndex | None:
        if self._get_index is None:
            while not self.stop.is_set() and not self.no_more_index.is_set():
                with contextlib.suppress(queue.Empty):
                    return self._offered.get(timeout=0.2)
            if self.no_more_index.is_set():
                self._put(ReuseNote("local reuse off: the block index did not arrive"))
            return None
        try:
            return self._get_index()
        except (MalformedIndex, FetchError) as exc:
            self._put(ReuseNote(f"local reuse off: no block index ({exc})"))
            return None

    def run(self) -> None:
        try:
            self._run()
        finally:
            # The loop waits for this to start HTTP repair: it is queued whatever happened.
            if not self.stop.is_set() and not self._finished:
                self._put(ReuseDone())

    _finished = False

    def _run(self) -> None:
        index = self._index()
        if index is None:
            return
        if index.length != self.layout.length:
            self._put(ReuseNote("local reuse off: the block index is of another image"))
            return
        started = time.monotonic()
        table = BlockTable(index)
        placement = Placement(index.blocks)
        opened: list[_Opened] = []
        scanned = 0
        try:
            for source in self.sources:
                try:
                    handle = _Opened(source)
                except OSError as exc:
                    self._put(
                        ReuseNote(
                            f"local reuse: skipping {source.path} ({source.why}): "
                            f"{exc.strerror or exc}"
                        )
                    )
                    continue
                opened.append(handle)
                try:
                    scan_source(handle, len(opened) - 1, table, placement, self.stop)
                except OSError as exc:
                    self._put(
                        ReuseNote(
                            f"local reuse: stopped reading {source.path} ({source.why}): "
                            f"{exc.strerror or exc}"
                        )
                    )
                scanned += handle.length
            seconds = time.monotonic() - started
            found = placement.placed
            lane_blocks = 0
            if self.lane_file is not None:
                lane_blocks = self._place_lane(index, placement, opened)
                found = placement.placed - lane_blocks
            # The table's build, the scan's reads and the lane's decode are over: what they
            # freed goes back to the system before the hand-over's chunks (issue 12's bound).
            return_free_memory()
            if opened:
                self._put(
                    ReuseNote(
                        f"local reuse: {found} of {index.blocks} blocks of the new image found "
                        f"in {len(self.sources)} source(s) ({scanned} bytes read in "
                        f"{seconds:.1f} s)"
                    )
                )
            done = self._hand_over(opened, index, placement)
            self._finished = True
            self._put(
                ReuseDone(
                    blocks_found=found,
                    blocks=index.blocks,
                    scanned_bytes=scanned,
                    scan_seconds=seconds,
                    table_bytes=table.nbytes,
                    changed=found + lane_blocks - placement.placed,
                    chunk_mismatch=done,
                    lane_blocks=lane_blocks,
                )
            )
        finally:
            for handle in opened:
                handle.close()

    def _wait_lane(self) -> bytes | StoredObject | None:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                return self._lane.get(timeout=0.2)
        return None

    def _place_lane(self, index: BlockIndex, placement: Placement, opened: list[_Opened]) -> int:
        """Decode the lane object's blocks (`otacast.plugin.delta.LaneDecoder`: each checked
        against the index) into the lane file and place those no local source gave; how many
        were placed.  The file is one more source (local block i = the i-th block written)."""
        assert self.lane_file is not None
        data = self._wait_lane()
        if data is None:
            return 0
        try:
            header = lane_header_of(data, length=index.length)
            decoder = LaneDecoder(header, index)
        except MalformedDelta as exc:
            self._put(ReuseNote(f"delta lane: object unusable ({exc})"))
            return 0
        except OSError as exc:
            self._put(ReuseNote(f"delta lane: cannot read its object: {exc.strerror or exc}"))
            return 0
        number, written, placed = len(opened), 0, 0
        wanted = array("I")  # image block of each block written (4 bytes each, not a list's 36)
        try:
            fd = os.open(
                self.lane_file,
                os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                0o600,
            )
            try:
                for piece in lane_pieces(data, header.stream_offset):
                    pieces = []
                    for block, raw in decoder.feed(piece):
                        if placement.known(block):
                            continue  # a local copy (verified at the scan) serves it
                        pieces.append(raw.ljust(BLOCK, b"\0"))
                        wanted.append(block)
                    if pieces:
                        os.pwrite(fd, b"".join(pieces), written * BLOCK)
                        written += len(pieces)
                    if self.stop.is_set():
                        break
                decoder.finish()
            finally:
                os.close(fd)
            opened.append(_Opened(Source(self.lane_file, "the delta lane")))
        except OSError as exc:
            self._put(ReuseNote(f"delta lane: cannot keep its blocks: {exc.strerror or exc}"))
            return 0
        for local, block in enumerate(wanted):
            placed += placement.put(block, number, local)
        if decoder.rejections:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(decoder.rejections.items()))
            self._put(ReuseNote(f"delta lane: blocks refused ({reasons})"))
        return placed

    def _hand_over(
        self, opened: Sequence[_Opened], index: BlockIndex, placement: Placement
    ) -> list[int]:
        """Queue each chunk's local data or symbols; the fully local chunks that failed."""
        layout = self.layout
        mismatched: list[int] = []
        if not placement.placed:
            return mismatched
        for chunk in range(layout.chunks):
            if self.stop.is_set():
                break
            if chunk in self.done_elsewhere:
                continue
            esis = known_symbols(layout, chunk, placement.known)
            if not esis:
                continue
            if not self._room():
                break
            item = self._local_chunk(opened, index, placement, chunk, esis)
            if isinstance(item, LocalChunk):
                handed = self._put(item)
                del item  # (the loop's now: not kept alive here while the next is built)
                if not handed:
                    break
                continue
            self._in_flight.release()  # nothing of it is handed over
            if item is not None:
                mismatched.append(chunk)  # no local symbol of it is used: fetched whole
        return mismatched

    def _local_chunk(
        self,
        opened: Sequence[_Opened],
        index: BlockIndex,
        placement: Placement,
        chunk: int,
        esis: list[int],
    ) -> LocalChunk | str | None:
        """What the local sources give of `chunk`, whose source symbols `esis` are placed: a
        `LocalChunk`, ``"mismatch"`` (every symbol was known, yet the chunk failed its hash)
        or None (its placed blocks changed since the scan: nothing known)."""
        layout = self.layout
        offset, length = layout.chunk_span(chunk)
        needed = symbol_blocks(offset, offset + length)
        placed = placement_in(placement, needed)
        # The chunk's bytes as far as known (unknown blocks zero): a whole chunk handed over
        # as a view of them (no copy), symbols cut from them (the buffer let go once cut).
        buffer = bytearray(len(needed) * BLOCK)
        blocks = read_placed(opened, index, placement, needed, buffer)
        if len(blocks) < placed:
            # Blocks changed since the scan were forgotten: their symbols are not known.
            esis = known_symbols(layout, chunk, placement.known)
        if not esis:
            return None
        start = offset - needed.start * BLOCK
        if len(esis) == fec.source_symbols(length, layout.symbol_size):
            whole = memoryview(buffer)[start : start + length]
            if hashlib.sha256(whole).digest() != self.manifest.chunks.sha256[chunk]:
                return "mismatch"
            return LocalChunk(chunk, data=whole)
        size = layout.symbol_size
        view = memoryview(buffer)
        symbols = tuple(
            (
                e,
                bytes(view[start + e * size : start + min((e + 1) * size, length)]).ljust(
                    size, b"\0"
                ),
            )
            for e in esis
        )
        return LocalChunk(chunk, symbols=symbols)


def lane_pieces(lane: bytes | StoredObject, start: int) -> Iterator[bytes | memoryview]:
    """The lane object's bytes from `start` on, ``LANE_FEED_BYTES`` at a time (a stored one
    read from its file: raises OSError)."""
    if isinstance(lane, bytes):
        view = memoryview(lane)
        for at in range(start, len(view), LANE_FEED_BYTES):
            yield view[at : at + LANE_FEED_BYTES]
        return
    yield from lane.pieces(start, LANE_FEED_BYTES)


def placement_in(placement: Placement, blocks: range) -> int:
    """How many of `blocks` are placed."""
    return sum(1 for b in blocks if placement.known(b))


def drain(worker: ReuseWorker, most: int) -> Iterator[ReuseItem]:
    """Up to `most` items the worker has queued, without waiting, one at a time (each is
    taken from the queue only once the one before was dealt with: a chunk each); the worker is
    told of each chunk (`ReuseWorker.chunk_dealt_with`) once the caller asks for the next or
    stops, so the caller lets go of an item before that."""
    for _ in range(most):
        try:
            item = worker.results.get_nowait()
        except queue.Empty:
            return
        chunk = isinstance(item, LocalChunk)
        try:
            yield item
        finally:
            del item
            if chunk:
                worker.chunk_dealt_with()


# --- Which sources -----------------------------------------------------------------------------

# The `Source.why` of the sources the operator names ([reuse] sources, --reuse-source).
CONFIGURED = "[reuse] sources"
# Mender's configuration, where its A/B root filesystem partitions are named.
MENDER_CONF = Path("/etc/mender/mender.conf")
# mender.conf is a small JSON file; anything larger is not one.
MAX_MENDER_CONF_BYTES = 64 * 1024


def installer_sources(spec: str | None) -> list[Source]:
    """What the installer names: the file installer's target and its ``.previous`` (when
    present); other installers name none (their slots go in ``[reuse] sources``)."""
    if spec is None:
        return []
    kind, _, argument = spec.partition(":")
    if kind != "file" or not argument:
        return []
    target = Path(argument)
    found = [Source(target, "the file installer's target")]
    previous = target.with_name(target.name + ".previous")
    if previous.exists():
        found.append(Source(previous, "the file installer's previous image"))
    return found


def mender_sources(conf: Path = MENDER_CONF) -> tuple[list[Source], str | None]:
    """Mender's root filesystem partitions (``RootfsPartA``, ``RootfsPartB`` in mender.conf)
    and, when the file cannot be read, a note saying so."""
    import json

    try:
        with conf.open("rb") as handle:
            data = handle.read(MAX_MENDER_CONF_BYTES + 1)
        if len(data) > MAX_MENDER_CONF_BYTES:
            return [], f"local reuse: {conf} is larger than {MAX_MENDER_CONF_BYTES} bytes, ignored"
        settings = json.loads(data)
    except FileNotFoundError:
        return [], None  # not a Mender root filesystem layout: nothing to say
    except OSError as exc:
        return [], f"local reuse: cannot read {conf}: {exc.strerror or exc}"
    except ValueError:
        return [], f"local reuse: {conf} is not JSON, ignored"
    found = []
    if isinstance(settings, dict):
        for key in ("RootfsPartA", "RootfsPartB"):
            value = settings.get(key)
            if isinstance(value, str) and value.startswith("/"):
                found.append(Source(Path(value), f"Mender's {key}"))
    return found, None


def readable_sources(sources: Iterable[Source]) -> int:
    """How many of `sources` open and give a first byte (the delta lane is taken only when
    one does: its blocks complete the local ones, `otacast.plugin.lane`)."""
    count = 0
    for source in sources:
        try:
            fd = os.open(source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            count += bool(os.pread(fd, 1, 0))
        except OSError:
            pass
        finally:
            os.close(fd)
    return count


def configured_sources(
    paths: Iterable[Path], installer: str | None, more: Iterable[Source] = ()
) -> tuple[Source, ...]:
    """The sources in force: ``[reuse] sources`` (and ``--reuse-source``), then the installer's,
    then `more` (Mender's), each path once."""
    found = [Source(p, CONFIGURED) for p in paths] + installer_sources(installer) + list(more)
    seen: set[Path] = set()
    unique = []
    for source in found:
        if source.path not in seen:
            seen.add(source.path)
            unique.append(source)
    return tuple(unique)
