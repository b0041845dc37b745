"""The Mender update module's pure parts and its refusals, without Mender or a network.

The module is driven in-process through `main`, the way Mender runs it (``STATE FILE_TREE``),
on file trees laid out like Mender's; the full flow against the real client is in
``integration/test_mender.py``.  Also: `otacast-signer mender-artifact`'s refusals that need no
mender-artifact, and that both sides agree on the payload type and meta-data key.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from otacast.plugin.errors import StateError, UsageError
from otacast.plugin.installers.command import CommandInstaller
from otacast.plugin.installers.file import FileInstaller
from otacast.plugin.mender import deployment, layout
from otacast.plugin.mender.deployment import Deployment
from otacast.plugin.mender.main import install_module, main
from otacast.plugin.mender.meta import decode_meta_data
from otacast.schemas.errors import KeyFormatError, MalformedManifest, ManifestTooLarge
from otacast.schemas.keyfile import format_public, format_secret
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.signer import cli as signer_cli
from otacast.signer import mender_artifact
from otacast.signer.errors import MenderArtifactError
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import manifest_for

KEY = SigningKey(b"\x0b" * 32)
IMAGE = random.Random(5).randbytes(100_000)
MANIFEST = sign(manifest_for(IMAGE, sequence=4), [KEY]).to_file_bytes()


def meta(manifest: bytes = MANIFEST) -> bytes:
    return mender_artifact.meta_data(manifest)


def make_tree(root: Path, meta_data: bytes, device_type: str = "raspberrypi4") -> Path:
    """A file tree as Mender 3.4 lays it out for the Download state."""
    tree = root / "tree"
    (tree / "header").mkdir(parents=True)
    (tree / "tmp").mkdir()
    (tree / "version").write_text("3")
    (tree / "current_artifact_name").write_text("factory-0\n")
    (tree / "current_device_type").write_text(device_type + "\n")
    (tree / "header" / "artifact_name").write_text("demo-image-1.0.4\n")
    (tree / "header" / "payload_type").write_text("otacast\n")
    (tree / "header" / "meta-data").write_bytes(meta_data)
    return tree


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A device config (via $OTACAST_CONFIG, as Mender passes it on) with a file installer."""
    (tmp_path / "release.pub").write_text(format_public(KEY.public))
    (tmp_path / "slot.img").write_bytes(b"old")
    config = tmp_path / "otacast.toml"
    config.write_text(
        f'trust = ["release.pub"]\nstate_dir = "state"\nfallback = "only"\n'
        f'installer = "file:{tmp_path / "slot.img"}"\n'
    )
    monkeypatch.setenv("OTACAST_CONFIG", str(config))
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("otacast-mender-module: error: "), err
    return lines[0]


# --- meta-data: untrusted bytes from the artifact --------------------------------------------


def test_meta_data_made_by_the_signer_decodes_to_the_exact_manifest_bytes() -> None:
    assert decode_meta_data(meta()) == MANIFEST


def test_both_sides_agree_on_the_payload_type_and_the_meta_data_key() -> None:
    assert layout.PAYLOAD_TYPE == mender_artifact.PAYLOAD_TYPE == "otacast"
    assert layout.META_DATA_KEY == mender_artifact.META_DATA_KEY


def test_the_largest_manifest_fits_the_meta_data_bound() -> None:
    largest = meta(b"x" * MAX_MANIFEST_BYTES)
    assert len(largest) <= layout.MAX_META_DATA_BYTES
    assert len(decode_meta_data(largest)) == MAX_MANIFEST_BYTES


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe not json", "is not JSON"),
        (b"{", "is not JSON"),
        (b"[" * 100_000, "is not JSON"),  # nesting deep enough to blow the recursion limit
        (b"null", "has no meta-data"),  # what mender-artifact writes without -m
        (b'["otacast_manifest"]', "is not a JSON object"),
        (b'{"manifest": "e30="}', "has no 'otacast_manifest'"),
        (b'{"otacast_manifest": "e30=", "url": "http://x"}', "unexpected keys: url"),
        (b'{"otacast_manifest": 7}', "is not a string"),
        (b'{"otacast_manifest": "not base64!"}', "is not base64"),
        (b'{"otacast_manifest": "e30"}', "is not base64"),  # missing padding
        (b'{"otacast_manifest": ""}', "is empty"),
    ],
)
def test_hostile_meta_data_is_refused_as_a_malformed_manifest(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedManifest, match=reason):
        decode_meta_data(data)


