"""Tests of handoff.config: precedence, platform detection, validation, describe()."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from handoff._errors import ConfigError
from handoff.config import _LADDER as LADDER
from handoff.config import (
    DEFAULT_PORT,
    ENVIRONMENT_VARIABLES,
    PLATFORM_VARIABLES,
    Settings,
    TLSFiles,
    control_directory,
    default_control_socket,
    describe,
    resolve_settings,
)
from handoff.discovery._spec import DiscoverySpec, PeerAddress

COOKIE = "k3Yq-0_secret-cookie-value-1234567890"
FLY_ENV: dict[str, str] = {
    "FLY_APP_NAME": "shop",
    "FLY_MACHINE_ID": "683d314fdd4d68",
    "FLY_ALLOC_ID": "683d314fdd4d68",
    "FLY_IMAGE_REF": "registry.fly.io/shop:deployment-01JABCDEF",
    "FLY_PRIVATE_IP": "fdaa:0:1:a7b:1::2",
    "FLY_REGION": "ams",
    "FLY_PUBLIC_IP": "2a09:8280:1::1",
    "FLY_MACHINE_VERSION": "01JABCDEFVERSION",
    "FLY_PROCESS_GROUP": "app",
    "FLY_VM_MEMORY_MB": "256",
    "PRIMARY_REGION": "ams",
    "HANDOFF_COOKIE": COOKIE,
}
K8S_ENV: dict[str, str] = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "HOSTNAME": "shop-7d9f8c6b5-x2k4q",
    "POD_IP": "10.244.1.17",
    "HANDOFF_COOKIE": COOKIE,
    "HANDOFF_CLUSTER": "shop",
}
LOCAL_ENV: dict[str, str] = {"HANDOFF_COOKIE": COOKIE, "HANDOFF_CLUSTER": "shop"}


def resolve(environ: Mapping[str, str], **kwargs: Any) -> Settings:
    return resolve_settings(environ=environ, **kwargs)


def config_error(environ: Mapping[str, str], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_settings(environ=environ, **kwargs)
    return str(info.value)


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "box")


# --- precedence ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One setting: its argument and variable, and what each precedence level yields.

    ``arg`` and ``env`` are ``(given, expected)``; ``fly`` is ``(expected, source)``.
    """

    kwarg: str
    env_name: str
    key: str  # the setting's name in Settings.sources and describe()
    get: Callable[[Settings], object]
    arg: tuple[object, object]
    env: tuple[str, object]
    fly: tuple[object, str]
    default: object


