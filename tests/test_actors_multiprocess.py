"""Actors across real node processes on 127.0.0.x (issue 10; invariant 3).

Every node is a child process (tests/_actors_child.py) tracking an ``ActorRegistry`` of
:class:`Recorder` actors: each records every message it handles (sender, n) in its state,
and every process appends a line per handled message (key, activation, start, end on
CLOCK_MONOTONIC, one clock for all processes of the machine) to a log file. Senders run as
tasks in a *client* node (a node that drained at start: a caller only, never a placement)
and, in the partition test, on the partitioned node too. From the senders' outcomes, the
final states (read through the actors) and the logs the tests check:

- exactly once and in order: for each key and sender, the ``n`` the actor's state recorded
  are exactly those sent, in the order sent (a call that timed out or was refused as
  unavailable stays queued and must be in it too; only ``ActorBusy`` means "not sent");
- single activation: the spans (first start to last end of the messages it handled) of the
  activations of one key never overlap, across all processes;
- a blue-green deploy of three nodes by three others under ~1,000 messages per second, an
  owner SIGKILLed (its actors come back elsewhere from nothing, nothing handled twice by the
  new lineage), and a partition by a proxy that stops forwarding (documented behaviour:
  ``ActorUnavailable`` for keys the unreachable node may hold, never a second activation;
  after healing nothing is lost or doubled).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from handoff.testing import NodeProcess, free_port
from tests._helpers import loopback_aliases_usable

pytestmark = pytest.mark.slow

HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 10))
PROXY_HOST = "127.0.0.10"
CLUSTER = "shop"
CHILD = Path(__file__).with_name("_actors_child.py")
TIMEOUT = 30.0
KEYS = 100
PREFIX = "room:"
#: Outcomes of a call or send whose message was queued (handled once, maybe later).
QUEUED = frozenset({"ok", "sent", "ActorTimeout", "ActorUnavailable"})
NOT_SENT = "ActorBusy"


def _key(index: int) -> str:
    return f"{PREFIX}{index}"


@dataclass
class Row:
    """One message a sender sent (or tried to)."""

    sender: str
    key: str
    n: int
    kind: str
    outcome: str
    lineage: str | None
    activation: str | None
    sent_at: float
    answered_at: float


@dataclass
class Cluster:
    stack: contextlib.ExitStack
    tmp: Path
    cookie: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    loads: int = 0

    @property
    def log_dir(self) -> Path:
        path = self.tmp / "logs"
        path.mkdir(exist_ok=True)
        return path

    def start(
        self,
        name: str,
        bind: str,
        peers: list[str],
        *,
        release: str = "v1",
        client: bool = False,
        deferred: bool = False,
        peer_lists: bool = True,
    ) -> NodeProcess:
        env = {
            "HANDOFF_COOKIE": self.cookie,
            "HANDOFF_CLUSTER": CLUSTER,
            "HANDOFF_RELEASE": release,
            "HANDOFF_BIND": bind,
            "HANDOFF_DISCOVERY": "static:" + ",".join(peers) if peers else "none",
            "HANDOFF_POLL_INTERVAL": "0.1",
            "HANDOFF_HEARTBEAT_TIMEOUT": "1.5",
            "HANDOFF_DRAIN_TIMEOUT": "20",
            "HANDOFF_WARMUP_TIMEOUT": "0.5",
            "HANDOFF_CONTROL_SOCKET": "none",
            "ACTORS_LOG_DIR": str(self.log_dir),
            "ACTORS_ROLE": "client" if client else "server",
        }
        if deferred:
            env["ACTORS_DEFER_START"] = "1"  # the node starts on the first stdin line
        if not peer_lists:
            env["ACTORS_NO_PEER_LISTS"] = "1"  # see _actors_child.run
        node = NodeProcess(env, name=name, program=[sys.executable, str(CHILD)])
        self.nodes[name] = self.stack.enter_context(node)
        return node

    def load(self, node: NodeProcess, tag: str, **spec: Any) -> Path:
        self.loads += 1
        out = self.tmp / f"load-{tag}.json"
        spec = {
            "tag": tag,
            "keys": KEYS,
            "key_prefix": PREFIX,
            "seed": self.loads,
            "out": str(out),
            **spec,
        }
        node.command(f"load {json.dumps(spec)}", wait_for_event="load-started")
        return out

    def read(self, node: NodeProcess, keys: Iterable[str]) -> dict[str, Any]:
        out = self.tmp / f"read-{node.name}-{time.monotonic_ns()}.json"
        node.command(f"read {json.dumps(list(keys))} {out}", wait_for_event="read-done", timeout=60)
        return dict(json.loads(out.read_text()))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if not loopback_aliases_usable((*HOSTS, PROXY_HOST)):
        pytest.skip(f"cannot bind {HOSTS[0]}..{PROXY_HOST} (on macOS: ifconfig lo0 alias ...)")
    with contextlib.ExitStack() as stack:
        yield Cluster(stack, tmp_path)


def _addresses(names: Iterable[str], hosts: Iterable[str]) -> dict[str, str]:
    return {name: f"{host}:{free_port(host)}" for name, host in zip(names, hosts, strict=False)}


def _meshed(nodes: Iterable[NodeProcess]) -> None:
    """Wait until every node saw every other come up."""
    nodes = list(nodes)
    for node in nodes:
        node.wait_ready(timeout=TIMEOUT)
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.wait_for("node-up", other.name, timeout=TIMEOUT)


def _rows(path: Path) -> list[Row]:
    return [Row(*row) for row in json.loads(path.read_text())]


def _wait_done(node: NodeProcess, mark: int = 0) -> dict[str, Any]:
    return node.wait_for("load-done", timeout=TIMEOUT, since=mark)


# -- checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    activation: str
    start: float
    end: float
    handled: int


def _spans(log_dir: Path) -> dict[str, list[Span]]:
    """Per key, the span of every activation that handled messages, in start order."""
    bounds: dict[tuple[str, str], list[float]] = {}
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record[0] != "H":
                continue
            _, key, activation, start, end = record
            span = bounds.setdefault((key, activation), [start, end, 0])
            span[0], span[1], span[2] = min(span[0], start), max(span[1], end), span[2] + 1
    spans: dict[str, list[Span]] = defaultdict(list)
    for (key, activation), (start, end, handled) in bounds.items():
        spans[key].append(Span(activation, start, end, int(handled)))
    for key_spans in spans.values():
        key_spans.sort(key=lambda s: s.start)
    return spans


def _check_single_activation(log_dir: Path) -> dict[str, list[Span]]:
    """No two activations of a key ever handled messages at overlapping times."""
    spans = _spans(log_dir)
    overlaps = [
        (key, earlier, later)
        for key, key_spans in spans.items()
        for earlier, later in itertools.pairwise(key_spans)
        if later.start < earlier.end
    ]
    assert not overlaps, f"activations overlapped: {overlaps[:5]}"
    return spans


def _epochs(log_dir: Path) -> dict[str, list[int]]:
    """Per key, the ownership epochs of its activations (``on_activate``) in time order."""
    activations: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record[0] == "A":
                activations[record[1]].append((record[3], record[2]))
    return {key: [epoch for _, epoch in sorted(items)] for key, items in activations.items()}


def _check_delivery(
    rows: list[Row], finals: dict[str, Any], *, lost: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Final states against the model: every queued message exactly once, in order per
    sender. ``lost``: keys whose state may have died with a killed owner; for them, what an
    earlier lineage answered is gone, and what the final lineage answered is there once."""
    unexpected = sorted({row.outcome for row in rows} - QUEUED - {NOT_SENT})
    assert not unexpected, f"outcomes that must not happen: {unexpected}"
    sent: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        if row.outcome != NOT_SENT:
            sent[row.key, row.sender].append(row)
    counts = {"messages": 0, "keys_renewed": 0, "lost_with_owner": 0}
    for key, final in finals.items():
        assert "error" not in final, (key, final)
        seen = [tuple(item) for item in final["seen"]]
        assert len(set(seen)) == len(seen), f"{key}: a message was handled twice: {seen}"
        by_sender: dict[str, list[int]] = defaultdict(list)
        for sender, n in seen:
            by_sender[sender].append(n)
        lineages = {r.lineage for (k, _), rs in sent.items() if k == key for r in rs if r.lineage}
        if key not in lost:
            assert lineages <= {final["lineage"]}, f"{key}: state lost: {lineages}"
        elif lineages - {final["lineage"]}:
            counts["keys_renewed"] += 1
        senders = {s for (k, s) in sent if k == key} | {
            s for s in by_sender if not s.startswith("probe-")
        }
        for sender in senders:
            got = by_sender.get(sender, [])
            mine = sent.get((key, sender), [])
            if key not in lost:
                assert got == [r.n for r in mine], (key, sender, got, [r.n for r in mine])
                counts["messages"] += len(got)
                continue
            assert got == sorted(got), (key, sender, got)
            assert set(got) <= {r.n for r in mine}, (key, sender, got)
            for row in mine:
                if row.outcome != "ok":
                    continue  # handled once, by one lineage or the other: seen at most once
                if row.lineage == final["lineage"]:
                    assert row.n in got, (key, sender, row)
                else:
                    assert row.n not in got, (key, sender, row)  # not handled twice
                    counts["lost_with_owner"] += 1
            counts["messages"] += len(got)
    return counts


