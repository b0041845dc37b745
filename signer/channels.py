"""Setting up ``otacast-signer serve``: from a signed manifest and its image to channel plans.

Theory of operation
-------------------
`build_channels` does everything that comes before the first datagram: it checks the options
against the manifest (not expired, one group for one rate, a repair pool within bounds) and the
image against the manifest, encodes the image into the symbol cache (or reuses it), frames the
MANIFEST fragments, signs every chunk's AUTH pages with the stream key (packet
authentication), and plans one channel per rate: its group and the shared port.  A restart
whose cache verifies skips the image's check when the image is the file checked before
(`image_record`) and reads the AUTH pages' digests kept beside the cache
(`auth_pages.kept_release_digests`): it sends without reading the image at all.

The result, a `ServePlan`, holds no socket and reads no clock: the driver (`serve`) opens one
socket per channel, makes each channel's `SenderCore` with `ServePlan.core` at the time it
starts, and closes the plan (its symbol readers) when it stops.

*Side channels* run beside the carousel, each a FLUTE session of its own (`fdt.SideSession`) on
its own groups (ASM or SSM as the main channel), with the same port and source: its objects
(`symbol_cache.build_side`, a cache file of its own), its own FDT followed by the release's
MANIFEST datagrams unchanged, and no AUTH pages (every object on them is checked whole against
its signed SHA-256 before a device uses it).  *The delta lane* (when the manifest has one and
``lane_share`` is not 0; `addressing.LANE_RATE_INDEX`) carries the lane object and the index
patches.  *The index group* (when the manifest has a block index and ``index_share`` is not 0;
`addressing.INDEX_RATE_INDEX`) carries the new release's full block index alone, for the devices
that need it whole (a lane device without its installed index, a device reusing local blocks
beside the carousel): they join it only until they have it, and nobody else hears it.  Each takes
its share of the first channel's rate, which keeps the rest, so all together send at the rate
asked; unpaced, the driver holds each to that share of the bytes it and the first channel send.
Its schedule is the main channel's (symbol-major visits, the same sender offset), each block's
visit the same share of its K as a full visit is of the session's largest block's.  It runs as
long as the main channels do, however many passes of it that takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from otacast.schemas import addressing, fdt, wire
from otacast.schemas.errors import Expired
from otacast.schemas.fdt import SideSession, fdt_datagrams
from otacast.schemas.limits import DEFAULT_MAX_DATAGRAM, MIN_MANIFEST_FRAGMENT
from otacast.schemas.manifest import Envelope, Manifest

from . import image_record, lane, lifetime, symbol_cache
from .auth_pages import AuthPages, kept_release_digests
from .errors import ReadError, UsageError
from .keys import SigningKey
from .report import Reporter
from .schedule import SenderCore
from .sign import cached_index, check_image
from .transport import gso_batch

# The delta lane's share of the first channel's rate unless told otherwise: at 10 MB/s it sends
# the 1.86 MB lane of the design's small update of a 1.2 GB image in about 2 s, and a full pass
# of the image takes 11% longer (delta-design.md, section 5).
DEFAULT_LANE_SHARE = 0.1
# The index group's share of the first channel's rate unless told otherwise.  The full index is
# about 0.39% of the image (4.92 MB at 1200 MiB), so at 4% a device that joins at any moment has
# it after ~10% of the time a pass of the image's source symbols takes (~6% of a pass with the
# default 50% repair pool), early enough that the local pass, not the carousel, supplies most
# blocks; every device on the carousel pays those 4% of its airtime.
DEFAULT_INDEX_SHARE = 0.04


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
    lane_share: float = DEFAULT_LANE_SHARE  # of the first channel's rate; 0: no delta lane
    # "mld": a side channel sends only while a device on the link listens (where this host can
    # read MLD); "share": always at its share.
    lane_airtime: str = "mld"
    lane_dir: Path | None = None  # where the lane's files are (default: beside the image)
    index_share: float = DEFAULT_INDEX_SHARE  # of the first channel's rate; 0: no index group


@dataclass(frozen=True)
class ChannelPlan:
    """One rate channel: its own group, its own core and socket once the driver starts it."""

    rate: int  # bytes/s; 0 = unpaced
    group: str
    side: SideSession | None = None  # a side channel (the delta lane, the index group)

    @property
    def lane(self) -> bool:
        """A side channel: no AUTH pages, no end of its own, held to its share when unpaced."""
        return self.side is not None


@dataclass
class SidePlan:
    """A side channel's symbols and its carousel's datagrams (FDT, then MANIFEST)."""

    session: SideSession
    reader: symbol_cache.SymbolReader
    fragments: tuple[bytes, ...]
    share: float  # of the bytes it and the first channel send, when unpaced


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
    sides: tuple[SidePlan, ...] = ()
    # The wall-clock time of round 0 of the carousel's phase (`otacast.signer.schedule`): this
    # release's first start here for a lone sender, the epoch for one of several (`--sender`).
    origin: float = 0.0

    def side_of(self, channel: ChannelPlan) -> SidePlan | None:
        return next((s for s in self.sides if s.session is channel.side), None)

    def reader_of(self, channel: ChannelPlan) -> symbol_cache.SymbolReader:
        side = self.side_of(channel)
        return self.reader if side is None else side.reader

    def core(self, channel: ChannelPlan, now: float, wall: float) -> SenderCore:
        """The sans-IO schedule of `channel`, starting at `now` (wall-clock time `wall`)."""
        side = self.side_of(channel)
        # A side channel has no AUTH pages and no end of its own: it runs while the carousel does.
        return sender_core(
            self.manifest,
            self.reader.layout if side is None else side.reader.layout,
            rate=channel.rate,
            fragments=self.fragments if side is None else side.fragments,
            now=now,
            wall=wall,
            origin=self.origin,
            sender_index=self.options.sender_index,
            sender_count=self.options.sender_count,
            passes=self.options.loops if side is None else None,
            duration=self.options.duration,
            packet_auth=self.pages is not None and side is None,
        )

    def close(self) -> None:
        self.reader.close()
        for side in self.sides:
            side.reader.close()


def sender_core(
    manifest: Manifest,
    layout: symbol_cache.CycleLayout,
    *,
    rate: float,
    fragments: Sequence[bytes],
    now: float,
    wall: float | None = None,
    origin: float = 0.0,
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
        wall=None if wall is None else wall - origin,
        sender_index=sender_index,
        sender_count=sender_count,
        passes=passes,
        duration=duration,
        auth_capacity=capacity if packet_auth else None,
    )


def visit_sizes(layout: symbol_cache.CycleLayout, visit: int) -> list[int]:
    """`visit` symbols per round for every chunk; for each block of the index (or of the delta
    lane, which has no chunk), the same share of its K as a visit is of the largest chunk's (at
    least one symbol: `schedule`'s module doc)."""
    largest = max(layout.sources[: layout.chunks] or layout.sources)
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
    packets = _manifest_packets(envelope, datagram_size, max_datagram)
    fdt = fdt_datagrams(envelope, packets[0].fragment_size)
    return fdt + tuple(wire.build_datagram(p) for p in packets)


