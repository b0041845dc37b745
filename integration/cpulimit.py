"""A share of one core for a process and the processes it starts, as a slow device has: the
kernel's CPU bandwidth control (cgroup ``cpu`` controller), for benchmarks only.

With cgroup v2 the group is ``/sys/fs/cgroup/<name>`` and its limit ``cpu.max``
(``QUOTA PERIOD``, in microseconds); with v1 it is ``/sys/fs/cgroup/cpu/<name>`` and its limit
``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``.  A process added to the group stays in it, and
so does every child it starts afterwards (the decode worker).  The group is removed on leaving
the context; the processes in it must have exited by then.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
# The bandwidth period.  The kernel's default, 100 ms, lets a receiver at 10% run 10 ms and then
# stops it for 90 ms, ~10 MB of a 110 MB/s stream at once: not what a slower CPU does.  At 10 ms
# it is stopped for at most 9 ms at a time.  The kernel's smallest quota is 1 ms, so the limit is
# at least 10% of a core.
PERIOD_US = 10_000
MIN_PERCENT = 10


class CpuLimit:
    """One cgroup whose processes together get at most `percent` of one core."""

    def __init__(self, directory: Path, v2: bool) -> None:
        self.directory = directory
        self.v2 = v2

    def set(self, percent: int) -> None:
        """At most `percent` of one core (`MIN_PERCENT` at least; 100 or more: no limit)."""
        if percent < MIN_PERCENT:
            raise ValueError(f"a CPU limit is at least {MIN_PERCENT}% of a core")
        quota = percent * PERIOD_US // 100
        if self.v2:
            value = f"{quota} {PERIOD_US}" if percent < 100 else f"max {PERIOD_US}"
            (self.directory / "cpu.max").write_text(value)
        else:
            (self.directory / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.directory / "cpu.cfs_quota_us").write_text(str(quota) if percent < 100 else "-1")

    def add(self, pid: int) -> None:
        (self.directory / "cgroup.procs").write_text(str(pid))


def available() -> str | None:
    """Why CPU limits cannot be set here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if (ROOT / "cgroup.controllers").exists():
        if "cpu" not in (ROOT / "cgroup.controllers").read_text().split():
            return "the cgroup v2 hierarchy has no cpu controller"
        return None
    if (ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return None
    return "no cgroup cpu controller mounted"


@contextlib.contextmanager
def cpu_limit(name: str) -> Iterator[CpuLimit]:
    """A new group `name` (no limit until `CpuLimit.set`), removed afterwards."""
    problem = available()
    if problem is not None:
        raise RuntimeError(f"cannot limit CPU: {problem}")
    v2 = (ROOT / "cgroup.controllers").exists()
    if v2:
        control = ROOT / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            try:
                control.write_text("+cpu")
            except OSError as exc:  # e.g. EBUSY where the root group holds processes
                raise RuntimeError(f"cannot limit CPU: enabling its controller: {exc}") from None
        directory = ROOT / name
    else:
        directory = ROOT / "cpu" / name
    directory.mkdir(exist_ok=True)
    try:
        yield CpuLimit(directory, v2)
    finally:
        try:
            directory.rmdir()
        except OSError as exc:
            print(f"warning: cgroup {directory} left behind: {exc}", file=sys.stderr)
