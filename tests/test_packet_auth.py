"""Packet authentication: AUTH pages from the sender's builder, checked by the receiver core.

Driven with real RaptorQ symbols, real Ed25519 signatures and an injected clock; no sockets.
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
from otacast.schemas.limits import UNTRUSTED_AUTH_VERIFY_RATE
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
CHUNK = 65536
IMAGE = random.Random(11).randbytes(3 * CHUNK + 999)
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


def _forged(chunk: int, esi: int, seed: int) -> bytes:
    """A well-formed DATA datagram of the session with a random symbol: FEC pollution."""
    symbol = random.Random(seed).randbytes(MANIFEST.fec.symbol_size)
    return wire.build_datagram(wire.DataPacket(MANIFEST.session_id, chunk, esi, symbol))


def _stream(forged_per_datagram: int = 0) -> list[tuple[bytes, str]]:
    """Pages then their data, chunk after chunk, with forged repair symbols mixed in."""
    out = [(d, SENDER) for d in manifest_datagrams(ENVELOPE)]
    seed = 0
    for chunk, cycle in enumerate(CYCLES):
        for position, datagram in enumerate(cycle):
            if position % CAPACITY == 0:
                out.append((PAGES[chunk][position // CAPACITY], SENDER))
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
    # Every forged datagram was held, never decoded: the decoders saw honest symbols only.
    honest = sum(len(c) for c in CYCLES)
    assert core.stats.symbols_used <= honest
    assert core.authenticator.stats.pages_signed == len(PAGES)  # one signature per chunk
    assert core.authenticator.stats.pages_linked == sum(len(p) for p in PAGES) - len(PAGES)


def test_without_packet_authentication_the_same_forgeries_spoil_decodes() -> None:
    # The attack the mechanism exists for: with it off, forged symbols are decoded and the
    # chunks they pollute fail their hash (the image still never contains a forged byte).
    core = ReceiverCore(TRUST, now=NOW, packet_auth="off")
    events = receive_from(core, _stream(forged_per_datagram=3))
    assert core.authenticator is None
    assert core.stats.rejected["chunk-hash-mismatch"] > 0
    assert core.stats.auth_ignored == sum(len(p) for p in PAGES)
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
    events = receive_from(core, [(PAGES[0][0], SENDER)])
    assert core.authenticator is not None
    assert core.authenticator.stats.datagrams_released == CAPACITY  # every one it lists
    assert [e.index for e in events if isinstance(e, ChunkComplete)] == [0]


def test_pages_and_data_heard_before_the_manifest_are_replayed_once_it_is_verified() -> None:
    core = ReceiverCore(TRUST, now=NOW)
    early = [(PAGES[0][0], SENDER)] + [(d, SENDER) for d in CYCLES[0][:50]]
    receive_from(core, early)
    assert core.verified is None
    receive_from(core, [(d, SENDER) for d in manifest_datagrams(ENVELOPE)])
    assert core.stats.symbols_used == 50


def _authenticator(
    check: SignatureCheck = check_signature,
) -> tuple[PacketAuthenticator, Counter[str]]:
    rejected: Counter[str] = Counter()
    auth = PacketAuthenticator(
        {0: STREAM_KEY.public},
        rejected,
        now=NOW,
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


def test_a_page_signed_by_a_key_the_manifest_does_not_list_is_refused() -> None:
    auth, rejected = _authenticator()
    forged = _resigned(PAGES[0][0], STRANGER_KEY)
    assert auth.on_auth(_page(forged), forged, ATTACKER, NOW) == []
    assert rejected == {"auth-forged": 1}
    assert not auth.admit(CYCLES[0][0])  # nothing it listed was admitted


def test_a_page_for_an_unknown_sender_is_refused_without_a_verification() -> None:
    calls: list[bytes] = []

    def record(public: bytes, message: bytes, signature: bytes) -> bool:
        calls.append(message)
        return True

    auth, rejected = _authenticator(record)
    forged = _resigned(PAGES[0][0], STREAM_KEY, sender=9)
    auth.on_auth(_page(forged), forged, ATTACKER, NOW)
    assert rejected == {"auth-unknown-sender": 1} and calls == []


def test_a_forged_page_in_place_of_a_linked_one_costs_a_hash_not_a_signature() -> None:
    calls: list[bytes] = []
    auth, rejected = _authenticator(_counting(calls))
    auth.on_auth(_page(PAGES[0][0]), PAGES[0][0], SENDER, NOW)
    assert len(calls) == 1
    digests = random.Random(1).randbytes(len(_page(PAGES[0][1]).digests))
    forged = _resigned(PAGES[0][1], STREAM_KEY, digests=digests)  # even validly signed
    auth.on_auth(_page(forged), forged, ATTACKER, NOW)
    assert rejected == {"auth-forged": 1} and len(calls) == 1
    auth.on_auth(_page(PAGES[0][1]), PAGES[0][1], SENDER, NOW)  # the real one still links
    assert auth.stats.pages_linked == 1 and len(calls) == 1


def test_a_flood_of_pages_from_strangers_is_rationed_and_the_sender_keeps_its_allowance() -> None:
    calls: list[bytes] = []
    auth, rejected = _authenticator(_counting(calls))
    auth.on_auth(_page(PAGES[1][0]), PAGES[1][0], SENDER, NOW)  # the sender is known now
    flood = 5000
    for n in range(flood):  # one second of forged, unlinked pages
        forged = _resigned(PAGES[0][0], STRANGER_KEY, page=1000 + n)
        auth.on_auth(_page(forged), forged, ATTACKER, NOW + n / flood)
    strangers_verified = len(calls) - 1
    assert strangers_verified <= UNTRUSTED_AUTH_VERIFY_RATE * 1.5
    assert rejected["auth-budget"] >= flood - strangers_verified
    for chunk in (0, 2):  # pages of chunks not yet linked still need (and get) a verification
        assert auth.on_auth(_page(PAGES[chunk][0]), PAGES[chunk][0], SENDER, NOW + 1) == []
    assert auth.stats.pages_signed == 3


def test_a_second_copy_of_an_accepted_page_costs_one_lookup() -> None:
    calls: list[bytes] = []
    auth, _ = _authenticator(_counting(calls))
    for _ in range(3):
        auth.on_auth(_page(PAGES[0][0]), PAGES[0][0], SENDER, NOW)
    assert len(calls) == 1 and auth.stats.pages_repeated == 2


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
    datagram = b"OC\x01\x03" + MANIFEST.session_id + body
    core.receive_datagram(datagram, ATTACKER, NOW, wall=NOW)
    assert core.stats.symbols_used == 0


def test_pages_link_in_order_and_cover_every_datagram_of_the_cycle() -> None:
    for cycle, pages in zip(CYCLES, PAGES, strict=True):
        listed = b"".join(_page(p).digests for p in pages)
        assert listed == b"".join(wire.packet_digest(d) for d in cycle)
        for page, following in itertools.pairwise(pages):
            assert _page(page).link == wire.auth_link(following)
        assert _page(pages[-1]).link == wire.NO_LINK
        assert all(len(p) <= SIZE for p in pages)  # never larger than a DATA datagram


def test_the_carousel_sends_each_page_twice_ahead_of_its_data_and_again_after_the_gap() -> None:
    cycles = [len(c) for c in CYCLES]
    timing = AuthTiming(CAPACITY)
    pages = AuthPages(PAGES)

    def before(chunk: int, first: int, count: int) -> list[bytes]:
        # What the sender core's SendAuth names, as the driver turns it into datagrams.
        named = timing.before(chunk, first, count)
        return pages.for_action(SendAuth(chunk, named, AUTH_COPIES)) if named else []

    sent: Counter[bytes] = Counter()
    for chunk, length in enumerate(cycles):
        first = 0
        while first < length:
            count = min(40, length - first)
            sent.update(before(chunk, first, count))
            # The page of every datagram in the run has gone out twice by now.
            for position in range(first, first + count):
                assert sent[PAGES[chunk][position // CAPACITY]] == 2
            first += count
    assert set(sent.values()) == {2}
    assert len(sent) == sum(len(p) for p in PAGES)
    assert pages.datagrams == sum(sent.values())
    assert pages.bytes == sum(len(d) * n for d, n in sent.items())
    assert before(0, 0, 40) == []  # sent just now
    for _ in range(timing.gap // 40 + 1):  # ... then a pass's worth of other data
        before(1, 0, 40)
    assert before(0, 0, 40) == [PAGES[0][0]] * 2


def test_a_later_copy_of_an_accepted_page_admits_its_data_again_without_a_signature() -> None:
    # A receiver that needs a second pass sees pages it accepted long ago, whose digests it has
    # since forgotten: the copy must vouch for the data again, by hash.
    calls: list[bytes] = []
    auth, _ = _authenticator(_counting(calls))
    auth.on_auth(_page(PAGES[0][0]), PAGES[0][0], SENDER, NOW)
    auth._admitted.clear()  # forgotten, as after MAX_AUTH_DIGESTS other digests
    assert not auth.admit(CYCLES[0][0])
    released = auth.on_auth(_page(PAGES[0][0]), PAGES[0][0], SENDER, NOW + 60)
    assert released == [CYCLES[0][0]] and len(calls) == 1
    assert auth.admit(CYCLES[0][1])


def test_trust_is_lost_with_the_first_forged_page_and_never_displaces_an_active_sender() -> None:
    from otacast.schemas.limits import MAX_AUTH_SOURCES

    auth, rejected = _authenticator()
    auth.on_auth(_page(PAGES[0][0]), PAGES[0][0], SENDER, NOW)  # the real sender: trusted
    # Hosts that replay genuine pages become trusted, but cannot push the real sender out ...
    replayed = [p for pages in PAGES for p in pages[:1]][1:]
    for n, page in enumerate(replayed * 40):
        if len(auth._trusted) >= MAX_AUTH_SOURCES:
            break
        auth._pages.clear()
        auth._links.clear()
        auth.on_auth(_page(page), page, f"fd51::{n + 100:x}", NOW + 1)
    assert SENDER in auth._trusted
    # ... and the first forged page sent from a trusted address makes it a stranger again.
    attacker = next(s for s in auth._trusted if s != SENDER)
    forged = _resigned(PAGES[1][0], STRANGER_KEY, page=7)
    auth.on_auth(_page(forged), forged, attacker, NOW + 2)
    assert attacker not in auth._trusted and rejected["auth-forged"] == 1
