"""Local reuse (delta delivery): local 4 KiB blocks found by the new index become symbols."""

from __future__ import annotations

import queue
import random
from pathlib import Path

import pytest

from otacast.plugin import reuse
from otacast.plugin.core import ReceiverCore
from otacast.plugin.events import ChunkComplete
from otacast.plugin.reuse import (
    BLOCK,
    BlockTable,
    Layout,
    LocalChunk,
    Placement,
    ReuseDone,
    ReuseWorker,
    Source,
    compose,
    known_symbols,
    place_blocks,
)
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.schemas.blockindex import BlockIndex, IndexBuilder, block_digest
from otacast.schemas.errors import MalformedIndex
from otacast.signer.keys import SigningKey

from .helpers import NOW, cycles, make_release, manifest_datagrams, receive_all

T = 1208
KEY = SigningKey(b"\x41" * 32)


def index_of(image: bytes) -> BlockIndex:
    builder = IndexBuilder()
    builder.update(image)
    return builder.finish()


def blocks_of(data: bytes) -> list[bytes]:
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def placed_from(image: bytes, source: bytes) -> tuple[BlockTable, Placement]:
    table = BlockTable(index_of(image))
    placement = Placement(table.index.blocks)
    place_blocks(table, placement, 0, 0, source)
    return table, placement


def test_equal_blocks_are_one_key_with_every_position_and_a_prefix_hit_needs_all_16_bytes() -> None:
    rng = random.Random(1)
    a, b = rng.randbytes(BLOCK), rng.randbytes(BLOCK)
    zero = bytes(BLOCK)
    table = BlockTable(index_of(zero + a + zero + b + zero))
    assert list(table.positions(block_digest(zero))) == [0, 2, 4]
    assert list(table.positions(block_digest(b))) == [3]
    forged = block_digest(a)[:8] + bytes(8)  # same 8-byte key, other hash
    assert list(table.positions(forged)) == []
    assert table.nbytes == 5 * 8


def test_blocks_are_placed_wherever_the_source_has_them_and_zeros_fill_every_zero_block() -> None:
    rng = random.Random(2)
    old = [rng.randbytes(BLOCK) for _ in range(6)]
    new = [old[3], bytes(BLOCK), old[0], rng.randbytes(BLOCK), bytes(BLOCK), old[5]]
    source = b"".join(old) + bytes(BLOCK)  # longer than the image, zeros at its end
    _, placement = placed_from(b"".join(new), source)
    assert [placement.get(b) for b in range(6)] == [(0, 3), (0, 6), (0, 0), None, (0, 6), (0, 5)]
    assert placement.placed == 5


def test_a_short_last_block_matches_the_zero_padded_last_block_of_a_shorter_source() -> None:
    rng = random.Random(3)
    image = rng.randbytes(3 * BLOCK + 100)
    _, placement = placed_from(image, image[: 2 * BLOCK] + image[3 * BLOCK :])
    # The source's last block is the image's last 100 bytes, zero-padded as the index hashes it.
    assert placement.get(3) == (0, 2)
    assert not placement.known(2)


def test_a_symbol_is_known_only_when_every_block_it_touches_is_placed() -> None:
    layout = Layout(length=10 * BLOCK, chunk_size=20 * T, symbol_size=T)
    missing = {4}  # bytes 16384..20479
    # RFC 6330 partitioning: 34 symbols in 2 chunks of 17, not a full chunk of 20 and 14.
    assert layout.chunk_span(0) == (0, 17 * T) and layout.chunk_span(1) == (17 * T, 40960 - 17 * T)
    # Symbols 13 (15704..16911), 14, 15, 16 (19328..20535) touch block 4 (16384..20479).
    assert known_symbols(layout, 0, lambda b: b not in missing) == list(range(13))
    assert known_symbols(layout, 1, lambda b: b not in missing) == list(range(17))
    assert layout.symbol_span(0, 16) == (19328, 20536)


