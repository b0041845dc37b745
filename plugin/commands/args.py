"""What the device commands share: the program name, the options every command takes, and how
the command line, the config file and the defaults settle into `Settings`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from otacast.plugin.config import Settings, load_config, settle
from otacast.plugin.program import Parser
from otacast.plugin.trust import current_trust
from otacast.schemas.policy import TrustSet

PROG = "otacast"

Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def add_common_options(p: argparse.ArgumentParser) -> None:
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


def settings_of(args: argparse.Namespace) -> Settings:
    return settle(load_config(args.config), vars(args))


def trust_in_force(settings: Settings) -> TrustSet:
    """The trust set in force: the last accepted rotation, else the configured keys."""
    return current_trust(settings.state_dir, settings.trust, settings.threshold)[0]