CASES = [
    Case(
        "release",
        "HANDOFF_RELEASE",
        "release",
        get=lambda s: s.release,
        arg=("v2-arg", "v2-arg"),
        env=("v2-env", "v2-env"),
        fly=("deployment-01JABCDEF", "fly"),
        default="unversioned",
    ),
    Case(
        "name",
        "HANDOFF_NODE_NAME",
        "node_name",
        get=lambda s: s.node_name,
        arg=("node-arg", "node-arg"),
        env=("node-env", "node-env"),
        fly=("683d314fdd4d68", "fly"),
        default=f"box-{os.getpid()}",
    ),
    Case(
        "bind",
        "HANDOFF_BIND",
        "bind",
        get=lambda s: (s.bind_host, s.bind_port),
        arg=("10.0.0.1:5000", ("10.0.0.1", 5000)),
        env=("[::1]:6000", ("::1", 6000)),
        fly=(("::", DEFAULT_PORT), "fly"),
        default=("127.0.0.1", DEFAULT_PORT),
    ),
    Case(
        "advertise",
        "HANDOFF_ADVERTISE",
        "advertise",
        get=lambda s: s.advertise_host,
        arg=("10.9.9.9", "10.9.9.9"),
        env=("node1.example.com", "node1.example.com"),
        fly=("fdaa:0:1:a7b:1::2", "fly"),
        default="127.0.0.1",  # the bind host, being a specific address
    ),
    Case(
        "discovery",
        "HANDOFF_DISCOVERY",
        "discovery",
        get=lambda s: s.discovery,
        arg=(
            "static:a:1,[::1]:2",
            DiscoverySpec(kind="static", static=(PeerAddress("a", 1), PeerAddress("::1", 2))),
        ),
        env=("dns:shop.internal:4370", DiscoverySpec(kind="dns", name="shop.internal", port=4370)),
        fly=(DiscoverySpec(kind="fly"), "fly"),
        default=DiscoverySpec(kind="none"),
    ),
    Case(
        "dns_server",
        "HANDOFF_DNS_SERVER",
        "dns_server",
        get=lambda s: s.dns_server,
        arg=("10.0.0.53", ("10.0.0.53", 53)),
        env=("[fdaa::3]:5353", ("fdaa::3", 5353)),
        fly=(None, "default"),
        default=None,
    ),
    Case(
        "snapshot_dir",
        "HANDOFF_SNAPSHOT_DIR",
        "snapshot_dir",
        get=lambda s: s.snapshot_dir,
        arg=(Path("/data/arg"), Path("/data/arg")),
        env=("/data/env", Path("/data/env")),
        fly=(None, "default"),
        default=None,
    ),
    Case(
        "drain_timeout",
        "HANDOFF_DRAIN_TIMEOUT",
        "drain_timeout",
        get=lambda s: s.drain_timeout,
        arg=(7.5, 7.5),
        env=("3", 3.0),
        fly=(4.0, "fly"),
        default=10.0,
    ),
    Case(
        "warmup_timeout",
        "HANDOFF_WARMUP_TIMEOUT",
        "warmup_timeout",
        get=lambda s: s.warmup_timeout,
        arg=(1, 1.0),
        env=("2.5", 2.5),
        fly=(10.0, "default"),
        default=10.0,
    ),
    Case(
        "heartbeat_timeout",
        "HANDOFF_HEARTBEAT_TIMEOUT",
        "heartbeat_timeout",
        get=lambda s: s.heartbeat_timeout,
        arg=(6.0, 6.0),
        env=("9", 9.0),
        fly=(3.0, "default"),
        default=3.0,
    ),
    Case(
        "heartbeat_interval",
        "HANDOFF_HEARTBEAT_INTERVAL",
        "heartbeat_interval",
        get=lambda s: s.heartbeat_interval,
        arg=(0.5, 0.5),
        env=("0.25", 0.25),
        fly=(1.0, "default"),
        default=1.0,
    ),
    Case(
        "poll_interval",
        "HANDOFF_POLL_INTERVAL",
        "poll_interval",
        get=lambda s: s.poll_interval,
        arg=(1.0, 1.0),
        env=("2", 2.0),
        fly=(5.0, "default"),
        default=5.0,
    ),
    Case(
        "handshake_timeout",
        "HANDOFF_HANDSHAKE_TIMEOUT",
        "handshake_timeout",
        get=lambda s: s.handshake_timeout,
        arg=(1.5, 1.5),
        env=("2", 2.0),
        fly=(5.0, "default"),
        default=5.0,
    ),
    Case(
        "connect_timeout",
        "HANDOFF_CONNECT_TIMEOUT",
        "connect_timeout",
        get=lambda s: s.connect_timeout,
        arg=(0.5, 0.5),
        env=("3", 3.0),
        fly=(2.0, "default"),
        default=2.0,
    ),
    # Last: without a platform there is no default (see test_missing_cluster_error).
    Case(
        "cluster",
        "HANDOFF_CLUSTER",
        "cluster",
        get=lambda s: s.cluster,
        arg=("c-arg", "c-arg"),
        env=("c-env", "c-env"),
        fly=("shop", "fly"),
        default=None,
    ),
]
CASE_IDS = [case.kwarg for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_argument_beats_environment_and_platform(case: Case) -> None:
    given, expected = case.arg
    settings = resolve({**FLY_ENV, case.env_name: case.env[0]}, **{case.kwarg: given})
    assert case.get(settings) == expected
    assert settings.sources[case.key] == "argument"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_environment_beats_platform(case: Case) -> None:
    given, expected = case.env
    settings = resolve({**FLY_ENV, case.env_name: given})
    assert case.get(settings) == expected
    assert settings.sources[case.key] == case.env_name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_platform_beats_default(case: Case) -> None:
    expected, source = case.fly
    settings = resolve(FLY_ENV)
    assert case.get(settings) == expected
    assert settings.sources[case.key] == source


@pytest.mark.parametrize("case", CASES[:-1], ids=CASE_IDS[:-1])
def test_default_without_platform(case: Case) -> None:
    settings = resolve(LOCAL_ENV)
    assert case.get(settings) == case.default
    assert settings.sources[case.key] == "default"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_blank_environment_variable_counts_as_unset(case: Case) -> None:
    settings = resolve({**FLY_ENV, case.env_name: "  \n"})
    assert case.get(settings) == case.fly[0]


def test_cookie_argument_beats_environment() -> None:
    settings = resolve(FLY_ENV, cookie="A" * 20)
    assert settings.cookie == b"A" * 20
    assert settings.sources["cookie"] == "argument"
    settings = resolve(FLY_ENV)
    assert settings.cookie == COOKIE.encode()
    assert settings.sources["cookie"] == "HANDOFF_COOKIE"


def test_tls_argument_beats_environment(tmp_path: Path) -> None:
    env_files = _pem_files(tmp_path / "env")
    arg_files = _pem_files(tmp_path / "arg")
    environ = {
        **LOCAL_ENV,
        "HANDOFF_TLS_CERT": str(env_files.cert),
        "HANDOFF_TLS_KEY": str(env_files.key),
        "HANDOFF_TLS_CA": str(env_files.ca),
    }
    assert resolve(environ).tls == env_files
    settings = resolve(environ, tls_cert=arg_files.cert, tls_key=str(arg_files.key))
    assert settings.tls == TLSFiles(cert=arg_files.cert, key=arg_files.key, ca=env_files.ca)
    assert settings.sources["tls_cert"] == "argument"
    assert settings.sources["tls_key"] == "argument"
    assert settings.sources["tls_ca"] == "HANDOFF_TLS_CA"


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, _ in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, _ in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HANDOFF_COOKIE", COOKIE)
    monkeypatch.setenv("HANDOFF_CLUSTER", "from-os-environ")
    settings = resolve_settings()
    assert settings.cluster == "from-os-environ"
    assert settings.platform == "local"


# --- platform detection ----------------------------------------------------------------


def test_fly_detection_with_a_realistic_environment() -> None:
    settings = resolve(FLY_ENV)
    assert settings.platform == "fly"
    assert settings.cluster == "shop"
    assert settings.release == "deployment-01JABCDEF"
    assert settings.node_name == "683d314fdd4d68"
    assert (settings.bind_host, settings.bind_port) == ("::", 4370)
    assert settings.advertise_host == "fdaa:0:1:a7b:1::2"
    assert settings.discovery == DiscoverySpec(kind="fly")
    assert settings.region == "ams"
    assert settings.fly_app == "shop"
    assert settings.drain_timeout == 4.0
    assert settings.warnings == ()
    assert settings.sources["platform"] == "fly"


def test_fly_node_name_falls_back_to_alloc_id() -> None:
    environ = {k: v for k, v in FLY_ENV.items() if k != "FLY_MACHINE_ID"}
    environ["FLY_ALLOC_ID"] = "alloc-1234"
    assert resolve(environ).node_name == "alloc-1234"


def test_fly_without_machine_id_uses_local_default() -> None:
    environ = {k: v for k, v in FLY_ENV.items() if k not in ("FLY_MACHINE_ID", "FLY_ALLOC_ID")}
    settings = resolve(environ)
    assert settings.node_name == f"box-{os.getpid()}"
    assert settings.sources["node_name"] == "default"


@pytest.mark.parametrize(
    ("image_ref", "release"),
    [
        ("registry.fly.io/shop:deployment-01JABCDEF", "deployment-01JABCDEF"),
        ("registry.fly.io/shop", "registry.fly.io/shop"),
        ("localhost:5000/shop", "localhost:5000/shop"),
        ("localhost:5000/shop:v7", "v7"),
        ("registry.fly.io/shop:deployment-01J@sha256:abcd", "deployment-01J"),
        ("registry.fly.io/shop@sha256:abcd", "registry.fly.io/shop@sha256:abcd"),
    ],
)
def test_fly_release_from_image_ref(image_ref: str, release: str) -> None:
    assert resolve({**FLY_ENV, "FLY_IMAGE_REF": image_ref}).release == release


def test_fly_without_image_ref_is_unversioned() -> None:
    environ = {k: v for k, v in FLY_ENV.items() if k != "FLY_IMAGE_REF"}
    settings = resolve(environ)
    assert settings.release == "unversioned"
    assert settings.sources["release"] == "default"


def test_fly_without_private_ip_advertises_nothing() -> None:
    environ = {k: v for k, v in FLY_ENV.items() if k != "FLY_PRIVATE_IP"}
    # The default bind is the wildcard [::], which identifies nothing.
    assert resolve(environ).advertise_host is None


def test_fly_wins_over_kubernetes() -> None:
    settings = resolve({**K8S_ENV, **FLY_ENV})
    assert settings.platform == "fly"
    assert settings.warnings == ()


def test_kubernetes_detection() -> None:
    settings = resolve(K8S_ENV)
    assert settings.platform == "kubernetes"
    assert settings.node_name == "shop-7d9f8c6b5-x2k4q"
    assert settings.advertise_host == "10.244.1.17"
    assert (settings.bind_host, settings.bind_port) == ("0.0.0.0", 4370)
    assert settings.discovery == DiscoverySpec(kind="none")
    assert settings.drain_timeout == 25.0
    assert settings.region is None
    assert settings.fly_app is None
    assert settings.release == "unversioned"
    sources = settings.sources
    assert sources["node_name"] == sources["advertise"] == sources["bind"] == "kubernetes"
    assert sources["drain_timeout"] == "kubernetes"
    assert sources["platform"] == "kubernetes"


@pytest.mark.parametrize(
    ("env_name", "value", "get"),
    [
        ("HANDOFF_NODE_NAME", "web-1", lambda s: s.node_name),
        ("HANDOFF_ADVERTISE", "10.0.0.99", lambda s: s.advertise_host),
        ("HANDOFF_BIND", "10.244.1.17:4400", lambda s: (s.bind_host, s.bind_port)),
        ("HANDOFF_DRAIN_TIMEOUT", "50", lambda s: s.drain_timeout),
    ],
)
def test_kubernetes_environment_beats_detection(
    env_name: str, value: str, get: Callable[[Settings], object]
) -> None:
    detected = get(resolve(K8S_ENV))
    overridden = resolve({**K8S_ENV, env_name: value})
    assert get(overridden) != detected
    assert overridden.sources[_SOURCE_KEYS[env_name]] == env_name


_SOURCE_KEYS = {
    "HANDOFF_NODE_NAME": "node_name",
    "HANDOFF_ADVERTISE": "advertise",
    "HANDOFF_BIND": "bind",
    "HANDOFF_DRAIN_TIMEOUT": "drain_timeout",
}


def test_kubernetes_without_discovery_warns() -> None:
    (warning,) = resolve(K8S_ENV).warnings
    assert warning == (
        "running on Kubernetes without HANDOFF_DISCOVERY: set "
        "HANDOFF_DISCOVERY=dns:<headless-service>.<namespace>.svc.cluster.local "
        "(with publishNotReadyAddresses: true) so that nodes find each other"
    )


@pytest.mark.parametrize(
    ("environ", "kwargs"),
    [
        ({**K8S_ENV, "HANDOFF_DISCOVERY": "dns:shop.default.svc.cluster.local"}, {}),
        (K8S_ENV, {"discovery": "dns:shop.default.svc.cluster.local"}),
        (K8S_ENV, {"discovery": DiscoverySpec(kind="none")}),
        ({**K8S_ENV, "HANDOFF_DISCOVERY": "none"}, {}),
    ],
)
def test_kubernetes_with_discovery_does_not_warn(
    environ: dict[str, str], kwargs: dict[str, Any]
) -> None:
    assert resolve(environ, **kwargs).warnings == ()


def test_kubernetes_ipv6_pod_binds_dual_stack() -> None:
    settings = resolve({**K8S_ENV, "POD_IP": "fd00:10:244::17"})
    assert (settings.bind_host, settings.bind_port) == ("::", 4370)
    assert settings.advertise_host == "fd00:10:244::17"


def test_kubernetes_without_hostname_or_pod_ip() -> None:
    environ = {k: v for k, v in K8S_ENV.items() if k not in ("HOSTNAME", "POD_IP")}
    settings = resolve(environ)
    assert settings.node_name == "box"
    # Wildcard bind and no POD_IP: nothing identifies this node's address.
    assert settings.advertise_host is None


def test_kubernetes_requires_a_cluster_name() -> None:
    environ = {k: v for k, v in K8S_ENV.items() if k != "HANDOFF_CLUSTER"}
    assert "no cluster name" in config_error(environ)


def test_local_defaults() -> None:
    settings = resolve(LOCAL_ENV)
    assert settings.platform == "local"
    assert settings.node_name == f"box-{os.getpid()}"
    assert (settings.bind_host, settings.bind_port) == ("127.0.0.1", 4370)
    assert settings.advertise_host == "127.0.0.1"
    assert settings.discovery == DiscoverySpec(kind="none")
    assert settings.dns_server is None
    assert settings.snapshot_dir is None
    assert settings.tls is None
    assert settings.drain_timeout == 10.0
    assert settings.warmup_timeout == 10.0
    assert settings.heartbeat_timeout == 3.0
    assert settings.heartbeat_interval == 1.0
    assert settings.poll_interval == 5.0
    assert settings.handshake_timeout == 5.0
    assert settings.connect_timeout == 2.0
    assert settings.release == "unversioned"
    assert settings.region is None
    assert settings.fly_app is None
    assert settings.warnings == ()


def test_local_default_name_survives_odd_hostnames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Jane's  MacBook Pro " + "x" * 300)
    name = resolve(LOCAL_ENV).node_name
    assert len(name) <= 128
    assert not any(c.isspace() for c in name)
    assert name.startswith("Jane's-MacBook-Pro-")


def test_empty_fly_app_name_is_not_fly() -> None:
    assert resolve({**LOCAL_ENV, "FLY_APP_NAME": ""}).platform == "local"


def test_missing_cluster_error() -> None:
    message = config_error({"HANDOFF_COOKIE": COOKIE})
    assert message == (
        "no cluster name: pass Node(cluster=...) or set HANDOFF_CLUSTER; "
        "nodes only join peers of the same cluster"
    )


# --- advertise and bind ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "host", "port", "advertise"),
    [
        ("10.1.1.1:4370", "10.1.1.1", 4370, "10.1.1.1"),
        ("0.0.0.0:4370", "0.0.0.0", 4370, None),
        ("[::]:4370", "::", 4370, None),
        ("[::]", "::", DEFAULT_PORT, None),
        ("::", "::", DEFAULT_PORT, None),
        ("0.0.0.0", "0.0.0.0", DEFAULT_PORT, None),
        ("[0:0:0:0:0:0:0:0]:1", "0:0:0:0:0:0:0:0", 1, None),
        ("node7.lan", "node7.lan", DEFAULT_PORT, "node7.lan"),
        ("127.0.0.1:0", "127.0.0.1", 0, "127.0.0.1"),
        ("[::1]:0", "::1", 0, "::1"),
        ("localhost:0", "localhost", 0, "localhost"),
        ("::0", "::0", DEFAULT_PORT, None),
        (" 10.1.1.1:65535 \n", "10.1.1.1", 65535, "10.1.1.1"),
    ],
)
def test_bind_forms(bind: str, host: str, port: int, advertise: str | None) -> None:
    for settings in (resolve(LOCAL_ENV, bind=bind), resolve({**LOCAL_ENV, "HANDOFF_BIND": bind})):
        assert (settings.bind_host, settings.bind_port) == (host, port)
        assert settings.advertise_host == advertise
        assert settings.sources["advertise"] == "default"


