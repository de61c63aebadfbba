"""OpenAI-compatible routes (SPEC 9.2) of the real daemon, with the real ``openai`` SDK.

Two stand-in consumers (``tests/integration/openai_consumer.py``) sit behind
the daemon: ``alpha`` declares its models in the file, ``beta`` has them
discovered from its ``GET /v1/models``. The SDK is blocking, so each call runs
in a thread; its ``api_key`` is the broker's token.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import openai
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    Consumer,
    HttpClient,
    Stack,
    shared_stacks,
    start_listener,
    token_auth,
    wait_for,
)

TOKEN = "openai-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALPHA_MODELS = ["chat-a", "whisper-a"]
BETA_MODELS = ["embed-b", "chat-b"]
#: Seconds between two streamed words of the stand-ins.
GAP_S = 0.15
#: ``limits.max_body_mib``: above test_transcription's 3 MiB upload.
MAX_BODY_MIB = 4

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


async def _openai_consumer(stack: Stack, name: str, models: list[str]) -> Consumer:
    log_path = stack.workdir / f"{name}.requests.jsonl"
    log_path.touch()
    argv = [sys.executable, "-m", "tests.integration.openai_consumer", "--name", name,
            "--models", ",".join(models), "--gap", str(GAP_S), "--log", str(log_path)]  # fmt: skip
    consumer = await start_listener(name, argv, stack.workdir, log_path)
    stack.consumers[name] = consumer
    return consumer


def _block(consumer: Consumer, openai_block: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": consumer.url,
        "health": {"path": "/health"},
        "paths": {"llm": {"path": "/v1/chat/completions"}},
        "vram_resident_mib": 1000,
        "timeout_s": 30,
        "openai": openai_block,
    }


async def _openai_stack() -> Stack:
    stack = Stack.new("mgpu-openai-")
    async with stack.starting():
        alpha = await _openai_consumer(stack, "alpha", [])
        beta = await _openai_consumer(stack, "beta", BETA_MODELS)
        config = {
            "auth": token_auth(stack.workdir, TOKEN),
            "gpu": {"source": "none", "total_mib": 16384},
            "health": {"interval_s": 0.5, "timeout_s": 1},
            "scheduler": {"max_queue": 1},
            "limits": {"max_body_mib": MAX_BODY_MIB},
            "consumers": {
                "alpha": _block(alpha, {"path": "/v1", "models": ALPHA_MODELS}),
                "beta": _block(beta, {"discover": True}),
            },
        }
        await stack.start(config)
    return stack


class OpenAISdkTests(TestCase):
    """The SDK against one daemon with alpha and beta behind it."""

    timeout = 90

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("openai", _openai_stack)
        self.http: HttpClient = self.stack.client()
        self.addCleanup(self.http.close)
        assert self.stack.daemon is not None
        self.base_url = f"{self.stack.daemon.url}/v1"
        self.alpha = self.stack.consumers["alpha"]
        self.beta = self.stack.consumers["beta"]
        await self.idle()

    def sdk(self, **options: Any) -> openai.OpenAI:
        """A client for the daemon: base_url its /v1, api_key its token, no retries."""
        settings: dict[str, Any] = {"api_key": TOKEN, "max_retries": 0, "timeout": 30}
        settings.update(options)
        return openai.OpenAI(base_url=self.base_url, **settings)

    def call(self, work: Callable[[], T]) -> Deferred[T]:
        """Run a blocking SDK call in a thread."""
        return deferToThread(work)

    async def raises(self, work: Callable[[], object], kind: type[E]) -> E:
        """The ``kind`` error a blocking SDK call raises (in its thread)."""
        try:
            await self.call(work)
        except kind as e:
            return e
        self.fail(f"no {kind.__name__} raised")

    async def status(self) -> dict[str, Any]:
        response, doc = await self.http.json("GET", "/v1/status", headers=AUTH)
        assert response.code == 200, (response.code, doc)
        return dict(doc)

    async def idle(self) -> None:
        """Wait until no request holds or waits for the GPU."""

        async def free() -> bool:
            scheduler = (await self.status())["scheduler"]
            return scheduler["running"] == 0 and scheduler["queued"] == 0

        await wait_for(free, 20, "the GPU lock to be free", 0.05)

    async def discovered(self) -> None:
        """Wait until beta's models were read from it."""

        async def listed() -> bool:
            _, doc = await self.http.json("GET", "/v1/models", headers=AUTH)
            return {m["id"] for m in doc.get("data", [])} >= set(BETA_MODELS)

        await wait_for(listed, 10, "beta's models to be discovered", 0.1)

    def requests_to(self, consumer: Consumer, path: str) -> list[dict[str, Any]]:
        return [e for e in consumer.log_lines() if e["method"] == "POST" and e["path"] == path]

    async def test_chat(self) -> None:
        """A chat completion reaches the consumer that declares the model, and comes back."""
        before = len(self.requests_to(self.alpha, "/v1/chat/completions"))
        answer = await self.call(
            lambda: self.sdk().chat.completions.create(
                model="chat-a", messages=[{"role": "user", "content": "hello"}]
            )
        )
        self.assertEqual(answer.choices[0].message.content, "alpha heard chat-a: hello")
        self.assertEqual(len(self.requests_to(self.alpha, "/v1/chat/completions")), before + 1)
        self.assertEqual((await self.status())["consumers"]["alpha"]["loaded"], True)

    async def test_chat_with_a_discovered_model(self) -> None:
        """A model only beta's /v1/models lists goes to beta."""
        await self.discovered()
        answer = await self.call(
            lambda: self.sdk().chat.completions.create(
                model="chat-b", messages=[{"role": "user", "content": "hi"}]
            )
        )
        self.assertEqual(answer.choices[0].message.content, "beta heard chat-b: hi")

    async def test_streamed_chat(self) -> None:
        """A streamed chat arrives chunk by chunk, in order, as the consumer sends it."""

        def stream() -> list[tuple[float, str]]:
            chunks = self.sdk().chat.completions.create(
                model="chat-a",
                messages=[{"role": "user", "content": "one two three four"}],
                stream=True,
            )
            return [
                (time.monotonic(), chunk.choices[0].delta.content or "")
                for chunk in chunks
                if chunk.choices
            ]

        arrived = await self.call(stream)
        words = [text for _, text in arrived if text]
        self.assertEqual(words, ["alpha ", "heard ", "chat-a: ", "one ", "two ", "three ", "four"])
        # Spread over the consumer's pauses (6 gaps between 7 words), not all at the end.
        self.assertGreater(arrived[-1][0] - arrived[0][0], 4 * GAP_S)

    async def test_embeddings(self) -> None:
        """Embeddings of a discovered model, decoded by the SDK from base64."""
        await self.discovered()
        answer = await self.call(
            lambda: self.sdk().embeddings.create(model="embed-b", input=["ab", "abcd"])
        )
        self.assertEqual([d.embedding for d in answer.data], [[2.0, 1.0, 2.0], [4.0, 1.0, 2.0]])
        self.assertEqual(self.requests_to(self.beta, "/v1/embeddings")[-1]["model"], "embed-b")

    async def test_transcription(self) -> None:
        """A 3 MiB upload is routed by its model field and reaches the consumer intact."""
        audio = bytes(range(256)) * (3 * 4096)
        answer = await self.call(
            lambda: self.sdk().audio.transcriptions.create(
                model="whisper-a", file=("clip.wav", audio, "audio/wav")
            )
        )
        digest = hashlib.sha256(audio).hexdigest()
        self.assertEqual(answer.text, f"alpha heard whisper-a: {len(audio)} bytes {digest}")

    async def test_models_list(self) -> None:
        """models.list: declared and discovered models, each owned by its consumer."""
        await self.discovered()
        page = await self.call(lambda: self.sdk().models.list())
        owners = {m.id: m.owned_by for m in page.data}
        expected = dict.fromkeys(ALPHA_MODELS, "alpha") | dict.fromkeys(BETA_MODELS, "beta")
        self.assertEqual(owners, expected)
        one = await self.call(lambda: self.sdk().models.retrieve("embed-b"))
        self.assertEqual(one.owned_by, "beta")

    async def test_unknown_model(self) -> None:
        """An unknown model is the SDK's NotFoundError, code model_not_found, param model."""

        def ask() -> object:
            return self.sdk().chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "x"}]
            )

        error = await self.raises(ask, openai.NotFoundError)
        self.assertEqual((error.status_code, error.code, error.param),
                         (404, "model_not_found", "model"))  # fmt: skip
        self.assertIn("gpt-9", error.message)

    async def test_body_over_the_limit(self) -> None:
        """A body over limits.max_body_mib is the SDK's APIStatusError 413 with code
        payload_too_large (OpenAI's envelope); nothing reaches the consumer."""
        before = len(self.requests_to(self.alpha, "/v1/chat/completions"))
        text = "x" * (MAX_BODY_MIB * 2**20)

        def ask() -> object:
            return self.sdk().chat.completions.create(
                model="chat-a", messages=[{"role": "user", "content": text}]
            )

        error = await self.raises(ask, openai.APIStatusError)
        self.assertEqual((error.status_code, error.code, error.type),
                         (413, "payload_too_large", "invalid_request_error"))  # fmt: skip
        self.assertIn(f"{MAX_BODY_MIB} MiB", error.message)
        self.assertEqual(len(self.requests_to(self.alpha, "/v1/chat/completions")), before)

    async def test_wrong_token(self) -> None:
        """A wrong api_key is the SDK's AuthenticationError, code unauthorized."""
        error = await self.raises(
            lambda: self.sdk(api_key="wrong").models.list(), openai.AuthenticationError
        )
        self.assertEqual(error.code, "unauthorized")

    async def test_queue_full_is_retried(self) -> None:
        """With the queue full, the SDK gets 503 queue_full with Retry-After in OpenAI's
        envelope; with retries it waits as told and its request then succeeds."""

        def chat(content: str, sleep_s: float = 0, retries: int = 0) -> str | None:
            answer = self.sdk(max_retries=retries).chat.completions.create(
                model="chat-a",
                messages=[{"role": "user", "content": content}],
                extra_body={"sleep_s": sleep_s},
            )
            return answer.choices[0].message.content

        rejected = (await self.status())["scheduler"]["rejected"]
        running = self.call(lambda: chat("first", sleep_s=1.5))
        await wait_for(self._running, 10, "the first request to run", 0.02)
        queued = self.call(lambda: chat("second"))
        await wait_for(self._queued, 10, "the second request to wait", 0.02)

        refused = await self.raises(lambda: chat("refused"), openai.InternalServerError)
        self.assertEqual((refused.status_code, refused.code), (503, "queue_full"))
        self.assertGreaterEqual(int(refused.response.headers["retry-after"]), 1)

        retried = self.call(lambda: chat("third", retries=2))
        self.assertEqual(await retried, "alpha heard chat-a: third")
        self.assertEqual(await running, "alpha heard chat-a: first")
        self.assertEqual(await queued, "alpha heard chat-a: second")
        # The refused request, and the retried one's first try (and maybe its second,
        # Retry-After being the expected wait): none reached alpha, the last try did.
        self.assertIn((await self.status())["scheduler"]["rejected"] - rejected, (2, 3))
        said = [e["said"] for e in self.requests_to(self.alpha, "/v1/chat/completions")]
        self.assertEqual([s for s in said if s in ("refused", "third")], ["third"])

    async def _running(self) -> bool:
        return bool((await self.status())["scheduler"]["running"] == 1)

    async def _queued(self) -> bool:
        return bool((await self.status())["scheduler"]["queued"] == 1)
