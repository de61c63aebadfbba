"""The waiting queue: grouped for flat cost, and choosing exactly as a full scan would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from attrs import define
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConsumerConfig, KindPath, SchedulerConfig
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Lease
from mgpu.waitqueue import WaitQueue
from tests.fuzz import examples


@define(eq=False)
class _Request:
    group: str
    name: str
    waiting: bool = False
    order: int = 0


class WaitQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.queue: WaitQueue[_Request] = WaitQueue()

    def add(self, group: str, name: str) -> _Request:
        request = _Request(group, name)
        self.queue.add(request)
        return request

    def test_heads_are_each_groups_oldest_in_arrival_order(self) -> None:
        """heads() gives the oldest of each group, ordered by arrival across groups."""
        self.add("b", "b1")
        self.add("a", "a1")
        self.add("b", "b2")
        self.assertEqual([r.name for r in self.queue.heads()], ["b1", "a1"])
        self.assertEqual(len(self.queue), 3)

    def test_removal_anywhere(self) -> None:
        """A request leaves from the head or the middle; heads and the count follow."""
        b1, _, b2, b3 = (self.add(g, n) for g, n in [("b", "b1"), ("a", "a1"), ("b", "b2"),
                                                     ("b", "b3")])  # fmt: skip
        self.queue.remove(b2)
        self.queue.remove(b1)
        self.assertEqual([r.name for r in self.queue.heads()], ["a1", "b3"])
        self.assertEqual(sorted(r.name for r in self.queue), ["a1", "b3"])
        self.queue.remove(b3)
        self.queue.remove(b3)  # twice is once
        self.assertEqual((len(self.queue), bool(self.queue)), (1, True))

    def test_memory_follows_the_count(self) -> None:
        """Cancelling most of a long group from its middle rebuilds it: what it keeps is
        never more than twice what waits."""
        requests = [self.add("g", str(n)) for n in range(1000)]
        for request in requests[1:900]:
            self.queue.remove(request)
        group: Any = self.queue._groups["g"]
        self.assertLessEqual(len(group), 2 * len(self.queue))
        self.assertEqual(len(self.queue), 101)

    def test_empty_group_forgotten(self) -> None:
        """A group with nobody left costs nothing in later decisions."""
        request = self.add("g", "x")
        self.queue.remove(request)
        self.assertEqual((self.queue.heads(), len(self.queue), bool(self.queue)), ([], 0, False))
        self.assertEqual(self.queue._groups, {})


class _ScanEverything(WaitQueue[Any]):
    """The queue as it was: every decision reads every waiting request, in arrival order."""

    def heads(self) -> list[Any]:
        return sorted(self, key=lambda r: r.order)


_NAMES = ("a", "b", "c")


def _consumers(priorities: list[int]) -> dict[str, ConsumerConfig]:
    return {
        name: ConsumerConfig(
            name=name,
            url="http://127.0.0.1:1",
            paths={"tts": KindPath("POST", "/x")},
            vram_resident_mib=1,
            priority=priority,
            max_concurrency=2 if name == "a" else 1,
        )
        for name, priority in zip(_NAMES, priorities, strict=True)
    }


class _Side:
    """One scheduler and what its jobs did."""

    def __init__(self, config: SchedulerConfig, priorities: list[int], scan_all: bool) -> None:
        self.clock = Clock()
        self.registry = Registry(_consumers(priorities), self.clock)
        self.scheduler = GpuScheduler(self.registry, self.clock, config)
        if scan_all:  # the oracle: the same scheduler over the old full scan
            self.scheduler._waiting = _ScanEverything()
        self.started: list[int] = []
        self.running: dict[int, Deferred[None]] = {}
        self.results: dict[int, Deferred[None]] = {}
        self.ended: dict[int, str] = {}

    def arrive(self, n: int, consumer: str, exclusive: bool, prepare: bool) -> None:
        def job(lease: Lease) -> Deferred[None]:
            self.started.append(n)
            done: Deferred[None] = Deferred()
            self.running[n] = done
            return done

        result = self.scheduler.run(consumer, job, exclusive=exclusive, prepare=prepare)
        self.results[n] = result
        result.addBoth(lambda outcome: self.ended.setdefault(n, type(outcome).__name__))

    def states(self) -> Iterator[tuple[str, object]]:
        s = self.scheduler
        yield "holder", s.holder
        yield "running", s.running
        yield "queued", s.queued
        for name in _NAMES:
            state = self.registry[name]
            yield name, (state.queued, state.in_flight, state.loaded)


class SameChoicesAsAFullScan(RuleBasedStateMachine):
    """Random arrivals, cancels, finishes, loads and the passing of time, applied to the
    grouped queue and to the full scan: the same requests start in the same order, the
    same ones time out, and the counts agree, always."""

    @initialize(
        policy=st.sampled_from(["affinity", "fifo"]),
        linger_s=st.sampled_from([0.0, 3.0]),
        priorities=st.lists(st.integers(0, 4), min_size=3, max_size=3),
        loaded=st.lists(st.booleans(), min_size=3, max_size=3),
    )
    def start(
        self, policy: str, linger_s: float, priorities: list[int], loaded: list[bool]
    ) -> None:
        config = SchedulerConfig(
            policy=policy, aging_s=5.0, max_skip_s=7.0, linger_s=linger_s, queue_timeout_s=40.0
        )
        self.sides = [_Side(config, priorities, scan_all) for scan_all in (False, True)]
        for side in self.sides:
            for name, is_loaded in zip(_NAMES, loaded, strict=True):
                if is_loaded:
                    side.registry.mark_loaded(name)
        self.count = 0

    @rule(
        consumer=st.sampled_from(_NAMES),
        exclusive=st.booleans(),
        prepare=st.booleans(),
        many=st.integers(1, 4),
    )
    def arrive(self, consumer: str, exclusive: bool, prepare: bool, many: int) -> None:
        for _ in range(many):
            self.count += 1
            for side in self.sides:
                side.arrive(self.count, consumer, exclusive and many == 1, prepare or exclusive)

    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        waiting = sorted(set(self.sides[0].results) - set(self.sides[0].ended))
        if waiting:
            n = waiting[pick % len(waiting)]
            for side in self.sides:
                side.results[n].cancel()

    @rule(pick=st.integers(0, 10**6))
    def finish(self, pick: int) -> None:
        running = sorted(n for n, d in self.sides[0].running.items() if not d.called)
        if running:
            n = running[pick % len(running)]
            for side in self.sides:
                side.running[n].callback(None)

    @rule(seconds=st.sampled_from([0.5, 2.0, 5.0, 8.0, 41.0]))
    def wait(self, seconds: float) -> None:
        for side in self.sides:
            side.clock.advance(seconds)

    @rule(consumer=st.sampled_from(_NAMES), loaded=st.booleans())
    def load_state(self, consumer: str, loaded: bool) -> None:
        for side in self.sides:
            if loaded:
                side.registry.mark_loaded(consumer)
            else:
                side.registry.mark_unloaded(consumer)

    @invariant()
    def same(self) -> None:
        if not hasattr(self, "sides"):
            return
        grouped, scanned = self.sides
        assert grouped.started == scanned.started, (grouped.started, scanned.started)
        assert grouped.ended == scanned.ended, (grouped.ended, scanned.ended)
        assert dict(grouped.states()) == dict(scanned.states())


SameChoicesAsAFullScan.TestCase.settings = settings(
    max_examples=examples(300), stateful_step_count=40, deadline=None
)


class SameChoicesTests(SameChoicesAsAFullScan.TestCase):  # type: ignore[valid-type,misc]
    def test_grouped_queue_chooses_as_a_full_scan(self) -> None:
        """The grouped queue and the full scan start, time out and count the same requests,
        whatever happens (see SameChoicesAsAFullScan)."""
        self.runTest()
