"""The device's ``--json`` lines: one JSON object per line, each with the time it was written.

Every JSON line a device command prints (the receive events of `otacast.plugin.report`,
``watch``'s events, ``install``'s result, ``status``, ``trust``, ``verify``, and errors from
`otacast.plugin.program`) goes through `json_line`, which adds ``"time"``: the wall-clock time
of writing, RFC 3339 in UTC with milliseconds (``2026-12-03T10:24:44.123Z``), so a log of lines
from a device can be read against the sender's and against other devices' without a clock of
its own.  A record's own ``"time"`` is kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime


def rfc3339(wall: float) -> str:
    """`wall` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    moment = datetime.fromtimestamp(wall, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def json_line(
    record: Mapping[str, object], *, wall: float | None = None, sort_keys: bool = False
) -> str:
    """`record` as one JSON line (without its newline), with ``"time"`` (module doc) taken
    from `wall`, or the clock when none is given."""
    stamped = {"time": rfc3339(time.time() if wall is None else wall), **record}
    return json.dumps(stamped, sort_keys=sort_keys)
