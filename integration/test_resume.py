"""Resuming without the sender (issue 14 item 3): a download interrupted while its sender was
on the channel is finished, after the sender has gone, by running the same command again: the
verified manifest kept in the state directory names the mirrors (real nginx), and the chunks
already stored are kept."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from otacast.schemas.manifest import parse_envelope

from . import services
from .netns import LanFactory, stop
from .release import Release, fetch, publish, serve, start_fetch, summary_of

MB = 1_000_000
PORT = 8080


def test_the_same_command_after_the_sender_has_gone_finishes_from_the_mirror_with_the_kept_manifest(
    lan: LanFactory, tmp_path: Path
) -> None:
    sender, device = lan(2).hosts
    # 16 chunks: they complete a few at a time during the carousel's last round (16 visits of
    # 112 datagrams, ~2 s at 1 MB/s), so a progress line can see 3 of them done.
    release = Release.make(
        tmp_path / "release",
        8 * MB,
        chunk="512K",
        http_url=f"http://[{sender.address}]:{PORT}/rel/rootfs.img",
    )
    www = tmp_path / "www"
    publish(release, www)
    state, out = tmp_path / "state", tmp_path / "out.img"
    # The same options both times: --channel (always given) and where the sender was.
    args = ("--source", sender.address, "--join-timeout", "2")
    try:
        with services.nginx(sender, www, tmp_path / "nginx", PORT) as mirror:
            tx = serve(sender, release, "--rate", "1M", "--duration", "120s")
            try:
                first = start_fetch(device, release, state, out, *args)
                assert first.stdout is not None
                for line in first.stdout:
                    event = json.loads(line)
                    if event.get("event") == "progress" and int(event["chunks_done"]) >= 3:
                        break
                # The sender goes away first, so that no chunk completes after the count was
                # read (the carousel completes its chunks within the last round: at 2 MB/s all
                # 16 could finish between a progress line and the interrupt) ...
                stop([tx])
                first.send_signal(signal.SIGINT)  # ... and the download is interrupted
                first.communicate(timeout=30)
            finally:
                stop([tx])
            assert not out.exists()
            assert mirror.served() == []  # multicast alone so far
            code, events, err = fetch(device, release, state, out, *args)
            served = mirror.served()
    except services.ServiceMissing as exc:
        pytest.skip(str(exc))
    assert code == 0, err
    notes = [str(e["message"]) for e in events if e.get("event") == "note"]
    used = [n for n in notes if "with the verified manifest kept in" in n]
    assert len(used) == 1, notes
    assert used[0].startswith("nothing heard on the channel within 2 s: continuing rootfs.img")
    summary = summary_of(events)
    resumed, http = int(summary["bytes_resumed"]), int(summary["bytes_http"])  # type: ignore[call-overload]
    assert summary["bytes_multicast"] == 0
    # The chunks stored by the first run (at least 3) were kept; chunks are RFC 6330 blocks of
    # slightly different lengths, and the image's last one is short by its padding ...
    m = parse_envelope(release.manifest.read_bytes()).manifest
    lengths = sorted(m.chunk_span(i)[1] for i in range(m.chunk_count))
    assert resumed >= sum(lengths[:3])
    assert resumed + http == 8 * MB  # ... and only the others fetched
    assert served and all(s.status == 206 for s in served)
    assert sum(s.bytes for s in served) == http
    assert out.read_bytes() == release.image.read_bytes()
    assert not any(state.glob("*/manifest.json"))  # handed on: nothing left to resume
