"""Packet authentication cost benchmark: prints numbers, asserts nothing.

    python integration/bench_auth.py [--size 32M] [--repeat 3] [--quick]

Everything runs in this process, with no network: a release is signed with a stream key, its
symbols are encoded into a sender's cache, and one pass of the real sender schedule
(`SenderCore`, unpaced) is recorded with the AUTH pages its `SendAuth` actions put in front of
runs, signed as they are sent.  Then the receiver core, over the symbol store in a temporary
directory as ``otacast fetch`` runs it, consumes that pass twice per repetition, alternately, in
the reads a GRO socket gives (up to 64 consecutive datagrams of one size, as views of one
buffer with its words):

* with packet authentication: manifest, AUTH pages and DATA datagrams, as sent;
* without: the same manifest and DATA datagrams, packet authentication off.

It reports the receiver's CPU seconds per MB of image for both (the smallest of the repetitions,
``time.process_time``, its final flush and sync included; the reads' buffers are made before
the clock starts and there are no sockets, so the absolute figures are below a real loop's
while the two are compared on equal terms) and their ratio, the bytes AUTH adds to a pass,
and what signing the pages as they are sent costs the sender.  Both runs happen in one process
on one input, so the ratio holds on a noisy machine even where the absolute figures do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otacast.plugin.core import ReceiverCore
from otacast.plugin.events import ChunkComplete
from otacast.plugin.store_decoder import UNBOUNDED_DECODERS, StoredSymbols
from otacast.plugin.verify import verify_manifest
from otacast.schemas import units, wire
from otacast.schemas.manifest import Envelope, Transport
from otacast.schemas.policy import TrustSet
from otacast.signer import symbol_cache
from otacast.signer.auth_pages import AuthPages, release_digests
from otacast.signer.keys import SigningKey
from otacast.signer.schedule import Finished, SendAuth, SenderCore, SendManifest, SendSymbols
from otacast.signer.sign import build_manifest, sign

RELEASE = SigningKey(b"\x01" * 32)
STREAM = SigningKey(b"\x02" * 32)


def release(image: Path) -> Envelope:
    now = int(time.time())
    manifest = build_manifest(
        image,
        name=image.name,
        sequence=1,
        version="1",
        created=now,
        expires=now + 86400,
        compatible=["bench"],
        image_format="raw",
        transport=Transport.for_channel("bench.example.test"),
        stream_keys=[STREAM.public],
        index=False,  # (packet authentication covers image chunks only; no index object here)
    )
    return sign(manifest, [RELEASE])


def one_pass(envelope: Envelope, image: Path, cache_dir: Path) -> dict[str, object]:
    m = envelope.manifest
    path = symbol_cache.build(m, image, cache_dir, 0.5)
    layout = symbol_cache.CycleLayout.for_manifest(m, 0.5)
    capacity = wire.auth_capacity(layout.datagram_size)
    reader = symbol_cache.SymbolReader(path, layout, 64)
    started = time.process_time()
    digests = release_digests(reader)
    hashing = time.process_time() - started
    fragments = [
        wire.build_datagram(p)
        for p in wire.fragment_envelope(
            m.tsi, envelope.envelope_id, envelope.compact_bytes, layout.datagram_size
        )
    ]
    core = SenderCore(
        layout.cycles,
        [m.source_symbols(c) for c in range(m.chunk_count)],
        visit=capacity,
        datagram_size=layout.datagram_size,
        batch=64,
        rate=0,
        manifest=fragments,
        now=0.0,
        passes=1,
        auth_capacity=capacity,
    )
    auth = AuthPages(m.tsi, 0, digests, capacity, STREAM.signer())
    stream: list[bytes] = []
    data_bytes = 0
    signing = 0.0
    pages = 0
    try:
        while not isinstance(action := core.next_action(0.0), Finished):
            if isinstance(action, SendAuth):
                started = time.process_time()
                stream += auth.for_action(action, time.time())
                signing += time.process_time() - started
                pages += len(action.pages)
            elif isinstance(action, SendSymbols):
                run = bytes(reader.read(action.chunk, action.first, action.count))
                size = layout.datagram_size
                stream += [run[i : i + size] for i in range(0, len(run), size)]
                data_bytes += len(run)
            elif isinstance(action, SendManifest):
                stream += action.datagrams
    finally:
        reader.close()
    return {
        "stream": stream,
        "fragments": fragments,
        "data_bytes": data_bytes,
        "auth_bytes": auth.bytes,
        "auth_packets": auth.datagrams,
        "pages": pages,
        "signing_s": signing,
        "hashing_s": hashing,
    }


def reads(datagrams: list[bytes]) -> list[list[bytes]]:
    """`datagrams` in the reads a GRO socket gives: up to 64 consecutive ones of one size."""
    out: list[list[bytes]] = []
    at = 0
    while at < len(datagrams):
        end = at + 1
        while end < len(datagrams) and end - at < 64 and len(datagrams[end]) == len(datagrams[at]):
            end += 1
        out.append(datagrams[at:end])
        at = end
    return out


def consume(envelope: Envelope, datagrams: list[bytes], packet_auth: str, state: Path) -> float:
    """CPU seconds for the receive loop's work on `datagrams` (the core over the symbol store,
    as ``otacast fetch`` runs it, given views of each read and its words)."""
    trust = TrustSet.from_public_keys([RELEASE.public])
    now = time.time()
    verified = verify_manifest(
        envelope.compact_bytes,
        trust,
        now=now,
        device_type=None,
        installed_sequence=None,
        channel=None,
    )
    stored = StoredSymbols(state, verified)
    core = ReceiverCore(
        trust,
        now=now,
        manifest=verified,
        packet_auth=packet_auth,
        decoder_factory=stored.decoder,
        decoder_budget=UNBOUNDED_DECODERS,
    )
    buffers = []
    for read in reads(datagrams):
        whole = memoryview(bytearray(b"".join(read)))
        size = len(read[0])
        views = [whole[i * size : (i + 1) * size] for i in range(len(read))]
        buffers.append((views, (whole.cast("I"), size) if not size & 3 else None))
    try:
        started = time.process_time()
        for views, words in buffers:
            core.receive_datagrams(views, "fd00::1", now, wall=now, coalesced=words)
            while (event := core.next_event()) is not None:
                if isinstance(event, ChunkComplete):
                    stored.keep(event.index, event.data)
        stored.close()
        spent = time.process_time() - started
    finally:
        stored.close()
        stored.staging.close()
    if not core.complete:
        raise SystemExit(f"the receiver did not complete ({packet_auth}): {core.stats}")
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="32M", help="image size (default 32M)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true", help="8M image, 2 repetitions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = units.parse_size("8M" if args.quick else args.size)
    repeat = 2 if args.quick else args.repeat
    with tempfile.TemporaryDirectory(prefix="otacast-bench-auth-") as name:
        work = Path(name)
        image = work / "image.bin"
        image.write_bytes(os.urandom(size))
        envelope = release(image)
        sent = one_pass(envelope, image, work / "cache")
        stream = sent["stream"]
        assert isinstance(stream, list)
        plain = [d for d in stream if not isinstance(wire.parse_datagram(d), wire.AuthPacket)]
        with_auth, without = [], []
        for n in range(repeat):
            with_auth.append(consume(envelope, stream, "require", work / f"with-{n}"))
            without.append(consume(envelope, plain, "off", work / f"without-{n}"))
    mb = size / 1e6
    data_bytes = sent["data_bytes"]
    auth_bytes = sent["auth_bytes"]
    assert isinstance(data_bytes, int) and isinstance(auth_bytes, int)
    result: dict[str, float] = {
        "image_mb": round(mb, 1),
        "receiver_cpu_s_per_mb_with_auth": round(min(with_auth) / mb, 5),
        "receiver_cpu_s_per_mb_without": round(min(without) / mb, 5),
        "receiver_cpu_ratio": round(min(with_auth) / min(without), 3),
        "auth_pages": int(sent["pages"]),  # type: ignore[call-overload]
        "auth_packets_per_pass": int(sent["auth_packets"]),  # type: ignore[call-overload]
        "auth_bytes_share_of_data": round(auth_bytes / data_bytes, 4),
        "sender_signing_s": round(float(sent["signing_s"]), 3),  # type: ignore[arg-type]
        "sender_digests_s": round(float(sent["hashing_s"]), 3),  # type: ignore[arg-type]
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"packet authentication, {mb:.0f} MB image, one pass, best of {repeat}:")
    print(
        f"  receiver CPU per MB: {result['receiver_cpu_s_per_mb_with_auth'] * 1e3:.2f} ms with, "
        f"{result['receiver_cpu_s_per_mb_without'] * 1e3:.2f} ms without "
        f"(ratio {result['receiver_cpu_ratio']:.3f}; the receiver core and store only: the "
        "1.15 target is the whole receiver's, bench_receiver.py)"
    )
    print(
        f"  wire: {sent['auth_packets']} AUTH datagrams, "
        f"{100 * auth_bytes / data_bytes:.2f}% of the DATA bytes (target <= 2%)"
    )
    print(
        f"  sender: {sent['pages']} pages signed as sent in {result['sender_signing_s']:.2f} s "
        f"CPU ({result['sender_signing_s'] * 1e3 / mb:.2f} ms per MB); digests of the cycles "
        f"{result['sender_digests_s']:.2f} s, once"
    )


if __name__ == "__main__":
    main()
