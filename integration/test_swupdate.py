"""The SWUpdate installers against the real ``swupdate`` (Debian 2022.12).

Each test builds CMS-signed ``.swu`` files the way a vendor would (``openssl cms -sign`` over
``sw-description``, ``cpio -H crc``) with one ``rawfile`` payload written to a path under
``tmp_path``, and starts its own daemon with ``TMPDIR`` in ``tmp_path`` so its control and
progress sockets (and its scripts and scratch space) are private to the test.  The daemon is
started with ``subprocess.Popen`` and terminated and reaped in teardown (PID 1 here does not reap).

The last test is the whole device path: a release whose image is the ``.swu`` is signed with
``otacast-signer``, sent over multicast in network namespaces, and ``otacast install
--installer swupdate:DIR`` receives it, verifies it and streams it into the daemon, which runs
outside the namespaces: AF_UNIX sockets are filesystem objects, reachable from any namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.plugin.errors import InstallError, InstallerUnavailable
from otacast.plugin.installers import get_installer
from otacast.plugin.installers.swupdate import ipc
from otacast.plugin.trust import load_trust
from otacast.plugin.verify import verify_manifest
from otacast.schemas.policy import VerifiedManifest

from .netns import LanFactory, stop
from .release import Release, install, serve

BOARD = "board:1.0"
# The daemon creates its sockets within a few hundred milliseconds; ten seconds means it failed.
START_TIMEOUT = 10.0


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the swupdate tests run as root (as the daemon does on a device)")
    for program, package in (("swupdate", "swupdate"), ("openssl", "openssl"), ("cpio", "cpio")):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (Debian package {package})")


@dataclass(frozen=True)
class Signer:
    cert: Path
    key: Path


def _run(*command: str | Path, cwd: Path | None = None, stdin: bytes | None = None) -> None:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, input=stdin, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr.decode(errors='replace')}")


def _signer(directory: Path, name: str) -> Signer:
    # P-256: SWUpdate's CMS verification takes it as it takes RSA, and it is much faster to make.
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _run(
        "openssl", "req", "-x509", "-new", "-key", key, "-out", cert, "-days", "30",
        "-subj", f"/CN={name}",
    )  # fmt: skip
    return Signer(cert, key)


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    """The key the device's swupdate trusts."""
    return _signer(tmp_path_factory.mktemp("vendor"), "vendor")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    """A key the device does not trust."""
    return _signer(tmp_path_factory.mktemp("stranger"), "stranger")


def make_swu(directory: Path, payload: bytes, target: Path, signer: Signer) -> Path:
    """A signed .swu whose rawfile handler writes `payload` to `target`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "payload.bin").write_bytes(payload)
    (directory / "sw-description").write_text(
        "software = {\n"
        '  version = "1.0.0"; description = "otacast test";\n'
        '  hardware-compatibility: [ "1.0" ];\n'
        "  files: ( {\n"
        f'    filename = "payload.bin"; path = "{target}";\n'
        f'    sha256 = "{hashlib.sha256(payload).hexdigest()}";\n'
        "  } );\n"
        "}\n"
    )
    _run(
        "openssl", "cms", "-sign", "-in", "sw-description", "-out", "sw-description.sig",
        "-signer", signer.cert, "-inkey", signer.key, "-outform", "DER", "-nosmimecap", "-binary",
        cwd=directory,
    )  # fmt: skip
    swu = directory / "update.swu"
    members = b"sw-description\nsw-description.sig\npayload.bin\n"
    with swu.open("wb") as out:
        done = subprocess.run(
            ["cpio", "-o", "-H", "crc"], cwd=directory, input=members, stdout=out,
            stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"cpio failed: {done.stderr.decode(errors='replace')}")
    swu.chmod(0o444)  # as otacast hands it over: read-only
    return swu


@dataclass
class Daemon:
    directory: Path
    process: subprocess.Popen[str]
    log: Path


@pytest.fixture
def daemon(tmp_path: Path, vendor: Signer) -> Iterator[Daemon]:
    run = tmp_path / "run"
    run.mkdir()
    log = tmp_path / "swupdate.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["swupdate", "-v", "-H", BOARD, "-k", str(vendor.cert)],
            env=dict(os.environ, TMPDIR=str(run)),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not all((run / name).exists() for name in ("sockinstctrl", "swupdateprog")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swupdate did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Daemon(run, process, log)
    finally:
        stop([process])


PAYLOAD = os.urandom(3_000_000)


def otacast_release(directory: Path, swu: Path) -> tuple[Release, VerifiedManifest]:
    """A release whose image is `swu`, signed with the otacast signer CLI, and its manifest as
    the device's verifier accepts it (what an installer is handed)."""
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "update.swu"
    shutil.copyfile(swu, image)
    release = Release.sign(image, sequence=7, extra=("--version", "2.1.0"))
    verified = verify_manifest(
        release.manifest.read_bytes(),
        load_trust([release.public], 1),
        now=time.time(),
        device_type="testboard",
        installed_sequence=None,
        channel=None,
    )
    return release, verified


