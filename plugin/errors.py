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


class ReadError(DeviceError):
    """A local input (manifest file, trust key, config) cannot be read."""

    exit_code: ClassVar[int] = 12