# -- blue-green deploy ----------------------------------------------------------------------


def _progress(node: NodeProcess, more: int) -> None:
    """Wait until the node's senders sent ``more`` messages beyond what they had sent."""
    seen = [e["rows"] for e in node.events if e["event"] == "load-progress"]
    target = (seen[-1] if seen else 0) + more
    node.wait_for(lambda e: e["event"] == "load-progress" and e["rows"] >= target, timeout=TIMEOUT)


def test_blue_green_deploy_under_load_loses_and_doubles_nothing(cluster: Cluster) -> None:
    names = ["client", "old1", "old2", "old3", "new1", "new2", "new3"]
    addresses = _addresses(names, HOSTS)

    def peers(name: str) -> list[str]:
        return [address for other, address in addresses.items() if other != name]

    client = cluster.start("client", addresses["client"], peers("client"), client=True)
    olds = [cluster.start(n, addresses[n], peers(n), release="v1") for n in names[1:4]]
    news = [
        cluster.start(n, addresses[n], peers(n), release="v2", deferred=True) for n in names[4:]
    ]
    _meshed([client, *olds])
    # ~1,000 messages per second offered: 20 senders at 50 per second, one in five a
    # send; they run until told to stop (bounded by count and time all the same).
    out = cluster.load(
        client, "s", senders=20, rate=50, duration=60, max=3_000, send_every=5, timeout=3.0
    )
    _progress(client, 200)
    deploy_started = time.monotonic()
    for new in news:
        new.send("start")
    _meshed([client, *olds, *news])
    _progress(client, 200)  # placement moves actors to the new nodes while all serve
    # One old node drains, then the two others at once; each then stops.
    reports = [olds[0].command("drain", timeout=TIMEOUT)["report"]]
    marks = [old.send("drain") for old in olds[1:]]
    reports += [
        old.wait_for("drained", since=mark, timeout=TIMEOUT)["report"]
        for old, mark in zip(olds[1:], marks, strict=True)
    ]
    for old in olds:
        old.command("stop", timeout=TIMEOUT)
        assert old.wait_exit(timeout=TIMEOUT) == 0
    deploy_ended = time.monotonic()
    _progress(client, 100)
    client.command("stop-load", wait_for_event="load-done", timeout=TIMEOUT)
    settled = client.command("settle 20", wait_for_event="settled", timeout=TIMEOUT)
    assert settled["unanswered"] == 0, settled
    rows = _rows(out)
    finals = cluster.read(client, [_key(i) for i in range(KEYS)])
    counts = _check_delivery(rows, finals)
    assert counts["messages"] == sum(1 for r in rows if r.outcome != NOT_SENT)
    spans = _check_single_activation(cluster.log_dir)
    for report in reports:
        ns = report["namespaces"]["rooms"]
        assert ns["dropped"] == {}, ns
        assert ns["acknowledged"] == ns["records"], ns
    # Fencing: every move hands the actor on with a higher ownership epoch.
    for key, epochs in _epochs(cluster.log_dir).items():
        assert epochs == sorted(set(epochs)), (key, epochs)
    held = [set(node.command("keys", wait_for_event="keys")["keys"]) for node in news]
    assert sum(map(len, held)) == KEYS, held
    assert set().union(*held) == {_key(i) for i in range(KEYS)}
    # The test did what it says: senders' messages were answered while the new nodes
    # joined and the old ones drained and stopped, and the actors that lived on old nodes
    # live on new ones.
    during = {
        r.sender
        for r in rows
        if r.outcome == "ok" and deploy_started < r.answered_at < deploy_ended
    }
    assert len(during) >= len({r.sender for r in rows}) // 2, during
    moved = [
        key
        for key, key_spans in spans.items()
        if key_spans[0].activation.startswith("old") and key_spans[-1].activation.startswith("new")
    ]
    assert len(moved) > KEYS // 2, spans