def side_fragments(
    envelope: Envelope,
    side: SideSession,
    datagram_size: int,
    max_datagram: int = DEFAULT_MAX_DATAGRAM,
) -> tuple[bytes, ...]:
    """A side channel's FDT datagrams, then the release's MANIFEST datagrams as the data session
    sends them (their TSI is the release's: a device checks it against the manifest)."""
    packets = _manifest_packets(envelope, datagram_size, max_datagram)
    return side.fdt_datagrams(envelope.manifest) + tuple(wire.build_datagram(p) for p in packets)


def _manifest_packets(
    envelope: Envelope, datagram_size: int, max_datagram: int
) -> list[wire.ManifestPacket]:
    smallest = wire.MANIFEST_HEADER_SIZE + MIN_MANIFEST_FRAGMENT
    return wire.fragment_envelope(
        envelope.manifest.tsi,
        envelope.envelope_id,
        envelope.compact_bytes,
        max(min(max_datagram, datagram_size), smallest),
    )


def channel_group(envelope: Envelope, options: ServeOptions, index: int) -> str:
    """The group of rate channel `index` (`SideSession.rate_index`: a side channel's)."""
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
    for name, share in (
        ("--lane-share", options.lane_share),
        ("--index-share", options.index_share),
    ):
        if not 0 <= share < 1:
            raise UsageError(f"{name} is a fraction from 0 up to (not including) 1")
    if options.lane_share + options.index_share >= 1:
        raise UsageError("--lane-share and --index-share together leave the carousel nothing")
    # The cache file is verified (an XXH3 over it all) while the image is checked (a SHA-256
    # over the image, another per chunk, on their own thread), unless the image is the file
    # checked at an earlier start and the cache verifies: then nothing needs it
    # (`image_record`).
    # Made first: the check keeps the block index and the image's record there, and on a
    # first start (no directory yet) they would be lost, and built again at the next.
    symbol_cache.make_directory(options.cache_dir)
    record = image_record.path_for(options.cache_dir, manifest)
    index_path = symbol_cache.index_path(options.cache_dir, manifest)
    with ThreadPoolExecutor(max_workers=1) as verifier:
        cached = verifier.submit(
            symbol_cache.check, manifest, options.cache_dir, options.repair, report.warning
        )
        index = None
        known = image_record.matches(record, manifest, image)
        if known:
            index = cached_index(manifest, index_path)
            known = (manifest.index is None or index is not None) and cached.result()
        if not known:
            index = check_image(manifest, image, index_cache=index_path, record=record)
        reusable = cached.result()
    with_lane = manifest.delta is not None and options.lane_share > 0 and index is not None
    lane_files = lane.check_files(manifest, options.lane_dir or image.parent) if with_lane else []
    report.event("encoding", chunks=manifest.chunk_count, cache_dir=str(options.cache_dir))
    path = symbol_cache.build(
        manifest,
        image,
        options.cache_dir,
        options.repair,
        progress=report.encoding,
        warn=report.warning,
        index=index,
        reusable=reusable,
    )
    layout = symbol_cache.CycleLayout.for_manifest(manifest, options.repair)
    fragments = manifest_fragments(envelope, layout.datagram_size)
    batch = gso_batch(layout.datagram_size)
    reader = symbol_cache.SymbolReader(path, layout, batch)
    wanted: list[tuple[SideSession, dict[int, Path | bytes], float]] = []
    if with_lane:
        wanted.append((fdt.LANE, {f.toi: f.path for f in lane_files}, options.lane_share))
    if index is not None and options.index_share > 0:
        wanted.append((fdt.INDEX_GROUP, {wire.INDEX_GROUP_TOI: index.build()}, options.index_share))
    sides: list[SidePlan] = []
    try:
        pages = _auth_pages(envelope, options, reader, report)
        for session, objects, share in wanted:
            side_path = symbol_cache.build_side(
                manifest, session, objects, options.cache_dir, options.repair, warn=report.warning
            )
            side_layout = symbol_cache.CycleLayout.for_side(manifest, session, options.repair)
            sides.append(
                SidePlan(
                    session,
                    symbol_cache.SymbolReader(side_path, side_layout, batch),
                    side_fragments(envelope, session, layout.datagram_size),
                    share,
                )
            )
        # Last, after the encoding and the AUTH pages' digests: round 0 is when sending starts.
        origin = _origin(manifest, options, report)
    except BaseException:
        reader.close()
        for side in sides:
            side.reader.close()
        raise
    plans = [
        ChannelPlan(rate, channel_group(envelope, options, number))
        for number, rate in enumerate(options.rates)
    ]
    first = plans[0].rate
    for side in sides:
        side_rate = round(first * side.share)
        plans[0] = ChannelPlan(plans[0].rate - side_rate, plans[0].group)
        group = channel_group(envelope, options, side.session.rate_index)
        plans.append(ChannelPlan(side_rate, group, side=side.session))
    return ServePlan(
        manifest=manifest,
        options=options,
        reader=reader,
        batch=batch,
        fragments=fragments,
        pages=pages,
        port=options.port or manifest.transport.port,
        channels=tuple(plans),
        sides=tuple(sides),
        origin=origin,
    )


