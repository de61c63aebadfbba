# -*- test-case-name: tests.test_cards -*-
"""Several cards (SPEC section 9.5): a lease, a queue order and a room per card.

Each card has its own ``GpuScheduler`` (its lease and queue, every rule of
section 7) and its own ``RoomMaker`` (its reading, its consumers).  A
consumer on one card is that card's business alone, so consumers on
different cards run at the same time.

A consumer on several cards (vLLM on ``[0, 1]``) takes their leases one
after the other in index order, each through that card's queue, holding
the ones it has while it waits for the next.  That cannot deadlock: every
request waiting for a card holds only cards of lower index, so no cycle of
waits can close.  Nor does it starve: each wait is one card's queue, with
its priority, aging and skip bound.  The price: a card taken early stays
idle while the request waits for the next one (the README says so).

Room is made once the last card is held, on each of the consumer's cards
(their other consumers are idle: they would need the card held here), and
the consumer is loaded once.  The other cards' leases last as long as the
last card's, ``hold_until`` work included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.config import SchedulerConfig
from mgpu.errors import BrokerError
from mgpu.gpu import GpuPoller
from mgpu.memory import MemoryWatch
from mgpu.policy import NO_SWAP
from mgpu.registry import Registry
from mgpu.room import RoomMaker
from mgpu.scheduler import GpuScheduler, Lease, SchedulerStats

T = TypeVar("T")

log = Logger()


@frozen(eq=False)
class Card:
    """One managed card's parts: its readings, what holds it, its room and its lease."""

    index: int
    poller: GpuPoller
    watch: MemoryWatch
    room: RoomMaker
    lane: GpuScheduler

    def to_json(self, registry: Registry, first: int) -> dict[str, object]:
        """Its entry in the status document's ``gpus``: the reading, the memory of no
        consumer, its lease, and the consumers on it."""
        entry = self.poller.latest.to_json()
        entry["other_mib"], other = self.watch.others(registry.attributed_pids())
        entry["other"] = [p.to_json() for p in other]
        lane = self.lane
        entry.update(holder=lane.holder, queued=lane.queued, running=lane.running)
        entry["consumers"] = [
            name for name in registry.states if self.index in cards_of(registry, name, first)
        ]
        return entry


def cards_of(registry: Registry, consumer: str, first: int) -> tuple[int, ...]:
    """The cards ``consumer`` runs on: its ``gpus``, else the first card."""
    state = registry.get(consumer)
    if state is None:
        raise BrokerError("no_consumer", f"{consumer} was removed by a reload", consumer)
    return state.config.gpus or (first,)


class CardRooms:
    """Room-making over several cards: on each of a consumer's cards, then one load."""

    def __init__(self, registry: Registry, rooms: Mapping[int, RoomMaker]) -> None:
        self.registry = registry
        self.rooms = dict(sorted(rooms.items()))
        self._first = next(iter(self.rooms))

    def _cards(self, name: str) -> tuple[int, ...]:
        return cards_of(self.registry, name, self._first)

    def _room(self, name: str) -> RoomMaker:
        return self.rooms[self._cards(name)[0]]

    def prepare(self, name: str) -> Deferred[None]:
        """The scheduler's hook: room on every card of ``name``, then its load."""
        if self.registry[name].loaded:
            return succeed(None)
        return Deferred.fromCoroutine(self._prepare(name))

    async def _prepare(self, name: str) -> None:
        for card in self._cards(name):
            await self.rooms[card].make_room(name)
        await self._room(name).ensure_loaded(name)

    async def fits_now(self, name: str) -> bool:
        """Whether ``name`` fits now on each of its cards."""
        for card in self._cards(name):
            if not await self.rooms[card].fits_now(name):
                return False
        return True

    async def load(self, name: str, reason: str) -> None:
        await self._room(name).load(name, reason)

    def swap_cost(self, name: str) -> int:
        """What running ``name`` now would cost: the dearest of its cards."""
        try:
            return max(self.rooms[card].swap_cost(name) for card in self._cards(name))
        except BrokerError:
            return NO_SWAP  # removed by a reload: its requests fail on admission


