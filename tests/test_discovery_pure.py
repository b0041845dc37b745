"""The pure parts of discovery and of the receive socket: resolver addresses, the
MCAST_JOIN_SOURCE_GROUP layout, SRV selection over canned answers, and every argument check
that fails before a socket or a query is made."""

from __future__ import annotations

import ctypes
import socket
import struct
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.name
import dns.rdata
import dns.rdataset
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from otacast.plugin import transport
from otacast.plugin.discovery import JoinPlan, plan_joins
from otacast.plugin.errors import DiscoveryError, NetworkError, UsageError
from otacast.plugin.srv import SourceHost, discover, parse_resolver
from otacast.plugin.transport import Join, MulticastReceiver, group_source_req
from otacast.schemas import addressing
from otacast.schemas.manifest import Transport

LP64 = ctypes.sizeof(ctypes.c_ulong) == 8

# --- resolver addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fd66::53", ("fd66::53", 53)),
        ("[fd66::53]:5353", ("fd66::53", 5353)),
        ("[fd66:0::53]", ("fd66::53", 53)),
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        (" ::1 ", ("::1", 53)),
    ],
)
def test_resolver_address_forms_parse_to_address_and_port(
    text: str, expected: tuple[str, int]
) -> None:
    assert parse_resolver(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dns.example.com",
        "fd66::53:5353x",
        "[fd66::53",
        "[fd66::53]5353",
        "[192.0.2.1]:53",
        "fd66::53]:53",
        "192.0.2.1:",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "[fd66::53]:-1",
        "[fe80::1%eth0]:53",
        "example:53",
    ],
)
def test_unparseable_resolver_addresses_are_one_line_discovery_errors(text: str) -> None:
    with pytest.raises(DiscoveryError) as caught:
        parse_resolver(text)
    message = str(caught.value)
    assert "\n" not in message and repr(text) in message


def test_discover_refuses_a_bad_resolver_before_any_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", _no_query)
    with pytest.raises(DiscoveryError, match="resolver address 'nowhere' is not"):
        discover("updates.example.test", resolver="nowhere")


def test_discover_refuses_a_bad_channel_and_an_unbounded_lifetime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", _no_query)
    with pytest.raises(DiscoveryError, match="cannot look up channel 'bad_name'"):
        discover("bad_name", resolver="::1")
    for lifetime in (0.0, -1.0, float("inf"), float("nan"), 61.0):
        with pytest.raises(DiscoveryError, match="lifetime"):
            discover("updates.example.test", resolver="::1", lifetime=lifetime)


def _no_query(*args: object, **kwargs: object) -> None:
    raise AssertionError("no query may be made")


# --- SRV selection over canned answers -------------------------------------------------------

SRV = "_otacast._udp.updates.example.test."


class CannedDns:
    """Stands in for `Resolver.resolve`: answers from a table, records each lifetime asked."""

    def __init__(self, answers: dict[tuple[str, str], list[str] | Exception]) -> None:
        self.answers = answers
        self.lifetimes: list[float] = []
        self.nameservers: list[tuple[list[str], int]] = []

    def __call__(
        self, resolver: dns.resolver.Resolver, name: dns.name.Name, rdtype: Any, **kw: Any
    ) -> SimpleNamespace:
        assert kw["search"] is False and name.is_absolute()
        self.lifetimes.append(kw["lifetime"])
        self.nameservers.append(([str(n) for n in resolver.nameservers], resolver.port))
        key = (name.to_text(), dns.rdatatype.to_text(rdtype))
        answer = self.answers.get(key, dns.resolver.NXDOMAIN())
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(rrset=dns.rrset.from_text_list(name, 60, "IN", key[1], answer))


def canned(
    monkeypatch: pytest.MonkeyPatch, answers: dict[tuple[str, str], list[str] | Exception]
) -> CannedDns:
    fake = CannedDns(answers)

    # A plain function, so that it binds to the resolver like the method it replaces.
    def resolve(
        resolver: dns.resolver.Resolver, name: dns.name.Name, rdtype: Any, **kw: Any
    ) -> SimpleNamespace:
        return fake(resolver, name, rdtype, **kw)

    monkeypatch.setattr(dns.resolver.Resolver, "resolve", resolve)
    return fake


