"""``otacast fetch``: the receiver's driver.

It owns the clock (wall time), the socket, the state directory, DNS, HTTP and the terminal; the
decisions are the `ReceiverCore`'s.  The loop waits on the socket (or the core's next timer),
hands every datagram to the core, and acts on its events: open staging when a manifest is
verified (resuming what is already on disk), persist each verified chunk, start HTTP repair when
the core asks for fallback, finish when the image is complete.

HTTP repair runs in one worker thread that fetches the chunks still missing, one at a time, and
passes verified chunks back through a queue; only the main thread writes to staging and talks to
the core, so multicast and HTTP share one state without locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from otacast.schemas import addressing
from otacast.schemas.limits import MAX_DATAGRAM
from otacast.schemas.policy import TrustSet, VerifiedManifest

from .config import Settings
from .core import ReceiverCore
from .discovery import discover
from .errors import (
    DiscoveryError,
    FetchError,
    IncompleteError,
    NoManifestError,
    StateError,
    UsageError,
)
from .events import ChunkComplete, FallbackNeeded, ImageComplete, ManifestRefused, ManifestVerified
from .fetcher import HttpFetcher
from .staging import Staging
from .status import StatusFile
from .transport import Join, MulticastReceiver

# Datagrams taken from the socket per turn of the loop before timers and HTTP results are
# looked at again: keeps both responsive under a flood without a syscall per check.
MAX_BURST = 512
# Verified chunks waiting for the writer thread (4 MiB each at the default chunk size).
WRITE_QUEUE = 4
# Longest wait for a datagram; bounds how late HTTP results and the status line are handled.
POLL_INTERVAL = 0.1
# How often the status file is rewritten during a download: fresh enough for `otacast status`,
# rare enough to cost nothing.
STATUS_INTERVAL = 1.0


@dataclass
class FetchOptions:
    trust: TrustSet
    out: Path
    state_dir: Path
    interface: str | None = None
    channel: str | None = None
    scope: str = addressing.DEFAULT_SCOPE
    group: str | None = None
    port: int | None = None
    sources: Sequence[str] = ()
    resolver: str | None = None
    manifest: VerifiedManifest | None = None
    device_type: str | None = None
    installed_sequence: int | None = None
    join_timeout: float = 10.0
    stall_timeout: float = 30.0
    fallback: str = "auto"  # auto | only | never
    json: bool = False
    http_timeout: float = 10.0
    status: StatusFile | None = None
    packet_auth: str = "auto"  # auto | require | off (see otacast.plugin.core)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        trust: TrustSet,
        *,
        manifest: VerifiedManifest | None = None,
        installed_sequence: int | None = None,
        json: bool = False,
        status: StatusFile | None = None,
    ) -> FetchOptions:
        return cls(
            trust=trust,
            out=settings.out_path,
            state_dir=settings.state_dir,
            interface=settings.interface,
            channel=settings.channel,
            scope=settings.scope,
            group=settings.group,
            port=settings.port,
            sources=settings.source,
            resolver=settings.resolver,
            manifest=manifest,
            device_type=settings.device_type,
            installed_sequence=installed_sequence,
            join_timeout=settings.join_timeout,
            stall_timeout=settings.stall_timeout,
            fallback=settings.fallback,
            json=json,
            status=status,
            packet_auth=settings.packet_auth,
        )


@dataclass
class FetchSummary:
    manifest: VerifiedManifest
    elapsed: float
    bytes_multicast: int
    bytes_http: int
    bytes_resumed: int
    receiving: float  # seconds from the first datagram to the verified image
    datagrams: int
    symbols_used: int
    late: int  # symbols of chunks already complete (the sender's per-pass overhead)
    rejected: dict[str, int]
    joins: list[str] = field(default_factory=list)
    auth: dict[str, int] | None = None  # packet authentication counters, when it was used


class _Writer(threading.Thread):
    """Persists verified chunks off the receive loop.

    Writing and syncing a 4 MiB chunk takes tens of milliseconds; done inline, the socket buffer
    overflowed and the lost symbols cost whole extra passes.  The queue is bounded, so at most
    ``WRITE_QUEUE`` chunks wait in memory; a write error is kept and re-raised by the loop.
    """

    def __init__(self, staging: Staging) -> None:
        super().__init__(name="otacast-writer", daemon=True)
        self.staging = staging
        self.queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(WRITE_QUEUE)
        self.error: StateError | None = None

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.staging.write_chunk(*item)
                except StateError as exc:
                    self.error = exc

    def put(self, index: int, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((index, data))

    def flush(self) -> None:
        """Wait for every queued chunk to be on disk; raise the first write error."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class _Repair(threading.Thread):
    """Fetches the chunks still missing over HTTP and queues the verified ones."""

    def __init__(self, manifest: VerifiedManifest, missing: list[int], timeout: float) -> None:
        super().__init__(name="otacast-http", daemon=True)
        self.m = manifest.manifest
        self.missing = missing
        self.results: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self.done_elsewhere: set[int] = set()
        self.failures: list[str] = []
        self.fetcher = HttpFetcher(self.m.http, timeout=timeout)
        self.stop = threading.Event()

    def run(self) -> None:
        for index in self.missing:
            if self.stop.is_set():
                break
            if index in self.done_elsewhere:  # multicast got there first
                continue
            offset, length = self.m.chunk_span(index)
            try:
                data = self.fetcher.fetch_chunk(index, offset, length, self.m.chunks.sha256[index])
            except FetchError as exc:
                self.failures.append(str(exc))
                continue
            self.results.put((index, data))
        self.results.put(None)


