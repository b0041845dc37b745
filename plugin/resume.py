"""Resuming without the sender: the verified manifests kept in the state directory.

Every download keeps its verified manifest beside its partial image
(``<state>/<session id>/manifest.json``, `otacast.plugin.staging`) until the image is handed on.
When a run hears nothing on the channel (the senders have gone, typically after the device lost
power or the download was interrupted), `fetch_or_resume` looks there before giving up: each
kept manifest is verified again exactly as a ``--manifest`` file is (`verify_manifest` with the
trust set in force, expiry judged now, the installed sequence as the anti-rollback floor, this
device's channel and type), and the highest sequence that passes and lists an HTTP mirror is
continued from its mirrors, keeping the chunks and symbols already stored.  Being on disk earns a
manifest nothing: one that fails a check is not used, and the run says why in one line; the
run then ends with the "nothing heard" error it would have ended with anyway.

The channel comes first: `fetch` listens for the join timeout before a kept manifest is
considered, so a newer release on the channel (or one the device must refuse, which ends the run
with its own error) is never passed over for an old download.  Only a device that follows a
channel resumes this way (a kept manifest must be signed for that channel), and not with
``fallback = never`` (a kept manifest is only continued from its mirrors).  With
``--fallback only`` and no ``--manifest``, the kept manifest is the one used from the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from otacast.schemas.errors import ManifestRejected
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.policy import VerifiedManifest

from .errors import NoManifestError, ReadError
from .receive import FetchOptions, fetch
from .report import FetchSummary, Reporter
from .staging import session_directories
from .trust import read_limited
from .verify import verify_manifest

# The file in a session directory that holds its verified manifest (written by `Staging`).
KEPT_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Kept:
    """A download kept in the state directory whose manifest verifies now."""

    directory: Path
    verified: VerifiedManifest


def kept_downloads(options: FetchOptions, now: float) -> tuple[list[Kept], list[str]]:
    """The kept downloads whose manifests pass this device's checks at `now`, highest sequence
    first, and one line for each one that does not, saying why."""
    usable: list[Kept] = []
    refused: list[str] = []
    for directory in session_directories(options.state_dir):
        path = directory / KEPT_MANIFEST
        if not path.is_file():
            continue  # made, never used: nothing was verified there
        try:
            verified = verify_manifest(
                read_limited(path, MAX_MANIFEST_BYTES, "kept manifest"),
                options.trust,
                now=now,
                device_type=options.device_type,
                installed_sequence=options.installed_sequence,
                channel=options.channel,
            )
        except (ManifestRejected, ReadError) as exc:
            refused.append(f"the download kept in {directory} is not continued: {exc}")
            continue
        usable.append(Kept(directory, verified))
    usable.sort(key=lambda kept: kept.verified.manifest.sequence, reverse=True)
    return usable, refused


def fetch_kept(options: FetchOptions, out: TextIO, why: str | None = None) -> FetchSummary | None:
    """Continue the best kept download from its mirrors (module doc); None if there is none.
    `why` says, to the user, why a kept manifest is used instead of the channel's (by default:
    nothing was heard on it)."""
    if options.channel is None or options.fallback == "never" or options.manifest is not None:
        return None
    emit = Reporter(out, options.json)
    usable, refused = kept_downloads(options, time.time())
    for line in refused:
        emit.note(line)
    for kept in usable:
        m = kept.verified.manifest
        if not m.http:
            emit.note(
                f"the download of {m.name} {m.version} kept in {kept.directory} is not "
                "continued: its manifest lists no HTTP mirror"
            )
            continue
        if why is None:
            why = f"nothing heard on the channel within {options.join_timeout:g} s"
        emit.note(
            f"{why}: continuing {m.name} {m.version} (sequence {m.sequence}) from its HTTP "
            f"mirrors with the verified manifest kept in {kept.directory}"
        )
        return fetch(replace(options, manifest=kept.verified, fallback="only"), out)
    return None


def fetch_or_resume(options: FetchOptions, out: TextIO) -> FetchSummary:
    """`fetch`, and when nothing is heard on the channel, `fetch_kept` before giving up."""
    if options.fallback == "only" and options.manifest is None:
        summary = fetch_kept(options, out, "--fallback only without --manifest")
        return summary if summary is not None else fetch(options, out)
    try:
        return fetch(options, out)
    except NoManifestError:
        summary = fetch_kept(options, out)
        if summary is None:
            raise
        return summary
