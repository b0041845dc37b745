"""Every bound the two sides enforce, in one place, each with the reason for its value.

The device treats everything it receives as hostile until the manifest signature has been
checked, so these limits are applied *before* anything is allocated from a claimed size.
"""

from __future__ import annotations

# --- Datagrams -------------------------------------------------------------------------------

# IPv6 guarantees a 1280-byte MTU on every link; minus the 40-byte IPv6 and 8-byte UDP headers,
# 1232 bytes of UDP payload cross any IPv6 path without fragmentation.
DEFAULT_MAX_DATAGRAM = 1232

# Jumbo-frame LANs carry 9000-byte frames: 9000 - 48 leaves 8952 bytes of UDP payload.  Nothing
# larger is ever sent or accepted, so a receive buffer of this size always holds a whole datagram.
MAX_DATAGRAM = 8952

# --- Manifest --------------------------------------------------------------------------------

# The device reads at most this many manifest bytes before the signature is checked.  The
# largest legitimate manifest holds MAX_CHUNKS hex hashes (~67 bytes each, ~1.1 MB) plus keys,
# URLs and names; 2 MiB leaves room for that and refuses anything that could exhaust a small
# device's memory while it is still unverified.
MAX_MANIFEST_BYTES = 2 * 1024 * 1024

# Every MANIFEST fragment but the last carries at least this many bytes, so a reassembly holds
# at most MAX_MANIFEST_BYTES / 256 = 8192 fragments (~0.7 MB of bookkeeping) however hostile the
# sender; honest senders use ~1200-byte fragments.
MIN_MANIFEST_FRAGMENT = 256

# Signatures on one manifest: a k-of-n threshold rarely needs more than a handful of keys, and
# each signature costs the device one Ed25519 verification (~60 us) before trust is established.
MAX_SIGNATURES = 16

# Trusted keys on a device (a trust set); same reasoning as MAX_SIGNATURES.
MAX_TRUSTED_KEYS = 16

# Device types a manifest may name, and the length of names and short strings; keeps the
# unverified JSON cheap to validate and the human display readable.
MAX_COMPATIBLE = 64
MAX_NAME_LENGTH = 128
MAX_VERSION_LENGTH = 64
MAX_URL_LENGTH = 2048
MAX_MIRRORS = 16
MAX_RATE_CHANNELS = 8
MAX_STREAM_KEYS = 64

# --- Image and chunks ------------------------------------------------------------------------

# A chunk is one RFC 6330 source block, encoded on its own with the codec's defaults
# (`raptorq.Encoder.with_defaults`, which assumes a decoder working memory of
# RAPTORQ_DEFAULT_WORKING_MEMORY).  Those defaults pick one source block (Z = 1) up to K'max
# symbols and no sub-blocks (N = 1) while K is at most the largest K' (RFC 6330 table 2) that fits
# the working memory at T bytes a symbol: about 10 MiB of chunk whatever T (measured: 8680 symbols
# at T = 1208).  The FDT announces N = 1 for the whole object, so every chunk must stay below
# that; 8 MiB leaves 20% for the gap between the table's K' values (under 2% from K' = 1000 up,
# and T >= MIN_SYMBOL_SIZE keeps K' high).  A chunk is a whole number of symbols, so the largest
# is the largest multiple of T not above this.
RAPTORQ_DEFAULT_WORKING_MEMORY = 10 * 1024 * 1024
MAX_CHUNK_BYTES = 8 * 1024 * 1024

# Below 64 KiB the per-chunk hash (67 bytes in the manifest) and decoder set-up cost outweigh
# the benefit of finer-grained verification.
MIN_CHUNK_BYTES = 64 * 1024

