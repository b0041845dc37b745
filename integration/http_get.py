"""The HTTP peer's receiver for bench_compare.py: one GET with requests, streamed to a file.

    python http_get.py URL OUT

Prints one JSON line: bytes, sha256 and seconds from sending the request to the last byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import requests

BLOCK = 1 << 20
TIMEOUT = (10, 60)  # connect, and between two reads: a stalled transfer fails, never hangs


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: http_get.py URL OUT", file=sys.stderr)
        return 2
    url, out = sys.argv[1], Path(sys.argv[2])
    digest = hashlib.sha256()
    size = 0
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the server is on the test LAN
    start = time.monotonic()
    try:
        with session.get(url, stream=True, timeout=TIMEOUT) as response, out.open("wb") as sink:
            response.raise_for_status()
            for block in response.iter_content(BLOCK):
                digest.update(block)
                sink.write(block)
                size += len(block)
    except (requests.RequestException, OSError) as exc:
        print(f"http_get: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - start
    print(json.dumps({"bytes": size, "sha256": digest.hexdigest(), "seconds": round(seconds, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
