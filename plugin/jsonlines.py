"""The device's ``--json`` lines: one JSON object per line, each with the time it was written.

Every JSON line a device command prints (the receive events of `otacast.plugin.report`,
``watch``'s events, ``install``'s result, ``status``, ``trust``, ``verify``, and errors from
`otacast.plugin.program`) goes through `json_line`, which adds ``"time"``: the wall-clock time
of writing, RFC 3339 in UTC with milliseconds (`otacast.schemas.timestamps`, as the sender's
lines have it), so a log of lines from a device can be read against the sender's and against
other devices'.  A record's own ``"time"`` is kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from otacast.schemas.timestamps import rfc3339


def json_line(
    record: Mapping[str, object], *, wall: float | None = None, sort_keys: bool = False
) -> str:
    """`record` as one JSON line (without its newline), with ``"time"`` (module doc) taken
    from `wall`, or the clock when none is given."""
    stamped = {"time": rfc3339(time.time() if wall is None else wall), **record}
    return json.dumps(stamped, sort_keys=sort_keys)
