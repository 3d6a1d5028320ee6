"""``handoff simulate``: the traffic model, the charts, the arguments, and real runs.

The fast tests check the pieces without processes: Zipf sampling, the traffic spec, the
balancer's split (it must be the drain's), the request loop, the terminal chart and the SVG.
The slow ones run real deploys, cold and warm, on small settings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from handoff._demo import (
    StaleReads,
    TrafficSpec,
    final_writes,
    is_stale,
    run_traffic,
    version_of,
    versioned,
    zipf_table,
)
from handoff.engine import Router
from handoff.simulate import (
    BIN_SECONDS,
    Comparison,
    DemoSettings,
    DeployRun,
    TrafficBin,
    add_simulate_arguments,
    loopback_aliases_usable,
    render_chart,
    render_svg,
    render_table,
    run_from_args,
)
from handoff.testing import STATE_ENV, NodeProcess, NodeProcessError, free_port

SVG = "{http://www.w3.org/2000/svg}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="handoff simulate", exit_on_error=True)
    add_simulate_arguments(parser)
    return parser


def _spec(**changes: Any) -> TrafficSpec:
    now = time.monotonic()
    fields: dict[str, Any] = {
        "epoch": now,
        "start": now,
        "end": now + 0.3,
        "rate": 1000.0,
        "keys": 400,
        "interval": 0.1,
    }
    return TrafficSpec(**{**fields, **changes})


# -- the traffic model --------------------------------------------------------------------------


def test_zipf_table_is_a_distribution_over_ranks() -> None:
    table = zipf_table(1000, 1.0)
    assert len(table) == 1000
    assert table[-1] == 1.0
    assert all(a < b for a, b in itertools.pairwise(table))
    harmonic = sum(1 / (r + 1) for r in range(1000))
    assert table[0] == pytest.approx(1 / harmonic)
    with pytest.raises(ValueError, match="at least 1"):
        zipf_table(0, 1.0)


def test_traffic_spec_round_trips_and_rejects_nonsense() -> None:
    spec = _spec(nodes=("node-b", "node-c"), balance="round-robin", seed=7)
    assert TrafficSpec.parse(spec.to_json()) == spec
    assert spec.requests == 300
    assert spec.first_bin() == 0
    assert spec.last_bin() == 2
    for bad, message in (
        ({"rate": 0}, "rate must be"),
        ({"keys": 0}, "keys must be"),
        ({"balance": "random"}, "balance must be"),
        ({"nodes": ("a", "a")}, "must not repeat"),
        ({"end": time.monotonic() - 10}, "need epoch <= start <= end"),
        ({"interval": math.nan}, "interval must be"),
    ):
        with pytest.raises(ValueError, match=message):
            _spec(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        TrafficSpec.from_mapping({**json.loads(spec.to_json()), "colour": "red"})
    with pytest.raises(ValueError, match="not JSON"):
        TrafficSpec.parse("{")
    with pytest.raises(ValueError, match="not one of the nodes"):
        spec.owner("node-z")


def test_the_balancer_splits_keys_as_the_drain_does() -> None:
    nodes = ("node-b", "node-c", "node-d")
    spec = _spec(nodes=nodes)
    owners = {name: spec.owner(name) for name in nodes}
    router = Router(list(nodes))
    counts: Counter[str] = Counter()
    for rank in range(3000):
        key = f"k{rank}"
        serving = [name for name, mine in owners.items() if mine(rank, key)]
        assert serving == [nodes[router.route(key)]]
        counts[serving[0]] += 1
    assert min(counts.values()) > 800  # spread about evenly
    round_robin = _spec(nodes=nodes, balance="round-robin")
    assert [n for n in nodes if round_robin.owner(n)(4, "k0")] == ["node-c"]
    assert _spec().owner("anyone")(0, "k0")


def _collect(
    spec: TrafficSpec, me: str, cache: dict[Any, Any], **kwargs: Any
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    async def main() -> None:
        await run_traffic(
            spec,
            cache,
            me=me,
            key_of=lambda rank: f"k{rank}",
            value_of=lambda rank: f"v{rank}",
            emit=lambda event: events.append(dict(event)),
            stopped=kwargs.get("stopped", lambda: False),
            lock=threading.RLock(),
            clock=time.monotonic,
            handed_off=kwargs.get("handed_off", lambda: 0),
        )

    anyio.run(main)
    return events


def test_request_loop_counts_every_request_in_its_bin() -> None:
    spec = _spec()
    cache: dict[Any, Any] = {"k0": "v0"}
    events = _collect(spec, "node-b", cache)
    bins = [e for e in events if e["event"] == "traffic"]
    done = events[-1]
    assert done["event"] == "traffic-done"
    assert done["complete"] is True
    assert [b["bin"] for b in bins] == [0, 1, 2]
    assert sum(b["requests"] for b in bins) == done["requests"] == spec.requests
    for one in bins:
        assert one["hits"] + one["backend_calls"] == one["requests"]
    assert 0 < done["hits"] < done["requests"]
    # What the backend answered was stored: values are the backend's.
    assert all(cache[key] == "v" + key[1:] for key in cache)


def test_request_loop_split_by_key_serves_each_request_once() -> None:
    now = time.monotonic()
    nodes = ("node-b", "node-c")
    spec = _spec(epoch=now, start=now, end=now + 0.2, nodes=nodes)
    served = [_collect(spec, name, {})[-1]["requests"] for name in nodes]
    assert sum(served) == spec.requests
    assert all(count > 0 for count in served)


def test_request_loop_stops_when_told() -> None:
    spec = _spec(end=time.monotonic() + 60)
    deadline = time.monotonic() + 0.2
    started = time.monotonic()
    events = _collect(spec, "node-b", {}, stopped=lambda: time.monotonic() > deadline)
    assert time.monotonic() - started < 2
    assert events[-1]["event"] == "traffic-done"
    assert events[-1]["complete"] is False


def test_a_read_older_than_the_last_write_is_stale() -> None:
    assert version_of(versioned("v7", 12)) == 12
    assert version_of("v7") == 0
    assert version_of(b"v7@3") == 0  # not written by the traffic
    assert is_stale(versioned("v7", 11), 12)
    assert is_stale("v7", 12)  # the initial value, after a write
    assert not is_stale(versioned("v7", 12), 12)
    assert not is_stale(versioned("v7", 13), 12)  # written after
    assert not is_stale("v7", 0)  # never written


class _Reads(dict[Any, Any]):
    """A cache that remembers every value a read returned."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.returned: list[tuple[Any, Any]] = []

    def get(self, key: Any, default: Any = None) -> Any:
        value = super().get(key, default)
        self.returned.append((key, value))
        return value


