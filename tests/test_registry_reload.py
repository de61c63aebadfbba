"""Tests for mgpu.registry under a reload: ``Registry.reconfigure``, health events,
``loaded_at``, and ``HealthProber.reconfigure``."""

from __future__ import annotations

from typing import Any, cast

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConsumerConfig, HealthConfig, Route
from mgpu.control import ConsumerControl
from mgpu.events import Event, EventBus
from mgpu.registry import HealthProber, Registry
from mgpu.scheduler import GpuScheduler
from tests.test_registry import (
    HEALTHY,
    NOW,
    REFUSED,
    REPORTS_LOADED,
    REPORTS_UNLOADED,
    FakeControl,
    as_clock,
    clock_at,
    configs,
)


class RegistryCase(SynchronousTestCase):
    """A Registry of mvoice and ollama on a Clock, publishing on a bus the test reads."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.configs = configs("mvoice", "ollama")
        self.events = EventBus(as_clock(self.clock))
        self.published: list[Event] = []
        self.events.subscribe(self.published.append)
        self.registry = Registry(self.configs, as_clock(self.clock), self.events)

    def with_changes(self, name: str, **changes: Any) -> dict[str, ConsumerConfig]:
        """The current configs with ``name``'s changed."""
        return {**self.configs, name: evolve(self.configs[name], **changes)}

    def used(self, name: str) -> None:
        """Give ``name`` a full state: healthy, loaded, used, one in flight and two queued."""
        self.registry.record_probe(name, 0, REPORTS_LOADED)
        self.registry.mark_loaded(name)
        self.clock.advance(10)
        self.registry.mark_used(name)
        state = self.registry[name]
        state.in_flight, state.queued = 1, 2


