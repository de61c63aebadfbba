"""Start, watch and stop the benchmark's helper processes (consumer, nginx, broker).

Every process is started in its own session, so a Ctrl-C in the terminal reaches
only the benchmark, which then stops its children in order; on Linux each child
also gets ``PR_SET_PDEATHSIG`` so it dies with the benchmark even when the
benchmark itself is killed with SIGKILL. All waits are bounded in time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

#: How long a stopped process gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0

_PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A helper process did not come up; the message says which and why."""


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM it when the benchmark goes away."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """One child process, its log file, and how to stop it for good."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._stdout_buf = b""  # read past the last line read_line returned
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.PIPE,  # closed by stop(); the consumer exits on its EOF
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,  # safe: the benchmark starts no threads
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_line(self, timeout_s: float) -> str:
        """The child's next stdout line: the consumer's port, then its events, if asked for."""
        import selectors

        stream = self.proc.stdout
        if stream is None:
            raise StartError(f"{self.name}: stdout is not a pipe")
        deadline = time.monotonic() + timeout_s
        buf = self._stdout_buf
        with selectors.DefaultSelector() as sel:
            sel.register(stream, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise StartError(f"{self.name}: no output within {timeout_s} s{self.tail()}")
                chunk = os.read(stream.fileno(), 4096)
                if not chunk:
                    raise StartError(f"{self.name}: exited before it was ready{self.tail()}")
                buf += chunk
        line, _, self._stdout_buf = buf.partition(b"\n")
        return line.decode("utf-8", "replace").strip()

    def tail(self, lines: int = 25) -> str:
        """The end of the child's log, for error messages."""
        try:
            self._log.flush()
            text = self.log_path.read_text("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            return ""
        if not text:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(text)

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; always reaps the child."""
        proc = self.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(STOP_GRACE_S)
        if proc.stdout is not None:
            proc.stdout.close()
        self._log.close()


class ProcessGroup:
    """Owns every helper process; ``close()`` stops them in reverse start order."""

    def __init__(self) -> None:
        self._procs: list[ManagedProcess] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> ManagedProcess:
        """Start a ``ManagedProcess`` that ``close()`` will stop."""
        proc = ManagedProcess(name, argv, log_path, cwd=cwd, env=env, stdout_pipe=stdout_pipe)
        self._procs.append(proc)
        return proc

    def stop(self, proc: ManagedProcess) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                print(f"bench: stopping {proc.name} failed: {e}", file=sys.stderr)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt, so ``finally`` blocks clean up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot report their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str,
    ready: Callable[[], bool],
    proc: ManagedProcess,
    timeout_s: float,
    interval_s: float = 0.05,
) -> None:
    """Poll ``ready()`` until true; fail early if ``proc`` exits, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(
                f"{proc.name} exited (status {proc.proc.returncode}) before {what}{proc.tail()}"
            )
        if ready():
            return
        time.sleep(interval_s)
    raise StartError(f"{proc.name}: {what} did not happen within {timeout_s} s{proc.tail()}")


def http_get(host: str, port: int, path: str, timeout_s: float = 1.0) -> tuple[int, bytes] | None:
    """``GET path``: (status, body), or None if no answer (one short-lived connection)."""
    return http_call(host, port, "GET", path, timeout_s)


def http_call(
    host: str, port: int, method: str, path: str, timeout_s: float = 1.0
) -> tuple[int, bytes] | None:
    """``METHOD path`` with an empty body: (status, body), or None if no answer."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def http_get_ok(host: str, port: int, path: str, timeout_s: float = 1.0) -> bool:
    """True if ``GET path`` answers 200 (used while waiting for a server to come up)."""
    got = http_get(host, port, path, timeout_s)
    return got is not None and got[0] == 200


def http_get_json(host: str, port: int, path: str, timeout_s: float = 1.0) -> Any:
    """The JSON body of a 200 answer to ``GET path``; None without one."""
    got = http_get(host, port, path, timeout_s)
    if got is None or got[0] != 200:
        return None
    try:
        return json.loads(got[1])
    except ValueError:
        return None


#: The repository root (``bench/``'s parent), put first on the children's PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_env(**extra: str) -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + rest if rest else "")
    env.update(extra)
    return env


def start_consumer(
    group: ProcessGroup, tmp: Path, name: str, args: Sequence[str] = (), timeout_s: float = 10.0
) -> tuple[ManagedProcess, int]:
    """Start ``python -m bench.consumer ARGS`` and wait until it answers its health route."""
    proc = group.start(
        name,
        [sys.executable, "-m", "bench.consumer", *args],
        tmp / f"{name}.log",
        cwd=tmp,
        env=repo_env(),
        stdout_pipe=True,
    )
    port = int(proc.read_line(timeout_s))
    wait_for_http(proc, port, "/api/health", timeout_s)
    return proc, port


def wait_for_http(proc: ManagedProcess, port: int, path: str, timeout_s: float) -> None:
    """Wait until ``GET path`` on 127.0.0.1:``port`` answers 200 (``proc`` must stay up)."""
    wait_until(f"answering {path}", lambda: http_get_ok("127.0.0.1", port, path), proc, timeout_s)


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) used so far by ``pid``, or None.

    Linux lets any process read another's CPU clock, ``MAKE_PROCESS_CPUCLOCK(pid,
    CPUCLOCK_SCHED)``, with nanosecond resolution; ``/proc/PID/stat``'s 10 ms
    ticks are the fallback (too coarse for a few thousand requests of 20 us).
    """
    if sys.platform.startswith("linux"):
        try:
            return time.clock_gettime(((~pid) << 3) | 2)
        except OSError:
            pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mib(pid: int) -> float | None:
    """The resident memory of ``pid`` in MiB (``VmRSS`` in ``/proc/PID/status``), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_nofile(pid: int) -> tuple[str, str] | None:
    """The soft and hard ``Max open files`` of ``pid`` (``/proc/PID/limits``), or None."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    except (OSError, ValueError):
        pass
    return None
