"""Drain throughput: a TTLCache moved between two processes on loopback.

Prints one JSON object. For each size N (100-byte values) it measures, in the same run:

- ``drain``: ``node.drain()`` on the old node, from start until every chunk is acknowledged
  (so the new node has applied everything), two node processes on 127.0.0.x;
- ``bare_export``: iterating the full cache through its public API (``cache.items()``);
- ``bare_import``: inserting N prepared entries into an empty TTLCache;
- ``pickle_way``: what a team would write by hand: ``pickle.dumps(cache)``, send it over a
  loopback socket, ``pickle.loads``, ``new_cache.update(old)``; from the start of pickling
  until the receiver finished updating;
- ``manual_drain_clear``: the manual drain again with the secure channel's cipher replaced,
  in both processes, by one that frames the same bytes (same sizes, a zero tag) without
  encrypting or authenticating: the baseline for what the channel costs;
- peak memory (``ru_maxrss``) growth of sender and receiver during the drain, the receiver
  compared with a process that fills the same cache locally;
- ``redis_full_sync`` (when ``redis-server`` is installed, e.g. the Debian package): the
  reference a user would weigh a drain against. Two ``redis-server`` on 127.0.0.1 without
  persistence, diskless replication (``--repl-diskless-sync yes``, no delay, the replica
  loading from the socket); the master filled with the same entries (``SET key value EX
  3600``, pipelined over a raw RESP socket); then ``REPLICAOF`` on the replica, timed
  until ``INFO replication`` says ``master_link_status:up`` and
  ``master_sync_in_progress:0`` and its ``DBSIZE`` is N. Printed as
  ``drain_over_redis_full_sync``.

Ratios are what to read (the machine is shared and noisy): ``drain / max(export, import)``
(target <= 1.15: sending and applying overlap on two cores) and ``pickle_way / drain``
(target >= 1.7); ``channel_over_clear`` = ``manual_drain / manual_drain_clear`` (target
<= 1.10: the secure channel costs at most 10%). Each child process starts fresh so that one
measurement's garbage does not weigh on the next. Usage:
``python benchmarks/drain_throughput.py [--sizes 100000,1000000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

VALUE_SIZE = 100
COOKIE = "Qm7vR2xK9pLwT4nZ8cYb3HdF6sJ1gA5e"  # generated: a typed one draws a warning
TTL = 3600.0


def _value(i: int) -> str:
    return f"{i:010d}".ljust(VALUE_SIZE, "v")


def _filled(n: int) -> Any:
    from cachetools import TTLCache

    cache: Any = TTLCache(maxsize=n, ttl=TTL)
    for i in range(n):
        cache[f"key:{i}"] = _value(i)
    return cache


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- bare export and import ------------------------------------------------------------------


def _bare(n: int, out: Connection) -> None:
    from cachetools import TTLCache

    entries = [(f"key:{i}", _value(i)) for i in range(n)]
    cache: Any = TTLCache(maxsize=n, ttl=TTL)
    started = time.perf_counter()
    for key, value in entries:
        cache[key] = value
    imported = time.perf_counter() - started
    del entries
    started = time.perf_counter()
    count = sum(1 for _ in cache.items())
    exported = time.perf_counter() - started
    assert count == n
    out.send({"bare_import": imported, "bare_export": exported, "maxrss_mib": _maxrss_mib()})


# -- the drain -------------------------------------------------------------------------------


class _ClearCipher:
    """The secure channel's frame layout (header, payload, 16-byte tag) with no
    cryptography: installed only in the baseline's processes."""

    def __init__(self, key: bytes) -> None:
        del key

    def seal(self, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload) + 16) + payload + bytes(16)

    def open(self, sealed: bytes) -> bytes:
        return sealed[:-16]


def _without_channel_crypto() -> None:
    from handoff.protocol import Connection

    defaults = Connection.__init__.__kwdefaults__
    assert defaults is not None
    assert "cipher_factory" in defaults
    defaults["cipher_factory"] = _ClearCipher


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


def _receiver(n: int, clear: bool, out: Connection) -> None:
    import anyio
    from cachetools import TTLCache

    if clear:
        _without_channel_crypto()

    async def main() -> None:
        cache: Any = TTLCache(maxsize=n, ttl=TTL)
        node = _node("v2", "127.0.0.3", "none")
        node.track("cache", cache)
        # start/stop rather than ``async with``: leaving would drain this node in turn.
        await node.start()
        try:
            out.send({"address": node.address})
            await node.wait_warm()
            out.send({"entries": len(cache), "maxrss_mib": _maxrss_mib()})
            await anyio.to_thread.run_sync(out.recv)  # told to stop
        finally:
            await node.stop()

    anyio.run(main)