def test_only_the_best_priority_is_kept_and_withdrawn_or_unaddressed_targets_are_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = canned(
        monkeypatch,
        {
            (SRV, "SRV"): [
                "20 5 4242 standby.example.test.",
                "10 5 4242 tx1.example.test.",
                "10 0 4242 .",
                "10 5 4343 tx2.example.test.",
                "10 5 4242 nowhere.example.test.",
            ],
            ("tx1.example.test.", "AAAA"): ["fd77::1", "fd77:0::1", "fd77::2"],
            ("tx2.example.test.", "AAAA"): ["fd77::3"],
            ("standby.example.test.", "AAAA"): ["fd77::5"],
            ("nowhere.example.test.", "AAAA"): dns.resolver.NoAnswer(),
        },
    )
    hosts = discover("Updates.Example.Test.", resolver="[fd66::53]:5353")
    assert sorted(hosts, key=lambda h: h.target) == [
        SourceHost("tx1.example.test", 4242, ("fd77::1", "fd77::2")),
        SourceHost("tx2.example.test", 4343, ("fd77::3",)),
    ]
    assert all(used == (["fd66::53"], 5353) for used in fake.nameservers)


def test_hosts_come_in_the_order_processing_order_gives_not_sorted_or_as_received(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # processing_order() is random within a priority; here it is made to reverse the answer.
    def reversed_order(rdataset: dns.rdataset.Rdataset) -> list[dns.rdata.Rdata]:
        return list(rdataset)[::-1]

    targets = ["b.test.", "c.test.", "a.test."]
    canned(
        monkeypatch,
        {
            (SRV, "SRV"): [f"10 5 4242 {target}" for target in targets],
            **{(target, "AAAA"): [f"fd77::{n + 1}"] for n, target in enumerate(targets)},
        },
    )
    monkeypatch.setattr(dns.rdataset.Rdataset, "processing_order", reversed_order)
    hosts = discover("updates.example.test", resolver="::1")
    assert [host.target for host in hosts] == ["a.test", "c.test", "b.test"]


@pytest.mark.parametrize(
    "srv",
    [dns.resolver.NXDOMAIN(), dns.resolver.NoAnswer(), ["0 0 0 ."], ["10 5 4242 gone.test."]],
    ids=["nxdomain", "nodata", "dot-target", "no-aaaa"],
)
def test_no_usable_srv_record_is_an_empty_list_for_the_asm_fallback(
    monkeypatch: pytest.MonkeyPatch, srv: list[str] | Exception
) -> None:
    canned(monkeypatch, {(SRV, "SRV"): srv})
    assert discover("updates.example.test", resolver="::1") == []


def test_one_lifetime_bounds_the_srv_and_all_aaaa_queries_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = canned(
        monkeypatch,
        {
            (SRV, "SRV"): ["10 5 4242 a.test.", "10 5 4242 b.test."],
            ("a.test.", "AAAA"): ["fd77::1"],
            ("b.test.", "AAAA"): ["fd77::2"],
        },
    )
    discover("updates.example.test", resolver="::1", lifetime=2.5)
    assert len(fake.lifetimes) == 3
    assert all(0 < lifetime <= 2.5 for lifetime in fake.lifetimes)
    assert fake.lifetimes == sorted(fake.lifetimes, reverse=True)


def test_a_timeout_names_the_query_and_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    canned(monkeypatch, {(SRV, "SRV"): dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])})
    with pytest.raises(DiscoveryError) as caught:
        discover("updates.example.test", resolver="192.0.2.1:5353", lifetime=1.0)
    assert str(caught.value) == (
        "DNS lookup of SRV _otacast._udp.updates.example.test via 192.0.2.1:5353 timed out "
        "(discovery lifetime 1 s)"
    )


