"""``otacast-mender-module``: the command Mender runs, and ``--install-module``.

Mender runs ``otacast-mender-module STATE FILE_TREE`` once per state (`module.run_state` does the
work); ``--install-module`` links the installed command into Mender's module directory.  Failures
print one line, ``otacast-mender-module: error: ...``, and exit with the error class's code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from otacast.plugin.errors import StateError, UsageError
from otacast.plugin.program import Parser, run

from .layout import MODULES_DIR, PAYLOAD_TYPE, PROG
from .module import run_state


def install_module(modules_dir: Path, executable: Path) -> str:
    """Link `executable` as Mender's ``otacast`` module; idempotent."""
    if not modules_dir.is_dir():
        raise UsageError(f"{modules_dir} does not exist: is mender-client installed?")
    link = modules_dir / PAYLOAD_TYPE
    if link.is_symlink():
        if link.readlink() == executable:
            return f"{link} already points to {executable}"
    elif link.exists():
        raise UsageError(f"{link} exists and is not a link; remove it to install this module")
    # symlink(2) never follows or replaces what is at its name, and the name is one nobody can
    # plant anything at in advance (64 random bits).
    tmp = modules_dir / f".{PAYLOAD_TYPE}.{secrets.token_hex(8)}.tmp"
    try:
        tmp.symlink_to(executable)
        tmp.replace(link)  # atomic: Mender never sees the module missing
    except PermissionError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write {modules_dir}: permission denied (run as root)") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot link {link}: {exc.strerror or exc}") from None
    return f"linked {link} -> {executable}"


def own_executable() -> Path:
    """This program's installed command, as Mender must run it (not `python -m ...`)."""
    candidate = Path(sys.argv[0]).resolve()
    if candidate.name == PROG and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(PROG)
    if found is None:
        raise UsageError(f"cannot find the {PROG} command; run the installed {PROG}")
    return Path(found).resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="otacast's Mender update module (payload type otacast). Mender runs it as "
        f"`{PROG} STATE FILE_TREE`; run `{PROG} --install-module` once, as root, to make it "
        "known to Mender.",
    )
    parser.add_argument("state", nargs="?", help="the Mender state (Download, ArtifactInstall ...)")
    parser.add_argument("tree", nargs="?", type=Path, help="Mender's file tree for the payload")
    parser.add_argument(
        "--install-module",
        action="store_true",
        help=f"link this program as {MODULES_DIR / PAYLOAD_TYPE} (idempotent; needs root)",
    )
    parser.add_argument(
        "--modules-dir",
        type=Path,
        help=f"Mender's update module directory (default {MODULES_DIR})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, lambda: _main(build_parser().parse_args(argv)))


def _main(args: argparse.Namespace) -> int:
    if args.install_module:
        if args.state is not None:
            raise UsageError("--install-module takes no STATE or FILE_TREE")
        if args.modules_dir is None and os.geteuid() != 0:
            raise UsageError(f"--install-module must run as root (it writes {MODULES_DIR})")
        print(install_module(args.modules_dir or MODULES_DIR, own_executable()))
        return 0
    if args.state is None or args.tree is None or args.modules_dir is not None:
        raise UsageError(f"usage: {PROG} STATE FILE_TREE, or {PROG} --install-module")
    run_state(args.state, args.tree, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
