"""Datagram layouts: the construct definitions below are the specification.

Every otacast datagram starts with the same 12-byte big-endian header::

    0       2         3      4            12
    | magic | version | kind | session id | kind-specific body ...

* magic ``b"OC"``; version 2; kind 1 = DATA, 2 = MANIFEST, 3 = AUTH.
* session id: the first 8 bytes of SHA-256 over the manifest's canonical signed bytes, so
  packets of another release are dropped after one 8-byte comparison.

DATA (one RaptorQ encoding symbol)::

    12 chunk index (u32) | 16 SBN (u8) | 17 ESI (u24) | 20 symbol (T bytes)

  SBN + ESI is RaptorQ's own 4-byte payload id (RFC 6330 section 3.2).  SBN is always 0 because
  every chunk is a single source block.  Bytes 16.. of a DATA datagram are therefore exactly the
  packet the RaptorQ codec consumes, and the receiver hands a slice to the decoder without
  re-framing it.  With the default symbol size of 1208 bytes (the codec aligns symbols to 8) a
  DATA datagram is 1228 bytes, within the 1232-byte IPv6 minimum-MTU UDP payload.

MANIFEST (a fragment of the signed manifest envelope)::

    12 envelope id (8 bytes) | 20 total length (u32) | 24 offset (u32) | 28 fragment

  The envelope id (first 8 bytes of SHA-256 of the whole envelope) separates fragments of two
  envelopes of the same release that carry different signature sets.  Every fragment but the
  last (the one ending at the total length) carries at least 256 bytes, which bounds the
  bookkeeping a receiver needs to reassemble a hostile stream.

AUTH (a signed page of DATA digests, packet authentication; see `otacast.plugin.auth`)::

    12 sender (u16) | 14 count (u16) | 16 chunk (u32) | 20 page (u32) | 24 sent (u64)
    32 digests (count x 10 bytes) | signature (64 bytes)

  Page ``j`` of chunk ``c`` lists the truncated SHA-256 (`packet_digest`) of the DATA datagrams
  at positions ``j*P .. j*P+count-1`` of that chunk's symbol cycle as this sender sends them.
  ``sent`` is when the sender signed it, in microseconds since the Unix epoch by the sender's
  clock, strictly increasing from one page to the next of one sender: it makes a recorded page
  worthless once newer ones have been heard (`otacast.plugin.auth`).  The Ed25519 signature,
  by the stream key the signed manifest lists for ``sender``, covers ``AUTH_CONTEXT`` followed
  by every byte of the datagram before it.

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
from dataclasses import dataclass
from typing import Final

from construct import (
    Bytes,
    ConstructError,
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
from .limits import MAX_DATAGRAM, MAX_ESI, MAX_MANIFEST_BYTES, MIN_MANIFEST_FRAGMENT

MAGIC: Final = b"OC"
VERSION: Final = 2  # 2: AUTH pages carry the time they were signed, not a link

KIND_DATA: Final = 1
KIND_MANIFEST: Final = 2
KIND_AUTH: Final = 3

# A DATA digest is 80 bits: forging a datagram that matches one of the <= MAX_AUTH_DIGESTS
# digests a receiver holds takes ~2^64 hashes, and 10 bytes per datagram (sent twice) keep the
# AUTH traffic under 2% of the DATA bytes.
DIGEST_BYTES: Final = 10
SIGNATURE_BYTES: Final = 64
# Domain separation: an AUTH signature can never be mistaken for a manifest or trust-set one.
AUTH_CONTEXT: Final = b"otacast-auth-v2\x00"

SESSION_ID_BYTES: Final = 8
ENVELOPE_ID_BYTES: Final = 8

# --- The specification (construct) ------------------------------------------------------------

HEADER = Struct(
    "magic" / Bytes(2),
    "version" / Int8ub,
    "kind" / Int8ub,
    "session" / Bytes(SESSION_ID_BYTES),
)

DATA_BODY = Struct(
    "chunk" / Int32ub,
    "sbn" / Int8ub,
    "esi" / Int24ub,
    "symbol" / GreedyBytes,
)

MANIFEST_BODY = Struct(
    "envelope_id" / Bytes(ENVELOPE_ID_BYTES),
    "total_length" / Int32ub,
    "offset" / Int32ub,
    "fragment" / GreedyBytes,
)

AUTH_BODY = Struct(
    "sender" / Int16ub,
    "count" / Int16ub,
    "chunk" / Int32ub,
    "page" / Int32ub,
    "sent" / Int64ub,
    "digests" / Bytes(this.count * DIGEST_BYTES),
    "signature" / Bytes(SIGNATURE_BYTES),
    Terminated,
)

HEADER_SIZE: Final = 12
assert HEADER.sizeof() == HEADER_SIZE
DATA_HEADER_SIZE: Final = HEADER_SIZE + 8  # 20: header, chunk, payload id
MANIFEST_HEADER_SIZE: Final = HEADER_SIZE + ENVELOPE_ID_BYTES + 8  # 28
AUTH_HEADER_SIZE: Final = HEADER_SIZE + 20  # 32

# Offset of the RaptorQ payload id (SBN + ESI) inside a DATA datagram.
CODEC_PACKET_OFFSET: Final = HEADER_SIZE + 4

# --- The hot path (struct), proven identical to the specification by tests --------------------

_DATA_FAST = struct.Struct(">2sBB8sII")  # ... chunk, (sbn << 24 | esi)
_MANIFEST_FAST = struct.Struct(">2sBB8s8sII")
_HEADER_FAST = struct.Struct(">2sBB8s")
_AUTH_FAST = struct.Struct(">2sBB8sHHIIQ")

assert _DATA_FAST.size == DATA_HEADER_SIZE
assert _MANIFEST_FAST.size == MANIFEST_HEADER_SIZE
assert _HEADER_FAST.size == HEADER_SIZE
assert _AUTH_FAST.size == AUTH_HEADER_SIZE


# The receiver's per-datagram path: the 4 bytes that make a DATA datagram of this wire version,
# then session, chunk and payload id, in one unpack.
_DATA_PREFIX: Final = MAGIC + bytes([VERSION, KIND_DATA])
_DATA_PEEK = struct.Struct(">4s8sII")
assert _DATA_PEEK.size == DATA_HEADER_SIZE


def peek_data(data: bytes | bytearray | memoryview) -> tuple[bytes, int, int, int] | None:
    """``(session, chunk, sbn, esi)`` of a DATA datagram with a symbol, else None.

    The receiver's fast path: no packet object, no copy of the symbol (it stays at
    ``data[DATA_HEADER_SIZE:]``; the codec reads ``data[CODEC_PACKET_OFFSET:]``).  It reads the
    layout only: the caller checks SBN, chunk range and symbol length against what it expects,
    and hands anything that gives None to `parse_datagram` for a packet or a rejection reason.
    The datagram's length is not bounded here (the transport drops longer ones), so a receiver
    counts an overlong DATA datagram of its session as a wrong symbol length.
    """
    if len(data) <= DATA_HEADER_SIZE:
        return None
    prefix, session, chunk, payload_id = _DATA_PEEK.unpack_from(data)
    if prefix != _DATA_PREFIX:
        return None
    return session, chunk, payload_id >> 24, payload_id & MAX_ESI


@dataclass(frozen=True, slots=True)
class DataPacket:
    """One RaptorQ encoding symbol of one chunk."""

    session: bytes
    chunk: int
    esi: int
    symbol: bytes

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check_u32(self.chunk, "chunk")
        if not 0 <= self.esi <= MAX_ESI:
            raise ValueError("esi out of range")
        if not self.symbol or DATA_HEADER_SIZE + len(self.symbol) > MAX_DATAGRAM:
            raise ValueError("symbol length out of range")


@dataclass(frozen=True, slots=True)
class ManifestPacket:
    """A fragment ``envelope[offset:offset+len(fragment)]`` of a signed manifest envelope."""

    session: bytes
    envelope_id: bytes
    total_length: int
    offset: int
    fragment: bytes

    def __post_init__(self) -> None:
        _check_session(self.session)
        if len(self.envelope_id) != ENVELOPE_ID_BYTES:
            raise ValueError("envelope id must be 8 bytes")
        reason = _manifest_fragment_problem(self.total_length, self.offset, len(self.fragment))
        if reason is not None:
            raise ValueError(reason)


@dataclass(frozen=True, slots=True)
class AuthPacket:
    """A page of DATA digests of one chunk, signed by one sender's stream key."""

    session: bytes
    sender: int
    chunk: int
    page: int
    sent: int  # microseconds since the Unix epoch, by the sender's clock
    digests: bytes  # count x DIGEST_BYTES
    signature: bytes

    def __post_init__(self) -> None:
        _check_session(self.session)
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


