"""What every benchmark shares: the run's setting (CPUs, temp dir), its result document.

Each benchmark module (``latency``, ``throughput``, ``evict``) has ``Options``,
``run(opts, log) -> (result, ok)`` and ``render(result) -> str``; ``session``
gives its run a temp dir, the CPU pinning it asked for and SIGTERM handling,
and ``document`` the fields every result shares.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.consumer import SYNTH_BODY
from bench.servers import ProcessGroup, StartError, terminate_on_sigterm

OUT_DIR = Path(__file__).resolve().parent / "out"

#: CPU busy above this share, sampled just before a benchmark starts, is other work.
BUSY_CPU = 0.10


class BenchTimeout(RuntimeError):
    """The benchmark ran past its time budget."""


@dataclass
class CommonOptions:
    """What every benchmark's ``Options`` has."""

    cpus: str = "all"  # "one": pin everything to one CPU | "all": let the kernel place it
    keep: bool = False  # keep the temp dir (configs, logs) and say where it is
    strict: bool = False  # fail the run when a target does not hold


class Bench:
    """One run of a benchmark: its helper processes, its time budget, what went wrong.

    A benchmark's run class fills in ``start`` (the processes) and ``measure``;
    ``execute`` runs both and always stops every process.
    """

    def __init__(self, tmp: Path, log: Callable[[str], None], max_seconds: float) -> None:
        self.tmp = tmp
        self.log = log
        self.group = ProcessGroup()
        self.failures: list[str] = []
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds

    def start(self) -> None:
        raise NotImplementedError

    def measure(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.group.close()

    def check_time(self, need_s: float) -> None:
        """Raise ``BenchTimeout`` if ``need_s`` more seconds would overrun the budget."""
        if time.monotonic() + need_s > self.deadline:
            raise BenchTimeout(f"time budget of {self.max_seconds:g} s spent")

    def execute(self) -> None:
        """Start, measure, and always close; a failure is recorded, not raised."""
        try:
            self.start()
            self.measure()
        except (StartError, BenchTimeout, RuntimeError, OSError, ValueError) as e:
            self.failures.append(str(e))
            self.log(f"bench: FAILED - {e}")
        finally:
            self.close()


def passed(result: dict[str, Any], strict: bool) -> bool:
    """Everything ran and, with ``strict``, every target held."""
    targets = (result.get("analysis") or {}).get("targets", {}).values()
    return not result["failures"] and (not strict or all(t["ok"] for t in targets))


def check_answer(who: str, status: int, body: bytes) -> None:
    """The answer must be the consumer's synthesize answer, byte for byte."""
    if status != 200 or body != SYNTH_BODY:
        raise RuntimeError(f"{who}: expected 200 {SYNTH_BODY!r}, got {status} {body!r}")


def percentile(sorted_ns: Sequence[int], p: float) -> float:
    """Nearest-rank percentile of sorted samples, in microseconds."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1000.0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    """A figure for the tables; ``-`` for a missing one."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}{unit}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def cpu_busy(seconds: float = 0.5) -> float | None:
    """The share of all CPUs' time that was busy over the next ``seconds`` (Linux).

    Sampled before a benchmark starts its processes, it is other work's share,
    where the load average would still count the previous benchmark's.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 3) if total > 0 else None


def loadavg() -> float | None:
    """The 1-minute load average, where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[str]:
    """The run's temp dir: configs and logs of every process; removed unless ``keep``."""
    if keep:
        path = tempfile.mkdtemp(prefix="mgpu-bench-")
        print(f"bench: keeping configs and logs in {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as path:
            yield path


@contextlib.contextmanager
def pinned(cpus: str) -> Iterator[set[int] | None]:
    """Pin this process (and so the children it starts) to one CPU, if asked and possible."""
    if cpus != "one" or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    chosen = {max(before)}
    os.sched_setaffinity(0, chosen)
    try:
        yield chosen
    finally:
        os.sched_setaffinity(0, before)


class Session:
    """One benchmark's setting: start time, load average, CPU set and temp dir."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.started = time.monotonic()
        self.load_before = loadavg()
        self.busy_before = cpu_busy()
        self.cpus = "all"
        self.cpu_set: set[int] | None = None
        self.tmp = Path()
        if self.busy_before is not None and self.busy_before >= BUSY_CPU:
            log(
                f"bench: WARNING - other work kept {100 * self.busy_before:.0f}% of the CPUs "
                "busy just before the start: the figures will be noisy (tails most)"
            )

    @contextlib.contextmanager
    def enter(self, cpus: str, keep: bool) -> Iterator[Session]:
        """SIGTERM handling, the CPU pinning asked for, and the temp dir, for the run."""
        with terminate_on_sigterm(), pinned(cpus) as cpu_set, workdir(keep) as tmp:
            self.cpus, self.cpu_set = cpus, cpu_set
            self.tmp = Path(tmp)
            yield self

    def document(
        self, bench: str, host: dict[str, Any], params: dict[str, Any], **fields: Any
    ) -> dict[str, Any]:
        """The result document: what every benchmark records, then its own ``fields``."""
        cpu_set = sorted(self.cpu_set) if self.cpu_set else None
        return {
            "bench": bench,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "cpu_busy_before": self.busy_before,
                "loadavg_1m_before": self.load_before,
                "loadavg_1m_after": loadavg(),
                **host,
            },
            "params": {**params, "cpus": self.cpus, "cpu_set": cpu_set},
            **fields,
            "elapsed_s": round(time.monotonic() - self.started, 2),
        }


def busy_note(result: dict[str, Any]) -> list[str]:
    """The table's warning line when other work shared the CPUs at start."""
    busy = result["host"].get("cpu_busy_before")
    if busy is not None and busy >= BUSY_CPU:
        return [f"NOTE: other work kept {100 * busy:.0f}% of the CPUs busy at start: noisy figures"]
    return []


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write the result document (NaN becomes null)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(result), indent=2, ensure_ascii=False) + "\n")
