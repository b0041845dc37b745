"""Sans-IO receiver core: datagrams and ``now`` in, events out.

Theory of operation
-------------------
*Nothing before trust.*  Until a manifest has passed verification (`policy.authenticate`, the
signature threshold, then `policy.accept`: content, expiry, sequence, channel, device type: the
two halves of the `verify_envelope` that every ``verify`` command runs), the only state kept is
bounded manifest reassembly and the
most recent well-formed DATA datagrams (up to ``MAX_EARLY_BYTES``), held unread and replayed
through the normal admission checks once a manifest is verified, so a receiver joining
mid-stream does not throw away what arrives before the manifest carousel comes round.  A
reassembled envelope must hash to the envelope id its fragments carried (31 bits of it: the
manifest object's TOI), and its signed bytes to the session's TSI, before it is verified.

*Reassembly under attack.*  Fragments are reassembled per (source address, TSI, manifest TOI,
claimed length, fragment size): a forged fragment that claims another length starts a reassembly of
its own instead of spoiling the honest one, and garbage fragments from another host cannot mix into
the real sender's.  Each source keeps at most ``MAX_PENDING_MANIFESTS_PER_SOURCE`` reassemblies, all
sources ``MAX_PENDING_MANIFESTS``, holding ``MAX_PENDING_MANIFEST_BYTES`` together (each also
capped at its claimed length, itself at most ``MAX_MANIFEST_BYTES``, with at most one entry per 256
bytes); the one that gained a fragment least recently is dropped first.  An attacker who spoofs the
sender's source address can still delay the manifest; see docs/SECURITY.md.

*Verifications under attack.*  A reassembled envelope is verified only if the source's budget
allows (`otacast.plugin.budget`: each source its own allowance, sources that have sent no
genuinely signed manifest also one shared allowance); otherwise it is dropped, counted as
``manifest-budget`` and not remembered, so the sender's next copy may pass.  Its signatures are
checked before anything else about it is validated (but the TSI its signed bytes give), so a
forgery costs a JSON parse and at most one Ed25519 verification per trusted key.

*Choosing a release.*  By default the first manifest that passes is adopted at once.  With a
``manifest_grace`` (``watch`` uses one second: `otacast.plugin.watch`), the first one only
starts the grace period: manifests of other sessions are still verified until it ends, the one
with the highest sequence is kept (the first heard among equals), the others are remembered
as refused (``manifest-lower``), and the kept one is adopted when the period ends (the timer, or
the first datagram after it).  DATA meanwhile waits in the early buffer as before.  Two senders
serving sequences 5 and 7 on one channel therefore give 7, whichever is heard first.  Switching
an adopted session instead would need the driver to close staging and the symbol store opened
for it; waiting a second before the first chunk costs less.

*One session.*  Once verified, the manifest fixes the session id, the symbol size and the chunk
table.  A DATA datagram is admitted only if it carries that session's TSI, names an existing chunk
that is not yet complete and a symbol of exactly the signed size; everything else is
a counted rejection (``stats.rejected[reason]``).  Nothing here raises on hostile input.  The
core reads no header itself: `wire.peek_data` gives a DATA datagram's fields without building a
packet (the per-datagram path), `wire.parse_datagram` parses everything else.

*Decoding.*  One decoder per chunk in progress, created on the chunk's first symbol and fed each
ESI once (a read's run of new consecutive ESIs of one chunk in one call, if the decoder takes
runs: `receive_datagrams`).  The receive driver's default decoders keep their symbols in the
durable store and are given an unbounded budget; in-memory decoders are bounded by
``MAX_DECODER_BYTES``.  When
that budget is full, symbols of chunks without a decoder are refused (``decoder-budget``) rather
than evicting a partial decoder: a held decoder only ever gains symbols, so every pass completes
at least a budget's worth of chunks and the download converges.  (Evicting instead was measured
to livelock at 20% loss: each window pushed out the previous one's half-filled decoders, pass
after pass.)  A decoded chunk is hashed; a mismatch (e.g. a
forged symbol polluted the decode) drops that chunk's symbols and it is collected afresh.
A decoder may answer that the chunk's decode is submitted (`decoder.SUBMITTED`: the driver's
decode worker runs it): the chunk's further symbols are then refused at once (counted as
``decode-pending``, never fed, never marked seen) until the driver hands over the outcome with
`chunk_decoded`: bytes are hashed and kept exactly as an inline decode's, None (not enough
independent symbols) lets the chunk collect again, and an outcome for a chunk completed or
restarted meanwhile (HTTP repair, local reuse) is ignored.

*Packet authentication.*  When the verified manifest lists stream keys (and the policy is not
``off``), a DATA datagram that passes the checks above is decoded only once an AUTH page has
vouched for it (`otacast.plugin.auth`); AUTH datagrams that arrive before the manifest are held
and replayed with the DATA ones.  With the policy ``require``, a manifest without stream keys is
refused.

*The block index* (delta delivery).  When the core is built with ``want_index`` and the adopted
manifest lists an index, the index object's DATA datagrams (TOI ``wire.INDEX_TOI``, which
`wire.peek_data` reads as a chunk beyond any the release has, so the image's path tests nothing
more) go to an `IndexAssembly` (`otacast.plugin.index_object`): decoded in memory, checked
whole against the signed length and SHA-256, and handed out once as `IndexReady`.  A wrong
object is a counted rejection (``index-mismatch``) and collection starts again; no AUTH page
covers index symbols, so a forger can delay the index, never have a wrong one used.  Without
``want_index`` (or once the index is out) they are counted as ``index_ignored`` and nothing
more.  Before a manifest they are held and replayed like any DATA datagram.

*Fallback.*  With a join timeout, the core asks for fallback if no datagram of a usable session
has arrived in time; with a stall timeout, if no new symbol or chunk has advanced the image for
that long (new symbols stop counting once a decoded chunk has failed its hash, until one
verifies: forged symbols must not look like progress).  It asks once; multicast continues,
and chunks obtained elsewhere are reported back with `mark_done`.

*Two clocks.*  Every ``now`` the core is given (construction, datagrams, timers, `mark_done`)
is the driver's monotonic clock (`time.monotonic()`): join and stall timers, the packet
authenticator's rate budgets and the times in `snapshot` are durations and must not jump when
the system clock is set.  Manifest expiry is a date, so the one check that needs it, verifying
a manifest that a datagram completes, uses the ``wall`` time passed with that datagram
(`time.time()`, read by the driver once per batch of datagrams); nothing keeps a wall time
between calls.  Tests pass plain numbers for both and need no clock.

*Refusals.*  Each refused manifest is one `ManifestRefused` event, and the most relevant one
heard is kept as `refusal`, for a driver whose join timeout ends with nothing adopted to report
instead of "nothing heard": a genuinely signed manifest refused by the update rules (expired,
rollback, another channel or device type: its `sequence` is known) outranks one whose
signatures failed (anyone can send those), and among signed ones the highest sequence wins,
the newest release the channel carries.

*Refusals remembered.*  A refused manifest is not verified again: later copies are dropped by
one lookup (``refused-manifest``), the newest ``MAX_REFUSED_MANIFESTS`` refusals kept.  Only a
manifest whose signatures held, and whose signed bytes give the TSI it came under, is known by
its (TSI, manifest TOI): then the fragments of its copies are dropped before they are even
reassembled.  Anything else is known by the SHA-256 of all its bytes, once reassembled: the
manifest TOI is only 31 bits of that hash, and a forgery ground to the genuine release's TOI
must not get the genuine release refused.  An envelope sent under another TSI than its signed
bytes give (``manifest-session``) is refused before any signature is checked and does not earn
its source the budget of a signed sender; it is known by its hash and that TSI, so the genuine
copy under its own TSI is not refused with it, and each replay under a new TSI costs a parse,
never a verification.

*Sources heard* (zero-config on a LAN).  A driver listening to the channel's ASM group, where
senders announce the release they serve, asks the core (``report_sources``) to tell it which
source addresses to join by SSM: a `SourceHeard` event for each source that sent a MANIFEST
fragment of the adopted release (the source whose fragments made the verified manifest, then
any other whose fragments carry its session id), at most ``MAX_ANNOUNCED_SOURCES`` of them;
fragments from sources beyond that are counted (``sources-limit``).  Nothing about a source is
trusted: a spoofed one costs one membership that delivers nothing, and what it might deliver is
verified like everything else.

*Reporting.*  Drivers and reporters read `snapshot` (a frozen copy), not the live counters.
Besides the counters it gives what a progress bar needs: ``bytes_gathered`` (complete chunks
plus, for each chunk in progress, its new symbols up to K, at the symbol size: the image moves
forward with every useful symbol, not only when the symbol-major carousel completes chunks),
``sources`` (distinct addresses that sent DATA of the adopted session, counted up to
``MAX_SOURCES_COUNTED``) and a loss estimate from gaps in each chunk's ESI sequence.  A sender
sends each visit's ESIs in order (`otacast.signer.schedule`), so an ESI a few past the one
before it on the same chunk means the ones between were lost; a jump further than
``LOSS_GAP_LIMIT`` or backwards (another sender's cursor, the cycle's wrap, reordering) counts
nothing.  Each chunk follows two cursors, so the interleaved batches of two senders are both
followed; with more senders, or one datagram per send from several, fewer arrivals are
followed and the estimate rests on fewer of them (``symbols_followed``), not on guesses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from otacast.schemas import blockindex, wire
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.errors import ManifestRejected, PacketError
from otacast.schemas.limits import (
    MAX_ANNOUNCED_SOURCES,
    MAX_DECODER_BYTES,
    MAX_EARLY_BYTES,
    MAX_PENDING_MANIFEST_BYTES,
    MAX_PENDING_MANIFESTS,
    MAX_PENDING_MANIFESTS_PER_SOURCE,
    MAX_REFUSED_MANIFESTS,
    MAX_SOURCES_COUNTED,
    MIN_SYMBOL_SIZE,
    PART_CHUNKS,
)
from otacast.schemas.manifest import outline_envelope
from otacast.schemas.policy import TrustSet, VerifiedManifest, accept, check_signatures

from . import runs
from .auth import PACKET_AUTH_POLICIES, PacketAuthenticator, SignatureCheck
from .budget import ManifestBudget
from .decoder import (
    SUBMITTED,
    ChunkDecoder,
    DecoderFactory,
    DecoderFault,
    FeedResult,
    InPlace,
    raptorq_decoder,
)
from .events import (
    ChunkComplete,
    Event,
    FallbackNeeded,
    ImageComplete,
    IndexReady,
    ManifestRefused,
    ManifestVerified,
    SourceHeard,
)
from .index_object import IndexAssembly
from .verify import check_signature

# source, TSI, manifest TOI (31 bits of the envelope id), claimed length, fragment size
_PendingKey = tuple[str, int, int, int, int]
# A refusal remembered (*Refusals remembered*): (TSI, TOI) of a manifest whose signatures held
# and whose signed bytes give that TSI; the envelope's SHA-256 if its signatures failed; the
# SHA-256 and the TSI it came under if its signed bytes give another.
_RefusedKey = tuple[int, int] | bytes | tuple[bytes, int]


def _relevance(refusal: ManifestRejected) -> tuple[bool, int]:
    """Orders refusals for `ReceiverCore.refusal`: genuinely signed ones (a `sequence`) above
    the rest, then by sequence; among equals the later heard wins (callers compare with >=)."""
    return (refusal.sequence is not None, -1 if refusal.sequence is None else refusal.sequence)


# What holding one early datagram costs beyond its bytes (the bytes object, the tuple, the
# source string, the deque slot), charged against MAX_EARLY_BYTES so it bounds real memory.
EARLY_ENTRY_OVERHEAD = 160


@dataclass
class ReceiverStats:
    """The core's live counters; drivers and reporters read `ReceiverCore.snapshot` instead."""

    datagrams: int = 0
    symbols_used: int = 0
    duplicates: int = 0
    late: int = 0  # symbols of chunks already complete
    auth_ignored: int = 0  # AUTH datagrams while packet authentication is not in use
    fdt_ignored: int = 0  # FLUTE FDT packets: for plain FLUTE receivers, never parsed here
    index_ignored: int = 0  # block index datagrams not wanted, or after the index was out
    index_bytes: int = 0  # the verified block index's length, once `IndexReady` was emitted
    chunks_multicast: int = 0
    # Of those, chunks whose bytes a decoder rebuilt; with the symbol store the others' source
    # symbols all arrived and were only hashed where they lie (`decoder.InPlace`), while the
    # in-memory decoders rebuild every chunk.
    chunks_decoded: int = 0
    bytes_multicast: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    # The loss estimate (*Reporting*): arrivals that followed a cursor, and the ESIs they skipped.
    symbols_followed: int = 0
    symbols_missed: int = 0


