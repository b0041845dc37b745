"""The device's receive socket and DNS discovery against real kernels and a real dnsmasq.

Receivers, senders and the DNS server run in namespaces of a `Lan` (a bridge without MLD
snooping, so every datagram is flooded to every host): whatever a receiver does not get was
filtered by its own kernel, which is what these tests are about.  Each host-side program is a
short script passed to the namespace's Python, printing JSON.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otacast.plugin import transport
from otacast.plugin.errors import DiscoveryError, NetworkError
from otacast.plugin.transport import DEFAULT_RECEIVE_BUFFER
from otacast.schemas.addressing import asm_group, ssm_group

from .netns import BIN, Host, LanFactory, stop
from .services import dnsmasq

PYTHON = str(BIN / "python")
CHANNEL = "updates.example.test"
PORT = 4242
MIB = 1024 * 1024

# Joins, prints {"ready": ...} once the joins are made, then records every datagram until a
# datagram "stop" arrives (or LIMIT seconds pass) and GRACE seconds more, so anything sent
# before the "stop" has had its chance to arrive.
RECEIVER = """
import json, select, sys, time
from otacast.plugin.transport import Join, MulticastReceiver
LIMIT, GRACE = 20.0, 0.3
interface, port, joins = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
size = int(sys.argv[4])
with MulticastReceiver(interface, port, [Join(g, s) for g, s in joins]) as rx:
    buffer = bytearray(size)
    print(json.dumps({
        "ready": True,
        "buffer": rx.receive_buffer,
        "joins": [[j.group, j.source] for j in rx.joins],
        "empty_at_start": rx.recv_batch(buffer) is None,
    }), flush=True)
    got = []
    end = time.monotonic() + LIMIT
    while (left := end - time.monotonic()) > 0:
        select.select([rx], [], [], left)
        while (item := rx.recv_batch(buffer)) is not None:
            for datagram in item[0]:
                payload, source = bytes(datagram).decode(), item[1]
                if payload == "stop":
                    end = min(end, time.monotonic() + GRACE)
                else:
                    got.append([payload, source])
    print(json.dumps({"got": got, "truncated": rx.truncated}), flush=True)
"""

# Sends each payload argument once, in order, to [GROUP]:PORT out of eth0.
SENDER = """
import socket, sys, time
group, port = sys.argv[1], int(sys.argv[2])
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
for payload in sys.argv[3:]:
    s.sendto(payload.encode(), (group, port, 0, ifindex))
    time.sleep(0.005)
"""

# Three sockets in one namespace: ours on PORT joined to G1; a bare one joined to G2 (bound to
# nothing); a control bound to PORT2, joined to G1, IPV6_MULTICAST_ALL left at its default.
# Records until ours gets "stop" (as RECEIVER does).
MULTICAST_ALL = """
import json, select, socket, struct, sys, time
from otacast.plugin.transport import Join, MulticastReceiver
LIMIT, GRACE = 20.0, 0.3
port, port2, g1, g2 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ifindex = socket.if_nametoindex("eth0")
def member(group):
    return socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
other = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, member(g2))
control = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
control.bind(("::", port2))
control.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, member(g1))
control.setblocking(False)
got = {"ours": [], "control": []}
with MulticastReceiver("eth0", port, [Join(g1)]) as rx:
    print(json.dumps({"ready": True}), flush=True)
    buffer = bytearray(2048)
    end = time.monotonic() + LIMIT
    while (left := end - time.monotonic()) > 0:
        select.select([rx, control], [], [], left)
        while (item := rx.recv_batch(buffer)) is not None:
            for datagram in item[0]:
                payload = bytes(datagram).decode()
                if payload == "stop":
                    end = min(end, time.monotonic() + GRACE)
                else:
                    got["ours"].append(payload)
        while True:
            try:
                got["control"].append(control.recv(2048).decode())
            except BlockingIOError:
                break
