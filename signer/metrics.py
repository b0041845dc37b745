"""``otacast-signer serve --metrics``: the sender's counters as Prometheus metrics over HTTP.

Theory of operation
-------------------
A thin driver-side module (the one on the publisher side that imports ``prometheus_client``).
`listen` binds the endpoint before the release is encoded, so that a port in use fails at once
and not after minutes of encoding; until the driver (`otacast.signer.serve`) calls
`SenderCollector.feed` with a function returning a `SenderSnapshot`, only
``otacast_sender_serving 0`` and the process metrics are exposed.  Each scrape calls that function
in the HTTP server's thread: it reads the loop's plain integer counters (`ChannelStats`, as the
``finished`` JSON line does), never a lock and never the cores' decisions, so the send loop is
not slowed and a scrape may see one channel a few datagrams further on than another.

`families` turns a snapshot into metric families and is pure: the tests check it without a
socket.  Names and labels are listed in docs/OPERATIONS.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import UsageError
from .report import ChannelStats


@dataclass(frozen=True)
class SenderSnapshot:
    """What a scrape shows: the release, this sender's share and every channel so far."""

    name: str
    version: str
    sequence: int
    session: str  # hex
    sender: str  # "I/N"
    elapsed: float  # seconds since the first channel started
    channels: Sequence[ChannelStats]


def families(snap: SenderSnapshot | None) -> list[Metric]:
    """The metric families of `snap` (None: still setting up, nothing sent yet)."""
    serving = GaugeMetricFamily(
        "otacast_sender_serving", "1 while the carousel runs, 0 while the release is encoded"
    )
    serving.add_metric([], 0 if snap is None else 1)
    if snap is None:
        return [serving]
    info = GaugeMetricFamily(
        "otacast_sender_release",
        "The release served (always 1; its identity is in the labels)",
        labels=["name", "version", "sequence", "session", "sender"],
    )
    info.add_metric([snap.name, snap.version, str(snap.sequence), snap.session, snap.sender], 1)
    elapsed = GaugeMetricFamily("otacast_sender_elapsed_seconds", "Seconds since sending began")
    elapsed.add_metric([], snap.elapsed)
    Family = type[CounterMetricFamily] | type[GaugeMetricFamily]
    per_group: list[tuple[str, str, Callable[[ChannelStats], float], Family]] = [
        ("bytes", "DATA and MANIFEST bytes sent", lambda c: c.bytes, CounterMetricFamily),
        ("passes", "Passes completed (every chunk's K symbols)", lambda c: c.passes,
         CounterMetricFamily),
        ("rate_target_bytes_per_second", "Rate asked for (0: unpaced)", lambda c: c.rate_target,
         GaugeMetricFamily),
        ("rate_reached_bytes_per_second", "Average rate reached since the start",
         lambda c: c.rate_reached, GaugeMetricFamily),
        ("auth_pages", "Signed AUTH pages sent", lambda c: c.auth_packets, CounterMetricFamily),
        ("auth_bytes", "Signed AUTH pages' bytes sent", lambda c: c.auth_bytes,
         CounterMetricFamily),
    ]  # fmt: skip
    found: list[Metric] = [serving, info, elapsed]
    for suffix, text, value, kind in per_group:
        family = kind(f"otacast_sender_{suffix}", text, labels=["group"])
        for channel in snap.channels:
            family.add_metric([channel.group], value(channel))
        found.append(family)
    packets = CounterMetricFamily(
        "otacast_sender_packets", "Datagrams sent, by kind", labels=["group", "kind"]
    )
    errors = CounterMetricFamily(
        "otacast_sender_send_errors",
        "Sends refused: no_buffer (retried after a pause), gso_refused (then one send per "
        "datagram)",
        labels=["group", "reason"],
    )
    for c in snap.channels:
        packets.add_metric([c.group, "data"], c.data_packets)
        packets.add_metric([c.group, "manifest"], c.manifest_packets)
        packets.add_metric([c.group, "auth"], c.auth_packets)
        errors.add_metric([c.group, "no_buffer"], c.no_buffer)
        errors.add_metric([c.group, "gso_refused"], c.gso_refused)
    return [*found, packets, errors]


class SenderCollector(Collector):
    """The sender's metrics, read from the driver's snapshot function at each scrape."""

    def __init__(self) -> None:
        self._source: Callable[[], SenderSnapshot] | None = None

    def feed(self, source: Callable[[], SenderSnapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(None if self._source is None else self._source())


class MetricsEndpoint:
    """The HTTP endpoint, serving from a daemon thread until `close`."""

    def __init__(self, address: str, port: int) -> None:
        self.collector = SenderCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        ProcessCollector(registry=registry)  # resident memory, CPU seconds, open files
        try:
            self._server, self._thread = start_http_server(port, address, registry)
        except OSError as exc:
            raise UsageError(
                f"serve: --metrics [{address}]:{port}: cannot listen: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
