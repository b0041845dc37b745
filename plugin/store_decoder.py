"""The receiver core's FEC seam over the durable symbol store: no useful symbol is thrown away.

The sans-IO `ReceiverCore` admits a DATA datagram (session, range, packet authentication,
duplicates) and feeds its codec packet to the chunk's `ChunkDecoder`.  The receive driver gives
the core decoders of this kind: instead of holding symbols in memory, `feed` puts each symbol
into the `SymbolStore` (source symbols in place in ``image.part``, repair symbols in the spill,
all of it surviving ``kill -9``), and once the chunk holds K symbols it produces the chunk:

* with all K source symbols in place, the chunk is only hashed (a systematic code needs no
  decode for its own data), and mostly not even read back: the store hashes a chunk's source
  symbols as it writes them in order (`SymbolStore.in_place_digest`), so `feed` answers
  `decoder.InPlace`, their digest, and the core emits the chunk with no data;
* otherwise the stored codec packets are fed to a fresh `raptorq` decoder; with K symbols it
  succeeds with high probability, and if it does not, the next symbol tries again.

Because nothing is held in memory, the core needs no decoder budget: every chunk can be open at
once, whatever the image size, and memory stays the store's (bits per source symbol and 8
bytes per repair symbol held).  The core hashes what `feed` returns; on a mismatch it calls
`discard`, and the store forgets the chunk's symbols (a forged symbol spoiled the decode).

*The decode worker.*  Given one (`StoredSymbols.use_worker`: the receive driver starts it with
``decode = "worker"``), a chunk that needs a decode while the worker has room for it (a result
slot free: one decode in it and one queued at most) is not decoded here: `feed` answers
`decoder.SUBMITTED` and the chunk is sent to the worker process
(`otacast.plugin.decode_worker`) at once, under a new submission number.  One that needs a
decode while the worker has two is decoded here (at once, or on the loop's next turn with the
queue below), as without a worker: with the
symbol-major order nearly every chunk becomes decodable in the last rounds, and the two
processes then decode side by side on two cores instead of one after the other.  (With room
for one only, the worker sat idle while the loop decoded: it took 17 of a 500 MB image's 64
chunks, docs/PERFORMANCE.md.)  The driver calls `pump` every turn of its
loop (the worker is sent what its pipe did not take yet) and `decoded`, which yields each
outcome for `ReceiverCore.chunk_decoded`.  An outcome counts only while its submission is the
chunk's current one: `keep` (a chunk completed over HTTP or from local blocks while its decode
was in flight) and `discard` end it, so a stale result is dropped unread.  If the worker fails,
`decoded` decodes what it held here instead and every later decode is done here (`failed`
says why, for the driver's one warning).

*Lowest chunk first.*  With `queue_decodes` (the receive driver's choice) a chunk that needs a
decode on this thread is not decoded inside `feed` either: it is queued (`feed` answers
`decoder.SUBMITTED`, so the core refuses its symbols meanwhile), and each call of `decoded`
decodes the lowest queued chunk, after giving the worker, if any, the lowest ones it has room
for.  With the symbol-major order the chunks become decodable within a round of each other, in
the order the round visits them (from wherever the sender's round starts), and their decodes
then take seconds at 500 MB: in chunk order the image's hash (`otacast.plugin.staging`, which
hashes the image from its start as chunks become final) follows the decodes on another core
instead of starting after the last one, and the loop reads its socket between two decodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from otacast.schemas.policy import VerifiedManifest

from .decode_worker import DecodeWorker
from .decoder import SUBMITTED, ChunkDecoder, DecoderFault, FeedResult, InPlace, decode_chunk
from .staging import Staging
from .symbol_store import SymbolStore

# The codec packet is a 4-byte payload id (SBN, 24-bit ESI) followed by the symbol.
_PAYLOAD_ID = 4
# With the store, every chunk may be in progress at once (its symbols are on disk, not in
# memory), so the core's in-memory decoder budget does not apply: give the core this one.
UNBOUNDED_DECODERS = 1 << 62


class StoreDecoder:
    """Decodes chunk `chunk` from what `store` holds (module doc)."""

    def __init__(
        self,
        store: SymbolStore,
        chunk: int,
        length: int,
        symbol_size: int,
        on_discard: Callable[[int], None] | None = None,
        submit: Callable[[int], bool] | None = None,
    ) -> None:
        self.store = store
        self._on_discard = on_discard
        # Hands the chunk's decode to the decode worker; False when there is none.
        self._submit = submit
        self.chunk = chunk
        self.length = length
        self.symbol_size = symbol_size
        self.k = store.source_symbols(chunk)
        # Symbols the store holds for the chunk: only this decoder adds to it (or forgets it),
        # so it counts them itself, and asks the store again only once there may be enough.
        self._held = store.count(chunk)
        # Symbols held at the last attempt that did not decode: try again only with more.
        self._tried_with = -1

    def feed(self, packet: bytes | memoryview) -> FeedResult:
        return self.feed_symbol(int.from_bytes(packet[1:_PAYLOAD_ID], "big"), packet[_PAYLOAD_ID:])

    def feed_symbol(self, esi: int, symbol: bytes | memoryview) -> FeedResult:
        """`feed` with the packet's ESI and symbol apart (`decoder.SymbolFeed`): the core's
        per-datagram path, which has read the ESI already and saves two slices and a parse."""
        # A chunk completed and verified in an earlier run is refused here (as "done"): the
        # driver marks it done (and counts it as resumed) when it handles `ManifestVerified`.
        if self.store.add(self.chunk, esi, symbol):
            self._held += 1
        # (A symbol the store refuses goes on too if the chunk holds enough: symbols stored by a
        # run that ended before the chunk was tried, such as all its sources, whose last one's
        # flush came before a kill -9, with every later symbol a duplicate or not needed.  It is
        # tried once per count, below.)
        if self._held < self.k:
            return None
        store, chunk = self.store, self.chunk
        held = self._held = store.count(chunk)
        if held < self.k or held == self._tried_with:
            return None
        if store.has_all_source(chunk):
            return InPlace(store.in_place_digest(chunk), self.length)
        if self._submit is not None and self._submit(chunk):
            self._tried_with = held  # if it does not decode, the next new symbol tries again
            return SUBMITTED
        return self.decode_here()

    def decode_here(self) -> bytes | None:
        """Decode the chunk from the stored symbols, on this thread."""
        data = decode_chunk(self.length, self.symbol_size, self.store.iter_symbols(self.chunk))
        if data is None:
            self._tried_with = self._held
        return data

    def feed_run(self, first: int, symbols: Sequence[bytes | memoryview]) -> int:
        """`feed_symbol` of ``symbols[i]`` as ESI ``first + i``, in order, for as many of them
        as can be stored without the chunk reaching K (so none of them can produce it); how
        many it took (`decoder.RunFeed`).  The caller feeds the rest one by one."""
        most = self.k - 1 - self._held
        if most <= 0:
            return 0
        taken, stored = self.store.add_run(self.chunk, first, symbols, most)
        self._held += stored
        return taken

    def resync(self) -> None:
        """Symbols were added to the chunk other than through `feed` (the local pass,
        `otacast.plugin.reuse`): count them from the store again."""
        self._held = self.store.count(self.chunk)

    def discard(self) -> None:
        self.store.discard(self.chunk)
        self._held = 0
        self._tried_with = -1
        if self._on_discard is not None:
            self._on_discard(self.chunk)


class StoredSymbols:
    """One session's staging and symbol store, opened (and resumed) together.

    The core may open a decoder (while it replays datagrams held before the manifest) before
    the driver has handled `ManifestVerified`, so the driver makes this on whichever comes
    first; `store.done` names the chunks an earlier run completed, which the driver then marks
    done in the core.  The caller finishes or closes `staging` after `close`.
    """

    def __init__(self, state_dir: Path, verified: VerifiedManifest) -> None:
        self.verified = verified
        self.staging = Staging(state_dir, verified)
        try:
            self.store = SymbolStore(self.staging)
        except BaseException:
            self.staging.close()
            raise
        self._closed = False
        # The core's decoder of each chunk (a chunk has one at a time): the local pass tells
        # it of the symbols it adds (`add_local`), which it would not count otherwise.
        self._decoders: dict[int, StoreDecoder] = {}
        # Bytes of local source symbols stored per chunk in progress (`otacast.plugin.reuse`):
        # credited to the image's local bytes when the chunk completes, void if it is discarded.
        self.local_bytes: dict[int, int] = {}
        # The decode worker, if any (module doc), and each submitted chunk's current submission.
        self._worker: DecodeWorker | None = None
        self._submitted: dict[int, int] = {}
        self._tokens = 0
        self.failed: str | None = None  # why the worker was given up (said once)
        # Decodes queued for this thread, lowest chunk first (module doc, *Lowest chunk
        # first*): (chunk, submission) pairs; one whose submission is no longer current (the
        # chunk was completed or discarded meanwhile) is skipped when it comes up.
        self._queue: list[tuple[int, int]] | None = None

    def use_worker(self, worker: DecodeWorker) -> None:
        """Decode in `worker` from now on (module doc); it is closed with the store."""
        self._worker = worker

    def queue_decodes(self) -> None:
        """Queue the decodes due on this thread for `decoded`, lowest chunk first, instead of
        decoding in `feed` (module doc)."""
        if self._queue is None:
            self._queue = []

    def _submit(self, chunk: int) -> bool:
        worker = self._worker
        if worker is not None and worker.has_room() and self._send(worker, chunk):
            return True
        if self._queue is None:
            return False  # decoded here and now, in `feed`
        self._enqueue(self._queue, chunk)
        return True

    def _enqueue(self, queue: list[tuple[int, int]], chunk: int) -> None:
        heapq.heappush(queue, (chunk, self._new_token(chunk)))

    def _new_token(self, chunk: int) -> int:
        self._tokens = (self._tokens + 1) & 0xFFFFFFFF
        self._submitted[chunk] = self._tokens
        return self._tokens

    def _send(self, worker: DecodeWorker, chunk: int) -> bool:
        """Submit `chunk` to `worker` (which has room); False if it cannot be planned."""
        plan = self.store.decode_plan(chunk)
        if plan is None:
            return False  # (it holds K symbols: never)
        # Sent now, not at the loop's next turn: the loop may decode another chunk itself
        # before then, and the worker would wait for it.
        worker.submit(chunk, self._new_token(chunk), plan)
        return True

    def _next_queued(self) -> int | None:
        """The lowest queued chunk whose submission is current, taken off the queue."""
        queue = self._queue
        while queue:
            chunk, token = heapq.heappop(queue)
            if self._current(chunk, token):
                return chunk
        return None

    @property
    def queued(self) -> bool:
        """Whether decodes wait in the queue for `decoded` (a driver should not wait for its
        sockets then)."""
        return bool(self._queue)

    def _current(self, chunk: int, token: int) -> bool:
        return self._submitted.get(chunk) == token

    def pump(self) -> None:
        """Send the worker what its pipe did not take yet (every turn of the loop)."""
        if self._worker is not None:
            self._worker.pump()

    def decoded(self) -> Iterator[tuple[int, bytes | None, bool]]:
        """Each decode that ended since the last call and still counts: (chunk, its bytes or
        None, whether the codec failed), for `ReceiverCore.chunk_decoded`; the worker's first,
        then (the worker given the lowest queued chunks it has room for) the lowest queued
        chunk's, decoded here during the iteration: one per call.  Take each before the next is
        read (a chunk's bytes at a time)."""
        worker = self._worker
        if worker is not None:
            for chunk, _, data, fault in worker.results(self._current):
                del self._submitted[chunk]
                yield chunk, data, fault
            if worker.failed is None:
                while worker.has_room() and (sent := self._next_queued()) is not None:
                    if not self._send(worker, sent):
                        self._submitted.pop(sent, None)
                        yield sent, None, False  # (never: it was queued with K symbols)
            else:
                yield from self._give_up(worker)
        here = self._next_queued()
        if here is None:
            return
        del self._submitted[here]
        try:
            yield here, self._decoders[here].decode_here(), False
        except DecoderFault:
            yield here, None, True

    def _give_up(self, worker: DecodeWorker) -> Iterator[tuple[int, bytes | None, bool]]:
        # Given up: what it held is decoded here, as everything after.
        self._worker = None
        self.failed = worker.failed
        abandoned = worker.abandoned()
        worker.close()
        for chunk, token in abandoned:
            decoder = self._decoders.get(chunk)
            if not self._current(chunk, token) or decoder is None:
                continue
            if self._queue is not None:
                self._enqueue(self._queue, chunk)
                continue
            del self._submitted[chunk]
            try:
                yield chunk, decoder.decode_here(), False
            except DecoderFault:
                yield chunk, None, True

    @property
    def decoding(self) -> bool:
        """Whether decodes are waiting for the worker or in it."""
        return bool(self._submitted)

    def worker_peak_rss_mb(self) -> float | None:
        return None if self._worker is None else self._worker.peak_rss_mb()

    def decoder(self, chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
        """A `DecoderFactory` for the core."""
        decoder = StoreDecoder(
            self.store, chunk, length, symbol_size, self._forget_local, self._submit
        )
        self._decoders[chunk] = decoder
        return decoder

    def add_local(self, chunk: int, symbols: Iterable[tuple[int, bytes]]) -> int:
        """Store source symbols composed from local blocks (`otacast.plugin.reuse`), as received
        ones are (in place, journaled); the bytes of the image they add."""
        size = self.verified.manifest.fec.symbol_size
        length = self.verified.manifest.chunk_span(chunk)[1]
        added = 0
        for esi, symbol in symbols:
            if self.store.add(chunk, esi, symbol):
                added += min(size, length - esi * size)
        if added:
            self.local_bytes[chunk] = self.local_bytes.get(chunk, 0) + added
            decoder = self._decoders.get(chunk)
            if decoder is not None:
                decoder.resync()
        return added

    def _forget_local(self, chunk: int) -> None:
        """The chunk's symbols are forgotten: its local bytes and any decode of them are void."""
        self.local_bytes.pop(chunk, None)
        self._submitted.pop(chunk, None)

    def discard(self, chunk: int) -> None:
        """Forget every symbol of `chunk`, local ones too (it failed its hash)."""
        self._submitted.pop(chunk, None)
        self.store.discard(chunk)
        self._forget_local(chunk)
        decoder = self._decoders.get(chunk)
        if decoder is not None:
            decoder.resync()

    def held(self) -> int:
        """Symbols stored for chunks still in progress."""
        chunks = range(self.verified.manifest.chunk_count)
        return sum(self.store.count(index) for index in chunks)

    def keep(self, index: int, data: bytes | memoryview | None) -> None:
        """Keep chunk `index`, whose `data` matches its signed hash (once; no data: it is in
        place, `decoder.InPlace`), and start making it durable (in the background: a restart
        then resumes it as a whole chunk)."""
        self._submitted.pop(index, None)
        if not self.store.is_done(index):
            self.store.complete(index, data)
            self.staging.final(index)
            self.store.start_flush()

    def start_flush(self) -> None:
        """Start making the symbols stored so far durable (in the background), until closed."""
        if not self._closed:
            self.store.start_flush()

    def flush_if_wanted(self) -> None:
        """Start the flush asked for while one was running, once it is done, until closed."""
        if not self._closed:
            self.store.flush_if_wanted()

    def close(self) -> None:
        """Flush and close the store (once); staging stays open for the caller."""
        if not self._closed:
            self._closed = True
            if self._worker is not None:
                self._worker.close()
                self._worker = None
            self.store.close()