def test_the_new_stream_counts_each_read_older_than_the_old_streams_last_write() -> None:
    now = time.monotonic()
    old = _spec(epoch=now, start=now, end=now + 0.2, writes=0.2, seed=5)
    new = _spec(epoch=now, start=now + 0.2, end=now + 0.4, writes=0.2, previous=(now, now + 0.2, 5))
    assert TrafficSpec.parse(new.to_json()) == new
    # What the old node's stream wrote, by replay and by running it: the same.
    old_cache: dict[Any, Any] = {}
    assert _collect(old, "node-a", old_cache)[-1]["complete"] is True
    written = final_writes(new, lambda rank: f"k{rank}")
    assert written
    assert written == {k: version_of(v) for k, v in old_cache.items() if version_of(v)}
    assert max(written.values()) <= new.version_base  # the new stream's writes are newer
    # A receiver that holds what the old node held reads nothing stale ...
    honest = _Reads(old_cache)
    assert _collect(new, "node-b", honest)[-1]["stale"] == 0
    # ... one left with the value before the hottest written key's last write does, once
    # for every read that returned it (until the new stream overwrote it).
    hottest = min(written, key=lambda key: int(key[1:]))
    outdated = versioned("v" + hottest[1:], written[hottest] - 1)
    stale = _Reads({**old_cache, hottest: outdated})
    done = _collect(new, "node-b", stale)[-1]
    returned = sum(1 for key, value in stale.returned if key == hottest and value == outdated)
    assert returned > 0
    assert done["stale"] == returned
    # Nothing handed off after them: each is an outdated value the handoff left behind.
    assert (done["stale_in_flight"], done["stale_after_handoff"]) == (0, returned)


class _Delta(_Reads):
    """A receiver whose handoff's last records land between the first read of ``key`` and
    the next read (with ``early``, before the first read of any key): with ``value`` (the
    old node's last write to ``key``) or without it (a delta that missed the key, while
    carrying others)."""

    def __init__(self, held: dict[Any, Any], key: Any, value: Any, *, early: bool) -> None:
        super().__init__(held)
        self.key, self.value = key, value
        self.applied = 0  # records applied (what the node's adapter counts)
        self.due = early

    def get(self, key: Any, default: Any = None) -> Any:
        if self.due:
            self.due, self.applied = False, 1
            if self.value is not None:
                self[self.key] = self.value
        found = super().get(key, default)
        self.due = self.due or (key == self.key and not self.applied)
        return found


