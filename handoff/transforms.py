"""Per-namespace schema versions: chains of upgrade and downgrade hooks.

A namespace's records carry the schema version of the node that exported them. Between two
versions, records pass through one hook per step: ``upgrade`` hooks (version ``v`` to
``v + 1``) run on a newer receiver, ``downgrade`` hooks (``v`` to ``v - 1``) on a newer
sender, because old code cannot know new formats (a rollback). A hook takes ``(key, value)``
and returns the new ``(key, value)``; the record's metadata (remaining TTL, use count)
passes through unchanged.

A missing step is refused up front (:class:`~handoff._errors.NoTransformPath`, naming the
hook to add), so that a namespace is either converted completely or not accepted at all. A
hook that fails on one record drops that record, counted with its reason, never the chunk.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from handoff._adapter import Record
from handoff._errors import NoTransformPath

__all__ = ("Chain", "Step", "Transform", "Transforms")

logger = logging.getLogger("handoff.transforms")

Transform = Callable[[Any, Any], tuple[Any, Any]]
"""A hook: ``(key, value) -> (key, value)`` for one version step."""


@dataclass(frozen=True, slots=True)
class Step:
    """One registered hook: converts records from ``from_version`` to ``to_version``."""

    direction: Literal["upgrade", "downgrade"]
    from_version: int
    to_version: int
    fn: Transform

    def __str__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"{self.direction} {self.from_version}->{self.to_version} ({name})"


def _check_version(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative int, not {value!r}")
    return value


class Chain:
    """The hooks that take a namespace's records from one version to another, in order.

    Obtain one from :meth:`Transforms.path`. An empty chain (same version) passes records
    through untouched.
    """

    def __init__(
        self, namespace: str, from_version: int, to_version: int, steps: Sequence[Step]
    ) -> None:
        self.namespace = namespace
        self.from_version = from_version
        self.to_version = to_version
        self.steps: tuple[Step, ...] = tuple(steps)
        # A hook that fails for one record usually fails for thousands: log each kind of
        # failure once per chain, and count the records in the drop reasons.
        self._logged: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Chain({self.namespace!r}, {self.from_version} -> {self.to_version}, "
            f"{len(self.steps)} steps)"
        )

    def _log_once(self, index: int, kind: str, message: str, exc: BaseException | None) -> None:
        with self._lock:
            if (index, kind) in self._logged:
                return
            self._logged.add((index, kind))
        logger.warning(
            "%s hook for %r failed: %s (further failures of this kind in this transfer "
            "are counted, not logged)",
            self.steps[index],
            self.namespace,
            message,
            exc_info=exc,
        )

    def apply(self, records: Sequence[Record]) -> tuple[list[Record], dict[str, int]]:
        """Run every record through the chain.

        Returns the converted records (in order, metadata unchanged) and the number of
        records dropped per reason: ``"transform failed: KeyError"`` when a hook raised,
        ``"transform returned NoneType"`` when it returned something other than a
        ``(key, value)`` pair.
        """
        _, out, dropped = self.apply_keeping(records)
        return out, dropped

    def apply_keeping(
        self, records: Sequence[Record]
    ) -> tuple[list[int], list[Record], dict[str, int]]:
        """Like :meth:`apply`, plus the indices (into ``records``) of the records that
        came through, so that a caller can pair each converted record with its original
        without running the hooks again."""
        if not self.steps:
            return list(range(len(records))), list(records), {}
        kept: list[int] = []
        out: list[Record] = []
        dropped: dict[str, int] = {}
        steps = tuple(enumerate(self.steps))
        for position, (key, value, meta) in enumerate(records):
            for index, step in steps:
                try:
                    result = step.fn(key, value)
                except Exception as exc:
                    reason = f"transform failed: {type(exc).__name__}"
                    self._log_once(index, type(exc).__name__, f"{type(exc).__name__}: {exc}", exc)
                    break
                if type(result) is not tuple or len(result) != 2:
                    if isinstance(result, tuple):
                        reason = f"transform returned tuple of {len(result)} items"
                    else:
                        reason = f"transform returned {type(result).__name__}"
                    self._log_once(index, reason, f"{reason}, not (key, value)", None)
                    break
                key, value = result
            else:
                kept.append(position)
                out.append((key, value, meta))
                continue
            dropped[reason] = dropped.get(reason, 0) + 1
        return kept, out, dropped


class Transforms:
    """The registry of upgrade and downgrade hooks of every namespace on this node."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int, int], Step] = {}

    def _add(self, step: Step, namespace: str) -> None:
        key = (namespace, step.from_version, step.to_version)
        existing = self._steps.get(key)
        if existing is not None:
            raise ValueError(
                f"{step.direction} hook for {namespace!r} from version {step.from_version} to "
                f"{step.to_version} is already registered ({existing}); register each step once"
            )
        self._steps[key] = step

    def add_upgrade(self, namespace: str, from_version: int, fn: Transform) -> None:
        """Register the hook converting ``namespace`` records from ``from_version`` to
        ``from_version + 1`` (runs on the newer receiver)."""
        start = _check_version(from_version, "from_version")
        self._add(Step("upgrade", start, start + 1, fn), namespace)

    def add_downgrade(self, namespace: str, from_version: int, fn: Transform) -> None:
        """Register the hook converting ``namespace`` records from ``from_version`` to
        ``from_version - 1`` (runs on the newer sender during a rollback)."""
        start = _check_version(from_version, "from_version")
        if start < 1:
            raise ValueError(f"cannot downgrade {namespace!r} below version 0")
        self._add(Step("downgrade", start, start - 1, fn), namespace)

    def path(self, namespace: str, from_version: int, to_version: int) -> Chain:
        """The chain converting ``namespace`` from ``from_version`` to ``to_version``.

        Raises :class:`~handoff._errors.NoTransformPath` naming the first missing step.
        """
        _check_version(from_version, "from_version")
        _check_version(to_version, "to_version")
        delta = 1 if to_version > from_version else -1
        steps: list[Step] = []
        for version in range(from_version, to_version, delta):
            step = self._steps.get((namespace, version, version + delta))
            if step is None:
                raise NoTransformPath(
                    namespace, from_version, to_version, (version, version + delta)
                )
            steps.append(step)
        return Chain(namespace, from_version, to_version, steps)

    def can_convert(self, namespace: str, from_version: int, to_version: int) -> bool:
        """Whether :meth:`path` would find a chain."""
        try:
            self.path(namespace, from_version, to_version)
        except NoTransformPath:
            return False
        return True