Packet = DataPacket | ManifestPacket | AuthPacket


def packet_digest(datagram: bytes | bytearray | memoryview) -> bytes:
    """The digest an AUTH page lists for a DATA datagram (the whole datagram, header included)."""
    return hashlib.sha256(datagram).digest()[:DIGEST_BYTES]


def auth_signed_bytes(datagram: bytes) -> bytes:
    """What an AUTH datagram's signature covers."""
    return AUTH_CONTEXT + datagram[:-SIGNATURE_BYTES]


def auth_capacity(max_datagram: int) -> int:
    """How many digests one AUTH datagram of at most `max_datagram` bytes carries."""
    return (max_datagram - AUTH_HEADER_SIZE - SIGNATURE_BYTES) // DIGEST_BYTES


def _auth_count_problem(digest_bytes: int) -> str | None:
    if digest_bytes == 0 or digest_bytes % DIGEST_BYTES:
        return "auth-length"
    if AUTH_HEADER_SIZE + digest_bytes + SIGNATURE_BYTES > MAX_DATAGRAM:
        return "oversized"
    return None


def _check_session(session: bytes) -> None:
    if len(session) != SESSION_ID_BYTES:
        raise ValueError("session id must be 8 bytes")


def _check_u32(value: int, name: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} out of range")