def test_servfail_and_refused_are_errors_that_say_what_each_server_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = dns.message.make_query(SRV, "SRV")
    errors = [
        ("fd66::53", False, 5353, "SERVFAIL", None),
        ("fd66::53", False, 5353, "SERVFAIL", None),
        ("fd66::54", False, 53, OSError(101, "Network is unreachable"), None),
    ]
    failure = dns.resolver.NoNameservers(request=request, errors=errors)
    canned(monkeypatch, {(SRV, "SRV"): failure})
    with pytest.raises(DiscoveryError) as caught:
        discover("updates.example.test", resolver="[fd66::53]:5353")
    assert str(caught.value) == (
        "DNS lookup of SRV _otacast._udp.updates.example.test via [fd66::53]:5353 failed: "
        "SERVFAIL; Network is unreachable"
    )


def test_an_aaaa_timeout_is_an_error_not_a_skipped_target(monkeypatch: pytest.MonkeyPatch) -> None:
    canned(
        monkeypatch,
        {
            (SRV, "SRV"): ["10 5 4242 a.test."],
            ("a.test.", "AAAA"): dns.resolver.LifetimeTimeout(timeout=1.0, errors=[]),
        },
    )
    timed_out = r"^DNS lookup of AAAA a\.test via \[::1\]:53 timed out"
    with pytest.raises(DiscoveryError, match=timed_out):
        discover("updates.example.test", resolver="::1")


def test_the_system_configuration_is_named_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def configured(self: dns.resolver.Resolver, *args: object, **kwargs: object) -> None:
        self.nameservers = ["192.0.2.53"]

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", configured)
    canned(monkeypatch, {(SRV, "SRV"): dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])})
    with pytest.raises(DiscoveryError, match=r"via the system resolver \(192\.0\.2\.53\)"):
        discover("updates.example.test")


def test_a_missing_system_configuration_is_a_discovery_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(self: dns.resolver.Resolver, *args: object, **kwargs: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", missing)
    with pytest.raises(DiscoveryError, match=r"^no DNS resolver configured: no nameservers$"):
        discover("updates.example.test")


# --- struct group_source_req -----------------------------------------------------------------


def test_sockaddr_storage_is_128_bytes_aligned_like_unsigned_long() -> None:
    assert ctypes.sizeof(transport.sockaddr_storage) == 128
    assert ctypes.alignment(transport.sockaddr_storage) == ctypes.alignment(ctypes.c_ulong)
    assert ctypes.sizeof(transport.sockaddr_in6) == 28


def test_group_source_req_size_follows_the_platform_abi() -> None:
    long_size = ctypes.sizeof(ctypes.c_ulong)
    assert ctypes.sizeof(group_source_req) == 4 + (long_size - 4) + 2 * 128


@pytest.mark.skipif(not LP64, reason="the x86_64/LP64 layout")
def test_group_source_req_on_lp64_is_264_bytes_with_fields_at_0_8_136() -> None:
    assert ctypes.sizeof(group_source_req) == 264
    assert group_source_req.gsr_interface.offset == 0
    assert group_source_req.gsr_group.offset == 8
    assert group_source_req.gsr_source.offset == 136


@pytest.mark.skipif(not LP64, reason="the x86_64/LP64 layout")
def test_group_source_req_bytes_match_a_hand_packed_reference() -> None:
    request = transport.source_group_request(7, "ff3e::8000:1234", "fd51::1")

    def sockaddr_in6(address: str, scope: int) -> bytes:
        packed = struct.pack(
            "=HHI16sI", socket.AF_INET6, 0, 0, socket.inet_pton(socket.AF_INET6, address), scope
        )
        return packed.ljust(128, b"\0")

    expected = (
        struct.pack("=I4x", 7) + sockaddr_in6("ff3e::8000:1234", 0) + sockaddr_in6("fd51::1", 0)
    )
    assert bytes(request) == expected


def test_a_link_local_source_carries_the_interface_as_its_scope_id() -> None:
    request = transport.source_group_request(5, "ff32::8000:1", "fe80::1")
    assert request.gsr_source.in6.sin6_scope_id == 5
    assert request.gsr_group.in6.sin6_scope_id == 0
    assert bytes(request.gsr_source.in6.sin6_addr) == socket.inet_pton(socket.AF_INET6, "fe80::1")


# --- receiver arguments (checked before any socket exists) -----------------------------------


def test_a_missing_interface_is_named() -> None:
    with pytest.raises(NetworkError, match=r"^interface 'eth9x' does not exist$"):
        MulticastReceiver("eth9x", 4242, [Join("ff1e::1")])
    with pytest.raises(NetworkError, match="does not exist"):
        MulticastReceiver("lo\0", 4242, [Join("ff1e::1")])


@pytest.mark.parametrize(
    ("joins", "message"),
    [
        ([], "no multicast group to join"),
        ([Join("fd51::1")], "group fd51::1 is not an IPv6 multicast address"),
        ([Join("224.0.0.1")], "group '224.0.0.1' is not an IPv6 address"),
        ([Join("ff1e::zz")], "group 'ff1e::zz' is not an IPv6 address"),
        ([Join("ff12::1%eth0")], "group 'ff12::1%eth0' carries a zone index"),
        ([Join("ff3e::8000:1", "ff1e::1")], "source ff1e::1 is not a unicast IPv6 address"),
        ([Join("ff3e::8000:1", "::")], "source :: is not a unicast IPv6 address"),
        ([Join("ff3e::8000:1", "fd51::x")], "source 'fd51::x' is not an IPv6 address"),
        (
            [Join("ff3e::8000:1", "fd51::1"), Join("ff3e:0::8000:1", "fd51:0::1")],
            "group ff3e::8000:1 from fd51::1 is listed twice",
        ),
        ([Join("ff1e::1"), Join("ff1e::1")], "group ff1e::1 for any source is listed twice"),
        (
            [Join("ff3e::8000:1", "fd51::1"), Join("ff3e::8000:1")],
            "group ff3e::8000:1 is joined both for any source and per source",
        ),
    ],
)
def test_bad_joins_are_one_line_network_errors(joins: list[Join], message: str) -> None:
    with pytest.raises(NetworkError) as caught:
        MulticastReceiver("lo", 4242, joins)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("port", "rcvbuf", "message"),
    [
        (0, 1024, "port 0 is out of range"),
        (65536, 1024, "port 65536 is out of range"),
        (4242, 0, "receive buffer 0 is out of range"),
        (4242, transport.MAX_RECEIVE_BUFFER + 1, "receive buffer"),
    ],
)
def test_port_and_buffer_size_are_range_checked(port: int, rcvbuf: int, message: str) -> None:
    with pytest.raises(NetworkError, match=f"^{message}"):
        MulticastReceiver("lo", port, [Join("ff1e::1")], rcvbuf=rcvbuf)


