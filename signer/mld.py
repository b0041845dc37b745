"""Sans-IO MLD listener tracking: which of the sender's groups have listeners on its link.

Theory of operation
-------------------
The sender spends airtime on a lane-like group (the delta lane) only while a device on its link
listens there (issue 15; what Librecast's lcsync does with MLD).  Devices say so with MLD, the
IPv6 group membership protocol every host kernel speaks: MLDv1 Reports (type 131) and Dones
(132, RFC 2710) and MLDv2 Reports (143, RFC 3810) carrying one record per group, each with a
filter mode and a source list.  `ListenerTable` reads those messages (their ICMPv6 payloads,
as a raw ICMPv6 socket returns them) and answers `listened(group, source)`.

*State per host.*  Only the watched groups are kept (the groups the sender owns), and for
each, one entry per reporting host: its filter (INCLUDE or EXCLUDE) and source list, exactly
as that host's last records left it (RFC 3810 §6 state per host, which MLDv2 hosts report
without suppression), and when the entry expires: the Multicast Address Listening Interval
(robustness x query interval + query response interval) after its last report.  A group is
listened from `source` when a live entry INCLUDEs it or EXCLUDEs others (EXCLUDE{} is "any
source", the MLDv1 and plain ASM join); `source=None` asks whether anyone listens at all.

*Leaving.*  A Done, a TO_IN{} or a BLOCK of the last included source removes the host's
entry.  MLDv1 hosts suppress their report when another host reported first, so when the last
known entry goes the group stays listened (from what that host listened to) for the last
listener query time and, while this table is the querier, an address-specific query asks
whoever else listens to say so.

*Querying.*  Hosts report unasked only when they join or leave; a General Query makes them
report their state again, within the query response interval.  The table is also an MLDv2
querier (RFC 3810 §7.6.2 election): it queries ``ff02::1`` every MLD_QUERY_INTERVAL (after
MLD_ROBUSTNESS startup queries a quarter interval apart) while no querier with a lower
link-local address is heard; hearing one, it stops, adopts that querier's robustness, query
interval (at most MLD_MAX_QUERY_INTERVAL) and response interval for the listening interval, and
resumes after the Other Querier Present Interval without hearing it again.  Query payloads
leave the checksum 0: a raw ICMPv6 socket computes it (the pseudo-header needs the addresses
the kernel picks).  Sending them (from a link-local address, hop limit 1, Router Alert) is the
driver's (`otacast.signer.listeners`).

*Knowing.*  Hosts that joined before the table started said so then, not again until asked:
`informed` tells the caller when the table can know them all (the response time of the first
general query on the link, its own or another querier's), so that a sender spends the airtime
until then rather than starve them.

*Hostile input.*  Anyone on the link can send MLD.  Every message is checked (length, types,
addresses, hop limit 1, link-local or unspecified source) and a bad one is a counted rejection
(``stats.rejected[reason]``) that changes nothing; nothing here raises on input.  Faked reports
cost airtime on a lane, never data: what is sent is signed either way.  Messages from the
table's own addresses (its kernel's reports, its own queries) are ignored.

Nothing here reads a clock or touches a socket: times are the caller's ``now``.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from otacast.schemas.limits import (
    MLD_LAST_LISTENER_INTERVAL,
    MLD_LAST_LISTENER_QUERIES,
    MLD_MAX_LISTENERS,
    MLD_MAX_QUERY_INTERVAL,
    MLD_MAX_SOURCES,
    MLD_QUERY_INTERVAL,
    MLD_QUERY_RESPONSE_INTERVAL,
    MLD_ROBUSTNESS,
)

# ICMPv6 message types of MLD (RFC 2710 §3, RFC 3810 §5).
QUERY = 130
V1_REPORT = 131
V1_DONE = 132
V2_REPORT = 143
TYPES = (QUERY, V1_REPORT, V1_DONE, V2_REPORT)

# Where MLDv2 reports go (RFC 3810 §5.2.14) and where general queries go.
ALL_MLDV2_ROUTERS = "ff02::16"
ALL_NODES = "ff02::1"

V1_LENGTH = 24  # type, code, checksum, max delay, reserved, multicast address
V2_QUERY_LENGTH = 28  # ... plus S/QRV, QQIC, number of sources (RFC 3810 §5.1)
V2_REPORT_HEADER = 8  # type, reserved, checksum, reserved, number of records
RECORD_HEADER = 20  # record type, aux data length, number of sources, multicast address

_QUERY_HEAD = struct.Struct("!BBHHH16sBBH")
_V2_HEAD = struct.Struct("!BBHHH")
_RECORD_HEAD = struct.Struct("!BBH16s")

_UNSPECIFIED = bytes(16)


class RecordType(IntEnum):
    """MLDv2 multicast address record types (RFC 3810 §5.2.12)."""

    MODE_IS_INCLUDE = 1
    MODE_IS_EXCLUDE = 2
    CHANGE_TO_INCLUDE_MODE = 3
    CHANGE_TO_EXCLUDE_MODE = 4
    ALLOW_NEW_SOURCES = 5
    BLOCK_OLD_SOURCES = 6


@dataclass(frozen=True)
class Record:
    """One multicast address record (an MLDv1 Report is EXCLUDE{}, a Done TO_IN{})."""

    kind: RecordType
    group: bytes
    sources: frozenset[bytes]


@dataclass(frozen=True)
class OutgoingQuery:
    """A query to send: the ICMPv6 payload (checksum 0, for the kernel) and its destination."""

    destination: str
    payload: bytes


@dataclass(frozen=True)
class Timers:
    """The querier's values that set the listening interval (RFC 3810 §9)."""

    robustness: int = MLD_ROBUSTNESS
    query_interval: float = MLD_QUERY_INTERVAL
    response_interval: float = MLD_QUERY_RESPONSE_INTERVAL

    @property
    def listening_interval(self) -> float:
        """Multicast Address Listening Interval (RFC 3810 §9.4)."""
        return self.robustness * self.query_interval + self.response_interval

    @property
    def other_querier_interval(self) -> float:
        """Other Querier Present Interval (RFC 3810 §9.5)."""
        return self.robustness * self.query_interval + self.response_interval / 2