@pytest.mark.parametrize(
    "bind",
    ["host:abc", "host:70000", "host:-1", "[::1", "[::1]x", ":4370", "my host:80", "h:²", ""],
)
def test_bind_malformed(bind: str) -> None:
    messages = [config_error(LOCAL_ENV, bind=bind)]
    if bind:  # a blank variable counts as unset
        messages.append(config_error({**LOCAL_ENV, "HANDOFF_BIND": bind}))
    for message in messages:
        assert "HANDOFF_BIND (Node(bind=...))" in message


def test_bind_malformed_from_environment() -> None:
    message = config_error({**LOCAL_ENV, "HANDOFF_BIND": "0.0.0.0:http"})
    assert message.startswith("HANDOFF_BIND (Node(bind=...))")
    assert "'http'" in message
    assert "1 and 65535" in message


@pytest.mark.parametrize(
    ("advertise", "expected"),
    [
        ("10.0.0.9", "10.0.0.9"),
        ("[fdaa::9]", "fdaa::9"),
        ("fdaa::9", "fdaa::9"),
        ("node.example.com", "node.example.com"),
        (" 10.0.0.9\n", "10.0.0.9"),
    ],
)
def test_advertise_forms(advertise: str, expected: str) -> None:
    assert resolve(LOCAL_ENV, advertise=advertise).advertise_host == expected
    assert resolve({**LOCAL_ENV, "HANDOFF_ADVERTISE": advertise}).advertise_host == expected


