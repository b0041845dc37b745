"""``otacast-signer``: keygen, sign (and co-sign), verify, inspect.

Every deliberate failure is an `OtacastError` subclass; `main` prints its one-line message and
exits with the class's code (README, "Exit codes").  Nothing is written unless the whole
operation succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from otacast.schemas import addressing, fec, trustset, units
from otacast.schemas.errors import MalformedManifest, OtacastError
from otacast.schemas.limits import (
    MAX_CHUNK_BYTES,
    MAX_DATAGRAM,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_BYTES,
    MIN_SYMBOL_SIZE,
    SYMBOL_ALIGNMENT,
)
from otacast.schemas.manifest import FORMATS, Envelope, Manifest, Transport, parse_envelope
from otacast.schemas.policy import TrustSet, check_envelope
from otacast.schemas.trustset import MAX_TRUST_BYTES
from otacast.schemas.wire import DATA_HEADER_SIZE

from . import keys, mender_artifact, publish, sign
from .channels import ServeOptions
from .errors import UsageError, WriteError
from .fileio import atomic_write, read_bounded
from .serve import Stop, serve

PROG = "otacast-signer"
T = TypeVar("T")
MAX_SYMBOL_SIZE = (MAX_DATAGRAM - DATA_HEADER_SIZE) // SYMBOL_ALIGNMENT * SYMBOL_ALIGNMENT
MIN_SIGNED_RATE = 1000  # the manifest schema's floor for a rate channel, bytes/s


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


def _argtype(
    parse: Callable[[str], T], check: Callable[[T], str | None] = lambda _: None
) -> Callable[[str], T]:
    """An argparse type from a parser raising ValueError and a range check returning a reason."""

    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
        return value

    return convert


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _sender_pair(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/2, 1/2)")
    return int(index), int(count)


def _unpaced_or_rate(text: str) -> int:
    if text.strip().lower() in ("0", "max", "unlimited"):
        return 0
    rate = units.parse_rate(text)
    if rate < 1:  # would read as "unpaced": the opposite of what a tiny rate asks for
        raise ValueError(f"rate {text!r} is below 1 byte/s")
    return rate


_positive = _argtype(_integer, lambda v: None if v >= 1 else "must be 1 or more")
_port = _argtype(_integer, lambda v: None if 1 <= v <= 65535 else "a port is 1..65535")
_duration = _argtype(units.parse_duration)
_expiry = _argtype(units.parse_duration, lambda v: None if v >= 1 else "must be at least 1s")
_fraction = _argtype(units.parse_fraction)
_sender = _argtype(_sender_pair)
_rate_or_max = _argtype(_unpaced_or_rate)
_channel_rate = _argtype(
    units.parse_rate, lambda v: None if v >= MIN_SIGNED_RATE else "a rate channel is at least 1K"
)
_chunk_size = _argtype(
    units.parse_size,
    lambda v: (
        None
        if v == 0 or MIN_CHUNK_BYTES <= v <= MAX_CHUNK_BYTES
        else "chunk size must be between 64K and 8M"
    ),
)
_symbol_size = _argtype(
    _integer,
    lambda v: (
        None
        if MIN_SYMBOL_SIZE <= v <= MAX_SYMBOL_SIZE and v % SYMBOL_ALIGNMENT == 0
        else f"symbol size must be a multiple of {SYMBOL_ALIGNMENT} in "
        f"{MIN_SYMBOL_SIZE}..{MAX_SYMBOL_SIZE}"
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Sign and publish otacast update images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("keygen", help="create an Ed25519 release key pair (NAME.key, NAME.pub)")
    p.add_argument("name", type=Path, help="path prefix for NAME.key (mode 0600) and NAME.pub")
    p.add_argument("--force", action="store_true", help="replace existing files")

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
        type=_positive,
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
        type=_expiry,
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
        type=_port,
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
        type=_channel_rate,
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
        type=_chunk_size,
        default=0,
        help="chunk size, 64K..8M (default 1M, grown for huge images)",
    )
    p.add_argument(
        "--symbol-size",
        type=_symbol_size,
        default=fec.DEFAULT_SYMBOL_SIZE,
        help=f"FEC symbol size, a multiple of 8 (default {fec.DEFAULT_SYMBOL_SIZE}: "
        "1228-byte datagrams; jumbo-frame LANs can use up to 8928)",
    )

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
        type=_positive,
        default=1,
        help="signatures required from distinct trusted keys (default 1)",
    )
    p.add_argument("--image", type=Path, help="also check this image against the manifest")
    p.add_argument("--device-type", help="check the manifest is for this device type")
    p.add_argument(
        "--installed-sequence",
        type=int,
        help="check the manifest is newer than this installed sequence",
    )
    p.add_argument(
        "--at", type=int, metavar="UNIX_TIME", help="check expiry as of this time instead of now"
    )

    p = sub.add_parser("serve", help="loop a signed image over IPv6 multicast")
    p.add_argument("manifest", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--interface", required=True, help="network interface to send on")
    p.add_argument(
        "--rate",
        type=_rate_or_max,
        default=units.parse_rate("10M"),
        help="send rate, e.g. 10M (bytes/s), 400Mbit, or max (default 10M)",
    )
    p.add_argument(
        "--channel-rate",
        type=_rate_or_max,
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
    p.add_argument("--port", type=_port, help="UDP port (default: the manifest's)")
    p.add_argument("--source", help="source address to send from (must be on --interface)")
    p.add_argument(
        "--hops",
        type=_positive,
        default=8,
        help="multicast hop limit (default 8; 1 never leaves the link)",
    )
    p.add_argument(
        "--sender",
        type=_sender,
        default=(0, 1),
        metavar="I/N",
        help="this is sender I of N: start at offset I/N of the symbol cycle",
    )
    p.add_argument("--loops", type=_positive, help="stop after N passes (default: forever)")
    p.add_argument("--duration", type=_duration, help="stop after this long, e.g. 90s, 2h")
    p.add_argument(
        "--overhead",
        type=_fraction,
        default=0.1,
        help="repair symbols per pass beyond K (default 10%%)",
    )
    p.add_argument(
        "--repair",
        type=_fraction,
        default=0.5,
        help="repair pool per chunk as a share of K, at least 50%% (default 50%%)",
    )
    p.add_argument(
        "--window",
        type=_positive,
        help="chunks interleaved at a time (default: 8 MiB worth, at most 8; receivers hold two "
        "windows of decoders)",
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
    p.add_argument("--no-gso", action="store_true", help="one send per datagram (no UDP GSO)")
    p.add_argument("--loopback", action="store_true", help="also deliver to receivers on this host")
    p.add_argument("--json", action="store_true", help="JSON status lines")

    p = sub.add_parser("publish", help="lay out the image and manifest for static HTTP mirrors")
    p.add_argument("manifest", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--root", type=Path, required=True, help="web root to fill")

    p = sub.add_parser("dns-records", help="print SRV/AAAA records naming a channel's sources")
    p.add_argument("manifest", type=Path, nargs="?", help="take channel and port from here")
    p.add_argument("--channel", help="channel name (instead of a manifest)")
    p.add_argument("--port", type=_port, help="UDP port (default: manifest's, or 4242)")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="[HOST=]ADDR",
        help="a sender's host name and IPv6 address; repeat for several",
    )
    p.add_argument("--ttl", type=_positive, default=300)
    p.add_argument("--priority", type=int, default=10)
    p.add_argument("--weight", type=int, default=10)
    p.add_argument("--format", choices=("zone", "dnsmasq"), default="zone")

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

    p = sub.add_parser("inspect", help="show a manifest's contents (signatures not checked)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "trust-set",
        help="rotate or revoke the devices' release keys: make or co-sign a trust-set document",
    )
    p.add_argument("out", type=Path, help="the trust-set document to write (or co-sign)")
    p.add_argument(
        "--public",
        type=Path,
        action="append",
        default=[],
        help="a public key of the new set; repeat (leave a key out to revoke it)",
    )
    p.add_argument("--threshold", type=int, default=1, help="signatures the new set requires")
    p.add_argument(
        "--version", type=int, help="above the version devices have now (they start at 0)"
    )
    p.add_argument(
        "--expires",
        type=_expiry,
        default=units.parse_duration("30d"),
        help="devices refuse to apply it after this long (default 30d)",
    )
    p.add_argument(
        "--key",
        type=Path,
        action="append",
        required=True,
        help="sign with this secret key; the document needs the current set's threshold "
        "of old keys and the new set's threshold of new keys",
    )
    p.add_argument(
        "--cosign", action="store_true", help="add signatures to the existing document OUT"
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    return parser


def _read_manifest(path: Path) -> Envelope:
    return parse_envelope(read_bounded(path, MAX_MANIFEST_BYTES, "manifest"))


def _guess_format(image: Path) -> str:
    suffix = image.suffix.lower()
    return {".mender": "mender", ".swu": "swu"}.get(suffix, "raw")


def cmd_keygen(args: argparse.Namespace) -> int:
    key = keys.generate()
    secret, public = keys.write_keypair(key, args.name, overwrite=args.force)
    print(f"wrote {secret} (secret, mode 0600) and {public}")
    print(f"key id {key.key_id}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    signing_keys = [keys.load_secret(path) for path in args.key]
    if args.cosign:
        if args.image:
            raise UsageError("give either an IMAGE or --cosign MANIFEST, not both")
        envelope = _read_manifest(args.cosign)
        for key in signing_keys:
            envelope = sign.add_signature(envelope, key)
        out = args.out or args.cosign
        atomic_write(out, envelope.to_file_bytes(), overwrite=args.force or out == args.cosign)
        print(f"{out}: {len(envelope.signatures)} signature(s)")
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
    try:
        envelope = _sign_new(args, transport, created, signing_keys)
    except MalformedManifest as exc:
        # Everything in a new manifest came from the options: say so, with the schema's reason.
        raise UsageError(f"the options do not make a valid manifest: {exc}") from None
    atomic_write(out, envelope.to_file_bytes(), overwrite=True)
    m = envelope.manifest
    print(
        f"wrote {out}: {m.name} version {m.version} sequence {m.sequence}, "
        f"{m.chunk_count} chunk(s), session {m.session_id.hex()}"
    )
    return 0


def _sign_new(
    args: argparse.Namespace,
    transport: Transport,
    created: int,
    signing_keys: list[keys.SigningKey],
) -> Envelope:
    manifest = sign.build_manifest(
        args.image,
        name=args.name or args.image.name,
        sequence=args.sequence,
        version=args.release_version or str(args.sequence),
        created=created,
        expires=created + args.expires,
        compatible=args.device_type,
        image_format=args.format or _guess_format(args.image),
        transport=transport,
        http=args.http_url,
        chunk_size=args.chunk_size,
        symbol_size=args.symbol_size,
        stream_keys=[keys.load_public(path) for path in args.stream_key],
    )
    return sign.sign(manifest, signing_keys)


def cmd_verify(args: argparse.Namespace) -> int:
    publics = [keys.load_public(path) for path in args.trust]
    try:
        trust = TrustSet.from_public_keys(publics, args.threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    envelope = _read_manifest(args.manifest)
    verified = check_envelope(
        envelope,
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
        f"(threshold {trust.threshold}), expires {_iso(m.expires)}"
    )
    if args.image:
        sign.check_image(m, args.image)
        print(f"OK: {args.image} matches ({m.image.length} bytes, {m.chunk_count} chunk(s))")
    return 0


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(envelope: Envelope) -> dict[str, Any]:
    m: Manifest = envelope.manifest
    full_k = m.source_symbols(0)
    return {
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
        "created": _iso(m.created),
        "expires": _iso(m.expires),
        "compatible": list(m.compatible),
        "image": {
            "name": m.image.name,
            "length": m.image.length,
            "sha256": m.image.sha256.hex(),
            "format": m.image.format,
        },
        "chunks": {"count": m.chunk_count, "size": m.chunks.size},
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
        "session_id": m.session_id.hex(),
        "signatures": [s.keyid for s in envelope.signatures],
        "signatures_checked": False,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(_read_manifest(args.manifest))
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
        f"chunks     {info['chunks']['count']} x {units.format_bytes(info['chunks']['size'])}",
        f"fec        raptorq, {info['fec']['symbol_size']}-byte symbols, "
        f"K={info['fec']['source_symbols_per_chunk']} per full chunk",
        f"channel    {t['channel']} port {t['port']} scope {t['scope']}",
        f"groups     ASM {t['asm_group']}  SSM {t['ssm_group']}  SRV {t['srv']}",
    ]
    if t["rates"]:
        lines.append("rates      " + ", ".join(f"{r / 1e6:g} MB/s" for r in t["rates"]))
    lines += [f"mirror     {url}" for url in info["http"]]
    lines.append(f"session    {info['session_id']}")
    lines += [f"signature  keyid {keyid}" for keyid in info["signatures"]]
    lines.append("(signatures not checked: use 'otacast-signer verify --trust KEY.pub')")
    print("\n".join(lines))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    envelope = _read_manifest(args.manifest)
    rates = args.channel_rate or list(envelope.manifest.transport.rates) or [args.rate]
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
        source=args.source,
        hops=args.hops,
        sender_index=args.sender[0],
        sender_count=args.sender[1],
        loops=args.loops,
        duration=args.duration,
        overhead=args.overhead,
        repair=args.repair,
        window=args.window,
        cache_dir=cache,
        gso=not args.no_gso,
        loopback=args.loopback,
        json=args.json,
        stream_key=keys.load_secret(args.stream_key) if args.stream_key else None,
    )
    serve(envelope, args.image, options, sys.stdout, stop=Stop())
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    envelope = _read_manifest(args.manifest)
    for path in publish.publish(envelope, args.image, args.root):
        print(f"wrote {path}")
    if not envelope.manifest.http:
        print("note: the manifest lists no --http-url, so devices will not know this mirror")
    return 0


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


def cmd_trust_set(args: argparse.Namespace) -> int:
    signing_keys = [keys.load_secret(path) for path in args.key]
    if args.cosign:
        if args.public or args.version is not None:
            raise UsageError("trust-set --cosign takes only --key: the document is already made")
        document = trustset.parse_trust(read_bounded(args.out, MAX_TRUST_BYTES, "trust set"))
    else:
        if not args.public or args.version is None:
            raise UsageError("trust-set needs --public (one or more) and --version")
        if args.out.exists() and not args.force:
            raise WriteError(f"{args.out} exists; pass --force to replace it, or --cosign")
        try:
            document = trustset.unsigned(
                [keys.load_public(path) for path in args.public],
                args.threshold,
                args.version,
                int(time.time()) + args.expires,
            )
        except ValueError as exc:
            raise UsageError(f"trust-set: {exc}") from None
    message = document.document.signing_message
    for key in signing_keys:
        document = document.with_signature(key.key_id, key.sign(message))
    atomic_write(args.out, document.to_bytes(), overwrite=True)
    d = document.document
    print(
        f"{args.out}: trust set version {d.version}, {d.threshold} of {len(d.keys)} key(s), "
        f"{len(document.signatures)} signature(s), expires {_iso(d.expires)}"
    )
    return 0


def cmd_dns_records(args: argparse.Namespace) -> int:
    if args.manifest:
        transport = _read_manifest(args.manifest).manifest.transport
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


COMMANDS = {
    "trust-set": cmd_trust_set,
    "keygen": cmd_keygen,
    "sign": cmd_sign,
    "verify": cmd_verify,
    "inspect": cmd_inspect,
    "serve": cmd_serve,
    "publish": cmd_publish,
    "dns-records": cmd_dns_records,
    "mender-artifact": cmd_mender_artifact,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except OtacastError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