@dataclass
class MldStats:
    reports: int = 0  # accepted reports and dones (each may carry several records)
    queries: int = 0  # accepted queries heard from other queriers
    sent_queries: int = 0
    ignored: int = 0  # our own messages, and records about groups not watched
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass
class _Entry:
    exclude: bool
    sources: frozenset[bytes]
    expires: float

    def admits(self, source: bytes | None) -> bool:
        if source is None:
            return self.exclude or bool(self.sources)
        return (source not in self.sources) if self.exclude else (source in self.sources)


class MldRejected(Exception):
    """A message that must change nothing; its reason is counted.  Never leaves this module."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def address_bytes(address: str | bytes | ipaddress.IPv6Address) -> bytes:
    """16 address bytes of `address` (text, bytes or IPv6Address; a ``%zone`` is dropped)."""
    if isinstance(address, bytes):
        if len(address) != 16:
            raise ValueError(f"an IPv6 address is 16 bytes, not {len(address)}")
        return address
    if isinstance(address, str):
        return _parsed(address)
    return address.packed


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> bytes:
    """Text addresses parsed once: a sender asks about its few groups and sources every turn."""
    return ipaddress.IPv6Address(text.split("%", 1)[0]).packed


def decode_max_response(code: int) -> float:
    """Maximum Response Delay in seconds from a Maximum Response Code (RFC 3810 §5.1.3)."""
    if code < 0x8000:
        return code / 1000
    return (((code & 0x0FFF) | 0x1000) << (((code >> 12) & 0x7) + 3)) / 1000


def decode_qqic(code: int) -> float:
    """Querier's Query Interval in seconds from a QQIC (RFC 3810 §5.1.9)."""
    if code < 0x80:
        return float(code)
    return float(((code & 0x0F) | 0x10) << (((code >> 4) & 0x7) + 3))


