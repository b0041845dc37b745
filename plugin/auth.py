"""Packet authentication on the device: a DATA datagram reaches a decoder only if vouched for.

Theory of operation
-------------------
A forged repair symbol cannot corrupt an image (every decoded chunk is hashed against the signed
manifest) but it spoils the decode of its whole chunk, which is then collected again: a cheap
denial of service (FEC pollution).  So when the verified manifest lists stream keys, the core
admits a DATA datagram only if its digest (`wire.packet_digest`, 80 bits of SHA-256 over the
whole datagram) is the one an accepted AUTH page lists for its chunk and ESI.

*Pages.*  Page ``j`` of chunk ``c`` lists the digests of ESIs ``j*P .. j*P+P-1`` (``P`` =
`wire.auth_capacity` of the manifest's datagram size): one visit of the sender's carousel.  The
sender signs each page with its stream key as it sends it, twice, just ahead of the visit's
data.  A DATA datagram's page is therefore found from its chunk and ESI: the check is one
SHA-256 and one comparison.  A datagram that contradicts an accepted page is refused at once
(``unauthenticated``); one whose page has not been accepted is held (at most
``MAX_AUTH_HELD_BYTES``, oldest dropped) and admitted if its page comes.

*Freshness: why replaying genuine pages buys nothing.*  Every page carries the time its sender
signed it (``sent``), strictly increasing per sender.  The authenticator keeps the newest time
it accepted from each sender and refuses, before any signature check, a page older than that by
more than ``AUTH_REORDER_SECONDS`` (``auth-stale``): a recorded page is worthless a moment after
it was sent.  Accepted pages are remembered by signature (the ``MAX_AUTH_RECENT`` latest), so
another copy of one -- the sender's own second copy, or an attacker's replay within the reorder
window -- changes nothing and costs one lookup (``pages_repeated``).  Each genuine page is thus
accepted at most once, never later than ``AUTH_REORDER_SECONDS`` after a newer one.

*Only what can still be used is kept.*  A sender moves to a new page with every visit, so only
the page of the visit in flight matters, and a few before it for stragglers: each sender keeps
its ``MAX_AUTH_KEPT_PAGES`` latest accepted pages, the oldest going first.  Pages of chunks the
device already holds are dropped before any check (``pages_late``).  A replay cannot push out
the page of the visit in flight: to enter at all it must be a page newer than the reorder
window allows and never heard (one the device lost), and there are at most a handful of those.

*Budgets.*  A page that is new costs one Ed25519 verification (~60 us, one per visit of ~138 kB
of DATA: under 0.5 ms per MB).  Verifications are rationed by source address: a source that has
sent a valid page has its own allowance (``TRUSTED_AUTH_VERIFY_RATE``); every other source
shares one small allowance (``UNTRUSTED_AUTH_VERIFY_RATE``); all of them together never exceed
``MAX_AUTH_VERIFY_RATE``.  A trusted source that sends one page that fails verification is a
stranger again.  A trusted source is displaced only after ``TRUST_IDLE_SECONDS`` without a new
valid page, so a host with many addresses cannot push the real sender out.  Repeats and stale
pages need no budget of their own: they are refused by a lookup and a comparison, no dearer than
any other datagram that is dropped.

*A sender whose clock went back.*  A sender restarted on a clock that is behind its last run
sends pages that look stale.  Its newest time is forgotten once no page of it has been accepted
for ``TRUST_IDLE_SECONDS``, after which its pages are accepted again.  Two sender processes must
therefore never share one stream key: their clocks would make half their pages stale.

Every refusal is counted in the core's ``rejected`` counter; nothing here raises on input.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass

from otacast.schemas import wire
from otacast.schemas.limits import (
    AUTH_REORDER_SECONDS,
    MAX_AUTH_HELD_BYTES,
    MAX_AUTH_KEPT_PAGES,
    MAX_AUTH_RECENT,
    MAX_AUTH_SOURCES,
    MAX_AUTH_VERIFY_RATE,
    MAX_ESI,
    TRUST_IDLE_SECONDS,
    TRUSTED_AUTH_VERIFY_RATE,
    UNTRUSTED_AUTH_VERIFY_RATE,
)

from .budget import TokenBucket
from .verify import check_signature

SignatureCheck = Callable[[bytes, bytes, bytes], bool]

# What a device does with packet authentication: use it when the manifest lists stream keys
# (auto), refuse manifests that list none (require), or decode without it (off).
PACKET_AUTH_POLICIES = ("auto", "require", "off")

# A budget may save up this many seconds of its rate: enough for a burst of pages when several
# senders start at once, not enough to make a flood cheap.
BUDGET_BURST_SECONDS = 0.2

_REORDER_US = int(AUTH_REORDER_SECONDS * 1_000_000)
# A page is remembered (as a repeat) by the first bytes of its signature: 128 bits cannot be hit
# by chance, and an attacker who copies a signature onto other bytes only gets its page dropped.
_SIGNATURE_KEY = 16

PageKey = tuple[int, int]  # chunk, page


def _bucket(rate: float, now: float) -> TokenBucket:
    return TokenBucket(rate, max(1.0, rate * BUDGET_BURST_SECONDS), now)


@dataclass
class AuthStats:
    pages_signed: int = 0  # accepted after an Ed25519 verification
    pages_repeated: int = 0  # another copy of an accepted page: nothing to do
    pages_late: int = 0  # for a chunk already complete: dropped unchecked
    datagrams_admitted: int = 0
    datagrams_released: int = 0  # admitted after being held for their page


class _Trusted:
    __slots__ = ("budget", "last_good")

    def __init__(self, now: float) -> None:
        self.budget = _bucket(TRUSTED_AUTH_VERIFY_RATE, now)
        self.last_good = now


class _Sender:
    """What is known of one stream key's sender: its newest page and the pages it keeps."""

    __slots__ = ("accepted_at", "kept", "newest")

    def __init__(self) -> None:
        self.newest = 0  # the newest `sent` accepted
        self.accepted_at = 0.0  # when (the device's clock) a page of it was last accepted
        self.kept: OrderedDict[PageKey, bytes] = OrderedDict()  # oldest first


