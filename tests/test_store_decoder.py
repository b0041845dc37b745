"""The receiver core over the durable symbol store (the decoders `otacast fetch` gives it)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from otacast.plugin.core import ReceiverCore
from otacast.plugin.decode_worker import DecodeWorker
from otacast.plugin.events import ChunkComplete, Event
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.plugin.symbol_store import SymbolStore
from otacast.schemas import wire
from otacast.signer.keys import SigningKey

from .helpers import NOW, cycles, make_release, manifest_datagrams, receive_all, receive_reads

KEY = SigningKey(b"\x31" * 32)
RELEASE = make_release(random.Random(31).randbytes(3 * 55 * 1208 - 999), KEY, chunk_size=55 * 1208)
M = RELEASE.manifest
CYCLES = cycles(M, RELEASE.image, 60)


@contextmanager
def stored_core(state: Path) -> Iterator[tuple[ReceiverCore, SymbolStore]]:
    stored = StoredSymbols(state, RELEASE.verified())
    core = ReceiverCore(
        RELEASE.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        yield core, stored.store
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
        for index, data in done.items():
            assert data == RELEASE.chunk(index)
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
        assert complete.index == 0 and complete.data == RELEASE.chunk(0)


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
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        events = receive_all(core, lossy(1))  # submitted (the death is not noticed yet)
        assert not [e for e in events if isinstance(e, ChunkComplete)]
        events = take_decodes(core, stored)
        (complete,) = [e for e in events if isinstance(e, ChunkComplete)]
        assert complete.index == 1 and complete.data == RELEASE.chunk(1)
        assert stored.failed is not None and "ended" in stored.failed
        # Every later decode is done on this thread, at once.
        events = receive_all(core, lossy(2))
        assert [e.index for e in events if isinstance(e, ChunkComplete)] == [2]


def test_a_decode_in_flight_for_a_chunk_completed_meanwhile_is_dropped_unread(
    tmp_path: Path,
) -> None:
    with worker_core(tmp_path) as (core, stored, worker):
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        receive_all(core, lossy(1))
        stored.pump()  # the worker has it
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
