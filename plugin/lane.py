"""The device on the delta lane (delta delivery, issue 15): the decision and a sans-IO lane core.

A release signed with ``--delta-from`` lists in its manifest (``delta``) the releases its delta
lane serves; `serve` sends the lane as a FLUTE session of its own on the lane's groups
(`addressing.LANE_RATE_INDEX`, TSI `wire.lane_tsi`, docs/FORMATS.md "Delta lane session"):
the lane object (the 4 KiB blocks of the new image that some listed release lacks) and one
index patch per listed release.  The new release's full block index is on the index group
(`addressing.INDEX_RATE_INDEX`, TSI `wire.index_tsi`), which a device joins only while it needs
the index whole.

*The decision* (`lane_choice`, pure).  A device takes the lane instead of the carousel when
the verified manifest has a lane, its installed release (``installed.json``) is among the
releases the lane lists, the image is ``raw`` (a container's payload matches nothing local),
at least one local source can be read (`otacast.plugin.reuse`: the lane carries only what the
installed release lacks, the rest comes from the device's own blocks) and the lane object fits
``MAX_LANE_OBJECT_BYTES``.  It wants the lane object and, for the new index, the index patch
of its release when it holds that release's index (``installed.blockindex`` whose SHA-256 is the
one the manifest lists for it), else the full index from the index group.  Anything else is a
reason, said once, and the device takes the carousel as before.

*The lane core* (`LaneCore`, sans-IO).  The driver gives it the DATA datagrams read on the lane
socket, and the full index (`take_index`) when it `needs_index`.  Each wanted object is
assembled (the patch in memory, `index_object.ObjectAssembly`; the lane object where the
driver's `assemble` says: on disk in the state directory, `object_file.FileAssembly`, in the
receive driver) and used only once its bytes hash to the signed SHA-256; a patch is applied to
the installed index (`delta.patched_index`) and the result used only if it hashes to the
manifest's index.  What it has is read from `index` (the new block index) and `lane_object`
(the verified lane object: its bytes, or the file that holds them); the receive driver hands
both to the local pass (`reuse.ReuseWorker`), which decodes the lane's blocks against the
index, reading a stored object in bounded steps, and places them beside the local ones.
Hostile datagrams
(another TSI, a wrong symbol length, a block an object does not have, a forged symbol that
spoils an object's hash) are counted rejections by reason and never raise; a patch that does
not produce the signed index is a rejection (``patch-mismatch``) after which the core
`needs_index` whole.

*The index group* (`IndexGroupCore`, sans-IO) collects that full index from the datagrams read
on the index group's socket (`index_object.IndexAssembly`), with the same rejections; the
driver joins the group for a lane device that `needs_index` and for a device that reuses local
blocks beside the carousel (whose in-band index comes late in a pass), and leaves it once the
index is verified.

Memory: the index or patch being collected (at most ``MAX_INDEX_BYTES``, with its decoder);
the lane object, on disk, costs its seen-ESI bits and one block's decode at a time, whatever
its length (at most ``MAX_LANE_OBJECT_BYTES``: in memory it was ~3 times its length at the
peak, 148 MB for the 44 MB object of docs/PERFORMANCE.md's large update); plus early datagrams
held before the manifest at most ``MAX_LANE_EARLY_BYTES`` (`EarlyLane`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from otacast.schemas import fdt, wire
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.errors import MalformedDelta, MalformedIndex
from otacast.schemas.fec import Part
from otacast.schemas.limits import MAX_LANE_EARLY_BYTES, MAX_LANE_OBJECT_BYTES, PART_CHUNKS
from otacast.schemas.manifest import DeltaFrom, Manifest

from .decoder import DecoderFactory, raptorq_decoder
from .delta import StoredObject, lane_header_of, patched_index
from .index_object import IndexAssembly, ObjectAssembly

# Charged per held early datagram beyond its bytes (the bytes object and the deque slot).
EARLY_ENTRY_OVERHEAD: Final = 100


class LaneAssembly(Protocol):
    """Where the lane object is put together: `index_object.ObjectAssembly` (in memory, the
    default) or `object_file.FileAssembly` (on disk, what the receive driver gives)."""

    symbols: int

    def feed(
        self, block: int, esi: int, packet: bytes | memoryview
    ) -> bytes | StoredObject | str | None: ...

    def close(self) -> None: ...


# (the lane object's part, its signed SHA-256, symbol size) -> a fresh assembly
LaneAssemblyFactory = Callable[[Part, bytes, int], LaneAssembly]


def in_memory(part: Part, sha256: bytes, symbol_size: int) -> LaneAssembly:
    """The lane object assembled in memory (`index_object.ObjectAssembly`)."""
    return ObjectAssembly(part, sha256, symbol_size, name="lane")


@dataclass(frozen=True)
class LaneChoice:
    """The device takes the lane: it is on `source` (the `position`-th release the lane lists)
    and holds that release's index as `old_index` (None: it takes the full index)."""

    source: DeltaFrom
    position: int
    old_index: BlockIndex | None


