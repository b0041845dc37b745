"""``publish`` and ``dns-records``: what static HTTP mirrors and DNS need to serve a release.

`publish` places the image (and its manifest beside it, its block index as
``<image>.blockindex`` when the manifest lists one, and the delta lane's files ``<image>.delta``
and ``<image>.patch-<sequence>`` when it has a lane) under a root directory at the path of every
mirror URL in the signed manifest, so ``nginx``'s ``root``, an S3 sync or a CDN origin serves
exactly the URLs devices were told about.  It checks the image and the lane files (found beside
the manifest, where ``sign`` wrote them) against the manifest first and writes every file
atomically, the manifest last.

`dns_records` renders the SRV records that name a channel's SSM sources and the AAAA records of
the source hosts, as zone-file lines or as dnsmasq options.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from otacast.schemas import addressing, blockindex
from otacast.schemas.manifest import Envelope

from . import lane
from .errors import UsageError, WriteError
from .fileio import atomic_write, create_beside
from .sign import check_image

# An image is copied to the web root in reads of this size (1 MiB: the per-read cost vanishes).
COPY_BLOCK = 1 << 20


def mirror_paths(envelope: Envelope) -> list[PurePosixPath]:
    """Relative paths the manifest's HTTP URLs point at (the image name if there are none)."""
    urls = envelope.manifest.http
    if not urls:
        return [PurePosixPath(envelope.manifest.image.name)]
    paths = []
    for url in urls:
        path = PurePosixPath(unquote(urlsplit(url).path))
        parts = [p for p in path.parts if p != "/"]
        if not parts or url.endswith("/") or any(p in (".", "..") for p in parts):
            raise UsageError(f"mirror URL {url} does not name a file under the web root")
        paths.append(PurePosixPath(*parts))
    return list(dict.fromkeys(paths))


def publish(
    envelope: Envelope, image: Path, root: Path, lane_dir: Path | None = None
) -> list[Path]:
    """Fill `root`; the lane files are taken from `lane_dir` (default: the image's directory)."""
    index = check_image(envelope.manifest, image)
    lane_files = lane.check_files(envelope.manifest, image.parent if lane_dir is None else lane_dir)
    written = []
    for relative in mirror_paths(envelope):
        target = root.joinpath(*relative.parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(f"cannot create {target.parent}: {exc.strerror}") from None
        _copy_atomically(image, target)
        written.append(target)
        if index is not None:  # before the manifest that names it
            index_path = target.with_name(target.name + blockindex.FILE_SUFFIX)
            atomic_write(index_path, index.build())
            written.append(index_path)
        for lane_file in lane_files:
            lane_path = target.with_name(target.name + lane_file.suffix)
            _copy_atomically(lane_file.path, lane_path)
            written.append(lane_path)
        manifest_path = target.with_name(target.name + ".manifest.json")
        atomic_write(manifest_path, envelope.to_file_bytes())
        written.append(manifest_path)
    return written


def _copy_atomically(source: Path, target: Path) -> None:
    # A file of our own creation (`fileio.create_beside`), written and chmod-ed through its
    # descriptor: a link planted in the web root cannot redirect the copy.
    tmp: Path | None = None
    try:
        fd, tmp = create_beside(target)
        try:
            os.fchmod(fd, 0o644)  # served files are public by nature
            with source.open("rb") as handle, os.fdopen(os.dup(fd), "wb") as out:
                shutil.copyfileobj(handle, out, COPY_BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise WriteError(f"cannot write {target}: {exc.strerror or exc}") from None


def parse_source(text: str, channel: str, index: int) -> tuple[str, str]:
    """``HOST=ADDR`` or ``ADDR`` (host name made up under the channel) -> (host, address)."""
    host, _, address = text.rpartition("=")
    if not host:
        host = f"sender{index + 1}.{channel}"
    try:
        address = str(ipaddress.IPv6Address(address))
    except ValueError:
        raise UsageError(f"source {text!r}: {address!r} is not an IPv6 address") from None
    try:
        host = addressing.normalise_channel(host)
    except ValueError:
        raise UsageError(f"source {text!r}: {host!r} is not a valid host name") from None
    return host, address


def dns_records(
    channel: str,
    port: int,
    sources: Sequence[tuple[str, str]],
    *,
    ttl: int = 300,
    priority: int = 10,
    weight: int = 10,
    style: str = "zone",
) -> list[str]:
    srv = addressing.srv_name(channel)
    if style == "dnsmasq":
        lines = [f"--srv-host={srv},{host},{port},{priority},{weight}" for host, _ in sources]
        return lines + [f"--host-record={host},{address}" for host, address in sources]
    lines = [f"{srv}. {ttl} IN SRV {priority} {weight} {port} {host}." for host, _ in sources]
    return lines + [f"{host}. {ttl} IN AAAA {address}" for host, address in sources]
