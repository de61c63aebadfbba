"""The latency benchmark: what nginx and what the broker add to one small request.

Three legs send the same ~200-byte JSON POST over one keep-alive connection each:

- ``direct``: client -> consumer (``POST /api/synthesize``);
- ``nginx``:  client -> nginx -> consumer (the reference reverse proxy);
- ``broker``: client -> mgpumanager -> consumer (``POST /v1/tts``).

With the broker's ``keepalive`` off, a fourth leg, ``direct-per-conn``, sends
the direct leg's request with ``Connection: close`` on a connection of its own
per request, as the broker then does: the broker's latency minus that leg's is
what the broker adds besides the consumer's own cost of a connection.

The figure of interest is each proxy's *added* latency: its percentile minus
the direct leg's. Every leg is warmed up first (connection pools, the broker's
first health probe, CPython's caches), then the timed requests are split into
rounds run leg after leg, the order rotating each round, so drift (CPU
frequency, other load on a 2-core machine) falls on all legs alike. The
client's garbage collector is off while timing so its pauses do not land on
one leg.

By default (``cpus="one"``) the benchmark pins itself, and so every process it
starts, to one CPU. The requests are strictly sequential, so nothing needs a
second core, and on a small VM a wake-up that crosses CPUs costs tens of
microseconds and varies from run to run (it doubled nginx's added latency in
our runs on 2 vCPUs). Pinned, the figures are each hop's CPU cost and context
switches: stable between runs and the stricter comparison. ``cpus="all"``
lets the kernel place the processes, as a production host would.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import broker as broker_mod
from bench import nginx as nginx_mod
from bench.client import (
    REQUEST_BODY,
    ConnectionPerRequestClient,
    KeepAliveClient,
    build_request,
)
from bench.common import (
    Bench,
    BenchTimeout,
    CommonOptions,
    Session,
    busy_note,
    check_answer,
    passed,
    percentile,
)
from bench.common import fmt as _fmt
from bench.consumer import SYNTH_BODY
from bench.profile import BrokerProfile
from bench.servers import StartError, proc_cpu_s, start_consumer

#: The targets the broker is held to.
TARGET_ADDED_P50_MS = 1.0
TARGET_RATIO = 2.0


@dataclass
class Options(CommonOptions):
    """What to run; the defaults take well under two minutes on 2 cores."""

    requests: int = 10000
    warmup: int = 1000
    rounds: int = 5
    nginx: bool = True
    broker: bool = True
    max_seconds: float = 110.0
    profile: str | None = None  # None | "cprofile" | "py-spy"
    cpus: str = "one"
    keepalive: bool = False  # the broker keeps its connections to the consumer


@dataclass
class Leg:
    """One path to the consumer, its connection, and what it measured."""

    name: str
    path: str
    server_pid: int
    client: KeepAliveClient
    raw: bytes
    samples: list[int] = field(default_factory=list)
    server_cpu_s: float = 0.0

    def check(self) -> None:
        """One request whose answer must be the consumer's, byte for byte."""
        check_answer(self.name, *self.client.request(self.raw))

    def run(self, n: int, deadline_ns: int, timed: bool) -> None:
        """``n`` requests back to back; record each one's latency if ``timed``."""
        request = self.client.request
        raw = self.raw
        clock = time.perf_counter_ns
        append = self.samples.append
        cpu0 = proc_cpu_s(self.server_pid) if timed else None
        for _ in range(n):
            t0 = clock()
            if t0 > deadline_ns:
                raise BenchTimeout(f"time budget spent during the {self.name} leg")
            status, _body = request(raw)
            t1 = clock()
            if status != 200:
                raise RuntimeError(f"{self.name}: status {status}: {_body[:300]!r}")
            if timed:
                append(t1 - t0)
        cpu1 = proc_cpu_s(self.server_pid) if timed else None
        if cpu0 is not None and cpu1 is not None:
            self.server_cpu_s += cpu1 - cpu0


