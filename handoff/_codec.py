"""Serialization of state records: msgpack plus a small, explicit set of extension types.

Never pickle: a receiver decodes only msgpack's own types and the extension types listed
here or registered with :meth:`Codec.register`, so a hostile peer cannot make it build
arbitrary objects. Decoding is bounded: container lengths are capped by the payload size,
nesting by ``max_depth``, the record count by the caller, and every failure is a
:class:`~handoff._errors.RecordDecodeError` (a :class:`~handoff._errors.ProtocolError`).

A payload is also bounded in what it may build (invariant 9), checked while it is decoded,
before anything quadratic or large exists; past a bound decoding stops with
:class:`~handoff._errors.PayloadRefused`:

* hash floods: at most :data:`MAX_HASH_COLLISIONS` distinct hashable values of extension
  types (tuples, frozensets, big ints, Decimals, UUIDs ...) in one payload may share one
  hash. Those hashes are not randomized (``hash(k * (2**61 - 1)) == 0``), so without the
  bound a peer could make every key of a dict, a set or the receiving cache collide, and
  building it quadratic: 0.5 MB froze a receiver for 10-24 s. The count is made as each
  value is decoded, before it can be inserted anywhere. Values of msgpack's own types
  cannot flood: ``str`` and ``bytes`` hashes are randomized, and at most ~20 ints or
  floats share a hash;
* decode bombs: the containers a payload builds (lists, dicts, tuples, sets and extension
  values, counted by ``sys.getsizeof``, which includes the pointer to every element) may
  take at most :data:`RETAINED_PER_BYTE` (40) times the payload's size, or 64 KiB for a
  small one. Measured on CPython 3.11 (``tests/test_hostile_data.py``): cache values of
  strings, numbers, small dicts and lists take 1-34x; empty arrays, maps and sets take
  65-75x, one-entry dicts 77x, so millions of them are refused; so are large sets of small
  ints (~75x: a set slot costs far more than the byte that encodes its element). Scalars
  cost at most ~20x (a 2-character string), so a payload never holds more than about 60
  times its size;
* ``Decimal``: signalling NaNs (they raise on every comparison), more than
  :data:`MAX_DECIMAL_DIGITS` digits and adjusted exponents beyond
  :data:`MAX_DECIMAL_EXPONENT` (``int()`` of ``1E+999999999`` does not finish) are refused,
  by the encoder too.

What round-trips, and how:

* natively (msgpack): ``None``, ``bool``, ``int`` in the 64-bit range, ``float``, ``str``,
  ``bytes``, ``list``, ``dict`` (any hashable keys, tuples included);
* as extension types (codes 1..63, reserved for the library): ``tuple``, ``set``,
  ``frozenset``, ``datetime.datetime`` (naive, or aware with ``datetime.timezone`` fixed
  offsets, ``timezone.utc`` and ``zoneinfo.ZoneInfo`` by key), ``datetime.date``,
  ``datetime.time``, ``datetime.timedelta``, ``decimal.Decimal``, ``uuid.UUID``,
  ``complex`` and ints beyond 64 bits (up to 8192 bits);
* user types registered with :meth:`Codec.register` (codes 64..127).

Subclasses are encoded as their nearest supported base class: a ``StrEnum`` arrives as a
``str``, an ``IntEnum`` as an ``int``, an ``OrderedDict`` or ``defaultdict`` as a ``dict``, a
named tuple as a ``tuple``. The decoded value compares equal to the original but has lost its
class (and a ``defaultdict`` its factory). ``bytearray`` and ``memoryview`` arrive as
``bytes``. Register the subclass to keep it.

Nesting depth counts containers (list, dict, tuple, set, frozenset) inside one key, value or
meta: ``[[1]]`` has depth 2. Anything deeper than ``max_depth`` (cyclic structures included)
is refused by the encoder, so whatever encodes also decodes.
"""

from __future__ import annotations

import datetime as dt
import decimal
import gc
import itertools
import struct
import sys
import threading
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import chain
from typing import Any, Final

import msgpack

from handoff._adapter import Record
from handoff._errors import HandoffError, PayloadRefused, RecordDecodeError, RecordEncodeError
from handoff.protocol import size_limits

__all__ = ("Codec",)

# Extension type codes. Part of the wire and snapshot format: never renumber.
EXT_TUPLE: Final = 1
EXT_SET: Final = 2
EXT_FROZENSET: Final = 3
EXT_DATETIME: Final = 4
EXT_DATE: Final = 5
EXT_TIME: Final = 6
EXT_TIMEDELTA: Final = 7
EXT_DECIMAL: Final = 8
EXT_UUID: Final = 9
EXT_COMPLEX: Final = 10
EXT_BIGINT: Final = 11

