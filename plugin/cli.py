"""``otacast``: the device command.

``fetch`` receives a release over multicast (with HTTP fallback) and writes the verified image;
``verify`` checks a manifest as the device would.  Installing (``install``), the daemon
(``watch``) and ``status`` arrive with the installer work; they are not offered until they exist.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from otacast.schemas import addressing, units
from otacast.schemas.errors import OtacastError
from otacast.schemas.limits import MAX_MANIFEST_BYTES

from .errors import UsageError
from .fetch import FetchOptions, FetchSummary, fetch
from .installed import read_installed, write_installed
from .installers import get_installer
from .installers.file import FileInstaller
from .trust import load_trust, read_limited
from .verify import verify_manifest

PROG = "otacast"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


def _add_trust_options(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Receive signed otacast updates on a device.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("verify", help="check a manifest as this device would")
    p.add_argument("manifest", type=Path)
    _add_trust_options(p)
    p.add_argument("--device-type", help="this device's type")
    p.add_argument("--installed-sequence", type=int, help="sequence of the installed release")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_fetch_parser(sub)
    add_fetch_parser(sub, "install")
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


def _positive_float(text: str) -> float:
    try:
        value = float(units.parse_duration(text)) if text[-1:].isalpha() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 10, 2.5, 30s, 2m)"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def add_fetch_parser(sub: argparse._SubParsersAction[_Parser], command: str = "fetch") -> None:
    if command == "install":
        p = sub.add_parser("install", help="receive a release and hand it to an installer")
        p.add_argument(
            "--installer",
            required=True,
            metavar="KIND:ARGUMENT",
            help="file:PATH (atomic replace, keeps PATH.previous) or command:PROGRAM "
            "(run with the image path; exit 0 installed, 3 needs reboot)",
        )
    else:
        p = sub.add_parser("fetch", help="receive a release and write the verified image")
    _add_trust_options(p)
    p.add_argument("--out", type=Path, required=True, help="where the verified image goes")
    p.add_argument("--interface", help="network interface to receive on")
    p.add_argument("--channel", help="channel name: groups derive from it, sources from DNS SRV")
    p.add_argument(
        "--scope",
        choices=sorted(addressing.SCOPES),
        default=addressing.DEFAULT_SCOPE,
        help="multicast scope of the channel's groups (default global)",
    )
    p.add_argument("--group", help="join this group instead of the channel's")
    p.add_argument("--port", type=int, help="UDP port (default: SRV, manifest, or 4242)")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        help="SSM source address (skips DNS); repeat for several",
    )
    p.add_argument("--resolver", help="DNS server for SRV discovery, ADDR or [ADDR]:PORT")
    p.add_argument(
        "--manifest",
        type=Path,
        help="use this signed manifest instead of waiting for one on the channel",
    )
    p.add_argument("--device-type", help="this device's type (refuse releases for others)")
    p.add_argument(
        "--installed-sequence",
        type=int,
        help="sequence of the installed release, refuse anything not newer "
        "(default: the state directory's record, written by install)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/otacast"),
        help="where partial downloads persist (default /var/lib/otacast)",
    )
    p.add_argument(
        "--join-timeout",
        type=_positive_float,
        default=10.0,
        help="fall back to HTTP if nothing arrives for this long (default 10 s)",
    )
    p.add_argument(
        "--stall-timeout",
        type=_positive_float,
        default=30.0,
        help="fall back to HTTP if progress stops for this long (default 30 s)",
    )
    p.add_argument(
        "--fallback",
        choices=("auto", "only", "never"),
        default="auto",
        help="HTTP fallback: auto (default), only (skip multicast), never",
    )
    p.add_argument("--json", action="store_true", help="JSON status lines")


def _installed_sequence(args: argparse.Namespace) -> int | None:
    """--installed-sequence, else the state directory's record of the installed release."""
    if args.installed_sequence is not None:
        return int(args.installed_sequence)
    installed = read_installed(args.state_dir)
    return installed.sequence if installed else None


def cmd_fetch(args: argparse.Namespace) -> int:
    _fetch(args)
    return 0


def _check_out(out: Path) -> None:
    """Refuse an unusable --out before downloading anything, not after."""
    if not out.name or out.is_dir():
        raise UsageError(f"--out {out} must name a file, not a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")


def cmd_install(args: argparse.Namespace) -> int:
    installer = get_installer(args.installer)
    if isinstance(installer, FileInstaller) and args.out.resolve() in (
        installer.target.resolve(),
        installer.previous.resolve(),
    ):
        # The download would overwrite the target (and then the rollback copy) before install.
        raise UsageError("--out must differ from the file installer's target")
    summary = _fetch(args)
    result = installer.install(args.out, summary.manifest)
    record = write_installed(args.state_dir, summary.manifest, result.status)
    if args.json:
        print(
            json.dumps(
                {
                    "event": "installed",
                    "status": result.status,
                    "detail": result.detail,
                    "sequence": record.sequence,
                    "version": record.version,
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"installed {record.name} {record.version} (sequence {record.sequence}): "
            f"{result.status}{'; ' + result.detail if result.detail else ''}"
        )
    return 0


def _fetch(args: argparse.Namespace) -> FetchSummary:
    _check_out(args.out)
    args.installed_sequence = _installed_sequence(args)
    trust = load_trust(args.trust, args.threshold)
    verified = None
    if args.manifest:
        data = read_limited(args.manifest, MAX_MANIFEST_BYTES, "manifest")
        verified = verify_manifest(
            data,
            trust,
            now=time.time(),
            device_type=args.device_type,
            installed_sequence=args.installed_sequence,
        )
    if verified is None and args.fallback != "only" and not (args.channel or args.group):
        raise UsageError("fetch: give --channel or --group (or --manifest)")
    options = FetchOptions(
        trust=trust,
        out=args.out,
        state_dir=args.state_dir,
        interface=args.interface,
        channel=args.channel,
        scope=args.scope,
        group=args.group,
        port=args.port,
        sources=args.source,
        resolver=args.resolver,
        manifest=verified,
        device_type=args.device_type,
        installed_sequence=args.installed_sequence,
        join_timeout=args.join_timeout,
        stall_timeout=args.stall_timeout,
        fallback=args.fallback,
        json=args.json,
    )
    return fetch(options, sys.stdout)


COMMANDS = {"verify": cmd_verify, "fetch": cmd_fetch, "install": cmd_install}


def main(argv: Sequence[str] | None = None) -> int:
    json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except OtacastError as exc:
        if json_errors:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
