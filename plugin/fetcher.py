"""HTTP fallback and repair: signed chunks fetched by Range from mirrors (the only `requests` user).

Two pieces: `HttpFetcher` fetches and verifies one chunk (or a manifest) at a time and is all a
caller needs for a one-off fetch; `RepairWorker` is the receive driver's HTTP repair, a thread
that walks the chunks multicast has not delivered and hands verified ones back through a queue
(`otacast.plugin.receive` keeps the only writer to staging and to the receiver core).

A mirror is untrusted.  The signed manifest says where each chunk lies in the image
(`Manifest.chunk_span`) and what its SHA-256 is, so a chunk is fetched with one
``Range: bytes=first-last`` request and nothing about the answer is believed until the bytes hash
to the signed value.  Everything short of that is a *mirror failure*, counted under a short slug
("timeout", "status-500", "short-body", "hash-mismatch", ...) and answered by moving to the next
mirror.  The mirrors are tried in manifest order, in up to ``attempts`` rounds with exponential
backoff between rounds; only when every round fails does `FetchError` name the chunk and the
last reason each mirror gave.  Nothing unverified is ever returned.

What a mirror can cost us is bounded, because a broken or hostile server must not be able to
stall or exhaust a device:

- memory: the body is read with a hard cap of the signed length (never a byte more is asked
  for), and a declared ``Content-Length`` that disagrees is refused before the body is read;
- time: every request has one overall deadline, ``timeout + length / min_rate`` from before it
  is sent, covering the response headers and the body alike.  It is enforced from outside the
  read: a timer thread shuts down the request's sockets when the deadline passes, which wakes
  whatever read is blocked (in ``http.client``'s header parsing as much as in ours), and the
  request fails as "too-slow".  A server that drips its headers one byte per second, never idle
  long enough for a read timeout, is therefore left for the next mirror at the deadline.  The
  sockets are reached through `_DeadlineAdapter`, mounted on the session for http and https: its
  connections hand a duplicate of each socket they open or reuse to the deadline of the request
  the calling thread is making (a duplicate, so that the timer never touches a descriptor that
  may have been closed and reused meanwhile, and so that the TLS wrapping of the original does
  not hide it).  Besides, ``timeout`` bounds the TCP connect (per address) and every single read,
  so an idle server costs one ``timeout`` rather than the whole deadline, and the deadline is
  also checked between body reads.  Not covered: name resolution (the system resolver's own
  timeouts) and SOCKS proxies (their own connection classes);
- semantics: ``Accept-Encoding: identity`` because Range over a compressed representation is
  unreliable (servers disagree on whether the range applies before or after compression); a
  response that is encoded anyway is refused rather than decoded.  A 206 must carry exactly the
  ``Content-Range`` asked for.  A 200 (a server that ignores Range) is acceptable only when the
  asked range is the whole file and the body is declared exactly that long.

Every exception of the HTTP stack (`requests`, and `urllib3` below it while streaming) is turned
into a failure reason at this seam; callers see bytes or `FetchError`, nothing else.
`fetch_manifest` is the same bounded read for a device told a manifest URL: the bytes it returns
are untrusted until the verifier has checked the signatures.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import queue
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.poolmanager

from otacast.schemas.fec import ceil_div
from otacast.schemas.limits import MAX_RANGES_PER_CHUNK
from otacast.schemas.policy import VerifiedManifest

from .errors import FetchError

# Redirects followed on a session we create: a CDN or mirror alias needs one or two; each hop is
# a fresh connect and header read (all within the request's deadline), so a long chain is refused.
MAX_REDIRECTS: Final = 5

# Slowest mirror still worth waiting for, in bytes per second.  The per-request deadline is
# ``timeout + length / MIN_RATE``: the largest chunk (8 MiB) gets about 4.5 minutes, which a
# poor cellular link (~256 kbit/s) still meets; a server slower than that is abandoned for the
# next mirror rather than allowed to hold the device indefinitely.
MIN_RATE: Final = 32 * 1024

# Largest single read from a response.  It bounds how much one read can add past the deadline
# check and the size of each buffer append; at 64 KiB the per-read overhead is negligible even
# at gigabit rates (a few thousand reads per second).
READ_SIZE: Final = 64 * 1024

# Held bytes between two missing stretches of a partly held chunk that are fetched again rather
# than split into two requests.  A request costs ~0.5 KB of headers and one round trip (the
# requests of a chunk go one after another on one connection); counted in bytes alone the
# split would pay from one symbol's gap on, but a round trip is worth the bandwidth-delay
# product: ~16 KB on a 4 Mbit/s link at 30 ms, ~25 KB at 10 Mbit/s and 20 ms.  16 KiB (13
# symbols of 1208 bytes) therefore fetches a gap again only where the request it saves would
# have cost about as much time; each costs under 16 KiB.
RANGE_GAP: Final = 16 * 1024

# How long the repair worker waits for the receive loop's answer on a chunk fetched as ranges
# before it looks at `stop` again.
POLL_SECONDS: Final = 0.1

# Cap on the wait between rounds: with many attempts the doubling would otherwise reach hours.
MAX_BACKOFF: Final = 60.0

# Server-controlled text (a Content-Range or Content-Encoding value) quoted in an error is cut to
# this length so a failure stays one readable line.
MAX_DETAIL_CHARS: Final = 80

# The detail of a request cut by its deadline before its headers were complete.
_NO_HEADERS: Final = "no complete headers by the deadline"

# Exception chains are followed this deep for a failure's detail; the stack nests three or four.
_MAX_CAUSE_DEPTH = 8

# RFC 9110 section 14.4; 20 digits hold any 64-bit offset and keep int() away from huge input.
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20}|\*)")


@dataclass(frozen=True)
class FetchStats:
    """What the fetcher has done so far.  The counters are updated in place as it works."""

    bytes_received: Counter[str] = field(default_factory=Counter)  # body bytes, per mirror URL
    requests: Counter[str] = field(default_factory=Counter)  # requests sent, per mirror URL
    failures: Counter[str] = field(default_factory=Counter)  # failed requests, per reason slug

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


class _MirrorFailure(Exception):
    """One request's failure: a short slug for counting and a detail for the error line."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


