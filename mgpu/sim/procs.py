# -*- test-case-name: tests.test_sim -*-
"""The demo's process table: each simulated consumer is a process of its own.

In ``--demo`` every simulated consumer runs inside the daemon, so the real
``/proc`` would find the daemon's pid listening on every consumer's port.
The simulated card gives each consumer a virtual pid (``MemoryLedger.pid_of``,
above any real pid); this table says that virtual pid listens on that
consumer's port, so the daemon attributes memory exactly as it does on a
real host, through the same ``attribute`` code. Anything else (a unit, a pid
file, another port) is looked up on the real host.
"""

from __future__ import annotations

from collections.abc import Mapping

from mgpu.procs import ProcessTable, ProcTable
from mgpu.sim.gpu import MemoryLedger


class SimProcessTable:
    """``ProcessTable`` with the demo's consumers as virtual processes, by port."""

    def __init__(
        self, ports: Mapping[str, int], ledger: MemoryLedger, host: ProcessTable | None = None
    ) -> None:
        self._by_port = {port: ledger.pid_of(name) for name, port in ports.items()}
        self._names = {ledger.pid_of(name): f"sim-{name}" for name in ports}
        self._host = host or ProcTable()

    def listening_pids(self, port: int) -> frozenset[int]:
        pid = self._by_port.get(port)
        return frozenset({pid}) if pid is not None else self._host.listening_pids(port)

    def unit_pids(self, unit: str) -> frozenset[int]:
        return self._host.unit_pids(unit)

    def read_pid_file(self, path: str) -> int:
        return self._host.read_pid_file(path)

    def alive(self, pid: int) -> bool:
        return pid in self._names or self._host.alive(pid)

    def descendants(self, pids: frozenset[int]) -> frozenset[int]:
        virtual = pids & self._names.keys()
        real = pids - virtual
        return virtual | (self._host.descendants(real) if real else frozenset())

    def name(self, pid: int) -> str | None:
        return self._names.get(pid) or self._host.name(pid)
