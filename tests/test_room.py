"""Tests for mgpu.room: making room on the GPU and loading the target (SPEC section 7).

Everything is real but the network, the GPU and time: a real ``Registry`` and
``ConsumerControl``; the consumers are in-memory resources behind ``StubTreq``
that record every call (method, path, JSON body) and can be told to fail or
hang; the GPU is a fake whose memory follows those calls, and can free late
as ComfyUI's asynchronous ``/free`` does; time is a ``Clock``, moved from one
scheduled call to the next.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

from attrs import evolve, frozen
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpu.config import ConsumerConfig, GpuConfig, KindPath, OllamaConfig, Route, SchedulerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import Event, EventBus
from mgpu.footprints import LearnedSizes
from mgpu.gpu import GpuProcess, GpuSnapshot, failed_snapshot
from mgpu.ollama import OllamaModel
from mgpu.registry import Registry
from mgpu.room import FREE_POLL_S, RoomMaker
from mgpu.scheduler import SchedulerStats
from tests.test_facade import ByHost

#: Slack for float sums of the Clock's times.
EPSILON = 1e-6

GIB = 1024
CUSHION = 256

COMFYUI_FREE = Route("POST", "/free", {"unload_models": True, "free_memory": True})


def consumer(
    name: str,
    port: int,
    size: int,
    *,
    unload: Route | None = None,
    load: Route | None = None,
    coexist: Iterable[str] = (),
    managed: bool = False,
    timeout_s: float = 60.0,
) -> ConsumerConfig:
    """A consumer at http://127.0.0.1:``port`` of ``size`` MiB."""
    return ConsumerConfig(
        name=name,
        url=f"http://127.0.0.1:{port}",
        paths={"tts": KindPath("POST", "/run")},
        vram_resident_mib=size,
        unload=unload,
        load=load,
        can_coexist_with=frozenset(coexist),
        vram_managed=managed,
        timeout_s=timeout_s,
    )


# SPEC section 3's consumers, plus vLLM (sleep and wake-up routes, DESIGN section 5).
MVOICE = consumer(
    "mvoice", 8765, 2800,
    unload=Route("POST", "/api/admin/unload"),
    load=Route("POST", "/api/admin/load", {"voice": "default"}),
    coexist=["ollama"],
)  # fmt: skip
WHISPER = consumer("whisper", 8080, 1500, coexist=["mvoice", "ollama"])
OLLAMA = consumer(
    "ollama", 11434, 6000,
    unload=Route("POST", "/api/generate", {"model": "llama3", "keep_alive": 0}),
    managed=True,
)  # fmt: skip
COMFYUI = consumer("comfyui", 8188, 13000, unload=COMFYUI_FREE)
VLLM = consumer(
    "vllm", 8000, 7000, unload=Route("POST", "/sleep?level=1"), load=Route("POST", "/wake_up")
)
EVERYONE = (MVOICE, WHISPER, OLLAMA, COMFYUI, VLLM)


@frozen
class Call:
    """One load or unload call a consumer received."""

    consumer: str
    action: str  # "load", "unload", or "other"
    method: str
    path: str
    body: object  # the parsed JSON body, None when empty
    at: float


class FakeGpu:
    """A GPU whose memory the test controls: what is resident, what else is used, when it frees.

    ``fresh()`` answers the current simulated reading. An unload frees its
    consumer's memory ``free_delay[name]`` seconds after the unload answers
    (0 by default; None: never), as ComfyUI's ``/free`` only sets a flag.
    """

    def __init__(self, clock: Clock, total_mib: int) -> None:
        self.clock = clock
        self.total_mib = total_mib
        self.other_mib = 0
        self.resident: dict[str, int] = {}
        self.free_delay: dict[str, float | None] = {}
        self.ok = True
        self.reads: list[float] = []
        self.processes: tuple[GpuProcess, ...] | None = None

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.other_mib - sum(self.resident.values())

    def fresh_memory(self) -> Deferred[GpuSnapshot]:
        self.reads.append(self.clock.seconds())
        return succeed(self.latest)

    @property
    def latest(self) -> GpuSnapshot:
        """The reading as it would be now (the poller's cache, read without counting)."""
        read_at = datetime.fromtimestamp(self.clock.seconds(), UTC)
        if not self.ok:
            return failed_snapshot("nvml", 0, "NVML: driver not loaded", read_at)
        free = self.free_mib
        return (
            GpuSnapshot(
                source="nvml", ok=True, error=None, index=0, name="Fake GPU",
                total_mib=self.total_mib, used_mib=self.total_mib - free, free_mib=free,
                read_at=read_at, processes=self.processes,
            )
        )  # fmt: skip

    def unloaded(self, name: str) -> None:
        """``name``'s unload call answered: free its memory now, later, or never."""
        delay = self.free_delay.get(name, 0.0)
        if delay is None:
            return
        if delay == 0:
            self.resident.pop(name, None)
        else:
            self.clock.callLater(delay, self.resident.pop, name, None)

    def loaded(self, name: str, size: int) -> None:
        self.resident[name] = size


class FakeConsumer(Resource):
    """An in-memory consumer answering its load and unload routes; every call recorded.

    ``mode[action]`` is "ok" (200, and the GPU follows), "fail" (500) or
    "hang" (no answer until ``finish_held``).
    """

    isLeaf = True

    def __init__(self, config: ConsumerConfig, gpu: FakeGpu, calls: list[Call]) -> None:
        super().__init__()
        self.config = config
        self.gpu = gpu
        self.calls = calls
        self.mode = {"load": "ok", "unload": "ok"}
        self.held: list[tuple[str, Request]] = []

    def _action(self, method: str, path: str) -> str:
        for action, route in (("load", self.config.load), ("unload", self.config.unload)):
            if isinstance(route, Route) and (route.method, route.path) == (method, path):
                return action
        return "other"

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.uri is not None
        assert request.content is not None
        method, path = request.method.decode(), request.uri.decode()
        raw = request.content.read()
        action = self._action(method, path)
        self.calls.append(
            Call(
                self.config.name, action, method, path,
                json.loads(raw) if raw else None, self.gpu.clock.seconds(),
            )
        )  # fmt: skip
        if action == "other":
            request.setResponseCode(404)
            return b"{}"
        mode = self.mode[action]
        if mode == "hang":
            self.held.append((action, request))
            return NOT_DONE_YET
        if mode == "fail":
            request.setResponseCode(500)
            return b'{"error": "CUDA error: out of memory"}'
        self._done(action)
        return b"{}"

    def _done(self, action: str) -> None:
        if action == "unload":
            self.gpu.unloaded(self.config.name)
        else:
            self.gpu.loaded(self.config.name, self.config.vram_resident_mib)

    def finish_held(self) -> None:
        """Answer every held call with 200 now."""
        held, self.held = self.held, []
        for action, request in held:
            self._done(action)
            request.write(b"{}")
            request.finish()


