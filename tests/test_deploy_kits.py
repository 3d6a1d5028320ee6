"""The deploy kits (fly/, examples/k8s/) keep the promises a warm deploy depends on.

Each test parses the files as the platform would (TOML, YAML, the Dockerfile's instructions)
and checks one invariant: the stop signal and the grace period around the drain, overlap
between old and new (bluegreen, maxSurge), discovery that sees starting and draining nodes,
probes that point at real routes, no root, no secrets in config, and environment variables
that the library (or the example) actually reads, with values it accepts.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from fastapi.routing import APIRoute

from examples.service import create_app, volume_entrypoint
from examples.service.settings import SHOP_VARIABLES
from handoff.config import ENVIRONMENT_VARIABLES, PLATFORM_VARIABLES, resolve_settings

ROOT = Path(__file__).resolve().parent.parent
FLY = ROOT / "fly"
K8S = ROOT / "examples" / "k8s"
COOKIE = "deploy-kit-test-cookie-0123456789"

#: Names a kit may set besides the library's, the platform's and the shop's, and why.
KIT_HELPERS = {
    "POD_NAMESPACE": "Kubernetes: expanded into HANDOFF_DISCOVERY as $(POD_NAMESPACE)",
}
ALLOWED_ENV = (
    {name for name, _ in ENVIRONMENT_VARIABLES}
    | {name for name, _ in PLATFORM_VARIABLES}
    | {name for name, _ in SHOP_VARIABLES}
    | set(KIT_HELPERS)
)
#: Set per deploy by the platform, or secret: a kit's static config must not fix them.
NEVER_IN_CONFIG = {"HANDOFF_COOKIE", "HANDOFF_RELEASE", "HANDOFF_NODE_NAME"}


def _routes() -> dict[str, set[str]]:
    app = create_app({"HANDOFF_CLUSTER": "shop", "HANDOFF_COOKIE": COOKIE})
    return {
        route.path: set(route.methods or ()) for route in app.routes if isinstance(route, APIRoute)
    }


ROUTES = _routes()


def _seconds(value: object) -> float:
    """A Fly duration: "15s", "1m", "500ms", or a bare number of milliseconds."""
    if isinstance(value, int | float):
        return float(value) / 1000
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value))
    assert match, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
    return float(match.group(1)) * scale


# -- the Dockerfile ----------------------------------------------------------------------------


@dataclass
class Stage:
    """One ``FROM`` stage: its name, base and instructions in order."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, instruction: str) -> str | None:
        found = [args for name, args in self.instructions if name == instruction]
        return found[-1] if found else None


def _dockerfile_stages(path: Path) -> list[Stage]:
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].instructions.append((instruction, args))
    return stages


STAGES = {stage.name: stage for stage in _dockerfile_stages(FLY / "Dockerfile")}
FINAL = _dockerfile_stages(FLY / "Dockerfile")[-1]


def _exec_form(args: str | None) -> list[str]:
    assert args is not None
    command = json.loads(args)  # exec form: no shell between the signal and the process
    assert isinstance(command, list)
    assert all(isinstance(word, str) for word in command)
    return command


def _option(command: list[str], option: str) -> str:
    assert option in command, (option, command)
    return command[command.index(option) + 1]


def _inherited(stage: Stage, instruction: str) -> str | None:
    """The stage's last ``instruction``, or the one it inherits from its base stage."""
    while True:
        own = stage.last(instruction)
        if own is not None or stage.base not in STAGES:
            return own
        stage = STAGES[stage.base]


def _image(stage: Stage) -> str:
    """The image a stage is built on, through any stages in between."""
    while stage.base in STAGES:
        stage = STAGES[stage.base]
    return stage.base


def _cmd(stage: Stage) -> list[str]:
    return _exec_form(_inherited(stage, "CMD"))


UVICORN = _cmd(FINAL)
GRACEFUL_SHUTDOWN = float(_option(UVICORN, "--timeout-graceful-shutdown"))
HTTP_PORT = int(_option(UVICORN, "--port"))


