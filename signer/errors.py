"""Errors of the publisher side; `SignerError` is its root.  Exit codes are fixed per class."""

from __future__ import annotations

from typing import ClassVar

from otacast.schemas.errors import OtacastError


class SignerError(OtacastError):
    exit_code: ClassVar[int] = 1


class UsageError(SignerError):
    """Arguments that cannot work together or values out of range."""

    exit_code: ClassVar[int] = 2


class InsecureKeyFile(SignerError):
    """A secret key file other users can read: refuse to use a possibly leaked key."""

    exit_code: ClassVar[int] = 11


class ReadError(SignerError):
    """An input file (image, manifest, key) cannot be read."""

    exit_code: ClassVar[int] = 12


class WriteError(SignerError):
    """An output cannot be written, or exists and --force was not given."""

    exit_code: ClassVar[int] = 13


class NetworkError(SignerError):
    """The interface, source address or group cannot be used to send."""

    exit_code: ClassVar[int] = 15


class MenderArtifactError(SignerError):
    """mender-artifact is not installed, or failed to write the artifact."""

    exit_code: ClassVar[int] = 16


class ServedManifestExpired(SignerError):
    """``serve`` stopped because the manifest it was sending expired (devices refuse it now).

    Its own code, not the 26 of a manifest refused before anything was sent: a supervisor can
    tell "this sender ran its course, give it a new manifest" from "this manifest never could"."""

    exit_code: ClassVar[int] = 17
