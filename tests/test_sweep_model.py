"""The abstract model of ``integration/sweep.py`` (issue 12's simulator sweep), checked.

The sweep drives the real `SenderCore` but models receivers as ESI bit sets, so that images of
gigabytes take seconds.  Here it is held to the real thing: its core is the one ``serve`` builds,
its store receiver counts what `tests.helpers.Link` (real cores, real RaptorQ, the durable
store) counts on the scaled-down release of ``test_link.py``, and its fast symbol-major engine
matches a per-datagram replay of the same order.  Then what the carousel achieves on the model
is asserted at a real image size.  Counts only, never times of the machine.
"""

from __future__ import annotations

import random

import pytest

from integration.sweep import (
    Image,
    Loss,
    LossBits,
    ReceiverPlan,
    SenderPlan,
    SymbolMajor,
    carousel_core,
    fold,
    nth_set_bit,
    run_carousel,
    run_symbol_major,
)

from .helpers import NOW, Link, RandomLoss, ReceiverSpec, SenderSpec, sender_core
from .test_link import RATE, SHAPE, release

MB = 1_000_000

# --- The model against serve and the Link --------------------------------------------------


def shape_image() -> Image:
    """``test_link.py``'s release as the model sees it."""
    return Image(SHAPE.chunks * SHAPE.chunk_size, SHAPE.chunk_size, SHAPE.symbol_size)


def link(senders: list[SenderSpec], receivers: list[ReceiverSpec]) -> Link:
    return Link(release(), senders, receivers, epoch=NOW)


def test_the_models_core_sends_what_serves_core_sends() -> None:
    image = shape_image()
    m = release().manifest
    assert image.sources == tuple(m.source_symbols(c) for c in range(m.chunk_count))
    fragments = link([], []).fragments
    for spec in (SenderSpec(rate=RATE), SenderSpec(index=1, count=2, rate=RATE, start=0.77)):
        real = sender_core(release(), link([], []).layout, spec, fragments=fragments, epoch=NOW)
        plan = SenderPlan(spec.index, spec.count, spec.start)
        model = carousel_core(image, plan, rate=RATE, passes=None, epoch=NOW, manifest=fragments)
        assert model.cycles == real.cycles and model.visit == real.visit
        assert model.batch == real.batch and model.round_seconds == real.round_seconds
        t = spec.start
        for _ in range(3000):  # a few passes, the manifest's copies and the waits included
            action = real.next_action(t)
            assert model.next_action(t) == action
            t = getattr(action, "until", t)


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_the_store_receiver_counts_what_the_link_counts(loss: float) -> None:
    image = shape_image()
    fragments = link([], []).fragments
    ratios = []
    for seed in range(3 if loss == 0 else 8):
        spec = ReceiverSpec(loss=RandomLoss(loss), seed=seed)
        (real,) = link([SenderSpec(rate=RATE)], [spec]).run().receivers
        (model,) = run_carousel(
            image,
            [SenderPlan()],
            [ReceiverPlan("store", Loss(loss), seed=seed)],
            rate=RATE,
            epoch=NOW,
            manifest=fragments,
        )
        print(f"{loss:.0%} seed {seed}: link {real.line()}")
        print(f"    model heard/ideal {model.heard_per_ideal:.3f} passes {model.passes:.2f}")
        assert real.complete_at is not None and model.complete_at is not None
        assert real.rejected == {}
        if loss == 0:
            # No loss: the same datagrams, and the store completes a chunk at its K source
            # symbols (hashed, not decoded).
            assert model.heard == real.heard
        ratios.append((model.heard_per_ideal, real.heard_per_ideal))
    if loss:
        # Different loss draws.  A receiver is done when its slowest chunk is, and every chunk
        # gains a whole visit (43 symbols here) per round, so one run can move by a round (258
        # datagrams, 3.4% of the ideal) with the draw, and a real decode that fails at K
        # symbols (the model assumes none does) waits a round for more: two rounds apart at
        # most.  Measured over seeds 0-9: model 1.012-1.045 (mean 1.024), Link 1.004-1.073
        # (mean 1.027; the 1.073: one chunk's decode needed a round more); three seeds were too
        # few for the means to agree within 2% with every draw.
        model_mean = sum(r[0] for r in ratios) / len(ratios)
        real_mean = sum(r[1] for r in ratios) / len(ratios)
        assert model_mean == pytest.approx(real_mean, rel=0.02)
        assert all(m == pytest.approx(r, rel=0.075) for m, r in ratios)


