# -*- test-case-name: tests.test_upstream -*-
"""Tests for mgpu.upstream: the relay's HTTP/1.1 client, byte for byte, on a memory reactor."""

from __future__ import annotations

import itertools
import socket
from io import BytesIO
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, FileBodyProducer, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from mgpu.upstream import (
    MAX_HEAD,
    Answer,
    AnswerError,
    EndpointCache,
    NoAnswer,
    StaleConnection,
    UpstreamClient,
    _host,
)
from tests.fuzz import examples

URL = b"http://127.0.0.1:11434/api/generate?x=1"


class _Wire(StringTransport):
    """A connection's transport that tells an abort from a clean close."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 11434))
        self.aborted = False
        self.protocol: Any = None

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class _Receiver(Protocol):
    """Collects a body and how it ended."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.end: Failure | None = None
        self.pool_size_at_end = -1
        self.client: UpstreamClient | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.end = reason
        if self.client is not None:
            self.pool_size_at_end = self.client.idle_connections()

    @property
    def body(self) -> bytes:
        return b"".join(self.data)


class UpstreamClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = UpstreamClient(self.reactor, idle_timeout_s=4.0, max_idle=2)
        self.wires: list[_Wire] = []

    def request(self, url: bytes = URL, method: bytes = b"POST", **kwargs: Any) -> Deferred[Answer]:
        kwargs.setdefault("body", b"{}")
        kwargs.setdefault("keepalive", True)
        return self.client.request(method, url, **kwargs)

    def connect(self) -> tuple[Any, _Wire]:
        """Accept the client's next connection attempt; return its protocol and wire."""
        host, port, factory, timeout, _ = self.reactor.tcpClients.pop(0)
        self.assertEqual((host, port, timeout), ("127.0.0.1", 11434, 5.0))
        protocol: Any = factory.buildProtocol(None)
        wire = _Wire()
        protocol.makeConnection(wire)
        wire.protocol = protocol
        self.wires.append(wire)
        return protocol, wire

    def answer(self, raw: bytes, method: bytes = b"POST") -> tuple[Answer, _Receiver, _Wire]:
        """Send a request on a new connection, feed ``raw`` as the answer, deliver its body."""
        d = self.request(method=method)
        if self.reactor.tcpClients:
            protocol, wire = self.connect()
        else:  # sent on the kept connection
            wire = self.wires[-1]
            protocol = wire.protocol
        receiver = _Receiver()
        receiver.client = self.client
        answers: list[Answer] = []

        def answered(answer: Answer) -> None:
            answers.append(answer)
            answer.deliver(receiver)

        d.addCallback(answered)
        protocol.dataReceived(raw)
        self.assertEqual(len(answers), 1, "no answer head")
        return answers[0], receiver, wire

    # -- the request -------------------------------------------------------

    def test_request_written_whole(self) -> None:
        """Request line, Host, the fields, Content-Length and the body, in that order."""
        self.request(fields=[(b"X-Request-Id", b"r-1"), (b"Accept", b"*/*")], body=b'{"a":1}')
        _, wire = self.connect()
        self.assertEqual(
            wire.value(),
            b"POST /api/generate?x=1 HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n"
            b"X-Request-Id: r-1\r\nAccept: */*\r\nContent-Length: 7\r\n\r\n"
            b'{"a":1}',
        )

    def test_no_body_no_length(self) -> None:
        """A request without a body says nothing of a length."""
        self.request(method=b"GET", body=None)
        _, wire = self.connect()
        self.assertEqual(
            wire.value(), b"GET /api/generate?x=1 HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n\r\n"
        )

    def test_host_header(self) -> None:
        """The default port is left out of Host; an IPv6 literal keeps its brackets."""
        for url, host in [
            (b"http://example.test/a", b"example.test"),
            (b"https://example.test:443/a", b"example.test"),
            (b"http://example.test:8080/a", b"example.test:8080"),
            (b"http://[::1]:8080/a", b"[::1]:8080"),
        ]:
            self.assertEqual(_host(URI.fromBytes(url)), host, url)
        self.client.request(b"GET", b"http://[::1]:8080/a")
        wire = _Wire()
        protocol: Any = self.reactor.tcpClients.pop(0)[2].buildProtocol(None)
        protocol.makeConnection(wire)
        self.assertIn(b"\r\nHost: [::1]:8080\r\n", wire.value())

    def test_line_breaks_in_values_flattened(self) -> None:
        """A header value can never start a new header line upstream."""
        self.request(fields=[(b"X-A", b"one\r\nX-Injected: yes\nz")])
        _, wire = self.connect()
        self.assertIn(b"\r\nX-A: one  X-Injected: yes z\r\n", wire.value())
        self.assertNotIn(b"\r\nX-Injected", wire.value())

    def test_bad_urls_refused_before_any_io(self) -> None:
        """An unusable target or scheme raises at once, and nothing connects."""
        self.assertRaises(ValueError, self.request, b"http://127.0.0.1:1/a b")
        self.assertRaises(ValueError, self.request, b"http://127.0.0.1:1/a\x01")
        self.assertRaises(SchemeNotSupported, self.request, b"ftp://127.0.0.1:1/")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_producer_body_of_known_length(self) -> None:
        """A producer's body is streamed after the head, framed by its length."""
        producer = FileBodyProducer(BytesIO(b"x" * 10), _immediate())
        d = self.request(body=producer)
        protocol, wire = self.connect()
        self.assertTrue(wire.value().endswith(b"Content-Length: 10\r\n\r\n" + b"x" * 10))
        self.assertIsNone(wire.producer)  # unregistered once the body is out
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 204)

    def test_producer_body_of_unknown_length_is_chunked(self) -> None:
        """A body of unknown length is sent chunked, ending with the zero chunk."""
        producer = _Streaming()
        self.request(body=producer)
        _, wire = self.connect()
        self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n\r\n", wire.value())
        self.assertIs(wire.producer, producer)
        assert producer.consumer is not None
        producer.consumer.write(b"hello")
        producer.done.callback(None)
        self.assertTrue(wire.value().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
        self.assertIsNone(wire.producer)

    def test_producer_held_to_its_length(self) -> None:
        """A producer that writes more than it announced, or less, gets the connection
        aborted: its extra bytes would read as another request."""
        longer = _Streaming()
        longer.length = 3
        self.request(body=longer)
        _, wire = self.connect()
        longer.consumer.write(b"abcGET /x HTTP/1.1\r\n\r\n")
        self.assertTrue(wire.aborted)
        self.assertNotIn(b"GET /x", wire.value())
        shorter = _Streaming()
        shorter.length = 3
        self.request(body=shorter)
        _, wire = self.connect()
        shorter.consumer.write(b"ab")
        shorter.done.callback(None)
        self.assertTrue(wire.aborted)

    def test_producer_stopped_when_connection_lost(self) -> None:
        """A connection lost while the body is still produced stops the producer."""
        producer = _Streaming()
        d = self.request(body=producer)
        protocol, _ = self.connect()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(producer.stopped)
        self.failureResultOf(d, NoAnswer)

    # -- the answer ------------------------------------------------------------

    def test_length_framed_answer(self) -> None:
        """Status, phrase, headers and length; the body; ResponseDone; the connection kept."""
        answer, receiver, wire = self.answer(
            b"HTTP/1.1 201 Made\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"X-Many: 1\r\nX-Many: 2\r\n\r\nhello"
        )
        self.assertEqual((answer.code, answer.phrase, answer.length), (201, b"Made", 5))
        self.assertEqual(answer.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(answer.headers.getRawHeaders(b"x-many"), [b"1", b"2"])
        self.assertEqual(receiver.body, b"hello")
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, ResponseDone)
        self.assertFalse(wire.disconnecting)
        self.assertEqual(self.client.idle_connections(), 1)

    def test_connection_back_in_pool_before_receiver_hears_the_end(self) -> None:
        """The request that the end releases can take the very same connection."""
        _, receiver, _ = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(receiver.pool_size_at_end, 1)

    def test_kept_connection_reused(self) -> None:
        """The next request to the same origin goes out on the kept connection."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        wire.clear()
        d = self.request(body=b"again")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(wire.value().startswith(b"POST /api/generate?x=1 HTTP/1.1\r\n"))
        assert wire.protocol is not None
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_answer_in_pieces(self) -> None:
        """Head and body may arrive a byte at a time."""
        d = self.request()
        protocol, _ = self.connect()
        receiver = _Receiver()
        d.addCallback(lambda a: a.deliver(receiver))
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc":
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(receiver.body, b"abc")
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, ResponseDone)

    def test_chunked_answer(self) -> None:
        """A chunked body is decoded, extensions and trailers skipped; its length is unknown."""
        answer, receiver, wire = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        self.assertIsNone(answer.length)
        self.assertEqual(receiver.body, b"hello world")
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, ResponseDone)
        self.assertEqual(self.client.idle_connections(), 1)
        self.assertFalse(wire.disconnecting)

    def test_bad_chunk_breaks_the_body_off(self) -> None:
        """A chunk size that is not hex ends the body with AnswerError and aborts."""
        _, receiver, wire = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
        )
        assert wire.protocol is not None
        wire.protocol.dataReceived(b"zz\r\n")
        self.assertEqual(receiver.body, b"ok")
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, AnswerError)
        self.assertTrue(wire.aborted)

    def test_reset_is_no_end_of_a_body_until_close(self) -> None:
        """A body framed by the connection's end that ends in a reset is broken off."""
        _, receiver, wire = self.answer(b"HTTP/1.1 200 OK\r\n\r\npartial")
        wire.protocol.connectionLost(Failure(ConnectionLost("reset by peer")))
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, AnswerError)

    def test_body_until_close(self) -> None:
        """No length and no chunks: the body ends with the connection (PotentialDataLoss)."""
        answer, receiver, wire = self.answer(b"HTTP/1.1 200 OK\r\n\r\npart one,")
        assert wire.protocol is not None
        wire.protocol.dataReceived(b" part two")
        self.assertIsNone(receiver.end)
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((answer.length, receiver.body), (None, b"part one, part two"))
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, PotentialDataLoss)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_connections_the_consumer_closes_are_not_kept(self) -> None:
        """Connection: close, HTTP/1.0, or bytes after the body: closed, not pooled."""
        for raw in [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
        ]:
            _, receiver, wire = self.answer(raw)
            assert receiver.end is not None
            self.assertIsInstance(receiver.end.value, ResponseDone, raw)
            self.assertTrue(wire.disconnecting, raw)
            self.assertEqual(self.client.idle_connections(), 0, raw)

    def test_http10_keep_alive_kept(self) -> None:
        """An HTTP/1.0 answer that asks for keep-alive is pooled."""
        self.answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.client.idle_connections(), 1)

    def test_interim_answers_skipped(self) -> None:
        """100 Continue and 103 Early Hints come before the answer that counts."""
        answer, receiver, _ = self.answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual((answer.code, receiver.body), (200, b"ok"))

    def test_answers_without_a_body(self) -> None:
        """HEAD, 204 and 304 answers end with their head, whatever their Content-Length says."""
        for method, raw in [
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (b"POST", b"HTTP/1.1 204 No Content\r\n\r\n"),
            (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
        ]:
            answer, receiver, _ = self.answer(raw, method=method)
            self.assertEqual((answer.length, receiver.body), (0, b""), raw)
            assert receiver.end is not None
            self.assertIsInstance(receiver.end.value, ResponseDone)
        self.assertEqual(self.client.idle_connections(), 1)  # the same one, three times
        self.assertEqual(
            answer.headers.getRawHeaders(b"content-length"), [b"9"]
        )  # the consumer's own, for the relay to pass on

    def test_unreadable_heads_fail_the_request(self) -> None:
        """A bad status line, header, length or an endless head: AnswerError, connection aborted."""
        for raw in [
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD,
        ]:
            d = self.request()
            protocol, wire = self.connect()
            protocol.dataReceived(raw)
            self.failureResultOf(d, AnswerError)
            self.assertTrue(wire.aborted, raw)
            protocol.connectionLost(Failure(ConnectionDone()))  # and nothing more happens

    def test_closed_before_an_answer(self) -> None:
        """A consumer that hangs up before any byte fails the request with NoAnswer, naming why."""
        d = self.request()
        protocol, _ = self.connect()
        protocol.connectionLost(Failure(ConnectionLost("reset by peer")))
        error = self.failureResultOf(d, NoAnswer).value
        self.assertIn("reset by peer", str(error))

    def test_closed_inside_the_head(self) -> None:
        """A consumer that hangs up mid-head gave a broken answer (AnswerError), not none."""
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200")
        protocol.connectionLost(Failure(ConnectionLost("reset by peer")))
        error = self.failureResultOf(d, AnswerError).value
        self.assertIn("reset by peer", str(error))

    def test_body_broken_off(self) -> None:
        """A connection lost before the length is in ends the body with AnswerError."""
        _, receiver, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        assert wire.protocol is not None
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, AnswerError)
        self.assertIn("broke off", str(receiver.end.value))
        self.assertEqual(self.client.idle_connections(), 0)

    def test_body_kept_until_delivered(self) -> None:
        """A body that arrives before ``deliver`` reaches the receiver then, end included."""
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        answer = self.successResultOf(d)
        receiver = _Receiver()
        answer.deliver(receiver)
        self.assertEqual(receiver.body, b"body")
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, ResponseDone)

    def test_receiver_controls_the_flow(self) -> None:
        """The receiver's transport pauses, resumes and stops (aborts) the connection."""
        _, receiver, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        producer = receiver.transport
        assert producer is not None
        producer.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(wire.producerState, "paused")
        producer.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(wire.producerState, "producing")
        producer.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(wire.aborted)

    def test_stopped_body_never_pooled(self) -> None:
        """A receiver that stops the body leaves a connection that is never reused,
        even when the rest of the body was already in."""
        d = self.request()
        protocol, wire = self.connect()

        def stop_at_once(answer: Answer) -> None:
            receiver = _Receiver()
            answer.deliver(receiver)
            answer.stopProducing()

        d.addCallback(stop_at_once)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(wire.aborted)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_stop_inside_data_received(self) -> None:
        """A receiver that stops during a read gets nothing more, and an aborted end once
        the connection is gone."""

        class Stopper(_Receiver):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.stopProducing()  # type: ignore[union-attr]

        d = self.request()
        protocol, wire = self.connect()
        receiver = Stopper()
        d.addCallback(lambda answer: answer.deliver(receiver))
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n"
        )
        self.assertEqual(receiver.data, [b"a"])
        self.assertTrue(wire.aborted)
        self.assertIsNone(receiver.end)  # not from inside its own stopProducing
        protocol.connectionLost(Failure(ConnectionDone()))
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, ConnectionAborted)

    def test_paused_connection_resumed_when_pooled(self) -> None:
        """A connection paused by its last receiver is reading again once kept."""
        _, receiver, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        receiver.transport.pauseProducing()  # type: ignore[union-attr]
        assert wire.protocol is not None
        wire.protocol.dataReceived(b"cd")
        self.assertEqual(wire.producerState, "producing")
        self.assertEqual(self.client.idle_connections(), 1)

    # -- cancelling ------------------------------------------------------------

    def test_cancel_while_connecting(self) -> None:
        """Cancelling before the connection is made stops the attempt."""
        d = self.request()
        connector = self.reactor.connectors[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(connector.stoppedConnecting)

    def test_cancel_before_the_answer(self) -> None:
        """Cancelling once sent aborts the connection; a late answer is ignored."""
        d = self.request()
        protocol, wire = self.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(wire.aborted)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.idle_connections(), 0)

    def test_cancel_on_a_kept_connection(self) -> None:
        """Cancelling a request on a pooled connection aborts that connection."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d = self.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(wire.aborted)

    # -- the pool --------------------------------------------------------------

    def test_idle_connection_closed_after_timeout(self) -> None:
        """A kept connection unused for idle_timeout_s is closed, and leaves the pool."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.reactor.advance(3.9)
        self.assertFalse(wire.disconnecting)
        self.reactor.advance(0.1)
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)  # at once, not when it is gone
        assert wire.protocol is not None
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.idle_connections(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reuse_postpones_the_timeout_without_a_timer_per_request(self) -> None:
        """Each use counts from its own end; one timer per connection at most."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert wire.protocol is not None
        for _ in range(3):
            self.reactor.advance(3)
            self.request()
            wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(3.9)
        self.assertFalse(wire.disconnecting)
        self.reactor.advance(0.1)
        self.assertTrue(wire.disconnecting)

    def test_connection_closed_by_the_consumer_leaves_the_pool(self) -> None:
        """A kept connection the consumer closes is never used again."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert wire.protocol is not None
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.idle_connections(), 0)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_idle_connection_that_speaks_is_dropped(self) -> None:
        """Bytes on an idle connection mean it is out of step: aborted, and never handed
        out again, even before the reactor reports it gone."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert wire.protocol is not None
        wire.protocol.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(wire.aborted)
        self.assertEqual(self.client.idle_connections(), 0)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)  # its own, and a spare for the next

    def test_idle_bytes_suspend_reuse_for_the_origin(self) -> None:
        """An origin caught speaking on an idle connection gets one connection per request:
        the next request says Connection: close and is not pooled after its answer."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        wire.protocol.dataReceived(b"late")
        self.assertTrue(self.client.suspended("http://127.0.0.1:11434"))
        _, receiver, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertIn(b"\r\nConnection: close\r\n", wire.value())
        self.assertEqual(receiver.body, b"ok")
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_late_bytes_after_a_complete_answer(self) -> None:
        """Bytes after a complete answer are nobody's: its receiver gets its own body and a
        clean end, the connection is closed, not pooled, and the origin is suspended."""
        for late in [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nOTHER", b"x"]:
            client = self.client = UpstreamClient(self.reactor, max_idle=2)
            _, receiver, wire = self.answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine" + late
            )
            self.assertEqual(receiver.body, b"mine")
            assert receiver.end is not None
            self.assertIsInstance(receiver.end.value, ResponseDone)
            self.assertTrue(wire.disconnecting)
            self.assertEqual(client.idle_connections(), 0)
            self.assertTrue(client.suspended("http://127.0.0.1:11434"))

    def test_body_after_a_bodiless_answer_is_late(self) -> None:
        """A 204 or an answer to HEAD that is followed by a body: the answer ends with its
        head, the body is never taken for the next answer, and the connection is closed."""
        for method, raw in [
            (b"POST", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nOTHER"),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nOTHER"),
        ]:
            answer, receiver, wire = self.answer(raw, method=method)
            self.assertEqual((answer.length, receiver.body), (0, b""), raw)
            self.assertTrue(wire.disconnecting, raw)
            self.assertEqual(self.client.idle_connections(), 0)

    def test_no_keepalive_unless_asked(self) -> None:
        """By default a request says Connection: close and its connection is closed after it."""
        d = self.client.request(b"POST", URL, body=b"{}")
        protocol, wire = self.connect()
        self.assertIn(b"\r\nConnection: close\r\n", wire.value())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def spare(self) -> tuple[Any, _Wire]:
        """A request without keepalive, answered; then its spare connection, accepted."""
        d = self.client.request(b"POST", URL, body=b"{}")
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        return self.connect()

    def test_spare_connection_carries_the_next_request_at_once(self) -> None:
        """Without keepalive, the next request goes out at once on a spare connection opened
        after the previous one, never used before; it says Connection: close, is not kept,
        and another spare is opened for the one after."""
        _, spare = self.spare()
        self.assertEqual(spare.value(), b"")
        d = self.client.request(b"POST", URL, body=b"next")
        self.assertTrue(spare.value().startswith(b"POST /api/generate?x=1 HTTP/1.1\r\n"))
        self.assertIn(b"\r\nConnection: close\r\n", spare.value())
        self.assertEqual(len(self.reactor.tcpClients), 1)  # the next spare, not this request
        spare.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertTrue(spare.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_spare_closed_when_not_taken(self) -> None:
        """A spare nobody takes within idle_timeout_s is closed, and leaves no timer."""
        _, spare = self.spare()
        self.reactor.advance(4.0)
        self.assertTrue(spare.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.client.request(b"POST", URL, body=b"{}")
        self.assertEqual(len(self.reactor.tcpClients), 2)  # its own, and a new spare

    def test_spare_that_speaks_is_never_used(self) -> None:
        """Bytes on a spare before any request are nobody's: it is aborted, and the next
        request connects afresh."""
        _, spare = self.spare()
        spare.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nstray")
        self.assertTrue(spare.aborted)
        self.client.request(b"POST", URL, body=b"{}")
        self.assertEqual(spare.value(), b"")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_spare_peeked_before_use(self) -> None:
        """A spare that its consumer closed meanwhile is not used."""
        _, spare = self.spare()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        theirs.close()
        spare.getHandle = lambda: ours  # type: ignore[attr-defined]
        self.client.request(b"POST", URL, body=b"{}")
        self.assertEqual(spare.value(), b"")
        self.assertTrue(spare.aborted)

    def test_no_spare_without_idle_room(self) -> None:
        """max_idle 0 keeps no connection at all, spares included; close() closes a spare."""
        client = UpstreamClient(self.reactor, max_idle=0)
        client.request(b"POST", URL, body=b"{}")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.tcpClients.clear()
        _, spare = self.spare()
        self.client.close()
        self.assertTrue(spare.disconnecting)

    def test_hostile_heads_refused_without_quoting_them(self) -> None:
        """Injected headers, control characters in the reason phrase or a header value, a
        5000-digit length, HTTP/1.0 framing tricks: AnswerError, naming no byte of the answer."""
        for raw in [
            b"HTTP/1.1 200 OK\nSet-Cookie: SECRET=1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 O\x00SECRET\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 O\x1bSECRET\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: SECRET\x00\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nSECRET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X: SECRET\r\n" * 300 + b"\r\n",
            b"HTTP/9.9 200 OK SECRET\r\nContent-Length: 0\r\n\r\n",
        ]:
            d = self.request()
            protocol, wire = self.connect()
            protocol.dataReceived(raw)
            error = self.failureResultOf(d, AnswerError).value
            self.assertNotIn("SECRET", str(error), raw[:40])
            self.assertTrue(wire.aborted, raw[:40])

    def test_lenient_chunk_grammar_refused(self) -> None:
        """Whitespace in a chunk size, a bare LF in a chunk extension, endless trailers:
        the body breaks off with AnswerError and the connection is aborted."""
        for body in [
            b"2 \r\nok\r\n0\r\n\r\n",
            b"2;a\nb\r\nok\r\n0\r\n\r\n",
            b"2\r\nok\r\n0\r\n" + b"T: t\r\n" * 100 + b"\r\n",
        ]:
            _, receiver, wire = self.answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
            )
            assert receiver.end is not None, body
            self.assertIsInstance(receiver.end.value, AnswerError, body)
            self.assertTrue(wire.aborted, body)

    def test_http10_chunked_answer_read_then_closed(self) -> None:
        """An HTTP/1.0 answer with Transfer-Encoding has faulty framing: read, then closed
        even though it asks for keep-alive (RFC 9112 section 6.1)."""
        _, receiver, wire = self.answer(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        )
        self.assertEqual(receiver.body, b"ok")
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    @settings(max_examples=examples(100), deadline=None)
    @given(st.binary(max_size=200), st.integers(0, 200))
    def test_garbage_never_quoted(self, garbage: bytes, cut: int) -> None:
        """Whatever a consumer sends, an error about it names none of its bytes."""
        self.setUp()
        raw = garbage[:cut] + b"QZXJWV" + garbage[cut:]
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(raw)
        protocol.connectionLost(Failure(ConnectionDone()))
        receiver = _Receiver()
        errors: list[BaseException | None] = []
        d.addCallbacks(lambda answer: answer.deliver(receiver), lambda f: errors.append(f.value))
        if receiver.end is not None:
            errors.append(receiver.end.value)
        for error in errors:
            self.assertNotIn("QZXJWV", str(error))

    def test_kept_connection_peeked_before_reuse(self) -> None:
        """A kept connection whose consumer closed it, or sent anything since its answer, is
        not reused: the next request goes out on a new connection."""
        for misbehave in ["close", "speak"]:
            self.setUp()
            _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            ours, theirs = socket.socketpair()
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
            wire.getHandle = lambda ours=ours: ours  # type: ignore[attr-defined]
            self.request()
            self.assertEqual(self.reactor.tcpClients, [], "a silent open connection is reused")
            wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            if misbehave == "close":
                theirs.close()
            else:
                theirs.send(b"HTTP/1.1 200 OK\r\n")
            self.request()
            self.assertEqual(len(self.reactor.tcpClients), 1, misbehave)
            self.assertTrue(wire.aborted, misbehave)
            self.assertEqual(self.client.suspended("http://127.0.0.1:11434"), misbehave == "speak")

    def test_stale_kept_connection_retried_for_idempotent_requests(self) -> None:
        """A GET whose kept connection closes before a byte of answer goes out again, once,
        on a new connection."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d = self.request(method=b"GET", body=None)
        wire.protocol.connectionLost(Failure(ConnectionDone()))  # its FIN crossed the request
        self.assertNoResult(d)
        protocol, fresh = self.connect()
        self.assertTrue(fresh.value().startswith(b"GET /api/generate?x=1 HTTP/1.1\r\n"))
        protocol.connectionLost(Failure(ConnectionDone()))  # the second time is final
        self.failureResultOf(d, NoAnswer)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_stale_kept_connection_not_retried_otherwise(self) -> None:
        """A POST may have been acted on, and an answer that began is no stale connection:
        neither is sent again."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d = self.request(method=b"POST", body=b"{}")
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, StaleConnection)
        # A consumer that closes kept connections without saying so is reused no more.
        self.assertTrue(self.client.suspended("http://127.0.0.1:11434"))
        self.client = UpstreamClient(self.reactor, max_idle=2)
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d = self.request(method=b"GET", body=None)
        wire.protocol.dataReceived(b"HTTP/1.1 200")
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, AnswerError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_close_closes_idle_connections(self) -> None:
        """close() fires once every kept connection is gone, and leaves no timer."""
        _, _, wire = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        closing = self.client.close()
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertNoResult(closing)
        assert wire.protocol is not None
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closing)

    def test_nothing_kept_after_close(self) -> None:
        """A request still running at close() gives its connection up when it ends."""
        d = self.request()
        protocol, wire = self.connect()
        self.successResultOf(self.client.close())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SplitAnswerTests(SynchronousTestCase):
    ANSWER = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nWiki\r\n6;name=value\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nT: 1\r\n\r\n"
    )

    @settings(max_examples=examples(100), deadline=None)
    @given(st.lists(st.integers(0, len(ANSWER)), max_size=8))
    def test_any_split_decodes_the_same(self, cuts: list[int]) -> None:
        """However the answer's bytes are split, the body, the end and the kept connection agree."""
        client = UpstreamClient(MemoryReactorClock())
        d = client.request(b"POST", URL, body=b"{}", keepalive=True)
        reactor: Any = client._clock
        _, _, factory, _, _ = reactor.tcpClients.pop(0)
        protocol = factory.buildProtocol(None)
        wire = _Wire()
        protocol.makeConnection(wire)
        receiver = _Receiver()
        d.addCallback(lambda answer: answer.deliver(receiver))
        bounds = [0, *sorted(cuts), len(self.ANSWER)]
        for start, end in itertools.pairwise(bounds):
            if end > start:
                protocol.dataReceived(self.ANSWER[start:end])
        self.assertEqual(receiver.body, b"Wikipedia in \r\n\r\nchunks.")
        assert receiver.end is not None
        self.assertIsInstance(receiver.end.value, ResponseDone)
        self.assertEqual(client.idle_connections(), 1)


