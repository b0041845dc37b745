"""Crash-safe staging: what is resumed, what is distrusted, what is handed on."""

from __future__ import annotations

import fcntl
import os
import random
import time
from pathlib import Path

import pytest

from otacast.plugin import durable
from otacast.plugin.errors import StateError
from otacast.plugin.staging import Staging
from otacast.schemas.policy import VerifiedManifest
from otacast.signer.keys import SigningKey

from .helpers import make_release

KEY = SigningKey(b"\x05" * 32)
CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
IMAGE = random.Random(11).randbytes(5 * CHUNK - 999)


def verified(sequence: int = 1) -> VerifiedManifest:
    return make_release(IMAGE, KEY, sequence=sequence, chunk_size=CHUNK).verified()


def chunk(index: int) -> bytes:
    return IMAGE[index * CHUNK : (index + 1) * CHUNK]


def test_written_chunks_are_resumed_by_the_next_process(tmp_path: Path) -> None:
    staging = Staging(tmp_path, verified())
    assert staging.resume() == set()
    for index in (0, 2, 4):
        staging.write_chunk(index, chunk(index))
    staging.close()  # the process dies here
    again = Staging(tmp_path, verified())
    assert again.resume() == {0, 2, 4}
    again.close()


def test_a_chunk_corrupted_between_runs_is_not_resumed(tmp_path: Path) -> None:
    staging = Staging(tmp_path, verified())
    staging.write_chunk(1, chunk(1))
    staging.write_chunk(3, chunk(3))
    staging.close()
    with staging.part.open("r+b") as handle:
        handle.seek(CHUNK + 10)
        handle.write(b"\xff")
    again = Staging(tmp_path, verified())
    assert again.resume() == {3}
    again.close()


def test_a_torn_or_garbled_log_costs_only_the_chunks_it_names(tmp_path: Path) -> None:
    staging = Staging(tmp_path, verified())
    staging.write_chunk(0, chunk(0))
    staging.close()
    with staging.log_path.open("ab") as handle:
        handle.write(b"\x00\x00\x00\x07" + b"\xff\xff\xff\xff" + b"\x00\x00")  # junk, torn tail
    again = Staging(tmp_path, verified())
    assert again.resume() == {0}
    again.close()


def test_a_logged_chunk_whose_bytes_never_reached_the_disk_is_not_trusted(tmp_path: Path) -> None:
    staging = Staging(tmp_path, verified())
    staging.close()
    staging.log_path.write_bytes(b"\x00\x00\x00\x02")
    again = Staging(tmp_path, verified())
    assert again.resume() == set()
    again.close()


def test_the_image_is_handed_on_only_whole_and_verified(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "state", verified())
    for index in range(4):
        staging.write_chunk(index, chunk(index))
    out = tmp_path / "image.bin"
    with pytest.raises(StateError, match="does not match"):
        staging.finish(out)  # the last chunk is missing
    assert not out.exists()
    staging.write_chunk(4, IMAGE[4 * CHUNK :])
    staging.finish(out)
    assert out.read_bytes() == IMAGE
    staging.discard()
    assert not staging.directory.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.bin", "state"]


def _hashed_ahead(staging: Staging, length: int) -> bool:
    """Whether the image's hash taken ahead reaches `length` bytes (waited for, up to 10 s)."""
    deadline = time.monotonic() + 10
    while staging._hasher.position < length and time.monotonic() < deadline:
        time.sleep(0.005)
    return staging._hasher.position == length


def test_the_image_is_hashed_ahead_in_order_as_its_chunks_become_final(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "state", verified())
    for index in (4, 2, 3, 1):  # out of order: nothing to hash until chunk 0 is in place
        staging.write_chunk(index, IMAGE[index * CHUNK : (index + 1) * CHUNK])
    assert staging._hasher._thread is None and staging._hasher.position == 0
    staging.write_chunk(0, chunk(0))
    assert _hashed_ahead(staging, len(IMAGE))
    out = tmp_path / "image.bin"
    staging.finish(out)
    assert out.read_bytes() == IMAGE
    staging.discard()


