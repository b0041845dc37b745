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

`AuthCarousel` decides which pages go out ahead of a run of DATA datagrams: a page is sent, twice,
just before a run that reaches into it, unless it was already sent within the last
``REPEAT_AFTER_PAGES`` pages' worth of DATA datagrams.  Within a pass, a page's datagrams follow
each other within about a window's round-robin (capacity x window datagrams, well inside that
gap), so each page goes out twice per pass; a later pass, a cycle that wraps, or a second sender
starting mid-page comes later than the gap and gets fresh copies.  One lost copy therefore costs
nothing, and datagrams that arrive before their page (reordering) are held by the receiver
until a copy arrives.  The gap is far below the receiver's memory of digests
(``MAX_AUTH_DIGESTS``), so data whose page went out within it is still vouched for.

The pages add about 2% to the bytes sent (10 bytes per datagram, twice, plus headers and
signatures); they are not paced, so the wire rate is that much above the configured rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from otacast.schemas import wire

from . import symbol_cache

Sign = Callable[[bytes], bytes]

# Copies of a page sent together (see the module doc).
COPIES = 2
# A page is sent again once this many pages' worth of DATA datagrams went out since its last
# copies: twice a window's round-robin of 8 chunks.
REPEAT_AFTER_PAGES = 16


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


def release_pages(
    reader: symbol_cache.SymbolReader, session: bytes, sender: int, sign: Sign
) -> list[list[bytes]]:
    """Every chunk's AUTH datagrams, from the sender's symbol cache."""
    size = reader.layout.datagram_size
    capacity = wire.auth_capacity(size)
    return [
        chunk_pages(session, sender, chunk, reader.read_cycle(chunk), size, capacity, sign)
        for chunk in range(len(reader.layout.cycles))
    ]


class AuthCarousel:
    """Which AUTH datagrams to send before each run of DATA datagrams (sans-IO)."""

    def __init__(self, pages: Sequence[Sequence[bytes]], capacity: int) -> None:
        self.pages = pages
        self.capacity = capacity
        self.gap = capacity * REPEAT_AFTER_PAGES
        self._last: dict[tuple[int, int], int] = {}  # page -> DATA datagrams sent before it
        self._sent = 0
        self.datagrams = 0
        self.bytes = 0

    def before(self, chunk: int, first: int, count: int) -> list[bytes]:
        """The pages to send before datagrams ``first .. first+count-1`` of `chunk`'s cycle."""
        out: list[bytes] = []
        for index in range(first // self.capacity, (first + count - 1) // self.capacity + 1):
            last = self._last.get((chunk, index))
            if last is None or self._sent - last > self.gap:
                out += [self.pages[chunk][index]] * COPIES
                self._last[(chunk, index)] = self._sent
        self._sent += count
        self.datagrams += len(out)
        self.bytes += sum(len(d) for d in out)
        return out
