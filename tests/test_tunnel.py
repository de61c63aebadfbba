"""Tests for mgpu.tunnel: the handshake relayed, the connection taken over, bytes both ways.

The client is the broker's own ``BrokerSite`` channel over a ``StringTransport``
(so the head deadline, the connection cap and the access log are the real
ones); the consumer is a ``StringTransport`` that a fake endpoint connects the
tunnel's protocol to; the test writes the consumer's answer by hand.
"""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpu.api import render_error
from mgpu.config import AuthConfig, ConsumerConfig
from mgpu.errors import BrokerError
from mgpu.events import Event
from mgpu.site import AccessLog, BrokerSite
from mgpu.tunnel import (
    MAX_HEAD,
    STOP_GRACE_S,
    AnswerReader,
    BadAnswer,
    NoAnswer,
    Refused,
    Switched,
    Tunnels,
    TunnelService,
    take_over,
)
from tests.fuzz import examples
from tests.integration.harness import parse_response
from tests.test_facade import Broker, native_config

CONSUMER = ConsumerConfig(
    name="comfyui", url="http://127.0.0.1:8188", paths={}, vram_resident_mib=0, timeout_s=30
)
CLIENT = IPv4Address("TCP", "10.0.0.7", 40000)
TARGET = b"/ws?clientId=abc"
HANDSHAKE = (
    b"GET /comfyui/ws?clientId=abc HTTP/1.1\r\n"
    b"Host: broker.example:8770\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Keep-Alive: 300\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    b"Origin: http://broker.example:8770\r\n"
    b"Cookie: session=1\r\n"
    b"Authorization: Bearer secret\r\n"
    b"X-Forwarded-Prefix: /elsewhere\r\n"
    b"\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"\r\n"
)
#: A text frame "hi" from the server (unmasked), and one from a client (masked).
SERVER_FRAME = b"\x81\x02hi"
CLIENT_FRAME = b"\x81\x82\x01\x02\x03\x04" + bytes([ord("h") ^ 1, ord("i") ^ 2])


class Connection(StringTransport):
    """A ``StringTransport`` that knows its protocol, as a TCP connection does."""

    protocol: IProtocol

    def receive(self, data: bytes) -> None:
        """The peer sent ``data``."""
        self.protocol.dataReceived(data)

    def lost(self) -> None:
        """The connection closed."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Recorder(Protocol):
    """Keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class FakeEndpoint:
    """Connects each protocol to a ``StringTransport``: at once, or when the test says."""

    def __init__(self) -> None:
        self.hold = False
        self.refuse = False
        self.answer = b""
        self.attempts: list[tuple[Deferred[IProtocol], IProtocol]] = []
        self.cancelled = 0
        self.connections: list[tuple[IProtocol, Connection]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = factory.buildProtocol(CLIENT)
        assert protocol is not None
        d: Deferred[IProtocol] = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.attempts.append((d, protocol))
        if self.refuse:
            d.errback(ConnectionRefusedError("Connection refused"))
        elif not self.hold:
            self.complete()
        return d

    def complete(self) -> None:
        d, protocol = self.attempts[-1]
        transport = Connection()
        protocol.makeConnection(transport)
        transport.protocol = protocol  # as a TCP connection's
        self.connections.append((protocol, transport))
        d.callback(protocol)
        if self.answer:  # the consumer answers before the client's bytes are all parsed
            protocol.dataReceived(self.answer)


class Dispatch(Resource):
    """Hands each request to ``Tunnels.open`` as the broker's router does (``_respond``)."""

    isLeaf = True

    def __init__(self, tunnels: Tunnels) -> None:
        super().__init__()
        self.tunnels = tunnels
        self.drop_authorization = True
        self.outcomes: list[object] = []

    def render(self, request: Request) -> int:
        opened = self.tunnels.open(
            request,
            CONSUMER,
            TARGET,
            prefix=b"/comfyui",
            drop_authorization=self.drop_authorization,
        )
        gone: list[bool] = []

        def left(_: Failure) -> None:
            gone.append(True)
            opened.cancel()

        request.notifyFinish().addErrback(left)

        def done(_: object) -> None:
            self.outcomes.append(None)
            if request.channel.transport is not None:  # a refusal: still HTTP
                request.finish()

        def failed(failure: Failure) -> None:
            self.outcomes.append(failure.value)
            if not gone and isinstance(failure.value, BrokerError):
                request.write(render_error(request, failure.value))
                request.finish()

        opened.addCallbacks(done, failed)
        return NOT_DONE_YET


class TunnelTestCase(SynchronousTestCase):
    """A BrokerSite whose every request is a tunnel to CONSUMER, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.tunnels = Tunnels(self.clock, lambda uri: cast(Any, self.endpoint))
        self.dispatch = Dispatch(self.tunnels)
        self.access = AccessLog(self.clock)
        self.observed: list[Request] = []
        self.site = BrokerSite(
            self.dispatch,
            self.clock,
            self.access,
            max_body_bytes=1024,
            observers=[self.observed.append],
        )

    def client(self, data: bytes = HANDSHAKE) -> Connection:
        """A client connection to the site that has sent ``data``."""
        channel = self.site.buildProtocol(CLIENT)
        transport = Connection(peerAddress=CLIENT)
        channel.makeConnection(transport)
        transport.protocol = channel  # as a TCP connection's
        if data:
            channel.dataReceived(data)
        return transport

    def consumer(self) -> tuple[IProtocol, Connection]:
        """The latest connection to the consumer: its protocol and transport."""
        return self.endpoint.connections[-1]

    def open_tunnel(self, early: bytes = b"", rest: bytes = b"") -> tuple[Connection, Connection]:
        """A client whose handshake the consumer switched; both transports, emptied."""
        client = self.client(HANDSHAKE + early)
        protocol, upstream = self.consumer()
        upstream.clear()
        protocol.dataReceived(SWITCHED + rest)
        client.clear()
        return client, upstream

    def error_of(self, client: Connection) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of the broker's error answer on ``client``."""
        response = parse_response(client.value())
        return response.status, response.json()


def _head_lines(data: bytes) -> list[bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep and not rest, data
    return head.split(b"\r\n")


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])]


