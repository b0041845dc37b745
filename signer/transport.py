"""The sender's multicast socket: interface and source checks, hop limit, UDP GSO.

With UDP generic segmentation offload (``UDP_SEGMENT``) one ``send`` of up to 64 KB carries a
run of equal-size datagrams that the kernel splits; that is ~4x the packet rate of one
``send`` per datagram.  If the kernel refuses the option (or the first segmented send) the socket
falls back to one ``send`` per datagram, transparently.  The socket is connected to the group, so
it never binds a port anyone can send to and never reads.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import NetworkError

SOL_UDP = 17
UDP_SEGMENT = 103
# Largest UDP payload of one segmented send: 65535 - 8 (UDP header) rounded down for safety.
MAX_GSO_BYTES = 65000
# The kernel splits at most 64 segments per send (UDP_MAX_SEGMENTS on older kernels).
MAX_GSO_SEGMENTS = 64
# A full queue (ENOBUFS) is transient on a busy host: retry briefly before giving up.
ENOBUFS_RETRIES = 200
ENOBUFS_PAUSE = 0.0005


def gso_batch(datagram_size: int) -> int:
    return max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // datagram_size))


# /proc/net/if_inet6 flags of an address not usable as a source yet (IFA_F_TENTATIVE, still in
# duplicate address detection) or never (IFA_F_DADFAILED).
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08


def _interface_entries(interface: str) -> list[tuple[ipaddress.IPv6Address, int]]:
    """(address, flags) of the IPv6 addresses on `interface`, from /proc/net/if_inet6."""
    found: list[tuple[ipaddress.IPv6Address, int]] = []
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[5] == interface:
            found.append((ipaddress.IPv6Address(bytes.fromhex(fields[0])), int(fields[4], 16)))
    return found


def interface_addresses(interface: str) -> list[str]:
    """IPv6 addresses configured on `interface` (from /proc/net/if_inet6)."""
    return [str(address) for address, _ in _interface_entries(interface)]


def check_interface(interface: str, source: str | None = None) -> int:
    """The index of `interface`; `NetworkError` if it does not exist, or if `source` (the
    address to send from) is not one of its addresses.  `serve` asks before the minutes that
    hashing and encoding a large image can take."""
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        raise NetworkError(f"interface {interface!r} does not exist") from None
    if source is not None:
        present = interface_addresses(interface)
        try:
            normal = str(ipaddress.IPv6Address(source))
        except ValueError:
            raise NetworkError(f"source {source!r} is not an IPv6 address") from None
        if normal not in present:
            have = ", ".join(present) or "no IPv6 address"
            raise NetworkError(f"address {source} is not on interface {interface} ({have})")
    return index


def usable_link_local(interface: str) -> str | None:
    """A link-local address of `interface` past duplicate address detection, or None."""
    for address, flags in _interface_entries(interface):
        if address.is_link_local and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            return str(address)
    return None


@dataclass
class SendCounters:
    sends: int = 0
    datagrams: int = 0
    # Sends the kernel refused for want of buffer space (each retried after a pause) ...
    no_buffer: int = 0
    # ... and segmented (GSO) sends a driver refused (then one send per datagram from there on).
    gso_refused: int = 0


class MulticastSender:
    def __init__(
        self,
        interface: str,
        group: str,
        port: int,
        *,
        hops: int,
        source: str | None = None,
        gso: bool = True,
        loopback: bool = False,
    ) -> None:
        self.ifindex = check_interface(interface, source)
        try:
            if not ipaddress.IPv6Address(group).is_multicast:
                raise NetworkError(f"{group} is not an IPv6 multicast group")
        except ValueError:
            raise NetworkError(f"{group!r} is not an IPv6 address") from None
        self.interface = interface
        self.group = group
        self.port = port
        self.counters = SendCounters()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, hops)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(loopback))
            if source is not None:
                sock.bind((source, 0, 0, self.ifindex))
            sock.connect((group, port, 0, self.ifindex))
        except OSError as exc:
            sock.close()
            raise NetworkError(
                f"cannot send to [{group}]:{port} on {interface}: {exc.strerror or exc}"
            ) from None
        self.sock = sock
        self.source = sock.getsockname()[0]
        self.gso_size = 0
        self.gso_wanted = gso

    def _enable_gso(self, size: int) -> None:
        if self.gso_size == size:
            return
        try:
            self.sock.setsockopt(SOL_UDP, UDP_SEGMENT, size)
            self.gso_size = size
        except OSError:
            self.gso_wanted = False

    def send_run(self, run: memoryview, count: int, size: int) -> None:
        """Send `count` consecutive datagrams of `size` bytes held back to back in `run`."""
        if self.gso_wanted and count > 1:
            self._enable_gso(size)
            if self.gso_size == size:
                try:
                    self._send(run)
                except NetworkError:
                    # Some drivers refuse segmented sends: from now on one send per datagram.
                    self.counters.gso_refused += 1
                    self.gso_wanted = False
                    self._disable_gso()
                else:
                    self.counters.datagrams += count - 1
                    return
        for index in range(count):
            self._send(run[index * size : (index + 1) * size])

    def send_datagram(self, datagram: bytes) -> None:
        if self.gso_size and len(datagram) > self.gso_size:
            self._disable_gso()
        self._send(datagram)

    def _disable_gso(self) -> None:
        if self.gso_size:
            try:
                self.sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
            except OSError:
                self.gso_wanted = False
            self.gso_size = 0

    def _send(self, data: memoryview | bytes) -> None:
        for _ in range(ENOBUFS_RETRIES):
            try:
                self.sock.send(data)
            except OSError as exc:
                if exc.errno in (errno.ENOBUFS, errno.EAGAIN):
                    self.counters.no_buffer += 1
                    time.sleep(ENOBUFS_PAUSE)
                    continue
                raise NetworkError(
                    f"sending to [{self.group}]:{self.port} on {self.interface} failed: "
                    f"{exc.strerror or exc}"
                ) from None
            self.counters.sends += 1
            self.counters.datagrams += 1
            return
        raise NetworkError(f"interface {self.interface} stays congested (no buffer space)")

    def close(self) -> None:
        self.sock.close()
