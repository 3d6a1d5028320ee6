"""Exporters of what a node does: Prometheus metrics and OpenTelemetry spans.

Both are optional extras and attach to a node explicitly; the library imports neither
``prometheus_client`` nor ``opentelemetry`` unless asked to. :meth:`handoff.Node.stats` is the
snapshot they build on (peers, entries per namespace, the last drain and receive).

Prometheus (``pip install 'warm-handoff[prometheus]'``), e.g. in FastAPI::

    node = handoff.Node()
    app = FastAPI(lifespan=node.lifespan)
    app.add_route("/metrics", handoff.metrics.prometheus_app(node))

The collector reads the node on every scrape (a custom collector, not counters the engine
updates): the drain counters are the sums of the node's own drain reports, the very numbers
``node.last_drain_report`` and the drain's log line show, including those of a drain still
running; peers and entries are read from :meth:`handoff.Node.stats`. What a node receives is
summed from the moment the collector is attached (attach it before the node starts). Each
call registers on a registry of its own unless given one, so that several nodes in one
process (tests, workers) never clash on the global ``prometheus_client.REGISTRY``; pass
``registry=REGISTRY`` to add the node's metrics to the process's other metrics. Metric
names: :data:`METRICS`.

OpenTelemetry (``pip install 'warm-handoff[opentelemetry]'``, the API only: the application
installs and configures the SDK): ``handoff.metrics.trace(node)`` makes spans
``handoff.drain`` (one per drain or catch-up), ``handoff.stream`` (one per namespace and
successor, a child of its drain) and ``handoff.receive`` (one per handoff received, from
the first stream this node accepts of a peer to its Done). Without ``opentelemetry-api``
installed it does nothing, at no cost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from handoff._errors import MissingExtra
from handoff._observe import Observer
from handoff.engine import DrainReport, NamespaceReport
from handoff.protocol import Accept, Ack, Cancel, Chunk, End, Message, Offer, Refuse

if TYPE_CHECKING:
    from handoff.node import Node, ReceivedHandoff

__all__ = (
    "DURATION_BUCKETS",
    "METRICS",
    "MissingExtra",
    "PrometheusCollector",
    "prometheus_app",
    "register_prometheus",
    "trace",
)

logger = logging.getLogger("handoff.metrics")

#: Upper bounds (seconds) of the drain and receive duration histograms: drains take
#: milliseconds to the drain timeout (seconds to tens of seconds).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Every metric the Prometheus collector exposes: name -> (type, labels, meaning). The
#: README's table is this one.
METRICS: Mapping[str, tuple[str, tuple[str, ...], str]] = {
    "handoff_records_sent_total": (
        "counter",
        ("namespace",),
        "Records this node's drains sent to successors (retries to another one included).",
    ),
    "handoff_records_acknowledged_total": (
        "counter",
        ("namespace",),
        "Records of this node's drains that a successor acknowledged.",
    ),
    "handoff_records_snapshotted_total": (
        "counter",
        ("namespace",),
        "Records of this node's drains written to the snapshot store.",
    ),
    "handoff_records_dropped_total": (
        "counter",
        ("namespace", "reason"),
        "Records this node's drains gave up on (neither a successor nor a snapshot has them).",
    ),
    "handoff_records_dropped_by_successor_total": (
        "counter",
        ("namespace", "reason"),
        "Records a successor acknowledged without keeping them (expired, receiver full ...).",
    ),
    "handoff_drain_seconds": (
        "histogram",
        ("reason",),
        "Duration of this node's drains (reason: drain, or catch-up).",
    ),
    "handoff_handoffs_received_total": (
        "counter",
        (),
        "Handoffs this node received completely (a draining peer's Done).",
    ),
    "handoff_records_received_total": (
        "counter",
        ("namespace", "outcome"),
        "Records received from draining peers, by outcome: applied, kept (this node held "
        "a newer entry) or dropped.",
    ),
    "handoff_receive_seconds": (
        "histogram",
        (),
        "Duration of the handoffs received, from the first stream accepted to the Done.",
    ),
    "handoff_peers": ("gauge", ("state",), "Authenticated peers, by state."),
    "handoff_entries": ("gauge", ("namespace",), "Entries held, per tracked namespace."),
    "handoff_warm": ("gauge", (), "1 once the node is warm (see node.is_warm), else 0."),
    "handoff_draining": ("gauge", (), "1 from the moment the node drains, else 0."),
}

_PEER_STATES = ("serving", "draining")
_OUTCOMES = ("applied", "kept", "dropped")
# Streams of peers whose outcome is being summed (Offer seen, not yet ended): the receiver
# refuses past 32 per peer, this bounds what a peer that floods offers costs here.
_MAX_INBOUND = 4096


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            "the Prometheus exporter needs prometheus_client: "
            "pip install 'warm-handoff[prometheus]'"
        ) from exc


@dataclass(slots=True)
class _Histogram:
    """Bucket counts and sum, as a Prometheus histogram exposes them."""

    counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.counts[index] += 1
        self.total += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets, ``+Inf`` last (counts already cumulative, see observe)."""
        pairs = [
            (repr(bound), float(n)) for bound, n in zip(DURATION_BUCKETS, self.counts, strict=True)
        ]
        return [*pairs, ("+Inf", float(self.count))]