def query_payload(timers: Timers, response: float, group: bytes = _UNSPECIFIED) -> bytes:
    """An MLDv2 query asking for answers within `response` seconds: general (``group``
    unspecified) or address-specific, no sources, checksum 0 (the kernel's).  Our own
    intervals are small enough for the literal encodings."""
    code = round(response * 1000)
    qqic = round(timers.query_interval)
    assert code < 0x8000 and qqic < 0x80, "our own timers use the literal encodings"
    qrv = timers.robustness if timers.robustness <= 7 else 0
    return _QUERY_HEAD.pack(QUERY, 0, 0, code, 0, group, qrv, qqic, 0)


def parse_records(payload: bytes) -> list[Record]:
    """The records of an MLDv1 Report/Done or MLDv2 Report; raises `MldRejected`.

    A record of an unknown type is skipped (RFC 3810 §5.2.12: silently ignored); one whose
    address is not multicast too.  A record running past the message rejects the message."""
    if len(payload) < 4:
        raise MldRejected("short")
    kind = payload[0]
    if kind in (V1_REPORT, V1_DONE):
        if len(payload) < V1_LENGTH:
            raise MldRejected("short")
        group = bytes(payload[8:24])
        if group[0] != 0xFF:
            raise MldRejected("not-multicast")
        if kind == V1_REPORT:
            return [Record(RecordType.CHANGE_TO_EXCLUDE_MODE, group, frozenset())]
        return [Record(RecordType.CHANGE_TO_INCLUDE_MODE, group, frozenset())]
    if kind != V2_REPORT:
        raise MldRejected("type")
    if len(payload) < V2_REPORT_HEADER:
        raise MldRejected("short")
    count = _V2_HEAD.unpack_from(payload)[4]
    records: list[Record] = []
    offset = V2_REPORT_HEADER
    for _ in range(count):
        if offset + RECORD_HEADER > len(payload):
            raise MldRejected("record-length")
        rtype, aux_words, nsources, group = _RECORD_HEAD.unpack_from(payload, offset)
        start = offset + RECORD_HEADER
        end = start + 16 * nsources + 4 * aux_words
        if end > len(payload):
            raise MldRejected("record-length")
        offset = end
        if rtype not in RecordType.__members__.values():
            continue
        if group[0] != 0xFF:
            continue
        sources = frozenset(payload[s : s + 16] for s in range(start, start + 16 * nsources, 16))
        records.append(Record(RecordType(rtype), group, sources))
    return records