class _RefusingAgent:
    """An agent whose every connection is refused, as to a consumer that is gone."""

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        return fail(ConnectionRefusedError())


class Harness:
    """A RoomMaker over a real Registry and ConsumerControl, a FakeGpu and a Clock."""

    def __init__(
        self,
        consumers: Iterable[ConsumerConfig] = EVERYONE,
        *,
        total_mib: int = 16 * GIB,
        gpu_config: GpuConfig | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        configs = {c.name: c for c in consumers}
        self.clock = Clock()
        self.gpu = FakeGpu(self.clock, total_mib)
        self.calls: list[Call] = []
        self.consumers = {
            name: FakeConsumer(c, self.gpu, self.calls) for name, c in configs.items()
        }
        by_host = {
            c.url.removeprefix("http://").encode(): self.consumers[name]
            for name, c in configs.items()
        }
        self.stub = StubTreq(ByHost(by_host))
        self.control = ConsumerControl(cast(HTTPClient, self.stub), self.as_time)
        self.events = EventBus(self.as_time)
        self.published: list[Event] = []
        self.events.subscribe(self.published.append)
        self.registry = Registry(configs, self.as_time, self.events)
        for name in configs:
            self.registry[name].healthy = True
        self.stats = SchedulerStats()
        self.room = RoomMaker(
            registry=self.registry,
            gpu=self.gpu,
            control=self.control,
            clock=self.as_time,
            gpu_config=gpu_config or GpuConfig(cushion_mib=CUSHION),
            config=scheduler or SchedulerConfig(max_evictions=5, free_wait_s=10.0),
            stats=self.stats,
            events=self.events,
        )

    @property
    def as_time(self) -> IReactorTime:
        return cast(IReactorTime, self.clock)

    def resident(self, name: str, last_used_at: float | None = None) -> None:
        """``name`` is loaded, as the broker and the GPU both see it."""
        state = self.registry[name]
        self.registry.mark_loaded(name)
        state.last_used_at = last_used_at
        self.gpu.loaded(name, state.config.vram_resident_mib)

    def absent(self, name: str) -> None:
        """The broker knows ``name`` is unloaded."""
        self.registry.mark_unloaded(name)

    def prepare(self, name: str) -> Deferred[None]:
        return self.room.prepare(name)

    def run(self, d: Deferred[Any], until: float) -> float:
        """Move the clock from one scheduled call to the next, up to ``until``, while ``d`` has
        not fired; returns the time reached."""
        self.stub.flush()
        while not d.called:
            pending = [c.getTime() for c in self.clock.getDelayedCalls()]
            if not pending or min(pending) > until + EPSILON:
                break
            self.clock.advance(max(0.0, min(pending) - self.clock.seconds()))
            self.stub.flush()
        return self.clock.seconds()

    def advance_to(self, when: float) -> None:
        """Run every call scheduled up to ``when``, then set the clock to it."""
        self.run(Deferred(), when)
        self.clock.advance(max(0.0, when - self.clock.seconds()))
        self.stub.flush()

    def actions(self, action: str) -> list[str]:
        """The consumers that received an ``action`` call, in order."""
        return [c.consumer for c in self.calls if c.action == action]

    def timed(self, action: str) -> list[tuple[str, float]]:
        return [(c.consumer, c.at) for c in self.calls if c.action == action]


class RoomTestCase(SynchronousTestCase):
    """Shared set-up: a Harness with SPEC's consumers on a 16 GiB card; log events captured."""

    def setUp(self) -> None:
        self.h = Harness()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def scheduler_error(self, d: Deferred[Any], consumer: str) -> BrokerError:
        """The BrokerError ``d`` failed with: a scheduler_error naming ``consumer``."""
        e = self.failureResultOf(d, BrokerError).value
        assert isinstance(e, BrokerError)
        self.assertEqual((e.code, e.consumer), ("scheduler_error", consumer))
        self.assertIn(consumer, e.message)
        return e

    def evictions_logged(self) -> list[LogEvent]:
        return [
            e for e in self.events
            if e.get("log_namespace") == "mgpu.room" and "victim" in e and "after" in e
        ]  # fmt: skip

    def big_card_scene(
        self, *consumers: ConsumerConfig, scheduler: SchedulerConfig | None = None
    ) -> None:
        """A 24 GiB card: comfyui (used at 1), vllm (used at 2) and whisper loaded, 600 MiB used
        outside the broker: 2476 MiB free, too little for mvoice (3056 MiB)."""
        self.h = Harness(consumers or EVERYONE, total_mib=24 * GIB, scheduler=scheduler)
        self.h.gpu.other_mib = 600
        self.h.resident("comfyui", last_used_at=1.0)
        self.h.resident("vllm", last_used_at=2.0)
        self.h.resident("whisper")
        self.h.absent("mvoice")


class NoRoomNeededTests(RoomTestCase):
    """Targets that need no eviction."""

    def test_loaded_target_causes_no_unload_and_no_load(self) -> None:
        """A target the broker knows is loaded is ready at once: no unload, no load, even with
        every other consumer loaded and no GPU reading to be had."""
        self.h = Harness(total_mib=16 * GIB)
        self.h.gpu.ok = False
        for name in ("comfyui", "whisper", "mvoice"):
            self.h.resident(name)
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.calls, [])
        self.assertEqual((self.h.stats.evictions, self.h.stats.loads), (0, 0))

    def test_fits_already_only_loads(self) -> None:
        """An unloaded target that fits in the free memory is loaded without unloading anyone."""
        self.h.resident("comfyui", last_used_at=1.0)
        self.h.absent("mvoice")
        self.assertGreaterEqual(self.h.gpu.free_mib, 2800 + CUSHION)
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual([(c.consumer, c.action) for c in self.h.calls], [("mvoice", "load")])
        self.assertEqual(self.h.stats.evictions, 0)
        self.assertIs(self.h.registry["comfyui"].loaded, True)


