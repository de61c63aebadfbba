"""Tests for mgpu.facade: one request from the health gate through the GPU lease to the relay.

Everything is real but the network: the relay's upstream client connects through a
``MemoryReactorClock`` that the test joins to in-memory consumer sites with
iosim pumps; the prober and the ``hold_until`` polls go through ``StubTreq``
to the same consumer resources; the client is an ``HTTPChannel`` over a
``StringTransport``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from attrs import evolve
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectBindError, ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mgpu.config import (
    Config,
    ConsumerConfig,
    GpuRoute,
    HealthConfig,
    HoldUntil,
    KindPath,
    NativeConfig,
    Route,
)
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.facade import Facade
from mgpu.registry import HealthProber, Registry
from mgpu.relay import Relay, RelayBroken
from mgpu.scheduler import GpuScheduler
from mgpu.upstream import UpstreamClient

CLIENT_ADDRESS = IPv4Address("TCP", "10.0.0.7", 40000)

MVOICE = ConsumerConfig(
    name="mvoice",
    url="http://127.0.0.1:8765",
    health=Route("GET", "/api/health"),
    paths={
        "tts": KindPath("POST", "/api/synthesize"),
        "stt": KindPath("POST", "/api/transcribe"),
    },
    vram_resident_mib=2800,
    timeout_s=300.0,
)
OLLAMA = ConsumerConfig(
    name="ollama",
    url="http://127.0.0.1:11434",
    health=Route("GET", "/api/version"),
    paths={"llm": KindPath("POST", "/api/generate")},
    vram_resident_mib=6000,
    vram_managed=True,
    timeout_s=300.0,
)
COMFYUI = ConsumerConfig(
    name="comfyui",
    url="http://127.0.0.1:8188",
    health=Route("GET", "/system_stats"),
    paths={
        "image": KindPath(
            "POST", "/prompt", hold_until=HoldUntil("/history/{prompt_id}", interval_s=0.5)
        )
    },
    vram_resident_mib=13000,
    timeout_s=60.0,
)


#: Ollama under /ollama, every POST scheduled; ComfyUI under /comfyui, two kinds of POST.
NATIVE_OLLAMA = evolve(OLLAMA, native=NativeConfig("/ollama"))
NATIVE_COMFYUI = evolve(
    COMFYUI,
    native=NativeConfig(
        "/comfyui",
        (
            GpuRoute("POST", "/prompt", HoldUntil("/job/{prompt_id}", interval_s=0.25)),
            GpuRoute("POST", "/api/*/run"),
        ),
    ),
)


def native_config(**overrides: Any) -> Config:
    """``make_config`` with Ollama and ComfyUI also published under their native prefixes."""
    consumers = {c.name: c for c in (MVOICE, NATIVE_OLLAMA, NATIVE_COMFYUI)}
    return make_config(consumers=consumers, **overrides)


def make_config(**overrides: Any) -> Config:
    """mvoice (tts, stt, /audio), ollama (llm) and comfyui (image, with hold_until)."""
    fields: dict[str, Any] = {
        "consumers": {c.name: c for c in (MVOICE, OLLAMA, COMFYUI)},
        "routing": {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"},
        "audio_proxy": "mvoice",
        "health": HealthConfig(interval_s=5.0, timeout_s=3.0),
    }
    fields.update(overrides)
    return Config(**fields)


def parse_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Status code, lower-cased headers and de-chunked body of one HTTP/1.1 answer."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers.setdefault(name.lower(), []).append(value)
    if headers.get(b"transfer-encoding") != [b"chunked"]:
        return int(status_line.split()[1]), headers, rest
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return int(status_line.split()[1]), headers, body


class FakeConsumer(Resource):
    """An in-memory consumer: fixed answers by (method, path); anything else waits for the test.

    Every request is recorded as (method, uri, body).
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.answers: dict[tuple[bytes, bytes], tuple[int, bytes]] = {}
        self.received: list[tuple[bytes, bytes, bytes]] = []
        self.held: list[Request] = []
        self.lost: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.path is not None
        assert request.content is not None
        self.received.append((request.method, request.uri, request.content.read()))
        answer = self.answers.get((request.method, request.path))
        if answer is None:
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: self.lost.append(request))
            return NOT_DONE_YET
        code, body = answer
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return body

    def answer(self, method: bytes, path: bytes, code: int, body: bytes) -> None:
        """Answer every later ``method path`` request at once with ``code`` and ``body``."""
        self.answers[(method, path)] = (code, body)

    def uris(self, method: bytes) -> list[bytes]:
        """The URIs of the requests received with ``method``, in order."""
        return [uri for m, uri, _ in self.received if m == method]


class ByHost(Resource):
    """StubTreq's root: hands each request to the consumer its Host header names."""

    isLeaf = True

    def __init__(self, by_host: Mapping[bytes, Resource]) -> None:
        super().__init__()
        self._by_host = by_host

    def render(self, request: Request) -> bytes | int:
        host = request.getHeader(b"host")
        assert host is not None
        return self._by_host[host].render(request)


class _Front(Resource):
    """The broker side of the client's connection: hands each request to the test."""

    isLeaf = True

    def __init__(self, handle: Callable[[Request], None]) -> None:
        super().__init__()
        self._handle = handle

    def render(self, request: Request) -> int:
        self._handle(request)
        return NOT_DONE_YET


