"""What a receiver does with one payload before its adapter sees it, for a live handoff
and a snapshot alike: decode it within the codec's bounds, upgrade it, and let the
namespace's validator reject what the application does not expect."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from handoff._adapter import Record
from handoff._codec import Codec
from handoff.engine._tracked import Tracked
from handoff.transforms import Chain

__all__ = ("REJECTED", "Validator", "intake")

logger = logging.getLogger("handoff.engine")

Validator = Callable[[Any, Any], bool]
"""``validate(key, value)``: true to take a record; false (or raising) rejects it."""

REJECTED = "rejected by the namespace's validator"


def intake(
    codec: Codec, tracked: Tracked, chain: Chain | None, payload: bytes, count: int
) -> tuple[list[Record], dict[str, int]]:
    """The records of ``payload`` to import, and those dropped per reason.

    Raises :class:`~handoff._errors.RecordDecodeError` (its subclass
    :class:`~handoff._errors.PayloadRefused` for a payload past the codec's bounds):
    then nothing of it may be applied.
    """
    records = codec.decode_records(payload, max_records=count)
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
