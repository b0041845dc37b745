"""``otacast``: the device command.

This release carries the device's manifest verifier (``otacast verify``).  Receiving over
multicast (``fetch``), installing (``install``), the daemon (``watch``) and ``status`` arrive
with the receiver and installer work; they are not offered until they exist.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from otacast.schemas.errors import OtacastError
from otacast.schemas.limits import MAX_MANIFEST_BYTES

from .errors import UsageError
from .trust import load_trust, read_limited
from .verify import verify_manifest

PROG = "otacast"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Receive signed otacast updates on a device.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("verify", help="check a manifest as this device would")
    p.add_argument("manifest", type=Path)
    p.add_argument(
        "--trust",
        type=Path,
        action="append",
        required=True,
        help="trusted public key file; repeat for several",
    )
    p.add_argument(
        "--threshold",
        type=int,
        default=1,
        help="signatures required from distinct trusted keys (default 1)",
    )
    p.add_argument("--device-type", help="this device's type")
    p.add_argument("--installed-sequence", type=int, help="sequence of the installed release")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def cmd_verify(args: argparse.Namespace) -> int:
    trust = load_trust(args.trust, args.threshold)
    data = read_limited(args.manifest, MAX_MANIFEST_BYTES, "manifest")
    verified = verify_manifest(
        data,
        trust,
        now=time.time(),
        device_type=args.device_type,
        installed_sequence=args.installed_sequence,
    )
    m = verified.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "name": m.name,
                    "version": m.version,
                    "sequence": m.sequence,
                    "session_id": m.session_id.hex(),
                    "signers": list(verified.signers),
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"OK: {m.name} version {m.version} sequence {m.sequence} "
            f"({len(verified.signers)} trusted signature(s))"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    json_errors = (argv is not None and "--json" in argv) or "--json" in sys.argv[1:]
    try:
        args = build_parser().parse_args(argv)
        return cmd_verify(args)
    except OtacastError as exc:
        if json_errors:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
