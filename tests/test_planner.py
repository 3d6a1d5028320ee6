"""Successor choice: which releases count as newer, and how keys split."""

from __future__ import annotations

import random
import string

from handoff.engine import Router, release_key

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid(milliseconds: int, rng: random.Random) -> str:
    time_part = ""
    for _ in range(10):
        time_part = CROCKFORD[milliseconds % 32] + time_part
        milliseconds //= 32
    return time_part + "".join(rng.choice(CROCKFORD) for _ in range(16))


def test_versions_compare_by_number() -> None:
    ordered = ["v1", "v2", "v10", "v10.1", "v10.2", "v10.10"]
    assert sorted(ordered, key=release_key) == ordered
    assert sorted(["1.2.10", "1.2.9", "1.10.0"], key=release_key) == ["1.2.9", "1.2.10", "1.10.0"]
    assert sorted(["rc10", "rc2"], key=release_key) == ["rc2", "rc10"]


def test_fly_deployment_ulids_compare_by_time() -> None:
    rng = random.Random(7)
    start = 1_790_000_000_000
    for _ in range(2000):
        earlier = start + rng.randrange(10**10)
        later = earlier + rng.randrange(1, 86_400_000)
        old, new = f"deployment-{ulid(earlier, rng)}", f"deployment-{ulid(later, rng)}"
        assert release_key(old) < release_key(new), (old, new)


def test_dates_and_mixed_text_do_not_crash() -> None:
    releases = ["2024-01-05", "2024-01-10", "main-abc123", "unversioned", "", "v1", "2"]
    releases += ["".join(random.Random(i).choices(string.printable, k=12)) for i in range(50)]
    sorted(releases, key=release_key)  # comparable whatever the shapes
    assert release_key("2024-01-05") < release_key("2024-01-10")


def test_router_spreads_keys_and_moves_only_a_leaving_successors_keys() -> None:
    names = ["a", "b", "c"]
    router = Router(names)
    keys = [f"user:{i}" for i in range(30_000)]
    placement = {key: names[router.route(key)] for key in keys}
    counts = {name: sum(1 for v in placement.values() if v == name) for name in names}
    assert min(counts.values()) > 9_000, counts
    survivors = Router(["a", "c"])
    for key, owner in placement.items():
        if owner != "b":
            assert ["a", "c"][survivors.route(key)] == owner
