"""Helpers for testing your own set-up of warm-handoff, shipped with the library.

:class:`DNSResponder` is a real DNS server on loopback whose records you set from the
test: point ``HANDOFF_DNS_SERVER`` at it to exercise ``dns:`` or ``fly`` discovery, in
the test process or in child processes, without touching the network.
"""

from __future__ import annotations

from handoff.testing._dns import DNSResponder

__all__ = ("DNSResponder",)
