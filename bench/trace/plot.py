"""The trace benchmark's picture: who holds the GPU when, per policy, and what it costs.

One panel for the arrivals (a tick per request on its kind's bursts, a row
per kind), then one
panel per policy with a row per consumer: a pale band while it is resident,
a hatched bar while it loads, a solid bar while it computes, and a black
triangle where the daemon evicted it. Thrashing shows as short pale bands
and many triangles.

Needs matplotlib (imported here only, so the benchmark runs without it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS: Mapping[str, str] = {
    "mvoice": "#1f77b4",
    "whisper": "#2ca02c",
    "ollama": "#ff7f0e",
    "comfyui": "#9467bd",
    "vllm": "#d62728",
}


def residency(
    loads: Sequence[Sequence[Any]], evictions: Sequence[Sequence[Any]], end: float
) -> dict[str, list[tuple[float, float]]]:
    """Per consumer, the intervals from the start of each load to its next eviction."""
    out: dict[str, list[tuple[float, float]]] = {}
    for consumer, start, _ in sorted(loads, key=lambda x: x[1]):
        gone = [at for c, at in evictions if c == consumer and at >= start]
        spans = out.setdefault(consumer, [])
        stop = min(gone) if gone else end
        if spans and spans[-1][1] >= start:  # already resident: extend
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((start, stop))
    return out


def draw(
    result: Mapping[str, Any],
    arrivals: Sequence[tuple[float, str]],
    bursts: Sequence[tuple[str, float, float]],
    path: Path,
) -> Path:
    """Write the PNG to ``path``: ``arrivals`` (replay s, kind), ``bursts`` (kind, start, end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    params = result["params"]
    routing: Mapping[str, str] = params["routing"]
    consumers = list(routing.values())
    policies: Mapping[str, Any] = result["policies"]
    names = list(policies)
    scale = params["scale"]
    end = max(
        [p["makespan_s"] + min((r["sent"] for r in p["records"]), default=0.0)
         for p in policies.values() if p["records"]] or [1.0]
    )  # fmt: skip

    fig, axes = plt.subplots(
        1 + len(names),
        1,
        figsize=(16, 2.0 + 2.6 * len(names)),
        sharex=True,
        gridspec_kw={"height_ratios": [1.3] + [2.0] * len(names)},
        squeeze=False,
    )
    ax = axes[0][0]
    kinds = list(routing)
    for row, kind in enumerate(kinds):
        color = COLORS.get(routing[kind], "k")
        windows = [(a, b - a) for k, a, b in bursts if k == kind]
        ax.broken_barh(windows, (row - 0.42, 0.84), facecolors=color, alpha=0.13, lw=0)
        ts = [t for t, k in arrivals if k == kind]
        ax.vlines(ts, row - 0.35, row + 0.35, color=color, lw=0.8)
    ax.set_yticks(range(len(kinds)), [f"{k} -> {routing[k]}" for k in kinds])
    ax.set_ylim(-0.6, len(kinds) - 0.4)
    ax.invert_yaxis()
    ax.set_title(
        f"arrivals: {len(arrivals)} requests, seed {params['seed']}, "
        f"{params['card_mib']:,} MiB card (a tick per request; shaded: the kind's bursts)",
        loc="left",
        fontsize=10,
    )

    for i, name in enumerate(names):
        ax = axes[i + 1][0]
        pol = policies[name]
        tl = pol["timeline"]
        spans = residency(tl["loads"], tl["evictions"], end)
        for row, consumer in enumerate(consumers):
            color = COLORS.get(consumer, "k")
            res = [(a, b - a) for a, b in spans.get(consumer, [])]
            ax.broken_barh(res, (row - 0.42, 0.84), facecolors=color, alpha=0.13, lw=0)
            lds = [(a, b - a) for c, a, b in tl["loads"] if c == consumer]
            ax.broken_barh(lds, (row - 0.3, 0.6), facecolors="white", edgecolors=color,
                           hatch="////", lw=0.8)  # fmt: skip
            work = [(a, b - a) for c, a, b in tl["work"] if c == consumer]
            ax.broken_barh(work, (row - 0.3, 0.6), facecolors=color, edgecolors=color, lw=0.6)
            ev = [at for c, at in tl["evictions"] if c == consumer]
            ax.plot(ev, [row - 0.52] * len(ev), "kv", ms=5, ls="none")
        ax.set_yticks(range(len(consumers)), consumers)
        ax.set_ylim(-0.7, len(consumers) - 0.4)
        ax.invert_yaxis()
        w = pol["wait_s"]["all"]
        ax.set_title(
            f"{name}: {pol['loads']} loads, {pol['unloads']} unloads, {pol['swaps']} swaps "
            f"(Belady: {result['belady']['swaps']}); queue wait p50 {w['p50']:.2f} s, "
            f"p99 {w['p99']:.2f} s, max {w['max']:.2f} s; GPU busy "
            f"{100 * pol['busy_fraction']:.0f}% of {pol['makespan_s']:.1f} s",
            loc="left",
            fontsize=10,
        )
        ax.grid(axis="x", alpha=0.3)
    axes[-1][0].set_xlim(0, end * 1.01)
    axes[-1][0].set_xlabel(
        f"seconds into the replay (times scaled by {scale:g}: x{1 / scale:g} for real life)"
    )
    handles = [
        Patch(facecolor="grey", alpha=0.13, label="resident"),
        Patch(facecolor="white", edgecolor="grey", hatch="////", label="loading"),
        Patch(facecolor="grey", label="computing"),
        Line2D([], [], color="k", marker="v", ls="none", label="evicted"),
    ]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
