"""``otacast-signer serve``: the carousel sender's driver.

It owns the clock, the files, the sockets and the terminal; the decisions (what to send next,
when) are the sans-IO `SenderCore`'s.  One core and one socket run per rate channel, all from
one loop: the loop asks every core for its next action, performs the sends, and sleeps until
the earliest core is ready again.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from otacast.schemas import addressing, fec, wire
from otacast.schemas.errors import Expired
from otacast.schemas.limits import DEFAULT_MAX_DATAGRAM
from otacast.schemas.manifest import Envelope

from . import symbol_cache
from .auth_pages import AuthCarousel, release_pages
from .errors import ReadError, UsageError
from .keys import SigningKey
from .schedule import Finished, SenderCore, SendManifest, SendSymbols, Wait, per_pass
from .sign import check_image
from .transport import MulticastSender, gso_batch

# A rate the sender reaches less than this share of, over at least MIN_RATE_CHECK seconds, is
# reported to the operator: the link or the CPU cannot keep up with what was asked.
RATE_SHORTFALL = 0.95
MIN_RATE_CHECK = 2.0
# Longest sleep: keeps status output and signal handling responsive.
MAX_SLEEP = 0.05


@dataclass
class ServeOptions:
    interface: str
    rates: list[int]  # bytes/s per rate channel; 0 = unpaced
    group: str | None = None
    port: int | None = None
    asm: bool = False
    source: str | None = None
    hops: int = 8
    sender_index: int = 0
    sender_count: int = 1
    loops: int | None = None
    duration: float | None = None
    overhead: float = 0.1
    repair: float = 0.5
    window: int | None = None  # None: fec.window_chunks(chunk size)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "otacast")
    gso: bool = True
    loopback: bool = False
    json: bool = False
    stream_key: SigningKey | None = None  # signs AUTH pages (packet authentication)


@dataclass
class Channel:
    rate: int
    group: str
    core: SenderCore
    sender: MulticastSender
    auth: AuthCarousel | None = None


@dataclass
class ServeSummary:
    elapsed: float
    packets: int
    bytes: int
    passes: int
    reason: str
    channels: list[dict[str, object]]


def default_window(chunk_size: int, sender_count: int) -> int:
    """Chunks interleaved at once when --window is not given.

    Receivers hold decoders for two windows (`MAX_DECODER_BYTES`), and each of N senders starts
    at a different window, so with N > 2 senders each window shrinks to 2/N of the usual: a
    receiver hearing all of them still has decoder room for every window in flight (measured:
    four senders at the usual window were slower than one, 0.83x; at half of it 3.5x faster).
    """
    window = fec.window_chunks(chunk_size)
    if sender_count > 2:
        window = max(1, window * 2 // sender_count)
    return window


def channel_group(envelope: Envelope, options: ServeOptions, index: int) -> str:
    transport = envelope.manifest.transport
    if options.group and index == 0:
        return options.group
    if index == 0:
        return transport.asm_group if options.asm else transport.ssm_group
    derive = addressing.asm_group if options.asm else addressing.ssm_group
    return derive(transport.channel, transport.scope, index)


class Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so shutdown is always clean."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.reason = signal.Signals(signum).name

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def serve(
    envelope: Envelope,
    image: Path,
    options: ServeOptions,
    out: TextIO,
    *,
    clock: Callable[[], float] = time.monotonic,
    stop: Stop | None = None,
) -> ServeSummary:
    manifest = envelope.manifest
    if time.time() >= manifest.expires:
        raise Expired("the manifest has expired: devices would refuse it; sign a new one")
    if options.group and len(options.rates) > 1:
        raise UsageError("--group names one group; it cannot be used with several rates")
    if options.repair < symbol_cache.MIN_REPAIR_FRACTION:
        raise UsageError("--repair must be at least 50%")
    if options.repair > symbol_cache.MAX_REPAIR_FRACTION:
        raise UsageError("--repair is at most 400%")
    check_image(manifest, image)
    emit = Reporter(out, options.json)
    emit.event("encoding", chunks=manifest.chunk_count, cache_dir=str(options.cache_dir))
    path = symbol_cache.build(
        manifest, image, options.cache_dir, options.repair, progress=emit.encoding
    )
    layout = symbol_cache.CycleLayout.for_manifest(manifest, options.repair)
    batch = gso_batch(layout.datagram_size)
    fragments = tuple(
        wire.build_datagram(p)
        for p in wire.fragment_envelope(
            manifest.session_id,
            envelope.envelope_id,
            envelope.compact_bytes,
            min(DEFAULT_MAX_DATAGRAM, layout.datagram_size),
        )
    )
    sends = [
        per_pass(manifest.source_symbols(c), layout.cycles[c], options.overhead)
        for c in range(manifest.chunk_count)
    ]
    port = options.port or manifest.transport.port
    channels: list[Channel] = []
    reader = symbol_cache.SymbolReader(path, layout, batch)
    try:
        pages = _auth_pages(envelope, options, reader, emit)
        start = clock()
        for index, rate in enumerate(options.rates):
            group = channel_group(envelope, options, index)
            sender = MulticastSender(
                options.interface,
                group,
                port,
                hops=options.hops,
                source=options.source,
                gso=options.gso,
                loopback=options.loopback,
            )
            core = SenderCore(
                layout.cycles,
                sends,
                datagram_size=layout.datagram_size,
                batch=batch,
                window=options.window or default_window(manifest.chunks.size, options.sender_count),
                rate=rate,
                manifest=fragments,
                now=start,
                sender_index=options.sender_index,
                sender_count=options.sender_count,
                passes=options.loops,
                duration=options.duration,
            )
            carousel = (
                AuthCarousel(pages, wire.auth_capacity(layout.datagram_size))
                if pages is not None
                else None
            )
            channels.append(Channel(rate, group, core, sender, carousel))
            emit.event(
                "serving",
                group=group,
                port=port,
                source=sender.source,
                interface=options.interface,
                rate=rate,
                session=manifest.session_id.hex(),
                sender=f"{options.sender_index}/{options.sender_count}",
            )
        # Signals become a clean stop only now: during hashing and encoding, Ctrl-C or SIGTERM
        # must end the process at once (the unfinished cache file is removed).
        stop = stop or Stop()
        stop.install()
        reason = _loop(channels, reader, emit, clock, stop)
    finally:
        reader.close()
        for channel in channels:
            channel.sender.close()
    elapsed = clock() - start
    summary = ServeSummary(
        elapsed=elapsed,
        packets=sum(c.sender.counters.datagrams for c in channels),
        bytes=sum(c.core.stats.data_bytes + c.core.stats.manifest_bytes for c in channels),
        passes=min(c.core.stats.passes for c in channels),
        reason=reason,
        channels=[_channel_report(c, elapsed) for c in channels],
    )
    emit.summary(summary)
    return summary


def _auth_pages(
    envelope: Envelope,
    options: ServeOptions,
    reader: symbol_cache.SymbolReader,
    emit: Reporter,
) -> list[list[bytes]] | None:
    """Every chunk's signed AUTH pages, or None without a stream key."""
    manifest = envelope.manifest
    key = options.stream_key
    if key is None:
        if manifest.stream_keys:
            emit.warning(
                "the manifest lists stream keys but no --stream-key was given: devices that "
                "authenticate packets will not decode this sender's data"
            )
        return None
    senders = [k.sender for k in manifest.stream_keys if k.public == key.public]
    if not senders:
        raise UsageError(
            f"stream key {key.key_id} is not one the manifest lists "
            "(sign the release with --stream-key naming its public key)"
        )
    try:
        pages = release_pages(reader, manifest.session_id, senders[0], key.signer())
    except OSError as exc:
        raise ReadError(f"cannot read the symbol cache: {exc.strerror or exc}") from None
    emit.event("auth-pages", sender=senders[0], pages=sum(len(p) for p in pages))
    return pages


