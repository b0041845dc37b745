"""``otacast-signer trust-set``: rotate or revoke the devices' release keys."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from otacast.schemas import trustset, units
from otacast.schemas.trustset import MAX_TRUST_BYTES
from otacast.signer import keys
from otacast.signer.errors import UsageError, WriteError
from otacast.signer.fileio import atomic_write, read_bounded

from . import args as types
from .args import Subcommands


def add_trust_set(sub: Subcommands) -> None:
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
        type=types.expiry,
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
    p.set_defaults(run=cmd_trust_set)


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
        f"{len(document.signatures)} signature(s), expires {units.format_time(d.expires)}"
    )
    return 0
