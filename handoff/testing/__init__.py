"""Helpers for testing your own set-up of warm-handoff, shipped with the library.

:class:`DNSResponder` is a real DNS server on loopback whose records you set from the
test: point ``HANDOFF_DNS_SERVER`` at it to exercise ``dns:`` or ``fly`` discovery, in
the test process or in child processes, without touching the network.

:class:`NodeProcess` runs a node in a child process configured only by ``HANDOFF_*``
variables and reports its membership events, so a test can kill, stop or pause real
processes and watch the others notice. With ``STATE_ENV`` (a :class:`StateConfig` as JSON)
the child also holds a cache or mapping to hand off, and takes ``drain`` / ``stats`` /
``stop`` commands; :func:`expected_digest` says what a receiver must then hold.
"""

from __future__ import annotations

from handoff._local.dns import DNSResponder
from handoff._local.process import (
    STATE_ENV,
    NodeProcess,
    NodeProcessError,
    StateConfig,
    expected_digest,
    free_port,
    free_port_on_all,
    state_digest,
)

__all__ = (
    "STATE_ENV",
    "DNSResponder",
    "NodeProcess",
    "NodeProcessError",
    "StateConfig",
    "expected_digest",
    "free_port",
    "free_port_on_all",
    "state_digest",
)
