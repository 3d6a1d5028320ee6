"""Increments per second of ``handoff.Counters`` on one thread, against ``collections.Counter``.

Prints one JSON object. In the same run, interleaved round by round (the machine is shared
and noisy: the ratio is what to read, and each figure is the best of its rounds):

- ``counter``: ``c[key] += 1`` on a ``collections.Counter`` (no lock: not thread-safe);
- ``counters``: ``counters.incr(key)`` on a ``handoff.Counters()`` (locked, thread-safe);
- ``counters_ttl``: ``counters.incr(key)`` on a ``handoff.Counters(ttl=60)`` (fixed windows);
- ``counters_cluster``: ``counters.incr(key)`` on a ``handoff.Counters(scope="cluster")``
  with no peers (the increment also marks the key for the next report and returns the
  cluster-wide value);
- ``ratio`` = ``counter / counters`` increments per second (target <= 2.0), and
  ``ratio_ttl`` and ``ratio_cluster`` likewise for the windowed and cluster-scoped ones.

The keys are ``--keys`` short strings (1,000 by default) visited in turn. Usage:
``python benchmarks/counters.py [--keys 1000] [--increments 200000] [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import handoff


def _counter_loop(keys: list[str], repeat: int) -> Callable[[], None]:
    counter: collections.Counter[str] = collections.Counter()

    def run() -> None:
        c = counter
        for _ in range(repeat):
            for key in keys:
                c[key] += 1

    return run


def _counters_loop(keys: list[str], repeat: int, **options: Any) -> Callable[[], None]:
    counters = handoff.Counters(**options)

    def run() -> None:
        c = counters
        for _ in range(repeat):
            for key in keys:
                c.incr(key)

    return run


def _best(run: Callable[[], None], best: float) -> float:
    started = time.perf_counter()
    run()
    return min(best, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--increments", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    keys = [f"user:{i}" for i in range(args.keys)]
    repeat = max(1, args.increments // len(keys))
    increments = repeat * len(keys)
    loops = {
        "counter": _counter_loop(keys, repeat),
        "counters": _counters_loop(keys, repeat),
        "counters_ttl": _counters_loop(keys, repeat, ttl=60.0),
        "counters_cluster": _counters_loop(keys, repeat, scope="cluster"),
    }
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(args.rounds):
        for name, run in loops.items():
            best[name] = _best(run, best[name])
    per_second = {name: round(increments / seconds) for name, seconds in best.items()}
    print(
        json.dumps(
            {
                "python": platform.python_version(),
                "keys": len(keys),
                "increments_per_round": increments,
                "rounds": args.rounds,
                "increments_per_second": per_second,
                "ns_per_increment": {
                    name: round(seconds / increments * 1e9, 1) for name, seconds in best.items()
                },
                "ratio": round(per_second["counter"] / per_second["counters"], 2),
                "ratio_ttl": round(per_second["counter"] / per_second["counters_ttl"], 2),
                "ratio_cluster": round(per_second["counter"] / per_second["counters_cluster"], 2),
                "target_ratio": 2.0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