def _manifest_fragment_problem(total: int, offset: int, length: int) -> str | None:
    if not 0 < total <= MAX_MANIFEST_BYTES:
        return "manifest-length"
    if length == 0 or MANIFEST_HEADER_SIZE + length > MAX_DATAGRAM:
        return "fragment-length"
    if offset + length > total:
        return "fragment-range"
    if length < MIN_MANIFEST_FRAGMENT and offset + length != total:
        return "fragment-length"  # only the last fragment may be short: bounds reassembly
    return None


def _check_header(data_len: int, magic: bytes, version: int) -> None:
    if data_len > MAX_DATAGRAM:
        raise PacketError("oversized")
    if magic != MAGIC:
        raise PacketError("bad-magic")
    if version != VERSION:
        raise PacketError("bad-version")


def parse_datagram(data: bytes | bytearray | memoryview) -> Packet:
    """Parse one datagram (fast path).  Raises `PacketError` with a reason slug, nothing else."""
    n = len(data)
    if n < HEADER_SIZE:
        raise PacketError("short")
    magic, version, kind, session = _HEADER_FAST.unpack_from(data)
    _check_header(n, magic, version)
    if kind == KIND_DATA:
        if n <= DATA_HEADER_SIZE:
            raise PacketError("short")
        _, _, _, _, chunk, pid = _DATA_FAST.unpack_from(data)
        if pid >> 24:
            raise PacketError("bad-sbn")
        return DataPacket(session, chunk, pid & MAX_ESI, bytes(data[DATA_HEADER_SIZE:]))
    if kind == KIND_MANIFEST:
        if n <= MANIFEST_HEADER_SIZE:
            raise PacketError("short")
        _, _, _, _, envelope_id, total, offset = _MANIFEST_FAST.unpack_from(data)
        reason = _manifest_fragment_problem(total, offset, n - MANIFEST_HEADER_SIZE)
        if reason is not None:
            raise PacketError(reason)
        return ManifestPacket(
            session, envelope_id, total, offset, bytes(data[MANIFEST_HEADER_SIZE:])
        )
    if kind == KIND_AUTH:
        if n < AUTH_HEADER_SIZE + DIGEST_BYTES + SIGNATURE_BYTES:
            raise PacketError("short")
        _, _, _, _, sender, count, chunk, page, sent = _AUTH_FAST.unpack_from(data)
        if count == 0 or AUTH_HEADER_SIZE + count * DIGEST_BYTES + SIGNATURE_BYTES != n:
            raise PacketError("auth-length")
        end = n - SIGNATURE_BYTES
        return AuthPacket(
            session,
            sender,
            chunk,
            page,
            sent,
            bytes(data[AUTH_HEADER_SIZE:end]),
            bytes(data[end:]),
        )
    raise PacketError("unknown-kind")


