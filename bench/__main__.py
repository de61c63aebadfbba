"""``python -m bench`` (``make bench``): run the daemon's benchmarks.

Today one benchmark, ``latency``: what the broker adds to a small request
over a direct call, next to what nginx adds. Prints a table and writes
``bench/out/latency.json``. Exit status: 0 when every leg that could run ran
(with ``--strict``: and the targets held), 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import latency


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n", 1)[0]
    )
    p.add_argument("bench", nargs="?", default="latency", choices=["latency"])
    p.add_argument("-n", "--requests", type=int, default=10000, help="timed requests per leg")
    p.add_argument("--warmup", type=int, default=1000, help="untimed requests per leg first")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, legs interleaved")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx leg")
    p.add_argument("--no-broker", action="store_true", help="skip the broker leg")
    p.add_argument(
        "--profile",
        choices=["py-spy", "cprofile"],
        help="profile the broker during the run (its figures are then inflated)",
    )
    p.add_argument(
        "--cpus",
        choices=["one", "all"],
        default="one",
        help="one: pin every process to one CPU (stable figures); all: let the kernel place them",
    )
    p.add_argument("--keep", action="store_true", help="keep the configs and logs (temp dir)")
    p.add_argument("--out", type=Path, default=latency.OUT_DIR / "latency.json")
    p.add_argument("--max-seconds", type=float, default=110.0, help="time budget of the run")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target does not hold")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.rounds < 1 or args.requests < args.rounds:
        p.error("need --requests >= --rounds >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = latency.Options(
        requests=args.requests,
        warmup=args.warmup,
        rounds=args.rounds,
        nginx=not args.no_nginx,
        broker=not args.no_broker,
        max_seconds=args.max_seconds,
        out=args.out,
        profile=args.profile,
        strict=args.strict,
        cpus=args.cpus,
        keep=args.keep,
    )
    try:
        result, ok = latency.run(opts, log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("bench: interrupted; every helper process was stopped", file=sys.stderr)
        return 130
    print(latency.render(result))
    latency.write_json(result, opts.out)
    print(f"\nwrote {opts.out}")
    report = result.get("profile_report")
    if report:
        if opts.profile == "cprofile" and Path(report).is_file():
            from bench.profile import summarize_cprofile

            text = summarize_cprofile(Path(report))
            Path(report).with_suffix(".txt").write_text(text)
            report = str(Path(report).with_suffix(".txt"))
        print(f"profile: {report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
