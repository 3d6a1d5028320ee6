"""A node process holding a ``handoff.ActorRegistry`` for tests/test_actors_multiprocess.py.

Run as a :class:`handoff.testing.NodeProcess` ``program``. The node comes from the
``HANDOFF_*`` environment and tracks ``rooms = ActorRegistry(Recorder)`` as namespace
``rooms``. With ``ACTORS_ROLE=client`` the node drains right after it starts: it stays in the
cluster as a caller only (a draining node is never a placement), so the senders it runs
keep going while the serving nodes come and go.

Every actor is a :class:`Recorder`: its state is ``{"lineage": ..., "seen": [[sender, n],
...]}``, each message ``["m", sender, n]`` it handled, in the order it handled them;
``lineage`` names the activation that started from nothing (``state is None``) and moves with
the state, so a key whose state was lost with a killed owner shows a new lineage. A reply is
``[lineage, activation]`` (``activation``: ``"{node}:{pid}:{count}"``, one per
``factory`` call). ``["read"]`` replies ``{"lineage", "seen", "activation"}`` and changes
nothing.

Evidence for "one live activation per key": every handled message appends one line
``["H", key, activation, start, end]`` to ``$ACTORS_LOG_DIR/{node}-{pid}.log`` (the
``time.monotonic()`` before and after the handler's work, which awaits once in the middle so
that two activations running at once would interleave), and ``on_activate`` /
``on_deactivate`` append ``["A" | "D", key, epoch, time]``. Lines are written with
``os.write`` on an ``O_APPEND`` descriptor: what a SIGKILLed process wrote is in the file.
CLOCK_MONOTONIC is one clock for every process of a Linux machine, so the parent compares
the lines of all processes.

With ``ACTORS_NO_PEER_LISTS`` set the node neither dials nor waits for the nodes its peers'
lists name (see ``run``). With ``ACTORS_DEFER_START`` set the process waits for a first
stdin line (any) before it starts the node: a test starts the interpreter ahead and lets
the node join when it wants.

Events are JSON lines on stdout (``listening`` first, ``node-up``, ``leaving``,
``node-down`` with ``reason``); commands, one per stdin line:

- ``load SPEC``: starts sender tasks in the background (SPEC is JSON: ``tag``, ``senders``,
  ``keys``, ``key_prefix``, ``rate`` per sender per second, ``duration`` seconds, ``max``
  messages per sender, ``send_every`` (every k-th message of a sender is a one-way ``send``,
  0: none), ``timeout`` of a call, ``seed``, ``out`` path, ``progress_every``); replies
  ``load-started``, then ``load-progress`` with ``rows`` every ``progress_every`` messages. Each
  sender ``f"{tag}{i}"`` picks keys at random and sends to each key ``n = 0, 1, ...`` in order;
  at the end the outcomes go to ``out`` as JSON (one row per message: ``[sender, key, n,
  kind, outcome, lineage, activation, sent_at, answered_at]``, ``outcome`` ``"ok"``, ``"sent"``
  or the exception's class name) and ``load-done`` is printed with counts per outcome;
- ``stop-load``: ends the senders early (each finishes the message in hand);
- ``settle SECONDS``: waits until no message sent from this node awaits an answer (or the
  seconds pass); replies ``settled`` with ``unanswered``;
- ``read KEYS_JSON OUT``: calls ``["read"]`` on each key of the JSON list and writes
  ``{key: reply or error}`` to OUT; replies ``read-done`` (a read follows every earlier message
  from this node to the key in its channel: it is answered after them);
- ``call KEY TIMEOUT``: one ``["m", f"probe-{node}", n]`` call; replies ``called`` with
  ``outcome`` (``"ok"`` or the exception's class name);
- ``keys``: replies ``keys`` with ``keys`` (this node's ``local_keys()``) and ``stats``;
- ``drain``: ``node.drain()``; replies ``drained`` with the report;
- ``stop``: drains (unless drained), stops the node, prints ``stopped`` and exits.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from handoff import ActorRegistry, Node
from handoff.membership import DownReason, Peer

NAMESPACE = "rooms"
_activations = itertools.count(1)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Log:
    """One line per record, appended with a single ``os.write`` (survives SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: list[Any]) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


