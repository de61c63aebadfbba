"""WebSocket tunnels on native prefixes (SPEC 9.1) end to end: the real daemon under twistd,
the simulated ComfyUI's ``/ws`` feed, and the ``websockets`` library as the client.

The client runs its asyncio loop in a worker thread (``deferToThread`` +
``asyncio.run``) and hands what it receives to the reactor's side through a
thread-safe queue; the tests meanwhile drive the daemon over HTTP.  The
recorder (``tests/integration/recorder.py``) answers every request 200, so a
handshake sent to it shows what the consumer gets, and how a refusal is relayed.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.harness import (
    RawResponse,
    Stack,
    make_config,
    raw_request,
    shared_stacks,
    token_auth,
    wait_for,
)

TOKEN = "w3bs0cket-t0ken-for-the-integration-tests"
#: ComfyUI under /comfyui: only a queued prompt takes the lease, held until its history shows.
COMFYUI_NATIVE = {
    "prefix": "/comfyui",
    "gpu": [
        {
            "method": "POST",
            "path": "/prompt",
            "hold_until": {"path": "/history/{prompt_id}", "interval_s": 0.1},
        }
    ],
}
#: A prompt whose sampler runs four steps, then saves an image.
GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"steps": 4, "seed": 1}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}
#: A handshake as a browser sends it (the key is RFC 6455's example).
HANDSHAKE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


class WsClient:
    """A ``websockets`` client in a worker thread; its JSON messages land in ``received``."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        self.opened = threading.Event()
        self._close = threading.Event()
        #: Set when the server side closed the connection (the client did not ask).
        self.closed_by_server = False
        self.done: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        self.done = deferToThread(asyncio.run, self._main())
        return self.done

    async def _main(self) -> None:
        async with connect(
            self.url, additional_headers=self.headers, proxy=None, open_timeout=10, close_timeout=5
        ) as ws:
            self.opened.set()
            while not self._close.is_set():
                try:
                    text = await asyncio.wait_for(ws.recv(), 0.05)
                except TimeoutError:
                    continue
                except ConnectionClosed:
                    self.closed_by_server = True
                    return
                self.received.put(json.loads(text))

    async def close(self) -> None:
        """Close from the client's side (a close frame) and wait for the thread to end."""
        self._close.set()
        await self.ended()

    async def ended(self, timeout: float = 10) -> None:
        """Wait for the client's thread to end; its error, if any, is raised."""
        done = self.done
        assert done is not None
        await wait_for(lambda: done.called, timeout, "the WebSocket client to end")
        await done

    async def next(
        self, match: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
    ) -> list[dict[str, Any]]:
        """The messages received until one that ``match``es (included)."""
        seen: list[dict[str, Any]] = []

        def found() -> bool:
            while True:
                try:
                    message = self.received.get_nowait()
                except queue.Empty:
                    return False
                seen.append(message)
                if match(message):
                    return True

        await wait_for(found, timeout, what)
        return seen


async def open_ws(
    port: int, path: str, headers: Mapping[str, str] | None = None, userinfo: str = ""
) -> WsClient:
    """A client connected to ``ws://[userinfo@]127.0.0.1:port/path``; else its error."""
    at = f"{userinfo}@" if userinfo else ""
    client = WsClient(f"ws://{at}127.0.0.1:{port}{path}", headers)
    done = client.start()
    await wait_for(lambda: client.opened.is_set() or done.called, 15, "the WebSocket to open")
    if not client.opened.is_set():
        await done  # raises the client's error
    return client