def test_two_senders_on_the_model_and_the_link_agree_when_the_second_starts_later() -> None:
    image = shape_image()
    fragments = link([], []).fragments
    senders = [SenderSpec(index=i, count=2, rate=RATE, start=0.3 * i) for i in range(2)]
    (real,) = link(senders, [ReceiverSpec()]).run().receivers
    (model,) = run_carousel(
        image,
        [SenderPlan(s.index, s.count, s.start) for s in senders],
        [ReceiverPlan("store", Loss(0.0))],
        rate=RATE,
        epoch=NOW,
        manifest=fragments,
    )
    # The same datagrams in the same order: the late sender took up the wall clock's phase.
    assert model.heard == real.heard
    assert model.passes == pytest.approx(max(real.sender_passes))


# --- The fast symbol-major engine against a per-datagram replay ----------------------------


def replay(order: SymbolMajor, join: float, rounds: int) -> tuple[int, float]:
    """(datagrams heard, completion time) of a loss-free receiver, one datagram at a time.

    Senders send a chunk's symbols of one round at the same instant: all of them count as
    heard when one of them completes the image."""
    have = [set[int]() for _ in range(order.image.chunks)]
    left = order.image.chunks
    heard = 0
    done_at = None
    for t, _, chunk, esi in order.datagrams(rounds):
        if t < join - 1e-12:
            continue
        if done_at is not None:
            if t > done_at:
                return heard, done_at
            heard += 1
            continue
        heard += 1
        if len(have[chunk]) < order.image.sources[chunk]:
            have[chunk].add(esi)
            if len(have[chunk]) == order.image.sources[chunk]:
                left -= 1
                if not left:
                    done_at = t
    raise AssertionError("not complete")


@pytest.mark.parametrize("starts", [(0.0,), (0.0, 0.0), (0.0, 0.037), (0.0, 0.011, 0.02, 0.09)])
def test_the_symbol_major_engine_matches_a_per_datagram_replay(starts: tuple[float, ...]) -> None:
    image = Image(6 * 65536 - 100, 65536, 256)  # six chunks, K = 256
    senders = tuple(SenderPlan(i, len(starts), s) for i, s in enumerate(starts))
    order = SymbolMajor(image, senders, RATE)
    for join in (0.0, 0.0123, 0.05):
        out = run_symbol_major(image, senders, ReceiverPlan("store", Loss(0.0), join), rate=RATE)
        heard, at = replay(order, join, rounds=3 * max(image.cycles))
        assert out.heard == heard
        assert out.complete_at == pytest.approx(at)
        assert out.received == out.heard


# --- Loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [Loss(0.05), Loss(0.2), Loss(0.2, burst=10)])
def test_loss_bits_have_the_mean_and_bursts_asked_for(loss: Loss) -> None:
    bits = LossBits(loss, random.Random(1))
    drawn = "".join(format(bits.take(1000), "01000b")[::-1] for _ in range(200))
    lost = drawn.count("1") / len(drawn)
    assert lost == pytest.approx(loss.mean, abs=0.01)
    runs = [len(r) for r in drawn.split("0") if r]
    mean_run = sum(runs) / len(runs)
    # Independent loss has runs of 1/(1-p); bursts have runs of `burst`.
    assert mean_run == pytest.approx(loss.burst or 1 / (1 - loss.mean), rel=0.15)


def test_bit_helpers() -> None:
    assert nth_set_bit(0b101100, 1) == 2 and nth_set_bit(0b101100, 3) == 5
    assert fold(0b1111, 4, 6, 8) == 0b11000011  # positions 6, 7, then 0, 1
    assert fold(0b111, 3, 0, 2) == 0b11  # wraps onto itself


# --- What the carousel achieves on the model, at 50 MB ---------------------------------------

SPAN = 50 * MB * 1228 / 1208 / 12_500_000  # one 50 MB image at one sender's rate, in seconds


