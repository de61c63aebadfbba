# -*- test-case-name: tests.test_site -*-
"""The daemon's ``Site``: request timing, head deadline, body limit and a batched access log.

A request head must arrive within ``limits.header_timeout_s``, counted from
the connection's start or, on a kept-alive connection, from the end of the
previous request: a client that drips its head a byte at a time is closed
once the deadline passes. Twisted's ``timeOut`` cannot do this: it is an idle
timeout, reset by every byte. A malformed head gets ``400 bad_request``, a
``Content-Length`` too long for ``int()`` included (Twisted would raise).

A body over ``limits.max_body_mib`` is refused with ``413 payload_too_large``
as soon as ``Content-Length`` says so, or as soon as the bytes received pass
it; the rest of the body is read and dropped (closing on unread data would
reset the connection before the client reads the answer), nothing is kept,
and the request never reaches a resource. On OpenAI's routes the 413's body is
OpenAI's error envelope, as the router's own errors there are.

Twisted's default access log sends one event per request through the logging
pipeline, timezone lookup included: about an eighth of a proxied request's CPU
time.  Here each request costs one formatted line in a list, and the lines
leave as one log event per batch (at most ``flush_s`` late).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mgpu.config import KINDS, LimitsConfig
from mgpu.errors import BrokerError
from mgpu.openai_api import envelope, is_openai_path
from mgpu.shed import ConnectionCap, OverloadedAnswer

log = Logger()

#: How long a refused body is still read (and dropped) before the connection closes.
REFUSED_LINGER_S = 5.0
#: How long a connection closed for a slow head may take to flush what it still has
#: to write (the end of a previous answer) before it is cut.
CLOSING_LINGER_S = 5.0
#: ``limits.header_timeout_s`` when the file does not set it.
DEFAULT_HEADER_TIMEOUT_S = LimitsConfig().header_timeout_s


class TimedRequest(Request):
    """A request that knows when it arrived and refuses a body over the limit."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.site: BrokerSite = channel.site
        self.received_at = self.site.reactor.seconds()
        #: Set by the facade: the consumer that served it, and how long it
        #: waited for the GPU lease (room-making and loading included).
        self.consumer: str | None = None
        self.queue_wait_s: float | None = None
        #: Set by the router for routes the configuration names (``native``):
        #: the label logs and metrics use instead of one derived from the path.
        self.route: str | None = None
        self._body_bytes = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.site.max_body_bytes:
            self.content = BytesIO()
            self._refuse()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.site.max_body_bytes:
            self.content = BytesIO()
            self._refuse()
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:  # the whole body is in (and dropped): now close
            self._connection().loseConnection()
        else:
            super().requestReceived(command, path, version)

    def _connection(self) -> ITransport:
        return cast(ITransport, self.channel.transport)

    def _refuse(self) -> None:
        """Answer 413 now, on the raw connection: the request line is not parsed yet."""
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the 413
        mib = self.site.max_body_bytes // 2**20
        message = f"the request body is over {mib} MiB"
        error_type = _EnvelopedError if self._for_openai() else BrokerError
        error = error_type("payload_too_large", message)
        connection = self._connection()
        connection.write(error.raw_answer())
        # The client sees the answer end now; the daemon still reads (and drops)
        # what it sends, so no reset destroys the answer before it is read.
        half_close = getattr(connection, "loseWriteConnection", None)
        if half_close is not None:  # TCP, TLS and UNIX transports can
            half_close()
        # Drop the rest of the body for a while, not forever: a client may
        # declare (and send) any size.
        self.site.reactor.callLater(REFUSED_LINGER_S, connection.loseConnection)
        self.site.on_refused()

    def _for_openai(self) -> bool:
        """Whether the request line names one of OpenAI's routes (``is_openai_path``).

        The request is refused before ``requestReceived`` sets ``path``: the target
        is still where Twisted's channel keeps it while the head and body arrive.
        """
        target: bytes = getattr(self.channel, "_path", b"")
        return is_openai_path(target.partition(b"?")[0])


class _EnvelopedError(BrokerError):
    """A broker error whose body is OpenAI's envelope (``mgpu.openai_api.envelope``)."""

    def body(self) -> bytes:
        return json.dumps(envelope(self)).encode("utf-8")


