"""Sans-IO sender core: which datagrams go out next, and when.

Theory of operation
-------------------
*Symbol cycle.*  Chunk ``c`` has a cycle of ``C_c`` symbols (its K source symbols, then its
repair pool).  A *pass* sends ``S_c = min(C_c, ceil(K_c * (1 + overhead)))`` consecutive symbols of
every chunk's cycle, wrapping around.  Pass ``l`` of sender ``i`` of ``n`` starts chunk ``c`` at
cycle position ``(floor(i * C_c / n) + l * S_c) mod C_c``: successive passes walk on through the
repair pool, so a receiver that needs a second pass gets symbols it has not seen, and senders
started together at offsets ``i/n`` emit different symbols, which a receiver hearing all of them
merges (each sender alone still covers the whole cycle).

*Windows.*  Chunks are sent in windows of at most ``window`` chunks, balanced in size.  Sender
``i`` of ``n`` also starts its pass at the window that begins nearest to fraction ``i/n`` of the
pass and wraps around, so concurrent senders feed different windows; otherwise they would all
send the first window together, a receiver would finish it early and then wait for everyone to
move on (measured: two senders took 0.88 of one sender's time that way, 0.58 this way).

*Interleaving.*  Inside a window the core round-robins over the chunks one batch (up to
``batch`` consecutive datagrams, one GSO send, and never more than one burst allowance of the
rate) at a time.  A receiver that joins at any moment therefore makes progress on every chunk of
the window in flight, a burst of loss is spread over several chunks, and a receiver needs
decoders only for the windows in flight (one per sender it hears), which bounds its memory.

*Manifest carousel.*  All MANIFEST fragments are queued every ``manifest_interval`` seconds and
sent before further data, so a receiver joining at any point has the manifest within about one
interval.

*AUTH pages* (packet authentication, optional).  Every chunk's cycle is cut into AUTH pages of
``auth_capacity`` digests each (`otacast.signer.auth_pages` builds and signs them).  Before a
data batch that reaches into a page, the core emits `SendAuth` naming that page, to be sent
``AUTH_COPIES`` times, unless it was already sent within the last ``AUTH_REPEAT_AFTER_PAGES``
pages' worth of DATA datagrams (`AuthTiming`); the next action is then always that data batch.
Within a pass a page's datagrams follow each other within about a window's round-robin
(capacity x window datagrams, well inside that gap), so each page goes out twice per pass; a
later pass, a cycle that wraps, or a second sender starting mid-page comes later than the gap and
gets fresh copies.  One lost copy therefore costs nothing, and datagrams that arrive before their
page (reordering) are held by the receiver until a copy arrives.  The gap is far below the
receiver's memory of digests (``MAX_AUTH_DIGESTS``), so data whose page went out within it is
still vouched for.  AUTH pages are not paced: they add about 2% above the configured rate.

*Pacing.*  A token bucket in bytes, refilled at ``rate`` bytes/s and capped at
``BURST_SECONDS`` of rate.  An action is released while the bucket is not negative and its size
is then subtracted, so long-run rate is exact whatever the action sizes; ``rate = 0`` means
unpaced.  The core never reads a clock: every call takes ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# A few milliseconds of burst: enough that sleep granularity (~0.1 ms) does not cost accuracy,
# small enough that a switch buffer or a receiver's socket buffer never sees a large spike.
BURST_SECONDS = 0.005

# Manifest fragments are queued at least this often (a joining receiver has the manifest within
# about a second) ...
MIN_MANIFEST_INTERVAL = 0.25
# ... but never use more than this share of the paced rate.
MAX_MANIFEST_SHARE = 0.05

# Copies of an AUTH page sent together (see the module doc).
AUTH_COPIES = 2
# An AUTH page is sent again once this many pages' worth of DATA datagrams went out since its
# last copies: twice a window's round-robin of 8 chunks.
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


def manifest_interval(manifest_bytes: int, rate: float) -> float:
    if rate <= 0:
        return MIN_MANIFEST_INTERVAL
    return max(MIN_MANIFEST_INTERVAL, manifest_bytes / (MAX_MANIFEST_SHARE * rate))


def per_pass(source: int, cycle: int, overhead: float) -> int:
    """Symbols of a chunk sent per pass: its K source symbols plus `overhead`, within its cycle."""
    return min(cycle, math.ceil(source * (1 + overhead)))


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
    """The carousel schedule of one sender on one rate channel.

    `cycles` and `sources` give each chunk's cycle length and its K source symbols; a pass sends
    ``per_pass(K, cycle, overhead)`` symbols of every chunk.  With `auth_capacity` (digests per
    AUTH page) the core also emits `SendAuth` actions; without it, packet authentication is off.
    """

    def __init__(
        self,
        cycles: Sequence[int],
        sources: Sequence[int],
        *,
        overhead: float,
        datagram_size: int,
        batch: int,
        window: int,
        rate: float,
        manifest: Sequence[bytes],
        now: float,
        sender_index: int = 0,
        sender_count: int = 1,
        passes: int | None = None,
        duration: float | None = None,
        auth_capacity: int | None = None,
    ) -> None:
        if not cycles or len(cycles) != len(sources):
            raise ValueError("one cycle length and one source symbol count per chunk")
        if overhead < 0:
            raise ValueError("overhead must not be negative")
        if not 0 <= sender_index < sender_count:
            raise ValueError("sender index must be in 0..count-1")
        if batch < 1 or window < 1 or rate < 0:
            raise ValueError("batch and window must be positive, rate not negative")
        self.cycles = tuple(cycles)
        self.sends = tuple(per_pass(k, c, overhead) for k, c in zip(sources, cycles, strict=True))
        self.datagram_size = datagram_size
        # A batch is at most one burst allowance, so a slow rate is paced per datagram and the
        # rate over any second stays within about a percent of the target.
        if rate:
            batch = max(1, min(batch, int(rate * BURST_SECONDS) // datagram_size))
        self.batch = batch
        self.window = window
        self.rate = rate
        self.starts = tuple(sender_index * c // sender_count for c in cycles)
        self.windows = self._window_order(sender_index, sender_count)
        self.manifest = tuple(manifest)
        manifest_bytes = sum(len(d) for d in self.manifest)
        self.manifest_interval = manifest_interval(manifest_bytes, rate)
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
        self._plan = self._walk()
        self._next_data = self._advance()

    # --- Schedule ----------------------------------------------------------------------------

    def _window_order(self, index: int, count: int) -> tuple[range, ...]:
        """Windows in this sender's order, starting near fraction index/count of the pass."""
        # Balanced windows (sizes differ by at most one chunk), so that fractions of the pass
        # fall on window boundaries and concurrent senders each get a window of their own.
        chunks = len(self.cycles)
        count_windows = -(-chunks // self.window)
        base, extra = divmod(chunks, count_windows)
        windows: list[range] = []
        start = 0
        for w in range(count_windows):
            size = base + (1 if w < extra else 0)
            windows.append(range(start, start + size))
            start += size
        # Start at the window whose first symbol lies nearest to fraction index/count of the
        # pass (a short last chunk must not pull the midpoint into the first window).
        target = sum(self.sends) * index / count
        starts: list[int] = []
        position = 0
        for members in windows:
            starts.append(position)
            position += sum(self.sends[c] for c in members)
        first = min(range(len(windows)), key=lambda w: abs(starts[w] - target))
        return tuple(windows[first:] + windows[:first])

    def _walk(self) -> Iterator[SendSymbols | int]:
        """Every data batch in order, pass after pass, forever; an int marks a finished pass."""
        pass_index = 0
        while True:
            for members in self.windows:
                cursor = {
                    c: (self.starts[c] + pass_index * self.sends[c]) % self.cycles[c]
                    for c in members
                }
                left = {c: self.sends[c] for c in members}
                while left:
                    for c in list(left):
                        count = min(self.batch, left[c], self.cycles[c] - cursor[c])
                        yield SendSymbols(c, cursor[c], count, count * self.datagram_size)
                        cursor[c] = (cursor[c] + count) % self.cycles[c]
                        left[c] -= count
                        if not left[c]:
                            del left[c]
            pass_index += 1
            yield pass_index

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
            self._next_manifest = now + self.manifest_interval
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
        if self._auth is not None:
            pages = self._auth.before(action.chunk, action.first, action.count)
            if pages:
                self._vouched = action
                return SendAuth(action.chunk, pages, AUTH_COPIES)
        return action

    def _advance(self) -> SendSymbols:
        """The next data batch, counting the passes completed before it."""
        item = next(self._plan)
        while isinstance(item, int):
            self.stats.passes = item
            item = next(self._plan)
        return item

    def _spend(self, nbytes: int) -> None:
        if self.rate:
            self._tokens -= nbytes