class HandshakeTests(TunnelTestCase):
    def test_head_sent_to_consumer(self) -> None:
        """The consumer gets GET target with the client's WebSocket headers, its Host, Origin
        and cookies, Connection: Upgrade, X-Forwarded-*; not the broker's token, no body."""
        self.client()
        _, upstream = self.consumer()
        lines = _head_lines(upstream.value())
        self.assertEqual(lines[0], b"GET /ws?clientId=abc HTTP/1.1")
        self.assertEqual(lines[1], b"Host: broker.example:8770")
        fields = _fields(lines)
        names = [name for name, _ in fields]
        self.assertEqual(dict(fields)[b"upgrade"], b"websocket")
        self.assertEqual([v for n, v in fields if n == b"connection"], [b"Upgrade"])
        self.assertEqual(dict(fields)[b"sec-websocket-key"], b"dGhlIHNhbXBsZSBub25jZQ==")
        self.assertEqual(dict(fields)[b"sec-websocket-version"], b"13")
        self.assertEqual(dict(fields)[b"sec-websocket-extensions"], b"permessage-deflate")
        self.assertEqual(dict(fields)[b"origin"], b"http://broker.example:8770")
        self.assertEqual(dict(fields)[b"cookie"], b"session=1")
        self.assertEqual(dict(fields)[b"x-forwarded-host"], b"broker.example:8770")
        self.assertEqual(dict(fields)[b"x-forwarded-proto"], b"http")
        self.assertEqual([v for n, v in fields if n == b"x-forwarded-prefix"], [b"/comfyui"])
        self.assertEqual(dict(fields)[b"x-forwarded-for"], b"10.0.0.7")
        for absent in (b"authorization", b"keep-alive", b"content-length", b"transfer-encoding"):
            self.assertNotIn(absent, names)
        self.assertEqual(names.count(b"host"), 1)

    def test_authorization_kept_without_broker_auth(self) -> None:
        """Without the broker's own token, the client's Authorization is the consumer's."""
        self.dispatch.drop_authorization = False
        self.client()
        _, upstream = self.consumer()
        self.assertIn(b"Authorization: Bearer secret", _head_lines(upstream.value()))

    def test_non_get_refused(self) -> None:
        """A handshake that is not a GET is 400 bad_request; nothing reaches the consumer."""
        client = self.client(HANDSHAKE.replace(b"GET ", b"POST ", 1))
        self.assertEqual(self.error_of(client)[0], 400)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(client.disconnecting)


