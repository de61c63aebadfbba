"""The trace benchmark's arithmetic: pure functions of what the replay recorded.

A request's queue wait is the time from its sending to the start of its
computation: the consumer's work-log ``start`` (its arrival there), plus the
load time when the entry says it was a cold start (ComfyUI has no load route
and loads inside its first request; the others are loaded through their load
route before the request reaches them). So a wait always includes the load
the request needed, as the daemon's own ``wait=`` does.

Requests are matched with work entries per consumer, in order: under both
policies a consumer's own requests keep their arrival order (the dispatch
rule only reorders between consumers), and every consumer runs one job at a
time. A request answered with anything but 200 never reached its consumer
(queue timeout, refusal) and has no entry.

A swap is a load or an unload, except a consumer's first load: the trace
starts on an empty card, so every policy, and the reference, loads each
consumer it serves once whatever it does (``swaps`` below).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def nearest_rank(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of sorted values; NaN when there are none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def wait_stats(waits: Iterable[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of some waits (seconds)."""
    ordered = sorted(waits)
    return {
        "count": len(ordered),
        "p50": nearest_rank(ordered, 50),
        "p99": nearest_rank(ordered, 99),
        "max": ordered[-1] if ordered else math.nan,
    }


def busy_fraction(work: Iterable[tuple[float, float]], makespan: float) -> float:
    """The GPU's busy share: the sum of the compute intervals over the makespan."""
    total = sum(end - start for start, end in work)
    return total / makespan if makespan > 0 else math.nan


def match(
    sent: Sequence[Mapping[str, Any]],
    work: Mapping[str, Sequence[Mapping[str, Any]]],
    load_s: Mapping[str, float],
    t0: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each request with its work entry (times relative to ``t0``); and any mismatch found."""
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    for consumer in sorted({s["consumer"] for s in sent} | set(work)):
        served = sorted(
            (s for s in sent if s["consumer"] == consumer and s["status"] == 200),
            key=lambda s: s["sent"],
        )
        entries = sorted(
            (e for e in work.get(consumer, ()) if e.get("end") is not None),
            key=lambda e: e["start"],
        )
        if len(served) != len(entries):
            problems.append(
                f"{consumer}: {len(served)} requests answered 200 but {len(entries)} jobs ran"
            )
        for s, e in zip(served, entries, strict=False):
            compute = e["start"] + (load_s.get(consumer, 0.0) if e.get("cold") else 0.0)
            records.append(
                {
                    "i": s["i"],
                    "kind": s["kind"],
                    "consumer": consumer,
                    "sent": s["sent"] - t0,
                    "answered": None if s["answered"] is None else s["answered"] - t0,
                    "status": s["status"],
                    "start": e["start"] - t0,
                    "compute": compute - t0,
                    "end": e["end"] - t0,
                    "cold": bool(e.get("cold")),
                    "wait": compute - s["sent"],
                }
            )
    records.sort(key=lambda r: r["i"])
    return records, problems


def timeline(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    load_s: Mapping[str, float],
    t0: float,
) -> dict[str, list[list[Any]]]:
    """What the picture draws: compute, loads and evictions, relative to ``t0``.

    ``work``: ``[consumer, start, end]`` of every computation; ``loads``:
    ``[consumer, start, end]`` of every load (the daemon's ``load`` events, and
    the cold starts in the work log); ``evictions``: ``[consumer, at]``, the
    moment the daemon saw the victim's memory free.
    """
    work = [[r["consumer"], r["compute"], r["end"]] for r in records]
    loads = [
        [r["consumer"], r["start"], r["start"] + load_s.get(r["consumer"], 0.0)]
        for r in records
        if r["cold"]
    ]
    evictions: list[list[Any]] = []
    for e in events:
        at = e["at"] - t0
        if e.get("kind") == "load":
            loads.append([e["consumer"], at - float(e.get("took_s") or 0.0), at])
        elif e.get("kind") == "evict":
            evictions.append([e["consumer"], at])
    loads.sort(key=lambda x: x[1])
    evictions.sort(key=lambda x: x[1])
    return {"work": work, "loads": loads, "evictions": evictions}


def summarize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One policy's figures from the replay's raw record (``Stack.replay``)."""
    t0 = raw["t0"]
    records, problems = match(raw["sent"], raw["work"], raw["load_s"], t0)
    before, after = raw.get("scheduler_before", {}), raw.get("scheduler", {})
    cold = sum(1 for r in records if r["cold"])
    first_loads = len({r["consumer"] for r in records})
    loads = int(after.get("loads", 0)) - int(before.get("loads", 0)) + cold
    unloads = int(after.get("evictions", 0)) - int(before.get("evictions", 0))
    sent_at = [s["sent"] - t0 for s in raw["sent"]]
    ends = [r["end"] for r in records]
    makespan = (max(ends) - min(sent_at)) if ends and sent_at else math.nan
    by_kind: dict[str, list[float]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r["wait"])
    worst = max(records, key=lambda r: r["wait"], default=None)
    statuses: dict[str, int] = {}
    for s in raw["sent"]:
        key = str(s["status"])
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(raw["sent"]),
        "statuses": statuses,
        "loads": loads,
        "cold_starts": cold,
        "unloads": unloads,
        "first_loads": first_loads,
        "swaps": loads + unloads - first_loads,
        "makespan_s": makespan,
        "busy_fraction": busy_fraction(((r["compute"], r["end"]) for r in records), makespan),
        "wait_s": {
            "all": wait_stats(r["wait"] for r in records),
            **{kind: wait_stats(w) for kind, w in sorted(by_kind.items())},
        },
        "largest_wait": None
        if worst is None
        else {"i": worst["i"], "kind": worst["kind"], "wait_s": worst["wait"]},
        "problems": problems,
        "records": records,
        "timeline": timeline(records, raw.get("events", []), raw["load_s"], t0),
        **loading(records, raw.get("events", []), raw["load_s"], raw.get("timed", ()), t0),
    }