class CardSchedulers:
    """Runs each request under the leases of all its consumer's cards."""

    def __init__(
        self, registry: Registry, lanes: Mapping[int, GpuScheduler], clock: IReactorTime
    ) -> None:
        self._registry = registry
        self._clock = clock
        self.lanes = dict(sorted(lanes.items()))
        self.first = next(iter(self.lanes.values()))
        self._first_card = next(iter(self.lanes))

    @property
    def stats(self) -> SchedulerStats:
        return self.first.stats

    @property
    def config(self) -> SchedulerConfig:
        return self.first.config

    @config.setter
    def config(self, value: SchedulerConfig) -> None:
        for lane in self.lanes.values():
            lane.config = value

    @property
    def holder(self) -> str | None:
        """The first card's holder (``scheduler.holder`` of the status document)."""
        return self.first.holder

    @property
    def queued(self) -> int:
        """Requests waiting, each counted once (a request waits for one card at a time)."""
        return sum(lane.queued for lane in self.lanes.values())

    @property
    def running(self) -> int:
        """Requests admitted, each counted once (not again on the cards it only holds)."""
        return sum(lane.running - lane.holding for lane in self.lanes.values())

    def reject(self, reason: str, consumer: str | None = None) -> None:
        self.first.reject(reason, consumer)

    def cards_of(self, consumer: str) -> tuple[int, ...]:
        return cards_of(self._registry, consumer, self._first_card)

    def run(
        self,
        consumer: str,
        job: Callable[[Lease], Deferred[T]],
        *,
        exclusive: bool = False,
        prepare: bool = True,
        count: bool = True,
    ) -> Deferred[T]:
        """``GpuScheduler.run`` on the consumer's cards: on one, that card's scheduler."""
        try:
            cards = self.cards_of(consumer)
        except BrokerError as e:
            return fail(e)
        if len(cards) == 1:
            return self.lanes[cards[0]].run(
                consumer, job, exclusive=exclusive, prepare=prepare, count=count
            )
        return Deferred.fromCoroutine(
            self._spanning(consumer, cards, job, exclusive, prepare, count)
        )

    async def _spanning(
        self,
        consumer: str,
        cards: Sequence[int],
        job: Callable[[Lease], Deferred[T]],
        exclusive: bool,
        prepare: bool,
        count: bool,
    ) -> T:
        done: Deferred[None] = Deferred()  # the other cards are held until it fires
        arrived_at = self._clock.seconds()  # every card's wait and aging count from here

        def release() -> None:
            if not done.called:
                done.callback(None)

        # The last card's lease says when it is released: after the job and the work
        # it holds, or after a preparation a leaving client could not stop.
        last = Lease(consumer, on_release=release)
        try:
            for card in cards[:-1]:
                await self._take(card, consumer, exclusive, count, done, arrived_at)
            return await self.lanes[cards[-1]].run(
                consumer, job, exclusive=exclusive, prepare=prepare, count=count,
                lease=last, arrived_at=arrived_at,
            )  # fmt: skip
        finally:
            if not last.admitted:  # refused or left before the last card: no release comes
                release()

    def _take(
        self,
        card: int,
        consumer: str,
        exclusive: bool,
        count: bool,
        done: Deferred[None],
        arrived_at: float,
    ) -> Deferred[None]:
        """Wait for ``card``'s lease, then hold it until ``done``; fires once held.

        Cancelling the wait leaves that card's queue; a refusal (queue full,
        timed out; counted as the request's) fails it.
        """
        runs: list[Deferred[None]] = []  # the card's run, once asked for
        admitted: Deferred[None] = Deferred(lambda _: runs[0].cancel())

        def hold(lease: Lease) -> Deferred[None]:
            lease.reached_consumer = False  # the last card's lease counts the use
            admitted.callback(None)
            return done

        def ended(outcome: object) -> None:
            if not admitted.called:
                admitted.errback(outcome)  # type: ignore[arg-type]  # a Failure
            elif isinstance(outcome, Failure):
                log.failure("holding card {card} for {consumer} failed", outcome, card=card,
                            consumer=consumer)  # fmt: skip

        holding = Lease(consumer, holding=True)
        run = self.lanes[card].run(
            consumer, hold, exclusive=exclusive, prepare=False, count=count, lease=holding,
            arrived_at=arrived_at,
        )  # fmt: skip
        runs.append(run.addBoth(ended))
        return admitted

    def stop(self) -> None:
        for lane in self.lanes.values():
            lane.stop()

    def card_json(self, card: int) -> dict[str, object]:
        """The lease part of one card's entry in ``gpus[]``."""
        lane = self.lanes[card]
        return {"holder": lane.holder, "queued": lane.queued, "running": lane.running}

    def to_json(self) -> dict[str, object]:
        return {**self.first.to_json(), "queued": self.queued, "running": self.running}