def test_oversize_meta_data_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ManifestTooLarge, match="larger than"):
        decode_meta_data(b" " * (layout.MAX_META_DATA_BYTES + 1))


def test_oversize_meta_data_in_the_tree_fails_download_as_too_large(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    tree = make_tree(device, b" " * (layout.MAX_META_DATA_BYTES + 1))
    code, _, err = run(capsys, "Download", tree)
    assert code == ManifestTooLarge.exit_code
    assert "larger than" in one_error_line(err)


def test_a_base64_string_longer_than_any_manifest_is_refused_before_decoding() -> None:
    data = json.dumps({"otacast_manifest": "A" * (layout.MAX_BASE64_CHARS + 4)}).encode()
    assert len(data) <= layout.MAX_META_DATA_BYTES  # so the string's own bound is what refuses
    with pytest.raises(ManifestTooLarge, match="exceeds"):
        decode_meta_data(data)


# --- States ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    ["ArtifactReboot", "ArtifactVerifyReboot", "SupportsAugmentedArtifacts", "NewInV9", ""],
)
def test_unknown_states_print_nothing_and_succeed_without_reading_anything(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    state: str,
) -> None:
    monkeypatch.setenv("OTACAST_CONFIG", str(tmp_path / "missing.toml"))
    assert run(capsys, state, tmp_path / "no-such-tree") == (0, "", "")


def test_wrong_arguments_are_a_usage_error_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "Download")
    assert code == UsageError.exit_code and out == ""
    assert "STATE FILE_TREE" in one_error_line(err)


