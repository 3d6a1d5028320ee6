"""The directory snapshot store: atomic writes, and nothing of a damaged file ever applied."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import stat
import struct
import time
from pathlib import Path

import pytest

from handoff import snapshot
from handoff._codec import Codec
from handoff._errors import ConfigError, SnapshotCorrupt, SnapshotError
from handoff.snapshot import (
    MAGIC,
    DirectorySnapshotStore,
    SnapshotInfo,
    SnapshotStore,
)

NOW = 1_700_000_000.0
codec = Codec()


KEY = bytes(range(32))


def make_store(path: Path, now: float = NOW) -> DirectorySnapshotStore:
    return DirectorySnapshotStore(path, key=KEY, clock=lambda: now)


def chunk(start: int, count: int) -> tuple[bytes, int]:
    payload, failed = codec.encode_records(
        [(f"k{i}", f"v{i}", 30.0) for i in range(start, start + count)]
    )
    assert not failed
    return payload, count


def write(
    store: DirectorySnapshotStore,
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


def small_snapshot(tmp_path: Path) -> bytes:
    """The bytes of a committed snapshot with three small chunks."""
    store = make_store(tmp_path / "src")
    info = write(store, [chunk(0, 2), chunk(2, 1), chunk(3, 2)])
    return info.path.read_bytes()


def unusable(directory: Path, data: bytes) -> str:
    """Put ``data`` in a fresh store as a snapshot; return why it was refused (it must be)."""
    store = make_store(directory)
    (directory / "0000000000001-users-damaged.snapshot").write_bytes(data)
    infos = store.pending("shop")
    if not infos:
        reasons = list((directory / "corrupt").glob("*.reason.txt"))
        assert len(reasons) == 1
        return "pending: " + reasons[0].read_text()
    (info,) = infos
    yielded: list[tuple[bytes, int]] = []
    with pytest.raises(SnapshotCorrupt) as caught:
        yielded.extend(store.read(info))
    assert yielded == [], "a chunk of a damaged snapshot was yielded"
    return "read: " + caught.value.reason


# -- the happy path ---------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    store = make_store(tmp_path / "snaps")
    assert isinstance(store, SnapshotStore)
    chunks = [chunk(0, 3), chunk(3, 2)]
    info = write(store, chunks)
    assert info.records == 5
    assert stat.S_IMODE(info.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "snaps").stat().st_mode) == 0o700

    (listed,) = store.pending("shop")
    assert listed == info
    assert (listed.namespace, listed.kind, listed.version, listed.node, listed.release) == (
        "users",
        "cachetools",
        2,
        "web-1",
        "v41",
    )
    assert listed.created_at == NOW - 5
    assert listed.cluster == "shop"
    assert list(store.read(listed)) == chunks
    assert store.verify(listed) == 5
    records = [
        r for payload, n in store.read(listed) for r in codec.decode_records(payload, max_records=n)
    ]
    assert [r[0] for r in records] == ["k0", "k1", "k2", "k3", "k4"]

    store.remove(listed)
    assert store.pending("shop") == []
    store.remove(listed)  # already gone: fine


def test_empty_snapshot_and_ordering(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    later = write(store, [chunk(0, 1)], namespace="b/../weird name", created_at=NOW - 1)
    earlier = write(store, [], namespace="a", created_at=NOW - 100)
    (tmp_path / "README").write_text("not a snapshot, not ours")
    assert [i.namespace for i in store.pending("shop")] == ["a", "b/../weird name"]
    assert list(store.read(earlier)) == []
    assert later.path.parent == tmp_path
    assert (tmp_path / "README").exists()


def test_writer_is_finished_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = store.begin(
        "users", cluster="shop", kind="mapping", version=1, node="n", release="r", created_at=NOW
    )
    writer.write_chunk(*chunk(0, 1))
    writer.commit()
    writer.abort()  # after commit: a no-op, the snapshot stays
    assert len(store.pending("shop")) == 1
    with pytest.raises(SnapshotError, match="already finished"):
        writer.commit()
    with pytest.raises(SnapshotError, match="already finished"):
        writer.write_chunk(b"\x90", 0)


# -- atomicity --------------------------------------------------------------------------------


def test_uncommitted_snapshot_is_never_visible(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = store.begin(
        "users", cluster="shop", kind="mapping", version=1, node="n", release="r", created_at=NOW
    )
    writer.write_chunk(*chunk(0, 10))
    # The process "crashes" here: nothing committed, nothing aborted.
    assert store.pending("shop") == []
    (temp,) = os.listdir(tmp_path)
    assert temp.startswith(".")
    assert temp.endswith(".tmp")
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_exception_in_with_block_aborts(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with (  # noqa: PT012 - the with block is the subject
        pytest.raises(RuntimeError, match="boom"),
        store.begin(
            "users", cluster="shop", kind="m", version=1, node="n", release="r", created_at=NOW
        ) as writer,
    ):
        writer.write_chunk(*chunk(0, 1))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with store.begin(
        "users", cluster="shop", kind="m", version=1, node="n", release="r", created_at=NOW
    ) as writer:
        writer.write_chunk(*chunk(0, 1))
        # leaving without commit discards too
    assert os.listdir(tmp_path) == []


def test_stale_temporary_files_are_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real_now = time.time()
    stale = tmp_path / ".0001-users-aaaa.snapshot.1234abcd.tmp"
    fresh = tmp_path / ".0002-users-bbbb.snapshot.5678abcd.tmp"
    for path in (stale, fresh):
        path.write_bytes(MAGIC)
    os.utime(stale, (real_now - 3601, real_now - 3601))
    os.utime(fresh, (real_now - 3599, real_now - 3599))
    store = make_store(tmp_path, now=real_now)
    with caplog.at_level(logging.INFO, logger="handoff.snapshot"):
        assert store.pending("shop") == []
    assert not stale.exists()
    assert fresh.exists()
    assert "stale temporary snapshot" in caplog.text
    # An hour later (by the injected clock) the other one goes too.
    make_store(tmp_path, now=real_now + 3600).pending("shop")
    assert os.listdir(tmp_path) == []


# -- damage is always detected ----------------------------------------------------------------


def test_every_truncation_is_detected(tmp_path: Path) -> None:
    data = small_snapshot(tmp_path)
    for size in range(len(data)):
        reason = unusable(tmp_path / f"cut{size}", data[:size])
        assert reason, size
    assert "empty file" in unusable(tmp_path / "empty", b"")
    assert "truncated" in unusable(tmp_path / "half", data[: len(data) // 2])


def test_every_single_byte_flip_is_detected(tmp_path: Path) -> None:
    data = small_snapshot(tmp_path)
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x40
        reason = unusable(tmp_path / f"flip{index}", bytes(damaged))
        assert reason, index


def chunk_offsets(data: bytes) -> list[int]:
    """Where each chunk of a format 2 snapshot starts, then where the trailer starts."""
    (header_len,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    offset = len(MAGIC) + 4 + header_len + 32
    offsets = [offset]
    while data[offset : offset + 4] != b"\xff\xff\xff\xff":
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        offset += 8 + length + 32
        offsets.append(offset)
    return offsets


def test_damage_is_named(tmp_path: Path) -> None:
    data = small_snapshot(tmp_path)
    first_chunk, second_chunk, third_chunk, trailer = chunk_offsets(data)

    def flipped(index: int) -> bytes:
        damaged = bytearray(data)
        damaged[index] ^= 0x01
        return bytes(damaged)

    assert "authentication failed in chunk 2" in unusable(tmp_path / "a", flipped(second_chunk + 9))
    assert "authentication failed in chunk 1" in unusable(tmp_path / "b", flipped(first_chunk + 5))
    assert "authentication failed in the trailer" in unusable(
        tmp_path / "c", flipped(len(data) - 1)
    )
    # The last chunk dropped: the trailer still counts it.
    dropped = data[:third_chunk] + data[trailer:]
    assert "trailer counts 3 chunks, the file holds 2" in unusable(tmp_path / "c2", dropped)
    assert "not a snapshot (bad magic)" in unusable(tmp_path / "d", flipped(0))
    assert "trailer" in unusable(tmp_path / "e", data + b"\x00")
    truncated = unusable(tmp_path / "f", data[: second_chunk + 11])
    assert "truncated after 1 of ? chunks" in truncated
    # A chunk length beyond the limit is refused before anything is read.
    huge = data[:first_chunk] + struct.pack(">II", 0xFFFFFFF0, 1) + data[first_chunk + 8 :]
    assert "more than 67108864" in unusable(tmp_path / "g", huge)
    big_header = MAGIC + struct.pack(">I", 65 * 1024) + data[len(MAGIC) + 4 :]
    assert "exceeds 65536" in unusable(tmp_path / "h", big_header)


def test_nothing_is_yielded_before_the_last_chunk_is_verified(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    info = write(store, [chunk(0, 5), chunk(5, 5), chunk(10, 5)])
    data = bytearray(info.path.read_bytes())
    data[-100] ^= 0x01  # inside the last chunk's payload
    info.path.write_bytes(bytes(data))
    reader = store.read(info)
    with pytest.raises(SnapshotCorrupt, match="authentication failed in chunk 3"):
        next(reader)


def test_foreign_cluster_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = make_store(tmp_path)
    info = write(store, [chunk(0, 1)], cluster="other")
    with caplog.at_level(logging.WARNING, logger="handoff.snapshot"):
        assert store.pending("shop") == []
    assert not info.path.exists()
    moved = tmp_path / "corrupt" / info.path.name
    assert moved.exists()
    reason = Path(f"{moved}.reason.txt").read_text()
    assert reason == "belongs to cluster 'other', this node is in 'shop'\n"
    assert "belongs to cluster 'other'" in caplog.text
    # Moved aside, not offered again.
    assert store.pending("shop") == []


def test_read_rechecks_the_header_against_the_listing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    info = write(store, [chunk(0, 1)], cluster="other")
    listed_as_shop = dataclasses.replace(info, cluster="shop")
    with pytest.raises(SnapshotCorrupt, match="belongs to cluster 'other', this node is in 'shop'"):
        list(store.read(listed_as_shop))
    wrong_count = dataclasses.replace(info, records=2)
    with pytest.raises(SnapshotCorrupt, match="holds 1 records"):
        list(store.read(wrong_count))
    info.path.unlink()
    with pytest.raises(SnapshotCorrupt, match="unreadable"):
        list(store.read(info))


def test_bad_magic_and_empty_files(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    (tmp_path / "1-a.snapshot").write_bytes(b"PK\x03\x04 definitely a zip file")
    (tmp_path / "2-b.snapshot").write_bytes(b"")
    assert store.pending("shop") == []
    assert (tmp_path / "corrupt" / "1-a.snapshot.reason.txt").read_text() == (
        "not a snapshot (bad magic)\n"
    )
    assert (tmp_path / "corrupt" / "2-b.snapshot.reason.txt").read_text() == "empty file\n"


def test_quarantine_explicitly_and_of_a_vanished_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    info = write(store, [chunk(0, 1)])
    store.quarantine(info, "holds 'mapping' state, 'users' is 'cachetools'")
    assert store.pending("shop") == []
    assert (tmp_path / "corrupt" / f"{info.path.name}.reason.txt").exists()
    store.quarantine(info, "again")  # gone already: logged, not raised
    store.quarantine(str(tmp_path / "nothing.snapshot"), "never existed")


# -- configuration ----------------------------------------------------------------------------


def test_missing_directory_is_created(tmp_path: Path) -> None:
    make_store(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_a_file_is_not_a_snapshot_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"HANDOFF_SNAPSHOT_DIR .* not a directory"):
        make_store(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"HANDOFF_SNAPSHOT_DIR .* cannot be created"):
        make_store(tmp_path / "file" / "sub")


def test_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root may write anywhere, so the permission check itself is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"HANDOFF_SNAPSHOT_DIR .* not writable"):
        make_store(tmp_path)


# -- claims: one restorer per snapshot --------------------------------------------------------


def test_a_held_claim_keeps_every_other_claimant_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = make_store(tmp_path), make_store(tmp_path)
    info = write(first, [chunk(0, 2)])
    claim = first.claim(info)
    assert claim is not None
    with claim:
        caplog.set_level(logging.INFO, logger="handoff.snapshot")
        # Another store (another process, in production) and even this one are turned away:
        # the lock belongs to the open file, not to the process.
        assert second.claim(info) is None
        assert first.claim(info) is None
        assert "being restored by another process" in caplog.text
        assert list(claim.read()) == [chunk(0, 2)]
        assert list(claim.read()) == [chunk(0, 2)], "a claim may be read again"
    # Released without removing: the snapshot waits for the next claimant.
    again = second.claim(info)
    assert again is not None
    with again:
        again.remove()
    assert not info.path.exists()
    assert second.pending("shop") == []
    assert second.claim(info) is None, "a removed snapshot cannot be claimed"


def test_a_snapshot_removed_while_its_claim_was_awaited_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = make_store(tmp_path), make_store(tmp_path)
    info = write(first, [chunk(0, 2)])
    holder = first.claim(info)
    assert holder is not None
    real_flock = fcntl.flock
    removed: list[bool] = []

    def holder_finishes_first(fd: int, operation: int) -> None:
        # The second claimant opened the file; the holder removes it and lets go before the
        # second one locks it: the lock is won on a file that is no longer there. (Once:
        # the removal locks the record of restored ids too.)
        if operation & fcntl.LOCK_EX and holder is not None and fd != holder_fd and not removed:
            removed.append(True)
            holder.remove()
        real_flock(fd, operation)

    holder_fd = holder._file.fileno()  # type: ignore[attr-defined]
    monkeypatch.setattr(fcntl, "flock", holder_finishes_first)
    assert second.claim(info) is None


def test_a_claimed_snapshot_moved_aside_is_gone_for_every_claimant(tmp_path: Path) -> None:
    first, second = make_store(tmp_path), make_store(tmp_path)
    info = write(first, [chunk(0, 2)])
    claim = first.claim(info)
    assert claim is not None
    claim.quarantine("damaged, says the test")
    with pytest.raises(SnapshotError, match="released"):
        list(claim.read())
    assert (tmp_path / "corrupt" / info.path.name).exists()
    assert (tmp_path / "corrupt" / f"{info.path.name}.reason.txt").exists()
    assert second.claim(info) is None
    assert second.pending("shop") == []


def test_a_link_planted_before_the_claim_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path / "snaps")
    info = write(store, [chunk(0, 1)])
    info.path.unlink()
    info.path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SnapshotCorrupt, match="unreadable"):
        store.claim(info)


# -- restored once: the record of restored ids ------------------------------------------------


def _restore_all(store: DirectorySnapshotStore) -> list[str]:
    """Claim, read and remove every pending snapshot; the ids restored."""
    done = []
    for info in store.pending("shop"):
        claim = store.claim(info)
        assert claim is not None
        with claim:
            list(claim.read())
            claim.remove()
        done.append(info.id)
    return done


def test_a_copy_put_back_is_moved_aside_by_every_store(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    info = write(first, [chunk(0, 2)])
    data = info.path.read_bytes()
    assert _restore_all(first) == [info.id]
    info.path.write_bytes(data)  # a volume backup put back
    info.path.chmod(0o600)
    other = make_store(tmp_path)  # another process: only the record file knows
    assert other.pending("shop") == []
    assert not info.path.exists()
    reason = (tmp_path / "corrupt" / (info.path.name + ".reason.txt")).read_text()
    assert f"already restored (snapshot id {info.id})" in reason
    fresh = write(other, [chunk(0, 1)])  # a new snapshot is restored as ever
    assert _restore_all(other) == [fresh.id]


def test_a_store_that_cannot_record_nor_delete_never_restores_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(tmp_path)
    info = write(store, [chunk(0, 2)])
    (tmp_path / "restored.ids").mkdir()  # the record cannot be written (nor read)

    def read_only(self: DirectorySnapshotStore, info: SnapshotInfo) -> None:
        raise SnapshotError("[Errno 30] Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(DirectorySnapshotStore, "remove", read_only)
        with pytest.raises(SnapshotError):
            _restore_all(store)
    assert "not recorded" in caplog.text
    assert info.path.exists()
    assert store.pending("shop") == []  # this store object remembers it
    assert not info.path.exists()


def test_the_record_stays_bounded_and_refuses_what_it_forgot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "MAX_RESTORED", 4)
    monkeypatch.setattr(snapshot, "_COMPACT_AT", 8 * 50)
    store = make_store(tmp_path)
    copies = {}
    for i in range(20):
        info = write(store, [chunk(i, 1)], created_at=NOW - 100 + i)
        copies[info.path] = info.path.read_bytes()
        assert _restore_all(store) == [info.id]
    lines = (tmp_path / "restored.ids").read_text().splitlines()
    assert len(lines) <= 8 + 1
    assert lines[0].startswith("forgotten-up-to ")
    # Every copy put back is refused: by its id, or as older than what was forgotten.
    for path, data in copies.items():
        path.write_bytes(data)
        path.chmod(0o600)
    assert make_store(tmp_path).pending("shop") == []
    assert len(list((tmp_path / "corrupt").glob("*.snapshot"))) == 20
    newer = write(store, [chunk(0, 1)], created_at=NOW)
    assert [i.id for i in make_store(tmp_path).pending("shop")] == [newer.id]
