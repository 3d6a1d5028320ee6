"""The control socket: serving and replacing it, who may use it, its bounds, its commands."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import handoff.control as control
from handoff import Node
from handoff.control import (
    AmbiguousSocket,
    ControlError,
    ControlPermissionError,
    ControlSocketError,
    NoControlSocket,
    NoNodeRunning,
    call,
    local_sockets,
    locate_socket,
    peer_uid,
    uid_allowed,
)

pytestmark = pytest.mark.anyio

COOKIE = "control-test-cookie-0123456789"
NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def make_node(
    name: str,
    control_socket: Path | str,
    *,
    discovery: str = "none",
    environ: dict[str, str] | None = None,
    **kwargs: Any,
) -> Node:
    return Node(
        "shop",
        cookie=COOKIE,
        name=name,
        release=kwargs.pop("release", "v1"),
        bind="127.0.0.1:0",
        discovery=discovery,
        control_socket=None if control_socket == "default" else str(control_socket),
        environ={} if environ is None else environ,
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
    """Node a (holding ``entries`` entries) and node b (empty), joined, each with a socket."""
    a = make_node("a", tmp_path / "a.sock", warmup_timeout=0.2)
    a.track("users", {f"k{i}": i for i in range(entries)}, version=2)
    async with a:
        b = make_node("b", tmp_path / "b.sock", discovery=f"static:{a.address}")
        b.track("users", {}, version=2)
        async with b:
            await wait_for_peer(a, "b")
            yield a, b


async def raw_exchange(path: Path, data: bytes, *, within: float = 5.0) -> list[dict[str, Any]]:
    """Send raw bytes, return every reply line until the server closes."""
    replies: list[dict[str, Any]] = []
    with anyio.fail_after(within):
        async with await anyio.connect_unix(path) as stream:
            if data:
                await stream.send(data)
            buffered = BufferedByteReceiveStream(stream)
            while True:
                try:
                    line = await buffered.receive_until(b"\n", 1 << 20)
                except (anyio.IncompleteRead, anyio.EndOfStream):
                    return replies
                replies.append(json.loads(line))


# -- serving the socket -------------------------------------------------------------------------


async def test_status_answers_with_members_state_and_versions(tmp_path: Path) -> None:
    async with pair(tmp_path, entries=3) as (a, b):
        assert a.control_socket == tmp_path / "a.sock"
        reply = await call(tmp_path / "a.sock", {"command": "status"}, time_limit=5)
        b_address = b.address
    status = reply["status"]
    assert (status["node"], status["cluster"], status["release"]) == ("a", "shop", "v1")
    assert status["state"] == "serving"
    assert status["pid"] == os.getpid()
    members = {m["name"]: m for m in status["members"]}
    assert set(members) == {"a", "b"}
    assert members["a"]["self"] is True
    assert members["b"]["address"] == b_address
    assert members["b"]["release"] == "v1"
    assert members["b"]["state"] == "serving"
    assert members["b"]["namespaces"] == {"users": 2}
    assert status["tracked"] == [
        {"namespace": "users", "kind": "mapping", "entries": 3, "version": 2, "spread": "all"}
    ]
    assert status["last_drain"] is None


async def test_socket_is_private_and_removed_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "ctl" / "a.sock"
    node = make_node("a", path)
    async with node:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert not path.exists()
    assert node.control_socket is None


async def test_none_disables_the_socket(tmp_path: Path) -> None:
    async with make_node("a", "none") as node:
        assert node.control_socket is None
        assert node.settings.control_socket is None


async def test_default_path_lives_in_a_private_per_user_directory(tmp_path: Path) -> None:
    environ = {"XDG_RUNTIME_DIR": str(tmp_path)}
    directory = tmp_path / f"handoff-{os.geteuid()}"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # as a careless earlier run may have left it
    async with make_node("a", "default", environ=environ) as node:
        assert node.control_socket == directory / "shop.sock"
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        reply = await call(directory / "shop.sock", {"command": "status"}, time_limit=5)
        assert reply["status"]["node"] == "a"


def _stale_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # closed without unlink: what a killed node leaves behind


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    _stale_socket(path)
    async with make_node("a", path):
        reply = await call(path, {"command": "status"}, time_limit=5)
        assert reply["status"]["node"] == "a"


async def test_live_socket_of_another_node_is_a_start_error(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    async with make_node("a", path):
        other = make_node("b", path)
        with pytest.raises(ControlSocketError) as info:
            await other.start()
        assert str(path) in str(info.value)
        assert "HANDOFF_CONTROL_SOCKET" in str(info.value)
        assert not other.running
        # The first node still answers: its socket was not taken over.
        reply = await call(path, {"command": "status"}, time_limit=5)
        assert reply["status"]["node"] == "a"


async def test_default_socket_in_use_is_a_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="handoff.control")
    environ = {"XDG_RUNTIME_DIR": str(tmp_path)}
    a, b = make_node("a", "default", environ=environ), make_node("b", "default", environ=environ)
    async with a, b:
        assert a.control_socket is not None
        assert b.control_socket is None
    assert "another live node already serves it" in caplog.text
    assert "HANDOFF_CONTROL_SOCKET" in caplog.text


async def test_a_file_that_is_not_a_socket_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        await make_node("a", path).start()
    assert path.read_text() == "precious"


# -- who may talk -------------------------------------------------------------------------------


def test_peer_uid_reads_the_credentials_of_the_other_end() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        uid = peer_uid(left)
    if sys.platform.startswith("linux"):
        assert uid == os.geteuid()
    assert uid_allowed(os.geteuid())
    assert uid_allowed(0)
    assert not uid_allowed(NOBODY) or os.geteuid() == NOBODY


async def test_another_uid_is_refused_before_it_is_heard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="handoff.control")
    async with make_node("a", tmp_path / "a.sock") as node:
        monkeypatch.setattr(control, "peer_uid", lambda sock: NOBODY)
        with pytest.raises(ControlPermissionError, match=f"uid {NOBODY}"):
            await call(tmp_path / "a.sock", {"command": "drain"}, time_limit=5)
        assert node.state.value == "serving"  # the refused drain never ran
    assert f"refused a control connection from uid {NOBODY}" in caplog.text


def run_as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a stdlib-only Python script as uid 65534 with an interpreter that user can run
    (the test's own may sit under root's home); skip if there is none."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            return subprocess.run(
                [python, "-I", "-c", script, *args],
                user=NOBODY,
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (PermissionError, FileNotFoundError):
            continue
    pytest.skip("no Python interpreter that uid 65534 may run")


@ROOT_ONLY
async def test_a_real_process_of_another_user_is_refused() -> None:
    # A socket others can reach (mode 0666 in a 0755 directory): only SO_PEERCRED is left.
    directory = Path(tempfile.mkdtemp(prefix="hctl-"))
    try:
        os.chmod(directory, 0o755)
        path = directory / "a.sock"
        async with make_node("a", path) as node:
            os.chmod(path, 0o666)
            # The server answers before reading a byte, so a request written afterwards
            # may meet a closed socket: that is the point.
            script = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.connect(sys.argv[1])\n"
                "try:\n"
                '    s.sendall(b\'{"command": "drain"}\\n\')\n'
                "except OSError:\n"
                "    pass\n"
                "print(s.makefile().readline())\n"
            )
            done = await anyio.to_thread.run_sync(run_as_nobody, script, str(path))
            assert node.state.value == "serving"  # the refused drain never ran
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["type"] == "error"
        assert reply["code"] == "forbidden"
        assert f"uid {NOBODY}" in reply["error"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- bounds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"x" * (control.MAX_REQUEST_BYTES + 10), "too-large"),
        (b"not json\n", "bad-request"),
        (b"[1, 2]\n", "bad-request"),
        (b'{"command": "reboot"}\n', "unknown-command"),
        (b'{"command": "drain", "timeout": -1}\n', "bad-request"),
        (b'{"command": "wait-ready", "timeout": "soon"}\n', "bad-request"),
    ],
)
async def test_bad_requests_get_an_error_and_the_node_serves_on(
    tmp_path: Path, data: bytes, code: str
) -> None:
    path = tmp_path / "a.sock"
    async with make_node("a", path) as node:
        replies = await raw_exchange(path, data)
        assert [r["type"] for r in replies] == ["error"]
        assert replies[0]["code"] == code
        assert node.state.value == "serving"
        assert (await call(path, {"command": "status"}, time_limit=5))["status"]["node"] == "a"


async def test_a_silent_client_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.2)
    path = tmp_path / "a.sock"
    async with make_node("a", path):
        replies = await raw_exchange(path, b"", within=3)
    assert replies == [
        {"type": "error", "code": "timeout", "error": "no request line within 0.2 s"}
    ]


async def test_connections_beyond_the_limit_are_told_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 1)
    path = tmp_path / "a.sock"
    async with make_node("a", path):
        async with await anyio.connect_unix(path) as holder:
            # A connection that has not finished its request line holds the only slot.
            await holder.send(b'{"command": "wait-ready"')
            with pytest.raises(ControlError, match="busy"):
                await call(path, {"command": "status"}, time_limit=5)
        # Once the slot is free again, requests are served.
        await status_when_free(path)


async def test_a_waiting_client_that_leaves_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 1)
    path = tmp_path / "cold.sock"
    cold = make_node("cold", path, warmup_timeout=3600)
    cold.track("users", {})
    async with cold:
        async with await anyio.connect_unix(path) as waiter:
            await waiter.send(b'{"command": "wait-ready", "timeout": 3600}\n')
            with pytest.raises(ControlError, match="busy"):
                await call(path, {"command": "status"}, time_limit=5)
        await status_when_free(path)


async def status_when_free(path: Path) -> dict[str, Any]:
    """Status, retried while the server has yet to see an earlier client leave."""
    with anyio.fail_after(5):
        while True:
            try:
                return await call(path, {"command": "status"}, time_limit=5)
            except ControlError as exc:
                if "busy" not in str(exc):
                    raise
            await anyio.sleep(0.01)  # the slot frees when the server sees the close


# -- commands ---------------------------------------------------------------------------------


async def test_drain_reports_progress_then_the_report(tmp_path: Path) -> None:
    async with pair(tmp_path, entries=2000) as (a, b):
        progress: list[dict[str, Any]] = []
        reply = await call(
            tmp_path / "a.sock",
            {"command": "drain", "timeout": 5},
            time_limit=5,
            on_progress=progress.append,
        )
        report = reply["report"]
        assert report["ok"] is True
        assert report["namespaces"]["users"]["acknowledged"] == 2000
        assert "2000 acknowledged by b" in report["summary"]
        started = progress[0]
        assert started["event"] == "started"
        assert (started["node"], started["timeout"], started["already"]) == ("a", 5, False)
        assert started["namespaces"] == ["users"]
        steps = [p for p in progress if p["event"] == "namespace"]
        assert steps, progress
        assert steps[-1]["acknowledged"] == 2000
        acknowledged = [p["acknowledged"] for p in steps]
        assert acknowledged == sorted(acknowledged)
        assert a.state.value == "draining"
        assert len(b.tracked["users"].obj) == 2000

        again = await call(tmp_path / "a.sock", {"command": "drain"}, time_limit=5)
        assert again["report"] == report


async def test_drain_goes_on_when_the_client_leaves(tmp_path: Path) -> None:
    async with pair(tmp_path, entries=20_000) as (a, b):
        with anyio.fail_after(5):
            async with await anyio.connect_unix(tmp_path / "a.sock") as stream:
                await stream.send(b'{"command": "drain", "timeout": 5}\n')
                buffered = BufferedByteReceiveStream(stream)
                started = json.loads(await buffered.receive_until(b"\n", 1 << 20))
                assert started["event"] == "started"
            report = await a.wait_drained()
        assert report.ok
        assert report.namespaces["users"].acknowledged == 20_000
        assert len(b.tracked["users"].obj) == 20_000


async def test_wait_ready_answers_warm_or_not_in_time(tmp_path: Path) -> None:
    cold = make_node("cold", tmp_path / "cold.sock", warmup_timeout=30)
    cold.track("users", {})
    async with cold, make_node("idle", tmp_path / "idle.sock") as idle:
        reply = await call(
            tmp_path / "cold.sock", {"command": "wait-ready", "timeout": 0.2}, time_limit=5
        )
        assert (reply["node"], reply["warm"]) == ("cold", False)
        # The real time waited, not the time asked for.
        assert 0.2 <= reply["waited"] < 5
        reply = await call(
            tmp_path / "idle.sock", {"command": "wait-ready", "timeout": 5}, time_limit=5
        )
        assert (reply["node"], reply["warm"], reply["reason"]) == ("idle", True, "nothing tracked")
        assert reply["waited"] < 1, "an idle node is warm at once"
        assert idle.is_warm


# -- finding and checking the socket (client side) ---------------------------------------------


def test_locate_socket_precedence(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    directory = tmp_path / f"handoff-{os.geteuid()}"
    assert locate_socket("/x/given.sock", {**env, "HANDOFF_CONTROL_SOCKET": "/x/env.sock"}) == Path(
        "/x/given.sock"
    )
    assert locate_socket(None, {**env, "HANDOFF_CONTROL_SOCKET": "/x/env.sock"}) == Path(
        "/x/env.sock"
    )
    assert locate_socket(None, {**env, "HANDOFF_CLUSTER": "shop"}) == directory / "shop.sock"
    assert locate_socket(None, {**env, "FLY_APP_NAME": "fly-shop"}) == directory / "fly-shop.sock"
    with pytest.raises(NoNodeRunning, match="none"):
        locate_socket(None, {**env, "HANDOFF_CONTROL_SOCKET": "none"})


def test_locate_socket_finds_the_only_socket_of_this_user(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    directory = tmp_path / f"handoff-{os.geteuid()}"
    with pytest.raises(NoNodeRunning, match="HANDOFF_CLUSTER"):
        locate_socket(None, env)
    directory.mkdir()
    _stale_socket(directory / "one.sock")
    (directory / "notes.txt").write_text("not a socket")
    assert locate_socket(None, env) == directory / "one.sock"
    _stale_socket(directory / "two.sock")
    with pytest.raises(AmbiguousSocket, match=r"one\.sock, two\.sock"):
        locate_socket(None, env)


async def test_no_node_errors_name_the_path_and_how_to_point(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    with pytest.raises(NoNodeRunning) as info:
        await call(missing, {"command": "status"}, time_limit=1)
    assert str(missing) in str(info.value)
    assert "--socket" in str(info.value)
    assert "HANDOFF_CONTROL_SOCKET" in str(info.value)
    stale = tmp_path / "stale.sock"
    _stale_socket(stale)
    with pytest.raises(NoNodeRunning, match="nobody answers"):
        await call(stale, {"command": "status"}, time_limit=1)
    plain = tmp_path / "plain.sock"
    plain.write_text("")
    with pytest.raises(NoNodeRunning, match="not a socket"):
        await call(plain, {"command": "status"}, time_limit=1)


@pytest.fixture
def foreign_socket(tmp_path: Path) -> Path:
    """A socket file owned by another user (nobody), in a 0700 directory of theirs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create another user's socket")
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    path = directory / "node.sock"
    _stale_socket(path)
    os.chown(path, NOBODY, NOBODY)
    os.chown(directory, NOBODY, NOBODY)
    return path


