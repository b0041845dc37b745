"""``otacast-signer serve``: loop a signed image over IPv6 multicast (the driver is
`otacast.signer.serve`; this module turns the command line into its `ServeOptions`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from otacast.schemas import units
from otacast.signer import keys
from otacast.signer.channels import DEFAULT_INDEX_SHARE, DEFAULT_LANE_SHARE, ServeOptions
from otacast.signer.metrics import MetricsEndpoint
from otacast.signer.serve import Stop, serve

from . import args as types
from .args import Subcommands, read_manifest


def add_serve(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="loop a signed image over IPv6 multicast")
    p.add_argument("manifest", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--interface", required=True, help="network interface to send on")
    p.add_argument(
        "--rate",
        type=types.rate_or_max,
        help="send rate, e.g. 10M (bytes/s), 400Mbit, or max (default 10M; a release signed "
        "with rate channels is served at those)",
    )
    p.add_argument(
        "--channel-rate",
        type=types.rate_or_max,
        action="append",
        default=[],
        help="one rate channel (own group per rate); repeat for several; default: "
        "the manifest's rates, else --rate",
    )
    p.add_argument("--group", help="send to this group instead of the manifest's")
    p.add_argument(
        "--asm",
        action="store_true",
        help="send to the channel's ASM group (default: its SSM group)",
    )
    p.add_argument(
        "--no-announce",
        action="store_true",
        help="do not announce this sender on the channel's ASM group (devices without SRV "
        "records or --source find senders there; default: announce, a few datagrams a second)",
    )
    p.add_argument("--port", type=types.port, help="UDP port (default: the manifest's)")
    p.add_argument("--source", help="source address to send from (must be on --interface)")
    p.add_argument(
        "--hops",
        type=types.positive,
        default=8,
        help="multicast hop limit (default 8; 1 never leaves the link)",
    )
    p.add_argument(
        "--sender",
        type=types.sender,
        default=(0, 1),
        metavar="I/N",
        help="this is sender I of N: send the symbols at offset I/N of every chunk's cycle, so "
        "a device hearing several senders gets different symbols from each",
    )
    p.add_argument(
        "--loops",
        type=types.positive,
        help="stop after N passes, each sending every chunk's K symbols' worth (default: forever)",
    )
    p.add_argument("--duration", type=types.duration, help="stop after this long, e.g. 90s, 2h")
    # Accepted (with a warning) so that scripts written for the windowed carousel keep working:
    # the order has no per-pass overhead and no window any more (otacast.signer.schedule).
    p.add_argument("--overhead", type=types.fraction, help=argparse.SUPPRESS)
    p.add_argument("--window", type=types.positive, help=argparse.SUPPRESS)
    p.add_argument(
        "--repair",
        type=types.fraction,
        default=0.5,
        help="repair pool per chunk as a share of K, at least 50%% (default 50%%)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where encoded symbols are kept (default $XDG_CACHE_HOME/otacast or ~/.cache/otacast)",
    )
    p.add_argument(
        "--stream-key",
        type=Path,
        metavar="SECRET_KEY",
        help="sign AUTH pages with this stream key (its public key must be in the manifest)",
    )
    p.add_argument(
        "--lane-share",
        type=types.fraction,
        default=DEFAULT_LANE_SHARE,
        metavar="FRACTION",
        help="when the manifest has a delta lane (sign --delta-from), send it at this share of "
        "the (first) rate on its own groups, the carousel keeping the rest; 0 sends no lane "
        f"(default {round(DEFAULT_LANE_SHARE * 100)}%%); its files are taken from beside the "
        "manifest",
    )
    p.add_argument(
        "--index-share",
        type=types.fraction,
        default=DEFAULT_INDEX_SHARE,
        metavar="FRACTION",
        help="when the manifest has a block index (raw images), send the index alone at this "
        "share of the (first) rate on its own groups, for devices that need it whole (the "
        f"carousel keeping the rest); 0 sends none (default {round(DEFAULT_INDEX_SHARE * 100)}%%)",
    )
    p.add_argument(
        "--lane-airtime",
        choices=("mld", "share"),
        default="mld",
        help="mld (default): send the delta lane and the index group only while a device on "
        "this link listens there (MLD; needs CAP_NET_RAW, else as share); share: always, at "
        "their shares of the rate",
    )
    p.add_argument("--no-gso", action="store_true", help="one send per datagram (no UDP GSO)")
    p.add_argument("--loopback", action="store_true", help="also deliver to receivers on this host")
    p.add_argument("--json", action="store_true", help="JSON status lines")
    p.add_argument(
        "--metrics",
        type=types.listen_address,
        metavar="[ADDR]:PORT",
        help="serve Prometheus metrics over HTTP at this address, e.g. :9464 (all addresses) "
        "or [::1]:9464 (default: off)",
    )
    p.set_defaults(run=cmd_serve)


DEFAULT_RATE = units.parse_rate("10M")


def cmd_serve(args: argparse.Namespace) -> int:
    for obsolete in ("overhead", "window"):
        if getattr(args, obsolete) is not None:
            print(
                f"otacast-signer: warning: --{obsolete} has no effect: every chunk advances every "
                "round and devices keep every symbol, so there is nothing to size",
                file=sys.stderr,
            )
    envelope = read_manifest(args.manifest)
    rates = args.channel_rate or list(envelope.manifest.transport.rates)
    if rates and args.rate is not None:
        given = "--channel-rate" if args.channel_rate else "the manifest's rate channels"
        print(
            f"otacast-signer: warning: --rate has no effect: {given} set the rates", file=sys.stderr
        )
    rates = rates or [DEFAULT_RATE if args.rate is None else args.rate]
    cache = (
        args.cache_dir
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "otacast"
    )
    options = ServeOptions(
        interface=args.interface,
        rates=rates,
        group=args.group,
        port=args.port,
        asm=args.asm,
        announce=not args.no_announce,
        source=args.source,
        hops=args.hops,
        sender_index=args.sender[0],
        sender_count=args.sender[1],
        loops=args.loops,
        duration=args.duration,
        repair=args.repair,
        cache_dir=cache,
        gso=not args.no_gso,
        loopback=args.loopback,
        json=args.json,
        stream_key=keys.load_secret(args.stream_key) if args.stream_key else None,
        lane_share=args.lane_share,
        lane_airtime=args.lane_airtime,
        index_share=args.index_share,
        lane_dir=args.manifest.parent,
    )
    # Listening before the release is encoded: a port in use fails now, not minutes later.
    endpoint = MetricsEndpoint(*args.metrics) if args.metrics else None
    try:
        serve(
            envelope,
            args.image,
            options,
            sys.stdout,
            stop=Stop(),
            metrics=endpoint.collector if endpoint else None,
        )
    finally:
        if endpoint:
            endpoint.close()
    return 0