def handshake(target: str, host: str, headers: Mapping[str, str] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in {**HANDSHAKE_HEADERS, **(headers or {})}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _stack(auth: bool) -> Stack:
    """ComfyUI under /comfyui (image routed to it too), the recorder under /rec."""
    stack = Stack.new("mgpu-ws-")
    async with stack.starting():
        await stack.add_consumers("comfyui")
        await stack.add_recorder()
        sections: dict[str, Any] = {"auth": token_auth(stack.workdir, TOKEN)} if auth else {}
        config = make_config(
            stack.consumers,
            {"image": "comfyui"},
            overrides={"comfyui": {"native": COMFYUI_NATIVE},
                       "recorder": {"native": {"prefix": "/rec"}}},
            **sections,
        )  # fmt: skip
        await stack.start(config)
    return stack


class _WebSocketCase(TestCase):
    timeout = 90
    auth = False

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get(("websocket", self.auth), lambda: _stack(self.auth))
        self.http = self.stack.client()
        self.addCleanup(self.http.close)
        self.clients: list[WsClient] = []
        self.addCleanup(self._close_clients)

    async def _close_clients(self) -> None:
        for client in self.clients:
            if client.done is not None and not client.done.called:
                await client.close()

    async def ws(
        self, path: str, headers: Mapping[str, str] | None = None, userinfo: str = ""
    ) -> WsClient:
        client = await open_ws(self.stack.port, path, headers, userinfo)
        self.clients.append(client)
        return client

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"} if self.auth else {}

    async def metric(self, name: str) -> float:
        """The sample ``name`` (no labels) on ``/metrics`` now."""
        _, body = await self.http.request("GET", "/metrics", headers=self.auth_headers())
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics: {body[:500]!r}")

    async def tunnels_open(self) -> float:
        return await self.metric("mgpu_websocket_tunnels")

    async def holder(self) -> Any:
        _, doc = await self.http.json("GET", "/v1/status", headers=self.auth_headers())
        return doc["scheduler"]["holder"]

    def recorded(self, target: str) -> list[dict[str, Any]]:
        """What reached the recorder for ``target``."""
        return [e for e in self.stack.consumers["recorder"].log_lines() if e["target"] == target]

    async def send(self, data: bytes) -> RawResponse:
        return await raw_request(self.stack.port, data, timeout=10)


class WebSocketTests(_WebSocketCase):
    """One daemon without auth, shared by these tests."""

    async def test_progress_through_the_tunnel_without_the_lease(self) -> None:
        """A client of /comfyui/ws gets ComfyUI's status at once, then follows a prompt
        posted through the broker from executing to progress to executing null; the
        tunnel is counted while open, holds no lease once the job is done, is counted out
        when the client closes, and is logged once."""
        ws = await self.ws("/comfyui/ws?clientId=abc")
        [status] = await ws.next(lambda m: m["type"] == "status", "the status message")
        self.assertEqual(
            status,
            {"type": "status",
             "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}},
        )  # fmt: skip
        self.assertEqual(await self.tunnels_open(), 1)
        self.assertEqual(await self.metric("mgpu_websocket_tunnels_opened_total"), 1)
        self.assertIsNone(await self.holder())  # the tunnel itself is not scheduled
        response, answer = await self.http.json(
            "POST", "/comfyui/prompt", json_body={"prompt": GRAPH, "client_id": "abc"}
        )
        self.assertEqual(response.code, 200, answer)
        pid = answer["prompt_id"]
        seen = await ws.next(
            lambda m: m["type"] == "executing" and m["data"]["node"] is None, "executing null"
        )
        mine = [m for m in seen if m["data"].get("prompt_id") == pid]
        executing = [m["data"]["node"] for m in mine if m["type"] == "executing"]
        self.assertEqual(executing, ["3", "9", None])
        progress = [(m["data"]["value"], m["data"]["max"]) for m in mine if m["type"] == "progress"]
        self.assertEqual(progress, [(1, 4), (2, 4), (3, 4), (4, 4)])
        self.assertLess(
            [m["type"] for m in mine].index("execution_start"),
            [m["type"] for m in mine].index("progress"),
        )
        # The job is done: hold_until lets the lease go while the tunnel stays open.
        await wait_for(lambda: self._holder_is_none(), 10, "the lease to be released")
        self.assertEqual(await self.tunnels_open(), 1)
        self.assertFalse(ws.done is not None and ws.done.called, "the tunnel closed")
        await ws.close()
        self.assertFalse(ws.closed_by_server)
        await wait_for(self._no_tunnel, 10, "the tunnel to be counted out")
        # One access-log line for the tunnel, its 101, whenever it ends (this daemon's only one).
        assert self.stack.daemon is not None
        log = self.stack.daemon.process

        def switched_lines() -> list[str]:
            return [line for line in log.stdout().splitlines() if " status=101 " in line]

        await wait_for(switched_lines, 5, "the access-log line of the 101")
        [line] = switched_lines()
        self.assertIn("GET native consumer=comfyui status=101 ", line)

    async def _holder_is_none(self) -> bool:
        return await self.holder() is None

    async def _no_tunnel(self) -> bool:
        return await self.tunnels_open() == 0

    async def test_refusal_relayed_and_head_as_the_consumer_sees_it(self) -> None:
        """A consumer that does not switch (the recorder's 200) is relayed as an ordinary
        answer and the connection closes after it; the consumer saw GET /ws with the
        client's Host, Origin and WebSocket headers, Connection: Upgrade, X-Forwarded-*."""
        host = "gpu-box.example:8770"
        response = await self.send(
            handshake("/rec/ws?clientId=r1", host, {"Origin": f"http://{host}"})
        )
        self.assertEqual(response.status, 200, response.raw[:300])
        self.assertEqual(response.json(), {"recorded": "/ws?clientId=r1"})
        self.assertEqual(response.header("Connection"), "close")
        [entry] = self.recorded("/ws?clientId=r1")
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        self.assertEqual(entry["method"], "GET")
        self.assertEqual(headers["host"], host)
        self.assertEqual(headers["origin"], f"http://{host}")
        self.assertEqual(headers["upgrade"], "websocket")
        self.assertEqual(headers["connection"], "Upgrade")
        self.assertEqual(headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==")
        self.assertEqual(headers["sec-websocket-version"], "13")
        self.assertEqual(headers["x-forwarded-host"], host)
        self.assertEqual(headers["x-forwarded-proto"], "http")
        self.assertEqual(headers["x-forwarded-prefix"], "/rec")
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")

    async def test_foreign_origin_refused_by_comfyui(self) -> None:
        """ComfyUI's own origin check still applies through the tunnel: an Origin that is
        not the Host the client sent is its 403, relayed."""
        response = await self.send(
            handshake(
                "/comfyui/ws?clientId=o1",
                f"127.0.0.1:{self.stack.port}",
                {"Origin": "http://127.0.0.1:1"},
            )
        )
        self.assertEqual(response.status, 403, response.raw[:300])


class WebSocketAuthTests(_WebSocketCase):
    """One daemon with a token, shared by these tests."""

    auth = True

    async def test_token_in_a_header_or_the_url(self) -> None:
        """With auth, the tunnel opens with a bearer token or with Basic credentials in the
        URL (any user, the token as password), and not without: 401 asking for Basic."""
        path = "/comfyui/ws?clientId=t1"
        for headers, userinfo in (({"Authorization": f"Bearer {TOKEN}"}, ""),
                                  (None, f"anyone:{TOKEN}")):  # fmt: skip
            client = await self.ws(path, headers, userinfo)  # user info is sent as Basic
            [status] = await client.next(lambda m: m["type"] == "status", "the status message")
            self.assertEqual(status["data"]["sid"], "t1")
            await client.close()
        with self.assertRaises(InvalidStatus) as refused:
            await open_ws(self.stack.port, "/comfyui/ws?clientId=t2")
        self.assertEqual(refused.exception.response.status_code, 401)
        self.assertIn("Basic", refused.exception.response.headers.get("WWW-Authenticate", ""))

    async def test_token_not_forwarded(self) -> None:
        """The broker's token is not part of the handshake the consumer gets."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = await self.send(handshake("/rec/ws?clientId=a1", "127.0.0.1", headers))
        self.assertEqual(response.status, 200, response.raw[:300])
        [entry] = self.recorded("/ws?clientId=a1")
        self.assertNotIn("authorization", {k.lower() for k in entry["headers"]})


class WebSocketStopTests(TestCase):
    """A daemon of its own, stopped with a tunnel open."""

    timeout = 60

    async def test_daemon_stop_closes_the_client(self) -> None:
        """SIGTERM to the daemon closes the client's socket (the server side ends it), and
        the daemon stops cleanly, nothing unhandled in its log."""
        await shared_stacks.release()
        stack = await _stack(auth=False)
        self.addCleanup(stack.stop)
        client = await open_ws(stack.port, "/comfyui/ws?clientId=s1")

        async def close_client() -> None:
            if client.done is not None and not client.done.called:
                await client.close()

        self.addCleanup(close_client)
        await client.next(lambda m: m["type"] == "status", "the status message")
        assert stack.daemon is not None
        os.kill(stack.daemon.pid, signal.SIGTERM)
        await client.ended(timeout=10)
        self.assertTrue(client.closed_by_server)
        # twistd ends a clean stop by re-raising SIGTERM on itself (as systemd expects).
        self.assertEqual(await stack.daemon.process.wait_exit(10), -signal.SIGTERM)
        output = stack.daemon.process.output(100_000)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Unhandled", output)
