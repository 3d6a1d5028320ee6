"""``handoff.ActorRegistry``: one live actor per key in the whole cluster.

Track a registry with :meth:`handoff.Node.track`; then ``await registry.call(key, message)``
and ``await registry.send(key, message)`` reach the actor wherever it lives: on this node, on
a peer, or on its way from one to another. The engine (:mod:`handoff.engine._actors`) keeps
each key active on exactly one node, delivers every message exactly once and in order per
sending node, moves actors (state, position of every sender's channel, queued messages) when
their node drains or when a new node becomes their placement, and refuses to activate a key
a second time while a peer that may hold it cannot be reached (callers then get
:class:`~handoff.ActorUnavailable`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from handoff._adapter import ImportResult, Record
from handoff._errors import ActorUnavailable, ConfigError
from handoff._registry import ClassFactory
from handoff.engine._actors import ActorHost, ActorLimits, Factory

__all__ = ("ACTORS_FACTORY", "ActorRegistry", "ActorsAdapter")

DEFAULT_TIMEOUT = 5.0


class ActorRegistry:
    """Actors by key, one live activation per key in the cluster.

    ``factory(key, state)`` returns an actor: an object with ``handle(message)`` (a
    coroutine function or a plain one; its return value is the reply; one message at a time
    per actor) and ``state()`` (what moves when the actor migrates: msgpack plus the
    codec's types). ``state`` is ``None`` for a fresh activation, else what ``state()``
    returned where the actor lived before (through the namespace's upgrade / downgrade
    hooks when releases differ).

    ``idle_timeout``: seconds without a message after which an actor is deactivated; its
    state stays in the registry and the next message activates it again. ``mailbox``,
    ``queued`` and ``outbox`` bound the messages queued for one actor, for all actors of the
    registry on this node, and those sent from this node and not answered yet
    (:class:`~handoff.ActorBusy` beyond). ``delivery_timeout``: seconds after which a
    message no owner answered is given up (its outcome unknown), so a long partition cannot
    fill the outbox for ever.
    """

    def __init__(
        self,
        factory: Factory,
        *,
        idle_timeout: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        mailbox: int = 1_000,
        queued: int = 100_000,
        outbox: int = 10_000,
        delivery_timeout: float = 60.0,
    ) -> None:
        if not callable(factory):
            raise ConfigError(f"ActorRegistry needs a factory(key, state), got {factory!r}")
        for name, value in (
            ("timeout", timeout),
            ("delivery_timeout", delivery_timeout),
            ("idle_timeout", 1.0 if idle_timeout is None else idle_timeout),
        ):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"ActorRegistry {name} must be a positive number, got {value!r}")
        for name, bound in (("mailbox", mailbox), ("queued", queued), ("outbox", outbox)):
            if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
                raise ConfigError(f"ActorRegistry {name} must be an integer >= 1, got {bound!r}")
        self.factory = factory
        self.idle_timeout = idle_timeout
        self.timeout = float(timeout)
        self.delivery_timeout = float(delivery_timeout)
        self.limits = ActorLimits(mailbox=mailbox, queued=queued, outbox=outbox)
        self._host: ActorHost | None = None

    def __repr__(self) -> str:
        where = f"namespace {self._host.namespace!r}" if self._host else "not tracked"
        return f"ActorRegistry({getattr(self.factory, '__name__', self.factory)!r}, {where})"

    def _bound(self) -> ActorHost:
        host = self._host
        if host is None:
            raise ActorUnavailable(
                "this ActorRegistry is not tracked by a node: call node.track(name, registry) "
                "and start the node first"
            )
        return host

    # ``timeout`` bounds the wait for the reply only: the message is handled once, later.
    async def call(self, key: Any, message: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Send ``message`` to the actor ``key`` and return its reply.

        Raises :class:`~handoff.ActorFailed` (the handler raised),
        :class:`~handoff.ActorTimeout` (no reply within ``timeout``; the message is still
        handled once, later), :class:`~handoff.ActorUnavailable` (no node may run the actor
        now), :class:`~handoff.ActorBusy` (bounds reached; not sent).
        """
        host = self._bound()
        limit = self.timeout if timeout is None else timeout
        pending = await host.submit(key, message, want_reply=True, time_limit=limit)
        return await host.result(key, pending, time_limit=limit)

    # ``timeout`` bounds the wait for room in the window, not the delivery.
    async def send(self, key: Any, message: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Send ``message`` to the actor ``key`` without waiting for it to be handled.

        Messages from one node to one key are handled in the order they were sent, each
        exactly once. Waits (up to ``timeout``) only for room in this node's window of
        unanswered messages to the key, then raises :class:`~handoff.ActorBusy`.
        """
        host = self._bound()
        await host.submit(
            key, message, want_reply=False, time_limit=self.timeout if timeout is None else timeout
        )

    def local_keys(self) -> list[Any]:
        """Keys of the actors this node holds (active or idle)."""
        return self._host.local_keys() if self._host is not None else []

    def owner(self, key: Any) -> str | None:
        """The node this node would send a message for ``key`` to now (``None``: none)."""
        return self._host.owner(key) if self._host is not None else None

    def stats(self) -> dict[str, int]:
        """Actors held, active, queued messages, unanswered ones, activations, given up."""
        return self._host.stats() if self._host is not None else {}

    def __len__(self) -> int:
        return len(self._host) if self._host is not None else 0


class ActorsAdapter:
    """Hands an :class:`ActorRegistry`'s actors to a snapshot store, or to a successor when
    the registry's own migrations could not place them (the engine migrates actors itself
    first). Its export takes what it yields: an actor lives in one place."""

    kind: str = "actors"
    moves_ownership: bool = True

    def __init__(self, registry: ActorRegistry) -> None:
        if not isinstance(registry, ActorRegistry):
            raise TypeError(f"ActorsAdapter adapts ActorRegistry, not {type(registry).__name__}")
        self.registry = registry

    def __repr__(self) -> str:
        return f"ActorsAdapter({self.registry!r})"

    def bind(self, make_host: Callable[[ActorRegistry], ActorHost]) -> ActorHost:
        """Attach the registry to a node's engine (done by :meth:`handoff.Node.track`)."""
        if self.registry._host is not None:
            raise ConfigError(f"{self.registry!r} is tracked already; a registry has one node")
        host = make_host(self.registry)
        self.registry._host = host
        return host

    def _host(self) -> ActorHost:
        return self.registry._bound()

    def __len__(self) -> int:
        return len(self.registry)

    def export(self) -> Iterator[Record]:
        """Take every actor that is not moving (state, channels, queued messages)."""
        return self._host().take()

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Hold restored actors (idle until their next message)."""
        host = self._host()
        applied = kept = 0
        dropped: dict[str, int] = {}
        for key, value, _ in records:
            try:
                if host.put(key, value):
                    applied += 1
                else:
                    kept += 1
            except (TypeError, ValueError) as exc:
                reason = f"unusable actor record: {exc}"
                dropped[reason] = dropped.get(reason, 0) + 1
        return ImportResult(applied, kept, dropped)

    def give_back(self, records: Sequence[Record]) -> None:
        """Hold again the actors no successor and no snapshot took."""
        host = self._host()
        for key, value, _ in records:
            host.put(key, value)


ACTORS_FACTORY: Final = ClassFactory(ActorsAdapter, (ActorRegistry,))
"""Factory for :class:`ActorRegistry` (the registry knows it by import path)."""
