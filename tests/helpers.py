"""The one helpers module of the unit tests: releases, datagrams, and an in-memory link.

Releases
--------
`manifest_for` makes a deterministic manifest for an image; `make_release` signs one (a
`Release`: image, envelope, trust set, verified manifest).  The reference release shared by the
receiver-core and attack tests (`KEY`, `IMAGE`, `ENVELOPE`, `DATA` ...) is defined here once.
`read_only_file` and `shell_script` make the read-only image and the stand-in program that the
installer tests hand over.

JSON lines
----------
`untimed` checks that a device's JSON line carries its RFC 3339 ``time`` and gives the rest, for
tests that compare the other fields exactly.

Metrics
-------
`metric_samples` parses a Prometheus exposition with prometheus_client's parser (the unit and
integration tests of ``serve --metrics`` and ``watch --metrics-file``).

Datagrams
---------
Built the way the sender builds them, with its own code: manifest fragments as ``serve`` cuts
them (`wire.fragment_envelope` at the datagram size it uses), each chunk's cycle of DATA
datagrams from `signer.encoder.raptorq_encode` framed as `signer.symbol_cache` frames them
(pinned to the cache file by a test in ``test_link.py``), AUTH pages from
`signer.auth_pages.AuthPages` (signed as they are sent), and the send order from
`signer.schedule.SenderCore` (built in one place, `sender_core`, as ``serve`` builds it).
`drain`, `receive_all`, `receive_from` and `rebuilt` feed a receiver core by hand and read back
what it completed.

The link simulator
------------------
`Link` connects one or more `SenderCore`s to one or more `ReceiverCore`s in memory, on a
virtual clock, so that delivery behaviour (passes, datagrams needed, decoders held) can be
measured as exact, repeatable counts.

What is simulated:

* *Time.*  A virtual clock in seconds from 0.  Each sender core's ``next_action(now)`` drives
  it: a ``Wait`` moves that sender to its ``until``; a send happens at the current time and takes
  none.  The clock is the earliest pending event (a sender's next action, a datagram's arrival,
  a receiver joining or its timer).  Sender cores see the virtual time itself (they take a
  monotonic clock); receivers see ``epoch + t`` (their ``now`` is also the wall time that
  manifest expiry is checked against).  Pacing is therefore exactly the cores' token bucket.
* *Senders.*  Each has its own sender index and count (as ``serve --sender i/n``), start time,
  rate and source address, and the wall clock at its start is ``epoch + start``; its phase
  counts from its origin, by default as ``serve`` sets it on a first start (the epoch for one
  of several senders, its own start for a lone one; a restart names the first start's);
  its MANIFEST, DATA and (with a stream key) AUTH datagrams are the real ones, in the order the
  core's `SendAuth` actions choose.
* *Receivers.*  Each hears every sender (one group), from its join time on; per receiver,
  independent loss (`RandomLoss`, or bursty `GilbertElliott`), seeded, and reordering by a
  bounded random delay per datagram.  Datagrams go to ``receive_datagram``; timers
  (``get_timer``/``handle_timer``) fire at their deadlines; events are handled as the receive
  driver does: chunks resumed from staging are ``mark_done`` on ``ManifestVerified``, every
  ``ChunkComplete`` is checked against the image (as staging would persist it), a
  ``FallbackNeeded`` is noted (and, with ``fallback="instant"``, answered as an HTTP mirror would
  be, by ``mark_done`` of every missing chunk), ``ImageComplete`` ends that receiver's run (the
  driver exits; later datagrams are not delivered).
* *Counts.*  Per receiver: data datagrams that reached its link while it listened (``heard``,
  lost ones included, counted on arrival so that a receiver stops hearing once complete) against
  the ideal K/(1-p) (K the image's source symbols, p its model's mean loss), data datagrams
  delivered (``received``), chunks done over virtual time, how far into its passes each sender
  was when the image completed, and the decoder high-water mark (decoders alive at once,
  counted from outside through the core's ``decoder_factory``: a wrapper per decoder whose
  release CPython reports at once, as the core drops it).

What is not: sockets, kernels and their buffers (no socket-buffer overflow, no GSO, all
datagrams are sent one by one), CPU time (decoding, hashing and signing take no virtual time, so
a receiver never falls behind), the installer and disk, and any cost of HTTP repair.  Timings
from the Link are therefore ideal-network figures; compare counts, not seconds, with
integration runs.

Scale: images can be small (a few chunks), but keep the source symbols per chunk near real ones
(about a thousand: a smaller chunk symbol size does it): with few symbols per chunk, chance
alone decides how far apart chunks complete, and counts stop resembling what real releases
show.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
import random
import re
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from otacast.plugin.core import ReceiverCore
from otacast.plugin.decoder import ChunkDecoder, raptorq_decoder
from otacast.plugin.events import (
    ChunkComplete,
    Event,
    FallbackNeeded,
    ImageComplete,
    IndexReady,
    ManifestRefused,
    ManifestVerified,
)
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.plugin.verify import verify_manifest
from otacast.schemas import fec, wire
from otacast.schemas.blockindex import BlockIndex, IndexBuilder
from otacast.schemas.limits import MAX_DECODER_BYTES
from otacast.schemas.manifest import (
    Chunking,
    Envelope,
    FecInfo,
    ImageInfo,
    Manifest,
    StreamKey,
    Transport,
)
from otacast.schemas.policy import TrustSet, VerifiedManifest
from otacast.signer import channels, symbol_cache
from otacast.signer.auth_pages import AuthPages, chunk_digests
from otacast.signer.encoder import raptorq_encode
from otacast.signer.keys import SigningKey
from otacast.signer.schedule import (
    Finished,
    SendAuth,
    SenderCore,
    SendManifest,
    SendSymbols,
    Wait,
)
from otacast.signer.sign import sign

CHANNEL = "updates.example.test"
# The wall time the receiver tests run at: after every manifest's creation, before its expiry.
NOW = 1_800_000_000.0
SENDER = "fd51::1"  # the honest sender's address

# --- Releases --------------------------------------------------------------------------------


def manifest_for(
    image: bytes,
    *,
    sequence: int = 1,
    chunk_size: int = 55 * 1208,
    symbol_size: int = fec.DEFAULT_SYMBOL_SIZE,
) -> Manifest:
    spans = (
        fec.chunk_span(len(image), chunk_size, symbol_size, index)
        for index in range(fec.chunk_count(len(image), chunk_size, symbol_size))
    )
    chunks = tuple(hashlib.sha256(image[o : o + n]).digest() for o, n in spans)
    return Manifest(
        name="demo-image",
        sequence=sequence,
        version=f"1.0.{sequence}",
        created=1_700_000_000,
        expires=1_900_000_000,
        compatible=("raspberrypi4", "qemux86-64"),
        image=ImageInfo("demo.img", len(image), hashlib.sha256(image).digest(), "raw"),
        chunks=Chunking(chunk_size, chunks),
        fec=FecInfo(symbol_size=symbol_size),
        transport=Transport.for_channel(CHANNEL, rates=(12_500_000,)),
        http=("https://mirror.example.test/demo.img",),
    )


@dataclass(frozen=True)
class Release:
    """A signed release: the image, its envelope and the trust set that accepts it."""

    image: bytes
    envelope: Envelope
    keys: tuple[SigningKey, ...]

    @property
    def manifest(self) -> Manifest:
        return self.envelope.manifest

    @property
    def trust(self) -> TrustSet:
        return TrustSet.from_public_keys([k.public for k in self.keys])

    def verified(self, *, now: float = NOW) -> VerifiedManifest:
        return verify_manifest(
            self.envelope.compact_bytes,
            self.trust,
            now=now,
            device_type=None,
            installed_sequence=None,
            channel=None,
        )

    def chunk(self, index: int) -> bytes:
        offset, length = self.manifest.chunk_span(index)
        return self.image[offset : offset + length]


def make_release(
    image: bytes,
    *keys: SigningKey,
    sequence: int = 5,
    chunk_size: int = 55 * 1208,
    symbol_size: int = fec.DEFAULT_SYMBOL_SIZE,
    stream_keys: Sequence[SigningKey] = (),
    image_format: str | None = None,
) -> Release:
    """`image` signed by `keys`; `stream_keys` are listed as senders 0, 1, ... (packet auth)."""
    manifest = manifest_for(
        image, sequence=sequence, chunk_size=chunk_size, symbol_size=symbol_size
    )
    if image_format is not None:
        manifest = dataclasses.replace(
            manifest, image=dataclasses.replace(manifest.image, format=image_format)
        )
    if stream_keys:
        listed = tuple(StreamKey(i, k.public) for i, k in enumerate(stream_keys))
        manifest = dataclasses.replace(manifest, stream_keys=listed)
    return Release(image, sign(manifest, list(keys)), keys)


def read_only_file(path: Path, data: bytes) -> Path:
    """`data` written to `path`, made read-only (installers get a read-only image)."""
    path.write_bytes(data)
    path.chmod(0o444)
    return path


def shell_script(path: Path, body: str) -> Path:
    """An executable ``/bin/sh`` script at `path`: a stand-in installer or program."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# --- Datagrams, built by the sender's code ---------------------------------------------------


