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

import ipaddress
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from ._errors import ConfigError
from .discovery._spec import DiscoverySpec, parse_discovery_spec, parse_host_port

__all__ = (
    "DEFAULT_PORT",
    "ENVIRONMENT_VARIABLES",
    "PLATFORM_VARIABLES",
    "Platform",
    "Settings",
    "TLSFiles",
    "control_directory",
    "default_control_socket",
    "describe",
    "resolve_settings",
)

Platform = Literal["fly", "kubernetes", "local"]

#: The port a node listens on unless told otherwise.
DEFAULT_PORT = 4370

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

_COOKIE_HOWTO = (
    'Generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))". '
    "On Fly.io: fly secrets set HANDOFF_COOKIE=<value>. On Kubernetes: put it in a Secret "
    "and expose it with env: [{name: HANDOFF_COOKIE, valueFrom: {secretKeyRef: ...}}]."
)

_K8S_NO_DISCOVERY_WARNING = (
    "running on Kubernetes without HANDOFF_DISCOVERY: set "
    "HANDOFF_DISCOVERY=dns:<headless-service>.<namespace>.svc.cluster.local "
    "(with publishNotReadyAddresses: true) so that nodes find each other"
)

#: The environment variables this library reads, with what each one means.
#: Rendered in the README and by ``handoff doctor``; this is the deploy contract.
ENVIRONMENT_VARIABLES: tuple[tuple[str, str], ...] = (
    (
        "HANDOFF_CLUSTER",
        "Cluster name; nodes only join peers of the same cluster. "
        "Default on Fly.io: FLY_APP_NAME. Required elsewhere.",
    ),
    (
        "HANDOFF_COOKIE",
        "Required. Shared secret (at least 16 bytes) that every node of the cluster must "
        "have; peers prove they know it before any state moves. Surrounding whitespace is "
        "stripped.",
    ),
    (
        "HANDOFF_RELEASE",
        "Release (version) of this node; successors prefer newer releases. Default on "
        "Fly.io: the deployment tag of FLY_IMAGE_REF; elsewhere 'unversioned'.",
    ),
    (
        "HANDOFF_NODE_NAME",
        "Unique name of this node. Default: FLY_MACHINE_ID on Fly.io, the pod name "
        "(HOSTNAME) on Kubernetes, HOST-PID elsewhere.",
    ),
    (
        "HANDOFF_BIND",
        f"Listen address, HOST:PORT or [IPV6]:PORT (a bare host uses port {DEFAULT_PORT}; "
        f"port 0 picks a free port). Default: [::]:{DEFAULT_PORT} on Fly.io, "
        f"0.0.0.0:{DEFAULT_PORT} on Kubernetes ([::] if POD_IP is IPv6), "
        f"127.0.0.1:{DEFAULT_PORT} elsewhere.",
    ),
    (
        "HANDOFF_ADVERTISE",
        "Host (IP address or name) that peers dial to reach this node. Default: "
        "FLY_PRIVATE_IP on Fly.io, POD_IP on Kubernetes, else the bind host if it is a "
        "specific address.",
    ),
    (
        "HANDOFF_DISCOVERY",
        "How to find peers: 'static:HOST:PORT,HOST:PORT', 'dns:NAME[:PORT]' (A/AAAA, "
        "polled), 'dns:_SERVICE._PROTO.NAME' (SRV), 'fly' (the app's .internal names) or "
        "'none'. Default: 'fly' on Fly.io, "
        "'none' elsewhere.",
    ),
    (
        "HANDOFF_DNS_SERVER",
        "DNS server for discovery, IP[:PORT] or [IPV6]:PORT (default port 53); overrides "
        "/etc/resolv.conf.",
    ),
    (
        "HANDOFF_SNAPSHOT_DIR",
        "Directory for snapshots of state that no peer could take (put it on a volume to "
        "survive a restart). Default: no snapshots.",
    ),
    (
        "HANDOFF_DRAIN_TIMEOUT",
        "Seconds a drain may take: then streaming stops and the rest is snapshotted (at 3/4 "
        "of it when a snapshot store is set) or counted as dropped. Keep it below the "
        "platform's grace period. Default: 4 on Fly.io (kill_timeout 5 s), 25 on "
        "Kubernetes (terminationGracePeriodSeconds 30 s), 10 elsewhere.",
    ),
    (
        "HANDOFF_WARMUP_TIMEOUT",
        f"Seconds a starting node waits for handed-off state before it reports ready. "
        f"Default: {_DEFAULT_WARMUP_TIMEOUT:g}.",
    ),
    (
        "HANDOFF_TLS_CERT",
        "PEM certificate of this node. Enables mutual TLS; needs HANDOFF_TLS_KEY and "
        "HANDOFF_TLS_CA.",
    ),
    ("HANDOFF_TLS_KEY", "PEM private key for HANDOFF_TLS_CERT."),
    (
        "HANDOFF_TLS_CA",
        "PEM CA bundle that peers' certificates are verified against (mutual TLS).",
    ),
    (
        "HANDOFF_HEARTBEAT_TIMEOUT",
        f"Seconds of silence after which a peer counts as down. "
        f"Default: {_DEFAULT_HEARTBEAT_TIMEOUT:g}.",
    ),
    (
        "HANDOFF_HEARTBEAT_INTERVAL",
        "Seconds between heartbeats; must be below the heartbeat timeout. "
        "Default: a third of the heartbeat timeout.",
    ),
    (
        "HANDOFF_POLL_INTERVAL",
        f"Seconds between discovery queries. Default: {_DEFAULT_POLL_INTERVAL:g}.",
    ),
    (
        "HANDOFF_HANDSHAKE_TIMEOUT",
        f"Seconds a peer has to complete the authentication handshake. "
        f"Default: {_DEFAULT_HANDSHAKE_TIMEOUT:g}.",
    ),
    (
        "HANDOFF_CONNECT_TIMEOUT",
        f"Seconds to open a connection to a peer. Default: {_DEFAULT_CONNECT_TIMEOUT:g}.",
    ),
    (
        "HANDOFF_CONTROL_SOCKET",
        "Unix socket of the local control endpoint that the handoff CLI (status, drain, "
        "wait-ready, doctor) talks to; an absolute path, or 'none' to disable it. Default: "
        "${XDG_RUNTIME_DIR or /tmp}/handoff-<uid>/<cluster>.sock.",
    ),
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
    warnings: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )


