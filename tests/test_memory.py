"""mgpu.memory and the registry's loaded verdict: what holds the card, in order of trust."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from attrs import evolve
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConsumerConfig, KindPath, OllamaConfig, ProcessConfig
from mgpu.control import ConsumerControl, ProbeResult
from mgpu.footprints import LearnedSizes
from mgpu.gpu import GpuProcess, GpuSnapshot
from mgpu.memory import (
    ConsumerMemory,
    MemoryWatch,
    MergedReadings,
    Observation,
    measure,
    others,
)
from mgpu.ollama import OllamaModel
from mgpu.procs import Attribution, ProcError
from mgpu.registry import Registry

T0 = 1_795_000_000.0


def snapshot(
    processes: tuple[GpuProcess, ...] | None, at: float = T0, unlisted_mib: int = 0
) -> GpuSnapshot:
    return GpuSnapshot(
        source="sim", ok=True, error=None, index=0, name="card", total_mib=16384,
        used_mib=sum(p.used_mib or 0 for p in processes or ()) + unlisted_mib,
        free_mib=None, read_at=datetime.fromtimestamp(at, UTC), processes=processes,
        processes_error=None if processes is not None else "not listed",
    )  # fmt: skip


def consumer(name: str = "comfyui", port: int = 8188, **fields: Any) -> ConsumerConfig:
    return ConsumerConfig(
        name=name, url=f"http://127.0.0.1:{port}",
        paths={"image": KindPath("POST", "/prompt")}, vram_resident_mib=12000, **fields,
    )  # fmt: skip


class FakeTable:
    """A process table: ports to pids, names; ``broken`` makes every lookup fail."""

    def __init__(self, ports: dict[int, set[int]], broken: bool = False) -> None:
        self.ports = ports
        self.broken = broken
        self.named: list[int] = []

    def listening_pids(self, port: int) -> frozenset[int]:
        if self.broken:
            raise ProcError("/proc/net/tcp unreadable")
        return frozenset(self.ports.get(port, ()))

    def unit_pids(self, unit: str) -> frozenset[int]:
        raise ProcError(f"unit {unit} is not running")

    def read_pid_file(self, path: str) -> int:
        raise ProcError(f"cannot read {path}")

    def alive(self, pid: int) -> bool:
        return True

    def descendants(self, pids: frozenset[int]) -> frozenset[int]:
        return pids

    def name(self, pid: int) -> str | None:
        self.named.append(pid)
        return f"proc{pid}"


class Readings:
    def __init__(self, latest: GpuSnapshot) -> None:
        self.latest = latest


class MeasureTests(SynchronousTestCase):
    """A consumer's memory from its attribution and a reading; the rest is other."""

    def test_sum_of_its_processes(self) -> None:
        """The processes found (a server and its runner child) add up."""
        found = Attribution(frozenset({10, 11}), "port", None)
        reading = snapshot((GpuProcess(10, 100), GpuProcess(11, 5900), GpuProcess(99, 700)))
        self.assertEqual(measure(found, reading), ConsumerMemory(6000, (10, 11), "port"))

    def test_unknown_without_processes_or_listing(self) -> None:
        """No pids found, or a reading that lists no processes: the memory is unknown."""
        nobody = Attribution(frozenset(), "port", "nothing listens on port 8188")
        self.assertEqual(
            measure(nobody, snapshot(())),
            ConsumerMemory(None, (), "port", "nothing listens on port 8188"),
        )
        unlisted = measure(Attribution(frozenset({10}), "unit", None), snapshot(None))
        self.assertEqual((unlisted.used_mib, unlisted.error), (None, "not listed"))

    def test_driver_gives_no_figures(self) -> None:
        """Its processes listed without figures (N/A): unknown, and said why."""
        memory = measure(
            Attribution(frozenset({10}), "port", None), snapshot((GpuProcess(10, None),))
        )
        self.assertIsNone(memory.used_mib)
        self.assertIn("does not say", memory.error or "")

    def test_others(self) -> None:
        """Processes of no consumer: their total, the largest first, with names."""
        reading = snapshot((GpuProcess(10, 100), GpuProcess(20, 50), GpuProcess(30, 900)))
        total, rest = others(reading, {10}, FakeTable({}))
        self.assertEqual(total, 950)
        self.assertEqual([(p.pid, p.name, p.used_mib) for p in rest],
                         [(30, "proc30", 900), (20, "proc20", 50)])  # fmt: skip
        self.assertEqual(others(snapshot(None), set(), None), (None, ()))

    def test_holds_model(self) -> None:
        """Loaded by memory from a quarter of the resident size; never with nothing held."""
        self.assertTrue(ConsumerMemory(3000, (1,), "port").holds_model(12000))
        self.assertFalse(ConsumerMemory(2999, (1,), "port").holds_model(12000))
        self.assertFalse(ConsumerMemory(0, (1,), "port").holds_model(0))
        self.assertIsNone(ConsumerMemory(None, (1,), "port").holds_model(12000))


