"""Native passthrough (SPEC 9.1) end to end: the real daemon, a recorder and simulated consumers.

The recorder (``tests/integration/recorder.py``) logs every request it gets,
so the tests read there the target, ``Host`` and ``X-Forwarded-*`` that
arrived, and that a refused path never arrived.  The simulated mvoice holds
the GPU lease while the simulated Ollama's native ``POST`` waits for it and
its native ``GET`` passes.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    RawResponse,
    Stack,
    make_config,
    raw_request,
    set_faults,
    shared_stacks,
    sim_log,
    token_auth,
    wait_for,
)
from tests.integration.patterns import ERROR_KEYS

TOKEN = "n4tive-t0ken-for-the-integration-tests"
#: The Host a browser would send: not the daemon's address, nor the consumer's.
CLIENT_HOST = "gpu-box.example:8770"
RECORDER_NATIVE = {"prefix": "/rec", "gpu": [{"method": "POST", "path": "/gpu/*"}]}


def native_request(
    method: str,
    target: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    host: str = CLIENT_HOST,
) -> bytes:
    """An HTTP/1.1 request with the given ``Host``, the target sent as is."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def _native_stack(auth: bool = False) -> Stack:
    """mvoice (tts), Ollama under /ollama (every POST scheduled), the recorder under /rec."""
    stack = Stack.new("mgpu-native-")
    async with stack.starting():
        await stack.add_consumers("mvoice", "ollama")
        await stack.add_recorder()
        sections: dict[str, Any] = {"auth": token_auth(stack.workdir, TOKEN)} if auth else {}
        config = make_config(
            stack.consumers,
            {"tts": "mvoice", "llm": "ollama"},
            overrides={"ollama": {"native": {"prefix": "/ollama"}},
                       "recorder": {"native": RECORDER_NATIVE}},
            **sections,
        )  # fmt: skip
        await stack.start(config)
    return stack


