"""The signed manifest: frozen dataclasses, symmetric to/from JSON, canonical signed bytes.

An *envelope* is ``{"signed": {...}, "signatures": [{"keyid", "sig"}, ...]}`` (TUF style).  Each
signature is Ed25519 over ``SIGNING_CONTEXT + canonical_bytes(signed)``; the context string keeps
a manifest signature from ever being valid as any other otacast signature (stream keys, trust
sets).

Untrusted bytes become an `Envelope` in two steps, so that a verifier can check the signatures
between them (`policy.verify_envelope`):

1. `outline_envelope`: the size cap, strict JSON, and only as much structure as finding what was
   signed needs: an object of exactly ``signed`` (an object) and ``signatures`` (1 to
   ``MAX_SIGNATURES`` objects of exactly a hex ``keyid`` and a hex ``sig``), and the canonical
   bytes of ``signed``.  Cheap: a few milliseconds for the largest manifest (~1.1 MB);
2. `envelope_from_outline`: everything else, the expensive part (control characters, the JSON
   Schema, the cross-field rules the schema cannot express, the model's round trip to the signed
   bytes): ~0.4 s of CPU for a 1.1 MB manifest, which is why a verifier only spends it on
   envelopes whose signatures hold.

`parse_envelope` does both, for callers that read an envelope without trusting it (the
publisher's ``inspect``, ``serve`` and ``publish``).  Parsing says nothing about trust.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

from . import addressing, blockindex, fec
from .canonical import canonical_bytes, loads_strict, pretty_bytes, refuse_control_characters
from .errors import MalformedManifest
from .fec import Part
from .limits import (
    INDEX_BLOCK_SIZE,
    INDEX_HASH_BYTES,
    MAX_DELTA_FROM,
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURES,
)
from .validation import validate_envelope
from .wire import ENVELOPE_ID_BYTES, SESSION_ID_BYTES

MANIFEST_TYPE: Final = "otacast-manifest"
# 2: chunks are RFC 6330 source blocks of FLUTE objects (a size in whole symbols, parts of 256
# chunks), sent as FLUTE/ALC (otacast wire 3).  Version 1 manifests (wire 2) are refused.
SPEC_VERSION: Final = 2
SIGNING_CONTEXT: Final = b"otacast-manifest-v1\0"
FORMATS: Final = ("raw", "mender", "swu")


@dataclass(frozen=True)
class ImageInfo:
    name: str
    length: int
    sha256: bytes
    format: str


@dataclass(frozen=True)
class Chunking:
    size: int
    sha256: tuple[bytes, ...]


@dataclass(frozen=True)
class FecInfo:
    symbol_size: int
    scheme: str = fec.SCHEME_RAPTORQ


@dataclass(frozen=True)
class IndexInfo:
    """The release's block index (`otacast.schemas.blockindex`, delta delivery): its layout, byte
    length and SHA-256.  Sent as its own FLUTE object and published beside the image."""

    length: int
    sha256: bytes
    block_size: int = INDEX_BLOCK_SIZE
    hash_bytes: int = INDEX_HASH_BYTES


@dataclass(frozen=True)
class DeltaFrom:
    """A release the delta lane serves: devices on `sequence` (whose block index has
    `index_sha256`) turn it into this release's index with the patch of `patch_length` bytes and
    `patch_sha256` (`otacast.schemas.deltaobject`)."""

    sequence: int
    index_sha256: bytes
    patch_length: int
    patch_sha256: bytes


@dataclass(frozen=True)
class DeltaInfo:
    """The delta lane's object: `length` bytes with `sha256`, carrying `blocks` 4 KiB blocks of
    the image (those absent from some release in `sources`, JSON ``from``)."""

    length: int
    sha256: bytes
    blocks: int
    sources: tuple[DeltaFrom, ...]


@dataclass(frozen=True)
class Transport:
    channel: str
    scope: str
    port: int
    asm_group: str
    ssm_group: str
    srv: str
    rates: tuple[int, ...] = ()

    @classmethod
    def for_channel(
        cls,
        channel: str,
        *,
        scope: str = addressing.DEFAULT_SCOPE,
        port: int = addressing.DEFAULT_PORT,
        asm_group: str | None = None,
        ssm_group: str | None = None,
        rates: tuple[int, ...] = (),
    ) -> Transport:
        """Transport settings with groups and SRV name derived from the channel name."""
        name = addressing.normalise_channel(channel)
        return cls(
            channel=name,
            scope=scope,
            port=port,
            asm_group=addressing.normalise_group(asm_group or addressing.asm_group(name, scope)),
            ssm_group=addressing.normalise_group(ssm_group or addressing.ssm_group(name, scope)),
            srv=addressing.srv_name(name),
            rates=rates,
        )


@dataclass(frozen=True)
class StreamKey:
    """A per-sender Ed25519 key that signs packet digests (packet authentication)."""

    sender: int
    public: bytes


@dataclass(frozen=True)
class Manifest:
    """The ``signed`` part of an envelope."""

    name: str
    sequence: int
    version: str
    created: int
    expires: int
    compatible: tuple[str, ...]
    image: ImageInfo
    chunks: Chunking
    fec: FecInfo
    transport: Transport
    http: tuple[str, ...] = ()
    stream_keys: tuple[StreamKey, ...] = ()
    index: IndexInfo | None = None
    delta: DeltaInfo | None = None

    def to_json(self) -> dict[str, Any]:
        signed: dict[str, Any] = {
            "type": MANIFEST_TYPE,
            "spec_version": SPEC_VERSION,
            "name": self.name,
            "sequence": self.sequence,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            "compatible": list(self.compatible),
            "image": {
                "name": self.image.name,
                "length": self.image.length,
                "sha256": self.image.sha256.hex(),
                "format": self.image.format,
            },
            "chunks": {"size": self.chunks.size, "sha256": [h.hex() for h in self.chunks.sha256]},
            "fec": {"scheme": self.fec.scheme, "symbol_size": self.fec.symbol_size},
            "transport": {
                "channel": self.transport.channel,
                "scope": self.transport.scope,
                "port": self.transport.port,
                "asm_group": self.transport.asm_group,
                "ssm_group": self.transport.ssm_group,
                "srv": self.transport.srv,
                "rates": list(self.transport.rates),
            },
            "http": list(self.http),
        }
        if self.stream_keys:
            signed["stream_keys"] = [
                {"sender": k.sender, "public": k.public.hex()} for k in self.stream_keys
            ]
        if self.index is not None:
            signed["index"] = {
                "block_size": self.index.block_size,
                "hash_bytes": self.index.hash_bytes,
                "length": self.index.length,
                "sha256": self.index.sha256.hex(),
            }
        if self.delta is not None:
            signed["delta"] = {
                "length": self.delta.length,
                "sha256": self.delta.sha256.hex(),
                "blocks": self.delta.blocks,
                "from": [
                    {
                        "sequence": f.sequence,
                        "index_sha256": f.index_sha256.hex(),
                        "patch_length": f.patch_length,
                        "patch_sha256": f.patch_sha256.hex(),
                    }
                    for f in self.delta.sources
                ],
            }
        return signed

    @classmethod
    def from_json(cls, signed: dict[str, Any]) -> Manifest:
        """Build from a ``signed`` object that already passed the JSON Schema."""
        image = signed["image"]
        transport = signed["transport"]
        manifest = cls(
            name=signed["name"],
            sequence=signed["sequence"],
            version=signed["version"],
            created=signed["created"],
            expires=signed["expires"],
            compatible=tuple(signed["compatible"]),
            image=ImageInfo(
                name=image["name"],
                length=image["length"],
                sha256=bytes.fromhex(image["sha256"]),
                format=image["format"],
            ),
            chunks=Chunking(
                size=signed["chunks"]["size"],
                sha256=tuple(bytes.fromhex(h) for h in signed["chunks"]["sha256"]),
            ),
            fec=FecInfo(scheme=signed["fec"]["scheme"], symbol_size=signed["fec"]["symbol_size"]),
            transport=Transport(
                channel=transport["channel"],
                scope=transport["scope"],
                port=transport["port"],
                asm_group=transport["asm_group"],
                ssm_group=transport["ssm_group"],
                srv=transport["srv"],
                rates=tuple(transport["rates"]),
            ),
            http=tuple(signed["http"]),
            stream_keys=tuple(
                StreamKey(sender=k["sender"], public=bytes.fromhex(k["public"]))
                for k in signed.get("stream_keys", ())
            ),
            index=_index_from_json(signed.get("index")),
            delta=_delta_from_json(signed.get("delta")),
        )
        manifest.check_consistency()
        return manifest

    def check_consistency(self) -> None:
        """Cross-field rules the JSON Schema cannot express; raises `MalformedManifest`."""
        if self.image.length > MAX_IMAGE_BYTES:
            raise MalformedManifest(f"image length {self.image.length} exceeds the limit")
        problem = fec.chunk_size_problem(self.chunks.size, self.fec.symbol_size)
        if problem is not None:
            raise MalformedManifest(problem)
        expected = fec.chunk_count(self.image.length, self.chunks.size, self.fec.symbol_size)
        if len(self.chunks.sha256) != expected:
            raise MalformedManifest(
                f"manifest lists {len(self.chunks.sha256)} chunk hashes, "
                f"an image of {self.image.length} bytes in {self.chunks.size}-byte chunks has "
                f"{expected}"
            )
        if self.expires <= self.created:
            raise MalformedManifest("manifest expires before it was created")
        self._check_transport()
        senders = [k.sender for k in self.stream_keys]
        if len(set(senders)) != len(senders):
            raise MalformedManifest("two stream keys name the same sender")
        self._check_index()
        self._check_delta()

    def _check_delta(self) -> None:
        delta = self.delta
        if delta is None:
            return
        if self.index is None:
            raise MalformedManifest("a delta lane needs the release's block index")
        if delta.blocks > blockindex.block_count(self.image.length):
            raise MalformedManifest(f"delta lane carries {delta.blocks} blocks of a smaller image")
        if not 1 <= len(delta.sources) <= MAX_DELTA_FROM:
            raise MalformedManifest(f"a delta lane serves 1 to {MAX_DELTA_FROM} releases")
        sequences = [f.sequence for f in delta.sources]
        if len(set(sequences)) != len(sequences) or max(sequences) >= self.sequence:
            raise MalformedManifest("a delta lane serves distinct releases older than its own")
        # Each is one FLUTE object of at most PART_CHUNKS source blocks.
        largest = max([delta.length] + [f.patch_length for f in delta.sources])
        if largest > fec.part_bytes(self.chunks.size):
            raise MalformedManifest("a delta lane object does not fit one FLUTE object")

    def _check_index(self) -> None:
        index = self.index
        if index is None:
            return
        if index.block_size != INDEX_BLOCK_SIZE or index.hash_bytes != INDEX_HASH_BYTES:
            raise MalformedManifest(
                f"index of {index.block_size}-byte blocks and {index.hash_bytes}-byte hashes is "
                f"not supported (expected {INDEX_BLOCK_SIZE} and {INDEX_HASH_BYTES})"
            )
        expected = blockindex.index_length(self.image.length)
        if index.length != expected:
            raise MalformedManifest(
                f"index length {index.length} does not match the image's ({expected} bytes)"
            )
        # One FLUTE object of at most PART_CHUNKS source blocks (always: ~1/256 of the image).
        if index.length > fec.part_bytes(self.chunks.size):
            raise MalformedManifest("index does not fit one FLUTE object")

    def _check_transport(self) -> None:
        t = self.transport
        try:
            channel = addressing.normalise_channel(t.channel)
        except ValueError as exc:
            raise MalformedManifest(str(exc)) from None
        if channel != t.channel:
            raise MalformedManifest(f"channel {t.channel!r} is not in normal form {channel!r}")
        if t.srv != addressing.srv_name(channel):
            raise MalformedManifest(f"srv {t.srv!r} does not match channel {channel!r}")
        if not addressing.is_asm_group(t.asm_group):
            raise MalformedManifest(
                f"asm_group {t.asm_group!r} is not an ff1x:: group in normal form"
            )
        if not addressing.is_ssm_group(t.ssm_group):
            raise MalformedManifest(
                f"ssm_group {t.ssm_group!r} is not an ff3x::/96 group in normal form"
            )

    # --- Derived values ----------------------------------------------------------------------

    @cached_property
    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.to_json())

    @cached_property
    def session_id(self) -> bytes:
        """First 8 bytes of SHA-256 over the canonical signed bytes: tags every packet."""
        return session_id_of(self.signed_bytes)

    @cached_property
    def tsi(self) -> int:
        """The LCT Transport Session Identifier of every packet: the session id's first 4 bytes."""
        return tsi_of(self.session_id)

    @property
    def chunk_count(self) -> int:
        return len(self.chunks.sha256)

    def chunk_span(self, index: int) -> tuple[int, int]:
        return fec.chunk_span(self.image.length, self.chunks.size, self.fec.symbol_size, index)

    @property
    def part_count(self) -> int:
        """FLUTE objects the image is sent as (`otacast.schemas.fec`)."""
        return fec.part_count(self.image.length, self.chunks.size)

    def part(self, index: int) -> Part:
        return fec.part(self.image.length, self.chunks.size, self.fec.symbol_size, index)

    def source_symbols(self, index: int) -> int:
        return fec.source_symbols(self.chunk_span(index)[1], self.fec.symbol_size)

    def index_part(self) -> Part | None:
        """The block index object's RFC 6330 source blocks, cut as an image part of the
        index's length is (`otacast.schemas.fec`); None without an index."""
        if self.index is None:
            return None
        return fec.part(self.index.length, self.chunks.size, self.fec.symbol_size, 0)


