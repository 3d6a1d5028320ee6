"""Actors: migration pause under load, and messages per second through ``call``.

Prints one JSON object. Every node is a process of its own on 127.0.0.x; in the same run:

- ``migration``: for actor state of 1 KiB and of 64 KiB, node ``old`` holds ``--keys``
  actors (keys whose placement is ``old``), a caller-only node sends them ~``--rate``
  messages per second in all through ``call`` (sequential callers, each message carrying
  the sender's ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process of a
  Linux machine), and ``old`` drains: every actor moves to ``new`` while the messages keep
  coming. The pause of one actor is from its freeze to the first message the new owner
  handles: from the moment ``old`` exported its state (``state()`` is called right after
  the freeze) to the start of the first message handled by the new activation; when that
  message was sent after the export, from its sending instead (the pause is what a message
  waited because of the move, not the gap between two messages). p50 / p99 / max over
  every actor, pooled over ``--repeat`` rounds (target: p99 < 50 ms). Also the latency of
  the calls answered during the drain, and the drain's own duration.
- ``throughput``: messages per second through ``registry.call`` with ``--callers``
  concurrent callers, the actors on the calling node (``one_node``) and on another node
  (``two_nodes``), each against a baseline measured in the same run: the same handler
  awaited directly (a local method call) for ``one_node``, and a plain asyncio TCP round
  trip (length-prefixed request and reply, one connection per caller) between two
  processes for ``two_nodes``. ``*_over_call`` = baseline rate / call rate; the median of
  each figure over the rounds.

The machine is shared and noisy: read the ratios and percentiles, not the absolute numbers.
Usage: ``python benchmarks/actors.py [--keys 100] [--rate 1000] [--seconds 2] [--repeat 1]
[--migration-only]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import struct
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

COOKIE = "Qm7vR2xK9pLwT4nZ8cYb3HdF6sJ1gA5e"  # generated: a typed one draws a warning
NAMESPACE = "bench"
SIZES = {"1KiB": 1024, "64KiB": 64 * 1024}
HOSTS = {"old": "127.0.0.2", "new": "127.0.0.3", "client": "127.0.0.4"}


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
        drain_timeout=60,
        warmup_timeout=0.1,
        control_socket="none",
        environ={},
    )


class _Log:
    """What the actors of one process saw: exports and first messages per key."""

    def __init__(self) -> None:
        self.exports: dict[str, float] = {}
        self.first: dict[str, tuple[float, float]] = {}
        self.activated: dict[str, float] = {}


def _actor_class(size: int, log: _Log) -> Any:
    class Bench:
        def __init__(self, key: str, state: Any) -> None:
            self.key = key
            self.moved_in = state is not None
            if self.moved_in:
                log.activated[key] = time.monotonic()
            self.data: dict[str, Any] = state if state is not None else {"pad": b"s" * size, "n": 0}

        async def handle(self, message: Any) -> Any:
            if self.moved_in and self.key not in log.first:
                log.first[self.key] = (time.monotonic(), message["t"])
            self.data["n"] += 1
            return self.data["n"]

        def state(self) -> Any:
            log.exports[self.key] = time.monotonic()
            return self.data

    return Bench


async def _commands(conn: Connection) -> Any:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(conn.recv)


def _server(name: str, discovery: str, size: int, out: Connection) -> None:
    import anyio
    import anyio.lowlevel

    import handoff

    async def main() -> None:
        log = _Log()
        node = _node(name, HOSTS[name], discovery)
        registry = handoff.ActorRegistry(_actor_class(size, log), timeout=10)
        node.track(NAMESPACE, registry)
        await node.start()
        out.send({"address": node.address})
        try:
            while True:
                command = await _commands(out)
                if command == "drain":
                    started = time.monotonic()
                    report = await node.drain()
                    ns = report.namespaces[NAMESPACE]
                    out.send(
                        {
                            "started": started,
                            "seconds": time.monotonic() - started,
                            "moved": ns.acknowledged,
                            "records": ns.records,
                        }
                    )
                elif command == "log":
                    out.send(
                        {"exports": log.exports, "first": log.first, "activated": log.activated}
                    )
                elif command == "held":
                    out.send({"held": len(registry.local_keys())})
                else:
                    break
        finally:
            await node.stop()

    anyio.run(main)


def _client(discovery: str, peers: int, out: Connection) -> None:
    """A caller-only node (it drained at start: never a placement) that runs loads."""
    import anyio
    import anyio.lowlevel

    import handoff

    async def main() -> None:
        node = _node("client", HOSTS["client"], discovery)
        registry = handoff.ActorRegistry(_actor_class(0, _Log()), timeout=10)
        node.track(NAMESPACE, registry)
        joined: set[str] = set()
        node.on_node_up(lambda peer: joined.add(peer.name))
        await node.start()
        await node.drain()
        with anyio.fail_after(30):
            while len(joined) < peers:  # noqa: ASYNC110 - membership has no count event
                await anyio.sleep(0.02)
        out.send({"ready": True})
        try:
            while True:
                command = await _commands(out)
                if command[0] != "load":
                    break
                _, keys, rate, callers, seconds = command
                out.send(await _load(registry, keys, rate, callers, seconds))
        finally:
            await node.stop()

    anyio.run(main)


async def _load(
    registry: Any, keys: list[str], rate: float, callers: int, seconds: float
) -> dict[str, Any]:
    """``callers`` sequential callers, ``rate`` messages per second in all (0: as fast as
    they go), over ``keys``, for ``seconds``; every call's (sent, answered, outcome)."""
    import anyio
    import anyio.lowlevel

    rows: list[tuple[float, float, str]] = []
    period = callers / rate if rate else 0.0
    started = time.monotonic()
    end = started + seconds

    async def caller(index: int) -> None:
        count = 0
        while True:
            now = time.monotonic()
            if now >= end:
                return
            key = keys[(index + count * callers) % len(keys)]
            try:
                await registry.call(key, {"t": now}, timeout=10)
                outcome = "ok"
            except Exception as exc:
                outcome = type(exc).__name__
            rows.append((now, time.monotonic(), outcome))
            count += 1
            if period:
                delay = started + count * period + index * period / callers - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)

    async with anyio.create_task_group() as group:
        for index in range(callers):
            group.start_soon(caller, index)
    return {"rows": rows, "seconds": time.monotonic() - started}