class Recorder:
    """Records every message it handles; see the module documentation."""

    node = ""
    log: Log | None = None

    def __init__(self, key: Any, state: Any) -> None:
        self.key = key
        self.activation = f"{self.node}:{os.getpid()}:{next(_activations)}"
        if state is None:
            state = {"lineage": self.activation, "seen": []}
        self.lineage: str = state["lineage"]
        self.seen: list[list[Any]] = [list(item) for item in state["seen"]]

    async def handle(self, message: Any) -> Any:
        start = time.monotonic()
        if message[0] == "read":
            reply: Any = {"lineage": self.lineage, "seen": self.seen, "activation": self.activation}
        else:
            self.seen.append([message[1], message[2]])
            reply = [self.lineage, self.activation]
        await anyio.lowlevel.checkpoint()  # another activation running now would slip in
        end = time.monotonic()
        if self.log is not None:
            self.log.write(["H", self.key, self.activation, start, end])
        return reply

    def state(self) -> Any:
        return {"lineage": self.lineage, "seen": self.seen}


class Senders:
    """The ``load`` command's sender tasks."""

    def __init__(self, registry: ActorRegistry, spec: dict[str, Any]) -> None:
        self.registry = registry
        self.spec = spec
        self.rows: list[list[Any]] = []
        self.stopped = anyio.Event()
        self.progress_every = int(spec.get("progress_every", 100))

    async def run(self) -> None:
        spec = self.spec
        async with anyio.create_task_group() as group:
            for i in range(int(spec["senders"])):
                group.start_soon(
                    self.sender, f"{spec['tag']}{i}", random.Random(f"{spec['seed']}/{i}")
                )
        await anyio.Path(spec["out"]).write_text(json.dumps(self.rows))
        emit(
            {"event": "load-done", "tag": spec["tag"], "outcomes": Counter(r[4] for r in self.rows)}
        )

    async def sender(self, sender: str, rng: random.Random) -> None:
        spec = self.spec
        keys = [f"{spec['key_prefix']}{k}" for k in range(int(spec["keys"]))]
        period = 1.0 / float(spec["rate"])
        send_every = int(spec.get("send_every", 0))
        timeout = float(spec.get("timeout", 2.0))
        next_n: dict[str, int] = {}
        started = time.monotonic()
        end = started + float(spec["duration"])
        for count in range(int(spec["max"])):
            if self.stopped.is_set() or time.monotonic() >= end:
                break
            key = rng.choice(keys)
            n = next_n.get(key, 0)
            next_n[key] = n + 1
            one_way = send_every > 0 and count % send_every == send_every - 1
            sent_at = time.monotonic()
            lineage = activation = None
            try:
                if one_way:
                    await self.registry.send(key, ["m", sender, n], timeout=timeout)
                    outcome = "sent"
                else:
                    reply = await self.registry.call(key, ["m", sender, n], timeout=timeout)
                    lineage, activation = reply
                    outcome = "ok"
            except Exception as exc:
                outcome = type(exc).__name__
            if len(self.rows) % self.progress_every == self.progress_every - 1:
                emit({"event": "load-progress", "tag": spec["tag"], "rows": len(self.rows) + 1})
            self.rows.append(
                [sender, key, n, "send" if one_way else "call", outcome, lineage, activation,
                 sent_at, time.monotonic()]
            )  # fmt: skip
            delay = started + (count + 1) * period - time.monotonic()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self.stopped.wait()


