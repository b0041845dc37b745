"""The sender's reporter: JSON lines with an ``event`` key, plain lines for logs."""

from __future__ import annotations

import io
import json

from otacast.signer.report import Reporter, ServeProgress, ServeSummary

from .helpers import RFC3339_MILLIS_UTC


def test_json_lines_name_their_event_and_sort_their_keys() -> None:
    out = io.StringIO()
    report = Reporter(out, as_json=True)
    assert not report.due(0.0)  # the first report comes one interval in
    assert report.due(1.0)
    report.progress(ServeProgress(elapsed=2.0, packets=10, bytes=4000, passes=1))
    report.warning("slow")
    report.summary(ServeSummary(2.0, 10, 4000, 1, "done", []))
    lines = out.getvalue().splitlines()
    assert all(line == json.dumps(json.loads(line), sort_keys=True) for line in lines)
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["progress", "warning", "finished"]
    assert events[0]["rate"] == 2000 and events[1]["message"] == "slow"
    assert events[2]["reason"] == "done" and "peak_rss_mb" in events[2]
    assert all(RFC3339_MILLIS_UTC.fullmatch(e["time"]) for e in events)  # as the device's


# What every `serving` line names (the session, the sender, where it sends from and to).
SERVING = {
    "session": "ab",
    "sender": "0/1",
    "group": "ff3e::1",
    "port": 4242,
    "source": "fd00::1",
    "interface": "eth0",
}


def test_plain_lines_for_a_log() -> None:
    out = io.StringIO()
    report = Reporter(out, as_json=False)
    assert report.interval == 10.0  # a line every 10 s when not on a terminal
    report.event("encoding", chunks=3)  # setup events are for machines only
    report.event(
        "serving", **SERVING, rate=0, expires=1798675200, expires_at="2026-12-31T00:00:00Z"
    )
    report.progress(ServeProgress(elapsed=0.0, packets=0, bytes=0, passes=0))  # no rate yet
    report.summary(ServeSummary(2.0, 10, 4_000_000, 1, "SIGTERM", []))
    assert out.getvalue().splitlines() == [
        "serving session ab as sender 0/1 to [ff3e::1]:4242 from fd00::1 on eth0 at "
        "full speed (unpaced) until 2026-12-31T00:00:00Z",
        "stopped (SIGTERM) after 2.0 s: 1 pass(es), 10 packets, 4000000 bytes, 2.0 MB/s",
    ]


def test_the_serving_line_gives_the_round_length_senders_of_one_release_must_share() -> None:
    out = io.StringIO()
    report = Reporter(out, as_json=False)
    report.event("serving", **SERVING, rate=110_000_000, round_seconds=0.0734)
    assert out.getvalue().rstrip().endswith(", rounds of 0.073400 s")
