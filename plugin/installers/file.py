"""``file:PATH``: install by atomically replacing a file, keeping the previous one for rollback.

The image is copied next to the target, fsynced, the current target is kept as
``PATH.previous`` (a hard link, so the target is never absent), and the copy is renamed over the
target.  `rollback` renames ``PATH.previous`` back; `commit` removes it.  For a raw partition
use the ``command`` installer with a tool that writes block devices (``dd``, ``bmaptool``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from otacast.plugin.errors import InstallError
from otacast.schemas.policy import VerifiedManifest

from .base import Installer, InstallResult


class FileInstaller(Installer):
    kind = "file"

    def __init__(self, target: Path) -> None:
        # A device node (a partition) cannot be replaced by rename: the rename would swap the
        # node for a file and the partition would never be written.
        if not target.name or (target.exists() and not target.is_file()):
            raise InstallError(
                f"file installer target {target} must be a regular file (for a partition use "
                "command:, e.g. a script running bmaptool or dd)"
            )
        self.target = target
        self.previous = target.with_name(target.name + ".previous")

    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}.new")
        try:
            shutil.copyfile(image, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            if self.target.exists():
                with contextlib.suppress(FileNotFoundError):
                    self.previous.unlink()
                os.link(self.target, self.previous)
            tmp.replace(self.target)
            _sync_directory(self.target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise InstallError(f"cannot install to {self.target}: {exc.strerror or exc}") from None
        m = verified.manifest
        return InstallResult("installed", f"{m.name} {m.version} written to {self.target}")

    def rollback(self) -> None:
        if not self.previous.exists():
            raise InstallError(f"nothing to roll back to: {self.previous} does not exist")
        try:
            self.previous.replace(self.target)
            _sync_directory(self.target.parent)
        except OSError as exc:
            raise InstallError(f"cannot roll back {self.target}: {exc.strerror or exc}") from None

    def commit(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.previous.unlink()


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
