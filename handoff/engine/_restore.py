"""Restoring snapshots at start: through the same codec, transforms and adapters as a
live handoff, and never crashing on a bad file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from handoff._adapter import ImportResult, Record
from handoff._codec import Codec
from handoff._errors import NoTransformPath, RecordDecodeError, SnapshotCorrupt, SnapshotError
from handoff.engine._intake import admit, import_guarded
from handoff.engine._tracked import Tracked
from handoff.snapshot import SnapshotClaim, SnapshotStore
from handoff.transforms import Transforms

__all__ = ("decoded_chunks", "restore_snapshots")

logger = logging.getLogger("handoff.snapshot")

T = TypeVar("T")


def _here(work: Callable[[], T]) -> T:
    return work()


def decoded_chunks(claim: SnapshotClaim, codec: Codec) -> Iterator[list[Record]]:
    """The records of the claimed snapshot, one decoded chunk at a time.

    The store authenticates the whole file before it yields its first chunk; decoding (and
    its bounds) happens here, one chunk in memory at a time. :func:`restore_snapshots` walks
    this twice, a checking pass and an applying pass, so that a chunk that cannot be decoded
    stops the restore before anything of the file was applied.
    """
    for payload, count in claim.read():
        yield codec.decode_records(payload, max_records=count)


def restore_snapshots(
    store: SnapshotStore,
    *,
    cluster: str,
    tracked: Mapping[str, Tracked],
    transforms: Transforms,
    codec: Codec,
    wall_clock: Callable[[], float] = time.time,
    apply: Callable[[Callable[[], ImportResult]], ImportResult] = _here,
) -> dict[str, ImportResult]:
    """Apply every waiting snapshot of a tracked namespace, then remove it.

    Each snapshot is claimed first and held until it is removed or moved aside: of several
    nodes sharing the store (worker processes of one machine), exactly one applies it; the
    others skip it. A snapshot is restored at most once, and one a crashed node held is
    restored by the next.
    A snapshot that is corrupt, truncated, of another kind or of a version this release
    cannot convert is moved aside with the reason and logged; the node starts cold for that
    namespace. So is one with a chunk past the codec's bounds (a planted hash flood or
    decode bomb, refused within a second per MB): every chunk is decoded before any is
    applied, so nothing of it is. The namespace's validator rejects records as on a live
    handoff.
    Snapshots of namespaces this node does not track are left for a release that
    does.

    ``apply`` runs the application of each decoded chunk (validator, transforms, import)
    and returns its result: a node runs this function in a worker thread, so that the
    store's I/O (network, for object storage) never blocks its event loop, and passes an
    ``apply`` that runs each chunk's application on the loop, under its lock.
    """
    restored: dict[str, ImportResult] = {}
    for info in store.pending(cluster):
        target = tracked.get(info.namespace)
        if target is None:
            logger.info("snapshot %s is for untracked %r: left in place", info.path, info.namespace)
            continue
        try:
            claim = store.claim(info)
        except SnapshotCorrupt as exc:
            logger.warning("snapshot %s not restored: %s", info.path, exc)
            store.quarantine(info, str(exc))
            continue
        except SnapshotError as exc:
            logger.warning("snapshot %s not restored, left in place: %s", info.path, exc)
            continue
        if claim is None:
            continue
        with claim:
            result = _restore_claimed(claim, target, transforms, codec, wall_clock, apply)
        if result is None:
            continue
        previous = restored.get(info.namespace)
        restored[info.namespace] = result if previous is None else previous + result
    return restored


def _restore_claimed(
    claim: SnapshotClaim,
    target: Tracked,
    transforms: Transforms,
    codec: Codec,
    wall_clock: Callable[[], float],
    apply: Callable[[Callable[[], ImportResult]], ImportResult],
) -> ImportResult | None:
    # Ends the claim by removing or quarantining the file; None when nothing was applied.
    info = claim.info
    if info.kind != target.adapter.kind:
        claim.quarantine(
            f"holds {info.kind!r} state, {info.namespace!r} is {target.adapter.kind!r}"
        )
        return None
    try:
        chain = transforms.path(info.namespace, info.version, target.version)
    except NoTransformPath as exc:
        claim.quarantine(str(exc))
        return None
    age = max(0.0, wall_clock() - info.created_at)
    result = ImportResult()
    try:
        # Every chunk authenticated and decoded before the first is applied: a file that
        # fails half way must change nothing.
        for _ in decoded_chunks(claim, codec):
            pass
        for records in decoded_chunks(claim, codec):

            def one_chunk(records: list[Record] = records) -> ImportResult:
                admitted, dropped = admit(target, chain, records)
                return ImportResult(dropped=dropped) + import_guarded(target, admitted, age=age)

            result = result + apply(one_chunk)
    except (SnapshotCorrupt, RecordDecodeError) as exc:
        logger.warning("snapshot %s not restored: %s", info.path, exc)
        claim.quarantine(str(exc))
        return None
    except SnapshotError as exc:
        # The store failed (a bucket out of reach, a claim lost), not the snapshot: it
        # stays for the next start.
        logger.warning("snapshot %s not restored, left in place: %s", info.path, exc)
        return None
    claim.remove()
    logger.info(
        "restored %d of %d records of %r from a snapshot made %.1f s ago by %s",
        result.applied,
        result.total,
        info.namespace,
        age,
        info.node,
    )
    return result
