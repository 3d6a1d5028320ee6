"""Settings of a node: explicit arguments, then ``HANDOFF_*`` variables, then the platform.

:func:`resolve_settings` turns whatever the application passed to ``Node(...)`` plus the
process environment into one validated, immutable :class:`Settings`. For every setting the
first of these that says something wins:

1. the explicit argument (``Node(cluster="shop")``);
2. the ``HANDOFF_*`` environment variable (``HANDOFF_CLUSTER=shop``);
3. platform detection: Fly.io (``FLY_APP_NAME`` is set) or Kubernetes
   (``KUBERNETES_SERVICE_HOST`` is set);
4. the built-in default.

An environment variable that is set to an empty (or whitespace-only) string counts as unset,
because deploy templates often render optional variables that way.

Every problem is a :class:`~handoff.ConfigError` raised at start, before the node listens,
whose message names the argument and the environment variable, says what is wrong with the
value and how to fix it. The cookie is never echoed in messages, ``repr`` or :func:`describe`.

Drain deadlines: the default ``drain_timeout`` stays below the platform's grace period
(4 s on Fly, whose ``kill_timeout`` defaults to 5 s; 25 s on Kubernetes, whose
``terminationGracePeriodSeconds`` defaults to 30 s). To give a drain more time, raise both
together: ``kill_timeout`` in ``fly.toml`` (or ``terminationGracePeriodSeconds``) and
``HANDOFF_DRAIN_TIMEOUT``, keeping the latter a second or more below the former.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar, cast

from ._errors import ConfigError
from .discovery._spec import DiscoverySpec, parse_discovery_spec, parse_host_port
from .snapshot_s3 import DEFAULT_KEEP, DEFAULT_LEASE, DEFAULT_MAX_AGE, parse_snapshot_url

__all__ = (
    "COOKIE_HOWTO",
    "DEFAULT_PORT",
    "DEFAULT_PORT_RANGE",
    "ENVIRONMENT_VARIABLES",
    "PLATFORM_VARIABLES",
    "Platform",
    "Settings",
    "TLSFiles",
    "control_directory",
    "default_control_socket",
    "describe",
    "for_worker",
    "resolve_settings",
    "unknown_variables",
    "worker_ports",
)

Platform = Literal["fly", "kubernetes", "local"]

#: The port a node listens on unless told otherwise.
DEFAULT_PORT = 4370
#: Ports a node tries from its configured one on (4370..4385), and discovery probes on every
#: address it finds: several worker processes of one machine each take the next free one.
DEFAULT_PORT_RANGE = 16
_MAX_PORT_RANGE = 256

_DEFAULT_DNS_PORT = 53
_DEFAULT_RELEASE = "unversioned"
_DEFAULT_WARMUP_TIMEOUT = 10.0
_DEFAULT_HEARTBEAT_TIMEOUT = 3.0
_DEFAULT_POLL_INTERVAL = 5.0
_DEFAULT_HANDSHAKE_TIMEOUT = 5.0
_DEFAULT_CONNECT_TIMEOUT = 2.0
# Each below the platform's grace period, leaving time to exit after the drain report.
_DEFAULT_DRAIN_TIMEOUT: Mapping[Platform, float] = MappingProxyType(
    {"fly": 4.0, "kubernetes": 25.0, "local": 10.0}
)
# Long enough for any sane name, short enough to keep log lines and handshakes small.
_MAX_NAME_LENGTH = 128
# Short secrets can be guessed offline from one captured challenge/response.
_MIN_COOKIE_BYTES = 16
# sun_path holds 108 bytes on Linux (104 on macOS) including the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 103

COOKIE_HOWTO = (
    'Generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))". '
    "On Fly.io: fly secrets set HANDOFF_COOKIE=<value>. On Kubernetes: put it in a Secret "
    "and expose it with env: [{name: HANDOFF_COOKIE, valueFrom: {secretKeyRef: ...}}]."
)

_K8S_NO_DISCOVERY_WARNING = (
    "running on Kubernetes without HANDOFF_DISCOVERY: set "
    "HANDOFF_DISCOVERY=dns:<headless-service>.<namespace>.svc.cluster.local "
    "(with publishNotReadyAddresses: true) so that nodes find each other"
)


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for mutual TLS: this node's certificate and key, and the CA for peers."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved, validated configuration of one node. Build it with :func:`resolve_settings`.

    ``advertise_host`` is the address peers should dial and that identifies this node;
    ``None`` when nothing says (the node listens on a wildcard address off any platform).
    ``control_socket`` is the Unix socket the node serves the CLI on (``None``: none).
    ``port_range`` is how many ports from ``bind_port`` on a node may take (the first free
    one; several workers per machine) and discovery probes on each address it finds.
    ``warnings`` are advisories the node logs at start. ``sources`` maps each setting name
    (as in :func:`describe`) to where its value came from.
    """

    cluster: str
    cookie: bytes = field(repr=False)
    release: str
    node_name: str
    bind_host: str
    bind_port: int
    advertise_host: str | None
    discovery: DiscoverySpec
    dns_server: tuple[str, int] | None
    snapshot_dir: Path | None
    drain_timeout: float
    warmup_timeout: float
    tls: TLSFiles | None
    heartbeat_interval: float
    heartbeat_timeout: float
    handshake_timeout: float
    connect_timeout: float
    poll_interval: float
    platform: Platform
    region: str | None
    fly_app: str | None
    control_socket: Path | None = None
    port_range: int = DEFAULT_PORT_RANGE
    snapshot_url: str | None = None
    """``HANDOFF_SNAPSHOT_URL``: snapshots on object storage (``s3://BUCKET/PREFIX``)."""
    precopy: float = 0.0
    """Pre-copy to newer nodes: 0 off, ``math.inf`` unpaced, else bytes per second."""
    warnings: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )


# -- the ladder ------------------------------------------------------------------------------
#
# Every setting is one _Setting row; resolve_settings walks _LADDER once, in order, and for
# each row takes the first rung that says something: the argument, the HANDOFF_* variable,
# the value detected on the platform (all three go through the row's parser, so a value
# from anywhere is checked alike), else the row's built-in default. The order matters: a
# row may read rows before it (advertise reads bind) and its check runs as soon as it is
# resolved, so the first problem reported is the same whatever else is wrong.

