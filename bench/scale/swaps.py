"""SSE subscribers: swaps per second with no ``/v1/events`` stream open, and with 1,000.

The eviction benchmark's set-up (``bench.evict``): the stand-in nvidia-smi
reading a state file, and two consumers on a 24,564 MiB card of which 500 MiB
are others', ``big`` (16,000 MiB, ``tts``) and ``small`` (10,000 MiB,
``stt``), neither leaving room for the other. Here the consumers write the
state file themselves (``--gpu-state``: their memory shows used from a load
to the next unload, written before they answer), and both have a load route,
so the benchmark stays out of the loop: one client sends ``stt`` and ``tts``
in turn, back to back, and each request makes the daemon read the card,
unload the other consumer, read again (the memory shows free), load its own
and relay the request. A swap is one eviction (``scheduler.evictions``).

Two legs of ``seconds`` per round, the order alternating over ``rounds``:
``none``, and ``subscribers``: ``count`` streams opened by
``python -m bench.subscribers`` (another process, reading every stream).
The record: swaps/s (the median over rounds), the daemon's CPU per swap,
and, from the subscribers, for each event (an ``evict`` and a ``load`` a
swap) how long after its ``at`` the last stream heard it (``at`` is in ms,
so this reads up to 1 ms high) and the spread from the first stream to the last.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import broker as broker_mod
from bench.client import REQUEST_BODY, KeepAliveClient, build_request
from bench.common import Bench, check_answer, median, percentile
from bench.evict import OTHER_USED_MIB, TOTAL_MIB, GpuState, daemon_config
from bench.servers import (
    ManagedProcess,
    http_get_json,
    proc_cpu_s,
    repo_env,
    start_consumer,
)
from mgpu.sim.gpu import FileLedger

HOST = "127.0.0.1"
LEGS = ("none", "subscribers")
#: The two consumers: name, kind, MiB, loaded at the start.
CONSUMERS = (("big", "tts", 16000, True), ("small", "stt", 10000, False))


@dataclass(frozen=True)
class SwapSettings:
    """What the SSE part runs."""

    subscribers: int = 1000
    seconds: float = 4.0  # per leg and round
    rounds: int = 2
    warmup_s: float = 1.0
    settle_s: float = 0.5  # after the streams open or close, before a window


@dataclass
class Leg:
    """One leg's rounds: swaps/s, CPU per swap, and what the subscribers heard."""

    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the daemon's, per swap
    readers_cpu_ms: list[float] = field(default_factory=list)  # the subscribers' process's
    heard: list[dict[str, Any]] = field(default_factory=list)


def at_ns(at: str) -> int:
    """An event's ``at`` (``2026-11-27T01:18:49.360Z``) as epoch ns."""
    when = datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(when.timestamp() * 1000) * 1_000_000


