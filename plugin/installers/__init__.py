"""Installers: hand a fully verified, read-only image to what installs it on the device.

`get_installer("file:/data/slots/rootfs.img")` or `get_installer("command:/usr/local/bin/apply")`
selects one from a configuration string; Mender and SWUpdate installers follow.
"""

from .base import Installer, InstallResult
from .registry import get_installer

__all__ = ["InstallResult", "Installer", "get_installer"]