def test_a_join_is_immutable() -> None:
    join = Join("ff1e::1")
    with pytest.raises(AttributeError):
        join.group = "ff1e::2"  # type: ignore[misc]


# --- Join planning: options, then the manifest, then DNS --------------------------------------

CHANNEL = "updates.example.test"


def _plan(transport: Transport | None = None, **options: Any) -> JoinPlan:
    given: dict[str, Any] = dict(
        channel=None, scope=addressing.DEFAULT_SCOPE, port=None, group=None, sources=()
    )
    given.update(options)
    return plan_joins(transport, resolver="[fd66::53]:53", **given)


def test_an_explicit_group_is_joined_as_asm_or_from_the_given_sources_without_dns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", _no_query)
    assert _plan(group="ff3e::1234", port=5000) == JoinPlan((("ff3e::1234", None),), 5000)
    assert _plan(group="ff3e::1234", sources=("fd77::1", "fd77::2")) == JoinPlan(
        (("ff3e::1234", "fd77::1"), ("ff3e::1234", "fd77::2")), addressing.DEFAULT_PORT
    )
    ssm = addressing.ssm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    assert _plan(channel=CHANNEL, sources=("fd77::9",)) == JoinPlan(
        ((ssm, "fd77::9"),), addressing.DEFAULT_PORT, channel=CHANNEL
    )


def test_nothing_to_join_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--channel, --group or --manifest"):
        _plan()