def parse_datagram_spec(data: bytes) -> Packet:
    """Parse one datagram with the construct specification; same results as `parse_datagram`."""
    n = len(data)
    try:
        header = HEADER.parse(data)
    except ConstructError:
        raise PacketError("short") from None
    _check_header(n, header.magic, header.version)
    body = data[HEADER_SIZE:]
    try:
        if header.kind == KIND_DATA:
            parsed = DATA_BODY.parse(body)
            if not parsed.symbol:
                raise PacketError("short")
            if parsed.sbn != 0:
                raise PacketError("bad-sbn")
            return DataPacket(header.session, parsed.chunk, parsed.esi, parsed.symbol)
        if header.kind == KIND_MANIFEST:
            parsed = MANIFEST_BODY.parse(body)
            if not parsed.fragment:
                raise PacketError("short")
            reason = _manifest_fragment_problem(
                parsed.total_length, parsed.offset, len(parsed.fragment)
            )
            if reason is not None:
                raise PacketError(reason)
            return ManifestPacket(
                header.session,
                parsed.envelope_id,
                parsed.total_length,
                parsed.offset,
                parsed.fragment,
            )
        if header.kind == KIND_AUTH:
            if n < AUTH_HEADER_SIZE + DIGEST_BYTES + SIGNATURE_BYTES:
                raise PacketError("short")
            try:
                parsed = AUTH_BODY.parse(body)
            except ConstructError:
                raise PacketError("auth-length") from None
            if parsed.count == 0:
                raise PacketError("auth-length")
            return AuthPacket(
                header.session,
                parsed.sender,
                parsed.chunk,
                parsed.page,
                parsed.sent,
                parsed.digests,
                parsed.signature,
            )
    except ConstructError:
        raise PacketError("short") from None
    raise PacketError("unknown-kind")


def build_datagram(packet: Packet) -> bytes:
    """Serialise a packet (fast path)."""
    if isinstance(packet, DataPacket):
        head = _DATA_FAST.pack(MAGIC, VERSION, KIND_DATA, packet.session, packet.chunk, packet.esi)
        return head + packet.symbol
    if isinstance(packet, AuthPacket):
        head = _AUTH_FAST.pack(
            MAGIC,
            VERSION,
            KIND_AUTH,
            packet.session,
            packet.sender,
            packet.count,
            packet.chunk,
            packet.page,
            packet.sent,
        )
        return head + packet.digests + packet.signature
    head = _MANIFEST_FAST.pack(
        MAGIC,
        VERSION,
        KIND_MANIFEST,
        packet.session,
        packet.envelope_id,
        packet.total_length,
        packet.offset,
    )
    return head + packet.fragment


def build_datagram_spec(packet: Packet) -> bytes:
    """Serialise a packet with the construct specification; same bytes as `build_datagram`."""
    if isinstance(packet, DataPacket):
        kind = KIND_DATA
        body = DATA_BODY.build(
            {"chunk": packet.chunk, "sbn": 0, "esi": packet.esi, "symbol": packet.symbol}
        )
    elif isinstance(packet, AuthPacket):
        kind = KIND_AUTH
        body = AUTH_BODY.build(
            {
                "sender": packet.sender,
                "count": packet.count,
                "chunk": packet.chunk,
                "page": packet.page,
                "sent": packet.sent,
                "digests": packet.digests,
                "signature": packet.signature,
            }
        )
    else:
        kind = KIND_MANIFEST
        body = MANIFEST_BODY.build(
            {
                "envelope_id": packet.envelope_id,
                "total_length": packet.total_length,
                "offset": packet.offset,
                "fragment": packet.fragment,
            }
        )
    header = HEADER.build(
        {"magic": MAGIC, "version": VERSION, "kind": kind, "session": packet.session}
    )
    return bytes(header) + bytes(body)


def data_datagram_size(symbol_size: int) -> int:
    """UDP payload size of a DATA datagram carrying a symbol of `symbol_size` bytes."""
    return DATA_HEADER_SIZE + symbol_size


def fragment_envelope(
    session: bytes, envelope_id: bytes, envelope: bytes, max_datagram: int
) -> list[ManifestPacket]:
    """Split a manifest envelope into MANIFEST packets that fit `max_datagram` bytes each."""
    step = max_datagram - MANIFEST_HEADER_SIZE
    if step <= 0:
        raise ValueError("datagram too small for a manifest fragment")
    return [
        ManifestPacket(
            session, envelope_id, len(envelope), offset, envelope[offset : offset + step]
        )
        for offset in range(0, len(envelope), step)
    ]
