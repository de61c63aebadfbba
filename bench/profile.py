"""Profile the broker while the latency benchmark drives it (``--profile``).

Two ways, both optional and outside the timed figures' meaning:

- ``py-spy`` (``pip install py-spy``; found on PATH, beside this Python, or in
  ``$PY_SPY``): a sampling profiler attached to the running daemon by pid for
  the timed rounds only. It pauses the daemon for each sample (py-spy's
  default): ``--nonblocking`` drops the samples it cannot read consistently,
  which are mostly those taken in Python code, and so overstates syscalls. Its
  collapsed stacks are reduced here to the functions with the largest share of
  samples, by own time ("self") and with callees ("total").
- ``cprofile``: the daemon's reactor runs under twistd's ``--profiler=cprofile``; deterministic,
  covers the whole run (start-up and warm-up included), and inflates Python
  call costs, so use it for call counts and py-spy for shares.
- ``handoff`` (throughput only): ``bench.handoff`` launches the daemon and
  timestamps the lease hand-off's steps; see there.

``BrokerProfile`` is what a benchmark does for whichever was asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR
from bench.servers import StartError


def find_py_spy() -> str | None:
    """The py-spy executable, if one is installed."""
    env = os.environ.get("PY_SPY")
    if env and Path(env).is_file():
        return env
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


class PySpy:
    """``py-spy record --pid`` for as long as it runs; writes a text summary to ``out``."""

    def __init__(self, pid: int, out: Path, tmp: Path, rate: int = 1000) -> None:
        exe = find_py_spy()
        if exe is None:
            raise StartError("py-spy not found: pip install py-spy, or set PY_SPY")
        self.out = out
        self._raw = out.with_suffix(".collapsed")
        out.parent.mkdir(parents=True, exist_ok=True)
        self._argv = [
            exe, "record", "--pid", str(pid), "--rate", str(rate),
            "--format", "raw", "--output", str(self._raw),
        ]  # fmt: skip
        self._log = tmp / "py-spy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                self._argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        # The benchmark may be pinned to one CPU: let the sampler run on any other.
        if hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self._proc.pid, range(os.cpu_count() or 1))

    def stop(self) -> None:
        """SIGINT makes py-spy write its file; then summarize it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._raw.is_file():
            self.out.write_text(summarize_collapsed(self._raw))
        else:
            with contextlib.suppress(OSError):
                self.out.write_text("py-spy wrote nothing:\n" + self._log.read_text())


class BrokerProfile:
    """A benchmark's ``--profile``: how its broker starts, the sampler, the report.

    Reports go to ``bench/out/<name>.cprofile``, ``<name>.pyspy.txt`` or
    ``<name>.handoff.txt``.
    """

    def __init__(self, kind: str | None, name: str, tmp: Path) -> None:
        self.kind = kind
        self.name = name
        self.tmp = tmp
        self.sampler: PySpy | None = None
        self.broker_pid: int | None = None
        self.handoff: dict[str, Any] | None = None
        self._events = tmp / "handoff.json"

    def broker_options(self, upstream_port: int) -> dict[str, Any]:
        """Keyword arguments for ``start_broker``."""
        if self.kind == "cprofile":
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            return {"cprofile_out": OUT_DIR / f"{self.name}.cprofile"}
        if self.kind == "handoff":
            env = {"HANDOFF_UPSTREAM_PORT": str(upstream_port), "HANDOFF_OUT": str(self._events)}
            return {"launcher": [sys.executable, "-m", "bench.handoff"], "env": env}
        return {}

    def started(self, broker_pid: int) -> None:
        self.broker_pid = broker_pid

    def attach(self) -> None:
        """Start sampling the broker (py-spy), for the timed part of the run."""
        if self.kind == "py-spy" and self.broker_pid is not None:
            self.sampler = PySpy(self.broker_pid, OUT_DIR / f"{self.name}.pyspy.txt", self.tmp)
            self.sampler.start()

    def detach(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def report(self) -> str | None:
        """The report's path, once the broker has stopped (``handoff``: summarized here)."""
        if self.broker_pid is None:
            return None
        if self.sampler is not None:
            return str(self.sampler.out)
        if self.kind == "cprofile":
            return str(OUT_DIR / f"{self.name}.cprofile")
        if self.kind == "handoff" and self._events.is_file():
            from bench import handoff

            self.handoff = handoff.summarize(self._events)
            out = OUT_DIR / f"{self.name}.handoff.txt"
            out.write_text(handoff.render(self.handoff) + "\n")
            return str(out)
        return None


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/twisted/web/http.py:123)`` -> ``fn (twisted/web/http.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    return f"{name} ({path})"


#: Leaf frames that mean "waiting", not working: the reactor's epoll_wait and
#: idle thread-pool workers. Their samples are counted apart from busy time.
IDLE_LEAVES = (
    "EPollReactor.doPoll",
    "Condition.wait",
    "Event.wait",
    "Thread._wait_for_tstate_lock",
)


def summarize_collapsed(path: Path, top: int = 30) -> str:
    """Self and total shares of busy time per function from py-spy's ``raw`` output."""
    own: Counter[str] = Counter()
    own_by_caller: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    samples = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_short(f) for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        if frames[-1].split(" (", 1)[0] in IDLE_LEAVES:
            idle += count
            continue
        samples += count
        own[frames[-1]] += count
        caller = frames[-2].split(" (", 1)[0] if len(frames) > 1 else "-"
        own_by_caller[f"{frames[-1]}  <- {caller}"] += count
        for f in set(frames):
            total[f] += count
        leaf_path = frames[-1].rsplit(" (", 1)[-1].rstrip(")")
        by_module[_area(leaf_path)] += count
    if not samples:
        return "py-spy: no samples\n"
    lines = [
        f"py-spy: {samples} busy samples of the broker ({idle} idle ones - epoll wait, "
        "idle threads - left out); shares are of busy time",
        "",
    ]
    lines.append("own time by area:")
    for area, n in by_module.most_common():
        lines.append(f"  {100 * n / samples:5.1f}%  {area}")
    lines += ["", f"top {top} by own time:"]
    for f, n in own.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}%  {f}")
    lines += ["", f"top {top} by own time, split by caller (thin wrappers show who pays):"]
    for f, n in own_by_caller.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}%  {f}")
    lines += ["", f"top {top} by total time (with callees):"]
    for f, n in total.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}%  {f}")
    return "\n".join(lines) + "\n"


