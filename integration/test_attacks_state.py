"""The adversarial suite, network half: the receiver's state directory.

Each test is named after an attack of issue 6, here on what the device keeps between runs: the
disk filling up under it (a small tmpfs in a private mount namespace), state files corrupted
between runs, and the receiver killed with SIGKILL at random points.  Each test asserts that the
failure is one clear line, that nothing forged or unverified is ever written or trusted (every
chunk the log names has its signed bytes staged), and that the next run resumes what was kept
to an identical image.  Run with ``-s`` for the figures.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from otacast.plugin.errors import IncompleteError, StateError

from .attacks import MB, Channel, http_fetch, logged_chunks, nginx, session_state
from .netns import Host, LanFactory, stop
from .release import fetch, fetch_command, publish, serve, summary_of

RATE = 2_000_000  # the honest sender's rate, bytes/s


# --- Disk full in the state directory; state files corrupted between runs ------------------------


@dataclasses.dataclass
class MountedHost(Host):
    """A namespace host seen through a private mount namespace held open by process `pid`:
    what is mounted there (a small tmpfs) exists for its commands only, and vanishes with it."""

    pid: int = 0

    def command(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *args]

    def path(self, path: Path) -> Path:
        """`path` as this mount namespace sees it, for reading from outside."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def mount_tmpfs(self, path: Path, size: str, *, remount: bool = False) -> None:
        options = f"remount,size={size}" if remount else f"size={size}"
        done = self.run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
        assert done.returncode == 0, done.stderr


@contextmanager
def private_mounts(host: Host) -> Iterator[MountedHost]:
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    holder = host.popen("unshare", "--mount", "--propagation", "private", "sleep", "600")
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/comm").read_text().strip() != "sleep":
            assert holder.poll() is None and time.monotonic() < deadline, "unshare failed"
            time.sleep(0.02)
        yield MountedHost(host.netns, host.address, pid=holder.pid)
    finally:
        stop([holder])


def partial_release(tmp_path: Path, sequence: int = 3) -> tuple[Channel, Path]:
    """A 1 MB release (16 chunks) whose only mirror serves the last chunk wrong, so a first run
    keeps 15 verified chunks and fails; returns it and the served file (to mend later)."""
    url = f"http://[fd51::1]:8080/s{sequence}/rootfs.img"
    channel = Channel.make(
        tmp_path / f"release{sequence}", 1 * MB, chunk="64K", sequence=sequence, http_url=url
    )
    publish(channel.release, tmp_path / "www")
    served = tmp_path / "www" / f"s{sequence}" / "rootfs.img"
    spoil(served)
    return channel, served


def spoil(served: Path) -> None:
    """Change the last byte of a mirror's file: its last chunk no longer verifies."""
    data = bytearray(served.read_bytes())
    data[-1] ^= 0x01
    served.write_bytes(bytes(data))


def mend(channel: Channel, served: Path) -> None:
    shutil.copyfile(channel.release.image, served)


