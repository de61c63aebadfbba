"""Queue depth: what the daemon costs per job while N requests wait for one consumer.

One consumer (``bench.consumer --work-ms 20``) behind the daemon with
``max_concurrency: 1``, ``scheduler.max_queue`` above the deepest queue,
``queue_timeout_s`` an hour, and the consumer's ``keepalive`` off (the
daemon's default: a connection of its own per request). A ``Crowd`` keeps N
requests outstanding, N keep-alive connections from this process each sending
again as soon as its answer is in, so N - 1 wait while one runs. The crowd
grows from one depth to the next without being torn down. At each depth,
once the daemon's ``/v1/status`` shows the queue full and a moment has passed:

- a window of ``seconds``: jobs/s (the consumer's own count), the consumer's
  idle time between two jobs (its ``/api/stats``: the hand-off as the GPU
  sees it), the daemon's CPU per job (its process CPU clock, the counter of
  ``/proc/PID/stat`` at ns resolution) and its RSS at the end;
- then ``status_s`` of ``GET /v1/status`` over one keep-alive connection,
  one every 10 ms: its latency with the queue that deep. Apart from the
  first window, whose CPU per job the polls would inflate.

The baseline comes first, in the same run: one client direct to the consumer,
back to back, for ``seconds``: the consumer's own rate and idle time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import broker as broker_mod
from bench.client import REQUEST_BODY, KeepAliveClient, build_request
from bench.common import Bench, check_answer, percentile
from bench.crowd import Crowd
from bench.servers import (
    http_get_json,
    proc_cpu_s,
    proc_nofile,
    proc_rss_mib,
    start_consumer,
)

HOST = "127.0.0.1"
#: Descriptors a depth needs beyond its connections, in this process and in the daemon.
FD_MARGIN = 256
#: Between two ``GET /v1/status`` while their latency is measured.
STATUS_EVERY_S = 0.01


@dataclass(frozen=True)
class DepthSettings:
    """What the queue-depth part runs."""

    depths: tuple[int, ...] = (100, 1000, 5000, 10000)
    work_ms: float = 20.0
    seconds: float = 5.0  # the rate window, per depth and for the baseline
    status_s: float = 2.0  # the /v1/status window, per depth
    settle_s: float = 1.0  # once the queue is full, before the window
    fill_timeout_s: float = 120.0


def idle_summary(idle_ns: list[int]) -> dict[str, float]:
    """Percentiles of the consumer's idle times between jobs, in µs."""
    s = sorted(idle_ns)
    return {"p50": percentile(s, 50), "p99": percentile(s, 99), "count": len(s)}


