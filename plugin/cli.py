"""``otacast``: the device command.

Six subcommands: ``verify`` checks a manifest as the device would; ``fetch`` receives a release
over multicast (with HTTP fallback) and writes the verified image; ``install`` also hands it to an
installer and records it (`deliver`); ``watch`` is the daemon that does that for every newer
release heard on the channel (`watch`); ``trust`` shows or rotates the trusted keys; ``status``
shows what is installed and happening (`status`).  Settings come from the command line, then the
device config file (`config.py`), then built-in defaults.

Each command is one section below: ``add_NAME`` registers its sub-parser (and, through
``set_defaults(run=...)``, the ``cmd_NAME`` that carries it out) and ``cmd_NAME`` does the work and
formats its output.  `main` turns errors into exit codes once, for all of them (`program.run`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from otacast.schemas import addressing, units
from otacast.schemas.errors import OtacastError
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.policy import TrustSet
from otacast.schemas.trustset import MAX_TRUST_BYTES

from .auth import PACKET_AUTH_POLICIES
from .config import FALLBACKS, Settings, load_config, settle
from .deliver import choose_installer, deliver
from .errors import UsageError
from .fetch import FetchOptions, FetchSummary, fetch
from .installed import read_installed
from .installers import Installer
from .installers.file import check_out
from .program import Parser, run
from .status import StatusFile, StatusReport
from .trust import accept_rotation, current_trust, read_limited
from .verify import verify_manifest
from .watch import Watcher

PROG = "otacast"

_SubParsers: TypeAlias = "argparse._SubParsersAction[Parser]"


# --- shared by the commands -----------------------------------------------------------------


def _add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help="device config file (default: $OTACAST_CONFIG, else /etc/otacast/otacast.toml "
        "if it exists)",
    )
    p.add_argument(
        "--trust",
        type=Path,
        action="append",
        help="trusted public key file; repeat for several (or `trust` in the config)",
    )
    p.add_argument(
        "--threshold",
        type=int,
        help="signatures required from distinct trusted keys (default 1)",
    )
    p.add_argument("--device-type", help="this device's type (refuse releases for others)")


def _settings(args: argparse.Namespace) -> Settings:
    return settle(load_config(args.config), vars(args))


def _trust(settings: Settings) -> TrustSet:
    """The trust set in force: the last accepted rotation, else the configured keys."""
    return current_trust(settings.state_dir, settings.trust, settings.threshold)[0]


# --- verify ---------------------------------------------------------------------------------


def add_verify(sub: _SubParsers) -> None:
    p = sub.add_parser("verify", help="check a manifest as this device would")
    p.add_argument("manifest", type=Path)
    _add_common_options(p)
    p.add_argument("--installed-sequence", type=int, help="sequence of the installed release")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="state directory, for a rotated trust set (default /var/lib/otacast)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    trust = _trust(settings)
    data = read_limited(args.manifest, MAX_MANIFEST_BYTES, "manifest")
    verified = verify_manifest(
        data,
        trust,
        now=time.time(),
        device_type=settings.device_type,
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


# --- fetch, install, watch: the receive options they share ------------------------------------


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


def _add_receive_options(
    p: argparse.ArgumentParser, *, installer: bool, manifest: bool, retry: bool
) -> None:
    """The options of a command that receives a release; the flags add the ones only some take
    (in the order `--help` shows them)."""
    _add_common_options(p)
    if installer:
        p.add_argument(
            "--installer",
            metavar="KIND:ARGUMENT",
            help="file:PATH (atomic replace, keeps PATH.previous), command:PROGRAM "
            "(run with the image path; exit 0 installed, 3 needs reboot), swupdate:DIR "
            "(a running swupdate's sockets) or swupdate-run:ARGS (a private swupdate "
            "started with ARGS for each install)",
        )
    p.add_argument(
        "--out",
        type=Path,
        help="where the verified image goes (default STATE_DIR/received.img)",
    )
    p.add_argument("--interface", help="network interface to receive on")
    p.add_argument("--channel", help="channel name: groups derive from it, sources from DNS SRV")
    p.add_argument(
        "--scope",
        choices=sorted(addressing.SCOPES),
        help="multicast scope of the channel's groups (default global)",
    )
    p.add_argument("--group", help="join this group instead of the channel's")
    p.add_argument("--port", type=int, help="UDP port (default: SRV, manifest, or 4242)")
    p.add_argument(
        "--source",
        action="append",
        help="SSM source address (skips DNS); repeat for several",
    )
    p.add_argument("--resolver", help="DNS server for SRV discovery, ADDR or [ADDR]:PORT")
    if manifest:
        p.add_argument(
            "--manifest",
            type=Path,
            help="use this signed manifest instead of waiting for one on the channel",
        )
        p.add_argument(
            "--installed-sequence",
            type=int,
            help="sequence of the installed release, refuse anything not newer "
            "(default: the state directory's record, written by install, watch and Mender)",
        )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where partial downloads and the installed record persist (default /var/lib/otacast)",
    )
    p.add_argument(
        "--join-timeout",
        type=_positive_float,
        help="fall back to HTTP if nothing arrives for this long (default 10 s)",
    )
    p.add_argument(
        "--stall-timeout",
        type=_positive_float,
        help="fall back to HTTP if progress stops for this long (default 30 s)",
    )
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        help="HTTP fallback: auto (default), only (skip multicast), never",
    )
    p.add_argument(
        "--packet-auth",
        choices=PACKET_AUTH_POLICIES,
        help="packet authentication: auto (default: when the release lists stream keys), "
        "require (refuse releases without), off",
    )
    if retry:
        p.add_argument(
            "--retry-max",
            type=_positive_float,
            help="longest pause between retries after a failure (default 300 s)",
        )
    p.add_argument("--json", action="store_true", help="JSON status lines")


def _check_out(settings: Settings) -> None:
    """Refuse an unusable --out before downloading anything, not after."""
    check_out(settings.out_path, make_parent=settings.out is None)


def _installer(settings: Settings) -> Installer:
    return choose_installer(
        settings.installer,
        settings.out_path,
        missing="no installer: give --installer KIND:ARGUMENT or set installer in the config",
    )


def _installed_sequence(args: argparse.Namespace, settings: Settings) -> int | None:
    """--installed-sequence, else the state directory's record of the installed release."""
    if args.installed_sequence is not None:
        return int(args.installed_sequence)
    installed = read_installed(settings.state_dir)
    return installed.sequence if installed else None


