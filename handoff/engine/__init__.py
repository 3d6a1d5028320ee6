"""The handoff engine: sessions (message routing, drain order), planner (successors, key
split), sender, receiver, restore, report, tallies (cluster-scoped counters)."""

from __future__ import annotations

from handoff.engine._link import ANYIO_CLOCK, AnyioClock, Clock, Link
from handoff.engine._planner import Router, compare_releases, release_key, successor_tiers
from handoff.engine._receiver import Receiver
from handoff.engine._report import DrainReport, NamespaceReport
from handoff.engine._sender import Drainer
from handoff.engine._sessions import Sessions
from handoff.engine._tally import Tallies
from handoff.engine._tracked import Tracked

__all__ = (
    "ANYIO_CLOCK",
    "AnyioClock",
    "Clock",
    "DrainReport",
    "Drainer",
    "Link",
    "NamespaceReport",
    "Receiver",
    "Router",
    "Sessions",
    "Tallies",
    "Tracked",
    "compare_releases",
    "release_key",
    "successor_tiers",
)