class Client:
    """One client connection to the broker carrying one request."""

    def __init__(self, front: Resource) -> None:
        self.transport = StringTransport(peerAddress=CLIENT_ADDRESS)
        site = Site(front, reactor=Clock(), parsePOSTFormSubmission=False)
        channel = site.buildProtocol(CLIENT_ADDRESS)
        assert channel is not None
        self.channel = channel
        channel.makeConnection(self.transport)

    def send(
        self, method: bytes, uri: bytes, body: bytes = b"", headers: tuple[bytes, ...] = ()
    ) -> None:
        lines = [b"%s %s HTTP/1.1" % (method, uri), b"Host: broker.local", *headers]
        if body:
            lines += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
        self.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def response(self) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        return parse_response(self.transport.value())

    def disconnect(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class Broker:
    """A Facade over a real Relay, GpuScheduler, Registry, HealthProber and ConsumerControl."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or make_config()
        self.reactor = MemoryReactorClock()
        self.consumers = {name: FakeConsumer(name) for name in self.config.consumers}
        self.sites: dict[int, Site] = {}
        by_host: dict[bytes, FakeConsumer] = {}
        for name, consumer in self.config.consumers.items():
            url = urlsplit(consumer.url)
            assert url.port is not None
            self.sites[url.port] = Site(self.consumers[name], reactor=Clock())
            by_host[url.netloc.encode("ascii")] = self.consumers[name]
        self.refusing: set[int] = set()
        #: Every client request handed to the facade, in order.
        self.requests: list[Request] = []
        #: Connections to these ports fail as a daemon out of file descriptors does.
        self.exhausted: set[int] = set()
        self.pumps: list[IOPump] = []
        self.stub = StubTreq(ByHost(by_host))
        self.control = ConsumerControl(cast(HTTPClient, self.stub), self.reactor)
        self.events = EventBus(self.reactor)
        self.registry = Registry(self.config.consumers, self.reactor, self.events)
        self.prober = HealthProber(self.registry, self.control, self.reactor, self.config.health)
        self.scheduler = GpuScheduler(self.registry, self.reactor)
        self.relay = Relay(UpstreamClient(self.reactor, max_idle=0), self.reactor)
        self.facade = Facade(
            config=self.config,
            registry=self.registry,
            prober=self.prober,
            scheduler=self.scheduler,
            relay=self.relay,
            control=self.control,
            clock=self.reactor,
            events=self.events,
        )
        for fake in self.consumers.values():
            fake.answer(b"GET", consumer_health_path(self.config, fake.name), 200, b"{}")

    # -- the network -----------------------------------------------------

    def pump(self) -> None:
        """Accept (or refuse) pending connections and move bytes until nothing moves."""
        for _ in range(20):
            moved = False
            while self.reactor.tcpClients:
                _, port, factory, _, _ = self.reactor.tcpClients.pop(0)
                connector = self.reactor.connectors.pop(0)
                moved = True
                if port in self.refusing:
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                    continue
                if port in self.exhausted:
                    no_socket = ConnectBindError(errno.EMFILE, "Too many open files")
                    factory.clientConnectionFailed(connector, Failure(no_socket))
                    continue
                server = self.sites[port].buildProtocol(None)
                client = factory.buildProtocol(None)
                assert server is not None and client is not None
                self.pumps.append(
                    connect(
                        server, FakeTransport(server, isServer=True),
                        client, FakeTransport(client, isServer=False),
                        clock=self.reactor,
                    )
                )  # fmt: skip
            for pump in self.pumps:
                moved = pump.flush() or moved
            self.stub.flush()
            if not moved and not self.reactor.tcpClients:
                return

    # -- clients ---------------------------------------------------------

    def post(
        self, kind: str, body: bytes = b"{}", query: bytes = b"", headers: tuple[bytes, ...] = ()
    ) -> tuple[Client, Deferred[None]]:
        """Send ``POST /v1/<kind>`` to the facade; the request is finished when it succeeds."""
        return self._send(
            b"POST", b"/v1/" + kind.encode() + query, body,
            lambda request: self.facade.serve_kind(request, kind), headers,
        )  # fmt: skip

    def get_audio(self, uri: bytes, method: bytes = b"GET") -> tuple[Client, Deferred[None]]:
        """Send ``GET /audio/...`` to the facade."""
        return self._send(method, uri, b"", lambda r: self.facade.serve_audio(r, r.uri))

    def native(
        self,
        name: str,
        method: bytes,
        target: bytes,
        body: bytes = b"",
        headers: tuple[bytes, ...] = (),
    ) -> tuple[Client, Deferred[None]]:
        """Send ``method <prefix><target>`` to ``serve_native`` as the router would."""
        consumer = self.config.consumers[name]
        assert consumer.native is not None
        uri = consumer.native.prefix.encode("ascii") + target
        return self._send(
            method, uri, body, lambda r: self.facade.serve_native(r, consumer, target), headers
        )

    def _send(
        self,
        method: bytes,
        uri: bytes,
        body: bytes,
        serve: Callable[[Request], Coroutine[Any, Any, None]],
        headers: tuple[bytes, ...] = (),
    ) -> tuple[Client, Deferred[None]]:
        results: list[Deferred[None]] = []

        def handle(request: Request) -> None:
            self.requests.append(request)
            d = Deferred.fromCoroutine(serve(request))

            def finish(_: None) -> None:
                if not request.finished and getattr(request, "channel", None) is not None:
                    request.finish()

            d.addCallback(finish)
            results.append(d)

        client = Client(_Front(handle))
        client.send(method, uri, body, headers)
        self.pump()
        [result] = results
        return client, result


def consumer_health_path(config: Config, name: str) -> bytes:
    return config.consumers[name].health.path.encode("ascii")


class FacadeTestCase(SynchronousTestCase):
    """Shared set-up: a Broker with mvoice, ollama and comfyui, all healthy."""

    def setUp(self) -> None:
        self.broker = self.make_broker()
        self.reactor = self.broker.reactor
        self.registry = self.broker.registry
        self.scheduler = self.broker.scheduler
        self.mvoice = self.broker.consumers["mvoice"]
        self.ollama = self.broker.consumers["ollama"]
        self.comfyui = self.broker.consumers["comfyui"]

    def make_broker(self) -> Broker:
        return Broker()

    def reply(
        self,
        consumer: FakeConsumer,
        code: int = 200,
        body: bytes = b"",
        *,
        finish: bool = True,
    ) -> Request:
        """Have ``consumer`` answer its oldest held request."""
        upstream = consumer.held.pop(0)
        upstream.setResponseCode(code)
        upstream.setHeader(b"content-type", b"application/json")
        upstream.write(body)
        if finish:
            upstream.finish()
        self.broker.pump()
        return upstream

    def assertBrokerError(self, result: Deferred[None], code: str, consumer: str) -> BrokerError:
        error = self.failureResultOf(result, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual((error.code, error.consumer), (code, consumer))
        return error

    def assertLeaseFree(self) -> None:
        self.assertEqual((self.scheduler.holder, self.scheduler.running), (None, 0))
        self.assertEqual(
            {name: s.in_flight for name, s in self.registry.states.items()},
            dict.fromkeys(self.registry.states, 0),
        )

    def assertNoTimers(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ServeKindTests(FacadeTestCase):
    """Facade.serve_kind for consumers that answer once their work is done."""

    def test_slow_reader_does_not_hold_the_lease(self) -> None:
        """A client that reads nothing: the lease is released once the consumer's answer is
        complete, the next request runs, and the slow client still gets its whole answer."""
        slow, slow_done = self.broker.post("tts")
        upstream = self.mvoice.held.pop(0)
        upstream.setResponseCode(200)
        upstream.write(b"")
        self.broker.pump()
        producer = slow.transport.producer
        assert producer is not None
        producer.pauseProducing()
        big = b"0123456789" * 200_000  # 2 MB: over the memory part, into a file
        for at in range(0, len(big), 65536):
            upstream.write(big[at : at + 65536])
            self.broker.pump()
        upstream.finish()
        self.broker.pump()
        self.assertLeaseFree()
        self.assertNoResult(slow_done)
        _, next_done = self.broker.post("stt")
        self.reply(self.mvoice, 200, b"{}")
        self.successResultOf(next_done)
        producer.resumeProducing()
        self.successResultOf(slow_done)
        code, _, body = slow.response()
        self.assertEqual((code, body), (200, big))
        self.assertEqual(self.scheduler.stats.completed, 2)

    def test_reaches_routed_consumer_path_with_query(self) -> None:
        """POST /v1/tts?voice=a reaches mvoice's /api/synthesize?voice=a with the body."""
        _, result = self.broker.post("tts", b'{"text": "hi"}', query=b"?voice=a&fmt=wav")
        self.assertEqual(
            self.mvoice.received[-1],
            (b"POST", b"/api/synthesize?voice=a&fmt=wav", b'{"text": "hi"}'),
        )
        self.assertEqual(self.ollama.uris(b"POST") + self.comfyui.uris(b"POST"), [])
        self.assertNoResult(result)

    def test_other_kind_same_consumer(self) -> None:
        """POST /v1/stt reaches the stt path of the same consumer, not its tts path."""
        self.broker.post("stt", b"RIFF")
        self.assertEqual(self.mvoice.uris(b"POST"), [b"/api/transcribe"])

    def test_answer_comes_back(self) -> None:
        """The consumer's status, headers and body reach the client, and the request completes."""
        client, result = self.broker.post("llm")
        upstream = self.ollama.held[0]
        upstream.setHeader(b"x-model", b"llama3")
        self.reply(self.ollama, 201, b'{"response": "hello"}')
        self.successResultOf(result)
        status, headers, body = client.response()
        self.assertEqual(status, 201)
        self.assertEqual(headers[b"x-model"], [b"llama3"])
        self.assertEqual(body, b'{"response": "hello"}')
        self.assertEqual(self.scheduler.stats.completed, 1)
        self.assertLeaseFree()
        self.assertNoTimers()

    def test_consumer_error_counts_completed(self) -> None:
        """A consumer's own 500 reaches the client unchanged and counts as completed, not failed."""
        client, result = self.broker.post("tts")
        self.reply(self.mvoice, 500, b'{"detail": "boom"}')
        self.successResultOf(result)
        self.assertEqual(client.response()[::2], (500, b'{"detail": "boom"}'))
        self.assertEqual((self.scheduler.stats.completed, self.scheduler.stats.failed), (1, 0))

    def test_lease_held_while_consumer_works(self) -> None:
        """While the consumer has not answered, its request holds the lease and counts in flight."""
        self.broker.post("tts")
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("mvoice", 1))
        self.assertEqual(self.registry["mvoice"].in_flight, 1)
        self.assertEqual(self.scheduler.stats.completed, 0)

    def test_error_answer_does_not_mark_loaded(self) -> None:
        """A consumer's 4xx or 5xx proves nothing was loaded (ComfyUI refuses a bad prompt
        before loading): the broker's record stays unloaded."""
        self.mvoice.answer(b"GET", b"/api/health", 200, b'{"loaded": false}')
        for code in (400, 500):
            _, result = self.broker.post("tts")
            self.reply(self.mvoice, code, b'{"error": "bad prompt"}')
            self.successResultOf(result)
            self.assertIs(self.registry["mvoice"].loaded, False, code)

    def test_mark_loaded_after_answer(self) -> None:
        """A consumer whose probe reported loaded: false counts as loaded once it has answered."""
        self.mvoice.answer(b"GET", b"/api/health", 200, b'{"loaded": false}')
        _, result = self.broker.post("tts")
        self.assertIs(self.registry["mvoice"].loaded, False)
        generation = self.registry["mvoice"].generation
        self.reply(self.mvoice, 200, b"RIFF")
        self.successResultOf(result)
        self.assertIs(self.registry["mvoice"].loaded, True)
        self.assertEqual(self.registry["mvoice"].generation, generation + 1)
        self.assertIsNotNone(self.registry["mvoice"].last_used)

    def test_requests_to_two_consumers_never_overlap(self) -> None:
        """The second request reaches its consumer only after the first's answer has ended."""
        _, first = self.broker.post("tts")
        _, second = self.broker.post("llm")
        self.assertEqual(self.ollama.uris(b"POST"), [])
        self.assertEqual(self.registry["ollama"].queued, 1)
        upstream = self.reply(self.mvoice, 200, b"part one", finish=False)
        self.assertEqual(self.ollama.uris(b"POST"), [])
        upstream.finish()
        self.broker.pump()
        self.successResultOf(first)
        self.assertEqual(self.ollama.uris(b"POST"), [b"/api/generate"])
        self.assertEqual(self.scheduler.holder, "ollama")
        self.reply(self.ollama, 200, b"{}")
        self.successResultOf(second)
        self.assertLeaseFree()

    def test_no_consumer(self) -> None:
        """A kind that routing does not name fails with no_consumer, nothing sent anywhere."""
        broker = Broker(make_config(routing={"tts": "mvoice"}))
        _, result = broker.post("llm")
        error = self.failureResultOf(result, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual((error.code, error.status, error.consumer), ("no_consumer", 404, None))
        self.assertEqual(broker.consumers["ollama"].received, [])
        self.assertEqual(broker.reactor.tcpClients, [])


class HealthGateTests(FacadeTestCase):
    """The health gate in front of the scheduler."""

    def test_never_probed_is_probed_first(self) -> None:
        """A consumer never probed is probed before its first request is sent."""
        self.assertIsNone(self.registry["mvoice"].healthy)
        self.broker.post("tts")
        self.assertEqual(
            [(m, uri) for m, uri, _ in self.mvoice.received],
            [(b"GET", b"/api/health"), (b"POST", b"/api/synthesize")],
        )
        self.assertIs(self.registry["mvoice"].healthy, True)

    def test_waits_for_the_probe(self) -> None:
        """While the first probe is unanswered, the request waits and holds nothing."""
        del self.mvoice.answers[(b"GET", b"/api/health")]
        _, result = self.broker.post("tts")
        self.assertEqual(self.mvoice.uris(b"POST"), [])
        self.assertIsNone(self.scheduler.holder)
        self.reply(self.mvoice, 200, b"{}")
        self.assertEqual(self.mvoice.uris(b"POST"), [b"/api/synthesize"])
        self.assertNoResult(result)

    def test_probed_once_not_again(self) -> None:
        """A consumer already probed healthy is not probed again before a request."""
        self.successResultOf(self.broker.prober.probe("mvoice"))
        self.broker.post("tts")
        self.assertEqual(self.mvoice.uris(b"GET"), [b"/api/health"])

    def test_last_probe_failed(self) -> None:
        """A consumer whose last probe failed gets 502 consumer_unreachable at once, as rejected."""
        self.mvoice.answer(b"GET", b"/api/health", 503, b"starting")
        self.successResultOf(self.broker.prober.probe("mvoice"))
        _, result = self.broker.post("tts")
        error = self.assertBrokerError(result, "consumer_unreachable", "mvoice")
        self.assertEqual((error.status, error.retryable), (502, True))
        self.assertEqual(
            error.message,
            "upstream mvoice last probe failed: GET http://127.0.0.1:8765/api/health: HTTP 503",
        )
        self.assertEqual(self.mvoice.uris(b"POST"), [])
        self.assertEqual(self.broker.reactor.tcpClients, [])
        self.assertEqual(self.pumps_opened(), 0)
        stats = self.scheduler.stats
        self.assertEqual((stats.rejected, stats.failed, stats.completed), (1, 0, 0))
        self.assertLeaseFree()

    def test_first_probe_fails(self) -> None:
        """A never-probed consumer whose first probe fails is refused without being called."""
        self.mvoice.answer(b"GET", b"/api/health", 500, b"")
        _, result = self.broker.post("tts")
        self.assertBrokerError(result, "consumer_unreachable", "mvoice")
        self.assertEqual(self.mvoice.uris(b"POST"), [])
        self.assertEqual(self.scheduler.stats.rejected, 1)

    def test_unhealthy_does_not_block_others(self) -> None:
        """A refused request leaves the lease free: the next consumer's request runs at once."""
        self.mvoice.answer(b"GET", b"/api/health", 500, b"")
        _, refused = self.broker.post("tts")
        self.failureResultOf(refused, BrokerError)
        self.broker.post("llm")
        self.assertEqual(self.ollama.uris(b"POST"), [b"/api/generate"])

    def pumps_opened(self) -> int:
        return len(self.broker.pumps)


class ConsumerGoneTests(FacadeTestCase):
    """Consumers that refuse or drop the relayed connection."""

    def test_connection_refused(self) -> None:
        """A refused connection is 502 consumer_unreachable; the registry marks it unhealthy."""
        self.broker.refusing.add(8765)
        _, result = self.broker.post("tts")
        error = self.assertBrokerError(result, "consumer_unreachable", "mvoice")
        self.assertIn("refused", error.message)
        state = self.registry["mvoice"]
        self.assertIs(state.healthy, False)
        self.assertEqual(state.last_error, error.message)
        self.assertEqual(self.scheduler.stats.failed, 1)
        self.assertLeaseFree()
        self.assertNoTimers()

    def test_daemon_out_of_descriptors(self) -> None:
        """EMFILE on the connect is the daemon's own limit: 503 daemon_overloaded with
        Retry-After, the lease released, and the consumer not marked unhealthy."""
        self.broker.exhausted.add(8765)
        _, result = self.broker.post("tts")
        error = self.assertBrokerError(result, "daemon_overloaded", "mvoice")
        self.assertEqual((error.status, error.headers), (503, {"Retry-After": "1"}))
        self.assertIsNot(self.registry["mvoice"].healthy, False)
        self.assertLeaseFree()
        self.broker.exhausted.clear()
        _, again = self.broker.post("tts")
        self.reply(self.mvoice, 200, b"{}")
        self.successResultOf(again)

    def test_refused_then_next_request_rejected(self) -> None:
        """After a refused connection, the next request is refused at once without a connection."""
        self.broker.refusing.add(8765)
        _, first = self.broker.post("tts")
        self.failureResultOf(first, BrokerError)
        _, second = self.broker.post("tts")
        self.assertBrokerError(second, "consumer_unreachable", "mvoice")
        self.assertEqual(self.scheduler.stats.rejected, 1)
        self.assertEqual(self.broker.reactor.tcpClients, [])

    def test_refused_releases_lease_for_waiting_request(self) -> None:
        """A request queued behind one whose consumer refused runs once the lease is released."""
        self.broker.refusing.add(8765)
        self.ollama.answer(b"GET", b"/api/version", 200, b"{}")
        _, first = self.broker.post("tts")
        self.failureResultOf(first, BrokerError)
        self.broker.post("llm")
        self.assertEqual(self.ollama.uris(b"POST"), [b"/api/generate"])

    def test_hang_up_before_answer(self) -> None:
        """A consumer that closes the connection before answering is 502; the lease is freed."""
        _, result = self.broker.post("tts")
        upstream = self.mvoice.held.pop(0)
        transport = upstream.channel.transport
        assert transport is not None
        transport.loseConnection()
        self.broker.pump()
        self.assertBrokerError(result, "consumer_unreachable", "mvoice")
        self.assertIs(self.registry["mvoice"].healthy, False)
        self.assertLeaseFree()

    def test_hang_up_mid_body(self) -> None:
        """A consumer that drops mid-body aborts the client, counts failed and frees the lease;
        it answered, so it stays in service for the other clients until a probe says otherwise."""
        client, result = self.broker.post("tts")
        upstream = self.reply(self.mvoice, 200, b"partial", finish=False)
        transport = upstream.channel.transport
        assert transport is not None
        transport.loseConnection()
        self.broker.pump()
        self.failureResultOf(result, RelayBroken)
        self.assertTrue(client.transport.disconnecting)
        self.assertIsNot(self.registry["mvoice"].healthy, False)
        self.assertEqual((self.scheduler.stats.failed, self.scheduler.stats.completed), (1, 0))
        self.assertLeaseFree()

    def test_client_leaves_while_consumer_works(self) -> None:
        """A client that disconnects closes the consumer's connection and frees the lease."""
        client, result = self.broker.post("tts")
        upstream = self.mvoice.held[0]
        client.disconnect()
        self.broker.pump()
        self.assertEqual(self.mvoice.lost, [upstream])
        self.assertLeaseFree()
        stats = self.scheduler.stats
        self.assertEqual((stats.completed, stats.failed), (0, 0))
        self.assertIsNot(self.registry["mvoice"].healthy, False)
        self.assertNoTimers()
        self.failureResultOf(result, CancelledError)

    def test_upstream_timeout(self) -> None:
        """A consumer silent past its timeout_s is 504 upstream_timeout, counted failed."""
        _, result = self.broker.post("llm")
        self.reactor.advance(299)
        self.assertNoResult(result)
        self.reactor.advance(1)
        self.assertBrokerError(result, "upstream_timeout", "ollama")
        self.assertEqual(self.scheduler.stats.failed, 1)
        self.assertLeaseFree()


class HoldUntilTests(FacadeTestCase):
    """ComfyUI's /prompt answers at once; the lease is kept until its history shows the job."""

    def setUp(self) -> None:
        super().setUp()
        self.comfyui.answer(b"GET", b"/history/p%201", 200, b"{}")
        self.ollama.answer(b"GET", b"/api/version", 200, b"{}")

    def submit(
        self,
        code: int = 200,
        answer: bytes = b'{"prompt_id": "p 1", "number": 3}',
        *,
        after: float = 0.0,
    ) -> Client:
        """Send POST /v1/image; ComfyUI answers ``after`` seconds later."""
        client, result = self.broker.post("image", b'{"prompt": {}}', query=b"?client_id=c1")
        self.reactor.advance(after)
        self.reply(self.comfyui, code, answer)
        self.successResultOf(result)
        self.answered_at = self.reactor.seconds()
        return client

    def history_polls(self) -> int:
        return len([u for u in self.comfyui.uris(b"GET") if u.startswith(b"/history/")])

    def test_query_string_forwarded(self) -> None:
        """POST /v1/image?client_id=c1 reaches ComfyUI as /prompt?client_id=c1."""
        self.submit()
        self.assertEqual(self.comfyui.uris(b"POST"), [b"/prompt?client_id=c1"])

    def test_client_gets_answer_at_once(self) -> None:
        """The client gets /prompt's answer, whole, while the lease is still held."""
        client = self.submit()
        status, _, body = client.response()
        self.assertEqual((status, body), (200, b'{"prompt_id": "p 1", "number": 3}'))
        self.assertTrue(client.transport.value().endswith(b"0\r\n\r\n"))
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("comfyui", 1))
        self.assertEqual(self.scheduler.stats.completed, 1)

    def test_held_while_history_empty_then_released(self) -> None:
        """The lease stays held while /history/<id> is {} and is released once it is not."""
        self.submit()
        _, waiting = self.broker.post("llm")
        for _ in range(4):
            self.reactor.advance(0.5)
            self.broker.pump()
        self.assertEqual(self.comfyui.uris(b"GET")[-5:], [b"/history/p%201"] * 5)
        self.assertEqual(self.scheduler.holder, "comfyui")
        self.assertEqual(self.ollama.uris(b"POST"), [])
        self.comfyui.answer(b"GET", b"/history/p%201", 200, b'{"p 1": {"status": {}}}')
        self.reactor.advance(0.5)
        self.broker.pump()
        self.assertEqual(self.scheduler.holder, "ollama")
        self.assertEqual(self.ollama.uris(b"POST"), [b"/api/generate"])
        polls = len(self.comfyui.uris(b"GET"))
        self.reactor.advance(5)
        self.assertEqual(len(self.comfyui.uris(b"GET")), polls)
        self.assertNoResult(waiting)

    def test_polls_every_interval(self) -> None:
        """History is polled at once, then once every interval_s, not more often."""
        self.submit()
        self.assertEqual(self.history_polls(), 1)
        self.reactor.advance(0.4)
        self.assertEqual(self.history_polls(), 1)
        self.reactor.advance(0.1)
        self.assertEqual(self.history_polls(), 2)

    def test_non_200_history_keeps_lease(self) -> None:
        """A history answer that is not a 200 with a non-empty object does not end the hold."""
        self.submit()
        for code, body in ((404, b'{"p 1": {}}'), (200, b"[1]"), (200, b"not json")):
            self.comfyui.answer(b"GET", b"/history/p%201", code, body)
            self.reactor.advance(0.5)
            self.assertEqual(self.scheduler.holder, "comfyui", (code, body))

    def test_released_after_timeout(self) -> None:
        """A job whose history stays empty releases the lease timeout_s after /prompt answered."""
        self.submit(after=30.0)
        self.reactor.advance(59.5)
        self.assertEqual(self.scheduler.holder, "comfyui")
        self.reactor.advance(0.5)
        self.assertEqual(self.reactor.seconds() - self.answered_at, 60.0)
        self.assertLeaseFree()
        self.assertNoTimers()

    def test_unreachable_history_keeps_polling(self) -> None:
        """A history poll that fails is retried; the lease is held until the job shows."""
        self.submit()
        del self.comfyui.answers[(b"GET", b"/history/p%201")]
        self.reactor.advance(0.5)
        self.assertEqual(len(self.comfyui.held), 1)
        self.reactor.advance(2.0)  # the poll's own bound: interval_s * 4
        self.broker.stub.flush()
        self.assertEqual(self.scheduler.holder, "comfyui")
        self.comfyui.answer(b"GET", b"/history/p%201", 200, b'{"p 1": {}}')
        self.reactor.advance(0.5)
        self.assertLeaseFree()

    def test_answer_without_field_releases_at_once(self) -> None:
        """A 2xx answer without the template's field releases the lease at once, no poll."""
        self.submit(answer=b'{"number": 3}')
        self.assertLeaseFree()
        self.assertEqual(self.comfyui.uris(b"GET"), [b"/system_stats"])

    def test_answer_not_json_releases_at_once(self) -> None:
        """A 2xx answer that is not JSON releases the lease at once."""
        self.submit(answer=b"queued")
        self.assertLeaseFree()

    def test_client_error_releases_at_once(self) -> None:
        """A 4xx answer from /prompt releases the lease at once, even if it names a prompt_id."""
        client = self.submit(400, b'{"error": "invalid prompt", "prompt_id": "p 1"}')
        self.assertEqual(client.response()[0], 400)
        self.assertLeaseFree()
        self.assertEqual(self.comfyui.uris(b"GET"), [b"/system_stats"])
        self.assertNoTimers()

    def test_stop_cancels_hold(self) -> None:
        """Shutting the scheduler down cancels the poll and releases the lease."""
        self.submit()
        self.scheduler.stop()
        self.assertLeaseFree()
        self.reactor.advance(5)
        self.assertEqual(self.history_polls(), 1)