def test_srv_records_give_ssm_joins_on_their_port_and_say_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    canned(
        monkeypatch,
        {
            (SRV, "SRV"): ["10 5 4242 tx1.example.test."],
            ("tx1.example.test.", "AAAA"): ["fd77::1", "fd77::2"],
        },
    )
    plan = _plan(channel=CHANNEL)
    ssm = addressing.ssm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    assert plan.memberships == ((ssm, "fd77::1"), (ssm, "fd77::2"))
    assert plan.port == 4242
    assert plan.note == f"SRV {SRV.rstrip('.')}: joining {ssm} from fd77::1, fd77::2"
    assert _plan(channel=CHANNEL, port=5000).port == 5000  # an explicit port wins


def test_without_srv_records_or_with_dns_failing_the_asm_group_is_joined_and_the_reason_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asm = addressing.asm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    ssm = addressing.ssm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    canned(monkeypatch, {})
    plan = _plan(channel=CHANNEL)
    assert plan.memberships == ((asm, None),)
    assert plan.follow == ssm  # the announced senders are joined there
    assert plan.note == (
        f"no SRV records for {SRV.rstrip('.')}; listening for senders on ASM group {asm} "
        f"(each joined on {ssm} by SSM)"
    )
    canned(monkeypatch, {(SRV, "SRV"): dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])})
    plan = _plan(channel=CHANNEL)
    assert plan.memberships == ((asm, None),) and plan.follow == ssm
    assert plan.note is not None and plan.note.startswith("DNS discovery failed (")


def test_a_manifest_gives_the_groups_and_port_and_the_options_channel_only_the_srv_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = canned(monkeypatch, {})
    transport = Transport.for_channel(CHANNEL, scope="link", port=4800)
    plan = _plan(transport)
    assert plan.memberships == ((transport.asm_group, None),) and plan.port == 4800
    assert plan.follow == transport.ssm_group
    assert plan.note is not None and SRV.rstrip(".") in plan.note
    # The verified manifest's groups stay authoritative; another channel named in the options
    # only changes where the SRV records are looked up.
    plan = _plan(transport, channel="other.example.test")
    assert plan.memberships == ((transport.asm_group, None),) and plan.port == 4800
    assert plan.note is not None and "_otacast._udp.other.example.test" in plan.note
    assert len(fake.lifetimes) == 2  # one SRV query each, no AAAA query without records


def test_explicit_joins_and_srv_sources_follow_no_announcements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    canned(
        monkeypatch,
        {(SRV, "SRV"): ["10 5 4242 tx1.example.test."], ("tx1.example.test.", "AAAA"): ["fd77::1"]},
    )
    assert _plan(channel=CHANNEL).follow is None
    assert _plan(channel=CHANNEL, sources=("fd77::9",)).follow is None
    assert _plan(group="ff1e::1234").follow is None


# --- "Nothing heard": every message names the next step -------------------------------------


def test_nothing_heard_on_the_asm_group_points_at_serve_on_the_link_srv_source_and_mirrors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    canned(monkeypatch, {})
    asm = addressing.asm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    text = _plan(channel=CHANNEL).silence("eth1", 10.0)
    assert text == (
        f"no manifest heard within 10 s: no sender announced itself on ASM group {asm} port "
        f"4242 on interface eth1; check that `otacast-signer serve` runs for {CHANNEL} on this "
        "link (its defaults announce there) and that eth1 is the interface facing it; across "
        f"routers, publish SRV records ({SRV.rstrip('.')}) or give --source; or give "
        "--manifest with an HTTP mirror to fetch from (--fallback)"
    )


def test_nothing_heard_from_named_sources_names_them_and_what_to_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", _no_query)
    ssm = addressing.ssm_group(CHANNEL, addressing.DEFAULT_SCOPE)
    text = _plan(channel=CHANNEL, sources=("fd77::1", "fd77::2")).silence("eth0", 3)
    assert text.startswith(f"no manifest heard within 3 s from fd77::1, fd77::2 on {ssm} port ")
    assert f"`otacast-signer serve` runs for {CHANNEL} on those hosts" in text
    assert "MLDv2" in text and "--manifest with an HTTP mirror" in text
    text = _plan(group="ff1e::1234").silence("eth0", 3)
    assert "on group ff1e::1234 port 4242 on interface eth0" in text
    assert "`otacast-signer serve --group ff1e::1234`" in text
