"""Zero-config on one LAN: `otacast-signer serve` with its defaults and `otacast fetch` with only
``--channel`` (no SRV records, no ``--source``) meet; the sender's announcements on the ASM
group cost a few datagrams a second; and when nothing is heard the error names the next step."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from otacast.plugin.errors import NoManifestError
from otacast.schemas import addressing

from . import services
from .netns import BIN, LanFactory, stop
from .release import CHANNEL, Release, fetch, serve, serve_command, summary_of

MB = 1_000_000
RAWRECV = str(Path(__file__).with_name("rawrecv.py"))
# A resolver nothing listens on: the lookup fails at once (ICMP port unreachable), as DNS does
# on a LAN without a server.
NO_DNS = "[::1]:9"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return Release.make(tmp_path_factory.mktemp("release"), 6 * MB, chunk="1M")


@pytest.mark.parametrize("dns", ["no-records", "dns-down"])
def test_serve_and_fetch_with_their_defaults_meet_on_a_lan_without_dns_records(
    lan: LanFactory, release: Release, tmp_path: Path, dns: str
) -> None:
    sender, receiver = lan(2).hosts
    tx = serve(sender, release, "--rate", "20M", "--duration", "120s", ready=True)
    try:
        if dns == "no-records":  # a DNS server for the channel's domain, without SRV records
            log, local = tmp_path / "dnsmasq.log", [f"--local=/{CHANNEL}/"]
            with services.dnsmasq(receiver, local, log) as resolver:
                code, events, err = fetch(
                    receiver,
                    release,
                    tmp_path / "state",
                    tmp_path / "out.img",
                    "--resolver",
                    resolver,
                )
        else:
            code, events, err = fetch(
                receiver, release, tmp_path / "state", tmp_path / "out.img", "--resolver", NO_DNS
            )
    finally:
        stop([tx])
    assert code == 0, err
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    ssm = addressing.ssm_group(CHANNEL)
    summary = summary_of(events)
    assert summary["joins"] == [
        f"(*, {addressing.asm_group(CHANNEL)})",
        f"({sender.address}, {ssm})",
    ]
    assert summary["bytes_http"] == 0
    notes = [e.get("message", "") for e in events if e.get("event") == "note"]
    said = "no SRV records for" if dns == "no-records" else "DNS discovery failed"
    assert any(str(n).startswith(said) for n in notes), notes


def test_announcements_come_from_the_senders_address_at_a_few_datagrams_a_second(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    net = lan(3)
    sender = net.hosts[0]
    seconds = 6.0
    listen = [
        listener.popen(
            str(BIN / "python"),
            RAWRECV,
            "eth0",
            group,
            "4242",
            str(seconds),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for listener, group in zip(
            net.hosts[1:],
            (addressing.asm_group(CHANNEL), addressing.ssm_group(CHANNEL)),
            strict=True,
        )
    ]
    time.sleep(0.3)
    tx = subprocess.Popen(
        serve_command(sender, release, tmp_path / "cache", "--rate", "10M", "--duration", "5s"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = [json.loads(p.communicate(timeout=60)[0]) for p in listen]
        out, err = tx.communicate(timeout=60)
    finally:
        stop([*listen, tx])
    assert tx.returncode == 0, err
    announcing = [json.loads(line) for line in out.splitlines() if '"announcing"' in line]
    assert len(announcing) == 1 and announcing[0]["source"] == sender.address
    asm, ssm = seen
    # Each announcement is the FLUTE FDT, then the manifest fragments, as on the channel.
    assert asm["kinds"]["fdt"] > 0
    added = asm["kinds"]["manifest"] + asm["kinds"]["fdt"]
    assert asm["per_source"] == {sender.address: added}
    assert asm["problems"] == {} and "data" not in asm["kinds"]
    assert asm["manifest_session"] == ssm["manifest_session"] is not None
    sent = sum(ssm["kinds"].values())
    print(
        f"announcements: {added} datagrams in ~5 s beside {sent} on the channel "
        f"({added / 5:.1f}/s, {added / sent:.3%} more datagrams at 10 MB/s)"
    )
    assert 0 < added / 5 <= 5  # one FDT and manifest of a few datagrams every 2 s


def test_nothing_heard_on_a_lan_names_the_next_step_and_exits_45(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    (receiver,) = lan(1).hosts
    code, _, err = fetch(
        receiver,
        release,
        tmp_path / "state",
        tmp_path / "out.img",
        "--resolver",
        NO_DNS,
        "--join-timeout",
        "1",
    )
    assert code == NoManifestError.exit_code == 45, err
    asm = addressing.asm_group(CHANNEL)
    assert f"no sender announced itself on ASM group {asm} port 4242 on interface eth0" in err
    assert f"check that `otacast-signer serve` runs for {CHANNEL} on this link" in err
    assert "_otacast._udp.updates.example.test" in err and "--source" in err
    assert "--manifest with an HTTP mirror" in err


def test_every_sender_announcing_on_the_lan_is_followed_and_their_symbols_add_up(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    net = lan(3)
    senders, receiver = net.hosts[:2], net.hosts[2]
    # Slow enough (one sender alone would take 3 s) that both announce (every 2 s) before the
    # image is complete.
    txs = [
        serve(host, release, "--rate", "2M", "--sender", f"{i}/2", "--duration", "120s", ready=True)
        for i, host in enumerate(senders)
    ]
    try:
        code, events, err = fetch(
            receiver, release, tmp_path / "state", tmp_path / "out.img", "--resolver", NO_DNS
        )
    finally:
        stop(txs)
    assert code == 0, err
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    ssm = addressing.ssm_group(CHANNEL)
    joins = summary_of(events)["joins"]
    assert sorted(joins[1:]) == sorted(f"({h.address}, {ssm})" for h in senders), joins  # type: ignore[index]


# A receiver following two sources, then refused a join it cannot hold: prints what it holds,
# the kernel's source filters for the group, and the errors.
ADD_JOIN = """
import json, sys
from pathlib import Path
from otacast.plugin.errors import NetworkError
from otacast.plugin.transport import Join, MulticastReceiver
group, other = sys.argv[1], sys.argv[2]
errors = []
with MulticastReceiver("eth0", 4242, [Join(group, "fd51::1")]) as rx:
    rx.add_join(Join(group, "fd51::2"))
    for join in (Join(group, "fd51::2"), Join(other, "fd51::3"), Join(group)):
        try:
            rx.add_join(join)
        except NetworkError as exc:
            errors.append(str(exc))
    filters = [line.split() for line in Path("/proc/net/mcfilter6").read_text().splitlines()[1:]]
    print(json.dumps({
        "joins": [[j.group, j.source] for j in rx.joins],
        "filtered": sorted(f[3] for f in filters if f[1] == "eth0"),
        "errors": errors,
    }))
"""


def test_a_follower_socket_adds_source_joins_of_its_group_only(lan: LanFactory) -> None:
    (host,) = lan(1).hosts
    ssm, asm = addressing.ssm_group(CHANNEL), addressing.asm_group(CHANNEL)
    done = host.run(str(BIN / "python"), "-c", ADD_JOIN, ssm, asm)
    assert done.returncode == 0, done.stderr
    held = json.loads(done.stdout)
    assert held["joins"] == [[ssm, "fd51::1"], [ssm, "fd51::2"]]
    # /proc/net/mcfilter6 prints addresses as 32 hex digits: both sources are in the filter.
    assert held["filtered"] == [
        "fd510000000000000000000000000001",
        "fd510000000000000000000000000002",
    ]
    twice, elsewhere, any_source = held["errors"]
    assert "listed twice" in twice
    assert f"this socket receives {ssm} only" in elsewhere
    assert "both for any source and per source" in any_source
