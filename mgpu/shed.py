# -*- test-case-name: tests.test_shed -*-
"""Client connections past the daemon's descriptor budget: answered 503, never dropped.

Past its file-descriptor limit the daemon can neither accept a client (EMFILE
on ``accept``: Twisted then accepts and closes the connection unanswered)
nor reach a consumer.  So it keeps count of its client connections: past a
budget (``FdLimit.for_clients``) each new one is answered
``503 daemon_overloaded`` with ``Retry-After`` and closed once the client
has closed (or after ``LINGER_S``); and at a ceiling (the limit less a small reserve for the
daemon's own work) the listening port stops accepting until connections
close, so the clients wait in the kernel's backlog instead of meeting
EMFILE.  The gap between budget and ceiling absorbs what Twisted accepts in
one loop after the ceiling is reached.  Every client gets an HTTP answer,
the consumers are never blamed, and the log says so once per interval, not
once per connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast
from typing import Protocol as _Interface

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.errors import BrokerError

log = Logger()

#: The longest a shed connection is kept, reading and dropping what the client sends, so
#: that the client reads its 503 before any reset: it ends sooner when the client closes.
#: A client that sends after the daemon closed would get a reset, and a reset can destroy
#: the answer still unread in its buffer. Shed connections count towards the ceiling, so a
#: lingering one delays the next accept; it takes no descriptor from the daemon's reserve.
LINGER_S: Final = 5.0
#: At most one log line per this long about shed connections.
LOG_EVERY_S: Final = 10.0


class _Pausable(_Interface):
    """A listening port that can stop and resume accepting (``tcp.Port``)."""

    def stopReading(self) -> None: ...
    def startReading(self) -> None: ...


class _Accepting(_Pausable, _Interface):
    """``tcp.Port``'s accept loop: each ``doRead`` accepts up to ``numberAccepts``."""

    numberAccepts: int

    def doRead(self) -> object: ...


class ConnectionCap:
    """Counts client connections against a budget and a ceiling (None: no limit)."""

    def __init__(
        self,
        clock: IReactorTime,
        budget: int | None = None,
        on_shed: Callable[[], object] = lambda: None,
        ceiling: int | None = None,
    ) -> None:
        self._clock = clock
        self.budget = budget
        self.ceiling = ceiling
        self.open = 0  # served connections
        self.shedding = 0  # connections being answered 503
        self.shed = 0
        self.paused = False
        self._port: _Pausable | None = None
        self._on_shed = on_shed
        self._unlogged = 0
        self._logged_at: float | None = None

    def watch(self, port: object) -> object:
        """Pause and resume this listening port at the ceiling (a ``listening`` callback).

        Pausing alone is not enough: one ``doRead`` of a Twisted port goes on
        accepting a hundred connections and more, past the ceiling into the
        reserve, and at EMFILE Twisted accepts and closes them, resetting the
        clients. So each accept loop is bounded by the room left below the ceiling.
        """
        if hasattr(port, "stopReading") and hasattr(port, "startReading"):
            self._port = cast(_Pausable, port)
        if self.ceiling is not None and hasattr(port, "doRead") and hasattr(port, "numberAccepts"):
            self._bound_accepts(cast(_Accepting, port))
        return port

    def _bound_accepts(self, port: _Accepting) -> None:
        accept = port.doRead

        def bounded() -> object:
            assert self.ceiling is not None
            port.numberAccepts = max(0, self.ceiling - self.open - self.shedding)
            return accept()

        port.doRead = bounded  # type: ignore[method-assign]  # the reactor calls it on the instance

    def opened(self, shed: bool = False) -> None:
        """A connection began; at the ceiling the port stops accepting."""
        if shed:
            self.shedding += 1
        else:
            self.open += 1
        held = self.open + self.shedding
        port = self._port
        at_ceiling = self.ceiling is not None and held >= self.ceiling
        if port is not None and at_ceiling and not self.paused:
            self.paused = True
            port.stopReading()

    def closed(self, shed: bool = False) -> None:
        """A connection ended; below the ceiling the port accepts again."""
        if shed:
            self.shedding -= 1
        else:
            self.open -= 1
        if self.paused and self.ceiling is not None and self.open + self.shedding < self.ceiling:
            self.paused = False
            if self._port is not None:
                self._port.startReading()

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

    def __init__(self, clock: IReactorTime, cap: ConnectionCap | None = None) -> None:
        self._clock = clock
        self._cap = cap
        self._closing: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self._cap is not None:
            self._cap.opened(shed=True)
        transport = self.transport
        assert transport is not None
        error = BrokerError(
            "daemon_overloaded",
            "the daemon is at its file-descriptor limit; try again shortly",
            headers={"Retry-After": "1"},
        )
        transport.write(error.raw_answer())
        # Half-close and read what the client sends until it closes (it has read the
        # answer then) or LINGER_S passes, so no reset destroys the answer unread.
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        self._closing = self._clock.callLater(LINGER_S, transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        """Dropped: the answer is already sent."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        if self._cap is not None:
            self._cap.closed(shed=True)
            self._cap = None
