"""What a receiver does with decoded records before its adapter sees them, for a live
handoff and a snapshot alike: upgrade them, and let the namespace's validator reject what
the application does not expect. (Decoding, within the codec's bounds, comes first.)"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from handoff._adapter import ImportResult, Record
from handoff.engine._tracked import Tracked
from handoff.transforms import Chain

__all__ = ("REJECTED", "Validator", "admit", "import_guarded")

logger = logging.getLogger("handoff.engine")

Validator = Callable[[Any, Any], bool]
"""``validate(key, value)``: true to take a record; false (or raising) rejects it."""

REJECTED = "rejected by the namespace's validator"


def admit(
    tracked: Tracked, chain: Chain | None, records: list[Record]
) -> tuple[list[Record], dict[str, int]]:
    """The decoded ``records`` to import into ``tracked``, and those dropped per reason."""
    dropped: dict[str, int] = {}
    if chain is not None:
        records, dropped = chain.apply(records)
    if tracked.validate is not None and records:
        records, rejected = _validated(tracked.name, tracked.validate, records)
        if rejected:
            dropped[REJECTED] = dropped.get(REJECTED, 0) + rejected
    return records, dropped


def _validated(name: str, validate: Validator, records: list[Record]) -> tuple[list[Record], int]:
    kept: list[Record] = []
    failed = False
    for record in records:
        try:
            ok = bool(validate(record[0], record[1]))
        except Exception:
            if not failed:  # one log line per chunk is enough
                logger.warning("the validator of %r raised", name, exc_info=True)
            failed, ok = True, False
        if ok:
            kept.append(record)
    return kept, len(records) - len(kept)


def import_guarded(tracked: Tracked, records: list[Record], *, age: float) -> ImportResult:
    """Import admitted ``records`` into ``tracked``'s adapter. An adapter bug (or a user's
    merge function) must not take the node down, on a live handoff or a restore at start:
    an exception drops the batch with its reason, and a result that does not account for
    every record (a miscounting adapter) drops it as unknown, so no report claims what
    nobody knows."""
    try:
        result = tracked.adapter.import_records(records, age=age)
    except Exception as exc:
        logger.exception("applying %d records of %r failed", len(records), tracked.name)
        return ImportResult(dropped={f"import failed: {type(exc).__name__}": len(records)})
    if result.total != len(records):
        logger.error(
            "the adapter of %r accounted for %d of %d records",
            tracked.name,
            result.total,
            len(records),
        )
        return ImportResult(dropped={"outcome unknown: adapter miscounted": len(records)})
    return result
