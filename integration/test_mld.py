"""The sender's MLD listener tracker (`signer.listeners`) against real Linux hosts on a
namespaced LAN: devices join with ordinary sockets, and the tracker on another host of the same
switch sees their groups as listened and, after they leave, no longer listened.  With the
switch's MLD snooping off (a plain hub) and on (it then forwards reports only towards a
querier, so this also proves the tracker's queries are well-formed MLD for the bridge)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .netns import BIN, LanFactory, ip, stop

WATCH = str(Path(__file__).with_name("mldwatch.py"))
JOIN = str(Path(__file__).with_name("mldjoin.py"))
ASM_GROUP = "ff3e::8000:1"
SSM_GROUP = "ff3e::8000:2"
# A join is reported at once (the kernel's unsolicited report): seen within a second.
SEEN_WITHIN = 1.0
# A leave is reported at once too; the tracker then asks twice, 1 s apart, whether anyone
# else listens before it lets the group go (MLD_LAST_LISTENER_QUERIES x _INTERVAL).
GONE_WITHIN = 2.0 + 1.0


def _lines(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _changes(
    lines: list[dict[str, Any]], group: str, source: str | None
) -> list[tuple[float, bool]]:
    return [
        (line["time"], line["listened"])
        for line in lines
        if line.get("group") == group and line.get("source") == source
    ]


@pytest.mark.parametrize("snooping", [False, True], ids=["hub", "snooping"])
def test_the_tracker_sees_joins_answers_to_its_queries_and_leaves(
    lan: LanFactory, snooping: bool
) -> None:
    net = lan(3)
    if snooping:
        ip("-n", net.switch, "link", "set", "br0", "type", "bridge", "mcast_snooping", "1")
    sender = net.hosts[0]
    # Host 1 joins (ASM) before the tracker exists: only an answer to its query can tell it.
    early = net.hosts[1].popen(
        str(BIN / "python"), JOIN, "eth0", ASM_GROUP, "-", "9", "4", stdout=subprocess.PIPE
    )
    time.sleep(2.5)  # past host 1's unsolicited reports
    watch = sender.popen(
        str(BIN / "python"), WATCH, "eth0", "13", ASM_GROUP, f"{SSM_GROUP}/{sender.address}",
        f"{SSM_GROUP}/fd51::99", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started = time.time()
    time.sleep(3.0)  # the tracker's link-local address passes DAD; it queries
    # Host 2 joins (SSM) on the sender's address while the tracker runs.
    ssm = net.hosts[2].popen(
        str(BIN / "python"), JOIN, "eth0", SSM_GROUP, sender.address, "3", "4",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        early_times, ssm_times = _lines(early), _lines(ssm)
        lines = _lines(watch)
    finally:
        stop([early, ssm, watch])
    stats = lines[-1]["stats"]
    assert stats["querier"] and stats["sent_queries"] >= 2
    assert stats["driver"]["send_failed"] == 0
    assert stats["rejected"] == {}

    asm = _changes(lines, ASM_GROUP, None)
    assert [listened for _, listened in asm] == [True, False]
    assert started < asm[0][0] < started + 6.0  # DAD (~2 s) + the 2 s response interval
    left = early_times[1]["left"]
    assert left < asm[1][0] < left + GONE_WITHIN

    ours = _changes(lines, SSM_GROUP, sender.address)
    joined, left = ssm_times[0]["joined"], ssm_times[1]["left"]
    assert [listened for _, listened in ours] == [True, False]
    assert joined < ours[0][0] < joined + SEEN_WITHIN
    assert left < ours[1][0] < left + GONE_WITHIN
    # The device asked for our source only: another sender's traffic is not wanted.
    assert _changes(lines, SSM_GROUP, "fd51::99") == []


def test_two_senders_on_one_link_do_not_count_each_other_as_listeners(lan: LanFactory) -> None:
    # Each sender watches the lane group; if the tracker joined it (where MLDv1 reports go),
    # its kernel would report the join and the other sender would send the lane for nobody.
    net = lan(2)
    watches = [
        host.popen(
            str(BIN / "python"),
            WATCH,
            "eth0",
            "6",
            SSM_GROUP,
            f"{SSM_GROUP}/{host.address}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for host in net.hosts
    ]
    try:
        results = [_lines(watch) for watch in watches]
    finally:
        stop(watches)
    for lines in results:
        assert len(lines) == 1, lines  # the summary only: never listened
        assert lines[0]["stats"]["sent_queries"] or lines[0]["stats"]["queries"]
