"""``otacast verify MANIFEST``: check a manifest as this device would, without receiving."""

from __future__ import annotations

import argparse
from pathlib import Path

from otacast.plugin.jsonlines import json_line
from otacast.schemas.units import format_time

from .args import Subcommands, add_common_options, settings_of, trust_in_force, verify_file


def add_verify(sub: Subcommands) -> None:
    p = sub.add_parser("verify", help="check a manifest as this device would")
    p.add_argument("manifest", type=Path)
    add_common_options(p)
    p.add_argument("--installed-sequence", type=int, help="sequence of the installed release")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="state directory, for a rotated trust set (default /var/lib/otacast)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    trust = trust_in_force(settings)
    verified = verify_file(args.manifest, settings, trust, args.installed_sequence)
    m = verified.manifest
    if args.json:
        print(
            json_line(
                {
                    "ok": True,
                    "name": m.name,
                    "version": m.version,
                    "sequence": m.sequence,
                    "expires": m.expires,
                    "expires_at": format_time(m.expires),
                    "session_id": m.session_id.hex(),
                    "signers": list(verified.signers),
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"OK: {m.name} version {m.version} sequence {m.sequence} "
            f"({len(verified.signers)} trusted signature(s)), expires {format_time(m.expires)}"
        )
    return 0