class DepthRun(Bench):
    """The consumer, the daemon in front of it, the crowd, and a record per depth."""

    def __init__(
        self, settings: DepthSettings, fd_hard: int, tmp: Path, log: Callable[[str], None]
    ) -> None:
        super().__init__(tmp, log, max_seconds=60.0 + 60.0 * len(settings.depths))
        self.settings = settings
        self.fd_hard = fd_hard
        self.consumer_port = self.port = self.daemon_pid = 0
        self.crowd: Crowd | None = None
        self.status: KeepAliveClient | None = None
        self.direct: dict[str, Any] = {}
        self.levels: list[dict[str, Any]] = []
        self.skipped: list[int] = []
        self.daemon_nofile: tuple[str, str] | None = None

    def start(self) -> None:
        s = self.settings
        _, self.consumer_port = start_consumer(
            self.group, self.tmp, "consumer", ["--work-ms", f"{s.work_ms:g}"]
        )
        config = broker_mod.one_consumer_config(
            self.consumer_port,
            scheduler={"max_queue": max(s.depths) + FD_MARGIN, "queue_timeout_s": 3600},
        )
        daemon, self.port = broker_mod.start_broker(self.group, self.tmp, config)
        self.daemon_pid = daemon.pid
        self.daemon_nofile = proc_nofile(daemon.pid)
        self.log(
            f"consumer: {HOST}:{self.consumer_port}, {s.work_ms:g} ms a job; daemon: "
            f"{HOST}:{self.port} (pid {daemon.pid}), max_concurrency 1, keep-alive off, "
            f"open files soft/hard {'/'.join(self.daemon_nofile or ('?', '?'))}"
        )
        raw = build_request("POST", "/v1/tts", HOST, self.port, REQUEST_BODY)
        with KeepAliveClient(HOST, self.port) as client:
            check_answer("daemon", *client.request(raw))
        self.crowd = Crowd(HOST, self.port, raw)
        self.status = KeepAliveClient(HOST, self.port)

    def measure(self) -> None:
        self.direct = self._direct()
        self.log(
            f"  direct, 1 client: {self.direct['jobs_per_s']:.2f} jobs/s, "
            f"idle p50 {self.direct['idle_us']['p50']:,.0f} µs"
        )
        for depth in self.settings.depths:
            if depth + FD_MARGIN > self.fd_hard:
                self.skipped.append(depth)
                self.log(f"  {depth:,} waiting: skipped, open-files hard limit {self.fd_hard}")
                continue
            self.check_time(self.settings.fill_timeout_s + 30.0)
            self.levels.append(self._level(depth))

    def _consumer_stats(self) -> dict[str, Any]:
        stats = http_get_json(HOST, self.consumer_port, "/api/stats", timeout_s=5.0)
        if not isinstance(stats, dict):
            raise RuntimeError("the consumer did not answer GET /api/stats")
        return stats

    def _direct(self) -> dict[str, Any]:
        """One client back to back to the consumer: its own rate and idle time."""
        raw = build_request("POST", "/api/synthesize", HOST, self.consumer_port, REQUEST_BODY)
        with KeepAliveClient(HOST, self.consumer_port) as client:
            check_answer("consumer", *client.request(raw))
            self._consumer_stats()  # clears the idle times
            jobs = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < self.settings.seconds:
                check_answer("consumer", *client.request(raw))
                jobs += 1
            took = time.monotonic() - t0
        idle = idle_summary(self._consumer_stats()["idle_ns"])
        return {"jobs_per_s": jobs / took, "idle_us": idle}

    def _level(self, depth: int) -> dict[str, Any]:
        """Fill the queue to ``depth``, then the rate window and the status window."""
        assert self.crowd is not None
        t0 = time.monotonic()
        self.crowd.grow(depth, self.settings.fill_timeout_s)
        self._wait_queued(depth - 2, t0 + self.settings.fill_timeout_s)
        filled_s = time.monotonic() - t0
        time.sleep(self.settings.settle_s)
        answers0 = dict(self.crowd.answers)
        level = {"depth": depth, "fill_s": round(filled_s, 2), **self._window()}
        level["status_us"] = self._status_latency()
        level["queued"] = self._queued()
        other = {k: v - answers0.get(k, 0) for k, v in self.crowd.answers.items() if k != 200}
        if any(other.values()) or self.crowd.lost:
            self.failures.append(
                f"{depth} waiting: answers other than 200 {other}, {self.crowd.lost} lost"
            )
        if level["max_concurrent"] != 1:
            self.failures.append(
                f"{depth} waiting: the consumer ran {level['max_concurrent']} jobs at once: "
                "the GPU lease let more than max_concurrency through"
            )
        self.log(
            f"  {depth:,} waiting (filled in {filled_s:.1f} s): {level['jobs_per_s']:.2f} jobs/s, "
            f"idle p50 {level['idle_us']['p50']:,.0f} µs, {level['cpu_us_per_job']:,.0f} µs "
            f"CPU a job, RSS {level['rss_mib']:.0f} MiB, status p99 "
            f"{level['status_us']['p99']:,.0f} µs"
        )
        return level

    def _queued(self) -> int:
        doc = http_get_json(HOST, self.port, "/v1/status", timeout_s=10.0)
        return int(doc["scheduler"]["queued"]) if isinstance(doc, dict) else -1

    def _wait_queued(self, at_least: int, deadline: float) -> None:
        while (queued := self._queued()) < at_least:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {queued} requests queued, expected {at_least}")
            time.sleep(0.1)

    def _window(self) -> dict[str, Any]:
        """Jobs/s, idle times, CPU per job and RSS over ``seconds`` of a full queue."""
        jobs0 = self._consumer_stats()["jobs"]  # also clears the idle times
        cpu0, t0 = proc_cpu_s(self.daemon_pid), time.monotonic()
        time.sleep(self.settings.seconds)
        stats = self._consumer_stats()
        cpu1, took = proc_cpu_s(self.daemon_pid), time.monotonic() - t0
        jobs = stats["jobs"] - jobs0
        cpu_us = (cpu1 - cpu0) * 1e6 / jobs if cpu0 is not None and cpu1 is not None else None
        return {
            "jobs": jobs,
            "jobs_per_s": jobs / took,
            "idle_us": idle_summary(stats["idle_ns"]),
            "cpu_us_per_job": cpu_us if jobs else None,
            "rss_mib": proc_rss_mib(self.daemon_pid),
            "max_concurrent": stats["max_concurrent"],
        }

    def _status_latency(self) -> dict[str, float]:
        """``GET /v1/status`` every 10 ms for ``status_s``: latency percentiles, µs."""
        assert self.status is not None
        raw = build_request("GET", "/v1/status", HOST, self.port)
        took: list[int] = []
        end = time.monotonic() + self.settings.status_s
        while time.monotonic() < end:
            t0 = time.perf_counter_ns()
            status, body = self.status.request(raw)
            took.append(time.perf_counter_ns() - t0)
            if status != 200:
                raise RuntimeError(f"/v1/status answered {status}: {body[:200]!r}")
            time.sleep(STATUS_EVERY_S)
        took.sort()
        return {"p50": percentile(took, 50), "p99": percentile(took, 99), "count": len(took)}

    def close(self) -> None:
        if self.crowd is not None:
            self.crowd.close()
        if self.status is not None:
            self.status.close()
        super().close()

    def result(self) -> dict[str, Any]:
        """The part's record: settings, the baseline, each depth."""
        return {
            "settings": asdict(self.settings),
            "daemon_nofile": list(self.daemon_nofile) if self.daemon_nofile else None,
            "direct": self.direct,
            "levels": self.levels,
            "skipped": self.skipped,
            "fd_hard": self.fd_hard,
            "failures": self.failures,
        }
