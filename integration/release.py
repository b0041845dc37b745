"""Shared helpers for end-to-end tests and the demo: a signed release made with the real CLI,
senders and receivers started in namespace hosts, random packet loss with nftables."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .netns import BIN, Host

SIGNER = str(BIN / "otacast-signer")
DEVICE = str(BIN / "otacast")
CHANNEL = "updates.example.test"


@dataclass
class Release:
    directory: Path
    image: Path
    manifest: Path
    public: Path

    @classmethod
    def make(
        cls,
        directory: Path,
        size: int,
        *,
        sequence: int = 3,
        chunk: str = "",
        http_url: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> Release:
        directory.mkdir(parents=True, exist_ok=True)
        image = directory / "rootfs.img"
        image.write_bytes(os.urandom(size))
        key = directory / "release"
        if not key.with_suffix(".key").exists():
            subprocess.run([SIGNER, "keygen", str(key)], check=True, capture_output=True)
        command = [
            SIGNER,
            "sign",
            str(image),
            "--key",
            str(key.with_suffix(".key")),
            "--sequence",
            str(sequence),
            "--device-type",
            "testboard",
            "--channel",
            CHANNEL,
            "--force",
            *extra,
        ]
        if chunk:  # empty: the signer's default
            command += ["--chunk-size", chunk]
        if http_url:
            command += ["--http-url", http_url]
        subprocess.run(command, check=True, capture_output=True)
        return cls(
            directory, image, directory / "rootfs.img.manifest.json", key.with_suffix(".pub")
        )


def serve_command(host: Host, release: Release, cache: Path, *args: str) -> list[str]:
    """`otacast-signer serve` of `release` on `host`'s eth0 with JSON status lines."""
    return host.command(
        SIGNER,
        "serve",
        str(release.manifest),
        str(release.image),
        "--interface",
        "eth0",
        "--cache-dir",
        str(cache),
        "--json",
        *args,
    )


def serve(host: Host, release: Release, *args: str, ready: bool = False) -> subprocess.Popen[str]:
    """Start a sender; with `ready`, return only once it is sending (its symbols encoded)."""
    process = subprocess.Popen(
        serve_command(host, release, release.directory / f"cache-{host.netns}", *args),
        stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if ready:
        assert process.stdout is not None
        for line in process.stdout:
            if json.loads(line).get("event") == "serving":
                break
        # Keep draining its status lines (one a second) so the sender never blocks on them.
        threading.Thread(target=process.stdout.read, daemon=True).start()
    return process


def fetch_command(host: Host, release: Release, state: Path, out: Path, *args: str) -> list[str]:
    return host.command(
        DEVICE,
        "fetch",
        "--trust",
        str(release.public),
        "--interface",
        "eth0",
        "--channel",
        CHANNEL,
        "--state-dir",
        str(state),
        "--out",
        str(out),
        "--json",
        "--device-type",
        "testboard",
        *args,
    )


def fetch(
    host: Host, release: Release, state: Path, out: Path, *args: str, timeout: float = 120
) -> tuple[int, list[dict[str, object]], str]:
    done = subprocess.run(
        fetch_command(host, release, state, out, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def random_loss(host: Host, percent: int, port: int = 4242) -> None:
    """Drop `percent`% of arriving datagrams to `port` at random (nftables, in `host` only)."""
    for rule in (
        "add table inet otacast_loss",
        "add chain inet otacast_loss input { type filter hook input priority 0 ; }",
        f"add rule inet otacast_loss input udp dport {port} numgen random mod 100 < {percent} "
        "counter drop",
    ):
        done = host.run("nft", rule)
        if done.returncode != 0:
            raise RuntimeError(f"nft {rule}: {done.stderr.strip()}")


def dropped(host: Host) -> int:
    listing = host.run("nft", "-j", "list", "table", "inet", "otacast_loss").stdout
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule")
        if rule:
            for expression in rule["expr"]:
                if "counter" in expression:
                    return int(expression["counter"]["packets"])
    return 0
