"""Packet authentication end to end: a host on the LAN floods the channel's ASM group with
forged DATA, MANIFEST and AUTH datagrams at ten times the honest sender's packet rate.

With packet authentication the receiver decodes only what the sender's stream key vouched for:
the image arrives over multicast alone, with no decode spoiled.  Without it (``--packet-auth
off``) the same flood pollutes decodes; the image is still exact (every chunk is verified) but
only because spoiled chunks are collected again, and it does not finish.  The time ratio is
printed (run with -s); the benchmark, not this test, is where it is judged.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otacast.schemas import wire
from otacast.schemas.manifest import Envelope, parse_envelope
from otacast.signer.keys import SigningKey

from .attacks import PYTHON, Channel, asm_fetch, inject
from .netns import Host, Lan, LanFactory, stop
from .release import Release, keygen, serve

MB = 1_000_000
RATE = 2 * MB  # bytes/s: the honest sender, paced well below what the machine can do
HONEST_PPS = RATE // 1228
ATTACK_PPS = 10 * HONEST_PPS
# How long the unauthenticated receiver is watched under attack: several clean runs (~4 s).
WATCH = 20


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Release, Path]:
    directory = tmp_path_factory.mktemp("auth-release")
    secret, public = keygen(directory / "stream")
    release = Release.make(directory, 6 * MB, extra=("--stream-key", str(public)))
    return release, secret


def forgeries(envelope: Envelope) -> list[bytes]:
    """Forged MANIFEST fragments (a bogus envelope claiming the session) and AUTH pages signed by
    a key the manifest does not list, claiming the honest sender's number; `inject.py` mixes
    in forged DATA of its own."""
    m = envelope.manifest
    rng = random.Random(5)
    stranger = SigningKey(bytes(range(32)))
    datagrams = []
    for n in range(400):
        bogus = os.urandom(1100)
        datagrams += [
            wire.build_datagram(p)
            for p in wire.fragment_envelope(m.tsi, rng.randbytes(8), bogus, 1228)
        ]
        digests = os.urandom(wire.DIGEST_BYTES * wire.auth_capacity(1228))
        page = wire.AuthPacket(
            m.tsi, 0, rng.randrange(m.chunk_count), n % 40, 1 << 62, digests, bytes(64)
        )
        unsigned = wire.build_datagram(page)
        datagrams.append(unsigned[:-64] + stranger.sign(wire.auth_signed_bytes(unsigned)))
    return datagrams


def attack(lan: Lan, release: Release, tmp_path: Path) -> subprocess.Popen[str]:
    """The third host floods the channel: `forgeries` in turn with forged DATA of its own."""
    channel = Channel.of(release)
    datagrams = forgeries(channel.envelope)
    return inject(
        lan.hosts[2],
        channel,
        300,
        ATTACK_PPS,
        datagrams=datagrams,
        forge_data=True,
        directory=tmp_path,
    )


def start_fetch(
    receiver: Host, release: Release, envelope: Envelope, tmp_path: Path, policy: str, *args: str
) -> subprocess.Popen[str]:
    """`otacast fetch` on the channel's ASM group (the attacker reaches it), multicast only."""
    return asm_fetch(
        receiver,
        Channel(release, envelope),
        tmp_path / "state",
        tmp_path / "out.img",
        "--packet-auth",
        policy,
        "--fallback",
        "never",
        *args,
    )


