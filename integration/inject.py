"""An attacker on the LAN for tests: sends datagrams to a multicast group at a paced rate.

    python inject.py IFACE GROUP PORT SECONDS --pps N [--file F] [--forge-data TSI,CHUNKS,T]

``--file`` names datagrams to send in turn, over and over (each a 2-byte big-endian length then the
bytes; `write_datagrams` makes the file).  ``--forge-data`` makes a fresh forged DATA datagram for
every send instead: the session's LCT TSI (8 hex digits) the attacker read off the channel, a chunk
index below CHUNKS (as TOI and SBN), a random ESI and T random symbol bytes -- exactly what the
receiver admits to a decoder when packets are not authenticated.  Both may be given; they alternate.

It sends for SECONDS (or until SIGTERM) at N datagrams a second, in bursts of `BURST`, and
prints one JSON line: datagrams sent and send errors (a full queue, ENOBUFS, is counted, not
fatal).  It uses only the standard library so that it stays an attacker, not a client.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

BURST = 32
_LENGTH = struct.Struct(">H")
# An ALC/LCT DATA header by hand (docs/FORMATS.md): word 0 (V=1, S=1, O=01, HDR_LEN 4, codepoint
# 6), CCI 0, TSI, TOI = 1 + chunk // 255, then the RaptorQ payload id SBN = chunk % 255 | ESI.
_DATA_HEAD = struct.Struct(">IIIII")
_WORD0 = 0x10A00406


def write_datagrams(path: Path, datagrams: list[bytes]) -> None:
    path.write_bytes(b"".join(_LENGTH.pack(len(d)) + d for d in datagrams))


def read_datagrams(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, position = [], 0
    while position < len(data):
        (length,) = _LENGTH.unpack_from(data, position)
        out.append(data[position + 2 : position + 2 + length])
        position += 2 + length
    return out


def forged_data(tsi: int, chunks: int, symbol_size: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    pool = os.urandom(1 << 20)
    while True:
        start = rng.randrange(len(pool) - symbol_size)
        toi, sbn = divmod(rng.randrange(chunks), 255)
        head = _DATA_HEAD.pack(_WORD0, 0, tsi, 1 + toi, sbn << 24 | rng.getrandbits(24))
        yield head + pool[start : start + symbol_size]


def from_file(datagrams: list[bytes]) -> Iterator[bytes]:
    while True:
        yield from datagrams


def alternate(sources: list[Iterator[bytes]]) -> Iterator[bytes]:
    while True:
        for source in sources:
            yield next(source)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("interface")
    parser.add_argument("group")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--pps", type=float, required=True)
    parser.add_argument("--file", type=Path)
    parser.add_argument("--forge-data")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sources: list[Iterator[bytes]] = []
    if args.file:
        sources.append(from_file(read_datagrams(args.file)))
    if args.forge_data:
        tsi, chunks, symbol_size = args.forge_data.split(",")
        sources.append(forged_data(int(tsi, 16), int(chunks), int(symbol_size), args.seed))
    if not sources:
        parser.error("give --file or --forge-data")
    stream = alternate(sources)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    index = socket.if_nametoindex(args.interface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    target = (args.group, args.port, 0, index)
    sent = errors = 0
    start = time.monotonic()
    end = start + args.seconds
    while not stopping:
        now = time.monotonic()
        if now >= end:
            break
        due = start + (sent + errors) / args.pps
        if due > now:
            time.sleep(min(due - now, end - now))
            continue
        for _ in range(BURST):
            try:
                sock.sendto(next(stream), target)
                sent += 1
            except OSError:
                errors += 1
    print(json.dumps({"sent": sent, "errors": errors, "seconds": time.monotonic() - start}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
