"""The receiver core over the durable symbol store (the decoders `otacast fetch` gives it)."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacast.plugin.core import ReceiverCore
from otacast.plugin.decode_worker import DecodeWorker
from otacast.plugin.events import ChunkComplete, Event
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.plugin.symbol_store import SymbolStore
from otacast.schemas import wire
from otacast.signer.keys import SigningKey

from .helpers import (
    NOW,
    SENDER,
    Release,
    auth_pages,
    cycles,
    drain,
    make_release,
    manifest_datagrams,
    receive_all,
    receive_reads,
)

KEY = SigningKey(b"\x31" * 32)
RELEASE = make_release(random.Random(31).randbytes(3 * 55 * 1208 - 999), KEY, chunk_size=55 * 1208)
M = RELEASE.manifest
CYCLES = cycles(M, RELEASE.image, 60)
# The same image with a stream key: its DATA datagrams need AUTH pages (packet authentication).
STREAM_KEY = SigningKey(b"\x32" * 32)
AUTHED = make_release(RELEASE.image, KEY, chunk_size=55 * 1208, stream_keys=[STREAM_KEY])
AUTHED_CYCLES = cycles(AUTHED.manifest, AUTHED.image, 60)


@contextmanager
def stored_core(
    state: Path, release: Release = RELEASE
) -> Iterator[tuple[ReceiverCore, SymbolStore]]:
    stored = StoredSymbols(state, release.verified())
    core = ReceiverCore(
        release.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        yield core, stored.store
    finally:
        stored.close()
        stored.staging.close()


@contextmanager
def queued_core(state: Path) -> Iterator[tuple[ReceiverCore, StoredSymbols]]:
    """The core over the store with its decodes queued for the driver, as `fetch` sets them
    up without a worker."""
    stored = StoredSymbols(state, RELEASE.verified())
    stored.queue_decodes()
    core = ReceiverCore(
        RELEASE.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        yield core, stored
    finally:
        stored.close()
        stored.staging.close()


def test_every_chunk_is_in_progress_at_once_and_only_repairable_chunks_are_decoded(
    tmp_path: Path,
) -> None:
    with stored_core(tmp_path) as (core, store):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        # One symbol of every chunk at a time (symbol-major order); chunk 1 loses a third of
        # its source symbols and is repaired; the others arrive whole and are only hashed.
        k = [M.source_symbols(c) for c in range(M.chunk_count)]
        order = [
            CYCLES[c][e]
            for e in range(max(k) + 60)
            for c in range(M.chunk_count)
            if e < len(CYCLES[c]) and not (c == 1 and e < k[1] and e % 3 == 0)
        ]
        events = receive_all(core, order)
        done = {e.index: e.data for e in events if isinstance(e, ChunkComplete)}
        assert sorted(done) == list(range(M.chunk_count))
        # The decoded chunk comes with its bytes; the others were hashed as their source
        # symbols were written, in order, and are verified where they are: nothing read back.
        assert [index for index, data in done.items() if data is not None] == [1]
        assert core.snapshot().chunks_decoded == 1  # what the summary reports
        for index, data in done.items():
            assert (data or store.read_chunk(index)) == RELEASE.chunk(index)
        assert store.stats.read_back_bytes == 0
        assert "decoder-budget" not in core.stats.rejected
        assert store.stats.spill_high_water > 0  # chunk 1's repair symbols were kept on disk


def test_a_forged_symbol_costs_its_chunk_one_decode_and_the_honest_symbols_then_complete_it(
    tmp_path: Path,
) -> None:
    with stored_core(tmp_path) as (core, store):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        honest = CYCLES[0][: M.source_symbols(0)]
        forged = bytearray(honest[5])
        forged[wire.DATA_HEADER_SIZE] ^= 0xFF  # a well-formed datagram with a wrong symbol
        events = receive_all(core, [bytes(forged), *honest[:5], *honest[6:]])
        assert not [e for e in events if isinstance(e, ChunkComplete)]
        assert core.stats.rejected["chunk-hash-mismatch"] == 1
        assert store.count(0) == 0  # every symbol of the spoiled decode was forgotten
        events = receive_all(core, CYCLES[0])
        (complete,) = [e for e in events if isinstance(e, ChunkComplete)]
        assert complete.index == 0 and complete.data is None  # (in place, in order this time)
        assert store.read_chunk(0) == RELEASE.chunk(0)


def test_a_chunk_whose_source_symbols_came_out_of_order_is_hashed_from_its_first_gap_on(
    tmp_path: Path,
) -> None:
    with stored_core(tmp_path) as (core, store):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        k, size = M.source_symbols(0), M.fec.symbol_size
        # ESI 7 comes last: 0-6 are hashed as written, 8 on are written past a gap, and 7,
        # when it comes, continues the hashed ones: only 8 on are read back.
        late = CYCLES[0][7]
        events = receive_all(core, [*CYCLES[0][:7], *CYCLES[0][8:k], late])
        (complete,) = [e for e in events if isinstance(e, ChunkComplete)]
        assert complete.index == 0 and complete.data is None
        assert store.stats.read_back_bytes == M.chunk_span(0)[1] - 8 * size
        assert store.read_chunk(0) == RELEASE.chunk(0)


def test_a_forged_source_symbol_in_order_fails_the_chunk_hash_in_place(tmp_path: Path) -> None:
    with stored_core(tmp_path) as (core, store):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        honest = CYCLES[0][: M.source_symbols(0)]
        forged = bytearray(honest[5])
        forged[-1] ^= 0x01
        events = receive_all(core, [*honest[:5], bytes(forged), *honest[6:]])
        assert not [e for e in events if isinstance(e, ChunkComplete)]
        assert core.stats.rejected["chunk-hash-mismatch"] == 1
        assert store.stats.read_back_bytes == 0  # what was hashed is what was written
        assert store.count(0) == 0 and not store.is_done(0)


def test_views_of_a_reused_read_buffer_are_stored_as_they_were(tmp_path: Path) -> None:
    # The receive loop hands the core views of its read buffer, which the next read
    # overwrites: the store must have copied every symbol (gathered runs, the spill's run).
    with stored_core(tmp_path) as (core, store):
        receive_reads(core, manifest_datagrams(RELEASE.envelope))
        k = [M.source_symbols(c) for c in range(M.chunk_count)]
        # Symbol-major runs of 7 ESIs, every chunk losing every third run of its source
        # symbols, so that each chunk is decoded from gathered source and repair symbols.
        order = [
            CYCLES[c][e]
            for first in range(0, max(k) + 60, 7)
            for c in range(M.chunk_count)
            for e in range(first, min(first + 7, len(CYCLES[c])))
            if not (e < k[c] and first // 7 % 3 == 1)
        ]
        events = receive_reads(core, order, read=13)
        done = {e.index: e.data for e in events if isinstance(e, ChunkComplete)}
        assert sorted(done) == list(range(M.chunk_count))
        assert all(data == RELEASE.chunk(index) for index, data in done.items())
        assert core.stats.rejected == {}
        assert store.stats.spill_bytes > 0


class _Recording:
    """A decoder that records what the core gives it, and never completes."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def feed(self, packet: bytes | memoryview) -> bytes | None:
        self.packets.append(bytes(packet))
        return None

    def discard(self) -> None:
        """Nothing is kept."""


