"""The queue in process, no sockets: a release and a cancel with 20,000 requests waiting.

A ``GpuScheduler`` over three consumers (all loaded, ``max_concurrency`` 1,
the daemon's default policy) with 20,000 requests queued in turn for each,
timed on a real reactor's ``callLater`` (a heap; Twisted's ``Clock`` keeps a
sorted list, whose cost would be the clock's, not the queue's). The reactor
is never run: only its timers are used.

- release: a running job ends; the scheduler releases the lease, admits the
  next waiting request and starts its job (which returns a Deferred that
  the next release fires). The time per release, over ``releases`` of them;
- cancel: every waiting request cancelled, oldest first, as clients
  leaving would: the time for all of them.

The same is then measured over the old full-scan queue, the baseline: the
tests' ``_ScanEverything`` (every decision reads every waiting request, in
arrival order), copied here. It is filled by moving the grouped queue's
requests into it, since filling it one arrival at a time scans the queue at
each arrival (minutes at this depth); its cancel stops after ``scan_cap_s``,
and then the figure is that lower bound.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.selectreactor import SelectReactor

from mgpu.config import ConsumerConfig, KindPath, SchedulerConfig
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Lease
from mgpu.waitqueue import WaitQueue

NAMES = ("a", "b", "c")
T = TypeVar("T")


class _ScanEverything(WaitQueue[Any]):
    """The queue as it was: every decision reads every waiting request, in arrival order."""

    def heads(self) -> list[Any]:
        return sorted(self, key=lambda r: r.order)


@dataclass(frozen=True)
class QueueSettings:
    """What the in-process part runs."""

    waiting: int = 20000
    releases: int = 1000  # timed, grouped queue
    scan_releases: int = 50  # timed, full scan (each reads the whole queue)
    scan_cap_s: float = 30.0  # the full scan's cancel stops here


class _Side:
    """A scheduler with ``waiting`` requests queued, and the jobs it started."""

    def __init__(self, waiting: int, scan: bool) -> None:
        self.reactor = SelectReactor()
        consumers = {
            name: ConsumerConfig(
                name=name,
                url="http://127.0.0.1:1",
                paths={"tts": KindPath("POST", "/x")},
                vram_resident_mib=1,
            )
            for name in NAMES
        }
        registry = Registry(consumers, self.reactor)
        for name in NAMES:
            registry.mark_loaded(name)
        config = SchedulerConfig(max_queue=waiting + 10)
        self.scheduler = GpuScheduler(registry, self.reactor, config)
        self.jobs: list[Deferred[None]] = []
        self.results = [self.scheduler.run(NAMES[i % 3], self._job) for i in range(waiting + 1)]
        for result in self.results:
            result.addErrback(lambda _: None)  # cancelled: expected
        if scan:
            self._rescan()

    def _job(self, lease: Lease) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.jobs.append(done)
        return done

    def _rescan(self) -> None:
        """Move the waiting requests, in arrival order, into a full-scan queue."""
        scan = _ScanEverything()
        for ticket in sorted(self.scheduler._waiting, key=lambda t: t.order):
            scan.add(ticket)
        self.scheduler._waiting = scan

    def release(self, count: int) -> float:
        """End ``count`` running jobs one after the other; seconds per release."""
        start = len(self.jobs) - 1
        t0 = time.perf_counter()
        for i in range(start, start + count):
            self.jobs[i].callback(None)
        return (time.perf_counter() - t0) / count

    def cancel_all(self, cap_s: float) -> tuple[float, int]:
        """Cancel every waiting request, oldest first, until done or ``cap_s``: (s, count)."""
        tickets = sorted(self.scheduler._waiting, key=lambda t: t.order)
        waiting = [t.admitted for t in tickets]  # what ``run`` returned for each
        t0 = time.perf_counter()
        for n, result in enumerate(waiting, 1):
            result.cancel()
            if n % 100 == 0 and time.perf_counter() - t0 > cap_s:
                return time.perf_counter() - t0, n
        return time.perf_counter() - t0, len(waiting)


def measure_side(settings: QueueSettings, scan: bool) -> dict[str, Any]:
    """One queue: releases on one, cancel-all on a fresh one; GC off while timing."""
    releases = settings.scan_releases if scan else settings.releases
    side = _Side(settings.waiting, scan)
    per_release = _untraced(lambda: side.release(releases))
    del side
    side = _Side(settings.waiting, scan)
    queued = side.scheduler.queued
    cap = settings.scan_cap_s if scan else float("inf")
    cancel_s, cancelled = _untraced(lambda: side.cancel_all(cap))
    return {
        "queued": queued,
        "releases": releases,
        "release_us": per_release * 1e6,
        "cancelled": cancelled,
        "cancel_s": cancel_s,
        "cancel_complete": side.scheduler.queued == 0,
    }


def _untraced(timed: Callable[[], T]) -> T:
    """``timed()`` with the garbage collector off (collected first)."""
    gc.collect()
    gc.disable()
    try:
        return timed()
    finally:
        gc.enable()


def measure(settings: QueueSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """Both queues; the record of the part."""
    sides = {}
    for name, scan in (("grouped", False), ("full_scan", True)):
        sides[name] = side = measure_side(settings, scan)
        log(
            f"  {name}: {side['queued']:,} waiting, release {side['release_us']:,.1f} µs, "
            f"cancelled {side['cancelled']:,} in {side['cancel_s']:.2f} s"
        )
        gc.collect()
    return {"settings": asdict(settings), "queues": sides, "failures": []}
