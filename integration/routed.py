"""A routed test network: a sender's link, a router namespace running smcroute, and two receiver
links, all in namespaces the test creates and deletes.

    tx (fd52::2) --- [rt_tx  router  rt_rx] --- rx (fd53::2)
                            [rt_idle] --- idle (fd54::2)

The router forwards unicast between the three /64s and multicast only along the static (S,G)
routes smcroute installs: smcroute does not speak MLD, so a route is what decides where a
stream goes, and a link without one must see none of it.

A kernel built without IPv6 multicast routing (``CONFIG_IPV6_MROUTE``; some VM kernels) cannot
run smcroute.  There the routes become nftables netdev rules that duplicate each matching
datagram from the inbound port onto the outbound one: the device's side (discovery, the SSM
join of a source on another subnet, the stream crossing to its link and no other) is tested the
same way, the router's own part is not, and the test says which one ran.
"""

from __future__ import annotations

import ipaddress
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

    def kernel_routes_multicast(self) -> bool:
        """Whether this kernel has IPv6 multicast routing (``CONFIG_IPV6_MROUTE``)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.router, "test", "-e", "/proc/net/ip6_mr_vif"],
            check=False,
        )
        return done.returncode == 0

    @contextmanager
    def multicast_routes(self, routes: Sequence[MRoute], workdir: Path) -> Iterator[Forwarding]:
        """Forward `routes` in the router while the block runs: by smcrouted, or, on a kernel
        without IPv6 multicast routing, by nftables (see `Forwarding`)."""
        if self.kernel_routes_multicast():
            with self._smcroute(routes, workdir):
                yield Forwarding(self.router, "smcroute", routes)
        else:
            with self._nft_dup(routes):
                yield Forwarding(self.router, "nftables", routes)

    @contextmanager
    def _smcroute(self, routes: Sequence[MRoute], workdir: Path) -> Iterator[None]:
        program = shutil.which("smcrouted", path=_PATH)
        if program is None:
            raise SmcrouteMissing("smcroute is not installed (Debian package smcroute)")
        config = workdir / "smcroute.conf"
        config.write_text(
            "".join(f"phyint rt_{name} enable\n" for name in LINKS)
            + "".join(f"{route.smcroute_line()}\n" for route in routes)
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
            while len(_mr_cache(self.router)) < len(routes):
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

    @contextmanager
    def _nft_dup(self, routes: Sequence[MRoute]) -> Iterator[None]:
        chains = "".join(
            f"  chain in_{n} {{\n"
            f'    type filter hook ingress device "{route.inbound}" priority 0;\n'
            f"    ip6 saddr {route.source} ip6 daddr {route.group} counter "
            f'dup to "{route.outbound}"\n'
            "  }\n"
            for n, route in enumerate(routes)
        )
        rules = [f"table netdev {NFT_TABLE} {{\n{chains}}}\n"]
        subprocess.run(
            ["ip", "netns", "exec", self.router, "nft", "-f", "-"],
            input="".join(rules),
            text=True,
            check=True,
        )
        try:
            yield
        finally:
            subprocess.run(
                ["ip", "netns", "exec", self.router, "nft", "delete", "table", "netdev", NFT_TABLE],
                check=False,
            )


NFT_TABLE = "otacast_mroute"


@dataclass(frozen=True)
class MRoute:
    """A static (S,G) multicast route: from the router port `inbound` to `outbound`."""

    inbound: str
    source: str
    group: str
    outbound: str

    def smcroute_line(self) -> str:
        return (
            f"mroute from {self.inbound} source {self.source} group {self.group} to {self.outbound}"
        )


@dataclass(frozen=True)
class Forwarding:
    """How the router forwards the routes: ``smcroute`` (the kernel's multicast routing, as a
    real router does) or ``nftables`` (a netdev ingress rule per route that duplicates the
    matching datagrams onto the outbound port: what a kernel without ``CONFIG_IPV6_MROUTE``
    allows; no hop is counted and smcroute itself is not exercised)."""

    router: str
    kind: str
    routes: Sequence[MRoute]

    def forwarded_bytes(self, route: MRoute) -> int:
        """Bytes the router forwarded along `route` so far."""
        if self.kind == "smcroute":
            group = ipaddress.IPv6Address(route.group).exploded
            entry = next(line for line in _mr_cache(self.router) if line.startswith(group))
            return int(entry.split()[4])  # Group Origin Iif Pkts Bytes ...
        listed = subprocess.run(
            ["ip", "netns", "exec", self.router, "nft", "list", "table", "netdev", NFT_TABLE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in listed.splitlines():
            if f"ip6 daddr {route.group}" in line and "counter" in line:
                return int(line.split("bytes")[1].split()[0])
        raise AssertionError(f"no counter for {route} in {listed}")


def _mr_cache(router: str) -> list[str]:
    """The router's (S,G) entries (/proc/net/ip6_mr_cache, its header line dropped)."""
    done = subprocess.run(
        ["ip", "netns", "exec", router, "cat", "/proc/net/ip6_mr_cache"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.splitlines()[1:]
