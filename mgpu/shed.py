# -*- test-case-name: tests.test_shed -*-
"""Client connections past the daemon's descriptor budget: answered 503, never dropped.

Past its file-descriptor limit the daemon can neither accept a client (the
kernel's EMFILE on ``accept``, which Twisted logs once per attempt) nor
reach a consumer.  So it keeps count of its client connections and, past a
budget that leaves a reserve for its own work (``FdLimit.for_clients``),
answers each new one ``503 daemon_overloaded`` with ``Retry-After`` and
closes it: every client gets an HTTP answer, the consumers are never
blamed, and the log says so once per interval, not once per connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.errors import BrokerError

log = Logger()

#: The longest a shed connection is kept (reading and dropping) so the client reads its
#: 503; it closes as soon as the client's request head is in, so that closing resets
#: nothing. Shed connections hold descriptors from the reserve: they must not linger.
LINGER_S: Final = 0.25
#: At most one log line per this long about shed connections.
LOG_EVERY_S: Final = 10.0


class ConnectionCap:
    """Counts the open client connections against a budget (None: no budget)."""

    def __init__(
        self,
        clock: IReactorTime,
        budget: int | None = None,
        on_shed: Callable[[], object] = lambda: None,
    ) -> None:
        self._clock = clock
        self.budget = budget
        self.open = 0
        self.shed = 0
        self._on_shed = on_shed
        self._unlogged = 0
        self._logged_at: float | None = None

    def full(self) -> bool:
        """Whether a new connection is past the budget (then it is counted as shed)."""
        if self.budget is None or self.open < self.budget:
            return False
        self.shed += 1
        self._unlogged += 1
        self._on_shed()
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY_S:
            log.warn(
                "{n} client connections answered 503 daemon_overloaded: {open} of {budget} "
                "open, the rest of the file-descriptor limit kept for the daemon's own work",
                n=self._unlogged,
                open=self.open,
                budget=self.budget,
            )
            self._logged_at, self._unlogged = now, 0
        return True


class OverloadedAnswer(Protocol):
    """A shed connection: ``503 daemon_overloaded`` at once, then closed."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._closing: IDelayedCall | None = None
        self._tail = b""  # the last bytes read, to find the end of the request head

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        error = BrokerError(
            "daemon_overloaded",
            "the daemon is at its file-descriptor limit; try again shortly",
            headers={"Retry-After": "1"},
        )
        body = error.body()
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        # Half-close and read what the client sends meanwhile, so no reset destroys
        # the answer before it is read; then close for good.
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        self._closing = self._clock.callLater(LINGER_S, transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        seen = self._tail + data
        if b"\r\n\r\n" in seen and self.transport is not None:
            self.transport.loseConnection()  # the head is in: closing now resets nothing
        self._tail = seen[-3:]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
