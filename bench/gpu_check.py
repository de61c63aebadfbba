"""``python -m bench.gpu_check`` (``make gpu-check``): per-process GPU memory on a real card.

Section 9.3 of the spec: the daemon attributes the card's memory to the
processes of each consumer, learns each consumer's real size, keeps it in
``state_dir`` across restarts, and counts what no consumer holds as
``gpu.other``. The tests check all of that against a simulated card; this
checks it against a real one, with ``nvidia-smi`` as the reference.

What it does, all on loopback, from a temp dir:

1. Skips (one line ``gpu-check: skipped: REASON``, exit 0) where there is no
   NVIDIA card to check: no ``nvidia-smi`` on PATH or it fails, NVML does not
   initialise, no CUDA library to allocate with, or the GPU is in MIG mode.
2. Starts a consumer (``python -m bench.gpu_check --consumer``): it allocates
   ``--mib`` (1 GiB) on the GPU with torch, else CuPy, else the CUDA driver
   API through ctypes, serves ``GET /health`` (``{"status":"ok","loaded":true}``)
   on a free loopback port and prints ``ready PORT``.
3. Starts the daemon under ``twistd`` (``bench.broker.start_broker``) with
   ``gpu.source: nvml``, a ``state_dir`` and one consumer ``probe`` configured
   at 512 MiB, less than it really holds.
4. Waits up to 30 s for ``/v1/status`` to attribute memory to ``probe`` by
   its port, compares the status with ``nvidia-smi``, restarts the daemon on
   the same ``state_dir`` (the consumer stopped, so nothing can be learned
   afresh) and reads ``learned_mib`` at once. Prints PASS or FAIL per check,
   and the logs' tails on failure.

Exit status: 0 when every check passed (or skipped), 1 when one failed, 130
on Ctrl-C, 2 on bad arguments. ``bench/README.md`` ("gpu-check") says how
each check is computed.

The consumer part is standard library apart from the CUDA library;
``--consumer --fake-alloc`` serves without allocating anything (no GPU needed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.broker import start_broker
from bench.common import verdict, workdir
from bench.consumer import exit_on_stdin_eof, stop_on_signal
from bench.servers import (
    ManagedProcess,
    ProcessGroup,
    StartError,
    http_get_json,
    repo_env,
    terminate_on_sigterm,
)

MIB = 1024 * 1024

#: What the consumer allocates by default, and what its config claims (deliberately less).
ALLOC_MIB = 1024
CONFIGURED_MIB = 512
#: Absolute slack of every memory comparison: allocator rounding, two reads a moment apart.
SLACK_MIB = 64
#: Relative tolerances: the consumer's memory (b), the card's used and total (d).
CONSUMER_TOLERANCE = 0.05
CARD_TOLERANCE = 0.02

#: Bounds on every wait; the whole run stays within a few minutes.
CONSUMER_START_S = 120.0  # importing torch and creating a CUDA context take a while
DAEMON_START_S = 30.0
ATTRIBUTION_S = 30.0
LEARNED_S = 5.0
SMI_TIMEOUT_S = 20.0

LIBRARIES = ("torch", "cupy", "driver")


def log(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


# -- the consumer (standard library and the CUDA library only) -------------


def _alloc_torch(nbytes: int) -> object:
    torch: Any = importlib.import_module("torch")
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is false")
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    return buf


def _alloc_cupy(nbytes: int) -> object:
    cupy: Any = importlib.import_module("cupy")
    cupy.cuda.Device(0).use()
    buf = cupy.empty(nbytes, dtype=cupy.uint8)
    cupy.cuda.Device(0).synchronize()
    return buf


def _alloc_driver(nbytes: int) -> object:
    """``cuInit``, ``cuDeviceGet``, ``cuCtxCreate_v2``, ``cuMemAlloc_v2`` through ctypes."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def error_name(code: int) -> str:
        name = ctypes.c_char_p()
        with contextlib.suppress(AttributeError):
            if cuda.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
                return name.value.decode("ascii", "replace")
        return "?"

    def check(call: str, code: int) -> None:
        if code != 0:
            raise RuntimeError(f"{call} returned {code} ({error_name(code)})")

    check("cuInit", cuda.cuInit(ctypes.c_uint(0)))
    device = ctypes.c_int()
    check("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(device), ctypes.c_int(0)))
    context = ctypes.c_void_p()
    if hasattr(cuda, "cuCtxCreate_v2"):
        create = cuda.cuCtxCreate_v2(ctypes.byref(context), ctypes.c_uint(0), device)
        check("cuCtxCreate_v2", create)
    else:  # a driver without the old entry point: the device's primary context
        check(
            "cuDevicePrimaryCtxRetain", cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
        )
        check("cuCtxSetCurrent", cuda.cuCtxSetCurrent(context))
    pointer = ctypes.c_uint64()
    check("cuMemAlloc_v2", cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(nbytes)))
    check("cuCtxSynchronize", cuda.cuCtxSynchronize())
    return (cuda, context, pointer)  # kept referenced until the process exits


