"""The handoff engine: planner (successors, key split), sender, receiver, restore, report."""

from __future__ import annotations

from handoff.engine._planner import Router, release_key, successor_tiers
from handoff.engine._receiver import Receiver
from handoff.engine._report import DrainReport, NamespaceReport
from handoff.engine._sender import Drainer
from handoff.engine._tracked import Tracked

__all__ = (
    "DrainReport",
    "Drainer",
    "NamespaceReport",
    "Receiver",
    "Router",
    "Tracked",
    "release_key",
    "successor_tiers",
)
