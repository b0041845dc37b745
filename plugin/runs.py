"""Whole runs of symbols at once: ranges of bits, and the headers of a coalesced read.

With UDP GRO one read brings up to 64 datagrams of one flow back to back, each `segment`
bytes; the sender's GSO batch makes them consecutive ESIs of one chunk.  Checking them one
by one costs a few microseconds of Python each, most of a receiver's CPU per MB.  Here the
same checks are done for a whole run with a handful of C-level operations:

* `all_clear` / `set_all` test and set a range of bits in a ``bytearray`` bitmap (bit
  ``i`` is ``bits[i >> 3] & 1 << (i & 7)``, as the core and the symbol store keep them)
  through one integer, `bits_of` reads one, and `spans` walks its runs of equal bits;
* `run_length` compares the DATA headers of datagrams ``first .. first + count - 1`` of a
  read, seen as native 32-bit words, with the first one's: word for word equal, but for the
  payload id, which must go up by one each time; it says how many from the first on do (a
  datagram lost on the way ends the run there).  A strided slice of the words holds one
  header word of every datagram; its bytes are compared with what they must be.

Nothing here trusts the read: what does not continue the run is left to the caller, which
takes it as the start of the next run or checks it alone, as before.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

# The DATA header (`otacast.schemas.wire`) as 32-bit words: prefix (2), TSI, TOI, payload id.
_HEADER_WORDS = 5
_PAYLOAD_ID_WORD = 4
_SWAP = sys.byteorder == "little"  # header words are big-endian on the wire


def all_clear(bits: bytearray, first: int, count: int) -> bool:
    """Whether bits ``first .. first + count - 1`` are all 0 (all within `bits`)."""
    low, high = first >> 3, ((first + count - 1) >> 3) + 1
    mask = ((1 << count) - 1) << (first & 7)
    return not int.from_bytes(bits[low:high], "little") & mask


def set_all(bits: bytearray, first: int, count: int) -> None:
    """Set bits ``first .. first + count - 1`` (all within `bits`)."""
    low, high = first >> 3, ((first + count - 1) >> 3) + 1
    mask = ((1 << count) - 1) << (first & 7)
    word = int.from_bytes(bits[low:high], "little") | mask
    bits[low:high] = word.to_bytes(high - low, "little")


def bits_of(bits: bytearray, first: int, count: int) -> int:
    """Bits ``first .. first + count - 1`` as an integer, bit ``i`` for bit ``first + i`` (all
    within `bits`)."""
    low, high = first >> 3, ((first + count - 1) >> 3) + 1
    return int.from_bytes(bits[low:high], "little") >> (first & 7) & ((1 << count) - 1)


def spans(word: int, count: int) -> Iterator[tuple[int, int, bool]]:
    """The runs of equal bits in the low `count` bits of `word`, in order, as ``(start, end,
    bit)`` with ``end`` exclusive: one step per run, not per bit."""
    full = (1 << count) - 1
    position = 0
    while position < count:
        bit = word >> position & 1
        # Ones where a bit differs from this one, from here on: the lowest ends the run.
        differs = ((~word if bit else word) & full) >> position
        length = (differs & -differs).bit_length() - 1 if differs else count - position
        yield position, position + length, bool(bit)
        position += length


def run_length(words: memoryview, stride: int, first: int, count: int, payload_id: int) -> int:
    """How many of datagrams ``first .. first + count - 1`` of a read, from `first` on, hold
    the header of datagram `first` with payload ids `payload_id`, `payload_id` + 1, ...
    (module doc): `count` for a whole run, less where one differs (a datagram lost before
    GRO coalesced the rest, another chunk's batch).  Datagram `first` itself must have
    `payload_id`: the result is then at least 1.

    `words` is the read cast to native unsigned 32-bit words (``memoryview.cast("I")``),
    `stride` the datagram length in words; every datagram in the range lies wholly in it.
    Each header word is compared for all the datagrams at once, and where they differ the
    first difference is found by halving (a few compares of byte strings, no loop per
    datagram).
    """
    start, end = first * stride, (first + count) * stride
    ids = array("I", range(payload_id, payload_id + count))
    if _SWAP:
        ids.byteswap()
    length = count
    for word in range(_HEADER_WORDS):
        at = start + word
        got = words[at:end:stride].tobytes()
        want = ids.tobytes() if word == _PAYLOAD_ID_WORD else words[at : at + 1].tobytes() * count
        if got[: 4 * length] == want[: 4 * length]:
            continue
        low, high = 1, length  # got and want agree on `low` words and not on `high`
        while high - low > 1:
            middle = (low + high) // 2
            if got[: 4 * middle] == want[: 4 * middle]:
                low = middle
            else:
                high = middle
        length = low
    return length
