"""Local reuse (issue 15, delta delivery phase 2) end to end: a device holding the previous ext4
image takes most of the new one from its own blocks and the rest from the carousel.

The images are real: ``mke2fs -d`` of a copy of part of /usr/lib/python3.11 (v1), the same tree
plus 3 MB of new files (v2), and an unrelated tree (dist-packages), each a 96 MiB ext4 image,
built once for the module.  Two tests take the block index from multicast (the signed manifest
binds it): from the index group, or, when the sender serves none, from the carousel; the others
are given it as a file (``--block-index``), built here with the schemas' IndexBuilder.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.plugin.reuse import (
    BlockTable,
    Layout,
    Placement,
    Source,
    _Opened,
    known_symbols,
    scan_source,
)
from otacast.schemas.blockindex import BlockIndex, IndexBuilder
from otacast.schemas.fec import DEFAULT_SYMBOL_SIZE, ceil_div
from otacast.schemas.manifest import parse_envelope

from .netns import LanFactory, stop
from .release import Release, install_command, serve, summary_of

IMAGE_SIZE = "96M"
PYTHON = Path("/usr/lib/python3.11")
OTHER = Path("/usr/lib/python3/dist-packages")
# Seconds for the device to start and join before the sender starts.
JOIN_DELAY = 2.0

pytestmark = pytest.mark.usefixtures("nft_or_skip")


@dataclass(frozen=True)
class Pair:
    v1: Path
    other: Path
    release: Release  # v2, signed
    index: Path  # v2's block index

    @property
    def length(self) -> int:
        return self.release.image.stat().st_size


def _ext4(tree: Path, image: Path) -> None:
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", str(tree), str(image), IMAGE_SIZE],
        check=True,
        capture_output=True,
    )


def _index(image: Path) -> BlockIndex:
    builder = IndexBuilder()
    with image.open("rb") as handle:
        while data := handle.read(4 << 20):
            builder.update(data)
    return builder.finish()


def build_trees(v1: Path, v2: Path) -> None:
    """v1: a copy of /usr/lib/python3.11; v2: the same tree plus 3 MB of new (random) files."""
    shutil.copytree(PYTHON, v1, symlinks=True)
    shutil.copytree(v1, v2, symlinks=True)
    (v2 / "newstuff").mkdir()
    rng = random.Random(15)
    for i in range(3):  # 3 MB of new files
        (v2 / "newstuff" / f"f{i}.bin").write_bytes(rng.randbytes(1 << 20))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    if shutil.which("mke2fs") is None or not PYTHON.is_dir() or not OTHER.is_dir():
        pytest.skip("needs mke2fs, /usr/lib/python3.11 and /usr/lib/python3/dist-packages")
    root = tmp_path_factory.mktemp("reuse")
    v1_tree, v2_tree, other_tree = root / "t1", root / "t2", root / "t3"
    build_trees(v1_tree, v2_tree)
    shutil.copytree(OTHER, other_tree, symlinks=True)
    release_dir = root / "release"
    release_dir.mkdir()
    _ext4(v1_tree, root / "v1.img")
    _ext4(v2_tree, release_dir / "rootfs.img")
    _ext4(other_tree, root / "other.img")
    release = Release.sign(release_dir / "rootfs.img", sequence=7)
    index = release_dir / "rootfs.img.blockindex"
    index.write_bytes(_index(release.image).build())
    return Pair(root / "v1.img", root / "other.img", release, index)


def known_per_chunk(layout: Layout, index: BlockIndex, source: Path) -> list[list[int]]:
    """Per chunk of `layout`, the source ESIs the local pass can take from `source` for the
    image of `index` (the device's own functions; also integration/bench_http_ranges.py's)."""
    table = BlockTable(index)
    placement = Placement(table.index.blocks)
    opened = _Opened(Source(source, "test"))
    try:
        scan_source(opened, 0, table, placement)
    finally:
        opened.close()
    return [known_symbols(layout, chunk, placement.known) for chunk in range(layout.chunks)]


def _known_bytes(pair: Pair, source: Path) -> int:
    """The image bytes the local pass can take from `source`: its known source symbols."""
    manifest = parse_envelope(pair.release.manifest.read_bytes()).manifest
    layout = Layout.of(manifest)
    total = 0
    for chunk, esis in enumerate(known_per_chunk(layout, _index(pair.release.image), source)):
        for esi in esis:
            start, end = layout.symbol_span(chunk, esi)
            total += end - start
    return total


def _install(
    lan: LanFactory,
    pair: Pair,
    tmp_path: Path,
    *args: str,
    index_file: bool = True,
    serve_args: tuple[str, ...] = (),
) -> tuple[dict[str, object], list[str], Path]:
    """Serve v2 and install it with the file installer into ``slot.img`` (whatever the test
    put there first); the fetch summary, the notes, and the slot."""
    net = lan(2)
    sender, device = net.hosts
    slot = tmp_path / "slot.img"
    # The symbols are encoded once (the sender's cache); the device then listens before the
    # sender starts, so that it hears the carousel from its first round: how many datagrams
    # it needs then depends only on which symbols it misses, not on when it joined.
    stop([serve(sender, pair.release, "--rate", "10M", ready=True)])
    command = install_command(
        device,
        pair.release,
        tmp_path / "state",
        tmp_path / "out.img",
        "--installer",
        f"file:{slot}",
        *(("--block-index", str(pair.index)) if index_file else ()),
        "--join-timeout",
        "60",
        *args,
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(JOIN_DELAY)
    tx = serve(sender, pair.release, "--rate", "10M", "--duration", "300s", *serve_args)
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        stop([tx, process])
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "finished"]
    assert finished, events[-3:]
    notes = [str(e["message"]) for e in events if e.get("event") == "note"]
    print(json.dumps(summary_of(finished), sort_keys=True))
    return finished[-1], notes, slot


def _full_download_datagrams(pair: Pair) -> int:
    """The least any download of the whole image from the carousel receives: one datagram per
    source symbol's worth of bytes."""
    return ceil_div(pair.length, DEFAULT_SYMBOL_SIZE)