def test_the_image_runs_unprivileged_and_stops_on_sigterm() -> None:
    assert _image(FINAL) == "python:3.11-slim"
    user = _inherited(FINAL, "USER")
    assert user is not None, "the default image must not run as root"
    name, _, group = user.partition(":")
    assert name not in ("root", "0"), user
    assert group not in ("root", "0"), user
    assert name.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert _inherited(FINAL, "STOPSIGNAL") == "SIGTERM"
    assert _inherited(FINAL, "ENTRYPOINT") is None, "nothing between the signal and uvicorn"


def test_the_image_runs_one_uvicorn_worker_with_a_bounded_graceful_shutdown() -> None:
    assert UVICORN[:2] == ["uvicorn", "examples.service.app:app"]
    # Each worker would be a separate node with separate caches: a handoff reaches one.
    assert _option(UVICORN, "--workers") == "1"
    assert 0 < GRACEFUL_SHUTDOWN <= 10, "uvicorn's default waits for open requests forever"
    assert _option(UVICORN, "--host") == "0.0.0.0"


def test_the_image_copies_what_the_repository_has_and_keeps_no_library_sources() -> None:
    copies = [
        args.split()
        for stage in STAGES.values()
        for instruction, args in stage.instructions
        if instruction == "COPY"
    ]
    for words in copies:
        for source in words[:-1]:
            assert (ROOT / source).exists(), source
    # The library runs from site-packages, as `pip install` put it (sources removed after).
    runs = [args for stage in STAGES.values() for name, args in stage.instructions if name == "RUN"]
    assert any("pip install ." in run and "rm -rf /src" in run for run in runs), runs


def test_the_image_holds_no_configuration_secrets() -> None:
    for stage in STAGES.values():
        for instruction, args in stage.instructions:
            if instruction in ("ENV", "ARG"):
                assert "HANDOFF_COOKIE" not in args, "the cookie is a secret, set at run time"


