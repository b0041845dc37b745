"""The lane object put together on disk (`otacast.plugin.object_file.FileAssembly`): it
completes with or without loss, a forged symbol never gives a wrong object, and its memory does
not grow with the object."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from otacast.plugin.lane import LaneAssembly, LaneCore
from otacast.plugin.object_file import SPOOL_SUFFIX, FileAssembly, VerifiedObject
from otacast.schemas import fec, wire
from otacast.schemas.fec import Part
from otacast.signer.encoder import raptorq_encode

from .test_lane_device import _run, on_v1
from .test_lane_publisher import _lane_objects, releases

__all__ = ["releases"]

T = 1208
CHUNK = 6944 * T  # the signer's default chunk size (8388352 bytes)


def _packets(data: bytes, part: Part, repair: int) -> list[list[bytes]]:
    """Each block's codec packets (K source, then `repair` repair symbols), SBN set."""
    blocks = []
    for block in range(part.blocks):
        offset, length = part.block_span(block, T)
        packets = raptorq_encode(data[offset : offset + length], T, repair)
        blocks.append([bytes([block]) + p[1:] for p in packets])
    return blocks


def _round_robin(blocks: list[list[bytes]]) -> Iterator[tuple[int, int, bytes]]:
    """(block, ESI, packet) taking one packet of each block in turn, as a carousel mixes them."""
    for at in range(max(len(b) for b in blocks)):
        for block, packets in enumerate(blocks):
            if at < len(packets):
                yield block, int.from_bytes(packets[at][1:4], "big"), packets[at]


def _feed(
    assembly: FileAssembly, packets: Iterator[tuple[int, int, bytes]]
) -> VerifiedObject | list[str]:
    reasons = []
    for block, esi, packet in packets:
        result = assembly.feed(block, esi, packet)
        if isinstance(result, VerifiedObject):
            return result
        if isinstance(result, str):
            reasons.append(result)
    return reasons


def test_an_object_of_three_blocks_completes_on_disk_and_its_spool_is_removed(
    tmp_path: Path,
) -> None:
    data = random.Random(1).randbytes(2 * CHUNK + 12345)
    part = fec.part(len(data), CHUNK, T, 0)
    assert part.blocks == 3
    assembly = FileAssembly(part, hashlib.sha256(data).digest(), T, tmp_path / "lane.object")
    result = _feed(assembly, _round_robin(_packets(data, part, 4)))
    assert isinstance(result, VerifiedObject) and result.length == len(data)
    assert result.path.read_bytes() == data
    assert b"".join(result.pieces(5, 65536)) == data[5:]
    assert assembly.decodes == 0  # every source symbol came: copied, no codec
    assert not (tmp_path / ("lane.object" + SPOOL_SUFFIX)).exists()


def test_lost_source_symbols_are_decoded_from_repair_symbols_read_back_from_the_spool(
    tmp_path: Path,
) -> None:
    rng = random.Random(2)
    data = rng.randbytes(CHUNK + 999)
    part = fec.part(len(data), CHUNK, T, 0)
    lossy = (p for p in _round_robin(_packets(data, part, 300)) if rng.random() >= 0.03)
    assembly = FileAssembly(part, hashlib.sha256(data).digest(), T, tmp_path / "lane.object")
    result = _feed(assembly, lossy)
    assert isinstance(result, VerifiedObject) and result.path.read_bytes() == data
    assert assembly.decodes == part.blocks


def test_a_forged_symbol_spoils_the_hash_and_the_object_is_collected_afresh(
    tmp_path: Path,
) -> None:
    data = random.Random(3).randbytes(CHUNK + 5000)
    part = fec.part(len(data), CHUNK, T, 0)
    blocks = _packets(data, part, 4)
    forged = bytearray(blocks[1][7])
    forged[-1] ^= 0xFF
    assembly = FileAssembly(part, hashlib.sha256(data).digest(), T, tmp_path / "lane.object")
    assert assembly.feed(1, 7, bytes(forged)) is None
    first = _feed(assembly, _round_robin(blocks))
    assert first == ["lane-mismatch"]  # the round's honest symbol 7 of block 1 was a duplicate
    assert assembly.duplicates > 0
    second = _feed(assembly, _round_robin(blocks))
    assert isinstance(second, VerifiedObject) and second.path.read_bytes() == data
    assert assembly.feed(2, 0, blocks[0][0]) == "lane-block"


def test_assembling_a_40_mb_object_on_disk_holds_a_few_mb_of_python_memory(
    tmp_path: Path,
) -> None:
    data = random.Random(4).randbytes(5 * CHUNK)
    part = fec.part(len(data), CHUNK, T, 0)
    blocks = _packets(data, part, 0)
    sha256 = hashlib.sha256(data).digest()
    del data
    assembly = FileAssembly(part, sha256, T, tmp_path / "lane.object")
    tracemalloc.start()
    try:
        result = _feed(assembly, _round_robin(blocks))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, VerifiedObject) and result.length == 5 * CHUNK
    # In memory (`ObjectAssembly`) the decoded blocks and their join alone are twice 40 MB.
    assert peak < 4 * 1024 * 1024


def test_the_lane_core_given_a_file_assembly_verifies_the_lane_object_on_disk(
    releases: Path, tmp_path: Path
) -> None:
    m, data, choice = on_v1(releases, tmp_path)
    path = tmp_path / "lane.object"

    def on_disk(part: Part, sha256: bytes, symbol_size: int) -> LaneAssembly:
        return FileAssembly(part, sha256, symbol_size, path)

    core = LaneCore(m, choice, assemble=on_disk)
    first = bytearray(data[0])
    first[-1] ^= 0xFF  # a forged symbol: the object fails its hash and is collected again
    core.receive(bytes(first))
    _run(core, data[1:])
    assert core.rejected["lane-mismatch"] == 1
    _run(core, data)  # (the next round, if the rest of this one was not enough)
    assert isinstance(core.lane_object, VerifiedObject) and core.done
    assert path.read_bytes() == _lane_objects(releases, m)[wire.LANE_OBJECT_TOI]
