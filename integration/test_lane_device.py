"""The device on the delta lane (issue 15, phase 3b) end to end: a device holding release v1 in its
file installer's slot installs v2 while receiving at most 5% of the image's datagrams.

The images are real 96 MiB ext4 images (``mke2fs -d``, as in test_reuse): v1 of a copy of
/usr/lib/python3.11, v2 of the same tree plus 3 MB of new files.  v2 is signed with
``--delta-from`` v1, and ``serve`` sends its lane at the default 10% share.  The device's
state directory records v1 as installed the way `deliver` does (`release.holding`:
`stage_index` then `write_installed`, so ``installed.json`` and ``installed.blockindex``; the
end-to-end mode of integration/bench_delta.py sets its devices up the same way).  The datagrams
counted are every datagram the device's sockets handed it (``datagrams``: the core's, including
the manifest's on the lane and the carousel's if it joined it; ``datagrams_lane``: the lane's
DATA; ``datagrams_index``: the index group's DATA, for a device without the installed index).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.plugin.installed import INDEX
from otacast.schemas.fec import DEFAULT_SYMBOL_SIZE, ceil_div

from .netns import LanFactory, stop
from .release import (
    SLOT,
    Release,
    clear_loss,
    holding,
    install_into_slot,
    random_loss,
    received_datagrams,
    serve,
)
from .test_reuse import PYTHON, _ext4, _index, build_trees

pytestmark = pytest.mark.usefixtures("nft_or_skip")

V1_SEQUENCE, V2_SEQUENCE = 6, 7
# The bound: datagrams received on all sockets per datagram of the image.
LANE_BUDGET = 0.05


@dataclass(frozen=True)
class Releases:
    v1: Release
    v2: Release

    @property
    def image_datagrams(self) -> int:
        return ceil_div(self.v2.image.stat().st_size, DEFAULT_SYMBOL_SIZE)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    if shutil.which("mke2fs") is None or not PYTHON.is_dir():
        pytest.skip("needs mke2fs and /usr/lib/python3.11")
    root = tmp_path_factory.mktemp("lane")
    v1_tree, v2_tree = root / "t1", root / "t2"
    build_trees(v1_tree, v2_tree)
    (root / "v1").mkdir()
    (root / "v2").mkdir()
    _ext4(v1_tree, root / "v1" / "rootfs.img")
    _ext4(v2_tree, root / "v2" / "rootfs.img")
    v1 = Release.sign(root / "v1" / "rootfs.img", sequence=V1_SEQUENCE)
    v2 = Release.sign(
        root / "v2" / "rootfs.img",
        sequence=V2_SEQUENCE,
        extra=("--delta-from", str(v1.manifest)),
        key_from=v1,
    )
    return Releases(v1, v2)


def _install_v2(
    lan: LanFactory,
    releases: Releases,
    tmp_path: Path,
    state: Path,
    *args: str,
    loss: int = 0,
    serve_extra: tuple[str, ...] = (),
) -> tuple[dict[str, object], list[str]]:
    """Serve v2 (with its lane; `serve_extra` more options) and install it into the slot with
    the file installer; the fetch summary and the notes."""
    net = lan(2)
    sender, device = net.hosts
    # Per-datagram loss needs datagrams that are not coalesced (GSO) on the way.
    serve_args = ("--rate", "10M", "--duration", "300s", *serve_extra)
    serve_args += ("--no-gso",) if loss else ()
    tx = serve(sender, releases.v2, *serve_args, ready=True)
    if loss:
        random_loss(device, loss)
    try:
        done = install_into_slot(device, releases.v2, tmp_path, state, *args, timeout=240)
    finally:
        stop([tx])
        if loss:
            clear_loss(device)
    assert done.returncode == 0, done.failure()
    print(json.dumps(done.summary, sort_keys=True))
    print("\n".join(done.notes))
    return done.summary, done.notes


def _assert_v2_installed(releases: Releases, tmp_path: Path, state: Path) -> None:
    assert (tmp_path / SLOT).read_bytes() == releases.v2.image.read_bytes()
    # The install kept v2's block index for the next release's lane (deliver's one path).
    assert (state / INDEX).read_bytes() == _index(releases.v2.image).build()


@pytest.mark.parametrize("loss", [0, 10])
def test_a_device_on_v1_installs_v2_from_the_delta_lane_receiving_at_most_5_percent(
    lan: LanFactory, releases: Releases, tmp_path: Path, loss: int
) -> None:
    state = holding(releases.v1, tmp_path)
    summary, notes = _install_v2(lan, releases, tmp_path, state, loss=loss)
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] == V1_SEQUENCE, notes
    assert summary["lane_index"] == "patch", notes  # the installed index + the lane's patch
    received = received_datagrams(summary)
    print(f"received {received} of {releases.image_datagrams} image datagrams at {loss}% loss")
    assert received <= LANE_BUDGET * releases.image_datagrams, summary
    assert int(summary["bytes_local"]) == releases.v2.image.stat().st_size  # type: ignore[call-overload]
    # Not one datagram of the full index: the lane carries none, the index group is not joined.
    assert summary["datagrams_index"] == 0 and not any("index group" in n for n in notes), notes


def test_a_device_without_the_installed_index_takes_the_full_index_from_the_index_group(
    lan: LanFactory, releases: Releases, tmp_path: Path
) -> None:
    state = holding(releases.v1, tmp_path, index=False)
    summary, notes = _install_v2(lan, releases, tmp_path, state)
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] == V1_SEQUENCE, notes
    assert summary["lane_index"] == "full", notes
    assert any("index group: joining" in n for n in notes), notes
    assert int(summary["datagrams_index"]) > 0, summary  # type: ignore[call-overload]
    assert received_datagrams(summary) <= LANE_BUDGET * releases.image_datagrams, summary


def test_without_an_index_group_a_device_without_the_installed_index_takes_the_carousels(
    lan: LanFactory, releases: Releases, tmp_path: Path
) -> None:
    state = holding(releases.v1, tmp_path, index=False)
    summary, notes = _install_v2(lan, releases, tmp_path, state, serve_extra=("--index-share", "0"))
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] == V1_SEQUENCE and summary["lane_index"] == "full", notes
    assert any("index group: nothing received" in n for n in notes), notes
    assert any("no block index on the index group" in n for n in notes), notes
    assert summary["datagrams_index"] == 0


def test_a_device_on_a_release_the_lane_does_not_list_gets_v2_from_the_full_carousel(
    lan: LanFactory, releases: Releases, tmp_path: Path
) -> None:
    state = holding(releases.v1, tmp_path)
    summary, notes = _install_v2(
        lan, releases, tmp_path, state, "--installed-sequence", str(V1_SEQUENCE - 1)
    )
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] is None
    assert any("delta lane not used" in n and "not among" in n for n in notes), notes
    assert int(summary["datagrams_lane"]) < 0.05 * releases.image_datagrams  # type: ignore[call-overload]


def test_a_device_without_a_readable_source_gets_v2_from_the_full_carousel(
    lan: LanFactory, releases: Releases, tmp_path: Path
) -> None:
    state = holding(releases.v1, tmp_path)
    (tmp_path / SLOT).unlink()  # the installer's target (the only source) is gone
    summary, notes = _install_v2(lan, releases, tmp_path, state)
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] is None
    assert any("no readable local source" in n for n in notes), notes
    assert int(summary["bytes_multicast"]) > 0.9 * releases.v2.image.stat().st_size  # type: ignore[call-overload]