T = TypeVar("T")


@dataclass(slots=True)
class _Context:
    """What the ladder knows while it resolves: the platform and the settings so far."""

    environ: Mapping[str, str]
    platform: Platform
    fly_app: str | None
    region: str | None
    pod_ip: str | None
    values: dict[str, object] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> _Context:
        """Fly.io when ``FLY_APP_NAME`` is set, else Kubernetes, else local."""
        fly_app = _env(environ, "FLY_APP_NAME")
        platform: Platform
        if fly_app is not None:
            platform = "fly"
        elif _env(environ, "KUBERNETES_SERVICE_HOST") is not None:
            platform = "kubernetes"
        else:
            platform = "local"
        region = _env(environ, "FLY_REGION") if platform == "fly" else None
        pod_ip = _env(environ, "POD_IP") if platform == "kubernetes" else None
        context = cls(environ, platform, fly_app, region, pod_ip)
        context.sources["platform"] = platform if platform != "local" else "default"
        context.sources["region"] = "fly" if region is not None else "default"
        context.sources["fly_app"] = "fly" if fly_app is not None else "default"
        return context

    def env(self, name: str) -> str | None:
        """The stripped value of ``name``; ``None`` when unset or blank."""
        return _env(self.environ, name)

    def value(self, setting: _Setting[T]) -> T:
        """The resolved value of an earlier row."""
        return cast(T, self.values[setting.key])


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a value being parsed came from, for error messages."""

    setting: _Setting[Any]
    source: str  # "argument", the HANDOFF_* variable, "fly", "kubernetes" or "default"
    detail: str = ""  # the platform variable behind a detected value, if any

    @property
    def label(self) -> str:
        return self.setting.label

    @property
    def whence(self) -> str:
        # The label already names the argument and HANDOFF_* variable; a value the platform
        # supplied needs its own variable named, or the user cannot find where it came from.
        return f" (from {self.detail})" if self.detail else ""


def _undetected(context: _Context) -> None:
    return None


@dataclass(frozen=True, slots=True)
class _Setting(Generic[T]):
    """One setting's ladder: its argument, then ``env``, then ``platform``, then ``default``.

    ``parse`` checks and converts a value from any of the first three (an argument keeps its
    Python type; the others are strings, or what ``platform`` returns). ``platform`` returns
    ``(value, variable it came from)`` or ``None``. ``default`` builds the value when nothing
    says (it may raise, or add a warning). ``check`` runs once the row is resolved, for rules
    that involve other rows. ``blank_is_unset``: an empty variable counts as unset.
    """

    key: str  # the name in Settings.sources and describe()
    env: str
    doc: str  # what the variable means, for ENVIRONMENT_VARIABLES
    parse: Callable[[Any, _Origin], T]
    default: Callable[[_Context], T]
    platform: Callable[[_Context], tuple[object, str] | None] = _undetected
    check: Callable[[_Context], None] | None = None
    blank_is_unset: bool = True
    keyword: str = ""  # of resolve_settings() and Node(), when it is not the key

    @property
    def argument(self) -> str:
        return self.keyword or self.key

    @property
    def label(self) -> str:
        return f"{self.env} (Node({self.argument}=...))"

    def resolve(self, context: _Context, argument: object) -> None:
        """Find, check and record this setting's value and source in ``context``."""
        found: tuple[object, str, str] | None = None
        if argument is not None:
            found = (argument, "argument", "")
        elif (text := self._from_env(context)) is not None:
            found = (text, self.env, "")
        elif (detected := self.platform(context)) is not None:
            found = (detected[0], context.platform, detected[1])
        if found is None:
            context.sources[self.key] = "default"
            context.values[self.key] = self.default(context)
        else:
            value, source, detail = found
            context.sources[self.key] = source
            context.values[self.key] = self.parse(value, _Origin(self, source, detail))
        if self.check is not None:
            self.check(context)

    def _from_env(self, context: _Context) -> str | None:
        if self.blank_is_unset:
            return context.env(self.env)
        return context.environ.get(self.env)


# -- parsers: (value, origin) -> checked value ------------------------------------------------


def _short(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _name(what: str) -> Callable[[str, _Origin], str]:
    def parse(value: str, origin: _Origin) -> str:
        label, whence = origin.label, origin.whence
        value = value.strip()
        if not value:
            raise ConfigError(f"{label}: the {what} is empty; set a non-empty {what}")
        if len(value) > _MAX_NAME_LENGTH:
            raise ConfigError(
                f"{label}{whence}: the {what} {_short(value)} is {len(value)} "
                f"characters long; use at most {_MAX_NAME_LENGTH}"
            )
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ConfigError(
                f"{label}{whence}: the {what} {_short(value)} contains whitespace "
                "or unprintable characters; use letters, digits and punctuation such as - _ ."
            )
        return value

    return parse


def _cookie(raw: object, origin: _Origin) -> bytes:
    label = origin.label
    if not isinstance(raw, str | bytes):
        raise ConfigError(f"{label}: the cookie must be str or bytes, not {type(raw).__name__}")
    if not raw:
        raise ConfigError(f"{label}: the cookie is empty. {COOKIE_HOWTO}")
    # Env files and secret mounts often carry a trailing newline: strip it the same way for
    # every input so that nodes configured differently still agree on the secret.
    cookie = raw.strip().encode() if isinstance(raw, str) else raw.strip()
    if not cookie:
        raise ConfigError(f"{label}: the cookie is only whitespace. {COOKIE_HOWTO}")
    if len(cookie) < _MIN_COOKIE_BYTES:
        raise ConfigError(
            f"{label}: the cookie is {len(cookie)} bytes long; use at least "
            f"{_MIN_COOKIE_BYTES} (a short secret can be guessed offline from a captured "
            f"handshake). {COOKIE_HOWTO}"
        )
    return cookie


def _is_unspecified(host: str) -> bool:
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _host_port(text: str, *, context: str, default_port: int | None) -> tuple[str, int]:
    try:
        return parse_host_port(text, context=context, default_port=default_port)
    except ValueError as exc:
        # parse_host_port lets int() errors through for some inputs (e.g. '²' passes
        # str.isdigit); the user must still get a ConfigError that names the setting.
        raise ConfigError(
            f"{context}: {_short(text)} has a port that is not a number between 1 and 65535"
        ) from exc


def _bind(text: str, origin: _Origin) -> tuple[str, int]:
    context = origin.label
    text = text.strip()
    head, sep, port = text.rpartition(":")
    # Port 0 (pick a free port, for tests) is outside what parse_host_port accepts; only
    # a real port suffix counts, not the last group of a bare IPv6 address like '::0'.
    if sep and head and port == "0" and (head.endswith("]") or ":" not in head):
        host, _ = _host_port(f"{head}:1", context=context, default_port=None)
        port_number = 0
    else:
        host, port_number = _host_port(text, context=context, default_port=DEFAULT_PORT)
    if any(c.isspace() for c in host):
        raise ConfigError(f"{context}: the host in {_short(text)} contains whitespace")
    return host, port_number


def _advertise(text: str, origin: _Origin) -> str:
    label, whence = origin.label, origin.whence
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"{label}: the advertised host is empty; give an IP address or name")
    if any(c.isspace() or not c.isprintable() for c in host) or "[" in host or "]" in host:
        raise ConfigError(
            f"{label}{whence}: {_short(text)} is not a host; give an IP address or DNS name"
        )
    if host.count(":") == 1:
        raise ConfigError(
            f"{label}{whence}: {_short(text)} looks like HOST:PORT; give only "
            "the host (peers dial it on the bind port)"
        )
    if _is_unspecified(host):
        raise ConfigError(
            f"{label}{whence}: {_short(text)} is a wildcard address that "
            "peers cannot dial; give this node's own IP address or name"
        )
    return host


