# -*- test-case-name: tests.test_site -*-
"""The daemon's ``Site``: request timing and a batched access log.

Twisted's default access log sends one event per request through the logging
pipeline, timezone lookup included: about an eighth of a proxied request's CPU
time.  Here each request costs one formatted line in a list, and the lines
leave as one log event per batch (at most ``flush_s`` late).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

log = Logger()


class TimedRequest(Request):
    """A request that knows when it arrived, for the access log's duration."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.received_at = channel.site.reactor.seconds()


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
        client = getattr(request.getClientAddress(), "host", "-")
        self._lines.append(
            f'{client} "{request.method.decode("latin-1")} {request.uri.decode("latin-1")}" '
            f"{request.code} {request.sentLength} {took_ms:.1f}ms"
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

    def __init__(self, resource: IResource, reactor: IReactorTime, access_log: AccessLog) -> None:
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.access_log = access_log

    def log(self, request: Request) -> None:  # type: ignore[override]
        self.access_log.record(request)  # type: ignore[arg-type]

    def stopFactory(self) -> None:
        self.access_log.flush()
        super().stopFactory()