def _area(path: str) -> str:
    """Which body of code a file belongs to, for the per-area split."""
    for prefix, area in (
        ("mgpu/", "mgpu (the daemon)"),
        ("twisted/web/", "twisted.web"),
        ("twisted/internet/", "twisted.internet"),
        ("twisted/", "twisted (other)"),
        ("klein/", "klein"),
        ("werkzeug/", "werkzeug"),
        ("treq/", "treq"),
        ("attr/", "attrs"),
        ("zope/", "zope.interface"),
        ("stdlib:", "stdlib"),
    ):
        if path.startswith(prefix):
            return area
    return "other"


def summarize_cprofile(path: Path, top: int = 30) -> str:
    """Own time by area, the daemon's own functions, then the top functions overall."""
    import io
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    # cProfile's clock is wall time: the reactor's epoll wait is idle, not cost.
    idle = sum(v[2] for k, v in raw.items() if k[0] == "~" and "select.epoll" in k[2])
    total_tt = (sum(v[2] for v in raw.values()) - idle) or 1.0
    requests = max((v[1] for k, v in raw.items() if k[2] == "render"), default=0)
    areas: dict[str, float] = {}
    for (file, _line, fn), (_cc, _nc, tt, _ct, _callers) in raw.items():
        if file == "~":
            if "select.epoll" in fn:
                continue
            area = "C calls (socket send/recv, file write, builtins)"
        else:
            area = _area(_short(f"x ({file}:0)").split(" (", 1)[1].rstrip(")"))
        areas[area] = areas.get(area, 0.0) + tt
    per_req = f"{1e6 * total_tt / requests:.0f} us a request" if requests else ""
    lines = [
        f"cProfile: {total_tt:.2f} s busy ({idle:.2f} s idle in epoll excluded) over "
        f"~{requests} requests, {per_req} (cProfile roughly doubles Python's costs)",
        "",
        "busy time by area (own time):",
    ]
    for area, tt in sorted(areas.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {100 * tt / total_tt:5.1f}%  {area}")
    lines += ["", "the daemon's own functions (mgpu/), by cumulative time:"]
    ours = sorted(((k, v) for k, v in raw.items() if "/mgpu/" in k[0]), key=lambda kv: -kv[1][3])
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in ours[:top]:
        lines.append(
            f"  cum {100 * ct / total_tt:5.1f}%  own {100 * tt / total_tt:4.1f}%  "
            f"{nc:>7} calls  {fn} (mgpu/{file.rsplit('/mgpu/', 1)[1]}:{line})"
        )
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return "\n".join(lines) + "\n\n" + buf.getvalue()