@dataclass(frozen=True)
class Update:
    """A .swu whose payload goes to `target`, as an otacast release a device has verified."""

    swu: Path
    target: Path
    release: Release
    verified: VerifiedManifest


def make_update(tmp_path: Path, signer: Signer) -> Update:
    target = tmp_path / "slot" / "payload.bin"
    target.parent.mkdir(parents=True)
    swu = make_swu(tmp_path / "build", PAYLOAD, target, signer)
    release, verified = otacast_release(tmp_path / "release", swu)
    return Update(release.image, target, release, verified)


class Watcher:
    """A second progress client, read in a thread as it must be: the daemon writes every record
    to every client with blocking writes, so one that stops reading stalls the install."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(daemon.directory / "swupdateprog"))
        self.records: list[ipc.ProgressMsg] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        size = ipc.progress_msg_size()
        with self.sock:
            while not self.records or self.records[-1].status not in (
                ipc.RecoveryStatus.SUCCESS,
                ipc.RecoveryStatus.FAILURE,
            ):
                data = b""
                while len(data) < size:
                    chunk = self.sock.recv(size - len(data))
                    if not chunk:
                        return
                    data += chunk
                self.records.append(ipc.parse_progress_msg(data))

    def result(self) -> list[ipc.ProgressMsg]:
        self.thread.join(30)
        return self.records


def test_a_good_image_streamed_over_ipc_ends_in_success_with_the_payload_in_place(
    daemon: Daemon, vendor: Signer, tmp_path: Path
) -> None:
    update = make_update(tmp_path, vendor)
    before = update.swu.read_bytes()
    watcher = Watcher(daemon)
    result = get_installer(f"swupdate:{daemon.directory}").install(update.swu, update.verified)
    records = watcher.result()
    assert result.status == "installed"
    assert update.target.read_bytes() == PAYLOAD
    assert update.swu.read_bytes() == before
    # The daemon echoes the request's info in its START record: it got our REQ_INSTALL intact.
    start = records[0]
    assert (start.status_name, start.info, start.source) == ("START", "otacast update.swu 2.1.0", 4)
    assert [r.status_name for r in records][-1] == "SUCCESS"
    assert any(r.hnd_name == "rawfile" and r.cur_percent == 100 for r in records)


def test_an_image_signed_by_an_untrusted_key_ends_in_failure_with_swupdates_reason(
    daemon: Daemon, stranger: Signer, tmp_path: Path
) -> None:
    update = make_update(tmp_path, stranger)
    with pytest.raises(InstallError) as caught:
        get_installer(f"swupdate:{daemon.directory}").install(update.swu, update.verified)
    message = str(caught.value)
    assert message.startswith("swupdate reported FAILURE installing update.swu 2.1.0: ")
    assert "Authentication of all signatures failed" in message
    assert "\n" not in message
    assert not update.target.exists()


def test_consecutive_installs_on_one_daemon_each_get_their_own_verdict_and_reason(
    daemon: Daemon, vendor: Signer, stranger: Signer, tmp_path: Path
) -> None:
    # Each install leaves progress records and up to 100 cached log messages behind (the daemon
    # runs with -v); none of them may be taken for the next install's verdict or reason.
    good = make_update(tmp_path / "good", vendor)
    bad = make_update(tmp_path / "bad", stranger)
    installer = get_installer(f"swupdate:{daemon.directory}")
    for round_ in range(2):
        good.target.unlink(missing_ok=True)
        assert installer.install(good.swu, good.verified).status == "installed", round_
        assert good.target.read_bytes() == PAYLOAD
        with pytest.raises(InstallError, match="Authentication of all signatures failed"):
            installer.install(bad.swu, bad.verified)
        assert not bad.target.exists()


def test_no_daemon_is_an_error_naming_its_control_socket(vendor: Signer, tmp_path: Path) -> None:
    update = make_update(tmp_path, vendor)
    with pytest.raises(
        InstallerUnavailable, match=r"swupdate is not running: no control socket at .*/run/"
    ):
        get_installer(f"swupdate:{tmp_path / 'run'}").install(update.swu, update.verified)


def test_a_stopped_daemon_is_unavailable_47_and_a_refused_image_is_46(
    daemon: Daemon, vendor: Signer, stranger: Signer, tmp_path: Path
) -> None:
    # Scripts and `watch` retry the first later; the second needs another image.
    installer = get_installer(f"swupdate:{daemon.directory}")
    bad = make_update(tmp_path / "bad", stranger)
    with pytest.raises(InstallError) as refused:
        installer.install(bad.swu, bad.verified)
    stop([daemon.process])  # whatever it leaves behind (sockets or none), nobody answers
    good = make_update(tmp_path / "good", vendor)
    with pytest.raises(InstallerUnavailable, match=r"^swupdate is not running: ") as unavailable:
        installer.install(good.swu, good.verified)
    assert type(refused.value) is InstallError
    assert (refused.value.exit_code, unavailable.value.exit_code) == (46, 47)
    assert not good.target.exists()


def _recv_message(sock: socket.socket) -> ipc.IpcMessage:
    data = b""
    while len(data) < ipc.ipc_message_size():
        chunk = sock.recv(ipc.ipc_message_size() - len(data))
        assert chunk, "swupdate closed the connection"
        data += chunk
    return ipc.parse_ipc_message(data)


def _hold_a_started_install(directory: Path) -> tuple[socket.socket, socket.socket]:
    """An install that the daemon has started and that waits for image bytes we never send:
    its control connection and its notification subscription, both open.

    Started, not merely acknowledged: swupdate 2022.12 marks itself busy only when its installer
    thread wakes, so a second request just after the first ACK would be acknowledged too.  The
    START notification comes after that mark.  The subscription stays open with the install:
    closed early, the daemon may go on writing notifications to its descriptor, which the next
    connection (the installer's request) can reuse, and that request was then answered with a
    notification (seen once in about ten runs).
    """
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.settimeout(10)
    control.connect(str(directory / "sockinstctrl"))
    control.sendall(
        ipc.build_ipc_message(ipc.MsgType.REQ_INSTALL, ipc.InstallRequest(1000, "holder"))
    )
    assert _recv_message(control).type == ipc.MsgType.ACK
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    notify.settimeout(10)
    notify.connect(str(directory / "sockinstctrl"))
    notify.sendall(ipc.build_ipc_message(ipc.MsgType.NOTIFY_STREAM))
    assert _recv_message(notify).type == ipc.MsgType.ACK
    while _recv_message(notify).notify().status != ipc.RecoveryStatus.START:
        pass
    return control, notify


def test_a_busy_daemon_is_reported_and_the_next_install_after_it_succeeds(
    daemon: Daemon, vendor: Signer, tmp_path: Path
) -> None:
    update = make_update(tmp_path, vendor)
    installer = get_installer(f"swupdate:{daemon.directory}")
    holder, subscription = _hold_a_started_install(daemon.directory)
    with subscription:  # open until the daemon is done with us (see _hold_a_started_install)
        try:
            with pytest.raises(
                InstallerUnavailable, match=r"^swupdate is busy: Installation in progress$"
            ):
                installer.install(update.swu, update.verified)
        finally:
            holder.close()  # an empty image: that install fails and the daemon becomes idle
        deadline = time.monotonic() + 10
        while True:  # the daemon takes a moment to fail the held install
            try:
                result = installer.install(update.swu, update.verified)
                break
            except InstallError as exc:
                if "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    assert result.status == "installed"
    assert update.target.read_bytes() == PAYLOAD


@pytest.mark.parametrize("trusted", [True, False], ids=["good-image", "untrusted-key"])
def test_swupdate_run_installs_a_good_image_and_refuses_an_untrusted_one(
    trusted: bool, vendor: Signer, stranger: Signer, tmp_path: Path
) -> None:
    update = make_update(tmp_path, vendor if trusted else stranger)
    installer = get_installer(f"swupdate-run:-H {BOARD} -k {vendor.cert}")
    if trusted:
        assert installer.install(update.swu, update.verified).status == "installed"
        assert update.target.read_bytes() == PAYLOAD
    else:
        with pytest.raises(InstallError) as caught:
            installer.install(update.swu, update.verified)
        assert str(caught.value).startswith(
            "swupdate reported FAILURE installing update.swu 2.1.0: "
            "Authentication of all signatures failed"
        )
        assert not update.target.exists()


def test_swupdate_run_runs_the_post_update_command_after_a_success_only(
    vendor: Signer, stranger: Signer, tmp_path: Path
) -> None:
    marker = tmp_path / "post-update-ran"
    installer = get_installer(f"swupdate-run:-H {BOARD} -k {vendor.cert} -p 'touch {marker}'")
    bad = make_update(tmp_path / "bad", stranger)
    with pytest.raises(InstallError, match="Authentication of all signatures failed"):
        installer.install(bad.swu, bad.verified)
    assert not marker.exists()
    good = make_update(tmp_path / "good", vendor)
    assert installer.install(good.swu, good.verified).status == "installed"
    assert marker.exists()
    assert good.target.read_bytes() == PAYLOAD


def test_swupdate_run_with_an_unreadable_key_names_swupdates_complaint(
    vendor: Signer, tmp_path: Path
) -> None:
    update = make_update(tmp_path, vendor)
    installer = get_installer(f"swupdate-run:-H {BOARD} -k {tmp_path / 'missing.pem'}")
    with pytest.raises(InstallError, match=r"^swupdate .* exited: ") as caught:
        installer.install(update.swu, update.verified)
    assert "\n" not in str(caught.value)
    assert not update.target.exists()


def test_otacast_install_receives_a_swu_over_multicast_and_swupdate_installs_it(
    daemon: Daemon, vendor: Signer, lan: LanFactory, tmp_path: Path
) -> None:
    update = make_update(tmp_path, vendor)
    sender, receiver = lan(2).hosts
    tx = serve(sender, update.release, "--rate", "40M", "--duration", "120s")
    try:
        done = install(
            receiver,
            update.release,
            tmp_path / "state",
            tmp_path / "received.swu",
            f"swupdate:{daemon.directory}",
            "--source",
            sender.address,
            "--join-timeout",
            "5",
        )
    finally:
        stop([tx])
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout.splitlines()[-1])
    assert installed["event"] == "installed" and installed["status"] == "installed"
    assert installed["sequence"] == 7 and installed["version"] == "2.1.0"
    assert update.target.read_bytes() == PAYLOAD
