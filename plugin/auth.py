"""Packet authentication on the device: a DATA datagram reaches a decoder only if vouched for.

Theory of operation
-------------------
A forged repair symbol cannot corrupt an image (every decoded chunk is hashed against the signed
manifest) but it spoils the decode of its whole chunk, which is then collected again: a cheap
denial of service (FEC pollution).  So when the verified manifest lists stream keys, the core
admits a DATA datagram only if its digest (`wire.packet_digest`, 80 bits of SHA-256 over the
whole datagram) appears on an accepted AUTH page.

*Pages.*  A sender lists the digests of each chunk's symbol cycle in pages of up to 112
(minimum MTU), signs every page with its stream key (the release key stays offline) and sends
each page twice per pass, ahead of the datagrams it covers.  A DATA datagram that arrives before
its page is held (at most ``MAX_AUTH_HELD_BYTES``, oldest dropped) and admitted when the page
is accepted.

*Links.*  Every page carries `wire.auth_link` of the next page of the same chunk.  Once one page
of a chunk is accepted, the next one is checked by a hash, not a signature: forged pages that
claim it cost one SHA-256 each.  An accepted page is remembered by that same hash, so a copy of
it in a later pass (the sender's passes walk on through the repair pool and wrap around)
admits its datagrams again without a signature, long after their digests were forgotten.

*Budgets.*  A page that is not linked costs one Ed25519 verification (~60 us).  Verifications
are rationed by source address: a source that has sent a valid new page has its own allowance
(``TRUSTED_AUTH_VERIFY_RATE``); every other source shares one small allowance
(``UNTRUSTED_AUTH_VERIFY_RATE``); all of them together never exceed ``MAX_AUTH_VERIFY_RATE``.
A trusted source that sends one page that fails verification is a stranger again, so earning
trust by replaying genuine pages buys an attacker one forged verification per page replayed.
A trusted source is displaced only after ``TRUST_IDLE_SECONDS`` without a new valid page, so a
host with many addresses cannot push the real sender out.  A flood of forged pages from other
hosts therefore costs bounded CPU and does not crowd out the real sender.  An attacker who
spoofs the real sender's source address can still spend its allowance; see docs/SECURITY.md.

Every refusal is counted in the core's ``rejected`` counter; nothing here raises on input.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from otacast.schemas import wire
from otacast.schemas.limits import (
    MAX_AUTH_DIGESTS,
    MAX_AUTH_HELD_BYTES,
    MAX_AUTH_LINKS,
    MAX_AUTH_PAGES,
    MAX_AUTH_SOURCES,
    MAX_AUTH_VERIFY_RATE,
    TRUST_IDLE_SECONDS,
    TRUSTED_AUTH_VERIFY_RATE,
    UNTRUSTED_AUTH_VERIFY_RATE,
)

from .verify import check_signature

SignatureCheck = Callable[[bytes, bytes, bytes], bool]

# What a device does with packet authentication: use it when the manifest lists stream keys
# (auto), refuse manifests that list none (require), or decode without it (off).
PACKET_AUTH_POLICIES = ("auto", "require", "off")

# A budget may save up this many seconds of its rate: enough for the burst of pages a sender
# emits when a window of chunks starts, not enough to make a flood cheap.
BUDGET_BURST_SECONDS = 0.2

PageId = tuple[int, int, int]  # sender, chunk, page
K = TypeVar("K")
V = TypeVar("V")


@dataclass
class AuthStats:
    pages_signed: int = 0  # accepted after an Ed25519 verification
    pages_linked: int = 0  # accepted by the previous page's link
    pages_repeated: int = 0  # another copy of an accepted page
    datagrams_admitted: int = 0
    datagrams_released: int = 0  # admitted after being held for their page


class _Budget:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * BUDGET_BURST_SECONDS)
        self.tokens = self.burst
        self.last = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _Trusted:
    __slots__ = ("budget", "last_good")

    def __init__(self, now: float) -> None:
        self.budget = _Budget(TRUSTED_AUTH_VERIFY_RATE, now)
        self.last_good = now


class PacketAuthenticator:
    def __init__(
        self,
        stream_keys: Mapping[int, bytes],
        rejected: Counter[str],
        *,
        now: float,
        check: SignatureCheck = check_signature,
    ) -> None:
        self.keys = dict(stream_keys)
        self.rejected = rejected
        self.check = check
        self.stats = AuthStats()
        self._admitted: OrderedDict[bytes, None] = OrderedDict()
        self._held: OrderedDict[bytes, bytes] = OrderedDict()
        self._held_bytes = 0
        self._pages: OrderedDict[PageId, bytes] = OrderedDict()  # accepted page -> its link
        self._links: OrderedDict[PageId, bytes] = OrderedDict()
        self._strangers = _Budget(UNTRUSTED_AUTH_VERIFY_RATE, now)
        self._everyone = _Budget(MAX_AUTH_VERIFY_RATE, now)
        self._trusted: OrderedDict[str, _Trusted] = OrderedDict()

    # --- DATA --------------------------------------------------------------------------------

    def admit(self, data: bytes) -> bool:
        """Whether `data` (a well-formed DATA datagram of this session) may be decoded now.

        If not, it is held until its page is accepted, when `on_auth` returns it."""
        digest = wire.packet_digest(data)
        if digest in self._admitted:
            self.stats.datagrams_admitted += 1
            return True
        if digest in self._held:
            self.rejected["unauthenticated-repeat"] += 1
            return False
        self._held[digest] = data
        self._held_bytes += len(data)
        while self._held_bytes > MAX_AUTH_HELD_BYTES:
            _, dropped = self._held.popitem(last=False)
            self._held_bytes -= len(dropped)
            self.rejected["unauthenticated"] += 1
        return False

    # --- AUTH --------------------------------------------------------------------------------

    def on_auth(
        self, packet: wire.AuthPacket, datagram: bytes, source: str, now: float
    ) -> list[bytes]:
        """Check one AUTH page (of this session: the core checked); the held datagrams it admits."""
        public = self.keys.get(packet.sender)
        if public is None:
            self.rejected["auth-unknown-sender"] += 1
            return []
        page: PageId = (packet.sender, packet.chunk, packet.page)
        content = wire.auth_link(datagram)
        accepted = self._pages.get(page)
        if accepted is not None:
            if content == accepted:  # another copy: its data may come round again
                self.stats.pages_repeated += 1
                return self._admit_digests(packet)
            expected: bytes | None = accepted
        else:
            expected = self._links.get(page)
        if expected is not None and content == expected:
            self.stats.pages_linked += 1
            self._vouch(source, now)
        elif expected is not None and source not in self._trusted:
            # Not the page the chain (or an earlier copy) vouched for.  Only a trusted source
            # (a sender restarted with other settings) is worth a verification here.
            self.rejected["auth-forged"] += 1
            return []
        elif not self._verify(packet, datagram, public, source, now):
            return []
        return self._accept(page, content, packet)

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

    def _accept(self, page: PageId, content: bytes, packet: wire.AuthPacket) -> list[bytes]:
        _remember(self._pages, page, content, MAX_AUTH_PAGES)
        self._links.pop(page, None)
        if packet.link != wire.NO_LINK:
            sender, chunk, index = page
            _remember(self._links, (sender, chunk, index + 1), packet.link, MAX_AUTH_LINKS)
        return self._admit_digests(packet)

    def _admit_digests(self, packet: wire.AuthPacket) -> list[bytes]:
        released = []
        for digest in packet.digest_list():
            _remember(self._admitted, digest, None, MAX_AUTH_DIGESTS)
            data = self._held.pop(digest, None)
            if data is not None:
                self._held_bytes -= len(data)
                released.append(data)
        self.stats.datagrams_released += len(released)
        return released


def _remember(table: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)
