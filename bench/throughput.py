"""The throughput benchmark: how much of the GPU's time the lease hand-off costs.

One consumer whose every job takes ``work_ms`` (2 ms: ``time.sleep`` in its
connection thread, like a GPU kernel the process waits on), two legs, three
with the broker's ``keepalive`` off:

- ``direct``: one client, back to back -> consumer (``POST /api/synthesize``):
  the consumer's own rate, one job after the other;
- ``direct-per-conn`` (only when the broker's ``keepalive`` is off): the same,
  with a connection of its own per request and ``Connection: close``, as the
  broker then sends them: the consumer's rate when it pays a connection per
  request;
- ``broker``: ``clients`` (16) concurrent keep-alive clients -> mgpumanager ->
  the same consumer (``POST /v1/tts``), ``max_concurrency: 1``: every request
  waits in the queue and takes the GPU lease when the one before releases it.

With enough clients the queue is never empty, so the broker leg's rate is the
consumer's rate minus what the broker puts *between* two jobs: reading the
answer, relaying it, releasing the lease, admitting the next ticket and
forwarding its request. The ratio broker/direct is that share (target >= 0.9);
``handoff_us`` is the same gap in microseconds per request. With ``keepalive``
off, broker/direct-per-conn is the broker's share once the consumer pays a
connection per request on both sides (no target).

Each client is a thread with a blocking ``KeepAliveClient``: cheap enough for
16 connections at ~500 requests a second (the threads wait in ``recv``, out
of the GIL). Both legs are warmed up, then each round runs them for
``seconds`` each, the order alternating; the figures are the medians over
rounds. The consumer counts the jobs that ran at once: more than one means
the lease leaked, and the run fails.

The default ``cpus="all"`` lets the kernel place the processes: 16 clients,
the broker and the consumer are busy at the same moments here, unlike the
strictly sequential latency benchmark.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import broker as broker_mod
from bench.client import (
    REQUEST_BODY,
    ConnectionPerRequestClient,
    HttpError,
    KeepAliveClient,
    build_request,
)
from bench.common import (
    Bench,
    CommonOptions,
    Session,
    busy_note,
    check_answer,
    fmt,
    median,
    passed,
    percentile,
    verdict,
)
from bench.profile import BrokerProfile
from bench.servers import http_get_json, proc_cpu_s, start_consumer

#: The broker leg's rate must be at least this share of the direct leg's.
TARGET_RATIO = 0.9


@dataclass
class Options(CommonOptions):
    """What to run; the defaults take about 25 s on 2 cores."""

    clients: int = 16
    work_ms: float = 2.0
    seconds: float = 2.0  # per leg and round
    warmup_s: float = 0.5  # per leg, untimed, first
    rounds: int = 5
    max_seconds: float = 60.0
    profile: str | None = None  # None | "cprofile" | "py-spy" | "handoff"
    keepalive: bool = False  # the broker keeps its connections to the consumer


@dataclass
class Leg:
    """A path to the consumer, its clients, and the rate of each round."""

    name: str
    path: str
    server_pid: int
    clients: list[KeepAliveClient]
    raw: bytes
    consumer_port: int
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request, per round
    idle_ns: list[int] = field(default_factory=list)  # the consumer's, between two jobs

    def check(self) -> None:
        """One request per client, whose answer must be the consumer's, byte for byte."""
        for client in self.clients:
            check_answer(self.name, *client.request(self.raw))

    def run(self, seconds: float, timed: bool) -> None:
        """Every client back to back for ``seconds``; record the rate if ``timed``."""
        self.consumer_stats()  # clears the consumer's idle times
        cpu0 = proc_cpu_s(self.server_pid)
        done = drive(self.clients, self.raw, seconds)
        cpu1 = proc_cpu_s(self.server_pid)
        idle = self.consumer_stats()["idle_ns"]
        if timed:
            self.rps.append(done / seconds)
            self.idle_ns += idle
            if cpu0 is not None and cpu1 is not None and done:
                self.cpu_us.append((cpu1 - cpu0) * 1e6 / done)

    def consumer_stats(self) -> dict[str, Any]:
        stats = http_get_json("127.0.0.1", self.consumer_port, "/api/stats")
        if not isinstance(stats, dict):
            raise RuntimeError("the consumer did not answer GET /api/stats")
        return stats


