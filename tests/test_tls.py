"""Mutual TLS between nodes: on, off, mismatched, misconfigured, and hostile TLS clients."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trustme

from handoff import Node
from handoff._errors import ConfigError
from handoff.protocol import Hello, encode_frame
from tests._helpers import CLUSTER, COOKIE, EventLog, make_node, read_until_closed, watch

HOST_A, HOST_B, HOST_C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HANDSHAKE_TIMEOUT = 1.0
BOUND = HANDSHAKE_TIMEOUT + 1.5

TLSFiles = tuple[Path, Path, Path]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class Authority:
    """A CA and the directory its PEM files go to."""

    ca: trustme.CA
    ca_file: Path
    directory: Path

    def issue(self, name: str, host: str, *, trust: Path | None = None) -> TLSFiles:
        """(cert, key, ca) for a node on ``host``; ``trust`` overrides the CA it trusts."""
        leaf = self.ca.issue_cert(host, "127.0.0.1", common_name=name)
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key, trust or self.ca_file


def _authority(directory: Path) -> Authority:
    directory.mkdir()
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Authority(ca, ca_file, directory)


@pytest.fixture
def pki(tmp_path: Path) -> Authority:
    return _authority(tmp_path / "cluster-ca")


@pytest.fixture
def other_pki(tmp_path: Path) -> Authority:
    return _authority(tmp_path / "other-ca")


async def wait_for_log(
    caplog: pytest.LogCaptureFixture, predicate: Callable[[str], bool], *, within: float = 5.0
) -> str:
    """The first ``handoff`` log message matching ``predicate`` (no event exists for these)."""
    with anyio.fail_after(within):
        for _ in range(10_000):
            for record in caplog.records:
                if record.name.startswith("handoff") and predicate(record.getMessage()):
                    return record.getMessage()
            await anyio.sleep(0.02)
    raise AssertionError("unreachable: bounded by the time limit")


async def wait_for_logs(
    caplog: pytest.LogCaptureFixture,
    predicate: Callable[[str], bool],
    *,
    count: int,
    within: float = 5.0,
) -> None:
    """Wait until ``count`` ``handoff`` log messages match ``predicate``."""
    with anyio.fail_after(within):
        for _ in range(10_000):
            found = [
                r
                for r in caplog.records
                if r.name.startswith("handoff") and predicate(r.getMessage())
            ]
            if len(found) >= count:
                return
            await anyio.sleep(0.02)
    raise AssertionError("unreachable: bounded by the time limit")


def tls_failure(direction: str, address: str) -> Callable[[str], bool]:
    """Matches a node's log line for a failed TLS handshake ``from``/``to`` ``address``."""
    return lambda m: f"connection {direction} {address}" in m and "TLS with" in m


async def assert_joins(
    task_group: anyio.abc.TaskGroup, target: Node, log: EventLog, tls: TLSFiles | None
) -> None:
    """A fresh node C (TLS or not, like ``target``) joins ``target``."""
    c = make_node("node-c", HOST_C, peers=[target], tls=tls)
    log_c = await watch(task_group, c)
    async with c:
        await log.wait_up("node-c")
        await log_c.wait_up(target.name)
    await log.wait_down("node-c")


# -- TLS on ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_tls_nodes_connect(pki: Authority, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="handoff")
    async with anyio.create_task_group() as tg:
        a = make_node("node-a", HOST_A, tls=pki.issue("node-a", HOST_A))
        log_a = await watch(tg, a)
        async with a:
            b = make_node("node-b", HOST_B, peers=[a], tls=pki.issue("node-b", HOST_B))
            log_b = await watch(tg, b)
            async with b:
                await log_a.wait_up("node-b")
                await log_b.wait_up("node-a")
                assert [p.name for p in a.peers()] == ["node-b"]
                assert [p.name for p in b.peers()] == ["node-a"]
        tg.cancel_scope.cancel()
    assert any("with TLS" in r.getMessage() for r in caplog.records)


@dataclass
class TLSCluster:
    a: Node
    b: Node
    log_a: EventLog
    log_b: EventLog
    task_group: anyio.abc.TaskGroup


@asynccontextmanager
async def two_tls_nodes(pki: Authority) -> AsyncIterator[TLSCluster]:
    async with anyio.create_task_group() as tg:
        a = make_node("node-a", HOST_A, tls=pki.issue("node-a", HOST_A))
        log_a = await watch(tg, a)
        async with a:
            b = make_node("node-b", HOST_B, peers=[a], tls=pki.issue("node-b", HOST_B))
            log_b = await watch(tg, b)
            async with b:
                await log_a.wait_up("node-b")
                await log_b.wait_up("node-a")
                yield TLSCluster(a, b, log_a, log_b, tg)
        tg.cancel_scope.cancel()


