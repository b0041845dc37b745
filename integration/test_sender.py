"""The carousel sender on a real namespaced LAN, observed by a bare listener in another
namespace: every header, the paced rate, two senders' disjoint symbols, a late joiner's
manifest, and the operator's errors."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from otacast.schemas.errors import ImageMismatch
from otacast.schemas.limits import SERVE_EXPIRY_CHECK_SECONDS
from otacast.schemas.manifest import parse_envelope
from otacast.schemas.units import format_time
from otacast.signer.channels import DEFAULT_INDEX_SHARE
from otacast.signer.errors import NetworkError, ServedManifestExpired
from otacast.signer.symbol_cache import CycleLayout

from .netns import BIN, Lan, LanFactory, stop
from .release import Release, serve_command

RAWRECV = str(Path(__file__).with_name("rawrecv.py"))
CHUNK = 1024 * 1024


@dataclass
class Sent:
    """A release and what a listener expects of its stream: group, port, session, layout."""

    release: Release
    group: str
    port: int
    session: str
    layout: CycleLayout

    @property
    def manifest(self) -> Path:
        return self.release.manifest

    @property
    def image(self) -> Path:
        return self.release.image


@pytest.fixture
def release(tmp_path: Path) -> Sent:
    signed = Release.make(tmp_path, 4 * CHUNK - 1000, sequence=5, chunk="1M")
    m = parse_envelope(signed.manifest.read_bytes()).manifest
    return Sent(
        signed,
        m.transport.ssm_group,
        m.transport.port,
        f"{m.tsi:08x}",  # the LCT TSI
        CycleLayout.for_manifest(m, 0.5),
    )


def listen(lan: Lan, host: int, release: Sent, seconds: float) -> subprocess.Popen[str]:
    return lan.hosts[host].popen(
        str(BIN / "python"),
        RAWRECV,
        "eth0",
        release.group,
        str(release.port),
        str(seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def serve(lan: Lan, host: int, release: Sent, cache: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        serve_command(lan.hosts[host], release.release, cache, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(process: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    loaded: dict[str, object] = json.loads(out)
    return loaded


def test_every_datagram_is_well_formed_and_the_rate_holds_within_5_percent(
    lan: LanFactory, release: Sent, tmp_path: Path
) -> None:
    net = lan(3)
    # What the main group carries of the 20 MB/s asked: the index group (the raw image's block
    # index alone, on its own group) takes the default 4%.
    rate = 20_000_000 * (1 - DEFAULT_INDEX_SHARE)
    rx = listen(net, 1, release, 4.0)
    time.sleep(0.3)
    tx = serve(net, 0, release, tmp_path / "cache", "--rate", "20M", "--duration", "3s")
    try:
        seen = result(rx)
        out, err = tx.communicate(timeout=30)
    finally:
        stop([rx, tx])
    assert tx.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["reason"] == "done"

    assert seen["problems"] == {}
    assert seen["sessions"] == {release.session: sum(seen["kinds"].values())}  # type: ignore[attr-defined]
    assert set(seen["per_source"]) == {net.hosts[0].address}  # type: ignore[arg-type]
    data_size = release.layout.datagram_size
    assert data_size == 1228
    sizes = {int(k): v for k, v in seen["sizes"].items()}  # type: ignore[attr-defined]
    assert max(sizes) == data_size and sizes[data_size] >= seen["kinds"]["data"]  # type: ignore[index]
    for _, chunk, esi in seen["symbols"]:  # type: ignore[attr-defined]
        assert 0 <= chunk < 4 and 0 <= esi < release.layout.cycles[chunk]
    # The block index object (a raw image: sign lists one) goes out at about its share of the
    # airtime: 14 source symbols beside 4 x 868, 0.40%; a visit of 2 a round beside 4 x 112.
    kinds: dict[str, int] = seen["kinds"]  # type: ignore[assignment]
    share = kinds["index"] / kinds["data"]
    print(f"index datagrams: {kinds['index']} beside {kinds['data']} DATA = {share:.3%}")
    assert 0.003 < share < 0.006

    # Rate over 2 s, starting half a second after the first datagram arrived.
    slots = {int(k): v for k, v in seen["slots"].items()}  # type: ignore[attr-defined]
    first = min(slots)
    window = range(first + 5, first + 25)
    measured = sum(slots.get(s, 0) for s in window) / 2.0
    assert measured == pytest.approx(rate, rel=0.05)


def test_two_senders_at_0_of_2_and_1_of_2_emit_disjoint_symbols(
    lan: LanFactory, release: Sent, tmp_path: Path
) -> None:
    net = lan(3)
    # Sender 1/2 sends, in every round, the visit half a cycle ahead of sender 0/2's, and the
    # round is the wall clock's.  With a 400% repair pool a cycle is 39 visits of each chunk, a
    # pass 8 of them (a round of this release lasts ~0.14 s at 4 MB/s), so the two passes are
    # disjoint unless the senders start more than ~11 rounds (~1.5 s) apart.
    rx = listen(net, 2, release, 5.0)
    time.sleep(0.3)
    common = ("--rate", "4M", "--loops", "1", "--repair", "400%")
    tx0 = serve(net, 0, release, tmp_path / "c0", "--sender", "0/2", *common)
    tx1 = serve(net, 1, release, tmp_path / "c1", "--sender", "1/2", *common)
    try:
        seen = result(rx)
        for tx in (tx0, tx1):
            assert tx.wait(30) == 0
    finally:
        stop([rx, tx0, tx1])
    by_source: dict[str, set[tuple[int, int]]] = {}
    for source, chunk, esi in seen["symbols"]:  # type: ignore[attr-defined]
        by_source.setdefault(source, set()).add((chunk, esi))
    a, b = (by_source[h.address] for h in net.hosts[:2])
    assert not a & b
    manifest = parse_envelope(release.manifest.read_bytes()).manifest
    for chunk in range(manifest.chunk_count):
        k = manifest.source_symbols(chunk)
        # Each sender alone carries enough for the chunk; together they carry twice as much.
        assert sum(1 for c, _ in a if c == chunk) >= k
        assert sum(1 for c, _ in b if c == chunk) >= k


def test_a_receiver_joining_mid_loop_has_the_manifest_within_a_second(
    lan: LanFactory, release: Sent, tmp_path: Path
) -> None:
    net = lan(3)
    tx = serve(net, 0, release, tmp_path / "cache", "--rate", "20M", "--duration", "6s")
    try:
        time.sleep(2.0)
        rx = listen(net, 1, release, 2.0)
        seen = result(rx)
    finally:
        stop([tx])
    assert seen["manifest_session"] == release.session
    assert seen["manifest_at"] is not None and seen["manifest_at"] <= 1.0  # type: ignore[operator]


def _one_line_error(process: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, process.stderr
    assert "Traceback" not in process.stderr
    return lines[0]


def serve_once(
    lan: Lan, release: Sent, cache: Path, *args: str, image: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `serve` to completion in the first host (eth0 unless --interface is given), with
    its human-readable output."""
    return subprocess.run(
        serve_command(lan.hosts[0], release.release, cache, *args, image=image, json_lines=False),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_interface_is_a_clear_error(lan: LanFactory, release: Sent, tmp_path: Path) -> None:
    net = lan(3)
    done = serve_once(net, release, tmp_path, "--interface", "eth9")
    assert done.returncode == NetworkError.exit_code
    assert "interface 'eth9' does not exist" in _one_line_error(done)


def test_source_address_not_on_the_interface_is_a_clear_error(
    lan: LanFactory, release: Sent, tmp_path: Path
) -> None:
    net = lan(3)
    done = serve_once(net, release, tmp_path, "--source", "fd51::99")
    assert done.returncode == NetworkError.exit_code
    assert "fd51::99 is not on interface eth0" in _one_line_error(done)


def test_image_not_matching_the_manifest_is_refused_before_sending(
    lan: LanFactory, release: Sent, tmp_path: Path
) -> None:
    net = lan(3)
    other = tmp_path / "other.img"
    data = bytearray(release.image.read_bytes())
    data[CHUNK + 7] ^= 1
    other.write_bytes(bytes(data))
    done = serve_once(net, release, tmp_path, image=other)
    assert done.returncode == ImageMismatch.exit_code
    assert "chunk 1 does not match" in _one_line_error(done)


def test_a_rate_the_sender_cannot_reach_is_reported_with_what_it_reached(
    lan: LanFactory, release: Sent, tmp_path: Path
) -> None:
    net = lan(3)
    done = serve_once(net, release, tmp_path, "--rate", "200G", "--duration", "3s")
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    # The carousel's channel asked for 96% of it (the index group, on its own group, the rest).
    assert "MB/s of the 192000.0 MB/s asked" in warning[0]


def test_a_sender_whose_manifest_expires_warns_then_stops_with_its_own_exit_code(
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(2)
    lifetime = 6  # seconds: time to encode a small release and serve it for a few seconds
    signed = Release.make(tmp_path, 300_000, extra=("--expires", f"{lifetime}s"))
    expires = parse_envelope(signed.manifest.read_bytes()).manifest.expires
    command = serve_command(
        net.hosts[0], signed, tmp_path / "cache", "--rate", "1M", "--duration", "20s"
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    stopped_at = time.time()

    assert done.returncode == ServedManifestExpired.exit_code == 17, done.stderr
    error = _one_line_error(done)
    assert f"manifest expired at {format_time(expires)} while being served" in error
    events = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    serving = events[kinds.index("serving")]
    assert (serving["expires"], serving["expires_at"]) == (expires, format_time(expires))
    # Started inside the last lead time: one warning, naming the date, before anything stops.
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and f"expires at {format_time(expires)}" in warnings[0]
    assert kinds.index("warning") > kinds.index("serving")
    finished = events[-1]
    assert finished["event"] == "finished" and finished["reason"] == "expired"
    assert finished["packets"] > 0  # it did serve until then
    # It stopped at expiry, not before, and within the check interval (plus process exit).
    assert expires <= stopped_at < expires + SERVE_EXPIRY_CHECK_SECONDS + 2
