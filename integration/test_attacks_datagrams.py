"""The adversarial suite, network half: the datagram stream an attacker writes into.

Each test is named after an attack of issue 6.  The attacker, a host on the receiver's LAN,
injects datagrams into the channel's ASM group with ``inject.py``: malformed ones (truncated,
oversized, wrong version or magic, wrong symbol length), which the receiver must count by
reason and survive, and forged DATA and MANIFEST datagrams at ten times the honest rate.
Packet authentication (stream keys, AUTH packets) is not used here: this is how a release
without stream keys fares; ``test_packet_auth.py`` covers the same flood with them.  Forged DATA
at ten times the honest rate spoils every decode, so such a receiver completes from the HTTP
mirror.  Each test asserts that nothing forged is written and that the honest release
completes.  Figures (datagrams forged and rejected, times under attack against a clean run) are
printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from otacast.schemas import wire

from .attacks import (
    DATAGRAM,
    MB,
    Channel,
    asm_fetch,
    assert_nothing_forged,
    finish,
    inject,
    injected,
    manifest_datagrams,
    nginx,
    rejected,
)
from .netns import Lan, LanFactory, stop
from .release import fetch, publish, random_loss, serve, summary_of

RATE = 2_000_000  # the honest sender's rate, bytes/s


# --- Malformed datagrams -------------------------------------------------------------------------


def malformed(channel: Channel) -> dict[str, list[bytes]]:
    """Hostile datagrams by the reason the receiver must count them under."""
    m = channel.manifest
    data = wire.build_datagram(wire.DataPacket(m.tsi, 0, 1, b"\x77" * 1208))
    head = manifest_datagrams(channel.envelope)[0][: wire.MANIFEST_HEADER_SIZE]
    return {
        "short": [b"", b"\x10\xa0\x04", data[:11], data[: wire.DATA_HEADER_SIZE], head],
        # Beyond the largest datagram a device accepts (8952 bytes); the last two are larger
        # than the receive buffer too (and 60000 bytes arrive as IPv6 fragments).
        "oversized": [head + b"\0" * 8917, head + b"\0" * 9000, head + b"\0" * 60000],
        "bad-version": [bytes([v << 4]) + data[1:] for v in (0, 2, 3, 15)],  # LCT version
        "old-wire-version": [b"OC\x02\x01" + m.session_id + data[12:]],  # otacast wire 2
        "bad-header": [data[:1] + b"\xa1" + data[2:]],  # the close-object flag
        "unknown-kind": [data[:3] + b"\x07" + data[4:]],  # codepoint 7
        "bad-toi": [data[:12] + bytes(4) + data[16:]],  # DATA of the FDT's TOI
        "symbol-length": [data[:-1], data + b"\0", data[:28], data + b"\0" * 4000],
        "bad-sbn": [data[:16] + b"\xff" + data[17:]],  # SBN 255: an object has at most 255
        "chunk-range": [data[:12] + (99).to_bytes(4, "big") + data[16:]],  # TOI 99 of 1 object
    }


def test_truncated_oversized_wrong_version_and_wrong_length_symbol_datagrams_are_counted(
    lan: LanFactory, channel: Channel, tmp_path: Path
) -> None:
    net = lan(3)  # sender, attacker, receiver
    sender, attacker_host, receiver = net.hosts
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
    assert set(counts) <= {*hostile, "no-manifest-yet", "decode-pending", "decoder-budget"}, counts
    # The attacker sends every datagram once per round, so each reason is counted once per
    # round for every datagram in it (give or take the round the receiver joined or left in):
    # none is lost uncounted, not even those too long for the receive buffer.
    rounds = counts["old-wire-version"]
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
    publish(channel.release, channel.release.directory / "www")
    return channel


@pytest.fixture(scope="module")
def clean_seconds(mirrored: Channel, tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long the same fetch takes on the same kind of LAN with nobody attacking."""
    with Lan.create(3) as lan:
        seconds, code, events, err, _ = timed_fetch(lan, mirrored, tmp_path_factory.mktemp("clean"))
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
        toi = wire.manifest_toi(rng.randbytes(8)) if i % 3 == 2 else q.toi
        total = q.total_length + (i % 3 == 1)
        fragment = rng.randbytes(min(q.fragment_size, total - q.offset))
        packet = wire.ManifestPacket(q.tsi, toi, total, q.fragment_size, q.index, fragment)
        out.append(wire.build_datagram(packet))
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
    lan: LanFactory, mirrored: Channel, clean_seconds: float, tmp_path: Path, kind: str
) -> None:
    net = lan(3)  # sender, attacker, receiver
    if kind == "data":
        pps = 10 * RATE / DATAGRAM
        forged: dict[str, object] = {"forge_data": True}
    else:
        pps = 10 * CAROUSEL_PER_SECOND * len(manifest_datagrams(mirrored.envelope))
        forged = {"datagrams": forged_manifests(mirrored), "directory": tmp_path}
    with nginx(net.hosts[0], mirrored.release.directory / "www", tmp_path / "nginx"):
        attacker = inject(net.hosts[1], mirrored, FLOOD_SECONDS, pps, **forged)  # type: ignore[arg-type]
        try:
            seconds, code, events, err, under_attack = timed_fetch(
                net, mirrored, tmp_path, attacker
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


# --- A spoiled decode while the groups are left --------------------------------------------------


def test_a_decode_spoiled_while_the_groups_were_left_joins_them_again_and_completes(
    lan: LanFactory, tmp_path: Path
) -> None:
    """A one-chunk image through 10% loss: once the chunk holds K symbols and is with the decode
    worker, nothing else is left to collect, so the receiver leaves the carousel's group for
    the decode (the receive loop's `_leave_groups`; an inline decode runs in the same turn of
    the loop as the datagram that completed its chunk, before the loop would leave).  One
    forged repair symbol, sent before the sender started, spoils that decode; the chunk must
    then collect again, so the receiver has to join the group again or stall.  It leaves a
    second time only if it joined in between, and it finishes from the carousel alone (no
    HTTP fallback)."""
    sender, attacker, receiver = lan(3).hosts
    channel = Channel.make(tmp_path / "release", 2 * MB)
    m = channel.manifest
    assert m.chunk_count == 1
    # An early repair ESI: ahead of the honest one, which then arrives as a duplicate.
    forged = wire.build_datagram(
        wire.DataPacket(m.tsi, 0, m.source_symbols(0) + 1, b"\x66" * m.fec.symbol_size)
    )
    random_loss(receiver, 10)
    rx = asm_fetch(
        receiver,
        channel,
        tmp_path / "state",
        tmp_path / "out.img",
        "--fallback",
        "never",
        "--decode",
        "worker",
    )
    tx = None
    try:
        time.sleep(0.5)  # joined: what comes now is held until the manifest is verified
        forger = inject(attacker, channel, 0.5, 40, datagrams=[forged], directory=tmp_path)
        forger.wait(timeout=10)
        assert injected(forger) >= 10  # all of them before the sender starts
        tx = serve(sender, channel.release, "--rate", str(RATE), "--asm", "--duration", "60s")
        code, events, err = finish(rx, [], timeout=60)
    finally:
        stop([p for p in (rx, tx) if p is not None])
    assert code == 0, err
    summary = summary_of(events)
    spoiled = rejected(events)
    assert spoiled.get("chunk-hash-mismatch", 0) >= 1, spoiled  # the forged symbol was used
    assert summary["left_for_decodes"] >= 2, summary  # left, joined again, left again
    assert summary["bytes_http"] == 0
    assert (tmp_path / "out.img").read_bytes() == channel.release.image.read_bytes()
