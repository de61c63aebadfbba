"""Tests for mgpu.site: timed requests, the head deadline, bad heads, the body limit, the log."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpu.site import CLOSING_LINGER_S, REFUSED_LINGER_S, AccessLog, BrokerSite


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
        # Each line starts with the time its request ended (the batch's event has its own).
        self.assertTrue(
            lines[0].startswith(
                "00:00:00.000 GET /healthz consumer=- status=200 wait=- took=0.0ms bytes=5 "
            ),
            lines[0],
        )
        # A path the client chose is not echoed as a route: logs and labels stay bounded.
        self.assertTrue(
            lines[1].startswith("00:00:00.000 GET other consumer=- status=200 "), lines[1]
        )

    def test_each_line_carries_its_own_time(self) -> None:
        """Lines of one batch carry the times their requests ended, not the batch's."""
        self.get(b"/healthz")
        self.clock.advance(0.25)
        self.get(b"/healthz")
        self.access.flush()
        self.assertEqual([line[:12] for line in self.access_lines()],
                         ["00:00:00.000", "00:00:00.250"])  # fmt: skip

    def test_line_names_consumer_and_queue_wait(self) -> None:
        """A scheduled request's line says which consumer served it and how long it queued."""
        self.get(b"/v1/tts")
        self.access.flush()
        [line] = self.access_lines()
        self.assertTrue(
            line.startswith(
                "00:00:00.000 GET /v1/tts consumer=mvoice status=200 wait=12.5ms took=0.0ms "
                "bytes=5 "
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
        self.connect()

    def connect(self) -> None:
        """A fresh connection to the site; nothing refused yet."""
        self.refused.clear()
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

    def test_openai_route_refused_in_openai_envelope(self) -> None:
        """On OpenAI's routes (a query string too) the 413 is OpenAI's error envelope, which
        the SDK reads; declared or counted, nothing reaches a resource."""
        for head in (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n",
            b"POST /v1/audio/transcriptions?x=1 HTTP/1.1\r\nHost: h\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n65\r\n" + b"a" * 101 + b"\r\n",
        ):
            self.connect()
            self.channel.dataReceived(head)
            answer = self.transport.value()
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
            self.assertIn(b"Content-Type: application/json", answer)
            document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            self.assertEqual(
                document,
                {"error": {"message": "the request body is over 0 MiB",
                           "type": "invalid_request_error", "param": None,
                           "code": "payload_too_large"}},
            )  # fmt: skip
            self.assertEqual((self.refused, self.echo.bodies), ([True], []))

    def test_other_v1_paths_keep_the_broker_schema(self) -> None:
        """/v1/tts and a look-alike of an OpenAI route are refused in the broker's schema."""
        for path in (b"/v1/tts", b"/v1/chat/completionsx", b"/x?/v1/chat/completions"):
            self.connect()
            self.channel.dataReceived(
                b"POST " + path + b" HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n"
            )
            self.assert_refused()

    def test_body_at_the_limit_served(self) -> None:
        """A body of exactly the limit reaches the resource whole."""
        self.channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"z" * 100
        )
        self.assertEqual(self.echo.bodies, [b"z" * 100])
        self.assertEqual(self.refused, [])


class Slow(Resource):
    """Answers only when the test says so (a request that runs for a while)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> int:
        self.waiting.append(request)
        return NOT_DONE_YET

    def answer(self) -> None:
        request = self.waiting.pop(0)
        request.write(b"done")
        request.finish()


class HeadDeadlineTests(SynchronousTestCase):
    """limits.header_timeout_s: a request head must be complete that long after it was due."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.slow = Slow()
        self.timed_out: list[bool] = []
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.site = BrokerSite(
            self.slow, self.clock, AccessLog(Clock()), max_body_bytes=100,
            header_timeout_s=10.0, on_header_timeout=lambda: self.timed_out.append(True),
        )  # fmt: skip

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(None)
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def drip(self, channel: Any, data: bytes, every: float) -> None:
        """Send ``data`` one byte at a time, ``every`` seconds apart."""
        for byte in data:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(every)

    def test_drip_closed_at_deadline(self) -> None:
        """A head dripped a byte every 0.5 s is closed header_timeout_s after the connection
        opened, though each byte resets Twisted's idle timeout; no answer, no log line, counted."""
        channel, transport = self.connect()
        self.drip(channel, b"GET /x HTTP/1.1\r\nHost: ", 0.5)  # 24 bytes: 12 s of dripping
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.slow.waiting, [])
        self.assertEqual(self.timed_out, [True])
        self.assertEqual(self.events, [])

    def test_deadline_is_exact(self) -> None:
        """The connection is still open just before header_timeout_s and closed at it."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_head_in_time_served_then_next_due(self) -> None:
        """A head dripped within the deadline is served, however long the request then runs;
        the next head is due header_timeout_s after its answer."""
        channel, transport = self.connect()
        self.drip(channel, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", 0.3)  # 9 s
        self.assertEqual(len(self.slow.waiting), 1)
        self.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        self.slow.answer()
        self.assertIn(b"done", transport.value())
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_kept_alive_deadline_counts_from_previous_request(self) -> None:
        """On a kept-alive connection the next head is due header_timeout_s after the previous
        request finished, not after the connection opened."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.clock.advance(30)
        self.slow.answer()
        channel.dataReceived(b"GET /2 HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timed_out, [True])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer outlives the connection

    def test_idle_kept_alive_connection_closed_uncounted(self) -> None:
        """A kept-alive connection that sends nothing after its answer is closed after
        header_timeout_s, and not counted as a slow head."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.slow.answer()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timed_out, [])

    def test_silent_connection_closed_uncounted(self) -> None:
        """A connection that never sends a byte is closed at header_timeout_s, uncounted."""
        _, transport = self.connect()
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timed_out, [])

    def test_pipelined_partial_head_counted(self) -> None:
        """Part of a next head sent while a request ran is due header_timeout_s after that
        request ends, and counts as a slow head when it is not completed."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\n")
        self.clock.advance(30)
        self.slow.answer()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timed_out, [True])

    def test_pipelined_head_served(self) -> None:
        """A head that arrived whole while the previous request ran is served when it ends,
        is not cut by the deadline while it runs, and the next head is due after its answer."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.slow.answer()
        self.assertEqual([r.path for r in self.slow.waiting], [b"/2"])
        self.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        self.slow.answer()
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.timed_out, [])

    def test_new_value_applies_to_new_connections(self) -> None:
        """A changed header_timeout_s (a reload) applies to connections opened after it; one
        already waiting keeps the deadline it started with."""
        _, before = self.connect()
        self.site.header_timeout_s = 2.0
        _, after = self.connect()
        self.clock.advance(2)
        self.assertEqual((before.disconnecting, after.disconnecting), (False, True))
        self.clock.advance(8)
        self.assertTrue(before.disconnecting)

    def test_unflushed_connection_aborted(self) -> None:
        """A connection closed for a slow head that does not go (a client that does not read
        what is still being written to it) is aborted CLOSING_LINGER_S later."""
        _, transport = self.connect()
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(CLOSING_LINGER_S)
        self.assertTrue(transport.disconnected)


class BadHeadTests(SynchronousTestCase):
    """Heads Twisted cannot use are answered 400 bad_request in the error schema."""

    def setUp(self) -> None:
        self.echo = Echo()
        self.site = BrokerSite(self.echo, Clock(), AccessLog(Clock()), max_body_bytes=100)
        channel = self.site.buildProtocol(None)
        assert channel is not None
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)

    def assert_bad_request(self) -> dict[str, Any]:
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        head, body = answer.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn(b"Connection: close", head)
        document: dict[str, Any] = json.loads(body)
        self.assertEqual((document["error"], document["retryable"]), ("bad_request", False))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.echo.bodies, [])
        return document

    def test_content_length_too_long_for_int(self) -> None:
        """A Content-Length of 5000 digits (int() refuses over 4300) is 400 bad_request,
        raises nothing and logs nothing, and no resource sees the request."""
        self.channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nbody"
        )
        document = self.assert_bad_request()
        self.assertIn("Content-Length", document["message"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_content_length_too_long_not_last_header(self) -> None:
        """The same with headers after it: nothing after the refusal is parsed."""
        self.channel.dataReceived(
            b"POST /x HTTP/1.1\r\nContent-Length: " + b"1" * 5000 + b"\r\nHost: h\r\n\r\n"
        )
        self.assert_bad_request()

    def test_request_line_refused_by_twisted(self) -> None:
        """A request line Twisted refuses itself (a 0xFF byte in the target) is 400
        bad_request in the broker's error schema, not a bare 400."""
        self.channel.dataReceived(
            b"POST /x?q=\xff HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
        )
        self.assert_bad_request()
