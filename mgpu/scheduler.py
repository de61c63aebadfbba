# -*- test-case-name: tests.test_scheduler -*-
"""The GPU lease: one global lock that every GPU request goes through.

Two GPU requests never overlap: a request waits for the lock (cancelling the
wait leaves the queue at once), runs, and releases the lock on every path.
Work that outlives the client's response (ComfyUI's queued jobs) keeps the
lease through ``Lease.hold_until`` until it is really done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredLock
from twisted.internet.interfaces import IReactorTime

from mgpu.registry import Registry

T = TypeVar("T")


@define
class SchedulerStats:
    """Counters shown under ``scheduler`` in ``/v1/status``."""

    completed: int = 0
    failed: int = 0
    rejected: int = 0
    evictions: int = 0
    loads: int = 0


@define
class Lease:
    """The right to use the GPU, held by one consumer's request."""

    consumer: str
    holds: list[Deferred[object]] = field(factory=list)

    def hold_until(self, work: Deferred[object]) -> None:
        """Keep the GPU until ``work`` ends, even after the job's own Deferred fired."""
        self.holds.append(work)


class GpuScheduler:
    """Runs jobs one at a time on the GPU, in arrival order."""

    def __init__(self, registry: Registry, clock: IReactorTime) -> None:
        self._registry = registry
        self._clock = clock
        self._lock = DeferredLock()
        self._detached: set[Deferred[object]] = set()
        self.stats = SchedulerStats()
        self.holder: str | None = None
        self.queued = 0
        self.running = 0

    def reject(self) -> None:
        """Count a request refused before admission."""
        self.stats.rejected += 1

    def run(self, consumer: str, job: Callable[[Lease], Deferred[T]]) -> Deferred[T]:
        """Queue for the GPU, then run ``job``; cancel the result to leave the queue."""
        return Deferred.fromCoroutine(self._run(consumer, job))

    async def _run(self, consumer: str, job: Callable[[Lease], Deferred[T]]) -> T:
        state = self._registry[consumer]
        state.queued += 1
        self.queued += 1
        try:
            await self._lock.acquire()
        finally:
            state.queued -= 1
            self.queued -= 1
        lease = Lease(consumer)
        self.holder = consumer
        self.running += 1
        state.in_flight += 1
        try:
            result = await job(lease)
        except CancelledError:
            raise  # the client left: neither completed nor a broker failure
        except BaseException:
            self.stats.failed += 1
            raise
        else:
            self.stats.completed += 1
            return result
        finally:
            self._end(lease)

    def _end(self, lease: Lease) -> None:
        """Release the lease now, or once the work it still holds is done."""
        if not lease.holds:
            self._release(lease)
            return
        waiting: Deferred[object] = DeferredList(lease.holds, consumeErrors=True)  # type: ignore[assignment]
        self._detached.add(waiting)

        def done(_: object) -> None:
            self._detached.discard(waiting)
            self._release(lease)

        waiting.addBoth(done)

    def _release(self, lease: Lease) -> None:
        state = self._registry[lease.consumer]
        state.in_flight -= 1
        self._registry.mark_used(lease.consumer)
        self.running -= 1
        self.holder = None
        self._lock.release()

    def stop(self) -> None:
        """Cancel work still holding the GPU after its response (daemon shutdown)."""
        for lease_holds in list(self._detached):
            lease_holds.cancel()

    def to_json(self) -> dict[str, object]:
        return {
            "queued": self.queued,
            "running": self.running,
            "holder": self.holder,
            "completed": self.stats.completed,
            "failed": self.stats.failed,
            "rejected": self.stats.rejected,
            "evictions": self.stats.evictions,
            "loads": self.stats.loads,
        }
