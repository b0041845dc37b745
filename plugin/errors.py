"""Errors of the device side; `DeviceError` is its root.  Exit codes are fixed per class.

Manifest rejections (`otacast.schemas.errors.ManifestRejected` and its subclasses) are shared
with the publisher, so both sides refuse the same manifests with the same codes.
"""

from __future__ import annotations

from typing import ClassVar

from otacast.schemas.errors import OtacastError


class DeviceError(OtacastError):
    exit_code: ClassVar[int] = 40


class UsageError(DeviceError):
    """Arguments or configuration that cannot work."""

    exit_code: ClassVar[int] = 2


class ConfigError(UsageError):
    """The device configuration file is malformed or sets something that cannot work."""

    exit_code: ClassVar[int] = 3


class UpToDate(DeviceError):
    """Not a failure: the release on offer (heard on the channel, or given with --manifest) is
    the one installed, so there is nothing to do.  ``fetch`` and ``install`` print it and exit
    with its code, which scripts tell apart from success (0) and from a network failure (45)."""

    exit_code: ClassVar[int] = 4

    def __init__(self, sequence: int, where: str) -> None:
        super().__init__(f"up to date: the {where} release, sequence {sequence}, is installed")
        self.sequence = sequence


class ReadError(DeviceError):
    """A local input (manifest file, trust key, config) cannot be read."""

    exit_code: ClassVar[int] = 12


class NetworkError(DeviceError):
    """The interface, a group join or the receive socket cannot be used."""

    exit_code: ClassVar[int] = 41


class DiscoveryError(DeviceError):
    """DNS discovery of a channel's sources failed (timeout, refused, bad answer)."""

    exit_code: ClassVar[int] = 42


class FetchError(DeviceError):
    """HTTP fallback could not obtain a verified chunk from any mirror."""

    exit_code: ClassVar[int] = 43


class StateError(DeviceError):
    """The state directory cannot be used (permissions, disk full, not a directory)."""

    exit_code: ClassVar[int] = 44


class IncompleteError(DeviceError):
    """Neither multicast nor HTTP delivered the whole image before giving up."""

    exit_code: ClassVar[int] = 45


class NoManifestError(IncompleteError):
    """Nothing verifiable was heard on the channel before the join timeout."""

    # What the receiver refused while it listened, by reason (``watch``'s metrics count them).
    rejected: dict[str, int] | None = None


class InstallError(DeviceError):
    """The installer refused or failed to install a verified image."""

    exit_code: ClassVar[int] = 46


class InstallerUnavailable(InstallError):
    """The installer could not be asked at all: the SWUpdate daemon is not running (its socket
    is missing or refuses connections) or is busy with another install.  Nothing was handed
    over; trying again later may succeed, unlike an image the installer refused (46)."""

    exit_code: ClassVar[int] = 47
