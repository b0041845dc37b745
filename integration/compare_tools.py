"""The machinery of the side-by-side benchmark (``bench_compare.py``): programs started in
namespace hosts and reaped with their own CPU time, loss and packet counters from nftables, and
one runner per tool -- otacast, uftp, udpcast (default and async+FEC) and HTTP (nginx +
requests).

Every runner starts its receiver first, waits until it listens, then starts the transfer, and
returns an `Outcome`: whether the image arrived intact (sha256 of what the receiver wrote), the
time from starting the transfer to the receiver holding the whole image, the tool's own
data-phase time where it reports one, and how many UDP/TCP packets the receiver sent -- its back
channel.  Given a ``join_delay``, a runner does the opposite (a late join): it starts the
sender, waits that long, starts the receiver, and times from the receiver's start; the loss and
the counters then begin with the receiver too.  Nothing here runs outside the namespaces the
benchmark creates.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from otacast.schemas.manifest import parse_envelope
from otacast.signer import image_record

from .netns import BIN, Host, ip
from .release import Release, fetch_command, first_start, serve_command

POLL = 0.002  # seconds between checks for a finished process or a file: the timing resolution
STOP_TIMEOUT = 10.0
_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
HTTP_GET = Path(__file__).resolve().with_name("http_get.py")

# uftp: link-scope groups (they never leave the LAN).
UFTP_GROUP = "ff12::1:1"
UFTP_PRIVATE = "ff12::1:2"
# udpcast is IPv4 only: hosts get addresses from 198.18.0.0/15, the range RFC 2544 sets aside
# for benchmarks, inside their namespaces only.
IPV4_PREFIX = "198.18.0."
UDPCAST_RDV = "224.0.0.1"
# Start as soon as the receiver has connected.  --autostart makes the sender repeat its HELLO
# (about once a second) while it waits: with one HELLO only, a lost HELLO leaves both sides
# waiting for each other for ever (seen at 20% loss).
UDPCAST_DEFAULT = ("--min-receivers", "1", "--autostart", "60")
UDPCAST_ASYNC = ("--async", "--fec", "8x16/64", "--max-bitrate", "1000m", "--autostart", "5")
# The socket buffers the peers are given (8 MiB), as otacast's receiver asks for 32 MiB.
PEER_BUFFER = str(8 << 20)

# The image bytes one data packet of each peer carries, for its ideal ceil(image / block) /
# (1 - p), and the nftables match that picks its data packets out of what reaches the
# receiver's port (@th,64 is the first bit after the 8-byte UDP header).
# uftp: -b is "the size of a data block" (uftp(1); 1300, its default, is given on the command
# line); one FILESEG message carries one, function 9 in the second byte of the 16-byte UFTP
# header (uftp's protocol.txt 5.2.1 and 5.2.11; a capture shows 0x40 0x09 and 1,324-byte
# payloads: 16 + 8 bytes of headers + 1,300).  To its port, 1044 by default (-p).
UFTP_BLOCK = 1300
# udpcast: --blocksize, "Default (and also maximum) is 1456" (udp-sender(1); given on the
# command line); a data block has the 16-bit big-endian opcode CMD_DATA (8) first in its
# 16-byte header, an async FEC block CMD_FEC (9) (a capture shows 0x0008 and 1,472-byte payloads:
# 16 + 1,456).  To the receivers' port, 9000 (--portbase's default).
UDPCAST_BLOCK = 1456
DATA_MATCH = {
    "uftp": "udp dport 1044 @th,72,8 9",
    "udpcast": "udp dport 9000 @th,64,16 8-9",
}

# tool -> does it need a back channel from the receivers to the sender (by design)?
BACK_CHANNEL = {
    "otacast": False,
    "uftp": True,
    "udpcast": True,
    "udpcast-async": False,
    "http": True,
}
PROGRAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "otacast": (),
    "uftp": (("uftp", "uftp"), ("uftpd", "uftp")),
    "udpcast": (("udp-sender", "udpcast"), ("udp-receiver", "udpcast")),
    "udpcast-async": (("udp-sender", "udpcast"), ("udp-receiver", "udpcast")),
    "http": (("nginx", "nginx"),),
}


class BenchError(Exception):
    """A problem the user can fix (not root, a program missing); printed as one line."""


def missing_programs(tools: Sequence[str]) -> list[str]:
    """`program (Debian package)` for every program the tools need that is not installed."""
    needed = {("nft", "nftables"), ("ip", "iproute2")}
    for tool in tools:
        needed.update(PROGRAMS[tool])
    return sorted(f"{p} (Debian {pkg})" for p, pkg in needed if not shutil.which(p, path=_PATH))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Exit:
    returncode: int
    at: float  # time.monotonic() when the exit was seen
    cpu: float  # the process's own user + system seconds (wait4)


class Proc:
    """A program in a namespace: output (stdout + stderr) read as it comes, with arrival times;
    reaped with its own rusage.  `ip netns exec` execs the program, so the pid is the program."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.chunks: list[tuple[float, bytes]] = []
        self.exit: Exit | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while data := os.read(fd, 1 << 16):
            self.chunks.append((time.monotonic(), data))

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return b"".join(d for _, d in self.chunks).decode(errors="replace")

    def seen(self, needle: str) -> float | None:
        """When `needle` first appeared in the output."""
        wanted, buffer = needle.encode(), b""
        for at, data in list(self.chunks):
            buffer += data
            if wanted in buffer:
                return at
        return None

    def json_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def last_event(self, name: str) -> dict[str, object]:
        found = [e for e in self.json_lines() if e.get("event") == name]
        return found[-1] if found else {}

    def wait(self, deadline: float) -> Exit | None:
        """The exit, or None if still running at `deadline` (time.monotonic())."""
        while self.exit is None:
            try:
                pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its rusage is lost, not the exit
                self.exit = Exit(self.process.returncode or -1, time.monotonic(), 0.0)
                break
            if pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                self.exit = Exit(
                    self.process.returncode, time.monotonic(), usage.ru_utime + usage.ru_stime
                )
            elif time.monotonic() >= deadline:
                return None
            else:
                time.sleep(POLL)
        self._reader.join(STOP_TIMEOUT)
        return self.exit

    def running(self) -> bool:
        """Still running?  (Never Popen.poll: it would reap the process behind wait4's back.)"""
        return self.wait(0.0) is None

    def stop(self, grace: float = STOP_TIMEOUT) -> Exit:
        """SIGTERM (the senders print their summary on it), SIGKILL after `grace` seconds;
        always reaped."""
        if self.exit is None:
            if self.running():
                self.process.send_signal(signal.SIGTERM)
            found = self.wait(time.monotonic() + grace)
            if found is None:
                self.process.kill()
                found = self.wait(time.monotonic() + STOP_TIMEOUT)
            if found is None:
                raise RuntimeError(f"{self.command[4:5]} did not die on SIGKILL")
        if self.process.stdout is not None:
            self.process.stdout.close()
        assert self.exit is not None
        return self.exit

    def cpu_ns(self) -> int:
        return cpu_ns(self.pid)


