"""Tests for mgpu.scheduler: the global GPU lease."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConsumerConfig, KindPath
from mgpu.errors import BrokerError
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Lease


def consumers() -> dict[str, ConsumerConfig]:
    paths = {"tts": KindPath("POST", "/x")}
    return {
        name: ConsumerConfig(name=name, url="http://127.0.0.1:1", paths=paths, vram_resident_mib=1)
        for name in ("a", "b")
    }


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
        self.scheduler.reject()
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