def _origin(manifest: Manifest, options: ServeOptions, report: Reporter) -> float:
    """Round 0 of this sender's phase (`phase_origin`), its first start read from (or written
    to) the cache directory only when it is a lone sender."""
    return phase_origin(
        options.sender_count,
        lambda: symbol_cache.phase_origin(options.cache_dir, manifest, time.time(), report.warning),
    )


def phase_origin(sender_count: int, first_start: Callable[[], float]) -> float:
    """The wall-clock time of round 0 of the phase: senders of one release on several hosts
    (``--sender i/n``) count from the epoch, so that they agree without talking; a lone sender
    from its `first_start`, so that devices already listening then hear every chunk's source
    symbols first and, at 0% loss, need no decode at all (`otacast.signer.schedule`, "Absolute
    phase").  The one rule ``serve``, the `Link` and the sweep share."""
    return 0.0 if sender_count > 1 else first_start()


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
        digests = kept_release_digests(reader)
    except OSError as exc:
        raise ReadError(f"cannot read the symbol cache: {exc.strerror or exc}") from None
    capacity = wire.auth_capacity(reader.layout.datagram_size)
    pages = AuthPages(manifest.tsi, senders[0], digests, capacity, key.signer())
    count = sum(pages.page_count(chunk) for chunk in range(len(digests)))
    report.event("auth-pages", sender=senders[0], pages=count)
    return pages
