"""The built wheel installs under one namespace and ships what the code reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_namespaces_every_module_under_otacast(tmp_path: Path) -> None:
    # No build isolation: build with the environment's setuptools, no download needed.
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "-w", str(tmp_path), str(ROOT)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("otacast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names if not name.startswith("otacast-")}
    assert top_levels == {"otacast"}
    assert "otacast/schemas/manifest.schema.json" in names
    assert "otacast/schemas/wire.py" in names
    assert "otacast/signer/cli.py" in names
    assert "otacast/plugin/cli.py" in names
    # The subpackages are listed one by one in setup.cfg: a new one left out would be missing.
    assert "otacast/plugin/installers/swupdate/ipc.py" in names
    assert "otacast/plugin/mender/main.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "otacast-signer = otacast.signer.cli:main" in text
    assert "otacast = otacast.plugin.cli:main" in text
    assert "otacast-mender-module = otacast.plugin.mender.main:main" in text
