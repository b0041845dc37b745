"""Installers (file, command), their selection, and the installed-release record."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from otacast.plugin.errors import InstallError, StateError
from otacast.plugin.installed import read_installed, write_installed
from otacast.plugin.installers import get_installer
from otacast.plugin.installers.command import CommandInstaller
from otacast.plugin.installers.file import FileInstaller
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
