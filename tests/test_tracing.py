"""OpenTelemetry spans (``handoff.metrics.trace``): a real drain between two in-process
nodes, the spans caught by the SDK's in-memory exporter."""

from __future__ import annotations

import builtins
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import handoff.metrics
from handoff._observe import Observer
from handoff.protocol import Accept, Ack, Cancel, Chunk, Message, Offer, Refuse
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node

pytestmark = pytest.mark.anyio


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_drain_makes_drain_stream_and_receive_spans() -> None:
    old_provider, old_spans = _provider()
    new_provider, new_spans = _provider()
    users = {f"u{i}": str(i) for i in range(300)}
    carts = {f"c{i}": [i] for i in range(40)}
    target_users: dict[str, str] = {"u1": "mine"}  # held here: kept, not applied
    old = node("old", "127.0.0.2", release="v1")
    old.track("users", users)
    old.track("carts", carts)
    assert handoff.metrics.trace(old, tracer_provider=old_provider)
    assert handoff.metrics.trace(old, tracer_provider=old_provider)  # no second tracer
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        new.track("users", target_users)
        new.track("carts", {})
        assert handoff.metrics.trace(new, tracer_provider=new_provider)
        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
            await wait_until(lambda: new.last_received is not None)
            sent = old_spans.get_finished_spans()
            received = new_spans.get_finished_spans()

    [drain] = _named(sent, "handoff.drain")
    assert _attributes(drain) == {
        "handoff.node": "old",
        "handoff.release": "v1",
        "handoff.reason": "drain",
        "handoff.records": 340,
        "handoff.acknowledged": 340,
        "handoff.snapshotted": 0,
        "handoff.dropped": 0,
        "handoff.lost": 0,
        "handoff.in_doubt": 0,
    }
    assert report.ok
    assert drain.status.status_code is StatusCode.UNSET
    streams = _named(sent, "handoff.stream")
    by_namespace = {_attributes(s)["handoff.namespace"]: _attributes(s) for s in streams}
    assert by_namespace == {
        name: {
            "handoff.namespace": name,
            "handoff.peer": "new",
            "handoff.version": 1,
            "handoff.records": report.namespaces[name].sent,
            "handoff.acknowledged": report.namespaces[name].acknowledged,
            "handoff.outcome": "ended",
        }
        for name in ("users", "carts")
    }
    assert report.namespaces["users"].sent == 300
    assert drain.context is not None
    for stream in streams:
        # Children of the drain, inside it in time.
        assert stream.parent is not None
        assert stream.parent.span_id == drain.context.span_id
        assert stream.context is not None
        assert stream.context.trace_id == drain.context.trace_id
        assert drain.start_time is not None
        assert stream.start_time is not None
        assert drain.end_time is not None
        assert stream.end_time is not None
        assert drain.start_time <= stream.start_time <= stream.end_time <= drain.end_time
    # The receiving side makes no drain spans, the sending side no receive spans.
    assert not _named(received, "handoff.drain")
    assert not _named(sent, "handoff.receive")
    [receive] = _named(received, "handoff.receive")
    assert _attributes(receive) == {
        "handoff.peer": "old",
        "handoff.release": "v1",
        "handoff.records": 340,
        "handoff.applied": 339,
        "handoff.kept": 1,
        "handoff.dropped": 0,
        "handoff.namespaces": ("carts", "users"),
    }
    assert receive.status.status_code is StatusCode.UNSET


async def test_a_lossy_drain_is_an_error_span() -> None:
    provider, exporter = _provider()
    old = node("old", "127.0.0.2")
    old.track("users", {f"u{i}": str(i) for i in range(20)})
    handoff.metrics.trace(old, tracer_provider=provider)
    async with old:
        new = node("new", "127.0.0.3", old)
        # The successor's validator rejects every other record: dropped there.
        new.track("users", {}, validate=lambda key, value: int(value) % 2 == 0)
        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
            spans = exporter.get_finished_spans()
    [stream] = _named(spans, "handoff.stream")
    assert _attributes(stream)["handoff.outcome"] == "ended"
    assert _attributes(stream)["handoff.acknowledged"] == 20
    [drain] = _named(spans, "handoff.drain")
    assert report.lost == 10
    assert _attributes(drain)["handoff.lost"] == 10
    assert drain.status.status_code is StatusCode.ERROR
    assert drain.status.description == "10 records lost, 0 in doubt"


