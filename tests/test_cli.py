"""The ``handoff`` command line: help, version, usage errors, the commands that talk to the
local node (status, drain, wait-ready), doctor, and ``handoff simulate``."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import handoff
import handoff.control as control
import handoff.simulate as simulate
from handoff import Node, Peer
from handoff._text import duration
from handoff.cli import (
    EXIT_CONTROL_ERROR,
    EXIT_FAILED,
    EXIT_NO_NODE,
    EXIT_PERMISSION,
    EXIT_USAGE,
    main,
)
from handoff.engine import DrainReport
from handoff.protocol import SUPPORTED_VERSIONS
from handoff.testing import DNSResponder, NodeProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


COMMANDS = ("status", "drain", "wait-ready", "doctor", "simulate")


def test_help_lists_every_command_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: handoff" in out
    for command in COMMANDS:
        assert command in out
    assert "exit codes:" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: handoff {command}" in out
    assert "--json" in out
    assert "exit codes:" in out
    for code in ("0 ", "1 ", "3 ", "4 ", "5 "):
        assert f"  {code}" in out


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


@pytest.mark.parametrize("module", ["handoff.cli", "handoff"])
def test_module_entry_point_runs(module: str) -> None:
    # ``python -m handoff`` is the ``handoff`` command too.
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"handoff {handoff.__version__}"


def test_simulate_runs_the_simulation_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The real runs are tested in test_simulate.py; here only that the command reaches them
    # with its arguments parsed and passes the exit code on.
    seen: list[argparse.Namespace] = []

    def run_from_args(args: argparse.Namespace) -> int:
        seen.append(args)
        return 1

    monkeypatch.setattr(simulate, "run_from_args", run_from_args)
    assert main(["simulate", "--json", "--entries", "1000", "--seconds", "2"]) == 1
    (args,) = seen
    assert (args.json, args.entries, args.seconds) == (True, 1000, 2.0)


# -- status, drain, wait-ready against live nodes ------------------------------------------------

COOKIE = "cli-test-cookie-0123456789abcdef"
OTHER_COOKIE = "another-cookie-0123456789abcdef"
NOBODY = 65534


def make_node(
    name: str,
    control_socket: Path | str,
    *,
    discovery: str = "none",
    cluster: str = "shop",
    cookie: str = COOKIE,
    **kwargs: Any,
) -> Node:
    return Node(
        cluster,
        cookie=cookie,
        name=name,
        release=kwargs.pop("release", "v1"),
        bind="127.0.0.1:0",
        discovery=discovery,
        control_socket=str(control_socket),
        environ={},
        poll_interval=0.1,
        heartbeat_timeout=1.0,
        handshake_timeout=1.0,
        **kwargs,
    )


async def wait_for_peer(node: Node, name: str) -> None:
    # Bounded polling: membership has no single event to await from outside the node.
    with anyio.fail_after(5):
        while name not in [p.name for p in node.peers()]:  # noqa: ASYNC110
            await anyio.sleep(0.01)


@asynccontextmanager
async def pair(tmp_path: Path, entries: int = 0) -> AsyncIterator[tuple[Node, Node]]:
    """Node a (release v1, ``entries`` entries) and node b (v2, empty), joined."""
    a = make_node("a", tmp_path / "a.sock", warmup_timeout=0.2)
    a.track("users", {f"k{i}": i for i in range(entries)}, version=2)
    async with a:
        b = make_node("b", tmp_path / "b.sock", discovery=f"static:{a.address}", release="v2")
        b.track("users", {}, version=2)
        async with b:
            # Both ways: b's node-up of a may come after a's of b (a test that watches
            # node-ups from here on must not see it).
            await wait_for_peer(a, "b")
            await wait_for_peer(b, "a")
            yield a, b


async def run_cli(*argv: str) -> int:
    """``main(argv)`` in a worker thread: it runs its own event loop, the nodes run in ours."""
    return await anyio.to_thread.run_sync(main, list(argv))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HANDOFF_*, FLY_* or Kubernetes variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(("HANDOFF_", "FLY_")) or name in ("KUBERNETES_SERVICE_HOST", "POD_IP"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.anyio
async def test_status_table_for_people(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with pair(tmp_path, entries=3) as (a, b):
        assert await run_cli("status", "--socket", str(tmp_path / "a.sock")) == 0
    out = capsys.readouterr().out
    assert "node a of cluster shop, release v1, serving" in out
    assert f"* a       v1       serving  {a.address}" in out
    assert f"  b       v2       serving  {b.address}" in out
    assert "users      mapping  3        2" in out
    assert "last drain: none" in out


@pytest.mark.anyio
async def test_status_json_for_scripts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("HANDOFF_CONTROL_SOCKET", str(tmp_path / "b.sock"))
    async with pair(tmp_path, entries=3):
        assert await run_cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["node"] == "b"
    assert [(m["name"], m["release"], m["state"]) for m in status["members"]] == [
        ("b", "v2", "serving"),
        ("a", "v1", "serving"),
    ]
    assert status["tracked"] == [
        {"namespace": "users", "kind": "mapping", "entries": 0, "version": 2, "spread": "all"}
    ]


@pytest.mark.anyio
async def test_drain_shows_progress_and_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with pair(tmp_path, entries=500) as (a, b):
        assert await run_cli("drain", "--timeout", "5", "--socket", str(tmp_path / "a.sock")) == 0
        assert a.state.value == "draining"
        assert len(b.tracked["users"].obj) == 500
        assert await run_cli("status", "--socket", str(tmp_path / "a.sock")) == 0
    out = capsys.readouterr().out
    assert "draining a within 5 s" in out
    assert "  users: 500 acknowledged, 0 snapshotted, 0 dropped (of 500 exported so far)" in out
    assert "users: 500 held, 500 acknowledged by b, 0 snapshotted" in out
    assert "last drain: drain of a (v1)" in out


@pytest.mark.anyio
async def test_drain_json_is_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with pair(tmp_path, entries=50):
        assert await run_cli("drain", "--json", "--socket", str(tmp_path / "a.sock")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert (report["node"], report["records"], report["acknowledged"]) == ("a", 50, 50)
    assert report["namespaces"]["users"]["successors"] == ["b"]


@pytest.mark.anyio
async def test_drain_that_drops_records_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alone = make_node("alone", tmp_path / "alone.sock")
    alone.track("users", {"k": 1})
    async with alone:
        code = await run_cli("drain", "--json", "--socket", str(tmp_path / "alone.sock"))
    assert code == EXIT_FAILED
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["dropped"] == 1
    assert report["namespaces"]["users"]["dropped"] == {"no successor, no snapshot store": 1}
    assert "error: 1 records lost (1 dropped by alone, 0 by successors" in captured.err


@pytest.mark.anyio
async def test_a_record_over_the_frame_limit_is_dropped_with_the_limit_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A value larger than a chunk may be cannot be sent: the drain's summary is where the
    # operator learns that the limit exists, so it states it.
    async with pair(tmp_path, entries=10) as (a, b):
        a.tracked["users"].obj["huge"] = b"x" * (5 * 1024 * 1024)
        code = await run_cli("drain", "--timeout", "10", "--socket", str(tmp_path / "a.sock"))
        assert len(b.tracked["users"].obj) == 10
    assert code == EXIT_FAILED
    out = capsys.readouterr().out
    assert "dropped 1 record too large for a frame (over 4194304 bytes encoded)" in out
    assert a.last_drain_report is not None
    assert a.last_drain_report.namespaces["users"].dropped == {
        "record too large for a frame (over 4194304 bytes encoded)": 1
    }


@pytest.mark.anyio
async def test_wait_ready_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cold = make_node("cold", tmp_path / "cold.sock", warmup_timeout=30)
    cold.track("users", {})
    async with cold, make_node("idle", tmp_path / "idle.sock"):
        assert await run_cli("wait-ready", "--socket", str(tmp_path / "idle.sock")) == 0
        # An idle node is warm at once: the wait is shown in milliseconds, not "0.003 s".
        assert re.search(
            r"^idle is warm: nothing tracked \(waited [0-9.]+ ms\)$", capsys.readouterr().out, re.M
        )
        code = await run_cli(
            "wait-ready", "--timeout", "0.2", "--json", "--socket", str(tmp_path / "cold.sock")
        )
        assert code == EXIT_FAILED
        captured = capsys.readouterr()
        answer = json.loads(captured.out)
        waited = answer.pop("waited")
        assert answer == {"node": "cold", "warm": False, "reason": ""}
        assert 0.2 <= waited < 5
        assert re.search(r"cold is not warm after [0-9.]+ ms", captured.err)


@pytest.mark.anyio
async def test_wait_ready_waits_for_the_socket_to_appear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A deploy script runs wait-ready right after starting the process: the node binds its
    # socket later, and the CLI reports the whole wait, not just the node's part.
    path = tmp_path / "late.sock"
    async with anyio.create_task_group() as tasks:
        codes: list[int] = []

        async def wait_ready() -> None:
            codes.append(await run_cli("wait-ready", "--timeout", "10", "--socket", str(path)))

        tasks.start_soon(wait_ready)
        await anyio.sleep(0.5)
        assert not codes, "wait-ready gave up before the socket appeared"
        async with make_node("late", path):
            with anyio.fail_after(5):
                while not codes:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
    assert codes == [0]
    out = capsys.readouterr().out
    found = re.search(r"late is warm: nothing tracked \(waited ([0-9.]+) (ms|s)\)", out)
    assert found, out
    waited = float(found[1]) / (1000 if found[2] == "ms" else 1)
    assert 0.5 <= waited < 10


def test_wait_ready_gives_up_on_a_missing_socket_after_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.sock"
    started = time.monotonic()
    assert main(["wait-ready", "--timeout", "0.3", "--socket", str(missing)]) == EXIT_NO_NODE
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 3
    err = capsys.readouterr().err
    assert f"no node is running here: nothing at {missing}" in err
    assert re.search(r"\(waited 3[0-9]{2} ms for it\)", err), err


def test_wait_ready_does_not_wait_when_the_socket_is_configured_away(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("HANDOFF_CONTROL_SOCKET", "none")
    started = time.monotonic()
    assert main(["wait-ready", "--timeout", "30"]) == EXIT_NO_NODE
    assert time.monotonic() - started < 1
    assert "HANDOFF_CONTROL_SOCKET is 'none' here" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.004, "4 ms"),
        (0.0004, "0.4 ms"),
        (0.0, "0 ms"),
        (0.2, "200 ms"),
        (0.1234, "123 ms"),
        (0.9996, "1 s"),  # rounds up to a second: never "1000 ms" or "1e+03 ms"
        (1.5, "1.5 s"),
        (2.485, "2.48 s"),
        (30.0, "30 s"),
        (-0.003, "-3 ms"),
    ],
)
def test_durations_print_in_milliseconds_below_a_second(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_signed_durations_for_clock_offsets() -> None:
    assert duration(0.003, signed=True) == "+3 ms"
    assert duration(-1.25, signed=True) == "-1.25 s"


def test_drain_summary_prints_a_short_drain_in_milliseconds() -> None:
    report = DrainReport(node="a", release="v1", seconds=0.004, namespaces={})
    assert report.summary() == "drain of a (v1) in 4 ms: nothing tracked"


# -- errors: no node, not yours, a broken node ---------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("command", ["status", "drain", "wait-ready"])
async def test_no_node_running(
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    clean_env: pytest.MonkeyPatch,
) -> None:
    missing = tmp_path / "missing.sock"
    clean_env.setenv("HANDOFF_CONTROL_SOCKET", str(missing))
    # wait-ready waits for the socket to appear: a short wait, then the same answer.
    extra = ["--timeout", "0.2"] if command == "wait-ready" else []
    assert await run_cli(command, *extra) == EXIT_NO_NODE
    err = capsys.readouterr().err
    assert f"handoff {command}: error: no node is running here: nothing at {missing}" in err
    assert "--socket PATH or HANDOFF_CONTROL_SOCKET" in err


def test_no_node_anywhere_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert main(["status"]) == EXIT_NO_NODE
    err = capsys.readouterr().err
    assert f"no control socket in {tmp_path / f'handoff-{os.geteuid()}'}" in err


def _dead_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_several_sockets_and_no_cluster_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = tmp_path / f"handoff-{os.geteuid()}"
    directory.mkdir()
    _dead_socket(directory / "one.sock")
    _dead_socket(directory / "two.sock")
    assert main(["status"]) == EXIT_USAGE
    assert "pick one with --socket PATH or HANDOFF_CLUSTER" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's socket")
def test_socket_of_another_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    path = directory / "node.sock"
    _dead_socket(path)
    os.chown(path, NOBODY, NOBODY)
    os.chown(directory, NOBODY, NOBODY)
    assert main(["status", "--socket", str(path)]) == EXIT_PERMISSION
    err = capsys.readouterr().err
    assert f"the control socket {path} belongs to uid {NOBODY}" in err
    assert "run the command as that user" in err


@pytest.mark.anyio
async def test_node_refuses_another_uid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_peer_uid = control.peer_uid

    def the_cli_is_nobody(sock: socket.socket) -> int | None:
        # Only the node's end is named: the CLI's own check of the node stays real.
        return real_peer_uid(sock) if sock.getsockname() in ("", b"") else NOBODY

    async with make_node("a", tmp_path / "a.sock"):
        monkeypatch.setattr(control, "peer_uid", the_cli_is_nobody)
        code = await run_cli("drain", "--socket", str(tmp_path / "a.sock"))
    assert code == EXIT_PERMISSION
    err = capsys.readouterr().err
    assert f"refused: uid {NOBODY}" in err
    assert "may not use the control socket of a" in err


@pytest.mark.anyio
async def test_node_that_hangs_up_is_a_control_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mute.sock"
    async with await anyio.create_unix_listener(path) as listener:

        async def hang_up(stream: anyio.abc.SocketStream) -> None:
            await stream.aclose()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, hang_up)
            assert await run_cli("status", "--socket", str(path)) == EXIT_CONTROL_ERROR
            tasks.cancel_scope.cancel()
    assert "closed the connection before answering" in capsys.readouterr().err


# -- a node in another process -----------------------------------------------------------------


def test_status_and_drain_of_a_node_process(tmp_path: Path) -> None:
    path = tmp_path / "child.sock"
    env = {
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_BIND": f"127.0.0.1:{free_port()}",
        "HANDOFF_CONTROL_SOCKET": str(path),
        "HANDOFF_TEST_STATE": json.dumps({"namespace": "cache", "type": "dict", "entries": 10}),
    }
    cli_env = {**_child_env(), "HANDOFF_CONTROL_SOCKET": str(path)}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "handoff.cli", *argv],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    with NodeProcess(env, name="child") as child:
        child.wait_ready()
        status = cli("status", "--json")
        assert status.returncode == 0, status.stderr
        answer = json.loads(status.stdout)
        assert answer["node"] == "child"
        assert answer["pid"] == child.pid
        assert answer["tracked"] == [
            {"namespace": "cache", "kind": "mapping", "entries": 10, "version": 1, "spread": "all"}
        ]
        drain = cli("drain", "--json", "--timeout", "1")
        assert drain.returncode == EXIT_FAILED  # nobody to take it, no snapshot store
        assert json.loads(drain.stdout)["dropped"] == 10
        assert child.command("stats --no-digest")["state"] == "draining"
    gone = cli("status")
    assert gone.returncode == EXIT_NO_NODE
    assert str(path) in gone.stderr


# -- doctor ------------------------------------------------------------------------------------


def doctor_env(
    monkeypatch: pytest.MonkeyPatch, discovery: str, control_socket: Path, **extra: str
) -> None:
    monkeypatch.setenv("HANDOFF_COOKIE", COOKIE)
    monkeypatch.setenv("HANDOFF_CLUSTER", "shop")
    monkeypatch.setenv("HANDOFF_DISCOVERY", discovery)
    monkeypatch.setenv("HANDOFF_CONTROL_SOCKET", str(control_socket))
    monkeypatch.setenv("HANDOFF_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("HANDOFF_HANDSHAKE_TIMEOUT", "2")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


async def run_doctor(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = await run_cli("doctor", "--json")
    return code, json.loads(capsys.readouterr().out)


def problems(report: dict[str, Any]) -> list[str]:
    return [f"{p['what']} / fix: {p['fix']}" for p in report["problems"]]


@asynccontextmanager
async def observed(node: Node) -> AsyncIterator[list[str]]:
    """Names of every peer ``node`` reports up while the block runs."""
    seen: list[str] = []

    def up(peer: Peer) -> None:
        seen.append(peer.name)

    node.on_node_up(up)
    yield seen


@pytest.mark.anyio
async def test_doctor_with_two_healthy_nodes_found_through_dns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    async with pair(tmp_path) as (a, b), observed(a) as seen_a, observed(b) as seen_b:
        with DNSResponder() as dns:
            dns.set_srv(
                "_handoff._tcp.shop.test",
                [(0, 0, a.port, "a.shop.test"), (0, 0, b.port, "b.shop.test")],
            )
            dns.set_a("a.shop.test", ["127.0.0.1"])
            dns.set_a("b.shop.test", ["127.0.0.1"])
            doctor_env(
                clean_env,
                "dns:_handoff._tcp.shop.test",
                tmp_path / "a.sock",
                HANDOFF_DNS_SERVER=dns.server_spec,
            )
            code, report = await run_doctor(capsys)
            assert await run_cli("doctor") == 0
            human = capsys.readouterr().out
        # The doctor's handshakes stopped short of membership on both nodes.
        assert [p.name for p in a.peers()] == ["b"]
        assert [p.name for p in b.peers()] == ["a"]
    assert code == 0, problems(report)
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["discovery"].startswith("dns:_handoff._tcp.shop.test (SRV)")
    assert report["local"]["node"] == "a"
    peers = {p["name"]: p for p in report["peers"]}
    assert set(peers) == {"a", "b"}
    assert peers["a"]["local"] is True
    assert (peers["b"]["release"], peers["b"]["state"]) == ("v2", "serving")
    assert peers["b"]["namespaces"] == {"users": 2}
    assert peers["b"]["protocol_version"] == max(SUPPORTED_VERSIONS)
    assert abs(peers["b"]["clock_offset"]) < 1
    assert seen_a == seen_b == []
    assert "no problems found" in human
    assert "a (local)" in human


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (
            {"cookie": OTHER_COOKIE},
            ["does not share this cookie (HANDOFF_COOKIE)", "HANDOFF_COOKIE"],
        ),
        (
            {"cluster": "elsewhere"},
            ["is not in cluster 'shop' (HANDOFF_CLUSTER)", "HANDOFF_CLUSTER"],
        ),
    ],
)
async def test_doctor_names_the_variable_that_differs(
    other: dict[str, str],
    expected: Sequence[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    clean_env: pytest.MonkeyPatch,
) -> None:
    node = make_node("odd", tmp_path / "odd.sock", **other)
    async with node, observed(node) as seen:
        doctor_env(clean_env, f"static:{node.address}", tmp_path / "none.sock")
        code, report = await run_doctor(capsys)
        assert node.peers() == []
    assert code == EXIT_FAILED
    assert seen == []
    (problem,) = report["problems"]
    for text in expected:
        assert text in problem["what"] + problem["fix"]
    assert report["local"] is None
    assert "schema versions are listed, not compared" in report["local_note"]


@pytest.mark.anyio
async def test_doctor_reports_unreachable_peers_and_schema_gaps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    local = make_node("local", tmp_path / "local.sock")
    local.track("users", {}, version=2)
    local.track("rooms", {}, version=1)
    peer = make_node("peer", tmp_path / "peer.sock")
    peer.track("users", {}, version=3)
    closed = f"127.0.0.1:{free_port()}"
    async with local, peer:
        doctor_env(
            clean_env, f"static:{local.address},{peer.address},{closed}", tmp_path / "local.sock"
        )
        code, report = await run_doctor(capsys)
    assert code == EXIT_FAILED
    found = problems(report)
    assert len(found) == 2, found
    assert f"peer ({peer.address}) does not track 'rooms'" in found[0]
    assert f"cannot reach {closed}" in found[1]
    assert "HANDOFF_BIND" in found[1]
    assert [p["ok"] for p in report["peers"]] == [True, True, False]
    assert any("'users': version 2 on local, 3 on peer" in note for note in report["notes"])


@pytest.mark.anyio
async def test_doctor_without_discovery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    doctor_env(clean_env, "none", tmp_path / "none.sock")
    code, report = await run_doctor(capsys)
    assert code == EXIT_FAILED
    (problem,) = report["problems"]
    assert "no discovery configured" in problem["what"]
    assert "HANDOFF_DISCOVERY" in problem["fix"]


@pytest.mark.anyio
async def test_doctor_names_unknown_variables_and_a_guessable_cookie(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    doctor_env(clean_env, "none", tmp_path / "none.sock", HANDOFF_DISCOVRY="dns:shop.test")
    code, report = await run_doctor(capsys)
    assert code == EXIT_FAILED
    typo, no_discovery = report["problems"]
    assert "did you mean HANDOFF_DISCOVERY?" in typo["what"]
    assert "no discovery configured" in no_discovery["what"]
    assert any("HANDOFF_COOKIE looks guessable" in note for note in report["notes"])


@pytest.mark.anyio
async def test_doctor_when_dns_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    with DNSResponder() as dns:
        server = dns.server_spec  # closed on leaving: nothing answers there any more
    doctor_env(
        clean_env,
        "dns:shop.test",
        tmp_path / "none.sock",
        HANDOFF_DNS_SERVER=server,
        HANDOFF_POLL_INTERVAL="0.5",  # the doctor's DNS timeout, as a node's, is at most this
    )
    started = time.monotonic()
    code, report = await run_doctor(capsys)
    assert time.monotonic() - started < 5
    assert code == EXIT_FAILED
    (problem,) = report["problems"]
    assert problem["what"].startswith("discovery failed: DNS query")
    assert "HANDOFF_DNS_SERVER" in problem["fix"]


@pytest.mark.anyio
async def test_doctor_when_dns_has_no_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    with DNSResponder() as dns:
        doctor_env(
            clean_env, "dns:shop.test", tmp_path / "none.sock", HANDOFF_DNS_SERVER=dns.server_spec
        )
        code, report = await run_doctor(capsys)
    assert code == EXIT_FAILED
    (problem,) = report["problems"]
    assert "found no address" in problem["what"]


def test_doctor_without_a_cookie(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("HANDOFF_CLUSTER", "shop")
    assert main(["doctor"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "1 problem(s):" in out
    assert "HANDOFF_COOKIE" in out
    assert "fix:" in out


# -- doctor --socket: the running node's settings ----------------------------------------------


def test_doctor_socket_checks_the_running_nodes_settings_not_this_shells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "child.sock"
    port = free_port()
    env = {
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_BIND": f"127.0.0.1:{port}",
        "HANDOFF_DISCOVERY": f"static:127.0.0.1:{port}",  # itself: one handshake to check
        "HANDOFF_CONTROL_SOCKET": str(path),
        "HANDOFF_DRAIN_TIMEOUT": "7",
        "HANDOFF_DISCOVRY": "dns:typo.test",
    }
    # This shell says something else, and has no cookie: none of it may show.
    clean_env.setenv("HANDOFF_CLUSTER", "elsewhere")
    clean_env.setenv("HANDOFF_DRAIN_TIMEOUT", "3")
    with NodeProcess(env, name="child") as child:
        child.wait_ready()
        code = main(["doctor", "--socket", str(path), "--json"])
        raw = capsys.readouterr().out
        assert main(["doctor", "--socket", str(path)]) == code
        human = capsys.readouterr().out
        pid = child.pid
    # Without --socket: this shell's environment, as before.
    assert main(["doctor", "--json"]) == EXIT_FAILED
    shell = json.loads(capsys.readouterr().out)
    assert shell["origin"] == "environment"
    assert "HANDOFF_COOKIE" in shell["problems"][0]["what"]

    report = json.loads(raw)
    assert code == EXIT_FAILED  # the node's misspelt variable
    assert f"the running node child (pid {pid}, control socket {path})" == report["origin"]
    settings = {row["setting"]: (row["value"], row["source"]) for row in report["settings"]}
    assert settings["cluster"] == ("shop", "HANDOFF_CLUSTER")
    assert settings["drain_timeout"] == ("7 s", "HANDOFF_DRAIN_TIMEOUT")
    assert settings["warmup_timeout"][1] == "default"
    assert settings["cookie"] == (f"(set, {len(COOKIE)} bytes)", "HANDOFF_COOKIE")
    assert settings["control_socket"] == (str(path), "HANDOFF_CONTROL_SOCKET")
    assert COOKIE not in raw
    assert COOKIE not in human
    (problem,) = report["problems"]
    assert "'HANDOFF_DISCOVRY' is set but no setting reads it" in problem["what"]
    assert problem["severity"] == "warning"
    (peer,) = report["peers"]
    assert (peer["ok"], peer["name"], peer["local"]) == (True, "child", True)
    assert report["local"]["node"] == "child"
    assert f"settings and checks of the running node child (pid {pid}" in human
    assert re.search(r"drain_timeout\s+7 s\s+HANDOFF_DRAIN_TIMEOUT", human)


@pytest.mark.anyio
async def test_doctor_socket_says_which_settings_came_from_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    node = make_node("solo", tmp_path / "solo.sock", drain_timeout=2.5)
    async with node:
        code = await run_cli("doctor", "--socket", str(tmp_path / "solo.sock"), "--json")
    report = json.loads(capsys.readouterr().out)
    settings = {row["setting"]: (row["value"], row["source"]) for row in report["settings"]}
    assert settings["drain_timeout"] == ("2.5 s", "argument")
    assert settings["poll_interval"] == ("0.1 s", "argument")
    assert settings["snapshot_dir"] == ("(no snapshots)", "default")
    assert code == EXIT_FAILED  # no discovery: the node's own finding
    (problem,) = report["problems"]
    assert "no discovery configured" in problem["what"]


# -- status --all: the worker nodes of one machine -------------------------------------------


def test_status_all_shows_every_worker_node_of_the_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "shop.sock"
    port = free_port()
    # Every worker starts with the same environment, as under uvicorn --workers 2.
    env = {
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_BIND": f"127.0.0.1:{port}",
        "HANDOFF_DISCOVERY": "none",
        "HANDOFF_CONTROL_SOCKET": str(configured),
    }
    _dead_socket(tmp_path / "other.sock")  # not this cluster's: --all leaves it out
    clean_env.setenv("HANDOFF_CONTROL_SOCKET", str(configured))
    with NodeProcess(env, name="w") as first:
        first.wait_ready()
        with NodeProcess(env, name="w") as second:
            second.wait_ready()
            code = main(["status", "--all", "--json"])
            nodes = json.loads(capsys.readouterr().out)["nodes"]
            assert main(["status", "--all"]) == 0
            human = capsys.readouterr().out
            # --socket-dir: every socket there, the other cluster's (dead) one too.
            assert main(["status", "--socket-dir", str(tmp_path), "--json"]) == EXIT_NO_NODE
            everything = json.loads(capsys.readouterr().out)["nodes"]
            pids = (first.pid, second.pid)
    assert code == 0
    by_socket = {Path(n["socket"]).name: n["status"] for n in nodes}
    assert len(by_socket) == 2
    worker_socket = next(name for name in by_socket if name != "shop.sock")
    worker_port = int(worker_socket.removeprefix("shop-").removesuffix(".sock"))
    assert worker_port != port
    assert by_socket["shop.sock"]["node"] == "w"
    assert by_socket[worker_socket]["node"] == f"w-{worker_port}"
    assert (by_socket["shop.sock"]["pid"], by_socket[worker_socket]["pid"]) == pids
    assert "2 of 2 local nodes answer" in human
    assert re.search(r"shop\.sock\s+w\s+unversioned\s+serving\s+yes", human)
    assert f"== {tmp_path / worker_socket} ==" in human
    assert f"node w-{worker_port} of cluster shop" in human
    assert [Path(n["socket"]).name for n in everything] == ["other.sock", *sorted(by_socket)]
    assert "status" not in everything[0]
    assert "no node is running" in everything[0]["error"]
    # When they have stopped: no node answers, and it says where it looked.
    assert main(["status", "--all"]) == EXIT_NO_NODE
    assert "no control socket found" in capsys.readouterr().err


def test_status_all_and_socket_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--all", "--socket", "/tmp/x.sock"]) == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err
