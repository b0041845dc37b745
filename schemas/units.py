"""Human quantities on command lines and in config files: sizes, durations, rates, dates.

``4M`` and ``4MiB`` are 4 * 2**20 bytes (storage convention); rates follow networking
convention and are decimal: ``50M`` is 50 * 10**6 bytes/s and ``400Mbit`` is 400 * 10**6 bits/s.
Every parser raises ValueError with a message that names the accepted forms.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|b|bps|)\s*(?:/s)?\s*$", re.IGNORECASE)

_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``4M``, ``4MiB``, ``1G`` -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r} (use e.g. 65536, 64K, 4M, 1G)")
    return int(match.group(1)) * _BINARY[match.group(2).lower()]


def parse_duration(text: str) -> int:
    """``3600``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r} (use e.g. 3600, 90s, 15m, 12h, 30d, 2w)")
    return int(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_rate(text: str) -> int:
    """``50M`` (bytes/s), ``400Mbit`` or ``400Mbps`` (bits/s), ``1G`` -> bytes per second."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"invalid rate {text!r} (use e.g. 50M for bytes/s, 400Mbit for bits/s)")
    value = float(match.group(1)) * _DECIMAL[match.group(2).lower()]
    if match.group(3).lower() in ("bit", "bps"):
        value /= 8
    return int(value)


def parse_fraction(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1."""
    stripped = text.strip()
    try:
        value = float(stripped[:-1]) / 100 if stripped.endswith("%") else float(stripped)
    except ValueError:
        raise ValueError(f"invalid fraction {text!r} (use e.g. 10% or 0.1)") from None
    if not 0 <= value <= 100 or value != value:
        raise ValueError(f"fraction {text!r} out of range")
    return value


def format_time(seconds: float) -> str:
    """A Unix time as an RFC 3339 UTC date to the second (``2026-12-31T00:00:00Z``), the way
    every date a person reads is written; a time no calendar date holds (beyond year 9999, as a
    hostile trust set may claim) stays a number (``@9999999999999``) instead of raising."""
    try:
        return datetime.fromtimestamp(int(seconds), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"@{seconds:.0f}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
