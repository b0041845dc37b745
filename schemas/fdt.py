"""The FLUTE File Delivery Table a sender sends with every manifest carousel turn (RFC 6726).

It lets a plain FLUTE receiver (one that speaks RaptorQ, FEC Encoding ID 6) take the image and
the signed manifest as files: one ``File`` per image part (`otacast.schemas.fec`; object TOI
``1+p``, Content-Location the image's name, with a ``.partNNN`` suffix only when there are
several parts) with its RaptorQ OTI, the block index when the manifest has one (TOI
``wire.INDEX_TOI``, ``<image name>.blockindex``, RaptorQ, cut like a part), and the manifest
envelope as a Compact No-Code object (Content-Location ``<image name>.otacast.json``, the TOI of
its MANIFEST datagrams).

The delta lane (`wire.LANE_TSI_BIT`) is a FLUTE session of its own with its own FDT (TSI
``wire.lane_tsi``, TOI 0), listing its RaptorQ objects only (`lane_objects`): the lane object
``<image name>.delta`` (TOI ``wire.LANE_OBJECT_TOI``) and the index patch of each listed release
``<image name>.patch-<sequence>`` (``wire.LANE_PATCH_TOI + j``), each cut as an image part of its
length.  The index group (`wire.INDEX_TSI_BIT`) is one more, whose FDT lists one object
(`index_group_objects`): the full block index ``<image name>.blockindex``
(``wire.INDEX_GROUP_TOI``).  `SideSession` describes either.  The manifest's MANIFEST datagrams
go out on their groups unchanged, on the data session's TSI (a device checks a manifest's TSI
against the datagrams'), so their FDTs do not list them.

Everything in it is derived from the signed manifest, the envelope and the manifest fragment
size, so every sender of a release sends byte-identical FDT packets: ``Expires`` is the
manifest's expiry in NTP seconds (capped below the NTP era-0 wrap in 2036, which a 32-bit
``Expires`` cannot pass), and the FDT instance id is 20 bits of the SHA-256 of the XML.

An otacast device never parses it: a manifest object and its signature are all it needs.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from . import addressing, blockindex, fec, wire
from .fec import Part
from .manifest import Envelope, Manifest

# RFC 5905: NTP seconds count from 1900; a 32-bit value wraps on 2036-02-07.
NTP_UNIX_OFFSET: Final = 2_208_988_800
NTP_ERA0_LAST: Final = (1 << 32) - 1
FDT_NAMESPACE: Final = "urn:IETF:metadata:2005:FLUTE:FDT"
RAPTORQ_ALIGNMENT: Final = 8  # RFC 6330 Al; `limits.SYMBOL_ALIGNMENT`
MANIFEST_SUFFIX: Final = ".otacast.json"
LANE_SUFFIX: Final = ".delta"  # the lane object of image NAME is NAME + this
PATCH_INFIX: Final = ".patch-"  # the index patch from release S is NAME + this + S


def ntp_seconds(unix: int) -> int:
    return min(unix + NTP_UNIX_OFFSET, NTP_ERA0_LAST)


def part_location(manifest: Manifest, part: int) -> str:
    name = manifest.image.name
    return name if manifest.part_count == 1 else f"{name}.part{part:03d}"


def patch_location(image_name: str, sequence: int) -> str:
    """The file name of the index patch for devices on release `sequence`."""
    return f"{image_name}{PATCH_INFIX}{sequence}"


def lane_objects(manifest: Manifest) -> list[tuple[int, str, Part]]:
    """(TOI, Content-Location, RFC 6330 cut) of each RaptorQ object of the delta lane, in TOI
    order; empty without a lane."""
    delta = manifest.delta
    if delta is None or manifest.index is None:
        return []
    name = manifest.image.name
    objects = [(wire.LANE_OBJECT_TOI, name + LANE_SUFFIX, delta.length)] + [
        (wire.LANE_PATCH_TOI + j, patch_location(name, f.sequence), f.patch_length)
        for j, f in enumerate(delta.sources)
    ]
    return [(toi, where, _cut(manifest, length)) for toi, where, length in objects]


def index_group_objects(manifest: Manifest) -> list[tuple[int, str, Part]]:
    """The index group's one RaptorQ object, the full block index, as `lane_objects` gives the
    lane's; empty when the manifest lists no index."""
    if manifest.index is None:
        return []
    where = manifest.image.name + blockindex.FILE_SUFFIX
    return [(wire.INDEX_GROUP_TOI, where, _cut(manifest, manifest.index.length))]


def _cut(manifest: Manifest, length: int) -> Part:
    return fec.part(length, manifest.chunks.size, manifest.fec.symbol_size, 0)