class ReconfigureTests(RegistryCase):
    """Registry.reconfigure."""

    def test_unchanged_consumer_keeps_everything(self) -> None:
        """A consumer whose configuration did not change keeps its state object and all of it."""
        self.used("mvoice")
        state = self.registry["mvoice"]
        before = state.to_json(), state.generation, state.loaded_at, state.last_used_at
        fresh = self.registry.reconfigure(dict(self.configs))
        self.assertEqual(fresh, [])
        self.assertIs(self.registry["mvoice"], state)
        after = state.to_json(), state.generation, state.loaded_at, state.last_used_at
        self.assertEqual(after, before)

    def test_other_change_keeps_state_with_new_config(self) -> None:
        """A change that is not the URL or the health route (priority, size) keeps the state and
        gives it the new configuration."""
        self.used("mvoice")
        state = self.registry["mvoice"]
        new = self.with_changes("mvoice", priority=3, vram_resident_mib=2000)
        self.assertEqual(self.registry.reconfigure(new), [])
        self.assertIs(self.registry["mvoice"], state)
        self.assertIs(state.config, new["mvoice"])
        self.assertEqual((state.healthy, state.loaded, state.in_flight), (True, True, 1))
        self.assertEqual(state.to_json()["vram_resident_mib"], 2000)

    def fresh_after(self, **changes: Any) -> None:
        self.used("mvoice")
        new = self.with_changes("mvoice", **changes)
        self.assertEqual(self.registry.reconfigure(new), ["mvoice"])
        state = self.registry["mvoice"]
        self.assertIs(state.config, new["mvoice"])
        self.assertEqual(
            (state.healthy, state.loaded, state.last_probe, state.last_used, state.last_used_at),
            (None, None, None, None, None),
        )
        self.assertIsNone(state.loaded_at)
        self.assertEqual((state.in_flight, state.queued), (1, 2))

    def test_url_change_starts_afresh_keeping_counts(self) -> None:
        """A consumer whose URL changed starts afresh, but its in_flight and queued carry over."""
        self.fresh_after(url="http://mvoice:2")

    def test_health_route_change_starts_afresh_keeping_counts(self) -> None:
        """A consumer whose health route changed starts afresh, counts carried over."""
        self.fresh_after(health=Route("GET", "/api/health"))

    def test_added_consumer(self) -> None:
        """A consumer added by the reload appears with a fresh state and is named as fresh."""
        new = {**self.configs, **configs("whisper")}
        self.assertEqual(self.registry.reconfigure(new), ["whisper"])
        self.assertEqual(set(self.registry.states), {"mvoice", "ollama", "whisper"})
        self.assertIsNone(self.registry["whisper"].healthy)

    def test_removed_idle_consumer_gone(self) -> None:
        """A removed consumer with nothing in flight is gone at once."""
        self.registry.reconfigure(configs("mvoice"))
        self.assertEqual(set(self.registry.states), {"mvoice"})
        self.assertNotIn("ollama", self.registry.to_json())
        with self.assertRaises(KeyError):
            self.registry["ollama"]

    def test_removed_busy_consumer_reachable_until_idle(self) -> None:
        """A removed consumer with requests in flight stays reachable by name (not in states)
        until a later reconfigure finds it idle."""
        self.used("ollama")
        state = self.registry["ollama"]
        self.registry.reconfigure(configs("mvoice"))
        self.assertEqual(set(self.registry.states), {"mvoice"})
        self.assertNotIn("ollama", self.registry.to_json())
        self.assertIs(self.registry["ollama"], state)
        self.registry.reconfigure(configs("mvoice"))
        self.assertIs(self.registry["ollama"], state)  # still busy
        state.in_flight, state.queued = 0, 0
        self.assertIs(self.registry["ollama"], state)  # until the next reconfigure
        self.registry.reconfigure(configs("mvoice"))
        with self.assertRaises(KeyError):
            self.registry["ollama"]

    def test_removed_busy_consumer_readded(self) -> None:
        """A consumer removed while busy and added back unchanged gets its state back."""
        self.used("ollama")
        state = self.registry["ollama"]
        self.registry.reconfigure(configs("mvoice"))
        self.assertEqual(self.registry.reconfigure(dict(self.configs)), [])
        self.assertIs(self.registry.states["ollama"], state)
        self.assertEqual((state.loaded, state.in_flight, state.queued), (True, 1, 2))

    def test_removed_busy_consumer_readded_elsewhere(self) -> None:
        """Added back with another URL, it starts afresh with its counts carried over."""
        self.used("ollama")
        self.registry.reconfigure(configs("mvoice"))
        new = self.with_changes("ollama", url="http://ollama:2")
        self.assertEqual(self.registry.reconfigure(new), ["ollama"])
        state = self.registry.states["ollama"]
        self.assertEqual((state.loaded, state.in_flight, state.queued), (None, 1, 2))

    def test_removed_consumers_request_ends(self) -> None:
        """A request running for a consumer removed by a reload ends cleanly: the lease is freed
        and the next one runs."""
        scheduler = GpuScheduler(self.registry, as_clock(self.clock))
        gate: Deferred[None] = Deferred()
        running = scheduler.run("ollama", lambda lease: gate)
        never: Deferred[None] = Deferred()
        waiting = scheduler.run("ollama", lambda lease: never)
        self.registry.reconfigure(configs("mvoice"))
        gate.callback(None)
        self.successResultOf(running)
        self.assertEqual(scheduler.holder, "ollama")
        self.assertEqual(self.registry["ollama"].in_flight, 1)
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual((scheduler.holder, scheduler.running), (None, 0))
        self.assertEqual(self.registry["ollama"].last_used_at, NOW)

    def test_probe_of_removed_consumer_ignored(self) -> None:
        """A probe answer for a consumer removed meanwhile is dropped without error."""
        self.used("ollama")
        self.registry.reconfigure(configs("mvoice"))
        self.registry.record_probe("ollama", 0, REFUSED)
        self.assertIs(self.registry["ollama"].healthy, True)
        self.assertEqual([e.kind for e in self.published], [])

    def test_probe_of_the_old_url_does_not_reach_the_new_state(self) -> None:
        """A probe sent to the old URL before the reload, answering after it, says nothing about
        the consumer at its new URL: the fresh state stays unknown."""
        generation = self.registry["mvoice"].generation
        self.registry.reconfigure(self.with_changes("mvoice", url="http://mvoice:2"))
        self.registry.record_probe("mvoice", generation, REPORTS_LOADED)
        state = self.registry["mvoice"]
        self.assertEqual((state.healthy, state.loaded), (None, None))


