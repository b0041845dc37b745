"""What a device tells its operator while it receives: notes, progress, and the summary.

The receive driver (`otacast.plugin.receive`) hands the `Reporter` three kinds of things:

* notes (a manifest verified, DNS fell back to the ASM group, HTTP repair started), one line
  each;
* progress: a `ReceiverSnapshot` (a frozen copy the core makes; the reporter never reads the
  core's live counters), when `Reporter.due` says so;
* at the end a `FetchSummary`, made from the last snapshot plus what only the driver knows (HTTP
  and resumed bytes, the joins, elapsed time).

*The bar.*  On a terminal (the output is one, no ``--json``, and neither ``CI=true`` nor
``TERM=dumb``: `wants_bar`), progress is one line redrawn in place with ``\r`` every
``BAR_INTERVAL``, and notes break it: a bar, the percentage, bytes gathered of the image, the
rate, the loss seen, the sources heard and the time left; the summary follows the finished bar.
What it shows is a `BarState` (the last snapshot's figures and the samples of the rate's moving
average over ``RATE_WINDOW``), rendered by `bar_line`: a pure function of the state, the time
and the terminal's width, tested without a terminal.  Bytes gathered are the core's
``bytes_gathered``, which moves with every useful symbol; the loss is the core's estimate from
gaps in each chunk's ESI sequence (`otacast.plugin.core`, *Reporting*), shown once
``LOSS_MIN_FOLLOWED`` arrivals back it.  Elsewhere (a log, a pipe) progress is not written at
all: notes and the summary are.

*JSON.*  With ``--json`` every one of them is a JSON line (``event`` = ``note``, ``progress``
(every ``PROGRESS_INTERVAL``) or ``finished``), stamped with ``time`` by
`otacast.plugin.jsonlines`; tests, benchmarks and tools read those, so their keys are an
interface.  `peak_rss_mb` reads the process's peak memory for the summary.

*Wording.*  A healthy run must not read as a troubled one.  Datagrams heard before the manifest
wait for it in a bounded buffer; when the buffer is full the oldest are not kept
(``no-manifest-yet``), and the carousel sends them again: the text says so apart from the
refusals (``WAITING_REASONS``), and "refused" appears only when something was.  Before the
manifest the bar says it is waiting and how many datagrams are held for it (`waiting_line`).
The installed release heard on the channel (a rollback to exactly the installed sequence:
``watch``'s idle state) is said to be that, not a refused manifest (`refusal_note`).  The JSON
keys keep every reason as it is counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from otacast.schemas import wire
from otacast.schemas.errors import Rollback
from otacast.schemas.policy import VerifiedManifest

from .core import ReceiverSnapshot
from .events import ManifestRefused
from .jsonlines import json_line

# How often progress is written as a JSON line: often enough to follow, rarely enough to read.
PROGRESS_INTERVAL: Final = 1.0
# How often the bar is redrawn: five times a second moves smoothly to the eye, and a snapshot
# (a copy of the counters and a sum over the chunks in progress) that often costs nothing.
BAR_INTERVAL: Final = 0.2
# The span of the rate's moving average: long enough to smooth the carousel's bursts (manifest
# copies, GSO batches, chunks completing), short enough to show a change within seconds.
RATE_WINDOW: Final = 5.0
# The shortest span a rate is computed over; before it the rate and time left show as unknown.
RATE_MIN_SPAN: Final = 0.5
# Followed arrivals before the loss estimate is shown: below it one gap would read as percents.
LOSS_MIN_FOLLOWED: Final = 100
# The narrowest bar drawn; a terminal narrower than the figures and this drops the bar.
BAR_MIN_WIDTH: Final = 10

# Counted reasons that a healthy run has, shown apart from refusals (module doc, *Wording*).
WAITING_REASONS: Final[Mapping[str, str]] = {
    "no-manifest-yet": "heard before the manifest, not kept (sent again; usual when joining "
    "mid-stream)",
    "decoder-budget": "left for a later pass (--symbols memory: no decoder room)",
    # A chunk that holds K symbols and waits for its decode needs no more (unless the decode
    # fails, when it takes symbols again): with decodes queued, every lossy download has these.
    "decode-pending": "not needed (their chunk held enough and was waiting for its decode)",
}


def wants_bar(isatty: bool, as_json: bool, environ: Mapping[str, str]) -> bool:
    """Whether progress is a bar redrawn in place (module doc, *The bar*)."""
    return (
        isatty
        and not as_json
        and environ.get("CI", "").lower() != "true"
        and environ.get("TERM", "") != "dumb"
    )


@dataclass(frozen=True)
class BarState:
    """What the bar shows: the last snapshot's figures and the rate's samples."""

    bytes_total: int
    started: float  # monotonic: when the download began
    bytes_gathered: int = 0
    bytes_http: int = 0
    sources: int = 0
    symbols_followed: int = 0
    symbols_missed: int = 0
    # (monotonic time, bytes gathered), oldest first: the newest at or before the window's
    # start, then every later one
    samples: tuple[tuple[float, int], ...] = ()
    complete: bool = False

    def advanced(self, snap: ReceiverSnapshot, now: float, bytes_http: int) -> BarState:
        """This state with `snap`'s figures and a sample at `now` (older ones dropped)."""
        samples = (*self.samples, (now, snap.bytes_gathered))
        while len(samples) > 1 and samples[1][0] <= now - RATE_WINDOW:
            samples = samples[1:]
        return dataclasses.replace(
            self,
            bytes_total=snap.bytes_total,
            bytes_gathered=snap.bytes_gathered,
            bytes_http=bytes_http,
            sources=snap.sources,
            symbols_followed=snap.symbols_followed,
            symbols_missed=snap.symbols_missed,
            samples=samples,
            complete=snap.complete,
        )

    def rate(self, now: float) -> float | None:
        """Bytes gathered per second over the window up to `now`; None before a span."""
        if not self.samples:
            return None
        since, gathered = self.samples[0]
        span = now - since
        if span < RATE_MIN_SPAN:
            return None
        return max(0, self.bytes_gathered - gathered) / span

    @property
    def loss(self) -> float | None:
        if self.symbols_followed < LOSS_MIN_FOLLOWED:
            return None
        return self.symbols_missed / (self.symbols_followed + self.symbols_missed)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _clock(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar_line(state: BarState, now: float, width: int) -> str:
    """The bar's line at `now` for a terminal `width` columns wide: exactly ``width - 1``
    characters (the last column is left free, so no terminal wraps the line and its redraw
    overwrites the whole of the previous one)."""
    total = max(state.bytes_total, 1)
    done = state.bytes_total if state.complete else min(state.bytes_gathered, state.bytes_total)
    fraction = done / total
    rate = state.rate(now)
    loss = state.loss
    figures = [  # (widths kept while they change, so that the bar does not shift)
        f"{100 * fraction:5.1f}%",
        f"{_size(done):>8} of {_size(state.bytes_total)}",
        f"{'--' if rate is None else f'{rate / 1e6:.1f}':>5} MB/s",
        "loss --" if loss is None else f"loss {100 * loss:.1f}%",
        f"{state.sources} source{'' if state.sources == 1 else 's'}",
    ]
    if state.bytes_http:
        figures.append(f"HTTP {_size(state.bytes_http)}")
    if state.complete:
        figures.append(f"in {_clock(now - state.started)}")
    elif rate is None or rate <= 0:
        figures.append("ETA --:--")
    else:
        figures.append(f"ETA {_clock((state.bytes_total - done) / rate):>5}")
    text = "  ".join(figures)
    room = width - 1 - len(text) - 3  # "[", "]" and a space
    if room >= BAR_MIN_WIDTH:
        filled = int(room * fraction)
        text = f"[{'#' * filled}{'-' * (room - filled)}] {text}"
    return text[: max(width - 1, 0)].ljust(max(width - 1, 0))


def waiting_line(snap: ReceiverSnapshot, elapsed: float, width: int) -> str:
    """The bar's line before a manifest is verified (module doc, *Wording*), ``width - 1``
    characters as `bar_line`'s."""
    heard = (
        f"; {snap.datagrams} datagrams heard, {snap.held} held until it arrives"
        if snap.datagrams
        else "; nothing heard yet"
    )
    text = f"waiting for the release's manifest: {_clock(elapsed)}{heard}"
    return text[: max(width - 1, 0)].ljust(max(width - 1, 0))


def refusal_note(refused: ManifestRefused, installed_sequence: int | None) -> str:
    """The note for a manifest refused on the channel (module doc, *Wording*): the installed
    release itself, which a channel carries until the next one, is no refusal to an operator."""
    error = refused.error
    if (
        isinstance(error, Rollback)
        and error.sequence is not None
        and error.sequence == installed_sequence
    ):
        return (
            f"heard the installed release on the channel (sequence {error.sequence}): nothing newer"
        )
    return f"refused a manifest on the channel: {refused.message}"


def summary_text(s: FetchSummary) -> str:
    """The summary's line for people (module doc, *Wording*)."""
    m = s.manifest.manifest
    loss = (
        f"loss {100 * s.symbols_missed / (s.symbols_followed + s.symbols_missed):.1f}%"
        if s.symbols_followed >= LOSS_MIN_FOLLOWED
        else "loss not measured"
    )
    text = (
        f"done: {m.name} {m.version} ({m.image.length} bytes, sha256 verified) in "
        f"{s.elapsed:.1f} s; multicast {s.bytes_multicast}, HTTP {s.bytes_http}, "
        f"local {s.bytes_local}, resumed {s.bytes_resumed} bytes; {s.datagrams} datagrams "
        f"from {s.sources} source{'' if s.sources == 1 else 's'}, {loss}"
    )
    for reason, meaning in WAITING_REASONS.items():
        if s.rejected.get(reason):
            text += f"; {s.rejected[reason]} {meaning}"
    if s.rejected.get("old-wire-version"):
        text += (
            f"; {s.rejected['old-wire-version']} datagrams of otacast wire 2 ignored: "
            f"{wire.OLD_WIRE_VERSION_TEXT}"
        )
    refused = {
        k: v
        for k, v in s.rejected.items()
        if k not in WAITING_REASONS and k != "old-wire-version" and v
    }
    if refused:
        text += "; refused: " + ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
    if s.auth:
        text += f"; packet authentication: {s.auth['pages_signed']} pages verified"
    if s.http_refetched:
        text += (
            f"; {s.http_refetched} partly held chunk(s) failed their hash and were fetched whole"
        )
    if s.lane_from is not None:
        text += (
            f"; used the delta lane from release {s.lane_from}: {s.bytes_lane} bytes in "
            f"{s.datagrams_lane} datagrams ({s.lane_index or 'no'} index)"
        )
    if s.datagrams_index:
        text += f"; {s.datagrams_index} datagrams from the index group"
    return text


@dataclass(frozen=True)
class FetchSummary:
    manifest: VerifiedManifest
    elapsed: float
    bytes_multicast: int
    bytes_http: int
    bytes_resumed: int
    receiving: float  # seconds from the first datagram to the verified image
    datagrams: int
    symbols_used: int
    late: int  # symbols of chunks already complete (the rest of their last round's visit)
    rejected: dict[str, int]
    joins: list[str] = field(default_factory=list)
    auth: dict[str, int] | None = None  # packet authentication counters, when it was used
    reads: int = 0  # socket reads made; datagrams / reads is what UDP GRO coalesced
    sources: int = 0  # distinct addresses that sent DATA of the session
    symbols_followed: int = 0  # the loss estimate's arrivals (`otacast.plugin.core`)
    symbols_missed: int = 0
    index_bytes: int = 0  # the verified block index's length, when it was asked for and came
    bytes_local: int = 0  # image bytes taken from local sources (`otacast.plugin.reuse`)
    # The delta lane (`otacast.plugin.lane`): the release the device was on when it took it
    # (None: not taken), the symbol bytes and DATA datagrams received on it, and where its new
    # block index came from ("patch" or "full").
    lane_from: int | None = None
    bytes_lane: int = 0
    datagrams_lane: int = 0
    lane_index: str | None = None
    datagrams_index: int = 0  # DATA datagrams read on the index group (`otacast.plugin.lane`)
    # Partly held chunks that HTTP repair fetched whole after their held symbols and fetched
    # ranges together failed the chunk's hash (`otacast.plugin.fetcher.RangedChunk`).
    http_refetched: int = 0
    # Times the carousel's groups were left while every chunk left waited for its decode.
    left_for_decodes: int = 0
    # The decode worker (`otacast.plugin.decode_worker`): decodes it answered, its peak RSS.
    decodes_in_worker: int = 0
    worker_peak_rss_mb: float | None = None
    # Chunks received by multicast whose bytes a decoder rebuilt (with `--symbols store`, the
    # others' source symbols all arrived and were only hashed): the repair work loss cost.
    chunks_decoded: int = 0

    @classmethod
    def from_snapshot(
        cls,
        snap: ReceiverSnapshot,
        *,
        elapsed: float,
        receiving: float,
        bytes_http: int,
        bytes_resumed: int,
        joins: list[str],
        reads: int = 0,
        bytes_local: int = 0,
        local_in_multicast: int = 0,
        multicast_in_http: int = 0,
    ) -> FetchSummary:
        """The summary of a finished download (`snap` has a verified manifest).  Of
        `bytes_local`, `local_in_multicast` were in chunks the core completed, which it counts
        as multicast bytes: they are counted once, as local.  `multicast_in_http` are bytes
        received by multicast in chunks HTTP repair completed from ranges, which the core did
        not count."""
        assert snap.manifest is not None
        return cls(
            manifest=snap.manifest,
            elapsed=elapsed,
            bytes_multicast=snap.bytes_multicast - local_in_multicast + multicast_in_http,
            bytes_http=bytes_http,
            bytes_local=bytes_local,
            bytes_resumed=bytes_resumed,
            receiving=receiving,
            datagrams=snap.datagrams,
            symbols_used=snap.symbols_used,
            late=snap.late,
            rejected=dict(snap.rejected),
            joins=joins,
            auth=dict(snap.auth) if snap.auth is not None else None,
            reads=reads,
            sources=snap.sources,
            symbols_followed=snap.symbols_followed,
            symbols_missed=snap.symbols_missed,
            index_bytes=snap.index_bytes,
            chunks_decoded=snap.chunks_decoded,
        )


def _loss(followed: int, missed: int) -> float | None:
    return round(missed / (followed + missed), 4) if followed + missed else None


class Reporter:
    """A bar redrawn in place on a terminal, notes on their own lines, or JSON lines."""

    def __init__(
        self,
        out: TextIO,
        as_json: bool,
        *,
        bar: bool | None = None,
        columns: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`bar` decides the bar instead of `wants_bar`; `columns` fixes the width instead of
        asking the terminal (both for tests)."""
        self.out = out
        self.json = as_json
        self.bar = (
            wants_bar(out.isatty(), as_json, os.environ if environ is None else environ)
            if bar is None
            else bar
        )
        self.columns = columns
        self._next = 0.0
        self._dirty = False
        self._state: BarState | None = None

    def _line(self, text: str) -> None:
        if self._dirty:
            self.out.write("\n")
            self._dirty = False
        self.out.write(text + "\n")
        self.out.flush()

    def _json(self, record: Mapping[str, object], sort_keys: bool = False) -> None:
        self._line(json_line(record, sort_keys=sort_keys))

    def _width(self) -> int:
        if self.columns is not None:
            return self.columns
        try:
            columns = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return columns or 80  # a terminal that does not say its size (0 columns): the usual

    def note(self, text: str) -> None:
        if self.json:
            self._json({"event": "note", "message": text})
        else:
            self._line(text)

    def due(self, now: float, *, waiting: bool = False) -> bool:
        """Whether progress is to be written at `now` (the driver's monotonic clock); the
        driver builds a snapshot only then.  The same shape as the sender's reporter
        (`otacast.signer.report`), except that the interval starts when progress is written.
        While `waiting` for a manifest only the bar shows something (`waiting_line`); JSON
        progress starts with the manifest; without a bar or JSON nothing is ever due."""
        return (self.bar or (self.json and not waiting)) and now >= self._next

    def progress(self, snap: ReceiverSnapshot, now: float, elapsed: float, bytes_http: int) -> None:
        """Write progress and wait an interval; before a manifest is verified, only the bar's
        waiting line."""
        if now < self._next:
            return
        if snap.manifest is None:
            if self.bar:
                self._next = now + BAR_INTERVAL
                self.out.write("\r" + waiting_line(snap, elapsed, self._width()))
                self.out.flush()
                self._dirty = True
            return
        if self.json:
            self._next = now + PROGRESS_INTERVAL
            self._json(
                {
                    "event": "progress",
                    "chunks_done": snap.chunks_done,
                    "chunks": snap.chunks_total,
                    "bytes_done": snap.bytes_done,
                    "bytes": snap.bytes_total,
                    "bytes_gathered": snap.bytes_gathered,
                    "bytes_http": bytes_http,
                    "datagrams": snap.datagrams,
                    "sources": snap.sources,
                    "loss": _loss(snap.symbols_followed, snap.symbols_missed),
                    "rejected": snap.rejected_total,
                    "rejected_by": dict(snap.rejected),
                    "elapsed": round(max(elapsed, 0.0), 3),
                }
            )
        elif self.bar:
            self._next = now + BAR_INTERVAL
            if self._state is None:
                self._state = BarState(bytes_total=snap.bytes_total, started=now - elapsed)
            self._state = self._state.advanced(snap, now, bytes_http)
            self._redraw(now)

    def _redraw(self, now: float) -> None:
        assert self._state is not None
        self.out.write("\r" + bar_line(self._state, now, self._width()))
        self.out.flush()
        self._dirty = True

    def summary(self, s: FetchSummary) -> None:
        m = s.manifest.manifest
        if self.json:
            self._json(
                {
                    "event": "finished",
                    "name": m.name,
                    "version": m.version,
                    "sequence": m.sequence,
                    "bytes": m.image.length,
                    "bytes_multicast": s.bytes_multicast,
                    "bytes_http": s.bytes_http,
                    "bytes_resumed": s.bytes_resumed,
                    "bytes_local": s.bytes_local,
                    "datagrams": s.datagrams,
                    "symbols_used": s.symbols_used,
                    "late": s.late,
                    "rejected": s.rejected,
                    "elapsed": round(s.elapsed, 3),
                    "receiving": round(s.receiving, 3),
                    "peak_rss_mb": peak_rss_mb(),
                    "joins": s.joins,
                    "packet_auth": s.auth,
                    "reads": s.reads,
                    "sources": s.sources,
                    "loss": _loss(s.symbols_followed, s.symbols_missed),
                    "index_bytes": s.index_bytes,
                    "lane_from": s.lane_from,
                    "bytes_lane": s.bytes_lane,
                    "datagrams_lane": s.datagrams_lane,
                    "lane_index": s.lane_index,
                    "datagrams_index": s.datagrams_index,
                    "http_refetched": s.http_refetched,
                    "left_for_decodes": s.left_for_decodes,
                    "decodes_in_worker": s.decodes_in_worker,
                    "chunks_decoded": s.chunks_decoded,
                    "worker_peak_rss_mb": s.worker_peak_rss_mb,
                },
                sort_keys=True,
            )
            return
        if self.bar and self._state is not None:  # the bar, finished, stays above the summary
            self._state = dataclasses.replace(
                self._state,
                bytes_gathered=m.image.length,
                bytes_http=s.bytes_http,
                sources=s.sources,
                symbols_followed=s.symbols_followed,
                symbols_missed=s.symbols_missed,
                complete=True,
            )
            self._redraw(self._state.started + s.elapsed)
        self._line(summary_text(s))


def peak_rss_mb(pid: int | None = None) -> float | None:
    """Peak resident memory of this process image (VmHWM; resets at exec, unlike ru_maxrss,
    which inherits the forking parent's peak), or of process `pid`, in MB; None where /proc is
    unavailable."""
    try:
        with Path(f"/proc/{pid or 'self'}/status").open(encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