# -- orchestration ---------------------------------------------------------------------------

# The two-process harness of the drain benchmark (spawned children, a pipe each, bounded
# waits): one place for it. This script runs from benchmarks/, so it imports as a module.
from drain_throughput import _recv, _start  # noqa: E402


def _finish(*pairs: tuple[Any, Connection]) -> None:
    """Stop the processes one after the other (a node stopping while another one still
    hands off to it would only add noise)."""
    for process, conn in pairs:
        with contextlib.suppress(OSError):
            conn.send("stop")
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(ordered),
        "p50_ms": round(at(0.50) * 1000, 2),
        "p99_ms": round(at(0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _keys_of_old(count: int) -> list[str]:
    """Keys whose placement among ``old`` and ``new`` is ``old`` (they move at its drain)."""
    from handoff._codec import Codec
    from handoff.engine._actors import place

    codec = Codec()
    keys: list[str] = []
    index = 0
    while len(keys) < count:
        key = f"actor:{index}"
        if place(codec.packb(key), ["old", "new"]) == "old":
            keys.append(key)
        index += 1
    return keys


def migration(size: int, keys: int, rate: float, callers: int) -> dict[str, Any]:
    """One drain of ``old`` under load: the pause of every actor that moved."""
    old = _start(_server, "old", "none", size)
    old_address = _recv(old[1], old[0])["address"]
    new = _start(_server, "new", f"static:{old_address}", size)
    new_address = _recv(new[1], new[0])["address"]
    client = _start(_client, f"static:{old_address},{new_address}", 2)
    try:
        _recv(client[1], client[0])
        names = _keys_of_old(keys)
        # Activate every actor on old, then load them while old drains.
        client[1].send(("load", names, 0, min(callers, keys), 0.3))
        _recv(client[1], client[0])
        load_seconds = 3.0
        client[1].send(("load", names, rate, callers, load_seconds))
        time.sleep(1.0)
        old[1].send("drain")
        drained = _recv(old[1], old[0])
        load = _recv(client[1], client[0], load_seconds + 60)
        old[1].send("log")
        exports = _recv(old[1], old[0])["exports"]
        new[1].send("log")
        seen = _recv(new[1], new[0])
        first, activated = seen["first"], seen["activated"]
        new[1].send("held")
        held = _recv(new[1], new[0])["held"]
    finally:
        _finish(client, old, new)
    pauses, raw, transfer, after = [], [], [], []
    for key in names:
        if key not in exports or key not in first:
            continue  # never exported or never received a message after the move
        handled, sent = first[key]
        raw.append(handled - exports[key])
        pauses.append(handled - max(exports[key], sent))
        if key in activated:
            # Where a pause goes: the move itself (export to activation on the new
            # owner), then the wait for a message (activation to the first one handled).
            transfer.append(activated[key] - exports[key])
            after.append(handled - max(activated[key], sent))
    window = (drained["started"], drained["started"] + drained["seconds"])
    rows = load["rows"]
    during = [answered - sent for sent, answered, _ in rows if window[0] <= sent <= window[1]]
    # The same calls before the drain began (the load's first second): what a message
    # waits anyway on this machine, the baseline of the pause in the same run.
    before = [answered - sent for sent, answered, _ in rows if answered < window[0]]
    failed = sum(1 for *_, outcome in rows if outcome != "ok")
    return {
        "pauses": pauses,
        "calls_before": before,
        "raw": raw,
        "pause": _percentiles(pauses),
        "export_to_first_handled": _percentiles(raw),
        "export_to_activation": _percentiles(transfer),
        "activation_to_first_handled": _percentiles(after),
        "call_latency_during_drain": _percentiles(during),
        "call_latency_before_drain": _percentiles(before),
        "drain_seconds": round(drained["seconds"], 4),
        "moved": drained["moved"],
        "held_by_new": held,
        "offered_rate": rate,
        "achieved_rate": round(len(rows) / load["seconds"], 1),
        "failed_calls": failed,
    }


# -- throughput ------------------------------------------------------------------------------


def _one_node(callers: int, seconds: float, out: Connection) -> None:
    import anyio
    import anyio.lowlevel

    import handoff

    async def main() -> None:
        log = _Log()
        bench = _actor_class(16, log)
        node = _node("solo", HOSTS["old"], "none")
        registry = handoff.ActorRegistry(bench, timeout=10)
        node.track(NAMESPACE, registry)
        await node.start()
        try:
            keys = [f"actor:{i}" for i in range(callers)]
            load = await _load(registry, keys, 0, callers, seconds)
            # Baseline: the same handlers awaited directly, as many callers.
            actors = [bench(key, None) for key in keys]
            count = 0
            end = time.monotonic() + seconds

            async def direct(actor: Any) -> None:
                nonlocal count
                while time.monotonic() < end:
                    await actor.handle({"t": time.monotonic()})
                    count += 1
                    await anyio.lowlevel.checkpoint()

            started = time.monotonic()
            async with anyio.create_task_group() as group:
                for actor in actors:
                    group.start_soon(direct, actor)
            direct_rate = count / (time.monotonic() - started)
        finally:
            await node.stop()
        ok = sum(1 for *_, outcome in load["rows"] if outcome == "ok")
        out.send({"call": ok / load["seconds"], "direct": direct_rate})

    anyio.run(main)


def _echo_server(out: Connection) -> None:
    import asyncio

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">I", header)[0])
                writer.write(header + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, HOSTS["new"], 0)
        out.send({"port": server.sockets[0].getsockname()[1]})
        await asyncio.get_running_loop().run_in_executor(None, out.recv)
        server.close()

    asyncio.run(main())