def manifest_datagrams(
    envelope: Envelope | None = None, max_datagram: int | None = None
) -> list[bytes]:
    """The MANIFEST fragments of `envelope` (by default the reference `ENVELOPE`), cut at the
    size ``serve`` uses unless `max_datagram` is given (without the FDT datagrams ``serve``
    sends before them: `carousel_datagrams`)."""
    return [
        d
        for d in carousel_datagrams(envelope, max_datagram)
        if isinstance(wire.parse_datagram(d), wire.ManifestPacket)
    ]


def carousel_datagrams(
    envelope: Envelope | None = None, max_datagram: int | None = None
) -> list[bytes]:
    """What one manifest carousel turn of ``serve`` sends: the FDT, then the MANIFEST
    fragments."""
    if envelope is None:
        envelope = ENVELOPE
    datagram_size = wire.data_datagram_size(envelope.manifest.fec.symbol_size)
    if max_datagram is None:
        return list(channels.manifest_fragments(envelope, datagram_size))
    return list(channels.manifest_fragments(envelope, max_datagram, max_datagram))


def data_prefix(manifest: Manifest, chunk: int) -> bytes:
    """The DATA header the symbol cache puts before each codec packet of `chunk` (whose first
    byte, the codec's SBN 0, it replaces: `cycles`)."""
    datagram = wire.build_datagram(wire.DataPacket(manifest.tsi, chunk, 0, b"\0"))
    return datagram[: wire.CODEC_PACKET_OFFSET + 1]


