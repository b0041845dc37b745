"""Sans-IO sender core: which datagrams go out next, and when.

Theory of operation
-------------------
*The goal.*  A receiver at any loss p, joining at any moment, hearing any number of senders,
should finish after about K/(1-p) datagrams per chunk, with nothing to tune.  Two things decide
that: the receiver keeps every useful symbol (`otacast.plugin.symbol_store`), and the send order
here spreads every stretch of time evenly over every chunk.

*Cycles and visits.*  Chunk ``c`` has a cycle of ``C_c`` symbols: its K source symbols, then its
repair pool.  The cycle is cut into *visits* of ``visit`` consecutive symbols (the last one of
the cycle shorter), ``m_c = ceil(C_c / visit)`` of them.  ``visit`` is the number of digests one
AUTH page holds, and visits start on page boundaries, so each visit is exactly one AUTH page's
data (see below).

*Rounds.*  A round visits every chunk once, in chunk order, sending its next visit in GSO
batches (up to ``batch`` datagrams per send).  In absolute round ``R``, sender ``i`` of ``n``
sends visit ``(floor(i * m_c / n) + R) mod m_c`` of chunk ``c``.  So:

* every chunk advances by one visit per round, whatever the image size: a receiver that joins
  at any moment makes the same progress on every chunk, and at loss p all its chunks complete
  after about K/(1-p) symbols each, in the same round or so (the order is symbol-major, in
  steps of a visit).  The image is done in the round its slowest chunk is, by which time every
  other chunk has had that round's visit too: a receiver hears up to about one visit per chunk
  (per sender it hears) beyond K/(1-p), which is why chunks default to 8 MiB, where a visit is
  under 2% of K.  A chunk-by-chunk order would instead make it wait a whole pass for each
  chunk a loss burst left short;
* a receiver keeps hearing new symbols: the cursor walks on through the repair pool and wraps
  only after ``C_c`` symbols, beyond what any loss up to the pool needs;
* senders ``i`` of ``n`` are always ``C_c / n`` apart on every cycle, so a receiver hearing
  several gets disjoint symbols from each and finishes about n times faster.

*Absolute phase.* ``R`` counts rounds of wall-clock time since an origin: with a rate, a round
lasts ``round_seconds`` (the round's bytes over the share of the rate data gets), and a sender
that starts at wall time ``w`` begins in round ``floor((w - origin) / round_seconds)``, at the
chunk that fraction of the round has reached (the core takes ``w - origin`` as its ``wall``).
Senders of one release (``--sender i/n``) count from the epoch, so they stay ``C_c / n`` apart
however far apart they were started (hours, or a restart), as long as their clocks agree to well
within a round and each keeps its rate. A lone sender counts from the moment it first served the
release from its cache directory (`otacast.signer.channels`): started for devices that wait for
it, it sends every chunk's source symbols first, so at 0% loss they need no RaptorQ decode at
all (about 6 ms of CPU per MB in the codec alone, near what all the rest of the receive path
costs), and restarted, it goes on where its clock says it would be, so devices that stored
symbols lose none to repeats. A sender that cannot keep its rate (a slow disk, a busy CPU) falls
behind the phase and stays behind: skipping ahead to it would leave visits unsent and bring the
cycle's wrap, and so repeated symbols, sooner for every receiver. An unpaced sender (rate 0) has
no phase and starts at round 0. Lone senders on several hosts are at unrelated points of every
cycle (each counts from its own first start), so a receiver hearing them gets mostly, not
always, different symbols: ``--sender i/n`` is what makes them disjoint.

*The block index* (delta delivery, when the manifest lists one).  Its RaptorQ source blocks
are cycles like the chunks', after them in each round, but a visit of one is smaller: about
``visit`` x its K / the largest chunk's K symbols (at least one), so every cycle advances by the
same share of its K per round.  The index then costs its share of the airtime (about 0.39% of
the image's) and a receiver that joins at any moment has it after about its K/(1-p) symbols,
no later than the image.  No AUTH page covers it: the device checks it whole against the
signed SHA-256 (`otacast.plugin.core`).

*Passes.*  A pass is the fewest rounds in which every chunk has been sent at least its K source
symbols' worth wherever its visits started: ``ceil(K / visit)``, plus one where the cycle's last
visit is short and so may be among them (at most a whole cycle).  It only counts progress and
ends ``--loops``; nothing in the order depends on it, and there is no per-pass overhead to size
for the worst loss.

*Manifest carousel.*  All MANIFEST fragments are queued every ``manifest_interval`` seconds and
sent before further data, so a receiver joining at any point has the manifest within about one
interval.  At high rates the interval shrinks so that the data sent between two copies fits
in half the data a receiver holds before it has a manifest (``MAX_EARLY_BYTES``): a receiver
joining mid-stream then loses nothing while it waits for the manifest.

A large manifest (a large image: ~67 bytes of hash per 8 MiB chunk) is sent less often than
that, at the interval that costs receivers least in all.  Every receiver spends the share
``s = M / (r * I)`` of its download on copies of a manifest of ``M`` bytes sent every ``I``
seconds at rate ``r``, about ``s * D / r`` seconds when the chunks' source symbols take ``D``
bytes of airtime; a receiver joining mid-stream waits ``I / 2`` on average for a copy (less
what it holds early, a bound on the cost).  Their sum is least at ``I = sqrt(2 * M * D) / r``,
where ``s = sqrt(M / (2 * D))``: 0.2-0.3% from 500 MB up with the default chunks, since M and D
both grow with the chunk count (the manifest's fixed part weighs more in a small one).  A 4 GB
image's 38 kB manifest at 110 MB/s goes out every 0.16 s instead of every 11 ms: its datagrams
were 2.98% of the DATA datagrams sent, about 1 s of a 4 GB download at that rate, and are 0.22%
(measured), to spare a joining device at most ~0.16 s once.  The interval stays within
``MAX_MANIFEST_INTERVAL`` (a quarter of a second) all the same: below ~17 MB/s a 4 GB image's
manifest is sent four times a second rather than at the balanced interval, for what relies on
several copies a second (`watch`'s grace for a second sender; a manifest of ~30 fragments through
heavy loss within a device's join timeout).  The interval is part of a round's length and so of
the phase: senders of one release (``--sender i/n``) must run versions that agree on it.

*AUTH pages* (packet authentication, optional).  Every chunk's cycle is cut into AUTH pages of
``auth_capacity`` digests each (`otacast.signer.auth_pages` builds and signs them); a visit is
one page.  Before a data batch that reaches into a page, the core emits `SendAuth` naming that
page, to be sent ``AUTH_COPIES`` times, unless it was already sent within the last
``AUTH_REPEAT_AFTER_PAGES`` pages' worth of DATA datagrams (`AuthTiming`); the next action is
then always that data batch.  A visit's later batches follow its first well inside that gap, so
each page goes out once (twice in a row) per visit, just before its data, and the receiver
needs only the pages of the visit in flight (one per sender it hears), far below its memory of
digests (``MAX_AUTH_DIGESTS``).  One lost copy therefore costs nothing, and datagrams that
arrive before their page (reordering) are held by the receiver until a copy arrives.  AUTH
pages are not paced: they add AUTH_COPIES / visit (about 2%) above the configured rate.

*Announcements* (`Announcer`).  Besides its channels, a sender announces itself on the
channel's ASM group, where a device without SRV records listens (zero-config on a LAN): a whole
copy of the MANIFEST fragments every ``ANNOUNCE_INTERVAL`` seconds (longer for a manifest too
large to send that often), released by a token bucket of its own (``MAX_ANNOUNCE_RATE``
datagrams a second, ``MAX_ANNOUNCE_BURST`` at once), outside the channels' rates: it adds at
most ~60 KB/s, a few datagrams a second for a typical manifest.

*Pacing.*  A token bucket in bytes, refilled at ``rate`` bytes/s and capped at
``BURST_SECONDS`` of rate.  An action is released while the bucket is not negative and its size
is then subtracted, so long-run rate is exact whatever the action sizes; ``rate = 0`` means
unpaced.  The core never reads a clock: every call takes ``now`` (monotonic), and the
constructor takes the wall-clock time at that ``now`` once, for the phase.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from otacast.schemas.limits import (
    ANNOUNCE_INTERVAL,
    MAX_ANNOUNCE_BURST,
    MAX_ANNOUNCE_RATE,
    MAX_EARLY_BYTES,
)

# A few milliseconds of burst: enough that sleep granularity (~0.1 ms) does not cost accuracy,
# small enough that a switch buffer or a receiver's socket buffer never sees a large spike.
BURST_SECONDS = 0.005

# Manifest fragments are queued at least this often (a joining receiver has the manifest within
# a quarter of a second; `watch`'s grace for a second sender and a device's join timeout, with
# a manifest of many fragments through heavy loss, count on several copies a second) ...
MAX_MANIFEST_INTERVAL = 0.25
# ... and, at high rates, often enough that the data sent between two copies fits in half of what
# a receiver holds before it has a manifest (MAX_EARLY_BYTES; the other half leaves room for a
# second sender), so a receiver joining mid-stream loses nothing: every 12 ms at 100 MB/s, or
# at the balanced interval for a large manifest (`manifest_interval`), if that is longer ...
EARLY_SHARE = 0.5
# ... but no more than 100 times a second ...
MIN_MANIFEST_INTERVAL = 0.01
# ... and never using more than this share of the paced rate (this alone may make a very large
# manifest at a low rate come less often than MAX_MANIFEST_INTERVAL).
MAX_MANIFEST_SHARE = 0.05

# Copies of an AUTH page sent together (see the module doc).
AUTH_COPIES = 2
# An AUTH page is sent again once this many pages' worth of DATA datagrams went out since its
# last copies: far more than a visit (one page), far less than a round of any image with more
# than a handful of chunks, so a page goes out once per visit of its data.
AUTH_REPEAT_AFTER_PAGES = 16


@dataclass(frozen=True)
class SendSymbols:
    """Send datagrams ``first .. first+count-1`` of chunk ``chunk``'s cycle (never wraps)."""

    chunk: int
    first: int
    count: int
    nbytes: int


