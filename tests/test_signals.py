"""SIGTERM drains a node that installed its signal handlers, then the script ends."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import anyio
import pytest

from handoff import Node

pytestmark = pytest.mark.anyio

COOKIE = "test-cookie-0123456789abcdef"

SCRIPT = textwrap.dedent(
    """
    import anyio, json, sys
    import handoff

    async def main() -> None:
        node = handoff.Node(handle_signals=True)
        node.track("users", {f"u{i}": i for i in range(1000)})
        async with node:
            print(json.dumps({"listening": node.port}), flush=True)
            report = await node.wait_drained()
        print(report.to_json(), flush=True)

    anyio.run(main)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_to_the_successor_and_exits_cleanly(signum: signal.Signals) -> None:
    received: dict[str, int] = {}
    successor = Node(
        "shop", cookie=COOKIE, name="new", bind="127.0.0.3:0", environ={}, poll_interval=0.1
    )
    successor.track("users", received)
    joined = anyio.Event()
    successor.on_node_up(lambda peer: joined.set())
    async with successor:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HANDOFF_")},
            "HANDOFF_CLUSTER": "shop",
            "HANDOFF_COOKIE": COOKIE,
            "HANDOFF_NODE_NAME": "old",
            "HANDOFF_BIND": "127.0.0.2:0",
            "HANDOFF_DISCOVERY": f"static:{successor.address}",
            "HANDOFF_POLL_INTERVAL": "0.1",
        }
        process = await anyio.open_process([sys.executable, "-c", SCRIPT], env=env)
        try:
            assert process.stdout is not None
            lines = process.stdout
            buffer = b""
            with anyio.fail_after(20):
                while b"listening" not in buffer:
                    buffer += await lines.receive()
                await joined.wait()
                process.send_signal(signum)
                while buffer.count(b"\n") < 2:
                    buffer += await lines.receive()
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    report = json.loads(buffer.splitlines()[1])
    assert report["namespaces"]["users"]["acknowledged"] == 1000
    assert received == {f"u{i}": i for i in range(1000)}
