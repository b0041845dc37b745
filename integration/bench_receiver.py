"""Receiver benchmark: prints numbers, asserts nothing.

    python integration/bench_receiver.py [--size 64M] [--big-image 1G] [--rate 120M] [--quick]
        [--gro on|off|both] [--symbols store,memory] [--losses 0,5,20] [--no-auth]
        [--compare EXE] [--rounds 1] [--pin] [--cpu-limits 100,20,10]

On a two-host namespaced LAN a sender loops a release at a fixed paced rate and ``otacast
fetch`` receives it, with 0%, 5% and 20% of datagrams dropped at random by nftables in the
receiver's namespace (the sender runs without GSO so each datagram is dropped on its own).  The
receiver joins first and the sender starts after, on a first start (`release.first_start`: every
chunk's source symbols first), so every run sees the stream from its start.
For each loss rate, and each way of keeping symbols named by ``--symbols`` (the receiver's
``--symbols``, run one after the other for each loss rate so that both see the same machine
load), it reports goodput (image bytes / time from the first datagram to the
verified image, so process start-up is not counted), the
receiver's CPU seconds per MB (its rusage, which includes its decode worker process's, a child
it waits for), datagrams received / K, and two efficiency figures:

* FEC: symbols the decoders used / K (the fountain code's own overhead);
* wire: datagrams that reached the receiver's link (received + dropped) / the ideal K/(1-p).
  This includes symbols sent for chunks the receiver had already finished (the rest of a
  round's visits) and datagrams its full socket buffer dropped, as well as the code.

``--pin`` puts the receiver (and any process it starts: they inherit its CPUs) on CPU 1 alone
and the sender on CPU 0: the goodput of a device with one core.  ``--cpu-limits`` runs every
row once per share of that core given (percent; 100: the whole core), the receiver and its
decode worker held to it by the kernel's CPU bandwidth control (`integration.cpulimit`; it
implies ``--pin``): a device too slow for the stream, which must still converge, its socket
buffer's drops being just more loss.  Beyond the repair pool's share of loss (a third) such a
receiver also hears symbols again once the sender's cycles wrap.  The kernel's receive path on
the veths runs where the datagram was sent (CPU 0) and is not in the receiver's CPU figures.

Then it receives a large image once at 0% loss and reports the receiver's peak resident memory
(peak RSS: the receiver's plus its decode worker's, each its own VmHWM).

``--decode inline,worker`` runs every row with this checkout's receiver once per way of decoding
(``otacast fetch --decode``; its rows are named after it, ``this`` for inline).
``--compare EXE`` runs every loss row twice in a row, with this checkout's ``otacast`` and with
the executable ``EXE`` (another version's, e.g. a script that runs ``otacast.plugin.cli`` of an
extracted ``git archive main`` through ``PYTHONPATH``), so that both see the same machine load;
``--rounds N`` repeats the rows N times (the machine is shared: compare within a round).  The
``user s``/``sys s`` columns split the receiver's CPU.

The veths have UDP GRO turned on as a physical NIC has it (``--gro on``, ``integration/netns.py``;
the loss is then applied at the switch, before GRO coalesces); ``--gro off`` gives plain veths,
one datagram per read, and ``--gro both`` runs the loss rows both ways in one run.  The
``dgrams/read`` column is the receiver's datagrams per socket read (its ``reads`` counter), and
``CPU us/dgram`` its CPU time over the datagrams it took in: unlike CPU per MB, it does not
grow with the datagrams a receiver that fell behind took in for chunks already complete.
``decoded`` is the summary's ``chunks_decoded``.  ``port drops`` counts what the switch's port
towards the receiver dropped during the row (with GRO on: the veth could not queue into the
receiver's ring while its poll waited for a busy core): loss that no rule made, which makes a
"0%" row lossy when the sender and the receiver share cores (``--pin`` avoids it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.cpulimit import MIN_PERCENT, CpuLimit, cpu_limit
from integration.netns import Host, Lan, stop
from integration.release import (
    Release,
    clear_loss,
    compile_bytecode,
    dropped,
    first_start,
    keygen,
    random_loss,
    serve,
    start_fetch,
)
from otacast.schemas import units
from otacast.schemas.manifest import parse_envelope


def receive(
    lan: Lan,
    release: Release,
    work: Path,
    rate: str,
    loss: int,
    rx_args: tuple[str, ...] = (),
    tx_args: tuple[str, ...] = (),
    device: str | None = None,
    pin: bool = False,
    limit: tuple[CpuLimit, int] | None = None,
) -> dict[str, float | str]:
    sender, receiver = lan.hosts
    clear_loss(receiver)
    if loss:
        random_loss(receiver, loss)
    out = work / "out.img"
    rx = start_fetch(
        receiver, release, work / "state", out, "--source", sender.address, *rx_args, device=device
    )
    if pin:
        # Before it starts any worker: a child process inherits its parent's CPUs.
        os.sched_setaffinity(rx.pid, {1})
    if limit is not None:
        group, percent = limit
        group.set(percent)
        group.add(rx.pid)  # (its worker, started later, joins its group)
    time.sleep(0.5)  # joined
    first_start(release.directory / f"cache-{sender.netns}")  # the device waits for the sender
    port_before = port_drops(receiver)
    tx = serve(sender, release, "--rate", rate, "--no-gso", "--duration", "600s", *tx_args)
    if pin:
        os.sched_setaffinity(tx.pid, {0})
    try:
        # `ip netns exec` execs the command, so this pid is the receiver itself.
        _, status, usage = os.wait4(rx.pid, 0)
        port_after = port_drops(receiver)
        rx.returncode = os.waitstatus_to_exitcode(status)
        stdout = rx.stdout.read() if rx.stdout else ""
        stderr = rx.stderr.read() if rx.stderr else ""
    finally:
        stop([tx])
    if rx.returncode != 0:
        raise SystemExit(f"fetch failed ({rx.returncode}): {stderr.strip()}")
    summary = [json.loads(line) for line in stdout.splitlines()][-1]
    if out.read_bytes() != release.image.read_bytes():
        raise SystemExit("the received image differs")
    out.unlink()
    manifest = parse_envelope(release.manifest.read_bytes()).manifest
    k = sum(manifest.source_symbols(i) for i in range(manifest.chunk_count))
    mb = manifest.image.length / 1e6
    lost = dropped(receiver) if loss else 0
    return {
        "loss": loss,
        "cpu_limit_%": 100 if limit is None else limit[1],
        "chunks_decoded": summary.get("chunks_decoded", ""),
        "port_drops": "" if port_before is None or port_after is None else port_after - port_before,
        "goodput_MB/s": round(mb / summary["receiving"], 1),
        "cpu_s_per_MB": round((usage.ru_utime + usage.ru_stime) / mb, 4),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "fec_used/K": round(summary["symbols_used"] / k, 4),
        "wire/ideal": round((summary["datagrams"] + lost) / (k / (1 - loss / 100)), 3),
        # Both processes: the receiver's and its decode worker's (`otacast.plugin.decode_worker`;
        # its CPU is in the receiver's rusage, which counts the children it waited for).
        "peak_rss_MB": round(summary["peak_rss_mb"] + (summary.get("worker_peak_rss_mb") or 0), 1),
        "worker_rss_MB": summary.get("worker_peak_rss_mb"),
        "received/K": round(summary["datagrams"] / k, 4),
        "dgrams/read": round(summary["datagrams"] / max(1, summary["reads"]), 1),
        "cpu_us_per_dgram": round(
            (usage.ru_utime + usage.ru_stime) / max(1, summary["datagrams"]) * 1e6, 2
        ),
    }


def port_drops(host: Host) -> int | None:
    """Datagrams the switch's port towards `host` dropped so far (its TX ``dropped``: with GRO on
    the link, a veth that cannot queue into its peer's ring, 256 entries, while the peer's NAPI
    poll waits for a busy core), or None where the port is not known (links without GRO)."""
    if host.gro_port is None:
        return None
    switch, port = host.gro_port
    shown = subprocess.run(
        ["ip", "-n", switch, "-s", "-j", "link", "show", port],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return int(json.loads(shown.stdout)[0]["stats64"]["tx"]["dropped"])
    except (ValueError, LookupError, TypeError):
        return None


def packet_auth(lan: Lan, work: Path, size: int, rate: str) -> dict[str, float]:
    """Receiver CPU per MB with packet authentication and without, on one stream (the sender
    sends AUTH pages either way; without, the receiver ignores them), alternating, best of 2."""
    secret, public = keygen(work / "stream")
    release = Release.make(work / "authed", size, extra=("--stream-key", str(public)))
    tx_args = ("--stream-key", str(secret))
    stop([serve(lan.hosts[0], release, "--rate", "max", *tx_args, ready=True)])
    runs: dict[str, list[float]] = {"require": [], "off": []}
    for _ in range(2):
        for policy, cpu in runs.items():
            row = receive(lan, release, work, rate, 0, ("--packet-auth", policy), tx_args)
            cpu.append(float(row["cpu_s_per_MB"]))
    with_auth, without = min(runs["require"]), min(runs["off"])
    print(
        f"packet authentication at 0% loss: receiver CPU {with_auth} s/MB with, {without} s/MB "
        f"without (ratio {with_auth / without:.3f}; target <= 1.15)"
    )
    return {"cpu_s_per_MB_with": with_auth, "cpu_s_per_MB_without": without}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64M")
    parser.add_argument("--big-image", default="1G", help="0: no large-image run")
    parser.add_argument("--rate", default="120M")
    parser.add_argument("--quick", action="store_true", help="16M image, no large-image run")
    parser.add_argument(
        "--gro",
        choices=("on", "off", "both"),
        default="on",
        help="UDP GRO on the veths as on a physical NIC (default), plain veths, or both in turn",
    )
    parser.add_argument(
        "--symbols", default="store", help="the receiver's --symbols, comma-separated"
    )
    parser.add_argument("--losses", default="0,5,20", help="percent, comma-separated")
    parser.add_argument("--no-auth", action="store_true", help="skip the packet-auth runs")
    parser.add_argument(
        "--decode",
        default="inline",
        help="this checkout's --decode (inline, worker), comma-separated: a row for each",
    )
    parser.add_argument("--compare", help="another otacast executable, run after each row")
    parser.add_argument("--rounds", type=int, default=1, help="times each row is run")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the receiver (and any process it starts) on CPU 1 only, the sender on CPU 0: "
        "goodput of a receiver with one core",
    )
    parser.add_argument(
        "--cpu-limits",
        default="100",
        help="percent of one core for the receiver, comma-separated: the rows once per share "
        "(below 100 implies --pin)",
    )
    args = parser.parse_args()
    compile_bytecode()
    limits = [int(x) for x in args.cpu_limits.split(",")]
    if not all(MIN_PERCENT <= x <= 100 for x in limits):
        parser.error(f"--cpu-limits are percentages of one core, {MIN_PERCENT}-100")
    args.pin = args.pin or min(limits) < 100
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two CPUs")
    keeping = args.symbols.split(",")
    # (name, executable, its extra arguments): this checkout once per --decode, then EXE.
    receivers: list[tuple[str, str | None, tuple[str, ...]]] = [
        ("this" if place == "inline" else place, None, ("--decode", place))
        for place in args.decode.split(",")
    ]
    if args.compare:
        receivers.append(("compare", args.compare, ()))
    work = Path(tempfile.mkdtemp(prefix="otacast-rxbench-"))
    modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.gro]
    stack = contextlib.ExitStack()
    try:
        group = (
            stack.enter_context(cpu_limit(f"otacast-bench-{os.getpid()}"))
            if min(limits) < 100
            else None
        )
        size = units.parse_size("16M" if args.quick else args.size)
        release = Release.make(work / "release", size, chunk="")
        result: dict[str, object] = {}
        for gro in modes:
            with Lan.create(2, gro=gro) as lan:
                stop([serve(lan.hosts[0], release, "--rate", "max", ready=True)])  # encode once
                rows = [
                    {
                        "symbols": how,
                        "receiver": name,
                        **receive(
                            lan,
                            release,
                            work,
                            args.rate,
                            loss,
                            ("--symbols", how, *extra),
                            device=exe,
                            pin=args.pin,
                            limit=None if group is None else (group, share),
                        ),
                    }
                    for _ in range(args.rounds)
                    for share in limits
                    for loss in (int(x) for x in args.losses.split(","))
                    for how in keeping
                    for name, exe, extra in receivers
                ]
                print(
                    f"image {units.format_bytes(size)}, sender paced at {args.rate}, "
                    f"1228-byte datagrams, GRO {'on' if gro else 'off'}"
                    + (", receiver pinned to CPU 1, sender to CPU 0" if args.pin else "")
                )
                print(
                    f"{'CPU %':>5} {'loss':>5} {'symbols':>8} {'receiver':>9} {'goodput MB/s':>13} "
                    f"{'CPU s/MB':>9} {'user s':>7} {'sys s':>6} {'FEC used/K':>11} "
                    f"{'wire/ideal':>11} {'received/K':>11} {'peak RSS MB':>12} "
                    f"{'dgrams/read':>12} {'CPU us/dgram':>13} {'decoded':>8} {'port drops':>11}"
                )
                for r in rows:
                    print(
                        f"{r['cpu_limit_%']:>5} {r['loss']:>4}% {r['symbols']:>8} "
                        f"{r['receiver']:>9} {r['goodput_MB/s']:>13} {r['cpu_s_per_MB']:>9} "
                        f"{r['user_s']:>7} "
                        f"{r['sys_s']:>6} {r['fec_used/K']:>11} {r['wire/ideal']:>11} "
                        f"{r['received/K']:>11} {r['peak_rss_MB']:>12} {r['dgrams/read']:>12} "
                        f"{r['cpu_us_per_dgram']:>13} {r['chunks_decoded']:>8} "
                        f"{r['port_drops']:>11}"
                    )
                result["rows_gro" if gro else "rows"] = rows
                if gro != modes[-1]:
                    continue
                if not args.no_auth:
                    result["packet_auth"] = packet_auth(lan, work, size, args.rate)
                if not args.quick and units.parse_size(args.big_image):
                    big = Release.make(work / "big", units.parse_size(args.big_image), chunk="")
                    stop([serve(lan.hosts[0], big, "--rate", "max", ready=True)])
                    for name, exe, extra in receivers:
                        row = receive(lan, big, work, args.rate, 0, extra, device=exe, pin=args.pin)
                        print(
                            f"{units.format_bytes(units.parse_size(args.big_image))} image at 0% "
                            f"loss, {name} receiver: peak RSS {row['peak_rss_MB']} MB (decode "
                            f"worker {row['worker_rss_MB']}), goodput "
                            f"{row['goodput_MB/s']} MB/s, CPU {row['cpu_s_per_MB']} s/MB"
                        )
                        result[f"big_{name}"] = row
        print(json.dumps(result))
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
