"""``otacast``: the device command.

Six commands, each registered next to the function that runs it (`otacast.plugin.commands`):
``verify`` checks a manifest as the device would; ``fetch`` receives a release over multicast
(with HTTP fallback) and writes the verified image; ``install`` also hands it to an installer and
records it (`otacast.plugin.deliver`); ``watch`` is the daemon that does that for every newer
release heard on the channel; ``trust`` shows or rotates the trusted keys; ``status`` shows what
is installed and happening.  Settings come from the command line, then the device config file
(`config.py`), then built-in defaults.

Every deliberate failure is an `OtacastError` subclass; `main` prints its one-line message (and,
with ``--json``, one JSON object) and exits with the class's code (`program.run`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .commands import fetch, install, status, trust, verify, watch
from .commands.args import PROG, Subcommands
from .program import Parser, run

# In the order `otacast --help` lists them.
REGISTER: tuple[Callable[[Subcommands], None], ...] = (
    verify.add_verify,
    fetch.add_fetch,
    install.add_install,
    watch.add_watch,
    trust.add_trust,
    status.add_status,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Receive signed otacast updates on a device.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in REGISTER:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        code: int = args.run(args)
        return code

    json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    return run(PROG, body, json_errors=json_errors)


if __name__ == "__main__":
    sys.exit(main())