class WatchTests(SynchronousTestCase):
    """MemoryWatch.look: attribution, measurement, learning and its guard."""

    def watch(self, reading: GpuSnapshot, table: FakeTable | None = None) -> MemoryWatch:
        control = cast(ConsumerControl, None)  # no Ollama here: never called
        return MemoryWatch(
            table or FakeTable({8188: {10}}), Readings(reading), LearnedSizes(None), control
        )

    def look(self, watch: MemoryWatch, config: ConsumerConfig | None = None) -> Observation:
        return self.successResultOf(watch.look(config or consumer(), 3.0))

    def test_loaded_learns_its_peak(self) -> None:
        """Holding its model, the consumer is loaded by memory and its peak is learned."""
        watch = self.watch(snapshot((GpuProcess(10, 13500),)))
        seen = self.look(watch)
        self.assertEqual((seen.loaded, seen.memory.used_mib, seen.read_at), (True, 13500, T0))
        self.assertEqual(watch.learned.get("comfyui"), 13500)

    def test_empty_is_no_verdict_while_the_card_hides_memory(self) -> None:
        """Holding nothing, never seen holding anything, on a card whose processes do not
        explain its use (8 GiB unlisted: another pid namespace?): no verdict from memory;
        once learned, nothing held is "not loaded"."""
        watch = self.watch(snapshot((GpuProcess(10, 0),), unlisted_mib=8000))
        self.assertIsNone(self.look(watch).loaded)
        watch.learned.observe("comfyui", 13000, 12000)
        self.assertIs(self.look(watch).loaded, False)

    def test_empty_on_a_card_it_accounts_for_is_not_loaded(self) -> None:
        """Processes that all run here and explain the card's use (within the driver's
        slack): a consumer holding nothing is not loaded, seen before or not."""
        watch = self.watch(snapshot((GpuProcess(10, 0), GpuProcess(20, 3000)), unlisted_mib=500))
        self.assertIs(self.look(watch).loaded, False)

    def test_broken_table_is_an_error_not_a_crash(self) -> None:
        """A /proc that cannot be read: unknown memory with the reason."""
        watch = self.watch(snapshot(()), FakeTable({}, broken=True))
        seen = self.look(watch)
        self.assertEqual((seen.memory.used_mib, seen.memory.source), (None, "port"))
        self.assertIn("unreadable", seen.memory.error or "")

    def test_others_named_once_per_reading(self) -> None:
        """Status polls and scrapes between two readings reuse the other processes' names;
        a new reading, or other attributed pids, reads them again."""
        table = FakeTable({})
        watch = self.watch(snapshot((GpuProcess(10, 100), GpuProcess(20, 50))), table)
        first = watch.others({10})
        self.assertEqual(watch.others({10}), first)
        self.assertEqual(table.named, [20])
        watch.others(set())
        self.assertEqual(table.named, [20, 10, 20])
        cast(Readings, watch._readings).latest = snapshot((GpuProcess(20, 60),))
        self.assertEqual(watch.others(set())[0], 60)
        self.assertEqual(table.named, [20, 10, 20, 20])

    def test_pid_file_source(self) -> None:
        """process.pid_file is used instead of the port, and its failure reported."""
        config = consumer(process=ProcessConfig(pid_file="/run/c.pid"))
        seen = self.look(self.watch(snapshot(())), config)
        self.assertEqual(
            (seen.memory.source, seen.memory.error), ("pid_file", "cannot read /run/c.pid")
        )


class MergedReadingsTests(SynchronousTestCase):
    """Several cards read as one for looking at consumers (SPEC 9.5)."""

    def test_sizes_and_processes_summed(self) -> None:
        """Sizes add up; a process on both cards holds the sum; one listing not known
        (None) makes the sum not known."""
        cards = [
            Readings(snapshot((GpuProcess(10, 7000), GpuProcess(20, 100)))),
            Readings(snapshot((GpuProcess(10, 7000), GpuProcess(30, None)))),
        ]
        merged = MergedReadings(cards).latest
        self.assertEqual((merged.used_mib, merged.total_mib), (14100, 2 * 16384))
        self.assertEqual(merged.processes, (GpuProcess(10, 14000), GpuProcess(20, 100),
                                            GpuProcess(30, None)))  # fmt: skip
        cards[1].latest = snapshot(None)
        self.assertIsNone(MergedReadings(cards).latest.processes)

    def test_consumer_on_two_cards_learns_its_size_per_card(self) -> None:
        """A consumer holding 7000 MiB on each of two cards is loaded and learns 7000: sizes
        are per card."""
        cards = [Readings(snapshot((GpuProcess(10, 7000),))) for _ in range(2)]
        control = cast(ConsumerControl, None)
        watch = MemoryWatch(FakeTable({8188: {10}}), MergedReadings(cards), LearnedSizes(None),
                            control)  # fmt: skip
        seen = self.successResultOf(
            watch.look(evolve(consumer(gpus=(0, 1)), vram_resident_mib=7000), 3)
        )
        self.assertEqual((seen.loaded, seen.memory.used_mib), (True, 14000))
        self.assertEqual(watch.learned.get("comfyui"), 7000)

    def test_driver_slack_counted_per_card(self) -> None:
        """Each card shows 900 MiB no process accounts for (the driver's own): within the
        slack on each card, so a consumer holding nothing is not loaded, although the two
        cards together show more than the slack unlisted."""
        cards = [Readings(snapshot((GpuProcess(20, 100),), unlisted_mib=900)) for _ in range(2)]
        control = cast(ConsumerControl, None)
        watch = MemoryWatch(FakeTable({8188: {10}}), MergedReadings(cards), LearnedSizes(None),
                            control)  # fmt: skip
        self.assertIs(self.successResultOf(watch.look(consumer(), 3)).loaded, False)


