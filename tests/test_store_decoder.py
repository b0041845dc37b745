"""The receiver core over the durable symbol store (the decoders `otacast fetch` gives it)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from otacast.plugin.core import ReceiverCore
from otacast.plugin.decode_worker import DecodeWorker
from otacast.plugin.events import ChunkComplete
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.plugin.symbol_store import SymbolStore
from otacast.schemas import wire
from otacast.signer.keys import SigningKey

from .helpers import NOW, cycles, make_release, manifest_datagrams, receive_all

KEY = SigningKey(b"\x31" * 32)
RELEASE = make_release(random.Random(31).randbytes(3 * 65536 - 999), KEY, chunk_size=65536)
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


def _wait_for_decodes(worker: DecodeWorker, core: ReceiverCore) -> None:
    """What the receive driver does every turn, until the worker has nothing in flight."""
    deadline = time.monotonic() + 60
    while any(worker.busy_with(c) for c in range(M.chunk_count)):
        assert time.monotonic() < deadline, "the decode worker never answered"
        for chunk, data in worker.results():
            core.decoded(chunk, data, NOW)
        time.sleep(0.01)
    for chunk, data in worker.results():
        core.decoded(chunk, data, NOW)


def test_with_a_worker_repairs_are_decoded_off_the_loop_and_hashed_by_the_core(
    tmp_path: Path,
) -> None:
    worker = DecodeWorker()
    stored = StoredSymbols(tmp_path, RELEASE.verified(), worker)
    core = ReceiverCore(
        RELEASE.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        k = M.source_symbols(1)
        # Chunk 1 without a third of its source symbols, plus enough repair symbols; chunk 0 whole.
        lossy = [d for e, d in enumerate(CYCLES[1][: k + 60]) if not (e < k and e % 3 == 0)]
        events = receive_all(core, [*lossy, *CYCLES[0][: M.source_symbols(0)]])
        # Chunk 0 had all its source symbols: read back and hashed at once.  Chunk 1 went to
        # the worker, so nothing of it is complete until the driver hands the result over.
        assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]
        assert worker.busy_with(1)
        _wait_for_decodes(worker, core)
        (complete,) = [e for e in iter(core.next_event, None) if isinstance(e, ChunkComplete)]
        assert complete.index == 1 and complete.data == RELEASE.chunk(1)
        # A forged result (a worker is outside the core's trust) is hashed and refused.
        core.decoded(2, b"\0" * M.chunk_span(2)[1], NOW)
        assert 2 not in core.done
    finally:
        worker.close()
        stored.close()
        stored.staging.close()


def test_a_full_worker_leaves_the_symbols_stored_and_the_next_symbol_asks_again(
    tmp_path: Path,
) -> None:
    worker = DecodeWorker()
    stored = StoredSymbols(tmp_path, RELEASE.verified(), worker)
    core = ReceiverCore(
        RELEASE.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        receive_all(core, manifest_datagrams(RELEASE.envelope))
        # Fill the worker's slots with two chunks' decodes, then bring a third chunk to K.
        for chunk in (0, 1):
            k = M.source_symbols(chunk)
            receive_all(core, [d for e, d in enumerate(CYCLES[chunk][: k + 60]) if e % 4])
        assert not worker.ready()
        k2 = M.source_symbols(2)
        receive_all(core, [d for e, d in enumerate(CYCLES[2][: k2 + 30]) if e % 4])
        assert not worker.busy_with(2)  # waited: nothing read back, nothing lost
        assert stored.store.count(2) >= k2
        _wait_for_decodes(worker, core)
        events = receive_all(core, CYCLES[2][k2 + 30 : k2 + 31])  # the next symbol asks again
        _wait_for_decodes(worker, core)
        events += list(iter(core.next_event, None))
        assert {e.index for e in events if isinstance(e, ChunkComplete)} == {0, 1, 2}
    finally:
        worker.close()
        stored.close()
        stored.staging.close()
