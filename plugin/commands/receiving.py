"""What ``fetch``, ``install`` and ``watch`` share: the receive options, the checks made before
anything is downloaded, and one receive run with its failure written to the status file."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from otacast.plugin.auth import PACKET_AUTH_POLICIES
from otacast.plugin.config import DECODE_PLACES, FALLBACKS, SYMBOL_KEEPING, Settings
from otacast.plugin.deliver import choose_installer
from otacast.plugin.errors import UpToDate, UsageError
from otacast.plugin.installed import read_installed
from otacast.plugin.installers import Installer
from otacast.plugin.installers.file import check_out
from otacast.plugin.jsonlines import json_line
from otacast.plugin.receive import FetchOptions
from otacast.plugin.report import FetchSummary
from otacast.plugin.resume import fetch_or_resume
from otacast.plugin.status import StatusFile
from otacast.schemas import addressing, units
from otacast.schemas.errors import OtacastError, Rollback

from .args import add_common_options, trust_in_force, verify_file


def positive_float(text: str) -> float:
    try:
        value = float(units.parse_duration(text)) if text[-1:].isalpha() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 10, 2.5, 30s, 2m)"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def add_receive_options(
    p: argparse.ArgumentParser, *, installer: bool, manifest: bool, retry: bool
) -> None:
    """The options of a command that receives a release; the flags add the ones only some take
    (in the order `--help` shows them)."""
    add_common_options(p)
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
            "--keep-staged",
            action="store_true",
            default=None,
            help="keep the received image (--out) after a successful install "
            "(default: removed, so the state directory holds one image, not two)",
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
        type=positive_float,
        help="fall back to HTTP if nothing arrives for this long (default 10 s)",
    )
    p.add_argument(
        "--stall-timeout",
        type=positive_float,
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
    p.add_argument(
        "--symbols",
        choices=SYMBOL_KEEPING,
        help="where received symbols wait for their chunk: store (default: every symbol on "
        "disk in the state directory, none refused, a restart keeps them) or memory (decoders "
        "for at most 16 MiB of chunks at once, symbols of other chunks refused: for images "
        "that small only)",
    )
    p.add_argument(
        "--decode",
        choices=DECODE_PLACES,
        help="where the symbol store's chunks are decoded: inline (default: on the receive "
        "loop) or worker (a worker process takes up to two chunks at a time: the loop "
        "reads on meanwhile and decodes any more itself, for ~55 MB more memory)",
    )
    p.add_argument(
        "--reuse-source",
        dest="reuse_sources",
        type=Path,
        action="append",
        metavar="PATH",
        help="a file or block device holding an older image whose 4 KiB blocks are reused "
        "(raw images); repeat for several (or [reuse] sources in the config; the file "
        "installer's target and PATH.previous are used anyway)",
    )
    p.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        default=None,
        help="do not reuse local blocks: every byte comes from the network",
    )
    p.add_argument(
        "--block-index",
        type=Path,
        metavar="PATH",
        help="the new image's block index for local reuse (IMAGE.blockindex, as publish "
        "writes it) instead of fetching it from the manifest's mirrors",
    )
    if retry:
        p.add_argument(
            "--retry-max",
            type=positive_float,
            help="longest pause between retries after a failure (default 300 s)",
        )
    p.add_argument("--json", action="store_true", help="JSON status lines")


def check_out_path(settings: Settings) -> None:
    """Refuse an unusable --out before downloading anything, not after."""
    check_out(settings.out_path, make_parent=settings.out is None)


def installer_of(settings: Settings) -> Installer:
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


# A device installs only releases signed for its channel (schemas.policy): without a channel it
# would install another channel's release signed by the same key, and refuse its own from then
# on as rollbacks.  `fetch` only downloads and may go without.
CHANNEL_REQUIRED = (
    "{command}: give --channel (or set channel in the config): a device installs only "
    "releases signed for its channel"
)


def receive_release(
    args: argparse.Namespace, settings: Settings, status: StatusFile
) -> FetchSummary:
    """Receive the release the options and settings describe into ``--out`` (after the checks
    that need no network), or, when nothing is heard, continue a download kept in the state
    directory (`otacast.plugin.resume`); a failure of the receive itself is written to the
    status file."""
    check_out_path(settings)
    if args.command == "install" and not settings.channel:
        raise UsageError(CHANNEL_REQUIRED.format(command="install"))
    installed_sequence = _installed_sequence(args, settings)
    trust = trust_in_force(settings)
    verified = None
    if args.manifest:
        try:
            verified = verify_file(args.manifest, settings, trust, installed_sequence)
        except Rollback as exc:
            _raise_if_installed(exc, installed_sequence, "--manifest")
            raise
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
    options.want_index = getattr(args, "index", False)  # fetch's only
    if args.block_index is not None:
        options = replace(options, block_index=args.block_index)
    try:
        return fetch_or_resume(options, sys.stdout)
    except Rollback as exc:
        _raise_if_installed(exc, installed_sequence, "channel's")
        status.failed(f"{type(exc).__name__}: {exc}")
        raise
    except OtacastError as exc:
        status.failed(f"{type(exc).__name__}: {exc}")
        raise


def _raise_if_installed(refusal: Rollback, installed_sequence: int | None, where: str) -> None:
    """A "rollback" to exactly the installed sequence is the installed release: `UpToDate`."""
    if refusal.sequence is not None and refusal.sequence == installed_sequence:
        raise UpToDate(refusal.sequence, where) from None


def report_up_to_date(args: argparse.Namespace, result: UpToDate) -> int:
    """What ``fetch`` and ``install`` print when there is nothing to do; their exit status."""
    if args.json:
        line = {"event": "up-to-date", "sequence": result.sequence, "message": str(result)}
        print(json_line(line, sort_keys=True))
    else:
        print(result)
    return result.exit_code