def cpu_ns(pid: int) -> int:
    """CPU time so far of all the process's threads, in ns (schedstat: finer than the 10 ms
    ticks of /proc/PID/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


class Processes:
    """Every program a benchmark starts, so that all are stopped and reaped at the end."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, command: Sequence[str]) -> Proc:
        proc = Proc(command)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every one, even if stopping another failed."""
        problems: list[Exception] = []
        for proc in reversed(self.started):
            try:
                proc.stop()
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                problems.append(exc)
        self.started.clear()
        if problems:
            raise problems[0]


def wait_for(check: Callable[[], bool], deadline: float, what: str) -> None:
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _proc_file(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/net/{name}").read_text()
    except OSError:
        return ""


def group_hex(group: str) -> str:
    return ipaddress.IPv6Address(group).packed.hex()


def wait_joined(proc: Proc, group: str, timeout: float = 30.0) -> None:
    """Until the program's namespace has joined `group` (IPv6), or it exited."""
    wanted = group_hex(group)
    wait_for(
        lambda: wanted in _proc_file(proc.pid, "igmp6") or not proc.running(),
        time.monotonic() + timeout,
        f"a join of {group}",
    )


def wait_udp_port(proc: Proc, port: int, timeout: float = 30.0) -> None:
    """Until a UDP socket is bound to `port` in the program's namespace, or it exited."""

    def bound() -> bool:
        for line in _proc_file(proc.pid, "udp").splitlines()[1:]:
            local = line.split()[1]  # "sl local_address rem_address ...", address "HEX:PORT"
            if int(local.rsplit(":", 1)[1], 16) == port:
                return True
        return not proc.running()

    wait_for(
        bound,
        time.monotonic() + timeout,
        f"UDP port {port}",
    )


# TCP states in which the kernel still sends on its own (retransmitted FINs), and SYN-SENT.
_BUSY_TCP = ("fin-wait-1", "closing", "last-ack", "syn-sent", "established")


def quiesce(hosts: Sequence[Host], timeout: float = 30.0) -> None:
    """Wait until no TCP connection in `hosts` can still send (an HTTP run's teardown under
    loss retransmits after the client has exited), so that the next run's count of what the
    receiver sends is its own."""
    deadline = time.monotonic() + timeout
    states = [arg for state in _BUSY_TCP for arg in ("state", state)]
    while time.monotonic() < deadline:
        if not any(host.run("ss", "-Htan", *states).stdout.strip() for host in hosts):
            return
        time.sleep(0.1)


