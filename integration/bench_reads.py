"""Receive-path benchmark: CPU per datagram of the device's socket reads; prints, asserts nothing.

    python integration/bench_reads.py [--datagrams 40000] [--repeat 3]

On a two-host namespaced LAN a sender queues a burst of 1228-byte datagrams (one ``sendto``
each, no GSO) in the receiver's socket, then the receiver drains the queue and reports the CPU
time of the drain per datagram: the receive loop's ``_drain`` with the copy into ``bytes`` it
hands to its core, the core left out.  Ways compared, each on plain veths and on veths with UDP
GRO turned on as a physical NIC has it (``integration/netns.py``):

* ``recv_into, before``: the drain and ``MulticastReceiver.recv_into`` before batched reads,
  reproduced (one ``recvfrom_into`` with MSG_TRUNC per datagram, ``bytes(buffer[:n])``);
* ``recv_batch, no GRO``: `MulticastReceiver.recv_batch` on a socket without UDP_GRO (the
  fallback where the kernel has none);
* ``recv_batch, GRO``: `MulticastReceiver.recv_batch` with UDP_GRO, as the receiver runs.

The runs alternate and the median of ``--repeat`` is printed: the machine is shared, and one
run's figure may be off by half.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.netns import BIN, Lan

PYTHON = str(BIN / "python")
GROUP = "ff3e::8000:5151"
PORT = 4244
SIZE = 1228
WAYS = ("recv_into, before", "recv_batch, no GRO", "recv_batch, GRO")

# Joins, says ready, waits for a line on stdin (the burst is queued), drains, prints JSON.
RECEIVER = """
import json, socket, sys, time
from otacast.plugin.transport import Join, MulticastReceiver
MAX_BURST = 512
way = sys.argv[1]
rx = MulticastReceiver("eth0", int(sys.argv[2]), [Join(sys.argv[3])], rcvbuf=256 << 20,
                       gro=way == "recv_batch, GRO")
sock = socket.socket(fileno=rx.fileno())

def recv_into(buffer):  # MulticastReceiver.recv_into before recv_batch, as it was
    while True:
        try:
            length, sender = sock.recvfrom_into(buffer, 0, socket.MSG_TRUNC)
        except BlockingIOError:
            return None
        if length > len(buffer):
            continue
        return length, str(sender[0])

def receive(data, source):  # the core's place
    global count
    count += 1

print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.3)
count, busy = 0, True
start = time.process_time()
if way == "recv_into, before":
    buffer = bytearray(8953)
    while busy:  # the receive loop's _drain before recv_batch, as it was
        for _ in range(MAX_BURST):
            got = recv_into(buffer)
            if got is None:
                busy = False
                break
            size, source = got
            receive(bytes(buffer[:size]), source)
    reads = count
else:
    while busy:  # the receive loop's _drain
        left = MAX_BURST
        while left > 0:
            got = rx.recv_batch()
            if got is None:
                busy = False
                break
            datagrams, source = got
            left -= len(datagrams) or 1
            for datagram in datagrams:
                receive(bytes(datagram), source)
    reads = rx.reads
cpu = time.process_time() - start
sock.detach()
print(json.dumps({"datagrams": count, "reads": reads, "cpu": cpu}), flush=True)
"""

# Sends argv[3] datagrams of SIZE bytes, pausing briefly every 40 so the queue is not overrun.
SENDER = """
import socket, sys, time
group, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
payload = bytes(size)
for i in range(count):
    s.sendto(payload, (group, port, 0, ifindex))
    if i % 40 == 39:
        time.sleep(0.0002)
"""


def drain(lan: Lan, way: str, count: int) -> dict[str, float]:
    sender, device = lan.hosts
    rx = device.popen(
        PYTHON,
        "-c",
        RECEIVER,
        way,
        str(PORT),
        GROUP,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert rx.stdin is not None and rx.stdout is not None
    rx.stdout.readline()
    subprocess.run(
        sender.command(PYTHON, "-c", SENDER, GROUP, str(PORT), str(count), str(SIZE)), check=True
    )
    rx.stdin.write("go\n")
    rx.stdin.flush()
    report: dict[str, float] = json.loads(rx.stdout.readline())
    rx.wait(10)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=40000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    for gro in (False, True):
        with Lan.create(2, gro=gro) as lan:
            for _ in range(args.repeat):
                for way in WAYS:
                    results.setdefault(f"{way} | veth GRO {'on' if gro else 'off'}", []).append(
                        drain(lan, way, args.datagrams)
                    )
                    time.sleep(0.1)
    print(f"{args.datagrams} datagrams of {SIZE} bytes, median of {args.repeat} runs")
    print(f"{'read':<36} {'CPU us/datagram':>16} {'datagrams/read':>15} {'received':>9}")
    summary = {}
    for name, runs in results.items():
        per = statistics.median(r["cpu"] / max(1, r["datagrams"]) * 1e6 for r in runs)
        batch = statistics.median(r["datagrams"] / max(1, r["reads"]) for r in runs)
        got = min(int(r["datagrams"]) for r in runs)
        summary[name] = {"cpu_us_per_datagram": round(per, 3), "datagrams_per_read": batch}
        print(f"{name:<36} {per:>16.3f} {batch:>15.1f} {got:>9}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
