"""Restoring snapshots at start: through the same codec, transforms and adapters as a
live handoff, and never crashing on a bad file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from handoff._adapter import ImportResult, Record
from handoff._codec import Codec
from handoff._errors import NoTransformPath, RecordDecodeError, SnapshotError
from handoff.engine._intake import admit
from handoff.engine._tracked import Tracked
from handoff.snapshot import SnapshotInfo, SnapshotStore
from handoff.transforms import Transforms

__all__ = ("decoded_chunks", "restore_snapshots")

logger = logging.getLogger("handoff.snapshot")


def decoded_chunks(
    store: SnapshotStore, info: SnapshotInfo, codec: Codec
) -> Iterator[list[Record]]:
    """The records of ``info``, one decoded chunk at a time.

    The store authenticates the whole file before it yields its first chunk; decoding (and
    its bounds) happens here, one chunk in memory at a time. :func:`restore_snapshots` walks
    this twice, a checking pass and an applying pass, so that a chunk that cannot be decoded
    stops the restore before anything of the file was applied.
    """
    for payload, count in store.read(info):
        yield codec.decode_records(payload, max_records=count)


def restore_snapshots(
    store: SnapshotStore,
    *,
    cluster: str,
    tracked: Mapping[str, Tracked],
    transforms: Transforms,
    codec: Codec,
    wall_clock: Callable[[], float] = time.time,
) -> dict[str, ImportResult]:
    """Apply every waiting snapshot of a tracked namespace, then remove it.

    A snapshot that is corrupt, truncated, of another kind or of a version this release
    cannot convert is moved aside with the reason and logged; the node starts cold for that
    namespace. So is one with a chunk past the codec's bounds (a planted hash flood or
    decode bomb, refused within a second per MB): every chunk is decoded before any is
    applied, so nothing of it is. The namespace's validator rejects records as on a live
    handoff.
    Snapshots of namespaces this node does not track are left for a release that
    does.
    """
    restored: dict[str, ImportResult] = {}
    for info in store.pending(cluster):
        target = tracked.get(info.namespace)
        if target is None:
            logger.info("snapshot %s is for untracked %r: left in place", info.path, info.namespace)
            continue
        if info.kind != target.adapter.kind:
            store.quarantine(
                info, f"holds {info.kind!r} state, {info.namespace!r} is {target.adapter.kind!r}"
            )
            continue
        try:
            chain = transforms.path(info.namespace, info.version, target.version)
        except NoTransformPath as exc:
            store.quarantine(info, str(exc))
            continue
        age = max(0.0, wall_clock() - info.created_at)
        result = ImportResult()
        try:
            # Every chunk authenticated and decoded before the first is applied: a file that
            # fails half way must change nothing.
            for _ in decoded_chunks(store, info, codec):
                pass
            for records in decoded_chunks(store, info, codec):
                records, dropped = admit(target, chain, records)
                result = result + ImportResult(dropped=dropped)
                result = result + target.adapter.import_records(records, age=age)
        except (SnapshotError, RecordDecodeError) as exc:
            logger.warning("snapshot %s not restored: %s", info.path, exc)
            store.quarantine(info, str(exc))
            continue
        store.remove(info)
        previous = restored.get(info.namespace)
        restored[info.namespace] = result if previous is None else previous + result
        logger.info(
            "restored %d of %d records of %r from a snapshot made %.1f s ago by %s",
            result.applied,
            result.total,
            info.namespace,
            age,
            info.node,
        )
    return restored
