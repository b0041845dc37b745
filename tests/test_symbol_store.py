"""The durable symbol store: what it keeps, what it refuses, and what survives a crash."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacast.plugin import symbol_store
from otacast.plugin.decoder import raptorq_decoder
from otacast.plugin.errors import StateError
from otacast.plugin.staging import Staging
from otacast.plugin.symbol_store import (
    FLUSH_SYMBOLS,
    JOURNAL_NAME,
    MAX_EXTRA_SYMBOLS,
    RECORD_BYTES,
    SPILL_NAME,
    SymbolStore,
    SymbolStoreError,
)
from otacast.schemas import wire
from otacast.signer.keys import SigningKey

from .helpers import Release, cycles, make_release

KEY = SigningKey(b"\x06" * 32)
CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
# Five chunks of K = 55 (RFC 6330 blocks of one object); the image's last symbol holds 208 bytes.
IMAGE = random.Random(12).randbytes(5 * CHUNK - 1000)
RELEASE = make_release(IMAGE, KEY, chunk_size=CHUNK)
MANIFEST = RELEASE.manifest
T = MANIFEST.fec.symbol_size
REPAIR = 80  # repair symbols per chunk in the test cycles: more than K + MAX_EXTRA_SYMBOLS


def _symbols(release: Release, repair: int) -> list[dict[int, bytes]]:
    """Per chunk: ESI -> the symbol (T bytes) the sender sends, from real DATA datagrams."""
    out = []
    for datagrams in cycles(release.manifest, release.image, repair):
        chunk_symbols = {}
        for datagram in datagrams:
            fields = wire.peek_data(datagram)
            assert fields is not None
            chunk_symbols[fields[2]] = datagram[wire.DATA_HEADER_SIZE :]
        out.append(chunk_symbols)
    return out


SYMBOLS = _symbols(RELEASE, REPAIR)
K = [MANIFEST.source_symbols(c) for c in range(MANIFEST.chunk_count)]


@contextmanager
def opened(state: Path, release: Release = RELEASE) -> Iterator[SymbolStore]:
    staging = Staging(state, release.verified())
    try:
        with SymbolStore(staging) as store:
            yield store
    finally:
        staging.close()


def decode(store: SymbolStore, chunk: int) -> bytes | None:
    length = MANIFEST.chunk_span(chunk)[1]
    decoder = raptorq_decoder(chunk, length, T)
    for packet in store.symbols(chunk):
        data = decoder.feed(packet)
        if data is not None:
            return data
    return None


def packet(chunk: int, esi: int) -> bytes:
    return esi.to_bytes(4, "big") + SYMBOLS[chunk][esi]


def assert_only_genuine(store: SymbolStore) -> dict[int, set[int]]:
    """Every symbol the store returns is the real one; returns what each chunk holds."""
    held = {}
    for chunk in range(MANIFEST.chunk_count):
        packets = store.symbols(chunk)
        esis = store.esis(chunk)
        assert [int.from_bytes(p[:4], "big") for p in packets] == esis
        for esi, got in zip(esis, packets, strict=True):
            assert got == packet(chunk, esi), (chunk, esi)
        assert store.count(chunk) == len(esis)
        held[chunk] = set(esis)
    return held


# --- Writes ------------------------------------------------------------------------------------


def test_repair_symbols_in_consecutive_slots_are_written_with_one_pwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real_pwrite = os.pwrite

    def counted(fd: int, data: bytes, position: int) -> int:
        writes.append(len(data))
        return real_pwrite(fd, data, position)

    with opened(tmp_path) as store:
        monkeypatch.setattr(os, "pwrite", counted)
        for chunk in (0, 1):  # two chunks' repair symbols, in consecutive slots
            for esi in range(K[chunk], K[chunk] + 20):
                assert store.add(chunk, esi, SYMBOLS[chunk][esi])
        assert writes == []  # gathered
        store.flush()
        assert writes == [40 * T]
        assert store.add(2, K[2] + 3, SYMBOLS[2][K[2] + 3])
        assert store.symbols(2) == [packet(2, K[2] + 3)]  # a read writes what is gathered
        assert writes == [40 * T, T]
        monkeypatch.setattr(os, "pwrite", real_pwrite)
    with opened(tmp_path) as store:
        assert store.esis(0) == list(range(K[0], K[0] + 20))
        assert store.esis(2) == [K[2] + 3]
        assert_only_genuine(store)


# --- Completing chunks --------------------------------------------------------------------------


def test_a_chunk_whose_source_symbols_all_arrived_needs_no_decode(tmp_path: Path) -> None:
    with opened(tmp_path) as store:
        for chunk in range(MANIFEST.chunk_count):
            for esi in reversed(range(K[chunk])):
                assert not store.has_all_source(chunk)
                assert store.add(chunk, esi, SYMBOLS[chunk][esi])
            assert store.has_all_source(chunk)
            data = store.read_chunk(chunk)
            assert data == RELEASE.chunk(chunk)  # byte-identical, no decoder involved
            with pytest.raises(ValueError):
                store.complete(chunk + 1, None)  # (not all in place: it must be decoded)
            store.complete(chunk, data)
            assert store.count(chunk) == 0
        stats = store.stats
        assert stats.source_bytes == len(IMAGE)
        assert stats.decoded_bytes == 0  # nothing in place was written twice
        assert stats.spill_bytes == 0
        assert store.done == set(range(MANIFEST.chunk_count))
        store.staging.finish(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == IMAGE


def test_missing_source_symbols_are_decoded_from_stored_repair_symbols(tmp_path: Path) -> None:
    chunk = 1
    missing = set(random.Random(3).sample(range(K[chunk]), 20))
    with opened(tmp_path) as store:
        for esi in range(K[chunk]):
            if esi not in missing:
                store.add(chunk, esi, SYMBOLS[chunk][esi])
        for esi in range(K[chunk] + 40, K[chunk] + 40 + len(missing) + 2):
            store.add(chunk, esi, SYMBOLS[chunk][esi])
        assert not store.has_all_source(chunk)
        data = decode(store, chunk)
        assert data == RELEASE.chunk(chunk)
        store.complete(chunk, data)
        stats = store.stats
        # Only the symbols the chunk lacked were written in place (the last one is short).
        assert stats.decoded_bytes == sum(min(T, CHUNK - e * T) for e in missing)
        assert stats.spill_bytes == (len(missing) + 2) * T
        assert stats.spill_in_use == 0  # the chunk's slots are free again
    with opened(tmp_path) as store:
        assert store.done == {chunk}
        assert store.read_chunk(chunk) == RELEASE.chunk(chunk)


def test_a_decoded_chunk_overwrites_a_forged_source_symbol_the_decode_did_not_use(
    tmp_path: Path,
) -> None:
    chunk = 2
    with opened(tmp_path) as store:
        for esi in range(1, K[chunk]):
            store.add(chunk, esi, SYMBOLS[chunk][esi])
        for esi in range(K[chunk], K[chunk] + 3):
            store.add(chunk, esi, SYMBOLS[chunk][esi])
        data = decode(store, chunk)  # decodes before ESI 0 is ever fed
        assert data == RELEASE.chunk(chunk)
        store.add(chunk, 0, b"\xee" * T)  # a forgery for the missing symbol arrives meanwhile
        store.complete(chunk, data)
        assert store.read_chunk(chunk) == RELEASE.chunk(chunk)
        assert store.stats.decoded_bytes == T
    with opened(tmp_path) as store:
        assert store.done == {chunk}


def test_a_discarded_chunk_forgets_its_symbols_and_collects_new_ones(tmp_path: Path) -> None:
    chunk = 0
    with opened(tmp_path) as store:
        for esi in range(10):
            store.add(chunk, esi, b"\x99" * T)  # forged: the decode will fail its hash
        for esi in range(K[chunk], K[chunk] + 50):
            store.add(chunk, esi, SYMBOLS[chunk][esi])
        assert decode(store, chunk) != RELEASE.chunk(chunk)
        store.discard(chunk)
        assert store.count(chunk) == 0
        assert store.symbols(chunk) == []
    with opened(tmp_path) as store:
        assert store.count(chunk) == 0  # the discard is durable
        for esi in [*range(2, K[chunk]), K[chunk] + 7, K[chunk] + 9, K[chunk] + 11]:
            assert store.add(chunk, esi, SYMBOLS[chunk][esi])
        assert_only_genuine(store)
        assert decode(store, chunk) == RELEASE.chunk(chunk)
        assert store.stats.spill_high_water == 3 * T  # the spill was cut back on reopening


# --- Refusals ---------------------------------------------------------------------------------


def test_duplicates_return_false_and_are_counted(tmp_path: Path) -> None:
    with opened(tmp_path) as store:
        assert store.add(0, 3, SYMBOLS[0][3])
        assert not store.add(0, 3, SYMBOLS[0][3])
        assert store.add(0, 60, SYMBOLS[0][60])
        assert not store.add(0, 60, SYMBOLS[0][60])
        assert store.count(0) == 2
        assert store.stats.refused == {"duplicate": 2}
    with opened(tmp_path) as store:
        assert not store.add(0, 3, SYMBOLS[0][3])  # also after reopening
        assert not store.add(0, 60, SYMBOLS[0][60])


def test_input_that_cannot_be_stored_is_refused_with_a_reason(tmp_path: Path) -> None:
    last = MANIFEST.chunk_count - 1
    short = SYMBOLS[last][K[last] - 1]
    assert not any(short[208:])  # the image's last symbol: 208 bytes and zero padding
    with opened(tmp_path) as store:
        assert not store.add(MANIFEST.chunk_count, 0, SYMBOLS[0][0])
        assert not store.add(-1, 0, SYMBOLS[0][0])
        assert not store.add(0, 1 << 24, SYMBOLS[0][0])
        assert not store.add(0, 0, SYMBOLS[0][0][:-1])
        assert not store.add(0, 0, SYMBOLS[0][0] + b"\0")
        assert not store.add(last, K[last] - 1, short[:208] + b"\x01" + short[209:])
        assert store.add(last, K[last] - 1, short)
        for esi in range(K[last]):
            store.add(last, esi, SYMBOLS[last][esi])
        assert not store.add(last, K[last], SYMBOLS[last][K[last]])  # the data is all there
        store.complete(last, store.read_chunk(last))
        assert not store.add(last, 0, SYMBOLS[last][0])
        assert store.stats.refused == {
            "chunk-range": 2,
            "esi-range": 1,
            "symbol-length": 2,
            "padding": 1,
            "duplicate": 1,
            "done": 1,
            "not-needed": 1,
        }
        assert store.stats.stored == K[last]


def test_repair_symbols_are_bounded_per_chunk_and_in_total(tmp_path: Path) -> None:
    total_source = sum(K)
    with opened(tmp_path) as store:
        stored = 0
        for chunk in range(MANIFEST.chunk_count):
            for esi in range(K[chunk], K[chunk] + REPAIR):
                stored += store.add(chunk, esi, SYMBOLS[chunk][esi])
        refused = store.stats.refused
        # The spill holds as many symbols as the image has source symbols, no more ...
        assert stored == total_source
        assert store.stats.spill_high_water == total_source * T
        store.flush()  # (repair symbols in consecutive slots are gathered for one write)
        assert (tmp_path / MANIFEST.session_id.hex() / SPILL_NAME).stat().st_size == (
            total_source * T
        )
        # ... and no chunk more than K + MAX_EXTRA_SYMBOLS of them.
        assert max(store.count(c) - K[c] for c in range(MANIFEST.chunk_count)) <= (
            MAX_EXTRA_SYMBOLS
        )
        assert refused["chunk-full"] + refused["spill-full"] == (
            REPAIR * MANIFEST.chunk_count - total_source
        )
        assert refused["spill-full"] > 0 and refused["chunk-full"] > 0
        # A full spill always leaves a decodable chunk, whose completion frees slots.
        ready = [c for c in range(MANIFEST.chunk_count) if store.count(c) >= K[c]]
        assert ready
        data = decode(store, ready[0])
        assert data == RELEASE.chunk(ready[0])
        store.complete(ready[0], data)
        store.flush()
        other = next(
            c for c in range(MANIFEST.chunk_count) if not store.is_done(c) and store.count(c) < K[c]
        )
        fresh = next(e for e in range(K[other], K[other] + REPAIR) if e not in store.esis(other))
        assert store.add(other, fresh, SYMBOLS[other][fresh])


def test_reopening_keeps_every_stored_symbol_and_trims_the_spill(tmp_path: Path) -> None:
    rng = random.Random(5)
    added: dict[int, set[int]] = {c: set() for c in range(MANIFEST.chunk_count)}
    with opened(tmp_path) as store:
        for chunk in range(MANIFEST.chunk_count):
            for esi in rng.sample(sorted(SYMBOLS[chunk]), 30):
                if store.add(chunk, esi, SYMBOLS[chunk][esi]):
                    added[chunk].add(esi)
        store.discard(4)  # the last chunk added: its slots are the spill's tail
        added[4] = set()
    with opened(tmp_path) as store:
        assert assert_only_genuine(store) == added
        spill = tmp_path / MANIFEST.session_id.hex() / SPILL_NAME
        assert spill.stat().st_size == store.stats.spill_in_use  # the discarded tail is cut
        for chunk in range(MANIFEST.chunk_count):
            for esi in added[chunk]:
                assert not store.add(chunk, esi, SYMBOLS[chunk][esi])


def test_the_journal_is_compacted_so_failing_chunks_cannot_grow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(symbol_store, "MIN_COMPACT_RECORDS", 100)
    journal = tmp_path / MANIFEST.session_id.hex() / JOURNAL_NAME
    with opened(tmp_path) as store:
        store.add(1, 0, SYMBOLS[1][0])
        for _ in range(20):  # a sender whose chunk 0 never matches its hash
            for esi in range(K[0], K[0] + K[0] + MAX_EXTRA_SYMBOLS):
                store.add(0, esi, SYMBOLS[0][esi])
            store.discard(0)
        assert store.stats.compactions > 0
        assert journal.stat().st_size <= (2 * 1 + 100 + 70) * RECORD_BYTES
        assert store.stats.spill_high_water == (K[0] + MAX_EXTRA_SYMBOLS) * T
    with opened(tmp_path) as store:
        assert assert_only_genuine(store) == {0: set(), 1: {0}, 2: set(), 3: set(), 4: set()}


# --- Crashes ------------------------------------------------------------------------------------


def _feed(store: SymbolStore, order: list[tuple[int, int]]) -> None:
    for chunk, esi in order:
        store.add(chunk, esi, SYMBOLS[chunk][esi])


def _shuffled(seed: int) -> list[tuple[int, int]]:
    """Every symbol of the test cycles, in a random order."""
    order = [(c, e) for c in range(MANIFEST.chunk_count) for e in SYMBOLS[c]]
    random.Random(seed).shuffle(order)
    return order


def _sender_order(rng: random.Random, run: int, loss: float) -> list[tuple[int, int]]:
    """A sender's order: rounds that give each chunk in turn the next `run` consecutive ESIs
    of its cycle, each lost with probability `loss` (so runs break at gaps too)."""
    longest = max(len(SYMBOLS[c]) for c in range(MANIFEST.chunk_count))
    return [
        (c, e)
        for start in range(0, longest, run)
        for c in range(MANIFEST.chunk_count)
        for e in range(start, min(start + run, len(SYMBOLS[c])))
        if rng.random() >= loss
    ]


def _admitted(order: list[tuple[int, int]]) -> dict[int, set[int]]:
    """What a store that completes nothing keeps of `order`: sources, and repair symbols while
    the chunk holds fewer than K + MAX_EXTRA_SYMBOLS (the spill cannot fill up without that)."""
    held: dict[int, set[int]] = {c: set() for c in range(MANIFEST.chunk_count)}
    for chunk, esi in order:
        k, have = K[chunk], held[chunk]
        if esi < k or (sum(e < k for e in have) < k and len(have) < k + MAX_EXTRA_SYMBOLS):
            have.add(esi)
    return held


def test_a_journal_cut_at_any_byte_of_its_tail_yields_only_genuine_symbols(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    # Source symbols of a chunk that arrive one after the other (repair symbols in between go
    # elsewhere) with consecutive ESIs share one run record: this order has none, so every
    # record below is one symbol.
    order = _shuffled(8)[:200]
    sources = [(c, e) for c, e in order if e < K[c]]
    assert not any(c == c0 and e == e0 + 1 for (c0, e0), (c, e) in itertools.pairwise(sources))
    with opened(state) as store:
        _feed(store, order)
    directory = state / MANIFEST.session_id.hex()
    journal = (directory / JOURNAL_NAME).read_bytes()
    records = sum(map(len, _admitted(order).values()))
    assert len(journal) == records * RECORD_BYTES
    spill = (directory / SPILL_NAME).read_bytes()
    previous = -1
    for cut in range(len(journal) - 40 * RECORD_BYTES, len(journal) + 1):
        (directory / JOURNAL_NAME).write_bytes(journal[:cut])
        (directory / SPILL_NAME).write_bytes(spill)  # a reopen cuts it to the slots named
        with opened(state) as store:
            held = assert_only_genuine(store)
            assert sum(map(len, held.values())) == cut // RECORD_BYTES
            assert sum(map(len, held.values())) >= previous
            previous = sum(map(len, held.values()))
        # The torn tail was cut off: what is appended next is replayed too.
        assert (directory / JOURNAL_NAME).stat().st_size == cut - cut % RECORD_BYTES
    for junk in (bytes(RECORD_BYTES), b"\xff" * 40, random.Random(1).randbytes(100)):
        (directory / JOURNAL_NAME).write_bytes(journal + junk)
        (directory / SPILL_NAME).write_bytes(spill)
        with opened(state) as store:
            assert sum(map(len, assert_only_genuine(store).values())) == records


def test_a_copy_taken_at_any_moment_holds_only_genuine_symbols(tmp_path: Path) -> None:
    """A copy of the live directory is what a later process finds after kill -9 then."""
    state = tmp_path / "state"
    order = _shuffled(8)
    rng = random.Random(9)
    copies = []
    flushed: list[tuple[int, int]] = []
    flushed_done: set[int] = set()
    with opened(state) as store:
        for n, (chunk, esi) in enumerate(order):
            if rng.random() < 0.05:
                copy = tmp_path / f"copy{n}"
                shutil.copytree(state, copy)
                copies.append((copy, set(store.done), set(flushed_done), list(flushed)))
            if store.is_done(chunk):
                continue
            store.add(chunk, esi, SYMBOLS[chunk][esi])
            if rng.random() < 0.02:
                store.flush()
                flushed = [(c, e) for c in range(MANIFEST.chunk_count) for e in store.esis(c)]
                flushed_done = set(store.done)
            if store.count(chunk) >= K[chunk] + 2 and rng.random() < 0.5:
                data = decode(store, chunk)
                assert data == RELEASE.chunk(chunk)
                store.complete(chunk, data)
            if rng.random() < 0.01:
                victim = rng.randrange(MANIFEST.chunk_count)
                if store.count(victim):  # (a discard that forgets something syncs)
                    store.discard(victim)
                    flushed = [(c, e) for c in range(MANIFEST.chunk_count) for e in store.esis(c)]
                    flushed_done = set(store.done)
    assert len(copies) > 10
    for copy, done, durable, synced in copies:
        with opened(copy) as store:
            held = assert_only_genuine(store)
            # Every complete() is durable once a flush returns, and none is recorded early.
            assert durable <= store.done <= done
            for chunk, esi in synced:  # and so is every symbol added before a flush
                assert chunk in store.done or esi in held[chunk]


def _differing(before: bytes, after: bytes) -> list[int]:
    return [i for i in range(len(after)) if i >= len(before) or before[i] != after[i]]


def test_after_a_power_cut_unsynced_bytes_are_never_named(tmp_path: Path) -> None:
    """A power cut may lose or garble every byte written since the last flush."""
    state = tmp_path / "state"
    directory = state / MANIFEST.session_id.hex()
    order = _shuffled(10)
    with opened(state) as store:
        _feed(store, order[:150])
        if store.has_all_source(4):
            store.complete(4, store.read_chunk(4))
        store.discard(2)  # its slots are free once this returns ...
        _feed(store, order[150:250])
        store.flush()
        synced = {n: (directory / n).read_bytes() for n in ("image.part", SPILL_NAME)}
        journal = (directory / JOURNAL_NAME).read_bytes()
        done = set(store.done)
        held_at_flush = assert_only_genuine(store)
        chunk = next(c for c in range(MANIFEST.chunk_count) if store.count(c) >= K[c] + 2)
        data = decode(store, chunk)
        assert data == RELEASE.chunk(chunk)
        store.complete(chunk, data)  # ... and this chunk's slots are free once synced
        _feed(store, order[250:400])  # unsynced: written to files, not yet recorded
        cut = tmp_path / "cut"
        shutil.copytree(state, cut)
    garble = random.Random(11)
    for name, before in synced.items():
        path = cut / MANIFEST.session_id.hex() / name
        after = bytearray(path.read_bytes())
        for i in _differing(before, bytes(after)):
            after[i] = garble.randrange(256)  # not synced: anything may be there now
        path.write_bytes(bytes(after))
    (cut / MANIFEST.session_id.hex() / JOURNAL_NAME).write_bytes(journal)
    with opened(cut) as store:
        held = assert_only_genuine(store)
        for c in range(MANIFEST.chunk_count):
            if not store.is_done(c):
                assert held[c] >= held_at_flush[c]
        assert store.done >= done


def test_start_flush_never_waits_for_a_slow_disk_and_a_flush_asked_meanwhile_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = threading.Event()  # the disk finishes the batch in flight when this is set
    real_sync = SymbolStore._sync

    def slow_sync(self: SymbolStore, batch: object) -> None:
        assert disk.wait(10)
        real_sync(self, batch)  # type: ignore[arg-type]

    with opened(tmp_path) as store:
        monkeypatch.setattr(SymbolStore, "_sync", slow_sync)
        for chunk in (0, 1):
            for esi in range(K[chunk]):
                store.add(chunk, esi, SYMBOLS[chunk][esi])
        store.complete(0, store.read_chunk(0))
        store.start_flush()  # handed to the syncer, which waits for the disk
        store.complete(1, store.read_chunk(1))
        store.start_flush()  # returns at once: only noted as wanted
        store.flush_if_wanted()  # still busy: returns at once too
        assert not disk.is_set()  # (had any of them waited, the test would have hung)
        disk.set()
        while store._syncer.busy():
            time.sleep(0.001)
        store.flush_if_wanted()  # the flush asked for meanwhile now starts ...
        copy = tmp_path / "copy"
        while store._syncer.busy():
            time.sleep(0.001)
        shutil.copytree(tmp_path / MANIFEST.session_id.hex(), copy / MANIFEST.session_id.hex())
    with opened(copy) as store:
        assert store.done == {0, 1}  # ... and made chunk 1 durable without another call


def test_add_waits_for_a_slow_disk_only_once_max_unflushed_symbols_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = threading.Event()  # the disk finishes the batch in flight when this is set
    real_sync = SymbolStore._sync
    synced: list[int] = []  # journal bytes of each batch, as the disk finishes it

    def slow_sync(self: SymbolStore, batch: symbol_store._Batch) -> None:
        assert disk.wait(10)
        synced.append(len(batch.records))
        real_sync(self, batch)

    monkeypatch.setattr(symbol_store, "FLUSH_SYMBOLS", 8)
    monkeypatch.setattr(symbol_store, "FLUSH_RETRY_SYMBOLS", 2)
    monkeypatch.setattr(symbol_store, "MAX_UNFLUSHED_SYMBOLS", 40)
    monkeypatch.setattr(SymbolStore, "_sync", slow_sync)
    # One record per symbol: each one a repair symbol of chunk 0 (source runs share records).
    repair = [SYMBOLS[0][K[0] + i] for i in range(REPAIR)]
    with opened(tmp_path) as store:
        for i in range(8):
            store.add(0, K[0] + i, repair[i])  # the 8th hands a batch to the stalled disk
        assert store._syncer.busy()
        for i in range(8, 47):  # 39 more are gathered without waiting: the loop goes on
            store.add(0, K[0] + i, repair[i])
        assert not disk.is_set() and store._unflushed == 39
        # The 40th waits for the disk (it is let go from another thread meanwhile).
        threading.Timer(0.2, disk.set).start()
        store.add(0, K[0] + 47, repair[47])
        assert disk.is_set() and store._unflushed == 0
        store.flush()
    assert synced == [8 * RECORD_BYTES, 40 * RECORD_BYTES]
    with opened(tmp_path) as store:
        assert sorted(store.esis(0)) == [K[0] + i for i in range(48)]


def test_a_receiver_killed_mid_stream_resumes_with_its_stored_symbols(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    state = tmp_path / "state"
    child = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(root)!r})
        from pathlib import Path
        from otacast.plugin.staging import Staging
        from otacast.plugin.symbol_store import SymbolStore
        from tests import test_symbol_store as t
        store = SymbolStore(Staging(Path({str(state)!r}), t.RELEASE.verified()))
        for n, (chunk, esi) in enumerate(t._shuffled(12)):
            store.add(chunk, esi, t.SYMBOLS[chunk][esi])
            if n % 25 == 24:
                store.flush()
                print(n + 1, flush=True)
            time.sleep(0.002)
        time.sleep(60)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=root
    )
    assert process.stdout is not None
    try:
        reports = [int(process.stdout.readline()) for _ in range(6)]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    synced = _admitted(_shuffled(12)[: reports[-1]])
    with opened(state) as store:
        held = assert_only_genuine(store)
        for chunk in synced:
            assert held[chunk] >= synced[chunk]  # all flushed before the kill is still there
        for chunk, esi in _shuffled(13):  # the stream goes on, resumed with what was held
            if store.is_done(chunk):
                continue
            store.add(chunk, esi, SYMBOLS[chunk][esi])
            if store.count(chunk) >= K[chunk]:
                data = (
                    store.read_chunk(chunk) if store.has_all_source(chunk) else decode(store, chunk)
                )
                if data is not None:
                    assert data == RELEASE.chunk(chunk)
                    store.complete(chunk, data)
        assert store.done == set(range(MANIFEST.chunk_count))
        store.staging.finish(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == IMAGE


# --- Properties and measurements ----------------------------------------------------------------


def _examples(count: int) -> settings:
    # Each example makes its own directory from the (function-scoped) tmp_path_factory.
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@_examples(25)
@given(
    seed=st.integers(0, 2**32 - 1),
    reopen_every=st.integers(20, 400),
    flush_every=st.integers(1, 300),
    runs=st.sampled_from([0, 7, 40]),
)
def test_any_order_of_arrivals_keeps_exactly_the_admitted_symbols(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    reopen_every: int,
    flush_every: int,
    runs: int,
) -> None:
    state = tmp_path_factory.mktemp("prop")
    rng = random.Random(seed)
    if runs:  # a sender's runs, then a second pass of them, with loss
        arrivals = _sender_order(rng, runs, 0.2) + _sender_order(rng, runs, 0.2)
    else:
        arrivals = [(c, e) for c in range(MANIFEST.chunk_count) for e in SYMBOLS[c]]
        arrivals += rng.choices(arrivals, k=len(arrivals) // 4)  # duplicates, as multicast has
        rng.shuffle(arrivals)
    expected: dict[int, set[int]] = {c: set() for c in range(MANIFEST.chunk_count)}
    done: set[int] = set()
    store_cm = opened(state)
    store = store_cm.__enter__()
    try:
        for n, (chunk, esi) in enumerate(arrivals):
            k = K[chunk]
            sources = sum(e < k for e in expected[chunk])
            admissible = (
                chunk not in done
                and esi not in expected[chunk]
                and (esi < k or (sources < k and len(expected[chunk]) < k + MAX_EXTRA_SYMBOLS))
            )
            assert store.add(chunk, esi, SYMBOLS[chunk][esi]) == admissible
            if admissible:
                expected[chunk].add(esi)
            if set(store.esis(chunk)) != expected[chunk]:
                raise AssertionError((chunk, esi))
            whole = store.has_all_source(chunk)  # (then repair symbols are not needed)
            if len(expected[chunk]) >= k + 3 or whole:
                if whole:
                    # Hashed as written where it came in order, read back past that: either
                    # way the digest of the chunk, which is then kept as it is in place.
                    digest = store.in_place_digest(chunk)
                    assert digest == hashlib.sha256(RELEASE.chunk(chunk)).digest()
                    store.complete(chunk, None)
                    assert store.read_chunk(chunk) == RELEASE.chunk(chunk)
                else:
                    data = decode(store, chunk)
                    assert data == RELEASE.chunk(chunk)
                    store.complete(chunk, data)
                done.add(chunk)
                expected[chunk] = set()
            if n % flush_every == 0:
                store.flush()
            if n % reopen_every == 0:
                store_cm.__exit__(None, None, None)
                store_cm = opened(state)
                store = store_cm.__enter__()
                assert assert_only_genuine(store) == expected
                assert store.done == done
        assert done == set(range(MANIFEST.chunk_count))
        stats = store.stats
        assert stats.spill_in_use == 0
    finally:
        store_cm.__exit__(None, None, None)


def test_a_read_in_the_middle_of_a_run_returns_the_symbols_gathered_so_far(
    tmp_path: Path,
) -> None:
    part = tmp_path / MANIFEST.session_id.hex() / "image.part"
    with opened(tmp_path) as store:
        for esi in range(10):
            assert store.add(1, esi, SYMBOLS[1][esi])  # one run, gathered
        assert store.add(3, 0, SYMBOLS[3][0])  # chunk 3's run breaks chunk 1's: written
        assert store.add(3, 1, SYMBOLS[3][1])
        assert part.read_bytes()[CHUNK : CHUNK + 10 * T] == RELEASE.chunk(1)[: 10 * T]
        assert store.read_chunk(3)[: 2 * T] == RELEASE.chunk(3)[: 2 * T]  # the run in progress
        for esi in range(2, 5):  # the run goes on after the read, as a new one
            assert store.add(3, esi, SYMBOLS[3][esi])
        assert not store.add(3, 4, SYMBOLS[3][4])  # a duplicate of a gathered symbol
        assert store.symbols(3) == [packet(3, e) for e in range(5)]
        assert store.add(3, 5, SYMBOLS[3][5])
        assert store.add(3, 7, SYMBOLS[3][7])  # a gap: ESIs 5 and 7 are written apart
        assert store.add(3, K[3], SYMBOLS[3][K[3]])  # a repair symbol does not break it
        assert store.add(3, 8, SYMBOLS[3][8])
    with opened(tmp_path) as store:
        assert store.esis(1) == list(range(10))
        assert store.esis(3) == [0, 1, 2, 3, 4, 5, 7, 8, K[3]]
        assert_only_genuine(store)


@_examples(20)
@given(
    seed=st.integers(0, 2**32 - 1),
    flush_every=st.integers(1, 200),
    crash_at=st.integers(0, 800),
    runs=st.sampled_from([0, 7, 40]),
)
def test_a_power_cut_at_any_moment_never_yields_a_wrong_symbol(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    flush_every: int,
    crash_at: int,
    runs: int,
) -> None:
    """Whatever the order (random, or a sender's runs of consecutive ESIs that the store
    gathers into one write each), the flushes, completions and discards: after a power cut
    that garbles every byte written since the file was last synced, each symbol is the real
    one."""
    state = tmp_path_factory.mktemp("cut")
    directory = state / MANIFEST.session_id.hex()
    rng = random.Random(seed)
    if runs:
        arrivals = _sender_order(rng, runs, 0.1)
    else:
        arrivals = [(c, e) for c in range(MANIFEST.chunk_count) for e in SYMBOLS[c]]
        rng.shuffle(arrivals)
    with opened(state) as store:
        synced = {name: b"" for name in ("image.part", SPILL_NAME)}

        def synced_now(*names: str) -> None:
            for name in names:
                synced[name] = (directory / name).read_bytes()

        synced_now("image.part", SPILL_NAME)
        for n, (chunk, esi) in enumerate(arrivals[:crash_at]):
            store.add(chunk, esi, SYMBOLS[chunk][esi])
            if n % flush_every == 0:
                store.flush()
                synced_now("image.part", SPILL_NAME)
            if store.count(chunk) >= K[chunk] + 2 and rng.random() < 0.3:
                data = decode(store, chunk)
                assert data == RELEASE.chunk(chunk)
                store.complete(chunk, data)  # (synced by the next flush)
            if rng.random() < 0.01 and store.count(chunk):
                store.discard(chunk)
                synced_now("image.part", SPILL_NAME)
        cut = tmp_path_factory.mktemp("after")
        shutil.copytree(state, cut, dirs_exist_ok=True)
    for name, before in synced.items():
        path = cut / MANIFEST.session_id.hex() / name
        after = bytearray(path.read_bytes())
        for i in _differing(before, bytes(after)):
            after[i] ^= 1 + rng.randrange(255)  # not synced: garbled
        path.write_bytes(bytes(after))
    with opened(cut) as store:
        assert_only_genuine(store)


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.2])
def test_disk_writes_stay_near_one_plus_loss_times_the_image(tmp_path: Path, loss: float) -> None:
    """Symbol-major arrivals (every chunk advances each round) at random loss `loss`."""
    image = random.Random(14).randbytes(16 * CHUNK)
    release = make_release(image, KEY, chunk_size=CHUNK)
    symbols = _symbols(release, 40)
    k = release.manifest.source_symbols(0)
    rng = random.Random(15)
    with opened(tmp_path, release) as store:
        for esi in range(k + 40):
            for chunk in range(release.manifest.chunk_count):
                if store.is_done(chunk) or rng.random() < loss:
                    continue
                store.add(chunk, esi, symbols[chunk][esi])
                if store.count(chunk) < k:
                    continue
                if store.has_all_source(chunk):
                    data: bytes | None = store.read_chunk(chunk)
                else:
                    decoder = raptorq_decoder(chunk, CHUNK, T)
                    data = None
                    for codec_packet in store.symbols(chunk):
                        data = decoder.feed(codec_packet)
                        if data is not None:
                            break
                if data is not None:
                    assert data == release.chunk(chunk)
                    store.complete(chunk, data)
        assert store.done == set(range(release.manifest.chunk_count))
        store.flush()
        stats = store.stats
    amplification = stats.bytes_written / len(image)
    print(f"loss {loss:.0%}: {amplification:.3f} x image written, {stats}")
    # Source once in place (1 - p), repair once in the spill (p), the lacking source once by
    # complete() (p), plus ~1.4 % of journal and the odd repair symbol a failed decode needed.
    assert amplification <= 1 + loss + 0.03
    assert stats.spill_high_water <= (loss + 0.03) * len(image) + 4 * T


def test_memory_grows_by_a_few_bytes_per_symbol_held_whatever_the_esis(tmp_path: Path) -> None:
    """~8 bytes per repair symbol held (its ESI and slot) and 1 bit per source symbol."""
    image = random.Random(16).randbytes(16 * 868 * 1208)  # 16 chunks of ~1 MiB
    release = make_release(image, KEY, chunk_size=868 * 1208)
    manifest = release.manifest
    k = manifest.source_symbols(0)
    junk = bytes(T)  # the store does not authenticate symbols: any bytes measure its books
    rng = random.Random(17)
    esis = [rng.sample(range(k, 1 << 24), k + MAX_EXTRA_SYMBOLS) for _ in range(16)]
    with opened(tmp_path, release) as store:
        store.add(0, 0, junk)
        store.flush()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            held = 0
            for chunk in range(manifest.chunk_count):
                for esi in esis[chunk]:
                    held += store.add(chunk, esi, junk)
                store.add(chunk, 1, junk)
            grown = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert held == sum(manifest.source_symbols(c) for c in range(manifest.chunk_count))  # full
    # Besides the records of two flushes (one being synced, the next one gathering), and, at
    # the peak, a third while the gathering buffer is copied into a larger one as it grows (how
    # far it has grown when the syncer thread lets go depends on timing: 10.8 bytes per symbol
    # were once seen with only two flushes allowed for).
    per_symbol = (grown - 3 * FLUSH_SYMBOLS * RECORD_BYTES) / held
    print(f"{grown} bytes traced for {held} repair symbols held: {per_symbol:.1f} per symbol")
    assert per_symbol < 10


def test_disk_errors_raise_a_state_error_and_leave_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, real_pwrite = os.write, os.pwrite

    def full_disk(*_: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_disk(*_: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def short_then_full(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", full_disk)
        return real_write(fd, bytes(data)[:5])  # a part of a record, then the disk is full

    with opened(tmp_path) as store:
        store.add(0, 0, SYMBOLS[0][0])
        store.flush()
        monkeypatch.setattr(os, "pwrite", full_disk)
        assert store.add(0, 1, SYMBOLS[0][1])  # gathered into a run, not written yet
        with pytest.raises(StateError, match="No space"):
            store.add(1, 0, SYMBOLS[1][0])  # breaks the run, whose write fails
        assert store.esis(0) == [0] and store.esis(1) == []  # neither is stored
        monkeypatch.setattr(os, "pwrite", failing_disk)  # (a full one caps the spill instead)
        assert store.add(0, 60, SYMBOLS[0][60])  # a repair symbol: gathered too ...
        with pytest.raises(SymbolStoreError, match="Input/output"):
            store.flush()  # ... and its write fails: not stored, nothing recorded
        assert store.esis(0) == [0] and store.stats.spill_in_use == 0
        assert not store.spill_capped
        monkeypatch.setattr(os, "pwrite", full_disk)
        assert store.add(0, 2, SYMBOLS[0][2])
        with pytest.raises(SymbolStoreError):
            store.flush()  # the run cannot be written: not stored, nothing recorded
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        assert store.esis(0) == [0]  # nothing half-stored
        assert store.add(0, 1, SYMBOLS[0][1])
        assert store.add(0, 60, SYMBOLS[0][60])
        monkeypatch.setattr(os, "write", short_then_full)
        with pytest.raises(SymbolStoreError):
            store.flush()
        monkeypatch.setattr(os, "write", real_write)
        store.flush()  # the same records, appended where the torn part was cut off
        assert store.add(0, 2, SYMBOLS[0][2])
    with opened(tmp_path) as store:
        assert store.esis(0) == [0, 1, 2, 60]
        assert_only_genuine(store)


def test_a_chunk_kept_whole_is_compared_in_place_a_few_symbols_at_a_time(tmp_path: Path) -> None:
    """`complete` of a chunk handed over whole (local reuse, HTTP) reads back what is in place
    in steps, not the chunk again: its peak is the step, not a second copy of the chunk."""
    image = random.Random(18).randbytes(6944 * 1208)  # one chunk at the signer's default size
    release = make_release(image, KEY, chunk_size=len(image))
    with opened(tmp_path, release) as store:
        data = memoryview(bytearray(release.chunk(0)))  # a buffer's view, as reuse hands it
        tracemalloc.start()
        try:
            store.complete(0, data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert store.read_chunk(0) == release.chunk(0)
        assert store.stats.decoded_bytes == len(image)  # every symbol written, none was there
    print(f"complete of an {len(image)}-byte chunk: peak {peak} bytes traced")
    assert peak < len(image) // 8


# --- Runs (`add_run`: a GRO read's consecutive ESIs of one chunk in one call) ------------------


def _store_state(store: SymbolStore, directory: Path) -> tuple[object, ...]:
    """What a store holds and has counted, and its files once flushed: equal for two stores
    given the same symbols, however they were handed over."""
    store.flush()
    stats = store.stats
    counts = tuple(
        dict(value) if name == "refused" else value for name, value in vars(stats).items()
    )
    held = tuple(tuple(store.esis(c)) for c in range(MANIFEST.chunk_count))
    files = tuple(
        (directory / MANIFEST.session_id.hex() / name).read_bytes()
        for name in ("image.part", SPILL_NAME, JOURNAL_NAME, "chunks.log")
    )
    return counts, held, files, store.done


@_examples(25)
@given(
    seed=st.integers(0, 2**32 - 1),
    run_symbols=st.integers(2, 12),
    flush_symbols=st.integers(3, 60),
    spill_slots=st.integers(5, 400),
)
def test_a_run_stores_exactly_what_its_symbols_one_by_one_store(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    run_symbols: int,
    flush_symbols: int,
    spill_slots: int,
) -> None:
    """`add_run` against `add` one symbol at a time, on runs with gaps, duplicates, chunk
    changes, source/repair boundaries, wrong lengths, forged padding, chunks done or out of
    range, a full spill, a full gathering buffer and flushes falling inside a run: the same
    answers, counters, journal, spill and image bytes."""
    rng = random.Random(seed)
    one, run = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("run")
    last, short = MANIFEST.chunk_count - 1, K[-1] - 1  # the image's short last symbol
    forged_padding = SYMBOLS[last][short][:-1] + b"\x01"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(symbol_store, "RUN_BYTES", run_symbols * T)
        patch.setattr(symbol_store, "FLUSH_SYMBOLS", flush_symbols)
        # (a flush never put off while the syncer is busy: both stores flush at one symbol)
        patch.setattr(symbol_store, "MAX_UNFLUSHED_SYMBOLS", flush_symbols)
        with opened(one) as by_one, opened(run) as by_run:
            by_one._max_slots = by_run._max_slots = spill_slots
            for _ in range(120):
                chunk = rng.choice([*range(MANIFEST.chunk_count), MANIFEST.chunk_count])
                k = K[chunk] if chunk < MANIFEST.chunk_count else 55
                first = rng.choice([0, rng.randrange(k + REPAIR), k - rng.randrange(1, 8)])
                count = min(rng.randrange(1, 40), k + REPAIR - first)
                symbols: list[bytes] = []
                for esi in range(first, first + count):
                    if chunk == MANIFEST.chunk_count:
                        symbols.append(bytes(T))
                    elif rng.random() < 0.03:
                        genuine = SYMBOLS[chunk][esi]  # at a wrong length
                        symbols.append(rng.choice([genuine[:1], genuine[:-1], genuine + b"!"]))
                    elif chunk == last and esi == short and rng.random() < 0.5:
                        symbols.append(forged_padding)
                    else:
                        symbols.append(SYMBOLS[chunk][esi])
                most = rng.randrange(1, count + 3)
                taken, stored = by_run.add_run(chunk, first, symbols, most)
                answers = [by_one.add(chunk, first + i, symbols[i]) for i in range(taken)]
                assert stored == sum(answers) <= most
                assert taken == count or (stored == most and answers[-1])
                for c in range(MANIFEST.chunk_count):  # complete what could be, in both
                    if not by_one.is_done(c) and (
                        by_one.has_all_source(c) or by_one.count(c) >= K[c] + 3
                    ):
                        for store in (by_one, by_run):
                            store.complete(c, RELEASE.chunk(c))
                if rng.random() < 0.1:
                    assert _store_state(by_one, one) == _store_state(by_run, run)
            assert _store_state(by_one, one) == _store_state(by_run, run)
    with opened(one) as by_one, opened(run) as by_run:  # and reopened
        assert assert_only_genuine(by_one) == assert_only_genuine(by_run)


def test_a_full_file_system_caps_the_spill_and_the_download_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spill may grow to the image's size (the image's own space is reserved, the spill's
    is not): when the file system is full, repair symbols beyond what the spill holds are
    refused (``spill-full``), the ones whose write failed are not stored, and source symbols
    and the slots chunks free keep the download going."""
    real_pwrite = os.pwrite
    spill_end = 3 * T  # the file system fills once the spill holds three symbols

    def filling(fd: int, data: bytes, position: int) -> int:
        if fd == spill_fd and position + len(data) > spill_end:
            if position >= spill_end:
                raise OSError(errno.ENOSPC, "No space left on device")
            data = bytes(data)[: spill_end - position]  # a short write, then full
        return real_pwrite(fd, data, position)

    with opened(tmp_path) as store:
        spill_fd = store._spill
        monkeypatch.setattr(os, "pwrite", filling)
        for esi in range(K[0], K[0] + 5):  # five repair symbols of chunk 0: one run
            assert store.add(0, esi, SYMBOLS[0][esi])
        store.flush()  # its write stops at three symbols: none of the run is kept
        assert store.spill_capped and store.esis(0) == []
        assert store.stats.spill_in_use == 0
        # Three slots are on disk: three repair symbols fit again, a fourth is refused.
        for esi in range(K[1], K[1] + 3):
            assert store.add(1, esi, SYMBOLS[1][esi])
        assert not store.add(1, K[1] + 3, SYMBOLS[1][K[1] + 3])
        assert store.stats.refused["spill-full"] == 1
        # Source symbols still go in place; chunk 1 completes from them and its repairs ...
        for esi in range(K[1] - 3):
            assert store.add(1, esi, SYMBOLS[1][esi])
        store.flush()
        assert store.esis(1) == [*range(K[1] - 3), *range(K[1], K[1] + 3)]
        data = decode(store, 1)
        assert data == RELEASE.chunk(1)
        store.complete(1, data)
        store.flush()
        store.flush()  # (its slots are free once the FORGET is durable)
        # ... and frees its three slots for chunk 0's repair symbols.
        for esi in range(K[0], K[0] + 3):
            assert store.add(0, esi, SYMBOLS[0][esi])
        store.flush()
        assert store.esis(0) == list(range(K[0], K[0] + 3))
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    with opened(tmp_path) as store:
        assert_only_genuine(store)
        assert store.is_done(1) and store.esis(0) == list(range(K[0], K[0] + 3))


