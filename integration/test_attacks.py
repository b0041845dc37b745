"""The adversarial suite, network half: `otacast fetch` on namespaced LANs under attack.

Each test is named after an attack of issue 6 and asserts that nothing forged is written (the
image is byte-identical, or absent, and no session state outlives a refusal) and, where the
attack allows it, that the honest release still completes.  The attacker is a host on the same
LAN: `inject.py` sends forged or malformed datagrams to the channel's ASM group (any host may
send to it), a real `otacast-signer serve` of an older release replays that release's stream,
and `badmirror.py` and nginx are hostile HTTP mirrors.  Receivers join the ASM group, so the
attacker's datagrams do reach them.  The pure half of the suite is ``tests/test_attacks.py``.

Packet authentication (stream keys, AUTH packets) is not used here: this is how a release
without stream keys fares; ``integration/test_packet_auth.py`` covers the same flood with them.
Forged DATA at ten times the honest rate spoils every decode, so such a receiver completes from
the HTTP mirror.  Figures (datagrams forged and rejected, times under attack against a clean
run, resume runs) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from otacast.plugin.errors import IncompleteError, StateError
from otacast.schemas import wire
from otacast.schemas.limits import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_BYTES,
)
from otacast.schemas.manifest import (
    Chunking,
    Envelope,
    ImageInfo,
    Manifest,
    Signature,
    parse_envelope,
    signing_message,
)
from otacast.signer.keys import generate, load_secret, write_keypair
from otacast.signer.sign import sign

from . import services
from .inject import write_datagrams
from .netns import BIN, Host, Lan, stop
from .release import SIGNER, Release, fetch, fetch_command, serve

MB = 1_000_000
PYTHON = str(BIN / "python")
INJECT = str(Path(__file__).with_name("inject.py"))
BADMIRROR = str(Path(__file__).with_name("badmirror.py"))
RATE = 2_000_000  # the honest sender's rate, bytes/s
DATAGRAM = 1228  # an honest DATA datagram at the default symbol size


# --- Helpers -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Channel:
    """A signed release and the ASM group and port its channel uses."""

    release: Release
    envelope: Envelope

    @property
    def manifest(self) -> Manifest:
        return self.envelope.manifest

    @property
    def group(self) -> str:
        return self.manifest.transport.asm_group

    @property
    def port(self) -> int:
        return self.manifest.transport.port

    @classmethod
    def make(cls, directory: Path, size: int, **kwargs: object) -> Channel:
        release = Release.make(directory, size, **kwargs)  # type: ignore[arg-type]
        return cls(release, parse_envelope(release.manifest.read_bytes()))


def publish(channel: Channel, root: Path) -> None:
    """Lay the release out under `root` at every mirror URL's path (`otacast-signer publish`)."""
    release = channel.release
    subprocess.run(
        [SIGNER, "publish", str(release.manifest), str(release.image), "--root", str(root)],
        check=True,
        capture_output=True,
    )


def manifest_datagrams(envelope: Envelope) -> list[bytes]:
    m = envelope.manifest
    return [
        wire.build_datagram(p)
        for p in wire.fragment_envelope(
            m.session_id, envelope.envelope_id, envelope.compact_bytes, DATAGRAM
        )
    ]