# 8 MiB, the largest chunk: the carousel sends a whole visit (one AUTH page, 112 symbols) of every
# chunk per round, so a receiver hears up to about a visit per chunk beyond its K/(1-p); at 8 MiB
# (K = 6944) that is under 2% (the simulator sweep measured 1.008-1.021 of the ideal at 0-30% loss
# for 50 MB to 1 GiB, against 1.06-1.13 at 1 MiB: docs/PERFORMANCE.md).  RaptorQ decodes in time
# linear in the chunk (~5.3 ms per MiB at 1, 4 and 8 MiB), and the durable symbol store keeps
# symbols on disk, so a large chunk costs neither CPU nor memory beyond one decode at a time
# (~2-3x the chunk while it runs).  A 1 GB image needs 128 hashes (~9 KB of manifest).
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024

# One FLUTE object holds at most this many chunks (its RaptorQ source blocks): the image is cut
# into parts of this many chunks, each its own object (`otacast.schemas.fec`).  The payload id's
# SBN has 8 bits (256 blocks), but the number of source blocks Z that the FDT announces (RFC 6330
# section 3.3.3 Scheme-Specific-Info, and the `raptorq` crate's OTI) is 8 bits too, so 255.
PART_CHUNKS = 255

# Chunk hashes in one manifest.  16384 x 8 MiB is 128 GiB, beyond any device image, and the
# hash list stays near 1.1 MB, inside MAX_MANIFEST_BYTES.
MAX_CHUNKS = 16384

# Largest image a manifest may describe: 64 GiB covers full-disk images of today's eMMC/SSD
# devices; a claim beyond it is refused before any staging file is created.
MAX_IMAGE_BYTES = 64 * 1024 * 1024 * 1024

# --- FEC -------------------------------------------------------------------------------------

# RFC 6330 section 5.1.2: a source block holds at most K'max = 56403 source symbols.
MAX_SOURCE_SYMBOLS = 56403

# RaptorQ's payload id carries a 24-bit encoding symbol id (ESI).
MAX_ESI = (1 << 24) - 1

# The codec (RFC 6330 parameter Al) aligns symbols to 8 bytes: asked for any other size it rounds
# down to a multiple of 8, so a manifest naming such a size would disagree with its own stream.
SYMBOL_ALIGNMENT = 8

# Smallest symbol size we accept: below it, per-packet overhead dominates and an 8 MiB chunk
# would exceed MAX_SOURCE_SYMBOLS.
MIN_SYMBOL_SIZE = 256

# --- Receiver ---------------------------------------------------------------------------------

# Chunk bytes the receiver may have in in-memory decoders at once (``--symbols memory`` only; the
# default symbol store needs no budget).  A decoder costs about twice its chunk (measured with
# raptorq 2.0), so 16 MiB of chunks (~32 MB of decoders) keeps the whole receiver under 100 MB.
MAX_DECODER_BYTES = 16 * 1024 * 1024

# Chunk decodes handed to the receiver's decode worker process at once (`otacast.plugin.
# decode_worker`): one it decodes and one queued behind it, so that it goes on while the loop
# is busy decoding a third itself (with room for one only, it sat idle then); the bytes of each
# wait in their own shared memory for the loop to read them.  This bounds what finished decodes
# hold: at most two chunks' bytes, each read back and freed by the receive loop.
MAX_DECODES_IN_FLIGHT = 2

# Manifests being reassembled at once.  A reassembly is keyed by source address, session,
# envelope id and claimed length, so a forged fragment can only spoil reassemblies of its own
# source and claim; each source may have MAX_PENDING_MANIFESTS_PER_SOURCE (an honest sender has
# one, two during a co-signed re-issue) and all sources together MAX_PENDING_MANIFESTS; the one
# that gained a fragment least recently is dropped first.  The sender's carousel sends its
# fragments in one burst, microseconds apart, so to push its reassembly out a flood would have
# to start 32 others between two of them.  The bytes held are capped as a whole (the count
# alone would allow 64 MiB of claimed lengths): honest manifests are ~100 KB (1.1 MB at the
# chunk-count cap), so 4 MiB holds several while a flood cannot grow memory.
MAX_PENDING_MANIFESTS = 32
MAX_PENDING_MANIFESTS_PER_SOURCE = 2
MAX_PENDING_MANIFEST_BYTES = 4 * 1024 * 1024

