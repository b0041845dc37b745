"""Packet authentication: AUTH pages from the sender's builder, checked by the receiver core.

Driven with real RaptorQ symbols, real Ed25519 signatures and an injected clock; no sockets.
The replay tests play the attacker of docs/SECURITY.md: a host without keys that recorded
genuine pages earlier and sends them again.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin.auth import PacketAuthenticator, SignatureCheck
from otacast.plugin.core import ReceiverCore
from otacast.plugin.events import ChunkComplete, ImageComplete, ManifestRefused
from otacast.plugin.verify import check_signature
from otacast.schemas import wire
from otacast.schemas.limits import (
    AUTH_REORDER_SECONDS,
    MAX_AUTH_KEPT_PAGES,
    MAX_AUTH_SOURCES,
    TRUST_IDLE_SECONDS,
    UNTRUSTED_AUTH_VERIFY_RATE,
)
from otacast.schemas.policy import TrustSet
from otacast.signer.auth_pages import AuthPages
from otacast.signer.keys import SigningKey
from otacast.signer.schedule import AUTH_COPIES, AuthTiming, SendAuth

from .helpers import (
    auth_pages,
    cycles,
    make_release,
    manifest_datagrams,
    rebuilt,
    receive_from,
)

RELEASE_KEY = SigningKey(b"\x03" * 32)
STREAM_KEY = SigningKey(b"\x05" * 32)
STRANGER_KEY = SigningKey(b"\x06" * 32)
TRUST = TrustSet.from_public_keys([RELEASE_KEY.public])
NOW = 1_800_000_000.0
CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
IMAGE = random.Random(11).randbytes(4 * CHUNK - 999)
SENDER = "fd51::1"
ATTACKER = "fd51::66"

ENVELOPE = make_release(
    IMAGE, RELEASE_KEY, sequence=5, chunk_size=CHUNK, stream_keys=[STREAM_KEY]
).envelope  # STREAM_KEY is sender 0
PLAIN = make_release(IMAGE, RELEASE_KEY, sequence=5, chunk_size=CHUNK).envelope
MANIFEST = ENVELOPE.manifest
SIZE = wire.data_datagram_size(MANIFEST.fec.symbol_size)
CAPACITY = wire.auth_capacity(SIZE)
REPAIR = 200  # repair symbols per chunk: each cycle spans several AUTH pages
CYCLES = cycles(MANIFEST, IMAGE, REPAIR)
PAGES = auth_pages(MANIFEST, CYCLES, STREAM_KEY)
PAGE_COUNTS = [PAGES.page_count(c) for c in range(len(CYCLES))]


def _signed(chunk: int, index: int, t: float = 0.0) -> bytes:
    """Page `index` of `chunk` as the sender signs it at ``NOW + t``."""
    fresh = AuthPages(PAGES.tsi, PAGES.sender, PAGES.digests, PAGES.capacity, PAGES.sign)
    return fresh.page(chunk, index, NOW + t)


def _forged(chunk: int, esi: int, seed: int) -> bytes:
    """A well-formed DATA datagram of the session with a random symbol: FEC pollution."""
    symbol = random.Random(seed).randbytes(MANIFEST.fec.symbol_size)
    return wire.build_datagram(wire.DataPacket(MANIFEST.tsi, chunk, esi, symbol))


def _stream(forged_per_datagram: int = 0, t: float = 0.0) -> list[tuple[bytes, str]]:
    """Pages then their data, chunk after chunk, with forged repair symbols mixed in."""
    out = [(d, SENDER) for d in manifest_datagrams(ENVELOPE)]
    seed = 0
    for chunk, cycle in enumerate(CYCLES):
        for position, datagram in enumerate(cycle):
            if position % CAPACITY == 0:
                later = t + 1e-3 * len(out)  # the sender's clock runs on
                out.append((_signed(chunk, position // CAPACITY, later), SENDER))
            for _ in range(forged_per_datagram):
                seed += 1
                esi = len(cycle) + seed  # a repair ESI the sender has not used yet
                out.append((_forged(chunk, esi % (1 << 24), seed), ATTACKER))
            out.append((datagram, SENDER))
    return out


def test_forged_symbols_never_reach_a_decoder_when_packets_are_authenticated() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    events = receive_from(core, _stream(forged_per_datagram=3))
    assert isinstance(events[-1], ImageComplete)
    assert rebuilt(events) == IMAGE
    assert core.authenticator is not None
    assert core.stats.rejected["chunk-hash-mismatch"] == 0
    assert core.stats.rejected["decoder-fault"] == 0
    # Every forged datagram was held or refused, never decoded: the decoders saw honest symbols.
    honest = sum(len(c) for c in CYCLES)
    assert core.stats.symbols_used <= honest
    # One verification per page of the cycles the decodes needed (the rest came too late).
    assert 0 < core.authenticator.stats.pages_signed <= sum(PAGE_COUNTS)


def test_without_packet_authentication_the_same_forgeries_spoil_decodes() -> None:
    # The attack the mechanism exists for: with it off, forged symbols are decoded and the
    # chunks they pollute fail their hash (the image still never contains a forged byte).
    core = ReceiverCore(TRUST, now=NOW, packet_auth="off")
    events = receive_from(core, _stream(forged_per_datagram=3))
    assert core.authenticator is None
    assert core.stats.rejected["chunk-hash-mismatch"] > 0
    assert core.stats.auth_ignored == sum(PAGE_COUNTS)
    assert not core.complete
    assert all(
        e.data == IMAGE[e.index * CHUNK : (e.index + 1) * CHUNK]
        for e in events
        if isinstance(e, ChunkComplete)
    )


def test_data_that_arrives_before_its_page_is_held_and_released_by_it() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_from(core, [(d, SENDER) for d in manifest_datagrams(ENVELOPE)])
    receive_from(core, [(d, SENDER) for d in CYCLES[0][:CAPACITY]])
    assert core.stats.symbols_used == 0
    events = receive_from(core, [(_signed(0, 0), SENDER)])
    assert core.authenticator is not None
    assert core.authenticator.stats.datagrams_released == CAPACITY  # every one it lists
    assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]


def test_pages_and_data_heard_before_the_manifest_are_replayed_once_it_is_verified() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    early = [(_signed(0, 0), SENDER)] + [(d, SENDER) for d in CYCLES[0][:50]]
    receive_from(core, early)
    assert core.verified is None
    receive_from(core, [(d, SENDER) for d in manifest_datagrams(ENVELOPE)])
    assert core.stats.symbols_used == 50


def _authenticator(
    check: SignatureCheck = check_signature, done: set[int] | None = None
) -> tuple[PacketAuthenticator, Counter[str]]:
    rejected: Counter[str] = Counter()
    auth = PacketAuthenticator(
        {0: STREAM_KEY.public},
        rejected,
        now=NOW,
        datagram_size=SIZE,
        chunk_count=MANIFEST.chunk_count,
        done=done if done is not None else set(),
        check=check,
    )
    return auth, rejected


def _counting(calls: list[bytes]) -> SignatureCheck:
    """The real check, recording each call."""

    def check(public: bytes, message: bytes, signature: bytes) -> bool:
        calls.append(message)
        return check_signature(public, message, signature)

    return check


def _page(datagram: bytes) -> wire.AuthPacket:
    packet = wire.parse_datagram(datagram)
    assert isinstance(packet, wire.AuthPacket)
    return packet


def _resigned(datagram: bytes, key: SigningKey, **changes: object) -> bytes:
    packet = dataclasses.replace(_page(datagram), **changes)  # type: ignore[arg-type]
    unsigned = wire.build_datagram(packet)
    return unsigned[:-64] + key.sign(wire.auth_signed_bytes(unsigned))


def _offer(auth: PacketAuthenticator, datagram: bytes, source: str, now: float) -> list[bytes]:
    return auth.on_auth(_page(datagram), datagram, source, now)


def _admit(auth: PacketAuthenticator, chunk: int, esi: int) -> bool:
    return auth.admit(CYCLES[chunk][esi], chunk, esi)


def test_a_page_signed_by_a_key_the_manifest_does_not_list_is_refused() -> None:
    auth, rejected = _authenticator()
    forged = _resigned(_signed(0, 0), STRANGER_KEY)
    assert _offer(auth, forged, ATTACKER, NOW) == []
    assert rejected == {"auth-forged": 1}
    assert not _admit(auth, 0, 0)  # nothing it listed was admitted


def test_a_page_for_an_unknown_sender_is_refused_without_a_verification() -> None:
    calls: list[bytes] = []

    def record(public: bytes, message: bytes, signature: bytes) -> bool:
        calls.append(message)
        return True

    auth, rejected = _authenticator(record)
    forged = _resigned(_signed(0, 0), STREAM_KEY, sender=9)
    _offer(auth, forged, ATTACKER, NOW)
    assert rejected == {"auth-unknown-sender": 1} and calls == []


def test_pages_beyond_the_chunks_or_the_page_size_are_refused_without_a_verification() -> None:
    calls: list[bytes] = []
    auth, rejected = _authenticator(_counting(calls))
    page = _signed(0, 0)
    for changes in (
        {"chunk": MANIFEST.chunk_count},
        {"digests": bytes(wire.DIGEST_BYTES * (CAPACITY + 1))},
        {"page": (1 << 24) // CAPACITY + 1},
    ):
        forged = _resigned(page, STREAM_KEY, **changes)
        assert _offer(auth, forged, ATTACKER, NOW) == []
    assert rejected == {"auth-range": 3} and calls == []


def test_a_datagram_its_accepted_page_does_not_list_is_refused_at_once_not_held() -> None:
    auth, rejected = _authenticator()
    _offer(auth, _signed(0, 0), SENDER, NOW)
    assert _admit(auth, 0, 3)
    forged = _forged(0, 3, seed=1)  # claims ESI 3, whose digest the page lists
    assert not auth.admit(forged, 0, 3)
    assert rejected == {"unauthenticated": 1} and not auth._held


def test_a_flood_of_pages_from_strangers_is_rationed_and_the_sender_keeps_its_allowance() -> None:
    calls: list[bytes] = []
    auth, rejected = _authenticator(_counting(calls))
    _offer(auth, _signed(1, 0), SENDER, NOW)  # the sender is known now
    flood = 5000
    template = _signed(0, 0)
    for n in range(flood):  # one second of forged pages
        forged = _resigned(template, STRANGER_KEY, page=1000 + n)
        _offer(auth, forged, ATTACKER, NOW + n / flood)
    strangers_verified = len(calls) - 1
    assert strangers_verified <= UNTRUSTED_AUTH_VERIFY_RATE * 1.5
    assert rejected["auth-budget"] >= flood - strangers_verified
    for chunk in (0, 2):  # the sender's next pages still get their verification
        _offer(auth, _signed(chunk, 0), SENDER, NOW + 1)
    assert auth.stats.pages_signed == 3


def test_a_second_copy_of_an_accepted_page_costs_one_lookup() -> None:
    calls: list[bytes] = []
    auth, _ = _authenticator(_counting(calls))
    page = _signed(0, 0)
    for _ in range(3):
        _offer(auth, page, SENDER, NOW)
    assert len(calls) == 1 and auth.stats.pages_repeated == 2


def test_a_recorded_page_is_refused_as_stale_without_a_verification() -> None:
    # The attacker recorded page 1 of chunk 0 a second ago and replays it after the sender has
    # moved on: it costs a comparison, no signature check, and admits nothing.
    calls: list[bytes] = []
    auth, rejected = _authenticator(_counting(calls))
    recorded = _signed(0, 1, t=0.0)
    _offer(auth, _signed(1, 0, t=1.0), SENDER, NOW + 1)
    assert _offer(auth, recorded, ATTACKER, NOW + 1) == []
    assert rejected == {"auth-stale": 1} and len(calls) == 1
    assert not _admit(auth, 0, CAPACITY)


def test_a_page_reordered_within_the_window_is_still_accepted() -> None:
    auth, rejected = _authenticator()
    earlier = _signed(0, 1, t=0.0)
    _offer(auth, _signed(1, 0, t=AUTH_REORDER_SECONDS / 2), SENDER, NOW)
    assert _offer(auth, earlier, SENDER, NOW) == []
    assert not rejected and _admit(auth, 0, CAPACITY)


def test_pages_of_a_chunk_already_complete_are_dropped_unchecked() -> None:
    calls: list[bytes] = []
    auth, rejected = _authenticator(_counting(calls), done={0})
    _offer(auth, _signed(0, 0), SENDER, NOW)
    assert calls == [] and not rejected and auth.stats.pages_late == 1


def test_only_the_latest_pages_of_a_sender_are_kept() -> None:
    auth, _ = _authenticator()
    pages = [(chunk, index) for chunk in range(3) for index in range(PAGE_COUNTS[chunk])]
    assert len(pages) > MAX_AUTH_KEPT_PAGES
    for n, (chunk, index) in enumerate(pages):
        _offer(auth, _signed(chunk, index, t=n / 1000), SENDER, NOW + n / 1000)
    kept = pages[-MAX_AUTH_KEPT_PAGES:]
    assert sorted(auth._kept) == sorted(kept)
    oldest = pages[0]
    assert not _admit(auth, oldest[0], oldest[1] * CAPACITY)  # held: its page is gone


def test_a_sender_whose_clock_went_back_is_heard_again_after_the_idle_time() -> None:
    auth, rejected = _authenticator()
    _offer(auth, _signed(0, 0, t=3600.0), SENDER, NOW)  # an earlier run, an hour ahead
    restarted = wire.build_datagram(dataclasses.replace(_page(_signed(1, 0)), sent=1))
    restarted = _resigned(restarted, STREAM_KEY)
    assert _offer(auth, restarted, SENDER, NOW + 1) == []
    assert rejected == {"auth-stale": 1}
    _offer(auth, restarted, SENDER, NOW + 1 + TRUST_IDLE_SECONDS)
    assert auth.stats.pages_signed == 2 and _admit(auth, 1, 0)


def _recorded_loop() -> list[bytes]:
    """Every page of every chunk as an attacker recorded it a minute before the download."""
    return [
        _signed(chunk, index, t=-60.0)
        for chunk in range(len(CYCLES))
        for index in range(PAGE_COUNTS[chunk])
    ]


def test_replayed_pages_at_the_honest_packet_rate_cost_nothing_but_lookups() -> None:
    # Attack 1 of issue 13: pages recorded earlier, replayed one per honest datagram, for the
    # chunks not being sent at that moment.  The download needs exactly the honest datagrams of
    # a clean run and no replayed page costs a signature check.
    recorded = _recorded_loop()
    clean = ReceiverCore(TRUST, now=NOW)
    clean_events = receive_from(clean, _stream())
    attacked = ReceiverCore(TRUST, now=NOW)
    calls: list[bytes] = []
    attacked.signature_check = _counting(calls)
    stream = []
    replay = itertools.cycle(recorded)
    early = 0  # replays heard before the sender's first page: nothing is newer yet
    paged = False
    for datagram, source in _stream(t=1.0):
        paged = paged or isinstance(wire.parse_datagram(datagram), wire.AuthPacket)
        early += not paged
        stream.append((datagram, source))
        stream.append((next(replay), ATTACKER))
    events = receive_from(attacked, stream)
    assert rebuilt(events) == rebuilt(clean_events) == IMAGE
    assert attacked.stats.symbols_used == clean.stats.symbols_used
    assert attacked.authenticator is not None and clean.authenticator is not None
    pages_checked = [m for m in calls if m.startswith(wire.AUTH_CONTEXT)]  # (not the manifest)
    assert len(pages_checked) == attacked.authenticator.stats.pages_signed
    # Once the sender's first page is heard, no replay costs a verification.
    extra = attacked.authenticator.stats.pages_signed - clean.authenticator.stats.pages_signed
    assert extra <= early
    assert attacked.stats.rejected["auth-stale"] > len(recorded)


def test_replayed_pages_with_genuine_symbols_of_passed_chunks_hold_nothing_up() -> None:
    # Attack 2 of issue 13: a recorded page plus one genuine symbol of it, for each chunk the
    # sender has just passed.  The stale page is refused; the symbol is held as unvouched, never
    # pinning receive state, and the download needs no more honest datagrams than a clean one.
    recorded = _recorded_loop()
    clean = ReceiverCore(TRUST, now=NOW)
    receive_from(clean, _stream())
    attacked = ReceiverCore(TRUST, now=NOW)
    stream = []
    replays = 0
    for datagram, source in _stream(t=1.0):
        stream.append((datagram, source))
        packet = wire.parse_datagram(datagram)
        if isinstance(packet, wire.AuthPacket) and packet.chunk > 0:
            passed = packet.chunk - 1
            for page in recorded:
                if _page(page).chunk == passed:
                    stream.append((page, ATTACKER))
                    stream.append((CYCLES[passed][len(CYCLES[passed]) - 1], ATTACKER))
                    replays += 1
    events = receive_from(attacked, stream)
    assert rebuilt(events) == IMAGE
    assert attacked.stats.symbols_used == clean.stats.symbols_used
    auth, honest = attacked.authenticator, clean.authenticator
    assert auth is not None and honest is not None
    assert auth.stats.pages_signed == honest.stats.pages_signed  # no replay was verified
    # Each replayed page was dropped unchecked: its chunk is complete, or it is stale.
    refused = (
        auth.stats.pages_late - honest.stats.pages_late + attacked.stats.rejected["auth-stale"]
    )
    assert replays > 0 and refused == replays


def test_require_policy_refuses_a_release_without_stream_keys() -> None:
    core = ReceiverCore(TRUST, now=NOW, packet_auth="require")
    events = receive_from(core, [(d, SENDER) for d in manifest_datagrams(PLAIN)])
    assert core.verified is None
    refused = [e for e in events if isinstance(e, ManifestRefused)]
    assert refused and "requires packet authentication" in refused[0].message
    assert core.stats.rejected["manifest-unauthenticated"] == 1


def test_auto_policy_decodes_a_release_without_stream_keys_as_before() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    plain_cycles = cycles(PLAIN.manifest, IMAGE, REPAIR)
    stream = [(d, SENDER) for d in manifest_datagrams(PLAIN)]
    stream += [(d, SENDER) for cycle in plain_cycles for d in cycle]
    events = receive_from(core, stream)
    assert core.authenticator is None and rebuilt(events) == IMAGE


def test_an_unknown_policy_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="packet_auth"):
        ReceiverCore(TRUST, now=NOW, packet_auth="sometimes")


@given(st.binary(max_size=1400))
def test_arbitrary_auth_datagrams_of_the_session_never_raise(body: bytes) -> None:
    core = ReceiverCore(TRUST, now=NOW)
    receive_from(core, [(d, SENDER) for d in manifest_datagrams(ENVELOPE)])
    auth_tsi = MANIFEST.tsi ^ wire.AUTH_TSI_BIT
    datagram = b"\x10\xa0\x04\x00" + bytes(4) + auth_tsi.to_bytes(4, "big") + body
    core.receive_datagram(datagram, ATTACKER, NOW, wall=NOW)
    assert core.stats.symbols_used == 0


def test_pages_cover_every_datagram_of_the_cycle_and_carry_increasing_times() -> None:
    sent = []
    for chunk, cycle in enumerate(CYCLES):
        pages = [_page(PAGES.page(chunk, i, NOW)) for i in range(PAGE_COUNTS[chunk])]
        listed = b"".join(p.digests for p in pages)
        assert listed == b"".join(wire.packet_digest(d) for d in cycle)
        assert all(p.count <= CAPACITY for p in pages)
        sent += [p.sent for p in pages]
    assert sent == sorted(set(sent))  # strictly increasing, even signed within one microsecond
    assert all(len(_signed(c, 0)) <= SIZE for c in range(len(CYCLES)))  # never above a DATA one


def test_the_carousel_sends_each_page_twice_ahead_of_its_data_and_again_after_the_gap() -> None:
    cycles = [len(c) for c in CYCLES]
    timing = AuthTiming(CAPACITY)
    pages = auth_pages(MANIFEST, CYCLES, STREAM_KEY)

    def before(chunk: int, first: int, count: int) -> list[bytes]:
        # What the sender core's SendAuth names, as the driver turns it into datagrams.
        named = timing.before(chunk, first, count)
        return pages.for_action(SendAuth(chunk, named, AUTH_COPIES), NOW) if named else []

    sent: Counter[tuple[int, int]] = Counter()
    for chunk, length in enumerate(cycles):
        first = 0
        while first < length:
            count = min(40, length - first)
            for datagram in before(chunk, first, count):
                sent[(_page(datagram).chunk, _page(datagram).page)] += 1
            # The page of every datagram in the run has gone out twice by now.
            for position in range(first, first + count):
                assert sent[(chunk, position // CAPACITY)] == 2
            first += count
    assert set(sent.values()) == {2}
    assert len(sent) == sum(PAGE_COUNTS)
    assert pages.datagrams == sum(sent.values())
    assert before(0, 0, 40) == []  # sent just now
    for _ in range(timing.gap // 40 + 1):  # ... then a pass's worth of other data
        before(1, 0, 40)
    again = before(0, 0, 40)
    assert len(again) == 2 and again[0] == again[1] and _page(again[0]).page == 0


def test_a_page_sent_again_in_a_later_round_is_a_new_page_that_admits_its_data_again() -> None:
    # A receiver that needs a chunk's cycle a second time hears its pages again, freshly signed.
    calls: list[bytes] = []
    auth, _ = _authenticator(_counting(calls))
    _offer(auth, _signed(0, 0, t=0.0), SENDER, NOW)
    others = itertools.cycle([(c, i) for c in range(1, len(CYCLES)) for i in range(PAGE_COUNTS[c])])
    for n in range(MAX_AUTH_KEPT_PAGES):  # the sender moves on: page 0 of chunk 0 is dropped
        chunk, index = next(others)
        _offer(auth, _signed(chunk, index, t=0.001 * (n + 1)), SENDER, NOW)
    assert not _admit(auth, 0, 0)
    released = _offer(auth, _signed(0, 0, t=60.0), SENDER, NOW + 60)
    assert released == [CYCLES[0][0]] and _admit(auth, 0, 1)
    assert len(calls) == MAX_AUTH_KEPT_PAGES + 2


def test_trust_is_lost_with_the_first_forged_page_and_never_displaces_an_active_sender() -> None:
    auth, rejected = _authenticator()
    _offer(auth, _signed(0, 0), SENDER, NOW)  # the real sender: trusted
    # Hosts that relay genuine pages as they hear them become trusted, but cannot push the real
    # sender out ...
    for n in range(2 * MAX_AUTH_SOURCES):
        chunk = 1 + n % 2
        page = _signed(chunk, n // 2 % PAGE_COUNTS[chunk], t=0.001 * (n + 1))
        # (paced within the strangers' allowance, so that every one is verified)
        _offer(auth, page, f"fd51::{n + 100:x}", NOW + 1 + n / UNTRUSTED_AUTH_VERIFY_RATE)
    assert len(auth._trusted) == MAX_AUTH_SOURCES
    assert SENDER in auth._trusted
    # ... and the first forged page sent from a trusted address makes it a stranger again.
    attacker = next(s for s in auth._trusted if s != SENDER)
    forged = _resigned(_signed(1, 0, t=2.0), STRANGER_KEY, page=7)
    _offer(auth, forged, attacker, NOW + 3)
    assert attacker not in auth._trusted and rejected["auth-forged"] == 1


@given(
    chunk=st.integers(0, len(CYCLES) - 1),
    start=st.floats(0, 1, exclude_max=True),
    length=st.integers(1, 2 * CAPACITY),
    forged=st.sets(st.integers(0, 2 * CAPACITY - 1), max_size=3),
    accepted=st.sets(st.integers(0, 2), min_size=1),
)
def test_a_run_is_vouched_for_up_to_the_first_datagram_admit_would_not_take(
    chunk: int, start: float, length: int, forged: set[int], accepted: set[int]
) -> None:
    """`vouched_run` (a run's digests compared with its pages at once) against `admit` one
    datagram at a time: the same leading datagrams pass, across page boundaries, a short last
    page, pages not accepted and forged symbols, and it holds or counts nothing itself."""
    core = ReceiverCore(TRUST, now=NOW)
    pages = [(_signed(chunk, page, 1e-3 * page), SENDER) for page in sorted(accepted)]
    receive_from(core, [(d, SENDER) for d in manifest_datagrams(ENVELOPE)] + pages)
    authenticator = core.authenticator
    assert authenticator is not None
    cycle = CYCLES[chunk]
    first = int(start * len(cycle))
    run = [
        _forged(chunk, esi, esi) if esi - first in forged else cycle[esi]
        for esi in range(first, min(first + length, len(cycle)))
    ]
    before = (dataclasses.asdict(authenticator.stats), dict(core.stats.rejected))
    vouched = authenticator.vouched_run(chunk, first, [memoryview(d) for d in run])
    assert (dataclasses.asdict(authenticator.stats), dict(core.stats.rejected)) == before
    admitted = 0
    for esi, datagram in enumerate(run, first):
        if not authenticator.admit(datagram, chunk, esi):
            break
        admitted += 1
    assert vouched == admitted
