# -*- test-case-name: tests.test_upstream -*-
"""The relay's HTTP/1.1 client: requests to consumers over pooled keep-alive connections.

Between two jobs of one consumer, the GPU lease hands over from one request to
the next, and every microsecond the daemon spends there is a microsecond the
GPU waits.  Twisted's ``Agent`` spent most of that time in its general
machinery: a state machine per connection, a parser built on ``LineReceiver``,
a Deferred per stage, a timer per pooled connection.  The relay needs much
less: send one request, read one answer's head, stream its body, put the
connection back.  This module does only that:

- the request head is formatted in one ``bytes`` operation and written with
  its body (when in memory) in one write, put on the socket at once;
- the answer head is parsed in one pass once its blank line is in; bodies are
  framed by ``Content-Length``, ``chunked`` or the end of the connection;
- a connection goes back to the pool *before* the body's receiver hears of
  the end, so the request the end releases takes that very connection;
- idle connections are dropped when the consumer closes them, and closed
  after ``idle_timeout_s`` (shorter than the usual servers' keep-alive).

Cancelling a request's Deferred before the answer aborts its connection; the
body's receiver gets an ``IPushProducer`` whose ``stopProducing`` does the same.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable
from typing import Any, Final

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)
from twisted.internet.abstract import FileDescriptor, isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

log = Logger()

#: An answer's status line and headers may not be longer than this.
MAX_HEAD: Final = 64 * 1024
#: Nor have more header fields than this, or trailer fields than MAX_TRAILERS.
MAX_FIELDS: Final = 256
MAX_TRAILERS: Final = 32
#: A reason phrase is HTAB, SP, VCHAR and obs-text (RFC 9112 section 4): no CR, LF, NUL, ESC.
_REASON: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A request target or header with these would split the request or the line.
_UNSAFE_TARGET: Final = re.compile(rb"[\x00-\x20\x7f]")
_NO_BODY_CODES: Final = (204, 304)
#: Requests sent again on a new connection when a kept one closes before answering
#: (RFC 9110 section 9.2.2): the consumer cannot have acted on them twice.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
#: ``recv`` flags of the check before reuse: look without reading or waiting.  Combined
#: once here: ``|`` on the ``socket`` module's flags is an enum operation.
_PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)

Key = tuple[bytes, bytes, int]


class AnswerError(Exception):
    """The consumer's answer is not HTTP/1.x that can be read, or it broke off."""


class NoAnswer(Exception):
    """The connection closed before the consumer's answer began."""


class StaleConnection(NoAnswer):
    """A kept connection closed before any byte of the answer to a request it carried.

    The consumer closed it without ``Connection: close``, as (or just before)
    the request was sent: the inherent race of reusing connections.  Not a
    sign that the consumer is down; its origin is reused no more.
    """


