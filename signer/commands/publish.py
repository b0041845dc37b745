"""``otacast-signer publish``, ``dns-records`` and ``mender-artifact``: putting a signed
release where devices find it (a static HTTP mirror, DNS SRV records, a Mender artifact)."""

from __future__ import annotations

import argparse
from pathlib import Path

from otacast.schemas import addressing
from otacast.signer import mender_artifact, publish
from otacast.signer.errors import UsageError

from . import args as types
from .args import Subcommands, read_manifest


def add_publish(sub: Subcommands) -> None:
    p = sub.add_parser("publish", help="lay out the image and manifest for static HTTP mirrors")
    p.add_argument("manifest", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--root", type=Path, required=True, help="web root to fill")
    p.set_defaults(run=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    envelope = read_manifest(args.manifest)
    for path in publish.publish(envelope, args.image, args.root, args.manifest.parent):
        print(f"wrote {path}")
    if not envelope.manifest.http:
        print("note: the manifest lists no --http-url, so devices will not know this mirror")
    return 0


def add_dns_records(sub: Subcommands) -> None:
    p = sub.add_parser("dns-records", help="print SRV/AAAA records naming a channel's sources")
    p.add_argument("manifest", type=Path, nargs="?", help="take channel and port from here")
    p.add_argument("--channel", help="channel name (instead of a manifest)")
    p.add_argument("--port", type=types.port, help="UDP port (default: manifest's, or 4242)")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="[HOST=]ADDR",
        help="a sender's host name and IPv6 address; repeat for several",
    )
    p.add_argument("--ttl", type=types.positive, default=300)
    p.add_argument("--priority", type=int, default=10)
    p.add_argument("--weight", type=int, default=10)
    p.add_argument("--format", choices=("zone", "dnsmasq"), default="zone")
    p.set_defaults(run=cmd_dns_records)


def cmd_dns_records(args: argparse.Namespace) -> int:
    if args.manifest:
        transport = read_manifest(args.manifest).manifest.transport
        channel, port = transport.channel, args.port or transport.port
    elif args.channel:
        try:
            channel = addressing.normalise_channel(args.channel)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        port = args.port or addressing.DEFAULT_PORT
    else:
        raise UsageError("dns-records needs a MANIFEST or --channel")
    sources = [publish.parse_source(s, channel, i) for i, s in enumerate(args.source)]
    lines = publish.dns_records(
        channel,
        port,
        sources,
        ttl=args.ttl,
        priority=args.priority,
        weight=args.weight,
        style=args.format,
    )
    print("\n".join(lines))
    return 0


def add_mender_artifact(sub: Subcommands) -> None:
    p = sub.add_parser(
        "mender-artifact",
        help="wrap a signed manifest in a Mender artifact (payload type otacast) for "
        "otacast-mender-module",
    )
    p.add_argument("manifest", type=Path, help="the signed manifest (made by sign)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the artifact to write")
    p.add_argument("--artifact-name", help="Mender artifact name (default NAME-VERSION)")
    p.add_argument(
        "--device-type",
        action="append",
        default=[],
        help="Mender device type; repeat for several (default: the manifest's device types)",
    )
    p.add_argument(
        "--key",
        type=Path,
        help="sign the artifact for Mender's ArtifactVerifyKey: an RSA or ECDSA P-256 "
        "private key (PEM), passed to mender-artifact -k",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(run=cmd_mender_artifact)


def cmd_mender_artifact(args: argparse.Namespace) -> int:
    written = mender_artifact.write_artifact(
        args.manifest,
        args.out,
        artifact_name=args.artifact_name,
        device_types=args.device_type,
        key=args.key,
        overwrite=args.force,
    )
    m = written.envelope.manifest
    print(
        f"wrote {written.out}: artifact {written.artifact_name} for device type(s) "
        f"{', '.join(written.device_types)}, carrying {m.name} version {m.version} sequence "
        f"{m.sequence} ({'signed' if written.signed else 'not signed'} for Mender)"
    )
    foreign = [t for t in written.device_types if t not in m.compatible]
    if foreign:
        print(
            f"note: the manifest is not for {', '.join(foreign)}: such devices will refuse it "
            "in Download"
        )
    return 0
