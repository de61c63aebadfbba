# -*- test-case-name: tests.test_site -*-
"""The daemon's ``Site``: request timing, the body limit and a batched access log.

A body over ``limits.max_body_mib`` is refused with ``413 payload_too_large``
as soon as ``Content-Length`` says so, or as soon as the bytes received pass
it; the rest of the body is read and dropped (closing on unread data would
reset the connection before the client reads the answer), nothing is kept,
and the request never reaches a resource.

Twisted's default access log sends one event per request through the logging
pipeline, timezone lookup included: about an eighth of a proxied request's CPU
time.  Here each request costs one formatted line in a list, and the lines
leave as one log event per batch (at most ``flush_s`` late).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mgpu.config import KINDS
from mgpu.errors import BrokerError

log = Logger()

#: How long a refused body is still read (and dropped) before the connection closes.
REFUSED_LINGER_S = 5.0


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
        error = BrokerError("payload_too_large", f"the request body is over {mib} MiB")
        body = error.body()
        connection = self._connection()
        connection.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        # The client sees the answer end now; the daemon still reads (and drops)
        # what it sends, so no reset destroys the answer before it is read.
        half_close = getattr(connection, "loseWriteConnection", None)
        if half_close is not None:  # TCP, TLS and UNIX transports can
            half_close()
        # Drop the rest of the body for a while, not forever: a client may
        # declare (and send) any size.
        self.site.reactor.callLater(REFUSED_LINGER_S, connection.loseConnection)
        self.site.on_refused()


#: Routes named as such in logs and metrics; any other path is ``other``.
_ROUTES = frozenset(
    [b"/", b"/healthz", b"/metrics", b"/v1/status", b"/v1/events", b"/v1/admin/reload"]
    + [f"/v1/{kind}".encode() for kind in KINDS]
)


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
        took_ms = (self._clock.seconds() - request.received_at) * 1000
        wait = "-" if request.queue_wait_s is None else f"{request.queue_wait_s * 1000:.1f}ms"
        self._lines.append(
            f"{request.method.decode('latin-1')} {route_of(request.path)} "
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
    """A ``Site`` with timed requests, the batched access log, and no form parsing.

    twisted.web would otherwise parse POST form bodies (multipart into memory)
    before the facade sees them: the consumers' bodies are none of its business.
    """

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
    ) -> None:
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused
        self.observers = list(observers)

    def log(self, request: Request) -> None:  # type: ignore[override]
        timed = cast(TimedRequest, request)
        self.access_log.record(timed)
        for observe in self.observers:
            observe(timed)

    def stopFactory(self) -> None:
        self.access_log.flush()
        super().stopFactory()
