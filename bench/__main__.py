"""``python -m bench`` (``make bench``): run the daemon's benchmarks.

``latency``: what the broker adds to a small request over a direct call,
next to what nginx adds. ``throughput``: requests per second through the GPU
lease (16 clients, one consumer of ``max_concurrency`` 1, 2 ms jobs) against
the consumer's own rate. ``evict``: from the moment an evicted consumer's
memory shows free to the moment the waiting request reaches its target.
``trace``: a seeded bursty trace of four consumers replayed per scheduler
policy, against Belady's reference (about 2 minutes; run only when named).
``scale``: the daemon's cost as the work grows: up to 10,000 requests
waiting, 1,000 event subscribers, a burst past its file-descriptor limit,
the queue in process at 20,000, each against its baseline (about 2 minutes).
With no name, all but ``trace`` run, one after the other. Each prints a table and
writes ``bench/out/<name>.json``. Exit status: 0 when every benchmark ran
(with ``--strict``: and its targets held), 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import evict, latency, scale, throughput, trace
from bench.common import OUT_DIR, write_json

BENCHES = ("latency", "throughput", "evict", "trace", "scale")
#: What runs with no name (or ``all``): ``trace`` takes minutes and runs only when named.
DEFAULT_BENCHES = ("latency", "throughput", "evict", "scale")
MODULES: dict[str, Any] = {
    "latency": latency,
    "throughput": throughput,
    "evict": evict,
    "trace": trace,
    "scale": scale,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n", 1)[0]
    )
    p.add_argument(
        "bench",
        nargs="*",
        metavar="NAME",
        help=f"which to run, in this order: {', '.join(BENCHES)} "
        f"(default: {', '.join(DEFAULT_BENCHES)})",
    )
    p.add_argument(
        "--profile",
        choices=["py-spy", "cprofile", "handoff"],
        help="profile the broker of latency or throughput (its figures are then inflated); "
        "handoff: a timeline of the lease hand-off (throughput only)",
    )
    p.add_argument(
        "--cpus",
        choices=["one", "all"],
        help="one: pin every process to one CPU; all: let the kernel place them "
        "(default: one for latency, all for throughput and evict)",
    )
    p.add_argument(
        "--keepalive",
        choices=["off", "on"],
        default="off",
        help="latency and throughput: the broker's consumer config key keepalive "
        "(default: off, the daemon's default: a connection of its own per request)",
    )
    p.add_argument("--keep", action="store_true", help="keep the configs and logs (temp dir)")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where <name>.json goes")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target does not hold")

    g = p.add_argument_group("latency")
    g.add_argument("-n", "--requests", type=int, default=10000, help="timed requests per leg")
    g.add_argument("--warmup", type=int, default=1000, help="untimed requests per leg first")
    g.add_argument(
        "--rounds", type=int, default=5, help="timed rounds, legs interleaved (also throughput)"
    )
    g.add_argument("--no-nginx", action="store_true", help="skip the nginx leg")
    g.add_argument("--no-broker", action="store_true", help="skip the broker leg")
    g.add_argument("--max-seconds", type=float, default=110.0, help="time budget of the run")

    t = throughput.Options()
    g = p.add_argument_group("throughput")
    g.add_argument("--clients", type=int, default=t.clients, help="concurrent broker clients")
    g.add_argument(
        "--work-ms",
        type=float,
        help=f"the consumer's job time (default: throughput {t.work_ms:g}, "
        f"scale {scale.Options.work_ms:g})",
    )
    g.add_argument("--seconds", type=float, default=t.seconds, help="per leg and round")

    e = evict.Options()
    g = p.add_argument_group("evict")
    g.add_argument("--evictions", type=int, default=e.rounds, help="timed evictions")
    g.add_argument(
        "--free-after",
        type=float,
        nargs=2,
        default=[e.free_after_min_s, e.free_after_max_s],
        metavar=("MIN_S", "MAX_S"),
        help="free the memory this long after the unload call arrives, spread over the rounds",
    )

    tr = trace.Options()
    g = p.add_argument_group("trace")
    g.add_argument("--seed", type=int, default=tr.seed, help="the trace's seed")
    g.add_argument(
        "--scenario",
        choices=list(trace.SCENARIOS),
        default=tr.scenario,
        help="default: four consumers, 16 GiB; warm-tier: a fifth, vLLM in sleep mode, 24 GiB",
    )
    g.add_argument(
        "--card-mib",
        type=int,
        default=tr.card_mib,
        choices=[16384, 24576],
        help="the GPU's size (default: the scenario's)",
    )
    g.add_argument(
        "--scale", type=float, default=tr.scale, help="replay time per trace second (0.1: 10x)"
    )
    g.add_argument(
        "--duration", type=float, default=tr.duration_s, help="trace length, trace seconds"
    )
    g.add_argument(
        "--busy",
        type=float,
        default=tr.busy,
        help="idle periods this many times shorter (2: bursts overlap more)",
    )
    g.add_argument(
        "--policy",
        action="append",
        choices=list(trace.POLICIES),
        help="replay this policy only (repeatable; default: both)",
    )
    g.add_argument(
        "--max-skip-s", type=float, default=tr.max_skip_s, help="scheduler.max_skip_s, trace s"
    )
    g.add_argument(
        "--min-residency-s",
        type=float,
        default=tr.min_residency_s,
        help="scheduler.min_residency_s, trace seconds",
    )
    g.add_argument(
        "--linger-s", type=float, default=tr.linger_s, help="scheduler.linger_s, trace seconds"
    )
    g.add_argument(
        "--eviction",
        nargs="+",
        choices=list(trace.EVICTIONS),
        default=list(tr.evictions),
        help="scheduler.eviction orders to replay, each under every policy (default: lru cost)",
    )
    g.add_argument(
        "--load-model",
        choices=list(trace.LOAD_MODELS),
        default=tr.load_model,
        help="mixed: per-consumer load times (ComfyUI 20 s, Ollama 5, whisper 3, mvoice 2);"
        " size: 1 s per GiB (cost orders as lru)",
    )
    g.add_argument("--no-plot", action="store_true", help="skip bench/out/trace.png")

    g = p.add_argument_group("scale")
    g.add_argument(
        "--part",
        action="append",
        choices=list(scale.PARTS),
        help="run this part only (repeatable; default: all, in this order)",
    )
    g.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=list(scale.Options.depths),
        metavar="N",
        help="requests kept waiting, one depth after the other",
    )
    g.add_argument(
        "--window-s", type=float, default=scale.Options.window_s, help="the rate window per depth"
    )
    g.add_argument(
        "--subscribers",
        type=int,
        default=scale.Options.subscribers,
        help="/v1/events streams in the sse part",
    )
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.rounds < 1 or args.requests < args.rounds:
        p.error("need --requests >= --rounds >= 1 and --warmup >= 0")
    if args.clients < 1 or (args.work_ms or 0) < 0 or args.seconds <= 0:
        p.error("need --clients >= 1, --work-ms >= 0 and --seconds > 0")
    unknown = [name for name in args.bench if name not in ("all", *BENCHES)]
    if unknown:
        p.error(f"no benchmark {unknown[0]!r}: choose from all, {', '.join(BENCHES)}")
    if not args.bench or "all" in args.bench:
        args.bench = list(DEFAULT_BENCHES) if not args.profile else ["latency", "throughput"]
        if args.profile == "handoff":
            args.bench = ["throughput"]
    if args.profile == "handoff" and args.bench != ["throughput"]:
        p.error("--profile handoff profiles the throughput benchmark only")
    if args.profile and {"evict", "trace", "scale"} & set(args.bench):
        p.error("--profile profiles latency or throughput (the others have no hot path)")
    if args.evictions < 1 or not 0 <= args.free_after[0] <= args.free_after[1]:
        p.error("need --evictions >= 1 and 0 <= MIN_S <= MAX_S for --free-after")
    if not 0 < args.scale <= 1 or args.duration <= 0 or args.max_skip_s < 0 or args.busy <= 0:
        p.error("need 0 < --scale <= 1, --duration > 0 and --max-skip-s >= 0")
    if min(args.depths) < 2 or args.window_s <= 0 or args.subscribers < 1:
        p.error("need --depths >= 2, --window-s > 0 and --subscribers >= 1")
    return args


def options(name: str, args: argparse.Namespace) -> Any:
    """The chosen benchmark's options from the command line."""
    common = {"keep": args.keep, "strict": args.strict}
    if name == "latency":
        return latency.Options(
            requests=args.requests,
            warmup=args.warmup,
            rounds=args.rounds,
            nginx=not args.no_nginx,
            broker=not args.no_broker,
            max_seconds=args.max_seconds,
            profile=args.profile,
            cpus=args.cpus or "one",
            keepalive=args.keepalive == "on",
            **common,
        )
    if name == "throughput":
        return throughput.Options(
            clients=args.clients,
            work_ms=throughput.Options.work_ms if args.work_ms is None else args.work_ms,
            seconds=args.seconds,
            rounds=args.rounds,
            profile=args.profile,
            cpus=args.cpus or "all",
            keepalive=args.keepalive == "on",
            **common,
        )
    if name == "trace":
        return trace.Options(
            seed=args.seed,
            scenario=args.scenario,
            card_mib=args.card_mib,
            scale=args.scale,
            duration_s=args.duration,
            busy=args.busy,
            policies=tuple(dict.fromkeys(args.policy)) if args.policy else trace.POLICIES,
            evictions=tuple(dict.fromkeys(args.eviction)),
            load_model=args.load_model,
            max_skip_s=args.max_skip_s,
            min_residency_s=args.min_residency_s,
            linger_s=args.linger_s,
            out_dir=args.out_dir,
            plot=not args.no_plot,
            cpus=args.cpus or "all",
            **common,
        )
    if name == "scale":
        return scale.Options(
            parts=tuple(dict.fromkeys(args.part)) if args.part else scale.PARTS,
            depths=tuple(args.depths),
            work_ms=scale.Options.work_ms if args.work_ms is None else args.work_ms,
            window_s=args.window_s,
            subscribers=args.subscribers,
            cpus=args.cpus or "all",
            **common,
        )
    return evict.Options(
        rounds=args.evictions,
        free_after_min_s=args.free_after[0],
        free_after_max_s=args.free_after[1],
        cpus=args.cpus or "all",
        **common,
    )


def run_one(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> bool:
    """Run one benchmark, print its table, write its JSON; whether it ran (and held)."""
    module: Any = MODULES[name]
    log(f"== {name}")
    result, ok = module.run(options(name, args), log=log)
    print(module.render(result))
    out = args.out_dir / f"{name}.json"
    write_json(result, out)
    print(f"\nwrote {out}")
    report = result.get("profile_report")
    if report:
        if report.endswith(".cprofile") and Path(report).is_file():
            from bench.profile import summarize_cprofile

            text = summarize_cprofile(Path(report))
            Path(report).with_suffix(".txt").write_text(text)
            report = str(Path(report).with_suffix(".txt"))
        print(f"profile: {report}")
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.bench))
    failed = []
    try:
        for name in names:
            if not run_one(name, args, log=lambda msg: print(msg, flush=True)):
                failed.append(name)
            print()
    except KeyboardInterrupt:
        print("bench: interrupted; every helper process was stopped", file=sys.stderr)
        return 130
    if len(names) > 1:
        print(f"bench: {', '.join(names)}: " + (f"FAILED: {', '.join(failed)}" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
