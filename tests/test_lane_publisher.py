"""The delta lane, publisher side (issue 15, phase 3a): ``sign --delta-from`` builds and signs it,
``publish`` writes it, ``serve``'s lane channel sends it at its share of the rate.

v2 is v1 with a few 4 KiB blocks changed and a short tail, so the lane carries exactly those."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
import raptorq

from otacast.schemas import addressing, blockindex, fdt, wire
from otacast.schemas.limits import INDEX_BLOCK_SIZE
from otacast.schemas.manifest import Envelope, Manifest, parse_envelope
from otacast.signer import channels, delta, publish, symbol_cache
from otacast.signer.cli import main
from otacast.signer.errors import UsageError
from otacast.signer.report import Reporter
from otacast.signer.schedule import SendManifest, SendSymbols

CHANNEL = "updates.example.com"
CHANGED = (5, 6, 7, 50, 90)
T = 1208


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 (signed, sequence 1) and v2 (signed with --delta-from v1, sequence 2) in one dir."""
    d = tmp_path_factory.mktemp("lane")
    rng = random.Random(15)
    blocks = [rng.randbytes(INDEX_BLOCK_SIZE) for _ in range(100)]
    (d / "v1.img").write_bytes(b"".join(blocks))
    for n in CHANGED:
        blocks[n] = rng.randbytes(INDEX_BLOCK_SIZE)
    (d / "v2.img").write_bytes(b"".join(blocks) + b"a short tail")
    assert main(["keygen", str(d / "rel")]) == 0
    assert _sign(d, "v1.img", 1) == 0
    assert _sign(d, "v2.img", 2, "--delta-from", str(d / "v1.img.manifest.json")) == 0
    return d


def _sign(d: Path, image: str, sequence: int, *extra: str, channel: str = CHANNEL) -> int:
    return main(
        [
            "sign", str(d / image), "--key", str(d / "rel.key"), "--sequence", str(sequence),
            "--channel", channel, "--device-type", "dev", "--name", "rootfs.img",
            "--out", str(d / f"{image}.manifest.json"), *extra,
        ]
    )  # fmt: skip


def _envelope(path: Path) -> Envelope:
    return parse_envelope(path.read_bytes())


def test_sign_delta_from_lists_the_lane_signer_delta_builds_and_writes_its_files(
    releases: Path, tmp_path: Path
) -> None:
    m = _envelope(releases / "v2.img.manifest.json").manifest
    old = delta.index_of_image(releases / "v1.img")
    new = delta.index_of_image(releases / "v2.img")
    expected = delta.build_delta(releases / "v2.img", new, [old], tmp_path / "lane")
    assert m.delta is not None
    lane = (releases / "v2.img.delta").read_bytes()
    assert lane == (tmp_path / "lane").read_bytes()
    assert (m.delta.length, m.delta.sha256) == (len(lane), hashlib.sha256(lane).digest())
    # The five changed blocks and the short last one (absent from v1).
    assert m.delta.blocks == expected.header.blocks == len(CHANGED) + 1
    (source,) = m.delta.sources
    patch = (releases / "v2.img.patch-1").read_bytes()
    assert patch == expected.patches[0].build()
    assert source.sequence == 1
    assert source.index_sha256 == old.sha256() == _manifest_index(releases / "v1.img.manifest.json")
    assert (source.patch_length, source.patch_sha256) == (
        len(patch),
        hashlib.sha256(patch).digest(),
    )


def _manifest_index(path: Path) -> bytes:
    index = _envelope(path).manifest.index
    assert index is not None
    return index.sha256


def _refused(releases: Path, tmp_path: Path, *args: str, channel: str = CHANNEL) -> int:
    work = tmp_path / "w"
    work.mkdir()
    (work / "v2.img").write_bytes((releases / "v2.img").read_bytes())
    (work / "rel.key").write_bytes((releases / "rel.key").read_bytes())
    (work / "rel.key").chmod(0o600)
    code = _sign(work, "v2.img", 2, *args, channel=channel)
    assert sorted(p.name for p in work.iterdir()) == ["rel.key", "v2.img"]  # nothing written
    return code


def test_sign_refuses_an_old_release_of_another_channel(releases: Path, tmp_path: Path) -> None:
    old = str(releases / "v1.img.manifest.json")
    assert _refused(releases, tmp_path, "--delta-from", old, channel="other.example.com") == 2


