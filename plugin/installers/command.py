"""``command:PROGRAM [ARGS...]``: run a program with the verified image (with ``swupdate-run``,
`swupdate/run.py`, the only subprocess users on the device side).

The program gets the image path as its last argument and the release in its environment
(``OTACAST_NAME``, ``OTACAST_VERSION``, ``OTACAST_SEQUENCE``, ``OTACAST_SHA256``,
``OTACAST_FORMAT``).  Exit status 0 means installed; ``NEEDS_REBOOT_STATUS`` (3) means installed,
active after a reboot; anything else is a failure whose reason is the program's last line on
stderr.  It runs with a time limit so a hung installer cannot wedge the device's update loop.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from otacast.plugin.errors import InstallError
from otacast.schemas.policy import VerifiedManifest

from .base import Installer, InstallResult

NEEDS_REBOOT_STATUS = 3
# Writing a multi-GB image to slow flash takes minutes, not hours.
DEFAULT_TIMEOUT = 3600.0
# Keep at most this much of the program's error output for the reason line.
MAX_REASON = 300


class CommandInstaller(Installer):
    kind = "command"

    def __init__(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise InstallError(f"command installer {command!r}: {exc}") from None
        if not self.argv:
            raise InstallError("command installer needs a program")
        self.timeout = timeout

    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        m = verified.manifest
        environment = dict(
            os.environ,
            OTACAST_NAME=m.name,
            OTACAST_VERSION=m.version,
            OTACAST_SEQUENCE=str(m.sequence),
            OTACAST_SHA256=m.image.sha256.hex(),
            OTACAST_FORMAT=m.image.format,
        )
        try:
            done = subprocess.run(
                [*self.argv, str(image)],
                env=environment,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise InstallError(f"installer program {self.argv[0]} not found") from None
        except PermissionError:
            raise InstallError(f"installer program {self.argv[0]} is not executable") from None
        except OSError as exc:  # e.g. a script without #! (exec format error)
            raise InstallError(
                f"cannot run installer {self.argv[0]}: {exc.strerror or exc}"
            ) from None
        except subprocess.TimeoutExpired:
            raise InstallError(
                f"installer {self.argv[0]} did not finish within {self.timeout:g} s"
            ) from None
        if done.returncode == 0:
            return InstallResult("installed", _last_line(done.stdout))
        if done.returncode == NEEDS_REBOOT_STATUS:
            return InstallResult("needs-reboot", _last_line(done.stdout))
        reason = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise InstallError(f"installer {self.argv[0]} failed: {reason}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:MAX_REASON] if lines else ""