# -- an owner SIGKILLed ---------------------------------------------------------------------


def _servers(
    cluster: Cluster, names: list[str], *, client_host: str = HOSTS[0]
) -> list[NodeProcess]:
    addresses = _addresses(["client", *names], (client_host, *HOSTS[1:]))

    def peers(name: str) -> list[str]:
        return [address for other, address in addresses.items() if other != name]

    nodes = [cluster.start("client", addresses["client"], peers("client"), client=True)]
    nodes += [cluster.start(n, addresses[n], peers(n)) for n in names]
    _meshed(nodes)
    return nodes


def test_a_killed_owners_actors_come_back_elsewhere_from_nothing_never_twice(
    cluster: Cluster,
) -> None:
    client, victim, *survivors = _servers(cluster, ["s1", "s2", "s3"])
    out = cluster.load(client, "k", senders=10, rate=30, duration=60, max=2_000, timeout=2.0)
    _progress(client, 300)
    victim_keys = set(victim.command("keys", wait_for_event="keys")["keys"])
    assert victim_keys, "the victim must hold actors"
    killed_at = time.monotonic()
    assert victim.kill() == -9
    client.wait_for("node-down", victim.name, timeout=TIMEOUT)
    # Its address refuses connections: it is known gone, its actors may live elsewhere.
    probe = sorted(victim_keys)[0]
    called = client.command(f"call {probe} 5", wait_for_event="called", timeout=TIMEOUT)
    assert called["outcome"] == "ok", called
    _progress(client, 300)
    client.command("stop-load", wait_for_event="load-done", timeout=TIMEOUT)
    settled = client.command("settle 20", wait_for_event="settled", timeout=TIMEOUT)
    assert settled["unanswered"] == 0, settled
    rows = _rows(out)
    finals = cluster.read(client, [_key(i) for i in range(KEYS)])

    counts = _check_delivery(rows, finals, lost=frozenset(victim_keys))
    spans = _check_single_activation(cluster.log_dir)
    for key in victim_keys:
        # Back on a survivor, from nothing (a new lineage); no activation of the key
        # handled anything on a survivor before the victim was dead.
        assert not finals[key]["lineage"].startswith("s1:"), finals[key]
        assert not finals[key]["activation"].startswith("s1:"), finals[key]
        later = [s for s in spans[key] if not s.activation.startswith("s1:")]
        assert later, spans[key]
        assert all(s.start > killed_at for s in later), spans[key]
    for key in set(finals) - victim_keys:
        assert all(not s.activation.startswith("s1:") for s in spans[key]), spans[key]
    assert counts["keys_renewed"] > 0, counts
    after = [
        r for r in rows if r.key in victim_keys and r.sent_at > killed_at and r.outcome == "ok"
    ]
    assert after
    assert all(r.lineage == finals[r.key]["lineage"] for r in after)
    assert all(s.running for s in survivors)


