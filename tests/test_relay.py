# -*- test-case-name: tests.test_relay -*-
"""Tests for mgpu.relay: its upstream client and real twisted.web on both sides, in memory.

The client is an ``HTTPChannel`` over a ``StringTransport``; the consumer is a
``Site`` whose resource answers only when the test says, joined to the
upstream client's connection attempt on a ``MemoryReactorClock`` by an iosim pump.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import alsoProvides

from mgpu.config import ConsumerConfig
from mgpu.errors import BrokerError
from mgpu.relay import SMALL_BODY, Relay, RelayBroken, RelayResult, client_host
from mgpu.upstream import UpstreamClient
from tests.integration.harness import dechunk

CONSUMER = ConsumerConfig(
    name="ollama", url="http://127.0.0.1:11434", paths={}, vram_resident_mib=0, timeout_s=30
)
CLIENT = IPv4Address("TCP", "10.0.0.7", 40000)


class _Upstream(Resource):
    """A consumer that keeps each request open until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class _Front(Resource):
    """The broker side: hands each request to the test, which calls the relay."""

    isLeaf = True

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self._handle = handle

    def render(self, request: Request) -> Any:
        self._handle(request)
        return NOT_DONE_YET


class _ClientEnd(FakeTransport):
    """The upstream client's end of the connection, recording producer calls."""

    state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"
        super().stopProducing()

    def abortConnection(self) -> None:
        self.state = "aborted"
        super().abortConnection()


class _TlsTransport(StringTransport):
    """A client connection that twisted.web takes for TLS (``request.isSecure()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        alsoProvides(self, ISSLTransport)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class _FailingClient(UpstreamClient):
    """An upstream client whose every request fails with one error."""

    def __init__(self, error: Exception) -> None:
        super().__init__(MemoryReactorClock())
        self.error = error

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return fail(self.error)


def _hang_up(upstream: Request) -> None:
    """The consumer closes its connection."""
    transport = upstream.channel.transport
    assert transport is not None
    transport.loseConnection()


def _parse(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """Status line, lower-cased headers and raw body of an HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers.setdefault(name.lower(), []).append(value)
    return status, headers, body