def _fetch(args: argparse.Namespace, settings: Settings, status: StatusFile) -> FetchSummary:
    _check_out(settings)
    installed_sequence = _installed_sequence(args, settings)
    trust = _trust(settings)
    verified = None
    if args.manifest:
        data = read_limited(args.manifest, MAX_MANIFEST_BYTES, "manifest")
        verified = verify_manifest(
            data,
            trust,
            now=time.time(),
            device_type=settings.device_type,
            installed_sequence=installed_sequence,
        )
    if (
        verified is None
        and settings.fallback != "only"
        and not (settings.channel or settings.group)
    ):
        raise UsageError(f"{args.command}: give --channel or --group (or --manifest)")
    options = FetchOptions.from_settings(
        settings,
        trust,
        manifest=verified,
        installed_sequence=installed_sequence,
        json=args.json,
        status=status,
    )
    try:
        return fetch(options, sys.stdout)
    except OtacastError as exc:
        status.failed(f"{type(exc).__name__}: {exc}")
        raise


# --- fetch ----------------------------------------------------------------------------------


def add_fetch(sub: _SubParsers) -> None:
    p = sub.add_parser("fetch", help="receive a release and write the verified image")
    _add_receive_options(p, installer=False, manifest=True, retry=False)
    p.set_defaults(run=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _fetch(args, settings, StatusFile(settings.state_dir))
    return 0


# --- install --------------------------------------------------------------------------------


def add_install(sub: _SubParsers) -> None:
    p = sub.add_parser("install", help="receive a release and hand it to an installer")
    _add_receive_options(p, installer=True, manifest=True, retry=False)
    p.set_defaults(run=cmd_install)


def cmd_install(args: argparse.Namespace) -> int:
    settings = _settings(args)
    installer = _installer(settings)
    status = StatusFile(settings.state_dir)
    summary = _fetch(args, settings, status)
    delivery = deliver(
        installer,
        settings.out_path,
        summary.manifest,
        state_dir=settings.state_dir,
        status=status,
    )
    assert delivery.record is not None
    if args.json:
        print(
            json.dumps(
                {
                    "event": "installed",
                    "status": delivery.result.status,
                    "detail": delivery.result.detail,
                    "sequence": delivery.record.sequence,
                    "version": delivery.record.version,
                },
                sort_keys=True,
            )
        )
    else:
        print(delivery.summary())
    return 0


# --- watch ----------------------------------------------------------------------------------


def add_watch(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "watch", help="stay on the channel; install every newer release (the device daemon)"
    )
    _add_receive_options(p, installer=True, manifest=False, retry=True)
    p.set_defaults(run=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    installer = _installer(settings)
    _check_out(settings)
    if not (settings.channel or settings.group):
        raise UsageError("watch: give --channel or --group (or set channel in the config)")
    trust = _trust(settings)
    watcher = Watcher(settings, trust, installer, sys.stdout, as_json=args.json)
    # SIGTERM (systemd stop) ends the daemon like Ctrl-C: partial downloads stay resumable.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.note("stopped", "stopped")
    return 0


# --- trust ----------------------------------------------------------------------------------


def add_trust(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "trust", help="show the keys in force, or rotate them with a signed trust-set document"
    )
    p.add_argument("action", choices=("show", "update"))
    p.add_argument("document", type=Path, nargs="?", help="trust-set document (update)")
    _add_common_options(p)
    p.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/otacast)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_trust)


