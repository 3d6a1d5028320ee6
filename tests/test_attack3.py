"""Attack 3 on the newest engine changes (decode in a thread, stall rule, SCAN_PAUSE,
snapshot claim): each finding is a test here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests._helpers import handoff_node as node

pytestmark = pytest.mark.anyio

LARGE = 300_000


async def _catch_up_alone(cache: dict[str, Any], **kwargs: Any) -> tuple[Any, float, float]:
    """Drain a lone node by hand, write one key, stop it; return the catch-up report, the
    longest stall of the event loop during the stop, and how long the stop took."""
    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        last = time.monotonic()
        while True:
            await anyio.sleep(0.005)
            now = time.monotonic()
            longest, last = max(longest, now - last), now

    old = node("old", "127.0.0.2", drain_timeout=5.0, **kwargs)
    old.track("cache", cache)
    async with anyio.create_task_group() as ticker:
        async with old:
            await old.drain()
            cache["late"] = "written after the drain"
            ticker.start_soon(tick)
            stopping = time.monotonic()
        took = time.monotonic() - stopping
        ticker.cancel_scope.cancel()
    return old.catch_up_report, longest, took


async def test_a_catch_up_with_no_successor_keeps_the_event_loop_turning() -> None:
    # SCAN_PAUSE is filtered in _counting, so with nobody to send to (and no store) the
    # catch-up counts changed_records in _count_rest in one synchronous pull: every pause
    # is skipped, and the whole cache is scanned with the loop stopped.
    cache: dict[str, Any] = {f"k{i}": i for i in range(LARGE)}
    report, longest, _ = await _catch_up_alone(cache)
    assert report is not None
    assert report.namespaces["cache"].records == 1
    assert longest < 0.9, f"the event loop stood still for {longest:.2f} s"


async def test_a_catch_up_into_the_snapshot_store_keeps_the_event_loop_turning(
    tmp_path: Path,
) -> None:
    cache: dict[str, Any] = {f"k{i}": i for i in range(LARGE)}
    report, longest, _ = await _catch_up_alone(cache, snapshot_dir=tmp_path)
    assert report is not None
    assert report.namespaces["cache"].snapshotted == 1
    assert longest < 0.9, f"the event loop stood still for {longest:.2f} s"
