"""`otacast watch`, the device daemon, on a namespaced LAN: releases published one after another
are installed in order, a replayed older release is refused, garbage on the group and a sender
killed mid-transfer (HTTP fallback) do not stop it, and an installer failure is retried."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from otacast.schemas import addressing

from . import services
from .netns import Host, LanFactory, stop
from .release import CHANNEL, DEVICE, Release, publish, serve

MB = 1_000_000
# Every wait for the daemon is bounded: a hung daemon fails the test instead of the run.
EVENT_TIMEOUT = 60.0
GARBAGE_DATAGRAMS = 3000

# Datagrams the attacker sends from the sender's own address (so the SSM join admits them):
# random bytes, our magic with a bad version, a DATA header for a session nobody announced, and
# truncated headers.
GARBAGE = """
import os, socket, sys
group, port, source, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((source, 0))
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("eth0"))
kinds = [
    lambda: os.urandom(1228),
    lambda: b"OC\\x09\\x01" + os.urandom(200),
    lambda: b"OC\\x02\\x01" + os.urandom(8) + os.urandom(1216),
    lambda: b"OC\\x02",
]
for i in range(count):
    s.sendto(kinds[i % len(kinds)](), (group, port))
"""


class Daemon:
    """`otacast watch --json` in a namespace host, its output lines read by a thread."""

    def __init__(self, host: Host, config: Path) -> None:
        self.process = host.popen(
            DEVICE,
            "watch",
            "--config",
            str(config),
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: queue.Queue[dict[str, object]] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def wait_for(self, event: str, **fields: object) -> dict[str, object]:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(f"watch exited; saw {self.seen}") from None
                continue
            self.seen.append(item)
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                return item
        raise AssertionError(f"no {event} {fields} within {EVENT_TIMEOUT} s; saw {self.seen}")

    def wait_for_progress(self, chunks: int) -> None:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while time.monotonic() < deadline:
            item = self.wait_for("progress")
            if int(item["chunks_done"]) >= chunks:  # type: ignore[call-overload]
                return
        raise AssertionError(f"fewer than {chunks} chunks within {EVENT_TIMEOUT} s")

    def terminate(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.reader.join(timeout=30)  # every line it printed is queued (communicate would race)
        assert self.process.stderr is not None
        err = self.process.stderr.read()
        while not self.events.empty():
            self.seen.append(self.events.get())
        return self.process.returncode, err


def release_pair(directory: Path, www: Path) -> tuple[Release, Release]:
    """v1 (sequence 1) and v2 (sequence 2, mirrored on the sender host), one release key."""
    # 256 KiB chunks: the test reads chunk progress before it kills the sender.
    v1 = Release.make(directory / "v1", 2 * MB, sequence=1, chunk="256K")
    v2 = Release.make(
        directory / "v2",
        4 * MB,
        sequence=2,
        chunk="256K",
        http_url="http://[fd51::1]:8080/rel/rootfs.img",
        key_from=v1,
    )
    publish(v2, www)
    return v1, v2


def write_config(
    path: Path, release: Release, source: str, state: Path, installer: str, *more: str
) -> None:
    """A device config listening to `source` (and the `more` sources) on the test channel."""
    sources = ", ".join(f'"{s}"' for s in (source, *more))
    path.write_text(
        f"""
