"""Snapshot stores: where state goes when no peer can take it, and where a node finds it.

A draining node that runs out of successors or time writes what is left of a namespace to a
snapshot; the next node to start with the same store (a volume that survives the restart)
restores it. :class:`SnapshotStore` is the interface; :class:`DirectorySnapshotStore`
keeps one file per snapshot in a local directory (``HANDOFF_SNAPSHOT_DIR``).

Guarantees of the directory store:

* A snapshot is visible only once complete: it is written to a temporary file in the same
  directory, flushed and fsynced, renamed over its final name, and the directory is
  fsynced. A crash mid-write leaves a temporary file, never a partial snapshot; stale
  temporary files are removed after an hour.
* Nothing of a damaged snapshot is applied: :meth:`DirectorySnapshotStore.read` verifies
  every chunk checksum, the record count and the digest of the whole file before it yields
  the first chunk. Verification streams the file, so memory stays bounded.
* Unusable files (corrupt, foreign cluster, not a snapshot) are moved to ``corrupt/`` with a
  ``.reason.txt`` beside them, so that they can be inspected and are not retried forever.

File format, version 1 (all integers big-endian)::

    b"WARM-HANDOFF-SNAPSHOT\\n"                   magic, 22 bytes
    u32 length, msgpack map                      header, at most 64 KiB:
        {"format": 1, "cluster": str, "namespace": str, "kind": str, "version": int,
         "node": str, "release": str, "created_at": float (Unix time)}
    chunk*                                       each:
        u32 length                               payload bytes, at most 64 MiB
        u32 records                              records in the payload
        u32 crc32                                CRC-32 of the records field and payload
        payload                                  opaque (the codec's encoded records)
    trailer:
        u32 0xFFFFFFFF                           marks the trailer (never a chunk length)
        u64 records                              total records, the sum over the chunks
        32 bytes                                 SHA-256 of every byte before the trailer

The per-chunk record count lets a reader bound the decoding of each chunk; the CRC of each
chunk pinpoints damage, the trailer's digest covers everything (header included) and its
presence proves the file is complete. Nothing may follow the trailer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Protocol, runtime_checkable

from handoff._codec import Codec
from handoff._errors import ConfigError, HandoffError, SnapshotCorrupt, SnapshotError

__all__ = (
    "DirectorySnapshotStore",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotWriter",
)

logger = logging.getLogger("handoff.snapshot")

MAGIC: Final = b"WARM-HANDOFF-SNAPSHOT\n"
FORMAT: Final = 1
MAX_HEADER: Final = 64 * 1024
MAX_CHUNK: Final = 64 * 1024 * 1024
TRAILER_MARKER: Final = 0xFFFFFFFF
SUFFIX: Final = ".snapshot"
TEMP_SUFFIX: Final = ".tmp"
STALE_TEMP_SECONDS: Final = 3600.0
CORRUPT_DIR: Final = "corrupt"

_U32 = struct.Struct(">I")
_CHUNK = struct.Struct(">III")
_TRAILER = struct.Struct(">IQ32s")
_READ_BLOCK: Final = 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_HEADER_FIELDS: Final = {
    "cluster": str,
    "namespace": str,
    "kind": str,
    "version": int,
    "node": str,
    "release": str,
}

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
class SnapshotStore(Protocol):
    """Where snapshots are kept. Implementations must never expose a partial snapshot and
    must verify a snapshot completely before :meth:`read` yields anything of it."""

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

    def read(self, info: SnapshotInfo) -> Iterator[tuple[bytes, int]]:
        """Yield ``(payload, records)`` per chunk, only after verifying the whole snapshot.

        Raises :class:`~handoff._errors.SnapshotCorrupt` (before the first chunk) if it is
        damaged, truncated or foreign.
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


