"""Consumers that die: the client gets consumer_unreachable and the GPU lock is released."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    RawConnection,
    Stack,
    closed,
    connect,
    make_config,
    parse_response,
    request_bytes,
    set_faults,
    shared_stacks,
    sim_log,
    wait_for,
)
from tests.integration.patterns import ERROR_KEYS


class ConsumerGoneTests(TestCase):
    """Each test kills a consumer, so each gets its own daemon and consumers."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        await shared_stacks.release()  # no other daemon competes for the CPUs
        self.stack = Stack.new("mgpu-gone-")
        self.addCleanup(lambda: ensureDeferred(self.stack.stop()))
        await self.stack.add_consumers("mvoice", "ollama")
        config = make_config(
            self.stack.consumers,
            {"tts": "mvoice", "stt": "mvoice", "llm": "ollama"},
            health={"interval_s": 0.5, "timeout_s": 1},
        )
        await self.stack.start(config)
        self.http = self.stack.client()
        self.addCleanup(self.http.close)

    async def status(self) -> dict[str, Any]:
        return await self.http.status()

    def assertUnreachable(self, code: int, error: Any, consumer: str) -> None:
        self.assertEqual(code, 502, error)
        self.assertEqual(set(error), ERROR_KEYS)
        self.assertEqual(error["error"], "consumer_unreachable")
        self.assertEqual(error["consumer"], consumer)
        self.assertIs(error["retryable"], True)

    async def test_killed_consumer_unreachable_and_lock_released(self) -> None:
        """After a consumer is killed its requests get 502 consumer_unreachable, /v1/status
        shows it unhealthy, and the other consumer still runs."""
        response, body = await self.http.json(
            "POST", "/v1/llm", json_body={"prompt": "hi", "stream": False}
        )
        self.assertEqual(response.code, 200, body)
        self.stack.consumers["ollama"].process.kill()

        response, error = await self.http.json(
            "POST", "/v1/llm", json_body={"prompt": "hi", "stream": False}
        )
        self.assertUnreachable(response.code, error, "ollama")
        doc = await self.status()
        self.assertIs(doc["consumers"]["ollama"]["healthy"], False, doc["consumers"])
        self.assertTrue(doc["consumers"]["ollama"]["last_error"])
        self.assertIsNone(doc["scheduler"]["holder"])
        self.assertEqual(doc["consumers"]["ollama"]["in_flight"], 0)

        started = time.monotonic()
        response, body = await self.http.json(
            "POST", "/v1/tts", json_body={"text": "still works"}, timeout=10
        )
        self.assertEqual(response.code, 200, body)
        self.assertLess(time.monotonic() - started, 5)
        # The probes go on failing: still unreachable, still unhealthy.
        last_probe = doc["consumers"]["ollama"]["last_probe"]
        await wait_for(lambda: self._probed_after(last_probe, "ollama"), 5, "a new probe")
        response, error = await self.http.json(
            "POST", "/v1/llm", json_body={"prompt": "hi", "stream": False}
        )
        self.assertUnreachable(response.code, error, "ollama")
        self.assertIs((await self.status())["consumers"]["ollama"]["healthy"], False)

    async def _probed_after(self, last_probe: str | None, name: str) -> bool:
        """Whether ``name`` was probed since ``last_probe`` (which has whole seconds)."""
        consumer = (await self.status())["consumers"][name]
        return consumer["last_probe"] not in (None, last_probe)

    async def test_consumer_killed_while_running(self) -> None:
        """A consumer killed while it runs a request gets that client 502 consumer_unreachable,
        and the lock goes to the next request."""
        mvoice = self.stack.consumers["mvoice"]
        await set_faults(mvoice, {"hang": ["/api/synthesize"]})
        client = await connect(self.stack.port, RawConnection())
        self.addCleanup(client.abort)
        client.send(request_bytes("POST", "/v1/tts", b'{"text": "lost"}'))

        async def running() -> bool:
            return bool((await self.status())["scheduler"]["holder"] == "mvoice")

        await wait_for(running, 5, "the request to run")
        self.assertEqual(await sim_log(mvoice), [])  # hung before any work
        mvoice.process.kill()
        response = parse_response(await closed(client, 10))
        self.assertUnreachable(response.status, response.json(), "mvoice")
        response2, body = await self.http.json(
            "POST", "/v1/llm", json_body={"prompt": "hi", "stream": False}, timeout=10
        )
        self.assertEqual(response2.code, 200, body)
        doc = await self.status()
        self.assertIs(doc["consumers"]["mvoice"]["healthy"], False)
        self.assertEqual(doc["scheduler"]["failed"], 1, doc["scheduler"])
