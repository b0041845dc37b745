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

TSI = 0x5E551011
TOI = wire.manifest_toi(bytes.fromhex("fedcba9876543210"))  # 0xfedcba98: the top bit is set

tsis = st.integers(0, 0xFFFFFFFF)
data_packets = st.builds(
    wire.DataPacket,
    tsi=tsis,
    chunk=st.integers(0, 0xFFFFFFFF),
    esi=st.integers(0, MAX_ESI),
    symbol=st.binary(min_size=1, max_size=MAX_DATAGRAM - wire.DATA_HEADER_SIZE),
)


@st.composite
def manifest_packets(draw: st.DrawFn) -> wire.ManifestPacket:
    size = draw(st.integers(MIN_MANIFEST_FRAGMENT, MAX_DATAGRAM - wire.MANIFEST_HEADER_SIZE))
    total = draw(st.integers(1, MAX_MANIFEST_BYTES))
    index = draw(st.integers(0, (total - 1) // size))
    fragment = draw(st.binary(min_size=min(size, total - index * size), max_size=size))
    fragment = fragment[: min(size, total - index * size)]
    toi = draw(st.integers(wire.MANIFEST_TOI_BIT, 0xFFFFFFFF))
    return wire.ManifestPacket(draw(tsis), toi, total, size, index, fragment)


auth_packets = st.builds(
    wire.AuthPacket,
    tsi=tsis,
    sender=st.integers(0, 0xFFFF),
    chunk=st.integers(0, 0xFFFFFFFF),
    page=st.integers(0, 0xFFFFFFFF),
    sent=st.integers(0, (1 << 64) - 1),
    digests=st.integers(1, wire.auth_capacity(MAX_DATAGRAM)).flatmap(
        lambda n: st.binary(min_size=n * wire.DIGEST_BYTES, max_size=n * wire.DIGEST_BYTES)
    ),
    signature=st.binary(min_size=64, max_size=64),
)

index_packets = st.builds(
    wire.IndexPacket,
    tsi=tsis,
    block=st.integers(0, 254),
    esi=st.integers(0, MAX_ESI),
    symbol=st.binary(min_size=1, max_size=MAX_DATAGRAM - wire.DATA_HEADER_SIZE),
)

packets = st.one_of(data_packets, manifest_packets(), auth_packets, index_packets)


def _golden() -> dict[str, str]:
    loaded: dict[str, str] = json.loads(GOLDEN.read_text())
    return loaded


GOLDEN_PACKETS: dict[str, wire.Packet] = {
    "data_first_symbol": wire.DataPacket(TSI, 0, 0, b"\x00\x01\x02\x03"),
    "data_chunk_3_esi_258": wire.DataPacket(TSI, 3, 0x102, b"\x00\x01\x02\x03"),
    "data_repair_symbol_last_chunk": wire.DataPacket(TSI, 0x01020304, MAX_ESI, b"\xff" * 8),
    # The block index object: TOI 0x40000000, block 1 as the SBN.
    "index_block_1_esi_258": wire.IndexPacket(TSI, 1, 0x102, b"\x00\x01\x02\x03"),
    "manifest_first_fragment": wire.ManifestPacket(
        TSI, TOI, 300, 256, 0, b'{"signed"' + b" " * 247
    ),
    "manifest_last_fragment": wire.ManifestPacket(TSI, TOI, 300, 256, 1, b" " * 40 + b"}]}\n"),
    "auth_two_digests": wire.AuthPacket(
        TSI, 2, 5, 1, 0x0001020304050607, b"A" * 10 + b"B" * 10, b"\x5a" * 64
    ),
}
FDT_XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<FDT-Instance/>\n'


def test_fdt_packet_head_builds_to_the_checked_in_golden_bytes() -> None:
    expected = bytes.fromhex(_golden()["fdt_instance_1"])
    built = wire.build_fdt_datagram(TSI, 1, len(FDT_XML), 0, FDT_XML)
    assert built == expected == wire.build_fdt_datagram_spec(TSI, 1, len(FDT_XML), 0, FDT_XML)
    assert (
        wire.parse_datagram(expected) == wire.FdtPacket(TSI) == wire.parse_datagram_spec(expected)
    )
    assert wire.peek_data(expected) is None


@pytest.mark.parametrize("name", sorted(GOLDEN_PACKETS))
def test_packets_build_to_the_checked_in_golden_bytes(name: str) -> None:
    expected = bytes.fromhex(_golden()[name])
    packet = GOLDEN_PACKETS[name]
    assert wire.build_datagram(packet) == expected
    assert wire.build_datagram_spec(packet) == expected
    assert wire.parse_datagram(expected) == packet
    assert wire.parse_datagram_spec(expected) == packet


def test_golden_file_has_no_stale_entries() -> None:
    assert set(_golden()) == {*GOLDEN_PACKETS, "fdt_instance_1"}


def test_data_header_layout_matches_the_documented_offsets() -> None:
    # Written out by hand from the module docstring, independently of the code under test.
    expected = (
        b"\x10\xa0"  # V=1, C=0, PSI=0, S=1, O=01, H=0
        + b"\x04"  # HDR_LEN: 4 words
        + b"\x06"  # codepoint = FEC Encoding ID 6 (RaptorQ)
        + bytes(4)  # CCI
        + b"\x5e\x55\x10\x11"  # TSI
        + b"\x00\x00\x00\x02"  # TOI 2: the image's second part (chunks 255 ..)
        + b"\x07"  # SBN 7: chunk 255 + 7
        + b"\x00\x01\x00"  # ESI 256
        + b"sym"
    )
    assert wire.build_datagram(wire.DataPacket(TSI, 262, 256, b"sym")) == expected
    # The research note's golden header (TSI 0x5e551011, TOI 1, SBN 3, ESI 0x102).
    assert bytes.fromhex(_golden()["data_chunk_3_esi_258"])[:20] == bytes.fromhex(
        "10a00406000000005e5510110000000103000102"
    )


def test_manifest_layout_matches_the_documented_offsets() -> None:
    expected = (
        b"\x10\xa0\x08\x00"  # HDR_LEN 8 (the EXT_FTI), codepoint 0 (Compact No-Code)
        + bytes(4)
        + b"\x5e\x55\x10\x11"
        + b"\xfe\xdc\xba\x98"  # TOI: top bit and 31 bits of the envelope id
        + b"\x40\x04"  # EXT_FTI, 4 words
        + b"\x00\x00\x00\x00\x01\x2c"  # F = 300
        + b"\x00\x00"  # reserved
        + b"\x01\x00"  # E = 256: the fragment size
        + b"\x00\x00\x00\x02"  # B = ceil(F / E)
        + b"\x00\x00"  # SBN 0
        + b"\x00\x01"  # ESI 1: the second fragment, bytes 256 ..
        + b"x" * 44
    )
    packet = wire.ManifestPacket(TSI, TOI, 300, 256, 1, b"x" * 44)
    assert wire.build_datagram(packet) == expected
    assert packet.offset == 256


def test_fdt_head_layout_matches_the_documented_offsets() -> None:
    expected = (
        b"\x10\xa0\x09\x00"  # HDR_LEN 9: EXT_FDT and EXT_FTI
        + bytes(4)
        + b"\x5e\x55\x10\x11"
        + bytes(4)  # TOI 0: the FDT
        + b"\xc0\x20\x00\x01"  # EXT_FDT: HET 192, FLUTE version 2, instance 1
        + b"\x40\x04"
        + (len(FDT_XML)).to_bytes(6, "big")
        + bytes(2)
        + wire.FDT_SYMBOL_SIZE.to_bytes(2, "big")
        + b"\x00\x00\x00\x01"
        + bytes(4)  # SBN 0, ESI 0
    )
    assert wire.build_fdt_datagram(TSI, 1, len(FDT_XML), 0, FDT_XML) == expected + FDT_XML


def test_auth_layout_matches_the_documented_offsets() -> None:
    expected = (
        b"\x10\xa0\x04\x00"  # codepoint 0
        + bytes(4)
        + b"\xde\x55\x10\x11"  # the session's TSI with the top bit flipped
        + b"\x00\x00\x00\x08"  # TOI: 1 + sender 7
        + bytes(4)  # No-Code payload id
        + b"\x00\x07"  # sender 7
        + b"\x00\x01"  # one digest
        + b"\x00\x00\x00\x03"  # chunk 3
        + b"\x00\x00\x00\x09"  # page 9
        + b"\x00\x06\x2b\x1a\x9c\x40\x5a\x11"  # sent
        + b"D" * 10
        + b"S" * 64
    )
    packet = wire.AuthPacket(TSI, 7, 3, 9, 0x00062B1A9C405A11, b"D" * 10, b"S" * 64)
    assert wire.build_datagram(packet) == expected
    assert wire.auth_signed_bytes(expected) == wire.AUTH_CONTEXT + expected[:-64]


def test_default_auth_datagram_fits_a_default_data_datagram_with_112_digests() -> None:
    assert wire.auth_capacity(1228) == 112
    digests = bytes(112 * wire.DIGEST_BYTES)
    packet = wire.AuthPacket(TSI, 0, 0, 0, 0, digests, bytes(64))
    assert len(wire.build_datagram(packet)) <= 1228


def test_codec_packet_is_the_tail_of_a_data_datagram() -> None:
    datagram = wire.build_datagram(wire.DataPacket(TSI, 3, 0x123456, b"abcd"))
    assert datagram[wire.CODEC_PACKET_OFFSET :] == b"\x03\x12\x34\x56abcd"


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


def _peek_spec(data: bytes) -> tuple[int, int, int] | None:
    """What `wire.peek_data` must answer, read with the construct definition."""
    try:
        parsed = wire.DATA.parse(data)
    except ConstructError:
        return None
    if not parsed.symbol or parsed.lct.toi == 0 or parsed.payload_id.sbn >= 255:
        return None
    chunk = (parsed.lct.toi - 1) * 255 + parsed.payload_id.sbn
    return parsed.lct.tsi, chunk, parsed.payload_id.esi


@pytest.mark.parametrize("name", sorted(n for n in GOLDEN_PACKETS if n.startswith("data_")))
def test_peek_data_reads_the_golden_data_datagrams(name: str) -> None:
    packet = GOLDEN_PACKETS[name]
    assert isinstance(packet, wire.DataPacket)
    golden = bytes.fromhex(_golden()[name])
    expected = (packet.tsi, packet.chunk, packet.esi)
    assert wire.peek_data(golden) == expected == _peek_spec(golden)
    assert wire.peek_data(memoryview(golden)) == expected


@pytest.mark.parametrize(
    "name", sorted(n for n in GOLDEN_PACKETS if not n.startswith(("data_", "index_")))
)
def test_peek_data_refuses_the_golden_datagrams_of_other_kinds(name: str) -> None:
    assert wire.peek_data(bytes.fromhex(_golden()[name])) is None


def test_peek_data_reads_the_golden_index_datagram_as_a_chunk_no_release_has() -> None:
    golden = bytes.fromhex(_golden()["index_block_1_esi_258"])
    expected = (TSI, (0x40000000 - 1) * 255 + 1, 0x102)  # TOI 0x40000000, SBN 1
    assert wire.peek_data(golden) == expected == _peek_spec(golden)
    assert expected[1] > 0xFFFFFFFF


def test_a_toi_between_the_last_image_part_and_the_index_is_refused() -> None:
    packet = wire.build_datagram(wire.IndexPacket(TSI, 0, 0, b"sym"))
    for toi in (wire.MAX_PART_TOI + 1, wire.INDEX_TOI - 1, wire.INDEX_TOI + 1):
        other = packet[:12] + toi.to_bytes(4, "big") + packet[16:]
        for parse in (wire.parse_datagram, wire.parse_datagram_spec):
            with pytest.raises(PacketError, match="bad-toi"):
                parse(other)


def test_a_block_of_the_last_image_part_beyond_32_bit_chunks_is_refused_not_raised() -> None:
    # The last part's TOI holds chunk 0xFFFFFFFF at its SBN 0 only; its later SBNs would name
    # chunks no 32-bit index has (once a ValueError that escaped the receiver core).
    last = wire.build_datagram(wire.DataPacket(TSI, 0xFFFFFFFF, 5, b"sym"))
    assert last[12:16] == wire.MAX_PART_TOI.to_bytes(4, "big")
    for parse in (wire.parse_datagram, wire.parse_datagram_spec):
        assert parse(last) == wire.DataPacket(TSI, 0xFFFFFFFF, 5, b"sym")
    for sbn in (1, 2, 254):
        beyond = last[:16] + bytes([sbn]) + last[17:]
        for parse in (wire.parse_datagram, wire.parse_datagram_spec):
            with pytest.raises(PacketError, match="bad-sbn"):
                parse(beyond)


def test_peek_data_reads_toi_and_sbn_as_the_chunk_and_refuses_toi_0() -> None:
    head = b"\x10\xa0\x04\x06" + bytes(4) + TSI.to_bytes(4, "big")
    raw = head + b"\x00\x00\x00\x03" + b"\x05" + b"\x00\x01\x00" + b"sym"
    assert wire.peek_data(raw) == (TSI, 2 * 255 + 5, 256) == _peek_spec(raw)
    assert wire.peek_data(raw[: wire.DATA_HEADER_SIZE]) is None  # no symbol
    toi_0 = head + bytes(4) + b"\x05\x00\x01\x00sym"
    assert wire.peek_data(toi_0) is None is _peek_spec(toi_0)
    sbn_255 = raw[:16] + b"\xff" + raw[17:]  # no block: an object has at most 255
    assert wire.peek_data(sbn_255) is None is _peek_spec(sbn_255)


@given(packets)
def test_peek_data_agrees_with_both_parsers_on_every_packet(packet: wire.Packet) -> None:
    data = wire.build_datagram(packet)
    peeked = wire.peek_data(data)
    assert peeked == _peek_spec(data)
    if isinstance(packet, wire.DataPacket):
        assert peeked == (packet.tsi, packet.chunk, packet.esi)
        assert data[wire.DATA_HEADER_SIZE :] == packet.symbol
    elif isinstance(packet, wire.IndexPacket):  # beyond every chunk a release can have
        assert peeked == (packet.tsi, wire.INDEX_FIRST_CHUNK + packet.block, packet.esi)
        assert peeked[1] > 0xFFFFFFFF
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
    packet = wire.DataPacket(TSI, 1, 2, b"xyz")
    buffer = bytearray(MAX_DATAGRAM)
    raw = wire.build_datagram(packet)
    buffer[: len(raw)] = raw
    assert wire.parse_datagram(memoryview(buffer)[: len(raw)]) == packet


LCT_DATA = b"\x10\xa0\x04\x06" + bytes(4) + TSI.to_bytes(4, "big")
LCT_NO_CODE = b"\x10\xa0\x04\x00" + bytes(4) + TSI.to_bytes(4, "big")
LCT_MANIFEST = b"\x10\xa0\x08\x00" + bytes(4) + TSI.to_bytes(4, "big") + TOI.to_bytes(4, "big")


def _fti(total: int, size: int) -> bytes:
    return b"\x40\x04" + total.to_bytes(6, "big") + bytes(2) + size.to_bytes(2, "big") + bytes(4)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"\x10\xa0\x04", "short"),
        (b"OC\x02\x01" + bytes(8) + bytes(9), "old-wire-version"),  # otacast wire 2
        (b"OC", "old-wire-version"),
        (b"\x20\xa0\x04\x06" + bytes(12) + bytes(9), "bad-version"),  # LCT version 2
        (b"\x10\xa1\x04\x06" + bytes(12) + bytes(9), "bad-header"),  # close object flag
        (b"\x10\xa0\x04\x06\x00\x00\x00\x01" + bytes(8) + bytes(9), "bad-header"),  # CCI
        (b"\x10\xa0\x04\x80" + bytes(12) + bytes(9), "unknown-kind"),  # codepoint 128
        (LCT_DATA + b"\x00\x00\x00\x01" + bytes(4), "short"),  # DATA without a symbol
        (LCT_DATA + bytes(4) + bytes(4) + b"sym", "bad-toi"),  # DATA of TOI 0
        (LCT_DATA + b"\x00\x00\x00\x01" + b"\xff" + bytes(3) + b"sym", "bad-sbn"),  # SBN 255
        (b"\x10\xa0\x05\x06" + bytes(12) + bytes(9), "bad-header"),  # DATA with an extension
        (LCT_DATA + b"\x00\x00\x00\x01" + bytes(MAX_DATAGRAM), "oversized"),
        (LCT_NO_CODE + b"\x00\x00\x00\x07" + bytes(90), "short"),  # AUTH, no room
        (LCT_NO_CODE + b"\x00\x00\x00\x07" + bytes(4 + 20 + 10 + 64), "bad-header"),  # sender
        (
            LCT_NO_CODE + bytes(3) + b"\x08" + bytes(4) + b"\x00\x07" + bytes(18 + 11 + 64),
            "auth-length",  # count 0 and a stray byte
        ),
        (LCT_MANIFEST + _fti(300, 256) + bytes(4), "short"),  # no fragment
        (LCT_MANIFEST + _fti(2**31, 256) + bytes(4) + b"x" * 256, "manifest-length"),
        (LCT_MANIFEST + _fti(300, 256) + b"\x00\x00\x00\x02" + b"xyz", "fragment-range"),
        (LCT_MANIFEST + _fti(300, 255) + bytes(4) + b"x" * 255, "fragment-length"),  # E < 256
        (LCT_MANIFEST + _fti(300, 256) + b"\x00\x01\x00\x00" + b"x" * 256, "bad-sbn"),
        (LCT_MANIFEST + b"\x40\x05" + bytes(14) + bytes(4) + b"x", "bad-header"),  # HEL 5
    ],
)
def test_hostile_datagrams_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    for parse in (wire.parse_datagram, wire.parse_datagram_spec):
        with pytest.raises(PacketError) as caught:
            parse(data)
        assert caught.value.reason == reason


