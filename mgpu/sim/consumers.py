# -*- test-case-name: tests.test_sim -*-
"""Simulated consumers: mvoice, whisper.cpp, Ollama and ComfyUI.

Each speaks its service's HTTP shapes (SPEC section 3, DESIGN section 5;
served by ``mgpu.sim.http``) and holds simulated VRAM in a ``GpuLedger``
(``mgpu.sim.gpu``) while its model is loaded:

- a model that is not loaded loads on its first work request (cold start);
  loading takes ``load_s`` (by default 0.1 s per 1000 MiB), a work request
  ``work_s[kind]``;
- memory is claimed when a load starts and freed on unload, after
  ``free_delay_s`` when a fault asks for a lazy driver (``Faults``).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, cast

from attrs import asdict, define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpu.config import frozen_mapping
from mgpu.gpu import ReactorTime
from mgpu.sim.gpu import SIM_GPU_NAME, GpuLedger
from mgpu.sim.http import (
    Handler,
    HttpError,
    SyntheticBody,
    alive,
    json_body,
    send_body,
    send_json,
    send_text,
)

SERVICES: Final[Mapping[str, int]] = MappingProxyType(
    {"mvoice": 2800, "whisper": 1500, "ollama": 6000, "comfyui": 13000}
)
"""The services the simulator speaks, and each one's default model size in MiB."""
DEFAULT_WORK_S: Final[Mapping[str, float]] = MappingProxyType(
    {"tts": 0.2, "stt": 0.2, "llm": 0.5, "image": 0.8}
)
LOAD_S_PER_MIB: Final = 0.0001
"""Load time grows with size: 0.1 s per 1000 MiB (a tenth of a real disk-to-GPU load)."""
OLLAMA_MODEL: Final = "llama3.2"
OLLAMA_FOREVER_S: Final = (2**63 - 1) / 1e9
"""Ollama's "never" (``keep_alive`` < 0): the longest Go duration, about 292 years."""
_SIZED: Final = re.compile(r"sized-(\d{1,12})(\.[A-Za-z0-9]+)?")
_log = Logger()


@frozen
class ConsumerSettings:
    """One simulated consumer: which service it imitates, its size and its timings."""

    name: str
    service: str
    vram_mib: int
    load_s: float
    work_s: Mapping[str, float] = field(converter=frozen_mapping, factory=dict)
    preload: bool = False
    keep_alive_s: float | None = 300.0
    """Ollama: idle seconds before it frees its model (Ollama's 5 minutes); None: never."""
    tokens: int = 10
    """Ollama: tokens per generation, spread over ``work_s["llm"]``."""

    @classmethod
    def make(
        cls,
        name: str,
        service: str | None = None,
        *,
        vram_mib: int | None = None,
        load_s: float | None = None,
        work_s: float | Mapping[str, float] | None = None,
        **rest: Any,
    ) -> ConsumerSettings:
        """Defaults by service: its size, ``LOAD_S_PER_MIB``, ``DEFAULT_WORK_S``."""
        service = service or name
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
        size = SERVICES[service] if vram_mib is None else vram_mib
        times = dict(DEFAULT_WORK_S)
        if isinstance(work_s, int | float):
            times = dict.fromkeys(times, float(work_s))
        elif work_s is not None:
            times.update(work_s)
        load = round(size * LOAD_S_PER_MIB, 3) if load_s is None else load_s
        return cls(name, service, size, load, times, **rest)


