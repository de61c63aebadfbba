"""Tests for mgpu.lifecycle: idle unloading and preloading (SPEC 9.6).

The room tests' Harness supplies a real Registry, ConsumerControl and
RoomMaker over in-memory consumers, a fake GPU and a Clock; a real
GpuScheduler holds the lease.
"""

from __future__ import annotations

from typing import Any, cast

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConfigError, ConsumerConfig
from mgpu.lifecycle import IdleUnloader, Preloader, preload_order
from mgpu.scheduler import GpuScheduler
from mgpu.status import StatusView
from tests.test_config import consumer, document, parse
from tests.test_room import COMFYUI, GIB, MVOICE, VLLM, WHISPER, Harness


def idle(config: ConsumerConfig, seconds: float) -> ConsumerConfig:
    return evolve(config, idle_unload_s=seconds)


class Setting:
    """A Harness, a scheduler over it, and the idle unloader started."""

    def __init__(self, *consumers: ConsumerConfig, total_mib: int = 24 * GIB) -> None:
        self.h = Harness(consumers, total_mib=total_mib)
        self.scheduler = GpuScheduler(
            self.h.registry, self.h.as_time, prepare=self.h.room.prepare, events=self.h.events
        )
        self.unloader = IdleUnloader(
            self.h.registry, self.scheduler, self.h.control, self.h.as_time, self.h.events
        )

    def use(self, name: str, hold: Deferred[None] | None = None) -> Deferred[Any]:
        """A scheduled request of ``name``, answered when ``hold`` fires (at once if None)."""
        return self.scheduler.run(name, lambda lease: hold if hold is not None else succeed(None))

    def unload_events(self) -> list[tuple[object, object]]:
        return [(e.data["consumer"], e.data["reason"]) for e in self.h.published
                if e.kind == "unload"]  # fmt: skip


class IdleUnloadTests(SynchronousTestCase):
    """A consumer loaded and unused for ``idle_unload_s`` is unloaded through its route."""

    def test_unloaded_after_idle(self) -> None:
        """Loaded at 0, never used: unloaded at 60 s, not before; event ``unload``/``idle``."""
        s = Setting(idle(COMFYUI, 60.0))
        s.h.resident("comfyui")
        s.unloader.startService()
        s.h.advance_to(59.0)
        self.assertEqual(s.h.actions("unload"), [])
        s.h.advance_to(60.0)
        self.assertEqual(s.h.actions("unload"), ["comfyui"])
        self.assertIs(s.h.registry["comfyui"].loaded, False)
        self.assertEqual(s.unload_events(), [("comfyui", "idle")])
        self.assertIsNone(s.scheduler.holder)  # the lease was given back

    def test_use_postpones(self) -> None:
        """Used at 50 s: unloaded at 110 s, not 60 s."""
        s = Setting(idle(COMFYUI, 60.0))
        s.h.resident("comfyui")
        s.unloader.startService()
        s.h.advance_to(50.0)
        self.successResultOf(s.use("comfyui"))
        s.h.advance_to(109.0)
        self.assertEqual(s.h.actions("unload"), [])
        s.h.advance_to(110.0)
        self.assertEqual(s.h.timed("unload"), [("comfyui", 110.0)])

    def test_request_in_flight_never_raced(self) -> None:
        """A request running past the delay: no unload until it has ended and the delay
        passed again."""
        s = Setting(idle(COMFYUI, 60.0))
        s.h.resident("comfyui")
        s.unloader.startService()
        hold: Deferred[None] = Deferred()
        s.use("comfyui", hold)
        s.h.advance_to(100.0)
        self.assertEqual(s.h.actions("unload"), [])
        hold.callback(None)
        s.h.advance_to(159.0)
        self.assertEqual(s.h.actions("unload"), [])
        s.h.advance_to(160.0)
        self.assertEqual(s.h.actions("unload"), ["comfyui"])

    def test_queued_request_wins(self) -> None:
        """Another consumer holds the lease when comfyui's unload is due; a comfyui request
        queues behind the unload; the unload, once it holds the lease, sees it and does not
        unload."""
        s = Setting(idle(COMFYUI, 60.0), MVOICE)
        s.h.resident("comfyui")
        s.h.resident("mvoice")
        s.unloader.startService()
        hold: Deferred[None] = Deferred()
        s.use("mvoice", hold)
        s.h.advance_to(60.0)
        s.use("comfyui")
        hold.callback(None)
        s.h.stub.flush()
        self.assertEqual(s.h.actions("unload"), [])
        self.assertIs(s.h.registry["comfyui"].loaded, True)

    def test_without_idle_unload_s_never(self) -> None:
        s = Setting(COMFYUI)
        s.h.resident("comfyui")
        s.unloader.startService()
        s.h.advance_to(10_000.0)
        self.assertEqual(s.h.actions("unload"), [])

    def test_reload_giving_idle_unload_s_is_picked_up(self) -> None:
        """A consumer given ``idle_unload_s`` by a reload gets a timer at the next resync."""
        s = Setting(COMFYUI)
        s.h.resident("comfyui")
        s.unloader.startService()
        s.h.registry.reconfigure({"comfyui": idle(COMFYUI, 5.0)})
        s.h.advance_to(40.0)
        self.assertEqual(s.h.actions("unload"), ["comfyui"])

    def test_stop_cancels_timers(self) -> None:
        s = Setting(idle(COMFYUI, 60.0))
        s.h.resident("comfyui")
        s.unloader.startService()
        s.unloader.stopService()
        self.assertEqual(s.h.clock.getDelayedCalls(), [])