def _index_from_json(value: dict[str, Any] | None) -> IndexInfo | None:
    if value is None:
        return None
    return IndexInfo(
        length=value["length"],
        sha256=bytes.fromhex(value["sha256"]),
        block_size=value["block_size"],
        hash_bytes=value["hash_bytes"],
    )


def _delta_from_json(value: dict[str, Any] | None) -> DeltaInfo | None:
    if value is None:
        return None
    return DeltaInfo(
        length=value["length"],
        sha256=bytes.fromhex(value["sha256"]),
        blocks=value["blocks"],
        sources=tuple(
            DeltaFrom(
                sequence=f["sequence"],
                index_sha256=bytes.fromhex(f["index_sha256"]),
                patch_length=f["patch_length"],
                patch_sha256=bytes.fromhex(f["patch_sha256"]),
            )
            for f in value["from"]
        ),
    )


def signing_message(manifest: Manifest) -> bytes:
    return SIGNING_CONTEXT + manifest.signed_bytes


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    manifest: Manifest
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "signed": self.manifest.to_json(),
            "signatures": [{"keyid": s.keyid, "sig": s.sig.hex()} for s in self.signatures],
        }

    @cached_property
    def compact_bytes(self) -> bytes:
        """Compact canonical bytes of the whole envelope: what the carousel sends."""
        return canonical_bytes(self.to_json())

    def to_file_bytes(self) -> bytes:
        """Indented, sorted JSON for files people read and diff (signatures are unaffected)."""
        return pretty_bytes(self.to_json())

    @property
    def envelope_id(self) -> bytes:
        return hashlib.sha256(self.compact_bytes).digest()[:ENVELOPE_ID_BYTES]

    def with_signature(self, signature: Signature) -> Envelope:
        """A copy carrying one more signature (replacing an earlier one by the same key)."""
        kept = tuple(s for s in self.signatures if s.keyid != signature.keyid)
        return Envelope(self.manifest, (*kept, signature))