def test_a_stale_read_before_the_handoffs_last_record_is_in_flight_after_it_left_behind() -> None:
    now = time.monotonic()
    new = _spec(epoch=now, start=now + 0.2, end=now + 0.4, writes=0.2, previous=(now, now + 0.2, 5))
    written = final_writes(new, lambda rank: f"k{rank}")
    hottest = min(written, key=lambda key: int(key[1:]))
    current = versioned("v" + hottest[1:], written[hottest])
    outdated = versioned("v" + hottest[1:], written[hottest] - 1)
    held = {key: versioned("v" + key[1:], version) for key, version in written.items()}
    # The last write arrives after one read returned the value before it: in flight.
    late = _Delta({**held, hottest: outdated}, hottest, current, early=False)
    done = _collect(new, "node-b", late, handed_off=lambda: late.applied)[-1]
    assert (done["stale"], done["stale_in_flight"], done["stale_after_handoff"]) == (1, 1, 0)
    # A delta that missed the key: every read of it after the last record is left behind.
    missed = _Delta({**held, hottest: outdated}, hottest, None, early=True)
    done = _collect(new, "node-b", missed, handed_off=lambda: missed.applied)[-1]
    returned = sum(1 for key, value in missed.returned if key == hottest and value == outdated)
    assert returned > 0
    assert (done["stale_in_flight"], done["stale_after_handoff"]) == (0, returned)


def test_stale_reads_split_at_the_last_application_of_handed_off_records() -> None:
    reads = StaleReads()
    reads.read(0)
    reads.read(3)  # records applied since the first: it was in flight
    reads.read(3)
    assert (reads.in_flight, reads.after_handoff, reads.total) == (1, 2, 3)
    reads.settle(3)  # nothing applied since: still left behind
    assert (reads.in_flight, reads.after_handoff) == (1, 2)
    reads.settle(4)  # a later record: they were in flight too
    assert (reads.in_flight, reads.after_handoff, reads.total) == (3, 0, 3)


# -- the output, from a made-up comparison ------------------------------------------------------


def _comparison() -> Comparison:
    settings = DemoSettings(entries=100, seconds=4)
    comparison = Comparison(settings, ok=True)
    for label, handoff in (("cold", False), ("warm", True)):
        run = DeployRun(label, handoff, settings)
        for index, one in enumerate(run.bins):
            after = index >= settings.before_bins
            rate = 0.9 if not after or handoff else 0.3 + 0.05 * (index - settings.before_bins)
            hits = round(500 * rate)
            one.add(TrafficBin(500, hits, 500 - hits))
        run.entries_before = 100
        run.entries_moved = 100 if handoff else 0
        run.deploy.drain = {"seconds": 0.12} if handoff else None
        setattr(comparison, label, run)
    return comparison


def test_terminal_chart_shows_both_runs_side_by_side() -> None:
    comparison = _comparison()
    lines = render_chart(comparison)
    assert "cold: no handoff" in lines[1]
    assert "warm: handoff" in lines[1]
    assert [line.count("▲") for line in lines[1:] if "▲" in line] == [2]  # one per panel
    assert lines[-1].split()[:3] == ["-1s", "0", "+3s"]
    axis = next(line for line in lines[1:] if "▲" in line)
    assert axis.count("0%") == 2
    # 16 bins of 0.25 s, each drawn twice to fill 32 columns, 4 of them before the switch.
    # Just below 100%, the warm run's bars are full throughout, the cold run's only before.
    second = lines[1].index("warm: handoff") - 5
    row = lines[3]
    assert row[:second].count("█") == 8
    assert row[second:].count("█") == 32
    plain = render_chart(comparison, unicode=False)
    assert all(line.isascii() for line in plain)
    assert any("^" in line for line in plain)


def test_table_lists_the_numbers_of_both_runs() -> None:
    text = "\n".join(render_table(_comparison()))
    assert "hit rate, first 2 s after" in text
    assert "47.5%" in text
    assert "120 ms" in text  # the handoff time: milliseconds below a second
    assert "100 of 100" in text


