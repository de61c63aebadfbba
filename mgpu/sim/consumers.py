# -*- test-case-name: tests.test_sim -*-
"""Simulated consumers: mvoice, whisper.cpp, Ollama, ComfyUI, an OpenAI-style speech server, vLLM.

Each speaks its service's HTTP shapes (SPEC sections 3 and 9, DESIGN sections
5 and 9; served by ``mgpu.sim.http``): Ollama its native API and its OpenAI
routes, ComfyUI its page, its API and its origin check, the speech server
OpenAI's audio routes. Each holds simulated VRAM in a ``GpuLedger``
(``mgpu.sim.gpu``) while its model is loaded; every route that generates,
embeds, draws or speaks goes through ``SimConsumer.work``:

- a model that is not loaded loads on its first work request (cold start);
  loading takes ``load_s`` (by default 0.1 s per 1000 MiB), a work request
  ``work_s[kind]``;
- memory is claimed when a load starts and freed on unload, after
  ``free_delay_s`` when a fault asks for a lazy driver (``Faults``).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import math
import re
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

from attrs import asdict, define, field, frozen
from python_multipart import parse_form
from python_multipart.multipart import Field, File
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
    send_bytes,
    send_json,
    send_text,
)
from mgpu.sim.websocket import Feed

SERVICES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "mvoice": 2800,
        "whisper": 1500,
        "ollama": 6000,
        "comfyui": 13000,
        "openai-speech": 3000,
        "vllm": 11000,
    }
)
"""The services the simulator speaks, and each one's default model size in MiB."""
DEFAULT_WORK_S: Final[Mapping[str, float]] = MappingProxyType(
    {"tts": 0.2, "stt": 0.2, "llm": 0.5, "image": 0.8}
)
LOAD_S_PER_MIB: Final = 0.0001
"""Load time grows with size: 0.1 s per 1000 MiB (a tenth of a real disk-to-GPU load)."""
OLLAMA_MODEL: Final = "llama3.2"
OLLAMA_MODELS: Final = (OLLAMA_MODEL, "llama3.1:8b", "nomic-embed-text")
"""What the simulated Ollama lists as its models (it answers for any name asked for)."""
EMBEDDING_DIMS: Final = 16
VLLM_MODEL: Final = "Qwen/Qwen2.5-7B-Instruct"
"""The one model the simulated vLLM serves (``config/examples/vllm.yaml``'s)."""
SPEECH_MODELS: Final = ("tts-1", "whisper-1")
"""What the simulated OpenAI-style speech server lists as its models."""
AUDIO_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {"mp3": "audio/mpeg", "wav": "audio/wav", "pcm": "audio/pcm"}
)
"""``/v1/audio/speech``'s ``response_format``s the simulator makes, and their media types."""
PCM_BYTES_PER_CHAR: Final = 1920
"""Speech length: 60 ms of 16 kHz 16-bit mono per character of text."""
COMFYUI_STEPS: Final = 1
"""ComfyUI: ``progress`` messages of a job whose sampler names no ``steps`` (the work
is then one timer, as for the other consumers; real samplers always name them)."""
COMFYUI_MAX_STEPS: Final = 100
OLLAMA_FOREVER_S: Final = (2**63 - 1) / 1e9
"""Ollama's "never" (``keep_alive`` < 0): the longest Go duration, about 292 years."""
_SIZED: Final = re.compile(r"sized-(\d{1,12})(\.[A-Za-z0-9]+)?")
_log = Logger()
_T = TypeVar("_T")


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
    """Ollama, vLLM: tokens per generation, spread over ``work_s["llm"]``."""
    wake_s: float | None = None
    """vLLM: a load from host RAM after ``/sleep?level=1``; None: a tenth of ``load_s``."""

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


_Part = Callable[[str], Mapping[str, object]]
"""Where a generated text goes in an Ollama line: ``response``, or ``message.content``."""


@frozen
class _Framing:
    """How generated tokens are written: each streamed, the stream's end, or one answer."""

    content_type: bytes
    piece: Callable[[str], bytes]
    end: Callable[[WorkEntry], bytes]
    whole: Callable[[str, WorkEntry], object]


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
            await self.sleep(self.load_time())
            if generation == self._generation:
                self.loaded = True
            return True
        finally:
            self._load_lock.release()

    def load_time(self) -> float:
        """Seconds the next load takes: ``load_s`` (a vLLM woken from host RAM: less)."""
        return self.settings.load_s

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


