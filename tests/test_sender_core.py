"""The sans-IO sender core, driven with an injected clock: schedule, interleaving, pacing,
sender offsets and manifest repetition."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacast.signer.schedule import (
    AUTH_COPIES,
    Finished,
    SendAuth,
    SenderCore,
    SendManifest,
    SendSymbols,
    Wait,
    manifest_interval,
    per_pass,
)

D = 1228
MANIFEST = (b"m" * 600, b"n" * 300)


def core(cycles: list[int], sends: list[int] | None = None, **kw: object) -> SenderCore:
    options: dict[str, object] = {
        "datagram_size": D,
        "batch": 8,
        "window": 2,
        "rate": 0.0,
        "manifest": MANIFEST,
        "now": 0.0,
    }
    options.update(kw)
    # No overhead: a pass sends exactly `sends` symbols of each chunk (per_pass caps at the cycle).
    return SenderCore(cycles, sends or cycles, overhead=0.0, **options)  # type: ignore[arg-type]


def run(c: SenderCore, limit: int = 100_000, start: float = 0.0) -> list[object]:
    """Drive the core like a driver would: sleep until each Wait, stop at Finished."""
    now, actions = start, []
    for _ in range(limit):
        action = c.next_action(now)
        if isinstance(action, Wait):
            assert action.until > now
            now = action.until
            continue
        actions.append((now, action))
        if isinstance(action, Finished):
            break
    return actions


def symbols(actions: list[object]) -> list[tuple[int, int]]:
    out = []
    for _, a in actions:  # type: ignore[misc]
        if isinstance(a, SendSymbols):
            out += [(a.chunk, a.first + i) for i in range(a.count)]
    return out


def test_one_pass_sends_every_symbol_of_every_chunk_once() -> None:
    c = core([30, 45, 12], passes=1)
    sent = symbols(run(c))
    assert Counter(sent) == Counter((ch, e) for ch, n in enumerate([30, 45, 12]) for e in range(n))
    assert c.stats.passes == 1
    assert c.stats.data_packets == 87


def test_a_pass_sends_source_symbols_first_then_repair() -> None:
    sent = [e for ch, e in symbols(run(core([20], [14], passes=1))) if ch == 0]
    assert sent == list(range(14))


def test_later_passes_walk_on_through_the_repair_pool() -> None:
    sent = [e for _, e in symbols(run(core([15], [10], passes=3)))]
    assert sent[:10] == list(range(10))
    assert sent[10:20] == [10, 11, 12, 13, 14, 0, 1, 2, 3, 4]
    assert sent[20:] == list(range(5, 15))


def test_chunks_of_a_window_are_interleaved_in_batches() -> None:
    sent = symbols(run(core([20, 20, 20], window=2, batch=8, passes=1)))
    order = [ch for ch, _ in sent]
    # window {0, 1}: 8 of chunk 0, 8 of chunk 1, 8 of 0, 8 of 1, then the last 4 of each.
    assert order[:40] == [0] * 8 + [1] * 8 + [0] * 8 + [1] * 8 + [0] * 4 + [1] * 4
    assert order[40:] == [2] * 20  # the next window (2 windows for 3 chunks: sizes 2 and 1)


def test_batches_never_wrap_past_the_end_of_a_cycle() -> None:
    for _, a in run(core([13], [13], batch=5, passes=4)):  # type: ignore[misc]
        if isinstance(a, SendSymbols):
            assert a.first + a.count <= 13


@given(st.integers(2, 6), st.lists(st.integers(20, 400), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None)
def test_senders_i_of_n_start_at_disjoint_points_of_the_cycle(n: int, cycles: list[int]) -> None:
    # Each sender's first cycle/n symbols of every chunk are disjoint from every other sender's.
    firsts = []
    for i in range(n):
        c = core(cycles, [x // n for x in cycles], sender_index=i, sender_count=n, passes=1)
        firsts.append(set(symbols(run(c))))
    for i in range(n):
        for j in range(i + 1, n):
            assert not firsts[i] & firsts[j]


def test_each_sender_alone_still_covers_the_whole_cycle() -> None:
    c = core([40], sender_index=1, sender_count=2, passes=1)
    assert sorted(e for _, e in symbols(run(c))) == list(range(40))


@pytest.mark.parametrize("rate", [1_000_000.0, 12_500_000.0, 50_000_000.0])
def test_paced_rate_is_exact_over_a_second(rate: float) -> None:
    c = core([10_000] * 20, window=4, batch=53, rate=rate, duration=1.0)
    actions = run(c, limit=10**6)
    assert isinstance(actions[-1][1], Finished)
    sent = sum(a.nbytes for t, a in actions if isinstance(a, SendSymbols | SendManifest))  # type: ignore[misc]
    assert sent == pytest.approx(rate, rel=0.01)


def test_pacing_never_bursts_more_than_a_few_milliseconds() -> None:
    rate = 10_000_000.0
    actions = run(core([10_000] * 4, batch=53, rate=rate, duration=0.5), limit=10**6)
    times = [(t, a.nbytes) for t, a in actions if isinstance(a, SendSymbols)]  # type: ignore[misc]
    for k in range(len(times) - 20):
        t0 = times[k][0]
        window_bytes = sum(b for t, b in times[k:] if t < t0 + 0.01)
        assert window_bytes <= rate * 0.01 + rate * 0.005 + 53 * D


def test_manifest_is_sent_first_and_repeated_several_times_a_second() -> None:
    actions = run(core([10_000] * 4, batch=53, rate=10_000_000.0, duration=2.0), limit=10**6)
    first = actions[0][1]
    assert isinstance(first, SendManifest) and first.datagrams == MANIFEST
    times = [t for t, a in actions if isinstance(a, SendManifest)]  # type: ignore[misc]
    assert len(times) == 8  # every 0.25 s for 2 s
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.3


def test_manifest_share_is_capped_for_a_large_manifest() -> None:
    assert manifest_interval(1_000_000, 10_000_000) == pytest.approx(2.0)
    assert manifest_interval(20_000, 10_000_000) == 0.25
    assert manifest_interval(20_000, 0) == 0.25


def test_duration_and_passes_end_the_run() -> None:
    assert isinstance(run(core([50], passes=2))[-1][1], Finished)
    c = core([10**6], rate=1_000_000.0, duration=0.3)
    last_time, last = run(c, limit=10**6)[-1]  # type: ignore[misc]
    assert isinstance(last, Finished) and last.reason == "duration"
    assert last_time == pytest.approx(0.3, abs=0.01)


def test_per_pass_adds_the_overhead_but_never_exceeds_the_cycle() -> None:
    assert per_pass(1000, 1500, 0.1) == 1100
    assert per_pass(1000, 1050, 0.1) == 1050


def test_invalid_sender_index_is_refused() -> None:
    with pytest.raises(ValueError):
        core([10], sender_index=2, sender_count=2)


def test_concurrent_senders_start_in_different_windows() -> None:
    # Ten chunks with a window of 8 become two windows of 5; sender 1/2 starts at the second.
    cycles = [40] * 10
    first_chunks = []
    for i in range(2):
        c = core(cycles, window=8, batch=8, sender_index=i, sender_count=2, passes=1)
        sent = symbols(run(c))
        first_chunks.append(sent[0][0])
        assert sorted(sent) == sorted((ch, e) for ch in range(10) for e in range(40))
    assert first_chunks == [0, 5]


def test_a_short_last_chunk_does_not_pull_the_second_sender_into_the_first_window() -> None:
    cycles = [40] * 9 + [10]  # the last chunk is short, so half the pass lies in window 0
    c = core(cycles, window=8, batch=8, sender_index=1, sender_count=2, passes=1)
    assert [w.start for w in c.windows] == [5, 0]


def test_the_default_window_shrinks_with_more_than_two_senders() -> None:
    # Receivers hold decoders for two windows; each sender starts at its own window.
    from otacast.signer.channels import default_window

    mib = 1024 * 1024
    assert [default_window(mib, n) for n in (1, 2, 3, 4, 8, 32)] == [8, 8, 5, 4, 2, 1]


def test_the_core_applies_the_overhead_to_each_chunks_source_symbols() -> None:
    c = SenderCore([1500, 1050], [1000, 1000], overhead=0.1, **_plain())
    assert c.sends == (1100, 1050)


def _plain() -> dict[str, object]:
    return {"datagram_size": D, "batch": 8, "window": 2, "rate": 0.0, "manifest": (), "now": 0.0}


def test_auth_pages_come_just_before_the_data_they_vouch_for_and_change_nothing_else() -> None:
    cycles, capacity = [300, 250, 90], 50
    plain = run(core(cycles, [200, 200, 60], passes=3))
    authed = run(core(cycles, [200, 200, 60], passes=3, auth_capacity=capacity))
    assert [a for _, a in authed if not isinstance(a, SendAuth)] == [a for _, a in plain]
    announced: set[tuple[int, int]] = set()
    for (_, action), (_, following) in itertools.pairwise(authed):  # type: ignore[misc]
        if isinstance(action, SendAuth):
            assert action.copies == AUTH_COPIES
            assert isinstance(following, SendSymbols) and following.chunk == action.chunk
            announced |= {(action.chunk, p) for p in action.pages}
        if isinstance(following, SendSymbols):
            last = following.first + following.count - 1
            needed = range(following.first // capacity, last // capacity + 1)
            assert {(following.chunk, p) for p in needed} <= announced
    # Every page of every chunk is announced.
    counts = Counter((a.chunk, p) for _, a in authed if isinstance(a, SendAuth) for p in a.pages)  # type: ignore[misc]
    assert set(counts) == {(ch, p) for ch, n in enumerate(cycles) for p in range(-(-n // 50))}


def test_announced_data_follows_its_pages_even_when_the_time_is_up() -> None:
    c = core([400], passes=None, duration=1.0, auth_capacity=50)
    assert isinstance(c.next_action(0.0), SendManifest)
    assert isinstance(c.next_action(0.0), SendAuth)
    assert isinstance(c.next_action(5.0), SendSymbols)  # already paced and counted
    assert isinstance(c.next_action(5.0), Finished)
