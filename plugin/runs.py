"""Whole runs of symbols at once: ranges of bits, and the headers of a coalesced read.

With UDP GRO one read brings up to 64 datagrams of one flow back to back, each `segment`
bytes; the sender's GSO batch makes them consecutive ESIs of one chunk.  Checking them one
by one costs a few microseconds of Python each, most of a receiver's CPU per MB.  Here the
same checks are done for a whole run with a handful of C-level operations:

* `all_clear` / `set_all` test and set a range of bits in a ``bytearray`` bitmap (bit
  ``i`` is ``bits[i >> 3] & 1 << (i & 7)``, as the core and the symbol store keep them)
  through one integer;
* `same_run` compares the DATA headers of datagrams ``first .. first + count - 1`` of a
  read, seen as native 32-bit words, with the first one's: word for word equal, but for the
  payload id, which must go up by one each time.  A strided slice of the words holds one
  header word of every datagram; its bytes are compared with what they must be.

Nothing here trusts the read: a run that does not match is simply not taken whole, and the
caller checks it datagram by datagram as before.
"""

from __future__ import annotations

import sys
from array import array

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


def same_run(words: memoryview, stride: int, first: int, count: int, payload_id: int) -> bool:
    """Whether datagrams ``first .. first + count - 1`` of a read hold the header of datagram
    `first` with payload ids `payload_id`, `payload_id` + 1, ... (module doc).

    `words` is the read cast to native unsigned 32-bit words (``memoryview.cast("I")``),
    `stride` the datagram length in words; every datagram in the range lies wholly in it.
    """
    start, end = first * stride, (first + count) * stride
    for word in range(_HEADER_WORDS - 1):
        at = start + word
        if words[at:end:stride].tobytes() != words[at : at + 1].tobytes() * count:
            return False
    ids = array("I", range(payload_id, payload_id + count))
    if _SWAP:
        ids.byteswap()
    at = start + _PAYLOAD_ID_WORD
    return words[at:end:stride].tobytes() == ids.tobytes()
