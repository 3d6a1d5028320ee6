"""Snapshots against someone who can reach the snapshot directory (issue 8, item 7).

A snapshot is restored only when this user's private directory holds it and the cluster's
cookie made it; a forged, spliced or partly undecodable file changes nothing, and no link
planted in the directory makes the node read or write elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from handoff._codec import Codec
from handoff._errors import ConfigError, SnapshotCorrupt
from handoff._keys import cluster_key
from handoff._registry import adapter_for
from handoff.engine._restore import restore_snapshots
from handoff.engine._tracked import Tracked
from handoff.snapshot import MAGIC, DirectorySnapshotStore, SnapshotInfo
from handoff.transforms import Transforms

NOW = 1_700_000_000.0
KEY = cluster_key(b"snapshot-tests-cookie-0123456789", "shop").derive("snapshot")
codec = Codec()

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root can give a directory to another user"
)


def store_at(path: Path, key: bytes = KEY) -> DirectorySnapshotStore:
    return DirectorySnapshotStore(path, key=key, clock=lambda: NOW)


def payload(start: int, count: int) -> tuple[bytes, int]:
    data, failed = codec.encode_records(
        [(f"k{i}", f"v{i}", 30.0) for i in range(start, start + count)]
    )
    assert not failed
    return data, count


def write(store: DirectorySnapshotStore, chunks: list[tuple[bytes, int]]) -> SnapshotInfo:
    with store.begin(
        "users",
        cluster="shop",
        kind="mapping",
        version=1,
        node="web-1",
        release="v41",
        created_at=NOW - 5,
    ) as writer:
        for data, count in chunks:
            writer.write_chunk(data, count)
        return writer.commit()


def layout(data: bytes) -> tuple[int, list[tuple[int, int]], int]:
    """(end of the header and its tag, [(start, end) of each chunk], start of the trailer)."""
    (header_len,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    offset = header_end = len(MAGIC) + 4 + header_len + 32
    chunks = []
    while data[offset : offset + 4] != b"\xff\xff\xff\xff":
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunks.append((offset, offset + 8 + length + 32))
        offset += 8 + length + 32
    return header_end, chunks, offset


def restore_into_empty(store: DirectorySnapshotStore) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the store's snapshots of "users" into an empty dict: (what restore reported,
    what the dict then holds)."""
    target: dict[str, Any] = {}
    restored = restore_snapshots(
        store,
        cluster="shop",
        tracked={"users": Tracked("users", target, adapter_for(target), 1)},
        transforms=Transforms(),
        codec=codec,
    )
    return dict(restored), target


def refusal(directory: Path, data: bytes, key: bytes = KEY) -> str:
    """Offer ``data`` as a snapshot in a fresh store; why it was refused (it must be)."""
    store = store_at(directory, key)
    path = directory / "0000000000001-users-planted.snapshot"
    path.write_bytes(data)
    os.chmod(path, 0o600)
    infos = store.pending("shop")
    if infos:
        (info,) = infos
        yielded: list[tuple[bytes, int]] = []
        with pytest.raises(SnapshotCorrupt) as caught:
            yielded.extend(store.read(info))
        assert yielded == []
        store.quarantine(info, caught.value.reason)
    assert not path.exists()
    return (directory / "corrupt" / (path.name + ".reason.txt")).read_text()


# -- the directory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o777, "its group and others"), (0o707, "others"), (0o770, "its group")],
)
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    directory = tmp_path / "snaps"
    directory.mkdir()
    os.chmod(directory, mode)
    with pytest.raises(ConfigError) as caught:
        store_at(directory)
    assert f"writable by {who} (mode {mode:04o})" in str(caught.value)
    assert f"chmod go-w {directory}" in str(caught.value)
    os.chmod(directory, 0o755)  # readable by others is no threat to what it restores
    store_at(directory)


@needs_root
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    os.chown(directory, 54321, 54321)
    with pytest.raises(ConfigError) as caught:
        store_at(directory)
    assert "belongs to uid 54321" in str(caught.value)
    assert f"chown {os.geteuid()} {directory}" in str(caught.value)


def test_the_directory_the_store_creates_passes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store_at(tmp_path / "new" / "snaps")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "snaps").stat().st_mode) == 0o700


# -- forged and tampered files --------------------------------------------------------------------


def old_format(chunks: list[tuple[bytes, int]]) -> bytes:
    """A format 1 snapshot, made by hand: CRCs and a SHA-256 anyone can compute."""
    header = codec.packb(
        {
            "format": 1,
            "cluster": "shop",
            "namespace": "users",
            "kind": "mapping",
            "version": 1,
            "node": "evil",
            "release": "v1",
            "created_at": NOW,
        }
    )
    out = bytearray(MAGIC + struct.pack(">I", len(header)) + header)
    for data, count in chunks:
        crc = zlib.crc32(data, zlib.crc32(struct.pack(">I", count)))
        out += struct.pack(">III", len(data), count, crc) + data
    total = sum(count for _, count in chunks)
    out += struct.pack(">IQ32s", 0xFFFFFFFF, total, hashlib.sha256(out).digest())
    return bytes(out)


