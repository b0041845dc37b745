"""The adversarial suite, network half: hostile HTTP mirrors.

Each test is named after an attack of issue 6.  The release's manifest lists mirrors that are
hostile in turn, before a good one: nginx serving a file with a byte changed in every chunk or
answering 500, and ``badmirror.py`` declaring a range and sending half, sending a body that
never ends, or dripping a byte at a time.  Each test asserts that the image is the signed one,
that every hostile mirror was asked and left for the next, and that none of them held the
device for longer than its deadline or grew its memory.  Run with ``-s`` for the figures.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import services
from .attacks import MB, PYTHON, Channel, http_fetch, nginx
from .netns import Host, LanFactory, stop
from .release import publish, summary_of

BADMIRROR = str(Path(__file__).with_name("badmirror.py"))


# --- Hostile HTTP mirrors ------------------------------------------------------------------------

NGINX_EXTRA = "        location /error/ { return 500; }"


@contextmanager
def mirrors(
    host: Host, channel: Channel, tmp_path: Path
) -> Iterator[tuple[services.Nginx, subprocess.Popen[str]]]:
    """nginx on :8080 serving what `publish` laid out (and 500 under /error/), and the hostile
    `badmirror.py` on :8081 serving the release's image; both stopped and reaped on exit."""
    www = tmp_path / "www"
    publish(channel.release, www)
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
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # server, unused, device
    server, _, device = net.hosts
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
    lan: LanFactory, tmp_path: Path
) -> None:
    net = lan(3)  # server, unused, device
    server, _, device = net.hosts
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


def test_a_mirror_dripping_its_headers_is_abandoned_at_the_deadline_for_the_next(
    lan: LanFactory, tmp_path: Path
) -> None:
    # Issue 13, attack 6: one header byte a second, a header line that never ends.  No read is
    # ever idle for the 10 s read timeout and http.client reads headers before the fetcher gets
    # control, so only a deadline enforced from outside the read ends the request.
    net = lan(3)  # server, unused, device
    server, _, device = net.hosts
    urls = [
        f"http://[{server.address}]:8081/headerdrip/rootfs.img",
        f"http://[{server.address}]:8080/good/rootfs.img",
    ]
    channel = with_mirrors(tmp_path, 65536, urls)
    with mirrors(server, channel, tmp_path) as (running, bad):
        started = time.monotonic()
        # Held by the drip, a fetch would run until the test's bound: the timeout is a failure.
        code, _, err = http_fetch(device, channel, tmp_path / "state", tmp_path / "out.img", 60)
        seconds = time.monotonic() - started
        served = running.served()
    stats = bad_mirror_stats(bad)
    assert code == 0, err
    assert (tmp_path / "out.img").read_bytes() == channel.release.image.read_bytes()
    assert stats["hits"] == {"headerdrip": 1}
    dripped = stats["written"]["headerdrip"]
    assert [(s.path, s.status) for s in served] == [("/good/rootfs.img", 206)]
    # The deadline for a 64 KiB chunk is the 10 s read timeout plus 64 KiB at 32 KiB/s.
    assert 11 < seconds < 20, seconds
    assert dripped < 20, stats  # about a byte a second until the device hung up at 12 s
    print(f"\nheader drip: abandoned after {dripped} header bytes; done in {seconds:.1f} s")
