"""The delta lane on the publisher's disk: which older releases it serves, its files, their checks.

``sign --delta-from OLD[=PATH]`` names an older release by its signed envelope file OLD (its
sequence and block index SHA-256 come from there) and finds that release's block index beside
it: ``<image name>.blockindex`` (as ``publish`` writes it) if present, else the image itself
``<image name>`` (indexed on the spot); ``OLD=PATH`` names either explicitly (a name ending in
``.blockindex`` is read as an index, anything else as the image).  The index is checked against
the old manifest's signed SHA-256 before it is used; an old manifest without an index accepts
only its image, checked whole against its chunk hashes (`sign.check_image`).  OLD's signatures
are not checked: it is the publisher's own file, and a wrong one costs only lane airtime
(devices verify every lane object against the new manifest).

`make_files` builds the lane object and one index patch per listed release
(`otacast.signer.delta`) and writes them beside the new manifest as ``<image name>.delta`` and
``<image name>.patch-<sequence>``; `check_files` is what ``publish``, ``serve`` and
``verify --image`` run to find and check them against the signed ``delta`` field.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otacast.schemas import blockindex, fdt, wire
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.errors import ImageMismatch, MalformedIndex, ManifestRejected
from otacast.schemas.limits import MAX_DELTA_FROM, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES
from otacast.schemas.manifest import DeltaFrom, DeltaInfo, Manifest, parse_envelope

from . import delta
from .errors import ReadError, UsageError, WriteError
from .fileio import atomic_write, read_bounded
from .sign import check_image

_HASH_READ = 1 << 20  # bytes hashed per read when a lane file is checked


@dataclass(frozen=True)
class DeltaSource:
    """An older release the lane serves: its sequence and its verified block index."""

    sequence: int
    index: BlockIndex


@dataclass(frozen=True)
class LaneFile:
    """A lane file on disk, checked: its name on a mirror is the image's name + `suffix`, its
    TOI on the lane `toi`."""

    path: Path
    suffix: str
    toi: int


def split_argument(text: str) -> tuple[Path, Path | None]:
    """``OLD`` or ``OLD=PATH`` as (envelope file, explicit index or image)."""
    if "=" in text and not Path(text).exists():
        old, _, where = text.partition("=")
        return Path(old), Path(where)
    return Path(text), None


@dataclass(frozen=True)
class NewRelease:
    """What the lane's sources are checked against: the release being signed."""

    name: str
    channel: str
    sequence: int
    image_format: str
    indexed: bool


def load_sources(texts: Sequence[str], new: NewRelease) -> list[DeltaSource]:
    """The releases named by ``--delta-from`` (in the order given) for the release `new`, each
    refused with a one-line reason when it cannot be one of its lane's sources."""
    if len(texts) > MAX_DELTA_FROM:
        raise UsageError(f"--delta-from names at most {MAX_DELTA_FROM} releases")
    if new.image_format != "raw":
        raise UsageError(
            f"--delta-from needs a raw image (this one is {new.image_format}: its 4 KiB blocks "
            "match nothing a device holds)"
        )
    if not new.indexed:
        raise UsageError("--delta-from needs the release's block index (drop --no-index)")
    sources: list[DeltaSource] = []
    for text in texts:
        source = load_source(*split_argument(text), new)
        if any(s.sequence == source.sequence for s in sources):
            raise UsageError(f"--delta-from names release {source.sequence} twice")
        sources.append(source)
    return sources


def load_source(envelope_path: Path, where: Path | None, new: NewRelease) -> DeltaSource:
    try:
        old = parse_envelope(read_bounded(envelope_path, MAX_MANIFEST_BYTES, "manifest")).manifest
    except ManifestRejected as exc:
        raise type(exc)(f"--delta-from {envelope_path}: {exc}") from None
    label = f"--delta-from {envelope_path}"
    if old.transport.channel != new.channel:
        raise UsageError(
            f"{label} is a release of channel {old.transport.channel}, not {new.channel}"
        )
    if old.name != new.name:
        raise UsageError(f"{label} is a release of {old.name!r}, not {new.name!r} (see --name)")
    if old.sequence >= new.sequence:
        raise UsageError(f"{label} is release {old.sequence}, not older than {new.sequence}")
    if old.image.format != "raw":
        raise UsageError(f"{label} is a {old.image.format} image: only raw images have blocks")
    path = where if where is not None else _beside(envelope_path, old)
    if path.name.endswith(blockindex.FILE_SUFFIX):
        return DeltaSource(old.sequence, _old_index_file(path, old, label))
    if old.index is None:
        check_image(old, path)  # raises ImageMismatch naming the first difference
        return DeltaSource(old.sequence, delta.index_of_image(path))
    index = delta.index_of_image(path)
    if index.sha256() != old.index.sha256:
        raise ImageMismatch(
            f"{label}: image {path} is not that release's (its block index differs)"
        )
    return DeltaSource(old.sequence, index)


