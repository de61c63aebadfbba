"""Tests for mgpu.site: timed requests and the batched access log."""

from __future__ import annotations

from typing import cast

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from mgpu.site import AccessLog, BrokerSite


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"hello"


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.access = AccessLog(self.clock, flush_s=0.5, max_lines=3)
        self.site = BrokerSite(Hello(), self.clock, self.access)

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
        self.get(b"/a")
        self.get(b"/b")
        self.assertEqual(self.access_lines(), [])
        self.clock.advance(0.5)
        self.assertEqual(len([e for e in self.events if e.get("log_namespace") == "mgpu.site"]), 1)
        lines = self.access_lines()
        self.assertEqual(len(lines), 2)
        self.assertIn('"GET /a" 200 5 ', lines[0])
        self.assertIn('"GET /b" 200 5 ', lines[1])

    def test_full_batch_leaves_at_once(self) -> None:
        """max_lines lines are logged without waiting for the timer."""
        for path in (b"/1", b"/2", b"/3"):
            self.get(path)
        self.assertEqual(len(self.access_lines()), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_flushes(self) -> None:
        """Stopping the site logs what is left and leaves no timer behind."""
        self.get(b"/last")
        self.site.stopFactory()
        self.assertEqual(len(self.access_lines()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
