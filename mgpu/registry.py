# -*- test-case-name: tests.test_registry -*-
"""What the broker knows about each consumer, and the prober that keeps it fresh.

``loaded`` has two sources: the consumer's own probe answers (where it reports
``loaded``) and the broker's own load, unload and served requests. The latter
bump a generation counter, and a probe sent under an older generation cannot
overwrite ``loaded``: a probe that left before an unload must not undo it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol, cast

from attrs import define
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.config import ConsumerConfig, HealthConfig
from mgpu.control import ConsumerControl, ProbeResult, describe

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
    in_flight: int = 0
    queued: int = 0
    generation: int = 0

    def to_json(self) -> dict[str, object]:
        """The consumer object of SPEC section 6."""
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

    def __init__(self, consumers: Mapping[str, ConsumerConfig], clock: IReactorTime) -> None:
        self._clock = cast(_Seconds, clock)
        self._states = {name: ConsumerState(config) for name, config in consumers.items()}
        self.states: Mapping[str, ConsumerState] = MappingProxyType(self._states)

    def __getitem__(self, name: str) -> ConsumerState:
        return self._states[name]

    def record_probe(self, name: str, generation: int, result: ProbeResult) -> None:
        """Record a probe sent under ``generation``; a stale one cannot change ``loaded``."""
        state = self._states[name]
        state.healthy = result.healthy
        state.last_probe = datetime.fromtimestamp(self._clock.seconds(), UTC)
        state.last_error = result.error
        if not result.healthy:
            return
        if result.loaded is not None:
            if generation == state.generation:
                state.loaded = result.loaded
        elif state.loaded is None:
            # SPEC 3: a consumer that does not report ``loaded`` counts as
            # loaded at start if it is healthy; afterwards only events move it.
            state.loaded = True

    def mark_loaded(self, name: str) -> None:
        """The broker loaded it, or it served a request."""
        state = self._states[name]
        state.loaded = True
        state.generation += 1

    def mark_unloaded(self, name: str) -> None:
        """The broker unloaded it."""
        state = self._states[name]
        state.loaded = False
        state.generation += 1

    def mark_used(self, name: str) -> None:
        """A scheduled request of it ended: the LRU clock and the status timestamp."""
        state = self._states[name]
        state.last_used_at = self._clock.seconds()
        state.last_used = datetime.fromtimestamp(state.last_used_at, UTC)

    def mark_unreachable(self, name: str, error: str) -> None:
        """A request found it gone; the next probe may say otherwise."""
        state = self._states[name]
        state.healthy = False
        state.last_error = error

    def to_json(self) -> dict[str, object]:
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
    ) -> None:
        self._registry = registry
        self._control = control
        self._clock = clock
        self._config = config
        self._waiting: dict[str, list[Deferred[None]]] = {}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = self._loop = LoopingCall(self._round)
        loop.clock = self._clock
        loop.start(self._config.interval_s, now=True).addErrback(
            lambda f: log.failure("health probe loop stopped", f)
        )

    def stopService(self) -> Deferred[None] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def probe(self, name: str) -> Deferred[None]:
        """Probe ``name`` now and record the result; joins a probe already in flight."""
        state = self._registry[name]
        waiter: Deferred[None] = Deferred()
        waiters = self._waiting.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiting[name] = [waiter]
        generation = state.generation
        d = maybeDeferred(self._control.probe, state.config, self._config.timeout_s)
        d.addCallback(lambda result: self._registry.record_probe(name, generation, result))
        d.addErrback(self._failed, name, generation)
        d.addBoth(self._release, name)
        return waiter

    def _round(self) -> None:
        try:
            gatherResults(
                [self.probe(name) for name in self._registry.states], consumeErrors=True
            ).addErrback(lambda f: log.failure("health probe round failed", f))
        except Exception:
            log.failure("health probe round failed")

    def _failed(self, f: Failure, name: str, generation: int) -> None:
        log.failure("health probe of {name} failed", f, name=name)
        why = f"probe failed: {describe(f)}"
        try:
            self._registry.record_probe(name, generation, ProbeResult(False, None, why))
        except Exception:
            log.failure("recording the failed probe of {name} failed", name=name)

    def _release(self, _: object, name: str) -> None:
        for waiter in self._waiting.pop(name, []):
            if not waiter.called:
                waiter.callback(None)
