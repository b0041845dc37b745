"""The error vocabulary both sides share.

`OtacastError` is the root of every error otacast raises on purpose.  Each side has its own root
below it (`SignerError` in the signer, `DeviceError` in the plugin).  The reasons a manifest is
rejected live here, once, because the publisher's `verify` and the device's verifier must refuse
exactly the same things.  Every class carries the process exit code its CLI returns, so the code
is fixed in one place and stays distinct across the family.
"""

from __future__ import annotations

from typing import ClassVar


class OtacastError(Exception):
    """Root of every error otacast raises deliberately; the message is one line for a human."""

    exit_code: ClassVar[int] = 1


class UntrustedInputError(OtacastError):
    """Input from outside (a manifest, a datagram, a key file, an HTTP body) was refused."""

    exit_code: ClassVar[int] = 20


# --- Manifests ---------------------------------------------------------------------------------


class ManifestRejected(UntrustedInputError):
    """A manifest was refused; subclasses say why.

    `sequence` is the refused manifest's sequence when its signatures held (the update rules of
    `policy.accept` refused it), else None: a receiver that heard several refusals on a channel
    reports the one of the newest genuine release."""

    exit_code: ClassVar[int] = 20

    def __init__(self, message: str, *, sequence: int | None = None) -> None:
        super().__init__(message)
        self.sequence = sequence


class ManifestTooLarge(ManifestRejected):
    exit_code: ClassVar[int] = 21


class MalformedManifest(ManifestRejected):
    """Not valid UTF-8 JSON, duplicate keys, floats, unknown or missing fields, bad values."""

    exit_code: ClassVar[int] = 22


class UnknownKey(ManifestRejected):
    """No signature on the manifest comes from a trusted key."""

    exit_code: ClassVar[int] = 23


class BadSignature(ManifestRejected):
    """A trusted key's signature does not verify: the manifest was altered or the key is wrong."""

    exit_code: ClassVar[int] = 24


class BelowThreshold(ManifestRejected):
    """Fewer valid signatures from distinct trusted keys than the trust set requires."""

    exit_code: ClassVar[int] = 25


class Expired(ManifestRejected):
    exit_code: ClassVar[int] = 26


class Rollback(ManifestRejected):
    """The sequence number is not above the one already installed."""

    exit_code: ClassVar[int] = 27


class WrongDevice(ManifestRejected):
    """The manifest does not list this device's type as compatible."""

    exit_code: ClassVar[int] = 28


class WrongChannel(ManifestRejected):
    """The manifest was signed for another channel than the device's.

    Without this check a release of another channel signed by the same key (a ``beta`` at a high
    sequence) would be installed, and every later release of the device's own channel refused
    as a rollback."""

    exit_code: ClassVar[int] = 32


# --- Images ------------------------------------------------------------------------------------


class ImageMismatch(UntrustedInputError):
    """An image (or one of its chunks) does not match the signed length or hash."""

    exit_code: ClassVar[int] = 29


# --- Datagrams ---------------------------------------------------------------------------------


class PacketError(UntrustedInputError):
    """A datagram that is not a well-formed otacast packet.

    `reason` is a short stable slug; receivers count rejections by it instead of raising.
    """

    exit_code: ClassVar[int] = 30

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- Keys --------------------------------------------------------------------------------------


class KeyFormatError(UntrustedInputError):
    """A key file's text is not an otacast Ed25519 key of the expected kind and length."""

    exit_code: ClassVar[int] = 10


# --- Block index -------------------------------------------------------------------------------


class MalformedIndex(UntrustedInputError):
    """A block index whose bytes or hash do not match what the signed manifest says of it."""

    exit_code: ClassVar[int] = 34


# --- Delta lane --------------------------------------------------------------------------------


class MalformedDelta(UntrustedInputError):
    """A delta lane object or an index patch whose bytes or result contradict what they claim
    (header, run list, stream length) or what the signed manifest says of the new index."""

    exit_code: ClassVar[int] = 33