def _discovery(value: str | DiscoverySpec, origin: _Origin) -> DiscoverySpec:
    if isinstance(value, DiscoverySpec):
        return value
    context = origin.label
    try:
        return parse_discovery_spec(value, context=context)
    except ValueError as exc:
        # See _host_port: stray int() errors still have to name the setting.
        raise ConfigError(
            f"{context}: {_short(value)} has a port that is not a number between 1 and 65535"
        ) from exc


def _dns_server(text: str, origin: _Origin) -> tuple[str, int]:
    context = origin.label
    host, port = _host_port(text, context=context, default_port=_DEFAULT_DNS_PORT)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{context}: {host!r} is not an IP address; give the DNS server as IP[:PORT] or "
            "[IPV6]:PORT, e.g. 10.96.0.10 or [fdaa::3]:53"
        ) from None
    return host, port


def _precopy(value: object, origin: _Origin) -> float:
    label = origin.label
    if isinstance(value, bool):
        return math.inf if value else 0.0
    if isinstance(value, str) and origin.source != "argument":
        text = value
        word = text.strip().lower()
        if word in ("off", "false", "0", "no"):
            return 0.0
        if word in ("on", "true", "yes"):
            return math.inf
        try:
            value = float(word)
        except ValueError:
            raise ConfigError(
                f"{label}: {_short(text)} is not on, off or a number of bytes per second, "
                f"e.g. {origin.setting.env}=on or 20000000"
            ) from None
    if not isinstance(value, int | float) or not value > 0 or math.isnan(value):
        raise ConfigError(
            f"{label}: {value!r} is not usable; give True, False or a number of bytes per "
            "second greater than 0"
        )
    return float(value)


def _seconds(value: object, origin: _Origin) -> float:
    label = origin.label
    seconds: float
    if isinstance(value, str) and origin.source != "argument":
        try:
            seconds = float(value)
        except ValueError:
            env = origin.setting.env
            raise ConfigError(
                f"{label}: {_short(value)} is not a number; give seconds, e.g. {env}=5 or 2.5"
            ) from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{label}: expected a number of seconds, got {type(value).__name__}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"{label}: {value!r} is not a usable time; give a finite number of seconds "
            "greater than 0"
        )
    return seconds


def _port_range(value: object, origin: _Origin) -> int:
    label = origin.label
    if isinstance(value, str) and origin.source != "argument":
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(
                f"{label}: {_short(value)} is not a whole number; give how many ports a "
                f"node may try from its own on, e.g. {origin.setting.env}={DEFAULT_PORT_RANGE}"
            )
        count = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label}: expected a whole number of ports, got {type(value).__name__}")
    else:
        count = value
    if not 1 <= count <= _MAX_PORT_RANGE:
        raise ConfigError(
            f"{label}: {count!r} is not between 1 and {_MAX_PORT_RANGE}; 1 means exactly the "
            "bind port (one node per address), more lets worker processes of one machine "
            "take the following ports"
        )
    return count


def worker_ports(port: int, count: int) -> range:
    """The ports a node bound to ``port`` may take, in order, and that discovery probes:
    ``port`` .. ``port + count - 1`` (cut at 65535); only ``port`` itself for port 0."""
    if port == 0:
        return range(0, 1)
    return range(port, min(port + count, 65536))


def _path(value: str | os.PathLike[str], origin: _Origin) -> Path:
    return Path(value)


def _control_socket(value: str | os.PathLike[str], origin: _Origin) -> Path | None:
    label = origin.label
    text = os.fspath(value).strip()
    if text.lower() == "none":
        return None
    if "\0" in text:
        raise ConfigError(f"{label}: the path contains a NUL character")
    if not text.startswith("/"):
        raise ConfigError(
            f"{label}: {_short(text)} is not an absolute path; give one (the CLI may run "
            "from another directory), e.g. /run/handoff/shop.sock, or 'none' to disable"
        )
    if len(os.fsencode(text)) > _MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{label}: {_short(text)} is {len(os.fsencode(text))} bytes long; Unix socket "
            f"paths may have at most {_MAX_SOCKET_PATH_BYTES}: use a shorter path"
        )
    return Path(text)


# -- what the platform says, defaults and checks that span rows --------------------------------


def _release_from_image_ref(ref: str) -> str:
    """``registry.fly.io/app:deployment-01H...`` -> ``deployment-01H...``; no tag: the ref."""
    name = ref.partition("@")[0]
    # Only a colon in the last path segment is a tag; earlier ones are a registry port.
    last = name.rsplit("/", 1)[-1]
    _, sep, tag = last.rpartition(":")
    return tag if sep and tag else ref


