"""``otacast-signer serve``: the carousel sender's driver.

Theory of operation
-------------------
Setup (`channels.build_channels`) checks and encodes the release and plans one channel per rate;
this driver owns what remains of the world: the clock, the sockets and the signals.  It opens
one socket and makes one sans-IO `SenderCore` per channel, then runs them all from one loop:
the loop asks every core for its next action, performs it (reads a run of DATA datagrams from
the symbol cache, sends MANIFEST fragments, or sends the signed AUTH pages a `SendAuth` names),
and sleeps until the earliest core is ready again.  What to send and when is always the core's
decision; what the operator sees is the reporter's (`report`), fed with snapshots.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from otacast.schemas import fdt
from otacast.schemas.limits import SERVE_EXPIRY_CHECK_SECONDS
from otacast.schemas.manifest import Envelope
from otacast.schemas.units import format_time

from . import announce, lifetime
from .auth_pages import AuthPages
from .channels import ChannelPlan, ServeOptions, ServePlan, build_channels
from .errors import ServedManifestExpired
from .listeners import Listeners
from .metrics import SenderCollector, SenderSnapshot
from .report import ChannelStats, Reporter, ServeProgress, ServeSummary
from .schedule import Finished, SendAuth, SenderCore, SendManifest, SendSymbols, Wait
from .symbol_cache import SymbolReader
from .transport import MulticastSender, check_interface

# A rate the sender reaches less than this share of, over at least MIN_RATE_CHECK seconds, is
# reported to the operator: the link or the CPU cannot keep up with what was asked.
RATE_SHORTFALL = 0.95
MIN_RATE_CHECK = 2.0
# Longest sleep: keeps status output and signal handling responsive.
MAX_SLEEP = 0.05
# How often the loop reads the MLD listener socket: reports wait at most this long, and the
# loop's many turns a second (one per GSO batch) do not each cost a system call.
LISTENER_POLL = 0.01
# The loop's reason for stopping when the served manifest expired (`lifetime`).
EXPIRED = "expired"


@dataclass
class Channel:
    rate: int
    group: str
    core: SenderCore
    sender: MulticastSender
    reader: SymbolReader
    auth: AuthPages | None = None
    share: float = 1.0
    # A side channel (the delta lane, the index group: `channels`) has its session's name: it
    # runs while the others do, unpaced at `share`.
    side: str = ""

    @property
    def lane(self) -> bool:
        """A side channel, not a carousel of the image."""
        return bool(self.side)


class Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so shutdown is always clean."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.reason = signal.Signals(signum).name

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def _exit_unwinding(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # the exit status a shell gives a process the signal ended


def serve(
    envelope: Envelope,
    image: Path,
    options: ServeOptions,
    out: TextIO,
    *,
    clock: Callable[[], float] = time.monotonic,
    stop: Stop | None = None,
    metrics: SenderCollector | None = None,
    wall: Callable[[], float] = time.time,
) -> ServeSummary:
    report = Reporter(out, options.json)
    # Until `Stop` takes over, SIGTERM (a service manager's stop) unwinds like Ctrl-C, so the
    # cache file being encoded is removed rather than left behind for good.
    if threading.current_thread() is threading.main_thread():  # (only it may set handlers)
        signal.signal(signal.SIGTERM, _exit_unwinding)
    check_interface(options.interface, options.source)  # (before hashing and encoding)
    plan = build_channels(envelope, image, options, report)
    channels: list[Channel] = []
    announcement: announce.Announcement | None = None
    listeners: Listeners | None = None
    try:
        start = clock()
        listeners = _listeners(plan, start, report)
        for channel_plan in plan.channels:
            channel = _open(plan, channel_plan, start)
            channels.append(channel)
            report.event(
                f"serving-{channel.side}" if channel.lane else "serving",
                group=channel.group,
                port=plan.port,
                source=channel.sender.source,
                interface=options.interface,
                rate=channel.rate,
                session=plan.manifest.session_id.hex(),
                sender=f"{options.sender_index}/{options.sender_count}",
                # (senders of one release must agree on it: README, "Several senders")
                round_seconds=channel.core.round_seconds,
                expires=plan.manifest.expires,
                expires_at=format_time(plan.manifest.expires),
                **({"airtime": "share" if listeners is None else "mld"} if channel.lane else {}),
            )
        announcement = announce.start(
            plan.manifest,
            channels[0].sender,
            plan.fragments,
            start,
            report,
            enabled=options.announce,
            hops=options.hops,
            loopback=options.loopback,
        )
        if metrics is not None:
            metrics.feed(lambda: _snapshot(plan, channels, clock() - start))
        # Signals become a clean stop only now: during hashing and encoding, Ctrl-C or SIGTERM
        # must end the process at once (the unfinished cache file is removed on the way out).
        stop = stop or Stop()
        stop.install()
        watch = ExpiryWatch(plan.manifest.expires, wall, report)
        reason = _loop(channels, report, clock, stop, watch, announcement, listeners)
    finally:
        plan.close()
        if announcement is not None:
            announcement.close()
        if listeners is not None:
            listeners.close()
        for channel in channels:
            channel.sender.close()
    elapsed = clock() - start
    totals = _progress(channels, elapsed)
    summary = ServeSummary(
        elapsed=elapsed,
        packets=totals.packets,
        bytes=totals.bytes,
        passes=totals.passes,
        reason=reason,
        channels=[asdict(_channel_stats(c, elapsed)) for c in channels],
        lane_packets=sum(c.sender.counters.datagrams for c in _on(channels, fdt.LANE)),
        lane_bytes=sum(_sent(c) for c in _on(channels, fdt.LANE)),
        index_packets=sum(c.sender.counters.datagrams for c in _on(channels, fdt.INDEX_GROUP)),
        index_bytes=sum(_sent(c) for c in _on(channels, fdt.INDEX_GROUP)),
    )
    report.summary(summary)
    if reason == EXPIRED:
        raise ServedManifestExpired(lifetime.stopped(plan.manifest.expires))
    return summary


def _open(plan: ServePlan, channel: ChannelPlan, now: float) -> Channel:
    """The socket and the core of one channel, its schedule starting at `now` (monotonic); its
    phase comes from the wall clock, read here once."""
    options = plan.options
    sender = MulticastSender(
        options.interface,
        channel.group,
        plan.port,
        hops=options.hops,
        source=options.source,
        gso=options.gso,
        loopback=options.loopback,
    )
    auth = None
    if (pages := plan.pages) is not None and not channel.lane:  # the same digests and key
        auth = AuthPages(pages.tsi, pages.sender, pages.digests, pages.capacity, pages.sign)
    core = plan.core(channel, now, time.time())
    side = plan.side_of(channel)
    share = side.share if side is not None else 1.0
    reader = plan.reader_of(channel)
    name = side.session.name if side is not None else ""
    return Channel(channel.rate, channel.group, core, sender, reader, auth, share, name)


def _on(channels: list[Channel], session: fdt.SideSession) -> list[Channel]:
    """The channels of side session `session`."""
    return [c for c in channels if c.lane and c.side == session.name]


def _sent(channel: Channel) -> int:
    return channel.core.stats.data_bytes + channel.core.stats.manifest_bytes


def _progress(channels: list[Channel], elapsed: float) -> ServeProgress:
    return ServeProgress(
        elapsed=elapsed,
        packets=sum(c.sender.counters.datagrams for c in channels),
        bytes=sum(_sent(c) for c in channels),
        passes=min(c.core.stats.passes for c in channels if not c.lane),
    )


def _channel_stats(channel: Channel, elapsed: float) -> ChannelStats:
    stats = channel.core.stats
    sent = _sent(channel)
    counters = channel.sender.counters
    return ChannelStats(
        group=channel.group,
        rate_target=channel.rate,
        rate_reached=round(sent / elapsed) if elapsed > 0 else 0,
        passes=stats.passes,
        bytes=sent,
        data_packets=stats.data_packets,
        manifest_packets=stats.manifest_packets,
        gso=channel.sender.gso_size > 0,
        auth_packets=channel.auth.datagrams if channel.auth else 0,
        auth_bytes=channel.auth.bytes if channel.auth else 0,
        no_buffer=counters.no_buffer,
        gso_refused=counters.gso_refused,
        lane=channel.side == fdt.LANE.name,
        index=channel.side == fdt.INDEX_GROUP.name,
    )


def _snapshot(plan: ServePlan, channels: list[Channel], elapsed: float) -> SenderSnapshot:
    m, options = plan.manifest, plan.options
    return SenderSnapshot(
        name=m.name,
        version=m.version,
        sequence=m.sequence,
        session=m.session_id.hex(),
        sender=f"{options.sender_index}/{options.sender_count}",
        elapsed=elapsed,
        channels=[_channel_stats(c, elapsed) for c in channels],
    )


def _loop(
    channels: list[Channel],
    report: Reporter,
    clock: Callable[[], float],
    stop: Stop,
    watch: ExpiryWatch,
    announcement: announce.Announcement | None = None,
    listeners: Listeners | None = None,
) -> str:
    live = list(channels)
    next_poll = 0.0
    start = clock()
    warned = False
    next_check = start + MIN_RATE_CHECK
    while any(not c.lane for c in live):
        if stop.reason:
            return stop.reason
        now = clock()
        wake = now + MAX_SLEEP
        if listeners is not None and now >= next_poll:
            listeners.poll(now)
            next_poll = now + LISTENER_POLL
        for channel in list(live):
            if channel.lane and not channel.rate and not _lane_turn(channel, channels):
                continue
            if channel.lane and listeners is not None and not _listened(listeners, channel, now):
                continue
            action = channel.core.next_action(now)
            if isinstance(action, SendAuth):
                assert channel.auth is not None  # the core emits SendAuth only with pages
                for page in channel.auth.for_action(action, time.time()):
                    channel.sender.send_datagram(page)
                # The data these pages vouch for is the core's next action: send it in the same
                # turn, so that no stop and no other channel comes between pages and their data.
                action = channel.core.next_action(now)
            if isinstance(action, SendSymbols):
                run = channel.reader.read(action.chunk, action.first, action.count)
                channel.sender.send_run(run, action.count, channel.reader.layout.datagram_size)
                wake = now
            elif isinstance(action, SendManifest):
                for datagram in action.datagrams:
                    channel.sender.send_datagram(datagram)
                wake = now
            elif isinstance(action, Wait):
                wake = min(wake, action.until)
            elif isinstance(action, Finished):
                live.remove(channel)
        if announcement is not None:
            wake = min(wake, announcement.tick(now))
        if report.due(now):
            report.progress(_progress(channels, now - start))
        if not warned and now >= next_check:
            next_check = now + 1.0
            warned = _warn_shortfall(channels, now - start, report, listeners is not None)
        if watch.due(now) and watch.expired():
            return EXPIRED
        if wake > now:
            time.sleep(wake - now)
    return "done"


def _listeners(plan: ServePlan, now: float, report: Reporter) -> Listeners | None:
    """The MLD listener tracker of the side channels' groups, with ``--lane-airtime mld`` and
    where this host can listen (else None, after a one-line warning: they share the rate)."""
    groups = [c.group for c in plan.channels if c.lane]
    if not groups or plan.options.lane_airtime != "mld":
        return None
    return Listeners.open(plan.options.interface, groups, now, report.warning)


def _listened(listeners: Listeners, channel: Channel, now: float) -> bool:
    """Whether a side channel is worth its airtime: a device on the link listens to its group
    from this sender, or the tracker cannot know yet (its first query not answered)."""
    if not listeners.informed(now):
        return True
    return listeners.listened(channel.group, channel.sender.source, now)


def _lane_turn(lane: Channel, channels: list[Channel]) -> bool:
    """Whether an unpaced side channel may send now: while it has sent at most its share of what
    it and the first channel sent together."""
    own = _sent(lane)
    return own <= lane.share * (own + _sent(channels[0]))


class ExpiryWatch:
    """Acts on `lifetime.outlook` for the served manifest: reads the wall clock once every
    SERVE_EXPIRY_CHECK_SECONDS (of the loop's monotonic time), warns once per lead time
    reached, and tells the loop when the manifest has expired."""

    def __init__(self, expires: int, wall: Callable[[], float], report: Reporter) -> None:
        self.expires = expires
        self.wall = wall
        self.report = report
        self.stage = 0  # the last stage acted on
        self._next: float | None = None

    def due(self, now: float) -> bool:
        if self._next is not None and now < self._next:
            return False
        self._next = now + SERVE_EXPIRY_CHECK_SECONDS
        return True

    def expired(self) -> bool:
        seen = lifetime.outlook(self.expires, self.wall())
        if seen.expired:
            return True
        if seen.stage > self.stage:
            self.report.warning(seen.warning())
            self.stage = seen.stage
        return False


def _warn_shortfall(
    channels: list[Channel], elapsed: float, report: Reporter, gated: bool = False
) -> bool:
    """Warn once when a channel sends less than asked; `gated`: the side channels send only
    while listened (MLD), so their shortfall is by design, not the CPU's or the link's."""
    for channel in channels:
        if gated and channel.lane:
            continue
        stats = channel.core.stats
        reached = (stats.data_bytes + stats.manifest_bytes) / elapsed
        if channel.rate and reached < RATE_SHORTFALL * channel.rate:
            report.warning(
                f"reaching {reached / 1e6:.1f} MB/s of the {channel.rate / 1e6:.1f} MB/s asked "
                f"on {channel.group}: the CPU or the link cannot keep up"
            )
            return True
    return False
