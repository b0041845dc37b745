"""Installers (file, command), their selection, and the installed-release record."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from otacast.plugin.deliver import choose_installer, deliver, record_installed
from otacast.plugin.errors import InstallError, StateError, UsageError
from otacast.plugin.installed import read_installed, write_installed
from otacast.plugin.installers import Installer, InstallResult, get_installer
from otacast.plugin.installers.command import CommandInstaller
from otacast.plugin.installers.file import FileInstaller, check_out
from otacast.plugin.status import StatusFile, read_status
from otacast.schemas.policy import VerifiedManifest
from otacast.signer.keys import SigningKey

from .helpers import make_release, read_only_file, shell_script

KEY = SigningKey(b"\x08" * 32)
IMAGE = random.Random(3).randbytes(70_000)


def verified(sequence: int = 5) -> VerifiedManifest:
    return make_release(IMAGE, KEY, sequence=sequence).verified()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return read_only_file(tmp_path / "image.bin", IMAGE)


def test_file_install_replaces_the_target_and_rollback_restores_the_previous(
    tmp_path: Path, image: Path
) -> None:
    target = tmp_path / "slot.img"
    target.write_bytes(b"old release")
    installer = get_installer(f"file:{target}")
    assert installer.install(image, verified()).status == "installed"
    assert target.read_bytes() == IMAGE
    installer.rollback()
    assert target.read_bytes() == b"old release"


def test_file_commit_drops_what_rollback_would_restore(tmp_path: Path, image: Path) -> None:
    target = tmp_path / "slot.img"
    target.write_bytes(b"old release")
    installer = FileInstaller(target)
    installer.install(image, verified())
    installer.commit()
    with pytest.raises(InstallError, match="nothing to roll back"):
        installer.rollback()
    assert target.read_bytes() == IMAGE


def test_file_install_into_a_missing_directory_is_a_clear_error(
    image: Path, tmp_path: Path
) -> None:
    with pytest.raises(InstallError, match="cannot install to"):
        FileInstaller(tmp_path / "missing" / "slot.img").install(image, verified())


def test_command_gets_the_image_path_and_the_release_in_its_environment(
    tmp_path: Path, image: Path
) -> None:
    log = tmp_path / "seen"
    script = shell_script(
        tmp_path / "apply.sh", f'echo "$OTACAST_SEQUENCE $OTACAST_SHA256 $1" > {log}\necho ok\n'
    )
    result = CommandInstaller(str(script)).install(image, verified(sequence=9))
    assert result.status == "installed" and result.detail == "ok"
    sequence, sha, path = log.read_text().split()
    assert sequence == "9" and path == str(image)
    assert sha == verified().manifest.image.sha256.hex()


def test_command_exit_3_means_installed_after_a_reboot(tmp_path: Path, image: Path) -> None:
    assert (
        CommandInstaller(str(shell_script(tmp_path / "apply.sh", "exit 3\n")))
        .install(image, verified())
        .status
        == "needs-reboot"
    )


def test_command_failure_reports_its_last_error_line(tmp_path: Path, image: Path) -> None:
    script = shell_script(
        tmp_path / "apply.sh", "echo starting >&2\necho 'partition is busy' >&2\nexit 1\n"
    )
    with pytest.raises(InstallError, match="failed: partition is busy"):
        CommandInstaller(str(script)).install(image, verified())


def test_command_that_hangs_is_stopped(tmp_path: Path, image: Path) -> None:
    with pytest.raises(InstallError, match="did not finish"):
        CommandInstaller(
            str(shell_script(tmp_path / "apply.sh", "sleep 10\n")), timeout=0.5
        ).install(image, verified())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("file", "KIND:ARGUMENT"),
        ("tape:/dev/st0", "unknown installer kind"),
        ("command:/nonexistent/apply", "not found"),
        ("command:'unclosed", "No closing quotation"),
    ],
)
def test_bad_installer_specs_are_one_line_errors(spec: str, message: str, image: Path) -> None:
    with pytest.raises(InstallError, match=message):
        get_installer(spec).install(image, verified())


def test_the_installed_record_round_trips_and_a_damaged_one_is_an_error(tmp_path: Path) -> None:
    assert read_installed(tmp_path) is None
    write_installed(tmp_path, verified(sequence=12), "installed")
    record = read_installed(tmp_path)
    assert record is not None and record.sequence == 12 and record.status == "installed"
    (tmp_path / "installed.json").write_text('{"sequence": "12"}')
    with pytest.raises(StateError, match="not a valid installed record"):
        read_installed(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["installed.json"]


def test_a_device_node_target_is_refused_for_the_file_installer() -> None:
    # Renaming over /dev/null would replace the node, not write the partition behind it.
    with pytest.raises(InstallError, match="must be a regular file"):
        FileInstaller(Path("/dev/null"))


def test_a_script_that_cannot_be_executed_is_a_one_line_error(tmp_path: Path, image: Path) -> None:
    script = tmp_path / "no-shebang"
    script.write_text("echo hello\n")
    script.chmod(0o755)
    with pytest.raises(InstallError, match="cannot run installer"):
        CommandInstaller(str(script)).install(image, verified())


# --- The one install path (plugin/deliver.py) and the file installer's path checks -------------


def test_deliver_installs_records_and_clears_the_status(tmp_path: Path, image: Path) -> None:
    target, state = tmp_path / "slot.img", tmp_path / "state"
    status = StatusFile(state)
    status.failed("FetchError: an earlier run")
    delivery = deliver(
        get_installer(f"file:{target}"), image, verified(7), state_dir=state, status=status
    )
    assert target.read_bytes() == IMAGE
    record = read_installed(state)
    assert record is not None and record == delivery.record and record.sequence == 7
    assert delivery.summary().startswith("installed demo-image 1.0.7 (sequence 7): installed; ")
    after = read_status(state)
    assert after is not None and after.activity == "idle" and after.last_error is None


def test_deliver_without_record_leaves_the_floor_to_a_later_commit(
    tmp_path: Path, image: Path
) -> None:
    state = tmp_path / "state"
    status = StatusFile(state)
    installer = get_installer(f"file:{tmp_path / 'slot.img'}")
    delivery = deliver(installer, image, verified(), state_dir=state, status=status, record=False)
    assert delivery.record is None and read_installed(state) is None
    after = read_status(state)
    assert after is not None and after.activity == "idle" and after.release == "demo-image 1.0.5"
    record_installed(state, verified(), delivery.result.status, status)
    assert read_installed(state) is not None
    after = read_status(state)
    assert after is not None and after.release is None


class _Odd(Installer):
    kind = "odd"

    def install(self, image: Path, verified: VerifiedManifest) -> InstallResult:
        return InstallResult("maybe")


@pytest.mark.parametrize("keep_staged", [False, True])
def test_deliver_removes_the_received_image_after_a_recorded_install_unless_kept(
    tmp_path: Path, image: Path, keep_staged: bool
) -> None:
    state = tmp_path / "state"
    target = tmp_path / "slot.img"
    deliver(
        get_installer(f"file:{target}"),
        image,
        verified(),
        state_dir=state,
        status=StatusFile(state),
        keep_staged=keep_staged,
    )
    assert target.read_bytes() == IMAGE and read_installed(state) is not None
    assert image.exists() == keep_staged


@pytest.mark.parametrize("installer", [CommandInstaller("/bin/false"), _Odd()])
def test_a_failed_install_keeps_the_received_image_for_the_next_attempt(
    tmp_path: Path, image: Path, installer: Installer
) -> None:
    state = tmp_path / "state"
    with pytest.raises(InstallError):
        deliver(
            installer,
            image,
            verified(),
            state_dir=state,
            status=StatusFile(state),
            keep_staged=False,
        )
    assert image.read_bytes() == IMAGE


@pytest.mark.parametrize("installer", [CommandInstaller("/bin/false"), _Odd()])
def test_deliver_reports_a_failed_install_and_records_nothing(
    tmp_path: Path, image: Path, installer: Installer
) -> None:
    state = tmp_path / "state"
    with pytest.raises(InstallError):
        deliver(installer, image, verified(), state_dir=state, status=StatusFile(state))
    assert read_installed(state) is None
    after = read_status(state)
    assert after is not None and after.activity == "idle"
    assert after.last_error is not None and after.last_error.startswith("InstallError: ")


def test_installer_choice_refuses_paths_the_file_installer_would_collide_with(
    tmp_path: Path,
) -> None:
    target = tmp_path / "slot.img"
    with pytest.raises(UsageError, match="no installer here"):
        choose_installer(None, tmp_path / "x", missing="no installer here")
    for out in (target, tmp_path / "slot.img.previous"):
        with pytest.raises(UsageError, match="must differ"):
            choose_installer(f"file:{target}", out, missing="")
    with pytest.raises(UsageError, match="must lie outside"):
        choose_installer(f"file:{target}", tmp_path / "image", missing="", scratch=tmp_path)
    choose_installer("command:/bin/true", target, missing="", scratch=tmp_path)  # writes nothing
    with pytest.raises(UsageError, match="must name a file"):
        check_out(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        check_out(tmp_path / "absent" / "image")
    check_out(tmp_path / "state" / "received.img", make_parent=True)
    assert (tmp_path / "state").is_dir()
