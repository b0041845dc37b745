"""The receive driver: what ``otacast fetch`` (and ``install``, ``watch``, the Mender module) run.

`fetch` plans the joins, opens the socket and runs one loop around the sans-IO `ReceiverCore`;
the decisions are the core's, the effects are here.  The driver owns the clocks (it passes the
core a monotonic ``now`` and, with each batch of datagrams, the wall time that manifest expiry
is checked against), the socket, the state directory, DNS and the HTTP worker.

The loop waits on the socket (or the core's next timer), hands every datagram to the core, and
acts on its events: open staging when a manifest is verified (resuming what is already on
disk), persist each verified chunk, start HTTP repair when the core asks for fallback, finish
when the image is complete.  What the operator sees is `otacast.plugin.report`'s, fed from core
snapshots.

Where symbols wait for their chunk is the ``symbols`` setting.  With ``store`` (the default),
every symbol the core admits goes to the durable symbol store (`otacast.plugin.symbol_store`)
through the decoders this driver gives the core (`otacast.plugin.store_decoder`): nothing is
held in memory, so the core needs no decoder budget, no useful symbol is refused, and a restart
resumes with the stored symbols, not only whole chunks; staging and the store are opened when
the verified manifest first needs them (its first admitted symbol, or the `ManifestVerified`
event, whichever comes first).  The store's writes are cheap enough for the receive loop (runs
of source symbols, and of repair symbols in consecutive spill slots, gathered into one write
each, syncs in a background thread: figures in docs/PERFORMANCE.md).  The loop hands the core
each read as views of its buffer (`ReceiverCore.receive_datagrams`), which copies what it keeps.
A chunk that needs a RaptorQ decode is queued, not decoded while its datagram is handled: each
turn of the loop decodes the lowest queued chunk (`StoredSymbols.queue_decodes`), so that the
image's hash, taken from its start on a thread as chunks become final, follows the decodes
instead of waiting for the last one.  With ``decode = "worker"`` (``--decode worker``; not the
default: it costs a second process's memory) the store's decodes run in a worker process
(`otacast.plugin.decode_worker`) that the driver starts with the store: the core refuses a
chunk's symbols while its decode is submitted, the loop waits on the worker's answers with the
sockets and hands each outcome to the core (`ReceiverCore.chunk_decoded`), and while every
unfinished chunk is decoding it does not read the sockets at all (nothing that arrives can
help).  With ``memory`` the core's in-memory decoders hold symbols for at most
``MAX_DECODER_BYTES`` of chunks at once (16 MiB), and `_Writer` persists verified chunks off the
loop.  It is kept for images that fit that budget (it writes nothing but whole chunks); for
larger ones it is the wrong choice: the sender keeps every chunk in progress at once, so the
symbols of every chunk without a decoder are refused (``decoder-budget``) and the download takes
many passes.

`otacast.plugin.fetcher.RepairWorker` fetches the missing chunks over HTTP in a thread and
passes verified ones back through a queue.  Only the loop talks to the core, the store and
staging's writer, so multicast and HTTP share one state without locks.

Where to listen is `otacast.plugin.discovery.plan_joins`'s decision (options, manifest, DNS);
the driver joins what it plans and reports its note.  Without SRV records (zero-config on a
LAN) the plan is the channel's ASM group, where senders announce the release they serve, and
an SSM group to *follow* them to: the core reports each source that announced the adopted
release (`SourceHeard`), and the driver joins (SSM group, that source) on a second socket,
bound to the SSM group as the first is to the ASM group (a socket bound to one group sees no
other's datagrams); the loop waits on both and reads each the same way (GRO batches).  When
nothing is heard, the error says what to check next (`JoinPlan.silence`).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from otacast.schemas import addressing, wire
from otacast.schemas.blockindex import BlockIndex
from otacast.schemas.fec import Part
from otacast.schemas.limits import MAX_DECODER_BYTES, MAX_DECODES_IN_FLIGHT
from otacast.schemas.manifest import Manifest
from otacast.schemas.policy import TrustSet, VerifiedManifest

from .config import Settings
from .core import ReceiverCore
from .decode_worker import DecodeWorker
from .decoder import ChunkDecoder, raptorq_decoder
from .discovery import JoinPlan, plan_joins
from .errors import (
    IncompleteError,
    NetworkError,
    NoManifestError,
    StateError,
    UsageError,
)
from .events import (
    ChunkComplete,
    FallbackNeeded,
    ImageComplete,
    IndexReady,
    ManifestRefused,
    ManifestVerified,
    SourceHeard,
)
from .installed import read_installed_index
from .lane import (
    EarlyLane,
    IndexGroupCore,
    LaneAssembly,
    LaneChoice,
    LaneCore,
    lane_choice,
    lane_note,
)
from .object_file import SPOOL_SUFFIX, FileAssembly
from .report import FetchSummary, Reporter, refusal_note
from .reuse import (
    CONFIGURED,
    LocalChunk,
    ReuseDone,
    ReuseNote,
    ReuseWorker,
    Source,
    configured_sources,
    drain,
    index_for,
    readable_sources,
)
from .staging import Staging
from .status import StatusFile
from .store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from .transport import Join, MulticastReceiver

if TYPE_CHECKING:  # imported when HTTP is first needed: `requests` costs ~0.15 s of start-up
    from .fetcher import RangedChunk, RepairWorker

# Datagrams taken from the socket per turn of the loop before timers and HTTP results are
# looked at again: keeps both responsive under a flood without a syscall per check.
MAX_BURST = 512
# Verified chunks waiting for the writer thread (4 MiB each at the default chunk size).
WRITE_QUEUE = 4
# Longest wait for a datagram; bounds how late HTTP results and the status line are handled.
POLL_INTERVAL = 0.1
# How often the status file is rewritten during a download: fresh enough for `otacast status`,
# rare enough to cost nothing.
STATUS_INTERVAL = 1.0
# How long a device that may take a delta lane listens on the lane's groups for the manifest
# before it joins the carousel instead (the lane sends its manifest at least every 0.25 s; a
# release without a lane sends nothing there).  At most half the join timeout.
LANE_PROBE_SECONDS = 3.0
# How long a device that joined the index group for the block index waits for its first datagram
# before it leaves (the group sends its FDT and manifest at least every 0.25 s; a sender serving
# with --index-share 0 sends nothing there): a lane device then takes the carousel's in-band index.
INDEX_PROBE_SECONDS = LANE_PROBE_SECONDS
# How long `fetch --index` goes on listening for the block index once the image is complete.
# The carousel sends the index in step with the chunks (a receiver there from the start has it
# within about a round of the image, often in the same one), so this covers any rate at which
# the image arrived at all; then the run finishes without it (index_bytes 0), with a note.
INDEX_AFTER_IMAGE_SECONDS = 10.0
# Where the local pass keeps the delta lane's decoded blocks (state directory; removed at end).
LANE_FILE = "lane.blocks"
# Where the delta lane's object is put together (`object_file.FileAssembly`, with its ".spool"
# beside it; state directory; removed at end).
LANE_OBJECT_FILE = "lane.object"
# How often stored symbols are made durable at least (in the background), however slowly they
# arrive: the store alone flushes every FLUSH_SYMBOLS symbols, which at a slow rate is minutes.
FLUSH_INTERVAL = 1.0


@dataclass
class FetchOptions:
    """Everything one download needs, from the command line and config (`from_settings`)."""

    trust: TrustSet
    out: Path
    state_dir: Path
    interface: str | None = None
    channel: str | None = None
    scope: str = addressing.DEFAULT_SCOPE
    group: str | None = None
    port: int | None = None
    sources: Sequence[str] = ()
    resolver: str | None = None
    manifest: VerifiedManifest | None = None
    device_type: str | None = None
    installed_sequence: int | None = None
    join_timeout: float = 10.0
    stall_timeout: float = 30.0
    fallback: str = "auto"  # auto | only | never
    json: bool = False
    http_timeout: float = 10.0
    status: StatusFile | None = None
    packet_auth: str = "auto"  # auto | require | off (see otacast.plugin.core)
    symbols: str = "store"  # store | memory (see the module doc)
    # Seconds to keep listening after the first valid manifest for one of a higher sequence
    # (`otacast.plugin.core`, *Choosing a release*); `watch` sets it, one-off commands do not.
    manifest_grace: float = 0.0
    # End with `IncompleteError` when multicast brings nothing (for the join timeout, or
    # stalled) and there is no HTTP fallback, instead of listening on: the Mender module sets
    # it, whose Download would otherwise sit until Mender's module timeout (4 hours).
    give_up_without_fallback: bool = False
    # Also receive the block index object (`otacast.plugin.core`, *The block index*).
    want_index: bool = False
    # Local reuse (`otacast.plugin.reuse`): where blocks of an older image may be (none: off),
    # and the new image's block index from a file instead of the mirrors (`--block-index`).
    reuse_sources: Sequence[Source] = ()
    block_index: Path | None = None
    # The delta lane (`otacast.plugin.lane`): taken when the release and this device allow.
    lane: bool = True
    # Decode the symbol store's chunks in a worker process (`otacast.plugin.decode_worker`).
    decode_worker: bool = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        trust: TrustSet,
        *,
        manifest: VerifiedManifest | None = None,
        installed_sequence: int | None = None,
        json: bool = False,
        status: StatusFile | None = None,
        manifest_grace: float = 0.0,
    ) -> FetchOptions:
        return cls(
            trust=trust,
            out=settings.out_path,
            state_dir=settings.state_dir,
            interface=settings.interface,
            channel=settings.channel,
            scope=settings.scope,
            group=settings.group,
            port=settings.port,
            sources=settings.source,
            resolver=settings.resolver,
            manifest=manifest,
            device_type=settings.device_type,
            installed_sequence=installed_sequence,
            join_timeout=settings.join_timeout,
            stall_timeout=settings.stall_timeout,
            fallback=settings.fallback,
            json=json,
            status=status,
            packet_auth=settings.packet_auth,
            symbols=settings.symbols,
            decode_worker=settings.decode == "worker",
            manifest_grace=manifest_grace,
            reuse_sources=(
                configured_sources(settings.reuse_sources, settings.installer)
                if settings.reuse
                else ()
            ),
        )


def side_rejections(lane: Counter[str] | None, index: Counter[str] | None) -> Counter[str]:
    """The delta lane's and the index group's rejections for the summary, each reason named
    after its group (``lane:bad-toi``, ``index:other-session``) beside the carousel's."""
    merged: Counter[str] = Counter()
    for name, counts in (("lane", lane), ("index", index)):
        for reason, count in (counts or {}).items():
            if count:
                merged[f"{name}:{reason}"] += count
    return merged


