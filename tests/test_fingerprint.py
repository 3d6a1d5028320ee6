"""The manual drain's export log (handoff/engine/_fingerprint.py): its sort and look-ups."""

from __future__ import annotations

from array import array

from hypothesis import given
from hypothesis import strategies as st

from handoff._codec import Codec
from handoff.engine._fingerprint import ExportLog, _sorted

HASHES = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=300)


@given(HASHES)
def test_the_bucket_sort_is_a_sort(hashes: list[int]) -> None:
    assert list(_sorted(array("q", hashes))) == sorted(hashes)


def test_the_extremes_sort_into_their_buckets() -> None:
    extremes = [2**63 - 1, 0, -(2**63), -1, 1, 2**56, -(2**56), 2**56 - 1, -(2**56) - 1]
    assert list(_sorted(array("q", extremes))) == sorted(extremes)


def test_the_log_tells_exported_records_from_changed_ones() -> None:
    log = ExportLog(Codec().fingerprint_encoder())
    log.add((f"k{i}", i, None) for i in range(5000))
    log.forget([("k7", 7, None)])
    assert not log.changed(("k1", 1, None))
    assert log.changed(("k1", 2, None))  # rewritten after the drain
    assert log.changed(("new", 1, None))
    assert log.changed(("k7", 7, None))  # pulled, then given up at the deadline
    log.add([("late", 1, None)])  # unsealed again: the next look-up sorts once more
    assert not log.changed(("late", 1, None))
    assert not log.changed(("k4999", 4999, None))