def _probe(healthy: bool = True, loaded: bool | None = None) -> ProbeResult:
    return ProbeResult(healthy, loaded, None if healthy else "connection refused")


class TrustOrderTests(SynchronousTestCase):
    """Registry.record_probe: memory, then an Ollama's models, then health, then the record."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        config = consumer()
        ollama = consumer("ollama", 11434, vram_managed=True, ollama=OllamaConfig(reclaim=True))
        self.registry = Registry(
            {"comfyui": config, "ollama": ollama}, cast(IReactorTime, self.clock)
        )

    def seen(self, loaded: bool | None, at: float = T0, **fields: Any) -> Observation:
        memory = ConsumerMemory(13000 if loaded else 0, (10,), "port")
        found = Attribution(frozenset({10}), "port", None)
        return Observation(memory, found, loaded, at, **fields)

    def test_memory_beats_health(self) -> None:
        """Memory says loaded though health says not, and the other way round."""
        self.registry.record_probe("comfyui", 0, _probe(loaded=False), self.seen(True))
        self.assertIs(self.registry["comfyui"].loaded, True)
        self.registry.record_probe("comfyui", 0, _probe(loaded=True), self.seen(False))
        self.assertIs(self.registry["comfyui"].loaded, False)

    def test_no_memory_verdict_falls_back_to_health_then_record(self) -> None:
        """Memory unknown: health's loaded; neither: healthy counts as loaded at first."""
        self.registry.record_probe("comfyui", 0, _probe(loaded=False), self.seen(None))
        self.assertIs(self.registry["comfyui"].loaded, False)
        self.registry.mark_loaded("comfyui")  # a 2xx answer: the broker's own record
        generation = self.registry["comfyui"].generation
        self.registry.record_probe("comfyui", generation, _probe(), self.seen(None))
        self.assertIs(self.registry["comfyui"].loaded, True)

    def test_reading_older_than_the_brokers_event_is_ignored(self) -> None:
        """After an unload, a reading taken before it cannot say it is still loaded."""
        self.registry.mark_unloaded("comfyui")
        generation = self.registry["comfyui"].generation
        self.registry.record_probe("comfyui", generation, _probe(), self.seen(True, at=T0 - 1))
        self.assertIs(self.registry["comfyui"].loaded, False)
        self.registry.record_probe("comfyui", generation, _probe(), self.seen(True, at=T0 + 1))
        self.assertIs(self.registry["comfyui"].loaded, True)

    def test_killed_consumer_is_not_loaded(self) -> None:
        """Down, and no process of it found: it holds nothing (was: loaded beside unhealthy)."""
        self.registry.mark_loaded("comfyui")
        generation = self.registry["comfyui"].generation
        gone = Observation(ConsumerMemory(None, (), "port", "nothing listens on port 8188"))
        self.registry.record_probe("comfyui", generation, _probe(healthy=False), gone)
        state = self.registry["comfyui"]
        self.assertEqual((state.healthy, state.loaded), (False, False))

    def test_ollama_models_decide_without_memory(self) -> None:
        """An Ollama with models is loaded, with none is not; shown in its status entry."""
        model = OllamaModel("llama3:8b", 6000, "2026-12-05T00:05:00Z")
        self.registry.record_probe("ollama", 0, _probe(), self.seen(None, models=(model,)))
        self.assertIs(self.registry["ollama"].loaded, True)
        entry = self.registry.to_json()["ollama"]
        self.assertEqual(entry["models"], [model.to_json()])
        self.registry.record_probe("ollama", 0, _probe(), self.seen(None, models=()))
        self.assertIs(self.registry["ollama"].loaded, False)

    def test_attributed_pids(self) -> None:
        """Every consumer's pids at the last probe, for telling other processes apart."""
        self.registry.record_probe("comfyui", 0, _probe(), self.seen(True))
        self.assertEqual(self.registry.attributed_pids(), {10})
