"""What every device command line shares: usage errors as `UsageError`, and one error-to-exit path.

Both device programs (``otacast`` and ``otacast-mender-module``) parse with `Parser`, whose
mistakes become `UsageError` (exit 2) like any other refusal, and run through `run`: an
`OtacastError` prints one line, ``PROG: error: ...``, on stderr and exits with its class's code
(README, "Exit codes"); with ``json_errors`` the same error is also one JSON object on stdout, for
callers that read ``--json`` output; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from otacast.schemas.errors import OtacastError

from .errors import UsageError
from .jsonlines import json_line

# The shell's code for a process ended by SIGINT (128 + 2).
INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are `UsageError`, prefixed with the subcommand if any."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]  # "otacast install" -> "install"
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


def run(prog: str, body: Callable[[], int], *, json_errors: bool = False) -> int:
    """`body`'s exit status, or the exit code of the error it raised (module doc)."""
    try:
        return body()
    except OtacastError as exc:
        if json_errors:
            print(json_line({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return INTERRUPTED