class _RecordingSymbols(_Recording):
    def __init__(self) -> None:
        super().__init__()
        self.symbols: list[tuple[int, bytes]] = []

    def feed_symbol(self, esi: int, symbol: bytes | memoryview) -> bytes | None:
        self.symbols.append((esi, bytes(symbol)))
        return None


def test_a_decoder_with_feed_symbol_gets_each_esi_and_symbol_and_others_the_codec_packet() -> None:
    datagrams = CYCLES[0][:3] + CYCLES[0][-2:]  # source and repair symbols
    esis = [int.from_bytes(d[wire.DATA_HEADER_SIZE - 3 : wire.DATA_HEADER_SIZE]) for d in datagrams]
    assert esis[:3] == [0, 1, 2] and min(esis[3:]) >= M.source_symbols(0)
    for decoder in (_Recording(), _RecordingSymbols()):

        def factory(chunk: int, length: int, size: int, d: _Recording = decoder) -> _Recording:
            return d

        core = ReceiverCore(
            RELEASE.trust, now=NOW, manifest=RELEASE.verified(), decoder_factory=factory
        )
        receive_reads(core, datagrams)
        if isinstance(decoder, _RecordingSymbols):
            assert decoder.packets == []
            symbols = [d[wire.DATA_HEADER_SIZE :] for d in datagrams]
            assert decoder.symbols == list(zip(esis, symbols, strict=True))
        else:
            assert decoder.packets == [d[wire.CODEC_PACKET_OFFSET :] for d in datagrams]