@pytest.mark.parametrize(
    ("advertise", "problem"),
    [
        ("10.0.0.9:4370", "HOST:PORT"),
        ("0.0.0.0", "wildcard"),
        ("::", "wildcard"),
        ("[::]", "wildcard"),
        ("my host", "not a host"),
        ("[fdaa::9]:4370", "not a host"),
        ("", "empty"),
    ],
)
def test_advertise_malformed(advertise: str, problem: str) -> None:
    message = config_error(LOCAL_ENV, advertise=advertise)
    assert "HANDOFF_ADVERTISE (Node(advertise=...))" in message
    assert problem in message


def test_bad_platform_advertise_names_its_source() -> None:
    message = config_error({**K8S_ENV, "POD_IP": "10.0.0.1:80"})
    assert "HANDOFF_ADVERTISE" in message
    assert "from POD_IP" in message


def test_explicit_bind_does_not_override_platform_advertise() -> None:
    settings = resolve(FLY_ENV, bind="[::]:5000")
    assert settings.advertise_host == "fdaa:0:1:a7b:1::2"
    assert settings.bind_port == 5000


def test_loopback_bind_with_routable_advertise_warns() -> None:
    settings = resolve(FLY_ENV, bind="127.0.0.1:4370")
    (warning,) = settings.warnings
    assert "loopback" in warning
    assert "HANDOFF_BIND" in warning
    assert resolve(LOCAL_ENV, bind="127.0.0.1:1", advertise="localhost").warnings == ()


# --- discovery and DNS server ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("none", DiscoverySpec(kind="none")),
        ("static:10.0.0.1:4370", DiscoverySpec("static", (PeerAddress("10.0.0.1", 4370),))),
        ("dns:shop.internal", DiscoverySpec(kind="dns", name="shop.internal")),
        ("dns:shop.internal:4000", DiscoverySpec(kind="dns", name="shop.internal", port=4000)),
    ],
)
def test_discovery_forms(text: str, spec: DiscoverySpec) -> None:
    assert resolve(LOCAL_ENV, discovery=text).discovery == spec
    assert resolve({**LOCAL_ENV, "HANDOFF_DISCOVERY": text}).discovery == spec


def test_discovery_spec_object_is_used_as_is() -> None:
    spec = DiscoverySpec(kind="dns", name="x.internal", port=1)
    assert resolve(LOCAL_ENV, discovery=spec).discovery is spec


@pytest.mark.parametrize(
    "text", ["dns:", "static:", "static:,", "consul:x", "dns:x:99999", "static:a:²", "dns:a b"]
)
def test_discovery_malformed(text: str) -> None:
    for message in (
        config_error(LOCAL_ENV, discovery=text),
        config_error({**LOCAL_ENV, "HANDOFF_DISCOVERY": text}),
    ):
        assert "HANDOFF_DISCOVERY (Node(discovery=...))" in message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("dns:nu internal", "'nu internal' is not a DNS name (it contains whitespace)"),
        ("dns:my_app!.internal", "'my_app!.internal' is not a DNS name"),
        ("static:a:1;b:2", "separate peers with commas, not ';'"),
        ("static:10.0.0.2:4370;10.0.0.3:4370", "separate peers with commas, not ';'"),
        ("static:a$b:1", "'a$b' is neither a host name nor an IP address"),
        ("static:[not-v6]:1", "brackets hold an IPv6 address, and 'not-v6' is none"),
        ("static:a::b::c", "'a::b::c' is neither a host name nor an IP address"),
    ],
)
def test_discovery_messages_say_what_is_wrong(text: str, says: str) -> None:
    # Issue 12: "dns:nu internal" said it needed a DNS name; "static:a:1;b:2" was taken as
    # one host named "a:1;b:2" (to dial on every port of the range).
    assert says in config_error({**LOCAL_ENV, "HANDOFF_DISCOVERY": text})


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("static:a.shop.test:1,b_c.internal.:2", ("a.shop.test", "b_c.internal.")),
        ("static:[fe80::1%eth0]:4370", ("fe80::1%eth0",)),
        ("static:fdaa::3", ("fdaa::3",)),
        ("static:fly-local-6pn", ("fly-local-6pn",)),
    ],
)
def test_host_names_and_addresses_are_taken(text: str, hosts: tuple[str, ...]) -> None:
    spec = resolve({**LOCAL_ENV, "HANDOFF_DISCOVERY": text}).discovery
    assert (*(a.host for a in spec.static), *spec.static_hosts) == hosts


