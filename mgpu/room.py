# -*- test-case-name: tests.test_room -*-
"""Getting a consumer ready to run: make room on the GPU, then load it.

``make_room`` unloads the least recently used consumers that may not stay
resident with the target, one at a time, through their own unload routes,
and after each one polls fresh GPU readings until the target fits, the
victim's memory shows free, or ``free_wait_s`` passes. A target that could
never fit fails at once without unloading anything. ``ensure_loaded`` calls
the target's load route when the broker knows it is unloaded.

Room is made for the target's footprint: the larger of its configured and
learned sizes (``scheduler.footprint: max``). When unloading cannot make
room, an Ollama with ``reclaim: true`` that nothing is using is asked to
free its models, as the last resort (SPEC 9.4). When nothing can, the error
names what holds the memory, and says when to retry if a holder frees it by
itself (an Ollama's keep-alive).
"""

from __future__ import annotations

import math
from typing import Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mgpu.config import ConsumerConfig, GpuConfig, SchedulerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.footprints import LearnedSizes
from mgpu.gpu import GpuSnapshot
from mgpu.memory import ConsumerMemory, MemoryWatch, others
from mgpu.ollama import free_models
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
from mgpu.registry import ConsumerState, Registry
from mgpu.scheduler import SchedulerStats

log = Logger()

#: How often fresh readings are taken while waiting for unloaded memory to free.
FREE_POLL_S = 0.1


class FreshReadings(Protocol):
    """What room-making needs of the GPU poller: memory read now, and the last reading."""

    def fresh_memory(self) -> Deferred[GpuSnapshot]: ...

    @property
    def latest(self) -> GpuSnapshot: ...


