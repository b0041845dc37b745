"""Mender's states: one invocation of the module carries out one state on one file tree.

`run_state` picks the state's action or query (the package doc says what each does); `Module`
holds what every state needs, read when first used: the device config, the trust in force, the
staging directory and the deployment record.  The install itself goes through
`otacast.plugin.deliver`, like ``otacast install`` and ``watch``; the release is recorded as
installed only at ArtifactCommit, because Mender may still roll it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TextIO

from otacast.plugin.config import Settings, load_config, settle
from otacast.plugin.deliver import (
    choose_installer,
    deliver,
    record_installed,
    require_device_type,
)
from otacast.plugin.durable import write_durably
from otacast.plugin.errors import StateError
from otacast.plugin.installed import read_installed
from otacast.plugin.installers import Installer
from otacast.plugin.receive import FetchOptions, fetch
from otacast.plugin.reuse import configured_sources, mender_sources
from otacast.plugin.status import StatusFile
from otacast.plugin.trust import current_trust, read_limited
from otacast.plugin.verify import verify_manifest
from otacast.schemas.errors import ImageMismatch, OtacastError, WrongDevice
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.policy import TrustSet, VerifiedManifest

from .deployment import (
    Deployment,
    read_deployment,
    reboot_answer,
    supports_rollback,
    write_deployment,
)
from .layout import HASH_BLOCK, IMAGE, MANIFEST, PROG, STAGING_DIR, STATE
from .meta import Tree, decode_meta_data


class Module:
    """One invocation: a state on a file tree, with the device config read when first needed."""

    def __init__(self, tree: Path, out: TextIO) -> None:
        self.tree_path = tree
        self.out = out

    @cached_property
    def tree(self) -> Tree:
        return Tree(self.tree_path)

    @cached_property
    def settings(self) -> Settings:
        return settle(load_config(None), {})

    @property
    def staging(self) -> Path:
        return self.settings.state_dir / STAGING_DIR

    @cached_property
    def trust(self) -> TrustSet:
        # The trust in force: the last rotation accepted by `otacast trust update`, else the
        # config's keys.
        return current_trust(self.settings.state_dir, self.settings.trust, self.settings.threshold)[
            0
        ]

    @cached_property
    def status(self) -> StatusFile:
        return StatusFile(self.settings.state_dir)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def installer(self, spec: str | None = None) -> Installer:
        """The installer `spec` names (default: the config's), checked against the staging
        directory, which Cleanup removes."""
        return choose_installer(
            spec or self.settings.installer,
            self.staging / IMAGE,
            scratch=self.staging,
            missing='no installer: set installer = "KIND:ARGUMENT" in the device config '
            f"({self.settings.config or 'none found'})",
        )

    def deployment(self) -> Deployment | None:
        return read_deployment(self.staging / STATE)

    def current_deployment(self) -> Deployment:
        """The deployment staged for the artifact Mender is working on."""
        deployment = self.deployment()
        if deployment is None:
            raise StateError(f"nothing was downloaded for this artifact ({self.staging} is empty)")
        if deployment.artifact_name != self.tree.artifact_name:
            raise StateError(
                f"{self.staging} holds artifact {deployment.artifact_name!r}, not "
                f"{self.tree.artifact_name!r}"
            )
        return deployment

    def installed_sequence(self) -> int | None:
        """The anti-rollback floor: the sequence otacast last recorded as installed."""
        installed = read_installed(self.settings.state_dir)
        return installed.sequence if installed else None

    def verify(self, data: bytes, *, now: float) -> VerifiedManifest:
        """The device's checks, with this device's type from the config and from Mender."""
        settings = self.settings
        mender_type = self.tree.device_type
        this_type = require_device_type(
            settings.device_type or mender_type,
            "the otacast Mender module",
            "set device_type in the device config or in Mender's device_type file",
        )
        verified = verify_manifest(
            data,
            self.trust,
            now=now,
            device_type=this_type,
            installed_sequence=self.installed_sequence(),
            channel=settings.channel,
        )
        compatible = verified.manifest.compatible
        for source, device_type in (("config", settings.device_type), ("Mender", mender_type)):
            if device_type is not None and device_type not in compatible:
                raise WrongDevice(
                    f"device type {device_type!r} (from {source}) is not among "
                    f"{', '.join(compatible)}"
                )
        return verified

    def reverify(self, deployment: Deployment) -> VerifiedManifest:
        data = read_limited(self.staging / MANIFEST, MAX_MANIFEST_BYTES, "staged manifest")
        verified = self.verify(data, now=deployment.verified_at)
        if verified.manifest.sequence != deployment.sequence:
            raise StateError(f"{self.staging / MANIFEST} does not match {self.staging / STATE}")
        return verified

    def clear_staging(self) -> None:
        try:
            shutil.rmtree(self.staging)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove {self.staging}: {exc.strerror or exc}") from None

    # Mender's states ---------------------------------------------------------------------

    def download(self) -> None:
        manifest = decode_meta_data(self.tree.meta_data())
        self.installer()  # a device that cannot install must not download first
        now = time.time()
        verified = self.verify(manifest, now=now)
        # Left-overs of a deployment Mender abandoned without Cleanup (power loss) go first.
        self.clear_staging()
        try:
            self.staging.mkdir(parents=True)
        except OSError as exc:
            raise StateError(f"cannot create {self.staging}: {exc.strerror or exc}") from None
        options = FetchOptions.from_settings(
            replace(self.settings, out=self.staging / IMAGE),
            self.trust,
            manifest=verified,
            installed_sequence=self.installed_sequence(),
            status=self.status,
        )
        if self.settings.reuse:
            # Mender's A/B root filesystems hold the running release (`otacast.plugin.reuse`).
            sources, note = mender_sources()
            if note is not None:
                self.out.write(note + "\n")
            options = replace(
                options,
                reuse_sources=configured_sources(
                    self.settings.reuse_sources, self.settings.installer, sources
                ),
            )
        # Nothing heard and no mirror: fail now, not at Mender's module timeout (hours).
        fetch(replace(options, give_up_without_fallback=True), self.out)
        write_durably(self.staging / MANIFEST, manifest, "the staged manifest")
        # Written last: its presence says the image and manifest beside it are complete.
        write_deployment(
            self.staging / STATE,
            Deployment(self.tree.artifact_name, verified.manifest.sequence, verified_at=now),
        )
        self.status.update(activity="idle")

    def artifact_install(self) -> None:
        deployment = self.current_deployment()
        verified = self.reverify(deployment)
        image = self.staging / IMAGE
        check_image(image, verified)
        installer = self.installer()
        # Recorded as installed only at ArtifactCommit: Mender may still roll back.
        delivery = deliver(
            installer,
            image,
            verified,
            state_dir=self.settings.state_dir,
            status=self.status,
            record=False,
        )
        write_deployment(
            self.staging / STATE,
            replace(
                deployment,
                installer=self.settings.installer,
                result=delivery.result.status,
                can_roll_back=installer.can_restore(installed=True),
            ),
        )
        self.say(delivery.summary())

    def artifact_commit(self) -> None:
        deployment = self.current_deployment()
        if not deployment.installed:
            raise StateError(f"artifact {deployment.artifact_name} was not installed; no commit")
        verified = self.reverify(deployment)
        assert deployment.result is not None
        self.installer(deployment.installer).commit()
        record = record_installed(self.settings.state_dir, verified, deployment.result, self.status)
        self.say(f"committed {record.name} {record.version} (sequence {record.sequence})")

    def artifact_rollback(self) -> None:
        deployment = self.deployment()
        if deployment is None or not deployment.installed:
            self.say("nothing was installed: nothing to roll back")
            return
        self.installer(deployment.installer).rollback()
        write_deployment(self.staging / STATE, replace(deployment, result=None))
        self.say(f"rolled back artifact {deployment.artifact_name}")

    def cleanup(self) -> None:
        self.clear_staging()

    def artifact_failure(self) -> None:
        # Mender goes on to Cleanup whatever this state answers: tidy up, report, never fail.
        try:
            self.clear_staging()
        except OtacastError as exc:
            print(f"{PROG}: warning: {exc}", file=sys.stderr)

    def supports_rollback(self) -> str:
        deployment = self.deployment()
        spec = deployment.installer if deployment and deployment.installed else None
        return "Yes" if supports_rollback(self.installer(spec), deployment) else "No"

    def needs_artifact_reboot(self) -> str:
        return reboot_answer(self.deployment())


def check_image(image: Path, verified: VerifiedManifest) -> None:
    """The staged image crossed a process boundary since Download checked it: check it again."""
    m = verified.manifest
    digest = hashlib.sha256()
    length = 0
    try:
        with image.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
                length += len(block)
                if length > m.image.length:
                    break
    except OSError as exc:
        raise StateError(f"cannot read staged image {image}: {exc.strerror or exc}") from None
    if length != m.image.length or digest.digest() != m.image.sha256:
        raise ImageMismatch(f"staged image {image} does not match the manifest; download again")


# Mender's state name -> what it does; a query's answer is printed (nothing else may be).
_ACTIONS: dict[str, Callable[[Module], None]] = {
    "Download": Module.download,
    "ArtifactInstall": Module.artifact_install,
    "ArtifactCommit": Module.artifact_commit,
    "ArtifactRollback": Module.artifact_rollback,
    "Cleanup": Module.cleanup,
    "ArtifactFailure": Module.artifact_failure,
}
_QUERIES: dict[str, Callable[[Module], str]] = {
    "SupportsRollback": Module.supports_rollback,
    "NeedsArtifactReboot": Module.needs_artifact_reboot,
}
STATES = frozenset(_ACTIONS) | frozenset(_QUERIES)


def run_state(state: str, tree: Path, out: TextIO) -> None:
    """Carry out one of Mender's states; unknown states do nothing, as the protocol asks."""
    if state not in STATES:
        return
    module = Module(tree, out)
    query = _QUERIES.get(state)
    if query is not None:
        out.write(query(module) + "\n")  # stdout is the answer: nothing else may go there
        out.flush()
        return
    try:
        _ACTIONS[state](module)
    except OtacastError as exc:
        with contextlib.suppress(OtacastError):
            module.status.failed(f"Mender {state}: {type(exc).__name__}: {exc}")
        raise