@dataclass(frozen=True)
class SideSession:
    """A FLUTE session beside a release's carousel, on groups of its own (the module doc): what
    the sender sends there and the device takes from there."""

    name: str  # for the operator, and the sender's cache file (``-NAME.symbols``)
    rate_index: int  # its groups (`addressing`)
    tsi_bit: int  # its TSI: the data session's with this bit flipped
    objects: Callable[[Manifest], list[tuple[int, str, Part]]]

    def tsi(self, manifest: Manifest) -> int:
        return manifest.tsi ^ self.tsi_bit

    def fdt_xml(self, manifest: Manifest) -> bytes:
        t = manifest.fec.symbol_size
        return _instance_xml(
            manifest,
            [_raptorq_file(toi, where, part, t) for toi, where, part in self.objects(manifest)],
        )

    def fdt_datagrams(self, manifest: Manifest) -> tuple[bytes, ...]:
        """Its FDT packets (TOI 0 of its TSI)."""
        return _fdt_packets(self.tsi(manifest), self.fdt_xml(manifest))


LANE: Final = SideSession("lane", addressing.LANE_RATE_INDEX, wire.LANE_TSI_BIT, lane_objects)
INDEX_GROUP: Final = SideSession(
    "index", addressing.INDEX_RATE_INDEX, wire.INDEX_TSI_BIT, index_group_objects
)


def raptorq_scheme_info(blocks: int) -> str:
    """FEC-OTI-Scheme-Specific-Info of RFC 6330 section 3.3.3: Z (8 bits), N = 1 (16), Al (8)."""
    return base64.b64encode(struct.pack(">BHB", blocks, 1, RAPTORQ_ALIGNMENT)).decode()


def _raptorq_file(toi: int, location: str, part: Part, symbol_size: int) -> str:
    return (
        f'  <File TOI="{toi}" Content-Location="{location}" '
        f'Content-Type="application/octet-stream" Content-Length="{part.length}" '
        f'Transfer-Length="{part.length}" FEC-OTI-FEC-Encoding-ID="6" '
        f'FEC-OTI-Maximum-Source-Block-Length="{part.large}" '
        f'FEC-OTI-Encoding-Symbol-Length="{symbol_size}" '
        f'FEC-OTI-Scheme-Specific-Info="{raptorq_scheme_info(part.blocks)}"/>'
    )


def _instance_xml(manifest: Manifest, files: list[str]) -> bytes:
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<FDT-Instance xmlns="{FDT_NAMESPACE}" Expires="{ntp_seconds(manifest.expires)}">\n'
        + "\n".join(files)
        + "\n</FDT-Instance>\n"
    )
    return text.encode()


def fdt_xml(manifest: Manifest, envelope: bytes, envelope_toi: int, fragment_size: int) -> bytes:
    """The FDT instance's XML."""
    t = manifest.fec.symbol_size
    files = [
        _raptorq_file(1 + index, part_location(manifest, index), manifest.part(index), t)
        for index in range(manifest.part_count)
    ]
    index_part = manifest.index_part()
    if index_part is not None:
        location = manifest.image.name + blockindex.FILE_SUFFIX
        files.append(_raptorq_file(wire.INDEX_TOI, location, index_part, t))
    files.append(
        f'  <File TOI="{envelope_toi}" Content-Location="{manifest.image.name}{MANIFEST_SUFFIX}" '
        f'Content-Type="application/json" Content-Length="{len(envelope)}" '
        f'Transfer-Length="{len(envelope)}" FEC-OTI-FEC-Encoding-ID="0" '
        f'FEC-OTI-Maximum-Source-Block-Length="{-(-len(envelope) // fragment_size)}" '
        f'FEC-OTI-Encoding-Symbol-Length="{fragment_size}"/>'
    )
    return _instance_xml(manifest, files)


def instance_id(xml: bytes) -> int:
    """The 20-bit FDT instance id: the same for the same table, whoever sends it."""
    return int.from_bytes(hashlib.sha256(xml).digest()[:4], "big") >> 12


def fdt_datagrams(envelope: Envelope, fragment_size: int) -> tuple[bytes, ...]:
    """The FDT packets of `envelope`'s release, describing its manifest object as cut into
    `fragment_size`-byte fragments (`wire.fragment_envelope`)."""
    manifest = envelope.manifest
    toi = wire.manifest_toi(envelope.envelope_id)
    xml = fdt_xml(manifest, envelope.compact_bytes, toi, fragment_size)
    return _fdt_packets(wire.session_tsi(manifest.session_id), xml)


def _fdt_packets(tsi: int, xml: bytes) -> tuple[bytes, ...]:
    instance, step = instance_id(xml), wire.FDT_SYMBOL_SIZE
    return tuple(
        wire.build_fdt_datagram(tsi, instance, len(xml), index, xml[offset : offset + step])
        for index, offset in enumerate(range(0, len(xml), step))
    )
