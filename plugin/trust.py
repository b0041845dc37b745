"""Loading the device's trust set from public key files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from otacast.schemas import keyfile
from otacast.schemas.policy import TrustSet

from .errors import ReadError, UsageError


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
