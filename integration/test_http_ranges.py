"""HTTP repair of partly held chunks (issue 15, Build 4) against the real nginx: a device that
holds v1 and reaches only a mirror fetches just the source symbols of v2 it does not hold.

The images are test_reuse's 96 MiB ext4 pair (``mke2fs -d``: v1 a copy of /usr/lib/python3.11,
v2 the same tree plus 3 MB of new files), built once for the module.  v2 is signed per test
with the mirror URLs of that test's LAN and laid out with ``otacast-signer publish`` (the image
and its ``.blockindex``); the device runs ``otacast fetch --fallback only --manifest`` with v1
as its reuse source, so its block index comes from the mirror and every byte it lacks comes
over HTTP.  nginx's access log gives, per request, status, body bytes and Range header: the
bytes counted are the server's, not only the device's own summary.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.schemas.blockindex import FILE_SUFFIX
from otacast.schemas.manifest import Manifest, parse_envelope

from . import services
from .netns import Host, LanFactory
from .release import Release, fetch, publish, summary_of
from .services import Served
from .test_reuse import PYTHON, _ext4, build_trees

pytestmark = pytest.mark.usefixtures("nft_or_skip")

PORT = 8080
# The bound for a device holding v1: image bytes over HTTP per image byte.
HTTP_BUDGET = 0.10


@dataclass(frozen=True)
class Pair:
    v1: Path
    v2: Path  # unsigned: each test signs it with its own mirrors


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    if shutil.which("mke2fs") is None or not PYTHON.is_dir():
        pytest.skip("needs mke2fs and /usr/lib/python3.11")
    root = tmp_path_factory.mktemp("ranges")
    build_trees(root / "t1", root / "t2")
    _ext4(root / "t1", root / "v1.img")
    _ext4(root / "t2", root / "v2.img")
    return Pair(root / "v1.img", root / "v2.img")


@dataclass(frozen=True)
class Mirrored:
    release: Release
    manifest: Manifest
    www: Path
    paths: tuple[str, ...]  # of the image under www, per mirror


def mirrored(pair: Pair, tmp_path: Path, server: Host, names: tuple[str, ...]) -> Mirrored:
    """v2 signed with a mirror per name (``/NAME/rootfs.img`` on `server`), published."""
    directory = tmp_path / "release"
    directory.mkdir()
    shutil.copyfile(pair.v2, directory / "rootfs.img")
    paths = tuple(f"{name}/rootfs.img" for name in names)
    urls = (f"http://[{server.address}]:{PORT}/{path}" for path in paths)
    release = Release.sign(
        directory / "rootfs.img",
        sequence=7,
        extra=tuple(a for u in urls for a in ("--http-url", u)),
    )
    www = tmp_path / "www"
    publish(release, www)
    manifest = parse_envelope(release.manifest.read_bytes()).manifest
    assert manifest.index is not None and manifest.image.format == "raw"
    for path in paths:
        assert (www / (path + FILE_SUFFIX)).exists()
    return Mirrored(release, manifest, www, paths)


def fetch_holding_v1(
    pair: Pair, tmp_path: Path, device: Host, mirrors: Mirrored
) -> tuple[int, list[dict[str, object]], str]:
    """`otacast fetch --fallback only` of v2 on a device holding v1 (a reuse source)."""
    state = tmp_path / "state"
    returncode, events, stderr = fetch(
        device,
        mirrors.release,
        state,
        tmp_path / "out.img",
        "--fallback",
        "only",
        "--manifest",
        str(mirrors.release.manifest),
        "--reuse-source",
        str(pair.v1),
        timeout=240,
    )
    for event in events:
        if event.get("event") in ("note", "finished"):
            print(json.dumps(event, sort_keys=True))
    return returncode, events, stderr


def image_requests(served: list[Served], path: str) -> list[Served]:
    return [s for s in served if s.path == "/" + path]


def notes(events: list[dict[str, object]]) -> list[str]:
    return [str(e["message"]) for e in events if e.get("event") == "note"]


def test_a_device_holding_v1_with_only_a_mirror_fetches_at_most_10_percent_of_v2(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    server, device = lan(2).hosts
    mirrors = mirrored(pair, tmp_path, server, ("rel",))
    with services.nginx(server, mirrors.www, tmp_path / "nginx", PORT) as running:
        returncode, events, stderr = fetch_holding_v1(pair, tmp_path, device, mirrors)
    assert returncode == 0, stderr[-2000:]
    summary = summary_of(events)
    image = pair.v2.read_bytes()
    assert (tmp_path / "out.img").read_bytes() == image
    assert any("partly held: only their missing ranges" in n for n in notes(events))
    assert summary["http_refetched"] == 0

    requests = image_requests(running.served(), mirrors.paths[0])
    fetched = sum(s.bytes for s in requests)
    # The server's count, the device's count, and the bound agree.
    assert fetched == summary["bytes_http"]
    assert fetched <= HTTP_BUDGET * len(image), (fetched, len(image))
    # Plain single ranges, each answered with 206, at most the cap per chunk.
    assert requests and all(s.status == 206 for s in requests)
    assert all(re.fullmatch(r"bytes=\d+-\d+", s.range) for s in requests)
    assert len(requests) <= 64 * mirrors.manifest.chunk_count
    # What did not come over HTTP came from v1, every byte counted once.
    local = int(summary["bytes_local"])  # type: ignore[call-overload]
    assert local + fetched == len(image) and summary["bytes_multicast"] == 0


def _tamper_a_missing_range(pair: Pair, served: Path) -> int:
    """Flip a byte of the served image inside a block of v2 that v1 does not hold anywhere
    (so the device fetches it); the byte's offset."""
    v1, v2 = pair.v1.read_bytes(), bytearray(served.read_bytes())
    held = {v1[i : i + 4096] for i in range(0, len(v1), 4096)}
    block = next(
        b for b in range(len(v2) // 4096) if bytes(v2[b * 4096 : (b + 1) * 4096]) not in held
    )
    offset = block * 4096 + 1000
    v2[offset] ^= 0x5A
    served.write_bytes(bytes(v2))
    return offset


def test_a_mirror_tampering_a_missing_range_never_yields_a_bad_image(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    server, device = lan(2).hosts
    mirrors = mirrored(pair, tmp_path, server, ("bad", "good"))
    offset = _tamper_a_missing_range(pair, mirrors.www / mirrors.paths[0])
    chunk = next(
        i
        for i in range(mirrors.manifest.chunk_count)
        if mirrors.manifest.chunk_span(i)[0] <= offset < sum(mirrors.manifest.chunk_span(i))
    )
    with services.nginx(server, mirrors.www, tmp_path / "nginx", PORT) as running:
        returncode, events, stderr = fetch_holding_v1(pair, tmp_path, device, mirrors)
    assert returncode == 0, stderr[-2000:]
    summary = summary_of(events)
    assert (tmp_path / "out.img").read_bytes() == pair.v2.read_bytes()
    # The chunk put together with the tampered range failed its hash: its held symbols were
    # forgotten and it was fetched whole, refused from the bad mirror, taken from the good one.
    assert summary["http_refetched"] == 1
    assert any(f"chunk {chunk} from its held symbols" in n for n in notes(events))
    start, length = mirrors.manifest.chunk_span(chunk)
    whole = f"bytes={start}-{start + length - 1}"
    served = running.served()
    assert [s.range for s in image_requests(served, mirrors.paths[0])].count(whole) == 1
    assert [s.range for s in image_requests(served, mirrors.paths[1])] == [whole]


def test_with_only_a_tampering_mirror_the_chunk_is_never_completed(
    lan: LanFactory, pair: Pair, tmp_path: Path
) -> None:
    server, device = lan(2).hosts
    mirrors = mirrored(pair, tmp_path, server, ("bad",))
    _tamper_a_missing_range(pair, mirrors.www / mirrors.paths[0])
    with services.nginx(server, mirrors.www, tmp_path / "nginx", PORT):
        returncode, events, _ = fetch_holding_v1(pair, tmp_path, device, mirrors)
    assert returncode != 0
    assert not (tmp_path / "out.img").exists()
    assert not any(e.get("event") == "finished" for e in events)
    assert any("fetched whole" in n for n in notes(events))
