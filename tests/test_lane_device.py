"""The device's side of the delta lane, pure parts: the decision, the lane core assembling the
lane object and the index patch (or the full index) from real lane datagrams, the installed
index kept beside the record, and symbols known from lane and local blocks together."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from otacast.plugin.installed import INDEX, read_installed_index, stage_index, write_installed
from otacast.plugin.lane import IndexGroupCore, LaneChoice, LaneCore, lane_choice
from otacast.plugin.receive import side_rejections
from otacast.plugin.reuse import Layout, Placement, known_symbols
from otacast.schemas import fdt, wire
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.manifest import Manifest
from otacast.schemas.policy import VerifiedManifest
from otacast.signer import delta

from .test_lane_publisher import (
    _envelope,
    _index_objects,
    _lane_datagrams,
    _lane_objects,
    _side_datagrams,
    releases,
)

__all__ = ["releases"]  # the fixture, shared with the publisher's tests


def _v2(releases: Path) -> Manifest:
    return _envelope(releases / "v2.img.manifest.json").manifest


def _v1_index(releases: Path) -> tuple[BlockIndex, bytes]:
    index = delta.index_of_image(releases / "v1.img")
    return index, hashlib.sha256(index.build()).digest()


def test_the_lane_is_taken_only_by_a_listed_release_with_a_readable_source(
    releases: Path,
) -> None:
    m = _v2(releases)
    v1 = _v1_index(releases)
    choice = lane_choice(m, 1, v1, 1)
    assert isinstance(choice, LaneChoice)
    assert choice.source.sequence == 1 and choice.old_index == v1[0]
    assert "not among" in str(lane_choice(m, 0, v1, 1))
    assert "no installed release" in str(lane_choice(m, None, v1, 1))
    assert "no readable local source" in str(lane_choice(m, 1, v1, 0))
    container = dataclasses.replace(m, image=dataclasses.replace(m.image, format="mender"))
    assert "raw images" in str(lane_choice(container, 1, v1, 1))
    assert "no delta lane" in str(lane_choice(dataclasses.replace(m, delta=None), 1, v1, 1))
    # An installed index that is not the listed release's: the lane, with the full index.
    other = lane_choice(m, 1, (v1[0], bytes(32)), 1)
    assert isinstance(other, LaneChoice) and other.old_index is None


def on_v1(releases: Path, tmp_path: Path) -> tuple[Manifest, list[bytes], LaneChoice]:
    """v2's manifest, its lane datagrams (400 repair symbols) and the choice of a device on
    v1 holding v1's index."""
    m, data, _ = _lane_datagrams(releases, tmp_path, 400)
    choice = lane_choice(m, 1, _v1_index(releases), 1)
    assert isinstance(choice, LaneChoice)
    return m, data, choice


def _run(core: LaneCore, data: list[bytes]) -> None:
    for datagram in data:
        core.receive(datagram)


def test_the_lane_core_builds_the_new_index_from_the_patch_and_verifies_the_lane_object(
    releases: Path, tmp_path: Path
) -> None:
    m, data, choice = on_v1(releases, tmp_path)
    core = LaneCore(m, choice)
    assert not core.needs_index  # the patch makes it
    _run(core, data)
    assert core.done and core.index_from_patch and not core.rejected and not core.needs_index
    assert core.choice.old_index is None  # let go once the patch is applied
    assert core.index is not None
    assert core.index.build() == _index_objects(releases)[wire.INDEX_GROUP_TOI]
    assert core.lane_object == _lane_objects(releases, m)[wire.LANE_OBJECT_TOI]


def test_a_lane_device_without_the_installed_index_needs_the_index_group(
    releases: Path, tmp_path: Path
) -> None:
    m, data, _ = _lane_datagrams(releases, tmp_path, 400)
    choice = lane_choice(m, 1, None, 1)
    assert isinstance(choice, LaneChoice) and choice.old_index is None
    core = LaneCore(m, choice)
    _run(core, data)
    # The lane alone brings the object, never an index: the index group's core does.
    assert core.lane_object is not None and core.needs_index and not core.done
    _, index_data, _ = _side_datagrams(releases, tmp_path, 400, fdt.INDEX_GROUP)
    group = IndexGroupCore(m)
    _run_index(group, index_data)
    assert group.index is not None and not group.rejected
    core.take_index(group.index)
    assert core.done and not core.needs_index and not core.index_from_patch


def _run_index(core: IndexGroupCore, data: list[bytes]) -> None:
    for datagram in data:
        core.receive(datagram)


def test_a_patch_that_does_not_give_the_signed_index_is_refused_and_the_full_index_needed(
    releases: Path, tmp_path: Path
) -> None:
    m, data, _ = _lane_datagrams(releases, tmp_path, 800)
    # The device believes it holds v1's index, but holds another: the patch's result differs.
    wrong = delta.index_of_image(releases / "v2.img")
    v1 = m.delta.sources[0] if m.delta else None
    assert v1 is not None
    core = LaneCore(m, LaneChoice(v1, 0, wrong))
    assert not core.needs_index
    _run(core, data)
    assert core.rejected["patch-mismatch"] == 1
    assert core.index is None and core.needs_index  # the driver joins the index group
    _, index_data, _ = _side_datagrams(releases, tmp_path, 400, fdt.INDEX_GROUP)
    group = IndexGroupCore(m)
    _run_index(group, index_data)
    assert group.index is not None
    core.take_index(group.index)
    assert core.index is not None and not core.index_from_patch and core.done
    assert core.index.build() == _index_objects(releases)[wire.INDEX_GROUP_TOI]


