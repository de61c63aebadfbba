# -*- test-case-name: tests.test_relay -*-
"""The streaming proxy of one client request to one consumer.

Bytes flow both ways without buffering: the request body from
``request.content`` through a ``FileBodyProducer``, the answer chunk by chunk
with the consumer's connection registered as the client's producer, so a slow
client slows the consumer down instead of filling memory.  One timer bounds the
exchange; a cancel, a timeout or a lost client closes the upstream connection.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any, Final, cast

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import NO_CONTENT, NOT_MODIFIED, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from mgpu.config import ConsumerConfig
from mgpu.errors import BrokerError
from mgpu.fdlimit import exhausted, overloaded
from mgpu.spool import ClientSpool
from mgpu.upstream import Answer, AnswerError, StaleConnection, UpstreamClient

#: Hop-by-hop headers (RFC 9110 section 7.6.1), never relayed in either direction.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"trailer",
        b"trailers",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Also not forwarded upstream: Host and Content-Length are the client's to set,
# X-Forwarded-For is rebuilt, and twisted.web has already answered Expect.
_NOT_FORWARDED: Final = HOP_BY_HOP | {b"host", b"content-length", b"x-forwarded-for", b"expect"}
_NOT_RELAYED: Final = HOP_BY_HOP | {b"content-length"}
#: Set by the broker on native routes (SPEC 9.1), whatever the client sent.
_FORWARDED_NATIVE: Final = frozenset(
    {b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix"}
)
#: A Host value kept on native routes: ``host[:port]`` (a name, IPv4 or [IPv6]), nothing else.
_AUTHORITY: Final = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(:[0-9]{1,5})?")
#: Answers of known length up to this size are relayed without backpressure.
SMALL_BODY: Final = 64 * 1024
_BAD_URL: Final = (SchemeNotSupported, DNSLookupError, ValueError)


@frozen
class RelayResult:
    """What the caller needs once the consumer's answer is complete.

    ``delivered`` fires once the client has been given all of it (at once
    unless the answer was spooled for a slow client); the caller finishes
    the request then, and may release the GPU before.
    """

    status: int
    body_head: bytes
    delivered: Deferred[None] = field(factory=lambda: succeed(None), eq=False)


class RelayBroken(BrokerError):
    """The relay failed after the consumer's answer began reaching the client.

    The status line is already sent, so the relay has aborted the client's
    connection (a truncated answer, not a clean end).  The caller must not
    write an error; it need not call ``request.finish()`` (harmless: nothing
    more leaves an aborting transport).  Count the request as failed and
    release what it holds.
    """

    response_started: Final = True


class Relay:
    """Forwards client requests to consumers through one shared ``UpstreamClient``."""

    def __init__(self, client: UpstreamClient, clock: IReactorTime) -> None:
        self._client = client
        self._clock = clock
        # FileBodyProducer's default cooperator runs on the global reactor.
        self._cooperator = Cooperator(scheduler=lambda step: clock.callLater(0, step))

    def forward(
        self,
        request: Request,
        consumer: ConsumerConfig,
        method: bytes,
        path: bytes,
        *,
        timeout_s: float,
        idle_timeout: bool = False,
        capture: int = 0,
        drop_authorization: bool = False,
        spool: bool = False,
        native_prefix: bytes | None = None,
    ) -> Deferred[RelayResult]:
        """Relay ``request`` to ``consumer.url + path`` and stream the answer back.

        Fires with a ``RelayResult`` once the whole body is written; the caller
        finishes the request.  Fails with ``BrokerError`` (nothing written yet:
        the caller answers with the error), ``RelayBroken`` (see there), or
        ``CancelledError`` when cancelled or the client left; either way the
        upstream request is closed and no timer is left behind.

        ``timeout_s`` bounds the whole exchange, or with ``idle_timeout`` the
        wait for the answer and then the silence between two body chunks.
        ``capture`` keeps that many leading body bytes in the result.
        With ``spool``, the consumer is read at its own pace whatever the
        client's, and what the client has not read yet is kept (see
        ``ClientSpool``): the result fires when the consumer's answer is
        complete.  Without it, a slow client slows the consumer down.

        With ``native_prefix`` (a native route, SPEC 9.1) the client's ``Host``
        is kept and ``X-Forwarded-Host``, ``-Proto`` and ``-Prefix`` are set,
        as a browser-facing reverse proxy does; a malformed Host is
        ``bad_request``.
        """
        fields = upstream_headers(request, drop_authorization)
        host = None
        if native_prefix is not None:
            try:
                host = client_host(request)
            except BrokerError as e:
                return fail(e)
            fields = native_headers(fields, request, host, native_prefix)
        content = request.content
        body: bytes | IBodyProducer | None = None
        if isinstance(content, BytesIO):
            data = content.getvalue()
            if data or method not in (b"GET", b"HEAD"):
                body = data
        elif content is not None:  # twisted.web spooled a large body to a file
            body = FileBodyProducer(content, self._cooperator)
        try:
            upstream = self._client.request(
                method,
                consumer.url.encode() + path,
                fields,
                body,
                keepalive=consumer.keepalive,
                host=host,
            )
        except _BAD_URL as e:  # refused before any I/O
            return fail(_bad_url(consumer, e))
        exchange = _Exchange(
            request, consumer, method, self._clock, timeout_s, idle_timeout, capture, spool
        )
        return exchange.start(upstream)


def upstream_headers(request: Request, drop_authorization: bool) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers, plus the client's address in X-Forwarded-For."""
    source = request.requestHeaders
    named = source.getRawHeaders(b"connection")
    extra = {t.strip().lower() for v in named for t in v.split(b",")} if named else set()
    if drop_authorization:
        extra.add(b"authorization")
    fields = [
        (name, value)
        for name, values in source.getAllRawHeaders()
        if (low := name.lower()) not in _NOT_FORWARDED
        and low not in extra
        and not low.startswith(b"proxy-")
        for value in values
    ]
    forwarded = source.getRawHeaders(b"x-forwarded-for", [])
    host = getattr(request.getClientAddress(), "host", None)
    if host is not None:
        forwarded = [*forwarded, host.encode("ascii")]
    if forwarded:
        fields.append((b"X-Forwarded-For", b", ".join(forwarded)))
    return fields


