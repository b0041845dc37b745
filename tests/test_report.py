"""The device's reporter: progress and the summary come from core snapshots, in JSON or text;
on a terminal a bar whose line is a pure function of its state, the time and the width."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from otacast.plugin.auth import AuthStats
from otacast.plugin.core import ReceiverCore
from otacast.plugin.events import ManifestRefused
from otacast.plugin.jsonlines import json_line
from otacast.plugin.report import (
    BAR_INTERVAL,
    LOSS_MIN_FOLLOWED,
    RATE_WINDOW,
    BarState,
    FetchSummary,
    Reporter,
    bar_line,
    peak_rss_mb,
    refusal_note,
    summary_text,
    waiting_line,
    wants_bar,
)
from otacast.schemas import wire
from otacast.schemas.errors import Expired, Rollback
from otacast.schemas.timestamps import rfc3339
from otacast.signer.keys import SigningKey

from .helpers import CHUNK, make_release, untimed

IMAGE = bytes(4 * CHUNK - 100)
RELEASE = make_release(IMAGE, SigningKey(b"\x09" * 32), sequence=1)
MB = 1_000_000


def core_with_two_chunks_done() -> ReceiverCore:
    core = ReceiverCore(RELEASE.trust, now=0.0, manifest=RELEASE.verified())
    core.receive_datagram(b"junk", "fd51::1", 1.0, wall=1_800_000_000.0)
    core.count_rejected("oversized", 2)
    core.mark_done(0, 2.0)
    core.mark_done(3, 2.0)
    return core


def data_datagram(tsi: int, esi: int) -> bytes:
    symbol = bytes(RELEASE.manifest.fec.symbol_size)
    return wire.build_datagram(wire.DataPacket(tsi, 0, esi, symbol))


def summary_of(core: ReceiverCore, **rejected: int) -> FetchSummary:
    summary = FetchSummary.from_snapshot(
        core.snapshot(),
        elapsed=5.0,
        receiving=4.0,
        bytes_http=7,
        bytes_resumed=9,
        joins=["(*, ff3e::1)"],
        reads=1,
    )
    return dataclasses.replace(summary, rejected=rejected) if rejected else summary


def test_json_progress_is_written_from_a_snapshot_at_most_once_an_interval() -> None:
    out = io.StringIO()
    reporter = Reporter(out, as_json=True)
    snap = core_with_two_chunks_done().snapshot()
    assert reporter.due(10.0)
    reporter.progress(snap, now=10.0, elapsed=4.0, bytes_http=100)
    assert not reporter.due(10.5)
    reporter.progress(snap, now=10.5, elapsed=4.5, bytes_http=100)  # too soon: nothing
    lines = [untimed(json.loads(line)) for line in out.getvalue().splitlines()]
    assert lines == [
        {
            "event": "progress",
            "chunks_done": 2,
            "chunks": 4,
            "bytes_done": 2 * CHUNK - 100,
            "bytes": len(IMAGE),
            "bytes_gathered": 2 * CHUNK - 100,
            "bytes_http": 100,
            "datagrams": 1,
            "sources": 0,
            "loss": None,
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
    summary = summary_of(core_with_two_chunks_done())
    assert summary.manifest.manifest == RELEASE.manifest
    assert (summary.datagrams, summary.bytes_multicast, summary.late) == (1, 0, 0)
    assert summary.rejected == {"short": 1, "oversized": 2} and summary.auth is None
    out = io.StringIO()
    Reporter(out, as_json=True).summary(summary)
    finished = untimed(json.loads(out.getvalue()))
    assert finished["event"] == "finished" and finished["bytes_resumed"] == 9
    assert finished["joins"] == ["(*, ff3e::1)"] and finished["receiving"] == 4.0
    assert finished["reads"] == 1  # socket reads: datagrams / reads is what GRO achieved
    assert finished["chunks_decoded"] == 0  # marked done: neither decoded nor received
    assert finished["peak_rss_mb"] > 0  # read from /proc (VmHWM) as the summary is written
    assert (peak_rss_mb() or 0.0) >= finished["peak_rss_mb"]
    text = io.StringIO()
    Reporter(text, as_json=False).summary(summary)
    assert text.getvalue().startswith("done: demo-image 1.0.1 (")
    assert "refused: oversized 2, short 1" in text.getvalue()


# --- JSON lines: every one has its time -------------------------------------------------------


def test_json_lines_carry_their_time_as_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_796_293_484.1239) == "2026-12-03T10:24:44.123Z"
    line = json.loads(json_line({"event": "note", "b": 1}, wall=1_796_293_484.5))
    assert line == {"time": "2026-12-03T10:24:44.500Z", "event": "note", "b": 1}


def test_every_receive_event_as_json_has_a_time() -> None:
    out = io.StringIO()
    reporter = Reporter(out, as_json=True)
    core = core_with_two_chunks_done()
    reporter.note("manifest verified")
    reporter.progress(core.snapshot(), now=1.0, elapsed=1.0, bytes_http=0)
    reporter.summary(summary_of(core))
    events = [untimed(json.loads(line))["event"] for line in out.getvalue().splitlines()]
    assert events == ["note", "progress", "finished"]


# --- The bar ----------------------------------------------------------------------------------


def state_at(gathered: int, *samples: tuple[float, int], **changes: object) -> BarState:
    state = BarState(
        bytes_total=20 * MB,
        started=0.0,
        bytes_gathered=gathered,
        sources=2,
        symbols_followed=1000,
        symbols_missed=31,
        samples=samples,
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def test_the_bar_shows_bytes_percent_rate_loss_sources_and_time_left() -> None:
    # 4 MB gathered over the 2 s since the oldest sample: 2 MB/s, 8 s for the 16 MB left
    line = bar_line(state_at(5 * MB, (8.0, 1 * MB), (9.0, 3 * MB)), now=10.0, width=100)
    assert len(line) == 99
    assert line.startswith("[#####") and "] " in line
    figures = "25.0%    5.0 MB of 20.0 MB    2.0 MB/s  loss 3.0%  2 sources  ETA  0:08"
    assert line.split("] ")[1].strip() == figures
    bar = line[1 : line.index("]")]
    assert bar.count("#") == len(bar) // 4 and set(bar) == {"#", "-"}


@pytest.mark.parametrize("width", [120, 80, 60, 40, 20, 1, 0])
def test_the_line_fills_the_width_but_its_last_column_whatever_the_width(width: int) -> None:
    line = bar_line(state_at(5 * MB, (8.0, 1 * MB)), now=10.0, width=width)
    assert len(line) == max(width - 1, 0) and "\n" not in line and "\r" not in line
    if width >= 100:
        assert line.startswith("[")
    if width == 60:  # too narrow for a bar beside the figures: the figures alone
        assert line.startswith(" 25.0%")


def test_rate_and_time_left_are_unknown_until_a_span_is_measured() -> None:
    line = bar_line(state_at(5 * MB, (9.9, 5 * MB)), now=10.0, width=120)
    assert "   -- MB/s" in line and "ETA --:--" in line
    assert "   -- MB/s" in bar_line(state_at(0), now=10.0, width=120)  # no sample at all


def test_a_stalled_download_shows_a_zero_rate_and_no_time_left() -> None:
    line = bar_line(state_at(5 * MB, (5.0, 5 * MB), (9.0, 5 * MB)), now=10.0, width=120)
    assert "0.0 MB/s" in line and "ETA --:--" in line


def test_loss_is_shown_only_once_enough_arrivals_back_it() -> None:
    few = state_at(5 * MB, symbols_followed=LOSS_MIN_FOLLOWED - 1, symbols_missed=9)
    assert "loss --" in bar_line(few, now=10.0, width=120)


def test_a_complete_download_shows_all_of_it_and_how_long_it_took() -> None:
    state = state_at(19 * MB, (70.0, 10 * MB), complete=True, bytes_http=3 * MB, sources=1)
    line = bar_line(state, now=75.0, width=120)
    assert line.startswith("[" + "#" * 10)
    assert "-" not in line[: line.index("]")]
    assert "100.0%   20.0 MB of 20.0 MB" in line and "1 source " in line
    assert "HTTP 3.0 MB" in line and line.rstrip().endswith("in 1:15") and "ETA" not in line


def test_the_rate_is_a_moving_average_over_the_window() -> None:
    core = ReceiverCore(RELEASE.trust, now=0.0, manifest=RELEASE.verified())
    state = BarState(bytes_total=len(IMAGE), started=0.0)
    for step in range(40):
        state = state.advanced(core.snapshot(), now=step * 0.2, bytes_http=0)
    # samples span the window (and one before it), never more: memory stays bounded
    times = [t for t, _ in state.samples]
    assert times[0] <= 39 * 0.2 - RATE_WINDOW < times[1]
    assert len(state.samples) <= RATE_WINDOW / 0.2 + 2


@pytest.mark.parametrize(
    ("isatty", "as_json", "environ", "expected"),
    [
        (True, False, {"TERM": "xterm"}, True),
        (False, False, {"TERM": "xterm"}, False),  # a pipe or a log
        (True, True, {"TERM": "xterm"}, False),
        (True, False, {"TERM": "xterm", "CI": "true"}, False),
        (True, False, {"TERM": "dumb"}, False),
    ],
)
def test_the_bar_is_drawn_on_a_terminal_only(
    isatty: bool, as_json: bool, environ: dict[str, str], expected: bool
) -> None:
    assert wants_bar(isatty, as_json, environ) is expected


def test_on_a_terminal_the_bar_is_redrawn_in_place_notes_break_it_and_the_summary_follows() -> None:
    out = io.StringIO()
    reporter = Reporter(out, as_json=False, bar=True, columns=100)
    core = core_with_two_chunks_done()
    for step in range(6):  # 0.1 s apart: drawn at 10.0, 10.2 and 10.4 (BAR_INTERVAL)
        now = 10 + step * 0.1
        if reporter.due(now):
            reporter.progress(core.snapshot(), now=now, elapsed=now - 9, bytes_http=0)
    reporter.note("multicast stalled")
    reporter.summary(summary_of(core))
    text = out.getvalue()
    draws = text.split("\n")[0].split("\r")[1:]
    assert BAR_INTERVAL == 0.2
    assert len(draws) == 3 and all(len(d) == 99 for d in draws)
    assert "50.0%  132.8 kB of 265.7 kB" in draws[0]  # chunks 0 and 3 (100 bytes short) of 4
    lines = text.split("\n")
    assert lines[1] == "multicast stalled"
    final, summary = lines[2].split("\r")[-1], lines[3]
    assert "100.0%" in final and summary.startswith("done: ") and text.endswith("\n")


def test_off_a_terminal_progress_is_not_written_and_not_even_built() -> None:
    out = io.StringIO()
    reporter = Reporter(out, as_json=False, bar=False)
    assert not reporter.due(100.0)
    reporter.progress(core_with_two_chunks_done().snapshot(), now=100.0, elapsed=1, bytes_http=0)
    assert out.getvalue() == ""


# --- Wording ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        # Datagrams held before the manifest beyond what is kept: sent again.
        ("no-manifest-yet", "120 heard before the manifest, not kept (sent again"),
        # Symbols of a chunk that holds enough while its decode waits its turn.
        ("decode-pending", "120 not needed (their chunk held enough"),
    ],
)
def test_a_healthy_run_reads_as_one_its_benign_discards_are_not_refusals(
    reason: str, said: str
) -> None:
    core = core_with_two_chunks_done()
    text = summary_text(summary_of(core, **{reason: 120}))
    for alarming in ("reject", "refused", "error", "fail", "drop"):
        assert alarming not in text.lower(), text
    assert said in text
    mixed = summary_text(summary_of(core, **{reason: 120, "oversized": 2}))
    assert said in mixed and mixed.endswith("; refused: oversized 2")


def test_the_summary_with_packet_authentication_counts_pages_verified() -> None:
    # (the old text read a counter that version-2 pages no longer have: a KeyError at the end)
    summary = dataclasses.replace(
        summary_of(core_with_two_chunks_done()),
        auth=dataclasses.asdict(AuthStats(pages_signed=12)),
    )
    assert summary_text(summary).endswith("; packet authentication: 12 pages verified")


def test_the_bar_keeps_its_place_while_the_figures_grow() -> None:
    ends = {
        bar_line(state_at(gathered, (8.0, 0), (9.0, gathered)), now=10.0, width=100).index("]")
        for gathered in (0, 9 * MB, 10 * MB, 19 * MB)
    }
    assert len(ends) == 1


def test_the_installed_release_heard_on_the_channel_is_not_called_a_refusal() -> None:
    def refused(sequence: int) -> ManifestRefused:
        error = Rollback(
            f"manifest sequence {sequence} is not above the installed 5", sequence=sequence
        )
        return ManifestRefused("Rollback", str(error), error)

    assert refusal_note(refused(5), installed_sequence=5) == (
        "heard the installed release on the channel (sequence 5): nothing newer"
    )
    assert refusal_note(refused(4), installed_sequence=5) == (
        "refused a manifest on the channel: manifest sequence 4 is not above the installed 5"
    )
    expired = ManifestRefused(
        "Expired", "manifest expired", Expired("manifest expired", sequence=5)
    )
    assert refusal_note(expired, 5).startswith("refused a manifest on the channel: ")


def test_before_the_manifest_the_bar_says_it_waits_and_what_it_holds_json_says_nothing() -> None:
    core = ReceiverCore(RELEASE.trust, now=0.0)
    assert "nothing heard yet" in waiting_line(core.snapshot(), 1.0, 100)
    session = RELEASE.manifest.tsi
    core.receive_datagram(b"junk", "fd51::1", 1.0, wall=1_800_000_000.0)
    for index in range(3):  # DATA of a session not yet known: held for its manifest
        core.receive_datagram(data_datagram(session, index), "fd51::1", 1.0, wall=1_800_000_000.0)
    line = waiting_line(core.snapshot(), 65.0, 100)
    assert len(line) == 99
    assert line.rstrip() == (
        "waiting for the release's manifest: 1:05; 4 datagrams heard, 3 held until it arrives"
    )
    for alarming in ("reject", "refused", "drop"):
        assert alarming not in line
    out = io.StringIO()
    reporter = Reporter(out, as_json=False, bar=True, columns=100)
    assert reporter.due(2.0, waiting=True)
    reporter.progress(core.snapshot(), now=2.0, elapsed=2.0, bytes_http=0)
    assert out.getvalue().startswith("\rwaiting for the release's manifest: 0:02")
    assert not Reporter(io.StringIO(), as_json=True).due(2.0, waiting=True)


def test_the_summary_names_both_wire_versions_when_an_older_sender_was_heard() -> None:
    core = core_with_two_chunks_done()
    text = summary_text(summary_of(core, **{"old-wire-version": 40, "oversized": 2}))
    assert "this device speaks FLUTE/ALC (otacast wire 3)" in text
    assert "the sender speaks otacast wire 2" in text
    assert "40 datagrams of otacast wire 2 ignored" in text
    assert text.endswith("; refused: oversized 2")