def lane_choice(
    manifest: Manifest,
    installed_sequence: int | None,
    installed_index: tuple[BlockIndex, bytes] | None,
    readable_sources: int,
) -> LaneChoice | str:
    """Whether this device takes the delta lane of `manifest` (module doc, *The decision*): a
    `LaneChoice`, or why not (a line for the operator).  `installed_index` is the installed
    index and the SHA-256 of its bytes; `readable_sources` how many reuse sources open."""
    delta = manifest.delta
    if delta is None or manifest.index is None:
        return "the release has no delta lane"
    if manifest.image.format != "raw":
        return f"the delta lane is for raw images, not {manifest.image.format!r}"
    if installed_sequence is None:
        return "no installed release is recorded"
    listed = [i for i, f in enumerate(delta.sources) if f.sequence == installed_sequence]
    if not listed:
        served = ", ".join(str(f.sequence) for f in delta.sources)
        return f"the installed release {installed_sequence} is not among its ({served})"
    if readable_sources < 1:
        return "no readable local source holds the installed release"
    if delta.length > MAX_LANE_OBJECT_BYTES:
        return f"its object of {delta.length} bytes exceeds {MAX_LANE_OBJECT_BYTES}"
    position = listed[0]
    source = delta.sources[position]
    old = None
    if installed_index is not None and installed_index[1] == source.index_sha256:
        old = installed_index[0]
    return LaneChoice(source, position, old)


def lane_note(choice: LaneChoice | str) -> str:
    """What the operator is told about the decision."""
    if isinstance(choice, str):
        return f"delta lane not used: {choice}"
    how = "its index patch" if choice.old_index is not None else "the full block index"
    return (
        f"delta lane: this device is on release {choice.source.sequence}, joining the lane "
        f"for the missing blocks and {how}"
    )


class EarlyLane:
    """Lane DATA datagrams read before the manifest is verified (the lane's TSI is not known
    yet), the most recent ones up to ``MAX_LANE_EARLY_BYTES``."""

    def __init__(self) -> None:
        self._held: deque[bytes] = deque()
        self._bytes = 0
        self.dropped = 0

    def hold(self, data: bytes | memoryview) -> None:
        self._held.append(bytes(data))
        self._bytes += len(data) + EARLY_ENTRY_OVERHEAD
        while self._bytes > MAX_LANE_EARLY_BYTES:
            self._bytes -= len(self._held.popleft()) + EARLY_ENTRY_OVERHEAD
            self.dropped += 1

    def take(self) -> Iterator[bytes]:
        """The held datagrams, oldest first (and forget them)."""
        held, self._held, self._bytes = self._held, deque(), 0
        return iter(held)

    def __len__(self) -> int:
        return len(self._held)


