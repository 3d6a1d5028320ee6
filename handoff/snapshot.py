"""Snapshot stores: where state goes when no peer can take it, and where a node finds it.

A draining node that runs out of successors or time writes what is left of a namespace to a
snapshot; the next node to start with the same store (a volume that survives the restart)
restores it. :class:`SnapshotStore` is the interface; :class:`DirectorySnapshotStore`
keeps one file per snapshot in a local directory (``HANDOFF_SNAPSHOT_DIR``);
:class:`handoff.snapshot_s3.S3SnapshotStore` one object per snapshot in an S3-compatible
bucket (``HANDOFF_SNAPSHOT_URL``), in the same format, written and checked by the same code
(:class:`SnapshotEncoder`, :func:`inspect_file`, :func:`verified_chunks`).

Guarantees of the directory store:

* Only this user can plant a snapshot: the directory must belong to the process's user and
  must not be writable by group or others (:class:`~handoff._errors.ConfigError` at
  construction otherwise, naming the ``chmod`` / ``chown`` to run). A directory the store
  creates itself is mode 0700 and passes.
* Only the cluster can make one: every part of a file is authenticated with HMAC-SHA256
  under a key derived from the cookie (``cluster_key(cookie, cluster).derive("snapshot")``),
  so a hand-made file, a file of another cookie, or chunks reordered, dropped or spliced
  from another snapshot are refused.
* A snapshot is visible only once complete: it is written to a temporary file in the same
  directory, flushed and fsynced, renamed over its final name, and the directory is
  fsynced. A crash mid-write leaves a temporary file, never a partial snapshot; stale
  temporary files are removed after an hour.
* Nothing of a damaged snapshot is applied: :meth:`DirectorySnapshotStore.read` verifies
  every chunk's tag, the chunk and record counts and the trailer before it yields the first
  chunk. Verification streams the file, so memory stays bounded.
* No symlink is followed: snapshots are opened with ``O_NOFOLLOW``; ``corrupt/`` must be a
  real directory of this user, and reason files are written to a fresh temporary file and
  renamed into place (a rename replaces a planted link, it never writes through it).
* Unusable files (corrupt, unauthenticated, of the old format, foreign cluster, not a
  snapshot) are moved to ``corrupt/`` with a ``.reason.txt`` beside them, so that they can
  be inspected and are not retried forever.
* One restorer per snapshot: several processes may share the directory (the worker
  processes of one machine). A restorer first claims the file
  (:meth:`DirectorySnapshotStore.claim`): an exclusive ``flock`` on its own descriptor,
  held from the first read through verification and application until the file is
  removed or moved to ``corrupt/``. A file another process holds is skipped, and so is
  one that was removed or moved before the claim was won, so its records are applied
  once. The kernel drops the lock with a process that dies (even by ``SIGKILL``), so the
  next node to start restores what a crashed one left.
* Restored once, even when the file comes back: a restorer records the snapshot's id (from
  its authenticated header) as restored before it deletes the file, in ``restored.ids``
  beside the snapshots and in the store object's memory (for a directory that has become
  read-only). A snapshot whose id is recorded (a file whose deletion failed, a copy put
  back by an operator or a volume backup) is moved to ``corrupt/`` unapplied. The record
  keeps the 4096 newest ids by creation time (:data:`MAX_RESTORED`); past that, the
  creation time of the newest id it forgot is kept instead, and a snapshot not newer than
  it is also moved aside unapplied: it may have been restored already.

File format, version 2 (all integers big-endian; ``K`` is the snapshot key, ``H`` the
header's tag, ``mac(...)`` HMAC-SHA256 under ``K`` of the concatenation)::

    b"WARM-HANDOFF-SNAPSHOT\\n"                   magic, 22 bytes
    u32 length, msgpack map                      header, at most 64 KiB:
        {"format": 2, "id": str (random), "cluster": str, "namespace": str, "kind": str,
         "version": int, "node": str, "release": str, "created_at": float (Unix time)}
    32 bytes H                                   mac(b"header\\0", magic, length, header)
    chunk*                                       the i-th (from 1):
        u32 length                               payload bytes, at most 64 MiB
        u32 records                              records in the payload
        payload                                  opaque (the codec's encoded records)
        32 bytes                                 mac(b"chunk\\0", H, u32 i, length, records,
                                                     payload)
    trailer:
        u32 0xFFFFFFFF                           marks the trailer (never a chunk length)
        u32 chunks                               how many chunks came before
        u64 records                              total records, the sum over the chunks
        32 bytes                                 mac(b"trailer\\0", H, chunks, records)

Binding every chunk to ``H`` (which covers the header's random ``id``) and to its index, and
the trailer to the chunk count, means chunks cannot be reordered, dropped, repeated or taken
from another snapshot made with the same key. The per-chunk record count lets a reader bound
the decoding of each chunk. Nothing may follow the trailer. Version 1 files (CRC-32 and an
unkeyed SHA-256, which anyone can recompute) are refused and moved aside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import logging
import math
import os
import pwd
import re
import secrets
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Protocol, runtime_checkable

from handoff._codec import Codec
from handoff._errors import ConfigError, HandoffError, SnapshotCorrupt, SnapshotError

__all__ = (
    "DirectorySnapshotStore",
    "SnapshotClaim",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotWriter",
)

logger = logging.getLogger("handoff.snapshot")

MAGIC: Final = b"WARM-HANDOFF-SNAPSHOT\n"
FORMAT: Final = 2
MAX_HEADER: Final = 64 * 1024
MAX_CHUNK: Final = 64 * 1024 * 1024
TRAILER_MARKER: Final = 0xFFFFFFFF
TAG_SIZE: Final = 32
SUFFIX: Final = ".snapshot"
TEMP_SUFFIX: Final = ".tmp"
STALE_TEMP_SECONDS: Final = 3600.0
CORRUPT_DIR: Final = "corrupt"
REASON_SUFFIX: Final = ".reason.txt"
RESTORED_FILE: Final = "restored.ids"
MAX_RESTORED: Final = 4096
"""Ids of restored snapshots a directory store remembers (the newest by creation time)."""
_MAX_RESTORED_BYTES: Final = 4 * 1024 * 1024
_WATERMARK: Final = "forgotten-up-to"
# Lines are about 50 bytes: the record is rewritten with its newest MAX_RESTORED ids when
# it holds about twice as many.
_COMPACT_AT: Final = 2 * MAX_RESTORED * 50
ALREADY_RESTORED: Final = (
    "already restored (snapshot id {id}): a copy put back, or a file whose deletion failed; "
    "not applied again"
)
TOO_OLD: Final = (
    "made at or before the newest restored snapshot the store has forgotten: it may have "
    "been restored already; not applied"
)

_U32 = struct.Struct(">I")
_CHUNK = struct.Struct(">II")
_INDEX = struct.Struct(">I")
_COUNTS = struct.Struct(">IQ")
_TRAILER = struct.Struct(f">IIQ{TAG_SIZE}s")
_READ_BLOCK: Final = 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_HEADER_FIELDS: Final = {
    "id": str,
    "cluster": str,
    "namespace": str,
    "kind": str,
    "version": int,
    "node": str,
    "release": str,
}
# Opening a planted FIFO must not block, nor a planted link lead elsewhere.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
)

_codec = Codec(max_depth=4)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One complete snapshot waiting to be restored (as read from its header and trailer).

    ``records`` comes from the trailer and is verified by :meth:`SnapshotStore.read`.
    """

    path: Path
    cluster: str
    namespace: str
    kind: str
    version: int
    node: str
    release: str
    created_at: float
    records: int
    id: str = ""
    """The header's random id: the same for every copy of the file."""


