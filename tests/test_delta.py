"""The delta lane end to end without a network: the signer builds, the device decodes and checks.

Images are made of numbered 4 KiB blocks so that each test says which blocks the releases share.
"""

from __future__ import annotations

import hashlib
import lzma
import random
import tracemalloc
from pathlib import Path

import pytest

from otacast.plugin.delta import LaneDecoder, patched_index
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.deltaobject import Copy, IndexPatch, LaneHeader, build_lane, parse_lane
from otacast.schemas.errors import MalformedDelta
from otacast.schemas.limits import INDEX_BLOCK_SIZE
from otacast.signer import delta
from otacast.signer.errors import ReadError


def block(n: int) -> bytes:
    """A distinct, compressible 4 KiB block for each n."""
    return (f"block {n:08d} ".encode() * 300)[:INDEX_BLOCK_SIZE]


def image(tmp_path: Path, name: str, blocks: list[int], tail: bytes = b"") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(block(n) for n in blocks) + tail)
    return path


def decode(
    lane: bytes, index: BlockIndex, piece: int = 777
) -> tuple[dict[int, bytes], LaneDecoder]:
    header, stream = parse_lane(lane, length=index.length)
    decoder = LaneDecoder(header, index)
    got: dict[int, bytes] = {}
    for offset in range(0, len(stream), piece):
        for number, data in decoder.feed(stream[offset : offset + piece]):
            assert number not in got
            got[number] = data
    decoder.finish()
    return got, decoder


def blocks_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + INDEX_BLOCK_SIZE] for i in range(0, len(data), INDEX_BLOCK_SIZE)]


def test_lane_carries_exactly_the_new_blocks_and_the_device_rebuilds_the_image(
    tmp_path: Path,
) -> None:
    old = image(tmp_path, "v1.img", list(range(40)))
    # Blocks moved (30..39 first), dropped (10..19), new ones (100..104), a short last block.
    new = image(
        tmp_path,
        "v2.img",
        [*range(30, 40), *range(0, 10), 100, 101, 20, 102, *range(21, 30)],
        b"tail",
    )
    new_index = delta.index_of_image(new)
    built = delta.build_delta(new, new_index, [old], tmp_path / "lane")
    assert list(built.header.runs()) == [(20, 2), (23, 1), (33, 1)]

    got, decoder = decode((tmp_path / "lane").read_bytes(), new_index)
    assert decoder.complete
    assert decoder.rejections == {}
    have = blocks_of(new)
    assert got == {n: have[n] for n in (20, 21, 23, 33)}

    # The device: its old index patched into the new one, old blocks placed by it, lane blocks.
    old_index = delta.index_of_image(old)
    patch = built.patches[0].build()
    placed = patched_index(
        old_index,
        patch,
        length=new_index.length,
        sha256=new_index.sha256(),
        patch_sha256=hashlib.sha256(patch).digest(),
    )
    assert placed == new_index
    local = {old_index.digest(n): data for n, data in enumerate(blocks_of(old))}
    rebuilt = b"".join(got.get(n) or local[placed.digest(n)] for n in range(placed.blocks))
    assert rebuilt == new.read_bytes()


def test_union_of_two_releases_carries_blocks_absent_from_either(tmp_path: Path) -> None:
    # v1 has A, B; v2 has A, C; v3 has A, B, C, D: B is missing on v2 devices, C on v1 devices.
    a, b, c, dd = range(0, 10), range(10, 20), range(20, 30), range(30, 40)
    v1 = image(tmp_path, "v1.img", [*a, *b])
    v2 = image(tmp_path, "v2.img", [*a, *c])
    v3 = image(tmp_path, "v3.img", [*a, *b, *c, *dd])
    index = delta.index_of_image(v3)
    both = delta.build_delta(v3, index, [v2, v1], tmp_path / "both")
    assert list(both.header.runs()) == [(10, 30)]
    assert len(both.patches) == 2
    newest = delta.build_delta(v3, index, [v2, v1], tmp_path / "newest", releases=1)
    assert list(newest.header.runs()) == [(10, 10), (30, 10)]
    assert len(newest.patches) == 1

    got, decoder = decode((tmp_path / "both").read_bytes(), index)
    assert decoder.complete and sorted(got) == list(range(10, 40))
    # Each covered release's patch yields the new index from that release's own index.
    for old, patch in zip((v2, v1), both.patches, strict=True):
        assert patch.apply(delta.index_of_image(old)) == index


def test_a_tampered_block_in_the_stream_is_refused_by_its_hash(tmp_path: Path) -> None:
    new = image(tmp_path, "v2.img", [1, 2, 3, 4, 5])
    index = delta.index_of_image(new)
    header = LaneHeader.from_runs(index.length, [(1, 3)], 0)
    raw = bytearray(new.read_bytes()[INDEX_BLOCK_SIZE : 4 * INDEX_BLOCK_SIZE])
    raw[INDEX_BLOCK_SIZE + 100] ^= 1  # block 2: a well-formed stream of the wrong bytes
    stream = lzma.compress(bytes(raw), format=lzma.FORMAT_XZ)
    header = LaneHeader(header.length, header.blocks, header.run_list, len(stream))
    got, decoder = decode(build_lane(header, stream), index)
    assert sorted(got) == [1, 3]
    assert decoder.rejections == {"block-hash": 1}
    assert not decoder.complete


