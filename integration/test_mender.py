"""otacast as Mender's delivery path, against the real ``mender`` client (standalone mode).

Each test is one device: its own Mender data directory (``-d``, holding ``device_type`` and
Mender's database), its own Mender config (``{}``, or ``ArtifactVerifyKey``), its own otacast
device config (handed to the module through ``OTACAST_CONFIG``, which Mender passes on), and a
``file:`` installer target.  ``mender`` itself runs inside the device's network namespace, so the
module it starts receives there: over real multicast from a sender in another namespace, or from
nginx when the release falls back to HTTP.  Artifacts are made with ``otacast-signer
mender-artifact`` (so by the real ``mender-artifact``).

The module is linked into ``/usr/share/mender/modules/v3/otacast`` with its own
``--install-module`` (Mender 3.4 looks only there) and ``/etc/mender/artifact_info`` is written
if missing (Mender refuses to start without it); both are put back as they were afterwards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otacast.plugin.installed import read_installed

from . import services
from .netns import BIN, Host, Lan, LanFactory, stop
from .release import SIGNER, Release, publish, serve

MODULE = BIN / "otacast-mender-module"
MODULE_LINK = Path("/usr/share/mender/modules/v3/otacast")
ARTIFACT_INFO = Path("/etc/mender/artifact_info")
# Two 1 MiB chunks, the second short: small enough for seconds per test, two chunks so the
# image is assembled, not copied whole.
IMAGE_SIZE = 1_500_000
PORT = 8080
FACTORY = b"factory image\n"
PROXIES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

# Every test is a device on a LAN of two hosts, `lan(2)`: the real client must be ready first.
pytestmark = pytest.mark.usefixtures("mender_ready")


@pytest.fixture(scope="module")
def mender_ready() -> Iterator[None]:
    """The real client and tool, our module linked in, and the artifact_info Mender requires."""
    if os.geteuid() != 0:
        pytest.skip("the Mender module is installed and run as root")
    for tool, package in (("mender", "mender-client"), ("mender-artifact", "mender-artifact")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package})")
    if not MODULE_LINK.parent.is_dir():
        pytest.skip(f"{MODULE_LINK.parent} does not exist (mender-client incomplete)")
    created_info = not ARTIFACT_INFO.exists()
    if created_info:
        ARTIFACT_INFO.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT_INFO.write_text("artifact_name=factory-0\n")
    previous_link = MODULE_LINK.readlink() if MODULE_LINK.is_symlink() else None
    try:
        done = subprocess.run(
            [str(MODULE), "--install-module"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert MODULE_LINK.resolve() == MODULE.resolve()
        yield
    finally:
        if previous_link is None:
            MODULE_LINK.unlink(missing_ok=True)
        else:
            tmp = MODULE_LINK.with_name(".otacast.test")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(previous_link)
            tmp.replace(MODULE_LINK)
        if created_info:
            ARTIFACT_INFO.unlink(missing_ok=True)


class Device:
    """One Mender device in a namespace host, with otacast as its delivery path."""

    def __init__(self, host: Host, root: Path, mender_type: str = "testboard") -> None:
        self.host = host
        self.root = root
        self.data = root / "mender-data"  # mender -d: device_type, Mender's database
        self.mender_conf = root / "mender.conf"
        self.config = root / "otacast.toml"
        self.state = root / "state"
        self.staging = self.state / "mender"
        self.target = root / "slot.img"
        self.data.mkdir(parents=True)
        (self.data / "device_type").write_text(f"device_type={mender_type}\n")
        self.mender_conf.write_text("{}\n")
        self.target.write_bytes(FACTORY)

    def configure(self, release: Release, **settings: object) -> None:
        values: dict[str, object] = {
            "trust": [str(release.public)],
            "device_type": "testboard",
            "state_dir": str(self.state),
            "interface": "eth0",
            "join_timeout": 5,
            "stall_timeout": 5,
            "installer": f"file:{self.target}",
        }
        values.update(settings)
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
        self.config.write_text("\n".join(lines) + "\n")

    def mender(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        """Run the real client; its exit status and everything it printed (logs included)."""
        done = self.run_mender(*args, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def run_mender(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if k not in PROXIES}
        environment["OTACAST_CONFIG"] = str(self.config)
        return subprocess.run(
            self.host.command(
                "mender",
                "-c",
                str(self.mender_conf),
                "-b",
                str(self.root / "no-fallback.conf"),  # missing on purpose: no fallback config
                "-d",
                str(self.data),
                "--no-syslog",
                *args,
            ),
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def show_artifact(self) -> str:
        done = self.run_mender("show-artifact")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def untouched(self, artifact_before: str, installed_sequence: int | None = None) -> None:
        """Nothing changed: Mender's artifact, the target, otacast's record; nothing staged."""
        assert self.show_artifact() == artifact_before
        assert self.target.read_bytes() == FACTORY
        assert not self.staging.exists()
        installed = read_installed(self.state)
        assert (installed.sequence if installed else None) == installed_sequence


def make_release(directory: Path, *, sequence: int = 3, mirror: Host | None = None) -> Release:
    url = f"http://[{mirror.address}]:{PORT}/rel/rootfs.img" if mirror else None
    # Several chunks (the failure test counts the chunks it could not fetch).
    release = Release.make(directory, IMAGE_SIZE, sequence=sequence, http_url=url, chunk="1M")
    publish(release, directory / "www")
    return release


def artifact(release: Release, name: str, *args: str) -> Path:
    out = release.directory / name
    done = subprocess.run(
        [SIGNER, "mender-artifact", str(release.manifest), "-o", str(out), "--force", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


def receiving_device(lan: Lan, tmp_path: Path, **settings: object) -> tuple[Host, Release, Device]:
    """A release (sequence 3) and a device set to receive it from the LAN's first host."""
    sender, host = lan.hosts
    release = make_release(tmp_path / "release")
    device = Device(host, tmp_path / "device")
    device.configure(release, source=[sender.address], **settings)
    return sender, release, device