class RelayTests(SynchronousTestCase):
    """Behaviour of Relay.forward against an in-memory consumer and client."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.relay = Relay(UpstreamClient(self.reactor, max_idle=0), self.reactor)
        self.upstream = _Upstream()
        self.upstream_site = Site(self.upstream, reactor=Clock())
        self.pump: IOPump | None = None

    def start(
        self,
        method: bytes = b"POST",
        path: bytes = b"/api/generate?x=1",
        headers: tuple[bytes, ...] = (),
        body: bytes = b"",
        consumer: ConsumerConfig = CONSUMER,
        host: bytes | None = b"broker.local",
        secure: bool = False,
        **options: Any,
    ) -> None:
        """Send a client request to the broker, which forwards it to ``consumer``.

        ``host`` is the client's Host header (None: none); ``secure`` makes its
        connection TLS as far as twisted.web can tell.
        """
        options.setdefault("timeout_s", 30.0)

        def handle(request: Request) -> None:
            self.request = request
            self.result = self.relay.forward(request, consumer, method, request.uri, **options)

        self.client = (_TlsTransport if secure else StringTransport)(peerAddress=CLIENT)
        channel = Site(_Front(handle), reactor=Clock()).buildProtocol(CLIENT)
        assert channel is not None
        self.channel = channel
        channel.makeConnection(self.client)
        host_lines = [] if host is None else [b"Host: " + host]
        lines = [b"%s %s HTTP/1.1" % (method, path), *host_lines, *headers]
        if body:
            lines.append(b"Content-Length: %d" % len(body))
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def connect(self) -> Request:
        """Accept the upstream client's connection and return the request the consumer received."""
        host, port, factory, timeout, _ = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        self.assertEqual((host, port, timeout), ("127.0.0.1", 11434, 5.0))
        client_side = factory.buildProtocol(None)
        server = self.upstream_site.buildProtocol(None)
        self.client_end = _ClientEnd(client_side, isServer=False)
        self.pump = connect(
            server, FakeTransport(server, isServer=True), client_side, self.client_end,
            clock=self.reactor,
        )  # fmt: skip
        self.flush()
        self.assertEqual(len(self.upstream.requests), 1)
        return self.upstream.requests[0]

    def flush(self) -> None:
        assert self.pump is not None
        self.pump.flush()

    def answer(self, code: int = 200, headers: dict[bytes, bytes] | None = None) -> Request:
        """Connect, and have the consumer send its status and headers."""
        upstream = self.connect()
        upstream.setResponseCode(code)
        for name, value in (headers or {}).items():
            upstream.setHeader(name, value)
        upstream.write(b"")
        self.flush()
        return upstream

    def assertNoTimers(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def assertConsumerSawLoss(self, upstream: Request) -> None:
        lost = upstream.notifyFinish()
        self.flush()
        self.failureResultOf(lost)

    # -- streaming -------------------------------------------------------

    def test_chunks_reach_client_before_upstream_finishes(self) -> None:
        """Each chunk is written to the client as it arrives; the result fires at the end."""
        self.start()
        upstream = self.answer(headers={b"Content-Type": b"application/x-ndjson"})
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        upstream.write(b'{"t":"a"}\n')
        self.flush()
        self.assertIn(b'{"t":"a"}\n', self.client.value())
        self.assertNoResult(self.result)
        upstream.write(b'{"t":"b"}\n')
        upstream.finish()
        self.flush()
        self.assertEqual(self.successResultOf(self.result), RelayResult(200, b""))
        self.assertIsNone(self.request.producer)
        self.request.finish()
        _, headers, body = _parse(self.client.value())
        self.assertEqual(headers[b"transfer-encoding"], [b"chunked"])
        self.assertEqual(body, b'a\r\n{"t":"a"}\n\r\na\r\n{"t":"b"}\n\r\n0\r\n\r\n')
        self.assertNoTimers()

    def test_slow_client_pauses_and_resumes_upstream(self) -> None:
        """A client transport that pauses pauses the consumer's transport, and resumes it."""
        self.start()
        self.answer()
        self.assertEqual(self.client_end.state, "producing")
        assert self.client.producer is not None
        self.client.producer.pauseProducing()
        self.assertEqual(self.client_end.state, "paused")
        self.client.producer.resumeProducing()
        self.assertEqual(self.client_end.state, "producing")

    def test_spooled_answer_completes_while_the_client_reads_nothing(self) -> None:
        """With spool, a client that stops reading never pauses the consumer: the result (and
        with it the GPU lease) comes when the consumer is done, and the client still gets
        every byte, in order, once it reads again."""
        self.start(spool=True)
        upstream = self.answer()
        assert self.client.producer is not None
        self.client.producer.pauseProducing()
        chunks = [b"%05d" % n * 1000 for n in range(300)]  # 1.5 MB, past the memory part
        for chunk in chunks:
            upstream.write(chunk)
            self.flush()
            self.assertEqual(self.client_end.state, "producing")
        upstream.finish()
        self.flush()
        result = self.successResultOf(self.result)
        self.assertNoResult(result.delivered)
        self.client.producer.resumeProducing()
        self.successResultOf(result.delivered)
        self.request.finish()
        _, _, body = _parse(self.client.value())
        self.assertEqual(dechunk(body), b"".join(chunks))
        self.assertNoTimers()

    def spooled_for_a_paused_client(self) -> RelayResult:
        """A spooled exchange whose consumer is done while its client reads nothing."""
        self.start(spool=True)
        upstream = self.answer()
        assert self.client.producer is not None
        self.client.producer.pauseProducing()
        upstream.write(b"x" * 1000)
        upstream.finish()
        self.flush()
        return self.successResultOf(self.result)

    def test_spooled_answer_bounded_by_the_timeout(self) -> None:
        """A client that never takes a spooled answer is cut at the consumer's timeout_s."""
        result = self.spooled_for_a_paused_client()
        self.reactor.advance(30)
        self.failureResultOf(result.delivered, RelayBroken)
        self.assertTrue(self.client.disconnecting or self.client.disconnected)
        self.assertNoTimers()

    def test_spooled_answer_client_leaves(self) -> None:
        """A client that leaves while its spooled answer waits ends the delivery: cancelled."""
        result = self.spooled_for_a_paused_client()
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(result.delivered, CancelledError)
        self.assertNoTimers()

    def test_no_content_length_on_204(self) -> None:
        """A 204 is relayed without the Content-Length its consumer gave it."""
        self.start()
        upstream = self.connect()
        upstream.setResponseCode(204)
        upstream.setHeader(b"Content-Length", b"5")
        upstream.write(b"")
        upstream.finish()
        self.flush()
        self.successResultOf(self.result)
        self.request.finish()
        status, headers, _ = _parse(self.client.value())
        self.assertEqual(status, b"HTTP/1.1 204 No Content")
        self.assertNotIn(b"content-length", headers)

    def test_large_known_length_body_has_backpressure(self) -> None:
        """A body of known length over SMALL_BODY is still paced by the client."""
        self.start()
        self.answer(headers={b"Content-Length": b"%d" % (SMALL_BODY + 1)})
        assert self.client.producer is not None
        self.client.producer.pauseProducing()
        self.assertEqual(self.client_end.state, "paused")

    def test_small_known_length_body_relayed_whole(self) -> None:
        """A small body of known length reaches the client whole, headers first, no producer."""
        self.start()
        upstream = self.answer(headers={b"Content-Length": b"5"})
        self.assertIsNone(self.request.producer)
        upstream.write(b"hello")
        upstream.finish()
        self.flush()
        self.assertEqual(self.successResultOf(self.result), RelayResult(200, b""))
        self.request.finish()
        status, headers, body = _parse(self.client.value())
        self.assertEqual(
            (status, headers[b"content-length"], body), (b"HTTP/1.1 200 OK", [b"5"], b"hello")
        )

    def test_capture_keeps_head_and_streams_all(self) -> None:
        """capture keeps the first bytes of the body while every byte reaches the client."""
        self.start(capture=12)
        upstream = self.answer()
        upstream.write(b'{"prompt_id"')
        upstream.write(b': "p1", "number": 3}')
        upstream.finish()
        self.flush()
        self.assertEqual(self.successResultOf(self.result).body_head, b'{"prompt_id"')
        self.assertIn(b': "p1", "number": 3}', self.client.value())

    def test_request_body_and_query_reach_consumer(self) -> None:
        """The request body, its length and the query string reach the consumer unchanged."""
        self.start(body=b'{"model": "llama3"}', headers=(b"Content-Type: application/json",))
        upstream = self.connect()
        self.assertEqual(upstream.uri, b"/api/generate?x=1")
        assert upstream.content is not None
        self.assertEqual(upstream.content.read(), b'{"model": "llama3"}')
        self.assertEqual(upstream.requestHeaders.getRawHeaders(b"content-length"), [b"19"])
        self.assertEqual(
            upstream.requestHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )

    def test_get_without_body_sends_no_body(self) -> None:
        """A GET with no body reaches the consumer without a body or Content-Length."""
        self.start(method=b"GET", path=b"/audio/a.wav")
        upstream = self.connect()
        self.assertEqual(upstream.method, b"GET")
        self.assertIsNone(upstream.requestHeaders.getRawHeaders(b"content-length"))

    # -- headers ---------------------------------------------------------

    def test_request_headers_filtered_and_forwarded(self) -> None:
        """Hop-by-hop headers stay behind, end-to-end ones pass, Host names the consumer."""
        self.start(
            headers=(
                b"Connection: keep-alive, X-Secret",
                b"Keep-Alive: timeout=5",
                b"TE: trailers",
                b"Upgrade: websocket",
                b"Proxy-Authorization: Basic eDp5",
                b"X-Secret: hidden",
                b"X-Request-Id: r-1",
                b"Authorization: Bearer t",
                b"X-Forwarded-For: 192.0.2.1",
            ),
            body=b"{}",
        )
        seen = self.connect().requestHeaders
        for gone in (b"keep-alive", b"te", b"upgrade", b"proxy-authorization", b"x-secret"):
            self.assertFalse(seen.hasHeader(gone), gone)
        # The client's connection tokens stay behind; keep-alive toward the consumer is off.
        self.assertEqual(seen.getRawHeaders(b"connection"), [b"close"])
        self.assertEqual(seen.getRawHeaders(b"host"), [b"127.0.0.1:11434"])
        self.assertEqual(seen.getRawHeaders(b"x-request-id"), [b"r-1"])
        self.assertEqual(seen.getRawHeaders(b"authorization"), [b"Bearer t"])
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-for"), [b"192.0.2.1, 10.0.0.7"])

    def test_drop_authorization(self) -> None:
        """drop_authorization keeps the client's token from the consumer; X-Forwarded-For starts."""
        self.start(headers=(b"Authorization: Bearer broker-token",), drop_authorization=True)
        seen = self.connect().requestHeaders
        self.assertFalse(seen.hasHeader(b"authorization"))
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.7"])

    def test_native_keeps_host_and_sets_forwarded_headers(self) -> None:
        """On a native route the client's Host reaches the consumer, and X-Forwarded-Host,
        -Proto and -Prefix are the broker's, whatever the client sent; the rest is as ever."""
        self.start(
            headers=(
                b"X-Forwarded-Host: evil.example",
                b"x-forwarded-proto: https",
                b"X-Forwarded-Prefix: /other",
                b"X-Forwarded-Prefix: /more",
                b"Origin: http://broker.local",
                b"Upgrade: h2c",
            ),
            native_prefix=b"/ollama",
        )
        seen = self.connect().requestHeaders
        self.assertEqual(
            {name: seen.getRawHeaders(name) for name in (
                b"host", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix",
                b"origin", b"x-forwarded-for", b"upgrade",
            )},
            {b"host": [b"broker.local"], b"x-forwarded-host": [b"broker.local"],
             b"x-forwarded-proto": [b"http"], b"x-forwarded-prefix": [b"/ollama"],
             b"origin": [b"http://broker.local"], b"x-forwarded-for": [b"10.0.0.7"],
             b"upgrade": None},
        )  # fmt: skip

    def test_native_secure_client_is_https(self) -> None:
        """A client that reached the daemon over TLS is X-Forwarded-Proto: https."""
        self.start(native_prefix=b"/comfyui", secure=True, host=b"gpu.example:8443")
        seen = self.connect().requestHeaders
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(seen.getRawHeaders(b"host"), [b"gpu.example:8443"])

    def test_native_without_host_names_the_consumer(self) -> None:
        """A client that sent no Host: the consumer's own is sent, and no X-Forwarded-Host."""
        self.start(native_prefix=b"/ollama", host=None)
        seen = self.connect().requestHeaders
        self.assertEqual(seen.getRawHeaders(b"host"), [b"127.0.0.1:11434"])
        self.assertFalse(seen.hasHeader(b"x-forwarded-host"))
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-prefix"), [b"/ollama"])

    def test_native_malformed_host_refused(self) -> None:
        """A Host that is not one host[:port] is bad_request on a native route, and nothing
        is sent; on a facade route it is not sent on, so it is no concern there."""
        for host in (b"a b", b"evil.example/x", b"u@evil", b"a:b:c", b"h:123456", b"a\tb",
                     b"\x80", b"", b"h\\x"):  # fmt: skip
            self.start(native_prefix=b"/ollama", host=host)
            self.assertClientError(host)
        self.start(native_prefix=b"/ollama", headers=(b"Host: second.example",))
        self.assertClientError(b"two Host headers")
        self.assertEqual(self.reactor.tcpClients, [])
        self.start(host=b"a b")
        self.assertEqual(self.connect().requestHeaders.getRawHeaders(b"host"), [b"127.0.0.1:11434"])

    def test_client_host_refuses_line_breaks(self) -> None:
        """CR, LF and NUL (which twisted.web already refuses in a head) are refused here too."""
        for host in (b"a\r\nX-Injected: 1", b"a\nb", b"a\rb", b"a\x00b", b"[::1]\r\n:80"):
            request: Any = DummyRequest([])
            request.requestHeaders.setRawHeaders(b"host", [host])
            with self.assertRaises(BrokerError, msg=repr(host)) as caught:
                client_host(request)
            self.assertEqual(caught.exception.code, "bad_request")

    def test_client_host_accepts_authorities(self) -> None:
        """Names, IPv4 and bracketed IPv6 addresses, with or without a port, are kept."""
        for host in (b"broker.local", b"127.0.0.1:8770", b"[::1]:8770", b"[fe80::1]",
                     b"xn--bcher-kva.example", b"GPU-Box_1.lan:80"):  # fmt: skip
            request: Any = DummyRequest([])
            request.requestHeaders.setRawHeaders(b"host", [host])
            self.assertEqual(client_host(request), host)
        self.assertIsNone(client_host(cast(Request, DummyRequest([]))))

    def test_upstream_refuses_an_unsafe_host(self) -> None:
        """The upstream client itself refuses a Host with a control or space byte, or none."""
        client = UpstreamClient(self.reactor, max_idle=0)
        for host in (b"a\r\nX-Injected: 1", b"a b", b"a\x00", b""):
            with self.assertRaises(ValueError, msg=repr(host)):
                client.request(b"GET", b"http://127.0.0.1:11434/", host=host)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_response_headers_filtered_and_copied(self) -> None:
        """The consumer's end-to-end headers reach the client; hop-by-hop ones do not."""
        self.start()
        upstream = self.connect()
        upstream.defaultContentType = None
        upstream.responseHeaders.setRawHeaders(b"Set-Cookie", [b"a=1", b"b=2"])
        for name, value in (
            (b"X-Model", b"llama3"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Trailer", b"X-Checksum"),
            (b"Keep-Alive", b"timeout=5"),
        ):
            upstream.setHeader(name, value)
        upstream.write(b"")
        self.flush()
        _, headers, _ = _parse(self.client.value())
        self.assertEqual(headers[b"x-model"], [b"llama3"])
        self.assertEqual(headers[b"set-cookie"], [b"a=1", b"b=2"])
        for gone in (b"proxy-authenticate", b"trailer", b"keep-alive", b"content-type"):
            self.assertNotIn(gone, headers)

    def test_content_length_kept(self) -> None:
        """A consumer's Content-Length reaches the client, which then gets no chunking."""
        self.start(method=b"GET")
        upstream = self.answer(headers={b"Content-Length": b"5"})
        upstream.write(b"hello")
        upstream.finish()
        self.flush()
        self.successResultOf(self.result)
        self.request.finish()
        _, headers, body = _parse(self.client.value())
        self.assertEqual(headers[b"content-length"], [b"5"])
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertEqual(body, b"hello")

    def test_head_keeps_content_length(self) -> None:
        """A HEAD answer keeps the consumer's Content-Length although no body follows."""
        self.start(method=b"HEAD", path=b"/audio/a.wav")
        upstream = self.connect()
        self.assertEqual(upstream.method, b"HEAD")
        upstream.setHeader(b"Content-Length", b"1234")
        upstream.setHeader(b"Content-Type", b"audio/wav")
        upstream.finish()
        self.flush()
        self.assertEqual(self.successResultOf(self.result).status, 200)
        self.request.finish()
        _, headers, body = _parse(self.client.value())
        self.assertEqual(headers[b"content-length"], [b"1234"])
        self.assertEqual(headers[b"content-type"], [b"audio/wav"])
        self.assertEqual(body, b"")

    def test_consumer_error_passed_through(self) -> None:
        """A consumer's 418 reaches the client unchanged, phrase and body included."""
        self.start()
        upstream = self.connect()
        upstream.setResponseCode(418, b"I'm a teapot")
        upstream.write(b'{"error": "short and stout"}')
        upstream.finish()
        self.flush()
        self.assertEqual(self.successResultOf(self.result).status, 418)
        self.request.finish()
        status, _, body = _parse(self.client.value())
        self.assertEqual(status, b"HTTP/1.1 418 I'm a teapot")
        self.assertIn(b'{"error": "short and stout"}', body)

    # -- failures before the answer --------------------------------------

    def assertClientError(self, why: bytes) -> None:
        """The relay refused the client's request itself: bad_request, nothing written."""
        error = self.failureResultOf(self.result, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual((error.code, error.consumer), ("bad_request", None), why)
        self.assertEqual(self.client.value(), b"")
        self.assertNoTimers()

    def assertBrokerError(self, code: str) -> BrokerError:
        error = self.failureResultOf(self.result, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertNotIsInstance(error, RelayBroken)
        self.assertEqual((error.code, error.consumer), (code, "ollama"))
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(self.client.value(), b"")
        self.assertNoTimers()
        return error

    def test_connection_refused(self) -> None:
        """A refused connection is consumer_unreachable, naming the reason."""
        self.start()
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            self.reactor.connectors[0], Failure(ConnectionRefusedError())
        )
        self.assertIn("refused", self.assertBrokerError("consumer_unreachable").message)

    def test_connection_lost_before_answer(self) -> None:
        """A consumer that hangs up before answering is consumer_unreachable."""
        self.start()
        upstream = self.connect()
        _hang_up(upstream)
        self.flush()
        self.assertBrokerError("consumer_unreachable")

    def test_unsupported_scheme(self) -> None:
        """A consumer URL with a scheme the client cannot use is bad_consumer_url."""
        self.start(consumer=ConsumerConfig("ollama", "ftp://127.0.0.1", {}, 0))
        self.assertBrokerError("bad_consumer_url")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_invalid_url(self) -> None:
        """A consumer URL the client rejects outright is bad_consumer_url."""
        self.start(consumer=ConsumerConfig("ollama", "http://bad host", {}, 0))
        self.assertBrokerError("bad_consumer_url")

    def test_dns_failure(self) -> None:
        """A consumer host name that does not resolve is bad_consumer_url."""
        self.relay = Relay(_FailingClient(DNSLookupError("no.such.host")), self.reactor)
        self.start()
        self.assertBrokerError("bad_consumer_url")

    def test_timeout_before_answer(self) -> None:
        """No answer within timeout_s is upstream_timeout, and the upstream request is closed."""
        self.start()
        upstream = self.connect()
        self.reactor.advance(30)
        self.assertBrokerError("upstream_timeout")
        self.assertConsumerSawLoss(upstream)

    def test_timeout_while_connecting(self) -> None:
        """A timeout while still connecting stops the connection attempt."""
        self.start()
        connector = self.reactor.connectors[0]
        self.reactor.advance(30)
        self.assertBrokerError("upstream_timeout")
        self.assertTrue(connector.stoppedConnecting)

    # -- failures after the answer began -----------------------------------

    def assertBroken(self, code: str) -> None:
        error = self.failureResultOf(self.result, RelayBroken).value
        assert isinstance(error, RelayBroken)
        self.assertEqual((error.code, error.response_started), (code, True))
        self.assertTrue(self.client.disconnecting)
        self.assertIsNone(self.request.producer)
        self.assertNoTimers()

    def test_timeout_mid_body(self) -> None:
        """A timeout after the answer began aborts the client and closes the upstream."""
        self.start()
        upstream = self.answer()
        upstream.write(b"partial")
        self.flush()
        self.reactor.advance(30)
        self.assertBroken("upstream_timeout")
        self.assertEqual(self.client_end.state, "aborted")
        self.assertConsumerSawLoss(upstream)

    def test_chunks_do_not_extend_whole_timeout(self) -> None:
        """Without idle_timeout, timeout_s bounds the whole exchange however busy the body."""
        self.start(timeout_s=10.0)
        upstream = self.answer()
        self.reactor.advance(9)
        upstream.write(b"tick")
        self.flush()
        self.reactor.advance(1)
        self.assertBroken("upstream_timeout")

    def test_idle_timeout_resets_per_chunk(self) -> None:
        """With idle_timeout, each chunk restarts the timer; silence then times out."""
        self.start(timeout_s=10.0, idle_timeout=True)
        upstream = self.answer()
        for _ in range(3):
            self.reactor.advance(9)
            upstream.write(b"tick")
            self.flush()
        self.assertNoResult(self.result)
        self.reactor.advance(10)
        self.assertBroken("upstream_timeout")

    def test_upstream_lost_mid_body(self) -> None:
        """A consumer that hangs up mid-body gets the client's connection aborted (bad_answer)."""
        self.start()
        upstream = self.answer()
        upstream.write(b"partial")
        _hang_up(upstream)
        self.flush()
        self.assertBroken("bad_answer")

    def test_small_answer_stalled_is_a_plain_timeout(self) -> None:
        """A small answer whose body never comes is a 504 the client can still be told."""
        self.start()
        self.answer(headers={b"Content-Length": b"100"})
        self.reactor.advance(30)
        error = self.failureResultOf(self.result, BrokerError).value
        self.assertNotIsInstance(error, RelayBroken)
        self.assertEqual(error.code, "upstream_timeout")
        self.assertEqual(self.client.value(), b"")
        self.assertFalse(self.request.responseHeaders.hasHeader(b"content-length"))

    def test_small_answer_broken_off_is_a_plain_502(self) -> None:
        """A consumer that hangs up before a small answer's body leaves the client a 502
        bad_answer: it answered, so it is not unreachable."""
        self.start()
        upstream = self.answer(headers={b"Content-Length": b"100"})
        _hang_up(upstream)
        self.flush()
        error = self.failureResultOf(self.result, BrokerError).value
        self.assertNotIsInstance(error, RelayBroken)
        self.assertEqual(error.code, "bad_answer")

    # -- cancellation ------------------------------------------------------

    def test_cancel_before_answer(self) -> None:
        """Cancelling before the answer cancels the upstream request: CancelledError."""
        self.start()
        upstream = self.connect()
        self.result.cancel()
        self.failureResultOf(self.result, CancelledError)
        self.assertConsumerSawLoss(upstream)
        self.assertNoTimers()

    def test_cancel_while_streaming(self) -> None:
        """Cancelling mid-body stops the upstream transfer: CancelledError."""
        self.start()
        upstream = self.answer()
        upstream.write(b"partial")
        self.flush()
        self.result.cancel()
        self.failureResultOf(self.result, CancelledError)
        self.assertEqual(self.client_end.state, "aborted")
        self.assertIsNone(self.request.producer)
        self.assertConsumerSawLoss(upstream)
        self.assertNoTimers()

    def test_client_transport_stops_the_answer_first(self) -> None:
        """A TCP transport stops its producer before the channel hears that the client left:
        still CancelledError, never a consumer that broke off its answer."""
        self.start()
        upstream = self.answer()
        assert self.client.producer is not None
        self.client.producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.result, CancelledError)
        self.assertConsumerSawLoss(upstream)
        self.assertNoTimers()

    def test_client_disconnect_while_streaming(self) -> None:
        """A client that goes away mid-body stops the upstream: CancelledError."""
        self.start()
        upstream = self.answer()
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.result, CancelledError)
        self.assertEqual(self.client_end.state, "aborted")
        self.assertConsumerSawLoss(upstream)
        self.assertNoTimers()