class _Clockwork:
    """A node's name and release, all the tracer reads of it."""

    name = "old"
    release = "v1"


def test_refused_withdrawn_cancelled_and_lost_streams_end_with_their_outcome() -> None:
    provider, exporter = _provider()
    from opentelemetry import trace as trace_api

    from handoff.metrics import _Tracer

    tracer = _Tracer(_Clockwork(), provider.get_tracer("t"), trace_api)  # type: ignore[arg-type]
    tracer.drain_started("drain")
    for stream, namespace in enumerate(("refused", "withdrawn", "cancelled", "lost"), 1):
        tracer.sent("b", Offer(stream, namespace, "mapping", 1, 0))
    tracer.received("b", Refuse(1, "not now"))
    tracer.received("b", Accept(2, 4))
    tracer.sent("b", Chunk(2, 0, 3, 0.0, b"x"))
    tracer.received("b", Ack(2, 0, 2, 1, (), 1))
    tracer.received("b", Refuse(2, "draining"))
    tracer.received("b", Accept(3, 4))
    tracer.sent("b", Cancel(3, "drain deadline"))
    tracer.received("b", Accept(4, 4))
    tracer.peer_lost("b")
    tracer.drain_finished(None)
    spans = {
        _attributes(s)["handoff.namespace"]: s
        for s in _named(exporter.get_finished_spans(), "handoff.stream")
    }
    outcomes = {name: _attributes(s)["handoff.outcome"] for name, s in spans.items()}
    assert outcomes == {
        "refused": "refused",
        "withdrawn": "withdrawn",
        "cancelled": "cancelled",
        "lost": "link lost",
    }
    withdrawn = _attributes(spans["withdrawn"])
    assert (withdrawn["handoff.records"], withdrawn["handoff.acknowledged"]) == (3, 3)
    assert withdrawn["handoff.refusal"] == "draining"
    assert spans["cancelled"].status.description == "drain deadline"
    assert spans["lost"].status.status_code is StatusCode.ERROR
    [drain] = _named(exporter.get_finished_spans(), "handoff.drain")
    assert drain.status.description == "the drain raised"


def test_a_receive_whose_sender_goes_away_is_an_error_span() -> None:
    provider, exporter = _provider()
    from opentelemetry import trace as trace_api

    from handoff.metrics import _Tracer

    tracer = _Tracer(_Clockwork(), provider.get_tracer("t"), trace_api)  # type: ignore[arg-type]
    tracer.received("a", Offer(7, "users", "mapping", 1, 0))
    tracer.sent("a", Accept(7, 4))
    tracer.peer_lost("a")
    [receive] = _named(exporter.get_finished_spans(), "handoff.receive")
    assert receive.status.status_code is StatusCode.ERROR
    assert _attributes(receive)["handoff.peer"] == "a"


def test_without_opentelemetry_trace_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_opentelemetry(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opentelemetry)
    n = node("solo", "127.0.0.2")
    assert handoff.metrics.trace(n) is False
    assert not n._observers


async def test_an_observer_that_raises_never_breaks_the_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Observer):
        def sent(self, peer: str, message: Message) -> None:
            raise RuntimeError("observer bug")

    target: dict[str, str] = {}
    old = node("old", "127.0.0.2")
    old.track("n", {f"k{i}": str(i) for i in range(10)})
    old._observers.add(Broken())
    async with old:
        new = node("new", "127.0.0.3", old)
        new.track("n", target)
        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
    assert report.ok
    assert len(target) == 10
    assert "observer bug" in caplog.text
