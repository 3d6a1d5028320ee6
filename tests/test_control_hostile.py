"""The control socket against other local users (issue 8, item 10).

A squatted ``handoff-<uid>/`` directory does not leave the node without a socket; the CLI
talks only to a socket of its own user that it reached without a planted link, and a
hostile reply ends in one clean line and a non-zero exit, in bounded time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import handoff.cli as cli_module
import handoff.control as control
from handoff import Node
from handoff.cli import EXIT_CONTROL_ERROR, EXIT_PERMISSION, main
from handoff.control import locate_socket
from handoff.protocol import NodeState

COOKIE = "control-hostile-cookie-0123456789"
NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def make_node(name: str, control_socket: Path | None, environ: dict[str, str]) -> Node:
    return Node(
        "shop",
        cookie=COOKIE,
        name=name,
        bind="127.0.0.1:0",
        discovery="none",
        control_socket=None if control_socket is None else str(control_socket),
        environ=environ,
        drain_timeout=1.0,
    )


@contextmanager
def running(node: Node) -> Iterator[Node]:
    node.start_in_thread()
    try:
        yield node
    finally:
        node.stop()


def cli(
    capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HANDOFF_CLUSTER", "HANDOFF_CONTROL_SOCKET", "FLY_APP_NAME"):
            patch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the node's directory -----------------------------------------------------------------------


def squat(base: Path, how: str) -> Path:
    """Make ``base/handoff-<uid>`` unusable the way ``how`` says; return what it points at."""
    directory = base / f"handoff-{os.geteuid()}"
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if how == "symlink":
        directory.symlink_to(elsewhere)
    elif how == "another user's":
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
    elif how == "writable by others":
        directory.mkdir()
        os.chmod(directory, 0o777)
    return elsewhere


@pytest.mark.parametrize(
    "how",
    [
        "symlink",
        pytest.param("another user's", marks=ROOT_ONLY),
        "writable by others",
    ],
)
def test_a_squatted_default_directory_still_gives_a_socket_the_cli_finds(
    tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = squat(tmp_path, how)
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    with running(make_node("a", None, env)) as node:
        path = node.control_socket
        assert path is not None
        assert path.parent.parent == tmp_path
        assert path.parent.name.startswith(f"handoff-{os.geteuid()}-")
        assert (os.lstat(path.parent).st_mode & 0o777) == 0o700
        assert locate_socket(None, {**env, "HANDOFF_CLUSTER": "shop"}) == path
        assert locate_socket(None, env) == path
        code, out, err = cli(capsys, "status", env={**env, "HANDOFF_CLUSTER": "shop"})
        assert (code, err) == (0, "")
        assert out.startswith("node a of cluster shop")
    assert "serving it in a fresh private directory" in caplog.text
    assert list(elsewhere.iterdir()) == []
    assert not path.parent.exists()  # the fresh directory goes with the node


def test_the_cli_does_not_follow_a_planted_directory_link_to_another_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir(mode=0o700)
    link = tmp_path / f"handoff-{os.geteuid()}"
    link.symlink_to(victim_dir)
    if os.geteuid() == 0:
        os.lchown(link, NOBODY, NOBODY)  # planted by another user
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "HANDOFF_CLUSTER": "shop"}
    with running(make_node("victim", victim_dir / "shop.sock", {})) as victim:
        code, _, err = cli(capsys, "drain", env=env)
        assert code != 0
        assert err.count("\n") == 1
        assert "Traceback" not in err
        assert victim.state is NodeState.SERVING


def test_the_cli_refuses_a_symlinked_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "link.sock"
    link.symlink_to(private / "shop.sock")
    with running(make_node("victim", private / "shop.sock", {})) as victim:
        code, _, err = cli(capsys, "drain", "--socket", str(link))
        assert code == EXIT_PERMISSION
        assert "is a symbolic link" in err
        assert victim.state is NodeState.SERVING


@ROOT_ONLY
def test_the_cli_refuses_a_socket_in_a_directory_others_can_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone may replace the socket
    with running(make_node("a", shared / "shop.sock", {})):
        code, _, err = cli(capsys, "status", "--socket", str(shared / "shop.sock"))
    assert code == EXIT_PERMISSION
    assert "writable by" in err


def test_the_cli_refuses_a_socket_served_by_another_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The path checks pass (a socket of ours, in a private directory), but between them and
    # the connect the path could be swapped: what answers is checked too (SO_PEERCRED).
    # Tests run as root, whom every uid check trusts, so the kernel's answer is replaced.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    real_peer_uid = control.peer_uid

    def another_user_serves(sock: socket.socket) -> int | None:
        # Only the client's end is unnamed: the node's own check of the CLI stays real.
        return 4242 if sock.getsockname() in ("", b"") else real_peer_uid(sock)

    monkeypatch.setattr(control, "peer_uid", another_user_serves)
    with running(make_node("victim", private / "shop.sock", {})) as victim:
        code, _, err = cli(capsys, "drain", "--socket", str(private / "shop.sock"))
        assert code == EXIT_PERMISSION
        assert "served by uid 4242" in err
        assert victim.state is NodeState.SERVING


# -- hostile replies ------------------------------------------------------------------------------


@contextmanager
def fake_node(path: Path, lines: list[bytes], *, pause: float = 0.0) -> Iterator[None]:
    """A Unix socket server that answers every connection with ``lines`` (``pause`` apart),
    then stays silent until the client leaves; with no lines it hangs up at once."""
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
                try:
                    for line in lines:
                        conn.sendall(line)
                        stop.wait(pause)
                    while lines and not stop.is_set() and conn.recv(4096):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


def result(**fields: Any) -> bytes:
    return json.dumps({"type": "result", **fields}).encode() + b"\n"


GOOD_STATUS: dict[str, Any] = {
    "node": "a",
    "cluster": "shop",
    "release": "v1",
    "state": "serving",
    "address": None,
    "pid": 1,
    "started_at": 0.0,
    "warm": True,
    "warm_reason": "nothing tracked",
    "members": [
        {
            "name": "a",
            "release": "v1",
            "state": "serving",
            "address": None,
            "self": True,
            "started_at": 0.0,
            "namespaces": {},
            "clock_offset": 0.0,
        }
    ],
    "tracked": [],
    "last_drain": None,
}

HOSTILE_STATUS = {
    "garbage": [b"\x00\xff garbage\n"],
    "not an object": [b"[1, 2, 3]\n"],
    "no status": [result()],
    "status is a string": [result(status="ok")],
    "members not a list": [result(status={**GOOD_STATUS, "members": "everyone"})],
    "a member without a name": [
        result(status={**GOOD_STATUS, "members": [{"self": True, "release": "v1"}]})
    ],
    "warm is a string": [result(status={**GOOD_STATUS, "warm": "yes"})],
    "tracked entries of the wrong type": [
        result(
            status={
                **GOOD_STATUS,
                "tracked": [{"namespace": "n", "kind": "k", "entries": [], "version": "2"}],
            }
        )
    ],
    "last drain without a summary": [result(status={**GOOD_STATUS, "last_drain": {"ok": 1}})],
    "deeply nested": [b"[" * 100_000 + b"]" * 100_000 + b"\n"],
    "huge number": [b'{"type": "result", "status": ' + b"9" * 10_000 + b"}\n"],
    "error with a non-text message": [b'{"type": "error", "code": [], "error": {"a": 1}}\n'],
    "closes at once": [],
}


@pytest.mark.parametrize("case", list(HOSTILE_STATUS))
def test_a_hostile_status_reply_is_one_clean_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path = tmp_path / "fake.sock"
    with fake_node(path, HOSTILE_STATUS[case]):
        started = time.monotonic()
        code, out, err = cli(capsys, "status", "--socket", str(path))
        code_json, _, err_json = cli(capsys, "status", "--json", "--socket", str(path))
    assert time.monotonic() - started < 30
    assert code == code_json == EXIT_CONTROL_ERROR, (out, err)
    for text in (err, err_json):
        assert text.startswith("handoff status: error: ")
        assert text.count("\n") == 1, text
        assert "Traceback" not in text


def test_a_huge_reply_line_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scaled down from 16 MiB; the bound holds to within one read (64 KiB).
    monkeypatch.setattr(control, "MAX_REPLY_BYTES", 1024)
    path = tmp_path / "fake.sock"
    with fake_node(path, [result(status={**GOOD_STATUS, "node": "x" * 500_000})]):
        code, _, err = cli(capsys, "status", "--socket", str(path))
    assert code == EXIT_CONTROL_ERROR
    assert "too long" in err


def progress(**fields: Any) -> bytes:
    return json.dumps({"type": "progress", **fields}).encode() + b"\n"


STARTED = {"event": "started", "node": "a", "timeout": 1.0, "already": False, "namespaces": []}


@pytest.mark.parametrize(
    "lines",
    [
        [progress(**{**STARTED, "timeout": 1e300})],
        [progress(**{**STARTED, "timeout": "forever"})],
        [progress(**{**STARTED, "timeout": float("inf")}).replace(b"Infinity", b"1e999")],
        [progress(**STARTED)] + [progress(**STARTED)] * 200,
    ],
    ids=["1e300", "a string", "infinity", "endless progress"],
)
def test_drain_waits_a_bounded_time_whatever_the_node_announces(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    lines: list[bytes],
) -> None:
    # Scaled down: the clamp is an hour, the grace and the wait for "started" ten seconds.
    monkeypatch.setattr(control, "MAX_ANNOUNCED_TIMEOUT", 1.0)
    monkeypatch.setattr(control, "_CLIENT_GRACE", 0.5)
    monkeypatch.setattr(cli_module, "DRAIN_START_LIMIT", 1.0)
    path = tmp_path / "fake.sock"
    with fake_node(path, lines, pause=0.05):
        started = time.monotonic()
        code, _, err = cli(capsys, "drain", "--socket", str(path))
        elapsed = time.monotonic() - started
    assert elapsed < 6, elapsed  # 1.5 s: the clamp plus the grace, with slack for load
    assert code == EXIT_CONTROL_ERROR
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_peer_text_is_escaped_in_status_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = "\x1b]0;owned\x07peer\nFORGED LINE"
    member = {**GOOD_STATUS["members"][0], "self": False, "name": evil, "release": evil}
    status = {
        **GOOD_STATUS,
        "members": [*GOOD_STATUS["members"], member],
        "last_drain": {"summary": evil},
    }
    path = tmp_path / "fake.sock"
    with fake_node(path, [result(status=status)]):
        code, out, _ = cli(capsys, "status", "--socket", str(path))
    assert code == 0
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "FORGED LINE" not in out.replace("\\nFORGED LINE", "")
    assert "\\x1b]0;owned\\x07peer\\nFORGED LINE" in out


@pytest.mark.parametrize(
    "status",
    [
        {**GOOD_STATUS, "tracked": ["users"]},
        {
            **GOOD_STATUS,
            "node": "\x1b[2Jwiped",
            "tracked": [{"namespace": "\x1b[31mred", "kind": "k", "entries": 1, "version": 1}],
        },
    ],
    ids=["tracked of the wrong type", "escapes"],
)
def test_doctor_survives_a_hostile_local_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: dict[str, Any]
) -> None:
    path = tmp_path / "fake.sock"
    env = {
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_CONTROL_SOCKET": str(path),
        "HANDOFF_DISCOVERY": "static:127.0.0.1:9",
    }
    with fake_node(path, [result(status=status)]):
        code, out, err = cli(capsys, "doctor", env=env)
    assert code == 1  # nobody listens at the discovered address
    assert "Traceback" not in err
    assert "\x1b" not in out
