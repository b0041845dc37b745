"""The sans-IO receiver core, driven with real encoded symbols and an injected clock."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacast.plugin.core import ReceiverCore
from otacast.plugin.decoder import SUBMITTED, FeedResult
from otacast.plugin.events import (
    ChunkComplete,
    Event,
    FallbackNeeded,
    ImageComplete,
    ManifestRefused,
    ManifestVerified,
    SourceHeard,
)
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS
from otacast.plugin.verify import verify_manifest
from otacast.schemas import wire
from otacast.schemas.errors import Rollback, UnknownKey
from otacast.schemas.limits import MAX_ANNOUNCED_SOURCES, MAX_SOURCES_COUNTED
from otacast.schemas.policy import TrustSet, VerifiedManifest
from otacast.signer.keys import SigningKey

from .helpers import (
    CHUNK,
    DATA,
    ENVELOPE,
    IMAGE,
    KEY,
    MANIFEST,
    NOW,
    SENDER,
    TRUST,
    auth_pages,
    cycles,
    drain,
    interleaved,
    make_release,
    manifest_datagrams,
    rebuilt,
    receive_all,
    receive_from,
    receive_reads,
    reference_envelope,
)


def test_manifest_then_interleaved_symbols_rebuild_the_image() -> None:
    core = ReceiverCore(TRUST, now=NOW, device_type="raspberrypi4", installed_sequence=4)
    events = receive_all(core, manifest_datagrams() + interleaved(0.0))
    assert isinstance(events[0], ManifestVerified)
    assert isinstance(events[-1], ImageComplete)
    assert rebuilt(events) == IMAGE
    assert core.complete and core.stats.rejected == {}


@pytest.mark.parametrize("loss", [0.05, 0.2])
def test_lost_symbols_are_repaired_from_repair_symbols(loss: float) -> None:
    core = ReceiverCore(TRUST, now=NOW, manifest=None)
    events = receive_all(core, manifest_datagrams() + interleaved(loss, seed=3))
    assert rebuilt(events) == IMAGE and core.complete


def test_views_of_a_read_buffer_that_is_reused_rebuild_the_image() -> None:
    # Data before the manifest (held), the manifest, then every chunk with loss (decoded):
    # whatever the core keeps of a read, it copies before the buffer is read into again.
    core = ReceiverCore(TRUST, now=NOW)
    events = receive_reads(core, DATA[0][:30] + manifest_datagrams() + interleaved(0.1, seed=5))
    assert rebuilt(events) == IMAGE and core.complete
    assert core.stats.rejected == {}
    assert core.stats.datagrams == 30 + len(manifest_datagrams()) + len(interleaved(0.1, seed=5))


def test_views_held_until_their_auth_page_arrives_are_copies() -> None:
    stream_key = SigningKey(b"\x05" * 32)
    release = make_release(IMAGE, KEY, chunk_size=CHUNK, stream_keys=[stream_key])
    data = cycles(release.manifest, IMAGE, 0)
    pages = auth_pages(release.manifest, data, stream_key)
    capacity = wire.auth_capacity(wire.data_datagram_size(release.manifest.fec.symbol_size))
    core = ReceiverCore(TRUST, now=NOW)
    receive_reads(core, manifest_datagrams(release.envelope))
    receive_reads(core, data[0][:capacity])  # held: their page has not arrived
    assert core.stats.symbols_used == 0
    page = pages.page(0, 0, NOW)
    events = receive_reads(core, [page, *data[0][capacity:]])
    assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]
    assert rebuilt(events) == IMAGE[:CHUNK]


def test_data_before_the_manifest_is_held_and_used_once_it_is_verified() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, DATA[0])
    assert core.verified is None and core.stats.symbols_used == 0
    events = receive_all(core, manifest_datagrams())
    assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]


def test_held_early_data_is_bounded_and_foreign_sessions_are_dropped_on_replay() -> None:
    from otacast.plugin.core import EARLY_ENTRY_OVERHEAD
    from otacast.schemas.limits import MAX_EARLY_BYTES

    core = ReceiverCore(TRUST, now=NOW)
    foreign = wire.build_datagram(wire.DataPacket(0xEEEEEEEE, 0, 1, b"z" * 1208))
    held = MAX_EARLY_BYTES // (len(foreign) + EARLY_ENTRY_OVERHEAD)
    receive_all(core, [foreign] * (held + 5))
    assert core.stats.rejected["no-manifest-yet"] == 5
    receive_all(core, manifest_datagrams())
    assert core.stats.rejected["other-session"] == held
    assert core.stats.symbols_used == 0


def test_tiny_data_datagrams_before_the_manifest_are_not_held() -> None:
    # No manifest allows symbols under MIN_SYMBOL_SIZE, and tiny entries would make the early
    # buffer's memory many times what its byte count says.
    core = ReceiverCore(TRUST, now=NOW)
    tiny = wire.build_datagram(wire.DataPacket(MANIFEST.tsi, 0, 1, b"z"))
    receive_all(core, [tiny] * 1000)
    assert core.stats.rejected["symbol-length"] == 1000
    receive_all(core, manifest_datagrams())
    assert core.stats.rejected["other-session"] == 0 and core.stats.symbols_used == 0


def test_rollback_manifest_is_refused_and_no_session_is_kept() -> None:
    core = ReceiverCore(TRUST, now=NOW, installed_sequence=5)
    events = receive_all(core, manifest_datagrams() * 3 + DATA[0][:5])
    refused = [e for e in events if isinstance(e, ManifestRefused)]
    assert [e.reason for e in refused] == ["Rollback"]  # verified once, then remembered
    assert core.verified is None
    assert core.stats.rejected["refused-manifest"] >= 1
    assert core.stats.symbols_used == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_refusal_kept_is_the_newest_genuine_release_whatever_the_order(
    order: tuple[int, ...],
) -> None:
    # A driver whose join timeout ends with nothing adopted reports `refusal` (its own exit
    # code): the installed release (5) outranks an older replay (3) and an untrusted one (9).
    stranger = SigningKey(b"\x09" * 32)
    heard = [
        reference_envelope(sequence=3),
        ENVELOPE,
        make_release(IMAGE, stranger, sequence=9, chunk_size=CHUNK).envelope,
    ]
    core = ReceiverCore(TRUST, now=NOW, installed_sequence=5)
    # Each from a sender of its own, as on a channel (one source's budget is not the point).
    stream = [(d, f"2001:db8::{i + 1}") for i in order for d in manifest_datagrams(heard[i])]
    events = receive_from(core, stream)
    assert sorted(e.reason for e in events if isinstance(e, ManifestRefused)) == [
        "Rollback",
        "Rollback",
        "UnknownKey",
    ]
    assert isinstance(core.refusal, Rollback) and core.refusal.sequence == 5
    assert core.verified is None


def test_an_untrusted_manifest_alone_is_kept_as_the_refusal() -> None:
    other = TrustSet.from_public_keys([SigningKey(b"\x09" * 32).public])
    core = ReceiverCore(other, now=NOW)
    receive_all(core, manifest_datagrams())
    assert isinstance(core.refusal, UnknownKey) and core.refusal.sequence is None


def test_wrong_device_wrong_channel_and_unknown_key_manifests_are_refused() -> None:
    other = TrustSet.from_public_keys([SigningKey(b"\x09" * 32).public])
    for core, reason, now in (
        (ReceiverCore(TRUST, now=NOW, device_type="toaster"), "WrongDevice", NOW),
        (ReceiverCore(TRUST, now=NOW, channel="beta.example.test"), "WrongChannel", NOW),
        (ReceiverCore(other, now=NOW), "UnknownKey", NOW),
        (ReceiverCore(TRUST, now=NOW), "Expired", MANIFEST.expires + 1.0),
    ):
        events = receive_all(core, manifest_datagrams(), now)
        assert [type(e).__name__ for e in events] == ["ManifestRefused"]
        assert events[0].reason == reason  # type: ignore[union-attr]
        assert core.verified is None


def test_packets_of_another_release_are_ignored_once_a_session_is_chosen() -> None:
    newer = reference_envelope(sequence=6)
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    prefix_other = wire.build_datagram(wire.DataPacket(newer.manifest.tsi, 0, 0, b"x"))
    forged = prefix_other[:16] + DATA[0][0][16:]
    receive_all(core, [forged] * 4 + manifest_datagrams(newer))
    assert core.stats.rejected["other-session"] == 4 + len(manifest_datagrams(newer))


def test_a_polluted_chunk_is_discarded_and_collected_again() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    k = MANIFEST.source_symbols(0)
    good = DATA[0]
    forged = bytearray(good[1])
    forged[100] ^= 0xFF  # one forged symbol, ESI 1, feeds the decoder first
    events = receive_all(core, [bytes(forged), *good[0:1], *good[2 : k + 1]])
    assert core.stats.rejected["chunk-hash-mismatch"] == 1
    assert not [e for e in events if isinstance(e, ChunkComplete)]
    events = receive_all(core, good[: k + 2])
    assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]
    assert rebuilt(events) == IMAGE[:CHUNK]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d + b"x", "symbol-length"),
        (lambda d: d[:-1], "symbol-length"),
        (lambda d: d[:16] + b"\x09" + d[17:], "chunk-range"),  # SBN: the object has 4 blocks
        (lambda d: d[:12] + (99).to_bytes(4, "big") + d[16:], "chunk-range"),  # TOI: 1 object
        (lambda d: d[:12] + bytes(4) + d[16:], "bad-toi"),  # TOI 0 is the FDT's
    ],
)
def test_malformed_data_of_our_session_is_a_counted_rejection(mutate: object, reason: str) -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    core.receive_datagram(mutate(DATA[0][0]), "fd51::1", NOW, wall=NOW)  # type: ignore[operator]
    assert core.stats.rejected == {reason: 1}


def test_duplicates_and_late_symbols_are_counted_not_fed() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams() + DATA[0][:3] + DATA[0][:3])
    assert core.stats.duplicates == 3
    receive_all(core, DATA[0])
    assert 0 in core.done
    receive_all(core, DATA[0][-2:])
    assert core.stats.late >= 2


def test_decoders_stay_within_the_memory_budget_and_partial_ones_are_kept() -> None:
    core = ReceiverCore(TRUST, now=NOW, decoder_budget=2 * CHUNK)
    receive_all(core, manifest_datagrams())
    receive_all(core, [DATA[i][0] for i in range(4)])  # four chunks started, room for two
    assert core.stats.rejected["decoder-budget"] == 2
    # The two held decoders keep their symbols and complete; then the others get room.
    events = receive_all(core, DATA[0][1:] + DATA[1][1:] + DATA[2] + DATA[3])
    assert sorted(e.index for e in events if isinstance(e, ChunkComplete)) == [0, 1, 2, 3]


def test_join_timeout_asks_for_fallback_once() -> None:
    core = ReceiverCore(TRUST, now=NOW, join_timeout=5.0, stall_timeout=10.0)
    assert core.get_timer() == NOW + 5.0
    core.handle_timer(NOW + 4.9)
    assert core.next_event() is None
    core.handle_timer(NOW + 5.0)
    assert drain(core) == [FallbackNeeded("join-timeout")]
    assert core.get_timer() is None


def test_stall_timeout_counts_from_the_last_progress() -> None:
    core = ReceiverCore(TRUST, now=NOW, join_timeout=5.0, stall_timeout=10.0)
    for d in manifest_datagrams():
        core.receive_datagram(d, "fd51::1", NOW + 1, wall=NOW + 1)
    core.receive_datagram(DATA[0][0], "fd51::1", NOW + 3, wall=NOW + 3)
    drain(core)
    assert core.get_timer() == NOW + 13
    core.handle_timer(NOW + 13)
    assert drain(core) == [FallbackNeeded("stalled")]


def test_with_a_given_manifest_and_nothing_arriving_the_join_timeout_asks_for_fallback() -> None:
    # The Mender module (and --manifest) must not wait the stall timeout for a silent channel.
    core = ReceiverCore(
        TRUST, now=NOW, manifest=verified_envelope(), join_timeout=5.0, stall_timeout=30.0
    )
    drain(core)
    assert core.get_timer() == NOW + 5.0
    core.handle_timer(NOW + 5.0)
    assert drain(core) == [FallbackNeeded("join-timeout")]


def test_with_a_given_manifest_and_only_garbage_arriving_the_stall_timeout_still_ends_it() -> None:
    core = ReceiverCore(
        TRUST, now=NOW, manifest=verified_envelope(), join_timeout=5.0, stall_timeout=30.0
    )
    drain(core)
    core.receive_datagram(b"garbage", "fd51::9", NOW + 1, wall=NOW + 1)
    assert core.get_timer() == NOW + 30.0
    core.handle_timer(NOW + 30.0)
    assert drain(core) == [FallbackNeeded("stalled")]


def verified_envelope() -> VerifiedManifest:
    return verify_manifest(
        ENVELOPE.compact_bytes,
        TRUST,
        now=NOW,
        device_type=None,
        installed_sequence=None,
        channel=None,
    )


def test_chunks_from_elsewhere_complete_the_image() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams() + DATA[0] + DATA[1])
    drain(core)
    core.mark_done(2, NOW)
    core.mark_done(3, NOW)
    assert drain(core) == [ImageComplete()]


def test_a_given_manifest_needs_no_carousel() -> None:
    core = ReceiverCore(TRUST, now=NOW, manifest=verified_envelope())
    assert isinstance(core.next_event(), ManifestVerified)
    assert rebuilt(receive_all(core, interleaved(0.0))) == IMAGE


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=1400))
def test_arbitrary_datagrams_never_raise_out_of_the_core(data: bytes) -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    core.receive_datagram(data, "fd51::66", NOW, wall=NOW)
    core.receive_datagram(DATA[0][0][:16] + data, "fd51::66", NOW, wall=NOW)


_U32_EDGES = [0, 1, wire.MAX_PART_TOI - 1, wire.MAX_PART_TOI, wire.MAX_PART_TOI + 1]


@FUZZ
@given(
    st.one_of(st.sampled_from(_U32_EDGES), st.integers(0, 0xFFFFFFFF)),
    st.integers(0, 255),
    st.integers(0, 0xFFFFFF),
    st.booleans(),
)
def test_a_data_header_with_any_toi_and_payload_id_is_taken_or_counted_never_raised(
    toi: int, sbn: int, esi: int, adopted: bool
) -> None:
    """Every TOI and payload id in an otherwise honest DATA header, through both of the
    core's entries, before and after a manifest is adopted: a chunk of the last image part
    beyond 32 bits once raised out of both parsers."""
    honest = DATA[0][0]
    datagram = honest[:12] + toi.to_bytes(4, "big") + bytes([sbn]) + esi.to_bytes(3, "big")
    datagram += honest[20:]
    for batched in (False, True):
        core = ReceiverCore(TRUST, now=NOW)
        if adopted:
            receive_all(core, manifest_datagrams())
        if batched:
            core.receive_datagrams([memoryview(datagram)], "fd51::66", NOW, wall=NOW)
        else:
            core.receive_datagram(datagram, "fd51::66", NOW, wall=NOW)
        drain(core)


@FUZZ
@given(st.integers(0, 1227), st.integers(0, 255), st.integers(0, 30))
def test_corrupted_honest_datagrams_never_raise_or_corrupt(
    position: int, value: int, which: int
) -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    datagram = bytearray(DATA[0][which])
    datagram[position] = value
    events = receive_all(core, [bytes(datagram)] + DATA[0])
    for event in events:
        if isinstance(event, ChunkComplete):
            assert event.data == IMAGE[:CHUNK]


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(1, 4000),
            st.integers(256, 1192),
            st.integers(0, 16),
            st.binary(min_size=1, max_size=300),
        ),
        max_size=30,
    )
)
def test_forged_manifest_fragments_never_raise_or_yield_a_session(
    fragments: list[tuple[int, int, int, int, bytes]],
) -> None:
    core = ReceiverCore(TRUST, now=NOW)
    for stream, total, size, index, data in fragments:
        index = min(index, (total - 1) // size)
        length = min(size, total - index * size)  # every fragment whole, the last ends at F
        fragment = (data * (length // len(data) + 1))[:length]
        packet = wire.ManifestPacket(stream, 0xE5E5E5E5, total, size, index, fragment)
        core.receive_datagram(wire.build_datagram(packet), "fd51::66", NOW, wall=NOW)
    assert core.verified is None
    assert len(core._pending) <= 4


def test_timers_run_on_the_monotonic_clock_and_expiry_on_the_wall_clock() -> None:
    # A monotonic clock near zero (a freshly booted device) next to a wall clock that is a date.
    core = ReceiverCore(TRUST, now=5.0, join_timeout=5.0, stall_timeout=10.0)
    assert core.get_timer() == 10.0
    for d in manifest_datagrams():
        core.receive_datagram(d, "fd51::1", 6.0, wall=NOW)
    assert isinstance(drain(core)[0], ManifestVerified)
    assert core.get_timer() == 16.0
    core.receive_datagram(DATA[0][0], "fd51::1", 7.0, wall=NOW)
    assert core.get_timer() == 17.0 and core.snapshot().last_progress == 7.0
    assert core.snapshot().first_datagram_at == 6.0


def test_a_manifest_completed_after_its_expiry_on_the_wall_clock_is_refused() -> None:
    core = ReceiverCore(TRUST, now=5.0)
    for d in manifest_datagrams():
        core.receive_datagram(d, "fd51::1", 6.0, wall=float(MANIFEST.expires + 1))
    events = drain(core)
    assert len(events) == 1 and isinstance(events[0], ManifestRefused)
    assert core.verified is None and core.stats.rejected["manifest-refused"] == 1


def test_the_snapshot_is_a_frozen_copy_of_the_counters_and_progress() -> None:
    import dataclasses

    core = ReceiverCore(TRUST, now=NOW)
    empty = core.snapshot()
    assert empty.manifest is None and empty.chunks_total == 0 and empty.bytes_total == 0
    receive_all(core, manifest_datagrams() + DATA[0] + DATA[1] + [b"junk"])
    core.mark_done(3, NOW)
    snap = core.snapshot()
    assert snap.manifest is not None and snap.manifest.manifest == MANIFEST
    assert (snap.chunks_done, snap.chunks_total) == (3, MANIFEST.chunk_count)
    assert snap.bytes_done == 2 * CHUNK + MANIFEST.chunk_span(3)[1]
    assert snap.bytes_total == len(IMAGE) and not snap.complete
    assert snap.chunks_multicast == 2 and snap.bytes_multicast == 2 * CHUNK
    assert snap.datagrams == core.stats.datagrams and snap.late == core.stats.late
    assert snap.rejected == {"short": 1} and snap.rejected_total == 1 and snap.auth is None
    core.count_rejected("oversized", 2)
    assert snap.rejected == {"short": 1}  # a copy: later counts do not reach it
    assert core.snapshot().rejected == {"short": 1, "oversized": 2}
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.datagrams = 0  # type: ignore[misc]


@pytest.mark.parametrize("first", [5, 7])
def test_with_a_grace_period_the_highest_sequence_heard_is_adopted_whichever_came_first(
    first: int,
) -> None:
    # Two senders on the channel serve sequences 5 and 7 (`watch` listens one second more).
    releases = {5: ENVELOPE, 7: reference_envelope(sequence=7)}
    second = 12 - first
    seven = cycles(releases[7].manifest, IMAGE, 0)
    core = ReceiverCore(TRUST, now=NOW, installed_sequence=4, manifest_grace=1.0)
    assert receive_all(core, manifest_datagrams(releases[first]), NOW) == []
    assert core.get_timer() == NOW + 1.0 and core.verified is None
    events = receive_all(core, manifest_datagrams(releases[second]), NOW + 0.3, source="fd51::2")
    events += receive_all(core, manifest_datagrams(releases[first]) + seven[0], NOW + 0.6)
    assert events == [] and core.verified is None  # DATA is held, as before any manifest
    assert core.stats.rejected["manifest-lower"] == 1
    # The first datagram after the grace period adopts the highest and replays what was held.
    events = receive_all(core, seven[1], NOW + 1.0)
    assert isinstance(events[0], ManifestVerified)
    assert events[0].verified.manifest.sequence == 7
    assert {e.index for e in events if isinstance(e, ChunkComplete)} == {0, 1}
    # Or the timer does, when nothing arrives.
    idle = ReceiverCore(TRUST, now=NOW, manifest_grace=1.0)
    receive_all(idle, manifest_datagrams(releases[first]), NOW)
    receive_all(idle, manifest_datagrams(releases[second]), NOW + 0.5)
    idle.handle_timer(NOW + 0.99)
    assert idle.verified is None
    idle.handle_timer(NOW + 1.0)
    assert idle.verified is not None and idle.verified.manifest.sequence == 7


class _Keeps:
    """A decoder that keeps nothing: what remains is the core's own bookkeeping."""

    def feed(self, packet: bytes | memoryview) -> bytes | None:
        return None

    def discard(self) -> None:
        pass