class SwitchTests(TunnelTestCase):
    def test_101_byte_for_byte_then_bytes_both_ways(self) -> None:
        """The consumer's 101 reaches the client as sent, with the frame after it; then
        each side's bytes reach the other, in order."""
        client = self.client()
        protocol, upstream = self.consumer()
        upstream.clear()
        protocol.dataReceived(SWITCHED[:40])
        self.assertEqual(client.value(), b"")
        protocol.dataReceived(SWITCHED[40:] + SERVER_FRAME)
        self.assertEqual(client.value(), SWITCHED + SERVER_FRAME)
        client.clear()
        client.receive(CLIENT_FRAME)
        client.receive(b"more")
        self.assertEqual(upstream.value(), CLIENT_FRAME + b"more")
        protocol.dataReceived(b"one")
        protocol.dataReceived(b"two")
        self.assertEqual(client.value(), b"onetwo")
        self.assertEqual(self.dispatch.outcomes, [None])
        self.assertEqual((self.tunnels.open_count, self.tunnels.opened_total), (1, 1))

    def test_pipelined_bytes_forwarded_first(self) -> None:
        """Frames the client sent right after its head reach the consumer after the 101,
        before anything sent later."""
        client, upstream = self.open_tunnel(early=CLIENT_FRAME)
        self.assertEqual(upstream.value(), CLIENT_FRAME)
        client.receive(b"later")
        self.assertEqual(upstream.value(), CLIENT_FRAME + b"later")

    def test_bytes_sent_while_waiting_forwarded_first(self) -> None:
        """Bytes that arrive while the consumer has not answered are kept, then sent first."""
        client = self.client()
        client.receive(CLIENT_FRAME)
        protocol, upstream = self.consumer()
        upstream.clear()
        protocol.dataReceived(SWITCHED)
        self.assertEqual(upstream.value(), CLIENT_FRAME)

    def test_switch_within_the_heads_parse(self) -> None:
        """A 101 that comes while the channel still parses the client's bytes takes the
        bytes after the head too (they are still in the line parser's buffer)."""
        self.endpoint.answer = SWITCHED
        client = self.client(HANDSHAKE + CLIENT_FRAME)
        _, upstream = self.consumer()
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n" + CLIENT_FRAME))
        self.assertEqual(client.value(), SWITCHED)
        client.receive(b"later")
        self.assertTrue(upstream.value().endswith(CLIENT_FRAME + b"later"))

    def test_backpressure_both_ways(self) -> None:
        """Each connection is the other's producer: a full client pauses the consumer's
        connection, a full consumer connection pauses the client's, and both resume."""
        client, upstream = self.open_tunnel()
        self.assertIs(client.producer, upstream)
        self.assertIs(upstream.producer, client)
        self.assertTrue(client.streaming and upstream.streaming)
        for full, other in ((client, upstream), (upstream, client)):
            producer = full.producer  # what a transport pauses when its buffer fills
            assert producer is not None
            producer.pauseProducing()
            self.assertEqual(other.producerState, "paused")
            producer.resumeProducing()
            self.assertEqual(other.producerState, "producing")

    def test_one_access_line_no_timers(self) -> None:
        """The switch is logged once (101) and counted once; no head deadline or idle
        timeout is left: an idle tunnel stays open."""
        client, _ = self.open_tunnel()
        self.assertEqual([r.code for r in self.observed], [101])
        self.access.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(7 * 86400)
        self.assertFalse(client.disconnecting)
        client.lost()
        self.assertEqual(len(self.observed), 1)

    def test_the_connection_stays_counted_until_the_tunnel_ends(self) -> None:
        """The connection cap counts the client's connection while the tunnel is open, and
        counts it out once, when the client's side is gone."""
        client, _ = self.open_tunnel()
        self.assertEqual(self.site.cap.open, 1)
        client.lost()
        self.assertEqual(self.site.cap.open, 0)
        protocol, _ = self.consumer()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.cap.open, 0)

    def test_consumer_closing_closes_client_after_writes(self) -> None:
        """When the consumer closes, the client's connection is closed (not cut) and the
        tunnel is gone once the client's side is too."""
        client, upstream = self.open_tunnel()
        upstream.receive(b"last")
        upstream.lost()
        self.assertTrue(client.disconnecting)
        self.assertFalse(client.disconnected)  # loseConnection: "last" is still written
        self.assertIsNone(client.producer)
        self.assertEqual(client.value(), b"last")
        self.assertEqual(self.tunnels.open_count, 1)
        client.lost()
        self.assertEqual(self.tunnels.open_count, 0)

    def test_client_closing_closes_consumer(self) -> None:
        """When the client leaves, the consumer's connection is closed after its writes,
        and the request hears that its connection is gone."""
        client, upstream = self.open_tunnel()
        [request] = self.observed
        lost: list[Failure] = []
        request.notifyFinish().addErrback(lost.append)
        client.receive(b"bye")
        client.lost()
        self.assertEqual(upstream.value(), b"bye")
        self.assertTrue(upstream.disconnecting)
        self.assertFalse(upstream.disconnected)
        self.assertEqual(len(lost), 1)
        protocol, _ = self.consumer()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.tunnels.open_count, 0)
        self.assertEqual(self.tunnels.opened_total, 1)

    def test_daemon_stop_closes_every_tunnel(self) -> None:
        """Stopping closes both sides of every tunnel after their writes, and fires once
        all are gone; a 101 that comes later opens nothing (503 daemon_overloaded)."""
        first = self.open_tunnel()
        second = self.open_tunnel()
        late = self.client()
        stopping = TunnelService(self.tunnels).stopService()
        for transport in (*first, *second):
            self.assertTrue(transport.disconnecting)
            self.assertFalse(transport.disconnected)
        self.assertNoResult(stopping)
        for protocol, _ in self.endpoint.connections[:2]:
            protocol.connectionLost(Failure(ConnectionDone()))
        for client in (first[0], second[0]):
            client.lost()
        self.successResultOf(stopping)
        self.assertEqual(self.tunnels.open_count, 0)
        protocol, upstream = self.consumer()
        protocol.dataReceived(SWITCHED)
        self.assertTrue(upstream.disconnected)
        self.assertEqual(self.tunnels.open_count, 0)
        status, body = self.error_of(late)
        self.assertEqual((status, body["error"]), (503, "daemon_overloaded"))

    def test_daemon_stop_cuts_what_does_not_close(self) -> None:
        """Tunnels still open STOP_GRACE_S after the stop began are cut."""
        client, upstream = self.open_tunnel()
        stopping = self.tunnels.close_all()
        self.clock.advance(STOP_GRACE_S)
        self.assertTrue(client.disconnected and upstream.disconnected)
        self.assertNoResult(stopping)
        client.lost()
        self.consumer()[0].connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopping)


