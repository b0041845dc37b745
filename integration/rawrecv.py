"""A bare multicast listener for tests: joins a group, checks every datagram's header against
the formats, and prints one JSON summary.

    python rawrecv.py IFACE GROUP PORT SECONDS [--dump FILE]

It reports counts by kind (data, index, manifest, fdt, auth) and source, sessions by LCT TSI, every
(source, chunk, esi) seen, bytes per 100 ms slot (for rate measurements), header violations, and
when the first complete manifest envelope had been reassembled, measured from the moment the join
was made.  With ``--dump FILE`` it also writes every DATA datagram to FILE, each preceded by its
length (u16, big-endian), for a test to decode.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from otacast.schemas import wire
from otacast.schemas.errors import PacketError
from otacast.schemas.manifest import parse_envelope

SLOT = 0.1
SO_RCVBUFFORCE = 33
# Kernel arrival timestamps (struct timespec, CLOCK_REALTIME), so rates are measured when the
# datagrams arrived, not when this process got round to reading them.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")  # Linux; root may exceed net.core.rmem_max (4 MiB in a namespace)


def main() -> None:
    interface, group, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    dump = Path(sys.argv[6]).open("wb") if sys.argv[5:6] == ["--dump"] else None  # noqa: SIM115
    ifindex = socket.if_nametoindex(interface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, 29, 0)  # IPV6_MULTICAST_ALL off: only our group
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 * 1024 * 1024)
    sock.bind(("::", port))
    member = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, member)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    joined = time.time()
    sock.settimeout(0.2)
    kinds: Counter[str] = Counter()
    per_source: Counter[str] = Counter()
    symbols: set[tuple[str, int, int]] = set()
    slots: Counter[int] = Counter()
    sizes: Counter[int] = Counter()
    sessions: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    fragments: dict[int, dict[int, bytes]] = defaultdict(dict)
    manifest_at: float | None = None
    manifest_session: str | None = None
    buffer = bytearray(9000)
    while time.time() - joined < seconds:
        try:
            n, ancillary, _, sender = sock.recvmsg_into([buffer], 64)
        except TimeoutError:
            continue
        now = time.time() - joined
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = TIMESPEC.unpack_from(data)
                now = sec + nsec / 1e9 - joined
        source = sender[0]
        per_source[source] += 1
        slots[int(now / SLOT)] += n
        sizes[n] += 1
        try:
            packet = wire.parse_datagram(memoryview(buffer)[:n])
        except PacketError as exc:
            problems[exc.reason] += 1
            continue
        sessions[f"{packet.tsi:08x}"] += 1  # the LCT TSI (AUTH pages: the session's)
        if isinstance(packet, wire.DataPacket):
            kinds["data"] += 1
            symbols.add((source, packet.chunk, packet.esi))
            if dump is not None:
                dump.write(n.to_bytes(2, "big") + buffer[:n])
        elif isinstance(packet, wire.FdtPacket):
            kinds["fdt"] += 1
        elif isinstance(packet, wire.AuthPacket):
            kinds["auth"] += 1
        elif isinstance(packet, wire.IndexPacket):
            kinds["index"] += 1  # the block index object (TOI 0x40000000)
        else:
            kinds["manifest"] += 1
            parts = fragments[packet.toi]
            parts[packet.offset] = packet.fragment
            if manifest_at is None and sum(len(p) for p in parts.values()) == packet.total_length:
                envelope = b"".join(parts[o] for o in sorted(parts))
                manifest_session = f"{parse_envelope(envelope).manifest.tsi:08x}"
                manifest_at = now
    if dump is not None:
        dump.close()
    print(
        json.dumps(
            {
                "kinds": kinds,
                "per_source": per_source,
                "sizes": {str(k): v for k, v in sizes.items()},
                "sessions": sessions,
                "problems": problems,
                "symbols": sorted(symbols),
                "slots": {str(k): v for k, v in sorted(slots.items())},
                "manifest_at": manifest_at,
                "manifest_session": manifest_session,
                "slot": SLOT,
            }
        )
    )


if __name__ == "__main__":
    main()