class HttpFetcher:
    """Verified chunks from a release's HTTP mirrors (`urls`, in the manifest's order).

    `timeout` bounds a connect and each read; `attempts` rounds over all mirrors are made, with
    `backoff`, 2 x `backoff`, ... seconds (at most `MAX_BACKOFF`) between rounds; `min_rate`
    sets the per-request overall deadline (headers and body).  `sleep` and `clock` are
    injectable so tests need not wait.  A fetcher without mirrors (a manifest that lists none)
    can still fetch a manifest by URL.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 0.5,
        session: requests.Session | None = None,
        min_rate: float = MIN_RATE,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or attempts < 1 or backoff < 0 or min_rate <= 0:
            raise ValueError("timeout and min_rate must be positive, attempts at least 1")
        self.urls = tuple(urls)
        self.stats = FetchStats()
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._min_rate = min_rate
        self._sleep = sleep
        self._clock = clock
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            session.max_redirects = MAX_REDIRECTS
        # The overall deadline needs connections it can reach (see the module docstring): a
        # session the caller passed gets them too, in place of its http and https adapters.
        adapter = _DeadlineAdapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session

    def close(self) -> None:
        """Close the connection pool, if the fetcher created it."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> HttpFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Public operations --------------------------------------------------------------------

    def fetch_chunk(self, index: int, offset: int, length: int, sha256: bytes) -> bytes:
        """The chunk's bytes, verified against the signed `sha256`, or `FetchError`."""
        if offset < 0 or length < 1 or len(sha256) != hashlib.sha256().digest_size:
            raise ValueError(f"chunk {index}: invalid span or hash")

        def verified(data: bytes) -> bytes:
            if hashlib.sha256(data).digest() != sha256:
                raise _MirrorFailure("hash-mismatch")
            return data

        return self._fetch_span(f"chunk {index}", offset, length, verified)

    def fetch_range(self, what: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of the image from `offset`, or `FetchError`; `what` names
        them in the error.  **Not verified**: the bytes of a part of a chunk cannot be, so the
        caller must hash the whole chunk they go into before it believes any of them."""
        if offset < 0 or length < 1:
            raise ValueError(f"{what}: invalid span")
        return self._fetch_span(what, offset, length, lambda data: data)

    def _fetch_span(
        self, what: str, offset: int, length: int, check: Callable[[bytes], bytes]
    ) -> bytes:
        """One ``Range: bytes=offset-last`` request per mirror until one answers with exactly
        that range and its bytes pass `check` (which raises `_MirrorFailure` otherwise)."""
        last = offset + length - 1
        if not self.urls:
            raise FetchError(f"{what} (bytes {offset}-{last}): the manifest lists no mirrors")

        def attempt(url: str) -> bytes:
            with self._open(url, {"Range": f"bytes={offset}-{last}"}, length) as (
                response,
                deadline,
            ):
                _check_partial(response, offset, length)
                data = self._read_body(response, url, length, deadline)
            if len(data) < length:
                raise _MirrorFailure("short-body", f"{len(data)} of {length} bytes")
            return check(data)

        return self._over_mirrors(self.urls, attempt, f"{what} (bytes {offset}-{last})")

    def fetch_manifest(self, url: str, max_bytes: int) -> bytes:
        """At most `max_bytes` of a manifest (still unverified), or `FetchError`."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")

        def attempt(mirror: str) -> bytes:
            with self._open(mirror, {}, max_bytes) as (response, deadline):
                if response.status_code != 200:
                    raise _MirrorFailure(f"status-{response.status_code}")
                _check_identity(response)
                declared = _declared_length(response)
                if declared is not None and declared > max_bytes:
                    raise _MirrorFailure("too-large", f"declares {declared} bytes")
                # One byte past the limit tells an oversize body from one that fits exactly.
                data = self._read_body(response, mirror, max_bytes + 1, deadline)
            if len(data) > max_bytes:
                raise _MirrorFailure("too-large", f"more than {max_bytes} bytes")
            return data

        return self._over_mirrors((url,), attempt, f"manifest {url}")

    # --- Rounds over mirrors ------------------------------------------------------------------

    def _over_mirrors(
        self, urls: Sequence[str], attempt: Callable[[str], bytes], what: str
    ) -> bytes:
        reasons: dict[str, _MirrorFailure] = {}
        for round_ in range(self._attempts):
            if round_:
                self._sleep(min(self._backoff * 2 ** (round_ - 1), MAX_BACKOFF))
            for url in urls:
                self.stats.requests[url] += 1
                try:
                    return attempt(url)
                except _MirrorFailure as failure:
                    self.stats.failures[failure.reason] += 1
                    reasons[url] = failure
        summary = "; ".join(f"{url}: {failure}" for url, failure in reasons.items())
        rounds = "round" if self._attempts == 1 else "rounds"
        raise FetchError(f"{what}: every mirror failed in {self._attempts} {rounds}: {summary}")

    # --- One request --------------------------------------------------------------------------

    @contextmanager
    def _open(
        self, url: str, headers: Mapping[str, str], length: int
    ) -> Iterator[tuple[requests.Response, _Deadline]]:
        """A streaming GET of about `length` bytes under its overall deadline, whose connection
        is closed (not pooled) unless fully read."""
        # Started before the request is sent: connecting, redirects and headers count too.
        budget = self._timeout + length / self._min_rate
        deadline = _Deadline(self._clock() + budget, budget)
        previous = getattr(_in_flight, "deadline", None)
        _in_flight.deadline = deadline
        try:
            with deadline:
                response = self._send(url, headers, deadline)
                try:
                    if deadline.expired:
                        # http.client takes the end of input for the end of the headers, so a
                        # header read cut by the timer can look like a complete response.
                        raise _MirrorFailure("too-slow", _NO_HEADERS)
                    yield response, deadline
                finally:
                    # A body left unread (refused, or cut at the cap) must not go back to the
                    # pool: the next request on that connection would read its remains as a
                    # response.
                    response.close()
        finally:
            _in_flight.deadline = previous

    def _send(self, url: str, headers: Mapping[str, str], deadline: _Deadline) -> requests.Response:
        try:
            return self._session.get(
                url,
                headers={**headers, "Accept-Encoding": "identity"},
                stream=True,
                timeout=(self._timeout, self._timeout),
                allow_redirects=True,
            )
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
            ValueError,
        ) as exc:
            if deadline.expired:  # the timer shut the socket: whatever broke, it was too slow
                raise _MirrorFailure("too-slow", _NO_HEADERS) from None
            raise _request_failure(exc, self._session.max_redirects) from None

    def _read_body(
        self, response: requests.Response, url: str, limit: int, deadline: _Deadline
    ) -> bytes:
        """Up to `limit` body bytes; never asks the stream for more."""
        body = bytearray()
        while len(body) < limit:
            if deadline.expired or self._clock() > deadline.at:
                raise _MirrorFailure("too-slow", f"{len(body)} bytes before the deadline")
            try:
                # read1: at most one receive of body bytes, so the between-reads check above
                # runs at least once per `timeout` even if the timer were late.
                piece = response.raw.read1(min(READ_SIZE, limit - len(body)), decode_content=False)
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                if deadline.expired:
                    raise _MirrorFailure(
                        "too-slow", f"{len(body)} bytes before the deadline"
                    ) from None
                raise _read_failure(exc, len(body)) from None
            if not piece:
                if deadline.expired:  # the shutdown looks like the end of the body
                    raise _MirrorFailure("too-slow", f"{len(body)} bytes before the deadline")
                break
            body += piece
            self.stats.bytes_received[url] += len(piece)
        return bytes(body)


