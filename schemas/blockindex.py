"""The block index: one short strong hash per 4 KiB block of an image (delta delivery).

A device that already holds most of a new image (the previous release in its other slot, the
file it installed last time) should not receive those bytes again.  The signer cuts the image
into 4 KiB blocks and lists, in image order, the first 16 bytes of the SHA-256 of each block (the
last block zero-padded to 4 KiB before hashing).  The device hashes the blocks it holds, looks
each up in the index and, where a local block's hash equals the entry at some offset of the new
image, copies it there.  The index is bound to the signed manifest by its length and SHA-256,
so it is verified whole before a single entry is used; a local block is used only when its own
hash matches, and every chunk is still checked against its signed SHA-256 afterwards.

Layout (all integers big-endian)::

    0 magic "OCBI"   4 version (u8) = 1   5 log2 block size (u8) = 12   6 hash bytes (u8) = 16
    7 reserved (u8) = 0   8 image length in bytes (u64)   16 entries: hash bytes x ceil(length/4096)

The header repeats what the manifest says (length) so that a stored index is self-describing;
`parse` refuses one whose header disagrees with what it is checked against.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from .errors import MalformedIndex
from .limits import INDEX_BLOCK_SIZE, INDEX_HASH_BYTES, MAX_IMAGE_BYTES, MAX_INDEX_BYTES

# The index of image NAME is published and listed in the FDT as NAME + this suffix.
FILE_SUFFIX: Final = ".blockindex"
MAGIC: Final = b"OCBI"
VERSION: Final = 1
BLOCK_SIZE_LOG2: Final = 12
HEADER: Final = struct.Struct(">4sBBBBQ")
HEADER_SIZE: Final = HEADER.size  # 16
_ZERO_BLOCK: Final = bytes(INDEX_BLOCK_SIZE)

assert 1 << BLOCK_SIZE_LOG2 == INDEX_BLOCK_SIZE


def block_count(length: int) -> int:
    """How many 4 KiB blocks (the last one possibly short) an image of `length` bytes has."""
    return -(-length // INDEX_BLOCK_SIZE)


def index_length(length: int) -> int:
    """The byte length of the index of an image of `length` bytes."""
    return HEADER_SIZE + block_count(length) * INDEX_HASH_BYTES


def block_digest(block: bytes | bytearray | memoryview) -> bytes:
    """The index entry of one block: SHA-256 of the block zero-padded to 4 KiB, truncated."""
    n = len(block)
    if n > INDEX_BLOCK_SIZE:
        raise ValueError(f"a block is at most {INDEX_BLOCK_SIZE} bytes, not {n}")
    h = hashlib.sha256(block)
    if n < INDEX_BLOCK_SIZE:
        h.update(_ZERO_BLOCK[n:])
    return h.digest()[:INDEX_HASH_BYTES]


@dataclass(frozen=True)
class BlockIndex:
    """A parsed block index; `digests` holds the entries back to back."""

    length: int
    digests: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.length <= MAX_IMAGE_BYTES:
            raise ValueError(f"image length {self.length} is out of range")
        if len(self.digests) != block_count(self.length) * INDEX_HASH_BYTES:
            raise ValueError("the entries do not match the image length")

    @property
    def blocks(self) -> int:
        return block_count(self.length)

    def digest(self, block: int) -> bytes:
        """The entry of block number `block` (0-based)."""
        if not 0 <= block < self.blocks:
            raise IndexError(block)
        start = block * INDEX_HASH_BYTES
        return self.digests[start : start + INDEX_HASH_BYTES]

    def block_span(self, block: int) -> tuple[int, int]:
        """The image byte range [start, end) that block `block` covers."""
        start = block * INDEX_BLOCK_SIZE
        return start, min(start + INDEX_BLOCK_SIZE, self.length)

    def build(self) -> bytes:
        header = HEADER.pack(MAGIC, VERSION, BLOCK_SIZE_LOG2, INDEX_HASH_BYTES, 0, self.length)
        return header + self.digests

    def sha256(self) -> bytes:
        return hashlib.sha256(self.build()).digest()


def parse(data: bytes, *, length: int | None = None, sha256: bytes | None = None) -> BlockIndex:
    """Parse an index, checked against the signed image `length` and index `sha256` if given.

    Raises `MalformedIndex` (one line) for anything else; never allocates beyond `data`.
    """
    if len(data) > MAX_INDEX_BYTES:
        raise MalformedIndex(f"block index of {len(data)} bytes exceeds {MAX_INDEX_BYTES}")
    if sha256 is not None and hashlib.sha256(data).digest() != sha256:
        raise MalformedIndex("block index does not match the SHA-256 in the signed manifest")
    if len(data) < HEADER_SIZE:
        raise MalformedIndex("block index shorter than its header")
    magic, version, log2, hash_bytes, reserved, claimed = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedIndex("not a block index (bad magic)")
    if version != VERSION:
        raise MalformedIndex(f"block index version {version} is not supported (expected {VERSION})")
    if log2 != BLOCK_SIZE_LOG2 or hash_bytes != INDEX_HASH_BYTES or reserved:
        raise MalformedIndex(
            f"block index of {1 << min(log2, 40)}-byte blocks and {hash_bytes}-byte hashes is not"
            f" supported (expected {INDEX_BLOCK_SIZE} and {INDEX_HASH_BYTES})"
        )
    if claimed > MAX_IMAGE_BYTES:
        raise MalformedIndex(f"block index claims an image of {claimed} bytes")
    if length is not None and claimed != length:
        raise MalformedIndex(
            f"block index is of a {claimed}-byte image, the manifest's has {length}"
        )
    if len(data) != index_length(claimed):
        raise MalformedIndex(
            f"block index has {len(data)} bytes, {index_length(claimed)} expected for its image"
        )
    return BlockIndex(claimed, bytes(data[HEADER_SIZE:]))


class IndexBuilder:
    """Builds an index from an image fed in pieces of any size (the signer's single read);
    `finish` once."""

    def __init__(self) -> None:
        self._pending = bytearray()
        # The entries back to back (16 bytes each; a list of them took ~57 bytes per block: 17
        # MB for a 1.2 GB image, where a device builds its installed index, issue 12).
        self._digests = bytearray()
        self._length = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._length += len(view)
        if self._pending:
            take = min(INDEX_BLOCK_SIZE - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < INDEX_BLOCK_SIZE:
                return
            self._digests += block_digest(self._pending)
            self._pending.clear()
        whole = len(view) - len(view) % INDEX_BLOCK_SIZE
        for digest in iter_digests(view[:whole]):
            self._digests += digest
        self._pending += view[whole:]

    def finish(self) -> BlockIndex:
        if self._pending:
            self._digests += block_digest(self._pending)
            self._pending.clear()
        digests = bytes(self._digests)
        self._digests = bytearray()
        return BlockIndex(self._length, digests)


def iter_digests(data: bytes | memoryview) -> Iterator[bytes]:
    """The entry of each 4 KiB block of `data`, the last one possibly short."""
    view = memoryview(data)
    for start in range(0, len(view), INDEX_BLOCK_SIZE):
        yield block_digest(view[start : start + INDEX_BLOCK_SIZE])
