"""A RaptorQ object put together on disk, block by block (the delta lane's object, issue 15/12).

`FileAssembly` does what `index_object.ObjectAssembly` does (symbols of one object of a signed
length and SHA-256, cut as its `Part` is; the object given out only once its bytes hash right)
with memory that does not grow with the object: a lane object reaches ``MAX_LANE_OBJECT_BYTES``
(256 MiB), and held in memory with its decoders it took ~3 times its length at the peak.

* Each new symbol of a block is appended to the block's slots in a *spool* file beside the
  object (``NAME.spool``): ``K + LANE_SPOOL_EXTRA_SYMBOLS`` slots of ``4 + T`` bytes per block,
  each ESI once (the seen-ESI bits of `index_object`).
* Once a block has K symbols it is *finished*: when every source symbol is among them (no loss)
  they are copied to the block's place in the object file, else its spooled packets are read
  back in steps of ``SPOOL_READ_SYMBOLS`` into a fresh codec (`decoder.decode_chunk`) and the
  decoded block written there.  A decode that needs more symbols is tried again with each new
  one; a block whose slots fill without decoding is collected afresh (``NAME-undecodable``).
* Once every block is in the file, the file is hashed in ``HASH_READ_BYTES`` reads; only if it
  matches the signed SHA-256 is a `VerifiedObject` (its path and length) given out, and the
  spool removed.  A mismatch (a forged symbol spoiled some block, and which one cannot be
  known) collects every block afresh, as in memory (``NAME-mismatch``).

Memory: the seen-ESI bits (a quarter of a bit per byte of object), one step of packets and,
while a block is decoded, the codec with that block's symbols and its output (each at most one
chunk, 8 MiB: ~37 MB in all).  What the codec frees, glibc's allocator keeps for the process
(its large buffers raise the allocator's mmap threshold, so they and what follows come from
the heap): after each decode the free memory is handed back (`return_free_memory`), else a
lane device kept the decode's ~37 MB through the local pass that follows (issue 12's bound).
Disk: the object's length in the file plus about as much in the spool.

The files are not made durable: a restart collects the object again (nothing in them is used
without the hash).  An error writing or reading them is a rejection (``NAME-file``), counted
like hostile input: the object then does not complete and the receiver's stall rules take over.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from otacast.schemas.fec import Part, source_symbols
from otacast.schemas.limits import LANE_SPOOL_EXTRA_SYMBOLS

from .decoder import DecoderFault, decode_chunk
from .index_object import SeenEsis

# The spool's name: the object file's with this added.
SPOOL_SUFFIX: Final = ".spool"
# Spooled packets read back per step (when copying or decoding a block): ~300 KB at T = 1208.
SPOOL_READ_SYMBOLS: Final = 256
# Bytes per read when the finished object is hashed.
HASH_READ_BYTES: Final = 1024 * 1024
_PAYLOAD_ID = 4


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None with another C library)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast("Callable[[int], int]", trim)


_TRIM = _malloc_trim()


def return_free_memory() -> None:
    """Hand the memory the allocator holds free back to the system (glibc; else nothing)."""
    if _TRIM is not None:
        _TRIM(0)


@dataclass(frozen=True)
class VerifiedObject:
    """An object on disk whose bytes hashed to its signed SHA-256 (read it with `read`)."""

    path: Path
    length: int

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer at the end; raises OSError)."""
        with self.path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(max(0, min(size, self.length - offset)))

    def pieces(self, offset: int, size: int) -> Iterator[bytes]:
        """The bytes from `offset` to the end, `size` at a time (raises OSError)."""
        with self.path.open("rb", buffering=0) as handle:
            handle.seek(offset)
            while offset < self.length:
                data = handle.read(min(size, self.length - offset))
                if not data:
                    raise OSError(f"{self.path} is shorter than its object")
                offset += len(data)
                yield data


class _Spooled:
    __slots__ = ("count", "k", "seen", "source")

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = SeenEsis(k)
        self.count = 0  # packets in the block's slots
        self.source = 0  # of them, source symbols (ESI < K)