@dataclass(frozen=True)
class ReceiverSnapshot:
    """What the core has done so far, copied out for reporters (they never read live state).

    Times are on the core's monotonic clock.  The chunk and byte totals are 0 and the manifest
    None until a manifest is verified.
    """

    datagrams: int
    symbols_used: int
    duplicates: int
    late: int  # symbols of chunks already complete (the rest of their last round's visit)
    auth_ignored: int
    chunks_multicast: int
    bytes_multicast: int
    rejected: Mapping[str, int]  # a copy, by reason
    manifest: VerifiedManifest | None
    chunks_done: int
    chunks_total: int
    bytes_done: int  # the image bytes of every complete chunk, however it was obtained
    bytes_total: int
    complete: bool
    first_datagram_at: float | None
    last_progress: float
    auth: Mapping[str, int] | None  # packet authentication counters, when it is in use
    # What a progress bar shows (module doc, *Reporting*); defaults for callers that build one.
    bytes_gathered: int = 0  # complete chunks plus useful symbols of chunks in progress
    sources: int = 0  # distinct addresses that sent DATA of the session (at most the limit)
    symbols_followed: int = 0  # arrivals that the loss estimate followed
    symbols_missed: int = 0  # ESIs those arrivals skipped: lost on the way
    held: int = 0  # datagrams held until a manifest is verified (*Nothing before trust*)
    index_bytes: int = 0  # the verified block index's length once received (*The block index*)
    index_ignored: int = 0
    chunks_decoded: int = 0  # chunks a decoder rebuilt (the others were only hashed in place)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def loss(self) -> float | None:
        """The share of followed symbols that were lost; None before any were followed."""
        expected = self.symbols_followed + self.symbols_missed
        return self.symbols_missed / expected if expected else None


