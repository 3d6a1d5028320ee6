"""The adapter registry: nearest type wins, explicit registration, entry points, errors."""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import subprocess
import sys
import types
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import cachetools
import pytest

from handoff import _registry
from handoff._adapter import ImportResult, Record
from handoff._errors import AdapterNotFound, HandoffError
from handoff._registry import (
    ENTRY_POINT_GROUP,
    AdapterFactory,
    AdapterRegistry,
    ClassFactory,
    adapter_for,
    register_adapter,
)
from handoff.adapters.cachetools import (
    CacheAdapter,
    LFUCacheAdapter,
    LRUCacheAdapter,
    RRCacheAdapter,
    TLRUCacheAdapter,
    TTLCacheAdapter,
)
from handoff.adapters.mapping import MappingAdapter


class StubAdapter:
    """An adapter that remembers what made it."""

    kind = "stub"
    moves_ownership = False

    def __init__(self, obj: Any, *, made_by: str = "?", **options: Any) -> None:
        self.obj = obj
        self.made_by = made_by
        self.options = options

    def __len__(self) -> int:
        return 0

    def export(self) -> Iterator[Record]:
        return iter(())

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        return ImportResult()


class StubFactory:
    def __init__(self, name: str, *types: type) -> None:
        self.name = name
        self.types = types

    def __call__(self, obj: Any, /, **options: Any) -> StubAdapter:
        return StubAdapter(obj, made_by=self.name, **options)

    def __repr__(self) -> str:
        return f"StubFactory({self.name})"


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint."""

    def __init__(self, name: str, loaded: Any = None, error: Exception | None = None) -> None:
        self.name = name
        self.value = f"plugin_{name}:factory"
        self.group = ENTRY_POINT_GROUP
        self._loaded = loaded
        self._error = error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._loaded


class Room:
    """A type nothing knows about."""


class MyLRU(cachetools.LRUCache[Any, Any]):
    pass


class MyCache(cachetools.Cache[Any, Any]):
    pass


class PlainMapping(MutableMapping[Any, Any]):
    def __init__(self) -> None:
        self._data: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class EntryPoints:
    """What the fake ``importlib.metadata.entry_points`` finds, and the groups asked for."""

    def __init__(self) -> None:
        self.found: list[FakeEntryPoint] = []
        self.calls: list[str] = []

    def __call__(self, *, group: str) -> list[FakeEntryPoint]:
        self.calls.append(group)
        return list(self.found) if group == ENTRY_POINT_GROUP else []


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> EntryPoints:
    """Replaces the installed distributions' entry points (none unless a test adds some)."""
    fake = EntryPoints()
    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    return fake


# --- the nearest type in the MRO wins ---


@pytest.mark.parametrize(
    ("obj", "adapter_type"),
    [
        (cachetools.LRUCache(4), LRUCacheAdapter),
        (MyLRU(4), LRUCacheAdapter),
        (cachetools.TTLCache(4, ttl=1), TTLCacheAdapter),
        (cachetools.TLRUCache(4, ttu=lambda _k, _v, now: now), TLRUCacheAdapter),
        (cachetools.LFUCache(4), LFUCacheAdapter),
        (MyCache(4), CacheAdapter),
        ({}, MappingAdapter),
        (collections.OrderedDict(), MappingAdapter),
        (collections.defaultdict(list), MappingAdapter),
        (PlainMapping(), MappingAdapter),
    ],
)
def test_builtin_adapters_by_nearest_type(
    entry_points: EntryPoints, obj: Any, adapter_type: type
) -> None:
    adapter = AdapterRegistry().adapter_for(obj)
    assert type(adapter) is adapter_type


def test_options_reach_the_adapter(entry_points: EntryPoints) -> None:
    def merge(old: Any, new: Any) -> Any:
        return new

    adapter = AdapterRegistry().adapter_for(cachetools.LRUCache(4), merge=merge)
    assert isinstance(adapter, LRUCacheAdapter)
    assert adapter.merge is merge
    with pytest.raises(TypeError):
        AdapterRegistry().adapter_for({}, color="blue")


def test_a_registration_for_a_base_type_loses_to_a_nearer_builtin(
    entry_points: EntryPoints,
) -> None:
    registry = AdapterRegistry()
    registry.register(StubFactory("mine", cachetools.Cache))
    assert isinstance(registry.adapter_for(cachetools.LRUCache(4)), LRUCacheAdapter)
    assert type(registry.adapter_for(cachetools.RRCache(4))) is RRCacheAdapter
    made = registry.adapter_for(MyCache(4))
    assert isinstance(made, StubAdapter)
    assert made.made_by == "mine"


def test_explicit_registration_overrides_builtins_and_earlier_registrations(
    entry_points: EntryPoints,
) -> None:
    registry = AdapterRegistry()
    registry.register(StubFactory("first", cachetools.TTLCache, Room))
    registry.register(StubFactory("second", cachetools.TTLCache))
    ttl = registry.adapter_for(cachetools.TTLCache(4, ttl=1))
    room = registry.adapter_for(Room())
    assert isinstance(ttl, StubAdapter)
    assert isinstance(room, StubAdapter)
    assert (ttl.made_by, room.made_by) == ("second", "first")


def test_a_factory_serves_subclasses(entry_points: EntryPoints) -> None:
    class Lobby(Room):
        pass

    registry = AdapterRegistry()
    registry.register(StubFactory("rooms", Room))
    made = registry.adapter_for(Lobby())
    assert isinstance(made, StubAdapter)
    assert made.made_by == "rooms"


