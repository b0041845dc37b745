"""The sender's symbol cache is verified before it is reused (issue 13, item 8), and the phase
origin kept beside it.

Whatever the cache holds is sent and signed into AUTH pages as genuine, so a cache file whose
bytes changed since it was written must be encoded again, not served: these tests corrupt a
finished cache in the ways a disk or a stray writer can and check what `build` hands the sender.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import random
import signal
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import xxhash

from otacast.schemas import wire
from otacast.schemas.errors import ImageMismatch
from otacast.signer import auth_pages, channels, symbol_cache
from otacast.signer import serve as serve_module
from otacast.signer.encoder import raptorq_encode
from otacast.signer.errors import ReadError
from otacast.signer.schedule import SendSymbols, Wait

from .helpers import manifest_for

T = TypeVar("T")
CHUNK = 16 * 1024
IMAGE = random.Random(13).randbytes(4 * CHUNK - 500)
MANIFEST = manifest_for(IMAGE, chunk_size=CHUNK, symbol_size=1024)
LAYOUT = symbol_cache.CycleLayout.for_manifest(MANIFEST, 0.5)


def fake_sign(data: bytes) -> bytes:
    """A deterministic stand-in for the stream key: equal pages mean equal signed digests."""
    return hashlib.sha512(data).digest()[: wire.SIGNATURE_BYTES]


def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(IMAGE)
    return path


def counting_encoder(calls: list[int]) -> Callable[[bytes, int, int], list[bytes]]:
    def encode(chunk: bytes, symbol_size: int, repair: int) -> list[bytes]:
        calls.append(len(chunk))
        return raptorq_encode(chunk, symbol_size, repair)

    return encode


def reading(path: Path, use: Callable[[symbol_cache.SymbolReader], T]) -> T:
    """`use` of a reader of the cache file at `path`, closed after."""
    reader = symbol_cache.SymbolReader(path, LAYOUT, 16)
    try:
        return use(reader)
    finally:
        reader.close()


def signed_digests(path: Path) -> list[bytes]:
    """The digests the sender would sign into AUTH pages, read from the cache at `path`."""
    return reading(path, auth_pages.release_digests)


def build(tmp_path: Path, warnings: list[str], calls: list[int]) -> Path:
    return symbol_cache.build(
        MANIFEST,
        image_file(tmp_path),
        tmp_path / "cache",
        0.5,
        encode=counting_encoder(calls),
        warn=warnings.append,
    )


def test_a_cache_that_verifies_is_reused_without_encoding(tmp_path: Path) -> None:
    warnings: list[str] = []
    calls: list[int] = []
    path = build(tmp_path, warnings, calls)
    assert len(calls) == MANIFEST.chunk_count
    assert path.stat().st_size == LAYOUT.file_bytes
    assert symbol_cache.verify(path, LAYOUT) is None
    calls.clear()
    assert build(tmp_path, warnings, calls) == path
    assert calls == [] and warnings == []


def test_a_flipped_byte_in_a_cached_cycle_is_never_signed_or_sent(tmp_path: Path) -> None:
    warnings: list[str] = []
    calls: list[int] = []
    path = build(tmp_path, warnings, calls)
    genuine, genuine_digests = path.read_bytes(), signed_digests(path)
    # A byte of chunk 1's repair symbols: the manifest's chunk hashes do not cover these.
    offset, length = LAYOUT.span(1, 0, LAYOUT.cycles[1])
    spoiled = bytearray(genuine)
    spoiled[offset + length - 7] ^= 0x40
    path.write_bytes(bytes(spoiled))
    calls.clear()

    assert build(tmp_path, warnings, calls) == path
    # Encoded again (every chunk: the file is rewritten whole) and said so, in one line.
    assert len(calls) == MANIFEST.chunk_count
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "chunk 1's symbols do not match their digest" in warnings[0]
    # What the sender would send and sign is the genuine cache, not the spoiled one.
    assert path.read_bytes() == genuine
    assert signed_digests(path) == genuine_digests


def test_a_damaged_trailer_or_a_truncated_or_foreign_file_is_encoded_again(
    tmp_path: Path,
) -> None:
    warnings: list[str] = []
    calls: list[int] = []
    path = build(tmp_path, warnings, calls)
    genuine = path.read_bytes()
    damaged_trailer = bytearray(genuine)
    damaged_trailer[-1] ^= 0x01
    same_size_foreign = random.Random(1).randbytes(len(genuine))
    for spoiled, reason in [
        (bytes(damaged_trailer), f"chunk {MANIFEST.chunk_count - 1}'s symbols"),
        (genuine[:-1], f"{len(genuine) - 1} bytes, expected {len(genuine)}"),
        (genuine[: LAYOUT.total_bytes], f"{LAYOUT.total_bytes} bytes"),  # the oldest format
        # The SHA-256 trailer of earlier versions: 32 bytes per chunk, not 16.
        (
            genuine[: LAYOUT.total_bytes] + bytes(32 * len(LAYOUT.cycles)),
            f"expected {len(genuine)}",
        ),
        (same_size_foreign, "chunk 0's symbols"),
    ]:
        path.write_bytes(spoiled)
        warnings.clear()
        build(tmp_path, warnings, calls)
        assert len(warnings) == 1 and reason in warnings[0], (reason, warnings)
        assert path.read_bytes() == genuine


def test_a_lone_senders_phase_counts_from_the_first_time_it_served_the_release(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    assert symbol_cache.phase_origin(cache, MANIFEST, 1_800_000_000.25) == 1_800_000_000.25
    # A restart hours later goes on from the first start, not from its own.
    assert symbol_cache.phase_origin(cache, MANIFEST, 1_800_009_000.0) == 1_800_000_000.25


def test_an_origin_file_that_holds_no_time_is_replaced_as_on_a_first_start(
    tmp_path: Path,
) -> None:
    path = symbol_cache.origin_path(tmp_path, MANIFEST)
    for content in (b"soon\n", b"nan\n", b"inf", b"\xff\xfe", b"1" * 65, b""):
        path.write_bytes(content)
        warnings: list[str] = []
        origin = symbol_cache.phase_origin(tmp_path, MANIFEST, 1_800_000_000.0, warnings.append)
        assert origin == 1_800_000_000.0, content
        assert len(warnings) == 1 and "does not hold a time" in warnings[0]
        assert symbol_cache.phase_origin(tmp_path, MANIFEST, 1_900_000_000.0) == origin


def test_a_lone_sender_at_its_origin_sends_every_chunks_source_symbols_first() -> None:
    # `channels.sender_core` hands the core the wall clock less the origin (`ServePlan.origin`):
    # at a lone sender's first start every chunk's cycle begins at its first source symbol; at
    # the epoch (one of several senders) it begins wherever the wall clock says.
    wall = 1_800_000_123.4
    manifest = manifest_for(IMAGE, chunk_size=CHUNK, symbol_size=256)  # 8 visits per cycle
    layout = symbol_cache.CycleLayout.for_manifest(manifest, 0.5)
    firsts = {}
    for origin in (wall, 0.0):
        core = channels.sender_core(
            manifest, layout, rate=1e6, fragments=(b"m",), now=0.0, wall=wall, origin=origin
        )
        starts: dict[int, int] = {}
        now = 0.0
        while len(starts) < layout.chunks:
            action = core.next_action(now)
            if isinstance(action, Wait):
                now = action.until
            elif isinstance(action, SendSymbols):
                starts.setdefault(action.chunk, action.first)
        firsts[origin] = starts
    assert set(firsts[wall].values()) == {0}
    assert set(firsts[0.0].values()) != {0}


def kept_digests(path: Path) -> list[bytes]:
    return reading(path, auth_pages.kept_release_digests)


def keep(path: Path, digests: list[bytes]) -> None:
    """`digests` kept beside the cache at `path` as if derived from it."""
    data = b"".join(digests)
    reading(path, lambda reader: symbol_cache.write_derived(reader, auth_pages.DIGESTS_FILE, data))


def with_last_zeroed(digests: list[bytes]) -> list[bytes]:
    """Each chunk's digests with its last one zeroed (not the first: the one checked)."""
    size = wire.DIGEST_BYTES
    return [d[:-size] + bytes(size) for d in digests]