@pytest.mark.parametrize("discovery", ["fly", DiscoverySpec(kind="fly")])
def test_fly_discovery_off_fly(discovery: str | DiscoverySpec) -> None:
    message = config_error(LOCAL_ENV, discovery=discovery)
    assert "HANDOFF_DISCOVERY (Node(discovery=...))" in message
    assert "FLY_APP_NAME" in message
    assert "dns:" in message


def test_fly_discovery_off_fly_from_environment() -> None:
    message = config_error({**K8S_ENV, "HANDOFF_DISCOVERY": "fly"})
    assert "FLY_APP_NAME" in message


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("10.0.0.53", ("10.0.0.53", 53)),
        ("10.0.0.53:5353", ("10.0.0.53", 5353)),
        ("[fdaa::3]:53", ("fdaa::3", 53)),
        ("[fdaa::3]", ("fdaa::3", 53)),
        ("fdaa::3", ("fdaa::3", 53)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
    ],
)
def test_dns_server_forms(text: str, server: tuple[str, int]) -> None:
    assert resolve(LOCAL_ENV, dns_server=text).dns_server == server
    assert resolve({**LOCAL_ENV, "HANDOFF_DNS_SERVER": text}).dns_server == server


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("10.0.0.53:x", "65535"),
        ("10.0.0.53:0", "65535"),
        ("dns.example.com", "not an IP address"),
        ("[fdaa::3", "'['"),
    ],
)
def test_dns_server_malformed(text: str, problem: str) -> None:
    message = config_error({**LOCAL_ENV, "HANDOFF_DNS_SERVER": text})
    assert "HANDOFF_DNS_SERVER (Node(dns_server=...))" in message
    assert problem in message


# --- timeouts --------------------------------------------------------------------------

TIMEOUTS = [
    ("drain_timeout", "HANDOFF_DRAIN_TIMEOUT"),
    ("warmup_timeout", "HANDOFF_WARMUP_TIMEOUT"),
    ("heartbeat_timeout", "HANDOFF_HEARTBEAT_TIMEOUT"),
    ("heartbeat_interval", "HANDOFF_HEARTBEAT_INTERVAL"),
    ("poll_interval", "HANDOFF_POLL_INTERVAL"),
    ("handshake_timeout", "HANDOFF_HANDSHAKE_TIMEOUT"),
    ("connect_timeout", "HANDOFF_CONNECT_TIMEOUT"),
]


@pytest.mark.parametrize(("kwarg", "env"), TIMEOUTS)
@pytest.mark.parametrize("text", ["abc", "-1", "0", "-0", "nan", "inf", "-inf", "1e999", "5s"])
def test_timeout_bad_environment_value(kwarg: str, env: str, text: str) -> None:
    message = config_error({**LOCAL_ENV, env: text})
    assert message.startswith(f"{env} (Node({kwarg}=...))")
    assert repr(text) in message
    assert "seconds" in message


@pytest.mark.parametrize(("kwarg", "env"), TIMEOUTS)
@pytest.mark.parametrize("value", [0, -1, -0.5, math.nan, math.inf, True, "5"])
def test_timeout_bad_argument(kwarg: str, env: str, value: object) -> None:
    message = config_error(LOCAL_ENV, **{kwarg: value})
    assert message.startswith(f"{env} (Node({kwarg}=...))")


@pytest.mark.parametrize(("kwarg", "env"), TIMEOUTS)
def test_timeout_accepts_small_positive_values(kwarg: str, env: str) -> None:
    settings = resolve({**LOCAL_ENV, env: " 0.01\n"})
    assert getattr(settings, kwarg) == 0.01


@pytest.mark.parametrize(
    ("environ", "kwargs"),
    [
        ({"HANDOFF_HEARTBEAT_INTERVAL": "3"}, {}),
        ({"HANDOFF_HEARTBEAT_INTERVAL": "5"}, {}),
        ({"HANDOFF_HEARTBEAT_TIMEOUT": "1"}, {"heartbeat_interval": 1}),
        ({}, {"heartbeat_interval": 2, "heartbeat_timeout": 1}),
    ],
)
def test_heartbeat_interval_must_be_below_timeout(
    environ: dict[str, str], kwargs: dict[str, Any]
) -> None:
    message = config_error({**LOCAL_ENV, **environ}, **kwargs)
    assert "HANDOFF_HEARTBEAT_INTERVAL" in message
    assert "HANDOFF_HEARTBEAT_TIMEOUT" in message
    assert "shorter than the timeout" in message


def test_heartbeat_interval_defaults_to_a_third_of_the_timeout() -> None:
    settings = resolve({**LOCAL_ENV, "HANDOFF_HEARTBEAT_TIMEOUT": "0.3"})
    assert settings.heartbeat_interval == pytest.approx(0.1)
    assert settings.sources["heartbeat_interval"] == "default"


def test_drain_timeout_platform_defaults() -> None:
    assert resolve(FLY_ENV).drain_timeout == 4.0
    assert resolve(K8S_ENV).drain_timeout == 25.0
    assert resolve(LOCAL_ENV).drain_timeout == 10.0
    assert resolve({**FLY_ENV, "HANDOFF_DRAIN_TIMEOUT": "55"}).drain_timeout == 55.0


# --- cookie ----------------------------------------------------------------------------


def test_missing_cookie_explains_what_and_how() -> None:
    message = config_error({"HANDOFF_CLUSTER": "shop"})
    assert "HANDOFF_COOKIE" in message
    assert "Node(cookie=...)" in message
    assert "shared secret" in message
    assert "every node" in message
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in message
    assert "fly secrets set HANDOFF_COOKIE=" in message
    assert "Secret" in message
    assert "no default" in message


def test_missing_cookie_is_an_error_on_every_platform() -> None:
    for environ in (FLY_ENV, K8S_ENV):
        without = {k: v for k, v in environ.items() if k != "HANDOFF_COOKIE"}
        assert "HANDOFF_COOKIE" in config_error(without)


