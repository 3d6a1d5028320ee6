"""Snapshots on S3-compatible object storage: ``HANDOFF_SNAPSHOT_URL=s3://BUCKET/PREFIX``.

For platforms whose machines have no volume that survives a deploy (Fly.io rolling deploys
without volumes, Kubernetes without persistent volumes): a node draining with no successor
writes what is left to the bucket, the next node to start restores it. The optional extra
``warm-handoff[s3]`` installs the client (``obstore``); credentials and the endpoint come
from the usual variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION``),
which Fly's Tigris storage sets; ``s3:///PREFIX`` (no bucket) takes the bucket from
``BUCKET_NAME``.

The same guarantees as :class:`~handoff.snapshot.DirectorySnapshotStore`, kept with what an
object store offers:

* The same bytes: a snapshot object is the directory store's file, format 2, every part
  authenticated with HMAC-SHA256 under ``cluster_key(cookie, cluster).derive("snapshot")``
  (the same code writes and checks both). Whoever can write the bucket can delete
  snapshots, but cannot make one this cluster restores without the cookie.
* Visible only once complete: a snapshot is one object under a fresh name. Up to 8 MiB it
  is one PUT at commit; beyond, a multipart upload of 8 MiB parts (memory stays bounded:
  the chunk being written and about three parts) that becomes visible, at once and whole, when it is
  completed at commit. A crash or an abort before that leaves nothing to list (an
  abandoned multipart upload is invisible; a bucket lifecycle rule for incomplete uploads
  frees its space).
* Nothing of a damaged snapshot is applied: a claimed snapshot is read once, streamed
  into a local spooled temporary file (memory up to 8 MiB, the rest on local disk), and
  verified from there completely (every chunk's tag, the counts and the trailer) before
  its first chunk is yielded; the chunks applied are read from that same local copy, so
  what is applied is what was verified. Listing reads only each object's two ends (ranged
  GETs of the header and the trailer).
* Unusable objects (corrupt, unauthenticated, foreign) are copied under ``corrupt/`` with
  a ``.reason.txt`` object beside them, then deleted.
* One restorer per snapshot: a restorer first creates a claim object with a conditional
  PUT (``If-None-Match: *``): of several, exactly one succeeds. The claim is a lease
  (default 60 s) that its holder renews every quarter lease with a PUT conditional on the
  claim's ETag (``If-Match``), and checks once more right before the first chunk is
  applied. A claim whose lease ran out (its holder crashed) is taken over with the same
  conditional PUT, so of several contenders one wins, and the old holder's next renewal
  fails. A holder whose DELETE fails after applying marks the claim restored instead of
  ending it: the next claimant deletes the snapshot and applies nothing. Two restorers
  apply the same snapshot only if a holder stalls for longer than the
  whole lease between that check and the snapshot's deletion, or if the clocks of the
  machines differ by more than the lease (the expiry is wall-clock time): both far
  outside normal operation.
* Retention: at every commit, snapshots of the same namespace beyond the newest ``keep``
  (default 64) and those older than ``max_age`` (default 7 days) are deleted, unless a
  live claim holds them; so are objects under ``corrupt/`` older than ``max_age``. Ages are
  the server's: each object's Last-Modified against the newest one's (the snapshot just
  committed), never a node's clock, so a node whose clock runs ahead deletes nothing fresh
  (the header's ``created_at`` only breaks ties in the order). Only
  snapshots whose header authenticates are counted or deleted by the rule; anything else
  is for :meth:`S3SnapshotStore.pending` to move aside. ``keep`` is generous on purpose:
  several machines draining at once each leave a snapshot of the same namespace, and the
  next nodes restore them all.

Object layout under the URL's prefix, per cluster (``C`` is the cluster name made safe for a
key, with a hash of it: two clusters never share a folder)::

    C/snapshots/<millis>-<namespace>-<random>.snapshot   the snapshots
    C/claims/<same name>                                 a claim's lease (JSON)
    C/corrupt/<same name>, <same name>.reason.txt        moved aside

Options are URL query parameters: ``s3://bucket/prefix?keep=64&max_age=604800&lease=60``.
Every call of this store blocks (it is network I/O): a node calls it from worker threads
only, never on its event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Protocol
from urllib.parse import parse_qsl, urlsplit

from handoff._errors import MissingExtra, SnapshotCorrupt, SnapshotError
from handoff.snapshot import (
    MAX_HEADER,
    REASON_SUFFIX,
    SUFFIX,
    SnapshotClaim,
    SnapshotEncoder,
    SnapshotInfo,
    SnapshotWriter,
    inspect_file,
    name_fields,
    namespace_tag,
    new_header,
    read_header,
    snapshot_info,
    snapshot_name,
    verified_chunks,
)

__all__ = (
    "DEFAULT_KEEP",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_AGE",
    "ObjectChanged",
    "ObjectExists",
    "ObjectMeta",
    "ObjectMissing",
    "ObjectUpload",
    "Objects",
    "S3SnapshotStore",
    "SnapshotURL",
    "parse_snapshot_url",
)

logger = logging.getLogger("handoff.snapshot")

DEFAULT_KEEP: Final = 64
DEFAULT_MAX_AGE: Final = 7 * 24 * 3600.0
DEFAULT_LEASE: Final = 60.0
PART_SIZE: Final = 8 * 1024 * 1024
"""Bytes buffered before a multipart upload starts, and the size of each part."""
_PARTS_IN_FLIGHT: Final = 2
_SPOOL: Final = 8 * 1024 * 1024
_RANGE_BLOCK: Final = MAX_HEADER + 1024
_MAX_CLAIM: Final = 4096
"""A claim is a small JSON object; a larger one is garbage, and is not read."""
_SNAPSHOTS: Final = "snapshots/"
_CLAIMS: Final = "claims/"
_CORRUPT: Final = "corrupt/"
_INSTALL: Final = "pip install 'warm-handoff[s3]'"
QUICK_TIMEOUT: Final = "10s"
"""Timeout of each small request (listing, HEAD, ranged header reads, claim PUTs)."""
MAX_LEASE: Final = 3600.0
"""The longest lease the URL allows: a claim whose lease ends further than this in the
future (garbage, or a writer's clock far ahead) counts as ended."""
# A lease shorter than a few round trips is lost while it is renewed (and renewed in a tight
# loop); a max_age shorter than a deploy deletes snapshots before a successor can start.
_BOUNDS: Final = {"lease": (5.0, MAX_LEASE), "max_age": (300.0, 10 * 365 * 86400.0)}


# -- the small interface an object store offers this module -------------------------------


class ObjectMissing(SnapshotError):
    """The object does not exist (any more)."""


class ObjectExists(SnapshotError):
    """A create-only PUT found the object there already."""


class ObjectChanged(SnapshotError):
    """A PUT or GET conditional on an ETag found another one."""


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """One object as a listing or HEAD describes it; ``modified`` is Unix time."""

    key: str
    size: int
    etag: str | None
    modified: float


class ObjectUpload(Protocol):
    """An object being written: invisible until :meth:`close` returns."""

    def write(self, data: bytes) -> None:
        """Append ``data`` (buffered; parts go out as they fill)."""
        ...

    def close(self) -> None:
        """Finish: the object appears whole, atomically."""
        ...

    def abort(self) -> None:
        """Give up: nothing of it ever appears."""
        ...


class Objects(Protocol):
    """What :class:`S3SnapshotStore` needs of an object store, keys relative to its prefix.

    Failures raise :class:`~handoff._errors.SnapshotError` (the three subclasses above where
    they apply) with a message fit for a log. :class:`S3SnapshotStore` runs on obstore's
    S3 client; tests run it on an in-memory fake as well.
    """

    location: str
    """``s3://bucket/prefix``, for messages."""

    def list(self, prefix: str) -> list[ObjectMeta]:
        """Every object whose key starts with ``prefix``."""
        ...

    def head(self, key: str) -> ObjectMeta:
        """The object's metadata."""
        ...

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` (exclusive) of the object."""
        ...

    def read(self, key: str, *, etag: str | None = None) -> Iterator[bytes]:
        """The object's bytes in blocks, streamed; only if its ETag is ``etag`` when given."""
        ...

    def put(
        self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None
    ) -> str | None:
        """Write a small object whole; ``create``: only if absent, ``if_match``: only if its
        ETag is that. Returns the new ETag."""
        ...

    def upload(self, key: str) -> ObjectUpload:
        """Start writing an object of any size (no I/O until data fills a part)."""
        ...

    def copy(self, source: str, target: str) -> None:
        """Copy an object within the store."""
        ...

    def delete(self, key: str) -> None:
        """Delete an object; one already gone is not an error."""
        ...


# -- URLs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotURL:
    """A parsed ``HANDOFF_SNAPSHOT_URL``."""

    bucket: str
    prefix: str
    keep: int = DEFAULT_KEEP
    max_age: float = DEFAULT_MAX_AGE
    lease: float = DEFAULT_LEASE


def parse_snapshot_url(url: str, environ: Mapping[str, str] | None = None) -> SnapshotURL:
    """Parse ``s3://BUCKET/PREFIX?keep=N&max_age=SECONDS&lease=SECONDS``.

    An empty bucket (``s3:///PREFIX``) is ``BUCKET_NAME`` from ``environ`` (Fly's Tigris
    sets it). Raises :class:`ValueError` saying what is wrong.
    """
    parts = urlsplit(url.strip())
    if parts.scheme != "s3":
        raise ValueError(f"{url!r} is not an s3:// URL; write s3://BUCKET/PREFIX")
    if parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError(f"{url!r}: write s3://BUCKET/PREFIX, without credentials or port")
    # netloc, not hostname: hostname lower-cases, and a bucket's name is case-sensitive.
    bucket = parts.netloc
    if not bucket:
        env = os.environ if environ is None else environ
        bucket = env.get("BUCKET_NAME", "").strip()
        if not bucket:
            raise ValueError(
                f"{url!r} names no bucket and BUCKET_NAME is not set; write s3://BUCKET/PREFIX"
            )
    prefix = parts.path.strip("/")
    if any(segment in ("", ".", "..") for segment in prefix.split("/")) and prefix:
        raise ValueError(
            f"{url!r}: the prefix {prefix!r} has an empty, '.' or '..' segment, "
            "which object keys cannot hold"
        )
    options: dict[str, Any] = {}
    for name, text in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in ("keep", "max_age", "lease"):
            raise ValueError(
                f"{url!r}: unknown option {name!r}; the options are keep, max_age, lease"
            )
        options[name] = _option(url, name, text)
    return SnapshotURL(bucket, prefix, **options)


def _option(url: str, name: str, text: str) -> int | float:
    # Each parse failure is reported with the URL and the option, never as int()'s message.
    if name == "keep":
        try:
            keep = int(text)
        except ValueError:
            keep = 0
        if keep < 1:
            raise ValueError(f"{url!r}: keep={text!r} must be a positive whole number")
        return keep
    low, high = _BOUNDS[name]
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:  # also refuses nan
        raise ValueError(
            f"{url!r}: {name}={text!r} must be a number of seconds between {low:g} and {high:g}"
        )
    return seconds


# -- obstore --------------------------------------------------------------------------------


class _Abort(Exception):
    """Handed to obstore's writer's ``__exit__``: its way to abort an upload."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class _ObstoreObjects:
    """:class:`Objects` on obstore's S3 client (one Rust wheel, no other dependencies)."""

    def __init__(self, url: SnapshotURL, environ: Mapping[str, str]) -> None:
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError as exc:
            raise MissingExtra(
                f"HANDOFF_SNAPSHOT_URL (s3://) needs the obstore package: {_INSTALL}"
            ) from exc
        self._obstore = obstore
        self._errors = obstore.exceptions
        self.location = f"s3://{url.bucket}/{url.prefix}".rstrip("/")
        config: dict[str, str] = {}
        for variable, key in (
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
            ("AWS_REGION", "region"),
            ("AWS_ENDPOINT_URL", "endpoint"),
            # The more specific one wins (Tigris sets this one).
            ("AWS_ENDPOINT_URL_S3", "endpoint"),
        ):
            value = environ.get(variable, "").strip()
            if value:
                config[key] = value
        self._has_keys = "access_key_id" in config
        endpoint = config.get("endpoint", "")
        client: dict[str, Any] = {
            # A plain-HTTP endpoint is what the endpoint variable says, on purpose.
            "allow_http": endpoint.startswith("http://"),
            "connect_timeout": "5s",
        }
        retry: dict[str, Any] = {
            "max_retries": 3,
            "retry_timeout": timedelta(seconds=20),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        }
        try:
            # Two clients: the small requests (listing, HEAD, header reads, claims) give up
            # after QUICK_TIMEOUT, so that an endpoint that accepts connections and never
            # answers neither holds a node's start for a minute nor outlasts a lease's
            # renewal; the transfers of whole snapshots keep the long timeout.
            self._store, self._bulk = (
                S3Store(
                    url.bucket,
                    prefix=url.prefix or None,
                    config=config,  # type: ignore[arg-type]
                    client_options={**client, "timeout": timeout},  # type: ignore[arg-type]
                    retry_config=retry,  # type: ignore[arg-type]
                )
                for timeout in (QUICK_TIMEOUT, "60s")
            )
        except Exception as exc:
            raise SnapshotError(f"{self.location}: {_first_line(exc)}") from exc

    def __repr__(self) -> str:
        return f"_ObstoreObjects({self.location!r})"

    def _error(self, exc: Exception, what: str, key: str) -> SnapshotError:
        errors = self._errors
        where = f"{self.location}/{key}"
        if isinstance(exc, errors.NotFoundError | FileNotFoundError):
            return ObjectMissing(f"{where} not found")
        if isinstance(exc, errors.AlreadyExistsError):
            return ObjectExists(f"{where} exists already")
        if isinstance(exc, errors.PreconditionError):
            return ObjectChanged(f"{where} changed (its ETag is not the one expected)")
        text = str(exc)
        if not self._has_keys and "169.254.169.254" in text:
            # With no keys, obstore asks the instance metadata service for a role's.
            return SnapshotError(
                f"{where}: no credentials ({what}): AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY are not set, and no instance role answered"
            )
        if isinstance(exc, errors.PermissionDeniedError | errors.UnauthenticatedError) or any(
            code in text for code in ("403 Forbidden", "401 Unauthorized", "AccessDenied")
        ):
            return SnapshotError(
                f"{where}: access denied ({what}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, and that this key may read and write the bucket"
            )
        return SnapshotError(f"{where}: {what} failed: {_first_line(exc)}")

    def list(self, prefix: str) -> list[ObjectMeta]:
        try:
            return [
                ObjectMeta(m["path"], m["size"], m["e_tag"], m["last_modified"].timestamp())
                for batch in self._obstore.list(self._store, prefix)
                for m in batch
            ]
        except Exception as exc:
            raise self._error(exc, "listing", prefix) from exc

    def head(self, key: str) -> ObjectMeta:
        try:
            m = self._obstore.head(self._store, key)
        except Exception as exc:
            raise self._error(exc, "HEAD", key) from exc
        return ObjectMeta(m["path"], m["size"], m["e_tag"], m["last_modified"].timestamp())

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            return bytes(self._obstore.get_range(self._store, key, start=start, end=end))
        except Exception as exc:
            raise self._error(exc, "ranged GET", key) from exc

    def read(self, key: str, *, etag: str | None = None) -> Iterator[bytes]:
        try:
            result = self._obstore.get(
                self._bulk, key, options={"if_match": etag} if etag else None
            )
            for block in result.stream(min_chunk_size=1024 * 1024):
                yield bytes(block)
        except Exception as exc:
            raise self._error(exc, "GET", key) from exc

    def put(
        self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None
    ) -> str | None:
        mode: Any = "create" if create else {"e_tag": if_match} if if_match else "overwrite"
        try:
            return self._obstore.put(self._store, key, data, mode=mode)["e_tag"]
        except Exception as exc:
            raise self._error(exc, "PUT", key) from exc

    def upload(self, key: str) -> ObjectUpload:
        writer = self._obstore.open_writer(
            self._bulk, key, buffer_size=PART_SIZE, max_concurrency=_PARTS_IN_FLIGHT
        )
        objects = self

        class Upload:
            def write(self, data: bytes) -> None:
                try:
                    writer.write(data)
                except Exception as exc:
                    raise objects._error(exc, "upload", key) from exc

            def close(self) -> None:
                try:
                    writer.close()
                except Exception as exc:
                    raise objects._error(exc, "completing the upload", key) from exc

            def abort(self) -> None:
                with contextlib.suppress(Exception):
                    writer.__exit__(_Abort, _Abort(), None)

        return Upload()

    def copy(self, source: str, target: str) -> None:
        try:
            self._obstore.copy(self._bulk, source, target)
        except Exception as exc:
            raise self._error(exc, "copy", source) from exc

    def delete(self, key: str) -> None:
        try:
            self._obstore.delete(self._store, key)
        except Exception as exc:
            error = self._error(exc, "DELETE", key)
            if not isinstance(error, ObjectMissing):
                raise error from exc


# -- reading objects as files --------------------------------------------------------------


class _RangedRaw(io.RawIOBase):
    """A seekable, read-only file over ranged GETs of one object (wrapped in a buffer)."""

    def __init__(self, objects: Objects, meta: ObjectMeta) -> None:
        self._objects = objects
        self._key = meta.key
        self._size = meta.size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._size, self._position + len(view))
        if end <= self._position:
            return 0
        data = self._objects.read_range(self._key, self._position, end)
        if len(data) != end - self._position:
            # A server that ignores the range, or cuts it short, is not the snapshot's
            # fault: an error (the object stays), never a false end of file (quarantine).
            raise SnapshotError(
                f"{self._objects.location}/{self._key}: a ranged GET of "
                f"{end - self._position} bytes returned {len(data)}"
            )
        view[: len(data)] = data
        self._position += len(data)
        return len(data)


def _ranged(objects: Objects, meta: ObjectMeta) -> IO[bytes]:
    return io.BufferedReader(_RangedRaw(objects, meta), buffer_size=_RANGE_BLOCK)


# -- the store -----------------------------------------------------------------------------


def cluster_folder(cluster: str) -> str:
    """The key folder of ``cluster``'s objects: readable, and distinct for every name."""
    digest = hashlib.sha256(cluster.encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cluster)[:48]
    return f"{safe}-{digest}/"


@dataclass(frozen=True, slots=True)
class _Lease:
    holder: str
    owner: str
    until: float
    restored: bool = False
    """The snapshot was applied but could not be deleted: nobody applies it again."""

    def encode(self) -> bytes:
        fields: dict[str, Any] = {"holder": self.holder, "owner": self.owner, "until": self.until}
        if self.restored:
            fields["restored"] = True
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> _Lease | None:
        try:
            raw = json.loads(data)
            return cls(
                str(raw["holder"]),
                str(raw["owner"]),
                float(raw["until"]),
                raw.get("restored") is True,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class S3SnapshotStore:
    """Snapshots as objects in an S3-compatible bucket; see the module's documentation.

    Build it with :meth:`from_url` (``HANDOFF_SNAPSHOT_URL``), or on any :class:`Objects`.
    ``key`` authenticates the snapshots (a node passes
    ``cluster_key(cookie, cluster).derive("snapshot")``); ``owner`` names this node in the
    claims it makes (for people reading the bucket); ``clock`` is wall-clock time (leases,
    retention), injectable for tests.
    """

    def __init__(
        self,
        objects: Objects,
        *,
        key: bytes,
        keep: int = DEFAULT_KEEP,
        max_age: float = DEFAULT_MAX_AGE,
        lease: float = DEFAULT_LEASE,
        owner: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 32:
            raise ValueError("a snapshot key needs at least 32 bytes")
        if keep < 1 or max_age <= 0 or lease <= 0:
            raise ValueError("keep, max_age and lease must be positive")
        self.objects = objects
        self._key = key
        self.keep = keep
        self.max_age = max_age
        self.lease = lease
        self._owner = owner
        self._clock = clock

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key: bytes,
        owner: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> S3SnapshotStore:
        """The store of ``HANDOFF_SNAPSHOT_URL`` with credentials from ``environ``'s
        ``AWS_*`` variables (default ``os.environ``). Raises
        :class:`~handoff._errors.MissingExtra` without obstore, :class:`ValueError` for a
        bad URL. Makes no request."""
        env = os.environ if environ is None else environ
        parsed = parse_snapshot_url(url, env)
        return cls(
            _ObstoreObjects(parsed, env),
            key=key,
            keep=parsed.keep,
            max_age=parsed.max_age,
            lease=parsed.lease,
            owner=owner,
        )

    def __repr__(self) -> str:
        return f"S3SnapshotStore({self.objects.location!r})"

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
        """Start a snapshot; makes no request (the first goes out when a part is full)."""
        header = new_header(
            namespace,
            cluster=cluster,
            kind=kind,
            version=version,
            node=node,
            release=release,
            created_at=created_at,
        )
        key = cluster_folder(cluster) + _SNAPSHOTS + snapshot_name(namespace, created_at)
        return _ObjectWriter(self, key, header)

    # -- finding ----------------------------------------------------------------------------

    def pending(self, cluster: str) -> list[SnapshotInfo]:
        """Complete snapshots of ``cluster``, oldest first; unusable ones are moved aside.

        Reads each object's header and trailer (two ranged GETs), not its chunks. Raises
        :class:`~handoff._errors.SnapshotError` when the bucket cannot be listed (wrong
        credentials, no such bucket, unreachable).
        """
        folder = cluster_folder(cluster)
        found: list[SnapshotInfo] = []
        metas = sorted(self.objects.list(folder + _SNAPSHOTS), key=lambda m: m.key)
        for meta in metas:
            if not meta.key.endswith(SUFFIX):
                continue
            try:
                header, records = inspect_file(
                    _ranged(self.objects, meta), meta.size, meta.key, self._key, cluster
                )
            except SnapshotCorrupt as exc:
                logger.warning("snapshot %s moved aside: %s", meta.key, exc.reason)
                self.quarantine(meta.key, exc.reason)
                continue
            except ObjectMissing:
                logger.debug("snapshot %s gone since it was listed", meta.key)
                continue
            except SnapshotError as exc:
                logger.warning("snapshot %s skipped: %s", meta.key, exc)
                continue
            found.append(snapshot_info(Path(meta.key), header, records))
        self._clean_claims(folder, {m.key.rsplit("/", 1)[-1] for m in metas})
        found.sort(key=lambda i: (i.created_at, i.path.name))
        return found

    def _clean_claims(self, folder: str, names: set[str]) -> None:
        # A holder deletes its claim after the snapshot; one that crashed in between
        # leaves a claim of nothing, removed here once its lease is long over.
        try:
            claims = self.objects.list(folder + _CLAIMS)
        except SnapshotError as exc:
            logger.debug("claims not listed: %s", exc)
            return
        now = self._clock()
        for meta in claims:
            name = meta.key.rsplit("/", 1)[-1]
            if name not in names and now - meta.modified > 2 * self.lease:
                with contextlib.suppress(SnapshotError):
                    self.objects.delete(meta.key)

    # -- claiming ---------------------------------------------------------------------------

    def claim(self, info: SnapshotInfo) -> SnapshotClaim | None:
        """Claim ``info``: create its claim object (``If-None-Match: *``), or take over one
        whose lease ran out (``If-Match`` its ETag). ``None`` when another node holds it or
        the snapshot is gone. Raises :class:`~handoff._errors.SnapshotError` when the
        bucket fails (the snapshot is then left in place)."""
        key = str(info.path)
        claim_key = _claim_key(key)
        holder = secrets.token_hex(16)
        lease = _Lease(holder, self._owner, self._clock() + self.lease)
        try:
            etag = self.objects.put(claim_key, lease.encode(), create=True)
        except ObjectExists:
            etag = self._take_over(claim_key, lease)
            if etag is None:
                return None
        try:
            meta = self.objects.head(key)
        except ObjectMissing:
            # Restored or moved aside by the previous holder since it was listed.
            logger.info("snapshot %s already restored or moved aside by another node", key)
            with contextlib.suppress(SnapshotError):
                self.objects.delete(claim_key)
            return None
        except BaseException:
            ended = _Lease(holder, self._owner, 0.0).encode()
            with contextlib.suppress(SnapshotError):
                self.objects.put(claim_key, ended, if_match=etag)
            raise
        return _ObjectClaim(self, info, claim_key, holder, etag, meta)

    def _take_over(self, claim_key: str, lease: _Lease) -> str | None:
        try:
            meta, current = self._read_claim(claim_key)
        except (ObjectMissing, ObjectChanged):
            # Its holder finished with the snapshot, or renewed its lease, just now.
            return None
        now = self._clock()
        if current is not None and current.restored:
            # Applied by its holder, whose DELETE failed: finish the job, apply nothing.
            snapshot_key = claim_key.replace(_CLAIMS, _SNAPSHOTS, 1)
            with contextlib.suppress(SnapshotError):
                self.objects.delete(snapshot_key)
                self.objects.delete(claim_key)
                logger.info(
                    "snapshot %s was restored by %s already: deleted, not applied again",
                    snapshot_key,
                    current.owner or "another node",
                )
            return None
        if current is None:
            logger.warning(
                "the claim %s holds no lease this release can read: taken over", claim_key
            )
        elif _lease_end(current, claim_key, now) > now:
            logger.info(
                "snapshot %s is being restored by %s (lease for %.0f s more): skipped",
                claim_key,
                current.owner or "another node",
                current.until - now,
            )
            return None
        try:
            etag = self.objects.put(claim_key, lease.encode(), if_match=meta.etag)
        except (ObjectChanged, ObjectMissing):
            logger.info("claim %s was taken by another node first", claim_key)
            return None
        if current is not None and current.until > 0:
            logger.warning(
                "took over the claim %s of %s, whose lease ran out %.0f s ago (crashed?)",
                claim_key,
                current.owner or "another node",
                now - current.until,
            )
        return etag

    # -- reading ----------------------------------------------------------------------------

    def read(self, info: SnapshotInfo) -> Iterator[tuple[bytes, int]]:
        """Yield ``(payload, records)`` per chunk after verifying the whole object (fetched
        once into a local spooled file). Claims nothing: restore through :meth:`claim`."""
        with self._fetch(info, None) as file:
            yield from verified_chunks(file, info, self._key)

    def _fetch(self, info: SnapshotInfo, etag: str | None, size: int | None = None) -> IO[bytes]:
        file = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 (handed on)
        key = str(info.path)
        try:
            if size is None:
                size = self.objects.head(key).size
            received = 0
            for block in self.objects.read(key, etag=etag):
                received += len(block)
                if received > size:
                    # An endless or oversized body must not fill the local disk.
                    raise SnapshotError(
                        f"{self.objects.location}/{key}: the GET returned more than the "
                        f"object's {size} bytes; not applied"
                    )
                file.write(block)
            if received != size:
                raise SnapshotError(
                    f"{self.objects.location}/{key}: the GET returned {received} of the "
                    f"object's {size} bytes; not applied"
                )
            file.seek(0)
        except ObjectMissing:
            file.close()
            raise
        except ObjectChanged as exc:
            file.close()
            raise SnapshotCorrupt(str(info.path), "replaced since it was claimed") from exc
        except OSError as exc:
            file.close()
            raise SnapshotError(f"cannot keep a local copy of {info.path}: {exc}") from exc
        except BaseException:
            file.close()
            raise
        return file

    # -- disposal ---------------------------------------------------------------------------

    def quarantine(self, info_or_path: SnapshotInfo | str | os.PathLike[str], reason: str) -> None:
        """Copy a snapshot under ``corrupt/`` with a ``.reason.txt`` object, then delete it.

        Never raises: a snapshot that cannot be moved is logged (and met again)."""
        key = str(info_or_path.path if isinstance(info_or_path, SnapshotInfo) else info_or_path)
        folder, _, name = key.rpartition(_SNAPSHOTS)
        target = folder + _CORRUPT + name
        try:
            self.objects.copy(key, target)
            self.objects.put(target + REASON_SUFFIX, (reason + "\n").encode())
            self.objects.delete(key)
        except ObjectMissing:
            logger.debug("snapshot %s already gone, not moved aside", key)
        except SnapshotError as exc:
            logger.warning("cannot move snapshot %s aside (%s): %s", key, reason, exc)
        else:
            logger.info("snapshot %s moved to %s: %s", key, target, reason)

    def remove(self, info: SnapshotInfo) -> None:
        """Delete a restored snapshot (one already gone is not an error)."""
        self.objects.delete(str(info.path))

    # -- retention --------------------------------------------------------------------------

    def retain(self, cluster: str, namespace: str) -> int:
        """Apply the retention rule to ``namespace``'s snapshots; return how many went.

        Keeps the newest :attr:`keep` whose header authenticates and deletes the rest and
        any older than :attr:`max_age`, except those a live claim holds; deletes
        ``corrupt/`` objects older than :attr:`max_age`. Ages and order are by the server's
        Last-Modified, measured against the newest snapshot's (the one just committed):
        the writers' clocks (a header's ``created_at``, the name's time) may be far off.
        Run at every commit; never raises (failures are logged: the next commit tries again).
        """
        folder = cluster_folder(cluster)
        now = self._clock()
        deleted = 0
        try:
            listed = self.objects.list(folder + _SNAPSHOTS)
            # The server's time now: the newest Last-Modified (the snapshot just committed).
            server_now = max((meta.modified for meta in listed), default=None)
            # The names say which objects may be this namespace's: when there are few
            # enough and none is old (the usual case), no header is read at all.
            tag = namespace_tag(namespace)
            named = []
            for meta in listed:
                fields = name_fields(meta.key.rsplit("/", 1)[-1])
                if fields is not None and fields[1] == tag:
                    named.append(meta)
            doomed: list[str] = []
            if server_now is not None and (
                len(named) > self.keep
                or any(server_now - meta.modified > self.max_age for meta in named)
            ):
                ours: list[tuple[float, float, str]] = []
                for meta in named:
                    try:
                        header = read_header(
                            _ranged(self.objects, meta), meta.key, self._key, cluster
                        )
                    except SnapshotError:
                        continue  # pending() moves it aside, or it is gone already
                    if header["namespace"] == namespace:
                        ours.append((meta.modified, header["created_at"], meta.key))
                ours.sort(reverse=True)
                doomed = [
                    key
                    for index, (modified, _, key) in enumerate(ours)
                    if index >= self.keep or server_now - modified > self.max_age
                ]
            for key in doomed:
                if self._claimed(key, now):
                    continue
                self.objects.delete(key)
                deleted += 1
                logger.info("retention: deleted snapshot %s", key)
            for meta in self.objects.list(folder + _CORRUPT):
                if server_now is not None and server_now - meta.modified > self.max_age:
                    self.objects.delete(meta.key)
        except SnapshotError as exc:
            logger.warning("retention of %r snapshots not applied: %s", namespace, exc)
        return deleted

    def _read_claim(self, claim_key: str) -> tuple[ObjectMeta, _Lease | None]:
        """The claim object's metadata and lease (``None``: unreadable). Read only when it
        is of a claim's size: a huge object there must not be read into memory."""
        meta = self.objects.head(claim_key)
        if meta.size > _MAX_CLAIM:
            return meta, None
        return meta, _Lease.decode(b"".join(self.objects.read(claim_key, etag=meta.etag)))

    def _claimed(self, key: str, now: float) -> bool:
        claim_key = _claim_key(key)
        try:
            _, lease = self._read_claim(claim_key)
        except ObjectMissing:
            return False
        except ObjectChanged:
            return True  # renewed between the HEAD and the GET: a live holder
        return lease is not None and not lease.restored and _lease_end(lease, claim_key, now) > now


def _lease_end(lease: _Lease, key: str, now: float) -> float:
    """When ``lease`` ends: its ``until``, unless that is more than :data:`MAX_LEASE` from
    ``now``: no live holder writes such a lease (the URL caps ``lease`` there), only garbage
    or a clock far ahead, which would otherwise block the snapshot, and keep it from
    retention, for ever. Such a lease counts as ended, with a warning."""
    if lease.until - now > MAX_LEASE:
        logger.warning(
            "the claim %s of %s holds a lease ending %.0f s from now, more than the %.0f s "
            "any holder writes (garbage, or a clock far ahead): counted as ended",
            key,
            lease.owner or "another node",
            lease.until - now,
            MAX_LEASE,
        )
        return 0.0
    return lease.until


def _claim_key(snapshot_key: str) -> str:
    folder, _, name = snapshot_key.rpartition(_SNAPSHOTS)
    return folder + _CLAIMS + name


class _ObjectWriter:
    """A snapshot being uploaded; see :meth:`S3SnapshotStore.begin`."""

    def __init__(self, store: S3SnapshotStore, key: str, header: dict[str, Any]) -> None:
        self._store = store
        self._key = key
        self._header = header
        self._done = False
        self._written = 0
        self._encoder = SnapshotEncoder(store._key, header)
        self._upload = store.objects.upload(key)
        self._send(self._encoder.head)

    def _send(self, data: bytes) -> None:
        try:
            self._upload.write(data)
        except SnapshotError:
            self.abort()
            raise
        self._written += len(data)

    def write_chunk(self, payload: bytes, records: int) -> None:
        """Append one chunk of ``records`` encoded records (at most 64 MiB)."""
        if self._done:
            raise SnapshotError(f"snapshot {self._key} is already finished")
        for part in self._encoder.chunk(payload, records):
            self._send(part)

    def commit(self) -> SnapshotInfo:
        """Finish the upload (the object appears whole), then apply the retention rule."""
        if self._done:
            raise SnapshotError(f"snapshot {self._key} is already finished")
        self._send(self._encoder.trailer())
        try:
            self._upload.close()
        except SnapshotError:
            self.abort()
            raise
        self._done = True
        records = self._encoder.records
        logger.debug("snapshot %s committed: %d records", self._key, records)
        self._store.retain(self._header["cluster"], self._header["namespace"])
        return snapshot_info(Path(self._key), self._header, records)

    def abort(self) -> None:
        """Discard the upload; a no-op once committed or aborted. Never blocks: aborting a
        multipart upload already started is a request, sent from a thread of its own."""
        if self._done:
            return
        self._done = True
        if self._written <= PART_SIZE:
            self._upload.abort()  # only a local buffer so far
            return
        threading.Thread(target=self._upload.abort, name="handoff-s3-abort", daemon=True).start()

    def __enter__(self) -> _ObjectWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class _ObjectClaim:
    """A won claim: a lease renewed by a thread of its own until the claim ends."""

    def __init__(
        self,
        store: S3SnapshotStore,
        info: SnapshotInfo,
        claim_key: str,
        holder: str,
        etag: str | None,
        meta: ObjectMeta,
    ) -> None:
        self._store = store
        self._info = info
        self._claim_key = claim_key
        self._holder = holder
        self._etag = etag
        self._meta = meta
        self._file: IO[bytes] | None = None
        self._lost: str | None = None
        self._ended = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._keep_renewing, name="handoff-s3-lease", daemon=True
        )
        self._renewer.start()

    @property
    def info(self) -> SnapshotInfo:
        """The claimed snapshot."""
        return self._info

    def _renew(self, until: float, *, background: bool = False) -> bool:
        """Move the lease's end to ``until`` if the claim is still ours; False if lost."""
        with self._lock:
            if self._lost is not None:
                return False
            if background and self._stop.is_set():
                return True  # the claim ended while this renewal waited for the lock
            lease = _Lease(self._holder, self._store._owner, until)
            try:
                self._etag = self._store.objects.put(
                    self._claim_key, lease.encode(), if_match=self._etag
                )
            except (ObjectChanged, ObjectMissing) as exc:
                self._lost = str(exc)
                logger.error("lost the claim on snapshot %s: %s", self._info.path, exc)
                return False
            return True

    def _keep_renewing(self) -> None:
        interval = self._store.lease / 4
        while not self._stop.wait(interval):
            try:
                if not self._renew(self._store._clock() + self._store.lease, background=True):
                    return
            except SnapshotError as exc:
                logger.warning("could not renew the claim on %s: %s", self._info.path, exc)

    def read(self) -> Iterator[tuple[bytes, int]]:
        """Verify, then yield ``(payload, records)`` per chunk, from one local copy of the
        object; checks that the claim is still held before the first chunk."""
        if self._ended:
            raise SnapshotError(f"the claim on snapshot {self._info.path} was released")
        if self._file is None:
            self._file = self._store._fetch(self._info, self._meta.etag, self._meta.size)
        if not self._renew(self._store._clock() + self._store.lease):
            raise SnapshotError(
                f"the claim on snapshot {self._info.path} was lost ({self._lost}); not applied"
            )
        yield from verified_chunks(self._file, self._info, self._store._key)

    def remove(self) -> None:
        """Delete the restored snapshot and the claim. When the DELETE fails, the claim is
        marked restored instead (no node applies the snapshot again; the next claimant
        deletes it); raises only when that fails too."""
        try:
            if self._ended:
                raise SnapshotError(f"the claim on snapshot {self._info.path} was released")
            # Deleted even when the claim was lost: whoever took it over then finds
            # nothing to apply a second time, unless it has a copy already.
            try:
                self._store.remove(self._info)
            except SnapshotError as exc:
                self._mark_restored(exc)
                return
            self._finish()
        finally:
            self.release()

    def _mark_restored(self, failure: SnapshotError) -> None:
        # Ending the lease now would hand an applied snapshot to the next claimant: a
        # counter's increments counted twice. The claim says "restored" instead, for ever.
        self._stop.set()
        with self._lock:
            lease = _Lease(self._holder, self._store._owner, 0.0, restored=True)
            try:
                if self._lost is not None:
                    raise SnapshotError(f"the claim was lost ({self._lost})")
                self._store.objects.put(self._claim_key, lease.encode(), if_match=self._etag)
            except SnapshotError as exc:
                raise SnapshotError(
                    f"snapshot {self._info.path} was applied but neither deleted ({failure}) "
                    f"nor marked restored ({exc}): another node may apply it again"
                ) from exc
        self._ended = True
        logger.warning(
            "snapshot %s was applied but not deleted (%s); its claim marks it restored, so "
            "no node applies it again, and the next to find it deletes it",
            self._info.path,
            failure,
        )

    def quarantine(self, reason: str) -> None:
        """Move the snapshot under ``corrupt/`` with ``reason``, then end the claim."""
        try:
            if not self._ended:
                self._store.quarantine(self._info, reason)
                self._finish()
        finally:
            self.release()

    def _finish(self) -> None:
        # The snapshot is gone: the claim protects nothing now. Deleted only while it is
        # ours; a lost one belongs to the node that took it over.
        self._stop.set()
        with self._lock:
            lost = self._lost is not None
        if not lost:
            with contextlib.suppress(SnapshotError):
                self._store.objects.delete(self._claim_key)
        self._ended = True

    def release(self) -> None:
        """End the claim; a snapshot neither removed nor moved aside is left for the next
        claimant, at once (the lease is ended, not left to run out). Safe to repeat."""
        self._stop.set()
        if not self._ended:
            self._ended = True
            with contextlib.suppress(SnapshotError):
                self._renew(0.0)
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> _ObjectClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
