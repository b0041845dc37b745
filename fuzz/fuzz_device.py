"""Coverage-guided fuzzing (atheris) of everything a device parses from the network or disk.

    python fuzz/fuzz_device.py TARGET -runs=N [-seed=S] [CORPUS_DIR]

Targets, each asserting the rule "hostile input becomes a counted rejection or a documented
error, never anything else":

- ``datagram``: the fast and the construct parser agree on every input (same packet or same
  rejection reason), and a `ReceiverCore` with a verified release adopted takes the input
  without raising; a DATA datagram of the adopted session must never complete a chunk whose
  bytes differ from the image (nothing unverified is handed on).
- ``auth``: the same for a release that lists a stream key (packet authentication on): AUTH
  pages and DATA datagrams, honest and mutated, never raise and never complete a chunk with
  forged bytes.
- ``manifest``: `verify_manifest` on arbitrary bytes raises only `ManifestRejected`.
- ``config``: the device config parser raises only `ConfigError`.
- ``delta``: the delta delivery objects (first byte picks one): a block index (`blockindex.parse`
  raises only `MalformedIndex`), a lane object (`parse_lane` raises only `MalformedDelta`; the
  `LaneDecoder` never raises and gives out only blocks whose hash is the index's entry), an
  index patch (`patched_index` raises only `MalformedDelta` and returns only the signed index).
- ``index``: an `IndexGroupCore` (the index group's core) given DATA datagrams of the index
  group's TSI, honest and mutated, never raises and holds no index other than the signed one
  (a run that completes it starts a fresh core).
- ``assembly``: a `FileAssembly` (the lane object put together on disk) given the codec packets
  of one run (the input cut into packets of the signed symbol size, SBN and ESI read from each
  as the lane core reads them) never raises and gives out no object but the signed one.

The first bytes of every run are mutated from real seeds (honest datagrams and the signed
manifest), so the fuzzer starts inside the formats instead of at random noise.  `make fuzz-quick`
runs each target for a bounded number of iterations; CI runs it, so the harness cannot rot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from otacast.plugin.config import load_config
    from otacast.plugin.core import ReceiverCore
    from otacast.plugin.delta import LaneDecoder, patched_index
    from otacast.plugin.errors import ConfigError
    from otacast.plugin.events import ChunkComplete
    from otacast.plugin.lane import IndexGroupCore
    from otacast.plugin.object_file import FileAssembly, VerifiedObject
    from otacast.plugin.verify import verify_manifest
    from otacast.schemas import blockindex, fdt, fec, wire
    from otacast.schemas.deltaobject import parse_lane
    from otacast.schemas.errors import MalformedDelta, MalformedIndex, ManifestRejected, PacketError
    from otacast.schemas.manifest import (
        Chunking,
        FecInfo,
        ImageInfo,
        IndexInfo,
        Manifest,
        StreamKey,
        Transport,
    )
    from otacast.schemas.policy import TrustSet
    from otacast.signer.auth_pages import AuthPages, chunk_digests
    from otacast.signer.channels import manifest_fragments
    from otacast.signer.delta import build_delta
    from otacast.signer.encoder import raptorq_encode
    from otacast.signer.keys import SigningKey
    from otacast.signer.sign import sign

NOW = 1_800_000_000.0
CHUNK = 55 * 1208  # the smallest chunk a manifest may declare (whole 1208-byte symbols)
SYMBOL = fec.DEFAULT_SYMBOL_SIZE
KEY = SigningKey(b"\x05" * 32)
STREAM_KEY = SigningKey(b"\x07" * 32)
TRUST = TrustSet.from_public_keys([KEY.public])
IMAGE = random.Random(11).randbytes(4 * CHUNK - 100)  # noqa: S311 - test data, not a secret


def _release(stream_keys: tuple[StreamKey, ...] = ()) -> tuple[Manifest, bytes, list[bytes]]:
    spans = (
        fec.chunk_span(len(IMAGE), CHUNK, SYMBOL, i)
        for i in range(fec.chunk_count(len(IMAGE), CHUNK, SYMBOL))
    )
    chunks = tuple(hashlib.sha256(IMAGE[o : o + n]).digest() for o, n in spans)
    manifest = Manifest(
        name="fuzz",
        sequence=2,
        version="2",
        created=1_700_000_000,
        expires=1_900_000_000,
        compatible=("fuzzboard",),
        image=ImageInfo("fuzz.img", len(IMAGE), hashlib.sha256(IMAGE).digest(), "raw"),
        chunks=Chunking(CHUNK, chunks),
        fec=FecInfo(symbol_size=SYMBOL),
        transport=Transport.for_channel("fuzz.example.test", rates=(1_000_000,)),
        http=(),
        stream_keys=stream_keys,
    )
    envelope = sign(manifest, [KEY])
    # The FDT then the MANIFEST fragments, as a sender's manifest carousel sends them.
    datagrams = list(manifest_fragments(envelope, wire.data_datagram_size(SYMBOL)))
    return manifest, envelope.compact_bytes, datagrams


MANIFEST, ENVELOPE, MANIFEST_DATAGRAMS = _release()
# An otacast wire 2 DATA datagram: refused as old-wire-version.
OLD_WIRE_DATA = b"OC\x02\x01" + MANIFEST.session_id + bytes(8) + bytes(SYMBOL)
AUTHED, _, AUTHED_DATAGRAMS = _release((StreamKey(0, STREAM_KEY.public),))


def _cycle(manifest: Manifest, index: int) -> list[bytes]:
    offset, length = manifest.chunk_span(index)
    out = []
    for packet in raptorq_encode(IMAGE[offset : offset + length], SYMBOL, repair=2):
        esi = int.from_bytes(packet[:4], "big") & wire.MAX_ESI
        out.append(wire.build_datagram(wire.DataPacket(manifest.tsi, index, esi, packet[4:])))
    return out


def _data_seeds() -> list[bytes]:
    seeds = [d for index in range(MANIFEST.chunk_count) for d in _cycle(MANIFEST, index)[:3]]
    # The last image part's TOI, whose blocks past SBN 0 name chunks beyond 32 bits (a
    # datagram like it once raised out of both parsers): mutations start at that edge too.
    last = wire.build_datagram(wire.DataPacket(MANIFEST.tsi, 0xFFFFFFFF, 0, bytes(SYMBOL)))
    return [*seeds, last, last[:16] + b"\x01" + last[17:]]


def _auth_seeds() -> list[bytes]:
    cycles = [_cycle(AUTHED, index) for index in range(AUTHED.chunk_count)]
    size = len(cycles[0][0])
    digests = [chunk_digests(b"".join(cycle), size) for cycle in cycles]
    pages = AuthPages(AUTHED.tsi, 0, digests, wire.auth_capacity(size), STREAM_KEY.signer())
    seeds = []
    for index, cycle in enumerate(cycles):
        seeds += [pages.page(index, 0, NOW), *cycle[:2]]
    return seeds


def _adopted_core(datagrams: list[bytes]) -> ReceiverCore:
    core = ReceiverCore(TRUST, now=NOW, device_type="fuzzboard")
    for datagram in datagrams:
        core.receive_datagram(datagram, "fd51::1", NOW, wall=NOW)
    assert core.verified is not None, "the seed release must verify"
    while core.next_event() is not None:
        pass
    return core


CORE = _adopted_core(MANIFEST_DATAGRAMS)
AUTHED_CORE = _adopted_core(AUTHED_DATAGRAMS)
assert AUTHED_CORE.authenticator is not None


def datagram(data: bytes) -> None:
    try:
        fast: object = wire.parse_datagram(data)
    except PacketError as exc:
        fast = exc.reason
    try:
        spec: object = wire.parse_datagram_spec(data)
    except PacketError as exc:
        spec = exc.reason
    if fast != spec:
        raise AssertionError(f"parsers disagree: {fast!r} != {spec!r}")
    _feed(CORE, MANIFEST, data)


def auth(data: bytes) -> None:
    _feed(AUTHED_CORE, AUTHED, data)


def _feed(core: ReceiverCore, release: Manifest, data: bytes) -> None:
    core.receive_datagram(data, "fd51::1", NOW, wall=NOW)
    while (event := core.next_event()) is not None:
        if isinstance(event, ChunkComplete):
            offset, length = release.chunk_span(event.index)
            if event.data != IMAGE[offset : offset + length]:
                raise AssertionError(f"chunk {event.index} completed with forged bytes")


def manifest(data: bytes) -> None:
    with contextlib.suppress(ManifestRejected):
        verify_manifest(
            data, TRUST, now=NOW, device_type="fuzzboard", installed_sequence=1, channel=None
        )


_CONFIG = Path(tempfile.mkdtemp(prefix="otacast-fuzz-")) / "otacast.toml"


def config(data: bytes) -> None:
    _CONFIG.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(_CONFIG)


def _index(image: bytes) -> blockindex.BlockIndex:
    builder = blockindex.IndexBuilder()
    builder.update(image)
    return builder.finish()


def _delta_seeds() -> tuple[blockindex.BlockIndex, blockindex.BlockIndex, list[bytes]]:
    """Old and new index of a small image pair, and seeds: the new index, the lane, the patch."""
    rng = random.Random(3)  # noqa: S311 - test data, not a secret
    old = rng.randbytes(16 * 4096 + 100)
    new = bytearray(old)
    new[5000:13000] = rng.randbytes(8000)
    new += rng.randbytes(3000)
    old_index, new_index = _index(old), _index(bytes(new))
    with tempfile.TemporaryDirectory() as directory:
        image, lane = Path(directory, "new.img"), Path(directory, "lane")
        image.write_bytes(new)
        made = build_delta(image, new_index, [old_index], lane)
        lane_bytes = lane.read_bytes()
    seeds = [b"\0" + new_index.build(), b"\1" + lane_bytes, b"\2" + made.patches[0].build()]
    return old_index, new_index, seeds


OLD_INDEX, NEW_INDEX, DELTA_SEEDS = _delta_seeds()


def delta(data: bytes) -> None:
    kind, body = (data[0] % 3, data[1:]) if data else (0, b"")
    if kind == 0:
        with contextlib.suppress(MalformedIndex):
            blockindex.parse(body, length=NEW_INDEX.length)
    elif kind == 1:
        try:
            header, stream = parse_lane(body)
            decoder = LaneDecoder(header, NEW_INDEX)
        except MalformedDelta:
            return
        for block, content in decoder.feed(stream):
            assert blockindex.block_digest(content) == NEW_INDEX.digest(block), "forged block"
        decoder.finish()
    else:
        with contextlib.suppress(MalformedDelta):
            got = patched_index(OLD_INDEX, body, length=NEW_INDEX.length, sha256=NEW_INDEX.sha256())
            assert got == NEW_INDEX, "a patch gave an index other than the signed one"


def _block_packets(data: bytes, part: fec.Part, repair: int) -> list[list[bytes]]:
    """The codec packets of each RaptorQ source block of object `data` cut as `part` says: its
    K source symbols then `repair` more, the payload id's SBN set to the block's number."""
    spans = (part.block_span(block, SYMBOL) for block in range(part.blocks))
    return [
        [bytes([block]) + packet[1:] for packet in raptorq_encode(data[o : o + n], SYMBOL, repair)]
        for block, (o, n) in enumerate(spans)
    ]


def _index_release() -> tuple[Manifest, blockindex.BlockIndex, list[bytes]]:
    """A release (the fuzz manifest with a longer image) whose block index is three source
    blocks, that index, and the index group's DATA datagrams: each block's source symbols and
    two repair symbols."""
    image = random.Random(5).randbytes(96 * 1024) * 400  # noqa: S311 - test data, not a secret
    index = _index(image)
    built = index.build()
    release = dataclasses.replace(
        MANIFEST,
        image=dataclasses.replace(MANIFEST.image, length=len(image)),
        index=IndexInfo(len(built), hashlib.sha256(built).digest()),
    )
    part = release.index_part()
    assert part is not None and part.blocks == 3, "the index must span several source blocks"
    tsi = fdt.INDEX_GROUP.tsi(release)
    datagrams = []
    for block, packets in enumerate(_block_packets(built, part, 2)):
        for packet in packets:
            esi = int.from_bytes(packet[1:4], "big")
            chunk = wire.INDEX_GROUP_FIRST_CHUNK + block
            datagrams.append(wire.build_datagram(wire.DataPacket(tsi, chunk, esi, packet[4:])))
    return release, index, datagrams


INDEX_RELEASE, SIGNED_INDEX, INDEX_DATAGRAMS = _index_release()
INDEX_CORE = [IndexGroupCore(INDEX_RELEASE)]


def index(data: bytes) -> None:
    core = INDEX_CORE[0]
    if core.receive(data):
        assert core.index == SIGNED_INDEX, "the index group completed an index not signed"
        INDEX_CORE[0] = IndexGroupCore(INDEX_RELEASE)  # collect it again: keep the paths hot


# The lane object of the `assembly` target: three source blocks of a few symbols each.
OBJECT_SYMBOL = SYMBOL  # (what `_block_packets` cuts symbols of)
OBJECT = random.Random(7).randbytes(10 * OBJECT_SYMBOL + 5)  # noqa: S311 - test data
OBJECT_PART = fec.part(len(OBJECT), 4 * OBJECT_SYMBOL, OBJECT_SYMBOL, 0)
OBJECT_SHA256 = hashlib.sha256(OBJECT).digest()
_ASSEMBLY_DIR = Path(tempfile.mkdtemp(prefix="otacast-fuzz-assembly-"))
_CODEC_PACKET = 4 + OBJECT_SYMBOL


def _assembly_seeds() -> list[bytes]:
    """Whole runs: every source symbol; the first source symbol of each block lost (a decode
    from a repair symbol); the same with one symbol forged (a mismatch, then collected)."""
    assert OBJECT_PART.blocks == 3, "the object must span several source blocks"
    whole = [b"".join(p[:-2]) for p in _block_packets(OBJECT, OBJECT_PART, 2)]
    lossy = [b"".join(p[1:]) for p in _block_packets(OBJECT, OBJECT_PART, 1)]
    forged = bytearray(b"".join(lossy))
    forged[-1] ^= 1
    return [b"".join(whole), b"".join(lossy), bytes(forged) + b"".join(whole)]


def assembly(data: bytes) -> None:
    target = _ASSEMBLY_DIR / "lane.object"
    made = FileAssembly(OBJECT_PART, OBJECT_SHA256, OBJECT_SYMBOL, target)
    try:
        for at in range(0, len(data) - _CODEC_PACKET + 1, _CODEC_PACKET):
            packet = data[at : at + _CODEC_PACKET]
            result = made.feed(packet[0], int.from_bytes(packet[1:4], "big"), packet)
            if isinstance(result, VerifiedObject):
                assert result.length == len(OBJECT), "an object of another length"
                assert result.path.read_bytes() == OBJECT, "an object other than the signed one"
                return
            assert result is None or isinstance(result, str), f"fed back {result!r}"
    finally:
        made.remove()


TARGETS: dict[str, tuple[Callable[[bytes], None], Callable[[], list[bytes]]]] = {
    "datagram": (datagram, lambda: [*MANIFEST_DATAGRAMS, *_data_seeds(), OLD_WIRE_DATA]),
    "auth": (auth, _auth_seeds),
    "manifest": (manifest, lambda: [ENVELOPE]),
    "config": (config, lambda: [b'trust = ["k.pub"]\nchannel = "a.example"\nport = 4242\n']),
    "delta": (delta, lambda: DELTA_SEEDS),
    "index": (index, lambda: INDEX_DATAGRAMS),
    "assembly": (assembly, _assembly_seeds),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    target, seeds = TARGETS[sys.argv[1]]
    argv = [sys.argv[0], *sys.argv[2:]]
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:  # start from the real formats, not from noise
        directory = Path(tempfile.mkdtemp(prefix=f"otacast-fuzz-{sys.argv[1]}-"))
        for i, seed in enumerate(seeds()):
            (directory / f"seed-{i}").write_bytes(seed)
        argv.append(str(directory))
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