@dataclass(frozen=True)
class _Candidate:
    """The highest release verified so far during the grace period (*Choosing a release*)."""

    verified: VerifiedManifest
    key: tuple[int, int]  # TSI, manifest TOI
    deadline: float  # monotonic: when it is adopted
    wall: float  # the wall time it was verified at
    source: str  # where its fragments came from


class _Reassembly:
    def __init__(self, total: int) -> None:
        self.total = total
        self.parts: dict[int, bytes] = {}
        self.covered = 0

    def add(self, offset: int, fragment: bytes) -> bool | None:
        """True when complete, False while incomplete, None on an inconsistent fragment."""
        if offset in self.parts:
            return False
        self.parts[offset] = fragment
        self.covered += len(fragment)
        if self.covered < self.total:
            return False
        return True if self.covered == self.total else None

    def assemble(self) -> bytes | None:
        position = 0
        pieces = []
        for offset in sorted(self.parts):
            if offset != position:
                return None
            pieces.append(self.parts[offset])
            position += len(self.parts[offset])
        return b"".join(pieces) if position == self.total else None


# ESIs below this many times K are remembered as bits (K/4 bytes per chunk in progress); the
# rest in a set.  2 covers the sender's default repair pool (50%: ESIs below 1.5 K) with room.
SEEN_BITS_PER_K = 2
# The furthest an ESI may be past a cursor's last and still count the ones between as lost
# (*Reporting*): 16 in a row lost from one sender's run is a loss burst worth showing; a longer
# jump is more likely another sender's cursor or a new visit than loss.
LOSS_GAP_LIMIT = 16
_NO_CURSOR = -(LOSS_GAP_LIMIT + 2)  # no ESI counts as following it


