"""What every ``otacast-signer`` command shares: the parser class, checked argument types,
reading a manifest and printing a time.

An argument type turns text into a value or into argparse's one-line usage error (exit code 2,
"see --help"); range checks live in the type, so a command never sees a value out of range.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeAlias, TypeVar

from otacast.schemas import units
from otacast.schemas.limits import (
    MAX_CHUNK_BYTES,
    MAX_DATAGRAM,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_BYTES,
    MIN_SYMBOL_SIZE,
    SYMBOL_ALIGNMENT,
)
from otacast.schemas.manifest import Envelope, parse_envelope
from otacast.schemas.wire import DATA_HEADER_SIZE
from otacast.signer.errors import UsageError
from otacast.signer.fileio import read_bounded

PROG = "otacast-signer"
T = TypeVar("T")
MAX_SYMBOL_SIZE = (MAX_DATAGRAM - DATA_HEADER_SIZE) // SYMBOL_ALIGNMENT * SYMBOL_ALIGNMENT
MIN_SIGNED_RATE = 1000  # the manifest schema's floor for a rate channel, bytes/s


class Parser(argparse.ArgumentParser):
    """Usage errors become `UsageError`, so `main` reports them like every other failure."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


# Where each command registers its sub-parser (``sub.add_parser(...)``).
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def read_manifest_bytes(path: Path) -> bytes:
    """A manifest file's bytes, one more than the cap at most (the verifier refuses those)."""
    return read_bounded(path, MAX_MANIFEST_BYTES, "manifest")


def read_manifest(path: Path) -> Envelope:
    """A manifest file parsed without trusting it (signatures are not checked)."""
    return parse_envelope(read_manifest_bytes(path))


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


def _listen(text: str) -> tuple[str, int]:
    """``[ADDR]:PORT``, ``ADDR:PORT`` (IPv4) or ``:PORT`` (every address) as (address, port)."""
    host, colon, number = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if not colon or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ValueError(f"{text!r} is not [ADDR]:PORT with a port 1..65535 (e.g. :9464)")
    try:
        address = str(ipaddress.ip_address(host)) if host else "::"
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return address, int(number)


def _unpaced_or_rate(text: str) -> int:
    if text.strip().lower() in ("0", "max", "unlimited"):
        return 0
    rate = units.parse_rate(text)
    if rate < 1:  # would read as "unpaced": the opposite of what a tiny rate asks for
        raise ValueError(f"rate {text!r} is below 1 byte/s")
    return rate


positive = _argtype(_integer, lambda v: None if v >= 1 else "must be 1 or more")
port = _argtype(_integer, lambda v: None if 1 <= v <= 65535 else "a port is 1..65535")
duration = _argtype(units.parse_duration)
expiry = _argtype(units.parse_duration, lambda v: None if v >= 1 else "must be at least 1s")
fraction = _argtype(units.parse_fraction)
sender = _argtype(_sender_pair)
listen_address = _argtype(_listen)
rate_or_max = _argtype(_unpaced_or_rate)
channel_rate = _argtype(
    units.parse_rate, lambda v: None if v >= MIN_SIGNED_RATE else "a rate channel is at least 1K"
)
chunk_size = _argtype(
    units.parse_size,
    lambda v: (
        None
        if v == 0 or MIN_CHUNK_BYTES <= v <= MAX_CHUNK_BYTES
        else "chunk size must be between 64K and 8M"
    ),
)
symbol_size = _argtype(
    _integer,
    lambda v: (
        None
        if MIN_SYMBOL_SIZE <= v <= MAX_SYMBOL_SIZE and v % SYMBOL_ALIGNMENT == 0
        else f"symbol size must be a multiple of {SYMBOL_ALIGNMENT} in "
        f"{MIN_SYMBOL_SIZE}..{MAX_SYMBOL_SIZE}"
    ),
)
