# -*- test-case-name: tests.test_memory -*-
"""What really holds the card: each consumer's processes, their GPU memory, and the rest.

At each health probe the broker looks past the health route (SPEC 9.3, 9.4):
which processes are the consumer (``mgpu.procs``: its unit, its pid file, or
whoever listens on its port), how much of the card they hold in the latest
reading (``GpuSnapshot.processes``), and for an Ollama its own list of
models (``/api/ps``). The registry trusts that memory before the health
route's word; the learned footprint grows with it; and the memory held by
processes of no consumer is shown, and counted as unmovable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.config import ConsumerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.footprints import LearnedSizes
from mgpu.gpu import GpuProcess, GpuSnapshot
from mgpu.ollama import OllamaModel, read_ps
from mgpu.procs import Attribution, ProcessTable, attribute

log = Logger()

#: How many pids a status entry lists at most (a unit may hold many processes).
MAX_PIDS_SHOWN = 32
#: How many other processes the status lists (the largest first).
MAX_OTHERS_SHOWN = 16
#: Memory a card shows used that no process accounts for (the driver's own, contexts)
#: before the reading counts as hiding processes from this daemon.
UNLISTED_SLACK_MIB = 1024


@frozen
class ConsumerMemory:
    """A consumer's share of the card: ``used_mib`` None when it cannot be told."""

    used_mib: int | None
    pids: tuple[int, ...]
    source: str  # unit, pid_file, port or none
    error: str | None = None

    def holds_model(self, resident_mib: int) -> bool | None:
        """Loaded, by memory: at least a quarter of its resident size (and some memory at
        all); None when the memory is not known."""
        if self.used_mib is None:
            return None
        return self.used_mib > 0 and self.used_mib * 4 >= resident_mib

    def to_json(self) -> dict[str, object]:
        """The ``memory`` object of a consumer's status entry."""
        return {
            "used_mib": self.used_mib,
            "pids": list(self.pids[:MAX_PIDS_SHOWN]),
            "source": self.source,
            "error": self.error,
        }


NOT_LOOKED_AT = ConsumerMemory(None, (), "none", "not looked at yet")


@frozen
class OtherProcess:
    """A process holding memory on the card that is no consumer's."""

    pid: int
    name: str | None
    used_mib: int | None

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "name": self.name, "used_mib": self.used_mib}


@frozen
class Observation:
    """One probe's look at a consumer beyond its health route."""

    memory: ConsumerMemory
    #: Which processes are the consumer: its memory in a later reading is measured anew.
    attribution: Attribution | None = None
    #: Loaded by memory (see ``MemoryWatch.look``); None: memory cannot tell.
    loaded: bool | None = None
    #: The GPU reading's time (POSIX seconds) the memory comes from; None: no reading.
    read_at: float | None = None
    #: An Ollama's models (``ollama:`` configured), None otherwise or when unread.
    models: tuple[OllamaModel, ...] | None = None
    models_error: str | None = None


def measure(attribution: Attribution | None, snapshot: GpuSnapshot) -> ConsumerMemory:
    """The memory ``attribution``'s processes hold in ``snapshot``."""
    if attribution is None:
        return NOT_LOOKED_AT
    pids = tuple(sorted(attribution.pids))
    if not pids:
        return ConsumerMemory(None, (), attribution.source, attribution.error)
    if not snapshot.ok or snapshot.processes is None:
        why = snapshot.processes_error or snapshot.error or "the GPU reading lists no processes"
        return ConsumerMemory(None, pids, attribution.source, why)
    held = [p.used_mib for p in snapshot.processes if p.pid in attribution.pids]
    if held and all(mib is None for mib in held):
        why = "the driver does not say how much memory each process holds"
        return ConsumerMemory(None, pids, attribution.source, why)
    used = sum(mib for mib in held if mib is not None)
    return ConsumerMemory(used, pids, attribution.source, attribution.error)


def others(
    snapshot: GpuSnapshot, attributed: Iterable[int], table: ProcessTable | None = None
) -> tuple[int | None, tuple[OtherProcess, ...]]:
    """The memory of processes of no consumer, and the largest of them (by MiB)."""
    if not snapshot.ok or snapshot.processes is None:
        return None, ()
    mine = set(attributed)
    rest = [p for p in snapshot.processes if p.pid not in mine]
    total = sum(p.used_mib or 0 for p in rest)
    rest.sort(key=lambda p: (-(p.used_mib or 0), p.pid))
    shown = tuple(
        OtherProcess(p.pid, _name(table, p.pid), p.used_mib) for p in rest[:MAX_OTHERS_SHOWN]
    )
    return total, shown


def _name(table: ProcessTable | None, pid: int) -> str | None:
    if table is None:
        return None
    try:
        return table.name(pid)
    except Exception:
        return None


class Readings(Protocol):
    """The GPU poller as seen here: its latest reading, no I/O."""

    @property
    def latest(self) -> GpuSnapshot: ...


class MergedReadings:
    """Several cards' readings as one (SPEC 9.5), for looking at consumers: sizes and each
    process's memory summed over the cards, so a consumer's memory is what it holds on
    all of its cards. Room is made per card, from each card's own reading."""

    def __init__(self, cards: Sequence[Readings]) -> None:
        self._cards = tuple(cards)
        self._merged: tuple[tuple[GpuSnapshot, ...], GpuSnapshot] | None = None

    @property
    def latest(self) -> GpuSnapshot:
        readings = tuple(card.latest for card in self._cards)
        kept = self._merged
        if kept is None or any(a is not b for a, b in zip(kept[0], readings, strict=True)):
            kept = self._merged = (readings, merge(readings))
        return kept[1]

    def each(self) -> tuple[GpuSnapshot, ...]:
        """Each card's latest reading, in order."""
        return tuple(card.latest for card in self._cards)


