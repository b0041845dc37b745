"""A recording attacker for tests: joins a group and saves the datagrams of one kind it hears.

    python record.py IFACE GROUP PORT SECONDS OUT [--kind 3]

It keeps every datagram whose kind byte (offset 3 of otacast's header, in every wire version)
is ``--kind`` (3: AUTH pages), in the file format of `inject.write_datagrams`, so that
``inject.py --file OUT`` can replay them, and prints one JSON line with the count.  Standard
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("interface")
    parser.add_argument("group")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", type=int, default=3)
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
        if len(data) > 3 and data[3] == args.kind:
            kept.append(data)
    args.out.write_bytes(b"".join(_LENGTH.pack(len(d)) + d for d in kept))
    print(json.dumps({"recorded": len(kept)}), flush=True)


if __name__ == "__main__":
    main()