class RefusalTests(TunnelTestCase):
    def test_non_101_relayed_and_connection_closed(self) -> None:
        """A consumer's 403 reaches the client as an ordinary answer, and both connections
        close after it; no tunnel is counted."""
        client = self.client()
        protocol, upstream = self.consumer()
        protocol.dataReceived(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 9\r\nKeep-Alive: timeout=5\r\n\r\nforbidden"
        )
        head, _, body = client.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 403 Forbidden")
        self.assertIn(b"Content-Type: text/plain", lines)
        self.assertIn(b"Connection: close", lines)
        self.assertNotIn(b"Keep-Alive: timeout=5", lines)
        self.assertEqual(body, b"forbidden")
        self.assertTrue(client.disconnecting)
        self.assertTrue(upstream.disconnecting)
        self.assertEqual((self.tunnels.open_count, self.tunnels.opened_total), (0, 0))
        self.assertEqual([r.code for r in self.observed], [403])

    def test_body_until_close_relayed(self) -> None:
        """An answer whose body runs to the connection's end is relayed at that end."""
        client = self.client()
        protocol, _ = self.consumer()
        protocol.dataReceived(b"HTTP/1.1 404 Not Found\r\n\r\nno such")
        self.assertEqual(client.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn(b"HTTP/1.1 404 Not Found", client.value())
        self.assertTrue(client.value().endswith(b"\r\n\r\nno such"))

    def test_head_too_large(self) -> None:
        """A consumer head over MAX_HEAD is 502 bad_answer and its connection is cut."""
        client = self.client()
        protocol, upstream = self.consumer()
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n")
        protocol.dataReceived(b"X-Pad: " + b"a" * MAX_HEAD + b"\r\n")
        status, body = self.error_of(client)
        self.assertEqual((status, body["error"]), (502, "bad_answer"))
        self.assertTrue(upstream.disconnected)
        self.assertTrue(client.disconnecting)

    def test_101_without_upgrade(self) -> None:
        """A 101 that names no protocol is 502 bad_answer."""
        client = self.client()
        protocol, upstream = self.consumer()
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertEqual(self.error_of(client)[1]["error"], "bad_answer")
        self.assertTrue(upstream.disconnected)

    def test_too_slow(self) -> None:
        """No answer head within the consumer's timeout_s is 504 upstream_timeout."""
        client = self.client()
        _, upstream = self.consumer()
        self.clock.advance(CONSUMER.timeout_s - 0.1)
        self.assertEqual(client.value(), b"")
        self.clock.advance(0.1)
        status, body = self.error_of(client)
        self.assertEqual((status, body["error"]), (504, "upstream_timeout"))
        self.assertTrue(upstream.disconnected)

    def test_connect_too_slow(self) -> None:
        """The timeout covers the connection attempt too: it is cancelled."""
        self.endpoint.hold = True
        client = self.client()
        self.clock.advance(CONSUMER.timeout_s)
        self.assertEqual(self.error_of(client)[1]["error"], "upstream_timeout")
        self.assertEqual(self.endpoint.cancelled, 1)

    def test_refused(self) -> None:
        """A consumer that refuses the connection is 502 consumer_unreachable."""
        self.endpoint.refuse = True
        client = self.client()
        status, body = self.error_of(client)
        self.assertEqual((status, body["error"]), (502, "consumer_unreachable"))

    def test_closed_before_answering(self) -> None:
        """A consumer that closes without a byte is 502 consumer_unreachable."""
        client = self.client()
        self.consumer()[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.error_of(client)[1]["error"], "consumer_unreachable")

    def test_client_leaves_during_handshake(self) -> None:
        """A client gone before the 101 cuts the consumer's connection; nothing opens."""
        client = self.client()
        _, upstream = self.consumer()
        client.lost()
        self.assertTrue(upstream.disconnected)
        self.assertIsInstance(self.dispatch.outcomes[0], CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.site.cap.open, 0)


class AnswerReaderTests(SynchronousTestCase):
    def test_101_fed_byte_by_byte(self) -> None:
        """The head is exactly the 101's bytes; what follows it is the rest."""
        reader = AnswerReader()
        data = SWITCHED + SERVER_FRAME
        outcome = None
        for i in range(len(data)):
            outcome = reader.feed(data[i : i + 1])
            if outcome is not None:
                break
        assert isinstance(outcome, Switched)
        self.assertEqual(outcome.head, SWITCHED)
        self.assertEqual(outcome.phrase, b"Switching Protocols")
        self.assertEqual(outcome.rest, b"")  # the next byte comes in the tunnel

    def test_101_with_rest(self) -> None:
        """Bytes after the 101's head in the same read are its rest."""
        outcome = AnswerReader().feed(SWITCHED + SERVER_FRAME)
        self.assertEqual(outcome, Switched(b"Switching Protocols", SWITCHED, SERVER_FRAME))

    def test_chunked_refusal(self) -> None:
        """A chunked refusal is read whole."""
        outcome = AnswerReader().feed(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n"
        )
        assert isinstance(outcome, Refused)
        self.assertEqual((outcome.code, outcome.body), (400, b"no"))

    def test_broken_answers(self) -> None:
        """Interim answers, control characters and non-HTTP are bad answers."""
        for data in (
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 101 Swi\x01tching\r\nUpgrade: websocket\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        ):
            self.assertRaises(BadAnswer, AnswerReader().feed, data)

    def test_nothing(self) -> None:
        """A connection closed before any byte is no answer; inside a head, a bad one."""
        self.assertRaises(NoAnswer, AnswerReader().end)
        reader = AnswerReader()
        reader.feed(b"HTTP/1.1 101 Swi")
        self.assertRaises(BadAnswer, reader.end)

    @settings(max_examples=examples(300), deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.builds(
                lambda cut, junk: SWITCHED[:cut] + junk + SWITCHED[cut:] + SERVER_FRAME,
                st.integers(0, len(SWITCHED)),
                st.binary(max_size=8),
            ),
        ),
        st.lists(st.integers(1, 40), max_size=20),
    )
    def test_any_answer_is_an_outcome_or_a_clean_refusal(
        self, data: bytes, sizes: list[int]
    ) -> None:
        """Whatever a consumer sends, cut anywhere: a 101 (its head and rest exactly the
        bytes sent), a whole answer, more to read, or BadAnswer/NoAnswer; nothing else."""
        reader, sent, outcome = AnswerReader(), b"", None
        pieces = [data[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
        pieces.append(data[sum(sizes) :])
        try:
            for piece in filter(None, pieces):
                sent += piece
                outcome = reader.feed(piece)
                if outcome is not None:
                    break
            else:
                outcome = reader.end()
        except (BadAnswer, NoAnswer):
            return
        if isinstance(outcome, Switched):
            self.assertEqual(outcome.head + outcome.rest, sent)
            self.assertTrue(outcome.head.startswith(b"HTTP/1.1 101"))
        else:
            assert isinstance(outcome, Refused)
            self.assertNotEqual(outcome.code, 101)


class TakeOverTests(SynchronousTestCase):
    def test_tls_wrapper_keeps_wrapping(self) -> None:
        """Under a wrapping protocol (TLS), the wrapper stays and its content changes."""
        clock = Clock()
        site = BrokerSite(Resource(), clock, AccessLog(clock), max_body_bytes=1024)
        requests: list[Request] = []

        class Keep(Resource):
            isLeaf = True

            def render(self, request: Request) -> int:
                requests.append(request)
                return NOT_DONE_YET

        site.resource = Keep()
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), site.buildProtocol(CLIENT))
        raw = StringTransport(peerAddress=CLIENT)
        wrapper.makeConnection(raw)
        wrapper.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\nearly")
        protocol = Recorder()
        taken = take_over(requests[0], protocol)
        self.assertIs(taken.transport, wrapper)
        self.assertIs(wrapper.wrappedProtocol, protocol)
        self.assertEqual(taken.pending, b"early")
        wrapper.dataReceived(b"frame")
        self.assertEqual(protocol.received, [b"frame"])
        self.assertIsNone(requests[0].channel.transport)


