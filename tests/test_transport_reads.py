"""Splitting one socket read into datagrams (`transport.split_read`, `transport.segment_size`):
a GRO read is whole segments of one size with a shorter last one; nothing cut short is handed
on, every loss is counted, and no segment size or length the kernel could report raises."""

from __future__ import annotations

import socket
import sys

from hypothesis import given
from hypothesis import strategies as st

from otacast.plugin.transport import SOL_UDP, UDP_GRO, segment_size, split_read

NO_FLAGS = 0
LIMIT = 65535  # no datagram too long, unless a test says otherwise


def buffer_of(data: bytes, capacity: int | None = None) -> memoryview:
    """A read buffer of `capacity` bytes (default: exactly `data`) starting with `data`."""
    size = len(data) if capacity is None else capacity
    return memoryview(bytearray(data[:size].ljust(size, b"\xee")))


def payloads(datagrams: list[memoryview]) -> list[bytes]:
    return [bytes(d) for d in datagrams]


def test_a_read_without_a_segment_size_is_one_datagram_of_the_returned_length() -> None:
    view = buffer_of(b"hello", capacity=100)
    assert payloads(split_read(view, 5, NO_FLAGS, None, LIMIT)[0]) == [b"hello"]
    assert split_read(view, 5, NO_FLAGS, None, LIMIT)[1] == 0


def test_a_coalesced_read_of_whole_segments_splits_at_each_segment() -> None:
    data = b"a" * 10 + b"b" * 10 + b"c" * 10
    datagrams, lost = split_read(buffer_of(data, capacity=64), 30, NO_FLAGS, 10, LIMIT)
    assert payloads(datagrams) == [b"a" * 10, b"b" * 10, b"c" * 10]
    assert lost == 0


def test_the_last_segment_may_be_shorter_and_nothing_past_the_length_is_handed_on() -> None:
    data = b"a" * 10 + b"b" * 10 + b"c" * 5
    datagrams, lost = split_read(buffer_of(data, capacity=64), 25, NO_FLAGS, 10, LIMIT)
    assert payloads(datagrams) == [b"a" * 10, b"b" * 10, b"c" * 5]
    assert lost == 0


def test_a_segment_size_at_or_above_the_length_is_one_datagram() -> None:
    view = buffer_of(b"x" * 30, capacity=64)
    assert payloads(split_read(view, 30, NO_FLAGS, 30, LIMIT)[0]) == [b"x" * 30]
    assert payloads(split_read(view, 30, NO_FLAGS, 2**31 - 1, LIMIT)[0]) == [b"x" * 30]


def test_a_zero_or_negative_segment_size_drops_the_read_and_counts_one_loss() -> None:
    view = buffer_of(b"x" * 30)
    assert split_read(view, 30, NO_FLAGS, 0, LIMIT) == ([], 1)
    assert split_read(view, 30, NO_FLAGS, -1228, LIMIT) == ([], 1)


def test_a_cut_control_message_drops_the_read_since_it_cannot_be_split_safely() -> None:
    view = buffer_of(b"x" * 30)
    assert split_read(view, 30, socket.MSG_CTRUNC, None, LIMIT) == ([], 1)
    assert split_read(view, 30, socket.MSG_CTRUNC, 10, LIMIT) == ([], 1)


def test_a_single_datagram_longer_than_the_buffer_is_dropped_and_counted() -> None:
    view = buffer_of(b"x" * 100, capacity=50)
    assert split_read(view, 100, socket.MSG_TRUNC, None, LIMIT) == ([], 1)
    # The real length alone says so, with or without the flag.
    assert split_read(view, 100, NO_FLAGS, None, LIMIT) == ([], 1)


def test_a_coalesced_read_longer_than_the_buffer_keeps_whole_segments_and_counts_the_rest() -> None:
    data = b"".join(bytes([65 + i]) * 10 for i in range(6))  # 6 segments, 60 bytes
    datagrams, lost = split_read(buffer_of(data, capacity=25), 60, socket.MSG_TRUNC, 10, LIMIT)
    assert payloads(datagrams) == [b"A" * 10, b"B" * 10]  # the third is cut at 25: dropped
    assert lost == 4


def test_a_truncated_read_whose_first_segment_does_not_fit_hands_on_nothing() -> None:
    view = buffer_of(b"x" * 50, capacity=50)
    assert split_read(view, 4000, socket.MSG_TRUNC, 1000, LIMIT) == ([], 4)
    assert split_read(view, 4000, socket.MSG_TRUNC, 2**31 - 1, LIMIT) == ([], 1)


