"""Tests for mgpu.registry: consumer state, the generation rule, and the health prober."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mgpu import registry as registry_module
from mgpu.config import ConsumerConfig, HealthConfig, KindPath
from mgpu.control import ConsumerControl, ProbeResult
from mgpu.errors import BrokerError
from mgpu.registry import HealthProber, Registry

NOW = datetime(2026, 11, 26, 22, 0, 0, tzinfo=UTC).timestamp()

HEALTHY = ProbeResult(healthy=True, loaded=None, error=None)
REPORTS_LOADED = ProbeResult(healthy=True, loaded=True, error=None)
REPORTS_UNLOADED = ProbeResult(healthy=True, loaded=False, error=None)
REFUSED = ProbeResult(healthy=False, loaded=None, error="connection refused")


def configs(*names: str) -> dict[str, ConsumerConfig]:
    """Minimal consumers by name."""
    return {
        name: ConsumerConfig(
            name=name,
            url=f"http://{name}:1",
            paths={"llm": KindPath("POST", "/x")},
            vram_resident_mib=1000,
            vram_managed=name == "ollama",
        )
        for name in names
    }


def as_clock(clock: Clock) -> IReactorTime:
    """Clock typed as the IReactorTime it provides (mypy has no zope plugin here)."""
    return cast(IReactorTime, clock)


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


#: A consumer's memory before its first probe has looked (SPEC 9.3).
NOT_LOOKED_AT_JSON: dict[str, object] = {
    "used_mib": None,
    "pids": [],
    "source": "none",
    "error": "not looked at yet",
}


class RegistryTests(SynchronousTestCase):
    """Registry and ConsumerState."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.registry = Registry(configs("mvoice", "ollama"), as_clock(self.clock))

    def test_initially_unknown(self) -> None:
        """Before any probe a consumer is neither healthy nor unhealthy, loaded unknown."""
        state = self.registry["mvoice"]
        self.assertEqual((state.healthy, state.loaded, state.generation), (None, None, 0))
        self.assertEqual(set(self.registry.states), {"mvoice", "ollama"})

    def test_probe_reports_loaded(self) -> None:
        """A current-generation probe that reports loaded sets it."""
        self.registry.record_probe("mvoice", 0, REPORTS_UNLOADED)
        state = self.registry["mvoice"]
        self.assertEqual((state.healthy, state.loaded), (True, False))

    def test_stale_probe_cannot_undo_unload(self) -> None:
        """A probe sent before the broker's unload, answering loaded, leaves loaded False."""
        generation = self.registry["mvoice"].generation
        self.registry.mark_unloaded("mvoice")
        self.registry.record_probe("mvoice", generation, REPORTS_LOADED)
        state = self.registry["mvoice"]
        self.assertIs(state.loaded, False)
        self.assertIs(state.healthy, True)

    def test_stale_probe_cannot_undo_load(self) -> None:
        """A probe sent before the broker's load, answering unloaded, leaves loaded True."""
        self.registry.mark_unloaded("mvoice")
        generation = self.registry["mvoice"].generation
        self.registry.mark_loaded("mvoice")
        self.registry.record_probe("mvoice", generation, REPORTS_UNLOADED)
        self.assertIs(self.registry["mvoice"].loaded, True)

    def test_probe_after_event_applies(self) -> None:
        """A probe sent after the event does update loaded."""
        self.registry.mark_loaded("mvoice")
        self.registry.record_probe("mvoice", self.registry["mvoice"].generation, REPORTS_UNLOADED)
        self.assertIs(self.registry["mvoice"].loaded, False)

    def test_non_reporting_loaded_at_first_healthy_probe(self) -> None:
        """A consumer that does not report loaded counts as loaded once first seen healthy."""
        self.registry.record_probe("mvoice", 0, REFUSED)
        self.assertIsNone(self.registry["mvoice"].loaded)
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.assertIs(self.registry["mvoice"].loaded, True)

    def test_non_reporting_tracked_by_events(self) -> None:
        """After an unload, a non-reporting consumer's healthy probes keep it unloaded."""
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.registry.mark_unloaded("mvoice")
        self.registry.record_probe("mvoice", self.registry["mvoice"].generation, HEALTHY)
        self.assertIs(self.registry["mvoice"].loaded, False)

    def test_failed_probe_records_error(self) -> None:
        """A failed probe marks it unhealthy with the error; the next success clears it."""
        self.registry.record_probe("mvoice", 0, REFUSED)
        state = self.registry["mvoice"]
        self.assertEqual((state.healthy, state.last_error), (False, "connection refused"))
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.assertEqual((state.healthy, state.last_error), (True, None))

    def test_health_changes_logged_with_the_probed_url(self) -> None:
        """Each change of health is one log line naming the consumer, the probed route and
        the reason; a repeated verdict logs nothing."""
        logged: list[dict[str, object]] = []
        self.patch(registry_module, "log", Logger(observer=cast(ILogObserver, logged.append)))
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.assertEqual(logged, [])  # the first verdict of a healthy consumer is no change
        self.registry.record_probe("mvoice", 0, REFUSED)
        self.registry.record_probe("mvoice", 0, REFUSED)
        self.registry.record_probe("mvoice", 0, HEALTHY)
        texts = [formatEvent(event) for event in logged]
        self.assertEqual(len(texts), 2, texts)
        self.assertIn("mvoice is unhealthy", texts[0])
        self.assertIn("connection refused", texts[0])
        self.assertIn("GET http://", texts[0])
        self.assertIn("mvoice is healthy again", texts[1])

    def test_mark_used(self) -> None:
        """mark_used stamps wall time and the clock reading from the injected clock."""
        self.clock.advance(90)
        self.registry.mark_used("mvoice")
        state = self.registry["mvoice"]
        self.assertEqual(state.last_used_at, NOW + 90)
        self.assertEqual(state.last_used, datetime(2026, 11, 26, 22, 1, 30, tzinfo=UTC))

    def test_mark_unreachable(self) -> None:
        """mark_unreachable marks it unhealthy with the error, loaded untouched."""
        self.registry.mark_loaded("mvoice")
        self.registry.mark_unreachable("mvoice", "connection reset")
        state = self.registry["mvoice"]
        self.assertEqual(
            (state.healthy, state.last_error, state.loaded), (False, "connection reset", True)
        )

    def test_to_json_shape(self) -> None:
        """to_json is SPEC section 6's consumer object, times as ISO UTC or null."""
        self.registry.record_probe("mvoice", 0, REPORTS_LOADED)
        self.clock.advance(5)
        self.registry.mark_used("mvoice")
        self.registry["mvoice"].in_flight = 1
        self.registry["mvoice"].queued = 2
        self.assertEqual(
            self.registry.to_json(),
            {
                "mvoice": {
                    "healthy": True,
                    "loaded": True,
                    "last_probe": "2026-11-26T22:00:00Z",
                    "last_error": None,
                    "vram_resident_mib": 1000,
                    "vram_managed": False,
                    "last_used": "2026-11-26T22:00:05Z",
                    "in_flight": 1,
                    "queued": 2,
                    "memory": NOT_LOOKED_AT_JSON,
                },
                "ollama": {
                    "healthy": None,
                    "loaded": None,
                    "last_probe": None,
                    "last_error": None,
                    "vram_resident_mib": 1000,
                    "vram_managed": True,
                    "last_used": None,
                    "in_flight": 0,
                    "queued": 0,
                    "memory": NOT_LOOKED_AT_JSON,
                },
            },
        )


