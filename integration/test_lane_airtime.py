"""serve spends airtime on the delta lane only while a device on its link listens there (MLD,
issue 15): with nobody on the lane its group carries nothing once the sender knows, a device
that joins gets the lane within a second, and once it leaves the lane stops again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from otacast.schemas import addressing
from otacast.schemas.manifest import parse_envelope

from .netns import BIN, LanFactory, stop
from .release import serve_command
from .test_lane_sender import _releases

PORTCOUNT = str(Path(__file__).with_name("portcount.py"))
JOIN = str(Path(__file__).with_name("mldjoin.py"))
# The tracker knows who listens once its first query has been answered: DAD of the sender's
# link-local address (1-2 s), then the 2 s response interval.  Until then the lane is sent.
INFORMED_WITHIN = 5.0
# A leave: the sender asks twice, 1 s apart, whether anyone else listens.
GONE_WITHIN = 3.0


def test_serve_sends_the_lane_only_while_a_device_listens(lan: LanFactory, tmp_path: Path) -> None:
    v2 = _releases(tmp_path)
    m = parse_envelope(v2.manifest.read_bytes()).manifest
    lane_group = addressing.ssm_group(m.transport.channel, m.transport.scope, 255)
    net = lan(2)
    sender, device = net.hosts
    # A tap on the sender's switch port: it counts the lane's packets without joining the group.
    count = subprocess.Popen(
        ["ip", "netns", "exec", net.switch, str(BIN / "python"), PORTCOUNT, "p0", lane_group,
         "17"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    tx = subprocess.Popen(
        serve_command(sender, v2, tmp_path / "cache", "--rate", "4M", "--duration", "16s"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(9.0)  # serve starts, its tracker queries, nobody answers for the lane
    join = device.popen(
        str(BIN / "python"), JOIN, "eth0", lane_group, sender.address, "3", "0",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        marks = [json.loads(line) for line in join.communicate(timeout=30)[0].splitlines()]
        out, err = count.communicate(timeout=60)
        seen: list[float] = json.loads(out)["times"]
        served, serve_err = tx.communicate(timeout=60)
    finally:
        stop([tx, count, join])
    assert count.returncode == 0, err
    assert tx.returncode == 0, serve_err
    lines = [json.loads(line) for line in served.splitlines()]
    lane_event = next(line for line in lines if line.get("event") == "serving-lane")
    assert lane_event["airtime"] == "mld"
    joined, left = marks[0]["joined"], marks[1]["left"]
    started = seen[0]  # the lane is sent from the start, while the tracker cannot know yet
    assert joined - started > INFORMED_WITHIN + 2.0
    # Nobody on the lane, and the tracker informed: nothing sent there until the join.
    assert [t for t in seen if started + INFORMED_WITHIN <= t < joined] == []
    # After the join the lane is on the air within a second, until the leave is known.
    during = [t for t in seen if joined <= t < left]
    assert during and during[0] - joined < 1.0 and left - during[-1] < 0.5
    assert [t for t in seen if t >= left + GONE_WITHIN] == []