def loading(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    load_s: Mapping[str, float],
    timed: Iterable[str],
    t0: float,
) -> dict[str, Any]:
    """Time spent loading (swap-seconds), and how long the daemon went without knowing it.

    Every load counts what it took: the daemon's ``load`` events carry their
    ``took_s``; a cold start (ComfyUI, loaded inside its request) its consumer's
    simulated load time. ``swap_s``: the total; ``swap_s_after_first``: less
    each consumer's first load (paid whatever the order, as for ``swaps``).

    ``eviction: cost`` goes by learned load times: a consumer whose load the
    daemon never timed counts ``DEFAULT_LOAD_S``. ``timed`` are the consumers
    it can time (a load route); ``loads_until_learned`` is how many loads
    (of anyone) ended up to the one that taught it the last of them, and
    ``learned_at_s`` when (None: some were never loaded through the daemon).
    """
    # (ended at, consumer, took, timed by the daemon)
    loads: list[tuple[float, str, float, bool]] = [
        (r["start"] + load_s.get(r["consumer"], 0.0), r["consumer"],
         load_s.get(r["consumer"], 0.0), False)
        for r in records
        if r["cold"]
    ]  # fmt: skip
    for e in events:
        if e.get("kind") == "load":
            loads.append((e["at"] - t0, str(e["consumer"]), float(e.get("took_s") or 0.0), True))
    loads.sort()
    total = sum(took for _, _, took, _ in loads)
    first: dict[str, float] = {}
    for _, consumer, took, _ in loads:
        first.setdefault(consumer, took)
    unknown = set(timed)
    learned_at: float | None = 0.0 if not unknown else None
    until = 0
    for n, (at, consumer, _, by_daemon) in enumerate(loads, 1):
        if learned_at is not None:
            break
        if by_daemon:
            unknown.discard(consumer)
            if not unknown:
                learned_at, until = at, n
    return {
        "swap_s": total,
        "swap_s_after_first": total - sum(first.values()),
        "swap_s_by_consumer": {
            c: sum(took for _, who, took, _ in loads if who == c) for c in sorted(first)
        },
        "loads_until_learned": until if learned_at is not None else None,
        "learned_at_s": learned_at,
        "never_timed": sorted(set(first) - set(timed)),
    }


