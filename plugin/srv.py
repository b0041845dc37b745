"""DNS discovery of a channel's SSM sources: the only `dns` user on the device side, imported
by `otacast.plugin.discovery` only when a channel's sources are looked up (dnspython costs
~50 ms of start-up, which a device given ``--source`` or ``--group`` does not pay).

The publisher lists its senders as SRV records of ``_otacast._udp.<channel>`` (RFC 2782):
``priority weight port target``.  RFC 2782 says to use the lowest priority first and to pick
among records of one priority at random, in proportion to their weights; dnspython's
``processing_order()`` produces exactly that order.  A multicast receiver does not *contact* a
source, it joins it, and several sources of one priority add up (each sends different symbols),
so every source of the best priority is joined; higher priorities are standbys the publisher
brings in by changing the records.  The processing order is kept so that a receiver that can
afford only some joins takes the ones the weights favour.

Each target's AAAA records are the source addresses of the (S,G) joins.  A target of ``.``
means "no service here" (RFC 2782) and is skipped, and so is a target without AAAA records
(it cannot be joined); if nothing is left the result is empty, like a channel without SRV
records: the caller then listens for the senders' announcements on the ASM group
(`JoinPlan.follow`).  Answers that are *not* answers (timeout,
SERVFAIL, REFUSED, an unreachable server) are errors instead: an empty result would silently
turn an outage into an ASM join.

Every lookup is bounded: `lifetime` is the budget of the whole discovery, shared by the SRV
query and the AAAA queries after it.  Inside a network namespace, or on a device before its
network is up, the configured servers may be unreachable, and dnspython's own default would
wait for each query in turn.
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.resolver
import dns.rrset

from otacast.schemas.addressing import srv_name

from .errors import DiscoveryError

DNS_PORT = 53
DEFAULT_LIFETIME = 3.0
# Discovery runs before anything is received; a minute of waiting is already a misconfiguration.
MAX_LIFETIME = 60.0


@dataclass(frozen=True)
class SourceHost:
    """One SRV target: its name, the SRV port, and its IPv6 addresses (each one a source)."""

    target: str
    port: int
    addresses: tuple[str, ...]


def parse_resolver(text: str) -> tuple[str, int]:
    """``ADDR``, ``[ADDR]:PORT`` (IPv6) or ``ADDR:PORT`` (IPv4) -> (address, port).

    A bare IPv6 address is read whole (``fd66::53`` is port 53, not port 53 of ``fd66:``).
    """
    usage = f"resolver address {text!r} is not ADDR, [ADDR]:PORT or ADDR:PORT"
    host, port_text = text.strip(), None
    if host.startswith("["):
        close = host.find("]")
        if close < 0:
            raise DiscoveryError(usage)
        host, rest = host[1:close], host[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise DiscoveryError(usage)
            port_text = rest[1:]
        family = 6
    elif host.count(":") == 1:
        host, port_text = host.split(":")
        family = 4
    else:
        family = 0
    if "%" in host:
        raise DiscoveryError(f"resolver address {text!r}: zone indexes are not supported")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise DiscoveryError(usage) from None
    if family and address.version != family:
        raise DiscoveryError(usage)
    port = DNS_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise DiscoveryError(f"resolver address {text!r} has an invalid port")
        port = int(port_text)
    return str(address), port


def _resolver(resolver: str | None) -> tuple[dns.resolver.Resolver, str]:
    """A resolver and how to name it in errors."""
    if resolver is None:
        try:
            system = dns.resolver.Resolver()
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"no DNS resolver configured: {_one_line(exc)}") from None
        servers = ", ".join(str(server) for server in system.nameservers)
        return system, f"the system resolver ({servers})"
    address, port = parse_resolver(resolver)
    chosen = dns.resolver.Resolver(configure=False)
    chosen.nameservers = [address]
    chosen.port = port
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return chosen, where


class _Lookup:
    """Queries sharing one deadline; every failure becomes a one-line DiscoveryError."""

    def __init__(self, resolver: dns.resolver.Resolver, where: str, lifetime: float) -> None:
        self.resolver = resolver
        self.where = where
        self.lifetime = lifetime
        self.deadline = time.monotonic() + lifetime

    def records(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset:
        """The answer's records; an empty set for NXDOMAIN and NODATA."""
        remaining = self.deadline - time.monotonic()
        query = f"{rdtype.name} {name.to_text(omit_final_dot=True)}"
        if remaining <= 0:
            raise self._timeout(query)
        try:
            answer = self.resolver.resolve(name, rdtype, search=False, lifetime=remaining)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
        except dns.exception.Timeout:
            raise self._timeout(query) from None
        except dns.resolver.NoNameservers as exc:
            raise DiscoveryError(
                f"DNS lookup of {query} via {self.where} failed: {_server_errors(exc)}"
            ) from None
        except dns.exception.DNSException as exc:
            raise DiscoveryError(
                f"DNS lookup of {query} via {self.where} failed: {_one_line(exc)}"
            ) from None
        if answer.rrset is None:  # only when raise_on_no_answer=False; kept for the type
            return dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
        return answer.rrset

    def _timeout(self, query: str) -> DiscoveryError:
        return DiscoveryError(
            f"DNS lookup of {query} via {self.where} timed out "
            f"(discovery lifetime {self.lifetime:g} s)"
        )