def client_host(request: Request) -> bytes | None:
    """The client's ``Host`` (None if it sent none), or ``bad_request`` if it is no authority.

    It is sent on to a consumer as is, so nothing but ``host[:port]`` passes:
    no CR, LF, NUL, space, ``/`` or ``@`` (RFC 9112: several Host headers are a 400 too).
    """
    values = request.requestHeaders.getRawHeaders(b"host")
    if not values:
        return None
    if len(values) > 1 or not _AUTHORITY.fullmatch(values[0]):
        raise BrokerError("bad_request", "the Host header must be one host[:port]")
    return values[0]


def native_headers(
    fields: list[tuple[bytes, bytes]], request: Request, host: bytes | None, prefix: bytes
) -> list[tuple[bytes, bytes]]:
    """``fields`` with the client's X-Forwarded-Host, -Proto and -Prefix replaced by ours."""
    kept = [(name, value) for name, value in fields if name.lower() not in _FORWARDED_NATIVE]
    if host is not None:
        kept.append((b"X-Forwarded-Host", host))
    kept.append((b"X-Forwarded-Proto", b"https" if request.isSecure() else b"http"))
    kept.append((b"X-Forwarded-Prefix", prefix))
    return kept


def _bad_url(consumer: ConsumerConfig, reason: BaseException) -> BrokerError:
    return BrokerError(
        "bad_consumer_url",
        f"consumer {consumer.name} has an unusable URL {consumer.url!r}: {reason}",
        consumer.name,
    )


def _bad_answer(consumer: ConsumerConfig, reason: BaseException | None) -> BrokerError:
    """The consumer's answer broke HTTP or broke off: this request's failure alone.

    The reason is the parser's or the connection's, never the consumer's
    bytes (another client's answer could be among them).
    """
    what = "" if isinstance(reason, StaleConnection) else " sent a bad answer:"
    return BrokerError(
        "bad_answer", f"consumer {consumer.name}{what} {_describe(reason)}", consumer.name
    )