def test_the_digests_kept_beside_the_cache_are_those_computed_and_read_back_next_time(
    tmp_path: Path,
) -> None:
    path = build(tmp_path, [], [])
    digests = signed_digests(path)
    assert kept_digests(path) == digests
    assert symbol_cache.derived_path(path, auth_pages.DIGESTS_FILE).exists()
    # Read back, not computed: kept digests bound to this cache's trailer, whose checked
    # sample (each chunk's first) is right, are what the next start uses.
    forged = with_last_zeroed(digests)
    keep(path, forged)
    assert kept_digests(path) == forged


def test_kept_digests_of_another_cache_or_derivation_or_damaged_are_computed_again(
    tmp_path: Path,
) -> None:
    path = build(tmp_path, [], [])
    digests = signed_digests(path)
    kept = symbol_cache.derived_path(path, auth_pages.DIGESTS_FILE)
    forged = with_last_zeroed(digests)
    length = sum(len(d) for d in digests)
    keep(path, forged)
    genuine_kept = kept.read_bytes()
    # A flipped byte in the kept file, a truncated one, one of another cache's bytes (the
    # cache's trailer as written differs: here one of its digests changed, as a cache encoded
    # again from another image would; the file otherwise well formed), none at all, and
    # digests computed another way (a chunk's first one differs: what a version that hashed
    # datagrams otherwise would have kept): each is derived again from the cache itself.
    flipped = bytearray(genuine_kept)
    flipped[3] ^= 0x10
    other_body = bytearray(genuine_kept[: -symbol_cache.DIGEST_BYTES])
    other_body[length] ^= 0x01
    other_trailer = bytes(other_body) + xxhash.xxh3_128_digest(bytes(other_body))
    for spoiled in (bytes(flipped), genuine_kept[:-1], other_trailer, b"", None):
        if spoiled is None:
            keep(path, [bytes(len(d)) for d in digests])
        else:
            kept.write_bytes(spoiled)
        assert kept_digests(path) == digests
        # ... and kept again, bound to the cache as it is.
        again = reading(
            path, lambda reader: symbol_cache.read_derived(reader, auth_pages.DIGESTS_FILE, length)
        )
        assert again == b"".join(digests)