def lane_joins(
    memberships: Sequence[tuple[str, str | None]],
    channel: str,
    scope: str,
    rate_index: int = addressing.LANE_RATE_INDEX,
) -> list[Join] | None:
    """The delta lane's memberships (or another side session's, on rate index `rate_index`) for
    the main ones: the channel's SSM group becomes the lane's SSM group (same sources), its ASM
    group the lane's ASM group (`serve` sends the lane on the groups of the kind the main channel
    uses, `addressing.LANE_RATE_INDEX`); None when a membership is of another group
    (``--group``: no lane group derives from it)."""
    ssm, asm = addressing.ssm_group(channel, scope), addressing.asm_group(channel, scope)
    found = []
    for group, source in memberships:
        if group == ssm:
            found.append(Join(addressing.ssm_group(channel, scope, rate_index), source))
        elif group == asm and source is None:
            found.append(Join(addressing.asm_group(channel, scope, rate_index)))
        else:
            return None
    return found


def _lane_start(options: FetchOptions, plan: JoinPlan) -> tuple[list[Join], bool] | None:
    """Whether the run starts on the delta lane's groups: (their joins, whether the manifest is
    still to be heard there) or None (the carousel, as without a lane).  With a given manifest
    the decision is `lane_choice`'s; without one a device that could take a lane (a recorded
    installed release, reuse sources, the symbol store) listens there first, for
    ``LANE_PROBE_SECONDS`` at most.  Zero-config following (`JoinPlan.follow`) starts on the
    carousel's announcements as before."""
    if not options.lane or not options.reuse_sources or options.symbols != "store":
        return None
    if options.installed_sequence is None or plan.follow is not None:
        return None
    given = options.manifest.manifest if options.manifest is not None else None
    transport = given.transport if given is not None else None
    channel = transport.channel if transport is not None else options.channel
    scope = transport.scope if transport is not None else options.scope
    if channel is None:
        return None
    joins = lane_joins(plan.memberships, channel, scope)
    if joins is None:
        return None
    if given is not None:
        choice = lane_choice(
            given,
            options.installed_sequence,
            read_installed_index(options.state_dir),
            readable_sources(options.reuse_sources),
        )
        return (joins, False) if isinstance(choice, LaneChoice) else None
    return joins, True