_KEY_ID = re.compile("[0-9a-f]{64}")
_SIGNATURE_HEX = re.compile("[0-9a-f]{128}")
_ENVELOPE_FIELDS = frozenset({"signed", "signatures"})
_SIGNATURE_FIELDS = frozenset({"keyid", "sig"})


@dataclass(frozen=True)
class Outline:
    """An envelope read just far enough to check its signatures (`outline_envelope`).

    `document` is the parsed JSON, nothing of it validated beyond the envelope's shape; only
    `signed_bytes` and `signatures` may be used before the signatures are checked."""

    document: dict[str, Any]
    signed_bytes: bytes  # canonical bytes of ``document["signed"]``: what the signatures cover
    signatures: tuple[Signature, ...]

    @property
    def message(self) -> bytes:
        """The bytes each signature is over."""
        return SIGNING_CONTEXT + self.signed_bytes

    @property
    def tsi(self) -> int:
        """The TSI its signed bytes give (`Manifest.tsi`): what a genuine copy is sent under,
        known before any signature is checked."""
        return tsi_of(session_id_of(self.signed_bytes))


def session_id_of(signed_bytes: bytes) -> bytes:
    """The session id of the manifest whose canonical signed bytes these are."""
    return hashlib.sha256(signed_bytes).digest()[:SESSION_ID_BYTES]