class _SideCore:
    """What the lane core and the index group's core share: the datagrams of a side session
    (`tsi`) checked and counted, and symbols fed to an assembly."""

    def __init__(self, tsi: int, symbol_size: int) -> None:
        self.tsi = tsi
        self.symbol_size = symbol_size
        self._datagram_size = wire.data_datagram_size(symbol_size)
        self.datagrams = 0  # DATA datagrams given (of any TSI)
        self.bytes = 0  # their symbol bytes
        self.symbols = 0  # new symbols fed to an assembly
        self.rejected: Counter[str] = Counter()

    def _symbol(self, data: bytes | memoryview) -> tuple[int, int, int, memoryview] | None:
        """(TOI, SBN, ESI, codec packet) of a DATA datagram of this session of the signed
        symbol size, else None and the rejection counted."""
        self.datagrams += 1
        fields = wire.peek_data(data)
        if fields is None or fields[0] != self.tsi:
            self.rejected["other-session"] += 1
            return None
        if len(data) != self._datagram_size:
            self.rejected["symbol-length"] += 1
            return None
        self.bytes += self.symbol_size
        _, chunk, esi = fields
        packet = memoryview(data)[wire.CODEC_PACKET_OFFSET :]
        return chunk // PART_CHUNKS + 1, chunk % PART_CHUNKS, esi, packet

    def _feed(
        self,
        assembly: LaneAssembly | ObjectAssembly | IndexAssembly,
        block: int,
        esi: int,
        packet: memoryview,
    ) -> bytes | StoredObject | BlockIndex | None:
        """Feed one symbol: the verified object once complete, else None (a rejection
        counted)."""
        before = assembly.symbols
        result = assembly.feed(block, esi, packet)
        self.symbols += assembly.symbols - before
        if isinstance(result, str):
            self.rejected[result] += 1
            return None
        return result