def _request_failure(exc: BaseException, max_redirects: int) -> _MirrorFailure:
    """The failure reason for an exception of sending a request and reading its headers."""
    if isinstance(exc, requests.Timeout):
        return _MirrorFailure("timeout", _detail(exc))
    if isinstance(exc, requests.TooManyRedirects):
        return _MirrorFailure("redirects", f"more than {max_redirects}")
    if isinstance(exc, requests.ConnectionError):
        return _MirrorFailure("connection", _detail(exc))
    # Invalid URL or schema, a header the stack cannot encode, and the like.
    return _MirrorFailure("request-error", _detail(exc))


def _read_failure(exc: BaseException, received: int) -> _MirrorFailure:
    """The failure reason for an exception of reading the body after `received` bytes."""
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return _MirrorFailure("timeout", f"idle after {received} bytes")
    if isinstance(exc, urllib3.exceptions.ProtocolError) and isinstance(
        exc.__cause__, http.client.IncompleteRead
    ):
        return _MirrorFailure("short-body", f"{received} bytes")
    return _MirrorFailure("connection", _detail(exc))


# --- The overall deadline, enforced from outside the read -----------------------------------------

# The deadline of the request the current thread is making, for the connections to find: the
# HTTP stack gives no other way to reach the sockets of one request (a redirect opens another).
_in_flight = threading.local()