class _DirectoryWriter:
    """A snapshot being written to a temporary file of a :class:`DirectorySnapshotStore`."""

    def __init__(self, directory: Path, final: Path, header: dict[str, Any]) -> None:
        self._directory = directory
        self._final = final
        self._header = header
        self._records = 0
        self._done = False
        self._hash = hashlib.sha256()
        fd, temp = _mkstemp(directory, final.name)
        self._temp = Path(temp)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        try:
            encoded = _codec.packb(header)
            if len(encoded) > MAX_HEADER:
                raise ValueError(f"snapshot header of {len(encoded)} bytes exceeds {MAX_HEADER}")
            self._write(MAGIC + _U32.pack(len(encoded)) + encoded)
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise SnapshotError(f"cannot write snapshot {self._temp}: {exc}") from exc
        self._hash.update(data)

    def write_chunk(self, payload: bytes, records: int) -> None:
        """Append one chunk of ``records`` encoded records (at most 64 MiB)."""
        if self._done:
            raise SnapshotError(f"snapshot {self._final.name} is already finished")
        if len(payload) > MAX_CHUNK:
            raise ValueError(f"snapshot chunk of {len(payload)} bytes exceeds {MAX_CHUNK}")
        if not 0 <= records <= 0xFFFFFFFF:
            raise ValueError(f"record count out of range: {records}")
        count = _U32.pack(records)
        crc = zlib.crc32(payload, zlib.crc32(count))
        self._write(_CHUNK.pack(len(payload), records, crc))
        self._write(payload)
        self._records += records

    def commit(self) -> SnapshotInfo:
        """Write the trailer, fsync, and rename the file to its final name."""
        if self._done:
            raise SnapshotError(f"snapshot {self._final.name} is already finished")
        digest = self._hash.digest()
        self._write(_TRAILER.pack(TRAILER_MARKER, self._records, digest))
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
        h = self._header
        logger.debug("snapshot %s committed: %d records", self._final, self._records)
        return SnapshotInfo(
            path=self._final,
            cluster=h["cluster"],
            namespace=h["namespace"],
            kind=h["kind"],
            version=h["version"],
            node=h["node"],
            release=h["release"],
            created_at=h["created_at"],
            records=self._records,
        )

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


def _mkstemp(directory: Path, name: str) -> tuple[int, str]:
    path = directory / f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SnapshotError(f"cannot create a snapshot in {directory}: {exc}") from exc
    return fd, str(path)


