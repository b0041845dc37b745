"""Installers: hand a fully verified, read-only image to what installs it on the device.

`get_installer("file:/data/slots/rootfs.img")`, `get_installer("command:/usr/local/bin/apply")`,
`get_installer("swupdate:/tmp")` (stream a ``.swu`` into the swupdate daemon whose sockets are in
``/tmp``) or `get_installer("swupdate-run:-k /etc/swupdate/cert.pem -H board:1.0")` (run
``swupdate ARGS -i IMAGE``) selects one from a configuration string; a Mender installer follows.
"""

from .base import Installer, InstallResult
from .registry import get_installer

__all__ = ["InstallResult", "Installer", "get_installer"]
