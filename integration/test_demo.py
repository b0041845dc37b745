"""The README's demo command runs to completion and shows what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .netns import require_root_and_ip


def test_readme_demo_delivers_a_verified_image_through_loss_and_refuses_tampering() -> None:
    require_root_and_ip()
    demo = Path(__file__).parent / "demo.py"
    done = subprocess.run(
        [sys.executable, str(demo)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Both senders found by SRV (equal priority: RFC 2782 orders them at random).
    joined = [line for line in done.stdout.splitlines() if "joining ff3e::" in line]
    assert len(joined) == 1, done.stdout
    assert "fd51::1" in joined[0] and "fd51::2" in joined[0]
    assert "the device's image is identical to the signed one" in done.stdout
    assert "signature does not match" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert "everything it created has been removed" in done.stdout
