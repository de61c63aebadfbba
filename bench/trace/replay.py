"""Replay a trace against the real daemon: four simulated consumers, open loop, on loopback.

One ``Stack`` per policy, fresh each time:

- the GPU is the stand-in ``tests/fake_nvidia_smi.py`` reading a JSON state
  file (``bench.evict.GpuState``'s environment), which the consumers write as
  they load and unload (``mgpu.sim``'s ``FileLedger``);
- four ``python -m mgpu.sim`` consumers with the trace's sizes, load and work
  times (already scaled). Each has an unload route, and a load route where its
  service has one, so every one of them can be swapped:

  - ``mvoice``: its admin load and unload routes;
  - ``whisper``: the simulator's whisper.cpp has no unload route (nor has the
    real one), so it could never be evicted; here it is the simulator's
    mvoice service at whisper's size serving ``stt`` (``/api/transcribe``),
    which has both routes;
  - ``ollama``: not ``vram_managed``, so that the broker may evict it, with
    Ollama's own idioms as routes (``POST /api/generate`` with the model and
    ``keep_alive: 0`` unloads, with the model alone loads) and its own
    keep-alive expiry off (``--keep-alive-s -1``);
  - ``vllm`` (the ``warm-tier`` scenario only): the simulated vLLM in sleep
    mode, ``POST /sleep?level=1`` unloads and ``POST /wake_up`` loads (from
    host RAM: ``--wake-s``); started preloaded, as a real one loads its model
    at start, so even its first load in the trace is a wake. Its kind,
    ``chat``, is no facade kind: the client sends ``POST
    /v1/chat/completions`` with its model, and the daemon routes by model
    (``openai.models``);
  - ``comfyui``: ``POST /free``; no load route: it cold-starts on its first
    request, and the GPU lease is held until ``/history/<id>`` shows the job;
- the daemon under ``twistd`` (``bench.broker.start_broker``) with the policy
  and the eviction order (``scheduler.eviction``).

Ollama and ComfyUI do not report ``loaded``, so the daemon takes them as loaded
when healthy; before the trace every consumer is unloaded through the admin
route, so the daemon's view and the card agree: all empty, as the reference
starts.

Each request is sent at its arrival time on its own connection
(``Connection: close``), whatever happened to the earlier ones; one thread
sends and reads them all through a selector. A ``/v1/events`` reader records
loads and evictions for the picture. All times are wall-clock
(``time.time``), which the consumers' work logs use too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import broker as broker_mod
from bench.evict import FAKE_NVIDIA_SMI, GpuState
from bench.servers import (
    ManagedProcess,
    ProcessGroup,
    StartError,
    http_call,
    http_get_json,
    repo_env,
    wait_for_http,
)
from bench.trace.generate import Trace
from mgpu.config import KINDS
from mgpu.sim.consumers import VLLM_MODEL

HOST = "127.0.0.1"
OLLAMA_MODEL = "llama3.2"  # the simulator's default model name

#: What each consumer is in the simulator, and its routes in the daemon's config.
SERVICES: Mapping[str, str] = {
    "mvoice": "mvoice",
    "whisper": "mvoice",  # a whisper-sized stand-in with unload and load routes
    "ollama": "ollama",
    "comfyui": "comfyui",
    "vllm": "vllm",
}
HEALTH: Mapping[str, str] = {"mvoice": "/api/health", "ollama": "/api/version",
                             "comfyui": "/system_stats", "vllm": "/health"}  # fmt: skip
KIND_PATHS: Mapping[str, str] = {
    "tts": "/api/synthesize",
    "stt": "/api/transcribe",
    "llm": "/api/generate",
    "image": "/prompt",
    "chat": "/v1/chat/completions",
}
#: Where the client sends a kind's requests on the daemon, where not ``/v1/<kind>``.
REQUEST_PATHS: Mapping[str, str] = {"chat": "/v1/chat/completions"}
BODIES: Mapping[str, bytes] = {
    "tts": json.dumps({"text": "The trace benchmark says hello."}).encode(),
    "stt": b'{"audio": "' + b"A" * 200 + b'"}',
    "llm": json.dumps({"model": OLLAMA_MODEL, "prompt": "Why?", "stream": False}).encode(),
    "image": json.dumps({"prompt": {"3": {"class_type": "KSampler", "inputs": {}}}}).encode(),
    "chat": json.dumps(
        {"model": VLLM_MODEL, "messages": [{"role": "user", "content": "Why?"}], "stream": False}
    ).encode(),
}


@dataclass(frozen=True)
class StackSettings:
    """One policy's daemon and card; every time is already scaled (replay seconds)."""

    policy: str
    card_mib: int
    cushion_mib: int
    max_skip_s: float
    min_residency_s: float
    linger_s: float
    aging_s: float
    queue_timeout_s: float
    hold_interval_s: float
    eviction: str = "lru"  # scheduler.eviction