def cycles(manifest: Manifest, image: bytes, repair: int | Sequence[int]) -> list[list[bytes]]:
    """Each chunk's cycle of DATA datagrams (K source symbols, then `repair` repair symbols,
    one count for all chunks or one per chunk), as the sender's symbol cache holds them."""
    repairs = [repair] * manifest.chunk_count if isinstance(repair, int) else list(repair)
    out = []
    for index in range(manifest.chunk_count):
        offset, length = manifest.chunk_span(index)
        packets = raptorq_encode(
            image[offset : offset + length], manifest.fec.symbol_size, repairs[index]
        )
        prefix = data_prefix(manifest, index)
        out.append([prefix + packet[1:] for packet in packets])
    return out


def cycles_for_fraction(release: Release, fraction: float) -> list[list[bytes]]:
    """The cycles ``serve --repair fraction`` sends (its `CycleLayout`): the chunks', then the
    block index's when the manifest lists one."""
    m = release.manifest
    layout = symbol_cache.CycleLayout.for_manifest(m, fraction)
    repairs = [c - k for c, k in zip(layout.cycles, layout.sources, strict=True)]
    out = cycles(m, release.image, repairs[: layout.chunks])
    if m.index is not None:
        index = IndexBuilder()
        index.update(release.image)
        for cycle in symbol_cache.index_cycles(m, index.finish().build(), layout, raptorq_encode):
            size = layout.datagram_size
            out.append([cycle[i : i + size] for i in range(0, len(cycle), size)])
    return out


def auth_pages(
    manifest: Manifest, chunk_cycles: Sequence[Sequence[bytes]], key: SigningKey, sender: int = 0
) -> AuthPages:
    """What signs the AUTH pages of the given cycles as they are sent (as `serve` does)."""
    size = wire.data_datagram_size(manifest.fec.symbol_size)
    digests = [chunk_digests(b"".join(c), size) for c in chunk_cycles]
    return AuthPages(manifest.tsi, sender, digests, wire.auth_capacity(size), key.signer())


# --- Feeding a receiver core by hand ---------------------------------------------------------


def drain(core: ReceiverCore) -> list[Event]:
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)
    return events


def receive_all(
    core: ReceiverCore, datagrams: Iterable[bytes], now: float = NOW, source: str = SENDER
) -> list[Event]:
    """Every datagram from one source at time `now`, and the events they caused."""
    return receive_from(core, ((d, source) for d in datagrams), now)


