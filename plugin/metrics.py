"""``otacast watch --metrics-file``: the device's state as a node_exporter textfile.

Theory of operation
-------------------
The one module on the device side that imports ``prometheus_client``.  The watcher keeps its
tallies (`DeviceMetrics`) and, after each turn, hands them here: `render` turns them into the
Prometheus text format (pure: the tests parse its output without a daemon) and `write_textfile`
replaces the file atomically (`durable.write_durably`: a temporary file beside it, renamed
over it), so node_exporter's textfile collector never reads half a file.  The file's directory
is node_exporter's ``--collector.textfile.directory`` and its name must end in ``.prom``.

Counters, like the last error, count since ``watch`` started (a restart starts them at 0 again,
which Prometheus' ``rate`` and ``increase`` handle); the installed release is read from the state
directory's record, so it survives restarts.  Bytes count completed downloads only (an
interrupted one is counted as ``resumed`` by the turn that completes it); rejections count
every turn's, quiet ones too (a replayed old release is refused there).  Names and labels are
listed in docs/OPERATIONS.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .durable import write_durably
from .installed import Installed
from .status import ACTIVITIES

# The ways a turn of ``watch`` ends: a release installed, a quiet channel, a failure.
OUTCOMES = ("installed", "quiet", "failed")
# How a download's bytes came: received over multicast, over HTTP, or already in the state
# directory from an earlier run.
PATHS = ("multicast", "http", "resumed")


@dataclass(frozen=True)
class DeviceMetrics:
    channel: str
    installed: Installed | None
    state: str  # one of status.ACTIVITIES
    bytes: Mapping[str, int]  # by path (PATHS)
    rejected: Mapping[str, int]  # datagrams, by the receiver core's reason
    turns: Mapping[str, int]  # by outcome (OUTCOMES)
    last_error: str | None  # the error's class name
    last_error_at: float | None  # Unix time


def families(m: DeviceMetrics) -> Sequence[Metric]:
    release = GaugeMetricFamily(
        "otacast_device_installed_sequence",
        "Sequence number of the release installed (absent: none installed)",
        labels=["name", "version", "channel"],
    )
    if m.installed is not None:
        release.add_metric([m.installed.name, m.installed.version, m.channel], m.installed.sequence)
    state = GaugeMetricFamily(
        "otacast_device_state", "1 for what the device is doing, 0 otherwise", labels=["state"]
    )
    for activity in ACTIVITIES:
        state.add_metric([activity], 1 if activity == m.state else 0)
    received = CounterMetricFamily(
        "otacast_device_bytes", "Bytes of completed downloads, by path", labels=["path"]
    )
    for path in PATHS:
        received.add_metric([path], m.bytes.get(path, 0))
    rejected = CounterMetricFamily(
        "otacast_device_rejected_datagrams", "Datagrams refused, by reason", labels=["reason"]
    )
    for reason, count in sorted(m.rejected.items()):
        rejected.add_metric([reason], count)
    turns = CounterMetricFamily(
        "otacast_device_turns", "Turns of watch, by how they ended", labels=["outcome"]
    )
    for outcome in OUTCOMES:
        turns.add_metric([outcome], m.turns.get(outcome, 0))
    error = GaugeMetricFamily(
        "otacast_device_last_error_timestamp_seconds",
        "When the last failure happened (Unix time), labelled with its kind",
        labels=["error"],
    )
    if m.last_error is not None and m.last_error_at is not None:
        error.add_metric([m.last_error], m.last_error_at)
    return [release, state, received, rejected, turns, error]


class _Fixed(Collector):
    def __init__(self, found: Sequence[Metric]) -> None:
        self.found = found

    def collect(self) -> Iterator[Metric]:
        yield from self.found


def render(m: DeviceMetrics) -> bytes:
    """`m` in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(m)))
    return generate_latest(registry)


def write_textfile(path: Path, m: DeviceMetrics) -> None:
    """Replace `path` with `m` atomically; raises StateError."""
    write_durably(path, render(m), "metrics file")