def test_a_flipped_byte_of_the_stream_stops_the_decoder_without_raising(tmp_path: Path) -> None:
    new = image(tmp_path, "v2.img", list(range(50)))
    index = delta.index_of_image(new)
    lane = bytearray(image_lane(tmp_path, new, index, [(0, 50)]))
    lane[-40] ^= 0x10  # in the xz block; its CRC64 or the LZMA2 decoder catches it
    got, decoder = decode(bytes(lane), index)
    assert sum(decoder.rejections.values()) >= 1
    assert set(decoder.rejections) <= {"block-hash", "stream-corrupt"}
    have = blocks_of(new)
    assert all(have[n] == data for n, data in got.items())


def image_lane(tmp_path: Path, new: Path, index: BlockIndex, runs: list[tuple[int, int]]) -> bytes:
    delta.write_lane(new, index, runs, tmp_path / "lane")
    return (tmp_path / "lane").read_bytes()


def test_a_truncated_stream_gives_the_blocks_it_holds_and_counts_the_rest(tmp_path: Path) -> None:
    rng = random.Random(7)
    new = tmp_path / "v2.img"
    new.write_bytes(rng.randbytes(40 * INDEX_BLOCK_SIZE))  # incompressible: the stream is long
    index = delta.index_of_image(new)
    lane = image_lane(tmp_path, new, index, [(0, 40)])
    header, stream = parse_lane(lane)
    decoder = LaneDecoder(header, index)
    got = dict(decoder.feed(stream[: len(stream) // 2]))
    decoder.finish()
    assert 0 < len(got) < 40
    assert decoder.rejections == {"stream-truncated": 1}


def test_a_decompression_bomb_is_cut_at_the_run_list_with_bounded_memory(tmp_path: Path) -> None:
    new = image(tmp_path, "v2.img", [1, 2])
    index = delta.index_of_image(new)
    # A small dictionary, so that what the decoder holds is the output it was asked for.
    small_dictionary = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 16}]
    bomb = lzma.compress(
        block(1) + bytes(16 * 1024 * 1024), format=lzma.FORMAT_XZ, filters=small_dictionary
    )
    header = LaneHeader.from_runs(index.length, [(0, 1)], len(bomb))
    lane = build_lane(header, bomb)
    tracemalloc.start()
    try:
        got, decoder = decode(lane, index, piece=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == {0: block(1)}
    assert decoder.rejections == {"stream-too-long": 1}
    assert peak < 4 * 1024 * 1024


def test_a_patch_that_makes_a_wrong_index_is_refused_by_the_signed_hash(tmp_path: Path) -> None:
    old = delta.index_of_image(image(tmp_path, "v1.img", [1, 2, 3]))
    new = delta.index_of_image(image(tmp_path, "v2.img", [3, 2, 1]))
    honest = delta.index_patch(old, new)
    assert patched_index(old, honest.build(), length=new.length, sha256=new.sha256()) == new
    # Well formed, for the right old index, but the wrong result: the order of two blocks.
    wrong = IndexPatch(old.length, new.length, old.sha256(), (Copy(2, 1), Copy(0, 1), Copy(1, 1)))
    with pytest.raises(MalformedDelta, match="signed manifest"):
        patched_index(old, wrong.build(), length=new.length, sha256=new.sha256())
    with pytest.raises(MalformedDelta, match="signed manifest"):
        patched_index(
            old, honest.build(), length=new.length, sha256=new.sha256(), patch_sha256=bytes(32)
        )
    other = delta.index_of_image(image(tmp_path, "v0.img", [1, 2, 4]))
    with pytest.raises(MalformedDelta, match="another release"):
        patched_index(other, honest.build(), length=new.length, sha256=new.sha256())


def test_index_patch_copies_runs_and_gives_only_new_entries_in_full(tmp_path: Path) -> None:
    old = delta.index_of_image(image(tmp_path, "v1.img", list(range(20))))
    new = delta.index_of_image(image(tmp_path, "v2.img", [*range(5, 15), 99, *range(0, 5)]))
    patch = delta.index_patch(old, new)
    assert [(type(op).__name__, op.count) for op in patch.ops] == [
        ("Copy", 10),
        ("Literal", 1),
        ("Copy", 5),
    ]
    assert patch.apply(old) == new


def test_image_changed_since_indexing_is_refused(tmp_path: Path) -> None:
    new = image(tmp_path, "v2.img", [1, 2, 3])
    index = delta.index_of_image(new)
    new.write_bytes(block(1) + block(9) + block(3))
    with pytest.raises(ReadError, match="changed since it was indexed"):
        delta.write_lane(new, index, [(1, 1)], tmp_path / "lane")
    assert not (tmp_path / "lane").exists()
    assert not list(tmp_path.glob(".lane.*"))


def test_run_list_beyond_the_limit_fills_the_shortest_gaps() -> None:
    runs = [(0, 1), (3, 1), (5, 1), (10, 2), (13, 1)]
    # Gaps: 2, 1, 4, 1: the two 1-block gaps go first.
    assert delta._merge_shortest_gaps(runs, 3) == [(0, 1), (3, 3), (10, 4)]
    assert delta._merge_shortest_gaps(runs, 5) == runs