class FakeTunnels:
    """Stands for ``Tunnels`` in the facade: records each call, answers as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str, bytes, bytes, bool]] = []
        self.error: BrokerError | None = None

    def open(
        self,
        request: Request,
        consumer: ConsumerConfig,
        target: bytes,
        *,
        prefix: bytes,
        drop_authorization: bool,
    ) -> Deferred[None]:
        self.calls.append((request.uri, consumer.name, target, prefix, drop_authorization))
        return succeed(None) if self.error is None else fail(self.error)


class FacadeWebSocketTests(SynchronousTestCase):
    """Facade.serve_websocket: health-gated, never scheduled, failures told as for relays."""

    def setUp(self) -> None:
        self.broker = Broker(native_config(auth=AuthConfig(token_file="/etc/token")))
        self.tunnels = FakeTunnels()
        self.broker.facade.tunnels = cast(Tunnels, self.tunnels)
        self.events: list[Event] = []
        self.broker.events.subscribe(self.events.append)

    def upgrade(self) -> Deferred[None]:
        consumer = self.broker.config.consumers["comfyui"]
        facade = self.broker.facade
        _, result = self.broker._send(
            b"GET", b"/comfyui/ws?clientId=a", b"",
            lambda r: facade.serve_websocket(r, consumer, b"/ws?clientId=a"),
            (b"Upgrade: websocket", b"Connection: Upgrade"),
        )  # fmt: skip
        return result

    def test_tunnel_opened_unscheduled(self) -> None:
        """The tunnel gets the consumer, target, prefix and the auth setting; no lease is
        taken and nothing is counted as a job."""
        self.successResultOf(self.upgrade())
        self.assertEqual(
            self.tunnels.calls,
            [(b"/comfyui/ws?clientId=a", "comfyui", b"/ws?clientId=a", b"/comfyui", True)],
        )
        scheduler = self.broker.scheduler
        self.assertEqual((scheduler.holder, scheduler.stats.completed), (None, 0))
        self.assertEqual(self.broker.requests[0].consumer, "comfyui")  # type: ignore[attr-defined]

    def test_unhealthy_consumer_refused_first(self) -> None:
        """A consumer whose last probe failed is refused without a connection attempt."""
        self.broker.registry.mark_unreachable("comfyui", "connection refused")
        error = self.failureResultOf(self.upgrade(), BrokerError).value
        self.assertEqual(getattr(error, "code", None), "consumer_unreachable")
        self.assertEqual(self.tunnels.calls, [])

    def test_unreachable_marks_the_consumer(self) -> None:
        """A consumer the tunnel cannot reach is marked unreachable for everyone."""
        self.tunnels.error = BrokerError("consumer_unreachable", "refused", "comfyui")
        self.failureResultOf(self.upgrade(), BrokerError)
        self.assertIs(self.broker.registry["comfyui"].healthy, False)

    def test_timeout_is_an_event(self) -> None:
        """A handshake the consumer did not answer in time is a timeout event."""
        self.tunnels.error = BrokerError("upstream_timeout", "slow", "comfyui")
        self.failureResultOf(self.upgrade(), BrokerError)
        timeouts = [e.data for e in self.events if e.kind == "timeout"]
        self.assertEqual(timeouts[-1]["reason"], "upstream")
        self.assertIs(self.broker.registry["comfyui"].healthy, True)