@dataclass(frozen=True)
class SendManifest:
    datagrams: tuple[bytes, ...]
    nbytes: int


@dataclass(frozen=True)
class SendAuth:
    """Send AUTH pages ``pages`` of chunk ``chunk``, each ``copies`` times in a row, in order.

    The core's next action is always the `SendSymbols` these pages vouch for."""

    chunk: int
    pages: tuple[int, ...]
    copies: int


@dataclass(frozen=True)
class Wait:
    until: float


@dataclass(frozen=True)
class Finished:
    reason: str


Action = SendSymbols | SendManifest | SendAuth | Wait | Finished


@dataclass
class SenderStats:
    passes: int = 0
    data_packets: int = 0
    data_bytes: int = 0
    manifest_packets: int = 0
    manifest_bytes: int = 0


def manifest_interval(manifest_bytes: int, rate: float, data_bytes: int) -> float:
    """Seconds between two copies of the manifest at `rate` bytes/s, for a carousel whose
    chunks' source symbols take `data_bytes` of airtime (module doc, *Manifest carousel*)."""
    if rate <= 0:
        return MAX_MANIFEST_INTERVAL
    early = EARLY_SHARE * MAX_EARLY_BYTES / rate
    balanced = math.sqrt(2 * manifest_bytes * data_bytes) / rate
    wanted = min(MAX_MANIFEST_INTERVAL, max(MIN_MANIFEST_INTERVAL, early, balanced))
    return max(wanted, manifest_bytes / (MAX_MANIFEST_SHARE * rate))