def _sender(n: int, receiver_address: str, manual: bool, clear: bool, out: Connection) -> None:
    import anyio

    if clear:
        _without_channel_crypto()

    async def main() -> None:
        cache = _filled(n)
        node = _node("v1", "127.0.0.2", f"static:{receiver_address}")
        node.track("cache", cache)
        joined = anyio.Event()
        node.on_node_up(lambda peer: joined.set())
        async with node:
            with anyio.fail_after(30):
                await joined.wait()
            before = _maxrss_mib()
            started = time.perf_counter()
            if manual:
                await node.drain()
                seconds = time.perf_counter() - started
        if not manual:
            seconds = time.perf_counter() - started  # the drain on leaving, and the stop
        report = node.last_drain_report
        assert report is not None
        out.send(
            {
                "drain": seconds,
                "acknowledged": report.acknowledged,
                "bytes": report.namespaces["cache"].bytes,
                "maxrss_before_mib": before,
                "maxrss_after_mib": _maxrss_mib(),
            }
        )

    anyio.run(main)


def _reference(n: int, out: Connection) -> None:
    cache = _filled(n)
    out.send({"entries": len(cache), "maxrss_mib": _maxrss_mib()})


# -- the pickle way --------------------------------------------------------------------------


def _pickle_receiver(n: int, out: Connection) -> None:
    from cachetools import TTLCache

    server = socket.create_server(("127.0.0.3", 0))
    out.send({"port": server.getsockname()[1]})
    conn, _ = server.accept()
    with conn:
        (length,) = struct.unpack(">Q", conn.recv(8, socket.MSG_WAITALL))
        data = bytearray()
        while len(data) < length:
            chunk = conn.recv(min(1 << 20, length - len(data)))
            if not chunk:
                raise ConnectionError("sender went away")
            data += chunk
        old = pickle.loads(data)
        del data
        cache: Any = TTLCache(maxsize=n, ttl=TTL)
        cache.update(old)
        conn.sendall(b"k")
    out.send({"entries": len(cache)})


def _pickle_sender(n: int, port: int, out: Connection) -> None:
    cache = _filled(n)
    with socket.create_connection(("127.0.0.3", port)) as conn:
        started = time.perf_counter()
        data = pickle.dumps(cache, protocol=pickle.HIGHEST_PROTOCOL)
        conn.sendall(struct.pack(">Q", len(data)) + data)
        if conn.recv(1) != b"k":
            raise ConnectionError("receiver failed")
        seconds = time.perf_counter() - started
    out.send({"pickle_way": seconds, "pickle_bytes": len(data)})


# -- the Redis reference ---------------------------------------------------------------------


