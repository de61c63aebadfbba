# -*- test-case-name: tests.test_scheduler -*-
"""The GPU lease and the queue in front of it.

One consumer holds the GPU at a time and may run up to its
``max_concurrency`` requests; everyone else waits in one queue ordered by
effective priority (the consumer's ``priority``, raised a level for every
``aging_s`` waited), then arrival. Before the first request of a new holder
runs, ``prepare`` makes room and loads it; requests admitted with it share
that one preparation. The lease is released on every path: answered,
consumer error, consumer gone, client gone, timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from attrs import define, field
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from mgpu.config import SchedulerConfig
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.policy import NO_SWAP, SWAP, effective_priority, next_waiting
from mgpu.registry import Registry
from mgpu.waitqueue import WaitQueue

T = TypeVar("T")

#: Weight of the newest value in a running mean: request times (Retry-After) and
#: the gaps between a consumer's requests (lingering).
_MEAN_WEIGHT = 0.2


def _running_mean(mean: float, value: float) -> float:
    return mean + _MEAN_WEIGHT * (value - mean)


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
    """One admitted request's share of the GPU."""

    consumer: str
    holds: list[Deferred[Any]] = field(factory=list)
    reached_consumer: bool = False
    #: Only holds this card for a request that runs on another card too (SPEC 9.5):
    #: the consumer's counts (in flight, last use, completed) are kept by that card's lease.
    holding: bool = False
    #: Called once the lease is released (its held work ended), if it was admitted.
    on_release: Callable[[], object] | None = None
    admitted: bool = False

    def hold_until(self, work: Deferred[Any]) -> None:
        """Keep the GPU until ``work`` ends, even after the job's own Deferred fired."""
        self.holds.append(work)


@define(eq=False)
class _Ticket:
    """A request waiting for the GPU."""

    consumer: str
    priority: int
    arrived_at: float
    admitted: Deferred[None]
    exclusive: bool = False
    prepare: bool = True
    count: bool = True
    holding: bool = False
    timer: IDelayedCall | None = None
    waiting: bool = False  # in the queue (set by WaitQueue)
    order: int = 0  # arrival order (set by WaitQueue)

    @property
    def group(self) -> tuple[str, int, bool, bool, bool]:
        """Requests that arrive in the order of every rule: one consumer, priority, kind."""
        return (self.consumer, self.priority, self.exclusive, self.prepare, self.holding)


