"""Tests for mgpu.api and mgpu.status: routing, the error schema, /audio paths, the status document.

Requests are real HTTP/1.1 bytes fed to a ``Site`` around ``BrokerResource``
over a ``StringTransport``; the facade is a stand-in whose behaviour each test
sets, except where a test needs the real one (``tests.test_facade.Broker``).
"""

from __future__ import annotations

import base64
import gc
import json
import posixpath
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from mgpu.admin import Admin
from mgpu.api import BrokerResource, Operations, audio_target, native_target
from mgpu.config import KINDS, ConfigError, ConsumerConfig
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.facade import Facade
from mgpu.gpu import GpuPoller, GpuSnapshot
from mgpu.metrics import BrokerMetrics
from mgpu.registry import Registry
from mgpu.relay import RelayBroken
from mgpu.reload import Reloader
from mgpu.scheduler import GpuScheduler
from mgpu.site import TimedRequest, route_label
from mgpu.sse import EventStreams
from mgpu.status import StatusView
from tests.fuzz import examples
from tests.test_facade import Broker, Client, make_config, native_config

ERROR_KEYS = {"error", "message", "consumer", "retryable"}

Behaviour = Callable[[Request], Awaitable[None]]


async def _serve_ok(request: Request) -> None:
    request.setResponseCode(200)
    request.write(b"served")


class FakeFacade:
    """Records what BrokerResource hands it; does what ``behaviour`` says."""

    def __init__(self) -> None:
        self.config = make_config()
        self.calls: list[tuple[str, str | bytes, bytes]] = []
        #: serve_native's calls: (consumer, target, method, body).
        self.native: list[tuple[str, bytes, bytes, bytes]] = []
        self.requests: list[Request] = []
        self.behaviour: Behaviour = _serve_ok

    async def serve_kind(self, request: Request, kind: str) -> None:
        assert request.content is not None
        self.calls.append(("kind", kind, request.content.read()))
        self.requests.append(request)
        await self.behaviour(request)

    async def serve_audio(self, request: Request, target: bytes) -> None:
        self.calls.append(("audio", target, request.method))
        self.requests.append(request)
        await self.behaviour(request)

    async def serve_native(self, request: Request, consumer: ConsumerConfig, target: bytes) -> None:
        assert request.content is not None
        self.native.append((consumer.name, target, request.method, request.content.read()))
        self.requests.append(request)
        await self.behaviour(request)


class WebSocketFacade(FakeFacade):
    """A FakeFacade with the WebSocket hook; ``takeover`` makes it take the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.upgrades: list[tuple[str, bytes]] = []
        self.takeover = False

    async def serve_websocket(
        self, request: Request, consumer: ConsumerConfig, target: bytes
    ) -> None:
        self.upgrades.append((consumer.name, target))
        if self.takeover:  # as autobahn's WebSocketResource does
            transport, request.channel.transport = request.channel.transport, None
            assert transport is not None
            transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\nframes")
        else:
            request.setResponseCode(502)
            request.write(b"no tunnel")


class Recording:
    """The real facade, with the requests it is handed recorded."""

    def __init__(self, facade: Facade) -> None:
        self.facade = facade
        self.config = facade.config
        self.requests: list[Request] = []

    async def serve_kind(self, request: Request, kind: str) -> None:
        self.requests.append(request)
        await self.facade.serve_kind(request, kind)


class CountingReader:
    """A GPU reader that counts its reads; the status document must never cause one."""

    source = "nvml"

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> Deferred[GpuSnapshot]:
        self.reads += 1
        return succeed(SNAPSHOT)


SNAPSHOT = GpuSnapshot(
    source="nvml",
    ok=True,
    error=None,
    index=0,
    name="NVIDIA GeForce RTX 4090",
    total_mib=24564,
    used_mib=16012,
    free_mib=8552,
    read_at=datetime(2026, 11, 26, 22, 0, 0, tzinfo=UTC),
)


class ApiTestCase(SynchronousTestCase):
    """Shared set-up: a BrokerResource over a FakeFacade and a real StatusView."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.facade = FakeFacade()
        self.registry = Registry(make_config().consumers, self.clock)
        self.scheduler = GpuScheduler(self.registry, self.clock)
        self.reader = CountingReader()
        self.poller = GpuPoller(self.reader, self.clock, 2.0)
        self.status = StatusView(self.poller, self.registry, self.scheduler)
        self.resource = BrokerResource(cast(Facade, self.facade), self.status)

    def send(
        self, method: bytes, uri: bytes, body: bytes = b"", headers: tuple[bytes, ...] = ()
    ) -> Client:
        client = Client(self.resource)
        client.send(method, uri, body, headers)
        return client

    def assertError(
        self, client: Client, status: int, code: str, consumer: str | None = None
    ) -> tuple[dict[bytes, list[bytes]], dict[str, Any]]:
        """The answer is the broker's JSON error ``code`` with ``status``, and nothing else."""
        got, headers, body = client.response()
        self.assertEqual(got, status)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        document = json.loads(body)
        self.assertEqual(set(document), ERROR_KEYS)
        self.assertEqual(
            (document["error"], document["consumer"], document["retryable"]),
            (code, consumer, status >= 500),
        )
        self.assertIsInstance(document["message"], str)
        self.assertTrue(document["message"])
        return headers, document

    def fail_with(self, error: BaseException) -> None:
        async def behaviour(request: Request) -> None:
            raise error

        self.facade.behaviour = behaviour