class _Writer(threading.Thread):
    """Persists verified chunks off the receive loop.

    Writing and syncing a 4 MiB chunk takes tens of milliseconds; done inline, the socket buffer
    overflowed and the lost symbols cost whole extra passes.  The queue is bounded, so at most
    ``WRITE_QUEUE`` chunks wait in memory; a write error is kept and re-raised by the loop.
    """

    def __init__(self, staging: Staging) -> None:
        super().__init__(name="otacast-writer", daemon=True)
        self.staging = staging
        self.queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(WRITE_QUEUE)
        self.error: StateError | None = None

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.staging.write_chunk(*item)
                except StateError as exc:
                    self.error = exc

    def put(self, index: int, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((index, data))

    def flush(self) -> None:
        """Wait for every queued chunk to be on disk; raise the first write error."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def fetch(options: FetchOptions, out: TextIO) -> FetchSummary:
    """Receive one release into ``options.out``, reporting on `out`; raise an `OtacastError`
    when it cannot be done (what is verified stays in the state directory for the next run)."""
    emit = Reporter(out, options.json)
    if options.fallback == "only" and options.manifest is None:
        raise UsageError("--fallback only needs --manifest (the mirrors are listed in it)")
    given = options.manifest
    if options.packet_auth == "require" and given is not None and not given.manifest.stream_keys:
        raise UsageError(
            f"{given.manifest.name} {given.manifest.version} lists no stream keys and "
            "packet_auth is require"
        )
    receiver: MulticastReceiver | None = None
    plan: JoinPlan | None = None
    joins: list[Join] = []
    lane: tuple[list[Join], bool] | None = None  # the run starts on the delta lane (_lane_start)
    if options.fallback != "only":
        if options.interface is None:
            raise UsageError("--interface is needed to receive multicast")
        plan = plan_joins(
            options.manifest.manifest.transport if options.manifest else None,
            channel=options.channel,
            scope=options.scope,
            port=options.port,
            group=options.group,
            sources=tuple(options.sources),
            resolver=options.resolver,
        )
        if plan.note:
            emit.note(plan.note)
        joins = [Join(group, source) for group, source in plan.memberships]
        lane = _lane_start(options, plan)
        if lane is not None:
            emit.note(
                "delta lane: listening on its group first "
                + ("for the manifest" if lane[1] else "(the given manifest has a lane for us)")
            )
            receiver = MulticastReceiver(options.interface, plan.port, lane[0])
        else:
            receiver = MulticastReceiver(options.interface, plan.port, joins)
    start = time.monotonic()
    run: _Run  # the core's decoders are the run's, which needs the core: bound just below

    def decoder(chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
        return run.decoder(chunk, length, symbol_size)

    stored = options.symbols == "store"
    core = ReceiverCore(
        options.trust,
        now=start,
        decoder_factory=decoder if stored else raptorq_decoder,
        decoder_budget=UNBOUNDED_DECODERS if stored else MAX_DECODER_BYTES,
        device_type=options.device_type,
        channel=options.channel,
        installed_sequence=options.installed_sequence,
        manifest=options.manifest,
        join_timeout=options.join_timeout,
        stall_timeout=options.stall_timeout,
        packet_auth=options.packet_auth,
        manifest_grace=options.manifest_grace,
        report_sources=plan is not None and plan.follow is not None,
        # (local reuse takes the index from the carousel unless given one with --block-index)
        want_index=options.want_index or (bool(options.reuse_sources) and not options.block_index),
    )
    run = _Run(options, core, receiver, emit, start, plan, joins)
    if receiver is not None and lane is not None:
        run.start_on_lane(receiver, lane[0], probing=lane[1])
    try:
        run.loop()
    except NoManifestError as exc:
        exc.rejected = dict(core.snapshot().rejected)
        raise
    finally:
        run.close()
    end = time.monotonic()
    snap = core.snapshot()
    summary = FetchSummary.from_snapshot(
        snap,
        elapsed=end - start,
        receiving=end - (snap.first_datagram_at or start),
        bytes_http=run.bytes_http,
        bytes_resumed=run.bytes_resumed,
        bytes_local=run.bytes_local,
        local_in_multicast=run.local_in_multicast,
        multicast_in_http=run.multicast_in_http,
        joins=[f"({j.source or '*'}, {j.group})" for j in run.joins],
        reads=run.reads,
    )
    if run.http_refetched:
        summary = replace(summary, http_refetched=run.http_refetched)
    if run.lane_from is not None:
        summary = replace(
            summary,
            lane_from=run.lane_from,
            bytes_lane=run.bytes_lane,
            datagrams_lane=run.datagrams_lane,
            lane_index=run.lane_index,
        )
    if run.index_core is not None:
        summary = replace(summary, datagrams_index=run.index_core.datagrams)
    if run.left_for_decodes:
        summary = replace(summary, left_for_decodes=run.left_for_decodes)
    if run.decodes_in_worker or run.worker_rss is not None:
        summary = replace(
            summary, decodes_in_worker=run.decodes_in_worker, worker_peak_rss_mb=run.worker_rss
        )
    side = side_rejections(
        None if run.lane_core is None else run.lane_core.rejected,
        None if run.index_core is None else run.index_core.rejected,
    )
    if side:
        summary = replace(summary, rejected=dict(Counter(summary.rejected) + side))
    emit.summary(summary)
    return summary


class _Run:
    """One download: the loop and the state it carries between turns (all times monotonic)."""

    def __init__(
        self,
        options: FetchOptions,
        core: ReceiverCore,
        receiver: MulticastReceiver | None,
        emit: Reporter,
        start: float,
        plan: JoinPlan | None = None,
        joins: list[Join] | None = None,
    ) -> None:
        self.options = options
        self.core = core
        self.receiver = receiver
        self.plan = plan
        self.joins = joins if joins is not None else []  # the followed sources' are added
        # The planned socket, and the one following announced senders once one is heard.
        self.receivers = [receiver] if receiver is not None else []
        self.follower: MulticastReceiver | None = None
        self.emit = emit
        self.start = start
        self.staging: Staging | None = None
        self.stored: StoredSymbols | None = None  # with --symbols store
        # Symbols the store held from an earlier run when it was opened: the early datagrams
        # replayed at the manifest's adoption may be stored before `_open_staging` reports.
        self.symbols_resumed = 0
        self.writer: _Writer | None = None
        self.repair: RepairWorker | None = None
        self.bytes_http = 0  # fetched (a partly held chunk's ranges, not the whole chunk)
        # Partly held chunks that failed their hash once their fetched ranges were in place.
        self.http_refetched = 0
        # Of chunks completed from fetched ranges (`_take_ranged`), the held bytes that came
        # from multicast in this run (the summary's multicast bytes: the core did not count
        # them), and per chunk the source bytes the store held when opened (resumed ones).
        self.multicast_in_http = 0
        self._held_at_open: dict[int, int] = {}
        self.bytes_resumed = 0
        # Local reuse: the worker while it runs, the image bytes taken from local sources, and
        # of those the ones in chunks the core completed (it counts them as multicast bytes).
        self.reuse: ReuseWorker | None = None
        self.bytes_local = 0
        self.local_in_multicast = 0
        self._fallback_waiting: str | None = None  # HTTP repair waits for the local pass
        self.finished = False
        # With `--index`: the image is complete and the index still awaited until then.
        self.index_wait_until: float | None = None
        self._truncated = 0  # datagrams the transport dropped as too long, already counted
        self._next_status = 0.0
        self._next_flush = 0.0
        # The delta lane (`otacast.plugin.lane`): its socket while joined, the carousel's joins
        # not made yet (None: made), its core once taken, what it brought (the summary's).
        self.lane_socket: MulticastReceiver | None = None
        self.main_pending: list[Join] | None = None
        self.lane_early: EarlyLane | None = None  # before the decision
        self.lane_probe_until: float | None = None
        self.lane_core: LaneCore | None = None
        self.lane_from: int | None = None
        self.lane_index: str | None = None
        self.bytes_lane = 0
        self.datagrams_lane = 0
        self._lane_index_given = False
        self._lane_object_given = False
        self._retired_reads = 0
        # Zero-config following on the lane: the lane's SSM group, joined for each source heard.
        self.lane_follow: str | None = None
        # The index group (`otacast.plugin.lane`, *The index group*): its socket while joined,
        # until when its first datagram is awaited, its core once joined.
        self.index_socket: MulticastReceiver | None = None
        self.index_probe_until: float | None = None
        self.index_core: IndexGroupCore | None = None
        self.index_left = False  # left it: never joined again in this run
        # The decode worker (`otacast.plugin.decode_worker`), while the store uses it: its
        # answers' pipe is waited on with the sockets; what it did, for the summary.
        self.worker: DecodeWorker | None = None
        # How often the carousel's groups were left while only decodes were left
        # (`_leave_groups`).
        self.left_for_decodes = 0
        self._rejoin_failed = False
        self._spill_noted = False  # the note that the state directory filled up, once
        self.decodes_in_worker = 0
        self.worker_rss: float | None = None

    @property
    def reads(self) -> int:
        """Socket reads made, on every socket this run had."""
        return self._retired_reads + sum(r.reads for r in self.receivers)

    def start_on_lane(
        self, receiver: MulticastReceiver, joins: list[Join], *, probing: bool
    ) -> None:
        """The run starts on the delta lane's groups (`_lane_start`); the carousel's joins wait
        until the lane is not taken, not enough, or (`probing`) no manifest came there."""
        self.lane_socket = receiver
        self.main_pending, self.joins = list(self.joins), list(joins)
        self.lane_early = EarlyLane()
        if probing:
            wait = min(LANE_PROBE_SECONDS, self.options.join_timeout / 2)
            self.lane_probe_until = self.start + wait

    def loop(self) -> None:
        self._handle_events()
        while not self.finished:
            now = time.monotonic()
            timer = self.core.get_timer()
            wait = POLL_INTERVAL if timer is None else max(0.0, min(POLL_INTERVAL, timer - now))
            if self.stored is not None and self.stored.queued:
                wait = 0.0  # a decode is due on this loop (`_take_decoded`)
            if self.receivers:
                waited: list[MulticastReceiver | DecodeWorker] = [*self.receivers]
                if self.core.only_decodes_left:
                    # Nothing that arrives can help until a decode ends: not read, and not
                    # even received (`_leave_groups`), for the decodes' CPU.
                    waited.clear()
                    self._leave_groups()
                elif any(r.left for r in self.receivers):
                    self._rejoin_groups()  # a decode failed: its chunk needs symbols again
                if self.worker is not None:
                    waited.append(self.worker)  # (its answers are taken below)
                if waited:
                    readable, _, _ = select.select(waited, [], [], wait)
                    for receiver in readable:
                        if isinstance(receiver, MulticastReceiver):
                            self._drain(receiver)
                else:
                    time.sleep(wait)  # (0 while decodes are queued: never a busy loop)
            else:
                time.sleep(wait)
            if self._take_decoded():
                break  # the image is complete
            now = time.monotonic()
            if self.lane_probe_until is not None and now >= self.lane_probe_until:
                self.lane_probe_until = None
                if self.core.verified is None:
                    self._switch_to_main("no manifest on the delta lane's group")
            if self.index_probe_until is not None and now >= self.index_probe_until:
                self._index_group_silent()
            if self.index_wait_until is not None and now >= self.index_wait_until:
                self.emit.note(
                    f"the block index did not arrive within {INDEX_AFTER_IMAGE_SECONDS:g} s of "
                    "the image: finishing without it"
                )
                self._finish()
                break
            self.core.handle_timer(now)
            self._take_http_results()
            self._take_local()
            self._handle_events()
            now = time.monotonic()
            # (before a manifest only the bar has something to show: the wait)
            if self.emit.due(now, waiting=self.core.verified is None):
                self.emit.progress(self.core.snapshot(), now, now - self.start, self.bytes_http)
            self._report_status(now)
            if self.stored is not None:
                if now >= self._next_flush:
                    self._next_flush = now + FLUSH_INTERVAL
                    self.stored.start_flush()
                else:
                    self.stored.flush_if_wanted()  # a kept chunk is durable one sync later
                if self.stored.store.spill_capped and not self._spill_noted:
                    self._spill_noted = True
                    self.emit.note(
                        f"the file system of {self.options.state_dir} is full: repair symbols "
                        "beyond what its spill holds are dropped (the download goes on, slower)"
                    )
            self._check_gave_up()

    def _carousel_sockets(self) -> list[MulticastReceiver]:
        # Not the lane's or the index group's: what they carry is not the chunks being
        # decoded (the index arrives on its own, and may still be awaited after the image).
        return [
            r for r in self.receivers if r is not self.lane_socket and r is not self.index_socket
        ]

    def _leave_groups(self) -> None:
        """Leave the carousel's groups while every chunk left waits for its decode.  The
        sockets stay, with their joins: only the memberships go, so the device's NIC, kernel
        (and an MLD snooping switch) stop handling a carousel that a decode tail of seconds
        (minutes for gigabytes on a slow CPU) could not use; on one core that handling would
        take its share of the CPU the decodes need."""
        left = False
        for receiver in self._carousel_sockets():
            if receiver.left:
                continue
            # A join that cannot be dropped stays held: its datagrams wait in its queue,
            # unread, as before; the dropped ones are taken back by `_rejoin_groups`.
            with contextlib.suppress(NetworkError):
                receiver.leave()
            left = left or receiver.left
        if left:
            self.left_for_decodes += 1

    def _rejoin_groups(self) -> None:
        for receiver in self._carousel_sockets():
            try:
                receiver.rejoin()
            except NetworkError as exc:
                if not self._rejoin_failed:
                    self._rejoin_failed = True
                    self.emit.note(f"{exc}: trying again")

    def _report_status(self, now: float) -> None:
        status = self.options.status
        if status is None or self.core.verified is None or now < self._next_status:
            return
        self._next_status = now + STATUS_INTERVAL
        snap = self.core.snapshot()
        assert snap.manifest is not None
        m = snap.manifest.manifest
        status.post(
            activity="downloading",
            release=f"{m.name} {m.version}",
            sequence=m.sequence,
            bytes_done=snap.bytes_gathered,  # moves with each useful symbol (core, *Reporting*)
            bytes_total=snap.bytes_total,
            bytes_http=self.bytes_http,
        )

    def _drain(self, receiver: MulticastReceiver) -> None:
        if receiver is self.lane_socket:
            self._drain_lane(receiver)
            return
        if receiver is self.index_socket:
            self._drain_index(receiver)
            return
        # One reading of each clock per burst: a burst takes milliseconds, and only a manifest
        # completed in it is checked against the wall time (its expiry).
        now, wall = time.monotonic(), time.time()
        receive, core = self.core.receive_datagrams, self.core
        # A read holds one datagram, or up to 64 with GRO (transport module doc): a burst stops
        # at the first read that reaches MAX_BURST, so it may exceed it by one read's worth,
        # and after a read that completed a chunk (its bytes wait in the event for the loop:
        # several chunks' worth must not pile up in memory).
        left = MAX_BURST
        while left > 0:
            got = receiver.recv_batch()
            if got is None:
                break
            datagrams, source = got
            left -= len(datagrams) or 1  # a read of only truncated datagrams counts too
            # The views point into the transport's buffer: the core copies what it keeps.
            receive(datagrams, source, now, wall=wall, coalesced=receiver.coalesced)
            if core.has_events:
                break
        # A datagram longer than the buffer never reaches the core: the transport drops it and
        # counts it.  It is a hostile datagram like any other, so it is counted with them.
        dropped = sum(r.truncated for r in self.receivers) - self._truncated
        if dropped:
            self.core.count_rejected("oversized", dropped)
            self._truncated += dropped

    def _take_decoded(self) -> bool:
        """Hand the core each decode the worker finished (one chunk's bytes at a time) and
        the lowest queued chunk's decode on this loop (`StoredSymbols.decoded`: one per turn,
        so that the sockets are read between two); say once if the worker failed (its decodes
        are then done here).  Whether the run finished (the last chunk was among them)."""
        stored, worker = self.stored, self.worker
        if stored is None:
            return False
        for chunk, data, fault in stored.decoded():
            self.core.chunk_decoded(chunk, data, time.monotonic(), fault=fault)
            del data
            self._handle_events()
            if self.finished:
                return True
        if worker is None:
            return False
        self.decodes_in_worker = worker.decodes
        if stored.failed is not None:
            self.worker = None
            self.emit.note(f"decode worker stopped ({stored.failed}): decoding on the receive loop")
        else:
            stored.pump()
        return False

    def _drain_side(
        self, receiver: MulticastReceiver, take: Callable[[bytes | memoryview], bool]
    ) -> bool:
        """Read a side session's socket (the lane's, the index group's): its DATA datagrams go
        to `take` (which says whether one completed something), the rest (the release's
        MANIFEST datagrams, the session's FDT) to the core; whether anything completed."""
        now, wall = time.monotonic(), time.time()
        changed, left = False, MAX_BURST
        while left > 0:
            got = receiver.recv_batch()
            if got is None:
                break
            datagrams, source = got
            left -= len(datagrams) or 1
            other = []
            for data in datagrams:
                if wire.peek_data(data) is None:
                    other.append(data)
                else:
                    changed = take(data) or changed
            if other:
                self.core.receive_datagrams(other, source, now, wall=wall)
            if changed or self.core.has_events:
                break
        dropped = sum(r.truncated for r in self.receivers) - self._truncated
        if dropped:
            self.core.count_rejected("oversized", dropped)
            self._truncated += dropped
        return changed

    def _drain_lane(self, receiver: MulticastReceiver) -> None:
        """Read the lane socket: its DATA datagrams go to the lane core (held until the
        decision)."""
        lane = self.lane_core
        before = lane.symbols if lane is not None else 0

        def take(data: bytes | memoryview) -> bool:
            self.datagrams_lane += 1
            if lane is not None:
                return lane.receive(data)
            if self.lane_early is not None:
                self.lane_early.hold(data)
            return False

        changed = self._drain_side(receiver, take)
        if lane is not None:
            self.bytes_lane = lane.bytes
            if lane.symbols > before:
                self.core.note_progress(time.monotonic())  # the lane's objects advance it
            if changed:
                self._lane_progress()

    def _drain_index(self, receiver: MulticastReceiver) -> None:
        """Read the index group's socket: its DATA datagrams go to the index group's core."""
        group = self.index_core
        assert group is not None  # the socket is opened with the core
        before = group.symbols
        self.index_probe_until = None  # the group is served
        if self._drain_side(receiver, group.receive) and group.index is not None:
            self._index_arrived(group.index)
        elif group.symbols > before:
            self.core.note_progress(time.monotonic())

    def _want_index_group(self, m: Manifest) -> None:
        """The block index is wanted whole: join the index group (`m`'s) on the groups derived
        from the carousel's memberships, joined or waiting (SSM: the same sources); following
        announced senders, for each sender heard (`_index_follow`)."""
        if self.index_core is not None or self.plan is None or self.options.interface is None:
            return
        try:
            self.index_core = IndexGroupCore(m)
        except ValueError:  # no index, or one over MAX_INDEX_BYTES: the carousel's or none
            return
        follow = self.plan.follow
        candidates = self.joins + (self.main_pending or [])
        channel, scope = m.transport.channel, m.transport.scope
        main = (addressing.ssm_group(channel, scope), addressing.asm_group(channel, scope))
        memberships = list(
            dict.fromkeys(
                (j.group, j.source)
                for j in candidates
                if j.group in main and (follow is None or j.group == follow)
            )
        )
        self._join_index_group(memberships)

    def _index_follow(self, source: str) -> None:
        """A sender heard while the index is wanted: join it on the index group too."""
        if self.plan is not None and self.plan.follow is not None:
            self._join_index_group([(self.plan.follow, source)])

    def _join_index_group(self, memberships: Sequence[tuple[str, str | None]]) -> None:
        """Join the index group's groups for these carousel memberships (the ones not held)."""
        group = self.index_core
        if group is None or self.index_left or not memberships:
            return
        assert self.options.interface is not None and self.plan is not None
        transport = group.manifest.transport
        derived = lane_joins(
            memberships, transport.channel, transport.scope, addressing.INDEX_RATE_INDEX
        )
        socket = self.index_socket
        try:
            for join in derived or []:
                if join in self.joins:
                    continue
                if socket is None:
                    socket = self.index_socket = MulticastReceiver(
                        self.options.interface, self.plan.port, [join]
                    )
                    self.receivers.append(socket)
                    self.index_probe_until = time.monotonic() + INDEX_PROBE_SECONDS
                else:
                    socket.add_join(join)
                self.joins.append(join)
                self.emit.note(f"index group: joining ({join.source or '*'}, {join.group})")
        except NetworkError as exc:
            self.emit.note(f"cannot join the index group: {exc}")

    def _leave_index_group(self) -> None:
        """Leave the index group for good (the index is here, or the group is silent)."""
        socket, self.index_socket = self.index_socket, None
        self.index_probe_until = None
        self.index_left = self.index_core is not None
        if socket is not None:
            self._retire(socket)

    def _retire(self, socket: MulticastReceiver) -> None:
        """Close a socket the run no longer reads (its reads and truncations stay counted)."""
        self._retired_reads += socket.reads
        self._truncated -= socket.truncated
        self.receivers.remove(socket)
        socket.close()

    def _index_group_silent(self) -> None:
        """Nothing came on the index group: leave it; a lane device that needs the index takes
        the carousel, which carries it too."""
        self.index_probe_until = None
        self._leave_index_group()
        self.emit.note("index group: nothing received there, leaving it")
        if self.lane_core is not None and self.lane_core.needs_index:
            self._switch_to_main("no block index on the index group")

    def _index_arrived(self, index: BlockIndex) -> None:
        """The full index is verified (the index group's or the carousel's): leave the group and
        hand it on, to the lane core when it needs one, else to the local pass."""
        self._leave_index_group()
        lane = self.lane_core
        if lane is not None and lane.needs_index:
            lane.take_index(index)
            self._lane_progress()
        elif self.reuse is not None:
            self.reuse.offer_index(index)

    def _decide_lane(self, verified: VerifiedManifest) -> None:
        """The manifest is verified and the run is on the lane: take it, or join the carousel.
        When following announced senders (zero-config), the lane's group is what the senders
        heard are joined on, if the lane is taken."""
        m = verified.manifest
        if self.lane_early is None:
            self._decide_lane_follow(m)
            return
        early, self.lane_early = self.lane_early, None
        self.lane_probe_until = None
        choice = lane_choice(
            m,
            self.options.installed_sequence,
            read_installed_index(self.options.state_dir),
            readable_sources(self.options.reuse_sources),
        )
        self.emit.note(lane_note(choice))
        if not isinstance(choice, LaneChoice):
            self._switch_to_main("the delta lane is not for this device")
            return
        lane = self.lane_core = LaneCore(m, choice, assemble=self._lane_assembly)
        self.lane_from = choice.source.sequence
        for data in early.take():
            lane.receive(data)
        self.bytes_lane = lane.bytes

    def _lane_assembly(self, part: Part, sha256: bytes, symbol_size: int) -> LaneAssembly:
        """The lane object is put together on disk (`object_file`): memory stays at one
        block's decode whatever its length."""
        path = self.options.state_dir / LANE_OBJECT_FILE
        return FileAssembly(part, sha256, symbol_size, path, name="lane")

    def _decide_lane_follow(self, m: Manifest) -> None:
        options, plan = self.options, self.plan
        if plan is None or plan.follow is None or self.receiver is None or m.delta is None:
            return
        if not options.lane or not options.reuse_sources or options.symbols != "store":
            return
        transport = m.transport
        joins = lane_joins([(plan.follow, "::")], transport.channel, transport.scope)
        if joins is None:
            return
        choice = lane_choice(
            m,
            options.installed_sequence,
            read_installed_index(options.state_dir),
            readable_sources(options.reuse_sources),
        )
        self.emit.note(lane_note(choice))
        if not isinstance(choice, LaneChoice):
            return
        self.lane_core = LaneCore(m, choice, assemble=self._lane_assembly)
        self.lane_from = choice.source.sequence
        self.lane_follow = joins[0].group
        self.main_pending = []  # the senders heard, joined on the carousel if it comes to that

    def _lane_progress(self) -> None:
        """Hand what the lane brought to the local pass; leave the lane once it is all here."""
        lane = self.lane_core
        if lane is None:
            return
        reuse = self.reuse
        if reuse is None:  # nothing to place lane blocks into (every chunk resumed)
            self._switch_to_main("the local pass is not running")
            return
        if lane.needs_index and self.lane_socket is not None:
            self._want_index_group(lane.manifest)
        if lane.index is not None and not self._lane_index_given:
            self._lane_index_given = True
            self.lane_index = "patch" if lane.index_from_patch else "full"
            how = (
                f"from the patch for release {lane.choice.source.sequence}"
                if lane.index_from_patch
                else "received whole"
            )
            self.emit.note(f"delta lane: block index {how}, verified")
            reuse.offer_index(lane.index)
        if (lane.lane_object is not None or lane.failed) and not self._lane_object_given:
            self._lane_object_given = True
            if lane.failed:
                self.emit.note(f"delta lane: its object is unusable ({lane.failed})")
            else:
                delta = lane.manifest.delta
                length = delta.length if delta is not None else 0
                self.emit.note(f"delta lane: object of {length} bytes verified")
            reuse.offer_lane(lane.lane_object)
        if lane.done:
            self._leave_lane()

    def _leave_lane(self) -> None:
        socket = self.lane_socket
        if socket is None:
            return
        self.lane_socket = None
        self._retire(socket)
        if self.lane_core is not None:
            self.bytes_lane = self.lane_core.bytes

    def _switch_to_main(self, reason: str) -> bool:
        """Join the carousel's groups (once), leaving the lane; whether it was joined now."""
        joins, self.main_pending = self.main_pending, None
        if joins is None:
            return False
        self.lane_early = None
        self.lane_follow = None
        self._leave_lane()
        if self.reuse is not None and not self._lane_object_given:
            self._lane_object_given = True
            self.reuse.offer_lane(None)
        assert self.options.interface is not None and self.plan is not None
        if joins:
            receiver = MulticastReceiver(self.options.interface, self.plan.port, joins)
            self.receivers.append(receiver)
            if self.plan.follow is not None:
                self.follower = receiver  # the senders heard later are joined on it
            else:
                self.receiver = receiver
            self.joins.extend(joins)
        self.core.rearm_fallback(time.monotonic())
        self.emit.note(f"joining the carousel: {reason}")
        return True

    def _handle_events(self) -> None:
        while (event := self.core.next_event()) is not None:
            if isinstance(event, ManifestVerified):
                self._open_staging(event.verified)
            elif isinstance(event, ChunkComplete):
                self._keep(event.index, event.data)
                if self.stored is not None:
                    local = self.stored.local_bytes.pop(event.index, 0)
                    self.bytes_local += local
                    self.local_in_multicast += local
                if self.repair is not None:
                    self.repair.done_elsewhere.add(event.index)
                if self.reuse is not None:
                    self.reuse.done_elsewhere.add(event.index)
            elif isinstance(event, ManifestRefused):
                self.emit.note(refusal_note(event, self.options.installed_sequence))
            elif isinstance(event, SourceHeard):
                self._follow(event.source)
            elif isinstance(event, FallbackNeeded):
                self._fall_back(event.reason)
            elif isinstance(event, IndexReady):
                self._index_arrived(event.index)
                if self.index_wait_until is not None:
                    self._finish()  # the image was complete already
            elif isinstance(event, ImageComplete):
                if self._index_still_wanted():
                    self.index_wait_until = time.monotonic() + INDEX_AFTER_IMAGE_SECONDS
                else:
                    self._finish()

    def _index_still_wanted(self) -> bool:
        """Whether `fetch --index` asked for a block index the manifest lists and that has not
        arrived yet (it is not needed for the image: only asked for)."""
        verified = self.core.verified
        return (
            self.options.want_index
            and verified is not None
            and verified.manifest.index is not None
            and self.core.stats.index_bytes == 0
        )

    def _follow(self, source: str) -> None:
        """Join `source` on the SSM group it announced the release for (module doc)."""
        group = self.plan.follow if self.plan is not None else None
        if group is None or self.receiver is None:
            return
        join = Join(group, source.partition("%")[0])  # the interface is the receiver's
        if self.lane_follow is not None and self.main_pending is not None:
            self._follow_on_lane(join)
            return
        try:
            if self.follower is None:
                self.follower = MulticastReceiver(
                    self.receiver.interface, self.receiver.port, [join]
                )
                self.receivers.append(self.follower)
            else:
                self.follower.add_join(join)
        except NetworkError as exc:  # a forged source, say: the others still count
            self.emit.note(f"cannot follow sender {source}: {exc}")
            return
        self.joins.append(join)
        self.emit.note(f"sender {source} announces the release: joining ({join.source}, {group})")
        self._index_follow(join.source or "")

    def _follow_on_lane(self, main: Join) -> None:
        """Join `main`'s source on the lane's SSM group instead (the carousel's join waits)."""
        assert self.lane_follow is not None and self.main_pending is not None
        assert self.receiver is not None
        if self.lane_core is None or self.lane_core.done:
            self.main_pending.append(main)  # the lane is behind us: the carousel may come next
            return
        join = Join(self.lane_follow, main.source)
        try:
            if self.lane_socket is None:
                self.lane_socket = MulticastReceiver(
                    self.receiver.interface, self.receiver.port, [join]
                )
                self.receivers.append(self.lane_socket)
            else:
                self.lane_socket.add_join(join)
        except NetworkError as exc:
            self.emit.note(f"cannot follow sender {main.source} on the delta lane: {exc}")
            return
        self.main_pending.append(main)
        self.joins.append(join)
        self.emit.note(
            f"sender {main.source} announces the release: joining ({join.source}, "
            f"{join.group}), its delta lane"
        )
        if self.lane_core.needs_index:
            self._want_index_group(self.lane_core.manifest)
            self._index_follow(main.source or "")

    def decoder(self, chunk: int, length: int, symbol_size: int) -> ChunkDecoder:
        """The core's decoder for `chunk`: the store's (module doc)."""
        assert self.core.verified is not None  # the core opens decoders only for its session
        return self._stored(self.core.verified).decoder(chunk, length, symbol_size)

    def _stored(self, verified: VerifiedManifest) -> StoredSymbols:
        """The session's staging and symbol store, opened on first use (either way)."""
        if self.stored is None:
            self.stored = StoredSymbols(self.options.state_dir, verified)
            self.stored.queue_decodes()
            self.staging = self.stored.staging
            self._start_worker(verified)
            self.symbols_resumed = self.stored.held()
            if self.symbols_resumed:
                self._held_at_open = self._source_bytes_held(verified)
        return self.stored

    def _start_worker(self, verified: VerifiedManifest) -> None:
        """Start the decode worker for the store (``decode = "worker"``, module doc), unless no
        chunk is left to decode."""
        stored = self.stored
        m = verified.manifest
        if (
            not self.options.decode_worker
            or stored is None
            or len(stored.store.done) == m.chunk_count
        ):
            return
        try:
            worker = DecodeWorker(
                stored.staging.part, stored.store.spill_path, m.chunks.size, MAX_DECODES_IN_FLIGHT
            )
        except OSError as exc:
            self.emit.note(f"decode worker not started ({exc.strerror or exc}): decoding here")
            return
        stored.use_worker(worker)
        self.worker = worker

    def _source_bytes_held(self, verified: VerifiedManifest) -> dict[int, int]:
        """Per chunk in progress, the bytes of the source symbols the store holds."""
        assert self.stored is not None
        m, store = verified.manifest, self.stored.store
        size, held = m.fec.symbol_size, {}
        for index in range(m.chunk_count):
            if store.count(index):
                length = m.chunk_span(index)[1]
                runs = store.source_runs(index)
                held[index] = sum(min(end * size, length) - first * size for first, end in runs)
        return held

    def _open_staging(self, verified: VerifiedManifest) -> None:
        m = verified.manifest
        self.emit.note(
            f"manifest verified: {m.name} version {m.version} sequence {m.sequence}, "
            f"{m.image.length} bytes in {m.chunk_count} chunks"
        )
        if self.options.symbols == "store":
            done = self._stored(verified).store.done
        else:
            self.staging = Staging(self.options.state_dir, verified)
            self.writer = _Writer(self.staging)
            self.writer.start()
            done = frozenset(self.staging.resume())
        now = time.monotonic()
        for index in sorted(done):
            if index not in self.core.done:
                self.core.mark_done(index, now)
                self.bytes_resumed += m.chunk_span(index)[1]
        if self.bytes_resumed:
            self.emit.note(f"resumed {self.bytes_resumed} verified bytes from the state directory")
        if self.symbols_resumed:
            self.emit.note(
                f"resumed {self.symbols_resumed} stored symbols of chunks still in progress"
            )
        self._decide_lane(verified)
        self._start_reuse(verified)
        if self.lane_core is not None:
            self._lane_progress()  # (held datagrams may have completed an object already)
        if self.options.fallback == "only":
            self._fall_back("only")

    def _start_reuse(self, verified: VerifiedManifest) -> None:
        """Start the local pass (`otacast.plugin.reuse`) when sources are configured and the
        image is a raw one (a container's compressed payload matches no local block)."""
        m = verified.manifest
        sources = self.options.reuse_sources
        if not sources or self.reuse is not None or len(self.core.done) == m.chunk_count:
            return
        if m.image.format != "raw":
            self.emit.note(f"local reuse: not for a {m.image.format!r} image (raw images only)")
            return
        if self.options.symbols != "store":
            self.emit.note("local reuse: needs the symbol store (--symbols store)")
            return
        index_file, timeout = self.options.block_index, self.options.http_timeout
        if index_file is None and m.index is None:
            # Nothing binds an index to this release: said only for sources configured on
            # purpose (every file installer names its target).
            if any(s.why == CONFIGURED for s in sources):
                self.emit.note("local reuse: this release signs no block index (full download)")
            return
        # The index: a file given with --block-index; else the carousel's (the core's
        # IndexReady hands it to the worker), or, with no multicast to bring it, the mirrors'.
        get_index = None
        if index_file is not None or self.receiver is None:
            get_index = lambda: index_for(m, index_file=index_file, timeout=timeout)  # noqa: E731
        lane_file = self.options.state_dir / LANE_FILE if self.lane_core is not None else None
        self.reuse = ReuseWorker(m, sources, get_index, lane_file)
        self.reuse.done_elsewhere.update(self.core.done)
        self.reuse.start()
        if get_index is None and self.lane_core is None and readable_sources(sources):
            # The carousel's in-band index comes late in a pass: the index group brings it early.
            self._want_index_group(m)

    def _take_local(self) -> None:
        """Take what the local pass found (a few chunks a turn, each at most a chunk's bytes):
        chunks verified whole are kept as HTTP ones are; known symbols of the others go into
        the symbol store, where received ones complete them."""
        reuse = self.reuse
        if reuse is None:
            return
        verified = self.core.verified
        assert verified is not None
        now = time.monotonic()
        for item in drain(reuse, 4):
            if isinstance(item, ReuseNote):
                self.emit.note(item.text)
            elif isinstance(item, ReuseDone):
                self.reuse = None
                if item.chunk_mismatch:
                    self.emit.note(
                        f"local reuse: {len(item.chunk_mismatch)} chunk(s) built from local "
                        "blocks failed their hash and are fetched in full"
                    )
                if item.lane_blocks:
                    self.emit.note(
                        f"delta lane: {item.lane_blocks} blocks of the lane placed beside "
                        f"{item.blocks_found} local ones"
                    )
                if self._fallback_waiting is not None:
                    reason, self._fallback_waiting = self._fallback_waiting, None
                    self._fall_back(reason)
                elif self.main_pending is not None:
                    self._handle_events()  # (chunks completed in this turn count first)
                    if not self.core.complete:
                        missing = verified.manifest.chunk_count - len(self.core.done)
                        self._switch_to_main(f"{missing} chunk(s) still missing after the lane")
                break
            elif isinstance(item, LocalChunk) and item.chunk not in self.core.done:
                self._take_local_chunk(item, verified, now)
            del item  # (a chunk: let go before the next is taken)
        if self.repair is not None:
            self.repair.done_elsewhere.update(self.core.done)
        self._handle_events()

    def _take_local_chunk(self, item: LocalChunk, verified: VerifiedManifest, now: float) -> None:
        index, m = item.chunk, verified.manifest
        stored = self._stored(verified)
        if item.data is not None:
            # Verified against its signed hash by the worker: kept as an HTTP chunk is.
            stored.keep(index, item.data)
            self.bytes_local += len(item.data)
            self.core.mark_done(index, now)
            return
        stored.add_local(index, item.symbols)
        store = stored.store
        if not store.has_all_source(index):
            return  # received symbols complete it (its decoder counts the local ones too)
        # The received source symbols filled the rest: no datagram of it would be admitted
        # any more (each is a duplicate, a repair symbol is not needed), so it is done here.
        data = store.read_chunk(index)
        if hashlib.sha256(data).digest() == m.chunks.sha256[index]:
            self.bytes_local += stored.local_bytes.pop(index, 0)
            stored.keep(index, data)
            self.core.mark_done(index, now)
        else:
            stored.discard(index)
            self.core.restart_chunk(index)
            self.emit.note(f"local reuse: chunk {index} failed its hash: fetched in full")

    def _keep(self, index: int, data: bytes | None) -> None:
        """Keep chunk `index`, verified against its signed hash, in the state directory (no
        `data`: verified where it is, in the symbol store's staged image)."""
        if self.stored is not None:
            self.stored.keep(index, data)
        else:
            assert self.writer is not None and data is not None  # (in-memory decoders' bytes)
            self.writer.put(index, data)

    def _fall_back(self, reason: str) -> None:
        verified = self.core.verified
        if verified is None:
            # Whatever the policy: without a manifest there is nothing to fetch or wait for
            # (`watch` takes this as a quiet channel and joins again, re-reading DNS).  If only
            # refused manifests were heard, the most relevant refusal ends the run with its own
            # error and exit code (`ReceiverCore.refusal`): the network worked, the release did
            # not pass.
            refusal = self.core.refusal
            if refusal is not None:
                raise type(refusal)(
                    f"no acceptable manifest within {self.options.join_timeout:g} s; the "
                    f"channel's was refused: {refusal}",
                    sequence=refusal.sequence,
                )
            old = self.core.stats.rejected.get("old-wire-version", 0)
            if old:
                raise NoManifestError(
                    f"no manifest heard within {self.options.join_timeout:g} s, but {old} "
                    f"datagram(s) of an older otacast: {wire.OLD_WIRE_VERSION_TEXT}"
                )
            raise NoManifestError(
                self.plan.silence(self.options.interface or "?", self.options.join_timeout)
                if self.plan is not None
                else f"no manifest heard within {self.options.join_timeout:g} s"
            )
        if self.main_pending is not None:
            # On the delta lane: the carousel comes next, HTTP only if that stalls too.
            self._switch_to_main(f"the delta lane {reason}")
            return
        if self.options.fallback == "never" or not verified.manifest.http:
            if self.receiver is None:
                raise IncompleteError("--fallback only, but the manifest lists no HTTP mirror")
            self._no_fallback(reason)
            return
        if self.repair is not None:
            return
        if self.reuse is not None:
            # What the local pass completes is never fetched: start once it has handed over
            # (without waiting any longer for an index multicast is not bringing).
            self._fallback_waiting = reason
            self.reuse.no_more_index.set()
            return
        missing = [i for i in range(verified.manifest.chunk_count) if i not in self.core.done]
        from .fetcher import RepairWorker  # (see the import at the top)

        plans = self._range_plans(verified, missing)
        partly = f", {len(plans)} partly held: only their missing ranges" if plans else ""
        self.emit.note(
            f"multicast {reason}: fetching {len(missing)} missing chunk(s) over HTTP{partly}"
        )
        self.repair = RepairWorker(verified, missing, self.options.http_timeout, plans)
        self.repair.start()

    def _range_plans(
        self, verified: VerifiedManifest, missing: list[int]
    ) -> dict[int, tuple[tuple[int, int], ...]]:
        """The byte ranges HTTP repair fetches of each missing chunk whose source symbols are
        partly in the symbol store (local reuse, multicast): those of the symbols it lacks
        (`otacast.plugin.fetcher.plan_ranges`).  Raw images only; a chunk with nothing held,
        or whose plan would be the whole chunk anyway, is fetched whole (verified per mirror)."""
        m = verified.manifest
        if self.stored is None or m.image.format != "raw":
            return {}
        from .fetcher import plan_ranges

        store, plans = self.stored.store, {}
        for index in missing:
            runs = store.source_runs(index)
            if not runs:
                continue
            length = m.chunk_span(index)[1]
            plan = plan_ranges(length, m.fec.symbol_size, runs)
            if plan and plan != ((0, length),):
                plans[index] = plan
        return plans

    def _no_fallback(self, reason: str) -> None:
        """Multicast brings nothing and there is no HTTP to fall back on: listen on, or, with
        `give_up_without_fallback`, end the run saying what to do."""
        never = self.options.fallback == "never"
        why = "HTTP fallback is disabled" if never else "the manifest lists no HTTP mirror"
        if not self.options.give_up_without_fallback:
            self.emit.note(f"multicast {reason}; {why}, still listening")
            return
        if reason == "stalled":
            heard = f"multicast stalled for {self.options.stall_timeout:g} s"
        else:
            heard = f"nothing heard on the channel within {self.options.join_timeout:g} s"
        other = "allow it (fallback = auto)" if never else "list one (sign --http-url)"
        raise IncompleteError(
            f"{heard} and {why}: start a sender for this release (check the interface and "
            f"the sources) or {other}"
        )

    def _take_http_results(self) -> None:
        if self.repair is None:
            return
        while True:
            try:
                item = self.repair.results.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self.repair.join()
                continue
            if not isinstance(item, tuple):
                self._take_ranged(item)
                continue
            index, data = item
            if index in self.core.done or (self.stored is None and self.writer is None):
                continue
            self._keep(index, data)
            self.bytes_http += len(data)
            self.core.mark_done(index, time.monotonic())
            self._handle_events()

    def _take_ranged(self, item: RangedChunk) -> None:
        """Put the fetched ranges of a partly held chunk over its held bytes and keep it if the
        whole matches its signed hash.  Otherwise a held symbol or a fetched range lied: the
        chunk's symbols are forgotten and the worker fetches it whole (its answer either way:
        the worker waits for it)."""
        repair, index = self.repair, item.index
        assert repair is not None
        self.bytes_http += item.fetched  # fetched, whatever comes of them
        stored, verified = self.stored, self.core.verified
        if index in self.core.done or stored is None or verified is None:
            repair.verdict(index, True)
            return
        m = verified.manifest
        data = bytearray(stored.store.read_chunk(index))
        for start, piece in item.pieces:
            data[start : start + len(piece)] = piece
        if hashlib.sha256(data).digest() == m.chunks.sha256[index]:
            # The held bytes used, counted where they came from: local blocks, an earlier run
            # (resumed), else multicast in this run (symbol-exact up to re-fetched gaps).
            held = len(data) - item.fetched
            local = min(stored.local_bytes.pop(index, 0), held)
            resumed = min(self._held_at_open.pop(index, 0), held - local)
            self.bytes_local += local
            self.bytes_resumed += resumed
            self.multicast_in_http += held - local - resumed
            stored.keep(index, bytes(data))
            self.core.mark_done(index, time.monotonic())
            repair.verdict(index, True)
        else:
            stored.discard(index)
            self.core.restart_chunk(index)
            self._held_at_open.pop(index, None)
            self.http_refetched += 1
            self.emit.note(
                f"HTTP repair: chunk {index} from its held symbols and {len(item.pieces)} "
                "fetched range(s) failed its hash: its held symbols are forgotten and it is "
                "fetched whole"
            )
            repair.verdict(index, False)
        self._handle_events()

    def _check_gave_up(self) -> None:
        """Give up when HTTP has finished with failures and multicast brings nothing either."""
        repair = self.repair
        if self.finished or repair is None or repair.is_alive() or not repair.failures:
            return
        quiet = time.monotonic() - self.core.last_progress
        if self.receiver is None or quiet >= self.options.stall_timeout:
            self._take_http_results()  # keep every verified chunk for the next run
            raise IncompleteError(
                f"{len(repair.failures)} chunk(s) could not be fetched: {repair.failures[0]}"
            )

    def _finish(self) -> None:
        assert self.staging is not None
        if self.stored is not None:
            self._worker_done()
            self.stored.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer = None
        self.staging.finish(self.options.out)
        self.staging.discard()
        self.staging = None
        self.finished = True

    def _worker_done(self) -> None:
        """Note what the decode worker did (before the store closes it)."""
        if self.worker is not None:
            self.decodes_in_worker = self.worker.decodes
            self.worker_rss = self.worker.peak_rss_mb()
            self.worker = None

    def close(self) -> None:
        self._worker_done()
        if self.repair is not None:
            self.repair.stop.set()
        if self.reuse is not None:
            self.reuse.stop.set()
        for receiver in self.receivers:
            receiver.close()
        if self.lane_core is not None:
            self.lane_core.close()
        for name in (LANE_FILE, LANE_OBJECT_FILE, LANE_OBJECT_FILE + SPOOL_SUFFIX):
            with contextlib.suppress(OSError):
                (self.options.state_dir / name).unlink()
        # Whatever was stored or verified is kept for the next run; a write error that ended
        # this run is already on its way out.
        if self.stored is not None:
            with contextlib.suppress(StateError):
                self.stored.close()
        if self.writer is not None:
            with contextlib.suppress(StateError):
                self.writer.flush()
        if self.staging is not None:
            self.staging.close()
