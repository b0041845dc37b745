"""The delta lane on a real namespaced LAN (issue 15, phase 3a): ``serve`` of a release signed with
``--delta-from`` sends a second FLUTE session on the lane's SSM group and a third, the full block
index alone, on the index group's, observed by bare listeners on those groups and on the main
one."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import raptorq

from otacast.schemas import addressing, wire
from otacast.schemas.manifest import parse_envelope
from otacast.signer.delta import index_of_image

from .netns import BIN, Lan, LanFactory, stop
from .release import Release, serve_command

RAWRECV = str(Path(__file__).with_name("rawrecv.py"))
BLOCK = 4096
CHANGED = (3, 100, 101, 700, 1020)


def _releases(tmp_path: Path) -> Release:
    """v1 (4 MiB, sequence 1) and v2 (v1 with five 4 KiB blocks changed, signed with
    --delta-from v1); returns v2."""
    v1 = Release.make(tmp_path / "v1", 4 * 1024 * 1024, sequence=1, chunk="1M")
    data = bytearray(v1.image.read_bytes())
    for n in CHANGED:
        data[n * BLOCK : (n + 1) * BLOCK] = bytes([n % 251]) * BLOCK
    (tmp_path / "v2").mkdir()
    for suffix in (".key", ".pub"):
        source = v1.public.with_suffix(suffix)
        (tmp_path / "v2" / source.name).write_bytes(source.read_bytes())
        (tmp_path / "v2" / source.name).chmod(0o600)
    image = tmp_path / "v2" / "rootfs.img"
    image.write_bytes(bytes(data))
    return Release.sign(image, sequence=2, chunk="1M", extra=("--delta-from", str(v1.manifest)))


def _listen(
    lan: Lan, host: int, group: str, port: int, seconds: float, dump: Path
) -> subprocess.Popen[str]:
    return lan.hosts[host].popen(
        str(BIN / "python"), RAWRECV, "eth0", group, str(port), str(seconds), "--dump", str(dump),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _result(process: subprocess.Popen[str]) -> dict[str, object]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    loaded: dict[str, object] = json.loads(out)
    return loaded


def _datagrams(dump: Path) -> list[bytes]:
    data = dump.read_bytes()
    out, offset = [], 0
    while offset < len(data):
        n = int.from_bytes(data[offset : offset + 2], "big")
        out.append(data[offset + 2 : offset + 2 + n])
        offset += 2 + n
    return out


def _assert_side_session(seen: dict[str, object], tsi: int, release_tsi: int) -> None:
    """What a listener on a side group heard: that session's FDT and DATA, and the release's
    MANIFEST datagrams (with the release's own TSI), nothing else."""
    kinds: dict[str, int] = seen["kinds"]  # type: ignore[assignment]
    assert seen["problems"] == {}
    assert set(kinds) == {"data", "fdt", "manifest"}
    assert seen["sessions"] == {
        f"{tsi:08x}": kinds["data"] + kinds["fdt"],
        f"{release_tsi:08x}": kinds["manifest"],
    }


def test_serve_sends_the_delta_lane_and_the_index_group_on_their_own_groups_and_sessions(
    lan: LanFactory, tmp_path: Path
) -> None:
    v2 = _releases(tmp_path)
    m = parse_envelope(v2.manifest.read_bytes()).manifest
    assert m.delta is not None
    lane_group = addressing.ssm_group(m.transport.channel, m.transport.scope, 255)
    index_group = addressing.ssm_group(m.transport.channel, m.transport.scope, 254)
    lane_tsi = wire.lane_tsi(m.tsi)
    net = lan(4)
    port = m.transport.port
    lane_rx = _listen(net, 1, lane_group, port, 4.0, tmp_path / "lane.dump")
    main_rx = _listen(net, 2, m.transport.ssm_group, port, 4.0, tmp_path / "main.dump")
    index_rx = _listen(net, 3, index_group, port, 4.0, tmp_path / "index.dump")
    time.sleep(0.3)
    tx = subprocess.Popen(
        serve_command(net.hosts[0], v2, tmp_path / "cache", "--rate", "4M", "--duration", "3s"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lane_seen, main_seen = _result(lane_rx), _result(main_rx)
        index_seen = _result(index_rx)
        out, err = tx.communicate(timeout=60)
    finally:
        stop([lane_rx, main_rx, index_rx, tx])
    assert tx.returncode == 0, err
    finished = [json.loads(line) for line in out.splitlines()][-1]
    assert finished["event"] == "finished" and finished["lane_packets"] > 0

    # The lane group: the lane session's FDT and DATA, and the release's manifest datagrams.
    _assert_side_session(lane_seen, lane_tsi, m.tsi)
    # The lane object (TOI 1, one source block: chunk 0) decodes byte-identical to the file
    # sign wrote, from what was heard.
    expected = (v2.directory / "rootfs.img.delta").read_bytes()
    decoder = raptorq.Decoder.with_defaults(len(expected), m.fec.symbol_size)
    decoded = None
    chunks = set()
    for datagram in _datagrams(tmp_path / "lane.dump"):
        packet = wire.parse_datagram(datagram)
        assert isinstance(packet, wire.DataPacket) and packet.tsi == lane_tsi
        chunks.add(packet.chunk)
        if packet.chunk == 0 and decoded is None:
            decoded = decoder.decode(packet.esi.to_bytes(4, "big") + packet.symbol)
    assert decoded is not None and bytes(decoded) == expected
    # Both objects were on the air: the lane object and the patch for release 1, not the index.
    assert chunks == {0, wire.lane_patch_first_chunk(0)}

    # The index group: its own session's FDT and DATA (the full index alone, which decodes to
    # v2's index) and the release's manifest datagrams.
    _assert_side_session(index_seen, wire.index_tsi(m.tsi), m.tsi)
    expected = index_of_image(v2.image).build()
    decoder = raptorq.Decoder.with_defaults(len(expected), m.fec.symbol_size)
    decoded = None
    for datagram in _datagrams(tmp_path / "index.dump"):
        packet = wire.parse_datagram(datagram)
        assert isinstance(packet, wire.DataPacket) and packet.tsi == wire.index_tsi(m.tsi)
        assert packet.chunk == wire.INDEX_GROUP_FIRST_CHUNK  # one source block at this size
        if decoded is None:
            decoded = decoder.decode(packet.esi.to_bytes(4, "big") + packet.symbol)
    assert decoded is not None and bytes(decoded) == expected

    # The main group: the carousel as before, nothing of the lane.
    main_kinds: dict[str, int] = main_seen["kinds"]  # type: ignore[assignment]
    assert main_seen["problems"] == {}
    assert main_seen["sessions"] == {f"{m.tsi:08x}": sum(main_kinds.values())}
    assert {c for _, c, _ in main_seen["symbols"]} == set(range(m.chunk_count))  # type: ignore[attr-defined]
    # The lane's share of the datagrams on the air, as the operator sees it.
    lane_share = finished["lane_bytes"] / finished["bytes"]
    print(f"lane: {finished['lane_packets']} of {finished['packets']} datagrams, {lane_share:.2%}")
    assert 0.08 < lane_share < 0.12
    index_share = finished["index_bytes"] / finished["bytes"]
    print(f"index group: {finished['index_packets']} datagrams, {index_share:.2%}")
    assert 0.03 < index_share < 0.05
