"""How an image is cut into chunks and each chunk into RaptorQ source symbols.

The layout is RFC 6330's own (section 4.4.1.2), so that the image is a standard FLUTE object (or a
few) whose source blocks are otacast's chunks.  Both sides derive every per-chunk parameter from
three signed numbers, so the manifest does not repeat them (and cannot contradict itself): the
image length ``L``, the symbol size ``T`` (a multiple of 8, the codec's alignment) and the chunk
size ``S = Kc*T`` (a whole number ``Kc`` of symbols):

* the image is cut into *parts* of ``255*S`` bytes (the last one shorter): the number of source
  blocks Z an FDT announces is 8 bits, so one FLUTE object holds at most 255 chunks
  (`limits.PART_CHUNKS`).  Part ``p`` is the FLUTE object with
  TOI ``1+p`` (`otacast.schemas.wire`), of transfer length ``F_p``;
* part ``p`` has ``Kt = ceil(F_p/T)`` symbols in ``Z = ceil(Kt/Kc)`` source blocks, sized by
  RFC 6330's ``Partition[Kt, Z] = (KL, KS, ZL, ZS)``: the first ``ZL`` blocks have ``KL`` symbols,
  the others ``KS`` (``KL - KS <= 1``, ``KL <= Kc``).  Every full part has ``Kt = 255*Kc``, so its
  chunks are all exactly ``S`` bytes; only the last part has shorter ones.  Only the object's last
  symbol is padded;
* chunk ``255*p + b`` is block ``b`` of part ``p``: one RaptorQ source block, encoded on its own
  (a block's symbols do not depend on its SBN), with ``K`` = its symbol count (ESI ``0..K-1``);
  ESIs from ``K`` up are repair symbols.  Any ``K`` (rarely ``K+1``) distinct valid symbols
  rebuild the chunk.  Encoded alone with the codec's defaults, a chunk of at most
  `limits.MAX_CHUNK_BYTES` is one source block without sub-blocks (Z = N = 1), so the symbols are
  exactly RFC 6330's for the whole object with the OTI the FDT announces (N = 1, Al = 8).

A chunk's offset is a multiple of ``T``.  Z = ceil(Kt/Kc) (rather than any Z) also makes the
RFC 5052 partitioning a FLUTE receiver runs from the FDT's Maximum-Source-Block-Length (= KL)
agree with RFC 6330's.

The codec itself is not here: the sender's encoder and the receiver's decoder sit behind a small
seam on each side so another RaptorQ implementation can slot in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .limits import (
    DEFAULT_MAX_DATAGRAM,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    PART_CHUNKS,
    SYMBOL_ALIGNMENT,
)
from .wire import DATA_HEADER_SIZE

SCHEME_RAPTORQ = "raptorq"
FEC_ENCODING_ID_RAPTORQ = 6  # RFC 6330 section 3.1, the LCT codepoint of every DATA datagram

# The largest multiple of the codec's 8-byte alignment that keeps a DATA datagram within the IPv6
# minimum-MTU payload: 1232 - 20 = 1212, rounded down to 1208 (1228-byte datagrams).
DEFAULT_SYMBOL_SIZE = (
    (DEFAULT_MAX_DATAGRAM - DATA_HEADER_SIZE) // SYMBOL_ALIGNMENT * SYMBOL_ALIGNMENT
)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Part:
    """One FLUTE object of the image: bytes ``[offset, offset+length)``, chunks
    ``first_chunk .. first_chunk+blocks-1``, partitioned as RFC 6330 ``Partition[Kt, Z]``."""

    index: int
    offset: int
    length: int  # F, the object's transfer length
    first_chunk: int
    blocks: int  # Z
    large: int  # KL, symbols of each of the first `large_blocks` blocks
    small: int  # KS, symbols of the others
    large_blocks: int  # ZL

    def block_span(self, block: int, symbol_size: int) -> tuple[int, int]:
        """(offset in the image, length) of source block `block` of this part."""
        if not 0 <= block < self.blocks:
            raise IndexError(block)
        before = block * self.large - max(0, block - self.large_blocks) * (self.large - self.small)
        start = before * symbol_size
        k = self.large if block < self.large_blocks else self.small
        return self.offset + start, min(k * symbol_size, self.length - start)


def partition(total: int, parts: int) -> tuple[int, int, int, int]:
    """RFC 6330 section 4.4.1.2 ``Partition[I, J]``: ``(IL, IS, JL, JS)``."""
    large, small = ceil_div(total, parts), total // parts
    large_parts = total - small * parts
    return large, small, large_parts, parts - large_parts


def part_bytes(chunk_size: int) -> int:
    return PART_CHUNKS * chunk_size


def part_count(image_length: int, chunk_size: int) -> int:
    return ceil_div(image_length, part_bytes(chunk_size))


def part(image_length: int, chunk_size: int, symbol_size: int, index: int) -> Part:
    """Part `index` of an image; `chunk_size` must be a multiple of `symbol_size`."""
    if not 0 <= index < part_count(image_length, chunk_size):
        raise IndexError(index)
    offset = index * part_bytes(chunk_size)
    length = min(part_bytes(chunk_size), image_length - offset)
    kt = ceil_div(length, symbol_size)
    blocks = ceil_div(kt, chunk_size // symbol_size)
    large, small, large_blocks, _ = partition(kt, blocks)
    return Part(index, offset, length, index * PART_CHUNKS, blocks, large, small, large_blocks)


def chunk_count(image_length: int, chunk_size: int, symbol_size: int) -> int:
    parts = part_count(image_length, chunk_size)
    if parts == 0:
        return 0
    return (parts - 1) * PART_CHUNKS + part(image_length, chunk_size, symbol_size, parts - 1).blocks


def chunk_span(image_length: int, chunk_size: int, symbol_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk `index` in the image."""
    if index < 0:
        raise IndexError(index)
    p, block = divmod(index, PART_CHUNKS)
    if p >= part_count(image_length, chunk_size):
        raise IndexError(index)
    return part(image_length, chunk_size, symbol_size, p).block_span(block, symbol_size)


def source_symbols(chunk_length: int, symbol_size: int) -> int:
    """K for a chunk of `chunk_length` bytes."""
    return ceil_div(chunk_length, symbol_size)


def chunk_size_problem(chunk_size: int, symbol_size: int) -> str | None:
    """Why `chunk_size` is not a valid chunk size for `symbol_size`, or None."""
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        return f"chunk size {chunk_size} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes"
    if chunk_size % symbol_size:
        return (
            f"chunk size {chunk_size} is not a whole number of {symbol_size}-byte symbols "
            f"(RFC 6330 source blocks)"
        )
    return None


def choose_chunk_size(image_length: int, preferred: int, symbol_size: int) -> int:
    """The preferred chunk size as whole symbols within the chunk limits, grown (by about a MiB
    at a time) until the image fits in MAX_CHUNKS."""
    smallest = ceil_div(MIN_CHUNK_BYTES, symbol_size)
    largest = MAX_CHUNK_BYTES // symbol_size
    symbols = max(smallest, min(preferred // symbol_size, largest))
    step = max(1, (1024 * 1024) // symbol_size)
    while (
        chunk_count(image_length, symbols * symbol_size, symbol_size) > MAX_CHUNKS
        and symbols < largest
    ):
        symbols = min(largest, symbols + step)
    return symbols * symbol_size