def inject(
    host: Host,
    channel: Channel,
    seconds: float,
    pps: float,
    *,
    datagrams: list[bytes] | None = None,
    forge_data: bool = False,
    directory: Path | None = None,
) -> subprocess.Popen[str]:
    """Start the attacker: `datagrams` in turn, and/or fresh forged DATA of the channel's session
    (the session id, chunk count and symbol size are public: read off the channel)."""
    args = [INJECT, "eth0", channel.group, str(channel.port), str(seconds), "--pps", str(pps)]
    if datagrams is not None:
        assert directory is not None
        path = directory / "attack.bin"
        write_datagrams(path, datagrams)
        args += ["--file", str(path)]
    if forge_data:
        m = channel.manifest
        args += ["--forge-data", f"{m.session_id.hex()},{m.chunk_count},{m.fec.symbol_size}"]
    return host.popen(PYTHON, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def injected(attacker: subprocess.Popen[str]) -> int:
    """Stop the attacker; how many datagrams it sent."""
    stop([attacker])
    out, err = attacker.communicate()
    assert out.strip(), err
    return int(json.loads(out.splitlines()[-1])["sent"])


def asm_fetch(
    host: Host, channel: Channel, state: Path, out: Path, *args: str
) -> subprocess.Popen[str]:
    """`otacast fetch` joined to the channel's ASM group, its JSON lines on a pipe."""
    return subprocess.Popen(
        fetch_command(host, channel.release, state, out, "--group", channel.group, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(
    process: subprocess.Popen[str], wanted: int, text: str, timeout: float = 30
) -> list[dict[str, object]]:
    """JSON lines of `process` until `wanted` notes containing `text` have been read."""
    assert process.stdout is not None
    events: list[dict[str, object]] = []
    timer = threading.Timer(timeout, process.kill)  # a receiver that never says it fails here
    timer.start()
    try:
        for line in process.stdout:
            events.append(json.loads(line))
            notes = [e for e in events if text in str(e.get("message", ""))]
            if len(notes) >= wanted:
                break
    finally:
        timer.cancel()
    return events


def finish(
    process: subprocess.Popen[str], events: list[dict[str, object]], timeout: float = 120
) -> tuple[int, list[dict[str, object]], str]:
    out, err = process.communicate(timeout=timeout)
    events += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return process.returncode, events, err


def summary_of(events: list[dict[str, object]]) -> dict[str, object]:
    assert events and events[-1]["event"] == "finished", events[-3:]
    return events[-1]


def rejected(events: list[dict[str, object]]) -> dict[str, int]:
    counts = summary_of(events)["rejected"]
    assert isinstance(counts, dict)
    return counts


def session_state(state: Path) -> list[str]:
    """What the state directory holds beyond the status record: session directories."""
    if not state.exists():
        return []
    return sorted(p.name for p in state.iterdir() if p.name != "status.json")


def logged_chunks(state: Path, manifest: Manifest) -> dict[int, bool]:
    """Chunks the session's log names, and whether each one's staged bytes verify."""
    directory = state / manifest.session_id.hex()
    try:
        log = (directory / "chunks.log").read_bytes()
        part = (directory / "image.part").read_bytes()
    except FileNotFoundError:
        return {}
    result = {}
    for i in range(0, len(log) - len(log) % 4, 4):
        index = int.from_bytes(log[i : i + 4], "big")
        offset, length = manifest.chunk_span(index)
        result[index] = (
            hashlib.sha256(part[offset : offset + length]).digest() == manifest.chunks.sha256[index]
        )
    return result


def assert_nothing_forged(out: Path, channel: Channel, state: Path) -> None:
    """The output is the signed image or absent, and every staged chunk is the signed one."""
    assert not out.exists() or out.read_bytes() == channel.release.image.read_bytes()
    assert all(logged_chunks(state, channel.manifest).values())


@contextmanager
def nginx(host: Host, root: Path, prefix: Path, extra: str = "") -> Iterator[services.Nginx]:
    """nginx serving `root` on [host]:8080, stopped and reaped on exit; a skip if missing."""
    try:
        with services.nginx(host, root, prefix, extra=extra) as running:
            yield running
    except services.ServiceMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def lan() -> Iterator[Lan]:
    lan = Lan.create(3)  # sender, attacker, receiver
    try:
        yield lan
    finally:
        lan.delete()


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    return Channel.make(tmp_path_factory.mktemp("release"), 4 * MB, chunk="256K")


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
    lan: Lan, tmp_path: Path
) -> None:
    old = Channel.make(tmp_path / "old", 1 * MB, sequence=2, chunk="256K")
    (tmp_path / "new").mkdir()
    for suffix in (".key", ".pub"):  # the same release key signed both
        shutil.copy(old.release.directory / f"release{suffix}", tmp_path / "new")
    new = Channel.make(tmp_path / "new", 4 * MB, sequence=4, chunk="256K")
    assert (old.group, old.port) == (new.group, new.port)
    # The replay: the old release's own stream, byte for byte, from another host on the group.
    replay = serve(lan.hosts[1], old.release, "--rate", "4M", "--asm", "--duration", "60s")
    code, events, err, snapshot = hostile_then_honest(
        lan, new, tmp_path, replay, 1, "--installed-sequence", "3"
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


def test_expired_wrong_device_below_threshold_and_unknown_key_manifests_keep_no_state(
    lan: Lan, tmp_path: Path
) -> None:
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
    attacker = inject(lan.hosts[1], channel, 60, 200, datagrams=datagrams, directory=tmp_path)
    code, events, err, snapshot = hostile_then_honest(
        lan,
        channel,
        tmp_path,
        attacker,
        4,
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
        "2 required",
        "untrusted keys",
    ):
        assert sum(fragment in n for n in notes) == 1, (fragment, notes)
    assert snapshot == []  # four refusals, and not a file of session state
    assert rejected(events)["manifest-refused"] == 4
    assert (tmp_path / "out.img").read_bytes() == channel.release.image.read_bytes()


# --- Claimed sizes beyond the caps ---------------------------------------------------------------


def over_cap(m: Manifest, image_length: int, chunk_size: int) -> Manifest:
    count = -(-image_length // chunk_size)
    return dataclasses.replace(
        m,
        image=ImageInfo("huge.img", image_length, b"\x11" * 32, "raw"),
        chunks=Chunking(chunk_size, tuple(i.to_bytes(32, "big") for i in range(count))),
    )


def test_claimed_sizes_beyond_the_image_manifest_and_chunk_count_caps_are_refused_unallocated(
    lan: Lan, channel: Channel, tmp_path: Path
) -> None:
    key = load_secret(channel.release.directory / "release.key")
    m = channel.manifest
    # Validly signed by the trusted key, never round-tripped through the parser: what a
    # careless build pipeline (or a stolen key) could put on the channel.
    huge = [
        over_cap(m, MAX_IMAGE_BYTES + 1, MAX_CHUNK_BYTES),  # 64 GiB + 1 byte
        over_cap(m, (MAX_CHUNKS + 1) * MIN_CHUNK_BYTES, MIN_CHUNK_BYTES),  # 16385 chunks
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
        lan.hosts[1], channel, 60, 4000, datagrams=claims + datagrams, directory=tmp_path
    )
    code, events, err, snapshot = hostile_then_honest(lan, channel, tmp_path, attacker, 2)
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


# --- Malformed datagrams -------------------------------------------------------------------------


def malformed(channel: Channel) -> dict[str, list[bytes]]:
    """Hostile datagrams by the reason the receiver must count them under."""
    session = channel.manifest.session_id
    data = wire.build_datagram(wire.DataPacket(session, 0, 1, b"\x77" * 1208))
    fragment = manifest_datagrams(channel.envelope)[0]
    return {
        "short": [b"", b"OC\x01", data[:11], data[: wire.DATA_HEADER_SIZE], fragment[:28]],
        # Beyond the largest datagram a device accepts (8952 bytes); the last two are larger
        # than the receive buffer too (and 60000 bytes arrive as IPv6 fragments).
        "oversized": [
            b"OC\x01\x02" + session + b"\0" * 8941,
            b"OC\x01\x02" + session + b"\0" * 9000,
            b"OC\x01\x01" + session + b"\0" * 60000,
        ],
        "bad-version": [data[:2] + bytes([v]) + data[3:] for v in (0, 2, 255)],
        "bad-magic": [b"XY" + data[2:]],
        "unknown-kind": [data[:3] + b"\x07" + data[4:]],
        "symbol-length": [data[:-1], data + b"\0", data[:28], data + b"\0" * 4000],
        "bad-sbn": [data[:16] + b"\x01" + data[17:]],
    }


def test_truncated_oversized_wrong_version_and_wrong_length_symbol_datagrams_are_counted(
    lan: Lan, channel: Channel, tmp_path: Path
) -> None:
    sender, attacker_host, receiver = lan.hosts
    hostile = malformed(channel)
    datagrams = [d for group in hostile.values() for d in group]
    attacker = inject(attacker_host, channel, 60, 2000, datagrams=datagrams, directory=tmp_path)
    tx = serve(sender, channel.release, "--rate", "4M", "--asm", "--duration", "60s")
    state, out = tmp_path / "state", tmp_path / "out.img"
    try:
        time.sleep(0.5)  # the attack is on before the receiver joins
        code, events, err = fetch(receiver, channel.release, state, out, "--group", channel.group)
    finally:
        stop([tx])
        sent = injected(attacker)
    assert code == 0, err  # and, had anything raised, a traceback instead of a summary
    assert out.read_bytes() == channel.release.image.read_bytes()
    counts = rejected(events)
    assert set(counts) <= {*hostile, "no-manifest-yet", "decoder-budget"}, counts
    # The attacker sends every datagram once per round, so each reason is counted once per
    # round for every datagram in it (give or take the round the receiver joined or left in):
    # none is lost uncounted, not even those too long for the receive buffer.
    rounds = counts["bad-magic"]
    assert rounds > 20, counts
    for reason, group in hostile.items():
        assert abs(counts[reason] - rounds * len(group)) <= len(group), (reason, counts)
    total = sum(counts[r] for r in hostile)
    print(f"\nmalformed: {sent} sent, {total} counted by reason: {counts}")


# --- Forged DATA and MANIFEST datagrams at ten times the honest rate (no packet auth) -----------

FLOOD_SECONDS = 10.0
MIRROR = "http://[fd51::1]:8080/rel/rootfs.img"  # nginx on the sender's host


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    channel = Channel.make(
        tmp_path_factory.mktemp("mirrored"), 4 * MB, chunk="256K", http_url=MIRROR
    )
    publish(channel, channel.release.directory / "www")
    return channel


@pytest.fixture(scope="module")
def clean_seconds(mirrored: Channel, tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long the same fetch takes on the same kind of LAN with nobody attacking."""
    lan = Lan.create(3)
    try:
        seconds, code, events, err, _ = timed_fetch(lan, mirrored, tmp_path_factory.mktemp("clean"))
    finally:
        lan.delete()
    assert code == 0, err
    assert summary_of(events)["bytes_http"] == 0
    return seconds


def timed_fetch(
    lan: Lan, channel: Channel, tmp_path: Path, attacker: subprocess.Popen[str] | None = None
) -> tuple[float, int, list[dict[str, object]], str, bool]:
    """Fetch from the ASM group with the sender already going; (seconds, exit code, events,
    stderr, whether the attacker was still sending when the fetch ended)."""
    sender, _, receiver = lan.hosts
    tx = serve(
        sender, channel.release, "--rate", str(RATE), "--asm", "--duration", "120s", ready=True
    )
    try:
        started = time.monotonic()
        rx = asm_fetch(
            receiver,
            channel,
            tmp_path / "state",
            tmp_path / "out.img",
            "--stall-timeout",
            "2",
            "--join-timeout",
            "30",
        )
        code, events, err = finish(rx, [], timeout=FLOOD_SECONDS + 60)
        seconds = time.monotonic() - started
        under_attack = attacker is not None and attacker.poll() is None
    finally:
        stop([tx])
    return seconds, code, events, err, under_attack


def forged_manifests(channel: Channel, count: int = 3000) -> list[bytes]:
    """What an attacker who heard the carousel forges, in turn: fragments under the honest
    session and envelope id at the honest offsets with garbage inside (they poison the
    reassembly), the same claiming another total length (they make the receiver drop it), and
    fragments under random envelope ids (they push it out)."""
    rng = random.Random(6)
    honest = [wire.parse_datagram(d) for d in manifest_datagrams(channel.envelope)]
    out = []
    for i in range(count):
        q = honest[i % len(honest)]
        assert isinstance(q, wire.ManifestPacket)
        envelope_id = rng.randbytes(8) if i % 3 == 2 else q.envelope_id
        total = q.total_length + (i % 3 == 1)
        fragment = rng.randbytes(len(q.fragment))
        out.append(
            wire.build_datagram(
                wire.ManifestPacket(q.session, envelope_id, total, q.offset, fragment)
            )
        )
    return out


CAROUSEL_PER_SECOND = 4  # the sender re-sends its manifest four times a second


@pytest.mark.parametrize(
    "kind",
    [
        # forged DATA at ten times the honest sender's rate: decodes fail their hash, forged
        # symbols do not count as progress, so the stall timer falls back to HTTP
        "data",
        # forged MANIFEST fragments at ten times the carousel's rate of honest ones
        "manifest",
    ],
)
def test_forged_data_and_manifest_at_10x_without_packet_auth_write_nothing_and_complete(
    lan: Lan, mirrored: Channel, clean_seconds: float, tmp_path: Path, kind: str
) -> None:
    if kind == "data":
        pps = 10 * RATE / DATAGRAM
        forged: dict[str, object] = {"forge_data": True}
    else:
        pps = 10 * CAROUSEL_PER_SECOND * len(manifest_datagrams(mirrored.envelope))
        forged = {"datagrams": forged_manifests(mirrored), "directory": tmp_path}
    with nginx(lan.hosts[0], mirrored.release.directory / "www", tmp_path / "nginx"):
        attacker = inject(lan.hosts[1], mirrored, FLOOD_SECONDS, pps, **forged)  # type: ignore[arg-type]
        try:
            seconds, code, events, err, under_attack = timed_fetch(
                lan, mirrored, tmp_path, attacker
            )
        finally:
            sent = injected(attacker)
    assert code == 0, err
    assert_nothing_forged(tmp_path / "out.img", mirrored, tmp_path / "state")
    summary = summary_of(events)
    figures = (
        f"\nforged {kind} at {pps:.0f}/s for {FLOOD_SECONDS:g} s: {sent} sent; receiver took "
        f"{summary['datagrams']} datagrams, rejected {summary['rejected']}; HTTP "
        f"{summary['bytes_http']} bytes; {seconds:.1f} s against {clean_seconds:.1f} s clean "
        f"(ratio {seconds / clean_seconds:.2f})"
    )
    print(figures)
    if not under_attack:
        raise AssertionError(f"completed only once the attack stopped:{figures}")


def http_fetch(
    host: Host, channel: Channel, state: Path, out: Path
) -> tuple[int, list[dict[str, object]], str]:
    """`otacast fetch` of a release from its HTTP mirrors only (the manifest given)."""
    return fetch(
        host,
        channel.release,
        state,
        out,
        "--manifest",
        str(channel.release.manifest),
        "--fallback",
        "only",
    )


# --- Hostile HTTP mirrors ------------------------------------------------------------------------

NGINX_EXTRA = "        location /error/ { return 500; }"


@contextmanager
def mirrors(
    host: Host, channel: Channel, tmp_path: Path
) -> Iterator[tuple[services.Nginx, subprocess.Popen[str]]]:
    """nginx on :8080 serving what `publish` laid out (and 500 under /error/), and the hostile
    `badmirror.py` on :8081 serving the release's image; both stopped and reaped on exit."""
    www = tmp_path / "www"
    publish(channel, www)
    bad = host.popen(
        PYTHON, BADMIRROR, host.address, "8081", str(channel.release.image), stdout=subprocess.PIPE
    )
    try:
        assert bad.stdout is not None and bad.stdout.readline().strip() == "listening"
        with nginx(host, www, tmp_path / "nginx", NGINX_EXTRA) as running:
            yield running, bad
    finally:
        stop([bad])


def bad_mirror_stats(bad: subprocess.Popen[str]) -> dict[str, dict[str, int]]:
    stop([bad])
    out, _ = bad.communicate()
    result: dict[str, dict[str, int]] = json.loads(out.splitlines()[-1])
    return result


def with_mirrors(tmp_path: Path, size: int, urls: list[str]) -> Channel:
    """A release of `size` bytes in 64 KiB chunks whose manifest lists `urls`, in order."""
    http = tuple(arg for url in urls for arg in ("--http-url", url))
    return Channel.make(tmp_path / "release", size, chunk="64K", extra=http)


def timed_http_fetch(
    host: Host, channel: Channel, tmp_path: Path
) -> tuple[float, int, list[dict[str, object]], str]:
    started = time.monotonic()
    code, events, err = http_fetch(host, channel, tmp_path / "state", tmp_path / "out.img")
    return time.monotonic() - started, code, events, err


def test_mirrors_serving_wrong_bytes_500s_short_and_endless_bodies_are_left_for_the_next_mirror(
    lan: Lan, tmp_path: Path
) -> None:
    server, _, device = lan.hosts
    base, hostile = f"http://[{server.address}]", f"http://[{server.address}]:8081"
    urls = [
        f"{base}:8080/tampered/rootfs.img",  # nginx, a file with one byte changed per chunk
        f"{base}:8080/error/rootfs.img",  # nginx, 500 Internal Server Error
        f"{hostile}/short/rootfs.img",  # declares the range, sends half, hangs up
        f"{hostile}/endless/rootfs.img",  # a body that never ends
        f"{base}:8080/good/rootfs.img",
    ]
    channel = with_mirrors(tmp_path, 4 * 65536 - 1000, urls)
    count = channel.manifest.chunk_count
    with mirrors(server, channel, tmp_path) as (running, bad):
        tampered = tmp_path / "www" / "tampered" / "rootfs.img"
        data = bytearray(tampered.read_bytes())
        for index in range(count):
            data[channel.manifest.chunk_span(index)[0] + 7] ^= 0x20
        tampered.write_bytes(bytes(data))
        seconds, code, events, err = timed_http_fetch(device, channel, tmp_path)
        served = running.served()
    stats = bad_mirror_stats(bad)
    assert code == 0, err
    out = tmp_path / "out.img"
    assert out.read_bytes() == channel.release.image.read_bytes()
    summary = summary_of(events)
    assert summary["bytes_http"] == channel.manifest.image.length
    # Every chunk was asked of every hostile mirror in turn, refused, and taken from the next.
    by_path = {
        p: sorted(s.status for s in served if s.path == p)
        for p in ("/tampered/rootfs.img", "/error/rootfs.img", "/good/rootfs.img")
    }
    assert by_path == {
        "/tampered/rootfs.img": [206] * count,
        "/error/rootfs.img": [500] * count,
        "/good/rootfs.img": [206] * count,
    }
    assert stats["hits"] == {"short": count, "endless": count}
    # Bounded memory: the endless body was cut off near the chunk length (the rest is what the
    # kernel's socket buffers took before the device hung up), and the device stayed small.
    endless = stats["written"]["endless"]
    assert endless < count * 8 * MB, stats
    assert float(summary["peak_rss_mb"]) < 150, summary  # type: ignore[arg-type]
    assert seconds < 10  # no hostile mirror held the device for a timeout
    print(
        f"\nmirrors: {count} chunks past 4 hostile mirrors in {seconds:.1f} s; endless body cut "
        f"after {endless} bytes written; peak RSS {summary['peak_rss_mb']} MB"
    )


def test_a_slow_drip_mirror_is_abandoned_at_its_deadline_for_the_next(
    lan: Lan, tmp_path: Path
) -> None:
    server, _, device = lan.hosts
    urls = [
        f"http://[{server.address}]:8081/drip/rootfs.img",
        f"http://[{server.address}]:8080/good/rootfs.img",
    ]
    channel = with_mirrors(tmp_path, 65536, urls)
    with mirrors(server, channel, tmp_path) as (running, bad):
        seconds, code, _, err = timed_http_fetch(device, channel, tmp_path)
        served = running.served()
    stats = bad_mirror_stats(bad)
    assert code == 0, err
    assert (tmp_path / "out.img").read_bytes() == channel.release.image.read_bytes()
    assert stats["hits"] == {"drip": 1}
    dripped = stats["written"]["drip"]
    assert dripped < 65536 // 100  # one byte every 0.2 s: never idle, never nearly done
    assert [(s.path, s.status) for s in served] == [("/good/rootfs.img", 206)]
    # The deadline for a 64 KiB chunk is the 10 s read timeout plus 64 KiB at 32 KiB/s.
    assert 11 < seconds < 20, seconds
    print(f"\ndrip: abandoned after {dripped} bytes; done in {seconds:.1f} s (deadline 12 s)")


# --- Disk full in the state directory; state files corrupted between runs ------------------------


@dataclasses.dataclass
class MountedHost(Host):
    """A namespace host seen through a private mount namespace held open by process `pid`:
    what is mounted there (a small tmpfs) exists for its commands only, and vanishes with it."""

    pid: int = 0

    def command(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *args]

    def path(self, path: Path) -> Path:
        """`path` as this mount namespace sees it, for reading from outside."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def mount_tmpfs(self, path: Path, size: str, *, remount: bool = False) -> None:
        options = f"remount,size={size}" if remount else f"size={size}"
        done = self.run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
        assert done.returncode == 0, done.stderr


@contextmanager
def private_mounts(host: Host) -> Iterator[MountedHost]:
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    holder = host.popen("unshare", "--mount", "--propagation", "private", "sleep", "600")
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/comm").read_text().strip() != "sleep":
            assert holder.poll() is None and time.monotonic() < deadline, "unshare failed"
            time.sleep(0.02)
        yield MountedHost(host.netns, host.address, pid=holder.pid)
    finally:
        stop([holder])


def partial_release(tmp_path: Path, sequence: int = 3) -> tuple[Channel, Path]:
    """A 1 MB release (16 chunks) whose only mirror serves the last chunk wrong, so a first run
    keeps 15 verified chunks and fails; returns it and the served file (to mend later)."""
    url = f"http://[fd51::1]:8080/s{sequence}/rootfs.img"
    channel = Channel.make(
        tmp_path / f"release{sequence}", 1 * MB, chunk="64K", sequence=sequence, http_url=url
    )
    publish(channel, tmp_path / "www")
    served = tmp_path / "www" / f"s{sequence}" / "rootfs.img"
    spoil(served)
    return channel, served


def spoil(served: Path) -> None:
    """Change the last byte of a mirror's file: its last chunk no longer verifies."""
    data = bytearray(served.read_bytes())
    data[-1] ^= 0x01
    served.write_bytes(bytes(data))


def mend(channel: Channel, served: Path) -> None:
    shutil.copyfile(channel.release.image, served)


def one_line_error(err: str, text: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in err, err


def test_disk_full_in_the_state_directory_is_a_clear_error_and_the_download_resumes_after(
    lan: Lan, tmp_path: Path
) -> None:
    server, _, device = lan.hosts
    channel, served = partial_release(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out.img"
    state.mkdir()
    with nginx(server, tmp_path / "www", tmp_path / "nginx"), private_mounts(device) as mounted:
        # 1. Less space than the image: refused at the start, in one line, nothing handed on.
        mounted.mount_tmpfs(state, "512k")
        code, _, err = http_fetch(mounted, channel, state, out)
        assert code == StateError.exit_code, err
        one_line_error(err, "No space left on device")
        assert not out.exists()
        # 2. Space returns; the mirror fails on one chunk: 15 verified chunks are kept.
        mounted.mount_tmpfs(state, "2m", remount=True)
        code, _, err = http_fetch(mounted, channel, state, out)
        assert code == IncompleteError.exit_code, err
        kept = logged_chunks(mounted.path(state), channel.manifest)
        assert sorted(kept) == list(range(15)) and all(kept.values())
        # 3. Something else fills the disk to the last byte; the mirror is mended.  The image's
        # space was reserved at the start, so the download resumes and completes.
        filler = mounted.run("dd", "if=/dev/zero", f"of={state}/filler", "bs=64k")
        assert "No space left on device" in filler.stderr
        mend(channel, served)
        code, events, err = http_fetch(mounted, channel, state, out)
        assert code == 0, err
        summary = summary_of(events)
        assert summary["bytes_resumed"] == 15 * 65536
        assert summary["bytes_http"] == channel.manifest.image.length - 15 * 65536
    assert out.read_bytes() == channel.release.image.read_bytes()


def test_disk_full_because_an_abandoned_download_holds_its_space_does_not_block_the_next_release(
    lan: Lan, tmp_path: Path
) -> None:
    server, _, device = lan.hosts
    older, _ = partial_release(tmp_path, sequence=3)
    newer, served = partial_release(tmp_path, sequence=4)
    mend(newer, served)
    state, out = tmp_path / "state", tmp_path / "out.img"
    state.mkdir()
    with nginx(server, tmp_path / "www", tmp_path / "nginx"), private_mounts(device) as mounted:
        mounted.mount_tmpfs(state, "1536k")  # room for one image in the making, not two
        code, _, err = http_fetch(mounted, older, state, out)  # fails on one chunk, abandoned
        assert code == IncompleteError.exit_code, err
        assert len(session_state(mounted.path(state))) == 1
        # The next release comes out before the older one was ever completed.
        code, _, err = http_fetch(mounted, newer, state, out)
        assert code == 0, err
        assert session_state(mounted.path(state)) == []
    assert out.read_bytes() == newer.release.image.read_bytes()


def test_state_files_corrupted_between_runs_cost_only_the_chunks_they_name(
    lan: Lan, tmp_path: Path
) -> None:
    server, _, device = lan.hosts
    channel, served = partial_release(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out.img"
    with nginx(server, tmp_path / "www", tmp_path / "nginx"):
        code, _, err = http_fetch(device, channel, state, out)
        assert code == IncompleteError.exit_code, err
        session = state / channel.manifest.session_id.hex()
        # Bit rot in two staged chunks, junk and a torn entry in the log, garbage in the
        # staged manifest copy, the lock file and the status record.
        with (session / "image.part").open("r+b") as part:
            for index in (2, 5):
                part.seek(index * 65536 + 100)
                part.write(b"\xde\xad")
        with (session / "chunks.log").open("ab") as log:
            log.write(b"\x00\x00\x00\x0f" + b"\xff\xff\xff\xfe" + b"\x00\x01")
        for name in ("manifest.json", "lock"):
            (session / name).write_bytes(os.urandom(300))
        (state / "status.json").write_bytes(b"{\xff")
        mend(channel, served)
        code, events, err = http_fetch(device, channel, state, out)
        assert code == 0, err
        assert summary_of(events)["bytes_resumed"] == 13 * 65536  # 15 kept, 2 rotted
        assert out.read_bytes() == channel.release.image.read_bytes()
        # A state file that is no file at all: one clear line, and the output is untouched.
        spoil(served)
        code, _, err = http_fetch(device, channel, state, tmp_path / "second.img")
        assert code == IncompleteError.exit_code
        (session / "chunks.log").unlink()
        (session / "chunks.log").mkdir()
        code, _, err = http_fetch(device, channel, state, tmp_path / "second.img")
    assert code == StateError.exit_code, err
    one_line_error(err, "chunks.log")
    assert not (tmp_path / "second.img").exists()


# --- kill -9 of the receiver at random points -----------------------------------------------------

KILLS = 20
RECEIVERS = 4  # trials run on this many receivers at once, all hearing one sender
KILL_SEED = 20260


def test_kill_9_of_the_receiver_at_20_random_points_every_run_resumes_to_an_identical_image(
    channel: Channel, tmp_path: Path
) -> None:
    lan = Lan.create(1 + RECEIVERS)
    sender, receivers = lan.hosts[0], lan.hosts[1:]
    image = channel.release.image.read_bytes()
    source = ("--source", sender.address)
    try:
        # Two chunks interleaved at a time: chunks complete (and are written) all through the
        # run, not in a burst at the end of one wide window, so kills land amid writes too.
        tx = serve(
            sender,
            channel.release,
            "--rate",
            str(RATE),
            "--window",
            "2",
            "--duration",
            "300s",
            ready=True,
        )
        try:
            started = time.monotonic()
            code, _, err = fetch(
                receivers[0], channel.release, tmp_path / "clean", tmp_path / "clean.img", *source
            )
            clean = time.monotonic() - started
            assert code == 0, err
            rng = random.Random(KILL_SEED)
            delays = [rng.uniform(0.0, 1.1 * clean) for _ in range(KILLS)]
            trials: list[dict[str, object]] = [{} for _ in range(KILLS)]

            def trial(host: Host, index: int) -> None:
                state, out = tmp_path / f"k{index}" / "state", tmp_path / f"k{index}" / "out.img"
                out.parent.mkdir()
                first = subprocess.Popen(
                    fetch_command(host, channel.release, state, out, *source),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    first.wait(delays[index])
                    killed = False
                except subprocess.TimeoutExpired:
                    os.kill(first.pid, signal.SIGKILL)
                    first.wait()
                    killed = True
                logged = logged_chunks(state, channel.manifest)
                code, events, err = fetch(host, channel.release, state, out, *source)
                trials[index] = {
                    "killed": killed,
                    "logged": logged,
                    "code": code,
                    "err": err,
                    "resumed": summary_of(events)["bytes_resumed"] if code == 0 else None,
                    "identical": out.exists() and out.read_bytes() == image,
                }

            def worker(slot: int) -> None:
                for index in range(slot, KILLS, RECEIVERS):
                    trial(receivers[slot], index)

            threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(RECEIVERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            stop([tx])
    finally:
        lan.delete()
    passed = 0
    for index, result in enumerate(trials):
        logged = result["logged"]
        assert isinstance(logged, dict)
        # The log never names a chunk whose bytes did not reach the staging file ...
        assert all(logged.values()), (index, result)
        assert result["code"] == 0, (index, result["err"])
        # ... and the next run resumes exactly what was logged, to an identical image.
        assert result["resumed"] == sum(channel.manifest.chunk_span(i)[1] for i in logged), (
            index,
            result,
        )
        assert result["identical"], index
        passed += 1
    killed = [r for r in trials if r["killed"]]
    mid = [r for r in killed if r["logged"]]
    print(
        f"\nkill -9: {passed} of {KILLS} resume runs passed (seed {KILL_SEED}, delays "
        f"0-{1.1 * clean:.1f} s, clean run {clean:.1f} s); {len(killed)} killed, {len(mid)} of "
        f"them with verified chunks on disk, {KILLS - len(killed)} finished first"
    )
    assert passed == KILLS
