"""The block index end to end (delta delivery, phase 1): signed in the manifest by ``sign``,
written by ``publish``, sent by ``serve`` as its own RaptorQ object at its share of the airtime,
and received, checked and handed out once by the receiver core when it asks for it."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest

from otacast.plugin.core import ReceiverCore
from otacast.plugin.events import ImageComplete, IndexReady
from otacast.plugin.index_object import IndexAssembly
from otacast.schemas import blockindex, fdt, wire
from otacast.schemas.blockindex import IndexBuilder
from otacast.schemas.errors import ImageMismatch, MalformedManifest
from otacast.schemas.manifest import Manifest, Transport, parse_envelope
from otacast.signer import channels, publish, symbol_cache
from otacast.signer import sign as signing
from otacast.signer.encoder import raptorq_encode
from otacast.signer.keys import SigningKey
from otacast.signer.schedule import SendSymbols
from otacast.signer.sign import build_manifest, index_info, sign

from .helpers import (
    CHANNEL,
    NOW,
    Link,
    RandomLoss,
    ReceiverSpec,
    Release,
    SenderSpec,
    cycles_for_fraction,
    drain,
    manifest_datagrams,
    manifest_for,
)

KEY = SigningKey(b"\x07" * 32)
T = 256  # small symbols: a small image still has an index of several dozen symbols
CHUNK = 256 * T  # 64 KiB chunks, K = 256


def index_of(image: bytes) -> blockindex.BlockIndex:
    builder = IndexBuilder()
    builder.update(image)
    return builder.finish()


def indexed_release(image: bytes, chunk_size: int = CHUNK, symbol_size: int = T) -> Release:
    manifest = manifest_for(image, chunk_size=chunk_size, symbol_size=symbol_size)
    manifest = dataclasses.replace(manifest, index=index_info(index_of(image)))
    return Release(image, sign(manifest, [KEY]), (KEY,))


IMAGE = random.Random(15).randbytes(1_500_000)  # 23 chunks; index 5872 bytes = 23 symbols
RELEASE = indexed_release(IMAGE)


# --- sign and publish --------------------------------------------------------------------------


def _sign(path: Path, image_format: str, index: bool | None = None) -> Manifest:
    return build_manifest(
        path,
        name="demo",
        sequence=1,
        version="1",
        created=1_700_000_000,
        expires=1_900_000_000,
        compatible=["dev"],
        image_format=image_format,
        transport=Transport.for_channel(CHANNEL),
        index=index,
    )


def test_sign_lists_the_index_of_the_image_it_read(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 123)  # a short last block
    path = tmp_path / "rootfs.img"
    path.write_bytes(data)
    manifest = _sign(path, "raw")
    expected = index_of(data).build()
    assert manifest.index is not None
    assert manifest.index.length == len(expected)
    assert manifest.index.sha256 == hashlib.sha256(expected).digest()
    envelope = sign(manifest, [KEY])
    assert parse_envelope(envelope.compact_bytes).manifest.index == manifest.index


class _NoBuilding:
    def __init__(self) -> None:
        raise AssertionError("the index was built, not read from the cache")


def test_serve_keeps_the_index_in_its_cache_and_reads_it_back_only_as_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(3).randbytes(2 * 1024 * 1024 + 77)
    path = tmp_path / "rootfs.img"
    path.write_bytes(data)
    manifest = _sign(path, "raw")
    expected = index_of(data).build()
    kept = tmp_path / "cache.blockindex"
    # First start: built from the image and kept.
    built = signing.check_image(manifest, path, index_cache=kept)
    assert built is not None and built.build() == expected
    assert kept.read_bytes() == expected
    # Later starts read it back (nothing is built) while the image is still checked.
    with monkeypatch.context() as patched:
        patched.setattr(signing, "IndexBuilder", _NoBuilding)
        read = signing.check_image(manifest, path, index_cache=kept)
        assert read is not None and read.build() == expected
        changed = tmp_path / "changed.img"
        changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(ImageMismatch):
            signing.check_image(manifest, changed, index_cache=kept)
    # A kept index that is not the signed one (a flipped byte, a truncation) is built again.
    for damaged in (expected[:-1] + bytes([expected[-1] ^ 1]), expected[:100], b""):
        kept.write_bytes(damaged)
        again = signing.check_image(manifest, path, index_cache=kept)
        assert again is not None and again.build() == expected
        assert kept.read_bytes() == expected


def test_sign_makes_no_index_for_containers_or_when_told_not_to(tmp_path: Path) -> None:
    path = tmp_path / "update.mender"
    path.write_bytes(random.Random(2).randbytes(200_000))
    assert _sign(path, "mender").index is None
    assert _sign(path, "raw", index=False).index is None
    assert _sign(path, "mender", index=True).index is not None


def test_a_manifest_whose_index_length_does_not_fit_its_image_is_refused() -> None:
    manifest = RELEASE.manifest
    assert manifest.index is not None
    wrong = dataclasses.replace(
        manifest, index=dataclasses.replace(manifest.index, length=manifest.index.length + 16)
    )
    with pytest.raises(MalformedManifest, match="index length"):
        parse_envelope(sign(wrong, [KEY]).compact_bytes)


def test_publish_writes_the_index_beside_the_image_byte_identical(tmp_path: Path) -> None:
    image = tmp_path / "demo.img"
    image.write_bytes(IMAGE)
    written = publish.publish(RELEASE.envelope, image, tmp_path / "www")
    index_path = tmp_path / "www" / "demo.img.blockindex"
    assert index_path in written
    assert index_path.read_bytes() == index_of(IMAGE).build()


def test_publish_writes_no_index_file_for_a_manifest_without_one(tmp_path: Path) -> None:
    plain = manifest_for(IMAGE)
    image = tmp_path / "demo.img"
    image.write_bytes(IMAGE)
    publish.publish(sign(plain, [KEY]), image, tmp_path / "www")
    assert not list((tmp_path / "www").rglob("*.blockindex"))


# --- on the wire -----------------------------------------------------------------------------


def test_the_fdt_lists_the_index_object_with_its_raptorq_oti() -> None:
    datagrams = channels.manifest_fragments(RELEASE.envelope, wire.data_datagram_size(T))
    xml = b"".join(d[wire.FDT_HEADER_SIZE :] for d in datagrams if d[12:16] == bytes(4))
    part = RELEASE.manifest.index_part()
    assert part is not None
    assert (
        f'<File TOI="{wire.INDEX_TOI}" Content-Location="demo.img.blockindex" '
        f'Content-Type="application/octet-stream" Content-Length="{part.length}"'
    ).encode() in xml
    assert f'FEC-OTI-Scheme-Specific-Info="{fdt.raptorq_scheme_info(1)}"'.encode() in xml


def test_the_index_is_the_last_cycles_of_the_symbol_cache_and_decodes(tmp_path: Path) -> None:
    image = tmp_path / "demo.img"
    image.write_bytes(IMAGE)
    m = RELEASE.manifest
    path = symbol_cache.build(m, image, tmp_path / "cache", 0.5, index=index_of(IMAGE))
    layout = symbol_cache.CycleLayout.for_manifest(m, 0.5)
    assert len(layout.cycles) == layout.chunks + 1 == m.chunk_count + 1
    assert symbol_cache.verify(path, layout) is None
    reader = symbol_cache.SymbolReader(path, layout, 8)
    try:
        cycle = reader.read_cycle(layout.chunks)
    finally:
        reader.close()
    size = layout.datagram_size
    packets = [wire.parse_datagram(cycle[i : i + size]) for i in range(0, len(cycle), size)]
    assert all(isinstance(p, wire.IndexPacket) and p.tsi == m.tsi for p in packets)
    assembly = IndexAssembly(m)
    k = layout.sources[-1]
    # Without the first 10 source symbols: the repair symbols make up for them.
    results = [
        assembly.feed(0, i, cycle[i * size + 16 : (i + 1) * size]) for i in range(10, len(packets))
    ]
    assert len(packets) - 10 >= k
    assert [r for r in results if r is not None] == [index_of(IMAGE)]


def _send_counts(release: Release, rounds: int) -> tuple[int, int, int]:
    layout = symbol_cache.CycleLayout.for_manifest(release.manifest, 0.5)
    core = channels.sender_core(
        release.manifest, layout, rate=0, fragments=manifest_datagrams(release.envelope), now=0
    )
    image = index = 0
    for _ in range(rounds * len(layout.cycles)):
        action = core.next_action(0.0)
        if isinstance(action, SendSymbols):
            if action.chunk < layout.chunks:
                image += action.count
            else:
                index += action.count
    return image, index, sum(layout.sources[layout.chunks :])


def test_the_sender_gives_the_index_about_its_share_of_the_airtime() -> None:
    image, index, index_k = _send_counts(RELEASE, 40)
    image_k = sum(RELEASE.manifest.source_symbols(c) for c in range(RELEASE.manifest.chunk_count))
    share = index / (image + index)
    ideal = index_k / (image_k + index_k)
    assert ideal <= share < 1.5 * ideal, (share, ideal)


def test_index_datagrams_parse_distinctly_from_image_parts() -> None:
    packet = wire.IndexPacket(0x5E551011, 1, 0x102, b"\x00\x01\x02\x03")
    data = wire.build_datagram(packet)
    assert data == wire.build_datagram_spec(packet)
    assert wire.parse_datagram(data) == packet == wire.parse_datagram_spec(data)
    fields = wire.peek_data(data)
    assert fields == (0x5E551011, wire.INDEX_FIRST_CHUNK + 1, 0x102)


# --- the receiver core -------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "join"), [(0.0, 0.0), (0.2, 0.0), (0.2, 0.37), (0.0, 0.61)])
def test_a_receiver_that_wants_the_index_gets_it_once_whenever_it_joins(
    loss: float, join: float
) -> None:
    # 1 MB/s: a pass of the 1.5 MB image takes ~1.6 s; joins fall mid-pass.
    link = Link(
        RELEASE,
        [SenderSpec(rate=1_000_000)],
        [ReceiverSpec(join=join, loss=RandomLoss(loss), seed=3, want_index=True)],
    )
    report = link.run(until=60).receivers[0]
    assert report.image_at is not None, report.line()
    assert report.indexes == [index_of(IMAGE)]
    assert report.index_at is not None and report.index_at <= report.image_at * 1.1 + 0.1
    assert not {k for k in report.rejected if k.startswith("index")}


def test_a_receiver_that_does_not_want_the_index_ignores_its_datagrams_cheaply() -> None:
    link = Link(RELEASE, [SenderSpec(rate=1_000_000)], [ReceiverSpec(loss=RandomLoss(0.1))])
    report = link.run(until=60).receivers[0]
    assert report.complete_at is not None
    assert report.indexes == []
    assert report.index_ignored > 0
    assert "chunk-range" not in report.rejected


def _index_datagrams(release: Release) -> list[bytes]:
    return cycles_for_fraction(release, 0.5)[-1]


def test_a_flipped_byte_in_an_index_symbol_is_a_counted_rejection_never_a_wrong_index() -> None:
    core = ReceiverCore(RELEASE.trust, now=NOW, manifest=RELEASE.verified(), want_index=True)
    drain(core)
    cycle = _index_datagrams(RELEASE)
    k = RELEASE.manifest.index_part().small  # type: ignore[union-attr]
    forged = bytearray(cycle[3])
    forged[-5] ^= 0x40
    events = []
    for datagram in [bytes(forged), *cycle[:3], *cycle[4:k]]:  # K distinct ESIs, one forged
        core.receive_datagram(datagram, "fe80::1", NOW, wall=NOW)
        events += drain(core)
    assert not any(isinstance(e, IndexReady) for e in events)
    assert core.stats.rejected["index-mismatch"] == 1
    for datagram in [*cycle[k:], *cycle[:k]]:  # the carousel goes on, and wraps
        core.receive_datagram(datagram, "fe80::1", NOW, wall=NOW)
        events += drain(core)
    ready = [e for e in events if isinstance(e, IndexReady)]
    assert [e.index for e in ready] == [index_of(IMAGE)]
    assert core.snapshot().index_bytes == RELEASE.manifest.index.length  # type: ignore[union-attr]


def test_index_datagrams_before_the_manifest_are_held_and_replayed() -> None:
    core = ReceiverCore(RELEASE.trust, now=NOW, want_index=True)
    cycle = _index_datagrams(RELEASE)
    events = []
    for datagram in [*cycle, *manifest_datagrams(RELEASE.envelope)]:
        core.receive_datagram(datagram, "fe80::1", NOW, wall=NOW)
        events += drain(core)
    assert [e.index for e in events if isinstance(e, IndexReady)] == [index_of(IMAGE)]


def test_index_datagrams_do_not_disturb_the_image_and_count_as_ignored_after_the_index() -> None:
    core = ReceiverCore(RELEASE.trust, now=NOW, manifest=RELEASE.verified(), want_index=True)
    drain(core)
    all_cycles = cycles_for_fraction(RELEASE, 0.5)
    events = []
    index_cycle = all_cycles[-1]
    # Every index symbol twice, interleaved with the image's source symbols.
    for position in range(max(len(c) for c in all_cycles)):
        for cycle in [*all_cycles, index_cycle]:
            if position < len(cycle):
                core.receive_datagram(cycle[position], "fe80::1", NOW, wall=NOW)
                events += drain(core)
    assert sum(isinstance(e, IndexReady) for e in events) == 1
    assert sum(isinstance(e, ImageComplete) for e in events) == 1
    assert core.stats.index_ignored > 0
    assert dict(core.stats.rejected) == {}


def test_a_manifest_without_an_index_gives_no_index_event_even_when_wanted() -> None:
    plain = manifest_for(IMAGE, chunk_size=CHUNK, symbol_size=T)
    release = Release(IMAGE, sign(plain, [KEY]), (KEY,))
    core = ReceiverCore(release.trust, now=NOW, manifest=release.verified(), want_index=True)
    drain(core)
    forged = wire.build_datagram(wire.IndexPacket(plain.tsi, 0, 0, bytes(T)))
    core.receive_datagram(forged, "fe80::1", NOW, wall=NOW)
    assert drain(core) == []
    assert core.stats.index_ignored == 1


def test_the_index_of_several_source_blocks_is_assembled_from_any_order() -> None:
    # A 70 MB-class index would be slow to build here: a 20 MB image with 64 KiB chunks has an
    # index of 2 source blocks.
    image = random.Random(4).randbytes(20_000_000)
    release_manifest = dataclasses.replace(
        manifest_for(image, chunk_size=CHUNK, symbol_size=T), index=index_info(index_of(image))
    )
    part = release_manifest.index_part()
    assert part is not None and part.blocks == 2
    data = index_of(image).build()
    packets = []
    for block, ((offset, length), k) in enumerate(symbol_cache.index_blocks(release_manifest)):
        for esi, packet in enumerate(raptorq_encode(data[offset : offset + length], T, k // 2)):
            packets.append((block, esi, packet))
    random.Random(5).shuffle(packets)
    assembly = IndexAssembly(release_manifest)
    results = [assembly.feed(b, e, p) for b, e, p in packets]
    assert [r for r in results if r is not None] == [index_of(image)]
    assert assembly.feed(2, 0, packets[0][2]) == "index-block"
