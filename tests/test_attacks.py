"""The adversarial suite, pure half: attacks on the receiver core, named after the attack.

Every test feeds the sans-IO `ReceiverCore` what an attacker on the LAN could send (no sockets,
an injected clock) and asserts the two rules of issue 6: nothing forged ever comes out of the
core as a verified chunk or session, and the honest release still completes afterwards.  The
network half, with real senders, an injecting attacker, nginx and `otacast fetch`, is
``integration/test_attacks_*.py`` (one file per attack surface).

Two attacks that packet authentication does not cover are checked here too: a flood of forged
DATA must still let the stall timer ask for fallback, and forged MANIFEST fragments must not keep
the manifest out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from otacast.plugin.core import ReceiverCore
from otacast.plugin.decoder import ChunkDecoder, raptorq_decoder
from otacast.plugin.events import ChunkComplete, FallbackNeeded, ManifestRefused, ManifestVerified
from otacast.plugin.verify import check_signature
from otacast.schemas import fec, wire
from otacast.schemas.limits import (
    MANIFEST_VERIFY_BURST_UNSIGNED,
    MANIFEST_VERIFY_RATE_UNSIGNED,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_DATAGRAM,
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
)
from otacast.schemas.manifest import Chunking, Envelope, ImageInfo, Manifest, Signature
from otacast.schemas.manifest import signing_message as manifest_message
from otacast.schemas.policy import TrustSet
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import (
    CHUNK,
    DATA,
    IMAGE,
    KEY,
    MANIFEST,
    NOW,
    SENDER,
    TRUST,
    cycles,
    drain,
    interleaved,
    manifest_datagrams,
    rebuilt,
    receive_all,
    receive_from,
    reference_envelope,
)

# The smallest valid chunk: 64 KiB rounded up to whole default-size symbols.
SMALLEST_CHUNK = fec.choose_chunk_size(1, 0, fec.DEFAULT_SYMBOL_SIZE)


def honest_chunks_only(events: Sequence[object]) -> None:
    """Nothing forged came out: every chunk the core handed on is the image's own bytes."""
    for event in events:
        if isinstance(event, ChunkComplete):
            offset, length = MANIFEST.chunk_span(event.index)
            assert event.data == IMAGE[offset : offset + length], f"forged chunk {event.index}"


