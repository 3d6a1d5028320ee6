"""Synthetic traffic for ``handoff simulate``: Zipf-distributed keys through a cache in front
of a deliberately slow backend, served inside the node processes themselves.

A :class:`TrafficSpec` describes one stream of requests: request ``i`` is due at
``start + i / rate`` and asks for the key of rank ``r`` drawn from a Zipf distribution over
``keys`` ranks (rank 0 the hottest) with a :class:`random.Random` seeded with ``seed``.
Every node that takes part draws the *same* stream and serves only its share, as a load
balancer in front of them would split it:

- ``balance="key"``: each key goes to one node, chosen by rendezvous hashing over ``nodes``
  with :class:`handoff.engine.Router`, the split a drain uses to spread keys over its
  successors. The two agree only if every process hashes strings alike: run them all with
  the same ``PYTHONHASHSEED``.
- ``balance="round-robin"``: request ``i`` goes to ``nodes[i % len(nodes)]``.
- no ``nodes``: every request is this node's.

A request is a get-or-load on the cache: a hit is counted; a miss "calls the backend", which
answers ``backend_delay`` seconds later, when the value is stored. Requests for a key that
is still loading call the backend again (no request coalescing, like a plain cachetools
get-or-load).

Writes: with ``writes`` a share of the requests (drawn with a second number from the same
generator, so every node still draws the same stream) write a new value of their key
instead (write-through: the backend, then the serving node's cache). Request ``i`` writes
version ``version_base + i + 1``, a clock shared by the streams of one run, and the value
carries it (:func:`versioned`); the backend answers a load with the newest version any
request of the stream wrote so far. A stream given its ``previous`` stream (the old node's,
before the switch) replays it first (:func:`final_writes`) and counts a ``stale`` read for
each hit that returns an older version than the last one the old node wrote to that key.
A :class:`StaleReads` splits them by the order in which the serving node did things: a
stale read that the node's last applied handed-off records followed happened while the old
node's last writes were still on their way (``stale_in_flight``); one after them is an
outdated value the handoff left behind (``stale_after_handoff``).

Counters are kept per ``interval``-long bin counted from ``epoch`` (by the time each
request was due, so a busy event loop does not move requests between bins) and emitted as
``{"event": "traffic", "bin": k, "requests": ..., "hits": ..., "backend_calls": ...,
"writes": ..., "stale": ..., "entries": ...}`` as each bin closes (``requests`` are the
reads); at the end ``{"event": "traffic-done", ...}`` gives the
totals. The loop is bounded in count (``rate * (end - start)`` requests) and in time (it
gives up :data:`LATE_LIMIT` seconds after ``end``), and stops early when told to.

``epoch``, ``start`` and ``end`` are :func:`time.monotonic` values of the parent process:
the system-wide monotonic clock on Linux and macOS, so the nodes' bins line up.
"""

from __future__ import annotations

import json
import math
import random
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields, replace
from itertools import accumulate
from typing import Any, Final

import anyio

from handoff.engine import Router

__all__ = (
    "BALANCES",
    "LATE_LIMIT",
    "MAX_KEYS",
    "VERSION_MARK",
    "StaleReads",
    "TrafficSpec",
    "final_writes",
    "is_stale",
    "run_traffic",
    "version_of",
    "versioned",
    "zipf_table",
)

BALANCES: Final = ("key", "round-robin")
#: The largest key space a stream may draw from (its table takes 8 bytes a key).
MAX_KEYS: Final = 10_000_000
#: Seconds after ``end`` at which a stream that fell behind gives up.
LATE_LIMIT: Final = 5.0
#: The longest a stream may run, and how far from now its times may lie.
MAX_SECONDS: Final = 3600.0
MAX_RATE: Final = 100_000.0

#: Separates a value from the version that wrote it (see :func:`versioned`).
VERSION_MARK: Final = "@"

# A request due this many bins before a bin boundary counts in the next bin (float error).
_BIN_TOLERANCE = 1e-6
# The loop wakes at most this often (it serves every request due at each wake-up) ...
_TICK = 0.002
# ... and at least this often, to notice a stop.
_MAX_SLEEP = 0.05


def zipf_table(keys: int, exponent: float) -> array[float]:
    """Cumulative Zipf probabilities over ranks ``0 .. keys - 1`` (rank ``r`` weighs
    ``1 / (r + 1) ** exponent``), normalised so that the last one is exactly 1.0: draw a rank
    with ``bisect_right(table, rng.random())``."""
    if keys < 1:
        raise ValueError(f"keys must be at least 1, got {keys}")
    cumulative = array("d", accumulate((r + 1.0) ** -exponent for r in range(keys)))
    total = cumulative[-1]
    for index in range(keys):
        cumulative[index] /= total
    cumulative[-1] = 1.0
    return cumulative


