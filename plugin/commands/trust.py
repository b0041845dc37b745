"""``otacast trust show|update``: the keys in force, or a rotation to a signed trust set."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from otacast.plugin.errors import UsageError
from otacast.plugin.jsonlines import json_line
from otacast.plugin.trust import accept_rotation, current_trust, read_limited
from otacast.schemas.trustset import MAX_TRUST_BYTES

from .args import Subcommands, add_common_options, settings_of


def add_trust(sub: Subcommands) -> None:
    p = sub.add_parser(
        "trust", help="show the keys in force, or rotate them with a signed trust-set document"
    )
    p.add_argument("action", choices=("show", "update"))
    p.add_argument("document", type=Path, nargs="?", help="trust-set document (update)")
    add_common_options(p)
    p.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/otacast)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_trust)


def cmd_trust(args: argparse.Namespace) -> int:
    settings = settings_of(args)
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
            json_line(
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
