"""The record of a checked image (`otacast.signer.image_record`): trusted only while the file is
unchanged, only for a warm start, never for a check that raced a write."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest

from otacast.schemas.errors import ImageMismatch
from otacast.schemas.manifest import parse_envelope
from otacast.signer import channels, image_record, symbol_cache
from otacast.signer.cli import main
from otacast.signer.image_record import FileStamp
from otacast.signer.keys import SigningKey
from otacast.signer.report import Reporter
from otacast.signer.sign import check_image

from .helpers import Release, make_release

KEY = SigningKey(b"\x07" * 32)
SETTLED_NS = image_record.RACY_NS + 1


def _release(tmp_path: Path, seed: int = 1) -> tuple[Release, Path]:
    release = make_release(random.Random(seed).randbytes(3 * 55 * 1208 + 17), KEY)
    image = tmp_path / "rootfs.img"
    image.write_bytes(release.image)
    return release, image


def _rewrite(image: Path, data: bytes) -> None:
    """Write `data` over `image` (in place: the same inode) until its stamp has changed: file
    times advance in ticks, and a write in the tick of the one before leaves them as they were
    (on kernels without fine-grained timestamps)."""
    before = FileStamp.of(image)
    for _ in range(200):
        with image.open("r+b") as handle:
            handle.write(data)
        if FileStamp.of(image) != before:
            return
        time.sleep(0.01)
    raise AssertionError(f"{image}'s stamp did not change in 2 s of writes")


def _remember(record: Path, release: Release, image: Path) -> None:
    """Record `image` as checked by a check that began well after its last change."""
    stamp = FileStamp.of(image)
    assert stamp is not None
    image_record.remember(record, release.manifest, image, stamp, stamp.ctime_ns + SETTLED_NS)


def test_a_recorded_image_matches_until_its_file_is_written(tmp_path: Path) -> None:
    release, image = _release(tmp_path)
    record = tmp_path / "rec.checked"
    _remember(record, release, image)
    assert image_record.matches(record, release.manifest, image)
    # The same bytes written again: the size and the contents are unchanged, the ctime is not.
    _rewrite(image, release.image[:1])
    assert not image_record.matches(record, release.manifest, image)


def test_a_file_put_in_the_images_place_does_not_match_even_with_its_bytes(
    tmp_path: Path,
) -> None:
    release, image = _release(tmp_path)
    record = tmp_path / "rec.checked"
    _remember(record, release, image)
    copy = tmp_path / "copy.img"
    copy.write_bytes(release.image)
    copy.replace(image)
    assert not image_record.matches(record, release.manifest, image)


def test_a_record_names_the_manifest_it_was_checked_against(tmp_path: Path) -> None:
    release, image = _release(tmp_path)
    other = make_release(release.image, KEY, sequence=6)
    record = tmp_path / "rec.checked"
    _remember(record, release, image)
    assert not image_record.matches(record, other.manifest, image)


def test_a_check_that_began_as_the_image_changed_records_nothing(tmp_path: Path) -> None:
    release, image = _release(tmp_path)
    record = tmp_path / "rec.checked"
    _remember(record, release, image)
    stamp = FileStamp.of(image)
    assert stamp is not None
    # Begun within the racy window of the image's last change: a write in the same tick
    # would leave its stamp as it was, so the record is dropped, not written.
    image_record.remember(record, release.manifest, image, stamp, stamp.ctime_ns + SETTLED_NS // 4)
    assert not record.exists()
    # Changed between the stamp taken before the check and the end of it: nothing either.
    image_record.remember(record, release.manifest, image, stamp, stamp.ctime_ns + SETTLED_NS)
    assert record.exists()
    _rewrite(image, release.image)
    image_record.remember(record, release.manifest, image, stamp, stamp.ctime_ns + SETTLED_NS)
    assert not record.exists()


@pytest.mark.parametrize("held", [b"", b"garbage\n", b"0" * (image_record.MAX_RECORD_BYTES + 1)])
def test_a_record_that_is_not_one_matches_nothing(tmp_path: Path, held: bytes) -> None:
    release, image = _release(tmp_path)
    record = tmp_path / "rec.checked"
    record.write_bytes(held)
    assert not image_record.matches(record, release.manifest, image)
    assert not image_record.matches(tmp_path / "absent", release.manifest, image)


def test_check_image_records_an_image_that_passes_only_once_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, image = _release(tmp_path)
    record = tmp_path / "rec.checked"
    # Just written: racy, so a passing check records nothing yet.
    check_image(release.manifest, image, record=record)
    assert not record.exists()
    # With no racy window (as if written long ago) it records the image as it was checked.
    monkeypatch.setattr(image_record, "RACY_NS", 0)
    check_image(release.manifest, image, record=record)
    assert image_record.matches(record, release.manifest, image)
    # A check that fails (another file named as the image) leaves no record behind.
    wrong = tmp_path / "wrong.img"
    wrong.write_bytes(bytes(len(release.image)))
    with pytest.raises(ImageMismatch):
        check_image(release.manifest, wrong, record=record)
    assert not record.exists()


def _options(cache: Path) -> channels.ServeOptions:
    return channels.ServeOptions(
        interface="lo", rates=[1_000_000], cache_dir=cache, lane_share=0, index_share=0
    )


def test_a_warm_start_trusts_the_record_and_a_cold_one_checks_the_image(tmp_path: Path) -> None:
    """A record that (falsely) vouches for a changed image: a warm start does not read the
    image, so it serves the cache (which is what it sends anyway); a start that must encode
    checks the image first and refuses it, record or not."""
    release, image = _release(tmp_path)
    cache = tmp_path / "cache"
    quiet = Reporter(io.StringIO(), True)
    channels.build_channels(release.envelope, image, _options(cache), quiet).close()
    record = image_record.path_for(cache, release.manifest)
    image.write_bytes(bytes(len(release.image)))
    _remember(record, release, image)
    channels.build_channels(release.envelope, image, _options(cache), quiet).close()
    symbol_cache.cache_path(cache, release.manifest, 0.5).unlink()
    with pytest.raises(ImageMismatch):
        channels.build_channels(release.envelope, image, _options(cache), quiet)


def test_a_warm_start_without_a_matching_record_checks_the_image(tmp_path: Path) -> None:
    release, image = _release(tmp_path)
    cache = tmp_path / "cache"
    quiet = Reporter(io.StringIO(), True)
    channels.build_channels(release.envelope, image, _options(cache), quiet).close()
    _remember(image_record.path_for(cache, release.manifest), release, image)
    _rewrite(image, bytes(len(release.image)))  # its stamp no longer matches the record
    with pytest.raises(ImageMismatch):
        channels.build_channels(release.envelope, image, _options(cache), quiet)


def test_a_first_start_keeps_the_block_index_for_the_next_even_without_a_cache_directory(
    tmp_path: Path,
) -> None:
    """The check writes the block index (and, for an image written long enough before, its
    record: not this one's) into the cache directory: made before the check, so the first
    start's are not lost and built again at the next."""
    image = tmp_path / "raw.img"
    image.write_bytes(random.Random(3).randbytes(40 * 4096 + 5))
    assert main(["keygen", str(tmp_path / "rel")]) == 0
    manifest_path = tmp_path / "raw.img.manifest.json"
    signed = main(
        [
            "sign", str(image), "--key", str(tmp_path / "rel.key"), "--sequence", "1",
            "--channel", "updates.example.test", "--device-type", "dev",
            "--out", str(manifest_path),
        ]
    )  # fmt: skip
    assert signed == 0
    envelope = parse_envelope(manifest_path.read_bytes())
    assert envelope.manifest.index is not None  # a raw image's manifest lists one
    cache = tmp_path / "not" / "yet"
    channels.build_channels(envelope, image, _options(cache), Reporter(io.StringIO(), True)).close()
    assert symbol_cache.index_path(cache, envelope.manifest).exists()
