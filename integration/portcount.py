"""Counts, without joining anything, the IPv6 packets to one group that cross a switch port.

    python portcount.py PORT GROUP SECONDS

Run in the switch's namespace: an AF_PACKET socket on PORT (the sender's port) sees every frame
the sender puts on the link, and joins no group, so it is not a listener the sender could hear
of.  Prints one JSON line: ``{"times": [wall clock of each packet to GROUP], "other": N}``.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import sys
import time

# Every protocol: a socket for ETH_P_IPV6 alone would see nothing on a bridge port, where the
# bridge takes the frame before protocol handlers run (only ETH_P_ALL taps come first).
ETH_P_ALL = 0x0003
IPV6 = b"\x86\xdd"
SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max: the carousel passes the port too
# Ethernet header (14) + IPv6 destination address (offset 24, 16 bytes).
DESTINATION = slice(14 + 24, 14 + 40)


def main() -> None:
    port, group, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    wanted = ipaddress.IPv6Address(group).packed
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((port, ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
    times: list[float] = []
    other = 0
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if not select.select([sock], [], [], min(left, 0.1))[0]:
            continue
        frame = sock.recv(65536)
        if frame[12:14] == IPV6 and frame[DESTINATION] == wanted:
            times.append(time.time())
        else:
            other += 1
    print(json.dumps({"times": times, "other": other}))


if __name__ == "__main__":
    main()