def _no_cookie(context: _Context) -> bytes:
    raise ConfigError(
        f"{_COOKIE.label}: no cookie. The cookie is a shared secret that every node of the "
        f"cluster needs (the same value everywhere); there is no default. {COOKIE_HOWTO}"
    )


def _fly_cluster(context: _Context) -> tuple[object, str] | None:
    return None if context.fly_app is None else (context.fly_app, "FLY_APP_NAME")


def _no_cluster(context: _Context) -> str:
    raise ConfigError(
        "no cluster name: pass Node(cluster=...) or set HANDOFF_CLUSTER; nodes only "
        "join peers of the same cluster"
    )


def _fly_release(context: _Context) -> tuple[object, str] | None:
    image_ref = context.env("FLY_IMAGE_REF") if context.platform == "fly" else None
    return None if image_ref is None else (_release_from_image_ref(image_ref), "FLY_IMAGE_REF")


def _platform_node_name(context: _Context) -> tuple[object, str] | None:
    if context.platform == "fly":
        machine = context.env("FLY_MACHINE_ID") or context.env("FLY_ALLOC_ID")
        return None if machine is None else (machine, "FLY_MACHINE_ID")
    if context.platform == "kubernetes":
        pod_name = context.env("HOSTNAME")
        return (pod_name if pod_name is not None else socket.gethostname()), "HOSTNAME"
    return None


def _local_node_name(context: _Context) -> str:
    return _host_pid_name(os.getpid())


def _host_pid_name(pid: int) -> str:
    # Hostnames can be long or (on desktops) contain spaces; a default must always validate,
    # and it goes through the same check as a given name in case it does not.
    host = "-".join(socket.gethostname().split()) or "localhost"
    return _NODE_NAME.parse(f"{host[:100]}-{pid}", _Origin(_NODE_NAME, "default"))


def _platform_bind(context: _Context) -> tuple[object, str] | None:
    if context.platform == "fly":
        return f"[::]:{DEFAULT_PORT}", ""
    if context.platform == "kubernetes":
        pod_ip = context.pod_ip
        host = "[::]" if pod_ip is not None and _is_ipv6(pod_ip) else "0.0.0.0"
        return f"{host}:{DEFAULT_PORT}", ""
    return None


def _platform_advertise(context: _Context) -> tuple[object, str] | None:
    if context.platform == "fly" and (private_ip := context.env("FLY_PRIVATE_IP")) is not None:
        return private_ip, "FLY_PRIVATE_IP"
    if context.pod_ip is not None:
        return context.pod_ip, "POD_IP"
    return None


def _bind_host_if_specific(context: _Context) -> str | None:
    bind_host, _ = context.value(_BIND)
    return None if _is_unspecified(bind_host) else bind_host


def _warn_if_unreachable(context: _Context) -> None:
    bind_host, _ = context.value(_BIND)
    advertise_host = context.value(_ADVERTISE)
    if advertise_host is not None and _is_loopback(bind_host) and not _is_loopback(advertise_host):
        context.warnings.append(
            f"the node listens on loopback ({bind_host}) but advertises {advertise_host}: "
            "peers on other hosts cannot connect; set HANDOFF_BIND to a wildcard address "
            "such as [::]:4370 or 0.0.0.0:4370"
        )


def _fly_discovery(context: _Context) -> tuple[object, str] | None:
    return ("fly", "FLY_APP_NAME") if context.platform == "fly" else None


def _check_discovery(context: _Context) -> None:
    if context.platform == "kubernetes" and context.sources[_DISCOVERY.key] == "default":
        context.warnings.append(_K8S_NO_DISCOVERY_WARNING)
    if context.value(_DISCOVERY).kind == "fly" and context.fly_app is None:
        raise ConfigError(
            f"{_DISCOVERY.label}: 'fly' discovery works only on "
            "Fly.io, where FLY_APP_NAME is set, and it is not set here; off Fly use "
            "'dns:NAME[:PORT]' or 'static:HOST:PORT,...'"
        )


def _platform_drain_timeout(context: _Context) -> tuple[object, str] | None:
    if context.platform == "local":
        return None
    return _DEFAULT_DRAIN_TIMEOUT[context.platform], ""


def _constant(value: T) -> Callable[[_Context], T]:
    return lambda context: value


def _check_heartbeat(context: _Context) -> None:
    interval = context.value(_HEARTBEAT_INTERVAL)
    timeout = context.value(_HEARTBEAT_TIMEOUT)
    if interval >= timeout:
        raise ConfigError(
            f"{_HEARTBEAT_INTERVAL.label} is {interval:g} s but {_HEARTBEAT_TIMEOUT.label} is "
            f"{timeout:g} s: the interval must be shorter than the timeout (a third of it "
            "is usual), or healthy peers are declared down"
        )


def _readable_file(path: Path, label: str) -> None:
    try:
        # Opening is the only reliable test: os.access ignores ACLs and misreports as root.
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(
            f"{label}: file {str(path)!r} does not exist; check the path (relative paths "
            f"are relative to the working directory {os.getcwd()!r})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{label}: {str(path)!r} is a directory; give the path of a PEM file"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{label}: file {str(path)!r} cannot be read (permission denied); make it "
            "readable by the user running the node"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{label}: file {str(path)!r} cannot be opened: {exc.strerror or exc}"
        ) from None


def _check_tls(context: _Context) -> None:
    cert, key, ca = (context.value(s) for s in (_TLS_CERT, _TLS_KEY, _TLS_CA))
    if cert is None and key is None and ca is None:
        return
    if cert is None and key is None:
        raise ConfigError(
            f"{_TLS_CA.label} is set but {_TLS_CERT.label} and {_TLS_KEY.label} are not: TLS "
            "is mutual, so every node needs its own certificate and key as well as the CA; "
            "set all three or none"
        )
    if cert is None or key is None:
        given, missing = (_TLS_CERT, _TLS_KEY) if cert is not None else (_TLS_KEY, _TLS_CERT)
        raise ConfigError(
            f"{given.label} is set but {missing.label} is not: a certificate and its "
            "private key go together; set both (and HANDOFF_TLS_CA) or neither"
        )
    if ca is None:
        raise ConfigError(
            f"{_TLS_CA.label} is not set but a certificate is: TLS is "
            "mutual and peers' certificates are verified against this CA bundle; set it to "
            "the PEM file of the CA that signed the nodes' certificates"
        )
    for setting, path in ((_TLS_CERT, cert), (_TLS_KEY, key), (_TLS_CA, ca)):
        _readable_file(path, setting.label)


