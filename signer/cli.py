"""``otacast-signer``: the publisher's command line.

Nine commands, each registered next to the function that runs it (`otacast.signer.commands`):
``keygen``, ``sign`` (and co-sign), ``verify`` and ``inspect`` (release keys and manifests,
`commands.release`); ``serve`` (the multicast carousel, `commands.serve`); ``publish``,
``dns-records`` and ``mender-artifact`` (putting a release where devices find it,
`commands.publish`); ``trust-set`` (key rotation, `commands.trust`).

Every deliberate failure is an `OtacastError` subclass; `main` prints its one-line message and
exits with the class's code (README, "Exit codes").  Nothing is written unless the whole
operation succeeded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from otacast.schemas.errors import OtacastError

from .commands import publish, release, serve, trust
from .commands.args import PROG, Parser, Subcommands

# In the order `--help` lists them.
REGISTER: tuple[Callable[[Subcommands], None], ...] = (
    release.add_keygen,
    release.add_sign,
    release.add_verify,
    serve.add_serve,
    publish.add_publish,
    publish.add_dns_records,
    publish.add_mender_artifact,
    release.add_inspect,
    trust.add_trust_set,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Sign and publish otacast update images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in REGISTER:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code: int = args.run(args)
        return code
    except OtacastError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
