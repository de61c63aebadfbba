# -*- test-case-name: tests.test_policy -*-
"""The scheduler's decisions as pure functions: no I/O, no clock reads.

Which consumer may be unloaded to make room for another, in which order, and
which waiting request goes next. Everything they need is passed in, so they
are tested with plain values and hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from attrs import frozen

from mgpu.config import ConsumerConfig, SchedulerConfig

#: Reload seconds assumed for a consumer whose load the broker never timed:
#: neither free (it would always go first) nor prohibitive (it would never go).
DEFAULT_LOAD_S = 10.0

#: How many of a consumer's latest load times its learned load time averages.
LOAD_TIMES_KEPT = 10


@frozen
class LoadTimes:
    """A consumer's latest load times (seconds), newest last; ``mean`` is its ``load_s``."""

    recent: tuple[float, ...] = ()

    def add(self, took_s: float) -> LoadTimes:
        return LoadTimes((*self.recent, took_s)[-LOAD_TIMES_KEPT:])

    @property
    def mean(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


@frozen
class Resident:
    """A consumer as eviction sees it."""

    config: ConsumerConfig
    loaded: bool
    busy: bool  # running or holding a request
    last_used_at: float | None  # end of its last scheduled request; None: never used
    loaded_at: float | None = None  # when it was last seen to become loaded
    load_s: float | None = None  # its learned load time; None: never timed


def reload_cost_per_mib(resident: Resident) -> float:
    """Expected seconds to load it again, per MiB its unloading frees (``eviction: cost``)."""
    load_s = resident.load_s if resident.load_s is not None else DEFAULT_LOAD_S
    return load_s / max(1, resident.config.vram_resident_mib)


def eviction_order(
    target: ConsumerConfig,
    consumers: Iterable[Resident],
    young_since: float | None = None,
    eviction: str = "lru",
) -> list[Resident]:
    """The consumers that may be unloaded for ``target``, least recently used first.

    A candidate is loaded, has an unload route, is not the target, may not
    coexist with it (declared on either side), is not ``vram_managed`` and is
    not busy. Never-used consumers come first; ties keep the given order.
    Consumers loaded after ``young_since`` (``min_residency_s`` ago) come
    last of all: they go only if nothing else makes room. With ``eviction``
    ``cost``, the cheapest reload per MiB freed goes first (ties by LRU).
    """
    candidates = [
        c
        for c in consumers
        if c.loaded
        and not c.busy
        and c.config.unload is not None
        and not c.config.vram_managed
        and c.config.name != target.name
        and not c.config.coexists_with(target)
    ]
    if eviction == "cost":
        return sorted(
            candidates,
            key=lambda c: (_young(c, young_since), reload_cost_per_mib(c), *_lru_key(c)),
        )
    return sorted(candidates, key=lambda c: (_young(c, young_since), *_lru_key(c)))


def _young(resident: Resident, young_since: float | None) -> bool:
    loaded_at = resident.loaded_at
    return young_since is not None and loaded_at is not None and loaded_at > young_since


def _lru_key(resident: Resident) -> tuple[bool, float]:
    used = resident.last_used_at
    return (used is not None, used if used is not None else 0.0)


def split_young(
    candidates: Iterable[Resident], young_since: float
) -> tuple[list[Resident], list[Resident]]:
    """The candidates past their minimum residency, and those still within it."""
    old: list[Resident] = []
    young: list[Resident] = []
    for c in candidates:
        (young if _young(c, young_since) else old).append(c)
    return old, young


def eviction_plan(need_mib: int, free_mib: int, candidates: Sequence[Resident]) -> list[Resident]:
    """``candidates`` (in eviction order) with the victims worth unloading first.

    Walking the order until ``need_mib`` would fit can pick a victim that the
    later, larger ones make needless (unloading mvoice, whisper and ollama
    where mvoice and ollama were enough). The plan takes that prefix, then
    drops from it, latest in the order first, every victim without which
    there would still be room; the victims kept stay in eviction order, and
    the other candidates follow, in case the memory frees less than sizes
    say. When nothing would make room, the order is returned unchanged.
    """
    chosen: list[Resident] = []
    total = free_mib
    for candidate in candidates:
        if total >= need_mib:
            break
        chosen.append(candidate)
        total += candidate.config.vram_resident_mib
    if total < need_mib:
        return list(candidates)
    for candidate in reversed(chosen[:-1]):  # the last one is what made it fit
        if total - candidate.config.vram_resident_mib >= need_mib:
            chosen.remove(candidate)
            total -= candidate.config.vram_resident_mib
    return chosen + [c for c in candidates if c not in chosen]


def fits_after_evictions(need_mib: int, free_mib: int, candidates: Sequence[Resident]) -> bool:
    """Whether ``need_mib`` could ever fit, with every candidate unloaded."""
    return free_mib + sum(c.config.vram_resident_mib for c in candidates) >= need_mib


def effective_priority(priority: int, waited_s: float, aging_s: float) -> int:
    """The consumer's priority, raised one level for every ``aging_s`` waited."""
    return priority + int(max(0.0, waited_s) // aging_s)


class Waiting(Protocol):
    """A queued request as the dispatch rule sees it."""

    @property
    def consumer(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def arrived_at(self) -> float: ...
    @property
    def prepare(self) -> bool: ...  # False: nothing is loaded for it (an admin unload)


W = TypeVar("W", bound=Waiting)

#: ``swap_cost`` values: what admitting a consumer would cost the GPU.
NO_SWAP, SWAP, SWAP_YOUNG = 0, 1, 2


def next_waiting(
    waiting: Sequence[W], now: float, config: SchedulerConfig, swap_cost: Callable[[str], int]
) -> W | None:
    """The request to admit when the lease is free.

    Priority first: only the requests of the highest effective priority are
    considered. ``fifo`` takes the oldest of them. ``affinity`` takes the
    oldest that needs no swap (its consumer is resident), else the oldest
    whose swap evicts nobody within its minimum residency, else the oldest;
    except that a request that has waited more than ``max_skip_s`` is never
    overtaken again: the oldest such goes first.
    """
    if not waiting:
        return None

    aging = config.aging_s
    # Each level once: this runs at every release of the lease, the whole queue waiting.
    levels = [effective_priority(w.priority, now - w.arrived_at, aging) for w in waiting]
    top = max(levels)
    best = [w for w, level in zip(waiting, levels, strict=True) if level == top]
    if config.policy == "fifo":
        return min(best, key=_arrival)
    overdue = [w for w in best if now - w.arrived_at > config.max_skip_s]
    if overdue:
        return min(overdue, key=_arrival)
    costs = {name: swap_cost(name) for name in {w.consumer for w in best if w.prepare}}
    return min(best, key=lambda w: (costs[w.consumer] if w.prepare else NO_SWAP, w.arrived_at))


def _arrival(w: Waiting) -> float:
    return w.arrived_at
