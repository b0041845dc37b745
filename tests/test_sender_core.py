"""The sans-IO sender core, driven with an injected clock: the order of visits and rounds,
sender offsets, the wall-clock phase, pacing and manifest repetition."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacast.schemas.limits import ANNOUNCE_INTERVAL, MAX_ANNOUNCE_BURST, MAX_ANNOUNCE_RATE
from otacast.signer.schedule import (
    AUTH_COPIES,
    Announcer,
    Finished,
    SendAuth,
    SenderCore,
    SendManifest,
    SendSymbols,
    Wait,
    manifest_interval,
)

D = 1228
MANIFEST = (b"m" * 600, b"n" * 300)


def core(cycles: list[int], sources: list[int] | None = None, **kw: object) -> SenderCore:
    options: dict[str, object] = {
        "visit": 10,
        "datagram_size": D,
        "batch": 8,
        "rate": 0.0,
        "manifest": MANIFEST,
        "now": 0.0,
    }
    options.update(kw)
    return SenderCore(cycles, sources or cycles, **options)  # type: ignore[arg-type]


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


def visits(sent: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(chunk, first ESI) of each run of consecutive symbols of one chunk."""
    out: list[tuple[int, int]] = []
    for (chunk, esi), previous in zip(sent, [None, *sent], strict=False):
        if previous != (chunk, esi - 1):
            out.append((chunk, esi))
    return out


def test_a_round_visits_every_chunk_once_in_chunk_order() -> None:
    sent = symbols(run(core([40, 40, 40], passes=1)))
    # visit 10, batch 8: chunk 0's ESIs 0-9, chunk 1's 0-9, chunk 2's 0-9, then ESIs 10-19 ...
    assert visits(sent)[:6] == [(0, 0), (1, 0), (2, 0), (0, 10), (1, 10), (2, 10)]
    assert [ch for ch, _ in sent[:30]] == [0] * 10 + [1] * 10 + [2] * 10


def test_a_pass_sends_every_chunks_source_symbols_and_no_more_than_a_visit_beyond() -> None:
    cycles, sources = [60, 45, 18], [40, 30, 12]
    c = core(cycles, sources, passes=1)
    sent = symbols(run(c))
    per_chunk = Counter(ch for ch, _ in sent)
    # A pass is ceil(max K / visit) = 4 rounds: 40 symbols of each chunk; the short one's cycle
    # (18: visits of 10 and 8) goes round twice.
    assert per_chunk == {0: 40, 1: 40, 2: 36}
    assert c.stats.passes == 1 and c.stats.data_packets == 116
    assert set(range(40)) == {e for ch, e in sent if ch == 0}
    assert set(range(18)) == {e for ch, e in sent if ch == 2}  # its whole cycle, then again


def test_source_symbols_come_first_then_the_repair_pool_then_the_cycle_wraps() -> None:
    sent = [e for _, e in symbols(run(core([25], [20], passes=3)))]
    # Visits of 10 over a 25-symbol cycle: 0-9, 10-19, 20-24, then 0-9 again ...
    assert sent[:25] == list(range(25))
    assert sent[25:35] == list(range(10))


def test_batches_never_cross_a_visit_or_the_end_of_a_cycle() -> None:
    for _, a in run(core([13, 27], [13, 27], batch=4, passes=4)):  # type: ignore[misc]
        if isinstance(a, SendSymbols):
            assert a.first + a.count <= [13, 27][a.chunk]
            assert a.first // 10 == (a.first + a.count - 1) // 10