def _tls_files(context: _Context) -> TLSFiles | None:
    cert, key, ca = (context.value(s) for s in (_TLS_CERT, _TLS_KEY, _TLS_CA))
    # _check_tls made sure that the three are all set or all unset.
    if cert is None or key is None or ca is None:
        return None
    return TLSFiles(cert=cert, key=key, ca=ca)


def _default_control_socket(context: _Context) -> Path | None:
    path = default_control_socket(context.value(_CLUSTER), context.environ)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        # A default that cannot work must not stop the node: it runs without the CLI.
        context.warnings.append(
            f"{_CONTROL_SOCKET.label}: the default control socket {str(path)!r} is longer "
            f"than Unix sockets allow ({_MAX_SOCKET_PATH_BYTES} bytes); the node runs without "
            "one. Set HANDOFF_CONTROL_SOCKET to a shorter absolute path"
        )
        return None
    return path


# -- the table -------------------------------------------------------------------------------

_COOKIE: _Setting[bytes] = _Setting(
    "cookie",
    "HANDOFF_COOKIE",
    "Required. Shared secret (at least 16 bytes) that every node of the cluster must "
    "have; peers prove they know it before any state moves. Surrounding whitespace is "
    "stripped.",
    parse=_cookie,
    default=_no_cookie,
    # An empty secret is a mistake to report, not a reason to look elsewhere.
    blank_is_unset=False,
)
_CLUSTER: _Setting[str] = _Setting(
    "cluster",
    "HANDOFF_CLUSTER",
    "Cluster name; nodes only join peers of the same cluster. "
    "Default on Fly.io: FLY_APP_NAME. Required elsewhere.",
    parse=_name("cluster name"),
    platform=_fly_cluster,
    default=_no_cluster,
)
_RELEASE: _Setting[str] = _Setting(
    "release",
    "HANDOFF_RELEASE",
    "Release (version) of this node; successors prefer newer releases. Default on "
    "Fly.io: the deployment tag of FLY_IMAGE_REF; elsewhere 'unversioned'.",
    parse=_name("release"),
    platform=_fly_release,
    default=_constant(_DEFAULT_RELEASE),
)
_NODE_NAME: _Setting[str] = _Setting(
    "node_name",
    "HANDOFF_NODE_NAME",
    "Unique name of this node. Default: FLY_MACHINE_ID on Fly.io, the pod name "
    "(HOSTNAME) on Kubernetes, HOST-PID elsewhere. A worker that listens on a port after "
    "its configured one appends -PORT.",
    parse=_name("node name"),
    platform=_platform_node_name,
    default=_local_node_name,
    keyword="name",
)
_BIND: _Setting[tuple[str, int]] = _Setting(
    "bind",
    "HANDOFF_BIND",
    f"Listen address, HOST:PORT or [IPV6]:PORT (a bare host uses port {DEFAULT_PORT}; "
    f"port 0 picks a free port). Default: [::]:{DEFAULT_PORT} on Fly.io, "
    f"0.0.0.0:{DEFAULT_PORT} on Kubernetes ([::] if POD_IP is IPv6), "
    f"127.0.0.1:{DEFAULT_PORT} elsewhere.",
    parse=_bind,
    platform=_platform_bind,
    default=_constant(("127.0.0.1", DEFAULT_PORT)),
)
_PORT_RANGE: _Setting[int] = _Setting(
    "port_range",
    "HANDOFF_PORT_RANGE",
    "How many ports from the bind port on a node may take: when the port is in use "
    "(another worker process of this machine listens there) it takes the next free one, "
    "and appends -PORT to its name and control socket. DNS and 'fly' discovery, and "
    "static hosts given without a port, probe that many ports on every address; 1 turns "
    f"both off. Default: {DEFAULT_PORT_RANGE}.",
    parse=_port_range,
    default=_constant(DEFAULT_PORT_RANGE),
)
_ADVERTISE: _Setting[str | None] = _Setting(
    "advertise",
    "HANDOFF_ADVERTISE",
    "Host (IP address or name) that peers dial to reach this node. Default: "
    "FLY_PRIVATE_IP on Fly.io, POD_IP on Kubernetes, else the bind host if it is a "
    "specific address.",
    parse=_advertise,
    platform=_platform_advertise,
    default=_bind_host_if_specific,
    check=_warn_if_unreachable,
)
_DISCOVERY: _Setting[DiscoverySpec] = _Setting(
    "discovery",
    "HANDOFF_DISCOVERY",
    "How to find peers: 'static:HOST[:PORT],HOST[:PORT]' (a host without a port: the "
    "port range), 'dns:NAME[:PORT]' (A/AAAA, polled, the port range on each address), "
    "'dns:_SERVICE._PROTO.NAME' (SRV), 'fly' (the app's .internal names) or "
    "'none'. Default: 'fly' on Fly.io, 'none' elsewhere.",
    parse=_discovery,
    platform=_fly_discovery,
    default=_constant(DiscoverySpec(kind="none")),
    check=_check_discovery,
)
_DNS_SERVER: _Setting[tuple[str, int] | None] = _Setting(
    "dns_server",
    "HANDOFF_DNS_SERVER",
    "DNS server for discovery, IP[:PORT] or [IPV6]:PORT (default port 53); overrides "
    "/etc/resolv.conf.",
    parse=_dns_server,
    default=_constant(None),
)
_SNAPSHOT_DIR: _Setting[Path | None] = _Setting(
    "snapshot_dir",
    "HANDOFF_SNAPSHOT_DIR",
    "Directory for snapshots of state that no peer could take (put it on a volume to "
    "survive a restart). Default: no snapshots.",
    parse=_path,
    default=_constant(None),
)