def spy_factory() -> tuple[list[int], Callable[[int, int, int], ChunkDecoder]]:
    """A real decoder factory that records every decoder it makes (state kept for a session)."""
    made: list[int] = []

    def factory(chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
        made.append(length)
        return raptorq_decoder(chunk, length, symbol_size)

    return made, factory


def assert_no_session_state(core: ReceiverCore, made: list[int]) -> None:
    assert core.verified is None
    assert not core.done and not made
    assert core.stats.symbols_used == 0
    assert not core._pending and not core._chunks  # no reassembly or decoder outlives a refusal


def unchecked_envelope(manifest: Manifest, keys: list[SigningKey]) -> Envelope:
    """Signed by trusted keys but never round-tripped through the parser (as `sign` would):
    what a compromised or careless build pipeline could publish."""
    message = manifest_message(manifest)
    return Envelope(manifest, tuple(Signature(k.key_id, k.sign(message)) for k in keys))


def data_of(envelope: Envelope, image: bytes) -> list[bytes]:
    """Every source symbol of another release, as DATA datagrams of its session."""
    return [d for cycle in cycles(envelope.manifest, image, 0) for d in cycle]


# --- Replay of an older valid release --------------------------------------------------------

OLD_IMAGE = random.Random(99).randbytes(3 * CHUNK - 17)


@pytest.mark.parametrize("old_sequence", [3, 4])  # older than, and equal to, the installed one
def test_replay_of_an_older_release_is_refused_by_sequence_counted_and_the_new_one_completes(
    old_sequence: int,
) -> None:
    old = reference_envelope(OLD_IMAGE, sequence=old_sequence)
    made, factory = spy_factory()
    core = ReceiverCore(TRUST, now=NOW, installed_sequence=4, decoder_factory=factory)
    replayed = data_of(old, OLD_IMAGE)
    events = receive_all(core, manifest_datagrams(old) * 5 + replayed)
    assert [(type(e), getattr(e, "reason", None)) for e in events] == [
        (ManifestRefused, "Rollback")
    ]
    assert core.stats.rejected["manifest-refused"] == 1  # verified once ...
    assert core.stats.rejected["refused-manifest"] == 4  # ... then dropped by one lookup
    assert_no_session_state(core, made)
    # The current release (sequence 5) arrives with the replay still running around it.
    events = receive_all(core, manifest_datagrams() + replayed + interleaved(0.0) + replayed)
    assert isinstance(events[0], ManifestVerified) and core.complete
    assert rebuilt(events) == IMAGE
    honest_chunks_only(events)
    # Every replayed DATA datagram is counted: those held before the session was chosen when it
    # was, the rest as they came.
    assert core.stats.rejected["other-session"] == 3 * len(replayed)


# --- Manifests that must be refused before any state is kept ---------------------------------

KEY2 = SigningKey(b"\x04" * 32)
STRANGER = SigningKey(b"\x0b" * 32)
TWO_OF_TWO = TrustSet.from_public_keys([KEY.public, KEY2.public], threshold=2)


def _expired() -> Envelope:
    m = dataclasses.replace(MANIFEST, created=int(NOW) - 7200, expires=int(NOW) - 60)
    return sign(m, [KEY, KEY2])


REFUSED = {
    "expired": (_expired, "Expired"),
    "wrong-device": (
        lambda: sign(dataclasses.replace(MANIFEST, compatible=("toaster",)), [KEY, KEY2]),
        "WrongDevice",
    ),
    "below-threshold": (lambda: sign(MANIFEST, [KEY]), "BelowThreshold"),
    "unknown-key": (lambda: sign(MANIFEST, [STRANGER]), "UnknownKey"),
}


@pytest.mark.parametrize("attack", sorted(REFUSED))
def test_expired_wrong_device_below_threshold_and_unknown_key_manifests_keep_no_state(
    attack: str,
) -> None:
    make, reason = REFUSED[attack]
    hostile = make()
    made, factory = spy_factory()
    core = ReceiverCore(
        TWO_OF_TWO,
        now=NOW,
        device_type="raspberrypi4",
        installed_sequence=1,
        decoder_factory=factory,
    )
    # Its data too: a session of the hostile release would use it.
    events = receive_all(core, manifest_datagrams(hostile) * 3 + data_of(hostile, IMAGE))
    assert [(type(e), getattr(e, "reason", None)) for e in events] == [(ManifestRefused, reason)]
    assert_no_session_state(core, made)
    # The release signed as the device requires is still taken, and completes.
    honest = sign(MANIFEST, [KEY, KEY2])
    events = receive_all(core, manifest_datagrams(honest) + interleaved(0.0))
    assert isinstance(events[0], ManifestVerified) and core.complete
    assert rebuilt(events) == IMAGE


# --- A flood of forged manifests ------------------------------------------------------------


def forged_manifests(count: int) -> list[list[bytes]]:
    """`count` distinct small envelopes claiming the trusted key, with signatures that fail."""
    rng = random.Random(5)
    return [
        manifest_datagrams(
            Envelope(
                dataclasses.replace(MANIFEST, sequence=100 + i),
                (Signature(KEY.key_id, rng.randbytes(64)),),
            )
        )
        for i in range(count)
    ]


def test_a_flood_of_forged_manifests_costs_bounded_verifications_and_the_sender_gets_through() -> (
    None
):
    checks = 0

    def counting(public: bytes, message: bytes, signature: bytes) -> bool:
        nonlocal checks
        checks += 1
        return check_signature(public, message, signature)

    core = ReceiverCore(TRUST, now=NOW, installed_sequence=5, signature_check=counting)
    # The channel's sender serves the installed release: refused, but genuinely signed.
    events = receive_all(core, manifest_datagrams(), NOW)
    assert [getattr(e, "reason", None) for e in events] == ["Rollback"]
    # Ten seconds of 100 forged manifests a second, half from one host, half from as many hosts.
    forged = forged_manifests(1000)
    for step in range(100):
        now = NOW + step / 10
        for i in range(step * 10, step * 10 + 10):
            source = "fd51::66" if i % 2 else f"fd51::{1000 + i:x}"
            receive_all(core, forged[i], now, source=source)
    # Without the budget: 1000 Ed25519 verifications (and 1000 refusals).  With it, the shared
    # allowance of sources that never sent a signed manifest, and no more.
    allowed = MANIFEST_VERIFY_BURST_UNSIGNED + MANIFEST_VERIFY_RATE_UNSIGNED * 10
    assert checks - 1 <= allowed
    assert core.stats.rejected["manifest-refused"] - 1 <= allowed
    assert core.stats.rejected["manifest-budget"] >= 1000 - allowed
    # Mid-flood, the sender that has sent a signed manifest starts the next release: taken.
    newer = reference_envelope(sequence=6)
    stream = [(d, SENDER) for d in manifest_datagrams(newer)]
    stream[:0] = [(d, "fd51::66") for d in forged[-1]]
    events = receive_from(core, stream, NOW + 10)
    assert isinstance(events[-1], ManifestVerified)
    assert core.verified is not None and core.verified.manifest.sequence == 6


# --- Claimed sizes beyond the caps -----------------------------------------------------------


def test_manifest_fragments_claiming_more_than_the_manifest_cap_are_refused_before_reassembly() -> (
    None
):
    # The packet class refuses such claims, so the EXT_FTI's transfer length (F, bytes 18-23),
    # fragment size (E, 26-27) and the fragment index (ESI, 34-35) are written by hand.
    template = bytearray(manifest_datagrams()[0][: wire.MANIFEST_HEADER_SIZE])
    forged = []
    for total in (MAX_MANIFEST_BYTES + 1, (1 << 48) - 1):
        for index in range(400):
            template[18:24] = total.to_bytes(6, "big")
            template[26:28] = (1000).to_bytes(2, "big")
            template[34:36] = index.to_bytes(2, "big")
            forged.append(bytes(template) + b"x" * 1000)
    core = ReceiverCore(TRUST, now=NOW)
    tracemalloc.start()
    try:
        receive_all(core, forged)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert core.stats.rejected == {"manifest-length": len(forged)}
    assert not core._pending
    assert peak < 256 * 1024  # nothing proportional to the 4 GiB claimed, or to the flood
    # An honest manifest still assembles and verifies.
    assert isinstance(receive_all(core, manifest_datagrams())[0], ManifestVerified)


def _over_cap(image_length: int, chunk_size: int) -> Manifest:
    chunk_size = chunk_size // MANIFEST.fec.symbol_size * MANIFEST.fec.symbol_size  # whole symbols
    count = -(-image_length // chunk_size)
    return dataclasses.replace(
        MANIFEST,
        image=ImageInfo("huge.img", image_length, b"\x11" * 32, "raw"),
        chunks=Chunking(chunk_size, tuple(i.to_bytes(32, "big") for i in range(count))),
    )


@pytest.mark.parametrize(
    ("claim", "manifest"),
    [
        ("image", _over_cap(MAX_IMAGE_BYTES + 1, MAX_CHUNK_BYTES)),
        ("chunk count", _over_cap((MAX_CHUNKS + 1) * SMALLEST_CHUNK, SMALLEST_CHUNK)),
    ],
)
def test_signed_manifests_claiming_sizes_beyond_the_caps_are_refused_before_a_session(
    claim: str, manifest: Manifest
) -> None:
    envelope = unchecked_envelope(manifest, [KEY])  # validly signed by the trusted key
    assert len(envelope.compact_bytes) < MAX_MANIFEST_BYTES  # it does reach the verifier
    made, factory = spy_factory()
    core = ReceiverCore(TRUST, now=NOW, decoder_factory=factory)
    events = receive_all(core, manifest_datagrams(envelope))
    assert [(type(e), getattr(e, "reason", None)) for e in events] == [
        (ManifestRefused, "MalformedManifest")
    ], claim
    assert_no_session_state(core, made)
    # A DATA datagram naming a chunk beyond the signed count never reaches a decoder either.
    receive_all(core, manifest_datagrams())
    beyond = wire.build_datagram(wire.DataPacket(MANIFEST.tsi, 2**32 - 1, 0, b"s" * 1208))
    receive_all(core, [beyond])
    assert core.stats.rejected["chunk-range"] == 1 and not made


# --- Malformed datagrams ---------------------------------------------------------------------


def _malformed() -> list[tuple[str, str, bytes]]:
    """(reason before a session exists, reason after, datagram)."""
    session = MANIFEST.session_id
    good = DATA[0][0]
    manifest_head = manifest_datagrams()[0][: wire.MANIFEST_HEADER_SIZE]
    too_big = good + b"\0" * (MAX_DATAGRAM + 1 - len(good))
    hostile = [
        ("short", b""),
        ("short", b"O"),
        ("short", good[:11]),  # truncated inside the header
        ("short", good[: wire.DATA_HEADER_SIZE]),  # DATA header, no symbol
        ("short", manifest_head),
        ("oversized", manifest_head + b"\0" * 60000),
        ("bad-version", b"\x00" + good[1:]),
        ("bad-version", b"\x20" + good[1:]),  # LCT version 2
        ("bad-version", b"\xff" + good[1:]),
        ("old-wire-version", b"OC\x02\x01" + session + good[12:]),  # otacast wire 2 DATA
        ("old-wire-version", b"OC\x02\x02" + session + bytes(30)),  # ... and MANIFEST
        ("bad-header", good[:1] + b"\xa1" + good[2:]),  # the close-object flag
        ("bad-header", good[:4] + b"\x00\x00\x00\x01" + good[8:]),  # a CCI
        ("unknown-kind", good[:3] + b"\x09" + good[4:]),  # codepoint 9
        ("bad-toi", good[:12] + bytes(4) + good[16:]),  # DATA of the FDT's TOI
        ("symbol-length", good[:-1]),  # our session, one byte short
        ("symbol-length", good + b"\0"),  # one byte long
        ("symbol-length", good[: wire.DATA_HEADER_SIZE + 8]),
        ("symbol-length", good + b"\0" * (MAX_DATAGRAM - len(good))),  # the largest allowed
        ("chunk-range", good[:16] + b"\x09" + good[17:]),  # SBN 9 of an object of 4 chunks
    ]
    # A DATA datagram of our session past the size limit: refused by the parser while no
    # session exists, by the session's exact-length check (before parsing) once one does.
    return [(r, r, d) for r, d in hostile] + [("oversized", "symbol-length", too_big)]


def test_truncated_oversized_wrong_version_and_wrong_length_symbol_datagrams_are_counted() -> None:
    made, factory = spy_factory()
    core = ReceiverCore(TRUST, now=NOW, decoder_factory=factory)
    hostile = _malformed()
    # Before the manifest (some are held, then refused once a session exists) and after it.
    receive_all(core, [d for _, _, d in hostile])
    before = dict(core.stats.rejected)
    events = receive_all(core, manifest_datagrams())
    assert isinstance(events[0], ManifestVerified)
    receive_all(core, [d for _, _, d in hostile])
    expected: Counter[str] = Counter()
    for reason_before, reason_after, _ in hostile:
        expected[reason_before] += 1
        expected[reason_after] += 1
    assert core.stats.rejected == expected, before
    assert not made and core.stats.symbols_used == 0
    events = receive_all(core, interleaved(0.0) + [d for _, _, d in hostile])
    assert core.complete and rebuilt(events) == IMAGE


# --- Forged packets at ten times the honest rate, without packet authentication -------------


def forged_data(rng: random.Random) -> bytes:
    """What an attacker who read the session id off the channel sends: a DATA datagram of the
    right session, size and chunk range, with a random ESI and random symbol bytes."""
    symbol = rng.randbytes(MANIFEST.fec.symbol_size)
    chunk, esi = rng.randrange(MANIFEST.chunk_count), rng.getrandbits(24)
    return wire.build_datagram(wire.DataPacket(MANIFEST.tsi, chunk, esi, symbol))


def flood(core: ReceiverCore, honest: list[bytes], ratio: int, seconds: float) -> list[object]:
    """The honest datagrams spread over `seconds`, `ratio` forged ones after each."""
    rng = random.Random(3)
    events: list[object] = []
    step = seconds / len(honest)
    for i, datagram in enumerate(honest):
        now = NOW + i * step
        core.receive_datagram(datagram, "fd51::1", now, wall=now)
        for _ in range(ratio):
            core.receive_datagram(forged_data(rng), "fd51::66", now, wall=now)
        core.handle_timer(now)
        events += drain(core)
    return events


def test_forged_data_at_10x_without_packet_auth_never_completes_a_forged_chunk() -> None:
    core = ReceiverCore(TRUST, now=NOW, stall_timeout=2.0)
    receive_all(core, manifest_datagrams())
    events = flood(core, interleaved(0.0) * 4, ratio=10, seconds=8.0)
    honest_chunks_only(events)
    assert core.stats.rejected["chunk-hash-mismatch"] > 0  # the forgeries did reach decoders


def test_forged_data_at_10x_without_packet_auth_still_leads_to_fallback() -> None:
    core = ReceiverCore(TRUST, now=NOW, stall_timeout=2.0)
    receive_all(core, manifest_datagrams())
    events = flood(core, interleaved(0.0) * 4, ratio=10, seconds=8.0)
    honest_chunks_only(events)
    # Forged symbols spoil decodes but are not progress: the stall timer asks for fallback.
    assert core.complete or FallbackNeeded("stalled") in events, (
        f"{len(core.done)} of {MANIFEST.chunk_count} chunks after 8 s of flood and no "
        f"fallback asked (stall timeout 2 s); rejected {dict(core.stats.rejected)}"
    )


def test_forged_manifest_fragments_at_10x_do_not_keep_the_manifest_out() -> None:
    # Fragments claiming another total length go to a reassembly of their own.
    rng = random.Random(5)
    core = ReceiverCore(TRUST, now=NOW)
    honest = [wire.parse_datagram(d) for d in manifest_datagrams()]
    for _ in range(50):  # 50 turns of the carousel
        batch = [wire.build_datagram(p) for p in honest]
        for _ in range(10 * len(honest)):
            q = rng.choice(honest)
            assert isinstance(q, wire.ManifestPacket)
            total = q.total_length + 1
            forged = wire.ManifestPacket(
                q.tsi,
                q.toi,
                total,
                q.fragment_size,
                q.index,
                rng.randbytes(min(q.fragment_size, total - q.offset)),
            )
            batch.append(wire.build_datagram(forged))
        rng.shuffle(batch)
        receive_all(core, batch)
        if core.verified is not None:
            return
    raise AssertionError(f"no manifest after 50 carousel turns: {dict(core.stats.rejected)}")


def test_garbage_fragments_from_another_host_do_not_poison_the_senders_reassembly() -> None:
    rng = random.Random(9)
    core = ReceiverCore(TRUST, now=NOW)
    for datagram in manifest_datagrams():
        q = wire.parse_datagram(datagram)
        assert isinstance(q, wire.ManifestPacket)
        garbage = dataclasses.replace(q, fragment=rng.randbytes(len(q.fragment)))
        core.receive_datagram(
            wire.build_datagram(garbage), "fd51::66", NOW, wall=NOW
        )  # arrives first
        core.receive_datagram(datagram, "fd51::1", NOW, wall=NOW)
    assert core.verified is not None  # on the first turn of the carousel


def test_a_flood_of_fragments_from_many_hosts_stays_within_the_reassembly_byte_cap() -> None:
    from otacast.schemas.limits import MAX_PENDING_MANIFEST_BYTES, MAX_PENDING_MANIFESTS

    rng = random.Random(10)
    core = ReceiverCore(TRUST, now=NOW)
    for n in range(20_000):
        toi = wire.manifest_toi(rng.randbytes(8))
        forged = wire.ManifestPacket(
            MANIFEST.tsi, toi, 2_000_000, 1200, rng.randrange(1500), rng.randbytes(1200)
        )
        core.receive_datagram(wire.build_datagram(forged), f"fd51::{n % 300:x}", NOW, wall=NOW)
        pending = core._pending  # the bound under test is internal state
        assert len(pending) <= MAX_PENDING_MANIFESTS
        assert sum(a.covered for a in pending.values()) <= MAX_PENDING_MANIFEST_BYTES
    receive_all(core, manifest_datagrams())  # the honest sender still gets through
    assert core.verified is not None


def _envelope_of(datagrams: Sequence[bytes]) -> tuple[wire.ManifestPacket, bytes]:
    """The first fragment and the whole envelope the fragments carry."""
    packets = [wire.parse_datagram(d) for d in datagrams]
    assert all(isinstance(p, wire.ManifestPacket) for p in packets)
    first = packets[0]
    assert isinstance(first, wire.ManifestPacket)
    envelope = b"".join(p.fragment for p in sorted(packets, key=lambda p: p.offset))  # type: ignore[union-attr]
    return first, envelope


def test_a_forgery_ground_to_the_genuine_manifest_toi_does_not_get_the_release_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The manifest TOI is 31 bits of the envelope's SHA-256, ~2^31 hashes to match.  The grind
    # is stood in for by a `manifest_toi` that gives the forgery the genuine TOI.
    genuine, _ = _envelope_of(manifest_datagrams())
    forged = b'{"signed": {}, "signatures": []}' + b" " * 300
    forged_digest = hashlib.sha256(forged).digest()
    real_toi = wire.manifest_toi
    monkeypatch.setattr(
        wire,
        "manifest_toi",
        lambda digest: genuine.toi if digest == forged_digest else real_toi(digest),
    )
    core = ReceiverCore(TRUST, now=NOW)
    copy = wire.ManifestPacket(genuine.tsi, genuine.toi, len(forged), len(forged), 0, forged)
    for _ in range(3):  # sent ahead of each carousel turn
        core.receive_datagram(wire.build_datagram(copy), "fd51::66", NOW, wall=NOW)
    assert core.stats.rejected["manifest-refused"] == 1  # verified once, known by its hash
    assert core.stats.rejected["refused-manifest"] == 2
    receive_all(core, manifest_datagrams())
    assert core.verified is not None


def test_a_genuine_manifest_replayed_under_other_tsis_is_refused_without_a_signature_check() -> (
    None
):
    checks: list[bytes] = []

    def counted(public: bytes, message: bytes, signature: bytes) -> bool:
        checks.append(message)
        return check_signature(public, message, signature)

    genuine, envelope = _envelope_of(manifest_datagrams())
    core = ReceiverCore(TRUST, now=NOW, signature_check=counted, installed_sequence=5)
    replays = 0
    for tsi in range(1, 200):  # a new TSI each time: never a repeat of an earlier key
        replay = wire.ManifestPacket(tsi, genuine.toi, len(envelope), len(envelope), 0, envelope)
        core.receive_datagram(wire.build_datagram(replay), "fd51::66", NOW, wall=NOW)
        replays += 1
    # At most the shared allowance of sources that never sent a signed manifest got a parse;
    # none got a signature check, and the source earned no allowance of its own.
    refused = core.stats.rejected["manifest-session"]
    assert 0 < refused <= MANIFEST_VERIFY_BURST_UNSIGNED
    assert refused + core.stats.rejected["manifest-budget"] == replays
    assert checks == []
    # Under its own TSI the same envelope is verified (and refused here as no newer than the
    # installed sequence 5: the device's rule, not a replay's doing).
    receive_all(core, manifest_datagrams())
    assert len(checks) == 1
    assert core.stats.rejected["manifest-refused"] == 1