@dataclass(frozen=True, slots=True)
class TrafficSpec:
    """One stream of requests (see the module documentation); JSON on the wire."""

    epoch: float
    """Monotonic time at which bin 0 starts."""
    start: float
    """Monotonic time at which request 0 is due."""
    end: float
    """Monotonic time before which the last request is due."""
    rate: float
    """Requests per second of the whole stream (before the balancer splits it)."""
    keys: int
    """Size of the key space: ranks ``0 .. keys - 1``."""
    seed: int = 1
    exponent: float = 1.0
    backend_delay: float = 0.003
    interval: float = 0.25
    nodes: tuple[str, ...] = ()
    balance: str = "key"
    writes: float = 0.0
    """Share of the requests that write a new value of their key (see the module
    documentation)."""
    previous: tuple[float, float, int] | None = None
    """``(start, end, seed)`` of the stream one node served before this one (the old node,
    before the switch), with this stream's other settings: its writes are what a read of
    this stream must not be older than (:func:`final_writes`)."""

    def __post_init__(self) -> None:
        def number(name: str, value: object, low: float, high: float) -> None:
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or not low <= value <= high
            ):
                raise ValueError(f"{name} must be a number from {low:g} to {high:g}, not {value!r}")

        for name in ("epoch", "start", "end"):
            number(name, getattr(self, name), 0.0, 1e18)
        number("rate", self.rate, 1e-3, MAX_RATE)
        number("exponent", self.exponent, 0.0, 10.0)
        number("backend_delay", self.backend_delay, 0.0, 10.0)
        number("interval", self.interval, 0.01, 60.0)
        number("writes", self.writes, 0.0, 1.0)
        if self.previous is not None:
            if not isinstance(self.previous, tuple) or len(self.previous) != 3:
                raise ValueError(f"previous must be [start, end, seed], not {self.previous!r}")
            number("previous start", self.previous[0], 0.0, 1e18)
            number(
                "previous end", self.previous[1], self.previous[0], self.previous[0] + MAX_SECONDS
            )
            if not isinstance(self.previous[2], int) or isinstance(self.previous[2], bool):
                raise ValueError(f"previous seed must be an integer, not {self.previous[2]!r}")
        if not self.epoch <= self.start <= self.end <= self.start + MAX_SECONDS:
            raise ValueError(
                f"need epoch <= start <= end <= start + {MAX_SECONDS:g}, got "
                f"{self.epoch!r}, {self.start!r}, {self.end!r}"
            )
        for name in ("keys", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, not {value!r}")
        if not 1 <= self.keys <= MAX_KEYS:
            raise ValueError(f"keys must be from 1 to {MAX_KEYS}, not {self.keys}")
        if not isinstance(self.nodes, tuple) or not all(
            isinstance(n, str) and n for n in self.nodes
        ):
            raise ValueError(f"nodes must be a list of node names, not {self.nodes!r}")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"nodes must not repeat a name: {list(self.nodes)}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TrafficSpec:
        """Validate a decoded JSON object (raises :class:`ValueError`)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
        values = dict(data)
        for name in ("nodes", "previous"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise ValueError(str(exc)) from None

    @classmethod
    def parse(cls, text: str) -> TrafficSpec:
        """A spec from its JSON text (raises :class:`ValueError`)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return cls.from_mapping(data)

    def to_json(self) -> str:
        """The JSON text of this spec (one line)."""
        data = asdict(self)
        data["nodes"] = list(self.nodes)
        data["previous"] = None if self.previous is None else list(self.previous)
        return json.dumps(data, separators=(",", ":"))

    @property
    def requests(self) -> int:
        """Requests in the whole stream: those due in ``[start, end)``."""
        # The tolerance absorbs float error in end - start (monotonic times are large).
        return max(0, math.ceil((self.end - self.start) * self.rate - 1e-3))

    def due(self, index: int) -> float:
        """When request ``index`` is due."""
        return self.start + index / self.rate

    @property
    def version_base(self) -> int:
        """Request ``index`` of this stream writes version ``version_base + index + 1``: a
        global request clock (streams of one run share ``epoch`` and ``rate``), so a later
        stream's writes are newer than an earlier one's."""
        return round((self.start - self.epoch) * self.rate)

    def bin_of(self, moment: float) -> int:
        """The bin that ``moment`` falls in."""
        return math.floor((moment - self.epoch) / self.interval + _BIN_TOLERANCE)

    def first_bin(self) -> int:
        """The bin of the first request."""
        return self.bin_of(self.start)

    def last_bin(self) -> int:
        """The bin of the last request (``first_bin() - 1`` for an empty stream)."""
        count = self.requests
        return self.bin_of(self.due(count - 1)) if count else self.first_bin() - 1

    def owner(self, me: str) -> Callable[[int, str], bool]:
        """``mine(index, key)``: whether request ``index`` for ``key`` is served by ``me``."""
        if not self.nodes:
            return lambda _index, _key: True
        if me not in self.nodes:
            raise ValueError(f"{me!r} is not one of the nodes {list(self.nodes)}")
        position = self.nodes.index(me)
        if self.balance == "round-robin":
            count = len(self.nodes)
            return lambda index, _key: index % count == position
        route = Router(list(self.nodes)).route
        return lambda _index, key: route(key) == position


def versioned(value: str, version: int) -> str:
    """``value`` as written by request version ``version`` (0: never written)."""
    return value if version == 0 else f"{value}{VERSION_MARK}{version}"


def version_of(value: object) -> int:
    """The version a value was written with (0: the initial value, or not a string)."""
    if not isinstance(value, str):
        return 0
    _, mark, digits = value.rpartition(VERSION_MARK)
    return int(digits) if mark and digits.isdigit() else 0


def is_stale(value: object, written: int) -> bool:
    """Whether a read returning ``value`` is older than version ``written``, the last one
    the previous stream wrote to its key (0: never written, so nothing is stale)."""
    return version_of(value) < written


def final_writes(
    spec: TrafficSpec, key_of: Callable[[int], Any], table: array[float] | None = None
) -> dict[Any, int]:
    """Replay ``spec.previous`` (served whole by one node, with ``spec``'s other settings)
    and return the last version it wrote to each key: a read of ``spec`` returning less
    is stale. Empty without a previous stream or writes."""
    if spec.previous is None or not spec.writes:
        return {}
    start, end, seed = spec.previous
    old = replace(spec, start=start, end=end, seed=seed, nodes=(), previous=None)
    if table is None:
        table = zipf_table(spec.keys, spec.exponent)
    top = spec.keys - 1
    draw = random.Random(seed).random
    writes, base = spec.writes, old.version_base
    written: dict[Any, int] = {}
    for index in range(old.requests):
        rank = bisect_right(table, draw())
        key = key_of(rank if rank <= top else top)
        if draw() < writes:
            written[key] = base + index + 1
    return written


@dataclass(slots=True)
class StaleReads:
    """Stale reads of one node, split by whether the handoff had completed on that node.

    ``applied`` (given to :meth:`read` and :meth:`settle`) is a count that grows whenever
    the node applies records handed off by the old node (pre-copy, live delta, drain). A
    stale read that a later application followed was read while the old node's last
    writes were still in flight (:attr:`in_flight`); the stale reads since the last
    application are outdated values the handoff left behind (:attr:`after_handoff`, final
    once the handoff is over). Reads and applications must be counted in the order the
    node did them (in the simulation both run on the node's event loop, under its lock),
    so the split needs no clock and two integers of memory.
    """

    in_flight: int = 0
    after_handoff: int = 0
    """Stale reads since the last application seen."""
    applied: int = 0
    """The application count at the last :meth:`read` or :meth:`settle`."""

    def settle(self, applied: int) -> None:
        """Take note of the application count now: if it grew, every stale read so far
        was in flight."""
        if applied != self.applied:
            self.in_flight += self.after_handoff
            self.after_handoff = 0
            self.applied = applied

    def read(self, applied: int) -> None:
        """Count a stale read made now (``applied`` as in :meth:`settle`)."""
        self.settle(applied)
        self.after_handoff += 1

    @property
    def total(self) -> int:
        """Every stale read."""
        return self.in_flight + self.after_handoff


@dataclass(slots=True)
class _Bin:
    requests: int = 0
    hits: int = 0
    backend_calls: int = 0
    writes: int = 0
    stale: int = 0


async def run_traffic(
    spec: TrafficSpec,
    cache: MutableMapping[Any, Any],
    *,
    me: str,
    key_of: Callable[[int], Any],
    value_of: Callable[[int], Any],
    emit: Callable[[Mapping[str, object]], None],
    stopped: Callable[[], bool],
    lock: AbstractContextManager[object],
    clock: Callable[[], float],
    handed_off: Callable[[], int] = lambda: 0,
) -> dict[str, object]:
    """Serve ``me``'s share of ``spec`` from ``cache`` until the stream ends (or ``stopped()``
    turns true), emitting one ``traffic`` event per bin and a ``traffic-done`` event last,
    which is also returned. Holds ``lock`` whenever it touches ``cache``.

    ``key_of(rank)`` and ``value_of(rank)`` give the key and the backend's value of a rank
    (a string where ``spec.writes``: written values carry their version, see
    :func:`versioned`). ``handed_off()`` is a count that grows whenever the node applies
    handed-off records (see :class:`StaleReads`); ``traffic-done`` splits ``stale`` into
    ``stale_in_flight`` and ``stale_after_handoff`` by it.
    """
    table = zipf_table(spec.keys, spec.exponent)
    top = spec.keys - 1
    rng = random.Random(spec.seed)
    draw = rng.random
    mine = spec.owner(me)
    total = spec.requests
    last_bin = spec.last_bin()
    start, rate, delay = spec.start, spec.rate, spec.backend_delay
    epoch, interval = spec.epoch, spec.interval
    writes, base = spec.writes, spec.version_base
    # The previous stream's last writes: no read may return older. The backend holds the
    # newest version of each key (any node's writes in this stream, all served in order).
    floor = final_writes(spec, key_of, table)
    latest = dict(floor)
    pending: deque[tuple[float, Any, int]] = deque()  # (answer at, key, rank), in order
    current = spec.first_bin()
    counters = _Bin()
    totals = _Bin()
    stale_reads = StaleReads()
    index = 0
    late = False

    def close_bins(upto: int) -> None:
        """Emit the current bin and empty ones up to, not including, ``upto``."""
        nonlocal current, counters
        while current < upto and current <= last_bin:
            emit(
                {
                    "event": "traffic",
                    "bin": current,
                    "requests": counters.requests,
                    "hits": counters.hits,
                    "backend_calls": counters.backend_calls,
                    "writes": counters.writes,
                    "stale": counters.stale,
                    "entries": len(cache),
                }
            )
            totals.requests += counters.requests
            totals.hits += counters.hits
            totals.backend_calls += counters.backend_calls
            totals.writes += counters.writes
            totals.stale += counters.stale
            current += 1
            counters = _Bin()

    def answer(until: float) -> None:
        while pending and pending[0][0] <= until:
            _, key, rank = pending.popleft()
            version = latest.get(key, 0)
            cache[key] = versioned(value_of(rank), version) if version else value_of(rank)

    try:
        while index < total:
            if stopped():
                break
            now = clock()
            if now > spec.end + LATE_LIMIT:
                late = True
                break
            with lock:
                while index < total:
                    due = start + index / rate
                    if due > now:
                        break
                    rank = bisect_right(table, draw())
                    key = key_of(rank if rank <= top else top)
                    write = writes and draw() < writes
                    served = mine(index, key)
                    index += 1
                    if write:
                        latest[key] = base + index
                    if not served:
                        continue
                    due_bin = math.floor((due - epoch) / interval + _BIN_TOLERANCE)
                    if due_bin > current:
                        close_bins(due_bin)
                    answer(due)
                    if write:  # write-through: the backend, then the cache
                        counters.writes += 1
                        cache[key] = versioned(value_of(rank), base + index)
                        continue
                    counters.requests += 1
                    value = cache.get(key)
                    if value is not None:
                        counters.hits += 1
                        if floor and is_stale(value, floor.get(key, 0)):
                            counters.stale += 1
                            stale_reads.read(handed_off())
                    else:
                        counters.backend_calls += 1
                        pending.append((due + delay, key, rank))
                answer(now)
            if index < total:
                wait = start + index / rate - clock()
                await anyio.sleep(min(max(wait, _TICK), _MAX_SLEEP))
    finally:
        # Stopped, late or cancelled: the bin in progress is the last one reported.
        complete = index >= total
        close_bins(last_bin + 1 if complete else current + 1)
        # The handoff is over by the end of the stream (the simulation's is within
        # milliseconds of the switch): reads since its last records are after it.
        stale_reads.settle(handed_off())
        done: dict[str, object] = {
            "event": "traffic-done",
            "requests": totals.requests,
            "hits": totals.hits,
            "backend_calls": totals.backend_calls,
            "writes": totals.writes,
            "stale": totals.stale,
            "stale_in_flight": stale_reads.in_flight,
            "stale_after_handoff": stale_reads.after_handoff,
            "entries": len(cache),
            "complete": complete,
            "late": late,
        }
        emit(done)
    return done