print(json.dumps(got), flush=True)
"""

# One discovery: prints {"hosts": [...]} or {"error": ..., "code": ...}, and the time it took.
DISCOVER = """
import json, sys, time
from otacast.plugin.srv import discover
from otacast.plugin.errors import DeviceError
channel, resolver, lifetime = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
start = time.monotonic()
try:
    found = {"hosts": [[h.target, h.port, list(h.addresses)] for h in
             discover(channel, resolver=resolver, lifetime=lifetime)]}
except DeviceError as exc:
    found = {"error": str(exc), "code": exc.exit_code}
found["elapsed"] = time.monotonic() - start
print(json.dumps(found))
"""


class Listening:
    """A RECEIVER script on a host, started and past its joins."""

    def __init__(
        self,
        host: Host,
        joins: list[tuple[str, str | None]],
        *,
        port: int = PORT,
        size: int = 65535,
    ) -> None:
        self.host = host
        self.process = host.popen(
            PYTHON,
            "-c",
            RECEIVER,
            "eth0",
            str(port),
            json.dumps(joins),
            str(size),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            _, err = self.process.communicate(timeout=30)
            pytest.fail(f"receiver did not start: {err}")
        self.ready: dict[str, Any] = json.loads(line)

    def result(self) -> tuple[list[tuple[str, str]], int]:
        """(payload, source) of every datagram received before "stop", and the truncated count.
        The caller has sent "stop" on a group and from a source this receiver accepts."""
        out, err = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, err
        done = json.loads(out)
        return [(payload, source) for payload, source in done["got"]], done["truncated"]


def send(host: Host, group: str, *payloads: str, port: int = PORT) -> None:
    done = host.run(PYTHON, "-c", SENDER, group, str(port), *payloads)
    assert done.returncode == 0, done.stderr


def test_an_asm_join_receives_datagrams_sent_to_the_group_from_another_host(
    lan: LanFactory,
) -> None:
    net = lan(4)
    group = asm_group(CHANNEL)
    sender, device = net.hosts[0], net.hosts[1]
    rx = Listening(device, [(group, None)])
    try:
        send(sender, group, "a0", "a1", "a2", "stop")
        got, truncated = rx.result()
    finally:
        stop([rx.process])
    assert got == [("a0", sender.address), ("a1", sender.address), ("a2", sender.address)]
    assert truncated == 0
    assert rx.ready["empty_at_start"] is True
    assert rx.ready["joins"] == [[group, None]]
    # As root SO_RCVBUFFORCE passes net.core.rmem_max; the kernel reports twice the request.
    assert rx.ready["buffer"] == 2 * DEFAULT_RECEIVE_BUFFER  # the kernel doubles what is asked


def test_an_ssm_join_receives_its_source_and_not_a_second_source_on_the_same_group_and_port(
    lan: LanFactory,
) -> None:
    net = lan(4)
    group = ssm_group(CHANNEL)
    s1, s2, device, witness = net.hosts
    rx = Listening(device, [(group, s1.address)])
    # A host joined for any source proves S2's datagrams were on the LAN.
    any_source = Listening(witness, [(group, None)])
    try:
        filters = device.run("cat", "/proc/net/mcfilter6").stdout
        send(s2, group, "s2-0", "s2-1", "s2-2")
        send(s1, group, "s1-0", "s1-1", "s1-2", "stop")
        got, _ = rx.result()
        seen, _ = any_source.result()
    finally:
        stop([rx.process, any_source.process])
    assert got == [("s1-0", s1.address), ("s1-1", s1.address), ("s1-2", s1.address)]
    assert {source for _, source in seen} == {s1.address, s2.address}
    # The kernel holds an INCLUDE filter for exactly (S1, G) on eth0.
    packed = {line.split()[2]: line.split()[3] for line in filters.splitlines()[1:]}
    assert packed == {_hex(group): _hex(s1.address)}


def test_a_socket_joined_to_g1_does_not_receive_g2_joined_by_another_socket_of_the_host(
    lan: LanFactory,
) -> None:
    net = lan(4)
    sender, device = net.hosts[0], net.hosts[1]
    g1, g2 = asm_group(CHANNEL), asm_group(CHANNEL, rate_index=1)
    process = device.popen(
        PYTHON,
        "-c",
        MULTICAST_ALL,
        str(PORT),
        str(PORT + 1),
        g1,
        g2,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline(), process.communicate()[1]
        for port in (PORT, PORT + 1):
            send(sender, g1, "g1", port=port)
            send(sender, g2, "g2", port=port)
        send(sender, g1, "stop")
        out, err = process.communicate(timeout=30)
    finally:
        stop([process])
    assert process.returncode == 0, err
    got = json.loads(out)
    assert got["ours"] == ["g1"]
    # The kernel's default, which the receiver turns off: G2 arrives because someone joined it.
    assert sorted(got["control"]) == ["g1", "g2"]


def test_a_datagram_longer_than_the_buffer_is_counted_and_never_handed_on_cut_short(
    lan: LanFactory,
) -> None:
    net = lan(4)
    group = asm_group(CHANNEL)
    sender, device = net.hosts[0], net.hosts[1]
    rx = Listening(device, [(group, None)], size=100)
    try:
        send(sender, group, "x" * 101, "short", "y" * 500, "stop")
        got, truncated = rx.result()
    finally:
        stop([rx.process])
    assert got == [("short", sender.address)]
    assert truncated == 2


SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, standard library only


def test_without_root_the_receive_buffer_falls_back_to_the_rmem_max_cap(lan: LanFactory) -> None:
    net = lan(4)
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip("the system python3 is not installed")
    device = net.hosts[0]
    script = (
        "from otacast.plugin.transport import Join, MulticastReceiver\n"
        "with MulticastReceiver('eth0', 4242, [Join('ff1e::1')]) as rx:\n"
        "    print(rx.receive_buffer)\n"
    )
    # The unprivileged user may not be able to read this checkout or its virtual environment
    # (a fresh clone in a 0700 temporary directory): give it a world-readable copy of the
    # package tree, which needs nothing beyond the standard library for this.
    readable = Path(tempfile.mkdtemp(prefix="otacast-nobody-", dir="/tmp"))
    try:
        readable.chmod(0o755)
        # The installed `otacast` directory (files or, in an editable install, symlinks).
        installed = Path(transport.__file__).parents[1]
        shutil.copytree(
            installed, readable / "otacast", ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in readable.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        unprivileged = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        # The system interpreter: a per-user one (pyenv under /root) is out of its reach too.
        done = device.run(
            *unprivileged, "env", f"PYTHONPATH={readable}", SYSTEM_PYTHON, "-S", "-c", script
        )
    finally:
        shutil.rmtree(readable, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    rmem_max = int(device.run("cat", "/proc/sys/net/core/rmem_max").stdout)
    assert rmem_max < DEFAULT_RECEIVE_BUFFER  # otherwise this proves nothing
    assert int(done.stdout) == 2 * rmem_max


# Sends each payload argument once, in order, to [ADDRESS]:PORT (unicast) from this host.
UNICAST = """
import socket, sys, time
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for payload in sys.argv[3:]:
    s.sendto(payload.encode(), (address, port))
    time.sleep(0.005)
