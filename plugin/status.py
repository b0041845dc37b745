"""What the device is doing: ``<state dir>/status.json``, read by ``otacast status``.

``fetch``, ``install`` and ``watch`` rewrite it when their activity changes and about once a
second while a download runs (atomically, by rename, so a reader never sees half a file; not
fsynced: it describes the present, and after a crash the writer's pid tells a reader it is
stale).  The download's rewrites (`StatusFile.post`) are made on a thread: creating and
renaming a file can wait behind another thread's ``fdatasync`` (142 ms once on ext4, measured
on the receive loop, which must not pause while the stream goes on).  The last error is kept
across runs until a run succeeds, so an operator looking at a quiet device sees why its last
attempt failed.

`StatusReport` is what ``otacast status`` shows: the installed record (read by the caller, from
``installed.json``) beside this file.  What a writer said it was doing counts only while that
writer's process is alive; the last error counts whatever became of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from otacast.schemas.units import format_time

from .durable import create_beside, write_all

STATUS = "status.json"
# The record is under a kilobyte; never read more from a path that might be anything.
MAX_STATUS_BYTES = 64 * 1024

ACTIVITIES = ("idle", "waiting", "downloading", "installing")


@dataclass(frozen=True)
class Status:
    activity: str = "idle"  # one of ACTIVITIES
    pid: int | None = None
    updated: float = 0.0
    release: str | None = None  # "NAME VERSION (sequence N)" being fetched or installed
    sequence: int | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_http: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


_NUMBER = (int, float)
_TYPES: dict[str, tuple[type, ...]] = {
    "activity": (str,),
    "pid": (int, type(None)),
    "updated": _NUMBER,
    "release": (str, type(None)),
    "sequence": (int, type(None)),
    "bytes_done": (int,),
    "bytes_total": (int,),
    "bytes_http": (int,),
    "last_error": (str, type(None)),
    "last_error_at": (*_NUMBER, type(None)),
}


def read_status(state_dir: Path) -> Status | None:
    """The last written status; None if there is none or it cannot be read as one.

    A damaged status file is not worth failing over: it only describes, it decides nothing.
    """
    try:
        with (state_dir / STATUS).open("rb") as handle:
            record = json.loads(handle.read(MAX_STATUS_BYTES + 1))
        known = {k: v for k, v in record.items() if k in _TYPES}
        status = Status(**known)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if status.activity not in ACTIVITIES or not all(
        isinstance(getattr(status, name), kinds) and not isinstance(getattr(status, name), bool)
        for name, kinds in _TYPES.items()
    ):
        return None
    return status


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class StatusFile:
    """The writer's side: keeps the current status and rewrites the file on each change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATUS
        previous = read_status(state_dir)
        self.status = Status(
            pid=os.getpid(),
            last_error=previous.last_error if previous else None,
            last_error_at=previous.last_error_at if previous else None,
        )
        self._lock = threading.Lock()
        self._posted = threading.Event()
        self._writer: threading.Thread | None = None

    def update(self, **changes: Any) -> None:
        with self._lock:
            self.status = replace(self.status, updated=time.time(), **changes)
            self._write()

    def post(self, **changes: Any) -> None:
        """`update`, with the file rewritten on a thread: returns at once (module doc).  The
        file always ends up with the latest status: each write, on either side, writes the
        status current at that moment, under one lock."""
        with self._lock:
            self.status = replace(self.status, updated=time.time(), **changes)
        self._posted.set()
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_posted, name="otacast-status", daemon=True
            )
            self._writer.start()

    def _write_posted(self) -> None:
        while True:
            self._posted.wait()
            self._posted.clear()
            with self._lock:
                self._write()

    def _write(self) -> None:
        tmp: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Not synced (advice need not survive a power cut), but created like any other
            # root-written file (`durable.create_beside`): never through a planted link.
            fd, tmp = create_beside(self.path)
            try:
                os.fchmod(fd, 0o644)  # operators and monitors read it
                write_all(fd, (json.dumps(asdict(self.status), sort_keys=True) + "\n").encode())
            finally:
                os.close(fd)
            tmp.replace(self.path)
        except OSError:
            # Status is advice for operators; a full disk must not fail an update over it.
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def failed(self, message: str) -> None:
        self.update(activity="idle", last_error=message, last_error_at=time.time())

    def succeeded(self) -> None:
        self.update(
            activity="idle",
            release=None,
            sequence=None,
            bytes_done=0,
            bytes_total=0,
            bytes_http=0,
            last_error=None,
            last_error_at=None,
        )


@dataclass(frozen=True)
class StatusReport:
    """What ``otacast status`` shows, as one JSON object or as three lines of text."""

    state_dir: Path
    installed: Mapping[str, Any] | None  # the installed record's fields, None if nothing is
    status: Status | None
    running: bool  # the status file's writer is still alive

    @classmethod
    def read(cls, state_dir: Path, installed: Mapping[str, Any] | None) -> StatusReport:
        status = read_status(state_dir)
        return cls(state_dir, installed, status, status is not None and process_alive(status.pid))

    @property
    def activity(self) -> str:
        return self.status.activity if self.status and self.running else "idle"

    def as_json(self) -> dict[str, object]:
        live = self.status if self.running else None
        return {
            "state_dir": str(self.state_dir),
            "installed": dict(self.installed) if self.installed else None,
            "activity": self.activity,
            "pid": live.pid if live else None,
            "release": live.release if live else None,
            "sequence": live.sequence if live else None,
            "bytes_done": live.bytes_done if live else 0,
            "bytes_total": live.bytes_total if live else 0,
            "last_error": self.status.last_error if self.status else None,
            "last_error_at": self.status.last_error_at if self.status else None,
        }

    def lines(self) -> list[str]:
        return [self._installed_line(), self._activity_line(), self._error_line()]

    def _installed_line(self) -> str:
        i = self.installed
        if not i:
            return "installed: nothing recorded"
        return f"installed: {i['name']} {i['version']} (sequence {i['sequence']}), {i['status']}"

    def _activity_line(self) -> str:
        status = self.status
        if status and self.running and self.activity != "idle":
            line = f"activity: {self.activity} (pid {status.pid})"
            if status.release:
                line += f" {status.release} (sequence {status.sequence})"
            if status.bytes_total:
                line += (
                    f", {100 * status.bytes_done / status.bytes_total:.1f}% of "
                    f"{status.bytes_total} bytes ({status.bytes_http} over HTTP)"
                )
            return line
        return "activity: idle" + (
            f" (watch running, pid {status.pid})" if self.running and status else ""
        )

    def _error_line(self) -> str:
        status = self.status
        if status and status.last_error:
            when = format_time(status.last_error_at or 0)  # as every date otacast shows
            return f"last error: {when} {status.last_error}"
        return "last error: none"