class EvictionTests(RoomTestCase):
    """Who is unloaded to make room, and how."""

    def test_comfyui_unloaded_for_mvoice_on_16_gib(self) -> None:
        """comfyui (13 GiB) is unloaded once through its /free route and body to fit mvoice
        (2.8 GiB) on a 16 GiB card with whisper resident; then mvoice is loaded once."""
        self.h.resident("comfyui", last_used_at=5.0)
        self.h.resident("whisper")
        self.h.absent("mvoice")
        self.assertLess(self.h.gpu.free_mib, 2800 + CUSHION)
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(
            [(c.consumer, c.method, c.path, c.body) for c in self.h.calls],
            [
                ("comfyui", "POST", "/free", {"unload_models": True, "free_memory": True}),
                ("mvoice", "POST", "/api/admin/load", {"voice": "default"}),
            ],
        )
        self.assertEqual((self.h.stats.evictions, self.h.stats.loads), (1, 1))
        self.assertIs(self.h.registry["comfyui"].loaded, False)
        self.assertIs(self.h.registry["mvoice"].loaded, True)
        self.assertIs(self.h.registry["whisper"].loaded, True)

    def test_needless_lru_victim_kept(self) -> None:
        """mvoice is least recently used, but unloading it would not spare any of the others:
        vllm alone makes room for comfyui, so only vllm is unloaded."""
        self.h = Harness(total_mib=24 * GIB)
        self.h.gpu.other_mib = 4000
        self.h.resident("mvoice", last_used_at=1.0)
        self.h.resident("vllm", last_used_at=2.0)
        self.h.resident("whisper")
        self.h.absent("comfyui")
        self.successResultOf(self.h.prepare("comfyui"))
        self.assertEqual(self.h.actions("unload"), ["vllm"])
        self.assertIs(self.h.registry["mvoice"].loaded, True)

    def test_victim_removed_by_a_reload_mid_unload(self) -> None:
        """A reload that removes the victim while its unload is out: the unload's answer
        concerns nobody any more, and making room goes on without a crash."""
        self.h = Harness(total_mib=16 * GIB)
        self.h.resident("comfyui")
        self.h.absent("mvoice")
        self.h.consumers["comfyui"].mode["unload"] = "hang"
        d = self.h.prepare("mvoice")
        self.h.stub.flush()
        self.h.registry.reconfigure({c.name: c for c in EVERYONE if c.name != "comfyui"})
        self.h.consumers["comfyui"].finish_held()
        self.h.run(d, until=30.0)
        self.successResultOf(d)
        self.assertEqual(self.h.actions("load"), ["mvoice"])
        self.assertIsNone(self.h.registry.get("comfyui"))

    def test_coexistent_lru_passed_over_declared_on_its_side(self) -> None:
        """vllm, least recently used but declaring it may coexist with mvoice, is not unloaded;
        comfyui is."""
        self.big_card_scene(
            *(c for c in EVERYONE if c.name != "vllm"),
            evolve(VLLM, can_coexist_with=frozenset({"mvoice"})),
        )
        self.h.registry["vllm"].last_used_at = 0.5
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.assertIs(self.h.registry["vllm"].loaded, True)

    def test_coexistent_lru_passed_over_declared_on_target_side(self) -> None:
        """vllm, least recently used, is not unloaded when mvoice declares it may coexist with
        it; comfyui is."""
        self.big_card_scene(
            *(c for c in EVERYONE if c.name != "mvoice"),
            evolve(MVOICE, can_coexist_with=frozenset({"ollama", "vllm"})),
        )
        self.h.registry["vllm"].last_used_at = 0.5
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["comfyui"])

    def test_lru_first(self) -> None:
        """Of two possible victims, the least recently used is unloaded, and only it."""
        self.big_card_scene()
        self.h.registry["comfyui"].last_used_at = 9.0
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["vllm"])
        self.assertIs(self.h.registry["comfyui"].loaded, True)

    def test_never_used_first(self) -> None:
        """A consumer never used goes before one used long ago."""
        self.big_card_scene()
        self.h.registry["vllm"].last_used_at = None
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["vllm"])

    def test_vram_managed_never_unloaded(self) -> None:
        """ollama (vram_managed, with an unload route, never used) is passed over for comfyui;
        vllm is unloaded instead."""
        self.h = Harness(total_mib=24 * GIB)
        self.h.gpu.other_mib = 600
        self.h.resident("ollama")
        self.h.resident("vllm", last_used_at=5.0)
        self.h.resident("whisper", last_used_at=6.0)
        self.h.absent("comfyui")
        self.successResultOf(self.h.prepare("comfyui"))
        self.assertEqual(self.h.actions("unload"), ["vllm"])
        self.assertIs(self.h.registry["ollama"].loaded, True)

    def test_vram_managed_alone_never_fits(self) -> None:
        """When only a vram_managed consumer could free enough, the target fails at once and
        ollama is not unloaded."""
        self.h.resident("ollama")
        self.h.resident("whisper")
        self.h.absent("comfyui")
        self.scheduler_error(self.h.prepare("comfyui"), "comfyui")
        self.assertEqual(self.h.calls, [])

    def test_without_unload_route_never_unloaded(self) -> None:
        """whisper (no unload route, never used, not coexistent with comfyui) is neither called
        nor a logged candidate; vllm is unloaded instead."""
        self.h = Harness(total_mib=24 * GIB)
        self.h.gpu.other_mib = 600
        self.h.resident("whisper")
        self.h.resident("ollama")
        self.h.resident("vllm", last_used_at=5.0)
        self.h.absent("comfyui")
        self.successResultOf(self.h.prepare("comfyui"))
        self.assertEqual([c.consumer for c in self.h.calls], ["vllm"])
        [event] = self.evictions_logged()
        self.assertEqual(event["candidates"], ["vllm"])

    def test_busy_never_unloaded(self) -> None:
        """vllm, least recently used but running a request, is not unloaded; comfyui is."""
        self.big_card_scene()
        self.h.registry["vllm"].last_used_at = None
        self.h.registry["vllm"].in_flight = 1
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["comfyui"])

    def test_target_that_never_fits_fails_at_once(self) -> None:
        """comfyui cannot fit on 16 GiB even with mvoice gone beside ollama: scheduler_error
        naming it at once, nothing unloaded, nothing loaded."""
        self.h.resident("mvoice", last_used_at=1.0)
        self.h.resident("ollama")
        self.h.absent("comfyui")
        e = self.scheduler_error(self.h.prepare("comfyui"), "comfyui")
        self.assertIn(str(13000 + CUSHION), e.message)
        self.assertEqual(self.h.calls, [])
        self.assertEqual(self.h.stats.evictions, 0)
        self.assertIs(self.h.registry["mvoice"].loaded, True)


