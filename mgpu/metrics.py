# -*- test-case-name: tests.test_metrics -*-
"""``GET /metrics``: the daemon in Prometheus text format.

Two sources, neither of which does any work on a request's path:

- what *happened* (requests, loads, evictions, refusals, timeouts) is counted
  as it happens, in counters and histograms: ``observe`` for every finished
  request, and a listener on the event bus;
- what *is* (queue, lease, consumers, GPU memory, event streams) is read at
  scrape time by a collector, from state already in memory: the GPU figures
  are the poller's cached reading, never a fresh one, so a slow nvidia-smi
  cannot hold a scrape up, and consumers removed by a reload simply stop
  being reported.

Every label value comes from the configuration or from a fixed set, so the
number of series stays bounded whatever clients send. Memory is in bytes and
time in seconds, as Prometheus conventions ask. Each ``BrokerMetrics`` has its
own ``CollectorRegistry``: nothing goes to prometheus_client's global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime

from mgpu.cards import Card
from mgpu.events import Event, EventBus
from mgpu.gpu import MIB, GpuPoller, GpuSnapshot
from mgpu.memory import MemoryWatch
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Leases
from mgpu.site import TimedRequest, route_label
from mgpu.sse import EventStreams
from mgpu.tunnel import Tunnels

#: A request's wait and duration: from a millisecond to ``timeout_s``-sized jobs (10 min).
REQUEST_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: Loading a model: tens of milliseconds (already cached) to minutes (from disk).
LOAD_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: Unload answer to memory seen free: at most ``free_wait_s`` (10 s by default).
FREE_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: How long a victim had been loaded: seconds to a week.
AGE_BUCKETS: Final = (
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0,
    12 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0,
)  # fmt: skip

#: The reasons each event may carry; anything else is counted as ``other``.
LOAD_REASONS: Final = frozenset({"request", "admin"})
UNLOAD_REASONS: Final = frozenset({"admin"})
REJECT_REASONS: Final = ("queue_full", "queue_timeout", "consumer_unreachable", "payload_too_large")
TIMEOUT_REASONS: Final = frozenset({"upstream", "hold_until"})
OTHER: Final = "other"


def _bounded(value: object, allowed: frozenset[str] | tuple[str, ...]) -> str:
    """``value`` as a label if it is one of ``allowed``, else ``other``."""
    return value if isinstance(value, str) and value in allowed else OTHER


def _seconds(value: object) -> float | None:
    """A duration from an event payload (a JSON number), or None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class BrokerMetrics:
    """The daemon's metrics: counted as things happen, read at scrape time, rendered on demand.

    ``clock`` (the one that stamped ``received_at``) times the requests.
    """

    def __init__(
        self,
        bus: EventBus,
        gpu: GpuPoller,
        registry: Registry,
        scheduler: Leases,
        streams: EventStreams,
        *,
        clock: IReactorTime,
        watch: MemoryWatch | None = None,
        tunnels: Tunnels | None = None,
        cards: Sequence[Card] = (),
    ) -> None:
        self._clock = clock
        reg = self._prometheus = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "mgpu_http_requests",
            "Finished HTTP requests, by route and status code.",
            ["route", "code"],
            registry=reg,
        )
        self._duration = Histogram(
            "mgpu_request_duration_seconds",
            "Time from receiving a proxied request to finishing its answer, by consumer and code.",
            ["consumer", "code"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self._queue_wait = Histogram(
            "mgpu_queue_wait_seconds",
            "Time a proxied request waited for the GPU lease (room-making and loading "
            "included), by consumer and code.",
            ["consumer", "code"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self._evictions = Counter(
            "mgpu_evictions",
            "Consumers unloaded to make room for another, by victim.",
            ["consumer"],
            registry=reg,
        )
        self._free_wait = Histogram(
            "mgpu_eviction_free_seconds",
            "Time from a victim's unload answer to its memory seen free (or giving up), by victim.",
            ["consumer"],
            buckets=FREE_BUCKETS,
            registry=reg,
        )
        self._age = Histogram(
            "mgpu_eviction_age_seconds",
            "How long a victim had been loaded when it was unloaded to make room.",
            ["consumer"],
            buckets=AGE_BUCKETS,
            registry=reg,
        )
        self._loads = Counter(
            "mgpu_loads",
            "Successful load calls, by consumer and reason (request or admin).",
            ["consumer", "reason"],
            registry=reg,
        )
        self._load_duration = Histogram(
            "mgpu_load_duration_seconds",
            "Time a consumer's load route took to answer, by consumer.",
            ["consumer"],
            buckets=LOAD_BUCKETS,
            registry=reg,
        )
        self._unloads = Counter(
            "mgpu_unloads",
            "Successful unloads asked for by the operator (evictions are counted apart).",
            ["consumer", "reason"],
            registry=reg,
        )
        self._rejections = Counter(
            "mgpu_rejections",
            "Requests refused before admission, by reason.",
            ["reason"],
            registry=reg,
        )
        for reason in REJECT_REASONS:
            self._rejections.labels(reason)  # present, at zero, from the start
        self._shed = Counter(
            "mgpu_shed_connections",
            "Client connections answered 503 daemon_overloaded because the daemon's "
            "file-descriptor budget was spent.",
            registry=reg,
        )
        self._header_timeouts = Counter(
            "mgpu_header_timeouts",
            "Client connections closed because a request head they had begun was not "
            "complete within limits.header_timeout_s.",
            registry=reg,
        )
        self._timeouts = Counter(
            "mgpu_timeouts",
            "Requests whose consumer did not answer (upstream) or finish (hold_until) in time.",
            ["consumer", "reason"],
            registry=reg,
        )
        live = _LiveState(gpu, registry, scheduler, streams, watch, tunnels, tuple(cards))
        reg.register(live)
        self._handlers: Mapping[str, Callable[[Mapping[str, object]], None]] = {
            "evict": self._evicted,
            "load": self._loaded,
            "unload": self._unloaded,
            "rejected": self._rejected,
            "timeout": self._timed_out,
        }
        bus.subscribe(self._on_event)  # for the daemon's lifetime

    def observe(self, request: TimedRequest) -> None:
        """Count a finished request; time it too if it was proxied to a consumer."""
        code = str(request.code)
        self._requests.labels(route_label(request), code).inc()
        consumer = request.consumer
        if consumer is None:
            return
        took = max(0.0, self._clock.seconds() - request.received_at)
        self._duration.labels(consumer, code).observe(took)
        if request.queue_wait_s is not None:
            self._queue_wait.labels(consumer, code).observe(max(0.0, request.queue_wait_s))

    def connection_shed(self) -> None:
        """Count a client connection answered 503 at the file-descriptor budget."""
        self._shed.inc()

    def header_timed_out(self) -> None:
        """Count a connection closed for a slow request head (not an event: a drip
        attack must not flood the event stream)."""
        self._header_timeouts.inc()

    def render(self) -> tuple[bytes, str]:
        """The scrape body and its content type; reads memory only."""
        return generate_latest(_WithoutCreated(self._prometheus)), CONTENT_TYPE_LATEST

    # -- events --------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event.data)

    def _evicted(self, data: Mapping[str, object]) -> None:
        victim = str(data["consumer"])
        self._evictions.labels(victim).inc()
        free_s = _seconds(data.get("free_s"))
        if free_s is not None:
            self._free_wait.labels(victim).observe(free_s)
        age_s = _seconds(data.get("age_s"))
        if age_s is not None:  # None: the broker never saw it become loaded
            self._age.labels(victim).observe(age_s)

    def _loaded(self, data: Mapping[str, object]) -> None:
        consumer = str(data["consumer"])
        self._loads.labels(consumer, _bounded(data.get("reason"), LOAD_REASONS)).inc()
        took_s = _seconds(data.get("took_s"))
        if took_s is not None:
            self._load_duration.labels(consumer).observe(took_s)

    def _unloaded(self, data: Mapping[str, object]) -> None:
        reason = _bounded(data.get("reason"), UNLOAD_REASONS)
        self._unloads.labels(str(data["consumer"]), reason).inc()

    def _rejected(self, data: Mapping[str, object]) -> None:
        self._rejections.labels(_bounded(data.get("reason"), REJECT_REASONS)).inc()

    def _timed_out(self, data: Mapping[str, object]) -> None:
        reason = _bounded(data.get("reason"), TIMEOUT_REASONS)
        self._timeouts.labels(str(data["consumer"]), reason).inc()


@frozen
class _WithoutCreated:
    """A registry's metrics less prometheus_client's ``*_created`` series.

    They double the series of every counter and histogram with wall-clock
    start times that no query here uses; ``disable_created_metrics()`` would
    do the same, but for the whole process.
    """

    registry: CollectorRegistry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():  # fresh Metric objects on every call
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


@frozen
class _LiveState:
    """The gauges, read from memory at scrape time (a prometheus_client collector)."""

    gpu: GpuPoller
    registry: Registry
    scheduler: Leases
    streams: EventStreams
    watch: MemoryWatch | None = None
    tunnels: Tunnels | None = None
    cards: Sequence[Card] = ()

    def collect(self) -> Iterator[Metric]:
        yield from self._scheduler()
        yield from self._consumers()
        yield from self._gpu()
        yield GaugeMetricFamily(
            "mgpu_sse_clients", "Clients connected to /v1/events.", value=self.streams.clients
        )
        yield CounterMetricFamily(
            "mgpu_sse_dropped_events",
            "Events dropped because an /v1/events client read too slowly.",
            value=self.streams.dropped,
        )
        yield CounterMetricFamily(
            "mgpu_sse_dropped_clients",
            "/v1/events clients whose stream was ended because they read too slowly.",
            value=self.streams.dropped_clients,
        )
        if self.tunnels is not None:
            yield from _tunnels(self.tunnels)

    def _scheduler(self) -> Iterator[Metric]:
        scheduler = self.scheduler
        yield GaugeMetricFamily(
            "mgpu_queue_depth", "Requests waiting for the GPU lease.", value=scheduler.queued
        )
        yield GaugeMetricFamily(
            "mgpu_running_requests",
            "Requests admitted under the GPU lease (being prepared or running).",
            value=scheduler.running,
        )

    def _consumers(self) -> Iterator[Metric]:
        states = self.registry.states
        holders = {card.lane.holder for card in self.cards} or {self.scheduler.holder}
        queued = _per_consumer(
            "mgpu_consumer_queue_depth", "Requests waiting for the GPU lease, by consumer."
        )
        running = _per_consumer(
            "mgpu_consumer_running_requests", "Requests admitted under the GPU lease, by consumer."
        )
        lease = _per_consumer(
            "mgpu_lease_holder", "1 for a consumer holding a GPU lease (of any card)."
        )
        up = _per_consumer(
            "mgpu_consumer_up", "1 if the last health probe succeeded (absent before the first)."
        )
        loaded = _per_consumer(
            "mgpu_consumer_loaded",
            "1 if the broker believes its model is resident (absent while unknown).",
        )
        memory = _per_consumer(
            "mgpu_consumer_gpu_memory_bytes",
            "GPU memory its processes hold at the latest reading (absent while unknown).",
        )
        learned = _per_consumer(
            "mgpu_consumer_learned_bytes",
            "The most GPU memory its processes were seen to hold while loaded.",
        )
        for name, state in states.items():
            now = (
                state.memory
                if self.watch is None or state.attribution is None
                else self.watch.now(state.attribution)
            )
            if now.used_mib is not None:
                memory.add_metric([name], now.used_mib * MIB)
            learned_mib = None if self.watch is None else self.watch.learned.get(name)
            if learned_mib is not None:
                learned.add_metric([name], learned_mib * MIB)
            queued.add_metric([name], state.queued)
            running.add_metric([name], state.in_flight)
            lease.add_metric([name], 1 if name in holders else 0)
            if state.healthy is not None:
                up.add_metric([name], 1 if state.healthy else 0)
            if state.loaded is not None:
                loaded.add_metric([name], 1 if state.loaded else 0)
        yield from (queued, running, lease, up, loaded, memory, learned)

    def _readings(self) -> list[tuple[GpuSnapshot, MemoryWatch | None, GpuScheduler | None]]:
        """Each card's latest reading, what holds it and its lease (one card: the poller)."""
        if self.cards:
            return [(card.poller.latest, card.watch, card.lane) for card in self.cards]
        return [(self.gpu.latest, self.watch, None)]

    def _gpu(self) -> Iterator[Metric]:
        """Each card's latest reading, labelled ``gpu``; sizes are absent while a card has
        none (never NaN)."""
        info = GaugeMetricFamily(
            "mgpu_gpu_info",
            "The GPU read and how (source: nvml, nvidia-smi, sim or none); always 1.",
            labels=["gpu", "index", "name", "source"],
        )
        ok = _per_gpu(
            "mgpu_gpu_reading_ok",
            "1 if the latest GPU memory reading succeeded; 0 while there is none.",
        )
        read_at = _per_gpu(
            "mgpu_gpu_reading_timestamp_seconds",
            "When the latest GPU reading (or failed attempt) was taken, Unix time.",
        )
        sizes = {
            key: _per_gpu(
                f"mgpu_gpu_memory_{key}_bytes", f"{word} GPU memory at the latest reading."
            )
            for key, word in (("total", "Total"), ("used", "Used"), ("free", "Free"))
        }
        other = _per_gpu(
            "mgpu_gpu_other_memory_bytes",
            "GPU memory held by processes of no consumer (unmovable).",
        )
        queued = _per_gpu("mgpu_gpu_queue_depth", "Requests waiting for this card's lease.")
        pids = self.registry.attributed_pids()
        for snapshot, watch, lane in self._readings():
            gpu = [str(snapshot.index)]
            info.add_metric([*gpu, str(snapshot.index), snapshot.name or "", snapshot.source], 1)
            ok.add_metric(gpu, 1 if snapshot.ok else 0)
            if lane is not None:
                queued.add_metric(gpu, lane.queued)
            if snapshot.read_at is not None:
                read_at.add_metric(gpu, snapshot.read_at.timestamp())
            if not snapshot.ok:
                continue
            figures = {"total": snapshot.total_mib, "used": snapshot.used_mib,
                       "free": snapshot.free_mib}  # fmt: skip
            for key, mib in figures.items():
                if mib is not None:
                    sizes[key].add_metric(gpu, mib * MIB)
            other_mib = None if watch is None else watch.others(pids)[0]
            if other_mib is not None:
                other.add_metric(gpu, other_mib * MIB)
        families = (info, ok, read_at, *sizes.values(), other, queued)
        yield from (family for family in families if family.samples)


def _per_consumer(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=["consumer"])


def _per_gpu(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=["gpu"])


def _tunnels(tunnels: Tunnels) -> Iterator[Metric]:
    """The WebSocket tunnels of native routes (SPEC 9.1): open now, and opened in all."""
    yield GaugeMetricFamily(
        "mgpu_websocket_tunnels",
        "WebSocket tunnels open now (native routes; they hold no GPU lease).",
        value=tunnels.open_count,
    )
    yield CounterMetricFamily(
        "mgpu_websocket_tunnels_opened",
        "WebSocket tunnels opened since the daemon started (a consumer answered 101).",
        value=tunnels.opened_total,
    )
