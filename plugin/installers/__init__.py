"""Installers: hand a fully verified, read-only image to what installs it on the device.

`get_installer("file:/data/slots/rootfs.img")` (`file.py`), `get_installer("command:/usr/local/
bin/apply")` (`command.py`), `get_installer("swupdate:/tmp")` (stream a ``.swu`` into the swupdate
daemon whose sockets are in ``/tmp``; `swupdate/installer.py`) or `get_installer("swupdate-run:-k
/etc/swupdate/cert.pem -H board:1.0")` (one install by a private swupdate daemon started with those
arguments; `swupdate/run.py`) selects one from a configuration string (`registry.py`).  Mender is
not an installer here: it runs otacast as its update module (`otacast.plugin.mender`), which
hands the image to one of these.
"""

from .base import Installer, InstallResult
from .registry import get_installer

__all__ = ["InstallResult", "Installer", "get_installer"]