def plan_joins(options: FetchOptions, emit: Reporter) -> tuple[list[Join], int]:
    """Which (S,G) or G to join and on which port, from options, DNS or the manifest."""
    transport = options.manifest.manifest.transport if options.manifest else None
    channel = options.channel or (transport.channel if transport else None)
    scope = transport.scope if transport and not options.channel else options.scope
    port = options.port or (transport.port if transport else addressing.DEFAULT_PORT)
    if options.group:
        group = options.group
        if options.sources:
            return [Join(group, s) for s in options.sources], port
        return [Join(group)], port
    if channel is None:
        raise UsageError("give --channel, --group or --manifest so there is something to join")
    ssm = transport.ssm_group if transport else addressing.ssm_group(channel, scope)
    asm = transport.asm_group if transport else addressing.asm_group(channel, scope)
    if options.sources:
        return [Join(ssm, s) for s in options.sources], port
    try:
        hosts = discover(channel, resolver=options.resolver)
    except DiscoveryError as exc:
        emit.note(f"DNS discovery failed ({exc}); joining the ASM group {asm}")
        return [Join(asm)], port
    if not hosts:
        emit.note(f"no SRV records for {addressing.srv_name(channel)}; joining ASM group {asm}")
        return [Join(asm)], port
    srv_port = options.port or hosts[0].port
    joins = [Join(ssm, address) for host in hosts for address in host.addresses]
    emit.note(
        f"SRV {addressing.srv_name(channel)}: joining {ssm} from "
        + ", ".join(j.source or "" for j in joins)
    )
    return joins, srv_port


def fetch(options: FetchOptions, out: TextIO) -> FetchSummary:
    emit = Reporter(out, options.json)
    if options.fallback == "only" and options.manifest is None:
        raise UsageError("--fallback only needs --manifest (the mirrors are listed in it)")
    given = options.manifest
    if options.packet_auth == "require" and given is not None and not given.manifest.stream_keys:
        raise UsageError(
            f"{given.manifest.name} {given.manifest.version} lists no stream keys and "
            "packet_auth is require"
        )
    receiver: MulticastReceiver | None = None
    joins: list[Join] = []
    if options.fallback != "only":
        if options.interface is None:
            raise UsageError("--interface is needed to receive multicast")
        joins, port = plan_joins(options, emit)
        receiver = MulticastReceiver(options.interface, port, joins)
    start = time.time()
    core = ReceiverCore(
        options.trust,
        now=start,
        device_type=options.device_type,
        installed_sequence=options.installed_sequence,
        manifest=options.manifest,
        join_timeout=options.join_timeout,
        stall_timeout=options.stall_timeout,
        packet_auth=options.packet_auth,
    )
    run = _Run(options, core, receiver, emit, start)
    try:
        run.loop()
    finally:
        run.close()
    assert core.verified is not None
    end = time.time()
    summary = FetchSummary(
        manifest=core.verified,
        elapsed=end - start,
        bytes_multicast=core.stats.bytes_multicast,
        bytes_http=run.bytes_http,
        bytes_resumed=run.bytes_resumed,
        receiving=end - (core.first_datagram_at or start),
        datagrams=core.stats.datagrams,
        symbols_used=core.stats.symbols_used,
        late=core.stats.late,
        rejected=dict(core.stats.rejected),
        joins=[f"({j.source or '*'}, {j.group})" for j in joins],
        auth=dataclasses.asdict(core.authenticator.stats) if core.authenticator else None,
    )
    emit.summary(summary)
    return summary


