"""The device's trust set: the config's public key files, or the last accepted rotation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from otacast.schemas import keyfile
from otacast.schemas.policy import TrustSet
from otacast.schemas.trustset import (
    MAX_TRUST_BYTES,
    TrustDocument,
    TrustSetRejected,
    check_rotation,
    parse_trust,
)

from .durable import write_durably
from .errors import ReadError, StateError, UsageError
from .verify import check_signature


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """Read at most `limit` + 1 bytes so the caller's size check sees oversize input."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as exc:
        raise ReadError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_trust(paths: Sequence[Path], threshold: int) -> TrustSet:
    publics = [
        keyfile.parse_public(read_limited(p, keyfile.MAX_KEY_FILE_BYTES, "trusted key"), str(p))
        for p in paths
    ]
    try:
        return TrustSet.from_public_keys(publics, threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# The trust set accepted by `otacast trust update`, kept in the state directory.  It replaces
# the config's keys from then on; the config's keys are only the starting point (version 0).
TRUST_RECORD = "trust.json"


def current_trust(state_dir: Path, paths: Sequence[Path], threshold: int) -> tuple[TrustSet, int]:
    """The trust set in force and its version: the last accepted rotation, else the config's."""
    path = state_dir / TRUST_RECORD
    if not path.exists():
        return load_trust(paths, threshold), 0
    data = read_limited(path, MAX_TRUST_BYTES, "trust set")
    try:
        document = parse_trust(data).document
    except TrustSetRejected as exc:
        # Only accepted sets are written here; damage must not silently reset trust to the
        # config's (possibly revoked) keys.
        raise StateError(
            f"{path} is damaged ({exc}); restore it or re-apply the rotation"
        ) from None
    return document.trust_set, document.version


def accept_rotation(
    state_dir: Path, paths: Sequence[Path], threshold: int, data: bytes, *, now: float
) -> TrustDocument:
    """Check a new trust-set document against the set in force and make it the one in force."""
    trust, version = current_trust(state_dir, paths, threshold)
    signed = parse_trust(data)
    check_rotation(signed, trust, version, check_signature, now=now)
    write_durably(state_dir / TRUST_RECORD, signed.to_bytes(), "the trust set")
    return signed.document
