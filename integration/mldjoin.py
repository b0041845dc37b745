"""A device's join for tests: joins a group with an ordinary socket, holds it, leaves.

    python mldjoin.py IFACE GROUP SOURCE|- HOLD AFTER

Joins GROUP on IFACE (ASM with IPV6_JOIN_GROUP when SOURCE is ``-``, else SSM with
MCAST_JOIN_SOURCE_GROUP), prints ``{"joined": wall clock}``, holds the join for HOLD seconds,
closes the socket (the kernel reports the leave), prints ``{"left": wall clock}`` and waits
AFTER seconds (its kernel keeps answering queries meanwhile).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from otacast.plugin.transport import MCAST_JOIN_SOURCE_GROUP, source_group_request


def main() -> None:
    interface, group, source = sys.argv[1], sys.argv[2], sys.argv[3]
    hold, after = float(sys.argv[4]), float(sys.argv[5])
    ifindex = socket.if_nametoindex(interface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    if source == "-":
        request = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)
    else:
        ssm = bytes(source_group_request(ifindex, group, source))
        sock.setsockopt(socket.IPPROTO_IPV6, MCAST_JOIN_SOURCE_GROUP, ssm)
    print(json.dumps({"joined": time.time()}), flush=True)
    time.sleep(hold)
    sock.close()
    print(json.dumps({"left": time.time()}), flush=True)
    time.sleep(after)


if __name__ == "__main__":
    main()