class OpenAIText(SimConsumer):
    """OpenAI's text routes, shared by the simulated Ollama and vLLM: ``/v1/models``,
    ``/v1/chat/completions`` and ``/v1/completions`` (SSE with ``stream: true``)."""

    DEFAULT_MODEL = OLLAMA_MODEL
    OWNED_BY = "library"
    FINGERPRINT = "fp_ollama"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = self.DEFAULT_MODEL
        self._completions = 0  # numbers the OpenAI answers' ids

    async def openai_models(self, request: Request) -> None:
        """``GET /v1/models``: the same models in OpenAI's list shape."""
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": self.OWNED_BY}
            for name in self._models()
        ]
        send_json(request, {"object": "list", "data": data})

    def _models(self) -> list[str]:
        """The models ``/v1/models`` lists."""
        return [self._model]

    def _pick_model(self, asked: object) -> None:
        """The model a request names: served whatever it is (Ollama pulls any name)."""
        self._model = str(asked or self._model)

    async def chat_completions(self, request: Request) -> None:
        """OpenAI's chat completions: SSE chunks with ``stream: true``, else one object."""
        await self._openai(request, "/v1/chat/completions", "messages")

    async def completions(self, request: Request) -> None:
        """OpenAI's legacy completions, shaped like ``chat_completions``'s answers."""
        await self._openai(request, "/v1/completions", "prompt")

    async def _openai(self, request: Request, path: str, field: str) -> None:
        body = json_body(request)
        if not body.get(field):
            raise _openai_error(f"{field} is required")
        self._pick_model(body.get("model"))
        framing = self._sse(field == "messages", _word_count(body[field]))
        stream = body.get("stream") is True
        await self._serve(
            self.settings.keep_alive_s, lambda: self._generate(request, path, stream, framing)
        )

    async def _serve(self, keep_alive: float | None, run: Callable[[], Awaitable[_T]]) -> _T:
        """One request's work (Ollama adds its keep-alive around it)."""
        return await run()

    async def _generate(self, request: Request, path: str, stream: bool, framing: _Framing) -> None:
        """Generate ``tokens`` through ``work``: streamed, one write per token as it is made."""
        tokens = [f"tok{i} " for i in range(self.settings.tokens)]

        def token(i: int) -> None:
            if stream and alive(request):
                request.write(framing.piece(tokens[i]))

        if stream:
            request.setHeader(b"Content-Type", framing.content_type)
        entry = await self.work("llm", path, steps=len(tokens), on_step=token)
        if not stream:
            send_json(request, framing.whole("".join(tokens), entry))
        elif alive(request):
            request.write(framing.end(entry))
            request.finish()

    def _sse(self, chat: bool, prompt_tokens: int) -> _Framing:
        """OpenAI's framing: ``data: {chunk}`` events ending ``data: [DONE]``, or one object."""
        self._completions += 1
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{self._completions}"
        created, model = int(self.clock.seconds()), self._model

        def envelope(kind: str, text: str, finish: str | None, key: str) -> dict[str, object]:
            choice: dict[str, object] = {"text": text, "index": 0, "finish_reason": finish}
            if chat:
                choice = {"index": 0, key: {"role": "assistant", "content": text}}
                choice["finish_reason"] = finish
            return {"id": ident, "object": kind, "created": created, "model": model,
                    "system_fingerprint": self.FINGERPRINT, "choices": [choice]}  # fmt: skip

        def chunk(text: str, finish: str | None) -> bytes:
            event = envelope("chat.completion.chunk" if chat else "text_completion", text,
                             finish, "delta")  # fmt: skip
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        def whole(text: str, entry: WorkEntry) -> dict[str, object]:
            count = self.settings.tokens
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                     "total_tokens": prompt_tokens + count}  # fmt: skip
            kind = "chat.completion" if chat else "text_completion"
            return envelope(kind, text, "stop", "message") | {"usage": usage}

        return _Framing(
            b"text/event-stream",
            piece=lambda text: chunk(text, None),
            end=lambda entry: chunk("", "stop") + b"data: [DONE]\n\n",
            whole=whole,
        )


