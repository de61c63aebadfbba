# -*- test-case-name: tests.test_sim -*-
"""The simulated GPU: a memory ledger the simulated consumers write, and its reader.

The ledgers share one small interface (``allocate``, ``release``, ``used_mib``,
``owners``, ``processes``); each card has its own:

- ``MemoryLedger``: everything lives in one process (``--demo``: all simulated
  consumers run inside the daemon);
- ``FileLedger``: a JSON state file shared between processes (integration
  tests: each consumer process writes its allocation into the file that
  ``tests/fake_nvidia_smi.py`` reads);
- ``SpanLedger``: a consumer on several cards, which holds its memory on each.

``SimGpuReader`` reads a ledger through the same ``GpuReader`` interface as
NVML, so the daemon's own code paths are the ones that run, per-process
memory included (SPEC section 9.3): each ledger says which process holds what.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed

from mgpu.gpu import GpuProcess, GpuSnapshot, ProcessList, ReactorTime, failed_snapshot

SIM_GPU_NAME: Final = "Simulated GPU"
#: ``MemoryLedger``'s first virtual pid: above Linux's largest (``pid_max`` is at
#: most 2**22), so a virtual pid never names a real process.
VIRTUAL_PID_BASE: Final = 4_194_305


class GpuLedger(Protocol):
    """Who holds how much simulated GPU memory."""

    def allocate(self, owner: str, mib: int) -> None:
        """Set ``owner``'s allocation to ``mib`` (not additive: loading twice holds once)."""

    def release(self, owner: str) -> None:
        """Drop ``owner``'s allocation, if any."""

    def used_mib(self) -> int:
        """Memory in use on the card, in MiB; may exceed the card (overcommit)."""

    def owners(self) -> dict[str, int]:
        """Who holds how much, in MiB."""

    def processes(self) -> dict[int, int]:
        """Which process holds how much, in MiB: what a driver would list."""


@define
class MemoryLedger:
    """A ledger in this process's memory: the demo's card.

    Every simulated consumer lives in this one process, so each owner gets a
    virtual pid of its own instead (``pid_of``): the attribution of memory to
    consumers can then tell them apart, as it would real services.  The cards
    of one host share ``pids``, so that a consumer has one pid on all of them,
    as a process does.
    """

    _owners: dict[str, int] = field(factory=dict)
    pids: dict[str, int] = field(factory=dict)

    def allocate(self, owner: str, mib: int) -> None:
        """Set ``owner``'s allocation to ``mib``."""
        self.pid_of(owner)
        self._owners[owner] = mib

    def pid_of(self, owner: str) -> int:
        """``owner``'s virtual pid, the same for the ledger's whole life.

        ``VIRTUAL_PID_BASE`` plus the owner's order of first allocation, or of
        first asking: the demo can learn a consumer's pid before it loads.
        """
        return self.pids.setdefault(owner, VIRTUAL_PID_BASE + len(self.pids))

    def release(self, owner: str) -> None:
        """Drop ``owner``'s allocation."""
        self._owners.pop(owner, None)

    def used_mib(self) -> int:
        """The sum of every owner's allocation."""
        return sum(self._owners.values())

    def owners(self) -> dict[str, int]:
        """The per-owner breakdown."""
        return dict(self._owners)

    def processes(self) -> dict[int, int]:
        """Each owner's allocation under its virtual pid."""
        return {self.pids[owner]: mib for owner, mib in self._owners.items()}


@frozen
class SpanLedger:
    """One consumer's ledger when it spans several cards (SPEC section 9.5).

    A model split over cards holds its size on each: ``allocate`` and
    ``release`` go to every card's ledger.  Reads are the first card's, the
    consumer's own view of what it holds.
    """

    cards: tuple[GpuLedger, ...]

    def allocate(self, owner: str, mib: int) -> None:
        """``owner`` holds ``mib`` on each card."""
        for card in self.cards:
            card.allocate(owner, mib)

    def release(self, owner: str) -> None:
        """``owner`` holds nothing on any card."""
        for card in self.cards:
            card.release(owner)

    def used_mib(self) -> int:
        return self.cards[0].used_mib()

    def owners(self) -> dict[str, int]:
        return self.cards[0].owners()

    def processes(self) -> dict[int, int]:
        return self.cards[0].processes()


def span(ledgers: Sequence[GpuLedger]) -> GpuLedger:
    """A consumer's ledger over its cards' ledgers: the card's own when it has one."""
    return ledgers[0] if len(ledgers) == 1 else SpanLedger(tuple(ledgers))


