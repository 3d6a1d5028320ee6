"""Drain time with and without a pre-copy, the old node's serving latency during the copy,
and what change tracking costs a cache's reads.

Prints one JSON object. Two node processes on loopback (``benchmarks/drain_throughput.py``'s
harness): the old node holds a full ``TTLCache`` of ``--entries`` entries (100-byte values,
the same as the drain benchmark's), the new node an empty one. In the same run:

- ``full_drain``: seconds of ``old.drain()`` without pre-copy (everything crosses): what
  SIGTERM costs today;
- ``precopy``: seconds from node-up to the pre-copy's end (the old node serving meanwhile);
- ``delta_drain``: seconds of ``old.drain()`` after the pre-copy and ``--changed`` (a share)
  of the keys written again: only the delta crosses (SIGTERM to done);
- ``delta_over_full`` = ``delta_drain / full_drain`` (the issue's target: ``delta_drain``
  at most 0.3 s for a million entries with 1 % changed). By default the changes are made
  all at once just before the drain (the live stream has no time to send them: the
  drain's delta carries them all); with ``--write-seconds S`` they are spread over ``S``
  seconds while the old node serves, and the live stream sends them as they happen, so
  the drain's delta (``delta_records``) is what changed in the last lag
  (``streamed``: records the live stream got acknowledged before the drain);
- ``serve_idle`` / ``serve_precopy``: the old node's serving latency, p50 / p99 / max in
  milliseconds, idle and while it pre-copies: a request due every millisecond on its
  event loop (one read of one of 1,000 hot keys each; each turn of the loop serves all
  that are due, as a server with many clients would), its latency from when it was due
  to when it was served, so that the time the loop spends on the copy between two turns
  shows; ``loop_busy_idle`` / ``loop_busy_precopy``: per turn of that loop, the CPU time
  its thread spent on other work since the turn before (the copy's share of a request's
  wait, without what the OS scheduler adds on a machine busy with other processes);
  ``--pace`` (bytes per second, ``HANDOFF_PRECOPY``'s number) throttles the copy;
- ``read_ns`` / ``read_tracked_ns``: nanoseconds per ``cache[key]`` hit on a ``TTLCache``
  before and after ``mark()`` (each read of an LRU-ordered cache is noted), best of
  ``--rounds``; ``read_ratio`` = tracked / plain.

Usage: ``python benchmarks/precopy_delta.py [--entries 1000000] [--changed 0.01]
[--pace BYTES_PER_S] [--write-seconds 0] [--gc-freeze] [--repeat 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.drain_throughput import COOKIE, TTL, _filled, _finish, _recv, _start

SERVE_INTERVAL = 0.001
HOT_KEYS = 1000  # the requests read these (each read of an LRU-ordered cache is a change)
IDLE_SECONDS = 2.0


def _node(name: str, host: str, discovery: str, precopy: float | bool) -> Any:
    import handoff

    return handoff.Node(
        "bench",
        cookie=COOKIE,
        name=name,
        release=name,
        bind=f"{host}:0",
        discovery=discovery,
        poll_interval=0.1,
        drain_timeout=300,
        warmup_timeout=600,
        precopy=precopy,
        handle_signals=False,
        control_socket="none",
        environ={},
    )


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 3)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 3),
            "n": len(ordered)}  # fmt: skip


def _copying(node: Any) -> bool:
    precopies = node.stats()["precopy"]
    return not precopies or precopies[0]["state"] in ("waiting", "copying")


def _receiver(n: int, sender_address: str, out: Connection) -> None:
    import anyio
    from cachetools import TTLCache

    async def main() -> None:
        cache: Any = TTLCache(maxsize=n, ttl=TTL)
        node = _node("v2", "127.0.0.3", f"static:{sender_address}", False)
        node.track("cache", cache)
        await node.start()
        try:
            await anyio.to_thread.run_sync(out.recv)  # told the drain is done
            out.send({"entries": len(cache)})
            await anyio.to_thread.run_sync(out.recv)  # told to stop
        finally:
            await node.stop()

    anyio.run(main)


def _sender(
    n: int,
    precopy: bool,
    pace: float,
    changed: float,
    freeze: bool,
    write_seconds: float,
    out: Connection,
) -> None:
    import gc

    import anyio

    async def main() -> None:
        cache = _filled(n)
        if freeze:
            gc.freeze()  # the cache's objects out of the collector's sight
        keys = list(cache)
        setting: float | bool = (pace or True) if precopy else False
        node = _node("v1", "127.0.0.2", "none", setting)
        node.track("cache", cache)
        joined = anyio.Event()
        node.on_node_up(lambda peer: joined.set())
        samples: list[float] = []
        busy: list[float] = []
        serving = True

        async def serve() -> None:
            # A request due every SERVE_INTERVAL (from many clients: each turn of the loop
            # serves all that are due); its latency counts from when it was due.
            index = 0
            due = time.perf_counter() + SERVE_INTERVAL
            turned = time.thread_time()
            while serving:
                await anyio.sleep(max(0.0, due - time.perf_counter()))
                # CPU time this thread spent on other work since the last turn: what the
                # loop made the requests wait, whatever the OS scheduler added on a
                # machine busy with other processes.
                busy.append(time.thread_time() - turned)
                while due <= time.perf_counter():
                    cache.get(keys[(index * 7919) % HOT_KEYS])
                    index += 1
                    samples.append(time.perf_counter() - due)
                    due += SERVE_INTERVAL
                turned = time.thread_time()

        async with node, anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await anyio.sleep(IDLE_SECONDS)
            idle = _percentiles(samples)
            idle_busy = _percentiles(busy)
            samples.clear()
            busy.clear()
            out.send({"address": node.address})
            with anyio.fail_after(60):
                await joined.wait()
            joined_at = time.perf_counter()
            result: dict[str, Any] = {"serve_idle": idle, "loop_busy_idle": idle_busy}
            if precopy:
                with anyio.fail_after(600):
                    while _copying(node):  # noqa: ASYNC110 (no event for this)
                        await anyio.sleep(0.01)
                result["precopy"] = time.perf_counter() - joined_at
                result["precopy_state"] = node.stats()["precopy"][0]["state"]
                result["serve_precopy"] = _percentiles(samples)
                result["loop_busy_precopy"] = _percentiles(busy)
            step = max(1, round(1 / changed))
            written = range(0, n, step)
            if write_seconds > 0:
                # Spread over write_seconds while serving: the live stream sends them.
                per_turn = max(1, round(len(written) * 0.01 / write_seconds))
                for at in range(0, len(written), per_turn):
                    for i in written[at : at + per_turn]:
                        cache[f"key:{i}"] = "w" * 100
                    await anyio.sleep(0.01)
                await anyio.sleep(0.05)  # (the last batch's round trip)
            else:
                for i in written:
                    cache[f"key:{i}"] = "w" * 100
            serving = False
            if precopy:
                result["streamed"] = node.stats()["precopy"][0]["streamed"]
            started = time.perf_counter()
            report = await node.drain()
            result["drain"] = time.perf_counter() - started
            result["records"] = report.records
            result["ok"] = report.ok
            out.send(result)
            await anyio.to_thread.run_sync(out.recv)  # told to stop

    anyio.run(main)


def _deploy(
    n: int, precopy: bool, pace: float, changed: float, freeze: bool, write_seconds: float
) -> dict[str, Any]:
    sender, sconn = _start(_sender, n, precopy, pace, changed, freeze, write_seconds)
    address = _recv(sconn, sender)["address"]
    receiver, rconn = _start(_receiver, n, address)
    result = _recv(sconn, sender)
    rconn.send("drained")
    result["received"] = _recv(rconn, receiver)["entries"]
    rconn.send("stop")
    sconn.send("stop")
    _finish(sender, receiver)
    return result


def _read_ns(cache: Any, keys: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for key in keys:
            cache[key]
        best = min(best, (time.perf_counter_ns() - started) / len(keys))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--pace", type=float, default=0.0, help="bytes/s (0: unpaced)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--write-seconds",
        type=float,
        default=0.0,
        help="spread the changes over this many seconds while serving (0: all at once)",
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() the old node's filled cache"
    )
    args = parser.parse_args()
    from handoff.adapters.cachetools import TTLCacheAdapter

    runs = []
    for index in range(args.repeat):
        print(f"round {index + 1}/{args.repeat}...", file=sys.stderr, flush=True)
        full = _deploy(
            args.entries, False, args.pace, args.changed, args.gc_freeze, args.write_seconds
        )
        pre = _deploy(
            args.entries, True, args.pace, args.changed, args.gc_freeze, args.write_seconds
        )
        runs.append((full, pre))
    cache = _filled(min(args.entries, 100_000))
    keys = list(cache)[:50_000]
    plain = _read_ns(cache, keys, args.rounds)
    TTLCacheAdapter(cache).mark()
    tracked = _read_ns(cache, keys, args.rounds)
    full_drain = statistics.median(full["drain"] for full, _ in runs)
    delta_drain = statistics.median(pre["drain"] for _, pre in runs)
    result: dict[str, Any] = {
        "benchmark": "precopy_delta",
        "entries": args.entries,
        "changed": args.changed,
        "pace": args.pace or None,
        "gc_freeze": args.gc_freeze,
        "write_seconds": args.write_seconds,
        "full_drain": round(full_drain, 4),
        "delta_drain": round(delta_drain, 4),
        "delta_over_full": round(delta_drain / full_drain, 4),
        "target_delta_drain": "<= 0.3 s at 1,000,000 entries, 1 % changed",
        "runs": [
            {
                "full_drain": round(full["drain"], 4),
                "full_records": full["records"],
                "delta_drain": round(pre["drain"], 4),
                "delta_records": pre["records"],
                "streamed": pre.get("streamed"),
                "precopy": round(pre["precopy"], 4),
                "precopy_state": pre["precopy_state"],
                "serve_idle": pre["serve_idle"],
                "serve_precopy": pre["serve_precopy"],
                "loop_busy_idle": pre["loop_busy_idle"],
                "loop_busy_precopy": pre["loop_busy_precopy"],
                "received": [full["received"], pre["received"]],
                "ok": bool(full["ok"] and pre["ok"]),
            }
            for full, pre in runs
        ],
        "read_ns": round(plain, 1),
        "read_tracked_ns": round(tracked, 1),
        "read_ratio": round(tracked / plain, 3),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