class _Reader:
    """Reads one snapshot file with every length bounded; raises SnapshotCorrupt."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        self.file = file
        self.path = path
        self.hash = hashlib.sha256()

    def corrupt(self, reason: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(str(self.path), reason)

    def exact(self, size: int, what: str) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise self.corrupt(f"truncated in {what}")
        self.hash.update(data)
        return data

    def header(self) -> dict[str, Any]:
        magic = self.file.read(len(MAGIC))
        if magic != MAGIC:
            raise self.corrupt("empty file" if not magic else "not a snapshot (bad magic)")
        self.hash.update(magic)
        (length,) = _U32.unpack(self.exact(_U32.size, "the header"))
        if length > MAX_HEADER:
            raise self.corrupt(f"header of {length} bytes exceeds {MAX_HEADER}")
        data = self.exact(length, "the header")
        try:
            header = _codec.unpackb(data)
        except HandoffError as exc:
            raise self.corrupt(f"unreadable header ({exc})") from None
        if not isinstance(header, dict):
            raise self.corrupt("unreadable header (not a map)")
        if header.get("format") != FORMAT:
            raise self.corrupt(f"unsupported format {header.get('format')!r}")
        for field, kind in _HEADER_FIELDS.items():
            if type(header.get(field)) is not kind:
                raise self.corrupt(f"unreadable header ({field!r} missing or not {kind.__name__})")
        created = header.get("created_at")
        if type(created) is not float and type(created) is not int:
            raise self.corrupt("unreadable header ('created_at' missing or not a number)")
        header["created_at"] = float(created)
        return header

    def chunks(self, *, keep: bool) -> Iterator[tuple[bytes, int]]:
        """Walk the chunks after the header, checking each CRC; ends after a good trailer.

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
                digest = self.hash.digest()
                rest = self.file.read(_TRAILER.size - _U32.size)
                if len(rest) != _TRAILER.size - _U32.size:
                    raise self.corrupt(f"truncated in the trailer after {index} chunks")
                _, records, expected = _TRAILER.unpack(first + rest)
                if expected != digest:
                    raise self.corrupt("trailer digest mismatch")
                if records != total:
                    raise self.corrupt(f"trailer counts {records} records, the chunks hold {total}")
                if self.file.read(1):
                    raise self.corrupt("data after the trailer")
                return
            self.hash.update(first)
            index += 1
            rest = self.file.read(_CHUNK.size - _U32.size)
            if len(rest) != _CHUNK.size - _U32.size:
                raise self.corrupt(f"truncated after {index - 1} of ? chunks (in a chunk header)")
            self.hash.update(rest)
            if length > MAX_CHUNK:
                raise self.corrupt(f"chunk {index} claims {length} bytes, more than {MAX_CHUNK}")
            records, crc = struct.unpack(">II", rest)
            total += records
            running = zlib.crc32(_U32.pack(records))
            parts: list[bytes] = []
            remaining = length
            while remaining:
                block = self.file.read(min(remaining, _READ_BLOCK))
                if not block:
                    raise self.corrupt(
                        f"truncated after {index - 1} of ? chunks (inside chunk {index})"
                    )
                remaining -= len(block)
                running = zlib.crc32(block, running)
                self.hash.update(block)
                if keep:
                    parts.append(block)
            if running != crc:
                raise self.corrupt(f"checksum mismatch in chunk {index}")
            yield (b"".join(parts) if keep else b""), records