class HealthEventTests(RegistryCase):
    """``health`` events: published on a change of verdict only."""

    def health(self) -> list[dict[str, object]]:
        return [dict(e.data) for e in self.published if e.kind == "health"]

    def test_first_healthy_verdict_is_no_event(self) -> None:
        """The first verdict of a healthy consumer, and the same verdict again, publish nothing."""
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.assertEqual(self.health(), [])

    def test_first_unhealthy_verdict_is_an_event(self) -> None:
        """A first verdict of unhealthy publishes an event with the error; repeating it does not."""
        self.registry.record_probe("mvoice", 0, REFUSED)
        self.registry.record_probe("mvoice", 0, REFUSED)
        self.assertEqual(
            self.health(),
            [{"consumer": "mvoice", "healthy": False, "error": "connection refused"}],
        )

    def test_each_change_is_an_event(self) -> None:
        """healthy -> unhealthy -> healthy publishes two events, in order."""
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.registry.record_probe("mvoice", 0, REFUSED)
        self.registry.record_probe("mvoice", 0, REPORTS_UNLOADED)
        self.assertEqual(
            self.health(),
            [{"consumer": "mvoice", "healthy": False, "error": "connection refused"},
             {"consumer": "mvoice", "healthy": True, "error": None}],
        )  # fmt: skip

    def test_mark_unreachable_is_a_change(self) -> None:
        """A request finding a healthy consumer gone publishes an event; again, it does not."""
        self.registry.record_probe("ollama", 0, HEALTHY)
        self.registry.mark_unreachable("ollama", "connection reset")
        self.registry.mark_unreachable("ollama", "connection refused")
        self.assertEqual(
            self.health(), [{"consumer": "ollama", "healthy": False, "error": "connection reset"}]
        )
        self.assertEqual(self.registry["ollama"].last_error, "connection refused")


class LoadedAtTests(RegistryCase):
    """``loaded_at``: when the broker saw the consumer become loaded."""

    def test_mark_loaded_sets_it_once(self) -> None:
        """mark_loaded stamps loaded_at; another mark_loaded while loaded does not move it."""
        self.assertIsNone(self.registry["mvoice"].loaded_at)
        self.registry.mark_loaded("mvoice")
        self.clock.advance(30)
        self.registry.mark_loaded("mvoice")
        self.assertEqual(self.registry["mvoice"].loaded_at, NOW)

    def test_loaded_again_after_unload(self) -> None:
        """Loaded, unloaded, loaded again: loaded_at is the second load's time."""
        self.registry.mark_loaded("mvoice")
        self.clock.advance(30)
        self.registry.mark_unloaded("mvoice")
        self.clock.advance(5)
        self.registry.mark_loaded("mvoice")
        self.assertEqual(self.registry["mvoice"].loaded_at, NOW + 35)

    def test_probe_reporting_loaded_sets_it(self) -> None:
        """A probe reporting loaded stamps loaded_at; a later one reporting loaded keeps it."""
        self.registry.record_probe("mvoice", 0, REPORTS_UNLOADED)
        self.assertIsNone(self.registry["mvoice"].loaded_at)
        self.clock.advance(7)
        self.registry.record_probe("mvoice", 0, REPORTS_LOADED)
        self.clock.advance(7)
        self.registry.record_probe("mvoice", 0, REPORTS_LOADED)
        self.assertEqual(self.registry["mvoice"].loaded_at, NOW + 7)

    def test_first_healthy_probe_of_non_reporting_sets_it(self) -> None:
        """A consumer that does not report loaded counts as loaded at its first healthy probe."""
        self.clock.advance(3)
        self.registry.record_probe("mvoice", 0, HEALTHY)
        self.assertEqual(self.registry["mvoice"].loaded_at, NOW + 3)


