"""Every route of the real daemon, against real consumer processes and the stand-in nvidia-smi."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import treq
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    FAKE_GPU_BASE_USED_MIB,
    FAKE_GPU_NAME,
    FAKE_GPU_TOTAL_MIB,
    Stack,
    cancel_timer,
    connect,
    make_config,
    raw_request,
    reactor,
    read_gpu_state,
    request_bytes,
    set_faults,
    shared_stacks,
    sim_log,
    smi_gpu,
    wait_for,
)
from tests.integration.patterns import ERROR_KEYS, SlowReader, pattern

ALL_KINDS = {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"}
STATUS_GPU_KEYS = {
    "source", "ok", "error", "index", "name", "total_mib", "used_mib", "free_mib", "read_at",
}  # fmt: skip
STATUS_CONSUMER_KEYS = {
    "healthy", "loaded", "last_probe", "last_error", "vram_resident_mib",
    "vram_managed", "last_used", "in_flight", "queued",
}  # fmt: skip
STATUS_SCHEDULER_KEYS = {
    "queued", "running", "holder", "completed", "failed", "rejected", "evictions", "loads",
}  # fmt: skip


async def _route_stack() -> Stack:
    stack = Stack.new("mgpu-routes-")
    async with stack.starting():
        await stack.add_consumers(
            "mvoice", "ollama", "comfyui", args={"comfyui": ["--load-s", "0.3"]}
        )
        config = make_config(stack.consumers, ALL_KINDS, audio_proxy="mvoice", gpu=smi_gpu())
        await stack.start(config)
    return stack


class RouteTests(TestCase):
    """One daemon with mvoice, ollama and comfyui behind it, shared by these tests."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("routes", _route_stack)
        self.http = self.stack.client()
        self.addCleanup(self.http.close)
        self.mvoice = self.stack.consumers["mvoice"]
        self.ollama = self.stack.consumers["ollama"]
        self.comfyui = self.stack.consumers["comfyui"]

    async def idle(self) -> None:
        """Wait until no request holds the GPU lock (a previous test's hold_until ended)."""

        async def free() -> bool:
            scheduler = (await self.http.status())["scheduler"]
            return scheduler["holder"] is None and scheduler["queued"] == 0

        await wait_for(free, 15, "the GPU lock to be free", 0.05)

    async def test_tts(self) -> None:
        """POST /v1/tts reaches mvoice's /api/synthesize and its answer comes back."""
        response, body = await self.http.json("POST", "/v1/tts", json_body={"text": "hello"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["bytes"], 44 + 1920 * len("hello"))
        self.assertTrue(body["audio"].startswith("/audio/"), body)
        # The file it names is served through /audio as a WAV of that size.
        audio = await raw_request(self.stack.port, request_bytes("GET", body["audio"]))
        self.assertEqual(audio.status, 200)
        self.assertEqual(len(audio.body), body["bytes"])
        self.assertEqual(audio.body[:4], b"RIFF")

    async def test_stt(self) -> None:
        """POST /v1/stt forwards the request body unchanged to mvoice's /api/transcribe."""
        response, body = await self.http.json(
            "POST", "/v1/stt", body=b"\x00\x01" * 617, headers={"Content-Type": "audio/wav"}
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body, {"text": "simulated transcript of 1234 bytes"})

    async def test_llm_tokens_stream(self) -> None:
        """POST /v1/llm streams ollama's NDJSON tokens to the client as they are produced."""
        arrivals: list[tuple[float, bytes]] = []
        payload = json.dumps({"model": "llama3.2", "prompt": "hi"}).encode()
        headers: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
        d = self.http.client.request(
            "POST", self.http.base + "/v1/llm", data=payload, headers=headers
        )
        timer = reactor.callLater(30, d.cancel)
        self.addCleanup(cancel_timer, timer)
        response = await d
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        await treq.collect(response, lambda data: arrivals.append((time.monotonic(), data)))
        lines = [json.loads(line) for line in b"".join(d for _, d in arrivals).splitlines()]
        self.assertEqual([line["done"] for line in lines], [False] * 10 + [True])
        self.assertEqual("".join(line["response"] for line in lines), "".join(
            f"tok{i} " for i in range(10)
        ))  # fmt: skip
        # Tokens come 50 ms apart: streamed, they arrive in several pieces spread
        # over that time; buffered, they would arrive at once with the end.
        before_end = [t for t, data in arrivals if b'"done": true' not in data]
        self.assertGreaterEqual(len(before_end), 2, arrivals)
        self.assertGreater(arrivals[-1][0] - before_end[0], 0.2, arrivals)
        self.assertGreater(before_end[-1] - before_end[0], 0.1, arrivals)

    async def test_image_answers_at_once_and_holds_the_gpu(self) -> None:
        """POST /v1/image answers with comfyui's /prompt reply at once; the lock stays held until
        /history shows the job."""
        await self.idle()
        response, body = await self.http.json("POST", "/v1/image", json_body={"prompt": {}})
        answered_at = time.time()
        self.assertEqual(response.code, 200, body)
        prompt_id = body["prompt_id"]
        status = await self.http.status()
        self.assertEqual(status["scheduler"]["holder"], "comfyui", status["scheduler"])

        async def released() -> float | None:
            holder = (await self.http.status())["scheduler"]["holder"]
            return time.time() if holder is None else None

        released_at: float = await wait_for(released, 15, "comfyui's job to release the lock")
        jobs = [e for e in await sim_log(self.comfyui) if e["path"] == "/prompt"]
        self.assertTrue(jobs and jobs[-1]["end"] is not None, jobs)
        # The answer came while the job still ran; the lock was kept until it ended.
        self.assertLess(answered_at, jobs[-1]["end"])
        self.assertGreaterEqual(released_at, jobs[-1]["end"])
        history = await raw_request(
            self.comfyui.port, request_bytes("GET", f"/history/{prompt_id}")
        )
        self.assertIn(prompt_id, history.json())

    async def test_audio_get(self) -> None:
        """GET /audio/<file> streams mvoice's file with its Content-Length and headers."""
        response = await raw_request(self.stack.port, request_bytes("GET", "/audio/sized-1000.bin"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), "1000")
        self.assertEqual(response.header("content-type"), "application/octet-stream")
        self.assertEqual(response.header("accept-ranges"), "bytes")
        self.assertEqual(response.body, pattern(0, 1000))

    async def test_audio_head_keeps_content_length(self) -> None:
        """HEAD /audio/<file> answers with the consumer's Content-Length and no body."""
        response = await raw_request(
            self.stack.port, request_bytes("HEAD", "/audio/sized-123456.bin"), head_only=True
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), "123456")
        self.assertTrue(response.raw.endswith(b"\r\n\r\n"), response.raw)

    async def test_audio_range_is_forwarded(self) -> None:
        """A Range header reaches the consumer: 206 with Content-Range and just those bytes."""
        response = await raw_request(
            self.stack.port,
            request_bytes("GET", "/audio/sized-1000.bin", headers={"Range": "bytes=100-199"}),
        )
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header("content-range"), "bytes 100-199/1000")
        self.assertEqual(response.header("content-length"), "100")
        self.assertEqual(response.body, pattern(100, 100))

    async def test_audio_missing_file_passes_through(self) -> None:
        """The consumer's own 404 for a missing /audio file reaches the client unwrapped."""
        response = await raw_request(self.stack.port, request_bytes("GET", "/audio/nothing.wav"))
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json(), {"error": "no such audio: nothing.wav"})

    async def test_status_document(self) -> None:
        """GET /v1/status has SPEC section 6's shape, the fake nvidia-smi's figures and healthy
        consumers."""

        async def settled() -> dict[str, Any] | None:
            doc = await self.http.status()
            healthy = all(c["healthy"] for c in doc["consumers"].values())
            in_file = read_gpu_state(self.stack.gpu_state)["gpus"][0]["used_mib"]
            return doc if healthy and doc["gpu"]["used_mib"] == in_file else None

        doc: dict[str, Any] = await wait_for(
            settled, 10, "healthy consumers and current GPU figures", 0.1
        )
        self.assertEqual(set(doc), {"gpu", "gpus", "consumers", "scheduler"})
        gpu = doc["gpu"]
        [card] = doc["gpus"]  # one card: ``gpu`` is it, with its lease and consumers
        self.assertEqual(card, {**gpu, **{k: card[k] for k in ("holder", "queued", "running")},
                                "consumers": ["mvoice", "ollama", "comfyui"]})  # fmt: skip
        self.assertEqual((card["queued"], card["running"]), (0, 0))
        self.assertLessEqual(STATUS_GPU_KEYS, set(gpu))
        self.assertEqual(gpu["source"], "nvidia-smi")
        self.assertIs(gpu["ok"], True)
        self.assertIsNone(gpu["error"])
        self.assertEqual(gpu["index"], 0)
        self.assertEqual(gpu["name"], FAKE_GPU_NAME)
        self.assertEqual(gpu["total_mib"], FAKE_GPU_TOTAL_MIB)
        self.assertGreaterEqual(gpu["used_mib"], FAKE_GPU_BASE_USED_MIB)
        self.assertEqual(gpu["used_mib"] + gpu["free_mib"], FAKE_GPU_TOTAL_MIB)
        self.assertRegex(gpu["read_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        self.assertEqual(set(doc["consumers"]), {"mvoice", "ollama", "comfyui"})
        for name, consumer in doc["consumers"].items():
            self.assertLessEqual(STATUS_CONSUMER_KEYS, set(consumer), name)
            self.assertIs(consumer["healthy"], True, name)
            self.assertIsNotNone(consumer["last_probe"], name)
            self.assertIsNone(consumer["last_error"], name)
            self.assertIsInstance(consumer["in_flight"], int)
            self.assertIsInstance(consumer["queued"], int)
            self.assertEqual(consumer["gpus"], [0], name)
        self.assertEqual(doc["consumers"]["mvoice"]["vram_resident_mib"], 2800)
        self.assertIs(doc["consumers"]["ollama"]["vram_managed"], True)
        self.assertIs(doc["consumers"]["comfyui"]["vram_managed"], False)
        scheduler = doc["scheduler"]
        self.assertLessEqual(STATUS_SCHEDULER_KEYS, set(scheduler))
        for key in STATUS_SCHEDULER_KEYS - {"holder"}:
            self.assertIsInstance(scheduler[key], int, key)

    async def test_status_follows_the_gpu(self) -> None:
        """/v1/status's used_mib follows what nvidia-smi reports when a consumer loads."""
        response, _ = await self.http.json("POST", "/v1/tts", json_body={"text": "x"})
        self.assertEqual(response.code, 200)
        owners = read_gpu_state(self.stack.gpu_state)["owners"]["0"]
        self.assertEqual(owners.get("mvoice"), 2800)

        async def current() -> bool:
            in_file = read_gpu_state(self.stack.gpu_state)["gpus"][0]["used_mib"]
            return bool((await self.http.status())["gpu"]["used_mib"] == in_file)

        await wait_for(current, 5, "the GPU figures to follow the state file", 0.1)

    async def test_healthz(self) -> None:
        """GET /healthz answers 200 {"status": "ok"}."""
        response = await raw_request(self.stack.port, request_bytes("GET", "/healthz"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"status": "ok"})

    async def assertBrokerError(
        self, method: str, target: str, status: int, code: str, body: bytes | None = None
    ) -> dict[str, Any]:
        response = await raw_request(self.stack.port, request_bytes(method, target, body))
        self.assertEqual(response.status, status, response.raw[:500])
        self.assertEqual(response.header("content-type"), "application/json")
        error = response.json()
        self.assertEqual(set(error), ERROR_KEYS, error)
        self.assertEqual(error["error"], code)
        self.assertIsInstance(error["message"], str)
        self.assertTrue(error["message"])
        self.assertIs(error["retryable"], status >= 500)
        return error

    async def test_unknown_path_not_found(self) -> None:
        """An unknown path gets 404 not_found in the error schema."""
        await self.assertBrokerError("GET", "/nope", 404, "not_found")
        await self.assertBrokerError("POST", "/v1/video", 404, "not_found", b"{}")
        await self.assertBrokerError("GET", "/v1", 404, "not_found")

    async def test_get_facade_method_not_allowed(self) -> None:
        """GET /v1/tts gets 405 method_not_allowed naming POST in Allow."""
        await self.assertBrokerError("GET", "/v1/tts", 405, "method_not_allowed")
        response = await raw_request(self.stack.port, request_bytes("GET", "/v1/tts"))
        self.assertEqual(response.header("allow"), "POST")

    async def test_post_audio_method_not_allowed(self) -> None:
        """POST /audio/x gets 405 method_not_allowed and never reaches the consumer."""
        await self.assertBrokerError("POST", "/audio/x", 405, "method_not_allowed", b"data")

    async def test_consumer_error_passes_through(self) -> None:
        """A consumer's 418 reaches the client unchanged: status, headers and body."""
        await set_faults(self.mvoice, {"status": {"/api/transcribe": 418}})
        self.addCleanup(lambda: ensureDeferred(set_faults(self.mvoice, {})))
        before = (await self.http.status())["scheduler"]
        direct = await raw_request(
            self.mvoice.port, request_bytes("POST", "/api/transcribe", b"abc")
        )
        self.assertEqual(direct.status, 418)
        relayed = await raw_request(self.stack.port, request_bytes("POST", "/v1/stt", b"abc"))
        self.assertEqual((relayed.status, relayed.reason), (direct.status, direct.reason))
        self.assertEqual(relayed.body, direct.body)
        self.assertEqual(json.loads(relayed.body)["error"], "injected fault")
        # Every header but the hop-by-hop ones and the clock's.
        own = {"date", "connection", "keep-alive", "transfer-encoding"}
        self.assertEqual(
            sorted((k.lower(), v) for k, v in relayed.headers if k.lower() not in own),
            sorted((k.lower(), v) for k, v in direct.headers if k.lower() not in own),
        )
        after = (await self.http.status())["scheduler"]
        self.assertEqual(after["completed"], before["completed"] + 1)
        self.assertEqual(after["failed"], before["failed"])

    async def _comfyui_holds(self) -> bool:
        return bool((await self.http.status())["scheduler"]["holder"] == "comfyui")

    async def test_gpu_requests_never_overlap(self) -> None:
        """Concurrent requests for three consumers run one at a time (the consumers' own logs)."""
        await self.idle()
        since = time.time()
        calls: list[Deferred[tuple[Any, Any]]] = []
        # An image job first: comfyui answers at once but its GPU work goes on after.
        calls.append(ensureDeferred(self.http.json("POST", "/v1/image", json_body={"prompt": {}})))
        await wait_for(self._comfyui_holds, 10, "the image request to hold the GPU")
        for i in range(3):
            calls.append(
                ensureDeferred(self.http.json("POST", "/v1/tts", json_body={"text": f"t{i}"}))
            )
            calls.append(
                ensureDeferred(
                    self.http.json("POST", "/v1/llm", json_body={"prompt": "hi", "stream": False})
                )
            )
        calls.append(ensureDeferred(self.http.json("POST", "/v1/image", json_body={"prompt": {}})))
        results = await DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
        for _, (response, body) in results:
            self.assertEqual(response.code, 200, body)
        await self.idle()  # comfyui's job ran after its answer

        entries = []
        for consumer in (self.mvoice, self.ollama, self.comfyui):
            entries += [e for e in await sim_log(consumer) if e["start"] >= since]
        kinds = sorted(e["kind"] for e in entries)
        self.assertEqual(kinds, ["image"] * 2 + ["llm"] * 3 + ["tts"] * 3, entries)
        entries.sort(key=lambda e: e["start"])
        for earlier, later in itertools.pairwise(entries):
            self.assertIsNotNone(earlier["end"], earlier)
            self.assertGreaterEqual(later["start"], earlier["end"], f"overlap:\n{earlier}\n{later}")

    async def test_large_audio_to_slow_reader_keeps_memory_flat(self) -> None:
        """A 300 MiB /audio body read slowly arrives intact; the daemon's RSS grows < 64 MiB."""
        daemon = self.stack.daemon
        assert daemon is not None
        size = 300 * 2**20
        # Warm the path up so the baseline includes the code and buffers of one transfer.
        warm = await raw_request(self.stack.port, request_bytes("GET", "/audio/sized-4000000.bin"))
        self.assertEqual(len(warm.body), 4000000)
        samples = [daemon.rss_kib()]
        sampler = LoopingCall(lambda: samples.append(daemon.rss_kib()))
        sampler.clock = reactor
        sampler.start(0.05)
        self.addCleanup(lambda: sampler.stop() if sampler.running else None)

        reader = SlowReader(rate_bytes_s=60 * 2**20)
        await connect(self.stack.port, reader)
        reader.send(request_bytes("GET", f"/audio/sized-{size}.bin"))
        timer = reactor.callLater(45, reader.abort)
        self.addCleanup(cancel_timer, timer)
        await reader.closed
        sampler.stop()
        self.assertTrue(timer.active(), "the body did not arrive within 45 s")
        self.assertEqual(reader.status, 200)
        self.assertEqual(reader.content_length, size)
        self.assertEqual(reader.received, size)
        self.assertIsNone(reader.mismatch_at, "the body's bytes differ from the consumer's")
        growth_mib = (max(samples) - samples[0]) / 1024
        self.assertLess(growth_mib, 64, f"RSS grew {growth_mib:.1f} MiB; samples {samples[::20]}")
        # It was slow: the reader, not the daemon, set the pace.
        self.assertGreater(reader.elapsed, size / (60 * 2**20) * 0.9)
