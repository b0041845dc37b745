"""The block index format: golden bytes, streaming equals one shot, refusals before use."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.schemas import blockindex
from otacast.schemas.errors import MalformedIndex
from otacast.schemas.limits import INDEX_BLOCK_SIZE, MAX_IMAGE_BYTES


def test_index_of_a_short_image_matches_golden_bytes() -> None:
    index = blockindex.IndexBuilder()
    index.update(b"\x01" * 5000)
    built = index.finish().build()
    first = hashlib.sha256(b"\x01" * 4096).digest()[:16]
    second = hashlib.sha256(b"\x01" * 904 + bytes(4096 - 904)).digest()[:16]
    assert (
        built
        == bytes.fromhex("4f434249 01 0c 10 00 0000000000001388".replace(" ", "")) + first + second
    )


def test_empty_image_has_an_index_of_only_its_header() -> None:
    built = blockindex.IndexBuilder().finish().build()
    assert built == b"OCBI\x01\x0c\x10\x00" + bytes(8)
    assert blockindex.parse(built, length=0).blocks == 0


@given(st.binary(max_size=3 * INDEX_BLOCK_SIZE + 7), st.lists(st.integers(1, 5000), max_size=6))
def test_streamed_index_equals_one_shot_whatever_the_pieces(data: bytes, cuts: list[int]) -> None:
    builder = blockindex.IndexBuilder()
    rest = memoryview(data)
    for cut in cuts:
        builder.update(rest[:cut])
        rest = rest[cut:]
    builder.update(rest)
    streamed = builder.finish()
    assert streamed.digests == b"".join(blockindex.iter_digests(data))
    assert (
        blockindex.parse(streamed.build(), length=len(data), sha256=streamed.sha256()) == streamed
    )


def _index(n: int = 9000) -> bytes:
    builder = blockindex.IndexBuilder()
    builder.update(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
    return builder.finish().build()


def test_a_flipped_byte_is_refused_by_the_signed_hash() -> None:
    good = _index()
    digest = hashlib.sha256(good).digest()
    bad = bytearray(good)
    bad[-1] ^= 1
    with pytest.raises(MalformedIndex, match="SHA-256"):
        blockindex.parse(bytes(bad), length=9000, sha256=digest)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"OCBX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x02" + b[5:], "version 2"),
        (lambda b: b[:5] + b"\x0d" + b[6:], "8192-byte blocks"),
        (lambda b: b[:6] + b"\x08" + b[7:], "8-byte hashes"),
        (lambda b: b[:-1], "expected"),
        (lambda b: b[:10], "shorter than its header"),
        (lambda b: b[:8] + (9001).to_bytes(8, "big") + b[16:], "manifest's has 9000"),
    ],
)
def test_malformed_index_is_refused_with_one_line(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedIndex, match=reason) as caught:
        blockindex.parse(mutate(_index()), length=9000)
    assert "\n" not in str(caught.value)


def test_a_huge_claimed_image_is_refused_before_allocation() -> None:
    header = blockindex.HEADER.pack(b"OCBI", 1, 12, 16, 0, MAX_IMAGE_BYTES + 1)
    with pytest.raises(MalformedIndex, match="claims an image"):
        blockindex.parse(header)


def test_entries_and_spans_address_blocks_in_image_order() -> None:
    index = blockindex.parse(_index(), length=9000)
    assert index.blocks == 3
    assert index.block_span(2) == (8192, 9000)
    assert index.digest(1) == index.digests[16:32]
    with pytest.raises(IndexError):
        index.digest(3)


def test_building_an_index_holds_its_entries_and_little_more() -> None:
    """A device builds its installed index from the image it installed (1.2 GB: 307,200
    entries): the builder holds the entries back to back, not an object per entry."""
    blocks = 16384
    piece = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # fed in 4 MiB reads, as installed.py
    builder = blockindex.IndexBuilder()
    tracemalloc.start()
    try:
        for _ in range(blocks * INDEX_BLOCK_SIZE // len(piece)):
            builder.update(piece)
        index = builder.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert index.blocks == blocks
    print(f"{peak / blocks:.1f} bytes traced per entry at the peak")
    assert peak < 40 * blocks  # the entries (16 bytes each) and their copy into the index
