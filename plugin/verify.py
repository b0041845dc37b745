"""The device's manifest verifier (the only PyNaCl user on the device side).

`verify_manifest` is pure: manifest bytes, the trust set, ``now``, the device type and the last
installed sequence in; a `VerifiedManifest` or a specific `ManifestRejected` subclass out.  It
reads at most ``MAX_MANIFEST_BYTES`` of meaning from the input, parses strictly and checks the
signatures before any other field is acted on (see `otacast.schemas.policy`).
"""

from __future__ import annotations

import nacl.exceptions
import nacl.signing

from otacast.schemas.manifest import parse_envelope
from otacast.schemas.policy import TrustSet, VerifiedManifest, check_envelope


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
    return check_envelope(
        parse_envelope(data),
        trust,
        check_signature,
        now=now,
        device_type=device_type,
        installed_sequence=installed_sequence,
        channel=channel,
    )
