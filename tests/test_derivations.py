"""Group addresses, chunking and FEC parameters, units and key files: what both sides derive."""

from __future__ import annotations

import ipaddress
import os

import pytest
import raptorq
from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin.receive import lane_joins
from otacast.plugin.transport import Join
from otacast.schemas import addressing, fec, keyfile, limits, units, wire
from otacast.schemas.errors import KeyFormatError

channels = st.from_regex(
    r"[a-z][a-z0-9-]{0,15}[a-z0-9](\.[a-z][a-z0-9]{0,10}){1,3}", fullmatch=True
)


def test_groups_for_a_known_channel_are_stable() -> None:
    # Golden values: devices already in the field derive these; they must never change.
    assert addressing.asm_group("updates.example.com") == "ff1e:824a:27f1:f8db:50ec:953f:ee0b:7c21"
    assert addressing.ssm_group("updates.example.com") == "ff3e::824a:27f1"
    assert addressing.srv_name("Updates.Example.COM.") == "_otacast._udp.updates.example.com"


@given(channels, st.sampled_from(sorted(addressing.SCOPES)), st.integers(0, 7))
def test_derived_groups_are_in_the_right_ranges(channel: str, scope: str, rate: int) -> None:
    asm = ipaddress.IPv6Address(addressing.asm_group(channel, scope, rate))
    ssm = ipaddress.IPv6Address(addressing.ssm_group(channel, scope, rate))
    assert asm.is_multicast and ssm.is_multicast
    assert asm.packed[1] == 0x10 | addressing.SCOPES[scope]
    assert ssm in ipaddress.IPv6Network(f"ff3{addressing.SCOPES[scope]:x}::/96")
    assert int.from_bytes(ssm.packed[12:], "big") >= 0x80000000  # dynamic SSM range
    assert addressing.is_asm_group(str(asm)) and not addressing.is_ssm_group(str(asm))
    assert addressing.is_ssm_group(str(ssm)) and not addressing.is_asm_group(str(ssm))


@given(channels)
def test_each_rate_channel_gets_its_own_group(channel: str) -> None:
    groups = {addressing.asm_group(channel, rate_index=i) for i in range(limits.MAX_RATE_CHANNELS)}
    assert len(groups) == limits.MAX_RATE_CHANNELS


def test_side_sessions_get_groups_and_tsis_of_their_own_derived_from_the_channel() -> None:
    channel, tsi = "updates.example.com", 0x12345678
    sides = {addressing.LANE_RATE_INDEX, addressing.INDEX_RATE_INDEX}
    assert len(sides) == 2 and not sides & set(range(limits.MAX_RATE_CHANNELS))
    groups = {addressing.ssm_group(channel, "global", r) for r in (0, *sides)}
    groups |= {addressing.asm_group(channel, "global", r) for r in (0, *sides)}
    assert len(groups) == 6
    tsis = {tsi, wire.lane_tsi(tsi), wire.index_tsi(tsi), tsi ^ wire.AUTH_TSI_BIT}
    assert len(tsis) == 4 and wire.index_tsi(wire.index_tsi(tsi)) == tsi


def test_side_joins_keep_the_sources_and_the_kind_of_group() -> None:
    channel, scope = "updates.example.com", "site"
    ssm, asm = addressing.ssm_group(channel, scope), addressing.asm_group(channel, scope)
    index = addressing.INDEX_RATE_INDEX
    joins = lane_joins(
        [(ssm, "2001:db8::1"), (ssm, "2001:db8::2"), (asm, None)], channel, scope, index
    )
    assert joins == [
        Join(addressing.ssm_group(channel, scope, index), "2001:db8::1"),
        Join(addressing.ssm_group(channel, scope, index), "2001:db8::2"),
        Join(addressing.asm_group(channel, scope, index)),
    ]
    assert lane_joins([("ff3e::8000:1", "2001:db8::1")], channel, scope, index) is None  # --group


@pytest.mark.parametrize("bad", ["", "bad..name", "-a.b", "a_b.c", "x" * 64 + ".com", "ü.de"])
def test_invalid_channel_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        addressing.normalise_channel(bad)