def test_svg_is_valid_and_has_a_line_per_run_and_panel() -> None:
    root = ET.fromstring(render_svg(_comparison()))
    assert root.tag == f"{SVG}svg"
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 4  # hit rate and backend calls, cold and warm
    for line in lines:
        points = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
        assert len(points) == 16
        xs = [x for x, _ in points]
        assert xs == sorted(xs)
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "switch" in texts
    assert "warm: handoff" in texts


def test_json_of_a_comparison_has_the_headline_numbers() -> None:
    data = _comparison().as_dict()
    assert data["hit_rate_cold"] == pytest.approx(0.3 + 0.05 * 3.5, abs=0.01)
    assert data["hit_rate_warm"] == pytest.approx(0.9, abs=0.01)
    assert data["backend_calls_warm"] < data["backend_calls_cold"]
    assert (data["entries_before"], data["entries_after"], data["lost"]) == (100, 100, 0)
    assert len(data["cold"]["series"]) == DemoSettings(entries=100, seconds=4).bins


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--nodes", "0"],
        ["--nodes", "9"],
        ["--nodes", "two"],
        ["--entries", "0"],
        ["--entries", "1e3"],
        ["--seconds", "0"],
        ["--seconds", "nan"],
        ["--seconds", "soon"],
        ["--rate", "5"],
        ["--balance", "random"],
        ["--spread", "some"],
        ["--plot", "chart.png"],
        ["--plot", "/no/such/directory/chart.svg"],
        ["--no-such-option"],
        ["--host-base", "10.0.0.1"],
        ["--host-base", "localhost"],
        ["--host-base", "::1"],
        ["--host-base", "127.0.0.0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_drains_spread_follows_the_balancer_unless_given() -> None:
    assert DemoSettings(balance="key").drain_spread == "split"
    assert DemoSettings(balance="round-robin").drain_spread == "all"
    assert DemoSettings(balance="round-robin", spread="split").drain_spread == "split"
    assert DemoSettings(balance="key", spread="all").as_dict()["spread"] == "all"
    with pytest.raises(ValueError, match="spread must be one of split, all"):
        DemoSettings(spread="some")
    assert _parser().parse_args(["--spread", "split"]).spread == "split"
    assert _parser().parse_args([]).spread is None


def test_blackout_runs_from_sigterm_to_the_last_record_applied() -> None:
    settings = DemoSettings(entries=100, seconds=4, precopy=True)
    assert settings.as_dict()["precopy"] is True
    assert _parser().parse_args(["--precopy"]).precopy is True
    run = DeployRun("warm", True, settings)
    assert run.blackout_seconds is None  # no SIGTERM yet
    run.sigterm_at = 2.0
    assert run.blackout_seconds == 0.0  # nothing left to send: a pre-copy had it all
    run.applied_after_sigterm = 2.25
    assert run.blackout_seconds == 0.25
    assert run.as_dict()["blackout_seconds"] == 0.25
    assert DeployRun("cold", False, settings).blackout_seconds is None


def test_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for word in ("--nodes", "--entries", "--seconds", "--json", "--plot", "SIGTERM", "SVG only"):
        assert word in out
    defaults = _parser().parse_args([])
    assert (defaults.nodes, defaults.entries, defaults.seconds) == (2, 20_000, 8.0)


# -- real runs -----------------------------------------------------------------------------------


def _loopback_usable() -> bool:
    try:
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            with socket.socket() as sock:
                sock.bind((host, 0))
    except OSError:
        return False
    return True


def _run(argv: list[str]) -> tuple[int, str, str]:
    args = _parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_from_args(args)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_warm_deploy_keeps_the_hit_rate_and_spares_the_backend(tmp_path: Path) -> None:
    if not _loopback_usable():
        pytest.skip("needs 127.0.0.2-4 (on macOS: ifconfig lo0 alias 127.0.0.2)")
    plot = tmp_path / "chart.svg"
    started = time.monotonic()
    code, out, err = _run(["--json", "--entries", "2000", "--seconds", "3", "--plot", str(plot)])
    assert code == 0, err
    assert time.monotonic() - started < 30
    report = json.loads(out)
    assert report["ok"] is True, report["error"]
    assert (report["entries_before"], report["entries_after"], report["lost"]) == (2000, 2000, 0)
    assert report["handoff_seconds"] > 0
    assert report["hit_rate_before"] > 0.7
    # Right after the switch the warm run keeps its hit rate; the cold one starts empty.
    assert report["hit_rate_warm"] > report["hit_rate_cold"] + 0.1
    assert report["hit_rate_warm"] > 0.7
    assert report["backend_calls_warm"] < 0.75 * report["backend_calls_cold"]
    # The drain hands on the old node's last writes (keep-existing never keeps an older
    # value than the backend's), and without handoff the new nodes load them.
    assert report["stale_reads"] == 0
    cold, warm = report["cold"], report["warm"]
    assert cold["writes"]["before"] > 0
    assert cold["stale_reads"] == 0
    assert cold["lost"] == 2000
    assert cold["handoff_seconds"] is None
    assert warm["drain"]["namespaces"]["cache"]["acknowledged"] == 2000
    settings = report["settings"]
    for run in (cold, warm):
        assert all(node["exit_code"] == 0 for node in run["nodes"])
        assert len(run["series"]) == round(settings["seconds"] / BIN_SECONDS)
        # Every request of the stream was served exactly once, by one node.
        assert run["requests"]["after"] + run["writes"]["after"] == round(
            settings["rate"] * (settings["seconds"] - settings["seconds_before_switch"])
        )
        assert not run["late"]
    # The same requests in both runs: the runs differ only by the handoff.
    assert cold["series"][0]["requests"] == warm["series"][0]["requests"]
    assert cold["backend_calls"]["before"] == warm["backend_calls"]["before"]
    assert report["plot"] == str(plot)
    root = ET.parse(plot).getroot()
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f"{SVG}polyline")) >= 4


