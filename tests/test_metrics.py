"""Fleet metrics: the sender's families and the device's textfile, parsed by prometheus_client's
own parser; the --metrics address checked as a usage error; the watcher's tallies after turns
that fail, stay quiet or are refused."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from otacast.plugin import watch as watch_module
from otacast.plugin.config import Settings
from otacast.plugin.errors import DiscoveryError, NoManifestError
from otacast.plugin.installed import Installed
from otacast.plugin.metrics import DeviceMetrics, render
from otacast.plugin.watch import Watcher
from otacast.schemas.policy import TrustSet
from otacast.signer.cli import main as signer_main
from otacast.signer.commands.args import listen_address
from otacast.signer.metrics import SenderCollector, SenderSnapshot
from otacast.signer.report import ChannelStats

from .helpers import MetricSamples, metric_samples


def channel(group: str, sent: int, **more: Any) -> ChannelStats:
    fields: dict[str, Any] = {
        "group": group,
        "rate_target": 2_000_000,
        "rate_reached": 1_990_000,
        "passes": 3,
        "bytes": sent,
        "data_packets": 900,
        "manifest_packets": 12,
        "gso": True,
        "auth_packets": 40,
        "auth_bytes": 48_000,
        "no_buffer": 0,
        "gso_refused": 0,
    }
    return ChannelStats(**(fields | more))


def scrape(collector: SenderCollector) -> MetricSamples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return metric_samples(generate_latest(registry).decode())


def test_sender_metrics_name_every_channel_counter_by_group() -> None:
    snap = SenderSnapshot(
        name="rootfs",
        version="1.2",
        sequence=7,
        session="ab" * 8,
        sender="1/2",
        elapsed=12.5,
        channels=[channel("ff3e::1", 1000), channel("ff3e::2", 2000, no_buffer=4)],
    )
    collector = SenderCollector()
    collector.feed(lambda: snap)
    got = scrape(collector)
    g1, g2 = (("group", "ff3e::1"),), (("group", "ff3e::2"),)
    assert got[("otacast_sender_serving", ())] == 1
    assert got[("otacast_sender_bytes_total", g1)] == 1000
    assert got[("otacast_sender_bytes_total", g2)] == 2000
    assert got[("otacast_sender_passes_total", g1)] == 3
    assert got[("otacast_sender_rate_target_bytes_per_second", g1)] == 2_000_000
    assert got[("otacast_sender_rate_reached_bytes_per_second", g1)] == 1_990_000
    assert got[("otacast_sender_auth_pages_total", g1)] == 40
    assert got[("otacast_sender_auth_bytes_total", g1)] == 48_000
    assert got[("otacast_sender_packets_total", (("group", "ff3e::1"), ("kind", "data")))] == 900
    assert got[("otacast_sender_send_errors_total", (*g2, ("reason", "no_buffer")))] == 4
    assert got[("otacast_sender_elapsed_seconds", ())] == 12.5
    release = (
        ("name", "rootfs"),
        ("sender", "1/2"),
        ("sequence", "7"),
        ("session", "ab" * 8),
        ("version", "1.2"),
    )
    assert got[("otacast_sender_release", release)] == 1


def test_sender_metrics_before_the_carousel_starts_say_only_not_serving() -> None:
    assert scrape(SenderCollector()) == {("otacast_sender_serving", ()): 0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9464", ("::", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("[fd51::1]:80", ("fd51::1", 80)),
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ],
)
def test_metrics_address_forms(text: str, expected: tuple[str, int]) -> None:
    assert listen_address(text) == expected


@pytest.mark.parametrize(
    "text", ["9464", "::1:9464", "[::1]", "[::1]:0", "[::1]:65536", "[nonsense]:80", "host:80"]
)
def test_a_bad_metrics_address_is_a_one_line_usage_error(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = signer_main(
        ["serve", str(tmp_path / "m"), str(tmp_path / "i"), "--interface", "lo", "--metrics", text]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--metrics" in err, err


def test_device_textfile_carries_release_state_bytes_rejections_and_last_error() -> None:
    text = render(
        DeviceMetrics(
            channel="stable",
            installed=Installed(9, "rootfs", "2.0", "00" * 32, "installed"),
            state="waiting",
            bytes={"multicast": 4_000_000, "resumed": 256},
            rejected={"manifest-lower": 5, "symbol-length": 1},
            turns={"installed": 1, "quiet": 2},
            last_error="FetchError",
            last_error_at=1_700_000_000.0,
        )
    ).decode()
    got = metric_samples(text)
    labels = (("channel", "stable"), ("name", "rootfs"), ("version", "2.0"))
    assert got[("otacast_device_installed_sequence", labels)] == 9
    assert got[("otacast_device_state", (("state", "waiting"),))] == 1
    assert got[("otacast_device_state", (("state", "downloading"),))] == 0
    assert got[("otacast_device_bytes_total", (("path", "multicast"),))] == 4_000_000
    assert got[("otacast_device_bytes_total", (("path", "http"),))] == 0
    assert got[("otacast_device_bytes_total", (("path", "resumed"),))] == 256
    assert got[("otacast_device_rejected_datagrams_total", (("reason", "manifest-lower"),))] == 5
    assert got[("otacast_device_turns_total", (("outcome", "quiet"),))] == 2
    assert got[("otacast_device_turns_total", (("outcome", "failed"),))] == 0
    error = ("otacast_device_last_error_timestamp_seconds", (("error", "FetchError"),))
    assert got[error] == 1_700_000_000.0


def test_device_textfile_with_nothing_installed_and_no_error_has_no_such_samples() -> None:
    got = metric_samples(
        render(DeviceMetrics("stable", None, "idle", {}, {}, {}, None, None)).decode()
    )
    names = {name for name, _ in got}
    assert "otacast_device_installed_sequence" not in names
    assert "otacast_device_last_error_timestamp_seconds" not in names
    assert got[("otacast_device_state", (("state", "idle"),))] == 1


def test_watch_writes_its_textfile_after_quiet_and_failed_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rejections heard in a quiet turn (a replayed old release) and a failed turn's error
    reach the file, which is replaced whole (no temporary file is left beside it)."""
    quiet = NoManifestError("no manifest heard")
    quiet.rejected = {"manifest-lower": 3}
    outcomes: list[BaseException] = [quiet, DiscoveryError("no DNS answer")]

    def fake_fetch(options: object, out: object) -> None:
        raise outcomes.pop(0)

    monkeypatch.setattr(watch_module, "fetch", fake_fetch)
    monkeypatch.setattr(watch_module, "RETRY_MIN", 0.0)
    prom = tmp_path / "node" / "otacast.prom"
    settings = Settings(
        trust=(),
        state_dir=tmp_path / "state",
        interface="eth0",
        channel="stable",
        metrics_file=prom,
    )
    trust = TrustSet({"k": b"\0" * 32})
    watcher = Watcher(settings, trust, object(), io.StringIO())  # type: ignore[arg-type]
    watcher.turn()
    first = metric_samples(prom.read_text())
    assert first[("otacast_device_rejected_datagrams_total", (("reason", "manifest-lower"),))] == 3
    assert first[("otacast_device_turns_total", (("outcome", "quiet"),))] == 1
    watcher.turn()
    second = metric_samples(prom.read_text())
    assert second[("otacast_device_turns_total", (("outcome", "failed"),))] == 1
    errors = [labels for name, labels in second if name.startswith("otacast_device_last_error")]
    assert errors == [(("error", "DiscoveryError"),)]
    assert [p.name for p in prom.parent.iterdir()] == ["otacast.prom"]


def test_operations_doc_names_every_metric() -> None:
    snap = SenderSnapshot("r", "1", 1, "00", "0/1", 1.0, [channel("ff3e::1", 1)])
    collector = SenderCollector()
    collector.feed(lambda: snap)
    device = DeviceMetrics(
        "c", Installed(1, "r", "1", "00", "installed"), "idle", {}, {"x": 1}, {}, "E", 1.0
    )
    names = {name for name, _ in scrape(collector)} | {
        name for name, _ in metric_samples(render(device).decode())
    }
    doc = (Path(__file__).parents[1] / "docs" / "OPERATIONS.md").read_text()
    assert len(names) == 17
    assert [name for name in sorted(names) if f"`{name}`" not in doc] == []