def tsi_of(session_id: bytes) -> int:
    """The TSI of a session: its id's first 4 bytes."""
    return int.from_bytes(session_id[:4], "big")


def outline_envelope(data: bytes) -> Outline:
    """Untrusted bytes -> `Outline`, or `ManifestTooLarge` / `MalformedManifest` (step 1 of the
    module doc: nothing but the envelope's shape is looked at)."""
    document = loads_strict(data, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(document, dict):
        raise MalformedManifest("manifest is not a JSON object")
    if document.keys() != _ENVELOPE_FIELDS:
        unexpected = sorted(document.keys() - _ENVELOPE_FIELDS)
        missing = sorted(_ENVELOPE_FIELDS - document.keys())
        raise MalformedManifest(
            "manifest envelope: "
            + (f"unexpected field {unexpected[0]!r}" if unexpected else f"no {missing[0]!r}")
        )
    signed = document["signed"]
    if not isinstance(signed, dict):
        raise MalformedManifest("manifest field signed: not an object")
    signatures = _outline_signatures(document["signatures"])
    try:
        signed_bytes = canonical_bytes(signed)
    except RecursionError:
        raise MalformedManifest("manifest JSON is nested too deeply") from None
    return Outline(document, signed_bytes, signatures)


def _outline_signatures(value: Any) -> tuple[Signature, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SIGNATURES:
        raise MalformedManifest(
            f"manifest field signatures: a list of 1 to {MAX_SIGNATURES} signatures is required"
        )
    signatures = []
    for index, item in enumerate(value):
        where = f"manifest field signatures/{index}"
        if not isinstance(item, dict) or item.keys() != _SIGNATURE_FIELDS:
            raise MalformedManifest(f"{where}: an object of exactly 'keyid' and 'sig' is required")
        keyid, sig = item["keyid"], item["sig"]
        if not isinstance(keyid, str) or not _KEY_ID.fullmatch(keyid):
            raise MalformedManifest(f"{where}/keyid: not 64 lower-case hex digits")
        if not isinstance(sig, str) or not _SIGNATURE_HEX.fullmatch(sig):
            raise MalformedManifest(f"{where}/sig: not 128 lower-case hex digits")
        signatures.append(Signature(keyid=keyid, sig=bytes.fromhex(sig)))
    return tuple(signatures)


def envelope_from_outline(outline: Outline) -> Envelope:
    """The full validation of an outlined envelope (step 2 of the module doc): `Envelope` or
    `MalformedManifest`."""
    document = outline.document
    _refuse_old_format(document["signed"])
    refuse_control_characters(document)
    validate_envelope(document)
    manifest = Manifest.from_json(document["signed"])
    if outline.signed_bytes != manifest.signed_bytes:
        # The model must reproduce exactly what was signed; if it cannot, refuse rather than
        # verify one byte string and act on another.
        raise MalformedManifest("manifest does not round-trip to its canonical form")
    return Envelope(manifest, outline.signatures)


def _refuse_old_format(signed: dict[str, Any]) -> None:
    version = signed.get("spec_version")
    if isinstance(version, int) and not isinstance(version, bool) and version < SPEC_VERSION:
        raise MalformedManifest(
            f"manifest format version {version} (otacast wire 2) is too old: this otacast speaks "
            f"FLUTE/ALC (otacast wire 3) and reads manifest format version {SPEC_VERSION}; "
            "re-sign the release with a current otacast-signer"
        )


def parse_envelope(data: bytes) -> Envelope:
    """Untrusted bytes -> `Envelope`, or `ManifestTooLarge` / `MalformedManifest`."""
    return envelope_from_outline(outline_envelope(data))
