"""Where to listen: `plan_joins` turns the device's options, the manifest and DNS
(`otacast.plugin.srv`) into the memberships to join.
"""

from __future__ import annotations

from dataclasses import dataclass

from otacast.schemas import addressing
from otacast.schemas.addressing import srv_name
from otacast.schemas.manifest import Transport

from .errors import DiscoveryError, UsageError


@dataclass(frozen=True)
class JoinPlan:
    """The memberships to join, each ``(group, source)`` (source None: any source, ASM), the
    port, and what the operator is told about how the plan was made (None: nothing to say).

    With `follow` (the channel's SSM group), the one membership is the channel's ASM group,
    where senders announce themselves: the driver joins ``(follow, source)`` for each sender
    heard there (zero-config on a LAN).  `channel` names the channel for the operator."""

    memberships: tuple[tuple[str, str | None], ...]
    port: int
    note: str | None = None
    follow: str | None = None
    channel: str | None = None

    def silence(self, interface: str, timeout: float) -> str:
        """Why nothing was heard within `timeout` seconds, and the next step to take."""
        heard = f"no manifest heard within {timeout:g} s"
        mirror = "or give --manifest with an HTTP mirror to fetch from (--fallback)"
        channel = self.channel or "the channel"
        serve = f"`otacast-signer serve` runs for {channel}"
        (group, _), port = self.memberships[0], self.port
        if self.follow is not None:
            srv = srv_name(self.channel) if self.channel else "the channel's SRV name"
            return (
                f"{heard}: no sender announced itself on ASM group {group} port {port} on "
                f"interface {interface}; check that {serve} on this link (its defaults "
                f"announce there) and that {interface} is the interface facing it; across "
                f"routers, publish SRV records ({srv}) or give --source; {mirror}"
            )
        sources = [source for _, source in self.memberships if source is not None]
        if sources:
            return (
                f"{heard} from {', '.join(sources)} on {group} port {port} on interface "
                f"{interface}; check that {serve} on those hosts, that they are the senders' "
                "addresses (SRV records or --source), and that routers between them and this "
                f"device forward SSM (MLDv2); {mirror}"
            )
        return (
            f"{heard} on group {group} port {port} on interface {interface}; check that a "
            f"sender sends to that group and port (`otacast-signer serve --group {group}`) on "
            f"this link; {mirror}"
        )


def plan_joins(
    transport: Transport | None,
    *,
    channel: str | None,
    scope: str,
    port: int | None,
    group: str | None,
    sources: tuple[str, ...],
    resolver: str | None,
) -> JoinPlan:
    """Which (S,G) or G to join and on which port.

    Explicit options win: a ``group`` (with ``sources`` as SSM, else ASM), then ``sources`` on
    the channel's SSM group.  Otherwise the channel's SRV records name the SSM sources; without
    records, or when DNS fails, the device joins the channel's ASM group, where senders announce
    themselves, to follow each one it hears to the SSM group (`JoinPlan.follow`), and says why.
    With a verified manifest, its `transport` is authoritative for the groups and the default
    port; a channel named in the options then only says where the SRV records are looked up.
    """
    scope = transport.scope if transport and not channel else scope  # the manifest's channel
    channel = channel or (transport.channel if transport else None)
    chosen_port = port or (transport.port if transport else addressing.DEFAULT_PORT)
    if group:
        joins = tuple((group, s) for s in sources) or ((group, None),)
        return JoinPlan(joins, chosen_port, channel=channel)
    if channel is None:
        raise UsageError("give --channel, --group or --manifest so there is something to join")
    ssm = transport.ssm_group if transport else addressing.ssm_group(channel, scope)
    asm = transport.asm_group if transport else addressing.asm_group(channel, scope)
    if sources:
        return JoinPlan(tuple((ssm, s) for s in sources), chosen_port, channel=channel)
    listen = f"listening for senders on ASM group {asm} (each joined on {ssm} by SSM)"
    from .srv import discover  # (only here: dnspython's start-up is paid by lookups alone)

    try:
        hosts = discover(channel, resolver=resolver)
    except DiscoveryError as exc:
        note = f"DNS discovery failed ({exc}); {listen}"
        return JoinPlan(((asm, None),), chosen_port, note, ssm, channel)
    if not hosts:
        note = f"no SRV records for {srv_name(channel)}; {listen}"
        return JoinPlan(((asm, None),), chosen_port, note, ssm, channel)
    memberships = tuple((ssm, address) for host in hosts for address in host.addresses)
    note = f"SRV {srv_name(channel)}: joining {ssm} from " + ", ".join(a for _, a in memberships)
    return JoinPlan(memberships, port or hosts[0].port, note, channel=channel)
