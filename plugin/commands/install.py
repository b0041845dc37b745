"""``otacast install``: receive a release and hand it to an installer (`otacast.plugin.deliver`)."""

from __future__ import annotations

import argparse

from otacast.plugin.deliver import deliver, require_device_type
from otacast.plugin.errors import UpToDate
from otacast.plugin.jsonlines import json_line
from otacast.plugin.status import StatusFile

from .args import Subcommands, settings_of
from .receiving import add_receive_options, installer_of, receive_release, report_up_to_date


def add_install(sub: Subcommands) -> None:
    p = sub.add_parser("install", help="receive a release and hand it to an installer")
    add_receive_options(p, installer=True, manifest=True, retry=False)
    p.set_defaults(run=cmd_install)


def cmd_install(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    require_device_type(settings.device_type, "install")
    installer = installer_of(settings)
    status = StatusFile(settings.state_dir)
    try:
        summary = receive_release(args, settings, status)
    except UpToDate as result:
        return report_up_to_date(args, result)
    delivery = deliver(
        installer,
        settings.out_path,
        summary.manifest,
        state_dir=settings.state_dir,
        status=status,
        keep_staged=settings.keep_staged,
    )
    assert delivery.record is not None
    if args.json:
        print(
            json_line(
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
