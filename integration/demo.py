"""The README's demo.

Today it shows the publisher half end to end in a temporary directory: generate a release key,
sign a sample image, inspect the manifest, verify it as the publisher and as a device would, and
show a tampered manifest being refused.  The multicast half (two senders, DNS discovery, a lossy
receiver in network namespaces) joins this script when the sender and receiver land.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from otacast.schemas.errors import BadSignature, Rollback

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path, expect: int = 0) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, check=False)
    if done.returncode != expect:
        sys.exit(f"demo: {args[0]} {args[1]} exited {done.returncode}, expected {expect}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="otacast-demo-"))
    try:
        (work / "rootfs.img").write_bytes(os.urandom(6 * 1024 * 1024 + 12345))
        run("otacast-signer", "keygen", "release", cwd=work)
        run(
            "otacast-signer",
            "sign",
            "rootfs.img",
            "--key",
            "release.key",
            "--sequence",
            "42",
            "--version",
            "2026.11.1",
            "--device-type",
            "raspberrypi4",
            "--channel",
            "updates.example.test",
            "--http-url",
            "http://[fd00::1]/rootfs.img",
            cwd=work,
        )
        run("otacast-signer", "inspect", "rootfs.img.manifest.json", cwd=work)
        run(
            "otacast-signer",
            "verify",
            "rootfs.img.manifest.json",
            "--trust",
            "release.pub",
            "--image",
            "rootfs.img",
            cwd=work,
        )
        run(
            "otacast",
            "verify",
            "rootfs.img.manifest.json",
            "--trust",
            "release.pub",
            "--device-type",
            "raspberrypi4",
            "--installed-sequence",
            "41",
            cwd=work,
        )
        print("\nA device that already runs sequence 42 refuses it (anti-rollback):")
        run(
            "otacast",
            "verify",
            "rootfs.img.manifest.json",
            "--trust",
            "release.pub",
            "--device-type",
            "raspberrypi4",
            "--installed-sequence",
            "42",
            cwd=work,
            expect=Rollback.exit_code,
        )
        tampered = (
            (work / "rootfs.img.manifest.json")
            .read_text()
            .replace('"sequence": 42', '"sequence": 43')
        )
        (work / "tampered.json").write_text(tampered)
        print("\nA manifest whose sequence was edited after signing is refused:")
        run(
            "otacast",
            "verify",
            "tampered.json",
            "--trust",
            "release.pub",
            cwd=work,
            expect=BadSignature.exit_code,
        )
        print("\ndemo: publisher side OK (the multicast delivery demo arrives with the receiver)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
