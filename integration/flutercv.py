"""A plain FLUTE receiver for the interoperability tests: the PyPI ``flute-alc`` package (a
binding of the Rust ``flute`` crate), fed every datagram heard on one multicast group.

    python flutercv.py IFACE GROUP PORT TSI OUTDIR SECONDS NAME=SHA256 [NAME=SHA256 ...]

It joins GROUP on IFACE, pushes each datagram into one ``flute.receiver.Receiver`` for TSI
(the receiver writes every object it completes under OUTDIR by its FDT Content-Location), and
stops once every NAME named on the command line exists under OUTDIR with the given SHA-256, or
after SECONDS.  It prints one JSON line: datagrams pushed, push errors by message, the files
found and whether each matched, and how long it took.  It knows nothing about otacast: it is
what a user with a standard FLUTE stack would run.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path

from flute import receiver

SO_RCVBUFFORCE = 33
POLL_SECONDS = 0.5


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def main() -> None:
    interface, group, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tsi, outdir, seconds = int(sys.argv[4]), Path(sys.argv[5]), float(sys.argv[6])
    wanted = dict(arg.split("=", 1) for arg in sys.argv[7:])
    outdir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, 29, 0)  # IPV6_MULTICAST_ALL off: only our group
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 * 1024 * 1024)
    sock.bind(("::", port))
    ifindex = socket.if_nametoindex(interface)
    member = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, member)
    sock.settimeout(0.1)
    flute = receiver.Receiver(
        receiver.UDPEndpoint(group, port),
        tsi,
        receiver.ObjectWriterBuilder(str(outdir)),
        receiver.Config(),
    )
    pushed, errors = 0, Counter[str]()
    started = time.monotonic()
    next_poll = started + POLL_SECONDS
    found: dict[str, bool] = {}
    buffer = bytearray(65536)
    while time.monotonic() - started < seconds:
        try:
            n = sock.recv_into(buffer)
        except TimeoutError:
            n = 0
        if n:
            pushed += 1
            # flute-alc reports a packet it cannot parse as a TypeError; the others are counted
            # too, in case another version reports it differently.
            try:
                flute.push(bytes(buffer[:n]))
            except (TypeError, ValueError, RuntimeError) as exc:
                errors[str(exc)[:120]] += 1
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + POLL_SECONDS
            found = {name: _sha256(outdir / name) == digest for name, digest in wanted.items()}
            if all(found.values()):
                break
    found = {name: _sha256(outdir / name) == digest for name, digest in wanted.items()}
    print(
        json.dumps(
            {
                "pushed": pushed,
                "errors": dict(errors),
                "matched": found,
                "files": sorted(p.name for p in outdir.iterdir()),
                "seconds": round(time.monotonic() - started, 2),
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
