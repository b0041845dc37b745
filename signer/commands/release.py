"""``otacast-signer keygen``, ``sign``, ``verify`` and ``inspect``: release keys and manifests."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from otacast.schemas import addressing, fec, units
from otacast.schemas.errors import MalformedManifest
from otacast.schemas.limits import MAX_DELTA_FROM
from otacast.schemas.manifest import FORMATS, Envelope, Manifest, Transport
from otacast.schemas.policy import TrustSet, verify_envelope
from otacast.signer import keys, lane, sign
from otacast.signer.errors import UsageError, WriteError
from otacast.signer.fileio import atomic_write

from . import args as types
from .args import Subcommands, read_manifest, read_manifest_bytes


def add_keygen(sub: Subcommands) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 release key pair (NAME.key, NAME.pub)")
    p.add_argument("name", type=Path, help="path prefix for NAME.key (mode 0600) and NAME.pub")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(run=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    key = keys.generate()
    secret, public = keys.write_keypair(key, args.name, overwrite=args.force)
    print(f"wrote {secret} (secret, mode 0600) and {public}")
    print(f"key id {key.key_id}")
    return 0


def add_sign(sub: Subcommands) -> None:
    p = sub.add_parser("sign", help="make a signed manifest for an image, or co-sign one")
    p.add_argument("image", type=Path, nargs="?", help="the update image")
    p.add_argument(
        "--key",
        type=Path,
        action="append",
        required=True,
        help="secret key file; repeat to sign with several keys",
    )
    p.add_argument(
        "--cosign",
        type=Path,
        metavar="MANIFEST",
        help="add signatures to an existing manifest instead of making one",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output (default IMAGE.manifest.json; with --cosign the manifest is updated in place)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--sequence",
        type=types.positive,
        help="release sequence number (anti-rollback; must grow with every release)",
    )
    p.add_argument(
        "--version", dest="release_version", help="display version (default: the sequence number)"
    )
    p.add_argument("--name", help="release name (default: the image file name)")
    p.add_argument(
        "--device-type",
        action="append",
        default=[],
        help="compatible device type; repeat for several",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="image format (default: from the file extension: .mender, .swu, else raw)",
    )
    p.add_argument(
        "--expires",
        type=types.expiry,
        default=units.parse_duration("30d"),
        help="validity from now, e.g. 12h, 30d, 2w (default 30d)",
    )
    p.add_argument("--channel", help="channel DNS name, e.g. updates.example.com")
    p.add_argument(
        "--scope",
        choices=sorted(addressing.SCOPES),
        default=addressing.DEFAULT_SCOPE,
        help="multicast scope (default global)",
    )
    p.add_argument(
        "--port",
        type=types.port,
        default=addressing.DEFAULT_PORT,
        help=f"UDP port (default {addressing.DEFAULT_PORT})",
    )
    p.add_argument("--group", help="ASM group (default: derived from the channel)")
    p.add_argument(
        "--stream-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUBLIC_KEY",
        help="a sender's stream public key (packet authentication); repeat for several senders, "
        "numbered 0, 1, ... in order",
    )
    p.add_argument("--ssm-group", help="SSM group (default: derived from the channel)")
    p.add_argument(
        "--rate",
        type=types.channel_rate,
        action="append",
        default=[],
        help="rate channel, e.g. 50M (bytes/s) or 400Mbit; repeat for several",
    )
    p.add_argument(
        "--http-url",
        action="append",
        default=[],
        help="HTTP(S) URL of the image on a mirror; repeat for several",
    )
    p.add_argument(
        "--chunk-size",
        type=types.chunk_size,
        default=0,
        help="chunk size, 64K..8M, rounded down to whole symbols (default 8M)",
    )
    p.add_argument(
        "--symbol-size",
        type=types.symbol_size,
        default=fec.DEFAULT_SYMBOL_SIZE,
        help=f"FEC symbol size, a multiple of 8 (default {fec.DEFAULT_SYMBOL_SIZE}: "
        "1228-byte datagrams; jumbo-frame LANs can use up to 8928)",
    )
    p.add_argument(
        "--index",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="list a block index in the manifest (4 KiB blocks, 0.39%% of the image, sent and "
        "published beside it, for delta delivery); default: for raw images only",
    )
    p.add_argument(
        "--delta-from",
        action="append",
        default=[],
        metavar="OLD[=PATH]",
        help="serve devices on the older release whose signed manifest is OLD a delta lane "
        "(the blocks they lack and an index patch, written beside the output as IMAGE.delta "
        "and IMAGE.patch-SEQUENCE); its index or image is taken from beside OLD "
        f"(IMAGE.blockindex, else IMAGE) or from PATH; repeat for up to {MAX_DELTA_FROM} "
        "releases (raw images only)",
    )
    p.set_defaults(run=cmd_sign)


def cmd_sign(args: argparse.Namespace) -> int:
    signing_keys = [keys.load_secret(path) for path in args.key]
    if args.cosign:
        if args.image:
            raise UsageError("give either an IMAGE or --cosign MANIFEST, not both")
        envelope = read_manifest(args.cosign)
        for key in signing_keys:
            envelope = sign.add_signature(envelope, key)
        out = args.out or args.cosign
        atomic_write(out, envelope.to_file_bytes(), overwrite=args.force or out == args.cosign)
        print(
            f"{out}: {len(envelope.signatures)} signature(s), "
            f"expires {units.format_time(envelope.manifest.expires)}"
        )
        return 0
    missing = [
        flag
        for flag, value in (
            ("IMAGE", args.image),
            ("--sequence", args.sequence),
            ("--channel", args.channel),
            ("--device-type", args.device_type),
        )
        if not value
    ]
    if missing:
        raise UsageError(f"sign needs {', '.join(missing)}")
    try:
        transport = Transport.for_channel(
            args.channel,
            scope=args.scope,
            port=args.port,
            asm_group=args.group,
            ssm_group=args.ssm_group,
            rates=tuple(args.rate),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = args.out or args.image.with_name(args.image.name + ".manifest.json")
    if out.exists() and not args.force:
        raise WriteError(f"{out} exists; pass --force to replace it")
    created = int(time.time())
    image_format = args.format or _guess_format(args.image)
    sources = (
        lane.load_sources(
            args.delta_from,
            lane.NewRelease(
                name=args.name or args.image.name,
                channel=transport.channel,
                sequence=args.sequence,
                image_format=image_format,
                indexed=args.index is not False,
            ),
        )
        if args.delta_from
        else []
    )
    written: list[Path] = []
    try:
        envelope, written = _sign_new(
            args, transport, created, signing_keys, image_format, sources, out.parent
        )
        atomic_write(out, envelope.to_file_bytes(), overwrite=True)
    except MalformedManifest as exc:
        lane.remove(written)
        # Everything in a new manifest came from the options: say so, with the schema's reason.
        raise UsageError(f"the options do not make a valid manifest: {exc}") from None
    except BaseException:
        lane.remove(written)
        raise
    m = envelope.manifest
    print(
        f"wrote {out}: {m.name} version {m.version} sequence {m.sequence}, "
        f"{m.chunk_count} chunk(s), session {m.session_id.hex()}, "
        f"expires {units.format_time(m.expires)}"
    )
    if m.delta is not None:
        print(
            f"wrote {', '.join(str(p) for p in written)}: delta lane of {m.delta.blocks} "
            f"block(s) in {units.format_bytes(m.delta.length)} for release(s) "
            f"{', '.join(str(f.sequence) for f in m.delta.sources)}"
        )
    return 0


def _guess_format(image: Path) -> str:
    suffix = image.suffix.lower()
    return {".mender": "mender", ".swu": "swu"}.get(suffix, "raw")


def _sign_new(
    args: argparse.Namespace,
    transport: Transport,
    created: int,
    signing_keys: list[keys.SigningKey],
    image_format: str,
    sources: list[lane.DeltaSource],
    directory: Path,
) -> tuple[Envelope, list[Path]]:
    """The signed envelope and the lane files written for it (none without `sources`)."""
    manifest, index = sign.build_release(
        args.image,
        name=args.name or args.image.name,
        sequence=args.sequence,
        version=args.release_version or str(args.sequence),
        created=created,
        expires=created + args.expires,
        compatible=args.device_type,
        image_format=image_format,
        transport=transport,
        http=args.http_url,
        chunk_size=args.chunk_size,
        symbol_size=args.symbol_size,
        stream_keys=[keys.load_public(path) for path in args.stream_key],
        index=args.index,
    )
    written: list[Path] = []
    if sources:
        assert index is not None  # load_sources refused a release without one
        info, written = lane.make_files(
            args.image, index, sources, directory, manifest.image.name, overwrite=args.force
        )
        manifest = dataclasses.replace(manifest, delta=info)
    try:
        return sign.sign(manifest, signing_keys), written
    except BaseException:
        lane.remove(written)
        raise


def add_verify(sub: Subcommands) -> None:
    p = sub.add_parser("verify", help="check a manifest's signatures and rules, and an image")
    p.add_argument("manifest", type=Path)
    p.add_argument(
        "--trust",
        type=Path,
        action="append",
        required=True,
        help="trusted public key file; repeat for several",
    )
    p.add_argument(
        "--threshold",
        type=types.positive,
        default=1,
        help="signatures required from distinct trusted keys (default 1)",
    )
    p.add_argument(
        "--image",
        type=Path,
        help="also check this image against the manifest (and the delta lane's files beside "
        "the manifest, when it has a lane)",
    )
    p.add_argument("--device-type", help="check the manifest is for this device type")
    p.add_argument(
        "--installed-sequence",
        type=int,
        help="check the manifest is newer than this installed sequence",
    )
    p.add_argument(
        "--at", type=int, metavar="UNIX_TIME", help="check expiry as of this time instead of now"
    )
    p.set_defaults(run=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    publics = [keys.load_public(path) for path in args.trust]
    try:
        trust = TrustSet.from_public_keys(publics, args.threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    verified = verify_envelope(
        read_manifest_bytes(args.manifest),
        trust,
        keys.check_signature,
        now=time.time() if args.at is None else args.at,
        device_type=args.device_type,
        installed_sequence=args.installed_sequence,
    )
    m = verified.manifest
    print(
        f"OK: {m.name} version {m.version} sequence {m.sequence}, signed by "
        f"{len(verified.signers)} of {len(trust.keys)} trusted key(s) "
        f"(threshold {trust.threshold}), expires {units.format_time(m.expires)}"
    )
    if args.image:
        sign.check_image(m, args.image)
        print(f"OK: {args.image} matches ({m.image.length} bytes, {m.chunk_count} chunk(s))")
        for lane_file in lane.check_files(m, args.manifest.parent):
            print(f"OK: {lane_file.path} matches")
    return 0


def add_inspect(sub: Subcommands) -> None:
    p = sub.add_parser("inspect", help="show a manifest's contents (signatures not checked)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_inspect)


def describe(envelope: Envelope) -> dict[str, Any]:
    m: Manifest = envelope.manifest
    full_k = m.source_symbols(0)
    return {
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
        "created": units.format_time(m.created),
        "expires": units.format_time(m.expires),
        "compatible": list(m.compatible),
        "image": {
            "name": m.image.name,
            "length": m.image.length,
            "sha256": m.image.sha256.hex(),
            "format": m.image.format,
        },
        "chunks": {"count": m.chunk_count, "size": m.chunks.size, "objects": m.part_count},
        "fec": {
            "scheme": m.fec.scheme,
            "symbol_size": m.fec.symbol_size,
            "source_symbols_per_chunk": full_k,
        },
        "transport": {
            "channel": m.transport.channel,
            "scope": m.transport.scope,
            "port": m.transport.port,
            "asm_group": m.transport.asm_group,
            "ssm_group": m.transport.ssm_group,
            "srv": m.transport.srv,
            "rates": list(m.transport.rates),
        },
        "http": list(m.http),
        "stream_keys": len(m.stream_keys),
        "index": (
            None if m.index is None else {"length": m.index.length, "sha256": m.index.sha256.hex()}
        ),
        "delta": (
            None
            if m.delta is None
            else {
                "length": m.delta.length,
                "sha256": m.delta.sha256.hex(),
                "blocks": m.delta.blocks,
                "from": [f.sequence for f in m.delta.sources],
            }
        ),
        "session_id": m.session_id.hex(),
        "signatures": [s.keyid for s in envelope.signatures],
        "signatures_checked": False,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(read_manifest(args.manifest))
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    t = info["transport"]
    lines = [
        f"release    {info['name']} version {info['version']} sequence {info['sequence']}",
        f"valid      {info['created']} .. {info['expires']}",
        f"devices    {', '.join(info['compatible'])}",
        f"image      {info['image']['name']} ({info['image']['format']}, "
        f"{info['image']['length']} bytes = {units.format_bytes(info['image']['length'])})",
        f"sha256     {info['image']['sha256']}",
        f"chunks     {info['chunks']['count']} x {units.format_bytes(info['chunks']['size'])} "
        f"(at most; {info['chunks']['objects']} FLUTE object(s) of up to 255 chunks)",
        f"fec        raptorq, {info['fec']['symbol_size']}-byte symbols, "
        f"K={info['fec']['source_symbols_per_chunk']} per full chunk",
        f"channel    {t['channel']} port {t['port']} scope {t['scope']}",
        f"groups     ASM {t['asm_group']}  SSM {t['ssm_group']}  SRV {t['srv']}",
    ]
    if t["rates"]:
        lines.append("rates      " + ", ".join(f"{r / 1e6:g} MB/s" for r in t["rates"]))
    lines += [f"mirror     {url}" for url in info["http"]]
    if info["index"] is not None:
        lines.append(
            f"index      {units.format_bytes(info['index']['length'])} block index "
            f"(4 KiB blocks), sha256 {info['index']['sha256']}"
        )
    if info["delta"] is not None:
        lines.append(
            f"delta      {units.format_bytes(info['delta']['length'])} lane object "
            f"({info['delta']['blocks']} blocks) for devices on release(s) "
            + ", ".join(str(s) for s in info["delta"]["from"])
        )
    lines.append(f"session    {info['session_id']}")
    lines += [f"signature  keyid {keyid}" for keyid in info["signatures"]]
    lines.append("(signatures not checked: use 'otacast-signer verify --trust KEY.pub')")
    print("\n".join(lines))
    return 0
