"""Tests for mgpu.scheduler: the queue in front of the GPU and the global GPU lease."""

from __future__ import annotations

import gc
from collections.abc import Callable
from functools import partial
from typing import cast

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConsumerConfig, KindPath, SchedulerConfig
from mgpu.errors import BrokerError
from mgpu.events import Event, EventBus
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Lease, SchedulerStats


def consumer(name: str, priority: int = 2, max_concurrency: int = 1) -> ConsumerConfig:
    return ConsumerConfig(
        name=name,
        url="http://127.0.0.1:1",
        paths={"tts": KindPath("POST", "/x")},
        vram_resident_mib=1,
        priority=priority,
        max_concurrency=max_concurrency,
    )


def consumers() -> dict[str, ConsumerConfig]:
    return {name: consumer(name) for name in ("a", "b")}


class GpuSchedulerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(consumers(), self.clock)
        self.scheduler = GpuScheduler(self.registry, self.clock)

    def test_one_job_at_a_time(self) -> None:
        """A second job waits until the first one's Deferred fires."""
        first: Deferred[str] = Deferred()
        started: list[str] = []
        self.scheduler.run("a", lambda lease: first)
        second = self.scheduler.run("b", recording(started, "b"))
        self.assertEqual(started, [])
        self.assertEqual(self.scheduler.to_json()["holder"], "a")
        self.assertEqual(self.registry["b"].queued, 1)
        first.callback("a")
        self.assertEqual(started, ["b"])
        self.assertEqual(self.successResultOf(second), "b")

    def test_arrival_order(self) -> None:
        """Waiting jobs run in the order they arrived."""
        gate: Deferred[None] = Deferred()
        order: list[str] = []
        self.scheduler.run("a", lambda lease: gate)
        for name in ("b", "a", "b"):
            self.scheduler.run(name, recording(order, name))
        gate.callback(None)
        self.assertEqual(order, ["b", "a", "b"])

    def test_cancel_while_queued_leaves_the_queue(self) -> None:
        """A cancelled waiter never runs and no longer counts as queued."""
        gate: Deferred[None] = Deferred()
        ran: list[str] = []
        self.scheduler.run("a", lambda lease: gate)
        waiting = self.scheduler.run("b", recording(ran, "b"))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.registry["b"].queued, 0)
        self.assertEqual(self.scheduler.queued, 0)
        gate.callback(None)
        self.assertEqual(ran, [])
        self.assertIsNone(self.scheduler.holder)

    def test_lease_released_on_broker_error(self) -> None:
        """A job failing with a broker error counts as failed and frees the GPU."""
        error = BrokerError("consumer_unreachable", "gone", "a")
        failed = self.scheduler.run("a", lambda lease: _fail(error))
        self.failureResultOf(failed, BrokerError)
        self.assertEqual(self.scheduler.stats.failed, 1)
        self.assertEqual(self.scheduler.stats.completed, 0)
        self.assertEqual(self.successResultOf(self.scheduler.run("b", lambda lease: succeed(1))), 1)

    def test_lease_released_on_unexpected_error(self) -> None:
        """A job raising anything at all still frees the GPU."""

        def boom(lease: Lease) -> Deferred[None]:
            raise RuntimeError("bug")

        self.failureResultOf(self.scheduler.run("a", boom), RuntimeError)
        self.assertEqual(self.successResultOf(self.scheduler.run("b", lambda lease: succeed(2))), 2)
        self.assertEqual(self.registry["a"].in_flight, 0)

    def test_lease_released_when_running_job_cancelled(self) -> None:
        """Cancelling a running job (client gone) cancels it and frees the GPU uncounted."""
        cancelled = []
        running: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        d = self.scheduler.run("a", lambda lease: running)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.scheduler.to_json()["holder"], None)
        self.assertEqual((self.scheduler.stats.completed, self.scheduler.stats.failed), (0, 0))

    def test_hold_until_keeps_the_lease(self) -> None:
        """Work held by the lease keeps the GPU after the job's answer, until it ends."""
        work: Deferred[object] = Deferred()

        def job(lease: Lease) -> Deferred[str]:
            lease.hold_until(work)
            return succeed("answered")

        self.assertEqual(self.successResultOf(self.scheduler.run("a", job)), "answered")
        nxt = self.scheduler.run("b", lambda lease: succeed("b"))
        self.assertNoResult(nxt)
        self.assertEqual(self.scheduler.holder, "a")
        work.errback(RuntimeError("poll failed"))
        self.assertEqual(self.successResultOf(nxt), "b")

    def test_stop_cancels_held_work(self) -> None:
        """Shutdown cancels work still holding the lease, which frees it."""
        cancelled = []
        work: Deferred[object] = Deferred(lambda d: cancelled.append(True))

        def job(lease: Lease) -> Deferred[None]:
            lease.hold_until(work)
            return succeed(None)

        self.scheduler.run("a", job)
        self.scheduler.stop()
        self.assertEqual(cancelled, [True])
        self.assertIsNone(self.scheduler.holder)

    def test_figures(self) -> None:
        """Completed, in_flight and last_used follow the job."""
        gate: Deferred[None] = Deferred()
        self.clock.advance(100)
        self.scheduler.run("a", lambda lease: gate)
        self.assertEqual(self.registry["a"].in_flight, 1)
        self.assertEqual(self.scheduler.running, 1)
        self.clock.advance(5)
        gate.callback(None)
        self.assertEqual(self.registry["a"].in_flight, 0)
        self.assertEqual(self.registry["a"].last_used_at, 105)
        self.assertEqual(
            self.scheduler.to_json(),
            {"queued": 0, "running": 0, "holder": None, "completed": 1, "failed": 0,
             "rejected": 0, "evictions": 0, "loads": 0},
        )  # fmt: skip

    def test_reject_counts(self) -> None:
        """A refusal before admission counts as rejected."""
        self.scheduler.reject("queue_full")
        self.assertEqual(self.scheduler.to_json()["rejected"], 1)