def drive(clients: list[KeepAliveClient], raw: bytes, seconds: float) -> int:
    """Run one thread per client, each sending ``raw`` back to back, for ``seconds``.

    Returns how many answers came back within the window. The requests still in
    flight at its end are answered (each thread stops after its current one)
    and not counted.
    """
    counts = [0] * len(clients)
    errors: list[str] = []
    start = threading.Barrier(len(clients) + 1)
    window_end = [0.0]

    def worker(i: int) -> None:
        request = clients[i].request
        clock = time.perf_counter
        start.wait()
        end = window_end[0]
        n = 0
        try:
            while True:
                status, body = request(raw)
                if status != 200:
                    errors.append(f"status {status}: {body[:200]!r}")
                    return
                if clock() > end:
                    return
                n += 1
        except (OSError, HttpError) as e:
            errors.append(f"client {i}: {e}")
        finally:
            counts[i] = n

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"client-{i}", daemon=True)
        for i in range(len(clients))
    ]
    for t in threads:
        t.start()
    window_end[0] = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 30.0)  # a request past the client's 10 s timeout has failed
    if any(t.is_alive() for t in threads):
        errors.append("a client did not finish within 30 s of the window's end")
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    return sum(counts)


class _Run(Bench):
    """The consumer and the broker in front of it, the two legs, what went wrong."""

    def __init__(self, opts: Options, tmp: Path, log: Callable[[str], None]) -> None:
        super().__init__(tmp, log, opts.max_seconds)
        self.opts = opts
        self.legs: list[Leg] = []
        self.consumer_port = 0
        self.profile = BrokerProfile(opts.profile, "throughput", tmp)
        self.lease: dict[str, Any] = {}

    def _leg(
        self, name: str, pid: int, port: int, path: str, clients: int, per_conn: bool = False
    ) -> None:
        """A leg of ``clients`` keep-alive clients, or with ``per_conn`` a connection a request."""
        raw = build_request("POST", path, "127.0.0.1", port, REQUEST_BODY, close=per_conn)
        kind = ConnectionPerRequestClient if per_conn else KeepAliveClient
        conns = [kind("127.0.0.1", port) for _ in range(clients)]
        self.legs.append(Leg(name, path, pid, conns, raw, self.consumer_port))

    def start(self) -> None:
        opts, tmp = self.opts, self.tmp
        proc, port = start_consumer(self.group, tmp, "consumer", ["--work-ms", f"{opts.work_ms:g}"])
        self.consumer_port = port
        self.log(f"consumer: 127.0.0.1:{port} (pid {proc.pid}), {opts.work_ms:g} ms a job")
        self._leg("direct", proc.pid, port, "/api/synthesize", 1)
        if not opts.keepalive:  # the broker pays a connection per request: so does this baseline
            self._leg("direct-per-conn", proc.pid, port, "/api/synthesize", 1, per_conn=True)
        proc, port = broker_mod.start_broker(
            self.group,
            tmp,
            broker_mod.one_consumer_config(
                self.consumer_port, max_concurrency=1, keepalive=opts.keepalive
            ),
            **self.profile.broker_options(self.consumer_port),
        )
        self.profile.started(proc.pid)
        self.log(
            f"broker: 127.0.0.1:{port} (pid {proc.pid}), max_concurrency 1, "
            f"keep-alive {'on' if opts.keepalive else 'off'}"
        )
        self._leg("broker", proc.pid, port, "/v1/tts", opts.clients)

    def measure(self) -> None:
        opts = self.opts
        for leg in self.legs:
            leg.check()
        self.log(f"warm-up: {opts.warmup_s:g} s per leg")
        for leg in self.legs:
            leg.run(opts.warmup_s, timed=False)
        self.profile.attach()
        self.log(f"timed: {opts.rounds} rounds x {opts.seconds:g} s per leg, order alternating")
        gc.collect()
        gc.disable()
        try:
            for r in range(opts.rounds):
                self.check_time(len(self.legs) * (opts.seconds + 1.0))
                order = self.legs if r % 2 == 0 else self.legs[::-1]
                for leg in order:
                    leg.run(opts.seconds, timed=True)
                self.log(
                    f"  round {r + 1}: "
                    + ", ".join(f"{leg.name} {leg.rps[-1]:,.0f}/s" for leg in self.legs)
                )
        finally:
            gc.enable()
            self.profile.detach()
        stats = self.legs[0].consumer_stats()
        self.lease = {k: stats[k] for k in ("jobs", "max_concurrent")}
        if stats.get("max_concurrent") != 1:
            self.failures.append(
                f"the consumer ran {stats.get('max_concurrent')} jobs at once: "
                "the GPU lease let more than max_concurrency through"
            )

    def close(self) -> None:
        self.profile.detach()
        for leg in self.legs:
            for client in leg.clients:
                client.close()
        super().close()


def idle_summary(idle_ns: list[int]) -> dict[str, float]:
    """Percentiles of the consumer's idle times between jobs, in µs."""
    s = sorted(idle_ns)
    return {f"p{p:g}": percentile(s, p) for p in (50, 90, 99)} | {"count": len(s)}


