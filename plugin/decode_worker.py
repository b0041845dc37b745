"""RaptorQ decodes off the receive loop, in one worker process per download.

Why a process
-------------
With the symbol store nearly every chunk is decoded (a receiver gets all of a chunk's source
symbols first only if it joined at the start of the chunk's cycle): ~50 ms of CPU per 8 MiB
chunk in `raptorq`, which holds the GIL, so a thread does not help.  On the receive loop a
decode stops the reading; at 110 MB/s the socket buffer then overflows and the lost datagrams
cost another visit of their chunks.  A worker process decodes on another core while the loop
keeps reading.

What the loop does per decode
-----------------------------
A chunk whose store decoder reaches K symbols without all its sources while the worker has
room (`has_room`: one of its `MAX_DECODES_IN_FLIGHT` result slots is free, so it decodes the
chunk next, at the latest once the one it may be decoding is done) is *submitted*
(`otacast.plugin.store_decoder`; while both slots are taken, the chunk is decoded on the loop
instead, so that both decode at once, or it waits in the loop's queue, lowest chunk first, for
the loop's turn or a free slot), and its plan is sent at once: the core refuses its
further symbols from then on (``decode-pending``; the lesson of an earlier attempt, backed out,
which kept storing them while the decode waited: 1.77-1.95 x K received at 5-20% loss).  The
worker is sent a `DecodePlan` (where the chunk's symbols are: a few runs of source ESIs,
the repair ESIs and their spill slots; a few hundred bytes to ~55 KB), which the store makes
after writing its gathered runs.  The worker opens ``image.part`` and the spill read-only,
reads the chunk's symbols itself, decodes, and writes the chunk's bytes into a shared-memory
file (a ``memfd``, one per decode in flight); its answer on the pipe is 13 bytes.  The loop
reads the bytes back with one ``pread``, frees the memory (truncates the memfd) and hands them
to the core (`ReceiverCore.chunk_decoded`), which hashes them as an inline decode's: nothing
the worker returns is trusted more than the codec is inline.

The store's rules hold (`otacast.plugin.symbol_store`, `DecodePlan`): what a plan names stays
in place while the chunk's symbols are held; a chunk completed (HTTP repair, local reuse) or
discarded while its decode is in flight gets a new submission number or none, and the result of
the old one is dropped unread (`otacast.plugin.store_decoder.StoredSymbols`), so a stale result
is never written.

The process
-----------
``python -m otacast.plugin.decode_worker PART SPILL FD...`` (this module and `decoder`, no CLI,
no ``otacast.schemas``: ~30 ms of start-up), started when the store opens, before the first
decode, with no descriptor of the receiver besides the memfds (not its socket, not its state
files open for writing).  Requests go over its stdin (non-blocking on the loop's side, so a
busy worker never stalls the loop; what does not fit waits in a buffer for the next turn),
answers over its stdout; its stderr is discarded.  It exits when its stdin closes (the receiver
ended, however: a ``kill -9`` of the receiver closes the pipe too).  If it dies, or cannot read
the symbols, `failed` says why (the driver prints it once) and the decodes it held are handed
back to be done on the loop, as every later one is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
import sys
from array import array
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .decoder import DecoderFault, decode_chunk

if TYPE_CHECKING or __name__ != "__main__":  # (the worker process needs none of it)
    from .report import peak_rss_mb

if TYPE_CHECKING:
    from pathlib import Path

    from .symbol_store import DecodePlan

# Request: token, result slot, chunk offset, length, K, symbol size, source runs, repair
# symbols; then the runs (first, end pairs), the repair ESIs and their slots, as u32 arrays.
_REQUEST = struct.Struct("=IIQIIIII")
# Answer: token, result slot, status, length of the chunk's bytes in the slot's memfd.
_ANSWER = struct.Struct("=IIBI")
_NOT_DECODED, _DECODED, _FAULT, _UNREADABLE = range(4)
_PAYLOAD_ID = struct.Struct(">I")  # SBN 0 and the ESI, as the store's
# Symbols read with one pread: 256 KiB at 1208-byte symbols (the store's RUN_BYTES).
_READ_SYMBOLS = 216
# The request pipe's size asked for (Linux allows 1 MiB unprivileged): every request in flight
# fits at once, so the loop's non-blocking writes complete in the turn they are made.
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


# --- The worker process -----------------------------------------------------------------------


def _read_exact(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        part = os.read(fd, left)
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _pread(fd: int, size: int, position: int) -> bytes:
    data = os.pread(fd, size, position)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes")
    return data


def _packets(
    part: int,
    spill: int,
    plan: tuple[int, int, int, int],
    runs: array[int],
    repair_esi: array[int],
    repair_slot: array[int],
) -> Iterator[bytes]:
    """The chunk's codec packets, read from the files: sources in runs, repair symbols in
    runs of consecutive slots, up to `_READ_SYMBOLS` per read (as `SymbolStore.iter_symbols`)."""
    offset, length, _, size = plan
    pack, join = _PAYLOAD_ID.pack, b"".join
    for at in range(0, len(runs), 2):
        first, end = runs[at], runs[at + 1]
        for start in range(first, end, _READ_SYMBOLS):
            stop = min(end, start + _READ_SYMBOLS)
            begin = start * size
            block = memoryview(_pread(part, min(stop * size, length) - begin, offset + begin))
            for esi in range(start, stop):
                piece = block[(esi - start) * size : (esi - start + 1) * size]
                if len(piece) < size:  # the chunk's short last symbol: padded with zeros
                    yield pack(esi) + bytes(piece).ljust(size, b"\0")
                else:
                    yield join((pack(esi), piece))
    held = sorted(zip(repair_slot, repair_esi, strict=True))
    at = 0
    while at < len(held):
        end = at + 1
        while end < len(held) and end - at < _READ_SYMBOLS and held[end][0] == held[end - 1][0] + 1:
            end += 1
        first = held[at][0]
        block = memoryview(_pread(spill, (end - at) * size, first * size))
        for slot, esi in held[at:end]:
            where = (slot - first) * size
            yield join((pack(esi), block[where : where + size]))
        at = end


def _decode(part: int, spill: int, request: bytes, body: bytes) -> tuple[int, bytes | None]:
    _, _, offset, length, k, size, n_runs, n_repair = _REQUEST.unpack(request)
    numbers = array("I")
    numbers.frombytes(body)
    runs = numbers[: 2 * n_runs]
    repair_esi = numbers[2 * n_runs : 2 * n_runs + n_repair]
    repair_slot = numbers[2 * n_runs + n_repair :]
    try:
        data = decode_chunk(
            length,
            size,
            _packets(part, spill, (offset, length, k, size), runs, repair_esi, repair_slot),
        )
    except DecoderFault:
        return _FAULT, None
    except OSError:
        return _UNREADABLE, None
    return (_NOT_DECODED, None) if data is None else (_DECODED, data)


def serve(part_path: str, spill_path: str, results: list[int]) -> None:
    """The worker: answer each request on stdin, until it closes."""
    part = os.open(part_path, os.O_RDONLY)
    spill = os.open(spill_path, os.O_RDONLY)
    requests, answers = sys.stdin.fileno(), sys.stdout.fileno()
    while (request := _read_exact(requests, _REQUEST.size)) is not None:
        token, slot, *_, n_runs, n_repair = _REQUEST.unpack(request)
        body = _read_exact(requests, 4 * (2 * n_runs + 2 * n_repair))
        if body is None:
            return
        status, data = _decode(part, spill, request, body)
        length = 0
        if data is not None:
            view = memoryview(data)
            while view:
                view = view[os.pwrite(results[slot], view, len(data) - len(view)) :]
            length = len(data)
            del view, data
        os.write(answers, _ANSWER.pack(token, slot, status, length))


def main() -> None:
    # The receiver sees the pipe close and says so once (no traceback here).
    with contextlib.suppress(OSError, KeyboardInterrupt):
        serve(sys.argv[1], sys.argv[2], [int(fd) for fd in sys.argv[3:]])


# --- The receiver's side ------------------------------------------------------------------------


class DecodeWorker:
    """One worker process and the decodes waiting for it or in it (module doc)."""

    def __init__(self, part: Path, spill: Path, slot_bytes: int, in_flight: int) -> None:
        self._slot_bytes = slot_bytes
        self._results: list[int] = []
        self._free = list(range(in_flight))
        try:
            for _ in range(in_flight):  # (one by one: those made are closed if one fails)
                self._results.append(os.memfd_create("otacast-decode", 0))
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "otacast.plugin.decode_worker", str(part), str(spill)]
                + [str(fd) for fd in self._results],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=self._results,
            )
        except BaseException:
            self._close_results()
            raise
        assert self._process.stdin is not None and self._process.stdout is not None
        self._requests = self._process.stdin.fileno()
        self._answers = self._process.stdout.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._requests, _F_SETPIPE_SZ, _PIPE_BYTES)
        os.set_blocking(self._requests, False)
        os.set_blocking(self._answers, False)
        self._flight: dict[int, tuple[int, int]] = {}  # token -> (chunk, slot)
        self._out = bytearray()  # request bytes the pipe did not take yet
        self._in = bytearray()  # answer bytes not yet a whole answer
        self.failed: str | None = None  # why it is no longer used (said once by the driver)
        self.decodes = 0  # decodes answered

    @property
    def pid(self) -> int | None:
        """The worker process's id while it runs."""
        return None if self._process is None else self._process.pid

    def fileno(self) -> int:
        """The answers' pipe, for the loop's ``select``."""
        return self._answers

    def has_room(self) -> bool:
        """Whether a result slot is free: a decode `submit`-ted now is sent at once, and the
        worker takes it as soon as it is done with the one it may be decoding.  False once it
        is gone."""
        return self.failed is None and bool(self._free)

    def submit(self, chunk: int, token: int, plan: DecodePlan) -> None:
        """Send the worker `chunk`'s decode (`has_room` must hold); `token` names this
        submission.  What the pipe does not take now, `pump` sends later."""
        slot = self._free.pop()
        runs = array("I", [n for run in plan.source_runs for n in run])
        self._out += _REQUEST.pack(
            token,
            slot,
            plan.offset,
            plan.length,
            plan.k,
            plan.symbol_size,
            len(plan.source_runs),
            len(plan.repair_esi),
        )
        self._out += runs.tobytes()
        self._out += plan.repair_esi.tobytes()
        self._out += plan.repair_slot.tobytes()
        self._flight[token] = (chunk, slot)
        self._send()

    def pump(self) -> None:
        """Send what the pipe did not take yet (every turn of the loop)."""
        self._send()

    def _send(self) -> None:
        while self._out and self.failed is None:
            try:
                sent = os.write(self._requests, self._out)
            except BlockingIOError:
                return
            except OSError:
                self._fail()
                return
            del self._out[:sent]

    def results(
        self, current: Callable[[int, int], bool]
    ) -> Iterator[tuple[int, int, bytes | None, bool]]:
        """Each decode answered since the last call whose submission is still `current`:
        (chunk, token, its bytes or None, whether the codec failed).  Each chunk's bytes are
        read (and their memory freed) only when the iteration reaches it, so the caller holds
        one chunk at a time; those of a submission no longer current are freed unread."""
        if self.failed is not None:
            return
        try:
            while got := os.read(self._answers, 4096):
                self._in += got
            self._fail()  # end of file: the worker is gone (answers read so far still count)
        except BlockingIOError:
            pass
        except OSError:
            self._fail()
        while len(self._in) >= _ANSWER.size:
            token, slot, status, length = _ANSWER.unpack_from(self._in)
            del self._in[: _ANSWER.size]
            chunk, expected = self._flight.pop(token, (-1, -1))
            if slot != expected:
                self._fail()
                return
            if status == _UNREADABLE:
                self._flight[token] = (chunk, slot)  # handed back with the others
                self._fail("it cannot read the stored symbols")
                return
            self.decodes += 1
            if not current(chunk, token):
                with contextlib.suppress(OSError):
                    os.ftruncate(self._results[slot], 0)
                self._free.append(slot)
                continue
            data = None
            if status == _DECODED:
                data = self._take(slot, length)
                if data is None:
                    self._flight[token] = (chunk, slot)
                    return
            self._free.append(slot)
            yield chunk, token, data, status == _FAULT

    def _take(self, slot: int, length: int) -> bytes | None:
        """The chunk's bytes from `slot`'s memfd, which is then emptied."""
        fd = self._results[slot]
        try:
            data = os.pread(fd, length, 0) if 0 < length <= self._slot_bytes else b""
            os.ftruncate(fd, 0)
        except OSError:
            data = b""
        if len(data) != length or not length:
            self._fail("its answer could not be read")
            return None
        return data

    def abandoned(self) -> list[tuple[int, int]]:
        """Once `failed`: the (chunk, token) submissions it will not answer, once."""
        if self.failed is None:
            return []
        chunks = [(chunk, token) for token, (chunk, _) in self._flight.items()]
        self._flight.clear()
        return chunks

    def _fail(self, why: str | None = None) -> None:
        if self.failed is not None:
            return
        process = self._process
        code = process.poll() if process is not None else None
        if why is None:
            why = "it ended" if code is None else f"it ended (exit status {code})"
        self.failed = why
        self._stop()

    def peak_rss_mb(self) -> float | None:
        """The worker's peak resident memory (VmHWM), in MB, while it runs."""
        return None if self.pid is None else peak_rss_mb(self.pid)

    def close(self) -> None:
        """End the worker and free its shared memory."""
        self._stop()
        self._close_results()

    def _stop(self) -> None:
        """End the process (its stdin closed; killed if it does not exit within a second)."""
        process, self._process = self._process, None
        if process is not None:
            for stream in (process.stdin, process.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _close_results(self) -> None:
        for fd in self._results:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._results = []


if __name__ == "__main__":
    main()