@contextmanager
def worker_core(state: Path) -> Iterator[tuple[ReceiverCore, StoredSymbols, DecodeWorker]]:
    """The core over the store with a decode worker process, as `fetch` sets them up."""
    stored = StoredSymbols(state, RELEASE.verified())
    worker = DecodeWorker(stored.staging.part, stored.store.spill_path, M.chunks.size, 2)
    stored.use_worker(worker)
    core = ReceiverCore(
        RELEASE.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        yield core, stored, worker
    finally:
        stored.close()
        stored.staging.close()


def take_decodes(core: ReceiverCore, stored: StoredSymbols) -> list[Event]:
    """What the receive driver does every turn, until no decode is waiting or in flight."""
    deadline = time.monotonic() + 60
    events: list[Event] = []
    while True:
        stored.pump()
        for chunk, data, fault in stored.decoded():
            core.chunk_decoded(chunk, data, NOW, fault=fault)
        while (event := core.next_event()) is not None:
            events.append(event)
            if isinstance(event, ChunkComplete):
                stored.keep(event.index, event.data)
        if not stored.decoding:
            return events
        assert time.monotonic() < deadline, "the decode worker never answered"
        time.sleep(0.005)


def lossy(chunk: int, extra: int = 60) -> list[bytes]:
    """The chunk's datagrams without a third of its source symbols, with repair symbols."""
    k = M.source_symbols(chunk)
    return [d for e, d in enumerate(CYCLES[chunk][: k + extra]) if not (e < k and e % 3 == 0)]


def test_with_a_worker_a_repair_is_decoded_in_it_and_the_chunk_refuses_symbols_meanwhile(
    tmp_path: Path,
) -> None:
    with worker_core(tmp_path) as (core, stored, worker):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        events = receive_all(core, [*lossy(1), *CYCLES[0][: M.source_symbols(0)]])
        # Chunk 0 had all its source symbols: read back and hashed at once.  Chunk 1 went to
        # the worker: nothing of it is complete until the driver hands the outcome over.
        assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]
        k = M.source_symbols(1)
        assert core.stats.rejected["decode-pending"] == len(lossy(1)) - k
        assert stored.store.count(1) == k  # the symbols after the K-th were not stored
        events = take_decodes(core, stored)
        (complete,) = [e for e in events if isinstance(e, ChunkComplete)]
        assert complete.index == 1 and complete.data == RELEASE.chunk(1)
        assert worker.decodes == 1
        assert stored.store.is_done(1)


def test_when_the_worker_dies_its_decodes_are_done_here_and_it_is_said_once(
    tmp_path: Path,
) -> None:
    with worker_core(tmp_path) as (core, stored, worker):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        events = receive_all(core, lossy(1))  # submitted (and sent)
        assert not [e for e in events if isinstance(e, ChunkComplete)]
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        events = take_decodes(core, stored)
        (complete,) = [e for e in events if isinstance(e, ChunkComplete)]
        assert complete.index == 1 and complete.data == RELEASE.chunk(1)
        assert stored.failed is not None and "ended" in stored.failed
        # Every later decode is done on this thread, at once.
        events = receive_all(core, lossy(2))
        assert [e.index for e in events if isinstance(e, ChunkComplete)] == [2]


def test_while_the_worker_has_two_decodes_the_next_chunk_is_decoded_here_at_once(
    tmp_path: Path,
) -> None:
    with worker_core(tmp_path) as (core, stored, worker):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        events = receive_all(core, [*lossy(0), *lossy(1), *lossy(2)])
        # Chunks 0 and 1 went to the worker (one decoding, one queued, both sent at once);
        # chunk 2, decodable meanwhile, did not wait.
        assert [e.index for e in events if isinstance(e, ChunkComplete)] == [2]
        events = take_decodes(core, stored)
        done = {e.index: e.data for e in events if isinstance(e, ChunkComplete)}
        assert done == {0: RELEASE.chunk(0), 1: RELEASE.chunk(1)}
        assert worker.decodes == 2 and stored.failed is None


