"""The delta lane formats: golden bytes, round trips, refusals before allocation."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.schemas import deltaobject as d
from otacast.schemas.blockindex import BlockIndex, block_count
from otacast.schemas.errors import MalformedDelta, UntrustedInputError
from otacast.schemas.limits import (
    INDEX_BLOCK_SIZE,
    MAX_DELTA_RUNS,
    MAX_IMAGE_BYTES,
    MAX_PATCH_OPS,
)

# --- Lane object -------------------------------------------------------------------------------


def test_lane_header_matches_golden_bytes() -> None:
    header = d.LaneHeader.from_runs(5000, [(1, 1)], 10)
    assert header.build() == bytes.fromhex(
        "4f43444c 01 0c 0000 0000000000001388 00000001 00000001 000000000000000a"
        " 00000001 00000001".replace(" ", "")
    )
    # The image's last block is short (5000 = 4096 + 904) and it is the one carried.
    assert header.raw_length == 904
    assert header.stream_offset == 40


def test_lane_object_round_trips_with_its_stream() -> None:
    header = d.LaneHeader.from_runs(10 * INDEX_BLOCK_SIZE, [(0, 2), (5, 3)], 4)
    built = d.build_lane(header, b"xzzz")
    parsed, stream = d.parse_lane(built, length=10 * INDEX_BLOCK_SIZE)
    assert parsed == header
    assert bytes(stream) == b"xzzz"
    assert list(parsed.runs()) == [(0, 2), (5, 3)]
    assert parsed.blocks == 5
    assert parsed.raw_length == 5 * INDEX_BLOCK_SIZE


@st.composite
def lane_headers(draw: st.DrawFn) -> d.LaneHeader:
    length = draw(st.integers(0, 40 * INDEX_BLOCK_SIZE + 100))
    carried = draw(st.lists(st.booleans(), min_size=block_count(length)))
    runs: list[tuple[int, int]] = []
    for block, take in enumerate(carried[: block_count(length)]):
        if take and runs and sum(runs[-1]) == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif take:
            runs.append((block, 1))
    probe = d.LaneHeader.from_runs(length, runs, 0)
    return d.LaneHeader.from_runs(
        length, runs, draw(st.integers(0, d.max_compressed_length(probe.raw_length)))
    )


@given(lane_headers())
def test_lane_header_round_trips(header: d.LaneHeader) -> None:
    assert d.parse_lane_header(header.build(), length=header.length) == header
    raw = sum(
        min((start + count) * INDEX_BLOCK_SIZE, header.length) - start * INDEX_BLOCK_SIZE
        for start, count in header.runs()
    )
    assert header.raw_length == raw


def _lane(length: int, blocks: int, runs: list[tuple[int, int]], compressed: int = 0) -> bytes:
    fixed = d.LANE_HEADER.pack(b"OCDL", 1, 12, 0, length, blocks, len(runs), compressed)
    return fixed + b"".join(struct.pack(">II", *run) for run in runs)


IMAGE = 100 * INDEX_BLOCK_SIZE


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_lane(IMAGE, 2, [(0, 1), (1, 1)]), "touches the run before"),
        (_lane(IMAGE, 4, [(0, 3), (2, 1)]), "overlaps"),
        (_lane(IMAGE, 2, [(5, 1), (2, 1)]), "out of order"),
        (_lane(IMAGE, 0, [(5, 0)]), "claims 1 runs for 0 blocks"),
        (_lane(IMAGE, 1, [(5, 0), (7, 1)]), "claims 2 runs for 1 blocks"),
        (_lane(IMAGE, 2, [(5, 0), (7, 2)]), "run at block 5 is empty"),
        (_lane(IMAGE, 2, [(99, 2)]), "ends beyond the image's 100 blocks"),
        (_lane(IMAGE, 3, [(0, 2)]), "carry 2 blocks, the header says 3"),
        (_lane(IMAGE, 101, []), "101 blocks of an image of 100"),
        (_lane(IMAGE, 1, [(0, 1)], 4096 + 4 + 4096 + 1), "stream"),
        (_lane(IMAGE, 2, [(0, 2)])[:-1], "shorter than its run list"),
        (_lane(IMAGE, 2, [(0, 2)])[:31], "shorter than its header"),
        (b"OCDX" + _lane(IMAGE, 1, [(0, 1)])[4:], "magic"),
        (_lane(IMAGE, 1, [(0, 1)])[:4] + b"\x02" + _lane(IMAGE, 1, [(0, 1)])[5:], "version 2"),
        (_lane(MAX_IMAGE_BYTES + 1, 0, []), "claims an image"),
        (_lane(IMAGE + 1, 0, []), "manifest's has 409600"),
    ],
)
def test_malformed_lane_header_is_refused_with_one_line(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedDelta, match=reason) as caught:
        d.parse_lane_header(data, length=IMAGE)
    assert "\n" not in str(caught.value)


def test_whole_lane_of_the_wrong_length_is_refused() -> None:
    built = d.build_lane(d.LaneHeader.from_runs(IMAGE, [(3, 4)], 5), b"12345")
    for data in (built[:-1], built + b"!"):
        with pytest.raises(MalformedDelta, match="its header says"):
            d.parse_lane(data, length=IMAGE)


def _peak_bytes(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(MalformedDelta):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_claims_are_refused_before_allocation() -> None:
    big = MAX_IMAGE_BYTES
    claims = [
        # More runs than the limit, in an image that has room for them.
        _lane(big, MAX_DELTA_RUNS + 1, []),
        # A legal number of runs whose list is not there.
        d.LANE_HEADER.pack(b"OCDL", 1, 12, 0, big, MAX_DELTA_RUNS, MAX_DELTA_RUNS, 0),
    ]
    for data in claims:
        assert _peak_bytes(lambda data=data: d.parse_lane_header(data)) < 64 * 1024
    patch = d.PATCH_HEADER.pack(b"OCIP", 1, 16, 0, big, big, MAX_PATCH_OPS, 0, 0, 0, bytes(32))
    assert _peak_bytes(lambda: d.parse_patch(patch)) < 64 * 1024


def test_malformed_delta_is_untrusted_input_with_its_own_exit_code() -> None:
    assert issubclass(MalformedDelta, UntrustedInputError)
    assert MalformedDelta.exit_code == 33


# --- Index patch -------------------------------------------------------------------------------


def _index(*digests: bytes, last: int = INDEX_BLOCK_SIZE) -> BlockIndex:
    return BlockIndex((len(digests) - 1) * INDEX_BLOCK_SIZE + last, b"".join(digests))


A, B, C, X = (bytes([n]) * 16 for n in (0xA, 0xB, 0xC, 0xEE))


def test_index_patch_matches_golden_bytes_and_applies() -> None:
    old = _index(A, B)
    patch = d.IndexPatch(8192, 12288, old.sha256(), (d.Copy(1, 1), d.Literal(X), d.Copy(0, 1)))
    built = patch.build()
    assert built == (
        bytes.fromhex(
            "4f434950 01 10 0000 0000000000002000 0000000000003000 00000002 00000001"
            " 00000001 00000000".replace(" ", "")
        )
        + hashlib.sha256(old.build()).digest()
        + b"C"
        + struct.pack(">II", 1, 1)
        + b"L"
        + struct.pack(">I", 1)
        + X
        + b"C"
        + struct.pack(">II", 0, 1)
    )
    assert d.parse_patch(built, old_length=8192, new_length=12288) == patch
    assert patch.apply(old) == _index(B, X, A)


def test_index_patch_for_another_index_is_refused() -> None:
    patch = d.IndexPatch(8192, 4096, _index(A, B).sha256(), (d.Copy(0, 1),))
    with pytest.raises(MalformedDelta, match="another release"):
        patch.apply(_index(A, C))


@st.composite
def patches(draw: st.DrawFn) -> d.IndexPatch:
    old_blocks = draw(st.integers(0, 30))
    ops: list[d.PatchOp] = []
    for _ in range(draw(st.integers(0, 12))):
        if old_blocks and draw(st.booleans()):
            start = draw(st.integers(0, old_blocks - 1))
            ops.append(d.Copy(start, draw(st.integers(1, old_blocks - start))))
        else:
            ops.append(d.Literal(draw(st.binary(min_size=16, max_size=64).map(_whole))))
    new_blocks = sum(op.count for op in ops)
    last = draw(st.integers(1, INDEX_BLOCK_SIZE))
    new_length = (new_blocks - 1) * INDEX_BLOCK_SIZE + last if new_blocks else 0
    return d.IndexPatch(
        old_blocks * INDEX_BLOCK_SIZE,
        new_length,
        draw(st.binary(min_size=32, max_size=32)),
        tuple(ops),
    )


def _whole(data: bytes) -> bytes:
    return data[: len(data) - len(data) % 16]


@given(patches())
def test_index_patch_round_trips(patch: d.IndexPatch) -> None:
    built = patch.build()
    assert d.parse_patch(built, old_length=patch.old_length, new_length=patch.new_length) == patch


def _patch(
    copies: int, literals: int, entries: int, ops: bytes, old: int = 8192, new: int = 8192
) -> bytes:
    fixed = d.PATCH_HEADER.pack(
        b"OCIP", 1, 16, 0, old, new, copies, literals, entries, 0, bytes(32)
    )
    return fixed + ops


COPY2 = b"C" + struct.pack(">II", 0, 2)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_patch(1, 0, 0, COPY2)[:-1], "its header's counts give"),
        (_patch(1, 0, 0, COPY2 + b"x"), "its header's counts give"),
        (_patch(1, 0, 0, b"C" + struct.pack(">II", 1, 2)), "outside the old index of 2"),
        (_patch(1, 0, 0, b"C" + struct.pack(">II", 0, 0)), "outside"),
        (_patch(1, 0, 0, b"Q" + struct.pack(">II", 0, 2)), "bad op at byte 72"),
        (_patch(0, 1, 1, b"L" + struct.pack(">I", 0) + A), "empty or beyond"),
        (_patch(0, 1, 1, b"L" + struct.pack(">I", 2) + A), "empty or beyond"),
        (
            _patch(0, 1, 3, b"L" + struct.pack(">I", 3) + A + B + C),
            "3 entries in 1 ops for an image of 2",
        ),
        (_patch(1, 1, 1, COPY2 + b"L" + struct.pack(">I", 1) + A), "more than the new image's 2"),
        (_patch(0, 1, 1, b"L" + struct.pack(">I", 1) + A), "gives 1 of the new image's 2"),
        (_patch(MAX_PATCH_OPS, 1, 0, b"", new=MAX_IMAGE_BYTES), "ops \\(at most"),
        (_patch(0, 0, 0, b"", old=MAX_IMAGE_BYTES + 1), "claims an old image"),
        (_patch(0, 0, 0, b"", new=4096), "for a 4096-byte new image, expected 8192"),
        (b"OCIX" + COPY2 * 8, "magic"),
        (_patch(1, 0, 0, COPY2)[:71], "shorter than its header"),
    ],
)
def test_malformed_index_patch_is_refused_with_one_line(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedDelta, match=reason) as caught:
        d.parse_patch(data, new_length=8192 if "expected 8192" in reason else None)
    assert "\n" not in str(caught.value)