# Bytes of DATA datagrams held while no manifest is verified yet, replayed once one is (those of
# other sessions are then dropped).  2.5 MB is ~2000 minimum-MTU datagrams, a quarter second of a
# 10 MB/s channel that a receiver joining mid-stream would otherwise throw away; a flood of
# forgeries only pushes older entries out, it cannot grow memory.
MAX_EARLY_BYTES = 2_500_000

# Distinct source addresses a receiver remembers having sent DATA of its session, for the
# "sources heard" of its progress (`otacast.plugin.core`, *Reporting*).  A fleet's channel has a
# handful of senders; 64 addresses (a few KB) show that and more, and a spoofing host cannot
# grow the set past it.
MAX_SOURCES_COUNTED = 64

# Envelopes already refused (bad signature, rollback ...) remembered so their repetitions are
# dropped with one lookup instead of one Ed25519 verification each.
MAX_REFUSED_MANIFESTS = 64

# Manifest verifications (otacast.plugin.budget): how many a receiver core runs per second for
# one source address (each has its own allowance, saving up at most a burst), and for all the
# sources together that have not sent a genuinely signed manifest (one shared allowance, which
# a source without a signed manifest must also draw on).  Verifying a forged envelope costs its
# outline and at most one Ed25519 verification per trusted key: ~6-13 ms of CPU at the 1.1 MB
# chunk-count cap (integration/bench_manifest.py), about twice that at MAX_MANIFEST_BYTES.  An
# honest sender needs one verification per release it serves: repetitions are not verified
# again (a refused envelope is remembered, an adopted one ends verification), so 1/s with a
# burst of 2 (a co-signed re-issue beside the release) covers it.  4/s for every unsigned source
# together caps a flood from any number of hosts at ~0.1 s of CPU per second even at 2 MiB,
# and one flooding host can take only a quarter of it, so a sender the device has not heard
# yet still gets through; a source that has sent a signed manifest is not held back by them.
MANIFEST_VERIFY_RATE_PER_SOURCE = 1.0
MANIFEST_VERIFY_BURST_PER_SOURCE = 2
MANIFEST_VERIFY_RATE_UNSIGNED = 4.0
MANIFEST_VERIFY_BURST_UNSIGNED = 4
# Source addresses with an allowance of their own (least recently heard forgotten first, those
# that have sent no signed manifest before those that have); a forgotten source starts afresh,
# which the shared allowance bounds.
MAX_MANIFEST_SOURCES = 64

# --- Announcements on a LAN (zero-config: signer/announce.py, plugin/receive.py) ---------------

# A sender also sends its signed manifest's fragments to the channel's ASM group, so that a
# device with no SRV records (a plain LAN) hears which sources to join by SSM.  A whole copy goes
# out every ANNOUNCE_INTERVAL seconds: a device listening there has the manifest within about
# one interval (two if a fragment is lost), well inside its 10 s default join timeout.
ANNOUNCE_INTERVAL = 2.0
# ... at no more than this many datagrams a second, in bursts of at most MAX_ANNOUNCE_BURST: at
# most ~60 KB/s (0.6% of a 10 MB/s channel) whatever the manifest's size.  Manifests of up to
# 100 fragments (~120 KB: ~1700 chunk hashes, a 13 GiB image at 8 MiB chunks) still go out whole
# every interval; the largest (1.1 MB at MAX_CHUNKS) takes ~18 s, beyond the default join
# timeout: such channels want SRV records or a longer --join-timeout (docs/OPERATIONS.md).  A
# typical manifest (one to ten fragments) is one burst every interval: 0.5-5 datagrams a second.
MAX_ANNOUNCE_RATE = 50.0
# One burst holds a typical manifest whole, so a device reassembles it from one burst (a flood
# must start many reassemblies between two of its fragments to push it out; see core.py).
MAX_ANNOUNCE_BURST = 16