def test_a_truncation_flag_with_only_the_copied_length_counts_at_least_one_loss() -> None:
    # Read without MSG_TRUNC asked for, the kernel reports what it copied and sets the flag.
    data = b"a" * 10 + b"b" * 10 + b"c" * 10
    datagrams, lost = split_read(buffer_of(data, capacity=25), 25, socket.MSG_TRUNC, 10, LIMIT)
    assert payloads(datagrams) == [b"a" * 10, b"b" * 10]
    assert lost == 1


def test_an_empty_datagram_is_handed_on_as_one_empty_datagram() -> None:
    view = buffer_of(b"", capacity=10)
    assert payloads(split_read(view, 0, NO_FLAGS, None, LIMIT)[0]) == [b""]
    assert payloads(split_read(view, 0, NO_FLAGS, 10, LIMIT)[0]) == [b""]
    # ... unless the read says it was cut: then nothing whole is there.
    assert split_read(buffer_of(b"", capacity=0), 0, socket.MSG_TRUNC, 1, LIMIT) == ([], 1)


def test_a_negative_length_is_dropped_and_counted() -> None:
    assert split_read(buffer_of(b"x" * 10), -1, NO_FLAGS, None, LIMIT) == ([], 1)


def test_the_segment_size_is_read_from_the_udp_gro_control_message_only() -> None:
    size = (1228).to_bytes(4, sys.byteorder, signed=True)
    assert segment_size([]) is None
    assert segment_size([(SOL_UDP, UDP_GRO, size)]) == 1228
    other = (socket.IPPROTO_IPV6, 50, b"\0" * 20)
    assert segment_size([other, (SOL_UDP, UDP_GRO, size)]) == 1228
    assert segment_size([other]) is None


def test_a_udp_gro_control_message_of_the_wrong_length_is_unusable() -> None:
    for data in (b"", b"\x01", b"\x01\x02\x03", b"\x00" * 8):
        assert segment_size([(SOL_UDP, UDP_GRO, data)]) == 0
    assert split_read(buffer_of(b"x" * 30), 30, NO_FLAGS, 0, LIMIT) == ([], 1)


def test_a_datagram_longer_than_the_limit_is_dropped_and_counted() -> None:
    view = buffer_of(b"x" * 100, capacity=200)
    assert split_read(view, 100, NO_FLAGS, None, 99) == ([], 1)
    assert payloads(split_read(view, 100, NO_FLAGS, None, 100)[0]) == [b"x" * 100]
    assert split_read(view, 100, NO_FLAGS, 100, 99) == ([], 1)  # one segment: one datagram


def test_a_coalesced_read_of_segments_longer_than_the_limit_is_dropped_and_each_counted() -> None:
    view = buffer_of(b"x" * 100, capacity=200)
    assert split_read(view, 100, NO_FLAGS, 40, 39) == ([], 3)
    assert len(split_read(view, 100, NO_FLAGS, 40, 40)[0]) == 3


@given(
    data=st.binary(max_size=300),
    capacity=st.integers(0, 300),
    length=st.integers(-5, 700),
    flags=st.sampled_from([0, socket.MSG_TRUNC, socket.MSG_CTRUNC]),
    segment=st.none() | st.integers(-3, 400),
    limit=st.integers(0, 800),
)
def test_any_read_splits_without_raising_into_whole_segments_of_what_was_read(
    data: bytes, capacity: int, length: int, flags: int, segment: int | None, limit: int
) -> None:
    view = buffer_of(data, capacity)
    datagrams, lost = split_read(view, length, flags, segment, limit)
    assert lost >= 0
    assert all(len(d) <= limit for d in datagrams)
    assert datagrams or lost or length == 0
    joined = b"".join(payloads(datagrams))
    assert joined == bytes(view[: len(joined)])  # the read's bytes, in order, from the start
    if segment is not None and len(datagrams) > 1:
        assert all(len(d) == segment for d in datagrams[:-1])
    truncated = length > capacity or flags & socket.MSG_TRUNC
    if truncated and segment is not None and segment > 0:
        # Only whole segments: each kept one ends inside both the buffer and the read.
        assert all(len(d) == segment for d in datagrams)
    splittable = segment is None or segment > 0
    longest = length if segment is None else min(segment, length)
    fits = longest <= limit
    if not truncated and not flags & socket.MSG_CTRUNC and length >= 0 and splittable and fits:
        assert lost == 0
        assert joined == bytes(view[:length])
