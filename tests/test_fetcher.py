"""`HttpFetcher` against a real HTTP server on 127.0.0.1 that misbehaves on request.

The server is `http.server.ThreadingHTTPServer` with a handler that picks its behaviour from the
first path segment (``/good/...``, ``/status-500/...``, ``/drip/...``): serve the range right,
fail, send too little or too much, send wrong bytes, ignore Range, drip, stall, or never end.
Every long-running behaviour stops when the client goes away or the test ends, and an endless
body stops at `ENDLESS_CAP` at the latest, so a fetcher that failed to cut it off shows up as a
server that wrote the whole cap.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import random
import re
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest
import requests

from otacast.plugin import receive
from otacast.plugin.errors import FetchError
from otacast.plugin.fetcher import (
    MAX_BACKOFF,
    HttpFetcher,
    RangedChunk,
    RepairWorker,
    plan_ranges,
)
from otacast.plugin.receive import FetchOptions
from otacast.plugin.report import FetchSummary
from otacast.plugin.reuse import Source
from otacast.plugin.verify import verify_manifest
from otacast.schemas.blockindex import IndexBuilder
from otacast.schemas.policy import TrustSet, VerifiedManifest
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import manifest_for

CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
IMAGE = random.Random(1).randbytes(4 * CHUNK - 1000)
MANIFEST = manifest_for(IMAGE, chunk_size=CHUNK)

# Bounds on the server's misbehaviour, so a fetcher bug makes a test fail rather than hang.
ENDLESS_CAP = 256 * 1024 * 1024  # an endless body stops here at the latest
DRIP_INTERVAL = 0.01  # one byte this often: never idle long enough to trip a read timeout
STALL = 10.0  # a stalling server gives up after this long (or when the test ends)
HEADER_DRIP_BYTES = 2000  # a header-dripping server hangs up after this many bytes (20 s)
GARBAGE = b"\xa5" * 16384


def chunk(index: int) -> tuple[int, int, int, bytes]:
    """``fetch_chunk`` arguments for a chunk of IMAGE, from the signed manifest."""
    offset, length = MANIFEST.chunk_span(index)
    return index, offset, length, MANIFEST.chunks.sha256[index]


def image_bytes(index: int) -> bytes:
    offset, length = MANIFEST.chunk_span(index)
    return IMAGE[offset : offset + length]


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like a real server

    def log_message(self, format: str, *args: object) -> None:
        pass


class Mirror(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image: bytes) -> None:
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.image = image
        self.stopping = threading.Event()
        self.hits: Counter[str] = Counter()
        self.ranges: list[str | None] = []  # every request's Range header, in order
        self.written: Counter[str] = Counter()  # body bytes the server managed to send
        self._finished: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self._lock = threading.Lock()

    def url(self, behaviour: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{behaviour}/rootfs.img"

    def finished(self, behaviour: str) -> threading.Event:
        with self._lock:
            return self._finished[behaviour]

    def record_hit(self, behaviour: str) -> None:
        with self._lock:
            self.hits[behaviour] += 1

    def record_body(self, behaviour: str, sent: int) -> None:
        with self._lock:
            self.written[behaviour] += sent
            self._finished[behaviour].set()


class MirrorHandler(QuietHandler):
    @property
    def mirror(self) -> Mirror:
        return cast(Mirror, self.server)

    def do_GET(self) -> None:
        behaviour = self.path.strip("/").split("/")[0]
        self.mirror.record_hit(behaviour)
        self.mirror.ranges.append(self.headers.get("Range"))
        BEHAVIOURS[behaviour](self)

    # --- Building blocks ----------------------------------------------------------------------

    def span(self) -> tuple[int, int] | None:
        header = self.headers.get("Range")
        if header is None:
            return None
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", header)
        assert match is not None, header  # the fetcher only asks single closed ranges
        return int(match[1]), min(int(match[2]), len(self.mirror.image) - 1)

    def head(
        self,
        status: int | None = None,
        *,
        length: int | None = None,
        content_range: str | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        """Send a status line and headers for the asked range; return that range's bytes."""
        span = self.span()
        status = status or (206 if span else 200)
        first, last = span or (0, len(self.mirror.image) - 1)
        body = self.mirror.image[first : last + 1]
        self.send_response(status)
        if status == 206:
            total = len(self.mirror.image)
            self.send_header("Content-Range", content_range or f"bytes {first}-{last}/{total}")
        if length != -1:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        return body

    def send_body(self, behaviour: str, pieces: Iterator[bytes], *, chunked: bool) -> None:
        """Write until the pieces end, the client goes away, or the test ends."""
        sent = 0
        try:
            for piece in pieces:
                if self.mirror.stopping.is_set():
                    break
                self.wfile.write(
                    f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
                )
                sent += len(piece)
        except OSError:
            pass  # the client closed the connection: exactly what a cut-off looks like
        finally:
            self.close_connection = True
            self.mirror.record_body(behaviour, sent)

    # --- Behaviours ---------------------------------------------------------------------------

    def good(self) -> None:
        self.wfile.write(self.head())

    def status_500(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def not_found(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def short(self) -> None:
        body = self.head()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True  # ends the body early: fewer bytes than declared

    def short_declared(self) -> None:
        body = self.head(length=CHUNK // 2)
        self.wfile.write(body[: CHUNK // 2])

    def long_declared(self) -> None:
        body = self.head(length=CHUNK + 100)
        self.wfile.write(body + GARBAGE[:100])

    def wrong(self) -> None:
        body = bytearray(self.head())
        body[len(body) // 3] ^= 0x01
        self.wfile.write(bytes(body))

    def whole(self) -> None:
        # Ignores Range, like a server without range support.
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.mirror.image)))
        self.end_headers()
        self.wfile.write(self.mirror.image)

    def bad_range(self) -> None:
        first, last = self.span() or (0, 0)
        body = self.head(content_range=f"bytes {first + 1}-{last + 1}/{len(self.mirror.image)}")
        self.wfile.write(body)

    def gzip(self) -> None:
        body = gzip.compress(self.head(length=-1, extra=(("Content-Encoding", "gzip"),)))
        self.wfile.write(body)
        self.close_connection = True

    def close(self) -> None:
        self.close_connection = True  # hang up without a response

    def stall_headers(self) -> None:
        self.mirror.stopping.wait(STALL)
        self.close_connection = True

    def stall_body(self) -> None:
        self.head()
        self.mirror.stopping.wait(STALL)
        self.close_connection = True

    def drip(self) -> None:
        body = self.head()

        def one_byte_at_a_time() -> Iterator[bytes]:
            for i in range(len(body)):
                if self.mirror.stopping.wait(DRIP_INTERVAL):
                    return
                yield body[i : i + 1]

        self.send_body("drip", one_byte_at_a_time(), chunked=False)

    def drip_headers(self) -> None:
        # The status line and then a header line that never ends, a byte at a time: every read
        # http.client makes of the headers gets a byte, so no read timeout ever fires.
        head = b"HTTP/1.1 206 Partial Content\r\nX-Drip: "
        pieces = (head[i : i + 1] if i < len(head) else b"a" for i in range(HEADER_DRIP_BYTES))

        def one_byte_at_a_time() -> Iterator[bytes]:
            for piece in pieces:
                if self.mirror.stopping.wait(DRIP_INTERVAL):
                    return
                yield piece

        self.send_body("drip-headers", one_byte_at_a_time(), chunked=False)

    def endless_chunked(self) -> None:
        self.head(length=-1, extra=(("Transfer-Encoding", "chunked"),))
        self.send_body("endless-chunked", _endless(b""), chunked=True)

    def endless_right_prefix(self) -> None:
        body = self.head(length=-1, extra=(("Transfer-Encoding", "chunked"),))
        self.send_body("endless-right-prefix", _endless(body), chunked=True)

    def endless_length(self) -> None:
        self.head(length=1 << 40)
        self.send_body("endless-length", _endless(b""), chunked=False)


def _endless(prefix: bytes) -> Iterator[bytes]:
    sent = 0
    if prefix:
        yield prefix
        sent += len(prefix)
    while sent < ENDLESS_CAP:
        yield GARBAGE
        sent += len(GARBAGE)


BEHAVIOURS: dict[str, Callable[[MirrorHandler], None]] = {
    "good": MirrorHandler.good,
    "status-500": MirrorHandler.status_500,
    "not-found": MirrorHandler.not_found,
    "short": MirrorHandler.short,
    "short-declared": MirrorHandler.short_declared,
    "long-declared": MirrorHandler.long_declared,
    "wrong": MirrorHandler.wrong,
    "whole": MirrorHandler.whole,
    "bad-range": MirrorHandler.bad_range,
    "gzip": MirrorHandler.gzip,
    "close": MirrorHandler.close,
    "stall-headers": MirrorHandler.stall_headers,
    "stall-body": MirrorHandler.stall_body,
    "drip": MirrorHandler.drip,
    "drip-headers": MirrorHandler.drip_headers,
    "endless-chunked": MirrorHandler.endless_chunked,
    "endless-right-prefix": MirrorHandler.endless_right_prefix,
    "endless-length": MirrorHandler.endless_length,
}


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """Run `server` in a thread; yield its base URL."""
    # A short poll interval: shutdown() waits up to one interval, at every test's teardown.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    server = Mirror(IMAGE)
    with serving(server):
        try:
            yield server
        finally:
            server.stopping.set()  # wakes stalling and dripping handlers


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_fetcher(sleeps: list[float]) -> Iterator[Callable[..., HttpFetcher]]:
    sessions: list[requests.Session] = []

    def make(urls: list[str], **kwargs: object) -> HttpFetcher:
        session = requests.Session()
        session.trust_env = False  # a proxy from the environment must not see loopback tests
        sessions.append(session)
        return HttpFetcher(urls, session=session, sleep=sleeps.append, **kwargs)  # type: ignore[arg-type]

    yield make
    for session in sessions:
        session.close()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/rootfs.img"


# --- A good mirror -------------------------------------------------------------------------------


def test_a_correct_mirror_yields_the_verified_chunk_with_one_ranged_request(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([mirror.url("good")])
    for index in range(MANIFEST.chunk_count):  # the last chunk is short
        assert fetcher.fetch_chunk(*chunk(index)) == image_bytes(index)
    assert fetcher.stats.requests == Counter({mirror.url("good"): MANIFEST.chunk_count})
    assert fetcher.stats.bytes_received == Counter({mirror.url("good"): len(IMAGE)})
    assert not fetcher.stats.failures
    assert mirror.hits == Counter(good=MANIFEST.chunk_count)


def test_the_request_asks_for_identity_encoding_and_exactly_the_chunk_range(
    make_fetcher: Callable[..., HttpFetcher],
) -> None:
    seen: list[tuple[str | None, str | None]] = []

    class Recorder(QuietHandler):
        def do_GET(self) -> None:
            seen.append((self.headers.get("Range"), self.headers.get("Accept-Encoding")))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Recorder)) as base:
        fetcher = make_fetcher([f"{base}/rootfs.img"], attempts=1)
        with pytest.raises(FetchError):
            fetcher.fetch_chunk(*chunk(1))
    assert seen == [(f"bytes={CHUNK}-{2 * CHUNK - 1}", "identity")]


def test_a_server_ignoring_range_is_accepted_only_when_the_range_is_the_whole_file(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([mirror.url("whole")])
    whole = (0, 0, len(IMAGE), hashlib.sha256(IMAGE).digest())
    assert fetcher.fetch_chunk(*whole) == IMAGE

    fetcher = make_fetcher([mirror.url("whole"), mirror.url("good")])
    assert fetcher.fetch_chunk(*chunk(0)) == image_bytes(0)  # offset 0, but not the whole file
    assert fetcher.fetch_chunk(*chunk(2)) == image_bytes(2)
    assert fetcher.stats.failures == Counter({"ignored-range": 2})
    # The 200's body was refused before it was read.
    assert fetcher.stats.bytes_received[mirror.url("whole")] == 0


# --- Each bad behaviour is left for the next mirror ---------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("status-500", "status-500"),
        ("not-found", "status-404"),
        ("short", "short-body"),
        ("short-declared", "short-body"),
        ("long-declared", "long-body"),
        ("wrong", "hash-mismatch"),
        ("bad-range", "content-range"),
        ("gzip", "content-encoding"),
        ("close", "connection"),
        ("endless-chunked", "hash-mismatch"),
        ("endless-length", "long-body"),
    ],
)
def test_each_bad_mirror_is_left_for_the_next_which_delivers_the_right_bytes(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher], behaviour: str, reason: str
) -> None:
    bad, good = mirror.url(behaviour), mirror.url("good")
    fetcher = make_fetcher([bad, good])
    assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
    assert fetcher.stats.failures == Counter({reason: 1})
    assert fetcher.stats.requests == Counter({bad: 1, good: 1})
    assert fetcher.stats.bytes_received[bad] <= CHUNK
    assert mirror.hits[behaviour] == 1 and mirror.hits["good"] == 1