def client_context(pki: Authority, *, certificate: TLSFiles | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.check_hostname = False
    if certificate is not None:
        context.load_cert_chain(certificate[0], certificate[1])
    return context


@pytest.mark.anyio
@pytest.mark.parametrize("then_send", [b"", b"\xff\xff\xff\xff"], ids=["silent", "4-gib-frame"])
async def test_tls_client_without_certificate_is_closed(
    pki: Authority, caplog: pytest.LogCaptureFixture, then_send: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="handoff")
    async with two_tls_nodes(pki) as cluster:
        marks = len(cluster.log_a.events), len(cluster.log_b.events)
        hello = Hello((1,), CLUSTER, "intruder", "0123456789abcdef", bytes(32))
        context = client_context(pki, certificate=None)
        received = b""
        started = anyio.current_time()
        with anyio.fail_after(BOUND):
            try:
                stream = await anyio.connect_tcp(
                    HOST_A, cluster.a.port, ssl_context=context, tls_standard_compatible=False
                )
            except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                pass  # refused during the handshake: fine
            else:
                # TLS 1.3: the client finishes first and hears the refusal on its first read.
                async with stream:
                    try:
                        await stream.send(encode_frame(hello.to_wire()) + then_send)
                        received = await read_until_closed(stream, within=BOUND)
                    except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream):
                        pass
        assert anyio.current_time() - started < BOUND
        assert received == b"", "a client without a certificate got application data"
        port = cluster.a.port
        await wait_for_log(caplog, lambda m: "connection from" in m and "TLS with" in m)
        assert [p.name for p in cluster.a.peers()] == ["node-b"]
        assert [p.name for p in cluster.b.peers()] == ["node-a"]
        assert cluster.log_a.events[marks[0] :] == []
        assert cluster.log_b.events[marks[1] :] == []
        assert cluster.a.port == port
        await assert_joins(cluster.task_group, cluster.a, cluster.log_a, pki.issue("c", HOST_C))


@pytest.mark.anyio
async def test_silent_tcp_client_is_closed_at_the_tls_handshake_timeout(pki: Authority) -> None:
    async with two_tls_nodes(pki) as cluster:
        stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
        async with stream:
            started = anyio.current_time()
            received = await read_until_closed(stream, within=BOUND)
            elapsed = anyio.current_time() - started
        assert HANDSHAKE_TIMEOUT - 0.05 <= elapsed < BOUND
        assert received == b""
        assert [p.name for p in cluster.a.peers()] == ["node-b"]


# -- TLS against plain ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("tls_side", ["listener", "dialler"])
async def test_tls_node_and_plain_node_do_not_connect(
    pki: Authority, caplog: pytest.LogCaptureFixture, tls_side: str
) -> None:
    caplog.set_level(logging.INFO, logger="handoff")
    tls_a = pki.issue("node-a", HOST_A) if tls_side == "listener" else None
    tls_b = pki.issue("node-b", HOST_B) if tls_side == "dialler" else None
    async with anyio.create_task_group() as tg:
        a = make_node("node-a", HOST_A, tls=tls_a)
        log_a = await watch(tg, a)
        async with a:
            b = make_node("node-b", HOST_B, peers=[a], tls=tls_b)
            log_b = await watch(tg, b)
            async with b:
                if tls_side == "listener":
                    # A's TLS handshake meets B's plaintext Hello.
                    tls_node_failed = tls_failure("from", "")
                else:
                    # B's TLS handshake meets A's plaintext; A sees a TLS record as a frame.
                    tls_node_failed = tls_failure("to", a.address)
                    await wait_for_log(caplog, lambda m: "exceeds the limit" in m)
                # B dials again every poll: wait for a second failure, then check that
                # nothing got through and that both still run.
                await wait_for_logs(caplog, tls_node_failed, count=2)
                assert a.peers() == []
                assert b.peers() == []
                assert log_a.events == []
                assert log_b.events == []
                assert a.running
                assert b.running
                # Each still takes peers of its own kind.
                tls_c = pki.issue("node-c", HOST_C) if tls_side == "listener" else None
                await assert_joins(tg, a, log_a, tls_c)
        tg.cancel_scope.cancel()