trust = ["{release.public}"]
device_type = "testboard"
state_dir = "{state}"
interface = "eth0"
channel = "{CHANNEL}"
source = [{sources}]
stall_timeout = 2
installer = "{installer}"
retry_max = 2
"""
    )


def send_garbage(host: Host) -> None:
    group = addressing.ssm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    done = host.run("python3", "-c", GARBAGE, group, "4242", host.address, str(GARBAGE_DATAGRAMS))
    assert done.returncode == 0, done.stderr


def test_watch_installs_releases_in_order_and_survives_replay_garbage_and_a_killed_sender(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)
    sender, device = net.hosts[0], net.hosts[2]
    www = tmp_path / "www"
    v1, v2 = release_pair(tmp_path, www)
    target = tmp_path / "slot.img"
    target.write_bytes(b"factory image")
    state = tmp_path / "state"
    config = tmp_path / "otacast.toml"
    write_config(config, v1, sender.address, state, f"file:{target}")
    try:
        mirror_context = services.nginx(sender, www, tmp_path / "nginx")
        mirror = mirror_context.__enter__()
    except services.ServiceMissing as exc:
        pytest.skip(str(exc))
    daemon = Daemon(device, config)
    senders: list[subprocess.Popen[str]] = []
    try:
        daemon.wait_for("watching")
        senders.append(serve(sender, v1, "--rate", "20M", "--duration", "120s"))
        first = daemon.wait_for("installed")
        assert first["sequence"] == 1
        assert target.read_bytes() == v1.image.read_bytes()
        # v1 keeps looping: the daemon's next turn refuses it (not newer than installed).
        daemon.wait_for("note", message=_refusal_of(1))
        send_garbage(sender)
        stop(senders)
        # v2, slowly; the sender dies after the first chunks and HTTP brings the rest.
        senders.append(serve(sender, v2, "--rate", "1M", "--no-gso", "--duration", "120s"))
        daemon.wait_for_progress(1)
        stop(senders)
        second = daemon.wait_for("installed")
        assert second["sequence"] == 2
        assert target.read_bytes() == v2.image.read_bytes()
        assert (tmp_path / "slot.img.previous").read_bytes() == v1.image.read_bytes()
        # v1 replayed on the channel: refused, nothing installed.
        senders.append(serve(sender, v1, "--rate", "20M", "--duration", "120s"))
        daemon.wait_for("note", message=_refusal_of(2, older=1))
        status = subprocess.run(
            [DEVICE, "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        stop(senders)
        code, err = daemon.terminate()
        mirror_context.__exit__(None, None, None)
    assert code == 0, err
    assert err == ""
    assert daemon.seen[-1]["event"] == "stopped"
    assert [e["sequence"] for e in daemon.seen if e["event"] == "installed"] == [1, 2]
    assert target.read_bytes() == v2.image.read_bytes()
    report = json.loads(status.stdout)
    assert report["installed"]["sequence"] == 2 and report["last_error"] is None
    assert report["activity"] == "waiting"  # the daemon was alive and listening
    finished = [e for e in daemon.seen if e["event"] == "finished"]
    assert [f["sequence"] for f in finished] == [1, 2]
    # The garbage was counted, not fatal; the HTTP mirror served only what multicast missed.
    rejected = sum(sum(f["rejected"].values()) for f in finished)  # type: ignore[union-attr, misc]
    assert rejected >= GARBAGE_DATAGRAMS // 2
    assert 0 < int(finished[1]["bytes_http"]) < 4 * MB  # type: ignore[call-overload]
    served = mirror.served()
    assert served and all(s.status == 206 for s in served)
    assert sum(s.bytes for s in served) == finished[1]["bytes_http"]


def _refusal_of(installed: int, older: int | None = None) -> str:
    """The note for the channel's release: the installed one is said to be that (no alarm on
    a healthy daemon's idle turns), an older one is a refusal."""
    if older is None:
        return f"heard the installed release on the channel (sequence {installed}): nothing newer"
    return (
        "refused a manifest on the channel: "
        f"manifest sequence {older} is not above the installed {installed}"
    )


def test_watch_retries_a_failing_installer_with_backoff_then_installs(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)
    sender, device = net.hosts[0], net.hosts[2]
    release = Release.make(tmp_path / "v1", 1 * MB, sequence=1)
    installed = tmp_path / "installed.img"
    script = tmp_path / "apply"
    # Fails the first time (as a full disk would), works the second.
    script.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{tmp_path}/tried" ]; then touch "{tmp_path}/tried"; '
        'echo "no space left on /data" >&2; exit 1; fi\n'
        f'cp "$1" "{installed}"\n'
    )
    script.chmod(0o755)
    config = tmp_path / "otacast.toml"
    write_config(config, release, sender.address, tmp_path / "state", f"command:{script}")
    tx = serve(sender, release, "--rate", "20M", "--duration", "120s")
    daemon = Daemon(device, config)
    try:
        error = daemon.wait_for("error")
        done = daemon.wait_for("installed")
    finally:
        stop([tx])
        code, err = daemon.terminate()
    assert "no space left on /data" in str(error["message"]) and error["retry_in"] == 2
    assert done["sequence"] == 1
    assert installed.read_bytes() == release.image.read_bytes()
    assert code == 0, err


def test_watch_installs_the_highest_sequence_served_on_its_channel_not_the_first_heard(
    lan: LanFactory, tmp_path: Path
) -> None:
    # One sender updated to sequence 7, another still serving 5.  The one with 5 repeats its
    # manifest ten times as often (its rate is 50 times higher), so it is nearly always heard
    # first: without the grace period the daemon installed 5, then 7 on its next turn.
    net = lan(3)
    old_host, new_host, device = net.hosts
    v5 = Release.make(tmp_path / "v5", 1 * MB, sequence=5)
    v7 = Release.make(tmp_path / "v7", 1 * MB, sequence=7, key_from=v5)
    target = tmp_path / "slot.img"
    config = tmp_path / "otacast.toml"
    write_config(
        config, v5, old_host.address, tmp_path / "state", f"file:{target}", new_host.address
    )
    senders = [
        serve(old_host, v5, "--rate", "50M", "--duration", "120s", ready=True),
        serve(new_host, v7, "--rate", "1M", "--duration", "120s", ready=True),
    ]
    daemon = Daemon(device, config)
    try:
        installed = daemon.wait_for("installed")
        # The next turn hears both again and refuses both: nothing newer than 7.
        daemon.wait_for("note", message=_refusal_of(7, older=5))
    finally:
        stop(senders)
        code, err = daemon.terminate()
    assert code == 0, err
    assert installed["sequence"] == 7
    assert [e["sequence"] for e in daemon.seen if e["event"] == "installed"] == [7]
    assert target.read_bytes() == v7.image.read_bytes()