class AuthTiming:
    """Which AUTH pages go out ahead of each run of DATA datagrams (see the module doc)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an AUTH page holds at least one digest")
        self.capacity = capacity
        self.gap = capacity * AUTH_REPEAT_AFTER_PAGES
        self._last: dict[tuple[int, int], int] = {}  # page -> DATA datagrams sent before it
        self._sent = 0

    def before(self, chunk: int, first: int, count: int) -> tuple[int, ...]:
        """The pages of `chunk` to send before its datagrams ``first .. first+count-1``."""
        out: list[int] = []
        for index in range(first // self.capacity, (first + count - 1) // self.capacity + 1):
            last = self._last.get((chunk, index))
            if last is None or self._sent - last > self.gap:
                out.append(index)
                self._last[(chunk, index)] = self._sent
        self._sent += count
        return tuple(out)


class SenderCore:
    """The carousel schedule of one sender on one rate channel (see the module doc).

    `cycles` and `sources` give each chunk's cycle length and its K source symbols; `visit` is the
    symbols sent of a chunk per round, or `visit_sizes` gives one per chunk (the index's blocks
    are chunks with smaller visits).  With `auth_capacity` (digests per AUTH page, which must
    equal `visit`) the core also emits `SendAuth` actions for the first `authed` chunks (all by
    default); without it, packet authentication is off.  `wall` is the wall-clock time at `now`;
    with a rate it sets the phase.
    """

    def __init__(
        self,
        cycles: Sequence[int],
        sources: Sequence[int],
        *,
        visit: int,
        datagram_size: int,
        batch: int,
        rate: float,
        manifest: Sequence[bytes],
        now: float,
        wall: float | None = None,
        sender_index: int = 0,
        sender_count: int = 1,
        passes: int | None = None,
        duration: float | None = None,
        auth_capacity: int | None = None,
        visit_sizes: Sequence[int] | None = None,
        authed: int | None = None,
    ) -> None:
        if not cycles or len(cycles) != len(sources):
            raise ValueError("one cycle length and one source symbol count per chunk")
        if any(c < 1 or not 0 < k <= c for k, c in zip(sources, cycles, strict=True)):
            raise ValueError("every cycle holds at least its chunk's source symbols")
        if not 0 <= sender_index < sender_count:
            raise ValueError("sender index must be in 0..count-1")
        if batch < 1 or visit < 1 or rate < 0:
            raise ValueError("batch and visit must be positive, rate not negative")
        if auth_capacity is not None and auth_capacity != visit:
            raise ValueError("a visit is one AUTH page: visit must equal the page's capacity")
        self.cycles = tuple(cycles)
        self.visit = visit
        sizes = tuple(visit_sizes) if visit_sizes is not None else (visit,) * len(self.cycles)
        if len(sizes) != len(self.cycles) or min(sizes) < 1:
            raise ValueError("one positive visit size per chunk")
        self.visit_sizes = sizes
        self.authed = len(self.cycles) if authed is None else authed
        self.datagram_size = datagram_size
        # A batch is at most one burst allowance, so a slow rate is paced per datagram and the
        # rate over any second stays within about a percent of the target.
        if rate:
            batch = max(1, min(batch, int(rate * BURST_SECONDS) // datagram_size))
        self.batch = batch
        self.rate = rate
        self.visits = tuple(-(-c // v) for c, v in zip(self.cycles, sizes, strict=True))  # m_c
        self.bases = tuple(sender_index * m // sender_count for m in self.visits)
        # Visits per pass: every chunk sent its K source symbols' worth (module doc).
        self.rounds_per_pass = max(
            _rounds_for_k(k, c, v) for k, c, v in zip(sources, self.cycles, sizes, strict=True)
        )
        self.pass_visits = self.rounds_per_pass * len(self.cycles)
        self.manifest = tuple(manifest)
        manifest_bytes = sum(len(d) for d in self.manifest)
        self.manifest_interval = manifest_interval(
            manifest_bytes, rate, sum(sources) * datagram_size
        )
        self.round_seconds = self._round_seconds(manifest_bytes)
        self.passes = passes
        self.end = None if duration is None else now + duration
        self.stats = SenderStats()
        self._capacity = rate * BURST_SECONDS
        self._tokens = self._capacity
        self._last = now
        self._next_manifest = now
        self._pending_manifest: deque[bytes] = deque()
        self._auth = AuthTiming(auth_capacity) if auth_capacity is not None else None
        self._vouched: SendSymbols | None = None  # the data batch a SendAuth just announced
        # The phase: `_offset` turns `now` into wall-clock time; rounds count from the epoch.
        self._offset = None if wall is None or self.round_seconds is None else wall - now
        self._round, self._chunk = self._phase(now)
        self._visits_sent = 0
        self._batches: deque[SendSymbols] = deque()
        self._next_data = self._advance()

    # --- Schedule ----------------------------------------------------------------------------

    def _round_seconds(self, manifest_bytes: int) -> float | None:
        """How long a round lasts at the rate, the manifest's share taken out; None unpaced."""
        if not self.rate:
            return None
        data_rate = self.rate - manifest_bytes / self.manifest_interval
        round_bytes = sum(c / m for c, m in zip(self.cycles, self.visits, strict=True))
        return round_bytes * self.datagram_size / max(data_rate, self.rate / 2)

    def _phase(self, now: float) -> tuple[int, int]:
        """(absolute round, chunk) where the wall clock says this sender is at `now`."""
        if self._offset is None or self.round_seconds is None:
            return 0, 0
        position = (now + self._offset) / self.round_seconds
        round_index = math.floor(position)
        chunk = min(len(self.cycles) - 1, int((position - round_index) * len(self.cycles)))
        return round_index, chunk

    def visit_of(self, chunk: int, round_index: int) -> int:
        """Which visit of `chunk`'s cycle this sender sends in absolute round `round_index`."""
        return (self.bases[chunk] + round_index) % self.visits[chunk]

    def _visit(self) -> None:
        """Queue the batches of the next visit, moving to the next round after the last chunk."""
        if self._chunk == len(self.cycles):
            self._chunk = 0
            self._round += 1
        chunk = self._chunk
        size = self.visit_sizes[chunk]
        first = self.visit_of(chunk, self._round) * size
        end = min(first + size, self.cycles[chunk])
        while first < end:
            count = min(self.batch, end - first)
            self._batches.append(SendSymbols(chunk, first, count, count * self.datagram_size))
            first += count
        self._chunk += 1
        self._visits_sent += 1

    @property
    def passes_sent(self) -> float:
        """Passes sent so far, counting a pass in progress by its visits."""
        return self._visits_sent / self.pass_visits

    # --- Driving -----------------------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        """The next thing to do at time `now`; a returned send is assumed done."""
        if self._vouched is not None:
            # Already paced and counted when its pages were announced: it follows them at once.
            action, self._vouched = self._vouched, None
            return action
        if self.end is not None and now >= self.end:
            return Finished("duration")
        if self.passes is not None and self.stats.passes >= self.passes:
            return Finished("passes")
        if now >= self._next_manifest and not self._pending_manifest:
            self._pending_manifest.extend(self.manifest)
            # From when it was due, not from now: intervals that each ran a batch late would
            # give the manifest less airtime than `round_seconds` counts on, and the data would
            # run ahead of the wall clock's phase, away from other senders' (after a pause it
            # starts afresh rather than catching up).
            due = self._next_manifest + self.manifest_interval
            self._next_manifest = due if due > now else now + self.manifest_interval
        if self.rate:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            # Under one byte of deficit is rounding, not debt: waiting for it would spin.
            if self._tokens <= -1.0:
                return Wait(now + -self._tokens / self.rate)
        if self._pending_manifest:
            datagrams: list[bytes] = []
            size = 0
            while self._pending_manifest and len(datagrams) < self.batch:
                datagram = self._pending_manifest.popleft()
                datagrams.append(datagram)
                size += len(datagram)
            self._spend(size)
            self.stats.manifest_packets += len(datagrams)
            self.stats.manifest_bytes += size
            return SendManifest(tuple(datagrams), size)
        action = self._next_data
        self._next_data = self._advance()
        self._spend(action.nbytes)
        self.stats.data_packets += action.count
        self.stats.data_bytes += action.nbytes
        if self._auth is not None and action.chunk < self.authed:
            pages = self._auth.before(action.chunk, action.first, action.count)
            if pages:
                self._vouched = action
                return SendAuth(action.chunk, pages, AUTH_COPIES)
        return action

    def _advance(self) -> SendSymbols:
        """The next data batch; a pass is counted once its last visit's batches are all out."""
        if not self._batches:
            self.stats.passes = self._visits_sent // self.pass_visits
            self._visit()
        return self._batches.popleft()

    def _spend(self, nbytes: int) -> None:
        if self.rate:
            self._tokens -= nbytes


