"""The sender's half of packet authentication: building and signing AUTH pages.

Theory of operation
-------------------
Every DATA datagram a sender can send is already in its symbol cache (each chunk's cycle of
source and repair symbols, framed), so the digests of all of them are known before the first
send.  `chunk_pages` cuts a chunk's cycle into pages of ``capacity`` digests (112 at the minimum
MTU), builds them from the last page to the first so that each can carry the link
(`wire.auth_link`) of the next, and signs each with the sender's stream key.  A receiver
checks one signature per chunk and the rest of that chunk's pages by hash
(`otacast.plugin.auth`).

When each page goes out is the sender core's decision (`otacast.signer.schedule`: its
`SendAuth` action names a chunk's pages and how many copies); `AuthPages` holds the signed pages
and turns such an action into the datagrams to send, counting what they add.

The pages add about 2% to the bytes sent (10 bytes per datagram, twice, plus headers and
signatures); they are not paced, so the wire rate is that much above the configured rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from otacast.schemas import wire

from . import symbol_cache
from .schedule import SendAuth

Sign = Callable[[bytes], bytes]


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


class AuthPages:
    """A release's signed AUTH pages, and the datagrams a `SendAuth` action names."""

    def __init__(self, pages: Sequence[Sequence[bytes]]) -> None:
        self.pages = pages
        self.datagrams = 0
        self.bytes = 0

    def for_action(self, action: SendAuth) -> list[bytes]:
        """Each named page of the chunk, ``copies`` times in a row, in the order named."""
        chunk = self.pages[action.chunk]
        out = [chunk[index] for index in action.pages for _ in range(action.copies)]
        self.datagrams += len(out)
        self.bytes += sum(len(d) for d in out)
        return out
