"""Upgrade and downgrade chains: complete paths only, failures counted per record, logged once."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from handoff._errors import HandoffError, NoTransformPath
from handoff.transforms import Chain, Transforms


def users_transforms() -> Transforms:
    """v1: value is a name; v2: {"name": ...}; v3: {"name": ..., "email": ...}."""
    t = Transforms()
    t.add_upgrade("users", 1, lambda k, v: (k, {"name": v}))
    t.add_upgrade("users", 2, lambda k, v: (k, {**v, "email": None}))
    t.add_downgrade("users", 3, lambda k, v: (k, {"name": v["name"]}))
    t.add_downgrade("users", 2, lambda k, v: (k, v["name"]))
    return t


def test_upgrade_chain_runs_every_step_in_order_and_keeps_meta() -> None:
    chain = users_transforms().path("users", 1, 3)
    assert [(s.direction, s.from_version, s.to_version) for s in chain.steps] == [
        ("upgrade", 1, 2),
        ("upgrade", 2, 3),
    ]
    out, dropped = chain.apply([("u1", "ada", 12.5), ("u2", "bob", None)])
    assert out == [
        ("u1", {"name": "ada", "email": None}, 12.5),
        ("u2", {"name": "bob", "email": None}, None),
    ]
    assert dropped == {}


def test_downgrade_chain_for_a_rollback() -> None:
    chain = users_transforms().path("users", 3, 1)
    assert [(s.direction, s.from_version, s.to_version) for s in chain.steps] == [
        ("downgrade", 3, 2),
        ("downgrade", 2, 1),
    ]
    out, dropped = chain.apply([("u1", {"name": "ada", "email": "a@x"}, 3)])
    assert out == [("u1", "ada", 3)]
    assert dropped == {}


def test_keys_can_change_too() -> None:
    t = Transforms()
    t.add_upgrade("rooms", 4, lambda k, v: (("room", k), v))
    assert t.path("rooms", 4, 5).apply([(7, "state", None)]) == ([(("room", 7), "state", None)], {})


def test_same_version_is_the_identity() -> None:
    chain = Transforms().path("anything", 2, 2)
    assert chain.steps == ()
    records = [("k", object(), 1.0)]
    out, dropped = chain.apply(records)
    assert out == records
    assert out is not records
    assert dropped == {}


def test_missing_upgrade_step_names_the_hook_to_add() -> None:
    t = users_transforms()
    with pytest.raises(NoTransformPath) as info:
        t.path("users", 1, 5)
    err = info.value
    assert isinstance(err, HandoffError)
    assert (err.namespace, err.from_version, err.to_version, err.missing_step) == (
        "users",
        1,
        5,
        (3, 4),
    )
    assert str(err) == (
        "cannot convert 'users' from version 1 to 5: no upgrade hook for 'users' from version 3 "
        "to 4; add @node.upgrade('users', 3)"
    )
    assert not t.can_convert("users", 1, 5)
    assert t.can_convert("users", 1, 3)
    assert t.can_convert("users", 3, 1)
    assert t.can_convert("other", 7, 7)


def test_missing_downgrade_step_names_the_hook_to_add() -> None:
    t = Transforms()
    t.add_upgrade("users", 1, lambda k, v: (k, v))
    with pytest.raises(
        NoTransformPath,
        match=(
            r"no downgrade hook for 'users' from version 2 to 1; "
            r"add @node\.downgrade\('users', 2\)"
        ),
    ):
        t.path("users", 2, 1)
    with pytest.raises(NoTransformPath, match="no upgrade hook for 'orders'"):
        t.path("orders", 1, 2)


def test_registering_a_step_twice_is_refused() -> None:
    t = users_transforms()
    with pytest.raises(
        ValueError, match="upgrade hook for 'users' from version 1 to 2 is already registered"
    ):
        t.add_upgrade("users", 1, lambda k, v: (k, v))
    with pytest.raises(ValueError, match="downgrade hook for 'users' from version 3 to 2"):
        t.add_downgrade("users", 3, lambda k, v: (k, v))
    # Same versions in another namespace, or the other direction, are different steps.
    t.add_upgrade("orders", 1, lambda k, v: (k, v))
    with pytest.raises(ValueError, match="cannot downgrade 'users' below version 0"):
        t.add_downgrade("users", 0, lambda k, v: (k, v))
    with pytest.raises(ValueError, match="non-negative int"):
        t.add_upgrade("users", -1, lambda k, v: (k, v))


def test_a_failing_hook_drops_that_record_counts_it_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def picky(key: Any, value: Any) -> tuple[Any, Any]:
        if value == "bad":
            raise KeyError("name")
        if value == "none":
            return None  # type: ignore[return-value]
        if value == "triple":
            return (key, value, 1)  # type: ignore[return-value]
        return key, value.upper()

    t = Transforms()
    t.add_upgrade("users", 1, picky)
    t.add_upgrade("users", 2, lambda k, v: (k, v + "!"))
    chain = t.path("users", 1, 3)
    records = [
        ("a", "ok", 1),
        ("b", "bad", 2),
        ("c", "bad", 3),
        ("d", "none", 4),
        ("e", "triple", 5),
        ("f", "fine", 6),
    ]
    with caplog.at_level(logging.WARNING, logger="handoff.transforms"):
        out, dropped = chain.apply(records)
        out2, dropped2 = chain.apply(records[1:3])
    assert out == [("a", "OK!", 1), ("f", "FINE!", 6)]
    assert dropped == {
        "transform failed: KeyError": 2,
        "transform returned NoneType": 1,
        "transform returned tuple of 3 items": 1,
    }
    assert (out2, dropped2) == ([], {"transform failed: KeyError": 2})
    messages = [r.getMessage() for r in caplog.records if r.name == "handoff.transforms"]
    # Once per kind of failure for this chain, not per record (nor per apply call).
    assert len(messages) == 3
    assert all("'users'" in m and "upgrade 1->2" in m for m in messages)
    assert any("KeyError" in m for m in messages)
    failed = [r for r in caplog.records if "KeyError" in r.getMessage()]
    assert failed[0].levelno == logging.WARNING
    assert failed[0].exc_info is not None


def test_each_chain_logs_on_its_own(caplog: pytest.LogCaptureFixture) -> None:
    t = Transforms()
    t.add_upgrade("users", 1, lambda k, v: (k, 1 / 0))
    with caplog.at_level(logging.WARNING, logger="handoff.transforms"):
        for _ in range(2):
            chain = t.path("users", 1, 2)
            assert chain.apply([("k", "v", None)] * 3) == (
                [],
                {"transform failed: ZeroDivisionError": 3},
            )
    assert len([r for r in caplog.records if r.name == "handoff.transforms"]) == 2


def test_chain_repr_and_type() -> None:
    chain = users_transforms().path("users", 3, 1)
    assert isinstance(chain, Chain)
    assert repr(chain) == "Chain('users', 3 -> 1, 2 steps)"


def test_apply_keeping_pairs_survivors_with_their_positions() -> None:
    transforms = Transforms()

    def halve(key: Any, value: Any) -> tuple[Any, Any]:
        if value % 2:
            raise ValueError("odd")
        return key, value // 2

    transforms.add_upgrade("n", 1, halve)
    chain = transforms.path("n", 1, 2)
    kept, out, dropped = chain.apply_keeping([("a", 4, None), ("b", 3, 1.5), ("c", 8, 2)])
    assert kept == [0, 2]
    assert out == [("a", 2, None), ("c", 4, 2)]
    assert dropped == {"transform failed: ValueError": 1}
    assert transforms.path("n", 2, 2).apply_keeping([("x", 1, None)]) == ([0], [("x", 1, None)], {})