class _Shared:
    """One outcome (a preparation) awaited by several requests, each cancellable alone."""

    def __init__(self, work: Deferred[None]) -> None:
        self._waiters: list[Deferred[None]] = []
        self._outcome: Failure | None = None
        self._done = False
        work.addBoth(self._settle)

    def _settle(self, outcome: object) -> None:
        self._done = True
        self._outcome = outcome if isinstance(outcome, Failure) else None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                self._fire(waiter)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failed(self) -> bool:
        return self._outcome is not None

    def _fire(self, waiter: Deferred[None]) -> None:
        if self._outcome is None:
            waiter.callback(None)
        else:
            waiter.errback(self._outcome)

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self._done:
            self._fire(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class Leases(Protocol):
    """What the rest of the daemon asks of the GPU leases: one card's ``GpuScheduler``,
    or ``CardSchedulers`` over several cards (SPEC 9.5)."""

    config: SchedulerConfig

    @property
    def stats(self) -> SchedulerStats: ...
    @property
    def holder(self) -> str | None: ...
    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...

    def run(
        self,
        consumer: str,
        job: Callable[[Lease], Deferred[T]],
        *,
        exclusive: bool = False,
        prepare: bool = True,
        count: bool = True,
    ) -> Deferred[T]: ...
    def reject(self, reason: str, consumer: str | None = None) -> None: ...
    def stop(self) -> None: ...
    def to_json(self) -> dict[str, object]: ...


#: How many of the holder's usual gaps between requests a drained lease waits.
LINGER_GAPS = 1.5


class _Arrivals:
    """Per consumer, the usual gap between two requests within a burst (a running mean).

    Gaps longer than ``max_skip_s`` are pauses between bursts, not part of one,
    and are left out.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._gap: dict[str, float] = {}

    def note(self, consumer: str, now: float, burst_gap_s: float) -> None:
        last, self._last[consumer] = self._last.get(consumer), now
        if last is None or now - last > burst_gap_s:
            return
        mean = self._gap.get(consumer)
        gap = now - last
        self._gap[consumer] = gap if mean is None else _running_mean(mean, gap)

    def expected_gap(self, consumer: str) -> float | None:
        return self._gap.get(consumer)


class GpuScheduler:
    """Queues GPU requests and runs them under one lease."""

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        config: SchedulerConfig | None = None,
        prepare: Callable[[str], Deferred[None]] | None = None,
        stats: SchedulerStats | None = None,
        events: EventBus | None = None,
        swap_cost: Callable[[str], int] | None = None,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self.config = config or SchedulerConfig()
        self._events = events or EventBus(clock)
        self._swap_cost = swap_cost or self._resident_or_not
        self._prepare = prepare
        self._waiting: WaitQueue[_Ticket] = WaitQueue()
        self._preparation: _Shared | None = None
        self._detached: set[Deferred[object]] = set()
        self._mean_s = 1.0
        self.stats = stats or SchedulerStats()
        self.holder: str | None = None
        self._exclusive = False
        self._lingering: IDelayedCall | None = None
        self._arrivals = _Arrivals()
        self.running = 0
        self.holding = 0  # of them, requests that only hold this card (Lease.holding)

    def _resident_or_not(self, consumer: str) -> int:
        """Without a room maker's estimate: a loaded consumer needs no swap."""
        return NO_SWAP if self._registry[consumer].loaded else SWAP

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def reject(self, reason: str, consumer: str | None = None) -> None:
        """Count a request refused before admission, and say why (an error code)."""
        self.stats.rejected += 1
        self._events.publish("rejected", consumer=consumer, reason=reason)

    def run(
        self,
        consumer: str,
        job: Callable[[Lease], Deferred[T]],
        *,
        exclusive: bool = False,
        prepare: bool = True,
        count: bool = True,
        lease: Lease | None = None,
        arrived_at: float | None = None,
    ) -> Deferred[T]:
        """Wait for the GPU, then run ``job``; cancel the result to leave the queue.

        ``exclusive`` work (an admin unload) waits until the lease is free and
        holds it alone; ``prepare=False`` skips making room and loading;
        ``count=False`` (admin work) leaves the request counters alone. A
        request on several cards (``mgpu.cards``) brings its own ``lease`` (to
        hear of its release; ``Lease.holding`` on the cards it only holds) and
        the time it ``arrived_at`` its first card: its wait, its aging and its
        ``queue_timeout_s`` count from then.
        """
        mine = lease or Lease(consumer)
        try:
            admitted = self._admission(
                consumer, exclusive, prepare, count, mine.holding, arrived_at
            )
        except BrokerError as e:
            return fail(e)

        def start(_: object) -> Deferred[T]:
            mine.admitted = True
            return Deferred.fromCoroutine(self._run(mine, job, count))

        # A queued request is a plain Deferred until admitted: leaving the queue
        # costs no coroutine (cancelling 20,000 waiters is the queue's cost alone).
        return start(None) if admitted.called else admitted.addCallback(start)

    async def _run(self, lease: Lease, job: Callable[[Lease], Deferred[T]], count: bool) -> T:
        started = self._clock.seconds()
        preparation = self._preparation
        collected = False
        try:
            if preparation is not None and not (preparation.done and not preparation.failed):
                await preparation.wait()
            lease.reached_consumer = True
            result = await job(lease)
        except GeneratorExit:
            # Closed by the garbage collector: nothing refers to this request
            # or its job any more. Releasing now would run the scheduler from
            # inside a collection and resume other requests' coroutines that
            # may be being collected too; leave the state alone.
            collected = True
            raise
        except CancelledError:
            if preparation is not None and not preparation.done:
                # The client left while its consumer was being prepared: the
                # unloads and the load go on, so the GPU stays leased until they end.
                lease.hold_until(preparation.wait())
            raise  # the client left: neither completed nor a broker failure
        except BaseException:
            self.stats.failed += count and not lease.holding
            raise
        else:
            self.stats.completed += count and not lease.holding
            return result
        finally:
            if not collected:
                self._end(lease, started)

    # -- the queue -----------------------------------------------------------

    def _admission(
        self,
        consumer: str,
        exclusive: bool,
        prepare: bool,
        count: bool,
        holding: bool,
        arrived_at: float | None = None,
    ) -> Deferred[None]:
        """Admit at once if the rules allow, else queue; raises ``queue_full``."""
        state = self._registry.get(consumer)
        if state is None:
            raise BrokerError("no_consumer", f"{consumer} was removed by a reload", consumer)
        if self.config.linger_s > 0:  # only lingering reads the gaps
            self._arrivals.note(consumer, self._clock.seconds(), self.config.max_skip_s)
        self._dispatch()  # aging may have let a waiting request in since the last event
        if self._may_start(consumer, state.config.priority, exclusive):
            self._admit(consumer, exclusive, prepare, holding)
            return succeed(None)
        if len(self._waiting) >= self.config.max_queue:
            if count:
                self.reject("queue_full", consumer)
            retry_s = max(1, math.ceil(self._mean_s * (len(self._waiting) + self.running)))
            raise BrokerError(
                "queue_full",
                f"{len(self._waiting)} requests are waiting for the GPU",
                consumer,
                headers={"Retry-After": str(retry_s)},
            )
        now = self._clock.seconds()
        since = now if arrived_at is None else min(arrived_at, now)
        ticket = _Ticket(
            consumer,
            state.config.priority,
            since,
            Deferred(lambda _: self._leave(ticket)),
            exclusive,
            prepare,
            count,
            holding,
        )
        limit = max(0.0, self.config.queue_timeout_s - (now - since))
        ticket.timer = self._clock.callLater(limit, self._timed_out, ticket)
        self._waiting.add(ticket)
        state.queued += 1
        return ticket.admitted

    def _may_join(self, consumer: str, exclusive: bool = False) -> bool:
        """Whether a request of ``consumer`` may start now, ignoring the queue."""
        if self.holder is None:
            return True
        if exclusive or self._exclusive:
            return False
        if self._preparation is not None and self._preparation.failed:
            return False  # the lease drains; a later request gets a fresh preparation
        # Every request running under the lease is the holder's.
        state = self._registry[self.holder]
        return consumer == self.holder and self.running < state.config.max_concurrency

    def _may_start(self, consumer: str, priority: int, exclusive: bool) -> bool:
        """Whether a new request may start at once (called right after ``_dispatch``).

        Lease free: only with nobody waiting. Lease held by ``consumer`` with a
        free slot: unless another consumer's request of higher effective
        priority waits (its own older requests, had they been admissible,
        were just admitted by ``_dispatch``).
        """
        if not self._may_join(consumer, exclusive):
            return False
        if self.holder is None:
            return not self._waiting
        now = self._clock.seconds()
        aging = self.config.aging_s
        return not self._overdue_elsewhere(consumer, priority, now) and not any(
            t.exclusive
            or (
                t.consumer != consumer
                and effective_priority(t.priority, now - t.arrived_at, aging) > priority
            )
            for t in self._waiting.heads()
        )

    def _overdue_elsewhere(self, consumer: str, level: int, now: float) -> bool:
        """Under ``affinity``: another consumer's request of effective priority ``level`` or
        more waited past ``max_skip_s``.

        Such a request is never overtaken again, so the holder's newer
        requests may not join the lease ahead of it; one of a lower level
        does not hold the holder back (priority first).
        """
        if self.config.policy != "affinity":
            return False
        limit, aging = self.config.max_skip_s, self.config.aging_s
        return any(
            t.consumer != consumer
            and now - t.arrived_at > limit
            and effective_priority(t.priority, now - t.arrived_at, aging) >= level
            for t in self._waiting.heads()
        )

    def _next(self) -> _Ticket | None:
        """The waiting request to admit now, if any (SPEC section 7)."""
        if not self._waiting:
            return None
        now = self._clock.seconds()
        aging = self.config.aging_s

        def rank(t: _Ticket) -> tuple[int, float]:
            return (-effective_priority(t.priority, now - t.arrived_at, aging), t.arrived_at)

        heads = self._waiting.heads()  # each rule's answer is among them (see WaitQueue)
        if self.holder is None:
            return next_waiting(heads, now, self.config, self._swap_cost)
        if not self._may_join(self.holder):
            return None
        own = [t for t in heads if t.consumer == self.holder and not t.exclusive]
        if not own:
            return None
        mine = min(own, key=rank)
        if self._overdue_elsewhere(self.holder, -rank(mine)[0], now):
            return None
        if any(t.exclusive and t.arrived_at <= mine.arrived_at for t in heads):
            return None  # exclusive work waits for the lease to drain: do not refill it
        others = [t for t in heads if t.consumer != self.holder]
        if others and rank(min(others, key=rank))[0] < rank(mine)[0]:
            return None  # a request of higher effective priority waits for another consumer
        return mine

    def _dispatch(self) -> None:
        while (ticket := self._next()) is not None:
            self._dequeue(ticket)
            self._admit(ticket.consumer, ticket.exclusive, ticket.prepare, ticket.holding)
            ticket.admitted.callback(None)

    def _admit(self, consumer: str, exclusive: bool, prepare: bool, holding: bool) -> None:
        self._stop_lingering()  # the lease was kept for this very request
        if self.holder is None:
            self.holder = consumer
            self._exclusive = exclusive
            if prepare and self._prepare is not None:
                # maybeDeferred: a hook that raises must fail its requests, not strand the lease
                self._preparation = _Shared(maybeDeferred(self._prepare, consumer))
        self.running += 1
        if holding:
            self.holding += 1
        else:
            self._registry[consumer].in_flight += 1

    def _dequeue(self, ticket: _Ticket) -> bool:
        """Out of the queue; True if it was the oldest of its group (see WaitQueue)."""
        was_head = self._waiting.remove(ticket)
        self._registry[ticket.consumer].queued -= 1
        if ticket.timer is not None and ticket.timer.active():
            ticket.timer.cancel()
        ticket.timer = None
        return was_head

    def _leave(self, ticket: _Ticket) -> None:
        """A queued request was cancelled (its client left): drop it from the queue."""
        # A head may have been what blocked the holder's own requests; any other
        # request changes no decision.
        if ticket.waiting and self._dequeue(ticket):
            self._dispatch()

    def _timed_out(self, ticket: _Ticket) -> None:
        ticket.timer = None
        self._dequeue(ticket)
        if ticket.count:
            self.reject("queue_timeout", ticket.consumer)
        ticket.admitted.errback(
            BrokerError(
                "queue_timeout",
                f"waited {self.config.queue_timeout_s:g}s for the GPU",
                ticket.consumer,
            )
        )
        self._dispatch()

    # -- the lease -----------------------------------------------------------

    def _end(self, lease: Lease, started: float) -> None:
        """Release the request's share now, or once the work it still holds is done."""
        if not lease.holds:
            self._release(lease, started)
            return
        waiting: Deferred[object] = DeferredList(lease.holds, consumeErrors=True)  # type: ignore[assignment]
        self._detached.add(waiting)

        def done(_: object) -> None:
            self._detached.discard(waiting)
            self._release(lease, started)

        waiting.addBoth(done)

    def _release(self, lease: Lease, started: float) -> None:
        took = self._clock.seconds() - started
        self._mean_s = _running_mean(self._mean_s, took)
        if lease.holding:
            self.holding -= 1
        else:
            self._registry[lease.consumer].in_flight -= 1
            if lease.reached_consumer:  # LRU order counts real use only
                self._registry.mark_used(lease.consumer)
        self.running -= 1
        if self.running == 0 and not self._linger(lease.consumer):
            self._free_lease()
        self._dispatch()
        if lease.on_release is not None:
            lease.on_release()

    def _free_lease(self) -> None:
        self.holder = None
        self._exclusive = False
        self._preparation = None

    def _linger(self, holder: str) -> bool:
        """Under ``affinity`` with ``linger_s``: keep the drained lease a moment for ``holder``.

        Only when passing it on now would mean a swap: nothing waiting needs
        none, nobody waiting outranks the holder, and nobody is overdue. A
        request of the holder arriving meanwhile runs at once (a burst goes
        on without a swap); otherwise the lease passes when the time is up,
        at the latest when the oldest waiting request would become overdue.
        """
        config = self.config
        state = self._registry.get(holder)
        if (
            config.policy != "affinity"
            or config.linger_s <= 0
            or self._exclusive
            or not self._waiting
            or state is None
            or not state.loaded
            # On several cards, the holder of one it left may unload it meanwhile,
            # and a request joining the kept lease would skip the load.
            or len(state.config.gpus) > 1
        ):
            return False
        now = self._clock.seconds()
        heads = self._waiting.heads()
        levels = [effective_priority(t.priority, now - t.arrived_at, config.aging_s)
                  for t in heads]  # fmt: skip
        if max(levels) > state.config.priority:
            return False
        if any(not t.prepare or self._swap_cost(t.consumer) == NO_SWAP for t in heads):
            return False
        budget = config.max_skip_s - (now - min(t.arrived_at for t in heads))
        gap = self._arrivals.expected_gap(holder)
        if budget <= 0 or gap is None:
            return False  # nothing says another request of the holder is coming soon
        wait = min(config.linger_s, budget, LINGER_GAPS * gap)
        self._lingering = self._clock.callLater(wait, self._linger_ends)
        return True

    def _linger_ends(self) -> None:
        self._lingering = None
        if self.running == 0:
            self._free_lease()
        self._dispatch()

    def _stop_lingering(self) -> None:
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        self._lingering = None

    def stop(self) -> None:
        """Daemon shutdown: cancel held work and the queue's timers (requests end with it)."""
        self._stop_lingering()
        for held in list(self._detached):
            held.cancel()
        for ticket in self._waiting:
            if ticket.timer is not None and ticket.timer.active():
                ticket.timer.cancel()
            ticket.timer = None

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