def recording(log: list[str], name: str) -> Callable[[Lease], Deferred[str]]:
    """A job that appends ``name`` to ``log`` when it runs."""

    def job(lease: Lease) -> Deferred[str]:
        log.append(name)
        return succeed(name)

    return job


def _fail(error: Exception) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.errback(error)
    return d


class Jobs:
    """Jobs that record when they start and end only when the test says so."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self._pending: dict[str, Deferred[object]] = {}

    def gated(self, label: str) -> Callable[[Lease], Deferred[object]]:
        def job(lease: Lease) -> Deferred[object]:
            self.started.append(label)
            d: Deferred[object] = Deferred(lambda _: self.cancelled.append(label))
            self._pending[label] = d
            return d

        return job

    def finish(self, label: str) -> None:
        self._pending.pop(label).callback(label)

    def fail(self, label: str, error: Exception) -> None:
        self._pending.pop(label).errback(error)


class Preparations:
    """A ``prepare`` hook whose preparations end, in call order, when the test says so."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self._pending: list[Deferred[None]] = []

    def __call__(self, name: str) -> Deferred[None]:
        self.calls.append(name)
        d: Deferred[None] = Deferred(lambda _: self.cancelled.append(name))
        self._pending.append(d)
        return d

    def succeed(self) -> None:
        self._pending.pop(0).callback(None)

    def fail(self, error: Exception) -> None:
        self._pending.pop(0).errback(error)


class SchedulerCase(SynchronousTestCase):
    """A scheduler on a Clock, rebuilt by ``build`` with the consumers a test needs."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.jobs = Jobs()
        self.build()

    def build(
        self,
        *configs: ConsumerConfig,
        config: SchedulerConfig | None = None,
        prepare: Callable[[str], Deferred[None]] | None = None,
        stats: SchedulerStats | None = None,
    ) -> None:
        configs = configs or tuple(consumers().values())
        self.registry = Registry({c.name: c for c in configs}, self.clock)
        self.events = EventBus(cast(IReactorTime, self.clock))
        self.published: list[Event] = []
        self.events.subscribe(self.published.append)
        self.scheduler = GpuScheduler(
            self.registry, self.clock, config, prepare, stats, events=self.events
        )

    def submit(self, name: str, label: str) -> Deferred[object]:
        """Ask for the GPU for ``name`` with a gated job called ``label``."""
        return self.scheduler.run(name, self.jobs.gated(label))

    def broker_error(self, d: Deferred[object], code: str) -> BrokerError:
        """The BrokerError ``d`` failed with, checked to carry ``code``."""
        error = self.failureResultOf(d, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual(error.code, code)
        return error

    def counters(self) -> tuple[int, int, int]:
        stats = self.scheduler.stats
        return (stats.completed, stats.failed, stats.rejected)


class OrderTests(SchedulerCase):
    def test_priority_then_arrival(self) -> None:
        """Waiting requests run by consumer priority, higher first, then by arrival."""
        self.build(consumer("a"), consumer("low", 1), consumer("mid", 2), consumer("high", 3))
        order: list[str] = []
        self.submit("a", "a")
        for name, label in [("low", "low"), ("high", "high1"), ("mid", "mid"), ("high", "high2")]:
            self.scheduler.run(name, recording(order, label))
        self.assertEqual(order, [])
        self.jobs.finish("a")
        self.assertEqual(order, ["high1", "high2", "mid", "low"])

    def aging_race(self, release_at: float) -> list[str]:
        """A priority-1 request queued at 0 against a priority-3 one queued at 50."""
        self.build(
            consumer("a"), consumer("low", 1), consumer("high", 3),
            config=SchedulerConfig(aging_s=30),
        )  # fmt: skip
        order: list[str] = []
        self.submit("a", "a")
        self.scheduler.run("low", recording(order, "low"))
        self.clock.advance(50)
        self.scheduler.run("high", recording(order, "high"))
        self.clock.advance(release_at - 50)
        self.jobs.finish("a")
        return order

    def test_aged_request_overtakes(self) -> None:
        """Two aging_s waited raise priority 1 to 3, and the earlier arrival then goes first."""
        self.assertEqual(self.aging_race(60), ["low", "high"])

    def test_aging_not_before_it_is_due(self) -> None:
        """Just short of two aging_s the older low-priority request still goes second."""
        self.assertEqual(self.aging_race(59.9), ["high", "low"])

    def test_nothing_starves(self) -> None:
        """A low-priority request runs after aging even under a steady stream of higher ones."""
        self.build(consumer("high", 3), consumer("low", 1), config=SchedulerConfig(aging_s=30))
        order: list[str] = []
        self.submit("high", "h0")
        self.scheduler.run("low", recording(order, "low"))
        for i in range(1, 20):
            self.clock.advance(10)
            self.submit("high", f"h{i}")
            self.jobs.finish(f"h{i - 1}")
            if order:
                break
        self.assertEqual(order, ["low"])
        self.assertEqual(self.clock.seconds(), 60)
        self.assertEqual(self.jobs.started, [f"h{i}" for i in range(7)])


class QueueFullTests(SchedulerCase):
    def test_queue_full_fails_at_once(self) -> None:
        """At max_queue a request fails at once with queue_full and Retry-After, and never runs."""
        self.build(config=SchedulerConfig(max_queue=2))
        self.submit("a", "a")
        self.submit("b", "b1")
        self.submit("b", "b2")
        refused = self.submit("b", "b3")
        error = self.broker_error(refused, "queue_full")
        self.assertEqual((error.status, error.retryable, error.consumer), (503, True, "b"))
        retry_after = error.headers["Retry-After"]
        self.assertTrue(retry_after.isdigit(), retry_after)
        self.assertGreaterEqual(int(retry_after), 1)
        self.assertEqual(self.counters(), (0, 0, 1))
        self.assertEqual((self.scheduler.queued, self.registry["b"].queued), (2, 2))
        for label in ("a", "b1", "b2"):
            self.jobs.finish(label)
        self.assertEqual(self.jobs.started, ["a", "b1", "b2"])
        self.assertEqual(self.counters(), (3, 0, 1))

    def test_retry_after_follows_request_times(self) -> None:
        """Retry-After is the expected wait in whole seconds, grown by requests taking 10 s."""
        self.build(config=SchedulerConfig(max_queue=1))
        for i in range(10):
            self.submit("a", f"warm{i}")
            self.clock.advance(10)
            self.jobs.finish(f"warm{i}")
        self.submit("a", "a")
        self.submit("b", "b")
        error = self.broker_error(self.submit("b", "refused"), "queue_full")
        self.assertIn(int(error.headers["Retry-After"]), range(10, 21))

    def test_retry_after_at_least_one_second(self) -> None:
        """Retry-After rounds a near-zero expected wait up to 1 whole second."""
        self.build(config=SchedulerConfig(max_queue=1))
        for _ in range(50):
            self.successResultOf(self.scheduler.run("a", lambda lease: succeed(None)))
        self.submit("a", "a")
        self.submit("b", "b")
        error = self.broker_error(self.submit("b", "refused"), "queue_full")
        self.assertEqual(error.headers["Retry-After"], "1")


class QueueTimeoutTests(SchedulerCase):
    def test_queue_timeout(self) -> None:
        """A request waiting past queue_timeout_s fails with queue_timeout and leaves the queue."""
        self.build(config=SchedulerConfig(queue_timeout_s=10))
        self.submit("a", "a")
        waiting = self.submit("b", "b")
        self.clock.advance(9.9)
        self.assertNoResult(waiting)
        self.assertEqual(self.registry["b"].queued, 1)
        self.clock.advance(0.1)
        error = self.broker_error(waiting, "queue_timeout")
        self.assertEqual((error.status, error.consumer), (503, "b"))
        self.assertEqual(self.counters(), (0, 0, 1))
        self.assertEqual((self.scheduler.queued, self.registry["b"].queued), (0, 0))
        self.jobs.finish("a")
        self.assertEqual(self.jobs.started, ["a"])
        self.assertIsNone(self.scheduler.holder)
        self.assertIsNone(self.registry["b"].last_used_at)

    def test_admitted_requests_leave_no_timer(self) -> None:
        """Only a waiting request has a timeout timer; admission cancels it."""
        self.build(config=SchedulerConfig(queue_timeout_s=10))
        self.submit("a", "a")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        admitted_late = self.submit("b", "b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.jobs.finish("a")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertNoResult(admitted_late)
        self.jobs.finish("b")
        self.assertEqual(self.successResultOf(admitted_late), "b")
        self.assertEqual(self.counters(), (2, 0, 0))

    def test_timed_out_blocker_lets_the_holder_admit(self) -> None:
        """When the higher-priority request blocking the holder times out, the holder's own runs."""
        self.build(
            consumer("a", max_concurrency=2), consumer("b", 3),
            config=SchedulerConfig(queue_timeout_s=10),
        )  # fmt: skip
        self.submit("a", "a1")
        blocker = self.submit("b", "b")
        self.clock.advance(1)
        own = self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a1"])
        self.clock.advance(9)
        self.broker_error(blocker, "queue_timeout")
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.jobs.finish("a2")
        self.assertEqual(self.successResultOf(own), "a2")