class _Deadline:
    """One request's overall deadline: at `at` (on the fetcher's clock), `budget` seconds after
    it starts, a timer thread shuts down every socket the request has used.

    Shutting down (not closing) a TCP socket wakes a read blocked on it in another thread with
    end-of-file, and is harmless to the thread that still owns and will close the socket.  The
    sockets watched are duplicates of the connection's (``dup(2)`` shares the connection, not the
    descriptor), closed here when the request ends, so the timer can never act on a descriptor
    number that the connection has closed and the process reused for something else.
    """

    def __init__(self, at: float, budget: float) -> None:
        self.at = at
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._ended = False
        self._timer = threading.Timer(budget, self._expire)
        self._timer.daemon = True

    @property
    def expired(self) -> bool:
        with self._lock:
            return self._expired

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._ended = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock`'s connection down at the deadline (at once if it has passed)."""
        with self._lock:
            if self._ended:
                return
            try:
                duplicate = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
            except OSError:
                return  # out of descriptors: the per-read timeout and between-reads check remain
            self._sockets.append(duplicate)
            if self._expired:
                _shut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # OSError: already closed by the peer or not yet connected, so nothing is left to wake.
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    deadline: _Deadline | None = getattr(_in_flight, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _WatchedConnection(urllib3.connection.HTTPConnection):
    """A connection whose sockets the current request's deadline can shut down."""

    def _new_conn(self) -> socket.socket:
        # Watched from creation, before any TLS handshake (which a server can drip as well).
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)  # a kept-alive connection: its socket exists already
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS: Final = {"http": _WatchedPool, "https": _WatchedHTTPSPool}


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connections that `_Deadline` can reach, direct or through an HTTP
    proxy (a SOCKS proxy keeps its own connections, unwatched)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> urllib3.poolmanager.PoolManager:
        manager: urllib3.poolmanager.PoolManager = super().proxy_manager_for(*args, **kwargs)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


@dataclass(frozen=True)
class RangedChunk:
    """The byte ranges of chunk `index` that its held source symbols do not cover, fetched but
    **not verified**: `pieces` are ``(start, bytes)``, `start` from the chunk's first byte.  The
    receive loop puts them over the chunk's held bytes, hashes the whole chunk, and answers
    with `RepairWorker.verdict`."""

    index: int
    pieces: tuple[tuple[int, bytes], ...]

    @property
    def fetched(self) -> int:
        """Bytes fetched for it over HTTP."""
        return sum(len(piece) for _, piece in self.pieces)


class RepairWorker(threading.Thread):
    """Fetches the chunks still missing over HTTP, in order, and queues them.

    The receive loop owns everything else, so the worker shares only thread-safe things with
    it: `results` gets ``(index, data)`` for each chunk fetched whole and verified, a
    `RangedChunk` for each chunk with a plan (below), and ``None`` once the worker is done; the
    loop adds to `done_elsewhere` the chunks multicast completed meanwhile (they are skipped; a
    set's ``add`` and ``in`` are atomic); `failures` gets one message per chunk no mirror
    delivered (read once the thread has ended); `stop` ends the walk after the chunk in flight.

    `plans` maps a chunk whose source symbols are partly held to the byte ranges to fetch
    (`plan_ranges`): only those are fetched, one plain single-range request each.  The loop
    answers each `RangedChunk` with `verdict`: kept (or done elsewhere), or failed its hash,
    whereupon the worker fetches that chunk whole (the loop has forgotten its held symbols: a
    lying local block, or a mirror lying in a range, is never kept).  The worker ends (``None``)
    only once every `RangedChunk` has its answer.
    """

    def __init__(
        self,
        manifest: VerifiedManifest,
        missing: list[int],
        timeout: float,
        plans: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    ) -> None:
        super().__init__(name="otacast-http", daemon=True)
        self.m = manifest.manifest
        self.missing = missing
        self.plans = dict(plans or {})
        self.results: queue.Queue[tuple[int, bytes] | RangedChunk | None] = queue.Queue()
        self.done_elsewhere: set[int] = set()
        self.failures: list[str] = []
        self.fetcher = HttpFetcher(self.m.http, timeout=timeout)
        self.stop = threading.Event()
        self._verdicts: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.refetched: list[int] = []  # chunks whose ranges made a chunk failing its hash

    def verdict(self, index: int, kept: bool) -> None:
        """The loop's answer to the `RangedChunk` of `index`: `kept` (or done elsewhere), or
        not (it failed its hash: fetch it whole)."""
        self._verdicts.put((index, kept))

    def run(self) -> None:
        waiting: set[int] = set()  # chunks handed over as ranges, not yet answered
        for index in self.missing:
            self._answers(waiting, wait=False)
            if self.stop.is_set():
                break
            if index in self.done_elsewhere:  # multicast got there first
                continue
            plan = self.plans.get(index)
            if plan and self._ranged(index, plan):
                waiting.add(index)
            elif not plan:
                self._whole(index)
        while waiting and not self.stop.is_set():
            self._answers(waiting, wait=True)
        self.results.put(None)

    def _answers(self, waiting: set[int], *, wait: bool) -> None:
        """Take the loop's answers (at least one, or a turn of `stop`'s check, if `wait`), and
        fetch whole each chunk whose ranges did not make it."""
        while True:
            try:
                if wait:
                    index, kept = self._verdicts.get(timeout=POLL_SECONDS)
                else:
                    index, kept = self._verdicts.get_nowait()
            except queue.Empty:
                return
            waiting.discard(index)
            if not kept:
                self.refetched.append(index)
                self.fetcher.stats.failures["held-mismatch"] += 1
                if index not in self.done_elsewhere and not self.stop.is_set():
                    self._whole(index)
            wait = False

    def _whole(self, index: int) -> None:
        offset, length = self.m.chunk_span(index)
        try:
            data = self.fetcher.fetch_chunk(index, offset, length, self.m.chunks.sha256[index])
        except FetchError as exc:
            self.failures.append(str(exc))
            return
        self.results.put((index, data))

    def _ranged(self, index: int, plan: Sequence[tuple[int, int]]) -> bool:
        """Fetch `plan`'s ranges of chunk `index` and hand them over; False if one failed on
        every mirror (counted as the chunk's failure)."""
        offset = self.m.chunk_span(index)[0]
        pieces = []
        for start, end in plan:  # (within the chunk: `plan_ranges`)
            try:
                data = self.fetcher.fetch_range(f"chunk {index}", offset + start, end - start)
            except FetchError as exc:
                self.failures.append(str(exc))
                return False
            pieces.append((start, data))
        self.results.put(RangedChunk(index, tuple(pieces)))
        return True


# --- Range planning (pure) ----------------------------------------------------------------------


def plan_ranges(
    length: int,
    symbol_size: int,
    held: Iterable[tuple[int, int]],
    *,
    gap: int = RANGE_GAP,
    most: int = MAX_RANGES_PER_CHUNK,
) -> tuple[tuple[int, int], ...]:
    """The byte ranges ``[start, end)`` of a chunk of `length` bytes to fetch when the source
    symbols in the runs `held` (``[first, end)`` ESIs; symbols of `symbol_size` bytes, the
    last cut at the chunk's end) are already in place: the bytes of the others, in order.

    Missing stretches separated by fewer than `gap` held bytes become one range (the held bytes
    between are fetched again: cheaper than a request), and if more than `most` ranges remain,
    the shortest gaps are closed until `most` do.  Runs outside the chunk's symbols, empty or
    overlapping, are clipped and merged (the caller's bookkeeping, not trusted to be tidy).
    Nothing held: the whole chunk, one range; everything held: none."""
    if length < 1 or symbol_size < 1 or most < 1:
        raise ValueError("length, symbol_size and most must be positive")
    k = ceil_div(length, symbol_size)
    missing: list[list[int]] = []  # [start, end) bytes
    at = 0  # the first ESI not yet known to be held or missing
    for first, end in sorted((max(0, f), min(k, e)) for f, e in held):
        if end <= first or end <= at:
            continue
        if first > at:
            missing.append([at * symbol_size, first * symbol_size])
        at = end
    if at < k:
        missing.append([at * symbol_size, length])
    if not missing:
        return ()
    gaps = sorted(range(1, len(missing)), key=lambda i: missing[i][0] - missing[i - 1][1])
    close = {i for i in gaps if missing[i][0] - missing[i - 1][1] < gap}
    close.update(gaps[: max(0, len(missing) - most)])  # (the shortest first)
    ranges = [missing[0]]
    for i in range(1, len(missing)):
        if i in close:
            ranges[-1][1] = missing[i][1]
        else:
            ranges.append(missing[i])
    return tuple((start, end) for start, end in ranges)


# --- Response checks (pure) ---------------------------------------------------------------------


def _check_partial(response: requests.Response, offset: int, length: int) -> None:
    """Refuse any answer other than exactly the asked range, before its body is read."""
    status = response.status_code
    declared = _declared_length(response)
    if status == 200:
        # The server ignored Range and sends the whole file from byte 0: usable only if the
        # range asked for is that whole file, which a declared length equal to ours proves.
        if offset != 0 or declared != length:
            raise _MirrorFailure("ignored-range", f"200 with length {declared}")
    elif status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            raise _MirrorFailure("content-range", _quote(content_range))
        first, last, total = match.groups()
        if (
            int(first) != offset
            or int(last) != offset + length - 1
            or (total != "*" and int(total) <= int(last))
        ):
            raise _MirrorFailure("content-range", _quote(content_range))
    else:
        raise _MirrorFailure(f"status-{status}")
    _check_identity(response)
    if declared is not None and declared > length:
        raise _MirrorFailure("long-body", f"declares {declared} of {length} bytes")
    if declared is not None and declared < length:
        raise _MirrorFailure("short-body", f"declares {declared} of {length} bytes")


def _check_identity(response: requests.Response) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _MirrorFailure("content-encoding", _quote(encoding))


def _declared_length(response: requests.Response) -> int | None:
    """The Content-Length header, or None when absent (chunked or close-delimited)."""
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    # http.client already refuses a non-numeric Content-Length, but a mirror's header is not
    # ours to trust; a malformed one is a failure, not an exception.
    if not value.strip().isdigit() or len(value.strip()) > 20:
        raise _MirrorFailure("bad-length", _quote(value))
    return int(value)


def _quote(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= MAX_DETAIL_CHARS else shown[: MAX_DETAIL_CHARS - 3] + "..."


def _detail(exc: BaseException) -> str:
    """The innermost cause's class name: stable, short, and free of server-chosen text."""
    for _ in range(_MAX_CAUSE_DEPTH):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return type(exc).__name__