class FreeWaitTests(RoomTestCase):
    """Waiting for unloaded memory to show free."""

    def test_memory_freeing_later_waits_without_second_victim(self) -> None:
        """Memory freeing 1.5 s after comfyui's unload answers costs exactly one unload, and
        prepare completes once it frees: not before, within one poll interval after."""
        self.big_card_scene()
        self.h.gpu.free_delay["comfyui"] = 1.5
        d = self.h.prepare("mvoice")
        [(_, answered)] = self.h.timed("unload")
        self.h.advance_to(answered + 1.5 - 0.01)
        self.assertNoResult(d)
        done = self.h.run(d, until=answered + 5.0)
        self.successResultOf(d)
        self.assertGreaterEqual(done - answered, 1.5 - EPSILON)
        self.assertLessEqual(done - answered, 1.5 + FREE_POLL_S + EPSILON)
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.assertEqual(self.h.actions("load"), ["mvoice"])
        self.assertEqual(self.h.stats.evictions, 1)

    def test_memory_never_freeing_moves_to_next_victim(self) -> None:
        """When comfyui's memory does not free within free_wait_s (10 s), vllm is unloaded next,
        no sooner."""
        self.big_card_scene()
        self.h.gpu.free_delay["comfyui"] = None
        d = self.h.prepare("mvoice")
        self.h.advance_to(9.8)
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.h.run(d, until=30.0)
        self.successResultOf(d)
        [(_, first), (second_victim, second)] = self.h.timed("unload")
        self.assertEqual(second_victim, "vllm")
        self.assertGreater(second - first, 10.0 - FREE_POLL_S - EPSILON)
        self.assertLessEqual(second - first, 10.0 + EPSILON)
        self.assertEqual(self.h.stats.evictions, 2)

    def test_next_victim_as_soon_as_first_victims_memory_frees(self) -> None:
        """When the first victim's memory has freed and the target still does not fit, the next
        victim is unloaded within one poll interval, not after free_wait_s."""
        self.h = Harness(total_mib=24 * GIB)
        self.h.gpu.other_mib = 8000  # vllm alone is not enough either: both must go
        self.h.resident("mvoice", last_used_at=1.0)
        self.h.resident("vllm", last_used_at=2.0)
        self.h.resident("whisper")
        self.h.absent("comfyui")
        self.h.gpu.free_delay["mvoice"] = 1.0
        self.assertLess(self.h.gpu.free_mib + 2800, 13000 + CUSHION)  # one victim is not enough
        d = self.h.prepare("comfyui")
        self.h.run(d, until=30.0)
        self.successResultOf(d)
        [(first_victim, first), (second_victim, second)] = self.h.timed("unload")
        self.assertEqual((first_victim, second_victim), ("mvoice", "vllm"))
        self.assertGreaterEqual(second - first, 1.0 - EPSILON)
        self.assertLessEqual(second - first, 1.0 + FREE_POLL_S + EPSILON)
        self.assertEqual(self.h.stats.evictions, 2)

    def test_free_wait_counts_from_the_unload_answer(self) -> None:
        """A slow unload (8 s to answer) still gets its full free_wait_s for the memory to free
        afterwards: memory freeing 3 s after the answer fits the target without another victim."""
        self.big_card_scene()
        self.h.consumers["comfyui"].mode["unload"] = "hang"
        self.h.gpu.free_delay["comfyui"] = 3.0
        d = self.h.prepare("mvoice")
        self.h.advance_to(8.0)
        self.h.consumers["comfyui"].finish_held()
        self.h.stub.flush()
        done = self.h.run(d, until=30.0)
        self.successResultOf(d)
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.assertLessEqual(done, 11.0 + FREE_POLL_S + EPSILON)

    def test_polls_fresh_readings(self) -> None:
        """While waiting, the GPU is read afresh every poll interval, not once after a sleep."""
        self.big_card_scene()
        self.h.gpu.free_delay["comfyui"] = 1.0
        d = self.h.prepare("mvoice")
        self.h.run(d, until=5.0)
        self.successResultOf(d)
        gaps = [b - a for a, b in zip(self.h.gpu.reads[1:], self.h.gpu.reads[2:], strict=False)]
        self.assertGreaterEqual(len(gaps), 9)
        for gap in gaps:
            self.assertAlmostEqual(gap, FREE_POLL_S, delta=EPSILON)


