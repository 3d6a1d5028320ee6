"""Attacks on the S3 snapshot store: a hostile or buggy bucket, bad URLs, odd claims.

Each test is a finding: it failed on the store as first written. The fixed ones pass; the
open ones are strict xfails whose reason says the fix proposed. All run on the in-memory
object store of ``test_snapshot_s3`` (the misbehaviours are injected there): no server,
about a second in all.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from handoff._errors import SnapshotError
from handoff._keys import cluster_key
from handoff.snapshot_s3 import (
    MAX_LEASE,
    ObjectMeta,
    ObjectMissing,
    S3SnapshotStore,
    SnapshotURL,
    _ObstoreObjects,
    cluster_folder,
    parse_snapshot_url,
)
from tests._helpers import COOKIE
from tests._helpers import handoff_node as node
from tests.test_snapshot_s3 import (
    NOW,
    Clock,
    MemoryObjects,
    MemoryUpload,
    chunk,
    keys,
    make_store,
    write,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- URLs ------------------------------------------------------------------------------------


def test_the_bucket_keeps_its_case() -> None:
    # urlsplit's hostname lower-cases: s3://MyBucket used to address "mybucket".
    assert parse_snapshot_url("s3://MyBucket/p") == SnapshotURL("MyBucket", "p")
    assert parse_snapshot_url("s3://b/p?lease=5&max_age=300") == SnapshotURL(
        "b", "p", lease=5.0, max_age=300.0
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # obstore refuses these keys at the first request, with its own words; the URL
        # setting now refuses them when the configuration is read.
        ("s3://b/a/../c", "the prefix 'a/../c' has an empty, '.' or '..' segment"),
        ("s3://b/a//c", "the prefix 'a//c' has an empty"),
        ("s3://b/./c", "the prefix './c' has an empty"),
        # A lease of a millisecond is renewed in a tight loop of PUTs and lost between
        # them (two restorers); one of years blocks a crashed holder's snapshot for years.
        ("s3://b/p?lease=0.001", "lease='0.001' must be a number of seconds between 5 and 3600"),
        ("s3://b/p?lease=1e9", "between 5 and 3600"),
        # A max_age of a second deletes the snapshot at its own commit (retention runs then).
        ("s3://b/p?max_age=1", "max_age='1' must be a number of seconds between 300 and"),
        ("s3://b/p?max_age=nan", "max_age='nan'"),
        ("s3://b/p?lease=inf", "lease='inf'"),
        # int()'s and float()'s own messages named neither the URL nor the option.
        ("s3://b/p?keep=x", "keep='x' must be a positive whole number"),
        ("s3://b/p?lease=soon", "lease='soon' must be a number of seconds"),
        ("s3://b:0/p", "without credentials or port"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        parse_snapshot_url(url, {})
    assert repr(url) in str(raised.value)


# -- a bucket that misbehaves ----------------------------------------------------------------


class RangeIgnoring(MemoryObjects):
    """Answers a ranged GET with the whole object (a server that ignores ``Range``)."""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self._lock:
            self._meta(key)
            return self.data[key][0]


class ShortRanges(MemoryObjects):
    """Answers every ranged GET with nothing (a proxy that cuts bodies)."""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return b""


@pytest.mark.parametrize("kind", [RangeIgnoring, ShortRanges])
def test_a_bad_ranged_read_skips_the_snapshot_and_moves_nothing_aside(
    kind: type[MemoryObjects], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # Both used to look like a damaged file ("authentication failed in the trailer", "truncated"):
    # a genuine snapshot was moved aside because of the server, at every start.
    good = make_store(MemoryObjects(clock), clock)
    info = write(good, [chunk(0, 3)])
    objects = kind(clock)
    objects.data = dict(good.objects.data)  # type: ignore[attr-defined]
    store = make_store(objects, clock)
    with caplog.at_level(logging.WARNING, logger="handoff.snapshot"):
        assert store.pending("shop") == []
    assert "skipped" in caplog.text
    assert "ranged GET" in caplog.text
    assert keys(objects, "shop") == [str(info.path)]  # still there, nothing under corrupt/


class EndlessBody(MemoryObjects):
    """A GET that streams the object, then junk without end (bounded here: 64 blocks)."""

    blocks_sent = 0

    def read(self, key: str, *, etag: str | None = None) -> Iterator[bytes]:
        yield from super().read(key, etag=etag)
        for _ in range(64):
            self.blocks_sent += 1
            yield b"\0" * (1 << 20)


def test_an_endless_body_stops_at_the_objects_size(clock: Clock) -> None:
    # The local copy used to take whatever came: an endless body fills the disk.
    objects = EndlessBody(clock)
    store = make_store(objects, clock)
    info = write(store, [chunk(0, 3)])
    claim = store.claim(info)
    assert claim is not None
    with claim, pytest.raises(SnapshotError, match="more than the object's"):
        next(claim.read())
    assert objects.blocks_sent == 1
    # Not the snapshot's fault: left in place, not moved aside, for the next start.
    assert keys(objects, "shop") == [
        str(info.path).replace("/snapshots/", "/claims/"),
        str(info.path),
    ]
    assert len(store.pending("shop")) == 1


# -- claims ----------------------------------------------------------------------------------


def _claim_path(info_path: str) -> str:
    return info_path.replace("/snapshots/", "/claims/")


def test_a_garbage_claim_is_taken_over_and_logged(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    objects = MemoryObjects(clock)
    store = make_store(objects, clock)
    info = write(store, [chunk(0, 2)])
    objects.put(_claim_path(str(info.path)), b"\xff not json")
    with caplog.at_level(logging.WARNING, logger="handoff.snapshot"):
        claim = store.claim(info)
    assert claim is not None
    assert "holds no lease this release can read" in caplog.text
    with claim:
        assert sum(r for _, r in claim.read()) == 2
        claim.remove()


def test_a_lease_far_in_the_future_is_not_honoured(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # A claim whose "until" is a century away (a writer's clock far ahead, or garbage)
    # used to block its snapshot, and keep it from retention, for that century.
    objects = MemoryObjects(clock)
    store = make_store(objects, clock, keep=1)
    info = write(store, [chunk(0, 2)], created_at=NOW - 10)
    far = {"holder": "x", "owner": "skewed", "until": NOW + 100 * 365 * 86400.0}
    objects.put(_claim_path(str(info.path)), json.dumps(far).encode())
    # Retention does not count it as held: the newer snapshot replaces it.
    with caplog.at_level(logging.WARNING, logger="handoff.snapshot"):
        newer = write(store, [chunk(0, 1)], created_at=NOW - 5)
    assert "of skewed holds a lease ending" in caplog.text
    assert [i.path for i in store.pending("shop")] == [newer.path]
    # Nor does a claimer; a lease within MAX_LEASE still is.
    objects.put(_claim_path(str(newer.path)), json.dumps(far).encode())
    claim = store.claim(newer)
    assert claim is not None
    claim.release()
    near = {"holder": "x", "owner": "slow", "until": NOW + MAX_LEASE - 1}
    objects.put(_claim_path(str(newer.path)), json.dumps(near).encode())
    assert store.claim(newer) is None


class CountingReads(MemoryObjects):
    """Counts the bytes its whole-object GETs hand out."""

    bytes_read = 0

    def read(self, key: str, *, etag: str | None = None) -> Iterator[bytes]:
        for block in super().read(key, etag=etag):
            self.bytes_read += len(block)
            yield block


def test_a_huge_claim_object_is_not_read_into_memory(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # Claims were read whole with b"".join: a claim object of gigabytes filled memory at
    # claim time and at every retention.
    objects = CountingReads(clock)
    store = make_store(objects, clock, keep=1)
    info = write(store, [chunk(0, 2)], created_at=NOW - 10)
    objects.put(_claim_path(str(info.path)), b"{" + b" " * (8 << 20))
    objects.bytes_read = 0
    write(store, [chunk(0, 1)], created_at=NOW - 5)  # retention: the huge claim holds nothing
    assert str(info.path) not in keys(objects, "shop")
    newer = store.pending("shop")[0]
    objects.put(_claim_path(str(newer.path)), b"{" + b" " * (8 << 20))
    with caplog.at_level(logging.WARNING, logger="handoff.snapshot"):
        claim = store.claim(newer)
    assert claim is not None
    assert "holds no lease this release can read" in caplog.text
    claim.release()
    assert objects.bytes_read == 0


def test_retention_spares_a_claim_renewed_between_its_head_and_get(clock: Clock) -> None:
    class RenewedMeanwhile(MemoryObjects):
        def read(self, key: str, *, etag: str | None = None) -> Iterator[bytes]:
            if "/claims/" in key and etag is not None:
                self.put(key, self.data[key][0])  # the holder's renewal
            return super().read(key, etag=etag)

    objects = RenewedMeanwhile(clock)
    store = make_store(objects, clock, keep=1)
    old = write(store, [chunk(0, 1)], created_at=NOW - 10)
    lease = {"holder": "h", "owner": "o", "until": NOW + 30}
    objects.put(_claim_path(str(old.path)), json.dumps(lease).encode())
    write(store, [chunk(0, 1)], created_at=NOW - 5)
    assert str(old.path) in keys(objects, "shop")


class FlakyDelete(MemoryObjects):
    """DELETE of a snapshot fails once (a network blip)."""

    failures = 1

    def delete(self, key: str) -> None:
        if "/snapshots/" in key and self.failures:
            self.failures -= 1
            raise SnapshotError(f"{key}: DELETE failed: connection reset")
        super().delete(key)


def test_a_failed_delete_after_apply_does_not_let_the_next_node_apply_it_again(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # The DELETE failing after the whole snapshot was applied used to end the lease and
    # leave the snapshot: the next claimant applied it again (a counter counted twice).
    objects = FlakyDelete(clock)
    first = make_store(objects, clock, owner="first")
    second = make_store(objects, clock, owner="second")
    info = write(first, [chunk(0, 4)])
    claim = first.claim(info)
    assert claim is not None
    assert sum(r for _, r in claim.read()) == 4  # applied by the first node
    with caplog.at_level(logging.INFO, logger="handoff.snapshot"):
        claim.remove()  # no error: the claim marks it restored
        assert "applied but not deleted" in caplog.text
        assert str(info.path) in keys(objects, "shop")
        clock.now += 365 * 86400.0  # no lease to run out: for ever
        assert second.claim(info) is None
    assert "restored by first already" in caplog.text
    assert keys(objects, "shop") == []
    assert second.pending("shop") == []


def test_a_failed_delete_and_a_failed_mark_raise(clock: Clock) -> None:
    class Down(FlakyDelete):
        def put(
            self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None
        ) -> str | None:
            if if_match is not None and b"restored" in data:
                raise SnapshotError(f"{key}: PUT failed: connection reset")
            return super().put(key, data, create=create, if_match=if_match)

    objects = Down(clock)
    store = make_store(objects, clock)
    info = write(store, [chunk(0, 1)])
    claim = store.claim(info)
    assert claim is not None
    assert sum(r for _, r in claim.read()) == 1
    with pytest.raises(SnapshotError, match=r"neither deleted .* nor marked restored"):
        claim.remove()


def test_missing_credentials_are_named_as_such() -> None:
    # With no keys, obstore asks the instance metadata service; its refusal (or timeout)
    # used to read "access denied ... check AWS_ACCESS_KEY_ID", as if the keys were wrong.
    # The error is handed in directly: a test must not reach 169.254.169.254.
    objects = _ObstoreObjects(SnapshotURL("b", "p"), {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    refusal = RuntimeError(
        "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token: "
        "403 Forbidden"
    )
    error = objects._error(refusal, "listing", "k")
    assert (
        "no credentials (listing): AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"
        in str(error)
    )
    keyed = _ObstoreObjects(
        SnapshotURL("b", "p"),
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a",
         "AWS_SECRET_ACCESS_KEY": "b"},
    )  # fmt: skip
    assert "access denied" in str(keyed._error(RuntimeError("403 Forbidden"), "listing", "k"))


# -- a drain whose upload fails ----------------------------------------------------------------


class FailingUpload(MemoryObjects):
    """Uploads fail at their ``fail_at``-th write, or at completion (``fail_at`` 0)."""

    def __init__(self, clock: Clock, fail_at: int) -> None:
        super().__init__(clock)
        self.fail_at = fail_at

    def upload(self, key: str) -> MemoryUpload:
        objects = self

        class Failing(MemoryUpload):
            writes = 0

            def write(self, data: bytes) -> None:
                self.writes += 1
                if self.writes == objects.fail_at:
                    raise SnapshotError(f"{key}: upload failed: connection reset")
                super().write(data)

            def close(self) -> None:
                if objects.fail_at == 0:
                    raise SnapshotError(f"{key}: completing the upload failed: 503")
                super().close()

        return Failing(self, key)


@pytest.mark.anyio
@pytest.mark.parametrize("fail_at", [2, 9, 0], ids=["first-chunk", "third-chunk", "completion"])
async def test_a_drain_whose_upload_fails_reports_nothing_snapshotted(
    clock: Clock, fail_at: int
) -> None:
    objects = FailingUpload(clock, fail_at)
    n = node("n", "127.0.0.2", environ={})
    n._snapshots = S3SnapshotStore(
        objects, key=cluster_key(COOKIE, "shop").derive("snapshot"), clock=clock
    )
    # Values large enough for two chunks or more.
    n.track("users", {f"u{i}": "v" * 2000 for i in range(3000)})
    async with n:
        report = await n.drain()
    users = report.namespaces["users"]
    assert users.snapshotted == 0
    assert not report.ok
    assert sum(users.dropped.values()) == 3000
    assert any("snapshot store failed" in why for why in users.dropped)
    # Nothing half-written is visible: what is there (the catch-up's snapshot at stop, of
    # what the drain could not hand on) is complete and authenticates.
    complete = [str(info.path) for info in n._snapshots.pending("shop")]
    assert keys(objects, "shop") == complete


# -- listings, names, clocks -------------------------------------------------------------------


class Ghosts(MemoryObjects):
    """Lists objects that every GET and HEAD says do not exist (an eventually consistent
    listing, or a bucket that lies)."""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        raise ObjectMissing(f"{key} not found")

    def head(self, key: str) -> ObjectMeta:
        if "/snapshots/" in key:
            raise ObjectMissing(f"{key} not found")
        return super().head(key)


def test_listed_objects_that_404_are_skipped_not_moved(clock: Clock) -> None:
    good = make_store(MemoryObjects(clock), clock)
    write(good, [chunk(0, 1)])
    objects = Ghosts(clock)
    objects.data = dict(good.objects.data)  # type: ignore[attr-defined]
    store = make_store(objects, clock)
    assert store.pending("shop") == []
    assert not [k for k in keys(objects) if "/corrupt/" in k]


@pytest.mark.parametrize(
    ("one", "other"),
    [("a/b", "a_b"), ("..", "__"), ("x" * 48 + "1", "x" * 48 + "2"), ("", "-")],
)
def test_cluster_folders_never_collide_nor_escape(one: str, other: str) -> None:
    assert cluster_folder(one) != cluster_folder(other)
    for name in (one, other):
        folder = cluster_folder(name)
        assert folder.count("/") == 1
        assert folder.endswith("/")
        assert folder[:-1] not in ("", ".", "..")


def test_a_node_with_a_clock_far_ahead_does_not_delete_fresh_snapshots(clock: Clock) -> None:
    objects = MemoryObjects(clock)  # the server's clock: the true time
    honest = make_store(objects, clock)
    fresh = write(honest, [chunk(0, 2)], created_at=NOW - 5)
    ahead = Clock()
    ahead.now = NOW + 8 * 86400.0
    skewed = make_store(objects, ahead)
    write(skewed, [chunk(0, 1)], created_at=ahead.now)
    assert str(fresh.path) in keys(objects, "shop")