def test_a_device_holding_v1_in_its_file_slot_gets_v2_mostly_from_its_own_blocks(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    shutil.copyfile(pair.v1, tmp_path / "slot.img")
    summary, notes, slot = _install(lan, pair, tmp_path)
    assert slot.read_bytes() == pair.release.image.read_bytes()
    assert any("blocks of the new image found" in n for n in notes), notes
    local = int(summary["bytes_local"])  # type: ignore[call-overload]
    assert local >= 0.9 * pair.length, summary
    assert local <= _known_bytes(pair, pair.v1)
    # Fewer datagrams than any full download needs (one per symbol).  Counted are the useful
    # ones (new symbols of chunks in progress): all datagrams heard until the last chunk is
    # done also include the other chunks' (late), and how many of those depends on where in
    # the symbol-major carousel the missing symbols of the slowest chunk fall, relative to the
    # sender's wall-clock phase (measured 56814 and 85995 against 84447 for a full download).
    # The <= 5% target needs the delta lane, another phase.
    used = int(summary["symbols_used"])  # type: ignore[call-overload]
    assert used < 0.6 * _full_download_datagrams(pair), summary


def test_without_an_index_file_the_index_groups_signed_index_drives_the_local_pass_early(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    shutil.copyfile(pair.v1, tmp_path / "slot.img")
    summary, notes, slot = _install(lan, pair, tmp_path, index_file=False)
    assert slot.read_bytes() == pair.release.image.read_bytes()
    assert any("index group: joining" in n for n in notes), notes
    assert int(summary["datagrams_index"]) > 0, summary  # type: ignore[call-overload]
    assert any("blocks of the new image found" in n for n in notes), notes
    # The index group brings the index in a small fraction of a pass, before most chunks are
    # done from the carousel, so the local pass supplies most of the image (13-22% when only
    # the carousel's in-band index brought it, late in the pass).
    local = int(summary["bytes_local"])  # type: ignore[call-overload]
    assert 0.8 * pair.length <= local <= _known_bytes(pair, pair.v1), summary


def test_without_an_index_group_the_carousels_signed_index_drives_the_local_pass(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    shutil.copyfile(pair.v1, tmp_path / "slot.img")
    summary, notes, slot = _install(
        lan, pair, tmp_path, index_file=False, serve_args=("--index-share", "0")
    )
    assert slot.read_bytes() == pair.release.image.read_bytes()
    assert summary["index_bytes"] == pair.index.stat().st_size  # IndexReady, signed length
    assert any("index group: nothing received" in n for n in notes), notes
    assert summary["datagrams_index"] == 0
    assert any("blocks of the new image found" in n for n in notes), notes
    # The index object has a small share of the carousel's airtime, so it completes late in
    # the pass and only the chunks still in progress by then gain (22% measured): no bound.
    assert 0 < int(summary["bytes_local"]) <= _known_bytes(pair, pair.v1)  # type: ignore[call-overload]


def test_a_tampered_local_block_is_never_used_and_the_image_is_still_identical(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    v1 = bytearray(pair.v1.read_bytes())
    v2 = pair.release.image.read_bytes()
    # A block of file data v2 keeps at the same place (not zeros): flip one byte of it.
    block = next(
        b
        for b in range(len(v1) // 4096 // 2, len(v1) // 4096)
        if v1[b * 4096 : (b + 1) * 4096] == v2[b * 4096 : (b + 1) * 4096]
        and any(v1[b * 4096 : (b + 1) * 4096])
    )
    v1[block * 4096 + 100] ^= 0x5A
    (tmp_path / "slot.img").write_bytes(v1)
    tampered_known = _known_bytes(pair, tmp_path / "slot.img")
    assert tampered_known < _known_bytes(pair, pair.v1)  # the symbols over that block are out
    summary, _, slot = _install(lan, pair, tmp_path)
    assert slot.read_bytes() == v2
    local = int(summary["bytes_local"])  # type: ignore[call-overload]
    assert 0.85 * pair.length <= local <= tampered_known, summary


def test_a_missing_or_unreadable_source_means_a_full_download_with_a_note(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    (tmp_path / "a-directory").mkdir()  # opens, but reads fail (EISDIR): unreadable
    summary, notes, slot = _install(
        lan,
        pair,
        tmp_path,
        "--reuse-source",
        str(tmp_path / "absent.img"),
        "--reuse-source",
        str(tmp_path / "a-directory"),
    )
    assert slot.read_bytes() == pair.release.image.read_bytes()
    assert any("skipping" in n and "absent.img" in n for n in notes), notes
    assert any("a-directory" in n for n in notes), notes
    assert summary["bytes_local"] == 0
    assert int(summary["datagrams"]) >= _full_download_datagrams(pair), summary  # type: ignore[call-overload]


def test_an_unrelated_image_in_the_slot_still_completes_from_the_carousel(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    shutil.copyfile(pair.other, tmp_path / "slot.img")
    summary, _, slot = _install(lan, pair, tmp_path)
    assert slot.read_bytes() == pair.release.image.read_bytes()
    # (its zero blocks, and little else, are taken locally)
    assert int(summary["bytes_local"]) <= _known_bytes(pair, pair.other)  # type: ignore[call-overload]
