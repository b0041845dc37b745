"""The sender's MLD listener table (`signer.mld`): reports and dones built by hand from the
RFC 2710 / RFC 3810 layouts, expiry, leaving, querier election, hostile input; and the
driver's pure parts (`signer.listeners`)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.schemas.limits import (
    MLD_MAX_LISTENERS,
    MLD_MAX_QUERY_INTERVAL,
    MLD_MAX_SOURCES,
    MLD_QUERY_INTERVAL,
)
from otacast.signer import listeners, mld
from otacast.signer.mld import ListenerTable

GROUP = "ff3e::8000:1"
OTHER_GROUP = "ff3e::8000:2"
SENDER = "fd51::1"  # the sender's source address
OTHER_SENDER = "fd51::9"
ME = "fe80::5"  # the table's link-local address
HOST = "fe80::a"
HOST2 = "fe80::b"
LISTENING = 2 * 10.0 + 2.0  # our Multicast Address Listening Interval
GRACE = 2.0  # last listener query count x interval


def b(address: str) -> bytes:
    return ipaddress.IPv6Address(address).packed


def v2_report(*records: tuple[int, str, tuple[str, ...]], aux: int = 0) -> bytes:
    """An MLDv2 Report (RFC 3810 §5.2): type 143, reserved, checksum, reserved, record count,
    then per record: type, aux data length (words), source count, address, sources, aux."""
    out = bytes([143, 0, 0, 0, 0, 0]) + len(records).to_bytes(2, "big")
    for kind, group, sources in records:
        out += bytes([kind, aux]) + len(sources).to_bytes(2, "big") + b(group)
        out += b"".join(b(s) for s in sources) + bytes(4 * aux)
    return out


def v1(kind: int, group: str) -> bytes:
    """An MLDv1 Report (131) or Done (132) (RFC 2710 §3): type, code, checksum, max delay,
    reserved, address."""
    return bytes([kind, 0, 0, 0, 0, 0, 0, 0]) + b(group)


def table(now: float = 0.0) -> ListenerTable:
    return ListenerTable([GROUP, OTHER_GROUP], now, address=ME, own=[SENDER])


def test_a_report_built_from_the_rfc_layout_is_the_bytes_expected() -> None:
    # IS_EX{} for ff3e::8000:1, byte by byte.
    assert v2_report((2, GROUP, ())).hex() == (
        "8f000000" "00000001" "02000000" "ff3e" + "0000" * 5 + "80000001"
    )  # fmt: skip
    assert mld.parse_records(v2_report((2, GROUP, ()))) == [
        mld.Record(mld.RecordType.MODE_IS_EXCLUDE, b(GROUP), frozenset())
    ]


def test_an_exclude_nothing_record_makes_the_group_listened_from_any_source() -> None:
    t = table()
    t.receive(v2_report((4, GROUP, ())), b(HOST), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0) and t.listened(GROUP, None, 1.0)
    assert not t.listened(OTHER_GROUP, None, 1.0)


def test_an_ssm_join_counts_only_for_the_source_it_names() -> None:
    t = table()
    t.receive(v2_report((5, GROUP, (SENDER,))), b(HOST), 1, 1.0)  # ALLOW{S}
    assert t.listened(GROUP, SENDER, 1.0)
    assert not t.listened(GROUP, OTHER_SENDER, 1.0)
    t.receive(v2_report((1, OTHER_GROUP, (OTHER_SENDER,))), b(HOST), 1, 1.0)  # IS_IN{S'}
    assert not t.listened(OTHER_GROUP, SENDER, 1.0)
    assert t.listened(OTHER_GROUP, None, 1.0)


def test_an_exclude_record_naming_our_source_does_not_count_for_it() -> None:
    t = table()
    t.receive(v2_report((2, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    assert not t.listened(GROUP, SENDER, 1.0) and t.listened(GROUP, OTHER_SENDER, 1.0)


def test_blocking_the_last_source_leaves_after_the_last_listener_queries() -> None:
    t = table()
    t.receive(v2_report((5, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    t.receive(v2_report((6, GROUP, (SENDER,))), b(HOST), 1, 3.0)  # BLOCK{S}
    assert t.listened(GROUP, SENDER, 3.0 + GRACE - 0.01)
    assert not t.listened(GROUP, SENDER, 3.0 + GRACE)


def test_the_last_listener_grace_admits_only_what_that_listener_wanted() -> None:
    t = table()
    t.receive(v2_report((5, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    t.receive(v2_report((6, GROUP, (SENDER,))), b(HOST), 1, 3.0)
    assert t.listened(GROUP, SENDER, 3.5) and not t.listened(GROUP, OTHER_SENDER, 3.5)


def test_a_leave_asks_the_group_whether_anyone_else_listens() -> None:
    t = table()
    t.queries(0.0)
    t.receive(v2_report((4, GROUP, ())), b(HOST), 1, 1.0)
    t.receive(v2_report((3, GROUP, ())), b(HOST), 1, 3.0)  # TO_IN{}
    sent = t.queries(3.0) + t.queries(4.0) + t.queries(5.0)
    specific = [q for q in sent if q.destination == GROUP]
    assert len(specific) == 2  # MLD_LAST_LISTENER_QUERIES, one interval apart
    # Address-specific: the group in the address field, answers within 1 s (1000 ms).
    assert specific[0].payload[8:24] == b(GROUP)
    assert specific[0].payload[4:6] == (1000).to_bytes(2, "big")
    # Another listener answers: the group stays listened past the grace time.
    t.receive(v2_report((2, GROUP, ())), b(HOST2), 1, 3.5)
    assert t.listened(GROUP, SENDER, 3.0 + GRACE + 1)


def test_one_host_leaving_leaves_the_others_listening() -> None:
    t = table()
    t.receive(v2_report((4, GROUP, ())), b(HOST), 1, 1.0)
    t.receive(v2_report((5, GROUP, (SENDER,))), b(HOST2), 1, 1.0)
    t.receive(v2_report((3, GROUP, ())), b(HOST), 1, 2.0)
    assert t.listened(GROUP, SENDER, 2.0 + GRACE + 1)
    assert not t.listened(GROUP, OTHER_SENDER, 2.0 + GRACE + 1)


def test_mldv1_report_and_done() -> None:
    t = table()
    t.receive(v1(131, GROUP), b(HOST), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0)
    t.receive(v1(132, GROUP), b(HOST), 1, 2.0)
    assert not t.listened(GROUP, SENDER, 2.0 + GRACE)


def test_a_listener_that_stops_reporting_expires_after_the_listening_interval() -> None:
    t = table()
    t.receive(v2_report((2, GROUP, ())), b(HOST), 1, 1.0)
    assert t.listened(GROUP, None, 1.0 + LISTENING - 0.01)
    assert not t.listened(GROUP, None, 1.0 + LISTENING)
    # A report refreshes it.
    t.receive(v2_report((2, GROUP, ())), b(HOST), 1, 30.0)
    t.receive(v2_report((2, GROUP, ())), b(HOST), 1, 40.0)
    assert t.listened(GROUP, None, 40.0 + LISTENING - 0.01)


def test_allow_and_block_edit_the_hosts_source_list() -> None:
    t = table()
    t.receive(v2_report((1, GROUP, (OTHER_SENDER,))), b(HOST), 1, 1.0)
    t.receive(v2_report((5, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0) and t.listened(GROUP, OTHER_SENDER, 1.0)
    t.receive(v2_report((6, GROUP, (OTHER_SENDER,))), b(HOST), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0) and not t.listened(GROUP, OTHER_SENDER, 1.0)
    # In EXCLUDE mode ALLOW removes from the excluded list, BLOCK adds to it.
    t.receive(v2_report((4, GROUP, (SENDER, OTHER_SENDER))), b(HOST), 1, 1.0)
    assert not t.listened(GROUP, SENDER, 1.0)
    t.receive(v2_report((5, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0) and not t.listened(GROUP, OTHER_SENDER, 1.0)
    t.receive(v2_report((6, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    assert not t.listened(GROUP, SENDER, 1.0)


@pytest.mark.parametrize(
    ("source", "hop_limit", "reason"),
    [
        (HOST, 64, "hop-limit"),
        (SENDER, 1, None),  # our own address: ignored, not rejected
        ("fd51::7", 1, "source"),
    ],
)
def test_reports_from_off_link_or_own_sources_change_nothing(
    source: str, hop_limit: int, reason: str | None
) -> None:
    t = table()
    t.receive(v2_report((2, GROUP, ())), b(source), hop_limit, 1.0)
    assert not t.listened(GROUP, None, 1.0)
    if reason is None:
        assert t.stats.ignored == 1 and not t.stats.rejected
    else:
        assert t.stats.rejected == {reason: 1}


def test_a_record_running_past_the_message_rejects_the_whole_report() -> None:
    t = table()
    whole = v2_report((2, GROUP, ()), (5, OTHER_GROUP, (SENDER,)))
    t.receive(whole[:-1], b(HOST), 1, 1.0)
    assert t.stats.rejected == {"record-length": 1}
    assert not t.listened(GROUP, None, 1.0)  # the first, whole, record was not applied


def test_unknown_record_types_and_unicast_addresses_are_skipped_not_fatal() -> None:
    t = table()
    report = bytearray(v2_report((9, GROUP, ()), (2, OTHER_GROUP, ())))
    t.receive(bytes(report), b(HOST), 1, 1.0)
    assert not t.listened(GROUP, None, 1.0) and t.listened(OTHER_GROUP, None, 1.0)
    assert mld.parse_records(v2_report((2, "fd51::3", ()))) == []


def test_a_report_from_the_unspecified_address_counts() -> None:
    # RFC 3810 §5.2.13: a host without a link-local address yet reports from ::.
    t = table()
    t.receive(v2_report((4, GROUP, ())), bytes(16), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0)


def test_aux_data_is_skipped() -> None:
    t = table()
    t.receive(v2_report((2, GROUP, (OTHER_SENDER,)), aux=2), b(HOST), 1, 1.0)
    assert t.listened(GROUP, SENDER, 1.0) and not t.stats.rejected


def test_records_about_groups_not_watched_keep_no_state() -> None:
    t = table()
    t.receive(v2_report((2, "ff02::fb", ())), b(HOST), 1, 1.0)
    assert t.stats.ignored == 1 and not t.listened("ff02::fb", None, 1.0)


def test_the_general_query_is_the_rfc3810_layout_with_our_timers() -> None:
    (query,) = table().queries(0.0)
    assert query.destination == "ff02::1"
    # type 130, code 0, checksum 0 (the kernel's), max response 2000 ms, reserved, ::,
    # S=0 QRV=2, QQIC=10 s, no sources.
    assert query.payload.hex() == "8200000007d00000" + "00" * 16 + "020a0000"


def test_the_querier_sends_startup_queries_then_one_per_interval() -> None:
    t = table()
    times = [now / 4 for now in range(0, 200) if t.queries(now / 4)]
    assert times == [0.0, MLD_QUERY_INTERVAL / 4, MLD_QUERY_INTERVAL / 4 + MLD_QUERY_INTERVAL,
                     MLD_QUERY_INTERVAL / 4 + 2 * MLD_QUERY_INTERVAL,
                     MLD_QUERY_INTERVAL / 4 + 3 * MLD_QUERY_INTERVAL,
                     MLD_QUERY_INTERVAL / 4 + 4 * MLD_QUERY_INTERVAL]  # fmt: skip


def test_the_table_is_informed_a_response_interval_after_its_first_query() -> None:
    t = ListenerTable([GROUP], 0.0)  # no address yet: cannot query
    assert not t.informed(5.0)
    t.set_address(ME)
    assert t.queries(5.0)
    assert not t.informed(5.0 + 1.99) and t.informed(5.0 + 2.0)


def test_another_queriers_general_query_informs_after_its_response_time() -> None:
    t = ListenerTable([GROUP], 0.0, address=ME)
    t.receive(query(code=10000), b("fe80::1"), 1, 3.0)  # a lower querier: ours never queries
    assert t.queries(4.0) == []
    assert not t.informed(3.0 + 9.99) and t.informed(3.0 + 10.0)


def test_a_link_where_nobody_queries_never_informs() -> None:
    t = ListenerTable([GROUP], 0.0)
    assert t.queries(1000.0) == [] and not t.informed(1000.0)


def test_without_a_link_local_address_the_table_listens_but_does_not_query() -> None:
    t = ListenerTable([GROUP], 0.0)
    assert t.queries(0.0) == [] and t.wake() == float("inf")
    t.receive(v2_report((2, GROUP, ())), b(HOST), 1, 1.0)
    assert t.listened(GROUP, None, 1.0)
    t.set_address(ME)
    assert len(t.queries(1.0)) == 1


def query(qrv: int = 2, qqic: int = 125, code: int = 10000) -> bytes:
    return struct.pack("!BBHHH16sBBH", 130, 0, 0, code, 0, bytes(16), qrv, qqic, 0)


def test_a_lower_querier_silences_ours_and_its_timers_set_the_listening_interval() -> None:
    t = table()
    t.queries(0.0)
    t.receive(query(qrv=3, qqic=60, code=5000), b("fe80::1"), 1, 1.0)
    assert not t.querier and t.queries(5.0) == []
    # Listening interval now 3 x 60 + 5 = 185 s.
    t.receive(v2_report((2, GROUP, ())), b(HOST), 1, 10.0)
    assert t.listened(GROUP, None, 10.0 + 184.9) and not t.listened(GROUP, None, 10.0 + 185)
    # Other Querier Present Interval: 3 x 60 + 5 / 2 = 182.5 s; then we query again.
    assert t.wake() == 1.0 + 182.5
    assert t.queries(1.0 + 182.4) == []
    assert [q.destination for q in t.queries(1.0 + 182.5)] == ["ff02::1"] and t.querier


def test_a_higher_querier_is_not_obeyed() -> None:
    t = table()
    t.queries(0.0)
    t.receive(query(), b("fe80::ffff"), 1, 1.0)
    assert t.querier and t.stats.queries == 1


def test_a_query_from_a_global_address_is_rejected() -> None:
    t = table()
    t.receive(query(), b("fd51::2"), 1, 1.0)
    assert t.querier and t.stats.rejected == {"source": 1}


def test_an_adopted_query_interval_is_capped() -> None:
    t = table()
    t.receive(query(qqic=0xFF, code=0xFFFF), b("fe80::1"), 1, 1.0)
    assert t.timers.query_interval == MLD_MAX_QUERY_INTERVAL
    assert t.timers.response_interval == MLD_MAX_QUERY_INTERVAL


@pytest.mark.parametrize(
    ("code", "seconds"), [(0x7F, 127.0), (0x80, 128.0), (0x8F, 248.0), (0xFF, 31744.0)]
)
def test_qqic_floating_point_encoding(code: int, seconds: float) -> None:
    assert mld.decode_qqic(code) == seconds


@pytest.mark.parametrize(
    ("code", "seconds"), [(10000, 10.0), (0x7FFF, 32.767), (0x8000, 32.768), (0xFFFF, 8387.584)]
)
def test_maximum_response_code_floating_point_encoding(code: int, seconds: float) -> None:
    assert mld.decode_max_response(code) == pytest.approx(seconds)


def test_a_source_list_past_the_limit_is_rejected_and_the_entry_kept() -> None:
    t = table()
    t.receive(v2_report((1, GROUP, (SENDER,))), b(HOST), 1, 1.0)
    many = tuple(f"fd51::1:{n:x}" for n in range(MLD_MAX_SOURCES))
    t.receive(v2_report((5, GROUP, many)), b(HOST), 1, 1.0)
    assert t.stats.rejected == {"too-many-sources": 1}
    assert t.listened(GROUP, SENDER, 1.0) and not t.listened(GROUP, "fd51::1:0", 1.0)


def test_listeners_past_the_limit_are_rejected_until_entries_expire() -> None:
    t = table()
    for n in range(MLD_MAX_LISTENERS):
        t.receive(v2_report((2, GROUP, ())), b(f"fe80::1:{n:x}"), 1, 1.0)
    t.receive(v2_report((2, OTHER_GROUP, ())), b(HOST), 1, 2.0)
    assert t.stats.rejected == {"too-many-listeners": 1}
    t.receive(v2_report((2, OTHER_GROUP, ())), b(HOST), 1, 1.0 + LISTENING)
    assert t.listened(OTHER_GROUP, None, 1.0 + LISTENING)


addresses = st.sampled_from([GROUP, OTHER_GROUP, SENDER, OTHER_SENDER, "ff02::16", "::"])


@given(st.binary(max_size=200), st.binary(min_size=16, max_size=16), st.integers(0, 255))
def test_random_messages_never_raise(payload: bytes, source: bytes, hop: int) -> None:
    t = table()
    for kind in mld.TYPES:
        t.receive(bytes([kind]) + payload, source, hop, 1.0)
        t.receive(bytes([kind]) + payload, b(HOST), 1, 1.0)
    t.listened(GROUP, SENDER, 2.0)
    t.queries(2.0)


@given(
    st.lists(st.tuples(st.integers(0, 8), addresses, st.lists(addresses, max_size=3)), max_size=6),
    st.integers(-3, 3),
    st.integers(0, 3),
)
def test_structured_reports_with_wrong_counts_never_raise(
    records: list[tuple[int, str, list[str]]], skew: int, aux: int
) -> None:
    report = bytearray(v2_report(*((k, g, tuple(s)) for k, g, s in records), aux=aux))
    report[6:8] = max(0, len(records) + skew).to_bytes(2, "big")
    t = table()
    t.receive(bytes(report), b(HOST), 1, 1.0)
    t.listened(GROUP, SENDER, 1.0)


def test_the_icmp6_filter_passes_only_mld_types() -> None:
    words = struct.unpack("=8I", listeners.icmp6_filter(mld.TYPES))
    passed = [t for t in range(256) if not words[t >> 5] & (1 << (t & 31))]
    assert passed == [130, 131, 132, 143]


def test_the_router_alert_option_is_a_whole_hop_by_hop_header() -> None:
    header = listeners.ROUTER_ALERT_MLD
    assert len(header) == 8 * (header[1] + 1)
    assert header[2:6] == bytes([5, 2, 0, 0])  # Router Alert, value 0: MLD (RFC 2711)


def test_without_cap_net_raw_the_driver_says_so_in_one_line_and_returns_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(socket, "if_nametoindex", lambda name: 1)
    monkeypatch.setattr(socket, "socket", refused)
    notes: list[str] = []
    assert listeners.Listeners.open("eth9", [GROUP], 0.0, notes.append) is None
    assert notes == [
        "cannot listen for MLD on eth9 (operation not permitted; needs CAP_NET_RAW): "
        "lanes share the rate"
    ]