#: Issue 9.6's target for ``eviction: cost`` against ``lru``, per policy.
COST_SAVING = 0.20  # at least this share fewer swap-seconds
COST_P99_LIMIT = 1.1  # p99 wait at most this many times lru's


def eviction_ratios(
    runs: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Per policy, ``cost`` against ``lru``: the ratios and the verdict.

    ``runs``: policy -> eviction -> summary (``summarize``). A policy without
    both runs has no entry. ``ok``: cost spends at least ``COST_SAVING`` fewer
    swap-seconds and its p99 wait is at most ``COST_P99_LIMIT`` x lru's.
    """
    out: dict[str, dict[str, Any]] = {}
    for policy, by_eviction in runs.items():
        lru, cost = by_eviction.get("lru"), by_eviction.get("cost")
        if lru is None or cost is None:
            continue
        swap = _ratio(cost["swap_s"], lru["swap_s"])
        p99 = _ratio(cost["wait_s"]["all"]["p99"], lru["wait_s"]["all"]["p99"])
        swap_ok = swap <= 1.0 - COST_SAVING
        p99_ok = p99 <= COST_P99_LIMIT
        out[policy] = {
            "swap_s": {"lru": lru["swap_s"], "cost": cost["swap_s"]},
            "swap_s_ratio": swap,
            "swap_s_after_first_ratio": _ratio(
                cost["swap_s_after_first"], lru["swap_s_after_first"]
            ),
            "p99_ratio": p99,
            "loads_ratio": _ratio(cost["loads"], lru["loads"]),
            "swap_s_ok": swap_ok,
            "p99_ok": p99_ok,
            "ok": swap_ok and p99_ok,
        }
    return out


def _ratio(a: float, b: float) -> float:
    """``a / b``; 1 when both are 0, NaN when only ``b`` is (or either is NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if b == 0:
        return 1.0 if a == 0 else math.nan
    return a / b


def one_job_s(load_s: Mapping[str, float], work_s: Mapping[str, float]) -> float:
    """The longest single job: a consumer's load followed by its work (scaled seconds)."""
    return max(load_s[c] + work_s[c] for c in load_s)


def targets(
    policies: Mapping[str, Mapping[str, Any]],
    belady_swaps: int,
    max_skip_s: float,
    one_job: float,
    bound_swaps: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Issue 5's targets for ``affinity`` against ``fifo`` and the reference.

    ``bound_swaps``: the fewest swaps any schedule within the wait bound
    needs (``bound.reorder_bound``); where it is over half of fifo's, the
    first target is out of reach for every scheduler, and says so.
    """
    fifo, aff = policies.get("fifo"), policies.get("affinity")
    if fifo is None or aff is None:
        return {}
    a_p99, f_p99 = aff["wait_s"]["all"]["p99"], fifo["wait_s"]["all"]["p99"]
    worst = aff["wait_s"]["all"]["max"]
    bound = max_skip_s + one_job
    return {
        "half_the_swaps_of_fifo": {
            "value": aff["swaps"],
            "limit": fifo["swaps"] / 2,
            "ok": aff["swaps"] <= fifo["swaps"] / 2,
        }
        | (
            {}
            if bound_swaps is None
            else {"bound": bound_swaps, "reachable": bound_swaps <= fifo["swaps"] / 2}
        ),
        "no_more_swaps_than_belady": {
            "value": aff["swaps"],
            "limit": belady_swaps,
            "ok": aff["swaps"] <= belady_swaps,
        },
        "p99_wait_within_1.2x_fifo": {
            "value": a_p99,
            "limit": 1.2 * f_p99,
            "ok": a_p99 <= 1.2 * f_p99,
        },
        "max_wait_within_max_skip_plus_one_job": {
            "value": worst,
            "limit": bound,
            "ok": worst <= bound,
        },
    }
