"""The module's record of the deployment in progress, and the queries answered from it.

``STATE_DIR/mender/state.json`` is written once Download has staged a complete image, then by
ArtifactInstall (which installer, what it said, whether it kept something to restore) and
ArtifactRollback.  Each Mender state is a new process, so this record is how one state tells the
next what happened; a damaged record is an error, never a silent reset, because it steers
rollback.  `supports_rollback` and `reboot_answer` turn it into Mender's query answers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from otacast.plugin.deliver import INSTALLED_STATUSES
from otacast.plugin.durable import write_durably
from otacast.plugin.errors import StateError
from otacast.plugin.installers import Installer
from otacast.plugin.trust import read_limited

from .layout import MAX_STATE_BYTES


@dataclass(frozen=True)
class Deployment:
    """``STATE_DIR/mender/state.json``: written once the image is staged, then by later states."""

    artifact_name: str
    sequence: int
    verified_at: float  # when Download verified the manifest (expiry is judged then, once)
    installer: str | None = None  # the spec that installed it: rollback/commit use the same one
    result: str | None = None  # the installer's status once installed: installed | needs-reboot
    can_roll_back: bool = False  # whether the installer kept something to restore

    @property
    def installed(self) -> bool:
        return self.result is not None


def read_deployment(path: Path) -> Deployment | None:
    """The record, None if there is none; a damaged one is an error (it steers rollback)."""
    if not path.exists():
        return None
    data = read_limited(path, MAX_STATE_BYTES, "module state")
    try:
        deployment = Deployment(**json.loads(data))
    except (ValueError, TypeError, RecursionError):
        raise StateError(f"{path} is not a module state record; remove it") from None
    if not (
        len(data) <= MAX_STATE_BYTES
        and isinstance(deployment.artifact_name, str)
        and isinstance(deployment.sequence, int)
        and not isinstance(deployment.sequence, bool)
        and isinstance(deployment.verified_at, int | float)
        and (deployment.installer is None or isinstance(deployment.installer, str))
        and (deployment.result is None or deployment.result in INSTALLED_STATUSES)
        and isinstance(deployment.can_roll_back, bool)
    ):
        raise StateError(f"{path} is not a module state record; remove it")
    return deployment


def write_deployment(path: Path, deployment: Deployment) -> None:
    data = (json.dumps(asdict(deployment), sort_keys=True) + "\n").encode()
    write_durably(path, data, "the deployment state")


def supports_rollback(installer: Installer, deployment: Deployment | None) -> bool:
    """Whether ArtifactRollback could restore what was there before this deployment.

    Before the install, the installer says (only the file installer keeps the previous content,
    and only when there is some); after it, what the install recorded.
    """
    if deployment is not None and deployment.installed:
        return deployment.can_roll_back
    return installer.can_restore(installed=False)


def reboot_answer(deployment: Deployment | None) -> str:
    """NeedsArtifactReboot: ``Automatic`` lets Mender reboot after the install.

    (``Yes`` would make Mender call ArtifactReboot and expect this module to reboot the device
    itself; Mender recommends ``Automatic`` so that several payloads can share one reboot.)
    """
    return "Automatic" if deployment and deployment.result == "needs-reboot" else "No"
