"""What the receiver core tells its driver."""

from __future__ import annotations

from dataclasses import dataclass

from otacast.schemas.policy import VerifiedManifest


@dataclass(frozen=True)
class ManifestVerified:
    verified: VerifiedManifest


@dataclass(frozen=True)
class ManifestRefused:
    """A complete manifest heard on the channel was refused (once per envelope)."""

    reason: str  # the ManifestRejected subclass name, e.g. "Rollback"
    message: str


@dataclass(frozen=True)
class ChunkComplete:
    """A chunk decoded from multicast whose SHA-256 matches the signed hash."""

    index: int
    data: bytes


@dataclass(frozen=True)
class ImageComplete:
    pass


@dataclass(frozen=True)
class FallbackNeeded:
    reason: str  # "join-timeout" (nothing heard) or "stalled" (no progress)


Event = ManifestVerified | ManifestRefused | ChunkComplete | ImageComplete | FallbackNeeded
