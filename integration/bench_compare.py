"""otacast side by side with uftp, udpcast and HTTP: one command, one namespaced network, one run.

    python integration/bench_compare.py [--quick] [--results DIR] [--repeat N] [--tools LIST]
                                        [--sections LIST] [--images SIZES] [--losses LIST]
                                        [--symbols memory|store] [--decode inline|worker]

Needs root (it builds network namespaces; nothing is sent on the host's interfaces) and the
Debian packages nftables, nginx, uftp and udpcast.  It measures, in one run:

1. one sender, one receiver on a bridge, at each image size (50 MB and 500 MB; 8 MiB with
   --quick) and 0%, 5% and 20% random loss (nftables in the receiver's namespace drops arriving
   UDP/TCP packets): time from starting the transfer to the receiver holding the whole image,
   goodput, each tool's own data-phase time, and the UDP/TCP packets the receiver sent (its back
   channel) -- for otacast (serve's default flags: nothing is left to size for the loss; the
   receiver waits for a sender on its first start, `release.first_start`, as uftp's and
   udpcast's wait for theirs), uftp (-R -1, IPv6), udpcast (default, and async + FEC) and HTTP
   (nginx + requests);
2. late join, at each size and 5% loss: the sender starts first and the receiver a seeded
   random 1-3 s later, timed from the receiver's start.  otacast's receiver joins the running
   carousel.  For uftp and udpcast another receiver is listening when the sender starts, so that
   their session begins as for a fleet; they serve the receivers that answered the announcement
   or connected before the data began, so a later one waits: whenever their sender exits
   without the late receiver holding the image, the benchmark starts it again (as a loop or a
   cron job would) and counts the sessions.  HTTP's late join is an ordinary download;
3. received / ideal, for the loss runs and the late joins: otacast's datagrams on the receiver's
   link (received + dropped) / K/(1-p); uftp's and udpcast's data packets that reached the
   receiver's switch port / ceil(image / their block) / (1-p) (control packets apart), and a
   plot of it against loss per image size (``--losses`` sets the sweep);
4. N receivers on one bridge: the sender's CPU and the bytes on its link, otacast vs nginx,
   every receiver's image checked by sha256;
5. two and four otacast senders (--sender I/N, serve's default repair pool) into one receiver:
   speed-up, with the small image.  As issue 12 asks, the senders are started apart (each a
   seeded random 1-3 s after the one before: their carousels keep their phases on the wall
   clock, so they still send disjoint symbols) and the receiver joins the running carousels a
   seeded random 0.5-1.5 s after the last one started, timed from its own start; one sender
   alone is timed the same way;
6. peak RSS of the otacast sender and receiver for a 1 GiB image (not with --quick).

The full plan runs each case 3 times at 50 MB and once at 500 MB (``--repeat`` sets one count
for every size) and takes about half an hour on 2 cores; ``--quick`` about two minutes.  It
prints the tables and the issues' targets (met or missed, by how much; per size and loss:
otacast's start-to-image time against uftp's, with 0 packets from the receiver), and writes
JSON and PNG plots under the results folder.  It exits non-zero only when an image arrived
corrupted or a tool failed to deliver (a no-back-channel tool whose fixed FEC gave up, or a
peer that cannot serve a late receiver, is reported, not failed); speed is reported, never
asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration import compare_report as report
from integration.compare_tools import (
    HTTP_GET,
    Bench,
    BenchError,
    Exit,
    Outcome,
    Plan,
    Proc,
    Processes,
    add_ipv4,
    cpu_ns,
    fetch_argv,
    link_tx_bytes,
    missing_programs,
    run_http,
    run_otacast,
    run_udpcast,
    run_uftp,
    sha256,
    ssm_group,
    udp_overflows,
    wait_joined,
    warm_cache,
)
from integration.netns import BIN, Host, Lan, segment_in_software
from integration.release import Release, compile_bytecode, serve_command
from integration.services import nginx
from otacast.schemas import units
from otacast.schemas.manifest import parse_envelope

TOOLS = ("otacast", "uftp", "udpcast", "udpcast-async", "http")
SECTIONS = ("loss", "late", "fleet", "senders", "memory")
MB = 10**6

# The sizes, 50 MB and 500 MB.  One run of every tool at 0/5/20% loss and a late join
# is estimated at about 2 minutes at 50 MB (measured: otacast and uftp alone, 40 s) and 10 at
# 500 MB (HTTP at 20% loss moved 3.7 MB/s with 100 MiB: over 2 minutes alone), so the full plan
# repeats the 50 MB runs three times and the 500 MB ones once: about half an hour on 2 cores
# with the other sections (an estimate, not yet timed end to end).
FULL = Plan(
    mode="full",
    images=(50 * MB, 500 * MB),
    repeats=(3, 1),
    losses=(0, 5, 20),
    rate="110M",
    fleet_image=32 << 20,
    receivers=(1, 5, 20),
    fleet_rate="8M",
    senders=(1, 2, 4),
    sender_rate="15M",
    big_image=1 << 30,
    tools=TOOLS,
    sections=SECTIONS,
)
QUICK = Plan(
    mode="quick",
    images=(8 << 20,),
    repeats=(1,),
    losses=(5,),
    rate="110M",
    fleet_image=8 << 20,
    receivers=(1, 5),
    fleet_rate="8M",
    senders=(1, 2),
    sender_rate="15M",
    big_image=0,
    tools=TOOLS,
    sections=("loss", "late", "fleet", "senders"),
)

# A late receiver starts this long after the sender: random, seeded so that runs compare.
LATE_SECONDS = (1.0, 3.0)
LATE_SEED = 12
SENDERS_SEED = 13  # the senders section's start gaps (5. in the module doc)


def transfer_timeout(size: int) -> float:
    """Generous: a tool that has not delivered by then has failed (20 s + 1 s per MiB), in
    whole seconds (serve's --duration takes no fraction)."""
    return float(20 + math.ceil(size / (1 << 20)))


def source_symbols(release: Release) -> int:
    manifest = parse_envelope(release.manifest.read_bytes()).manifest
    return sum(manifest.source_symbols(i) for i in range(manifest.chunk_count))


_digests: dict[Path, str] = {}


def release_digest(release: Release) -> str:
    """The image's sha256, computed once per release."""
    if release.image not in _digests:
        _digests[release.image] = sha256(release.image)
    return _digests[release.image]


def web_root(work: Path, release: Release) -> Path:
    """A folder holding only the image (the release folder also has the key)."""
    root = work / "www"
    root.mkdir(parents=True, exist_ok=True)
    target = root / release.image.name
    if not target.exists():
        os.link(release.image, target)
    return root


# ---- 1 and 2: one receiver, loss; late joins --------------------------------------------


def one_receiver(plan: Plan, work: Path, procs: Processes, small: Release) -> list[Outcome]:
    """Every size of the plan in turn (`small` is the first one's release): the loss runs,
    then the late joins."""
    outcomes: list[Outcome] = []
    delays = random.Random(LATE_SEED)
    for size, repeat in zip(plan.images, plan.repeats, strict=True):
        directory = work / f"one-{size}"
        release = small if size == plan.image else Release.make(directory / "release", size)
        outcomes += _one_size(plan, directory, procs, release, size, repeat, delays)
        shutil.rmtree(directory, ignore_errors=True)  # a 500 MB image and its copies
    return outcomes


def _one_size(
    plan: Plan,
    work: Path,
    procs: Processes,
    release: Release,
    size: int,
    repeat: int,
    delays: random.Random,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    # A third host for the late joins: a receiver there when the peers' sender starts.
    with Lan.create(3 if "late" in plan.sections else 2, gro=plan.gro) as lan:
        tx, rx = lan.hosts[:2]
        add_ipv4(lan.hosts)
        # otacast's sender keeps serve's default GSO batches, cut into datagrams by its kernel,
        # so that the loss rule drops single datagrams (as --no-gso did, at ~6 us of sender CPU
        # per datagram); the other tools send single datagrams anyway.
        segment_in_software(tx)
        bench = Bench(
            tx,
            rx,
            work / "one",
            release,
            release_digest(release),
            size,
            plan.rate,
            transfer_timeout(size),
            procs,
            source_symbols(release),
            symbols=plan.symbols,
            decode=plan.decode,
            early=lan.hosts[2] if len(lan.hosts) > 2 else None,
        )
        bench.work.mkdir(parents=True)
        warm_cache(procs, tx, release, bench.work / "cache")
        # Every tool at each loss, then with a receiver started after the sender.
        runners: dict[str, Callable[[int, float | None], Outcome]] = {
            "otacast": lambda loss, late: run_otacast(bench, loss, late),
            "uftp": lambda loss, late: run_uftp(bench, loss, late),
            "udpcast": lambda loss, late: run_udpcast(bench, loss, False, late),
            "udpcast-async": lambda loss, late: run_udpcast(bench, loss, True, late),
            "http": lambda loss, late: run_http(bench, loss, late),
        }
        with nginx(tx, web_root(work, release), work / "nginx") as server:
            bench.http_url = f"{server.base_url}/{release.image.name}"
            for repetition in range(repeat):
                for loss in plan.losses if "loss" in plan.sections else ():
                    for tool in plan.tools:
                        outcomes.append(runners[tool](loss, None))
                        print(report.progress_line(outcomes[-1], repetition), flush=True)
                if "late" in plan.sections:
                    delay = round(delays.uniform(*LATE_SECONDS), 2)
                    for tool in plan.tools:
                        outcomes.append(runners[tool](plan.late_loss, delay))
                        print(report.progress_line(outcomes[-1], repetition), flush=True)
    return outcomes


# ---- 3: N receivers on one bridge -----------------------------------------------------------


def steer_off(lan: Lan, sender: Host, pid: int) -> None:
    """Emulate a switch that replicates on its own silicon: pin the sender process to CPU 0 and
    steer what arrives at the bridge from its port (RPS) to the other CPUs, so that the bridge's
    replication and the receivers' kernel receive path run there.  Without this the kernel
    charges all of it to the sender (this kernel has no IRQ-time accounting: softirq work is
    billed to the task it interrupts), and the sender's CPU would grow with N for work that a
    real switch and real receivers do.  Needs two CPUs or more; otherwise it does nothing."""
    cpus = os.cpu_count() or 1
    if cpus < 2:
        return
    os.sched_setaffinity(pid, {0})
    port = f"p{lan.hosts.index(sender)}"
    mask = format(((1 << cpus) - 1) & ~1, "x")
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lan.switch,
            "sh",
            "-c",
            f"for q in /sys/class/net/{port}/queues/rx-*; do echo {mask} > $q/rps_cpus; done",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"RPS on the switch port: {done.stderr.strip()}")


def off_sender_cpu(pid: int) -> None:
    """Keep a receiver off the sender's CPU (see steer_off)."""
    cpus = os.cpu_count() or 1
    if cpus >= 2:
        os.sched_setaffinity(pid, set(range(1, cpus)))


@dataclass
class Fleet:
    plan: Plan
    lan: Lan
    work: Path
    procs: Processes
    release: Release
    digest: str
    cache: Path
    timeout: float

    @property
    def tx(self) -> Host:
        return self.lan.hosts[0]

    def members(self, count: int) -> list[Host]:
        return self.lan.hosts[1 : 1 + count]

    def outputs(self, kind: str, count: int) -> list[Path]:
        shutil.rmtree(self.work / kind, ignore_errors=True)
        outs = [self.work / kind / f"r{i}" / "image" for i in range(count)]
        for out in outs:
            out.parent.mkdir(parents=True)
        return outs

    def verified(self, outs: Sequence[Path]) -> int:
        return sum(1 for out in outs if out.exists() and sha256(out) == self.digest)

    def overflows(self, count: int) -> int:
        return sum(udp_overflows(host) for host in self.members(count))

    def row(
        self,
        tool: str,
        count: int,
        start: float,
        exits: Sequence[Exit | None],
        outs: Sequence[Path],
    ) -> dict[str, object]:
        done = [e for e in exits if e is not None and e.returncode == 0]
        verified = self.verified(outs)
        shutil.rmtree(outs[0].parent.parent, ignore_errors=True)
        return {
            "tool": tool,
            "receivers": count,
            "seconds": round(max(e.at for e in done) - start, 3) if done else None,
            "delivered": len(done),
            "verified": verified,
            "verified_of": count,
        }


def fleet(plan: Plan, work: Path, procs: Processes) -> list[dict[str, object]]:
    release = Release.make(work / "fleet", plan.fleet_image)
    rows: list[dict[str, object]] = []
    with Lan.create(1 + max(plan.receivers), gro=plan.gro) as lan:
        f = Fleet(
            plan,
            lan,
            work,
            procs,
            release,
            release_digest(release),
            work / "fleet-cache",
            transfer_timeout(plan.fleet_image) * 2,
        )
        warm_cache(procs, f.tx, release, f.cache)
        with nginx(f.tx, web_root(work / "fleet", release), work / "fleet-nginx") as server:
            steer_off(lan, f.tx, server.process.pid)
            url = f"{server.base_url}/{release.image.name}"
            for repetition in range(plan.repeats[0]):
                for count in plan.receivers:
                    rows.append(_fleet_otacast(f, count) | {"run": repetition + 1})
                    print(report.fleet_line(rows[-1], plan.fleet_image), flush=True)
                    if "http" in plan.tools:
                        rows.append(
                            _fleet_http(f, count, server.process.pid, url) | {"run": repetition + 1}
                        )
                        print(report.fleet_line(rows[-1], plan.fleet_image), flush=True)
    return rows


# After a pass, how long receivers may take to work through what their socket buffers hold
# (decode, hash, write) before the sender makes another pass; and how many passes at most.
DRAIN_SECONDS = 30.0
MAX_PASSES = 3


def _fleet_otacast(f: Fleet, count: int) -> dict[str, object]:
    """The sender makes one pass (``--loops 1``), as a scheduled fleet update would; another
    only if a receiver still lacks symbols once the pass has drained.  So the bytes on the link
    are what delivering to N receivers needs, not the time the slowest one takes to decode."""
    outs = f.outputs("fleet-ota", count)
    receivers = [
        f.procs.start(
            fetch_argv(
                host,
                f.release,
                out.parent / "state",
                out,
                f.tx.address,
                symbols=f.plan.symbols,
                decode=f.plan.decode,
            )
        )
        for host, out in zip(f.members(count), outs, strict=True)
    ]
    for receiver in receivers:
        off_sender_cpu(receiver.pid)
    for receiver in receivers:
        wait_joined(receiver, ssm_group(f.release), timeout=60)
    overflow, before = f.overflows(count), link_tx_bytes(f.tx)
    start = time.monotonic()
    passes, cpu, cpu_total, payload = 0, 0.0, 0.0, 0
    exits: list[Exit | None] = []
    while passes < MAX_PASSES:
        sender = f.procs.start(
            serve_command(f.tx, f.release, f.cache, "--rate", f.plan.fleet_rate, "--loops", "1")
        )
        steer_off(f.lan, f.tx, sender.pid)
        while sender.seen('"event": "serving"') is None and sender.running():
            time.sleep(0.001)
        cpu_start = sender.cpu_ns() / 1e9
        ended = sender.wait(start + f.timeout) or sender.stop()
        passes += 1
        cpu += ended.cpu - cpu_start
        cpu_total += ended.cpu
        sent = sender.last_event("finished").get("bytes")
        payload += sent if isinstance(sent, int) else 0
        drained = min(time.monotonic() + DRAIN_SECONDS, start + f.timeout)
        exits = [receiver.wait(drained) for receiver in receivers]
        if all(e is not None for e in exits) or time.monotonic() >= start + f.timeout:
            break
    after = link_tx_bytes(f.tx)
    for receiver in receivers:
        receiver.stop()
    refused: dict[str, int] = {}
    for receiver in receivers:
        summary = receiver.last_event("finished")
        rejected = summary.get("rejected")
        for reason, number in rejected.items() if isinstance(rejected, dict) else ():
            refused[reason] = refused.get(reason, 0) + int(number)
    return f.row("otacast", count, start, exits, outs) | {
        "passes": passes,
        "receivers_refused": refused,
        "sender_cpu_s": round(cpu, 4),
        "sender_cpu_total_s": round(cpu_total, 3),
        "link_bytes": after - before,
        "payload_bytes": payload,
        "receiver_overflow": f.overflows(count) - overflow,
    }


def _fleet_http(f: Fleet, count: int, server_pid: int, url: str) -> dict[str, object]:
    outs = f.outputs("fleet-http", count)
    before, cpu_start = link_tx_bytes(f.tx), cpu_ns(server_pid)
    start = time.monotonic()
    clients = [
        f.procs.start(host.command(str(BIN / "python"), str(HTTP_GET), url, str(out)))
        for host, out in zip(f.members(count), outs, strict=True)
    ]
    for client in clients:
        off_sender_cpu(client.pid)
    exits = [client.wait(start + f.timeout) for client in clients]
    cpu_end, after = cpu_ns(server_pid), link_tx_bytes(f.tx)
    for client in clients:
        client.stop()
    return f.row("http", count, start, exits, outs) | {
        "sender_cpu_s": round((cpu_end - cpu_start) / 1e9, 4),
        "sender_cpu_total_s": None,
        "link_bytes": after - before,
        "payload_bytes": None,
        "receiver_overflow": None,
    }


# ---- 4: several senders into one receiver ---------------------------------------------------


def several_senders(
    plan: Plan, work: Path, procs: Processes, release: Release
) -> list[dict[str, object]]:
    k = source_symbols(release)
    rows: list[dict[str, object]] = []
    with Lan.create(1 + max(plan.senders), gro=plan.gro) as lan:
        rx, hosts = lan.hosts[0], lan.hosts[1:]
        cache = work / "senders-cache"
        warm_cache(procs, hosts[0], release, cache)
        gaps = random.Random(SENDERS_SEED)
        for repetition in range(plan.repeats[0]):
            for count in plan.senders:
                rows.append(
                    _senders_run(plan, work, procs, release, rx, hosts[:count], cache, gaps)
                    | {"run": repetition + 1, "received/K": None}
                )
                datagrams = rows[-1].pop("datagrams")
                if isinstance(datagrams, int):
                    rows[-1]["received/K"] = round(datagrams / k, 3)
                print(report.senders_line(rows[-1]), flush=True)
    return rows


def _senders_run(
    plan: Plan,
    work: Path,
    procs: Processes,
    release: Release,
    rx: Host,
    members: Sequence[Host],
    cache: Path,
    gaps: random.Random,
) -> dict[str, object]:
    count = len(members)
    timeout = transfer_timeout(plan.image)
    out = work / "senders-out" / "image"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    # Drawn before anything starts, so each sender's duration covers the gaps after it.
    after = [gaps.uniform(1.0, 3.0) for _ in members[1:]] + [gaps.uniform(0.5, 1.5)]
    senders: list[Proc] = []
    for index, host in enumerate(members):
        senders.append(
            procs.start(
                serve_command(
                    host,
                    release,
                    cache,
                    "--rate",
                    plan.sender_rate,
                    # Serve's default repair pool, whatever the number of senders: each sender
                    # covers its own arc C/n of every chunk's cycle, and a receiver hearing n of
                    # them needs K/(n(1-p)) symbols from each, so the pool only has to cover the
                    # loss.
                    "--sender",
                    f"{index}/{count}",
                    "--duration",
                    f"{math.ceil(timeout + sum(after[index:])):g}s",
                )
            )
        )
        time.sleep(after[index])
    overflow = udp_overflows(rx)
    start = time.monotonic()
    receiver = procs.start(
        fetch_argv(
            rx,
            release,
            out.parent / "state",
            out,
            *(h.address for h in members),
            symbols=plan.symbols,
            decode=plan.decode,
        )
    )
    done = receiver.wait(start + timeout)
    for sender in senders:
        sender.stop()
    receiver.stop()
    summary = receiver.last_event("finished")
    ok = done is not None and done.returncode == 0 and bool(summary)
    receiving = summary.get("receiving")
    return {
        "senders": count,
        "started_apart_s": [round(gap, 2) for gap in after[:-1]],
        "receiver_after_s": round(after[-1], 2),
        "rate_each": plan.sender_rate,
        "delivered": ok,
        "intact": out.exists() and sha256(out) == release_digest(release),
        "seconds": round(done.at - start, 3) if ok and done else None,
        "receiving_s": receiving if ok and isinstance(receiving, float) else None,
        "datagrams": summary.get("datagrams"),
        "receiver_overflow": udp_overflows(rx) - overflow,
        "rx_cpu_s": round(done.cpu, 3) if done else None,
    }


# ---- 5: peak RSS for a large image ----------------------------------------------------------


def memory(plan: Plan, work: Path, procs: Processes) -> dict[str, object]:
    directory = work / "big"
    release = Release.make(directory, plan.big_image)
    digest = release_digest(release)
    timeout = 120 + transfer_timeout(plan.big_image)
    out = directory / "out" / "image"
    out.parent.mkdir()
    with Lan.create(2, gro=plan.gro) as lan:
        tx, rx = lan.hosts
        receiver = procs.start(
            fetch_argv(
                rx,
                release,
                out.parent / "state",
                out,
                tx.address,
                symbols=plan.symbols,
                decode=plan.decode,
                # The sender encodes the whole image before its first datagram (a cold cache):
                # longer than fetch's default wait for a manifest.
                join_timeout=timeout,
            )
        )
        wait_joined(receiver, ssm_group(release))
        start = time.monotonic()
        # A cold symbol cache: the sender's peak includes encoding the whole image.
        sender = procs.start(
            serve_command(
                tx, release, directory / "cache", "--rate", plan.rate, "--duration", f"{timeout:g}s"
            )
        )
        done = receiver.wait(start + timeout)
        sender.stop()
        receiver.stop()
    summary = receiver.last_event("finished")
    finished = sender.last_event("finished")
    row: dict[str, object] = {
        "image": plan.big_image,
        "delivered": done is not None and done.returncode == 0 and bool(summary),
        "intact": out.exists() and sha256(out) == digest,
        "seconds": round(done.at - start, 1) if done else None,
        "sender_peak_rss_mb": finished.get("peak_rss_mb"),
        "receiver_peak_rss_mb": summary.get("peak_rss_mb"),
        "receiving_s": summary.get("receiving"),
    }
    shutil.rmtree(directory, ignore_errors=True)
    print(report.memory_line(row), flush=True)
    return row


# ---- the command ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(
        prog="bench_compare.py", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="8 MiB image, 5%% loss only, N in (1, 5), 1-2 senders, no 1 GiB run",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="default results/")
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per tool, loss and size, for every size (median is reported; default 3 at "
        "50 MB and 1 at 500 MB, 1 with --quick)",
    )
    parser.add_argument("--tools", help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument(
        "--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    parser.add_argument(
        "--images",
        help="comma-separated image sizes of the loss and late-join runs, smallest first "
        "(the first also for the senders runs); MB and GB are 10^6 and 10^9 bytes, M and G "
        "binary (default 50MB,500MB; 8M with --quick)",
    )
    parser.add_argument(
        "--losses", help="comma-separated loss percentages of the loss runs (default 0,5,20)"
    )
    parser.add_argument("--big-image", help="image size for the peak-RSS run (default 1G)")
    parser.add_argument("--rate", help="otacast's pace with one receiver (default 110M)")
    parser.add_argument(
        "--symbols",
        choices=("memory", "store"),
        help="otacast fetch's --symbols, for every otacast receiver (default: fetch's default)",
    )
    parser.add_argument(
        "--decode",
        choices=("inline", "worker"),
        help="otacast fetch's --decode, for every otacast receiver (default: fetch's default)",
    )
    parser.add_argument(
        "--no-gro",
        action="store_true",
        help="plain veths: no UDP GRO on the links (default: GRO on, as physical NICs have it)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.no_gro:
        plan = replace(plan, gro=False)
    try:
        if args.images:
            sizes = tuple(parse_size(t) for t in args.images.split(",") if t.strip())
            if not sizes or list(sizes) != sorted(sizes):
                parser.error("--images: one size or more, smallest first")
            # A size the plan already has keeps its repeat; another gets the last one's.
            known = dict(zip(plan.images, plan.repeats, strict=True))
            repeats = tuple(known.get(size, plan.repeats[-1]) for size in sizes)
            plan = replace(plan, images=sizes, repeats=repeats)
        if args.losses:
            losses = tuple(int(t) for t in args.losses.split(",") if t.strip())
            if not losses or not all(0 <= loss <= 50 for loss in losses):
                parser.error("--losses: percentages 0-50")
            plan = replace(plan, losses=losses)
        if args.repeat is not None:
            if not 1 <= args.repeat <= 9:
                parser.error("--repeat must be 1-9")
            plan = replace(plan, repeats=(args.repeat,) * len(plan.images))
        if args.tools:
            plan = replace(plan, tools=_subset(parser, "--tools", args.tools, TOOLS))
        if args.sections:
            plan = replace(plan, sections=_subset(parser, "--sections", args.sections, SECTIONS))
        if args.big_image:
            plan = replace(plan, big_image=units.parse_size(args.big_image))
            if "memory" not in plan.sections and not args.sections:
                plan = replace(plan, sections=(*plan.sections, "memory"))
        if args.rate:
            units.parse_rate(args.rate)
            plan = replace(plan, rate=args.rate)
        if args.symbols:
            plan = replace(plan, symbols=args.symbols)
        if args.decode:
            plan = replace(plan, decode=args.decode)
    except ValueError as exc:
        parser.error(str(exc))
    return plan, args.results


def parse_size(text: str) -> int:
    """``50MB`` and ``1GB`` are decimal (as the issue's image sizes); anything else as
    otacast's sizes (``8M`` = 8 MiB)."""
    text = text.strip()
    for suffix, factor in (("MB", MB), ("GB", 1000 * MB)):
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    return units.parse_size(text)


def _subset(
    parser: argparse.ArgumentParser, option: str, text: str, choices: Sequence[str]
) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in chosen if t not in choices]
    if unknown or not chosen:
        parser.error(f"{option}: choose from {', '.join(choices)} (got {text!r})")
    return chosen


def check_environment(plan: Plan) -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: it builds network namespaces (try sudo)")
    one = "loss" in plan.sections or "late" in plan.sections
    missing = missing_programs(plan.tools if one else ("otacast",))
    if missing:
        raise BenchError(
            "not installed: " + ", ".join(missing) + " (install them, or leave tools out "
            "with --tools)"
        )


def run(plan: Plan, results: Path) -> int:
    check_environment(plan)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otacast-compare-"))
    procs = Processes()
    result: dict[str, object] = {"plan": asdict(plan), "started": time.time()}
    try:
        print(report.heading(plan), flush=True)
        release = Release.make(work / "release", plan.image)
        if "loss" in plan.sections or "late" in plan.sections:
            outcomes = one_receiver(plan, work, procs, release)
            result["one_receiver"] = [asdict(o) for o in outcomes]
        if "fleet" in plan.sections:
            result["fleet"] = fleet(plan, work, procs)
        if "senders" in plan.sections:
            result["senders"] = several_senders(plan, work, procs, release)
        if "memory" in plan.sections:
            result["memory"] = memory(plan, work, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    result["runtime_s"] = round(time.monotonic() - began, 1)
    return report.finish(plan, result, results)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    plan, results = parse_args(argv)
    compile_bytecode()
    # Ctrl-C and SIGTERM alike stop and reap everything started, and delete the namespaces
    # (a background job may have SIGINT ignored: make sure it is not).
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return run(plan, results)
    except BenchError as exc:
        print(f"bench_compare: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench_compare: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_compare: interrupted; everything it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
