# -*- test-case-name: tests.test_room -*-
"""Getting a consumer ready to run: make room on the GPU, then load it.

``make_room`` unloads the least recently used consumers that may not stay
resident with the target, one at a time, through their own unload routes,
and after each one polls fresh GPU readings until the target fits, the
victim's memory shows free, or ``free_wait_s`` passes. A target that could
never fit fails at once without unloading anything. ``ensure_loaded`` calls
the target's load route when the broker knows it is unloaded.
"""

from __future__ import annotations

from typing import Protocol

from attrs import define
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mgpu.config import ConsumerConfig, GpuConfig, SchedulerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.gpu import GpuSnapshot
from mgpu.policy import (
    NO_SWAP,
    SWAP,
    SWAP_YOUNG,
    Resident,
    eviction_order,
    eviction_plan,
    fits_after_evictions,
    split_young,
)
from mgpu.registry import Registry
from mgpu.scheduler import SchedulerStats

log = Logger()

#: How often fresh readings are taken while waiting for unloaded memory to free.
FREE_POLL_S = 0.1


class FreshReadings(Protocol):
    """What room-making needs of the GPU poller: a reading taken now, and the last one."""

    def fresh(self) -> Deferred[GpuSnapshot]: ...

    @property
    def latest(self) -> GpuSnapshot: ...