class RoutingTests(ApiTestCase):
    """Which requests reach the facade, Klein, or an error."""

    def test_post_kind_reaches_facade(self) -> None:
        """POST /v1/tts hands the request and its body to serve_kind("tts"); the answer ends."""
        client = self.send(b"POST", b"/v1/tts?voice=a", b'{"text": "hi"}')
        self.assertEqual(self.facade.calls, [("kind", "tts", b'{"text": "hi"}')])
        self.assertEqual(self.facade.requests[0].uri, b"/v1/tts?voice=a")
        status, _, body = client.response()
        self.assertEqual((status, body), (200, b"served"))
        self.assertTrue(client.transport.value().endswith(b"0\r\n\r\n"))

    def test_every_kind_routed(self) -> None:
        """Each of the four kinds reaches serve_kind under its own name."""
        for kind in KINDS:
            self.send(b"POST", b"/v1/" + kind.encode())
        self.assertEqual([kind for _, kind, _ in self.facade.calls], list(KINDS))

    def test_kind_with_other_method(self) -> None:
        """GET, PUT, DELETE or HEAD /v1/tts is 405 with Allow: POST; the facade is not called."""
        for method in (b"GET", b"PUT", b"DELETE"):
            client = self.send(method, b"/v1/tts")
            headers, _ = self.assertError(client, 405, "method_not_allowed")
            self.assertEqual(headers[b"allow"], [b"POST"])
        head = self.send(b"HEAD", b"/v1/tts")
        self.assertEqual(head.response()[0], 405)
        self.assertEqual(self.facade.calls, [])

    def test_unknown_path(self) -> None:
        """Paths that are no route are 404 not_found, whatever the method."""
        for method, path in (
            (b"GET", b"/index.html"),
            (b"GET", b"/v1"),
            (b"POST", b"/v1/video"),
            (b"POST", b"/v1/tts/extra"),
            (b"GET", b"/v1/status/x"),
            (b"POST", b"/v2/tts"),
        ):
            client = self.send(method, path)
            _, document = self.assertError(client, 404, "not_found")
            self.assertIn(path.decode(), document["message"])
        self.assertEqual(self.facade.calls, [])

    def test_doubled_or_encoded_slashes_are_not_found(self) -> None:
        """Doubled or percent-encoded slashes are unknown routes, not redirects or status."""
        for path in (b"//v1/status", b"/v1//status", b"/%2Fv1/status", b"/v1%2fstatus"):
            self.assertError(self.send(b"GET", path), 404, "not_found")

    def test_status(self) -> None:
        """GET /v1/status is 200 JSON, not cached, and is the StatusView's document."""
        self.scheduler.reject("queue_full")
        client = self.send(b"GET", b"/v1/status")
        status, headers, body = client.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"cache-control"], [b"no-store"])
        self.assertEqual(json.loads(body), self.status.document())
        self.assertEqual(json.loads(body)["scheduler"]["rejected"], 1)
        self.assertEqual(self.reader.reads, 0)

    def test_healthz(self) -> None:
        """GET /healthz is 200 {"status":"ok"} as JSON."""
        status, headers, body = self.send(b"GET", b"/healthz").response()
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertEqual(headers[b"content-type"], [b"application/json"])

    def test_status_other_method(self) -> None:
        """POST /v1/status and DELETE /healthz are 405 with an Allow naming GET."""
        for path in (b"/v1/status", b"/healthz"):
            client = self.send(b"POST" if path == b"/v1/status" else b"DELETE", path)
            headers, _ = self.assertError(client, 405, "method_not_allowed")
            self.assertIn(b"GET", headers[b"allow"][0].split(b", "))
            self.assertNotIn(b"POST", headers[b"allow"][0].split(b", "))