class DirectorySnapshotStore:
    """Snapshots as files in a local directory (put it on a volume to survive restarts).

    The directory is created (mode 0o700) if missing. ``clock`` is wall-clock time, used to
    age temporary files; tests inject their own.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        where = f"HANDOFF_SNAPSHOT_DIR ({self.path})"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{where} exists and is not a directory: point it at a directory")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{where} cannot be created: {exc.strerror or exc}; create it or choose "
                f"another path"
            ) from None
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
        header: dict[str, Any] = {
            "format": FORMAT,
            "cluster": cluster,
            "namespace": namespace,
            "kind": kind,
            "version": version,
            "node": node,
            "release": release,
            "created_at": float(created_at),
        }
        # Names are for humans and ordering only: the header is the truth.
        millis = max(0, int(created_at * 1000))
        safe = _UNSAFE.sub("_", namespace)[:64] or "_"
        final = self.path / f"{millis:015d}-{safe}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        return _DirectoryWriter(self.path, final, header)

    # -- finding ----------------------------------------------------------------------------

    def pending(self, cluster: str) -> list[SnapshotInfo]:
        """Complete snapshots of ``cluster``, oldest first.

        Removes temporary files older than an hour (left by a crash) and moves unreadable or
        foreign snapshots to ``corrupt/``, logging each.
        """
        found: list[SnapshotInfo] = []
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            raise SnapshotError(f"cannot list snapshots in {self.path}: {exc}") from exc
        now = self._clock()
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
            except OSError as exc:
                logger.warning("snapshot %s skipped: %s", path, exc)
                continue
            found.append(info)
        found.sort(key=lambda i: (i.created_at, i.path.name))
        return found

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
        with open(path, "rb") as file:
            reader = _Reader(file, path)
            header = reader.header()
            if header["cluster"] != cluster:
                raise reader.corrupt(
                    f"belongs to cluster {header['cluster']!r}, this node is in {cluster!r}"
                )
            # The record count comes from the trailer; read() verifies it with the rest.
            start = file.tell()
            size = os.fstat(file.fileno()).st_size
            marker = records = 0
            if size >= start + _TRAILER.size:
                file.seek(size - _TRAILER.size)
                marker, records, _ = _TRAILER.unpack(file.read(_TRAILER.size))
            if marker != TRAILER_MARKER:
                # Already broken: walk it to say where (bounded memory, like any check).
                file.seek(start)
                for _ in reader.chunks(keep=False):
                    pass
                raise reader.corrupt("no trailer at the end (truncated or damaged)")
        return SnapshotInfo(
            path=path,
            cluster=cluster,
            namespace=header["namespace"],
            kind=header["kind"],
            version=header["version"],
            node=header["node"],
            release=header["release"],
            created_at=header["created_at"],
            records=records,
        )

    # -- reading ----------------------------------------------------------------------------

    def verify(self, info: SnapshotInfo) -> int:
        """Check a whole snapshot without keeping it in memory; return its record count.

        Raises :class:`~handoff._errors.SnapshotCorrupt` with the reason.
        """
        try:
            with open(info.path, "rb") as file:
                reader = self._open(file, info)
                return sum(records for _, records in reader.chunks(keep=False))
        except OSError as exc:
            raise SnapshotCorrupt(str(info.path), f"unreadable ({exc})") from exc

    def read(self, info: SnapshotInfo) -> Iterator[tuple[bytes, int]]:
        """Yield ``(payload, records)`` per chunk after a full verification pass.

        Nothing is yielded unless every checksum, the record count and the digest check
        out, so nothing of a truncated or corrupt file is ever applied. The chunks are then
        read again from the same open file and their checksums checked again.
        """
        try:
            with open(info.path, "rb") as file:
                total = sum(records for _, records in self._open(file, info).chunks(keep=False))
                if total != info.records:
                    raise SnapshotCorrupt(
                        str(info.path), f"holds {total} records, {info.records} when listed"
                    )
                file.seek(0)
                reader = self._open(file, info)
                yield from reader.chunks(keep=True)
        except OSError as exc:
            raise SnapshotCorrupt(str(info.path), f"unreadable ({exc})") from exc

    def _open(self, file: IO[bytes], info: SnapshotInfo) -> _Reader:
        reader = _Reader(file, info.path)
        header = reader.header()
        if header["cluster"] != info.cluster:
            raise reader.corrupt(
                f"belongs to cluster {header['cluster']!r}, this node is in {info.cluster!r}"
            )
        for field in ("namespace", "kind", "version", "node", "release", "created_at"):
            if header[field] != getattr(info, field):
                raise reader.corrupt(f"header {field} changed since the snapshot was listed")
        return reader

    # -- disposal ---------------------------------------------------------------------------

    def quarantine(self, info_or_path: SnapshotInfo | str | os.PathLike[str], reason: str) -> None:
        """Move a snapshot to ``corrupt/`` with a ``.reason.txt`` beside it.

        Never raises: a snapshot that cannot be moved is logged (and will be met again).
        """
        path = info_or_path.path if isinstance(info_or_path, SnapshotInfo) else Path(info_or_path)
        target_dir = self.path / CORRUPT_DIR
        try:
            target_dir.mkdir(mode=0o700, exist_ok=True)
            target = target_dir / path.name
            os.replace(path, target)
            Path(f"{target}.reason.txt").write_text(reason + "\n", encoding="utf-8")
        except FileNotFoundError:
            logger.debug("snapshot %s already gone, not moved aside", path)
        except OSError as exc:
            logger.warning("cannot move snapshot %s aside (%s): %s", path, reason, exc)
        else:
            logger.info("snapshot %s moved to %s: %s", path.name, target_dir, reason)

    def remove(self, info: SnapshotInfo) -> None:
        """Delete a restored snapshot (a snapshot already gone is not an error)."""
        try:
            info.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SnapshotError(f"cannot remove restored snapshot {info.path}: {exc}") from exc