class FileAssembly:
    """One RaptorQ object of `part.length` bytes put together in the file `path` (module doc);
    `feed` as `index_object.ObjectAssembly.feed`, giving a `VerifiedObject` once complete.
    The caller bounds `part.length` before making one."""

    def __init__(
        self, part: Part, sha256: bytes, symbol_size: int, path: Path, *, name: str = "lane"
    ) -> None:
        self.sha256 = sha256
        self.symbol_size = symbol_size
        self.length = part.length
        self.path = path
        self.spool_path = path.with_name(path.name + SPOOL_SUFFIX)
        self.spans = [part.block_span(b, symbol_size) for b in range(part.blocks)]
        self._packet = _PAYLOAD_ID + symbol_size
        self._slots: list[int] = []  # first slot of each block in the spool
        slots = 0
        for _, length in self.spans:
            self._slots.append(slots)
            slots += source_symbols(length, symbol_size) + LANE_SPOOL_EXTRA_SYMBOLS
        self.block_reason = name + "-block"
        self.mismatch_reason = name + "-mismatch"
        self.undecodable_reason = name + "-undecodable"
        self.file_reason = name + "-file"
        self.symbols = 0
        self.duplicates = 0
        self.decodes = 0  # blocks that needed the codec (the others were all source symbols)
        self._blocks: dict[int, _Spooled] = {}
        self._done: set[int] = set()
        self._fd = -1
        self._spool = -1

    def feed(self, block: int, esi: int, packet: bytes | memoryview) -> VerifiedObject | str | None:
        """One codec packet (payload id + symbol of the signed size) of `block`: the verified
        object once complete, a rejection reason, or None."""
        if not 0 <= block < len(self.spans):
            return self.block_reason
        if block in self._done:
            self.duplicates += 1
            return None
        state = self._blocks.get(block)
        if state is None:
            state = self._blocks[block] = _Spooled(
                source_symbols(self.spans[block][1], self.symbol_size)
            )
        if not state.seen.first_time(esi):
            self.duplicates += 1
            return None
        self.symbols += 1
        try:
            self._open()
            slot = self._slots[block] + state.count
            written = os.pwrite(self._spool, b"\0" + packet[1:], slot * self._packet)
            if written != self._packet:
                raise OSError("short write to the spool")
            state.count += 1
            state.source += esi < state.k
            if state.count < state.k:
                return None
            finished = self._finish_block(block, state)
        except OSError:
            del self._blocks[block]
            return self.file_reason
        except DecoderFault:
            del self._blocks[block]
            return "decoder-fault"
        if not finished:
            if state.count < state.k + LANE_SPOOL_EXTRA_SYMBOLS:
                return None
            del self._blocks[block]  # its slots are full: collected afresh
            return self.undecodable_reason
        del self._blocks[block]
        self._done.add(block)
        if len(self._done) < len(self.spans):
            return None
        try:
            digest = self._digest()
        except OSError:
            self._done.clear()
            return self.file_reason
        if digest != self.sha256:
            self._done.clear()  # every block is collected afresh
            return self.mismatch_reason
        self.close()
        with contextlib.suppress(OSError):
            self.spool_path.unlink()
        return VerifiedObject(self.path, self.length)

    def close(self) -> None:
        """Close the files (an unfinished object is simply left; the caller removes it)."""
        for fd in (self._fd, self._spool):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._spool = -1

    def remove(self) -> None:
        """Close and remove both files."""
        self.close()
        for path in (self.path, self.spool_path):
            with contextlib.suppress(OSError):
                path.unlink()

    def _open(self) -> None:
        if self._fd >= 0:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o600)
        try:
            self._spool = os.open(self.spool_path, flags, 0o600)
        except OSError:
            os.close(self._fd)
            self._fd = -1
            raise

    def _packets(self, block: int, count: int) -> Iterator[bytes]:
        """The block's spooled packets, read `SPOOL_READ_SYMBOLS` at a time."""
        size, first = self._packet, self._slots[block]
        for at in range(0, count, SPOOL_READ_SYMBOLS):
            step = min(SPOOL_READ_SYMBOLS, count - at)
            data = os.pread(self._spool, step * size, (first + at) * size)
            if len(data) != step * size:
                raise OSError("short read from the spool")
            for offset in range(0, len(data), size):
                yield data[offset : offset + size]

    def _finish_block(self, block: int, state: _Spooled) -> bool:
        """Write the block into the object file from its K or more symbols; whether it could
        (a decode may need one more symbol)."""
        offset, length = self.spans[block]
        size = self.symbol_size
        if state.source == state.k:  # every source symbol: their bytes are the block's
            for packet in self._packets(block, state.count):
                esi = int.from_bytes(packet[1:_PAYLOAD_ID], "big")
                if esi < state.k:
                    start = esi * size
                    piece = packet[_PAYLOAD_ID : _PAYLOAD_ID + min(size, length - start)]
                    os.pwrite(self._fd, piece, offset + start)
            return True
        self.decodes += 1
        try:
            data = decode_chunk(length, size, self._packets(block, state.count))
            if data is None:
                return False
            if os.pwrite(self._fd, data, offset) != length:
                raise OSError("short write to the object file")
            return True
        finally:
            data = None
            return_free_memory()  # the codec's (module doc, Memory)

    def _digest(self) -> bytes:
        digest = hashlib.sha256()
        position = 0
        while position < self.length:
            data = os.pread(self._fd, min(HASH_READ_BYTES, self.length - position), position)
            if not data:
                raise OSError("the object file is shorter than its object")
            digest.update(data)
            position += len(data)
        return digest.digest()