def test_a_chunk_hashed_ahead_with_wrong_bytes_still_fails_the_image(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "state", verified())
    staging.write_chunk(0, chunk(0))
    bad = bytearray(chunk(1))
    bad[100] ^= 1
    fd = os.open(staging.part, os.O_WRONLY)
    os.pwrite(fd, bad, CHUNK)  # (a bug's bytes, never verified)
    os.close(fd)
    staging.final(1)
    assert _hashed_ahead(staging, 2 * CHUNK)
    for index in (2, 3, 4):
        staging.write_chunk(index, IMAGE[index * CHUNK : (index + 1) * CHUNK])
    out = tmp_path / "image.bin"
    with pytest.raises(StateError, match="does not match"):
        staging.finish(out)
    assert not out.exists()
    staging.close()


def test_two_processes_cannot_share_a_session(tmp_path: Path) -> None:
    first = Staging(tmp_path, verified())
    with pytest.raises(StateError, match="another otacast process"):
        Staging(tmp_path, verified())
    first.close()
    Staging(tmp_path, verified()).close()


def test_an_unusable_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(StateError, match="cannot use state directory"):
        Staging(blocker, verified())


def test_a_chunk_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    staging = Staging(tmp_path, verified())
    with pytest.raises(ValueError):
        staging.write_chunk(0, chunk(0)[:-1])
    staging.close()


def test_without_room_only_downloads_no_process_holds_are_given_up(tmp_path: Path) -> None:
    busy = Staging(tmp_path, verified(sequence=2))  # another process, downloading right now
    abandoned = Staging(tmp_path, verified(sequence=3))
    abandoned.write_chunk(0, chunk(0))
    abandoned.close()  # its process died, or moved on to a newer release
    (tmp_path / "0123456789abcdef").mkdir()  # made, never locked
    (tmp_path / "notes").mkdir()  # not ours
    current = Staging(tmp_path, verified(sequence=4))
    assert current._remove_abandoned()
    kept = {busy.directory.name, current.directory.name, "notes"}
    assert {p.name for p in tmp_path.iterdir()} == kept
    assert not current._remove_abandoned()  # nothing left to give up
    busy.close()
    current.close()


def test_the_kept_manifest_is_written_only_when_it_differs_and_never_left_torn(
    tmp_path: Path,
) -> None:
    release = verified()
    Staging(tmp_path, release).close()
    kept = next(tmp_path.glob("*/manifest.json"))
    assert kept.read_bytes() == release.envelope.to_file_bytes()
    written = kept.stat().st_ino
    os.utime(kept, ns=(10**18, 10**18))
    Staging(tmp_path, release).close()  # every open: a resume, a sender-less resume
    assert kept.stat().st_mtime_ns == 10**18  # not written again
    kept.write_bytes(kept.read_bytes()[:100])  # torn by a power cut under an earlier version
    Staging(tmp_path, release).close()
    assert kept.read_bytes() == release.envelope.to_file_bytes()
    assert kept.stat().st_ino != written  # replaced by a rename, not rewritten in place
    assert [p.name for p in kept.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_temporary_files_a_killed_handoff_left_beside_the_output_are_removed_by_the_next(
    tmp_path: Path,
) -> None:
    out = tmp_path / "image.bin"
    old = time.time() - 2 * durable.ABANDONED_AFTER_SECONDS
    dead, linked, live, young, link, other, unlike = (
        tmp_path / ".image.bin.d3ad_0x9.tmp",  # a copy cut off by a power cut
        tmp_path / ".image.bin.0123456789abcdef.tmp",  # a hard link left before its rename
        tmp_path / ".image.bin.l1vewr1t.tmp",  # another process's, still being written
        tmp_path / ".image.bin.n3wf1l3s.tmp",
        tmp_path / ".image.bin.p1ant3d0.tmp",  # planted by another user: never followed
        tmp_path / ".other.bin.d3ad_0x9.tmp",
        tmp_path / ".image.bin.previous.d3ad_0x9.tmp",  # another destination's
    )
    for path in (dead, linked, live, young, other, unlike):
        path.write_bytes(b"part of an image")
    link.symlink_to(tmp_path / "elsewhere")
    for path in (dead, linked, live, other, unlike):
        os.utime(path, (old, old))
    staging = Staging(tmp_path / "state", verified())
    for index in range(5):
        staging.write_chunk(index, chunk(index))
    with live.open("rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        staging.finish(out)
    staging.close()
    assert out.read_bytes() == IMAGE
    assert not dead.exists() and not linked.exists()
    assert live.exists() and young.exists() and link.is_symlink() and other.exists()
    assert unlike.exists()
    assert not (tmp_path / "elsewhere").exists()