class EndpointCache:
    """One endpoint per (scheme, host, port), built on first use.

    IP literals get a plain TCP endpoint (no name resolution), names a
    ``HostnameEndpoint``; https is wrapped in TLS.  The keys come from the
    configured consumers, so the cache stays small.
    """

    def __init__(self, reactor: IReactorTime, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[Key, IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint for the URI's origin; ``SchemeNotSupported`` or ``ValueError``."""
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._build(*key)
        return endpoint

    def _build(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        if scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {scheme!r}")
        name = host.decode("ascii")  # UnicodeDecodeError is a ValueError: bad URL
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        endpoint: IStreamClientEndpoint
        if isIPAddress(name):
            endpoint = TCP4ClientEndpoint(self._reactor, name, port, timeout=self._timeout)
        elif isIPv6Address(name):
            endpoint = TCP6ClientEndpoint(self._reactor, name, port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, name, port, timeout=self._timeout)
        if scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(host, port), endpoint)
        return endpoint


class Answer:
    """A consumer's status and headers; the body follows through ``deliver``.

    ``length`` is the body's size when the consumer framed it with
    ``Content-Length`` (0 when the answer has no body), else None.  ``headers``
    are the consumer's, framing headers included.  The answer is also the
    transport its body's receiver sees: pausing it pauses the connection,
    stopping it closes the connection.
    """

    def __init__(
        self,
        connection: _Connection,
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | None,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: _Connection | None = connection
        self._receiver: IProtocol | None = None
        self._pending: list[bytes] = []
        self._end: Failure | None = None

    def deliver(self, receiver: IProtocol) -> None:
        """Give the body to ``receiver``: ``makeConnection``, ``dataReceived``, ``connectionLost``.

        The end is ``ResponseDone``, ``PotentialDataLoss`` (a body that ends
        with the connection), or the error that broke the body off.
        """
        self._receiver = receiver
        receiver.makeConnection(self)  # type: ignore[arg-type]
        pending, self._pending = self._pending, []
        for data in pending:
            receiver.dataReceived(data)
        if self._end is not None:
            self._finish(self._end)

    # -- from the connection ----------------------------------------------

    def _data(self, data: bytes) -> None:
        if self._receiver is None:
            self._pending.append(data)
        else:
            self._receiver.dataReceived(data)

    def _finish(self, end: Failure) -> None:
        self._connection = None
        receiver = self._receiver
        if receiver is None:
            self._end = end
        else:
            self._receiver = None
            receiver.connectionLost(end)

    # -- IPushProducer, for the receiver ------------------------------------

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def stopProducing(self) -> None:
        if self._connection is not None:
            self._connection.stop(self)


class _Stop(Exception):
    """Raised from a parser callback: read no further (the answer ended or was stopped)."""


class _LateBytes(Exception):
    """Raised from a parser callback: bytes came after a complete answer."""


class _Refused(Exception):
    """Raised from a parser callback: the answer breaks a rule the parser does not check."""


class _Connection(Protocol):
    """One connection to a consumer: one request at a time, then back to the pool or closed.

    Each answer is read by a fresh ``httptools`` (llhttp) parser, which owns
    the HTTP grammar; this class adds what llhttp leaves to its user: the
    reason phrase's characters, the HTTP version, limits on the head and the
    trailers, the end of an answer to HEAD, and the rule that nothing may
    follow a complete answer.  The parser's callbacks only record and
    deliver; what ends the answer (back to the pool, then the receiver told)
    runs after ``feed_data`` returns, so a request that the end releases
    never starts on this connection while its old parser is still reading.
    """

    def __init__(self, pool: UpstreamClient, key: Key) -> None:
        self._pool = pool
        self.key = key
        self.idle_since: float | None = None  # None: in use
        self.expiry: IDelayedCall | None = None
        self._method = b""
        self._waiting: Deferred[Answer] | None = None  # the answer's head is awaited
        self._answer: Answer | None = None  # its body is being read
        self._parser: HttpResponseParser | None = None  # None: no answer awaited
        self._stage = "head"  # head, body, complete, stopped
        self._head_size = 0
        self._reason: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] = []
        self._trailers = 0
        self._interim = False  # the head being read is a 1xx
        self._keep_alive = False
        self._until_close = False  # the body ends with the connection
        self._reuse = False  # the request allowed this connection to be kept
        self._paused = False
        self._sending: IBodyProducer | None = None
        self._closing = False  # closed or aborted by this side: never reused
        self._heard = False  # a byte of the answer arrived
        self._reused = False  # the request in flight came from the pool
        self._retry: Callable[[], None] | None = None
        self._lost: list[Deferred[None]] = []

    # -- the request -------------------------------------------------------

    def send(
        self,
        method: bytes,
        head: bytes,
        body: Any,
        answer: Deferred[Answer],
        retry: Callable[[], None] | None = None,
        *,
        reuse: bool = True,
        reused: bool = False,
    ) -> None:
        """Write the request; ``answer`` fires with the answer's head.

        ``retry`` is called instead of failing ``answer`` when the connection
        closes before a byte of the answer came (a kept connection the
        consumer had just closed).  ``reuse``: the connection may be kept
        after an exactly framed answer (the head then has no ``Connection: close``);
        ``reused``: it was kept from an earlier request.
        """
        self._method = method
        self._waiting = answer
        self._retry = retry
        self._reuse = reuse
        self._reused = reused
        self._heard = False
        self._stage = "head"
        self._head_size = 0
        self._parser = HttpResponseParser(self)
        transport = self.transport
        assert transport is not None
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            self._produce(body)
        # Written at once, not when the reactor next looks: the next request of
        # a hand-off is sent from inside the previous answer's callbacks.
        if (
            isinstance(transport, FileDescriptor)
            and transport.connected
            and not transport.disconnecting
        ):
            transport.doWrite()

    def _produce(self, body: IBodyProducer) -> None:
        transport: Any = self.transport
        length = None if body.length is UNKNOWN_LENGTH else body.length
        self._sending = body
        transport.registerProducer(body, True)
        sink = _BodySink(transport, length, self.abort)
        done = body.startProducing(sink)

        def finished(result: object) -> None:
            if self._sending is body:
                self._sending = None
                transport.unregisterProducer()
                if length is None:
                    transport.write(b"0\r\n\r\n")
                elif sink.sent != length:  # short: the consumer would wait for the rest
                    self.abort()

        def failed(failure: Failure) -> None:
            if self._sending is body:
                self._sending = None
                transport.unregisterProducer()
                self.abort()

        done.addCallbacks(finished, failed)

    # -- the answer ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:  # abandoned: whatever comes is nobody's
            return
        parser = self._parser
        if parser is None:  # an idle connection must be silent
            self._pool._stray(self, len(data))
            self.abort()
            return
        if self._stage == "stopped":
            return
        self._heard = True
        error: str | None = None
        late = False
        try:
            parser.feed_data(data)
        except HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _LateBytes):
                late = True
            elif isinstance(cause, _Refused):
                error = str(cause)
            elif not isinstance(cause, _Stop):
                raise
        except HttpParserUpgrade:
            error = "the consumer switched protocols"
        except HttpParserError as e:  # llhttp's reason: never the consumer's bytes
            if self._stage == "complete":
                late = True
            else:
                error = str(e) or type(e).__name__
        if self._parser is not parser:  # stopped or aborted from a callback
            return
        if error is None and self._stage == "head":
            self._head_size += len(data)
            if self._head_size > MAX_HEAD:
                error = f"the answer's head is over {MAX_HEAD // 1024} KiB"
        if error is not None:
            if self._stage == "head":
                self._unanswerable(AnswerError(error))
            else:
                self._broken(AnswerError(error))
        elif late:
            self._pool._stray(self, None)
            self._done(clean=False)
        elif self._stage == "complete":
            self._done(clean=True)

    # httptools' callbacks: they record and deliver; dataReceived acts on the outcome.

    def on_message_begin(self) -> None:
        if self._stage == "complete":
            raise _LateBytes()
        self._reason = []
        self._fields = []

    def on_status(self, piece: bytes) -> None:
        self._reason.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stage == "head":
            self._fields.append((name, value))
            if len(self._fields) > MAX_FIELDS:
                raise _Refused(f"the answer has over {MAX_FIELDS} header fields")
        else:
            self._trailers += 1
            if self._trailers > MAX_TRAILERS:
                raise _Refused(f"the answer has over {MAX_TRAILERS} trailer fields")

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        code = parser.get_status_code()
        version = parser.get_http_version()
        phrase = b"".join(self._reason)
        if version not in ("1.1", "1.0"):
            raise _Refused("the answer is not HTTP/1.0 or HTTP/1.1")
        if not _REASON.fullmatch(phrase):
            raise _Refused("the answer's reason phrase has control characters")
        if code < 200:
            if code == 101:
                raise _Refused("the consumer switched protocols")
            self._interim = True  # 100 Continue, 103 Early Hints: the final one follows
            return
        headers = Headers()
        length: int | None = None
        chunked = coded = False
        for name, value in self._fields:
            headers.addRawHeader(name, value)
            low = name.lower()
            if low == b"content-length":
                length = int(value)  # llhttp allows digits only, one value, no overflow
            elif low == b"transfer-encoding":  # llhttp refuses Content-Length beside it
                chunked = value.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked"
                coded = True
        self._fields = []
        head_only = self._method == b"HEAD"
        if head_only or code in _NO_BODY_CODES:
            length = 0
        elif coded:
            length = None
        self._until_close = length is None and not chunked
        # RFC 9112 section 6.1: an HTTP/1.0 answer with Transfer-Encoding has faulty
        # framing: read it, then close.  The end of an answer to HEAD is not
        # llhttp's to know (it would wait for the body its length announces):
        # the answer ends here, and the connection is not kept.
        self._keep_alive = (
            parser.should_keep_alive() and not (chunked and version == "1.0") and not head_only
        )
        self._stage = "body"
        self._trailers = 0
        answer = self._answer = Answer(self, code, phrase, headers, length)
        waiting, self._waiting = self._waiting, None
        if waiting is None:  # cancelled meanwhile
            raise _Stop()
        waiting.callback(answer)
        if head_only:
            self._stage = "complete"
            raise _Stop()
        if self._answer is not answer:
            raise _Stop()

    def on_body(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or self._stage != "body":
            raise _Stop()
        answer._data(data)
        if self._stage != "body":  # the receiver stopped it
            raise _Stop()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif self._stage == "body":
            self._stage = "complete"

    def _done(self, *, clean: bool) -> None:
        """The body is complete: back to the pool first, then tell its receiver.

        The connection is kept only after an exactly framed answer to a
        request that allowed it, with nothing after it and no body still
        being sent.
        """
        answer, self._answer = self._answer, None
        self._parser = None
        assert answer is not None
        if self._closing:
            pass
        elif self._sending is not None:
            self.abort()
        elif not (clean and self._keep_alive and self._reuse):
            self._close()
        else:
            if self._paused:
                self.resume()
            self._pool._put(self)
        answer._finish(Failure(ResponseDone()))

    def _broken(self, error: Exception) -> None:
        """The body cannot be read on: close the connection, tell the receiver."""
        answer, self._answer = self._answer, None
        self.abort()
        if answer is not None:
            answer._finish(Failure(error))

    def _unanswerable(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        self.abort()
        if waiting is not None:
            waiting.errback(error)

    # -- flow and the end ------------------------------------------------------

    def pause(self) -> None:
        if self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stop(self, answer: Answer) -> None:
        """The body's receiver wants no more: deliver nothing more, and close at once.

        The receiver hears of the end when the connection is gone, as from a
        transport: not from inside its own ``stopProducing`` call (a relay
        stopped because its client left must learn that first).
        """
        if self._answer is answer and self._stage != "stopped":
            self._stage = "stopped"
            self.abort()

    def cancel(self) -> None:
        """The request's Deferred was cancelled: nothing more is awaited, close at once."""
        self._waiting = None
        self.abort()

    def abort(self) -> None:
        """Close at once, without waiting for writes: the request is abandoned."""
        self._closing = True
        self._pool._lost(self)  # out of the pool now, not when the reactor reports it
        transport = self.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _close(self) -> None:
        self._closing = True
        self._pool._lost(self)
        if self.transport is not None:
            self.transport.loseConnection()

    def closed(self) -> Deferred[None]:
        """Close the connection; fires once it is gone."""
        done: Deferred[None] = Deferred()
        self._lost.append(done)
        self._close()
        return done

    def still_open(self) -> bool:
        """Whether a kept connection may carry another request: not closed, and silent.

        One peek at the socket, without reading: a consumer that closed the
        connection right after its answer, or sent anything since, is seen
        here instead of by the next request (a POST that is not retried).
        """
        get_handle = getattr(self.transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if not isinstance(handle, socket.socket):
            return True
        try:
            peeked = handle.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if peeked:
            self._pool._stray(self, None)
        return False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._pool._lost(self)
        self._parser = None
        if self._sending is not None:
            sending, self._sending = self._sending, None
            sending.stopProducing()
        waiting, self._waiting = self._waiting, None
        retry, self._retry = self._retry, None
        if waiting is not None:
            if not self._heard:
                if retry is not None:
                    retry()
                elif self._reused:
                    if self._reuse:
                        self._pool._suspend(self.key, "closed a kept connection without saying so")
                    why = (
                        "closed a kept connection as the request was sent (keep-alive "
                        f"is now off for it): {_why(reason)}"
                    )
                    waiting.errback(StaleConnection(why))
                else:
                    why = f"the connection closed before an answer: {_why(reason)}"
                    waiting.errback(NoAnswer(why))
            else:
                why = f"the connection closed inside the answer's head: {_why(reason)}"
                waiting.errback(AnswerError(why))
        answer, self._answer = self._answer, None
        if answer is not None:
            if self._stage == "stopped":
                answer._finish(Failure(ConnectionAborted("the receiver stopped the answer")))
            elif self._until_close and isinstance(reason.value, ConnectionDone):
                answer._finish(Failure(PotentialDataLoss()))
            else:  # a reset is no end of a body framed by the end of the connection
                answer._finish(Failure(AnswerError(f"the answer broke off: {_why(reason)}")))
        lost, self._lost = self._lost, []
        for done in lost:
            done.callback(None)


def _why(reason: Failure) -> str:
    return reason.getErrorMessage() or type(reason.value).__name__


@implementer(IConsumer)
class _BodySink:
    """Where a request body's producer writes: the connection, chunked if of unknown length.

    A producer that writes more than the length it announced would put bytes
    the consumer reads as a next request: the connection is aborted instead.
    """

    def __init__(self, transport: Any, length: int | None, abort: Callable[[], None]) -> None:
        self._transport = transport
        self._length = length
        self._abort = abort
        self.sent = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.sent += len(data)
        if self._length is None:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        elif self.sent > self._length:
            self._abort()
            return
        self._transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class _Call:
    """One request's Deferred, and what cancelling it stops: the attempt or the connection."""

    def __init__(self) -> None:
        self.cancelled = False
        self.stop: Callable[[], object] | None = None
        self.answer: Deferred[Answer] = Deferred(self._cancel)

    def _cancel(self, answer: Deferred[Answer]) -> None:
        self.cancelled = True
        if self.stop is not None:
            self.stop()  # a connection attempt's own failure is then ignored


class _ConnectionFactory(Factory):
    """Builds the connections of one origin; quiet: no log line per connection."""

    noisy = False

    def __init__(self, pool: UpstreamClient, key: Key) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._pool, self._key)


class UpstreamClient:
    """Sends requests to consumers, over kept-alive connections where the caller allows.

    At most ``max_idle`` connections per origin wait in the pool.  HTTP/1.1
    has no request ids: on a reused connection, a stray late answer would be
    read as the answer to the next request.  So a request may reuse a
    connection only when its caller says so (``keepalive``); a kept
    connection is reused only after an exactly framed answer, and only if a
    peek finds it open and silent; and an origin caught sending bytes that no
    request asked for gets one connection per request from then on.

    A connection per request need not cost a connect between two GPU jobs:
    after each such request one *spare* connection to its origin is opened,
    never used, and the next request takes it (open and silent, checked by
    the same peek) and writes at once.  A spare carries no request before
    its own, so no byte on it can belong to another; one not taken within
    ``idle_timeout_s`` is closed, and ``max_idle`` 0 keeps none.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        connect_timeout: float = 5.0,
        max_idle: int = 32,
        idle_timeout_s: float = 4.0,
    ) -> None:
        self._clock = clock
        self._endpoints = EndpointCache(clock, connect_timeout)
        self._factories: dict[Key, _ConnectionFactory] = {}
        self._idle: dict[Key, list[_Connection]] = {}
        self._max_idle = max_idle
        self._idle_timeout_s = idle_timeout_s
        self._closed = False
        #: Origins caught sending bytes no request asked for: never reused again.
        self._suspended: set[Key] = set()
        #: One connected, never used connection per origin, and those being opened.
        self._spares: dict[Key, _Connection] = {}
        self._sparing: set[Key] = set()

    def request(
        self,
        method: bytes,
        url: bytes,
        fields: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | IBodyProducer | None = None,
        *,
        keepalive: bool = False,
        host: bytes | None = None,
    ) -> Deferred[Answer]:
        """Send ``method url`` with header ``fields`` and ``body``; fires with the answer's head.

        Raises ``ValueError`` or ``SchemeNotSupported`` for a URL it cannot
        use, before any I/O.  A body of ``bytes`` is sent with its
        ``Content-Length``; a producer's of unknown length is chunked; None
        sends no body.  Without ``keepalive`` (or toward a suspended origin)
        the request says ``Connection: close`` and its connection serves it
        alone.  The Deferred fails with the connection's error, ``NoAnswer``
        (closed before any byte of an answer) or ``AnswerError`` (an answer
        that breaks HTTP); cancelling it closes the connection.  ``host`` is
        sent as the ``Host`` header instead of the URL's (a native route keeps
        the client's); a ``ValueError`` if it holds a control or space byte.
        """
        uri = URI.fromBytes(url)
        target = uri.originForm
        if _UNSAFE_TARGET.search(target):
            raise ValueError("unsafe request target: control or space characters")
        if host is not None and (not host or _UNSAFE_TARGET.search(host)):
            raise ValueError("unsafe Host: empty, or control or space characters")
        endpoint = self._endpoints.endpointForURI(uri)
        key = (uri.scheme, uri.host, uri.port)
        reuse = keepalive and key not in self._suspended
        head = _format_head(method, target, host or _host(uri), fields, body, reuse)
        call = _Call()
        connection = self._take(key) if reuse else self._take_spare(key)
        if connection is None:
            self._connect(call, endpoint, key, method, head, body, reuse)
        else:
            retry = None
            if method in _IDEMPOTENT and (body is None or isinstance(body, bytes)):

                def retry() -> None:
                    self._connect(call, endpoint, key, method, head, body, reuse)

            call.stop = connection.cancel
            connection.send(method, head, body, call.answer, retry, reuse=reuse, reused=True)
        if not reuse:
            self._open_spare(endpoint, key)
        return call.answer

    def _connect(
        self,
        call: _Call,
        endpoint: IStreamClientEndpoint,
        key: Key,
        method: bytes,
        head: bytes,
        body: Any,
        reuse: bool,
    ) -> None:
        """Send on a new connection to ``endpoint``; ``call.answer`` fires as for any other."""
        factory = self._factory(key)

        def connected(connection: _Connection) -> None:
            if call.cancelled:  # too late to stop the attempt
                connection._close()
            else:
                call.stop = connection.cancel
                connection.send(method, head, body, call.answer, reuse=reuse)

        def failed(failure: Failure) -> None:
            if not call.cancelled:  # else the caller has its CancelledError
                call.answer.errback(failure)

        connecting: Deferred[Any] = endpoint.connect(factory)
        call.stop = connecting.cancel
        connecting.addCallbacks(connected, failed)

    def _take(self, key: Key) -> _Connection | None:
        """The most recently used idle connection of ``key`` that is still open and silent."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.still_open():
                connection.idle_since = None
                return connection
            connection.abort()
        return None

    def _take_spare(self, key: Key) -> _Connection | None:
        """The spare connection of ``key``, if it is still open and silent."""
        spare = self._spares.pop(key, None)
        if spare is None:
            return None
        if spare.expiry is not None and spare.expiry.active():
            spare.expiry.cancel()
        spare.expiry = None
        if spare.still_open():
            return spare
        spare.abort()
        return None

    def _open_spare(self, endpoint: IStreamClientEndpoint, key: Key) -> None:
        """Connect a spare for the next request to ``key``, unless one is there or coming."""
        if self._closed or not self._max_idle or key in self._spares or key in self._sparing:
            return
        self._sparing.add(key)

        def connected(connection: _Connection) -> None:
            self._sparing.discard(key)
            if self._closed or key in self._spares:
                connection._close()
                return
            self._spares[key] = connection
            connection.expiry = self._clock.callLater(
                self._idle_timeout_s, self._expire_spare, connection
            )

        def failed(failure: Failure) -> None:
            self._sparing.discard(key)  # the next request connects by itself, and says why

        endpoint.connect(self._factory(key)).addCallbacks(connected, failed)

    def _expire_spare(self, connection: _Connection) -> None:
        connection.expiry = None
        if self._spares.get(connection.key) is connection:
            del self._spares[connection.key]
        connection._close()

    def _factory(self, key: Key) -> _ConnectionFactory:
        factory = self._factories.get(key)
        if factory is None:
            factory = self._factories[key] = _ConnectionFactory(self, key)
        return factory

    def _stray(self, connection: _Connection, size: int | None) -> None:
        """``connection`` received bytes no request asked for: its origin is reused no more."""
        what = f"{size} bytes" if size is not None else "bytes"
        self._suspend(
            connection.key, f"sent {what} after a complete answer or with no request in flight"
        )

    def _suspend(self, key: Key, why: str) -> None:
        """One connection per request to ``key`` from now on; logged once."""
        if key in self._suspended:
            return
        self._suspended.add(key)
        log.warn(
            "{origin} {why}; its connections are no longer reused (one per request until restart)",
            origin=_origin(key),
            why=why,
        )

    def suspended(self, url: str) -> bool:
        """Whether the origin of ``url`` was caught sending stray bytes."""
        try:
            uri = URI.fromBytes(url.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False
        return (uri.scheme, uri.host, uri.port) in self._suspended

    def _put(self, connection: _Connection) -> None:
        """Keep ``connection`` for the next request, and close it if none comes in time.

        Each connection has at most one timer: one that fires while the
        connection is in use, or early, is set again for the time left, so a
        busy pool costs no timer per request.
        """
        idle = self._idle.setdefault(connection.key, [])
        if self._closed or len(idle) >= self._max_idle:
            connection._close()
            return
        connection.idle_since = self._clock.seconds()
        idle.append(connection)
        if connection.expiry is None:
            connection.expiry = self._clock.callLater(
                self._idle_timeout_s, self._expire, connection
            )

    def _expire(self, connection: _Connection) -> None:
        connection.expiry = None
        since = connection.idle_since
        if since is None:  # in use: _put sets a timer again
            return
        left = since + self._idle_timeout_s - self._clock.seconds()
        if left > 0:
            connection.expiry = self._clock.callLater(left, self._expire, connection)
        else:
            connection._close()

    def _lost(self, connection: _Connection) -> None:
        """``connection`` is closing or gone: out of the pool, its timer stopped."""
        connection.idle_since = None
        if connection.expiry is not None:
            if connection.expiry.active():
                connection.expiry.cancel()
            connection.expiry = None
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        if self._spares.get(connection.key) is connection:
            del self._spares[connection.key]

    def idle_connections(self) -> int:
        """How many connections wait in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> Deferred[list[None]]:
        """Close every idle connection and keep no more; fires once they are all closed."""
        self._closed = True
        idle = [c for connections in self._idle.values() for c in connections]
        idle += self._spares.values()
        return gatherResults([c.closed() for c in idle])


def _origin(key: Key) -> str:
    scheme, host, port = key
    return f"{scheme.decode()}://{host.decode('ascii', 'replace')}:{port}"


def _host(uri: URI) -> bytes:
    """The Host header's value: the port only where it is not the scheme's default."""
    host = b"[%s]" % uri.host if b":" in uri.host else uri.host
    default = 443 if uri.scheme == b"https" else 80
    return host if uri.port == default else b"%s:%d" % (host, uri.port)


def _format_head(
    method: bytes,
    target: bytes,
    host: bytes,
    fields: Iterable[tuple[bytes, bytes]],
    body: bytes | IBodyProducer | None,
    reuse: bool = True,
) -> bytes:
    """The request line and headers, framing header included, up to the blank line."""
    lines = [b"%s %s HTTP/1.1\r\nHost: %s" % (method, target, host)]
    if not reuse:
        lines.append(b"Connection: close")
    for name, value in fields:
        if b"\n" in value or b"\r" in value:
            value = value.replace(b"\r", b" ").replace(b"\n", b" ")
        lines.append(b"%s: %s" % (name, value))
    if isinstance(body, bytes):
        lines.append(b"Content-Length: %d" % len(body))
    elif body is not None:
        if body.length is UNKNOWN_LENGTH:
            lines.append(b"Transfer-Encoding: chunked")
        else:
            lines.append(b"Content-Length: %d" % body.length)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
