"""Turn an image into a signed manifest envelope, add co-signatures, check an image.

The image is read once, chunk by chunk (the layout of `otacast.schemas.fec`, at most one chunk in
memory), producing the whole-image
SHA-256, one SHA-256 per chunk and, when asked, the block index (`otacast.schemas.blockindex`:
one truncated SHA-256 per 4 KiB block, for delta delivery) from the same reads.  The index is
made by default for ``raw`` images only: a ``mender`` or ``swu`` container holds compressed
payloads whose 4 KiB grid matches nothing a device holds, so its index would be airtime for
nothing (``sign --index`` makes one anyway).

Every envelope this module produces is parsed back with the device's parser before it is
returned, so the publisher can never emit a manifest that devices would refuse as malformed.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otacast.schemas import blockindex, fec
from otacast.schemas.blockindex import BlockIndex, IndexBuilder
from otacast.schemas.errors import ImageMismatch, MalformedIndex
from otacast.schemas.limits import DEFAULT_CHUNK_BYTES, MAX_IMAGE_BYTES
from otacast.schemas.manifest import (
    Chunking,
    Envelope,
    FecInfo,
    ImageInfo,
    IndexInfo,
    Manifest,
    Signature,
    StreamKey,
    Transport,
    parse_envelope,
    signing_message,
)

from . import image_record
from .errors import ReadError, UsageError, WriteError
from .fileio import atomic_write, read_bounded
from .keys import SigningKey


@dataclass(frozen=True)
class ImageDigest:
    length: int
    sha256: bytes
    chunk_sha256: tuple[bytes, ...]
    index: BlockIndex | None = None


def digest_image(
    path: Path, chunk_size: int, symbol_size: int, *, index: bool = False
) -> ImageDigest:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UsageError(f"image {path} is not a regular file")
        if size == 0:
            raise UsageError(f"image {path} is empty")
        if size > MAX_IMAGE_BYTES:
            raise UsageError(f"image {path} is {size} bytes, the limit is {MAX_IMAGE_BYTES}")
        whole = hashlib.sha256()
        chunks: list[bytes] = []
        builder = IndexBuilder() if index else None
        length = 0
        with path.open("rb") as handle:
            for number in range(fec.chunk_count(size, chunk_size, symbol_size)):
                block = handle.read(fec.chunk_span(size, chunk_size, symbol_size, number)[1])
                whole.update(block)
                chunks.append(hashlib.sha256(block).digest())
                if builder is not None:
                    builder.update(block)
                length += len(block)
            if handle.read(1):
                raise ReadError(f"image {path} grew while it was read")
    except OSError as exc:
        raise ReadError(f"cannot read image {path}: {exc.strerror or exc}") from None
    built = builder.finish() if builder is not None else None
    return ImageDigest(length, whole.digest(), tuple(chunks), built)


def index_info(index: BlockIndex) -> IndexInfo:
    """What the signed manifest says of `index`."""
    data = index.build()
    return IndexInfo(len(data), hashlib.sha256(data).digest())


def build_release(
    image: Path,
    *,
    name: str,
    sequence: int,
    version: str,
    created: int,
    expires: int,
    compatible: Sequence[str],
    image_format: str,
    transport: Transport,
    http: Sequence[str] = (),
    chunk_size: int = 0,
    symbol_size: int = fec.DEFAULT_SYMBOL_SIZE,
    stream_keys: Sequence[bytes] = (),
    index: bool | None = None,
) -> tuple[Manifest, BlockIndex | None]:
    """The manifest of `image` and its block index, made when `index` says so (None: for
    ``raw`` images only, see the module doc)."""
    size = image.stat().st_size if image.exists() else 0
    chunk = fec.choose_chunk_size(size, chunk_size or DEFAULT_CHUNK_BYTES, symbol_size)
    wanted = image_format == "raw" if index is None else index
    digest = digest_image(image, chunk, symbol_size, index=wanted)
    manifest = Manifest(
        name=name,
        sequence=sequence,
        version=version,
        created=created,
        expires=expires,
        compatible=tuple(compatible),
        image=ImageInfo(image.name, digest.length, digest.sha256, image_format),
        chunks=Chunking(chunk, digest.chunk_sha256),
        fec=FecInfo(symbol_size=symbol_size),
        transport=transport,
        http=tuple(http),
        stream_keys=tuple(StreamKey(number, public) for number, public in enumerate(stream_keys)),
        index=index_info(digest.index) if digest.index is not None else None,
    )
    return manifest, digest.index


def build_manifest(image: Path, **options: Any) -> Manifest:
    """The manifest of `image` (`build_release` without the index)."""
    return build_release(image, **options)[0]


def sign(manifest: Manifest, keys: Sequence[SigningKey]) -> Envelope:
    message = signing_message(manifest)
    envelope = Envelope(manifest, ())
    for key in keys:
        envelope = envelope.with_signature(Signature(key.key_id, key.sign(message)))
    return reparse(envelope)


def add_signature(envelope: Envelope, key: SigningKey) -> Envelope:
    signature = Signature(key.key_id, key.sign(signing_message(envelope.manifest)))
    return reparse(envelope.with_signature(signature))


def reparse(envelope: Envelope) -> Envelope:
    """Round-trip through the device's parser: what we publish, devices can read."""
    return parse_envelope(envelope.compact_bytes)


