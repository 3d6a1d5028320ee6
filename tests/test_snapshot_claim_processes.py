"""Nodes of several processes sharing one HANDOFF_SNAPSHOT_DIR (the workers of one machine):
each snapshot is restored by exactly one of them, and one whose restorer was SIGKILLed while
holding it is restored by the next node to start.

Each child starts a real :class:`~handoff.Node` on the directory, writes what it restored to
a file, and exits without draining (a drain would snapshot it all again).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from handoff import Node
from handoff._codec import Codec
from handoff._keys import cluster_key
from handoff.snapshot import SUFFIX, DirectorySnapshotStore
from tests._helpers import CLUSTER, COOKIE

pytestmark = pytest.mark.slow

NAMESPACE = "n"
# Bounds on every wait: scrypt and interpreter start-up on a loaded CI machine.
PROCESS_TIMEOUT = 60.0
# How long a paused child holds its claim before it gives up by itself (it is killed first).
PAUSE_LIMIT = 60.0

_spawn = multiprocessing.get_context("spawn")


def _child(
    snapshot_dir: str,
    out: str,
    go: multiprocessing.synchronize.Event,
    paused: multiprocessing.synchronize.Event | None,
) -> None:
    """Start a node on ``snapshot_dir`` once ``go`` is set; write what it restored to ``out``.

    With ``paused``, the node stops inside its restore (in the validator, so while holding
    the claim), sets ``paused`` and waits there to be killed.
    """
    target: dict[str, Any] = {}

    def validate(key: Any, value: Any) -> bool:
        if paused is not None:
            paused.set()
            deadline = time.monotonic() + PAUSE_LIMIT
            while time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            # Keeps each restore open long enough for the other process to meet it.
            time.sleep(0.002)
        return True

    node = Node(
        CLUSTER,
        cookie=COOKIE,
        name=f"worker-{os.getpid()}",
        release="v2",
        bind="127.0.0.1:0",
        discovery="none",
        snapshot_dir=snapshot_dir,
        environ={},
    )
    node.track(NAMESPACE, target, validate=validate)
    if not go.wait(PROCESS_TIMEOUT):
        os._exit(3)

    async def main() -> None:
        await node.start()

    anyio.run(main)
    temp = out + ".tmp"
    Path(temp).write_text(json.dumps(sorted(target.items())))
    os.replace(temp, out)
    # No stop: a drain would write the restored records back to the snapshot directory.
    os._exit(0)


def _plant(directory: Path, snapshots: int, per_snapshot: int) -> list[set[str]]:
    """Snapshots made with the cluster's key, as a draining node would; their keys."""
    key = cluster_key(COOKIE, CLUSTER).derive("snapshot")
    store = DirectorySnapshotStore(directory, key=key)
    codec = Codec()
    planted: list[set[str]] = []
    for s in range(snapshots):
        keys = [f"s{s}-k{i}" for i in range(per_snapshot)]
        data, failed = codec.encode_records([(k, i, None) for i, k in enumerate(keys)])
        assert not failed
        with store.begin(
            NAMESPACE, cluster=CLUSTER, kind="mapping", version=1, node=f"old-{s}",
            release="v1", created_at=time.time(),
        ) as writer:  # fmt: skip
            writer.write_chunk(data, per_snapshot)
            writer.commit()
        planted.append(set(keys))
    return planted


class _Worker:
    def __init__(self, tmp: Path, name: str, directory: Path, *, pause: bool = False) -> None:
        self.out = tmp / f"{name}.json"
        self.go = _spawn.Event()
        self.paused = _spawn.Event() if pause else None
        self.process = _spawn.Process(
            target=_child, args=(str(directory), str(self.out), self.go, self.paused)
        )
        self.process.start()

    def restored(self) -> dict[str, int]:
        self.process.join(PROCESS_TIMEOUT)
        assert self.process.exitcode == 0, f"worker exited with {self.process.exitcode}"
        return {k: v for k, v in json.loads(self.out.read_text())}

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid or 0, signal.SIGKILL)
        self.process.join(PROCESS_TIMEOUT)


def _waiting(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "snapshots"
    path.mkdir(mode=0o700)
    return path


def test_workers_starting_together_restore_each_snapshot_once(
    tmp_path: Path, directory: Path
) -> None:
    planted = _plant(directory, snapshots=4, per_snapshot=50)
    workers = [_Worker(tmp_path, name, directory) for name in ("a", "b")]
    try:
        for worker in workers:
            worker.go.set()
        restored = [worker.restored() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()

    everything = set().union(*planted)
    assert set(restored[0]) | set(restored[1]) == everything
    assert len(restored[0]) + len(restored[1]) == len(everything), "a record applied twice"
    for keys in planted:
        # A snapshot is applied whole by one worker, never split or shared.
        assert [keys <= set(r) for r in restored].count(True) == 1
        assert not any(keys & set(r) for r in restored if not keys <= set(r))
    assert _waiting(directory) == []
    assert not (directory / "corrupt").exists()


def test_a_snapshot_held_by_a_killed_worker_is_restored_by_the_next(
    tmp_path: Path, directory: Path
) -> None:
    (planted,) = _plant(directory, snapshots=1, per_snapshot=20)
    holder = _Worker(tmp_path, "holder", directory, pause=True)
    try:
        holder.go.set()
        assert holder.paused is not None
        assert holder.paused.wait(PROCESS_TIMEOUT), "the holder never reached its restore"

        # While it is held, a worker that starts skips it and starts cold.
        sibling = _Worker(tmp_path, "sibling", directory)
        sibling.go.set()
        assert sibling.restored() == {}
        assert len(_waiting(directory)) == 1
    finally:
        holder.kill()
    assert holder.process.exitcode == -signal.SIGKILL
    assert not holder.out.exists()

    # The kernel dropped the claim with the killed process: the next starter restores it.
    successor = _Worker(tmp_path, "successor", directory)
    successor.go.set()
    assert set(successor.restored()) == planted
    assert _waiting(directory) == []
    assert not (directory / "corrupt").exists()