def _channel_report(channel: Channel, elapsed: float) -> dict[str, object]:
    stats = channel.core.stats
    sent = stats.data_bytes + stats.manifest_bytes
    return {
        "group": channel.group,
        "rate_target": channel.rate,
        "rate_reached": round(sent / elapsed) if elapsed > 0 else 0,
        "passes": stats.passes,
        "data_packets": stats.data_packets,
        "manifest_packets": stats.manifest_packets,
        "gso": channel.sender.gso_size > 0,
        "auth_packets": channel.auth.datagrams if channel.auth else 0,
        "auth_bytes": channel.auth.bytes if channel.auth else 0,
    }


def _loop(
    channels: list[Channel],
    reader: symbol_cache.SymbolReader,
    emit: Reporter,
    clock: Callable[[], float],
    stop: Stop,
) -> str:
    size = reader.layout.datagram_size
    live = list(channels)
    start = clock()
    warned = False
    next_check = start + MIN_RATE_CHECK
    while live:
        if stop.reason:
            return stop.reason
        now = clock()
        wake = now + MAX_SLEEP
        for channel in list(live):
            action = channel.core.next_action(now)
            if isinstance(action, SendSymbols):
                if channel.auth is not None:
                    for page in channel.auth.before(action.chunk, action.first, action.count):
                        channel.sender.send_datagram(page)
                run = reader.read(action.chunk, action.first, action.count)
                channel.sender.send_run(run, action.count, size)
                wake = now
            elif isinstance(action, SendManifest):
                for datagram in action.datagrams:
                    channel.sender.send_datagram(datagram)
                wake = now
            elif isinstance(action, Wait):
                wake = min(wake, action.until)
            elif isinstance(action, Finished):
                live.remove(channel)
        if emit.due(now):
            emit.progress(channels, now - start)
        if not warned and now >= next_check:
            next_check = now + 1.0
            warned = _warn_shortfall(channels, now - start, emit)
        if wake > now:
            time.sleep(wake - now)
    return "done"