"""


def test_datagrams_sent_to_the_devices_own_address_never_reach_the_receiver(
    lan: LanFactory,
) -> None:
    # Issue 13: bound to [::], the socket took unicast from any host that routes to the device,
    # past the SSM source filter.  Bound to the joined group, only the group's datagrams come.
    net = lan(4)
    group = asm_group(CHANNEL)
    sender, device, attacker = net.hosts[0], net.hosts[1], net.hosts[2]
    rx = Listening(device, [(group, None)])
    try:
        done = attacker.run(PYTHON, "-c", UNICAST, device.address, str(PORT), "u0", "u1", "u2")
        assert done.returncode == 0, done.stderr
        send(sender, group, "g0", "stop")
        got, _ = rx.result()
    finally:
        stop([rx.process])
    assert got == [("g0", sender.address)]


def test_a_port_already_bound_is_a_one_line_network_error(lan: LanFactory) -> None:
    net = lan(4)
    script = (
        "from otacast.plugin.transport import Join, MulticastReceiver\n"
        "from otacast.plugin.errors import NetworkError\n"
        "with MulticastReceiver('eth0', 4242, [Join('ff1e::1')]):\n"
        "    try:\n"
        "        MulticastReceiver('eth0', 4242, [Join('ff1e::1')])\n"
        "    except NetworkError as exc:\n"
        "        print(exc.exit_code, exc)\n"
    )
    done = net.hosts[0].run(PYTHON, "-c", script)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == f"{NetworkError.exit_code} binding port 4242 failed: Address already in use\n"
    )


def _hex(address: str) -> str:
    return ipaddress.IPv6Address(address).packed.hex()


# --- discovery against dnsmasq -------------------------------------------------------------

DNS_ADDRESS = "fd66::53"
DNS_PORT = 5353
RESOLVER = f"[{DNS_ADDRESS}]:{DNS_PORT}"
RECORDS = (
    f"--srv-host=_otacast._udp.{CHANNEL},tx1.example.test,4242,10,5",
    f"--srv-host=_otacast._udp.{CHANNEL},tx2.example.test,4242,10,5",
    f"--srv-host=_otacast._udp.{CHANNEL},tx3.example.test,4242,20,5",
    "--host-record=tx1.example.test,fd77::1",
    "--host-record=tx2.example.test,fd77::3",
    "--host-record=tx2.example.test,fd77::4",
    "--host-record=tx3.example.test,fd77::5",
    # A target of "." (no service), and a target that has no address.
    "--srv-host=_otacast._udp.withdrawn.example.test",
    "--srv-host=_otacast._udp.unaddressed.example.test,nowhere.example.test,4242,10,5",
    # The SRV name exists (it has a TXT record) but holds no SRV: NODATA, not NXDOMAIN.
    "--txt-record=_otacast._udp.nodata.example.test,hello",
    # Names under example.test that are not listed get NXDOMAIN; all others REFUSED.
    "--local=/example.test/",
)


@pytest.fixture
def dns_host(lan: LanFactory, tmp_path: Path) -> Iterator[Host]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed")
    host = lan(1).hosts[0]
    with dnsmasq(host, RECORDS, tmp_path / "dnsmasq.log", DNS_ADDRESS, DNS_PORT):
        yield host


def discover_in(
    host: Host, channel: str, resolver: str | None = RESOLVER, lifetime: float = 2.0
) -> dict[str, Any]:
    done = host.run(PYTHON, "-c", DISCOVER, channel, resolver or "", str(lifetime))
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_discovery_returns_every_source_of_the_best_priority_and_no_standby(
    dns_host: Host,
) -> None:
    for _ in range(5):  # processing order is random within a priority; the set is not
        found = discover_in(dns_host, CHANNEL)
        hosts = sorted(found["hosts"])
        assert hosts == [
            ["tx1.example.test", 4242, ["fd77::1"]],
            ["tx2.example.test", 4242, ["fd77::3", "fd77::4"]],
        ]


def test_discovery_of_a_channel_without_srv_records_is_empty(dns_host: Host) -> None:
    assert discover_in(dns_host, "absent.example.test")["hosts"] == []  # NXDOMAIN
    assert discover_in(dns_host, "nodata.example.test")["hosts"] == []  # NODATA


def test_discovery_skips_a_withdrawn_target_and_a_target_without_addresses(
    dns_host: Host,
) -> None:
    assert discover_in(dns_host, "withdrawn.example.test")["hosts"] == []
    assert discover_in(dns_host, "unaddressed.example.test")["hosts"] == []


def test_discovery_with_no_server_listening_fails_within_its_lifetime(dns_host: Host) -> None:
    # Nothing listens on this port.  dnspython's socket is not connected, so the ICMP "port
    # unreachable" is never reported to it: this is a timeout, not a refusal.
    found = discover_in(dns_host, CHANNEL, resolver=f"[{DNS_ADDRESS}]:5354", lifetime=1.0)
    assert found["code"] == DiscoveryError.exit_code
    assert found["error"] == (
        f"DNS lookup of SRV _otacast._udp.{CHANNEL} via [{DNS_ADDRESS}]:5354 timed out "
        "(discovery lifetime 1 s)"
    )
    assert 1.0 <= found["elapsed"] < 1.5  # dnspython overshoots by scheduling only


def test_discovery_refused_by_the_server_is_an_error_not_an_empty_answer(
    dns_host: Host,
) -> None:
    found = discover_in(dns_host, "updates.elsewhere.test")
    assert found["code"] == DiscoveryError.exit_code
    assert found["error"] == (
        f"DNS lookup of SRV _otacast._udp.updates.elsewhere.test via {RESOLVER} failed: REFUSED"
    )


def test_discovery_without_a_resolver_uses_the_system_configuration(
    dns_host: Host, tmp_path: Path
) -> None:
    # `ip netns exec` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf, and
    # resolv.conf cannot name a port: a second dnsmasq serves port 53.
    etc = Path("/etc/netns") / dns_host.netns
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text("nameserver fd66::54\n")
        with dnsmasq(dns_host, RECORDS, tmp_path / "dnsmasq53.log", "fd66::54", 53):
            found = discover_in(dns_host, CHANNEL, resolver=None)
    finally:
        shutil.rmtree(etc)
    assert sorted(h[0] for h in found["hosts"]) == ["tx1.example.test", "tx2.example.test"]


# Joins, then on each line of stdin: "leave" or "rejoin" (answered with the socket's state),
# recording every datagram as RECEIVER does until "stop".
LEAVER = """
import json, select, sys, time
from otacast.plugin.transport import Join, MulticastReceiver
LIMIT, GRACE = 20.0, 0.3
interface, port, joins = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
with MulticastReceiver(interface, port, [Join(g, s) for g, s in joins]) as rx:
    print(json.dumps({"left": rx.left}), flush=True)
    for _ in range(2):
        getattr(rx, sys.stdin.readline().strip())()
        print(json.dumps({"left": rx.left}), flush=True)
    got = []
    end = time.monotonic() + LIMIT
    while (left := end - time.monotonic()) > 0:
        select.select([rx], [], [], left)
        while (item := rx.recv_batch()) is not None:
            for datagram in item[0]:
                payload = bytes(datagram).decode()
                if payload == "stop":
                    end = min(end, time.monotonic() + GRACE)
                else:
                    got.append(payload)
    print(json.dumps({"got": got}), flush=True)