def _snapshot_url(value: str, origin: _Origin) -> str:
    text = str(value).strip()
    try:
        # The bucket may come from BUCKET_NAME: checked with the environment below.
        parse_snapshot_url(text, {"BUCKET_NAME": "_"})
    except ValueError as exc:
        raise ConfigError(f"{origin.label}: {exc}") from None
    return text


def _check_snapshot_url(context: _Context) -> None:
    url = context.value(_SNAPSHOT_URL)
    if url is None:
        return
    if context.value(_SNAPSHOT_DIR) is not None:
        raise ConfigError(
            f"{_SNAPSHOT_DIR.label} and {_SNAPSHOT_URL.label} are both set: a node keeps its "
            "snapshots in one store; set the directory (a volume that survives restarts) or "
            "the object storage URL, not both"
        )
    try:
        parse_snapshot_url(url, context.environ)
    except ValueError as exc:
        raise ConfigError(f"{_SNAPSHOT_URL.label}: {exc}") from None


_SNAPSHOT_URL: _Setting[str | None] = _Setting(
    "snapshot_url",
    "HANDOFF_SNAPSHOT_URL",
    "Snapshots on S3-compatible object storage instead of a directory: "
    "s3://BUCKET/PREFIX (s3:///PREFIX takes the bucket from BUCKET_NAME), options "
    f"?keep=N (newest snapshots kept per namespace, default {DEFAULT_KEEP}), "
    f"&max_age=SECONDS (default {DEFAULT_MAX_AGE:g}), &lease=SECONDS (a restorer's claim, "
    f"default {DEFAULT_LEASE:g}). Credentials and endpoint from AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL_S3, AWS_REGION. Needs "
    "pip install 'warm-handoff[s3]'. Not with HANDOFF_SNAPSHOT_DIR. Default: none.",
    parse=_snapshot_url,
    default=_constant(None),
    check=_check_snapshot_url,
)
_DRAIN_TIMEOUT: _Setting[float] = _Setting(
    "drain_timeout",
    "HANDOFF_DRAIN_TIMEOUT",
    "Seconds a drain may take: then streaming stops and the rest is snapshotted (at 3/4 "
    "of it when a snapshot store is set) or counted as dropped. Keep it below the "
    "platform's grace period. Default: 4 on Fly.io (kill_timeout 5 s), 25 on "
    "Kubernetes (terminationGracePeriodSeconds 30 s), 10 elsewhere.",
    parse=_seconds,
    platform=_platform_drain_timeout,
    default=_constant(_DEFAULT_DRAIN_TIMEOUT["local"]),
)
_WARMUP_TIMEOUT: _Setting[float] = _Setting(
    "warmup_timeout",
    "HANDOFF_WARMUP_TIMEOUT",
    f"Seconds a starting node waits for handed-off state before it reports ready. "
    f"Default: {_DEFAULT_WARMUP_TIMEOUT:g}.",
    parse=_seconds,
    default=_constant(_DEFAULT_WARMUP_TIMEOUT),
)
_PRECOPY: _Setting[float] = _Setting(
    "precopy",
    "HANDOFF_PRECOPY",
    "Pre-copy: when a node of a newer release comes up, copy the caches to it while both "
    "serve, and at the drain send only what changed since (see the README's Pre-copy). "
    "on, off, or a pace in bytes per second. Default: off.",
    parse=_precopy,
    default=_constant(0.0),
)
_HEARTBEAT_TIMEOUT: _Setting[float] = _Setting(
    "heartbeat_timeout",
    "HANDOFF_HEARTBEAT_TIMEOUT",
    f"Seconds of silence after which a peer counts as down. "
    f"Default: {_DEFAULT_HEARTBEAT_TIMEOUT:g}.",
    parse=_seconds,
    default=_constant(_DEFAULT_HEARTBEAT_TIMEOUT),
)
_HEARTBEAT_INTERVAL: _Setting[float] = _Setting(
    "heartbeat_interval",
    "HANDOFF_HEARTBEAT_INTERVAL",
    "Seconds between heartbeats; must be below the heartbeat timeout. "
    "Default: a third of the heartbeat timeout.",
    parse=_seconds,
    default=lambda context: context.value(_HEARTBEAT_TIMEOUT) / 3,
    check=_check_heartbeat,
)
_POLL_INTERVAL: _Setting[float] = _Setting(
    "poll_interval",
    "HANDOFF_POLL_INTERVAL",
    f"Seconds between discovery queries. Default: {_DEFAULT_POLL_INTERVAL:g}.",
    parse=_seconds,
    default=_constant(_DEFAULT_POLL_INTERVAL),
)
_HANDSHAKE_TIMEOUT: _Setting[float] = _Setting(
    "handshake_timeout",
    "HANDOFF_HANDSHAKE_TIMEOUT",
    f"Seconds a peer has to complete the authentication handshake. "
    f"Default: {_DEFAULT_HANDSHAKE_TIMEOUT:g}.",
    parse=_seconds,
    default=_constant(_DEFAULT_HANDSHAKE_TIMEOUT),
)
_CONNECT_TIMEOUT: _Setting[float] = _Setting(
    "connect_timeout",
    "HANDOFF_CONNECT_TIMEOUT",
    f"Seconds to open a connection to a peer. Default: {_DEFAULT_CONNECT_TIMEOUT:g}.",
    parse=_seconds,
    default=_constant(_DEFAULT_CONNECT_TIMEOUT),
)
_TLS_CERT: _Setting[Path | None] = _Setting(
    "tls_cert",
    "HANDOFF_TLS_CERT",
    "PEM certificate of this node. Enables mutual TLS; needs HANDOFF_TLS_KEY and HANDOFF_TLS_CA.",
    parse=_path,
    default=_constant(None),
)
_TLS_KEY: _Setting[Path | None] = _Setting(
    "tls_key",
    "HANDOFF_TLS_KEY",
    "PEM private key for HANDOFF_TLS_CERT.",
    parse=_path,
    default=_constant(None),
)
_TLS_CA: _Setting[Path | None] = _Setting(
    "tls_ca",
    "HANDOFF_TLS_CA",
    "PEM CA bundle that peers' certificates are verified against (mutual TLS).",
    parse=_path,
    default=_constant(None),
    check=_check_tls,
)
_CONTROL_SOCKET: _Setting[Path | None] = _Setting(
    "control_socket",
    "HANDOFF_CONTROL_SOCKET",
    "Unix socket of the local control endpoint that the handoff CLI (status, drain, "
    "wait-ready, doctor) talks to; an absolute path, or 'none' to disable it. Default: "
    "${XDG_RUNTIME_DIR or /tmp}/handoff-<uid>/<cluster>.sock.",
    parse=_control_socket,
    default=_default_control_socket,
)