def receive_from(
    core: ReceiverCore, stream: Iterable[tuple[bytes, str]], now: float = NOW
) -> list[Event]:
    """Every (datagram, source) at time `now`, and the events they caused."""
    events: list[Event] = []
    for datagram, source in stream:
        core.receive_datagram(datagram, source, now, wall=now)
        events += drain(core)
    return events


def receive_reads(
    core: ReceiverCore,
    datagrams: Sequence[bytes],
    now: float = NOW,
    source: str = SENDER,
    read: int = 50,
    coalesced: bool = True,
) -> list[Event]:
    """`datagrams` as the receive loop hands them over (`ReceiverCore.receive_datagrams`):
    views of one buffer, `read` of them at a time, and the buffer overwritten with junk after
    each call, as the next read overwrites it; whatever the core kept without copying it is
    then spoiled.  With `coalesced`, the leading datagrams of each read that have the first
    one's length are also given as words, as the transport gives a GRO read's
    (`MulticastReceiver.coalesced`).  Returns the events they caused."""
    events: list[Event] = []
    for first in range(0, len(datagrams), read):
        group = datagrams[first : first + read]
        buffer = bytearray(b"".join(group))
        with memoryview(buffer) as whole:
            views, at = [], 0
            for datagram in group:
                views.append(whole[at : at + len(datagram)])
                at += len(datagram)
            segment = len(group[0])
            same = next((i for i, d in enumerate(group) if len(d) != segment), len(group))
            words = whole[: same * segment].cast("I") if coalesced and not segment & 3 else None
            core.receive_datagrams(
                views,
                source,
                now,
                wall=now,
                coalesced=None if words is None else (words, segment),
            )
            if words is not None:
                words.release()
            for view in views:
                view.release()
        buffer[:] = b"\xa5" * len(buffer)
        events += drain(core)
    return events


def rebuilt(events: Iterable[Event]) -> bytes:
    """The image as the completed chunks among `events` spell it."""
    chunks = {e.index: e.data for e in events if isinstance(e, ChunkComplete)}
    return b"".join(chunks[i] for i in sorted(chunks))


# --- The reference release of the receiver-core and attack tests -----------------------------

KEY = SigningKey(b"\x03" * 32)
TRUST = TrustSet.from_public_keys([KEY.public])
CHUNK = 55 * 1208  # about 64 KiB in whole 1208-byte symbols (RFC 6330 blocks)
IMAGE = random.Random(7).randbytes(4 * CHUNK - 1000)  # 4 chunks of 55 symbols


def reference_envelope(image: bytes = IMAGE, sequence: int = 5) -> Envelope:
    """`image` in `CHUNK`-byte chunks, signed by `KEY`."""
    return make_release(image, KEY, sequence=sequence, chunk_size=CHUNK).envelope


ENVELOPE = reference_envelope()
MANIFEST = ENVELOPE.manifest
DATA = dict(enumerate(cycles(MANIFEST, IMAGE, 40)))  # each chunk: K source, 40 repair


def interleaved(loss: float, seed: int = 1) -> list[bytes]:
    """`DATA` round-robin over the chunks, then the longer cycles' tails, with random loss."""
    rng = random.Random(seed)
    order = [d for batch in zip(*DATA.values(), strict=False) for d in batch]
    order += [d for index in DATA for d in DATA[index][len(min(DATA.values(), key=len)) :]]
    return [d for d in order if rng.random() >= loss]


# --- The link simulator ----------------------------------------------------------------------


@dataclass(frozen=True)
class RandomLoss:
    """Each datagram lost independently with probability `p`."""

    p: float = 0.0

    @property
    def mean(self) -> float:
        return self.p

    def dropper(self, rng: random.Random) -> Callable[[], bool]:
        return lambda: rng.random() < self.p


@dataclass(frozen=True)
class GilbertElliott:
    """Bursty loss: a good and a bad state, switched before each datagram with probabilities
    `enter` (good to bad) and `leave` (bad to good); the loss rate is `bad` or `good` by state.
    Mean burst length is 1/leave datagrams."""

    enter: float
    leave: float
    bad: float = 1.0
    good: float = 0.0

    @property
    def mean(self) -> float:
        share_bad = self.enter / (self.enter + self.leave)
        return share_bad * self.bad + (1 - share_bad) * self.good

    def dropper(self, rng: random.Random) -> Callable[[], bool]:
        state = {"bad": False}

        def drop() -> bool:
            switch = self.leave if state["bad"] else self.enter
            if rng.random() < switch:
                state["bad"] = not state["bad"]
            return rng.random() < (self.bad if state["bad"] else self.good)

        return drop