def cmd_trust(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "update":
        if args.document is None:
            raise UsageError("trust update: give the trust-set document to apply")
        data = read_limited(args.document, MAX_TRUST_BYTES, "trust set")
        document = accept_rotation(
            settings.state_dir, settings.trust, settings.threshold, data, now=time.time()
        )
        trust, version = document.trust_set, document.version
    else:
        trust, version = current_trust(settings.state_dir, settings.trust, settings.threshold)
    if args.json:
        print(
            json.dumps(
                {"version": version, "threshold": trust.threshold, "keys": sorted(trust.keys)},
                sort_keys=True,
            )
        )
    else:
        origin = "the config's keys" if version == 0 else f"rotation version {version}"
        print(f"trust in force: {origin}, {trust.threshold} of {len(trust.keys)} keys:")
        for keyid in sorted(trust.keys):
            print(f"  {keyid}")
    return 0


# --- status ---------------------------------------------------------------------------------


def add_status(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "status", help="show the installed release, a download in progress, and the last error"
    )
    p.add_argument("--config", type=Path, help="device config file (for its state_dir)")
    p.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/otacast)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    state_dir = args.state_dir or config.state_dir or Settings(trust=()).state_dir
    installed = read_installed(state_dir)
    report = StatusReport.read(state_dir, installed.__dict__ if installed else None)
    if args.json:
        print(json.dumps(report.as_json(), sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0


# --- the program ----------------------------------------------------------------------------

# In the order `otacast --help` lists them.
COMMANDS = (add_verify, add_fetch, add_install, add_watch, add_trust, add_status)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Receive signed otacast updates on a device.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return int(args.run(args))

    json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    return run(PROG, body, json_errors=json_errors)


if __name__ == "__main__":
    sys.exit(main())
