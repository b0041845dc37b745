"""The abstract model of ``integration/sweep.py`` (issue 12's simulator sweep), checked.

The sweep drives the real `SenderCore` but models receivers as ESI bit sets, so that images of
gigabytes take seconds.  Here it is held to the real thing: against `tests.helpers.Link` (real
cores, real RaptorQ) on the scaled-down release of ``test_link.py``, and its fast symbol-major
engine against a per-datagram replay of the same order.  Then the counts that motivate issue 12
are asserted as the model measures them today.  Counts only, never times of the machine.
"""

from __future__ import annotations

import math
import random

import pytest

from integration.sweep import (
    Image,
    Loss,
    LossBits,
    Outcome,
    ReceiverPlan,
    SenderPlan,
    SymbolMajor,
    fold,
    nth_set_bit,
    run_symbol_major,
    run_windowed,
)

from .helpers import Link, RandomLoss, ReceiverSpec, SenderSpec
from .test_link import RATE, SHAPE, release

MB = 1_000_000

# --- The model against the Link ------------------------------------------------------------


def shape_image() -> Image:
    """``test_link.py``'s release, window and decoder budget, as the model sees them."""
    return Image(
        SHAPE.chunks * SHAPE.chunk_size,
        SHAPE.chunk_size,
        SHAPE.symbol_size,
        window=SHAPE.window,
        decoder_budget=SHAPE.decoder_windows * SHAPE.window * SHAPE.chunk_size,
    )


def test_the_shape_matches_the_links_release() -> None:
    image = shape_image()
    m = release().manifest
    assert image.sources == tuple(m.source_symbols(c) for c in range(m.chunk_count))
    assert image.max_decoders == SHAPE.decoder_windows * SHAPE.window


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_the_today_receiver_counts_what_the_link_counts(loss: float) -> None:
    image = shape_image()
    budget = image.decoder_budget
    for seed in range(3):
        link = Link(
            release(),
            [SenderSpec(rate=RATE)],
            [ReceiverSpec(loss=RandomLoss(loss), seed=seed, decoder_budget=budget)],
            window=SHAPE.window,
        ).run()
        (real,) = link.receivers
        (model,) = run_windowed(
            image, [SenderPlan()], [ReceiverPlan("today", Loss(loss), seed=seed)], rate=RATE
        )
        print(f"{loss:.0%} seed {seed}: link {real.line()}")
        print(f"    model heard/ideal {model.heard_per_ideal:.3f} passes {model.passes:.2f}")
        assert real.complete_at is not None and model.complete_at is not None
        assert math.ceil(model.passes) == real.passes
        assert model.decoders == real.decoder_high_water
        if loss == 0:
            # No loss: the same datagrams, and RaptorQ decodes at K source symbols.
            assert model.heard == real.heard
        else:
            # Different loss draws: within 3% (measured: Link 2.390-2.399, model 2.386-2.400).
            assert model.heard_per_ideal == pytest.approx(real.heard_per_ideal, rel=0.03)
            assert model.refused > 0 and real.rejected.keys() == {"decoder-budget"}


def test_two_senders_on_the_model_and_the_link_agree_without_loss() -> None:
    image = shape_image()
    senders = [SenderSpec(index=i, count=2, rate=RATE, start=0.3 * i) for i in range(2)]
    budget = image.decoder_budget
    link = Link(
        release(), senders, [ReceiverSpec(decoder_budget=budget)], window=SHAPE.window
    ).run()
    (model,) = run_windowed(
        image,
        [SenderPlan(s.index, s.count, s.start) for s in senders],
        [ReceiverPlan("today", Loss(0.0))],
        rate=RATE,
    )
    (real,) = link.receivers
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


@pytest.mark.parametrize("phase", ["time", "start"])
@pytest.mark.parametrize("starts", [(0.0,), (0.0, 0.0), (0.0, 0.037), (0.0, 0.011, 0.02, 0.09)])
def test_the_symbol_major_engine_matches_a_per_datagram_replay(
    phase: str, starts: tuple[float, ...]
) -> None:
    image = Image(5 * 65536 + 7000, 65536, 256)  # six chunks, K = 256 (the last 28)
    senders = tuple(SenderPlan(i, len(starts), s) for i, s in enumerate(starts))
    order = SymbolMajor(image, senders, RATE, phase)
    for join in (0.0, 0.0123, 0.05):
        out = run_symbol_major(
            image, senders, ReceiverPlan("store", Loss(0.0), join), rate=RATE, phase=phase
        )
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


