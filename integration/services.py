"""Real servers for tests and the demo, started inside a namespace host and always reaped:
nginx (static mirror with Range requests) and dnsmasq (SRV/AAAA records).

Both are context managers that raise `ServiceMissing` when the program is not installed (tests
turn that into a skip, which fails the run under CI=true) and RuntimeError when it will not start.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .netns import Host, ip, stop

START_TIMEOUT = 10.0
_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
_LOG_LINE = re.compile(r'(\d{3}) (\d+) "(.*)" (\S+)')


class ServiceMissing(Exception):
    """The program is not installed here."""


def _program(name: str, package: str) -> str:
    found = shutil.which(name, path=_PATH)
    if found is None:
        raise ServiceMissing(f"{name} is not installed (Debian package {package})")
    return found


@dataclass(frozen=True)
class Served:
    status: int
    bytes: int
    range: str
    path: str


@dataclass(frozen=True)
class Nginx:
    process: subprocess.Popen[str]
    prefix: Path
    base_url: str

    def served(self) -> list[Served]:
        """Every request nginx logged: status, body bytes sent, Range header, path."""
        served = []
        for line in (self.prefix / "access.log").read_text().splitlines():
            match = _LOG_LINE.fullmatch(line)
            if match is None:
                raise RuntimeError(f"unexpected nginx log line {line!r}")
            served.append(Served(int(match[1]), int(match[2]), match[3], match[4]))
        return served


def _nginx_config(prefix: Path, root: Path, address: str, port: int, extra: str) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
master_process off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    log_format ranges '$status $body_bytes_sent "$http_range" $uri';
    access_log {prefix / "access.log"} ranges;
{temp}
    default_type application/octet-stream;
    server {{
        listen [{address}]:{port};
        root {root};
{extra}
    }}
}}
"""


@contextmanager
def nginx(
    host: Host, root: Path, prefix: Path, port: int = 8080, extra: str = ""
) -> Iterator[Nginx]:
    """nginx serving `root` on [host address]:port, with `extra` directives (e.g. locations)
    in its server block; stopped and reaped on exit."""
    program = _program("nginx", "nginx")
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(_nginx_config(prefix, root, host.address, port, extra))
    with (prefix / "stderr").open("w") as stderr:
        process = host.popen(
            program,
            "-p",
            str(prefix),
            "-c",
            str(config),
            "-e",
            str(prefix / "error.log"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # The pid file is written after the listening socket is bound.
        deadline = time.monotonic() + START_TIMEOUT
        while not (prefix / "nginx.pid").exists():
            error_log = prefix / "error.log"
            log = error_log.read_text() if error_log.exists() else ""
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {log}")
            time.sleep(0.05)
        yield Nginx(process, prefix, f"http://[{host.address}]:{port}")
    finally:
        stop([process])


@contextmanager
def dnsmasq(
    host: Host, records: Sequence[str], log: Path, address: str = "fd66::53", port: int = 5353
) -> Iterator[str]:
    """dnsmasq answering `records` (dnsmasq options) on [address]:port, an address added to the
    host's loopback.  Yields the resolver as ``[address]:port``."""
    program = _program("dnsmasq", "dnsmasq-base")
    ip("-n", host.netns, "addr", "add", f"{address}/128", "dev", "lo")
    with log.open("w") as sink:
        process = host.popen(
            program,
            "--no-daemon",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={address}",
            f"--port={port}",
            *records,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while address not in host.run("ss", "-Hlun", f"sport = :{port}").stdout:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"dnsmasq did not listen on [{address}]:{port}: {log.read_text()}"
                )
            time.sleep(0.05)
        yield f"[{address}]:{port}"
    finally:
        stop([process])
