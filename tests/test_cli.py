"""The ``handoff`` command line: help, version, usage errors and ``handoff simulate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import handoff
from handoff.cli import main

ROOT = Path(__file__).resolve().parent.parent
NODES = ("node-a", "node-b", "node-c")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_help_lists_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: handoff" in out
    assert "simulate" in out


def test_simulate_help_describes_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out
    assert "--seconds" in out
    assert "SIGTERM" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"handoff {handoff.__version__}"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: handoff" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_simulate_rejects_bad_seconds(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--seconds", value]) == 2
    assert "--seconds" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "handoff.cli", "--version"],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"handoff {handoff.__version__}"


@pytest.mark.slow
def test_simulate_json_reports_the_whole_run(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = main(["simulate", "--json"])
    took = time.monotonic() - started
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert took < 20
    report: dict[str, Any] = json.loads(captured.out)
    assert report["ok"] is True
    assert report["error"] is None
    assert report["seconds"] < 20

    nodes = {n["name"]: n for n in report["nodes"]}
    assert sorted(nodes) == list(NODES)
    assert [nodes[name]["release"] for name in NODES] == ["v1", "v2", "v2"]
    assert all(n["exit_code"] == 0 for n in nodes.values())

    events = report["events"]
    ups = {(e["observer"], e["peer"]) for e in events if e["event"] == "node-up"}
    assert ups == {(a, b) for a in NODES for b in NODES if a != b}
    for event in events:
        if event["event"] == "node-up":
            assert event["release"] == nodes[event["peer"]]["release"]

    stopped = report["stopped"]["name"]
    assert nodes[stopped]["release"] == "v1"
    downs = [e for e in events if e["event"] == "node-down" and e["peer"] == stopped]
    assert {e["observer"] for e in downs} == set(NODES) - {stopped}
    assert all(e["reason"] == "goodbye" for e in downs)
    assert set(report["timings"]["node_down"]) == set(NODES) - {stopped}
    assert report["timings"]["mesh"] is not None

    times = [e["seconds"] for e in events]
    assert times == sorted(times)

    handoff = report["handoff"]
    assert handoff["entries_before"] == 50_000
    assert handoff["entries_after"] == 50_000
    assert handoff["lost"] == 0
    assert set(handoff["per_node"]) == set(NODES) - {stopped}
    assert min(handoff["per_node"].values()) > 20_000  # split between the two
    drained = handoff["report"]["namespaces"]["cache"]
    assert drained["acknowledged"] == 50_000
    assert handoff["handoff_seconds"] > 0
    assert all("handoff" in reason for reason in handoff["warm"].values())


@pytest.mark.slow
def test_simulate_entries_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--json", "--entries", "1000"]) == 0
    handoff = json.loads(capsys.readouterr().out)["handoff"]
    assert (handoff["entries_before"], handoff["entries_after"], handoff["lost"]) == (1000, 1000, 0)


@pytest.mark.slow
def test_simulate_prints_progress_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate"]) == 0
    out = capsys.readouterr().out
    assert "node-b  node-up    node-a (release v1)" in out
    assert "node-c  node-down  node-a (release v1): goodbye" in out
    assert "summary" in out
    assert "every node stopped cleanly" in out


@pytest.mark.slow
def test_simulate_that_runs_out_of_time_fails_clearly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Far too short to start three Python processes: the run must fail, say what it was
    # still waiting for, and leave no process behind (the fixture-free cleanup is inside).
    started = time.monotonic()
    assert main(["simulate", "--json", "--seconds", "0.05"]) == 1
    assert time.monotonic() - started < 10
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False
    assert "not done within 0.05 s" in report["error"]
    assert "node-a to listen" in report["error"]
    assert "handoff simulate: error: not done within" in captured.err
    assert all(n["exit_code"] is not None for n in report["nodes"])
