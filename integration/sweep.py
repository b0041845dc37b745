"""The simulator sweep of issue 12: datagrams a receiver hears against the ideal K/(1-p).

    python integration/sweep.py [--quick] [--sizes 50MB,1GiB] [--chunk-size BYTES]
                                [--max-passes N] [--json]

Prints a table and one JSON line per row; asserts nothing; needs no root and no network.

Why an abstract model
---------------------
`tests.helpers.Link` runs the real sender and receiver cores on real RaptorQ symbols, which is
exact but cannot reach a 4 GiB image (about 3.5 M symbols a pass, each encoded and decoded).
Here nothing carries bytes: a symbol is an ESI, a chunk's state is an int used as a bit set of the
ESIs it holds, and loss is drawn as bit masks for whole runs of datagrams, so a pass over 4 GiB
costs seconds, not hours.

What is modelled
----------------
*The image.*  The product's defaults: 8 MiB chunks (``DEFAULT_CHUNK_BYTES``, or
``--chunk-size``), 1208-byte symbols (``fec.DEFAULT_SYMBOL_SIZE``, 1228-byte datagrams), so
K = 6944 per full chunk (`fec.source_symbols`); a repair pool of 50% (``serve --repair``), so each
chunk's cycle is K + ceil(K/2) symbols as `symbol_cache.CycleLayout` lays it out.

*The carousel (what ``serve`` sends).*  The real `otacast.signer.schedule.SenderCore` (its
module docstring has the order's theory: every round visits every chunk once, a visit being one
AUTH page's worth of consecutive symbols, sender i of n being i/n of every cycle ahead, the
round being the wall clock's), built with the numbers ``serve`` gives it
(`channels.sender_core`: a visit of ``wire.auth_capacity(datagram size)`` symbols, 112 at
1228-byte datagrams; GSO batches of `transport.gso_batch`; the token bucket at the rate; the
wall clock at its start ``EPOCH + start``, its phase counted from the origin ``serve`` gives it
on a first start: the epoch for one of several senders, so a later one takes up the phase the
real rule gives it, and its own start for a lone sender).  It is driven on a virtual clock
exactly as the `Link` drives it, and only the (chunk, first, count) of each `SendSymbols` is
used.  By default no manifest is sent (the core is given no fragments), so times are
data-only; the tests give it the `Link`'s fragments.
``--sender i/n`` is the core's own sender index and count.

*The symbol-major reference (not what ``serve`` sends).*  The same order with a visit of one
symbol: every round sends the next cycle position of every chunk, chunk 0 to N-1; in round R
sender i of n sends chunk c's ESI ``(R + floor(i * C_c / n)) mod C_c`` (C_c the chunk's cycle),
R counting rounds of absolute time from a common epoch (a sender starting mid-round waits for the
next one).  It is the ideal the carousel approximates: its chunks all advance a symbol at a
time, so the image completes within a symbol of each chunk's own need, where the carousel's
complete within a visit (112 symbols) of it.  The difference between the two rows is what the
visit's size costs; it is kept for that comparison only (it has its own fast engine, checked
against a per-datagram replay by the tests).

*Receivers.*  Each has a join time (it hears what is sent from then on; it knows the manifest at
once), a loss process of its own (independent, or bursty Gilbert-Elliott with mean burst
``burst`` datagrams, lost in the bad state and delivered in the good one, as
`tests.helpers.GilbertElliott`), and one of two policies:

* ``store``: what ``otacast fetch`` does by default, the durable symbol store: every distinct
  ESI is kept.  Its high-water mark is reported as the bytes of symbols held for incomplete
  chunks (all of them, and the repair symbols alone, which is what the spill area holds once
  source symbols are written in place).
* ``memory``: the old in-memory policy (``fetch --symbols memory``), `ReceiverCore`'s decoder
  budget: at most ``max(2, MAX_DECODER_BYTES // chunk size)`` chunks (16) in progress; a
  delivered symbol of a chunk with no decoder while the budget is full is refused
  (``decoder-budget``); a decoder is never evicted.  Swept in one row only, to show why the
  carousel needs the store: every chunk is in progress at once.

For both, a chunk completes when it holds K distinct ESIs: *RaptorQ is modelled as always
decoding from K distinct symbols* (the real code fails about 1% of the time at exactly K and
almost never at K+2), so the model is a hair optimistic for chunks that need repair.

*Counting.*  ``heard`` is every data datagram on the receiver's link from its join until the one
that completes its image, lost ones included, as the `Link` counts it; ``heard/ideal`` divides
by K/(1-p) (K the image's source symbols, p the loss process's mean), the figure issue 12's
targets name.  ``recv/K`` is the delivered ones over K.  ``passes`` is how far into its passes
the furthest sender was (the core's ``passes_sent``: a pass is every chunk's K symbols' worth
of visits; symbol-major: datagrams sent over K).  ``time/1`` is, for n senders, the receiver's
time from join to image over the same receiver's time with one sender.

Simplifications (what is not modelled)
--------------------------------------
The manifest and AUTH carousels (a receiver knows the manifest at its join; AUTH pages add about
2% above the rate and no data datagram), CPU and socket buffers (a receiver never falls
behind), reordering, decoding failures at K symbols (above), and the store's own limits (disk,
memory).  With several senders, bursty loss is drawn per sender stream (a burst on the
receiver's link would hit every sender's datagrams at that moment).  The symbol-major engine
evaluates the store's high-water mark at a handful of instants (just before the first chunk
completes and at quantiles of the completions), so it is a close lower bound.

Carousel runs stop at ``--max-passes`` passes; a receiver not done by then shows ``>`` before
its ratio (a lower bound) and the share of chunks it completed.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from otacast.schemas import fec, wire
from otacast.schemas.limits import DEFAULT_CHUNK_BYTES, MAX_DECODER_BYTES
from otacast.signer import symbol_cache
from otacast.signer.channels import phase_origin
from otacast.signer.schedule import Finished, SenderCore, SendSymbols, Wait
from otacast.signer.transport import gso_batch

# ``serve``'s defaults.
REPAIR = 0.5
RATE = 12_500_000.0  # bytes/s per sender: sets virtual seconds only, never a count
# The wall-clock time at virtual second 0 (any fixed instant: the carousel's phase is the wall
# clock's, so a sender started `start` seconds in sees ``EPOCH + start``).  The `Link`'s.
EPOCH = 1_800_000_000.0
# Loss probabilities are drawn as dyadic fractions of this many bits (0.05 -> 0.0500030...).
LOSS_BITS = 20
# Loss is drawn this many datagrams at a time and handed out in runs.
LOSS_BLOCK = 4096
# A symbol-major receiver that has not finished after this many image-equivalents gives up.
MAX_SYMBOL_MAJOR_ROUNDS = 20


# --- The image -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An image cut as ``sign`` and ``serve`` cut it by default (see the module doc)."""

    size: int
    chunk_size: int = DEFAULT_CHUNK_BYTES
    symbol_size: int = fec.DEFAULT_SYMBOL_SIZE
    repair: float = REPAIR
    decoder_budget: int = MAX_DECODER_BYTES  # the ``memory`` receiver's, in bytes

    @cached_property
    def sources(self) -> tuple[int, ...]:
        chunk_size = fec.choose_chunk_size(self.size, self.chunk_size, self.symbol_size)
        count = fec.chunk_count(self.size, chunk_size, self.symbol_size)
        return tuple(
            fec.source_symbols(
                fec.chunk_span(self.size, chunk_size, self.symbol_size, c)[1], self.symbol_size
            )
            for c in range(count)
        )

    @cached_property
    def cycles(self) -> tuple[int, ...]:
        return tuple(k + symbol_cache.repair_count(k, self.repair) for k in self.sources)

    @property
    def chunks(self) -> int:
        return len(self.sources)

    @property
    def datagram_size(self) -> int:
        return wire.data_datagram_size(self.symbol_size)

    @cached_property
    def total_sources(self) -> int:
        return sum(self.sources)

    @property
    def visit(self) -> int:
        """Symbols of a chunk sent per round: one AUTH page's worth, as ``serve`` sets it."""
        return wire.auth_capacity(self.datagram_size)

    @property
    def max_decoders(self) -> int:
        """Decoders `ReceiverCore` holds at most with the default budget."""
        return max(2, self.decoder_budget // self.chunk_size)


# --- Loss ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """Independent loss with probability `mean` or, with `burst` > 0, Gilbert-Elliott bursts of
    mean length `burst` datagrams (all lost) with the same mean loss."""

    mean: float
    burst: float = 0.0

    @property
    def label(self) -> str:
        text = f"{self.mean:.0%}"
        return f"{text} b{self.burst:g}" if self.burst else text

    def bits(self, rng: random.Random) -> LossBits:
        return LossBits(self, rng)


class LossBits:
    """A receiver's loss process as a stream of bits (1 = lost), handed out in runs."""

    def __init__(self, loss: Loss, rng: random.Random) -> None:
        self.loss = loss
        self.rng = rng
        self._bits = 0
        self._left = 0
        # Binary digits of the loss probability, least significant first (see `_independent`).
        scaled = round(loss.mean * (1 << LOSS_BITS))
        self._digits = [(scaled >> i) & 1 for i in range(LOSS_BITS)]
        while self._digits and not self._digits[0]:
            self._digits.pop(0)
        if loss.burst:
            leave = 1 / loss.burst
            self._switch = (loss.mean / (1 - loss.mean) * leave, leave)  # (enter, leave)
            self._bad = rng.random() < loss.mean  # the stationary state
            self._stay = self._sojourn()

    def take(self, count: int) -> int:
        """The next `count` datagrams' fates, bit i for the i-th."""
        out = 0
        got = 0
        while got < count:
            if not self._left:
                self._bits = self._bursts() if self.loss.burst else self._independent()
                self._left = LOSS_BLOCK
            n = min(count - got, self._left)
            out |= (self._bits & ((1 << n) - 1)) << got
            self._bits >>= n
            self._left -= n
            got += n
        return out

    def _independent(self) -> int:
        # Each step keeps a bit set with probability (digit + q) / 2 where q is the probability
        # so far: after all digits, least significant first, that is exactly 0.d1 d2 d3 ...
        bits = 0
        for digit in self._digits:
            r = self.rng.getrandbits(LOSS_BLOCK)
            bits = (bits | r) if digit else (bits & r)
        return bits

    def _sojourn(self) -> int:
        """Datagrams until the state switches: geometric, at least one."""
        q = self._switch[1 if self._bad else 0]
        return 1 + int(math.log(1.0 - self.rng.random()) / math.log(1.0 - q))

    def _bursts(self) -> int:
        bits = 0
        position = 0
        while position < LOSS_BLOCK:
            n = min(self._stay, LOSS_BLOCK - position)
            if self._bad:
                bits |= ((1 << n) - 1) << position
            position += n
            self._stay -= n
            if not self._stay:
                self._bad = not self._bad
                self._stay = self._sojourn()
        return bits


def nth_set_bit(bits: int, n: int) -> int:
    """The position of the `n`-th (1-based) set bit of `bits`; it must have at least n."""
    low, high = 0, bits.bit_length()  # the answer is in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if (bits & ((1 << middle) - 1)).bit_count() >= n:
            high = middle
        else:
            low = middle
    return low


def fold(bits: int, length: int, start: int, cycle: int) -> int:
    """Bits of `length` consecutive cycle positions from `start`, as a set of ESIs (wrapping)."""
    out = 0
    position = 0
    esi = start
    while position < length:
        n = min(cycle - esi, length - position)
        out |= ((bits >> position) & ((1 << n) - 1)) << esi
        position += n
        esi = 0
    return out


# --- Specifications and outcomes -----------------------------------------------------------


@dataclass(frozen=True)
class SenderPlan:
    """One sender: ``--sender index/count``, started `start` virtual seconds in."""

    index: int = 0
    count: int = 1
    start: float = 0.0


@dataclass(frozen=True)
class ReceiverPlan:
    policy: str  # "store" (the durable store, fetch's default) or "memory" (decoder budget)
    loss: Loss
    join: float = 0.0  # virtual seconds
    seed: int = 0


@dataclass
class Outcome:
    """What one receiver saw (see the module doc for each count)."""

    plan: ReceiverPlan
    ideal: float
    heard: int = 0
    received: int = 0
    complete_at: float | None = None
    chunks_done: int = 0
    chunks: int = 0
    passes: float = 0.0  # the furthest sender's passes when the image completed (or at the end)
    decoders: int = 0  # memory: decoders held at once, at most
    store_bytes: int = 0  # store: bytes of symbols held for incomplete chunks, at most
    repair_bytes: int = 0  # store: of which repair symbols
    refused: int = 0
    late: int = 0
    duplicates: int = 0

    @property
    def heard_per_ideal(self) -> float:
        return self.heard / self.ideal

    @property
    def receiving_time(self) -> float | None:
        return None if self.complete_at is None else self.complete_at - self.plan.join


# --- The carousel: the real SenderCore ------------------------------------------------------


def carousel_core(
    image: Image,
    sender: SenderPlan,
    *,
    rate: float,
    passes: int | None,
    epoch: float = EPOCH,
    manifest: Sequence[bytes] = (),
) -> SenderCore:
    """The core ``serve`` would run for `image` (`channels.sender_core`'s numbers), started at
    virtual second ``sender.start`` = wall-clock ``epoch + sender.start``; `manifest` is the
    MANIFEST fragments it sends (none by default: data only)."""
    return SenderCore(
        image.cycles,
        image.sources,
        visit=image.visit,
        datagram_size=image.datagram_size,
        batch=gso_batch(image.datagram_size),
        rate=rate,
        manifest=manifest,
        now=sender.start,
        # As `channels.sender_core`: the wall clock less the origin of a first start.
        wall=epoch + sender.start - phase_origin(sender.count, lambda: epoch + sender.start),
        sender_index=sender.index,
        sender_count=sender.count,
        passes=passes,
    )


class _Listener:
    """One receiver fed runs of symbols in time order (either policy)."""

    def __init__(self, image: Image, plan: ReceiverPlan) -> None:
        self.image = image
        self.plan = plan
        self.bits = plan.loss.bits(random.Random(plan.seed))
        self.budget = image.max_decoders if plan.policy == "memory" else None
        self.open: dict[int, list[int]] = {}  # chunk -> [ESI set, count, repair count]
        self.done = bytearray(image.chunks)
        self.left = image.chunks
        self.held = 0
        self.held_repair = 0
        ideal = image.total_sources / (1 - plan.loss.mean)
        self.out = Outcome(plan, ideal, chunks=image.chunks)
        self.finished = False

    def symbols(self, t: float, chunk: int, first: int, count: int) -> bool:
        """Datagrams first..first+count-1 of `chunk` reach the link at `t`; True when done."""
        out = self.out
        lost = self.bits.take(count)
        got = ~lost & ((1 << count) - 1)
        delivered = got.bit_count()
        if self.done[chunk]:
            out.heard += count
            out.received += delivered
            out.late += delivered
            return False
        state = self.open.get(chunk)
        if state is None:
            if not delivered:
                out.heard += count
                return False
            if self.budget is not None and len(self.open) >= self.budget:
                out.heard += count
                out.received += delivered
                out.refused += delivered
                return False
            state = self.open[chunk] = [0, 0, 0]
            out.decoders = max(out.decoders, len(self.open))
        k = self.image.sources[chunk]
        new = (got << first) & ~state[0]
        fresh = new.bit_count()
        if state[1] + fresh < k:
            state[0] |= new
            state[1] += fresh
            repair = (new >> k).bit_count()
            state[2] += repair
            self.held += fresh
            self.held_repair += repair
            size = self.image.symbol_size
            out.store_bytes = max(out.store_bytes, self.held * size)
            out.repair_bytes = max(out.repair_bytes, self.held_repair * size)
            out.heard += count
            out.received += delivered
            out.duplicates += delivered - fresh
            return False
        # The chunk completes inside this run, at its (K - held)-th new symbol.
        at = nth_set_bit(new >> first, k - state[1])
        del self.open[chunk]
        self.held -= state[1]
        self.held_repair -= state[2]
        self.done[chunk] = 1
        self.left -= 1
        out.chunks_done += 1
        if self.left:
            out.heard += count
            out.received += delivered
            return False
        heard = at + 1
        out.heard += heard
        out.received += (got & ((1 << heard) - 1)).bit_count()
        out.complete_at = t
        self.finished = True
        return True


def run_carousel(
    image: Image,
    senders: Sequence[SenderPlan],
    receivers: Sequence[ReceiverPlan],
    *,
    rate: float = RATE,
    max_passes: int = 8,
    epoch: float = EPOCH,
    manifest: Sequence[bytes] = (),
) -> list[Outcome]:
    """Every receiver against the real carousel cores, until all are done or the passes end."""
    cores = [
        carousel_core(image, s, rate=rate, passes=max_passes, epoch=epoch, manifest=manifest)
        for s in senders
    ]
    listeners = [_Listener(image, r) for r in receivers]
    waiting = sorted(listeners, key=lambda listener: listener.plan.join)
    active: list[_Listener] = []
    heap = [(s.start, i) for i, s in enumerate(senders)]
    heapq.heapify(heap)
    while heap and (waiting or active):
        t, i = heapq.heappop(heap)
        action = cores[i].next_action(t)
        if isinstance(action, Finished):
            continue
        if isinstance(action, Wait):
            heapq.heappush(heap, (action.until, i))
            continue
        heapq.heappush(heap, (t, i))
        if not isinstance(action, SendSymbols):
            continue
        while waiting and waiting[0].plan.join <= t:
            active.append(waiting.pop(0))
        finished = False
        for listener in active:
            if listener.symbols(t, action.chunk, action.first, action.count):
                listener.out.passes = max(core.passes_sent for core in cores)
                finished = True
        if finished:
            active = [listener for listener in active if not listener.finished]
    for listener in active + waiting:
        listener.out.passes = max(core.passes_sent for core in cores)
    return [listener.out for listener in listeners]


# --- The symbol-major order --------------------------------------------------------------------


@dataclass(frozen=True)
class SymbolMajor:
    """The symbol-major reference on the absolute round grid (see the module doc).

    Times are counted in datagram slots of one sender (``datagram_size / rate`` seconds): round
    R sends chunk c in slot ``R * chunks + c``, for every sender at once.
    """

    image: Image
    senders: tuple[SenderPlan, ...]
    rate: float = RATE

    @property
    def slot(self) -> float:
        return self.image.datagram_size / self.rate

    def first_round(self, sender: SenderPlan) -> int:
        """A sender waits for the next round boundary after its start."""
        return math.ceil(sender.start / (self.slot * self.image.chunks) - 1e-9)

    def esi(self, sender: SenderPlan, chunk: int, round_: int) -> int:
        """The cycle position `sender` sends of `chunk` in absolute round `round_`."""
        cycle = self.image.cycles[chunk]
        return (round_ + sender.index * cycle // sender.count) % cycle

    def datagrams(self, rounds: int) -> Iterator[tuple[float, int, int, int]]:
        """Every datagram of the first `rounds` rounds in time order: (time, sender, chunk, ESI)
        (the per-datagram reference the tests check the fast engine against)."""
        starts = [self.first_round(s) for s in self.senders]
        for round_ in range(rounds):
            for chunk in range(self.image.chunks):
                t = (round_ * self.image.chunks + chunk) * self.slot
                for i, sender in enumerate(self.senders):
                    if round_ >= starts[i]:
                        yield t, i, chunk, self.esi(sender, chunk, round_)


class _Columns:
    """A receiver's losses on one sender's stream, per chunk over a range of rounds."""

    def __init__(self, loss: Loss, rng: random.Random, chunks: int) -> None:
        self.bits = loss.bits(rng)
        self.bursty = bool(loss.burst)
        self.chunks = chunks
        self.lost: list[int] = []
        self.low = 0

    def epoch(self, low: int, high: int) -> None:
        """Rounds low..high-1 are next (bursty loss is drawn for all chunks at once)."""
        self.low = low
        if not self.bursty:
            return
        n = self.chunks
        lost = [0] * n
        for r in range(high - low):
            row = self.bits.take(n)
            while row:
                c = (row & -row).bit_length() - 1
                lost[c] |= 1 << r
                row &= row - 1
        self.lost = lost

    def take(self, chunk: int, first: int, count: int) -> int:
        if not self.bursty:
            return self.bits.take(count)
        return (self.lost[chunk] >> (first - self.low)) & ((1 << count) - 1)


def run_symbol_major(
    image: Image,
    senders: Sequence[SenderPlan],
    receiver: ReceiverPlan,
    *,
    rate: float = RATE,
) -> Outcome:
    """One ``store`` receiver against the symbol-major order, chunk by chunk (see the doc)."""
    if receiver.policy != "store":
        raise ValueError("the symbol-major order is simulated with the store policy only")
    order = SymbolMajor(image, tuple(senders), rate)
    n = image.chunks
    rng = random.Random(receiver.seed)
    columns = [_Columns(receiver.loss, rng, n) for _ in senders]
    starts = [order.first_round(s) for s in senders]
    join_slot = math.ceil(receiver.join / order.slot - 1e-9)
    # The first round in which the receiver hears chunk c.
    heard_from = [max(0, -(-(join_slot - c) // n)) for c in range(n)]
    have = [0] * n  # ESI sets
    segments: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n)]  # per chunk
    complete = [-1] * n  # the round each chunk completed in
    left = n
    p = receiver.loss.mean
    step = math.ceil(max(image.sources) / (1 - p) / len(senders)) + 32
    low = max(min(heard_from), min(starts))  # nothing is heard before
    high = low + step
    limit = low + MAX_SYMBOL_MAJOR_ROUNDS * max(image.sources)
    while left and low < limit:
        for col in columns:
            col.epoch(low, high)
        for c in range(n):
            if complete[c] >= 0:
                continue
            k = image.sources[c]
            cycle = image.cycles[c]
            before = have[c]
            added: list[tuple[int, int, int, int]] = []
            union = before
            for i, sender in enumerate(senders):
                first = max(low, heard_from[c], starts[i])
                if first >= high:
                    continue
                count = high - first
                got = ~columns[i].take(c, first, count) & ((1 << count) - 1)
                segment = (first, count, got, order.esi(sender, c, first))
                added.append(segment)
                union |= fold(got, count, segment[3], cycle)
            segments[c] += added
            if union.bit_count() < k:
                have[c] = union
                continue
            # Completes in this epoch: the first round at which the union reaches K.
            lo, hi = low, high - 1  # the answer is in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if _held(before, added, mid, cycle).bit_count() >= k:
                    hi = mid
                else:
                    lo = mid + 1
            complete[c] = lo
            have[c] = union
            left -= 1
        low, high = high, high + max(32, step // 4)
    out = Outcome(receiver, image.total_sources / (1 - p), chunks=n)
    done_slots = [complete[c] * n + c for c in range(n) if complete[c] >= 0]
    out.chunks_done = len(done_slots)
    end_slot = max(done_slots) if not left else low * n - 1
    if not left:
        out.complete_at = end_slot * order.slot
    # Heard: every sender's datagrams from the join (or its start) to the completing one.
    for i in range(len(senders)):
        first_slot = max(join_slot, starts[i] * n)
        out.heard += max(0, end_slot - first_slot + 1)
    sent = max(max(0, end_slot - s * n + 1) for s in starts)
    out.passes = sent / image.total_sources
    _store_marks(out, image, segments, complete, starts, end_slot)
    _received(out, segments, end_slot, n)
    return out


def _held(before: int, segments: Sequence[tuple[int, int, int, int]], last: int, cycle: int) -> int:
    """The ESI set of a chunk once rounds up to `last` are in (`before`: what earlier held)."""
    held = before
    for first, count, got, esi in segments:
        m = min(count, last - first + 1)
        if m > 0:
            held |= fold(got & ((1 << m) - 1), m, esi, cycle)
    return held


def _store_marks(
    out: Outcome,
    image: Image,
    segments: Sequence[Sequence[tuple[int, int, int, int]]],
    complete: Sequence[int],
    starts: Sequence[int],
    end_slot: int,
) -> None:
    """The store's high-water mark, evaluated at a few instants (see the module doc)."""
    n = image.chunks
    finished = sorted(r for r in complete if r >= 0)
    if finished:
        picks = {finished[0] - 1} | {finished[int(q * (len(finished) - 1))] for q in (0.1, 0.5)}
    else:
        picks = {end_slot // n}
    for last in sorted(picks):
        held = repair = 0
        for c in range(n):
            if 0 <= complete[c] <= last:
                continue
            symbols = _held(0, segments[c], last, image.cycles[c])
            held += symbols.bit_count()
            repair += (symbols >> image.sources[c]).bit_count()
        out.store_bytes = max(out.store_bytes, held * image.symbol_size)
        out.repair_bytes = max(out.repair_bytes, repair * image.symbol_size)


def _received(
    out: Outcome,
    segments: Sequence[Sequence[tuple[int, int, int, int]]],
    end_slot: int,
    n: int,
) -> None:
    """Delivered datagrams up to the image's completion.  Loss was drawn only for the rounds a
    chunk needed: the datagrams heard beyond those (of chunks already complete) are counted at
    the loss process's mean delivery rate."""
    last_round = end_slot // n
    drawn = delivered = 0
    for c, chunk_segments in enumerate(segments):
        last = last_round if c <= end_slot % n else last_round - 1
        for first, count, got, _ in chunk_segments:
            m = min(count, last - first + 1)
            if m > 0:
                drawn += m
                delivered += (got & ((1 << m) - 1)).bit_count()
    out.received = delivered + round((out.heard - drawn) * (1 - out.plan.loss.mean))


# --- The sweep -----------------------------------------------------------------------------

MB = 1_000_000
GIB = 1 << 30
SIZES = {"10MB": 10 * MB, "50MB": 50 * MB, "300MB": 300 * MB, "1GiB": GIB, "4GiB": 4 * GIB}
LOSSES = (
    Loss(0.0),
    Loss(0.05),
    Loss(0.1),
    Loss(0.2),
    Loss(0.3),
    Loss(0.4),
    Loss(0.05, burst=10),
    Loss(0.2, burst=10),
)
# Several senders are swept at fewer losses and with the receiver joining at a random moment.
SENDER_LOSSES = (Loss(0.0), Loss(0.05), Loss(0.2))
SENDER_SETS = ("2", "2 late", "4", "4 late")
# The one row of the old in-memory policy (module doc): one sender, a random join.
MEMORY_ROW = ("50MB", Loss(0.2))


@dataclass(frozen=True)
class Settings:
    sizes: tuple[str, ...]
    losses: tuple[Loss, ...]
    sender_sizes: tuple[str, ...]
    sender_losses: tuple[Loss, ...]
    sender_sets: tuple[str, ...]
    max_passes: int
    chunk_size: int = DEFAULT_CHUNK_BYTES
    reference: bool = True  # also run the symbol-major reference
    joins: int = 1  # random join moments per row (each with its own loss draw)


FULL = Settings(
    sizes=tuple(SIZES),
    losses=LOSSES,
    sender_sizes=tuple(SIZES),
    sender_losses=SENDER_LOSSES,
    sender_sets=SENDER_SETS,
    max_passes=8,
)
QUICK = Settings(
    sizes=("10MB", "50MB"),
    losses=(Loss(0.0), Loss(0.05), Loss(0.2), Loss(0.3), Loss(0.2, burst=10)),
    sender_sizes=("50MB",),
    sender_losses=(Loss(0.0), Loss(0.2)),
    sender_sets=("2", "2 late"),
    max_passes=6,
)


@dataclass
class Row:
    order: str
    policy: str
    size: str
    loss: str
    join: str
    senders: str
    out: Outcome
    time_ratio: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        o = self.out
        return {
            "order": self.order,
            "policy": self.policy,
            "size": self.size,
            "loss": self.loss,
            "join": self.join,
            "senders": self.senders,
            "complete": o.complete_at is not None,
            "chunks_done": o.chunks_done,
            "chunks": o.chunks,
            "heard": o.heard,
            "received": o.received,
            "ideal": round(o.ideal),
            "heard_per_ideal": round(o.heard_per_ideal, 4),
            "received_per_k": round(o.received / (o.ideal * (1 - o.plan.loss.mean)), 4),
            "time_ratio": None if self.time_ratio is None else round(self.time_ratio, 3),
            "passes": round(o.passes, 3),
            "decoders": o.decoders if o.plan.policy == "memory" else None,
            "store_bytes": o.store_bytes if o.plan.policy == "store" else None,
            "repair_bytes": o.repair_bytes if o.plan.policy == "store" else None,
            "refused": o.refused,
            "receiving_seconds": o.receiving_time,
            **self.extra,
        }


def sender_set(name: str, rng: random.Random, span: float) -> list[SenderPlan]:
    """``N`` senders started together, or ``N late``: the first at 0, the others each at a
    random moment within `span` (one image's worth of one sender's time)."""
    count = int(name.split()[0])
    late = name.endswith("late")
    return [SenderPlan(i, count, rng.uniform(0, span) if late and i else 0.0) for i in range(count)]


def sweep_size(size: str, settings: Settings, emit: Callable[[Row], None]) -> None:
    image = Image(SIZES[size], settings.chunk_size)
    span = image.total_sources * image.datagram_size / RATE  # one image at one sender's rate
    rng = random.Random(f"sweep {size}")
    # Random joins: after every late sender started (they start within `span`), so that a time
    # ratio measures the order, not how long a late sender was still off.
    randoms = ["random"] if settings.joins == 1 else [f"r{i}" for i in range(settings.joins)]
    joins = {"0": 0.0} | {name: rng.uniform(span, 2 * span) for name in randoms}
    alone: dict[tuple[str, str, str, str], float | None] = {}
    sets = ["1"] + (list(settings.sender_sets) if size in settings.sender_sizes else [])
    for name in sets:
        senders = sender_set(name, rng, span) if name != "1" else [SenderPlan()]
        losses = settings.losses if name == "1" else settings.sender_losses
        join_names = list(joins) if name == "1" else randoms
        plans = [
            ReceiverPlan("store", loss, joins[join], seed=seed)
            for seed, (loss, join) in enumerate((lo, j) for lo in losses for j in join_names)
        ]
        if name == "1" and size == MEMORY_ROW[0]:
            memory = ReceiverPlan("memory", MEMORY_ROW[1], joins[randoms[0]], seed=len(plans))
            plans.append(memory)
        extra = {"starts": [round(s.start, 3) for s in senders]}
        results = run_carousel(image, senders, plans, max_passes=settings.max_passes)
        rows = [(o, "carousel") for o in results]
        if settings.reference:
            for plan in plans:
                if plan.policy == "store":
                    rows.append((run_symbol_major(image, senders, plan), "symbol-major"))
        for out, order in rows:
            join = next(j for j in join_names if joins[j] == out.plan.join)
            key = (order, out.plan.policy, out.plan.loss.label, join)
            seconds = out.receiving_time
            single = alone.get(key)
            ratio = None
            if name == "1":
                alone[key] = seconds
            elif seconds is not None and single:
                ratio = seconds / single
            row = Row(order, out.plan.policy, size, out.plan.loss.label, join, name, out, ratio)
            row.extra.update(extra)
            emit(row)


HEADER = (
    f"{'order':<14}{'policy':<7}{'size':>6} {'loss':<8}{'join':<7}{'senders':<8}"
    f"{'heard/ideal':>12}{'recv/K':>8}{'time/1':>7}{'passes':>7}  high-water"
)


def line(row: Row) -> str:
    o = row.out
    done = o.complete_at is not None
    ratio = f"{'' if done else '>'}{o.heard_per_ideal:.3f}"
    recv = o.received / (o.ideal * (1 - o.plan.loss.mean))
    if o.plan.policy == "memory":
        mark = f"{o.decoders} decoders, {o.refused} refused"
    else:
        mark = f"store {o.store_bytes / MB:.1f} MB (repair {o.repair_bytes / MB:.1f} MB)"
    if not done:
        mark += f"; {o.chunks_done}/{o.chunks} chunks done"
    times = "" if row.time_ratio is None else f"{row.time_ratio:.2f}"
    return (
        f"{row.order:<14}{row.policy:<7}{row.size:>6} {row.loss:<8}{row.join:<7}{row.senders:<8}"
        f"{ratio:>12}{recv:>8.3f}{times:>7}{o.passes:>7.2f}  {mark}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (seconds)")
    parser.add_argument("--max-passes", type=int, help="carousel senders stop after this many")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the symbol-major reference rows"
    )
    parser.add_argument(
        "--joins", type=int, default=1, help="random join moments per row (default 1)"
    )
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--sizes", help="comma-separated subset of " + ",".join(SIZES))
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.max_passes:
        settings = dataclasses.replace(settings, max_passes=args.max_passes)
    if args.sizes:
        settings = dataclasses.replace(settings, sizes=tuple(args.sizes.split(",")))
    settings = dataclasses.replace(
        settings, chunk_size=args.chunk_size, reference=not args.no_reference, joins=args.joins
    )
    began = time.monotonic()
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(json.dumps(row.record()) if args.json else line(row), flush=True)

    if not args.json:
        print(HEADER)
    for size in settings.sizes:
        sweep_size(size, settings, emit)
    if not args.json:
        print("\nJSON lines:")
        for row in rows:
            print(json.dumps(row.record()))
    print(f"# {len(rows)} rows in {time.monotonic() - began:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
