"""A warm deploy of the example image between containers found through Docker's DNS.

With a Docker daemon: the image is built from fly/Dockerfile; an old and a new container
share a network alias, so ``dns:<alias>`` discovery finds both through Docker's embedded DNS
(as ``<app>.internal`` does on Fly); the old one is warmed, stopped gracefully (``docker
stop``: SIGTERM, SIGKILL only after the timeout; testcontainers' own ``stop()`` is a forced
removal), and the new one must come up warm.

In CI (.ci/run) the daemon is one of the suite's own: .ci/docker-netns runs it in a network
namespace with a locally built base image, and exports ``DOCKER_HOST`` and
``HANDOFF_TEST_DOCKER_NETNS``; the test's thread enters that namespace, where the published
ports are. If the engine could not be started there, ``HANDOFF_TEST_DOCKER_UNAVAILABLE``
says why and these tests skip with that reason; without a daemon at all they skip too.

The same scenario runs everywhere as processes: two uvicorn children on 127.0.0.2 and
127.0.0.3 found through a real DNS server (``DNSResponder``) that serves one name with both
addresses.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker
import httpx
import pytest
from docker.errors import DockerException
from testcontainers.core.container import DockerContainer
from testcontainers.core.image import DockerImage
from testcontainers.core.network import Network

from examples.service.local_deploy import (
    DRAIN_REPORT,
    SERVING,
    DeployOutcome,
    LineWatcher,
    ServiceProcess,
    joined,
    warm_deploy,
)
from handoff.testing import DNSResponder, free_port, free_port_on_all
from tests import _netns as netns
from tests._helpers import loopback_aliases_usable
from tests.test_example_service import (
    HOSTS,
    PROCESS_TIMEOUT,
    check_warm_successor,
    service_env,
)

ROOT = Path(__file__).resolve().parent.parent
DNS_NAME = "shop.internal"
ALIAS = "shop-handoff"
IMAGE_TAG = "warm-handoff-example:test"
CONTAINER_TIMEOUT = 120.0  # image pulls and container starts on a slow daemon
PRODUCTS = range(1, 31)
SEARCHES = ("lamp", "clock")

pytestmark = pytest.mark.slow


# -- processes, DNS discovery (runs everywhere) ---------------------------------------------


def test_dns_discovered_successor_is_warm(hosts: tuple[str, str]) -> None:
    old_host, new_host = hosts
    port = free_port_on_all(hosts)  # dns: discovery dials every address on the node's port
    with DNSResponder() as dns:
        dns.set_a(DNS_NAME, list(hosts))
        common = {"HANDOFF_DISCOVERY": f"dns:{DNS_NAME}", "HANDOFF_DNS_SERVER": dns.server_spec}
        old_env = service_env(
            **common,
            HANDOFF_RELEASE="v1",
            HANDOFF_BIND=f"{old_host}:{port}",
            HANDOFF_WARMUP_TIMEOUT="0.2",
        )
        new_env = service_env(
            **common,
            HANDOFF_RELEASE="v2",
            HANDOFF_BIND=f"{new_host}:{port}",
            HANDOFF_WARMUP_TIMEOUT="60",
        )
        with (
            ServiceProcess(
                old_env, name="old", host=old_host, http_port=free_port(old_host)
            ) as old,
            ServiceProcess(
                new_env, name="new", host=new_host, http_port=free_port(new_host)
            ) as new,
        ):
            outcome = warm_deploy(
                old, new, products=PRODUCTS, searches=SEARCHES, timeout=PROCESS_TIMEOUT
            )
        asked = {name for name, _ in dns.queries}
    check_warm_successor(outcome)
    assert DNS_NAME in asked, "the nodes found each other through the DNS server"


@pytest.fixture
def hosts() -> tuple[str, str]:
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    return HOSTS


# -- containers (need a Docker daemon) --------------------------------------------------------


#: Set by `.ci/docker-netns env` (what .ci/run does): the namespace the engine and its
#: published ports live in, or why the CI could not start an engine.
NETNS_ENV = "HANDOFF_TEST_DOCKER_NETNS"
UNAVAILABLE_ENV = "HANDOFF_TEST_DOCKER_UNAVAILABLE"


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    """A Docker client whose daemon answers; the tests skip with the reason otherwise.

    With ``HANDOFF_TEST_DOCKER_NETNS`` set (.ci/docker-netns started an engine) the daemon
    must answer: an engine that was started but does not answer fails the tests rather than
    skipping them. Containers are created only after this, lazily: testcontainers'
    constructors already need the daemon.
    """
    unavailable = os.environ.get(UNAVAILABLE_ENV)
    if unavailable:
        pytest.skip(f"the CI's Docker engine is unavailable: {unavailable}")
    started_by_ci = os.environ.get(NETNS_ENV)
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except DockerException as exc:
        if started_by_ci:
            pytest.fail(f"{NETNS_ENV}={started_by_ci} but the engine does not answer: {exc}")
        pytest.skip(
            f"no Docker daemon answers ({exc}; as root, `.ci/docker-netns up` and "
            '`eval "$(.ci/docker-netns env)"` start one); '
            "test_dns_discovered_successor_is_warm runs the same deploy as processes"
        )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def engine_network(docker_client: docker.DockerClient) -> Iterator[None]:
    """The test's thread in the engine's network namespace (where published ports are), if
    the engine runs in one; the daemon itself is reached through its Unix socket."""
    namespace = os.environ.get(NETNS_ENV)
    if not namespace:
        yield
        return
    with netns.entered(namespace):
        yield


def _build_context() -> list[str]:
    """What fly/Dockerfile copies from the repository, and the Dockerfile itself."""
    sources = ["fly/Dockerfile"]
    for line in (ROOT / "fly" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--") for word in words):
            sources.extend(words[1:-1])
    return sources


@pytest.fixture(scope="module")
def image(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The example image, built with fly/Dockerfile (removed after).

    The context is a copy of what the Dockerfile uses: docker-py sends the whole directory
    and reads only a .dockerignore at its root, so building from the repository would
    upload .venv and .git.
    """
    context = tmp_path_factory.mktemp("image-context")
    for name in _build_context():
        source, target = ROOT / name, context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(source, target, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, target)
    with DockerImage(
        path=context, dockerfile_path="fly/Dockerfile", tag=IMAGE_TAG, clean_up=True
    ) as built:
        yield str(built)


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Text lines from a stream of log chunks (which need not end at line ends)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


