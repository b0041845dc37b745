"""``otacast fetch``: receive a release and write the verified image (nothing is installed)."""

from __future__ import annotations

import argparse

from otacast.plugin.errors import UpToDate
from otacast.plugin.status import StatusFile

from .args import Subcommands, settings_of
from .receiving import add_receive_options, receive_release, report_up_to_date


def add_fetch(sub: Subcommands) -> None:
    p = sub.add_parser("fetch", help="receive a release and write the verified image")
    add_receive_options(p, installer=False, manifest=True, retry=False)
    p.add_argument(
        "--index",
        action="store_true",
        help="also receive the release's block index over multicast when it lists one (delta "
        "delivery; checked against the manifest, reported as index_bytes, not kept yet; the "
        "run waits for it up to 10 s after the image)",
    )
    p.set_defaults(run=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    try:
        receive_release(args, settings, StatusFile(settings.state_dir))
    except UpToDate as result:
        return report_up_to_date(args, result)
    return 0