class CancelTests(SchedulerCase):
    def test_cancel_while_queued_drops_its_timer(self) -> None:
        """A request cancelled while queued leaves no timer and is never counted rejected."""
        self.build(config=SchedulerConfig(queue_timeout_s=10))
        self.submit("a", "a")
        waiting = self.submit("b", "b")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.jobs.finish("a")
        self.assertEqual(self.jobs.started, ["a"])
        self.assertEqual(self.counters(), (1, 0, 0))

    def test_cancel_keeps_the_others_in_order(self) -> None:
        """Cancelling one queued request leaves the others queued in their order."""
        self.submit("a", "a")
        self.submit("b", "b1")
        gone = self.submit("a", "a2")
        self.submit("b", "b3")
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual((self.scheduler.queued, self.registry["a"].queued), (2, 0))
        for label in ("a", "b1", "b3"):
            self.jobs.finish(label)
        self.assertEqual(self.jobs.started, ["a", "b1", "b3"])

    def test_cancelled_blocker_lets_the_holder_admit(self) -> None:
        """When the request blocking the holder's own leaves, they proceed at once."""
        self.build(consumer("a", max_concurrency=2), consumer("b", 3))
        self.submit("a", "a1")
        blocker = self.submit("b", "b")
        self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a1"])
        blocker.cancel()
        self.failureResultOf(blocker, CancelledError)
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.assertEqual((self.scheduler.queued, self.registry["b"].queued), (0, 0))
        self.assertEqual(self.registry["a"].in_flight, 2)