async def run() -> int:
    if os.environ.get("ACTORS_NO_PEER_LISTS"):
        # A proxy that stops forwarding cuts one route to a node; the peers' lists name its
        # own address, a route around the cut that a real partition would cut too. Such a
        # test keeps the nodes to the routes discovery gives.
        from handoff._referrals import Referrals

        Referrals.to_dial = lambda self, linked: []  # type: ignore[method-assign]
        Referrals.pending = lambda self, linked: []  # type: ignore[method-assign]
    node = Node()
    Recorder.node = node.name
    log_dir = os.environ["ACTORS_LOG_DIR"]
    log = Recorder.log = Log(os.path.join(log_dir, f"{node.name}-{os.getpid()}.log"))
    logging.basicConfig(
        filename=os.path.join(log_dir, f"{node.name}-{os.getpid()}.txt"),
        level=os.environ.get("ACTORS_LOG_LEVEL", "INFO"),
        format="%(created).3f %(name)s %(levelname)s %(message)s",
    )
    rooms = ActorRegistry(Recorder, timeout=float(os.environ.get("ACTORS_TIMEOUT", "2")))
    node.track(NAMESPACE, rooms)
    host = rooms._host
    assert host is not None
    host.on_activate = lambda key, epoch: log.write(["A", key, epoch, time.monotonic()])
    host.on_deactivate = lambda key, epoch: log.write(["D", key, epoch, time.monotonic()])

    def up(peer: Peer) -> None:
        emit({"event": "node-up", "peer": peer.name, "release": peer.release})

    def leaving(peer: Peer) -> None:
        emit({"event": "leaving", "peer": peer.name})

    def down(peer: Peer, reason: DownReason) -> None:
        emit({"event": "node-down", "peer": peer.name, "reason": str(reason)})

    node.on_node_up(up)
    node.on_node_leaving(leaving)
    node.on_node_down(down)
    send, receive = anyio.create_memory_object_stream[str](1000)
    if os.environ.get("ACTORS_DEFER_START"):
        # Started ahead (imports take a while on a busy machine), joins when told.
        await anyio.to_thread.run_sync(sys.stdin.readline)
    await node.start()
    if os.environ.get("ACTORS_ROLE") == "client":
        await node.drain()
    emit(
        {
            "event": "listening",
            "name": node.name,
            "release": node.release,
            "cluster": node.cluster,
            "address": node.address,
            "port": node.port,
            "pid": os.getpid(),
        }
    )

    def read_stdin(portal: anyio.from_thread.BlockingPortal) -> None:
        for line in sys.stdin:
            portal.call(send.send, line.strip())
        portal.call(send.send, "stop")

    loads: list[Senders] = []
    probes = itertools.count()

    async def drain() -> None:
        report = await node.drain()
        emit({"event": "drained", "report": report.as_dict()})

    async def read(keys: list[str], out: str) -> None:
        results: dict[str, Any] = {}

        async def one(key: str) -> None:
            try:
                results[key] = await rooms.call(key, ["read"], timeout=10.0)
            except Exception as exc:
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}

        async with anyio.create_task_group() as reads:
            for key in keys:
                reads.start_soon(one, key)
        await anyio.Path(out).write_text(json.dumps(results))
        emit({"event": "read-done", "errors": sum("error" in r for r in results.values())})

    async def settle(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        # The count belongs to the engine, which has no event for it: poll (bounded).
        while host.stats()["unanswered"] and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.05)
        emit({"event": "settled", "unanswered": host.stats()["unanswered"]})

    async def probe(key: str, limit: float) -> None:
        try:
            message = ["m", f"probe-{node.name}", next(probes)]
            reply = await rooms.call(key, message, timeout=limit)
            emit({"event": "called", "key": key, "outcome": "ok", "reply": reply})
        except Exception as exc:
            emit({"event": "called", "key": key, "outcome": type(exc).__name__, "why": str(exc)})

    async with anyio.from_thread.BlockingPortal() as portal, anyio.create_task_group() as group:
        threading.Thread(target=read_stdin, args=(portal,), daemon=True).start()
        async for line in receive:
            command, _, rest = line.partition(" ")
            if command == "load":
                senders = Senders(rooms, json.loads(rest))
                loads.append(senders)
                group.start_soon(senders.run)
                emit({"event": "load-started"})
            elif command == "stop-load":
                for senders in loads:
                    senders.stopped.set()
                emit({"event": "load-stopping"})
            elif command == "settle":
                group.start_soon(settle, float(rest))
            elif command == "read":
                keys, _, out = rest.rpartition(" ")
                group.start_soon(read, json.loads(keys), out)
            elif command == "call":
                key, _, timeout = rest.partition(" ")
                group.start_soon(probe, key, float(timeout))
            elif command == "keys":
                emit({"event": "keys", "keys": rooms.local_keys(), "stats": rooms.stats()})
            elif command == "drain":
                group.start_soon(drain)
            elif command == "stop":
                break
            elif command:
                emit({"event": "command-error", "command": line, "message": "unknown"})
        for senders in loads:
            senders.stopped.set()
        group.cancel_scope.cancel()
    if node.last_drain_report is None:
        await node.drain()  # as leaving ``async with node`` does: the actors move first
    await node.stop()
    emit({"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(run))