def test_a_refused_connection_is_left_for_the_next_mirror(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([closed_port_url(), mirror.url("good")])
    assert fetcher.fetch_chunk(*chunk(3)) == image_bytes(3)
    assert fetcher.stats.failures == Counter({"connection": 1})


@pytest.mark.parametrize("behaviour", ["stall-headers", "stall-body"])
def test_an_idle_mirror_is_left_after_the_read_timeout(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher], behaviour: str
) -> None:
    fetcher = make_fetcher([mirror.url(behaviour), mirror.url("good")], timeout=0.3)
    assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
    assert fetcher.stats.failures == Counter({"timeout": 1})


# --- Bounded cost --------------------------------------------------------------------------------


def test_an_endless_body_is_cut_at_the_chunk_length(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    bad = mirror.url("endless-chunked")
    fetcher = make_fetcher([bad, mirror.url("good")])
    _, _, length, _ = chunk(1)
    assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
    # The fetcher took exactly the signed length from the stream, then hung up ...
    assert fetcher.stats.bytes_received[bad] == length
    assert fetcher.stats.failures == Counter({"hash-mismatch": 1})
    # ... which stopped the server long before the test's own bound did.
    assert mirror.finished("endless-chunked").wait(10)
    assert mirror.written["endless-chunked"] < ENDLESS_CAP // 4


def test_an_endless_body_starting_with_the_right_bytes_yields_them_and_nothing_more(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    # Bytes past the signed length are never read: once the first `length` verify, what the
    # server would have sent next cannot change the result.
    url = mirror.url("endless-right-prefix")
    fetcher = make_fetcher([url])
    _, _, length, _ = chunk(2)
    assert fetcher.fetch_chunk(*chunk(2)) == image_bytes(2)
    assert fetcher.stats.bytes_received[url] == length
    assert mirror.finished("endless-right-prefix").wait(10)
    assert mirror.written["endless-right-prefix"] < ENDLESS_CAP // 4


def test_a_slow_drip_is_abandoned_at_the_deadline_though_never_idle(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    # One byte every 10 ms never trips the 0.5 s read timeout; the deadline of
    # 0.5 s + 64 KiB / 256 KiB/s = 0.75 s is what ends it (the whole drip would take 11 minutes).
    drip = mirror.url("drip")
    fetcher = make_fetcher([drip, mirror.url("good")], timeout=0.5, min_rate=256 * 1024)
    assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
    assert fetcher.stats.failures == Counter({"too-slow": 1})
    assert 0 < fetcher.stats.bytes_received[drip] < CHUNK // 10
    assert mirror.finished("drip").wait(10)


def test_a_mirror_dripping_its_headers_is_abandoned_at_the_overall_deadline(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    # Headers are read by http.client before the fetcher gets control, a byte per 10 ms never
    # trips the 0.5 s read timeout, and the header line never ends: only a deadline enforced
    # from outside the read (0.75 s here) moves the request to the next mirror.  Without it the
    # request lasts until the server gives up (20 s) and fails as a dropped connection.
    drip = mirror.url("drip-headers")
    fetcher = make_fetcher([drip, mirror.url("good")], timeout=0.5, min_rate=256 * 1024)
    assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
    assert fetcher.stats.failures == Counter({"too-slow": 1})
    assert fetcher.stats.bytes_received[drip] == 0
    # The device hung up: the server stopped long before sending all it would have.
    assert mirror.finished("drip-headers").wait(10)
    assert mirror.written["drip-headers"] < HEADER_DRIP_BYTES // 2


def test_a_manifest_whose_headers_drip_is_abandoned_at_the_overall_deadline(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([], attempts=1, timeout=0.5, min_rate=256 * 1024)
    with pytest.raises(FetchError, match=r"too-slow \(no complete headers by the deadline\)"):
        fetcher.fetch_manifest(mirror.url("drip-headers"), 1000)
    assert mirror.finished("drip-headers").wait(10)
    assert mirror.written["drip-headers"] < HEADER_DRIP_BYTES // 2


def test_the_deadline_reaches_a_kept_alive_connection_too(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    # The first request leaves its connection in the pool; the second reuses it (no new socket
    # is opened) and must still be cut at its deadline.
    class Reused(QuietHandler):
        served = 0

        def do_GET(self) -> None:
            Reused.served += 1
            if Reused.served == 1:
                offset, length = MANIFEST.chunk_span(1)
                self.send_response(206)
                last = offset + length - 1
                self.send_header("Content-Range", f"bytes {offset}-{last}/{len(IMAGE)}")
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(image_bytes(1))
                return
            for byte in b"HTTP/1.1 206 Partial Content\r\nX-Drip: " + b"a" * HEADER_DRIP_BYTES:
                if mirror.stopping.wait(DRIP_INTERVAL):
                    break
                try:
                    self.wfile.write(bytes([byte]))
                except OSError:
                    break
            self.close_connection = True

    connections: list[object] = []

    class Counting(ThreadingHTTPServer):
        def process_request(self, request: object, client_address: object) -> None:
            connections.append(client_address)
            super().process_request(request, client_address)  # type: ignore[arg-type]

    with serving(Counting(("127.0.0.1", 0), Reused)) as base:
        fetcher = make_fetcher(
            [f"{base}/rootfs.img", mirror.url("good")], timeout=0.5, min_rate=256 * 1024
        )
        assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
        assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
        assert len(connections) == 1  # the second request went over the kept-alive connection
        assert fetcher.stats.failures == Counter({"too-slow": 1})
        assert mirror.hits["good"] == 1


# --- All mirrors bad ------------------------------------------------------------------------------


def test_all_mirrors_bad_is_a_one_line_fetch_error_naming_the_chunk_and_each_reason(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher], sleeps: list[float]
) -> None:
    urls = [mirror.url("status-500"), mirror.url("wrong"), closed_port_url()]
    fetcher = make_fetcher(urls, attempts=3, backoff=0.5)
    with pytest.raises(FetchError) as caught:
        fetcher.fetch_chunk(*chunk(2))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"chunk 2 (bytes {2 * CHUNK}-{3 * CHUNK - 1}): ")
    assert f"{urls[0]}: status-500" in message
    assert f"{urls[1]}: hash-mismatch" in message
    assert f"{urls[2]}: connection (ConnectionRefusedError)" in message
    assert caught.value.exit_code == 43
    # Three rounds over three mirrors, with the backoff doubling between rounds.
    assert fetcher.stats.requests == Counter(dict.fromkeys(urls, 3))
    assert fetcher.stats.failures == Counter({"status-500": 3, "hash-mismatch": 3, "connection": 3})
    assert sleeps == [0.5, 1.0]


def test_backoff_doubles_between_rounds_up_to_its_cap(
    make_fetcher: Callable[..., HttpFetcher], sleeps: list[float]
) -> None:
    fetcher = make_fetcher([closed_port_url()], attempts=8, backoff=4.0)
    with pytest.raises(FetchError):
        fetcher.fetch_chunk(*chunk(0))
    assert sleeps == [4.0, 8.0, 16.0, 32.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    assert fetcher.stats.total_requests == 8


def test_a_mirror_recovering_in_a_later_round_delivers_the_chunk(
    make_fetcher: Callable[..., HttpFetcher], sleeps: list[float]
) -> None:
    answers = iter([500, 500, 206])

    class Flaky(QuietHandler):
        def do_GET(self) -> None:
            status = next(answers)
            offset, length = MANIFEST.chunk_span(1)
            body = image_bytes(1) if status == 206 else b""
            self.send_response(status)
            if status == 206:
                last = offset + length - 1
                self.send_header("Content-Range", f"bytes {offset}-{last}/{len(IMAGE)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Flaky)) as base:
        fetcher = make_fetcher([f"{base}/rootfs.img"], backoff=0.25)
        assert fetcher.fetch_chunk(*chunk(1)) == image_bytes(1)
    assert sleeps == [0.25, 0.5]
    assert fetcher.stats.failures == Counter({"status-500": 2})


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/rootfs.img",
        "not a url",
        "http://[::1/rootfs.img",
        "http://:0/rootfs.img",
        "http://127.0.0.1:99999/rootfs.img",
    ],
)
def test_no_requests_exception_escapes_for_an_unusable_url(
    make_fetcher: Callable[..., HttpFetcher], url: str
) -> None:
    fetcher = make_fetcher([url], attempts=2)
    with pytest.raises(FetchError, match=f"{re.escape(url)}: request-error"):
        fetcher.fetch_chunk(*chunk(0))
    assert fetcher.stats.failures == Counter({"request-error": 2})


def test_arguments_that_cannot_describe_a_chunk_are_refused(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([mirror.url("good")])
    with pytest.raises(ValueError, match="invalid span"):
        fetcher.fetch_chunk(0, 0, 0, bytes(32))
    with pytest.raises(ValueError, match="invalid span"):
        fetcher.fetch_chunk(0, 0, 10, b"short")
    assert mirror.hits == Counter()


def test_a_manifest_listing_no_mirrors_is_a_fetch_error_not_a_crash() -> None:
    with pytest.raises(
        FetchError, match=rf"^chunk 0 \(bytes 0-{CHUNK - 1}\): the manifest lists no mirrors"
    ):
        HttpFetcher([]).fetch_chunk(*chunk(0))


# --- Manifests ------------------------------------------------------------------------------------


def test_a_manifest_within_the_limit_is_returned_whole(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([])
    assert fetcher.fetch_manifest(mirror.url("good"), len(IMAGE)) == IMAGE


def test_a_manifest_declared_too_large_is_refused_unread(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([], attempts=1)
    url = mirror.url("good")
    with pytest.raises(FetchError, match="too-large"):
        fetcher.fetch_manifest(url, len(IMAGE) - 1)
    assert fetcher.stats.bytes_received[url] == 0


def test_an_endless_manifest_is_cut_one_byte_past_the_limit(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher]
) -> None:
    fetcher = make_fetcher([], attempts=1)
    url = mirror.url("endless-chunked")
    with pytest.raises(FetchError, match=r"too-large \(more than 100000 bytes\)"):
        fetcher.fetch_manifest(url, 100_000)
    assert fetcher.stats.bytes_received[url] == 100_001
    assert mirror.finished("endless-chunked").wait(10)
    assert mirror.written["endless-chunked"] < ENDLESS_CAP // 4


def test_a_manifest_url_failing_in_every_round_is_a_fetch_error(
    mirror: Mirror, make_fetcher: Callable[..., HttpFetcher], sleeps: list[float]
) -> None:
    fetcher = make_fetcher([])
    url = mirror.url("status-500")
    with pytest.raises(FetchError, match=rf"^manifest {re.escape(url)}: .*status-500"):
        fetcher.fetch_manifest(url, 1000)
    assert sleeps == [0.5, 1.0]


# --- The receive driver's repair worker ----------------------------------------------------------


def _verified_with_mirrors(urls: tuple[str, ...]) -> VerifiedManifest:
    key = SigningKey(b"\x0b" * 32)
    envelope = sign(dataclasses.replace(MANIFEST, http=urls), [key])
    trust = TrustSet.from_public_keys([key.public])
    return verify_manifest(
        envelope.compact_bytes,
        trust,
        now=1_800_000_000,
        device_type=None,
        installed_sequence=None,
        channel=None,
    )


def _drain_results(worker: RepairWorker) -> list[tuple[int, bytes]]:
    worker.join(60)
    assert not worker.is_alive()
    results = []
    while (item := worker.results.get_nowait()) is not None:
        results.append(item)
    assert worker.results.empty()  # None is the last thing the worker queues
    return results


def test_the_repair_worker_queues_the_missing_chunks_and_skips_those_done_elsewhere(
    mirror: Mirror,
) -> None:
    verified = _verified_with_mirrors((mirror.url("good"),))
    worker = RepairWorker(verified, [0, 1, 3], timeout=5.0)
    worker.done_elsewhere.add(1)  # multicast completed it before the worker came to it
    worker.start()
    assert _drain_results(worker) == [(0, image_bytes(0)), (3, image_bytes(3))]
    assert worker.failures == [] and mirror.hits == Counter(good=2)


def test_the_repair_worker_reports_a_chunk_no_mirror_delivered_and_goes_on(
    mirror: Mirror,
) -> None:
    verified = _verified_with_mirrors((mirror.url("status-500"),))
    worker = RepairWorker(verified, [2], timeout=5.0)
    worker.start()
    assert _drain_results(worker) == []
    assert len(worker.failures) == 1 and "status-500" in worker.failures[0]


# --- Partly held chunks: only the missing ranges -------------------------------------------------

T = 1208  # the symbol size of MANIFEST


def _next(worker: RepairWorker) -> object:
    return worker.results.get(timeout=30)


def test_the_repair_worker_fetches_only_the_planned_ranges_and_waits_for_the_loops_answer(
    mirror: Mirror,
) -> None:
    verified = _verified_with_mirrors((mirror.url("good"),))
    plan = ((0, T), (5 * T, 9 * T))
    worker = RepairWorker(verified, [0, 1], timeout=5.0, plans={1: plan})
    worker.start()
    assert _next(worker) == (0, image_bytes(0))  # nothing held: whole, verified
    ranged = _next(worker)
    assert isinstance(ranged, RangedChunk) and ranged.index == 1
    assert ranged.pieces == tuple((a, image_bytes(1)[a:b]) for a, b in plan)
    assert ranged.fetched == 5 * T
    worker.join(0.3)
    assert worker.is_alive()  # ends only once every ranged chunk is answered
    worker.verdict(1, True)
    assert _drain_results(worker) == []
    # One plain single range per request, none of them the whole chunk 1.
    assert mirror.ranges == [
        f"bytes=0-{CHUNK - 1}",
        f"bytes={CHUNK}-{CHUNK + T - 1}",
        f"bytes={CHUNK + 5 * T}-{CHUNK + 9 * T - 1}",
    ]
    assert worker.failures == [] and worker.refetched == []


def test_a_ranged_chunk_that_failed_its_hash_in_the_loop_is_fetched_whole_and_counted(
    mirror: Mirror,
) -> None:
    verified = _verified_with_mirrors((mirror.url("good"),))
    worker = RepairWorker(verified, [2], timeout=5.0, plans={2: ((T, 3 * T),)})
    worker.start()
    assert isinstance(_next(worker), RangedChunk)
    worker.verdict(2, False)
    assert _drain_results(worker) == [(2, image_bytes(2))]
    assert worker.refetched == [2]
    assert worker.fetcher.stats.failures == Counter({"held-mismatch": 1})


def test_a_stopped_repair_worker_does_not_wait_for_answers(mirror: Mirror) -> None:
    verified = _verified_with_mirrors((mirror.url("good"),))
    worker = RepairWorker(verified, [2], timeout=5.0, plans={2: ((0, T),)})
    worker.start()
    assert isinstance(_next(worker), RangedChunk)
    worker.stop.set()
    assert _drain_results(worker) == []


def test_a_range_no_mirror_delivers_is_the_chunks_failure(mirror: Mirror) -> None:
    verified = _verified_with_mirrors((mirror.url("status-500"),))
    worker = RepairWorker(verified, [1], timeout=5.0, plans={1: ((0, T),)})
    worker.fetcher._attempts = 1
    worker.start()
    assert _drain_results(worker) == []
    assert len(worker.failures) == 1 and "chunk 1 (bytes" in worker.failures[0]


# plan_ranges: held source symbols -> the byte ranges to fetch.

LENGTH = 20 * T - 500  # 20 symbols, the last 708 bytes


def test_nothing_held_is_the_whole_chunk_and_everything_held_is_nothing() -> None:
    assert plan_ranges(LENGTH, T, []) == ((0, LENGTH),)
    assert plan_ranges(LENGTH, T, [(0, 20)]) == ()
    assert plan_ranges(LENGTH, T, [(0, 7), (7, 20)]) == ()


def test_the_ranges_are_exactly_the_missing_symbols_bytes_the_last_one_cut_at_the_end() -> None:
    assert plan_ranges(LENGTH, T, [(0, 19)]) == ((19 * T, LENGTH),)
    assert plan_ranges(LENGTH, T, [(1, 20)]) == ((0, T),)
    assert plan_ranges(LENGTH, T, [(0, 4), (5, 20)], gap=0) == ((4 * T, 5 * T),)


def test_a_held_gap_shorter_than_the_threshold_is_fetched_and_one_as_long_splits() -> None:
    held = [(2, 5)]  # missing 0-1 and 5-19: a gap of 3 symbols between
    assert plan_ranges(LENGTH, T, held, gap=3 * T + 1) == ((0, LENGTH),)
    assert plan_ranges(LENGTH, T, held, gap=3 * T) == ((0, 2 * T), (5 * T, LENGTH))


def test_past_the_cap_the_shortest_gaps_are_fetched_first() -> None:
    # Missing 0, 3, 5, 10, 12: held gaps of 2, 1, 4 and 1 symbols between them.
    held = [(1, 3), (4, 5), (6, 10), (11, 12), (13, 20)]
    assert len(plan_ranges(LENGTH, T, held, gap=0)) == 5
    assert plan_ranges(LENGTH, T, held, gap=0, most=3) == (
        (0, T),
        (3 * T, 6 * T),
        (10 * T, 13 * T),
    )
    assert plan_ranges(LENGTH, T, held, gap=0, most=1) == ((0, 13 * T),)


def test_untidy_runs_are_clipped_and_merged_not_trusted() -> None:
    held = [(15, 99), (-3, 2), (4, 4), (1, 3), (9, 6), (2, 3)]
    assert plan_ranges(LENGTH, T, held, gap=0) == ((3 * T, 15 * T),)


def test_random_plans_cover_every_missing_byte_and_fetch_held_ones_only_in_short_gaps() -> None:
    rng = random.Random(21)
    for _ in range(300):
        k = rng.randrange(1, 200)
        length = k * T - rng.randrange(T)
        held_esis = {e for e in range(k) if rng.random() < rng.random()}
        missing_runs = sum(
            1 for e in range(k) if e not in held_esis and (e == 0 or e - 1 in held_esis)
        )
        most = rng.randrange(1, 12)
        ranges = plan_ranges(length, T, [(e, e + 1) for e in held_esis], gap=4 * T, most=most)
        assert len(ranges) <= most
        fetched = bytearray(length)
        for i, (start, end) in enumerate(ranges):
            assert 0 <= start < end <= length
            assert i + 1 == len(ranges) or end < ranges[i + 1][0]  # ordered, apart
            # Each range starts and ends with a missing symbol: held ones only between.
            assert start // T not in held_esis and (end - 1) // T not in held_esis
            fetched[start:end] = b"\1" * (end - start)
            if missing_runs <= most:  # no gap closed for the cap: only the short ones
                held_in = [e for e in range(start // T, (end - 1) // T + 1) if e in held_esis]
                runs = [e for e in held_in if e - 1 not in held_in]
                for first in runs:
                    last = first
                    while last + 1 in held_in:
                        last += 1
                    assert (last + 1 - first) * T < 4 * T
        for esi in range(k):
            span = fetched[esi * T : min((esi + 1) * T, length)]
            if esi not in held_esis:
                assert all(span), (k, esi)  # every missing byte is fetched
            else:
                assert all(span) or not any(span)  # whole symbols only
        assert (ranges == ()) == (len(held_esis) == k)


# The receive driver with only mirrors: a device holding v1 gets v2.

BLOCK = 4096
CHANGED = (3, 20, 40)  # blocks of v1 that v2 changes, one in each chunk, far apart


def _v1_v2() -> tuple[bytes, bytes]:
    rng = random.Random(15)
    v1 = bytearray(rng.randbytes(48 * BLOCK))
    v2 = bytearray(v1)
    for block in CHANGED:
        v2[block * BLOCK : (block + 1) * BLOCK] = rng.randbytes(BLOCK)
    return bytes(v1[:-1000]), bytes(v2[:-1000])  # (a short last chunk and last block)


def _mirrors_only(
    tmp_path: Path, v1: bytes, v2: bytes, behaviours: tuple[str, ...], index_of: bytes
) -> tuple[FetchSummary, list[str], Mirror]:
    """`fetch --fallback only` of v2 (signed, with CHUNK-byte chunks) from a mirror of each
    behaviour, the device holding v1 and given the block index of `index_of` as a file; the
    summary, the notes, and the mirror."""
    server = Mirror(v2)
    key = SigningKey(b"\x0c" * 32)
    trust = TrustSet.from_public_keys([key.public])
    (tmp_path / "v1.img").write_bytes(v1)
    builder = IndexBuilder()
    builder.update(index_of)
    (tmp_path / "v2.blockindex").write_bytes(builder.finish().build())
    out = io.StringIO()
    with serving(server):
        manifest = dataclasses.replace(
            manifest_for(v2, chunk_size=CHUNK), http=tuple(map(server.url, behaviours))
        )
        verified = verify_manifest(
            sign(manifest, [key]).compact_bytes,
            trust,
            now=1_800_000_000,
            device_type=None,
            installed_sequence=None,
            channel=None,
        )
        options = FetchOptions(
            trust=trust,
            out=tmp_path / "out.img",
            state_dir=tmp_path / "state",
            manifest=verified,
            fallback="only",
            json=True,
            http_timeout=5.0,
            reuse_sources=(Source(tmp_path / "v1.img", "test"),),
            block_index=tmp_path / "v2.blockindex",
        )
        try:
            summary = receive.fetch(options, out)
        finally:
            server.stopping.set()
    assert (tmp_path / "out.img").read_bytes() == v2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    notes = [str(e["message"]) for e in lines if e["event"] == "note"]
    return summary, notes, server


def test_a_device_holding_v1_fetches_only_the_missing_symbols_of_its_partly_held_chunks(
    tmp_path: Path,
) -> None:
    v1, v2 = _v1_v2()
    summary, notes, server = _mirrors_only(tmp_path, v1, v2, ("good",), v2)
    assert any("3 partly held: only their missing ranges" in n for n in notes), notes
    # A changed 4 KiB block touches at most 5 symbols; the whole chunks (fetched before) are
    # 3 x 55 symbols.
    assert 0 < summary.bytes_http <= len(CHANGED) * 5 * T, summary
    # Every byte counted once, where it came from (re-fetched held gaps as HTTP).
    assert summary.bytes_http + summary.bytes_local == len(v2)
    assert summary.bytes_multicast == summary.bytes_resumed == 0
    assert summary.http_refetched == 0
    image_ranges = [r for r in server.ranges if r is not None]  # (the manifest is not fetched)
    assert len(image_ranges) == len(CHANGED)
    assert all(re.fullmatch(r"bytes=\d+-\d+", r) for r in image_ranges), image_ranges


def test_a_mirror_lying_in_a_missing_range_costs_a_whole_fetch_never_a_bad_image(
    tmp_path: Path,
) -> None:
    v1, v2 = _v1_v2()
    # "wrong" flips a byte in every body: the chunk built from its ranges fails its hash, its
    # held symbols are forgotten, and it is fetched whole, from "good" after "wrong" fails.
    summary, notes, _ = _mirrors_only(tmp_path, v1, v2, ("wrong", "good"), v2)
    assert summary.http_refetched == 3
    assert sum("failed its hash: its held symbols are forgotten" in n for n in notes) == 3
    assert summary.bytes_local == 0  # (forgotten: nothing local went into the image)
    assert summary.bytes_http > len(v2)  # the ranges, then the whole chunks


def test_a_lying_local_block_costs_a_whole_fetch_of_its_chunk_never_a_bad_image(
    tmp_path: Path,
) -> None:
    v1, v2 = _v1_v2()
    # An index whose entry for block 30 is v1's block 29 (the manifest signs no index, so a
    # file is taken as given): the local pass places that block at 30, which is wrong.
    lying = bytearray(v2)
    lying[30 * BLOCK : 31 * BLOCK] = v1[29 * BLOCK : 30 * BLOCK]
    summary, notes, _ = _mirrors_only(tmp_path, v1, v2, ("good",), bytes(lying))
    assert summary.http_refetched == 1  # chunk 1 (blocks 16-32), whose block 20 is missing
    assert any("chunk 1 from its held symbols" in n for n in notes), notes