class LeaseTests(SchedulerCase):
    def test_holder_runs_up_to_max_concurrency(self) -> None:
        """The holder runs up to max_concurrency at once while another consumer waits."""
        self.build(consumer("a", max_concurrency=2), consumer("b"))
        b_started_beside: list[int] = []

        def b_job(lease: Lease) -> Deferred[object]:
            b_started_beside.append(self.registry["a"].in_flight)
            return succeed("b")

        self.submit("a", "a1")
        self.submit("a", "a2")
        other = self.scheduler.run("b", b_job)
        self.submit("a", "a3")
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("a", 2))
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "a2", "a3"])
        self.assertEqual(b_started_beside, [])
        self.jobs.finish("a2")
        self.assertEqual(b_started_beside, [])
        self.jobs.finish("a3")
        self.assertEqual(b_started_beside, [0])
        self.assertEqual(self.successResultOf(other), "b")

    def test_higher_priority_other_stops_holder_admissions(self) -> None:
        """A waiting higher-priority request of another consumer stops the holder admitting more."""
        self.build(consumer("a", max_concurrency=2), consumer("b", 3))
        self.submit("a", "a1")
        self.submit("b", "b")
        own = self.submit("a", "a2")
        self.assertNoResult(own)
        self.assertEqual(self.jobs.started, ["a1"])
        self.assertEqual(self.registry["a"].queued, 1)
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "b"])
        self.jobs.finish("b")
        self.assertEqual(self.jobs.started, ["a1", "b", "a2"])

    def holder_admits_beside(self, other_priority: int) -> None:
        self.build(consumer("a", max_concurrency=2), consumer("b", other_priority))
        self.submit("a", "a1")
        other = self.submit("b", "b")
        self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.assertEqual((self.scheduler.running, self.scheduler.queued), (2, 1))
        self.jobs.finish("a1")
        self.jobs.finish("a2")
        self.assertEqual(self.jobs.started, ["a1", "a2", "b"])
        self.assertNoResult(other)

    def test_equal_priority_other_does_not_stop_holder(self) -> None:
        """A waiting request of equal priority for another consumer does not stop the holder."""
        self.holder_admits_beside(2)

    def test_lower_priority_other_does_not_stop_holder(self) -> None:
        """A waiting request of lower priority for another consumer does not stop the holder."""
        self.holder_admits_beside(1)

    def test_aged_other_stops_holder(self) -> None:
        """Another consumer's request that has aged above the holder's priority stops admissions."""
        self.build(
            consumer("a", max_concurrency=3), consumer("b", 1),
            config=SchedulerConfig(aging_s=30),
        )  # fmt: skip
        self.submit("a", "a1")
        self.clock.advance(1)
        self.submit("b", "b")
        self.clock.advance(30)
        self.submit("a", "a2")  # b waited 30 s: effective 2, equal
        self.clock.advance(30)
        self.submit("a", "a3")  # b waited 60 s: effective 3, higher
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.jobs.finish("a1")
        self.jobs.finish("a2")
        self.assertEqual(self.jobs.started, ["a1", "a2", "b"])

    def test_arrival_admits_an_own_request_aged_level(self) -> None:
        """A new arrival re-ranks by age: the holder's older request, now level, is admitted."""
        self.build(
            consumer("a", max_concurrency=2), consumer("b", 3),
            config=SchedulerConfig(aging_s=30),
        )  # fmt: skip
        self.submit("a", "a1")
        self.submit("a", "a2")
        self.submit("a", "a3")  # slots full: waits from 0
        self.clock.advance(10)
        self.submit("b", "b")  # waits from 10
        self.clock.advance(1)
        self.jobs.finish("a1")  # a3 at 2 against b at 3: blocked
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.clock.advance(24)  # t=35: a3 at 3, b at 3
        self.submit("a", "a4")
        self.assertEqual(self.jobs.started, ["a1", "a2", "a3"])
        self.assertEqual(self.registry["a"].queued, 1)


