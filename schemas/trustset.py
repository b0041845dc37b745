"""Signed trust sets: rotating and revoking the keys a device trusts (TUF-style root rotation).

A device starts from the keys in its config (version 0).  A trust-set document names the next
set of release keys, the threshold, a version and an expiry::

    {"signed": {"_type": "otacast-trust", "version": 2, "expires": 1893456000,
                "threshold": 2, "keys": ["<64 hex>", ...]},
     "signatures": [{"keyid": "<sha256 of the public key>", "sig": "<128 hex>"}]}

Ed25519 signatures are over ``TRUST_CONTEXT + canonical(signed)``; the context differs from the
manifest's, so a release signature can never be replayed as a trust-set signature or back.

A device accepts a new set only if, in this order:

1. it parses strictly (size cap, strict JSON, exact fields, no control characters);
2. at least *current threshold* distinct keys of the set it trusts **now** signed it — only
   the present key holders can hand over trust;
3. at least *new threshold* distinct keys of the **new** set signed it — the new holders prove
   they have their keys, so a typo cannot lock a fleet out;
4. it is not expired, and its version is above the one in force (a replayed older set, which
   might still list a revoked key, is refused).

Revocation is a rotation that leaves the key out.  Pure: the signature check is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import units
from .canonical import canonical_bytes, loads_strict, refuse_control_characters
from .errors import UntrustedInputError
from .keyfile import KEY_BYTES
from .limits import MAX_TRUSTED_KEYS
from .policy import TrustSet

TRUST_CONTEXT: Final = b"otacast-trust-v1\0"
TRUST_TYPE: Final = "otacast-trust"
# 16 keys and 16 signatures are about 4 KB of JSON; anything far larger is not a trust set.
MAX_TRUST_BYTES: Final = 64 * 1024
# Dates as integer Unix seconds, bounded like the manifest's.
MAX_TIME: Final = 2**40

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")

SignatureCheck = Callable[[bytes, bytes, bytes], bool]


class TrustSetRejected(UntrustedInputError):
    """A trust-set document was refused; the message says why."""

    exit_code = 31


@dataclass(frozen=True)
class TrustDocument:
    version: int
    expires: int
    threshold: int
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= MAX_TRUSTED_KEYS:
            raise ValueError(f"a trust set holds 1 to {MAX_TRUSTED_KEYS} keys")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("a trust set lists each key once")
        if any(len(k) != KEY_BYTES for k in self.keys):
            raise ValueError("keys are 32-byte Ed25519 public keys")
        if not 1 <= self.threshold <= len(self.keys):
            raise ValueError(f"threshold must be between 1 and {len(self.keys)}")
        if not (1 <= self.version < MAX_TIME and 0 < self.expires < MAX_TIME):
            raise ValueError("version and expires must be positive integers")

    def to_json(self) -> dict[str, Any]:
        return {
            "_type": TRUST_TYPE,
            "version": self.version,
            "expires": self.expires,
            "threshold": self.threshold,
            "keys": [k.hex() for k in self.keys],
        }

    @property
    def signing_message(self) -> bytes:
        return TRUST_CONTEXT + canonical_bytes(self.to_json())

    @property
    def trust_set(self) -> TrustSet:
        return TrustSet.from_public_keys(list(self.keys), self.threshold)


@dataclass(frozen=True)
class SignedTrust:
    document: TrustDocument
    signatures: tuple[tuple[str, bytes], ...]  # (key id, signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "signed": self.document.to_json(),
            "signatures": [{"keyid": k, "sig": s.hex()} for k, s in self.signatures],
        }

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_json())

    def with_signature(self, keyid: str, signature: bytes) -> SignedTrust:
        kept = tuple(s for s in self.signatures if s[0] != keyid)
        return SignedTrust(self.document, (*kept, (keyid, signature)))


def _refuse(message: str) -> TrustSetRejected:
    return TrustSetRejected(f"trust set refused: {message}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_trust(data: bytes) -> SignedTrust:
    """Untrusted bytes -> `SignedTrust`, or `TrustSetRejected` naming the first problem."""
    if len(data) > MAX_TRUST_BYTES:
        raise _refuse(f"larger than {MAX_TRUST_BYTES} bytes")
    try:
        document = loads_strict(data, max_bytes=MAX_TRUST_BYTES)
        refuse_control_characters(document)
    except UntrustedInputError as exc:  # the strict parser speaks of manifests
        raise _refuse(str(exc).replace("manifest", "document", 1)) from None
    if not isinstance(document, dict) or set(document) != {"signed", "signatures"}:
        raise _refuse("expected exactly the fields signed and signatures")
    signed, signatures = document["signed"], document["signatures"]
    fields = {"_type", "version", "expires", "threshold", "keys"}
    if not isinstance(signed, dict) or set(signed) != fields:
        raise _refuse(f"signed must have exactly the fields {', '.join(sorted(fields))}")
    if signed["_type"] != TRUST_TYPE:
        raise _refuse(f"_type is not {TRUST_TYPE!r}")
    if not all(_int(signed[k]) for k in ("version", "expires", "threshold")):
        raise _refuse("version, expires and threshold must be integers")
    keys = signed["keys"]
    if not (
        isinstance(keys, list)
        and len(keys) <= MAX_TRUSTED_KEYS
        and all(isinstance(k, str) and _HEX64.fullmatch(k) for k in keys)
    ):
        raise _refuse(f"keys must be a list of at most {MAX_TRUSTED_KEYS} hex public keys")
    if not (
        isinstance(signatures, list)
        and len(signatures) <= MAX_TRUSTED_KEYS * 2
        and all(
            isinstance(s, dict)
            and set(s) == {"keyid", "sig"}
            and isinstance(s["keyid"], str)
            and _HEX64.fullmatch(s["keyid"])
            and isinstance(s["sig"], str)
            and _HEX128.fullmatch(s["sig"])
            for s in signatures
        )
    ):
        raise _refuse("signatures must be a short list of {keyid, sig} in lowercase hex")
    try:
        parsed = TrustDocument(
            version=signed["version"],
            expires=signed["expires"],
            threshold=signed["threshold"],
            keys=tuple(bytes.fromhex(k) for k in keys),
        )
    except ValueError as exc:
        raise _refuse(str(exc)) from None
    if canonical_bytes(signed) != canonical_bytes(parsed.to_json()):
        raise _refuse("does not round-trip to its canonical form")
    return SignedTrust(parsed, tuple((s["keyid"], bytes.fromhex(s["sig"])) for s in signatures))


def _valid_signers(signed: SignedTrust, trust: TrustSet, check: SignatureCheck) -> set[str]:
    message = signed.document.signing_message
    return {
        keyid
        for keyid, signature in signed.signatures
        if keyid in trust.keys and check(trust.keys[keyid], message, signature)
    }


def check_rotation(
    signed: SignedTrust,
    current: TrustSet,
    current_version: int,
    check: SignatureCheck,
    *,
    now: float,
) -> TrustSet:
    """The new trust set, if `signed` may replace `current`; else `TrustSetRejected`."""
    document = signed.document
    old = len(_valid_signers(signed, current, check))
    if old < current.threshold:
        raise _refuse(
            f"signed by {old} of the currently trusted keys, {current.threshold} required"
        )
    new_set = document.trust_set
    new = len(_valid_signers(signed, new_set, check))
    if new < document.threshold:
        raise _refuse(f"signed by {new} of its own keys, {document.threshold} required")
    if now >= document.expires:
        raise _refuse(
            f"expired at {units.format_time(document.expires)} (now {units.format_time(now)})"
        )
    if document.version <= current_version:
        raise _refuse(
            f"version {document.version} is not above the version in force ({current_version})"
        )
    return new_set


def unsigned(keys: Sequence[bytes], threshold: int, version: int, expires: int) -> SignedTrust:
    """A new document to be signed (raises ValueError on impossible parameters)."""
    return SignedTrust(TrustDocument(version, expires, threshold, tuple(keys)), ())
