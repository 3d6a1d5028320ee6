"""The README's logging recipe for uvicorn: ``--log-config examples/service/logging.json``
makes the ``handoff`` logger's lines show (the node's start, the drain report), and without
it they do not. The README shows the file verbatim."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from examples.service.local_deploy import SERVING, LineWatcher, _child_environment
from handoff.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "service" / "logging.json"
TIMEOUT = 30.0
STARTED = re.compile(r"handoff\.node: node \S+ \(cluster recipe, release v1\) listening on ")
# A drain into the snapshot store: nothing lost, so an INFO line (a WARNING would show
# without any configuration, through Python's last-resort handler).
DRAINED = re.compile(
    r"INFO handoff\.node: drain of \S+ \(v1\) in [\d.]+ m?s: sessions: 2 held, 0 acknowledged "
    r"by nobody, 2 snapshotted$"
)


def test_the_readme_shows_the_recipe_file_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    text = CONFIG.read_text()
    assert f"```json\n{text.rstrip()}\n```" in readme
    assert "--log-config examples/service/logging.json" in readme
    # uvicorn's own loggers are still configured: the recipe extends its default.
    loggers = json.loads(text)["loggers"]
    assert set(loggers) == {"uvicorn", "uvicorn.error", "uvicorn.access", "handoff"}


def _start(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen[str], LineWatcher]:
    env = {
        "HANDOFF_CLUSTER": "recipe",
        "HANDOFF_COOKIE": secrets.token_urlsafe(32),
        "HANDOFF_RELEASE": "v1",
        "HANDOFF_BIND": "127.0.0.1:0",
        "HANDOFF_DISCOVERY": "none",
        "HANDOFF_WARMUP_TIMEOUT": "0.1",
        "HANDOFF_CONTROL_SOCKET": "none",
        "HANDOFF_SNAPSHOT_DIR": str(tmp_path / name),
    }
    command = [sys.executable, "-m", "uvicorn", "tests._logging_app:app", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(free_port("127.0.0.1")), *extra],
        cwd=ROOT,
        env=_child_environment(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    watcher = LineWatcher(proc.stdout, name=name)
    watcher.start()
    return proc, watcher


def _serve_then_stop(proc: subprocess.Popen[str], watcher: LineWatcher) -> list[str]:
    try:
        watcher.wait_for(SERVING, timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        watcher.join(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    return watcher.lines


@pytest.mark.slow
def test_uvicorn_with_the_recipe_shows_the_node_start_and_drain(tmp_path: Path) -> None:
    # Both at once: the one without the recipe is the control.
    recipe = _start(tmp_path, "recipe", "--log-config", str(CONFIG))
    plain = _start(tmp_path, "plain")
    with_recipe = _serve_then_stop(*recipe)
    without = _serve_then_stop(*plain)
    text = "\n".join(with_recipe)
    assert any(STARTED.search(line) for line in with_recipe), text
    assert any(DRAINED.search(line) for line in with_recipe), text
    # uvicorn's own lines are unchanged.
    assert "INFO:     Application shutdown complete." in with_recipe, text
    assert not any(STARTED.search(line) or DRAINED.search(line) for line in without), without
    assert "INFO:     Application shutdown complete." in without, without