def test_the_crash_probe_sees_an_address_that_refuses_connections() -> None:
    from handoff.node import _refuses_connections

    port = free_port("127.0.0.1")  # nothing listens there
    assert anyio.run(_refuses_connections, f"127.0.0.1:{port}") is True


# -- a partition ----------------------------------------------------------------------------


class Blackhole:
    """A TCP proxy from ``host`` (any free port) to ``target`` that can stop forwarding:
    while partitioned it keeps every socket open and drops every byte both ways (a close is
    not passed on either: across a partition nobody learns anything). Healing closes the
    connections that lost bytes (their streams are broken) and forwards new ones again."""

    def __init__(self, host: str, target: str) -> None:
        target_host, _, port = target.rpartition(":")
        self.target = (target_host, int(port))
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.dropping = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.broken: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.sockets += [conn, upstream]
                if self.dropping.is_set():
                    self.broken += [conn, upstream]
            for source, sink in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.dropping.is_set():
                with self.lock:
                    if source not in self.broken:
                        self.broken += [source, sink]
                continue
            try:
                sink.sendall(data)
            except OSError:
                break
        if not self.dropping.is_set():
            self._close(source, sink)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def partition(self) -> None:
        with self.lock:
            self.broken = list(self.sockets)
        self.dropping.set()

    def heal(self) -> None:
        with self.lock:
            broken, self.broken = self.broken, []
            self.dropping.clear()
        self._close(*broken)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        self._close(*sockets)


