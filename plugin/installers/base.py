"""The installer interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from otacast.schemas.policy import VerifiedManifest


@dataclass(frozen=True)
class InstallResult:
    """``installed`` (active now) or ``needs-reboot`` (active after a restart)."""

    status: str
    detail: str = ""


class Installer(ABC):
    """Installs a verified image.  Failures raise `InstallError` with a one-line reason."""

    kind: ClassVar[str]

    @abstractmethod
    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        """Install `image` (complete, verified, read-only: never modify it)."""

    def check_paths(self, image: Path, *, scratch: Path | None = None) -> None:  # noqa: B027
        """Refuse, before anything is downloaded, an `image` path or a `scratch` directory
        (removed after the install) that would overwrite what this installer writes.

        Raises `UsageError`; most installers write nothing otacast also writes.
        """

    def can_restore(self, *, installed: bool) -> bool:
        """Whether `rollback` could put back what was there before: before an install
        (`installed` False) whether there is something to keep, after it whether it was kept."""
        return False  # most installers cannot roll back

    def commit(self) -> None:  # noqa: B027 - most installers have nothing to commit
        """Make the last install permanent (drop what rollback would restore)."""

    def rollback(self) -> None:  # noqa: B027 - most installers cannot roll back
        """Restore what was installed before the last install."""
