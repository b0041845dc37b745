"""The device's side of the delta lane: blocks out of a lane object, a new index from a patch.

`LaneDecoder` is sans-IO: the caller feeds the lane object's compressed stream in pieces of any
size (after the object's SHA-256 matched the signed manifest) and gets (block number, bytes) for
each block whose hash equals the *new* index's entry for that block.  The new index is the
verified one (received whole, or `patched_index` of the installed release's index).  A block
whose hash differs is counted under "block-hash" and never given out; a stream that fails to
decode, runs longer than its run list says or ends early stops the decoder with a counted reason
("stream-corrupt", "stream-too-long", "stream-truncated"): the blocks it did give out are good,
the rest must come from elsewhere (the carousel, HTTP).  Nothing here raises on hostile stream
bytes.

Memory is bounded whatever the stream claims: the xz decoder may use MAX_DELTA_XZ_MEMORY, and
each call asks it for at most DELTA_DECODE_STEP bytes and never for more than the run list's
blocks hold, so a decompression bomb yields one step too many and stops.
"""

from __future__ import annotations

import hashlib
import lzma
from collections import Counter
from collections.abc import Iterator
from typing import Final, Protocol

from otacast.schemas.blockindex import BlockIndex, block_digest
from otacast.schemas.deltaobject import (
    LANE_HEADER,
    LANE_HEADER_SIZE,
    RUN,
    LaneHeader,
    parse_lane_header,
    parse_patch,
)
from otacast.schemas.errors import MalformedDelta
from otacast.schemas.limits import (
    DELTA_DECODE_STEP,
    INDEX_BLOCK_SIZE,
    MAX_DELTA_RUNS,
    MAX_DELTA_XZ_MEMORY,
)

REJECTION_REASONS: Final = ("block-hash", "stream-corrupt", "stream-too-long", "stream-truncated")


class StoredObject(Protocol):
    """A verified object kept outside memory (`otacast.plugin.object_file.VerifiedObject`)."""

    @property
    def length(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def pieces(self, offset: int, size: int) -> Iterator[bytes]: ...


def lane_header_of(lane: bytes | StoredObject, *, length: int) -> LaneHeader:
    """The header and run list of a verified lane object, held in memory or stored, checked
    against the signed image `length` and the object's own length (`MalformedDelta`, one line;
    a stored object that cannot be read raises OSError).  Of a stored one only the header and
    at most ``MAX_DELTA_RUNS`` runs are read."""
    if isinstance(lane, bytes):
        header = parse_lane_header(lane, length=length)
        total = len(lane)
    else:
        head = lane.read(0, LANE_HEADER_SIZE)
        runs = LANE_HEADER.unpack_from(head)[6] if len(head) == LANE_HEADER_SIZE else 0
        span = LANE_HEADER_SIZE + min(runs, MAX_DELTA_RUNS) * RUN.size
        header = parse_lane_header(lane.read(0, span) if runs else head, length=length)
        total = lane.length
    if total != header.object_length:
        raise MalformedDelta(
            f"delta lane object has {total} bytes, its header says {header.object_length}"
        )
    return header


class LaneDecoder:
    """Decodes one lane object's stream against the verified new index."""

    def __init__(self, header: LaneHeader, index: BlockIndex) -> None:
        if header.length != index.length:
            raise MalformedDelta(
                f"delta lane is of a {header.length}-byte image, the index's has {index.length}"
            )
        self.header = header
        self.index = index
        self.rejections: Counter[str] = Counter()
        self.blocks_given = 0
        self.done = False
        self._decompressor = lzma.LZMADecompressor(
            format=lzma.FORMAT_XZ, memlimit=MAX_DELTA_XZ_MEMORY
        )
        self._raw_left = header.raw_length
        self._runs = header.runs()
        self._block = 0
        self._run_left = 0
        self._pending = b""

    def feed(self, compressed: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
        """The good blocks this piece of the stream completes, in stream order."""
        data: bytes | memoryview = compressed
        while not self.done:
            try:
                out = self._decompressor.decompress(
                    data, max_length=min(DELTA_DECODE_STEP, self._raw_left + 1)
                )
            except lzma.LZMAError:
                self._stop("stream-corrupt")
                return
            data = b""
            if len(out) > self._raw_left:
                yield from self._blocks(out[: self._raw_left])
                self._stop("stream-too-long")
                return
            yield from self._blocks(out)
            if self._decompressor.eof:
                if self._decompressor.unused_data or self._raw_left:
                    self._stop("stream-too-long" if not self._raw_left else "stream-truncated")
                else:
                    self.done = True
                return
            if not out and self._decompressor.needs_input:
                return

    def finish(self) -> None:
        """The stream has ended: a decoder that is not done counts it as truncated."""
        if not self.done:
            self._stop("stream-truncated")

    @property
    def complete(self) -> bool:
        """Every block of the run list was given out, verified."""
        return self.done and not self.rejections and self.blocks_given == self.header.blocks

    def _stop(self, reason: str) -> None:
        self.rejections[reason] += 1
        self.done = True

    def _blocks(self, out: bytes) -> Iterator[tuple[int, bytes]]:
        self._raw_left -= len(out)
        buffer = self._pending + out if self._pending else out
        view = memoryview(buffer)
        offset = 0
        while True:
            if not self._run_left:
                run = next(self._runs, None)
                if run is None:
                    break
                self._block, self._run_left = run
            start = self._block * INDEX_BLOCK_SIZE
            size = min(start + INDEX_BLOCK_SIZE, self.index.length) - start
            if len(view) - offset < size:
                break
            block = bytes(view[offset : offset + size])
            offset += size
            if block_digest(block) == self.index.digest(self._block):
                self.blocks_given += 1
                yield self._block, block
            else:
                self.rejections["block-hash"] += 1
            self._block += 1
            self._run_left -= 1
        self._pending = bytes(view[offset:])


def patched_index(
    old: BlockIndex,
    patch: bytes,
    *,
    length: int,
    sha256: bytes,
    patch_sha256: bytes | None = None,
) -> BlockIndex:
    """The new index from the installed release's index and an index patch, used only if it
    matches the signed `length` and `sha256` of the new index (and the patch its own signed
    `patch_sha256` if given).  Raises `MalformedDelta` (one line): the caller then takes the
    full index object."""
    if patch_sha256 is not None and hashlib.sha256(patch).digest() != patch_sha256:
        raise MalformedDelta("index patch does not match the SHA-256 in the signed manifest")
    new = parse_patch(patch, old_length=old.length, new_length=length).apply(old)
    if new.sha256() != sha256:
        raise MalformedDelta(
            "patched block index does not match the SHA-256 in the signed manifest"
        )
    return new
