"""The drain report: what became of every record a draining node held."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from handoff._text import duration

__all__ = ("DrainReport", "NamespaceReport", "SuccessorCounts", "merge_reports")


def _add(counts: dict[str, int], reason: str, count: int) -> None:
    if count:
        counts[reason] = counts.get(reason, 0) + count


@dataclass(slots=True)
class SuccessorCounts:
    """What one successor acknowledged of a namespace, and what it did with it. With
    spread ``all`` every successor gets every record: these are its copies."""

    acknowledged: int = 0
    applied: int = 0
    kept_existing: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Records it acknowledged without keeping them, per reason ("receiver full" ...)."""


@dataclass(slots=True)
class NamespaceReport:
    """One namespace's accounting. Invariant: ``records == acknowledged + snapshotted +
    sum(dropped.values())`` once the drain has finished, each record counted once.

    With spread ``all`` a record is sent to every successor: it counts as acknowledged
    once, when the first successor acknowledges it, and ``applied`` / ``kept_existing`` /
    ``receiver_dropped`` say what that first successor did with it (where one chunk mixes
    records first acknowledged with records another successor acknowledged before, its
    drops are counted against the first ones: the report errs on the side of loss). A
    record is re-sent, snapshotted or dropped only once no successor holds it pending or
    unacknowledged and none acknowledged it. What each successor did with its copies is
    in :attr:`per_successor`."""

    namespace: str
    version: int
    records: int = 0
    """Records the node held and exported."""
    sent: int = 0
    """Record transmissions: retries to another successor, and with spread ``all`` each
    successor's copy, included."""
    acknowledged: int = 0
    """Records a successor acknowledged (applied, kept or dropped there, see below)."""
    applied: int = 0
    kept_existing: int = 0
    receiver_dropped: dict[str, int] = field(default_factory=dict)
    snapshotted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Records this node gave up on, per reason."""
    bytes: int = 0
    seconds: float = 0.0
    successors: list[str] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)
    """Successors that refused the namespace (or could not be offered it), with why."""
    spread: str = "split"
    """How the keys were placed over several successors: ``split`` or ``all``."""
    per_successor: dict[str, SuccessorCounts] = field(default_factory=dict)
    """Each successor's acknowledgements and their outcomes there (its copies, under
    ``all``)."""
    in_doubt: int = 0
    """Records of state that moves exactly once (counters, actors) re-sent after the
    successor they were sent to lost its link before acknowledging them. Exact if it
    crashed (what it held is lost with it); counted twice if it still runs (a partition).
    The records are also counted where they ended (acknowledged, snapshotted, dropped)."""

    def absorb(self, other: NamespaceReport) -> None:
        """Add ``other``'s counts (another drain of the same namespace) to these."""
        for name in ("records", "sent", "acknowledged", "applied", "kept_existing"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("snapshotted", "bytes", "in_doubt"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        for reason, count in other.receiver_dropped.items():
            self.receiver_drop(reason, count)
        for reason, count in other.dropped.items():
            self.drop(reason, count)
        self.successors += [s for s in other.successors if s not in self.successors]
        self.refusals.update(other.refusals)
        for peer, counts in other.per_successor.items():
            self.successor_acked(
                peer, counts.acknowledged, counts.applied, counts.kept_existing, counts.dropped
            )

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` records as given up for ``reason``."""
        _add(self.dropped, reason, count)

    def receiver_drop(self, reason: str, count: int) -> None:
        """Count records a successor acknowledged but did not keep."""
        _add(self.receiver_dropped, reason, count)

    def successor_acked(
        self, peer: str, records: int, applied: int, kept: int, dropped: Mapping[str, int]
    ) -> None:
        """Count an acknowledgement of ``records`` by ``peer`` in :attr:`per_successor`."""
        counts = self.per_successor.get(peer)
        if counts is None:
            counts = self.per_successor[peer] = SuccessorCounts()
        counts.acknowledged += records
        counts.applied += applied
        counts.kept_existing += kept
        for reason, count in dropped.items():
            _add(counts.dropped, reason, count)

    @property
    def accounted(self) -> int:
        """Records whose fate is known."""
        return self.acknowledged + self.snapshotted + sum(self.dropped.values())

    @property
    def complete(self) -> bool:
        """True when every record is accounted for."""
        return self.accounted == self.records

    @property
    def lost(self) -> int:
        """Records neither a successor nor the snapshot store kept (dropped on either side)."""
        return sum(self.dropped.values()) + sum(self.receiver_dropped.values())

    def summary(self) -> str:
        """One clause for the drain's log line, naming every reason for a loss."""
        text = (
            f"{self.namespace}: {self.records} held, {self.acknowledged} acknowledged"
            f" by {', '.join(self.successors) or 'nobody'}"
        )
        if self.spread == "all" and len(self.per_successor) > 1:
            text += (
                " (copies to each: "
                + ", ".join(
                    f"{peer} {counts.applied}"
                    + (f" [dropped {_reasons(counts.dropped)}]" if counts.dropped else "")
                    for peer, counts in sorted(self.per_successor.items())
                )
                + " applied)"
            )
        if self.kept_existing:
            text += f" ({self.kept_existing} kept their newer copy there)"
        if self.receiver_dropped:
            text += f" (dropped there: {_reasons(self.receiver_dropped)})"
        text += f", {self.snapshotted} snapshotted"
        if self.in_doubt:
            text += (
                f", {self.in_doubt} re-sent after a successor's link ended before it "
                "acknowledged them (they count twice if it still runs)"
            )
        if self.dropped:
            text += f", dropped {_reasons(self.dropped)}"
            if self.refusals:
                refused = "; ".join(f"{peer}: {why}" for peer, why in sorted(self.refusals.items()))
                text += f" (refused by {refused})"
        return text


def _reasons(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))


@dataclass(frozen=True, slots=True)
class DrainReport:
    """The result of :meth:`handoff.Node.drain`, per namespace."""

    node: str
    release: str
    seconds: float
    namespaces: Mapping[str, NamespaceReport]
    reason: str = "drain"

    @property
    def records(self) -> int:
        """Records held at the start of the drain, all namespaces."""
        return sum(ns.records for ns in self.namespaces.values())

    @property
    def acknowledged(self) -> int:
        """Records acknowledged by successors, all namespaces."""
        return sum(ns.acknowledged for ns in self.namespaces.values())

    @property
    def snapshotted(self) -> int:
        """Records written to the snapshot store, all namespaces."""
        return sum(ns.snapshotted for ns in self.namespaces.values())

    @property
    def dropped(self) -> int:
        """Records given up by this node, all namespaces."""
        return sum(sum(ns.dropped.values()) for ns in self.namespaces.values())

    @property
    def receiver_dropped(self) -> int:
        """Records successors acknowledged without keeping them (expired, receiver full,
        upgrade hook failed ...), all namespaces."""
        return sum(sum(ns.receiver_dropped.values()) for ns in self.namespaces.values())

    @property
    def lost(self) -> int:
        """Records that neither a successor nor a snapshot kept (dropped on either side)."""
        return self.dropped + self.receiver_dropped

    @property
    def in_doubt(self) -> int:
        """Ownership records re-sent whose first successor may still hold them, all
        namespaces (see :attr:`NamespaceReport.in_doubt`)."""
        return sum(ns.in_doubt for ns in self.namespaces.values())

    @property
    def ok(self) -> bool:
        """True when nothing was dropped anywhere (by this node or by a successor) and
        nothing that moves exactly once is in doubt."""
        return self.lost == 0 and self.in_doubt == 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "node": self.node,
            "release": self.release,
            "reason": self.reason,
            "seconds": round(self.seconds, 6),
            "records": self.records,
            "acknowledged": self.acknowledged,
            "snapshotted": self.snapshotted,
            "dropped": self.dropped,
            "receiver_dropped": self.receiver_dropped,
            "lost": self.lost,
            "in_doubt": self.in_doubt,
            "ok": self.ok,
            "namespaces": {name: asdict(ns) for name, ns in self.namespaces.items()},
        }

    def to_json(self) -> str:
        """The report as one JSON object."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def summary(self) -> str:
        """One line for the log."""
        parts = [ns.summary() for ns in self.namespaces.values()]
        return f"{self.reason} of {self.node} ({self.release}) in {duration(self.seconds)}: " + (
            "; ".join(parts) if parts else "nothing tracked"
        )


def merge_reports(
    report: DrainReport, earlier: list[DrainReport], *, seconds: float
) -> DrainReport:
    """One drain's report from ``report`` and the ``earlier`` ones of the same drain (a
    pre-copy's deltas, sent first): per namespace the counts add up, each record counted
    where it was sent."""
    namespaces: dict[str, NamespaceReport] = {}
    for one in [*earlier, report]:
        for name, ns in one.namespaces.items():
            into = namespaces.get(name)
            if into is None:
                into = namespaces[name] = NamespaceReport(name, ns.version, spread=ns.spread)
            into.absorb(ns)
    return DrainReport(report.node, report.release, seconds, namespaces, report.reason)
