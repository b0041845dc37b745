"""What the device commands share: the program name, the options every command takes, how the
command line, the config file and the defaults settle into `Settings`, and a manifest file
checked as the device would."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TypeAlias

from otacast.plugin.config import Settings, load_config, settle
from otacast.plugin.program import Parser
from otacast.plugin.trust import current_trust, read_limited
from otacast.plugin.verify import verify_manifest
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.policy import TrustSet, VerifiedManifest

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


def verify_file(
    path: Path, settings: Settings, trust: TrustSet, installed_sequence: int | None
) -> VerifiedManifest:
    """The signed manifest in `path`, checked as this device would: now, for its device type
    and channel, above `installed_sequence`."""
    data = read_limited(path, MAX_MANIFEST_BYTES, "manifest")
    return verify_manifest(
        data,
        trust,
        now=time.time(),
        device_type=settings.device_type,
        installed_sequence=installed_sequence,
        channel=settings.channel,
    )