class Ollama(OpenAIText):
    """Ollama: NDJSON token streams; manages its own VRAM (keep-alive, ``keep_alive: 0``).

    ``/api/ps`` answers as the real one's (``models`` with ``name``, ``model``,
    ``size``, ``digest``, ``details``, ``expires_at``, ``size_vram``) while a model
    is loading or loaded; ``expires_at`` is when keep-alive frees it, or, while a
    request runs and with a negative ``keep_alive``, the far future Ollama shows
    then (now plus the longest Go duration).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expiry: Deferred[None] | None = None
        self._expires_at: float | None = None  # when the keep-alive timer frees it; None: no timer

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/api/version": {"GET": self.version},
            "/api/generate": {"POST": self.generate},
            "/api/chat": {"POST": self.chat},
            "/api/embed": {"POST": self.embed},
            "/api/tags": {"GET": self.tags},
            "/api/ps": {"GET": self.ps},
            "/v1/models": {"GET": self.openai_models},
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
        }

    async def version(self, request: Request) -> None:
        send_json(request, {"version": "0.0.0-sim"})

    async def ps(self, request: Request) -> None:
        held = self.loaded or self.loading
        send_json(request, {"models": [self._running_model()] if held else []})

    async def tags(self, request: Request) -> None:
        """The models it has, as ``/api/tags`` lists them (``modified_at`` for each)."""
        modified = datetime.fromtimestamp(0, UTC).isoformat()
        models = [self._model_entry(name) | {"modified_at": modified} for name in self._models()]
        send_json(request, {"models": models})

    def _models(self) -> list[str]:
        """``OLLAMA_MODELS`` and the model last asked for (the simulator serves any name)."""
        return list(dict.fromkeys((*OLLAMA_MODELS, self._model)))

    def _model_entry(self, name: str) -> dict[str, object]:
        """A model as ``/api/tags`` and ``/api/ps`` describe it: name, size, digest, details."""
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }
        return {
            "name": name,
            "model": name,
            "size": self.settings.vram_mib * 2**20,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": details,
        }

    def _running_model(self) -> dict[str, object]:
        """The model's entry in ``/api/ps``, shaped as Ollama's API documents it."""
        entry = self._model_entry(self._model)
        return entry | {"expires_at": self._expires_at_text(), "size_vram": entry["size"]}

    def _expires_at_text(self) -> str:
        """When keep-alive frees the model, RFC 3339 with a UTC offset; far ahead when no
        timer runs (a request is running, or ``keep_alive`` was negative)."""
        at = self._expires_at
        if at is None:
            at = self.clock.seconds() + OLLAMA_FOREVER_S
        return datetime.fromtimestamp(at, UTC).isoformat()

    async def generate(self, request: Request) -> None:
        await self._native(request, "/api/generate", "prompt", _generate_part)

    async def chat(self, request: Request) -> None:
        await self._native(request, "/api/chat", "messages", _chat_part)

    async def _native(self, request: Request, path: str, field: str, part: _Part) -> None:
        """``/api/generate``, ``/api/chat``: tokens as NDJSON (``stream: false``: one JSON);
        without ``field`` (the prompt, the messages), Ollama's idioms to load and unload."""
        body = json_body(request)
        self._model = str(body.get("model") or self._model)
        keep_alive = keep_alive_s(body.get("keep_alive"), self.settings.keep_alive_s)
        if not body.get(field) and keep_alive == 0:
            self._forget()
            send_json(request, self._line(part(""), done=True, done_reason="unload"))
            return
        if not body.get(field):
            await self._serve(keep_alive, self.load)
            send_json(request, self._line(part(""), done=True, done_reason="load"))
            return
        framing = self._ndjson(part, _word_count(body[field]))
        stream = body.get("stream", True) is not False
        await self._serve(keep_alive, lambda: self._generate(request, path, stream, framing))

    async def embed(self, request: Request) -> None:
        """``/api/embed``: one unit vector per ``input`` (a string or a list of them)."""
        body = json_body(request)
        self._model = str(body.get("model") or self._model)
        keep_alive = keep_alive_s(body.get("keep_alive"), self.settings.keep_alive_s)
        texts = _texts(body.get("input", []))
        if texts is None:
            raise HttpError(400, {"error": "input: a string or a list of strings"})
        entry = await self._serve(keep_alive, lambda: self.work("llm", "/api/embed"))
        answer = {"model": self._model, "embeddings": [_embedding(t) for t in texts]}
        send_json(request, answer | self._durations(entry, _word_count(texts), with_eval=False))

    async def embeddings(self, request: Request) -> None:
        """OpenAI's embeddings: ``{"object": "list", "data": [...], "model", "usage"}``."""
        body = json_body(request)
        texts = _texts(body.get("input"))
        if not texts:
            raise _openai_error("input: a non-empty string or list of strings is required")
        self._model = str(body.get("model") or self._model)
        await self._serve(self.settings.keep_alive_s, lambda: self.work("llm", "/v1/embeddings"))
        data = [
            {"object": "embedding", "embedding": _embedding(text), "index": i}
            for i, text in enumerate(texts)
        ]
        usage = {"prompt_tokens": _word_count(texts), "total_tokens": _word_count(texts)}
        send_json(request, {"object": "list", "data": data, "model": self._model, "usage": usage})

    async def _serve(self, keep_alive: float | None, run: Callable[[], Awaitable[_T]]) -> _T:
        """One request's work: no keep-alive expiry while it runs, ``keep_alive`` after."""
        self._keep(None)
        try:
            return await run()
        finally:
            self._keep(keep_alive)

    def _ndjson(self, part: _Part, prompt_tokens: int) -> _Framing:
        """Ollama's own framing: one JSON line per token, then the ``done`` line."""

        def last(text: str, entry: WorkEntry) -> dict[str, object]:
            done = self._line(part(text), done=True, done_reason="stop")
            return done | self._durations(entry, prompt_tokens)

        return _Framing(
            b"application/x-ndjson",
            piece=lambda text: _json_line(self._line(part(text))),
            end=lambda entry: _json_line(last("", entry)),
            whole=last,
        )

    def _durations(
        self, entry: WorkEntry, prompt_tokens: int, with_eval: bool = True
    ) -> dict[str, object]:
        """Ollama's counts and durations (nanoseconds) of a finished request."""
        total = (entry.end or entry.start) - entry.start
        load = self.settings.load_s if entry.cold else 0.0
        times: dict[str, object] = {
            "total_duration": round(total * 1e9),
            "load_duration": round(load * 1e9),
            "prompt_eval_count": prompt_tokens,
        }
        if with_eval:
            times |= {
                "eval_count": self.settings.tokens,
                "eval_duration": round((total - load) * 1e9),
            }
        return times

    def _line(
        self, part: Mapping[str, object], done: bool = False, **extra: object
    ) -> dict[str, object]:
        line = {"model": self._model, "created_at": self.now_iso(), **part}
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


