"""HTTP fallback against the real nginx, across a namespaced LAN.

The release is signed with the CLI and laid out with ``otacast-signer publish``; nginx (started
by the test with its own configuration, every path under ``tmp_path``) serves that directory on
``[fd51::1]:8080`` from one namespace, and `HttpFetcher` fetches chunks from another.  nginx's
access log records status, body bytes sent and the Range header of every request, so the tests
see from the server's side that only the asked ranges crossed the wire, as 206 responses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.schemas.manifest import Manifest, parse_envelope

from . import services
from .netns import BIN, Host, LanFactory
from .release import Release, publish
from .services import Nginx

CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
PORT = 8080
MIRROR_PATH = "rel/rootfs.img"

# Runs in the client namespace: fetch the listed chunks, write each verified chunk to OUT, print
# the fetcher's statistics and any per-chunk error as JSON.
CLIENT = r"""
import json, os, sys
from pathlib import Path
from otacast.plugin.errors import FetchError
from otacast.plugin.fetcher import HttpFetcher
from otacast.schemas.manifest import parse_envelope

for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(name, None)  # the LAN is private: no proxy may stand in between
manifest = parse_envelope(Path(sys.argv[1]).read_bytes()).manifest
out = Path(sys.argv[2])
errors = {}
with HttpFetcher(manifest.http, timeout=5.0, attempts=2, backoff=0.1) as fetcher:
    for index in map(int, sys.argv[3].split(",")):
        offset, length = manifest.chunk_span(index)
        try:
            data = fetcher.fetch_chunk(index, offset, length, manifest.chunks.sha256[index])
        except FetchError as exc:
            errors[index] = str(exc)
        else:
            (out / f"chunk-{index}").write_bytes(data)
stats = fetcher.stats
print(json.dumps({
    "bytes": dict(stats.bytes_received),
    "requests": dict(stats.requests),
    "failures": dict(stats.failures),
    "errors": errors,
}))
"""


@dataclass(frozen=True)
class Mirrored:
    """A release laid out for its mirrors under `www`, its manifest parsed, its image read."""

    manifest_path: Path
    manifest: Manifest
    image: bytes
    www: Path


def make_release(tmp_path: Path, urls: list[str]) -> Mirrored:
    http = tuple(arg for url in urls for arg in ("--http-url", url))
    # The last chunk is short.
    release = Release.make(tmp_path, 4 * CHUNK - 1000, chunk="64K", extra=http)
    www = tmp_path / "www"
    publish(release, www)
    manifest = parse_envelope(release.manifest.read_bytes()).manifest
    assert manifest.chunk_count == 4
    return Mirrored(release.manifest, manifest, release.image.read_bytes(), www)


@contextmanager
def nginx(host: Host, root: Path, prefix: Path) -> Iterator[Nginx]:
    """nginx serving `root` on the host's address; always stopped and reaped on exit."""
    try:
        with services.nginx(host, root, prefix, PORT) as running:
            yield running
    except services.ServiceMissing as exc:
        pytest.skip(str(exc))


def mirror_url(host: Host, port: int = PORT) -> str:
    return f"http://[{host.address}]:{port}/{MIRROR_PATH}"


def fetch(
    host: Host, release: Mirrored, out: Path, indices: list[int]
) -> dict[str, dict[str, object]]:
    out.mkdir()
    done = host.run(
        str(BIN / "python"),
        "-c",
        CLIENT,
        str(release.manifest_path),
        str(out),
        ",".join(map(str, indices)),
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def asked_range(release: Mirrored, index: int) -> str:
    offset, length = release.manifest.chunk_span(index)
    return f"bytes={offset}-{offset + length - 1}"


def chunk_bytes(release: Mirrored, index: int) -> bytes:
    offset, length = release.manifest.chunk_span(index)
    return release.image[offset : offset + length]


def test_nginx_serves_only_the_asked_ranges_as_206_and_the_chunks_verify(
    lan: LanFactory, tmp_path: Path
) -> None:
    server, device = lan(2).hosts
    url = mirror_url(server)
    release = make_release(tmp_path, [url])
    wanted = [0, 2, 3]
    with nginx(server, release.www, tmp_path / "nginx") as running:
        result = fetch(device, release, tmp_path / "out", wanted)
    assert result["errors"] == {}
    assert result["failures"] == {}
    for index in wanted:
        assert (tmp_path / "out" / f"chunk-{index}").read_bytes() == chunk_bytes(release, index)

    served = running.served()
    lengths = [release.manifest.chunk_span(i)[1] for i in wanted]
    assert [s.status for s in served] == [206] * len(wanted)
    assert sorted(s.range for s in served) == sorted(asked_range(release, i) for i in wanted)
    assert sum(s.bytes for s in served) == sum(lengths) == result["bytes"][url]
    assert sum(lengths) < len(release.image)  # chunk 1 never crossed the wire
    assert result["requests"] == {url: len(wanted)}


def test_a_dead_first_mirror_costs_one_refused_connect_per_chunk_and_nginx_still_serves_ranges(
    lan: LanFactory, tmp_path: Path
) -> None:
    server, device = lan(2).hosts
    dead, live = mirror_url(server, PORT + 1), mirror_url(server)
    release = make_release(tmp_path, [dead, live])
    wanted = [1, 3]
    with nginx(server, release.www, tmp_path / "nginx") as running:
        result = fetch(device, release, tmp_path / "out", wanted)
    assert result["errors"] == {}
    assert result["failures"] == {"connection": len(wanted)}
    assert result["requests"] == {dead: len(wanted), live: len(wanted)}
    served = running.served()
    assert [(s.status, s.range) for s in sorted(served, key=lambda s: s.range)] == sorted(
        (206, asked_range(release, i)) for i in wanted
    )
    assert sum(s.bytes for s in served) == result["bytes"][live]


def test_a_tampered_file_on_the_mirror_is_refused_by_hash_and_never_written(
    lan: LanFactory, tmp_path: Path
) -> None:
    server, device = lan(2).hosts
    url = mirror_url(server)
    release = make_release(tmp_path, [url])
    served_file = release.www / MIRROR_PATH
    data = bytearray(served_file.read_bytes())
    data[CHUNK + 5] ^= 0x80  # inside chunk 1
    served_file.write_bytes(bytes(data))
    with nginx(server, release.www, tmp_path / "nginx") as running:
        result = fetch(device, release, tmp_path / "out", [0, 1])
    assert (tmp_path / "out" / "chunk-0").read_bytes() == chunk_bytes(release, 0)
    assert not (tmp_path / "out" / "chunk-1").exists()
    error = result["errors"]["1"]
    assert isinstance(error, str)
    assert error.startswith("chunk 1 ") and f"{url}: hash-mismatch" in error
    assert result["failures"] == {"hash-mismatch": 2}  # one per round
    # nginx did serve the (tampered) range both times: the refusal was the device's own.
    assert [s.range for s in running.served()].count(asked_range(release, 1)) == 2
