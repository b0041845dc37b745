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
import random
import re
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

import pytest
import requests

from otacast.plugin.errors import FetchError
from otacast.plugin.fetcher import MAX_BACKOFF, HttpFetcher, RepairWorker
from otacast.plugin.verify import verify_manifest
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
