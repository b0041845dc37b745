"""UDP GRO on the device's receive socket against a real kernel: coalesced reads, every
datagram intact.

A `Lan` with ``gro=True`` has GRO turned on for its veths as a physical NIC has it
(``integration/netns.py``).  A sender in one namespace sends a burst to the group, with UDP GSO
(the kernel hands a GSO batch on whole) or as single datagrams (the receiving veth's GRO
coalesces them); the receiver reads with `MulticastReceiver.recv_batch` and reports what each
datagram hashed to and how many reads it took.  Last, ``otacast fetch`` receives an image over
such a link, through random loss applied before GRO, and says how many reads it made.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .netns import BIN, LanFactory, stop
from .release import Release, dropped, fetch, random_loss, serve, summary_of

PYTHON = str(BIN / "python")
GROUP = "ff3e::8000:4321"
PORT = 4243
SEGMENT = 1000
BATCH = 20  # datagrams per GSO send: the last of each is shorter
BATCHES = 10

# Prints {"ready": ...} once joined, then reads until the datagram b"stop" (or 20 s), and
# prints each datagram's length and sha256, the reads that returned them and the truncated count.
RECEIVER = """
import hashlib, json, select, sys, time
from otacast.plugin.transport import Join, MulticastReceiver
group, port, gro = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
with MulticastReceiver("eth0", port, [Join(group)], gro=gro) as rx:
    print(json.dumps({"ready": True, "gro": rx.gro}), flush=True)
    got, reads, largest, done = [], 0, 0, False
    end = time.monotonic() + 20
    while not done and (left := end - time.monotonic()) > 0:
        select.select([rx], [], [], left)
        while (item := rx.recv_batch()) is not None:
            payloads = [bytes(d) for d in item[0]]
            if payloads == [b"stop"]:
                done = True
                break
            reads += 1
            largest = max(largest, len(payloads))
            got += [[len(p), hashlib.sha256(p).hexdigest()] for p in payloads]
    print(json.dumps({"got": got, "reads": reads, "largest": largest,
                      "truncated": rx.truncated}), flush=True)
"""

# Sends BATCHES x BATCH numbered datagrams to the group (with GSO: one send per batch), then
# b"stop" on its own after a pause, so the stop is never coalesced with the burst.
SENDER = """
import socket, sys, time
group, port, gso = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
segment, batch, batches = map(int, sys.argv[4:])
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
destination = (group, port, 0, ifindex)
def payload(n, length):
    return (b"%06d:" % n + bytes([n % 251]) * length)[:length]
n = 0
for _ in range(batches):
    datagrams = []
    for i in range(batch):
        datagrams.append(payload(n, segment if i < batch - 1 else segment // 2))
        n += 1
    if gso:
        s.setsockopt(socket.SOL_UDP, 103, segment)  # UDP_SEGMENT
        s.sendto(b"".join(datagrams), destination)
    else:
        for datagram in datagrams:
            s.sendto(datagram, destination)
time.sleep(0.3)
if gso:
    s.setsockopt(socket.SOL_UDP, 103, 0)
s.sendto(b"stop", destination)
"""


def expected() -> list[list[object]]:
    """[length, sha256] of every datagram SENDER sends, in order."""
    out: list[list[object]] = []
    for n in range(BATCH * BATCHES):
        length = SEGMENT if n % BATCH < BATCH - 1 else SEGMENT // 2
        data = (b"%06d:" % n + bytes([n % 251]) * length)[:length]
        out.append([length, hashlib.sha256(data).hexdigest()])
    return out


def burst(lan: LanFactory, gso: bool, gro: bool = True) -> dict[str, object]:
    """What the receiver reported for one burst on a new GRO-enabled LAN; `gro` false makes
    the receiver read as where the kernel has no UDP_GRO."""
    sender, device = lan(2, gro=True).hosts
    rx = device.popen(
        PYTHON,
        "-c",
        RECEIVER,
        GROUP,
        str(PORT),
        "1" if gro else "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert rx.stdout is not None
        ready = json.loads(rx.stdout.readline())
        assert ready["gro"] == gro, "the kernel refused UDP_GRO"
        args = (GROUP, str(PORT), "1" if gso else "0", str(SEGMENT), str(BATCH), str(BATCHES))
        sent = sender.run(PYTHON, "-c", SENDER, *args)
        assert sent.returncode == 0, sent.stderr
        report: dict[str, object] = json.loads(rx.stdout.readline())
    finally:
        stop([rx])
    return report


def test_a_gso_burst_is_read_coalesced_with_every_datagram_intact_and_in_order(
    lan: LanFactory,
) -> None:
    report = burst(lan, gso=True)
    assert report["got"] == expected()
    assert report["truncated"] == 0
    assert isinstance(report["reads"], int) and report["reads"] < BATCH * BATCHES
    assert isinstance(report["largest"], int) and report["largest"] > 1


def test_single_datagrams_are_coalesced_by_the_receiving_veth_and_arrive_intact(
    lan: LanFactory,
) -> None:
    report = burst(lan, gso=False)
    assert report["got"] == expected()
    assert report["truncated"] == 0
    assert isinstance(report["reads"], int) and report["reads"] < BATCH * BATCHES
    assert isinstance(report["largest"], int) and report["largest"] > 1


def test_without_udp_gro_a_gso_burst_is_read_one_intact_datagram_at_a_time(
    lan: LanFactory,
) -> None:
    # The fallback where the kernel has no UDP_GRO: it splits the batch before queueing it.
    report = burst(lan, gso=True, gro=False)
    assert report["got"] == expected()
    assert report["truncated"] == 0
    assert report["reads"] == BATCH * BATCHES and report["largest"] == 1


def test_fetch_through_loss_on_a_gro_link_reads_in_batches_and_writes_the_image_intact(
    lan: LanFactory, tmp_path: Path
) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nftables (nft) is not installed")
    sender, receiver = lan(2, gro=True).hosts
    release = Release.make(tmp_path / "release", 8_000_000)
    random_loss(receiver, 10)  # at the switch port: datagrams, not coalesced runs, are lost
    tx = serve(sender, release, "--rate", "20M", "--no-gso", "--duration", "120s")
    try:
        code, events, err = fetch(
            receiver, release, tmp_path / "state", tmp_path / "out.img", "--source", sender.address
        )
    finally:
        stop([tx])
    assert code == 0, err
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    summary = summary_of(events)
    assert isinstance(summary["reads"], int) and isinstance(summary["datagrams"], int)
    assert 0 < summary["reads"] < summary["datagrams"]
    assert "oversized" not in summary["rejected"]  # type: ignore[operator]
    assert dropped(receiver) > 0