class NativeTests(TestCase):
    """One daemon with native prefixes, shared by these tests."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("native", _native_stack)
        self.http = self.stack.client()
        self.addCleanup(self.http.close)
        self.recorder = self.stack.consumers["recorder"]

    async def send(self, data: bytes, timeout: float = 10) -> RawResponse:
        return await raw_request(self.stack.port, data, timeout=timeout)

    def relayed(self) -> list[dict[str, Any]]:
        """What reached the recorder through its prefix (its health probes left out)."""
        return [e for e in self.recorder.log_lines() if "X-Forwarded-Prefix" in e["headers"]]

    def assertBrokerError(self, response: RawResponse, status: int, code: str) -> None:
        self.assertEqual(response.status, status, response.body)
        document = response.json()
        self.assertEqual(set(document), ERROR_KEYS)
        self.assertEqual(document["error"], code)

    async def test_target_host_and_forwarded_headers_arrive(self) -> None:
        """GET /rec/view?filename=x reaches the recorder as GET /view?filename=x with the
        client's Host and the broker's X-Forwarded-Host, -Proto and -Prefix, whatever the
        client sent as those; the consumer's answer comes back."""
        before = len(self.relayed())
        response = await self.send(
            native_request(
                "GET",
                "/rec/view?filename=x&subfolder=&type=output",
                {
                    "X-Forwarded-Host": "evil.example",
                    "X-Forwarded-Prefix": "/elsewhere",
                    "X-Forwarded-Proto": "https",
                    "Origin": f"http://{CLIENT_HOST}",
                },
            )
        )
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.json(), {"recorded": "/view?filename=x&subfolder=&type=output"})
        [entry] = self.relayed()[before:]
        headers = entry["headers"]
        self.assertEqual((entry["method"], entry["target"]),
                         ("GET", "/view?filename=x&subfolder=&type=output"))  # fmt: skip
        self.assertEqual(
            {name: headers.get(name) for name in (
                "Host", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Prefix", "Origin",
                "X-Forwarded-For",
            )},
            {"Host": CLIENT_HOST, "X-Forwarded-Host": CLIENT_HOST, "X-Forwarded-Proto": "http",
             "X-Forwarded-Prefix": "/rec", "Origin": f"http://{CLIENT_HOST}",
             "X-Forwarded-For": "127.0.0.1"},
        )  # fmt: skip

    async def test_prefix_alone_is_the_root_and_methods_pass(self) -> None:
        """/rec/ is the consumer's "/" (a GET of /rec is redirected there; other methods of
        /rec reach "/" too), and PUT, DELETE and a POST with a body pass as sent."""
        before = len(self.relayed())
        for method, target, body in (
            ("GET", "/rec/", None),
            ("OPTIONS", "/rec", None),
            ("PUT", "/rec/a?x=1", b"{}"),
            ("DELETE", "/rec/b", None),
            ("POST", "/rec/upload/image", b'{"image": 1}'),
        ):
            response = await self.send(native_request(method, target, body=body))
            self.assertEqual(response.status, 200, (method, target, response.body))
        self.assertEqual(
            [(e["method"], e["target"]) for e in self.relayed()[before:]],
            [
                ("GET", "/"),
                ("OPTIONS", "/"),
                ("PUT", "/a?x=1"),
                ("DELETE", "/b"),
                ("POST", "/upload/image"),
            ],
        )

    async def test_path_tricks_never_reach_the_consumer(self) -> None:
        """Dot segments, //, backslashes, encoded dots or slashes and absolute-form targets
        under the prefix are 400 bad_request; a look-alike prefix is 404; none arrives."""
        before = len(self.relayed())
        for target in ("/rec/../v1/status", "/rec/%2e%2e/x", "/rec//etc/passwd", "/rec/a%2fb",
                       "/rec/a\\b", "/rec/./x", "/rec/a%00", "http://127.0.0.1/rec/x"):  # fmt: skip
            self.assertBrokerError(await self.send(native_request("GET", target)), 400,
                                   "bad_request")  # fmt: skip
        for target in ("/recx", "/recx/view", "/Rec/view"):
            self.assertBrokerError(await self.send(native_request("GET", target)), 404,
                                   "not_found")  # fmt: skip
        self.assertEqual(self.relayed()[before:], [])

    async def test_gpu_post_waits_for_the_lease_get_passes(self) -> None:
        """While mvoice holds the GPU lease, a native POST to Ollama waits in the queue (it
        starts only after mvoice's work ended) and a native GET is answered at once."""
        mvoice, ollama = self.stack.consumers["mvoice"], self.stack.consumers["ollama"]
        await wait_for(self.idle, 15, "the GPU lease to be free")
        since = time.time()
        await set_faults(mvoice, {"delay_s": {"/api/synthesize": 1.5}})
        self.addCleanup(lambda: ensureDeferred(set_faults(mvoice, {})))
        holder = self.later(native_request("POST", "/v1/tts", body=b'{"text": "hello"}'))
        await wait_for(lambda: self.holder_is("mvoice"), 5, "mvoice to hold the GPU lease")
        body = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False}).encode()
        waiting = self.later(native_request("POST", "/ollama/api/generate", body=body))
        await wait_for(lambda: self.queued("ollama", 1), 5, "the native POST to queue")
        started = time.monotonic()
        version = await self.send(native_request("GET", "/ollama/api/version"))
        self.assertEqual(version.status, 200, version.body)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(await self.holder_is("mvoice"), "the holder ended too soon for this test")
        self.assertFalse(waiting.called, "the native POST did not wait for the lease")
        for d in (holder, waiting):
            response = await d
            self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.json()["done"], True)
        [m] = [e for e in await sim_log(mvoice) if e["start"] >= since]
        [o] = [e for e in await sim_log(ollama) if e["start"] >= since]
        self.assertGreaterEqual(o["start"], m["end"])

    async def test_native_requests_counted_under_a_bounded_route(self) -> None:
        """/metrics counts native requests under route="native", never under their paths."""
        for n in range(3):
            await self.send(native_request("GET", f"/rec/item-{n}?q={n}"))
        response, content = await self.http.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        text = content.decode()
        native = [
            line
            for line in text.splitlines()
            if line.startswith("mgpu_http_requests") and 'route="native"' in line
        ]
        self.assertTrue(native, text[:2000])
        self.assertNotIn("item-", text)

    # -- helpers -----------------------------------------------------------

    def later(self, data: bytes) -> Deferred[RawResponse]:
        return ensureDeferred(self.send(data, timeout=20))

    async def idle(self) -> bool:
        scheduler = (await self.http.status())["scheduler"]
        return scheduler["holder"] is None and scheduler["queued"] == 0

    async def holder_is(self, name: str) -> bool:
        return bool((await self.http.status())["scheduler"]["holder"] == name)

    async def queued(self, name: str, n: int) -> bool:
        return bool((await self.http.status())["consumers"][name]["queued"] == n)


class NativeAuthTests(TestCase):
    """With a token, native routes ask a browser for Basic credentials and accept them."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("native-auth", lambda: _native_stack(auth=True))
        self.recorder = self.stack.consumers["recorder"]

    async def test_basic_challenge_then_token_as_password(self) -> None:
        """Without credentials /rec/ is 401 with WWW-Authenticate: Basic; with the token as
        the Basic password it reaches the consumer, which never sees the credentials."""
        port = self.stack.port
        refused = await raw_request(port, native_request("GET", "/rec/"))
        self.assertEqual(refused.status, 401, refused.body)
        self.assertEqual(refused.header("WWW-Authenticate"), 'Basic realm="mgpumanager"')
        credentials = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        answer = await raw_request(
            port, native_request("GET", "/rec/", {"Authorization": f"Basic {credentials}"})
        )
        self.assertEqual(answer.status, 200, answer.body)
        arrived = [e for e in self.recorder.log_lines() if "X-Forwarded-Prefix" in e["headers"]]
        self.assertEqual([e["target"] for e in arrived], ["/"])
        self.assertNotIn("Authorization", arrived[0]["headers"])
