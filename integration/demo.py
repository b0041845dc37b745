"""The README's demo: the whole otacast path on a small network this script builds and removes.

Inside network namespaces (never the host's own interfaces) it creates a switch with three
hosts: two senders and one device.  It then generates a release key, signs a sample image,
publishes DNS SRV records naming both senders (a real dnsmasq), starts both senders, drops 10%
of the device's incoming datagrams at random (nftables), and runs ``otacast fetch``: the device
discovers the senders, joins them source-specifically, verifies the manifest, repairs the loss
with the fountain code and writes the verified image.  Finally a tampered manifest is shown
being refused.  Needs root and the Debian packages iproute2, nftables and dnsmasq-base.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration import services
from integration.netns import Lan, stop
from integration.release import (
    CHANNEL,
    DEVICE,
    SIGNER,
    Release,
    dropped,
    fetch_command,
    random_loss,
    serve,
)
from otacast.schemas.errors import BadSignature

IMAGE_BYTES = 16 * 1024 * 1024
LOSS = 10


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(
    command: list[str], *, timeout: float = 60, capture_output: bool = False
) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(_readable(command)), flush=True)
    return subprocess.run(
        command, text=True, check=False, timeout=timeout, capture_output=capture_output
    )


def _readable(command: list[str]) -> list[str]:
    """Drop the `ip netns exec NS` prefix and directories, so the command reads as typed."""
    if command[:3] == ["ip", "netns", "exec"]:
        command = command[4:]
    return [Path(c).name if c.startswith("/") and "/bin/" in c else c for c in command]


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root: the demo builds network namespaces")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("dnsmasq", "dnsmasq-base")):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            problems.append(f"{tool} is missing (Debian package {package})")
    if problems:
        sys.exit("demo: " + "; ".join(problems))


def main() -> None:
    preflight()
    work = Path(tempfile.mkdtemp(prefix="otacast-demo-"))
    processes: list[subprocess.Popen[str]] = []
    # Undone in reverse: the senders stopped, the network deleted, the work folder removed.
    cleanup = ExitStack()
    cleanup.callback(shutil.rmtree, work, ignore_errors=True)
    with cleanup:
        step("publisher: a release key and a signed 16 MiB image (channel updates.example.test)")
        release = Release.make(work / "release", IMAGE_BYTES, sequence=42, chunk="2M")
        show([SIGNER, "inspect", str(release.manifest)])

        step("network: a switch with two senders (fd51::1, fd51::2) and a device (fd51::3)")
        tx1, tx2, device = cleanup.enter_context(Lan.create(3)).hosts
        cleanup.callback(stop, processes)
        records = [
            f"--srv-host=_otacast._udp.{CHANNEL},tx1.example.test,4242,10,5",
            f"--srv-host=_otacast._udp.{CHANNEL},tx2.example.test,4242,10,5",
            f"--host-record=tx1.example.test,{tx1.address}",
            f"--host-record=tx2.example.test,{tx2.address}",
            "--local=/example.test/",
        ]
        print("DNS (dnsmasq on the device's network) answers:")
        for record in subprocess.run(
            [
                SIGNER,
                "dns-records",
                str(release.manifest),
                "--source",
                f"tx1.example.test={tx1.address}",
                "--source",
                f"tx2.example.test={tx2.address}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines():
            print("  " + record)
        with services.dnsmasq(device, records, work / "dnsmasq.log") as resolver:
            step(f"the device's link drops {LOSS}% of incoming datagrams at random (nftables)")
            random_loss(device, LOSS)

            step("two senders, each at 20 MB/s, sender 0/2 and 1/2 (different symbols)")
            for index, host in enumerate((tx1, tx2)):
                processes.append(
                    serve(
                        host,
                        release,
                        "--rate",
                        "20M",
                        "--no-gso",
                        "--sender",
                        f"{index}/2",
                        "--duration",
                        "300s",
                    )
                )

            step("device: discover, join, verify, decode, write")
            out = work / "device" / "rootfs.img"
            out.parent.mkdir()
            started = time.monotonic()
            done = show(
                fetch_command(
                    device,
                    release,
                    work / "device" / "state",
                    out,
                    "--resolver",
                    resolver,
                    "--installed-sequence",
                    "41",
                    json_lines=False,
                ),
                timeout=300,
            )
            elapsed = time.monotonic() - started
        if done.returncode != 0:
            sys.exit(f"demo: otacast fetch failed with exit code {done.returncode}")
        same = (
            hashlib.sha256(out.read_bytes()).digest()
            == hashlib.sha256(release.image.read_bytes()).digest()
        )
        print(
            f"\nthe device's image is {'identical to' if same else 'DIFFERENT from'} the "
            f"signed one; {dropped(device)} datagrams were dropped on the way; "
            f"{elapsed:.1f} s from start to verified image"
        )
        if not same:
            sys.exit(1)

        step("a manifest edited after signing is refused")
        tampered = work / "tampered.json"
        tampered.write_text(
            release.manifest.read_text().replace('"sequence": 42', '"sequence": 43')
        )
        refused = show(
            [DEVICE, "verify", str(tampered), "--trust", str(release.public)], capture_output=True
        )
        print(refused.stderr.strip())
        if refused.returncode != BadSignature.exit_code:
            sys.exit("demo: the tampered manifest was not refused")
        print("\ndemo: done (everything it created has been removed)")


if __name__ == "__main__":
    main()
