"""The real ``ollama`` Python client through the daemon's native prefix (SPEC 9.1).

The simulated Ollama is published under ``/ollama`` with ``gpu`` omitted, so
every ``POST`` (chat, generate, embed) takes the GPU lease and ``GET``s
(``list``, ``ps``) pass without it. A slow simulated mvoice (``--work-s``)
competes for the lease: while it holds it, an Ollama chat waits, which the two
simulators' work logs show, and ``list`` and ``ps`` are answered meanwhile.
The client is blocking, so each call runs in a thread (``deferToThread``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import ollama
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mgpu.sim.consumers import EMBEDDING_DIMS, OLLAMA_MODEL, OLLAMA_MODELS
from tests.integration.harness import (
    RawResponse,
    Stack,
    make_config,
    raw_request,
    request_bytes,
    shared_stacks,
    sim_log,
    token_auth,
    wait_for,
)

TOKEN = "0llama-client-t0ken-for-the-integration-tests"
#: How long each mvoice request holds the GPU (its ``--work-s``).
MVOICE_WORK_S = 1.5
#: Tokens of a simulated generation (``ConsumerSettings.tokens``).
TOKENS = [f"tok{i} " for i in range(10)]

T = TypeVar("T")


def chat(client: ollama.Client, content: str) -> ollama.ChatResponse:
    """One unstreamed chat with the simulated Ollama's model (blocking)."""
    return client.chat(model=OLLAMA_MODEL, messages=[{"role": "user", "content": content}])


async def _ollama_stack(auth: bool = False) -> Stack:
    """Ollama under /ollama (every POST scheduled), and a slow mvoice for tts."""
    stack = Stack.new("mgpu-ollama-client-")
    async with stack.starting():
        await stack.add_consumers(
            "mvoice", "ollama", args={"mvoice": ["--work-s", str(MVOICE_WORK_S)]}
        )
        sections: dict[str, Any] = {"auth": token_auth(stack.workdir, TOKEN)} if auth else {}
        config = make_config(
            stack.consumers,
            {"tts": "mvoice", "llm": "ollama"},
            overrides={"ollama": {"native": {"prefix": "/ollama"}}},
            **sections,
        )
        await stack.start(config)
    return stack


class _OllamaClientCase(TestCase):
    """A daemon with Ollama under /ollama, shared by a class's tests; the client in threads."""

    timeout = 60
    auth = False

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get(
            ("ollama-client", self.auth), lambda: _ollama_stack(self.auth)
        )
        self.http = self.stack.client()
        self.addCleanup(self.http.close)
        self.mvoice = self.stack.consumers["mvoice"]
        self.ollama = self.stack.consumers["ollama"]
        await wait_for(self.idle, 15, "the GPU lease to be free")

    def client(self, headers: Mapping[str, str] | None = None) -> ollama.Client:
        """The ollama client with the daemon's /ollama as its host; closed at cleanup."""
        assert self.stack.daemon is not None
        client = ollama.Client(
            host=f"{self.stack.daemon.url}/ollama", headers=dict(headers or {}), timeout=30
        )
        self.addCleanup(client.close)
        return client

    def call(self, work: Callable[[], T]) -> Deferred[T]:
        """Run a blocking client call in a thread."""
        return deferToThread(work)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"} if self.auth else {}

    async def status(self) -> dict[str, Any]:
        response, doc = await self.http.json("GET", "/v1/status", headers=self.auth_headers())
        assert response.code == 200, (response.code, doc)
        return dict(doc)

    async def idle(self) -> bool:
        scheduler = (await self.status())["scheduler"]
        return scheduler["holder"] is None and scheduler["queued"] == 0

    async def completed(self) -> int:
        """Requests that went through the scheduler and got their answer, so far."""
        return int((await self.status())["scheduler"]["completed"])

    async def work_since(self, since: float) -> list[dict[str, Any]]:
        """The simulated Ollama's work entries that started at or after ``since``."""
        return [e for e in await sim_log(self.ollama) if e["start"] >= since]