def _describe(reason: BaseException | None) -> str:
    """An upstream error's message, or its type where it has none."""
    return str(reason) or type(reason).__name__


class _Exchange(Protocol):
    """One relayed request: its timer, the upstream call, then the body pump.

    It is the protocol ``response.deliverBody`` feeds.  ``_end`` runs exactly
    once whatever ends the exchange; later events are ignored.
    """

    def __init__(
        self,
        request: Request,
        consumer: ConsumerConfig,
        method: bytes,
        clock: IReactorTime,
        timeout_s: float,
        idle_timeout: bool,
        capture: int,
        spool: bool,
    ) -> None:
        self._request = request
        self._consumer = consumer
        self._head_only = method == b"HEAD"
        self._timeout_s = timeout_s
        self._idle = idle_timeout
        self._room = capture
        self._head = b""
        self._status = 0
        self._small = False
        self._done = False
        self._upstream: Deferred[Answer] | None = None
        self._producer: IPushProducer | None = None
        self._registered = False
        self._spool_unread = spool
        self._spool: ClientSpool | None = None
        self._delivering: Deferred[None] | None = None  # the client still reads a spool
        self._timer: IDelayedCall | None = clock.callLater(timeout_s, self._timed_out)
        self.result: Deferred[RelayResult] = Deferred(self._cancel)

    def start(self, upstream: Deferred[Answer]) -> Deferred[RelayResult]:
        self._upstream = upstream
        upstream.addCallbacks(self._answered, self._unanswered)
        if not self._done:
            self._request.notifyFinish().addErrback(self._client_gone)
        return self.result

    # -- upstream events ---------------------------------------------------

    def _answered(self, answer: Answer) -> None:
        """Send the consumer's status and headers now, then stream its body."""
        self._upstream = None
        request = self._request
        request.setResponseCode(answer.code, answer.phrase)
        out = request.responseHeaders
        for name, values in answer.headers.getAllRawHeaders():
            low = name.lower()
            if low not in _NOT_RELAYED and not low.startswith(b"proxy-"):
                out.setRawHeaders(name, values)
        # The length of an answer to HEAD, or of a 304, is the consumer's to
        # state (the representation's); a 204 has none (RFC 9110 section 8.6);
        # otherwise it is the body's own, if framed so.
        length = answer.length
        if answer.code == NO_CONTENT:
            pass
        elif self._head_only or answer.code == NOT_MODIFIED:
            given = answer.headers.getRawHeaders(b"content-length")
            if given:
                out.setRawHeaders(b"Content-Length", given)
        elif length is not None:
            out.setRawHeaders(b"Content-Length", [b"%d" % length])
        request.defaultContentType = None  # no text/html the consumer did not send
        self._status = answer.code
        # A small answer of known length is relayed whole within a turn or two:
        # no producer to register, and its headers leave with its first bytes.
        self._small = length is not None and length <= SMALL_BODY
        if not self._small:
            request.write(b"")  # the status line and headers go out now
        self._rearm()
        answer.deliver(self)

    def _unanswered(self, failure: Failure) -> None:
        self._upstream = None
        reason = failure.value
        if exhausted(reason):  # the daemon's own limit: not the consumer's fault
            self._end(overloaded(self._consumer.name, f"to reach {self._consumer.name}"))
        elif isinstance(reason, _BAD_URL):
            self._end(_bad_url(self._consumer, reason))
        elif isinstance(reason, AnswerError | StaleConnection):
            # It answered before, or answered badly: not unreachable for the others.
            self._end(_bad_answer(self._consumer, reason))
        else:
            self._end(
                BrokerError(
                    "consumer_unreachable",
                    f"consumer {self._consumer.name} unreachable: {_describe(reason)}",
                    self._consumer.name,
                )
            )

    def connectionMade(self) -> None:
        self._producer = producer = cast(IPushProducer, self.transport)
        if self._done:  # ended between the headers and the body
            producer.stopProducing()
        elif _channel(self._request) is None:  # the client left unnoticed
            self._end(CancelledError())
        elif self._small:
            pass
        elif self._spool_unread:
            self._spool = ClientSpool(self._request)
        else:
            self._request.registerProducer(producer, True)
            self._registered = True

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        if self._room:
            piece = data[: self._room]
            self._head += piece
            self._room -= len(piece)
        if self._spool is not None:
            self._spool.write(data)
        else:
            self._request.write(data)
        if self._idle:
            self._rearm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done:
            return
        # Not reason.check(): it works out the error's base class names on every answer.
        if isinstance(reason.value, ResponseDone | PotentialDataLoss):
            self._end(None)
        else:
            error = _bad_answer(self._consumer, reason.value)
            self._end(self._failure(error.code, error.message))

    # -- other events ------------------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        name = self._consumer.name
        if self._spool is not None and self._delivering is not None:
            # The consumer is done; the client did not take its answer in time.
            message = f"the client did not read {name}'s answer within {self._timeout_s:g}s"
            self._spool.abort(RelayBroken("upstream_timeout", message, name))
            abort_connection(self._request)
            return
        if self._status:
            what = "went silent for" if self._idle else "did not finish within"
            message = f"{name} {what} {self._timeout_s:g}s"
        else:
            message = f"{name} did not answer within {self._timeout_s:g}s"
        self._end(self._failure("upstream_timeout", message))

    def _failure(self, code: str, message: str) -> BrokerError:
        """``RelayBroken`` once the client has bytes of the answer, else a plain error.

        A small answer's headers wait for its body, so the consumer's status may
        be known while nothing was written: then the client still gets the JSON
        error, without the consumer's headers (its Content-Length would frame it).
        """
        if self._request.startedWriting:
            return RelayBroken(code, message, self._consumer.name)
        self._request.setResponseCode(200)
        self._request.responseHeaders = Headers()
        return BrokerError(code, message, self._consumer.name)

    def _client_gone(self, failure: Failure) -> None:
        if self._spool is not None:
            self._spool.abort(CancelledError())
        self._end(CancelledError())

    def _cancel(self, result: Deferred[RelayResult]) -> None:
        self._end(CancelledError())

    # -- the one way out ---------------------------------------------------

    def _rearm(self) -> None:
        if self._idle and self._timer is not None:
            self._timer.reset(self._timeout_s)

    def _end(self, error: Exception | None) -> None:
        """Fire the result once: stop the timer and, on error, the upstream transfer."""
        if self._done:
            return
        self._done = True
        if error is None and self._spool is not None:
            delivering = self._spool.finish()
            if not delivering.called:
                # The GPU's part is over; the timer goes on bounding the client's.
                self._delivering = delivering
                delivering.addBoth(self._delivered)
                self.result.callback(RelayResult(self._status, self._head, delivering))
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._registered:
            self._registered = False
            if _channel(self._request) is not None:
                self._request.unregisterProducer()
        if error is None:
            self.result.callback(RelayResult(self._status, self._head))
            return
        if self._spool is not None:
            self._spool.abort(CancelledError())
        if self._upstream is not None:
            self._upstream.cancel()  # its failure comes back to _unanswered, ignored
        elif self._producer is not None:
            self._producer.stopProducing()
        if isinstance(error, RelayBroken):
            abort_connection(self._request)
        self.result.errback(error)

    def _delivered(self, result: object) -> object:
        """The spooled answer reached the client, or never will: the timer's work is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return result


def _channel(request: Request) -> object:
    """The request's channel; None once the client left (or, deleted, once finished)."""
    return getattr(request, "channel", None)


def abort_connection(request: Request) -> None:
    """Cut the client's connection so it sees a truncated answer, not a complete one."""
    channel: Any = _channel(request)
    # An HTTP/2 stream resets itself; an HTTP/1.1 channel's transport is the connection.
    target = channel if hasattr(channel, "abortConnection") else getattr(channel, "transport", None)
    if target is not None:
        abort = getattr(target, "abortConnection", None) or target.loseConnection
        abort()