class BrokerChannel(HTTPChannel):
    """An HTTP/1.1 connection whose request heads must arrive within the site's deadline.

    The deadline (``site.header_timeout_s``, read when it starts) runs from the
    connection's start, and on a kept-alive connection from the end of the
    previous request, to the end of the next head, whatever bytes arrive
    meanwhile. A connection past it is closed without an answer and without a
    log line (a drip attack must not flood the log). The site counts those
    that had begun a head; an idle one (nothing sent) is closed uncounted.

    Twisted's own refusals of a malformed head are answered in the broker's
    error schema rather than as a bare ``400 Bad Request``.
    """

    site: BrokerSite
    _head_deadline: IDelayedCall | None = None
    _head_begun = False
    _closing: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.cap.opened()
        self._await_head()

    def dataReceived(self, data: bytes) -> None:
        # Bytes held back while a request ran come through here too, once it ends.
        self._head_begun = True
        super().dataReceived(data)

    def headerReceived(self, line: bytes) -> bool:
        try:
            return bool(super().headerReceived(line))
        except ValueError:  # int() refuses a Content-Length of over 4300 digits (by default)
            self._refuse_head("the Content-Length has too many digits")
            return False

    def allHeadersReceived(self) -> None:
        self._stop_waiting()
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        if self.persistent:
            # Before Twisted's own: it parses at once a head that is already in.
            self._await_head()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.cap.closed()
        self._stop_waiting()
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        super().connectionLost(reason)

    def stop_timers(self) -> None:
        """No head deadline, idle timeout or closing linger from now on.

        Called when a WebSocket tunnel takes the connection (``mgpu.tunnel.take_over``):
        a tunnel is never timed out.  The connection stays counted in the cap
        until the tunnel ends and calls ``connectionLost`` (once).
        """
        self._stop_waiting()
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        self.setTimeout(None)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's answer to a malformed request line or header (a private hook)."""
        self._refuse_head("the request line or a header is malformed")

    def _refuse_head(self, message: str) -> None:
        assert self.transport is not None
        self.transport.write(BrokerError("bad_request", message).raw_answer())
        self.loseConnection()

    def _await_head(self) -> None:
        self._stop_waiting()
        self._head_begun = False
        self._head_deadline = self.site.reactor.callLater(
            self.site.header_timeout_s, self._head_too_slow
        )

    def _stop_waiting(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._head_begun:
            self.site.on_header_timeout()
        transport = self.transport
        assert transport is not None
        self.loseConnection()  # at once, unless the end of a previous answer is still going out
        abort = getattr(transport, "abortConnection", transport.loseConnection)
        self._closing = self.site.reactor.callLater(CLOSING_LINGER_S, abort)


def _broker_channel(site: object) -> _GenericHTTPChannelProtocol:
    """Twisted's HTTP protocol (which could switch to HTTP/2) around a ``BrokerChannel``.

    A site's ``protocol``, called as its method, as Twisted's own factory is.
    """
    return _GenericHTTPChannelProtocol(BrokerChannel())


#: Routes named as such in logs and metrics; any other path is ``other``.
_ROUTES = frozenset(
    [b"/", b"/healthz", b"/metrics", b"/v1/status", b"/v1/events", b"/v1/admin/reload"]
    + [f"/v1/{kind}".encode() for kind in KINDS]
)


def route_label(request: TimedRequest) -> str:
    """The request's route for logs and metrics: the router's note, else ``route_of`` its path."""
    return getattr(request, "route", None) or route_of(request.path)


def route_of(path: bytes) -> str:
    """The route a request path belongs to, with no client-chosen parts (bounded labels)."""
    if path in _ROUTES:
        return path.decode("ascii")
    if path.startswith(b"/audio/"):
        return "/audio"
    if path.startswith(b"/v1/admin/consumers/"):
        return "/v1/admin/consumers"
    return "other"


class AccessLog:
    """Collects one line per finished request and logs them in batches."""

    def __init__(self, clock: IReactorTime, flush_s: float = 0.5, max_lines: int = 512) -> None:
        self._clock = clock
        self._flush_s = flush_s
        self._max_lines = max_lines
        self._lines: list[str] = []
        self._timer: IDelayedCall | None = None

    def record(self, request: TimedRequest) -> None:
        now = self._clock.seconds()
        took_ms = (now - request.received_at) * 1000
        wait = "-" if request.queue_wait_s is None else f"{request.queue_wait_s * 1000:.1f}ms"
        # Lines are logged in batches: each carries the time its request ended.
        at = datetime.fromtimestamp(now, UTC).strftime("%H:%M:%S.%f")[:-3]
        self._lines.append(
            f"{at} {request.method.decode('latin-1')} {route_label(request)} "
            f"consumer={request.consumer or '-'} status={request.code} "
            f"wait={wait} took={took_ms:.1f}ms bytes={request.sentLength} "
            f"client={getattr(request.getClientAddress(), 'host', '-')}"
        )
        if len(self._lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._flush_s, self.flush)

    def flush(self) -> None:
        """Log the lines collected so far as one event."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            log.info("{lines}", lines="\n".join(lines))


class BrokerSite(Site):
    """A ``Site`` with timed requests, a head deadline, the batched access log, no form parsing.

    twisted.web would otherwise parse POST form bodies (multipart into memory)
    before the facade sees them: the consumers' bodies are none of its business.
    ``max_body_bytes`` and ``header_timeout_s`` may change while it runs (a
    reload): requests and connections that start afterwards get the new values.
    """

    protocol = _broker_channel
    requestFactory = TimedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        access_log: AccessLog,
        max_body_bytes: int,
        on_refused: Callable[[], object] = lambda: None,
        observers: Sequence[Callable[[TimedRequest], object]] = (),
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        on_header_timeout: Callable[[], object] = lambda: None,
        cap: ConnectionCap | None = None,
    ) -> None:
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused
        self.observers = list(observers)
        self.header_timeout_s = header_timeout_s
        self.on_header_timeout = on_header_timeout
        #: Client connections against the file-descriptor budget (see ``mgpu.shed``).
        self.cap = cap or ConnectionCap(reactor)

    def buildProtocol(self, addr: Any) -> Any:
        """The connection's protocol, or a 503 for one past the descriptor budget."""
        if self.cap.full():
            return OverloadedAnswer(self.reactor, self.cap)
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:  # type: ignore[override]
        timed = cast(TimedRequest, request)
        self.access_log.record(timed)
        for observe in self.observers:
            observe(timed)

    def stopFactory(self) -> None:
        self.access_log.flush()
        super().stopFactory()