def test_a_relative_or_missing_tree_is_refused(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    code, _, err = run(capsys, "Download", "tree")
    assert code == UsageError.exit_code
    assert "not a Mender file tree" in one_error_line(err)


def test_hostile_meta_data_fails_download_in_one_line_and_stages_nothing(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    tree = make_tree(device, b'{"otacast_manifest": "%%%"}')
    code, out, err = run(capsys, "Download", tree)
    assert code == MalformedManifest.exit_code and out == ""
    assert "is not base64" in one_error_line(err)
    assert not (device / "state" / "mender").exists()
    # The failure is left for `otacast status`.
    status = json.loads((device / "state" / "status.json").read_text())
    assert "is not base64" in status["last_error"]


def test_download_without_any_device_type_is_refused_before_anything_is_staged(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    # Neither the config nor Mender names this device's type: verification would accept a
    # release for any device, so the module refuses rather than fail open (issue 13, item 7).
    tree = make_tree(device, meta())
    (tree / "current_device_type").unlink()
    code, out, err = run(capsys, "Download", tree)
    assert code == UsageError.exit_code and out == ""
    assert "no device type: set device_type in the device config or in Mender's" in (
        one_error_line(err)
    )
    assert not (device / "state" / "mender").exists()
    assert (device / "slot.img").read_bytes() == b"old"


def test_artifact_install_without_a_download_is_a_state_error(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    code, _, err = run(capsys, "ArtifactInstall", make_tree(device, meta()))
    assert code == StateError.exit_code
    assert "nothing was downloaded" in one_error_line(err)


def test_rollback_without_an_install_does_nothing_and_succeeds(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    code, out, _ = run(capsys, "ArtifactRollback", make_tree(device, meta()))
    assert code == 0 and "nothing to roll back" in out
    assert (device / "slot.img").read_bytes() == b"old"


def test_a_damaged_module_state_record_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    for text in (
        "{",
        "[]",
        '{"artifact_name": "a"}',
        '{"artifact_name": "a", "sequence": true, "verified_at": 1}',
    ):
        (tmp_path / "state.json").write_text(text)
        with pytest.raises(StateError, match="not a module state record"):
            deployment.read_deployment(tmp_path / "state.json")
    assert deployment.read_deployment(tmp_path / "absent.json") is None


# --- Queries --------------------------------------------------------------------------------


def test_supports_rollback_answers_yes_only_when_there_is_something_to_go_back_to(
    tmp_path: Path,
) -> None:
    target = tmp_path / "slot.img"
    assert not deployment.supports_rollback(FileInstaller(target), None)  # a first install
    target.write_bytes(b"old")
    assert deployment.supports_rollback(FileInstaller(target), None)
    assert not deployment.supports_rollback(CommandInstaller("/bin/true"), None)
    installed = Deployment("a-1", 4, 0.0, f"file:{target}", "installed", can_roll_back=False)
    assert not deployment.supports_rollback(FileInstaller(target), installed)  # what install found
    assert deployment.supports_rollback(
        CommandInstaller("/bin/true"), Deployment("a-1", 4, 0.0, "x", "installed", True)
    )


def test_supports_rollback_prints_only_the_answer(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    tree = make_tree(device, meta())
    assert run(capsys, "SupportsRollback", tree) == (0, "Yes\n", "")
    config = device / "otacast.toml"
    config.write_text(config.read_text().replace(f"file:{device}/slot.img", "command:/bin/true"))
    assert run(capsys, "SupportsRollback", tree) == (0, "No\n", "")


def test_needs_artifact_reboot_lets_mender_reboot_only_when_the_installer_asked(
    capsys: pytest.CaptureFixture[str], device: Path
) -> None:
    assert deployment.reboot_answer(None) == "No"
    assert deployment.reboot_answer(Deployment("a", 1, 0.0, "x", "installed")) == "No"
    assert deployment.reboot_answer(Deployment("a", 1, 0.0, "x", "needs-reboot")) == "Automatic"
    assert run(capsys, "NeedsArtifactReboot", make_tree(device, meta())) == (0, "No\n", "")


# --- Installing the module ------------------------------------------------------------------


def test_install_module_links_this_program_and_is_idempotent(tmp_path: Path) -> None:
    program = tmp_path / "bin" / "otacast-mender-module"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    modules = tmp_path / "modules"
    modules.mkdir()
    assert install_module(modules, program).startswith("linked")
    assert (modules / "otacast").readlink() == program
    assert "already points" in install_module(modules, program)
    moved = tmp_path / "elsewhere"
    assert install_module(modules, moved).startswith("linked")  # re-pointed in place
    assert (modules / "otacast").readlink() == moved
    assert [p.name for p in modules.iterdir()] == ["otacast"]  # no temporary left behind


def test_install_module_refuses_a_missing_directory_and_a_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is mender-client installed"):
        install_module(tmp_path / "absent", tmp_path / "x")
    (tmp_path / "otacast").write_text("someone else's module")
    with pytest.raises(UsageError, match="not a link"):
        install_module(tmp_path, tmp_path / "x")


def test_install_module_takes_no_state(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "--install-module", "--modules-dir", tmp_path, "Download")
    assert code == UsageError.exit_code
    assert "takes no STATE" in one_error_line(err)


# --- otacast-signer mender-artifact: refusals before mender-artifact runs ---------------------


def signer(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = signer_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


# Keys mender-artifact cannot sign with; all are refused before it runs, with the key-kind code.
WRONG_MENDER_KEYS = {
    "otacast release key": (format_secret(b"\x01" * 32), "RSA or ECDSA P-256 only"),
    "not PEM": ("ssh-ed25519 AAAA\n", "not a PEM private key"),
    "PKCS#8 PEM": (
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        "not a PKCS#1 RSA or SEC1 EC private key",
    ),
    "public key PEM": (
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
        "not a PKCS#1 RSA or SEC1 EC private key",
    ),
}


@pytest.mark.parametrize("kind", sorted(WRONG_MENDER_KEYS))
def test_signer_refuses_a_mender_key_of_the_wrong_kind_with_the_key_kind_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    text, reason = WRONG_MENDER_KEYS[kind]
    (tmp_path / "m.json").write_bytes(MANIFEST)
    (tmp_path / "mender.key").write_text(text)
    code, err = signer(
        capsys,
        "mender-artifact",
        tmp_path / "m.json",
        "-o",
        tmp_path / "a.mender",
        "--key",
        tmp_path / "mender.key",
    )
    assert code == KeyFormatError.exit_code == 10  # README, "Exit codes"
    assert reason in err
    assert not (tmp_path / "a.mender").exists()


def test_signer_refuses_a_malformed_manifest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "m.json").write_bytes(MANIFEST.replace(b'"signatures"', b'"signaturez"'))
    code, _ = signer(capsys, "mender-artifact", tmp_path / "m.json", "-o", tmp_path / "a.mender")
    assert code == MalformedManifest.exit_code
    assert not (tmp_path / "a.mender").exists()


def test_signer_says_when_mender_artifact_is_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "m.json").write_bytes(MANIFEST)
    code, err = signer(capsys, "mender-artifact", tmp_path / "m.json", "-o", tmp_path / "a.mender")
    assert code == MenderArtifactError.exit_code
    assert "mender-artifact is not installed" in err
    assert not (tmp_path / "a.mender").exists()


def test_signer_meta_data_is_base64_of_the_manifest_file_bytes() -> None:
    document = json.loads(mender_artifact.meta_data(MANIFEST))
    assert base64.b64decode(document["otacast_manifest"]) == MANIFEST
