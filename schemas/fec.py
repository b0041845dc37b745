"""How an image is cut into chunks and each chunk into RaptorQ source symbols.

Both sides derive every per-chunk parameter from three signed numbers, so the manifest does not
repeat them (and cannot contradict itself):

* chunk ``i`` covers image bytes ``[i*S, min((i+1)*S, L))`` (chunk size ``S``, image length
  ``L``);
* the chunk is one RaptorQ source block (SBN 0) with transfer length = the chunk's length and
  symbol size ``T`` (a multiple of 8, the codec's alignment);
* it has ``K = ceil(len / T)`` source symbols (ESI ``0..K-1``); ESIs from ``K`` up are repair
  symbols.  Any ``K`` (rarely ``K+1``) distinct valid symbols rebuild the chunk.

The codec itself is not here: the sender's encoder and the receiver's decoder sit behind a small
seam on each side so another RaptorQ implementation can slot in.
"""

from __future__ import annotations

from .limits import (
    DEFAULT_MAX_DATAGRAM,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    SYMBOL_ALIGNMENT,
)
from .wire import DATA_HEADER_SIZE

SCHEME_RAPTORQ = "raptorq"

# The largest multiple of the codec's 8-byte alignment that keeps a DATA datagram within the IPv6
# minimum-MTU payload: 1232 - 20 = 1212, rounded down to 1208 (1228-byte datagrams).
DEFAULT_SYMBOL_SIZE = (
    (DEFAULT_MAX_DATAGRAM - DATA_HEADER_SIZE) // SYMBOL_ALIGNMENT * SYMBOL_ALIGNMENT
)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_count(image_length: int, chunk_size: int) -> int:
    return ceil_div(image_length, chunk_size)


def chunk_span(image_length: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk `index` in the image."""
    if not 0 <= index < chunk_count(image_length, chunk_size):
        raise IndexError(index)
    offset = index * chunk_size
    return offset, min(chunk_size, image_length - offset)


def source_symbols(chunk_length: int, symbol_size: int) -> int:
    """K for a chunk of `chunk_length` bytes."""
    return ceil_div(chunk_length, symbol_size)


def choose_chunk_size(image_length: int, preferred: int) -> int:
    """The preferred chunk size, grown (in MiB steps) until the image fits in MAX_CHUNKS."""
    size = max(MIN_CHUNK_BYTES, min(preferred, MAX_CHUNK_BYTES))
    step = 1024 * 1024
    while chunk_count(image_length, size) > MAX_CHUNKS and size < MAX_CHUNK_BYTES:
        size = min(MAX_CHUNK_BYTES, (size // step + 1) * step)
    return size