@runtime_checkable
class SnapshotWriter(Protocol):
    """Writes one snapshot. Nothing is visible to :meth:`SnapshotStore.pending` before
    :meth:`commit`; :meth:`abort` (or leaving the ``with`` block without committing)
    discards it."""

    def write_chunk(self, payload: bytes, records: int) -> None:
        """Append one chunk of ``records`` encoded records."""
        ...

    def commit(self) -> SnapshotInfo:
        """Make the snapshot durable and visible, atomically."""
        ...

    def abort(self) -> None:
        """Discard the snapshot. Safe to call more than once, and after :meth:`commit`."""
        ...

    def __enter__(self) -> SnapshotWriter: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class SnapshotClaim(Protocol):
    """The exclusive right to restore one snapshot, from :meth:`SnapshotStore.claim`.

    While a claim is held no other claim on the same snapshot can be won, in this process
    or another one sharing the store. The holder reads the snapshot through the claim and
    ends it by :meth:`remove` (restored) or :meth:`quarantine` (unusable); leaving the
    ``with`` block releases it in any case, leaving the snapshot in place for the next
    claimant if it was neither removed nor moved aside.
    """

    @property
    def info(self) -> SnapshotInfo:
        """The claimed snapshot."""
        ...

    def read(self) -> Iterator[tuple[bytes, int]]:
        """Like :meth:`SnapshotStore.read`, of the claimed snapshot; may be walked again."""
        ...

    def remove(self) -> None:
        """Delete the restored snapshot, then release the claim."""
        ...

    def quarantine(self, reason: str) -> None:
        """Move the snapshot aside (see :meth:`SnapshotStore.quarantine`), then release."""
        ...

    def release(self) -> None:
        """Give the claim up. Safe to call more than once."""
        ...

    def __enter__(self) -> SnapshotClaim: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class SnapshotStore(Protocol):
    """Where snapshots are kept. Implementations must never expose a partial snapshot and
    must verify a snapshot completely before :meth:`read` yields anything of it.

    Several nodes may share a store; a snapshot is restored through a :meth:`claim`, so that
    exactly one of them applies it.
    """

    def begin(
        self,
        namespace: str,
        *,
        cluster: str,
        kind: str,
        version: int,
        node: str,
        release: str,
        created_at: float,
    ) -> SnapshotWriter:
        """Start writing a snapshot of ``namespace``; ``created_at`` is wall-clock time."""
        ...

    def pending(self, cluster: str) -> list[SnapshotInfo]:
        """Complete snapshots of ``cluster``, oldest first. Unusable ones are moved aside."""
        ...

    def claim(self, info: SnapshotInfo) -> SnapshotClaim | None:
        """Claim ``info`` for restoring, or ``None`` when another node holds it or it is
        already gone (restored or moved aside since it was listed).

        Raises :class:`~handoff._errors.SnapshotError` when it cannot be opened (and
        :class:`~handoff._errors.SnapshotCorrupt` when it is not a snapshot file at all).
        """
        ...

    def read(self, info: SnapshotInfo) -> Iterator[tuple[bytes, int]]:
        """Yield ``(payload, records)`` per chunk, only after verifying the whole snapshot.

        Raises :class:`~handoff._errors.SnapshotCorrupt` (before the first chunk) if it is
        damaged, truncated or foreign. Reading claims nothing: restore through
        :meth:`claim`.
        """
        ...

    def quarantine(self, info_or_path: SnapshotInfo | str | os.PathLike[str], reason: str) -> None:
        """Move a snapshot aside so that it is never offered again, keeping the reason."""
        ...

    def remove(self, info: SnapshotInfo) -> None:
        """Delete a restored snapshot."""
        ...


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def directory_problem(st: os.stat_result, path: Path) -> str | None:
    """Why a directory with status ``st`` may not hold this user's snapshots (with the
    command that fixes it), or ``None`` when it may.

    Whoever can write the directory can plant, replace or remove snapshots: so it must be
    this process's user's, and writable by nobody else.
    """
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory: point it at a directory"
    me = os.geteuid()
    if st.st_uid != me:
        return (
            f"{path} belongs to {_user(st.st_uid)}, not to this process's user "
            f"({_user(me)}), who would trust whatever that user puts there; run "
            f"`chown {me} {path}` or choose a directory of this user"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o020: "its group", 0o002: "others"}.get(mode & 0o022, "its group and others")
        return (
            f"{path} is writable by {who} (mode {mode:04o}), who could plant or replace "
            f"snapshots; run `chmod go-w {path}`"
        )
    return None


