"""Drain time with and without a pre-copy, and what change tracking costs a cache's reads.

Prints one JSON object. In one process, on loopback, two nodes (the old one holding a full
``TTLCache`` of ``--entries`` entries of 100-byte values, the new one an empty one):

- ``full_drain``: seconds of ``old.drain()`` without pre-copy (everything crosses);
- ``precopy``: seconds from the new node's arrival to its warm-up by pre-copy (the old
  node serves meanwhile; here it is idle);
- ``delta_drain``: seconds of ``old.drain()`` after a pre-copy and ``--changed`` (a
  share) of the keys written again: only the delta crosses;
- ``delta_over_full`` = ``delta_drain / full_drain`` (the issue's target: 0.3 s for a
  million entries with 1 % changed);
- ``read_ns`` / ``read_tracked_ns``: nanoseconds per ``cache[key]`` hit on a ``TTLCache``
  before and after ``mark()`` (each read of an LRU-ordered cache is noted), best of
  ``--rounds``; ``read_ratio`` = tracked / plain.

The two drains run in the same process, one after the other, on fresh node pairs.
Usage: ``python benchmarks/precopy_delta.py [--entries 100000] [--changed 0.01]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import cachetools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handoff import Node
from handoff.adapters.cachetools import TTLCacheAdapter

COOKIE = "benchmark-cookie-benchmark-cookie"


def _node(name: str, host: str, release: str, peers: list[Node], *, precopy: bool) -> Node:
    discovery = "static:" + ",".join(p.address for p in peers) if peers else "none"
    return Node(
        "bench",
        name=name,
        release=release,
        bind=f"{host}:0",
        discovery=discovery,
        cookie=COOKIE,
        drain_timeout=300.0,
        warmup_timeout=300.0,
        poll_interval=0.2,
        handle_signals=False,
        control_socket="none",
        precopy=precopy,
    )


def _filled(entries: int) -> cachetools.TTLCache[str, bytes]:
    cache: cachetools.TTLCache[str, bytes] = cachetools.TTLCache(maxsize=entries, ttl=3600)
    for i in range(entries):
        cache[f"key:{i:08d}"] = b"v" * 100
    return cache


async def _deploy(entries: int, changed: float, *, precopy: bool) -> dict[str, float]:
    cache = _filled(entries)
    old = _node("old", "127.0.0.2", "v1", [], precopy=precopy)
    old.track("cache", cache)
    async with old:
        new = _node("new", "127.0.0.3", "v2", [old], precopy=False)
        new.track("cache", cachetools.TTLCache(maxsize=entries, ttl=3600))
        arrived = time.perf_counter()
        async with new:
            result: dict[str, float] = {}
            if precopy:
                await new.wait_warm()
                result["precopy"] = time.perf_counter() - arrived
                step = max(1, round(1 / changed))
                for i in range(0, entries, step):
                    cache[f"key:{i:08d}"] = b"w" * 100
            else:
                while not old.peers():  # noqa: ASYNC110 (no event for this)
                    await anyio.sleep(0.01)
            started = time.perf_counter()
            report = await old.drain()
            result["drain"] = time.perf_counter() - started
            result["records"] = report.records
            result["ok"] = float(report.ok)
    return result


def _read_ns(cache: cachetools.TTLCache[str, bytes], keys: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for key in keys:
            cache[key]
        best = min(best, (time.perf_counter_ns() - started) / len(keys))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    full = anyio.run(lambda: _deploy(args.entries, args.changed, precopy=False))
    pre = anyio.run(lambda: _deploy(args.entries, args.changed, precopy=True))
    cache = _filled(min(args.entries, 100_000))
    keys = list(cache)[:50_000]
    plain = _read_ns(cache, keys, args.rounds)
    TTLCacheAdapter(cache).mark()
    tracked = _read_ns(cache, keys, args.rounds)
    result: dict[str, Any] = {
        "entries": args.entries,
        "changed": args.changed,
        "full_drain": round(full["drain"], 4),
        "full_records": full["records"],
        "precopy": round(pre["precopy"], 4),
        "delta_drain": round(pre["drain"], 4),
        "delta_records": pre["records"],
        "delta_over_full": round(pre["drain"] / full["drain"], 4),
        "ok": bool(full["ok"] and pre["ok"]),
        "read_ns": round(plain, 1),
        "read_tracked_ns": round(tracked, 1),
        "read_ratio": round(tracked / plain, 3),
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