class ReleaseTests(SchedulerCase):
    def assert_passed_to_b(self) -> None:
        self.assertEqual(self.jobs.started[-1], "b")
        self.assertEqual(self.scheduler.holder, "b")
        self.assertEqual((self.registry["a"].in_flight, self.registry["b"].queued), (0, 0))

    def test_released_on_success(self) -> None:
        """An answered job frees the GPU for the next consumer and counts completed."""
        done = self.submit("a", "a")
        self.submit("b", "b")
        self.jobs.finish("a")
        self.assertEqual(self.successResultOf(done), "a")
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (1, 0, 0))

    def test_released_on_broker_error(self) -> None:
        """A job failing with a BrokerError passes it on, counts failed and frees the GPU."""
        failing = self.submit("a", "a")
        self.submit("b", "b")
        error = BrokerError("upstream_timeout", "slow", "a")
        self.jobs.fail("a", error)
        self.assertIs(self.failureResultOf(failing, BrokerError).value, error)
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (0, 1, 0))

    def test_released_on_any_error(self) -> None:
        """A job failing with any other exception counts failed and frees the GPU."""
        failing = self.submit("a", "a")
        self.submit("b", "b")
        self.jobs.fail("a", ZeroDivisionError())
        self.failureResultOf(failing, ZeroDivisionError)
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (0, 1, 0))

    def test_released_on_synchronous_raise(self) -> None:
        """A job raising before returning a Deferred counts failed and frees the GPU."""

        def boom(lease: Lease) -> Deferred[object]:
            raise KeyError("bug")

        self.submit("a", "a")
        failing = self.scheduler.run("a", boom)
        self.submit("b", "b")
        self.jobs.finish("a")
        self.failureResultOf(failing, KeyError)
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (1, 1, 0))

    def test_released_on_cancel(self) -> None:
        """A running job whose client left is cancelled, counted neither way, and frees the GPU."""
        running = self.submit("a", "a")
        self.submit("b", "b")
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual(self.jobs.cancelled, ["a"])
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (0, 0, 0))

    def hold(self, work: Deferred[object], fails: bool = False) -> Callable[[Lease], Deferred[str]]:
        def job(lease: Lease) -> Deferred[str]:
            lease.hold_until(work)
            answer: Deferred[str] = Deferred()
            if fails:
                answer.errback(BrokerError("upstream_timeout", "slow", "a"))
            else:
                answer.callback("answered")
            return answer

        return job

    def test_hold_until_success(self) -> None:
        """Held work that succeeds keeps the GPU after the answer, then frees it."""
        work: Deferred[object] = Deferred()
        self.assertEqual(self.successResultOf(self.scheduler.run("a", self.hold(work))), "answered")
        self.submit("b", "b")
        self.assertEqual((self.scheduler.holder, self.jobs.started), ("a", []))
        self.assertEqual(self.registry["a"].in_flight, 1)
        work.callback("done")
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (1, 0, 0))

    def test_hold_until_failure(self) -> None:
        """Held work that fails frees the GPU and does not change the request's outcome."""
        work: Deferred[object] = Deferred()
        self.successResultOf(self.scheduler.run("a", self.hold(work)))
        self.submit("b", "b")
        work.errback(RuntimeError("poll failed"))
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (1, 0, 0))

    def test_hold_until_after_failed_job(self) -> None:
        """Work held by a job that then failed still keeps the GPU until it ends."""
        work: Deferred[object] = Deferred()
        self.failureResultOf(self.scheduler.run("a", self.hold(work, fails=True)), BrokerError)
        self.submit("b", "b")
        self.assertEqual((self.scheduler.holder, self.jobs.started), ("a", []))
        work.callback(None)
        self.assert_passed_to_b()
        self.assertEqual(self.counters(), (0, 1, 0))

    def test_hold_until_waits_for_every_hold(self) -> None:
        """With several holds the GPU is freed only when the last one ends."""
        first: Deferred[object] = Deferred()
        second: Deferred[object] = Deferred()

        def job(lease: Lease) -> Deferred[None]:
            lease.hold_until(first)
            lease.hold_until(second)
            return succeed(None)

        self.scheduler.run("a", job)
        self.submit("b", "b")
        first.callback(None)
        self.assertEqual(self.jobs.started, [])
        second.callback(None)
        self.assert_passed_to_b()

    def test_stop_cancels_held_work_and_frees(self) -> None:
        """stop() cancels held work, which frees the GPU for the consumer waiting."""
        cancelled: list[bool] = []
        work: Deferred[object] = Deferred(lambda _: cancelled.append(True))
        self.scheduler.run("a", self.hold(work))
        self.submit("b", "b")
        self.scheduler.stop()
        self.assertEqual(cancelled, [True])
        self.assert_passed_to_b()
        self.scheduler.stop()  # nothing held any more: no effect
        self.assertEqual(self.jobs.cancelled, [])

    def test_stop_cancels_queue_timers(self) -> None:
        """stop() leaves no queue_timeout timer behind for the requests still waiting."""
        self.submit("a", "a")
        self.submit("b", "b")
        self.assertTrue(self.clock.getDelayedCalls())
        self.scheduler.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_leaves_running_jobs_alone(self) -> None:
        """stop() cancels only detached held work, not jobs still answering their clients."""
        running = self.submit("a", "a")
        self.scheduler.stop()
        self.assertEqual(self.jobs.cancelled, [])
        self.assertNoResult(running)
        self.assertEqual(self.scheduler.holder, "a")


