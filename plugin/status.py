"""What the device is doing: ``<state dir>/status.json``, read by ``otacast status``.

``fetch``, ``install`` and ``watch`` rewrite it when their activity changes and about once a
second while a download runs (atomically, by rename, so a reader never sees half a file; not
fsynced: it describes the present, and after a crash the writer's pid tells a reader it is
stale).  The last error is kept across runs until a run succeeds, so an operator looking at a
quiet device sees why its last attempt failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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

    def update(self, **changes: Any) -> None:
        self.status = replace(self.status, updated=time.time(), **changes)
        tmp = self.path.with_name(f".{STATUS}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(self.status), sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError:
            # Status is advice for operators; a full disk must not fail an update over it.
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