def _resp(*words: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode() if isinstance(word, str) else word
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Redis:
    """A minimal RESP client (the suite needs no redis package): one command at a time, or
    a pipeline whose replies are read and checked in bulk."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rb")

    def command(self, *words: str) -> Any:
        self.sock.sendall(_resp(*words))
        return self._reply()

    def _reply(self) -> Any:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.file.read(size + 2)[:-2].decode()
        raise RuntimeError(f"redis answered {line!r}")

    def pipeline(self, commands: bytes, count: int) -> None:
        self.sock.sendall(commands)
        replies = self.file.read(5 * count)  # "+OK\r\n" each
        if replies != b"+OK\r\n" * count:
            raise RuntimeError(f"redis refused a write: {replies[:200]!r}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _redis_server(port: int, directory: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--repl-diskless-sync", "yes",
         "--repl-diskless-sync-delay", "0", "--repl-diskless-load", "on-empty-db",
         "--dir", directory, "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            client = _Redis(port)
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.02)
            continue
        client.close()
        return process


def redis_full_sync(n: int) -> float | None:
    """Seconds of a diskless full resync of ``n`` entries (``None``: no redis-server)."""
    if shutil.which("redis-server") is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        master_port, replica_port = _free_port(), _free_port()
        servers = [
            _redis_server(master_port, directory),
            _redis_server(replica_port, directory),
        ]
        try:
            master, replica = _Redis(master_port), _Redis(replica_port)
            ttl = str(int(TTL))
            for start in range(0, n, 10_000):
                stop = min(n, start + 10_000)
                batch = b"".join(
                    _resp("SET", f"key:{i}", _value(i), "EX", ttl) for i in range(start, stop)
                )
                master.pipeline(batch, stop - start)
            if master.command("DBSIZE") != n:
                raise AssertionError("redis master does not hold every entry")
            started = time.perf_counter()
            replica.command("REPLICAOF", "127.0.0.1", str(master_port))
            while True:
                info = replica.command("INFO", "replication")
                if (
                    "master_link_status:up" in info
                    and "master_sync_in_progress:0" in info
                    and replica.command("DBSIZE") == n
                ):
                    break
                if time.perf_counter() - started > 600:
                    raise TimeoutError("redis replica did not sync within 600 s")
                time.sleep(0.002)
            seconds = time.perf_counter() - started
            master.close()
            replica.close()
            return seconds
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)


# -- orchestration ---------------------------------------------------------------------------

_CTX = mp.get_context("spawn")


def _start(target: Any, *args: Any) -> tuple[Any, Connection]:
    parent, child = _CTX.Pipe()
    process = _CTX.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    return process, parent


def _recv(conn: Connection, process: Any, seconds: float = 900) -> dict[str, Any]:
    if not conn.poll(seconds):
        process.kill()
        raise TimeoutError(f"{process.name} said nothing for {seconds} s")
    result: dict[str, Any] = conn.recv()
    return result


def _finish(*processes: Any) -> None:
    for process in processes:
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()


def measure(n: int) -> dict[str, Any]:
    """One round of every measurement for a cache of ``n`` entries."""
    process, conn = _start(_bare, n)
    bare = _recv(conn, process)
    _finish(process)

    drains = {}
    # (manual, clear): the drain at stop, node.drain(), node.drain() without channel crypto.
    for mode in ((False, False), (True, False), (True, True)):
        receiver, rconn = _start(_receiver, n, mode[1])
        address = _recv(rconn, receiver)["address"]
        sender, sconn = _start(_sender, n, address, *mode)
        drains[mode] = drained = _recv(sconn, sender)
        drains[mode]["received"] = received = _recv(rconn, receiver)
        rconn.send("stop")
        _finish(sender, receiver)
        if received["entries"] != n or drained["acknowledged"] != n:
            raise AssertionError(f"incomplete transfer: {received}, {drained}")
    drained, received = drains[False, False], drains[False, False]["received"]

    reference, refconn = _start(_reference, n)
    ref = _recv(refconn, reference)
    _finish(reference)

    preceiver, pconn = _start(_pickle_receiver, n)
    port = _recv(pconn, preceiver)["port"]
    psender, psconn = _start(_pickle_sender, n, port)
    pickled = _recv(psconn, psender)
    precv = _recv(pconn, preceiver)
    _finish(psender, preceiver)

    if precv["entries"] != n:
        raise AssertionError(f"incomplete transfer: {precv}")
    redis = redis_full_sync(n)
    return {
        **({} if redis is None else {"redis_full_sync": redis}),
        "drain": drained["drain"],
        "manual_drain": drains[True, False]["drain"],
        "manual_drain_clear": drains[True, True]["drain"],
        "bare_export": bare["bare_export"],
        "bare_import": bare["bare_import"],
        "pickle_way": pickled["pickle_way"],
        "wire_bytes": drained["bytes"],
        "pickle_bytes": pickled["pickle_bytes"],
        "sender_growth_mib": drained["maxrss_after_mib"] - drained["maxrss_before_mib"],
        "receiver_excess_mib": received["maxrss_mib"] - ref["maxrss_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--redis-only", action="store_true", help="only the Redis reference (no drain)"
    )
    args = parser.parse_args(argv)
    if args.redis_only:
        sizes = [int(size) for size in args.sizes.split(",")]
        print(json.dumps({str(n): redis_full_sync(n) for n in sizes}))
        return 0
    sizes = [int(size) for size in args.sizes.split(",")]
    results: dict[str, Any] = {}
    for n in sizes:
        rounds = []
        for index in range(args.repeat):
            print(f"N={n} round {index + 1}/{args.repeat}...", file=sys.stderr, flush=True)
            rounds.append(measure(n))
        median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        median["drain_over_bare"] = median["drain"] / max(
            median["bare_export"], median["bare_import"]
        )
        median["pickle_over_drain"] = median["pickle_way"] / median["drain"]
        median["manual_over_drain"] = median["manual_drain"] / median["drain"]
        median["channel_over_clear"] = median["manual_drain"] / median["manual_drain_clear"]
        median["records_per_second"] = n / median["drain"]
        if "redis_full_sync" in median:
            median["drain_over_redis_full_sync"] = median["drain"] / median["redis_full_sync"]
        results[str(n)] = {key: round(value, 4) for key, value in median.items()}
    print(
        json.dumps(
            {
                "benchmark": "drain_throughput",
                "value_size": VALUE_SIZE,
                "repeat": args.repeat,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "targets": {"drain_over_bare": "<= 1.15", "pickle_over_drain": ">= 1.7",
                            "channel_over_clear": "<= 1.10", "memory_mib": "< 64"},
                "results": results,
            },
            sort_keys=True,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