Loss = RandomLoss | GilbertElliott


@dataclass(frozen=True)
class SenderSpec:
    """One ``serve`` process: ``--sender index/count``, started `start` virtual seconds in."""

    index: int = 0
    count: int = 1
    start: float = 0.0
    rate: float = 12_500_000.0  # bytes/s; must be > 0: an unpaced core never lets time pass
    passes: int | None = None
    duration: float | None = None
    stream_key: SigningKey | None = None  # sends AUTH pages when the manifest lists this key
    # Round 0 of its phase, virtual seconds; None: as `serve` sets it on a first start (the
    # epoch with count > 1, else `start`).  A restarted lone sender names its first start.
    origin: float | None = None


@dataclass(frozen=True)
class ReceiverSpec:
    join: float = 0.0  # virtual seconds
    loss: Loss = RandomLoss()
    reorder: float = 0.0  # each datagram delayed by uniform(0, reorder) seconds
    seed: int = 0
    resume: frozenset[int] = frozenset()  # chunks already in staging
    decoder_budget: int = MAX_DECODER_BYTES
    join_timeout: float | None = None
    stall_timeout: float | None = None
    fallback: str = "never"  # never: note and keep listening | instant: mark missing chunks done
    packet_auth: str = "auto"
    # "store": the receiver keeps its symbols in the durable store, as `otacast fetch` does (no
    # decoder budget), in `state_dir` or, without one, a temporary directory of its own;
    # "memory": in-memory decoders under `decoder_budget`.
    symbols: str = "store"
    state_dir: Path | None = None
    # Also collect the block index (`ReceiverCore(want_index=True)`); the receiver is then done
    # once it has both the image and the index.
    want_index: bool = False