class ServeAudioTests(FacadeTestCase):
    """Facade.serve_audio: unscheduled downloads from the audio_proxy consumer."""

    def test_relayed_unscheduled(self) -> None:
        """GET /audio/... reaches the audio consumer as sent, even while another holds the lease."""
        self.ollama.answer(b"GET", b"/api/version", 200, b"{}")
        self.broker.post("llm")
        client, result = self.broker.get_audio(b"/audio/out/a.wav?dl=1")
        self.assertEqual(self.mvoice.uris(b"GET")[-1], b"/audio/out/a.wav?dl=1")
        self.reply(self.mvoice, 200, b"RIFF")
        self.successResultOf(result)
        self.assertEqual(client.response()[::2], (200, b"RIFF"))
        self.assertEqual(self.scheduler.holder, "ollama")
        self.assertEqual(self.scheduler.stats.completed, 0)

    def test_download_does_not_mark_loaded(self) -> None:
        """Serving an audio file says nothing of the model: an unloaded consumer stays unloaded."""
        self.mvoice.answer(b"GET", b"/api/health", 200, b'{"loaded": false}')
        _, result = self.broker.get_audio(b"/audio/a.wav")
        self.reply(self.mvoice, 200, b"RIFF")
        self.successResultOf(result)
        self.assertIs(self.registry["mvoice"].loaded, False)

    def test_unhealthy_refused(self) -> None:
        """An audio consumer whose last probe failed is refused at once: consumer_unreachable."""
        self.mvoice.answer(b"GET", b"/api/health", 500, b"")
        _, result = self.broker.get_audio(b"/audio/a.wav")
        self.assertBrokerError(result, "consumer_unreachable", "mvoice")
        self.assertEqual(self.mvoice.uris(b"GET"), [b"/api/health"])

    def test_no_audio_proxy(self) -> None:
        """Without audio_proxy, /audio is no_consumer."""
        broker = Broker(make_config(audio_proxy=None))
        _, result = broker.get_audio(b"/audio/a.wav")
        error = self.failureResultOf(result, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual(error.code, "no_consumer")


class ServeNativeTests(FacadeTestCase):
    """Facade.serve_native: GPU work scheduled as /v1/<kind> is, the rest relayed at once."""

    def make_broker(self) -> Broker:
        return Broker(native_config())

    def hold_lease(self) -> Deferred[None]:
        """mvoice takes the GPU lease with a request it has not answered yet."""
        _, held = self.broker.post("tts")
        self.assertEqual(self.scheduler.holder, "mvoice")
        return held

    def test_post_waits_for_the_lease(self) -> None:
        """gpu omitted: a POST waits in the queue while another consumer holds the lease, then
        reaches the consumer with its target, query and body, under the lease."""
        held = self.hold_lease()
        _, native = self.broker.native("ollama", b"POST", b"/api/chat?x=1", b'{"model": "m"}')
        self.assertEqual(self.ollama.uris(b"POST"), [])
        self.assertEqual(self.registry["ollama"].queued, 1)
        self.reply(self.mvoice, 200, b"{}")
        self.successResultOf(held)
        self.assertEqual(self.ollama.received[-1], (b"POST", b"/api/chat?x=1", b'{"model": "m"}'))
        self.assertEqual((self.scheduler.holder, self.scheduler.running), ("ollama", 1))
        self.reply(self.ollama, 200, b'{"done": true}')
        self.successResultOf(native)
        self.assertEqual(self.scheduler.stats.completed, 2)
        self.assertLeaseFree()
        self.assertNoTimers()

    def test_get_passes_while_the_lease_is_held(self) -> None:
        """A GET is relayed at once while another consumer holds the lease, and is no job."""
        self.hold_lease()
        client, result = self.broker.native("ollama", b"GET", b"/api/tags")
        self.assertEqual(self.ollama.uris(b"GET")[-1], b"/api/tags")
        self.reply(self.ollama, 200, b'{"models": []}')
        self.successResultOf(result)
        self.assertEqual(client.response()[::2], (200, b'{"models": []}'))
        self.assertEqual((self.scheduler.holder, self.scheduler.stats.completed), ("mvoice", 0))
        self.assertIsNone(getattr(self.broker.requests[-1], "queue_wait_s", None))

    def test_only_listed_requests_scheduled(self) -> None:
        """With gpu entries, exactly the requests matching a method and path glob wait."""
        self.hold_lease()
        for method, target in (
            (b"POST", b"/prompt"),
            (b"POST", b"/api/x/run?y=1"),
            (b"POST", b"/upload/image"),
            (b"GET", b"/prompt"),
            (b"POST", b"/prompt/extra"),
            (b"DELETE", b"/api/x/run"),
        ):
            self.broker.native("comfyui", method, target)
        sent = [(m, uri) for m, uri, _ in self.comfyui.received if uri != b"/system_stats"]
        self.assertEqual(
            sent,
            [
                (b"POST", b"/upload/image"),
                (b"GET", b"/prompt"),
                (b"POST", b"/prompt/extra"),
                (b"DELETE", b"/api/x/run"),
            ],
        )
        self.assertEqual(self.registry["comfyui"].queued, 2)

    def test_encoded_path_or_lower_case_method_still_scheduled(self) -> None:
        """/prom%70t is /prompt and 'post' is POST to the glob: neither escapes the lease."""
        self.hold_lease()
        self.broker.native("comfyui", b"POST", b"/prom%70t")
        self.broker.native("comfyui", b"post", b"/api/x/run")
        self.assertEqual(self.registry["comfyui"].queued, 2)
        self.assertEqual(self.comfyui.uris(b"POST") + self.comfyui.uris(b"post"), [])

    def test_hold_until_from_the_gpu_entry(self) -> None:
        """A matched entry's hold_until keeps the lease until its own path shows the job done."""
        self.comfyui.answer(b"GET", b"/job/p%201", 200, b"{}")
        client, result = self.broker.native("comfyui", b"POST", b"/prompt", b'{"prompt": {}}')
        self.reply(self.comfyui, 200, b'{"prompt_id": "p 1"}')
        self.successResultOf(result)
        self.assertEqual(client.response()[::2], (200, b'{"prompt_id": "p 1"}'))
        self.assertEqual(self.scheduler.holder, "comfyui")
        self.reactor.advance(0.25)
        self.assertEqual(self.comfyui.uris(b"GET")[-2:], [b"/job/p%201"] * 2)
        self.assertEqual(self.scheduler.holder, "comfyui")
        self.comfyui.answer(b"GET", b"/job/p%201", 200, b'{"p 1": {}}')
        self.reactor.advance(0.25)
        self.assertLeaseFree()
        self.assertNotIn(b"/history/p%201", self.comfyui.uris(b"GET"))

    def test_entry_without_hold_until_releases_at_answer(self) -> None:
        """An entry with no hold_until releases the lease as soon as the answer is complete."""
        _, result = self.broker.native("comfyui", b"POST", b"/api/x/run", b"{}")
        self.reply(self.comfyui, 200, b'{"prompt_id": "p 1"}')
        self.successResultOf(result)
        self.assertLeaseFree()

    def test_only_a_scheduled_2xx_marks_loaded(self) -> None:
        """A scheduled POST answered 2xx marks the consumer loaded; a GET or a 4xx does not."""
        self.ollama.answer(b"GET", b"/api/version", 200, b'{"loaded": false}')
        for method, code in ((b"GET", 200), (b"POST", 400)):
            _, result = self.broker.native("ollama", method, b"/api/x")
            self.reply(self.ollama, code, b"{}")
            self.successResultOf(result)
            self.assertIs(self.registry["ollama"].loaded, False, (method, code))
        _, result = self.broker.native("ollama", b"POST", b"/api/x")
        self.reply(self.ollama, 200, b"{}")
        self.successResultOf(result)
        self.assertIs(self.registry["ollama"].loaded, True)

    def test_host_kept_and_forwarded_headers_set(self) -> None:
        """Scheduled or not, the consumer sees the client's Host and the broker's own
        X-Forwarded-Host, -Proto and -Prefix (the client's replaced); Origin passes."""
        sent = (
            b"X-Forwarded-Host: evil.example",
            b"X-Forwarded-Proto: https",
            b"X-Forwarded-Prefix: /elsewhere",
            b"Origin: http://broker.local",
        )
        for method in (b"GET", b"POST"):
            self.broker.native("comfyui", method, b"/prompt", headers=sent)
            seen = self.comfyui.held.pop(0).requestHeaders
            self.assertEqual(
                [seen.getRawHeaders(name) for name in (
                    b"host", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix",
                    b"origin", b"x-forwarded-for",
                )],
                [[b"broker.local"], [b"broker.local"], [b"http"], [b"/comfyui"],
                 [b"http://broker.local"], [b"10.0.0.7"]],
                method,
            )  # fmt: skip

    def test_facade_routes_keep_naming_the_consumer(self) -> None:
        """/v1/<kind> is unchanged: Host names the consumer, no X-Forwarded-Prefix is added
        and the client's X-Forwarded-Host passes as sent."""
        self.broker.post("tts", headers=(b"X-Forwarded-Host: client.example",))
        seen = self.mvoice.held[0].requestHeaders
        self.assertEqual(seen.getRawHeaders(b"host"), [b"127.0.0.1:8765"])
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-host"), [b"client.example"])
        self.assertFalse(seen.hasHeader(b"x-forwarded-prefix"))
        self.assertFalse(seen.hasHeader(b"x-forwarded-proto"))

    def test_notes_for_the_access_log(self) -> None:
        """A native request names its consumer; a scheduled one also its wait for the lease."""
        held = self.hold_lease()
        self.broker.native("ollama", b"POST", b"/api/generate")
        self.reactor.advance(3)
        self.reply(self.mvoice, 200, b"{}")
        self.successResultOf(held)
        request: Any = self.broker.requests[-1]
        self.assertEqual((request.consumer, request.queue_wait_s), ("ollama", 3.0))

    def test_unhealthy_consumer_refused_at_once(self) -> None:
        """A consumer whose probe fails: consumer_unreachable, for GETs and POSTs alike."""
        self.ollama.answer(b"GET", b"/api/version", 500, b"")
        for method in (b"GET", b"POST"):
            _, result = self.broker.native("ollama", method, b"/api/tags")
            self.assertBrokerError(result, "consumer_unreachable", "ollama")
        self.assertEqual(self.ollama.uris(b"GET"), [b"/api/version"])
        self.assertEqual(self.ollama.uris(b"POST"), [])

    def test_unscheduled_bounded_by_silence(self) -> None:
        """A relayed GET may stream past timeout_s as long as chunks keep coming; silence for
        timeout_s ends it."""
        _, result = self.broker.native("ollama", b"GET", b"/api/pull-progress")
        upstream = self.reply(self.ollama, 200, b"a", finish=False)
        for _ in range(3):
            self.reactor.advance(250)
            upstream.write(b"b")
            self.broker.pump()
        self.assertNoResult(result)
        self.reactor.advance(300)
        self.failureResultOf(result, RelayBroken)

    def test_consumer_without_native_block(self) -> None:
        """Handed a consumer that publishes no native API, the facade refuses: not_found."""
        request: Any = object()
        error = self.failureResultOf(
            Deferred.fromCoroutine(self.broker.facade.serve_native(request, MVOICE, b"/")),
            BrokerError,
        ).value
        self.assertEqual(getattr(error, "code", None), "not_found")
