"""Datagram layouts (otacast wire 3: FLUTE/ALC/LCT): the construct definitions below are the
specification; docs/FORMATS.md maps every field to its RFC.

Every otacast datagram is an ALC packet (RFC 5775) with a 16-byte LCT header (RFC 5651) and no
congestion control information::

    0 V=1 C=0 PSI=0 | S=1 O=01 H=0 Res=0 A=0 B=0 | HDR_LEN | codepoint
    4 CCI = 0 (32 bits)   8 TSI (32 bits)   12 TOI (32 bits)   16 header extensions ...

* TSI: the first 4 bytes of the manifest's session id (SHA-256 over its canonical signed
  bytes), so packets of another release are dropped after one comparison.
* the codepoint is the FEC Encoding ID (as flute and Wireshark read it): 6 = RaptorQ for DATA,
  0 = Compact No-Code for everything else.

DATA (one RaptorQ encoding symbol; codepoint 6, HDR_LEN 4)::

    12 TOI = 1 + image part | 16 SBN (u8) | 17 ESI (u24) | 20 symbol (T bytes)

  SBN + ESI is RaptorQ's FEC payload id (RFC 6330 section 3.2).  Part ``p`` of the image is the
  FLUTE object TOI ``1+p``; its source block ``SBN`` (< 255) is chunk ``255*p + SBN``
  (`otacast.schemas.fec`).  With the default symbol size of 1208 bytes a DATA datagram is 1228
  bytes, within the 1232-byte IPv6 minimum-MTU UDP payload: the same 20 bytes of header as
  otacast wire 2.

  The release's block index (`otacast.schemas.blockindex`, delta delivery) is one more RaptorQ
  object of the session, TOI ``INDEX_TOI`` = 0x40000000 (far above the last image part TOI
  ``MAX_PART_TOI``, below the manifest TOIs), cut into source blocks as an image part is
  (`Manifest.index_part`); its DATA datagrams have the same layout, and parse as an
  `IndexPacket` (block = SBN).  `peek_data` reads them as "chunk" ``INDEX_FIRST_CHUNK + SBN``,
  beyond any chunk a release has (above 32 bits), so a receiver's range check sends them off the
  image's path without a test of its own.

MANIFEST (a fragment of the signed manifest envelope: a Compact No-Code object)::

    12 TOI = 0x80000000 | 31 bits of the envelope id | 16 EXT_FTI (HET 64, HEL 4:
    transfer length F u48, reserved u16, fragment size E u16, maximum block length B u32)
    32 SBN (u16) = 0 | 34 ESI (u16) = fragment index | 36 fragment

  Fragment ``i`` is ``envelope[i*E : (i+1)*E]``: every fragment but the last is exactly E bytes
  (E >= MIN_MANIFEST_FRAGMENT), the last ends at F.  The TOI separates envelopes of the same
  release that carry different signature sets.

FDT (the FLUTE File Delivery Table, TOI 0, codepoint 0; `otacast.schemas.fdt`)::

    12 TOI = 0 | 16 EXT_FDT (HET 192, V = 2, instance id u20) | 20 EXT_FTI (as above)
    36 SBN (u16) | 38 ESI (u16) | 40 FDT XML

  For plain FLUTE receivers; a device never parses it (`parse_datagram` returns `FdtPacket`).

AUTH (a signed page of DATA digests, packet authentication; see `otacast.plugin.auth`), on its
own TSI (the session's TSI with the top bit flipped) so FLUTE receivers of the session ignore
it; codepoint 0, HDR_LEN 4, TOI = 1 + the sender number (TOI 0 is the FDT's in any FLUTE
session, and sender 0 exists)::

    16 SBN (u16) = 0 | 18 ESI (u16) = 0 | 20 sender (u16) | 22 count (u16) | 24 chunk (u32)
    28 page (u32) | 32 sent (u64) | 40 digests (count x 10 bytes) | signature (64 bytes)

  Page ``j`` of chunk ``c`` lists the truncated SHA-256 (`packet_digest`) of the DATA datagrams
  (whole, as sent) at positions ``j*P .. j*P+count-1`` of that chunk's symbol cycle as this
  sender sends them.  ``sent`` is when the sender signed it, in microseconds since the Unix
  epoch by the sender's clock, strictly increasing from one page to the next of one sender: it
  makes a recorded page worthless once newer ones have been heard (`otacast.plugin.auth`).  The
  Ed25519 signature, by the stream key the signed manifest lists for ``sender``, covers
  ``AUTH_CONTEXT`` followed by every byte of the datagram before it (LCT header included).

A datagram of otacast wire 2 (magic ``b"OC"``) is refused as ``old-wire-version``.

The hot path does not run construct (~17 us per parse): `parse_datagram` uses `struct.Struct`
objects with the same layout, and the test suite proves both parsers agree on every input and
both builders produce identical bytes.  `peek_data` is the receiver's per-datagram fast path
(the fields of a DATA datagram as a tuple, no packet object), proven against the construct
definition the same way.  `parse_datagram_spec` runs the construct definition and
exists for tests, tools and as the executable specification.  Never parse untrusted data with
construct's ``.compile()``: compiled parsers skip checks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    BytesInteger,
    Const,
    ConstructError,
    Flag,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Struct,
    Terminated,
    this,
)

from .errors import PacketError
from .limits import MAX_DATAGRAM, MAX_ESI, MAX_MANIFEST_BYTES, MIN_MANIFEST_FRAGMENT, PART_CHUNKS

WIRE_VERSION: Final = 3  # 3: FLUTE/ALC/LCT (2: the "OC" datagrams)
OLD_MAGIC: Final = b"OC"  # what every otacast wire 2 datagram starts with
OLD_WIRE_VERSION_TEXT: Final = (
    "this device speaks FLUTE/ALC (otacast wire 3); the sender speaks otacast wire 2 "
    "(upgrade otacast-signer on the sender)"
)

LCT_VERSION: Final = 1
CODEPOINT_NO_CODE: Final = 0  # FEC Encoding ID 0, Compact No-Code (RFC 5445)
CODEPOINT_RAPTORQ: Final = 6  # FEC Encoding ID 6, RaptorQ (RFC 6330)
HET_FTI: Final = 64  # EXT_FTI (RFC 5775 section 2.4.1)
HET_FDT: Final = 192  # EXT_FDT (RFC 6726 section 3.4.1)
FLUTE_VERSION: Final = 2  # RFC 6726
FDT_TOI: Final = 0
MANIFEST_TOI_BIT: Final = 0x80000000  # manifest objects; image parts are TOI 1 ..
# The block index object: between the image parts (at most MAX_PART_TOI) and the manifests.
INDEX_TOI: Final = 0x40000000
AUTH_TSI_BIT: Final = 0x80000000  # AUTH pages: the session's TSI with this bit flipped
# The delta lane (delta delivery; its own groups, `addressing.LANE_RATE_INDEX`) is a FLUTE session
# of its own: the session's TSI with this bit flipped.  Its FDT (TOI 0) and manifest objects are
# those of the data session; its RaptorQ objects are the lane object (`schemas.deltaobject`) and
# one index patch per listed release, each cut into source blocks as an image part of its length
# is.  Their DATA datagrams have the image's layout, so the parsers read TOI t, SBN b as "chunk"
# 255*(t-1)+b: lane chunks 0.. are the lane object's blocks, lane_patch_first_chunk(j).. patch j's.
# The index group (`addressing.INDEX_RATE_INDEX`) is another such session (TSI `index_tsi`) whose
# one RaptorQ object is the release's full block index, TOI INDEX_GROUP_TOI (chunks
# INDEX_GROUP_FIRST_CHUNK..); the lane does not use that TOI, so its patches keep theirs.
LANE_TSI_BIT: Final = 0x40000000
INDEX_TSI_BIT: Final = 0x20000000
LANE_OBJECT_TOI: Final = 1
INDEX_GROUP_TOI: Final = 2
LANE_PATCH_TOI: Final = 3  # + j for the j-th release the manifest's delta lists
# Image parts are TOI 1 .. MAX_PART_TOI, so that every chunk index of 32 bits has one.
MAX_PART_TOI: Final = 1 + 0xFFFFFFFF // PART_CHUNKS
# A payload id (SBN << 24 | ESI) at or above this names no block of an object.
_PAYLOAD_ID_LIMIT: Final = PART_CHUNKS << 24
# What `peek_data` gives as the chunk of the index object's block 0 (block b: this + b).
INDEX_FIRST_CHUNK: Final = (INDEX_TOI - 1) * PART_CHUNKS
assert INDEX_TOI > MAX_PART_TOI and INDEX_FIRST_CHUNK > 0xFFFFFFFF
INDEX_GROUP_FIRST_CHUNK: Final = (INDEX_GROUP_TOI - 1) * PART_CHUNKS


def lane_tsi(session_tsi: int) -> int:
    """The delta lane's TSI for a session's (data) TSI."""
    return session_tsi ^ LANE_TSI_BIT


def index_tsi(session_tsi: int) -> int:
    """The index group's TSI for a session's (data) TSI."""
    return session_tsi ^ INDEX_TSI_BIT


def lane_patch_first_chunk(j: int) -> int:
    """The lane "chunk" of block 0 of the index patch for the j-th listed release."""
    return (LANE_PATCH_TOI + j - 1) * PART_CHUNKS


# A DATA digest is 80 bits: forging a datagram that matches one of the <= MAX_AUTH_DIGESTS
# digests a receiver holds takes ~2^64 hashes, and 10 bytes per datagram (sent twice) keep the
# AUTH traffic under 2% of the DATA bytes.
DIGEST_BYTES: Final = 10
SIGNATURE_BYTES: Final = 64
# Domain separation: an AUTH signature can never be mistaken for a manifest or trust-set one.
AUTH_CONTEXT: Final = b"otacast-auth-v3\x00"

SESSION_ID_BYTES: Final = 8  # the manifest's session id; its first 4 bytes are the TSI
ENVELOPE_ID_BYTES: Final = 8

# --- The specification (construct) ------------------------------------------------------------


def _const_or_any(value: int | None) -> Any:
    return BitsInteger(8) if value is None else Const(value, BitsInteger(8))


def _lct(hdr_len: int | None, codepoint: int | None) -> Struct:
    """An LCT header (RFC 5651 section 5.1) with otacast's fixed choices as constants (HDR_LEN
    and the codepoint too unless None)."""
    return Struct(
        "word0"
        / BitStruct(
            "v" / Const(LCT_VERSION, BitsInteger(4)),
            "c" / Const(0, BitsInteger(2)),  # CCI 32 bits
            "psi" / Const(0, BitsInteger(2)),
            "s" / Const(True, Flag),  # TSI 32 bits
            "o" / Const(1, BitsInteger(2)),  # TOI 32 bits
            "h" / Const(False, Flag),
            "res" / Const(0, BitsInteger(2)),
            "a" / Const(False, Flag),  # close session
            "b" / Const(False, Flag),  # close object
            "hdr_len" / _const_or_any(hdr_len),  # in 32-bit words
            "codepoint" / _const_or_any(codepoint),
        ),
        "cci" / Const(0, Int32ub),
        "tsi" / Int32ub,
        "toi" / Int32ub,
    )


# Any LCT header (RFC 5651 section 5.1, with 32-bit CCI, TSI and TOI), and the same with otacast's
# fixed choices (everything but HDR_LEN and the codepoint) as constants.
LCT = Struct(
    "word0"
    / BitStruct(
        "v" / BitsInteger(4),
        "c" / BitsInteger(2),
        "psi" / BitsInteger(2),
        "s" / Flag,
        "o" / BitsInteger(2),
        "h" / Flag,
        "res" / BitsInteger(2),
        "a" / Flag,
        "b" / Flag,
        "hdr_len" / BitsInteger(8),
        "codepoint" / BitsInteger(8),
    ),
    "cci" / Int32ub,
    "tsi" / Int32ub,
    "toi" / Int32ub,
)
LCT_FIXED = _lct(None, None)
LCT_DATA = _lct(4, CODEPOINT_RAPTORQ)
LCT_AUTH = _lct(4, CODEPOINT_NO_CODE)
LCT_MANIFEST = _lct(8, CODEPOINT_NO_CODE)
LCT_FDT = _lct(9, CODEPOINT_NO_CODE)

# EXT_FTI of the Compact No-Code scheme (RFC 5445 section 5.2.1 layout, RFC 5775 EXT_FTI).
EXT_FTI_NO_CODE = Struct(
    "het" / Const(HET_FTI, Int8ub),
    "hel" / Const(4, Int8ub),
    "transfer_length" / BytesInteger(6),
    "reserved" / Const(0, Int16ub),
    "symbol_length" / Int16ub,
    "max_block_length" / Int32ub,
)
EXT_FDT = BitStruct(
    "het" / Const(HET_FDT, BitsInteger(8)),
    "version" / Const(FLUTE_VERSION, BitsInteger(4)),
    "instance" / BitsInteger(20),
)
PAYLOAD_ID_RAPTORQ = Struct("sbn" / Int8ub, "esi" / Int24ub)
PAYLOAD_ID_NO_CODE = Struct("sbn" / Int16ub, "esi" / Int16ub)

DATA = Struct(
    "lct" / LCT_DATA,
    "payload_id" / PAYLOAD_ID_RAPTORQ,
    "symbol" / GreedyBytes,
)

MANIFEST = Struct(
    "lct" / LCT_MANIFEST,
    "fti" / EXT_FTI_NO_CODE,
    "payload_id" / PAYLOAD_ID_NO_CODE,
    "fragment" / GreedyBytes,
)

FDT_HEAD = Struct(
    "lct" / LCT_FDT,
    "fdt" / EXT_FDT,
    "fti" / EXT_FTI_NO_CODE,
    "payload_id" / PAYLOAD_ID_NO_CODE,
)

AUTH = Struct(
    "lct" / LCT_AUTH,
    "payload_id" / PAYLOAD_ID_NO_CODE,
    "sender" / Int16ub,
    "count" / Int16ub,
    "chunk" / Int32ub,
    "page" / Int32ub,
    "sent" / Int64ub,
    "digests" / Bytes(this.count * DIGEST_BYTES),
    "signature" / Bytes(SIGNATURE_BYTES),
    Terminated,
)
AUTH_HEAD = Struct(
    "lct" / LCT_AUTH,
    "payload_id" / PAYLOAD_ID_NO_CODE,
    "sender" / Int16ub,
)

LCT_SIZE: Final = 16
DATA_HEADER_SIZE: Final = LCT_SIZE + 4  # 20: LCT header, payload id
MANIFEST_HEADER_SIZE: Final = LCT_SIZE + 16 + 4  # 36: LCT header, EXT_FTI, payload id
FDT_HEADER_SIZE: Final = LCT_SIZE + 4 + 16 + 4  # 40: LCT header, EXT_FDT, EXT_FTI, payload id
AUTH_HEADER_SIZE: Final = LCT_SIZE + 4 + 20  # 40: LCT header, payload id, page fields
assert LCT_DATA.sizeof() == LCT_SIZE
assert FDT_HEAD.sizeof() == FDT_HEADER_SIZE

# Offset of the RaptorQ payload id (SBN + ESI) inside a DATA datagram.
CODEC_PACKET_OFFSET: Final = LCT_SIZE

# --- The hot path (struct), proven identical to the specification by tests --------------------

# Word 0 of an LCT header without its last two bytes (HDR_LEN, codepoint): V=1, S=1, O=01.
_LCT_FLAGS: Final = 0x10A0
_LCT_FAST = struct.Struct(">HBBIII")  # flags, hdr_len, codepoint, cci, tsi, toi
_FTI_FAST = struct.Struct(">BBHIHHI")  # het, hel, F high 16, F low 32, reserved, E, B
_NO_CODE_ID = struct.Struct(">HH")
_AUTH_FAST = struct.Struct(">HHHHIIQ")  # payload id (sbn, esi), sender, count, chunk, page, sent
_DATA_BUILD = struct.Struct(">HBBIIII")

assert _LCT_FAST.size == LCT_SIZE
assert _FTI_FAST.size == 16
assert _AUTH_FAST.size == AUTH_HEADER_SIZE - LCT_SIZE


def _word0(hdr_len: int, codepoint: int) -> int:
    return _LCT_FLAGS << 16 | hdr_len << 8 | codepoint


# The receiver's per-datagram path: the 8 bytes (word 0 and CCI) that make a DATA datagram of
# this wire version, then TSI, TOI and payload id, in one unpack.
_DATA_PREFIX: Final = _word0(4, CODEPOINT_RAPTORQ) << 32  # CCI 0
_DATA_PEEK = struct.Struct(">QIII")
assert _DATA_PEEK.size == DATA_HEADER_SIZE
# The raw header words a DATA datagram starts with (that prefix, TSI, TOI, payload id), for a
# caller that compares datagrams with one `peek_data` accepted (the core's runs of consecutive
# ESIs: the next one of a run has the same words but a payload id one higher).
unpack_data_header: Final = _DATA_PEEK.unpack_from


def peek_data(
    data: bytes | bytearray | memoryview,
    _unpack: Callable[[bytes | bytearray | memoryview], tuple[Any, ...]] = _DATA_PEEK.unpack_from,
    _prefix: int = _DATA_PREFIX,
    _limit: int = _PAYLOAD_ID_LIMIT,
) -> tuple[int, int, int] | None:
    """``(tsi, chunk, esi)`` of a DATA datagram with a symbol, else None.

    The receiver's fast path: no packet object, no copy of the symbol (it stays at
    ``data[DATA_HEADER_SIZE:]``; the codec reads ``data[CODEC_PACKET_OFFSET:]``, whose first
    byte, the SBN, it ignores).  ``chunk`` is ``255*(TOI-1) + SBN``; TOI 0 (the FDT's) and
    SBN 255 (no block) give None; the index object's datagrams give ``INDEX_FIRST_CHUNK + SBN``.
    It reads the layout only: the caller checks the chunk range
    (a TOI beyond MAX_PART_TOI gives a chunk beyond 32 bits, which no release has) and the
    symbol length against what it expects, and hands anything that gives None to
    `parse_datagram` for a packet or a rejection reason.  The datagram's length is not bounded
    here (the transport drops longer ones), so a receiver counts an overlong DATA datagram of its
    session as a wrong symbol length.  (The defaults bind the constants as locals: this runs for
    every datagram.)
    """
    if len(data) <= DATA_HEADER_SIZE:
        return None
    prefix, tsi, toi, payload_id = _unpack(data)
    if prefix != _prefix or not toi or payload_id >= _limit:
        return None
    return tsi, toi * PART_CHUNKS - PART_CHUNKS + (payload_id >> 24), payload_id & MAX_ESI


@dataclass(frozen=True, slots=True)
class DataPacket:
    """One RaptorQ encoding symbol of one chunk (the image's chunk ``chunk``)."""

    tsi: int
    chunk: int
    esi: int
    symbol: bytes

    def __post_init__(self) -> None:
        _check_u32(self.tsi, "tsi")
        _check_u32(self.chunk, "chunk")
        if not 0 <= self.esi <= MAX_ESI:
            raise ValueError("esi out of range")
        if not self.symbol or DATA_HEADER_SIZE + len(self.symbol) > MAX_DATAGRAM:
            raise ValueError("symbol length out of range")

    @property
    def toi(self) -> int:
        return 1 + self.chunk // PART_CHUNKS

    @property
    def sbn(self) -> int:
        return self.chunk % PART_CHUNKS


@dataclass(frozen=True, slots=True)
class IndexPacket:
    """One RaptorQ encoding symbol of source block `block` of the block index object
    (TOI ``INDEX_TOI``)."""

    tsi: int
    block: int
    esi: int
    symbol: bytes

    def __post_init__(self) -> None:
        _check_u32(self.tsi, "tsi")
        if not 0 <= self.block < PART_CHUNKS:
            raise ValueError("block out of range")
        if not 0 <= self.esi <= MAX_ESI:
            raise ValueError("esi out of range")
        if not self.symbol or DATA_HEADER_SIZE + len(self.symbol) > MAX_DATAGRAM:
            raise ValueError("symbol length out of range")


@dataclass(frozen=True, slots=True)
class ManifestPacket:
    """Fragment `index` of a signed manifest envelope of `total_length` bytes cut into
    `fragment_size`-byte fragments: ``envelope[index*fragment_size :][: len(fragment)]``."""

    tsi: int
    toi: int  # MANIFEST_TOI_BIT | 31 bits of the envelope id
    total_length: int
    fragment_size: int
    index: int
    fragment: bytes

    def __post_init__(self) -> None:
        _check_u32(self.tsi, "tsi")
        if not MANIFEST_TOI_BIT <= self.toi <= 0xFFFFFFFF:
            raise ValueError("a manifest TOI has its top bit set")
        reason = _manifest_fragment_problem(
            self.total_length, self.fragment_size, self.index, len(self.fragment)
        )
        if reason is not None:
            raise ValueError(reason)

    @property
    def offset(self) -> int:
        return self.index * self.fragment_size


@dataclass(frozen=True, slots=True)
class AuthPacket:
    """A page of DATA digests of one chunk, signed by one sender's stream key.  `tsi` is the
    session's TSI (the datagram carries it with AUTH_TSI_BIT flipped)."""

    tsi: int
    sender: int
    chunk: int
    page: int
    sent: int  # microseconds since the Unix epoch, by the sender's clock
    digests: bytes  # count x DIGEST_BYTES
    signature: bytes

    def __post_init__(self) -> None:
        _check_u32(self.tsi, "tsi")
        if not 0 <= self.sender <= 0xFFFF:
            raise ValueError("sender out of range")
        _check_u32(self.chunk, "chunk")
        _check_u32(self.page, "page")
        if not 0 <= self.sent < 1 << 64:
            raise ValueError("sent out of range")
        if len(self.signature) != SIGNATURE_BYTES:
            raise ValueError("signature must be 64 bytes")
        if _auth_count_problem(len(self.digests)) is not None:
            raise ValueError("digest list length out of range")

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST_BYTES

    def digest_list(self) -> list[bytes]:
        d = self.digests
        return [d[i : i + DIGEST_BYTES] for i in range(0, len(d), DIGEST_BYTES)]


@dataclass(frozen=True, slots=True)
class FdtPacket:
    """A FLUTE FDT packet (TOI 0): for plain FLUTE receivers; a device reads nothing of it."""

    tsi: int


Packet = DataPacket | IndexPacket | ManifestPacket | AuthPacket


def packet_digest(datagram: bytes | bytearray | memoryview) -> bytes:
    """The digest an AUTH page lists for a DATA datagram (the whole datagram, header included)."""
    return hashlib.sha256(datagram).digest()[:DIGEST_BYTES]


def packet_digests(datagrams: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """`packet_digest` of each of `datagrams`, end to end: an AUTH page's slice for a run of
    consecutive ESIs (one comparison checks the run)."""
    return b"".join(map(packet_digest, datagrams))


def auth_signed_bytes(datagram: bytes) -> bytes:
    """What an AUTH datagram's signature covers."""
    return AUTH_CONTEXT + datagram[:-SIGNATURE_BYTES]


def auth_capacity(max_datagram: int) -> int:
    """How many digests one AUTH datagram of at most `max_datagram` bytes carries (112 in a
    1228-byte DATA datagram's size)."""
    return (max_datagram - AUTH_HEADER_SIZE - SIGNATURE_BYTES) // DIGEST_BYTES


def session_tsi(session_id: bytes) -> int:
    """The LCT TSI of a session: the first 4 bytes of its id."""
    return int.from_bytes(session_id[:4], "big")


def manifest_toi(envelope_id: bytes) -> int:
    """The TOI of a manifest envelope's object: the top bit and 31 bits of its id."""
    return MANIFEST_TOI_BIT | int.from_bytes(envelope_id[:4], "big") & ~MANIFEST_TOI_BIT


def _auth_count_problem(digest_bytes: int) -> str | None:
    if digest_bytes == 0 or digest_bytes % DIGEST_BYTES:
        return "auth-length"
    if AUTH_HEADER_SIZE + digest_bytes + SIGNATURE_BYTES > MAX_DATAGRAM:
        return "oversized"
    return None


def _check_u32(value: int, name: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} out of range")


def _manifest_fragment_problem(total: int, size: int, index: int, length: int) -> str | None:
    if not 0 < total <= MAX_MANIFEST_BYTES:
        return "manifest-length"
    if not MIN_MANIFEST_FRAGMENT <= size <= MAX_DATAGRAM - MANIFEST_HEADER_SIZE:
        return "fragment-length"  # bounds reassembly: at most MAX_MANIFEST_BYTES / 256 of them
    offset = index * size
    if length == 0 or offset >= total:
        return "fragment-range"
    if length != min(size, total - offset):
        return "fragment-length"  # every fragment but the last is whole, the last ends at F
    return None


def _lct_problem(n: int, flags: int, cci: int) -> str | None:
    if n > MAX_DATAGRAM:
        return "oversized"
    if flags >> 12 != LCT_VERSION:
        return "bad-version"
    if flags != _LCT_FLAGS or cci:
        return "bad-header"  # another LCT layout than the one otacast sends
    return None


def _part_chunk(toi: int, sbn: int) -> int:
    """The image chunk of an image part's block (both parsers): the last TOI's blocks beyond
    32 bits name no chunk of any release."""
    chunk = (toi - 1) * PART_CHUNKS + sbn
    if chunk > 0xFFFFFFFF:
        raise PacketError("bad-sbn")
    return chunk


def _check_data(hdr_len: int, n: int, toi: int) -> None:
    """A DATA datagram's header length, symbol and TOI (both parsers)."""
    if hdr_len != 4:
        raise PacketError("bad-header")
    if n <= DATA_HEADER_SIZE:
        raise PacketError("short")
    if not 0 < toi <= MAX_PART_TOI and toi != INDEX_TOI:
        raise PacketError("bad-toi")


def parse_datagram(data: bytes | bytearray | memoryview) -> Packet | FdtPacket:
    """Parse one datagram (fast path).  Raises `PacketError` with a reason slug, nothing else."""
    n = len(data)
    if n >= 2 and bytes(data[:2]) == OLD_MAGIC:
        raise PacketError("old-wire-version")
    if n < LCT_SIZE:
        raise PacketError("short")
    flags, hdr_len, codepoint, cci, tsi, toi = _LCT_FAST.unpack_from(data)
    reason = _lct_problem(n, flags, cci)
    if reason is not None:
        raise PacketError(reason)
    if codepoint == CODEPOINT_RAPTORQ:
        _check_data(hdr_len, n, toi)
        (pid,) = struct.unpack_from(">I", data, LCT_SIZE)
        if pid >= _PAYLOAD_ID_LIMIT:
            raise PacketError("bad-sbn")
        if toi == INDEX_TOI:
            return IndexPacket(tsi, pid >> 24, pid & MAX_ESI, bytes(data[DATA_HEADER_SIZE:]))
        chunk = _part_chunk(toi, pid >> 24)
        return DataPacket(tsi, chunk, pid & MAX_ESI, bytes(data[DATA_HEADER_SIZE:]))
    if codepoint != CODEPOINT_NO_CODE:
        raise PacketError("unknown-kind")
    if toi == FDT_TOI:
        return FdtPacket(tsi)
    if toi & MANIFEST_TOI_BIT:
        return _parse_manifest(data, n, hdr_len, tsi, toi)
    return _parse_auth(data, n, hdr_len, tsi, toi)


def _parse_manifest(
    data: bytes | bytearray | memoryview, n: int, hdr_len: int, tsi: int, toi: int
) -> ManifestPacket:
    if hdr_len != 8:
        raise PacketError("bad-header")
    if n <= MANIFEST_HEADER_SIZE:
        raise PacketError("short")
    het, hel, f_high, f_low, reserved, size, _ = _FTI_FAST.unpack_from(data, LCT_SIZE)
    if het != HET_FTI or hel != 4 or reserved:
        raise PacketError("bad-header")
    sbn, index = _NO_CODE_ID.unpack_from(data, LCT_SIZE + 16)
    if sbn:
        raise PacketError("bad-sbn")
    total = f_high << 32 | f_low
    reason = _manifest_fragment_problem(total, size, index, n - MANIFEST_HEADER_SIZE)
    if reason is not None:
        raise PacketError(reason)
    return ManifestPacket(tsi, toi, total, size, index, bytes(data[MANIFEST_HEADER_SIZE:]))


def _parse_auth(
    data: bytes | bytearray | memoryview, n: int, hdr_len: int, tsi: int, toi: int
) -> AuthPacket:
    if hdr_len != 4:
        raise PacketError("bad-header")
    if n < AUTH_HEADER_SIZE + DIGEST_BYTES + SIGNATURE_BYTES:
        raise PacketError("short")
    sbn, esi, sender, count, chunk, page, sent = _AUTH_FAST.unpack_from(data, LCT_SIZE)
    if sbn or esi or sender + 1 != toi:
        raise PacketError("bad-header")
    if count == 0 or AUTH_HEADER_SIZE + count * DIGEST_BYTES + SIGNATURE_BYTES != n:
        raise PacketError("auth-length")
    end = n - SIGNATURE_BYTES
    return AuthPacket(
        tsi ^ AUTH_TSI_BIT,
        sender,
        chunk,
        page,
        sent,
        bytes(data[AUTH_HEADER_SIZE:end]),
        bytes(data[end:]),
    )


def parse_datagram_spec(data: bytes) -> Packet | FdtPacket:
    """Parse one datagram with the construct specification; same results as `parse_datagram`."""
    n = len(data)
    if data[:2] == OLD_MAGIC:
        raise PacketError("old-wire-version")
    if n < LCT_SIZE:
        raise PacketError("short")
    if n > MAX_DATAGRAM:
        raise PacketError("oversized")
    lct = LCT.parse(data)
    if lct.word0.v != LCT_VERSION:
        raise PacketError("bad-version")
    try:
        LCT_FIXED.parse(data)
    except ConstructError:
        raise PacketError("bad-header") from None
    tsi, toi, hdr_len, codepoint = lct.tsi, lct.toi, lct.word0.hdr_len, lct.word0.codepoint
    if codepoint == CODEPOINT_RAPTORQ:
        _check_data(hdr_len, n, toi)
        parsed = DATA.parse(data)
        if parsed.payload_id.sbn >= PART_CHUNKS:
            raise PacketError("bad-sbn")
        if toi == INDEX_TOI:
            return IndexPacket(tsi, parsed.payload_id.sbn, parsed.payload_id.esi, parsed.symbol)
        chunk = _part_chunk(toi, parsed.payload_id.sbn)
        return DataPacket(tsi, chunk, parsed.payload_id.esi, parsed.symbol)
    if codepoint != CODEPOINT_NO_CODE:
        raise PacketError("unknown-kind")
    if toi == FDT_TOI:
        return FdtPacket(tsi)
    if toi & MANIFEST_TOI_BIT:
        return _parse_manifest_spec(data, hdr_len, tsi, toi)
    return _parse_auth_spec(data, hdr_len, tsi, toi)


def _parse_manifest_spec(data: bytes, hdr_len: int, tsi: int, toi: int) -> ManifestPacket:
    if hdr_len != 8:
        raise PacketError("bad-header")
    if len(data) <= MANIFEST_HEADER_SIZE:
        raise PacketError("short")
    try:
        parsed = MANIFEST.parse(data)
    except ConstructError:
        raise PacketError("bad-header") from None
    if parsed.payload_id.sbn:
        raise PacketError("bad-sbn")
    total, size = parsed.fti.transfer_length, parsed.fti.symbol_length
    index = parsed.payload_id.esi
    reason = _manifest_fragment_problem(total, size, index, len(parsed.fragment))
    if reason is not None:
        raise PacketError(reason)
    return ManifestPacket(tsi, toi, total, size, index, parsed.fragment)


def _parse_auth_spec(data: bytes, hdr_len: int, tsi: int, toi: int) -> AuthPacket:
    if hdr_len != 4:
        raise PacketError("bad-header")
    if len(data) < AUTH_HEADER_SIZE + DIGEST_BYTES + SIGNATURE_BYTES:
        raise PacketError("short")
    head = AUTH_HEAD.parse(data)
    if head.payload_id.sbn or head.payload_id.esi or head.sender + 1 != toi:
        raise PacketError("bad-header")
    try:
        parsed = AUTH.parse(data)
    except ConstructError:
        raise PacketError("auth-length") from None
    if parsed.count == 0:
        raise PacketError("auth-length")
    return AuthPacket(
        tsi ^ AUTH_TSI_BIT,
        parsed.sender,
        parsed.chunk,
        parsed.page,
        parsed.sent,
        parsed.digests,
        parsed.signature,
    )


def _fti(total: int, size: int) -> bytes:
    return _FTI_FAST.pack(HET_FTI, 4, total >> 32, total & 0xFFFFFFFF, 0, size, -(-total // size))


def build_datagram(packet: Packet) -> bytes:
    """Serialise a packet (fast path)."""
    if isinstance(packet, DataPacket):
        head = _DATA_BUILD.pack(
            _LCT_FLAGS,
            4,
            CODEPOINT_RAPTORQ,
            0,
            packet.tsi,
            packet.toi,
            packet.sbn << 24 | packet.esi,
        )
        return head + packet.symbol
    if isinstance(packet, IndexPacket):
        head = _DATA_BUILD.pack(
            _LCT_FLAGS,
            4,
            CODEPOINT_RAPTORQ,
            0,
            packet.tsi,
            INDEX_TOI,
            packet.block << 24 | packet.esi,
        )
        return head + packet.symbol
    if isinstance(packet, AuthPacket):
        lct = _LCT_FAST.pack(
            _LCT_FLAGS, 4, CODEPOINT_NO_CODE, 0, packet.tsi ^ AUTH_TSI_BIT, 1 + packet.sender
        )
        body = _AUTH_FAST.pack(
            0, 0, packet.sender, packet.count, packet.chunk, packet.page, packet.sent
        )
        return lct + body + packet.digests + packet.signature
    lct = _LCT_FAST.pack(_LCT_FLAGS, 8, CODEPOINT_NO_CODE, 0, packet.tsi, packet.toi)
    fti = _fti(packet.total_length, packet.fragment_size)
    return lct + fti + _NO_CODE_ID.pack(0, packet.index) + packet.fragment


def _fti_spec(total: int, size: int) -> dict[str, int]:
    return {
        "transfer_length": total,
        "symbol_length": size,
        "max_block_length": -(-total // size),
    }


def _lct_spec(tsi: int, toi: int) -> dict[str, object]:
    return {"word0": {}, "tsi": tsi, "toi": toi}


def build_datagram_spec(packet: Packet) -> bytes:
    """Serialise a packet with the construct specification; same bytes as `build_datagram`."""
    if isinstance(packet, DataPacket):
        return bytes(
            DATA.build(
                {
                    "lct": _lct_spec(packet.tsi, packet.toi),
                    "payload_id": {"sbn": packet.sbn, "esi": packet.esi},
                    "symbol": packet.symbol,
                }
            )
        )
    if isinstance(packet, IndexPacket):
        return bytes(
            DATA.build(
                {
                    "lct": _lct_spec(packet.tsi, INDEX_TOI),
                    "payload_id": {"sbn": packet.block, "esi": packet.esi},
                    "symbol": packet.symbol,
                }
            )
        )
    if isinstance(packet, AuthPacket):
        return bytes(
            AUTH.build(
                {
                    "lct": _lct_spec(packet.tsi ^ AUTH_TSI_BIT, 1 + packet.sender),
                    "payload_id": {"sbn": 0, "esi": 0},
                    "sender": packet.sender,
                    "count": packet.count,
                    "chunk": packet.chunk,
                    "page": packet.page,
                    "sent": packet.sent,
                    "digests": packet.digests,
                    "signature": packet.signature,
                }
            )
        )
    return bytes(
        MANIFEST.build(
            {
                "lct": _lct_spec(packet.tsi, packet.toi),
                "fti": _fti_spec(packet.total_length, packet.fragment_size),
                "payload_id": {"sbn": 0, "esi": packet.index},
                "fragment": packet.fragment,
            }
        )
    )


def build_fdt_datagram(tsi: int, instance: int, total: int, index: int, symbol: bytes) -> bytes:
    """FDT packet `index` (its ESI) of an FDT instance of `total` bytes, carrying `symbol`
    (its bytes ``index*len(first symbol)`` on; the fragment size is `FDT_SYMBOL_SIZE`)."""
    lct = _LCT_FAST.pack(_LCT_FLAGS, 9, CODEPOINT_NO_CODE, 0, tsi, FDT_TOI)
    ext_fdt = (HET_FDT << 24 | FLUTE_VERSION << 20 | instance).to_bytes(4, "big")
    return lct + ext_fdt + _fti(total, FDT_SYMBOL_SIZE) + _NO_CODE_ID.pack(0, index) + symbol


def build_fdt_datagram_spec(
    tsi: int, instance: int, total: int, index: int, symbol: bytes
) -> bytes:
    """`build_fdt_datagram` with the construct specification."""
    head = FDT_HEAD.build(
        {
            "lct": _lct_spec(tsi, FDT_TOI),
            "fdt": {"instance": instance},
            "fti": _fti_spec(total, FDT_SYMBOL_SIZE),
            "payload_id": {"sbn": 0, "esi": index},
        }
    )
    return bytes(head) + symbol


# An FDT instance is cut into symbols of this size: an FDT datagram (40 bytes of header) is then
# never larger than the smallest DATA datagram otacast sends at the minimum MTU.
FDT_SYMBOL_SIZE: Final = 1024


def data_datagram_size(symbol_size: int) -> int:
    """UDP payload size of a DATA datagram carrying a symbol of `symbol_size` bytes."""
    return DATA_HEADER_SIZE + symbol_size


def fragment_envelope(
    tsi: int, envelope_id: bytes, envelope: bytes, max_datagram: int
) -> list[ManifestPacket]:
    """Split a manifest envelope into MANIFEST packets that fit `max_datagram` bytes each."""
    step = max_datagram - MANIFEST_HEADER_SIZE
    if step < MIN_MANIFEST_FRAGMENT:
        raise ValueError("datagram too small for a manifest fragment")
    toi = manifest_toi(envelope_id)
    return [
        ManifestPacket(tsi, toi, len(envelope), step, index, envelope[offset : offset + step])
        for index, offset in enumerate(range(0, len(envelope), step))
    ]