class Room(Protocol):
    """What the rest of the daemon asks of room-making: one card's ``RoomMaker``, or
    ``CardRooms`` over several cards (SPEC 9.5)."""

    def prepare(self, name: str) -> Deferred[None]: ...
    async def fits_now(self, name: str) -> bool: ...
    async def load(self, name: str, reason: str) -> None: ...
    def swap_cost(self, name: str) -> int: ...


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
    #: What holds the card; None: sizes as configured, no reclaim, holders unnamed.
    watch: MemoryWatch | None = None
    #: The card this room is made on (SPEC 9.5): only consumers on it are unloaded,
    #: reclaimed or counted; None: every consumer (one card).
    card: int | None = None
    learned: LearnedSizes = field(init=False)

    @learned.default
    def _learned(self) -> LearnedSizes:
        return self.watch.learned if self.watch is not None else LearnedSizes(None)

    def _here(self) -> list[ConsumerState]:
        """The consumers on this card (a consumer naming no card is on every card)."""
        card = self.card
        states = self.registry.states.values()
        if card is None:
            return list(states)
        return [s for s in states if not s.config.gpus or card in s.config.gpus]

    def footprint(self, config: ConsumerConfig) -> int:
        """The MiB room is made for: configured, or learned if larger (``footprint: max``)."""
        return self.learned.footprint(config.name, config.vram_resident_mib, self.config.footprint)

    def _need(self, config: ConsumerConfig) -> int:
        return self.footprint(config) + self.gpu_config.cushion_mib

    def prepare(self, name: str) -> Deferred[None]:
        if self.registry[name].loaded:
            return succeed(None)  # resident: nothing to do (every hand-off asks)
        return Deferred.fromCoroutine(self._prepare(name))

    async def _prepare(self, name: str) -> None:
        await self.make_room(name)
        await self.ensure_loaded(name)

    async def fits_now(self, name: str) -> bool:
        """Whether ``name``'s footprint plus the cushion fits in the memory free now."""
        target = self.registry[name].config
        return await self._free_mib(target) >= self._need(target)

    async def make_room(self, name: str) -> None:
        """Unload victims until ``name``'s resident size plus the cushion fits."""
        target = self.registry[name].config
        if self.registry[name].loaded:
            return
        need = self._need(target)
        free = await self._free_mib(target)
        if free >= need:
            return
        candidates = self._candidates(target)
        if not fits_after_evictions(need, free, candidates):
            reclaimable = sum(m.size_vram_mib for s in self._reclaimable(target)
                              for m in s.models or ())  # fmt: skip
            if fits_after_evictions(need, free + reclaimable, candidates):
                free = await self._reclaim(target, need, free)
                if free >= need:
                    return
        if not fits_after_evictions(need, free, self._candidates(target)):
            raise self._no_room(
                target,
                f"{name} needs {need} MiB; {free} MiB are free and unloading every "
                "consumer that may be unloaded would not free enough",
            )
        tried: set[str] = set()
        while free < need:
            candidates = [c for c in self._candidates(target) if c.config.name not in tried]
            if not candidates or len(tried) >= self.config.max_evictions:
                free = await self._reclaim(target, need, free)
                if free >= need:
                    return
                why = "no consumer left to unload" if not candidates else "max_evictions reached"
                raise self._no_room(target, f"{name} needs {need} MiB, {free} MiB free: {why}")
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
        freed = free_before + self._held_by(victim)
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
            **self._where(),
        )
        log.info(
            "evict for {target} (needs {need} MiB{on}): candidates {candidates}, victim {victim}, "
            "free {before} -> {after} MiB in {took:.2f}s",
            target=target.name, need=need, victim=victim.name,
            on="" if self.card is None else f" on GPU {self.card}",
            candidates=[c.config.name for c in candidates],
            before=free_before, after=free, took=self.clock.seconds() - started,
        )  # fmt: skip
        return free

    def _where(self) -> dict[str, int]:
        """An event's ``gpu`` field: the card room was made on, with several cards."""
        return {} if self.card is None else {"gpu": self.card}

    def _held_by(self, config: ConsumerConfig) -> int:
        """What unloading ``config`` should free: its processes' memory when known."""
        state = self.registry.get(config.name)
        used = None if state is None else self._memory_now(state).used_mib
        return used if used is not None and used > 0 else self.footprint(config)

    def _memory_now(self, state: ConsumerState) -> ConsumerMemory:
        if self.watch is None or state.attribution is None:
            return state.memory
        return self.watch.now(state.attribution)

    async def _reclaim(self, target: ConsumerConfig, need: int, free: int) -> int:
        """The last resort: Ollamas with ``reclaim`` that nothing is using free their
        models, one after the other, until the target fits; returns free MiB."""
        for state in self._reclaimable(target):
            if free >= need:
                break
            free = await self._reclaim_one(state, target, need, free)
        return free

    def _reclaimable(self, target: ConsumerConfig) -> list[ConsumerState]:
        """Ollamas with ``reclaim``, holding models, with no request in flight or queued."""
        return [
            state
            for state in self._here()
            if state.config.ollama is not None
            and state.config.ollama.reclaim
            and state.models
            and not (state.in_flight or state.queued)
            and state.config.name != target.name
            and not state.config.coexists_with(target)
        ]

    async def _reclaim_one(
        self, state: ConsumerState, target: ConsumerConfig, need: int, free_before: int
    ) -> int:
        config, models = state.config, state.models or ()
        try:
            await free_models(self.control, config, [m.name for m in models], config.timeout_s)
        except BrokerError as e:
            log.warn("reclaim for {target}: {victim} did not free its models ({error})",
                     target=target.name, victim=config.name, error=e.message)  # fmt: skip
            return free_before
        loaded_at = state.loaded_at
        held = sum(m.size_vram_mib for m in models)
        state.models = ()
        self.registry.mark_unloaded(config.name)
        self.stats.evictions += 1
        answered = self.clock.seconds()
        free = await self._wait_for_free(
            target, min(need, free_before + held), answered + self.config.free_wait_s
        )
        self.events.publish(
            "evict",
            consumer=config.name,
            target=target.name,
            reason="reclaim",
            models=[m.name for m in models],
            freed_mib=free - free_before,
            free_s=round(self.clock.seconds() - answered, 3),
            age_s=None if loaded_at is None else round(answered - loaded_at, 3),
            **self._where(),
        )
        log.info("reclaim for {target} (needs {need} MiB): {victim} freed {models}, "
                 "free {before} -> {after} MiB", target=target.name, need=need,
                 victim=config.name, models=[m.name for m in models], before=free_before,
                 after=free)  # fmt: skip
        return free

    def _no_room(self, target: ConsumerConfig, message: str) -> BrokerError:
        """``scheduler_error`` naming what holds the memory, with ``Retry-After`` when a
        holder frees it by itself (an Ollama's models expire)."""
        holders: list[str] = []
        retry_s: list[float] = []
        now = self.clock.seconds()
        for state in self._here():
            if state.config.name == target.name or not state.loaded:
                continue
            held = f"{state.config.name} ({self._holding(state)}"
            expiring = [m.expires_in_s(now) for m in state.models or ()]
            known = [s for s in expiring if s is not None]
            if state.models and known and len(known) == len(expiring):
                retry_s.append(max(known))
                held += f", frees itself in {max(known):.0f} s"
            holders.append(held + f"{self._why_kept(state, target)})")
        pids = self.registry.attributed_pids()
        _, other = (
            self.watch.others(pids) if self.watch is not None else others(self.gpu.latest, pids)
        )
        holders += [f"pid {p.pid}{f' {p.name}' if p.name else ''} ({p.used_mib} MiB, "
                    "not a consumer)" for p in other[:5]]  # fmt: skip
        if self.card is not None:
            message += f" (GPU {self.card})"
        if holders:
            message += "; the memory is held by " + ", ".join(holders)
        headers = {"Retry-After": str(max(1, math.ceil(min(retry_s))))} if retry_s else None
        return BrokerError("scheduler_error", message, target.name, headers=headers)

    def _holding(self, state: ConsumerState) -> str:
        """How much it holds: measured, else its models' sizes, else about its footprint."""
        mib = self._memory_now(state).used_mib
        if mib is None and state.models:
            mib = sum(m.size_vram_mib for m in state.models)
        if mib is None:
            return f"about {self.footprint(state.config)} MiB"
        return f"{mib} MiB"

    @staticmethod
    def _why_kept(state: ConsumerState, target: ConsumerConfig) -> str:
        config = state.config
        if config.vram_managed:
            return ": manages its own memory"
        if state.in_flight:
            return ": busy"
        if config.unload is None:
            return ": no unload route"
        if config.coexists_with(target):
            return ": may stay with it"
        return ""

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
        self.registry.record_load(name, took)
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
        need = self._need(target)
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
                Resident(s.config, s.loaded is True, s.in_flight > 0, s.last_used_at, s.loaded_at,
                         s.load_times.mean)
                for s in self._here()
            ),
            self._young_since(),
            self.config.eviction,
        )  # fmt: skip

    async def _free_mib(self, target: ConsumerConfig) -> int:
        """Free memory read now; without a reading, the broker's own accounting."""
        return self._free_from(await self.gpu.fresh_memory(), target)

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
        resident = sum(self.footprint(s.config) for s in self._here() if s.loaded)
        return total - resident