def add_ipv4(hosts: Sequence[Host]) -> None:
    for index, host in enumerate(hosts):
        ip("-n", host.netns, "addr", "add", f"{IPV4_PREFIX}{index + 1}/24", "dev", "eth0")


@dataclass(frozen=True)
class Plan:
    """What one run of the benchmark measures (bench_compare.py has the full and quick plans)."""

    mode: str
    images: tuple[int, ...]  # the one-receiver sizes, smallest first (also the late joins)
    repeats: tuple[int, ...]  # runs per tool, loss and size, one per entry of images
    losses: tuple[int, ...]
    rate: str  # otacast's pace with one receiver
    fleet_image: int
    receivers: tuple[int, ...]
    fleet_rate: str
    senders: tuple[int, ...]
    sender_rate: str  # each of the several senders
    big_image: int
    tools: tuple[str, ...]  # compared in the loss and late-join runs
    sections: tuple[str, ...]  # of loss, late, fleet, senders, memory
    late_loss: int = 5  # loss of the late-join runs
    symbols: str = ""  # otacast fetch's --symbols (empty: its default)
    decode: str = ""  # otacast fetch's --decode (empty: its default)

    @property
    def image(self) -> int:
        """The small image: the several-sender runs use it."""
        return self.images[0]

    # UDP GRO on the veths, as physical NICs have it (integration.netns); the loss is then
    # applied at the switch port, before coalescing (Meter).
    gro: bool = True


# ---- nftables: random loss on what arrives, and a count of what the receiver sends ----------

TABLE = "otacast_bench"


@dataclass(frozen=True)
class Counters:
    lost: int  # UDP/TCP packets nftables dropped on arrival (the simulated loss)
    sent: int  # UDP/TCP packets the host sent: its back channel
    sent_other: int  # other packets it sent (ICMPv6 MLD/ND, IGMP: to the switch, not the sender)
    overflow: int  # datagrams the kernel dropped because a socket buffer was full
    # UDP/TCP packets that reached the host's port (its switch port with GRO), before the loss
    # rule: what was received plus what the loss dropped.
    arriving: int = 0
    # Of those, the ones the Meter's `data` match selects (the tool's file-data packets).
    data: int = 0


def udp_overflows(host: Host) -> int:
    """UDP datagrams dropped on full socket buffers so far in `host`, IPv6 and IPv4."""
    total = 0
    for line in host.run("cat", "/proc/net/snmp6").stdout.splitlines():
        if line.startswith("Udp6RcvbufErrors"):
            total += int(line.split()[1])
    rows = [r.split() for r in host.run("cat", "/proc/net/snmp").stdout.splitlines()]
    udp = [r for r in rows if r and r[0] == "Udp:"]
    if len(udp) == 2:
        total += int(udp[1][udp[0].index("RcvbufErrors")])
    return total


NFT_LIST = ("nft", "-j", "list", "table")


