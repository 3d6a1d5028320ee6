"""Network namespaces for tests: enter one from a thread, or build a small network of them.

Everything here needs root and ``ip`` (iproute2); :func:`netns_unavailable` says why a
machine cannot, so tests skip with that reason. Nothing touches the host's own interfaces,
routes or firewall: every link, address and rule lives in namespaces made here, and
:class:`Network` removes them all when it closes, also after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self

NETNS_DIR: Final = Path("/run/netns")
_CLONE_NEWNET: Final = 0x40000000
_COMMAND_TIMEOUT: Final = 10.0


def netns_unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or ``None`` if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"hprobe-{secrets.token_hex(3)}"
    created = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT
    )
    if created.returncode != 0:
        return f"cannot create network namespaces: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True, timeout=_COMMAND_TIMEOUT)
    return None


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the calling thread in network namespace ``name`` until the block ends.

    Only this thread moves (a network namespace is per thread); sockets it opens inside the
    block stay in ``name`` for their whole life. Unix sockets bound to a path (a Docker
    daemon's) are reachable from any namespace.
    """
    with open("/proc/thread-self/ns/net", "rb") as own, open(NETNS_DIR / name, "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(own.fileno())


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (``ip``, ``iptables``, ``tc``), its output captured as text."""
    done = subprocess.run(
        list(args), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace ``ns``."""
    return run("ip", "netns", "exec", ns, *args, check=check)


@dataclass
class Host:
    """One node's namespace on the network: its address and the switch port it hangs on."""

    name: str
    namespace: str
    address: str
    port: str
    """The veth end on the switch (``ip -n SWITCH link set PORT down`` cuts it off)."""


@dataclass
class Network:
    """Namespaces on one bridge that lives in a namespace of its own (the switch).

    ``Network(["old", "new"])`` makes ``<tag>-sw`` with bridge ``br0`` and, per host, a
    namespace ``<tag>-<host>`` whose ``eth0`` (``10.231.<n>.<i>/24``) is a veth whose other
    end is a port of the bridge. The 10.231.0.0/16 range exists only inside these
    namespaces. Faults are made on the hosts' own ``eth0`` or firewall, and all of it goes
    when the namespaces are deleted (:meth:`close`, also on failure).
    """

    hosts_names: Sequence[str]
    subnet: int = 0
    tag: str = field(default_factory=lambda: f"hn{secrets.token_hex(3)}")
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    namespaces: list[str] = field(default_factory=list, init=False)

    @property
    def switch(self) -> str:
        """The namespace holding the bridge."""
        return f"{self.tag}-sw"

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_namespace(self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts_names, start=1):
            namespace = f"{self.tag}-{host}"
            self._add_namespace(namespace)
            port = f"p{index}"
            # Both ends are made inside the switch's namespace, then one moves to the host:
            # the host's own namespace never sees either.
            run(
                "ip", "-n", self.switch, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", namespace,
            )  # fmt: skip
            run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            run("ip", "-n", self.switch, "link", "set", port, "up")
            address = f"10.231.{self.subnet}.{index}"
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", namespace, "link", "set", "eth0", "up")
            self.hosts[host] = Host(host, namespace, address, port)

    def close(self) -> None:
        """Delete every namespace made (their links, addresses, rules and queues go along)."""
        errors = []
        while self.namespaces:
            name = self.namespaces.pop()
            done = run("ip", "netns", "del", name, check=False)
            if done.returncode != 0 and (NETNS_DIR / name).exists():
                errors.append(f"{name}: {done.stderr.strip()}")
        if errors:
            raise RuntimeError(f"could not delete namespaces: {'; '.join(errors)}")

    def exec_prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program in ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace]

    def sysctl(self, host: str, key: str, value: str) -> None:
        """Set a network sysctl of ``host``'s namespace (``net.ipv4.*`` is per namespace)."""
        in_ns(self.hosts[host].namespace, "sysctl", "-q", "-w", f"{key}={value}")

    # -- faults (each on one host's side, so deleting its namespace removes it) ----------

    def drop_from(self, host: str, peer: str) -> None:
        """``host`` silently drops every packet from ``peer`` (a partition; sockets stay
        open, nothing is reset)."""
        source = self.hosts[peer].address
        in_ns(
            self.hosts[host].namespace, "iptables", "-w", "-A", "INPUT", "-s", source, "-j", "DROP"
        )

    def heal(self, host: str) -> None:
        """Remove every firewall rule of ``host``."""
        in_ns(self.hosts[host].namespace, "iptables", "-w", "-F", "INPUT")

    def lose_from(self, host: str, peer: str, probability: float) -> None:
        """``host`` drops each packet from ``peer`` with ``probability`` (random loss)."""
        in_ns(
            self.hosts[host].namespace,
            "iptables", "-w", "-A", "INPUT", "-s", self.hosts[peer].address, "-m", "statistic",
            "--mode", "random", "--probability", f"{probability}", "-j", "DROP",
        )  # fmt: skip

    def rate_limit_to(self, host: str, rate: str) -> None:
        """Traffic to ``host`` passes at most ``rate`` (e.g. ``1mbit``): a tbf queue on the
        switch port ``host`` hangs on (its egress is everything ``host`` receives)."""
        run(
            "ip", "netns", "exec", self.switch,
            "tc", "qdisc", "add", "dev", self.hosts[host].port, "root", "tbf",
            "rate", rate, "burst", "32kbit", "latency", "400ms",
        )  # fmt: skip