class FakeControl:
    """Stands in for ConsumerControl: each probe is a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.pending: dict[str, list[Deferred[ProbeResult]]] = {}
        self.raise_for: set[str] = set()
        self.answer: ProbeResult | None = None

    def probe(self, consumer: ConsumerConfig, timeout_s: float) -> Deferred[ProbeResult]:
        self.calls.append((consumer.name, timeout_s))
        if consumer.name in self.raise_for:
            raise RuntimeError("boom")
        if self.answer is not None:
            return succeed(self.answer)
        d: Deferred[ProbeResult] = Deferred()
        self.pending.setdefault(consumer.name, []).append(d)
        return d

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.calls)


class ProberTests(SynchronousTestCase):
    """HealthProber."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.registry = Registry(configs("mvoice", "ollama"), as_clock(self.clock))
        self.control = FakeControl()
        self.prober = HealthProber(
            self.registry,
            cast(ConsumerControl, self.control),
            as_clock(self.clock),
            HealthConfig(interval_s=5.0, timeout_s=3.0),
        )

    def test_probes_every_interval(self) -> None:
        """Starting probes every consumer at once, then again every interval_s."""
        self.control.answer = HEALTHY
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.assertEqual(self.control.calls, [("mvoice", 3.0), ("ollama", 3.0)])
        self.clock.advance(4.9)
        self.assertEqual(len(self.control.calls), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.control.calls), 4)
        self.clock.advance(5)
        self.assertEqual(len(self.control.calls), 6)
        self.assertIs(self.registry["mvoice"].healthy, True)

    def test_raising_probe_does_not_stop_loop(self) -> None:
        """A probe that raises at once is recorded as failed, and the loop goes on."""
        self.control.answer = HEALTHY
        self.control.raise_for = {"mvoice"}
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        state = self.registry["mvoice"]
        self.assertIs(state.healthy, False)
        self.assertEqual(state.last_error, "probe failed: RuntimeError: boom")
        self.assertIs(self.registry["ollama"].healthy, True)
        self.clock.advance(5)
        self.assertEqual(self.control.names(), ["mvoice", "mvoice", "ollama", "ollama"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_probe_the_daemon_could_not_make_changes_nothing(self) -> None:
        """A probe that fails for the daemon's own lack of descriptors leaves the consumer's
        health as it was, logged as skipped, without a traceback."""
        self.control.answer = HEALTHY
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.control.answer = None
        self.clock.advance(5)
        error = BrokerError("daemon_overloaded", "out of file descriptors", "mvoice")
        self.control.pending["mvoice"].pop().errback(error)
        self.assertIs(self.registry["mvoice"].healthy, True)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failing_recording_does_not_stop_loop(self) -> None:
        """Even an error while recording a result leaves the loop running."""
        self.control.answer = HEALTHY

        def broken(name: str, generation: int, result: ProbeResult, seen: object = None) -> None:
            raise KeyError(name)

        self.registry.record_probe = broken  # type: ignore[method-assign]
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.clock.advance(5)
        self.assertEqual(len(self.control.calls), 4)
        self.assertTrue(self.flushLoggedErrors(KeyError))

    def test_slow_probe_not_doubled(self) -> None:
        """A consumer whose probe is still in flight at the next tick gets no second probe."""
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.control.pending["ollama"].pop().callback(HEALTHY)
        self.clock.advance(5)
        self.assertEqual(self.control.names(), ["mvoice", "ollama", "ollama"])
        self.control.pending["mvoice"].pop().callback(HEALTHY)
        self.clock.advance(5)
        self.assertEqual(self.control.names(), ["mvoice", "mvoice", "ollama", "ollama"])

    def test_probe_shares_in_flight(self) -> None:
        """Concurrent probe() calls for one consumer share one probe and all fire with it."""
        first = self.prober.probe("mvoice")
        second = self.prober.probe("mvoice")
        self.assertEqual(self.control.calls, [("mvoice", 3.0)])
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.control.pending["mvoice"].pop().callback(REPORTS_LOADED)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIs(self.registry["mvoice"].loaded, True)
        self.prober.probe("mvoice")
        self.assertEqual(len(self.control.calls), 2)

    def test_probe_stamps_generation_at_send(self) -> None:
        """A probe in flight across an unload cannot undo it."""
        d = self.prober.probe("mvoice")
        self.registry.mark_unloaded("mvoice")
        self.control.pending["mvoice"].pop().callback(REPORTS_LOADED)
        self.successResultOf(d)
        self.assertIs(self.registry["mvoice"].loaded, False)
        self.assertIs(self.registry["mvoice"].healthy, True)

    def test_cancelled_waiter_leaves_probe(self) -> None:
        """Cancelling one caller's Deferred neither cancels nor breaks the shared probe."""
        first = self.prober.probe("mvoice")
        second = self.prober.probe("mvoice")
        first.cancel()
        self.failureResultOf(first)
        self.control.pending["mvoice"].pop().callback(HEALTHY)
        self.successResultOf(second)
        self.assertIs(self.registry["mvoice"].healthy, True)

    def test_stop_service_stops(self) -> None:
        """After stopService no more probes are sent."""
        self.control.answer = HEALTHY
        self.prober.startService()
        self.prober.stopService()
        self.assertFalse(self.prober.running)
        self.clock.advance(60)
        self.assertEqual(len(self.control.calls), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
