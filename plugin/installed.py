"""The record of what is installed: ``<state dir>/installed.json``.

It is what anti-rollback compares against: ``otacast fetch`` and ``otacast install`` refuse a
release whose sequence is not above the recorded one (unless ``--installed-sequence`` is given).
Written atomically after an installer reports success; a missing file means nothing installed
yet, an unreadable or malformed one is an error rather than a silent reset (which would reopen
the door to rollbacks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from otacast.schemas.policy import VerifiedManifest

from .durable import write_durably
from .errors import StateError

RECORD = "installed.json"
# The record is a few hundred bytes; never read more from a path that might be anything.
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Installed:
    sequence: int
    name: str
    version: str
    sha256: str
    status: str


def read_installed(state_dir: Path) -> Installed | None:
    path = state_dir / RECORD
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        record = json.loads(data)
        installed = Installed(
            sequence=record["sequence"],
            name=record["name"],
            version=record["version"],
            sha256=record["sha256"],
            status=record["status"],
        )
    except (ValueError, KeyError, TypeError):
        raise StateError(f"{path} is not a valid installed record; fix or remove it") from None
    if not isinstance(installed.sequence, int) or isinstance(installed.sequence, bool):
        raise StateError(f"{path} has a non-integer sequence; fix or remove it")
    return installed


def write_installed(state_dir: Path, verified: VerifiedManifest, status: str) -> Installed:
    m = verified.manifest
    installed = Installed(m.sequence, m.name, m.version, m.image.sha256.hex(), status)
    data = (json.dumps(installed.__dict__, sort_keys=True) + "\n").encode()
    write_durably(state_dir / RECORD, data, "the installed release")
    return installed
