"""Routed SSM: a release crosses a real multicast router (smcroute) to a device that found its
sender by DNS SRV, and a link the stream is not routed to receives none of it.  On a kernel
without IPv6 multicast routing the router forwards by nftables rules instead (integration/
routed.py); the test prints which one ran."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from otacast.schemas import addressing

from . import services
from .netns import stop
from .release import CHANNEL, Release, fetch, serve
from .routed import MRoute, Routed, SmcrouteMissing

MB = 1_000_000
IMAGE_BYTES = 4 * MB


@pytest.fixture
def net() -> Iterator[Routed]:
    with Routed.create() as net:
        yield net


def test_a_release_crosses_an_ssm_router_and_an_unrouted_link_gets_none_of_it(
    net: Routed, tmp_path: Path
) -> None:
    release = Release.make(tmp_path / "release", IMAGE_BYTES)
    tx, rx = net.hosts["tx"], net.hosts["rx"]
    group = addressing.ssm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    records = [
        f"--srv-host=_otacast._udp.{CHANNEL},tx.example.test,4242,10,5",
        f"--host-record=tx.example.test,{tx.address}",
        "--local=/example.test/",
    ]
    route = MRoute("rt_tx", tx.address, group, "rt_rx")
    idle_before = net.rx_bytes("idle")
    try:
        with (
            net.multicast_routes([route], tmp_path) as forwarding,
            services.dnsmasq(rx, records, tmp_path / "dnsmasq.log") as resolver,
        ):
            sender = serve(tx, release, "--rate", "20M", "--duration", "120s", ready=True)
            try:
                code, events, err = fetch(
                    rx, release, tmp_path / "state", tmp_path / "out.img", "--resolver", resolver
                )
            finally:
                stop([sender])
            forwarded = forwarding.forwarded_bytes(route)
    except (services.ServiceMissing, SmcrouteMissing) as exc:
        pytest.skip(str(exc))
    print(f"\nrouted by {forwarding.kind}: {forwarded} bytes forwarded")
    idle_received = net.rx_bytes("idle") - idle_before
    assert code == 0, err
    summary = events[-1]
    assert summary["event"] == "finished"
    assert summary["joins"] == [f"({tx.address}, {group})"]
    assert summary["bytes_multicast"] == IMAGE_BYTES and summary["bytes_http"] == 0
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    # The router forwarded the stream along its (S,G) route.
    assert forwarded >= IMAGE_BYTES
    # The unrouted link saw at most neighbour-discovery chatter, not the stream.
    assert idle_received < 20_000, idle_received