class ProberReconfigureTests(SynchronousTestCase):
    """HealthProber.reconfigure: the new pace and timeout."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.registry = Registry(configs("mvoice", "ollama"), as_clock(self.clock))
        self.control = FakeControl()
        self.control.answer = HEALTHY
        self.prober = HealthProber(
            self.registry,
            cast(ConsumerControl, self.control),
            as_clock(self.clock),
            HealthConfig(interval_s=5.0, timeout_s=3.0),
        )

    def probe_times(self, until: float) -> list[float]:
        """Advance to ``until`` seconds after NOW in small steps; the times of mvoice probes."""
        times: list[float] = []
        seen = len([c for c in self.control.calls if c[0] == "mvoice"])
        while self.clock.seconds() < NOW + until - 1e-9:
            self.clock.advance(0.5)
            mine = [c for c in self.control.calls if c[0] == "mvoice"]
            times += [self.clock.seconds() - NOW] * (len(mine) - seen)
            seen = len(mine)
        return times

    def test_running_prober_takes_the_new_pace(self) -> None:
        """A running prober probes every consumer at once with the new timeout, then every new
        interval_s; the old pace is gone."""
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.clock.advance(1)
        self.control.calls.clear()
        self.prober.reconfigure(HealthConfig(interval_s=2.0, timeout_s=1.0))
        self.assertEqual(self.control.calls, [("mvoice", 1.0), ("ollama", 1.0)])
        self.assertEqual(self.probe_times(until=9), [3.0, 5.0, 7.0, 9.0])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stopped_prober_starts_at_the_new_pace(self) -> None:
        """A prober not running takes the config without probing; started, it uses it."""
        self.prober.reconfigure(HealthConfig(interval_s=2.0, timeout_s=1.0))
        self.assertEqual(self.control.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.assertEqual(self.control.calls, [("mvoice", 1.0), ("ollama", 1.0)])
        self.assertEqual(self.probe_times(until=4), [2.0, 4.0])

    def test_stop_after_reconfigure_stops_everything(self) -> None:
        """After a reconfigure, stopService still stops the loop and leaves no timer."""
        self.prober.startService()
        self.prober.reconfigure(HealthConfig(interval_s=2.0, timeout_s=1.0))
        self.prober.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        calls = len(self.control.calls)
        self.clock.advance(60)
        self.assertEqual(len(self.control.calls), calls)

    def test_probe_in_flight_not_doubled(self) -> None:
        """A probe still in flight at the reconfigure is shared by the new round, not doubled."""
        self.control.answer = None
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.prober.reconfigure(HealthConfig(interval_s=2.0, timeout_s=1.0))
        self.assertEqual(self.control.names(), ["mvoice", "ollama"])
        for pending in self.control.pending.values():
            pending.pop().callback(HEALTHY)
        self.assertIs(self.registry["mvoice"].healthy, True)

    def test_probe_after_url_change_goes_to_the_new_url(self) -> None:
        """A probe asked for after a reload moved the consumer is sent (to the new URL), not
        joined to a probe of the old URL still in flight."""
        self.control.answer = None
        self.prober.probe("mvoice")
        moved = {**configs("mvoice", "ollama")}
        moved["mvoice"] = evolve(moved["mvoice"], url="http://mvoice:2")
        self.registry.reconfigure(moved)
        self.prober.probe("mvoice")
        self.assertEqual(self.control.calls, [("mvoice", 3.0), ("mvoice", 3.0)])
