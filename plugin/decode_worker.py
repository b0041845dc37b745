"""RaptorQ decodes off the receive loop, in a worker process.

Why a process
-------------
With the symbol store, a chunk that holds K symbols but not all of its source symbols is
decoded from the stored codec packets.  With the carousel's order every chunk of the image
completes within a round or so of the others, so these decodes come together at the end of a
pass: ~8 ms of CPU per MiB fed one packet at a time through `raptorq`, which holds the GIL.  On
the receive loop they stop the reading, the socket buffer overflows, and the lost datagrams
cost another round.  A worker process decodes on another core while the loop keeps reading.

How it is used
--------------
`otacast.plugin.store_decoder.StoreDecoder` asks `DecodeWorker.ready` before it reads a chunk's
symbols for a decode; if a slot is free it `submit`s them and returns no data yet; the driver
calls `results` every turn of its loop and hands each decoded chunk to the core
(`ReceiverCore.decoded`), which hashes it exactly as an inline decode's result (nothing the
worker returns is trusted).  A decode that yields nothing (not enough independent symbols, or
a worker that died) lets the store decoder try again with more.  At most `MAX_IN_FLIGHT`
decodes are queued or running: each holds one chunk's symbols (8.5 MB at the default 8 MiB
chunk), so memory stays bounded whatever the image.

The worker is ``python -m otacast.plugin.decode_worker``, started on first use, with no file
descriptor of the receiver (not its socket, not its state files).  Requests and answers are
length-prefixed frames on its stdin and stdout; a writer thread and a reader thread move them,
so the loop never blocks on the pipe while the worker is busy.
"""

from __future__ import annotations

import contextlib
import queue
import struct
import subprocess
import sys
import threading
from typing import IO

from .decoder import DecoderFault, RaptorQDecoder

# Decodes queued or running at once: two keep the worker busy (one runs while the next one's
# symbols travel to it) and hold at most two chunks' symbols in memory.
MAX_IN_FLIGHT = 2

# Request: chunk, chunk length, symbol size, packet count, packet size; then the packets.
_REQUEST = struct.Struct(">IIIII")
# Answer: chunk, decoded (1) or not (0), data length; then the data.
_ANSWER = struct.Struct(">IBI")


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The worker: decode each request, answer it, until stdin closes."""
    while (header := _read_exact(requests, _REQUEST.size)) is not None:
        chunk, length, symbol_size, count, size = _REQUEST.unpack(header)
        body = _read_exact(requests, count * size)
        if body is None:
            return
        data = None
        decoder = RaptorQDecoder(length, symbol_size)
        with contextlib.suppress(DecoderFault):
            for offset in range(0, len(body), size):
                data = decoder.feed(body[offset : offset + size])
                if data is not None:
                    break
        answers.write(_ANSWER.pack(chunk, data is not None, len(data or b"")) + (data or b""))
        answers.flush()


class DecodeWorker:
    """One worker process and the decodes in flight in it (see the module doc)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._flight: set[int] = set()
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        self._answers: queue.Queue[tuple[int, bytes | None]] = queue.Queue()

    def ready(self) -> bool:
        """May a decode be submitted now?"""
        return len(self._flight) < MAX_IN_FLIGHT

    def busy_with(self, chunk: int) -> bool:
        return chunk in self._flight

    def submit(self, chunk: int, length: int, symbol_size: int, packets: list[bytes]) -> None:
        if self._process is None:
            self._start()
        size = len(packets[0]) if packets else 0
        header = _REQUEST.pack(chunk, length, symbol_size, len(packets), size)
        self._flight.add(chunk)
        self._requests.put(header + b"".join(packets))

    def results(self) -> list[tuple[int, bytes | None]]:
        """The decodes that finished since the last call: (chunk, its bytes or None)."""
        out: list[tuple[int, bytes | None]] = []
        while True:
            try:
                chunk, data = self._answers.get_nowait()
            except queue.Empty:
                return out
            self._flight.discard(chunk)
            out.append((chunk, data))

    def close(self) -> None:
        """Stop the worker; decodes still in flight are dropped (their symbols stay stored)."""
        self._flight.clear()
        process, self._process = self._process, None
        if process is not None:
            self._requests.put(None)
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _start(self) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "otacast.plugin.decode_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._process = process
        threading.Thread(target=self._write, args=(process,), daemon=True).start()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _write(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            while (request := self._requests.get()) is not None:
                process.stdin.write(request)
                process.stdin.flush()
        with contextlib.suppress(OSError):
            process.stdin.close()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        while (header := _read_exact(process.stdout, _ANSWER.size)) is not None:
            chunk, decoded, length = _ANSWER.unpack(header)
            data = _read_exact(process.stdout, length) if length else b""
            if data is None:
                break
            self._answers.put((chunk, data if decoded else None))
        # The worker died: every decode in flight comes back empty, to be tried again.
        for chunk in list(self._flight):
            self._answers.put((chunk, None))


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
