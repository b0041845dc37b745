"""Fleet metrics from the real commands on a namespaced LAN: a running ``otacast-signer serve
--metrics`` scraped over HTTP from inside its namespace (counters present and growing), a
second sender refused the same port with a usage error, and ``otacast watch --metrics-file``
writing a node_exporter textfile after it installs a release; every body is parsed by
prometheus_client's own parser."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from otacast.schemas import addressing
from otacast.schemas.manifest import parse_envelope
from tests.helpers import MetricSamples, metric_samples

from .netns import BIN, Host, LanFactory, stop
from .release import CHANNEL, Release, serve, serve_command
from .test_watch import Daemon, write_config

MB = 1_000_000
ENDPOINT = "[::1]:9464"
SCRAPE = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    sys.stdout.write(response.read().decode())
"""


def scrape(host: Host) -> MetricSamples:
    done = host.run(str(BIN / "python"), "-c", SCRAPE, f"http://{ENDPOINT}/metrics")
    assert done.returncode == 0, done.stderr
    return metric_samples(done.stdout)


def test_serve_metrics_are_scraped_over_http_and_grow(lan: LanFactory, tmp_path: Path) -> None:
    net = lan(1)
    host = net.hosts[0]
    release = Release.make(tmp_path, 2 * MB, chunk="256K")
    sender = serve(host, release, "--rate", "2M", "--metrics", ENDPOINT, ready=True)
    try:
        first = scrape(host)
        time.sleep(1.5)
        second = scrape(host)
        # A second sender on the same port: refused at once, before encoding anything.
        again = subprocess.run(
            serve_command(host, release, tmp_path / "cache2", "--metrics", ENDPOINT),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        stop([sender])
    assert first[("otacast_sender_serving", ())] == 1
    groups = {
        dict(labels)["group"] for name, labels in first if name == "otacast_sender_bytes_total"
    }
    # The carousel's group and the index group's (the raw image's block index alone, at the
    # default 4% of the rate, which the carousel gives up).
    transport = parse_envelope(release.manifest.read_bytes()).manifest.transport
    index_group = addressing.ssm_group(transport.channel, transport.scope, 254)
    assert groups == {transport.ssm_group, index_group}
    group = (("group", transport.ssm_group),)
    for name in ("bytes_total", "passes_total", "auth_pages_total", "auth_bytes_total"):
        assert ("otacast_sender_" + name, group) in first, name
    assert first[("otacast_sender_rate_target_bytes_per_second", group)] == 1_920_000
    rate = ("otacast_sender_rate_target_bytes_per_second", (("group", index_group),))
    assert first[rate] == 80_000
    data = ("otacast_sender_packets_total", (*group, ("kind", "data")))
    assert second[data] > first[data] > 0
    sent = ("otacast_sender_bytes_total", group)
    # 1.5 s at 2 MB/s between the scrapes; a third of that is ample margin on a busy machine.
    assert second[sent] - first[sent] > 1 * MB
    assert second[("otacast_sender_rate_reached_bytes_per_second", group)] > 0
    assert ("process_resident_memory_bytes", ()) in second
    assert again.returncode == 2, again.stderr
    assert again.stderr.count("\n") == 1 and "--metrics" in again.stderr, again.stderr


def test_watch_writes_a_textfile_after_it_installs(lan: LanFactory, tmp_path: Path) -> None:
    net = lan(2)
    sender_host, device = net.hosts
    release = Release.make(tmp_path / "v1", 2 * MB, sequence=1, chunk="256K")
    target = tmp_path / "slot.img"
    state = tmp_path / "state"
    prom = tmp_path / "textfile" / "otacast.prom"
    config = tmp_path / "otacast.toml"
    write_config(config, release, sender_host.address, state, f"file:{target}")
    with config.open("a") as handle:
        handle.write(f'metrics_file = "{prom}"\n')
    daemon = Daemon(device, config)
    sender = serve(sender_host, release, "--rate", "20M", "--duration", "120s")
    try:
        daemon.wait_for("installed")
        deadline = time.monotonic() + 10
        while not prom.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        got = metric_samples(prom.read_text())
    finally:
        stop([sender])
        daemon.terminate()
    installed = [(dict(k[1]), v) for k, v in got.items() if k[0].endswith("installed_sequence")]
    assert len(installed) == 1, installed
    labels, sequence = installed[0]
    assert sequence == 1
    assert labels["channel"] == CHANNEL and labels["name"], labels
    assert got[("otacast_device_turns_total", (("outcome", "installed"),))] == 1
    assert got[("otacast_device_bytes_total", (("path", "multicast"),))] > 0
    assert got[("otacast_device_state", (("state", "idle"),))] == 1