class FailedEvictionTests(RoomTestCase):
    """Unloads that fail, and running out of victims or tries."""

    def test_failed_unload_tries_next_victim(self) -> None:
        """comfyui's unload answering 500 moves on to vllm at once; comfyui stays loaded and only
        vllm counts as an eviction."""
        self.big_card_scene()
        self.h.consumers["comfyui"].mode["unload"] = "fail"
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.timed("unload"), [("comfyui", 0.0), ("vllm", 0.0)])
        self.assertIs(self.h.registry["comfyui"].loaded, True)
        self.assertIs(self.h.registry["vllm"].loaded, False)
        self.assertEqual(self.h.stats.evictions, 1)
        [warning] = [e for e in self.events if e.get("log_level") is LogLevel.warn]
        self.assertEqual((warning["target"], warning["victim"]), ("mvoice", "comfyui"))
        self.assertIn("HTTP 500", warning["error"])

    def test_hanging_unload_tries_next_victim_after_timeout(self) -> None:
        """comfyui's unload not answering within its timeout_s (60 s) moves on to vllm then."""
        self.big_card_scene()
        self.h.consumers["comfyui"].mode["unload"] = "hang"
        d = self.h.prepare("mvoice")
        self.h.advance_to(59.9)
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.h.run(d, until=120.0)
        self.successResultOf(d)
        self.assertEqual(self.h.timed("unload")[1][0], "vllm")
        self.assertAlmostEqual(self.h.timed("unload")[1][1], 60.0, delta=EPSILON)
        self.assertIs(self.h.registry["comfyui"].loaded, True)

    def test_no_victim_left(self) -> None:
        """Every unload failing ends in scheduler_error naming the target; nothing is loaded."""
        self.big_card_scene()
        self.h.consumers["comfyui"].mode["unload"] = "fail"
        self.h.consumers["vllm"].mode["unload"] = "fail"
        e = self.scheduler_error(self.h.prepare("mvoice"), "mvoice")
        self.assertIn("no consumer left", e.message)
        self.assertEqual(self.h.actions("unload"), ["comfyui", "vllm"])
        self.assertEqual(self.h.actions("load"), [])
        self.assertEqual(self.h.stats.evictions, 0)

    def test_memory_never_freeing_and_no_victim_left(self) -> None:
        """Unloading every victim without the memory freeing ends in scheduler_error after
        free_wait_s each."""
        self.big_card_scene()
        self.h.gpu.free_delay.update(comfyui=None, vllm=None)
        d = self.h.prepare("mvoice")
        self.h.run(d, until=60.0)
        self.scheduler_error(d, "mvoice")
        self.assertEqual(self.h.actions("unload"), ["comfyui", "vllm"])
        self.assertEqual(self.h.actions("load"), [])
        self.assertGreater(self.h.clock.seconds(), 2 * (10.0 - FREE_POLL_S) - EPSILON)

    def test_max_evictions_reached(self) -> None:
        """With max_evictions 1, comfyui's memory not freeing ends in scheduler_error without
        trying vllm."""
        self.big_card_scene(scheduler=SchedulerConfig(max_evictions=1, free_wait_s=10.0))
        self.h.gpu.free_delay["comfyui"] = None
        d = self.h.prepare("mvoice")
        self.h.run(d, until=60.0)
        e = self.scheduler_error(d, "mvoice")
        self.assertIn("max_evictions", e.message)
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.assertIs(self.h.registry["vllm"].loaded, True)

    def test_failed_unloads_count_toward_max_evictions(self) -> None:
        """An unload that failed is a try: with max_evictions 1, comfyui's 500 ends it."""
        self.big_card_scene(scheduler=SchedulerConfig(max_evictions=1, free_wait_s=10.0))
        self.h.consumers["comfyui"].mode["unload"] = "fail"
        e = self.scheduler_error(self.h.prepare("mvoice"), "mvoice")
        self.assertIn("max_evictions", e.message)
        self.assertEqual(self.h.actions("unload"), ["comfyui"])


class AccountingTests(RoomTestCase):
    """Without a GPU reading: the broker's own accounting, or a scheduler_error."""

    def accounting(self, total_mib: int | None) -> None:
        self.h = Harness(gpu_config=GpuConfig(cushion_mib=CUSHION, total_mib=total_mib))
        self.h.gpu.ok = False

    def test_accounting_decides_an_eviction(self) -> None:
        """With no reading and total_mib 16384, comfyui and whisper believed loaded (14500 MiB)
        leave 1884 MiB: comfyui is unloaded, then mvoice fits and is loaded."""
        self.accounting(16 * GIB)
        self.h.resident("comfyui", last_used_at=1.0)
        self.h.resident("whisper")
        self.h.absent("mvoice")
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(
            [(c.consumer, c.action) for c in self.h.calls],
            [("comfyui", "unload"), ("mvoice", "load")],
        )
        self.assertEqual(self.h.clock.seconds(), 0.0)

    def test_accounting_two_victims_without_waiting(self) -> None:
        """With no reading, the accounting frees a victim's size as its unload answers, so a
        second victim follows at once, with no wait for memory the broker cannot see."""
        self.accounting(15 * GIB)  # 5560 MiB free: vllm alone is not enough
        self.h.resident("mvoice", last_used_at=1.0)
        self.h.resident("vllm", last_used_at=2.0)
        self.h.absent("comfyui")
        self.successResultOf(self.h.prepare("comfyui"))
        self.assertEqual(self.h.timed("unload"), [("mvoice", 0.0), ("vllm", 0.0)])
        self.assertEqual(self.h.clock.seconds(), 0.0)

    def test_accounting_decides_no_eviction(self) -> None:
        """With no reading and total_mib 16384, comfyui alone believed loaded leaves 3384 MiB,
        enough for mvoice's 3056: nothing is unloaded."""
        self.accounting(16 * GIB)
        self.h.resident("comfyui", last_used_at=1.0)
        self.h.absent("whisper")
        self.h.absent("mvoice")
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), [])
        self.assertEqual(self.h.actions("load"), ["mvoice"])

    def test_accounting_never_fits(self) -> None:
        """With no reading, the accounting also fails a target that could never fit at once."""
        self.accounting(8 * GIB)
        self.h.resident("mvoice", last_used_at=1.0)
        self.h.absent("comfyui")
        self.scheduler_error(self.h.prepare("comfyui"), "comfyui")
        self.assertEqual(self.h.calls, [])

    def test_no_reading_and_no_total_fails(self) -> None:
        """With no reading and no gpu.total_mib, a target needing room fails with scheduler_error
        saying so, and nothing is unloaded."""
        self.accounting(None)
        self.h.resident("comfyui", last_used_at=1.0)
        self.h.absent("mvoice")
        e = self.scheduler_error(self.h.prepare("mvoice"), "mvoice")
        self.assertIn("no GPU reading", e.message)
        self.assertIn("NVML: driver not loaded", e.message)
        self.assertIn("gpu.total_mib", e.message)
        self.assertEqual(self.h.calls, [])


