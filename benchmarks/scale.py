"""A 32-node cluster of node processes on one machine: join, idle cost, rolling deploys.

Prints one JSON object. The cluster is tests/_scale.py's: every node a process of its own
on its own loopback address (127.0.G.N), one port, found through a real DNS server
(``dns:scale.test:PORT``), each holding a ``TTLCache`` of ``--entries`` entries and a
``handoff.Counters`` with as many increments. Processes are forked from a fork server that
has imported ``handoff`` and stretched the cookie, so the start measures the node, not the
interpreter; the cold costs a real node pays once are measured apart (``cold``).

- ``join``: the processes start together; once all listen, DNS answers all of them at once
  (the worst case: every node dials every other in the same poll). From the last process
  start and from the DNS change to the moment every node has ``nodes - 1`` authenticated
  peers, in seconds and in poll intervals; ``full_polls``: per node, how many polls it had
  made by then, counted from its first poll that found everyone (failed polls included;
  counted by the node itself).
- ``links``: authenticated peers per node (``node.peers()``) and established TCP
  connections per node process (``ss -tnp``: a duplicate link left open would show).
- ``idle`` over ``--idle`` seconds after the join: CPU per node from ``/proc/PID/stat``
  (utime + stime), and bytes sent per node on the mesh's connections from the kernel's own
  per-socket counters (``ss -ti`` ``bytes_sent``: TCP payload, headers not included),
  against the heartbeat frame of the real protocol (a handshake between two sans-IO
  ``Connection`` objects, then one heartbeat) times links times rate.
- ``deploys``: every node replaced one at a time (release v2), then four at a time (v3),
  the Kubernetes way (``maxSurge``: new nodes up and meshed, then the old ones SIGTERMed
  together: they drain and stop). Per step seconds; drain reports (records, acknowledged,
  snapshotted, lost, in doubt); then the union of the new nodes' caches against every
  entry written and their counters summed against every increment.

Usage: ``python benchmarks/scale.py [--nodes 32] [--poll 2] [--idle 10] [--entries 50]
[--port-range 1] [--heartbeat-timeout 3] [--skip-deploys] [--publish-early]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handoff.testing import DNSResponder, free_port_on_all  # noqa: E402
from tests import _scale  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sockets(port: int) -> list[dict[str, Any]]:
    """The established TCP connections from or to ``port``: pid and bytes sent each."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sockets: list[dict[str, Any]] = []
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            pid = None
            if "pid=" in line:
                pid = int(line.split("pid=", 1)[1].split(",", 1)[0])
            sockets.append({"pid": pid, "bytes_sent": 0})
        elif "bytes_sent:" in line and sockets:
            sockets[-1]["bytes_sent"] = int(line.split("bytes_sent:", 1)[1].split()[0])
    return sockets


def _heartbeat_frame(interval: float) -> dict[str, int]:
    """Bytes of one heartbeat on the wire, from the real protocol after a handshake."""
    from handoff.protocol import Connection, Limits, LocalNode, Role

    limits = Limits(heartbeat_interval=interval, heartbeat_timeout=3 * interval)

    def local(name: str) -> LocalNode:
        return LocalNode(
            cluster=_scale.CLUSTER,
            name=name,
            incarnation=f"{name}-1",
            release="v1",
            started_at=0.0,
            address="127.0.0.2:4370",
        )

    cookie = _scale.COOKIE.encode()
    client = Connection(Role.CLIENT, local("a"), cookie, now=0.0, limits=limits)
    server = Connection(Role.SERVER, local("b"), cookie, now=0.0, limits=limits)
    handshake = 0
    for _ in range(10):
        data = client.data_to_send()
        handshake += len(data)
        server.receive_data(data, now=0.0)
        data = server.data_to_send()
        handshake += len(data)
        client.receive_data(data, now=0.0)
    if client.peer is None or server.peer is None:
        raise RuntimeError("the handshake did not complete")
    client.tick(now=interval)
    return {"heartbeat_bytes": len(client.data_to_send()), "handshake_bytes": handshake}