@pytest.mark.parametrize(
    ("environ", "kwargs", "problem"),
    [
        (LOCAL_ENV, {"cookie": "short-secret"}, "12 bytes"),
        (LOCAL_ENV, {"cookie": b"fifteen-bytes!!"}, "15 bytes"),
        ({**LOCAL_ENV, "HANDOFF_COOKIE": "hunter2hunter2\n"}, {}, "14 bytes"),
        (LOCAL_ENV, {"cookie": "   \n\t "}, "whitespace"),
        (LOCAL_ENV, {"cookie": b" \r\n"}, "whitespace"),
        ({**LOCAL_ENV, "HANDOFF_COOKIE": "   \n"}, {}, "whitespace"),
        (LOCAL_ENV, {"cookie": ""}, "empty"),
        ({**LOCAL_ENV, "HANDOFF_COOKIE": ""}, {}, "empty"),
        (LOCAL_ENV, {"cookie": 1234567890123456789}, "str or bytes"),
    ],
)
def test_bad_cookie(environ: dict[str, str], kwargs: dict[str, Any], problem: str) -> None:
    message = config_error(environ, **kwargs)
    assert message.startswith("HANDOFF_COOKIE (Node(cookie=...))")
    assert problem in message
    secret = kwargs.get("cookie", environ.get("HANDOFF_COOKIE"))
    if isinstance(secret, str) and secret.strip():
        assert secret.strip() not in message


def test_short_cookie_message_says_why_and_how() -> None:
    message = config_error(LOCAL_ENV, cookie="short-secret")
    assert "at least 16" in message
    assert "offline" in message
    assert "secrets.token_urlsafe" in message


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("0123456789abcdef", b"0123456789abcdef"),
        ("  0123456789abcdef\n", b"0123456789abcdef"),
        (b"0123456789abcdef\r\n", b"0123456789abcdef"),
        ("éééééééé", "éééééééé".encode()),
        (bytes(range(16)), bytes(range(16))),
    ],
)
def test_cookie_normalisation(cookie: str | bytes, expected: bytes) -> None:
    assert resolve(LOCAL_ENV, cookie=cookie).cookie == expected


def test_cookie_from_env_file_with_newline_matches_argument() -> None:
    from_env = resolve({**LOCAL_ENV, "HANDOFF_COOKIE": COOKIE + "\n"})
    from_arg = resolve(LOCAL_ENV, cookie=COOKIE.encode())
    assert from_env.cookie == from_arg.cookie == COOKIE.encode()


def test_cookie_never_shown() -> None:
    settings = resolve({**LOCAL_ENV, "HANDOFF_COOKIE": COOKIE})
    for text in (repr(settings), str(settings), str(describe(settings))):
        assert COOKIE not in text
        assert "cookie=" not in text
    assert ("cookie", f"(set, {len(COOKIE)} bytes)", "HANDOFF_COOKIE") in describe(settings)


# --- names -----------------------------------------------------------------------------

NAMES = [
    ("cluster", "HANDOFF_CLUSTER", "cluster name"),
    ("name", "HANDOFF_NODE_NAME", "node name"),
    ("release", "HANDOFF_RELEASE", "release"),
]