def consumer_block(name: str, kind: str, port: int, mib: int, hold_interval_s: float) -> dict:
    """The daemon's config block for one of the trace's consumers."""
    service = SERVICES[name]
    block: dict[str, Any] = {
        "url": f"http://{HOST}:{port}",
        "health": {"method": "GET", "path": HEALTH[service]},
        "paths": {kind: {"method": "POST", "path": KIND_PATHS[kind]}},
        "vram_resident_mib": mib,
        "timeout_s": 120,
    }
    if service == "mvoice":
        block["unload"] = {"method": "POST", "path": "/api/admin/unload"}
        block["load"] = {"method": "POST", "path": "/api/admin/load"}
    elif service == "ollama":
        generate = "/api/generate"
        block["unload"] = {"method": "POST", "path": generate,
                           "body": {"model": OLLAMA_MODEL, "keep_alive": 0}}  # fmt: skip
        block["load"] = {"method": "POST", "path": generate, "body": {"model": OLLAMA_MODEL}}
    elif service == "vllm":
        # ``chat`` is no facade kind: a path under a facade kind the config requires
        # (never routed here), and the OpenAI route by model that the client uses.
        block["paths"] = {"llm": {"method": "POST", "path": KIND_PATHS[kind]}}
        block["openai"] = {"path": "/v1", "models": [VLLM_MODEL]}
        block["unload"] = {"method": "POST", "path": "/sleep?level=1"}
        block["load"] = {"method": "POST", "path": "/wake_up"}
    elif service == "comfyui":
        block["paths"][kind]["hold_until"] = {
            "path": "/history/{prompt_id}",
            "interval_s": hold_interval_s,
        }
        block["unload"] = {"method": "POST", "path": "/free",
                           "body": {"unload_models": True, "free_memory": True}}  # fmt: skip
    return block


def daemon_config(
    settings: StackSettings, routing: Mapping[str, str], blocks: Mapping[str, dict]
) -> str:
    """The daemon's configuration (JSON is YAML)."""
    config = {
        "gpu": {
            "source": "nvidia-smi",
            "nvidia_smi": str(FAKE_NVIDIA_SMI),
            "poll_interval_s": 1,
            "cushion_mib": settings.cushion_mib,
        },
        "scheduler": {
            "policy": settings.policy,
            "eviction": settings.eviction,
            "max_skip_s": settings.max_skip_s,
            "min_residency_s": settings.min_residency_s,
            "linger_s": settings.linger_s,
            "aging_s": settings.aging_s,
            "queue_timeout_s": settings.queue_timeout_s,
            "max_queue": 4096,
            "free_wait_s": 10,
        },
        "health": {"interval_s": 5, "timeout_s": 3},
        # The facade's kinds only; the others are sent by their own routes (``REQUEST_PATHS``).
        "routing": {kind: name for kind, name in routing.items() if kind in KINDS},
        "consumers": dict(blocks),
    }
    return "# Generated by the mgpumanager trace benchmark.\n" + json.dumps(config, indent=1)


@dataclass
class Sent:
    """One request as the client saw it (wall-clock seconds)."""

    i: int
    kind: str
    consumer: str
    due: float
    sent: float = 0.0
    answered: float | None = None
    status: int | None = None
    error: str | None = None


