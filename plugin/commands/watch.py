"""``otacast watch``: the device daemon (`otacast.plugin.watch` runs the loop)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from otacast.plugin.deliver import require_device_type
from otacast.plugin.errors import UsageError

from .args import Subcommands, settings_of, trust_in_force
from .receiving import CHANNEL_REQUIRED, add_receive_options, check_out_path, installer_of


def add_watch(sub: Subcommands) -> None:
    p = sub.add_parser(
        "watch", help="stay on the channel; install every newer release (the device daemon)"
    )
    add_receive_options(p, installer=True, manifest=False, retry=True)
    p.add_argument(
        "--metrics-file",
        type=Path,
        metavar="PATH",
        help="after each turn, write Prometheus metrics to PATH (a node_exporter textfile, "
        "e.g. /var/lib/node_exporter/textfile/otacast.prom; or metrics_file in the config)",
    )
    p.set_defaults(run=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    require_device_type(settings.device_type, "watch")
    installer = installer_of(settings)
    check_out_path(settings)
    if not settings.channel:
        raise UsageError(CHANNEL_REQUIRED.format(command="watch"))
    trust = trust_in_force(settings)
    # Imported here: the daemon and its metrics exporter (`prometheus_client`) cost ~50 ms of
    # start-up that every other command (a download's first datagram among them) need not pay.
    from otacast.plugin.watch import Watcher

    watcher = Watcher(settings, trust, installer, sys.stdout, as_json=args.json)
    # SIGTERM (systemd stop) ends the daemon like Ctrl-C: partial downloads stay resumable.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.note("stopped", "stopped")
    return 0