def _beside(envelope_path: Path, old: Manifest) -> Path:
    base = envelope_path.parent / old.image.name
    index = base.with_name(base.name + blockindex.FILE_SUFFIX)
    if index.is_file() and old.index is not None:
        return index
    if base.is_file():
        return base
    raise ReadError(
        f"--delta-from {envelope_path}: neither {index} nor {base} exists "
        "(name the old image or index with OLD=PATH)"
    )


def _old_index_file(path: Path, old: Manifest, label: str) -> BlockIndex:
    if old.index is None:
        raise UsageError(
            f"{label} lists no block index, so {path} cannot be checked: give its image instead"
        )
    data = read_bounded(path, MAX_INDEX_BYTES, "block index")
    try:
        return blockindex.parse(data, length=old.image.length, sha256=old.index.sha256)
    except MalformedIndex as exc:
        raise ImageMismatch(f"{label}: {path} is not that release's block index ({exc})") from None


def file_names(image_name: str, sequences: Sequence[int]) -> list[str]:
    """The lane object's file name, then the patch's of each release in `sequences`."""
    return [image_name + fdt.LANE_SUFFIX] + [fdt.patch_location(image_name, s) for s in sequences]


def make_files(
    image: Path,
    index: BlockIndex,
    sources: Sequence[DeltaSource],
    directory: Path,
    image_name: str,
    *,
    overwrite: bool,
) -> tuple[DeltaInfo, list[Path]]:
    """Write the lane object and the patches into `directory`; what the manifest says of them
    and the paths written (the caller removes them if the release is not signed after all)."""
    paths = [directory / n for n in file_names(image_name, [s.sequence for s in sources])]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise WriteError(f"{path} exists; pass --force to replace it")
    written: list[Path] = []
    try:
        built = delta.build_delta(
            image, index, [s.index for s in sources], paths[0], releases=len(sources)
        )
        written.append(paths[0])
        lane_length, lane_sha256 = _measure(paths[0])
        froms = []
        for source, patch, path in zip(sources, built.patches, paths[1:], strict=True):
            data = patch.build()
            atomic_write(path, data)
            written.append(path)
            froms.append(
                DeltaFrom(
                    source.sequence, source.index.sha256(), len(data), hashlib.sha256(data).digest()
                )
            )
    except BaseException:
        remove(written)
        raise
    return DeltaInfo(lane_length, lane_sha256, built.header.blocks, tuple(froms)), written


def remove(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def check_files(manifest: Manifest, directory: Path) -> list[LaneFile]:
    """The lane files of `manifest` in `directory`, each checked against its signed length and
    SHA-256 (ImageMismatch naming the first that differs, ReadError for one missing); empty when
    the manifest has no lane."""
    info = manifest.delta
    if info is None:
        return []
    name = manifest.image.name
    expected = [(info.length, info.sha256)] + [
        (f.patch_length, f.patch_sha256) for f in info.sources
    ]
    tois = [wire.LANE_OBJECT_TOI] + [wire.LANE_PATCH_TOI + j for j in range(len(info.sources))]
    out = []
    for file_name, (length, sha256), toi in zip(
        file_names(name, [f.sequence for f in info.sources]), expected, tois, strict=True
    ):
        path = directory / file_name
        size, digest = _measure(path)
        if size != length:
            raise ImageMismatch(f"lane file {path} is {size} bytes, the manifest says {length}")
        if digest != sha256:
            raise ImageMismatch(f"lane file {path} does not match the manifest's sha256")
        out.append(LaneFile(path, file_name.removeprefix(name), toi))
    return out


def _measure(path: Path) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as handle:
            while piece := handle.read(_HASH_READ):
                digest.update(piece)
                size += len(piece)
    except OSError as exc:
        raise ReadError(f"cannot read lane file {path}: {exc.strerror or exc}") from None
    return size, digest.digest()
