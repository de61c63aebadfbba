# -*- test-case-name: tests.test_policy -*-
"""The scheduler's decisions as pure functions: no I/O, no clock reads.

Which consumer may be unloaded to make room for another, in which order, and
which waiting request goes next. Everything they need is passed in, so they
are tested with plain values and hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from attrs import frozen

from mgpu.config import ConsumerConfig


@frozen
class Resident:
    """A consumer as eviction sees it."""

    config: ConsumerConfig
    loaded: bool
    busy: bool  # running or holding a request
    last_used_at: float | None  # end of its last scheduled request; None: never used


def eviction_order(target: ConsumerConfig, consumers: Iterable[Resident]) -> list[Resident]:
    """The consumers that may be unloaded for ``target``, least recently used first.

    A candidate is loaded, has an unload route, is not the target, may not
    coexist with it (declared on either side), is not ``vram_managed`` and is
    not busy. Never-used consumers come first; ties keep the given order.
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
    return sorted(candidates, key=_lru_key)


def _lru_key(resident: Resident) -> tuple[bool, float]:
    used = resident.last_used_at
    return (used is not None, used if used is not None else 0.0)


def fits_after_evictions(need_mib: int, free_mib: int, candidates: Sequence[Resident]) -> bool:
    """Whether ``need_mib`` could ever fit, with every candidate unloaded."""
    return free_mib + sum(c.config.vram_resident_mib for c in candidates) >= need_mib


def effective_priority(priority: int, waited_s: float, aging_s: float) -> int:
    """The consumer's priority, raised one level for every ``aging_s`` waited."""
    return priority + int(max(0.0, waited_s) // aging_s)