class _Resolver:
    """Looks settings up in precedence order and remembers where each value came from."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.sources: dict[str, str] = {}

    def env(self, name: str) -> str | None:
        """The stripped value of ``name``; ``None`` when unset or blank."""
        value = self.environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def pick(
        self, setting: str, argument: str | None, env_name: str
    ) -> tuple[str | None, str | None]:
        """The argument, else the variable: ``(value, source)``; both ``None`` if neither."""
        if argument is not None:
            self.sources[setting] = "argument"
            return argument, "argument"
        value = self.env(env_name)
        if value is not None:
            self.sources[setting] = env_name
            return value, env_name
        return None, None


def _label(argument: str, env_name: str) -> str:
    return f"{env_name} (Node({argument}=...))"


def _origin(source: str | None, detail: str | None = None) -> str:
    # The label already names the argument and HANDOFF_* variable; a value the platform
    # supplied needs its own variable named, or the user cannot find where it came from.
    if source in ("fly", "kubernetes", "default") and detail:
        return f" (from {detail})"
    return ""


def _short(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _check_name(
    value: str, *, argument: str, env_name: str, what: str, source: str | None, detail: str
) -> str:
    label = _label(argument, env_name)
    value = value.strip()
    if not value:
        raise ConfigError(f"{label}: the {what} is empty; set a non-empty {what}")
    if len(value) > _MAX_NAME_LENGTH:
        raise ConfigError(
            f"{label}{_origin(source, detail)}: the {what} {_short(value)} is {len(value)} "
            f"characters long; use at most {_MAX_NAME_LENGTH}"
        )
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(
            f"{label}{_origin(source, detail)}: the {what} {_short(value)} contains whitespace "
            "or unprintable characters; use letters, digits and punctuation such as - _ ."
        )
    return value


def _cookie(resolver: _Resolver, argument: str | bytes | None) -> bytes:
    label = _label("cookie", "HANDOFF_COOKIE")
    raw: str | bytes
    if argument is not None:
        if not isinstance(argument, str | bytes):
            raise ConfigError(
                f"{label}: the cookie must be str or bytes, not {type(argument).__name__}"
            )
        raw = argument
        resolver.sources["cookie"] = "argument"
    else:
        env_value = resolver.environ.get("HANDOFF_COOKIE")
        if env_value is None:
            raise ConfigError(
                f"{label}: no cookie. The cookie is a shared secret that every node of the "
                f"cluster needs (the same value everywhere); there is no default. "
                f"{_COOKIE_HOWTO}"
            )
        raw = env_value
        resolver.sources["cookie"] = "HANDOFF_COOKIE"
    if not raw:
        raise ConfigError(f"{label}: the cookie is empty. {_COOKIE_HOWTO}")
    # Env files and secret mounts often carry a trailing newline: strip it the same way for
    # every input so that nodes configured differently still agree on the secret.
    cookie = raw.strip().encode() if isinstance(raw, str) else raw.strip()
    if not cookie:
        raise ConfigError(f"{label}: the cookie is only whitespace. {_COOKIE_HOWTO}")
    if len(cookie) < _MIN_COOKIE_BYTES:
        raise ConfigError(
            f"{label}: the cookie is {len(cookie)} bytes long; use at least "
            f"{_MIN_COOKIE_BYTES} (a short secret can be guessed offline from a captured "
            f"handshake). {_COOKIE_HOWTO}"
        )
    return cookie


def _release_from_image_ref(ref: str) -> str:
    """``registry.fly.io/app:deployment-01H...`` -> ``deployment-01H...``; no tag: the ref."""
    name = ref.partition("@")[0]
    # Only a colon in the last path segment is a tag; earlier ones are a registry port.
    last = name.rsplit("/", 1)[-1]
    _, sep, tag = last.rpartition(":")
    return tag if sep and tag else ref


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


def _bind(text: str) -> tuple[str, int]:
    context = _label("bind", "HANDOFF_BIND")
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


def _advertise(text: str, *, source: str | None, detail: str) -> str:
    label = _label("advertise", "HANDOFF_ADVERTISE")
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"{label}: the advertised host is empty; give an IP address or name")
    if any(c.isspace() or not c.isprintable() for c in host) or "[" in host or "]" in host:
        raise ConfigError(
            f"{label}{_origin(source, detail)}: {_short(text)} is not a host; "
            "give an IP address or DNS name"
        )
    if host.count(":") == 1:
        raise ConfigError(
            f"{label}{_origin(source, detail)}: {_short(text)} looks like HOST:PORT; give only "
            "the host (peers dial it on the bind port)"
        )
    if _is_unspecified(host):
        raise ConfigError(
            f"{label}{_origin(source, detail)}: {_short(text)} is a wildcard address that "
            "peers cannot dial; give this node's own IP address or name"
        )
    return host


def _discovery(text: str) -> DiscoverySpec:
    context = _label("discovery", "HANDOFF_DISCOVERY")
    try:
        return parse_discovery_spec(text, context=context)
    except ValueError as exc:
        # See _host_port: stray int() errors still have to name the setting.
        raise ConfigError(
            f"{context}: {_short(text)} has a port that is not a number between 1 and 65535"
        ) from exc


def _dns_server(text: str) -> tuple[str, int]:
    context = _label("dns_server", "HANDOFF_DNS_SERVER")
    host, port = _host_port(text, context=context, default_port=_DEFAULT_DNS_PORT)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{context}: {host!r} is not an IP address; give the DNS server as IP[:PORT] or "
            "[IPV6]:PORT, e.g. 10.96.0.10 or [fdaa::3]:53"
        ) from None
    return host, port


def _seconds(
    resolver: _Resolver, setting: str, argument: float | None, env_name: str
) -> float | None:
    label = _label(setting, env_name)
    value: float
    if argument is not None:
        if isinstance(argument, bool) or not isinstance(argument, int | float):
            raise ConfigError(
                f"{label}: expected a number of seconds, got {type(argument).__name__}"
            )
        value = float(argument)
        resolver.sources[setting] = "argument"
        given = repr(argument)
    else:
        text = resolver.env(env_name)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"{label}: {_short(text)} is not a number; give seconds, e.g. {env_name}=5 or 2.5"
            ) from None
        resolver.sources[setting] = env_name
        given = repr(text)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{label}: {given} is not a usable time; give a finite number of seconds greater than 0"
        )
    return value


def _seconds_or_default(
    resolver: _Resolver,
    setting: str,
    argument: float | None,
    env_name: str,
    default: float,
    default_source: str = "default",
) -> float:
    value = _seconds(resolver, setting, argument, env_name)
    if value is None:
        resolver.sources[setting] = default_source
        return default
    return value


def _readable_file(path: Path, *, argument: str, env_name: str) -> None:
    label = _label(argument, env_name)
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


def _tls(
    resolver: _Resolver,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    ca: str | os.PathLike[str] | None,
) -> TLSFiles | None:
    paths: dict[str, Path | None] = {}
    for setting, argument, env_name in (
        ("tls_cert", cert, "HANDOFF_TLS_CERT"),
        ("tls_key", key, "HANDOFF_TLS_KEY"),
        ("tls_ca", ca, "HANDOFF_TLS_CA"),
    ):
        if argument is not None:
            resolver.sources[setting] = "argument"
            paths[setting] = Path(argument)
        elif (text := resolver.env(env_name)) is not None:
            resolver.sources[setting] = env_name
            paths[setting] = Path(text)
        else:
            resolver.sources[setting] = "default"
            paths[setting] = None
    cert_path, key_path, ca_path = paths["tls_cert"], paths["tls_key"], paths["tls_ca"]
    if cert_path is None and key_path is None and ca_path is None:
        return None
    if cert_path is None or key_path is None:
        given, missing = (
            ("tls_cert", "tls_key") if cert_path is not None else ("tls_key", "tls_cert")
        )
        if cert_path is None and key_path is None:
            raise ConfigError(
                f"{_label('tls_ca', 'HANDOFF_TLS_CA')} is set but "
                f"{_label('tls_cert', 'HANDOFF_TLS_CERT')} and "
                f"{_label('tls_key', 'HANDOFF_TLS_KEY')} are not: TLS is mutual, so every node "
                "needs its own certificate and key as well as the CA; set all three or none"
            )
        raise ConfigError(
            f"{_label(given, 'HANDOFF_' + given.upper())} is set but "
            f"{_label(missing, 'HANDOFF_' + missing.upper())} is not: a certificate and its "
            "private key go together; set both (and HANDOFF_TLS_CA) or neither"
        )
    if ca_path is None:
        raise ConfigError(
            f"{_label('tls_ca', 'HANDOFF_TLS_CA')} is not set but a certificate is: TLS is "
            "mutual and peers' certificates are verified against this CA bundle; set it to "
            "the PEM file of the CA that signed the nodes' certificates"
        )
    _readable_file(cert_path, argument="tls_cert", env_name="HANDOFF_TLS_CERT")
    _readable_file(key_path, argument="tls_key", env_name="HANDOFF_TLS_KEY")
    _readable_file(ca_path, argument="tls_ca", env_name="HANDOFF_TLS_CA")
    return TLSFiles(cert=cert_path, key=key_path, ca=ca_path)


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


def _control_socket(
    resolver: _Resolver, argument: str | os.PathLike[str] | None, cluster: str
) -> tuple[Path | None, str | None]:
    """The control socket path (``None``: disabled) and a warning, if any."""
    label = _label("control_socket", "HANDOFF_CONTROL_SOCKET")
    value, _ = resolver.pick(
        "control_socket",
        None if argument is None else os.fspath(argument),
        "HANDOFF_CONTROL_SOCKET",
    )
    if value is None:
        resolver.sources["control_socket"] = "default"
        path = default_control_socket(cluster, resolver.environ)
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
            # A default that cannot work must not stop the node: it runs without the CLI.
            return None, (
                f"{label}: the default control socket {str(path)!r} is longer than Unix "
                f"sockets allow ({_MAX_SOCKET_PATH_BYTES} bytes); the node runs without one. "
                "Set HANDOFF_CONTROL_SOCKET to a shorter absolute path"
            )
        return path, None
    text = value.strip()
    if text.lower() == "none":
        return None, None
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
    return Path(text), None


def _default_local_name() -> str:
    # Hostnames can be long or (on desktops) contain spaces; a default must always validate.
    host = "-".join(socket.gethostname().split()) or "localhost"
    return f"{host[:100]}-{os.getpid()}"


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
) -> Settings:
    """Resolve and validate a node's settings; raise :class:`ConfigError` on any problem.

    Each setting comes from its argument if not ``None``, else its ``HANDOFF_*`` variable in
    ``environ`` (default: ``os.environ``), else platform detection, else the default. See
    :data:`ENVIRONMENT_VARIABLES` for the variables and defaults.

    On Fly.io the drain timeout defaults to 4 s because ``kill_timeout`` defaults to 5 s;
    to allow longer drains raise ``kill_timeout`` in ``fly.toml`` and
    ``HANDOFF_DRAIN_TIMEOUT`` together.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    r = _Resolver(env)
    warnings: list[str] = []

    fly_app = r.env("FLY_APP_NAME")
    platform: Platform
    if fly_app is not None:
        platform = "fly"
    elif r.env("KUBERNETES_SERVICE_HOST") is not None:
        platform = "kubernetes"
    else:
        platform = "local"
    r.sources["platform"] = platform if platform != "local" else "default"
    region = r.env("FLY_REGION") if platform == "fly" else None
    r.sources["region"] = "fly" if region is not None else "default"
    r.sources["fly_app"] = "fly" if fly_app is not None else "default"
    pod_ip = r.env("POD_IP") if platform == "kubernetes" else None

    cookie_bytes = _cookie(r, cookie)

    # cluster
    value, source = r.pick("cluster", cluster, "HANDOFF_CLUSTER")
    detail = ""
    if value is None:
        if fly_app is None:
            raise ConfigError(
                "no cluster name: pass Node(cluster=...) or set HANDOFF_CLUSTER; nodes only "
                "join peers of the same cluster"
            )
        value, source, detail = fly_app, "fly", "FLY_APP_NAME"
        r.sources["cluster"] = source
    cluster_name = _check_name(
        value,
        argument="cluster",
        env_name="HANDOFF_CLUSTER",
        what="cluster name",
        source=source,
        detail=detail,
    )

    # release
    value, source = r.pick("release", release, "HANDOFF_RELEASE")
    detail = ""
    if value is None:
        image_ref = r.env("FLY_IMAGE_REF") if platform == "fly" else None
        if image_ref is not None:
            value, source, detail = _release_from_image_ref(image_ref), "fly", "FLY_IMAGE_REF"
        else:
            value, source = _DEFAULT_RELEASE, "default"
        r.sources["release"] = source
    release_name = _check_name(
        value,
        argument="release",
        env_name="HANDOFF_RELEASE",
        what="release",
        source=source,
        detail=detail,
    )

    # node name
    value, source = r.pick("node_name", name, "HANDOFF_NODE_NAME")
    detail = ""
    if value is None:
        if platform == "fly" and (machine := r.env("FLY_MACHINE_ID") or r.env("FLY_ALLOC_ID")):
            value, source, detail = machine, "fly", "FLY_MACHINE_ID"
        elif platform == "kubernetes":
            pod_name = r.env("HOSTNAME")
            value = pod_name if pod_name is not None else socket.gethostname()
            source, detail = "kubernetes", "HOSTNAME"
        else:
            value, source = _default_local_name(), "default"
        r.sources["node_name"] = source
    node_name = _check_name(
        value,
        argument="name",
        env_name="HANDOFF_NODE_NAME",
        what="node name",
        source=source,
        detail=detail,
    )

    # bind
    value, _ = r.pick("bind", bind, "HANDOFF_BIND")
    if value is not None:
        bind_host, bind_port = _bind(value)
    elif platform == "fly":
        bind_host, bind_port = "::", DEFAULT_PORT
        r.sources["bind"] = "fly"
    elif platform == "kubernetes":
        bind_host = "::" if pod_ip is not None and _is_ipv6(pod_ip) else "0.0.0.0"
        bind_port = DEFAULT_PORT
        r.sources["bind"] = "kubernetes"
    else:
        bind_host, bind_port = "127.0.0.1", DEFAULT_PORT
        r.sources["bind"] = "default"

    # advertise
    value, source = r.pick("advertise", advertise, "HANDOFF_ADVERTISE")
    detail = ""
    advertise_host: str | None
    if value is None:
        if platform == "fly" and (private_ip := r.env("FLY_PRIVATE_IP")) is not None:
            value, source, detail = private_ip, "fly", "FLY_PRIVATE_IP"
        elif pod_ip is not None:
            value, source, detail = pod_ip, "kubernetes", "POD_IP"
        else:
            source = "default"
        r.sources["advertise"] = source
    if value is not None:
        advertise_host = _advertise(value, source=source, detail=detail)
    elif not _is_unspecified(bind_host):
        advertise_host = bind_host
    else:
        advertise_host = None
    if advertise_host is not None and _is_loopback(bind_host) and not _is_loopback(advertise_host):
        warnings.append(
            f"the node listens on loopback ({bind_host}) but advertises {advertise_host}: "
            "peers on other hosts cannot connect; set HANDOFF_BIND to a wildcard address "
            "such as [::]:4370 or 0.0.0.0:4370"
        )

    # discovery
    discovery_spec: DiscoverySpec
    if discovery is not None:
        r.sources["discovery"] = "argument"
        discovery_spec = (
            discovery if isinstance(discovery, DiscoverySpec) else (_discovery(discovery))
        )
    elif (text := r.env("HANDOFF_DISCOVERY")) is not None:
        r.sources["discovery"] = "HANDOFF_DISCOVERY"
        discovery_spec = _discovery(text)
    elif platform == "fly":
        r.sources["discovery"] = "fly"
        discovery_spec = DiscoverySpec(kind="fly")
    else:
        r.sources["discovery"] = "default"
        discovery_spec = DiscoverySpec(kind="none")
        if platform == "kubernetes":
            warnings.append(_K8S_NO_DISCOVERY_WARNING)
    if discovery_spec.kind == "fly" and fly_app is None:
        raise ConfigError(
            f"{_label('discovery', 'HANDOFF_DISCOVERY')}: 'fly' discovery works only on "
            "Fly.io, where FLY_APP_NAME is set, and it is not set here; off Fly use "
            "'dns:NAME[:PORT]' or 'static:HOST:PORT,...'"
        )

    # dns server
    value, _ = r.pick("dns_server", dns_server, "HANDOFF_DNS_SERVER")
    if value is None:
        r.sources["dns_server"] = "default"
    dns = _dns_server(value) if value is not None else None

    # snapshot dir
    snapshot_path: Path | None
    if snapshot_dir is not None:
        r.sources["snapshot_dir"] = "argument"
        snapshot_path = Path(snapshot_dir)
    elif (text := r.env("HANDOFF_SNAPSHOT_DIR")) is not None:
        r.sources["snapshot_dir"] = "HANDOFF_SNAPSHOT_DIR"
        snapshot_path = Path(text)
    else:
        r.sources["snapshot_dir"] = "default"
        snapshot_path = None

    # timeouts
    drain = _seconds_or_default(
        r,
        "drain_timeout",
        drain_timeout,
        "HANDOFF_DRAIN_TIMEOUT",
        _DEFAULT_DRAIN_TIMEOUT[platform],
        platform if platform != "local" else "default",
    )
    warmup = _seconds_or_default(
        r, "warmup_timeout", warmup_timeout, "HANDOFF_WARMUP_TIMEOUT", _DEFAULT_WARMUP_TIMEOUT
    )
    hb_timeout = _seconds_or_default(
        r,
        "heartbeat_timeout",
        heartbeat_timeout,
        "HANDOFF_HEARTBEAT_TIMEOUT",
        _DEFAULT_HEARTBEAT_TIMEOUT,
    )
    hb_interval = _seconds_or_default(
        r,
        "heartbeat_interval",
        heartbeat_interval,
        "HANDOFF_HEARTBEAT_INTERVAL",
        hb_timeout / 3,
    )
    if hb_interval >= hb_timeout:
        raise ConfigError(
            f"{_label('heartbeat_interval', 'HANDOFF_HEARTBEAT_INTERVAL')} is {hb_interval:g} s "
            f"but {_label('heartbeat_timeout', 'HANDOFF_HEARTBEAT_TIMEOUT')} is "
            f"{hb_timeout:g} s: the interval must be shorter than the timeout (a third of it "
            "is usual), or healthy peers are declared down"
        )
    poll = _seconds_or_default(
        r, "poll_interval", poll_interval, "HANDOFF_POLL_INTERVAL", _DEFAULT_POLL_INTERVAL
    )
    handshake = _seconds_or_default(
        r,
        "handshake_timeout",
        handshake_timeout,
        "HANDOFF_HANDSHAKE_TIMEOUT",
        _DEFAULT_HANDSHAKE_TIMEOUT,
    )
    connect = _seconds_or_default(
        r,
        "connect_timeout",
        connect_timeout,
        "HANDOFF_CONNECT_TIMEOUT",
        _DEFAULT_CONNECT_TIMEOUT,
    )

    tls = _tls(r, tls_cert, tls_key, tls_ca)

    control_path, control_warning = _control_socket(r, control_socket, cluster_name)
    if control_warning is not None:
        warnings.append(control_warning)

    return Settings(
        cluster=cluster_name,
        cookie=cookie_bytes,
        release=release_name,
        node_name=node_name,
        bind_host=bind_host,
        bind_port=bind_port,
        advertise_host=advertise_host,
        discovery=discovery_spec,
        dns_server=dns,
        snapshot_dir=snapshot_path,
        drain_timeout=drain,
        warmup_timeout=warmup,
        tls=tls,
        heartbeat_interval=hb_interval,
        heartbeat_timeout=hb_timeout,
        handshake_timeout=handshake,
        connect_timeout=connect,
        poll_interval=poll,
        platform=platform,
        region=region,
        fly_app=fly_app,
        control_socket=control_path,
        warnings=tuple(warnings),
        sources=MappingProxyType(dict(r.sources)),
    )


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_discovery(spec: DiscoverySpec) -> str:
    if spec.kind == "static":
        return "static:" + ",".join(str(address) for address in spec.static)
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
        ("advertise", optional(settings.advertise_host)),
        ("discovery", _format_discovery(settings.discovery)),
        (
            "dns_server",
            "(system resolver)"
            if settings.dns_server is None
            else _format_address(*settings.dns_server),
        ),
        ("snapshot_dir", optional(settings.snapshot_dir, "(no snapshots)")),
        ("drain_timeout", seconds(settings.drain_timeout)),
        ("warmup_timeout", seconds(settings.warmup_timeout)),
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