class ErrorTests(ApiTestCase):
    """Errors from the facade in the broker's JSON schema."""

    def test_broker_error_rendered(self) -> None:
        """A BrokerError from the facade is its status and its exact JSON body."""
        error = BrokerError("consumer_unreachable", "upstream mvoice is gone", "mvoice")
        self.fail_with(error)
        client = self.send(b"POST", b"/v1/tts")
        _, document = self.assertError(client, 502, "consumer_unreachable", "mvoice")
        self.assertEqual(document, error.to_dict())

    def test_error_headers_kept(self) -> None:
        """A queue_full error keeps its Retry-After header and is 503 retryable."""
        self.fail_with(BrokerError("queue_full", "256 waiting", "ollama", {"Retry-After": "7"}))
        headers, _ = self.assertError(self.send(b"POST", b"/v1/llm"), 503, "queue_full", "ollama")
        self.assertEqual(headers[b"retry-after"], [b"7"])

    def test_not_retryable_below_500(self) -> None:
        """A 4xx broker error such as payload_too_large is not retryable."""
        self.fail_with(BrokerError("payload_too_large", "body over 512 MiB"))
        self.assertError(self.send(b"POST", b"/v1/stt"), 413, "payload_too_large")

    def test_no_consumer_from_real_facade(self) -> None:
        """A kind that routing does not name is 404 no_consumer from the real facade."""
        broker = Broker(make_config(routing={"tts": "mvoice"}))
        self.resource = BrokerResource(broker.facade, self.status)
        client = self.send(b"POST", b"/v1/image", b"{}")
        _, document = self.assertError(client, 404, "no_consumer")
        self.assertIn("image", document["message"])
        self.assertEqual(broker.consumers["comfyui"].received, [])

    def test_unexpected_exception(self) -> None:
        """An unexpected exception is a 500 internal_error that hides its text, and is logged."""
        self.fail_with(ZeroDivisionError("secret detail"))
        client = self.send(b"POST", b"/v1/tts")
        _, document = self.assertError(client, 500, "internal_error")
        self.assertNotIn("secret", document["message"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unexpected_exception_after_answer_began(self) -> None:
        """An exception after the answer began cuts the connection instead of appending JSON."""

        async def behaviour(request: Request) -> None:
            request.setResponseCode(200)
            request.write(b"partial")
            raise ZeroDivisionError("late")

        self.facade.behaviour = behaviour
        client = self.send(b"POST", b"/v1/tts")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        raw = client.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertNotIn(b"internal_error", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        self.assertTrue(client.transport.disconnecting)

    def test_cancelled_while_client_present(self) -> None:
        """A CancelledError while the client is still there is a logged 500, not an empty 200."""
        self.fail_with(CancelledError())
        client = self.send(b"POST", b"/v1/tts")
        self.assertError(client, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 1)

    def test_relay_broken_not_written(self) -> None:
        """A RelayBroken (the relay already cut the answer) writes nothing more and no finish."""

        async def behaviour(request: Request) -> None:
            request.setResponseCode(200)
            request.write(b"partial")
            raise RelayBroken("upstream_timeout", "ollama went silent", "ollama")

        self.facade.behaviour = behaviour
        client = self.send(b"POST", b"/v1/llm")
        raw = client.transport.value()
        self.assertTrue(raw.endswith(b"7\r\npartial\r\n"), raw)
        self.assertEqual(self.flushLoggedErrors(), [])


class AudioTests(ApiTestCase):
    """/audio/*: methods, and paths that must stay under /audio/."""

    REFUSED = (
        b"/audio/../v1/status",
        b"/audio/a/../../etc/passwd",
        b"/audio/..",
        b"/audio/./a.wav",
        b"/audio/a/.",
        b"/audio//etc/passwd",
        b"/audio/a//b.wav",
        b"/audio/a\\..\\b.wav",
        b"/audio/%2e%2e/v1/status",
        b"/audio/%2E%2E/v1/status",
        b"/audio/.%2e/x",
        b"/audio/a%2fb.wav",
        b"/audio/a%2Fb.wav",
        b"/audio/a%5cb.wav",
        b"/audio/a%5Cb.wav",
        b"/audio/a%00.wav",
        b"/audio/http://evil.example/x",
        b"/audio/",
    )

    def test_post_is_405(self) -> None:
        """POST /audio/x is 405 method_not_allowed with Allow: GET, HEAD."""
        headers, _ = self.assertError(self.send(b"POST", b"/audio/x"), 405, "method_not_allowed")
        self.assertEqual(headers[b"allow"], [b"GET, HEAD"])
        self.assertEqual(self.facade.calls, [])

    def test_get_and_head_reach_facade(self) -> None:
        """GET and HEAD /audio/... reach serve_audio with the path and query as sent."""
        self.send(b"GET", b"/audio/out/a-1.wav?dl=1&t=2")
        self.send(b"HEAD", b"/audio/b.mp3")
        self.assertEqual(
            self.facade.calls,
            [
                ("audio", b"/audio/out/a-1.wav?dl=1&t=2", b"GET"),
                ("audio", b"/audio/b.mp3", b"HEAD"),
            ],
        )

    def test_unsafe_paths_refused(self) -> None:
        """Traversal, empty segments, backslashes, encoded dots or slashes and URLs are 400."""
        for path in self.REFUSED:
            client = self.send(b"GET", path)
            got = client.response()[0]
            self.assertEqual(got, 400, path)
            self.assertError(client, 400, "bad_request")
        self.assertEqual(self.facade.calls, [])

    def test_absolute_uri_request_line(self) -> None:
        """A request line with an absolute URI (GET http://host/audio/x) is 400 bad_request."""
        for uri in (b"http://host/audio/x", b"https://host:8770/audio/a.wav?dl=1"):
            client = self.send(b"GET", uri)
            self.assertEqual(self.facade.requests, [])
            self.assertError(client, 400, "bad_request")

    def test_audio_target_refuses(self) -> None:
        """audio_target raises bad_request for every unsafe path, with or without a query."""
        for path in (*self.REFUSED, b"http://host/audio/x", b"//audio/x", b"/v1/audio/x"):
            for uri in (path, path + b"?x=1"):
                with self.assertRaises(BrokerError, msg=repr(uri)) as caught:
                    audio_target(uri)
                self.assertEqual(caught.exception.code, "bad_request")

    def test_audio_target_accepts(self) -> None:
        """Ordinary names, dots inside names and a query with anything in it are kept as sent."""
        for uri in (
            b"/audio/a.wav",
            b"/audio/out/2026/a b.wav",
            b"/audio/a..b.wav",
            b"/audio/.hidden.wav",
            b"/audio/...",
            b"/audio/a%20b.wav",
            b"/audio/a.wav?dl=1&next=/../x",
            b"/audio/a.wav?",
            b"/audio/take:1.wav",
        ):
            self.assertEqual(audio_target(uri), uri)

    def test_audio_elsewhere_in_path_is_not_found(self) -> None:
        """A path that merely contains /audio/ further in is an unknown route, 404 not_found."""
        self.assertError(self.send(b"GET", b"/foo/audio/x"), 404, "not_found")
        self.assertEqual(self.facade.calls, [])


class DisconnectTests(ApiTestCase):
    """A client that leaves while the facade works."""

    def pending(self) -> tuple[Deferred[None], list[str]]:
        """Make the facade wait on a Deferred whose cancellation is recorded."""
        events: list[str] = []
        waiting: Deferred[None] = Deferred(lambda _: events.append("cancelled"))

        async def behaviour(request: Request) -> None:
            try:
                await waiting
            except CancelledError:
                events.append("facade saw CancelledError")
                raise

        self.facade.behaviour = behaviour
        return waiting, events

    def spy(self, request: Request) -> list[str]:
        """Record every write and finish on ``request`` from now on."""
        calls: list[str] = []
        self.patch(request, "write", lambda data: calls.append(f"write {data!r}"))
        self.patch(request, "finish", lambda: calls.append("finish"))
        self.patch(request, "setResponseCode", lambda *a: calls.append(f"code {a!r}"))
        return calls

    def test_disconnect_cancels_facade(self) -> None:
        """A client that disconnects cancels the facade's work; nothing is written afterwards."""
        _, events = self.pending()
        client = self.send(b"POST", b"/v1/tts")
        calls = self.spy(self.facade.requests[0])
        client.disconnect()
        self.assertEqual(events, ["cancelled", "facade saw CancelledError"])
        self.assertEqual(calls, [])
        self.assertEqual(client.transport.value(), b"")

    def test_disconnect_seen_by_facade_first(self) -> None:
        """When the facade notices the loss first (as the relay does), finish is never called."""

        async def behaviour(request: Request) -> None:
            relay: Deferred[None] = Deferred()
            request.notifyFinish().addErrback(lambda _: relay.errback(CancelledError()))
            await relay

        self.facade.behaviour = behaviour
        client = self.send(b"POST", b"/v1/tts")
        calls = self.spy(self.facade.requests[0])
        client.disconnect()
        self.assertEqual(calls, [])

    def test_facade_error_after_disconnect_not_written(self) -> None:
        """A broker error the facade raises after the client left is not written."""
        waiting: Deferred[None] = Deferred()

        async def behaviour(request: Request) -> None:
            try:
                await waiting
            except CancelledError:
                raise BrokerError("consumer_unreachable", "gone", "mvoice") from None

        self.facade.behaviour = behaviour
        client = self.send(b"POST", b"/v1/tts")
        calls = self.spy(self.facade.requests[0])
        client.disconnect()
        self.assertEqual(calls, [])

    def test_audio_disconnect_cancels(self) -> None:
        """A client that leaves an /audio download cancels it too."""
        _, events = self.pending()
        client = self.send(b"GET", b"/audio/a.wav")
        client.disconnect()
        self.assertEqual(events, ["cancelled", "facade saw CancelledError"])

    def test_disconnect_mid_stream_with_real_facade(self) -> None:
        """With the real facade, a client leaving mid-answer closes upstream and frees the lease."""
        broker = Broker()
        recording = Recording(broker.facade)
        self.resource = BrokerResource(cast(Facade, recording), self.status)
        client = self.send(b"POST", b"/v1/llm", b"{}")
        broker.pump()
        upstream = broker.consumers["ollama"].held[0]
        upstream.setResponseCode(200)
        upstream.write(b'{"t": "a"}\n')
        broker.pump()
        self.assertIn(b'{"t": "a"}\n', client.transport.value())
        calls = self.spy(recording.requests[0])
        client.disconnect()
        broker.pump()
        self.assertEqual(calls, [])
        self.assertEqual(broker.consumers["ollama"].lost, [upstream])
        self.assertEqual((broker.scheduler.holder, broker.scheduler.running), (None, 0))
        self.assertEqual(broker.reactor.getDelayedCalls(), [])


class StatusViewTests(SynchronousTestCase):
    """StatusView.document."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(make_config().consumers, self.clock)
        self.scheduler = GpuScheduler(self.registry, self.clock)
        self.reader = CountingReader()
        self.poller = GpuPoller(self.reader, self.clock, 2.0)
        self.view = StatusView(self.poller, self.registry, self.scheduler)

    def test_shape(self) -> None:
        """The document has exactly gpu, consumers and scheduler, with SPEC section 6's fields."""
        document = self.view.document()
        self.assertEqual(set(document), {"gpu", "consumers", "scheduler"})
        gpu = cast(dict[str, object], document["gpu"])
        self.assertLessEqual(
            {"source", "ok", "error", "index", "name", "total_mib", "used_mib", "free_mib",
             "read_at"},
            set(gpu),
        )  # fmt: skip
        consumers = cast(dict[str, dict[str, object]], document["consumers"])
        self.assertEqual(set(consumers), {"mvoice", "ollama", "comfyui"})
        self.assertLessEqual(
            {"healthy", "loaded", "last_probe", "last_error", "vram_resident_mib",
             "vram_managed", "last_used", "in_flight", "queued"},
            set(consumers["ollama"]),
        )  # fmt: skip
        self.assertEqual(
            (consumers["ollama"]["vram_resident_mib"], consumers["ollama"]["vram_managed"]),
            (6000, True),
        )
        self.assertEqual(
            document["scheduler"],
            {"queued": 0, "running": 0, "holder": None, "completed": 0, "failed": 0,
             "rejected": 0, "evictions": 0, "loads": 0},
        )  # fmt: skip
        json.dumps(document)

    def test_reads_cached_snapshot(self) -> None:
        """The gpu part is the poller's latest snapshot; the reader is never called."""
        self.poller.latest = SNAPSHOT
        document = self.view.document()
        self.assertEqual(
            document["gpu"],
            {"source": "nvml", "ok": True, "error": None, "index": 0,
             "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564, "used_mib": 16012,
             "free_mib": 8552, "read_at": "2026-11-26T22:00:00Z"},
        )  # fmt: skip
        self.assertEqual(self.reader.reads, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_read_yet(self) -> None:
        """Before any reading, gpu says ok false and why, without reading."""
        gpu = cast(dict[str, object], self.view.document()["gpu"])
        self.assertEqual((gpu["ok"], gpu["error"], gpu["source"]), (False, "not read yet", "nvml"))
        self.assertEqual(self.reader.reads, 0)

    def test_live_state(self) -> None:
        """Each call reflects the registry and scheduler as they are now."""
        before = self.view.document()
        self.registry.mark_unreachable("mvoice", "connection refused")
        self.scheduler.reject("queue_full")
        after = self.view.document()
        mvoice = cast(dict[str, dict[str, object]], after["consumers"])["mvoice"]
        self.assertEqual((mvoice["healthy"], mvoice["last_error"]), (False, "connection refused"))
        self.assertEqual(cast(dict[str, object], after["scheduler"])["rejected"], 1)
        self.assertEqual(cast(dict[str, object], before["scheduler"])["rejected"], 0)


class AuthTests(ApiTestCase):
    """auth.token_file: every route but /healthz needs the bearer token."""

    TOKEN = b"s3cret-token"

    def setUp(self) -> None:
        super().setUp()
        self.resource = BrokerResource(cast(Facade, self.facade), self.status, self.TOKEN)

    def test_missing_token_is_401(self) -> None:
        """Without Authorization every route answers 401 unauthorized, the facade included."""
        for method, uri in ((b"POST", b"/v1/tts"), (b"GET", b"/v1/status"), (b"GET", b"/nope")):
            headers, _ = self.assertError(self.send(method, uri), 401, "unauthorized")
            self.assertEqual(headers[b"www-authenticate"], [b'Bearer realm="mgpumanager"'])
        self.assertEqual(self.facade.calls, [])

    def test_wrong_token_is_401_and_not_echoed(self) -> None:
        """A wrong token is refused, and neither token appears in the answer."""
        client = self.send(b"GET", b"/v1/status", headers=(b"Authorization: Bearer guess",))
        _, document = self.assertError(client, 401, "unauthorized")
        self.assertNotIn("guess", json.dumps(document))
        self.assertNotIn(self.TOKEN.decode(), json.dumps(document))

    def test_right_token_passes(self) -> None:
        """The configured token reaches the routes."""
        auth = b"Authorization: Bearer " + self.TOKEN
        self.assertEqual(self.send(b"GET", b"/v1/status", headers=(auth,)).response()[0], 200)
        self.send(b"POST", b"/v1/tts", headers=(auth,))
        self.assertEqual([call[:2] for call in self.facade.calls], [("kind", "tts")])

    def test_bearer_scheme_case_insensitive(self) -> None:
        """The scheme name is case-insensitive (RFC 9110); the token itself is not."""
        for scheme in (b"bearer", b"BEARER"):
            auth = b"Authorization: " + scheme + b" " + self.TOKEN
            self.assertEqual(self.send(b"GET", b"/v1/status", headers=(auth,)).response()[0], 200)
        wrong_case = b"Authorization: Bearer " + self.TOKEN.upper()
        self.assertError(
            self.send(b"GET", b"/v1/status", headers=(wrong_case,)), 401, "unauthorized"
        )

    def test_healthz_needs_no_token(self) -> None:
        """/healthz answers without a token, for load balancers and systemd checks."""
        self.assertEqual(self.send(b"GET", b"/healthz").response()[0], 200)


class FakeAdmin:
    """Admin's load and unload: answers or errors the test sets; every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.outcome: dict[str, object] | BrokerError = {}

    async def _act(self, action: str, name: str) -> dict[str, object]:
        self.calls.append((action, name))
        if isinstance(self.outcome, BrokerError):
            raise self.outcome
        return {"consumer": name, "loaded": action == "load", **self.outcome}

    async def load(self, name: str) -> dict[str, object]:
        return await self._act("load", name)

    async def unload(self, name: str) -> dict[str, object]:
        return await self._act("unload", name)


class FakeReloader:
    """Reloader.reload: an answer or an error the test sets."""

    def __init__(self) -> None:
        self.calls = 0
        self.outcome: dict[str, object] | Exception = {"reloaded": True}

    def reload(self) -> dict[str, object]:
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class FakeMetrics:
    """BrokerMetrics.render, as little as the routes here need."""

    def render(self) -> tuple[bytes, str]:
        return b"# metrics\n", "text/plain; version=0.0.4; charset=utf-8"


class OperationsTestCase(ApiTestCase):
    """A BrokerResource serving the operator's routes: fake admin and reloader, real streams."""

    def setUp(self) -> None:
        super().setUp()
        self.admin = FakeAdmin()
        self.reloader = FakeReloader()
        self.bus = EventBus(self.clock)
        self.streams = EventStreams(self.bus, self.clock, delay_s=0)
        self.operations = Operations(
            cast(Admin, self.admin),
            cast(Reloader, self.reloader),
            self.streams,
            cast(BrokerMetrics, FakeMetrics()),
        )
        self.resource.serve_operations(self.operations)

    def json_answer(self, client: Client, status: int = 200) -> Any:
        got, headers, body = client.response()
        self.assertEqual(got, status)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        return json.loads(body)


class BasicAuthTests(OperationsTestCase):
    """Basic credentials (what a browser sends to the dashboard), and changing the token."""

    TOKEN = b"s3cret-token"

    def setUp(self) -> None:
        super().setUp()
        self.resource.set_token(self.TOKEN)

    def basic(self, credentials: bytes) -> bytes:
        return b"Authorization: Basic " + base64.b64encode(credentials)

    def test_token_as_password_accepted(self) -> None:
        """Basic credentials whose password is the token pass, whatever the user name."""
        for user in (b"", b"admin", b"anyone at all"):
            client = self.send(
                b"GET", b"/v1/status", headers=(self.basic(user + b":" + self.TOKEN),)
            )
            self.assertEqual(client.response()[0], 200, user)
        client = self.send(b"GET", b"/", headers=(self.basic(b"me:" + self.TOKEN),))
        self.assertEqual(client.response()[0], 200)

    def test_scheme_name_case_insensitive(self) -> None:
        """The Basic scheme name is matched whatever its case."""
        header = b"Authorization: BASIC " + base64.b64encode(b"u:" + self.TOKEN)
        self.assertEqual(self.send(b"GET", b"/v1/status", headers=(header,)).response()[0], 200)

    def test_wrong_password_refused(self) -> None:
        """A wrong password, the token as user name, or no colon at all is 401."""
        for credentials in (b"u:guess", self.TOKEN + b":", self.TOKEN, b"u:" + self.TOKEN + b"x"):
            client = self.send(b"GET", b"/v1/status", headers=(self.basic(credentials),))
            self.assertError(client, 401, "unauthorized")

    def test_malformed_basic_refused(self) -> None:
        """Credentials that are not base64 are 401, not an error."""
        client = self.send(b"GET", b"/v1/status", headers=(b"Authorization: Basic %%%not-b64",))
        self.assertError(client, 401, "unauthorized")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_challenge_basic_on_dashboard_bearer_elsewhere(self) -> None:
        """A refusal of / asks for Basic credentials (the browser's prompt); elsewhere Bearer."""
        headers, _ = self.assertError(self.send(b"GET", b"/"), 401, "unauthorized")
        self.assertEqual(headers[b"www-authenticate"], [b'Basic realm="mgpumanager"'])
        for uri in (b"/v1/status", b"/v1/events", b"/metrics", b"/v1/admin/reload"):
            headers, _ = self.assertError(self.send(b"GET", uri), 401, "unauthorized")
            self.assertEqual(headers[b"www-authenticate"], [b'Bearer realm="mgpumanager"'], uri)

    def test_operations_need_the_token(self) -> None:
        """Without the token, admin actions and reloads are refused and never run."""
        self.assertError(
            self.send(b"POST", b"/v1/admin/consumers/mvoice/unload"), 401, "unauthorized"
        )
        self.assertError(self.send(b"POST", b"/v1/admin/reload"), 401, "unauthorized")
        self.assertEqual((self.admin.calls, self.reloader.calls), ([], 0))
        self.assertEqual(self.streams.clients, 0)

    def test_set_token_none_turns_auth_off(self) -> None:
        """After set_token(None) every route answers without credentials."""
        self.resource.set_token(None)
        self.assertEqual(self.send(b"GET", b"/v1/status").response()[0], 200)
        self.assertEqual(self.send(b"GET", b"/").response()[0], 200)

    def test_set_token_replaces_the_token(self) -> None:
        """After set_token(new) the old token is refused and the new one accepted."""
        self.resource.set_token(b"new-token")
        old = self.send(b"GET", b"/v1/status", headers=(b"Authorization: Bearer " + self.TOKEN,))
        self.assertError(old, 401, "unauthorized")
        new = self.send(b"GET", b"/v1/status", headers=(b"Authorization: Bearer new-token",))
        self.assertEqual(new.response()[0], 200)

    def test_new_token_ends_open_streams(self) -> None:
        """A changed token ends the event streams opened with the old one; the same token
        set again (a reload that did not touch it) leaves them open."""
        auth = b"Authorization: Bearer " + self.TOKEN
        self.send(b"GET", b"/v1/events", headers=(auth,))
        self.resource.set_token(self.TOKEN)
        self.assertEqual(self.streams.clients, 1)
        self.resource.set_token(b"rotated")
        self.assertEqual(self.streams.clients, 0)


class EventsRouteTests(OperationsTestCase):
    """/v1/events is handed to the event streams."""

    def test_get_streams(self) -> None:
        """GET /v1/events is an open event stream that gets published events."""
        client = self.send(b"GET", b"/v1/events?history=1")
        status, headers, _ = client.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b"text/event-stream; charset=utf-8"])
        self.assertEqual(self.streams.clients, 1)
        self.bus.publish("load", consumer="mvoice", reason="admin")
        self.clock.advance(0)
        self.assertIn(b"event: load\n", client.response()[2])
        client.disconnect()
        self.assertEqual(self.streams.clients, 0)

    def test_other_method_not_allowed(self) -> None:
        """POST /v1/events is 405 with Allow: GET and opens no stream."""
        headers, _ = self.assertError(self.send(b"POST", b"/v1/events"), 405, "method_not_allowed")
        self.assertEqual(headers[b"allow"], [b"GET"])
        self.assertEqual(self.streams.clients, 0)

    def test_not_served_without_operations(self) -> None:
        """A resource serving no operations answers /v1/events with 404 not_found."""
        self.resource.serve_operations(None)
        self.assertError(self.send(b"GET", b"/v1/events"), 404, "not_found")
        self.assertEqual(self.streams.clients, 0)


class AdminRouteTests(OperationsTestCase):
    """POST /v1/admin/consumers/<name>/{load,unload} and POST /v1/admin/reload."""

    def test_load_and_unload(self) -> None:
        """load and unload reach the admin with the name and answer its JSON, not cached."""
        answer = self.json_answer(self.send(b"POST", b"/v1/admin/consumers/mvoice/load"))
        self.assertEqual(answer, {"consumer": "mvoice", "loaded": True})
        client = self.send(b"POST", b"/v1/admin/consumers/comfyui/unload")
        self.assertEqual(self.json_answer(client), {"consumer": "comfyui", "loaded": False})
        self.assertEqual(client.response()[1][b"cache-control"], [b"no-store"])
        self.assertEqual(self.admin.calls, [("load", "mvoice"), ("unload", "comfyui")])

    def test_admin_errors_rendered(self) -> None:
        """A BrokerError from the admin is its status and JSON body."""
        for error, status in (
            (BrokerError("not_found", "no consumer 'x'"), 404),
            (BrokerError("bad_request", "ollama manages its own memory", "ollama"), 400),
            (BrokerError("scheduler_error", "unload of mvoice failed: HTTP 500", "mvoice"), 503),
            (BrokerError("queue_timeout", "waited 600s for the GPU", "mvoice"), 503),
        ):
            self.admin.outcome = error
            client = self.send(b"POST", b"/v1/admin/consumers/mvoice/unload")
            _, document = self.assertError(client, status, error.code, error.consumer)
            self.assertEqual(document, error.to_dict())

    def test_unknown_action_not_found(self) -> None:
        """An action other than load or unload is 404 not_found; the admin is not called."""
        self.assertError(self.send(b"POST", b"/v1/admin/consumers/mvoice/reset"), 404, "not_found")
        self.assertEqual(self.admin.calls, [])

    def test_admin_routes_post_only(self) -> None:
        """GET on an admin route is 405 naming POST; nothing is run."""
        for uri in (b"/v1/admin/consumers/mvoice/load", b"/v1/admin/reload"):
            headers, _ = self.assertError(self.send(b"GET", uri), 405, "method_not_allowed")
            self.assertEqual(headers[b"allow"], [b"POST"])
        self.assertEqual((self.admin.calls, self.reloader.calls), ([], 0))

    def test_reload_answer(self) -> None:
        """POST /v1/admin/reload answers the reloader's JSON."""
        self.reloader.outcome = {"reloaded": True, "added": ["whisper"], "needs_restart": []}
        answer = self.json_answer(self.send(b"POST", b"/v1/admin/reload"))
        self.assertEqual(answer, self.reloader.outcome)

    def test_reload_refused(self) -> None:
        """A bad file is 400 bad_request saying why; the running configuration stays."""
        self.reloader.outcome = ConfigError("/etc/mgpu.yaml", "scheduler.max_queue", "must be >= 1")
        client = self.send(b"POST", b"/v1/admin/reload")
        _, document = self.assertError(client, 400, "bad_request")
        self.assertIn("reload refused", document["message"])
        self.assertIn("scheduler.max_queue: must be >= 1", document["message"])
        self.assertEqual(self.reloader.calls, 1)

    def test_reload_broker_error(self) -> None:
        """A BrokerError from the reloader is rendered as itself."""
        self.reloader.outcome = BrokerError("bad_request", "the demo has no file")
        self.assertError(self.send(b"POST", b"/v1/admin/reload"), 400, "bad_request")

    def test_not_served_without_operations(self) -> None:
        """Without operations the admin routes answer 404 not_found."""
        self.resource.serve_operations(None)
        self.assertError(self.send(b"POST", b"/v1/admin/reload"), 404, "not_found")
        self.assertError(self.send(b"POST", b"/v1/admin/consumers/mvoice/load"), 404, "not_found")


class RequestTargetTests(OperationsTestCase):
    """Request targets with bytes outside VCHAR (0x21-0x7E) are refused before any route."""

    #: Targets whose odd bytes (DEL, 0x80-0xB0) Twisted's request-line parser lets through.
    ODD_TARGETS = (
        (b"POST", b"/v1/tts?x=\x7f"),
        (b"POST", b"/v1/stt?x=\x80"),
        (b"GET", b"/audio/a\x90.wav"),
        (b"GET", b"/v1/events?\x7f"),
        (b"POST", b"/v1/admin/consumers/mvoice\xa0/load"),
        (b"POST", b"/v1/admin/reload?\x7f"),
        (b"GET", b"/metrics?\x80"),
        (b"GET", b"/v1/status?x=\xb0"),
        (b"GET", b"/healthz?\x7f"),
        (b"GET", b"/?\x7f"),
        (b"GET", b"/nowhere\x80"),
    )

    def test_refused_on_every_route(self) -> None:
        """A target with DEL or a byte in 0x80-0xB0 is 400 bad_request on every route, and
        neither the facade, the admin, the reloader nor the event streams act on it; the
        same bytes percent-encoded (VCHAR) reach the facade as sent."""
        for method, uri in self.ODD_TARGETS:
            self.assertError(self.send(method, uri), 400, "bad_request")
        self.assertEqual(self.facade.calls, [])
        self.assertEqual((self.admin.calls, self.reloader.calls), ([], 0))
        self.assertEqual(self.streams.clients, 0)
        self.assertEqual(self.send(b"POST", b"/v1/tts?x=%FF%7F%00").response()[0], 200)
        self.assertEqual(self.facade.requests[0].uri, b"/v1/tts?x=%FF%7F%00")

    def test_refused_before_auth(self) -> None:
        """With a token configured, an odd target is still 400 bad_request, not 401."""
        self.resource.set_token(b"s3cret-token")
        self.assertError(self.send(b"POST", b"/v1/tts?x=\x7f"), 400, "bad_request")
        self.assertEqual(self.facade.calls, [])

    def test_any_byte_outside_vchar_refused_by_the_resource(self) -> None:
        """Whatever the HTTP parser in front lets through, the resource itself refuses a
        target with a NUL, a control byte, a space, DEL or any byte over 0x7E."""
        for byte in (b"\x00", b"\x01", b"\t", b" ", b"\x7f", b"\x80", b"\xb1", b"\xff"):
            request: Any = DummyRequest([])
            request.method = b"POST"
            request.uri = b"/v1/tts?x=" + byte
            request.path = b"/v1/tts"
            body = self.resource.render(request)
            self.assertEqual(request.responseCode, 400, byte)
            self.assertIsInstance(body, bytes)
            self.assertEqual(json.loads(cast(bytes, body))["error"], "bad_request")
        self.assertEqual(self.facade.calls, [])


#: Pieces of hostile paths: dots, slashes and their percent-encodings, and the rest.
_PATH_PIECES = st.one_of(
    st.sampled_from(["/", ".", "..", "%2e", "%2E", "%2f", "%5c", "%00", "%25", "\\", "?", "a"]),
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
)


class NativeRoutingTests(ApiTestCase):
    """Requests under a consumer's native prefix: to serve_native, or refused."""

    REFUSED = (
        b"/ollama/../v1/status",
        b"/ollama/api/../../etc/passwd",
        b"/ollama/..",
        b"/ollama/./api/tags",
        b"/ollama/api/.",
        b"/ollama//etc/passwd",
        b"/ollama/api//tags",
        b"/ollama/a\\..\\b",
        b"/ollama/%2e%2e/v1/status",
        b"/ollama/%2E%2E/x",
        b"/ollama/.%2e/x",
        b"/ollama/api%2ftags",
        b"/ollama/api%2Ftags",
        b"/ollama/a%5cb",
        b"/ollama/a%00",
        b"/ollama/http://evil.example/x",
        b"/comfyui/view/..?filename=x",
    )

    def setUp(self) -> None:
        super().setUp()
        self.facade.config = native_config()

    def test_under_prefix_reaches_serve_native(self) -> None:
        """GET and POST under a prefix reach serve_native with the consumer, the target after
        the prefix with its query, the method and the body; the answer ends."""
        client = self.send(b"GET", b"/comfyui/view?filename=x&type=output")
        self.send(b"POST", b"/ollama/api/generate", b'{"model": "m"}')
        self.assertEqual(
            self.facade.native,
            [
                ("comfyui", b"/view?filename=x&type=output", b"GET", b""),
                ("ollama", b"/api/generate", b"POST", b'{"model": "m"}'),
            ],
        )
        self.assertEqual(client.response()[::2], (200, b"served"))
        self.assertEqual(self.facade.calls, [])

    def test_prefix_itself_is_the_root(self) -> None:
        """The prefix with a slash, or alone with another method than GET or HEAD, is the
        consumer's "/"; the query is kept."""
        for method, uri in ((b"GET", b"/ollama/"), (b"GET", b"/ollama/?x=/../y"),
                            (b"GET", b"/ollama/?"), (b"POST", b"/ollama"),
                            (b"OPTIONS", b"/ollama?x=1")):  # fmt: skip
            self.send(method, uri)
        self.assertEqual(
            [(method, target) for _, target, method, _ in self.facade.native],
            [(b"GET", b"/"), (b"GET", b"/?x=/../y"), (b"GET", b"/?"), (b"POST", b"/"),
             (b"OPTIONS", b"/?x=1")],
        )  # fmt: skip

    def test_bare_prefix_redirected_to_its_slash(self) -> None:
        """GET or HEAD of the prefix without its trailing slash is 301 to the prefix with it,
        the query kept, so that a page's relative URLs resolve under the prefix; the facade
        never sees it."""
        for method, uri, location in (
            (b"GET", b"/comfyui", b"/comfyui/"),
            (b"HEAD", b"/comfyui", b"/comfyui/"),
            (b"GET", b"/ollama?x=/../y&z", b"/ollama/?x=/../y&z"),
            (b"GET", b"/ollama?", b"/ollama/?"),
        ):
            status, headers, body = self.send(method, uri).response()
            self.assertEqual((status, headers[b"location"], body), (301, [location], b""), uri)
        self.assertEqual(self.facade.native, [])
        request: Any = DummyRequest([])
        request.method = b"GET"
        request.uri = request.path = b"/comfyui"
        self.resource.render(request)
        self.assertEqual(request.responseCode, 301)
        self.assertEqual((route_label(cast(TimedRequest, request)), request.consumer),
                         ("native", "comfyui"))  # fmt: skip

    def test_every_method_passes(self) -> None:
        """A native API is the consumer's: any method reaches it, none is 405."""
        methods = (b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"PROPFIND")
        for method in methods:
            self.send(method, b"/ollama/api/x")
        self.assertEqual([m for _, _, m, _ in self.facade.native], list(methods))

    def test_prefix_is_matched_by_whole_segments(self) -> None:
        """/ollamax, another case, an encoded letter or the prefix further in is no native
        route: 404 not_found, and nothing reaches the facade."""
        for uri in (b"/ollamax", b"/ollamax/api", b"/Ollama/api", b"/x/ollama/api",
                    b"/%6Fllama/api", b"/native/ollama"):  # fmt: skip
            self.assertError(self.send(b"GET", uri), 404, "not_found")
        self.assertEqual(self.facade.native, [])

    def test_path_tricks_refused(self) -> None:
        """Traversal, empty segments, backslashes, encoded dots, slashes or NULs under a prefix
        are 400 bad_request, as for /audio; the facade never sees them."""
        for uri in self.REFUSED:
            for method in (b"GET", b"POST"):
                self.assertError(self.send(method, uri), 400, "bad_request")
        self.assertEqual(self.facade.native, [])

    def test_absolute_form_refused(self) -> None:
        """An absolute-form target whose path is under a native prefix is 400 bad_request."""
        for uri in (b"http://host/ollama/api/tags", b"https://h:1/comfyui?x=1", b"http://h/ollama"):
            self.assertError(self.send(b"GET", uri), 400, "bad_request")
        self.assertEqual(self.facade.native, [])

    def test_reload_changes_the_prefixes(self) -> None:
        """A reloaded configuration's prefixes are the ones routed from then on."""
        self.facade.config = make_config()
        self.assertError(self.send(b"GET", b"/ollama/api/tags"), 404, "not_found")
        self.facade.config = native_config()
        self.send(b"GET", b"/ollama/api/tags")
        self.assertEqual(self.facade.native, [("ollama", b"/api/tags", b"GET", b"")])

    def test_several_hosts_refused_before_the_facade(self) -> None:
        """Two Host headers on a native route (the Host is sent on) are 400 bad_request."""
        client = self.send(b"GET", b"/ollama/api/tags", headers=(b"Host: other.example",))
        self.assertError(client, 400, "bad_request")
        self.assertEqual(self.facade.native, [])

    def test_route_noted_for_logs_and_metrics(self) -> None:
        """A native request, served or refused, is labelled "native": a bounded label."""
        self.send(b"GET", b"/ollama/api/tags?x=1")
        request = cast(TimedRequest, self.facade.requests[0])
        self.assertEqual((route_label(request), request.consumer), ("native", "ollama"))
        refused: Any = DummyRequest([])
        refused.method = b"GET"
        refused.uri = refused.path = b"/ollama/.."
        self.resource.render(refused)
        self.assertEqual(refused.responseCode, 400)
        self.assertEqual(route_label(cast(TimedRequest, refused)), "native")

    def test_websocket_without_hook_is_bad_request(self) -> None:
        """Upgrade: websocket under a prefix is 400 bad_request while no tunnel is there;
        other upgrades are ordinary requests (the relay drops Upgrade)."""
        client = self.send(
            b"GET",
            b"/comfyui/ws?clientId=c",
            headers=(b"Upgrade: websocket", b"Connection: Upgrade"),
        )
        _, document = self.assertError(client, 400, "bad_request")
        self.assertIn("WebSocket", document["message"])
        self.assertEqual(self.facade.native, [])
        self.send(b"GET", b"/comfyui/x", headers=(b"Upgrade: h2c", b"Connection: Upgrade"))
        self.assertEqual(self.facade.native, [("comfyui", b"/x", b"GET", b"")])

    def test_websocket_goes_to_the_hook(self) -> None:
        """With a serve_websocket hook, Upgrade: websocket (any case, in a list) goes to it with
        the consumer and the target; serve_native is not called; its answer ends."""
        self.facade = WebSocketFacade()
        self.facade.config = native_config()
        self.resource = BrokerResource(cast(Facade, self.facade), self.status)
        for upgrade in (b"websocket", b"WebSocket", b"foo, websocket"):
            client = self.send(b"GET", b"/comfyui/ws?clientId=c", headers=(b"Upgrade: " + upgrade,))
            self.assertEqual(client.response()[::2], (502, b"no tunnel"))
            self.assertTrue(client.transport.value().endswith(b"0\r\n\r\n"))
        self.assertEqual(self.facade.upgrades, [("comfyui", b"/ws?clientId=c")] * 3)
        self.assertEqual(self.facade.native, [])

    def test_websocket_hook_may_take_the_connection(self) -> None:
        """A hook that took the connection from the channel gets nothing more written on it."""
        facade = WebSocketFacade()
        facade.config = native_config()
        facade.takeover = True
        self.resource = BrokerResource(cast(Facade, facade), self.status)
        client = self.send(b"GET", b"/comfyui/ws", headers=(b"Upgrade: websocket",))
        self.assertEqual(
            client.transport.value(), b"HTTP/1.1 101 Switching Protocols\r\n\r\nframes"
        )
        del client
        gc.collect()  # an error left in the request's Deferred is logged when it is collected
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_native_target(self) -> None:
        """native_target: the rest after the prefix, "/" if none, the query as sent."""
        for uri, target in (
            (b"/o", b"/"),
            (b"/o?x", b"/?x"),
            (b"/o/a.b/..c/...", b"/a.b/..c/..."),
            (b"/o/a%20b?next=/../x", b"/a%20b?next=/../x"),
        ):
            self.assertEqual(native_target(b"/o", uri), target)
        for uri in (b"/ox", b"/x/o", b"/o/..", b"/o//x", b"/o/%2e"):
            self.assertRaises(BrokerError, native_target, b"/o", uri)

    @settings(max_examples=examples(300), deadline=None)
    @given(st.lists(_PATH_PIECES, max_size=24).map("".join))
    def test_targets_never_leave_the_consumer_root(self, rest: str) -> None:
        """Whatever printable path follows a prefix, the request is refused with 400 (or is no
        native route at all), or its target, decoded, stays under "/" with no dot segments."""
        self.facade.native.clear()
        client = self.send(b"GET", b"/ollama" + rest.encode("ascii"))
        status = client.response()[0]
        if not self.facade.native:
            bare = rest.partition("?")[0] == ""
            self.assertIn(status, (301,) if bare else (400, 404), rest)
            return
        [(_, target, _, _)] = self.facade.native
        path = unquote(target.partition(b"?")[0].decode("ascii"))
        self.assertTrue(path.startswith("/"), target)
        self.assertNotIn("\\", path)
        self.assertNotIn("\x00", path)
        segments = path.split("/")[1:]
        self.assertFalse({".", ".."} & set(segments), target)
        self.assertNotIn("", segments[:-1], target)
        self.assertEqual(posixpath.normpath(path).lstrip("/"), path.strip("/"), target)


class NativeAuthTests(ApiTestCase):
    """With a token, native routes need it too, and ask a browser for Basic credentials."""

    TOKEN = b"s3cret-token"

    def setUp(self) -> None:
        super().setUp()
        self.facade.config = native_config()
        self.resource = BrokerResource(cast(Facade, self.facade), self.status, self.TOKEN)

    def test_refusal_asks_for_basic(self) -> None:
        """Without the token a native route is 401 with WWW-Authenticate: Basic; the facade's
        routes still say Bearer."""
        for method, uri in ((b"GET", b"/comfyui/"), (b"POST", b"/ollama/api/generate"),
                            (b"GET", b"/ollama")):  # fmt: skip
            headers, _ = self.assertError(self.send(method, uri), 401, "unauthorized")
            self.assertEqual(headers[b"www-authenticate"], [b'Basic realm="mgpumanager"'], uri)
        for uri in (b"/ollamax", b"/v1/status"):
            headers, _ = self.assertError(self.send(b"GET", uri), 401, "unauthorized")
            self.assertEqual(headers[b"www-authenticate"], [b'Bearer realm="mgpumanager"'], uri)
        self.assertEqual(self.facade.native, [])

    def test_token_as_basic_password_or_bearer_passes(self) -> None:
        """Any user name with the token as password, or the bearer token, reaches the consumer;
        a wrong password does not."""
        basic = b"Authorization: Basic " + base64.b64encode(b"me:" + self.TOKEN)
        bearer = b"Authorization: Bearer " + self.TOKEN
        for auth in (basic, bearer):
            self.assertEqual(self.send(b"GET", b"/comfyui/", headers=(auth,)).response()[0], 200)
        wrong = b"Authorization: Basic " + base64.b64encode(b"me:guess")
        self.assertError(self.send(b"GET", b"/comfyui/", headers=(wrong,)), 401, "unauthorized")
        self.assertEqual([c for c, _, _, _ in self.facade.native], ["comfyui", "comfyui"])
