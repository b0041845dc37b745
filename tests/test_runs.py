"""Whole runs at once (`otacast.plugin.runs`) agree with the checks made one by one."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin import runs

HEADER = struct.Struct(">QIII")  # the DATA header: prefix, TSI, TOI, payload id


def _bit(bits: bytearray, index: int) -> bool:
    return bool(bits[index >> 3] & 1 << (index & 7))


@st.composite
def bit_ranges(draw: st.DrawFn) -> tuple[bytearray, int, int]:
    """A bitmap and a range of 1-64 of its bits: (bits, first, count)."""
    bits = bytearray(draw(st.binary(min_size=1, max_size=40)))
    first = draw(st.integers(0, len(bits) * 8 - 1))
    count = draw(st.integers(1, min(64, len(bits) * 8 - first)))
    return bits, first, count


@given(bit_ranges())
def test_the_runs_of_a_range_of_bits_are_its_bits_one_by_one(
    bit_range: tuple[bytearray, int, int],
) -> None:
    bits, first, count = bit_range
    word = runs.bits_of(bits, first, count)
    assert [bool(word >> i & 1) for i in range(count)] == [
        _bit(bits, i) for i in range(first, first + count)
    ]
    spans = list(runs.spans(word, count))
    # Consecutive, covering the range, each one bit repeated, no two alike side by side.
    assert spans[0][0] == 0 and spans[-1][1] == count
    for (_, end, bit), (start, _, other) in itertools.pairwise(spans):
        assert end == start and bit != other
    for start, end, bit in spans:
        assert start < end
        assert all(_bit(bits, first + i) == bit for i in range(start, end))


@given(bit_ranges())
def test_a_range_of_bits_is_clear_exactly_when_each_of_its_bits_is(
    bit_range: tuple[bytearray, int, int],
) -> None:
    bits, first, count = bit_range
    assert runs.all_clear(bits, first, count) == (
        not any(_bit(bits, i) for i in range(first, first + count))
    )
    before = bytearray(bits)
    runs.set_all(bits, first, count)
    assert len(bits) == len(before)
    for index in range(len(bits) * 8):
        inside = first <= index < first + count
        assert _bit(bits, index) == (inside or _bit(before, index))


def _read(headers: list[tuple[int, int, int, int]], segment: int) -> bytearray:
    buffer = bytearray(segment * len(headers))
    for at, header in enumerate(headers):
        HEADER.pack_into(buffer, at * segment, *header)
        buffer[at * segment + HEADER.size : (at + 1) * segment] = b"\x5a" * (segment - 20)
    return buffer


def _one_by_one(headers: list[tuple[int, int, int, int]], first: int, count: int) -> int:
    """How many datagrams from `first` on continue its run, checked one at a time."""
    prefix, tsi, toi, pid = headers[first]
    length = 0
    while length < count and headers[first + length] == (prefix, tsi, toi, pid + length):
        length += 1
    return length


_HEADERS = st.tuples(
    st.sampled_from([0x10A0040300000000, 0x10A0040300000001]),
    st.sampled_from([7, 8]),
    st.sampled_from([1, 2]),
    st.integers(0, 2**24),
)


@given(
    start=_HEADERS,
    count=st.integers(1, 64),
    changes=st.lists(st.tuples(st.integers(0, 73), _HEADERS), max_size=3),
    first=st.integers(0, 10),
    segment=st.sampled_from([24, 1228, 8220]),
)
def test_a_run_is_as_long_as_the_datagrams_that_continue_the_first_one_by_one(
    start: tuple[int, int, int, int],
    count: int,
    changes: list[tuple[int, tuple[int, int, int, int]]],
    first: int,
    segment: int,
) -> None:
    prefix, tsi, toi, pid = start
    headers = [(prefix, tsi, toi, pid + i) for i in range(count + first)]
    for at, header in changes:  # (often none: a whole run, as a GSO batch gives)
        if at < len(headers):
            headers[at] = header
    with memoryview(_read(headers, segment)) as view, view.cast("I") as words:
        assert runs.run_length(words, segment // 4, first, count, headers[first][3]) == (
            _one_by_one(headers, first, count)
        )
