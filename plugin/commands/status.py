"""``otacast status``: what is installed and happening (the report is `otacast.plugin.status`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from otacast.plugin.config import Settings, load_config
from otacast.plugin.installed import read_installed
from otacast.plugin.jsonlines import json_line
from otacast.plugin.status import StatusReport

from .args import Subcommands


def add_status(sub: Subcommands) -> None:
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
        print(json_line(report.as_json(), sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0