def _node(
    category: str,
    required: Mapping[str, list[object]],
    outputs: Mapping[str, str],
    output_node: bool = False,
) -> dict[str, object]:
    """One node class as ComfyUI's ``/object_info`` describes it (``outputs``: name -> type)."""
    return {
        "input": {"required": dict(required)},
        "input_order": {"required": list(required)},
        "output": list(outputs.values()),
        "output_is_list": [False] * len(outputs),
        "output_name": list(outputs),
        "description": "",
        "python_module": "nodes",
        "category": category,
        "output_node": output_node,
    }


_INT: Final = "INT"
COMFYUI_NODES: Final[Mapping[str, Mapping[str, object]]] = MappingProxyType(
    {
        name: {"name": name, "display_name": name, **node}
        for name, node in {
            "CheckpointLoaderSimple": _node(
                "loaders",
                {"ckpt_name": [["sd_xl_base_1.0.safetensors"]]},
                {"MODEL": "MODEL", "CLIP": "CLIP", "VAE": "VAE"},
            ),
            "CLIPTextEncode": _node(
                "conditioning",
                {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]},
                {"CONDITIONING": "CONDITIONING"},
            ),
            "EmptyLatentImage": _node(
                "latent",
                {
                    "width": [_INT, {"default": 512, "min": 16, "max": 16384, "step": 8}],
                    "height": [_INT, {"default": 512, "min": 16, "max": 16384, "step": 8}],
                    "batch_size": [_INT, {"default": 1, "min": 1, "max": 4096}],
                },
                {"LATENT": "LATENT"},
            ),
            "KSampler": _node(
                "sampling",
                {
                    "model": ["MODEL"],
                    "seed": [_INT, {"default": 0, "min": 0, "max": 2**64 - 1}],
                    "steps": [_INT, {"default": 20, "min": 1, "max": 10000}],
                    "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}],
                    "sampler_name": [["euler", "euler_ancestral", "dpmpp_2m"]],
                    "scheduler": [["normal", "karras", "simple"]],
                    "positive": ["CONDITIONING"],
                    "negative": ["CONDITIONING"],
                    "latent_image": ["LATENT"],
                    "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
                },
                {"LATENT": "LATENT"},
            ),
            "VAEDecode": _node(
                "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, {"IMAGE": "IMAGE"}
            ),
            "SaveImage": _node(
                "image",
                {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                {},
                output_node=True,
            ),
        }.items()
    }
)
"""``GET /object_info``: a few of ComfyUI's node classes, enough for a text-to-image graph."""