@pytest.mark.parametrize(("kwarg", "env", "what"), NAMES)
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("has space", "whitespace"),
        ("tab\there", "whitespace"),
        ("nul\x00byte", "unprintable"),
        ("bell\x07", "unprintable"),
        ("x" * 129, "129 characters"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_bad_names(kwarg: str, env: str, what: str, value: str, problem: str) -> None:
    message = config_error(LOCAL_ENV, **{kwarg: value})
    assert message.startswith(f"{env} (Node({kwarg}=...))")
    assert what in message
    assert problem in message


@pytest.mark.parametrize(("kwarg", "env", "what"), NAMES)
def test_bad_names_from_environment(kwarg: str, env: str, what: str) -> None:
    message = config_error({**LOCAL_ENV, env: "two words"})
    assert message.startswith(f"{env} (Node({kwarg}=...))")
    assert "'two words'" in message


@pytest.mark.parametrize(("kwarg", "env", "what"), NAMES)
@pytest.mark.parametrize("value", ["a", "x" * 128, "shop_v2.eu-west", "ünïcødé", "a/b:c@d"])
def test_good_names(kwarg: str, env: str, what: str, value: str) -> None:
    attribute = "node_name" if kwarg == "name" else kwarg
    assert getattr(resolve(LOCAL_ENV, **{kwarg: value}), attribute) == value
    assert getattr(resolve({**LOCAL_ENV, env: f" {value}\n"}), attribute) == value


def test_bad_platform_name_names_its_source() -> None:
    message = config_error({**FLY_ENV, "FLY_IMAGE_REF": "registry.fly.io/shop:" + "x" * 200})
    assert message.startswith("HANDOFF_RELEASE (Node(release=...)) (from FLY_IMAGE_REF)")


def test_long_value_is_shortened_in_messages() -> None:
    message = config_error(LOCAL_ENV, cluster="y" * 1000)
    assert len(message) < 300


# --- TLS -------------------------------------------------------------------------------


def _pem_files(directory: Path) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(cert=directory / "node.crt", key=directory / "node.key", ca=directory / "ca")
    for path in (files.cert, files.key, files.ca):
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
    return files


def _tls_env(files: TLSFiles) -> dict[str, str]:
    return {
        "HANDOFF_TLS_CERT": str(files.cert),
        "HANDOFF_TLS_KEY": str(files.key),
        "HANDOFF_TLS_CA": str(files.ca),
    }


def test_tls_all_three_files(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    settings = resolve({**LOCAL_ENV, **_tls_env(files)})
    assert settings.tls == files
    assert settings.sources["tls_cert"] == "HANDOFF_TLS_CERT"
    by_argument = resolve(LOCAL_ENV, tls_cert=files.cert, tls_key=files.key, tls_ca=files.ca)
    assert by_argument.tls == files


def test_tls_defaults_to_none() -> None:
    assert resolve(LOCAL_ENV).tls is None


@pytest.mark.parametrize(
    ("present", "mentions"),
    [
        (("HANDOFF_TLS_CERT",), ("HANDOFF_TLS_KEY", "Node(tls_key=...)", "private key")),
        (("HANDOFF_TLS_KEY",), ("HANDOFF_TLS_CERT", "Node(tls_cert=...)", "private key")),
        (("HANDOFF_TLS_CERT", "HANDOFF_TLS_CA"), ("HANDOFF_TLS_KEY", "both")),
        (("HANDOFF_TLS_CERT", "HANDOFF_TLS_KEY"), ("HANDOFF_TLS_CA", "Node(tls_ca=...)", "mutual")),
        (("HANDOFF_TLS_CA",), ("HANDOFF_TLS_CERT", "HANDOFF_TLS_KEY", "mutual", "all three")),
    ],
)
def test_tls_incomplete(
    tmp_path: Path, present: tuple[str, ...], mentions: tuple[str, ...]
) -> None:
    environ = {k: v for k, v in _tls_env(_pem_files(tmp_path)).items() if k in present}
    message = config_error({**LOCAL_ENV, **environ})
    for text in mentions:
        assert text in message


@pytest.mark.parametrize(
    ("env", "kwarg"),
    [
        ("HANDOFF_TLS_CERT", "tls_cert"),
        ("HANDOFF_TLS_KEY", "tls_key"),
        ("HANDOFF_TLS_CA", "tls_ca"),
    ],
)
def test_tls_missing_file(tmp_path: Path, env: str, kwarg: str) -> None:
    files = _pem_files(tmp_path)
    missing = tmp_path / "nowhere" / "missing.pem"
    message = config_error({**LOCAL_ENV, **_tls_env(files), env: str(missing)})
    assert message.startswith(f"{env} (Node({kwarg}=...))")
    assert str(missing) in message
    assert "does not exist" in message


def test_tls_directory_instead_of_file(tmp_path: Path) -> None:
    files = _pem_files(tmp_path / "pem")
    message = config_error({**LOCAL_ENV, **_tls_env(files)}, tls_ca=tmp_path)
    assert message.startswith("HANDOFF_TLS_CA (Node(tls_ca=...))")
    assert "directory" in message


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root reads files whatever the mode"
)
def test_tls_unreadable_file(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    files.key.chmod(0)
    try:
        message = config_error({**LOCAL_ENV, **_tls_env(files)})
    finally:
        files.key.chmod(0o600)
    assert message.startswith("HANDOFF_TLS_KEY (Node(tls_key=...))")
    assert str(files.key) in message
    assert "permission denied" in message


def test_tls_permission_denied_whoever_runs_the_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _pem_files(tmp_path)
    real_open = Path.open

    def deny_key(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == files.key:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny_key)
    message = config_error({**LOCAL_ENV, **_tls_env(files)})
    assert message.startswith("HANDOFF_TLS_KEY (Node(tls_key=...))")
    assert "permission denied" in message


# --- control socket ----------------------------------------------------------------------


def test_control_socket_default_is_per_user_and_cluster() -> None:
    settings = resolve(LOCAL_ENV)
    assert settings.control_socket == Path(f"/tmp/handoff-{os.geteuid()}/shop.sock")
    assert settings.sources["control_socket"] == "default"
    runtime = resolve({**LOCAL_ENV, "XDG_RUNTIME_DIR": "/run/user/1000"})
    assert runtime.control_socket == Path(f"/run/user/1000/handoff-{os.geteuid()}/shop.sock")


def test_control_socket_default_ignores_a_relative_runtime_dir() -> None:
    assert control_directory({"XDG_RUNTIME_DIR": "run"}) == Path(f"/tmp/handoff-{os.geteuid()}")


def test_control_socket_default_keeps_slashes_out_of_the_file_name() -> None:
    path = default_control_socket("a/b", {})
    assert path.parent == control_directory({})
    assert path.name == "a_b.sock"


def test_control_socket_from_environment_and_argument() -> None:
    env = {**LOCAL_ENV, "HANDOFF_CONTROL_SOCKET": "/run/handoff/shop.sock"}
    settings = resolve(env)
    assert settings.control_socket == Path("/run/handoff/shop.sock")
    assert settings.sources["control_socket"] == "HANDOFF_CONTROL_SOCKET"
    chosen = resolve(env, control_socket=Path("/srv/ctl.sock"))
    assert chosen.control_socket == Path("/srv/ctl.sock")
    assert chosen.sources["control_socket"] == "argument"


@pytest.mark.parametrize("value", ["none", "None", " none "])
def test_control_socket_none_disables_it(value: str) -> None:
    settings = resolve({**LOCAL_ENV, "HANDOFF_CONTROL_SOCKET": value})
    assert settings.control_socket is None
    rows = {s: v for s, v, _ in describe(settings)}
    assert rows["control_socket"] == "(disabled)"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("relative/ctl.sock", "not an absolute path"),
        ("/" + "x" * 200, "bytes long"),
        ("/tmp/a\0b", "NUL"),
    ],
)
def test_control_socket_malformed(value: str, problem: str) -> None:
    message = config_error({**LOCAL_ENV, "HANDOFF_CONTROL_SOCKET": value})
    assert "HANDOFF_CONTROL_SOCKET" in message
    assert problem in message


def test_control_socket_default_too_long_is_a_warning_not_an_error() -> None:
    settings = resolve({**LOCAL_ENV, "XDG_RUNTIME_DIR": "/" + "r" * 120})
    assert settings.control_socket is None
    assert any("HANDOFF_CONTROL_SOCKET" in warning for warning in settings.warnings)


# --- Settings and describe -------------------------------------------------------------


