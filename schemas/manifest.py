"""The signed manifest: frozen dataclasses, symmetric to/from JSON, canonical signed bytes.

An *envelope* is ``{"signed": {...}, "signatures": [{"keyid", "sig"}, ...]}`` (TUF style).  Each
signature is Ed25519 over ``SIGNING_CONTEXT + canonical_bytes(signed)``; the context string keeps
a manifest signature from ever being valid as any other otacast signature (stream keys, trust
sets).  `parse_envelope` is the only way untrusted bytes become an `Envelope`: size cap, strict
JSON, JSON Schema, then the cross-field rules the schema cannot express.  Parsing says nothing
about trust; `policy.check_envelope` decides that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

from . import addressing, fec
from .canonical import canonical_bytes, loads_strict, pretty_bytes, refuse_control_characters
from .errors import MalformedManifest
from .limits import (
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SOURCE_SYMBOLS,
)
from .validation import validate_envelope
from .wire import ENVELOPE_ID_BYTES, SESSION_ID_BYTES

MANIFEST_TYPE: Final = "otacast-manifest"
SPEC_VERSION: Final = 1
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
        )
        manifest.check_consistency()
        return manifest

    def check_consistency(self) -> None:
        """Cross-field rules the JSON Schema cannot express; raises `MalformedManifest`."""
        if self.image.length > MAX_IMAGE_BYTES:
            raise MalformedManifest(f"image length {self.image.length} exceeds the limit")
        expected = fec.chunk_count(self.image.length, self.chunks.size)
        if len(self.chunks.sha256) != expected:
            raise MalformedManifest(
                f"manifest lists {len(self.chunks.sha256)} chunk hashes, "
                f"an image of {self.image.length} bytes in {self.chunks.size}-byte chunks has "
                f"{expected}"
            )
        if self.expires <= self.created:
            raise MalformedManifest("manifest expires before it was created")
        if fec.source_symbols(self.chunks.size, self.fec.symbol_size) > MAX_SOURCE_SYMBOLS:
            raise MalformedManifest(
                f"chunks of {self.chunks.size} bytes need more than {MAX_SOURCE_SYMBOLS} "
                f"symbols of {self.fec.symbol_size} bytes"
            )
        self._check_transport()
        senders = [k.sender for k in self.stream_keys]
        if len(set(senders)) != len(senders):
            raise MalformedManifest("two stream keys name the same sender")

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
        return hashlib.sha256(self.signed_bytes).digest()[:SESSION_ID_BYTES]

    @property
    def chunk_count(self) -> int:
        return len(self.chunks.sha256)

    def chunk_span(self, index: int) -> tuple[int, int]:
        return fec.chunk_span(self.image.length, self.chunks.size, index)

    def source_symbols(self, index: int) -> int:
        return fec.source_symbols(self.chunk_span(index)[1], self.fec.symbol_size)


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


def parse_envelope(data: bytes) -> Envelope:
    """Untrusted bytes -> `Envelope`, or `ManifestTooLarge` / `MalformedManifest`."""
    document = loads_strict(data, max_bytes=MAX_MANIFEST_BYTES)
    refuse_control_characters(document)
    validate_envelope(document)
    manifest = Manifest.from_json(document["signed"])
    if canonical_bytes(document["signed"]) != manifest.signed_bytes:
        # The model must reproduce exactly what was signed; if it cannot, refuse rather than
        # verify one byte string and act on another.
        raise MalformedManifest("manifest does not round-trip to its canonical form")
    signatures = tuple(
        Signature(keyid=s["keyid"], sig=bytes.fromhex(s["sig"])) for s in document["signatures"]
    )
    return Envelope(manifest, signatures)