COMFYUI_INDEX: Final = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>ComfyUI</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
</head>
<body class="litegraph grid">
<div id="vue-app"><pre id="feed">connecting</pre></div>
<script>
const id = Math.random().toString(36).slice(2);
const scheme = location.protocol === "https:" ? "wss" : "ws";
const base = location.pathname.replace(/\/$/, "");
const socket = new WebSocket(scheme + "://" + location.host + base + "/ws?clientId=" + id);
socket.onmessage = (event) => {
  document.getElementById("feed").textContent += "\n" + event.data;
};
</script>
</body>
</html>
"""
"""``GET /``: ComfyUI's page in miniature; its feed's URL is relative to where it is
served, so the page works under a prefix (``/comfyui/``) as the real front end does."""


def same_origin(handler: Handler) -> Handler:
    """``handler`` behind ComfyUI's origin check: 403, empty, for a foreign ``Origin``."""

    async def checked(request: Request) -> None:
        if _foreign_origin(request.getHeader(b"host"), request.getHeader(b"origin")):
            send_text(request, "", 403)
            return
        await handler(request)

    return checked


def _foreign_origin(host: bytes | None, origin: bytes | None) -> bool:
    """ComfyUI's rule: when ``Host`` names a loopback host, the ``Origin`` must name the
    same host (and port, unless either leaves it out); a browser page elsewhere is refused.
    """
    if host is None or origin is None:
        return False
    ours = urlsplit("//" + host.decode("latin-1").lower())
    theirs = urlsplit(origin.decode("latin-1"))
    if not _is_loopback(ours.hostname):
        return False
    try:
        ours_port, theirs_port = ours.port, theirs.port
    except ValueError:  # a port that is no number
        return True
    host_domain = ours.netloc if theirs_port is not None else ours.hostname
    origin_domain = theirs.netloc.lower() if ours_port is not None else theirs.hostname
    return bool(host_domain) and bool(origin_domain) and host_domain != origin_domain


