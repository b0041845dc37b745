"""Datagram layouts: golden bytes, the struct fast path against the construct specification,
and round trips of every packet kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from construct import ConstructError
from hypothesis import given
from hypothesis import strategies as st

from otacast.schemas import wire
from otacast.schemas.errors import PacketError
from otacast.schemas.limits import (
    MAX_DATAGRAM,
    MAX_ESI,
    MAX_MANIFEST_BYTES,
    MIN_MANIFEST_FRAGMENT,
)

GOLDEN = Path(__file__).parent / "golden" / "datagrams.json"

SESSION = bytes.fromhex("0123456789abcdef")
ENVELOPE_ID = bytes.fromhex("fedcba9876543210")

sessions = st.binary(min_size=8, max_size=8)
data_packets = st.builds(
    wire.DataPacket,
    session=sessions,
    chunk=st.integers(0, 0xFFFFFFFF),
    esi=st.integers(0, MAX_ESI),
    symbol=st.binary(min_size=1, max_size=MAX_DATAGRAM - wire.DATA_HEADER_SIZE),
)


@st.composite
def manifest_packets(draw: st.DrawFn) -> wire.ManifestPacket:
    fragment = draw(st.binary(min_size=1, max_size=MAX_DATAGRAM - wire.MANIFEST_HEADER_SIZE))
    if len(fragment) < MIN_MANIFEST_FRAGMENT:  # only the last fragment may be short
        total = draw(st.integers(len(fragment), MAX_MANIFEST_BYTES))
        offset = total - len(fragment)
    else:
        total = draw(st.integers(len(fragment), MAX_MANIFEST_BYTES))
        offset = draw(st.integers(0, total - len(fragment)))
    return wire.ManifestPacket(
        draw(sessions), draw(st.binary(min_size=8, max_size=8)), total, offset, fragment
    )


auth_packets = st.builds(
    wire.AuthPacket,
    session=sessions,
    sender=st.integers(0, 0xFFFF),
    chunk=st.integers(0, 0xFFFFFFFF),
    page=st.integers(0, 0xFFFFFFFF),
    sent=st.integers(0, (1 << 64) - 1),
    digests=st.integers(1, wire.auth_capacity(MAX_DATAGRAM)).flatmap(
        lambda n: st.binary(min_size=n * wire.DIGEST_BYTES, max_size=n * wire.DIGEST_BYTES)
    ),
    signature=st.binary(min_size=64, max_size=64),
)

packets = st.one_of(data_packets, manifest_packets(), auth_packets)


def _golden() -> dict[str, str]:
    loaded: dict[str, str] = json.loads(GOLDEN.read_text())
    return loaded


GOLDEN_PACKETS: dict[str, wire.Packet] = {
    "data_first_symbol": wire.DataPacket(SESSION, 0, 0, b"\x00\x01\x02\x03"),
    "data_repair_symbol_last_chunk": wire.DataPacket(SESSION, 0x01020304, MAX_ESI, b"\xff" * 8),
    "manifest_first_fragment": wire.ManifestPacket(
        SESSION, ENVELOPE_ID, 300, 0, b'{"signed"' + b" " * 247
    ),
    "manifest_last_fragment": wire.ManifestPacket(SESSION, ENVELOPE_ID, 300, 296, b"}]}\n"),
    "auth_two_digests": wire.AuthPacket(
        SESSION, 2, 5, 1, 0x0001020304050607, b"A" * 10 + b"B" * 10, b"\x5a" * 64
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_PACKETS))
def test_packets_build_to_the_checked_in_golden_bytes(name: str) -> None:
    expected = bytes.fromhex(_golden()[name])
    packet = GOLDEN_PACKETS[name]
    assert wire.build_datagram(packet) == expected
    assert wire.build_datagram_spec(packet) == expected
    assert wire.parse_datagram(expected) == packet
    assert wire.parse_datagram_spec(expected) == packet


def test_golden_file_has_no_stale_entries() -> None:
    assert set(_golden()) == set(GOLDEN_PACKETS)


def test_data_header_layout_matches_the_documented_offsets() -> None:
    # Written out by hand from the module docstring, independently of the code under test.
    expected = (
        b"OC"  # magic
        + b"\x02"  # version
        + b"\x01"  # kind DATA
        + SESSION
        + b"\x00\x00\x00\x07"  # chunk 7
        + b"\x00"  # SBN 0
        + b"\x00\x01\x00"  # ESI 256
        + b"sym"
    )
    assert wire.build_datagram(wire.DataPacket(SESSION, 7, 256, b"sym")) == expected


def test_auth_layout_matches_the_documented_offsets() -> None:
    expected = (
        b"OC\x02\x03"
        + SESSION
        + b"\x00\x07"  # sender 7
        + b"\x00\x01"  # one digest
        + b"\x00\x00\x00\x03"  # chunk 3
        + b"\x00\x00\x00\x09"  # page 9
        + b"\x00\x06\x2b\x1a\x9c\x40\x5a\x11"  # sent
        + b"D" * 10
        + b"S" * 64
    )
    packet = wire.AuthPacket(SESSION, 7, 3, 9, 0x00062B1A9C405A11, b"D" * 10, b"S" * 64)
    assert wire.build_datagram(packet) == expected
    assert wire.auth_signed_bytes(expected) == wire.AUTH_CONTEXT + expected[:-64]


def test_default_auth_datagram_fits_a_default_data_datagram_with_113_digests() -> None:
    assert wire.auth_capacity(1228) == 113
    digests = bytes(113 * wire.DIGEST_BYTES)
    packet = wire.AuthPacket(SESSION, 0, 0, 0, 0, digests, bytes(64))
    assert len(wire.build_datagram(packet)) <= 1228


def test_codec_packet_is_the_tail_of_a_data_datagram() -> None:
    datagram = wire.build_datagram(wire.DataPacket(SESSION, 3, 0x123456, b"abcd"))
    assert datagram[wire.CODEC_PACKET_OFFSET :] == b"\x00\x12\x34\x56abcd"


def test_default_data_datagram_fits_the_ipv6_minimum_mtu() -> None:
    from otacast.schemas.fec import DEFAULT_SYMBOL_SIZE

    assert wire.data_datagram_size(DEFAULT_SYMBOL_SIZE) <= 1232
    assert DEFAULT_SYMBOL_SIZE == 1208
    assert DEFAULT_SYMBOL_SIZE % 8 == 0


@given(packets)
def test_every_packet_round_trips_through_both_framings(packet: wire.Packet) -> None:
    fast = wire.build_datagram(packet)
    assert fast == wire.build_datagram_spec(packet)
    assert wire.parse_datagram(fast) == packet
    assert wire.parse_datagram_spec(fast) == packet


def _outcome(parse: object, data: bytes) -> object:
    try:
        return parse(data)  # type: ignore[operator]
    except PacketError as exc:
        return ("rejected", exc.reason)


@given(st.binary(max_size=64))
def test_fast_and_spec_parsers_agree_on_arbitrary_bytes(data: bytes) -> None:
    assert _outcome(wire.parse_datagram, data) == _outcome(wire.parse_datagram_spec, data)


@given(packets, st.integers(0, 40), st.integers(0, 255))
def test_fast_and_spec_parsers_agree_on_corrupted_headers(
    packet: wire.Packet, position: int, value: int
) -> None:
    data = bytearray(wire.build_datagram(packet))
    if position < len(data):
        data[position] = value
    assert _outcome(wire.parse_datagram, bytes(data)) == _outcome(
        wire.parse_datagram_spec, bytes(data)
    )


@given(packets, st.integers(0, 60))
def test_fast_and_spec_parsers_agree_on_truncated_datagrams(packet: wire.Packet, keep: int) -> None:
    data = wire.build_datagram(packet)[:keep]
    assert _outcome(wire.parse_datagram, data) == _outcome(wire.parse_datagram_spec, data)


def _peek_spec(data: bytes) -> tuple[bytes, int, int, int] | None:
    """What `wire.peek_data` must answer, read with the construct definition."""
    try:
        header = wire.HEADER.parse(data)
        body = wire.DATA_BODY.parse(data[wire.HEADER_SIZE :])
    except ConstructError:
        return None
    if (header.magic, header.version, header.kind) != (wire.MAGIC, wire.VERSION, wire.KIND_DATA):
        return None
    if not body.symbol:
        return None
    return header.session, body.chunk, body.sbn, body.esi


@pytest.mark.parametrize("name", sorted(n for n in GOLDEN_PACKETS if n.startswith("data_")))
def test_peek_data_reads_the_golden_data_datagrams(name: str) -> None:
    packet = GOLDEN_PACKETS[name]
    assert isinstance(packet, wire.DataPacket)
    golden = bytes.fromhex(_golden()[name])
    expected = (packet.session, packet.chunk, 0, packet.esi)
    assert wire.peek_data(golden) == expected == _peek_spec(golden)
    assert wire.peek_data(memoryview(golden)) == expected


@pytest.mark.parametrize("name", sorted(n for n in GOLDEN_PACKETS if not n.startswith("data_")))
def test_peek_data_refuses_the_golden_datagrams_of_other_kinds(name: str) -> None:
    assert wire.peek_data(bytes.fromhex(_golden()[name])) is None


def test_peek_data_reads_the_sbn_the_documented_layout_puts_at_byte_16() -> None:
    raw = b"OC\x02\x01" + SESSION + b"\x00\x00\x00\x07" + b"\x05" + b"\x00\x01\x00" + b"sym"
    assert wire.peek_data(raw) == (SESSION, 7, 5, 256) == _peek_spec(raw)
    assert wire.peek_data(raw[: wire.DATA_HEADER_SIZE]) is None  # no symbol


@given(packets)
def test_peek_data_agrees_with_both_parsers_on_every_packet(packet: wire.Packet) -> None:
    data = wire.build_datagram(packet)
    peeked = wire.peek_data(data)
    assert peeked == _peek_spec(data)
    if isinstance(packet, wire.DataPacket):
        assert peeked == (packet.session, packet.chunk, 0, packet.esi)
        assert data[wire.DATA_HEADER_SIZE :] == packet.symbol
    else:
        assert peeked is None


@given(st.binary(max_size=64))
def test_peek_data_agrees_with_the_specification_on_arbitrary_bytes(data: bytes) -> None:
    assert wire.peek_data(data) == _peek_spec(data)


@given(data_packets, st.integers(0, wire.DATA_HEADER_SIZE), st.integers(0, 255), st.integers(0, 40))
def test_peek_data_agrees_with_the_specification_on_corrupted_data_datagrams(
    packet: wire.DataPacket, position: int, value: int, keep: int
) -> None:
    data = bytearray(wire.build_datagram(packet))
    data[position] = value  # a DATA datagram is at least 21 bytes
    for candidate in (bytes(data), bytes(data[:keep])):
        assert wire.peek_data(candidate) == _peek_spec(candidate)


def test_parser_accepts_memoryview_of_a_receive_buffer() -> None:
    packet = wire.DataPacket(SESSION, 1, 2, b"xyz")
    buffer = bytearray(MAX_DATAGRAM)
    raw = wire.build_datagram(packet)
    buffer[: len(raw)] = raw
    assert wire.parse_datagram(memoryview(buffer)[: len(raw)]) == packet


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"OC\x02", "short"),
        (b"XX\x01\x01" + SESSION + bytes(9), "bad-magic"),
        (b"OC\x01\x01" + SESSION + bytes(9), "bad-version"),  # the format before v2
        (b"OC\x02\x09" + SESSION + bytes(9), "unknown-kind"),
        (b"OC\x02\x03" + SESSION + bytes(90), "short"),  # AUTH without room for a digest
        (b"OC\x02\x03" + SESSION + bytes(28 + 11 + 64), "auth-length"),  # count 0, stray byte
        (b"OC\x02\x03" + SESSION + b"\x00\x00\x00\x02" + bytes(24 + 10 + 64), "auth-length"),
        (b"OC\x02\x01" + SESSION + bytes(8), "short"),  # DATA without a symbol
        (b"OC\x02\x01" + SESSION + b"\x00\x00\x00\x00\x01\x00\x00\x00sym", "bad-sbn"),
        (b"OC\x02\x01" + SESSION + bytes(MAX_DATAGRAM), "oversized"),
        (b"OC\x02\x02" + SESSION + ENVELOPE_ID + bytes(8), "short"),  # no fragment
        (
            b"OC\x02\x02" + SESSION + ENVELOPE_ID + (2**31).to_bytes(4, "big") + bytes(4) + b"x",
            "manifest-length",
        ),
        (
            b"OC\x02\x02"
            + SESSION
            + ENVELOPE_ID
            + (10).to_bytes(4, "big")
            + (8).to_bytes(4, "big")
            + b"xyz",
            "fragment-range",
        ),
    ],
)
def test_hostile_datagrams_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    for parse in (wire.parse_datagram, wire.parse_datagram_spec):
        with pytest.raises(PacketError) as caught:
            parse(data)
        assert caught.value.reason == reason


def test_a_short_fragment_that_is_not_the_last_is_refused() -> None:
    # 1-byte fragments at millions of offsets would make reassembly bookkeeping huge.
    short = wire.ManifestPacket(SESSION, ENVELOPE_ID, 1000, 999, b"x")  # the last: fine
    assert wire.parse_datagram(wire.build_datagram(short)) == short
    raw = wire.build_datagram(short)[:20] + (1000).to_bytes(4, "big") + (5).to_bytes(4, "big")
    for parse in (wire.parse_datagram, wire.parse_datagram_spec):
        with pytest.raises(PacketError) as caught:
            parse(raw + b"x")
        assert caught.value.reason == "fragment-length"


def test_fragments_reassemble_to_the_envelope() -> None:
    envelope = bytes(range(256)) * 20
    fragments = wire.fragment_envelope(SESSION, ENVELOPE_ID, envelope, 1232)
    assert all(len(wire.build_datagram(f)) <= 1232 for f in fragments)
    rebuilt = bytearray(len(envelope))
    for fragment in fragments:
        parsed = wire.parse_datagram(wire.build_datagram(fragment))
        assert isinstance(parsed, wire.ManifestPacket)
        rebuilt[parsed.offset : parsed.offset + len(parsed.fragment)] = parsed.fragment
    assert bytes(rebuilt) == envelope


def test_packet_constructors_refuse_values_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError):
        wire.DataPacket(SESSION, 0, MAX_ESI + 1, b"x")
    with pytest.raises(ValueError):
        wire.DataPacket(SESSION[:4], 0, 0, b"x")
    with pytest.raises(ValueError):
        wire.DataPacket(SESSION, 0, 0, b"")
    with pytest.raises(ValueError):
        wire.ManifestPacket(SESSION, ENVELOPE_ID, 10, 8, b"xyz")