def receive(
    lan: Lan,
    release: Release,
    key: Path,
    tmp_path: Path,
    *,
    flood: bool = False,
    attacker_start: Callable[[], subprocess.Popen[str]] | None = None,
    rate: int = RATE,
) -> tuple[dict[str, object], float, dict[str, object] | None]:
    """One authenticated download, timed from the sender's first packet: the receiver has
    joined already and the sender's symbols are cached, so runs compare delivery alone.  The
    attacker is the forgery flood (`flood`) or what `attacker_start` starts."""
    envelope = parse_envelope(release.manifest.read_bytes())
    tmp_path.mkdir(parents=True, exist_ok=True)
    sender, receiver = lan.hosts[0], lan.hosts[1]
    attacker = attack(lan, release, tmp_path) if flood else None
    if attacker_start is not None:
        attacker = attacker_start()
    rx = start_fetch(receiver, release, envelope, tmp_path, "require", "--join-timeout", "60")
    tx = None
    try:
        time.sleep(1.0)  # joined, and under attack if there is one
        started = time.monotonic()
        tx = serve(
            sender,
            release,
            "--asm",
            "--rate",
            str(rate),
            "--stream-key",
            str(key),
            "--duration",
            "300s",
        )
        out, err = rx.communicate(timeout=180)
        elapsed = time.monotonic() - started
    finally:
        stop([rx] + ([tx] if tx else []) + ([attacker] if attacker else []))
    report = None
    if attacker is not None:
        sent, _ = attacker.communicate(timeout=10)
        lines = [line for line in sent.splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if lines else None
    assert rx.returncode == 0, err
    assert (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "finished"
    return events[-1], elapsed, report


def test_a_flood_of_forged_packets_cannot_spoil_a_decode_when_packets_are_authenticated(
    lan: LanFactory, signed: tuple[Release, Path], tmp_path: Path
) -> None:
    net = lan(3)  # sender, receiver, attacker
    release, key = signed
    stop([serve(net.hosts[0], release, "--stream-key", str(key), ready=True)])  # cache symbols
    clean, clean_time, _ = receive(net, release, key, tmp_path / "clean", flood=False)
    attacked, attacked_time, report = receive(net, release, key, tmp_path / "attacked", flood=True)
    assert clean["bytes_http"] == 0 and attacked["bytes_http"] == 0
    rejected = attacked["rejected"]
    assert isinstance(rejected, dict)
    assert rejected.get("chunk-hash-mismatch", 0) == 0  # no forged symbol reached a decoder
    assert rejected.get("decoder-fault", 0) == 0
    assert rejected.get("auth-forged", 0) + rejected.get("auth-budget", 0) > 0
    assert report is not None and report["sent"] > 0
    auth = attacked["packet_auth"]
    assert isinstance(auth, dict) and auth["pages_signed"] >= 1
    print(
        f"\npacket auth on: clean {clean_time:.1f} s, under attack {attacked_time:.1f} s "
        f"(ratio {attacked_time / clean_time:.2f}); forged datagrams sent {report['sent']}, "
        f"rejections {dict(sorted(rejected.items()))}"
    )


def test_without_packet_authentication_the_same_flood_stalls_the_download(
    lan: LanFactory, signed: tuple[Release, Path], tmp_path: Path
) -> None:
    net = lan(3)  # sender, receiver, attacker
    # The denial of service packet authentication exists for: forged symbols are decoded, the
    # chunks they spoil fail their hash (so no forged byte is ever written) and are collected
    # again, over and over.  Watched for WATCH seconds, several times the clean run.
    release, _ = signed
    envelope = parse_envelope(release.manifest.read_bytes())
    sender, receiver = net.hosts[0], net.hosts[1]
    attacker = attack(net, release, tmp_path)
    tx = serve(sender, release, "--asm", "--rate", str(RATE), "--duration", "300s")
    rx = start_fetch(receiver, release, envelope, tmp_path, "off")
    last: dict[str, object] = {}
    try:
        deadline = time.monotonic() + WATCH
        assert rx.stdout is not None
        for line in rx.stdout:
            event = json.loads(line)
            if event["event"] in ("progress", "finished"):
                last = event
            if event["event"] == "finished" or time.monotonic() > deadline:
                break
    finally:
        stop([rx, tx, attacker])
    rejected = last.get("rejected_by") or last.get("rejected")
    assert isinstance(rejected, dict)
    assert rejected.get("chunk-hash-mismatch", 0) > 0  # forged symbols reached decoders
    assert not (tmp_path / "out.img").exists() or (
        (tmp_path / "out.img").read_bytes() == release.image.read_bytes()
    )
    print(
        f"\npacket auth off: after {WATCH} s under attack {last.get('bytes_done', '?')} of "
        f"{envelope.manifest.image.length} bytes done ({last['event']}); "
        f"rejections {dict(sorted(rejected.items()))}"
    )


# --- Replayed genuine pages (issue 13, attack 1) ----------------------------------------------

REPLAY_RATE = 8 * MB  # bytes/s: the honest sender of the replay test
REPLAY_SIZE = 32 * MB  # 32 chunks of 1 MiB: most chunks are "not being sent" at any moment
RECORD = str(Path(__file__).with_name("record.py"))


def record_pages(host: Host, channel: Channel, seconds: float, out: Path) -> int:
    """Record the AUTH pages heard on the channel's ASM group for `seconds`; how many."""
    recorder = host.popen(
        PYTHON,
        RECORD,
        "eth0",
        channel.group,
        str(channel.port),
        str(seconds),
        str(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out_text, err = recorder.communicate(timeout=seconds + 30)
    assert recorder.returncode == 0, err
    return int(json.loads(out_text.splitlines()[-1])["recorded"])


def test_genuine_pages_replayed_at_the_honest_packet_rate_cost_the_download_nothing(
    lan: LanFactory, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    # A host with no keys records a loop of the sender's genuine AUTH pages, then, during a
    # later download, replays them to the channel at the honest packet rate.  Before pages
    # carried their sending time, each replay re-admitted its digests into one shared cache and
    # pushed out the real sender's fresh ones: a 64 MiB download that took 8 s had 2 of 64
    # chunks after 240 s.  Now a replayed page is stale and costs a comparison.
    net = lan(3)  # sender, receiver, attacker
    directory = tmp_path_factory.mktemp("replay-release")
    secret, public = keygen(directory / "stream")
    release = Release.make(directory, REPLAY_SIZE, chunk="1M", extra=("--stream-key", str(public)))
    channel = Channel.of(release)
    sender, attacker_host = net.hosts[0], net.hosts[2]
    recording = tmp_path / "recorded.bin"
    tx = serve(
        sender,
        release,
        "--asm",
        "--rate",
        str(REPLAY_RATE),
        "--stream-key",
        str(secret),
        ready=True,
    )
    try:
        loop = REPLAY_SIZE / REPLAY_RATE * 1.2
        recorded = record_pages(attacker_host, channel, loop, recording)
    finally:
        stop([tx])
    assert recorded > REPLAY_SIZE // (1228 * 113)  # a loop's worth of pages

    def replay(times: int) -> Callable[[], subprocess.Popen[str]]:
        def start() -> subprocess.Popen[str]:
            return attacker_host.popen(
                PYTHON,
                str(Path(__file__).with_name("inject.py")),
                "eth0",
                channel.group,
                str(channel.port),
                "300",
                "--pps",
                str(times * REPLAY_RATE // 1228),
                "--file",
                str(recording),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )

        return start

    lines = []
    # Twice at the honest packet rate, once at three times it (where the page cache the
    # replays flushed before took 1.6-5x the clean time).
    for run, times in enumerate((1, 1, 3)):
        clean, clean_time, _ = receive(
            net, release, secret, tmp_path / f"clean{run}", rate=REPLAY_RATE
        )
        attacked, attacked_time, report = receive(
            net,
            release,
            secret,
            tmp_path / f"replayed{run}",
            rate=REPLAY_RATE,
            attacker_start=replay(times),
        )
        assert report is not None and report["sent"] > 0
        assert clean["bytes_http"] == 0 and attacked["bytes_http"] == 0
        rejected = attacked["rejected"]
        assert isinstance(rejected, dict)
        # The replays were heard: refused as stale, or, when a whole loop of them was held
        # before the manifest and accepted in order ahead of the sender's first fresh page
        # (genuine pages of this release, so harmless), recognised as repeats from then on,
        # which the summary does not count; then they show as more refused before the manifest
        # than in the clean run (the attacker sends for a second before the sender starts).
        # (The stale count alone failed in one of four fresh-clone CI runs.)
        clean_rejected = clean["rejected"]
        assert isinstance(clean_rejected, dict)
        early = rejected.get("no-manifest-yet", 0) - clean_rejected.get("no-manifest-yet", 0)
        assert rejected.get("auth-stale", 0) > 0 or early > 0
        assert rejected.get("chunk-hash-mismatch", 0) == 0
        assert rejected.get("unauthenticated", 0) == 0  # no honest datagram lost its page
        used = int(attacked["symbols_used"]) / int(clean["symbols_used"])  # type: ignore[call-overload]
        assert used <= 1.3, (clean, attacked)
        lines.append(
            f"{times}x honest rate: clean {clean_time:.1f} s, replayed {attacked_time:.1f} s "
            f"(ratio {attacked_time / clean_time:.2f}), symbols used ratio {used:.3f}, "
            f"{rejected.get('auth-stale', 0)} stale pages refused"
        )
    print(f"\nreplayed pages ({recorded} recorded):\n  " + "\n  ".join(lines))
