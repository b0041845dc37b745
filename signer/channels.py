"""Setting up ``otacast-signer serve``: from a signed manifest and its image to channel plans.

Theory of operation
-------------------
`build_channels` does everything that comes before the first datagram: it checks the options
against the manifest (not expired, one group for one rate, a repair pool within bounds) and the
image against the manifest, encodes the image into the symbol cache (or reuses it), frames the
MANIFEST fragments, signs every chunk's AUTH pages with the stream key (packet
authentication), and plans one channel per rate: its group and the shared port.

The result, a `ServePlan`, holds no socket and reads no clock: the driver (`serve`) opens one
socket per channel, makes each channel's `SenderCore` with `ServePlan.core` at the time it
starts, and closes the plan (its symbol reader) when it stops.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from otacast.schemas import addressing, wire
from otacast.schemas.errors import Expired
from otacast.schemas.fdt import fdt_datagrams
from otacast.schemas.limits import DEFAULT_MAX_DATAGRAM, MIN_MANIFEST_FRAGMENT
from otacast.schemas.manifest import Envelope, Manifest

from . import lifetime, symbol_cache
from .auth_pages import AuthPages, release_digests
from .errors import ReadError, UsageError
from .keys import SigningKey
from .report import Reporter
from .schedule import SenderCore
from .sign import check_image
from .transport import gso_batch


@dataclass
class ServeOptions:
    interface: str
    rates: list[int]  # bytes/s per rate channel; 0 = unpaced
    group: str | None = None
    port: int | None = None
    asm: bool = False
    announce: bool = True  # on the ASM group, for devices without SRV records (announce.py)
    source: str | None = None
    hops: int = 8
    sender_index: int = 0
    sender_count: int = 1
    loops: int | None = None
    duration: float | None = None
    repair: float = 0.5
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "otacast")
    gso: bool = True
    loopback: bool = False
    json: bool = False
    stream_key: SigningKey | None = None  # signs AUTH pages (packet authentication)


@dataclass(frozen=True)
class ChannelPlan:
    """One rate channel: its own group, its own core and socket once the driver starts it."""

    rate: int  # bytes/s; 0 = unpaced
    group: str


@dataclass
class ServePlan:
    """Everything a driver needs to start sending (see the module doc)."""

    manifest: Manifest
    options: ServeOptions
    reader: symbol_cache.SymbolReader
    batch: int  # datagrams per send at most (one GSO send)
    fragments: tuple[bytes, ...]  # the framed MANIFEST datagrams
    pages: AuthPages | None  # the release's digests and stream key; None: no packet auth
    port: int
    channels: tuple[ChannelPlan, ...]

    def core(self, channel: ChannelPlan, now: float, wall: float) -> SenderCore:
        """The sans-IO schedule of `channel`, starting at `now` (wall-clock time `wall`)."""
        return sender_core(
            self.manifest,
            self.reader.layout,
            rate=channel.rate,
            fragments=self.fragments,
            now=now,
            wall=wall,
            sender_index=self.options.sender_index,
            sender_count=self.options.sender_count,
            passes=self.options.loops,
            duration=self.options.duration,
            packet_auth=self.pages is not None,
        )

    def close(self) -> None:
        self.reader.close()


def sender_core(
    manifest: Manifest,
    layout: symbol_cache.CycleLayout,
    *,
    rate: float,
    fragments: Sequence[bytes],
    now: float,
    wall: float | None = None,
    sender_index: int = 0,
    sender_count: int = 1,
    passes: int | None = None,
    duration: float | None = None,
    packet_auth: bool = False,
) -> SenderCore:
    """The sans-IO schedule of one channel of `manifest`, its cycles laid out as `layout`, sent
    in GSO batches, a visit being as many symbols as one AUTH page vouches for (whether or not
    `packet_auth` sends the pages, so the order is the same either way)."""
    capacity = wire.auth_capacity(layout.datagram_size)
    return SenderCore(
        layout.cycles,
        layout.sources,
        visit=capacity,
        visit_sizes=visit_sizes(layout, capacity),
        authed=layout.chunks,
        datagram_size=layout.datagram_size,
        batch=gso_batch(layout.datagram_size),
        rate=rate,
        manifest=fragments,
        now=now,
        wall=wall,
        sender_index=sender_index,
        sender_count=sender_count,
        passes=passes,
        duration=duration,
        auth_capacity=capacity if packet_auth else None,
    )


def visit_sizes(layout: symbol_cache.CycleLayout, visit: int) -> list[int]:
    """`visit` symbols per round for every chunk; for each block of the index, the same share of
    its K as a visit is of the largest chunk's (at least one symbol: `schedule`'s module doc)."""
    largest = max(layout.sources[: layout.chunks])
    return [
        visit if c < layout.chunks else max(1, -(-visit * k // largest))
        for c, k in enumerate(layout.sources)
    ]


def manifest_fragments(
    envelope: Envelope, datagram_size: int, max_datagram: int = DEFAULT_MAX_DATAGRAM
) -> tuple[bytes, ...]:
    """The FLUTE FDT datagrams of `envelope`'s release, then its MANIFEST datagrams, each no
    larger than a DATA datagram (`datagram_size`) nor `max_datagram` (the IPv6 minimum MTU's
    payload by default, whatever the symbol size), but with fragments of at least
    MIN_MANIFEST_FRAGMENT bytes (292-byte datagrams beside the 276-byte DATA datagrams of the
    smallest symbol size).  The manifest carousel and the announcements send them together, so a
    FLUTE receiver learns the files with every manifest turn."""
    smallest = wire.MANIFEST_HEADER_SIZE + MIN_MANIFEST_FRAGMENT
    packets = wire.fragment_envelope(
        envelope.manifest.tsi,
        envelope.envelope_id,
        envelope.compact_bytes,
        max(min(max_datagram, datagram_size), smallest),
    )
    fdt = fdt_datagrams(envelope, packets[0].fragment_size)
    return fdt + tuple(wire.build_datagram(p) for p in packets)


def channel_group(envelope: Envelope, options: ServeOptions, index: int) -> str:
    transport = envelope.manifest.transport
    if options.group and index == 0:
        return options.group
    if index == 0:
        return transport.asm_group if options.asm else transport.ssm_group
    derive = addressing.asm_group if options.asm else addressing.ssm_group
    return derive(transport.channel, transport.scope, index)


def build_channels(
    envelope: Envelope, image: Path, options: ServeOptions, report: Reporter
) -> ServePlan:
    """Check, encode and sign everything `serve` sends; the caller closes the plan."""
    manifest = envelope.manifest
    if lifetime.outlook(manifest.expires, time.time()).expired:
        raise Expired(lifetime.refused(manifest.expires))
    if options.group and len(options.rates) > 1:
        raise UsageError("--group names one group; it cannot be used with several rates")
    if options.repair < symbol_cache.MIN_REPAIR_FRACTION:
        raise UsageError("--repair must be at least 50%")
    if options.repair > symbol_cache.MAX_REPAIR_FRACTION:
        raise UsageError("--repair is at most 400%")
    index = check_image(manifest, image)
    report.event("encoding", chunks=manifest.chunk_count, cache_dir=str(options.cache_dir))
    path = symbol_cache.build(
        manifest,
        image,
        options.cache_dir,
        options.repair,
        progress=report.encoding,
        warn=report.warning,
        index=index,
    )
    layout = symbol_cache.CycleLayout.for_manifest(manifest, options.repair)
    fragments = manifest_fragments(envelope, layout.datagram_size)
    batch = gso_batch(layout.datagram_size)
    reader = symbol_cache.SymbolReader(path, layout, batch)
    try:
        pages = _auth_pages(envelope, options, reader, report)
    except BaseException:
        reader.close()
        raise
    return ServePlan(
        manifest=manifest,
        options=options,
        reader=reader,
        batch=batch,
        fragments=fragments,
        pages=pages,
        port=options.port or manifest.transport.port,
        channels=tuple(
            ChannelPlan(rate, channel_group(envelope, options, index))
            for index, rate in enumerate(options.rates)
        ),
    )


def _auth_pages(
    envelope: Envelope,
    options: ServeOptions,
    reader: symbol_cache.SymbolReader,
    report: Reporter,
) -> AuthPages | None:
    """What signs every chunk's AUTH pages as they are sent, or None without a stream key."""
    manifest = envelope.manifest
    key = options.stream_key
    if key is None:
        if manifest.stream_keys:
            report.warning(
                "the manifest lists stream keys but no --stream-key was given: devices that "
                "authenticate packets will not decode this sender's data"
            )
        return None
    senders = [k.sender for k in manifest.stream_keys if k.public == key.public]
    if not senders:
        raise UsageError(
            f"stream key {key.key_id} is not one the manifest lists "
            "(sign the release with --stream-key naming its public key)"
        )
    try:
        digests = release_digests(reader)
    except OSError as exc:
        raise ReadError(f"cannot read the symbol cache: {exc.strerror or exc}") from None
    capacity = wire.auth_capacity(reader.layout.datagram_size)
    pages = AuthPages(manifest.tsi, senders[0], digests, capacity, key.signer())
    count = sum(pages.page_count(chunk) for chunk in range(len(digests)))
    report.event("auth-pages", sender=senders[0], pages=count)
    return pages
