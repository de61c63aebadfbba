# -*- test-case-name: tests.test_registry -*-
"""What the broker knows about each consumer, and the prober that keeps it fresh.

``loaded`` comes from, in this order of trust (SPEC 9.3): the memory the
consumer's processes hold on the card (a quarter of its resident size or
more), an Ollama's own list of models, the ``loaded`` its health route
reports, and last the broker's own record (its loads and unloads, and a 2xx
answer to a scheduled request). The broker's own events bump a generation
counter, and a probe sent under an older generation, or a GPU reading taken
before the event, cannot overwrite ``loaded``: a probe that left before an
unload must not undo it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol, cast

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.config import ConsumerConfig, HealthConfig
from mgpu.control import ConsumerControl, ProbeResult, describe
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.memory import NOT_LOOKED_AT, ConsumerMemory, MemoryWatch, Observation
from mgpu.ollama import OllamaModel
from mgpu.policy import LoadTimes
from mgpu.procs import Attribution

log = Logger()


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Seconds(Protocol):
    """``IReactorTime.seconds`` as a structural type (mypy works with or without mypy-zope)."""

    def seconds(self) -> float: ...


@define
class ConsumerState:
    """One consumer as the broker sees it; ``to_json`` is its ``/v1/status`` entry."""

    config: ConsumerConfig
    healthy: bool | None = None
    loaded: bool | None = None
    last_probe: datetime | None = None
    last_error: str | None = None
    last_used: datetime | None = None
    last_used_at: float | None = None
    #: When the broker last saw it become loaded (for the age of an eviction).
    loaded_at: float | None = None
    in_flight: int = 0
    queued: int = 0
    #: Bumped (from the registry's one counter) by each of the broker's own
    #: events; ``born`` is its value when this state was created, so a probe
    #: sent to an earlier incarnation of the consumer (before a reload changed
    #: its URL) is recognised and dropped.
    generation: int = 0
    born: int = 0
    #: When the broker's own last event about it happened (clock seconds): a GPU
    #: reading older than that cannot say whether it is loaded.
    marked_at: float | None = None
    #: What the last probe saw of its processes and memory (SPEC 9.3).
    memory: ConsumerMemory = NOT_LOOKED_AT
    #: Which processes the last probe found to be it (None: not looked yet).
    attribution: Attribution | None = None
    #: An Ollama's models at the last probe; None: not an Ollama, or unread.
    models: tuple[OllamaModel, ...] | None = None
    models_error: str | None = None
    #: The broker's latest timed loads of it (SPEC 9.6: status ``load_s``).
    load_times: LoadTimes = field(factory=LoadTimes)

    def to_json(self) -> dict[str, object]:
        """The consumer object of SPEC sections 6 and 9.3."""
        entry = self._basics()
        entry["memory"] = self.memory.to_json()
        if self.config.ollama is not None:
            entry["models"] = None if self.models is None else [m.to_json() for m in self.models]
            entry["models_error"] = self.models_error
        return entry

    def _basics(self) -> dict[str, object]:
        return {
            "healthy": self.healthy,
            "loaded": self.loaded,
            "last_probe": _iso(self.last_probe),
            "last_error": self.last_error,
            "vram_resident_mib": self.config.vram_resident_mib,
            "vram_managed": self.config.vram_managed,
            "last_used": _iso(self.last_used),
            "in_flight": self.in_flight,
            "queued": self.queued,
        }


class Registry:
    """Every consumer's state, by name; updated by probes and the broker's own events."""

    def __init__(
        self,
        consumers: Mapping[str, ConsumerConfig],
        clock: IReactorTime,
        events: EventBus | None = None,
    ) -> None:
        self._clock = cast(_Seconds, clock)
        self._events = events or EventBus(clock)
        self._generations = itertools.count(1)
        self._states = {name: ConsumerState(config) for name, config in consumers.items()}
        self.states: Mapping[str, ConsumerState] = MappingProxyType(self._states)
        #: Consumers gone from the configuration whose requests have not all ended.
        self._retired: dict[str, ConsumerState] = {}

    def _new_state(self, config: ConsumerConfig) -> ConsumerState:
        """A state for a consumer that came with a reload: born after every probe sent."""
        generation = next(self._generations)
        return ConsumerState(config, generation=generation, born=generation)

    def __getitem__(self, name: str) -> ConsumerState:
        state = self.get(name)
        if state is None:
            raise KeyError(name)
        return state

    def reconfigure(self, consumers: Mapping[str, ConsumerConfig]) -> list[str]:
        """Take a reloaded configuration; returns the names whose state started afresh.

        A consumer whose configuration is unchanged keeps its whole state. One
        whose URL or health route changed is a different service: what was
        known of it (healthy, loaded, last used) starts afresh. Either way the
        counts of its requests in flight and queued carry over, so those
        requests end undisturbed; a removed consumer is kept out of sight
        until they have.
        """
        for name in [n for n, s in self._retired.items() if not (s.in_flight or s.queued)]:
            del self._retired[name]
        fresh = []
        states: dict[str, ConsumerState] = {}
        for name, config in consumers.items():
            old = self._states.get(name) or self._retired.pop(name, None)
            if old is None or old.config.url != config.url or old.config.health != config.health:
                state = self._new_state(config)
                if old is not None:
                    state.in_flight, state.queued = old.in_flight, old.queued
                fresh.append(name)
            else:
                old.config = config
                state = old
            states[name] = state
        for name, old in self._states.items():
            if name not in consumers and (old.in_flight or old.queued):
                self._retired[name] = old
        self._states.clear()
        self._states.update(states)
        return fresh

    def record_probe(
        self, name: str, generation: int, result: ProbeResult, seen: Observation | None = None
    ) -> None:
        """Record a probe sent under ``generation``, and what it ``seen`` of the consumer's
        memory and models; a stale one cannot change ``loaded``."""
        state = self._states.get(name)
        if state is None or generation < state.born:
            return  # removed, or given a new URL, by a reload while the probe was out
        if not result.healthy and state.config.stopped_when_unloaded:
            self._record_stopped(state, generation, result, seen)
            return
        self._set_health(state, result.healthy, result.error)
        state.last_probe = datetime.fromtimestamp(self._clock.seconds(), UTC)
        if seen is not None:
            state.memory, state.attribution = seen.memory, seen.attribution
            state.models, state.models_error = seen.models, seen.models_error
        verdict = self._loaded_verdict(state, result, seen)
        if verdict is not None:
            if generation == state.generation:
                self._set_loaded(state, verdict)
        elif result.healthy and state.loaded is None:
            # SPEC 3: a consumer that does not report ``loaded`` counts as
            # loaded at start if it is healthy; afterwards only events move it.
            self._set_loaded(state, True)

    def _record_stopped(
        self, state: ConsumerState, generation: int, result: ProbeResult, seen: Observation | None
    ) -> None:
        """A failed probe of a ``stopped_when_unloaded`` consumer (SPEC 9.6): it is stopped,
        so unloaded, and still healthy, so requests for it are scheduled and start it."""
        self._set_health(state, True, f"stopped (stopped_when_unloaded): {result.error}")
        state.last_probe = datetime.fromtimestamp(self._clock.seconds(), UTC)
        if seen is not None:
            state.memory, state.attribution = seen.memory, seen.attribution
            state.models, state.models_error = seen.models, seen.models_error
        if generation == state.generation:
            self._set_loaded(state, False)

    @staticmethod
    def _loaded_verdict(
        state: ConsumerState, result: ProbeResult, seen: Observation | None
    ) -> bool | None:
        """Loaded or not by the most trusted source that can tell; None: none can."""
        if seen is not None:
            fresh = seen.read_at is not None and (
                state.marked_at is None or seen.read_at >= state.marked_at
            )
            if seen.loaded is not None and fresh:
                return seen.loaded
            if not result.healthy and not seen.memory.pids and seen.memory.source != "none":
                return False  # down, and no process of it found: it holds nothing
            if seen.models is not None:
                return bool(seen.models)
        return result.loaded if result.healthy else None

    def _set_health(self, state: ConsumerState, healthy: bool, error: str | None) -> None:
        """Record health; a change (not the first verdict of a healthy one) is an event."""
        changed = state.healthy is not healthy and not (state.healthy is None and healthy)
        state.healthy = healthy
        state.last_error = error
        if changed:
            self._events.publish("health", consumer=state.config.name, healthy=healthy, error=error)
            config = state.config
            probed = f"{config.health.method} {config.url}{config.health.path}"
            if healthy:
                log.info("{consumer} is healthy again ({probed})", consumer=config.name,
                         probed=probed)  # fmt: skip
            elif error is not None and error.startswith(probed):
                log.warn("{consumer} is unhealthy: {error}", consumer=config.name, error=error)
            else:
                log.warn("{consumer} is unhealthy ({probed}): {error}", consumer=config.name,
                         probed=probed, error=error)  # fmt: skip

    def _set_loaded(self, state: ConsumerState, loaded: bool) -> None:
        if loaded and state.loaded is not True:
            state.loaded_at = self._clock.seconds()
        state.loaded = loaded

    def get(self, name: str) -> ConsumerState | None:
        """``name``'s state, or None if a reload removed it (and nothing of it is running)."""
        return self._states.get(name) or self._retired.get(name)

    # The broker's own events may arrive after a reload removed the consumer
    # (an unload answered, a download failed): then they concern nobody.

    def mark_loaded(self, name: str) -> None:
        """The broker loaded it, or it served a request."""
        if (state := self.get(name)) is not None:
            self._set_loaded(state, True)
            self._marked(state)

    def mark_unloaded(self, name: str) -> None:
        """The broker unloaded it."""
        if (state := self.get(name)) is not None:
            self._set_loaded(state, False)
            self._marked(state)

    def _marked(self, state: ConsumerState) -> None:
        state.generation = next(self._generations)
        state.marked_at = self._clock.seconds()

    def record_load(self, name: str, took_s: float) -> None:
        """The broker's load of it took ``took_s``: learned for ``load_s`` and cost eviction."""
        if (state := self.get(name)) is not None:
            state.load_times = state.load_times.add(took_s)

    def mark_used(self, name: str) -> None:
        """A scheduled request of it ended: the LRU clock and the status timestamp."""
        if (state := self.get(name)) is not None:
            state.last_used_at = self._clock.seconds()
            state.last_used = datetime.fromtimestamp(state.last_used_at, UTC)

    def mark_unreachable(self, name: str, error: str) -> None:
        """A request found it gone; the next probe may say otherwise. A
        ``stopped_when_unloaded`` one is stopped: unloaded, and its next request starts it."""
        if (state := self.get(name)) is None:
            return
        if state.config.stopped_when_unloaded:
            self.mark_unloaded(name)
            state.last_error = f"stopped (stopped_when_unloaded): {error}"
            return
        self._set_health(state, False, error)

    def attributed_pids(self) -> set[int]:
        """Every pid found to be a consumer's at the last probes."""
        return {pid for state in self._states.values() for pid in state.memory.pids}

    def to_json(self) -> dict[str, dict[str, object]]:
        """The ``consumers`` object of ``/v1/status``."""
        return {name: state.to_json() for name, state in self._states.items()}