class Meter:
    """Loss and counters in one host: `loss`% of arriving UDP/TCP packets dropped at random;
    the UDP/TCP packets it sends counted, and everything else it sends counted apart.

    With GRO on the host's link the loss is applied at the switch port facing it, before the
    veth coalesces datagrams (a rule in the host would drop whole coalesced runs)."""

    def __init__(self, host: Host, loss: int, data: str = "") -> None:
        """`data`: an nftables match for the tool's data packets (DATA_MATCH), counted as they
        reach the port, before the loss rule; empty: none counted."""
        self.host = host
        host.run("nft", "delete", "table", "inet", TABLE)
        self._switch = host.gro_port
        if self._switch is not None:
            self._switch_nft("delete table bridge " + TABLE, check=False)
        # In order: counted on arrival (before the loss), then dropped.
        rules = ['meta l4proto { tcp, udp } counter comment "arriving"']
        if data:
            rules.append(f'{data} counter comment "data"')
        if loss:
            rules.append(
                f"meta l4proto {{ tcp, udp }} numgen random mod 100 < {loss} counter drop "
                'comment "lost"'
            )
        arriving = "" if self._switch is not None else "\n        ".join(rules)
        script = f"""
table inet {TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        {arriving}
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
        meta l4proto {{ tcp, udp }} counter comment "sent"
        counter comment "all_sent"
    }}
}}
"""
        done = subprocess.run(
            host.command("nft", "-f", "-"),
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nft: {done.stderr.strip()}")
        if self._switch is not None:
            port = self._switch[1]
            self._switch_nft(
                f"add table bridge {TABLE}\n"
                f"add chain bridge {TABLE} forward {{ type filter hook forward priority 0 ; }}\n"
                + "".join(f'add rule bridge {TABLE} forward oifname "{port}" {r}\n' for r in rules)
            )
        self.overflow_base = udp_overflows(host)

    def _switch_nft(self, script: str, *, check: bool = True) -> str:
        assert self._switch is not None
        done = subprocess.run(
            ["ip", "netns", "exec", self._switch[0], "nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"nft (switch): {done.stderr.strip()}")
        return done.stdout

    def reset(self) -> None:
        """Count from now on (the loss rule stays)."""
        self.host.run("nft", "reset", "counters", "table", "inet", TABLE)
        if self._switch is not None:
            self._switch_nft(f"reset counters table bridge {TABLE}\n")
        self.overflow_base = udp_overflows(self.host)

    def read(self) -> Counters:
        found: dict[str, int] = {}
        listings = [self.host.run("nft", "-j", "list", "table", "inet", TABLE).stdout]
        if self._switch is not None:
            listings.append(
                subprocess.run(
                    ["ip", "netns", "exec", self._switch[0], *NFT_LIST, "bridge", TABLE],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                ).stdout
            )
        for listing in listings:
            for item in json.loads(listing)["nftables"] if listing.strip() else ():
                rule = item.get("rule")
                if rule and "comment" in rule:
                    for expression in rule["expr"]:
                        if "counter" in expression:
                            found[rule["comment"]] = int(expression["counter"]["packets"])
        sent = found.get("sent", 0)
        return Counters(
            found.get("lost", 0),
            sent,
            found.get("all_sent", 0) - sent,
            udp_overflows(self.host) - self.overflow_base,
            found.get("arriving", 0),
            found.get("data", 0),
        )


def link_tx_bytes(host: Host) -> int:
    done = host.run("cat", "/sys/class/net/eth0/statistics/tx_bytes")
    return int(done.stdout)


# ---- one transfer per tool ------------------------------------------------------------------


@dataclass
class Outcome:
    tool: str
    loss: int
    delivered: bool  # the receiver said it had the whole image
    intact: bool  # what it wrote has the image's sha256
    seconds: float | None  # start of the transfer -> receiver holds the whole image
    data_seconds: float | None  # the tool's own data phase, where it says
    rx_sent: int  # UDP/TCP packets the receiver sent
    rx_sent_other: int
    lost: int  # packets nftables dropped on arrival
    overflow: int  # datagrams the receiver's kernel dropped on a full socket buffer
    gave_up: bool = False  # a no-back-channel tool's FEC could not repair the loss
    retries: int = 0  # transfers started again after a lost handshake (udpcast)
    size: int = 0  # the image's bytes
    # Late join: the receiver was started this many seconds after the sender, and `seconds`
    # runs from the receiver's start.  None: the receiver was ready before the transfer began.
    join_delay: float | None = None
    sessions: int = 1  # sender sessions started before the receiver had the image (uftp)
    note: str = ""
    log: str = ""  # the programs' last lines, for a run that did not deliver
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    """One sender host and one receiver host on a LAN, the image, and the programs running."""

    tx: Host
    rx: Host
    work: Path
    release: Release
    digest: str
    size: int
    rate: str  # otacast's sender pace
    timeout: float
    procs: Processes
    source_symbols: int  # K over the whole image
    http_url: str = ""
    # A receiver that is there when a late join's sender starts, so that the peers' session
    # begins as it would for a fleet (otacast's sender does not care).
    early: Host | None = None
    symbols: str = ""  # otacast fetch's --symbols (empty: its default)
    decode: str = ""  # otacast fetch's --decode (empty: its default)

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def verdict(self, out: Path) -> bool:
        return out.exists() and sha256(out) == self.digest


# Slept past the image record's racy window (file times come from a coarser clock than
# `time.time_ns`, by up to a tick: 10 ms covers it ten times over).
CLOCK_MARGIN = 0.1


def warm_cache(procs: Processes, host: Host, release: Release, cache: Path, *args: str) -> None:
    """Encode the release's symbols once into `cache`, so that timed runs only send, and leave
    the record of the checked image there too (`otacast.signer.image_record`), so that every
    timed run starts as a restart with both unchanged does: a check begun within
    ``RACY_NS`` of the image's writing records nothing, so one more start follows then."""
    _serve_until_serving(procs, host, release, cache, *args)
    manifest = parse_envelope(release.manifest.read_bytes()).manifest
    record = image_record.path_for(cache, manifest)
    if not record.exists():
        settled = release.image.stat().st_ctime_ns + image_record.RACY_NS
        time.sleep(max(0.0, (settled - time.time_ns()) / 1e9 + CLOCK_MARGIN))
        _serve_until_serving(procs, host, release, cache, *args)
    if not record.exists():
        raise RuntimeError(f"otacast-signer serve kept no record of the checked image in {cache}")


def _serve_until_serving(
    procs: Processes, host: Host, release: Release, cache: Path, *args: str
) -> None:
    sender = procs.start(serve_command(host, release, cache, "--rate", "1M", *args))
    deadline = time.monotonic() + 600
    while sender.seen('"event": "serving"') is None:
        if not sender.running() or time.monotonic() > deadline:
            sender.stop()
            raise RuntimeError(f"otacast-signer serve failed: {sender.text()[-500:]}")
        time.sleep(0.02)
    sender.stop()


def fetch_argv(
    host: Host,
    release: Release,
    state: Path,
    out: Path,
    *sources: str,
    symbols: str = "",
    decode: str = "",
    join_timeout: float | None = None,
) -> list[str]:
    """`otacast fetch` joining `sources` (SSM), multicast only; `symbols`, `decode` and
    `join_timeout` are its --symbols, --decode and --join-timeout (empty, None: fetch's
    defaults)."""
    joins = [arg for source in sources for arg in ("--source", source)]
    keeping = ["--symbols", symbols] if symbols else []
    decoding = ["--decode", decode] if decode else []
    waiting = ["--join-timeout", f"{join_timeout:g}"] if join_timeout is not None else []
    return fetch_command(
        host, release, state, out, "--fallback", "never", *keeping, *decoding, *waiting, *joins
    )


def _outcome(
    tool: str,
    loss: int,
    bench: Bench,
    out: Path,
    count: Counters,
    procs: Sequence[Proc],
    *,
    start: float,
    arrived: float | None,
    data_seconds: float | None,
    gave_up: bool = False,
    join_delay: float | None = None,
) -> Outcome:
    delivered = arrived is not None
    if delivered:
        note = ""
    elif gave_up:
        note = "FEC could not repair the loss"
    else:
        note = "failed" if join_delay is None else "did not join"
    return Outcome(
        tool,
        loss,
        delivered,
        bench.verdict(out),
        arrived - start if arrived is not None else None,
        data_seconds if delivered else None,
        count.sent,
        count.sent_other,
        count.lost,
        count.overflow,
        gave_up=gave_up and not delivered,
        size=bench.size,
        join_delay=join_delay,
        note=note,
        log="" if delivered else "\n".join(_tail(proc) for proc in procs),
    )


def run_otacast(bench: Bench, loss: int, join_delay: float | None = None) -> Outcome:
    """Serve's default flags (the repair pool, no per-pass knob left; the caller has the
    sender's link segment its GSO batches, `netns.segment_in_software`).  With `join_delay` the
    sender loops first and the receiver starts that many seconds later: a device joining a
    carousel already running, timed from its own start."""
    quiesce((bench.tx, bench.rx))
    out = bench.fresh("otacast-out") / "image"
    state = bench.fresh("otacast-state")

    def serve() -> Proc:
        return bench.procs.start(
            serve_command(
                bench.tx,
                bench.release,
                bench.work / "cache",
                "--rate",
                bench.rate,
                "--duration",
                f"{math.ceil(bench.timeout + (join_delay or 0))}s",  # whole seconds only
            )
        )

    def fetch() -> Proc:
        return bench.procs.start(
            fetch_argv(
                bench.rx,
                bench.release,
                state,
                out,
                bench.tx.address,
                symbols=bench.symbols,
                decode=bench.decode,
            )
        )

    if join_delay is None:
        meter = Meter(bench.rx, loss)
        receiver = fetch()
        wait_joined(receiver, ssm_group(bench.release))
        # The device waits for a new release's sender, as uftp's and udpcast's receivers wait
        # for theirs: a first start, not a restart at the phase of the cache's first serve.
        first_start(bench.work / "cache")
        start = time.monotonic()
        sender = serve()
    else:
        sender = serve()
        _sleep_until(time.monotonic() + join_delay)
        meter = Meter(bench.rx, loss)
        start = time.monotonic()
        receiver = fetch()
        # The meter counts from here: what reached the receiver's link once it had joined (the
        # switch port carries the group's datagrams before that too; the time still counts
        # from the receiver's start).
        wait_joined(receiver, ssm_group(bench.release))
        meter.reset()
    done = receiver.wait(start + bench.timeout)
    count = meter.read()
    sender.stop()
    receiver.stop()
    summary = receiver.last_event("finished")
    ok = done is not None and done.returncode == 0 and bool(summary)
    outcome = _outcome(
        "otacast",
        loss,
        bench,
        out,
        count,
        (sender, receiver),
        start=start,
        arrived=done.at if ok and done else None,
        data_seconds=_float(summary.get("receiving")),
        join_delay=join_delay,
    )
    if ok and done:
        datagrams = _float(summary.get("datagrams")) or 0.0
        ideal = bench.source_symbols / (1 - loss / 100)
        used = _float(summary.get("symbols_used")) or 0.0
        # The loss counter also counts what the switch drops after the receiver has the image,
        # while it verifies, hands off and exits (the carousel goes on): at 30% loss that was
        # most of it.  Up to the image, what reached the port is what the receiver took in over
        # the share the loss rule let through (measured on every packet of the run: the rule
        # drops at random, the same share before and after).
        passed = 1 - (count.lost / count.arriving if count.arriving else 0.0)
        outcome.extra = {
            "datagrams": datagrams,
            "K": float(bench.source_symbols),
            "received/ideal": round((datagrams + count.lost + count.overflow) / ideal, 4),
            "to-image/ideal": round((datagrams + count.overflow) / passed / ideal, 4),
            "used/K": round(used / bench.source_symbols, 4),
            "rx_cpu_s": round(done.cpu, 3),
            "rx_peak_rss_mb": _float(summary.get("peak_rss_mb")) or 0.0,
            "late": _float(summary.get("late")) or 0.0,
            "lost": float(count.lost),
            "overflow": float(count.overflow),  # dropped on the receiver's full socket buffer
            # Every UDP/TCP packet that reached its switch port until it exited (also those after
            # it had the image, while it verified and handed it off).
            "arriving": float(count.arriving),
        }
        # What the sender really sent (its pace may fall short of --rate): stopped just after
        # the receiver finished, so this is the transfer's rate.
        served = sender.last_event("finished")
        sent, elapsed = _float(served.get("bytes")), _float(served.get("elapsed"))
        if sent and elapsed:
            outcome.extra["sender_MB/s"] = round(sent / elapsed / 1e6, 1)
            outcome.extra["sender_packets"] = _float(served.get("packets")) or 0.0
        rejected = summary.get("rejected")
        for reason, number in rejected.items() if isinstance(rejected, dict) else ():
            outcome.extra[f"rejected:{reason}"] = float(number)
    return outcome


# A late receiver that took part in a session has the image a moment after the sender exits
# (uftpd moves the file, udp-receiver exits); one still without it this long after the sender
# exited was not part of that session, and the next one is started.
SESSION_SETTLE = 1.0


def _uftpd(bench: Bench, host: Host, name: str) -> tuple[Proc, Path]:
    """uftpd in `host`, receiving into a fresh folder; the path the image will have there."""
    dest, temp = bench.fresh(f"{name}-dest"), bench.fresh(f"{name}-temp")
    proc = bench.procs.start(
        host.command(
            "uftpd",
            "-d",
            "-q",
            "-I",
            host.address,
            "-M",
            UFTP_GROUP,
            "-D",
            str(dest),
            "-T",  # received here, moved to dest when the session completes
            str(temp),
            "-x",
            "1",
            "-B",
            PEER_BUFFER,
        )
    )
    return proc, dest / bench.release.image.name


def run_uftp(bench: Bench, loss: int, join_delay: float | None = None) -> Outcome:
    """With `join_delay` (a late join), a client on `bench.early` is listening when uftp
    starts, so that the session begins as it would for a fleet, and the measured client starts
    `join_delay` s after uftp.  A uftp session serves the clients that answered its
    announcement (uftp(1): "Any client that responds to the announcement will be accepted"),
    so a later one waits for the next session: whenever uftp ends a session without it, the
    benchmark starts uftp again (SESSION_SETTLE later), as a loop or a cron job would, and the
    time includes the sessions it waited for.  The early client leaves after the first."""
    quiesce((bench.tx, bench.rx))

    def send() -> Proc:
        return bench.procs.start(
            bench.tx.command(
                "uftp",
                "-I",
                bench.tx.address,
                "-M",
                UFTP_GROUP,
                "-P",
                UFTP_PRIVATE,
                "-R",
                "-1",
                "-b",
                str(UFTP_BLOCK),
                "-B",
                PEER_BUFFER,
                "-x",
                "2",
                str(bench.release.image),
            )
        )

    early: Proc | None = None
    if join_delay is None:
        meter = Meter(bench.rx, loss, DATA_MATCH["uftp"])
        receiver, out = _uftpd(bench, bench.rx, "uftp")
        wait_joined(receiver, UFTP_GROUP)
        start = time.monotonic()
        sender = send()
    else:
        if bench.early is not None:
            early, _ = _uftpd(bench, bench.early, "uftp-early")
            wait_joined(early, UFTP_GROUP)
        sender = send()
        _sleep_until(time.monotonic() + join_delay)
        meter = Meter(bench.rx, loss, DATA_MATCH["uftp"])
        start = time.monotonic()
        receiver, out = _uftpd(bench, bench.rx, "uftp")
    sessions = 1
    # Done when the file is in dest (uftpd moves it there at the end of the session, which may
    # be just after the sender has exited).
    deadline = start + bench.timeout
    while not out.exists() and time.monotonic() < deadline:
        ended = sender.exit if not sender.running() else None
        if ended is not None and early is not None:
            early.stop()
            early = None
        if ended is not None and join_delay is None:
            deadline = min(deadline, ended.at + 5)
        elif ended is not None and time.monotonic() > ended.at + SESSION_SETTLE:
            sender = send()
            sessions += 1
        time.sleep(POLL)
    arrived = time.monotonic() if out.exists() else None
    sender.wait(time.monotonic() + 30)  # it ends the session with the receivers
    count = meter.read()
    sender.stop()
    receiver.stop()
    if early is not None:
        early.stop()
    match = re.search(r"Status: Completed\s+time:\s+([\d.]+) seconds", sender.text())
    outcome = _outcome(
        "uftp",
        loss,
        bench,
        out,
        count,
        (sender, receiver),
        start=start,
        arrived=arrived,
        data_seconds=float(match[1]) if match else None,
        join_delay=join_delay,
    )
    outcome.sessions = sessions
    outcome.extra = peer_efficiency(count, bench.size, UFTP_BLOCK, loss)
    return outcome


# udpcast's handshake is not retried on either side: when the sender's reply to the receiver's
# connect request is lost, the receiver never joins the data and the sender waits for its
# acknowledgements for ever (seen in ~1 of 8 runs at 5% loss, half the runs at 20%).  An
# operator would start it again; so does the benchmark, counting the lost time.
UDPCAST_CONNECT_SECONDS = 10.0
UDPCAST_ATTEMPTS = 3


def run_udpcast(
    bench: Bench, loss: int, asynchronous: bool, join_delay: float | None = None
) -> Outcome:
    """The receiver listens first, then udp-sender starts; with `join_delay`, a late join
    (`_udpcast_late`)."""
    if join_delay is not None:
        return _udpcast_late(bench, loss, asynchronous, join_delay)
    quiesce((bench.tx, bench.rx))
    meter = Meter(bench.rx, loss, DATA_MATCH["udpcast"])
    out = bench.fresh("udpcast-out") / "image"
    mode = UDPCAST_ASYNC if asynchronous else UDPCAST_DEFAULT
    done: Exit | None = None
    start = time.monotonic()
    for attempt in range(1, UDPCAST_ATTEMPTS + 1):
        receiver = _udp_receiver(bench, bench.rx, out)
        wait_udp_port(receiver, 9000)  # its default portbase
        began_attempt = time.monotonic()
        sender = _udp_sender(bench, mode)
        connected = began_attempt + UDPCAST_CONNECT_SECONDS
        while receiver.seen("Connected as") is None and receiver.running():
            if time.monotonic() > connected:
                break
            time.sleep(0.01)
        if receiver.seen("Connected as") is None and attempt < UDPCAST_ATTEMPTS:
            sender.stop(grace=0.5)  # stuck waiting for each other: no need to be gentle
            receiver.stop(grace=0.5)
            continue
        done = receiver.wait(start + bench.timeout)
        break
    sender.wait(time.monotonic() + 10)
    count = meter.read()
    sender.stop()
    receiver.stop()
    arrived = done.at if done is not None and done.returncode == 0 else None
    began = sender.seen("Starting transfer")
    outcome = _outcome(
        "udpcast-async" if asynchronous else "udpcast",
        loss,
        bench,
        out,
        count,
        (sender, receiver),
        start=start,
        arrived=arrived,
        data_seconds=arrived - began if arrived is not None and began is not None else None,
        gave_up="Missed blocks" in receiver.text(),
    )
    outcome.retries = attempt - 1
    outcome.extra = peer_efficiency(count, bench.size, UDPCAST_BLOCK, loss)
    return outcome


_UDPCAST_COMMON = ("--interface", "eth0", "--nokbd", "--mcast-rdv-address", UDPCAST_RDV)


def _udp_receiver(bench: Bench, host: Host, out: Path) -> Proc:
    return bench.procs.start(
        host.command("udp-receiver", "--file", str(out), "--rcvbuf", PEER_BUFFER, *_UDPCAST_COMMON)
    )


def _udp_sender(bench: Bench, mode: Sequence[str]) -> Proc:
    return bench.procs.start(
        bench.tx.command(
            "udp-sender",
            "--file",
            str(bench.release.image),
            "--nopointopoint",
            "--blocksize",
            str(UDPCAST_BLOCK),
            *_UDPCAST_COMMON,
            *mode,
        )
    )


def _udpcast_late(bench: Bench, loss: int, asynchronous: bool, join_delay: float) -> Outcome:
    """A receiver on `bench.early` is listening when udp-sender starts, so that the session
    begins (it sends nothing before a receiver connects, or async before --autostart HELLOs:
    udp-sender(1)); the measured receiver starts `join_delay` s after udp-sender.  udp-sender
    serves one session and exits: whenever it exits and the late receiver is still waiting,
    the benchmark starts it again (SESSION_SETTLE later), as a loop would; the early receiver
    leaves after the first session.  A late receiver that gives up (exits) ends the run."""
    quiesce((bench.tx, bench.rx))
    mode = UDPCAST_ASYNC if asynchronous else UDPCAST_DEFAULT
    early: Proc | None = None
    if bench.early is not None:
        early = _udp_receiver(bench, bench.early, bench.fresh("udpcast-early") / "image")
        wait_udp_port(early, 9000)
    sender = _udp_sender(bench, mode)
    _sleep_until(time.monotonic() + join_delay)
    meter = Meter(bench.rx, loss, DATA_MATCH["udpcast"])
    out = bench.fresh("udpcast-out") / "image"
    start = time.monotonic()
    receiver = _udp_receiver(bench, bench.rx, out)
    sessions = 1
    first_session = sender
    done: Exit | None = None
    while (done := receiver.wait(0.0)) is None and time.monotonic() < start + bench.timeout:
        ended = sender.exit if not sender.running() else None
        if ended is not None and early is not None:
            early.stop()
            early = None
        if ended is not None and time.monotonic() > ended.at + SESSION_SETTLE:
            sender = _udp_sender(bench, mode)
            sessions += 1
        time.sleep(POLL)
    sender.wait(time.monotonic() + 10)
    count = meter.read()
    sender.stop()
    receiver.stop()
    if early is not None:
        early.stop()
    arrived = done.at if done is not None and done.returncode == 0 else None
    began = first_session.seen("Starting transfer") if sessions == 1 else None
    outcome = _outcome(
        "udpcast-async" if asynchronous else "udpcast",
        loss,
        bench,
        out,
        count,
        (sender, receiver),
        start=start,
        arrived=arrived,
        data_seconds=arrived - max(began, start) if arrived is not None and began else None,
        gave_up="Missed blocks" in receiver.text(),
        join_delay=join_delay,
    )
    outcome.sessions = sessions
    outcome.extra = peer_efficiency(count, bench.size, UDPCAST_BLOCK, loss)
    return outcome


def peer_efficiency(count: Counters, size: int, block: int, loss: int) -> dict[str, float]:
    """uftp's and udpcast's counterpart of otacast's received/ideal: their data packets that
    reached the receiver's switch port (received + dropped by the loss rule: the Meter's `data`
    counter, before the loss) over the fewest that can carry the image at loss p,
    ceil(size / block) / (1 - p).  Their other UDP packets that reached it (announcements,
    FILEINFO, DONE, REQACK, HELLO...) are counted apart, in neither figure."""
    blocks = math.ceil(size / block)
    return {
        "data_packets": float(count.data),
        "blocks": float(blocks),
        "control_packets": float(count.arriving - count.data),
        "received/ideal": round(count.data / (blocks / (1 - loss / 100)), 4),
        # The same: the peers' senders send no data once the receiver has the image.
        "to-image/ideal": round(count.data / (blocks / (1 - loss / 100)), 4),
        "lost": float(count.lost),
        "overflow": float(count.overflow),
    }


def run_http(bench: Bench, loss: int, join_delay: float | None = None) -> Outcome:
    """A late join is the same as any run: the client starts when the device wants the image
    and the server is always up; `join_delay` only labels the outcome."""
    quiesce((bench.tx, bench.rx))
    meter = Meter(bench.rx, loss)
    out = bench.fresh("http-out") / "image"
    start = time.monotonic()
    client = bench.procs.start(
        bench.rx.command(str(BIN / "python"), str(HTTP_GET), bench.http_url, str(out))
    )
    done = client.wait(start + bench.timeout)
    count = meter.read()
    client.stop()
    report = client.json_lines()
    arrived = done.at if done is not None and done.returncode == 0 and report else None
    return _outcome(
        "http",
        loss,
        bench,
        out,
        count,
        (client,),
        start=start,
        arrived=arrived,
        data_seconds=_float(report[-1].get("seconds")) if report else None,
        join_delay=join_delay,
    )


def _sleep_until(when: float) -> None:
    while (left := when - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def ssm_group(release: Release) -> str:
    return parse_envelope(release.manifest.read_bytes()).manifest.transport.ssm_group


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _tail(proc: Proc, lines: int = 12) -> str:
    """The last lines a program printed, for the record of a failed run."""
    kept = [line.rstrip() for line in proc.text().splitlines() if line.strip()]
    program = Path(proc.command[4]).name if len(proc.command) > 4 else "?"
    return "\n".join([f"[{program}]", *kept[-lines:]])