class OllamaClientTests(_OllamaClientCase):
    """chat, streamed generate, embed, list and ps; the POSTs through the lease."""

    async def test_chat(self) -> None:
        """One chat answer; it went through the scheduler (completed grows by one, Ollama's
        last_used is set) and the simulator did the work."""
        before, since = await self.status(), time.time()
        answer = await self.call(lambda: chat(self.client(), "hello there"))
        self.assertEqual((answer.message.role, answer.message.content),
                         ("assistant", "".join(TOKENS)))  # fmt: skip
        self.assertIs(answer.done, True)
        self.assertEqual(answer.model, OLLAMA_MODEL)
        after = await self.status()
        self.assertEqual(after["scheduler"]["completed"], before["scheduler"]["completed"] + 1)
        used = [doc["consumers"]["ollama"]["last_used"] for doc in (before, after)]
        self.assertIsNotNone(used[1])
        self.assertNotEqual(used[0], used[1])
        self.assertEqual([e["path"] for e in await self.work_since(since)], ["/api/chat"])

    async def test_streamed_generate(self) -> None:
        """A streamed generate arrives as several chunks, in order, spread over the work
        (not all at its end), the last with done=True; scheduled once."""
        before = await self.completed()

        def stream() -> list[tuple[float, Any]]:
            chunks: Iterator[Any] = self.client().generate(
                model=OLLAMA_MODEL, prompt="one two three", stream=True
            )
            return [(time.monotonic(), chunk) for chunk in chunks]

        arrived = await self.call(stream)
        chunks = [chunk for _, chunk in arrived]
        self.assertEqual([c.response for c in chunks], [*TOKENS, ""])
        self.assertEqual([c.done for c in chunks], [False] * len(TOKENS) + [True])
        self.assertEqual((chunks[-1].done_reason, chunks[-1].eval_count), ("stop", len(TOKENS)))
        # The simulator spreads 10 tokens over 0.5 s: the first is long out before the last.
        self.assertGreater(arrived[-1][0] - arrived[0][0], 0.2)
        self.assertEqual(await self.completed(), before + 1)

    async def test_embed(self) -> None:
        """embed: one vector per input, of the simulator's size; scheduled once."""
        before, since = await self.completed(), time.time()
        answer = await self.call(
            lambda: self.client().embed(model="nomic-embed-text", input=["first", "second one"])
        )
        self.assertEqual(answer.model, "nomic-embed-text")
        self.assertEqual([len(v) for v in answer.embeddings], [EMBEDDING_DIMS] * 2)
        self.assertNotEqual(answer.embeddings[0], answer.embeddings[1])
        self.assertEqual(await self.completed(), before + 1)
        self.assertEqual([e["path"] for e in await self.work_since(since)], ["/api/embed"])

    async def test_list_and_ps(self) -> None:
        """list shows Ollama's models, ps the one a chat just loaded; neither is scheduled."""
        await self.call(lambda: chat(self.client(), "load it"))
        before = await self.completed()
        listed = await self.call(lambda: self.client().list())
        self.assertEqual({m.model for m in listed.models}, set(OLLAMA_MODELS))
        running = await self.call(lambda: self.client().ps())
        self.assertEqual([m.model for m in running.models], [OLLAMA_MODEL])
        self.assertGreater(running.models[0].size_vram or 0, 0)
        self.assertEqual(await self.completed(), before)

    async def test_chat_waits_for_the_lease_list_and_ps_do_not(self) -> None:
        """While mvoice's tts holds the GPU lease, an Ollama chat queues and starts only after
        mvoice's work ended (the simulators' work logs), while list and ps are answered at
        once."""
        since = time.time()
        holder = ensureDeferred(self.tts())
        await wait_for(self.mvoice_holds, 5, "mvoice to hold the GPU lease")
        waiting = self.call(lambda: chat(self.client(), "wait"))
        await wait_for(self.ollama_queued, 5, "the ollama chat to queue")
        started = time.monotonic()
        listed = await self.call(lambda: self.client().list())
        running = await self.call(lambda: self.client().ps())
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(listed.models)
        self.assertIsNotNone(running.models)
        self.assertTrue(await self.mvoice_holds(), "mvoice's work ended too soon for this test")
        self.assertFalse(waiting.called, "the ollama chat did not wait for the lease")
        self.assertEqual((await holder).status, 200)
        self.assertEqual((await waiting).message.content, "".join(TOKENS))
        [m] = [e for e in await sim_log(self.mvoice) if e["start"] >= since]
        [o] = await self.work_since(since)
        self.assertEqual(o["path"], "/api/chat")
        self.assertGreaterEqual(o["start"], m["end"])

    async def tts(self) -> RawResponse:
        body = b'{"text": "hold the card"}'
        headers = {"Content-Type": "application/json", **self.auth_headers()}
        data = request_bytes("POST", "/v1/tts", body, headers)
        return await raw_request(self.stack.port, data, timeout=20)

    async def mvoice_holds(self) -> bool:
        return bool((await self.status())["scheduler"]["holder"] == "mvoice")

    async def ollama_queued(self) -> bool:
        return bool((await self.status())["consumers"]["ollama"]["queued"] == 1)


class OllamaClientAuthTests(_OllamaClientCase):
    """With auth.token_file set, the client needs the token in its headers."""

    auth = True

    async def test_token_in_headers(self) -> None:
        """With Authorization: Bearer <token>, list and chat work; the chat is scheduled."""
        client = self.client({"Authorization": f"Bearer {TOKEN}"})
        before = await self.completed()
        listed = await self.call(client.list)
        self.assertEqual({m.model for m in listed.models}, set(OLLAMA_MODELS))
        answer = await self.call(lambda: chat(client, "hi"))
        self.assertEqual(answer.message.content, "".join(TOKENS))
        self.assertEqual(await self.completed(), before + 1)

    async def test_without_token_is_401(self) -> None:
        """Without the token, or with a wrong one, a GET and a POST are ResponseError 401,
        and nothing is scheduled or reaches Ollama's work."""
        before, since = await self.completed(), time.time()
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            client = self.client(headers)
            for work in (client.list, functools.partial(chat, client, "hi")):
                error = await self.refused(work)
                self.assertEqual(error.status_code, 401, (headers, error))
        self.assertEqual(await self.completed(), before)
        self.assertEqual(await self.work_since(since), [])

    async def refused(self, work: Callable[[], object]) -> ollama.ResponseError:
        """The ``ResponseError`` a blocking client call raises (in its thread)."""
        try:
            await self.call(work)
        except ollama.ResponseError as e:
            return e
        self.fail("no ResponseError raised")
