"""The one install path: a verified image goes to the installer, and what it installed is recorded.

``otacast install``, ``otacast watch`` and the Mender module all install through here, so the
three cannot drift apart in what the status file shows, which results count as installed, or
when the anti-rollback floor (``installed.json``) rises.

Theory of operation.  Every path first requires this device's type (`require_device_type`):
verification refuses a release whose signed ``compatible`` list lacks the type, but only a type
it is given, so a device without one would install releases for any device.
`choose_installer` turns the configured spec into an installer and lets it refuse paths it would
collide with *before* anything is downloaded.  `deliver` then, for an image that has been
received and verified in full:

1. marks the status file ``installing`` with the release;
2. hands the image to ``installer.install`` (the image is never modified);
3. refuses a result other than ``installed`` or ``needs-reboot``;
4. keeps the image's block index when the release signs one (``installed.blockindex``, for the
   next release's delta lane: `otacast.plugin.installed`), then records the release in
   ``installed.json`` (which raises the anti-rollback floor of every
   otacast path) and clears the status file's activity and last error — or, for Mender, which
   installs in one state and commits in a later one, only returns the status file to idle and
   leaves the record to `record_installed` at commit time;
5. unless told to keep it (``keep_staged``), removes the received image once the release is
   recorded: the installer has its own copy (the file installer's target, SWUpdate's slot, the
   command's result), and the state directory must not need room for two images.  A removal
   that fails leaves the file for the next run to replace; the install has succeeded.

A failure at any step is written to the status file (``TYPE: message``, kept as the last error)
and raised unchanged, so the caller's exit code and retry policy see the installer's own error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from otacast.schemas.errors import OtacastError
from otacast.schemas.manifest import Manifest
from otacast.schemas.policy import VerifiedManifest

from .errors import InstallError, UsageError
from .installed import Installed, stage_index, write_installed
from .installers import Installer, InstallResult, get_installer
from .status import StatusFile

# What an installer may report; anything else is a failure, never recorded as installed.
INSTALLED_STATUSES = ("installed", "needs-reboot")


@dataclass(frozen=True)
class Delivery:
    release: Manifest
    result: InstallResult
    record: Installed | None  # None when recording was left to a later commit (Mender)

    def summary(self) -> str:
        """``installed NAME VERSION (sequence N): STATUS[; DETAIL]``, as every path prints it."""
        m, result = self.release, self.result
        detail = f"; {result.detail}" if result.detail else ""
        return f"installed {m.name} {m.version} (sequence {m.sequence}): {result.status}{detail}"


def require_device_type(
    device_type: str | None,
    command: str,
    where: str = "set device_type in the device config or pass --device-type",
) -> str:
    """This device's type, which every install path needs: without one, a release signed for
    any device would be accepted (`verify_manifest` only compares a type it is given)."""
    if not device_type:
        raise UsageError(
            f"{command}: no device type: {where} (releases for other devices would otherwise "
            "be installed)"
        )
    return device_type


def choose_installer(
    spec: str | None, image: Path, *, missing: str, scratch: Path | None = None
) -> Installer:
    """The installer `spec` names, checked against where the image will be downloaded.

    `missing` is the refusal when no installer is configured; `scratch` a directory removed after
    the install, which must not hold what the installer writes.
    """
    if spec is None:
        raise UsageError(missing)
    installer = get_installer(spec)
    installer.check_paths(image, scratch=scratch)
    return installer


def deliver(
    installer: Installer,
    image: Path,
    verified: VerifiedManifest,
    *,
    state_dir: Path,
    status: StatusFile,
    record: bool = True,
    keep_staged: bool = True,
) -> Delivery:
    """Install `image` (complete and verified) and, if `record`, record it (module doc)."""
    m = verified.manifest
    try:
        status.update(activity="installing", release=f"{m.name} {m.version}", sequence=m.sequence)
        result = installer.install(image, verified)
        if result.status not in INSTALLED_STATUSES:
            raise InstallError(f"installer reported {result.status!r}")
        # The installed release's block index, for the next release's delta lane: built from
        # the image now (it is removed below), put in place with the record.
        stage_index(state_dir, verified, image)
        if not record:
            status.update(activity="idle")
            return Delivery(m, result, None)
        installed = record_installed(state_dir, verified, result.status, status)
    except OtacastError as exc:
        status.failed(f"{type(exc).__name__}: {exc}")
        raise
    if not keep_staged:
        with contextlib.suppress(OSError):  # step 5: the next receive replaces it anyway
            image.unlink()
    return Delivery(m, result, installed)


def record_installed(
    state_dir: Path, verified: VerifiedManifest, result: str, status: StatusFile
) -> Installed:
    """Record `verified` as installed (raising the anti-rollback floor); the run succeeded."""
    installed = write_installed(state_dir, verified, result)
    status.succeeded()
    return installed