class _Mac:
    """HMAC-SHA256 of one part of a snapshot, fed as the part is written or read."""

    __slots__ = ("_mac",)

    def __init__(self, key: bytes, label: bytes, *parts: bytes) -> None:
        self._mac = hmac.new(key, label + b"\0", "sha256")
        for part in parts:
            self._mac.update(part)

    def update(self, data: bytes) -> None:
        self._mac.update(data)

    def digest(self) -> bytes:
        return self._mac.digest()

    def matches(self, tag: bytes) -> bool:
        return hmac.compare_digest(self._mac.digest(), tag)


class SnapshotEncoder:
    """The bytes of one snapshot in format 2, part by part, each authenticated under ``key``.

    Shared by every store: a snapshot is the same byte string in a file or in an object.
    """

    __slots__ = ("_key", "chunks", "head", "header_tag", "records")

    def __init__(self, key: bytes, header: dict[str, Any]) -> None:
        encoded = _codec.packb(header)
        if len(encoded) > MAX_HEADER:
            raise ValueError(f"snapshot header of {len(encoded)} bytes exceeds {MAX_HEADER}")
        start = MAGIC + _U32.pack(len(encoded)) + encoded
        self._key = key
        self.header_tag = _Mac(key, b"header", start).digest()
        self.head = start + self.header_tag
        """Magic, header and its tag: the first bytes of the snapshot."""
        self.chunks = 0
        self.records = 0

    def chunk(self, payload: bytes, records: int) -> tuple[bytes, bytes, bytes]:
        """The next chunk as (its head, ``payload``, its tag), to be written in that order."""
        if len(payload) > MAX_CHUNK:
            raise ValueError(f"snapshot chunk of {len(payload)} bytes exceeds {MAX_CHUNK}")
        if not 0 <= records <= 0xFFFFFFFF:
            raise ValueError(f"record count out of range: {records}")
        self.chunks += 1
        self.records += records
        head = _CHUNK.pack(len(payload), records)
        mac = _Mac(self._key, b"chunk", self.header_tag, _INDEX.pack(self.chunks), head)
        mac.update(payload)
        return head, payload, mac.digest()

    def trailer(self) -> bytes:
        """The trailer: the marker, the counts so far and their tag."""
        counts = _COUNTS.pack(self.chunks, self.records)
        tag = _Mac(self._key, b"trailer", self.header_tag, counts).digest()
        return _U32.pack(TRAILER_MARKER) + counts + tag


def new_header(
    namespace: str,
    *,
    cluster: str,
    kind: str,
    version: int,
    node: str,
    release: str,
    created_at: float,
) -> dict[str, Any]:
    """The header of a new snapshot (see the format above)."""
    return {
        "format": FORMAT,
        # Makes every header (and so every chunk's binding) unique, even for two
        # snapshots of one namespace made in the same instant.
        "id": secrets.token_hex(16),
        "cluster": cluster,
        "namespace": namespace,
        "kind": kind,
        "version": version,
        "node": node,
        "release": release,
        "created_at": float(created_at),
    }


def snapshot_name(namespace: str, created_at: float) -> str:
    """A fresh name for a snapshot of ``namespace``: sorts by time, never reused.

    Names are for humans and ordering only: the header is the truth.
    """
    millis = max(0, int(created_at * 1000))
    return f"{millis:015d}-{namespace_tag(namespace)}-{uuid.uuid4().hex[:12]}{SUFFIX}"


def namespace_tag(namespace: str) -> str:
    """``namespace`` as :func:`snapshot_name` writes it in a name (not always reversible)."""
    return _UNSAFE.sub("_", namespace)[:64] or "_"


def name_fields(name: str) -> tuple[float, str] | None:
    """``(created_at, namespace tag)`` as a name from :func:`snapshot_name` says, or None.

    For choosing what to look at only: the authenticated header is the truth.
    """
    if not name.endswith(SUFFIX):
        return None
    millis, _, rest = name[: -len(SUFFIX)].partition("-")
    tag, _, _ = rest.rpartition("-")
    if not millis.isdigit() or not tag:
        return None
    return int(millis) / 1000, tag