class EnsureLoadedTests(RoomTestCase):
    """Calling the target's load route."""

    def test_unloaded_with_load_route_loaded_once(self) -> None:
        """A target known unloaded with a load route gets one load call with its method, path and
        body; the registry then shows it loaded and stats.loads is 1."""
        self.h.absent("mvoice")
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(
            [(c.consumer, c.method, c.path, c.body) for c in self.h.calls],
            [("mvoice", "POST", "/api/admin/load", {"voice": "default"})],
        )
        self.assertIs(self.h.registry["mvoice"].loaded, True)
        self.assertEqual(self.h.stats.loads, 1)

    def test_loaded_unknown_not_loaded(self) -> None:
        """A target whose loaded state is unknown (None) gets no load call."""
        self.assertIsNone(self.h.registry["mvoice"].loaded)
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.calls, [])
        self.assertEqual(self.h.stats.loads, 0)

    def test_no_load_route_not_loaded(self) -> None:
        """A target without a load route (comfyui cold-starts on its first request) gets no load
        call."""
        self.h.absent("comfyui")
        self.successResultOf(self.h.prepare("comfyui"))
        self.assertEqual(self.h.calls, [])
        self.assertEqual(self.h.stats.loads, 0)

    def test_failed_load_is_scheduler_error(self) -> None:
        """A load answering 500 is a scheduler_error; the target stays unloaded and healthy."""
        self.h.absent("mvoice")
        self.h.consumers["mvoice"].mode["load"] = "fail"
        e = self.scheduler_error(self.h.prepare("mvoice"), "mvoice")
        self.assertIn("HTTP 500", e.message)
        self.assertIs(self.h.registry["mvoice"].loaded, False)
        self.assertIs(self.h.registry["mvoice"].healthy, True)
        self.assertEqual(self.h.stats.loads, 0)

    def test_refused_load_is_consumer_unreachable(self) -> None:
        """A load whose connection is refused is consumer_unreachable, and the registry marks the
        target unhealthy with the reason."""
        self.h.absent("mvoice")
        refusing = ConsumerControl(HTTPClient(cast(IAgent, _RefusingAgent())), self.h.as_time)
        room = evolve(self.h.room, control=refusing)
        e = self.failureResultOf(room.prepare("mvoice"), BrokerError).value
        assert isinstance(e, BrokerError)
        self.assertEqual((e.code, e.consumer), ("consumer_unreachable", "mvoice"))
        self.assertIs(self.h.registry["mvoice"].healthy, False)
        self.assertIn("connection refused", self.h.registry["mvoice"].last_error or "")
        self.assertIs(self.h.registry["mvoice"].loaded, False)
        self.assertEqual(self.h.stats.loads, 0)

    def test_load_after_eviction(self) -> None:
        """The load is called only after the victim's memory shows free."""
        self.big_card_scene()
        self.h.gpu.free_delay["comfyui"] = 2.0
        d = self.h.prepare("mvoice")
        self.h.run(d, until=5.0)
        self.successResultOf(d)
        [(_, unloaded_at)] = self.h.timed("unload")
        [(_, loaded_at)] = self.h.timed("load")
        self.assertGreaterEqual(loaded_at - unloaded_at, 2.0 - EPSILON)


class EvictionLogTests(RoomTestCase):
    """The eviction decision in the log."""

    def test_eviction_logged_with_candidates_victim_free_and_time(self) -> None:
        """One info event per eviction names the target, the need, the candidates in order, the
        victim, free memory before and after, and the time it took."""
        self.big_card_scene()
        self.h.gpu.free_delay["comfyui"] = 1.5
        d = self.h.prepare("mvoice")
        self.h.run(d, until=5.0)
        self.successResultOf(d)
        [event] = self.evictions_logged()
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["target"], "mvoice")
        self.assertEqual(event["need"], 2800 + CUSHION)
        self.assertEqual(event["candidates"], ["comfyui", "vllm"])
        self.assertEqual(event["victim"], "comfyui")
        self.assertEqual(event["before"], 24 * GIB - 600 - 13000 - 7000 - 1500)
        self.assertEqual(event["after"], 24 * GIB - 600 - 7000 - 1500)
        self.assertGreaterEqual(event["took"], 1.5 - EPSILON)
        self.assertLessEqual(event["took"], 1.5 + FREE_POLL_S + EPSILON)
        text = formatEvent(event)
        for part in ("mvoice", "comfyui, vllm", "victim comfyui", "2476", "15476"):
            self.assertIn(part, text.replace("'", ""))