@pytest.mark.slow
def test_readable_output_shows_progress_chart_and_table() -> None:
    if not _loopback_usable():
        pytest.skip("needs 127.0.0.2-4 (on macOS: ifconfig lo0 alias 127.0.0.2)")
    code, out, err = _run(["--entries", "1000", "--seconds", "2", "--balance", "round-robin"])
    assert code == 0, err
    assert "cold run (without handoff)" in out
    assert "warm run (with handoff)" in out
    assert (
        "switch: the balancer sends the traffic to node-b, node-c round-robin; "
        "the drain's spread: all" in out
    )
    # Round-robin: each new node got its own copy of every key (as far as it fits: the new
    # nodes fill from the backend while the drain runs).
    assert "node-a  drained: 1000 held, 1000 acknowledged by" in out
    assert "(copies to each: node-b " in out
    assert "cache hit rate (a column is" in out
    assert "hit rate, first" in out
    assert "entries lost" in out
    assert "round-robin" in out


@pytest.mark.slow
def test_node_process_serves_traffic_and_may_stop_without_draining() -> None:
    state = {"entries": 50, "maxsize": 50, "hot_first": True, "drain_on_stop": False}
    env = {
        STATE_ENV: json.dumps(state),
        "HANDOFF_COOKIE": secrets.token_urlsafe(16),
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_BIND": f"127.0.0.1:{free_port()}",
        "HANDOFF_DISCOVERY": "none",
    }
    with NodeProcess(env, name="solo", log_level="WARNING") as node:
        node.wait_ready(timeout=20)
        now = time.monotonic()
        spec = _spec(epoch=now, start=now + 0.1, end=now + 0.6, keys=200, interval=0.25)
        with pytest.raises(NodeProcessError, match="invalid traffic spec"):
            node.command("traffic {}", timeout=10)
        started = node.command(f"traffic {spec.to_json()}", timeout=10)
        assert started["requests"] == spec.requests
        with pytest.raises(NodeProcessError, match="already running"):
            node.command(f"traffic {spec.to_json()}", timeout=10)
        done = node.wait_for("traffic-done", timeout=10)
        assert done["complete"] is True
        assert done["requests"] == spec.requests
        # hot_first: rank 0 is the hottest entry, so the full cache serves it from the start.
        assert done["hits"] > 0.5 * spec.requests
        assert node.command("stats", timeout=10)["unexpected"] == 0
        assert node.terminate(timeout=10) == 0
        assert not [e for e in node.events if e["event"] == "drained"]


@pytest.mark.slow
def test_traffic_needs_state() -> None:
    env = {
        "HANDOFF_COOKIE": secrets.token_urlsafe(16),
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_BIND": f"127.0.0.1:{free_port()}",
        "HANDOFF_DISCOVERY": "none",
    }
    with NodeProcess(env, name="stateless", log_level="WARNING") as node:
        node.wait_ready(timeout=20)
        with pytest.raises(NodeProcessError, match="needs state"):
            node.command(f"traffic {_spec().to_json()}", timeout=10)


