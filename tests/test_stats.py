"""``node.stats()`` and ``handoff status``: the last handoff a node received."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from handoff import Node, ReceivedHandoff
from handoff.cli import main
from tests._helpers import FAST, wait_until

pytestmark = pytest.mark.anyio


def node(name: str, host: str, release: str, tmp_path: Path, discovery: str = "none") -> Node:
    return Node(
        "shop",
        **{
            **FAST,
            "name": name,
            "release": release,
            "bind": f"{host}:0",
            "discovery": discovery,
            "control_socket": str(tmp_path / f"{name}.sock"),
        },
    )


async def test_stats_and_status_show_the_last_received_handoff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    received: dict[str, int] = {}
    new = node("new", "127.0.0.3", "v2", tmp_path)
    new.track("entries", received)
    async with new:
        stats = new.stats()
        assert stats["last_received"] is None
        assert stats["node"] == "new"
        assert stats["port"] == new.port
        assert stats["tracked"] == [
            {"namespace": "entries", "kind": "mapping", "entries": 0, "version": 1, "spread": "all"}
        ]
        old = node("old", "127.0.0.2", "v1", tmp_path, discovery=f"static:{new.address}")
        old.track("entries", {f"k{i}": i for i in range(50)})
        before = time.time()
        async with old:
            await wait_until(lambda: bool(old.peers()))
        await wait_until(lambda: new.last_received is not None)
        last = new.last_received
        assert isinstance(last, ReceivedHandoff)
        assert (last.peer, last.release, last.records) == ("old", "v1", 50)
        assert (last.applied, last.kept, last.dropped) == (50, 0, {})
        assert before <= last.at <= time.time()
        stats = new.stats()
        assert stats["last_received"] == {
            "peer": "old",
            "release": "v1",
            "records": 50,
            "at": last.at,
            "applied": 50,
            "kept": 0,
            "dropped": {},
        }
        assert stats["tracked"][0]["entries"] == 50
        code = await anyio.to_thread.run_sync(
            main, ["status", "--socket", str(tmp_path / "new.sock")]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert "last drain: none" in out
    assert "last received: 50 records from old (release v1), " in out
    assert out.rstrip().endswith(" ago: 50 applied, 0 kept their newer copy here, none dropped")


def test_status_escapes_or_skips_what_a_hostile_node_says_it_received() -> None:
    from handoff.cli import _status_lines

    base: dict[str, object] = {
        "node": "n",
        "cluster": "c",
        "release": "r",
        "state": "serving",
        "address": None,
        "pid": 1,
        "warm": True,
        "warm_reason": "x",
        "members": [],
        "tracked": [],
        "last_drain": None,
    }
    evil = "\x1b]0;owned\x07peer\nFORGED"
    received = {"peer": evil, "release": evil, "records": 3, "at": time.time()}
    text = "\n".join(_status_lines({**base, "last_received": received}))
    assert "\x1b" not in text
    assert "\nFORGED" not in text
    assert "last received: 3 records from " in text
    for bad in ({"peer": 1}, "yes", {**received, "records": "3"}):
        lines = _status_lines({**base, "last_received": bad})
        assert lines[-1] == "last received: (not readable)"
    outcome = {"applied": 1, "kept": 1, "dropped": {evil: 1, "expired": "x"}}
    text = "\n".join(_status_lines({**base, "last_received": {**received, **outcome}}))
    assert "\x1b" not in text
    assert "\nFORGED" not in text
    assert "1 applied, 1 kept their newer copy here, dropped 1 " in text
    # A node from before the outcome was sent: the line without it.
    line = _status_lines({**base, "last_received": received})[-1]
    assert line.endswith(" ago")
    # A node from before last_received existed: not sent at all.
    assert _status_lines(base)[-1] == "last received: none"


def test_check_encodable_finds_what_a_handoff_could_not_carry() -> None:
    import handoff

    node = handoff.Node("shop", cookie=b"k" * 32, bind="127.0.0.2:0", discovery="none")
    cache = {"fine": {"a": [1, 2.5, b"x"]}, "object": object(), "big": b"x" * (5 * 1024 * 1024)}
    node.track("cache", cache)
    counts = handoff.Counters()
    counts.incr(("a", 1))
    counts.incr(frozenset({1}))  # hashable, and the codec carries frozensets
    node.track("usage", counts)
    problems = node.check_encodable()
    assert [(name, key) for name, key, _ in problems] == [("cache", "object"), ("cache", "big")]
    reasons = dict(((name, key), why) for name, key, why in problems)
    assert "object" in reasons[("cache", "object")]
    assert "record too large for a frame" in reasons[("cache", "big")]
    # Reading only: nothing was taken from the counters, nothing changed in the cache.
    assert counts[("a", 1)] == 1
    assert len(cache) == 3
    assert node.check_encodable("usage") == []
    assert len(node.check_encodable(limit=1)) == 1
    with pytest.raises(KeyError, match="'nope' is not tracked"):
        node.check_encodable("nope")
    with pytest.raises(ValueError, match="limit"):
        node.check_encodable(limit=0)


def test_check_encodable_finds_an_unencodable_counter_key() -> None:
    import handoff

    class Key:  # hashable, but no codec type
        pass

    node = handoff.Node("shop", cookie=b"k" * 32, bind="127.0.0.2:0", discovery="none")
    counts = handoff.Counters()
    counts.incr(Key())
    node.track("usage", counts)
    [(name, key, _why)] = node.check_encodable()
    assert name == "usage"
    assert isinstance(key, Key)
    assert counts.total() == 1
