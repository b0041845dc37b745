"""The status record and ``otacast status``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otacast.plugin.cli import main
from otacast.plugin.status import STATUS, StatusFile, read_status
from otacast.schemas.units import format_time


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_last_error_survives_later_runs_until_one_succeeds(tmp_path: Path) -> None:
    first = StatusFile(tmp_path)
    first.failed("FetchError: no mirror answered")
    second = StatusFile(tmp_path)  # a later run
    second.update(activity="downloading", bytes_done=5, bytes_total=10)
    status = read_status(tmp_path)
    assert status is not None
    assert status.last_error == "FetchError: no mirror answered"
    assert status.activity == "downloading" and status.pid == os.getpid()
    second.succeeded()
    status = read_status(tmp_path)
    assert status is not None and status.last_error is None and status.activity == "idle"


def test_a_posted_status_is_written_in_the_background_and_a_later_update_wins(
    tmp_path: Path,
) -> None:
    status_file = StatusFile(tmp_path)
    status_file.post(activity="downloading", bytes_done=5, bytes_total=10)
    deadline = time.monotonic() + 10
    while (status := read_status(tmp_path)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status is not None and status.activity == "downloading"
    for done in range(6, 10):
        status_file.post(activity="downloading", bytes_done=done, bytes_total=10)
    status_file.succeeded()  # written before it returns, and never overwritten by a post
    for _ in range(3):
        status = read_status(tmp_path)
        assert status is not None and status.activity == "idle" and status.bytes_done == 0
        time.sleep(0.05)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b'{"activity": "dancing"}', b'{"pid": {"x": 1}}', b"\xff" * 9]
)
def test_a_damaged_status_file_reads_as_none(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATUS).write_bytes(content)
    assert read_status(tmp_path) is None
    StatusFile(tmp_path).update(activity="waiting")  # and is simply replaced
    assert read_status(tmp_path) is not None


def status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


def test_status_shows_installed_release_and_running_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "installed.json").write_text(
        json.dumps(
            {
                "sequence": 4,
                "name": "rootfs",
                "version": "1.4",
                "sha256": "ab",
                "status": "installed",
            }
        )
    )
    StatusFile(tmp_path).update(
        activity="downloading", release="rootfs 1.5", sequence=5, bytes_done=25, bytes_total=100
    )
    report = status_json(tmp_path, capsys)
    assert report["activity"] == "downloading" and report["sequence"] == 5
    assert report["installed"] == {
        "sequence": 4,
        "name": "rootfs",
        "version": "1.4",
        "sha256": "ab",
        "status": "installed",
    }
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    human = capsys.readouterr().out
    assert "installed: rootfs 1.4 (sequence 4)" in human
    assert "downloading" in human and "25.0% of 100 bytes" in human


def test_status_of_a_dead_writer_is_idle_but_keeps_its_last_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = StatusFile(tmp_path)
    status.status = status.status.__class__(pid=dead_pid())
    status.update(activity="downloading", release="rootfs 1.5", sequence=5)
    status.failed("InstallError: installer /usr/bin/apply failed: no space")
    report = status_json(tmp_path, capsys)
    assert report["activity"] == "idle" and report["pid"] is None
    assert report["last_error"] == "InstallError: installer /usr/bin/apply failed: no space"
    assert report["installed"] is None
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    human = capsys.readouterr().out
    assert "installed: nothing recorded" in human and "no space" in human
    # The time of the error as an RFC 3339 UTC date, like every date otacast shows.
    when = format_time(report["last_error_at"])
    assert f"last error: {when} InstallError:" in human
