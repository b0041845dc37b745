"""Delivery behaviour on the in-memory `Link`, as counts: today's figures, asserted.

These reproduce what the integration tests see on real namespaced LANs (one pass at 0-5% loss,
extra passes at 20% loss with the default 10% overhead, two senders started together finishing
sooner than one), deterministically and in about a second, so that a change to the carousel or
the receive path shows up here as a changed count.  Each test prints its counts (``pytest -s``);
when a change moves them on purpose, update the figures and say why.

The release is scaled down but keeps the shape that matters: about a thousand source symbols per
chunk (as a 1 MiB chunk has at the default symbol size, so per-chunk loss averages out as it
does in real runs), a few windows per pass, and a decoder budget of two windows, as the sender's
default window and `MAX_DECODER_BYTES` give for real images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import pytest

from otacast.signer import symbol_cache
from otacast.signer.keys import SigningKey

from .helpers import (
    GilbertElliott,
    Link,
    LinkReport,
    RandomLoss,
    ReceiverReport,
    ReceiverSpec,
    Release,
    SenderSpec,
    cycles_for_fraction,
    make_release,
)

KEY = SigningKey(b"\x21" * 32)
STREAM_KEY = SigningKey(b"\x22" * 32)
RATE = 2_500_000.0  # bytes/s per sender: sets virtual seconds only, never a count


@dataclass(frozen=True)
class Shape:
    """The scaled-down release and sender/receiver settings the counts are taken with."""

    chunks: int = 6
    chunk_size: int = 512 * 1024
    symbol_size: int = 512  # K = 1024 per chunk
    window: int = 2  # chunks interleaved by a sender: three windows per pass
    decoder_windows: int = 2  # the receiver's decoder budget, in windows


SHAPE = Shape()


@cache
def release(shape: Shape = SHAPE, stream_keys: tuple[SigningKey, ...] = ()) -> Release:
    image = random.Random(shape.chunks).randbytes(shape.chunks * shape.chunk_size)
    return make_release(
        image,
        KEY,
        chunk_size=shape.chunk_size,
        symbol_size=shape.symbol_size,
        stream_keys=stream_keys,
    )


def receiver(shape: Shape = SHAPE, **kw: object) -> ReceiverSpec:
    budget = shape.decoder_windows * shape.window * shape.chunk_size
    return ReceiverSpec(decoder_budget=budget, **kw)  # type: ignore[arg-type]


def run(
    senders: list[SenderSpec],
    receivers: list[ReceiverSpec],
    shape: Shape = SHAPE,
    stream_keys: tuple[SigningKey, ...] = (),
) -> LinkReport:
    report = Link(release(shape, stream_keys), senders, receivers, window=shape.window).run()
    print()
    print(report.summary())
    return report


def completed(report: LinkReport) -> list[ReceiverReport]:
    for r in report.receivers:
        assert r.complete_at is not None, r.line()
    return report.receivers


def test_the_link_sends_the_datagrams_serve_caches(tmp_path: Path) -> None:
    """The harness's cycles are byte for byte the sender's symbol cache file."""
    r = release()
    path = symbol_cache.build(r.manifest, _image_file(tmp_path, r.image), tmp_path, 0.5)
    assert path.read_bytes() == b"".join(b"".join(c) for c in cycles_for_fraction(r, 0.5))


def _image_file(tmp_path: Path, image: bytes) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(image)
    return path


def test_the_link_is_deterministic() -> None:
    spec = [receiver(loss=RandomLoss(0.1), seed=4, reorder=0.001)]
    first = run([SenderSpec(rate=RATE)], spec).receivers[0]
    again = run([SenderSpec(rate=RATE)], spec).receivers[0]
    assert first == again


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_one_pass_is_enough_up_to_5_percent_loss(loss: float) -> None:
    for seed in range(3):
        (r,) = completed(run([SenderSpec(rate=RATE)], [receiver(loss=RandomLoss(loss), seed=seed)]))
        assert r.passes == 1
        # Today: 1.071 at 0% (the whole pass is heard: a window's chunks complete together,
        # near its end), 1.031-1.038 at 5% (the 10% overhead minus the loss).
        assert 1.0 < r.heard_per_ideal < (1.08 if loss == 0 else 1.045)
        assert r.decoder_high_water <= SHAPE.window  # one window in flight
        assert r.rejected == {}


def test_20_percent_loss_with_10_percent_overhead_needs_extra_passes() -> None:
    for seed in range(3):
        (r,) = completed(run([SenderSpec(rate=RATE)], [receiver(loss=RandomLoss(0.2), seed=seed)]))
        # Today: a third pass (2.39 of them sent, 2.39x the ideal datagrams), with every
        # decoder slot held and symbols of chunks without a decoder refused meanwhile.
        assert r.passes == 3
        assert 2.3 < r.heard_per_ideal < 2.5
        assert r.decoder_high_water == SHAPE.decoder_windows * SHAPE.window
        assert r.rejected.keys() == {"decoder-budget"}


def test_two_senders_started_together_finish_sooner_than_one() -> None:
    (one,) = completed(run([SenderSpec(rate=RATE)], [receiver()]))
    (two,) = completed(
        run([SenderSpec(index=i, count=2, rate=RATE) for i in range(2)], [receiver()])
    )
    assert one.complete_at is not None and two.complete_at is not None
    ratio = two.complete_at / one.complete_at
    print(f"two senders / one sender, virtual time to complete: {ratio:.3f}")
    # Today 0.67 (integration measures 0.58): each sender covers part of a pass, but the
    # receiver also hears symbols it no longer needs (heard/ideal 1.07 -> 1.44).
    assert ratio < 0.75
    assert all(p < 1 for p in two.sender_passes)
    assert two.heard_per_ideal > one.heard_per_ideal
    assert two.decoder_high_water <= 2 * SHAPE.window  # one window per sender


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_a_second_sender_started_later_still_helps(loss: float) -> None:
    (one,) = completed(run([SenderSpec(rate=RATE)], [receiver(loss=RandomLoss(loss), seed=1)]))
    assert one.complete_at is not None
    for start in (0.3, 0.7):  # a fifth and a half of a pass late
        senders = [
            SenderSpec(index=0, count=2, rate=RATE),
            SenderSpec(index=1, count=2, rate=RATE, start=start),
        ]
        (two,) = completed(run(senders, [receiver(loss=RandomLoss(loss), seed=1)]))
        assert two.complete_at is not None
        ratio = two.complete_at / one.complete_at
        print(
            f"second sender {start} s late, {loss:.0%} loss: time ratio to one sender {ratio:.3f}"
        )
        # Today: 0.78 and 0.93 without loss; 0.37 and 0.38 at 20% loss, where the second
        # sender's repair symbols replace most of the first one's extra passes.
        assert ratio < (0.95 if loss == 0 else 0.4)


def test_bursty_loss_is_recorded() -> None:
    # 5% mean loss in bursts of ten datagrams on average (Gilbert-Elliott).
    loss = GilbertElliott(enter=0.05 / 0.95 / 10, leave=0.1)
    assert loss.mean == pytest.approx(0.05)
    for seed in range(3):
        (r,) = completed(run([SenderSpec(rate=RATE)], [receiver(loss=loss, seed=seed)]))
        # Today: like independent loss of the same mean, one pass.
        assert r.passes == 1


def test_a_late_joiner_and_a_reordered_receiver_are_recorded() -> None:
    late = receiver(join=0.5, seed=1)  # joins a third of the way into the first pass
    reordered = receiver(loss=RandomLoss(0.05), reorder=0.002, seed=2)  # ~10 datagrams deep
    a, b = completed(run([SenderSpec(rate=RATE)], [late, reordered]))
    # Today: the late joiner waits for the next manifest, then needs a second pass to cover
    # the part of the first it missed; reordering costs nothing.
    assert a.passes == 2 and a.manifest_at is not None and a.manifest_at > 0.5
    assert a.heard_per_ideal < 1.1
    assert b.passes == 1 and b.rejected == {}


def test_packet_authentication_on_the_link_is_recorded() -> None:
    passes = []
    for seed in range(6):
        report = run(
            [SenderSpec(rate=RATE, stream_key=STREAM_KEY)],
            [receiver(loss=RandomLoss(0.05), seed=seed)],
            stream_keys=(STREAM_KEY,),
        )
        (r,) = completed(report)
        print(f"packet authentication counters: {r.auth}")
        assert r.auth is not None and r.auth["datagrams_admitted"] == r.source_symbols
        assert r.rejected == {}
        passes.append(r.passes)
    # Today: at 5% loss one seed in six needs a second pass (it re-checks signatures of two
    # chunks' page chains: data whose page copies were both lost is not vouched for).
    assert passes == [1, 2, 1, 1, 1, 1]


def test_a_receiver_that_hears_nothing_asks_for_fallback_at_its_join_timeout() -> None:
    deaf = receiver(loss=RandomLoss(1.0), join=1.0, join_timeout=2.0)
    report = run([SenderSpec(rate=RATE, duration=5.0)], [deaf])
    (r,) = report.receivers
    assert r.fallback == [(3.0, "join-timeout")]
    assert r.complete_at is None and r.received == 0 and r.heard > 0


def test_a_stalled_receiver_is_completed_by_instant_fallback_at_its_stall_timeout() -> None:
    # One pass at 20% loss with 10% overhead completes no chunk at all (each gets 0.88 K
    # symbols); the stall timer fires after the sender stops and the fallback (an instant HTTP
    # mirror) marks every chunk done, as the driver's repair does.
    lossy = receiver(loss=RandomLoss(0.2), seed=1, stall_timeout=2.0, fallback="instant")
    (r,) = completed(run([SenderSpec(rate=RATE, passes=1)], [lossy]))
    assert len(r.fallback) == 1 and r.fallback[0][1] == "stalled"
    assert r.complete_at == r.fallback[0][0]
    assert r.chunks_over_time == []  # multicast alone completed nothing
    assert r.decoder_high_water == SHAPE.decoder_windows * SHAPE.window


# --- With the durable symbol store, as `otacast fetch` receives --------------------------------


def test_with_the_symbol_store_no_symbol_is_refused_and_20_percent_loss_needs_one_pass_less(
    tmp_path: Path,
) -> None:
    for seed in range(3):
        state = tmp_path / f"seed{seed}"
        spec = ReceiverSpec(loss=RandomLoss(0.2), seed=seed, state_dir=state)
        (r,) = completed(run([SenderSpec(rate=RATE)], [spec]))
        # Every admitted symbol is kept on disk: nothing is refused for want of a decoder, every
        # chunk can be in progress at once, and what the first pass gave is never thrown away.
        assert r.rejected == {}
        assert r.passes == 2  # in memory under the budget: 3 (the test above)
        assert r.heard_per_ideal < 1.7  # in memory: 2.3-2.5
        assert 0 < r.spill_high_water < len(release().image)


def test_a_receiver_stopped_midway_resumes_with_its_stored_symbols(tmp_path: Path) -> None:
    spec = ReceiverSpec(loss=RandomLoss(0.2), seed=7)
    # Stopped after the sender's first window (chunks 0 and 1, about half of each received) ...
    first = run([SenderSpec(rate=RATE, duration=0.3)], [replace(spec, state_dir=tmp_path / "a")])
    (cut,) = first.receivers
    assert cut.complete_at is None and cut.received > 0
    # ... then started again where another sender runs, at another point of the cycles (as
    # `--sender 2/2` does): its stored symbols of chunks 0 and 1 count, so it needs fewer
    # datagrams and less of the sender's carousel than a receiver starting from nothing
    # (measured: 7466 against 9248 datagrams, 1.39 against 1.71 passes sent).
    other = SenderSpec(index=1, count=2, rate=RATE)
    (resumed,) = completed(run([other], [replace(spec, state_dir=tmp_path / "a")]))
    (fresh,) = completed(run([other], [replace(spec, state_dir=tmp_path / "b")]))
    assert resumed.received < 0.9 * fresh.received
    assert resumed.sender_passes[0] < fresh.sender_passes[0]