@pytest.mark.parametrize("length", [7 * BLOCK, 7 * BLOCK - 333])
def test_composed_symbols_are_the_image_bytes_the_codec_would_send(length: int) -> None:
    rng = random.Random(length)
    image = rng.randbytes(length)
    layout = Layout(length=length, chunk_size=11 * T, symbol_size=T)
    blocks = dict(enumerate(b.ljust(BLOCK, b"\0") for b in blocks_of(image)))
    for chunk in range(layout.chunks):
        offset, size = layout.chunk_span(chunk)
        data = image[offset : offset + size]
        for esi in range(-(-size // T)):
            expected = data[esi * T : (esi + 1) * T].ljust(T, b"\0")
            assert compose(layout, chunk, esi, blocks) == expected


def _v1_v2(rng: random.Random, blocks: int) -> tuple[bytes, bytes]:
    """An old image and a new one that keeps most of its blocks (moved, some changed)."""
    v1 = [rng.randbytes(BLOCK) for _ in range(blocks)]
    v2 = list(v1)
    for b in range(0, blocks // 2, 7):
        v2[b] = rng.randbytes(BLOCK)  # new blocks in the first half: the rest is all local
    v2[1], v2[2] = v1[2], v1[1]  # moved blocks
    return b"".join(v1), b"".join(v2)[:-500]


def _run_worker(manifest_release, sources, index_file=None):  # type: ignore[no-untyped-def]
    worker = ReuseWorker(
        manifest_release.manifest,
        sources,
        lambda: reuse.index_for(manifest_release.manifest, index_file=index_file),
    )
    worker.start()
    items = []
    while True:
        item = worker.results.get(timeout=30)
        items.append(item)
        if isinstance(item, LocalChunk):
            worker.chunk_dealt_with()  # (kept for the test: more than the worker would allow)
        if isinstance(item, ReuseDone):
            break
    worker.join()
    return items


def test_the_worker_hands_over_verified_whole_chunks_and_known_symbols_of_the_rest(
    tmp_path: Path,
) -> None:
    v1, v2 = _v1_v2(random.Random(4), 120)
    release = make_release(v2, KEY, chunk_size=55 * T)
    m = release.manifest
    (tmp_path / "v1.img").write_bytes(v1)
    (tmp_path / "v2.idx").write_bytes(index_of(v2).build())
    items = _run_worker(
        release,
        [Source(tmp_path / "absent", "test"), Source(tmp_path / "v1.img", "test")],
        tmp_path / "v2.idx",
    )
    notes = [i.text for i in items if isinstance(i, reuse.ReuseNote)]
    assert any("skipping" in n and "absent" in n for n in notes)
    chunks = [i for i in items if isinstance(i, LocalChunk)]
    assert any(c.data is not None for c in chunks) and any(c.symbols for c in chunks)
    layout = Layout.of(m)
    for item in chunks:
        offset, length = m.chunk_span(item.chunk)
        if item.data is not None:
            assert item.data == v2[offset : offset + length]
        for esi, symbol in item.symbols:
            start, end = layout.symbol_span(item.chunk, esi)
            assert symbol == v2[start:end].ljust(T, b"\0")
    done = items[-1]
    assert isinstance(done, ReuseDone)
    assert (
        done.blocks_found == 120 - len(range(0, 60, 7)) - 1
    )  # (the cut last block) and done.changed == 0


def test_the_worker_hands_over_no_more_chunks_than_the_loop_has_room_for(tmp_path: Path) -> None:
    """At most ``CHUNKS_IN_FLIGHT`` chunks are out that the loop has not dealt with (each is a
    chunk of the device's peak memory); each one it deals with lets the next come."""
    v1, v2 = _v1_v2(random.Random(4), 120)
    release = make_release(v2, KEY, chunk_size=55 * T)  # eight chunks, most of them local
    (tmp_path / "v1.img").write_bytes(v1)
    (tmp_path / "v2.idx").write_bytes(index_of(v2).build())
    worker = ReuseWorker(
        release.manifest,
        [Source(tmp_path / "v1.img", "test")],
        lambda: reuse.index_for(release.manifest, index_file=tmp_path / "v2.idx"),
    )
    worker.start()
    try:
        held: list[LocalChunk] = []

        def take(timeout: float) -> LocalChunk | None:
            while True:
                try:
                    item = worker.results.get(timeout=timeout)
                except queue.Empty:
                    return None
                if isinstance(item, LocalChunk):
                    return item

        while len(held) < reuse.CHUNKS_IN_FLIGHT:
            item = take(30)
            assert item is not None
            held.append(item)
        assert take(0.5) is None  # none more while the loop holds them
        worker.chunk_dealt_with()
        assert take(30) is not None  # room for one: it comes
    finally:
        worker.stop.set()
        worker.join()


def test_a_local_block_changed_after_the_scan_is_not_used(tmp_path: Path) -> None:
    rng = random.Random(5)
    image = rng.randbytes(16 * BLOCK)
    table = BlockTable(index_of(image))
    placement = Placement(16)
    source = tmp_path / "slot"
    source.write_bytes(image)
    opened = reuse._Opened(Source(source, "test"))
    try:
        reuse.scan_source(opened, 0, table, placement)
        assert placement.placed == 16
        with source.open("r+b") as handle:  # tampered between the scan and the read
            handle.seek(5 * BLOCK + 17)
            handle.write(b"\xff" if image[5 * BLOCK + 17] != 0xFF else b"\0")
        into = bytearray(16 * BLOCK)
        got = reuse.read_placed([opened], table.index, placement, range(16), into)
    finally:
        opened.close()
    assert sorted(got) == [b for b in range(16) if b != 5]
    assert into[: 5 * BLOCK] == image[: 5 * BLOCK] and into[5 * BLOCK : 6 * BLOCK] == bytes(BLOCK)
    assert not placement.known(5) and placement.placed == 15


def test_an_index_file_must_match_the_manifests_image(tmp_path: Path) -> None:
    release = make_release(random.Random(6).randbytes(5 * BLOCK), KEY)
    other = tmp_path / "other.idx"
    other.write_bytes(index_of(bytes(4 * BLOCK)).build())
    with pytest.raises(MalformedIndex):
        reuse.index_for(release.manifest, index_file=other)
    with pytest.raises(MalformedIndex):
        reuse.index_for(release.manifest, index_file=tmp_path / "absent")


def test_local_symbols_count_towards_k_for_a_decoder_opened_before_them(tmp_path: Path) -> None:
    rng = random.Random(7)
    image = rng.randbytes(3 * 55 * T - 77)
    release = make_release(image, KEY, chunk_size=55 * T)
    m = release.manifest
    k = m.source_symbols(0)
    cycle = cycles(m, image, 60)[0]
    stored = StoredSymbols(tmp_path, release.verified())
    core = ReceiverCore(
        release.trust, now=NOW, decoder_factory=stored.decoder, decoder_budget=UNBOUNDED_DECODERS
    )
    try:
        receive_all(core, manifest_datagrams(release.envelope))
        assert not receive_all(core, cycle[k : k + 3])  # repair symbols: a decoder is open
        layout = Layout.of(m)
        blocks = dict(enumerate(b.ljust(BLOCK, b"\0") for b in blocks_of(image)))
        local = [(e, compose(layout, 0, e, blocks)) for e in range(k - 10)]
        assert stored.add_local(0, local) == (k - 10) * T
        # 3 repair + (K - 10) local: 7 more received symbols make K.
        events = receive_all(core, cycle[k + 3 : k + 10])
        (complete,) = [e for e in events if isinstance(e, ChunkComplete)]
        assert complete.data == release.chunk(0)
        assert stored.local_bytes == {0: (k - 10) * T}
    finally:
        stored.close()
        stored.staging.close()


def test_the_file_installer_names_its_target_and_previous_and_mender_its_root_partitions(
    tmp_path: Path,
) -> None:
    target = tmp_path / "rootfs.img"
    assert [s.path for s in reuse.installer_sources(f"file:{target}")] == [target]
    (tmp_path / "rootfs.img.previous").write_bytes(b"")
    assert [s.path for s in reuse.installer_sources(f"file:{target}")] == [
        target,
        tmp_path / "rootfs.img.previous",
    ]
    assert reuse.installer_sources("swupdate:/tmp") == []
    conf = tmp_path / "mender.conf"
    conf.write_text('{"RootfsPartA": "/dev/mmcblk0p2", "RootfsPartB": "/dev/mmcblk0p3"}')
    sources, note = reuse.mender_sources(conf)
    assert [str(s.path) for s in sources] == ["/dev/mmcblk0p2", "/dev/mmcblk0p3"] and note is None
    assert reuse.mender_sources(tmp_path / "absent.conf") == ([], None)  # not Mender's layout
    sources, note = reuse.mender_sources(tmp_path)  # a directory: cannot be read
    assert sources == [] and note is not None and "cannot read" in note


def test_the_reuse_table_of_the_config_names_sources_relative_to_it_and_refuses_typos(
    tmp_path: Path,
) -> None:
    from otacast.plugin.config import parse_config
    from otacast.plugin.errors import ConfigError

    conf = tmp_path / "otacast.toml"
    parsed = parse_config({"reuse": {"sources": ["slot.img", "/dev/sda2"], "enabled": False}}, conf)
    assert parsed.reuse_sources == (tmp_path / "slot.img", Path("/dev/sda2"))
    assert parsed.reuse is False
    with pytest.raises(ConfigError, match="reuse must be a table"):
        parse_config({"reuse": {"source": ["slot.img"]}}, conf)