class _FileSystem:
    """A file system of `limit` bytes holding the files of `directory` (their lengths): any
    write or allocation there that would grow them past it fails with ENOSPC."""

    def __init__(self, directory: Path, limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = str(directory)
        self.limit = limit
        real_write, real_pwrite, real_fallocate = os.write, os.pwrite, os.posix_fallocate

        def write(fd: int, data: bytes) -> int:
            at = os.lseek(fd, 0, os.SEEK_END if self._appends(fd) else os.SEEK_CUR)
            return real_write(fd, memoryview(data)[: self._fits(fd, at, data)])

        def pwrite(fd: int, data: bytes, position: int) -> int:
            return real_pwrite(fd, memoryview(data)[: self._fits(fd, position, data)], position)

        def fallocate(fd: int, offset: int, length: int) -> None:
            self._grow(fd, offset + length)
            real_fallocate(fd, offset, length)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "posix_fallocate", fallocate)

    def used(self) -> int:
        return sum(p.stat().st_size for p in Path(self.directory).rglob("*") if p.is_file())

    def _ours(self, fd: int) -> bool:
        return str(Path(f"/proc/self/fd/{fd}").readlink()).startswith(self.directory)

    def _appends(self, fd: int) -> bool:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)

    def _fits(self, fd: int, position: int, data: bytes) -> int:
        """How much of `data` at `position` fits: a short write, or ENOSPC if none does."""
        length = len(memoryview(data))
        if not self._ours(fd):
            return length
        room = self.limit - self.used() + os.fstat(fd).st_size - position
        if room <= 0 < length:
            raise OSError(errno.ENOSPC, "No space left on device")
        return min(length, room)

    def _grow(self, fd: int, end: int) -> None:
        if self._ours(fd):
            growth = end - os.fstat(fd).st_size
            if growth > 0 and self.used() + growth > self.limit:
                raise OSError(errno.ENOSPC, "No space left on device")


