"""The receiver's rate budgets (`otacast.plugin.budget`), driven by plain ``now`` values."""

from __future__ import annotations

from otacast.plugin.budget import ManifestBudget, TokenBucket
from otacast.schemas.limits import (
    MANIFEST_VERIFY_BURST_PER_SOURCE,
    MANIFEST_VERIFY_BURST_UNSIGNED,
    MANIFEST_VERIFY_RATE_PER_SOURCE,
    MANIFEST_VERIFY_RATE_UNSIGNED,
    MAX_MANIFEST_SOURCES,
)


def takes(budget: ManifestBudget, source: str, now: float, tries: int) -> int:
    return sum(budget.take(source, now) for _ in range(tries))


def test_a_token_bucket_spends_its_burst_then_refills_at_its_rate_and_never_beyond() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(10.5) and not bucket.take(10.5)  # half a second: one token
    assert sum(bucket.take(1000.0) for _ in range(10)) == 3  # saved up to the burst only
    assert not bucket.take(999.0)  # an earlier `now` adds nothing


def test_one_source_gets_its_own_allowance_and_leaves_the_rest_of_the_shared_one() -> None:
    budget = ManifestBudget(now=0.0)
    assert takes(budget, "flood", 0.0, 100) == MANIFEST_VERIFY_BURST_PER_SOURCE
    # Ten seconds of flooding from the one host: its own rate, no more.
    spent = sum(takes(budget, "flood", t / 10, 100) for t in range(1, 101))
    assert spent <= MANIFEST_VERIFY_RATE_PER_SOURCE * 10 + 1
    # Another host that has never sent a signed manifest still gets verified.
    assert budget.take("newcomer", 10.0)


def test_many_unsigned_sources_share_one_allowance() -> None:
    budget = ManifestBudget(now=0.0)
    spent = sum(budget.take(f"fd00::{i:x}", i / 100) for i in range(1000))  # 10 s, 1000 hosts
    assert spent <= MANIFEST_VERIFY_BURST_UNSIGNED + MANIFEST_VERIFY_RATE_UNSIGNED * 10 + 1


def test_a_signed_source_keeps_its_allowance_through_a_flood_until_it_sends_a_forgery() -> None:
    budget = ManifestBudget(now=0.0)
    assert budget.take("sender", 0.0)
    budget.signed("sender")
    for i in range(1000):  # the shared allowance is spent
        budget.take(f"fd00::{i:x}", 1.0)
    assert not budget.take("stranger", 1.0)
    assert budget.take("sender", 1.0)  # its own allowance only
    budget.forged("sender")  # a spoofed forgery from its address: unsigned again
    for i in range(1000):
        budget.take(f"fd00::{i:x}", 3.0)
    assert not budget.take("sender", 3.0)  # it competes for the shared allowance now


def test_sources_are_bounded_and_unsigned_ones_are_forgotten_first() -> None:
    budget = ManifestBudget(now=0.0)
    budget.take("sender", 0.0)
    budget.signed("sender")
    for i in range(10 * MAX_MANIFEST_SOURCES):
        budget.take(f"fd00::{i:x}", 0.0)
    assert len(budget._sources) == MAX_MANIFEST_SOURCES
    assert budget._sources["sender"].signed
