"""A sender's announcements on its channel's ASM group: zero-config on one LAN.

A device that finds no SRV records for a channel listens on the channel's ASM group
(`otacast.plugin.discovery.plan_joins`); there it hears every sender of the channel announce
the release (its signed MANIFEST fragments, paced by `schedule.Announcer`), and it joins
(SSM group, source address) for each sender whose announcement belongs to the release it
verified.  So the announcement's source address must be the very address the sender's data
comes from: the announcing socket is bound to the data socket's source.

Announcing makes sense only where the data goes to the channel's own SSM group (the default):
a sender given ``--group`` sends elsewhere, and one given ``--asm`` already sends everything to
the ASM group.  ``--no-announce`` turns it off (a routed network whose devices use SRV).
"""

from __future__ import annotations

from otacast.schemas.manifest import Manifest

from .errors import NetworkError
from .report import Reporter
from .schedule import Announcer
from .transport import MulticastSender


class Announcement:
    """The announcing socket and its schedule; `tick` sends what is due."""

    def __init__(self, sender: MulticastSender, core: Announcer) -> None:
        self.sender = sender
        self.core = core

    @property
    def group(self) -> str:
        return self.sender.group

    def tick(self, now: float) -> float:
        """Send what is due at `now`; the time anything is due next."""
        if now >= self.core.next_at:
            for datagram in self.core.due(now):
                self.sender.send_datagram(datagram)
        return self.core.next_at

    def close(self) -> None:
        self.sender.close()


def start(
    manifest: Manifest,
    data: MulticastSender,
    fragments: tuple[bytes, ...],
    now: float,
    report: Reporter,
    *,
    enabled: bool,
    hops: int,
    loopback: bool,
) -> Announcement | None:
    """The announcement of a sender whose main channel is `data` (None where it makes no
    sense, see the module doc, or is not `enabled`); a socket that cannot be opened is a
    warning, not a failure: devices given SRV records or --source still hear the sender."""
    if not enabled or data.group != manifest.transport.ssm_group:
        return None
    source = data.source.partition("%")[0]  # a link-local source's zone: the interface is given
    try:
        sender = MulticastSender(
            data.interface,
            manifest.transport.asm_group,
            data.port,
            hops=hops,
            source=source,
            gso=False,
            loopback=loopback,
        )
    except NetworkError as exc:
        report.warning(f"not announcing on the ASM group (devices need SRV records): {exc}")
        return None
    announcement = Announcement(sender, Announcer(fragments, now))
    report.event(
        "announcing",
        group=sender.group,
        port=sender.port,
        source=source,
        every=round(announcement.core.interval, 3),
        datagrams_per_second=round(announcement.core.datagram_rate, 2),
    )
    return announcement
