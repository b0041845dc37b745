"""Update rules: when manifest bytes may be trusted and acted on.

`verify_envelope` is pure and is the one verifier both sides use: the Ed25519 check is passed in
(each side owns its crypto module), so the publisher's ``verify`` and the device (its commands,
its receiver core, the Mender module) refuse a given envelope with the same error class, in
this order:

1. size: more than ``MAX_MANIFEST_BYTES`` is `ManifestTooLarge`, whatever the bytes;
2. outline (`manifest.outline_envelope`): strict JSON and the envelope's shape, just enough to
   find the canonical signed bytes and the signatures (`MalformedManifest`);
3. signatures (`authenticate`): count distinct trusted key ids whose signature verifies over
   ``SIGNING_CONTEXT + canonical signed bytes``; at least ``threshold`` are required.  If too
   few, the error says why: a trusted key's signature failed (`BadSignature`: altered
   manifest), no signature came from a trusted key (`UnknownKey`), or valid but too few
   (`BelowThreshold`).  Each trusted key is tried once, at its first signature on the list, so
   an envelope costs at most one Ed25519 verification per trusted key;
4. content (`manifest.envelope_from_outline`): the JSON Schema, the cross-field rules and the
   round trip (`MalformedManifest`);
5. rules (`accept`): expiry (`Expired`) against the caller's ``now``, anti-rollback
   (`Rollback`: ``sequence`` must exceed the installed one), the channel (`WrongChannel`), the
   device type (`WrongDevice`).

Signatures come before content so that nothing an attacker controls is interpreted before it is
authenticated, and so that a forged envelope is refused for the price of a JSON parse and one
Ed25519 verification per trusted key (milliseconds for the largest) instead of a JSON Schema
validation (~0.4 s of CPU for a 1.1 MB manifest; figures in docs/SECURITY.md).  The later
checks then only ever refuse genuine, signed releases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import units
from .errors import (
    BadSignature,
    BelowThreshold,
    Expired,
    Rollback,
    UnknownKey,
    WrongChannel,
    WrongDevice,
)
from .keyfile import key_id
from .limits import MAX_TRUSTED_KEYS
from .manifest import Envelope, Manifest, Outline, envelope_from_outline, outline_envelope

# (public key, message, signature) -> valid?  Must return False, never raise, on a bad signature.
SignatureCheck = Callable[[bytes, bytes, bytes], bool]


@dataclass(frozen=True)
class TrustSet:
    """Public keys a device (or a release engineer) trusts, and how many must sign."""

    keys: Mapping[str, bytes]
    threshold: int = 1

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a trust set needs at least one key")
        if len(self.keys) > MAX_TRUSTED_KEYS:
            raise ValueError(f"a trust set holds at most {MAX_TRUSTED_KEYS} keys")
        if not 1 <= self.threshold <= len(self.keys):
            raise ValueError(
                f"threshold {self.threshold} needs between 1 and {len(self.keys)} "
                "(the number of distinct trusted keys)"
            )

    @classmethod
    def from_public_keys(cls, publics: list[bytes], threshold: int = 1) -> TrustSet:
        return cls({key_id(p): p for p in publics}, threshold)


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signatures and update rules have been checked; only `accept` makes
    one."""

    envelope: Envelope
    signers: tuple[str, ...]

    @property
    def manifest(self) -> Manifest:
        return self.envelope.manifest


@dataclass(frozen=True)
class Authenticated:
    """An outlined envelope whose signatures meet the trust set's threshold (`authenticate`);
    its content is not validated yet."""

    outline: Outline
    signers: tuple[str, ...]


def verify_envelope(
    data: bytes,
    trust: TrustSet,
    check: SignatureCheck,
    *,
    now: float,
    device_type: str | None = None,
    installed_sequence: int | None = None,
    channel: str | None = None,
) -> VerifiedManifest:
    """Untrusted envelope bytes -> `VerifiedManifest`, or the `ManifestRejected` subclass that
    says why (the order is the module doc's)."""
    return accept(
        authenticate(data, trust, check),
        now=now,
        device_type=device_type,
        installed_sequence=installed_sequence,
        channel=channel,
    )


def authenticate(data: bytes, trust: TrustSet, check: SignatureCheck) -> Authenticated:
    """Steps 1 to 3: size, outline, signatures."""
    return check_signatures(outline_envelope(data), trust, check)


def check_signatures(outline: Outline, trust: TrustSet, check: SignatureCheck) -> Authenticated:
    """Step 3 on an envelope already outlined (`outline_envelope`: steps 1 and 2)."""
    message = outline.message
    valid: list[str] = []
    tried: set[str] = set()
    failed = False
    for signature in outline.signatures:
        public = trust.keys.get(signature.keyid)
        if public is None or signature.keyid in tried:
            continue
        tried.add(signature.keyid)
        if check(public, message, signature.sig):
            valid.append(signature.keyid)
        else:
            failed = True
    if len(valid) < trust.threshold:
        if failed:
            raise BadSignature("a trusted key's signature does not match the manifest")
        if not valid:
            ids = ", ".join(s.keyid[:16] for s in outline.signatures)
            raise UnknownKey(f"manifest is signed only by untrusted keys ({ids})")
        raise BelowThreshold(
            f"manifest has {len(valid)} valid signature(s) from trusted keys, "
            f"{trust.threshold} required"
        )
    return Authenticated(outline, tuple(valid))


def accept(
    authenticated: Authenticated,
    *,
    now: float,
    device_type: str | None = None,
    installed_sequence: int | None = None,
    channel: str | None = None,
) -> VerifiedManifest:
    """Steps 4 and 5: the content, then the update rules."""
    envelope = envelope_from_outline(authenticated.outline)
    manifest = envelope.manifest
    if now >= manifest.expires:
        raise Expired(
            f"manifest expired at {units.format_time(manifest.expires)} "
            f"(now {units.format_time(now)})",
            sequence=manifest.sequence,
        )
    if installed_sequence is not None and manifest.sequence <= installed_sequence:
        raise Rollback(
            f"manifest sequence {manifest.sequence} is not above the installed "
            f"{installed_sequence}",
            sequence=manifest.sequence,
        )
    if channel is not None and manifest.transport.channel != channel:
        raise WrongChannel(
            f"manifest is for channel {manifest.transport.channel!r}, this device follows "
            f"{channel!r}",
            sequence=manifest.sequence,
        )
    if device_type is not None and device_type not in manifest.compatible:
        raise WrongDevice(
            f"device type {device_type!r} is not among {', '.join(manifest.compatible)}",
            sequence=manifest.sequence,
        )
    return VerifiedManifest(envelope, authenticated.signers)
