"""``swupdate-run:ARGS``: one install by a private swupdate daemon, for devices that run none.

`SwupdateRunInstaller` starts ``swupdate ARGS`` as a private daemon whose ``TMPDIR`` (and so
whose sockets) is a fresh directory of its own, installs through those sockets exactly as
``swupdate:DIR`` does (`installer.py`), asks for the post-update command (``-p``) after a success
as ``swupdate -i`` does, and stops the daemon.  It does not run ``swupdate -i IMAGE``: that mode
feeds the image to its own daemon threads over the same socket and waits for the verdict with no
timeout, and when the installer thread's wake-up is lost at start-up (`installer.py`) it waits
forever (seen in CI: one rejected image, an hour's timeout).  Here a lost wake-up is retried,
and an error names swupdate's own reason.  A private daemon that exits before opening its
sockets (bad ARGS, an unreadable key) is reported with the first error line it printed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from otacast.plugin.errors import InstallError
from otacast.plugin.installers.base import Installer, InstallResult
from otacast.schemas.policy import VerifiedManifest

from .installer import (
    CONTROL_SOCKET,
    DEFAULT_TIMEOUT,
    PROGRESS_SOCKET,
    SwupdateIpcInstaller,
    clean_line,
    error_text,
    swu_release,
)

# A private daemon (swupdate-run) opens its sockets within milliseconds of starting; this bounds
# a loaded device's start-up with plenty of room.
RUN_START_TIMEOUT = 30.0
# A private daemon that has not exited this long after SIGTERM is killed.
RUN_STOP_TIMEOUT = 5.0
# The end of a private daemon's output kept for the reason it exited.
RUN_LOG_TAIL = 16 * 1024


class SwupdateRunInstaller(Installer):
    """One install by a private, short-lived swupdate daemon (module doc)."""

    kind = "swupdate-run"

    def __init__(
        self, arguments: str, *, timeout: float = DEFAULT_TIMEOUT, program: str = "swupdate"
    ) -> None:
        try:
            self.argv = shlex.split(arguments)
        except ValueError as exc:
            raise InstallError(f"swupdate-run arguments {arguments!r}: {exc}") from None
        if any(a in ("-i", "--image") or a.startswith("--image=") for a in self.argv):
            raise InstallError(
                "swupdate-run arguments must not name the image (otacast sends it itself)"
            )
        self.program = program
        self.timeout = timeout
        self.start_timeout = RUN_START_TIMEOUT

    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        swu_release(verified)  # refuse a non-.swu release before starting anything
        with tempfile.TemporaryDirectory(prefix="otacast-swupdate-") as name:
            private = Path(name)
            log = private / "swupdate.log"
            with log.open("wb") as output:
                try:
                    process = subprocess.Popen(
                        [self.program, *self.argv],
                        env=dict(os.environ, TMPDIR=name),
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                except FileNotFoundError:
                    raise InstallError(
                        f"{self.program} not found (is swupdate installed?)"
                    ) from None
                except OSError as exc:
                    raise InstallError(
                        f"cannot run {self.program}: {exc.strerror or exc}"
                    ) from None
            try:
                self._wait_for_sockets(process, private, log)
                daemon = SwupdateIpcInstaller(private, timeout=self.timeout)
                result = daemon.install(image, verified)
                daemon.post_update()
                return result
            finally:
                _stop(process)

    def _wait_for_sockets(self, process: subprocess.Popen[bytes], private: Path, log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        # A socket file exists from bind(); the daemon listens a moment later.
        while not all(_listening(private / s) for s in (CONTROL_SOCKET, PROGRESS_SOCKET)):
            if process.poll() is not None:
                reason = _run_reason("", _tail(log)) or f"exit status {process.returncode}"
                raise InstallError(f"{self.program} {shlex.join(self.argv)} exited: {reason}")
            if time.monotonic() > deadline:
                raise InstallError(
                    f"{self.program} did not open its sockets within {self.start_timeout:g} s"
                )
            time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(RUN_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening(path: Path) -> bool:
    """Whether a Unix socket is bound at `path` and listening, seen in /proc/net/unix without
    connecting (a probe connection would count as a progress client of the daemon)."""
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return path.exists()
    target = str(path)
    for line in table.splitlines()[1:]:
        fields = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is __SO_ACCEPTCON.
        if len(fields) == 8 and fields[7] == target and int(fields[3], 16) & 0x10000:
            return True
    return False


def _tail(log: Path) -> str:
    with log.open("rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - RUN_LOG_TAIL))
        return handle.read().decode(errors="replace")


# "[ERROR] : SWUPDATE failed [0] ERROR : ...", "ERROR : ...", "Error: ..." start an error line.
_ERROR_LINE = re.compile(r"^(?:\[ERROR\]|ERROR\s*:|Error:)")


def _run_reason(stderr: str, stdout: str) -> str:
    """The first error line swupdate printed (the cause; later ones are consequences)."""
    for text in (stderr, stdout):
        for line in text.splitlines():
            if _ERROR_LINE.match(line.strip()):
                reason = error_text(line)
                if reason:
                    return reason
    for text in (stderr, stdout):
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            return clean_line(lines[-1])
    return ""