# Sources a device joins (by SSM) because it heard them announce the release it adopted on the
# ASM group.  Announcements are not authenticated per source: anyone on the link can replay a
# genuine fragment with a spoofed address, which costs the device one (S,G) membership that
# delivers nothing.  A LAN has a handful of senders (each adds its own symbols); 16 leaves room
# for that many times over while bounding the memberships (the kernel's own default cap,
# net.ipv6.mld_max_msf, is 64 sources per socket).  Fragments from further sources are counted
# as rejections (``sources-limit``).
MAX_ANNOUNCED_SOURCES = 16

# --- Packet authentication (otacast.plugin.auth) ----------------------------------------------

# Bytes of DATA datagrams held because their page has not been accepted yet (both its copies
# were lost or reordered): ~850 minimum-MTU datagrams.  A flood of forgeries only pushes older
# ones out.
MAX_AUTH_HELD_BYTES = 1_000_000

# Accepted AUTH pages each sender keeps (its latest; ~1.2 kB each).  A sender moves to a new page
# with every visit of ~112 datagrams, so only the page in flight is needed; 8 leave room for
# reordering and stragglers at any rate and bound what 64 stream keys could ever hold to ~0.6 MB.
MAX_AUTH_KEPT_PAGES = 8

# Signatures of accepted pages remembered, so that a copy is recognised by one lookup (~0.8 MB).
# Every acceptance is a verification, so at most ~1500 pages (MAX_AUTH_VERIFY_RATE x
# AUTH_REORDER_SECONDS, plus a burst) are accepted within the reorder window: a page forgotten
# here is older than the window allows, unless its sender has sent nothing newer since.
MAX_AUTH_RECENT = 8192

# How much older than the newest page accepted from its sender a page may be and still be
# accepted: what reordering on a LAN needs, many times over.  Anything older is a recording.
AUTH_REORDER_SECONDS = 0.1

# Ed25519 verifications of AUTH pages, per second, that a source address which has not yet sent
# a valid page may cause in total (all such sources share it), and that each source which has
# may cause.  An honest sender needs one per visit of 112 datagrams; 5000/s covers ~560k
# datagrams/s (~690 MB/s), and 200/s caps what a flood of forged pages from strangers costs at
# ~15 ms of CPU per second.
UNTRUSTED_AUTH_VERIFY_RATE = 200.0
TRUSTED_AUTH_VERIFY_RATE = 5000.0
# All verifications together, whoever causes them: at most ~0.3 s of CPU per second.
MAX_AUTH_VERIFY_RATE = 5000.0
# A trusted source that has sent no new valid page for this long may be displaced by another.
# An honest sender sends new pages many times a second while it serves.
TRUST_IDLE_SECONDS = 10.0
# Source addresses remembered as having sent a valid page (least recently seen forgotten first).
MAX_AUTH_SOURCES = 64

# --- Sender (otacast.signer.lifetime) ---------------------------------------------------------

# How long before the served manifest expires ``serve`` warns, once per lead time, longest
# first; at expiry it stops (every device would refuse the manifest, so sending it only wastes
# the link).  A day is a working day's notice to sign a successor and serve it while this one
# still installs (manifests are signed for 30 days by default); an hour is the last call, close
# enough that an operator who missed the first warning sees the stop coming in the same log
# page.  A sender that starts inside a lead time warns once, with the nearest one.
SERVE_EXPIRY_WARNINGS = (24 * 3600, 3600)
# Seconds between the driver's looks at the wall clock for expiry: a stop at most this late.
SERVE_EXPIRY_CHECK_SECONDS = 1.0

# --- Block index (delta delivery) --------------------------------------------------------------