def analyze(legs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratio of the median rates, the hand-off gap, and the target."""
    if "direct" not in legs or "broker" not in legs:
        return {}
    direct, broker = legs["direct"]["rps"], legs["broker"]["rps"]
    if not (direct > 0 and broker > 0):
        return {}
    ratio = broker / direct
    result: dict[str, Any] = {
        "ratio_broker_over_direct": ratio,
        "job_us": 1e6 / direct,
        "handoff_us": 1e6 / broker - 1e6 / direct,
        "targets": {
            "broker_rps_ge_0.9x_direct": {
                "value": ratio,
                "limit": TARGET_RATIO,
                "ok": ratio >= TARGET_RATIO,
            }
        },
    }
    per_conn = legs.get("direct-per-conn", {}).get("rps", 0.0)
    if per_conn > 0:
        result |= {
            "ratio_broker_over_direct_per_conn": broker / per_conn,
            "job_per_conn_us": 1e6 / per_conn,
            "handoff_over_per_conn_us": 1e6 / broker - 1e6 / per_conn,
        }
    return result


def run(opts: Options, log: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Run the benchmark; return (result document, whether it ran and held)."""
    session = Session(log)
    with session.enter(opts.cpus, opts.keep):
        bench = _Run(opts, session.tmp, log)
        bench.execute()
        report = bench.profile.report()  # after close: the broker has stopped
    legs = {
        leg.name: {
            "path": leg.path,
            "clients": len(leg.clients),
            "rps": median(leg.rps),
            "rps_rounds": [round(x, 1) for x in leg.rps],
            "server_cpu_us_per_request": median(leg.cpu_us),
            "consumer_idle_us": idle_summary(leg.idle_ns),
            "reconnects": sum(c.reconnects for c in leg.clients),
        }
        for leg in bench.legs
        if leg.rps
    }
    result = session.document(
        "throughput",
        {},
        params={
            "clients": opts.clients,
            "work_ms": opts.work_ms,
            "seconds": opts.seconds,
            "warmup_s": opts.warmup_s,
            "rounds": opts.rounds,
            "max_concurrency": 1,
            "profile": opts.profile,
            "keepalive": opts.keepalive,
        },
        legs=legs,
        consumer_jobs=bench.lease,
        failures=bench.failures,
        analysis=analyze(legs),
    )
    if report:
        result["profile_report"] = report
    if bench.profile.handoff is not None:
        result["handoff"] = bench.profile.handoff
    return result, passed(result, opts.strict)


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    out = [
        "",
        f"throughput, {p['work_ms']:g} ms a job, max_concurrency {p['max_concurrency']}, "
        f"median of {p['rounds']} rounds x {p['seconds']:g} s, cpus={p['cpus']}, "
        f"broker keep-alive {'on' if p.get('keepalive') else 'off'}",
        f"{'leg':<15} {'clients':>7} {'req/s':>8} {'idle p50':>9} {'idle p99':>9} "
        f"{'cpu/req':>9}  rounds (req/s)",
    ]
    for name, leg in result["legs"].items():
        rounds = " ".join(f"{x:,.0f}" for x in leg["rps_rounds"])
        idle = leg["consumer_idle_us"]
        out.append(
            f"{name:<15} {leg['clients']:>7} {fmt(leg['rps']):>8} {fmt(idle['p50']):>9} "
            f"{fmt(idle['p99']):>9} {fmt(leg['server_cpu_us_per_request']):>9}  {rounds}"
        )
    out += [
        "  (idle: µs the consumer waits between a job's answer and the next request;",
        "   cpu/req: µs of CPU the leg's server process - consumer, broker - spends a request)",
    ]
    a = result["analysis"]
    if a:
        out.append(
            f"broker / direct: {a['ratio_broker_over_direct']:.3f}; a job takes "
            f"{a['job_us']:,.0f} µs direct, the hand-off adds {a['handoff_us']:,.0f} µs a request"
        )
        if "ratio_broker_over_direct_per_conn" in a:
            out.append(
                f"broker / direct-per-conn: {a['ratio_broker_over_direct_per_conn']:.3f}; "
                f"a job takes {a['job_per_conn_us']:,.0f} µs with a connection each, the "
                f"broker adds {a['handoff_over_per_conn_us']:,.0f} µs a request to that (no target)"
            )
        t = a["targets"]["broker_rps_ge_0.9x_direct"]
        out.append(
            f"target: broker >= {t['limit']:g}x direct req/s: {verdict(t['ok'])} ({t['value']:.3f})"
        )
    jobs = result.get("consumer_jobs") or {}
    if jobs:
        out.append(
            f"consumer: {jobs.get('jobs')} jobs, at most {jobs.get('max_concurrent')} at once"
        )
    out += busy_note(result)
    if p.get("profile"):
        out.append(f"NOTE: the broker ran under {p['profile']}: its figures are inflated")
    out += [f"FAILED: {failure}" for failure in result["failures"]]
    return "\n".join(out)