@dataclass
class ReceiverReport:
    source_symbols: int  # K: the image's source symbols
    mean_loss: float
    heard: int = 0  # data datagrams on the link while it listened, before loss
    received: int = 0  # data datagrams delivered to the core
    other_received: int = 0  # MANIFEST and AUTH datagrams delivered
    manifest_at: float | None = None
    complete_at: float | None = None
    chunks_over_time: list[tuple[float, int]] = field(default_factory=list)
    sender_passes: tuple[float, ...] = ()  # each sender's passes sent when the image completed
    decoder_high_water: int = 0
    spill_high_water: int = 0  # bytes of repair symbols the store held at once (with a store)
    decoded_bytes: int = 0  # bytes the store's decodes wrote in place (source symbols it lacked)
    fallback: list[tuple[float, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    late: int = 0
    duplicates: int = 0
    auth: dict[str, int] | None = None  # the packet authenticator's counters, when it ran
    image_at: float | None = None  # when ImageComplete came (complete_at: image and index)
    index_at: float | None = None
    indexes: list[BlockIndex] = field(default_factory=list)  # every IndexReady's
    index_ignored: int = 0

    @property
    def ideal(self) -> float:
        """Data datagrams a perfect code over this loss needs on the link: K/(1-p)."""
        if self.mean_loss >= 1:
            return math.inf
        return self.source_symbols / (1 - self.mean_loss)

    @property
    def heard_per_ideal(self) -> float:
        return self.heard / self.ideal

    @property
    def received_per_k(self) -> float:
        return self.received / self.source_symbols

    @property
    def passes(self) -> int:
        """The pass the furthest sender was in when the image completed (1 = the first)."""
        return max(math.ceil(p) for p in self.sender_passes) if self.sender_passes else 0

    def line(self) -> str:
        done = "never" if self.complete_at is None else f"{self.complete_at:.3f} s"
        return (
            f"heard {self.heard} / ideal {self.ideal:.0f} = {self.heard_per_ideal:.3f}; "
            f"received {self.received} / K {self.source_symbols} = {self.received_per_k:.3f}; "
            f"passes {self.passes} ({', '.join(f'{p:.2f}' for p in self.sender_passes)}); "
            f"complete at {done}; decoders <= {self.decoder_high_water}; "
            f"rejected {dict(sorted(self.rejected.items()))}; chunks done at {self.chunk_times()}"
        )

    def chunk_times(self, most: int = 12) -> str:
        """When chunks completed (virtual seconds), at most `most` of them, evenly picked."""
        times = [t for t, _ in self.chunks_over_time]
        if len(times) > most:
            times = [times[round(i * (len(times) - 1) / (most - 1))] for i in range(most)]
        return "[" + ", ".join(f"{t:.2f}" for t in times) + "] s"


@dataclass
class LinkReport:
    receivers: list[ReceiverReport]
    sender_passes: list[int]  # passes each sender completed by the end
    end: float  # virtual seconds

    def summary(self) -> str:
        return "\n".join(f"receiver {i}: {r.line()}" for i, r in enumerate(self.receivers))


def sender_core(
    release: Release,
    layout: symbol_cache.CycleLayout,
    spec: SenderSpec,
    *,
    fragments: Sequence[bytes],
    epoch: float = NOW,
) -> SenderCore:
    """The one place the tests' links construct a `SenderCore`, through ``serve``'s own setup."""
    return channels.sender_core(
        release.manifest,
        layout,
        rate=spec.rate,
        fragments=fragments,
        now=spec.start,
        wall=epoch + spec.start,
        origin=_origin(spec, epoch),
        sender_index=spec.index,
        sender_count=spec.count,
        passes=spec.passes,
        duration=spec.duration,
        packet_auth=spec.stream_key is not None,
    )


def _origin(spec: SenderSpec, epoch: float) -> float:
    """The wall-clock time of round 0 of `spec`'s phase (`otacast.signer.channels`)."""
    if spec.origin is not None:
        return epoch + spec.origin
    return channels.phase_origin(spec.count, lambda: epoch + spec.start)


class _DecoderCount:
    """A decoder factory that counts the decoders alive at once (see the module doc)."""

    def __init__(self) -> None:
        self.alive = 0
        self.high_water = 0

    def __call__(self, chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
        return self.opened(_Counted(raptorq_decoder(chunk, length, symbol_size)))

    def opened(self, decoder: ChunkDecoder) -> ChunkDecoder:
        """Count `decoder` alive until the core drops it."""
        self.alive += 1
        self.high_water = max(self.high_water, self.alive)
        weakref.finalize(decoder, self._released)
        return decoder

    def _released(self) -> None:
        self.alive -= 1


class _Counted:
    def __init__(self, inner: ChunkDecoder) -> None:
        self.inner = inner

    def feed(self, packet: bytes) -> bytes | None:
        return self.inner.feed(packet)

    def discard(self) -> None:
        self.inner.discard()


class _Sender:
    def __init__(self, link: Link, index: int, spec: SenderSpec) -> None:
        self.spec = spec
        self.source = f"fd51::{index + 1}"
        self.core = sender_core(
            link.release, link.layout, spec, fragments=link.fragments, epoch=link.epoch
        )
        self.auth: AuthPages | None = None
        if spec.stream_key is not None:
            listed = [k.sender for k in link.release.manifest.stream_keys]
            publics = [k.public for k in link.release.manifest.stream_keys]
            sender_id = listed[publics.index(spec.stream_key.public)]
            self.auth = auth_pages(link.release.manifest, link.cycles, spec.stream_key, sender_id)

    @property
    def passes_sent(self) -> float:
        return self.core.passes_sent


class _Receiver:
    def __init__(self, link: Link, spec: ReceiverSpec) -> None:
        self.link = link
        self.spec = spec
        rng = random.Random(spec.seed)
        self.rng = rng
        self.drop = spec.loss.dropper(rng)
        m = link.release.manifest
        k = sum(m.source_symbols(c) for c in range(m.chunk_count))
        self.report = ReceiverReport(k, spec.loss.mean)
        self.decoders = _DecoderCount()
        self.core: ReceiverCore | None = None
        self.stored: StoredSymbols | None = None
        self.done = False
        self.state_dir = spec.state_dir
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        if spec.symbols == "store" and self.state_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="otacast-link-")
            self.state_dir = Path(self._temporary.name)

    def join(self, t: float) -> None:
        stored = self.state_dir is not None
        self.core = ReceiverCore(
            self.link.release.trust,
            now=self.link.epoch + t,
            join_timeout=self.spec.join_timeout,
            stall_timeout=self.spec.stall_timeout,
            decoder_factory=self.store_decoder if stored else self.decoders,
            decoder_budget=UNBOUNDED_DECODERS if stored else self.spec.decoder_budget,
            packet_auth=self.spec.packet_auth,
            want_index=self.spec.want_index,
        )

    def store_decoder(self, chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
        """The receive driver's decoders: the durable store's."""
        return self.decoders.opened(self.open_store().decoder(chunk, length, symbol_size))

    def open_store(self) -> StoredSymbols:
        """Staging and the store, opened on first use (as the receive driver does)."""
        if self.stored is None:
            assert self.state_dir is not None
            self.stored = StoredSymbols(self.state_dir, self.link.release.verified())
        return self.stored

    @property
    def listening(self) -> bool:
        return self.core is not None and not self.done

    def arrive(self, datagram: bytes, source: str, t: float, data: bool, lost: bool) -> None:
        """A datagram reaches the receiver's link at `t` (lost: and goes no further)."""
        if not self.listening:
            return
        assert self.core is not None
        if data:
            self.report.heard += 1
        if lost:
            return
        if data:
            self.report.received += 1
        else:
            self.report.other_received += 1
        self.core.receive_datagram(datagram, source, self.link.epoch + t, wall=self.link.epoch + t)
        self.handle_events(t)

    def fire_timer(self, upto: float) -> None:
        """Run the core's timer if its deadline is at or before `upto`."""
        if not self.listening:
            return
        assert self.core is not None
        deadline = self.core.get_timer()
        if deadline is not None and deadline - self.link.epoch <= upto:
            self.core.handle_timer(deadline)
            self.handle_events(deadline - self.link.epoch)

    def handle_events(self, t: float) -> None:
        """What the receive driver does with each event (see the module doc)."""
        core = self.core
        assert core is not None
        now = self.link.epoch + t
        while (event := core.next_event()) is not None:
            if isinstance(event, ManifestVerified):
                self.report.manifest_at = t
                if self.state_dir is not None:
                    for index in sorted(self.open_store().store.done):
                        core.mark_done(index, now)
                for index in sorted(self.spec.resume):
                    core.mark_done(index, now)
            elif isinstance(event, ChunkComplete):
                assert self.chunk_bytes(event) == self.link.release.chunk(event.index)
                if self.stored is not None:
                    self.stored.keep(event.index, event.data)
                self.report.chunks_over_time.append((t, len(core.done)))
            elif isinstance(event, ManifestRefused):
                self.report.refused.append(event.message)
            elif isinstance(event, FallbackNeeded):
                self.report.fallback.append((t, event.reason))
                if self.spec.fallback == "instant" and core.verified is not None:
                    for index in range(core.verified.manifest.chunk_count):
                        core.mark_done(index, now)
            elif isinstance(event, IndexReady):
                self.report.indexes.append(event.index)
                self.report.index_at = t
                if self.report.image_at is not None:
                    self.finish(t)
            elif isinstance(event, ImageComplete):
                self.report.image_at = t
                if not self.spec.want_index or self.report.index_at is not None:
                    self.finish(t)

    def chunk_bytes(self, event: ChunkComplete) -> bytes:
        """The chunk `event` completed: its data, or what is in place in the store (a chunk
        hashed as its source symbols were written comes with no data)."""
        if event.data is not None:
            return event.data
        assert self.stored is not None, event.index
        return self.stored.store.read_chunk(event.index)

    def finish(self, t: float) -> None:
        self.done = True
        self.report.complete_at = t
        self.report.sender_passes = tuple(s.passes_sent for s in self.link.senders)

    def close(self) -> None:
        core = self.core
        if core is not None:
            self.report.rejected = dict(core.stats.rejected)
            self.report.late = core.stats.late
            self.report.duplicates = core.stats.duplicates
            self.report.index_ignored = core.stats.index_ignored
            if core.authenticator is not None:
                self.report.auth = dataclasses.asdict(core.authenticator.stats)
        self.report.decoder_high_water = self.decoders.high_water
        if self.stored is not None:
            self.report.spill_high_water = self.stored.store.stats.spill_high_water
            self.report.decoded_bytes = self.stored.store.stats.decoded_bytes
            self.stored.close()
            self.stored.staging.close()
            self.stored = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


# Heap entries: (time, sequence, kind, index, datagram, source, is data, is lost); the sequence
# keeps events of equal time in the order they were made (joins first, then a sender's datagrams
# before its next turn).
_SEND, _JOIN, _ARRIVE = 0, 1, 2
_Entry = tuple[float, int, int, int, bytes, str, bool, bool]


class Link:
    """Sender cores and receiver cores on one virtual LAN (see the module doc)."""

    def __init__(
        self,
        release: Release,
        senders: Sequence[SenderSpec] = (SenderSpec(),),
        receivers: Sequence[ReceiverSpec] = (ReceiverSpec(),),
        *,
        repair: float = 0.5,
        epoch: float = NOW,
    ) -> None:
        if any(s.rate <= 0 for s in senders):
            raise ValueError("the link needs paced senders: an unpaced core never lets time pass")
        self.release = release
        self.epoch = epoch
        m = release.manifest
        self.layout = symbol_cache.CycleLayout.for_manifest(m, repair)
        self.cycles = cycles_for_fraction(release, repair)
        self.fragments = tuple(manifest_datagrams(release.envelope))
        self.senders = [_Sender(self, i, s) for i, s in enumerate(senders)]
        self.receivers = [_Receiver(self, r) for r in receivers]
        self._heap: list[_Entry] = []
        self._sequence = 0

    def _push(
        self,
        t: float,
        kind: int,
        index: int,
        data: bytes = b"",
        source: str = "",
        is_data: bool = False,
        lost: bool = False,
    ) -> None:
        self._sequence += 1
        entry = (t, self._sequence, kind, index, data, source, is_data, lost)
        heapq.heappush(self._heap, entry)

    def run(self, until: float = 600.0) -> LinkReport:
        """Run until every receiver has its image, nothing is left to send, or `until`."""
        for i, receiver in enumerate(self.receivers):
            self._push(
                receiver.spec.join, _JOIN, i
            )  # a receiver joining at t hears what is sent at t
        for i, sender in enumerate(self.senders):
            self._push(sender.spec.start, _SEND, i)
        end = 0.0
        while self._heap and not all(r.done for r in self.receivers):
            t, _, kind, index, data, source, is_data, lost = heapq.heappop(self._heap)
            if t > until:
                break
            for receiver in self.receivers:
                receiver.fire_timer(t)
            end = t
            if kind == _SEND:
                self._send(t, index)
            elif kind == _JOIN:
                self.receivers[index].join(t)
            else:
                self.receivers[index].arrive(data, source, t, is_data, lost)
        for receiver in self.receivers:
            receiver.fire_timer(until)
            receiver.close()
        return LinkReport(
            [r.report for r in self.receivers], [s.core.stats.passes for s in self.senders], end
        )

    def _send(self, t: float, index: int) -> None:
        sender = self.senders[index]
        action = sender.core.next_action(t)
        if isinstance(action, Finished):
            return
        if isinstance(action, Wait):
            if action.until <= t:
                raise AssertionError(f"the sender core waits for a time already past: {action}")
            self._push(action.until, _SEND, index)
            return
        if isinstance(action, SendManifest):
            self._broadcast(t, sender.source, action.datagrams, data=False)
        elif isinstance(action, SendAuth):
            assert sender.auth is not None, "AUTH pages from a sender without a stream key"
            self._broadcast(
                t, sender.source, sender.auth.for_action(action, self.epoch + t), data=False
            )
        elif isinstance(action, SendSymbols):
            cycle = self.cycles[action.chunk]
            run = cycle[action.first : action.first + action.count]
            self._broadcast(t, sender.source, run, data=True)
        self._push(t, _SEND, index)

    def _broadcast(self, t: float, source: str, datagrams: Sequence[bytes], *, data: bool) -> None:
        for i, receiver in enumerate(self.receivers):
            reorder = receiver.spec.reorder
            if receiver.done or receiver.spec.join > t + reorder:
                continue  # nothing sent now can reach it while it listens
            for datagram in datagrams:
                # Lost datagrams travel too, so that "heard" counts what reached the receiver's
                # link while it listened, whatever the loss and the reordering.
                lost = receiver.drop()
                delay = receiver.rng.uniform(0, reorder) if reorder else 0.0
                self._push(t + delay, _ARRIVE, i, datagram, source, data, lost)


MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(text: str) -> MetricSamples:
    """Every sample of a Prometheus exposition, parsed by prometheus_client's own parser, keyed
    by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


RFC3339_MILLIS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def untimed(line: dict[str, Any]) -> dict[str, Any]:
    """`line` without its ``time``, which must be there, as RFC 3339 UTC with milliseconds."""
    rest = dict(line)
    stamp = rest.pop("time")
    assert isinstance(stamp, str) and RFC3339_MILLIS_UTC.fullmatch(stamp), stamp
    return rest
