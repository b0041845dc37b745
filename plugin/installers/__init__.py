"""Installers: hand a fully verified, read-only image to what installs it on the device.

A configuration string ``KIND:ARGUMENT`` selects one (`get_installer`, `registry.py`):

- ``file:/data/slots/rootfs.img``: atomic replace, keeping the previous file (`file.py`);
- ``command:/usr/local/bin/apply``: run a program with the image (`command.py`);
- ``swupdate:/tmp``: stream a ``.swu`` into the swupdate daemon whose sockets are in ``/tmp``
  (`swupdate/installer.py`), trusted only if root (or otacast's own user) created and serves
  them; ``swupdate:USER@/tmp`` also trusts USER;
- ``swupdate-run:-k /etc/swupdate/cert.pem -H board:1.0``: one install by a private swupdate
  daemon started with those arguments (`swupdate/run.py`).

Mender is not an installer here: it runs otacast as its update module (`otacast.plugin.mender`),
which hands the image to one of these.
"""

from .base import Installer, InstallResult
from .registry import get_installer

__all__ = ["InstallResult", "Installer", "get_installer"]
