"""The adapter registry: which adapter hands off an object, chosen by the object's type.

``node.track(name, obj)`` asks :func:`adapter_for` for an adapter. Factories come from three
places, most authoritative first:

1. :func:`register_adapter`, called by the application (the latest registration of a type
   wins);
2. the entry-point group ``handoff.adapters`` of installed distributions, loaded once, on the
   first look-up, so third-party packages extend the registry without being imported by the
   application;
3. the built-in adapters (cachetools caches, any ``MutableMapping``, ``handoff.Counters``,
   the ``limits`` package's ``MemoryStorage``), known by import path so that importing
   :mod:`handoff` imports no adapter code until an object needs it (the counters module is
   the exception: :mod:`handoff` exports its ``Counters`` class).

The factory whose type is nearest in ``type(obj).__mro__`` wins, whatever its source, so an
``LRUCache`` gets the LRU adapter rather than the one for ``Cache`` or ``MutableMapping``.
Between equally near types the more authoritative source wins. Types an object belongs to
only virtually (``dict`` is a ``MutableMapping`` by registration, not by inheritance) rank
after every real base class except ``object``.

A built-in type is matched only if its module is already imported: an object cannot be an
instance of a class that was never loaded, so looking up a ``dict`` never imports cachetools.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from handoff._adapter import Adapter
from handoff._errors import AdapterNotFound

__all__ = (
    "ENTRY_POINT_GROUP",
    "AdapterFactory",
    "AdapterRegistry",
    "ClassFactory",
    "adapter_for",
    "register_adapter",
)

ENTRY_POINT_GROUP = "handoff.adapters"
"""Entry-point group through which installed distributions provide adapter factories."""

logger = logging.getLogger("handoff.adapters")


class AdapterFactory(Protocol):
    """Makes adapters for objects of some types.

    ``types`` lists the classes it handles (subclasses included, unless a nearer factory
    exists); calling it with one such object and the options given to ``node.track`` returns
    the adapter. An entry point in the ``handoff.adapters`` group names such a factory.
    """

    types: tuple[type, ...]

    def __call__(self, obj: Any, /, **options: Any) -> Adapter:
        """Return an adapter wrapping ``obj``; unknown options raise :exc:`TypeError`."""
        ...


class ClassFactory:
    """An :class:`AdapterFactory` that calls an adapter class: ``cls(obj, **options)``."""

    __slots__ = ("adapter", "types")

    def __init__(self, adapter: Callable[..., Adapter], types: tuple[type, ...]) -> None:
        self.adapter = adapter
        self.types = types

    def __call__(self, obj: Any, /, **options: Any) -> Adapter:
        """Return ``adapter(obj, **options)``."""
        return self.adapter(obj, **options)

    def __repr__(self) -> str:
        name = getattr(self.adapter, "__qualname__", repr(self.adapter))
        return f"ClassFactory({name}, types={_type_names(self.types)})"


# (type "module:qualname", factory "module:attribute"). Kept as strings so neither the
# adapter modules nor the libraries they adapt are imported before an object needs them.
_BUILTINS: tuple[tuple[str, str], ...] = (
    ("cachetools:Cache", "handoff.adapters.cachetools:CACHE_FACTORY"),
    ("cachetools:FIFOCache", "handoff.adapters.cachetools:FIFO_CACHE_FACTORY"),
    ("cachetools:LFUCache", "handoff.adapters.cachetools:LFU_CACHE_FACTORY"),
    ("cachetools:LRUCache", "handoff.adapters.cachetools:LRU_CACHE_FACTORY"),
    ("cachetools:RRCache", "handoff.adapters.cachetools:RR_CACHE_FACTORY"),
    ("cachetools:TLRUCache", "handoff.adapters.cachetools:TLRU_CACHE_FACTORY"),
    ("cachetools:TTLCache", "handoff.adapters.cachetools:TTL_CACHE_FACTORY"),
    ("collections.abc:MutableMapping", "handoff.adapters.mapping:MAPPING_FACTORY"),
    ("handoff.adapters.counters:Counters", "handoff.adapters.counters:COUNTERS_FACTORY"),
    ("handoff.adapters.actors:ActorRegistry", "handoff.adapters.actors:ACTORS_FACTORY"),
    ("limits.storage.memory:MemoryStorage", "handoff.adapters.limits:MEMORY_STORAGE_FACTORY"),
)

# Sources, most authoritative first (lower ranks better).
_EXPLICIT, _ENTRY_POINT, _BUILTIN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Candidate:
    cls: type
    load: Callable[[], AdapterFactory]
    source: int
    seq: int


class AdapterRegistry:
    """Factories by type; see the module documentation for how one is chosen.

    The process-wide registry behind :func:`register_adapter` and :func:`adapter_for` is one
    instance; tests make their own. Thread-safe.
    """

    def __init__(self, *, builtins: Iterable[tuple[str, str]] = _BUILTINS) -> None:
        self._lock = threading.RLock()
        self._builtins = tuple(builtins)
        self._registered: list[AdapterFactory] = []
        self._entry_point_factories: list[AdapterFactory] = []
        self._entry_points_loaded = False

    def register(self, factory: AdapterFactory) -> None:
        """Use ``factory`` for objects of its ``types`` (overrides earlier registrations)."""
        problem = _factory_problem(factory)
        if problem:
            raise TypeError(f"{factory!r} is not an adapter factory: {problem}")
        with self._lock:
            self._registered.append(factory)

    def adapter_for(self, obj: Any, /, **options: Any) -> Adapter:
        """Return an adapter for ``obj`` made by the nearest factory for its type.

        Raises :exc:`~handoff.AdapterNotFound` when no factory handles the type; options the
        chosen factory does not know raise :exc:`TypeError`.
        """
        factory = self.factory_for(type(obj))
        if factory is None:
            raise AdapterNotFound(self._not_found_message(type(obj)))
        return factory(obj, **options)

    def factory_for(self, cls: type) -> AdapterFactory | None:
        """The factory that :meth:`adapter_for` would use for instances of ``cls``."""
        mro = cls.__mro__
        # Virtual bases (ABC registration) rank just before ``object``.
        virtual = mro.index(object) - 0.5 if object in mro else float(len(mro))
        nearest = float("inf")
        chosen: list[_Candidate] = []
        for candidate in self._candidates():
            if not issubclass(cls, candidate.cls):
                continue
            distance = float(mro.index(candidate.cls)) if candidate.cls in mro else virtual
            if distance < nearest:
                nearest, chosen = distance, [candidate]
            elif distance == nearest:
                chosen.append(candidate)
        if not chosen:
            return None
        # Several virtual bases at one distance: the most derived of them is nearest.
        chosen = [
            c
            for c in chosen
            if not any(o.cls is not c.cls and issubclass(o.cls, c.cls) for o in chosen)
        ]
        winner = min(chosen, key=lambda c: (c.source, -c.seq))
        return winner.load()

    def supported_types(self) -> list[str]:
        """Names of the types this registry has factories for, built-ins included."""
        names = {path.replace(":", ".") for path, _ in self._builtins}
        with self._lock:
            self._load_entry_points()
            factories = [*self._registered, *self._entry_point_factories]
        for factory in factories:
            names.update(_type_names(factory.types))
        return sorted(names)

    def _candidates(self) -> list[_Candidate]:
        with self._lock:
            self._load_entry_points()
            registered = list(self._registered)
            from_entry_points = list(self._entry_point_factories)
        candidates: list[_Candidate] = []
        for source, factories in ((_EXPLICIT, registered), (_ENTRY_POINT, from_entry_points)):
            for seq, factory in enumerate(factories):
                candidates.extend(
                    _Candidate(cls, _constant(factory), source, seq) for cls in factory.types
                )
        for seq, (type_path, factory_path) in enumerate(self._builtins):
            cls = _loaded_type(type_path)
            if cls is not None:
                candidates.append(_Candidate(cls, _importer(factory_path), _BUILTIN, seq))
        return candidates

    def _load_entry_points(self) -> None:
        # Called with the lock held; it is reentrant, so a plug-in that registers another
        # factory while being imported does not deadlock.
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        try:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception:
            logger.warning("could not list the %r entry points", ENTRY_POINT_GROUP, exc_info=True)
            return
        for entry_point in entry_points:
            try:
                factory = entry_point.load()
            except Exception as exc:
                logger.warning(
                    "skipping adapter entry point %r (%s): it failed to load: %r",
                    entry_point.name,
                    entry_point.value,
                    exc,
                )
                continue
            problem = _factory_problem(factory)
            if problem:
                logger.warning(
                    "skipping adapter entry point %r (%s): not an adapter factory: %s",
                    entry_point.name,
                    entry_point.value,
                    problem,
                )
                continue
            self._entry_point_factories.append(factory)

    def _not_found_message(self, cls: type) -> str:
        return (
            f"no handoff adapter for objects of type {cls.__module__}.{cls.__qualname__}. "
            f"Supported types (and their subclasses): {', '.join(self.supported_types())}. "
            "To hand off another type, write an adapter (see handoff.Adapter) and register "
            "a factory for it with handoff.register_adapter(factory), or ship it in the "
            f"{ENTRY_POINT_GROUP!r} entry-point group of your distribution."
        )


def _factory_problem(factory: object) -> str:
    """Why ``factory`` cannot serve as an :class:`AdapterFactory` ('' if it can)."""
    types = getattr(factory, "types", None)
    if not isinstance(types, tuple) or not types:
        return "it needs a non-empty `types` tuple of classes"
    if not all(isinstance(t, type) for t in types):
        return "its `types` must hold only classes"
    if not callable(factory):
        return "it must be callable as factory(obj, **options)"
    return ""


def _constant(factory: AdapterFactory) -> Callable[[], AdapterFactory]:
    return lambda: factory


def _importer(path: str) -> Callable[[], AdapterFactory]:
    def load() -> AdapterFactory:
        module, _, attribute = path.partition(":")
        factory: AdapterFactory = getattr(importlib.import_module(module), attribute)
        return factory

    return load


def _loaded_type(path: str) -> type | None:
    """The class named ``module:qualname`` if its module is imported, else ``None``."""
    module_name, _, qualname = path.partition(":")
    found: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        if found is None:
            return None
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _type_names(types: Iterable[type]) -> list[str]:
    return [f"{t.__module__}.{t.__qualname__}" for t in types]


_registry = AdapterRegistry()


def register_adapter(factory: AdapterFactory) -> None:
    """Hand off objects of ``factory.types`` with adapters made by ``factory``.

    A registration overrides built-in adapters and entry points for the same type, and
    earlier registrations; a factory for a base class also serves its subclasses unless a
    factory for a nearer class exists.
    """
    _registry.register(factory)


def adapter_for(obj: Any, /, **options: Any) -> Adapter:
    """Return an adapter for ``obj`` (see :class:`AdapterRegistry` for the choice).

    Raises :exc:`~handoff.AdapterNotFound` if no adapter handles its type.
    """
    return _registry.adapter_for(obj, **options)
