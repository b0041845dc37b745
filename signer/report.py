"""What ``otacast-signer serve`` tells its operator: status for people or JSON lines for machines.

Theory of operation
-------------------
The reporter has the device reporter's shape (``otacast``'s receive status): one class built
from the output stream and a ``--json`` flag, with `progress` (a refreshed line on a terminal, a
line every ``PLAIN_INTERVAL`` seconds otherwise, a JSON line every ``FAST_INTERVAL``), `warning`
and `summary`, and JSON lines that are objects with an ``"event"`` key (``progress``,
``warning``, ``finished``, and the setup events ``encoding``, ``auth-pages``, ``serving``), each
with ``"time"``, when it was written (`otacast.schemas.timestamps`, as the device's lines).  It
never reads a sender core: the driver hands it snapshots (`ServeProgress`, `ServeSummary`), so
it holds no state of the send loop and the loop's counters stay the loop's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from otacast.schemas.timestamps import rfc3339

# Seconds between progress reports: on a terminal or as JSON lines ...
FAST_INTERVAL = 1.0
# ... and as plain lines to a log, which a line a second would flood.
PLAIN_INTERVAL = 10.0


@dataclass(frozen=True)
class ServeProgress:
    """All channels together, so far: the slowest channel's passes."""

    elapsed: float
    packets: int
    bytes: int
    passes: int


@dataclass(frozen=True)
class ChannelStats:
    """One rate channel so far (in the ``finished`` JSON line and the metrics endpoint)."""

    group: str
    rate_target: int  # bytes/s; 0 = unpaced
    rate_reached: int  # bytes/s, the average since the channel started
    passes: int
    bytes: int  # DATA and MANIFEST datagrams' bytes (AUTH pages: auth_bytes)
    data_packets: int
    manifest_packets: int
    gso: bool
    auth_packets: int
    auth_bytes: int
    no_buffer: int  # sends retried because the kernel had no buffer space
    gso_refused: int  # segmented sends refused by the driver
    lane: bool = False  # the delta lane's channel
    index: bool = False  # the index group's channel


@dataclass(frozen=True)
class ServeSummary:
    elapsed: float
    packets: int
    bytes: int
    passes: int
    reason: str
    channels: list[dict[str, object]]
    lane_packets: int = 0  # the delta lane's datagrams (in `packets` too)
    lane_bytes: int = 0
    index_packets: int = 0  # the index group's datagrams (in `packets` too)
    index_bytes: int = 0


class Reporter:
    """Status for people (one refreshed line on a terminal, a line every 10 s otherwise) or
    JSON lines for machines (one per second)."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.json = as_json
        self.tty = out.isatty()
        self.interval = FAST_INTERVAL if (as_json or self.tty) else PLAIN_INTERVAL
        self._next: float | None = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def event(self, name: str, **fields: object) -> None:
        """A JSON line ``{"event": name, ...}``; people see only the ``serving`` line."""
        if self.json:
            stamped = {"event": name, "time": rfc3339(time.time()), **fields}
            self._write(json.dumps(stamped, sort_keys=True) + "\n")
        elif name in ("serving", "serving-lane", "serving-index"):
            self._write(
                {"serving-lane": "delta lane: ", "serving-index": "index group: "}.get(name, "")
                + f"serving session {fields['session']} as sender {fields['sender']} to "
                f"[{fields['group']}]:{fields['port']} from {fields['source']} on "
                f"{fields['interface']} at {_rate_text(fields['rate'])}"
                + (f" until {fields['expires_at']}" if "expires_at" in fields else "")
                + (
                    f", rounds of {fields['round_seconds']:.6f} s"
                    if isinstance(fields.get("round_seconds"), float)
                    else ""
                )
                + (", while a device listens (MLD)" if fields.get("airtime") == "mld" else "")
                + "\n"
            )

    def encoding(self, done: int, total: int) -> None:
        if self.tty and not self.json:
            self._write(f"\rencoding symbols: chunk {done}/{total}")
            if done == total:
                self._write("\n")

    def due(self, now: float) -> bool:
        """Whether a progress report is due at `now` (the driver builds the snapshot only then)."""
        if self._next is None:  # the first report comes one interval in, with a real rate
            self._next = now + self.interval
        if now >= self._next:
            self._next = now + self.interval
            return True
        return False

    def progress(self, p: ServeProgress) -> None:
        if p.elapsed <= 0:
            return
        if self.json:
            self.event(
                "progress",
                elapsed=round(p.elapsed, 3),
                packets=p.packets,
                bytes=p.bytes,
                passes=p.passes,
                rate=round(p.bytes / p.elapsed),
            )
            return
        line = (
            f"{p.elapsed:7.1f} s  pass {p.passes}  {p.packets} packets  "
            f"{p.bytes / p.elapsed / 1e6:8.1f} MB/s"
        )
        self._write(f"\r{line}" if self.tty else line + "\n")

    def warning(self, text: str) -> None:
        if self.json:
            self.event("warning", message=text)
        else:
            self._write(("\n" if self.tty else "") + f"warning: {text}\n")

    def summary(self, s: ServeSummary) -> None:
        if self.json:
            self.event(
                "finished",
                reason=s.reason,
                elapsed=round(s.elapsed, 3),
                packets=s.packets,
                bytes=s.bytes,
                passes=s.passes,
                channels=s.channels,
                lane_packets=s.lane_packets,
                lane_bytes=s.lane_bytes,
                index_packets=s.index_packets,
                index_bytes=s.index_bytes,
                peak_rss_mb=peak_rss_mb(),
            )
            return
        rate = s.bytes / s.elapsed / 1e6 if s.elapsed > 0 else 0.0
        self._write(
            ("\n" if self.tty else "") + f"stopped ({s.reason}) after {s.elapsed:.1f} s:"
            f" {s.passes} pass(es), {s.packets} packets, {s.bytes} bytes, "
            f"{rate:.1f} MB/s"
            + (f" ({s.lane_packets} packets on the delta lane)" if s.lane_packets else "")
            + (f" ({s.index_packets} packets on the index group)" if s.index_packets else "")
            + "\n"
        )


def _rate_text(rate: object) -> str:
    if not isinstance(rate, int | float) or not rate:
        return "full speed (unpaced)"
    return f"{rate / 1e6:g} MB/s"


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