def test_a_decode_in_flight_for_a_chunk_completed_meanwhile_is_dropped_unread(
    tmp_path: Path,
) -> None:
    with worker_core(tmp_path) as (core, stored, worker):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        receive_all(core, lossy(1))
        stored.pump()  # (the worker was sent it at once)
        # HTTP repair brings the chunk whole while it decodes: kept, done.
        stored.keep(1, RELEASE.chunk(1))
        core.mark_done(1, NOW)
        assert not stored.decoding
        deadline = time.monotonic() + 60
        while worker.decodes == 0:  # the worker answers; the answer is not used
            assert time.monotonic() < deadline
            assert list(stored.decoded()) == []
            time.sleep(0.005)
        assert core.stats.chunks_multicast == 0 and stored.store.is_done(1)


def test_queued_decodes_are_done_one_per_turn_lowest_chunk_first(tmp_path: Path) -> None:
    with queued_core(tmp_path) as (core, stored_symbols):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        # Chunk 2 becomes decodable first, then 0, then 1: none is decoded inside `feed`, and
        # each refuses its further symbols while it waits.
        events = receive_all(core, [*lossy(2, 70), *lossy(0, 70), *lossy(1, 70)])
        assert not [e for e in events if isinstance(e, ChunkComplete)]
        assert core.stats.rejected["decode-pending"] == sum(
            len(lossy(c, 70)) - M.source_symbols(c) for c in range(3)
        )
        assert stored_symbols.queued and stored_symbols.decoding
        turns = []
        for _ in range(3):
            (outcome,) = list(stored_symbols.decoded())  # one decode per turn
            chunk, data, fault = outcome
            turns.append(chunk)
            assert data == RELEASE.chunk(chunk) and not fault
            core.chunk_decoded(chunk, data, NOW)
        assert turns == [0, 1, 2]
        assert not stored_symbols.queued and not stored_symbols.decoding
        assert list(stored_symbols.decoded()) == []
        done = [e.index for e in drain(core) if isinstance(e, ChunkComplete)]
        assert sorted(done) == [0, 1, 2]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    order=st.permutations(range(3)),
    turns=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_each_turn_decodes_the_lowest_chunk_queued_at_that_moment(
    tmp_path_factory: pytest.TempPathFactory, order: list[int], turns: list[bool]
) -> None:
    # Chunks become decodable in `order`; after each, the driver may take a turn (`turns`),
    # and at the end it takes turns until nothing is queued.
    with queued_core(tmp_path_factory.mktemp("queue")) as (core, stored):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        queued: set[int] = set()
        decoded: list[int] = []
        events: list[Event] = []

        def turn() -> None:
            outcomes = list(stored.decoded())
            assert len(outcomes) == (1 if queued else 0)
            for chunk, data, fault in outcomes:
                assert chunk == min(queued) and data == RELEASE.chunk(chunk) and not fault
                queued.discard(chunk)
                decoded.append(chunk)
                core.chunk_decoded(chunk, data, NOW)

        for chunk, take_turn in zip(order, turns, strict=True):
            events += receive_all(core, lossy(chunk))
            queued.add(chunk)
            if take_turn:
                turn()
        while queued:
            turn()
        assert sorted(decoded) == [0, 1, 2] and not stored.queued
        events += drain(core)
        assert sorted(e.index for e in events if isinstance(e, ChunkComplete)) == [0, 1, 2]


def test_a_queued_decode_of_a_chunk_completed_meanwhile_is_skipped(tmp_path: Path) -> None:
    with queued_core(tmp_path) as (core, stored_symbols):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        receive_all(core, [*lossy(0), *lossy(1)])
        # HTTP repair brings chunk 0 whole while its decode waits: kept, done, not decoded.
        stored_symbols.keep(0, RELEASE.chunk(0))
        core.mark_done(0, NOW)
        assert [chunk for chunk, _, _ in stored_symbols.decoded()] == [1]
        assert list(stored_symbols.decoded()) == [] and not stored_symbols.queued


def test_with_a_worker_and_the_queue_every_decode_is_done_once_somewhere(tmp_path: Path) -> None:
    with worker_core(tmp_path) as (core, stored, worker):
        stored.queue_decodes()
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        events = receive_all(core, [*lossy(0), *lossy(1), *lossy(2)])
        # Chunks 0 and 1 went to the worker, chunk 2 waits for the loop or a free slot.
        assert not [e for e in events if isinstance(e, ChunkComplete)]
        events = take_decodes(core, stored)
        complete = [e for e in events if isinstance(e, ChunkComplete)]
        assert sorted(e.index for e in complete) == [0, 1, 2]  # each once
        assert all(e.data == RELEASE.chunk(e.index) for e in complete)
        assert worker.decodes in (2, 3) and stored.failed is None


