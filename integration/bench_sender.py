"""Sender benchmark: prints numbers, asserts nothing.

    python integration/bench_sender.py [--seconds 3] [--big-image 1G] [--quick]

On a two-host namespaced LAN (veth pairs through a bridge; MTU 9000 for the jumbo rows) it runs
``otacast-signer serve --rate max`` and reports, for 1228-byte and 8948-byte datagrams with UDP
GSO on and off: packets/s, MB/s, and CPU seconds per MB sent (user + system, from the sender's
own rusage), with one member joined on the other host.  It then serves one pass of a large
image and reports the sender's peak resident memory, encoding included.  Everything runs inside
namespaces this script creates and deletes.

Reading the GSO rows: on veth and a bridge a segmented send stays one packet until the
receiving host's UDP layer splits it (seen: 51,620 IP packets carrying 2,651,483 datagrams), so
these rows are what a virtual link allows.  On a NIC without UDP segmentation offload the
kernel splits at the sender and the rate is lower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.netns import BIN, Lan, stop
from integration.release import Release, serve_command
from otacast.schemas import units
from otacast.schemas.manifest import parse_envelope

CHUNK = "4M"


def make_release(work: Path, size: int, symbol_size: int, name: str) -> Release:
    return Release.make(
        work / name, size, sequence=1, chunk=CHUNK, extra=("--symbol-size", str(symbol_size))
    )


# A member that joins the group and never reads: the kernel must segment and deliver every
# datagram to it (without a member, a GSO super-packet can be dropped unsegmented, which would
# flatter the sender), but no user-space reader competes with the sender for the CPU.
JOIN_ONLY = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 29, 0)
s.bind(("::", int(sys.argv[2])))
g = socket.inet_pton(socket.AF_INET6, sys.argv[1])
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
             g + struct.pack("@I", socket.if_nametoindex("eth0")))
time.sleep(float(sys.argv[3]))
"""


def run_sender(lan: Lan, release: Release, cache: Path, *extra: str) -> dict[str, float]:
    """Run serve in the first host, with a joined member in the second; summary plus rusage."""
    transport = parse_envelope(release.manifest.read_bytes()).manifest.transport
    member = lan.hosts[1].popen(
        str(BIN / "python"), "-c", JOIN_ONLY, transport.ssm_group, str(transport.port), "3600"
    )
    time.sleep(0.2)
    try:
        return _run_sender(lan, release, cache, *extra)
    finally:
        stop([member])


def _run_sender(lan: Lan, release: Release, cache: Path, *extra: str) -> dict[str, float]:
    process = subprocess.Popen(
        serve_command(lan.hosts[0], release, cache, "--rate", "max", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # `ip netns exec` execs the command, so this pid is the sender itself.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    out = process.stdout.read() if process.stdout else ""
    err = process.stderr.read() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"sender failed: {err.strip()}")
    finished = [json.loads(line) for line in out.splitlines()][-1]
    return {
        "elapsed": finished["elapsed"],
        "packets": finished["packets"],
        "bytes": finished["bytes"],
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss_mb": finished["peak_rss_mb"],
        "gso": float(all(c["gso"] for c in finished["channels"])),
    }


def throughput(work: Path, seconds: float, size: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for symbol_size, mtu in ((1208, 1500), (8928, 9000)):
        release = make_release(work, size, symbol_size, f"t{symbol_size}")
        with Lan.create(2, mtu=mtu) as lan:
            cache = work / f"cache{symbol_size}"
            run_sender(lan, release, cache, "--loops", "1")  # warm the symbol cache
            for gso in (True, False):
                extra = ["--duration", f"{seconds:g}s"] + ([] if gso else ["--no-gso"])
                r = run_sender(lan, release, cache, *extra)
                mb = r["bytes"] / 1e6
                rows.append(
                    {
                        "datagram": symbol_size + 20,
                        "gso": "on" if r["gso"] else "off",
                        "pps": round(r["packets"] / r["elapsed"]),
                        "MB/s": round(mb / r["elapsed"], 1),
                        "cpu_s_per_MB": round(r["cpu"] / mb, 5),
                    }
                )
    return rows


def memory(work: Path, size: int) -> dict[str, object]:
    release = make_release(work, size, 1208, "big")
    with Lan.create(2) as lan:
        started = time.monotonic()
        r = run_sender(lan, release, work / "cache-big", "--loops", "1")
        wall = time.monotonic() - started
    return {
        "image": units.format_bytes(size),
        "peak_rss_MB": round(r["maxrss_mb"], 1),
        "encode_and_one_pass_s": round(wall, 1),
        "pass_MB/s": round(r["bytes"] / 1e6 / r["elapsed"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--big-image", default="1G")
    parser.add_argument("--quick", action="store_true", help="small images, 1 s runs (for CI)")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    big = units.parse_size("64M" if args.quick else args.big_image)
    work = Path(tempfile.mkdtemp(prefix="otacast-bench-"))
    try:
        rows = throughput(work, seconds, 32 << 20)
        print(f"{'datagram':>8} {'gso':>4} {'packets/s':>10} {'MB/s':>8} {'CPU s/MB':>9}")
        for row in rows:
            print(
                f"{row['datagram']:>8} {row['gso']:>4} {row['pps']:>10} {row['MB/s']:>8} "
                f"{row['cpu_s_per_MB']:>9}"
            )
        mem = memory(work, big)
        print(
            f"peak RSS serving a {mem['image']} image (encode + one pass): "
            f"{mem['peak_rss_MB']} MB; {mem['encode_and_one_pass_s']} s wall, "
            f"pass at {mem['pass_MB/s']} MB/s"
        )
        print(json.dumps({"throughput": rows, "memory": mem}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