def test_a_hand_made_file_with_valid_old_checksums_is_never_restored(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    (tmp_path / "0000000000001-users-forged.snapshot").write_bytes(old_format([payload(0, 3)]))
    assert restore_into_empty(store) == ({}, {})
    reason = (tmp_path / "corrupt" / "0000000000001-users-forged.snapshot.reason.txt").read_text()
    assert reason.startswith("format 1 (checksums anyone can recompute, no authentication)")


@pytest.fixture
def genuine(tmp_path: Path) -> bytes:
    info = write(store_at(tmp_path / "src"), [payload(0, 2), payload(2, 2), payload(4, 2)])
    return info.path.read_bytes()


def flip(data: bytes, index: int) -> bytes:
    damaged = bytearray(data)
    damaged[index] ^= 0x01
    return bytes(damaged)


def test_tampering_anywhere_is_refused(tmp_path: Path, genuine: bytes) -> None:
    header_end, chunks, trailer = layout(genuine)
    release_at = genuine.index(b"v41")
    (c1, e1), (c2, e2), (c3, _) = chunks
    cases = {
        "header field": (flip(genuine, release_at), "authentication failed in the header"),
        "header tag": (flip(genuine, header_end - 1), "authentication failed in the header"),
        "chunk 1 payload": (flip(genuine, c1 + 10), "authentication failed in chunk 1"),
        "chunk 1 record count": (flip(genuine, c1 + 7), "authentication failed in chunk 1"),
        "chunk 2 payload": (flip(genuine, c2 + 10), "authentication failed in chunk 2"),
        "chunk 2 tag": (flip(genuine, e2 - 1), "authentication failed in chunk 2"),
        "trailer": (flip(genuine, len(genuine) - 1), "authentication failed in the trailer"),
        "truncated": (genuine[:trailer], "truncated after 3 of ? chunks"),
        "last chunk dropped": (genuine[:c3] + genuine[trailer:], "trailer counts 3 chunks"),
        "chunks reordered": (
            genuine[:c1] + genuine[c2:e2] + genuine[c1:e1] + genuine[e2:],
            "authentication failed in chunk 1",
        ),
        "a chunk repeated": (
            genuine[:c2] + genuine[c1:e1] + genuine[e2:],
            "authentication failed in chunk 2",
        ),
    }
    for name, (data, reason) in cases.items():
        assert data != genuine, name
        assert reason in refusal(tmp_path / name.replace(" ", "-"), data), name


def test_a_chunk_spliced_from_another_snapshot_of_the_same_key_is_refused(
    tmp_path: Path, genuine: bytes
) -> None:
    # The same key, the same namespace and an identical layout: only the binding differs.
    other = write(store_at(tmp_path / "other"), [payload(0, 2), payload(90, 2), payload(4, 2)])
    donor = other.path.read_bytes()
    _, chunks, _ = layout(genuine)
    _, donor_chunks, _ = layout(donor)
    (start, end), (d_start, d_end) = chunks[1], donor_chunks[1]
    spliced = genuine[:start] + donor[d_start:d_end] + genuine[end:]
    assert "authentication failed in chunk 2" in refusal(tmp_path / "spliced", spliced)


def test_a_file_made_with_another_cookie_is_refused(tmp_path: Path) -> None:
    other_key = cluster_key(b"another-cookie-of-the-same-cluster", "shop").derive("snapshot")
    made = write(store_at(tmp_path / "src", other_key), [payload(0, 2)]).path.read_bytes()
    assert "authentication failed in the header: made with another cookie" in refusal(
        tmp_path / "dst", made
    )


# -- restore: all or nothing ----------------------------------------------------------------------


def test_an_undecodable_second_chunk_means_nothing_is_applied(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    # Authenticated (the writer had the key) but not records: a bug, or a codec change.
    info = write(store, [payload(0, 3), (b"\xc1 not msgpack", 2), payload(5, 1)])
    assert restore_into_empty(store) == ({}, {})
    assert not info.path.exists()
    assert (tmp_path / "corrupt" / info.path.name).exists()


# -- links --------------------------------------------------------------------------------------


def test_a_symlinked_snapshot_is_never_read_nor_its_target_touched(
    tmp_path: Path, genuine: bytes
) -> None:
    store = store_at(tmp_path / "snaps")
    elsewhere = tmp_path / "elsewhere.snapshot"
    elsewhere.write_bytes(genuine)
    link = tmp_path / "snaps" / "0000000000001-users-link.snapshot"
    link.symlink_to(elsewhere)
    assert store.pending("shop") == []
    # Listed as a file, then replaced by a link before it is read.
    info = write(store, [payload(0, 1)])
    info.path.unlink()
    info.path.symlink_to(elsewhere)
    with pytest.raises(SnapshotCorrupt, match="unreadable"):
        list(store.read(info))
    store.quarantine(info, "a link")
    store.remove(info)
    assert elsewhere.read_bytes() == genuine


def test_a_symlinked_reason_file_is_replaced_not_written_through(tmp_path: Path) -> None:
    store = store_at(tmp_path / "snaps")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    corrupt = tmp_path / "snaps" / "corrupt"
    corrupt.mkdir(mode=0o700)
    name = "0000000000001-users-bad.snapshot"
    (corrupt / f"{name}.reason.txt").symlink_to(victim)
    (tmp_path / "snaps" / name).write_bytes(b"garbage")
    assert store.pending("shop") == []
    assert victim.read_text() == "precious\n"
    reason = corrupt / f"{name}.reason.txt"
    assert not reason.is_symlink()
    assert reason.read_text() == "not a snapshot (bad magic)\n"


def test_a_symlinked_corrupt_directory_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_at(tmp_path / "snaps")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "snaps" / "corrupt").symlink_to(elsewhere)
    (tmp_path / "snaps" / "0000000000001-users-bad.snapshot").write_bytes(b"garbage")
    assert store.pending("shop") == []
    assert list(elsewhere.iterdir()) == []
    assert "cannot move snapshot" in caplog.text