class ListenerTable:
    """Listeners of the watched groups on one link, and the querier that keeps them fresh.

    `address` is the link-local address queries are sent from (None until the interface has
    one: the table then listens but does not query); `own` are all of this host's addresses,
    whose messages are ignored."""

    def __init__(
        self,
        watched: Iterable[str | bytes],
        now: float,
        *,
        address: str | bytes | None = None,
        own: Iterable[str | bytes] = (),
    ) -> None:
        self.watched = frozenset(address_bytes(g) for g in watched)
        self.stats = MldStats()
        self.ours = Timers()
        self.timers = self.ours  # the querier's: ours, or those adopted from another querier
        self.address: bytes | None = None
        self.own: set[bytes] = {address_bytes(a) for a in own}
        self._entries: dict[bytes, dict[bytes, _Entry]] = {g: {} for g in self.watched}
        self._count = 0
        # group -> what its last listener listened to, until the last listener queries end
        self._grace: dict[bytes, _Entry] = {}
        self._specific: dict[bytes, tuple[int, float]] = {}  # group -> (queries left, next at)
        self._other_until = now  # another querier is present until then
        self._next_general = now
        self._startup = MLD_ROBUSTNESS
        # Until then the table cannot know who listens (see `informed`).
        self._informed_at = float("inf")
        if address is not None:
            self.set_address(address)

    # --- what the sender asks -----------------------------------------------------------------

    def listened(self, group: str | bytes, source: str | bytes | None, now: float) -> bool:
        """Whether some host on the link listens to `group` from `source` (None: any)."""
        key = address_bytes(group)
        wanted = None if source is None else address_bytes(source)
        self._expire(key, now)
        grace = self._grace.get(key)
        if grace is not None and grace.expires > now and grace.admits(wanted):
            return True
        return any(e.admits(wanted) for e in self._entries.get(key, {}).values())

    def informed(self, now: float) -> bool:
        """Whether the table can know every listener by now: the response time of the first
        general query on the link (its own or another querier's) has passed, so every listener
        has answered it.  Before that a caller should assume listeners (and spend the airtime)
        rather than starve them; a link where nobody ever queries never informs."""
        return now >= self._informed_at

    @property
    def querier(self) -> bool:
        return self.address is not None and self.timers is self.ours

    def set_address(self, address: str | bytes) -> None:
        """The link-local address this table queries from (and compares in elections)."""
        packed = address_bytes(address)
        self.address = packed
        self.own.add(packed)

    # --- queries to send ------------------------------------------------------------------------

    def queries(self, now: float) -> list[OutgoingQuery]:
        """The queries due at `now` (none while another querier is present or no address)."""
        if self.timers is not self.ours and now >= self._other_until:
            self.timers = self.ours  # the other querier went quiet: we query again
            self._next_general = now
        if not self.querier:
            return []
        out: list[OutgoingQuery] = []
        if now >= self._next_general:
            first = now + self.ours.response_interval
            self._informed_at = min(self._informed_at, first)
            payload = query_payload(self.ours, self.ours.response_interval)
            out.append(OutgoingQuery(ALL_NODES, payload))
            if self._startup > 1:
                self._startup -= 1
                self._next_general = now + self.ours.query_interval / 4
            else:
                self._next_general = now + self.ours.query_interval
        for group, (left, at) in list(self._specific.items()):
            if now >= at:
                destination = str(ipaddress.IPv6Address(group))
                payload = query_payload(self.ours, MLD_LAST_LISTENER_INTERVAL, group)
                out.append(OutgoingQuery(destination, payload))
                if left > 1:
                    self._specific[group] = (left - 1, now + MLD_LAST_LISTENER_INTERVAL)
                else:
                    del self._specific[group]
        self.stats.sent_queries += len(out)
        return out

    def wake(self) -> float:
        """When `queries` next has something to send (or the other querier lapses)."""
        if self.address is None:
            return float("inf")
        if self.timers is not self.ours:
            return self._other_until
        return min([self._next_general, *(at for _, at in self._specific.values())])

    # --- what the link says ---------------------------------------------------------------------

    def receive(self, payload: bytes, source: bytes, hop_limit: int | None, now: float) -> None:
        """One ICMPv6 message (without IPv6 header) from `source` (16 bytes), received with
        `hop_limit` (None where the driver cannot tell).  Never raises."""
        try:
            self._receive(payload, source, hop_limit, now)
        except MldRejected as exc:
            self.stats.rejected[exc.reason] += 1

    def _receive(self, payload: bytes, source: bytes, hop_limit: int | None, now: float) -> None:
        if len(source) != 16:
            raise MldRejected("source")
        if source in self.own:
            self.stats.ignored += 1
            return
        if hop_limit is not None and hop_limit != 1:
            raise MldRejected("hop-limit")  # RFC 3810 §5: MLD never crosses a router
        link_local = source[0] == 0xFE and source[1] & 0xC0 == 0x80
        if not payload:
            raise MldRejected("short")
        if payload[0] == QUERY:
            if not link_local:
                raise MldRejected("source")
            self._query(payload, source, now)
            return
        if not link_local and source != _UNSPECIFIED:  # RFC 3810 §5.2.13 allows ::
            raise MldRejected("source")
        records = parse_records(payload)
        self.stats.reports += 1
        for record in records:
            if record.group not in self.watched:
                self.stats.ignored += 1
                continue
            self._apply(record, source, now)

    def _query(self, payload: bytes, source: bytes, now: float) -> None:
        if len(payload) < V1_LENGTH or V1_LENGTH < len(payload) < V2_QUERY_LENGTH:
            raise MldRejected("short")
        self.stats.queries += 1
        response = min(
            decode_max_response(int.from_bytes(payload[4:6], "big")), MLD_MAX_QUERY_INTERVAL
        )
        if payload[8:24] == _UNSPECIFIED:  # a general query: every listener answers it
            self._informed_at = min(self._informed_at, now + response)
        if self.address is not None and source > self.address:
            return  # we win the election (RFC 3810 §7.6.2): the other querier stops
        if len(payload) == V1_LENGTH:
            heard = Timers(MLD_ROBUSTNESS, 125.0, response)
        else:
            flags, qqic = payload[24], payload[25]
            interval = decode_qqic(qqic)
            heard = Timers(
                flags & 0x07 or MLD_ROBUSTNESS,
                min(interval, MLD_MAX_QUERY_INTERVAL) if interval else 125.0,
                response,
            )
        self.timers = heard
        self._other_until = now + heard.other_querier_interval
        self._specific.clear()

    def _apply(self, record: Record, host: bytes, now: float) -> None:
        hosts = self._entries[record.group]
        entry = hosts.get(host)
        kind = record.kind
        if kind in (RecordType.MODE_IS_INCLUDE, RecordType.CHANGE_TO_INCLUDE_MODE):
            state = (False, record.sources)
        elif kind in (RecordType.MODE_IS_EXCLUDE, RecordType.CHANGE_TO_EXCLUDE_MODE):
            state = (True, record.sources)
        elif entry is None:  # ALLOW/BLOCK from a host we know nothing of: it was INCLUDE{}
            state = (False, record.sources if kind == RecordType.ALLOW_NEW_SOURCES else frozenset())
        elif (kind == RecordType.ALLOW_NEW_SOURCES) != entry.exclude:
            state = (entry.exclude, entry.sources | record.sources)
        else:
            state = (entry.exclude, entry.sources - record.sources)
        exclude, sources = state
        if len(sources) > MLD_MAX_SOURCES:
            raise MldRejected("too-many-sources")
        if not exclude and not sources:  # INCLUDE{}: the host no longer listens
            if entry is not None:
                del hosts[host]
                self._count -= 1
                self._left(record.group, entry, now)
            return
        if entry is None:
            if self._count >= MLD_MAX_LISTENERS:
                for group in self._entries:
                    self._expire(group, now)
            if self._count >= MLD_MAX_LISTENERS:
                raise MldRejected("too-many-listeners")
            self._count += 1
        hosts[host] = _Entry(exclude, sources, now + self.timers.listening_interval)
        self._grace.pop(record.group, None)
        self._specific.pop(record.group, None)

    def _left(self, group: bytes, entry: _Entry, now: float) -> None:
        """A host left `group` (`entry` was what it listened to): if no other is known, keep
        what it listened to for the last listener query time and ask (as querier) whether
        anyone else still listens."""
        if self._entries[group]:
            return
        until = now + MLD_LAST_LISTENER_QUERIES * MLD_LAST_LISTENER_INTERVAL
        self._grace[group] = _Entry(entry.exclude, entry.sources, until)
        if self.querier:
            self._specific[group] = (MLD_LAST_LISTENER_QUERIES, now)

    def _expire(self, group: bytes, now: float) -> None:
        hosts = self._entries.get(group)
        if not hosts:
            return
        gone = [host for host, entry in hosts.items() if entry.expires <= now]
        for host in gone:
            del hosts[host]
        self._count -= len(gone)