def test_an_image_changed_while_its_cache_is_encoded_leaves_no_cache(tmp_path: Path) -> None:
    image = image_file(tmp_path)

    def replacing(chunk: bytes, symbol_size: int, repair: int) -> list[bytes]:
        # The build pipeline writes another image over it once the first chunk is encoded.
        image.write_bytes(IMAGE[:CHUNK] + bytes(len(IMAGE) - CHUNK))
        return raptorq_encode(chunk, symbol_size, repair)

    with pytest.raises(ImageMismatch, match="chunk 1 does not match"):
        symbol_cache.build(MANIFEST, image, tmp_path / "cache", 0.5, encode=replacing)
    assert list((tmp_path / "cache").iterdir()) == []  # neither the cache nor its temporary


def test_a_killed_writers_temporary_cache_file_is_removed_by_the_next_write(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    name = symbol_cache.cache_path(cache, MANIFEST, 0.5).name
    old = time.time() - 2 * symbol_cache.ABANDONED_AFTER_SECONDS
    abandoned, writing, young, other, unlike = (
        cache / f"{name}.d3ad_0x9.tmp",
        cache / f"{name}.l1vewr1t.tmp",
        cache / f"{name}.n3wf1l3s.tmp",
        cache / "another-release.symbols.d3ad_0x9.tmp",
        cache / f"{name}.digests.d3ad_0x9.tmp",  # another file's, beside the cache
    )
    for path in (abandoned, writing, young, other, unlike):
        path.write_bytes(b"half a cache")
    for path in (abandoned, writing, other, unlike):
        os.utime(path, (old, old))
    with writing.open("rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer still at work (another `serve` start)
        build(tmp_path, [], [])
    assert not abandoned.exists()
    assert writing.exists() and young.exists() and other.exists() and unlike.exists()


def test_sigterm_while_the_cache_is_encoded_removes_its_temporary_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def stopped(chunk: bytes, symbol_size: int, repair: int) -> list[bytes]:
        os.kill(os.getpid(), signal.SIGTERM)  # a service manager's stop, mid-encode
        return raptorq_encode(chunk, symbol_size, repair)

    previous = signal.signal(signal.SIGTERM, serve_module._exit_unwinding)
    try:
        with pytest.raises(SystemExit) as stop:
            symbol_cache.build(MANIFEST, image_file(tmp_path), cache, 0.5, encode=stopped)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 128 + signal.SIGTERM
    assert list(cache.iterdir()) == []


def test_serve_unwinds_on_sigterm_from_its_start_until_its_loop_takes_signals_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    class Stopped(Exception):
        pass

    def hashing(*_: object) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))  # (hashing and encoding happen here)
        raise Stopped

    monkeypatch.setattr(serve_module, "build_channels", hashing)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Stopped):
            options = types.SimpleNamespace(json=False, interface="lo", source=None)
            serve_module.serve(None, tmp_path, options, io.StringIO())  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [serve_module._exit_unwinding]


def test_read_errors_of_the_cache_or_the_image_are_read_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build(tmp_path, [], [])
    with pytest.raises(ReadError, match="cannot read symbol cache"):
        symbol_cache.SymbolReader(tmp_path / "missing", LAYOUT, 16)
    reader = symbol_cache.SymbolReader(path, LAYOUT, 16)
    try:

        def failing(*_: object) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "preadv", failing)
        monkeypatch.setattr(os, "pread", failing)
        for read in (lambda: reader.read(0, 0, 4), lambda: reader.read_cycle(0), reader.trailer):
            with pytest.raises(ReadError, match="Input/output error"):
                read()
    finally:
        monkeypatch.undo()
        reader.close()
    # An image that cannot be read while the cache is encoded: not "cannot write the cache".
    image = image_file(tmp_path)
    real_open = Path.open

    def unreadable(self: Path, *args: object, **kwargs: object) -> object:
        if self == image:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", unreadable)
    with pytest.raises(ReadError, match="cannot read image"):
        symbol_cache.build(MANIFEST, image, tmp_path / "other-cache", 0.5)