# The block index lists one truncated SHA-256 per 4 KiB block of the image.  4 KiB is the block
# size of ext4, the page size and the sector size of eMMC/NVMe erase-friendly writes, so files
# that did not change between two releases sit on the same 4 KiB grid in both images.
INDEX_BLOCK_SIZE = 4096

# 16 bytes (128 bits) of SHA-256 per block: with N <= 2^24 blocks in the image and M <= 2^22
# local blocks, an accidental match has probability <= N*M/2^128; a planted one needs a second
# preimage on 128 bits (2^104 work for 2^24 targets).  8 bytes would leave 2^40 work: feasible.
INDEX_HASH_BYTES = 16

# The largest index: one entry per block of the largest image plus the 16-byte header (256 MiB
# at 64 GiB).  The device compares the signed length against it before allocating anything.
MAX_INDEX_BYTES = 16 + (MAX_IMAGE_BYTES // INDEX_BLOCK_SIZE) * INDEX_HASH_BYTES

# Releases one delta lane serves (the signer's --delta-from): each costs an index patch on the
# lane (~0.02-0.1% of the image) and widens the lane object by the blocks that release lacks;
# devices more than a few releases behind take the full carousel anyway.
MAX_DELTA_FROM = 8

# --- Delta lane (delta delivery) ---------------------------------------------------------------

# The largest delta lane object a device takes the lane for: it is put together on disk in the
# state directory (`otacast.plugin.object_file`: the object plus about as much of spooled
# symbols), memory staying at one block's decode.  The design's updates of a 1.2 GB image need
# 1.7-44 MB (docs/PERFORMANCE.md); a lane past 256 MiB is a release so different that the full
# carousel costs the device little more, and is taken instead.
MAX_LANE_OBJECT_BYTES = 256 * 1024 * 1024

# Symbols spooled per source block of a lane object beyond its K before the block is given up
# and collected afresh.  RaptorQ decodes from K symbols with probability ~99% and from K + 2
# with ~99.99% (RFC 6330 section 1), so 16 more leave an honest block practically never
# undecodable, and bound the spool (and the seen-ESI set a flood of high ESIs could grow) at
# K + 16 slots per block.
LANE_SPOOL_EXTRA_SYMBOLS = 16

# Lane DATA datagrams a device holds while it waits for the manifest on the lane's group (it
# cannot know the lane's TSI before): the lane sends its manifest at least every 0.25 s, ~200
# datagrams at a 1 MB/s lane; 2 MiB keeps those and bounds what a flood can make it hold.
MAX_LANE_EARLY_BYTES = 2 * 1024 * 1024

# Runs (start, count) of missing blocks in one lane object, 8 bytes each in its run list.  The
# 1.2 GB benchmark images have 3063-3260 runs (docs/PERFORMANCE.md), about 2.7 per MB of image;
# at that density a 64 GiB image has ~190k.  2^20 runs (an 8 MiB run list) leaves 5x on top,
# and the signer merges the shortest gaps of an image that would need more, so the device never
# parses a run list larger than this.
MAX_DELTA_RUNS = 1 << 20

# Operations of one index patch.  A patch alternates COPY (a stretch of the old index) and
# LITERAL (entries of blocks absent from the old release), so an honest one has about twice the
# runs of the lane; a patch that would need more is written as one LITERAL of the whole index
# instead (the full index, never larger than MAX_INDEX_BYTES).  Each op is parsed into a small
# object, so this bounds the device's memory for the ops at ~100 MB at worst.
MAX_PATCH_OPS = 2 * MAX_DELTA_RUNS + 1

# Memory the device's xz decoder of a lane object may use.  The signer writes xz preset 6
# (an 8 MiB dictionary, ~9 MiB to decode); 24 MiB decodes presets up to 7 (16 MiB dictionary)
# and refuses a stream that claims a dictionary a small device cannot hold.
MAX_DELTA_XZ_MEMORY = 24 * 1024 * 1024

# Decompressed bytes the device asks the xz decoder for per call: the decoder never returns more
# than this at once, so the lane's blocks pass through memory one MiB at a time.
DELTA_DECODE_STEP = 1024 * 1024

# Bytes an xz stream may exceed its input by beyond 1/1024 of it, when the lane's header is
# checked: the container headers, index and padding (~100 bytes) with room to spare.  LZMA2
# stores an incompressible chunk of up to 64 KiB with a 3-byte header, far under 1/1024.
DELTA_XZ_OVERHEAD_BYTES = 4096

# --- HTTP repair of partly held chunks (otacast.plugin.fetcher) --------------------------------

# Range requests for one chunk whose source symbols are partly held (local reuse, multicast):
# the requests of a chunk are made one after the other on a kept-alive connection, so each costs
# a round trip and ~0.5 KB of headers.  64 bounds that at ~64 round trips (about 3 s at 50 ms)
# and ~32 KB of headers per 8 MiB chunk (0.4%); a chunk that would need more has its shortest
# gaps of held bytes fetched too (the fewest extra bytes for the requests saved).
MAX_RANGES_PER_CHUNK = 64

# --- MLD listener tracking (the sender's airtime on lane-like groups) -------------------------

# The sender's own querier (`signer.mld`) uses RFC 3810's robustness variable (2) with a much
# shorter Query Interval than the RFC's 125 s: a device that vanishes without a Done (power cut,
# cable pulled) keeps its group listened for the Multicast Address Listening Interval,
# robustness x interval + response interval = 2 x 10 + 2 = 22 s here instead of 260 s, and that
# is the longest the lane spends airtime on nobody.  The price is one report per listening host
# every 10 s (a few hundred bytes: 100 reports a second for 1000 devices, nothing beside a
# multi-MB/s carousel).  The response interval (2 s) bounds how soon after serve starts the
# devices that joined earlier are heard, and spreads their answers over 2 s.
MLD_ROBUSTNESS = 2
MLD_QUERY_INTERVAL = 10.0
MLD_QUERY_RESPONSE_INTERVAL = 2.0

# After the last listener of a group leaves (MLDv1 Done, MLDv2 TO_IN{} or BLOCK of the last
# source) the querier asks that group's listeners this many times, this far apart (RFC 3810's
# Last Listener Query Count and Interval defaults): hosts in MLDv1 mode suppress their reports
# when another host reported, so one host's Done does not mean the group is empty.  The group
# stays listened for count x interval (2 s) unless someone answers.
MLD_LAST_LISTENER_QUERIES = 2
MLD_LAST_LISTENER_INTERVAL = 1.0

# The longest Query Interval the tracker adopts from another (winning) querier.  QQIC encodes up
# to 31744 s; a hostile host claiming that would keep every fake listener alive for 17 h.
# Routers use 125 s by default; 1800 s leaves room for slow queriers and bounds the damage.
MLD_MAX_QUERY_INTERVAL = 1800.0

# (host, group) listener entries kept over all watched groups.  Only groups the sender watches
# (its lane groups) are kept, so this is about one per device on the link listening on a lane;
# 16384 entries (a few MB) is more than one link's fleet.  A new entry past it is a counted
# rejection: the group is already listened, so the lane keeps its airtime.
MLD_MAX_LISTENERS = 16384

# Source addresses kept per (host, group) entry.  An SSM device joins the few senders of its
# channel (the SRV records' targets); a record that would make an entry exceed this is
# a counted rejection and leaves the entry as it was.
MLD_MAX_SOURCES = 256

# The largest MLD message read: a report fits the link MTU (the kernel splits larger ones),
# and a jumbo frame carries 9000 bytes of IPv6 packet; a longer one is truncated, counted, and
# dropped.
MLD_MAX_MESSAGE = 9000
