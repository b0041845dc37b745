"""A routed test network: a sender's link, a router namespace running smcroute, and two receiver
links, all in namespaces the test creates and deletes.

    tx (fd52::2) --- [rt_tx  router  rt_rx] --- rx (fd53::2)
                            [rt_idle] --- idle (fd54::2)

The router forwards unicast between the three /64s and multicast only along the static (S,G)
routes smcroute installs: smcroute does not speak MLD, so a route is what decides where a
stream goes, and a link without one must see none of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Host, Network, ip, require_root_and_ip, stop

START_TIMEOUT = 10.0
_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
LINKS = {"tx": "fd52::", "rx": "fd53::", "idle": "fd54::"}


class SmcrouteMissing(Exception):
    """smcroute is not installed here."""


@dataclass
class Routed(Network):
    router: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def create(cls) -> Routed:
        require_root_and_ip()
        tag = f"or{os.getpid() % 100000}"
        net = cls(tag=tag, router=f"{tag}-rt")
        try:
            net._add_namespace(net.router)
            for name, prefix in LINKS.items():
                net._link(name, prefix)
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    net.router,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.forwarding=1",
                ],
                check=True,
                capture_output=True,
            )
        except BaseException:
            net.delete()
            raise
        return net

    def _link(self, name: str, prefix: str) -> None:
        port = f"rt_{name}"
        host = self._add_host(f"{self.tag}-{name}", f"{prefix}2", self.router, port)
        ip("-n", self.router, "addr", "add", f"{prefix}1/64", "dev", port, "nodad")
        ip("-n", self.router, "link", "set", port, "up")
        ip("-n", host.netns, "-6", "route", "add", "default", "via", f"{prefix}1")
        self.hosts[name] = host

    def rx_bytes(self, name: str) -> int:
        """Bytes the host's eth0 has received so far."""
        done = self.hosts[name].run("cat", "/sys/class/net/eth0/statistics/rx_bytes")
        return int(done.stdout)

    @contextmanager
    def multicast_routes(self, routes: Sequence[str], workdir: Path) -> Iterator[None]:
        """smcrouted in the router with `routes` (``mroute …`` lines); stopped on exit."""
        program = shutil.which("smcrouted", path=_PATH)
        if program is None:
            raise SmcrouteMissing("smcroute is not installed (Debian package smcroute)")
        config = workdir / "smcroute.conf"
        config.write_text(
            "".join(f"phyint rt_{name} enable\n" for name in LINKS)
            + "".join(f"{route}\n" for route in routes)
        )
        socket_path = workdir / "smcroute.sock"
        log = (workdir / "smcroute.log").open("w")
        # Its own control socket and pid file: the defaults under /run are shared by every
        # namespace on the machine.
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.router,
                program,
                "-n",
                "-N",
                "-f",
                str(config),
                "-u",
                str(socket_path),
                "-P",
                str(workdir / "smcroute.pid"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not self._routes_installed(len(routes)):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "smcrouted did not install its routes: "
                        + (workdir / "smcroute.log").read_text()
                    )
                time.sleep(0.05)
            yield
        finally:
            stop([process])
            log.close()

    def _routes_installed(self, count: int) -> bool:
        done = subprocess.run(
            ["ip", "netns", "exec", self.router, "cat", "/proc/net/ip6_mr_cache"],
            capture_output=True,
            text=True,
            check=False,
        )
        return len(done.stdout.splitlines()) - 1 >= count  # a header line, then one per route
