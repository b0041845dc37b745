"""What ``otacast fetch`` shows while it receives, on a namespaced LAN with 10% loss: a bar
redrawn in place on a terminal (a pseudo-terminal here), plain lines in a pipe, and a time on
every ``--json`` line."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from .netns import Host, LanFactory, stop
from .release import Release, fetch_command, random_loss, serve, summary_of

MB = 1_000_000
RFC3339_MILLIS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
COLUMNS = 110


pytestmark = pytest.mark.usefixtures("nft_or_skip")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return Release.make(tmp_path_factory.mktemp("release"), 12 * MB, chunk="1M")


def fetch_on_a_terminal(command: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run `command` with stdout and stderr on a pseudo-terminal `COLUMNS` wide, as a user's
    shell would (no CI, a real TERM); its exit code and everything it wrote."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"TERM": "xterm"}
    process = subprocess.Popen(command, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            written += data
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return code, written.decode()


def lossy_lan(lan: LanFactory, release: Release) -> tuple[Host, Host, subprocess.Popen[str]]:
    net = lan(2)
    sender, receiver = net.hosts
    random_loss(receiver, 10)
    # One send per datagram, so the loss applies to datagrams, not to GSO runs.
    return sender, receiver, serve(sender, release, "--rate", "6M", "--no-gso", ready=True)


def test_on_a_terminal_fetch_redraws_a_bar_in_place_and_ends_with_the_summary(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    sender, receiver, tx = lossy_lan(lan, release)
    try:
        command = fetch_command(
            receiver,
            release,
            tmp_path / "state",
            tmp_path / "out.img",
            "--source",
            sender.address,
            json_lines=False,
        )
        code, written = fetch_on_a_terminal(command)
    finally:
        stop([tx])
    assert code == 0, written
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    lines = written.replace("\r\n", "\n").split("\n")  # (the terminal turns \n into \r\n)
    redrawn = next(line for line in lines if "\r[" in line)
    draws = [d for d in redrawn.split("\r") if d]
    # Before it, only the wait for the manifest, told as that (if it lasted a redraw)
    for line in lines[: lines.index(redrawn)]:
        for draw in filter(None, line.split("\r")[1:]):
            assert draw.startswith("waiting for the release's manifest: "), line
    # Redrawn in place several times a second through a download of a few seconds, each
    # draw the whole line but its last column, the percentage moving on
    assert len(draws) >= 5, draws
    assert all(len(d) == COLUMNS - 1 and d.startswith("[") for d in draws), draws
    percents = [float(re.search(r"(\d+\.\d)%", d).group(1)) for d in draws]  # type: ignore[union-attr]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert any(0 < p < 100 for p in percents), percents
    final = draws[-1]
    assert "1 source " in final and re.search(r" in \d+:\d\d\s*$", final), final
    # The loss it shows is the loss the network applied (10% of datagrams), give or take
    loss = float(re.search(r"loss (\d+\.\d)%", final).group(1))  # type: ignore[union-attr]
    assert 5.0 <= loss <= 15.0, final
    summary = lines[lines.index(redrawn) + 1]
    assert summary.startswith("done: ") and "from 1 source, loss " in summary, summary
    assert "rejected" not in written.lower()


def test_in_a_pipe_fetch_writes_lines_only_and_with_json_every_line_has_its_time(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    sender, receiver, tx = lossy_lan(lan, release)

    def fetch_piped(name: str, json_lines: bool) -> subprocess.CompletedProcess[str]:
        state, out = tmp_path / name, tmp_path / f"{name}.img"
        command = fetch_command(
            receiver, release, state, out, "--source", sender.address, json_lines=json_lines
        )
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    try:
        plain = fetch_piped("plain", json_lines=False)
        machine = fetch_piped("json", json_lines=True)
    finally:
        stop([tx])
    assert plain.returncode == 0, plain.stderr
    assert "\r" not in plain.stdout and plain.stdout.splitlines()[-1].startswith("done: ")
    assert machine.returncode == 0, machine.stderr
    events = [json.loads(line) for line in machine.stdout.splitlines()]  # every line is JSON
    assert {e["event"] for e in events} >= {"note", "progress", "finished"}
    for event in events:
        assert RFC3339_MILLIS_UTC.fullmatch(str(event["time"])), event
    times = [str(e["time"]) for e in events]
    assert times == sorted(times)
    finished = summary_of(events)
    assert finished["sources"] == 1 and 0.05 <= float(finished["loss"]) <= 0.15  # type: ignore[arg-type]