def merge(readings: Sequence[GpuSnapshot]) -> GpuSnapshot:
    """One reading of several cards: the first card's name and index, sizes summed."""
    first = readings[0]
    failed = next((r for r in readings if not r.ok), None)

    def total(values: Iterable[int | None]) -> int | None:
        known = list(values)
        return None if None in known else sum(v for v in known if v is not None)

    processes: dict[int, int | None] = {}
    lists = [r.processes for r in readings]
    for listed in lists:
        for p in listed or ():
            before = processes.get(p.pid, 0)
            processes[p.pid] = None if before is None or p.used_mib is None else before + p.used_mib
    times = [r.read_at for r in readings if r.read_at is not None]
    return GpuSnapshot(
        source=first.source,
        ok=failed is None,
        error=None if failed is None else failed.error,
        index=first.index,
        name=first.name,
        total_mib=total(r.total_mib for r in readings),
        used_mib=total(r.used_mib for r in readings),
        free_mib=total(r.free_mib for r in readings),
        read_at=min(times) if len(times) == len(readings) else None,
        processes=None
        if None in lists
        else tuple(GpuProcess(pid, mib) for pid, mib in sorted(processes.items())),
        processes_error=next((r.processes_error for r in readings if r.processes_error), None),
    )


class MemoryWatch:
    """Looks at a consumer's processes, memory and models at each probe; learns sizes."""

    def __init__(
        self,
        table: ProcessTable,
        readings: Readings,
        learned: LearnedSizes,
        control: ConsumerControl,
    ) -> None:
        self.table = table
        self._readings = readings
        self.learned = learned
        self._control = control
        # The last ``others`` answer and what it was for: status polls and scrapes
        # between two readings reuse it instead of reading /proc/<pid>/comm again.
        self._others: (
            tuple[GpuSnapshot, frozenset[int], tuple[int | None, tuple[OtherProcess, ...]]] | None
        ) = None

    def look(self, config: ConsumerConfig, timeout_s: float) -> Deferred[Observation]:
        """Attribute, measure against the latest reading, learn; read an Ollama's models.

        Memory says "loaded" as soon as the processes hold a quarter of the
        resident size. It says "not loaded" for a consumer once seen holding
        memory (a learned size exists), or when the reading accounts for the
        card: every process it lists runs here, and they explain what the card
        shows used within ``UNLISTED_SLACK_MIB``. Otherwise no memory may just
        mean the driver cannot see those processes (another pid namespace, a
        container), and the health route and the broker's record decide.
        """
        snapshot = self._readings.latest
        found = self._attribute(config)
        memory = measure(found, snapshot)
        loaded = memory.holds_model(config.vram_resident_mib)
        if loaded and memory.used_mib is not None:
            # Sizes are per card: a consumer on several cards holds its size on each.
            per_card = memory.used_mib // max(1, len(config.gpus))
            self.learned.observe(config.name, per_card, config.vram_resident_mib)
        elif loaded is False and self.learned.get(config.name) is None:
            loaded = False if self._accounts_for(snapshot) else None
        read_at = None if snapshot.read_at is None else snapshot.read_at.timestamp()
        if config.ollama is None:
            return succeed(Observation(memory, found, loaded, read_at))

        def read(models: tuple[OllamaModel, ...]) -> Observation:
            return Observation(memory, found, loaded, read_at, models)

        def unread(reason: Failure) -> Observation:
            value = reason.value
            why = value.message if isinstance(value, BrokerError) else reason.getErrorMessage()
            return Observation(memory, found, loaded, read_at, None, why)

        return read_ps(self._control, config, timeout_s).addCallbacks(read, unread)

    def _accounts_for(self, snapshot: GpuSnapshot) -> bool:
        """Whether the reading's processes all run here and explain the card's use (each
        card's, where several are read as one)."""
        if isinstance(self._readings, MergedReadings):
            return all(self._accounts_for_card(card) for card in self._readings.each())
        return self._accounts_for_card(snapshot)

    def _accounts_for_card(self, snapshot: GpuSnapshot) -> bool:
        if not snapshot.ok or snapshot.processes is None or snapshot.used_mib is None:
            return False
        listed = sum(p.used_mib or 0 for p in snapshot.processes)
        if snapshot.used_mib - listed > UNLISTED_SLACK_MIB:
            return False
        try:
            return all(self.table.alive(p.pid) for p in snapshot.processes)
        except Exception:
            return False

    def others(self, attributed: Iterable[int]) -> tuple[int | None, tuple[OtherProcess, ...]]:
        """Memory of no consumer's processes in the latest reading, and who holds it."""
        snapshot, mine = self._readings.latest, frozenset(attributed)
        kept = self._others
        if kept is not None and kept[0] is snapshot and kept[1] == mine:
            return kept[2]
        answer = others(snapshot, mine, self.table)
        self._others = (snapshot, mine, answer)
        return answer

    def now(self, attribution: Attribution | None) -> ConsumerMemory:
        """The memory of a consumer's processes (found at its last probe) in the latest
        reading: what status, metrics and room-making show between probes."""
        return measure(attribution, self._readings.latest)

    def _attribute(self, config: ConsumerConfig) -> Attribution:
        try:
            return attribute(
                self.table,
                config.url,
                systemd_unit=config.process.systemd_unit,
                pid_file=config.process.pid_file,
            )
        except Exception as e:  # attribute() reports failures; a bug must not stop probes
            log.failure("finding the processes of {name} failed", name=config.name)
            return Attribution(frozenset(), "none", f"finding its processes failed: {e}")
