"""A node process holding ``handoff.Counters`` for tests/test_counters_multiprocess.py.

Run as a :class:`handoff.testing.NodeProcess` ``program``: the node comes from the
``HANDOFF_*`` environment and tracks ``usage = handoff.Counters()`` through the real
``CountersAdapter``, wrapped so that every import prints, before it returns (so before the
successor's Ack leaves), ``{"event": "applying", "amount": a}`` then, once applied,
``{"event": "applied", "amount": a, "records": n}``. ``HANDOFF_TEST_APPLY_DELAY`` seconds
(blocking) pass between the two from the second import on: a slow successor, to be killed
while it applies. Events are JSON lines on stdout (``listening`` first, ``node-up``,
``node-down``); commands, one per stdin line:

- ``incr COUNT SEED KEYS``: COUNT increments of ``f"k{i}"`` (``i`` below KEYS), amounts
  1..5, drawn from ``random.Random(SEED)``; replies ``{"event": "incremented", "amount":
  total added, "held": what the node holds now}``;
- ``drain``: ``node.drain()``; replies ``{"event": "drained", "report": ..., "held": ...}``;
- ``stats``: ``{"event": "stats", "held", "keys", "values", "deadlines", "views"}`` (the
  sizes of the Counters' per-key storage);
- ``stop``: stops the node, prints ``stopped`` and exits.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import anyio.from_thread

from handoff import Counters, Node
from handoff._adapter import ImportResult, Record
from handoff.adapters.counters import CountersAdapter
from handoff.membership import Peer

NAMESPACE = "usage"


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Observed:
    """The real adapter; every import says what it applies before it returns."""

    def __init__(self, inner: CountersAdapter, delay: float) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.moves_ownership = inner.moves_ownership
        self.delay = delay
        self.imports = 0

    def __len__(self) -> int:
        return len(self.inner)

    def export(self) -> Iterator[Record]:
        return self.inner.export()

    def give_back(self, records: Sequence[Record]) -> None:
        self.inner.give_back(records)

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        amount = sum(record[1] for record in records)
        emit({"event": "applying", "amount": amount, "records": len(records)})
        self.imports += 1
        if self.delay and self.imports > 1:
            time.sleep(self.delay)  # blocking: killed here, nothing of this chunk applied
        result = self.inner.import_records(records, age=age)
        emit({"event": "applied", "amount": amount, "records": len(records)})
        return result


def held(usage: Counters) -> int:
    return sum(usage._values.values())


async def run() -> int:
    usage = Counters()
    node = Node()
    delay = float(os.environ.get("HANDOFF_TEST_APPLY_DELAY", "0"))
    node.track(NAMESPACE, usage, adapter=Observed(CountersAdapter(usage), delay))

    def peer_event(kind: str) -> Any:
        def callback(peer: Peer, *_: object) -> None:
            emit({"event": kind, "peer": peer.name, "release": peer.release})

        return callback

    node.on_node_up(peer_event("node-up"))
    node.on_node_down(peer_event("node-down"))
    send, receive = anyio.create_memory_object_stream[str](1000)
    await node.start()
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

    async with anyio.from_thread.BlockingPortal() as portal:
        threading.Thread(target=read_stdin, args=(portal,), daemon=True).start()
        async for line in receive:
            words = line.split()
            if not words:
                continue
            if words[0] == "incr":
                count, seed, keys = (int(w) for w in words[1:4])
                rng = random.Random(seed)
                added = 0
                for _ in range(count):
                    n = rng.randint(1, 5)
                    usage.incr(f"k{rng.randrange(keys)}", n)
                    added += n
                emit({"event": "incremented", "amount": added, "held": held(usage)})
            elif words[0] == "drain":
                report = await node.drain()
                emit({"event": "drained", "report": report.as_dict(), "held": held(usage)})
            elif words[0] == "stats":
                emit(
                    {
                        "event": "stats",
                        "held": held(usage),
                        "keys": len(usage),
                        "values": len(usage._values),
                        "deadlines": len(usage._deadlines),
                        "views": len(usage._views),
                    }
                )
            elif words[0] == "stop":
                break
    await node.stop()
    emit({"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(run))