# -- mismatched CAs -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "untrusted",
    ["both-ways", "b-untrusted-by-a"],
    ids=["separate-cas", "only-a-rejects-b"],
)
async def test_certificate_from_another_ca_is_rejected(
    pki: Authority,
    other_pki: Authority,
    caplog: pytest.LogCaptureFixture,
    untrusted: str,
) -> None:
    caplog.set_level(logging.INFO, logger="handoff")
    # separate-cas: B's certificate and trust come from another CA than A's. only-a-rejects-b:
    # B trusts A's CA (so B accepts A) but its own certificate is from another CA.
    trust_b = other_pki.ca_file if untrusted == "both-ways" else pki.ca_file
    async with anyio.create_task_group() as tg:
        a = make_node("node-a", HOST_A, tls=pki.issue("node-a", HOST_A))
        log_a = await watch(tg, a)
        async with a:
            b = make_node(
                "node-b", HOST_B, peers=[a], tls=other_pki.issue("node-b", HOST_B, trust=trust_b)
            )
            log_b = await watch(tg, b)
            async with b:
                if untrusted == "both-ways":
                    # A dials B too, so that both directions are tried.
                    a_to_b = make_node(
                        "node-a2", HOST_C, peers=[b], tls=pki.issue("node-a2", HOST_C)
                    )
                    log_a2 = await watch(tg, a_to_b)
                    async with a_to_b:
                        await wait_for_log(caplog, tls_failure("to", a.address))
                        await wait_for_log(caplog, tls_failure("to", b.address))
                        assert a_to_b.peers() == []
                        assert log_a2.events == []
                else:
                    # B accepts A's certificate; A refuses B's (a TLS 1.3 client learns it
                    # on its first read). Wait for two of B's attempts.
                    await wait_for_logs(caplog, tls_failure("from", ""), count=2)
                assert a.peers() == []
                assert b.peers() == []
                assert log_a.events == []
                assert log_b.events == []
                await assert_joins(tg, a, log_a, pki.issue("node-c", HOST_C))
        tg.cancel_scope.cancel()


# -- configuration errors -------------------------------------------------------------------


def tls_node(files: TLSFiles) -> Node:
    cert, key, ca = files
    return Node(
        CLUSTER,
        cookie=COOKIE,
        name="node-a",
        bind=f"{HOST_A}:0",
        discovery="none",
        tls_cert=cert,
        tls_key=key,
        tls_ca=ca,
        environ={},
    )


@pytest.mark.parametrize("which", [0, 1, 2], ids=["cert", "key", "ca"])
@pytest.mark.parametrize("problem", ["missing", "directory", "under-a-file", "unreadable"])
def test_missing_or_unreadable_file_is_a_config_error_at_construction(
    pki: Authority, tmp_path: Path, which: int, problem: str
) -> None:
    files = list(pki.issue("node-a", HOST_A))
    bad = tmp_path / f"bad-{problem}.pem"
    if problem == "directory":
        bad.mkdir()
    elif problem == "under-a-file":
        bad.write_bytes(b"")
        bad = bad / "cert.pem"
    elif problem == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        bad.write_bytes(files[which].read_bytes())
        bad.chmod(0)
    files[which] = bad
    env_name = ("HANDOFF_TLS_CERT", "HANDOFF_TLS_KEY", "HANDOFF_TLS_CA")[which]
    with pytest.raises(ConfigError) as caught:
        tls_node((files[0], files[1], files[2]))
    message = str(caught.value)
    assert str(bad) in message
    assert env_name in message


@pytest.mark.anyio
@pytest.mark.parametrize("which", [0, 1, 2, "mismatch"], ids=["cert", "key", "ca", "wrong-key"])
async def test_garbage_pem_is_a_config_error_at_start(
    pki: Authority, tmp_path: Path, which: int | str
) -> None:
    files = list(pki.issue("node-a", HOST_A))
    if which == "mismatch":
        files[1] = pki.issue("someone-else", HOST_B)[1]
    else:
        assert isinstance(which, int)
        garbage = tmp_path / "garbage.pem"
        garbage.write_bytes(
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
            if which != 1
            else b"this is not a key\n"
        )
        files[which] = garbage
    node = tls_node((files[0], files[1], files[2]))  # readable files: fine until start
    with pytest.raises(ConfigError) as caught:
        await node.start()
    assert not node.running
    message = str(caught.value)
    for path, env_name in zip(
        files, ("HANDOFF_TLS_CERT", "HANDOFF_TLS_KEY", "HANDOFF_TLS_CA"), strict=True
    ):
        assert f"{env_name}={path}" in message
