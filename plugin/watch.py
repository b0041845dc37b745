"""``otacast watch``: the device daemon.

Theory of operation: one loop, one release at a time.  Each turn reads the installed record,
then runs the ordinary receiver (`fetch`) with that sequence as the anti-rollback floor, so the
release already installed and any older one replayed on the channel are refused (counted, one
note each) and only a newer valid manifest for this device type starts a download.  The
verified image goes to the configured installer through `deliver` (the install path shared with
``otacast install`` and the Mender module); on success the record is rewritten, which raises the
floor for the next turn.

Several senders may serve different releases on one channel (one updated before another).  A
turn installs the highest sequence it hears, not the first: after the first valid manifest the
receiver keeps listening for ``RELEASE_GRACE`` (one second) and adopts the highest one verified
by then (`otacast.plugin.core`, *Choosing a release*).  The decision was between that and
switching to a higher release while no chunk of the first is complete; the grace period is the
smaller change (the receiver core alone, nothing opened on disk has to be undone) and costs a
second per release.  A higher release heard only later is installed by the next turn.

Quiet channels are normal: when no acceptable manifest is heard for the rediscovery period the
turn ends without error and the next one joins again, re-reading DNS, so a sender that moved or
a DNS server that came back is picked up; a download left unfinished when its sender went away
is continued by such a turn from its mirrors (`otacast.plugin.resume`).  Every other failure
(DNS, HTTP, disk, installer) is reported, written to the status file and retried after an
exponential backoff capped at ``retry_max``; partial downloads survive in the state directory,
so a retry resumes.  Hostile datagrams never reach here: the receiver core counts and drops
them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from otacast.schemas.errors import ManifestRejected, OtacastError
from otacast.schemas.policy import TrustSet

from .config import Settings
from .deliver import deliver
from .errors import NoManifestError, UsageError
from .installed import read_installed
from .installers import Installer
from .jsonlines import json_line
from .metrics import DeviceMetrics, write_textfile
from .receive import FetchOptions, fetch
from .report import FetchSummary
from .resume import fetch_kept
from .status import StatusFile

# A quiet channel is re-joined (and its DNS records re-read) at least this often.
REDISCOVER_INTERVAL = 60.0
# First pause after a failure; doubles on each further failure up to Settings.retry_max.
RETRY_MIN = 2.0
# After the first valid manifest of a turn, how long to keep listening for one of a higher
# sequence (two senders on the channel serving different releases).  A sender repeats a
# manifest that fits its share of the rate at least every 0.25 s (MAX_MANIFEST_INTERVAL in
# otacast.signer.schedule), so one second hears every such sender about four times; a sender
# missed (a very large manifest at a low rate, or losses) is picked up by the next turn, whose
# floor the installed release has raised.
RELEASE_GRACE = 1.0


class Watcher:
    def __init__(
        self,
        settings: Settings,
        trust: TrustSet,
        installer: Installer,
        out: TextIO,
        *,
        as_json: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        if settings.fallback == "only":
            raise UsageError(
                "watch listens for new releases on the channel; fallback 'only' "
                "cannot be used with it"
            )
        if settings.interface is None:
            raise UsageError("watch needs --interface (or interface in the config)")
        # Nothing heard is the idle state, not a reason to fall back: re-join instead.
        self.settings = replace(
            settings, join_timeout=max(settings.join_timeout, REDISCOVER_INTERVAL)
        )
        self.trust = trust
        self.installer = installer
        self.out = out
        self.json = as_json
        self.stop = stop or threading.Event()
        self.status = StatusFile(settings.state_dir)
        self.installs = 0
        self._delay = RETRY_MIN
        # Tallies since start for --metrics-file (otacast.plugin.metrics).
        self.bytes: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.turns: Counter[str] = Counter()
        self.last_error: tuple[str, float] | None = None

    def note(self, event: str, message: str, **fields: object) -> None:
        if self.json:
            line = json_line({"event": event, "message": message, **fields}, sort_keys=True)
        else:
            line = message
        self.out.write(line + "\n")
        self.out.flush()

    def run(self) -> None:
        self.note("watching", f"watching for releases newer than {self._floor_text()}")
        while not self.stop.is_set():
            self.turn()

    def _floor_text(self) -> str:
        installed = read_installed(self.settings.state_dir)
        return f"sequence {installed.sequence}" if installed else "nothing (none installed)"

    def turn(self) -> None:
        """One attempt: wait for a newer release, fetch it, install it; then the metrics."""
        self.turns[self._turn()] += 1
        if self.settings.metrics_file is not None:
            self._write_metrics(self.settings.metrics_file)

    def _turn(self) -> str:
        """One attempt; how it ended (metrics.OUTCOMES)."""
        try:
            summary = self._receive()
        except OtacastError as exc:
            self.status.failed(f"{type(exc).__name__}: {exc}")
            self._back_off(exc)
            return "failed"
        if summary is None:
            return "quiet"  # a quiet channel: join again
        self.rejected.update(summary.rejected)
        self.bytes.update(
            multicast=summary.bytes_multicast,
            http=summary.bytes_http,
            resumed=summary.bytes_resumed,
        )
        try:
            delivery = deliver(
                self.installer,
                self.settings.out_path,
                summary.manifest,
                state_dir=self.settings.state_dir,
                status=self.status,
                keep_staged=self.settings.keep_staged,
            )
        except OtacastError as exc:
            self._back_off(exc)  # deliver has written it to the status file
            return "failed"
        self._delay = RETRY_MIN
        self.installs += 1
        assert delivery.record is not None
        self.note(
            "installed",
            delivery.summary(),
            sequence=delivery.record.sequence,
            version=delivery.record.version,
            status=delivery.result.status,
        )
        return "installed"

    def _write_metrics(self, path: Path) -> None:
        tallies = DeviceMetrics(
            channel=self.settings.channel or "",
            installed=read_installed(self.settings.state_dir),
            state=self.status.status.activity,
            bytes=self.bytes,
            rejected=self.rejected,
            turns=self.turns,
            last_error=self.last_error[0] if self.last_error else None,
            last_error_at=self.last_error[1] if self.last_error else None,
        )
        try:
            write_textfile(path, tallies)
        except OtacastError as exc:  # metrics are advice: the daemon carries on without them
            self.note("warning", f"warning: {exc}")

    def _receive(self) -> FetchSummary | None:
        """Wait for a release newer than the installed one and receive it; None if none came."""
        installed = read_installed(self.settings.state_dir)
        self.status.update(activity="waiting")
        options = FetchOptions.from_settings(
            self.settings,
            self.trust,
            installed_sequence=installed.sequence if installed else None,
            json=self.json,
            status=self.status,
            manifest_grace=RELEASE_GRACE,
        )
        try:
            return fetch(options, self.out)
        except NoManifestError as exc:
            self.rejected.update(exc.rejected or {})
            # Quiet: a download left by a sender that went away goes on from its mirrors.
            return fetch_kept(options, self.out)
        except ManifestRejected:
            # Only refused manifests heard (the installed release, typically): as quiet as none.
            # (The turn's datagram rejections are not counted in the metrics file then.)
            return None

    def _back_off(self, exc: OtacastError) -> None:
        """Report a failed turn and wait before the next, longer after each failure in a row."""
        message = f"{type(exc).__name__}: {exc}"
        self.last_error = (type(exc).__name__, time.time())
        self.note("error", f"{message}; retrying in {self._delay:g} s", retry_in=self._delay)
        self.stop.wait(self._delay)
        self._delay = min(self._delay * 2, self.settings.retry_max)