class LaneCore(_SideCore):
    """Collects the lane objects a `LaneChoice` wants (module doc, *The lane core*)."""

    def __init__(
        self,
        manifest: Manifest,
        choice: LaneChoice,
        decoder_factory: DecoderFactory = raptorq_decoder,
        assemble: LaneAssemblyFactory = in_memory,
    ) -> None:
        """`assemble` makes where the lane object is put together (the index and patch are
        always in memory: `lane_choice` bounds them by ``MAX_INDEX_BYTES``)."""
        delta, index = manifest.delta, manifest.index
        if delta is None or index is None:
            raise ValueError("the manifest has no delta lane")
        if delta.length > MAX_LANE_OBJECT_BYTES:  # before any decoder is made
            raise ValueError("the delta lane object is larger than MAX_LANE_OBJECT_BYTES")
        super().__init__(fdt.LANE.tsi(manifest), manifest.fec.symbol_size)
        self.manifest = manifest
        self.choice = choice
        parts = {toi: part for toi, _, part in fdt.lane_objects(manifest)}
        self._parts = parts
        self._object: LaneAssembly | None = assemble(
            parts[wire.LANE_OBJECT_TOI], delta.sha256, self.symbol_size
        )
        self._patch_toi = wire.LANE_PATCH_TOI + choice.position
        self._patch: ObjectAssembly | None = None
        if choice.old_index is not None:
            self._patch = ObjectAssembly(
                parts[self._patch_toi],
                choice.source.patch_sha256,
                self.symbol_size,
                decoder_factory,
                name="patch",
            )
        self.index: BlockIndex | None = None
        self.index_from_patch = False
        self.lane_object: bytes | StoredObject | None = None
        self.failed: str | None = None  # the lane object itself is unusable (signed, yet bad)
        self.ignored = 0  # symbols of lane objects this device does not want

    @property
    def needs_index(self) -> bool:
        """The new index must come whole (the index group): no patch to make it, or the patch
        failed."""
        return self.index is None and self._patch is None

    def take_index(self, index: BlockIndex) -> None:
        """The full index, verified elsewhere (`IndexGroupCore`, the carousel's)."""
        if self.index is None:
            self._patch = None
            self.index = index

    @property
    def done(self) -> bool:
        """Everything wanted is here (or the lane object cannot be used): leave the lane."""
        return self.index is not None and (self.lane_object is not None or self.failed is not None)

    def receive(self, data: bytes | memoryview) -> bool:
        """One datagram read on the lane socket that `wire.peek_data` reads as DATA; whether it
        completed an index or the lane object (look at `index`, `lane_object`)."""
        symbol = self._symbol(data)
        if symbol is None:
            return False
        toi, block, esi, packet = symbol
        if toi == wire.LANE_OBJECT_TOI:
            return self._on_object(block, esi, packet)
        if toi == self._patch_toi and self._patch is not None and self.index is None:
            return self._on_patch(block, esi, packet)
        if toi in self._parts:
            self.ignored += 1
        else:
            self.rejected["bad-toi"] += 1
        return False

    def close(self) -> None:
        """Let go of an unfinished lane object's assembly (its files, when on disk)."""
        if self._object is not None:
            self._object.close()
            self._object = None

    def _on_object(self, block: int, esi: int, packet: memoryview) -> bool:
        if self._object is None:
            self.ignored += 1  # the object is out: the rest of the carousel's round
            return False
        result = self._feed(self._object, block, esi, packet)
        if result is None or isinstance(result, BlockIndex):
            return False
        self._object = None
        try:
            lane_header_of(result, length=self.manifest.image.length)
        except MalformedDelta as exc:  # signed, yet unusable: the publisher's mistake
            self.failed = str(exc)
            self.rejected["lane-malformed"] += 1
            return True
        except OSError as exc:  # its file cannot be read back
            self.failed = f"cannot read it back: {exc.strerror or exc}"
            self.rejected["lane-file"] += 1
            return True
        self.lane_object = result
        return True

    def _on_patch(self, block: int, esi: int, packet: memoryview) -> bool:
        assert self._patch is not None and self.choice.old_index is not None
        result = self._feed(self._patch, block, esi, packet)
        if not isinstance(result, bytes):
            return False
        self._patch = None
        info = self.manifest.index
        assert info is not None
        old = self.choice.old_index
        # Not needed any more: not held through the rest of the run (its 16 bytes per block).
        self.choice = dataclasses.replace(self.choice, old_index=None)
        try:
            self.index = patched_index(
                old, result, length=self.manifest.image.length, sha256=info.sha256
            )
        except (MalformedDelta, MalformedIndex, ValueError):
            self.rejected["patch-mismatch"] += 1  # `needs_index` now: the driver joins its group
            return True
        self.index_from_patch = True
        return True


class IndexGroupCore(_SideCore):
    """Collects the full block index from the index group's datagrams (module doc, *The index
    group*); `index` once verified."""

    def __init__(self, manifest: Manifest, decoder_factory: DecoderFactory = raptorq_decoder):
        super().__init__(fdt.INDEX_GROUP.tsi(manifest), manifest.fec.symbol_size)
        self.manifest = manifest
        # Raises ValueError without an index, or one over MAX_INDEX_BYTES (before any decoder).
        self._assembly: IndexAssembly | None = IndexAssembly(manifest, decoder_factory)
        self.index: BlockIndex | None = None
        self.ignored = 0  # symbols after the index was verified

    def receive(self, data: bytes | memoryview) -> bool:
        """One datagram read on the index group's socket that `wire.peek_data` reads as DATA;
        whether it completed the index."""
        symbol = self._symbol(data)
        if symbol is None:
            return False
        toi, block, esi, packet = symbol
        if toi != wire.INDEX_GROUP_TOI:
            self.rejected["bad-toi"] += 1
            return False
        if self._assembly is None:
            self.ignored += 1
            return False
        result = self._feed(self._assembly, block, esi, packet)
        if not isinstance(result, BlockIndex):
            return False
        self._assembly = None
        self.index = result
        return True
