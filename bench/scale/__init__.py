"""The scale benchmark: what the daemon costs as the work grows, each figure by its baseline.

Four parts, each with its baseline measured in the same run:

- ``depth`` (``depth.py``): N requests waiting for one 20 ms consumer, N from
  100 to 10,000: jobs/s against the consumer's own rate, its idle time
  between jobs against that at 100 waiting, the daemon's CPU per job, its
  RSS, and ``/v1/status`` latency while loaded;
- ``sse`` (``swaps.py``): swaps per second with 1,000 ``/v1/events``
  subscribers against none;
- ``fdlimit`` (``fdlimit.py``): 1,100 clients at once against the daemon at
  ``ulimit -n 1024``: who got an answer, and whether the consumer was blamed;
- ``queue`` (``queue_cost.py``): a release and a cancel-all with 20,000 waiting, in
  process, against the old full-scan queue.

This process raises its own soft open-files limit to the hard one first (the
children inherit it; the daemon raises its own anyway), since the depth part
holds 10,000 connections on each side. The targets are reported as met or
not; only ``--strict`` fails the run on them.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.common import CommonOptions, Session, busy_note, fmt, passed
from bench.scale import queue_cost
from bench.scale.depth import FD_MARGIN, DepthRun, DepthSettings
from bench.scale.fdlimit import EMFILE_CLOSED, FdRun, FdSettings
from bench.scale.swaps import SwapRun, SwapSettings

PARTS = ("depth", "sse", "fdlimit", "queue")

#: Targets: at the deepest queue, jobs/s at least this share of the consumer's own rate ...
RATE_SHARE = 0.95
#: ... and its idle time (p50) at most this many times that at the shallowest.
GAP_GROWTH = 1.5
#: Swaps/s with the subscribers at least this share of swaps/s without (cost <= 5%).
SWAP_SHARE = 0.95
#: In process: a release at most this long, and cancelling every waiting request.
RELEASE_US = 50.0
CANCEL_ALL_S = 0.2


@dataclass
class Options(CommonOptions):
    """What to run; the defaults take about 2 min 30 s on the 2-core VM."""

    parts: tuple[str, ...] = PARTS
    depths: tuple[int, ...] = DepthSettings.depths
    work_ms: float = DepthSettings.work_ms
    window_s: float = DepthSettings.seconds
    subscribers: int = SwapSettings.subscribers


@contextlib.contextmanager
def raised_nofile() -> Iterator[dict[str, int]]:
    """This process's soft ``RLIMIT_NOFILE`` at the hard limit while the benchmark runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        yield {"soft_before": soft, "soft": now, "hard": hard}
    finally:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Part(Protocol):
    """A part with processes: a ``Bench`` whose ``result`` is its record."""

    def execute(self) -> None: ...

    def result(self) -> dict[str, Any]: ...


def _part(part: Part) -> dict[str, Any]:
    """Run one part's processes and measurements, always stopping them; its record."""
    part.execute()
    return part.result()


def _workdir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