def discover(
    channel: str, *, resolver: str | None = None, lifetime: float = DEFAULT_LIFETIME
) -> list[SourceHost]:
    """The sources of `channel`'s best SRV priority, in RFC 2782 processing order.

    `resolver` names one DNS server (see `parse_resolver`); None uses the system's
    configuration.  An empty list means the channel publishes no usable source.
    """
    try:
        name = dns.name.from_text(srv_name(channel))
    except (ValueError, dns.exception.DNSException) as exc:
        raise DiscoveryError(f"cannot look up channel {channel!r}: {_one_line(exc)}") from None
    if not (math.isfinite(lifetime) and 0 < lifetime <= MAX_LIFETIME):
        raise DiscoveryError(f"DNS lifetime {lifetime} s is out of range (0, {MAX_LIFETIME:g}]")
    chosen, where = _resolver(resolver)
    lookup = _Lookup(chosen, where, lifetime)

    ordered = [
        record
        for record in lookup.records(name, dns.rdatatype.SRV).processing_order()
        if isinstance(record, dns.rdtypes.IN.SRV.SRV) and record.target != dns.name.root
    ]
    if not ordered:
        return []
    best = min(record.priority for record in ordered)
    hosts: list[SourceHost] = []
    for record in ordered:
        if record.priority != best:
            continue
        # An RRset has no order (servers rotate it): sorted, the joins are the same each time.
        addresses = sorted(
            {
                ipaddress.IPv6Address(rdata.address)
                for rdata in lookup.records(record.target, dns.rdatatype.AAAA)
                if isinstance(rdata, dns.rdtypes.IN.AAAA.AAAA)
            }
        )
        if addresses:
            target = record.target.to_text(omit_final_dot=True)
            hosts.append(SourceHost(target, record.port, tuple(map(str, addresses))))
    return hosts


def _server_errors(exc: dns.resolver.NoNameservers) -> str:
    """What each server did, from dnspython's (server, tcp, port, error or rcode, response)."""
    errors = exc.kwargs.get("errors") or []
    reasons = [_one_line(entry[3]) for entry in errors if len(entry) > 3]
    unique = list(dict.fromkeys(reasons))
    return "; ".join(unique) or "no server answered"


def _one_line(value: object) -> str:
    # An OSError's errno prefix ("[Errno 101]") tells an operator nothing the text does not.
    raw = value.strerror if isinstance(value, OSError) and value.strerror else value
    text = " ".join(str(raw).split())
    return text or type(value).__name__
