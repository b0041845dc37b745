"""Root-run writes never go through a link planted at a temporary file's name (issue 13, item 8).

Before, every atomic write put its bytes in ``.NAME.PID.tmp`` (or ``.new``) beside the target and
opened, wrote and chmod-ed that path: anyone able to write the target's directory (``/tmp``, a
shared web root) could plant a symbolic link there beforehand and have root write through it
to any file, or make it world-readable.  Each test plants such a link at the old name, aimed at
a "victim" file, runs the write, and checks that the write landed where it should while the
victim kept its bytes and its mode.  (The process id is this one's, so the old name is exactly
where the old code would have written.)
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from otacast.plugin.durable import write_durably
from otacast.plugin.installers.file import FileInstaller
from otacast.plugin.staging import Staging
from otacast.plugin.status import StatusFile, read_status
from otacast.signer import mender_artifact, publish
from otacast.signer.fileio import atomic_write
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

from .helpers import make_release, manifest_for

KEY = SigningKey(b"\x05" * 32)
CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
IMAGE = random.Random(13).randbytes(3 * CHUNK - 77)
PRECIOUS = b"root's precious file\n"


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A file that no write here may touch; checked unchanged after the test."""
    path = tmp_path / "victim" / "shadow"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    path.chmod(0o600)
    yield path
    assert path.read_bytes() == PRECIOUS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def plant(at: Path, victim: Path) -> None:
    at.symlink_to(victim)


def old_name(target: Path, suffix: str = "tmp") -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{suffix}")


def test_a_durable_record_is_not_written_through_a_planted_link(
    tmp_path: Path, victim: Path
) -> None:
    target = tmp_path / "state" / "installed.json"
    target.parent.mkdir()
    plant(old_name(target), victim)
    write_durably(target, b"{}", "the installed record")
    assert target.read_bytes() == b"{}" and not target.is_symlink()


def test_the_status_file_is_not_written_through_a_planted_link(
    tmp_path: Path, victim: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    plant(state / f".status.json.{os.getpid()}.tmp", victim)
    StatusFile(state).update(activity="downloading")
    status = read_status(state)
    assert status is not None and status.activity == "downloading"


@pytest.fixture
def other_filesystem() -> Iterator[Path]:
    """A directory on a filesystem other than the tests' (for the copying path of staging)."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if directory.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the tests")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def finished_staging(state: Path) -> Staging:
    staging = Staging(state, make_release(IMAGE, KEY, chunk_size=CHUNK).verified())
    for index in range(staging.manifest.chunk_count):
        offset, length = staging.manifest.chunk_span(index)
        staging.write_chunk(index, IMAGE[offset : offset + length])
    return staging


@pytest.mark.parametrize("place", ["same filesystem", "other filesystem"])
def test_the_staged_image_is_not_copied_or_linked_through_a_planted_link(
    tmp_path: Path, victim: Path, request: pytest.FixtureRequest, place: str
) -> None:
    directory = (
        tmp_path if place == "same filesystem" else request.getfixturevalue("other_filesystem")
    )
    out = directory / "image.img"
    plant(old_name(out), victim)
    staging = finished_staging(tmp_path / "state")
    try:
        staging.finish(out)
    finally:
        staging.close()
    assert out.read_bytes() == IMAGE and not out.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_the_file_installer_does_not_copy_through_a_planted_link(
    tmp_path: Path, victim: Path
) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(IMAGE)
    target = tmp_path / "slot" / "rootfs.img"
    target.parent.mkdir()
    target.write_bytes(b"old release")
    plant(old_name(target, "new"), victim)
    FileInstaller(target).install(image, make_release(IMAGE, KEY, chunk_size=CHUNK).verified())
    assert target.read_bytes() == IMAGE
    assert (target.parent / "rootfs.img.previous").read_bytes() == b"old release"


def test_publish_does_not_copy_the_image_through_a_planted_link(
    tmp_path: Path, victim: Path
) -> None:
    manifest = manifest_for(IMAGE, chunk_size=CHUNK)
    manifest = type(manifest)(**{**manifest.__dict__, "http": ("https://cdn.test/fw/demo.img",)})
    envelope = sign(manifest, [SigningKey(b"\x02" * 32)])
    image = tmp_path / "demo.img"
    image.write_bytes(IMAGE)
    root = tmp_path / "www"
    (root / "fw").mkdir(parents=True)
    target = root / "fw" / "demo.img"
    plant(old_name(target), victim)
    plant(old_name(target.with_name("demo.img.manifest.json")), victim)
    publish.publish(envelope, image, root)
    assert target.read_bytes() == IMAGE
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert (root / "fw" / "demo.img.manifest.json").read_bytes() == envelope.to_file_bytes()


def test_a_signer_output_is_written_despite_a_link_planted_at_the_old_name(
    tmp_path: Path, victim: Path
) -> None:
    # O_EXCL alone already refused to follow the link, but then the write failed: a planted
    # name was a denial of service.  An unpredictable name leaves nothing to plant.
    target = tmp_path / "release.json"
    plant(old_name(target), victim)
    atomic_write(target, b"{}\n")
    assert target.read_bytes() == b"{}\n"


def test_the_mender_artifact_is_not_written_through_a_planted_link(
    tmp_path: Path, victim: Path
) -> None:
    if shutil.which(mender_artifact.TOOL) is None:
        pytest.skip(f"{mender_artifact.TOOL} is not installed")
    envelope = sign(manifest_for(IMAGE, chunk_size=CHUNK), [SigningKey(b"\x02" * 32)])
    manifest = tmp_path / "demo.json"
    manifest.write_bytes(envelope.to_file_bytes())
    out = tmp_path / "demo.mender"
    plant(old_name(out), victim)
    mender_artifact.write_artifact(manifest, out)
    assert out.is_file() and not out.is_symlink() and out.stat().st_size > 0