def check_image(
    manifest: Manifest,
    path: Path,
    *,
    index_cache: Path | None = None,
    record: Path | None = None,
) -> BlockIndex | None:
    """Raise `ImageMismatch` naming the first difference between `path` and the manifest;
    return the image's block index, checked against the manifest's, when it lists one.

    With `index_cache` (a file in the sender's cache directory) the index is read from there
    when the file holds the one the manifest signs, and otherwise built from the image and
    written there for the next start: building it hashes every 4 KiB block (~0.8 s for 500 MB,
    more than the two hashes of the image), and the signed SHA-256 vouches for a read one as
    well as for a built one.  Each chunk's hash runs on a second thread beside the whole
    image's (``hashlib`` releases the GIL over large buffers), so the check reads at the speed
    of one SHA-256, not two.

    With `record`, an image that passes is recorded there, so that the next start with a
    warm cache need not check it again (`otacast.signer.image_record`)."""
    started = time.time_ns()
    before = image_record.FileStamp.of(path) if record is not None else None
    cached = cached_index(manifest, index_cache)
    try:
        built = _check_image(manifest, path, cached, index_cache)
    except (ImageMismatch, ReadError):
        if record is not None:
            image_record.forget(record)
        raise
    if record is not None:
        image_record.remember(record, manifest, path, before, started)
    return built


def _check_image(
    manifest: Manifest,
    path: Path,
    cached: BlockIndex | None,
    index_cache: Path | None,
) -> BlockIndex | None:
    try:
        size = path.stat().st_size
        if size != manifest.image.length:
            raise ImageMismatch(
                f"image {path} is {size} bytes, the manifest says {manifest.image.length}"
            )
        whole = hashlib.sha256()
        wanted = manifest.index is not None and cached is None
        builder = IndexBuilder() if wanted else None
        with path.open("rb") as handle, ThreadPoolExecutor(max_workers=1) as hasher:
            for index, expected in enumerate(manifest.chunks.sha256):
                block = handle.read(manifest.chunk_span(index)[1])
                digest = hasher.submit(_sha256, block)
                whole.update(block)
                if builder is not None:
                    builder.update(block)
                if digest.result() != expected:
                    raise ImageMismatch(f"image {path}: chunk {index} does not match its hash")
    except OSError as exc:
        raise ReadError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if whole.digest() != manifest.image.sha256:
        raise ImageMismatch(f"image {path} does not match the manifest's sha256")
    return _checked_index(manifest, path, cached, builder, index_cache)


def _checked_index(
    manifest: Manifest,
    path: Path,
    cached: BlockIndex | None,
    builder: IndexBuilder | None,
    index_cache: Path | None,
) -> BlockIndex | None:
    if cached is not None or builder is None or manifest.index is None:
        return cached
    built = builder.finish()
    if index_info(built) != manifest.index:
        # The image matches every signed chunk hash, so the manifest's index was not made by
        # this version's `sign` from it.
        raise ImageMismatch(f"image {path}: its block index does not match the manifest's")
    if index_cache is not None:
        # Only a speed-up for the next start: a cache directory that cannot take it costs a
        # rebuild then, nothing now.
        with contextlib.suppress(WriteError):
            atomic_write(index_cache, built.build())
    return built


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def cached_index(manifest: Manifest, path: Path | None) -> BlockIndex | None:
    """The block index kept at `path`, if it is the one the manifest signs; else None."""
    info = manifest.index
    if path is None or info is None or not path.is_file():
        return None
    try:
        data = read_bounded(path, info.length, "block index")
        return blockindex.parse(data, length=manifest.image.length, sha256=info.sha256)
    except (ReadError, MalformedIndex):
        return None  # built again from the image (and written over it)
