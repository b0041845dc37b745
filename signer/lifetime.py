"""The end of a served manifest's life: when ``serve`` warns and when it stops, decided purely.

Theory of operation
-------------------
A manifest is valid until its ``expires`` (a Unix time): from then on every device refuses it
(`policy.accept`: ``now >= expires``), so a sender still sending it only occupies the link.
`build_channels` refuses to start with an expired manifest; while the carousel runs, the driver
(`serve`) asks `outlook` about once a second with the wall clock and acts on what it says: a
warning each time the stage rises into a lead time (`SERVE_EXPIRY_WARNINGS`, longest first),
and a stop when it reaches the end.  Stages only rise as time passes, so a driver that
remembers the last stage it acted on warns at most once per lead time; one that starts inside
the last lead time warns once, not once per lead time it has already passed.

Nothing here reads a clock: both ``expires`` and ``now`` are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from otacast.schemas.limits import SERVE_EXPIRY_WARNINGS
from otacast.schemas.units import format_time


@dataclass(frozen=True)
class Outlook:
    """Where `now` stands in a manifest's last stretch.

    ``stage`` is 0 before the longest lead time, i once within the i-th lead time (1 = the
    longest), and ``len(leads) + 1`` from expiry on; ``remaining`` is never negative."""

    stage: int
    expired: bool
    remaining: float
    expires: int

    def warning(self) -> str:
        """The operator's warning for this stage (meaningful while not expired)."""
        return (
            f"the manifest expires at {format_time(self.expires)} (in {_span(self.remaining)}): "
            "sign a new one and serve it; this sender stops at expiry"
        )


def outlook(expires: int, now: float, leads: Sequence[int] = SERVE_EXPIRY_WARNINGS) -> Outlook:
    """The stage of a manifest expiring at `expires` as of `now` (both Unix times); `leads` are
    seconds before expiry, longest first."""
    if now >= expires:  # the devices' rule, to the same instant
        return Outlook(len(leads) + 1, True, 0.0, expires)
    remaining = expires - now
    return Outlook(sum(1 for lead in leads if remaining <= lead), False, remaining, expires)


def stopped(expires: int) -> str:
    """The one-line error of a sender that stopped at its manifest's expiry."""
    return (
        f"the manifest expired at {format_time(expires)} while being served: devices refuse it "
        "from now on, so the sender stopped; sign a new one and serve it"
    )


def refused(expires: int) -> str:
    """The one-line error of a sender asked to start with an expired manifest."""
    return (
        f"the manifest expired at {format_time(expires)}: devices would refuse it; sign a new one"
    )


def _span(seconds: float) -> str:
    """A remaining time for people, rounded down: ``23 h 59 min``, ``59 min``, ``5 s``."""
    whole = int(seconds)
    hours, minutes = whole // 3600, whole % 3600 // 60
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{whole} s"