class _Prober:
    """The first probes: answered at once (the Harness's consumers are set healthy)."""

    def __init__(self) -> None:
        self.probed: list[str] = []

    def probe(self, name: str) -> Deferred[None]:
        self.probed.append(name)
        return succeed(None)


class PreloadTests(SynchronousTestCase):
    """``preload: true`` consumers are loaded at start, highest priority first, as room allows."""

    def preloader(self, s: Setting) -> Preloader:
        prober: Any = _Prober()
        return Preloader(s.h.registry, s.scheduler, s.h.room, prober)

    def test_loaded_by_priority_as_room_allows(self) -> None:
        """16 GiB: vllm (priority 4, 7000 MiB) loads first, then mvoice (priority 3) fits; comfyui
        (13000 MiB) no longer fits and is not loaded; nothing is unloaded."""
        s = Setting(
            evolve(COMFYUI, preload=True, priority=2, load=VLLM.load),
            evolve(MVOICE, preload=True, priority=3),
            evolve(VLLM, preload=True, priority=4),
            WHISPER,
            total_mib=16 * GIB,
        )
        for name in ("comfyui", "mvoice", "vllm"):
            s.h.absent(name)
        preloader = self.preloader(s)
        preloader.startService()
        s.h.stub.flush()
        assert preloader.done is not None
        self.successResultOf(preloader.done)
        self.assertEqual(s.h.actions("load"), ["vllm", "mvoice"])
        self.assertEqual(s.h.actions("unload"), [])
        self.assertEqual(
            [(e.data["consumer"], e.data["reason"]) for e in s.h.published if e.kind == "load"],
            [("vllm", "preload"), ("mvoice", "preload")],
        )

    def test_already_loaded_not_loaded_again(self) -> None:
        s = Setting(evolve(MVOICE, preload=True))
        s.h.resident("mvoice")
        preloader = self.preloader(s)
        preloader.startService()
        s.h.stub.flush()
        self.assertEqual(s.h.actions("load"), [])

    def test_order(self) -> None:
        s = Setting(
            evolve(WHISPER, preload=True, priority=1),
            evolve(MVOICE, preload=True, priority=3),
            COMFYUI,
        )
        self.assertEqual(preload_order(s.h.registry), ["mvoice", "whisper"])


class LifecycleConfigTests(SynchronousTestCase):
    """The SPEC 9.6 keys this module reads: defaults, values, and field-named refusals."""

    def test_defaults(self) -> None:
        config = parse(document())
        a = config.consumers["a"]
        self.assertEqual((a.idle_unload_s, a.preload, config.scheduler.eviction),
                         (None, False, "lru"))  # fmt: skip

    def test_values(self) -> None:
        doc = document(scheduler={"eviction": "cost"})
        doc["consumers"]["a"] = consumer(idle_unload_s=300, preload=True)
        config = parse(doc)
        self.assertEqual(
            (config.consumers["a"].idle_unload_s, config.consumers["a"].preload), (300.0, True)
        )
        self.assertEqual(config.scheduler.eviction, "cost")

    def test_refusals_name_the_field(self) -> None:
        for key, value, where in (
            ("idle_unload_s", 0, "consumers.a.idle_unload_s"),
            ("idle_unload_s", "long", "consumers.a.idle_unload_s"),
            ("preload", "yes", "consumers.a.preload"),
        ):
            doc = document()
            doc["consumers"]["a"] = consumer(**{key: value})
            error = self.assertRaises(ConfigError, parse, doc)
            self.assertEqual(error.field, where)
        error = self.assertRaises(ConfigError, parse, document(scheduler={"eviction": "mru"}))
        self.assertEqual(error.field, "scheduler.eviction")


class LifecycleStatusTests(SynchronousTestCase):
    """Each consumer's status entry shows ``load_s``, ``idle_unload_s`` and ``preload``."""

    def test_status_entry(self) -> None:
        s = Setting(idle(COMFYUI, 60.0), MVOICE)
        view = StatusView(cast(Any, s.h.gpu), s.h.registry, s.scheduler)
        first = cast(dict[str, dict[str, object]], view.document()["consumers"])
        self.assertEqual(
            [(first[n]["load_s"], first[n]["idle_unload_s"], first[n]["preload"])
             for n in ("comfyui", "mvoice")],
            [(None, 60.0, False), (None, None, False)],
        )  # fmt: skip
        s.h.registry.record_load("mvoice", 2.0)
        s.h.registry.record_load("mvoice", 3.0)
        later = cast(dict[str, dict[str, object]], view.document()["consumers"])
        self.assertEqual(later["mvoice"]["load_s"], 2.5)