class EventReader:
    """Reads ``/v1/events`` in a thread: every event, with ``at`` as epoch seconds."""

    def __init__(self, port: int) -> None:
        self.events: list[dict[str, Any]] = []
        self.error: str | None = None
        self._conn = http.client.HTTPConnection(HOST, port, timeout=None)
        self._conn.request("GET", "/v1/events")
        self._resp = self._conn.getresponse()
        if self._resp.status != 200:
            raise RuntimeError(f"/v1/events answered {self._resp.status}")
        self._thread = threading.Thread(target=self._run, name="trace-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                line = self._resp.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    event["at"] = parse_at(event["at"])
                    self.events.append(event)
        except (OSError, ValueError, http.client.HTTPException) as e:
            self.error = str(e)

    def close(self) -> list[dict[str, Any]]:
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._conn.close()
        return list(self.events)


def parse_at(at: str) -> float:
    """An event's ``at`` (``2026-11-27T01:18:49.360Z``) as epoch seconds."""
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def raw_request(kind: str, port: int) -> bytes:
    """``POST /v1/<kind>`` on a connection the daemon closes after answering."""
    body = BODIES[kind]
    path = REQUEST_PATHS.get(kind, f"/v1/{kind}")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def status_of(raw: bytes) -> int | None:
    """The status code of a raw HTTP answer, if it has a status line."""
    try:
        return int(raw[9:12]) if raw.startswith(b"HTTP/1.") else None
    except ValueError:
        return None


@dataclass
class Stack:
    """One policy's consumers and daemon, started in ``tmp`` and stopped by ``close``."""

    trace: Trace
    settings: StackSettings
    scale: float
    tmp: Path
    log: Callable[[str], None]
    group: ProcessGroup = field(default_factory=ProcessGroup)
    ports: dict[str, int] = field(default_factory=dict)
    broker_port: int = 0
    load_s: dict[str, float] = field(default_factory=dict)
    work_s: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        p, s = self.trace.params, self.settings
        self.tmp.mkdir(parents=True, exist_ok=True)
        state = GpuState(self.tmp / "gpu-state.json")
        card = {"index": 0, "name": "trace GPU", "total_mib": s.card_mib, "used_mib": 0}
        state.path.write_text(json.dumps({"gpus": [card], "fail": None}))
        blocks = {}
        for kind, name in p.routing.items():
            self.load_s[name] = round(p.load_s(name) * self.scale, 4)
            self.work_s[name] = round(p.kinds[kind].work_s * self.scale, 4)
            proc, port = self._start_sim(name, state.path)
            self.ports[name] = port
            blocks[name] = consumer_block(name, kind, port, p.sizes_mib[name], s.hold_interval_s)
        config = daemon_config(s, p.routing, blocks)
        proc, self.broker_port = broker_mod.start_broker(
            self.group, self.tmp, config, env=state.env()
        )
        self._settle(proc)

    def _start_sim(self, name: str, gpu_state: Path) -> tuple[ManagedProcess, int]:
        p = self.trace.params
        argv = [
            sys.executable, "-m", "mgpu.sim", "--name", name, "--service", SERVICES[name],
            "--port", "0", "--vram-mib", str(p.sizes_mib[name]),
            "--load-s", str(round(p.cold_s(name) * self.scale, 4)),
            "--work-s", str(self.work_s[name]),
            "--gpu-state", str(gpu_state), "--gpu-total-mib", str(self.settings.card_mib),
            "--log", str(self.tmp / f"{name}.work.jsonl"),
        ]  # fmt: skip
        if SERVICES[name] == "ollama":
            argv += ["--keep-alive-s", "-1"]
        if SERVICES[name] == "vllm":
            # Loaded from disk at its start; the admin unload before the trace puts it
            # to sleep at level 1, so every load in the trace is a wake from host RAM.
            argv += ["--preload", "--wake-s", str(self.load_s[name])]
        proc = self.group.start(
            name, argv, self.tmp / f"{name}.log", cwd=self.tmp, env=repo_env(), stdout_pipe=True
        )
        line = proc.read_line(20.0)
        if not line.startswith("listening "):
            raise StartError(f"{name}: expected 'listening HOST:PORT', got {line!r}")
        port = int(line.rsplit(":", 1)[1])
        wait_for_http(proc, port, HEALTH[SERVICES[name]], 20.0)
        return proc, port

    def status(self) -> dict[str, Any]:
        doc = http_get_json(HOST, self.broker_port, "/v1/status", timeout_s=5.0)
        return doc if isinstance(doc, dict) else {}

    def _settle(self, broker: ManagedProcess) -> None:
        """Every consumer probed healthy, then unloaded: the daemon and the card start empty."""
        deadline = time.monotonic() + 20.0
        while True:
            consumers = self.status().get("consumers", {})
            if consumers and all(c.get("healthy") for c in consumers.values()):
                break
            if time.monotonic() > deadline or not broker.alive():
                raise StartError(f"the consumers were not all healthy: {consumers}")
            time.sleep(0.05)
        for name in self.ports:
            got = http_call(
                HOST, self.broker_port, "POST", f"/v1/admin/consumers/{name}/unload", 30.0
            )
            if got is None or got[0] != 200:
                raise StartError(f"admin unload of {name} failed: {got}")
        consumers = self.status().get("consumers", {})
        if any(c.get("loaded") for c in consumers.values()):
            raise StartError(f"consumers still loaded after the admin unloads: {consumers}")

    def replay(self, budget_s: float) -> dict[str, Any]:
        """Fire the trace, wait for the GPU to go idle, collect what happened."""
        before = self.status().get("scheduler", {})
        events = EventReader(self.broker_port)
        try:
            t0 = time.time() + 0.5
            sent = fire(self.trace, self.scale, self.broker_port, t0, t0 + budget_s)
            self._wait_idle(sent, deadline=t0 + budget_s + 30.0)
        finally:
            got_events = events.close()
        after = self.status().get("scheduler", {})
        work = {name: self._work_log(name) for name in self.ports}
        return {
            "t0": t0,
            "sent": [vars(s) for s in sent],
            "work": work,
            "events": [e for e in got_events if e["at"] >= t0 - 0.5],
            "scheduler_before": before,
            "scheduler": after,
            "load_s": dict(self.load_s),
            "work_s": dict(self.work_s),
            # Whose loads the daemon times (a load route): the others cold-start in a request.
            "timed": sorted(n for n in self.ports if SERVICES[n] != "comfyui"),
            "events_error": events.error,
        }

    def _work_log(self, name: str) -> list[dict[str, Any]]:
        got = http_get_json(HOST, self.ports[name], "/_sim/log", timeout_s=10.0)
        return got if isinstance(got, list) else []

    def _wait_idle(self, sent: list[Sent], deadline: float) -> None:
        """Until nothing holds or waits for the GPU and every image job has run."""
        images = sum(1 for s in sent if s.kind == "image" and s.status == 200)
        comfy = next((n for k, n in self.trace.params.routing.items() if k == "image"), None)
        while time.time() < deadline:
            sched = self.status().get("scheduler", {})
            idle = (
                sched.get("holder") is None and not sched.get("queued") and not sched.get("running")
            )
            done = (
                comfy is None
                or sum(1 for e in self._work_log(comfy) if e.get("end") is not None) >= images
            )
            if idle and done:
                return
            time.sleep(0.1)
        raise RuntimeError("the daemon did not go idle after the trace")

    def close(self) -> None:
        self.group.close()


def fire(trace: Trace, scale: float, port: int, t0: float, deadline: float) -> list[Sent]:
    """Send every request at ``t0 + t * scale``, open loop; read every answer to its end."""
    routing = trace.params.routing
    todo = [
        Sent(i, a.kind, routing[a.kind], t0 + a.t * scale) for i, a in enumerate(trace.arrivals)
    ]
    raws = {kind: raw_request(kind, port) for kind in routing}
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    nxt = 0
    try:
        while nxt < len(todo) or sel.get_map():
            now = time.time()
            if now > deadline:
                raise RuntimeError(
                    f"the replay ran past its budget: {len(sel.get_map())} answers outstanding, "
                    f"{len(todo) - nxt} requests not sent"
                )
            while nxt < len(todo) and todo[nxt].due <= now:
                _send(sel, bufs, todo[nxt], raws[todo[nxt].kind], port)
                nxt += 1
            wait = todo[nxt].due - time.time() if nxt < len(todo) else 0.5
            for key, _ in sel.select(max(0.0, min(wait, 0.5))):
                _read(sel, bufs, key)
    finally:
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return todo


def _send(
    sel: selectors.BaseSelector, bufs: dict[int, bytearray], s: Sent, raw: bytes, port: int
) -> None:
    sock = socket.create_connection((HOST, port), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sent = time.time()
    sock.sendall(raw)
    sock.setblocking(False)
    bufs[sock.fileno()] = bytearray()
    sel.register(sock, selectors.EVENT_READ, s)


def _read(
    sel: selectors.BaseSelector, bufs: dict[int, bytearray], key: selectors.SelectorKey
) -> None:
    sock: socket.socket = key.fileobj  # type: ignore[assignment]
    s: Sent = key.data
    try:
        chunk = sock.recv(65536)
    except BlockingIOError:
        return
    except OSError as e:
        chunk, s.error = b"", str(e)
    buf = bufs[sock.fileno()]
    if chunk:
        buf += chunk
        return
    s.answered = time.time()
    s.status = status_of(bytes(buf))
    del bufs[sock.fileno()]
    sel.unregister(sock)
    sock.close()
