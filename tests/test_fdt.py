"""The FLUTE FDT a sender sends with its manifest: what it lists, and that it is the same bytes
from every sender of a release."""

from __future__ import annotations

import base64
import dataclasses
import random
import re
import xml.etree.ElementTree as ElementTree

from otacast.schemas import fdt, fec, wire
from otacast.signer import channels

from .helpers import KEY, carousel_datagrams, make_release

NS = "{urn:IETF:metadata:2005:FLUTE:FDT}"


def _xml(datagrams: list[bytes]) -> bytes:
    """The FDT instance carried by `datagrams` (FDT packets in ESI order), read off the wire."""
    pieces = [d for d in datagrams if isinstance(wire.parse_datagram(d), wire.FdtPacket)]
    return b"".join(d[wire.FDT_HEADER_SIZE :] for d in pieces)


def test_the_fdt_lists_the_image_object_with_its_raptorq_oti_and_the_manifest_object() -> None:
    release = make_release(random.Random(1).randbytes(300_001), KEY, chunk_size=64 * 1208)
    m = release.manifest
    turn = carousel_datagrams(release.envelope)
    root = ElementTree.fromstring(_xml(turn))  # noqa: S314 - our own FDT, built in this test
    assert int(root.get("Expires", "")) == m.expires + 2_208_988_800
    image, manifest = root.findall(f"{NS}File")
    # 249 symbols in Z = 4 blocks of Partition[249, 4] = (63, 62, 1, 3): the research note's case.
    assert image.attrib == {
        "TOI": "1",
        "Content-Location": "demo.img",
        "Content-Type": "application/octet-stream",
        "Content-Length": "300001",
        "Transfer-Length": "300001",
        "FEC-OTI-FEC-Encoding-ID": "6",
        "FEC-OTI-Maximum-Source-Block-Length": "63",
        "FEC-OTI-Encoding-Symbol-Length": "1208",
        "FEC-OTI-Scheme-Specific-Info": "BAABCA==",
    }
    assert base64.b64decode("BAABCA==") == bytes([4, 0, 1, 8])  # Z 4, N 1, Al 8
    assert [m.source_symbols(i) for i in range(m.chunk_count)] == [63, 62, 62, 62]
    envelope = release.envelope.compact_bytes
    packets = [wire.parse_datagram(d) for d in turn]
    fragments = [p for p in packets if isinstance(p, wire.ManifestPacket)]
    assert manifest.get("TOI") == str(fragments[0].toi)
    assert manifest.get("Content-Location") == "demo.img.otacast.json"
    assert manifest.get("Transfer-Length") == str(len(envelope))
    assert manifest.get("FEC-OTI-FEC-Encoding-ID") == "0"
    assert manifest.get("FEC-OTI-Encoding-Symbol-Length") == str(fragments[0].fragment_size)
    # The FDT goes first in every manifest turn; its packets carry the XML's length in EXT_FTI.
    assert isinstance(packets[0], wire.FdtPacket)
    assert int.from_bytes(turn[0][22:28], "big") == len(_xml(turn))


def test_every_sender_of_a_release_sends_byte_identical_fdt_packets() -> None:
    release = make_release(random.Random(2).randbytes(100_000), KEY)
    size = wire.data_datagram_size(release.manifest.fec.symbol_size)
    first = channels.manifest_fragments(release.envelope, size)
    again = channels.manifest_fragments(release.envelope, size)
    assert first == again
    instance = int.from_bytes(first[0][16:20], "big") & 0xFFFFF
    assert instance == fdt.instance_id(_xml(list(first)))


def test_an_image_of_several_objects_names_its_parts_and_each_part_has_its_own_oti() -> None:
    t = 256
    size = 256 * t  # 64 KiB chunks of 256 symbols: parts of 255 of them
    manifest = make_release(bytes(10), KEY, symbol_size=t, chunk_size=size).manifest
    manifest = dataclasses.replace(
        manifest,
        image=dataclasses.replace(manifest.image, length=255 * size + 1000),
        chunks=dataclasses.replace(manifest.chunks, sha256=(b"\0" * 32,) * 256),
    )
    assert fec.chunk_count(255 * size + 1000, size, t) == 256
    xml = fdt.fdt_xml(manifest, b"{}", wire.manifest_toi(bytes(8)), 1024).decode()
    assert re.findall(r'Content-Location="([^"]+)"', xml) == [
        "demo.img.part000",
        "demo.img.part001",
        "demo.img.otacast.json",
    ]
    assert f'Content-Length="{255 * size}"' in xml and 'Content-Length="1000"' in xml
    # A full part has Z = 255 blocks (8 bits); the second has one.
    assert base64.b64encode(bytes([255, 0, 1, 8])).decode() in xml
    assert base64.b64encode(bytes([1, 0, 1, 8])).decode() in xml


def test_expires_is_capped_below_the_ntp_era_wrap() -> None:
    assert fdt.ntp_seconds(0) == 2_208_988_800
    assert fdt.ntp_seconds(2**32) == 2**32 - 1


def test_at_the_smallest_symbol_size_manifest_fragments_are_still_256_bytes() -> None:
    # A 276-byte DATA datagram would leave 240 bytes of fragment: every receiver refuses a
    # fragment under 256 bytes that is not the last.
    release = make_release(
        random.Random(4).randbytes(70_000), KEY, symbol_size=256, chunk_size=65536
    )
    turn = carousel_datagrams(release.envelope)
    fragments = [wire.parse_datagram(d) for d in turn]
    sizes = {p.fragment_size for p in fragments if isinstance(p, wire.ManifestPacket)}
    assert sizes == {256}
