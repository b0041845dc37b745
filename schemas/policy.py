"""Update rules: when a parsed envelope may be trusted and acted on.

`check_envelope` is pure.  The Ed25519 check is passed in (each side owns its crypto module), so
the publisher's ``verify`` and the device apply byte-for-byte the same rules, in this order:

1. signatures: count distinct trusted key ids whose signature verifies over
   ``SIGNING_CONTEXT + canonical signed bytes``; at least ``threshold`` are required.  If too few,
   the error says why: a trusted key's signature failed (`BadSignature`: altered manifest), no
   signature came from a trusted key (`UnknownKey`), or valid but too few (`BelowThreshold`);
2. expiry (`Expired`), against the caller's ``now``;
3. anti-rollback: ``sequence`` must exceed the last installed sequence (`Rollback`);
4. device binding: the device type must be listed in ``compatible`` (`WrongDevice`).

Signatures come first so that nothing an attacker controls is interpreted before it is
authenticated; the later checks then only ever refuse genuine, signed releases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
from .manifest import Envelope, Manifest, signing_message

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
    """A manifest whose signatures and update rules have been checked; only `check_envelope`
    makes one."""

    envelope: Envelope
    signers: tuple[str, ...]

    @property
    def manifest(self) -> Manifest:
        return self.envelope.manifest


def count_valid_signatures(
    envelope: Envelope, trust: TrustSet, check: SignatureCheck
) -> tuple[tuple[str, ...], bool]:
    """(distinct trusted key ids with a valid signature, whether any trusted signature failed)."""
    message = signing_message(envelope.manifest)
    valid: list[str] = []
    failed = False
    for signature in envelope.signatures:
        public = trust.keys.get(signature.keyid)
        if public is None or signature.keyid in valid:
            continue
        if check(public, message, signature.sig):
            valid.append(signature.keyid)
        else:
            failed = True
    return tuple(valid), failed


def check_envelope(
    envelope: Envelope,
    trust: TrustSet,
    check: SignatureCheck,
    *,
    now: float,
    device_type: str | None = None,
    installed_sequence: int | None = None,
    channel: str | None = None,
) -> VerifiedManifest:
    signers, failed = count_valid_signatures(envelope, trust, check)
    if len(signers) < trust.threshold:
        if failed:
            raise BadSignature("a trusted key's signature does not match the manifest")
        if not signers:
            ids = ", ".join(s.keyid[:16] for s in envelope.signatures)
            raise UnknownKey(f"manifest is signed only by untrusted keys ({ids})")
        raise BelowThreshold(
            f"manifest has {len(signers)} valid signature(s) from trusted keys, "
            f"{trust.threshold} required"
        )
    manifest = envelope.manifest
    if now >= manifest.expires:
        raise Expired(f"manifest expired at {manifest.expires} (now {int(now)})")
    if installed_sequence is not None and manifest.sequence <= installed_sequence:
        raise Rollback(
            f"manifest sequence {manifest.sequence} is not above the installed {installed_sequence}"
        )
    if channel is not None and manifest.transport.channel != channel:
        raise WrongChannel(
            f"manifest is for channel {manifest.transport.channel!r}, this device follows "
            f"{channel!r}"
        )
    if device_type is not None and device_type not in manifest.compatible:
        raise WrongDevice(
            f"device type {device_type!r} is not among {', '.join(manifest.compatible)}"
        )
    return VerifiedManifest(envelope, signers)