def test_sign_refuses_an_old_release_that_is_not_older(releases: Path, tmp_path: Path) -> None:
    newer = str(releases / "v2.img.manifest.json")
    assert _refused(releases, tmp_path, "--delta-from", newer) == 2


def test_sign_refuses_an_old_index_that_does_not_match_the_old_manifest(
    releases: Path, tmp_path: Path
) -> None:
    index = bytearray(delta.index_of_image(releases / "v1.img").build())
    index[40] ^= 1
    bad = tmp_path / "v1.img.blockindex"
    bad.write_bytes(bytes(index))
    old = f"{releases / 'v1.img.manifest.json'}={bad}"
    assert _refused(releases, tmp_path, "--delta-from", old) == 29
    # The genuine index, named the same way, is taken.
    good = tmp_path / "good.blockindex"
    good.write_bytes(delta.index_of_image(releases / "v1.img").build())
    out = tmp_path / "ok"
    out.mkdir()
    (out / "v2.img").write_bytes((releases / "v2.img").read_bytes())
    (out / "rel.key").write_bytes((releases / "rel.key").read_bytes())
    (out / "rel.key").chmod(0o600)
    assert (
        _sign(out, "v2.img", 2, "--delta-from", f"{releases / 'v1.img.manifest.json'}={good}") == 0
    )
    assert (out / "v2.img.delta").read_bytes() == (releases / "v2.img.delta").read_bytes()


def test_sign_refuses_an_old_image_that_is_not_there(releases: Path, tmp_path: Path) -> None:
    old = f"{releases / 'v1.img.manifest.json'}={tmp_path / 'gone.img'}"
    assert _refused(releases, tmp_path, "--delta-from", old) == 12


def test_sign_refuses_a_delta_lane_for_a_container_image(releases: Path, tmp_path: Path) -> None:
    old = str(releases / "v1.img.manifest.json")
    assert _refused(releases, tmp_path, "--delta-from", old, "--format", "swu") == 2


# --- publish and verify ------------------------------------------------------------------------


def test_publish_writes_the_lane_files_beside_the_image(releases: Path, tmp_path: Path) -> None:
    envelope = _envelope(releases / "v2.img.manifest.json")
    root = tmp_path / "www"
    written = publish.publish(envelope, releases / "v2.img", root, releases)
    names = [p.name for p in written]
    assert names == [
        "v2.img", "v2.img.blockindex", "v2.img.delta", "v2.img.patch-1", "v2.img.manifest.json"
    ]  # fmt: skip
    for name in ("v2.img.delta", "v2.img.patch-1"):
        assert (root / name).read_bytes() == (releases / name).read_bytes()