def _called(node: NodeProcess, key: str, timeout: float) -> int:
    return node.send(f"call {key} {timeout}")


def _answer(node: NodeProcess, key: str, mark: int) -> dict[str, Any]:
    return node.wait_for(
        lambda e: e["event"] == "called" and e["key"] == key, since=mark, timeout=TIMEOUT
    )


def test_a_partitioned_node_makes_its_actors_unavailable_never_doubled(
    cluster: Cluster,
) -> None:
    # client, a and b see each other directly; x reaches each of them only through a
    # proxy of its own (they do not dial x: it is not in their discovery). The peers' lists
    # would name their own addresses, a route around the proxies: not used here.
    names = ["client", "a", "b", "x"]
    addresses = _addresses(names, HOSTS)
    majority = names[:3]
    proxies = {n: Blackhole(PROXY_HOST, addresses[n]) for n in majority}
    for proxy in proxies.values():
        cluster.stack.callback(proxy.close)

    def peers(name: str) -> list[str]:
        if name == "x":
            return [proxy.address for proxy in proxies.values()]
        return [addresses[other] for other in majority if other != name]

    client = cluster.start(
        "client", addresses["client"], peers("client"), client=True, peer_lists=False
    )
    a, b = (cluster.start(n, addresses[n], peers(n), peer_lists=False) for n in ("a", "b"))
    x = cluster.start("x", addresses["x"], peers("x"), peer_lists=False)
    _meshed([client, a, b, x])
    out_client = cluster.load(client, "c", senders=8, rate=25, duration=60, max=2_000, timeout=1.0)
    out_x = cluster.load(x, "x", senders=4, rate=25, duration=60, max=2_000, timeout=1.0)
    _progress(client, 200)
    _progress(x, 100)
    x_keys = sorted(x.command("keys", wait_for_event="keys")["keys"])
    a_keys = sorted(a.command("keys", wait_for_event="keys")["keys"])
    assert x_keys
    assert a_keys

    for proxy in proxies.values():
        proxy.partition()
    partitioned_at = time.monotonic()
    for name in majority:
        cluster.nodes[name].wait_for("node-down", "x", timeout=TIMEOUT)
        x.wait_for("node-down", name, timeout=TIMEOUT)
    # What x holds now it holds until the partition heals (nobody activates a key while a
    # peer that may hold it is unreachable).
    x_keys = sorted(x.command("keys", wait_for_event="keys")["keys"])
    # The documented behaviour. Majority side: keys the unreachable node held, and fresh
    # keys (it might hold them), are unavailable; the others answer. Minority side: its own
    # actors answer its callers; the rest is unavailable.
    probes = {
        (client, x_keys[0]): "ActorUnavailable",
        (client, "fresh:1"): "ActorUnavailable",
        (client, a_keys[0]): "ok",
        (x, x_keys[0]): "ok",
        (x, a_keys[0]): "ActorUnavailable",
        (x, "fresh:2"): "ActorUnavailable",
    }
    marks = {probe: _called(probe[0], probe[1], 2.0) for probe in probes}
    outcomes = {probe: _answer(*probe, mark)["outcome"] for probe, mark in marks.items()}
    assert outcomes == probes, outcomes
    healed_at = time.monotonic()
    for proxy in proxies.values():
        proxy.heal()
    for name in majority:
        cluster.nodes[name].wait_for("node-up", "x", count=2, timeout=TIMEOUT)
        x.wait_for("node-up", name, count=2, timeout=TIMEOUT)
    _progress(client, 100)
    for node in (x, client):
        node.command("stop-load", wait_for_event="load-done", timeout=TIMEOUT)
    for node in (x, client):
        settled = node.command("settle 20", wait_for_event="settled", timeout=TIMEOUT)
        assert settled["unanswered"] == 0, settled
    rows = _rows(out_client) + _rows(out_x)
    keys = [_key(i) for i in range(KEYS)]
    finals = cluster.read(client, [*keys, "fresh:1", "fresh:2"])

    # Everything queued during the partition was handled once, in order, after it; one
    # lineage per key (no second activation started from nothing), no overlap.
    _check_delivery(rows, {k: finals[k] for k in keys})
    spans = _check_single_activation(cluster.log_dir)
    for key in x_keys:
        assert all(s.activation.startswith("x:") for s in spans[key]), spans[key]
    # Nothing crossed the partition: no call across it was answered while it lasted
    # (an answer would mean a message went through, or a second activation took it).
    x_senders = {r.sender for r in _rows(out_x)}
    across = [
        r
        for r in rows
        if partitioned_at < r.sent_at
        and r.answered_at < healed_at
        and (r.key in x_keys) != (r.sender in x_senders)
    ]
    assert across, "callers on both sides must have tried to cross the partition"
    assert all(r.outcome != "ok" for r in across), [r for r in across if r.outcome == "ok"]
    refused = {r.key for r in across if r.outcome == "ActorUnavailable"}
    assert refused & set(x_keys), "majority callers were told X's actors are unavailable"
    for fresh in ("fresh:1", "fresh:2"):  # the refused probes were handled after healing
        assert [s for s, _ in finals[fresh]["seen"]] == [
            f"probe-{'client' if fresh == 'fresh:1' else 'x'}"
        ]


