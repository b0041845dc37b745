"""The attacker's tools and the checks of what an attack left behind, for the adversarial suite
(``test_attacks_*.py``) and the packet-authentication test.

The attacker is a host on the same LAN as the receiver: `inject` starts ``inject.py`` there,
sending forged or malformed datagrams to the channel's ASM group (any host may send to it, and
receivers joined to it hear them).  A `Channel` is a signed release together with the group and
port its manifest names, which is all an attacker needs to know (it is public).  After an
attack, `assert_nothing_forged`, `logged_chunks` and `session_state` look at what the receiver
wrote: the image must be the signed one or absent, and every staged chunk a verified one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from otacast.schemas import wire
from otacast.schemas.manifest import Envelope, Manifest, parse_envelope

from . import services
from .inject import write_datagrams
from .netns import BIN, Host, stop
from .release import Release, fetch, start_fetch, summary_of

MB = 1_000_000
PYTHON = str(BIN / "python")
INJECT = str(Path(__file__).with_name("inject.py"))
DATAGRAM = 1228  # an honest DATA datagram at the default symbol size


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
        return cls.of(Release.make(directory, size, **kwargs))  # type: ignore[arg-type]

    @classmethod
    def of(cls, release: Release) -> Channel:
        return cls(release, parse_envelope(release.manifest.read_bytes()))


def manifest_datagrams(envelope: Envelope) -> list[bytes]:
    m = envelope.manifest
    return [
        wire.build_datagram(p)
        for p in wire.fragment_envelope(
            m.tsi, envelope.envelope_id, envelope.compact_bytes, DATAGRAM
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
        args += ["--forge-data", f"{m.tsi:08x},{m.chunk_count},{m.fec.symbol_size}"]
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
    return start_fetch(host, channel.release, state, out, "--group", channel.group, *args)


def http_fetch(
    host: Host, channel: Channel, state: Path, out: Path, timeout: float = 120
) -> tuple[int, list[dict[str, object]], str]:
    """`otacast fetch` of a release from its HTTP mirrors only (the manifest given); a fetch
    still running after `timeout` seconds raises `subprocess.TimeoutExpired`."""
    return fetch(
        host,
        channel.release,
        state,
        out,
        "--manifest",
        str(channel.release.manifest),
        "--fallback",
        "only",
        timeout=timeout,
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