def test_hostile_lane_datagrams_are_counted_rejections(releases: Path, tmp_path: Path) -> None:
    m, data, choice = on_v1(releases, tmp_path)
    core = LaneCore(m, choice)
    first = bytearray(data[0])
    other_tsi = bytearray(first)
    other_tsi[8:12] = (wire.lane_tsi(m.tsi) ^ 1).to_bytes(4, "big")
    core.receive(bytes(other_tsi))
    core.receive(bytes(first) + b"x")  # a symbol of the wrong length
    forged = bytearray(first)
    forged[-1] ^= 0xFF  # a forged symbol: the object fails its hash and is collected again
    core.receive(bytes(forged))
    _run(core, data[1:])
    assert core.rejected["other-session"] == 1 and core.rejected["symbol-length"] == 1
    assert core.rejected["lane-mismatch"] == 1
    _run(core, data)  # the next round completes it from honest symbols
    assert core.lane_object == _lane_objects(releases, m)[wire.LANE_OBJECT_TOI]


def test_hostile_index_group_datagrams_are_counted_rejections(
    releases: Path, tmp_path: Path
) -> None:
    m, data, _ = _side_datagrams(releases, tmp_path, 400, fdt.INDEX_GROUP)
    _, lane_data, _ = _lane_datagrams(releases, tmp_path, 20)
    group = IndexGroupCore(m)
    first = bytes(data[0])
    assert not group.receive(lane_data[0])  # the lane's TSI: another session
    assert not group.receive(first + b"x")  # a symbol of the wrong length
    other_toi = bytearray(first)
    other_toi[12:16] = wire.LANE_OBJECT_TOI.to_bytes(4, "big")  # (the TOI follows the TSI)
    group.receive(bytes(other_toi))
    forged = bytearray(first)
    forged[-1] ^= 0xFF  # the index fails its signed hash and is collected afresh
    group.receive(bytes(forged))
    _run_index(group, data[1:])
    assert group.rejected == {
        "other-session": 1,
        "symbol-length": 1,
        "bad-toi": 1,
        "index-mismatch": 1,
    }, group.rejected
    # Collected afresh from the honest symbols that followed, then the rest ignored.
    assert group.index is not None
    assert group.index.build() == _index_objects(releases)[wire.INDEX_GROUP_TOI]
    assert group.datagrams == len(data) + 3 and group.ignored > 0


def test_side_group_rejections_reach_the_summary_named_after_their_group(
    releases: Path, tmp_path: Path
) -> None:
    m, data, choice = on_v1(releases, tmp_path)
    lane = LaneCore(m, choice)
    lane.receive(bytes(data[0]) + b"x")  # a symbol of the wrong length
    group = IndexGroupCore(m)
    group.receive(data[0])  # the lane's TSI on the index group: another session
    group.receive(data[0])
    assert side_rejections(lane.rejected, group.rejected) == {
        "lane:symbol-length": 1,
        "index:other-session": 2,
    }
    assert side_rejections(None, None) == {}


def test_symbols_are_known_from_lane_and_local_blocks_together() -> None:
    layout = Layout(length=10 * 4096, chunk_size=10 * 4096, symbol_size=1208)
    placement = Placement(10)
    for block in range(10):
        if block != 3:
            placement.put(block, 0, block)  # local copies
    without = set(known_symbols(layout, 0, placement.known))
    # Block 3 from the lane (another source): the symbols touching it become known.
    assert placement.put(3, 1, 0) and not placement.put(3, 0, 3)
    with_lane = set(known_symbols(layout, 0, placement.known))
    touching = {e for e in range(34) if {(e * 1208) // 4096, (e * 1208 + 1207) // 4096} & {3}}
    assert touching and not touching & without and with_lane == without | touching
    assert placement.get(3) == (1, 0)


def test_an_install_keeps_the_releases_block_index_and_drops_an_older_one(
    releases: Path, tmp_path: Path
) -> None:
    v2 = _envelope(releases / "v2.img.manifest.json")
    verified = VerifiedManifest(v2, ("test",))
    assert stage_index(tmp_path, verified, releases / "v2.img")
    write_installed(tmp_path, verified, "installed")
    kept = read_installed_index(tmp_path)
    assert kept is not None and kept[0] == delta.index_of_image(releases / "v2.img")
    assert m_index_sha(v2.manifest) == kept[1]
    # A release recorded without a matching pending index leaves none (not v2's for v1).
    v1 = VerifiedManifest(_envelope(releases / "v1.img.manifest.json"), ("test",))
    assert not stage_index(tmp_path, v1, releases / "v2.img")  # v2's bytes are not v1's index
    write_installed(tmp_path, v1, "installed")
    assert not (tmp_path / INDEX).exists() and read_installed_index(tmp_path) is None


def m_index_sha(m: Manifest) -> bytes:
    assert m.index is not None
    return m.index.sha256


@pytest.mark.parametrize("garbage", [b"", b"OCBI", b"OCBI\x01\x0c\x10\x00" + b"\xff" * 8])
def test_a_malformed_installed_index_is_no_index(tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / INDEX).write_bytes(garbage)
    assert read_installed_index(tmp_path) is None
