"""A recording attacker for tests: joins a group and saves the datagrams of one kind it hears.

    python record.py IFACE GROUP PORT SECONDS OUT [--kind auth]

It keeps every datagram of ``--kind``, read off its ALC/LCT header as docs/FORMATS.md lays it out
(codepoint at offset 3, TOI at 12: DATA has codepoint 6; FDT, MANIFEST and AUTH codepoint 0 and TOI
0, a TOI with the top bit set, any other TOI), in the file format of `inject.write_datagrams`, so
that ``inject.py --file OUT`` can replay them, and prints one JSON line with the count.  Standard
library only: it knows no keys and checks nothing, as an attacker would.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time
from pathlib import Path

_LENGTH = struct.Struct(">H")
KINDS = {"data", "fdt", "manifest", "auth"}


def kind_of(data: bytes) -> str:
    toi = int.from_bytes(data[12:16], "big")
    if data[3] == 6:
        return "data"
    if toi == 0:
        return "fdt"
    return "manifest" if toi & 0x80000000 else "auth"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("interface")
    parser.add_argument("group")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=sorted(KINDS), default="auth")
    args = parser.parse_args()
    index = socket.if_nametoindex(args.interface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", args.port))
    group = socket.inet_pton(socket.AF_INET6, args.group)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group + struct.pack("@I", index))
    sock.settimeout(0.2)
    kept: list[bytes] = []
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        if len(data) >= 16 and kind_of(data) == args.kind:
            kept.append(data)
    args.out.write_bytes(b"".join(_LENGTH.pack(len(d)) + d for d in kept))
    print(json.dumps({"recorded": len(kept)}), flush=True)


if __name__ == "__main__":
    main()