def _echo_client(port: int, callers: int, seconds: float, out: Connection) -> None:
    import asyncio

    async def main() -> None:
        count = 0
        end = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal count
            reader, writer = await asyncio.open_connection(HOSTS["new"], port)
            body = b"\x81\xa1t\xcb" + struct.pack(">d", time.monotonic())  # {"t": float}
            while time.monotonic() < end:
                writer.write(struct.pack(">I", len(body)) + body)
                await writer.drain()
                header = await reader.readexactly(4)
                await reader.readexactly(struct.unpack(">I", header)[0])
                count += 1
            writer.close()

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        out.send({"rate": count / (time.monotonic() - started)})

    asyncio.run(main())


def throughput(callers: int, seconds: float) -> dict[str, Any]:
    solo = _start(_one_node, callers, seconds)
    one = _recv(solo[1], solo[0])
    _finish(solo)

    server = _start(_server, "new", "none", 16)
    address = _recv(server[1], server[0])["address"]
    client = _start(_client, f"static:{address}", 1)
    try:
        _recv(client[1], client[0])
        keys = [f"actor:{i}" for i in range(callers)]
        client[1].send(("load", keys, 0, callers, 0.3))  # activations out of the way
        _recv(client[1], client[0])
        client[1].send(("load", keys, 0, callers, seconds))
        load = _recv(client[1], client[0], seconds + 60)
    finally:
        _finish(client, server)
    two = sum(1 for *_, outcome in load["rows"] if outcome == "ok") / load["seconds"]

    echo = _start(_echo_server)
    port = _recv(echo[1], echo[0])["port"]
    echo_client = _start(_echo_client, port, callers, seconds)
    echo_rate = _recv(echo_client[1], echo_client[0], seconds + 60)["rate"]
    _finish(echo_client, echo)
    return {
        "callers": callers,
        "one_node_call_per_s": round(one["call"], 1),
        "one_node_direct_per_s": round(one["direct"], 1),
        "one_node_direct_over_call": round(one["direct"] / one["call"], 2),
        "two_nodes_call_per_s": round(two, 1),
        "two_nodes_asyncio_round_trip_per_s": round(echo_rate, 1),
        "two_nodes_asyncio_over_call": round(echo_rate / two, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100, help="actors that migrate")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s to them")
    parser.add_argument("--senders", type=int, default=20, help="sequential callers")
    parser.add_argument("--callers", type=int, default=32, help="for throughput")
    parser.add_argument("--seconds", type=float, default=2.0, help="throughput run")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--migration-only", action="store_true", help="skip the throughput measurements"
    )
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"migration": {}, "throughput": {}}
    for label, size in SIZES.items():
        rounds = []
        for index in range(args.repeat):
            print(f"migration {label} round {index + 1}...", file=sys.stderr, flush=True)
            rounds.append(migration(size, args.keys, args.rate, args.senders))
        # Every actor of every round counts once in the pooled percentiles.
        pause = _percentiles([p for r in rounds for p in r.pop("pauses")])
        calls = _percentiles([c for r in rounds for c in r.pop("calls_before")])
        results["migration"][label] = {
            "pause": pause,
            "export_to_first_handled": _percentiles([p for r in rounds for p in r.pop("raw")]),
            "call_latency_before_drain": calls,
            # A pause against what any call waited on this machine before the drain.
            "pause_p50_over_call_p50": round(pause["p50_ms"] / calls["p50_ms"], 2)
            if pause["count"] and calls["count"]
            else None,
            "pause_p99_over_call_p99": round(pause["p99_ms"] / calls["p99_ms"], 2)
            if pause["count"] and calls["count"]
            else None,
            "rounds": rounds,
        }
    rates = []
    for index in range(0 if args.migration_only else args.repeat):
        print(f"throughput round {index + 1}...", file=sys.stderr, flush=True)
        rates.append(throughput(args.callers, args.seconds))
    # The median of each figure over the rounds (ratios from the same round).
    if rates:
        results["throughput"] = {
            key: statistics.median(r[key] for r in rates) for key in rates[0]
        } | {"rounds": rates}
    print(
        json.dumps(
            {
                "benchmark": "actors",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "targets": {"migration pause p99": "< 50 ms"},
                "results": results,
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