class RoomEventTests(RoomTestCase):
    """``evict`` and ``load`` events published by make_room, ensure_loaded and load."""

    def published(self, kind: str) -> list[dict[str, object]]:
        return [dict(e.data) for e in self.h.published if e.kind == kind]

    def test_evict_event(self) -> None:
        """One evict event per victim: victim, target, why, MiB freed, seconds until free (from
        the unload's answer) and how long the victim had been loaded."""
        self.big_card_scene()  # comfyui seen loaded at 0
        self.h.gpu.free_delay["comfyui"] = 1.5
        self.h.clock.advance(100)
        d = self.h.prepare("mvoice")
        self.h.run(d, until=110.0)
        self.successResultOf(d)
        [evict] = self.published("evict")
        free_s = evict.pop("free_s")
        assert isinstance(free_s, float)
        self.assertGreaterEqual(free_s, 1.5 - EPSILON)
        self.assertLessEqual(free_s, 1.5 + FREE_POLL_S + EPSILON)
        self.assertEqual(
            evict,
            {"consumer": "comfyui", "target": "mvoice",
             "reason": "mvoice needs 3056 MiB, 2476 MiB were free",
             "freed_mib": 13000, "age_s": 100.0},
        )  # fmt: skip

    def test_evict_age_from_the_load_that_made_it_resident(self) -> None:
        """age_s counts from when the victim became loaded, not from a later mark_loaded."""
        self.big_card_scene()
        self.h.clock.advance(40)
        self.h.registry.mark_loaded("comfyui")  # served a request: still the same load
        self.h.clock.advance(60)
        d = self.h.prepare("mvoice")
        self.h.run(d, until=110.0)
        [evict] = self.published("evict")
        self.assertEqual(evict["age_s"], 100.0)

    def test_freed_mib_when_memory_never_frees(self) -> None:
        """A victim whose memory never shows free is published with what did free (nothing)."""
        self.big_card_scene()
        self.h.gpu.free_delay["comfyui"] = None
        d = self.h.prepare("mvoice")
        self.h.run(d, until=60.0)
        evicts = self.published("evict")
        self.assertEqual([e["consumer"] for e in evicts], ["comfyui", "vllm"])
        self.assertEqual([e["freed_mib"] for e in evicts], [0, 7000])
        self.assertGreaterEqual(cast(float, evicts[0]["free_s"]), 10.0 - FREE_POLL_S - EPSILON)

    def test_failed_unload_is_no_evict_event(self) -> None:
        """A victim whose unload fails is not published as evicted."""
        self.big_card_scene()
        self.h.consumers["comfyui"].mode["unload"] = "fail"
        d = self.h.prepare("mvoice")
        self.h.run(d, until=60.0)
        self.successResultOf(d)
        self.assertEqual([e["consumer"] for e in self.published("evict")], ["vllm"])

    def test_load_event_with_time_taken(self) -> None:
        """ensure_loaded's load publishes a load event with reason request and the seconds the
        load route took."""
        self.h.absent("mvoice")
        self.h.consumers["mvoice"].mode["load"] = "hang"
        d = self.h.prepare("mvoice")
        self.h.stub.flush()
        self.h.clock.advance(2.5)
        self.h.consumers["mvoice"].finish_held()
        self.h.stub.flush()
        self.successResultOf(d)
        self.assertEqual(
            self.published("load"), [{"consumer": "mvoice", "reason": "request", "took_s": 2.5}]
        )

    def test_load_with_reason(self) -> None:
        """load(name, reason) publishes the reason given."""
        d = Deferred.fromCoroutine(self.h.room.load("vllm", "admin"))
        self.h.stub.flush()
        self.successResultOf(d)
        [load] = self.published("load")
        self.assertEqual((load["consumer"], load["reason"]), ("vllm", "admin"))

    def test_failed_load_is_no_load_event(self) -> None:
        """A load that fails publishes nothing."""
        self.h.absent("mvoice")
        self.h.consumers["mvoice"].mode["load"] = "fail"
        self.failureResultOf(self.h.prepare("mvoice"), BrokerError)
        self.assertEqual(self.h.published, [])

    def test_events_in_order(self) -> None:
        """Evictions are published before the load they made room for."""
        self.big_card_scene()
        d = self.h.prepare("mvoice")
        self.h.run(d, until=10.0)
        self.successResultOf(d)
        self.assertEqual([e.kind for e in self.h.published], ["evict", "load"])
        self.assertEqual([e.id for e in self.h.published], [1, 2])

    def test_no_room_needed_no_events(self) -> None:
        """A target already loaded publishes nothing."""
        self.h.resident("mvoice")
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.published, [])


RECLAIMING_OLLAMA = evolve(OLLAMA, ollama=OllamaConfig(reclaim=True))
LLAMA = OllamaModel("llama3:8b", 6000, "2026-11-26T22:05:00Z")


#: The clock at the reclaim tests' start: LLAMA expires 300 s later.
T_NOW = datetime(2026, 11, 26, 22, 0, 0, tzinfo=UTC).timestamp()


class FootprintTests(RoomTestCase):
    """Room is made for the larger of the configured and learned sizes (SPEC 9.3)."""

    def learned(self, rule: str) -> Harness:
        h = Harness(scheduler=SchedulerConfig(footprint=rule))
        h.room.learned = LearnedSizes(None, {"mvoice": 4000})
        h.resident("comfyui")  # 13000 of 16384: 3384 free
        h.absent("mvoice")
        return h

    def test_learned_size_makes_more_room(self) -> None:
        """mvoice configured at 2800 but seen holding 4000: ComfyUI must go first."""
        h = self.learned("max")
        d = h.prepare("mvoice")
        h.run(d, 30.0)
        self.successResultOf(d)
        self.assertEqual(h.actions("unload"), ["comfyui"])

    def test_configured_rule_keeps_the_typed_size(self) -> None:
        """footprint: configured: 2800 + 256 fits in 3384, nothing is unloaded."""
        h = self.learned("configured")
        d = h.prepare("mvoice")
        h.run(d, 30.0)
        self.successResultOf(d)
        self.assertEqual(h.actions("unload"), [])