class EndpointCacheTests(SynchronousTestCase):
    """One endpoint per origin, of the cheapest kind."""

    def setUp(self) -> None:
        self.cache = EndpointCache(MemoryReactorClock(), 5.0)

    def endpoint(self, url: bytes) -> object:
        return self.cache.endpointForURI(URI.fromBytes(url))

    def test_same_origin_same_endpoint(self) -> None:
        """The same host and port give the very same endpoint object; another port does not."""
        first = self.endpoint(b"http://127.0.0.1:11434/api/generate")
        self.assertIs(self.endpoint(b"http://127.0.0.1:11434/api/ps"), first)
        self.assertIsNot(self.endpoint(b"http://127.0.0.1:8188/"), first)

    def test_endpoint_kinds(self) -> None:
        """IP literals get plain TCP endpoints, names a HostnameEndpoint, https a TLS wrapper."""
        self.assertIsInstance(self.endpoint(b"http://127.0.0.1:1/"), TCP4ClientEndpoint)
        self.assertIsInstance(self.endpoint(b"http://[::1]:1/"), TCP6ClientEndpoint)
        self.assertIsInstance(self.endpoint(b"http://localhost:1/"), HostnameEndpoint)
        tls = self.endpoint(b"https://127.0.0.1:1/")
        self.assertNotIsInstance(tls, TCP4ClientEndpoint)
        self.assertIsInstance(tls._wrappedEndpoint, TCP4ClientEndpoint)  # type: ignore[attr-defined]

    def test_unsupported_scheme(self) -> None:
        """A scheme other than http or https is refused with SchemeNotSupported."""
        self.assertRaises(SchemeNotSupported, self.endpoint, b"ftp://127.0.0.1/")