class _Run:
    def __init__(
        self,
        options: FetchOptions,
        core: ReceiverCore,
        receiver: MulticastReceiver | None,
        emit: Reporter,
        start: float,
    ) -> None:
        self.options = options
        self.core = core
        self.receiver = receiver
        self.emit = emit
        self.start = start
        self.staging: Staging | None = None
        self.writer: _Writer | None = None
        self.repair: _Repair | None = None
        self.bytes_http = 0
        self.bytes_resumed = 0
        self.finished = False
        self.buffer = bytearray(MAX_DATAGRAM + 1)
        self._truncated = 0  # datagrams the transport dropped as too long, already counted
        self._next_status = 0.0

    def loop(self) -> None:
        self._handle_events()
        while not self.finished:
            now = time.time()
            timer = self.core.get_timer()
            wait = POLL_INTERVAL if timer is None else max(0.0, min(POLL_INTERVAL, timer - now))
            if self.receiver is not None:
                readable, _, _ = select.select([self.receiver], [], [], wait)
                if readable:
                    self._drain()
            else:
                time.sleep(wait)
            self.core.handle_timer(time.time())
            self._take_http_results()
            self._handle_events()
            self.emit.progress(self.core, self.start, self.bytes_http)
            self._report_status()
            self._check_gave_up()

    def _report_status(self) -> None:
        status, verified = self.options.status, self.core.verified
        now = time.time()
        if status is None or verified is None or now < self._next_status:
            return
        self._next_status = now + STATUS_INTERVAL
        m = verified.manifest
        status.update(
            activity="downloading",
            release=f"{m.name} {m.version}",
            sequence=m.sequence,
            bytes_done=sum(m.chunk_span(i)[1] for i in self.core.done),
            bytes_total=m.image.length,
            bytes_http=self.bytes_http,
        )

    def _drain(self) -> None:
        assert self.receiver is not None
        now = time.time()
        for _ in range(MAX_BURST):
            got = self.receiver.recv_into(self.buffer)
            if got is None:
                break
            size, source = got
            self.core.receive_datagram(bytes(self.buffer[:size]), source, now)
        # A datagram longer than the buffer never reaches the core: the transport drops it and
        # counts it.  It is a hostile datagram like any other, so it is counted with them.
        dropped = self.receiver.truncated - self._truncated
        if dropped:
            self.core.stats.rejected["oversized"] += dropped
            self._truncated += dropped

    def _handle_events(self) -> None:
        while (event := self.core.next_event()) is not None:
            if isinstance(event, ManifestVerified):
                self._open_staging(event.verified)
            elif isinstance(event, ChunkComplete):
                assert self.writer is not None
                self.writer.put(event.index, event.data)
                if self.repair is not None:
                    self.repair.done_elsewhere.add(event.index)
            elif isinstance(event, ManifestRefused):
                self.emit.note(f"refused a manifest on the channel: {event.message}")
            elif isinstance(event, FallbackNeeded):
                self._fall_back(event.reason)
            elif isinstance(event, ImageComplete):
                self._finish()

    def _open_staging(self, verified: VerifiedManifest) -> None:
        m = verified.manifest
        self.emit.note(
            f"manifest verified: {m.name} version {m.version} sequence {m.sequence}, "
            f"{m.image.length} bytes in {m.chunk_count} chunks"
        )
        self.staging = Staging(self.options.state_dir, verified)
        self.writer = _Writer(self.staging)
        self.writer.start()
        now = time.time()
        for index in sorted(self.staging.resume()):
            self.core.mark_done(index, now)
            self.bytes_resumed += m.chunk_span(index)[1]
        if self.bytes_resumed:
            self.emit.note(f"resumed {self.bytes_resumed} verified bytes from the state directory")
        if self.options.fallback == "only":
            self._fall_back("only")

    def _fall_back(self, reason: str) -> None:
        verified = self.core.verified
        if verified is None:
            # Whatever the policy: without a manifest there is nothing to fetch or wait for
            # (`watch` takes this as a quiet channel and joins again, re-reading DNS).
            raise NoManifestError(
                f"no manifest heard within {self.options.join_timeout:g} s; nothing to fall "
                "back with (give --manifest, or check the interface, group and DNS)"
            )
        if self.options.fallback == "never":
            self.emit.note(f"multicast {reason}; HTTP fallback is disabled, still listening")
            return
        if not verified.manifest.http:
            if self.receiver is None:
                raise IncompleteError("--fallback only, but the manifest lists no HTTP mirror")
            self.emit.note(f"multicast {reason}, and the manifest lists no HTTP mirror")
            return
        if self.repair is not None:
            return
        missing = [i for i in range(verified.manifest.chunk_count) if i not in self.core.done]
        self.emit.note(f"multicast {reason}: fetching {len(missing)} missing chunk(s) over HTTP")
        self.repair = _Repair(verified, missing, self.options.http_timeout)
        self.repair.start()

    def _take_http_results(self) -> None:
        if self.repair is None:
            return
        while True:
            try:
                item = self.repair.results.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self.repair.join()
                continue
            index, data = item
            if index in self.core.done or self.writer is None:
                continue
            self.writer.put(index, data)
            self.bytes_http += len(data)
            self.core.mark_done(index, time.time())
            self._handle_events()

    def _check_gave_up(self) -> None:
        """Give up when HTTP has finished with failures and multicast brings nothing either."""
        repair = self.repair
        if self.finished or repair is None or repair.is_alive() or not repair.failures:
            return
        quiet = time.time() - self.core.last_progress
        if self.receiver is None or quiet >= self.options.stall_timeout:
            self._take_http_results()  # keep every verified chunk for the next run
            raise IncompleteError(
                f"{len(repair.failures)} chunk(s) could not be fetched: {repair.failures[0]}"
            )

    def _finish(self) -> None:
        assert self.staging is not None and self.writer is not None
        self.writer.flush()
        self.writer = None
        self.staging.finish(self.options.out)
        self.staging.discard()
        self.staging = None
        self.finished = True

    def close(self) -> None:
        if self.repair is not None:
            self.repair.stop.set()
        if self.receiver is not None:
            self.receiver.close()
        if self.writer is not None:
            # Whatever was verified is kept for the next run; a write error that ended this run
            # is already on its way out.
            with contextlib.suppress(StateError):
                self.writer.flush()
        if self.staging is not None:
            self.staging.close()


