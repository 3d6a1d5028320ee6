"""Counters at a deploy: handoff time of 1M counters, and metadata after 1,000 deploys.

Prints one JSON object. Measured in the same run (the machine is shared and noisy: the
ratios are what to read):

- ``handoff``: ``node.drain()`` of a ``handoff.Counters`` of N keys (``key:{i}``, amounts
  1..1000) from one node process to another on 127.0.0.2/127.0.0.3, from the start of the
  drain until every chunk is acknowledged (the receiver has added everything); the
  receiver's total is checked against the sender's;
- ``ttlcache_int`` and ``ttlcache_100b``: the same drain of a ``cachetools.TTLCache`` of N
  entries, with int values (the counters' payload) and with 100-byte string values (as
  ``benchmarks/drain_throughput.py``);
- ``counters_over_ttlcache_int`` / ``counters_over_ttlcache_100b``: the time ratios;
- ``metadata``: a ``Counters`` of ``--keys`` keys handed from node to node ``--deploys``
  times (1,000 by default) **by export and import through the codec** (the real
  ``CountersAdapter`` export, which takes, ``Codec.encode_records`` / ``decode_records``,
  and the next node's import, which adds; increments on every node in between), windowed
  (``ttl``) and not. Reported after the first and the last deploy: the bytes of the
  per-key storage per counter (the ``_values`` and ``_deadlines`` dicts with their int
  and float objects; the keys are the user's), the per-key entries, and the wire bytes
  per record. The total is checked to stay exact.

Usage: ``python benchmarks/counters_handoff.py [--size 1000000] [--repeat 1]
[--keys 10000] [--deploys 1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COOKIE = "Qm7vR2xK9pLwT4nZ8cYb3HdF6sJ1gA5e"  # generated: a typed one draws a warning
TTL = 3600.0
KINDS = ("counters", "ttlcache_int", "ttlcache_100b")


def _value(i: int) -> str:
    return f"{i:010d}".ljust(100, "v")


def _state(kind: str, n: int, capacity: int = 0) -> Any:
    from cachetools import TTLCache

    import handoff

    if kind == "counters":
        counters = handoff.Counters()
        for i in range(n):
            counters.incr(f"key:{i}", i % 1000 + 1)
        return counters
    cache: Any = TTLCache(maxsize=max(n, capacity, 1), ttl=TTL)
    for i in range(n):
        cache[f"key:{i}"] = i % 1000 + 1 if kind == "ttlcache_int" else _value(i)
    return cache


def _total(obj: Any) -> int:
    import handoff

    if isinstance(obj, handoff.Counters):
        return obj.total()
    return len(obj)


def _node(name: str, host: str, discovery: str) -> Any:
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
        environ={},
    )


def _receiver(kind: str, n: int, out: Connection) -> None:
    import anyio

    async def main() -> None:
        obj = _state(kind, 0, capacity=n)
        node = _node("v2", "127.0.0.3", "none")
        node.track("state", obj)
        # start/stop rather than ``async with``: leaving would drain this node in turn.
        await node.start()
        try:
            out.send({"address": node.address})
            await node.wait_warm()
            out.send({"total": _total(obj), "keys": len(obj)})
            await anyio.to_thread.run_sync(out.recv)  # told to stop
        finally:
            await node.stop()

    anyio.run(main)


def _sender(kind: str, n: int, receiver_address: str, out: Connection) -> None:
    import anyio

    async def main() -> None:
        obj = _state(kind, n)
        total = _total(obj)
        node = _node("v1", "127.0.0.2", f"static:{receiver_address}")
        node.track("state", obj)
        joined = anyio.Event()
        node.on_node_up(lambda peer: joined.set())
        await node.start()
        try:
            with anyio.fail_after(30):
                await joined.wait()
            started = time.perf_counter()
            report = await node.drain()
            seconds = time.perf_counter() - started
        finally:
            await node.stop()
        out.send(
            {
                "seconds": seconds,
                "total": total,
                "acknowledged": report.acknowledged,
                "ok": report.ok,
                "bytes": report.namespaces["state"].bytes,
            }
        )

    anyio.run(main)


# The two-process harness of the drain benchmark (spawned children, a pipe each, bounded
# waits): one place for it. This script runs from benchmarks/, so it imports as a module.
from drain_throughput import _finish, _recv, _start  # noqa: E402


def handoff_time(kind: str, n: int) -> dict[str, Any]:
    receiver, rconn = _start(_receiver, kind, n)
    address = _recv(rconn, receiver)["address"]
    sender, sconn = _start(_sender, kind, n, address)
    sent = _recv(sconn, sender)
    received = _recv(rconn, receiver)
    rconn.send("stop")
    _finish(sender, receiver)
    if sent["acknowledged"] != n or not sent["ok"] or received["total"] != sent["total"]:
        raise AssertionError(f"incomplete handoff of {kind}: {sent}, {received}")
    return {"seconds": sent["seconds"], "wire_bytes": sent["bytes"]}


# -- metadata after many deploys (export and import through the codec) ------------------------


def _storage_bytes(counters: Any) -> int:
    values, deadlines = counters._values, counters._deadlines
    return (
        sys.getsizeof(values)
        + sys.getsizeof(deadlines)
        + sum(sys.getsizeof(v) for v in values.values())
        + sum(sys.getsizeof(d) for d in deadlines.values())
    )


def metadata(keys: int, deploys: int, ttl: float | None) -> dict[str, Any]:
    import handoff
    from handoff._codec import Codec
    from handoff.adapters.counters import CountersAdapter

    codec = Codec()
    rng = random.Random(1)
    clock = [0.0]
    counted = 0
    node = handoff.Counters(ttl=ttl, timer=lambda: clock[0])
    for i in range(keys):
        node.incr(f"key:{i}", 1)
        counted += 1
    samples: dict[str, Any] = {}
    started = time.perf_counter()
    for deploy in range(1, deploys + 1):
        records = list(CountersAdapter(node).export())
        payload, rejected = codec.encode_records(records)
        assert not rejected
        clock[0] += 1.0  # a second per deploy: windows travel as remaining time
        successor = handoff.Counters(ttl=ttl, timer=lambda: clock[0])
        result = CountersAdapter(successor).import_records(
            codec.decode_records(payload, max_records=len(records)), age=0.001
        )
        assert result.applied == len(records), result
        assert len(node._values) == 0, "the export takes everything"
        node = successor
        for _ in range(keys // 10):  # increments between deploys
            node.incr(f"key:{rng.randrange(keys)}", 1)
            counted += 1
        if deploy in (1, deploys):
            samples[str(deploy)] = {
                "storage_bytes_per_counter": round(_storage_bytes(node) / len(node._values), 2),
                "entries_per_counter": (len(node._values) + len(node._deadlines))
                / len(node._values),
                "wire_bytes_per_record": round(len(payload) / len(records), 2),
            }
    assert node.total() == counted, (node.total(), counted)
    return {
        "how": "export (takes) -> Codec.encode_records -> decode_records -> import (adds)",
        "keys": keys,
        "deploys": deploys,
        "ttl": ttl,
        "exact": True,
        "seconds": round(time.perf_counter() - started, 3),
        "after_deploy": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--deploys", type=int, default=1_000)
    args = parser.parse_args(argv)
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for index in range(args.repeat):
        for kind in KINDS:  # interleaved, round by round
            print(f"{kind} N={args.size} round {index + 1}...", file=sys.stderr, flush=True)
            rounds[kind].append(handoff_time(kind, args.size))
    handoff: dict[str, Any] = {}
    for kind in KINDS:
        handoff[kind] = {
            "seconds": round(statistics.median(r["seconds"] for r in rounds[kind]), 4),
            "wire_bytes": rounds[kind][0]["wire_bytes"],
        }
    for kind in KINDS[1:]:
        handoff[f"counters_over_{kind}"] = round(
            handoff["counters"]["seconds"] / handoff[kind]["seconds"], 4
        )
    print("metadata...", file=sys.stderr, flush=True)
    meta = {
        "plain": metadata(args.keys, args.deploys, None),
        "windowed": metadata(args.keys, args.deploys, 60.0 * 60 * 24 * 30),
    }
    print(
        json.dumps(
            {
                "benchmark": "counters_handoff",
                "size": args.size,
                "repeat": args.repeat,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "handoff": handoff,
                "metadata": meta,
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