def test_only_the_last_fragment_may_be_short_and_it_must_end_at_the_transfer_length() -> None:
    # 1-byte fragments at millions of offsets would make reassembly bookkeeping huge.
    last = wire.ManifestPacket(TSI, TOI, 1000, 256, 3, b"x" * 232)  # bytes 768 .. 1000: fine
    assert wire.parse_datagram(wire.build_datagram(last)) == last
    for index, length in ((2, 255), (3, 231), (3, 233)):
        raw = LCT_MANIFEST + _fti(1000, 256) + index.to_bytes(4, "big") + b"x" * length
        for parse in (wire.parse_datagram, wire.parse_datagram_spec):
            with pytest.raises(PacketError) as caught:
                parse(raw)
            assert caught.value.reason == "fragment-length"


def test_fragments_reassemble_to_the_envelope() -> None:
    envelope = bytes(range(256)) * 20
    fragments = wire.fragment_envelope(TSI, bytes(8), envelope, 1232)
    assert all(len(wire.build_datagram(f)) <= 1232 for f in fragments)
    rebuilt = bytearray(len(envelope))
    for fragment in fragments:
        parsed = wire.parse_datagram(wire.build_datagram(fragment))
        assert isinstance(parsed, wire.ManifestPacket)
        rebuilt[parsed.offset : parsed.offset + len(parsed.fragment)] = parsed.fragment
    assert bytes(rebuilt) == envelope


def test_packet_constructors_refuse_values_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError):
        wire.DataPacket(TSI, 0, MAX_ESI + 1, b"x")
    with pytest.raises(ValueError):
        wire.DataPacket(1 << 32, 0, 0, b"x")
    with pytest.raises(ValueError):
        wire.DataPacket(TSI, 0, 0, b"")
    with pytest.raises(ValueError):
        wire.ManifestPacket(TSI, TOI, 10, 256, 1, b"xyz")
    with pytest.raises(ValueError):
        wire.ManifestPacket(TSI, 5, 10, 256, 0, b"x" * 10)  # not a manifest TOI
