"""The sender's half of packet authentication: AUTH pages and when to send them.

Theory of operation
-------------------
Every DATA datagram a sender can send is already in its symbol cache (each chunk's cycle of
source and repair symbols, framed), so the digests of all of them are known before the first
send.  `chunk_pages` cuts a chunk's cycle into pages of ``capacity`` digests (112 at the minimum
MTU), builds them from the last page to the first so that each can carry the link
(`wire.auth_link`) of the next, and signs each with the sender's stream key.  A receiver
checks one signature per chunk and the rest of that chunk's pages by hash
(`otacast.plugin.auth`).

`AuthCarousel` decides which pages go out ahead of a run of DATA datagrams: in every pass, each
page is sent twice, the first copy just before the first run that reaches into it and the second
before the next such run (both at once when the run covers the rest of the page).  One lost
copy therefore costs nothing, and datagrams that arrive before their page are held by the
receiver until a copy arrives.  The pages add about 2% to the bytes sent (10 bytes per datagram,
twice, plus headers and signatures); they are not paced, so the wire rate is that much above the
configured rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from otacast.schemas import wire

Sign = Callable[[bytes], bytes]

# Each page goes out this often per pass (see the module doc).
COPIES_PER_PASS = 2


def chunk_pages(
    session: bytes,
    sender: int,
    chunk: int,
    cycle: bytes | memoryview,
    datagram_size: int,
    capacity: int,
    sign: Sign,
) -> list[bytes]:
    """The AUTH datagrams of one chunk, page 0 first; `cycle` is its framed DATA datagrams."""
    if capacity < 1 or len(cycle) % datagram_size:
        raise ValueError("cycle is not a whole number of datagrams, or no room for a digest")
    view = memoryview(cycle)
    digests = [
        wire.packet_digest(view[i : i + datagram_size]) for i in range(0, len(view), datagram_size)
    ]
    count = -(-len(digests) // capacity)
    pages: list[bytes] = [b""] * count
    link = wire.NO_LINK
    for index in reversed(range(count)):
        body = b"".join(digests[index * capacity : (index + 1) * capacity])
        unsigned = wire.AuthPacket(
            session, sender, chunk, index, link, body, bytes(wire.SIGNATURE_BYTES)
        )
        datagram = wire.build_datagram(unsigned)
        signature = sign(wire.auth_signed_bytes(datagram))
        pages[index] = datagram[: -wire.SIGNATURE_BYTES] + signature
        link = wire.auth_link(pages[index])
    return pages


class AuthCarousel:
    """Which AUTH datagrams to send before each run of DATA datagrams (sans-IO)."""

    def __init__(
        self, pages: Sequence[Sequence[bytes]], capacity: int, cycles: Sequence[int]
    ) -> None:
        self.pages = pages
        self.capacity = capacity
        self.cycles = cycles
        self._sent: dict[tuple[int, int], tuple[int, int]] = {}  # page -> (pass, copies)
        self.datagrams = 0
        self.bytes = 0

    def before(self, chunk: int, first: int, count: int, pass_number: int) -> list[bytes]:
        """The pages to send before datagrams ``first .. first+count-1`` of `chunk`'s cycle."""
        out: list[bytes] = []
        end = first + count
        chunk_pages = self.pages[chunk]
        for index in range(first // self.capacity, (end - 1) // self.capacity + 1):
            key = (chunk, index)
            sent_in, copies = self._sent.get(key, (pass_number, 0))
            if sent_in != pass_number:
                copies = 0
            page_end = min((index + 1) * self.capacity, self.cycles[chunk])
            wanted = COPIES_PER_PASS if end >= page_end else copies + 1
            while copies < min(wanted, COPIES_PER_PASS):
                out.append(chunk_pages[index])
                copies += 1
            self._sent[key] = (pass_number, copies)
        self.datagrams += len(out)
        self.bytes += sum(len(d) for d in out)
        return out