class PacketAuthenticator:
    def __init__(
        self,
        stream_keys: Mapping[int, bytes],
        rejected: Counter[str],
        *,
        now: float,
        datagram_size: int,
        chunk_count: int,
        done: Container[int] = (),
        check: SignatureCheck = check_signature,
    ) -> None:
        self.keys = dict(stream_keys)
        self.rejected = rejected
        self.check = check
        self.capacity = wire.auth_capacity(datagram_size)
        self.chunk_count = chunk_count
        self.done = done  # the core's set of complete chunks
        self.stats = AuthStats()
        self._senders: dict[int, _Sender] = {}
        # Every kept page by chunk and page, whichever sender it came from (senders list the
        # same digests for the same ESIs); a page stays while some sender keeps it.
        self._kept: dict[PageKey, bytes] = {}
        self._holders: Counter[PageKey] = Counter()
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._held: OrderedDict[bytes, bytes] = OrderedDict()
        self._held_bytes = 0
        self._strangers = _bucket(UNTRUSTED_AUTH_VERIFY_RATE, now)
        self._everyone = _bucket(MAX_AUTH_VERIFY_RATE, now)
        self._trusted: OrderedDict[str, _Trusted] = OrderedDict()

    # --- DATA --------------------------------------------------------------------------------

    def admit(self, data: bytes | memoryview, chunk: int, esi: int) -> bool:
        """Whether `data` (a well-formed DATA datagram of this session for `chunk` and `esi`)
        may be decoded now.  If its page has not been accepted, a copy is held until the page
        is, when `on_auth` returns it."""
        digest = wire.packet_digest(data)
        page, slot = divmod(esi, self.capacity)
        listed = self._kept.get((chunk, page))
        start = slot * wire.DIGEST_BYTES
        if listed is not None and start < len(listed):  # (a sender with a larger repair pool
            # lists more on its last page: a datagram beyond this one's list waits for that page)
            if listed[start : start + wire.DIGEST_BYTES] == digest:
                self.stats.datagrams_admitted += 1
                return True
            self.rejected["unauthenticated"] += 1  # its page lists other bytes: forged
            return False
        if digest in self._held:
            self.rejected["unauthenticated-repeat"] += 1
            return False
        self._held[digest] = bytes(data)  # (`data` may be a view of a buffer read again)
        self._held_bytes += len(data)
        while self._held_bytes > MAX_AUTH_HELD_BYTES:
            _, dropped = self._held.popitem(last=False)
            self._held_bytes -= len(dropped)
            self.rejected["unauthenticated"] += 1
        return False

    def vouched_run(self, chunk: int, first: int, run: Sequence[memoryview | bytes]) -> int:
        """How many of `run` (well-formed DATA datagrams of this session for `chunk`, ESIs
        `first`, `first` + 1, ...), from the first on, accepted pages list: the run's digests
        are compared with a page's slice at once.  Nothing is counted or held: the caller
        counts what it admits, and passes the rest, from the first not vouched for, to `admit`
        one by one (which holds or refuses it as it would have anyway)."""
        capacity, width = self.capacity, wire.DIGEST_BYTES
        vouched, count = 0, len(run)
        while vouched < count:
            page, slot = divmod(first + vouched, capacity)
            listed = self._kept.get((chunk, page))
            if listed is None:
                break
            take = min(count - vouched, capacity - slot, len(listed) // width - slot)
            if take <= 0:
                break
            digests = wire.packet_digests(run[vouched : vouched + take])
            if digests != listed[slot * width : (slot + take) * width]:
                # (the first that differs, and any after it, are `admit`'s to decide)
                while digests[:width] == listed[slot * width : (slot + 1) * width]:
                    digests, slot, vouched = digests[width:], slot + 1, vouched + 1
                break
            vouched += take
        return vouched

    # --- AUTH --------------------------------------------------------------------------------

    def on_auth(
        self, packet: wire.AuthPacket, datagram: bytes, source: str, now: float
    ) -> list[bytes]:
        """Check one AUTH page (of this session: the core checked); the held datagrams it admits."""
        public = self.keys.get(packet.sender)
        if public is None:
            self.rejected["auth-unknown-sender"] += 1
            return []
        if (
            packet.chunk >= self.chunk_count
            or packet.count > self.capacity
            or packet.page * self.capacity > MAX_ESI
        ):
            self.rejected["auth-range"] += 1
            return []
        if packet.chunk in self.done:
            self.stats.pages_late += 1
            return []
        signature = packet.signature[:_SIGNATURE_KEY]
        if signature in self._recent:
            self.stats.pages_repeated += 1
            return []
        sender = self._senders.get(packet.sender)
        if (
            sender is not None
            and packet.sent + _REORDER_US < sender.newest
            and now - sender.accepted_at < TRUST_IDLE_SECONDS
        ):
            self.rejected["auth-stale"] += 1
            return []
        if not self._verify(packet, datagram, public, source, now):
            return []
        if sender is None:
            sender = self._senders[packet.sender] = _Sender()
        elif packet.sent + _REORDER_US < sender.newest:
            sender.newest = 0  # idle long enough: see "A sender whose clock went back"
        sender.newest = max(sender.newest, packet.sent)
        sender.accepted_at = now
        self._recent[signature] = None
        if len(self._recent) > MAX_AUTH_RECENT:
            self._recent.popitem(last=False)
        self._keep(sender, (packet.chunk, packet.page), packet.digests)
        return self._release(packet.digests)

    def _verify(
        self, packet: wire.AuthPacket, datagram: bytes, public: bytes, source: str, now: float
    ) -> bool:
        trusted = self._trusted.get(source)
        budget = trusted.budget if trusted is not None else self._strangers
        if not budget.take(now) or not self._everyone.take(now):
            self.rejected["auth-budget"] += 1
            return False
        if not self.check(public, wire.auth_signed_bytes(datagram), packet.signature):
            self.rejected["auth-forged"] += 1
            if trusted is not None:
                del self._trusted[source]  # a stranger again: see the module doc
            return False
        self.stats.pages_signed += 1
        self._vouch(source, now)
        return True

    def _vouch(self, source: str, now: float) -> None:
        """`source` has just sent a valid new page."""
        trusted = self._trusted.get(source)
        if trusted is not None:
            trusted.last_good = now
            self._trusted.move_to_end(source)
            return
        if len(self._trusted) >= MAX_AUTH_SOURCES:
            stalest, entry = next(iter(self._trusted.items()))
            if now - entry.last_good < TRUST_IDLE_SECONDS:
                return  # every trusted source is active: this one stays a stranger
            del self._trusted[stalest]
        self._trusted[source] = _Trusted(now)

    def _keep(self, sender: _Sender, key: PageKey, digests: bytes) -> None:
        if key in sender.kept:
            sender.kept.move_to_end(key)
        else:
            self._holders[key] += 1
        sender.kept[key] = digests
        self._kept[key] = digests
        if len(sender.kept) > MAX_AUTH_KEPT_PAGES:
            old, _ = sender.kept.popitem(last=False)
            self._holders[old] -= 1
            if not self._holders[old]:
                del self._holders[old]
                del self._kept[old]

    def _release(self, digests: bytes) -> list[bytes]:
        released = []
        if self._held:
            for start in range(0, len(digests), wire.DIGEST_BYTES):
                data = self._held.pop(digests[start : start + wire.DIGEST_BYTES], None)
                if data is not None:
                    self._held_bytes -= len(data)
                    released.append(data)
        self.stats.datagrams_released += len(released)
        return released
