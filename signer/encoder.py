"""The FEC seam on the publisher side (the only `raptorq` user here).

An encoder turns one chunk into the codec's packets in ESI order: K source symbols then
``repair`` repair symbols, each packet being the 4-byte RaptorQ payload id (SBN 0, ESI) followed
by a symbol of exactly ``symbol_size`` bytes.  Another RaptorQ implementation slots in by
providing the same function; the rest of the sender never sees the codec.
"""

from __future__ import annotations

from collections.abc import Callable

import raptorq

from otacast.schemas import fec

# chunk bytes, symbol size, repair count -> codec packets in ESI order
ChunkEncoder = Callable[[bytes, int, int], list[bytes]]


class EncoderFault(Exception):
    """The codec produced something other than what the formats require (a codec bug)."""


def raptorq_encode(chunk: bytes, symbol_size: int, repair: int) -> list[bytes]:
    packets: list[bytes] = raptorq.Encoder.with_defaults(chunk, symbol_size).get_encoded_packets(
        repair
    )
    expected = fec.source_symbols(len(chunk), symbol_size) + repair
    if len(packets) != expected:
        raise EncoderFault(f"codec returned {len(packets)} packets, expected {expected}")
    for esi in (0, expected - 1):
        packet = packets[esi]
        if len(packet) != 4 + symbol_size or int.from_bytes(packet[:4], "big") != esi:
            raise EncoderFault(f"codec packet {esi} has an unexpected payload id or length")
    return packets
