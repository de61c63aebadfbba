"""Client connections past the descriptor budget: answered 503, counted, logged once."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from mgpu import shed
from mgpu.shed import LINGER_S, LOG_EVERY_S, ConnectionCap, OverloadedAnswer
from mgpu.site import AccessLog, BrokerSite
from tests.integration.harness import parse_response

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)


class _HalfClosing(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=CLIENT)
        self.half_closed = False

    def loseWriteConnection(self) -> None:
        self.half_closed = True


class ShedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logged: list[dict[str, Any]] = []
        self.patch(shed, "log", Logger(observer=cast(ILogObserver, self.logged.append)))
        self.counted = 0

        def count() -> None:
            self.counted += 1

        self.cap = ConnectionCap(self.clock, budget=2, on_shed=count)
        self.site = BrokerSite(
            Resource(), self.clock, AccessLog(self.clock), max_body_bytes=1024, cap=self.cap
        )

    def connect(self) -> tuple[Any, _HalfClosing]:
        protocol = self.site.buildProtocol(CLIENT)
        transport = _HalfClosing()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_past_the_budget_answered_503(self) -> None:
        """The connections within the budget are served; the next one gets 503
        daemon_overloaded with Retry-After, half-closed, then closed after LINGER_S."""
        first, _ = self.connect()
        self.connect()
        self.assertEqual(self.cap.open, 2)
        protocol, transport = self.connect()
        self.assertIsInstance(protocol, OverloadedAnswer)
        answer = parse_response(transport.value())
        self.assertEqual((answer.status, answer.header("retry-after")), (503, "1"))
        self.assertEqual(json.loads(answer.body)["error"], "daemon_overloaded")
        self.assertTrue(transport.half_closed)
        self.clock.advance(LINGER_S)
        self.assertTrue(transport.disconnecting)
        self.assertEqual((self.cap.shed, self.counted), (1, 1))
        first.connectionLost(None)
        self.assertEqual(self.cap.open, 1)
        protocol, _ = self.connect()
        self.assertNotIsInstance(protocol, OverloadedAnswer)

    def test_kept_until_the_client_closes(self) -> None:
        """A shed connection reads and drops what the client sends, however long, and is not
        closed under it (a close before the client's last bytes would reset the answer
        away); when the client closes, the linger timer goes and the slot is free."""
        self.connect()
        self.connect()
        before = set(self.clock.getDelayedCalls())
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /v1/tts HTTP/1.1\r\nHost: x\r\n\r\n")
        protocol.dataReceived(b"x" * 10_000)
        self.clock.advance(LINGER_S / 2)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.cap.shedding, 1)
        protocol.connectionLost(None)
        lingering = set(self.clock.getDelayedCalls()) - before
        self.assertEqual((self.cap.shedding, lingering), (0, set()))

    def test_logged_once_per_interval(self) -> None:
        """Shed connections are logged at most once per LOG_EVERY_S, with how many."""
        self.connect()
        self.connect()
        for _ in range(5):
            self.connect()
        self.assertEqual(len(self.logged), 1)
        self.clock.advance(LOG_EVERY_S)
        self.connect()
        self.assertEqual(len(self.logged), 2)
        self.assertEqual(self.logged[1]["n"], 5)

    def test_accepting_pauses_at_the_ceiling(self) -> None:
        """At the ceiling (served and shed connections together) the listening port stops
        accepting, and resumes once a connection closes below it."""

        class Port:
            reading = True

            def stopReading(self) -> None:
                self.reading = False

            def startReading(self) -> None:
                self.reading = True

        port = Port()
        self.cap.ceiling = 3
        self.cap.watch(port)
        self.connect()
        self.connect()
        self.assertTrue(port.reading)
        shed, _ = self.connect()  # past the budget of 2: a 503, and the ceiling reached
        self.assertIsInstance(shed, OverloadedAnswer)
        self.assertFalse(port.reading)
        shed.connectionLost(None)
        self.assertTrue(port.reading)
        self.assertEqual((self.cap.open, self.cap.shedding), (2, 0))

    def test_each_accept_loop_bounded_by_the_room_left(self) -> None:
        """Each accept loop of the port (``doRead``) may accept only as many connections as
        fit below the ceiling: pausing does not stop a loop under way, and connections
        accepted past the limit are reset by Twisted."""
        loops: list[int] = []

        class Port:
            numberAccepts = 100  # Twisted grows it by 20 after each full loop

            def stopReading(self) -> None: ...
            def startReading(self) -> None: ...

            def doRead(self) -> None:
                loops.append(self.numberAccepts)

        port = Port()
        self.cap.ceiling = 5
        self.cap.watch(port)
        port.doRead()
        self.connect()
        self.connect()
        port.numberAccepts = 120
        port.doRead()
        self.connect()
        port.doRead()
        self.assertEqual(loops, [5, 3, 2])

    def test_no_budget_no_shedding(self) -> None:
        """Without a budget (no limit known) every connection is served."""
        cap = ConnectionCap(self.clock)
        self.assertFalse(any(cap.full() for _ in range(10_000)))
