"""The contract every adapter passes, whatever object it hands off.

Subclass :class:`AdapterContract`, set ``__test__ = True`` and implement :meth:`make_source`
and :meth:`make_empty` (and :meth:`contents` if reading ``obj[key]`` is not how to see what
the object holds). The base class is not collected by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff._adapter import Adapter, ImportResult, Record

__all__ = ("AdapterContract",)

Merge = Callable[[Any, Any], Any]


class AdapterContract:
    """Behaviour every adapter must show; see the module documentation."""

    __test__: ClassVar[bool] = False

    N: ClassVar[int] = 24
    """Entries in a source; receivers made by :meth:`make_empty` hold at least twice that."""

    # -- to implement --

    def make_source(self, entries: dict[Any, Any]) -> tuple[Any, Adapter]:
        """An object holding exactly ``entries`` (inserted in order), and its adapter."""
        raise NotImplementedError

    def make_empty(self, *, merge: Merge | None = None) -> tuple[Any, Adapter]:
        """An empty object of the same type, room for 2 * N entries, and its adapter."""
        raise NotImplementedError

    def contents(self, obj: Any) -> dict[Any, Any]:
        """What ``obj`` holds now (may count as a use: call it last)."""
        return {key: obj[key] for key in list(obj)}

    # -- helpers --

    def entries(self) -> dict[Any, Any]:
        return {f"key-{i}": {"n": i, "text": "x" * i} for i in range(self.N)}

    def source(self) -> tuple[Any, Adapter, dict[Any, Any]]:
        entries = self.entries()
        obj, adapter = self.make_source(entries)
        return obj, adapter, entries

    # -- the contract --

    def test_satisfies_the_protocol(self) -> None:
        _obj, adapter, _entries = self.source()
        assert isinstance(adapter, Adapter)
        assert isinstance(adapter.kind, str)
        assert adapter.kind
        assert isinstance(adapter.moves_ownership, bool)

    def test_len_matches(self) -> None:
        _obj, adapter, entries = self.source()
        assert len(adapter) == len(entries) == len(list(adapter.export()))
        _empty, empty_adapter = self.make_empty()
        assert len(empty_adapter) == 0
        assert list(empty_adapter.export()) == []

    def test_export_yields_each_live_entry_exactly_once(self) -> None:
        _obj, adapter, entries = self.source()
        records = list(adapter.export())
        keys = [key for key, _value, _meta in records]
        assert len(keys) == len(set(keys))
        assert {key: value for key, value, _meta in records} == entries

    def test_export_is_lazy(self) -> None:
        obj, adapter, entries = self.source()
        iterator = adapter.export()
        assert isinstance(iterator, Iterator)
        first_key, _value, _meta = next(iterator)
        # Values written after the first record must be the ones exported: the export
        # reads each value when it yields it rather than copying the state up front.
        for key in entries:
            if key != first_key:
                obj[key] = ("changed", key)
        rest = {key: value for key, value, _meta in iterator}
        assert rest == {key: ("changed", key) for key in entries if key != first_key}

    def test_export_tolerates_deletion_of_keys_not_yet_exported(self) -> None:
        obj, adapter, entries = self.source()
        iterator = adapter.export()
        first_key, _value, _meta = next(iterator)
        deleted = [key for i, key in enumerate(entries) if i % 2 and key != first_key]
        for key in deleted:
            del obj[key]
        rest = [key for key, _value, _meta in iterator]
        assert set(rest) == set(entries) - set(deleted) - {first_key}

    def test_round_trip_into_an_empty_receiver(self) -> None:
        _obj, adapter, entries = self.source()
        receiver, receiver_adapter = self.make_empty()
        records = list(adapter.export())
        result = receiver_adapter.import_records(records)
        assert result == ImportResult(applied=len(entries))
        assert len(receiver_adapter) == len(entries)
        assert self.contents(receiver) == entries

    def test_round_trip_in_chunks(self) -> None:
        _obj, adapter, entries = self.source()
        receiver, receiver_adapter = self.make_empty()
        records = list(adapter.export())
        total = ImportResult()
        for start in range(0, len(records), 5):
            total += receiver_adapter.import_records(records[start : start + 5])
        assert total.applied == len(entries)
        assert self.contents(receiver) == entries

    def test_receiver_keeps_the_entries_it_holds(self) -> None:
        _obj, adapter, entries = self.source()
        receiver, receiver_adapter = self.make_empty()
        receiver["key-0"] = "mine"
        result = receiver_adapter.import_records(list(adapter.export()))
        assert result == ImportResult(applied=len(entries) - 1, kept_existing=1)
        assert self.contents(receiver) == {**entries, "key-0": "mine"}

    def test_merge_function_is_applied_to_keys_both_hold(self) -> None:
        _obj, adapter, entries = self.source()
        receiver, receiver_adapter = self.make_empty(
            merge=lambda existing, incoming: [existing, incoming["n"]]
        )
        receiver["key-3"] = "mine"
        result = receiver_adapter.import_records(list(adapter.export()))
        assert result == ImportResult(applied=len(entries))
        assert self.contents(receiver) == {**entries, "key-3": ["mine", 3]}

    def test_a_raising_merge_drops_the_record_as_an_error(self) -> None:
        _obj, adapter, entries = self.source()

        def merge(existing: Any, incoming: Any) -> Any:
            raise RuntimeError("boom")

        receiver, receiver_adapter = self.make_empty(merge=merge)
        receiver["key-3"] = "mine"
        result = receiver_adapter.import_records(list(adapter.export()))
        assert result == ImportResult(applied=len(entries) - 1, dropped={"error": 1})
        assert self.contents(receiver) == {**entries, "key-3": "mine"}

    def test_import_of_nothing(self) -> None:
        receiver, receiver_adapter = self.make_empty()
        receiver["mine"] = 1
        result = receiver_adapter.import_records([])
        assert result == ImportResult()
        assert result.total == 0
        assert self.contents(receiver) == {"mine": 1}

    def test_an_unusable_record_is_counted_not_fatal(self) -> None:
        _obj, adapter, entries = self.source()
        _receiver, receiver_adapter = self.make_empty()
        records: list[Record] = [(["unhashable"], 1, None), *adapter.export()]
        result = receiver_adapter.import_records(records)
        assert result == ImportResult(applied=len(entries), dropped={"error": 1})

    # Every subclass runs this one method: the executors differ on purpose (they only share
    # Hypothesis' example database entry, which at worst replays a useless example).
    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.differing_executors]
    )
    @given(data=st.data())
    def test_import_result_accounts_for_every_record(self, data: st.DataObject) -> None:
        _obj, adapter, entries = self.source()
        records = list(adapter.export())
        # Any selection, with repeats (a retried chunk), into a receiver holding some keys.
        chosen = data.draw(st.lists(st.sampled_from(records), max_size=3 * self.N))
        held = data.draw(st.sets(st.sampled_from(list(entries)), max_size=self.N))
        merging = data.draw(st.booleans())
        receiver, receiver_adapter = self.make_empty(
            merge=(lambda existing, incoming: incoming) if merging else None
        )
        for key in held:
            receiver[key] = "mine"
        result = receiver_adapter.import_records(chosen)
        assert result.total == len(chosen)
        assert set(self.contents(receiver)) == held | {key for key, _v, _m in chosen}

    @pytest.mark.parametrize("age", [0.0, 1.0])
    def test_age_keeps_accounting_exact(self, age: float) -> None:
        _obj, adapter, _entries = self.source()
        _receiver, receiver_adapter = self.make_empty()
        records = list(adapter.export())
        assert receiver_adapter.import_records(records, age=age).total == len(records)