class _Chunk:
    """A chunk in progress: its decoder and the ESIs fed to it.

    ESIs below ``SEEN_BITS_PER_K`` x K (the source symbols and the default repair pool) are
    kept as bits, any others in a set: with the symbol store every chunk of the image can be in
    progress at once, and a set entry per symbol (~60 bytes with its int) would cost ~50 MB
    per GiB of image (~17 MB were measured for the repair symbols alone at 1 GiB) where the
    bits cost ~220 KB."""

    __slots__ = (
        "bits_below",
        "cursor",
        "decoder",
        "feed_run",
        "feed_symbol",
        "k",
        "other_cursor",
        "other_seen",
        "pending",
        "seen",
        "used",
    )

    def __init__(self, decoder: ChunkDecoder, k: int) -> None:
        self.decoder = decoder
        # The decoder's `decoder.SymbolFeed`, if it has one (the store's): fed the symbol alone.
        self.feed_symbol: Callable[[int, bytes | memoryview], FeedResult] | None = getattr(
            decoder, "feed_symbol", None
        )
        # Its `decoder.RunFeed`, if it has one (the store's): fed a GRO read's runs.
        self.feed_run: Callable[[int, Sequence[bytes | memoryview]], int] | None = getattr(
            decoder, "feed_run", None
        )
        self.k = k
        self.pending = False  # its decode was submitted (*Decoding*)
        self.used = 0  # new symbols fed to the decoder
        self.cursor = self.other_cursor = _NO_CURSOR  # the loss estimate's (*Reporting*)
        self.bits_below = SEEN_BITS_PER_K * k
        self.seen = bytearray((self.bits_below + 7) // 8)
        self.other_seen: set[int] = set()


class ReceiverCore:
    def __init__(
        self,
        trust: TrustSet,
        *,
        now: float,
        device_type: str | None = None,
        installed_sequence: int | None = None,
        channel: str | None = None,
        manifest: VerifiedManifest | None = None,
        join_timeout: float | None = None,
        stall_timeout: float | None = None,
        decoder_factory: DecoderFactory = raptorq_decoder,
        decoder_budget: int = MAX_DECODER_BYTES,
        packet_auth: str = "auto",
        signature_check: SignatureCheck = check_signature,
        manifest_grace: float = 0.0,
        report_sources: bool = False,
        want_index: bool = False,
    ) -> None:
        if packet_auth not in PACKET_AUTH_POLICIES:
            raise ValueError(f"packet_auth must be one of {', '.join(PACKET_AUTH_POLICIES)}")
        if packet_auth == "require" and manifest is not None and not manifest.manifest.stream_keys:
            raise ValueError("packet authentication is required but the manifest lists no keys")
        self.trust = trust
        self.device_type = device_type
        self.installed_sequence = installed_sequence
        self.channel = channel  # the device's: manifests of other channels are refused
        self.join_timeout = join_timeout
        self.stall_timeout = stall_timeout
        self.decoder_factory = decoder_factory
        self.decoder_budget = decoder_budget
        self.packet_auth = packet_auth
        self.signature_check = signature_check
        self.authenticator: PacketAuthenticator | None = None
        self.stats = ReceiverStats()
        self.verified: VerifiedManifest | None = None
        self.done: set[int] = set()
        self._bytes_done = 0  # image bytes of the chunks in `done`
        self.first_datagram_at: float | None = None
        self._events: deque[Event] = deque()
        self._started = now
        self._heard = False
        self._last_progress = now
        self._fallback_asked = False
        self._complete = False
        # After a decoded chunk fails its hash (forged symbols are being decoded), new symbols no
        # longer count as progress until a chunk verifies again: a flood of forgeries must not
        # keep the stall timer from asking for fallback.
        self._polluted = False
        self._pending: OrderedDict[_PendingKey, _Reassembly] = OrderedDict()
        self._pending_bytes = 0
        self._refused: OrderedDict[_RefusedKey, None] = OrderedDict()
        # The refusal a driver reports if nothing is adopted (see *Refusals*).
        self.refusal: ManifestRejected | None = None
        self._budget = ManifestBudget(now)
        self.manifest_grace = manifest_grace
        self._candidate: _Candidate | None = None  # during the grace period
        self.report_sources = report_sources
        self._followed: set[str] = set()  # reported by `SourceHeard` (see *Sources heard*)
        # (no order: a decoder is never evicted, see *Decoding*)
        self._chunks: dict[int, _Chunk] = {}
        self._early: deque[tuple[bytes, str]] = deque()
        self._early_bytes = 0
        self._session = b""
        self._tsi = -1  # the adopted session's TSI (-1: none, matches no datagram)
        self._sources: set[str] = set()  # that sent DATA of the session (*Reporting*)
        self.want_index = want_index
        self._index: IndexAssembly | None = None  # while the index is wanted and not yet out
        if manifest is not None:
            self._adopt(manifest, now)

    # --- Public interface --------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def has_events(self) -> bool:
        """Whether `next_event` has something."""
        return bool(self._events)

    @property
    def only_decodes_left(self) -> bool:
        """Whether every chunk not yet complete has its decode submitted (*Decoding*): until one
        of them fails to decode, no datagram of the session can be of use, and a driver need
        not read them."""
        chunks = self._chunks
        if self.verified is None or self._complete or len(self.done) + len(chunks) < self._count:
            return False
        return all(state.pending for state in chunks.values())

    @property
    def last_progress(self) -> float:
        """When a new symbol or chunk last advanced the image (or the session began)."""
        return self._last_progress

    def snapshot(self) -> ReceiverSnapshot:
        """A frozen copy of the counters and progress, for reporters and summaries."""
        stats, verified = self.stats, self.verified
        m = verified.manifest if verified is not None else None
        gathered = self._bytes_done + sum(
            min(state.used, state.k) * self._symbol_size for state in self._chunks.values()
        )
        return ReceiverSnapshot(
            datagrams=stats.datagrams,
            symbols_used=stats.symbols_used,
            duplicates=stats.duplicates,
            late=stats.late,
            auth_ignored=stats.auth_ignored,
            chunks_multicast=stats.chunks_multicast,
            bytes_multicast=stats.bytes_multicast,
            rejected=dict(stats.rejected),
            manifest=verified,
            chunks_done=len(self.done),
            chunks_total=m.chunk_count if m is not None else 0,
            bytes_done=self._bytes_done,
            bytes_total=m.image.length if m is not None else 0,
            complete=self._complete,
            first_datagram_at=self.first_datagram_at,
            last_progress=self._last_progress,
            auth=(
                dataclasses.asdict(self.authenticator.stats)
                if self.authenticator is not None
                else None
            ),
            bytes_gathered=min(gathered, m.image.length) if m is not None else 0,
            sources=len(self._sources),
            symbols_followed=stats.symbols_followed,
            symbols_missed=stats.symbols_missed,
            chunks_decoded=stats.chunks_decoded,
            held=len(self._early),
            index_bytes=stats.index_bytes,
            index_ignored=stats.index_ignored,
        )

    def count_rejected(self, reason: str, count: int = 1) -> None:
        """Count datagrams the driver dropped before they could reach the core (e.g. a
        datagram longer than the receive buffer) with the core's own rejections."""
        self.stats.rejected[reason] += count

    def receive_datagram(self, data: bytes, source: str, now: float, *, wall: float) -> None:
        """Account for one datagram; never raises on its content.

        ``now`` is the monotonic clock.  ``wall`` is the wall-clock time (seconds since the
        epoch) against which a manifest this datagram completes is checked for expiry; it is
        required so that no driver can check expiry against the monotonic clock by leaving it
        out (a caller with one clock, such as a test at a fixed date, passes ``wall=now``).
        ``source`` is the sender's address; admission by source is the transport's job (SSM
        joins), and packet authentication uses it.
        """
        self.stats.datagrams += 1
        if self.first_datagram_at is None:
            self.first_datagram_at = now
        if self._session:  # `_receive`'s fast path, inline: this runs for every datagram
            fields = wire.peek_data(data)
            if fields is not None and fields[0] == self._tsi:
                self._heard_from(source)
                self._on_data(data, fields, now)
                return
        self._receive_other(data, source, now, wall)

    def receive_datagrams(
        self,
        datagrams: Sequence[memoryview],
        source: str,
        now: float,
        *,
        wall: float,
        coalesced: tuple[memoryview, int] | None = None,
    ) -> None:
        """`receive_datagram` for each of `datagrams`, one read's worth from `source`.

        They may be views of a buffer the caller reuses afterwards: the core keeps nothing of
        them beyond this call without copying it.  The receive loop's path.  A DATA datagram
        of the session reaches its decoder as a view, with no copy (only one that packet
        authentication holds for its page is copied); and a run of consecutive ESIs of one
        chunk (what a GRO read holds: the sender's GSO batch) reaches a decoder offering
        ``feed_run`` (`decoder.RunFeed`, the store's) in one call, after the same checks per
        datagram (with packet authentication, its digests compared with its page's at once),
        each counted as `receive_datagram` counts it (`_feed_run`).

        `coalesced` is ``(words, segment)`` when the datagrams are one read's, back to back in
        one buffer every `segment` bytes, and `words` that buffer's whole datagrams as native
        32-bit words (`otacast.plugin.transport.MulticastReceiver.coalesced`): a run's checks
        are then made for all its datagrams at once (`otacast.plugin.runs`)."""
        if not datagrams:
            return
        self.stats.datagrams += len(datagrams)
        if self.first_datagram_at is None:
            self.first_datagram_at = now
        if not self._session:
            # (held until a manifest is adopted: each gets a copy)
            for data in datagrams:
                self._receive(bytes(data), source, now, wall)
            return
        peek, on_data, chunks = wire.peek_data, self._on_data, self._chunks
        unpack = wire.unpack_data_header
        tsi, size = self._tsi, self._datagram_size
        # Whole runs at once: datagrams [0, covered) lie in `words`, `stride` words apart.
        words: memoryview | None = None
        covered = stride = 0
        if coalesced is not None and coalesced[1] == size and not size & 3:
            words, stride = coalesced[0], size >> 2
            covered = min(len(words) // stride, len(datagrams))
        ours = False
        # The run being gathered: `run` datagrams of chunk `run_chunk` (its `state`), ESIs
        # `first` to `after` - 1, each new to the chunk (its bit in `seen` is set as it joins).
        # The next one continues it if its header is the first's with the payload id `pid`
        # (so it would pass `peek_data` as the same chunk and ESI `after`: not peeked again).
        run: list[memoryview] = []
        state: _Chunk | None = None
        run_chunk = first = after = below = prefix = toi = pid = 0
        seen = bytearray()
        index, count = 0, len(datagrams)
        while index < count:
            data = datagrams[index]
            index += 1
            if run:
                if len(data) == size:
                    header = unpack(data)
                    if (
                        header[3] == pid
                        and header[2] == toi
                        and header[1] == tsi
                        and header[0] == prefix
                        and after < below
                        and not seen[after >> 3] & 1 << (after & 7)
                    ):
                        seen[after >> 3] |= 1 << (after & 7)
                        run.append(data)
                        after += 1
                        pid += 1
                        continue
                assert state is not None
                self._feed_run(state, run_chunk, first, run, now)
                run = []
            fields = peek(data)
            if fields is None or fields[0] != tsi:
                self._receive(bytes(data), source, now, wall)
                continue
            ours = True
            chunk, esi = fields[1], fields[2]
            # A run starts at a new ESI of a chunk in progress whose decoder takes runs (a
            # chunk done, or beyond the image, has no state; a first symbol opens it below;
            # a chunk whose decode is pending refuses its symbols there).
            state = chunks.get(chunk)
            if (
                state is not None
                and state.feed_run is not None
                and not state.pending
                and esi < state.bits_below
                and not state.seen[esi >> 3] & 1 << (esi & 7)
                and len(data) == size
            ):
                seen, below = state.seen, state.bits_below
                prefix, _, toi, pid = unpack(data)
                # As much of the rest of the read at once as continues the run (to the
                # chunk's bits): a whole GSO batch in one read, or the part of it between
                # two datagrams lost on the way.
                most = min(covered - index, below - esi - 1) + 1
                if most > 1 and words is not None:
                    length = runs.run_length(words, stride, index - 1, most, pid)
                    if length > 1 and runs.all_clear(seen, esi, length):
                        runs.set_all(seen, esi, length)
                        self._feed_run(
                            state, chunk, esi, list(datagrams[index - 1 : index - 1 + length]), now
                        )
                        index += length - 1
                        continue
                seen[esi >> 3] |= 1 << (esi & 7)
                run = [data]
                run_chunk, first, after = chunk, esi, esi + 1
                pid += 1
                continue
            on_data(data, fields, now)
        if run:
            assert state is not None
            self._feed_run(state, run_chunk, first, run, now)
        if ours:
            self._heard_from(source)

    def _feed_run(
        self, state: _Chunk, chunk: int, first: int, run: list[memoryview], now: float
    ) -> None:
        """`_on_data` for each of `run`: DATA datagrams of the session, of the signed length,
        of chunk `chunk` in progress (`state`), with new consecutive ESIs from `first` on,
        already marked as seen.  What the decoder's ``feed_run`` takes is counted here as
        `_on_data` would count it; the rest (from the datagram that may complete the chunk
        on) goes through `_on_data` one by one."""
        assert state.feed_run is not None
        self._heard = True
        start, stats, authenticator = wire.DATA_HEADER_SIZE, self.stats, self.authenticator
        fed = run
        if authenticator is not None:
            # The run's digests against its page at once; from the first datagram no accepted
            # page vouches for, `_on_data` asks the authenticator one by one (held, refused).
            fed = run[: authenticator.vouched_run(chunk, first, run)]
        taken = state.feed_run(first, [data[start:] for data in fed]) if fed else 0
        if authenticator is not None:
            authenticator.stats.datagrams_admitted += taken
        if taken:
            # The loss estimate (*Reporting*): the first may follow a cursor, the rest follow it.
            if first == state.cursor + 1:
                stats.symbols_followed += taken
            else:
                self._follow(state, first)
                stats.symbols_followed += taken - 1
            state.cursor = first + taken - 1
            stats.symbols_used += taken
            state.used += taken
            if not self._polluted:
                self._last_progress = now
        if taken < len(run):
            seen = state.seen
            for esi in range(first + taken, first + len(run)):
                seen[esi >> 3] &= ~(1 << (esi & 7))  # not fed yet: `_on_data` decides
            peek, on_data = wire.peek_data, self._on_data
            for data in run[taken:]:
                fields = peek(data)
                assert fields is not None  # (it passed before)
                on_data(data, fields, now)

    def _heard_from(self, source: str) -> None:
        if len(self._sources) < MAX_SOURCES_COUNTED:
            self._sources.add(source)

    def _receive(self, data: bytes, source: str, now: float, wall: float) -> None:
        if self._session:
            fields = wire.peek_data(data)
            if fields is not None and fields[0] == self._tsi:
                self._heard_from(source)
                self._on_data(data, fields, now)
                return
        self._receive_other(data, source, now, wall)

    def _receive_other(self, data: bytes, source: str, now: float, wall: float) -> None:
        """Anything but a DATA datagram of the adopted session."""
        if self._candidate is not None and now >= self._candidate.deadline:
            self._adopt_candidate(now)  # its grace is over: this datagram may be of its session
            self._receive(data, source, now, wall)
            return
        try:
            packet = wire.parse_datagram(data)
        except PacketError as exc:
            self.stats.rejected[exc.reason] += 1
            return
        if isinstance(packet, wire.FdtPacket):
            self.stats.fdt_ignored += 1
        elif isinstance(packet, wire.ManifestPacket):
            self._on_manifest(packet, source, now, wall)
        elif self._session:
            if packet.tsi != self._tsi:
                self.stats.rejected["other-session"] += 1
            elif isinstance(packet, wire.AuthPacket):
                self._on_auth(packet, bytes(data), source, now)
            else:  # a DATA datagram of this session that the fast path did not take: too short
                self.stats.rejected["symbol-length"] += 1
        elif isinstance(packet, wire.DataPacket) and len(packet.symbol) < MIN_SYMBOL_SIZE:
            self.stats.rejected["symbol-length"] += 1  # no manifest allows a symbol this small
        else:
            self._early.append((bytes(data), source))  # replayed at its adoption's times
            self._early_bytes += len(data) + EARLY_ENTRY_OVERHEAD
            while self._early_bytes > MAX_EARLY_BYTES:
                self._early_bytes -= len(self._early.popleft()[0]) + EARLY_ENTRY_OVERHEAD
                self.stats.rejected["no-manifest-yet"] += 1  # the oldest held one is dropped

    def mark_done(self, index: int, now: float) -> None:
        """A chunk verified by other means (staging resume, HTTP) is complete."""
        if self.verified is None or not 0 <= index < self.verified.manifest.chunk_count:
            raise ValueError("no such chunk")
        if index in self.done:
            return
        self._add_done(index)
        self._chunks.pop(index, None)
        self._progress(now)

    def note_progress(self, now: float) -> None:
        """Progress made outside the core (the delta lane's objects, `otacast.plugin.lane`):
        the stall timer counts from `now`."""
        self._last_progress = now

    def rearm_fallback(self, now: float) -> None:
        """The driver moved to another source after a `FallbackNeeded` (from the delta lane to
        the carousel): ask again if that one stalls too, counting from `now`."""
        self._fallback_asked = False
        self._last_progress = now

    def restart_chunk(self, index: int) -> None:
        """The driver discarded what chunk `index` held (local symbols that built a chunk
        failing its hash, `otacast.plugin.reuse`): forget its decoder and the ESIs it was fed,
        so that every symbol of it is taken afresh."""
        self._chunks.pop(index, None)

    def get_timer(self) -> float | None:
        fallback = self._fallback_deadline()
        if self._candidate is None:
            return fallback
        return (
            self._candidate.deadline
            if fallback is None
            else min(fallback, self._candidate.deadline)
        )

    def _fallback_deadline(self) -> float | None:
        if self._fallback_asked or self._complete:
            return None
        deadlines = []
        # Nothing heard, or nothing at all arrived (a manifest given up front counts as heard):
        # the join timeout.
        silent = not self._heard or self.first_datagram_at is None
        if self.join_timeout is not None and silent:
            deadlines.append(self._started + self.join_timeout)
        if self.stall_timeout is not None and self._heard:
            deadlines.append(self._last_progress + self.stall_timeout)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        if self._candidate is not None and now >= self._candidate.deadline:
            self._adopt_candidate(now)
        deadline = self._fallback_deadline()
        if deadline is None or now < deadline:
            return
        self._fallback_asked = True
        heard = self._heard and self.first_datagram_at is not None
        self._events.append(FallbackNeeded("stalled" if heard else "join-timeout"))

    # --- Manifests ---------------------------------------------------------------------------

    def _on_manifest(
        self, packet: wire.ManifestPacket, source: str, now: float, wall: float
    ) -> None:
        if self._session:
            if packet.tsi == self._tsi:
                self._heard = True
                self._source_heard(source)
            else:
                self.stats.rejected["other-session"] += 1
            return
        key = (packet.tsi, packet.toi)
        if self._candidate is not None and key == self._candidate.key:
            return  # another copy of the release chosen so far (see *Choosing a release*)
        if key in self._refused:
            self.stats.rejected["refused-manifest"] += 1
            return
        pending_key = (source, packet.tsi, packet.toi, packet.total_length, packet.fragment_size)
        assembly = self._pending.get(pending_key)
        if assembly is None:
            self._make_room(source)
            assembly = self._pending[pending_key] = _Reassembly(packet.total_length)
        before = assembly.covered
        state = assembly.add(packet.offset, packet.fragment)
        self._pending_bytes += assembly.covered - before
        if assembly.covered > before:
            # Least recently *filled* goes first: the sender's carousel fills its reassembly in
            # one burst, so a flood would have to start several between two of its fragments.
            self._pending.move_to_end(pending_key)
        if state is False:
            self._trim_pending(keep=pending_key)
            return
        del self._pending[pending_key]
        self._pending_bytes -= assembly.covered
        envelope = assembly.assemble() if state else None
        if envelope is None:
            self.stats.rejected["manifest-conflict"] += 1
            return
        digest = hashlib.sha256(envelope).digest()
        if wire.manifest_toi(digest) != packet.toi:
            self.stats.rejected["manifest-digest"] += 1
            return
        # (*Refusals remembered*: what was not verified is known by all of its bytes.)
        if digest in self._refused or (digest, packet.tsi) in self._refused:
            self.stats.rejected["refused-manifest"] += 1
            return
        if not self._budget.take(source, now):
            self.stats.rejected["manifest-budget"] += 1  # not remembered: a later copy may pass
            return
        # `policy.verify_envelope` in its steps, to know whether the signatures held.
        try:
            outline = outline_envelope(envelope)
            if outline.tsi != packet.tsi:
                # Sent under another session's TSI than its signed bytes give: a genuine
                # envelope replayed to make the device verify it again, or a forgery.
                self._budget.forged(source)
                self._remember_refused((digest, packet.tsi))
                self.stats.rejected["manifest-session"] += 1
                return
            authenticated = check_signatures(outline, self.trust, self.signature_check)
        except ManifestRejected as exc:
            self._budget.forged(source)
            self._refuse(digest, exc)
            return
        self._budget.signed(source)
        try:
            verified = accept(
                authenticated,
                now=wall,  # expiry is a date: the wall clock, read once for this check
                device_type=self.device_type,
                installed_sequence=self.installed_sequence,
                channel=self.channel,
            )
        except ManifestRejected as exc:
            self._refuse(key, exc)
            return
        if self.packet_auth == "require" and not verified.manifest.stream_keys:
            self._remember_refused(key)
            self.stats.rejected["manifest-unauthenticated"] += 1
            self._events.append(
                ManifestRefused(
                    "PacketAuthRequired",
                    f"{verified.manifest.name} {verified.manifest.version} lists no stream keys "
                    "and this device requires packet authentication",
                )
            )
            return
        if self.manifest_grace > 0:
            self._consider(verified, key, now, wall, source)
            return
        self._adopt(verified, now)
        self._source_heard(source)
        self._replay_early(now, wall)

    def _consider(
        self,
        verified: VerifiedManifest,
        key: tuple[int, int],
        now: float,
        wall: float,
        source: str,
    ) -> None:
        """A verified manifest heard during the grace period: keep the highest sequence."""
        best = self._candidate
        if best is None:
            self._candidate = _Candidate(verified, key, now + self.manifest_grace, wall, source)
            self._heard = True  # a release is on the channel: no join timeout
            self._last_progress = now
            return
        if verified.manifest.sequence > best.verified.manifest.sequence:
            self._candidate = dataclasses.replace(
                best, verified=verified, key=key, wall=wall, source=source
            )
            key = best.key  # the one set aside
        self._remember_refused(key)  # neither is verified again
        self.stats.rejected["manifest-lower"] += 1

    def _adopt_candidate(self, now: float) -> None:
        candidate, self._candidate = self._candidate, None
        assert candidate is not None
        self._adopt(candidate.verified, now)
        self._source_heard(candidate.source)
        # No manifest is verified once a session is adopted, so the wall time of its own
        # verification serves the replay.
        self._replay_early(now, candidate.wall)

    def _source_heard(self, source: str) -> None:
        """`source` sent a fragment of the adopted release (see *Sources heard*)."""
        if not self.report_sources or source in self._followed:
            return
        if len(self._followed) >= MAX_ANNOUNCED_SOURCES:
            self.stats.rejected["sources-limit"] += 1
            return
        self._followed.add(source)
        self._events.append(SourceHeard(source))

    def _make_room(self, source: str) -> None:
        """Drop the oldest reassemblies so that one more from `source` fits the limits."""
        mine = [k for k in self._pending if k[0] == source]
        if len(mine) >= MAX_PENDING_MANIFESTS_PER_SOURCE:
            self._drop_pending(mine[0])
        if len(self._pending) >= MAX_PENDING_MANIFESTS:
            self._drop_pending(next(iter(self._pending)))

    def _trim_pending(self, keep: _PendingKey) -> None:
        """Keep the reassemblies' bytes within their cap, dropping the oldest first."""
        for key in list(self._pending):
            if self._pending_bytes <= MAX_PENDING_MANIFEST_BYTES:
                return
            if key != keep:
                self._drop_pending(key)
        if self._pending_bytes > MAX_PENDING_MANIFEST_BYTES:
            self._drop_pending(keep)

    def _drop_pending(self, key: _PendingKey) -> None:
        self._pending_bytes -= self._pending.pop(key).covered
        self.stats.rejected["manifest-evicted"] += 1

    def _refuse(self, key: _RefusedKey, exc: ManifestRejected) -> None:
        self._remember_refused(key)
        self.stats.rejected["manifest-refused"] += 1
        if self.refusal is None or _relevance(exc) >= _relevance(self.refusal):
            self.refusal = exc
        self._events.append(ManifestRefused(type(exc).__name__, str(exc), exc))

    def _remember_refused(self, key: _RefusedKey) -> None:
        self._refused[key] = None
        if len(self._refused) > MAX_REFUSED_MANIFESTS:
            self._refused.popitem(last=False)

    def _adopt(self, verified: VerifiedManifest, now: float) -> None:
        manifest = verified.manifest
        self.verified = verified
        self._session = manifest.session_id
        self._tsi = manifest.tsi
        self._symbol_size = manifest.fec.symbol_size
        self._datagram_size = wire.data_datagram_size(self._symbol_size)
        self._count = manifest.chunk_count
        # chunks.size bounds every chunk (the last part's RFC 6330 blocks are no larger).
        self._max_decoders = max(2, self.decoder_budget // manifest.chunks.size)
        self._pending.clear()
        self._pending_bytes = 0
        self._heard = True
        self._last_progress = now
        if manifest.stream_keys and self.packet_auth != "off":
            self.authenticator = PacketAuthenticator(
                {k.sender: k.public for k in manifest.stream_keys},
                self.stats.rejected,
                now=now,
                datagram_size=self._datagram_size,
                chunk_count=self._count,
                done=self.done,
                check=self.signature_check,
            )
        self._events.append(ManifestVerified(verified))
        if self.want_index and manifest.index is not None:
            self._index = IndexAssembly(manifest)

    def _replay_early(self, now: float, wall: float) -> None:
        """Admit what was held while no manifest was verified, through the same receive path.

        A manifest among them is only counted now that the session is fixed."""
        early, self._early, self._early_bytes = self._early, deque(), 0
        for data, source in early:
            self._receive(data, source, now, wall)

    # --- Data --------------------------------------------------------------------------------

    def _on_auth(self, packet: wire.AuthPacket, data: bytes, source: str, now: float) -> None:
        self._heard = True
        if self.authenticator is None:
            self.stats.auth_ignored += 1  # packet authentication is off or not offered
            return
        for released in self.authenticator.on_auth(packet, data, source, now):
            fields = wire.peek_data(released)  # it passed `_on_data` before it was held
            if fields is not None:
                self._on_data(released, fields, now, vouched=True)

    def _on_data(
        self,
        data: bytes | memoryview,
        fields: tuple[int, int, int],
        now: float,
        vouched: bool = False,
    ) -> None:
        """A DATA datagram of this session; `fields` is what `wire.peek_data` read from it."""
        self._heard = True
        if len(data) != self._datagram_size:
            self.stats.rejected["symbol-length"] += 1
            return
        _, chunk, esi = fields
        if chunk >= self._count:
            self._on_beyond_image(data, chunk, esi)
            return
        if chunk in self.done:
            self.stats.late += 1
            return
        if (
            self.authenticator is not None
            and not vouched
            and not self.authenticator.admit(data, chunk, esi)  # (it copies what it holds)
        ):
            return  # held until its page arrives, or dropped (counted by the authenticator)
        state = self._chunks.get(chunk)
        if state is None:
            if len(self._chunks) >= self._max_decoders:
                self.stats.rejected["decoder-budget"] += 1
                return
            state = self._open_chunk(chunk)
        elif state.pending:
            self.stats.rejected["decode-pending"] += 1  # it holds enough: not fed, not seen
            return
        # The loss estimate (*Reporting*): most ESIs are the next of their run
        if esi == state.cursor + 1:
            self.stats.symbols_followed += 1
        else:
            self._follow(state, esi)
        state.cursor = esi
        if esi < state.bits_below:
            seen, bit = state.seen, 1 << (esi & 7)
            if seen[esi >> 3] & bit:
                self.stats.duplicates += 1
                return
            seen[esi >> 3] |= bit
        elif esi in state.other_seen:
            self.stats.duplicates += 1
            return
        else:
            state.other_seen.add(esi)
        self.stats.symbols_used += 1
        state.used += 1
        if not self._polluted:
            self._last_progress = now
        feed_symbol = state.feed_symbol
        try:
            if feed_symbol is not None:
                result = feed_symbol(esi, data[wire.DATA_HEADER_SIZE :])
            else:
                result = state.decoder.feed(data[wire.CODEC_PACKET_OFFSET :])
        except DecoderFault:
            self.stats.rejected["decoder-fault"] += 1
            del self._chunks[chunk]
            state.decoder.discard()
            return
        if result is SUBMITTED:
            state.pending = True
        elif result is not None:
            self._finish_chunk(chunk, result, now)

    def chunk_decoded(
        self, chunk: int, data: bytes | None, now: float, *, fault: bool = False
    ) -> None:
        """The outcome of a decode that a decoder answered `decoder.SUBMITTED` for (*Decoding*):
        the chunk's bytes (hashed and kept exactly as an inline decode's), None (not enough
        independent symbols: it collects again, and its next new symbol tries again), or a
        codec `fault` (its symbols are discarded, as an inline `DecoderFault`'s).  Ignored for a
        chunk with no decode submitted (completed or restarted meanwhile)."""
        state = self._chunks.get(chunk)
        if state is None or not state.pending:
            return
        state.pending = False
        if fault:
            self.stats.rejected["decoder-fault"] += 1
            del self._chunks[chunk]
            state.decoder.discard()
        elif data is not None:
            self._finish_chunk(chunk, data, now)

    def _on_beyond_image(self, data: bytes | memoryview, chunk: int, esi: int) -> None:
        """A DATA datagram of the session for no chunk of the image: the block index's, or none
        (*The block index*)."""
        block = chunk - wire.INDEX_FIRST_CHUNK
        if not 0 <= block < PART_CHUNKS:
            self.stats.rejected["chunk-range"] += 1
            return
        if self._index is None:
            self.stats.index_ignored += 1
            return
        result = self._index.feed(block, esi, data[wire.CODEC_PACKET_OFFSET :])
        if isinstance(result, BlockIndex):
            self._index = None
            self.stats.index_bytes = len(result.digests) + blockindex.HEADER_SIZE
            self._events.append(IndexReady(result))
        elif result is not None:
            self.stats.rejected[result] += 1

    def _follow(self, state: _Chunk, esi: int) -> None:
        """The loss estimate for an ESI that is not the next of its chunk's latest run: does it
        follow that run after a gap, or the chunk's other cursor (*Reporting*)?"""
        gap = esi - state.cursor - 1
        if not 0 <= gap <= LOSS_GAP_LIMIT:
            gap = esi - state.other_cursor - 1
            state.other_cursor = state.cursor
        if 0 <= gap <= LOSS_GAP_LIMIT:
            self.stats.symbols_followed += 1
            self.stats.symbols_missed += gap

    def _open_chunk(self, chunk: int) -> _Chunk:
        assert self.verified is not None
        manifest = self.verified.manifest
        length = manifest.chunk_span(chunk)[1]
        decoder = self.decoder_factory(chunk, length, self._symbol_size)
        state = self._chunks[chunk] = _Chunk(decoder, manifest.source_symbols(chunk))
        return state

    def _finish_chunk(self, chunk: int, result: bytes | InPlace, now: float) -> None:
        state = self._chunks.pop(chunk)
        assert self.verified is not None
        if isinstance(result, InPlace):  # hashed where it is (`decoder.InPlace`)
            digest, length, data = result.digest, result.length, None
        else:
            digest, length, data = hashlib.sha256(result).digest(), len(result), result
        if digest != self.verified.manifest.chunks.sha256[chunk]:
            self.stats.rejected["chunk-hash-mismatch"] += 1
            state.decoder.discard()  # its symbols built a wrong chunk: none of them is kept
            self._polluted = True
            return
        self._polluted = False
        self._add_done(chunk)
        self.stats.chunks_multicast += 1
        self.stats.chunks_decoded += data is not None
        self.stats.bytes_multicast += length
        self._events.append(ChunkComplete(chunk, data))
        self._progress(now)

    def _add_done(self, chunk: int) -> None:
        assert self.verified is not None
        self.done.add(chunk)
        self._bytes_done += self.verified.manifest.chunk_span(chunk)[1]

    def _progress(self, now: float) -> None:
        self._last_progress = now
        if not self._complete and self.verified is not None and len(self.done) == self._count:
            self._complete = True
            self._chunks.clear()
            self._events.append(ImageComplete())
