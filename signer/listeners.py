"""The sender's ear for MLD: a raw ICMPv6 socket on the serve interface, fed to `mld`.

`Listeners.open` opens an ``AF_INET6/SOCK_RAW/IPPROTO_ICMPV6`` socket bound to the interface.
That needs CAP_NET_RAW; without it (or on a platform without raw sockets) it returns None with
a one-line note, and the caller shares the rate between its channels instead.  The socket:

* joins ``ff02::16``, where MLDv2 reports go.  Not the watched groups themselves, where MLDv1
  reports go: this host would then report them too, and every other sender on the link (``serve
  --sender i/n``) would count it as a listener of each of its lanes.  A host speaks MLDv1 only
  once it heard an MLDv1 querier, and SSM (the lanes' groups) needs MLDv2 anyway;
* lets only MLD types through (``ICMP6_FILTER``) and asks for each message's hop limit
  (``IPV6_RECVHOPLIMIT``), which the table requires to be 1;
* sends queries with hop limit 1, the Router Alert hop-by-hop option (a sticky
  ``IPV6_HOPOPTS``: snooping switches and hosts check it), no loopback, and the interface's
  link-local address as the source (``IPV6_PKTINFO`` per send; hosts ignore queries from other
  sources).  The kernel fills in the ICMPv6 checksum.  Until the interface has a usable
  link-local address (duplicate address detection takes a second or two after link-up) it
  only listens, and looks for one once a second.

`poll(now)` reads what has arrived (at most POLL_READS messages) without blocking and sends the
queries that are due; the serve loop calls it every turn.  Nothing here raises once open:
a failed send is counted.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from otacast.schemas.limits import MLD_MAX_MESSAGE

from .mld import ALL_MLDV2_ROUTERS, TYPES, ListenerTable, address_bytes
from .transport import interface_addresses, usable_link_local

ICMP6_FILTER = 1  # <netinet/icmp6.h>, at level IPPROTO_ICMPV6
IPV6_RECVHOPLIMIT = 51
IPV6_HOPLIMIT = 52
IPV6_HOPOPTS = 54
# Hop-by-hop header: next header (the kernel's), length 0 (8 bytes), Router Alert (type 5,
# length 2, value 0 = MLD, RFC 2711), PadN of 2 bytes.
ROUTER_ALERT_MLD = bytes([0, 0, 5, 2, 0, 0, 1, 0])
# Messages read per poll: keeps one serve-loop turn short under a report flood.
POLL_READS = 256
# How often to look for a link-local address while the interface has none usable.
ADDRESS_RETRY = 1.0


def icmp6_filter(passed: Iterable[int]) -> bytes:
    """struct icmp6_filter blocking every ICMPv6 type but `passed` (a set bit blocks)."""
    words = [0xFFFFFFFF] * 8
    for kind in passed:
        words[kind >> 5] &= ~(1 << (kind & 31)) & 0xFFFFFFFF
    return struct.pack("=8I", *words)


@dataclass
class DriverCounters:
    reads: int = 0
    truncated: int = 0
    send_failed: int = 0


class Listeners:
    def __init__(
        self, sock: socket.socket, interface: str, ifindex: int, table: ListenerTable
    ) -> None:
        self.sock = sock
        self.interface = interface
        self.ifindex = ifindex
        self.table = table
        self.counters = DriverCounters()
        self._next_address = 0.0

    @classmethod
    def open(
        cls,
        interface: str,
        watched: Iterable[str],
        now: float,
        note: Callable[[str], None],
    ) -> Listeners | None:
        """Listen for MLD on `interface` about `watched`; None (after `note`) where this
        host cannot, so that the caller falls back to sharing the rate."""
        groups = sorted({str(ipaddress.IPv6Address(g)) for g in watched})
        try:
            ifindex = socket.if_nametoindex(interface)
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        except (OSError, AttributeError) as exc:
            note(
                f"cannot listen for MLD on {interface} ({_reason(exc)}; needs CAP_NET_RAW): "
                "lanes share the rate"
            )
            return None
        try:
            _configure(sock, interface, ifindex)
        except OSError as exc:
            sock.close()
            note(f"cannot listen for MLD on {interface} ({_reason(exc)}): lanes share the rate")
            return None
        own = interface_addresses(interface)
        table = ListenerTable(groups, now, own=own)
        return cls(sock, interface, ifindex, table)

    def listened(self, group: str, source: str | None, now: float) -> bool:
        return self.table.listened(group, source, now)

    def informed(self, now: float) -> bool:
        return self.table.informed(now)

    def poll(self, now: float) -> None:
        """Read what arrived and send the queries that are due; never blocks or raises."""
        if self.table.address is None and now >= self._next_address:
            self._next_address = now + ADDRESS_RETRY
            found = usable_link_local(self.interface)
            if found is not None:
                self.table.set_address(found)
        for _ in range(POLL_READS):
            try:
                data, ancillary, flags, peer = self.sock.recvmsg(
                    MLD_MAX_MESSAGE, socket.CMSG_SPACE(4)
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.counters.reads += 1
            if flags & socket.MSG_TRUNC:
                self.counters.truncated += 1
                continue
            hop_limit = None
            for level, kind, value in ancillary:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT and len(value) >= 4:
                    hop_limit = struct.unpack_from("=i", value)[0]
            try:
                source = address_bytes(peer[0])
            except ValueError:
                continue
            self.table.receive(data, source, hop_limit, now)
        self._send_queries(now)

    def _send_queries(self, now: float) -> None:
        address = self.table.address
        for query in self.table.queries(now):
            assert address is not None  # the table queries only once it has one
            info = address + struct.pack("=I", self.ifindex)
            ancillary = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
            try:
                self.sock.sendmsg(
                    [query.payload], ancillary, 0, (query.destination, 0, 0, self.ifindex)
                )
            except OSError:
                self.counters.send_failed += 1

    def wake(self) -> float:
        """When the next query is due (the caller polls at least that often anyway)."""
        return self.table.wake()

    def close(self) -> None:
        self.sock.close()


def _configure(sock: socket.socket, interface: str, ifindex: int) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, icmp6_filter(TYPES))
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HOPOPTS, ROUTER_ALERT_MLD)
    request = ipaddress.IPv6Address(ALL_MLDV2_ROUTERS).packed + struct.pack("=I", ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
