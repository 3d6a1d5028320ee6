"""The contract every adapter passes, whatever object it hands off.

Subclass :class:`AdapterContract`, set ``__test__ = True`` and implement :meth:`make_source`
and :meth:`make_empty` (and :meth:`contents` if reading ``obj[key]`` is not how to see what
the object holds). The base class is not collected by itself.

Objects that are not caches say so rather than weaken the contract: :meth:`value`,
:meth:`write` and :meth:`delete` when their values and writes are not a mapping's,
``CONFLICT = "add"`` when a receiver adds what arrives to what it holds (counters) instead of
keeping its own entry, ``MERGES = False`` when the adapter has no ``merge`` option. An
adapter with ``moves_ownership`` must take what it exports and give it back on request
(:class:`~handoff.SupportsGiveBack`); any other must leave its object unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff._adapter import Adapter, ImportResult, Record, SupportsGiveBack

__all__ = ("AdapterContract",)

Merge = Callable[[Any, Any], Any]


class AdapterContract:
    """Behaviour every adapter must show; see the module documentation."""

    __test__: ClassVar[bool] = False

    N: ClassVar[int] = 24
    """Entries in a source; receivers made by :meth:`make_empty` hold at least twice that."""

    CONFLICT: ClassVar[str] = "keep"
    """What a receiver does with a record for a key it holds: ``"keep"`` its own entry, or
    ``"add"`` the record's value to it."""

    MERGES: ClassVar[bool] = True
    """Whether :meth:`make_empty` takes a ``merge`` function."""

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

    def value(self, i: int) -> Any:
        """The value of the ``i``-th entry of a source (``"changed"``: a rewritten one)."""
        return {"n": i, "text": "x" * i}

    def changed(self, key: Any) -> Any:
        """A value written over ``key`` after an export began."""
        return ("changed", key)

    def held(self) -> Any:
        """A receiver's own value for a key a source holds too."""
        return "mine"

    def write(self, obj: Any, key: Any, value: Any) -> None:
        """Make ``obj`` hold ``value`` at ``key``."""
        obj[key] = value

    def delete(self, obj: Any, key: Any) -> None:
        """Remove ``key`` from ``obj``."""
        del obj[key]

    def on_conflict(self, held: Any, incoming: Any) -> Any:
        """What a receiver holding ``held`` holds after importing ``incoming``."""
        return held + incoming if self.CONFLICT == "add" else held

    # -- helpers --

    def entries(self) -> dict[Any, Any]:
        return {f"key-{i}": self.value(i) for i in range(self.N)}

    def needs_merge(self) -> None:
        if not self.MERGES:
            pytest.skip(f"{type(self).__name__}: the adapter takes no merge function")

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
                self.write(obj, key, self.changed(key))
        rest = {key: value for key, value, _meta in iterator}
        assert rest == {key: self.changed(key) for key in entries if key != first_key}

    def test_export_tolerates_deletion_of_keys_not_yet_exported(self) -> None:
        obj, adapter, entries = self.source()
        iterator = adapter.export()
        first_key, _value, _meta = next(iterator)
        deleted = [key for i, key in enumerate(entries) if i % 2 and key != first_key]
        for key in deleted:
            self.delete(obj, key)
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
        self.write(receiver, "key-0", self.held())
        result = receiver_adapter.import_records(list(adapter.export()))
        if self.CONFLICT == "keep":
            assert result == ImportResult(applied=len(entries) - 1, kept_existing=1)
        else:
            assert result == ImportResult(applied=len(entries))
        held = self.on_conflict(self.held(), entries["key-0"])
        assert self.contents(receiver) == {**entries, "key-0": held}

    def test_export_takes_what_moves_and_leaves_what_is_copied(self) -> None:
        _obj, adapter, entries = self.source()
        first = list(adapter.export())
        second = list(adapter.export())
        if adapter.moves_ownership:
            # Taken as exported: nothing is left to hand off twice.
            assert second == []
            assert len(adapter) == 0
        else:
            assert {k: v for k, v, _m in second} == {k: v for k, v, _m in first} == entries
            assert len(adapter) == len(entries)

    def test_what_moves_is_given_back_on_request(self) -> None:
        obj, adapter, entries = self.source()
        if not adapter.moves_ownership:
            pytest.skip("a copy stays with its object: nothing to give back")
        assert isinstance(adapter, SupportsGiveBack)
        records = list(adapter.export())
        adapter.give_back(records)
        assert self.contents(obj) == entries
        assert len(adapter) == len(entries)

    def test_merge_function_is_applied_to_keys_both_hold(self) -> None:
        self.needs_merge()
        _obj, adapter, entries = self.source()
        receiver, receiver_adapter = self.make_empty(
            merge=lambda existing, incoming: [existing, incoming["n"]]
        )
        receiver["key-3"] = "mine"
        result = receiver_adapter.import_records(list(adapter.export()))
        assert result == ImportResult(applied=len(entries))
        assert self.contents(receiver) == {**entries, "key-3": ["mine", 3]}

    def test_a_raising_merge_drops_the_record_as_an_error(self) -> None:
        self.needs_merge()
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
        self.write(receiver, "mine", 1)
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
        merging = self.MERGES and data.draw(st.booleans())
        receiver, receiver_adapter = self.make_empty(
            merge=(lambda existing, incoming: incoming) if merging else None
        )
        for key in held:
            self.write(receiver, key, self.held())
        result = receiver_adapter.import_records(chosen)
        assert result.total == len(chosen)
        assert set(self.contents(receiver)) == held | {key for key, _v, _m in chosen}

    @pytest.mark.parametrize("age", [0.0, 1.0])
    def test_age_keeps_accounting_exact(self, age: float) -> None:
        _obj, adapter, _entries = self.source()
        _receiver, receiver_adapter = self.make_empty()
        records = list(adapter.export())
        assert receiver_adapter.import_records(records, age=age).total == len(records)