def run(opts: Options, log: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Run the parts asked for; return (result document, whether they ran and held)."""
    session = Session(log)
    parts: dict[str, dict[str, Any]] = {}
    with raised_nofile() as nofile, session.enter(opts.cpus, opts.keep):
        log(f"open files: soft {nofile['soft']} (was {nofile['soft_before']}), "
            f"hard {nofile['hard']}")  # fmt: skip
        tmp = session.tmp
        if "depth" in opts.parts:
            log("== scale: queue depth")
            settings = DepthSettings(opts.depths, opts.work_ms, opts.window_s)
            parts["depth"] = _part(DepthRun(settings, nofile["hard"], _workdir(tmp, "depth"), log))
        if "sse" in opts.parts:
            log("== scale: SSE subscribers")
            swaps = SwapSettings(opts.subscribers)
            parts["sse"] = _part(SwapRun(swaps, _workdir(tmp, "sse"), log))
        if "fdlimit" in opts.parts:
            log("== scale: fd limit")
            fd = FdSettings(work_ms=opts.work_ms)
            parts["fdlimit"] = _part(FdRun(fd, _workdir(tmp, "fdlimit"), log))
        if "queue" in opts.parts:
            log("== scale: the queue in process")
            parts["queue"] = queue_cost.measure(queue_cost.QueueSettings(), log)
    result = session.document(
        "scale",
        {"nofile": nofile},
        params={"parts": list(opts.parts), "work_ms": opts.work_ms, "window_s": opts.window_s},
        parts=parts,
        failures=[f"{name}: {f}" for name, part in parts.items() for f in part["failures"]],
        analysis={"targets": targets(parts)},
    )
    return result, passed(result, opts.strict)


def _target(value: float | None, limit: float, ok: bool) -> dict[str, Any]:
    return {"value": value, "limit": limit, "ok": ok}


def _at_least(value: float, limit: float) -> dict[str, Any]:
    return _target(value, limit, value >= limit)


def _at_most(value: float, limit: float) -> dict[str, Any]:
    return _target(value, limit, value <= limit)


def depth_targets(depth: dict[str, Any]) -> dict[str, Any]:
    """At the deepest queue: the share of the consumer's rate, the idle time's growth."""
    levels, direct = depth.get("levels") or [], depth.get("direct") or {}
    if len(levels) < 2 or not direct:
        return {}
    first, last = levels[0], levels[-1]
    share = last["jobs_per_s"] / direct["jobs_per_s"]
    growth = last["idle_us"]["p50"] / first["idle_us"]["p50"]
    n, m = last["depth"], first["depth"]
    return {
        f"jobs_per_s_at_{n}_ge_{RATE_SHARE}x_direct": _at_least(share, RATE_SHARE),
        f"idle_p50_at_{n}_le_{GAP_GROWTH}x_at_{m}": _at_most(growth, GAP_GROWTH),
    }


def targets(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every target whose figures the run has: value, limit, met."""
    out: dict[str, Any] = depth_targets(parts.get("depth", {}))
    legs = parts.get("sse", {}).get("legs", {})
    if "none" in legs and "subscribers" in legs and legs["none"]["swaps_per_s"] > 0:
        share = legs["subscribers"]["swaps_per_s"] / legs["none"]["swaps_per_s"]
        out["swaps_with_subscribers_ge_0.95x_none"] = _at_least(share, SWAP_SHARE)
    fd = parts.get("fdlimit", {})
    if fd.get("outcomes"):
        missing = fd["outcomes"].get("no answer", 0)
        out["fdlimit_every_client_answered"] = _target(missing, 0, missing == 0)
        health = fd.get("health") or {}
        unhealthy = health.get("unhealthy")
        ok = unhealthy == 0 and health.get("polls", 0) > 0
        out["fdlimit_consumer_never_unhealthy"] = _target(unhealthy, 0, ok)
    grouped = (parts.get("queue", {}).get("queues") or {}).get("grouped")
    if grouped:
        release, cancel = grouped["release_us"], grouped["cancel_s"]
        out["queue_release_le_50us"] = _at_most(release, RELEASE_US)
        ok = cancel <= CANCEL_ALL_S and grouped["cancel_complete"]
        out["queue_cancel_all_le_0.2s"] = _target(cancel, CANCEL_ALL_S, ok)
    return out


def met(target: dict[str, Any] | None) -> str:
    if target is None:
        return "not measured"
    return "met" if target["ok"] else "NOT met"


#: The depth table's columns and their widths.
DEPTH_COLUMNS = (("waiting", 8), ("jobs/s", 7), ("share", 6), ("idle p50", 9), ("idle p99", 9),
                 ("cpu/job", 8), ("RSS MiB", 8), ("status p50", 11), ("status p99", 11),
                 ("fill s", 7))  # fmt: skip


def _row(cells: list[str]) -> str:
    return " ".join(
        cell.rjust(width) for cell, (_, width) in zip(cells, DEPTH_COLUMNS, strict=True)
    )


def _depth_row(label: str, level: dict[str, Any], direct_rate: float | None) -> str:
    """One row: the baseline (no daemon figures) or a depth."""
    share = level["jobs_per_s"] / direct_rate if direct_rate else None
    idle, status = level["idle_us"], level.get("status_us") or {}
    return _row(
        [
            label,
            fmt(level["jobs_per_s"], digits=2),
            fmt(share, digits=3),
            fmt(idle["p50"], digits=0),
            fmt(idle["p99"], digits=0),
            fmt(level.get("cpu_us_per_job"), digits=0),
            fmt(level.get("rss_mib"), digits=0),
            fmt(status.get("p50"), digits=0),
            fmt(status.get("p99"), digits=0),
            fmt(level.get("fill_s")),
        ]
    )


def render_depth(depth: dict[str, Any], tg: dict[str, Any]) -> list[str]:
    s, direct = depth["settings"], depth.get("direct") or {}
    nofile = "/".join(depth.get("daemon_nofile") or ["?", "?"])
    out = [
        "",
        f"queue depth: one consumer, {s['work_ms']:g} ms a job, max_concurrency 1, keep-alive "
        f"off; {s['seconds']:g} s a depth; daemon open files soft/hard {nofile}",
        _row([name for name, _ in DEPTH_COLUMNS]),
    ]
    rate = direct.get("jobs_per_s")
    if direct:
        out.append(_depth_row("direct", direct, rate))
    out += [_depth_row(f"{level['depth']:,}", level, rate) for level in depth.get("levels", [])]
    out += [
        "  (share: of the direct rate; idle: µs the consumer waits between two jobs; cpu/job:",
        "   the daemon's µs of CPU a job; status: GET /v1/status, µs, one every 10 ms)",
    ]
    out += [f"  skipped {n:,} waiting: needs an open-files hard limit of {n + FD_MARGIN:,}, "
            f"the run has {depth['fd_hard']:,} (ulimit -Hn)" for n in depth["skipped"]]  # fmt: skip
    for key, t in tg.items():
        if key.startswith("jobs_per_s_at_"):
            out.append(f"target: jobs/s >= {t['limit']:g}x the consumer's own rate at the deepest "
                       f"queue: {met(t)} ({t['value']:.3f})")  # fmt: skip
        elif key.startswith("idle_p50_at_"):
            out.append(f"target: idle p50 at the deepest queue within {t['limit']:g}x that at the "
                       f"shallowest: {met(t)} ({t['value']:.2f}x)")  # fmt: skip
    return out


def render_sse(sse: dict[str, Any], tg: dict[str, Any]) -> list[str]:
    s, legs = sse["settings"], sse["legs"]
    out = [
        "",
        f"SSE subscribers: swaps/s (an unload and a load each), one client alternating two "
        f"consumers that cannot coexist; median of {s['rounds']} rounds x {s['seconds']:g} s",
        f"{'subscribers':>11} {'swaps/s':>8} {'share':>6} {'cpu/swap ms':>12} "
        f"{'readers ms':>11}  rounds",
    ]
    none = legs.get("none", {}).get("swaps_per_s")
    for name, leg in legs.items():
        count = 0 if name == "none" else s["subscribers"]
        share = leg["swaps_per_s"] / none if none else float("nan")
        out.append(
            f"{count:>11,} {fmt(leg['swaps_per_s'], digits=2):>8} {fmt(share, digits=3):>6} "
            f"{fmt(leg['daemon_cpu_ms_per_swap'], digits=2):>12} "
            f"{fmt(leg.get('subscribers_cpu_ms_per_swap'), digits=2):>11}  "
            + " ".join(f"{x:.2f}" for x in leg["rounds"])
        )
    events = legs.get("subscribers", {}).get("events")
    if events:
        last, spread = events["last_after_at_ms"], events["first_to_last_ms"]
        out.append(
            f"  {events['count']} events heard by all {s['subscribers']:,} streams: the last "
            f"stream heard each {fmt(last['p50'])} ms after its 'at' at p50 (max "
            f"{fmt(last['max'])}), {fmt(spread['p50'])} ms after the first (max "
            f"{fmt(spread['max'])}); heard by some only: {events['heard_by_some_only']}, "
            f"streams dropped: {events['dropped_streams']}"
        )
    t = tg.get("swaps_with_subscribers_ge_0.95x_none")
    if t:
        out.append(
            f"target: {s['subscribers']:,} subscribers cost <= 5% of swaps/s: {met(t)} "
            f"({t['value']:.3f} of none: {100 * (1 - t['value']):.1f}% cost)"
        )
    return out


def render_fdlimit(fd: dict[str, Any], tg: dict[str, Any]) -> list[str]:
    s, outcomes, health = fd["settings"], fd["outcomes"], fd.get("health") or {}
    nofile = "/".join(fd.get("daemon_nofile") or ["?", "?"])
    out = [
        "",
        f"fd limit: daemon under prlimit --nofile={s['limit']}:{s['limit']} (open files "
        f"soft/hard {nofile}), {s['clients']:,} clients at once, {s['work_ms']:g} ms jobs, "
        f"max_queue {s['max_queue']}",
        "  "
        + ", ".join(f"{k}: {v:,}" for k, v in sorted(outcomes.items()))
        + f" (the burst took {fd['took_s']:.1f} s)",
        f"  health: {health.get('polls', 0)} polls of /v1/status, consumer unhealthy in "
        f"{health.get('unhealthy')}, no answer to {health.get('failed')}, at most "
        f"{health.get('most_queued')} queued",
    ]
    logged = fd.get("daemon_log") or {}
    if logged:
        out.append(
            f"  daemon's log: {logged.get(EMFILE_CLOSED)} connections closed unanswered by "
            f"Twisted when accept hit EMFILE; 'Too many open files': "
            f"{logged.get('Too many open files')}"
        )
    if fd.get("no_answer_reasons"):
        out.append(f"  no answer: {fd['no_answer_reasons']}")
    t = tg.get("fdlimit_every_client_answered")
    if t:
        out.append(f"target: every client gets an HTTP answer: {met(t)} ({t['value']} without)")
    t = tg.get("fdlimit_consumer_never_unhealthy")
    if t:
        out.append(f"target: the consumer is never marked unhealthy: {met(t)}")
    return out


def render_queue(q: dict[str, Any], tg: dict[str, Any]) -> list[str]:
    s = q["settings"]
    out = [
        "",
        f"queue in process: {s['waiting']:,} waiting over 3 consumers, a real reactor's timers",
        f"{'queue':<10} {'release µs':>11} {'cancel all s':>13}",
    ]
    for name, side in q["queues"].items():
        cancel = fmt(side["cancel_s"], digits=2)
        if not side["cancel_complete"]:
            cancel = f"> {cancel} ({side['cancelled']:,} cancelled)"
        label = name.replace("_", " ")
        out.append(f"{label:<10} {fmt(side['release_us']):>11} {cancel:>13}")
    t, c = tg.get("queue_release_le_50us"), tg.get("queue_cancel_all_le_0.2s")
    if t and c:
        out.append(
            f"target: a release <= 50 µs: {met(t)} ({t['value']:.1f}); cancelling all "
            f"<= 0.2 s: {met(c)} ({c['value']:.2f} s)"
        )
    return out


def render(result: dict[str, Any]) -> str:
    parts, tg = result["parts"], result["analysis"]["targets"]
    nofile = result["host"]["nofile"]
    out = [
        "",
        f"scale: the daemon's cost as the work grows, cpus={result['params']['cpus']}; this "
        f"process's open files: soft {nofile['soft']} (was {nofile['soft_before']}), "
        f"hard {nofile['hard']}",
    ]
    renderers = {"depth": render_depth, "sse": render_sse, "fdlimit": render_fdlimit,
                 "queue": render_queue}  # fmt: skip
    for name, part in parts.items():
        out += renderers[name](part, tg)
    out += busy_note(result)
    out += [f"FAILED: {failure}" for failure in result["failures"]]
    return "\n".join(out)
