"""Tests for mgpu.site: timed requests and the batched access log."""

from __future__ import annotations

import json
from typing import cast

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from mgpu.site import REFUSED_LINGER_S, AccessLog, BrokerSite


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        if request.path == b"/v1/tts":  # as the facade notes a scheduled request
            request.consumer = "mvoice"  # type: ignore[attr-defined]
            request.queue_wait_s = 0.0125  # type: ignore[attr-defined]
        return b"hello"


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.access = AccessLog(self.clock, flush_s=0.5, max_lines=3)
        self.observed: list[Request] = []
        self.site = BrokerSite(
            Hello(), self.clock, self.access, max_body_bytes=1024, observers=[self.observed.append]
        )

    def get(self, path: bytes, took: float = 0.0) -> None:
        channel = self.site.buildProtocol(None)
        assert channel is not None
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(took)
        channel.connectionLost(Failure(ConnectionDone()))

    def access_lines(self) -> list[str]:
        return [
            line
            for event in self.events
            if event.get("log_namespace") == "mgpu.site"
            for line in event["lines"].split("\n")
        ]

    def test_lines_leave_in_one_batch(self) -> None:
        """Requests within flush_s are logged together as one event, after flush_s."""
        self.get(b"/healthz")
        self.get(b"/no/such/route")
        self.assertEqual(self.access_lines(), [])
        self.clock.advance(0.5)
        self.assertEqual(len([e for e in self.events if e.get("log_namespace") == "mgpu.site"]), 1)
        lines = self.access_lines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(
            lines[0].startswith("GET /healthz consumer=- status=200 wait=- took=0.0ms bytes=5 "),
            lines[0],
        )
        # A path the client chose is not echoed as a route: logs and labels stay bounded.
        self.assertTrue(lines[1].startswith("GET other consumer=- status=200 "), lines[1])

    def test_line_names_consumer_and_queue_wait(self) -> None:
        """A scheduled request's line says which consumer served it and how long it queued."""
        self.get(b"/v1/tts")
        self.access.flush()
        [line] = self.access_lines()
        self.assertTrue(
            line.startswith(
                "GET /v1/tts consumer=mvoice status=200 wait=12.5ms took=0.0ms bytes=5 "
            ),
            line,
        )

    def test_observers_see_every_finished_request(self) -> None:
        """The site hands each finished request to its observers (the metrics)."""
        self.get(b"/healthz")
        self.get(b"/v1/tts")
        self.assertEqual([r.path for r in self.observed], [b"/healthz", b"/v1/tts"])

    def test_full_batch_leaves_at_once(self) -> None:
        """max_lines lines are logged without waiting for the timer."""
        for path in (b"/healthz", b"/v1/status", b"/metrics"):
            self.get(path)
        self.assertEqual(len(self.access_lines()), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_flushes(self) -> None:
        """Stopping the site logs what is left and leaves no timer behind."""
        self.get(b"/last")
        self.site.stopFactory()
        self.assertEqual(len(self.access_lines()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(request.content.read())
        return b"ok"


class BodyLimitTests(SynchronousTestCase):
    """limits.max_body_mib: a larger body is refused with 413 before any resource sees it."""

    def setUp(self) -> None:
        self.refused: list[bool] = []
        self.echo = Echo()
        self.clock = Clock()
        self.site = BrokerSite(
            self.echo, self.clock, AccessLog(Clock()), max_body_bytes=100,
            on_refused=lambda: self.refused.append(True),
        )  # fmt: skip
        channel = self.site.buildProtocol(None)
        assert channel is not None
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)

    def assert_refused(self) -> None:
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"Connection: close", answer)
        document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(document["error"], "payload_too_large")
        self.assertEqual(document["retryable"], False)
        self.assertEqual(self.refused, [True])

    def test_content_length_over_limit_answered_at_once(self) -> None:
        """The 413 leaves as soon as the headers are in, before any body byte."""
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n")
        self.assert_refused()

    def test_refused_connection_closes_after_linger(self) -> None:
        """A client that keeps the connection after its 413 is cut off after REFUSED_LINGER_S."""
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 999\r\n\r\n")
        self.clock.advance(REFUSED_LINGER_S - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)

    def test_no_100_continue_after_413(self) -> None:
        """A client expecting 100-continue gets only the 413."""
        self.channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n"
        )
        self.assert_refused()
        self.assertNotIn(b"100 Continue", self.transport.value())

    def test_chunked_body_refused_once_over(self) -> None:
        """A chunked body is refused once past the limit and never reaches a resource."""
        self.channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"50\r\n" + b"a" * 80 + b"\r\n"
        )
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"50\r\n" + b"b" * 80 + b"\r\n")
        self.assert_refused()
        self.channel.dataReceived(b"0\r\n\r\n")
        self.assertEqual(self.echo.bodies, [])
        self.assertTrue(self.transport.disconnecting)

    def test_body_at_the_limit_served(self) -> None:
        """A body of exactly the limit reaches the resource whole."""
        self.channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"z" * 100
        )
        self.assertEqual(self.echo.bodies, [b"z" * 100])
        self.assertEqual(self.refused, [])
