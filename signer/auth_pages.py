"""The sender's half of packet authentication: AUTH pages, signed as they are sent.

Theory of operation
-------------------
Every DATA datagram a sender can send is already in its symbol cache (each chunk's cycle of
source and repair symbols, framed), so the digests of all of them are known before the first
send: `release_digests` computes them once (10 bytes per datagram, ~0.8% of the cycle), and
`kept_release_digests` keeps them beside the cache for the next start.  Page
``j`` of a chunk lists the digests of cycle positions ``j*P .. j*P+P-1`` (``P`` =
`wire.auth_capacity`, 112 at the minimum MTU), exactly one visit of the carousel
(`otacast.signer.schedule`).

A page is signed when it is sent, with the time of sending in it (``sent``, microseconds since
the epoch, strictly increasing per sender).  That is what makes a recorded page worthless: a
device refuses a page older than the newest one it has accepted from the same sender
(`otacast.plugin.auth`), so an attacker who replays genuine pages replays only stale ones.  It
costs one Ed25519 signature per visit (about 25 us for ~138 kB of DATA, under 0.2 ms per MB);
the page's second copy is the same bytes.

When each page goes out is the sender core's decision (its `SendAuth` action names a chunk's
pages and how many copies); `AuthPages` turns such an action into the datagrams to send, signed
at the time the driver passes, and counts what they add.

The pages add about 2% to the bytes sent (10 bytes per datagram, twice, plus headers and
signatures); they are not paced, so the wire rate is that much above the configured rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from otacast.schemas import wire

from . import symbol_cache
from .errors import WriteError
from .schedule import SendAuth

Sign = Callable[[bytes], bytes]


def chunk_digests(cycle: bytes | memoryview, datagram_size: int) -> bytes:
    """The digests of one chunk's cycle (its framed DATA datagrams), in cycle order."""
    if len(cycle) % datagram_size:
        raise ValueError("cycle is not a whole number of datagrams")
    view = memoryview(cycle)
    return b"".join(
        wire.packet_digest(view[i : i + datagram_size]) for i in range(0, len(view), datagram_size)
    )


def release_digests(reader: symbol_cache.SymbolReader) -> list[bytes]:
    """Every chunk's digests, from the sender's symbol cache (not the block index's: no AUTH
    page covers it, `otacast.signer.schedule`)."""
    size = reader.layout.datagram_size
    return [chunk_digests(reader.read_cycle(chunk), size) for chunk in range(reader.layout.chunks)]


# The name of the digests' file beside the cache (`symbol_cache.read_derived`).
DIGESTS_FILE = "digests"


def kept_release_digests(reader: symbol_cache.SymbolReader) -> list[bytes]:
    """`release_digests`, read from beside the cache file when they were kept there from the
    bytes `reader` reads, else computed and kept for the next start (a SHA-256 of every
    datagram: 1.08 s of CPU for a 500 MB image's 765 MB cache here, on every start that signs
    pages).  Kept digests are used only if each chunk's first one is what `wire.packet_digest`
    gives now: digests kept by a version that computed them otherwise are never signed."""
    layout = reader.layout
    counts = [layout.cycles[chunk] * wire.DIGEST_BYTES for chunk in range(layout.chunks)]
    kept = symbol_cache.read_derived(reader, DIGESTS_FILE, sum(counts))
    if kept is not None:
        out, at = [], 0
        for count in counts:
            out.append(kept[at : at + count])
            at += count
        if all(
            digests[: wire.DIGEST_BYTES] == wire.packet_digest(reader.read(chunk, 0, 1))
            for chunk, digests in enumerate(out)
        ):
            return out
    digests = release_digests(reader)
    # Only a speed-up for the next start: a directory that cannot take it costs this again.
    with contextlib.suppress(OSError, WriteError):
        symbol_cache.write_derived(reader, DIGESTS_FILE, b"".join(digests))
    return digests


class AuthPages:
    """A release's DATA digests, and the signed AUTH datagrams a `SendAuth` action names."""

    def __init__(
        self,
        tsi: int,
        sender: int,
        digests: Sequence[bytes],
        capacity: int,
        sign: Sign,
    ) -> None:
        if capacity < 1:
            raise ValueError("no room for a digest")
        self.tsi = tsi
        self.sender = sender
        self.digests = digests
        self.capacity = capacity
        self.sign = sign
        self._last_sent = 0
        self.datagrams = 0
        self.bytes = 0

    def page_count(self, chunk: int) -> int:
        return -(-len(self.digests[chunk]) // (self.capacity * wire.DIGEST_BYTES))

    def page(self, chunk: int, index: int, wall: float) -> bytes:
        """Page `index` of `chunk`, signed now (`wall`: seconds since the epoch)."""
        if not 0 <= index < self.page_count(chunk):
            raise ValueError("no such page")
        width = self.capacity * wire.DIGEST_BYTES
        body = self.digests[chunk][index * width : (index + 1) * width]
        # Strictly increasing even if the clock stands still or steps back: a device refuses a
        # page older than the newest it accepted from this sender.
        sent = max(self._last_sent + 1, int(wall * 1_000_000))
        self._last_sent = sent
        unsigned = wire.build_datagram(
            wire.AuthPacket(
                self.tsi, self.sender, chunk, index, sent, body, bytes(wire.SIGNATURE_BYTES)
            )
        )
        return unsigned[: -wire.SIGNATURE_BYTES] + self.sign(wire.auth_signed_bytes(unsigned))

    def for_action(self, action: SendAuth, wall: float) -> list[bytes]:
        """Each named page of the chunk, signed at `wall`, ``copies`` times in a row, in order."""
        out = []
        for index in action.pages:
            page = self.page(action.chunk, index, wall)
            out += [page] * action.copies
        self.datagrams += len(out)
        self.bytes += sum(len(d) for d in out)
        return out
