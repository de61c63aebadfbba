"""The trace benchmark (issue 5): does the scheduler stop thrashing on bursty mixed traffic?

A seeded trace (``generate``: four kinds, each alternating idle periods and
Poisson bursts) is replayed, open loop, against the real daemon in front of
four simulated consumers (``replay``), once per ``scheduler.policy`` and
``scheduler.eviction`` (``lru``, ``cost``) on a fresh stack, and compared
with what a clairvoyant scheduler serving in arrival order needs
(``belady``). ``report`` does the arithmetic, ``plot`` draws who held the GPU
when.

Times in the trace are real-life seconds; the replay runs them ``scale``
times faster (0.1: a 10-minute trace in a minute), the daemon's time settings
(``max_skip_s``, ``min_residency_s``, ``aging_s``, ``queue_timeout_s``,
ComfyUI's ``hold_until`` interval) scaled with them. The figures are in
replay seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, Bench, CommonOptions, Session, busy_note, fmt, passed, verdict
from bench.trace.belady import Card, Rules, belady, exhaustive
from bench.trace.bound import reorder_bound
from bench.trace.generate import LOAD_MODELS, SCENARIOS, Trace, generate, scenario_params
from bench.trace.replay import Stack, StackSettings
from bench.trace.report import (
    COST_P99_LIMIT,
    COST_SAVING,
    eviction_ratios,
    one_job_s,
    summarize,
    targets,
)

POLICIES = ("fifo", "affinity")
EVICTIONS = ("lru", "cost")

__all__ = ["EVICTIONS", "LOAD_MODELS", "POLICIES", "SCENARIOS", "Options", "render", "run"]


def run_name(policy: str, eviction: str) -> str:
    """A run's name in the report: ``fifo/lru``."""
    return f"{policy}/{eviction}"


@dataclass
class Options(CommonOptions):
    """What to run; the defaults take about 2 min 10 s per run on the 2-core VM (4 runs)."""

    seed: int = 1
    scenario: str = "default"  # SCENARIOS: "warm-tier" adds vLLM in sleep mode, on 24 GiB
    card_mib: int | None = None  # None: the scenario's card (default 16384, warm-tier 24576)
    scale: float = 0.1
    duration_s: float = 600.0  # of trace (real-life) time
    busy: float = 1.0  # idle periods this many times shorter: more overlapping bursts
    policies: tuple[str, ...] = POLICIES
    evictions: tuple[str, ...] = EVICTIONS
    load_model: str = "mixed"  # per-consumer load times; "size": size x 1 s/GiB
    # The daemon's settings, in real-life seconds (scaled for the replay): its defaults.
    max_skip_s: float = 30.0
    min_residency_s: float = 10.0
    linger_s: float = 0.0
    aging_s: float = 30.0
    queue_timeout_s: float = 600.0
    cushion_mib: int = 256
    out_dir: Path = field(default_factory=lambda: OUT_DIR)
    plot: bool = True


class _Run(Bench):
    """One policy and eviction: a fresh stack, the trace fired at it, the raw record."""

    def __init__(
        self,
        opts: Options,
        trace: Trace,
        policy: str,
        eviction: str,
        tmp: Path,
        log: Callable[[str], None],
    ) -> None:
        self.budget_s = trace.params.duration_s * opts.scale * 3 + 30.0
        super().__init__(tmp, log, self.budget_s + 120.0)
        s = opts.scale
        assert opts.card_mib is not None  # resolved by ``run``
        self.stack = Stack(
            trace,
            StackSettings(
                policy=policy,
                card_mib=opts.card_mib,
                cushion_mib=opts.cushion_mib,
                max_skip_s=opts.max_skip_s * s,
                min_residency_s=opts.min_residency_s * s,
                linger_s=opts.linger_s * s,
                aging_s=opts.aging_s * s,
                queue_timeout_s=opts.queue_timeout_s * s,
                hold_interval_s=max(0.01, 0.5 * s),
                eviction=eviction,
            ),
            s,
            tmp,
            log,
            group=self.group,
        )
        self.raw: dict[str, Any] | None = None

    def start(self) -> None:
        self.stack.start()
        self.log(f"  daemon 127.0.0.1:{self.stack.broker_port}, consumers {self.stack.ports}")

    def measure(self) -> None:
        self.raw = self.stack.replay(self.budget_s)


