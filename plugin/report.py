"""What a device tells its operator while it receives: notes, progress, and the summary.

The receive driver (`otacast.plugin.receive`) hands the `Reporter` three kinds of things:

* notes (a manifest verified, DNS fell back to the ASM group, HTTP repair started), one line
  each;
* progress: a `ReceiverSnapshot` (a frozen copy the core makes; the reporter never reads the
  core's live counters), at most once per ``PROGRESS_INTERVAL``;
* at the end a `FetchSummary`, made from the last snapshot plus what only the driver knows (HTTP
  and resumed bytes, the joins, elapsed time).

On a terminal, progress is one line rewritten in place and notes break it; otherwise progress is
not written at all.  With ``--json`` every one of them is a JSON line (``event`` = ``note``,
``progress`` or ``finished``); tests, benchmarks and tools read those, so their keys are an
interface.  `peak_rss_mb` reads the process's peak memory for the summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from otacast.schemas.policy import VerifiedManifest

from .core import ReceiverSnapshot

# How often progress is written: often enough to watch, rarely enough to cost nothing.
PROGRESS_INTERVAL: Final = 1.0


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
    ) -> FetchSummary:
        """The summary of a finished download (`snap` has a verified manifest)."""
        assert snap.manifest is not None
        return cls(
            manifest=snap.manifest,
            elapsed=elapsed,
            bytes_multicast=snap.bytes_multicast,
            bytes_http=bytes_http,
            bytes_resumed=bytes_resumed,
            receiving=receiving,
            datagrams=snap.datagrams,
            symbols_used=snap.symbols_used,
            late=snap.late,
            rejected=dict(snap.rejected),
            joins=joins,
            auth=dict(snap.auth) if snap.auth is not None else None,
            reads=reads,
        )


class Reporter:
    """A refreshed status line on a terminal, notes on their own lines, or JSON lines."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.json = as_json
        self.tty = out.isatty() and not as_json
        self._next = 0.0
        self._dirty = False

    def _line(self, text: str) -> None:
        if self._dirty:
            self.out.write("\n")
            self._dirty = False
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        if self.json:
            self._line(json.dumps({"event": "note", "message": text}))
        else:
            self._line(text)

    def due(self, now: float) -> bool:
        """Whether progress is to be written at `now` (the driver's monotonic clock); the
        driver builds a snapshot only then.  The same shape as the sender's reporter
        (`otacast.signer.report`), except that the interval starts when progress is written:
        nothing is, before a manifest is verified."""
        return now >= self._next

    def progress(self, snap: ReceiverSnapshot, now: float, elapsed: float, bytes_http: int) -> None:
        """Write progress (nothing before a manifest is verified) and wait an interval."""
        if now < self._next or snap.manifest is None:
            return
        self._next = now + PROGRESS_INTERVAL
        elapsed = max(elapsed, 1e-6)
        rejected = snap.rejected_total
        if self.json:
            self._line(
                json.dumps(
                    {
                        "event": "progress",
                        "chunks_done": snap.chunks_done,
                        "chunks": snap.chunks_total,
                        "bytes_done": snap.bytes_done,
                        "bytes": snap.bytes_total,
                        "bytes_http": bytes_http,
                        "datagrams": snap.datagrams,
                        "rejected": rejected,
                        "rejected_by": dict(snap.rejected),
                        "elapsed": round(elapsed, 3),
                    }
                )
            )
        elif self.tty:
            percent = 100 * snap.bytes_done / snap.bytes_total
            self.out.write(
                f"\r{percent:5.1f}% {snap.chunks_done}/{snap.chunks_total} chunks "
                f"{snap.bytes_multicast / elapsed / 1e6:6.1f} MB/s multicast "
                f"{bytes_http / 1e6:.1f} MB http, {rejected} rejected "
            )
            self.out.flush()
            self._dirty = True

    def summary(self, s: FetchSummary) -> None:
        m = s.manifest.manifest
        if self.json:
            self._line(
                json.dumps(
                    {
                        "event": "finished",
                        "name": m.name,
                        "version": m.version,
                        "sequence": m.sequence,
                        "bytes": m.image.length,
                        "bytes_multicast": s.bytes_multicast,
                        "bytes_http": s.bytes_http,
                        "bytes_resumed": s.bytes_resumed,
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
                    },
                    sort_keys=True,
                )
            )
            return
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.rejected.items())) or "none"
        self._line(
            f"done: {m.name} {m.version} ({m.image.length} bytes, sha256 verified) in "
            f"{s.elapsed:.1f} s; multicast {s.bytes_multicast}, HTTP {s.bytes_http}, "
            f"resumed {s.bytes_resumed} bytes; {s.datagrams} datagrams, rejected: {reasons}"
            + (
                f"; packet authentication: {s.auth['pages_signed']} pages signed, "
                f"{s.auth['pages_linked']} linked"
                if s.auth
                else ""
            )
        )


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process image (VmHWM; resets at exec, unlike ru_maxrss,
    which inherits the forking parent's peak), in MB; None where /proc is unavailable."""
    try:
        with Path("/proc/self/status").open(encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
