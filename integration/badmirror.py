"""A hostile HTTP mirror for tests, run inside a namespace host:

    python badmirror.py ADDRESS PORT IMAGE

It answers ``GET /<behaviour>/...`` Range requests for IMAGE, misbehaving as the first path
segment says -- what nginx cannot be made to do:

- ``short``: declares the asked range's length, sends half of it, hangs up;
- ``endless``: a 206 for the asked range with a chunked body that never ends (garbage, until
  the client hangs up or `ENDLESS_CAP`);
- ``drip``: the right bytes, one every `DRIP_INTERVAL` seconds: never idle long enough for a
  read timeout, far too slow to be worth waiting for;
- ``headerdrip``: the status line and then a header line that never ends, one byte every
  `HEADER_DRIP_INTERVAL` seconds: the headers are never complete, and no read is ever idle.

On SIGTERM it prints one JSON line -- requests and body bytes written per behaviour -- and exits,
so the test sees from the server's side how much a fetcher let it send.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ENDLESS_CAP = 1 << 30  # a fetcher that never cut the body off shows up as 1 GiB written
DRIP_INTERVAL = 0.2
HEADER_DRIP_INTERVAL = 1.0
HEADER_DRIP_HEAD = b"HTTP/1.1 206 Partial Content\r\nX-Drip: "
GARBAGE = b"\x5a" * 65536

hits: Counter[str] = Counter()
written: Counter[str] = Counter()
lock = threading.Lock()
stopping = threading.Event()


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    image = b""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        behaviour = self.path.strip("/").split("/")[0]
        with lock:
            hits[behaviour] += 1
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if behaviour == "headerdrip":
            self._drip_headers()
            return
        if behaviour not in ("short", "endless", "drip") or match is None:
            self.send_error(404)
            return
        first, last = int(match[1]), min(int(match[2]), len(self.image) - 1)
        body = self.image[first : last + 1]
        self.close_connection = True
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.image)}")
        if behaviour == "endless":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if behaviour == "short":
                self._send(behaviour, body[: len(body) // 2])
            elif behaviour == "endless":
                while written[behaviour] < ENDLESS_CAP and not stopping.is_set():
                    self._send(behaviour, b"%x\r\n%s\r\n" % (len(GARBAGE), GARBAGE))
            else:
                for i in range(len(body)):
                    if stopping.wait(DRIP_INTERVAL):
                        break
                    self._send(behaviour, body[i : i + 1])
        except OSError:
            pass  # the client hung up: what a fetcher cutting us off looks like

    def _drip_headers(self) -> None:
        self.close_connection = True
        sent = 0
        try:
            while not stopping.wait(HEADER_DRIP_INTERVAL):
                byte = HEADER_DRIP_HEAD[sent : sent + 1] or b"a"
                self._send("headerdrip", byte)
                sent += 1
        except OSError:
            pass  # the client hung up

    def _send(self, behaviour: str, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        with lock:
            written[behaviour] += len(data)


def main() -> None:
    address, port, image = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    Handler.image = image.read_bytes()
    server = Server((address, port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    print("listening", flush=True)
    while not stopping.wait(0.1):
        pass
    server.shutdown()
    with lock:
        print(json.dumps({"hits": hits, "written": written}), flush=True)


if __name__ == "__main__":
    main()
