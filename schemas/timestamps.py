"""The time a JSON line was written, as both command lines print it.

Every ``--json`` line of the device commands (`otacast.plugin.jsonlines`) and of
``otacast-signer serve`` (`otacast.signer.report`) carries ``"time"``: the wall-clock time of
writing, RFC 3339 in UTC with milliseconds (``2026-12-03T10:24:44.123Z``), so that logs of a
sender and of its devices read against each other.  A pure function: the caller reads the clock.
"""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(wall: float) -> str:
    """`wall` (seconds since the epoch) as RFC 3339 UTC with milliseconds (truncated)."""
    moment = datetime.fromtimestamp(wall, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