def test_publish_and_verify_refuse_a_lane_file_that_does_not_match(
    releases: Path, tmp_path: Path
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    for name in ("v2.img", "v2.img.manifest.json", "v2.img.delta", "v2.img.patch-1", "rel.pub"):
        (work / name).write_bytes((releases / name).read_bytes())
    patch = bytearray((work / "v2.img.patch-1").read_bytes())
    patch[-1] ^= 1
    (work / "v2.img.patch-1").write_bytes(bytes(patch))
    manifest, image = str(work / "v2.img.manifest.json"), str(work / "v2.img")
    assert main(["publish", manifest, image, "--root", str(tmp_path / "www")]) == 29
    assert not (tmp_path / "www").exists() or not any((tmp_path / "www").iterdir())
    verify = ["verify", manifest, "--trust", str(work / "rel.pub"), "--image", image]
    assert main(verify) == 29
    (work / "v2.img.patch-1").unlink()
    assert main(verify) == 12


# --- the lane's carousel -----------------------------------------------------------------------


def _lane_objects(releases: Path, m: Manifest) -> dict[int, bytes]:
    return {
        wire.LANE_OBJECT_TOI: (releases / "v2.img.delta").read_bytes(),
        wire.LANE_PATCH_TOI: (releases / "v2.img.patch-1").read_bytes(),
    }


def _index_objects(releases: Path) -> dict[int, bytes]:
    return {wire.INDEX_GROUP_TOI: delta.index_of_image(releases / "v2.img").build()}


def _side_datagrams(
    releases: Path, tmp_path: Path, actions: int, side: fdt.SideSession = fdt.LANE
) -> tuple[Manifest, list[bytes], list[bytes]]:
    """(manifest, DATA datagrams, carousel datagrams) of the first `actions` of the core of side
    session `side` (the delta lane, the index group)."""
    envelope = _envelope(releases / "v2.img.manifest.json")
    m = envelope.manifest
    objects: dict[int, Path | bytes] = dict(
        _lane_objects(releases, m) if side is fdt.LANE else _index_objects(releases)
    )
    path = symbol_cache.build_side(m, side, objects, tmp_path / "cache", 0.5)
    layout = symbol_cache.CycleLayout.for_side(m, side, 0.5)
    assert symbol_cache.verify(path, layout) is None
    fragments = channels.side_fragments(envelope, side, layout.datagram_size)
    core = channels.sender_core(m, layout, rate=0, fragments=fragments, now=0.0)
    reader = symbol_cache.SymbolReader(path, layout, 64)
    data: list[bytes] = []
    carousel: list[bytes] = []
    try:
        for _ in range(actions):
            action = core.next_action(0.0)
            if isinstance(action, SendSymbols):
                run = bytes(reader.read(action.chunk, action.first, action.count))
                size = layout.datagram_size
                data += [run[i : i + size] for i in range(0, len(run), size)]
            elif isinstance(action, SendManifest):
                carousel += action.datagrams
    finally:
        reader.close()
    return m, data, carousel


def _lane_datagrams(
    releases: Path, tmp_path: Path, actions: int
) -> tuple[Manifest, list[bytes], list[bytes]]:
    return _side_datagrams(releases, tmp_path, actions)


def _assert_decodes_to(
    data: list[bytes], tsi: int, objects: dict[int, bytes], first_chunk: dict[int, int]
) -> None:
    """Every DATA datagram has `tsi`, and each object's (one source block: SBN 0, chunk
    255 * (TOI - 1)) decodes from its repair symbols on."""
    symbols: dict[int, list[bytes]] = {chunk: [] for chunk in first_chunk.values()}
    for datagram in data:
        packet = wire.parse_datagram(datagram)
        assert isinstance(packet, wire.DataPacket)
        assert packet.tsi == tsi
        symbols[packet.chunk].append(packet.esi.to_bytes(4, "big") + packet.symbol)
    for toi, chunk in first_chunk.items():
        decoder = raptorq.Decoder.with_defaults(len(objects[toi]), T)
        result = None
        # From the repair symbols on: the source symbols alone would prove nothing of the code.
        k = -(-len(objects[toi]) // T)
        for packet in symbols[chunk][k:]:
            result = decoder.decode(packet)
            if result is not None:
                break
        assert result is not None and bytes(result) == objects[toi], toi


def _assert_side_carousel(
    carousel: list[bytes], side: fdt.SideSession, tsi: int, m: Manifest, names: list[str]
) -> None:
    """A side session's carousel: its FDT (its TSI, listing `names`), then the release's
    manifest datagrams with the release's own TSI."""
    parsed = [wire.parse_datagram(d) for d in carousel]
    fdts = [p for p in parsed if isinstance(p, wire.FdtPacket)]
    assert fdts and all(p.tsi == tsi for p in fdts)
    assert len(fdts) == len(side.fdt_datagrams(m))
    xml = side.fdt_xml(m)
    assert xml.count(b"<File ") == len(names)
    assert all(f'Content-Location="{n}"'.encode() in xml for n in names)
    manifests = [p for p in parsed if isinstance(p, wire.ManifestPacket)]
    assert manifests and all(p.tsi == m.tsi for p in manifests)


def test_lane_datagrams_parse_with_the_lane_tsi_and_decode_to_its_objects_but_no_index(
    releases: Path, tmp_path: Path
) -> None:
    m, data, carousel = _lane_datagrams(releases, tmp_path, 400)
    first_chunk = {wire.LANE_OBJECT_TOI: 0, wire.LANE_PATCH_TOI: wire.lane_patch_first_chunk(0)}
    _assert_decodes_to(data, wire.lane_tsi(m.tsi), _lane_objects(releases, m), first_chunk)
    names = [location for _, location, _ in fdt.lane_objects(m)]
    assert names == ["v2.img.delta", "v2.img.patch-1"]  # the full index is the index group's
    _assert_side_carousel(carousel, fdt.LANE, wire.lane_tsi(m.tsi), m, names)


def test_index_group_datagrams_parse_with_the_index_tsi_and_decode_to_the_full_index(
    releases: Path, tmp_path: Path
) -> None:
    m, data, carousel = _side_datagrams(releases, tmp_path, 400, fdt.INDEX_GROUP)
    assert wire.index_tsi(m.tsi) not in (m.tsi, wire.lane_tsi(m.tsi))
    first_chunk = {wire.INDEX_GROUP_TOI: wire.INDEX_GROUP_FIRST_CHUNK}
    _assert_decodes_to(data, wire.index_tsi(m.tsi), _index_objects(releases), first_chunk)
    names = [location for _, location, _ in fdt.index_group_objects(m)]
    assert names == ["v2.img" + blockindex.FILE_SUFFIX]
    _assert_side_carousel(carousel, fdt.INDEX_GROUP, wire.index_tsi(m.tsi), m, names)


def test_the_lane_and_the_index_group_take_their_shares_and_the_carousel_the_rest(
    releases: Path, tmp_path: Path
) -> None:
    envelope = _envelope(releases / "v2.img.manifest.json")
    image = releases / "v2.img"
    options = channels.ServeOptions(
        interface="lo", rates=[1_000_000], cache_dir=tmp_path / "cache", lane_dir=releases
    )
    plan = channels.build_channels(envelope, image, options, _quiet())
    try:
        main_plan, lane_plan, index_plan = plan.channels
        assert (main_plan.rate, main_plan.side) == (860_000, None)
        assert (lane_plan.rate, lane_plan.side) == (100_000, fdt.LANE)
        assert (index_plan.rate, index_plan.side) == (40_000, fdt.INDEX_GROUP)
        m = envelope.manifest
        t = m.transport
        assert lane_plan.group == addressing.ssm_group(t.channel, t.scope, 255)
        assert index_plan.group == addressing.ssm_group(t.channel, t.scope, 254)
        assert len({main_plan.group, lane_plan.group, index_plan.group}) == 3
        cores = [plan.core(c, 0.0, 1_700_000_000.0) for c in plan.channels]
        sent = [0, 0, 0]
        now = 0.0
        while now < 20.0:  # a simulated 20 s, 1 ms steps
            for number, core in enumerate(cores):
                while True:
                    action = core.next_action(now)
                    if isinstance(action, SendSymbols | SendManifest):
                        sent[number] += action.nbytes
                    else:
                        break
            now += 0.001
    finally:
        plan.close()
    lane_share, index_share = sent[1] / sum(sent), sent[2] / sum(sent)
    assert 0.095 < lane_share < 0.105, lane_share
    assert 0.038 < index_share < 0.042, index_share
    assert 19.5e6 < sum(sent) < 20.5e6, sum(sent)


def test_shares_of_zero_send_no_lane_and_no_index_group(releases: Path, tmp_path: Path) -> None:
    envelope = _envelope(releases / "v2.img.manifest.json")
    for lane_share, index_share, sides in [
        (0, 0, []),
        (0, 0.04, [fdt.INDEX_GROUP]),
        (0.1, 0, [fdt.LANE]),
    ]:
        options = channels.ServeOptions(
            interface="lo",
            rates=[1_000_000],
            cache_dir=tmp_path / "c",
            lane_share=lane_share,
            index_share=index_share,
            lane_dir=releases,
        )
        plan = channels.build_channels(envelope, releases / "v2.img", options, _quiet())
        plan.close()
        assert [c.side for c in plan.channels] == [None, *sides]
        assert [s.session for s in plan.sides] == sides
        assert sum(c.rate for c in plan.channels) == 1_000_000


def test_shares_that_leave_the_carousel_nothing_are_refused(releases: Path, tmp_path: Path) -> None:
    envelope = _envelope(releases / "v2.img.manifest.json")
    options = channels.ServeOptions(
        interface="lo",
        rates=[1_000_000],
        cache_dir=tmp_path / "c",
        lane_share=0.6,
        index_share=0.4,
        lane_dir=releases,
    )
    with pytest.raises(UsageError, match="leave the carousel nothing"):
        channels.build_channels(envelope, releases / "v2.img", options, _quiet())


def _quiet() -> Reporter:
    return Reporter(io.StringIO(), True)