def _is_loopback(hostname: str | None) -> bool:
    """A loopback address or ``localhost`` (names are not resolved: loopback only)."""
    if hostname is None:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _png(seed: bytes, side: int = 8) -> bytes:
    """A small valid RGB PNG of one colour taken from ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" + hashlib.sha256(seed).digest()[:3] * side  # filter 0, then RGB pixels
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * side))
        + chunk(b"IEND", b"")
    )


class ComfyUI(SimConsumer):
    """ComfyUI: ``/prompt`` queues a job and answers at once; ``/free`` acts after the job;
    ``/ws`` feeds each job's progress (``mgpu.sim.websocket``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs = DeferredLock()
        self._number = 0
        self._queue: list[tuple[int, str]] = []
        self._running: tuple[int, str] | None = None
        self._history: dict[str, dict[str, object]] = {}
        self._free_requested = False
        self._outputs: dict[str, dict[str, object]] = {}  # by prompt id, until the job ends
        self._images = 0
        self._feed = Feed()  # the /ws clients
        self._plans: dict[str, _Plan] = {}  # by prompt id, until the job ends

    def routes(self) -> dict[str, dict[str, Handler]]:
        """Every route behind ComfyUI's origin check (``same_origin``)."""
        routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.index},
            "/system_stats": {"GET": self.system_stats},
            "/prompt": {"POST": self.prompt},
            "/history": {"GET": self.history},
            "/history/*": {"GET": self.history},
            "/queue": {"GET": self.queue},
            "/free": {"POST": self.free},
            "/view": {"GET": self.view},
            "/object_info": {"GET": self.object_info},
            "/object_info/*": {"GET": self.object_info},
            "/ws": {"GET": self.ws},
        }
        return {
            path: {method: same_origin(handler) for method, handler in methods.items()}
            for path, methods in routes.items()
        }

    async def index(self, request: Request) -> None:
        """The web UI's page: its feed at ``ws`` under wherever the page is served."""
        request.setHeader(b"Cache-Control", b"no-cache")
        send_bytes(request, COMFYUI_INDEX.encode(), b"text/html; charset=utf-8")

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
        body = json_body(request)
        graph = body.get("prompt")
        if not isinstance(graph, dict):
            error = {"type": "no_prompt", "message": "No prompt provided", "details": ""}
            raise HttpError(400, {"error": error, "node_errors": {}})
        self._number += 1
        job = (self._number, f"00000000-0000-4000-8000-{self._number:012d}")
        self._queue.append(job)
        self._outputs[job[1]] = self._outputs_of(graph)
        self._plans[job[1]] = _Plan.of(graph, body.get("client_id"))
        self._feed.send("status", {"status": self._queue_info()})  # queued
        Deferred.fromCoroutine(self._run(job)).addErrback(_ignore_cancel)
        send_json(request, {"prompt_id": job[1], "number": job[0], "node_errors": {}})

    async def _run(self, job: tuple[int, str]) -> None:
        """One job at a time, in order; a pending ``/free`` acts once the job ends."""
        await self._jobs.acquire()
        try:
            self._queue.remove(job)
            self._running = job
            plan = self._plans.pop(job[1], _Plan())
            await self._execute(job[1], plan)
            status = {"status_str": "success", "completed": True, "messages": []}
            outputs = self._outputs.pop(job[1], {})
            self._history[job[1]] = {"prompt": list(job), "outputs": outputs, "status": status}
            for node, output in outputs.items():
                self._feed.send("executed", {"node": node, "display_node": node,
                                "output": output, "prompt_id": job[1]}, plan.client)  # fmt: skip
            self._feed.send("execution_success", {"prompt_id": job[1], "timestamp": self._ms()},
                            plan.client)  # fmt: skip
            self._feed.send("executing", {"node": None, "prompt_id": job[1]}, plan.client)
        finally:
            self._running = None
            self._feed.send("status", {"status": self._queue_info()})
            if self._free_requested:
                self._free_requested = False
                self.unload()
            self._jobs.release()

    async def _execute(self, prompt_id: str, plan: _Plan) -> None:
        """The job's GPU work, told on ``/ws`` as ComfyUI does: ``execution_start``, each
        node ``executing``, the sampler's ``progress`` at each step (the work is cut in as
        many steps).  Messages go to the prompt's ``client_id``, to every client without one."""
        self._feed.send("execution_start", {"prompt_id": prompt_id, "timestamp": self._ms()},
                        plan.client)  # fmt: skip
        self._feed.send("execution_cached", {"nodes": [], "prompt_id": prompt_id,
                        "timestamp": self._ms()}, plan.client)  # fmt: skip
        worker = plan.sampler()
        for node in plan.nodes:
            self._feed.send("executing", {"node": node, "display_node": node,
                            "prompt_id": prompt_id}, plan.client)  # fmt: skip
            if node == worker:

                def step(i: int, node: str = node) -> None:
                    self._feed.send("progress", {"value": i + 1, "max": plan.steps,
                                    "prompt_id": prompt_id, "node": node}, plan.client)  # fmt: skip

                await self.work("image", "/prompt", steps=plan.steps, on_step=step)
        if worker is None:  # a prompt without nodes still takes its GPU time
            await self.work("image", "/prompt")

    async def ws(self, request: Request) -> None:
        """``/ws?clientId=``: the progress feed, a WebSocket; ``status`` first, as ComfyUI's."""
        given = request.args.get(b"clientId", [b""])[0].decode("utf-8", "replace")
        sid = given or uuid.uuid4().hex
        self._feed.add(request, sid)
        self._feed.send("status", {"status": self._queue_info(), "sid": sid}, sid)

    def _queue_info(self) -> dict[str, object]:
        remaining = len(self._queue) + (1 if self._running else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    def _ms(self) -> int:
        return int(self.clock.seconds() * 1000)

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

    def _outputs_of(self, graph: Mapping[str, object]) -> dict[str, object]:
        """What the job's ``SaveImage`` nodes will have saved: an image file each."""
        outputs: dict[str, object] = {}
        for node_id, node in graph.items():
            if isinstance(node, dict) and node.get("class_type") == "SaveImage":
                self._images += 1
                image = {"filename": f"ComfyUI_{self._images:05d}_.png", "subfolder": "",
                         "type": "output"}  # fmt: skip
                outputs[node_id] = {"images": [image]}
        return outputs

    async def view(self, request: Request) -> None:
        """``/view?filename=F&type=output``: a small PNG made up for any file name."""
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
        name = args.get("filename", "")
        if not name:
            raise HttpError(404, {"error": "filename is required"})
        if name.startswith("/") or ".." in name or args.get("type", "output") not in (
            "output", "input", "temp",
        ):  # fmt: skip
            raise HttpError(400, {"error": f"bad file: {name!r}"})
        request.setHeader(b"Content-Disposition", f'filename="{name}"'.encode())
        send_bytes(request, _png(name.encode()), b"image/png")

    async def object_info(self, request: Request) -> None:
        """The node classes (``COMFYUI_NODES``), or the one named after ``/object_info/``."""
        path = request.path.decode("utf-8", "replace")
        if path == "/object_info":
            send_json(request, dict(COMFYUI_NODES))
            return
        name = path[len("/object_info/") :]
        send_json(request, {name: COMFYUI_NODES[name]} if name in COMFYUI_NODES else {})


class OpenAISpeech(SimConsumer):
    """An OpenAI-style speech server (speaches, Kokoro-FastAPI and the like): ``/v1/audio/*``.

    ``/v1/audio/speech`` takes JSON and answers audio bytes; the transcription
    routes take ``multipart/form-data`` with ``file`` and ``model``. Errors
    come in OpenAI's envelope, which the ``openai`` SDK reads.
    """

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/health": {"GET": self.health},
            "/v1/models": {"GET": self.models},
            "/v1/audio/speech": {"POST": self.speech},
            "/v1/audio/transcriptions": {"POST": self.transcribe},
            "/v1/audio/translations": {"POST": self.transcribe},
        }

    async def health(self, request: Request) -> None:
        send_json(request, {"status": "ok"})

    async def models(self, request: Request) -> None:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "sim"}
            for name in SPEECH_MODELS
        ]
        send_json(request, {"object": "list", "data": data})

    async def speech(self, request: Request) -> None:
        """``{"model", "input", "voice", "response_format"}`` in, audio bytes out (mp3)."""
        body = json_body(request)
        text, kind = body.get("input"), body.get("response_format", "mp3")
        if not isinstance(text, str) or not text:
            raise _openai_error("input: a non-empty string is required")
        if kind not in AUDIO_TYPES:
            raise _openai_error(f"response_format: one of {', '.join(AUDIO_TYPES)}")
        await self.work("tts", "/v1/audio/speech")
        send_bytes(request, _speech_audio(kind, len(text)), AUDIO_TYPES[kind].encode())

    async def transcribe(self, request: Request) -> None:
        """A multipart upload of ``file`` and ``model``: ``{"text"}`` (or text alone)."""
        fields, files = _form(request)
        if "file" not in files:
            raise _openai_error("file is required")
        if not fields.get("model"):
            raise _openai_error("model is required")
        await self.work("stt", request.path.decode("utf-8", "replace"))
        text = f"simulated transcript of {files['file']} bytes"
        if fields.get("response_format") == "text":
            send_text(request, text)
        else:
            send_json(request, {"text": text})


