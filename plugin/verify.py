"""The device's manifest verifier (the only PyNaCl user on the device side).

`verify_manifest` is pure: manifest bytes, the trust set, ``now``, the device type and the last
installed sequence in; a `VerifiedManifest` or a specific `ManifestRejected` subclass out.  It is
`otacast.schemas.policy.verify_envelope` with PyNaCl's Ed25519 check, the same function the
publisher's ``verify`` runs: the size cap, then the minimal parse that finds the signed bytes,
then the signatures, and only then the JSON Schema and the update rules.  The receiver core runs
its two halves itself (`policy.authenticate` with `check_signature`, then `policy.accept`), so
that it knows which sources have sent a genuinely signed manifest (`otacast.plugin.budget`).
"""

from __future__ import annotations

import nacl.exceptions
import nacl.signing

from otacast.schemas.policy import TrustSet, VerifiedManifest, verify_envelope


def check_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


def verify_manifest(
    data: bytes,
    trust: TrustSet,
    *,
    now: float,
    device_type: str | None,
    installed_sequence: int | None,
    channel: str | None,
) -> VerifiedManifest:
    return verify_envelope(
        data,
        trust,
        check_signature,
        now=now,
        device_type=device_type,
        installed_sequence=installed_sequence,
        channel=channel,
    )