# Resolution order: each row may read the rows before it.
_LADDER: tuple[_Setting[Any], ...] = (
    _COOKIE,
    _CLUSTER,
    _RELEASE,
    _NODE_NAME,
    _BIND,
    _PORT_RANGE,
    _ADVERTISE,
    _DISCOVERY,
    _DNS_SERVER,
    _SNAPSHOT_DIR,
    _SNAPSHOT_URL,
    _DRAIN_TIMEOUT,
    _WARMUP_TIMEOUT,
    _PRECOPY,
    _HEARTBEAT_TIMEOUT,
    _HEARTBEAT_INTERVAL,
    _POLL_INTERVAL,
    _HANDSHAKE_TIMEOUT,
    _CONNECT_TIMEOUT,
    _TLS_CERT,
    _TLS_KEY,
    _TLS_CA,
    _CONTROL_SOCKET,
)

#: The environment variables this library reads, with what each one means.
#: The README's table lists the same names (tests/test_docs.py checks); the deploy contract.
ENVIRONMENT_VARIABLES: tuple[tuple[str, str], ...] = tuple(
    (setting.env, setting.doc) for setting in _LADDER
)

#: Platform variables read for detection and defaults (set by the platform, not by users).
PLATFORM_VARIABLES: tuple[tuple[str, str], ...] = (
    ("FLY_APP_NAME", "Fly.io detected; default cluster name; the app for 'fly' discovery."),
    ("FLY_MACHINE_ID", "Fly.io: default node name (FLY_ALLOC_ID as fallback)."),
    ("FLY_IMAGE_REF", "Fly.io: its deployment tag is the default release."),
    ("FLY_PRIVATE_IP", "Fly.io: default advertised address (6PN)."),
    ("FLY_REGION", "Fly.io: region of this Machine."),
    ("KUBERNETES_SERVICE_HOST", "Kubernetes detected."),
    ("POD_IP", "Kubernetes: default advertised address (set it with fieldRef status.podIP)."),
    ("HOSTNAME", "Kubernetes: the pod name, default node name."),
)


def control_directory(environ: Mapping[str, str] | None = None) -> Path:
    """``${XDG_RUNTIME_DIR or /tmp}/handoff-<uid>``: where control sockets live by default.

    Per user, so that nodes of different users never meet there; the node creates it with
    mode 0700. ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR", "").strip()
    # A relative XDG_RUNTIME_DIR is invalid by the XDG spec; /tmp is the documented fallback.
    base = Path(runtime) if runtime.startswith("/") else Path("/tmp")
    return base / f"handoff-{os.geteuid()}"


def default_control_socket(cluster: str, environ: Mapping[str, str] | None = None) -> Path:
    """The control socket of a node of ``cluster`` when ``HANDOFF_CONTROL_SOCKET`` is unset:
    ``${XDG_RUNTIME_DIR or /tmp}/handoff-<uid>/<cluster>.sock``."""
    # A cluster name may hold a slash; it must not reach into another directory.
    return control_directory(environ) / (cluster.replace("/", "_") + ".sock")


def for_worker(settings: Settings, port: int, *, pid: int, built_by: int) -> Settings:
    """``settings`` of a node that listens on ``port``, in process ``pid``.

    Several worker processes of one machine start with the same environment, so with the
    same name and control socket; their ports tell them apart. A node on a port other than
    its configured one (the configured port was in use: a sibling worker holds it) appends
    ``-PORT`` to its name and to its control socket's name (``shop.sock`` becomes
    ``shop-4371.sock``), whatever set them. The default local name (``HOST-PID``) is
    rebuilt when the node starts in another process than the one that built the settings
    (gunicorn ``--preload`` forks workers from the master that imported the app).
    """
    name = settings.node_name
    if settings.sources.get(_NODE_NAME.key, "default") == "default" and pid != built_by:
        name = _host_pid_name(pid)
    control = settings.control_socket
    warnings = settings.warnings
    if port != settings.bind_port and settings.bind_port != 0:
        suffix = f"-{port}"
        name = name[: _MAX_NAME_LENGTH - len(suffix)] + suffix
        if control is not None:
            control = control.with_name(f"{control.stem}{suffix}{control.suffix}")
            if len(os.fsencode(control)) > _MAX_SOCKET_PATH_BYTES:
                warnings += (
                    f"{_CONTROL_SOCKET.label}: this worker's control socket {str(control)!r} "
                    f"is longer than Unix sockets allow ({_MAX_SOCKET_PATH_BYTES} bytes); it "
                    "runs without one. Set HANDOFF_CONTROL_SOCKET to a shorter path",
                )
                control = None
    if name == settings.node_name and control == settings.control_socket:
        return settings
    return dataclasses.replace(settings, node_name=name, control_socket=control, warnings=warnings)


def resolve_settings(
    *,
    environ: Mapping[str, str] | None = None,
    cluster: str | None = None,
    cookie: str | bytes | None = None,
    release: str | None = None,
    name: str | None = None,
    bind: str | None = None,
    discovery: str | DiscoverySpec | None = None,
    dns_server: str | None = None,
    snapshot_dir: str | os.PathLike[str] | None = None,
    snapshot_url: str | None = None,
    drain_timeout: float | None = None,
    warmup_timeout: float | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    heartbeat_timeout: float | None = None,
    heartbeat_interval: float | None = None,
    poll_interval: float | None = None,
    handshake_timeout: float | None = None,
    connect_timeout: float | None = None,
    advertise: str | None = None,
    control_socket: str | os.PathLike[str] | None = None,
    port_range: int | None = None,
    precopy: bool | float | None = None,
) -> Settings:
    """Resolve and validate a node's settings; raise :class:`ConfigError` on any problem.

    Each setting comes from its argument if not ``None``, else its ``HANDOFF_*`` variable in
    ``environ`` (default: ``os.environ``), else platform detection, else the default. See
    :data:`ENVIRONMENT_VARIABLES` for the variables and defaults.

    On Fly.io the drain timeout defaults to 4 s because ``kill_timeout`` defaults to 5 s;
    to allow longer drains raise ``kill_timeout`` in ``fly.toml`` and
    ``HANDOFF_DRAIN_TIMEOUT`` together.
    """
    # The keyword arguments by name, taken before any other local exists; each row of the
    # ladder names its keyword (a test checks that they match the signature).
    arguments = dict(locals())
    context = _Context.detect(os.environ if environ is None else environ)
    for setting in _LADDER:
        setting.resolve(context, arguments[setting.argument])
    context.warnings.extend(unknown_variables(context.environ))
    value = context.value
    bind_host, bind_port = value(_BIND)
    return Settings(
        cluster=value(_CLUSTER),
        cookie=value(_COOKIE),
        release=value(_RELEASE),
        node_name=value(_NODE_NAME),
        bind_host=bind_host,
        bind_port=bind_port,
        advertise_host=value(_ADVERTISE),
        discovery=value(_DISCOVERY),
        dns_server=value(_DNS_SERVER),
        snapshot_dir=value(_SNAPSHOT_DIR),
        snapshot_url=value(_SNAPSHOT_URL),
        drain_timeout=value(_DRAIN_TIMEOUT),
        warmup_timeout=value(_WARMUP_TIMEOUT),
        tls=_tls_files(context),
        heartbeat_interval=value(_HEARTBEAT_INTERVAL),
        heartbeat_timeout=value(_HEARTBEAT_TIMEOUT),
        handshake_timeout=value(_HANDSHAKE_TIMEOUT),
        connect_timeout=value(_CONNECT_TIMEOUT),
        poll_interval=value(_POLL_INTERVAL),
        platform=context.platform,
        region=context.region,
        fly_app=context.fly_app,
        control_socket=value(_CONTROL_SOCKET),
        port_range=value(_PORT_RANGE),
        precopy=value(_PRECOPY),
        warnings=tuple(context.warnings),
        sources=MappingProxyType(dict(context.sources)),
    )


# Read by handoff.testing's node processes, not by a node.
_OTHER_VARIABLES = frozenset({"HANDOFF_TEST_STATE"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``HANDOFF_*`` variable no setting reads (a typo such as
    ``HANDOFF_DISCOVRY`` silently leaves the default in force), naming the closest known one."""
    known = [name for name, _ in ENVIRONMENT_VARIABLES]
    found = []
    for name in sorted(environ):
        if not name.startswith("HANDOFF_") or name in known or name in _OTHER_VARIABLES:
            continue
        # Compared without the shared prefix, which would make every name look close.
        prefix = len("HANDOFF_")
        suffixes = [k[prefix:] for k in known]
        close = difflib.get_close_matches(name[prefix:], suffixes, n=1, cutoff=0.7)
        hint = (
            f"did you mean HANDOFF_{close[0]}?"
            if close
            else "the README's Configuration table lists the known ones"
        )
        found.append(f"{_short(name)} is set but no setting reads it: {hint} (it has no effect)")
    return found


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_ports(settings: Settings) -> str:
    ports = worker_ports(settings.bind_port, settings.port_range)
    if len(ports) == 1:
        return f"{settings.port_range} (port {ports[0]} only)"
    return f"{settings.port_range} (ports {ports[0]}..{ports[-1]})"


