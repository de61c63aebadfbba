"""Tests for mgpu.metrics: what ``GET /metrics`` says, read back with Prometheus's own parser.

Everything is real but time and the GPU: a ``Clock``, and a GPU reader whose
snapshot each test sets (and whose reads are counted: a scrape must not cause
one). Events reach the metrics through a real ``EventBus``, the scheduler's
numbers through a real ``GpuScheduler``, the consumers' through a real
``Registry``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from attrs import evolve
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from mgpu.config import parse_config
from mgpu.control import ProbeResult
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.gpu import MIB, GpuPoller, GpuSnapshot, failed_snapshot
from mgpu.metrics import BrokerMetrics
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Lease
from mgpu.site import TimedRequest
from mgpu.sse import EventStreams
from tests.test_api import SNAPSHOT
from tests.test_facade import Client, _Front

#: The labels of the first card's series (SPEC 9.5: GPU series carry ``gpu``).
GPU0 = frozenset({("gpu", "0")})

START = 1_795_000_000.0
READ_AT = datetime.fromtimestamp(START, UTC)

CONFIG = parse_config(
    {
        "gpu": {"source": "nvidia-smi"},
        "scheduler": {"max_queue": 1},
        "routing": {"tts": "mvoice", "image": "comfyui"},
        "consumers": {
            "mvoice": {
                "url": "http://127.0.0.1:8765",
                "paths": {"tts": {"path": "/api/synthesize"}},
                "vram_resident_mib": 2800,
                "load": {"path": "/api/admin/load"},
                "unload": {"path": "/api/admin/unload"},
            },
            "comfyui": {
                "url": "http://127.0.0.1:8188",
                "paths": {"image": {"path": "/prompt"}},
                "vram_resident_mib": 13000,
                "unload": {"path": "/free"},
            },
        },
    }
)

#: The reading of tests.test_api, as nvidia-smi took it at START.
OK_READING = evolve(SNAPSHOT, source="nvidia-smi", read_at=READ_AT)


class ControlledReader:
    """A GPU reader answering ``snapshot``; counts its reads."""

    source = "nvidia-smi"

    def __init__(self, snapshot: GpuSnapshot) -> None:
        self.snapshot = snapshot
        self.reads = 0

    def read(self) -> Deferred[GpuSnapshot]:
        self.reads += 1
        return succeed(self.snapshot)


Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse(body: bytes) -> Samples:
    """Every sample of a scrape: sample name -> {label set: value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


class MetricsTestCase(SynchronousTestCase):
    """A BrokerMetrics over real collaborators, a Clock and a controlled GPU reader."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.bus = EventBus(self.clock)
        self.registry = Registry(CONFIG.consumers, self.clock, self.bus)
        self.scheduler = GpuScheduler(self.registry, self.clock, CONFIG.scheduler, events=self.bus)
        self.streams = EventStreams(self.bus, self.clock, delay_s=0)
        self.reader = ControlledReader(OK_READING)
        self.poller = GpuPoller(self.reader, self.clock, 2.0)
        self.metrics = BrokerMetrics(
            self.bus, self.poller, self.registry, self.scheduler, self.streams, clock=self.clock
        )

    def scrape(self) -> Samples:
        body, content_type = self.metrics.render()
        self.assertEqual(content_type, CONTENT_TYPE_LATEST)
        return parse(body)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value in a fresh scrape, or None if the scrape has no such sample."""
        return self.scrape().get(name, {}).get(frozenset(labels.items()))

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample called ``name`` in a fresh scrape."""
        return self.scrape().get(name, {})

    def read_gpu(self, snapshot: GpuSnapshot) -> None:
        """Let the poller take (and cache) one reading of ``snapshot``."""
        self.reader.snapshot = snapshot
        self.successResultOf(self.poller.fresh())

    def request(
        self,
        path: bytes,
        code: int,
        consumer: str | None = None,
        took_s: float = 0.0,
        queue_wait_s: float | None = None,
    ) -> TimedRequest:
        """A finished request as the site hands it over, received ``took_s`` ago."""
        fake = SimpleNamespace(
            path=path,
            method=b"POST",
            code=code,
            consumer=consumer,
            queue_wait_s=queue_wait_s,
            received_at=self.clock.seconds() - took_s,
        )
        return cast(TimedRequest, fake)


class RenderTests(MetricsTestCase):
    """The scrape itself."""

    def test_prometheus_text_with_own_names(self) -> None:
        """render() gives the latest Prometheus text content type and a body Prometheus's parser
        reads, every family named mgpu_*, with no prometheus_client _created series."""
        body, content_type = self.metrics.render()
        self.assertEqual(content_type, CONTENT_TYPE_LATEST)
        self.assertTrue(content_type.startswith("text/plain"))
        families = list(text_string_to_metric_families(body.decode("utf-8")))
        self.assertGreater(len(families), 10)
        for family in families:
            self.assertTrue(family.name.startswith("mgpu_"), family.name)
            for sample in family.samples:
                self.assertFalse(sample.name.endswith("_created"), sample.name)

    def test_registry_is_per_instance(self) -> None:
        """Two BrokerMetrics count apart; nothing reaches prometheus_client's global registry."""
        other = BrokerMetrics(
            self.bus, self.poller, self.registry, self.scheduler, self.streams, clock=self.clock
        )
        other.observe(self.request(b"/healthz", 200))
        self.assertEqual(parse(other.render()[0])["mgpu_http_requests_total"], {
            frozenset({("route", "/healthz"), ("code", "200")}): 1.0,
        })  # fmt: skip
        self.assertIsNone(self.value("mgpu_http_requests_total", route="/healthz", code="200"))
        self.assertNotIn(b"mgpu_", generate_latest(REGISTRY))

    def test_render_never_reads_the_gpu(self) -> None:
        """Scrapes serve the poller's cached reading: the reader is never called by one."""
        self.read_gpu(OK_READING)
        self.assertEqual(self.reader.reads, 1)
        for _ in range(3):
            self.metrics.render()
        self.assertEqual(self.reader.reads, 1)


class EventTests(MetricsTestCase):
    """Counters and histograms moved by the event bus."""

    def evict(self, victim: str, free_s: float, age_s: float | None) -> None:
        self.bus.publish(
            "evict",
            consumer=victim,
            target="mvoice",
            reason="mvoice needs 3056 MiB, 2360 MiB were free",
            freed_mib=13000,
            free_s=free_s,
            age_s=age_s,
        )

    def test_eviction_counted_and_timed(self) -> None:
        """An evict event counts one eviction of its victim and observes its free wait and its
        age, each in the right bucket."""
        self.evict("comfyui", free_s=0.3, age_s=4000.0)
        samples = self.scrape()
        victim = frozenset({("consumer", "comfyui")})
        self.assertEqual(samples["mgpu_evictions_total"], {victim: 1.0})
        free = samples["mgpu_eviction_free_seconds_bucket"]
        self.assertEqual(free[victim | {("le", "0.25")}], 0.0)
        self.assertEqual(free[victim | {("le", "0.5")}], 1.0)
        self.assertEqual(samples["mgpu_eviction_free_seconds_count"], {victim: 1.0})
        self.assertAlmostEqual(samples["mgpu_eviction_free_seconds_sum"][victim], 0.3)
        age = samples["mgpu_eviction_age_seconds_bucket"]
        self.assertEqual(age[victim | {("le", "3600.0")}], 0.0)
        self.assertEqual(age[victim | {("le", "10800.0")}], 1.0)
        self.assertEqual(samples["mgpu_eviction_age_seconds_sum"], {victim: 4000.0})

    def test_eviction_of_unknown_age(self) -> None:
        """An eviction whose victim's load time was never seen (age_s null) is counted, but
        observes no age."""
        self.evict("comfyui", free_s=0.3, age_s=1.0)
        self.evict("comfyui", free_s=0.1, age_s=None)
        victim = frozenset({("consumer", "comfyui")})
        samples = self.scrape()
        self.assertEqual(samples["mgpu_evictions_total"], {victim: 2.0})
        self.assertEqual(samples["mgpu_eviction_free_seconds_count"], {victim: 2.0})
        self.assertEqual(samples["mgpu_eviction_age_seconds_count"], {victim: 1.0})

    def test_loads_by_reason_and_timed(self) -> None:
        """A load event counts by consumer and reason and observes the load's duration; a
        reason outside the known ones is counted as ``other``."""
        self.bus.publish("load", consumer="mvoice", reason="request", took_s=1.2)
        self.bus.publish("load", consumer="mvoice", reason="admin", took_s=0.04)
        self.bus.publish("load", consumer="mvoice", reason="made up", took_s=0.04)
        samples = self.scrape()
        self.assertEqual(samples["mgpu_loads_total"], {
            frozenset({("consumer", "mvoice"), ("reason", "request")}): 1.0,
            frozenset({("consumer", "mvoice"), ("reason", "admin")}): 1.0,
            frozenset({("consumer", "mvoice"), ("reason", "other")}): 1.0,
        })  # fmt: skip
        mvoice = frozenset({("consumer", "mvoice")})
        self.assertEqual(samples["mgpu_load_duration_seconds_count"], {mvoice: 3.0})
        buckets = samples["mgpu_load_duration_seconds_bucket"]
        self.assertEqual(buckets[mvoice | {("le", "0.05")}], 2.0)
        self.assertEqual(buckets[mvoice | {("le", "1.0")}], 2.0)
        self.assertEqual(buckets[mvoice | {("le", "2.5")}], 3.0)

    def test_admin_unload_counted_apart_from_evictions(self) -> None:
        """An admin unload counts under mgpu_unloads_total, not as an eviction."""
        self.bus.publish("unload", consumer="mvoice", reason="admin")
        self.assertEqual(self.value("mgpu_unloads_total", consumer="mvoice", reason="admin"), 1.0)
        self.assertEqual(self.series("mgpu_evictions_total"), {})

    def test_rejections_by_reason(self) -> None:
        """Refusals count by reason; every known reason is there from the start, at zero."""
        self.assertEqual(self.value("mgpu_rejections_total", reason="queue_full"), 0.0)
        self.scheduler.reject("payload_too_large")
        self.scheduler.reject("consumer_unreachable", "comfyui")
        self.scheduler.reject("consumer_unreachable", "mvoice")
        self.assertEqual(self.series("mgpu_rejections_total"), {
            frozenset({("reason", "queue_full")}): 0.0,
            frozenset({("reason", "queue_timeout")}): 0.0,
            frozenset({("reason", "consumer_unreachable")}): 2.0,
            frozenset({("reason", "payload_too_large")}): 1.0,
        })  # fmt: skip

    def test_timeouts_by_consumer_and_reason(self) -> None:
        """Timeout events count by consumer and reason."""
        self.bus.publish("timeout", consumer="comfyui", reason="hold_until", after_s=60)
        self.bus.publish("timeout", consumer="mvoice", reason="upstream", after_s=60)
        self.bus.publish("timeout", consumer="mvoice", reason="upstream", after_s=60)
        self.assertEqual(self.series("mgpu_timeouts_total"), {
            frozenset({("consumer", "comfyui"), ("reason", "hold_until")}): 1.0,
            frozenset({("consumer", "mvoice"), ("reason", "upstream")}): 2.0,
        })  # fmt: skip

    def test_header_timeouts_counted_without_events(self) -> None:
        """Connections closed for a slow head count in mgpu_header_timeouts_total, at zero
        from the start, and publish no event (a drip attack must not flood the stream)."""
        self.assertEqual(self.value("mgpu_header_timeouts_total"), 0.0)
        self.metrics.header_timed_out()
        self.metrics.header_timed_out()
        self.assertEqual(self.value("mgpu_header_timeouts_total"), 2.0)
        self.assertEqual(self.bus.recent(), [])


class SchedulerGaugeTests(MetricsTestCase):
    """The queue and the lease, read at scrape time."""

    def test_queue_running_holder_and_queue_full(self) -> None:
        """With mvoice holding the lease and comfyui queued behind it, the gauges say so; a
        request past max_queue is refused and counted as queue_full."""
        self.assertEqual(self.value("mgpu_lease_holder", consumer="mvoice"), 0.0)
        held: Deferred[None] = Deferred()

        def job(lease: Lease) -> Deferred[None]:
            return held

        running = self.scheduler.run("mvoice", job, prepare=False)
        queued = self.scheduler.run("comfyui", lambda lease: succeed(None), prepare=False)
        refused = self.scheduler.run("comfyui", lambda lease: succeed(None), prepare=False)
        self.assertEqual(self.failureResultOf(refused, BrokerError).value.code, "queue_full")
        samples = self.scrape()
        self.assertEqual(samples["mgpu_queue_depth"], {frozenset(): 1.0})
        self.assertEqual(samples["mgpu_running_requests"], {frozenset(): 1.0})
        self.assertEqual(samples["mgpu_lease_holder"], {
            frozenset({("consumer", "mvoice")}): 1.0,
            frozenset({("consumer", "comfyui")}): 0.0,
        })  # fmt: skip
        self.assertEqual(samples["mgpu_consumer_queue_depth"], {
            frozenset({("consumer", "mvoice")}): 0.0,
            frozenset({("consumer", "comfyui")}): 1.0,
        })  # fmt: skip
        self.assertEqual(samples["mgpu_consumer_running_requests"], {
            frozenset({("consumer", "mvoice")}): 1.0,
            frozenset({("consumer", "comfyui")}): 0.0,
        })  # fmt: skip
        self.assertEqual(samples["mgpu_rejections_total"][frozenset({("reason", "queue_full")})], 1)
        held.callback(None)
        self.successResultOf(running)
        self.successResultOf(queued)
        samples = self.scrape()
        self.assertEqual(samples["mgpu_queue_depth"], {frozenset(): 0.0})
        self.assertEqual(samples["mgpu_running_requests"], {frozenset(): 0.0})
        self.assertEqual(set(samples["mgpu_lease_holder"].values()), {0.0})

    def test_event_stream_clients_and_drops(self) -> None:
        """The event streams' client count, dropped events and dropped clients are read at
        scrape time."""

        def follow(request: Request) -> None:
            self.streams.render(request)

        for _ in range(2):
            Client(_Front(follow)).send(b"GET", b"/v1/events")
        self.streams.dropped = 7
        self.streams.dropped_clients = 3
        self.assertEqual(self.value("mgpu_sse_clients"), 2.0)
        self.assertEqual(self.value("mgpu_sse_dropped_events_total"), 7.0)
        self.assertEqual(self.value("mgpu_sse_dropped_clients_total"), 3.0)


class ConsumerGaugeTests(MetricsTestCase):
    """Consumer health and residency, from the registry at scrape time."""

    def probe(self, name: str, healthy: bool, loaded: bool | None) -> None:
        state = self.registry[name]
        result = ProbeResult(healthy, loaded, None if healthy else "connection refused")
        self.registry.record_probe(name, state.generation, result)

    def test_unknown_until_probed(self) -> None:
        """Before the first probe, up and loaded have no sample (unknown is not 0)."""
        self.assertEqual(self.series("mgpu_consumer_up"), {})
        self.assertEqual(self.series("mgpu_consumer_loaded"), {})

    def test_follow_the_registry(self) -> None:
        """up and loaded follow probes, the broker's own unloads and a failed request."""
        self.probe("mvoice", healthy=True, loaded=True)
        self.probe("comfyui", healthy=True, loaded=False)
        mvoice, comfyui = frozenset({("consumer", "mvoice")}), frozenset({("consumer", "comfyui")})
        samples = self.scrape()
        self.assertEqual(samples["mgpu_consumer_up"], {mvoice: 1.0, comfyui: 1.0})
        self.assertEqual(samples["mgpu_consumer_loaded"], {mvoice: 1.0, comfyui: 0.0})
        self.registry.mark_unloaded("mvoice")
        self.registry.mark_loaded("comfyui")
        self.registry.mark_unreachable("comfyui", "connection refused")
        samples = self.scrape()
        self.assertEqual(samples["mgpu_consumer_up"], {mvoice: 1.0, comfyui: 0.0})
        self.assertEqual(samples["mgpu_consumer_loaded"], {mvoice: 0.0, comfyui: 1.0})

    def test_removed_consumer_disappears(self) -> None:
        """A consumer removed by a reload is gone from every per-consumer gauge."""
        self.probe("comfyui", healthy=True, loaded=True)
        self.registry.reconfigure({"mvoice": CONFIG.consumers["mvoice"]})
        samples = self.scrape()
        for name in (
            "mgpu_consumer_up",
            "mgpu_consumer_loaded",
            "mgpu_consumer_queue_depth",
            "mgpu_consumer_running_requests",
            "mgpu_lease_holder",
        ):
            consumers = {dict(labels)["consumer"] for labels in samples.get(name, {})}
            self.assertNotIn("comfyui", consumers, name)
        self.assertEqual(samples["mgpu_lease_holder"], {frozenset({("consumer", "mvoice")}): 0.0})


class GpuGaugeTests(MetricsTestCase):
    """GPU memory from the poller's cached reading, in bytes."""

    def test_equal_to_the_reading(self) -> None:
        """Total, used and free are the reading's MiB in bytes; ok is 1; info names the card."""
        self.read_gpu(OK_READING)
        samples = self.scrape()
        self.assertEqual(samples["mgpu_gpu_memory_total_bytes"], {GPU0: 24564 * MIB})
        self.assertEqual(samples["mgpu_gpu_memory_used_bytes"], {GPU0: 16012 * MIB})
        self.assertEqual(samples["mgpu_gpu_memory_free_bytes"], {GPU0: 8552 * MIB})
        self.assertEqual(samples["mgpu_gpu_reading_ok"], {GPU0: 1.0})
        self.assertEqual(samples["mgpu_gpu_reading_timestamp_seconds"], {GPU0: START})
        self.assertEqual(samples["mgpu_gpu_info"], {
            frozenset({("gpu", "0"), ("index", "0"), ("name", OK_READING.name),
                       ("source", "nvidia-smi")}): 1.0,
        })  # fmt: skip

    def test_follows_the_latest_reading(self) -> None:
        """A newer reading replaces the figures."""
        self.read_gpu(OK_READING)
        self.clock.advance(2)
        later = GpuSnapshot(
            "nvidia-smi", True, None, 0, OK_READING.name, 24564, 4000, 20564,
            datetime.fromtimestamp(START + 2, UTC),
        )  # fmt: skip
        self.read_gpu(later)
        samples = self.scrape()
        self.assertEqual(samples["mgpu_gpu_memory_used_bytes"], {GPU0: 4000 * MIB})
        self.assertEqual(samples["mgpu_gpu_memory_free_bytes"], {GPU0: 20564 * MIB})
        self.assertEqual(samples["mgpu_gpu_reading_timestamp_seconds"], {GPU0: START + 2})

    def test_failed_reading_has_no_sizes(self) -> None:
        """A failed reading gives ok=0 and no memory samples at all (not NaN, not stale ones)."""
        self.read_gpu(OK_READING)
        self.read_gpu(failed_snapshot("nvidia-smi", 0, "nvidia-smi timed out", READ_AT))
        samples = self.scrape()
        self.assertEqual(samples["mgpu_gpu_reading_ok"], {GPU0: 0.0})
        for key in ("total", "used", "free"):
            self.assertNotIn(f"mgpu_gpu_memory_{key}_bytes", samples)
        for values in samples.values():
            self.assertFalse(any(math.isnan(v) for v in values.values()))

    def test_not_read_yet(self) -> None:
        """Before the first reading: ok=0, no sizes, no reading time, the reader not called."""
        samples = self.scrape()
        self.assertEqual(samples["mgpu_gpu_reading_ok"], {GPU0: 0.0})
        self.assertNotIn("mgpu_gpu_memory_total_bytes", samples)
        self.assertNotIn("mgpu_gpu_reading_timestamp_seconds", samples)
        self.assertEqual(self.reader.reads, 0)


class ObserveTests(MetricsTestCase):
    """Finished requests, as the site reports them."""

    def labels(self, **labels: str) -> frozenset[tuple[str, str]]:
        return frozenset(labels.items())

    def test_proxied_request_in_its_buckets(self) -> None:
        """A proxied request is counted by route and code, and its duration and queue wait land
        in the right buckets under its consumer and code."""
        self.metrics.observe(self.request(b"/v1/tts", 200, "mvoice", took_s=0.3, queue_wait_s=0.02))
        samples = self.scrape()
        key = self.labels(consumer="mvoice", code="200")
        self.assertEqual(samples["mgpu_http_requests_total"], {
            self.labels(route="/v1/tts", code="200"): 1.0,
        })  # fmt: skip
        duration = samples["mgpu_request_duration_seconds_bucket"]
        self.assertEqual(duration[key | {("le", "0.25")}], 0.0)
        self.assertEqual(duration[key | {("le", "0.5")}], 1.0)
        self.assertEqual(samples["mgpu_request_duration_seconds_count"], {key: 1.0})
        self.assertAlmostEqual(samples["mgpu_request_duration_seconds_sum"][key], 0.3, places=6)
        wait = samples["mgpu_queue_wait_seconds_bucket"]
        self.assertEqual(wait[key | {("le", "0.01")}], 0.0)
        self.assertEqual(wait[key | {("le", "0.025")}], 1.0)
        self.assertEqual(samples["mgpu_queue_wait_seconds_count"], {key: 1.0})

    def test_by_consumer_and_code(self) -> None:
        """Requests of different consumers and codes count apart; one refused before
        admission (no queue wait) is timed but has no wait."""
        self.metrics.observe(self.request(b"/v1/tts", 200, "mvoice", 0.1, 0.0))
        self.metrics.observe(self.request(b"/v1/tts", 200, "mvoice", 0.1, 0.0))
        self.metrics.observe(self.request(b"/v1/image", 503, "comfyui", 0.1, None))
        samples = self.scrape()
        self.assertEqual(samples["mgpu_request_duration_seconds_count"], {
            self.labels(consumer="mvoice", code="200"): 2.0,
            self.labels(consumer="comfyui", code="503"): 1.0,
        })  # fmt: skip
        self.assertEqual(samples["mgpu_queue_wait_seconds_count"], {
            self.labels(consumer="mvoice", code="200"): 2.0,
        })  # fmt: skip

    def test_unproxied_requests_counted_not_timed(self) -> None:
        """A request with no consumer counts by route only; client-chosen paths collapse to
        bounded routes."""
        self.metrics.observe(self.request(b"/v1/status", 200))
        self.metrics.observe(self.request(b"/audio/a/b.wav", 404, "mvoice", 0.01))
        self.metrics.observe(self.request(b"/v1/admin/consumers/x/load", 404))
        self.metrics.observe(self.request(b"/wp-login.php", 404))
        self.metrics.observe(self.request(b"/etc/passwd", 404))
        samples = self.scrape()
        self.assertEqual(samples["mgpu_http_requests_total"], {
            self.labels(route="/v1/status", code="200"): 1.0,
            self.labels(route="/audio", code="404"): 1.0,
            self.labels(route="/v1/admin/consumers", code="404"): 1.0,
            self.labels(route="other", code="404"): 2.0,
        })  # fmt: skip
        self.assertEqual(samples["mgpu_request_duration_seconds_count"], {
            self.labels(consumer="mvoice", code="404"): 1.0,
        })  # fmt: skip

    def test_duration_on_the_given_clock(self) -> None:
        """A request is timed from its ``received_at`` to now on the metrics' clock."""
        own = Clock()
        own.advance(98.5)
        metrics = BrokerMetrics(
            self.bus, self.poller, self.registry, self.scheduler, self.streams, clock=own
        )
        request: Any = self.request(b"/v1/tts", 200, "mvoice")
        request.received_at = 98.0
        metrics.observe(request)
        sums = parse(metrics.render()[0])["mgpu_request_duration_seconds_sum"]
        self.assertEqual(sums, {self.labels(consumer="mvoice", code="200"): 0.5})
