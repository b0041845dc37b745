"""The device on the delta lane (issue 15, phase 3b) end to end: a device holding release v1 in its
file installer's slot installs v2 while receiving at most 5% of the image's datagrams.

The images are real 96 MiB ext4 images (``mke2fs -d``, as in test_reuse): v1 of a copy of
/usr/lib/python3.11, v2 of the same tree plus 3 MB of new files.  v2 is signed with
``--delta-from`` v1, and ``serve`` sends its lane at the default 10% share.  The device's
state directory records v1 as installed the way `deliver` does (`stage_index` then
`write_installed`: ``installed.json`` and ``installed.blockindex``).  The datagrams counted are
every datagram the device's sockets handed it (``datagrams``: the core's, including the
manifest's on the lane and the carousel's if it joined it; ``datagrams_lane``: the lane's DATA).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.plugin.installed import INDEX, stage_index, write_installed
from otacast.plugin.trust import load_trust
from otacast.plugin.verify import check_signature
from otacast.schemas.fec import DEFAULT_SYMBOL_SIZE, ceil_div
from otacast.schemas.policy import VerifiedManifest, verify_envelope

from .netns import LanFactory, stop
from .release import Release, clear_loss, install_command, random_loss, serve, summary_of
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
    for name in ("release.key", "release.pub"):
        shutil.copy2(root / "v1" / name, root / "v2" / name)
    v2 = Release.sign(
        root / "v2" / "rootfs.img",
        sequence=V2_SEQUENCE,
        extra=("--delta-from", str(v1.manifest)),
    )
    return Releases(v1, v2)


def _verified(release: Release) -> VerifiedManifest:
    trust = load_trust([release.public], 1)
    return verify_envelope(release.manifest.read_bytes(), trust, check_signature, now=time.time())


def _holding_v1(releases: Releases, tmp_path: Path, *, index: bool = True) -> Path:
    """The device's slot holds v1 and its state directory records it as installed (with its
    block index unless `index` is false); the state directory."""
    shutil.copyfile(releases.v1.image, tmp_path / "slot.img")
    state = tmp_path / "state"
    state.mkdir()
    verified = _verified(releases.v1)
    if index:
        assert stage_index(state, verified, releases.v1.image)
    write_installed(state, verified, "installed")
    assert (state / INDEX).exists() == index
    return state


def _install_v2(
    lan: LanFactory, releases: Releases, tmp_path: Path, state: Path, *args: str, loss: int = 0
) -> tuple[dict[str, object], list[str]]:
    """Serve v2 (with its lane) and install it into ``slot.img`` with the file installer; the
    fetch summary and the notes."""
    net = lan(2)
    sender, device = net.hosts
    # Per-datagram loss needs datagrams that are not coalesced (GSO) on the way.
    serve_args = ("--rate", "10M", "--duration", "300s") + (("--no-gso",) if loss else ())
    tx = serve(sender, releases.v2, *serve_args, ready=True)
    if loss:
        random_loss(device, loss)
    command = install_command(
        device,
        releases.v2,
        state,
        tmp_path / "out.img",
        "--installer",
        f"file:{tmp_path / 'slot.img'}",
        "--join-timeout",
        "30",
        *args,
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    finally:
        stop([tx])
        if loss:
            clear_loss(device)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = summary_of([e for e in events if e.get("event") == "finished"])
    notes = [str(e["message"]) for e in events if e.get("event") == "note"]
    print(json.dumps(summary, sort_keys=True))
    print("\n".join(notes))
    return summary, notes


def _received(summary: dict[str, object]) -> int:
    """Every datagram the device's sockets handed it."""
    return int(summary["datagrams"]) + int(summary["datagrams_lane"])  # type: ignore[call-overload]


def _assert_v2_installed(releases: Releases, tmp_path: Path, state: Path) -> None:
    assert (tmp_path / "slot.img").read_bytes() == releases.v2.image.read_bytes()
    # The install kept v2's block index for the next release's lane (deliver's one path).
    assert (state / INDEX).read_bytes() == _index(releases.v2.image).build()


@pytest.mark.parametrize("loss", [0, 10])
def test_a_device_on_v1_installs_v2_from_the_delta_lane_receiving_at_most_5_percent(
    lan: LanFactory, releases: Releases, tmp_path: Path, loss: int
) -> None:
    state = _holding_v1(releases, tmp_path)
    summary, notes = _install_v2(lan, releases, tmp_path, state, loss=loss)
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] == V1_SEQUENCE, notes
    assert summary["lane_index"] == "patch", notes  # the installed index + the lane's patch
    received = _received(summary)
    print(f"received {received} of {releases.image_datagrams} image datagrams at {loss}% loss")
    assert received <= LANE_BUDGET * releases.image_datagrams, summary
    assert int(summary["bytes_local"]) == releases.v2.image.stat().st_size  # type: ignore[call-overload]


def test_a_device_without_the_installed_index_takes_the_full_index_from_the_lane(
    lan: LanFactory, releases: Releases, tmp_path: Path
) -> None:
    state = _holding_v1(releases, tmp_path, index=False)
    summary, notes = _install_v2(lan, releases, tmp_path, state)
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] == V1_SEQUENCE, notes
    assert summary["lane_index"] == "full", notes
    assert _received(summary) <= LANE_BUDGET * releases.image_datagrams, summary


def test_a_device_on_a_release_the_lane_does_not_list_gets_v2_from_the_full_carousel(
    lan: LanFactory, releases: Releases, tmp_path: Path
) -> None:
    state = _holding_v1(releases, tmp_path)
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
    state = _holding_v1(releases, tmp_path)
    (tmp_path / "slot.img").unlink()  # the installer's target (the only source) is gone
    summary, notes = _install_v2(lan, releases, tmp_path, state)
    _assert_v2_installed(releases, tmp_path, state)
    assert summary["lane_from"] is None
    assert any("no readable local source" in n for n in notes), notes
    assert int(summary["bytes_multicast"]) > 0.9 * releases.v2.image.stat().st_size  # type: ignore[call-overload]