class SwapRun(Bench):
    """The two consumers, the daemon, one client alternating between them, the legs."""

    def __init__(self, settings: SwapSettings, tmp: Path, log: Callable[[str], None]) -> None:
        budget = 2 * settings.rounds * (settings.seconds + 30.0) + 60.0
        super().__init__(tmp, log, max_seconds=budget)
        self.settings = settings
        self.port = self.daemon_pid = 0
        self.raws: list[tuple[str, bytes]] = []
        self.turn = 1  # big is resident: small's request comes first
        self.client: KeepAliveClient | None = None
        self.legs = {name: Leg() for name in LEGS}

    def start(self) -> None:
        state = self.tmp / "gpu-state.json"
        FileLedger(state, total_mib=TOTAL_MIB).allocate("others", OTHER_USED_MIB)
        blocks = []
        for name, kind, mib, loaded in CONSUMERS:
            args = ["--loaded", "yes" if loaded else "no", "--gpu-state", str(state)]
            _, port = start_consumer(self.group, self.tmp, name, [*args, "--vram-mib", str(mib)])
            blocks.append((name, kind, port, mib))
        config = daemon_config(blocks, poll_interval_s=5.0, load=True)
        proc, self.port = broker_mod.start_broker(
            self.group, self.tmp, config, env=GpuState(state).env()
        )
        self.daemon_pid = proc.pid
        self.log(f"daemon: {HOST}:{self.port} (pid {proc.pid}); big resident, small not")
        self.raws = [
            (name, build_request("POST", f"/v1/{kind}", HOST, self.port, REQUEST_BODY))
            for name, kind, _, _ in CONSUMERS
        ]
        self.client = KeepAliveClient(HOST, self.port)
        self._wait_for_probes()

    def _status(self) -> dict[str, Any]:
        doc = http_get_json(HOST, self.port, "/v1/status", timeout_s=5.0)
        return doc if isinstance(doc, dict) else {}

    def _wait_for_probes(self) -> None:
        """Until the daemon has probed both: big loaded, small not (else nothing to evict)."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            consumers = self._status().get("consumers", {})
            if [consumers.get(name, {}).get("loaded") for name, *_ in CONSUMERS] == [True, False]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not see big loaded and small not: {self._status()}")

    def measure(self) -> None:
        s = self.settings
        self._swaps(s.warmup_s)
        for r in range(s.rounds):
            for name in LEGS if r % 2 == 0 else LEGS[::-1]:
                self.check_time(s.seconds + 30.0)
                self._leg(name)
            self.log(
                f"  round {r + 1}: "
                + ", ".join(f"{n} {leg.rates[-1]:.1f} swaps/s" for n, leg in self.legs.items())
            )

    def _leg(self, name: str) -> None:
        """One window of swaps, with the subscribers connected for that leg.

        The subscribers stay a moment after the window, so that the last
        events reach every stream before they stop.
        """
        leg = self.legs[name]
        subscribers = self._subscribe() if name == "subscribers" else None
        pids = [self.daemon_pid] + ([subscribers[0].pid] if subscribers else [])
        try:
            time.sleep(self.settings.settle_s)
            evictions0, cpu0 = self._evictions(), [proc_cpu_s(pid) for pid in pids]
            took = self._swaps(self.settings.seconds)
            swaps, cpu1 = self._evictions() - evictions0, [proc_cpu_s(pid) for pid in pids]
            time.sleep(self.settings.settle_s)
        finally:
            if subscribers is not None:
                leg.heard.append(self._unsubscribe(*subscribers))
        leg.rates.append(swaps / took)
        # The daemon's CPU, then (in the subscribers' leg) the subscribers' process's.
        for into, a, b in zip((leg.cpu_ms, leg.readers_cpu_ms), cpu0, cpu1, strict=False):
            if a is not None and b is not None and swaps:
                into.append((b - a) * 1e3 / swaps)
        time.sleep(self.settings.settle_s)

    def _evictions(self) -> int:
        return int(self._status()["scheduler"]["evictions"])

    def _swaps(self, seconds: float) -> float:
        """Requests to the consumer not resident, in turn, for ``seconds``; the time taken."""
        assert self.client is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            name, raw = self.raws[self.turn]
            check_answer(name, *self.client.request(raw))
            self.turn ^= 1
        return time.monotonic() - t0

    def _subscribe(self) -> tuple[ManagedProcess, Path]:
        """Start the subscribers' process and wait until every stream has opened."""
        n = sum(len(leg.heard) for leg in self.legs.values())
        out = self.tmp / f"subscribers-{n}.json"
        argv = [sys.executable, "-m", "bench.subscribers", "--port", str(self.port)]
        argv += ["--count", str(self.settings.subscribers), "--out", str(out)]
        proc = self.group.start(
            "subscribers",
            argv,
            self.tmp / f"subscribers-{n}.log",
            cwd=self.tmp,
            env=repo_env(),
            stdout_pipe=True,
        )
        line = proc.read_line(60.0)
        if line != f"ready {self.settings.subscribers}":
            raise RuntimeError(f"subscribers: expected ready, got {line!r}{proc.tail()}")
        return proc, out

    def _unsubscribe(self, proc: ManagedProcess, out: Path) -> dict[str, Any]:
        """Stop the subscribers (they write what they heard) and read their record."""
        self.group.stop(proc)
        if not out.is_file():
            raise RuntimeError(f"subscribers wrote no record{proc.tail()}")
        record: dict[str, Any] = json.loads(out.read_text())
        return record

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        super().close()

    def result(self) -> dict[str, Any]:
        """The part's record: settings, each leg, the events as the subscribers heard them."""
        legs: dict[str, dict[str, Any]] = {
            name: {
                "swaps_per_s": median(leg.rates),
                "rounds": [round(x, 2) for x in leg.rates],
                "daemon_cpu_ms_per_swap": median(leg.cpu_ms),
                "subscribers_cpu_ms_per_swap": median(leg.readers_cpu_ms),
            }
            for name, leg in self.legs.items()
            if leg.rates
        }
        if self.legs["subscribers"].heard:
            legs["subscribers"]["events"] = heard_summary(
                self.legs["subscribers"].heard, self.settings.subscribers
            )
        return {"settings": asdict(self.settings), "legs": legs, "failures": self.failures}


def p50_max_ms(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {"p50": percentile(s, 50) / 1000, "max": percentile(s, 100) / 1000}


def heard_summary(records: list[dict[str, Any]], streams: int) -> dict[str, Any]:
    """Over every event the subscribers heard: the last stream's delay and the spread, ms."""
    delays, spreads, partial = [], [], 0
    for record in records:
        for heard in record["events"].values():
            if heard["streams"] < streams:
                partial += 1
                continue
            delays.append(heard["last_ns"] - at_ns(heard["at"]))
            spreads.append(heard["last_ns"] - heard["first_ns"])
    return {
        "count": len(delays),
        "last_after_at_ms": p50_max_ms(delays),
        "first_to_last_ms": p50_max_ms(spreads),
        "heard_by_some_only": partial,
        "dropped_streams": sum(r["dropped"] for r in records),
    }