@define
class FileLedger:
    """A ledger in a JSON file several processes share, in ``fake_nvidia_smi``'s format.

    The file is ``{"gpus": [{"index", "name", "total_mib", "used_mib"}], "fail": null,
    "owners": {"<index>": {"<owner>": mib}}, "pids": {"<index>": {"<owner>": pid}}}``;
    the ledger keeps every other key (``fail``, ``delay_s``) as a test wrote it.
    ``used_mib`` is the sum of the owners, clamped to ``total_mib`` so that
    ``free`` never goes negative; a ``used_mib`` already in the file when the
    ledger first meets the index becomes the owner ``"external"``, with no pid:
    memory held by something no process list shows.  ``pids`` records the
    process that made each allocation; ``fake_nvidia_smi`` lists those owners
    as the card's processes.

    Each update holds ``fcntl.flock`` on ``<path>.lock`` across read-modify-write
    and replaces the file atomically (``os.replace``): two processes never lose an
    update and a reader never sees half a file.  The calls block, briefly: a
    local file of a few hundred bytes.
    """

    path: Path = field(converter=Path)
    index: int = 0
    total_mib: int = 16384
    name: str = SIM_GPU_NAME

    def __attrs_post_init__(self) -> None:
        with self._update():
            pass  # creates the file, or adds this index to it

    def allocate(self, owner: str, mib: int) -> None:
        """Set ``owner``'s allocation to ``mib`` in the shared file, held by this process."""
        with self._update() as (owners, pids):
            owners[owner] = mib
            pids[owner] = os.getpid()

    def release(self, owner: str) -> None:
        """Drop ``owner``'s allocation from the shared file."""
        with self._update() as (owners, pids):
            owners.pop(owner, None)
            pids.pop(owner, None)

    def used_mib(self) -> int:
        """Every process's allocations on this index, unclamped."""
        return sum(self.owners().values())

    def owners(self) -> dict[str, int]:
        """The per-owner breakdown of this index, as the file says now."""
        return dict(self._read()["owners"].get(str(self.index), {}))

    def processes(self) -> dict[int, int]:
        """The MiB each recorded process holds on this index: the sum of its owners'."""
        data = self._read()
        owners = data["owners"].get(str(self.index), {})
        held: dict[int, int] = {}
        for owner, pid in data["pids"].get(str(self.index), {}).items():
            if owner in owners:
                held[int(pid)] = held.get(int(pid), 0) + int(owners[owner])
        return held

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: not a JSON object")
        data.setdefault("gpus", [])
        data.setdefault("fail", None)
        data.setdefault("owners", {})
        data.setdefault("pids", {})
        return data

    @contextmanager
    def _update(self) -> Iterator[tuple[dict[str, int], dict[str, int]]]:
        """Under the lock: read, let the caller change this index's owners and pids, write back."""
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                gpu = next((g for g in data["gpus"] if g.get("index") == self.index), None)
                if gpu is None:
                    gpu = {"index": self.index, "name": self.name, "total_mib": self.total_mib}
                    data["gpus"].append(gpu)
                external = int(gpu.get("used_mib", 0))
                owners = data["owners"].setdefault(
                    str(self.index), {"external": external} if external else {}
                )
                yield owners, data["pids"].setdefault(str(self.index), {})
                gpu["used_mib"] = min(int(gpu["total_mib"]), sum(owners.values()))
                self._write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


@define
class SimGpuReader:
    """``GpuReader`` over a ledger: source ``sim``, ``free = total - used``.

    The simulation lets memory overcommit rather than fail a load (a consumer
    loading while others are resident just adds to the ledger), so the demo
    still runs under a plain global lock that makes no room. The reading clamps
    ``used`` to the card and ``free`` at zero, as a real card would show.
    """

    ledger: GpuLedger
    clock: ReactorTime
    total_mib: int
    index: int = 0
    name: str = SIM_GPU_NAME
    source: str = "sim"

    def read(self) -> Deferred[GpuSnapshot]:
        """A fresh snapshot; a ledger that cannot be read gives ``ok=False``, never an errback."""
        now = datetime.fromtimestamp(self.clock.seconds(), UTC)
        try:
            used = min(max(self.ledger.used_mib(), 0), self.total_mib)
        except Exception as e:
            return succeed(failed_snapshot(self.source, self.index, f"simulated GPU: {e}", now))
        processes, processes_error = self._processes()
        return succeed(
            GpuSnapshot(
                source=self.source,
                ok=True,
                error=None,
                index=self.index,
                name=self.name,
                total_mib=self.total_mib,
                used_mib=used,
                free_mib=self.total_mib - used,
                read_at=now,
                processes=processes,
                processes_error=processes_error,
            )
        )

    def _processes(self) -> ProcessList:
        """The ledger's processes sorted by pid, or None and why."""
        try:
            held = self.ledger.processes()
            return tuple(GpuProcess(pid, max(held[pid], 0)) for pid in sorted(held)), None
        except Exception as e:
            return None, f"simulated GPU: {e}"