class PrepareTests(SchedulerCase):
    def setUp(self) -> None:
        super().setUp()
        self.prepare = Preparations()
        self.build(consumer("a", max_concurrency=3), consumer("b"), prepare=self.prepare)

    def test_prepare_runs_before_the_first_job(self) -> None:
        """A new holder is prepared once, and its job waits for the preparation."""
        done = self.submit("a", "a1")
        self.assertEqual(self.prepare.calls, ["a"])
        self.assertEqual(self.jobs.started, [])
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("a", 1))
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["a1"])
        self.jobs.finish("a1")
        self.assertEqual(self.successResultOf(done), "a1")

    def test_prepare_shared_by_concurrent_requests(self) -> None:
        """Requests admitted together share one preparation and all wait for it."""
        for label in ("a1", "a2", "a3"):
            self.submit("a", label)
        self.assertEqual(self.prepare.calls, ["a"])
        self.assertEqual((self.jobs.started, self.scheduler.running), ([], 3))
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["a1", "a2", "a3"])

    def test_prepare_not_repeated_while_holding(self) -> None:
        """Requests admitted while the consumer keeps holding are not prepared again."""
        for label in ("a1", "a2", "a3", "a4"):
            self.submit("a", label)
        self.prepare.succeed()
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "a2", "a3", "a4"])
        self.submit("a", "a5")
        self.assertEqual(self.prepare.calls, ["a"])
        self.jobs.finish("a2")
        self.assertEqual(self.jobs.started[-1], "a5")
        self.assertEqual(self.prepare.calls, ["a"])

    def test_prepare_again_after_the_lease_moved(self) -> None:
        """A consumer that gets the lease back after someone else is prepared again."""
        self.build(consumer("a"), consumer("b"), prepare=self.prepare)
        self.submit("a", "a1")
        self.submit("b", "b")
        self.submit("a", "a2")
        self.prepare.succeed()
        self.jobs.finish("a1")
        self.assertEqual(self.prepare.calls, ["a", "b"])
        self.prepare.succeed()
        self.jobs.finish("b")
        self.assertEqual(self.prepare.calls, ["a", "b", "a"])
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["a1", "b", "a2"])

    def test_prepare_failure_fails_its_waiters(self) -> None:
        """A failed preparation fails every request waiting on it and passes the lease on."""
        waiting = [self.submit("a", "a1"), self.submit("a", "a2")]
        self.submit("b", "b")
        error = BrokerError("scheduler_error", "no room", "a")
        self.prepare.fail(error)
        for d in waiting:
            self.assertIs(self.failureResultOf(d, BrokerError).value, error)
        self.assertEqual(self.counters(), (0, 2, 0))
        self.assertEqual(self.registry["a"].in_flight, 0)
        self.assertEqual((self.scheduler.holder, self.prepare.calls), ("b", ["a", "b"]))
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["b"])

    def test_failed_preparation_is_not_use(self) -> None:
        """A request that never reached its consumer leaves its last_used_at alone (LRU)."""
        self.clock.advance(5)
        d = self.submit("a", "a1")
        self.prepare.fail(BrokerError("scheduler_error", "no room", "a"))
        self.failureResultOf(d, BrokerError)
        self.assertIsNone(self.registry["a"].last_used_at)

    def test_prepare_failure_spares_later_requests(self) -> None:
        """A request admitted after its consumer's preparation failed gets a fresh preparation."""
        self.build(consumer("a", max_concurrency=2), prepare=self.prepare)
        failing = [self.submit("a", "a1"), self.submit("a", "a2")]
        later = self.submit("a", "a3")
        self.prepare.fail(BrokerError("scheduler_error", "no room", "a"))
        for d in failing:
            self.broker_error(d, "scheduler_error")
        self.assertNoResult(later)
        self.assertEqual(self.prepare.calls, ["a", "a"])
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["a3"])
        self.assertEqual(self.counters(), (0, 2, 0))

    def test_prepare_raising_fails_the_request(self) -> None:
        """A prepare hook that raises instead of returning a Deferred still frees the lease."""

        def raising(name: str) -> Deferred[None]:
            raise BrokerError("scheduler_error", "no room", name)

        self.build(prepare=raising)
        self.broker_error(self.submit("a", "a"), "scheduler_error")
        self.assertEqual(self.counters(), (0, 1, 0))
        self.assertEqual((self.scheduler.holder, self.scheduler.running), (None, 0))
        self.assertEqual(self.registry["a"].in_flight, 0)

    def test_cancel_while_preparing_spares_the_others(self) -> None:
        """A request cancelled while waiting for preparation does not cancel it for the others."""
        gone = self.submit("a", "a1")
        staying = self.submit("a", "a2")
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(self.prepare.cancelled, [])
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["a2"])
        self.jobs.finish("a2")
        self.assertEqual(self.successResultOf(staying), "a2")
        self.assertEqual(self.counters(), (1, 0, 0))
        self.assertEqual((self.scheduler.holder, self.scheduler.running), (None, 0))

    def test_cancel_of_the_last_waiter_holds_until_prepared(self) -> None:
        """The lease stays with a consumer whose preparation still runs after its client left."""
        gone = self.submit("a", "a1")
        self.submit("b", "b")
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(self.prepare.cancelled, [])
        self.assertEqual((self.scheduler.holder, self.prepare.calls), ("a", ["a"]))
        self.prepare.succeed()
        self.assertEqual((self.scheduler.holder, self.prepare.calls), ("b", ["a", "b"]))
        self.assertEqual(self.jobs.started, [])
        self.assertEqual(self.counters(), (0, 0, 0))

    def test_stop_frees_a_lease_kept_for_a_preparation(self) -> None:
        """stop() frees a lease kept for a preparation whose clients left, without cancelling it."""
        gone = self.submit("a", "a1")
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.scheduler.stop()
        self.assertEqual(self.prepare.cancelled, [])
        self.assertEqual((self.scheduler.holder, self.scheduler.running), (None, 0))


class FigureTests(SchedulerCase):
    def test_figures_while_busy(self) -> None:
        """holder, running, queued and the per-consumer in_flight and queued follow the queue."""
        self.build(consumer("a", max_concurrency=2), consumer("b"))
        for name, label in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3"), ("b", "b2")]:
            self.submit(name, label)
        figures = self.scheduler.to_json()
        self.assertEqual((figures["holder"], figures["running"], figures["queued"]), ("a", 2, 3))
        self.assertEqual(
            {
                name: (state.to_json()["in_flight"], state.to_json()["queued"])
                for name, state in self.registry.states.items()
            },
            {"a": (2, 1), "b": (0, 2)},
        )
        self.jobs.finish("a1")
        self.jobs.finish("a2")
        self.jobs.finish("a3")
        self.assertEqual(
            {name: (s.in_flight, s.queued) for name, s in self.registry.states.items()},
            {"a": (0, 0), "b": (1, 1)},
        )
        self.assertEqual(self.scheduler.to_json()["holder"], "b")

    def test_counters(self) -> None:
        """completed, failed and rejected count answers, broker errors and refusals."""
        self.build(config=SchedulerConfig(max_queue=1, queue_timeout_s=10))
        self.submit("a", "ok")
        timing_out = self.submit("b", "late")
        self.broker_error(self.submit("b", "full"), "queue_full")
        self.clock.advance(10)
        self.broker_error(timing_out, "queue_timeout")
        self.jobs.finish("ok")
        failing = self.submit("a", "failing")
        self.jobs.fail("failing", BrokerError("consumer_unreachable", "gone", "a"))
        self.broker_error(failing, "consumer_unreachable")
        cancelled = self.submit("a", "cancelled")
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.assertEqual(
            {k: v for k, v in self.scheduler.to_json().items() if k != "holder"},
            {"queued": 0, "running": 0, "completed": 1, "failed": 1, "rejected": 2,
             "evictions": 0, "loads": 0},
        )  # fmt: skip

    def test_last_used_at_is_the_end_of_the_last_request(self) -> None:
        """last_used_at is the Clock time the consumer's last scheduled request ended."""
        self.clock.advance(100)
        self.submit("a", "a1")
        self.clock.advance(7)
        self.jobs.finish("a1")
        self.assertEqual(self.registry["a"].last_used_at, 107)
        self.assertEqual(self.registry["a"].to_json()["last_used"], "1970-01-01T00:01:47Z")
        work: Deferred[object] = Deferred()

        def holding(lease: Lease) -> Deferred[None]:
            lease.hold_until(work)
            return succeed(None)

        self.scheduler.run("a", holding)
        self.clock.advance(13)
        work.callback(None)
        self.assertEqual(self.registry["a"].last_used_at, 120)
        failing = self.submit("a", "a3")
        self.clock.advance(5)
        self.jobs.fail("a3", BrokerError("upstream_timeout", "slow", "a"))
        self.broker_error(failing, "upstream_timeout")
        self.assertEqual(self.registry["a"].last_used_at, 125)
        self.assertIsNone(self.registry["b"].last_used_at)

    def test_queued_requests_do_not_touch_last_used(self) -> None:
        """A request that never got the GPU leaves its consumer's last_used_at alone."""
        self.build(config=SchedulerConfig(queue_timeout_s=10))
        self.submit("a", "a")
        cancelled = self.submit("b", "b1")
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        timing_out = self.submit("b", "b2")
        self.clock.advance(10)
        self.broker_error(timing_out, "queue_timeout")
        self.assertIsNone(self.registry["b"].last_used_at)
        self.assertEqual(self.registry["b"].to_json()["last_used"], None)

    def test_stats_are_shared(self) -> None:
        """The stats object given is the one counted and shown, evictions and loads included."""
        stats = SchedulerStats(evictions=3, loads=2)
        self.build(stats=stats)
        self.successResultOf(self.scheduler.run("a", lambda lease: succeed(None)))
        self.assertIs(self.scheduler.stats, stats)
        self.assertEqual(stats.completed, 1)
        figures = self.scheduler.to_json()
        self.assertEqual((figures["evictions"], figures["loads"]), (3, 2))