class _Recorder(Observer):
    """What a scrape cannot read off the node: its drains' namespace reports as they run,
    drain durations, and everything it received. Written on the event loop, read by the
    scrape (which may run in another thread: ``prometheus_client.start_http_server``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        # The reports themselves (the drain changes them in place), each once.
        self._reports: list[NamespaceReport] = []
        self._seen: set[int] = set()
        self._drains: dict[str, _Histogram] = {}
        self._inbound: dict[tuple[str, int], str] = {}
        self._receiving: dict[str, float] = {}
        self._received: dict[tuple[str, str], int] = {}
        self._handoffs = 0
        self._receives = _Histogram()

    def drain_progress(self, report: NamespaceReport) -> None:
        with self._lock:
            if id(report) not in self._seen:
                self._seen.add(id(report))
                self._reports.append(report)

    def drain_finished(self, report: DrainReport | None) -> None:
        if report is None:
            return
        with self._lock:
            for namespace in report.namespaces.values():
                if id(namespace) not in self._seen:
                    self._seen.add(id(namespace))
                    self._reports.append(namespace)
            self._drains.setdefault(report.reason, _Histogram()).observe(report.seconds)

    def received(self, peer: str, message: Message) -> None:
        if isinstance(message, Offer):
            with self._lock:
                if len(self._inbound) < _MAX_INBOUND:
                    self._inbound[(peer, message.stream)] = message.namespace
        elif isinstance(message, End | Cancel):
            with self._lock:
                self._inbound.pop((peer, message.stream), None)

    def sent(self, peer: str, message: Message) -> None:
        if isinstance(message, Accept):
            with self._lock:
                self._receiving.setdefault(peer, self._clock())
        elif isinstance(message, Refuse):
            with self._lock:
                self._inbound.pop((peer, message.stream), None)
        elif isinstance(message, Ack):
            with self._lock:
                namespace = self._inbound.get((peer, message.stream))
                if namespace is None:
                    return
                for outcome, count in zip(
                    _OUTCOMES,
                    (message.applied, message.kept, sum(n for _, n in message.dropped)),
                    strict=True,
                ):
                    key = (namespace, outcome)
                    self._received[key] = self._received.get(key, 0) + count

    def peer_lost(self, peer: str) -> None:
        with self._lock:
            self._receiving.pop(peer, None)
            for key in [key for key in self._inbound if key[0] == peer]:
                del self._inbound[key]

    def handoff_received(self, handoff: ReceivedHandoff) -> None:
        with self._lock:
            self._handoffs += 1
            started = self._receiving.pop(handoff.peer, None)
            if started is not None:
                self._receives.observe(max(0.0, self._clock() - started))

    def drain_totals(self) -> dict[str, dict[tuple[str, ...], float]]:
        """The drain counters, summed over every namespace report seen."""
        totals: dict[str, dict[tuple[str, ...], float]] = {
            name: {}
            for name in (
                "handoff_records_sent_total",
                "handoff_records_acknowledged_total",
                "handoff_records_snapshotted_total",
                "handoff_records_dropped_total",
                "handoff_records_dropped_by_successor_total",
            )
        }

        def add(name: str, labels: tuple[str, ...], value: int) -> None:
            totals[name][labels] = totals[name].get(labels, 0) + value

        with self._lock:
            reports = list(self._reports)
        for report in reports:
            ns = report.namespace
            add("handoff_records_sent_total", (ns,), report.sent)
            add("handoff_records_acknowledged_total", (ns,), report.acknowledged)
            add("handoff_records_snapshotted_total", (ns,), report.snapshotted)
            for reason, count in list(report.dropped.items()):
                add("handoff_records_dropped_total", (ns, reason), count)
            for reason, count in list(report.receiver_dropped.items()):
                add("handoff_records_dropped_by_successor_total", (ns, reason), count)
        return totals

    def drain_histograms(self) -> dict[str, tuple[list[tuple[str, float]], float]]:
        """Per drain reason: cumulative buckets and the sum of seconds."""
        with self._lock:
            return {reason: (h.buckets(), h.total) for reason, h in self._drains.items()}

    def receive_totals(
        self,
    ) -> tuple[int, dict[tuple[str, str], int], tuple[list[tuple[str, float]], float]]:
        """Handoffs received, records received by (namespace, outcome), the histogram."""
        with self._lock:
            histogram = (self._receives.buckets(), self._receives.total)
            return self._handoffs, dict(self._received), histogram


class PrometheusCollector:
    """A ``prometheus_client`` collector of one node's metrics (see :data:`METRICS`).

    Register it on a registry (:func:`register_prometheus` does): every scrape reads the
    node. Creating it attaches a recorder of what the node receives (from then on). Its
    series carry no node label: one node per registry (a second one on the same registry
    is refused with prometheus_client's ``Duplicated timeseries`` error); the scraped
    target says which node it is.
    Raises :class:`MissingExtra` without ``prometheus_client``.
    """

    def __init__(self, node: Node) -> None:
        _require_prometheus()
        self._node = node
        self._recorder = _Recorder()
        node._observers.add(self._recorder)

    def describe(self) -> list[Any]:
        """The metric families without samples: a registry checks them for clashes."""
        from prometheus_client.core import Metric

        return [
            Metric(name.removesuffix("_total") if kind == "counter" else name, text, kind)
            for name, (kind, _, text) in METRICS.items()
        ]

    def collect(self) -> Iterator[Any]:
        """The node's metric families, read now."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def family(kind: type[Any], name: str) -> Any:
            _, labels, help_text = METRICS[name]
            # prometheus_client adds _total itself to a counter's samples.
            base = name.removesuffix("_total") if kind is CounterMetricFamily else name
            return kind(base, help_text, labels=list(labels))

        recorder = self._recorder
        for name, values in recorder.drain_totals().items():
            counter = family(CounterMetricFamily, name)
            for labels, value in sorted(values.items()):
                counter.add_metric(list(labels), value)
            yield counter
        drains = family(HistogramMetricFamily, "handoff_drain_seconds")
        for reason, (buckets, total) in sorted(recorder.drain_histograms().items()):
            drains.add_metric([reason], buckets, total)
        yield drains
        handoffs, received, (buckets, total) = recorder.receive_totals()
        counter = family(CounterMetricFamily, "handoff_handoffs_received_total")
        counter.add_metric([], handoffs)
        yield counter
        counter = family(CounterMetricFamily, "handoff_records_received_total")
        for labels, value in sorted(received.items()):
            counter.add_metric(list(labels), value)
        yield counter
        receives = family(HistogramMetricFamily, "handoff_receive_seconds")
        receives.add_metric([], buckets, total)
        yield receives
        yield from self._gauges(family, GaugeMetricFamily)

    def _gauges(self, family: Callable[[type[Any], str], Any], kind: type[Any]) -> Iterable[Any]:
        stats = self._node.stats()
        peers = family(kind, "handoff_peers")
        states = [m["state"] for m in stats["members"] if not m["self"]]
        for state in sorted({*_PEER_STATES, *states}):
            peers.add_metric([state], states.count(state))
        entries = family(kind, "handoff_entries")
        for tracked in stats["tracked"]:
            if tracked["entries"] is not None:
                entries.add_metric([tracked["namespace"]], tracked["entries"])
        warm = family(kind, "handoff_warm")
        warm.add_metric([], 1 if stats["warm"] else 0)
        draining = family(kind, "handoff_draining")
        draining.add_metric([], 1 if stats["state"] == "draining" else 0)
        return [peers, entries, warm, draining]


def register_prometheus(node: Node, registry: Any = None) -> Any:
    """Register a :class:`PrometheusCollector` of ``node`` on ``registry`` (default: a new
    ``prometheus_client.CollectorRegistry`` of its own) and return the registry."""
    _require_prometheus()
    from prometheus_client import CollectorRegistry

    chosen = CollectorRegistry() if registry is None else registry
    chosen.register(PrometheusCollector(node))
    return chosen


class _MetricsApp:
    """An ASGI app object (not a function): Starlette's ``add_route`` serves an object as
    an ASGI app at exactly its path, where a function would be taken for an endpoint."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def prometheus_app(node: Node, registry: Any = None) -> Any:
    """An ASGI app serving ``node``'s metrics (and the rest of ``registry``, if given) in
    the Prometheus text format. In FastAPI or Starlette, ``app.add_route("/metrics",
    prometheus_app(node))`` serves it at ``/metrics``; ``app.mount("/metrics", ...)``
    works too, at ``/metrics/`` (``/metrics`` redirects there)."""
    _require_prometheus()
    from prometheus_client import make_asgi_app

    return _MetricsApp(make_asgi_app(register_prometheus(node, registry)))


# -- OpenTelemetry ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    span: Any
    records: int = 0
    acknowledged: int = 0
    accepted: bool = False


@dataclass(slots=True)
class _Receive:
    span: Any
    namespaces: set[str] = field(default_factory=set)


class _Tracer(Observer):
    """Spans of one node's drains, outgoing streams and received handoffs."""

    def __init__(self, node: Node, tracer: Any, trace_api: Any) -> None:
        self._node = node
        self._tracer = tracer
        self._api = trace_api
        self._drain: Any = None
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._inbound: dict[tuple[str, int], str] = {}
        self._receives: dict[str, _Receive] = {}

    def _error(self, span: Any, why: str) -> None:
        span.set_status(self._api.Status(self._api.StatusCode.ERROR, why))

    def drain_started(self, reason: str) -> None:
        self._drain = self._tracer.start_span(
            "handoff.drain",
            attributes={
                "handoff.node": self._node.name,
                "handoff.release": self._node.release,
                "handoff.reason": reason,
            },
        )

    def drain_finished(self, report: DrainReport | None) -> None:
        for key, stream in list(self._streams.items()):
            self._end_stream(key, stream, "unfinished", error="the drain ended first")
        span, self._drain = self._drain, None
        if span is None:
            return
        if report is None:
            self._error(span, "the drain raised")
        else:
            span.set_attributes(
                {
                    "handoff.records": report.records,
                    "handoff.acknowledged": report.acknowledged,
                    "handoff.snapshotted": report.snapshotted,
                    "handoff.dropped": report.dropped,
                    "handoff.lost": report.lost,
                    "handoff.in_doubt": report.in_doubt,
                }
            )
            if not report.ok:
                self._error(span, f"{report.lost} records lost, {report.in_doubt} in doubt")
        span.end()

    def _end_stream(
        self, key: tuple[str, int], stream: _Stream, outcome: str, *, error: str = ""
    ) -> None:
        del self._streams[key]
        stream.span.set_attributes(
            {
                "handoff.records": stream.records,
                "handoff.acknowledged": stream.acknowledged,
                "handoff.outcome": outcome,
            }
        )
        if error:
            self._error(stream.span, error)
        stream.span.end()

    def sent(self, peer: str, message: Message) -> None:
        if isinstance(message, Offer):
            context = self._api.set_span_in_context(self._drain) if self._drain else None
            span = self._tracer.start_span(
                "handoff.stream",
                context=context,
                attributes={
                    "handoff.namespace": message.namespace,
                    "handoff.peer": peer,
                    "handoff.version": message.version,
                },
            )
            self._streams[(peer, message.stream)] = _Stream(span)
        elif isinstance(message, Chunk):
            stream = self._streams.get((peer, message.stream))
            if stream is not None:
                stream.records += message.records
        elif isinstance(message, End):
            stream = self._streams.get((peer, message.stream))
            if stream is not None:
                self._end_stream((peer, message.stream), stream, "ended")
        elif isinstance(message, Cancel):
            stream = self._streams.get((peer, message.stream))
            if stream is not None:
                self._end_stream((peer, message.stream), stream, "cancelled", error=message.reason)
        # The receiving side: what this node answers to the streams it is offered.
        elif isinstance(message, Accept):
            namespace = self._inbound.get((peer, message.stream))
            receive = self._receives.get(peer)
            if receive is None:
                span = self._tracer.start_span("handoff.receive", attributes={"handoff.peer": peer})
                receive = self._receives[peer] = _Receive(span)
            if namespace is not None:
                receive.namespaces.add(namespace)
        elif isinstance(message, Refuse):
            self._inbound.pop((peer, message.stream), None)

    def received(self, peer: str, message: Message) -> None:
        if isinstance(message, Offer):
            if len(self._inbound) < _MAX_INBOUND:
                self._inbound[(peer, message.stream)] = message.namespace
        elif isinstance(message, End | Cancel):
            self._inbound.pop((peer, message.stream), None)
        elif isinstance(message, Accept):
            stream = self._streams.get((peer, message.stream))
            if stream is not None:
                stream.accepted = True
        elif isinstance(message, Ack):
            stream = self._streams.get((peer, message.stream))
            if stream is not None:
                stream.acknowledged += (
                    message.applied + message.kept + sum(n for _, n in message.dropped)
                )
        elif isinstance(message, Refuse):
            stream = self._streams.get((peer, message.stream))
            if stream is not None:
                outcome = "withdrawn" if stream.accepted else "refused"
                stream.span.set_attribute("handoff.refusal", message.reason)
                self._end_stream((peer, message.stream), stream, outcome)

    def peer_lost(self, peer: str) -> None:
        for key, stream in list(self._streams.items()):
            if key[0] == peer:
                self._end_stream(key, stream, "link lost", error="the link to the peer ended")
        for key in [key for key in self._inbound if key[0] == peer]:
            del self._inbound[key]
        receive = self._receives.pop(peer, None)
        if receive is not None:
            self._error(receive.span, "the link to the sender ended before its Done")
            receive.span.end()

    def handoff_received(self, handoff: ReceivedHandoff) -> None:
        receive = self._receives.pop(handoff.peer, None)
        if receive is None:
            return
        receive.span.set_attributes(
            {
                "handoff.release": handoff.release,
                "handoff.records": handoff.records,
                "handoff.applied": handoff.applied,
                "handoff.kept": handoff.kept,
                "handoff.dropped": sum(handoff.dropped.values()),
                "handoff.namespaces": sorted(receive.namespaces),
            }
        )
        receive.span.end()


def trace(node: Node, tracer_provider: Any = None) -> bool:
    """Make OpenTelemetry spans of ``node``'s drains, streams and received handoffs, with
    the tracer of ``tracer_provider`` (default: the global one the application set up).

    Returns False, and does nothing, when ``opentelemetry-api`` is not installed: tracing
    is then free. Call it before the node starts; calling it again changes nothing.
    """
    try:
        from opentelemetry import trace as trace_api
    except ImportError:
        logger.debug("opentelemetry-api is not installed: %s makes no spans", node.name)
        return False
    if any(isinstance(observer, _Tracer) for observer in node._observers):
        return True  # traced already: a second tracer would double every span
    tracer = trace_api.get_tracer("handoff", tracer_provider=tracer_provider)
    node._observers.add(_Tracer(node, tracer, trace_api))
    return True
