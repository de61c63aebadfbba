"""Real processes on loopback for the integration tests.

The daemon runs under ``twistd`` as a child process, the consumers are
``python -m mgpu.sim`` processes, and the GPU is ``tests/fake_nvidia_smi.py``
reading a JSON state file that the consumers write their allocations into.
Everything the tests wait for is bounded; every process is stopped (SIGTERM,
then SIGKILL) when its test or its test class is done, and at interpreter
exit whatever is left.

Three ways to talk HTTP to the daemon:

- ``HttpClient``: treq over a pool the test closes (ordinary requests);
- ``raw_request``: bytes written as given on a fresh connection, the answer
  read to the connection's end, so no client normalises a path or a header;
- ``RawConnection``: the protocol behind it, for tests that abort, pause or
  time what they receive.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import treq
import yaml
from treq.client import HTTPClient
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse

from mgpu.sim.demo import PRODUCTION_CONSUMERS

reactor: Any = _global_reactor

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_NVIDIA_SMI = REPO_ROOT / "tests" / "fake_nvidia_smi.py"

#: Bounds on every wait; the suite must never hang.
CONSUMER_START_S = 15.0
DAEMON_START_S = 15.0
STOP_S = 5.0

#: The GPU that ``fake_nvidia_smi`` reports (before any consumer allocates).
FAKE_GPU_NAME = "Fake NVIDIA RTX 4090"
FAKE_GPU_TOTAL_MIB = 24564
FAKE_GPU_BASE_USED_MIB = 1000

# -- small async helpers ---------------------------------------------------


def cancel_timer(call: IDelayedCall) -> None:
    """Cancel a delayed call unless it already ran (a cleanup)."""
    if call.active():
        call.cancel()


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on the real reactor."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(
    check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Call ``check`` until it returns (or its awaitable gives) something truthy; return that.

    Fails with ``TimeoutError`` naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(interval)


def _ephemeral_ports() -> range:
    """The ports the kernel hands to ``bind(port 0)`` (Linux: ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, outside the kernel's ephemeral
    range: a consumer binding port 0 meanwhile (the demo's, the simulators') can never
    take it before the daemon listens there."""
    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = random.randrange(10000, 65536)
        if port in ephemeral:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def established_connections(pid: int, remote_port: int) -> int:
    """How many ESTABLISHED IPv4 TCP connections process ``pid`` has to 127.0.0.1:``remote_port``.

    The process's sockets are the ``socket:[inode]`` links in ``/proc/<pid>/fd``;
    ``/proc/net/tcp`` gives each inode's addresses and state (``01``: established).
    """
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            count += 1
    return count


# -- processes -------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the working tree first on ``PYTHONPATH`` and unbuffered output."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def twistd_argv() -> list[str]:
    """How to run this interpreter's ``twistd``.

    ``python -m twisted.scripts.twistd`` does nothing (the module has no
    ``__main__`` block), so use the ``twistd`` script beside ``sys.executable``,
    or its two lines through ``-c`` where there is none.
    """
    script = Path(sys.executable).parent / "twistd"
    if script.is_file():
        return [sys.executable, str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    ]


_LIVE: set[ManagedProcess] = set()


@dataclass(eq=False)
class ManagedProcess:
    """A child process in its own session, its output in files; ``stop`` always reaps it."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @classmethod
    def start(
        cls, name: str, argv: list[str], workdir: Path, env: Mapping[str, str]
    ) -> ManagedProcess:
        """Start ``argv`` with cwd ``workdir``; stdout and stderr go to files there."""
        stdout_path = workdir / f"{name}.stdout"
        stderr_path = workdir / f"{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                argv,
                cwd=workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group: stop() also reaps its children
            )
        proc = cls(name, popen, stdout_path, stderr_path)
        _LIVE.add(proc)
        return proc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text("utf-8", "replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def output(self, limit: int = 4000) -> str:
        """The tail of stdout and stderr, for failure messages."""
        return (
            f"--- {self.name} (pid {self.pid}, exit {self.popen.poll()}) stdout:\n"
            f"{self.stdout()[-limit:]}\n--- stderr:\n{self.stderr()[-limit:]}"
        )

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process (and its group) now and reap it."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(STOP_S)
        _LIVE.discard(self)

    def stop_now(self) -> None:
        """SIGTERM, wait up to ``STOP_S``, then SIGKILL: blocking (atexit, emergencies)."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_S)
        self._signal_group(signal.SIGKILL)  # the leader's leftovers too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(STOP_S)
        _LIVE.discard(self)

    async def stop(self) -> None:
        """SIGTERM, wait up to ``STOP_S`` without blocking the reactor, then SIGKILL."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + STOP_S
            while self.alive() and time.monotonic() < deadline:
                await sleep(0.02)
        self.stop_now()

    async def wait_exit(self, timeout: float) -> int:
        """The exit status, once it exits; ``TimeoutError`` after ``timeout`` seconds."""
        await wait_for(lambda: not self.alive(), timeout, f"{self.name} to exit", 0.02)
        code = self.popen.returncode
        _LIVE.discard(self)
        return code


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop_now()


# -- consumers -------------------------------------------------------------


@dataclass(eq=False)
class Consumer:
    """A consumer process on loopback (``python -m mgpu.sim`` or the recorder)."""

    name: str
    process: ManagedProcess
    port: int
    log_path: Path | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of its log file (sim: finished work; recorder: every request)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        lines = self.log_path.read_text("utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


async def start_listener(
    name: str, argv: list[str], workdir: Path, log_path: Path | None = None
) -> Consumer:
    """Start a consumer process; wait for its first line ``listening 127.0.0.1:PORT``."""
    proc = ManagedProcess.start(f"consumer-{name}", argv, workdir, child_env())

    def listening() -> int | None:
        first = proc.stdout().split("\n", 1)
        if len(first) == 2 and first[0].startswith("listening 127.0.0.1:"):
            return int(first[0].rsplit(":", 1)[1])
        if not proc.alive():
            raise RuntimeError(f"consumer {name} exited before listening")
        return None

    try:
        port = await wait_for(listening, CONSUMER_START_S, f"consumer {name} to listen")
    except BaseException as e:
        await proc.stop()
        raise RuntimeError(f"consumer {name} did not start: {e}\n{proc.output()}") from None
    return Consumer(name, proc, port, log_path)


async def start_consumer(
    name: str,
    workdir: Path,
    gpu_state: Path | None = None,
    service: str | None = None,
    extra_args: Iterable[str] = (),
) -> Consumer:
    """``python -m mgpu.sim --name NAME --port 0 [--gpu-state F] --log F`` on loopback."""
    log_path = workdir / f"{name}.work.jsonl"
    argv = [sys.executable, "-m", "mgpu.sim", "--name", name, "--port", "0"]
    argv += ["--log", str(log_path), "--service", service or name]
    if gpu_state is not None:
        argv += ["--gpu-state", str(gpu_state)]
    argv += list(extra_args)
    return await start_listener(name, argv, workdir, log_path)


async def start_recorder(name: str, workdir: Path) -> Consumer:
    """``tests/integration/recorder.py``: a consumer that logs every request it gets."""
    log_path = workdir / f"{name}.requests.jsonl"
    log_path.touch()
    argv = [sys.executable, "-m", "tests.integration.recorder", "--log", str(log_path)]
    return await start_listener(name, argv, workdir, log_path)


async def start_hostile(name: str, workdir: Path) -> Consumer:
    """``tests/integration/hostile.py``: a consumer that sends what each request scripts."""
    argv = [sys.executable, "-m", "tests.integration.hostile"]
    return await start_listener(name, argv, workdir)


async def sim_call(
    consumer: Consumer, method: str, path: str, body: object = None, timeout: float = 5
) -> Any:
    """A JSON call to a simulated consumer's ``/_sim/`` API (or any of its routes)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else None
    response = await raw_request(
        consumer.port, request_bytes(method, path, data, headers), timeout=timeout
    )
    if response.status != 200:
        raise AssertionError(
            f"{consumer.name} {method} {path}: {response.status} {response.body!r}"
        )
    return response.json()


async def set_faults(consumer: Consumer, faults: Mapping[str, Any]) -> None:
    """Replace every injected fault of a simulated consumer (``{}`` clears them)."""
    await sim_call(consumer, "POST", "/_sim/faults", dict(faults))


async def sim_log(consumer: Consumer) -> list[dict[str, Any]]:
    """The consumer's work entries, finished or running (``GET /_sim/log``)."""
    entries: list[dict[str, Any]] = await sim_call(consumer, "GET", "/_sim/log")
    return entries


# -- the GPU and the configuration -----------------------------------------


def write_gpu_state(path: Path, used_mib: int = FAKE_GPU_BASE_USED_MIB) -> None:
    """The fake nvidia-smi's state file: one GPU, nothing allocated by consumers yet."""
    state = {
        "gpus": [
            {
                "index": 0,
                "name": FAKE_GPU_NAME,
                "total_mib": FAKE_GPU_TOTAL_MIB,
                "used_mib": used_mib,
            }
        ],
        "fail": None,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), "utf-8")
    os.replace(tmp, path)


def read_gpu_state(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return data


def _test_block(name: str, **changes: Any) -> dict[str, Any]:
    """``config/consumers.yaml``'s block for ``name`` (less its URL), with no coexistence
    and a 60 s timeout: each test declares what may coexist, and a hung consumer is told
    within the test's time."""
    block: dict[str, Any] = json.loads(json.dumps(PRODUCTION_CONSUMERS[name]))
    block.pop("can_coexist_with", None)
    return {**block, "timeout_s": 60, **changes}


#: Each simulated service's block in ``config/consumers.yaml``, less its URL.
CONSUMER_BLOCKS: Mapping[str, Mapping[str, Any]] = {
    "mvoice": _test_block("mvoice"),
    "whisper": _test_block("whisper"),
    "ollama": _test_block("ollama"),
    # The job is polled every 0.1 s rather than 0.5 s: the tests wait for it.
    "comfyui": _test_block(
        "comfyui",
        paths={
            "image": {
                "method": "POST",
                "path": "/prompt",
                "hold_until": {"path": "/history/{prompt_id}", "interval_s": 0.1},
            }
        },
    ),
    "recorder": {
        "health": {"method": "GET", "path": "/"},
        "paths": {
            "tts": {"method": "POST", "path": "/record"},
            "stt": {"method": "POST", "path": "/record"},
        },
        "vram_resident_mib": 1,
        "timeout_s": 10,
    },
}


def make_config(
    consumers: Mapping[str, Consumer],
    routing: Mapping[str, str],
    audio_proxy: str | None = None,
    gpu: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A configuration document for simulated ``consumers`` (their names are their services).

    ``overrides`` replaces keys of a consumer's block; ``sections`` adds top-level sections.
    """
    blocks = {}
    for name, consumer in consumers.items():
        block = json.loads(json.dumps(CONSUMER_BLOCKS[name]))
        block.update((overrides or {}).get(name, {}))
        block["url"] = consumer.url
        block["can_coexist_with"] = [
            other for other in block.get("can_coexist_with", []) if other in consumers
        ]
        if not block["can_coexist_with"]:
            del block["can_coexist_with"]
        blocks[name] = block
    config: dict[str, Any] = {
        "gpu": dict(gpu) if gpu is not None else {"source": "none", "total_mib": 16384},
        "health": dict(health) if health is not None else {"interval_s": 0.5, "timeout_s": 1},
        "routing": dict(routing),
        "consumers": blocks,
    }
    if audio_proxy is not None:
        config["audio_proxy"] = audio_proxy
    config.update(sections)
    return config


def token_auth(workdir: Path, token: str) -> dict[str, Any]:
    """Write ``token`` to ``workdir / "token"``; the ``auth`` block that names that file."""
    path = workdir / "token"
    path.write_text(token + "\n", "utf-8")
    return {"token_file": str(path)}


def smi_gpu(poll_interval_s: float = 0.3) -> dict[str, Any]:
    """The ``gpu`` section for the stand-in nvidia-smi (its state file comes from the env)."""
    return {
        "source": "nvidia-smi",
        "nvidia_smi": str(FAKE_NVIDIA_SMI),
        "poll_interval_s": poll_interval_s,
        "total_mib": FAKE_GPU_TOTAL_MIB,
    }


def write_config(path: Path, config: Mapping[str, Any] | str) -> Path:
    """Write a configuration document (or raw text) as YAML."""
    text = config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)
    path.write_text(text, "utf-8")
    return path


# -- the daemon ------------------------------------------------------------


@dataclass(eq=False)
class Daemon:
    """The daemon under ``twistd -n`` on a loopback port."""

    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        """The daemon's resident set (``VmRSS`` of ``/proc/<pid>/status``), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")


def daemon_argv(*args: str) -> list[str]:
    """``twistd -n --pidfile= mgpumanager ARGS``."""
    return [*twistd_argv(), "-n", "--pidfile=", "mgpumanager", *args]


def start_daemon_process(
    workdir: Path,
    args: Iterable[str],
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = (),
) -> ManagedProcess:
    """Start the daemon without waiting for anything (bad configurations).

    ``launcher`` goes before the command (``prlimit --nofile=N:N --``).
    """
    return ManagedProcess.start(
        "daemon", [*launcher, *daemon_argv(*args)], workdir, env if env is not None else child_env()
    )


async def start_daemon(
    workdir: Path,
    config: Path | None = None,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = (),
) -> Daemon:
    """Start the daemon on a free port and wait until ``/healthz`` answers 200."""
    port = free_port()
    args = [] if config is None else ["--config", str(config)]
    args += [*extra_args, "--listen", f"tcp:{port}:interface=127.0.0.1"]
    proc = start_daemon_process(workdir, args, env, launcher)
    daemon = Daemon(proc, port)

    async def healthy() -> bool:
        if not proc.alive():
            raise RuntimeError("the daemon exited")
        try:
            response = await raw_request(port, get("/healthz"), timeout=2)
        except Exception:  # refused while it starts, or not an answer yet: try again
            return False
        return response.status == 200

    try:
        await wait_for(healthy, DAEMON_START_S, "the daemon's /healthz", 0.1)
    except BaseException as e:
        await proc.stop()
        raise RuntimeError(f"the daemon did not start: {e}\n{proc.output()}") from None
    return daemon


# -- raw HTTP --------------------------------------------------------------


def get(path: str, headers: Mapping[str, str] | None = None, method: str = "GET") -> bytes:
    """A request with ``Connection: close``, the path as given (nothing normalised)."""
    return request_bytes(method, path, headers=headers)


def request_bytes(
    method: str,
    target: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """An HTTP/1.1 request with ``Host`` and ``Connection: close``; the target is sent as is."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


@dataclass
class RawResponse:
    """A parsed HTTP/1.1 answer read to the end of the connection."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes, head_only: bool = False) -> RawResponse:
    """Parse one answer: status line, headers, and a body by length, chunks or close."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head in {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    _, code, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    response = RawResponse(int(code), reason[0] if reason else "", headers, b"", raw)
    if head_only or response.status in (204, 304) or 100 <= response.status < 200:
        return response
    encoding = (response.header("transfer-encoding") or "").lower()
    length = response.header("content-length")
    if "chunked" in encoding:
        response.body = dechunk(rest)
    elif length is not None:
        response.body = rest[: int(length)]
        if len(response.body) != int(length):
            raise ValueError(f"body cut short: {len(response.body)} of {length} bytes")
    else:
        response.body = rest
    return response


def dechunk(data: bytes) -> bytes:
    """The body of a complete chunked transfer coding."""
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise ValueError("chunked body cut short")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        body += data[:size]
        if len(data) < size + 2:
            raise ValueError("chunked body cut short")
        data = data[size + 2 :]


class RawConnection(Protocol):
    """A client connection that records what arrives and when; ``closed`` fires at the end."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.closed: Deferred[bytes] = Deferred()
        self.reason: Failure | None = None
        self.keep = True

    def dataReceived(self, data: bytes) -> None:
        if self.keep:
            self.chunks.append((time.monotonic(), data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.closed.callback(self.data())

    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection at once (a client that goes away)."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


P = TypeVar("P", bound=Protocol)


async def connect(port: int, protocol: P) -> P:
    """Connect ``protocol`` to 127.0.0.1:``port``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connectProtocol(endpoint, protocol)
    return protocol


async def closed(conn: RawConnection, timeout: float) -> bytes:
    """What ``conn`` received, once the server closed it; abort it after ``timeout`` seconds."""
    timer: IDelayedCall = reactor.callLater(timeout, conn.abort)
    try:
        data = await conn.closed
    finally:
        if timer.active():
            timer.cancel()
        else:
            raise TimeoutError(f"no complete answer within {timeout:g} s: {conn.data()[:300]!r}")
    return data


async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> RawConnection:
    """Send ``data`` on a new connection and read until the server closes it."""
    conn = await connect(port, RawConnection())
    conn.send(data)
    await closed(conn, timeout)
    return conn


async def raw_request(
    port: int, data: bytes, timeout: float = 10, head_only: bool = False
) -> RawResponse:
    """Send ``data`` as is and parse the answer (the server closes: ``Connection: close``)."""
    conn = await raw_exchange(port, data, timeout)
    return parse_response(conn.data(), head_only=head_only)


# -- treq ------------------------------------------------------------------


@dataclass(eq=False)
class HttpClient:
    """treq on a private pool; ``close`` (add it as a cleanup) closes its connections."""

    base: str
    pool: HTTPConnectionPool = field(init=False)
    client: HTTPClient = field(init=False)

    def __post_init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.client = HTTPClient(Agent(reactor, pool=self.pool))

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[IResponse, bytes]:
        """One request; the whole answer read; bounded by ``timeout``."""
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            kwargs["headers"].setdefault("Content-Type", "application/json")
        if body is not None:
            kwargs["data"] = body
        d = self.client.request(method, self.base + path, **kwargs)
        timer = reactor.callLater(timeout, d.cancel)
        try:
            response = await d
            content: bytes = await treq.content(response)
        finally:
            if timer.active():
                timer.cancel()
        return response, content

    async def json(self, method: str, path: str, **kwargs: Any) -> tuple[IResponse, Any]:
        response, content = await self.request(method, path, **kwargs)
        try:
            return response, json.loads(content)
        except ValueError:
            raise AssertionError(
                f"{method} {path}: {response.code} not JSON: {content[:300]!r}"
            ) from None

    async def status(self) -> dict[str, Any]:
        response, doc = await self.json("GET", "/v1/status")
        assert response.code == 200, (response.code, doc)
        return doc


# -- a whole stack: temp dir, consumers, daemon ----------------------------


@dataclass(eq=False)
class Stack:
    """A work directory, simulated consumers, a GPU state file and a daemon."""

    workdir: Path
    gpu_state: Path
    consumers: dict[str, Consumer] = field(default_factory=dict)
    daemon: Daemon | None = None

    @classmethod
    def new(cls, prefix: str = "mgpu-it-") -> Stack:
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
        _WORKDIRS.add(workdir)
        gpu_state = workdir / "gpu-state.json"
        write_gpu_state(gpu_state)
        return cls(workdir, gpu_state)

    async def add_consumers(
        self, *names: str, args: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        """Start simulated consumers (concurrently), sharing the GPU state file.

        A consumer's name is its service; ``args`` adds command-line options by name.
        """
        extra = args or {}
        started: list[Deferred[Consumer]] = [
            ensureDeferred(start_consumer(n, self.workdir, self.gpu_state, None, extra.get(n, ())))
            for n in names
        ]
        failures = []
        for name, d in zip(names, started, strict=True):
            try:
                self.consumers[name] = await d
            except Exception as e:
                failures.append(e)
        if failures:
            raise failures[0]

    async def add_recorder(self, name: str = "recorder") -> Consumer:
        """Start the request-recording consumer (``recorder.py``)."""
        self.consumers[name] = consumer = await start_recorder(name, self.workdir)
        return consumer

    async def start(
        self,
        config: Mapping[str, Any] | str,
        extra_args: Iterable[str] = (),
        launcher: Sequence[str] = (),
    ) -> None:
        """Write ``config`` and start the daemon with the fake nvidia-smi's state in its env."""
        path = write_config(self.workdir / "mgpumanager.yaml", config)
        env = child_env(FAKE_NVIDIA_SMI_STATE=str(self.gpu_state))
        self.daemon = await start_daemon(self.workdir, path, extra_args, env, launcher)

    @property
    def port(self) -> int:
        assert self.daemon is not None
        return self.daemon.port

    def client(self) -> HttpClient:
        assert self.daemon is not None
        return HttpClient(self.daemon.url)

    def output(self) -> str:
        parts = [c.process.output(1500) for c in self.consumers.values()]
        if self.daemon is not None:
            parts.append(self.daemon.process.output())
        return "\n".join(parts)

    async def stop(self, keep_workdir: bool = False) -> None:
        if self.daemon is not None:
            await self.daemon.process.stop()
        for consumer in self.consumers.values():
            await consumer.process.stop()
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            _WORKDIRS.discard(self.workdir)

    @contextlib.asynccontextmanager
    async def starting(self) -> AsyncIterator[None]:
        """Around starting the stack's processes: if anything in the block fails, stop
        what it started and keep the work directory (its logs) for a look."""
        try:
            yield
        except BaseException:
            await self.stop(keep_workdir=True)
            raise


_WORKDIRS: set[Path] = set()


@atexit.register
def _remove_workdirs() -> None:
    _stop_leftovers()  # atexit runs in reverse order: stop the processes first
    for workdir in list(_WORKDIRS):
        shutil.rmtree(workdir, ignore_errors=True)


class SharedStacks:
    """At most one running stack shared by the tests of one class, started lazily.

    Trial calls no ``setUpClass``; a test's ``setUp`` asks for its class's
    stack, and the previous class's stack is stopped when another class asks
    (trial runs a class's tests together), so a single daemon runs at a time.
    Whatever is left is stopped at interpreter exit.
    """

    def __init__(self) -> None:
        self._key: object = None
        self._stack: Stack | None = None
        self._failed: str | None = None

    async def get(self, key: object, build: Callable[[], Awaitable[Stack]]) -> Stack:
        if key == self._key:
            if self._failed is not None:
                raise RuntimeError(f"the shared stack did not start: {self._failed}")
            stack = self._stack
            if stack is not None and stack.daemon is not None and stack.daemon.process.alive():
                return stack
        await self.release()
        self._key = key
        try:
            self._stack = await build()
        except BaseException as e:
            self._failed = str(e)
            raise
        return self._stack

    async def release(self) -> None:
        stack, self._stack, self._key, self._failed = self._stack, None, None, None
        if stack is not None:
            await stack.stop()


shared_stacks = SharedStacks()