@pytest.mark.usefixtures("engine_network")
def test_containers_on_one_network_alias_successor_is_warm(image: str) -> None:
    cookie = secrets.token_urlsafe(32)

    def shop(name: str, release: str, warmup: str, network: Network) -> DockerContainer:
        return (
            DockerContainer(image)
            .with_envs(
                HANDOFF_CLUSTER="shop",
                HANDOFF_COOKIE=cookie,
                HANDOFF_RELEASE=release,
                HANDOFF_NODE_NAME=name,
                HANDOFF_BIND="0.0.0.0:4370",
                HANDOFF_DISCOVERY=f"dns:{ALIAS}",  # Docker's DNS: every container with the alias
                HANDOFF_POLL_INTERVAL="0.5",
                HANDOFF_WARMUP_TIMEOUT=warmup,
                HANDOFF_DRAIN_TIMEOUT="10",
                SHOP_BACKEND_DELAY="0.01",
            )
            .with_network(network)
            .with_network_aliases(ALIAS)
            .with_exposed_ports(8080)
        )

    def follow(container: DockerContainer, name: str) -> LineWatcher:
        stream = container.get_wrapped_container().logs(stream=True, follow=True)
        assert not isinstance(stream, bytes), "stream=True gives an iterator of chunks"
        watcher = LineWatcher(_lines(stream), name=name)
        watcher.start()
        return watcher

    def url(container: DockerContainer, path: str) -> str:
        host, port = container.get_container_host_ip(), container.get_exposed_port(8080)
        return f"http://{host}:{port}{path}"

    with Network() as network, shop("old", "v1", "0.5", network) as old:
        old_log = follow(old, "old")
        old_log.wait_for(SERVING, timeout=CONTAINER_TIMEOUT)
        with httpx.Client(timeout=PROCESS_TIMEOUT) as client:
            for product_id in PRODUCTS:
                client.get(url(old, f"/products/{product_id}")).raise_for_status()
            for query in SEARCHES:
                client.get(url(old, f"/search?q={query}")).raise_for_status()
            old_stats = client.get(url(old, "/stats")).json()

        with shop("new", "v2", "120", network) as new:
            new_log = follow(new, "new")
            old_log.wait_for(joined("new"), timeout=CONTAINER_TIMEOUT)
            new_log.wait_for(joined("old"), timeout=CONTAINER_TIMEOUT)

            # `docker stop`: the image's STOPSIGNAL (SIGTERM), SIGKILL only after 30 s.
            wrapped = old.get_wrapped_container()
            wrapped.stop(timeout=30)
            old_exit = int(wrapped.wait(timeout=60)["StatusCode"])
            drain_report = old_log.wait_for(DRAIN_REPORT, timeout=PROCESS_TIMEOUT).group(0)
            new_log.wait_for(SERVING, timeout=CONTAINER_TIMEOUT)

            with httpx.Client(timeout=PROCESS_TIMEOUT) as client:
                before = client.get(url(new, "/stats")).json()
                product_sources = {
                    product_id: client.get(url(new, f"/products/{product_id}")).json()["source"]
                    for product_id in PRODUCTS
                }
                search_sources = {
                    query: client.get(url(new, f"/search?q={query}")).json()["source"]
                    for query in SEARCHES
                }
                after = client.get(url(new, "/stats")).json()

    check_warm_successor(
        DeployOutcome(
            products=list(PRODUCTS),
            searches=list(SEARCHES),
            old_stats=old_stats,
            old_exit=old_exit,
            drain_report=drain_report,
            new_stats_before=before,
            new_stats_after=after,
            product_sources=product_sources,
            search_sources=search_sources,
        )
    )
