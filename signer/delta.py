"""The delta lane's objects, built by the publisher: the missing blocks and the index patches.

Given a new image with its block index and the block indexes of the last k releases (newest
first; an index is made from a release's image when only the image is at hand), `build_delta`
finds the blocks of the new image whose entry is absent from *any* listed release's index (a
device on any of them has every other block somewhere locally), writes them as one lane object
(`otacast.schemas.deltaobject`: runs + one xz stream, preset 6, of the blocks in run order), and
makes one index patch per listed release.

Memory: the image is read run by run and streamed into the compressor, never held.  Each listed
release costs a dict from its distinct entries to their first block number (measured in
docs/PERFORMANCE.md: roughly 100-150 bytes per distinct block, so ~0.3 GB for two 4 GiB
releases); the new index itself is 16 bytes per block.
"""

from __future__ import annotations

import lzma
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from otacast.schemas.blockindex import BlockIndex, IndexBuilder, block_digest
from otacast.schemas.deltaobject import Copy, IndexPatch, LaneHeader, Literal, PatchOp
from otacast.schemas.limits import (
    INDEX_BLOCK_SIZE,
    INDEX_HASH_BYTES,
    MAX_DELTA_RUNS,
    MAX_IMAGE_BYTES,
    MAX_PATCH_OPS,
)

from .errors import ReadError, UsageError
from .fileio import atomic_stream

# How many earlier releases a lane covers unless told otherwise: the design measured +3% of lane
# bytes for covering one more release (docs/PERFORMANCE.md, "Delta delivery").
DEFAULT_DELTA_RELEASES: Final = 2
XZ_PRESET: Final = 6
_READ: Final = 1024 * 1024  # bytes read from an image at once (a multiple of the block size)

Lookup = dict[bytes, int]


@dataclass(frozen=True)
class Delta:
    """What `build_delta` wrote and made: the lane's header and a patch per listed release."""

    header: LaneHeader
    patches: tuple[IndexPatch, ...]


def index_of_image(path: Path) -> BlockIndex:
    """The block index of an image file, read once in 1 MiB pieces."""
    builder = IndexBuilder()
    try:
        with path.open("rb") as handle:
            while piece := handle.read(_READ):
                builder.update(piece)
    except OSError as exc:
        raise ReadError(f"cannot read image {path}: {exc.strerror or exc}") from None
    index = builder.finish()
    if index.length > MAX_IMAGE_BYTES:
        raise UsageError(f"image {path} is {index.length} bytes, the limit is {MAX_IMAGE_BYTES}")
    return index


def lookup(index: BlockIndex) -> Lookup:
    """Each distinct entry of `index` to the first block number that has it."""
    digests = index.digests
    table: Lookup = {}
    for block in range(index.blocks - 1, -1, -1):
        table[digests[block * INDEX_HASH_BYTES : (block + 1) * INDEX_HASH_BYTES]] = block
    return table


def missing_runs(new: BlockIndex, olds: Sequence[Lookup]) -> list[tuple[int, int]]:
    """(start, count) runs of the blocks of `new` whose entry is absent from any of `olds`.

    At most MAX_DELTA_RUNS runs: beyond that the shortest gaps are filled (their blocks are
    sent although some release has them), so the device never meets a longer run list."""
    runs: list[tuple[int, int]] = []
    digests = new.digests
    start = -1
    for block in range(new.blocks):
        digest = digests[block * INDEX_HASH_BYTES : (block + 1) * INDEX_HASH_BYTES]
        if any(digest not in table for table in olds):
            if start < 0:
                start = block
        elif start >= 0:
            runs.append((start, block - start))
            start = -1
    if start >= 0:
        runs.append((start, new.blocks - start))
    return _merge_shortest_gaps(runs, MAX_DELTA_RUNS)