@dataclass
class AnnounceStats:
    datagrams: int = 0
    bytes: int = 0


class Announcer:
    """When the MANIFEST fragments go out on the ASM group (*Announcements* in the module doc).

    `due` returns the datagrams to send at `now`; `next_at` is when anything is due next.
    """

    def __init__(
        self,
        fragments: Sequence[bytes],
        now: float,
        *,
        interval: float = ANNOUNCE_INTERVAL,
        rate: float = MAX_ANNOUNCE_RATE,
        burst: int = MAX_ANNOUNCE_BURST,
    ) -> None:
        if not fragments or interval <= 0 or rate <= 0 or burst < 1:
            raise ValueError("fragments, and a positive interval, rate and burst")
        self.fragments = tuple(fragments)
        self.rate = rate
        self.burst = burst
        # A copy every interval, or as often as the rate allows a manifest of many fragments.
        self.interval = max(interval, len(self.fragments) / rate)
        self.stats = AnnounceStats()
        self.next_at = now
        self._tokens = float(burst)
        self._last = now
        self._next_copy = now
        self._queue: deque[bytes] = deque()

    @property
    def datagram_rate(self) -> float:
        """Datagrams a second the announcements add, on average."""
        return len(self.fragments) / self.interval

    def due(self, now: float) -> tuple[bytes, ...]:
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if not self._queue and now >= self._next_copy:
            self._queue.extend(self.fragments)
            self._next_copy = now + self.interval
        count = min(len(self._queue), int(self._tokens))
        out = tuple(self._queue.popleft() for _ in range(count))
        self._tokens -= count
        self.stats.datagrams += count
        self.stats.bytes += sum(len(d) for d in out)
        if self._queue:  # the rest as soon as the bucket holds one more datagram
            self.next_at = now + (1.0 - self._tokens) / self.rate
        else:
            self.next_at = self._next_copy
        return out


def _rounds_for_k(k: int, cycle: int, visit: int) -> int:
    """Consecutive visits of a chunk (starting anywhere on its cycle) that always hold K symbols."""
    rounds = -(-k // visit) + (1 if cycle % visit else 0)
    return min(rounds, -(-cycle // visit))