"""


@pytest.mark.parametrize("ssm", [True, False], ids=["ssm", "asm"])
def test_a_left_socket_receives_nothing_until_it_rejoins_and_keeps_what_was_queued(
    lan: LanFactory, ssm: bool
) -> None:
    net = lan(3)
    sender, device = net.hosts[0], net.hosts[1]
    group = ssm_group(CHANNEL) if ssm else asm_group(CHANNEL)
    joins = [(group, sender.address if ssm else None)]
    process = device.popen(
        PYTHON,
        "-c",
        LEAVER,
        "eth0",
        str(PORT),
        json.dumps(joins),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None

    def command(word: str) -> bool:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(word + "\n")
        process.stdin.flush()
        return bool(json.loads(process.stdout.readline())["left"])

    def memberships() -> str:
        table = "/proc/net/mcfilter6" if ssm else "/proc/net/igmp6"
        return str(device.run("cat", table).stdout)

    try:
        assert json.loads(process.stdout.readline()) == {"left": False}
        joined = memberships()
        send(sender, group, "queued")
        assert command("leave") is True
        gone = memberships()
        send(sender, group, "while-left-0", "while-left-1")
        assert command("rejoin") is False
        back = memberships()
        send(sender, group, "after", "stop")
        out, err = process.communicate(timeout=30)
    finally:
        stop([process])
    assert process.returncode == 0, err
    assert json.loads(out)["got"] == ["queued", "after"]
    wanted = _hex(sender.address) if ssm else _hex(group)
    assert wanted in joined and wanted not in gone and wanted in back
