# -*- test-case-name: tests.test_lifecycle -*-
"""Loading and unloading on the broker's own initiative (SPEC 9.6).

``IdleUnloader`` unloads a consumer with ``idle_unload_s`` once it has been
loaded and unused that long; ``Preloader`` loads the consumers with
``preload: true`` at start. Both work under the GPU lease, held alone, like
an admin unload, so they never race a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.registry import ConsumerState, HealthProber, Registry
from mgpu.room import Room
from mgpu.scheduler import Lease, Leases

log = Logger()

#: How often consumers that a reload gave ``idle_unload_s`` are looked for.
RESYNC_S = 30.0


def idle_since(state: ConsumerState, started_at: float) -> float:
    """Since when it has been unused: its last use, its loading, or the daemon's start."""
    return max(t for t in (state.last_used_at, state.loaded_at, started_at) if t is not None)


class IdleUnloader(Service):
    """One timer per consumer with ``idle_unload_s``, due when it has been idle that long.

    A timer that finds the consumer used since (``last_used_at`` moved: the
    scheduler's ``mark_used``) is set again for that use plus the delay, so use
    reschedules it without any hook; one that finds it busy, unloaded or of
    unknown state looks again a whole delay later. The unload itself waits for
    the lease like an admin unload and checks again once it holds it.
    """

    def __init__(
        self,
        registry: Registry,
        scheduler: Leases,
        control: ConsumerControl,
        clock: IReactorTime,
        events: EventBus,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._control = control
        self._clock = clock
        self._events = events
        self._timers: dict[str, IDelayedCall] = {}
        self._unloading: set[str] = set()
        self._resync: IDelayedCall | None = None
        self._started_at = 0.0

    def startService(self) -> None:
        super().startService()
        self._started_at = self._clock.seconds()
        self.sync()

    def stopService(self) -> Deferred[None] | None:
        for timer in [*self._timers.values(), self._resync]:
            if timer is not None and timer.active():
                timer.cancel()
        self._timers.clear()
        self._resync = None
        return super().stopService()

    def sync(self) -> None:
        """Give every consumer with ``idle_unload_s`` a timer, and drop the others'."""
        for name in [n for n in self._timers if self._delay(n) is None]:
            self._timers.pop(name).cancel()
        for name in self._registry.states:
            if name not in self._timers and name not in self._unloading:
                self._schedule(name)
        if self._resync is None or not self._resync.active():
            self._resync = self._clock.callLater(RESYNC_S, self.sync)

    def _delay(self, name: str) -> float | None:
        state = self._registry.states.get(name)
        return None if state is None else state.config.idle_unload_s

    def _schedule(self, name: str) -> None:
        delay = self._delay(name)
        if delay is None or not self.running:
            return
        now = self._clock.seconds()
        due = idle_since(self._registry[name], self._started_at) + delay
        self._timers[name] = self._clock.callLater(
            due - now if due > now else delay, self._fire, name
        )

    def _idle(self, name: str, in_flight: int = 0) -> bool:
        """Loaded, nothing of it running (but ``in_flight``) or queued, unused long enough."""
        state = self._registry.states.get(name)
        delay = self._delay(name)
        if state is None or delay is None:
            return False
        return (
            state.loaded is True
            and state.config.unload is not None
            and not state.config.vram_managed
            and state.in_flight == in_flight
            and state.queued == 0
            and self._clock.seconds() >= idle_since(state, self._started_at) + delay
        )

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        if self._idle(name):
            self._unload(name)
        else:
            self._schedule(name)

    def _unload(self, name: str) -> None:
        self._unloading.add(name)

        def job(lease: Lease) -> Deferred[None]:
            lease.reached_consumer = False  # an unload is not a use
            return Deferred.fromCoroutine(self._unload_now(name))

        def done(result: object) -> None:
            self._unloading.discard(name)
            if isinstance(result, Failure):
                log.warn("idle unload of {name} failed: {why}", name=name,
                         why=result.getErrorMessage())  # fmt: skip
            self._schedule(name)

        d: Deferred[Any] = self._scheduler.run(
            name, job, exclusive=True, prepare=False, count=False
        )
        d.addBoth(done)

    async def _unload_now(self, name: str) -> None:
        if not self._idle(name, in_flight=1):  # the unload itself holds the lease
            return  # a request came first, or it went meanwhile
        config = self._registry[name].config
        try:
            await self._control.unload(config)
        except BrokerError as e:
            if e.code == "consumer_unreachable":
                self._registry.mark_unreachable(name, e.message)
            raise
        self._registry.mark_unloaded(name)
        self._events.publish("unload", consumer=name, reason="idle")
        log.info("unloaded {name}: idle for {delay:g} s", name=name, delay=config.idle_unload_s)


class Preloader(Service):
    """At start, once the first probes have answered, loads the ``preload`` consumers.

    Highest priority first (then configuration order), one at a time, under the
    lease held alone, and only when one fits in the memory free now: a preload
    evicts nothing, so it never evicts another preload.
    """

    def __init__(
        self,
        registry: Registry,
        scheduler: Leases,
        room: Room,
        prober: HealthProber,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._room = room
        self._prober = prober
        self.done: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self.done = Deferred.fromCoroutine(self._preload_all())
        self.done.addErrback(lambda f: log.failure("preloading failed", f))

    async def _preload_all(self) -> None:
        wanted = preload_order(self._registry)
        if not wanted:
            return
        await gatherResults([self._prober.probe(n) for n in self._registry.states])
        for name in wanted:
            if not self.running:
                return
            try:
                await self._scheduler.run(
                    name, self._job(name), exclusive=True, prepare=False, count=False
                )
            except BrokerError as e:
                log.warn("preload of {name} failed: {why}", name=name, why=e.message)

    def _job(self, name: str) -> Callable[[Lease], Deferred[None]]:
        def job(lease: Lease) -> Deferred[None]:
            lease.reached_consumer = False  # loaded, not used: LRU order unchanged
            return Deferred.fromCoroutine(self._preload(name))

        return job

    async def _preload(self, name: str) -> None:
        state = self._registry.get(name)
        if state is None or state.loaded is True:
            return
        if state.config.load is None:
            log.info("preload: {name} has no load route; it loads on its first request",
                     name=name)  # fmt: skip
            return
        if not await self._room.fits_now(name):
            log.info("preload: {name} does not fit in the free memory; not loaded", name=name)
            return
        await self._room.load(name, "preload")


def preload_order(registry: Registry) -> list[str]:
    """The consumers with ``preload``, highest priority first, then in configuration order."""
    wanted = [s.config for s in registry.states.values() if s.config.preload]
    return [c.name for c in sorted(wanted, key=lambda c: -c.priority)]
