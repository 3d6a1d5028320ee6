"""Adapter for plain mappings: ``dict`` and any ``MutableMapping`` without a nearer adapter.

Records are ``(key, value, None)`` of kind ``"mapping"``. A mapping has no notion of hot, so
export follows its iteration order (insertion order for a ``dict``). The keys are listed
when the export starts and each value is read when its record is yielded: keys deleted
meanwhile are skipped. An entry the receiver already holds is kept (it is newer) unless the
adapter was made with ``merge``: then ``merge(existing, incoming)`` is stored. A record whose
key, value or merge function raises is dropped as ``"error"`` and logged.

Reading a ``dict`` (or a subclass that keeps ``dict.__getitem__``, like ``defaultdict``)
bypasses ``__missing__``, so the export never creates entries. Other mappings are read
through ``in`` and ``[]``; if their ``__getitem__`` has side effects, the export has them.

Adapters run on the node's event-loop thread; a mapping also written by other threads needs
the application's own locking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, Final

from handoff._adapter import ImportResult, Record
from handoff._registry import ClassFactory

__all__ = ("IMPORT_ERROR", "MAPPING_FACTORY", "MappingAdapter", "Merge")

logger = logging.getLogger(__name__)

IMPORT_ERROR: Final = "error"
"""Drop reason: the record could not be applied (unhashable key, a raising merge ...)."""

Merge = Callable[[Any, Any], Any]
"""``merge(existing_value, incoming_value) -> value`` for keys both sides hold."""

_MISSING: Final[Any] = object()


class MappingAdapter:
    """Hands off a ``MutableMapping``; see the module documentation for the rules."""

    kind: str = "mapping"
    moves_ownership: bool = False

    def __init__(self, mapping: MutableMapping[Any, Any], *, merge: Merge | None = None) -> None:
        if not isinstance(mapping, MutableMapping):
            raise TypeError(f"MappingAdapter adapts a MutableMapping, not {type(mapping).__name__}")
        if merge is not None and not callable(merge):
            raise TypeError(f"merge must be callable(existing, incoming), not {merge!r}")
        self.mapping = mapping
        self.merge = merge

    def __len__(self) -> int:
        return len(self.mapping)

    def __repr__(self) -> str:
        return f"MappingAdapter({type(self.mapping).__name__}, merge={self.merge!r})"

    def export(self) -> Iterator[Record]:
        """Yield ``(key, value, None)`` in iteration order, reading each value when yielded."""
        mapping = self.mapping
        get = self._reader()
        for key in list(mapping):
            value = get(key)
            if value is not _MISSING:
                yield key, value, None

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Store keys the mapping lacks; keep (or ``merge``) the ones it holds."""
        mapping, merge = self.mapping, self.merge
        get = self._reader()
        applied = kept = errors = 0
        for record in records:
            try:
                key, value, _meta = record
                existing = get(key)
                if existing is _MISSING:
                    mapping[key] = value
                elif merge is None:
                    kept += 1
                    continue
                else:
                    mapping[key] = merge(existing, value)
                applied += 1
            except Exception:
                if not errors:  # one log line per batch is enough
                    logger.warning("could not import a record into %r", self, exc_info=True)
                errors += 1
        return ImportResult(applied, kept, {IMPORT_ERROR: errors} if errors else {})

    def _reader(self) -> Callable[[Any], Any]:
        """``key -> value`` or ``_MISSING``, without creating entries where avoidable."""
        mapping = self.mapping
        if isinstance(mapping, dict) and type(mapping).__getitem__ is dict.__getitem__:
            dict_get = dict.get

            def from_dict(key: Any) -> Any:
                return dict_get(mapping, key, _MISSING)

            return from_dict

        def from_mapping(key: Any) -> Any:
            # Not mapping.get(key): that reads a missing key, which some mappings create.
            if key not in mapping:
                return _MISSING
            return mapping[key]

        return from_mapping


MAPPING_FACTORY: Final = ClassFactory(MappingAdapter, (MutableMapping,))
"""Factory for ``MutableMapping`` objects (the registry knows it by import path)."""