_ALLOCATORS: dict[str, Callable[[int], object]] = {
    "torch": _alloc_torch,
    "cupy": _alloc_cupy,
    "driver": _alloc_driver,
}


def allocate(mib: int, lib: str) -> tuple[str, object]:
    """Hold ``mib`` MiB on CUDA device 0 with ``lib`` (``auto``: the first that works).

    Returns the library's name and what must stay referenced; raises
    ``RuntimeError`` naming why each library failed.
    """
    reasons = []
    for name in LIBRARIES if lib == "auto" else (lib,):
        try:
            return name, _ALLOCATORS[name](mib * MIB)
        except Exception as e:  # an import, a CUDA error: try the next library
            reasons.append(f"{name}: {type(e).__name__}: {e}")
    raise RuntimeError("could not allocate: " + "; ".join(reasons))


class ConsumerHandler(BaseHTTPRequestHandler):
    """``GET /health``, ``GET /info``, ``POST /tts``; every answer closes its connection."""

    protocol_version = "HTTP/1.1"
    info: dict[str, Any] = {}

    def _answer(self, status: int, doc: object) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, {"status": "ok", "loaded": True})
        elif self.path == "/info":
            self._answer(200, self.info)
        else:
            self._answer(404, {"error": "not_found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(min(length, 1 << 20))
        if self.path == "/tts":
            self._answer(200, {"ok": True})
        else:
            self._answer(404, {"error": "not_found"})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe a second: not worth a line each


class ConsumerServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def run_consumer(mib: int, lib: str, fake: bool, watch_stdin: bool) -> int:
    """Allocate, listen on a free loopback port, print ``ready PORT``, serve until stopped."""
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    if fake:
        used, held = "none (--fake-alloc)", None
    else:
        try:
            used, held = allocate(mib, lib)
        except RuntimeError as e:
            print(f"consumer: {e}", file=sys.stderr, flush=True)
            return 3
    if watch_stdin:  # after the allocation, whose errors it would otherwise cut short
        threading.Thread(target=exit_on_stdin_eof, name="stdin-watch", daemon=True).start()
    ConsumerHandler.info = {"pid": os.getpid(), "lib": used, "mib": 0 if fake else mib}
    server = ConsumerServer(("127.0.0.1", 0), ConsumerHandler)
    port = server.server_address[1]
    print(
        f"consumer: pid {os.getpid()} holds {mib if not fake else 0} MiB ({used})",
        file=sys.stderr,
        flush=True,
    )
    print(f"ready {port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        del held
    return 0


# -- nvidia-smi and NVML ---------------------------------------------------


def smi(executable: str, *args: str) -> list[list[str]]:
    """Run ``nvidia-smi ARGS`` (CSV, no header, no units): its rows, fields stripped.

    Raises ``RuntimeError`` with its message when it fails or times out.
    """
    try:
        done = subprocess.run(
            [executable, *args, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(str(e)) from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise RuntimeError(f"exit {done.returncode}: {message[0] if message else 'no output'}")
    return [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line]


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


@dataclass
class CardReading:
    """``nvidia-smi``'s figures for one GPU, in MiB."""

    name: str
    used: int | None
    total: int | None
    reserved: int | None  # driver and firmware; NVML's v1 "used" includes it
    apps: dict[int, int | None]  # compute processes: pid -> used MiB (None: not reported)


def read_card(executable: str, index: int) -> CardReading:
    gpu = smi(executable, "--query-gpu=memory.used,memory.total,name", f"--id={index}")
    if not gpu or len(gpu[0]) < 3:
        raise RuntimeError(f"nvidia-smi says nothing of GPU {index}")
    used, total, name = gpu[0][0], gpu[0][1], ", ".join(gpu[0][2:])  # a name may hold commas
    try:
        rows = smi(executable, "--query-gpu=memory.reserved", f"--id={index}")
        reserved = _int(rows[0][0]) if rows and rows[0] else None
    except RuntimeError:  # an older driver has no such field
        reserved = None
    apps: dict[int, int | None] = {}
    for row in smi(executable, "--query-compute-apps=pid,used_memory", f"--id={index}"):
        pid = _int(row[0]) if row else None
        if pid is not None and len(row) >= 2:
            apps[pid] = _int(row[1])
    return CardReading(name, _int(used), _int(total), reserved, apps)


def skip_reason(index: int, lib: str) -> str | None:
    """Why there is no NVIDIA card to check here, or None when there is one."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return "no nvidia-smi on PATH"
    try:
        rows = smi(executable, "--query-gpu=index,name")
    except RuntimeError as e:
        return f"nvidia-smi failed: {e}"
    if str(index) not in {row[0] for row in rows if row}:
        return f"nvidia-smi lists no GPU {index}"
    with contextlib.suppress(RuntimeError):  # a driver without MIG does not know the field
        mig = smi(executable, "--query-gpu=mig.mode.current", f"--id={index}")
        if mig and mig[0] and mig[0][0].lower() == "enabled":
            return f"GPU {index} is in MIG mode (memory is per instance; not covered)"
    try:
        pynvml: Any = importlib.import_module("pynvml")
    except ImportError as e:
        return f"NVML: cannot import pynvml ({e})"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return f"NVML init failed: {e}"
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return f"NVML sees no GPU {index}"
    except Exception as e:
        return f"NVML failed: {e}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    if not any(_library_present(name) for name in (LIBRARIES if lib == "auto" else (lib,))):
        wanted = "torch, cupy or libcuda.so.1" if lib == "auto" else lib
        return f"no CUDA library to allocate with ({wanted})"
    return None


def _library_present(name: str) -> bool:
    if name == "driver":
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            return False
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# -- the check -------------------------------------------------------------

_CONFIG = """\
# Generated by python -m bench.gpu_check.
state_dir: {state_dir}
gpu:
  source: nvml
  index: {index}
  poll_interval_s: 1
health:
  interval_s: 1
routing:
  tts: probe
consumers:
  probe:
    url: http://127.0.0.1:{port}
    health: {{method: GET, path: /health}}
    paths:
      tts: {{method: POST, path: /tts}}
    vram_resident_mib: {configured}
"""


def check_config(state_dir: Path, index: int, consumer_port: int) -> str:
    """The daemon's config: GPU ``index`` through NVML, one consumer ``probe`` of 512 MiB."""
    return _CONFIG.format(
        state_dir=json.dumps(str(state_dir)),
        index=index,
        port=consumer_port,
        configured=CONFIGURED_MIB,
    )


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def dig(doc: Any, *keys: str) -> Any:
    """``doc[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def close_to(value: float | None, reference: float | None, rel: float) -> tuple[bool, float]:
    """Whether ``value`` is within max(``rel`` x reference, SLACK_MIB) of ``reference``."""
    if reference is None:
        return False, float(SLACK_MIB)
    tolerance = max(rel * reference, float(SLACK_MIB))
    return value is not None and abs(value - reference) <= tolerance, tolerance


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def status_of(port: int) -> Any:
    return http_get_json("127.0.0.1", port, "/v1/status", timeout_s=2.0)


def poll_status(
    port: int, proc: ManagedProcess, timeout_s: float, done: Callable[[Any], bool]
) -> tuple[Any, float | None]:
    """Poll ``/v1/status`` until ``done(doc)``: (the last document, seconds taken or None)."""
    started = time.monotonic()
    doc = None
    while True:
        if not proc.alive():
            raise StartError(f"the daemon exited (status {proc.proc.returncode})")
        got = status_of(port)
        if got is not None:
            doc = got
            if done(doc):
                return doc, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return doc, None
        time.sleep(0.25)


def attributed(doc: Any) -> bool:
    memory = dig(doc, "consumers", "probe", "memory")
    used = number(dig(memory, "used_mib"))
    return dig(memory, "source") == "port" and used is not None and used > 0


def learned_of(doc: Any) -> float | None:
    return number(dig(doc, "consumers", "probe", "learned_mib"))


def learned_enough(learned: float | None, reference: float | None) -> bool:
    return (
        learned is not None
        and learned > CONFIGURED_MIB
        and (reference is None or learned >= reference - SLACK_MIB)
    )


def card_checks(doc: Any, card: CardReading, pid: int) -> list[Check]:
    """Checks (a), (b), (d) and (e): one status document against one nvidia-smi reading."""
    memory = dig(doc, "consumers", "probe", "memory")
    pids = dig(memory, "pids")
    pid_list = pids if isinstance(pids, list) else []
    checks = [
        Check(
            "(a) memory.pids has the consumer's pid",
            pid in pid_list,
            f"pids {pids}, consumer {pid}",
        )
    ]

    smi_pid = card.apps.get(pid)
    used = number(dig(memory, "used_mib"))
    ok, tol = close_to(used, smi_pid, CONSUMER_TOLERANCE)
    if pid not in card.apps:
        listed = ", ".join(str(p) for p in sorted(card.apps)) or "none"
        detail = (
            f"nvidia-smi lists no pid {pid} (it lists: {listed}); "
            "another PID namespace (a container) than the driver's?"
        )
    elif smi_pid is None:
        detail = f"nvidia-smi reports no memory figure for pid {pid}"
    else:
        detail = f"status {_mib(used)} vs nvidia-smi {smi_pid} MiB (+-{tol:.0f})"
    checks.append(Check("(b) memory.used_mib = nvidia-smi's for the pid", ok, detail))

    gpu = dig(doc, "gpu")
    st_used, st_total = number(dig(gpu, "used_mib")), number(dig(gpu, "total_mib"))
    smi_used = None if card.used is None else float(card.used)
    smi_total = None if card.total is None else float(card.total)
    total_ok, total_tol = close_to(st_total, smi_total, CARD_TOLERANCE)
    used_ok, used_tol = close_to(st_used, smi_used, CARD_TOLERANCE)
    note = ""
    if not used_ok and smi_used is not None and card.reserved:
        # NVML's v1 memory info counts the driver's reserved memory as used;
        # nvidia-smi shows it apart (memory.reserved).
        used_ok, used_tol = close_to(st_used, smi_used + card.reserved, CARD_TOLERANCE)
        if used_ok:
            note = f" (nvidia-smi used + its {card.reserved} MiB reserved)"
    checks.append(
        Check(
            "(d) gpu.used_mib, total_mib = nvidia-smi's",
            used_ok and total_ok,
            f"used {_mib(st_used)} vs {_mib(smi_used)} (+-{used_tol:.0f}){note}, "
            f"total {_mib(st_total)} vs {_mib(smi_total)} (+-{total_tol:.0f}) MiB",
        )
    )

    others = {p: m for p, m in card.apps.items() if p != pid}
    other_sum = float(sum(m for m in others.values() if m is not None))
    other_mib = number(dig(gpu, "other_mib"))
    listed_other = dig(gpu, "other")
    daemon_pids = (
        [o.get("pid") for o in listed_other if isinstance(o, dict)]
        if isinstance(listed_other, list)
        else listed_other
    )
    unreported = [p for p, m in others.items() if m is None]
    checks.append(
        Check(
            "(e) gpu.other_mib = other pids' sum",
            other_mib is not None and abs(other_mib - other_sum) <= SLACK_MIB,
            f"status {_mib(other_mib)} (pids {daemon_pids}) vs nvidia-smi {other_sum:.0f} MiB "
            f"(pids {sorted(others)}{', no figure for ' + str(unreported) if unreported else ''})",
        )
    )
    return checks


def render(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{c.name:<{width}}  {verdict(c.ok):<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def tail(path: Path, name: str, lines: int = 30) -> str:
    try:
        text = path.read_text("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"--- last lines of {name} ---\n" + "\n".join(text)


class Run:
    """One check: the consumer, the daemon twice, and what was found."""

    def __init__(self, tmp: Path, index: int, mib: int, lib: str) -> None:
        self.tmp = tmp
        self.index = index
        self.mib = mib
        self.lib = lib
        self.group = ProcessGroup()
        self.checks: list[Check] = []
        self.docs: dict[str, Any] = {}
        self.logs: list[Path] = []
        self.smi = shutil.which("nvidia-smi") or "nvidia-smi"

    def start_consumer(self) -> tuple[ManagedProcess, int]:
        # CUDA numbers devices fastest first unless told otherwise; NVML and
        # nvidia-smi by PCI bus: make CUDA's device 0 the GPU the daemon reads.
        env = repo_env(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=str(self.index))
        argv = [sys.executable, "-m", "bench.gpu_check", "--consumer", "--mib", str(self.mib)]
        argv += ["--lib", self.lib]
        log_path = self.tmp / "consumer.log"
        self.logs.append(log_path)
        proc = self.group.start("consumer", argv, log_path, cwd=self.tmp, env=env, stdout_pipe=True)
        deadline = time.monotonic() + CONSUMER_START_S
        while True:
            line = proc.read_line(max(0.1, deadline - time.monotonic()))
            if line.startswith("ready "):
                return proc, int(line.split()[1])

    def start_daemon(self, name: str, config: str) -> tuple[ManagedProcess, int]:
        root = self.tmp / name
        root.mkdir()
        self.logs.append(root / "broker" / "twistd.log")
        return start_broker(self.group, root, config, timeout_s=DAEMON_START_S)

    def execute(self) -> None:
        consumer, consumer_port = self.start_consumer()
        info = http_get_json("127.0.0.1", consumer_port, "/info", timeout_s=2.0) or {}
        pid = consumer.pid
        log(f"consumer: pid {pid} on port {consumer_port}, {self.mib} MiB with {info.get('lib')}")

        state_dir = self.tmp / "state"
        state_dir.mkdir()
        config = check_config(state_dir, self.index, consumer_port)
        daemon, port = self.start_daemon("first", config)
        log(f"daemon: pid {daemon.pid} on port {port}; waiting for attribution")

        doc, took = poll_status(port, daemon, ATTRIBUTION_S, attributed)
        card = read_card(self.smi, self.index)
        self.docs["first"] = doc
        memory = dig(doc, "consumers", "probe", "memory")
        self.checks.append(
            Check(
                "memory attributed by port",
                took is not None,
                f"after {took:.1f} s"
                if took is not None
                else f"not within {ATTRIBUTION_S:g} s: memory {json.dumps(memory)}",
            )
        )
        log(f"GPU {self.index}: {card.name}, {card.used}/{card.total} MiB used (nvidia-smi)")
        self.checks += card_checks(doc, card, pid)

        reference = card.apps.get(pid)
        ref = None if reference is None else float(reference)
        doc, learned_took = poll_status(
            port, daemon, LEARNED_S, lambda d: learned_enough(learned_of(d), ref)
        )
        self.docs["learned"] = doc
        learned = learned_of(doc)
        self.checks.append(
            Check(
                f"(c) learned_mib >= pid's used - {SLACK_MIB}, > {CONFIGURED_MIB}",
                ref is not None and learned_enough(learned, ref),
                f"learned {_mib(learned)}, nvidia-smi {_mib(ref)} MiB, configured "
                f"{CONFIGURED_MIB}"
                + ("" if learned_took is None else f" (within {learned_took:.1f} s more)"),
            )
        )

        # The restart: the daemon first (a clean stop), then the consumer, so
        # that no probe of the new daemon can learn the size again: whatever
        # learned_mib it shows comes from state_dir.
        self.group.stop(daemon)
        self.group.stop(consumer)
        daemon, port = self.start_daemon("restart", config)
        doc, _ = poll_status(port, daemon, 2.0, lambda d: True)
        self.docs["restart"] = doc
        after = learned_of(doc)
        survived = after is not None and after > CONFIGURED_MIB
        if after is not None and learned is not None:
            survived = survived and after >= learned - SLACK_MIB
        detail = (
            f"{_mib(after)} MiB right after the restart (before: {_mib(learned)}); "
            f"memory.source {dig(doc, 'consumers', 'probe', 'memory', 'source')} "
            "(the consumer is stopped)"
        )
        if not survived:  # did it come later (loaded after listening), or never?
            later, later_took = poll_status(
                port, daemon, 3.0, lambda d: learned_enough(learned_of(d), None)
            )
            detail += (
                f"; {_mib(learned_of(later))} after {later_took:.1f} s more"
                if later_took is not None
                else "; not there 3 s later either"
            )
        self.checks.append(Check("(f) learned_mib kept across a restart", survived, detail))

    def close(self) -> None:
        self.group.close()


def run_check(index: int, mib: int, lib: str, keep: bool) -> int:
    reason = skip_reason(index, lib)
    if reason is not None:
        log(f"skipped: {reason}")
        return 0
    started = time.monotonic()
    with terminate_on_sigterm(), workdir(keep) as tmp_name:
        run = Run(Path(tmp_name), index, mib, lib)
        error = None
        try:
            run.execute()
        except KeyboardInterrupt:
            log("interrupted: stopping its processes")
            return 130
        except (StartError, RuntimeError, OSError, ValueError) as e:
            error = str(e)
        finally:
            run.close()
        run.checks.sort(key=lambda c: c.name[1] if c.name.startswith("(") else "")
        if run.checks:
            print(render(run.checks), flush=True)
        failed = [c for c in run.checks if not c.ok]
        if error is not None or failed:
            if error is not None:  # its first line: the logs' tails follow
                log(f"FAILED: {error.splitlines()[0] if error else 'no reason given'}")
            for name, doc in run.docs.items():
                part = {"gpu": dig(doc, "gpu"), "probe": dig(doc, "consumers", "probe")}
                print(
                    f"--- /v1/status ({name}), gpu and consumers.probe ---\n"
                    f"{json.dumps(part, indent=1)}"
                )
            for path in run.logs:
                text = tail(path, str(path.relative_to(run.tmp)))
                if text:
                    print(text)
            stopped = "the run stopped early; " if error is not None else ""
            log(
                f"FAIL ({stopped}{len(failed)} of {len(run.checks)} checks failed; "
                f"{time.monotonic() - started:.0f} s)"
            )
            return 1
        log(f"PASS ({len(run.checks)} checks, {time.monotonic() - started:.0f} s)")
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description="Check per-process GPU memory attribution (/v1/status against "
        "nvidia-smi) on a real NVIDIA card; skips where there is none.",
    )
    p.add_argument(
        "--gpu",
        type=int,
        default=0,
        metavar="INDEX",
        help="which GPU (NVML / nvidia-smi index; default 0)",
    )
    p.add_argument(
        "--mib",
        type=int,
        default=ALLOC_MIB,
        help=f"what the consumer allocates, MiB (default {ALLOC_MIB}); "
        f"more than the configured {CONFIGURED_MIB}",
    )
    p.add_argument(
        "--lib",
        choices=["auto", *LIBRARIES],
        default="auto",
        help="what the consumer allocates with (default auto: torch, then "
        "cupy, then the driver API through ctypes)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    g = p.add_argument_group("the consumer (what the check starts; for testing it alone)")
    g.add_argument(
        "--consumer",
        action="store_true",
        help="be the consumer: allocate, serve GET /health, print 'ready PORT'",
    )
    g.add_argument(
        "--fake-alloc",
        action="store_true",
        help="with --consumer: allocate nothing (no GPU needed)",
    )
    g.add_argument(
        "--no-stdin-watch",
        action="store_true",
        help="with --consumer: do not exit when stdin reaches EOF",
    )
    args = p.parse_args(argv)
    if args.mib <= CONFIGURED_MIB:
        p.error(f"--mib must exceed the configured {CONFIGURED_MIB}")
    if args.gpu < 0:
        p.error("--gpu must be 0 or more")
    if (args.fake_alloc or args.no_stdin_watch) and not args.consumer:
        p.error("--fake-alloc and --no-stdin-watch go with --consumer")
    if args.consumer:
        return run_consumer(args.mib, args.lib, args.fake_alloc, not args.no_stdin_watch)
    try:
        return run_check(args.gpu, args.mib, args.lib, args.keep)
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