def _format_discovery(spec: DiscoverySpec) -> str:
    if spec.kind == "static":
        return "static:" + ",".join(
            [str(address) for address in spec.static] + list(spec.static_hosts)
        )
    if spec.kind == "dns":
        return f"dns:{spec.name}" + (f":{spec.port}" if spec.port is not None else "")
    return spec.kind


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """Rows of ``(setting, value, source)`` for ``handoff doctor`` and start-up logs.

    ``source`` is ``"argument"``, the ``HANDOFF_*`` variable, ``"fly"``, ``"kubernetes"``
    or ``"default"``. The cookie is shown only as its length.
    """

    def seconds(value: float) -> str:
        return f"{value:g} s"

    def optional(value: object, absent: str = "(none)") -> str:
        return absent if value is None else str(value)

    tls = settings.tls
    values: list[tuple[str, str]] = [
        ("platform", settings.platform),
        ("cluster", settings.cluster),
        ("cookie", f"(set, {len(settings.cookie)} bytes)"),
        ("release", settings.release),
        ("node_name", settings.node_name),
        ("bind", _format_address(settings.bind_host, settings.bind_port)),
        ("port_range", _format_ports(settings)),
        ("advertise", optional(settings.advertise_host)),
        ("discovery", _format_discovery(settings.discovery)),
        (
            "dns_server",
            "(system resolver)"
            if settings.dns_server is None
            else _format_address(*settings.dns_server),
        ),
        ("snapshot_dir", optional(settings.snapshot_dir, "(no snapshots)")),
        ("snapshot_url", optional(settings.snapshot_url, "(none)")),
        ("drain_timeout", seconds(settings.drain_timeout)),
        ("warmup_timeout", seconds(settings.warmup_timeout)),
        (
            "precopy",
            "off"
            if not settings.precopy
            else "on"
            if settings.precopy == math.inf
            else f"{settings.precopy:g} bytes/s",
        ),
        ("tls_cert", optional(tls and tls.cert, "(no TLS)")),
        ("tls_key", optional(tls and tls.key, "(no TLS)")),
        ("tls_ca", optional(tls and tls.ca, "(no TLS)")),
        ("heartbeat_timeout", seconds(settings.heartbeat_timeout)),
        ("heartbeat_interval", seconds(settings.heartbeat_interval)),
        ("poll_interval", seconds(settings.poll_interval)),
        ("handshake_timeout", seconds(settings.handshake_timeout)),
        ("connect_timeout", seconds(settings.connect_timeout)),
        ("region", optional(settings.region)),
        ("fly_app", optional(settings.fly_app)),
        ("control_socket", optional(settings.control_socket, "(disabled)")),
    ]
    return [(key, value, settings.sources.get(key, "default")) for key, value in values]