class _DirectoryWriter:
    """A snapshot being written to a temporary file of a :class:`DirectorySnapshotStore`."""

    def __init__(self, directory: Path, final: Path, header: dict[str, Any], key: bytes) -> None:
        self._directory = directory
        self._final = final
        self._header = header
        self._done = False
        fd, temp = _mkstemp(directory, final.name)
        self._temp = Path(temp)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        try:
            self._encoder = SnapshotEncoder(key, header)
            self._write(self._encoder.head)
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise SnapshotError(f"cannot write snapshot {self._temp}: {exc}") from exc

    def write_chunk(self, payload: bytes, records: int) -> None:
        """Append one chunk of ``records`` encoded records (at most 64 MiB)."""
        if self._done:
            raise SnapshotError(f"snapshot {self._final.name} is already finished")
        for part in self._encoder.chunk(payload, records):
            self._write(part)

    def commit(self) -> SnapshotInfo:
        """Write the trailer, fsync, and rename the file to its final name."""
        if self._done:
            raise SnapshotError(f"snapshot {self._final.name} is already finished")
        self._write(self._encoder.trailer())
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self._final)
        except OSError as exc:
            self.abort()
            raise SnapshotError(f"cannot commit snapshot {self._final}: {exc}") from exc
        self._done = True
        _fsync_dir(self._directory)
        records = self._encoder.records
        logger.debug("snapshot %s committed: %d records", self._final, records)
        return snapshot_info(self._final, self._header, records)

    def abort(self) -> None:
        """Discard the temporary file; a no-op once committed or aborted."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()

    def __enter__(self) -> _DirectoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def snapshot_info(path: Path, header: dict[str, Any], records: int) -> SnapshotInfo:
    """The :class:`SnapshotInfo` of a snapshot at ``path`` with an authenticated ``header``."""
    return SnapshotInfo(
        path=path,
        cluster=header["cluster"],
        namespace=header["namespace"],
        kind=header["kind"],
        version=header["version"],
        node=header["node"],
        release=header["release"],
        created_at=header["created_at"],
        records=records,
        id=header["id"],
    )


def _mkstemp(directory: Path, name: str) -> tuple[int, str]:
    path = directory / f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    try:
        fd = os.open(path, _CREATE_FLAGS, 0o600)
    except OSError as exc:
        raise SnapshotError(f"cannot create a snapshot in {directory}: {exc}") from exc
    return fd, str(path)


def _open_snapshot(path: Path) -> IO[bytes]:
    """Open a snapshot for reading: never through a symlink, only a regular file."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotCorrupt(str(path), "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Reader:
    """Reads one snapshot file with every length bounded and every part authenticated;
    raises SnapshotCorrupt."""

    def __init__(self, file: IO[bytes], name: str | Path, key: bytes) -> None:
        self.file = file
        self.name = str(name)
        self.key = key
        self.header_tag = b""

    def corrupt(self, reason: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(self.name, reason)

    def exact(self, size: int, what: str) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise self.corrupt(f"truncated in {what}")
        return data

    def header(self, cluster: str) -> dict[str, Any]:
        """Read and authenticate the header of a snapshot of ``cluster``."""
        magic = self.file.read(len(MAGIC))
        if magic != MAGIC:
            raise self.corrupt("empty file" if not magic else "not a snapshot (bad magic)")
        length_field = self.exact(_U32.size, "the header")
        (length,) = _U32.unpack(length_field)
        if length > MAX_HEADER:
            raise self.corrupt(f"header of {length} bytes exceeds {MAX_HEADER}")
        data = self.exact(length, "the header")
        try:
            header = _codec.unpackb(data)
        except HandoffError as exc:
            raise self.corrupt(f"unreadable header ({exc})") from None
        if not isinstance(header, dict):
            raise self.corrupt("unreadable header (not a map)")
        if header.get("format") == 1:
            raise self.corrupt(
                "format 1 (checksums anyone can recompute, no authentication): written by an "
                "older warm-handoff, or by hand; never restored. Delete it"
            )
        if header.get("format") != FORMAT:
            raise self.corrupt(f"unsupported format {header.get('format')!r}")
        if header.get("cluster") != cluster:
            # Said before authentication: another cluster's key cannot be checked anyway.
            raise self.corrupt(
                f"belongs to cluster {header.get('cluster')!r}, this node is in {cluster!r}"
            )
        tag = self.exact(TAG_SIZE, "the header")
        if not _Mac(self.key, b"header", magic, length_field, data).matches(tag):
            raise self.corrupt(
                "authentication failed in the header: made with another cookie, or by hand"
            )
        self.header_tag = tag
        for field, kind in _HEADER_FIELDS.items():
            if type(header.get(field)) is not kind:
                raise self.corrupt(f"unreadable header ({field!r} missing or not {kind.__name__})")
        created = header.get("created_at")
        if type(created) is not float and type(created) is not int:
            raise self.corrupt("unreadable header ('created_at' missing or not a number)")
        header["created_at"] = float(created)
        return header

    def trailer(self, first: bytes, chunks: int, total: int) -> None:
        rest = self.file.read(_TRAILER.size - _U32.size)
        if len(rest) != _TRAILER.size - _U32.size:
            raise self.corrupt(f"truncated in the trailer after {chunks} chunks")
        _, count, records, tag = _TRAILER.unpack(first + rest)
        counts = _COUNTS.pack(count, records)
        if not _Mac(self.key, b"trailer", self.header_tag, counts).matches(tag):
            raise self.corrupt("authentication failed in the trailer")
        if count != chunks:
            raise self.corrupt(f"trailer counts {count} chunks, the file holds {chunks}")
        if records != total:
            raise self.corrupt(f"trailer counts {records} records, the chunks hold {total}")
        if self.file.read(1):
            raise self.corrupt("data after the trailer")

    def chunks(self, *, keep: bool) -> Iterator[tuple[bytes, int]]:
        """Walk the chunks after the header, authenticating each; ends after a good trailer.

        With ``keep=False`` payloads are streamed in blocks and ``b""`` is yielded instead.
        """
        index = 0
        total = 0
        while True:
            first = self.file.read(_U32.size)
            if len(first) != _U32.size:
                raise self.corrupt(f"truncated after {index} of ? chunks (the trailer is missing)")
            (length,) = _U32.unpack(first)
            if length == TRAILER_MARKER:
                self.trailer(first, index, total)
                return
            index += 1
            rest = self.file.read(_CHUNK.size - _U32.size)
            if len(rest) != _CHUNK.size - _U32.size:
                raise self.corrupt(f"truncated after {index - 1} of ? chunks (in a chunk header)")
            if length > MAX_CHUNK:
                raise self.corrupt(f"chunk {index} claims {length} bytes, more than {MAX_CHUNK}")
            (records,) = _U32.unpack(rest)
            total += records
            mac = _Mac(self.key, b"chunk", self.header_tag, _INDEX.pack(index), first + rest)
            parts: list[bytes] = []
            remaining = length
            while remaining:
                block = self.file.read(min(remaining, _READ_BLOCK))
                if not block:
                    raise self.corrupt(
                        f"truncated after {index - 1} of ? chunks (inside chunk {index})"
                    )
                remaining -= len(block)
                mac.update(block)
                if keep:
                    parts.append(block)
            tag = self.file.read(TAG_SIZE)
            if len(tag) != TAG_SIZE:
                raise self.corrupt(
                    f"truncated after {index - 1} of ? chunks (in chunk {index}'s tag)"
                )
            if not mac.matches(tag):
                raise self.corrupt(
                    f"authentication failed in chunk {index}: damaged, reordered, taken from "
                    "another snapshot, or made with another cookie"
                )
            yield b"".join(parts), records


def inspect_file(
    file: IO[bytes], size: int, name: str | Path, key: bytes, cluster: str
) -> tuple[dict[str, Any], int]:
    """The authenticated header and the trailer's record count of the snapshot in ``file``
    (seekable, ``size`` bytes long), reading only its two ends when it is whole.

    Raises :class:`~handoff._errors.SnapshotCorrupt`; the chunks are checked by
    :func:`verified_chunks`.
    """
    reader = _Reader(file, name, key)
    header = reader.header(cluster)
    start = file.tell()
    if size >= start + _TRAILER.size:
        file.seek(size - _TRAILER.size)
        first = file.read(_U32.size)
        if _U32.unpack(first) == (TRAILER_MARKER,):
            # Authenticates the counts; verified_chunks() checks the chunks against them.
            _, chunks, records, _ = _TRAILER.unpack(first + file.read())
            file.seek(size - _TRAILER.size + _U32.size)
            reader.trailer(first, chunks, records)
            return header, records
    # Already broken: walk it to say where (bounded memory, like any check).
    file.seek(start)
    for _ in reader.chunks(keep=False):
        pass
    raise reader.corrupt("no trailer at the end (truncated or damaged)")


def read_header(file: IO[bytes], name: str | Path, key: bytes, cluster: str) -> dict[str, Any]:
    """The authenticated header of the snapshot ``file`` (at its start) of ``cluster``.

    Raises :class:`~handoff._errors.SnapshotCorrupt`.
    """
    return _Reader(file, name, key).header(cluster)


def verified_chunks(file: IO[bytes], info: SnapshotInfo, key: bytes) -> Iterator[tuple[bytes, int]]:
    """Yield ``(payload, records)`` per chunk of the snapshot in ``file`` (seekable), only
    after a whole verification pass from its start: every tag, the counts, the trailer, and
    the header against ``info``. The yielding pass authenticates every chunk again.

    Raises :class:`~handoff._errors.SnapshotCorrupt` before the first chunk when anything
    is wrong; ``OSError`` of ``file`` passes through.
    """
    file.seek(0)
    total = sum(records for _, records in _open_reader(file, info, key).chunks(keep=False))
    if total != info.records:
        raise SnapshotCorrupt(str(info.path), f"holds {total} records, {info.records} when listed")
    file.seek(0)
    yield from _open_reader(file, info, key).chunks(keep=True)


def _open_reader(file: IO[bytes], info: SnapshotInfo, key: bytes) -> _Reader:
    reader = _Reader(file, info.path, key)
    header = reader.header(info.cluster)
    for field in ("namespace", "kind", "version", "node", "release", "created_at"):
        if header[field] != getattr(info, field):
            raise reader.corrupt(f"header {field} changed since the snapshot was listed")
    return reader


class DirectorySnapshotStore:
    """Snapshots as files in a local directory (put it on a volume to survive restarts).

    The directory is created (mode 0o700) if missing; an existing one must belong to this
    process's user and be writable by nobody else, or the store refuses it with a
    :class:`~handoff._errors.ConfigError` that says what to run. ``key`` authenticates the
    files (32 bytes; a node passes ``cluster_key(cookie, cluster).derive("snapshot")``), so
    only nodes with the cluster's cookie can make a snapshot this store restores. ``clock``
    is wall-clock time, used to age temporary files; tests inject their own.

    Several processes may share the directory: a snapshot is restored only through a
    :meth:`claim` (an exclusive ``flock`` held from the first read until the file is
    removed or moved to ``corrupt/``), so exactly one of them applies it; the kernel drops
    the claim of a process that dies, and the next one to start restores the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 32:
            raise ValueError("a snapshot key needs at least 32 bytes")
        self.path = Path(path)
        self._key = key
        self._clock = clock
        # Ids this object restored (their creation times): kept even when the directory
        # cannot record them (read-only), so that this process never applies one twice.
        self._applied: dict[str, float] = {}
        where = f"HANDOFF_SNAPSHOT_DIR ({self.path})"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{where} exists and is not a directory: point it at a directory")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Followed on purpose: the setting may name a link to a volume; the directory
            # it leads to is what must be private.
            st = os.stat(self.path)
        except OSError as exc:
            raise ConfigError(
                f"{where} cannot be created: {exc.strerror or exc}; create it or choose "
                f"another path"
            ) from None
        problem = directory_problem(st, self.path)
        if problem is not None:
            raise ConfigError(f"HANDOFF_SNAPSHOT_DIR: {problem}")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{where} is not writable by this process: fix its permissions or choose "
                f"another path"
            )

    def __repr__(self) -> str:
        return f"DirectorySnapshotStore({str(self.path)!r})"

    # -- writing ----------------------------------------------------------------------------

    def begin(
        self,
        namespace: str,
        *,
        cluster: str,
        kind: str,
        version: int,
        node: str,
        release: str,
        created_at: float,
    ) -> SnapshotWriter:
        """Start a snapshot; see :class:`SnapshotWriter`."""
        header = new_header(
            namespace,
            cluster=cluster,
            kind=kind,
            version=version,
            node=node,
            release=release,
            created_at=created_at,
        )
        final = self.path / snapshot_name(namespace, created_at)
        return _DirectoryWriter(self.path, final, header, self._key)

    # -- finding ----------------------------------------------------------------------------

    def pending(self, cluster: str) -> list[SnapshotInfo]:
        """Complete snapshots of ``cluster``, oldest first.

        Removes temporary files older than an hour (left by a crash) and moves unreadable,
        unauthenticated or foreign snapshots to ``corrupt/``, logging each.
        """
        found: list[SnapshotInfo] = []
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            raise SnapshotError(f"cannot list snapshots in {self.path}: {exc}") from exc
        now = self._clock()
        restored, forgotten_up_to = self._restored()
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                self._clean_temp(entry, now)
                continue
            if not entry.name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
                continue
            path = Path(entry.path)
            try:
                info = self._inspect(path, cluster)
            except SnapshotCorrupt as exc:
                logger.warning("snapshot %s moved aside: %s", path, exc.reason)
                self.quarantine(path, exc.reason)
                continue
            except FileNotFoundError:
                # Restored or moved aside by another node sharing the directory since it
                # was listed: expected with several workers, not worth a warning.
                logger.debug("snapshot %s gone since it was listed", path)
                continue
            except OSError as exc:
                logger.warning("snapshot %s skipped: %s", path, exc)
                continue
            if info.id in restored or info.created_at <= forgotten_up_to:
                why = ALREADY_RESTORED.format(id=info.id) if info.id in restored else TOO_OLD
                logger.warning("snapshot %s moved aside: %s", path, why)
                self.quarantine(path, why)
                continue
            found.append(info)
        found.sort(key=lambda i: (i.created_at, i.path.name))
        return found

    # -- the record of restored snapshots ----------------------------------------------------

    def _restored(self) -> tuple[dict[str, float], float]:
        """The ids of restored snapshots (with their creation times), this store object's
        and the record's, and the creation time up to which the record forgot."""
        ids = dict(self._applied)
        forgotten_up_to = -math.inf
        try:
            fd = os.open(self.path / RESTORED_FILE, _OPEN_FLAGS)
        except FileNotFoundError:
            return ids, forgotten_up_to
        except OSError as exc:
            logger.warning("cannot read %s: %s", self.path / RESTORED_FILE, exc)
            return ids, forgotten_up_to
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_RESTORED_BYTES:
                logger.warning(
                    "%s is not a record of restored snapshots (not a regular file, or over "
                    "%d bytes): ignored",
                    self.path / RESTORED_FILE,
                    _MAX_RESTORED_BYTES,
                )
                return ids, forgotten_up_to
            os.set_blocking(fd, True)
            with os.fdopen(fd, "rb", closefd=False) as file:
                text = file.read(_MAX_RESTORED_BYTES).decode("ascii", "replace")
        except OSError as exc:
            logger.warning("cannot read %s: %s", self.path / RESTORED_FILE, exc)
            return ids, forgotten_up_to
        finally:
            os.close(fd)
        record, forgotten_up_to = _parse_restored(text)
        record.update(ids)
        return record, forgotten_up_to

    def _record_restored(self, info: SnapshotInfo) -> None:
        """Remember ``info`` as restored: in memory (always), and in the record file (a
        failure is logged: this store object still never applies it again)."""
        if not info.id:
            return
        self._applied[info.id] = info.created_at
        if len(self._applied) > MAX_RESTORED:
            del self._applied[min(self._applied, key=self._applied.__getitem__)]
        path = self.path / RESTORED_FILE
        line = f"{info.id} {info.created_at!r}\n".encode("ascii")
        problem = "compacted by other processes again and again"
        try:
            for _ in range(8):
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        problem = "not a regular file"
                        break
                    if not _still_named(path, st):
                        continue  # compacted meanwhile: append to the new file
                    os.write(fd, line)
                    os.fsync(fd)
                    if st.st_size + len(line) > _COMPACT_AT:
                        self._compact(fd)
                    return
                finally:
                    os.close(fd)
        except OSError as exc:
            problem = str(exc)
        logger.warning(
            "snapshot %s restored, but not recorded in %s (%s): a copy put back later would "
            "be restored again by another process",
            info.path,
            path,
            problem,
        )

    def _compact(self, fd: int) -> None:
        """Rewrite the record with its :data:`MAX_RESTORED` newest ids (the lock held)."""
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as file:
            text = file.read(_MAX_RESTORED_BYTES).decode("ascii", "replace")
        record, forgotten_up_to = _parse_restored(text)
        newest = sorted(record.items(), key=lambda item: item[1], reverse=True)
        kept, dropped = newest[:MAX_RESTORED], newest[MAX_RESTORED:]
        if dropped:
            forgotten_up_to = max(forgotten_up_to, dropped[0][1])
        lines = [f"{_WATERMARK} {forgotten_up_to!r}\n"] if forgotten_up_to > -math.inf else []
        lines += [f"{ident} {created!r}\n" for ident, created in reversed(kept)]
        temp, name = _mkstemp(self.path, RESTORED_FILE)
        try:
            with os.fdopen(temp, "w", encoding="ascii") as out:
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self.path / RESTORED_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        _fsync_dir(self.path)

    def _clean_temp(self, entry: os.DirEntry[str], now: float) -> None:
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if age > STALE_TEMP_SECONDS:
                os.unlink(entry.path)
                logger.info("removed stale temporary snapshot %s (%.0f s old)", entry.path, age)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove stale temporary snapshot %s: %s", entry.path, exc)

    def _inspect(self, path: Path, cluster: str) -> SnapshotInfo:
        with _open_snapshot(path) as file:
            size = os.fstat(file.fileno()).st_size
            header, records = inspect_file(file, size, path, self._key, cluster)
            return snapshot_info(path, header, records)

    # -- claiming ---------------------------------------------------------------------------

    def claim(self, info: SnapshotInfo) -> SnapshotClaim | None:
        """Claim ``info`` for restoring; ``None`` when another process holds it or it is gone.

        The claim is an exclusive, non-blocking ``flock`` on the snapshot's own descriptor
        (opened without following links), held until the claim ends. ``flock`` and not
        ``fcntl``/``lockf`` locks: those belong to the process, so two stores of one process
        would not exclude each other, and closing any descriptor of the file would drop
        them. The kernel drops the lock with its process, so a restorer killed with
        ``SIGKILL`` leaves the snapshot to the next one. A file unlinked or renamed between
        listing and locking (restored or moved aside by the previous holder) is not
        claimed. Raises :class:`~handoff._errors.SnapshotCorrupt` for what is not a regular
        file (a link planted since listing) and :class:`~handoff._errors.SnapshotError` when
        the file cannot be opened or locked (it is then left in place).
        """
        try:
            file = _open_snapshot(info.path)
        except FileNotFoundError:
            logger.info("snapshot %s already restored or moved aside by another process", info.path)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SnapshotCorrupt(str(info.path), f"unreadable ({exc})") from exc
            raise SnapshotError(f"cannot open snapshot {info.path}: {exc}") from exc
        try:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("snapshot %s is being restored by another process: skipped", info.path)
                file.close()
                return None
            except OSError as exc:
                # Restoring without the lock could apply the records twice: leave it.
                raise SnapshotError(
                    f"cannot lock snapshot {info.path} ({exc}): the snapshot directory must "
                    "support flock; left in place"
                ) from exc
            st = os.fstat(file.fileno())
            if st.st_nlink == 0 or not _still_named(info.path, st):
                # The previous holder finished with it between our open and our lock.
                logger.info(
                    "snapshot %s already restored or moved aside by another process", info.path
                )
                file.close()
                return None
        except BaseException:
            file.close()
            raise
        return _DirectoryClaim(self, info, file, st)

    # -- reading ----------------------------------------------------------------------------

    def verify(self, info: SnapshotInfo) -> int:
        """Check a whole snapshot without keeping it in memory; return its record count.

        Raises :class:`~handoff._errors.SnapshotCorrupt` with the reason.
        """
        try:
            with _open_snapshot(info.path) as file:
                reader = _open_reader(file, info, self._key)
                return sum(records for _, records in reader.chunks(keep=False))
        except OSError as exc:
            raise SnapshotCorrupt(str(info.path), f"unreadable ({exc})") from exc

    def read(self, info: SnapshotInfo) -> Iterator[tuple[bytes, int]]:
        """Yield ``(payload, records)`` per chunk after a full verification pass.

        Nothing is yielded unless every chunk's tag, the counts and the trailer check out,
        so nothing of a truncated, forged or corrupt file is ever yielded. The chunks are
        then read again from the same open file and authenticated again.
        """
        try:
            with _open_snapshot(info.path) as file:
                yield from self._read_open(file, info)
        except OSError as exc:
            raise SnapshotCorrupt(str(info.path), f"unreadable ({exc})") from exc

    def _read_open(self, file: IO[bytes], info: SnapshotInfo) -> Iterator[tuple[bytes, int]]:
        try:
            yield from verified_chunks(file, info, self._key)
        except OSError as exc:
            raise SnapshotCorrupt(str(info.path), f"unreadable ({exc})") from exc

    # -- disposal ---------------------------------------------------------------------------

    def quarantine(self, info_or_path: SnapshotInfo | str | os.PathLike[str], reason: str) -> None:
        """Move a snapshot to ``corrupt/`` with a ``.reason.txt`` beside it.

        Never raises: a snapshot that cannot be moved is logged (and will be met again).
        ``corrupt/`` must be a real directory of this user, private like the store; nothing
        is written through a link planted there.
        """
        path = info_or_path.path if isinstance(info_or_path, SnapshotInfo) else Path(info_or_path)
        target_dir = self.path / CORRUPT_DIR
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(target_dir, 0o700)
            fd = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            logger.warning(
                "cannot move snapshot %s aside (%s): %s is unusable: %s",
                path,
                reason,
                target_dir,
                exc.strerror or exc,
            )
            return
        try:
            problem = directory_problem(os.fstat(fd), target_dir)
            if problem is not None:
                logger.warning("snapshot %s not moved aside (%s): %s", path, reason, problem)
                return
            # Within directories this store checked; a rename replaces a link at the
            # destination, never writes through it.
            os.replace(path, path.name, dst_dir_fd=fd)
            _write_beside(fd, path.name + REASON_SUFFIX, reason + "\n")
        except FileNotFoundError:
            logger.debug("snapshot %s already gone, not moved aside", path)
        except OSError as exc:
            logger.warning("cannot move snapshot %s aside (%s): %s", path, reason, exc)
        else:
            logger.info("snapshot %s moved to %s: %s", path.name, target_dir, reason)
        finally:
            os.close(fd)

    def remove(self, info: SnapshotInfo) -> None:
        """Delete a restored snapshot (a snapshot already gone is not an error)."""
        try:
            info.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SnapshotError(f"cannot remove restored snapshot {info.path}: {exc}") from exc


def _parse_restored(text: str) -> tuple[dict[str, float], float]:
    """The record's ids with their creation times, and its watermark (malformed lines,
    a torn last one included, are skipped)."""
    ids: dict[str, float] = {}
    forgotten_up_to = -math.inf
    for line in text.splitlines():
        ident, _, created = line.partition(" ")
        try:
            when = float(created)
        except ValueError:
            continue
        if not math.isfinite(when) or not ident:
            continue
        if ident == _WATERMARK:
            forgotten_up_to = max(forgotten_up_to, when)
        else:
            ids[ident] = when
    return ids, forgotten_up_to


def _still_named(path: Path, st: os.stat_result) -> bool:
    """Whether ``path`` still names the file whose status is ``st`` (without following links)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


class _DirectoryClaim:
    """A won claim of a :class:`DirectorySnapshotStore`: the snapshot's file, open and locked.

    Everything the holder does to the snapshot goes through this one descriptor, so what is
    verified is what is applied, and the lock is held until the file is gone.
    """

    def __init__(
        self, store: DirectorySnapshotStore, info: SnapshotInfo, file: IO[bytes], st: os.stat_result
    ) -> None:
        self._store = store
        self._info = info
        self._file: IO[bytes] | None = file
        self._st = st

    @property
    def info(self) -> SnapshotInfo:
        """The claimed snapshot."""
        return self._info

    def read(self) -> Iterator[tuple[bytes, int]]:
        """Verify, then yield ``(payload, records)`` per chunk, from the locked descriptor."""
        if self._file is None:
            raise SnapshotError(f"the claim on snapshot {self._info.path} was released")
        yield from self._store._read_open(self._file, self._info)

    def remove(self) -> None:
        """Delete the restored snapshot, then release the claim."""
        try:
            if self._file is None:
                raise SnapshotError(f"the claim on snapshot {self._info.path} was released")
            # Recorded first: if the deletion fails, or the file comes back, it is never
            # applied again (pending() moves it aside).
            self._store._record_restored(self._info)
            # Only a holder removes or moves a claimed file, so the name is still ours unless
            # someone outside the protocol touched it: never delete what we did not restore.
            if _still_named(self._info.path, self._st):
                self._store.remove(self._info)
            else:
                logger.warning("snapshot %s was replaced while restoring: left", self._info.path)
        finally:
            self.release()

    def quarantine(self, reason: str) -> None:
        """Move the snapshot to ``corrupt/`` with ``reason``, then release the claim."""
        try:
            if self._file is not None and _still_named(self._info.path, self._st):
                self._store.quarantine(self._info, reason)
        finally:
            self.release()

    def release(self) -> None:
        """Unlock and close; safe to call more than once."""
        file, self._file = self._file, None
        if file is None:
            return
        # Explicit: a forked child sharing the descriptor must not keep the claim alive.
        with contextlib.suppress(OSError):
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        file.close()

    def __enter__(self) -> _DirectoryClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _write_beside(dir_fd: int, name: str, text: str) -> None:
    """Write ``name`` in the directory ``dir_fd`` through a fresh file and a rename."""
    temp = f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(temp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