@given(st.integers(2, 6), st.lists(st.integers(20, 400), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None)
def test_senders_i_of_n_stay_a_cycle_over_n_apart_in_every_round(n: int, cycles: list[int]) -> None:
    cores = [core(cycles, sender_index=i, sender_count=n) for i in range(n)]
    for chunk, cycle in enumerate(cycles):
        m = -(-cycle // 10)
        for r in range(3 * m):
            got = [c.visit_of(chunk, r) for c in cores]
            assert got == [(i * m // n + r) % m for i in range(n)]
    # So when each sender sends cycle/n symbols of every chunk (whole visits: chunks of one
    # size), none sends what another sends.
    whole = [10 * n * -(-max(cycles) // (10 * n))] * len(cycles)
    sent = [
        set(
            symbols(
                run(core(whole, [x // n for x in whole], sender_index=i, sender_count=n, passes=1))
            )
        )
        for i in range(n)
    ]
    for i, j in itertools.combinations(range(n), 2):
        assert not sent[i] & sent[j]


def test_each_sender_alone_still_covers_the_whole_cycle() -> None:
    c = core([40], sender_index=1, sender_count=2, passes=1)
    assert sorted(e for _, e in symbols(run(c))) == list(range(40))


RATE = 1_000_000.0


def _first_visits(
    start: float, wall_at_start: float, rounds: int = 3
) -> list[tuple[float, int, int]]:
    """(wall time, chunk, first ESI) of the visits of a paced core started at `start`."""
    c = core([400] * 4, [200] * 4, rate=RATE, now=start, wall=wall_at_start, duration=10.0)
    out = []
    for t, a in run(c, start=start, limit=10**6):  # type: ignore[misc]
        if isinstance(a, SendSymbols) and a.first % 10 == 0:
            out.append((t - start + wall_at_start, a.chunk, a.first))
        if len(out) == rounds * 4:
            break
    return out


def test_the_phase_is_the_wall_clocks_not_the_senders_start() -> None:
    wall = 1_800_000_000.0
    early = _first_visits(0.0, wall, rounds=40)
    c = core([400] * 4, [200] * 4, rate=RATE, now=0.0, wall=wall)
    assert c.round_seconds is not None
    # Started 5.3 rounds later (on another host, with another monotonic clock), a sender sends
    # the same visits at about the same wall time as one that has been running all along.
    late = _first_visits(123.0, wall + 5.3 * c.round_seconds)
    by_visit = {(ch, e): t for t, ch, e in early}
    matched = [(t, by_visit.get((ch, e))) for t, ch, e in late]
    assert all(t0 is not None for _, t0 in matched), (late, early)
    for t, t0 in matched:
        assert t0 is not None and abs(t - t0) < c.round_seconds / 4


def test_a_sender_behind_its_phase_sends_every_visit_in_turn() -> None:
    c = core([400] * 4, [200] * 4, rate=RATE, now=0.0, wall=0.0)
    assert c.round_seconds is not None
    assert c.next_action(0.0) == SendManifest(MANIFEST, 900)
    # Stalled (a slow disk) for ten rounds: skipping ahead to the clock's round would leave
    # visits unsent and wrap the cycle sooner, so the order goes on where it was.
    now = 10 * c.round_seconds
    got: list[tuple[int, int]] = []
    while len(got) < 8 * 4:
        a = c.next_action(now)
        if isinstance(a, Wait):
            now = a.until
        elif isinstance(a, SendSymbols) and a.first % 10 == 0:
            got.append((a.chunk, a.first))
    assert got == [(ch, 10 * r) for r in range(8) for ch in range(4)]


def test_an_unpaced_sender_has_no_phase() -> None:
    c = core([40], rate=0.0, wall=1_800_000_123.4)
    assert c.round_seconds is None
    assert symbols(run(core([40], rate=0.0, wall=1_800_000_123.4, passes=1)))[0] == (0, 0)


@pytest.mark.parametrize("rate", [1_000_000.0, 12_500_000.0, 50_000_000.0])
def test_paced_rate_is_exact_over_a_second(rate: float) -> None:
    c = core([10_000] * 20, visit=112, batch=53, rate=rate, duration=1.0)
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
    # Every 0.125 s at 10 MB/s: half of a receiver's 2.5 MB of early data between two copies.
    assert len(times) == 16
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.14


def test_manifest_interval_fits_the_early_data_and_caps_the_manifests_share() -> None:
    small = 10_000_000  # a 10 MB image: the balanced interval is shorter than these
    assert manifest_interval(1_000_000, 10_000_000, small) == pytest.approx(2.0)  # 5% of the rate
    assert manifest_interval(2_000, 1_000_000, small) == 0.25  # at least four times a second
    assert manifest_interval(20_000, 10_000_000, small) == pytest.approx(0.125)
    assert manifest_interval(20_000, 100_000_000, small) == pytest.approx(0.0125)
    assert manifest_interval(2_000, 1_000_000_000, small) == 0.01  # at most 100 times a second
    assert manifest_interval(20_000, 0, small) == 0.25


def test_a_large_images_manifest_takes_a_fifth_of_a_percent_of_the_airtime() -> None:
    # A 4 GB image: ~477 chunk hashes in a ~35 kB manifest, 3.3 M source datagrams.
    manifest, data, rate = 35_000, 4_066_000_000, 110_000_000
    interval = manifest_interval(manifest, rate, data)
    share = manifest / (rate * interval)
    assert 0.0019 < share < 0.0022  # the early-data rule alone gave 2.8%
    assert interval == pytest.approx(0.153, abs=0.001)

    def cost(every: float) -> float:
        """Seconds a receiver spends on manifests over the download, plus a joiner's wait."""
        return manifest / (rate * every) * data / rate + every / 2

    assert cost(interval) < min(cost(interval * 0.8), cost(interval * 1.25))
    # On a slower channel it is still sent four times a second, as any manifest is ...
    assert manifest_interval(manifest, 10_000_000, data) == 0.25
    # ... unless that would take more than 5% of the rate.
    assert manifest_interval(manifest, 500_000, data) == pytest.approx(1.4)


def test_a_large_carousel_repeats_its_manifest_at_the_balanced_interval() -> None:
    big_manifest = tuple(b"m" * 1200 for _ in range(30))
    rate = 110_000_000.0
    c = core([10_416] * 477, [6944] * 477, visit=112, batch=53, rate=rate, manifest=big_manifest)
    assert c.manifest_interval == pytest.approx(manifest_interval(36_000, rate, 477 * 6944 * D))
    assert c.manifest_interval > 0.1


def test_the_manifest_is_repeated_at_its_interval_on_average_not_a_batch_later_each_time() -> None:
    # Each copy was due while a data batch went out: counted from when it went (0.5% late at
    # 2 MB/s here), the manifest got less airtime than the round length counts on, and the
    # data ran ahead of the wall clock's phase, away from other senders'.
    manifest = tuple(b"m" * 1200 for _ in range(30))
    c = core([200] * 8, [112] * 8, visit=112, rate=2_000_000.0, manifest=manifest, duration=60.0)
    starts, left = [], 0
    for now, action in run(c, limit=10**6):  # type: ignore[misc]
        if isinstance(action, SendManifest):
            if not left:
                starts.append(now)
                left = len(manifest)
            left -= len(action.datagrams)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert sum(gaps) / len(gaps) == pytest.approx(c.manifest_interval, rel=1e-4)
    assert max(gaps) < c.manifest_interval + 0.005  # (one burst of the rate late at most)


def test_after_a_pause_the_manifest_is_sent_once_not_twice_in_a_row() -> None:
    c = core([10_000] * 4, batch=53, rate=10_000_000.0)
    assert isinstance(c.next_action(0.0), SendManifest)
    c.next_action(0.0)  # data
    later = [c.next_action(50.0) for _ in range(3)]  # the sender was stopped for 50 s
    assert [type(a) for a in later] == [SendManifest, SendSymbols, SendSymbols]


def test_duration_and_passes_end_the_run() -> None:
    assert isinstance(run(core([50], passes=2))[-1][1], Finished)
    c = core([10**6], rate=1_000_000.0, duration=0.3)
    last_time, last = run(c, limit=10**6)[-1]  # type: ignore[misc]
    assert isinstance(last, Finished) and last.reason == "duration"
    assert last_time == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize(
    "options",
    [
        {"sender_index": 2, "sender_count": 2},
        {"visit": 0},
        {"visit": 10, "auth_capacity": 12},
    ],
)
def test_invalid_settings_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        core([10], **options)


def test_a_cycle_shorter_than_its_source_symbols_is_refused() -> None:
    with pytest.raises(ValueError):
        core([10], [11])


def test_auth_pages_come_just_before_the_data_they_vouch_for_and_change_nothing_else() -> None:
    cycles, sources, capacity = [300, 250, 90], [200, 200, 60], 50
    plain = run(core(cycles, sources, visit=capacity, passes=3))
    authed = run(core(cycles, sources, visit=capacity, passes=3, auth_capacity=capacity))
    assert [a for _, a in authed if not isinstance(a, SendAuth)] == [a for _, a in plain]
    announced: set[tuple[int, int]] = set()
    for (_, action), (_, following) in itertools.pairwise(authed):  # type: ignore[misc]
        if isinstance(action, SendAuth):
            assert action.copies == AUTH_COPIES
            assert isinstance(following, SendSymbols) and following.chunk == action.chunk
            # A visit is one page: the page announced is the one the visit's data lies in.
            assert action.pages == (following.first // capacity,)
            announced |= {(action.chunk, p) for p in action.pages}
        if isinstance(following, SendSymbols):
            last = following.first + following.count - 1
            needed = range(following.first // capacity, last // capacity + 1)
            assert {(following.chunk, p) for p in needed} <= announced
    # Every page of every chunk is announced, once per visit of its data.
    counts = Counter((a.chunk, p) for _, a in authed if isinstance(a, SendAuth) for p in a.pages)  # type: ignore[misc]
    assert set(counts) == {(ch, p) for ch, n in enumerate(cycles) for p in range(-(-n // 50))}


def test_announced_data_follows_its_pages_even_when_the_time_is_up() -> None:
    c = core([400], passes=None, duration=1.0, visit=50, auth_capacity=50)
    assert isinstance(c.next_action(0.0), SendManifest)
    assert isinstance(c.next_action(0.0), SendAuth)
    assert isinstance(c.next_action(5.0), SendSymbols)  # already paced and counted
    assert isinstance(c.next_action(5.0), Finished)


@pytest.mark.parametrize("sender", [(0, 1), (1, 2), (5, 6), (9, 10)])
def test_one_pass_gives_every_chunk_k_symbols_even_across_its_short_last_visit(
    sender: tuple[int, int],
) -> None:
    # K = 87 and a cycle of 435 (a 400% pool) in visits of 10: the cycle's last visit holds 5
    # symbols.  ceil(K / visit) = 9 visits starting just before it carry 8 * 10 + 5 = 85 < K;
    # a pass must be long enough wherever a sender's visits start (the sender at 1/2 of the
    # integration test once sent one chunk 842 of its 869 symbols in a pass).
    index, count = sender
    c = core([435, 435, 430], [87, 87, 86], passes=1, sender_index=index, sender_count=count)
    sent = symbols(run(c))
    for chunk, k in enumerate([87, 87, 86]):
        assert len({esi for ch, esi in sent if ch == chunk}) >= k


# --- Announcements on the ASM group (zero-config on a LAN) -----------------------------------


def _announced(announcer: Announcer, seconds: float, step: float = 0.01) -> list[tuple[float, int]]:
    """(time, datagrams) of every send over `seconds`, driven as the serve loop does."""
    sends = []
    for tick in range(int(seconds / step) + 1):
        now = tick * step
        if now >= announcer.next_at:
            out = announcer.due(now)
            if out:
                sends.append((now, len(out)))
    return sends


def test_a_small_manifest_is_announced_whole_in_one_burst_every_interval() -> None:
    fragments = [bytes([i]) * 1200 for i in range(3)]
    announcer = Announcer(fragments, 0.0)
    assert announcer.interval == ANNOUNCE_INTERVAL
    sends = _announced(announcer, 9.0)
    assert [n for _, n in sends] == [3] * 5
    assert [round(t, 2) for t, _ in sends] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert announcer.stats.datagrams == 15 and announcer.stats.bytes == 15 * 1200
    assert announcer.datagram_rate == pytest.approx(1.5)


def test_a_large_manifest_is_announced_at_the_bounded_rate_and_every_copy_whole() -> None:
    fragments = [i.to_bytes(4, "big") for i in range(200)]
    announcer = Announcer(fragments, 0.0)
    assert announcer.interval == pytest.approx(200 / MAX_ANNOUNCE_RATE)
    sends = _announced(announcer, 20.0)
    assert max(n for _, n in sends) <= MAX_ANNOUNCE_BURST
    # Over any second: at most a burst plus a second's rate.
    for start in range(19):
        inside = sum(n for t, n in sends if start <= t < start + 1)
        assert inside <= MAX_ANNOUNCE_BURST + MAX_ANNOUNCE_RATE
    assert announcer.stats.datagrams <= MAX_ANNOUNCE_BURST + 20 * MAX_ANNOUNCE_RATE
    assert announcer.stats.datagrams >= 2 * len(fragments)  # two whole copies went out
    assert announcer.datagram_rate <= MAX_ANNOUNCE_RATE


def test_an_announcer_needs_fragments_and_positive_bounds() -> None:
    with pytest.raises(ValueError):
        Announcer([], 0.0)
    with pytest.raises(ValueError):
        Announcer([b"x"], 0.0, rate=0)