class EventCase(SchedulerCase):
    """A SchedulerCase with helpers for exclusive work and the events it publishes."""

    def exclusive(self, name: str, label: str, prepare: bool = True) -> Deferred[object]:
        """Ask for the GPU alone for ``name`` with a gated job called ``label``."""
        return self.scheduler.run(name, self.jobs.gated(label), exclusive=True, prepare=prepare)

    def rejections(self) -> list[dict[str, object]]:
        return [dict(e.data) for e in self.published if e.kind == "rejected"]


class ExclusiveTests(EventCase):
    """run(exclusive=True): work that waits for a free lease and holds it alone."""

    def setUp(self) -> None:
        super().setUp()
        self.build(consumer("a", max_concurrency=3), consumer("b"))

    def test_admitted_at_once_when_free(self) -> None:
        """With the lease free and nobody waiting, exclusive work starts at once."""
        done = self.exclusive("a", "x")
        self.assertEqual(self.jobs.started, ["x"])
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("a", 1))
        self.jobs.finish("x")
        self.assertEqual(self.successResultOf(done), "x")
        self.assertEqual((self.scheduler.holder, self.scheduler.running), (None, 0))

    def test_waits_for_the_holders_running_request(self) -> None:
        """Exclusive work does not join its own consumer's lease: it waits until the lease is free,
        though the holder has free slots."""
        self.submit("a", "a1")
        waiting = self.exclusive("a", "x")
        self.assertEqual(self.jobs.started, ["a1"])
        self.assertEqual((self.scheduler.running, self.registry["a"].queued), (1, 1))
        self.assertNoResult(waiting)
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "x"])
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("a", 1))

    def test_holds_the_lease_alone(self) -> None:
        """While exclusive work runs, no request starts beside it, its own consumer's included."""
        self.exclusive("a", "x")
        self.submit("a", "a2")
        self.submit("b", "b")
        self.assertEqual(self.jobs.started, ["x"])
        self.assertEqual((self.scheduler.running, self.scheduler.queued), (1, 2))
        self.jobs.finish("x")
        self.assertEqual(self.jobs.started, ["x", "a2"])
        self.jobs.finish("a2")
        self.assertEqual(self.jobs.started, ["x", "a2", "b"])

    def test_later_own_requests_do_not_overtake(self) -> None:
        """A request of the holder arriving after the exclusive work waits behind it, though a
        slot is free."""
        self.submit("a", "a1")
        self.exclusive("a", "x")
        self.clock.advance(1)
        later = self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a1"])
        self.assertNoResult(later)
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "x"])
        self.jobs.finish("x")
        self.assertEqual(self.jobs.started, ["a1", "x", "a2"])

    def test_earlier_own_requests_go_first(self) -> None:
        """The holder's requests that were waiting before the exclusive work still go first."""
        self.build(consumer("a", max_concurrency=1), consumer("b"))
        self.submit("a", "a1")
        self.clock.advance(1)
        self.submit("a", "a2")
        self.clock.advance(1)
        self.exclusive("a", "x")
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.jobs.finish("a2")
        self.assertEqual(self.jobs.started, ["a1", "a2", "x"])

    def test_waiting_exclusive_of_another_consumer_stops_holder_refill(self) -> None:
        """Exclusive work waiting for another consumer stops the holder admitting new requests."""
        self.submit("a", "a1")
        self.exclusive("b", "x")
        self.clock.advance(1)
        self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a1"])
        self.jobs.finish("a1")
        self.assertEqual((self.jobs.started, self.scheduler.holder), (["a1", "x"], "b"))
        self.jobs.finish("x")
        self.assertEqual(self.jobs.started, ["a1", "x", "a2"])

    def test_cancelled_while_waiting_lets_the_holder_admit(self) -> None:
        """Exclusive work cancelled while waiting no longer holds the holder's own requests back."""
        self.submit("a", "a1")
        waiting = self.exclusive("a", "x")
        self.clock.advance(1)
        self.submit("a", "a2")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.assertEqual((self.scheduler.queued, self.registry["a"].in_flight), (0, 2))

    def test_timed_out_while_waiting_lets_the_holder_admit(self) -> None:
        """Exclusive work that times out in the queue fails with queue_timeout, and the holder's
        own requests proceed."""
        self.build(
            consumer("a", max_concurrency=3), consumer("b"),
            config=SchedulerConfig(queue_timeout_s=10),
        )  # fmt: skip
        self.submit("a", "a1")
        waiting = self.exclusive("a", "x")
        self.clock.advance(1)
        self.submit("a", "a2")
        self.clock.advance(9)
        self.broker_error(waiting, "queue_timeout")
        self.assertEqual(self.jobs.started, ["a1", "a2"])

    def test_failure_releases_and_ends_exclusivity(self) -> None:
        """Exclusive work that fails frees the lease; the next requests share it as usual."""
        failing = self.exclusive("a", "x")
        self.submit("a", "a1")
        self.submit("a", "a2")
        self.jobs.fail("x", BrokerError("scheduler_error", "unload failed", "a"))
        self.broker_error(failing, "scheduler_error")
        self.assertEqual(self.jobs.started, ["x", "a1", "a2"])
        self.assertEqual(self.scheduler.running, 2)