def _placed_on(node: str, nodes: list[str]) -> str:
    """A key whose placement among ``nodes`` is ``node``."""
    from handoff._codec import Codec
    from handoff.engine._actors import place

    codec = Codec()
    return next(
        key for key in (f"solo:{i}" for i in range(1_000)) if place(codec.packb(key), nodes) == node
    )


def test_a_caller_cut_off_from_the_owner_it_used_is_told_unavailable_at_once(
    cluster: Cluster,
) -> None:
    addresses = _addresses(["a", "x"], HOSTS)
    proxy = Blackhole(PROXY_HOST, addresses["a"])
    cluster.stack.callback(proxy.close)
    a = cluster.start("a", addresses["a"], [])
    x = cluster.start("x", addresses["x"], [proxy.address])
    _meshed([a, x])
    key = _placed_on("a", ["a", "x"])
    first = _answer(x, key, _called(x, key, 10.0))
    assert first["outcome"] == "ok", first  # x's channel to the key now leads to a
    proxy.partition()
    x.wait_for("node-down", "a", timeout=TIMEOUT)
    # x knows a is unreachable: nothing may activate the key, and x says so.
    cut_off = _answer(x, key, _called(x, key, 0.5))
    assert cut_off["outcome"] == "ActorUnavailable", cut_off


# -- the checks themselves ------------------------------------------------------------------


def test_the_checks_catch_loss_doubles_reordering_and_overlap(tmp_path: Path) -> None:
    def row(n: int, outcome: str = "ok", lineage: str = "L") -> Row:
        return Row("s0", "k", n, "call", outcome, lineage, "act", 0.0, 0.0)

    rows = [row(0), row(1, "ActorTimeout", lineage=""), row(2, "sent", lineage="")]
    good = {"k": {"lineage": "L", "seen": [["s0", 0], ["s0", 1], ["s0", 2]]}}
    assert _check_delivery(rows, good)["messages"] == 3
    for seen in (
        [["s0", 0], ["s0", 2]],  # a message lost
        [["s0", 0], ["s0", 1], ["s0", 1], ["s0", 2]],  # handled twice
        [["s0", 1], ["s0", 0], ["s0", 2]],  # out of order
    ):
        with pytest.raises(AssertionError):
            _check_delivery(rows, {"k": {"lineage": "L", "seen": seen}})
    with pytest.raises(AssertionError):  # a new lineage where none may start
        _check_delivery(rows, {"k": {**good["k"], "lineage": "M"}})
    with pytest.raises(AssertionError):  # what the old lineage answered came back
        _check_delivery(rows, {"k": {**good["k"], "lineage": "M"}}, lost=frozenset({"k"}))
    renewed = {"k": {"lineage": "M", "seen": [["s0", 1], ["s0", 2]]}}
    assert _check_delivery(rows, renewed, lost=frozenset({"k"}))["lost_with_owner"] == 1

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_text(
        "\n".join(json.dumps(r) for r in (["H", "k", "a:1", 1.0, 1.1], ["H", "k", "a:1", 2.0, 2.1]))
    )
    (logs / "b.log").write_text(json.dumps(["H", "k", "b:1", 2.2, 2.3]))
    assert [s.activation for s in _check_single_activation(logs)["k"]] == ["a:1", "b:1"]
    (logs / "c.log").write_text(json.dumps(["H", "k", "c:1", 1.5, 1.6]))  # inside a:1's span
    with pytest.raises(AssertionError):
        _check_single_activation(logs)
