"""Delivery behaviour on the in-memory `Link`, as counts: today's figures, asserted.

These reproduce what the integration tests see on real namespaced LANs (about the ideal K/(1-p)
datagrams at any loss up to the repair pool, two senders halving the time whenever the second
started), deterministically and in a few seconds, so that a change to the carousel or the
receive path shows up here as a changed count.  Each test prints its counts (``pytest -s``);
when a change moves them on purpose, update the figures and say why.

The release is scaled down but keeps the shape that matters: about a thousand source symbols per
chunk (as a 1 MiB chunk has at the default symbol size, so per-chunk loss averages out as it
does in real runs), and receivers that keep their symbols in the durable store, as ``fetch``
does.
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


def run(
    senders: list[SenderSpec],
    receivers: list[ReceiverSpec],
    shape: Shape = SHAPE,
    stream_keys: tuple[SigningKey, ...] = (),
) -> LinkReport:
    report = Link(release(shape, stream_keys), senders, receivers).run()
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
    datagrams = symbol_cache.CycleLayout.for_manifest(r.manifest, 0.5).total_bytes
    assert path.read_bytes()[:datagrams] == b"".join(
        b"".join(c) for c in cycles_for_fraction(r, 0.5)
    )


def _image_file(tmp_path: Path, image: bytes) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(image)
    return path


def test_the_link_is_deterministic() -> None:
    spec = [ReceiverSpec(loss=RandomLoss(0.1), seed=4, reorder=0.001)]
    first = run([SenderSpec(rate=RATE)], spec).receivers[0]
    again = run([SenderSpec(rate=RATE)], spec).receivers[0]
    assert first == again


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.2, 0.3])
def test_a_receiver_hears_about_the_ideal_at_any_loss_up_to_the_repair_pool(loss: float) -> None:
    for seed in range(2):
        (r,) = completed(
            run([SenderSpec(rate=RATE)], [ReceiverSpec(loss=RandomLoss(loss), seed=seed)])
        )
        # Today: 1.007 at 0% (the last visit's tail), 1.02-1.03 at 5%, 1.03-1.06 at 20%,
        # 1.00-1.02 at 30%: every chunk advances every round and every symbol is kept, so the
        # receiver is done after about K/(1-p) per chunk, within a visit of each other.  A visit
        # here is 43 symbols of K = 1024 (4% of what a chunk needs at 20% loss): how far into
        # its last round a receiver is done moves the figure by that much (at the default
        # 8 MiB chunks a visit is 1.6% of K).
        assert r.heard_per_ideal < 1.07
        assert r.rejected == {}
        # About 1/(1-p) passes of the carousel (a pass sends every chunk's K symbols' worth).
        assert r.sender_passes[0] < 1.07 / (1 - loss)


def test_two_senders_started_together_take_about_half_the_time() -> None:
    (one,) = completed(run([SenderSpec(rate=RATE)], [ReceiverSpec()]))
    (two,) = completed(
        run([SenderSpec(index=i, count=2, rate=RATE) for i in range(2)], [ReceiverSpec()])
    )
    assert one.complete_at is not None and two.complete_at is not None
    ratio = two.complete_at / one.complete_at
    print(f"two senders / one sender, virtual time to complete: {ratio:.3f}")
    # Today 0.522: the senders are half a cycle apart, so nearly every symbol heard is new.
    assert ratio < 0.55
    assert two.heard_per_ideal < 1.07


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_a_second_sender_started_later_doubles_the_speed_of_later_joiners(loss: float) -> None:
    join = 2.0  # after both senders started, each at its own moment
    (one,) = completed(
        run([SenderSpec(rate=RATE)], [ReceiverSpec(loss=RandomLoss(loss), seed=1, join=join)])
    )
    assert one.complete_at is not None
    for start in (0.3, 1.1):
        senders = [
            SenderSpec(index=0, count=2, rate=RATE),
            SenderSpec(index=1, count=2, rate=RATE, start=start),
        ]
        (two,) = completed(run(senders, [ReceiverSpec(loss=RandomLoss(loss), seed=1, join=join)]))
        assert two.complete_at is not None
        ratio = (two.complete_at - join) / (one.complete_at - join)
        print(
            f"second sender {start} s late, {loss:.0%} loss: time ratio to one sender {ratio:.3f}"
        )
        # The phase is the wall clock's, not the start's: the senders stay half a cycle apart
        # however late the second started, and their symbols do not overlap.
        assert ratio < 0.55
        assert two.heard_per_ideal < 1.07


def test_a_second_sender_helps_a_receiver_from_the_moment_it_starts() -> None:
    (one,) = completed(run([SenderSpec(rate=RATE)], [ReceiverSpec(seed=1)]))
    assert one.complete_at is not None
    start = 0.3
    senders = [
        SenderSpec(index=0, count=2, rate=RATE),
        SenderSpec(index=1, count=2, rate=RATE, start=start),
    ]
    (two,) = completed(run(senders, [ReceiverSpec(seed=1)]))
    assert two.complete_at is not None
    # Alone until `start`, then twice as fast: the ideal is start + (one - start) / 2.
    ideal = start + (one.complete_at - start) / 2
    print(f"with a second sender from {start} s: {two.complete_at:.3f} s, ideal {ideal:.3f} s")
    assert two.complete_at < 1.05 * ideal


def test_bursty_loss_is_recorded() -> None:
    # 5% mean loss in bursts of ten datagrams on average (Gilbert-Elliott).
    loss = GilbertElliott(enter=0.05 / 0.95 / 10, leave=0.1)
    assert loss.mean == pytest.approx(0.05)
    for seed in range(3):
        (r,) = completed(run([SenderSpec(rate=RATE)], [ReceiverSpec(loss=loss, seed=seed)]))
        # Like independent loss of the same mean: a burst costs each chunk a few symbols.
        assert r.heard_per_ideal < 1.06


def test_a_late_joiner_and_a_reordered_receiver_are_recorded() -> None:
    late = ReceiverSpec(join=0.5, seed=1)  # joins a third of the way into the first pass
    reordered = ReceiverSpec(loss=RandomLoss(0.05), reorder=0.002, seed=2)  # ~10 datagrams deep
    a, b = completed(run([SenderSpec(rate=RATE)], [late, reordered]))
    # Joining mid-pass costs nothing: every chunk makes progress from the join on.
    assert a.manifest_at is not None and a.manifest_at > 0.5
    assert a.heard_per_ideal < 1.03
    assert b.heard_per_ideal < 1.05 and b.rejected == {}


def test_packet_authentication_on_the_link_is_recorded() -> None:
    ratios = []
    for seed in range(4):
        report = run(
            [SenderSpec(rate=RATE, stream_key=STREAM_KEY)],
            [ReceiverSpec(loss=RandomLoss(0.05), seed=seed)],
            stream_keys=(STREAM_KEY,),
        )
        (r,) = completed(report)
        print(f"packet authentication counters: {r.auth}")
        assert r.auth is not None and r.auth["datagrams_admitted"] >= r.source_symbols
        assert r.rejected == {}
        ratios.append(r.heard_per_ideal)
    # A visit is one AUTH page, sent twice just before its data: losing both copies (0.25% of
    # visits at 5% loss) costs that visit's data, no more.  (1.01-1.075: the granularity of a
    # 42-symbol visit, as in the test above; 43 before AUTH pages had an LCT header, 1.02-1.06.)
    assert max(ratios) < 1.08


def test_a_receiver_that_hears_nothing_asks_for_fallback_at_its_join_timeout() -> None:
    deaf = ReceiverSpec(loss=RandomLoss(1.0), join=1.0, join_timeout=2.0)
    report = run([SenderSpec(rate=RATE, duration=5.0)], [deaf])
    (r,) = report.receivers
    assert r.fallback == [(3.0, "join-timeout")]
    assert r.complete_at is None and r.received == 0 and r.heard > 0


def test_a_stalled_receiver_is_completed_by_instant_fallback_at_its_stall_timeout() -> None:
    # One pass at 20% loss completes no chunk at all (each gets about 0.8 K symbols); the stall
    # timer fires after the sender stops and the fallback (an instant HTTP mirror) marks every
    # chunk done, as the driver's repair does.
    lossy = ReceiverSpec(loss=RandomLoss(0.2), seed=1, stall_timeout=2.0, fallback="instant")
    (r,) = completed(run([SenderSpec(rate=RATE, passes=1)], [lossy]))
    assert len(r.fallback) == 1 and r.fallback[0][1] == "stalled"
    assert r.complete_at == r.fallback[0][0]
    assert r.chunks_over_time == []  # multicast alone completed nothing


# --- With the durable symbol store, as `otacast fetch` receives --------------------------------


def test_devices_waiting_for_a_lone_sender_need_no_decode_at_no_loss() -> None:
    # A lone sender's phase counts from its first start: every chunk's source symbols come
    # first, so a device there from the start stores no repair symbol and decodes nothing.
    (waiting,) = completed(run([SenderSpec(rate=RATE, start=0.2)], [ReceiverSpec()]))
    assert waiting.spill_high_water == 0 and waiting.decoded_bytes == 0
    assert waiting.received_per_k < 1.03
    # One of two senders counts from the epoch: at an arbitrary point of every cycle, so the
    # same device stores repair symbols and decodes.
    (one_of_two,) = completed(
        run([SenderSpec(index=0, count=2, rate=RATE, start=0.2)], [ReceiverSpec()])
    )
    assert one_of_two.decoded_bytes > 0


def test_in_memory_decoders_under_a_budget_cannot_follow_this_order() -> None:
    # Why `otacast fetch` keeps symbols in the durable store: every chunk is in progress at
    # once, so a budget of two chunks' decoders refuses most symbols and the receiver needs
    # several times the ideal.
    spec = ReceiverSpec(symbols="memory", decoder_budget=2 * SHAPE.chunk_size)
    (memory,) = completed(run([SenderSpec(rate=RATE)], [spec]))
    (store,) = completed(run([SenderSpec(rate=RATE)], [ReceiverSpec()]))
    assert memory.rejected.keys() == {"decoder-budget"}
    assert memory.decoder_high_water == 2
    assert memory.heard_per_ideal > 2 * store.heard_per_ideal


def test_a_receiver_stopped_midway_resumes_with_its_stored_symbols(tmp_path: Path) -> None:
    spec = ReceiverSpec(loss=RandomLoss(0.2), seed=7)
    # Stopped after a fifth of a pass (every chunk about a fifth received) ...
    first = run([SenderSpec(rate=RATE, duration=0.3)], [replace(spec, state_dir=tmp_path / "a")])
    (cut,) = first.receivers
    assert cut.complete_at is None and cut.received > 0
    # ... then started again while the sender (restarted too) runs on: the phase counts from
    # the sender's first start, so it sends what follows, and the stored symbols count: the
    # resumed receiver needs about that many datagrams fewer than one starting from nothing.
    again = SenderSpec(rate=RATE, start=0.3, origin=0.0)
    later = replace(spec, join=0.3)
    (resumed,) = completed(run([again], [replace(later, state_dir=tmp_path / "a")]))
    (fresh,) = completed(run([again], [replace(later, state_dir=tmp_path / "b")]))
    print(f"stored {cut.received}, resumed received {resumed.received}, fresh {fresh.received}")
    assert resumed.received < fresh.received - 0.8 * cut.received
    assert resumed.sender_passes[0] < fresh.sender_passes[0]