class _RecordingDescriptor(FileDescriptor):
    """A transport that records what reaches the socket, as a TCP connection would."""

    def __init__(self) -> None:
        super().__init__(MemoryReactorClock())
        self.connected = 1
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 1)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 2)

    def startWriting(self) -> None:
        pass

    def stopWriting(self) -> None:
        pass


class EagerWriteTests(SynchronousTestCase):
    def test_request_sent_without_waiting_for_the_reactor(self) -> None:
        """A request reaches the socket at once, not on the reactor's next turn."""
        reactor = MemoryReactorClock()
        client = UpstreamClient(reactor)
        client.request(b"POST", b"http://127.0.0.1:1/api/synthesize", body=b"{}")
        protocol: Any = reactor.tcpClients[0][2].buildProtocol(None)
        transport = _RecordingDescriptor()
        protocol.makeConnection(transport)
        self.assertTrue(b"".join(transport.sent).startswith(b"POST /api/synthesize HTTP/1.1"))


class _Streaming:
    """A body producer of unknown length that writes when the test says."""

    length: int | str = UNKNOWN_LENGTH

    def __init__(self) -> None:
        self.consumer: Any = None
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


def _immediate() -> Cooperator:
    """A cooperator that runs each step at once: FileBodyProducer finishes synchronously."""

    def run(step: Any) -> Any:
        step()

    return Cooperator(scheduler=run, started=True)