def _warn_shortfall(channels: list[Channel], elapsed: float, emit: Reporter) -> bool:
    for channel in channels:
        stats = channel.core.stats
        reached = (stats.data_bytes + stats.manifest_bytes) / elapsed
        if channel.rate and reached < RATE_SHORTFALL * channel.rate:
            emit.warning(
                f"reaching {reached / 1e6:.1f} MB/s of the {channel.rate / 1e6:.1f} MB/s asked "
                f"on {channel.group}: the CPU or the link cannot keep up"
            )
            return True
    return False


class Reporter:
    """Status for people (one refreshed line on a terminal, a line every 10 s otherwise) or
    JSON lines for machines (one per second)."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.json = as_json
        self.tty = out.isatty()
        self.interval = 1.0 if (as_json or self.tty) else 10.0
        self._next: float | None = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def event(self, name: str, **fields: object) -> None:
        if self.json:
            self._write(json.dumps({"event": name, **fields}, sort_keys=True) + "\n")
        elif name == "serving":
            self._write(
                f"serving session {fields['session']} as sender {fields['sender']} to "
                f"[{fields['group']}]:{fields['port']} from {fields['source']} on "
                f"{fields['interface']} at {_rate_text(fields['rate'])}\n"
            )

    def encoding(self, done: int, total: int) -> None:
        if self.tty and not self.json:
            self._write(f"\rencoding symbols: chunk {done}/{total}")
            if done == total:
                self._write("\n")

    def due(self, now: float) -> bool:
        if self._next is None:  # the first report comes one interval in, with a real rate
            self._next = now + self.interval
        if now >= self._next:
            self._next = now + self.interval
            return True
        return False

    def progress(self, channels: list[Channel], elapsed: float) -> None:
        if elapsed <= 0:
            return
        packets = sum(c.sender.counters.datagrams for c in channels)
        sent = sum(c.core.stats.data_bytes + c.core.stats.manifest_bytes for c in channels)
        passes = min(c.core.stats.passes for c in channels)
        if self.json:
            self.event(
                "progress",
                elapsed=round(elapsed, 3),
                packets=packets,
                bytes=sent,
                passes=passes,
                rate=round(sent / elapsed),
            )
            return
        line = (
            f"{elapsed:7.1f} s  pass {passes}  {packets} packets  {sent / elapsed / 1e6:8.1f} MB/s"
        )
        self._write(f"\r{line}" if self.tty else line + "\n")

    def warning(self, text: str) -> None:
        if self.json:
            self.event("warning", message=text)
        else:
            self._write(("\n" if self.tty else "") + f"warning: {text}\n")

    def summary(self, s: ServeSummary) -> None:
        if self.json:
            self.event(
                "finished",
                reason=s.reason,
                elapsed=round(s.elapsed, 3),
                packets=s.packets,
                bytes=s.bytes,
                passes=s.passes,
                channels=s.channels,
                peak_rss_mb=peak_rss_mb(),
            )
            return
        rate = s.bytes / s.elapsed / 1e6 if s.elapsed > 0 else 0.0
        self._write(
            ("\n" if self.tty else "") + f"stopped ({s.reason}) after {s.elapsed:.1f} s:"
            f" {s.passes} pass(es), {s.packets} packets, {s.bytes} bytes, "
            f"{rate:.1f} MB/s\n"
        )


def _rate_text(rate: object) -> str:
    if not isinstance(rate, int | float) or not rate:
        return "full speed (unpaced)"
    return f"{rate / 1e6:g} MB/s"


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