def test_a_file_system_that_fills_up_leaves_the_journal_room_to_finish_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's space is reserved at the start, the spill's is not: on a file system that
    fills, the spill is capped, the journal's reserve is given back, and the records of every
    symbol after that still fit, until the image is complete."""
    with opened(tmp_path) as store:
        store.flush()
    disk = _FileSystem(tmp_path, 0, monkeypatch)
    disk.limit = disk.used() + 10 * T  # room for ten repair symbols, then nothing
    with opened(tmp_path) as store:
        for chunk in range(MANIFEST.chunk_count):  # a flood of repair symbols (or just loss)
            for esi in range(K[chunk], K[chunk] + 20):
                store.add(chunk, esi, SYMBOLS[chunk][esi])
            store.flush()
        assert store.spill_capped
        for chunk in range(MANIFEST.chunk_count):  # then every chunk's source symbols
            for esi in range(K[chunk]):
                store.add(chunk, esi, SYMBOLS[chunk][esi])
            store.flush()
            if store.count(chunk) >= K[chunk] and store.has_all_source(chunk):
                store.complete(chunk, None)
            else:
                data = decode(store, chunk)
                assert data == RELEASE.chunk(chunk)
                store.complete(chunk, data)
            store.flush()
        assert all(store.is_done(c) for c in range(MANIFEST.chunk_count))
    with opened(tmp_path) as store:
        assert all(store.is_done(c) for c in range(MANIFEST.chunk_count))
