"""Standard tools understand otacast's datagrams (issue 16): a plain FLUTE receiver (PyPI
``flute-alc``, a binding of the Rust ``flute`` crate) takes the image and the signed manifest
from a running ``otacast-signer serve``, and ``tshark`` dissects a capture of it as ALC/LCT with
RaptorQ (FEC Encoding ID 6) and an FDT, without a malformed-packet warning.

The image is 8 MiB: a stock flute-alc receiver refuses an object once more than 10 MiB of its
source blocks are being decoded at once (its ``object_max_cache_size``, not settable from
Python), and otacast's carousel advances every chunk every round (README, "Plain FLUTE
receivers").
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from otacast.schemas.manifest import parse_envelope

from .netns import BIN, Host, LanFactory, stop
from .release import Release, random_loss, serve

FLUTERCV = str(Path(__file__).with_name("flutercv.py"))
MB = 1024 * 1024


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return Release.make(tmp_path_factory.mktemp("release"), 8 * MB, chunk="1M")


def _stream(release: Release) -> tuple[str, int, int, bytes]:
    """The sender's group, port and TSI (the session id's first 32 bits), and the manifest
    envelope exactly as the sender sends it."""
    envelope = parse_envelope(release.manifest.read_bytes())
    transport = envelope.manifest.transport
    tsi = int.from_bytes(envelope.manifest.session_id[:4], "big")
    return transport.ssm_group, transport.port, tsi, envelope.compact_bytes


def _files(release: Release, out: Path) -> dict[str, bytes]:
    """What a FLUTE receiver should write, by FDT Content-Location."""
    *_, manifest = _stream(release)
    name = release.image.name
    return {name: release.image.read_bytes(), f"{name}.otacast.json": manifest}


def _flute_receive(host: Host, release: Release, out: Path, seconds: float) -> dict[str, object]:
    group, port, tsi, _ = _stream(release)
    wanted = [f"{n}={hashlib.sha256(d).hexdigest()}" for n, d in _files(release, out).items()]
    process = host.run(
        str(BIN / "python"),
        FLUTERCV,
        host.interface,
        group,
        str(port),
        str(tsi),
        str(out),
        str(seconds),
        *wanted,
        timeout=seconds + 30,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    # flute-alc itself prints a line as each file completes; the script's result comes last.
    result: dict[str, object] = json.loads(process.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("loss", [0, 10])
def test_a_plain_flute_receiver_reconstructs_image_and_manifest(
    lan: LanFactory, release: Release, tmp_path: Path, loss: int, nft_or_skip: None
) -> None:
    pytest.importorskip("flute", reason="flute-alc is not installed (make setup installs it)")
    net = lan(2)
    sender, receiver = net.hosts
    if loss:
        random_loss(receiver, loss)
    # One send per datagram, so that the loss applies to datagrams, not to GSO runs.
    tx = serve(sender, release, "--rate", "20M", "--no-gso", "--duration", "90s", ready=True)
    try:
        result = _flute_receive(receiver, release, tmp_path / "flute", 60)
    finally:
        stop([tx])
    assert result["matched"] == dict.fromkeys(_files(release, tmp_path), True), result
    for name, data in _files(release, tmp_path).items():
        assert (tmp_path / "flute" / name).read_bytes() == data
    # The AUTH pages travel on a TSI of their own, which a FLUTE receiver of the image's
    # session ignores: nothing otacast sends makes the standard receiver complain.
    assert result["errors"] == {}, result


def test_tshark_dissects_a_capture_as_alc_with_raptorq_and_an_fdt(
    lan: LanFactory, release: Release, tmp_path: Path
) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (.ci/packages lists it)")
    net = lan(2)
    sender, receiver = net.hosts
    group, port, tsi, _ = _stream(release)
    capture = tmp_path / "otacast.pcap"
    # One datagram per send: a veth link hands GSO runs to the capture unsegmented (a
    # physical NIC would put single datagrams on the wire).
    tx = serve(sender, release, "--rate", "4M", "--no-gso", "--duration", "60s", ready=True)
    try:
        # Bounded twice over: at most 3000 packets, at most 4 s.
        taken = receiver.run(
            tshark, "-i", "eth0", "-c", "3000", "-a", "duration:4", "-w", str(capture), timeout=30
        )
    finally:
        stop([tx])
    assert taken.returncode == 0, taken.stderr[-2000:]
    decode = ("-d", f"udp.port=={port},alc")
    verbose = _tshark(tshark, "-r", str(capture), *decode, "-V")
    assert "FEC Encoding ID: RaptorQ Code (6)" in verbose
    assert f"Transport Session Identifier: {tsi}" in verbose
    assert "FDT-Instance" in verbose and 'FEC-OTI-FEC-Encoding-ID="6"' in verbose
    assert "Malformed" not in verbose
    fields = _tshark(
        tshark,
        "-r",
        str(capture),
        *decode,
        "-Y",
        f"ipv6.dst == {group}",
        "-T",
        "fields",
        "-e",
        "rmt-lct.toi",
        "-e",
        "rmt-fec.encoding_id",
    )
    rows = [line.split("\t") for line in fields.splitlines() if line.strip()]
    assert len(rows) > 1000, rows[:5]
    # Every data packet is RaptorQ; the FDT (TOI 0) is among them.
    assert {row[0] for row in rows} >= {"0", "1"}, rows[:5]
    expert = _tshark(tshark, "-r", str(capture), *decode, "-q", "-z", "expert")
    assert "Malformed" not in expert and "Error" not in expert, expert


def _tshark(tshark: str, *args: str) -> str:
    # tshark runs on the capture file only: no network.
    done = subprocess.run([tshark, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