USER_CODES: Final = range(64, 128)
MAX_BIGINT_BITS: Final = 8192

MAX_HASH_COLLISIONS: Final = 8
"""Distinct hashable extension values of one payload that may share one hash."""
RETAINED_PER_BYTE: Final = 40
"""Bytes of containers one payload may build per byte of it (see the module docs)."""
MIN_RETAINED: Final = 64 * 1024
"""What a payload may build however small it is."""
MAX_DECIMAL_DIGITS: Final = 4300
"""Digits of a ``Decimal``: CPython's default limit for converting an int from text."""
MAX_DECIMAL_EXPONENT: Final = 6144
"""Largest adjusted exponent of a finite ``Decimal`` either way (IEEE decimal128's)."""

_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1

# Values msgpack packs itself (with strict_types) and that cannot contain anything else.
_SCALARS: Final = frozenset({str, bytes, int, float, bool, type(None)})
_UNHASHABLE_AFTER_DECODE: Final = (list, dict, set)
_RECORD_TYPES: Final = frozenset({tuple, list})
# Types the Packer handles without calling ``default``: registering one would never take effect.
_NATIVE: Final = frozenset(
    {str, bytes, bytearray, memoryview, int, float, bool, type(None), list, dict}
    | {msgpack.ExtType, msgpack.Timestamp}
)

_DATE = struct.Struct(">HBB")
_DATETIME = struct.Struct(">HBBBBBIB")
_TIME = struct.Struct(">BBBIB")
_TIMEDELTA = struct.Struct(">iII")
_COMPLEX = struct.Struct(">dd")

_ARRAY16: Final = 0xDC
_ARRAY32: Final = 0xDD

_Encoder = Callable[[Any], Any]
_Decoder = Callable[[bytes, int], Any]


_EXTTYPE_REASON: Final = (
    "msgpack.ExtType values cannot be encoded: register a type with Codec.register"
)


def _unique(items: list[object]) -> list[object]:
    return list({id(x): x for x in items}.values()) if len(items) > 1 else items


def _find_problem(roots: Iterable[object], max_depth: int, *, shared: bool = True) -> str | None:
    """Why the values in ``roots`` cannot round-trip, or ``None`` if they can.

    Checks that containers nest at most ``max_depth`` deep (cycles count as infinitely
    deep), that nothing inside a dict key or set element would decode unhashable, and that
    no raw ``msgpack.ExtType`` (which could impersonate one of the codec's types) is
    present. ``shared=False`` promises that no container is reachable twice (true of what
    msgpack decodes), which saves de-duplicating each level.

    Breadth-first over all roots at once, so that the per-element work happens in C
    iteration and comprehensions rather than a Python call per value: this runs for every
    container value on the drain path and for every chunk a receiver decodes. Iterative,
    and each level is de-duplicated by identity, so no depth, cycle or aliasing can exhaust
    the stack or blow up the walk.
    """
    plain = [x for x in roots if type(x) not in _SCALARS]
    keyed: list[object] = []  # inside a dict key or set element: must decode hashable
    depth = 0
    while plain or keyed:
        if shared:
            plain = _unique(plain)
            keyed = _unique(keyed)
        maps: list[dict[Any, Any]] = [x for x in plain if type(x) is dict]
        seqs: list[Iterable[object]] = [x for x in plain if type(x) is list or type(x) is tuple]
        hashed: list[Iterable[object]] = []
        if len(maps) + len(seqs) != len(plain):
            for item in plain:
                cls = type(item)
                if cls is dict or cls is list or cls is tuple:
                    continue
                if isinstance(item, msgpack.ExtType):
                    return _EXTTYPE_REASON
                if isinstance(item, dict):
                    maps.append(item)
                elif isinstance(item, set | frozenset):
                    hashed.append(item)
                elif isinstance(item, list | tuple):
                    seqs.append(item)
        for item in keyed:
            if isinstance(item, msgpack.ExtType):
                return _EXTTYPE_REASON
            if isinstance(item, _UNHASHABLE_AFTER_DECODE):
                # A hashable subclass of list/dict/set decodes as its unhashable base.
                return f"a {type(item).__name__} used as a dict key or set element"
            if isinstance(item, tuple | frozenset):
                hashed.append(item)
        if not (seqs or maps or hashed):
            return None
        depth += 1
        if depth > max_depth:
            return f"value nests deeper than {max_depth} levels (or refers to itself)"
        plain = [
            x
            for x in chain(chain.from_iterable(seqs), chain.from_iterable(map(dict.values, maps)))
            if type(x) not in _SCALARS
        ]
        keyed = []
        if not _SCALARS.issuperset(map(type, chain.from_iterable(maps))):
            keyed = [x for x in chain.from_iterable(maps) if type(x) not in _SCALARS]
        if hashed:
            keyed += [x for x in chain.from_iterable(hashed) if type(x) not in _SCALARS]
    return None