def test_a_run_that_cannot_start_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    # An address no process here can bind (TEST-NET-1): the cold run fails before starting
    # anything, and the command says so and exits 1.
    monkeypatch.setattr(
        "handoff.simulate._plan", lambda _nodes, _base: [("node-a", "v1", "192.0.2.1")]
    )
    code, out, err = _run(["--json", "--entries", "10", "--seconds", "1"])
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert report["error"].startswith("cold run: cannot bind the loopback addresses 192.0.2.1")
    assert report["warm"] is None
    assert "handoff simulate: error: cold run: cannot bind" in err


def test_a_host_base_without_room_for_the_nodes_is_refused_before_anything_starts() -> None:
    # 127.255.255.250 holds the old node; eight new ones would reach past 127.255.255.254.
    code, out, err = _run(["--host-base", "127.255.255.250", "--nodes", "8"])
    assert code == 2
    assert out == ""
    assert "--host-base 127.255.255.250 leaves no room for the 9 nodes" in err
    with pytest.raises(ValueError, match="not a loopback address"):
        DemoSettings(host_base="192.0.2.1")
    assert DemoSettings(host_base="127.0.10.1", nodes=3).new_names == [
        "node-b",
        "node-c",
        "node-d",
    ]


@pytest.mark.slow
def test_two_runs_at_once_with_their_own_host_bases_and_sockets_both_succeed(
    tmp_path: Path,
) -> None:
    bases = ("127.0.10.1", "127.0.20.1")
    if not loopback_aliases_usable([f"127.0.{n}.{i}" for n in (10, 20) for i in (1, 2)]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    sockets = tmp_path / "sockets"  # made by the run; the other run uses a temporary one
    quick = ["--json", "--nodes", "1", "--entries", "200", "--seconds", "1", "--rate", "200"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "handoff", "simulate", *quick, "--host-base", base, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for base, extra in ((bases[0], ["--socket-dir", str(sockets)]), (bases[1], []))
    ]
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        # The nodes' control sockets appear in the directory while they run (and go when
        # they stop): looked at every 50 ms until both runs end, at most 90 s.
        while any(run.poll() is None for run in runs) and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                seen |= {p.name for p in sockets.iterdir() if p.is_socket()}
            time.sleep(0.05)
        outputs = [run.communicate(timeout=10) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    for run, (out, err), base in zip(runs, outputs, bases, strict=True):
        assert run.returncode == 0, err
        report = json.loads(out)
        assert report["ok"] is True, report["error"]
        assert report["settings"]["host_base"] == base
        assert report["entries_before"] == 200
        assert report["warm"]["drain"]["namespaces"]["cache"]["acknowledged"] == 200
        nodes = report["warm"]["nodes"]
        assert [n["address"].split(":")[0] for n in nodes] == [base, base[:-1] + "2"]
    assert seen == {"node-a.sock", "node-b.sock"}


@pytest.mark.slow
def test_a_precopy_run_reports_its_blackout_and_accounts_for_every_record() -> None:
    if not _loopback_usable():
        pytest.skip("needs 127.0.0.2-4 (on macOS: ifconfig lo0 alias 127.0.0.2)")
    code, out, err = _run(
        ["--json", "--entries", "1000", "--seconds", "2", "--balance", "round-robin", "--precopy"]
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True, report["error"]
    assert report["settings"]["precopy"] is True
    assert report["blackout_seconds"] >= 0
    # The traffic started once both new nodes were warm (their pre-copies in).
    assert report["ready_wait_timed_out"] is False
    assert report["ready_wait_seconds"] >= 0
    assert set(report["warm"]["warm"]) == {"node-b", "node-c"}
    # Nothing outdated is left behind once a new node has applied the last records handed
    # to it; before that, reads within the live stream's lag may be stale (README).
    assert report["stale_reads"] == 0
    assert report["stale_reads_in_flight"] >= 0
    assert report["cold"]["stale_reads"] == 0
    assert report["cold"]["blackout_seconds"] is None
    assert report["cold"]["ready_wait_seconds"] is None
    # What the pre-copies had done by SIGTERM (their timing is the machine's).
    assert {p["peer"] for p in report["warm"]["precopies"]} == {"node-b", "node-c"}
    ns = report["warm"]["drain"]["namespaces"]["cache"]
    # The deltas and (for a node whose copy did not finish in time) the whole cache: each
    # record acknowledged, kept or dropped with a reason.
    assert ns["records"] == ns["acknowledged"] + ns["snapshotted"] + sum(ns["dropped"].values())
