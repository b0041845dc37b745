"""What the receiver core tells its driver."""

from __future__ import annotations

from dataclasses import dataclass

from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.errors import ManifestRejected
from otacast.schemas.policy import VerifiedManifest


@dataclass(frozen=True)
class ManifestVerified:
    verified: VerifiedManifest


@dataclass(frozen=True)
class ManifestRefused:
    """A complete manifest heard on the channel was refused (once per envelope)."""

    reason: str  # the ManifestRejected subclass name, e.g. "Rollback"
    message: str
    # The refusal itself (its class carries the exit code, its `sequence` says how new the
    # release was), for a driver that ends with it when nothing else was heard; None for a
    # refusal by this device's own policy (packet authentication required).
    error: ManifestRejected | None = None


@dataclass(frozen=True)
class ChunkComplete:
    """A chunk decoded from multicast whose SHA-256 matches the signed hash.  No `data`: its
    bytes are in place in the staged image already, where they were hashed (a chunk whose
    source symbols all arrived, `otacast.plugin.decoder.InPlace`)."""

    index: int
    data: bytes | None


@dataclass(frozen=True)
class IndexReady:
    """The release's block index, received and checked against the signed manifest (once per
    download, only for a core that wants it: `otacast.plugin.core`, *The block index*)."""

    index: BlockIndex


@dataclass(frozen=True)
class ImageComplete:
    pass


@dataclass(frozen=True)
class SourceHeard:
    """A source address sent a MANIFEST fragment of the adopted release (once per source, at
    most ``MAX_ANNOUNCED_SOURCES``; only when the core is told to report sources): a driver
    listening to announcements joins it."""

    source: str


@dataclass(frozen=True)
class FallbackNeeded:
    reason: str  # "join-timeout" (nothing heard) or "stalled" (no progress)


Event = (
    ManifestVerified
    | ManifestRefused
    | ChunkComplete
    | IndexReady
    | ImageComplete
    | SourceHeard
    | FallbackNeeded
)