def test_the_volume_stage_drops_root_before_the_service_runs() -> None:
    volume = STAGES["volume"]
    assert _inherited(volume, "USER") is None, "it starts as root to own the volume"
    entrypoint = _exec_form(volume.last("ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "examples.service.volume_entrypoint"]
    assert _cmd(volume) == UVICORN
    source = (ROOT / "examples" / "service" / "volume_entrypoint.py").read_text()
    for call in ("os.setgroups([])", "os.setgid(", "os.setuid(", "os.execvp("):
        assert call in source


def test_the_volume_entrypoint_owns_the_snapshot_dir_then_drops_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []
    snapshot_dir = tmp_path / "volume" / "handoff"
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir / "left-by-root.snapshot").write_bytes(b"")
    user = pwd.struct_passwd(("shop", "x", 10001, 10001, "", "/nonexistent", "/bin/false"))

    def record(name: str) -> Any:
        return lambda *args: calls.append((name, args))

    monkeypatch.setenv("HANDOFF_SNAPSHOT_DIR", str(snapshot_dir))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", lambda name: user)
    for name in ("chown", "setgroups", "setgid", "setuid", "execvp"):
        monkeypatch.setattr(os, name, record(name))
    volume_entrypoint.main(["uvicorn", "examples.service.app:app"])

    names = [name for name, _ in calls]
    # Every chown (as root) comes before root is given up, and the command runs last.
    assert names == ["chown", "chown", "setgroups", "setgid", "setuid", "execvp"]
    assert {args[0] for name, args in calls if name == "chown"} == {
        snapshot_dir,
        snapshot_dir / "left-by-root.snapshot",
    }
    assert all(args[1:] == (10001, 10001) for name, args in calls if name == "chown")
    assert calls[2:5] == [("setgroups", ([],)), ("setgid", (10001,)), ("setuid", (10001,))]
    assert calls[-1] == ("execvp", ("uvicorn", ["uvicorn", "examples.service.app:app"]))


# -- Fly.io ----------------------------------------------------------------------------------


def _fly(name: str) -> dict[str, Any]:
    with (FLY / name).open("rb") as file:
        return tomllib.load(file)


FLY_CONFIGS = ("fly.toml", "fly.rolling.toml")


def _fly_settings(env: Mapping[str, str]) -> Any:
    """The node's settings on a Fly Machine with this [env] (the library validates them)."""
    return resolve_settings(
        environ={
            **env,
            "HANDOFF_COOKIE": COOKIE,  # a secret on Fly
            "FLY_APP_NAME": "warm-handoff-shop",
            "FLY_MACHINE_ID": "683d314fdd4d68",
            "FLY_PRIVATE_IP": "fdaa:0:1:a7b:1::2",
            "FLY_REGION": "ams",
            "FLY_IMAGE_REF": "registry.fly.io/warm-handoff-shop:deployment-01J0000000000000000000",
        }
    )


@pytest.mark.parametrize("name", FLY_CONFIGS)
def test_fly_stops_with_sigterm_and_waits_longer_than_the_drain(name: str) -> None:
    config = _fly(name)
    assert config["kill_signal"] == "SIGTERM"  # Fly's own default is ambiguous (SIGINT)
    kill_timeout = config["kill_timeout"]
    assert isinstance(kill_timeout, int)
    assert kill_timeout <= 300, "Fly's maximum"
    settings = _fly_settings(config["env"])
    assert settings.drain_timeout < kill_timeout
    # After SIGTERM uvicorn first lets requests finish (bounded), then the drain runs.
    assert GRACEFUL_SHUTDOWN + settings.drain_timeout + 1 <= kill_timeout


@pytest.mark.parametrize("name", FLY_CONFIGS)
def test_fly_env_is_what_the_node_reads_and_accepts(name: str) -> None:
    env = _fly(name)["env"]
    assert all(isinstance(value, str) for value in env.values()), "[env] takes strings only"
    assert set(env) <= ALLOWED_ENV, set(env) - ALLOWED_ENV
    assert not any(key.startswith("FLY_") for key in env), "Fly reserves FLY_*"
    assert not set(env) & NEVER_IN_CONFIG, "secrets, and what Fly derives per deploy"
    settings = _fly_settings(env)
    assert settings.platform == "fly"
    assert settings.discovery.kind == "fly"
    assert (settings.bind_host, settings.bind_port) == ("::", 4370), "dual-stack for 6PN"
    assert settings.advertise_host == "fdaa:0:1:a7b:1::2"
    assert settings.release == "deployment-01J0000000000000000000", "new with every deploy"


@pytest.mark.parametrize("name", FLY_CONFIGS)
def test_fly_checks_hit_the_readiness_route_after_the_warm_up(name: str) -> None:
    config = _fly(name)
    service = config["http_service"]
    assert service["internal_port"] == HTTP_PORT
    warmup = _fly_settings(config["env"]).warmup_timeout
    checks = [*service.get("checks", []), *config.get("checks", {}).values()]
    assert checks, "bluegreen needs a health check; rolling waits for them"
    for check in checks:
        assert check.get("method", "GET").upper() == "GET"
        assert "GET" in ROUTES[check["path"]], check["path"]
        assert check["path"] == "/readyz"
        # HTTP answers only after the lifespan startup, which waits up to the warm-up.
        assert _seconds(check["grace_period"]) > warmup
    for check in config.get("checks", {}).values():
        assert check["type"] == "http"
        assert check["port"] == HTTP_PORT


def test_fly_bluegreen_overlaps_old_and_new_without_volumes() -> None:
    config = _fly("fly.toml")
    assert config["deploy"]["strategy"] == "bluegreen"
    assert "mounts" not in config, "bluegreen does not work with volumes"
    assert "HANDOFF_SNAPSHOT_DIR" not in config["env"]
    assert config["http_service"]["auto_stop_machines"] in ("off", False)


def test_fly_rolling_keeps_snapshots_on_a_volume() -> None:
    config = _fly("fly.rolling.toml")
    assert config["deploy"]["strategy"] == "rolling"
    mounts = config["mounts"]
    mounts = mounts if isinstance(mounts, list) else [mounts]
    assert len(mounts) == 1
    destination = PurePosixPath(mounts[0]["destination"])
    assert destination != PurePosixPath("/")
    snapshot_dir = _fly_settings(config["env"]).snapshot_dir
    assert snapshot_dir is not None
    assert PurePosixPath(snapshot_dir).is_relative_to(destination), (snapshot_dir, destination)
    # The volume may be root-owned: the stage built for it fixes that, then drops root.
    assert config["build"]["build-target"] == "volume"
    assert "volume" in STAGES


# Flags of the flyctl commands fly/README.md uses, as the flyctl reference lists them.
FLYCTL_FLAGS = {
    ("launch",): {"--no-deploy", "--copy-config", "--config", "--dockerfile", "--name", "-c"},
    ("deploy",): {"--config", "-c", "--dockerfile", "--signal", "--strategy", "--ignorefile"},
    ("secrets", "set"): {"--config", "-c", "--stage", "-a", "--app"},
    ("logs",): {"--config", "-c", "--machine", "-m", "-a", "--app"},
    ("status",): {"--config", "-c", "-a", "--app"},
    ("machine", "list"): {"--config", "-c", "-a", "--app", "-q", "--quiet"},
    ("ssh", "console"): {"--config", "-c", "--machine", "-C", "--command", "-a", "--app"},
    ("scale", "count"): {"--config", "-c", "-a", "--app"},
    ("storage", "create"): {"--public"},
}


def _fly_commands(text: str) -> Iterator[list[str]]:
    """The ``fly ...`` command lines of the README's shell code blocks."""
    shell = False
    for line in text.splitlines():
        if line.startswith("```"):
            shell = not shell and line[3:].strip() in ("sh", "shell", "bash")
            continue
        words = shlex.split(line) if shell else []
        if words[:1] == ["fly"]:
            yield words[1:]


def test_the_fly_walkthrough_uses_only_real_flyctl_flags() -> None:
    commands = list(_fly_commands((FLY / "README.md").read_text()))
    assert commands, "the README walks through flyctl commands"
    for words in commands:
        known = next((key for key in FLYCTL_FLAGS if tuple(words[: len(key)]) == key), None)
        assert known is not None, f"an unchecked flyctl command: fly {' '.join(words)}"
        for word in words[len(known) :]:
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                assert flag in FLYCTL_FLAGS[known], f"fly {' '.join(words)}: {flag}"


# -- Kubernetes ------------------------------------------------------------------------------


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    documents: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") != "Kustomization":
                documents[(document["kind"], document["metadata"]["name"])] = document
    return documents


K8S_OBJECTS = _k8s()
DEPLOYMENT = K8S_OBJECTS[("Deployment", "shop")]
POD = DEPLOYMENT["spec"]["template"]
CONTAINER = POD["spec"]["containers"][0]
ENV = {item["name"]: item for item in CONTAINER["env"]}


def _k8s_settings() -> Any:
    """The node's settings in the Pod (secrets, fieldRefs and $(VAR)s filled in)."""
    environ = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "HOSTNAME": "shop-5d9c7b6f4-x2x7q",
    }
    field_values = {
        "status.podIP": "10.1.2.3",
        "metadata.namespace": "default",
        **{f"metadata.labels['{key}']": value for key, value in POD["metadata"]["labels"].items()},
    }
    for item in CONTAINER["env"]:
        if "value" in item:
            environ[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: environ[m.group(1)], item["value"]
            )
        elif "fieldRef" in item["valueFrom"]:
            environ[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            environ[item["name"]] = COOKIE
    return resolve_settings(environ=environ)


def test_k8s_rolls_out_new_pods_before_terminating_old_ones() -> None:
    strategy = DEPLOYMENT["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert int(strategy["rollingUpdate"]["maxSurge"]) >= 1


def test_k8s_grace_period_covers_the_drain() -> None:
    settings = _k8s_settings()
    grace = POD["spec"]["terminationGracePeriodSeconds"]
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["handoff", "drain"]
    drain = float(_option(command, "--timeout"))
    assert drain <= settings.drain_timeout
    # preStop (the drain) and then the TERM (uvicorn's graceful shutdown) share the period.
    assert settings.drain_timeout < grace
    assert drain + GRACEFUL_SHUTDOWN + 1 <= grace


def test_k8s_probes_hit_the_apps_routes() -> None:
    ports = {port["name"]: port["containerPort"] for port in CONTAINER["ports"]}
    assert ports["http"] == HTTP_PORT
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = CONTAINER[kind]["httpGet"]
        assert "GET" in ROUTES[probe["path"]], (kind, probe)
        assert probe["port"] in ports, (kind, probe)
    # HTTP answers only after the warm-up: the startup probe must allow for it, or the
    # liveness probe restarts a Pod that is waiting for its handoff.
    startup = CONTAINER["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget > _k8s_settings().warmup_timeout


def test_k8s_env_is_what_the_node_reads_and_accepts() -> None:
    names = [item["name"] for item in CONTAINER["env"]]
    assert len(names) == len(set(names))
    assert set(names) <= ALLOWED_ENV, set(names) - ALLOWED_ENV
    assert ENV["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    secret = ENV["HANDOFF_COOKIE"]["valueFrom"]["secretKeyRef"]
    assert secret["name"]
    assert secret["key"]
    # The release comes from a label of the Pod template: it changes with each rollout.
    label_ref = ENV["HANDOFF_RELEASE"]["valueFrom"]["fieldRef"]["fieldPath"]
    label = re.fullmatch(r"metadata\.labels\['(.+)'\]", label_ref)
    assert label, label_ref
    assert label.group(1) in POD["metadata"]["labels"]
    assert "HANDOFF_NODE_NAME" not in ENV, "the Pod name (HOSTNAME) is unique; keep it"
    for item in CONTAINER["env"]:
        for reference in re.findall(r"\$\((\w+)\)", item.get("value", "")):
            assert names.index(reference) < names.index(item["name"]), "defined before use"
    settings = _k8s_settings()
    assert settings.platform == "kubernetes"
    assert settings.advertise_host == "10.1.2.3"
    assert settings.release == POD["metadata"]["labels"]["app.kubernetes.io/version"]


def test_k8s_discovery_service_lists_unready_pods_by_a_named_port() -> None:
    settings = _k8s_settings()
    assert settings.discovery.kind == "dns"
    match = re.fullmatch(
        r"dns:_(?P<port>[a-z0-9-]+)\._tcp\.(?P<service>[a-z0-9-]+)\.default\.svc\.cluster\.local",
        ENV["HANDOFF_DISCOVERY"]["value"].replace("$(POD_NAMESPACE)", "default"),
    )
    assert match, ENV["HANDOFF_DISCOVERY"]
    service = K8S_OBJECTS[("Service", match.group("service"))]["spec"]
    assert service["clusterIP"] == "None", "headless: DNS lists the Pods themselves"
    # Starting successors are not Ready until warm, draining Pods are terminating: both
    # must stay in DNS, or nodes cannot find the peers that matter most.
    assert service["publishNotReadyAddresses"] is True
    (port,) = [p for p in service["ports"] if p["name"] == match.group("port")]
    assert port["protocol"] == "TCP"
    container_ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert container_ports[port["targetPort"]] == settings.bind_port
    assert service["selector"].items() <= POD["metadata"]["labels"].items()


def test_k8s_app_service_serves_http_of_ready_pods() -> None:
    service = K8S_OBJECTS[("Service", "shop")]["spec"]
    assert "clusterIP" not in service
    assert not service.get("publishNotReadyAddresses", False), "clients wait for readiness"
    assert service["selector"].items() <= POD["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]


def test_k8s_pod_runs_as_the_images_unprivileged_user() -> None:
    security = POD["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    user = _inherited(FINAL, "USER")
    assert user is not None
    assert str(security["runAsUser"]) == user.partition(":")[0]
    container = CONTAINER["securityContext"]
    assert container["allowPrivilegeEscalation"] is False


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


# -- what the image installs ----------------------------------------------------------------


def test_pyproject_packages_every_handoff_subpackage() -> None:
    """The image installs the library with ``pip install .``: a subpackage missing from
    ``[tool.setuptools] packages`` is missing from the wheel, and ``import handoff`` fails."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        packages = set(tomllib.load(file)["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "handoff").rglob("__init__.py")
        if "adapters" not in init.parent.relative_to(ROOT / "handoff").parts
    }
    assert found <= packages, sorted(found - packages)