def test_the_carousel_needs_the_store_not_a_decoder_budget() -> None:
    image = Image(50 * MB, 1 << 20)  # 48 chunks, 16 of which fit the decoder budget
    store, memory = run_carousel(
        image,
        [SenderPlan()],
        [ReceiverPlan(policy, Loss(0.2), 1.37 * SPAN, seed=3) for policy in ("store", "memory")],
    )
    print(f"heard/ideal at 20%: store {store.heard_per_ideal:.3f}, memory ", end="")
    print(f"{memory.heard_per_ideal:.3f}")
    assert store.complete_at is not None and memory.complete_at is not None
    # Every chunk is in progress at once: 16 decoders refuse the other 32 chunks' symbols, and
    # the memory receiver needs about three times the datagrams (measured 1.053 and 3.039).
    assert memory.decoders == 16 and memory.refused > 0 and store.refused == 0
    assert memory.heard_per_ideal > 2.5 * store.heard_per_ideal


def joins(count: int) -> list[ReceiverPlan]:
    """Receivers at 20% loss joining at `count` moments spread over one image's time (after
    any later sender started), each with its own loss draw."""
    return [ReceiverPlan("store", Loss(0.2), (1 + 0.137 * j) * SPAN, seed=j) for j in range(count)]


@pytest.mark.parametrize(
    ("chunk_size", "bound"), [(1 << 20, 1.14), (4 << 20, 1.045), (8 << 20, 1.03)]
)
def test_a_carousel_receiver_hears_the_ideal_plus_about_a_visit_per_chunk(
    chunk_size: int, bound: float
) -> None:
    image = Image(50 * MB, chunk_size)
    outs = run_carousel(image, [SenderPlan()], joins(8))
    ratios = [o.heard_per_ideal for o in outs]
    print(f"{chunk_size >> 20} MiB chunks, 20%: heard/ideal {min(ratios):.3f}-{max(ratios):.3f}")
    # Every chunk gains a whole visit (v = 112 symbols) per round, so the image is done in the
    # round its slowest chunk is, and every other chunk has had that round's visit too: about
    # K/(1-p) + 2.3 sigma + v per chunk at most (sigma = sqrt(K p)/(1-p), the spread of a
    # chunk's need over 48 or 12 chunks), 1 + 150/1086 with 1 MiB chunks (K = 869) and
    # 1 + 188/4341 with 4 MiB (K = 3473).  Measured: 1.050-1.113 and 1.024-1.029.
    assert all(o.complete_at is not None and o.refused == 0 for o in outs)
    assert max(ratios) < bound
    if chunk_size >= 4 << 20:
        # Issue 12's target, met on average with 4 MiB chunks and in every run with 8 MiB (the
        # default, DEFAULT_CHUNK_BYTES).
        assert sum(ratios) / len(ratios) < 1.03


@pytest.mark.parametrize(
    ("chunk_size", "bound"), [(1 << 20, 0.56), (4 << 20, 0.52), (8 << 20, 0.52)]
)
def test_a_second_sender_started_later_halves_the_time_of_a_receiver_joining_after_both(
    chunk_size: int, bound: float
) -> None:
    image = Image(50 * MB, chunk_size)
    plans = joins(4)
    alone = run_carousel(image, [SenderPlan()], plans)
    ratios = []
    for start in (0.13, 0.77):  # the second sender's start, in images' time
        two = run_carousel(image, [SenderPlan(0, 2), SenderPlan(1, 2, start * SPAN)], plans)
        for a, b in zip(alone, two, strict=True):
            assert a.receiving_time is not None and b.receiving_time is not None
            ratios.append(b.receiving_time / a.receiving_time)
    print(f"{chunk_size >> 20} MiB chunks: two senders / one {min(ratios):.3f}-{max(ratios):.3f}")
    # The phase is the wall clock's, so the senders stay half a cycle apart and their visits
    # are disjoint whenever the second started.  A receiver then gains two visits a round, so
    # it rounds its need up to 2 v where one sender's rounds it up to v: with 1 MiB chunks
    # (7.8 visits of K) that can cost half a round in nine (measured 0.472-0.555, issue 12's
    # target is 0.55); with 4 MiB (31 visits) 0.498-0.506.
    assert max(ratios) < bound
