"""Receiving the release's block index object over multicast, in memory (sans-IO).

`ObjectAssembly` is the general part: any RaptorQ object of a signed length and SHA-256 (the
block index here and on the index group; the delta lane's index patches in
`otacast.plugin.lane`, and its object where no file is given), decoded in memory and given out
only once its bytes hash right.  `otacast.plugin.object_file` does the same on disk for the lane
object.

The block index (`otacast.schemas.blockindex`, delta delivery) travels as one more RaptorQ
object of the session (TOI ``wire.INDEX_TOI``), cut into source blocks as an image part of its
length is (`Manifest.index_part`).  An `IndexAssembly` takes its symbols, one decoder per block,
each ESI once; once every block has decoded, it checks the whole object against the signed
manifest (`blockindex.parse` with the image length and the index's SHA-256) and hands back the
parsed `BlockIndex`.  Nothing of it is usable before that check.

Memory: the blocks' decoders and the decoded blocks together hold about the index's signed
length (~0.39% of the image: 4 MB for a 1 GiB image), which the manifest's own checks bound by
``MAX_INDEX_BYTES`` and which is checked again here before any decoder is made.

Hostile input is returned as a rejection reason, never raised: a block number the object does
not have (``index-block``), a codec failure (``decoder-fault``), and an object that decodes but
fails its signed hash (``index-mismatch``: a forged symbol polluted some block, and which one
cannot be known), after which every block is collected afresh.  No AUTH page vouches for index
symbols (`otacast.signer.schedule`): a forger can delay the index, never make a wrong one used.
"""

from __future__ import annotations

import hashlib

from otacast.schemas import blockindex
from otacast.schemas.errors import MalformedIndex
from otacast.schemas.fec import Part
from otacast.schemas.limits import MAX_INDEX_BYTES
from otacast.schemas.manifest import Manifest

from .decoder import ChunkDecoder, DecoderFactory, DecoderFault, raptorq_decoder

# ESIs below this many times K are remembered as bits, the rest in a set (as the core's chunks).
_SEEN_BITS_PER_K = 2


class SeenEsis:
    """Which ESIs of one block were fed: those below ``_SEEN_BITS_PER_K * k`` as bits, the
    rest in a set (the caller bounds how many it adds)."""

    __slots__ = ("bits_below", "other", "seen")

    def __init__(self, k: int) -> None:
        self.bits_below = _SEEN_BITS_PER_K * k
        self.seen = bytearray((self.bits_below + 7) // 8)
        self.other: set[int] = set()

    def first_time(self, esi: int) -> bool:
        """Whether `esi` is new to this block (and remember it)."""
        if esi < self.bits_below:
            bit = 1 << (esi & 7)
            if self.seen[esi >> 3] & bit:
                return False
            self.seen[esi >> 3] |= bit
            return True
        if esi in self.other:
            return False
        self.other.add(esi)
        return True


class _Block(SeenEsis):
    __slots__ = ("decoder",)

    def __init__(self, decoder: ChunkDecoder, k: int) -> None:
        super().__init__(k)
        self.decoder = decoder


class ObjectAssembly:
    """One RaptorQ object of `length` bytes cut as `part` is, put together from symbols in
    memory and given out only when its bytes hash to the signed `sha256` (module doc).

    Used for the block index (`IndexAssembly`) and the delta lane's objects
    (`otacast.plugin.lane`); `name` prefixes the rejection reasons (``NAME-block``,
    ``NAME-mismatch``).  The caller bounds `part.length` before making one."""

    def __init__(
        self,
        part: Part,
        sha256: bytes,
        symbol_size: int,
        decoder_factory: DecoderFactory = raptorq_decoder,
        *,
        name: str = "index",
    ) -> None:
        self.sha256 = sha256
        self.symbol_size = symbol_size
        self.length = part.length
        self.spans = [part.block_span(b, symbol_size) for b in range(part.blocks)]
        self.decoder_factory = decoder_factory
        self.block_reason = name + "-block"
        self.mismatch_reason = name + "-mismatch"
        self.symbols = 0  # new symbols fed to a decoder
        self.duplicates = 0
        self._blocks: dict[int, _Block] = {}
        self._decoded: dict[int, bytes] = {}

    def feed(self, block: int, esi: int, packet: bytes | memoryview) -> bytes | str | None:
        """One codec packet (payload id + symbol of the signed size) of `block`: the verified
        object once complete, a rejection reason, or None."""
        if not 0 <= block < len(self.spans):
            return self.block_reason
        if block in self._decoded:
            self.duplicates += 1  # a block already decoded: nothing to learn from it
            return None
        state = self._blocks.get(block)
        if state is None:
            length = self.spans[block][1]
            state = self._blocks[block] = _Block(
                self.decoder_factory(block, length, self.symbol_size),
                -(-length // self.symbol_size),
            )
        if not state.first_time(esi):
            self.duplicates += 1
            return None
        self.symbols += 1
        try:
            result = state.decoder.feed(packet)
        except DecoderFault:
            del self._blocks[block]
            return "decoder-fault"
        if not isinstance(result, bytes):  # None; no index decode is ever submitted elsewhere
            return None
        del self._blocks[block]
        self._decoded[block] = result
        if len(self._decoded) < len(self.spans):
            return None
        data = b"".join(self._decoded[b] for b in range(len(self.spans)))
        self._decoded.clear()
        if hashlib.sha256(data).digest() != self.sha256:
            return self.mismatch_reason  # every block is collected afresh
        return data

    def close(self) -> None:
        """Nothing is held outside memory (as `object_file.FileAssembly.close`)."""


class IndexAssembly:
    """The index object of `manifest` (which must list an index), put together from symbols."""

    def __init__(self, manifest: Manifest, decoder_factory: DecoderFactory = raptorq_decoder):
        part = manifest.index_part()
        if manifest.index is None or part is None:
            raise ValueError("the manifest lists no block index")
        if manifest.index.length > MAX_INDEX_BYTES:  # before any decoder is made
            raise ValueError("the block index is larger than MAX_INDEX_BYTES")
        self.length = manifest.image.length
        self.object = ObjectAssembly(
            part, manifest.index.sha256, manifest.fec.symbol_size, decoder_factory
        )

    @property
    def symbols(self) -> int:
        return self.object.symbols

    @property
    def duplicates(self) -> int:
        return self.object.duplicates

    def feed(
        self, block: int, esi: int, packet: bytes | memoryview
    ) -> blockindex.BlockIndex | str | None:
        """One codec packet of `block`: the verified index once complete, a rejection reason,
        or None."""
        result = self.object.feed(block, esi, packet)
        if not isinstance(result, bytes):
            return result
        try:
            return blockindex.parse(result, length=self.length)
        except MalformedIndex:
            return "index-mismatch"  # signed, yet not an index of this image: collected afresh