def _array_length(payload: bytes) -> int:
    """The element count of the msgpack array ``payload`` starts with."""
    if not payload:
        raise RecordDecodeError("empty payload")
    first = payload[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == _ARRAY16 and len(payload) >= 3:
        return int.from_bytes(payload[1:3], "big")
    if first == _ARRAY32 and len(payload) >= 5:
        return int.from_bytes(payload[1:5], "big")
    raise RecordDecodeError("payload is not an array of records")


def _array_header(length: int) -> bytes:
    if length <= 0x0F:
        return bytes((0x90 | length,))
    if length <= 0xFFFF:
        return bytes((_ARRAY16,)) + length.to_bytes(2, "big")
    return bytes((_ARRAY32,)) + length.to_bytes(4, "big")


_GC_PAUSE_MIN_RECORDS: Final = 256
_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a large chunk is built or applied.

    Decoding allocates a container per record, and CPython runs a collection every 700
    allocations, repeatedly traversing the whole (for a cache, large) heap: that halves
    decoding speed. No cycles are created here, so pausing loses nothing; msgpack's own
    documentation recommends it. Nested and concurrent pauses share one, and a collector
    that was already disabled by the application stays disabled.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RecordDecodeError(f"msgpack extension type {code} is not allowed here")


class _Budget:
    """What one payload may still build: bytes of containers, and distinct hashable
    extension values per hash (see the module documentation)."""

    __slots__ = ("left", "seen")

    def __init__(self, size: int) -> None:
        self.left = max(MIN_RETAINED, RETAINED_PER_BYTE * size)
        self.seen: dict[int, list[object]] = {}

    def charge(self, obj: Any) -> Any:
        """Count a container msgpack built (its ``list_hook`` and ``object_hook``)."""
        self.left -= sys.getsizeof(obj)
        if self.left < 0:
            raise PayloadRefused(_BOMB_REASON)
        return obj

    def charge_hashable(self, obj: Any) -> Any:
        """Count an extension value; refuse it if too many distinct ones share its hash."""
        self.charge(obj)
        try:
            key = hash(obj)
        except Exception:
            return obj  # unhashable: it can be neither a key nor a set element
        # Keyed by hash values, which are ints and cannot collide among themselves.
        same = self.seen.get(key)
        if same is None:
            self.seen[key] = [obj]
        elif not any(obj == other for other in same):
            if len(same) >= MAX_HASH_COLLISIONS:
                raise PayloadRefused(
                    f"more than {MAX_HASH_COLLISIONS} distinct values share one hash "
                    f"(a hash flood: keys that would make building a dict quadratic)"
                )
            same.append(obj)
        return obj


_BOMB_REASON: Final = (
    f"the payload would take more than {RETAINED_PER_BYTE} times its size in memory "
    f"(a decode bomb: containers that cost far more than their bytes)"
)


def _check_decimal(value: decimal.Decimal) -> str | None:
    """Why ``value`` is unsafe to hand to an application, or ``None``."""
    if value.is_snan():
        return "a signalling NaN Decimal (it raises on every comparison)"
    if len(value.as_tuple().digits) > MAX_DECIMAL_DIGITS:
        return f"a Decimal of more than {MAX_DECIMAL_DIGITS} digits"
    if value.is_finite() and abs(value.adjusted()) > MAX_DECIMAL_EXPONENT:
        return f"a Decimal whose exponent is beyond +-{MAX_DECIMAL_EXPONENT}"
    return None


def _encode_decimal(value: decimal.Decimal) -> msgpack.ExtType:
    problem = _check_decimal(value)
    if problem is not None:
        raise RecordEncodeError(f"cannot encode value of type Decimal: {problem}")
    return msgpack.ExtType(EXT_DECIMAL, str(value).encode("ascii"))


def _not_plain_map(obj: object) -> Any:
    raise _NotPlain


def _counting_arrays(limit: int) -> Callable[[Any], Any]:
    """A ``list_hook`` that stops decoding at array ``limit + 1``: a payload of scalar
    records has one array a record and one around them, so no more can be plain, and
    nested arrays (48 bytes a byte as tuples) are never built in bulk on the fast path."""
    counter = itertools.count(1)

    def hook(array: Any) -> Any:
        if next(counter) > limit:
            raise _NotPlain
        return array

    return hook


class _NotPlain(Exception):
    """Stops :meth:`Codec._decode_plain_records` at the first extension type."""


def _not_plain(code: int, data: bytes) -> Any:
    raise _NotPlain


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, RecordEncodeError | TypeError) and str(exc).startswith("cannot encode"):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "cannot encode record: it nests too deep"
    return f"cannot encode record: {type(exc).__name__}: {exc}"


