"""Tests for mgpu.admin: loading and unloading a consumer now, under the GPU lease.

The room-making harness of ``tests.test_room`` (a real Registry, RoomMaker and
ConsumerControl; consumers in memory behind ``StubTreq``; a fake GPU; a Clock)
with a real ``GpuScheduler`` whose preparation is the RoomMaker's.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, cast

from attrs import evolve
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent

from mgpu.admin import Admin
from mgpu.config import ConsumerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.scheduler import GpuScheduler
from tests.test_room import EVERYONE, GIB, MVOICE, Harness, _RefusingAgent
from tests.test_scheduler import Jobs


class AdminCase(SynchronousTestCase):
    """An Admin over a Harness (SPEC's consumers on a 16 GiB card) and a real scheduler."""

    def setUp(self) -> None:
        self.build()

    def build(self, *consumers: ConsumerConfig, total_mib: int = 16 * GIB) -> None:
        self.h = Harness(consumers or EVERYONE, total_mib=total_mib)
        self.scheduler = GpuScheduler(
            self.h.registry,
            self.h.as_time,
            prepare=self.h.room.prepare,
            stats=self.h.stats,
            events=self.h.events,
        )
        self.admin = Admin(
            self.h.registry, self.scheduler, self.h.room, self.h.control, self.h.events
        )
        self.jobs = Jobs()

    def settle(self) -> None:
        """Deliver every call to the consumers and their answers, however many rounds it takes."""
        for _ in range(5):
            self.h.stub.flush()

    def call(self, work: Coroutine[Any, Any, dict[str, object]]) -> Deferred[dict[str, object]]:
        d = Deferred.fromCoroutine(work)
        self.settle()
        return d

    def load(self, name: str) -> Deferred[dict[str, object]]:
        return self.call(self.admin.load(name))

    def unload(self, name: str) -> Deferred[dict[str, object]]:
        return self.call(self.admin.unload(name))

    def request(self, name: str, label: str) -> Deferred[object]:
        """An ordinary scheduled request of ``name`` whose job the test ends."""
        d = self.scheduler.run(name, self.jobs.gated(label))
        self.settle()
        return d

    def finish(self, label: str) -> None:
        self.jobs.finish(label)
        self.settle()

    def refused(self, d: Deferred[Any], code: str, consumer: str | None) -> BrokerError:
        error = self.failureResultOf(d, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual((error.code, error.consumer), (code, consumer))
        return error

    def calls(self) -> list[tuple[str, str, str, str]]:
        return [(c.consumer, c.action, c.method, c.path) for c in self.h.calls]

    def published(self) -> list[tuple[str, dict[str, object]]]:
        """The events published, with their data less the timing fields."""
        return [
            (e.kind, {k: v for k, v in e.data.items() if k not in ("took_s", "free_s", "age_s")})
            for e in self.h.published
        ]

    def assert_lease_free(self) -> None:
        self.assertEqual((self.scheduler.holder, self.scheduler.running), (None, 0))
        self.assertEqual(self.scheduler.queued, 0)


class RefusalTests(AdminCase):
    """What is refused at once, without waiting for the lease or calling anyone."""

    def test_unknown_consumer_not_found(self) -> None:
        """Loading or unloading a consumer the configuration does not name is 404 not_found."""
        for d in (self.load("nobody"), self.unload("nobody")):
            error = self.refused(d, "not_found", None)
            self.assertEqual(error.status, 404)
            self.assertIn("nobody", error.message)
        self.assertEqual(self.h.calls, [])

    def test_load_without_load_route(self) -> None:
        """Loading a consumer with no load route (comfyui, whisper) is 400 bad_request."""
        for name in ("comfyui", "whisper"):
            error = self.refused(self.load(name), "bad_request", name)
            self.assertEqual(error.status, 400)
            self.assertIn("no load route", error.message)
        self.assertEqual(self.h.calls, [])

    def test_unload_without_unload_route(self) -> None:
        """Unloading a consumer with no unload route (whisper) is 400 bad_request."""
        error = self.refused(self.unload("whisper"), "bad_request", "whisper")
        self.assertIn("no unload route", error.message)
        self.assertEqual(self.h.calls, [])

    def test_unload_vram_managed(self) -> None:
        """Unloading a vram_managed consumer is refused even though it has an unload route."""
        self.h.resident("ollama")
        assert self.h.registry["ollama"].config.unload is not None
        error = self.refused(self.unload("ollama"), "bad_request", "ollama")
        self.assertIn("manages its own memory", error.message)
        self.assertEqual(self.h.calls, [])
        self.assertIs(self.h.registry["ollama"].loaded, True)

    def test_refused_without_waiting_for_the_lease(self) -> None:
        """A refusal comes at once even while another consumer holds the lease, and queues
        nothing."""
        self.h.resident("vllm")
        self.request("vllm", "v")
        self.refused(self.unload("ollama"), "bad_request", "ollama")
        self.refused(self.load("nobody"), "not_found", None)
        self.assertEqual((self.scheduler.holder, self.scheduler.queued), ("vllm", 0))


class UnloadTests(AdminCase):
    """POST /v1/admin/consumers/<name>/unload."""

    def test_unload(self) -> None:
        """The unload route is called; the consumer is marked unloaded, an unload event with
        reason admin is published, and the answer says loaded false."""
        self.h.resident("mvoice")
        answer = self.successResultOf(self.unload("mvoice"))
        self.assertEqual(answer, {"consumer": "mvoice", "loaded": False})
        self.assertEqual(self.calls(), [("mvoice", "unload", "POST", "/api/admin/unload")])
        self.assertIs(self.h.registry["mvoice"].loaded, False)
        self.assertEqual(self.published(), [("unload", {"consumer": "mvoice", "reason": "admin"})])
        self.assertNotIn("mvoice", self.h.gpu.resident)
        self.assert_lease_free()

    def test_unload_is_neither_use_nor_eviction(self) -> None:
        """An admin unload leaves last_used alone and does not count as an eviction."""
        self.h.resident("mvoice", last_used_at=5.0)
        self.h.registry.mark_used("mvoice")
        state = self.h.registry["mvoice"]
        used, used_at = state.last_used, state.last_used_at
        self.h.clock.advance(100)
        self.successResultOf(self.unload("mvoice"))
        self.assertEqual((state.last_used, state.last_used_at), (used, used_at))
        self.assertEqual(self.h.stats.evictions, 0)
        self.assertEqual(self.h.stats.loads, 0)

    def test_unload_makes_no_room_and_loads_nothing(self) -> None:
        """An unload of a consumer the broker knows is unloaded calls only its unload route."""
        self.h.absent("vllm")
        self.successResultOf(self.unload("vllm"))
        self.assertEqual(self.calls(), [("vllm", "unload", "POST", "/sleep?level=1")])

    def test_waits_for_another_consumers_request(self) -> None:
        """An unload waits while another consumer holds the lease, then runs."""
        self.h.resident("vllm")
        self.h.resident("mvoice")
        self.request("vllm", "v")
        unloading = self.unload("mvoice")
        self.assertNoResult(unloading)
        self.assertEqual(self.h.calls, [])
        self.assertEqual(self.h.registry["mvoice"].queued, 1)
        self.finish("v")
        self.assertEqual(self.calls(), [("mvoice", "unload", "POST", "/api/admin/unload")])
        self.successResultOf(unloading)

    def test_later_request_waits_for_the_unload(self) -> None:
        """Another consumer's request arriving during the unload runs only once it has ended."""
        self.h.resident("vllm")
        self.h.resident("mvoice")
        self.h.consumers["mvoice"].mode["unload"] = "hang"
        unloading = self.unload("mvoice")
        self.assertEqual(self.calls(), [("mvoice", "unload", "POST", "/api/admin/unload")])
        self.request("vllm", "v")
        self.assertEqual(self.jobs.started, [])
        self.assertEqual(self.scheduler.holder, "mvoice")
        self.h.consumers["mvoice"].finish_held()
        self.settle()
        self.successResultOf(unloading)
        self.assertEqual(self.jobs.started, ["v"])
        self.assertEqual(self.scheduler.holder, "vllm")

    def test_own_running_request_finishes_first(self) -> None:
        """A running request of the same consumer ends before the unload starts; a request of it
        arriving later neither joins the unload nor overtakes it, and is loaded again."""
        self.build(evolve(MVOICE, max_concurrency=2), *EVERYONE[1:])
        self.h.resident("mvoice")
        self.request("mvoice", "m1")
        unloading = self.unload("mvoice")
        self.h.clock.advance(1)
        later = self.request("mvoice", "m2")
        self.assertEqual((self.jobs.started, self.h.calls), (["m1"], []))
        self.finish("m1")
        self.successResultOf(unloading)
        self.assertEqual(
            self.calls(),
            [("mvoice", "unload", "POST", "/api/admin/unload"),
             ("mvoice", "load", "POST", "/api/admin/load")],
        )  # fmt: skip
        self.assertEqual(self.jobs.started, ["m1", "m2"])
        self.finish("m2")
        self.assertEqual(self.successResultOf(later), "m2")

    def test_failing_unload_route(self) -> None:
        """An unload route answering 500 fails the unload with its error; the consumer stays
        loaded, no event is published, and the lease is free."""
        self.h.resident("mvoice", last_used_at=5.0)
        self.h.consumers["mvoice"].mode["unload"] = "fail"
        generation = self.h.registry["mvoice"].generation
        error = self.refused(self.unload("mvoice"), "scheduler_error", "mvoice")
        self.assertIn("HTTP 500", error.message)
        state = self.h.registry["mvoice"]
        self.assertEqual((state.loaded, state.healthy, state.generation), (True, True, generation))
        self.assertEqual(state.last_used_at, 5.0)
        self.assertEqual(self.h.published, [])
        self.assert_lease_free()
        self.h.resident("vllm")
        self.request("vllm", "v")
        self.assertEqual(self.jobs.started, ["v"])

    def test_unreachable_consumer(self) -> None:
        """An unload whose connection is refused is consumer_unreachable and marks the consumer
        unhealthy; it stays loaded and the lease is free."""
        self.h.resident("mvoice")
        refusing = ConsumerControl(HTTPClient(cast(IAgent, _RefusingAgent())), self.h.as_time)
        admin = evolve(self.admin, control=refusing)
        self.refused(self.call(admin.unload("mvoice")), "consumer_unreachable", "mvoice")
        state = self.h.registry["mvoice"]
        self.assertEqual((state.loaded, state.healthy), (True, False))
        self.assertIn("connection refused", state.last_error or "")
        self.assert_lease_free()


class LoadTests(AdminCase):
    """POST /v1/admin/consumers/<name>/load."""

    def test_load_unknown_state(self) -> None:
        """A consumer whose loaded state is unknown gets one load call; it is marked loaded and a
        load event with reason admin is published."""
        self.assertIsNone(self.h.registry["mvoice"].loaded)
        answer = self.successResultOf(self.load("mvoice"))
        self.assertEqual(answer, {"consumer": "mvoice", "loaded": True})
        self.assertEqual(self.calls(), [("mvoice", "load", "POST", "/api/admin/load")])
        self.assertIs(self.h.registry["mvoice"].loaded, True)
        self.assertEqual(self.published(), [("load", {"consumer": "mvoice", "reason": "admin"})])
        self.assertEqual(self.h.stats.loads, 1)
        self.assert_lease_free()

    def test_load_known_unloaded_done_by_the_preparation(self) -> None:
        """A consumer the broker knows is unloaded is loaded once, by the lease's preparation: the
        event's reason is then request, not admin."""
        self.h.absent("mvoice")
        self.successResultOf(self.load("mvoice"))
        self.assertEqual(self.calls(), [("mvoice", "load", "POST", "/api/admin/load")])
        self.assertEqual(self.published(), [("load", {"consumer": "mvoice", "reason": "request"})])
        self.assertIs(self.h.registry["mvoice"].loaded, True)

    def test_load_known_loaded_calls_nothing(self) -> None:
        """A consumer the broker knows is loaded is not loaded again and nothing is published."""
        self.h.resident("mvoice")
        answer = self.successResultOf(self.load("mvoice"))
        self.assertEqual(answer, {"consumer": "mvoice", "loaded": True})
        self.assertEqual((self.h.calls, self.h.published), ([], []))

    def test_load_makes_room_first(self) -> None:
        """Room is made before the load: the LRU victim is unloaded (an eviction), then the
        target is loaded."""
        self.h.resident("comfyui", last_used_at=1.0)
        self.h.resident("whisper")
        self.h.absent("mvoice")
        self.successResultOf(self.load("mvoice"))
        self.assertEqual(
            self.calls(),
            [("comfyui", "unload", "POST", "/free"), ("mvoice", "load", "POST", "/api/admin/load")],
        )
        self.assertEqual([kind for kind, _ in self.published()], ["evict", "load"])
        self.assertEqual((self.h.stats.evictions, self.h.stats.loads), (1, 1))

    def test_load_counts_as_use(self) -> None:
        """An admin load is a use of the consumer: last_used_at is the time it ended."""
        self.h.absent("mvoice")
        self.h.clock.advance(50)
        self.successResultOf(self.load("mvoice"))
        self.assertEqual(self.h.registry["mvoice"].last_used_at, 50)

    def test_load_waits_for_the_lease(self) -> None:
        """A load waits while another consumer holds the lease."""
        self.h.resident("vllm")
        self.request("vllm", "v")
        loading = self.load("mvoice")
        self.assertEqual(self.h.calls, [])
        self.finish("v")
        self.successResultOf(loading)
        self.assertEqual(self.calls(), [("mvoice", "load", "POST", "/api/admin/load")])

    def test_failing_load(self) -> None:
        """A load route answering 500 fails with scheduler_error; the consumer is not marked
        loaded, nothing is published, and the lease is free."""
        self.h.consumers["mvoice"].mode["load"] = "fail"
        self.refused(self.load("mvoice"), "scheduler_error", "mvoice")
        self.assertIsNone(self.h.registry["mvoice"].loaded)
        self.assertEqual((self.h.published, self.h.stats.loads), ([], 0))
        self.assert_lease_free()


class LeavingEarlyTests(AdminCase):
    """A caller who leaves while the load or unload call is out does not cut it off."""

    def test_unload_goes_on_after_the_caller_left(self) -> None:
        """The unload call finishes, the consumer shows unloaded, and the lease is held until
        then; admin work counts as neither completed nor failed."""
        self.h.resident("mvoice")
        self.h.consumers["mvoice"].mode["unload"] = "hang"
        d = self.unload("mvoice")
        self.assertEqual(self.calls(), [("mvoice", "unload", "POST", "/api/admin/unload")])
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.scheduler.holder, "mvoice")  # still held: the unload is out
        self.h.consumers["mvoice"].finish_held()
        self.settle()
        self.assertIs(self.h.registry["mvoice"].loaded, False)
        self.assert_lease_free()
        self.assertEqual((self.h.stats.completed, self.h.stats.failed), (0, 0))