symbol_sizes = st.integers(limits.MIN_SYMBOL_SIZE // 8, 1208 // 8).map(lambda v: v * 8)


@given(symbol_sizes, st.integers(0, limits.MAX_CHUNK_BYTES), st.integers(1, 600), st.data())
def test_chunk_spans_are_rfc_6330_blocks_of_objects_of_256_chunks(
    t: int, preferred: int, chunks: int, data: st.DataObject
) -> None:
    size = fec.choose_chunk_size(1, preferred, t)
    length = data.draw(st.integers((chunks - 1) * size + 1, chunks * size))
    count = fec.chunk_count(length, size, t)
    spans = [fec.chunk_span(length, size, t, i) for i in range(count)]
    end = 0
    for index, (offset, n) in enumerate(spans):
        assert offset == end and offset % t == 0 and 0 < n <= size
        end = offset + n
        part = fec.part(length, size, t, index // limits.PART_CHUNKS)
        # Z = ceil(Kt / Kc) blocks, sized Partition[Kt, Z]: KL for the first ZL, KS after.
        kt = fec.ceil_div(part.length, t)
        assert part.blocks == fec.ceil_div(kt, size // t) <= limits.PART_CHUNKS
        assert part.large * part.large_blocks + part.small * (part.blocks - part.large_blocks) == kt
        if offset + n < part.offset + part.length:  # every block but the object's last is whole
            block = index % limits.PART_CHUNKS
            assert n == t * (part.large if block < part.large_blocks else part.small)
    assert end == length
    with pytest.raises(IndexError):
        fec.chunk_span(length, size, t, count)


@given(st.integers(1, limits.MAX_IMAGE_BYTES), st.integers(0, limits.MAX_CHUNK_BYTES), symbol_sizes)
def test_chosen_chunk_size_is_whole_symbols_within_the_caps(
    length: int, preferred: int, t: int
) -> None:
    size = fec.choose_chunk_size(length, preferred, t)
    assert fec.chunk_size_problem(size, t) is None
    assert fec.chunk_count(length, size, t) <= limits.MAX_CHUNKS


def test_largest_chunk_is_one_source_block_at_the_smallest_symbol_size() -> None:
    # The DATA header's SBN is always 0: prove the codec agrees for the extreme parameters.
    assert fec.source_symbols(limits.MAX_CHUNK_BYTES, limits.MIN_SYMBOL_SIZE) <= 56403
    data = os.urandom(limits.MAX_CHUNK_BYTES)
    packets = raptorq.Encoder.with_defaults(data, limits.MIN_SYMBOL_SIZE).get_encoded_packets(0)
    assert {p[0] for p in packets} == {0}
    assert len(packets) == fec.source_symbols(len(data), limits.MIN_SYMBOL_SIZE)
    assert all(len(p) == 4 + limits.MIN_SYMBOL_SIZE for p in packets[:3])


def test_codec_uses_the_symbol_size_the_manifest_names() -> None:
    data = os.urandom(100_000)
    packets = raptorq.Encoder.with_defaults(data, fec.DEFAULT_SYMBOL_SIZE).get_encoded_packets(0)
    assert len(packets[0]) == 4 + fec.DEFAULT_SYMBOL_SIZE
    assert len(packets) == fec.source_symbols(len(data), fec.DEFAULT_SYMBOL_SIZE)


@pytest.mark.parametrize("asked", [1201, 1212, 1220])
def test_codec_rounds_unaligned_symbol_sizes_down_so_the_schema_forbids_them(asked: int) -> None:
    packets = raptorq.Encoder.with_defaults(os.urandom(5000), asked).get_encoded_packets(0)
    assert len(packets[0]) - 4 == asked // limits.SYMBOL_ALIGNMENT * limits.SYMBOL_ALIGNMENT


@pytest.mark.parametrize(
    ("text", "value"),
    [("65536", 65536), ("64K", 65536), ("4M", 4 << 20), ("4MiB", 4 << 20), ("1g", 1 << 30)],
)
def test_sizes_parse_in_binary_units(text: str, value: int) -> None:
    assert units.parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("50M", 50_000_000), ("400Mbit", 50_000_000), ("1Gbps", 125_000_000), ("1.5M", 1_500_000)],
)
def test_rates_parse_in_decimal_units(text: str, value: int) -> None:
    assert units.parse_rate(text) == value


@pytest.mark.parametrize(("text", "value"), [("3600", 3600), ("15m", 900), ("30d", 2592000)])
def test_durations_parse(text: str, value: int) -> None:
    assert units.parse_duration(text) == value


@pytest.mark.parametrize(
    ("seconds", "date"),
    [
        (1798675200, "2026-12-31T00:00:00Z"),
        (1798675200.9, "2026-12-31T00:00:00Z"),  # to the second, never rounded up past expiry
        (0, "1970-01-01T00:00:00Z"),
        (253402300799, "9999-12-31T23:59:59Z"),  # the manifest schema's largest timestamp
    ],
)
def test_times_are_shown_as_rfc3339_utc_dates(seconds: float, date: str) -> None:
    assert units.format_time(seconds) == date


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(2**40, "@1099511627776"), (float("inf"), "@inf"), (float("nan"), "@nan")],
)
def test_times_no_date_can_hold_stay_numbers_instead_of_raising(seconds: float, shown: str) -> None:
    assert units.format_time(seconds) == shown


@pytest.mark.parametrize("bad", ["", "-1", "4X", "1.5M", "M"])
def test_bad_sizes_are_refused_with_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError, match=r"use e\.g\."):
        units.parse_size(bad)


@given(
    st.binary(min_size=32, max_size=32), st.text(st.characters(min_codepoint=33, max_codepoint=126))
)
def test_key_files_round_trip(raw: bytes, comment: str) -> None:
    assert keyfile.parse_public(keyfile.format_public(raw, comment).encode(), "k") == raw
    assert keyfile.parse_secret(keyfile.format_secret(raw, comment).encode(), "k") == raw


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an otacast key file"),
        (b"otacast-ed25519-public " + b"ab" * 31, "has 31 bytes"),
        (b"otacast-ed25519-public " + b"zz" * 32, "not hexadecimal"),
        (b"otacast-ed25519-secret " + b"ab" * 32, "is a secret key"),
        (b"\xff\xfe", "not an otacast key file"),
        (b"x" * 5000, "too large"),
    ],
)
def test_bad_public_key_files_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        keyfile.parse_public(data, "key.pub")


def test_secret_key_file_given_as_public_names_the_mixup() -> None:
    with pytest.raises(KeyFormatError, match="is a public key"):
        keyfile.parse_secret(b"otacast-ed25519-public " + b"ab" * 32, "key.key")