def run(opts: Options, log: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Generate the trace, replay it per policy, compare; (result document, ok)."""
    session = Session(log)
    if opts.load_model not in LOAD_MODELS:
        raise ValueError(f"load_model: one of {LOAD_MODELS}")
    if opts.scenario not in SCENARIOS:
        raise ValueError(f"scenario: one of {tuple(SCENARIOS)}")
    if opts.card_mib is None:
        opts = dataclasses.replace(opts, card_mib=SCENARIOS[opts.scenario])
    assert opts.card_mib is not None
    params = scenario_params(
        opts.scenario, seed=opts.seed, duration_s=opts.duration_s, load_model=opts.load_model
    ).busier(opts.busy)
    trace = generate(params)
    trace_path = opts.out_dir / "trace.arrivals.json"
    trace.write(trace_path)
    rules = Rules.make(params.sizes_mib, Card(opts.card_mib, opts.cushion_mib))
    ref = belady(trace.consumers(), rules)
    first_loads = len(set(trace.consumers()))  # paid by everyone: not swaps
    ref_swaps = ref.swaps - first_loads
    optimum = exhaustive(trace.consumers(), rules) - first_loads
    log(
        f"trace: seed {opts.seed}, {len(trace.arrivals)} requests over {opts.duration_s:g} s, "
        f"replayed at x{opts.scale:g} on {opts.card_mib:,} MiB; Belady: {ref.loads} loads, "
        f"{ref.unloads} unloads, {ref_swaps} swaps (the exact optimum in arrival order: {optimum})"
    )
    summaries: dict[str, dict[str, Any]] = {}
    by_policy: dict[str, dict[str, dict[str, Any]]] = {}
    failures: list[str] = []
    load_s: dict[str, float] = {}
    work_s: dict[str, float] = {}
    with session.enter(opts.cpus, opts.keep):
        for policy in opts.policies:
            for eviction in opts.evictions:
                name = run_name(policy, eviction)
                log(f"== trace: {name}")
                tmp = session.tmp / f"{policy}-{eviction}"
                bench = _Run(opts, trace, policy, eviction, tmp, log)
                bench.execute()
                failures += [f"{name}: {f}" for f in bench.failures]
                if bench.raw is None:
                    continue
                load_s, work_s = bench.raw["load_s"], bench.raw["work_s"]
                summaries[name] = s = summarize(bench.raw)
                s["policy"], s["eviction"] = policy, eviction
                by_policy.setdefault(policy, {})[eviction] = s
                failures += [f"{name}: {p}" for p in s["problems"]]
                w = s["wait_s"]["all"]
                log(
                    f"  {s['loads']} loads, {s['unloads']} unloads, {s['swap_s']:.2f} s loading,"
                    f" makespan {s['makespan_s']:.1f} s, wait p99 {w['p99']:.2f} s,"
                    f" max {w['max']:.2f} s"
                )
    # Issue 5's affinity-against-fifo targets, under the first eviction order run.
    first_eviction = {
        p: e[opts.evictions[0]] for p, e in by_policy.items() if opts.evictions[0] in e
    }
    one_job = one_job_s(load_s, work_s) if load_s else math.nan
    window_s = opts.max_skip_s * opts.scale + one_job
    bound = None
    if not math.isnan(window_s):
        bound = reorder_bound(trace.timed(opts.scale), rules, window_s)
        log(f"no schedule that starts every request within {window_s:.2f} s needs fewer than "
            f"{bound} swaps")  # fmt: skip
    result = session.document(
        "trace",
        {},
        params={
            # Only off the default scenario: the default's document stays as it was.
            **({"scenario": opts.scenario} if opts.scenario != "default" else {}),
            "seed": opts.seed,
            "duration_s": opts.duration_s,
            "requests": len(trace.arrivals),
            "card_mib": opts.card_mib,
            "cushion_mib": opts.cushion_mib,
            "scale": opts.scale,
            "routing": dict(params.routing),
            "sizes_mib": dict(params.sizes_mib),
            "load_model": params.load_model,
            "evictions": list(opts.evictions),
            "scheduler_replay_s": {
                "max_skip_s": opts.max_skip_s * opts.scale,
                "min_residency_s": opts.min_residency_s * opts.scale,
                "linger_s": opts.linger_s * opts.scale,
                "aging_s": opts.aging_s * opts.scale,
                "queue_timeout_s": opts.queue_timeout_s * opts.scale,
            },
            "load_s": load_s,
            "work_s": work_s,
            "one_job_s": one_job,
            "trace_file": str(trace_path),
        },
        belady={
            "loads": ref.loads,
            "unloads": ref.unloads,
            "first_loads": first_loads,
            "swaps": ref_swaps,
        },
        optimum_swaps=optimum,
        bound={"swaps": bound, "window_s": window_s} if bound is not None else None,
        policies=summaries,
        failures=failures,
        analysis={
            "targets": targets(
                first_eviction, ref_swaps, opts.max_skip_s * opts.scale, one_job, bound
            ),
            "targets_eviction": opts.evictions[0],
            "eviction": eviction_ratios(by_policy),
        },
    )
    if opts.plot and summaries:
        result["png"] = _plot(result, trace, opts, log)
    return result, passed(result, opts.strict)


def _plot(result: dict[str, Any], trace: Trace, opts: Options, log: Callable[[str], None]) -> str:
    """Draw ``trace.png``; a missing matplotlib or a failed drawing costs the picture only."""
    try:
        from bench.trace.plot import draw

        arrivals = [(a.t * opts.scale, a.kind) for a in trace.arrivals]
        bursts = [(b.kind, b.start * opts.scale, b.end * opts.scale) for b in trace.bursts]
        return str(draw(result, arrivals, bursts, opts.out_dir / "trace.png"))
    except ImportError as e:
        log(f"trace: no picture ({e}): pip install matplotlib")
    except Exception as e:  # the figures are in the JSON whatever happens to the picture
        result["failures"].append(f"picture: {type(e).__name__}: {e}")
        log(f"trace: the picture failed: {type(e).__name__}: {e}")
    return ""


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    sched = p["scheduler_replay_s"]
    out = [
        "",
        f"trace: {p['scenario'] + ' scenario, ' if 'scenario' in p else ''}"
        f"seed {p['seed']}, {p['requests']} requests over {p['duration_s']:g} s of "
        f"trace time, replayed at x{p['scale']:g}; {p['card_mib']:,} MiB card, cushion "
        f"{p['cushion_mib']} MiB; " + ", ".join(f"{k}->{c}" for k, c in p["routing"].items()),
        f"scheduler (replay s): max_skip_s {sched['max_skip_s']:g}, min_residency_s "
        f"{sched['min_residency_s']:g}, linger_s {sched.get('linger_s', 0):g}, "
        f"aging_s {sched['aging_s']:g}; seconds below are "
        f"replay seconds (x{1 / p['scale']:g} for real life); swaps: loads + unloads, "
        "less each consumer's first load",
        f"load times ({p.get('load_model', 'size')} model, replay s): "
        + ", ".join(f"{c} {v:g}" for c, v in p.get("load_s", {}).items()),
        f"{'':<18} {'loads':>6} {'unloads':>7} {'swaps':>6} {'load s':>7} {'makespan':>9} "
        f"{'busy':>5} {'wait p50':>9} {'p99':>7} {'max':>7} {'not 200':>7}",
    ]
    pols = result["policies"]
    for name, s in pols.items():
        w = s["wait_s"]["all"]
        bad = sum(n for code, n in s["statuses"].items() if code != "200")
        out.append(
            f"{name:<18} {s['loads']:>6} {s['unloads']:>7} {s['swaps']:>6} "
            f"{fmt(s.get('swap_s', math.nan), '', 2):>7} {fmt(s['makespan_s'], ' s'):>9} "
            f"{fmt(100 * s['busy_fraction'], '%', 0):>5} "
            f"{fmt(w['p50'], '', 2):>9} {fmt(w['p99'], '', 2):>7} {fmt(w['max'], '', 2):>7} "
            f"{bad:>7}"
        )
    b = result["belady"]
    out.append(f"{'Belady (offline)':<18} {b['loads']:>6} {b['unloads']:>7} {b['swaps']:>6}")
    if result.get("optimum_swaps") is not None:
        out.append(f"{'optimum (offline)':<18} {'':>6} {'':>7} {result['optimum_swaps']:>6}")
    if result.get("bound"):
        bound = result["bound"]
        out.append(
            f"{'bound (any order)':<18} {'':>6} {'':>7} {bound['swaps']:>6}"
            f"   (offline: fewest swaps of any schedule starting every request within"
            f" {bound['window_s']:.2f} s)"
        )
    if pols:
        kinds = list(p["routing"])
        out.append("queue wait by kind, p50 / p99 / max (s):")
        out.append(f"{'':<14}" + "".join(f"{k:>22}" for k in kinds))
        for name, s in pols.items():
            cells = []
            for k in kinds:
                w = s["wait_s"].get(k)
                cells.append(
                    "-"
                    if not w
                    else f"{fmt(w['p50'], '', 2)} / {fmt(w['p99'], '', 2)} / {fmt(w['max'], '', 2)}"
                )
            out.append(f"{name:<14}" + "".join(f"{c:>22}" for c in cells))
        for name, s in pols.items():
            lw = s["largest_wait"]
            if lw:
                out.append(
                    f"largest wait, {name}: {lw['wait_s']:.2f} s (request {lw['i']}, {lw['kind']});"
                    f" max_skip_s {sched['max_skip_s']:g} + one job {fmt(p['one_job_s'], '', 2)}"
                    f" (longest load + work) = {fmt(sched['max_skip_s'] + p['one_job_s'], '', 2)}"
                )
    out += _eviction_lines(result)
    if len(result["params"].get("evictions", ())) > 1:
        out.append(
            f"issue 5's targets below: under eviction {result['analysis']['targets_eviction']}"
        )
    labels = {
        "half_the_swaps_of_fifo": "affinity swaps <= fifo's / 2",
        "no_more_swaps_than_belady": "affinity swaps <= Belady's",
        "p99_wait_within_1.2x_fifo": "affinity p99 wait <= 1.2 x fifo's",
        "max_wait_within_max_skip_plus_one_job": "affinity max wait <= max_skip_s + one job",
    }
    for key, t in result["analysis"]["targets"].items():
        out.append(
            f"target: {labels.get(key, key)}: {verdict(t['ok'])} "
            f"({fmt(float(t['value']), '', 2)} vs {fmt(float(t['limit']), '', 2)})"
            + ("" if t.get("reachable", True) else
               f"; out of reach: no schedule within the wait bound needs fewer than {t['bound']}")
        )  # fmt: skip
    if result.get("png"):
        out.append(f"picture: {result['png']}")
    out += busy_note(result)
    out += [f"FAILED: {failure}" for failure in result["failures"]]
    return "\n".join(out)


def _eviction_lines(result: dict[str, Any]) -> list[str]:
    """Swap-seconds per consumer, the learning, and cost against lru per policy."""
    pols = result["policies"]
    out: list[str] = []
    if any("swap_s" in s for s in pols.values()):
        out.append(
            "load seconds by consumer (less first loads: 'after first'); loads until the daemon"
            " had timed every consumer with a load route:"
        )
        for name, s in pols.items():
            if "swap_s" not in s:
                continue
            by = ", ".join(f"{c} {v:.2f}" for c, v in s["swap_s_by_consumer"].items())
            until = s["loads_until_learned"]
            learned = (
                "never all timed"
                if until is None
                else f"all timed after {until} loads ({s['learned_at_s']:.1f} s)"
            )
            never = f"; never timed: {', '.join(s['never_timed'])}" if s["never_timed"] else ""
            out.append(
                f"  {name:<14} {s['swap_s']:.2f} s ({by}); after first "
                f"{s['swap_s_after_first']:.2f} s; {learned}{never}"
            )
    for policy, r in result["analysis"].get("eviction", {}).items():
        out.append(
            f"target: {policy}: cost load seconds <= {1 - COST_SAVING:.1f} x lru's and p99 wait"
            f" <= {COST_P99_LIMIT:g} x lru's: {verdict(r['ok'])} (load s {r['swap_s']['cost']:.2f}"
            f" vs {r['swap_s']['lru']:.2f}: x{r['swap_s_ratio']:.2f}"
            f" [after first x{r['swap_s_after_first_ratio']:.2f}], p99 x{r['p99_ratio']:.2f},"
            f" loads x{r['loads_ratio']:.2f})"
        )
    return out
