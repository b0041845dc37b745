"""The FEC seam on the device side (the only `raptorq` user here).

A `ChunkDecoder` is fed validated codec packets (4-byte payload id + one symbol of exactly the
signed symbol size) and returns the chunk's bytes once it has enough, else None; `discard` is
called when what it returned failed the chunk's signed hash (or the codec failed), so a decoder
that keeps symbols elsewhere (the driver's symbol store) forgets them.  The receiver
core validates every packet before it gets here because the Rust codec silently accepts a
wrong-length symbol, and a packet's SBN (its chunk's block number within a FLUTE object) is
replaced by 0 here because the codec panics on an out-of-range one.  A panic surfaces
in Python as ``pyo3_runtime.PanicException``, a `BaseException`; it is turned into
`DecoderFault` here so that no codec failure can take the receiver down.

A decoder whose chunk is already in place (the symbol store's, with every source symbol
there) answers `InPlace`, the digest of those bytes, instead of the bytes themselves: the core
compares the digest and emits the chunk with no data.

A decoder may also answer `SUBMITTED` instead of bytes: the chunk holds enough symbols and its
decode runs elsewhere (the store's decoders with the driver's decode worker process,
`otacast.plugin.decode_worker`).  The core then refuses the chunk's further symbols (counted as
``decode-pending``) until the driver hands it the outcome (`ReceiverCore.chunk_decoded`).  The
in-memory decoder never does: it answers bytes or None as before, so the core and its tests
stay synchronous.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import raptorq


class DecoderFault(Exception):
    """The codec failed on input that passed validation; the chunk's symbols are discarded."""


class Decode(enum.Enum):
    """What a decoder answers when the chunk's bytes come later (module doc)."""

    SUBMITTED = "submitted"


SUBMITTED: Final = Decode.SUBMITTED


@dataclass(frozen=True)
class InPlace:
    """What a decoder answers for a chunk whose bytes are already where they belong (the
    symbol store's, once every source symbol of the chunk is in the staged image): their
    SHA-256, taken as they were written, for the core to compare with the signed one."""

    digest: bytes
    length: int


# What `feed` answers: the chunk's bytes (or their digest, in place), None (not yet), or
# `SUBMITTED`.
FeedResult = bytes | InPlace | Decode | None


class ChunkDecoder(Protocol):
    # `packet` may be a view of a buffer reused after the call: copy what is kept.
    def feed(self, packet: bytes | memoryview) -> FeedResult: ...

    def discard(self) -> None: ...


class SymbolFeed(Protocol):
    """A `ChunkDecoder` may also offer ``feed_symbol``, which the core then calls instead of
    `feed` with the ESI it has read and the symbol alone (``datagram[DATA_HEADER_SIZE:]``,
    exactly the signed symbol size): the same packet, without rebuilding what the core
    already has on every datagram."""

    def feed_symbol(self, esi: int, symbol: bytes | memoryview) -> FeedResult: ...


class RunFeed(Protocol):
    """A `ChunkDecoder` may also offer ``feed_run``: ``feed_symbol`` of ``symbols[i]`` as ESI
    ``first + i`` in order (a GRO read's run of consecutive ESIs of its chunk), for as many as
    it can take without the chunk becoming decodable; it returns how many it took, and the
    core feeds the rest one by one.  One call instead of one per datagram."""

    def feed_run(self, first: int, symbols: Sequence[bytes | memoryview]) -> int: ...


# (chunk index, chunk length, symbol size) -> a fresh decoder
DecoderFactory = Callable[[int, int, int], ChunkDecoder]


_BLOCK_ZERO = b"\x00"


def _fault(exc: BaseException) -> DecoderFault:
    return DecoderFault(f"codec failed: {type(exc).__name__}")


class RaptorQDecoder:
    def __init__(self, length: int, symbol_size: int) -> None:
        self._decoder = raptorq.Decoder.with_defaults(length, symbol_size)
        self._length = length

    def feed(self, packet: bytes | memoryview) -> bytes | None:
        # The packet's SBN is the chunk's block number in its FLUTE object; this decoder holds
        # the chunk alone, as block 0 (any other SBN panics the codec).  A view (the receive
        # loop's) costs one copy, as before; bytes with another SBN one more.
        if type(packet) is not bytes or packet[0]:
            packet = _BLOCK_ZERO + packet[1:]
        try:
            result = self._decoder.decode(packet)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
            raise _fault(exc) from None
        if result is None:
            return None
        return _checked(result, self._length)

    def discard(self) -> None:
        """Nothing is kept outside this object, which the core drops."""


def raptorq_decoder(chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
    """An in-memory decoder (`chunk` is not needed: it holds only this chunk's symbols)."""
    return RaptorQDecoder(length, symbol_size)


def _checked(result: bytes, length: int) -> bytes:
    data = bytes(result)
    if len(data) != length:
        raise DecoderFault(f"codec returned {len(data)} bytes, expected {length}")
    return data


def decode_chunk(length: int, symbol_size: int, packets: Iterable[bytes]) -> bytes | None:
    """Feed `packets` to a fresh decoder, one at a time, until it yields the chunk's `length`
    bytes; None if they are not enough.  For a decoder whose symbols are elsewhere (the symbol
    store): no `ChunkDecoder` object, one call into the codec per packet.  Whatever the
    iteration of `packets` raises is raised as it is."""
    decode = raptorq.Decoder.with_defaults(length, symbol_size).decode
    for packet in packets:
        try:
            result = decode(packet)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
            raise _fault(exc) from None
        if result is not None:
            return _checked(result, length)
    return None