async def test_another_users_socket_is_not_used(foreign_socket: Path) -> None:
    with pytest.raises(ControlPermissionError) as info:
        await call(foreign_socket, {"command": "status"}, time_limit=1)
    message = str(info.value)
    assert f"belongs to uid {NOBODY}" in message
    assert "run the command as that user" in message
    assert "--socket" in message


async def test_a_node_that_hangs_up_is_a_control_error(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    async with await anyio.create_unix_listener(path) as listener:

        async def hang_up(stream: anyio.abc.SocketStream) -> None:
            await stream.aclose()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, hang_up)
            with pytest.raises(ControlError, match="closed the connection before answering"):
                await call(path, {"command": "status"}, time_limit=2)
            tasks.cancel_scope.cancel()


# -- status --all: which sockets are this machine's nodes ----------------------------------------


def test_local_sockets_are_the_configured_one_and_its_workers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    for name in ("shop.sock", "shop-4371.sock", "shop-4385.sock", "shopping.sock", "b.sock"):
        _stale_socket(run / name)
    (run / "shop-4372.sock").write_text("not a socket")
    _stale_socket(run / "shop-x.sock")
    configured = {"HANDOFF_CONTROL_SOCKET": str(run / "shop.sock")}
    assert [p.name for p in local_sockets(environ=configured)] == [
        "shop-4371.sock",
        "shop-4385.sock",
        "shop.sock",
    ]
    # --socket-dir: every socket there, whatever its name (files that are not sockets left out).
    assert [p.name for p in local_sockets(run, environ=configured)] == [
        "b.sock",
        "shop-4371.sock",
        "shop-4385.sock",
        "shop-x.sock",
        "shop.sock",
        "shopping.sock",
    ]
    with pytest.raises(NoNodeRunning, match="is not a directory"):
        local_sockets(run / "shop.sock")
    with pytest.raises(NoControlSocket):
        local_sockets(environ={"HANDOFF_CONTROL_SOCKET": "none"})