class VLLM(OpenAIText):
    """vLLM's OpenAI server with ``--enable-sleep-mode`` (SPEC 9.6's warm tier).

    ``POST /sleep?level=1`` frees its GPU memory and keeps the weights in host
    RAM, so ``POST /wake_up`` (or a request) loads them back in ``wake_s``;
    level 2 drops them too, and the next load is a cold one (``load_s``).
    ``GET /is_sleeping`` answers ``{"is_sleeping": bool}``. It serves one model,
    ``VLLM_MODEL``, and answers 404 for any other, as vLLM does.
    """

    DEFAULT_MODEL = VLLM_MODEL
    OWNED_BY = "vllm"
    FINGERPRINT = "fp_vllm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_host_ram = False  # weights kept in host RAM by a level-1 sleep
        self.sleeping = False

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/health": {"GET": self.health},
            "/v1/models": {"GET": self.openai_models},
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/completions": {"POST": self.completions},
            "/sleep": {"POST": self.sleep_route},
            "/wake_up": {"POST": self.wake_up},
            "/is_sleeping": {"GET": self.is_sleeping},
        }

    def load_time(self) -> float:
        """From host RAM: ``wake_s`` (a tenth of ``load_s`` by default); else ``load_s``."""
        if not self.in_host_ram:
            return self.settings.load_s
        wake = self.settings.wake_s
        return round(self.settings.load_s / 10, 3) if wake is None else wake

    async def load(self, *, again: bool = False) -> bool:
        loaded = await super().load(again=again)
        if self.loaded:
            self.sleeping = False
        return loaded

    def _pick_model(self, asked: object) -> None:
        if asked not in (None, "", self._model):
            message = f"The model `{asked}` does not exist."
            raise HttpError(404, {"object": "error", "message": message,
                                  "type": "NotFoundError", "param": None, "code": 404})  # fmt: skip

    async def health(self, request: Request) -> None:
        send_text(request, "")

    async def sleep_route(self, request: Request) -> None:
        """``POST /sleep?level=1|2``: free the GPU memory; level 1 keeps the weights."""
        level = request.args.get(b"level", [b"1"])[0]
        if level not in (b"1", b"2"):
            raise HttpError(400, {"error": "level: 1 or 2"})
        self.in_host_ram = level == b"1" and (self.loaded or self.in_host_ram)
        self.sleeping = True
        self.unload()
        send_text(request, "")

    async def wake_up(self, request: Request) -> None:
        """``POST /wake_up``: load back (from host RAM after a level-1 sleep)."""
        await self.load()
        send_text(request, "")

    async def is_sleeping(self, request: Request) -> None:
        send_json(request, {"is_sleeping": self.sleeping})

    def state(self) -> dict[str, object]:
        return super().state() | {"sleeping": self.sleeping, "in_host_ram": self.in_host_ram}