def test_among_virtual_bases_the_most_derived_wins(entry_points: EntryPoints) -> None:
    registry = AdapterRegistry()
    registry.register(StubFactory("any mapping", collections.abc.Mapping))
    # dict is a MutableMapping and a Mapping only by registration: the builtin
    # MutableMapping adapter is nearer than a registration for Mapping.
    assert isinstance(registry.adapter_for({}), MappingAdapter)
    made = registry.adapter_for(types.MappingProxyType({}))
    assert isinstance(made, StubAdapter)


def test_register_rejects_what_is_not_a_factory() -> None:
    registry = AdapterRegistry()
    with pytest.raises(TypeError, match="types"):
        registry.register(lambda obj: obj)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="classes"):
        registry.register(StubFactory("bad", "dict"))  # type: ignore[arg-type]


def test_class_factory_makes_adapters(entry_points: EntryPoints) -> None:
    registry = AdapterRegistry()
    factory: AdapterFactory = ClassFactory(StubAdapter, (Room,))
    registry.register(factory)
    made = registry.adapter_for(Room(), made_by="class", extra=1)
    assert isinstance(made, StubAdapter)
    assert (made.made_by, made.options) == ("class", {"extra": 1})
    assert "StubAdapter" in repr(factory)


# --- entry points ---


def test_entry_points_are_loaded_once_and_only_when_needed(
    entry_points: EntryPoints,
) -> None:
    entry_points.found.append(FakeEntryPoint("rooms", StubFactory("plugin", Room)))
    registry = AdapterRegistry()
    calls = entry_points.calls
    assert calls == []
    made = registry.adapter_for(Room())
    registry.adapter_for(Room())
    registry.adapter_for({})
    assert calls == [ENTRY_POINT_GROUP]
    assert isinstance(made, StubAdapter)
    assert made.made_by == "plugin"


def test_entry_points_override_builtins_and_yield_to_registrations(
    entry_points: EntryPoints,
) -> None:
    entry_points.found.append(FakeEntryPoint("lru", StubFactory("plugin", cachetools.LRUCache)))
    registry = AdapterRegistry()
    made = registry.adapter_for(cachetools.LRUCache(4))
    assert isinstance(made, StubAdapter)
    assert made.made_by == "plugin"
    registry.register(StubFactory("app", cachetools.LRUCache))
    made = registry.adapter_for(cachetools.LRUCache(4))
    assert isinstance(made, StubAdapter)
    assert made.made_by == "app"


def test_a_broken_entry_point_is_logged_and_skipped(
    entry_points: EntryPoints, caplog: pytest.LogCaptureFixture
) -> None:
    entry_points.found.extend(
        [
            FakeEntryPoint("crashes", error=ImportError("No module named 'plugin_crashes'")),
            FakeEntryPoint("not-a-factory", loaded=object()),
            FakeEntryPoint("rooms", StubFactory("plugin", Room)),
        ]
    )
    registry = AdapterRegistry()
    with caplog.at_level(logging.WARNING, logger="handoff.adapters"):
        made = registry.adapter_for(Room())
    assert isinstance(made, StubAdapter)
    warnings = [r for r in caplog.records if r.name == "handoff.adapters"]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert "crashes" in warnings[0].getMessage()
    assert "plugin_crashes" in warnings[0].getMessage()
    assert "not-a-factory" in warnings[1].getMessage()
    assert isinstance(registry.adapter_for({}), MappingAdapter)


def test_failing_to_list_entry_points_is_not_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*, group: str) -> list[Any]:
        raise RuntimeError("corrupt metadata")

    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    with caplog.at_level(logging.WARNING, logger="handoff.adapters"):
        assert isinstance(AdapterRegistry().adapter_for({}), MappingAdapter)
    assert "entry points" in caplog.text


# --- unknown types ---


def test_an_unknown_type_raises_adapter_not_found_with_a_way_forward(
    entry_points: EntryPoints,
) -> None:
    registry = AdapterRegistry()
    registry.register(StubFactory("ints", int))
    with pytest.raises(AdapterNotFound) as caught:
        registry.adapter_for(Room())
    message = str(caught.value)
    assert isinstance(caught.value, HandoffError)
    assert f"{__name__}.Room" in message
    for supported in ("cachetools.TTLCache", "collections.abc.MutableMapping", "builtins.int"):
        assert supported in message
    assert "handoff.register_adapter" in message
    assert ENTRY_POINT_GROUP in message


# --- the process-wide registry ---


def test_module_functions_use_the_process_registry(
    monkeypatch: pytest.MonkeyPatch, entry_points: EntryPoints
) -> None:
    monkeypatch.setattr(_registry, "_registry", AdapterRegistry())
    with pytest.raises(AdapterNotFound):
        adapter_for(Room())
    register_adapter(StubFactory("global", Room))
    made = adapter_for(Room())
    assert isinstance(made, StubAdapter)
    assert made.made_by == "global"


def test_importing_handoff_imports_no_adapter_code() -> None:
    script = (
        "import sys, handoff, handoff._registry as r\n"
        "r.adapter_for({})\n"
        "assert 'handoff.adapters.mapping' in sys.modules\n"
        "assert 'handoff.adapters.cachetools' not in sys.modules, 'cachetools adapter'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