class Codec:
    """Encodes and decodes records and single values; see the module documentation.

    ``max_depth`` bounds how deeply containers nest in one key, value or meta (both ways).
    With ``pause_gc`` (the default), the cyclic garbage collector is held off while a chunk
    of more than 256 records is encoded or decoded, which doubles decoding speed; see
    :func:`gc_paused`.

    Register user types before the codec is first used from several threads: encoding and
    decoding are thread-safe, registration is not.
    """

    def __init__(self, *, max_depth: int = 64, pause_gc: bool = True) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, not {max_depth}")
        self.max_depth = max_depth
        self.pause_gc = pause_gc
        self._encoders: dict[type, _Encoder] = {}
        self._decoders: dict[int, _Decoder] = {}
        self._codes: dict[int, type] = {}
        self._user_classes: set[type] = set()
        self._mro_cache: dict[type, _Encoder] = {}
        self._local = threading.local()
        # One ext hook per nesting level of container extension types, so that the depth of
        # nested unpacking (which recurses through the C unpacker) is bounded.
        self._hooks = [self._make_hook(level) for level in range(max_depth + 1)]
        # Whether the last payload decoded held only scalar fields: if so, the next one is
        # first tried on the fast path (a hint, so unsynchronised: a stale value costs time).
        self._plain_hint = True
        self._install_builtins()

    # -- registration ---------------------------------------------------------------------

    def register(
        self,
        cls: type,
        code: int,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
    ) -> None:
        """Teach the codec a type: ``encode(obj) -> bytes`` and ``decode(bytes) -> obj``.

        ``code`` is the msgpack extension type code, 64..127 (1..63 are the library's); both
        ends of a handoff must register the same class under the same code. The class is
        matched exactly first, then through the MRO, so registering a base class covers its
        subclasses. ``decode`` gets untrusted bytes: it must raise on anything malformed
        (any exception becomes a :class:`~handoff._errors.RecordDecodeError`).
        """
        if not isinstance(code, int) or code not in USER_CODES:
            raise ValueError(
                f"extension code {code!r} for {cls.__name__} is out of range: user types use "
                f"64..127 (1..63 are reserved for warm-handoff)"
            )
        if code in self._decoders:
            owner = self._codes[code]
            raise ValueError(
                f"extension code {code} is already registered for {owner.__module__}."
                f"{owner.__qualname__}; choose another code for {cls.__name__}"
            )
        if cls in _NATIVE:
            raise ValueError(
                f"{cls.__name__} is encoded natively by msgpack and cannot be registered"
            )
        if cls in self._encoders:
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} already has an encoder"
                + ("" if cls in self._user_classes else " (built in)")
            )

        name = cls.__name__

        def encode_ext(obj: Any) -> msgpack.ExtType:
            data = encode(obj)
            if not isinstance(data, bytes):
                raise RecordEncodeError(
                    f"cannot encode value of type {name}: its encoder returned "
                    f"{type(data).__name__}, not bytes"
                )
            return msgpack.ExtType(code, data)

        def decode_ext(data: bytes, level: int) -> Any:
            # A decoder may call Codec.unpackb for its parts: that call continues counting
            # nesting from here, so user types nested in user types stay bounded too.
            local = self._local
            outer = getattr(local, "user_level", 0)
            local.user_level = level + 1
            try:
                return decode(data)
            finally:
                local.user_level = outer

        self._encoders[cls] = encode_ext
        self._decoders[code] = decode_ext
        self._codes[code] = cls
        self._user_classes.add(cls)
        self._mro_cache.clear()

    def _add(self, cls: type, code: int | None, encode: _Encoder, decode: _Decoder | None) -> None:
        self._encoders[cls] = encode
        if code is not None and decode is not None:
            self._decoders[code] = decode
            self._codes[code] = cls

    def _install_builtins(self) -> None:
        # Subclasses of native types: convert to the exact base (the base methods copy, and
        # ignore overridden __str__ / __int__ of enums).
        self._add(str, None, str.__str__, None)
        self._add(bytes, None, bytes.__bytes__, None)
        self._add(float, None, float.__float__, None)
        self._add(int, EXT_BIGINT, self._encode_int, self._decode_bigint)
        self._add(list, None, list, None)
        self._add(dict, None, lambda obj: dict(obj.items()), None)

        def container(code: int, build: Callable[[list[Any]], Any]) -> _Decoder:
            def decode(data: bytes, level: int) -> Any:
                items = self._unpack(data, level + 1)
                if type(items) is not list:
                    raise RecordDecodeError(f"extension type {code} does not hold an array")
                return build(items)

            return decode

        self._add(
            tuple,
            EXT_TUPLE,
            lambda obj: msgpack.ExtType(EXT_TUPLE, self._pack_inner(list(obj))),
            container(EXT_TUPLE, tuple),
        )
        self._add(
            set,
            EXT_SET,
            lambda obj: msgpack.ExtType(EXT_SET, self._pack_inner(list(obj))),
            container(EXT_SET, set),
        )
        self._add(
            frozenset,
            EXT_FROZENSET,
            lambda obj: msgpack.ExtType(EXT_FROZENSET, self._pack_inner(list(obj))),
            container(EXT_FROZENSET, frozenset),
        )
        self._add(dt.datetime, EXT_DATETIME, self._encode_datetime, self._decode_datetime)
        self._add(
            dt.date,
            EXT_DATE,
            lambda d: msgpack.ExtType(EXT_DATE, _DATE.pack(d.year, d.month, d.day)),
            lambda data, level: dt.date(*_DATE.unpack(data)),
        )
        self._add(dt.time, EXT_TIME, self._encode_time, self._decode_time)
        self._add(
            dt.timedelta,
            EXT_TIMEDELTA,
            lambda t: msgpack.ExtType(
                EXT_TIMEDELTA, _TIMEDELTA.pack(t.days, t.seconds, t.microseconds)
            ),
            lambda data, level: dt.timedelta(*_TIMEDELTA.unpack(data)),
        )
        self._add(decimal.Decimal, EXT_DECIMAL, _encode_decimal, self._decode_decimal)
        self._add(
            uuid.UUID,
            EXT_UUID,
            lambda u: msgpack.ExtType(EXT_UUID, u.bytes),
            lambda data, level: uuid.UUID(bytes=data),
        )
        self._add(
            complex,
            EXT_COMPLEX,
            lambda c: msgpack.ExtType(EXT_COMPLEX, _COMPLEX.pack(c.real, c.imag)),
            lambda data, level: complex(*_COMPLEX.unpack(data)),
        )

    # -- encoding -------------------------------------------------------------------------

    def _default(self, obj: Any) -> Any:
        cls = type(obj)
        encoder = self._encoders.get(cls) or self._mro_cache.get(cls)
        if encoder is None:
            for base in cls.__mro__[1:]:
                encoder = self._encoders.get(base)
                if encoder is not None:
                    self._mro_cache[cls] = encoder
                    break
            else:
                # TypeError, as msgpack itself raises for unsupported types.
                raise TypeError(
                    f"cannot encode value of type {cls.__module__}.{cls.__qualname__}: "
                    f"register an encoder with Codec.register"
                )
        return encoder(obj)

    def _pack(self, obj: object, *, strict: bool = True) -> bytes:
        data: bytes = msgpack.packb(
            obj, default=self._default, use_bin_type=True, strict_types=strict
        )
        return data

    def _pack_inner(self, obj: object) -> bytes:
        # Extension payloads (a tuple's items) are packed while the outer Packer is busy, so
        # each nesting level needs its own Packer; keeping them per thread saves creating one
        # for every tuple, which dominated the cost of tuple-keyed records.
        local = self._local
        try:
            level: int = local.level
            packers: list[Any] = local.packers
        except AttributeError:
            level, packers = 0, []
            local.packers = packers
        if level == len(packers):
            packers.append(
                msgpack.Packer(
                    default=self._default, use_bin_type=True, strict_types=True, buf_size=1024
                )
            )
        local.level = level + 1
        try:
            data: bytes = packers[level].pack(obj)
        finally:
            local.level = level
        return data

    def _encode_int(self, obj: int) -> Any:
        value = int.__int__(obj)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
        if value.bit_length() > MAX_BIGINT_BITS:
            raise RecordEncodeError(
                f"cannot encode value of type int: {value.bit_length()} bits is more than "
                f"the limit of {MAX_BIGINT_BITS}"
            )
        length = (value.bit_length() + 8) // 8  # + 1 bit for the sign, rounded up
        return msgpack.ExtType(EXT_BIGINT, value.to_bytes(length, "big", signed=True))

    def _encode_tz(self, tz: dt.tzinfo | None, owner: str) -> bytes:
        if tz is None:
            return b""
        if type(tz) is dt.timezone:
            offset = tz.utcoffset(None)
            unnamed = dt.timezone(offset)
            name = tz.tzname(None)
            spec: object = [
                offset // dt.timedelta(microseconds=1),
                None if name == unnamed.tzname(None) else name,
            ]
        elif type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
            spec = tz.key
        else:
            raise RecordEncodeError(
                f"cannot encode value of type {owner} with tzinfo {type(tz).__name__}: "
                f"use datetime.timezone or zoneinfo.ZoneInfo, or register an encoder with "
                f"Codec.register"
            )
        return self._pack_inner(spec)

    def _encode_datetime(self, d: dt.datetime) -> msgpack.ExtType:
        fields = _DATETIME.pack(
            d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, d.fold
        )
        return msgpack.ExtType(EXT_DATETIME, fields + self._encode_tz(d.tzinfo, "datetime"))

    def _encode_time(self, t: dt.time) -> msgpack.ExtType:
        fields = _TIME.pack(t.hour, t.minute, t.second, t.microsecond, t.fold)
        return msgpack.ExtType(EXT_TIME, fields + self._encode_tz(t.tzinfo, "time"))

    def packb(self, obj: object) -> bytes:
        """Serialize one value. Raises :class:`~handoff._errors.RecordEncodeError`."""
        reason = _find_problem((obj,), self.max_depth)
        if reason is not None:
            raise RecordEncodeError(f"cannot encode value: {reason}")
        try:
            return self._pack(obj)
        except HandoffError:
            raise
        except Exception as exc:
            raise RecordEncodeError(_describe_failure(exc)) from exc

    def fingerprint_encoder(self) -> Callable[[object], bytes]:
        """A fast serializer for fingerprints of state (never for the wire): one reused
        Packer, tuples packed as arrays, what it cannot pack (big integers) through
        :meth:`packb`. Its bytes tell apart what ``hash()`` does not (-1 and -2; 1, 1.0 and
        True; an object hashed by identity and mutated in place). Not thread-safe: take
        one per fingerprint."""
        pack = msgpack.Packer(default=self._default, use_bin_type=True, strict_types=False).pack
        packb = self.packb

        def encode(obj: object) -> bytes:
            try:
                data: bytes = pack(obj)
            except Exception:
                return packb(obj)
            return data

        return encode

    def encode_records(self, records: Sequence[Record]) -> tuple[bytes, list[tuple[Record, str]]]:
        """Serialize records as one msgpack array of ``[key, value, meta]`` arrays.

        Returns the payload and the records left out, each with the reason it could not be
        encoded; every other record is in the payload. The whole chunk is packed in one call;
        only if that fails is it packed record by record to find the culprits.
        """
        failed: list[tuple[Record, str]] = []
        if not records:
            return _array_header(0), failed
        with self._maybe_pause_gc(len(records)):
            return self._encode_records(records, failed)

    def _maybe_pause_gc(self, records: int) -> AbstractContextManager[None]:
        if self.pause_gc and records > _GC_PAUSE_MIN_RECORDS:
            return gc_paused()
        return nullcontext()

    def _encode_records(
        self, records: Sequence[Record], failed: list[tuple[Record, str]]
    ) -> tuple[bytes, list[tuple[Record, str]]]:
        # All checks below are single C-level passes. The common case, records of exact
        # str/bytes/int/float/bool/None fields, is packed as it is: without nested tuples
        # strict typing changes nothing, and no per-record list has to be built.
        if (
            _RECORD_TYPES.issuperset(map(type, records))
            and set(map(len, records)) == {3}
            and _SCALARS.issuperset(map(type, chain.from_iterable(records)))
        ):
            try:
                return self._pack(records, strict=False), failed
            except Exception:
                return self._encode_one_by_one(records, failed)
        try:
            rows = [[key, value, meta] for key, value, meta in records]
        except (TypeError, ValueError):
            return self._encode_one_by_one(records, failed)
        if _find_problem(chain.from_iterable(rows), self.max_depth) is not None:
            return self._encode_one_by_one(records, failed)
        try:
            return self._pack(rows), failed
        except Exception:
            return self._encode_one_by_one(records, failed)

    def _check_row(self, row: list[Any]) -> str | None:
        for field in row:
            reason = _find_problem((field,), self.max_depth)
            if reason is not None:
                return f"cannot encode record: {reason}"
        return None

    def _encode_one_by_one(
        self, records: Iterable[Record], failed: list[tuple[Record, str]]
    ) -> tuple[bytes, list[tuple[Record, str]]]:
        pairs: list[tuple[Record, list[Any]]] = []
        for record in records:
            try:
                key, value, meta = record
            except (TypeError, ValueError):
                failed.append((record, "not a (key, value, meta) record"))
                continue
            row = [key, value, meta]
            reason = self._check_row(row)
            if reason is None:
                pairs.append((record, row))
            else:
                failed.append((record, reason))
        return self._encode_rows(pairs, failed)

    def _encode_rows(
        self, pairs: list[tuple[Record, list[Any]]], failed: list[tuple[Record, str]]
    ) -> tuple[bytes, list[tuple[Record, str]]]:
        parts: list[bytes] = []
        for record, row in pairs:
            try:
                parts.append(self._pack(row))
            except Exception as exc:
                failed.append((record, _describe_failure(exc)))
        return _array_header(len(parts)) + b"".join(parts), failed

    # -- decoding -------------------------------------------------------------------------

    def _make_hook(self, level: int) -> Callable[[int, bytes], Any]:
        def hook(code: int, data: bytes) -> Any:
            decoder = self._decoders.get(code)
            if decoder is None:
                raise RecordDecodeError(f"unknown msgpack extension type {code}")
            try:
                value = decoder(data, level)
            except HandoffError:
                raise
            except Exception as exc:
                # Any failure of a decoder (built in or user) on untrusted bytes is the
                # payload's fault.
                raise RecordDecodeError(
                    f"malformed extension type {code} ({type(exc).__name__}: {exc})"
                ) from None
            # Counted before the caller (msgpack building a dict, a set's constructor, the
            # receiving cache) can insert it anywhere.
            budget: _Budget = self._local.budget
            return budget.charge_hashable(value)

        return hook

    def _unpack(
        self, data: bytes, level: int, *, ext_hook: Callable[[int, bytes], Any] | None = None
    ) -> Any:
        if level > self.max_depth:
            raise RecordDecodeError(f"record nests deeper than {self.max_depth} levels")
        size = len(data)
        local = self._local
        # One budget for a payload and every extension value nested in it.
        budget: _Budget | None = getattr(local, "budget", None)
        outermost = budget is None
        if budget is None:
            budget = local.budget = _Budget(size)
        try:
            return msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=False,
                ext_hook=self._hooks[level] if ext_hook is None else ext_hook,
                list_hook=budget.charge,
                object_hook=budget.charge,
                **size_limits(size),
            )
        except HandoffError:
            raise
        except (
            ValueError,
            TypeError,
            OverflowError,
            RecursionError,
            msgpack.UnpackException,
        ) as exc:
            # ValueError covers truncation, extra data, bad bytes, the C stack limit and
            # invalid UTF-8; TypeError an unhashable map key.
            raise RecordDecodeError(f"malformed payload ({type(exc).__name__}: {exc})") from None
        finally:
            if outermost:
                local.budget = None

    def _decode_bigint(self, data: bytes, level: int) -> int:
        if not data or len(data) * 8 > MAX_BIGINT_BITS + 8:
            raise RecordDecodeError(f"extension type {EXT_BIGINT} has {len(data)} bytes")
        return int.from_bytes(data, "big", signed=True)

    def _decode_tz(self, data: bytes, level: int) -> dt.tzinfo | None:
        if not data:
            return None
        # A time zone is a leaf: its spec holds no extension types, so none may recurse here.
        spec = self._unpack(data, level, ext_hook=_refuse_ext)
        if type(spec) is str:
            return zoneinfo.ZoneInfo(spec)
        if (
            type(spec) is list
            and len(spec) == 2
            and type(spec[0]) is int
            and (spec[1] is None or type(spec[1]) is str)
        ):
            offset = dt.timedelta(microseconds=spec[0])
            return dt.timezone(offset) if spec[1] is None else dt.timezone(offset, spec[1])
        raise RecordDecodeError("malformed time zone")

    def _decode_datetime(self, data: bytes, level: int) -> dt.datetime:
        size = _DATETIME.size
        y, mo, d, h, mi, s, us, fold = _DATETIME.unpack(data[:size])
        tz = self._decode_tz(data[size:], level)
        return dt.datetime(y, mo, d, h, mi, s, us, tzinfo=tz, fold=fold)

    def _decode_time(self, data: bytes, level: int) -> dt.time:
        size = _TIME.size
        h, mi, s, us, fold = _TIME.unpack(data[:size])
        tz = self._decode_tz(data[size:], level)
        return dt.time(h, mi, s, us, tzinfo=tz, fold=fold)

    def _decode_decimal(self, data: bytes, level: int) -> decimal.Decimal:
        # A sign, a point, an exponent of a few digits: anything longer has too many digits.
        if len(data) > MAX_DECIMAL_DIGITS + 16:
            raise PayloadRefused(f"a Decimal of more than {MAX_DECIMAL_DIGITS} digits")
        value = decimal.Decimal(data.decode("ascii"))
        problem = _check_decimal(value)
        if problem is not None:
            raise PayloadRefused(problem)
        return value

    def unpackb(self, data: bytes) -> object:
        """Deserialize one value. Raises :class:`~handoff._errors.RecordDecodeError`."""
        obj = self._unpack(data, getattr(self._local, "user_level", 0))
        reason = _find_problem((obj,), self.max_depth, shared=bool(self._user_classes))
        if reason is not None:
            raise RecordDecodeError(reason)
        return obj

    def decode_records(self, payload: bytes, *, max_records: int) -> list[Record]:
        """Deserialize what :meth:`encode_records` produced, refusing anything malformed.

        Raises :class:`~handoff._errors.RecordDecodeError` for a malformed payload, an unknown
        extension type, more than ``max_records`` records, or a key, value or meta that
        nests deeper than ``max_depth``.
        """
        count = _array_length(payload)
        if count > max_records:
            raise RecordDecodeError(f"{count} records in one payload; the limit is {max_records}")
        # By size too: a payload of few records can still hold millions of containers (a
        # bomb), and collections while they are built would triple the time to refuse it.
        with self._maybe_pause_gc(max(count, len(payload) // 256)):
            return self._decode_records(payload)

    def _decode_records(self, payload: bytes) -> list[Record]:
        if self._plain_hint:
            records = self._decode_plain_records(payload)
            if records is not None:
                return records
        rows = self._unpack(payload, 0)
        if type(rows) is not list:
            raise RecordDecodeError("payload is not an array of records")
        plain = True
        if rows:
            if set(map(type, rows)) != {list} or set(map(len, rows)) != {3}:
                raise RecordDecodeError("every record must be a [key, value, meta] array")
            if not _SCALARS.issuperset(map(type, chain.from_iterable(rows))):
                plain = False
                reason = _find_problem(
                    chain.from_iterable(rows), self.max_depth, shared=bool(self._user_classes)
                )
                if reason is not None:
                    raise RecordDecodeError(reason)
        self._plain_hint = plain
        return list(map(tuple, rows))

    def _decode_plain_records(self, payload: bytes) -> list[Record] | None:
        """The records of a payload that holds only scalar fields, or ``None`` otherwise.

        The common case, decoded straight into tuples (msgpack's ``use_list=False``), with
        no per-record conversion. It accepts a payload only if every record is an array of
        three fields of exact ``str``/``bytes``/``int``/``float``/``bool``/``None`` types
        and there is no extension type anywhere (the first one stops decoding, before any
        decoder runs), so that it returns exactly what the general path would. Anything
        else, malformed payloads included, is left to the general path, which decides (and
        words any error): this path never accepts or refuses what the general one would not.
        """
        size = len(payload)
        try:
            rows = msgpack.unpackb(
                payload,
                raw=False,
                use_list=False,
                strict_map_key=False,
                ext_hook=_not_plain,
                # A map is never plain, and its keys could be tuples (arrays) that collide.
                object_hook=_not_plain_map,
                list_hook=_counting_arrays(_array_length(payload) + 1),
                **size_limits(size),
            )
        except Exception:
            self._plain_hint = False
            return None
        # Arrays decode as tuples here, and only arrays do (an extension type stopped the
        # decoding above; msgpack's own Timestamp is no tuple and no scalar): a record that
        # is a tuple is an array, and a field of one of the scalar types holds nothing.
        if type(rows) is not tuple or (
            rows
            and (
                set(map(type, rows)) != {tuple}
                or set(map(len, rows)) != {3}
                or not _SCALARS.issuperset(map(type, chain.from_iterable(rows)))
            )
        ):
            self._plain_hint = False
            return None
        return list(rows)
