"""Test networks in network namespaces that each test creates and deletes itself.

A `Lan` is a switch (a Linux bridge in its own namespace) with hosts attached by veth pairs.
Every host lives in its own namespace with one interface, ``eth0``, and an address in
``fd51::/64`` added with ``nodad`` (usable at once).  Nothing is ever created in, or sent from,
the host's own namespace: veth pairs are created directly inside the namespaces.

A `Lan` is a context manager (``with Lan.create(3) as lan:``) that deletes its namespaces on
exit; tests take one from the ``lan`` fixture factory in ``conftest.py`` (``lan(3)``), scripts
with ``with``.

UDP GRO.  A physical NIC coalesces a flow's datagrams in the kernel (GRO) by default, and a
socket that asked for UDP_GRO then reads up to 64 of them per call (``plugin/transport.py``).
A veth does not, unless told: ``Lan.create(n, gro=True)`` (the benchmarks' default) turns on
``gro`` and ``rx-udp-gro-forwarding`` on every host's ``eth0`` (ethtool), sets its
``gro_flush_timeout`` (200 us) and ``napi_defer_hard_irqs`` (100) so a burst is held together
rather than flushed one datagram at a time, and turns TCP segmentation offload off on the
switch's ports: a veth hands a forwarded packet to its peer's GRO only when the sending end
has no TSO (``veth_skb_is_eligible_for_gro`` in the kernel); without that, datagrams crossing
the bridge were never coalesced here.  Tests get the plain veths unless they ask.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import pytest

PREFIX = "fd51::"
_serial = itertools.count()
BIN = Path(sys.executable).parent


def require_root_and_ip() -> None:
    """Skip (and so, under CI=true, fail) where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")


def require_ethtool() -> None:
    """Skip (and so, under CI=true, fail) where GRO cannot be turned on for a veth."""
    if shutil.which("ethtool") is None:
        pytest.skip("ethtool is not installed (Debian package ethtool)")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


# Held back before GRO flushes a partial batch (ns), and the polls that may go without an
# interrupt meanwhile: the values measured to coalesce 40-53 datagrams per read on veth.
GRO_FLUSH_TIMEOUT_NS = 200_000
NAPI_DEFER_HARD_IRQS = 100


def enable_gro(netns: str, interface: str, port_netns: str, port: str) -> None:
    """Turn on UDP GRO for what `interface` in `netns` receives from its veth peer `port`
    (in `port_netns`), as a physical NIC has it (module doc)."""
    run = ("ip", "netns", "exec")
    ethtool = ("ethtool", "-K", interface, "gro", "on", "rx-udp-gro-forwarding", "on")
    subprocess.run([*run, netns, *ethtool], check=True, capture_output=True, text=True)
    settings = (
        f"echo {GRO_FLUSH_TIMEOUT_NS} > /sys/class/net/{interface}/gro_flush_timeout && "
        f"echo {NAPI_DEFER_HARD_IRQS} > /sys/class/net/{interface}/napi_defer_hard_irqs"
    )
    subprocess.run([*run, netns, "sh", "-c", settings], check=True, capture_output=True)
    tso_off = ("ethtool", "-K", port, "tso", "off")
    subprocess.run([*run, port_netns, *tso_off], check=True, capture_output=True, text=True)


def segment_in_software(host: Host) -> None:
    """Have the kernel cut `host`'s UDP GSO sends into datagrams as it hands them to its veth
    (``tx-udp-segmentation off``), as for a NIC without UDP segmentation offload: a sender
    keeps its GSO batches (one system call per ~50 datagrams) while every datagram crosses the
    switch on its own, so a loss rule there drops single datagrams, not whole batches."""
    ethtool = ("ethtool", "-K", host.interface, "tx-udp-segmentation", "off")
    done = subprocess.run(
        ["ip", "netns", "exec", host.netns, *ethtool],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ethtool tx-udp-segmentation off: {done.stderr.strip()}")


@dataclass
class Host:
    netns: str
    address: str
    interface: str = "eth0"
    # With GRO on its link (`Lan.create`), the switch's namespace and the port facing this host:
    # what arrives here is coalesced, so per-datagram loss is applied there (release.py).
    gro_port: tuple[str, str] | None = None

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            self.command(*args), text=True, **kwargs
        )


@dataclass
class Network:
    """The namespaces of one test network, deleted together (last made, first deleted) by
    `delete` or on leaving a ``with`` block.  `Lan` and ``routed.Routed`` are networks."""

    tag: str
    namespaces: list[str] = field(default_factory=list)

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _add_host(
        self, netns: str, address: str, peer: str, port: str, mtu: int | None = None
    ) -> Host:
        """A new namespace `netns` whose ``eth0`` holds `address`/64 (``nodad``: usable at
        once), wired by a veth pair to `port` in namespace `peer`; `port` is left to the
        caller to attach and bring up."""
        self._add_namespace(netns)
        mtus = ("mtu", str(mtu)) if mtu else ()
        pair = ("type", "veth", "peer", "name", port, *mtus, "netns", peer)
        ip("-n", netns, "link", "add", "eth0", *mtus, *pair)
        ip("-n", netns, "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        ip("-n", netns, "link", "set", "eth0", "up")
        return Host(netns, address)

    def delete(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.namespaces.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.delete()


@dataclass
class Lan(Network):
    switch: str = ""
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def create(cls, count: int, mtu: int = 1500, gro: bool = False) -> Lan:
        """`count` hosts on one switch; `gro` turns on UDP GRO on their links (module doc)."""
        require_root_and_ip()
        if gro:
            require_ethtool()
        tag = f"oc{os.getpid() % 100000}x{next(_serial)}"
        lan = cls(tag=tag, switch=f"{tag}-sw")
        try:
            lan._add_namespace(lan.switch)
            ip("-n", lan.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            ip("-n", lan.switch, "link", "set", "br0", "up")
            for index in range(count):
                port = f"p{index}"
                host = lan._add_host(
                    f"{tag}-h{index}", f"{PREFIX}{index + 1:x}", lan.switch, port, mtu
                )
                ip("-n", lan.switch, "link", "set", port, "master", "br0", "up")
                if gro:
                    enable_gro(host.netns, host.interface, lan.switch, port)
                    host.gro_port = (lan.switch, port)
                lan.hosts.append(host)
            if mtu > 1500:
                ip("-n", lan.switch, "link", "set", "br0", "mtu", str(mtu))
        except BaseException:
            lan.delete()
            raise
        return lan


class LanFactory(Protocol):
    """What the ``lan`` fixture is: ``lan(3)`` makes a LAN of three hosts for one test."""

    def __call__(self, count: int, mtu: int = 1500, gro: bool = False) -> Lan: ...


def stop(processes: Sequence[subprocess.Popen[str]], timeout: float = 10) -> None:
    """Terminate and reap (PID 1 here does not reap promptly)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
