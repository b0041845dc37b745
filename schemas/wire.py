"""Datagram layouts: the construct definitions below are the specification.

Every otacast datagram starts with the same 12-byte big-endian header::

    0       2         3      4            12
    | magic | version | kind | session id | kind-specific body ...

* magic ``b"OC"``; version 1; kind 1 = DATA, 2 = MANIFEST, 3 = AUTH (reserved for packet
  authentication, not yet accepted).
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

The hot path does not run construct (~17 us per parse): `parse_datagram` uses `struct.Struct`
objects with the same layout, and the test suite proves both parsers agree on every input and
both builders produce identical bytes.  `parse_datagram_spec` runs the construct definition and
exists for tests, tools and as the executable specification.  Never parse untrusted data with
construct's ``.compile()``: compiled parsers skip checks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from construct import (
    Bytes,
    ConstructError,
    GreedyBytes,
    Int8ub,
    Int24ub,
    Int32ub,
    Struct,
)

from .errors import PacketError
from .limits import MAX_DATAGRAM, MAX_ESI, MAX_MANIFEST_BYTES, MIN_MANIFEST_FRAGMENT

MAGIC: Final = b"OC"
VERSION: Final = 1

KIND_DATA: Final = 1
KIND_MANIFEST: Final = 2
KIND_AUTH: Final = 3  # reserved for packet authentication (stream-key-signed digest batches)

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

HEADER_SIZE: Final = 12
assert HEADER.sizeof() == HEADER_SIZE
DATA_HEADER_SIZE: Final = HEADER_SIZE + 8  # 20: header, chunk, payload id
MANIFEST_HEADER_SIZE: Final = HEADER_SIZE + ENVELOPE_ID_BYTES + 8  # 28

# Offset of the RaptorQ payload id (SBN + ESI) inside a DATA datagram.
CODEC_PACKET_OFFSET: Final = HEADER_SIZE + 4

# --- The hot path (struct), proven identical to the specification by tests --------------------

_DATA_FAST = struct.Struct(">2sBB8sII")  # ... chunk, (sbn << 24 | esi)
_MANIFEST_FAST = struct.Struct(">2sBB8s8sII")
_HEADER_FAST = struct.Struct(">2sBB8s")

assert _DATA_FAST.size == DATA_HEADER_SIZE
assert _MANIFEST_FAST.size == MANIFEST_HEADER_SIZE
assert _HEADER_FAST.size == HEADER_SIZE


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


Packet = DataPacket | ManifestPacket


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
        raise PacketError("auth-unsupported")
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
    except ConstructError:
        raise PacketError("short") from None
    if header.kind == KIND_AUTH:
        raise PacketError("auth-unsupported")
    raise PacketError("unknown-kind")


def build_datagram(packet: Packet) -> bytes:
    """Serialise a packet (fast path)."""
    if isinstance(packet, DataPacket):
        head = _DATA_FAST.pack(MAGIC, VERSION, KIND_DATA, packet.session, packet.chunk, packet.esi)
        return head + packet.symbol
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
