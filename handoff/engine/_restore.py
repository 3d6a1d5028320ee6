"""Restoring snapshots at start: through the same codec, transforms and adapters as a
live handoff, and never crashing on a bad file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from handoff._adapter import ImportResult
from handoff._codec import Codec
from handoff._errors import NoTransformPath, RecordDecodeError, SnapshotError
from handoff.engine._intake import intake
from handoff.engine._tracked import Tracked
from handoff.snapshot import SnapshotStore
from handoff.transforms import Transforms

__all__ = ("restore_snapshots",)

logger = logging.getLogger("handoff.snapshot")


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
    namespace. So is one whose chunk is past the codec's bounds (a planted hash flood or
    decode bomb, refused within milliseconds): nothing of that chunk is applied, the chunks
    before it are. The namespace's validator rejects records as on a live handoff.
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
            for payload, count in store.read(info):
                records, dropped = intake(codec, target, chain, payload, count)
                result = result + ImportResult(dropped=dropped)
                result = result + target.adapter.import_records(records, age=age)
        except (SnapshotError, RecordDecodeError) as exc:
            # Verified before anything was applied, so a corrupt file changed nothing.
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