@frozen
class _Plan:
    """What a ComfyUI job tells its ``/ws`` client: its nodes, in order, and the sampler's steps."""

    nodes: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    steps: int = COMFYUI_STEPS
    client: str | None = None

    @classmethod
    def of(cls, graph: Mapping[str, object], client: object) -> _Plan:
        """From ``/prompt``'s graph and ``client_id``; the steps from a sampler's ``steps``."""
        nodes = [(str(k), v) for k, v in graph.items() if isinstance(v, dict)]
        classes = tuple(str(node.get("class_type", "")) for _, node in nodes)
        steps = COMFYUI_STEPS
        for kind, (_, node) in zip(classes, nodes, strict=True):
            inputs = node.get("inputs")
            asked = inputs.get("steps") if isinstance(inputs, dict) else None
            if "Sampler" in kind and isinstance(asked, int) and asked > 0:
                steps = min(asked, COMFYUI_MAX_STEPS)
        sid = client if isinstance(client, str) and client else None
        return cls(tuple(k for k, _ in nodes), classes, steps, sid)

    def sampler(self) -> str | None:
        """The node that does the GPU work: the first sampler, else the last node."""
        for node, kind in zip(self.nodes, self.classes, strict=True):
            if "Sampler" in kind:
                return node
        return self.nodes[-1] if self.nodes else None


IMPLEMENTATIONS: Final[Mapping[str, type[SimConsumer]]] = MappingProxyType(
    {
        "mvoice": MVoice,
        "whisper": Whisper,
        "ollama": Ollama,
        "comfyui": ComfyUI,
        "openai-speech": OpenAISpeech,
        "vllm": VLLM,
    }
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


def _generate_part(text: str) -> Mapping[str, object]:
    return {"response": text}


def _chat_part(text: str) -> Mapping[str, object]:
    return {"message": {"role": "assistant", "content": text}}


def _json_line(value: object) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _word_count(value: object) -> int:
    """A rough token count of a prompt, messages or inputs: their words."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_word_count(item) for item in value)
    if isinstance(value, dict):
        return _word_count(value.get("content", ""))
    return 0


def _texts(value: object) -> list[str] | None:
    """An embedding request's ``input``: a string or a list of strings; None: neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _embedding(text: str) -> list[float]:
    """A deterministic unit vector of ``EMBEDDING_DIMS`` numbers for ``text``."""
    raw = [b / 127.5 - 1 for b in hashlib.sha256(text.encode()).digest()[:EMBEDDING_DIMS]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _openai_error(message: str, code: int = 400) -> HttpError:
    """An error in OpenAI's envelope, as OpenAI-style servers (Ollama's ``/v1``) answer."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return HttpError(code, {"error": error})


def _speech_audio(kind: str, chars: int) -> bytes:
    """Silent audio for ``chars`` characters of text: MP3 frames, a WAV file or raw PCM."""
    pcm = PCM_BYTES_PER_CHAR * chars
    if kind == "wav":
        return _wav_header(44 + pcm) + bytes(pcm)
    if kind == "pcm":
        return bytes(pcm)
    # MPEG-1 layer III, 128 kbit/s, 44.1 kHz: 417-byte frames of 26 ms each.
    frame = b"\xff\xfb\x90\x64" + bytes(413)
    return frame * max(1, round(chars * 0.06 / 0.026))


def _form(request: Request) -> tuple[dict[str, str], dict[str, int]]:
    """A ``multipart/form-data`` body: its fields, and each file's size in bytes."""
    fields: dict[str, str] = {}
    files: dict[str, int] = {}

    def on_field(part: Field) -> None:
        fields[(part.field_name or b"").decode()] = (part.value or b"").decode("utf-8", "replace")

    def on_file(part: File) -> None:
        files[(part.field_name or b"").decode()] = part.size
        part.close()

    headers = {"Content-Type": request.getHeader(b"content-type") or b""}
    try:
        parse_form(headers, request.content or io.BytesIO(), on_field, on_file)
    except ValueError as e:
        raise _openai_error(f"a multipart/form-data body is required: {e}") from None
    return fields, files


def _wav_header(size: int) -> bytes:
    """A RIFF header for 16 kHz 16-bit mono PCM: the file is ``size`` bytes in all."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", size - 8, b"WAVE", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16, b"data", size - 44,
    )  # fmt: skip


def _ignore_cancel(reason: Failure) -> None:
    if not reason.check(CancelledError):
        _log.failure("simulated consumer failed", reason)
