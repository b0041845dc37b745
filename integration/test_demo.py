"""The README's demo command runs to completion and shows what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_readme_demo_signs_verifies_and_refuses_tampering() -> None:
    demo = Path(__file__).parent / "demo.py"
    done = subprocess.run(
        [sys.executable, str(demo)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: rootfs.img matches" in done.stdout
    assert "is not above the installed 42" in done.stderr
    assert "signature does not match" in done.stderr
    assert "Traceback" not in done.stderr