def test_settings_is_frozen_and_hashable() -> None:
    settings = resolve(FLY_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cluster = "other"  # type: ignore[misc]
    assert hash(settings) == hash(resolve(FLY_ENV))
    with pytest.raises(TypeError):
        settings.sources["cluster"] = "x"  # type: ignore[index]


def test_sources_do_not_affect_equality() -> None:
    by_env = resolve({**LOCAL_ENV, "HANDOFF_RELEASE": "v1"})
    by_arg = resolve(LOCAL_ENV, release="v1")
    assert by_env == by_arg
    assert by_env.sources["release"] != by_arg.sources["release"]


def test_settings_can_be_built_directly() -> None:
    settings = dataclasses.replace(resolve(LOCAL_ENV), warnings=("x",))
    assert settings.warnings == ("x",)


def test_describe_covers_every_setting_with_its_source(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    settings = resolve(
        {**FLY_ENV, "HANDOFF_DNS_SERVER": "fdaa::3", "HANDOFF_TLS_CA": str(files.ca)},
        snapshot_dir=tmp_path,
        discovery="static:a:1,[fdaa::5]:2",
        tls_cert=files.cert,
        tls_key=files.key,
    )
    rows = {setting: (value, source) for setting, value, source in describe(settings)}
    assert rows == {
        "platform": ("fly", "fly"),
        "cluster": ("shop", "fly"),
        "cookie": (f"(set, {len(COOKIE)} bytes)", "HANDOFF_COOKIE"),
        "release": ("deployment-01JABCDEF", "fly"),
        "node_name": ("683d314fdd4d68", "fly"),
        "bind": ("[::]:4370", "fly"),
        "port_range": ("16 (ports 4370..4385)", "default"),
        "advertise": ("fdaa:0:1:a7b:1::2", "fly"),
        "discovery": ("static:a:1,[fdaa::5]:2", "argument"),
        "dns_server": ("[fdaa::3]:53", "HANDOFF_DNS_SERVER"),
        "snapshot_dir": (str(tmp_path), "argument"),
        "snapshot_url": ("(none)", "default"),
        "drain_timeout": ("4 s", "fly"),
        "warmup_timeout": ("10 s", "default"),
        "precopy": ("off", "default"),
        "tls_cert": (str(files.cert), "argument"),
        "tls_key": (str(files.key), "argument"),
        "tls_ca": (str(files.ca), "HANDOFF_TLS_CA"),
        "heartbeat_timeout": ("3 s", "default"),
        "heartbeat_interval": ("1 s", "default"),
        "poll_interval": ("5 s", "default"),
        "handshake_timeout": ("5 s", "default"),
        "connect_timeout": ("2 s", "default"),
        "region": ("ams", "fly"),
        "fly_app": ("shop", "fly"),
        "control_socket": (f"/tmp/handoff-{os.geteuid()}/shop.sock", "default"),
    }


def test_describe_local_defaults() -> None:
    rows = {setting: (value, source) for setting, value, source in describe(resolve(LOCAL_ENV))}
    assert rows["platform"] == ("local", "default")
    assert rows["cluster"] == ("shop", "HANDOFF_CLUSTER")
    assert rows["discovery"] == ("none", "default")
    assert rows["dns_server"][1] == "default"
    assert rows["tls_cert"][1] == "default"
    assert rows["region"] == ("(none)", "default")
    sources = {source for _, source in rows.values()}
    assert sources <= {"argument", "default", "fly", "kubernetes"} | {
        name for name, _ in ENVIRONMENT_VARIABLES
    }


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("dns:shop.internal", "dns:shop.internal"),
        ("dns:shop.internal:4000", "dns:shop.internal:4000"),
        ("none", "none"),
    ],
)
def test_describe_discovery_round_trips(text: str, shown: str) -> None:
    rows = {s: v for s, v, _ in describe(resolve(LOCAL_ENV, discovery=text))}
    assert rows["discovery"] == shown
    assert (
        resolve(LOCAL_ENV, discovery=shown).discovery
        == resolve(LOCAL_ENV, discovery=text).discovery
    )


def test_describe_without_sources_says_default() -> None:
    settings = dataclasses.replace(resolve(LOCAL_ENV), sources={})
    assert {source for _, _, source in describe(settings)} == {"default"}


# --- the documented contract -----------------------------------------------------------

CONTRACT = {
    "HANDOFF_CLUSTER",
    "HANDOFF_COOKIE",
    "HANDOFF_RELEASE",
    "HANDOFF_NODE_NAME",
    "HANDOFF_BIND",
    "HANDOFF_DISCOVERY",
    "HANDOFF_DNS_SERVER",
    "HANDOFF_SNAPSHOT_DIR",
    "HANDOFF_SNAPSHOT_URL",
    "HANDOFF_DRAIN_TIMEOUT",
    "HANDOFF_WARMUP_TIMEOUT",
    "HANDOFF_TLS_CERT",
    "HANDOFF_TLS_KEY",
    "HANDOFF_TLS_CA",
    "HANDOFF_HEARTBEAT_TIMEOUT",
    "HANDOFF_HEARTBEAT_INTERVAL",
    "HANDOFF_POLL_INTERVAL",
    "HANDOFF_HANDSHAKE_TIMEOUT",
    "HANDOFF_CONNECT_TIMEOUT",
    "HANDOFF_ADVERTISE",
    "HANDOFF_CONTROL_SOCKET",
    "HANDOFF_PORT_RANGE",
    "HANDOFF_PRECOPY",
}


def test_environment_variables_document_the_contract() -> None:
    names = [name for name, _ in ENVIRONMENT_VARIABLES]
    assert len(names) == len(set(names))
    assert set(names) == CONTRACT
    assert all(description.strip() for _, description in ENVIRONMENT_VARIABLES)
    assert {case.env_name for case in CASES} <= CONTRACT


def _outcome(environ: Mapping[str, str]) -> Settings | str:
    try:
        return resolve(environ)
    except ConfigError as exc:
        return str(exc)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_every_documented_variable_is_read(name: str) -> None:
    # Garbage in a documented variable must change the outcome (an error naming it, or a
    # different value), which proves the resolver reads it under exactly that name.
    outcome = _outcome({**LOCAL_ENV, name: "[garbage"})
    if isinstance(outcome, str):
        assert name in outcome
    else:
        assert outcome != resolve(LOCAL_ENV)


def test_every_keyword_has_one_row_of_the_ladder() -> None:
    # resolve_settings hands each row the keyword argument the row names.
    keywords = set(inspect.signature(resolve_settings).parameters) - {"environ"}
    rows = [setting.argument for setting in LADDER]
    assert len(rows) == len(set(rows))
    assert set(rows) == keywords
    assert {setting.env for setting in LADDER} == CONTRACT


def test_an_unknown_handoff_variable_warns_and_names_the_closest_known_one() -> None:
    environ = {
        "HANDOFF_COOKIE": "Qm7vR2xK9pLwT4nZ8cYb3HdF6sJ1gA5e",
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_DISCOVRY": "dns:shop.internal",  # the typo leaves discovery at its default
        "HANDOFF_DRAINTIMEOUT": "3",
        "HANDOFF_SOMETHING_ELSE": "1",
        "HANDOFF_TEST_STATE": "{}",  # handoff.testing's, not a setting: no warning
        "NOT_OURS": "1",
    }
    settings = resolve_settings(environ=environ)
    assert settings.discovery.kind == "none"  # the typo had no effect: the local default
    unknown = [w for w in settings.warnings if "no setting reads it" in w]
    assert len(unknown) == 3
    assert unknown[0].startswith(
        "'HANDOFF_DISCOVRY' is set but no setting reads it: did you mean HANDOFF_DISCOVERY?"
    )
    assert "did you mean HANDOFF_DRAIN_TIMEOUT?" in unknown[1]
    assert "README's Configuration table" in unknown[2]
    assert not any("TEST_STATE" in w or "NOT_OURS" in w for w in settings.warnings)