class ReclaimTests(RoomTestCase):
    """The last resort: an idle Ollama with reclaim frees its models (SPEC 9.4)."""

    def setUp(self) -> None:
        super().setUp()
        self.h = self.llama_held(RECLAIMING_OLLAMA, COMFYUI)

    @staticmethod
    def llama_held(ollama: ConsumerConfig, target: ConsumerConfig) -> Harness:
        """whisper and ``ollama`` (holding LLAMA) resident: 7500 of 16384 held by nothing
        that unloads; ``target`` not loaded."""
        h = Harness((MVOICE, WHISPER, ollama, COMFYUI, *([target] if target != COMFYUI else [])))
        h.clock.advance(T_NOW)
        for name in ("whisper", "ollama"):
            h.resident(name)
        h.registry["ollama"].models = (LLAMA,)
        h.absent(target.name)
        return h

    def test_reclaimed_when_nothing_else_can_make_room(self) -> None:
        """ComfyUI needs 13256, 8884 free and no candidate: Ollama is asked to free
        llama3 (keep_alive 0), its memory frees, an evict event says reclaim."""
        d = self.h.prepare("comfyui")
        self.h.run(d, 30.0)
        self.successResultOf(d)
        [call] = [c for c in self.h.calls if c.consumer == "ollama"]
        self.assertEqual(
            (call.path, call.body), ("/api/generate", {"model": "llama3:8b", "keep_alive": 0})
        )
        [evict] = [e for e in self.h.published if e.kind == "evict"]
        self.assertEqual((evict.data["consumer"], evict.data["reason"]), ("ollama", "reclaim"))
        self.assertEqual(self.h.registry["ollama"].loaded, False)
        self.assertEqual(self.h.stats.evictions, 1)

    def test_not_while_ollama_has_work(self) -> None:
        """A request of Ollama in flight or queued: no reclaim; the error names Ollama, says
        it frees itself, and carries Retry-After until its model expires."""
        self.h.registry["ollama"].queued = 1
        d = self.h.prepare("comfyui")
        self.h.run(d, 30.0)
        error = self.scheduler_error(d, "comfyui")
        self.assertIn("held by", error.message)
        self.assertIn("ollama", error.message)
        self.assertIn("frees itself in 300 s", error.message)
        self.assertEqual(error.headers, {"Retry-After": "300"})
        self.assertEqual([c for c in self.h.calls if c.consumer == "ollama"], [])

    def test_no_reclaim_without_the_key(self) -> None:
        """Without ollama.reclaim the broker never frees Ollama's models: the error names
        Ollama and says to retry when its keep-alive frees them."""
        h = self.llama_held(OLLAMA, COMFYUI)
        d = h.prepare("comfyui")
        h.run(d, 30.0)
        error = self.scheduler_error(d, "comfyui")
        self.assertEqual(h.actions("unload"), [])
        self.assertIn(
            "ollama (6000 MiB, frees itself in 300 s: manages its own memory)", error.message
        )
        self.assertEqual(error.headers, {"Retry-After": "300"})

    def test_other_processes_named(self) -> None:
        """Memory of processes of no consumer is named in the error (pid and MiB)."""
        self.h.registry["ollama"].in_flight = 1
        self.h.gpu.processes = (GpuProcess(4242, 2000),)
        d = self.h.prepare("comfyui")
        self.h.run(d, 30.0)
        self.assertIn(
            "pid 4242 (2000 MiB, not a consumer)", self.scheduler_error(d, "comfyui").message
        )

    def test_reclaim_then_unload(self) -> None:
        """Reclaiming alone is not enough: after it, the usual eviction makes the rest."""
        self.h.resident("mvoice")  # 10300 held: 6084 free
        d = self.h.prepare("comfyui")
        self.h.run(d, 30.0)
        self.successResultOf(d)
        evicted = [
            (e.data["consumer"], e.data["reason"]) for e in self.h.published if e.kind == "evict"
        ]
        self.assertEqual([name for name, _ in evicted], ["ollama", "mvoice"])
        self.assertEqual(evicted[0][1], "reclaim")

    def test_no_reclaim_when_it_could_not_make_room(self) -> None:
        """A target that would not fit even with Ollama's models freed: nothing is freed,
        the error comes at once."""
        h = self.llama_held(RECLAIMING_OLLAMA, consumer("huge", 9000, 15500))
        d = h.prepare("huge")
        h.run(d, 30.0)
        self.scheduler_error(d, "huge")
        self.assertEqual(h.calls, [])


class LearnedLoadTimeTests(RoomTestCase):
    """Each load the broker makes is timed (SPEC 9.6: ``load_s``), and cost eviction uses it."""

    def test_load_time_recorded(self) -> None:
        """A load answered 4 s after its call is learned as 4 s; a failed one is not learned."""
        self.h.absent("mvoice")
        self.h.consumers["mvoice"].mode["load"] = "hang"
        d = self.h.prepare("mvoice")
        self.h.stub.flush()
        self.h.clock.advance(4.0)
        self.h.consumers["mvoice"].finish_held()
        self.h.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.h.registry["mvoice"].load_times.mean, 4.0)
        self.h.absent("mvoice")
        self.h.consumers["mvoice"].mode["load"] = "fail"
        self.failureResultOf(self.h.prepare("mvoice"), BrokerError)
        self.assertEqual(self.h.registry["mvoice"].load_times.recent, (4.0,))

    def test_cost_evicts_the_cheapest_reload_per_mib(self) -> None:
        """comfyui is least recently used, but reloading it costs 20 s for 13000 MiB against
        vllm's 1 s for 7000 MiB: with ``eviction: cost`` vllm goes, with lru comfyui."""
        for eviction, victim in (("cost", "vllm"), ("lru", "comfyui")):
            self.big_card_scene(scheduler=SchedulerConfig(eviction=eviction))
            self.h.registry.record_load("comfyui", 20.0)
            self.h.registry.record_load("vllm", 1.0)
            self.successResultOf(self.h.prepare("mvoice"))
            self.assertEqual(self.h.actions("unload"), [victim], eviction)


class CardRoomTests(RoomTestCase):
    """Room made on one card of several (SPEC 9.5): only its consumers count."""

    def test_only_consumers_on_the_card_are_unloaded(self) -> None:
        """Room for whisper on card 1: mvoice (card 0, least recently used, enough) is left
        alone; ComfyUI (card 1) goes. The event and the log name the card."""
        on_one = [
            evolve(c, gpus=(1,)) for c in (COMFYUI, evolve(WHISPER, can_coexist_with=frozenset()))
        ]
        self.h = Harness([evolve(MVOICE, gpus=(0,)), *on_one])
        self.h.room.card = 1
        self.h.resident("mvoice", last_used_at=1.0)
        self.h.resident("comfyui", last_used_at=5.0)
        self.h.absent("whisper")
        self.successResultOf(self.h.prepare("whisper"))
        self.assertEqual(self.h.actions("unload"), ["comfyui"])
        self.assertIs(self.h.registry["mvoice"].loaded, True)
        [evict] = [e for e in self.h.published if e.kind == "evict"]
        self.assertEqual((evict.data["consumer"], evict.data["gpu"]), ("comfyui", 1))
        [logged] = self.evictions_logged()
        self.assertIn("on GPU 1", formatEvent(logged))

    def test_no_room_names_the_card(self) -> None:
        """When no consumer on the card can make room, the error says which card."""
        self.h = Harness([evolve(MVOICE, gpus=(0,)), evolve(COMFYUI, gpus=(1,))])
        self.h.room.card = 1
        self.h.resident("mvoice")
        self.h.gpu.other_mib = 14000
        self.h.absent("comfyui")
        error = self.scheduler_error(self.h.prepare("comfyui"), "comfyui")
        self.assertIn("(GPU 1)", error.message)
        self.assertEqual(self.h.actions("unload"), [])
