"""The device's reporter: progress and the summary come from core snapshots, in JSON or text."""

from __future__ import annotations

import io
import json

from otacast.plugin.core import ReceiverCore
from otacast.plugin.report import FetchSummary, Reporter, peak_rss_mb
from otacast.signer.keys import SigningKey

from .helpers import make_release

IMAGE = bytes(3 * 65536 + 100)
RELEASE = make_release(IMAGE, SigningKey(b"\x09" * 32), sequence=1)


def core_with_two_chunks_done() -> ReceiverCore:
    core = ReceiverCore(RELEASE.trust, now=0.0, manifest=RELEASE.verified())
    core.receive_datagram(b"junk", "fd51::1", 1.0, wall=1_800_000_000.0)
    core.count_rejected("oversized", 2)
    core.mark_done(0, 2.0)
    core.mark_done(3, 2.0)
    return core


def test_json_progress_is_written_from_a_snapshot_at_most_once_an_interval() -> None:
    out = io.StringIO()
    reporter = Reporter(out, as_json=True)
    snap = core_with_two_chunks_done().snapshot()
    assert reporter.due(10.0)
    reporter.progress(snap, now=10.0, elapsed=4.0, bytes_http=100)
    assert not reporter.due(10.5)
    reporter.progress(snap, now=10.5, elapsed=4.5, bytes_http=100)  # too soon: nothing
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {
            "event": "progress",
            "chunks_done": 2,
            "chunks": 4,
            "bytes_done": 65536 + 100,
            "bytes": len(IMAGE),
            "bytes_http": 100,
            "datagrams": 1,
            "rejected": 3,
            "rejected_by": {"short": 1, "oversized": 2},
            "elapsed": 4.0,
        }
    ]


def test_no_progress_before_a_manifest_is_verified() -> None:
    out = io.StringIO()
    Reporter(out, as_json=True).progress(
        ReceiverCore(RELEASE.trust, now=0.0).snapshot(), now=1.0, elapsed=1.0, bytes_http=0
    )
    assert out.getvalue() == ""


def test_the_summary_carries_the_snapshot_and_what_only_the_driver_knows() -> None:
    snap = core_with_two_chunks_done().snapshot()
    summary = FetchSummary.from_snapshot(
        snap,
        elapsed=5.0,
        receiving=4.0,
        bytes_http=7,
        bytes_resumed=9,
        joins=["(*, ff3e::1)"],
        reads=1,
    )
    assert summary.manifest.manifest == RELEASE.manifest
    assert (summary.datagrams, summary.bytes_multicast, summary.late) == (1, 0, 0)
    assert summary.rejected == {"short": 1, "oversized": 2} and summary.auth is None
    out = io.StringIO()
    Reporter(out, as_json=True).summary(summary)
    finished = json.loads(out.getvalue())
    assert finished["event"] == "finished" and finished["bytes_resumed"] == 9
    assert finished["joins"] == ["(*, ff3e::1)"] and finished["receiving"] == 4.0
    assert finished["reads"] == 1  # socket reads: datagrams / reads is what GRO achieved
    assert finished["peak_rss_mb"] > 0  # read from /proc (VmHWM) as the summary is written
    assert (peak_rss_mb() or 0.0) >= finished["peak_rss_mb"]
    text = io.StringIO()
    Reporter(text, as_json=False).summary(summary)
    assert text.getvalue().startswith("done: demo-image 1.0.1 (")
    assert "rejected: oversized 2, short 1" in text.getvalue()