def _forged(datagram: bytes) -> bytes:
    """`datagram` with a byte of its symbol changed: a forgery its chunk's hash catches."""
    return datagram[:-1] + bytes([datagram[-1] ^ 1])


def _elsewhere(datagram: bytes, rng: random.Random) -> bytes:
    """`datagram` made into one the core refuses or counts apart: another session, a wrong
    length, a chunk beyond the image, an ESI beyond the default repair pool."""
    tsi_at = 8  # (the DATA header: 8 bytes of LCT words, then TSI, TOI, payload id)
    way = rng.randrange(5)
    if way == 0:
        return datagram[:tsi_at] + bytes(4) + datagram[tsi_at + 4 :]
    if way == 1:
        return datagram[: rng.choice([wire.DATA_HEADER_SIZE + 1, len(datagram) - 1])]
    if way == 2:
        return datagram + b"!"
    if way == 3:
        return datagram[: tsi_at + 4] + (9).to_bytes(4, "big") + datagram[tsi_at + 8 :]
    esi = 2 * M.source_symbols(0) + rng.randrange(200)
    return datagram[: wire.DATA_HEADER_SIZE - 3] + esi.to_bytes(3, "big") + datagram[20:]


def _core_state(core: ReceiverCore, store: SymbolStore, state: Path) -> tuple[object, ...]:
    """Everything the core counts and keeps per chunk, and what the store holds (its files
    once flushed): equal for two receivers given the same datagrams in any reads."""
    store.flush()
    chunks = {
        index: (c.used, c.cursor, c.other_cursor, bytes(c.seen), sorted(c.other_seen))
        for index, c in core._chunks.items()
    }
    snapshot = dataclasses.replace(core.snapshot(), manifest=None)
    assert core.verified is not None
    files = tuple(
        (state / core.verified.manifest.session_id.hex() / name).read_bytes()
        for name in ("image.part", "symbols.spill", "symbols.journal", "chunks.log")
    )
    counts = {k: dict(v) if k == "refused" else v for k, v in vars(store.stats).items()}
    return core.stats, snapshot, chunks, counts, files, store.done


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    visit=st.integers(3, 70),
    loss=st.sampled_from([0, 0.1]),
    coalesced=st.booleans(),
    authed=st.booleans(),
)
def test_a_read_fed_as_runs_counts_and_stores_exactly_what_its_datagrams_one_by_one_do(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    visit: int,
    loss: float,
    coalesced: bool,
    authed: bool,
) -> None:
    """`receive_datagrams` (a GRO read's runs of consecutive ESIs of one chunk handed to the
    store in one call; with `coalesced`, a whole run's headers checked at once) against
    `receive_datagram` one at a time: the same counters, loss estimate, ESIs seen, events, and
    store (journal, spill, image bytes), through gaps, duplicates, chunk changes,
    source/repair boundaries, refusals, forged symbols (a chunk failing its hash and collected
    again) and chunks completing in the middle of a read.  With packet authentication
    (`authed`), each visit's AUTH pages come ahead of its data, or after it (the data held
    until they come), or not at all, and forged symbols are refused by their digests."""
    rng = random.Random(seed)
    release, chunk_cycles = (AUTHED, AUTHED_CYCLES) if authed else (RELEASE, CYCLES)
    pages = auth_pages(release.manifest, chunk_cycles, STREAM_KEY)
    capacity = pages.capacity
    # The carousel's order from a random round: `visit` consecutive symbols of each chunk per
    # round, with loss, disturbed by duplicates, forgeries and datagrams the core refuses.
    stream = list(manifest_datagrams(release.envelope))
    visits = [-(-len(c) // visit) for c in chunk_cycles]
    start = rng.randrange(max(visits))
    for round_ in range(start, start + 3 * max(visits)):
        forging = round_ < start + max(visits)  # (then two clean passes: every chunk completes)
        for chunk, cycle in enumerate(chunk_cycles):
            at = round_ % visits[chunk] * visit
            after: list[bytes] = []
            if authed:  # (signed as sent: each page's time is later than the last one's)
                signed = [
                    pages.page(chunk, page, NOW + 1e-6 * len(stream))
                    for page in range(at // capacity, (at + visit - 1) // capacity + 1)
                    if page < pages.page_count(chunk)
                ]
                roll = rng.random() if forging else 0.0
                if roll < 0.8:
                    stream += signed
                elif roll < 0.9:
                    after = signed
            for datagram in cycle[at : at + visit]:
                if rng.random() < loss:
                    continue
                roll = rng.random()
                if roll < 0.02 and len(stream) > 10:
                    stream.append(rng.choice(stream[-10:]))  # a duplicate, or a reordering
                elif roll < 0.03 and forging:
                    datagram = _forged(datagram)
                elif roll < 0.05 and forging:
                    stream.append(_elsewhere(datagram, rng))
                stream.append(datagram)
            stream += after
    one, runs = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("runs")
    with (
        stored_core(one, release) as (by_one, one_store),
        stored_core(runs, release) as (by_runs, runs_store),
    ):
        events: tuple[list[Event], list[Event]] = ([], [])
        at = 0
        while at < len(stream):
            read = stream[at : at + rng.randrange(1, 65)]  # a read's worth (GRO: up to 64)
            at += len(read)
            for datagram in read:
                by_one.receive_datagram(datagram, SENDER, NOW, wall=NOW)
            got = (
                drain(by_one),
                receive_reads(by_runs, read, read=len(read), coalesced=coalesced),
            )
            for store, seen, new in zip((one_store, runs_store), events, got, strict=True):
                seen += new
                for event in new:  # (`complete`: `keep` also starts a flush when idle)
                    if isinstance(event, ChunkComplete):
                        store.complete(event.index, event.data)
            if rng.random() < 0.05:
                assert _core_state(by_one, one_store, one) == _core_state(by_runs, runs_store, runs)
        assert _core_state(by_one, one_store, one) == _core_state(by_runs, runs_store, runs)
        assert events[0] == events[1]
        assert by_one.complete
        assert (by_one.authenticator is not None) == authed


@pytest.mark.parametrize("repairs", [0, 5])
def test_a_chunk_stored_whole_before_a_kill_completes_from_the_symbols_sent_after_the_restart(
    tmp_path: Path, repairs: int
) -> None:
    """Chunk 0's symbols, K of them (all its sources, or all but `repairs` plus as many repair
    symbols), stored and made durable, and the process killed before the chunk was tried (a
    copy of the state directory then is what the next run finds).  The next run hears the same
    symbols again: every one is refused by the store (a duplicate) or not needed, and the chunk
    must still complete from what it holds."""
    live, after = tmp_path / "live", tmp_path / "after"
    k = M.source_symbols(0)
    kept = CYCLES[0][: k - repairs] + CYCLES[0][k : k + repairs]
    with stored_core(live) as (_, store):
        for datagram in kept:
            fields = wire.peek_data(datagram)
            assert fields is not None
            assert store.add(0, fields[2], datagram[wire.DATA_HEADER_SIZE :])
        store.flush()
        shutil.copytree(live, after)  # (kill -9 here: nothing tried the chunk)
    with stored_core(after) as (core, store):
        assert store.count(0) == k and not store.is_done(0)
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        events = receive_all(core, kept)
        done = [e for e in events if isinstance(e, ChunkComplete)]
        assert [e.index for e in done] == [0]  # (after the core checked its hash)
        _, length = M.chunk_span(0)
        if done[0].data is None:  # all its sources were in place: only hashed
            store.flush()
            part = after / M.session_id.hex() / "image.part"
            assert part.read_bytes()[:length] == RELEASE.image[:length]
        else:
            assert done[0].data == RELEASE.image[:length]
        assert (done[0].data is None) == (repairs == 0)
        assert store.stats.refused["duplicate"] >= 1


def test_a_decode_worker_that_cannot_be_given_its_memory_closes_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []
    real = os.memfd_create

    def second_fails(name: str, flags: int = 0) -> int:
        if made:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(real(name, flags))
        return made[-1]

    monkeypatch.setattr(os, "memfd_create", second_fails)
    with pytest.raises(OSError, match="Too many"):
        DecodeWorker(tmp_path / "image.part", tmp_path / "symbols.spill", 1 << 20, 2)
    with pytest.raises(OSError) as closed:
        os.fstat(made[0])
    assert closed.value.errno == errno.EBADF