@frozen
class Faults:
    """Faults injected through ``POST /_sim/faults`` (``mgpu.sim.http``'s docstring)."""

    status: Mapping[str, int] = field(converter=frozen_mapping, factory=dict)
    hang: frozenset[str] = frozenset()
    delay_s: Mapping[str, float] = field(converter=frozen_mapping, factory=dict)
    free_delay_s: float = 0.0

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Check a ``/_sim/faults`` body; ``ValueError`` says what is wrong."""
        if not isinstance(data, dict) or set(data) - {"status", "hang", "delay_s", "free_delay_s"}:
            raise ValueError("faults: an object with status, hang, delay_s, free_delay_s")
        status, hang = data.get("status", {}), data.get("hang", [])
        delay, free_delay = data.get("delay_s", {}), data.get("free_delay_s", 0.0)
        if not isinstance(status, dict) or not all(
            _is_int(v) and 100 <= v <= 599 for v in status.values()
        ):
            raise ValueError("faults.status: an object of path -> HTTP status")
        if not isinstance(hang, list) or not all(isinstance(p, str) for p in hang):
            raise ValueError("faults.hang: a list of paths")
        if not isinstance(delay, dict) or not all(_is_seconds(v) for v in delay.values()):
            raise ValueError("faults.delay_s: an object of path -> seconds")
        if not _is_seconds(free_delay):
            raise ValueError("faults.free_delay_s: seconds")
        return cls(status, frozenset(hang), delay, float(free_delay))

    def to_json(self) -> dict[str, object]:
        """The shape ``from_json`` reads."""
        return {
            "status": dict(self.status),
            "hang": sorted(self.hang),
            "delay_s": dict(self.delay_s),
            "free_delay_s": self.free_delay_s,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


@define
class WorkEntry:
    """One work request: ``start`` at arrival (a cold load included), ``end`` when done."""

    consumer: str
    kind: str
    path: str
    start: float
    end: float | None = None
    cold: bool = False

    def to_json(self) -> dict[str, object]:
        """One entry of ``GET /_sim/log`` and of the ``--log`` file."""
        return asdict(self)


class SimConsumer:
    """A model that loads into simulated VRAM, does timed work, unloads; HTTP in subclasses."""

    def __init__(
        self,
        settings: ConsumerSettings,
        ledger: GpuLedger,
        clock: ReactorTime,
        log_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.clock = clock
        self.log_path = log_path
        self.log: list[WorkEntry] = []
        self.faults = Faults()
        self.loaded = False
        self.busy = 0
        self._generation = 0
        self._load_lock = DeferredLock()
        self._pending: set[Deferred[None]] = set()
        self._stopped = False
        if settings.preload:
            self.ledger.allocate(settings.name, settings.vram_mib)
            self.loaded = True

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def loading(self) -> bool:
        return self._load_lock.locked

    def routes(self) -> dict[str, dict[str, Handler]]:
        """Path (``/prefix/*`` for a prefix) -> method -> handler; each finishes its request."""
        raise NotImplementedError

    def sleep(self, seconds: float) -> Deferred[None]:
        """``deferLater`` on the consumer's clock, cancelled by ``stop`` (and at once after it)."""
        if self._stopped:
            return fail(CancelledError())
        d: Deferred[None] = deferLater(cast(IReactorTime, self.clock), seconds)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        return d.addBoth(done)

    def stop(self) -> None:
        """Cancel every timer (work, loads, delayed frees): nothing is left on the reactor."""
        self._stopped = True
        for d in list(self._pending):
            d.cancel()

    async def load(self, *, again: bool = False) -> bool:
        """Load the model unless loaded (``again``: reload); True if this call loaded it."""
        await self._load_lock.acquire()
        try:
            if self.loaded and not again:
                return False
            self._generation += 1
            generation = self._generation
            self.ledger.allocate(self.name, self.settings.vram_mib)
            await self.sleep(self.settings.load_s)
            if generation == self._generation:
                self.loaded = True
            return True
        finally:
            self._load_lock.release()

    def unload(self) -> None:
        """Mark unloaded now; free the memory now or ``free_delay_s`` later."""
        self.loaded = False
        self._generation += 1
        generation = self._generation
        delay = self.faults.free_delay_s
        if not delay:
            self.ledger.release(self.name)
            return

        def release(_: object) -> None:
            if generation == self._generation:
                self.ledger.release(self.name)

        self.sleep(delay).addCallbacks(release, _ignore_cancel)

    async def work(
        self,
        kind: str,
        path: str,
        steps: int = 1,
        on_step: Callable[[int], None] | None = None,
    ) -> WorkEntry:
        """A work request: a cold start if needed, then ``work_s[kind]`` on the GPU.

        The work time is cut into ``steps`` equal parts with ``on_step(i)`` after
        each (Ollama's tokens).  ``busy`` counts from arrival, so a keep-alive
        expiry never unloads under a cold start.
        """
        entry = WorkEntry(self.name, kind, path, self.clock.seconds())
        self.busy += 1
        try:
            entry.cold = await self.load()
            self.log.append(entry)
            for i in range(steps):
                await self.sleep(self.settings.work_s.get(kind, 0.0) / steps)
                if on_step is not None:
                    on_step(i)
        finally:
            self.busy -= 1
            entry.end = self.clock.seconds()
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry.to_json()) + "\n")
        return entry

    def state(self) -> dict[str, object]:
        """What ``GET /_sim/state`` shows."""
        return {
            "name": self.name,
            "service": self.settings.service,
            "loaded": self.loaded,
            "loading": self.loading,
            "vram_mib": self.ledger.owners().get(self.name, 0),
            "busy": self.busy,
        }

    def now_iso(self) -> str:
        return datetime.fromtimestamp(self.clock.seconds(), UTC).isoformat()


class MVoice(SimConsumer):
    """mvoice: TTS and STT, admin load/unload, and the ``/audio`` files it made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._audio: dict[str, int] = {}

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/api/health": {"GET": self.health},
            "/api/synthesize": {"POST": self.synthesize},
            "/api/transcribe": {"POST": self.transcribe},
            "/api/admin/load": {"POST": self.admin_load},
            "/api/admin/unload": {"POST": self.admin_unload},
            "/audio/*": {"GET": self.audio, "HEAD": self.audio},
        }

    async def health(self, request: Request) -> None:
        send_json(request, {"status": "ok", "loaded": self.loaded})

    async def synthesize(self, request: Request) -> None:
        text = json_body(request).get("text")
        if not isinstance(text, str) or not text:
            raise HttpError(400, {"error": "text: a non-empty string is required"})
        await self.work("tts", "/api/synthesize")
        name = f"{self.name}-{len(self._audio) + 1}.wav"
        self._audio[name] = size = 44 + 1920 * len(text)  # 60 ms of 16 kHz mono per character
        send_json(request, {"audio": f"/audio/{name}", "bytes": size})

    async def transcribe(self, request: Request) -> None:
        size = len(request.content.read()) if request.content is not None else 0
        await self.work("stt", "/api/transcribe")
        send_json(request, {"text": f"simulated transcript of {size} bytes"})

    async def admin_load(self, request: Request) -> None:
        await self.load()
        send_json(request, {"status": "ok", "loaded": True})

    async def admin_unload(self, request: Request) -> None:
        self.unload()
        send_json(request, {"status": "ok", "loaded": False})

    def audio_body(self, name: str) -> SyntheticBody | None:
        """``sized-<N>[.ext]``: N pattern bytes; a synthesized name: a WAV of its size."""
        sized = _SIZED.fullmatch(name)
        if sized:
            return SyntheticBody(int(sized.group(1)))
        if name in self._audio:
            return SyntheticBody(self._audio[name], _wav_header(self._audio[name]))
        return None

    async def audio(self, request: Request) -> None:
        name = request.path.decode("utf-8", "replace")[len("/audio/") :]
        body = self.audio_body(name)
        if body is None:
            raise HttpError(404, {"error": f"no such audio: {name}"})
        kind = b"audio/wav" if name.endswith(".wav") else b"application/octet-stream"
        request.setHeader(b"Content-Type", kind)
        send_body(request, body)


class Whisper(SimConsumer):
    """whisper.cpp server: ``/inference``, ``/load`` swaps the model; no unload route.

    Health is 503 ``loading model`` while ``/load`` runs, as whisper.cpp's is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._swapping = False

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/health": {"GET": self.health},
            "/inference": {"POST": self.inference},
            "/load": {"POST": self.swap},
        }

    async def health(self, request: Request) -> None:
        if self._swapping:
            raise HttpError(503, {"status": "loading model"})
        send_json(request, {"status": "ok"})

    async def inference(self, request: Request) -> None:
        await self.work("stt", "/inference")
        send_json(request, {"text": " simulated transcript"})

    async def swap(self, request: Request) -> None:
        self._swapping = True
        try:
            await self.load(again=True)
        finally:
            self._swapping = False
        send_text(request, "Load was successful!")


class Ollama(SimConsumer):
    """Ollama: NDJSON token streams; manages its own VRAM (keep-alive, ``keep_alive: 0``).

    ``/api/ps`` answers as the real one's (``models`` with ``name``, ``model``,
    ``size``, ``digest``, ``details``, ``expires_at``, ``size_vram``) while a model
    is loading or loaded; ``expires_at`` is when keep-alive frees it, or, while a
    request runs and with a negative ``keep_alive``, the far future Ollama shows
    then (now plus the longest Go duration).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = OLLAMA_MODEL
        self._expiry: Deferred[None] | None = None
        self._expires_at: float | None = None  # when the keep-alive timer frees it; None: no timer

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/api/version": {"GET": self.version},
            "/api/generate": {"POST": self.generate},
            "/api/ps": {"GET": self.ps},
        }

    async def version(self, request: Request) -> None:
        send_json(request, {"version": "0.0.0-sim"})

    async def ps(self, request: Request) -> None:
        held = self.loaded or self.loading
        send_json(request, {"models": [self._running_model()] if held else []})

    def _running_model(self) -> dict[str, object]:
        """The model's entry in ``/api/ps``, shaped as Ollama's API documents it."""
        size = self.settings.vram_mib * 2**20
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }
        return {
            "name": self._model,
            "model": self._model,
            "size": size,
            "digest": hashlib.sha256(self._model.encode()).hexdigest(),
            "details": details,
            "expires_at": self._expires_at_text(),
            "size_vram": size,
        }

    def _expires_at_text(self) -> str:
        """When keep-alive frees the model, RFC 3339 with a UTC offset; far ahead when no
        timer runs (a request is running, or ``keep_alive`` was negative)."""
        at = self._expires_at
        if at is None:
            at = self.clock.seconds() + OLLAMA_FOREVER_S
        return datetime.fromtimestamp(at, UTC).isoformat()

    async def generate(self, request: Request) -> None:
        body = json_body(request)
        self._model = str(body.get("model") or self._model)
        keep_alive = keep_alive_s(body.get("keep_alive"), self.settings.keep_alive_s)
        prompt = body.get("prompt")
        if not prompt and keep_alive == 0:
            self._forget()
            send_json(request, self._line("", done=True, done_reason="unload"))
            return
        self._keep(None)  # no expiry while a request runs
        try:
            if not prompt:  # Ollama's idiom to load a model and do nothing else
                await self.load()
                send_json(request, self._line("", done=True, done_reason="load"))
                return
            await self._stream(request, stream=body.get("stream", True) is not False)
        finally:
            self._keep(keep_alive)

    async def _stream(self, request: Request, stream: bool) -> None:
        """Generate: with ``stream``, one NDJSON line written per token as it is made."""
        tokens = [f"tok{i} " for i in range(self.settings.tokens)]

        def token(i: int) -> None:
            if stream and alive(request):
                request.write(json.dumps(self._line(tokens[i])).encode() + b"\n")

        if stream:
            request.setHeader(b"Content-Type", b"application/x-ndjson")
        await self.work("llm", "/api/generate", steps=len(tokens), on_step=token)
        last = self._line("" if stream else "".join(tokens), done=True, done_reason="stop")
        last["eval_count"] = len(tokens)
        if not stream:
            send_json(request, last)
        elif alive(request):
            request.write(json.dumps(last).encode() + b"\n")
            request.finish()

    def _line(self, response: str, done: bool = False, **extra: object) -> dict[str, object]:
        line = {"model": self._model, "created_at": self.now_iso(), "response": response}
        return line | {"done": done} | extra

    def _keep(self, seconds: float | None) -> None:
        """Free the model ``seconds`` after the last request ends, as Ollama's keep-alive does."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._expires_at = None
        if self.busy or seconds is None:
            return
        if seconds == 0:
            self._forget()
            return
        self._expires_at = self.clock.seconds() + seconds
        self._expiry = self.sleep(seconds)
        self._expiry.addCallbacks(lambda _: self._forget(), _ignore_cancel)

    def _forget(self) -> None:
        self._expires_at = None
        if not self.busy and (self.loaded or self.loading):
            self.unload()


class ComfyUI(SimConsumer):
    """ComfyUI: ``/prompt`` queues a job and answers at once; ``/free`` acts after the job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs = DeferredLock()
        self._number = 0
        self._queue: list[tuple[int, str]] = []
        self._running: tuple[int, str] | None = None
        self._history: dict[str, dict[str, object]] = {}
        self._free_requested = False

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/system_stats": {"GET": self.system_stats},
            "/prompt": {"POST": self.prompt},
            "/history": {"GET": self.history},
            "/history/*": {"GET": self.history},
            "/queue": {"GET": self.queue},
            "/free": {"POST": self.free},
        }

    async def system_stats(self, request: Request) -> None:
        held = self.ledger.owners().get(self.name, 0) * 2**20
        device = {
            "name": f"cuda:0 {SIM_GPU_NAME}",
            "type": "cuda",
            "index": 0,
            "torch_vram_total": held,
        }
        system = {"os": "posix", "comfyui_version": "sim"}
        send_json(request, {"system": system, "devices": [device]})

    async def prompt(self, request: Request) -> None:
        if not isinstance(json_body(request).get("prompt"), dict):
            error = {"type": "no_prompt", "message": "No prompt provided", "details": ""}
            raise HttpError(400, {"error": error, "node_errors": {}})
        self._number += 1
        job = (self._number, f"00000000-0000-4000-8000-{self._number:012d}")
        self._queue.append(job)
        Deferred.fromCoroutine(self._run(job)).addErrback(_ignore_cancel)
        send_json(request, {"prompt_id": job[1], "number": job[0], "node_errors": {}})

    async def _run(self, job: tuple[int, str]) -> None:
        """One job at a time, in order; a pending ``/free`` acts once the job ends."""
        await self._jobs.acquire()
        try:
            self._queue.remove(job)
            self._running = job
            await self.work("image", "/prompt")
            status = {"status_str": "success", "completed": True, "messages": []}
            self._history[job[1]] = {"prompt": list(job), "outputs": {}, "status": status}
        finally:
            self._running = None
            if self._free_requested:
                self._free_requested = False
                self.unload()
            self._jobs.release()

    async def history(self, request: Request) -> None:
        path = request.path.decode("utf-8", "replace")
        if path == "/history":
            send_json(request, self._history)
            return
        prompt_id = path[len("/history/") :]
        entry = self._history.get(prompt_id)
        send_json(request, {} if entry is None else {prompt_id: entry})

    async def queue(self, request: Request) -> None:
        running = [list(self._running)] if self._running else []
        send_json(
            request, {"queue_running": running, "queue_pending": [list(j) for j in self._queue]}
        )

    async def free(self, request: Request) -> None:
        body = json_body(request)
        if body.get("unload_models") or body.get("free_memory"):
            self._free_requested = True
            if self._running is None:  # like ComfyUI's worker loop: acts on its next turn
                self.sleep(0).addCallbacks(lambda _: self._free_if_idle(), _ignore_cancel)
        send_text(request, "")

    def _free_if_idle(self) -> None:
        if self._free_requested and self._running is None:
            self._free_requested = False
            self.unload()


IMPLEMENTATIONS: Final[Mapping[str, type[SimConsumer]]] = MappingProxyType(
    {"mvoice": MVoice, "whisper": Whisper, "ollama": Ollama, "comfyui": ComfyUI}
)


def make_consumer(
    settings: ConsumerSettings,
    ledger: GpuLedger,
    clock: ReactorTime,
    log_path: Path | None = None,
) -> SimConsumer:
    """The simulated consumer for ``settings.service``."""
    return IMPLEMENTATIONS[settings.service](settings, ledger, clock, log_path)


def keep_alive_s(value: object, default: float | None) -> float | None:
    """Ollama's ``keep_alive``: seconds or ``"5m"``/``"30s"``/``"1h"``; negative: forever."""
    if value is None:
        return default
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not match:
            raise HttpError(400, {"error": f"keep_alive: not a duration: {value!r}"})
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
        value = float(match.group(1)) * scale
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HttpError(400, {"error": "keep_alive: a number of seconds or a duration"})
    return None if value < 0 else float(value)


def _wav_header(size: int) -> bytes:
    """A RIFF header for 16 kHz 16-bit mono PCM: the file is ``size`` bytes in all."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", size - 8, b"WAVE", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16, b"data", size - 44,
    )  # fmt: skip


def _ignore_cancel(reason: Failure) -> None:
    if not reason.check(CancelledError):
        _log.failure("simulated consumer failed", reason)