class PrepareFlagTests(EventCase):
    """run(prepare=False) skips the preparation hook."""

    def setUp(self) -> None:
        super().setUp()
        self.prepare = Preparations()
        self.build(prepare=self.prepare)

    def test_prepare_false_skips_the_hook(self) -> None:
        """A request admitted with prepare=False starts at once and calls no preparation."""
        self.scheduler.run("a", self.jobs.gated("a1"), prepare=False)
        self.assertEqual((self.jobs.started, self.prepare.calls), (["a1"], []))

    def test_exclusive_without_preparation(self) -> None:
        """Exclusive work with prepare=False (an unload) starts without a preparation, and the next
        holder is prepared as usual."""
        self.exclusive("a", "x", prepare=False)
        self.submit("b", "b")
        self.assertEqual((self.jobs.started, self.prepare.calls), (["x"], []))
        self.jobs.finish("x")
        self.assertEqual(self.prepare.calls, ["b"])
        self.prepare.succeed()
        self.assertEqual(self.jobs.started, ["x", "b"])

    def test_prepare_true_still_prepares(self) -> None:
        """The default (prepare=True) calls the hook before the job."""
        self.submit("a", "a1")
        self.assertEqual((self.jobs.started, self.prepare.calls), ([], ["a"]))


class RejectedEventTests(EventCase):
    """Refusals before admission are published as ``rejected`` events."""

    def test_reject_publishes(self) -> None:
        """reject(reason, consumer) counts and publishes the reason and the consumer."""
        self.scheduler.reject("consumer_unreachable", "a")
        self.scheduler.reject("payload_too_large")
        self.assertEqual(
            self.rejections(),
            [{"consumer": "a", "reason": "consumer_unreachable"},
             {"consumer": None, "reason": "payload_too_large"}],
        )  # fmt: skip
        self.assertEqual(self.scheduler.stats.rejected, 2)

    def test_queue_full_publishes(self) -> None:
        """A queue_full refusal publishes rejected with reason queue_full and its consumer."""
        self.build(config=SchedulerConfig(max_queue=1))
        self.submit("a", "a")
        self.submit("b", "b1")
        self.broker_error(self.submit("b", "b2"), "queue_full")
        self.assertEqual(self.rejections(), [{"consumer": "b", "reason": "queue_full"}])

    def test_queue_timeout_publishes(self) -> None:
        """A queue timeout publishes rejected with reason queue_timeout, once, when it happens."""
        self.build(config=SchedulerConfig(queue_timeout_s=10))
        self.submit("a", "a")
        waiting = self.submit("b", "b")
        self.clock.advance(9.9)
        self.assertEqual(self.rejections(), [])
        self.clock.advance(0.1)
        self.broker_error(waiting, "queue_timeout")
        self.assertEqual(self.rejections(), [{"consumer": "b", "reason": "queue_timeout"}])

    def test_admitted_and_cancelled_publish_nothing(self) -> None:
        """Requests that are admitted, or cancelled while waiting, publish no rejected event."""
        self.submit("a", "a")
        cancelled = self.submit("b", "b")
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.jobs.finish("a")
        self.assertEqual(self.published, [])


class AdminCountingTests(EventCase):
    """count=False work (admin calls) is not a request: never counted rejected."""

    def test_uncounted_work_never_rejected(self) -> None:
        """A queue_timeout or queue_full of admin work fails it, but rejected stays 0."""
        self.build(config=SchedulerConfig(queue_timeout_s=5, max_queue=1))
        self.submit("a", "a")
        waiting = self.scheduler.run("b", self.jobs.gated("b"), count=False)
        full = self.scheduler.run("b", self.jobs.gated("b2"), count=False)
        self.broker_error(full, "queue_full")
        self.clock.advance(6)
        self.broker_error(waiting, "queue_timeout")
        self.assertEqual((self.scheduler.stats.rejected, self.rejections()), (0, []))


class CollectedTests(SynchronousTestCase):
    """Requests whose jobs nobody refers to any more are garbage, not scheduling events."""

    def test_collected_requests_leave_the_scheduler_alone(self) -> None:
        """A running and a queued request, dropped with their scheduler, are collected without
        running the scheduler from inside the collection (nothing is logged, nothing resumed)."""
        started: list[str] = []

        def abandon() -> None:
            clock = Clock()
            scheduler = GpuScheduler(Registry(consumers(), clock), clock)
            for name in ("a", "b", "a", "b"):
                scheduler.run(name, partial(_never, started, name))

        for _ in range(20):
            abandon()
            gc.collect()
        self.assertEqual(started, ["a"] * 20)
        self.assertEqual(self.flushLoggedErrors(), [])


def _never(started: list[str], name: str, lease: Lease) -> Deferred[None]:
    """A job that never ends, and that nothing but its request refers to."""
    started.append(name)
    return Deferred()