class HealthProber(Service):
    """Probes every consumer every ``interval_s``; one probe per consumer at a time.

    A round does not wait for the previous one: a consumer whose probe is still
    in flight shares it instead of getting a second one, so one slow consumer
    neither delays the others nor piles probes up.
    """

    def __init__(
        self,
        registry: Registry,
        control: ConsumerControl,
        clock: IReactorTime,
        config: HealthConfig,
        watch: MemoryWatch | None = None,
        discover: Callable[[ConsumerConfig, float], Deferred[None]] | None = None,
    ) -> None:
        self._registry = registry
        self._control = control
        self._clock = clock
        self._config = config
        self._watch = watch
        #: Run after each probe that finds a consumer healthy (its OpenAI models, SPEC 9.2);
        #: the probe's waiters wait for it too.
        self._discover = discover
        #: Probes in flight, by consumer and incarnation (``born``).
        self._waiting: dict[tuple[str, int], list[Deferred[None]]] = {}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = self._loop = LoopingCall(self._round)
        loop.clock = self._clock
        loop.start(self._config.interval_s, now=True).addErrback(
            lambda f: log.failure("health probe loop stopped", f)
        )

    def reconfigure(self, config: HealthConfig) -> None:
        """A reload: probe at the new pace and with the new timeout; probe every consumer now."""
        self._config = config
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self.startService()

    def stopService(self) -> Deferred[None] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def probe(self, name: str) -> Deferred[None]:
        """Probe ``name`` now and record the result; joins a probe already in flight."""
        state = self._registry[name]
        key = (name, state.born)
        waiter: Deferred[None] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        generation = state.generation
        d = maybeDeferred(self._control.probe, state.config, self._config.timeout_s)
        d.addCallback(self._look_and_record, name, generation, state.config)
        d.addErrback(self._failed, name, generation)
        if self._discover is not None:
            d.addCallback(self._discover_models, name)
        d.addBoth(self._release, key)
        return waiter

    def _look_and_record(
        self, result: ProbeResult, name: str, generation: int, config: ConsumerConfig
    ) -> Deferred[None] | None:
        """Record what the probe found, with a look at the consumer's memory and models."""
        if self._watch is None:
            self._registry.record_probe(name, generation, result)
            return None

        def record(seen: Observation) -> None:
            self._registry.record_probe(name, generation, result, seen)

        return self._watch.look(config, self._config.timeout_s).addCallback(record)

    def _discover_models(self, _: object, name: str) -> Deferred[None] | None:
        """The ``discover`` hook for a consumer the probe found healthy; it never fails."""
        state = self._registry.get(name)
        if self._discover is None or state is None or not state.healthy:
            return None

        def failed(f: Failure) -> None:
            log.failure("discovering the models of {name} failed", f, name=name)

        return maybeDeferred(self._discover, state.config, self._config.timeout_s).addErrback(
            failed
        )

    def _round(self) -> None:
        try:
            gatherResults(
                [self.probe(name) for name in self._registry.states], consumeErrors=True
            ).addErrback(lambda f: log.failure("health probe round failed", f))
        except Exception:
            log.failure("health probe round failed")

    def _failed(self, f: Failure, name: str, generation: int) -> None:
        if isinstance(f.value, BrokerError) and f.value.code == "daemon_overloaded":
            # The daemon's own limit: nothing is known of the consumer, so nothing changes.
            log.warn("health probe of {name} skipped: {why}", name=name, why=f.value.message)
            return
        log.failure("health probe of {name} failed", f, name=name)
        why = f"probe failed: {describe(f)}"
        try:
            self._registry.record_probe(name, generation, ProbeResult(False, None, why))
        except Exception:
            log.failure("recording the failed probe of {name} failed", name=name)

    def _release(self, _: object, key: tuple[str, int]) -> None:
        for waiter in self._waiting.pop(key, []):
            if not waiter.called:
                waiter.callback(None)
