"""The device's receive socket: group joins, source filters, a large queue, non-blocking reads.

This is the only module on the device side that creates sockets.  One UDP socket, bound to
``('::', port)``, holds every join of a channel:

* an ASM join (`Join` without a source) uses ``IPV6_JOIN_GROUP``: any host may send to the group;
* an SSM join (`Join` with a source) uses ``MCAST_JOIN_SOURCE_GROUP``: the kernel delivers only
  that source's datagrams for the group (an MLDv2 INCLUDE filter, visible in
  ``/proc/net/mcfilter6``), and an MLDv2 snooping switch or router forwards only that source.
  Several sources of one group are several joins; their datagrams are merged on this socket.

Linux has two surprises here.  ``IPV6_MULTICAST_ALL`` defaults to 1, and then a socket receives
datagrams for its port of *every* group any socket on the host joined; it is set to 0 so this
socket hears only its own joins.  And the source filter applies to multicast only: a unicast
datagram sent to the device's own address and this port still arrives.  Neither matters for
safety (every datagram is untrusted and verified by the receiver core), but both would waste
the per-packet budget and muddle the counters.

Receive buffer.  The sender is paced by a token bucket, so datagrams arrive in bursts rather
than evenly, and the receiver is a Python loop: ~3.5 us for a one-datagram read plus ~8 us to
parse, hash and decode each datagram (about 90 k datagrams/s on one core).  Worse than the
average cost are the pauses: decoding a finished 8 MiB chunk (~30 ms), hashing it, writing and
fsyncing it to flash (tens to hundreds of ms), a garbage-collector pass.  Whatever arrives
meanwhile has to wait in the kernel's queue or be dropped, and a drop costs a repair symbol the
sender must then supply.  The kernel doubles the value given to ``SO_RCVBUF`` and charges each
datagram its buffer's true size, about 2.3 KB for a 1228-byte datagram on veth (more on some
NIC drivers), so the default 8 MiB holds ~7000 datagrams: ~0.4 s of a 20 MB/s channel.
``net.core.rmem_max`` (4 MiB in a network namespace, often 208 KiB on devices) caps
``SO_RCVBUF``; root may exceed it with ``SO_RCVBUFFORCE``, and anyone else gets the cap —
`MulticastReceiver.receive_buffer` says what the kernel granted.

Batched reads (UDP GRO).  A read costs ~2-3 us of system call and Python per datagram, a large
share of the receiver's budget.  Since Linux 5.0 a UDP socket may ask for GRO (``UDP_GRO``):
the network stack then coalesces consecutive datagrams of one flow (same source and ports),
all of one length but a shorter last one, into one buffer of up to 64 KiB and 64 datagrams,
and one ``recvmsg`` returns them all with their length, the segment size, in a ``UDP_GRO``
control message.  `recv_batch` splits such a read at the segment size (`split_read`), so the
receive loop pays one system call per ~50 datagrams: measured here ~0.8 us per datagram read
and copied, against ~2.1-2.7 us one at a time (docs/PERFORMANCE.md).  A physical NIC runs GRO
by default; check with ``ethtool -k IF | grep generic-receive-offload`` (nothing is set per
flow).  A UDP GSO batch from a sender crossing only software links (a veth, a bridge) arrives
as one buffer the same way.  A veth coalesces single datagrams only with ``ethtool -K IF gro on
rx-udp-gro-forwarding on`` and a ``gro_flush_timeout`` (the test networks do that,
integration/netns.py).  Where nothing is coalesced every read returns one datagram, and
``recvmsg_into`` costs ~0.2-0.5 us more per read than ``recvfrom_into``.  UDP_GRO is not
turned off then: a coalesced read still queued would come without its segment size, which the
kernel adds only while UDP_GRO is on.  Where the kernel refuses ``UDP_GRO`` (before 5.0),
`recv_batch` reads one datagram per ``recvfrom_into``, as before.

Hostile or odd reads never raise and never hand on part of a datagram (`split_read`): what a
too small buffer cut off (``MSG_TRUNC``), a read whose control message was cut
(``MSG_CTRUNC``), a segment size below 1 and datagrams longer than ``max_datagram`` (the
longest otacast accepts) are dropped and counted in `MulticastReceiver.truncated`; the receive
loop counts those as ``oversized`` rejections.  The datagrams of one read share one source
address: GRO coalesces only one flow.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from otacast.schemas.limits import MAX_DATAGRAM as LARGEST_ACCEPTED

from .errors import NetworkError

# Linux values that Python's socket module does not export (include/uapi/linux/in6.h, in.h,
# asm-generic/socket.h).
IPV6_MULTICAST_ALL = 29
MCAST_JOIN_SOURCE_GROUP = 46
MCAST_LEAVE_SOURCE_GROUP = 47
SO_RCVBUFFORCE = 33
SOL_UDP = 17
UDP_GRO = 104  # linux/udp.h, since Linux 5.0
# Room for the one control message a GRO read carries: the segment size, a C int.
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
# Plain ints: the socket module's are IntFlag members, whose `&` runs ~1 us of Python each.
MSG_TRUNC = int(socket.MSG_TRUNC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)

MIB = 1024 * 1024
# 32 MiB of kernel buffer (~14,000 datagrams at ~2.3 KiB of accounting each, ~0.7 s of a
# 20 MB/s channel) rides out the receiver's longest pauses -- a chunk's final decode and hash --
# without a drop; measured: at 8 MiB a 60 MB/s stream lost 16-28% of datagrams in the kernel.
DEFAULT_RECEIVE_BUFFER = 32 * MIB
# The kernel keeps datagrams in RAM up to twice this (see above); beyond 256 MiB a typo in a
# config would pin a device's memory rather than help.
MAX_RECEIVE_BUFFER = 256 * MIB
# The largest UDP payload over IPv6 without jumbograms: a buffer this large never truncates a
# datagram.
MAX_DATAGRAM = 65535
# The receiver's own read buffer.  A GRO buffer is bounded by the device's gro_max_size, 64 KiB
# of IP packet by default, so this holds every coalesced read too; a device whose administrator
# raised gro_max_size (BIG TCP) may see longer ones, whose datagrams past the buffer are lost
# and counted in `truncated` (`split_read`), never handed on cut short.
READ_BUFFER = MAX_DATAGRAM


@dataclass(frozen=True)
class Join:
    """One membership: ``source`` None joins the group for any source (ASM), otherwise only
    datagrams from ``source`` are delivered (SSM)."""

    group: str
    source: str | None = None


# struct sockaddr_in6 (netinet/in.h).  Port and flow info are in network byte order; both are 0
# in a join, so byte order never matters here.
class sockaddr_in6(ctypes.Structure):  # the C names, so the layouts are recognisable
    _fields_ = (
        ("sin6_family", ctypes.c_uint16),
        ("sin6_port", ctypes.c_uint16),
        ("sin6_flowinfo", ctypes.c_uint32),
        ("sin6_addr", ctypes.c_uint8 * 16),
        ("sin6_scope_id", ctypes.c_uint32),
    )


# struct sockaddr_storage as glibc defines it: 128 bytes whose last member is an unsigned long,
# so its alignment (and with it the padding after gsr_interface) is the platform's.
class _storage_layout(ctypes.Structure):
    _fields_ = (
        ("ss_family", ctypes.c_uint16),
        ("ss_padding", ctypes.c_char * (128 - 2 - ctypes.sizeof(ctypes.c_ulong))),
        ("ss_align", ctypes.c_ulong),
    )


class sockaddr_storage(ctypes.Union):
    _fields_ = (("in6", sockaddr_in6), ("storage", _storage_layout))


class group_source_req(ctypes.Structure):
    """struct group_source_req (RFC 3678, linux/in.h): the argument of MCAST_JOIN_SOURCE_GROUP."""

    _fields_ = (
        ("gsr_interface", ctypes.c_uint32),
        ("gsr_group", sockaddr_storage),
        ("gsr_source", sockaddr_storage),
    )


# 4 + 4 padding + 2 x 128 on LP64 (offsets 0/8/136); 4 + 2 x 128 = 260 on 32-bit ARM.
if ctypes.sizeof(ctypes.c_ulong) == 8:
    assert ctypes.sizeof(group_source_req) == 264, ctypes.sizeof(group_source_req)


def _sockaddr(address: ipaddress.IPv6Address, ifindex: int) -> sockaddr_storage:
    storage = sockaddr_storage()
    storage.in6.sin6_family = socket.AF_INET6
    storage.in6.sin6_addr[:] = address.packed
    # A link-local source is ambiguous without its link; the kernel takes the link from
    # gsr_interface, but the address is then well-formed for anyone who reads it back.
    storage.in6.sin6_scope_id = ifindex if address.is_link_local else 0
    return storage


def source_group_request(ifindex: int, group: str, source: str) -> group_source_req:
    """The MCAST_JOIN_SOURCE_GROUP argument for (source, group) on interface `ifindex`."""
    request = group_source_req()
    request.gsr_interface = ifindex
    request.gsr_group = _sockaddr(ipaddress.IPv6Address(group), ifindex)
    request.gsr_source = _sockaddr(ipaddress.IPv6Address(source), ifindex)
    return request


def _address(text: str, what: str) -> ipaddress.IPv6Address:
    # A zone index is refused: the interface is given once, for every join.
    if "%" in text:
        raise NetworkError(f"{what} {text!r} carries a zone index; name the interface instead")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise NetworkError(f"{what} {text!r} is not an IPv6 address") from None


def _check_joins(joins: Sequence[Join]) -> tuple[Join, ...]:
    """Normal-form copies of `joins`; NetworkError for anything the kernel would refuse or
    silently misread."""
    if not joins:
        raise NetworkError("no multicast group to join")
    checked: list[Join] = []
    any_source: set[str] = set()
    source_specific: set[str] = set()
    for join in joins:
        group = _address(join.group, "group")
        if not group.is_multicast:
            raise NetworkError(f"group {group} is not an IPv6 multicast address")
        source: str | None = None
        if join.source is not None:
            address = _address(join.source, "source")
            if address.is_multicast or address.is_unspecified:
                raise NetworkError(f"source {address} is not a unicast IPv6 address")
            source = str(address)
        normal = Join(str(group), source)
        if normal in checked:
            where = f"from {source}" if source else "for any source"
            raise NetworkError(f"group {group} {where} is listed twice")
        # The kernel keeps one filter mode per group and socket: ASM is EXCLUDE {}, SSM is
        # INCLUDE {sources}.  Mixing them fails with an errno that would not say why.
        (source_specific if source else any_source).add(normal.group)
        if normal.group in any_source and normal.group in source_specific:
            raise NetworkError(f"group {group} is joined both for any source and per source")
        checked.append(normal)
    return tuple(checked)


def _describe(join: Join) -> str:
    return f"({join.source}, {join.group})" if join.source else f"(*, {join.group})"


def segment_size(ancillary: Sequence[tuple[int, int, bytes]]) -> int | None:
    """The segment size in a read's control messages: None without a UDP_GRO message (the read
    is one datagram), 0 for one that cannot be read (`split_read` then drops the read)."""
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            if len(data) != 4:
                return 0
            return int.from_bytes(data, sys.byteorder, signed=True)
    return None


def split_read(
    view: memoryview, length: int, flags: int, segment: int | None, limit: int
) -> tuple[list[memoryview], int]:
    """The whole datagrams of one read into `view`, and how many datagrams were lost.

    `length` is what the kernel returned with MSG_TRUNC asked for (the real length, which may
    exceed the buffer), `flags` the read's msg_flags and `segment` its GRO segment size
    (`segment_size`).  GRO coalesces only datagrams of one flow whose lengths are all
    `segment` except a shorter last one, so the read splits at multiples of `segment`.  Never
    raises and never hands on a part of a datagram: what lies past the end of the buffer is
    counted lost, and a read that cannot be split (its control message cut, a segment size
    below 1) is dropped whole and counted as one.  Datagrams longer than `limit` are dropped
    and counted the same way, as a too small buffer would have cut them.
    """
    if length < 0 or flags & MSG_CTRUNC or (segment is not None and segment < 1):
        return [], 1
    truncated = length > len(view) or flags & MSG_TRUNC
    if segment is None or segment >= length:  # one datagram
        return ([], 1) if truncated or length > limit else ([view[:length]], 0)
    if segment > limit:  # every one but a shorter last is too long: the read is dropped
        return [], -(-length // segment)
    if truncated:
        kept = min(length, len(view)) // segment
        lost = max(1, -(-length // segment) - kept)
        end = kept * segment
    else:
        lost, end = 0, length
    data = view[:end]
    return [data[start : start + segment] for start in range(0, end, segment)], lost


class MulticastReceiver:
    """A non-blocking UDP socket on `port` holding `joins` on `interface`.

    Read with `recv_batch` when `fileno` is readable (select/poll/selectors); it never blocks.
    `gro` asks the kernel for coalesced reads (UDP_GRO); `self.gro` says whether it agreed.
    """

    def __init__(
        self,
        interface: str,
        port: int,
        joins: Sequence[Join],
        *,
        rcvbuf: int = DEFAULT_RECEIVE_BUFFER,
        gro: bool = True,
        max_datagram: int = LARGEST_ACCEPTED,
    ) -> None:
        try:
            self.ifindex = socket.if_nametoindex(interface)
        except (OSError, ValueError):  # ValueError: a NUL in the name
            raise NetworkError(f"interface {interface!r} does not exist") from None
        if not 1 <= port <= 65535:
            raise NetworkError(f"port {port} is out of range 1-65535")
        if not 1 <= rcvbuf <= MAX_RECEIVE_BUFFER:
            raise NetworkError(f"receive buffer {rcvbuf} is out of range 1-{MAX_RECEIVE_BUFFER}")
        self._joins = _check_joins(joins)
        self.interface = interface
        self.port = port
        # Datagrams longer than the caller's buffer or `max_datagram` (by default the longest
        # otacast accepts: nothing longer is parsed), dropped rather than handed on.
        self.max_datagram = max_datagram
        self.truncated = 0
        # Reads made: datagrams received / reads is what GRO achieved.
        self.reads = 0
        self.coalesced: tuple[memoryview, int] | None = None  # the last read's (`recv_batch`)
        self.gro = gro
        self._dropped: list[Join] = []  # memberships `leave` dropped, until `rejoin`
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._limit = min(max_datagram, READ_BUFFER)  # the longest datagram handed on
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            self._configure(sock, rcvbuf)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.receive_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _configure(self, sock: socket.socket, rcvbuf: int) -> None:
        step = "IPV6_MULTICAST_ALL"
        try:
            # Before the joins and the bind, so not one foreign datagram is queued.
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
            step = "the receive buffer"
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                # Not root (CAP_NET_ADMIN): the kernel caps this at net.core.rmem_max.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if self.gro:
                try:
                    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                except OSError:  # before Linux 5.0, or not Linux: one datagram per read
                    self.gro = False
            sock.setblocking(False)
            step = f"binding port {self.port}"
            sock.bind(self._bind_address())
            for join in self._joins:
                step = f"joining {_describe(join)} on {self.interface}"
                self._join(sock, join)
        except OSError as exc:
            raise NetworkError(f"{step} failed: {_reason(exc)}") from None

    def _bind_address(self) -> tuple[str, int, int, int]:
        """The joined group when every membership is of one group, else any address.

        Bound to the group, the socket receives only datagrams sent to it: one sent to the
        device's own address (unicast, from anywhere that routes to it) never reaches the
        receiver (the kernel answers it with an ICMP port unreachable and counts it in
        Udp6NoPorts), so a host off the LAN cannot inject datagrams past the SSM source filter.
        """
        groups = {join.group for join in self._joins}
        if len(groups) != 1:
            return ("::", self.port, 0, 0)
        (group,) = groups
        # A link-scoped group (ffx2::) needs its interface; wider scopes take none.
        link = ipaddress.IPv6Address(group).packed[1] & 0x0F == 2
        return (group, self.port, 0, self.ifindex if link else 0)

    def _join(self, sock: socket.socket, join: Join, *, leave: bool = False) -> None:
        if join.source is None:
            request = socket.inet_pton(socket.AF_INET6, join.group)
            sock.setsockopt(
                socket.IPPROTO_IPV6,
                socket.IPV6_LEAVE_GROUP if leave else socket.IPV6_JOIN_GROUP,
                request + struct.pack("@I", self.ifindex),
            )
        else:
            source_request = source_group_request(self.ifindex, join.group, join.source)
            option = MCAST_LEAVE_SOURCE_GROUP if leave else MCAST_JOIN_SOURCE_GROUP
            sock.setsockopt(socket.IPPROTO_IPV6, option, bytes(source_request))

    def leave(self) -> None:
        """Drop every membership, keeping the socket and its joins: the kernel (and an MLD
        snooping switch or router, once it sees the report) stops delivering the groups until
        `rejoin`.  For a pause in which nothing that arrives could be used: the device's NIC
        and kernel then spend nothing on a carousel it would drop.  What is queued stays.

        Each join is dropped on its own: one that fails stays held (`NetworkError` names it,
        after the others were tried), and `rejoin` takes back exactly those dropped."""
        held = [join for join in self._joins if join not in self._dropped]
        self._change(held, leave=True)

    def rejoin(self) -> None:
        """Take back every membership `leave` dropped; one that fails stays dropped (for the
        next call to take back) and `NetworkError` names it, after the others were tried."""
        self._change(list(self._dropped), leave=False)

    def _change(self, joins: list[Join], *, leave: bool) -> None:
        """Leave (or join again) each of `joins` on its own, keeping `_dropped` to what the
        kernel holds; the first failure is raised once all were tried.  The kernel's "not a
        member" to a leave and "a member already" to a join mean it is as asked."""
        done_already = errno.EADDRNOTAVAIL if leave else errno.EADDRINUSE
        failed: tuple[Join, OSError] | None = None
        for join in joins:
            try:
                self._join(self._sock, join, leave=leave)
            except OSError as exc:
                if exc.errno != done_already:
                    failed = failed or (join, exc)
                    continue
            if leave:
                self._dropped.append(join)
            else:
                self._dropped.remove(join)
        if failed is not None:
            what = "leaving" if leave else "joining"
            again = "" if leave else " again"
            raise NetworkError(
                f"{what} {_describe(failed[0])} on {self.interface}{again} failed: "
                f"{_reason(failed[1])}"
            )

    @property
    def left(self) -> bool:
        """Whether memberships are dropped (`leave`) that `rejoin` has not taken back."""
        return bool(self._dropped)

    def add_join(self, join: Join) -> None:
        """Hold one more membership (`Join`), of the group the socket is bound to: a socket
        bound to one group never sees another's datagrams (`_bind_address`)."""
        joins = _check_joins([*self._joins, join])
        added = joins[-1]
        if added.group != self._joins[0].group:
            raise NetworkError(
                f"cannot add {_describe(added)}: this socket receives {self._joins[0].group} only"
            )
        if self.left:
            self._joins = joins
            self._dropped.append(added)  # joined with the others by `rejoin`
            return
        try:
            self._join(self._sock, added)
        except OSError as exc:
            raise NetworkError(
                f"joining {_describe(added)} on {self.interface} failed: {_reason(exc)}"
            ) from None
        self._joins = joins

    @property
    def joins(self) -> tuple[Join, ...]:
        """The memberships asked for, in normal form (compressed addresses): held in the
        kernel unless `left`."""
        return self._joins

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, buffer: bytearray | None = None) -> tuple[list[memoryview], str] | None:
        """Read what one receive call holds: (datagrams, source address), or None when the
        queue is empty.

        With GRO the kernel may hand over up to 64 datagrams of one flow coalesced in one
        buffer; they are returned one memoryview each (`split_read`), all from `source`.
        Otherwise the list holds one datagram.  The views point into `buffer` (by default the
        receiver's own `READ_BUFFER` bytes): valid until the next read, so copy what is kept.
        Datagrams cut short by a too small `buffer` or longer than `max_datagram` are never
        returned; they are counted in `truncated` and the list may then be empty.  After a
        read of several whole datagrams of a length divisible by 4, `coalesced` holds
        ``(words, segment)``: the read's whole datagrams as native 32-bit words, `segment`
        bytes each (for `ReceiverCore.receive_datagrams`; valid as long as the views), else
        None.  A link-local source carries its zone (``fe80::1%eth0``), as the kernel reports
        it.
        """
        # Every step counts here: this runs once per datagram where nothing is coalesced.
        if buffer is None:
            buffer, view, limit = self._buffer, self._view, self._limit
        else:
            view, limit = memoryview(buffer), min(self.max_datagram, len(buffer))
        try:
            # MSG_TRUNC: the kernel returns the real length, so a cut datagram is seen.
            if not self.gro:
                length, sender = self._sock.recvfrom_into(buffer, 0, MSG_TRUNC)
                self.reads += 1
                self.coalesced = None
                if length <= limit:
                    return [view[:length]], str(sender[0])
                self.truncated += 1
                return [], str(sender[0])
            length, ancillary, flags, sender = self._sock.recvmsg_into(
                (buffer,), GRO_CMSG_SPACE, MSG_TRUNC
            )
        except BlockingIOError:  # EAGAIN: the queue is empty (EINTR is retried by Python)
            return None
        except OSError as exc:
            raise NetworkError(
                f"receiving on port {self.port} on {self.interface} failed: {_reason(exc)}"
            ) from None
        self.reads += 1
        if not ancillary and not flags and length <= limit:
            self.coalesced = None
            return [view[:length]], str(sender[0])  # one whole datagram: no call, no more checks
        segment = segment_size(ancillary)
        datagrams, lost = split_read(view, length, flags, segment, self.max_datagram)
        self.truncated += lost
        self.coalesced = None
        if segment is not None and not segment & 3 and len(datagrams) > 1:
            whole = len(datagrams) - (len(datagrams[-1]) != segment)
            self.coalesced = (view[: whole * segment].cast("I"), segment)
        return datagrams, str(sender[0])

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> MulticastReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
