"""Installer selection from a configuration string: ``KIND:ARGUMENT``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from otacast.plugin.errors import InstallError

from .base import Installer
from .command import CommandInstaller
from .file import FileInstaller
from .swupdate import SwupdateIpcInstaller, SwupdateRunInstaller
from .swupdate.installer import owner_uid


def _swupdate(argument: str) -> SwupdateIpcInstaller:
    """``DIR``, or ``USER@DIR`` for a daemon that runs as USER (neither root nor otacast's)."""
    user, at, directory = argument.partition("@")
    if at and user and "/" not in user and directory:
        return SwupdateIpcInstaller(Path(directory), owner=owner_uid(user))
    return SwupdateIpcInstaller(Path(argument))


_KINDS: dict[str, Callable[[str], Installer]] = {
    "file": lambda argument: FileInstaller(Path(argument)),
    "command": CommandInstaller,
    "swupdate": _swupdate,
    "swupdate-run": SwupdateRunInstaller,
}


def get_installer(spec: str) -> Installer:
    kind, separator, argument = spec.partition(":")
    if not separator or not argument:
        raise InstallError(
            f"installer {spec!r} is not KIND:ARGUMENT (kinds: {', '.join(sorted(_KINDS))})"
        )
    factory = _KINDS.get(kind)
    if factory is None:
        raise InstallError(f"unknown installer kind {kind!r} (kinds: {', '.join(sorted(_KINDS))})")
    return factory(argument)