# --- What motivates issue 12, as the model measures it today --------------------------------

SPAN = 50 * MB * 1228 / 1208 / 12_500_000  # one 50 MB image at one sender's rate, in seconds
JOIN = 0.37 * SPAN  # "a random moment"


def fifty(
    order: str, policy: str, loss: Loss, join: float, senders: list[SenderPlan] | None = None
) -> Outcome:
    image = Image(50 * MB)
    plans = senders or [SenderPlan()]
    plan = ReceiverPlan(policy, loss, join, seed=3)
    if order == "windowed":
        (out,) = run_windowed(image, plans, [plan], max_passes=6)
        return out
    return run_symbol_major(image, plans, plan)


def test_today_the_windowed_order_and_the_decoder_budget_collapse_at_20_percent() -> None:
    at_5 = fifty("windowed", "today", Loss(0.05), 0.0)
    at_20 = fifty("windowed", "today", Loss(0.2), 0.0)
    store_20 = fifty("windowed", "store", Loss(0.2), 0.0)
    print(at_5.heard_per_ideal, at_20.heard_per_ideal, store_20.heard_per_ideal)
    assert at_5.heard_per_ideal < 1.06 and math.ceil(at_5.passes) == 1
    # Today about 3.4x the ideal datagrams and four passes; a store alone halves that, but the
    # windowed order still sends each chunk's 1.1 K per pass, so 20% loss costs a second pass.
    assert at_20.heard_per_ideal > 3.0 and math.ceil(at_20.passes) == 4
    assert at_20.refused > 0 and at_20.decoders == 16
    assert 1.5 < store_20.heard_per_ideal < 1.8 and math.ceil(store_20.passes) == 2


# Mean heard/ideal over seeds 0-4, as measured: (1 MiB chunks, 4 MiB chunks) per loss.
SYMBOL_MAJOR_50MB = {
    0.0: (1.007, 1.007),
    0.05: (1.026, 1.012),
    0.2: (1.041, 1.020),
    0.3: (1.059, 1.022),
}


@pytest.mark.parametrize("mean", sorted(SYMBOL_MAJOR_50MB))
def test_symbol_major_with_a_store_is_near_the_ideal_for_a_random_join(mean: float) -> None:
    measured = []
    for chunk_size in (1 << 20, 4 << 20):
        image = Image(50 * MB, chunk_size)
        outs = [
            run_symbol_major(image, [SenderPlan()], ReceiverPlan("store", Loss(mean), JOIN, seed))
            for seed in range(5)
        ]
        assert all(o.complete_at is not None for o in outs)
        measured.append(sum(o.heard_per_ideal for o in outs) / len(outs))
    print(f"{mean:.0%}: heard/ideal {measured[0]:.4f} (1 MiB chunks), {measured[1]:.4f} (4 MiB)")
    assert measured == pytest.approx(SYMBOL_MAJOR_50MB[mean], abs=0.003)
    # Issue 12's target is 1.03.  Without loss only the short last chunk costs (it is sent every
    # round too).  With loss each chunk completes after its own negative-binomial number of
    # rounds and the image waits for the slowest of its 48 chunks, about two standard deviations
    # (sqrt(K p)/(1-p) rounds) late: relative to K/(1-p) rounds that is ~2 sqrt(p/K), so 1 MiB
    # chunks (K = 869) miss the target from 20% loss on, and 4 MiB chunks (K = 3472) meet it.
    assert measured[1] < 1.03
    assert (measured[0] < 1.03) == (mean <= 0.05)


def test_symbol_major_senders_send_disjoint_symbols_whenever_they_started() -> None:
    join = JOIN
    alone = fifty("symbol-major", "store", Loss(0.05), join)
    together = fifty(
        "symbol-major", "store", Loss(0.05), join, [SenderPlan(i, 2) for i in range(2)]
    )
    late = fifty(
        "symbol-major",
        "store",
        Loss(0.05),
        join,
        [SenderPlan(0, 2), SenderPlan(1, 2, start=0.2 * SPAN)],  # before the receiver joins
    )
    assert alone.receiving_time and together.receiving_time and late.receiving_time
    for two in (together, late):
        ratio = two.receiving_time / alone.receiving_time  # type: ignore[operator]
        print(f"two senders / one: {ratio:.3f}, heard/ideal {two.heard_per_ideal:.3f}")
        assert ratio < 0.52
        assert two.heard_per_ideal < 1.045
