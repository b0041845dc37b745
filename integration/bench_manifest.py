"""What a forged manifest costs the verifier: prints numbers, asserts nothing.

    python integration/bench_manifest.py [--repeat 5] [--chunks 16384]

Everything runs in this process, with no network.  One manifest at the chunk-count cap
(``MAX_CHUNKS`` hashes, ~1.1 MB of envelope) is signed with a release key, then forged three
ways: the trusted key's signature kept over altered content (`BadSignature`), signed by a key
the device does not trust (`UnknownKey`), and the hash list replaced by junk the schema refuses
(also left under the trusted key's stale signature).  Each is verified two ways, alternately:

* *schema first* (the order before this benchmark's change, rebuilt from today's pieces): the
  full parse (`parse_envelope`: strict JSON, control characters, JSON Schema, model, round trip)
  and only then the Ed25519 signatures;
* *signatures first* (`policy.verify_envelope`, what both ``verify`` commands and the receiver
  core run): size, the outline, the signatures, and only then the rest.

It reports CPU seconds per envelope (``time.process_time``, the smallest of the repetitions)
and their ratio, and what verifying the genuine envelope costs (the same either way: all of it
must be checked).  Both orders run in one process on the same bytes, so the ratios hold on a
noisy machine even where the absolute figures do not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otacast.plugin.verify import check_signature, verify_manifest
from otacast.schemas.canonical import canonical_bytes
from otacast.schemas.errors import ManifestRejected
from otacast.schemas.limits import MAX_CHUNKS, MAX_IMAGE_BYTES
from otacast.schemas.manifest import (
    Chunking,
    FecInfo,
    ImageInfo,
    Manifest,
    Transport,
    parse_envelope,
    signing_message,
)
from otacast.schemas.policy import TrustSet
from otacast.signer.keys import SigningKey
from otacast.signer.sign import sign

RELEASE = SigningKey(b"\x01" * 32)
STRANGER = SigningKey(b"\x02" * 32)
TRUST = TrustSet.from_public_keys([RELEASE.public])
NOW = 1_800_000_000


def genuine(chunks: int) -> bytes:
    # ~4 MiB in whole symbols: MAX_CHUNKS of them fit the image cap
    chunk_size = MAX_IMAGE_BYTES // MAX_CHUNKS // 1208 * 1208
    hashes = tuple(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(chunks))
    manifest = Manifest(
        name="bench",
        sequence=2,
        version="2",
        created=NOW - 3600,
        expires=NOW + 86400,
        compatible=("bench",),
        image=ImageInfo("bench.img", chunks * chunk_size, b"\x11" * 32, "raw"),
        chunks=Chunking(chunk_size, hashes),
        fec=FecInfo(symbol_size=1208),
        transport=Transport.for_channel("bench.example.test"),
    )
    return sign(manifest, [RELEASE]).compact_bytes


def forgeries(data: bytes) -> dict[str, bytes]:
    document = json.loads(data)
    altered = json.loads(data)
    altered["signed"]["sequence"] = 900  # the trusted key's signature, now over other bytes
    stranger = json.loads(data)
    message = signing_message(parse_envelope(data).manifest)
    stranger["signatures"] = [{"keyid": STRANGER.key_id, "sig": STRANGER.sign(message).hex()}]
    junk = json.loads(data)
    junk["signed"]["chunks"]["sha256"] = ["zz" * 32] * len(document["signed"]["chunks"]["sha256"])
    return {
        "bad signature": canonical_bytes(altered),
        "unknown key": canonical_bytes(stranger),
        "schema-invalid, stale signature": canonical_bytes(junk),
    }


def schema_first(data: bytes) -> None:
    """The old order: everything parsed and validated, then the signatures checked."""
    envelope = parse_envelope(data)
    message = signing_message(envelope.manifest)
    for signature in envelope.signatures:
        public = TRUST.keys.get(signature.keyid)
        if public is not None and not check_signature(public, message, signature.sig):
            raise ManifestRejected("bad signature")


def signatures_first(data: bytes) -> None:
    verify_manifest(data, TRUST, now=NOW, device_type=None, installed_sequence=None, channel=None)


def cpu(verify: Callable[[bytes], None], data: bytes) -> float:
    started = time.process_time()
    with contextlib.suppress(ManifestRejected):
        verify(data)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=MAX_CHUNKS)
    args = parser.parse_args()
    data = genuine(args.chunks)
    cases = forgeries(data)
    print(f"envelope: {len(data)} bytes ({args.chunks} chunk hashes); CPU s per envelope")
    print(f"{'forgery':34} {'schema first':>12} {'sigs first':>11} {'ratio':>7}")
    for name, forged in cases.items():
        old = new = float("inf")
        for _ in range(args.repeat):
            old = min(old, cpu(schema_first, forged))
            new = min(new, cpu(signatures_first, forged))
        print(f"{name:34} {old:12.4f} {new:11.4f} {old / new:7.1f}")
    honest = min(cpu(signatures_first, data) for _ in range(args.repeat))
    print(f"{'genuine (verified in full)':34} {'':12} {honest:11.4f}")


if __name__ == "__main__":
    main()
