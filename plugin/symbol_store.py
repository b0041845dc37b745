"""A durable per-chunk store of received symbols: no useful symbol is ever thrown away.

The receive driver uses it by default (``--symbols store``, config ``symbols = "store"``),
through the core's decoders in `otacast.plugin.store_decoder`.

Where things are
----------------
The store works beside `Staging`, in the same session directory ``<state>/<session id>/``, on
the same ``image.part`` and ``chunks.log``.  It does not extend `Staging`: staging owns the
directory (its lock, the image reservation, the removal of abandoned downloads, resume by hash,
the final check and hand-off), and a receiver without symbols (HTTP only) needs nothing more;
the store adds only what symbols need, and takes an open `Staging` (which holds the directory's
lock) instead of repeating any of that.  Its own files:

* **Source symbols** (ESI < K of a chunk) are the data of a systematic code.  Symbol ``e`` of
  chunk ``c`` is written in place into ``image.part`` at ``offset(c) + e*T`` (``T`` the signed
  symbol size), cut at the chunk's end: every chunk whose length is not a multiple of ``T``
  (always the image's last) has a short last symbol, whose padding must be zero (the codec pads
  with zeros; a symbol padded otherwise is not genuine and is refused as ``padding``).
  *Write-combining:* a sender sends runs of consecutive ESIs of one chunk (a GSO batch, an AUTH
  page), so `add` gathers consecutive source symbols of one chunk in a buffer (`RUN_BYTES`)
  and writes the run with one ``pwrite`` when it breaks (another chunk, a gap, a full buffer),
  before any read of that chunk (`read_chunk`, `symbols`, `complete`), and on every flush; a
  ``pwrite`` per symbol cost more than the rest of `add` together.  `add_run` takes such a
  run (what one GRO read holds) in one call, storing exactly what `add` one by one would.
  *Hashed as written:* when a written run continues the chunk's source symbols from its
  start without a gap, it is hashed as it is written (one SHA-256 state per chunk), so a chunk
  whose source symbols all came in order (every chunk at 0% loss from a sender's first start)
  needs no read back to be verified: `in_place_digest` reads only what lies past the first
  gap.  A chunk completing without it read all of its 8 MiB back and hashed it in the round
  that completes every chunk (the order is symbol-major), and the receive loop, busy with
  those reads and hashes, lost datagrams to its full socket buffer, so a few chunks then
  needed repair symbols and a decode even at 0% loss.  The bytes hashed are the very buffer
  written; they are trusted to stay as written, as a decoded chunk's are (hashed, then
  written), and the whole image is hashed once more before hand-off anyway.
* **Repair symbols** (ESI >= K) go to ``symbols.spill``, an array of ``T``-byte slots.  A slot
  freed by a completed or discarded chunk is reused, so the file is as long as the most slots
  ever in use at once (the high-water mark), and is cut back to the slots in use on reopen.
  Symbols given consecutive slots (whatever their chunks: slots are handed out in order) are
  gathered the same way and written with one ``pwrite`` when the run of slots breaks, before
  any read of the spill, before a chunk is forgotten (their records must precede its FORGET)
  and on every flush; their REPAIR records are queued only once they are written.
* **The journal** ``symbols.journal``: 16-byte records ``chunk (u32) | kind (u8) ESI (u24) |
  slot (u32) | CRC-32`` -- SOURCES (``slot`` symbols from that ESI on are in place: one record
  per written run), SOURCE (one symbol in place: journals of earlier versions), REPAIR (it is
  in that slot) and FORGET (the chunk's symbols so far are void: it completed, or its decode
  failed its hash).  Replaying the journal rebuilds which symbols each chunk holds.
* **Completed chunks** are recorded in ``chunks.log`` as `Staging` records them (its
  `Staging.mark_written`), so `Staging.resume` and `Staging.finish` see them as before.

Crash guarantee
---------------
Records are kept in memory and made durable in a batch by a flush: the gathered runs are
written, then ``image.part`` and the spill are ``fdatasync``-ed, then the chunks completed since
the last flush are appended to ``chunks.log`` (synced), then the records are appended to the
journal and it is synced too.  `flush` does that and returns once it is done; `discard` and
`close` flush; `complete` leaves its chunk to the next flush.  `add` starts a flush by itself
every `FLUSH_SYMBOLS` symbols, in the background: a thread (`_Syncer`) runs the syncs and
appends while the receive loop goes on (an ``fdatasync`` of ~5 MB took milliseconds on the
loop, and the loop must not stall).  Why the background flush keeps the order above: the main
thread writes every byte a batch's records name (and the bytes of the chunks it records done)
*before* it hands the batch over, and ``fdatasync`` makes durable every write to the file made
before it is called, whichever thread made it; writes the loop makes after the hand-off are
named only by later batches.  The slots a batch's FORGET records free are reused only once the
main thread has seen that batch done.  One batch at a time: while the syncer still has the
batch before, `add` does not wait for it (a fdatasync stalls for hundreds of milliseconds at
times, and the stream goes on meanwhile: datagrams dropped by a full socket buffer cost their
chunks a decode each) but keeps gathering, up to `MAX_UNFLUSHED_SYMBOLS` symbols; only then
does it wait.  So fewer than 2 x `MAX_UNFLUSHED_SYMBOLS` symbols are ever not yet durable
(normally one flush's worth, `FLUSH_SYMBOLS`), and a disk slower than the stream slows the loop
down instead of growing memory.  Compaction runs only in `flush`, with the thread idle.  So,
after ``kill -9`` or a power cut at any instant:

* a journal record never names bytes that were not on disk before the record was written: a
  stored symbol read back after reopen is byte for byte the one given to `add`;
* a record torn by the crash (a short tail, or bytes the file system never wrote) fails its
  CRC: it and everything after it are ignored and cut off on reopen (fewer symbols, never a
  wrong one);
* bytes a replayable record names are never overwritten: a freed slot is reused only once the
  FORGET that frees it is synced; `discard` syncs its FORGET before new symbols of that chunk
  can be written in place; `complete` syncs one before overwriting a stored source symbol
  that differs from the verified chunk (a forged one the decode did not use);
* a chunk recorded done in ``chunks.log`` has its bytes durable in place (and `Staging.resume`
  checks its hash anyway); its FORGET comes after, so on reopen it is either done, or not done
  with all its symbols still there;
* what is lost is at most the symbols added, and the chunks completed, since the last flush
  that finished (< 2 x `MAX_UNFLUSHED_SYMBOLS` symbols, normally `FLUSH_SYMBOLS`), which are
  simply received again.

This relies on ``fdatasync`` doing what it says (no disk that acknowledges writes it has not
made durable).  Completed chunks are trusted on reopen only if they still match their signed
hash (`Staging.resume`), and their symbols are then forgotten.

Bounds
------
* Per chunk, a repair symbol is admitted only while the chunk holds fewer than K +
  `MAX_EXTRA_SYMBOLS` symbols: that many decode with near certainty, and more are useless
  (``chunk-full``); and not once all K source symbols are in place (``not-needed``).  Source
  symbols are always admitted: they cost no extra disk.
* The spill holds at most as many slots as the image has source symbols (``spill-full``): the
  spill is then at most the image's size (each chunk's short last symbol counted whole).  It
  is also the least that never stalls the receiver: with every slot in use, some chunk holds
  K repair symbols and can be decoded, which frees its slots (for reuse from the next `flush`,
  which `complete` leaves to the caller's policy).
* Disk: ``image.part`` (the image, reserved by staging) + the spill (<= the image, about p x
  image at loss p in practice) + the journal, compacted (rewritten from memory) whenever it
  holds more than `JOURNAL_SLACK` times the live records plus `MIN_COMPACT_RECORDS`, so a
  sender whose chunks keep failing their hash cannot grow it without bound.
* Writes: each source symbol once in place, each repair symbol once in the spill, and by
  `complete` only the source symbols the chunk lacked (those that differ from the verified
  data), plus 16 bytes of journal per repair symbol and per run of source symbols (at most
  1.3 % at 1208-byte symbols) and its compactions.
* Memory: per chunk holding symbols, a bitmap of its K source symbols (1 bit each: ~110 KB per
  GiB of image at 1208-byte symbols) and, per repair symbol held, its ESI and slot (8 bytes),
  plus a stack of free slots (4 bytes each; slots in use plus free never exceed the spill's
  limit).  At most about 8.1 bytes per source symbol of the image (~7.2 MB per GiB at 1208-byte
  symbols, far less at low loss), whatever ESIs a sender uses (they range over 24 bits, and the
  repair pool is not signed, so a bitmap over a chunk's cycle could not be sized safely).
  Besides: the two run buffers (`RUN_BYTES` each, allocated once), the records not yet durable
  (16 bytes per symbol, < 2 x `MAX_UNFLUSHED_SYMBOLS`: 2 MB), and a SHA-256 state (~0.25 KB,
  measured) per chunk holding symbols.

What the caller must have verified
----------------------------------
The manifest (K, T, chunk sizes and hashes come from it).  A symbol given to `add` is taken as
received: the store checks only what it needs for its bounds (chunk in range, exact symbol
length, zero padding, duplicates), not that the symbol is genuine.  A forged symbol costs at
most a failed decode of its chunk: the caller hashes every decoded chunk and calls `discard` on
a mismatch.  `complete` must be given data that matches the chunk's signed hash.  With a store
open, whole chunks fetched over HTTP go through `complete` too, never `Staging.write_chunk`
(which would overwrite in place bytes the journal names).  Disk errors raise
`SymbolStoreError`, a `StateError`; input that merely cannot be stored is refused with a
counted reason (`StoreStats.refused`), never an exception.

Using it
--------
Open `Staging`, then ``SymbolStore(staging)``: it resumes (`done`, `is_done`: the chunks
`Staging.resume` verified) with every symbol stored before.  Per DATA datagram the core
admitted, ``add(chunk, esi, datagram[DATA_HEADER_SIZE:])``.  Once ``count(chunk) >= K``:
with `has_all_source`, compare `in_place_digest` (no decode, and little or nothing read back) and
on a match `complete` it with no data; otherwise feed `symbols` (codec packets) to a decoder,
and if it yields data, hash it (or hand a decoder in another process the chunk's `decode_plan`: it
reads the symbols from the files itself).  A match goes to `complete`, a mismatch to
`discard`; no data yet means wait for more symbols.  Call `flush` when something must be
durable now, and `close` at the end, then `Staging.finish`.  The store is used from one thread
(besides its own syncer).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import struct
import threading
import zlib
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType

from otacast.schemas import fec
from otacast.schemas.limits import MAX_ESI

from . import runs
from .errors import StateError
from .staging import READ_BLOCK, Staging, pwrite_all

# Symbols held beyond K before a chunk stops admitting repair symbols.  RaptorQ decodes from K
# received symbols with probability ~99 %, and each further symbol divides the failure
# probability by ~100 (RFC 6330's figures: 1 %, 0.01 %, 0.0001 % at K, K+1, K+2): with 8 extra,
# a chunk that still does not decode (or fails its hash) holds a forged symbol, and the caller
# discards it.
MAX_EXTRA_SYMBOLS = 8

# Spill slots allowed, as a multiple of the image's source symbols (see the module docstring:
# 1 is the least at which a full spill always leaves a decodable chunk).
SPILL_FACTOR = 1

# Room kept for the journal and the chunk log once the file system is full: a file of this
# size beside them, allocated (never written), given back when a full file system caps the
# spill (`_cap_spill`), so that the records of what still arrives fit.  16 MiB holds a million
# records: the repair symbols in flight of a 4 GB image at 20% loss are ~0.7 M (one record
# each), and the journal is compacted well before it holds that many dead ones.
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_NAME = "journal.reserve"

# Symbols stored before `add` flushes by itself: 4096 symbols (~5 MB at 1208 bytes) is what a
# crash usually costs at most, for three fdatasyncs per 4096 symbols.
FLUSH_SYMBOLS = 4096
# While the syncer is still busy with the flush before, `add` does not wait for it: it tries again
# every FLUSH_RETRY_SYMBOLS symbols, and waits only once this many are not yet handed over.
# Measured on the loop (500 MB at 60 MB/s): a hand-off waited 74 ms and 260 ms for a slow
# fdatasync, while the socket buffer holds ~0.3 s of such a stream; each datagram dropped then
# costs its chunk a decode.  16 x 4096 symbols (~80 MB, the ~1.3 s of a fast disk's stall at
# 60 MB/s) costs 1 MB of records, and is what a crash during such a stall costs at most.
MAX_UNFLUSHED_SYMBOLS = 16 * FLUSH_SYMBOLS
FLUSH_RETRY_SYMBOLS = FLUSH_SYMBOLS // 4

# The longest run of consecutive source symbols gathered before one write (256 KiB): longer
# than the runs a sender sends of one chunk (a GSO batch of ~50, an AUTH page of ~112), small
# enough to be allocated once and kept.
RUN_BYTES = 256 * 1024

# The journal is rewritten from memory when it holds more than JOURNAL_SLACK x the live records
# plus MIN_COMPACT_RECORDS (1 MiB of records): rewrites cost at most about what was appended.
JOURNAL_SLACK = 2
MIN_COMPACT_RECORDS = 65536

SPILL_NAME = "symbols.spill"
JOURNAL_NAME = "symbols.journal"

_SOURCE = 1
_REPAIR = 2
_FORGET = 3
_SOURCES = 4  # a run: source ESIs esi .. esi + count - 1, the count in the slot field
_REPAIR_KIND = _REPAIR << 24  # (`add` builds REPAIR records inline)
_RECORD = struct.Struct(">IIII")  # chunk, kind << 24 | esi, slot (or count), crc32
_BODY = struct.Struct(">III")
_BODY_PACK = _BODY.pack
_CRC32 = zlib.crc32
RECORD_BYTES = _RECORD.size
# Folded into each record's CRC so that a run of zero bytes (a tail the file system extended
# but never wrote) can never pass for a record.
_CRC_SEED = zlib.crc32(b"otacast-symbol-journal-v1")
_PAYLOAD_ID = struct.Struct(">I")  # SBN 0 (the high byte) and the ESI: the codec's payload id
# `complete` compares a chunk's bytes in place with its data this many symbols at a time.
_COMPARE_SYMBOLS = 64


@dataclass(frozen=True)
class DecodePlan:
    """Where one chunk's stored symbols are, for a decode that reads them itself (the receive
    driver's decode worker process, `otacast.plugin.decode_worker`): its source symbols in
    place in ``image.part`` (``[first, end)`` runs of ESIs), its repair symbols in the spill
    (ESI and slot, paired).  `SymbolStore.decode_plan` writes the gathered runs first, so every
    byte named here is in the files (the page cache: a reader of the same files sees it without
    a sync).  The bytes stay as named while the chunk's symbols are held: its source symbols
    are rewritten only by `SymbolStore.complete`, its slots reused only after its FORGET; a
    decode that overlaps either is of a chunk completed or discarded meanwhile, and its result
    must be ignored (the caller's, by the submission it answers)."""

    offset: int  # of the chunk in the image
    length: int
    k: int
    symbol_size: int
    source_runs: tuple[tuple[int, int], ...]
    repair_esi: array[int]
    repair_slot: array[int]


# A run of symbols (`SymbolStore.add_run`).
_Symbols = Sequence[bytes | bytearray | memoryview]


class SymbolStoreError(StateError):
    """The symbol store's files cannot be written or read."""


def _store_error(what: str, path: object, exc: OSError) -> SymbolStoreError:
    return SymbolStoreError(f"cannot {what} {path}: {exc.strerror or exc}")


def _record(chunk: int, kind: int, esi: int = 0, slot: int = 0) -> bytes:
    body = _BODY.pack(chunk, kind << 24 | esi, slot)
    return body + zlib.crc32(body, _CRC_SEED).to_bytes(4, "big")


@dataclass(frozen=True)
class StoreStats:
    """Counts since this store was opened (the high-water mark includes the reopened state)."""

    source_bytes: int  # source symbol bytes written in place by `add`
    spill_bytes: int  # repair symbol bytes written to the spill
    decoded_bytes: int  # bytes `complete` wrote in place (source symbols the chunk lacked)
    journal_bytes: int  # journal records appended, compactions included
    log_bytes: int  # chunks.log entries
    spill_in_use: int  # bytes of spill slots holding symbols now
    spill_high_water: int  # the most spill bytes ever in use at once
    stored: int  # symbols admitted by `add`
    refused: Mapping[str, int] = field(default_factory=dict)  # reason -> symbols not stored
    compactions: int = 0
    # bytes `in_place_digest` read back (what was not hashed as written, in order)
    read_back_bytes: int = 0

    @property
    def bytes_written(self) -> int:
        return (
            self.source_bytes
            + self.spill_bytes
            + self.decoded_bytes
            + self.journal_bytes
            + self.log_bytes
        )


class _Chunk:
    """What one chunk holds: a bitmap of its source ESIs, and its repair ESIs (sorted) with
    the spill slot of each."""

    __slots__ = (
        "bits",
        "digest",
        "hashed",
        "k",
        "length",
        "offset",
        "repair_esi",
        "repair_slot",
        "sources",
    )

    def __init__(self, k: int, offset: int, length: int) -> None:
        self.k = k
        self.offset = offset  # of the chunk in the image
        self.length = length
        self.bits = bytearray((k + 7) // 8)
        self.sources = 0
        self.repair_esi = array("I")
        self.repair_slot = array("I")
        # The SHA-256 of source symbols 0 .. hashed-1 as they were written (`in_place_digest`).
        self.digest = hashlib.sha256()
        self.hashed = 0

    def has_source(self, esi: int) -> bool:
        return bool(self.bits[esi >> 3] >> (esi & 7) & 1)

    def set_source(self, esi: int) -> None:
        self.bits[esi >> 3] |= 1 << (esi & 7)
        self.sources += 1

    def clear_source(self, esi: int) -> None:
        self.bits[esi >> 3] &= ~(1 << (esi & 7))
        self.sources -= 1

    def source_runs(self) -> list[tuple[int, int]]:
        """The source ESIs held, as [first, end) runs of consecutive ESIs."""
        runs: list[tuple[int, int]] = []
        first = -1
        for esi in range(self.k + 1):
            held = esi < self.k and self.bits[esi >> 3] >> (esi & 7) & 1
            if held and first < 0:
                first = esi
            elif not held and first >= 0:
                runs.append((first, esi))
                first = -1
        return runs

    def count(self) -> int:
        return self.sources + len(self.repair_esi)


@dataclass
class _Batch:
    """What one flush makes durable, in this order (the module docstring's argument)."""

    sync_part: bool  # image.part was written since the last batch
    sync_spill: bool
    completed: list[int]  # chunks whose verified bytes are in place: for chunks.log
    records: bytearray  # journal records, appended after both
    journal_size: int  # the journal's length before them (a failed append is cut back to it)
    freeing: array[int]  # spill slots that the batch's FORGET records free
    error: SymbolStoreError | None = None


class _Syncer(threading.Thread):
    """Runs each `_Batch` handed to it: the ``fdatasync``s and appends, off the receive loop.

    One batch at a time: a hand-off waits for the batch before (the store hands off only
    once it is done, or once `MAX_UNFLUSHED_SYMBOLS` wait: a disk slower than the stream
    slows the loop down instead of growing memory); `wait` returns the batch once it is
    done."""

    def __init__(self, store: SymbolStore) -> None:
        super().__init__(name="otacast-symbol-sync", daemon=True)
        self._store = store
        self._todo: queue.Queue[_Batch | None] = queue.Queue(1)
        self._done: queue.Queue[_Batch] = queue.Queue(1)
        self.in_flight: _Batch | None = None

    def hand_off(self, batch: _Batch) -> None:
        assert self.in_flight is None
        self.in_flight = batch
        self._todo.put(batch)

    def busy(self) -> bool:
        """Whether a batch is in flight and not yet done."""
        return self.in_flight is not None and self._done.empty()

    def wait(self) -> _Batch | None:
        """The batch in flight, once done (None if there is none)."""
        if self.in_flight is None:
            return None
        batch = self._done.get()
        self.in_flight = None
        return batch

    def stop(self) -> None:
        self.wait()
        self._todo.put(None)
        self.join()

    def run(self) -> None:
        while (batch := self._todo.get()) is not None:
            try:
                self._store._sync(batch)
            except SymbolStoreError as exc:
                batch.error = exc
            self._done.put(batch)


class SymbolStore:
    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        manifest = staging.manifest
        self._manifest = manifest
        self._symbol_size = manifest.fec.symbol_size
        self._chunk_count = manifest.chunk_count
        self.spill_path = staging.directory / SPILL_NAME
        self.journal_path = staging.directory / JOURNAL_NAME
        self._max_slots = SPILL_FACTOR * sum(
            manifest.source_symbols(i) for i in range(self._chunk_count)
        )
        # True once a full file system capped the spill at its length (`_cap_spill`).
        self.spill_capped = False
        self._chunks: dict[int, _Chunk] = {}
        self._done: set[int] = staging.resume()
        self._pending = bytearray()  # records not yet in the journal
        self._completed: list[int] = []  # chunks done, not yet in chunks.log
        self._read_back: tuple[int, bytes] | None = None  # see `complete`
        self._unflushed = 0  # symbols stored since the last flush
        self._flush_at = FLUSH_SYMBOLS  # `add` flushes once `_unflushed` reaches it
        self._flush_wanted = False  # `start_flush` was called while a flush was running
        self._stored = 0  # symbols stored since opened
        # The run of consecutive source symbols of one chunk gathered for one write: ESIs
        # [_run_first, _run_end) of chunk _run_chunk (-1: none), _run_fill bytes of _run.
        self._run = bytearray(max(RUN_BYTES, manifest.fec.symbol_size))
        self._run_room = len(self._run)
        self._run_chunk = -1
        self._run_first = self._run_end = self._run_fill = 0
        # The run of repair symbols in consecutive spill slots gathered for one write: slots
        # from _spill_first on, _spill_fill bytes of _spill_run, their REPAIR records (queued
        # once written) in _spill_records.
        self._spill_run = bytearray(len(self._run))
        # Symbols are copied in through views: a slice assignment to a memoryview costs about
        # a quarter of one to the bytearray itself (0.34 against 1.29 us per 1208-byte symbol
        # from a view, measured).  (Neither buffer is ever resized.)
        self._run_view = memoryview(self._run)
        self._spill_view = memoryview(self._spill_run)
        self._spill_first = self._spill_fill = 0
        self._spill_records = bytearray()
        self._free = array("I")  # spill slots free to reuse now
        self._freeing = array("I")  # freed by a FORGET that is not yet synced
        self._slots = 0  # spill length in slots
        self._in_use = 0
        self._journal_records = 0
        self._dirty_part = False
        self._dirty_spill = False
        self._counts: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._high_water = 0
        self._part: int | None = None
        self._spill: int | None = None
        self._journal: int | None = None
        self._syncer = _Syncer(self)
        self._syncer.start()
        try:
            self._part = os.open(staging.part, os.O_RDWR)
            self._spill = os.open(self.spill_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._journal = os.open(self.journal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self._replay()
            self._hold_reserve()
        except OSError as exc:
            self.close()
            raise _store_error("open the symbol store in", staging.directory, exc) from None
        except BaseException:
            self.close()
            raise

    # --- Reopen ---------------------------------------------------------------------------

    def _replay(self) -> None:
        assert self._journal is not None and self._spill is not None
        spill_slots = os.fstat(self._spill).st_size // self._symbol_size
        size = os.fstat(self._journal).st_size
        valid = 0
        block = READ_BLOCK - READ_BLOCK % RECORD_BYTES
        torn = False
        while valid < size and not torn:
            data = os.pread(self._journal, min(block, size - valid), valid)
            if not data:
                break
            for start in range(0, len(data) - RECORD_BYTES + 1, RECORD_BYTES):
                if not self._apply(data[start : start + RECORD_BYTES], spill_slots):
                    torn = True
                    break
                valid += RECORD_BYTES
            if len(data) % RECORD_BYTES:
                torn = True
        if valid < size:
            os.ftruncate(self._journal, valid)  # later records must start on a record boundary
            os.fsync(self._journal)
        self._journal_records = valid // RECORD_BYTES
        used = bytearray((spill_slots + 7) // 8)
        high = 0
        for state in self._chunks.values():
            for slot in state.repair_slot:
                used[slot >> 3] |= 1 << (slot & 7)
                high = max(high, slot + 1)
        self._free = array(
            "I", (s for s in range(high - 1, -1, -1) if not used[s >> 3] >> (s & 7) & 1)
        )
        self._slots = high
        self._in_use = high - len(self._free)
        if spill_slots > high:
            os.ftruncate(self._spill, high * self._symbol_size)
        # A chunk completed (and still matching its hash) needs no symbols: void its records
        # durably before its slots can be reused, as `complete` would have.
        for chunk in self._done & self._chunks.keys():
            self._forget(chunk)
        self._high_water = self._in_use * self._symbol_size
        self.flush()
        self._maybe_compact()

    def _apply(self, raw: bytes, spill_slots: int) -> bool:
        """Replay one record; False if it is not a whole record of ours (a torn tail)."""
        chunk, kind_esi, slot, crc = _RECORD.unpack(raw)
        if zlib.crc32(raw[:12], _CRC_SEED) != crc or not 0 <= chunk < self._chunk_count:
            return False
        kind, esi = kind_esi >> 24, kind_esi & MAX_ESI
        if kind == _FORGET:
            self._chunks.pop(chunk, None)
            return True
        if kind not in (_SOURCE, _REPAIR, _SOURCES):
            return False
        state = self._state(chunk)
        if kind == _SOURCES:
            if not 0 < slot <= state.k - esi:
                return False
            for source in range(esi, esi + slot):
                if not state.has_source(source):
                    state.set_source(source)
            return True
        if kind == _SOURCE:
            if esi >= state.k:
                return False
            if not state.has_source(esi):
                state.set_source(esi)
            return True
        if esi < state.k:
            return False
        if slot >= spill_slots:
            # Past the spill's end, which a reopen cuts back to the slots live records name:
            # this record's chunk was forgotten further on (the slot was synced before any
            # record named it, so nothing else can have shortened the file).
            return True
        at = bisect_left(state.repair_esi, esi)
        if at == len(state.repair_esi) or state.repair_esi[at] != esi:
            state.repair_esi.insert(at, esi)
            state.repair_slot.insert(at, slot)
        return True

    def _state(self, chunk: int) -> _Chunk:
        state = self._chunks.get(chunk)
        if state is None:
            offset, length = self._manifest.chunk_span(chunk)
            k = fec.source_symbols(length, self._symbol_size)
            state = self._chunks[chunk] = _Chunk(k, offset, length)
        return state

    # --- Queries --------------------------------------------------------------------------

    @property
    def done(self) -> frozenset[int]:
        """Chunks completed (in this run or verified on reopen)."""
        return frozenset(self._done)

    def is_done(self, chunk: int) -> bool:
        return chunk in self._done

    def source_symbols(self, chunk: int) -> int:
        """K of `chunk`."""
        return self._manifest.source_symbols(chunk)

    def count(self, chunk: int) -> int:
        """Distinct symbols `chunk` holds (0 once it is done)."""
        state = self._chunks.get(chunk)
        return 0 if state is None else state.count()

    def has_all_source(self, chunk: int) -> bool:
        """Whether every source symbol of `chunk` is in place: it needs hashing, no decode."""
        state = self._chunks.get(chunk)
        return state is not None and state.sources == state.k

    def source_runs(self, chunk: int) -> list[tuple[int, int]]:
        """The source ESIs `chunk` holds in place, as ``[first, end)`` runs of consecutive
        ESIs, ascending (none once it is done): what HTTP repair need not fetch."""
        state = self._chunks.get(chunk)
        return [] if state is None else state.source_runs()

    def esis(self, chunk: int) -> list[int]:
        """The ESIs `chunk` holds, ascending."""
        state = self._chunks.get(chunk)
        if state is None:
            return []
        return [e for e in range(state.k) if state.has_source(e)] + list(state.repair_esi)

    def read_chunk(self, chunk: int) -> bytes:
        """The chunk's bytes as ``image.part`` holds them (its data once `has_all_source`)."""
        if chunk == self._run_chunk:
            self._write_run()  # its gathered source symbols belong in what is read
        offset, length = self._manifest.chunk_span(chunk)
        data = self._read(self._part, offset, length, self.staging.part)
        # What is in place for the chunk until a source symbol of it is written (`_write_run`
        # forgets it then): `complete` need not read it again.
        self._read_back = (chunk, data)
        return data

    def in_place_digest(self, chunk: int) -> bytes:
        """The SHA-256 of `chunk` as its source symbols were written to ``image.part``, once it
        `has_all_source` (*Hashed as written*): only what was not written in order from the
        chunk's start is read back.  Then `complete` with no data keeps it as it is."""
        if not self.has_all_source(chunk):
            raise ValueError("the chunk's source symbols are not all in place")
        if chunk == self._run_chunk:
            self._write_run()  # its gathered source symbols belong in what is hashed
        state = self._chunks[chunk]
        digest, position = state.digest, state.hashed * self._symbol_size
        if position < state.length:
            digest = digest.copy()  # (the chunk's own stays that of what was written in order)
            while position < state.length:
                size = min(READ_BLOCK, state.length - position)
                digest.update(
                    self._read(self._part, state.offset + position, size, self.staging.part)
                )
                position += size
                self._counts["read_back"] += size
        return digest.digest()

    def symbols(self, chunk: int) -> list[bytes]:
        """The codec packets (payload id + symbol) `chunk` holds, for the decoder, in the
        order of their ESIs (as `esis`)."""
        return sorted(self.iter_symbols(chunk))  # (the payload id is the ESI, big-endian)

    def iter_symbols(self, chunk: int) -> Iterator[bytes]:
        """`symbols`, one at a time, so that a decoder holds them and not also a list: its
        source symbols in ESI order, then its repair symbols in the order of their slots (a
        decoder does not care).  Read the whole iterator before storing or completing
        anything."""
        state = self._chunks.get(chunk)
        if state is None:
            return
        size = self._symbol_size
        pack = _PAYLOAD_ID.pack
        if state.sources:
            if chunk == self._run_chunk:
                self._write_run()  # its gathered source symbols belong in what is read
            # Read a block at a time, not the whole chunk: while the codec holds its own copy
            # of every packet, a second copy of the chunk would be ~8 MiB more peak memory.
            bits, last, offset = state.bits, state.k - 1, state.offset
            per = max(1, READ_BLOCK // size)
            for first in range(0, last, per):
                end = min(first + per, last)
                if runs.all_clear(bits, first, end - first):
                    continue
                block = memoryview(
                    self._read(
                        self._part, offset + first * size, (end - first) * size, self.staging.part
                    )
                )
                at = 0  # (bytes + view is one copy, and the cheapest way to make the packet)
                for esi in range(first, end):
                    if bits[esi >> 3] >> (esi & 7) & 1:
                        yield pack(esi) + block[at : at + size]
                    at += size
            if state.has_source(last):  # the chunk's last symbol may be short: pad it
                tail = self._read(
                    self._part, offset + last * size, state.length - last * size, self.staging.part
                )
                yield pack(last) + tail.ljust(size, b"\0")
        if not state.repair_esi:
            return
        self._write_spill_run()  # gathered repair symbols belong in what is read
        # Repair symbols in consecutive slots (a run of them, stored in the order they came)
        # are read with one pread.
        held = sorted(zip(state.repair_slot, state.repair_esi, strict=True))
        at = 0
        while at < len(held):
            end = at + 1
            while end < len(held) and held[end][0] == held[end - 1][0] + 1:
                end += 1
            first = held[at][0]
            block = memoryview(
                self._read(self._spill, first * size, (end - at) * size, self.spill_path)
            )
            for slot, esi in held[at:end]:
                offset = (slot - first) * size
                yield pack(esi) + block[offset : offset + size]
            at = end

    def decode_plan(self, chunk: int) -> DecodePlan | None:
        """Where `chunk`'s symbols are (`DecodePlan`), its gathered symbols written first (not
        synced); None if it holds none.  Nothing is read: the decode worker reads them."""
        state = self._chunks.get(chunk)
        if state is None:
            return None
        if chunk == self._run_chunk:
            self._write_run()
        if state.repair_esi:
            self._write_spill_run()
        return DecodePlan(
            offset=state.offset,
            length=state.length,
            k=state.k,
            symbol_size=self._symbol_size,
            source_runs=tuple(state.source_runs()),
            repair_esi=array("I", state.repair_esi),
            repair_slot=array("I", state.repair_slot),
        )

    @property
    def stats(self) -> StoreStats:
        return StoreStats(
            source_bytes=self._counts["source"],
            spill_bytes=self._counts["spill"],
            decoded_bytes=self._counts["decoded"],
            journal_bytes=self._counts["journal"],
            log_bytes=self._counts["log"],
            spill_in_use=self._in_use * self._symbol_size,
            spill_high_water=self._high_water,
            stored=self._stored,
            refused=MappingProxyType(dict(self._refused)),
            compactions=self._counts["compactions"],
            read_back_bytes=self._counts["read_back"],
        )

    # --- Adding symbols ---------------------------------------------------------------------

    def add(self, chunk: int, esi: int, symbol: bytes | bytearray | memoryview) -> bool:
        """Store one received symbol (exactly T bytes, without its payload id).

        False if it was not stored: a duplicate, or refused (the reason is counted in
        `stats`).  Raises `SymbolStoreError` only when the disk fails.
        """
        # The receive loop calls this for every symbol (~1 us of Python each, measured; the
        # whole receive path costs a few): the common cases (a source symbol continuing the
        # gathered run, a repair symbol taking the next slot) are written out inline, with
        # what they read of `self` read once.
        size = self._symbol_size
        if not 0 <= esi <= MAX_ESI:
            return self._refuse("esi-range")
        if len(symbol) != size:
            return self._refuse("symbol-length")
        state = self._chunks.get(chunk)
        if state is None:  # (a chunk in progress is in range and not done)
            if not 0 <= chunk < self._chunk_count:
                return self._refuse("chunk-range")
            if chunk in self._done:
                return self._refuse("done")
            state = self._state(chunk)
        if esi < state.k:
            bits, byte, bit = state.bits, esi >> 3, 1 << (esi & 7)
            if bits[byte] & bit:
                return self._refuse("duplicate")
            cut = state.length - esi * size
            if cut >= size:
                cut = size
            elif any(memoryview(symbol)[cut:]):
                return self._refuse("padding")
            else:
                symbol = memoryview(symbol)[:cut]
            fill = self._run_fill
            if chunk != self._run_chunk or esi != self._run_end or fill + cut > self._run_room:
                self._write_run()
                self._run_chunk, self._run_first, fill = chunk, esi, 0
            self._run_view[fill : fill + cut] = symbol
            self._run_fill = fill + cut
            self._run_end = esi + 1
            bits[byte] |= bit
            state.sources += 1
        else:
            repair_esi = state.repair_esi
            at = bisect_left(repair_esi, esi)
            if at < len(repair_esi) and repair_esi[at] == esi:
                return self._refuse("duplicate")
            held = state.sources
            if held == state.k:
                return self._refuse("not-needed")  # all the data is in place: nothing to repair
            if held + len(repair_esi) >= state.k + MAX_EXTRA_SYMBOLS:
                return self._refuse("chunk-full")
            if self._free:
                slot = self._free.pop()
            elif self._slots < self._max_slots:
                slot = self._slots
                self._slots += 1
            else:
                return self._refuse("spill-full")
            fill = self._spill_fill
            if slot != self._spill_first + fill // size or fill + size > self._run_room:
                try:
                    self._write_spill_run()
                except SymbolStoreError:
                    self._free.append(slot)
                    raise
                if slot >= self._max_slots:  # the spill was just capped (`_cap_spill`)
                    return self._refuse("spill-full")
                self._spill_first, fill = slot, 0
            self._spill_view[fill : fill + size] = symbol
            self._spill_fill = fill + size
            # The REPAIR record (`_record`, inline), queued once the run is written.
            body = _BODY_PACK(chunk, _REPAIR_KIND | esi, slot)
            records = self._spill_records
            records += body
            records += _CRC32(body, _CRC_SEED).to_bytes(4, "big")
            repair_esi.insert(at, esi)
            state.repair_slot.insert(at, slot)
            in_use = self._in_use = self._in_use + 1
            if in_use * size > self._high_water:
                self._high_water = in_use * size
        self._stored += 1
        self._unflushed += 1
        if self._unflushed >= self._flush_at:
            self._flush_due()
        return True

    def add_run(
        self,
        chunk: int,
        first: int,
        symbols: _Symbols,
        most: int,
    ) -> tuple[int, int]:
        """`add` of ``symbols[i]`` as ESI ``first + i`` of `chunk`, in order, until `most` of
        them are stored: (how many were taken, how many of those were stored).

        For the run a GRO read holds (consecutive ESIs of one chunk: `StoreDecoder.feed_run`).
        The result is exactly what `add` one by one gives (the same checks, refusals counted
        per symbol, journal records, flushes started at the same symbol), with the common
        cases in one loop instead of a call each: source symbols (continuing the gathered
        run), and repair symbols after the chunk's last one.  Anything else goes to `add`."""
        count = len(symbols)
        taken = stored = 0
        while taken < count and stored < most:
            esi = first + taken
            state = self._chunks.get(chunk)
            # (so that the flush `add` starts every FLUSH_SYMBOLS symbols falls on the same one)
            batch = min(count - taken, most - stored, self._flush_at - self._unflushed)
            if state is None or esi > MAX_ESI - batch:
                new = 0  # the chunk's first symbol, or ESIs out of range: `add` decides
            elif esi < state.k:
                new = self._add_sources(state, chunk, esi, symbols[taken : taken + batch])
            else:
                new = self._add_repairs(state, chunk, esi, symbols[taken : taken + batch])
            if new:
                taken += new
                stored += new
                if self._unflushed >= self._flush_at:
                    self._flush_due()
            else:
                stored += self.add(chunk, esi, symbols[taken])
                taken += 1
        return taken, stored

    def _add_sources(self, state: _Chunk, chunk: int, esi: int, symbols: _Symbols) -> int:
        """`add_run`'s loop over source `symbols` (ESIs from `esi` on); how many it stored.
        It stops at the first one `add` must judge (a duplicate, a wrong length, the chunk's
        short last symbol, a repair ESI)."""
        size = self._symbol_size
        most = state.length // size - esi  # whole symbols of the chunk only
        if most <= 0:
            return 0
        bits, run, room = state.bits, self._run_view, self._run_room
        continues = chunk == self._run_chunk and esi == self._run_end
        fill = self._run_fill
        stored = counted = 0
        whole = symbols[:most]
        count = len(whole)
        if (
            count > 1
            and runs.all_clear(bits, esi, count)
            and min(map(len, whole)) == size == max(map(len, whole))
        ):
            # All of them new and whole (a GRO read's run): the same steps as the loop
            # below, a buffer's worth of symbols at a time.
            while stored < count:
                if not continues or fill + size > room:
                    self._restart_run(state, chunk, esi, fill, stored - counted, continues)
                    counted = stored if continues else counted
                    fill, continues = 0, True
                take = min(count - stored, (room - fill) // size)
                run[fill : fill + take * size] = b"".join(whole[stored : stored + take])
                runs.set_all(bits, esi, take)
                fill += take * size
                esi += take
                stored += take
            whole = ()  # (nothing left for the loop)
        for symbol in whole:
            byte, bit = esi >> 3, 1 << (esi & 7)
            if bits[byte] & bit or len(symbol) != size:
                break
            if not continues or fill + size > room:
                self._restart_run(state, chunk, esi, fill, stored - counted, continues)
                counted = stored if continues else counted
                fill, continues = 0, True
            run[fill : fill + size] = symbol
            fill += size
            bits[byte] |= bit
            esi += 1
            stored += 1
        if stored:  # (the gathered run is then this one)
            new = stored - counted
            state.sources += new
            self._stored += new
            self._unflushed += new
            self._run_fill, self._run_end = fill, esi
        return stored

    def _restart_run(
        self, state: _Chunk, chunk: int, esi: int, fill: int, new: int, continues: bool
    ) -> None:
        """Write the gathered run and gather `chunk`'s source symbols from `esi` on instead.
        If the run being added to `continues` it (its buffer is full), its `new` symbols not
        yet counted, `fill` bytes in all, are counted first (as `add`: counted before written;
        a failed write forgets them)."""
        if continues:
            state.sources += new
            self._stored += new
            self._unflushed += new
            self._run_fill, self._run_end = fill, esi
        self._write_run()
        self._run_chunk, self._run_first = chunk, esi

    def _add_repairs(self, state: _Chunk, chunk: int, esi: int, symbols: _Symbols) -> int:
        """`add_run`'s loop over repair `symbols` (ESIs from `esi` on) while each comes after
        the chunk's last one (no search: no duplicate); how many it stored.  It stops at the
        first one `add` must judge (a refusal, a wrong length)."""
        size = self._symbol_size
        repair_esi, repair_slot = state.repair_esi, state.repair_slot
        if (repair_esi and repair_esi[-1] >= esi) or state.sources == state.k:
            return 0  # a search for duplicates, or "not-needed": `add`'s
        # ("chunk-full" beyond this: `add`'s)
        most = state.k + MAX_EXTRA_SYMBOLS - state.sources - len(repair_esi)
        free, spill_run, room = self._free, self._spill_view, self._run_room
        records = self._spill_records
        stored = 0
        for symbol in symbols[: max(most, 0)]:
            if len(symbol) != size:
                break
            if free:
                slot = free.pop()
            elif self._slots < self._max_slots:
                slot = self._slots
                self._slots += 1
            else:
                break  # "spill-full": `add`'s
            fill = self._spill_fill
            if slot != self._spill_first + fill // size or fill + size > room:
                if self._in_use * size > self._high_water:
                    self._high_water = self._in_use * size  # (as `add` leaves it if this fails)
                try:
                    self._write_spill_run()
                except SymbolStoreError:
                    free.append(slot)
                    raise
                if slot >= self._max_slots:  # the spill was just capped (`_cap_spill`)
                    break  # "spill-full": `add`'s
                records = self._spill_records
                self._spill_first, fill = slot, 0
            spill_run[fill : fill + size] = symbol
            self._spill_fill = fill + size
            body = _BODY_PACK(chunk, _REPAIR_KIND | esi, slot)
            records += body
            records += _CRC32(body, _CRC_SEED).to_bytes(4, "big")
            repair_esi.append(esi)
            repair_slot.append(slot)
            self._in_use += 1  # (counted as it goes: a failed spill write gives it back)
            self._stored += 1
            self._unflushed += 1
            esi += 1
            stored += 1
        if self._in_use * size > self._high_water:
            self._high_water = self._in_use * size
        return stored

    def _refuse(self, reason: str) -> bool:
        self._refused[reason] += 1
        return False

    def _write_run(self) -> None:
        """Write the gathered run in place with one ``pwrite`` and queue its one record.

        If the write fails, the run's symbols are not stored (the chunk's bitmap forgets them)
        and the error is raised: nothing is ever half-stored."""
        fill = self._run_fill
        if not fill:
            return
        chunk, first, end = self._run_chunk, self._run_first, self._run_end
        self._run_chunk, self._run_fill = -1, 0
        if self._read_back is not None and self._read_back[0] == chunk:
            self._read_back = None  # what is in place changes
        state = self._chunks[chunk]
        try:
            with memoryview(self._run) as run:
                self._write(
                    self._part,
                    run[:fill],
                    state.offset + first * self._symbol_size,
                    self.staging.part,
                )
                if state.hashed == first:  # the chunk's bytes in order so far (*Hashed*)
                    state.digest.update(run[:fill])
                    state.hashed = end
        except SymbolStoreError:
            for esi in range(first, end):
                state.clear_source(esi)
            raise
        self._dirty_part = True
        self._counts["source"] += fill
        self._pending += _record(chunk, _SOURCES, first, end - first)

    def _write_spill_run(self) -> None:
        """Write the gathered repair symbols (consecutive slots) with one ``pwrite`` and queue
        their records.  If the write fails, none of them is stored (their chunks forget them,
        their slots are free again) and the error is raised; but a full file system
        (``ENOSPC``, ``EDQUOT``) only caps the spill at the slots it has (`_cap_spill`)."""
        fill = self._spill_fill
        if not fill:
            return
        records, self._spill_records = self._spill_records, bytearray()
        self._spill_fill = 0
        assert self._spill is not None
        try:
            with memoryview(self._spill_run) as run:
                pwrite_all(self._spill, run[:fill], self._spill_first * self._symbol_size)
        except OSError as exc:
            for at in range(0, len(records), RECORD_BYTES):
                chunk, _, slot, _ = _RECORD.unpack_from(records, at)
                state = self._chunks[chunk]  # (a chunk is forgotten only after this is written)
                where = state.repair_slot.index(slot)
                del state.repair_esi[where], state.repair_slot[where]
                self._in_use -= 1
                self._free.append(slot)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise _store_error("write symbols to", self.spill_path, exc) from None
            self._cap_spill()
            return
        self._dirty_spill = True
        self._counts["spill"] += fill
        self._pending += records

    def _hold_reserve(self) -> None:
        """Allocate the journal's reserve (`RESERVE_BYTES`) unless it is there; with no room
        for it, go on without (a full file system then ends the run as it would have)."""
        path = self.staging.directory / RESERVE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < RESERVE_BYTES:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(fd)

    def _cap_spill(self) -> None:
        """The file system is full: no slot beyond the spill's length is allocated again.
        Source symbols still go in place (the image's space is reserved), repair symbols into
        the slots freed as chunks complete, and the rest are refused (``spill-full``); the
        journal's reserve (`RESERVE_BYTES`) is given back for the records of all that.  A full
        disk (or a flood of forged repair symbols filling it) slows the download, it does not
        end it."""
        assert self._spill is not None
        try:
            slots = os.fstat(self._spill).st_size // self._symbol_size
        except OSError as exc:
            raise _store_error("read the length of", self.spill_path, exc) from None
        self._max_slots = min(self._max_slots, slots)
        self._slots = min(self._slots, slots)  # (a slot beyond it holds nothing in use)
        self._free[:] = array("I", (s for s in self._free if s < slots))  # (in place: aliased)
        self.spill_capped = True
        with contextlib.suppress(OSError):  # the journal's reserve: its records must still fit
            (self.staging.directory / RESERVE_NAME).unlink()

    # --- Ending a chunk ---------------------------------------------------------------------

    def complete(self, chunk: int, data: bytes | memoryview | None) -> None:
        """Keep `chunk`, whose `data` matches its signed hash: write in place only the source
        symbols that differ from it (those it lacked), record it done, free its slots.  With
        no `data`, the chunk is kept as it is in place (all its source symbols are: its
        `in_place_digest` matched)."""
        if data is None:
            if chunk not in self._done:
                self._keep_in_place(chunk)
            return
        offset, length = self._manifest.chunk_span(chunk)
        if len(data) != length:
            raise ValueError("chunk length does not match the manifest")
        if chunk in self._done:
            return
        read_back, self._read_back = self._read_back, None
        held: bytes | None = None  # the chunk's bytes in place, when `read_chunk` just read them
        if read_back is not None and read_back[0] == chunk and self._run_chunk != chunk:
            held = read_back[1]  # unchanged since
        elif chunk == self._run_chunk:
            self._write_run()  # its gathered source symbols belong in what is compared
        state = self._chunks.get(chunk)
        size = self._symbol_size
        writes: list[tuple[int, int]] = []  # [start, end) byte ranges of the chunk to write
        overwrites_stored = False
        if held is not data:
            # Compared a block of symbols at a time (no copies: `startswith` at an offset),
            # symbol by symbol only in a block that differs.  Not read back whole: a block's
            # bytes in place are read when it is compared (a chunk's second copy was 8 MiB of
            # a lane device's peak, issue 12).
            view = memoryview(data)
            source = self._manifest.source_symbols(chunk)
            for block in range(0, source, _COMPARE_SYMBOLS):
                stop = min(block + _COMPARE_SYMBOLS, source)
                first, last = block * size, min(stop * size, length)
                if held is not None:
                    place, base = held, 0
                else:
                    place = self._read(self._part, offset + first, last - first, self.staging.part)
                    base = first
                if place.startswith(view[first:last], first - base):
                    continue
                # A run of held symbols is compared whole (it nearly always matches: only a
                # forged symbol differs); symbol by symbol only where the chunk lacked them
                # and in a held run that differs (a decode's block has a few of each).
                word = 0 if state is None else runs.bits_of(state.bits, block, stop - block)
                for low, high, held_run in runs.spans(word, stop - block):
                    start, end = (block + low) * size, min((block + high) * size, length)
                    if held_run and place.startswith(view[start:end], start - base):
                        continue
                    for esi in range(block + low, block + high):
                        start, end = esi * size, min((esi + 1) * size, length)
                        if place.startswith(view[start:end], start - base):
                            continue
                        if held_run:
                            overwrites_stored = True  # a forged symbol the decode did not need
                        if writes and writes[-1][1] == start:
                            writes[-1] = (writes[-1][0], end)
                        else:
                            writes.append((start, end))
        if overwrites_stored:
            # Its record must be void on disk before the bytes it names change.
            self._forget(chunk)
            self.flush()
        view = memoryview(data)
        for start, end in writes:
            self._write(self._part, view[start:end], offset + start, self.staging.part)
            self._dirty_part = True
            self._counts["decoded"] += end - start
        self._record_done(chunk, forget=not overwrites_stored)

    def _keep_in_place(self, chunk: int) -> None:
        if not self.has_all_source(chunk):
            raise ValueError("the chunk's source symbols are not all in place")
        if chunk == self._run_chunk:
            self._write_run()
        self._record_done(chunk, forget=True)

    def _record_done(self, chunk: int, *, forget: bool) -> None:
        # Recorded in chunks.log by the next flush, after the chunk's bytes are synced and
        # before the FORGET below is appended: on reopen the chunk is done (and its symbols
        # then forgotten), or it is not and its symbols are still all there.  (Not forgotten
        # here when `complete` forgot them already, before overwriting a stored symbol.)
        self._completed.append(chunk)
        self._done.add(chunk)
        if forget:
            self._forget(chunk)

    def discard(self, chunk: int) -> None:
        """Forget every symbol of `chunk` (its decode failed its hash); synced at once, so
        that the chunk's new symbols can be written where the old ones were."""
        if chunk in self._chunks:
            self._forget(chunk)
            self.flush()

    def _forget(self, chunk: int) -> None:
        # Gathered repair symbols are recorded before the FORGET (after it they would be
        # replayed as the chunk's symbols again).
        self._write_spill_run()
        if chunk == self._run_chunk:
            self._run_chunk, self._run_fill = -1, 0  # forgotten: no need to write them
        if self._read_back is not None and self._read_back[0] == chunk:
            self._read_back = None
        state = self._chunks.pop(chunk, None)
        self._pending += _record(chunk, _FORGET)
        if state is not None:
            self._freeing.extend(state.repair_slot)
            self._in_use -= len(state.repair_slot)

    # --- Durability ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every symbol added and chunk completed so far survive a crash; returns once
        they are durable (module docstring).  `add` also flushes by itself, in the background."""
        self._hand_off()
        self._collect(self._syncer.wait())
        self._maybe_compact()

    def start_flush(self) -> None:
        """Start making everything so far durable in the background; if a flush is still
        running, only note that one is wanted (`flush_if_wanted` starts it once that one is
        done): never waits for the disk.  The receive driver calls it after each completed
        chunk and on a timer, so that progress is durable soon at any rate (`add` alone
        flushes every `FLUSH_SYMBOLS` symbols)."""
        if self._syncer.busy():
            self._flush_wanted = True
        else:
            self._hand_off()

    def flush_if_wanted(self) -> None:
        """`start_flush`, if one was asked for while a flush was running (cheap otherwise:
        the receive driver calls it every turn of its loop)."""
        if self._flush_wanted:
            self.start_flush()

    def _flush_due(self) -> None:
        """`add`'s flush every `FLUSH_SYMBOLS` symbols: while the syncer is still busy, only
        noted as wanted (the driver's `flush_if_wanted` starts it once the syncer is done) and
        tried again `FLUSH_RETRY_SYMBOLS` later, until `MAX_UNFLUSHED_SYMBOLS` are waiting:
        the receive loop must not wait for the disk while the stream goes on."""
        if self._unflushed < MAX_UNFLUSHED_SYMBOLS and self._syncer.busy():
            self._flush_wanted = True
            self._flush_at = self._unflushed + FLUSH_RETRY_SYMBOLS
        else:
            self._hand_off()

    def _hand_off(self) -> None:
        """Start making everything so far durable in the background (module docstring):
        wait for the batch before to be done, then hand the syncer a new one."""
        self._write_run()
        self._write_spill_run()
        self._unflushed = 0
        self._flush_at = FLUSH_SYMBOLS
        self._flush_wanted = False
        self._collect(self._syncer.wait())
        if not self._pending and not self._completed:
            return
        batch = _Batch(
            sync_part=self._dirty_part,
            sync_spill=self._dirty_spill,
            completed=self._completed,
            records=self._pending,
            journal_size=self._journal_records * RECORD_BYTES,
            freeing=self._freeing,
        )
        self._dirty_part = self._dirty_spill = False
        self._completed = []
        self._pending = bytearray()
        self._freeing = array("I")
        self._syncer.hand_off(batch)

    def _collect(self, batch: _Batch | None) -> None:
        """Take a batch the syncer is done with; raise its error, keeping what it held for
        the next flush to try again."""
        if batch is None:
            return
        if batch.error is not None:
            self._dirty_part |= batch.sync_part
            self._dirty_spill |= batch.sync_spill
            self._completed[:0] = batch.completed
            self._pending[:0] = batch.records
            self._freeing[:0] = batch.freeing
            raise batch.error
        self._journal_records += len(batch.records) // RECORD_BYTES
        self._counts["journal"] += len(batch.records)
        self._counts["log"] += 4 * len(batch.completed)
        # The FORGET records are durable: the slots they freed may be written again.
        self._free.extend(reversed(batch.freeing))

    def _sync(self, batch: _Batch) -> None:
        """Make `batch` durable (in the syncer's thread: it touches only files and `batch`)."""
        assert self._part is not None and self._spill is not None and self._journal is not None
        try:
            if batch.sync_part:
                os.fdatasync(self._part)
            if batch.sync_spill:
                os.fdatasync(self._spill)
        except OSError as exc:
            raise _store_error("sync symbols in", self.staging.directory, exc) from None
        try:
            self.staging.record_written(batch.completed)
        except StateError as exc:
            raise SymbolStoreError(str(exc)) from None
        self._write_all(self._journal, batch.records, batch.journal_size)

    def _write_all(self, fd: int, records: bytes | bytearray, size: int) -> None:
        """Append `records` to a journal of `size` bytes and sync it."""
        if not records:
            return
        try:
            with memoryview(records) as whole:
                view = whole
                while view:
                    view = view[os.write(fd, view) :]
                del view
            os.fdatasync(fd)
        except OSError as exc:
            # Leave no partial record behind: the records appended later would be unreadable.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise _store_error("write", self.journal_path, exc) from None

    def _live_records(self) -> int:
        # At most what a compaction writes (one record per run of source symbols).
        return sum(state.count() for state in self._chunks.values())

    def _maybe_compact(self) -> None:
        if self._journal_records <= JOURNAL_SLACK * self._live_records() + MIN_COMPACT_RECORDS:
            return
        # Every live record already names synced bytes (this runs right after a flush or a
        # replay); write them all to a new file, sync it, and swap it in atomically.
        tmp = self.journal_path.with_name(f".{JOURNAL_NAME}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                records = bytearray()
                written = 0
                for chunk, state in self._chunks.items():
                    for first, end in state.source_runs():
                        records += _record(chunk, _SOURCES, first, end - first)
                    for esi, slot in zip(state.repair_esi, state.repair_slot, strict=True):
                        records += _record(chunk, _REPAIR, esi, slot)
                    if len(records) >= READ_BLOCK:
                        self._write_all(fd, records, written)
                        written += len(records)
                        records.clear()
                self._write_all(fd, records, written)
                written += len(records)
                self._counts["journal"] += written
            finally:
                os.close(fd)
            tmp.replace(self.journal_path)
            directory = os.open(self.staging.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            assert self._journal is not None
            os.close(self._journal)
            self._journal = None
            self._journal = os.open(self.journal_path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            raise _store_error("compact", self.journal_path, exc) from None
        self._journal_records = written // RECORD_BYTES
        self._counts["compactions"] += 1

    # --- I/O helpers ------------------------------------------------------------------------

    def _write(self, fd: int | None, data: memoryview, position: int, path: object) -> None:
        assert fd is not None
        try:
            pwrite_all(fd, data, position)
        except OSError as exc:
            raise _store_error("write symbols to", path, exc) from None

    def _read(self, fd: int | None, position: int, length: int, path: object) -> bytes:
        assert fd is not None
        try:
            data = os.pread(fd, length, position)
        except OSError as exc:
            raise _store_error("read symbols from", path, exc) from None
        if len(data) != length:
            raise SymbolStoreError(f"{path} is shorter than the symbols it should hold")
        return data

    def close(self) -> None:
        """Flush, then close the store's files (the caller closes its `Staging`)."""
        try:
            if self._part is not None and self._spill is not None and self._journal is not None:
                self.flush()
        finally:
            if self._syncer.is_alive():
                with contextlib.suppress(SymbolStoreError):
                    self._syncer.stop()
            for name in ("_part", "_spill", "_journal"):
                fd = getattr(self, name, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, name, None)

    def __enter__(self) -> SymbolStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
