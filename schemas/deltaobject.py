"""The delta lane's objects: the lane object (the blocks a device is missing) and index patches.

A device that holds release j of an image needs, to build release n, only the 4 KiB blocks of
n whose hash is absent from j's block index (`otacast.schemas.blockindex`), and n's index to
place and check everything.  The signer lists several recent releases; the **lane object**
carries the blocks of n absent from *any* of them (the union: a block present in n-2 but not in
n-1 is still needed by devices on n-1), as runs of block numbers and one compressed stream of
those blocks' bytes in run order.  Per listed release an **index patch** turns that release's
index into n's: COPY a stretch of the old index, or LITERAL entries.  The device checks the
patched index against the SHA-256 the signed manifest gives for n's index before using it, and
every decompressed block against its entry in that index.

Lane object (all integers big-endian)::

    0 magic "OCDL"  4 version (u8) = 1  5 log2 block size (u8) = 12  6 reserved (u16) = 0
    8 image length in bytes (u64)  16 blocks carried (u32)  20 runs (u32)
    24 compressed length (u64)  32 runs x (start block u32, block count u32)
    then the compressed stream (xz) of the carried blocks' bytes in run order

Runs ascend, each holds at least one block, a gap separates two runs (adjacent runs are one
run), and every run lies within the image's blocks; the last image block is short when the
image length is not a multiple of 4096, and so is its part of the stream.  This module knows
the framing only: which compressor made the stream is the two sides' business (schemas import
no compression library).

Index patch::

    0 magic "OCIP"  4 version (u8) = 1  5 hash bytes (u8) = 16  6 reserved (u16) = 0
    8 old image length (u64)  16 new image length (u64)  24 COPY ops (u32)  28 LITERAL ops (u32)
    32 literal entries (u32)  36 reserved (u32) = 0  40 SHA-256 of the old index (32 bytes)
    72 ops in new-index order:  "C" start (u32) count (u32)  |  "L" count (u32) entries

The header's counts give the patch's exact length, checked before a single op is parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from .blockindex import BlockIndex, block_count
from .errors import MalformedDelta
from .limits import (
    DELTA_XZ_OVERHEAD_BYTES,
    INDEX_BLOCK_SIZE,
    INDEX_HASH_BYTES,
    MAX_DELTA_RUNS,
    MAX_IMAGE_BYTES,
    MAX_PATCH_OPS,
)

LANE_MAGIC: Final = b"OCDL"
PATCH_MAGIC: Final = b"OCIP"
VERSION: Final = 1
BLOCK_SIZE_LOG2: Final = 12
LANE_HEADER: Final = struct.Struct(">4sBBHQIIQ")
LANE_HEADER_SIZE: Final = LANE_HEADER.size  # 32
RUN: Final = struct.Struct(">II")
PATCH_HEADER: Final = struct.Struct(">4sBBHQQIIII32s")
PATCH_HEADER_SIZE: Final = PATCH_HEADER.size  # 72
COPY_TAG: Final = b"C"
LITERAL_TAG: Final = b"L"
_COPY: Final = struct.Struct(">cII")
_LITERAL: Final = struct.Struct(">cI")

assert 1 << BLOCK_SIZE_LOG2 == INDEX_BLOCK_SIZE


def max_compressed_length(raw_length: int) -> int:
    """The longest stream an honest compressor writes for `raw_length` bytes (xz stores an
    incompressible 64 KiB chunk with a few bytes of header: well under 1/1024 of expansion)."""
    return raw_length + raw_length // 1024 + DELTA_XZ_OVERHEAD_BYTES


# --- Lane object -----------------------------------------------------------------------------


def _check_runs(run_list: bytes | memoryview, image_blocks: int) -> tuple[int, int] | str:
    """(blocks carried, 1 if the last run ends at the image's last block else 0), or the
    problem in words."""
    if len(run_list) % RUN.size:
        return "run list is not a whole number of runs"
    carried = 0
    next_free = 0  # the first block a following run may start at
    last_block = False
    for start, count in RUN.iter_unpack(run_list):
        if count == 0:
            return f"run at block {start} is empty"
        if start < next_free:
            return f"run at block {start} overlaps or touches the run before it, or is out of order"
        end = start + count
        if end > image_blocks:
            return f"run {start}+{count} ends beyond the image's {image_blocks} blocks"
        carried += count
        next_free = end + 1
        last_block = end == image_blocks
    return carried, int(last_block)


def _raw_length(length: int, blocks: int, has_last_block: bool) -> int:
    raw = blocks * INDEX_BLOCK_SIZE
    if has_last_block and length % INDEX_BLOCK_SIZE:
        raw -= INDEX_BLOCK_SIZE - length % INDEX_BLOCK_SIZE
    return raw


@dataclass(frozen=True)
class LaneHeader:
    """A lane object's header and run list; `run_list` holds the runs packed (8 bytes each)."""

    length: int
    blocks: int
    run_list: bytes
    compressed_length: int

    def __post_init__(self) -> None:
        if not 0 <= self.length <= MAX_IMAGE_BYTES:
            raise ValueError(f"image length {self.length} is out of range")
        if len(self.run_list) > MAX_DELTA_RUNS * RUN.size:
            raise ValueError(f"more than {MAX_DELTA_RUNS} runs")
        checked = _check_runs(self.run_list, block_count(self.length))
        if isinstance(checked, str):
            raise ValueError(checked)
        if checked[0] != self.blocks:
            raise ValueError(f"the runs carry {checked[0]} blocks, not {self.blocks}")
        if not 0 <= self.compressed_length <= max_compressed_length(self.raw_length):
            raise ValueError(f"compressed length {self.compressed_length} is out of range")

    @classmethod
    def from_runs(
        cls, length: int, runs: Iterable[tuple[int, int]], compressed_length: int
    ) -> LaneHeader:
        run_list = b"".join(RUN.pack(start, count) for start, count in runs)
        blocks = sum(count for _, count in RUN.iter_unpack(run_list))
        return cls(length, blocks, run_list, compressed_length)

    @property
    def run_count(self) -> int:
        return len(self.run_list) // RUN.size

    def runs(self) -> Iterator[tuple[int, int]]:
        """(start block, block count) of each run, in order."""
        return RUN.iter_unpack(self.run_list)

    @property
    def raw_length(self) -> int:
        """The length of the decompressed stream: the carried blocks' bytes."""
        run_count = self.run_count
        if not run_count:
            return 0
        start, count = RUN.unpack_from(self.run_list, (run_count - 1) * RUN.size)
        return _raw_length(self.length, self.blocks, start + count == block_count(self.length))

    @property
    def stream_offset(self) -> int:
        """Where the compressed stream starts in the lane object."""
        return LANE_HEADER_SIZE + len(self.run_list)

    @property
    def object_length(self) -> int:
        return self.stream_offset + self.compressed_length

    def build(self) -> bytes:
        """The header and run list: the lane object's bytes before the stream."""
        fixed = LANE_HEADER.pack(
            LANE_MAGIC,
            VERSION,
            BLOCK_SIZE_LOG2,
            0,
            self.length,
            self.blocks,
            self.run_count,
            self.compressed_length,
        )
        return fixed + self.run_list


def parse_lane_header(data: bytes | memoryview, *, length: int | None = None) -> LaneHeader:
    """The header and run list at the start of `data` (the stream may follow or not).

    Checked against the signed image `length` if given.  Raises `MalformedDelta` (one line);
    the run count, block count and stream length are checked before the run list is copied.
    """
    view = memoryview(data)
    if len(view) < LANE_HEADER_SIZE:
        raise MalformedDelta("delta lane object shorter than its header")
    magic, version, log2, reserved, claimed, blocks, runs, compressed = LANE_HEADER.unpack_from(
        view
    )
    if magic != LANE_MAGIC:
        raise MalformedDelta("not a delta lane object (bad magic)")
    if version != VERSION:
        raise MalformedDelta(f"delta lane version {version} is not supported (expected {VERSION})")
    if log2 != BLOCK_SIZE_LOG2 or reserved:
        raise MalformedDelta(
            f"delta lane of {1 << min(log2, 40)}-byte blocks is not supported"
            f" (expected {INDEX_BLOCK_SIZE})"
        )
    if claimed > MAX_IMAGE_BYTES:
        raise MalformedDelta(f"delta lane claims an image of {claimed} bytes")
    if length is not None and claimed != length:
        raise MalformedDelta(
            f"delta lane is of a {claimed}-byte image, the manifest's has {length}"
        )
    image_blocks = block_count(claimed)
    if blocks > image_blocks:
        raise MalformedDelta(f"delta lane claims {blocks} blocks of an image of {image_blocks}")
    if runs > MAX_DELTA_RUNS or runs > blocks:
        raise MalformedDelta(f"delta lane claims {runs} runs for {blocks} blocks")
    if compressed > max_compressed_length(blocks * INDEX_BLOCK_SIZE):
        raise MalformedDelta(f"delta lane claims a {compressed}-byte stream for {blocks} blocks")
    end = LANE_HEADER_SIZE + runs * RUN.size
    if len(view) < end:
        raise MalformedDelta("delta lane object shorter than its run list")
    checked = _check_runs(view[LANE_HEADER_SIZE:end], image_blocks)
    if isinstance(checked, str):
        raise MalformedDelta(f"delta lane {checked}")
    if checked[0] != blocks:
        raise MalformedDelta(f"delta lane runs carry {checked[0]} blocks, the header says {blocks}")
    raw = _raw_length(claimed, blocks, bool(checked[1]))
    if compressed > max_compressed_length(raw):
        raise MalformedDelta(f"delta lane claims a {compressed}-byte stream for {raw} bytes")
    return LaneHeader(claimed, blocks, bytes(view[LANE_HEADER_SIZE:end]), compressed)


def build_lane(header: LaneHeader, stream: bytes) -> bytes:
    """A whole lane object (small ones; the signer writes large ones piecewise)."""
    if len(stream) != header.compressed_length:
        raise ValueError("the stream's length is not the header's")
    return header.build() + stream


def parse_lane(
    data: bytes | memoryview, *, length: int | None = None
) -> tuple[LaneHeader, memoryview]:
    """A whole lane object: its header and a view of its compressed stream."""
    header = parse_lane_header(data, length=length)
    if len(data) != header.object_length:
        raise MalformedDelta(
            f"delta lane object has {len(data)} bytes, its header says {header.object_length}"
        )
    return header, memoryview(data)[header.stream_offset :]


# --- Index patch -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """`count` entries of the old index from entry `start`."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class Literal:
    """Entries given in full (blocks absent from the old release), back to back."""

    digests: bytes

    @property
    def count(self) -> int:
        return len(self.digests) // INDEX_HASH_BYTES


PatchOp = Copy | Literal


@dataclass(frozen=True)
class IndexPatch:
    """Turns the index of an `old_length`-byte image (SHA-256 `old_sha256`) into a new one."""

    old_length: int
    new_length: int
    old_sha256: bytes
    ops: tuple[PatchOp, ...]

    def __post_init__(self) -> None:
        for image_length in (self.old_length, self.new_length):
            if not 0 <= image_length <= MAX_IMAGE_BYTES:
                raise ValueError(f"image length {image_length} is out of range")
        if len(self.old_sha256) != 32:
            raise ValueError("the old index's SHA-256 is 32 bytes")
        if len(self.ops) > MAX_PATCH_OPS:
            raise ValueError(f"more than {MAX_PATCH_OPS} ops")
        old_blocks = block_count(self.old_length)
        covered = 0
        for op in self.ops:
            if isinstance(op, Copy):
                if op.count < 1 or op.start < 0 or op.start + op.count > old_blocks:
                    raise ValueError(f"COPY {op.start}+{op.count} is outside the old index")
            elif not op.digests or len(op.digests) % INDEX_HASH_BYTES:
                raise ValueError("a LITERAL holds one or more whole entries")
            covered += op.count
        if covered != block_count(self.new_length):
            raise ValueError(f"the ops give {covered} entries, the new image has more or fewer")

    def build(self) -> bytes:
        copies = sum(isinstance(op, Copy) for op in self.ops)
        entries = sum(op.count for op in self.ops if isinstance(op, Literal))
        parts = [
            PATCH_HEADER.pack(
                PATCH_MAGIC,
                VERSION,
                INDEX_HASH_BYTES,
                0,
                self.old_length,
                self.new_length,
                copies,
                len(self.ops) - copies,
                entries,
                0,
                self.old_sha256,
            )
        ]
        for op in self.ops:
            if isinstance(op, Copy):
                parts.append(_COPY.pack(COPY_TAG, op.start, op.count))
            else:
                parts.append(_LITERAL.pack(LITERAL_TAG, op.count))
                parts.append(op.digests)
        return b"".join(parts)

    def apply(self, old: BlockIndex) -> BlockIndex:
        """The new index.  Raises `MalformedDelta` when `old` is not the index this patch is for
        (the caller checks the result against the signed SHA-256 of the new index)."""
        if old.length != self.old_length or old.sha256() != self.old_sha256:
            raise MalformedDelta("index patch is for another release's block index")
        out = bytearray()
        for op in self.ops:
            if isinstance(op, Copy):
                out += old.digests[op.start * INDEX_HASH_BYTES : op.end * INDEX_HASH_BYTES]
            else:
                out += op.digests
        return BlockIndex(self.new_length, bytes(out))


def parse_patch(
    data: bytes | memoryview,
    *,
    old_length: int | None = None,
    new_length: int | None = None,
) -> IndexPatch:
    """Parse an index patch, checked against the image lengths if given.

    Raises `MalformedDelta` (one line).  The op and entry counts are checked against the limits
    and the patch's length before any op is parsed.
    """
    view = memoryview(data)
    if len(view) < PATCH_HEADER_SIZE:
        raise MalformedDelta("index patch shorter than its header")
    (
        magic,
        version,
        hash_bytes,
        reserved,
        old_claimed,
        new_claimed,
        copies,
        literals,
        entries,
        reserved2,
        old_sha256,
    ) = PATCH_HEADER.unpack_from(view)
    if magic != PATCH_MAGIC:
        raise MalformedDelta("not an index patch (bad magic)")
    if version != VERSION:
        raise MalformedDelta(f"index patch version {version} is not supported (expected {VERSION})")
    if hash_bytes != INDEX_HASH_BYTES or reserved or reserved2:
        raise MalformedDelta(
            f"index patch of {hash_bytes}-byte hashes is not supported"
            f" (expected {INDEX_HASH_BYTES})"
        )
    for what, claimed, expected in (
        ("old", old_claimed, old_length),
        ("new", new_claimed, new_length),
    ):
        if claimed > MAX_IMAGE_BYTES:
            raise MalformedDelta(f"index patch claims an {what} image of {claimed} bytes")
        if expected is not None and claimed != expected:
            raise MalformedDelta(
                f"index patch is for a {claimed}-byte {what} image, expected {expected}"
            )
    old_blocks, new_blocks = block_count(old_claimed), block_count(new_claimed)
    if copies + literals > MAX_PATCH_OPS:
        raise MalformedDelta(
            f"index patch claims {copies + literals} ops (at most {MAX_PATCH_OPS})"
        )
    if entries > new_blocks or copies + literals > new_blocks:
        raise MalformedDelta(
            f"index patch claims {entries} entries in {copies + literals} ops"
            f" for an image of {new_blocks} blocks"
        )
    expected_length = (
        PATCH_HEADER_SIZE
        + copies * _COPY.size
        + literals * _LITERAL.size
        + entries * INDEX_HASH_BYTES
    )
    if len(view) != expected_length:
        raise MalformedDelta(
            f"index patch has {len(view)} bytes, its header's counts give {expected_length}"
        )
    ops: list[PatchOp] = []
    offset = PATCH_HEADER_SIZE
    covered = seen_copies = seen_literals = seen_entries = 0
    while offset < len(view):
        tag = bytes(view[offset : offset + 1])
        if tag == COPY_TAG and seen_copies < copies and offset + _COPY.size <= len(view):
            _, start, count = _COPY.unpack_from(view, offset)
            offset += _COPY.size
            if count < 1 or start + count > old_blocks:
                raise MalformedDelta(
                    f"index patch COPY {start}+{count} is outside the old index of {old_blocks}"
                )
            seen_copies += 1
            op: PatchOp = Copy(start, count)
        elif tag == LITERAL_TAG and offset + _LITERAL.size <= len(view):
            _, count = _LITERAL.unpack_from(view, offset)
            offset += _LITERAL.size
            if count < 1 or seen_entries + count > entries:
                raise MalformedDelta(
                    f"index patch LITERAL of {count} entries is empty or beyond its header's"
                )
            seen_entries += count
            seen_literals += 1
            end = offset + count * INDEX_HASH_BYTES
            op = Literal(bytes(view[offset:end]))
            offset = end
        else:
            raise MalformedDelta(f"index patch has a bad op at byte {offset}")
        covered += op.count
        if covered > new_blocks:
            raise MalformedDelta(
                f"index patch gives more than the new image's {new_blocks} entries"
            )
        ops.append(op)
    if (covered, seen_copies, seen_literals, seen_entries) != (
        new_blocks,
        copies,
        literals,
        entries,
    ):
        raise MalformedDelta(
            f"index patch gives {covered} of the new image's {new_blocks} entries"
            " or disagrees with its header's counts"
        )
    return IndexPatch(old_claimed, new_claimed, old_sha256, tuple(ops))