def one_line_error(err: str, text: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in err, err


def test_disk_full_in_the_state_directory_is_a_clear_error_and_the_download_resumes_after(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # server, unused, device
    server, _, device = net.hosts
    channel, served = partial_release(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out.img"
    state.mkdir()
    with nginx(server, tmp_path / "www", tmp_path / "nginx"), private_mounts(device) as mounted:
        # 1. Less space than the image: refused at the start, in one line, nothing handed on.
        mounted.mount_tmpfs(state, "512k")
        code, _, err = http_fetch(mounted, channel, state, out)
        assert code == StateError.exit_code, err
        one_line_error(err, "No space left on device")
        assert not out.exists()
        # 2. Space returns; the mirror fails on one chunk: 15 verified chunks are kept.
        mounted.mount_tmpfs(state, "2m", remount=True)
        code, _, err = http_fetch(mounted, channel, state, out)
        assert code == IncompleteError.exit_code, err
        kept = logged_chunks(mounted.path(state), channel.manifest)
        assert sorted(kept) == list(range(15)) and all(kept.values())
        # 3. Something else fills the disk to the last byte; the mirror is mended.  The image's
        # space was reserved at the start, so the download resumes and completes.
        filler = mounted.run("dd", "if=/dev/zero", f"of={state}/filler", "bs=64k")
        assert "No space left on device" in filler.stderr
        mend(channel, served)
        code, events, err = http_fetch(mounted, channel, state, out)
        assert code == 0, err
        summary = summary_of(events)
        kept_bytes = sum(channel.manifest.chunk_span(i)[1] for i in range(15))
        assert summary["bytes_resumed"] == kept_bytes
        assert summary["bytes_http"] == channel.manifest.image.length - kept_bytes
    assert out.read_bytes() == channel.release.image.read_bytes()


def test_disk_full_because_an_abandoned_download_holds_its_space_does_not_block_the_next_release(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # server, unused, device
    server, _, device = net.hosts
    older, _ = partial_release(tmp_path, sequence=3)
    newer, served = partial_release(tmp_path, sequence=4)
    mend(newer, served)
    state, out = tmp_path / "state", tmp_path / "out.img"
    state.mkdir()
    with nginx(server, tmp_path / "www", tmp_path / "nginx"), private_mounts(device) as mounted:
        mounted.mount_tmpfs(state, "1536k")  # room for one image in the making, not two
        code, _, err = http_fetch(mounted, older, state, out)  # fails on one chunk, abandoned
        assert code == IncompleteError.exit_code, err
        assert len(session_state(mounted.path(state))) == 1
        # The next release comes out before the older one was ever completed.
        code, _, err = http_fetch(mounted, newer, state, out)
        assert code == 0, err
        assert session_state(mounted.path(state)) == []
    assert out.read_bytes() == newer.release.image.read_bytes()


def test_state_files_corrupted_between_runs_cost_only_the_chunks_they_name(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # server, unused, device
    server, _, device = net.hosts
    channel, served = partial_release(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out.img"
    with nginx(server, tmp_path / "www", tmp_path / "nginx"):
        code, _, err = http_fetch(device, channel, state, out)
        assert code == IncompleteError.exit_code, err
        session = state / channel.manifest.session_id.hex()
        # Bit rot in two staged chunks, junk and a torn entry in the log, garbage in the
        # staged manifest copy, the lock file and the status record.
        with (session / "image.part").open("r+b") as part:
            for index in (2, 5):
                part.seek(channel.manifest.chunk_span(index)[0] + 100)
                part.write(b"\xde\xad")
        with (session / "chunks.log").open("ab") as log:
            log.write(b"\x00\x00\x00\x0f" + b"\xff\xff\xff\xfe" + b"\x00\x01")
        for name in ("manifest.json", "lock"):
            (session / name).write_bytes(os.urandom(300))
        (state / "status.json").write_bytes(b"{\xff")
        mend(channel, served)
        code, events, err = http_fetch(device, channel, state, out)
        assert code == 0, err
        resumed = sum(channel.manifest.chunk_span(i)[1] for i in range(15) if i not in (2, 5))
        assert summary_of(events)["bytes_resumed"] == resumed  # 15 kept, 2 rotted
        assert out.read_bytes() == channel.release.image.read_bytes()
        # A state file that is no file at all: one clear line, and the output is untouched.
        spoil(served)
        code, _, err = http_fetch(device, channel, state, tmp_path / "second.img")
        assert code == IncompleteError.exit_code
        (session / "chunks.log").unlink()
        (session / "chunks.log").mkdir()
        code, _, err = http_fetch(device, channel, state, tmp_path / "second.img")
    assert code == StateError.exit_code, err
    one_line_error(err, "chunks.log")
    assert not (tmp_path / "second.img").exists()


# --- kill -9 of the receiver at random points -----------------------------------------------------

KILLS = 20
RECEIVERS = 4  # trials run on this many receivers at once, all hearing one sender
KILL_SEED = 20260


def test_kill_9_of_the_receiver_at_20_random_points_every_run_resumes_to_an_identical_image(
    lan: LanFactory, channel: Channel, tmp_path: Path
) -> None:
    net = lan(1 + RECEIVERS)
    sender, receivers = net.hosts[0], net.hosts[1:]
    image = channel.release.image.read_bytes()
    source = ("--source", sender.address)
    # Every chunk advances every round, so symbols are written into the store all through the
    # run and chunks complete near its end: kills land amid symbol writes and completions.
    tx = serve(
        sender,
        channel.release,
        "--rate",
        str(RATE),
        "--duration",
        "300s",
        ready=True,
    )
    try:
        started = time.monotonic()
        code, _, err = fetch(
            receivers[0], channel.release, tmp_path / "clean", tmp_path / "clean.img", *source
        )
        clean = time.monotonic() - started
        assert code == 0, err
        rng = random.Random(KILL_SEED)
        delays = [rng.uniform(0.0, 1.1 * clean) for _ in range(KILLS)]
        trials: list[dict[str, object]] = [{} for _ in range(KILLS)]

        def trial(host: Host, index: int) -> None:
            state, out = tmp_path / f"k{index}" / "state", tmp_path / f"k{index}" / "out.img"
            out.parent.mkdir()
            # Every other trial decodes in the worker process: killed amid its decodes too.
            decode = ("--decode", "worker" if index % 2 else "inline")
            first = subprocess.Popen(
                fetch_command(host, channel.release, state, out, *source, *decode),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                first.wait(delays[index])
                killed = False
            except subprocess.TimeoutExpired:
                os.kill(first.pid, signal.SIGKILL)
                first.wait()
                killed = True
            logged = logged_chunks(state, channel.manifest)
            code, events, err = fetch(host, channel.release, state, out, *source, *decode)
            trials[index] = {
                "killed": killed,
                "logged": logged,
                "code": code,
                "err": err,
                "resumed": summary_of(events)["bytes_resumed"] if code == 0 else None,
                "identical": out.exists() and out.read_bytes() == image,
            }

        def worker(slot: int) -> None:
            for index in range(slot, KILLS, RECEIVERS):
                trial(receivers[slot], index)

        threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(RECEIVERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop([tx])
    passed = 0
    for index, result in enumerate(trials):
        logged = result["logged"]
        assert isinstance(logged, dict)
        # The log never names a chunk whose bytes did not reach the staging file ...
        assert all(logged.values()), (index, result)
        assert result["code"] == 0, (index, result["err"])
        # ... and the next run resumes exactly what was logged, to an identical image.
        assert result["resumed"] == sum(channel.manifest.chunk_span(i)[1] for i in logged), (
            index,
            result,
        )
        assert result["identical"], index
        passed += 1
    killed = [r for r in trials if r["killed"]]
    mid = [r for r in killed if r["logged"]]
    print(
        f"\nkill -9: {passed} of {KILLS} resume runs passed (seed {KILL_SEED}, delays "
        f"0-{1.1 * clean:.1f} s, clean run {clean:.1f} s); {len(killed)} killed, {len(mid)} of "
        f"them with verified chunks on disk, {KILLS - len(killed)} finished first"
    )
    assert passed == KILLS
