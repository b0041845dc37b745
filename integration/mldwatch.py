"""The sender's MLD listener tracker on its own, for tests: prints when groups become listened.

    python mldwatch.py IFACE SECONDS GROUP[/SOURCE] ...

Opens `otacast.signer.listeners.Listeners` on IFACE watching the GROUPs, polls it every 10 ms
for SECONDS, and prints one JSON line per change of `listened(GROUP, SOURCE)` (``{"time": wall
clock, "group", "source", "listened"}``), then a summary (``{"stats": ...}``).  Exits 3 if the
raw socket could not be opened.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from otacast.signer.listeners import Listeners


def main() -> None:
    interface, seconds = sys.argv[1], float(sys.argv[2])
    watched = [(g.split("/")[0], g.split("/")[1] if "/" in g else None) for g in sys.argv[3:]]
    listeners = Listeners.open(
        interface, [g for g, _ in watched], time.monotonic(), lambda m: print(m, file=sys.stderr)
    )
    if listeners is None:
        sys.exit(3)
    state = {key: False for key in watched}
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        listeners.poll(now)
        for group, source in watched:
            heard = listeners.listened(group, source, now)
            if heard != state[(group, source)]:
                state[(group, source)] = heard
                line = {"time": time.time(), "group": group, "source": source, "listened": heard}
                print(json.dumps(line), flush=True)
        time.sleep(0.01)
    table = listeners.table
    stats: dict[str, object] = {
        "reports": table.stats.reports,
        "queries": table.stats.queries,
        "sent_queries": table.stats.sent_queries,
        "ignored": table.stats.ignored,
        "rejected": dict(table.stats.rejected),
    }
    stats["querier"] = table.querier
    stats["address"] = None if table.address is None else table.address.hex()
    stats["driver"] = asdict(listeners.counters)
    print(json.dumps({"stats": stats}), flush=True)


if __name__ == "__main__":
    main()