def test_local_sockets_of_a_cluster_in_the_default_directory(tmp_path: Path) -> None:
    default = tmp_path / f"handoff-{os.geteuid()}"
    default.mkdir(mode=0o700)
    for name in ("shop.sock", "shop-4371.sock", "other.sock"):
        _stale_socket(default / name)
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "HANDOFF_CLUSTER": "shop"}
    assert [p.name for p in local_sockets(environ=env)] == ["shop-4371.sock", "shop.sock"]
    # No cluster named: every node of this user there.
    assert len(local_sockets(environ={"XDG_RUNTIME_DIR": str(tmp_path)})) == 3


# -- doctor --socket: a node's report is checked before it is shown --------------------------------


@contextmanager
def answering(path: Path, reply: dict[str, Any]) -> Iterator[None]:
    """A Unix socket server in a thread that answers each connection with ``reply``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


DOCTOR_REPORT: dict[str, Any] = {
    "ok": False,
    "origin": "the running node \x1b[2Jx (pid 1, control socket /x)",
    "cluster": "shop",
    "settings": [{"setting": "cluster", "value": "shop\x1b[31m", "source": "HANDOFF_CLUSTER"}],
    "discovery": "none",
    "addresses": [],
    "local": None,
    "local_note": None,
    "peers": [],
    "notes": [],
    "problems": [{"what": "\x1b[2Jwiped\nforged", "fix": "none", "severity": "error"}],
}


def test_a_nodes_doctor_report_is_escaped_and_a_malformed_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from handoff.cli import EXIT_CONTROL_ERROR, EXIT_FAILED, main

    path = tmp_path / "fake.sock"
    with answering(path, {"type": "result", "doctor": DOCTOR_REPORT}):
        assert main(["doctor", "--socket", str(path)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\n" + "forged" not in out
    assert "\\x1b[2Jwiped\\nforged" in out
    malformed = {**DOCTOR_REPORT, "settings": [{"setting": "cluster", "value": 5}]}
    path.unlink()
    with answering(path, {"type": "result", "doctor": malformed}):
        assert main(["doctor", "--socket", str(path)]) == EXIT_CONTROL_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "malformed reply: the reply.doctor.settings[0].value is not text" in err