class Reporter:
    """A refreshed status line on a terminal, notes on their own lines, or JSON lines."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.json = as_json
        self.tty = out.isatty() and not as_json
        self._next = 0.0
        self._dirty = False

    def _line(self, text: str) -> None:
        if self._dirty:
            self.out.write("\n")
            self._dirty = False
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        if self.json:
            self._line(json.dumps({"event": "note", "message": text}))
        else:
            self._line(text)

    def progress(self, core: ReceiverCore, start: float, bytes_http: int) -> None:
        now = time.time()
        if now < self._next or core.verified is None:
            return
        self._next = now + 1.0
        m = core.verified.manifest
        done = sum(m.chunk_span(i)[1] for i in core.done)
        elapsed = max(now - start, 1e-6)
        rejected = sum(core.stats.rejected.values())
        if self.json:
            self._line(
                json.dumps(
                    {
                        "event": "progress",
                        "chunks_done": len(core.done),
                        "chunks": m.chunk_count,
                        "bytes_done": done,
                        "bytes": m.image.length,
                        "bytes_http": bytes_http,
                        "datagrams": core.stats.datagrams,
                        "rejected": rejected,
                        "rejected_by": dict(core.stats.rejected),
                        "elapsed": round(elapsed, 3),
                    }
                )
            )
        elif self.tty:
            percent = 100 * done / m.image.length
            self.out.write(
                f"\r{percent:5.1f}% {len(core.done)}/{m.chunk_count} chunks "
                f"{core.stats.bytes_multicast / elapsed / 1e6:6.1f} MB/s multicast "
                f"{bytes_http / 1e6:.1f} MB http, {rejected} rejected "
            )
            self.out.flush()
            self._dirty = True

    def summary(self, s: FetchSummary) -> None:
        m = s.manifest.manifest
        if self.json:
            self._line(
                json.dumps(
                    {
                        "event": "finished",
                        "name": m.name,
                        "version": m.version,
                        "sequence": m.sequence,
                        "bytes": m.image.length,
                        "bytes_multicast": s.bytes_multicast,
                        "bytes_http": s.bytes_http,
                        "bytes_resumed": s.bytes_resumed,
                        "datagrams": s.datagrams,
                        "symbols_used": s.symbols_used,
                        "late": s.late,
                        "rejected": s.rejected,
                        "elapsed": round(s.elapsed, 3),
                        "receiving": round(s.receiving, 3),
                        "peak_rss_mb": peak_rss_mb(),
                        "joins": s.joins,
                        "packet_auth": s.auth,
                    },
                    sort_keys=True,
                )
            )
            return
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.rejected.items())) or "none"
        self._line(
            f"done: {m.name} {m.version} ({m.image.length} bytes, sha256 verified) in "
            f"{s.elapsed:.1f} s; multicast {s.bytes_multicast}, HTTP {s.bytes_http}, "
            f"resumed {s.bytes_resumed} bytes; {s.datagrams} datagrams, rejected: {reasons}"
            + (
                f"; packet authentication: {s.auth['pages_signed']} pages signed, "
                f"{s.auth['pages_linked']} linked"
                if s.auth
                else ""
            )
        )


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process image (VmHWM; resets at exec, unlike ru_maxrss,
    which inherits the forking parent's peak), in MB; None where /proc is unavailable."""
    try:
        with Path("/proc/self/status").open(encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
