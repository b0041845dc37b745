"""Symbol store microbenchmark: prints numbers, asserts nothing; needs no root and no network.

    python integration/bench_store.py [--size 32M] [--chunk 8M] [--loss 0,5] [--join 0]
        [--dir /var/tmp] [--repeat 1]

A release of ``--size`` random bytes in ``--chunk`` chunks (8 MiB, the product's default;
1208-byte symbols) is cut into real DATA datagrams, and every chunk's cycle is walked in the
carousel's order (`otacast.signer.schedule`, one sender): each round visits every chunk and
gives it the next 112 consecutive symbols of its cycle (one visit, an AUTH page's worth), in
chunk order, with each datagram lost at random with probability ``--loss``.  The receiver joins
at round ``--join`` of the cycle (``0``: at the cycle's start, so without loss every chunk gets
its source symbols first and needs no decode; ``random``: a seeded random round, as a real
receiver joins a carousel that runs on the wall clock, so nearly every chunk needs a RaptorQ
decode).  Two measurements per loss rate, each in a
fresh state directory on ``--dir`` (a real file system: ``fdatasync`` must cost what it costs on
a device):

* ``add``: `SymbolStore.add` alone, per symbol stored (the symbols' bytes are sliced out
  beforehand), with the time spent in the flushes `add` triggers itself and the longest such
  flush; chunks are never completed, so this is the store's write path alone.
* ``core``: the receive loop's work without the socket: `ReceiverCore.receive_datagrams` (with
  views of ``READ`` datagrams at a time, as the loop hands over a GRO read) with the
  store's decoders (`StoredSymbols`, as ``otacast fetch`` uses them) until the image is
  complete, then `close`; CPU time (``time.process_time``, every thread of the process) per MB
  and wall time per datagram.  ``store-words`` also hands over each read's words, as the
  transport does for a GRO read (`MulticastReceiver.coalesced`: a run's headers checked at
  once); ``store`` does not, as a read without GRO has none.  The same datagrams through
  in-memory decoders (``memory``, with a budget big enough for every chunk at once, which the
  real receiver does not have) are the reference.

Times vary with the machine's load (other processes share its cores): compare figures from one
run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otacast.plugin import symbol_store
from otacast.plugin.core import ReceiverCore
from otacast.plugin.decoder import raptorq_decoder
from otacast.plugin.events import ChunkComplete
from otacast.plugin.staging import Staging
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.plugin.symbol_store import SymbolStore
from otacast.schemas import fec, units, wire
from otacast.signer import symbol_cache
from otacast.signer.keys import SigningKey
from tests.helpers import NOW, Release, cycles_for_fraction, make_release

RUN = 112  # consecutive symbols per chunk per round: one visit, an AUTH page's worth
READ = 50  # datagrams per read (a GRO read holds up to 64)


def carousel(cycle_lengths: list[int], loss: float, seed: int, join: int) -> list[tuple[int, int]]:
    """(chunk, cycle position) of every datagram that arrives, in the sender's order: rounds
    ``join``, ``join + 1``, ... for one cycle of the longest chunk."""
    rng = random.Random(seed)
    order = []
    visits = [-(-length // RUN) for length in cycle_lengths]
    for round_ in range(join, join + max(visits)):
        for chunk, length in enumerate(cycle_lengths):
            start = round_ % visits[chunk] * RUN
            for position in range(start, min(start + RUN, length)):
                if rng.random() >= loss:
                    order.append((chunk, position))
    return order


def bench_add(
    directory: Path, release: Release, datagrams: list[list[bytes]], order: list[tuple[int, int]]
) -> str:
    symbols = []
    for chunk, position in order:
        datagram = datagrams[chunk][position]
        esi = int.from_bytes(datagram[wire.DATA_HEADER_SIZE - 3 : wire.DATA_HEADER_SIZE], "big")
        symbols.append((chunk, esi, datagram[wire.DATA_HEADER_SIZE :]))
    staging = Staging(directory, release.verified())
    # What blocks the caller: the flushes `add` starts (waiting for the one before), and the
    # writes (a write can wait for the background sync of the same file).
    hand_offs: list[float] = []
    writes: list[float] = []
    # (`flush` where `add` flushed inline: the store before write-combining, for comparison)
    name = "_hand_off" if hasattr(SymbolStore, "_hand_off") else "flush"
    real_hand_off, real_pwrite = getattr(SymbolStore, name), os.pwrite

    def timed_hand_off(self: SymbolStore) -> None:
        began = time.perf_counter()
        real_hand_off(self)
        hand_offs.append(time.perf_counter() - began)

    def timed_pwrite(fd: int, data: object, position: int) -> int:
        began = time.perf_counter()
        written = real_pwrite(fd, data, position)  # type: ignore[arg-type]
        writes.append(time.perf_counter() - began)
        return written

    try:
        with SymbolStore(staging) as store:
            setattr(SymbolStore, name, timed_hand_off)
            os.pwrite = timed_pwrite
            add = store.add
            began = time.perf_counter()
            cpu = time.process_time()
            stored = 0
            for chunk, esi, symbol in symbols:
                stored += add(chunk, esi, symbol)
            elapsed = time.perf_counter() - began
            cpu = time.process_time() - cpu
            setattr(SymbolStore, name, real_hand_off)
            os.pwrite = real_pwrite
    finally:
        setattr(SymbolStore, name, real_hand_off)
        os.pwrite = real_pwrite
        staging.close()
    blocked = sum(hand_offs)
    return (
        f"add: {stored} stored, {elapsed / stored * 1e6:.2f} us/symbol wall "
        f"({cpu / stored * 1e6:.2f} us CPU, every thread); {len(writes)} pwrites, "
        f"{sum(writes) / stored * 1e6:.2f} us/symbol in them (longest "
        f"{max(writes, default=0) * 1e3:.1f} ms); {len(hand_offs)} flushes started by add, "
        f"{blocked / stored * 1e6:.2f} us/symbol blocked in them (longest "
        f"{max(hand_offs, default=0) * 1e3:.1f} ms)"
    )


def bench_core(
    directory: Path,
    release: Release,
    datagrams: list[list[bytes]],
    order: list[tuple[int, int]],
    symbols: str,
) -> str:
    verified = release.verified()
    stream = [datagrams[chunk][p] for chunk, p in order]
    # As the receive loop hands them over: views of one buffer, a read's worth (a GSO/GRO
    # batch) at a time, and with ``store-words`` the read's words as the transport gives a GRO
    # read's (`MulticastReceiver.coalesced`: whole runs checked at once).
    reads: list[tuple[list[memoryview], dict[str, tuple[memoryview, int]]]] = []
    for at in range(0, len(stream), READ):
        group = stream[at : at + READ]
        whole = memoryview(bytearray(b"".join(group)))
        segment = len(group[0])
        views = [whole[i * segment : (i + 1) * segment] for i in range(len(group))]
        same = all(len(d) == segment for d in group) and not segment & 3
        words = symbols == "store-words" and same
        reads.append((views, {"coalesced": (whole.cast("I"), segment)} if words else {}))
    batched = hasattr(ReceiverCore, "receive_datagrams")  # (not in older versions)
    stored = StoredSymbols(directory, verified) if symbols.startswith("store") else None
    core = ReceiverCore(
        release.trust,
        now=NOW,
        manifest=verified,
        decoder_factory=stored.decoder if stored is not None else raptorq_decoder,
        decoder_budget=UNBOUNDED_DECODERS,
    )
    mb = verified.manifest.image.length / 1e6
    written = _bytes_written()
    try:
        began = time.perf_counter()
        cpu = time.process_time()
        used = 0
        for read, coalesced in reads:
            if batched:
                core.receive_datagrams(read, "fd00::1", NOW, wall=NOW, **coalesced)
            else:
                for datagram in read:
                    core.receive_datagram(bytes(datagram), "fd00::1", NOW, wall=NOW)
            used += len(read)
            while (event := core.next_event()) is not None:
                if isinstance(event, ChunkComplete) and stored is not None:
                    stored.keep(event.index, event.data)
            if core.complete:
                break
        if stored is not None:
            stored.close()
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu
    finally:
        if stored is not None:
            stored.close()
            stored.staging.close()
    # Every byte this process handed to write(2)/pwrite(2) while receiving (the store's image
    # writes, spill and journal), against the image: issue 12's "disk bytes <= 1.4 x image".
    disk = (_bytes_written() - written) / verified.manifest.image.length
    state = "complete" if core.complete else "INCOMPLETE"
    return (
        f"core {symbols:>11}: {state} after {used} datagrams, {cpu / mb * 1e3:.2f} ms CPU/MB, "
        f"{elapsed / used * 1e6:.2f} us wall/datagram, written {disk:.3f} x image"
    )


def _bytes_written() -> int:
    """This process's `wchar` (bytes passed to write system calls so far, /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="32M")
    parser.add_argument("--chunk", default="8M", help="chunk size (the product's default: 8M)")
    parser.add_argument("--loss", default="0,5", help="percent, comma-separated")
    parser.add_argument(
        "--join", default="0", help="the round the receiver joins at, or 'random' (seeded)"
    )
    parser.add_argument("--dir", default="/var/tmp", help="where state directories are made")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement")
    args = parser.parse_args()
    size = units.parse_size(args.size)
    # (randbytes takes at most 2^31 bits at once: the image is drawn in 16 MiB pieces)
    rng = random.Random(1)
    image = b"".join(rng.randbytes(min(16 << 20, size - o)) for o in range(0, size, 16 << 20))
    # Whole symbols, as `sign` rounds a chunk size (chunks are RFC 6330 source blocks).
    chunk = fec.choose_chunk_size(size, units.parse_size(args.chunk), fec.DEFAULT_SYMBOL_SIZE)
    release = make_release(image, SigningKey(b"\x07" * 32), chunk_size=chunk)
    manifest = release.manifest
    k = manifest.source_symbols(0)
    # The sender's cycles: its default (and least) repair pool, as `serve` lays them out.
    began = time.perf_counter()
    datagrams = cycles_for_fraction(release, symbol_cache.MIN_REPAIR_FRACTION)
    repair = len(datagrams[0]) - k
    print(
        f"image {units.format_bytes(size)}: {manifest.chunk_count} chunks of K={k}, "
        f"{repair} repair symbols each (encoded in {time.perf_counter() - began:.1f} s); "
        f"flush every {getattr(symbol_store, 'FLUSH_SYMBOLS', None)} symbols"
    )
    lengths = [len(c) for c in datagrams]
    visits = -(-max(lengths) // RUN)
    join = random.Random(2).randrange(visits) if args.join == "random" else int(args.join)
    for percent in (int(x) for x in args.loss.split(",")):
        order = carousel(lengths, percent / 100, seed=percent, join=join)
        print(f"loss {percent}%, joined at round {join} of {visits}: {len(order)} datagrams arrive")
        for _ in range(args.repeat):
            for what in ("add", "store", "store-words", "memory"):
                work = Path(tempfile.mkdtemp(prefix="otacast-storebench-", dir=args.dir))
                try:
                    if what == "add":
                        print("  " + bench_add(work, release, datagrams, order))
                    else:
                        print("  " + bench_core(work, release, datagrams, order, what))
                finally:
                    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
