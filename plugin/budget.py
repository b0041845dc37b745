"""Rate budgets for work an attacker can make the receiver do: token buckets, and who may cost
a manifest verification.

A `TokenBucket` refills at ``rate`` tokens per second up to ``burst`` and is driven by the
caller's ``now`` (the core's monotonic clock), so tests pass plain numbers.

`ManifestBudget` decides whether the receiver core may verify a reassembled manifest from a
source address now.  Every source has its own allowance (``MANIFEST_VERIFY_RATE_PER_SOURCE``);
a source that has not sent a genuinely signed manifest must also draw on one allowance shared
by all such sources (``MANIFEST_VERIFY_RATE_UNSIGNED``).  A source becomes *signed* when an
envelope from it passes the signature check (even if the update rules then refuse it, as they
do the installed release that `watch` hears all the time) and unsigned again when one fails it.
So a flood of forged manifests from one host or many costs at most the shared allowance, one
host can take only its own share of that, and a sender whose signed manifest has been heard
keeps its own allowance whatever the flood: its next release gets through.  An attacker who
spoofs that sender's address can spend its allowance (and make it unsigned with one forgery);
see docs/SECURITY.md.  A refused verification is the caller's to count (``manifest-budget``);
honest senders repeat their manifest several times a second, so one refused copy only delays.
"""

from __future__ import annotations

from collections import OrderedDict

from otacast.schemas.limits import (
    MANIFEST_VERIFY_BURST_PER_SOURCE,
    MANIFEST_VERIFY_BURST_UNSIGNED,
    MANIFEST_VERIFY_RATE_PER_SOURCE,
    MANIFEST_VERIFY_RATE_UNSIGNED,
    MAX_MANIFEST_SOURCES,
)


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one (time never runs backwards here)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = max(self.last, now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _Source:
    __slots__ = ("bucket", "signed")

    def __init__(self, now: float) -> None:
        self.bucket = TokenBucket(
            MANIFEST_VERIFY_RATE_PER_SOURCE, MANIFEST_VERIFY_BURST_PER_SOURCE, now
        )
        self.signed = False


class ManifestBudget:
    def __init__(self, now: float) -> None:
        self._unsigned = TokenBucket(
            MANIFEST_VERIFY_RATE_UNSIGNED, MANIFEST_VERIFY_BURST_UNSIGNED, now
        )
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def take(self, source: str, now: float) -> bool:
        """Whether a manifest from `source` may be verified now (spending its allowance)."""
        entry = self._sources.get(source)
        if entry is None:
            if len(self._sources) >= MAX_MANIFEST_SOURCES:
                self._forget_one()
            entry = self._sources[source] = _Source(now)
        else:
            self._sources.move_to_end(source)
        # Its own allowance first: a source that has spent it takes nothing from the others.
        if not entry.bucket.take(now):
            return False
        return entry.signed or self._unsigned.take(now)

    def signed(self, source: str) -> None:
        """An envelope from `source` (just verified) carried valid signatures."""
        entry = self._sources.get(source)
        if entry is not None:
            entry.signed = True

    def forged(self, source: str) -> None:
        """An envelope from `source` (just verified) failed before or at its signatures."""
        entry = self._sources.get(source)
        if entry is not None:
            entry.signed = False

    def _forget_one(self) -> None:
        """The least recently heard unsigned source, else the least recently heard one."""
        for source, entry in self._sources.items():
            if not entry.signed:
                del self._sources[source]
                return
        self._sources.popitem(last=False)
