"""``file:PATH``: install by atomically replacing a file, keeping the previous one for rollback.

The image is copied next to the target, fsynced, the current target is kept as
``PATH.previous`` (a hard link, so the target is never absent), and the copy is renamed over the
target.  `rollback` renames ``PATH.previous`` back; `commit` removes it.  For a raw partition
use the ``command`` installer with a tool that writes block devices (``dd``, ``bmaptool``).

The checks on file targets live here too, and run before anything is downloaded: `check_out`
refuses an image path (``--out``) that cannot take a file, and `FileInstaller.check_paths` an
image path or staging directory that would overwrite the target or its rollback copy.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from otacast.plugin.durable import copy_into, create_beside, sync_directory
from otacast.plugin.errors import InstallError, StateError, UsageError
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

    def check_paths(self, image: Path, *, scratch: Path | None = None) -> None:
        if scratch is not None and self.target.resolve().is_relative_to(scratch.resolve()):
            raise UsageError(f"the file installer's target must lie outside {scratch}")
        if image.resolve() in (self.target.resolve(), self.previous.resolve()):
            # The download would overwrite the target (and then the rollback copy) before install.
            raise UsageError("--out must differ from the file installer's target")

    def can_restore(self, *, installed: bool) -> bool:
        # A first install onto a missing file has nothing to go back to.
        return (self.previous if installed else self.target).is_file()

    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        # Run as root: the copy is made in a file of our own creation (`durable.create_beside`),
        # never at a predictable name where a planted link could send it elsewhere.
        tmp: Path | None = None
        try:
            fd, tmp = create_beside(self.target)
            try:
                os.fchmod(fd, 0o644)  # what a copy made under the usual umask had
                copy_into(fd, image)
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.target.exists():
                with contextlib.suppress(FileNotFoundError):
                    self.previous.unlink()
                os.link(self.target, self.previous)
            tmp.replace(self.target)
            sync_directory(self.target.parent)
        except OSError as exc:
            if tmp is not None:
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
            sync_directory(self.target.parent)
        except OSError as exc:
            raise InstallError(f"cannot roll back {self.target}: {exc.strerror or exc}") from None

    def commit(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.previous.unlink()


def check_out(out: Path, *, make_parent: bool = False) -> None:
    """Refuse an unusable image path (``--out``) before downloading anything, not after.

    `make_parent`: `out` is the default path inside the state directory, which is created.
    """
    if make_parent:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create state directory {out.parent}: {exc.strerror or exc}"
            ) from None
    if not out.name or out.is_dir():
        raise UsageError(f"--out {out} must name a file, not a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