@define
class RoomMaker:
    """Prepares a consumer for the GPU lease: ``prepare`` is the scheduler's hook."""

    registry: Registry
    gpu: FreshReadings
    control: ConsumerControl
    clock: IReactorTime
    gpu_config: GpuConfig
    config: SchedulerConfig
    stats: SchedulerStats
    events: EventBus

    def prepare(self, name: str) -> Deferred[None]:
        if self.registry[name].loaded:
            return succeed(None)  # resident: nothing to do (every hand-off asks)
        return Deferred.fromCoroutine(self._prepare(name))

    async def _prepare(self, name: str) -> None:
        await self.make_room(name)
        await self.ensure_loaded(name)

    async def make_room(self, name: str) -> None:
        """Unload victims until ``name``'s resident size plus the cushion fits."""
        target = self.registry[name].config
        if self.registry[name].loaded:
            return
        need = target.vram_resident_mib + self.gpu_config.cushion_mib
        free = await self._free_mib(target)
        if free >= need:
            return
        if not fits_after_evictions(need, free, self._candidates(target)):
            raise BrokerError(
                "scheduler_error",
                f"{name} needs {need} MiB; {free} MiB are free and unloading every "
                "consumer that may be unloaded would not free enough",
                name,
            )
        tried: set[str] = set()
        while free < need:
            candidates = [c for c in self._candidates(target) if c.config.name not in tried]
            if not candidates or len(tried) >= self.config.max_evictions:
                why = "no consumer left to unload" if not candidates else "max_evictions reached"
                raise BrokerError(
                    "scheduler_error",
                    f"{name} needs {need} MiB, {free} MiB free: {why}",
                    name,
                )
            victim = eviction_plan(need, free, candidates)[0].config
            tried.add(victim.name)
            free = await self._evict(victim, target, need, free, candidates)

    async def _evict(
        self,
        victim: ConsumerConfig,
        target: ConsumerConfig,
        need: int,
        free_before: int,
        candidates: list[Resident],
    ) -> int:
        """Unload ``victim``, then wait for the memory to show free; returns free MiB."""
        started = self.clock.seconds()
        try:
            await self.control.unload(victim)
        except BrokerError as e:
            if e.code == "consumer_unreachable":
                self.registry.mark_unreachable(victim.name, e.message)
            log.warn(
                "evict for {target}: unloading {victim} failed ({error}); trying the next",
                target=target.name, victim=victim.name, error=e.message,
            )  # fmt: skip
            return free_before
        state = self.registry.get(victim.name)  # None: a reload removed it meanwhile
        loaded_at = None if state is None else state.loaded_at
        self.registry.mark_unloaded(victim.name)
        self.stats.evictions += 1
        # free_wait_s counts from the unload's answer, not from its call: a slow
        # unload route must not eat into the wait for the memory to show free.
        answered = self.clock.seconds()
        deadline = answered + self.config.free_wait_s
        # Once the victim's whole resident size shows free, waiting on only delays
        # the next victim: the target cannot fit without one.
        freed = free_before + victim.vram_resident_mib
        free = await self._wait_for_free(target, min(need, freed), deadline)
        now = self.clock.seconds()
        self.events.publish(
            "evict",
            consumer=victim.name,
            target=target.name,
            reason=f"{target.name} needs {need} MiB, {free_before} MiB were free",
            freed_mib=free - free_before,
            free_s=round(now - answered, 3),
            age_s=None if loaded_at is None else round(answered - loaded_at, 3),
        )
        log.info(
            "evict for {target} (needs {need} MiB): candidates {candidates}, victim {victim}, "
            "free {before} -> {after} MiB in {took:.2f}s",
            target=target.name, need=need, victim=victim.name,
            candidates=[c.config.name for c in candidates],
            before=free_before, after=free, took=self.clock.seconds() - started,
        )  # fmt: skip
        return free

    async def _wait_for_free(self, target: ConsumerConfig, need: int, deadline: float) -> int:
        """Poll fresh readings until ``need`` MiB are free or ``deadline`` passes.

        Readings start every ``FREE_POLL_S`` (a slow nvidia-smi does not stretch
        the gap), so memory freed is seen within one period plus one reading.
        """
        while True:
            polled_at = self.clock.seconds()
            free = await self._free_mib(target)
            now = self.clock.seconds()
            if free >= need or now + FREE_POLL_S > deadline:
                return free
            await deferLater(self.clock, max(0.0, polled_at + FREE_POLL_S - now), lambda: None)

    async def ensure_loaded(self, name: str) -> None:
        """Call the load route of a consumer the broker knows to be unloaded."""
        state = self.registry[name]
        if state.loaded is not False or state.config.load is None:
            return  # loaded, unknown, or it cold-starts on its first request
        await self.load(name, "request")

    async def load(self, name: str, reason: str) -> None:
        """Call ``name``'s load route now (it has one) and record the load."""
        state = self.registry[name]
        assert state.config.load is not None
        started = self.clock.seconds()
        try:
            await self.control.load(state.config)
        except BrokerError as e:
            if e.code == "consumer_unreachable":
                self.registry.mark_unreachable(name, e.message)
            raise
        self.registry.mark_loaded(name)
        self.stats.loads += 1
        took = self.clock.seconds() - started
        self.events.publish("load", consumer=name, reason=reason, took_s=round(took, 3))

    def swap_cost(self, name: str) -> int:
        """What running ``name`` now would cost, estimated from the last reading (no I/O).

        ``NO_SWAP``: it is loaded. ``SWAP``: it must be loaded, and the
        consumers it would evict (if any) are past their minimum residency.
        ``SWAP_YOUNG``: making room would unload one loaded less than
        ``min_residency_s`` ago. The scheduler's ``affinity`` policy prefers
        the cheaper requests; room-making itself always reads afresh.
        """
        state = self.registry[name]
        if state.loaded:
            return NO_SWAP
        target = state.config
        need = target.vram_resident_mib + self.gpu_config.cushion_mib
        try:
            free = self._free_from(self.gpu.latest, target)
        except BrokerError:
            return SWAP  # no reading, no accounting: room-making will say why
        if free >= need:
            return SWAP
        candidates = self._candidates(target)
        old, young = split_young(candidates, self._young_since())
        return SWAP if fits_after_evictions(need, free, old) or not young else SWAP_YOUNG

    def _young_since(self) -> float:
        return self.clock.seconds() - self.config.min_residency_s

    def _candidates(self, target: ConsumerConfig) -> list[Resident]:
        return eviction_order(
            target,
            (
                Resident(s.config, s.loaded is True, s.in_flight > 0, s.last_used_at, s.loaded_at)
                for s in self.registry.states.values()
            ),
            self._young_since(),
        )

    async def _free_mib(self, target: ConsumerConfig) -> int:
        """Free memory read now; without a reading, the broker's own accounting."""
        return self._free_from(await self.gpu.fresh(), target)

    def _free_from(self, snapshot: GpuSnapshot, target: ConsumerConfig) -> int:
        if snapshot.ok and snapshot.free_mib is not None:
            return snapshot.free_mib
        total = self.gpu_config.total_mib
        if total is None:
            raise BrokerError(
                "scheduler_error",
                f"no GPU reading ({snapshot.error}) and no gpu.total_mib to account "
                f"for {target.name}'s {target.vram_resident_mib} MiB",
                target.name,
            )
        resident = sum(
            s.config.vram_resident_mib for s in self.registry.states.values() if s.loaded
        )
        return total - resident