def install_with_sender(device: Device, sender: Host, release: Release) -> tuple[int, str]:
    """`mender install` of the release's artifact while `sender` loops the image."""
    tx = serve(sender, release, "--rate", "20M", ready=True)
    try:
        return device.mender("install", str(artifact(release, "r3.mender")))
    finally:
        stop([tx])


@pytest.fixture
def nginx_or_skip() -> None:
    if shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        pytest.skip("nginx is not installed")


def ec_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-256 key pair as mender-artifact and the client read them (SEC1 / PKIX PEM)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    secret, public = directory / f"{name}.key", directory / f"{name}.pub"
    for command in (
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(secret)],
        ["openssl", "ec", "-in", str(secret), "-pubout", "-out", str(public)],
    ):
        subprocess.run(command, check=True, capture_output=True)
    return secret, public


def module_failed(output: str, code: int) -> bool:
    return f"Update module terminated abnormally: exit status {code}" in output


def test_install_then_commit_puts_the_multicast_image_in_place_and_both_records_follow(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    sender, release, device = receiving_device(net, tmp_path)
    before = device.show_artifact()
    code, output = install_with_sender(device, sender, release)
    assert code == 0, output
    assert "HTTP 0," in output  # the module's summary: every byte came over multicast
    assert device.target.read_bytes() == release.image.read_bytes()
    assert read_installed(device.state) is None  # not before Mender commits

    code, output = device.mender("commit")
    assert code == 0, output
    assert device.show_artifact() == "rootfs.img-3" != before
    installed = read_installed(device.state)
    assert installed is not None
    assert (installed.sequence, installed.status) == (3, "installed")
    assert not device.staging.exists()  # Cleanup ran
    assert not device.target.with_name("slot.img.previous").exists()  # committed for good


def test_rollback_after_install_restores_the_previous_content_and_records_nothing(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    sender, release, device = receiving_device(net, tmp_path)
    before = device.show_artifact()
    code, output = install_with_sender(device, sender, release)
    assert code == 0, output
    assert device.target.read_bytes() == release.image.read_bytes()

    code, output = device.mender("rollback")
    assert code == 0, output
    assert device.target.read_bytes() == FACTORY
    assert device.show_artifact() == before
    assert read_installed(device.state) is None
    assert not device.staging.exists()


def test_a_download_that_gets_no_image_fails_with_its_reason_and_leaves_the_device_as_it_was(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    # No sender, and the manifest's only mirror does not answer (nothing listens on it).
    sender, host = net.hosts
    release = make_release(tmp_path / "release", mirror=sender)
    device = Device(host, tmp_path / "device")
    device.configure(release, source=[sender.address], join_timeout=1, stall_timeout=1)
    before = device.show_artifact()
    code, output = device.mender("install", str(artifact(release, "r3.mender")))
    assert code != 0, output
    assert "Download failed" in output
    assert module_failed(output, 45)  # IncompleteError
    assert "otacast-mender-module: error: 2 chunk(s) could not be fetched" in output
    device.untouched(before)


def test_with_no_sender_and_no_mirror_download_fails_within_seconds_saying_so(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    # Joined to a sender that never sends, and the manifest lists no mirror: without the fail-
    # fast, Download listens until Mender's module timeout (4 hours; this test's 60 s).
    sender, host = net.hosts
    release = make_release(tmp_path / "release")
    device = Device(host, tmp_path / "device")
    device.configure(release, source=[sender.address], join_timeout=2)
    before = device.show_artifact()
    started = time.monotonic()
    code, output = device.mender("install", str(artifact(release, "r3.mender")), timeout=60)
    elapsed = time.monotonic() - started
    assert code != 0, output
    assert "Download failed" in output
    assert module_failed(output, 45)  # IncompleteError
    assert (
        "otacast-mender-module: error: nothing heard on the channel within 2 s and the "
        "manifest lists no HTTP mirror: start a sender" in output
    )
    # The join timeout, plus Mender's own start-up and states (measured: about 3 s in all).
    assert elapsed < 2 + 15, elapsed
    device.untouched(before)


REFUSALS = {
    # case: (Mender's device type, settings, installed sequence, exit status, reason)
    "config-device-type": (
        "testboard",
        {"device_type": "otherboard"},
        None,
        28,
        "device type 'otherboard' is not among testboard",
    ),
    "mender-device-type": (
        "otherboard",
        {},
        None,
        28,
        "device type 'otherboard' (from Mender) is not among testboard",
    ),
    "older-sequence": (
        "testboard",
        {},
        5,
        27,
        "manifest sequence 3 is not above the installed 5",
    ),
}


@pytest.mark.usefixtures("nginx_or_skip")
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_release_the_device_must_refuse_is_refused_before_anything_is_downloaded(
    lan: LanFactory, tmp_path: Path, case: str
) -> None:
    net = lan(2)
    mender_type, settings, installed, exit_status, reason = REFUSALS[case]
    mirror, host = net.hosts
    release = make_release(tmp_path / "release", mirror=mirror)
    device = Device(host, tmp_path / "device", mender_type=mender_type)
    # HTTP only: a download would be an nginx request at once, with nothing to wait for first.
    device.configure(release, fallback="only", **settings)
    if installed is not None:
        device.state.mkdir()
        (device.state / "installed.json").write_text(
            json.dumps(
                {"sequence": installed, "name": "r", "version": "5", "sha256": "00" * 32}
                | {"status": "installed"}
            )
        )
    before = device.show_artifact()
    # The artifact names Mender's type, so Mender accepts it and the module has to decide.
    mender_artifact = artifact(release, "r3.mender", "--device-type", mender_type)
    with services.nginx(mirror, tmp_path / "release" / "www", tmp_path / "nginx", PORT) as nginx:
        code, output = device.mender("install", str(mender_artifact))
    assert code != 0, output
    assert module_failed(output, exit_status)
    assert f"otacast-mender-module: error: {reason}" in output
    assert nginx.served() == []
    device.untouched(before, installed)
    # No staging either: only what the device already had is in its state directory.
    assert {p.name for p in device.state.iterdir()} <= {"installed.json", "status.json"}


@pytest.mark.usefixtures("nginx_or_skip")
def test_an_ecdsa_signed_artifact_verified_by_mender_installs_from_the_mirror_when_no_one_sends(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    mirror, host = net.hosts
    release = make_release(tmp_path / "release", mirror=mirror)
    secret, public = ec_key(tmp_path, "mender")
    signed = artifact(release, "signed.mender", "--key", str(secret))
    device = Device(host, tmp_path / "device")
    device.mender_conf.write_text(json.dumps({"ArtifactVerifyKey": str(public)}))
    # Joined to the (silent) sender's group, the module gives up on multicast after 1 s.
    device.configure(release, source=[mirror.address], join_timeout=1, stall_timeout=1)
    with services.nginx(mirror, tmp_path / "release" / "www", tmp_path / "nginx", PORT) as nginx:
        code, output = device.mender("install", str(signed))
        assert code == 0, output
        assert {s.status for s in nginx.served()} == {206}
    code, output = device.mender("commit")
    assert code == 0, output
    assert device.target.read_bytes() == release.image.read_bytes()
    assert device.show_artifact() == "rootfs.img-3"


def swap_header(signed: Path, other: Path, out: Path) -> None:
    """`signed` with its header (meta-data: the manifest) taken from `other`, signature kept."""
    with tarfile.open(other) as source:
        header = source.extractfile("header.tar.gz")
        assert header is not None
        replacement = header.read()
    with tarfile.open(signed) as source, tarfile.open(out, "w") as sink:
        for member in source.getmembers():
            data = source.extractfile(member)
            assert data is not None
            content = replacement if member.name == "header.tar.gz" else data.read()
            member.size = len(content)
            sink.addfile(member, io.BytesIO(content))


MENDER_REFUSALS = {
    "unsigned": "expecting signed artifact, but no signature file found",
    "signed-by-another-key": "invalid signature",
    "header-swapped": "invalid checksum",
}


@pytest.mark.parametrize("case", sorted(MENDER_REFUSALS))
def test_mender_refuses_an_unsigned_or_altered_artifact_before_the_module_runs(
    lan: LanFactory, tmp_path: Path, case: str
) -> None:
    net = lan(2)
    _, host = net.hosts
    release = make_release(tmp_path / "release")
    secret, public = ec_key(tmp_path, "mender")
    device = Device(host, tmp_path / "device")
    device.mender_conf.write_text(json.dumps({"ArtifactVerifyKey": str(public)}))
    device.configure(release, fallback="only")
    if case == "unsigned":
        bad = artifact(release, "unsigned.mender")
    elif case == "signed-by-another-key":
        other, _ = ec_key(tmp_path, "attacker")
        bad = artifact(release, "other.mender", "--key", str(other))
    else:
        signed = artifact(release, "signed.mender", "--key", str(secret))
        newer = Release.make(tmp_path / "newer", IMAGE_SIZE, sequence=9, key_from=release)
        swap_header(signed, artifact(newer, "newer.mender"), tmp_path / "swapped.mender")
        bad = tmp_path / "swapped.mender"
    before = device.show_artifact()
    code, output = device.mender("install", str(bad))
    assert code != 0, output
    assert MENDER_REFUSALS[case] in output
    assert "Output (" not in output  # the module never ran, so it printed nothing
    device.untouched(before)
    assert not device.state.exists()


def test_a_command_installer_needing_a_reboot_is_committed_at_once_and_mender_asks_to_reboot(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    script = tmp_path / "apply"
    sender, release, device = receiving_device(net, tmp_path, installer=f"command:{script}")
    script.write_text(f'#!/bin/sh\ncp "$1" {device.target}\nexit 3\n')  # 3: active after reboot
    script.chmod(0o755)
    code, output = install_with_sender(device, sender, release)
    assert code == 0, output
    # SupportsRollback said No (a command cannot be undone), so Mender commits at once, and
    # NeedsArtifactReboot said Automatic: Mender itself asks for the reboot.
    assert "Artifact doesn't support rollback. Committing immediately." in output
    assert "At least one payload requested a reboot of the device it updated." in output
    assert device.show_artifact() == "rootfs.img-3"
    installed = read_installed(device.state)
    assert installed is not None
    assert (installed.sequence, installed.status) == (3, "needs-reboot")
    assert device.target.read_bytes() == release.image.read_bytes()


def test_a_failed_file_install_is_rolled_back_by_mender_and_leaves_everything_as_it_was(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    sender, release, device = receiving_device(net, tmp_path)
    # A directory where the file installer keeps the previous content: the install fails
    # after Download, once Mender has heard SupportsRollback say Yes.
    device.target.with_name("slot.img.previous").mkdir()
    before = device.show_artifact()
    code, output = install_with_sender(device, sender, release)
    assert code != 0, output
    assert "Installation failed: Update module terminated abnormally: exit status 46" in output
    assert "otacast-mender-module: error: cannot install to" in output
    assert "nothing was installed: nothing to roll back" in output  # ArtifactRollback ran
    device.untouched(before)


def test_a_failed_command_install_cannot_be_rolled_back_and_mender_marks_it_inconsistent(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    script = tmp_path / "apply"
    sender, release, device = receiving_device(net, tmp_path, installer=f"command:{script}")
    script.write_text("#!/bin/sh\necho 'no space left on the slot' >&2\nexit 1\n")
    script.chmod(0o755)
    code, output = install_with_sender(device, sender, release)
    assert code != 0, output
    assert "Installation failed: Update module terminated abnormally: exit status 46" in output
    assert "failed: no space left on the slot" in output
    # SupportsRollback said No (a program's effects cannot be undone), so Mender can only say
    # it does not know what is installed now; otacast recorded nothing.
    assert device.show_artifact() == "rootfs.img-3_INCONSISTENT"
    assert read_installed(device.state) is None
    assert not device.staging.exists()
