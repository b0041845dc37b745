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
claim it cost one SHA-256 each.

*Budgets.*  A page that is not linked costs one Ed25519 verification (~60 us).  Verifications
are rationed by source address: a source that has sent a valid page has its own allowance
(``TRUSTED_AUTH_VERIFY_RATE``); every other source shares one small allowance
(``UNTRUSTED_AUTH_VERIFY_RATE``).  A flood of forged pages from other hosts therefore costs
little CPU and cannot crowd out the honest sender once one of its pages has been accepted.  An
attacker who spoofs the honest sender's source address can still spend that sender's
allowance; see docs/SECURITY.md.

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


class PacketAuthenticator:
    def __init__(
        self,
        session: bytes,
        stream_keys: Mapping[int, bytes],
        rejected: Counter[str],
        *,
        now: float,
        check: SignatureCheck = check_signature,
    ) -> None:
        self.session = session
        self.keys = dict(stream_keys)
        self.rejected = rejected
        self.check = check
        self.stats = AuthStats()
        self._admitted: OrderedDict[bytes, None] = OrderedDict()
        self._held: OrderedDict[bytes, bytes] = OrderedDict()
        self._held_bytes = 0
        self._pages: OrderedDict[PageId, None] = OrderedDict()
        self._links: OrderedDict[PageId, bytes] = OrderedDict()
        self._strangers = _Budget(UNTRUSTED_AUTH_VERIFY_RATE, now)
        self._trusted: OrderedDict[str, _Budget] = OrderedDict()

    # --- DATA --------------------------------------------------------------------------------

    def admit(self, data: bytes) -> bool:
        """Whether `data` (a well-formed DATA datagram of this session) may be decoded now.

        If not, it is held until its page is accepted, when `accept_page` returns it."""
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
        """Check one AUTH page of this session; the held datagrams it admits."""
        public = self.keys.get(packet.sender)
        if public is None:
            self.rejected["auth-unknown-sender"] += 1
            return []
        page: PageId = (packet.sender, packet.chunk, packet.page)
        if page in self._pages:
            self.stats.pages_repeated += 1
            return []
        expected = self._links.get(page)
        if expected is not None:
            if wire.auth_link(datagram) != expected:
                self.rejected["auth-forged"] += 1
                return []
            self.stats.pages_linked += 1
        else:
            if not self._budget(source, now).take(now):
                self.rejected["auth-budget"] += 1
                return []
            if not self.check(public, wire.auth_signed_bytes(datagram), packet.signature):
                self.rejected["auth-forged"] += 1
                return []
            self.stats.pages_signed += 1
            self._trust(source, now)
        return self._accept(page, packet)

    def _budget(self, source: str, now: float) -> _Budget:
        budget = self._trusted.get(source)
        if budget is None:
            return self._strangers
        self._trusted.move_to_end(source)
        return budget

    def _trust(self, source: str, now: float) -> None:
        if source in self._trusted:
            return
        self._trusted[source] = _Budget(TRUSTED_AUTH_VERIFY_RATE, now)
        if len(self._trusted) > MAX_AUTH_SOURCES:
            self._trusted.popitem(last=False)

    def _accept(self, page: PageId, packet: wire.AuthPacket) -> list[bytes]:
        _remember(self._pages, page, None, MAX_AUTH_PAGES)
        self._links.pop(page, None)
        if packet.link != wire.NO_LINK:
            sender, chunk, index = page
            _remember(self._links, (sender, chunk, index + 1), packet.link, MAX_AUTH_LINKS)
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