def _merge_shortest_gaps(runs: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    if len(runs) <= most:
        return runs
    gaps = sorted(range(1, len(runs)), key=lambda i: runs[i][0] - sum(runs[i - 1]))
    filled = set(gaps[: len(runs) - most])
    merged: list[tuple[int, int]] = []
    for i, (start, count) in enumerate(runs):
        if i in filled:
            first, _ = merged[-1]
            merged[-1] = (first, start + count - first)
        else:
            merged.append((start, count))
    return merged


def index_patch(old: BlockIndex, new: BlockIndex, table: Lookup | None = None) -> IndexPatch:
    """The patch that turns `old` into `new`: each new entry is copied from the same block
    number of `old` when it is there, else from where the current COPY continues, else from
    the first block of `old` that has it, else given as a LITERAL.  A patch that would exceed
    MAX_PATCH_OPS is one LITERAL of the whole new index."""
    table = lookup(old) if table is None else table
    width = INDEX_HASH_BYTES
    old_digests, new_digests = old.digests, new.digests
    ops: list[PatchOp] = []
    copy_start = copy_count = 0
    literal_from = -1  # first new block of the pending LITERAL

    def flush(block: int) -> None:
        nonlocal copy_count, literal_from
        if copy_count:
            ops.append(Copy(copy_start, copy_count))
            copy_count = 0
        if literal_from >= 0:
            ops.append(Literal(new_digests[literal_from * width : block * width]))
            literal_from = -1

    for block in range(new.blocks):
        digest = new_digests[block * width : (block + 1) * width]
        if copy_count:
            following = copy_start + copy_count
            if old_digests[following * width : (following + 1) * width] == digest:
                copy_count += 1
                continue
        if old_digests[block * width : (block + 1) * width] == digest:
            source: int | None = block
        else:
            source = table.get(digest)
        if source is None:
            if literal_from < 0:
                flush(block)
                literal_from = block
            continue
        flush(block)
        copy_start, copy_count = source, 1
    flush(new.blocks)
    if len(ops) > MAX_PATCH_OPS:
        ops = [Literal(new_digests)] if new.blocks else []
    return IndexPatch(old.length, new.length, old.sha256(), tuple(ops))


def write_lane(
    image: Path, new: BlockIndex, runs: Sequence[tuple[int, int]], out: Path
) -> LaneHeader:
    """Write the lane object of `runs` of `image` to `out` (atomically), checking every block
    read against `new` (an image that changed since it was indexed is refused)."""
    with atomic_stream(out) as sink:
        placeholder = LaneHeader.from_runs(new.length, runs, 0)
        sink.write(placeholder.build())
        compressed = _compress_runs(image, new, runs, sink)
        header = LaneHeader(new.length, placeholder.blocks, placeholder.run_list, compressed)
        sink.seek(0)
        sink.write(header.build())
    return header


def _compress_runs(
    image: Path, new: BlockIndex, runs: Sequence[tuple[int, int]], sink: BinaryIO
) -> int:
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    written = 0
    try:
        with image.open("rb") as handle:
            for start, count in runs:
                handle.seek(start * INDEX_BLOCK_SIZE)
                block = start
                while block < start + count:
                    take = min(start + count - block, _READ // INDEX_BLOCK_SIZE)
                    end = min((block + take) * INDEX_BLOCK_SIZE, new.length)
                    piece = handle.read(end - block * INDEX_BLOCK_SIZE)
                    if len(piece) != end - block * INDEX_BLOCK_SIZE:
                        raise ReadError(f"image {image} is shorter than its index")
                    _check_blocks(image, new, block, piece)
                    out = compressor.compress(piece)
                    sink.write(out)
                    written += len(out)
                    block += take
    except OSError as exc:
        raise ReadError(f"cannot read image {image}: {exc.strerror or exc}") from None
    out = compressor.flush()
    sink.write(out)
    return written + len(out)


def _check_blocks(image: Path, new: BlockIndex, first: int, piece: bytes) -> None:
    view = memoryview(piece)
    for offset in range(0, len(view), INDEX_BLOCK_SIZE):
        block = first + offset // INDEX_BLOCK_SIZE
        if block_digest(view[offset : offset + INDEX_BLOCK_SIZE]) != new.digest(block):
            raise ReadError(f"image {image} changed since it was indexed (block {block})")


def build_delta(
    image: Path,
    new: BlockIndex,
    olds: Sequence[BlockIndex | Path],
    out: Path,
    *,
    releases: int = DEFAULT_DELTA_RELEASES,
) -> Delta:
    """Write the lane object for devices on any of the first `releases` of `olds` (newest
    first) to `out`, and return its header and one index patch per release covered."""
    if releases < 1:
        raise UsageError("a delta lane covers at least one earlier release")
    covered = [
        old if isinstance(old, BlockIndex) else index_of_image(old) for old in olds[:releases]
    ]
    if not covered:
        raise UsageError("a delta lane needs the index or image of an earlier release")
    tables = [lookup(old) for old in covered]
    header = write_lane(image, new, missing_runs(new, tables), out)
    patches = tuple(
        index_patch(old, new, table) for old, table in zip(covered, tables, strict=True)
    )
    return Delta(header, patches)