def summarize(leg: Leg) -> dict[str, Any]:
    """A leg's figures, in microseconds."""
    s = sorted(leg.samples)
    n = len(s)
    return {
        "path": leg.path,
        "count": n,
        "p50_us": percentile(s, 50),
        "p90_us": percentile(s, 90),
        "p99_us": percentile(s, 99),
        "p999_us": percentile(s, 99.9),
        "min_us": s[0] / 1000.0 if s else math.nan,
        "max_us": s[-1] / 1000.0 if s else math.nan,
        "mean_us": sum(s) / n / 1000.0 if n else math.nan,
        "reconnects": leg.client.reconnects,
        "server_cpu_us_per_request": leg.server_cpu_s * 1e6 / n if n else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def analyze(legs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Added latency over direct, the broker/nginx ratio, and the targets."""
    direct = legs["direct"]
    added: dict[str, dict[str, float]] = {}
    for name in ("nginx", "broker"):
        if name in legs:
            added[name] = {
                f"{p}_us": legs[name][f"{p}_us"] - direct[f"{p}_us"] for p in ("p50", "p99")
            }
    ratio: dict[str, float | None] = {}
    if "nginx" in added and "broker" in added:
        for p in ("p50", "p99"):
            ratio[f"{p}"] = _ratio(added["broker"][f"{p}_us"], added["nginx"][f"{p}_us"])
    over_per_conn: dict[str, dict[str, float]] = {}
    if "broker" in legs and "direct-per-conn" in legs:
        over_per_conn["broker"] = {
            f"{p}_us": legs["broker"][f"{p}_us"] - legs["direct-per-conn"][f"{p}_us"]
            for p in ("p50", "p99")
        }
    targets: dict[str, Any] = {}
    if "broker" in added:
        b50 = added["broker"]["p50_us"] / 1000.0
        targets["broker_added_p50_le_1ms"] = {
            "value_ms": b50,
            "limit_ms": TARGET_ADDED_P50_MS,
            "ok": b50 <= TARGET_ADDED_P50_MS,
        }
        if ratio.get("p50") is not None:
            targets["broker_added_le_2x_nginx_added_p50"] = {
                "value": ratio["p50"],
                "limit": TARGET_RATIO,
                "ok": ratio["p50"] <= TARGET_RATIO,  # type: ignore[operator]
            }
    return {
        "added": added,
        "added_over_direct_per_conn": over_per_conn,
        "ratio_broker_over_nginx": ratio,
        "targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    """The human-readable table."""
    legs = result["legs"]
    out = [
        "",
        "latency, one keep-alive connection per leg (direct-per-conn: one per request), "
        f"{result['params']['requests']} timed "
        f"requests of {result['params']['body_bytes']} B each, "
        f"cpus={result['params']['cpus']}, broker keep-alive "
        f"{'on' if result['params'].get('keepalive') else 'off'} (µs)",
        f"{'leg':<15} {'p50':>9} {'p90':>9} {'p99':>9} {'p99.9':>9} {'mean':>9} "
        f"{'cpu/req':>9} {'reconn':>6}",
    ]
    for name, s in legs.items():
        out.append(
            f"{name:<15} {_fmt(s['p50_us']):>9} {_fmt(s['p90_us']):>9} {_fmt(s['p99_us']):>9} "
            f"{_fmt(s['p999_us']):>9} {_fmt(s['mean_us']):>9} "
            f"{_fmt(s['server_cpu_us_per_request']):>9} {s['reconnects']:>6}"
        )
    out.append("  (cpu/req: CPU time of the leg's server process - consumer, nginx, broker)")
    a = result["analysis"] or {"added": {}, "targets": {}}
    if a["added"]:
        out += ["", f"{'added over direct':<20} {'p50':>9} {'p99':>9}"]
        for name, d in a["added"].items():
            out.append(f"{name:<20} {_fmt(d['p50_us']):>9} {_fmt(d['p99_us']):>9}")
        r = a["ratio_broker_over_nginx"]
        if r:
            out.append(
                f"{'broker / nginx':<20} {_fmt(r.get('p50'), 'x'):>9} {_fmt(r.get('p99'), 'x'):>9}"
            )
        for name, d in (a.get("added_over_direct_per_conn") or {}).items():
            out.append(
                f"{name + ' over per-conn':<20} {_fmt(d['p50_us']):>9} {_fmt(d['p99_us']):>9}"
            )
    for skipped, why in result["skipped"].items():
        out.append(f"{skipped} leg skipped: {why}")
    t = a["targets"]
    if t:
        out.append("")
        if "broker_added_p50_le_1ms" in t:
            x = t["broker_added_p50_le_1ms"]
            out.append(
                f"target: broker adds <= {x['limit_ms']:g} ms at p50: "
                f"{'PASS' if x['ok'] else 'FAIL'} ({x['value_ms']:.3f} ms)"
            )
        if "broker_added_le_2x_nginx_added_p50" in t:
            x = t["broker_added_le_2x_nginx_added_p50"]
            out.append(
                f"target: broker adds <= {x['limit']:g}x what nginx adds (p50): "
                f"{'PASS' if x['ok'] else 'FAIL'} ({x['value']:.1f}x)"
            )
        else:
            out.append("target: broker vs nginx not checked (no nginx figure)")
    out += busy_note(result)
    if result["params"].get("profile"):
        out.append(
            f"NOTE: the broker ran under {result['params']['profile']}: its figures are inflated"
        )
    return "\n".join(out)


class _Run(Bench):
    """One benchmark run: the helper processes, the legs, and what went wrong."""

    def __init__(self, opts: Options, tmp: Path, log: Callable[[str], None]) -> None:
        super().__init__(tmp, log, opts.max_seconds)
        self.opts = opts
        self.legs: list[Leg] = []
        self.skipped: dict[str, str] = {}
        self.host: dict[str, Any] = {}
        self.profile = BrokerProfile(opts.profile, "broker", tmp)
        self.deadline_ns = time.perf_counter_ns() + int(opts.max_seconds * 1e9)

    def _leg(self, name: str, pid: int, port: int, path: str, per_conn: bool = False) -> None:
        """A leg over one keep-alive connection, or with ``per_conn`` a connection a request."""
        kind = ConnectionPerRequestClient if per_conn else KeepAliveClient
        client = kind("127.0.0.1", port)
        raw = build_request("POST", path, "127.0.0.1", port, REQUEST_BODY, close=per_conn)
        self.legs.append(Leg(name, path, pid, client, raw))

    def start(self) -> None:
        """Start the consumer, then nginx and the broker in front of it, if they can run."""
        opts, tmp = self.opts, self.tmp
        proc, port = start_consumer(self.group, tmp, "consumer")
        consumer_port = port
        self.log(f"consumer: 127.0.0.1:{port} (pid {proc.pid})")
        self._leg("direct", proc.pid, port, "/api/synthesize")
        if opts.broker and not opts.keepalive:  # the broker's connection per request, alone
            self._leg("direct-per-conn", proc.pid, port, "/api/synthesize", per_conn=True)

        if not opts.nginx:
            self.skipped["nginx"] = "--no-nginx"
        elif not nginx_mod.nginx_available():
            self.skipped["nginx"] = (
                f"{nginx_mod.NGINX} not found; install Debian's nginx "
                "(apt-get install nginx) to measure the reference proxy"
            )
            self.log(f"nginx: SKIPPED - {self.skipped['nginx']}")
        else:
            proc, port = nginx_mod.start_nginx(self.group, tmp, consumer_port)
            self.host["nginx_version"] = version = nginx_mod.nginx_version()
            self.log(f"nginx: 127.0.0.1:{port} (pid {proc.pid}, {version})")
            self._leg("nginx", proc.pid, port, "/api/synthesize")

        if not opts.broker:
            self.skipped["broker"] = "--no-broker"
            return
        try:
            proc, port = broker_mod.start_broker(
                self.group,
                tmp,
                broker_mod.one_consumer_config(consumer_port, keepalive=opts.keepalive),
                **self.profile.broker_options(consumer_port),
            )
        except StartError as e:
            first = str(e).split("\n", 1)[0]
            self.skipped["broker"] = f"the daemon did not start: {first} (its log is above)"
            self.failures.append("the broker did not start")
            self.log(f"broker: FAILED TO START - {e}")
            return
        self.profile.started(proc.pid)
        self.log(f"broker: 127.0.0.1:{port} (pid {proc.pid})")
        self._leg("broker", proc.pid, port, "/v1/tts")

    def measure(self) -> None:
        """Check each leg, warm all up, then time the rounds, legs interleaved."""
        opts = self.opts
        for leg in self.legs:
            leg.check()
        self.log(f"warm-up: {opts.warmup} requests per leg")
        for leg in self.legs:
            leg.run(opts.warmup, self.deadline_ns, timed=False)
        self.profile.attach()
        per_round = max(1, opts.requests // opts.rounds)
        self.log(f"timed: {opts.rounds} rounds x {per_round} requests per leg, order rotating")
        gc.collect()
        gc.disable()
        try:
            for r in range(opts.rounds):
                k = r % len(self.legs)
                for leg in self.legs[k:] + self.legs[:k]:
                    leg.run(per_round, self.deadline_ns, timed=True)
        finally:
            gc.enable()
            self.profile.detach()

    def close(self) -> None:
        """Stop the profiler, close the connections, stop every process."""
        self.profile.detach()
        for leg in self.legs:
            leg.client.close()
        super().close()


def run(opts: Options, log: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Run the benchmark; return (result document, whether everything ran and held)."""
    session = Session(log)
    with session.enter(opts.cpus, opts.keep):
        bench = _Run(opts, session.tmp, log)
        bench.execute()
        report = bench.profile.report()

    summaries = {leg.name: summarize(leg) for leg in bench.legs if leg.samples}
    result = session.document(
        "latency",
        bench.host,
        params={
            "requests": len(bench.legs[0].samples) if bench.legs else 0,
            "warmup": opts.warmup,
            "rounds": opts.rounds,
            "body_bytes": len(REQUEST_BODY),
            "response_bytes": len(SYNTH_BODY),
            "profile": opts.profile,
            "keepalive": opts.keepalive,
        },
        legs=summaries,
        skipped=bench.skipped,
        failures=bench.failures,
        analysis=analyze(summaries) if "direct" in summaries else {},
    )
    if report:
        result["profile_report"] = report
    return result, passed(result, opts.strict)
