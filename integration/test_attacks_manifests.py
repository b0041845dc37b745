"""The adversarial suite, network half: signed manifests an attacker puts on the channel.

Each test is named after an attack of issue 6.  The attacker, a host on the receiver's LAN,
replays an older release's stream (a real `otacast-signer serve` of it) or injects manifests
that are validly formed but must be refused: expired, for another device, below the signature
threshold, signed by an unknown key, or claiming sizes beyond the caps.  Each test asserts that
the receiver refuses them before keeping any state (the state directory is looked at once the
refusals are in and before any honest datagram exists), that nothing forged is written, and
that the honest release, started afterwards, still completes.  Run with ``-s`` for the figures.
The other attack surfaces are in ``test_attacks_datagrams.py``, ``test_attacks_mirrors.py`` and
``test_attacks_state.py``; the pure half of the suite is ``tests/test_attacks.py``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

from otacast.schemas import fec
from otacast.schemas.limits import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
)
from otacast.schemas.manifest import (
    Chunking,
    Envelope,
    ImageInfo,
    Manifest,
    Signature,
    Transport,
    signing_message,
)
from otacast.signer.keys import generate, load_secret, write_keypair
from otacast.signer.sign import sign

from .attacks import (
    MB,
    Channel,
    asm_fetch,
    assert_nothing_forged,
    finish,
    inject,
    manifest_datagrams,
    read_until,
    rejected,
    session_state,
)
from .netns import Lan, LanFactory, stop
from .release import SIGNER, serve, summary_of

# The smallest valid chunk: 64 KiB rounded up to whole default-size symbols.
SMALLEST_CHUNK = fec.choose_chunk_size(1, 0, fec.DEFAULT_SYMBOL_SIZE)


def hostile_then_honest(
    lan: Lan,
    channel: Channel,
    tmp_path: Path,
    attacker: subprocess.Popen[str],
    refusals: int,
    *args: str,
) -> tuple[int, list[dict[str, object]], str, list[str]]:
    """Run fetch while `attacker` sends; once the receiver has refused `refusals` manifests
    (and before any honest datagram exists), note what the state directory holds, then start
    the honest sender.  Returns exit code, events, stderr and that state snapshot."""
    sender, _, receiver = lan.hosts
    state, out = tmp_path / "state", tmp_path / "out.img"
    rx = asm_fetch(receiver, channel, state, out, "--join-timeout", "20", *args)
    tx = None
    try:
        events = read_until(rx, refusals, "refused a manifest")
        snapshot = session_state(state)
        tx = serve(sender, channel.release, "--rate", "4M", "--asm", "--duration", "60s")
        code, events, err = finish(rx, events)
    finally:
        stop([p for p in (rx, tx, attacker) if p is not None])
    assert_nothing_forged(out, channel, state)
    return code, events, err, snapshot


# --- Replay of an older valid release ----------------------------------------------------------


def test_replay_of_an_older_release_stream_is_refused_by_sequence_and_the_new_one_completes(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # sender, attacker, receiver
    old = Channel.make(tmp_path / "old", 1 * MB, sequence=2, chunk="256K")
    # The same release key signed both.
    new = Channel.make(tmp_path / "new", 4 * MB, sequence=4, chunk="256K", key_from=old.release)
    assert (old.group, old.port) == (new.group, new.port)
    # The replay: the old release's own stream, byte for byte, from another host on the group.
    replay = serve(net.hosts[1], old.release, "--rate", "4M", "--asm", "--duration", "60s")
    code, events, err, snapshot = hostile_then_honest(
        net, new, tmp_path, replay, 1, "--installed-sequence", "3"
    )
    assert code == 0, err
    notes = [str(e.get("message")) for e in events if e["event"] == "note"]
    assert any("sequence 2 is not above the installed 3" in n for n in notes), notes
    assert snapshot == []  # refused before any state was kept
    counts = rejected(events)
    assert counts["manifest-refused"] == 1  # verified once; repeats cost one lookup each
    assert counts["other-session"] > 0  # the replayed DATA, counted
    assert (tmp_path / "out.img").read_bytes() == new.release.image.read_bytes()
    assert session_state(tmp_path / "state") == []
    print(f"\nreplay: refused once, {counts} datagrams of the old release counted")


# --- Manifests refused before any state is kept ------------------------------------------------


def test_expired_wrong_device_other_channel_below_threshold_and_unknown_key_manifests_keep_no_state(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # sender, attacker, receiver
    channel = Channel.make(tmp_path / "release", 1 * MB, chunk="256K")
    key = load_secret(channel.release.directory / "release.key")
    second, stranger = generate(), generate()
    write_keypair(second, tmp_path / "second", overwrite=True)
    m, now = channel.manifest, int(time.time())
    hostile = {
        "expired": sign(
            dataclasses.replace(m, created=now - 7200, expires=now - 60), [key, second]
        ),
        "wrong device": sign(dataclasses.replace(m, compatible=("toaster",)), [key, second]),
        # Another channel's release, signed by the same keys, far ahead in sequence.
        "other channel": sign(
            dataclasses.replace(
                m,
                sequence=900,
                transport=Transport.for_channel("beta.otacast.test", rates=m.transport.rates),
            ),
            [key, second],
        ),
        "below threshold": channel.envelope,  # the release as first signed, by one key
        "unknown key": sign(m, [stranger]),
    }
    # The device wants 2 of {release, second}: the sender serves the co-signed manifest.
    cosigned = subprocess.run(
        [
            SIGNER,
            "sign",
            "--cosign",
            str(channel.release.manifest),
            "--key",
            str(tmp_path / "second.key"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cosigned.returncode == 0, cosigned.stderr
    datagrams = [d for e in hostile.values() for d in manifest_datagrams(e)]
    attacker = inject(net.hosts[1], channel, 60, 200, datagrams=datagrams, directory=tmp_path)
    code, events, err, snapshot = hostile_then_honest(
        net,
        channel,
        tmp_path,
        attacker,
        5,
        "--trust",
        str(tmp_path / "second.pub"),
        "--threshold",
        "2",
    )
    assert code == 0, err
    notes = [str(e.get("message")) for e in events if "refused a manifest" in str(e.get("message"))]
    for fragment in (
        "expired at",
        "'testboard' is not among toaster",
        "is for channel 'beta.otacast.test'",
        "2 required",
        "untrusted keys",
    ):
        assert sum(fragment in n for n in notes) == 1, (fragment, notes)
    assert snapshot == []  # five refusals, and not a file of session state
    assert rejected(events)["manifest-refused"] == 5
    assert (tmp_path / "out.img").read_bytes() == channel.release.image.read_bytes()


# --- Claimed sizes beyond the caps ---------------------------------------------------------------


def over_cap(m: Manifest, image_length: int, chunk_size: int) -> Manifest:
    chunk_size = chunk_size // m.fec.symbol_size * m.fec.symbol_size  # whole symbols
    count = -(-image_length // chunk_size)
    return dataclasses.replace(
        m,
        image=ImageInfo("huge.img", image_length, b"\x11" * 32, "raw"),
        chunks=Chunking(chunk_size, tuple(i.to_bytes(32, "big") for i in range(count))),
    )


def test_claimed_sizes_beyond_the_image_manifest_and_chunk_count_caps_are_refused_unallocated(
    lan: LanFactory, channel: Channel, tmp_path: Path
) -> None:
    net = lan(3)  # sender, attacker, receiver
    key = load_secret(channel.release.directory / "release.key")
    m = channel.manifest
    # Validly signed by the trusted key, never round-tripped through the parser: what a
    # careless build pipeline (or a stolen key) could put on the channel.
    huge = [
        over_cap(m, MAX_IMAGE_BYTES + 1, MAX_CHUNK_BYTES),  # 64 GiB + 1 byte
        over_cap(m, (MAX_CHUNKS + 1) * SMALLEST_CHUNK, SMALLEST_CHUNK),  # 16385 chunks
    ]
    envelopes = [Envelope(h, (Signature(key.key_id, key.sign(signing_message(h))),)) for h in huge]
    datagrams = [d for e in envelopes for d in manifest_datagrams(e)]
    # Fragments claiming a manifest beyond the 2 MiB cap (and 4 GiB): the packet class refuses
    # to build them, so the length field is written by hand.
    template = bytearray(manifest_datagrams(channel.envelope)[0])
    claims = []
    for total in (MAX_MANIFEST_BYTES + 1, 0xFFFFFFFF):
        template[20:24] = total.to_bytes(4, "big")
        claims.append(bytes(template))
    attacker = inject(
        net.hosts[1], channel, 60, 4000, datagrams=claims + datagrams, directory=tmp_path
    )
    code, events, err, snapshot = hostile_then_honest(net, channel, tmp_path, attacker, 2)
    assert code == 0, err
    notes = [str(e.get("message")) for e in events if "refused a manifest" in str(e.get("message"))]
    assert any("signed/image/length: 68719476737 is greater than the maximum" in n for n in notes)
    assert any("signed/chunks/sha256" in n for n in notes), notes
    assert snapshot == []
    counts = rejected(events)
    assert counts["manifest-length"] > 0 and counts["manifest-refused"] == 2
    summary = summary_of(events)
    # Nothing was sized from a claim: the receiver's peak stays that of a 4 MB download.
    assert float(summary["peak_rss_mb"]) < 150, summary  # type: ignore[arg-type]
    assert (tmp_path / "out.img").read_bytes() == channel.release.image.read_bytes()
    print(f"\ncaps: {counts}, peak RSS {summary['peak_rss_mb']} MB")