def _cold_costs() -> dict[str, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import handoff"], check=True)
    cold_import = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - started
    from handoff._keys import cluster_key

    started = time.perf_counter()
    cluster_key(os.urandom(16), "other")
    scrypt = time.perf_counter() - started
    return {
        "import_handoff_s": round(cold_import - bare, 3),
        "python_start_s": round(bare, 3),
        "scrypt_once_s": round(scrypt, 3),
    }


def _summary(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def _deploy(
    cluster: _scale.ScaleCluster,
    old: list[_scale.Member],
    generation: int,
    batch: int,
    fills: list[_scale.Fill],
    *,
    publish_early: bool,
) -> tuple[list[_scale.Member], dict[str, Any]]:
    started = time.monotonic()
    new, steps = _scale.rolling_deploy(
        cluster, old, generation, batch, timeout=120.0, publish_early=publish_early
    )
    total = time.monotonic() - started
    reports = [report for step in steps for report in step.reports]
    return new, {
        "batch": batch,
        "steps": len(steps),
        "total_s": round(total, 2),
        "step_s": _summary([step.seconds for step in steps], 2),
        "step_join_s": _summary([step.join_seconds for step in steps], 2),
        "step_drain_and_stop_s": _summary([step.drain_seconds for step in steps], 2),
        "reports": _scale.lost_in(reports),
        "state": _scale.check_state(cluster, new, fills),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--poll", type=float, default=2.0, help="HANDOFF_POLL_INTERVAL")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument("--entries", type=int, default=50, help="cache entries per node")
    parser.add_argument("--port-range", type=int, default=1, help="HANDOFF_PORT_RANGE")
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0)
    parser.add_argument("--skip-deploys", action="store_true")
    parser.add_argument(
        "--publish-early",
        action="store_true",
        help="put new nodes in DNS as soon as they listen (see rolling_deploy)",
    )
    args = parser.parse_args()
    n = args.nodes
    environ = {
        "HANDOFF_POLL_INTERVAL": str(args.poll),
        "HANDOFF_HEARTBEAT_TIMEOUT": str(args.heartbeat_timeout),
        "HANDOFF_PORT_RANGE": str(args.port_range),
        "HANDOFF_DRAIN_TIMEOUT": "60",
    }
    heartbeat_interval = args.heartbeat_timeout / 3
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg()[0],
        },
        "nodes": n,
        "settings": {
            "poll_interval_s": args.poll,
            "heartbeat_interval_s": round(heartbeat_interval, 3),
            "heartbeat_timeout_s": args.heartbeat_timeout,
            "port_range": args.port_range,
            "entries_per_node": args.entries,
        },
        "cold": _cold_costs(),
    }
    hosts = [_scale.host_of(g, i) for g in (1, 2, 3) for i in range(n)]
    with DNSResponder() as dns, _scale.scale_cluster(dns, free_port_on_all(hosts), environ) as c:
        first_start = time.monotonic()
        members = _scale.start_generation(c, 1, range(n), args.entries)
        joined = _scale.join(c, members, 120.0)
        polls = [j.full_polls for j in joined["joined"]]
        from_dns = joined["meshed_at"] - joined["published_at"]
        result["join"] = {
            "start_to_all_listening_s": round(joined["listening_at"] - first_start, 2),
            "from_last_start_s": round(joined["meshed_at"] - joined["last_start"], 2),
            "from_dns_s": round(from_dns, 2),
            "from_dns_in_poll_intervals": round(from_dns / args.poll, 2),
            "full_polls_max": max(polls),
            "full_polls_histogram": {str(k): polls.count(k) for k in sorted(set(polls))},
        }
        peers = [len(c.stats(m)["peers"]) for m in members]
        pids = {m.pid for m in members}
        sockets = [s for s in _sockets(c.port) if s["pid"] in pids]
        per_pid = [sum(1 for s in sockets if s["pid"] == pid) for pid in pids]
        result["links"] = {
            "peers_per_node": _summary([float(p) for p in peers], 0),
            "tcp_connections_per_node": _summary([float(p) for p in per_pid], 0),
            "tcp_connections_total": len(sockets) // 2,
            "full_mesh_links": n * (n - 1) // 2,
        }
        cpu_before = {pid: _cpu_seconds(pid) for pid in pids}
        sent_before = sum(s["bytes_sent"] for s in sockets)
        started = time.monotonic()
        time.sleep(args.idle)
        elapsed = time.monotonic() - started
        cpu = [(_cpu_seconds(pid) - cpu_before[pid]) / elapsed * 100 for pid in pids]
        sent = sum(s["bytes_sent"] for s in _sockets(c.port) if s["pid"] in pids)
        frame = _heartbeat_frame(heartbeat_interval)
        measured = (sent - sent_before) / elapsed / n
        expected = (n - 1) * frame["heartbeat_bytes"] / heartbeat_interval
        result["idle"] = {
            "seconds": round(elapsed, 2),
            "cpu_percent_per_node": _summary(cpu, 2),
            "bytes_sent_per_node_per_s": round(measured, 1),
            **frame,
            "expected_heartbeat_bytes_per_node_per_s": round(expected, 1),
            "measured_over_expected": round(measured / expected, 3),
        }
        if not args.skip_deploys:
            fills = [m.fill for m in members]
            second, one = _deploy(c, members, 2, 1, fills, publish_early=args.publish_early)
            result["deploy_one_at_a_time"] = one
            _, four = _deploy(c, second, 3, 4, fills, publish_early=args.publish_early)
            result["deploy_four_at_a_time"] = four
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