def test_the_core_remembers_the_pool_s_repair_symbols_in_bits() -> None:
    # With the symbol store every chunk is in progress at once, each holding many repair
    # symbols: a set entry each (~60 bytes) was ~17 MB per GiB of image.
    import tracemalloc

    release = make_release(random.Random(3).randbytes(16 * CHUNK), KEY, chunk_size=CHUNK)
    k = release.manifest.source_symbols(0)
    data = cycles(release.manifest, release.image, k // 2)  # the default pool: 50%
    core = ReceiverCore(
        TRUST,
        now=NOW,
        manifest=release.verified(),
        decoder_factory=lambda chunk, length, size: _Keeps(),
        decoder_budget=UNBOUNDED_DECODERS,
    )
    receive_all(core, [cycle[0] for cycle in data])  # every chunk open
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        receive_all(core, [d for cycle in data for d in cycle[k:]])  # their repair symbols
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    repair = sum(len(cycle) - k for cycle in data)
    assert core.stats.symbols_used == len(data) + repair
    assert grown / repair < 2, f"{grown} bytes for {repair} repair symbols"


# --- Sources heard (zero-config on a LAN: the driver follows announced senders) -------------


def _heard(events: list[Event]) -> list[str]:
    return [e.source for e in events if isinstance(e, SourceHeard)]


def test_each_source_announcing_the_adopted_release_is_reported_once() -> None:
    core = ReceiverCore(TRUST, now=NOW, report_sources=True)
    events = receive_all(core, manifest_datagrams())  # the announcement that made the manifest
    assert isinstance(events[0], ManifestVerified) and _heard(events) == [SENDER]
    assert _heard(receive_all(core, manifest_datagrams())) == []  # once per source
    assert _heard(receive_all(core, manifest_datagrams()[:1], source="fd51::2")) == ["fd51::2"]
    # Fragments of another release, and DATA, name no source to follow.
    other = manifest_datagrams(reference_envelope(sequence=9))
    assert _heard(receive_all(core, other + DATA[0][:5], source="fd51::3")) == []
    assert core.stats.rejected == {"other-session": len(other)}


def test_sources_are_reported_only_when_asked_and_only_of_a_verified_release() -> None:
    quiet = ReceiverCore(TRUST, now=NOW)
    assert _heard(receive_all(quiet, manifest_datagrams())) == []
    stranger = TrustSet.from_public_keys([SigningKey(b"\x07" * 32).public])
    forged = ReceiverCore(stranger, now=NOW, report_sources=True)
    assert _heard(receive_all(forged, manifest_datagrams())) == []  # not signed by a trusted key


def test_a_manifest_given_up_front_follows_the_sources_announcing_it() -> None:
    verified = ReceiverCore(TRUST, now=NOW)
    receive_all(verified, manifest_datagrams())
    core = ReceiverCore(TRUST, now=NOW, manifest=verified.verified, report_sources=True)
    drain(core)
    assert _heard(receive_all(core, manifest_datagrams()[:1], source="fd51::7")) == ["fd51::7"]


def test_with_a_grace_period_the_source_of_the_adopted_release_is_reported_at_adoption() -> None:
    core = ReceiverCore(TRUST, now=NOW, manifest_grace=1.0, report_sources=True)
    assert receive_all(core, manifest_datagrams(), source="fd51::4") == []
    core.handle_timer(NOW + 1.0)
    assert _heard(drain(core)) == ["fd51::4"]


def test_sources_beyond_the_limit_are_counted_not_reported() -> None:
    core = ReceiverCore(TRUST, now=NOW, report_sources=True)
    receive_all(core, manifest_datagrams())
    first = manifest_datagrams()[:1]
    stream = [(first[0], f"fd51::{i:x}") for i in range(2, MAX_ANNOUNCED_SOURCES + 12)]
    heard = _heard(receive_from(core, stream))
    assert len(heard) == MAX_ANNOUNCED_SOURCES - 1  # the first was the manifest's own source
    assert core.stats.rejected == {"sources-limit": 11}


def test_loss_is_estimated_from_the_esis_each_chunk_skipped() -> None:
    # Every fifth symbol of chunk 0 lost on the way, and one run of three on chunk 1: each
    # arrival after the first follows its chunk's cursor, the ESIs it skipped were lost.
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    kept = [d for esi, d in enumerate(DATA[0][:50]) if esi % 5 != 4]  # 40 arrive, 10 lost
    receive_all(core, kept + DATA[1][:10] + DATA[1][13:20])
    snap = core.snapshot()
    # chunk 0: 39 arrivals followed (the first starts the cursor), 9 gaps of one before ESI 49
    # (the 10th lost one, ESI 49, is after the last arrival: not yet seen as lost);
    # chunk 1: 16 followed, one gap of three
    assert (snap.symbols_followed, snap.symbols_missed) == (39 + 16, 9 + 3)
    assert snap.loss == pytest.approx(12 / (55 + 12))


def test_jumps_and_backward_esis_count_no_loss_and_two_senders_are_both_followed() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    # a jump far ahead (another sender's run), back to where the first run stopped (its
    # cursor is the chunk's second), then back to ESI 0 (the cycle's wrap): nothing lost
    receive_all(core, DATA[0][:10] + DATA[0][60:70] + DATA[0][10:12] + DATA[0][:2])
    assert (core.snapshot().symbols_followed, core.snapshot().symbols_missed) == (9 + 9 + 2 + 1, 0)
    # two senders 40 ESIs apart on chunk 2, batches of 5 interleaved, each losing one symbol
    # of every batch: both cursors are followed, every loss is seen
    a = [DATA[2][i : i + 5] for i in range(0, 20, 5)]
    b = [DATA[2][i : i + 5] for i in range(40, 60, 5)]
    stream = [d for x, y in zip(a, b, strict=True) for d in x[:-1] + y[:-1]]
    before = core.snapshot()
    receive_all(core, stream)
    after = core.snapshot()
    followed = after.symbols_followed - before.symbols_followed
    missed = after.symbols_missed - before.symbols_missed
    assert (followed, missed) == (2 * 3 + 2 * 3 * 4, 2 * 3)


def test_bytes_gathered_move_with_each_new_symbol_before_any_chunk_completes() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_all(core, manifest_datagrams())
    size = MANIFEST.fec.symbol_size
    receive_all(core, DATA[0][:10] + DATA[0][:10] + DATA[1][:3])  # duplicates add nothing
    snap = core.snapshot()
    assert snap.bytes_done == 0 and snap.bytes_gathered == 13 * size
    receive_all(core, DATA[0])  # complete: its real length, nothing more for its repair
    assert core.snapshot().bytes_gathered == MANIFEST.chunk_span(0)[1] + 3 * size
    for index in range(MANIFEST.chunk_count):
        receive_all(core, DATA[index])
    assert core.snapshot().bytes_gathered == len(IMAGE) == core.snapshot().bytes_total


def test_sources_heard_count_senders_of_the_session_not_other_traffic_and_are_bounded() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_from(core, [(d, "fd51::9") for d in DATA[0][:2]])  # held before the manifest
    receive_all(core, manifest_datagrams(), source="fd51::1")  # manifests alone: not counted
    assert core.snapshot().sources == 1  # the held ones' sender, counted once they are used
    receive_from(core, [(b"junk", "fd51::66"), (DATA[1][0], "fd51::2")])
    receive_reads(core, [DATA[1][1], DATA[1][2]], source="fd51::3")
    assert core.snapshot().sources == 3
    receive_from(core, [(DATA[2][i], f"fd52::{i:x}") for i in range(MAX_SOURCES_COUNTED + 5)])
    assert core.snapshot().sources == MAX_SOURCES_COUNTED


def test_a_chunk_whose_block_number_is_not_0_is_repaired_by_the_in_memory_decoder() -> None:
    # Chunk 2 is source block 2 of the image's FLUTE object (SBN 2 on the wire); the codec
    # decodes it alone, as block 0, and panics on any other block number.
    assert DATA[2][0][wire.CODEC_PACKET_OFFSET] == 2
    core = ReceiverCore(TRUST, now=NOW)  # in-memory decoders
    receive_all(core, manifest_datagrams())
    k = MANIFEST.source_symbols(2)
    lossy = [d for esi, d in enumerate(DATA[2]) if esi >= k or esi % 3]  # repair needed
    events = receive_all(core, lossy)
    assert [e.index for e in events if isinstance(e, ChunkComplete)] == [2]
    assert rebuilt(events) == IMAGE[2 * CHUNK : 3 * CHUNK]
    assert "decoder-fault" not in core.stats.rejected


# --- Decodes submitted elsewhere (the driver's decode worker) ----------------------------------


class _Submits:
    """Answers `SUBMITTED` once it holds K symbols, as the store's decoder with a worker does;
    records what it was fed."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.fed: list[int] = []
        self.discarded = 0

    def feed(self, packet: bytes | memoryview) -> FeedResult:
        self.fed.append(int.from_bytes(packet[1:4], "big"))
        return SUBMITTED if len(self.fed) >= self.k else None

    def discard(self) -> None:
        self.discarded += 1
        self.fed.clear()


def _submitting_core() -> tuple[ReceiverCore, dict[int, _Submits]]:
    decoders: dict[int, _Submits] = {}

    def factory(chunk: int, length: int, size: int) -> _Submits:
        decoders[chunk] = _Submits(MANIFEST.source_symbols(chunk))
        return decoders[chunk]

    core = ReceiverCore(TRUST, now=NOW, manifest=verified_envelope(), decoder_factory=factory)
    return core, decoders


def test_a_submitted_chunk_refuses_its_symbols_unseen_until_its_decode_ends() -> None:
    core, decoders = _submitting_core()
    k = MANIFEST.source_symbols(0)
    receive_all(core, DATA[0][: k + 5])
    assert len(decoders[0].fed) == k  # the 5 after the K-th were not fed
    assert core.stats.rejected["decode-pending"] == 5
    # Not enough independent symbols: it collects again, and the symbols refused meanwhile
    # are taken when they come again (they were never marked seen).
    core.chunk_decoded(0, None, NOW)
    assert not core.has_events and core.stats.duplicates == 0
    receive_all(core, DATA[0][k : k + 1])  # (refused above, now taken)
    assert decoders[0].fed[-1] == k and core.stats.duplicates == 0
    # Its bytes are hashed as an inline decode's, then kept.
    core.chunk_decoded(0, IMAGE[:CHUNK], NOW)
    assert [e.index for e in drain(core) if isinstance(e, ChunkComplete)] == [0]
    assert 0 in core.done


def test_a_submitted_decode_that_is_wrong_discards_the_chunk_s_symbols() -> None:
    core, decoders = _submitting_core()
    k = MANIFEST.source_symbols(0)
    receive_all(core, DATA[0][:k])
    core.chunk_decoded(0, b"\0" * len(IMAGE[:CHUNK]), NOW)
    assert core.stats.rejected["chunk-hash-mismatch"] == 1 and decoders[0].discarded == 1
    assert 0 not in core.done and not drain(core)


def test_a_submitted_decode_that_ends_after_its_chunk_completed_otherwise_is_ignored() -> None:
    core, decoders = _submitting_core()
    k = MANIFEST.source_symbols(0)
    receive_all(core, DATA[0][:k])
    core.mark_done(0, NOW)  # fetched over HTTP meanwhile
    drain(core)
    core.chunk_decoded(0, b"\0" * len(IMAGE[:CHUNK]), NOW)  # stale: not hashed, not counted
    assert "chunk-hash-mismatch" not in core.stats.rejected and not drain(core)
    assert decoders[0].discarded == 0


def test_only_decodes_left_once_every_unfinished_chunk_is_submitted() -> None:
    core, _ = _submitting_core()
    assert not core.only_decodes_left
    for chunk in range(MANIFEST.chunk_count):
        assert not core.only_decodes_left
        receive_all(core, DATA[chunk][: MANIFEST.source_symbols(chunk)])
    assert core.only_decodes_left
    core.chunk_decoded(0, None, NOW)  # back to collecting
    assert not core.only_decodes_left
