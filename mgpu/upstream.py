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
from collections.abc import Callable, Iterable
from typing import Any, Final

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
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

#: An answer's status line and headers may not be longer than this.
MAX_HEAD: Final = 64 * 1024
#: Nor a chunk-size or trailer line.
MAX_LINE: Final = 4096
_HEX: Final = re.compile(rb"[0-9A-Fa-f]{1,15}")
# A request target or header with these would split the request or the line.
_UNSAFE_TARGET: Final = re.compile(rb"[\x00-\x20\x7f]")
_NO_BODY_CODES: Final = (204, 304)
#: Requests sent again on a new connection when a kept one closes before answering
#: (RFC 9110 section 9.2.2): the consumer cannot have acted on them twice.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

Key = tuple[bytes, bytes, int]


class AnswerError(Exception):
    """The consumer's answer is not HTTP/1.x that can be read, or it broke off."""


class NoAnswer(Exception):
    """The connection closed before the consumer's answer began."""


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


class _Chunked:
    """Decodes a chunked body (RFC 9112 section 7.1), whatever the pieces it arrives in."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # bytes of the current chunk still to come
        self._state = "size"  # size, data, crlf (after data), trailer

    def feed(self, data: bytes) -> tuple[list[bytes], bytes | None]:
        """The body bytes in ``data``, and what followed the body's end (None: not ended).

        One pass with an offset: a read of many small chunks costs linear time.
        """
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        at, end = 0, len(buffer)
        while at < end:
            if self._state == "data":
                piece = buffer[at : at + self._left]
                out.append(piece)
                self._left -= len(piece)
                at += len(piece)
                if not self._left:
                    self._state = "crlf"
                continue
            eol = buffer.find(b"\r\n", at, at + MAX_LINE + 2)
            if eol < 0:
                if end - at > MAX_LINE:
                    raise AnswerError("a chunked body's line is too long")
                break
            line, at = buffer[at:eol], eol + 2
            if self._state == "crlf":
                if line:
                    raise AnswerError("a chunk is longer than its size says")
                self._state = "size"
            elif self._state == "size":
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise AnswerError(f"bad chunk size {line[:40]!r}")
                self._left = int(size, 16)
                self._state = "data" if self._left else "trailer"
            elif not line:  # the blank line after the trailers
                self._buffer = b""
                return out, buffer[at:]
        self._buffer = buffer[at:]
        return out, None


def _parse_head(head: bytes, method: bytes) -> tuple[int, bytes, Headers, int | None, str, bool]:
    """Status, phrase, headers, length, framing (none, length, chunked, close), keep-alive."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    version = status[0]
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(status) < 2
        or len(status[1]) != 3
        or not status[1].isdigit()
    ):
        raise AnswerError(f"bad status line {lines[0][:80]!r}")
    code = int(status[1])
    phrase = status[2] if len(status) > 2 else b""
    headers = Headers()
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    tokens: list[bytes] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip(b" \t"):
            raise AnswerError(f"bad header line {line[:80]!r}")
        value = value.strip(b" \t")
        try:
            headers.addRawHeader(name, value)
        except ValueError as e:  # a name that is not a token, say
            raise AnswerError(f"bad header line {line[:80]!r}") from e
        low = name.lower()
        if low == b"content-length":
            lengths.update(v.strip(b" \t") for v in value.split(b","))
        elif low == b"transfer-encoding":
            codings += (c.strip(b" \t").lower() for c in value.split(b","))
        elif low == b"connection":
            tokens += (t.strip(b" \t").lower() for t in value.split(b","))
    keep_alive = b"close" not in tokens and (version == b"HTTP/1.1" or b"keep-alive" in tokens)
    if method == b"HEAD" or code in _NO_BODY_CODES or code < 200:
        return code, phrase, headers, 0, "none", keep_alive
    if codings:  # Transfer-Encoding overrides Content-Length (RFC 9112 section 6.3)
        if codings[-1] == b"chunked":
            return code, phrase, headers, None, "chunked", keep_alive and not lengths
        return code, phrase, headers, None, "close", False
    if lengths:
        value = lengths.pop()
        if lengths or not value.isdigit():
            raise AnswerError("bad Content-Length")
        length = int(value)
        return code, phrase, headers, length, "length" if length else "none", keep_alive
    return code, phrase, headers, None, "close", False


class _Connection(Protocol):
    """One keep-alive connection to a consumer: one request at a time, then back to the pool."""

    def __init__(self, pool: UpstreamClient, key: Key) -> None:
        self._pool = pool
        self.key = key
        self.idle_since: float | None = None  # None: in use
        self.expiry: IDelayedCall | None = None
        self._method = b""
        self._waiting: Deferred[Answer] | None = None  # the answer's head is awaited
        self._answer: Answer | None = None  # its body is being read
        self._buffer = b""
        self._framing = "none"
        self._left = 0
        self._chunked: _Chunked | None = None
        self._keep_alive = False
        self._paused = False
        self._sending: IBodyProducer | None = None
        self._closing = False  # closed or aborted by this side: never reused
        self._heard = False  # a byte of the answer arrived
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
    ) -> None:
        """Write the request; ``answer`` fires with the answer's head.

        ``retry`` is called instead of failing ``answer`` when the connection
        closes before a byte of the answer came (a kept connection the
        consumer had just closed).
        """
        self._method = method
        self._waiting = answer
        self._retry = retry
        self._heard = False
        self._buffer = b""
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
        if self._answer is not None:
            self._body(data)
            return
        if self._waiting is None:  # an idle connection must be silent
            self.abort()
            return
        self._heard = True
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._unanswerable(AnswerError("the answer's head is over 64 KiB"))
                else:
                    self._buffer = buffer
                return
            try:
                code, phrase, headers, length, framing, keep_alive = _parse_head(
                    buffer[:end], self._method
                )
            except AnswerError as e:
                self._unanswerable(e)
                return
            buffer = buffer[end + 4 :]
            if code >= 200:
                break
            if code == 101:
                self._unanswerable(AnswerError("the consumer switched protocols"))
                return
            # 100 Continue and other interim answers: the final one follows.
        self._buffer = b""
        self._framing, self._keep_alive = framing, keep_alive
        self._left = length or 0
        self._chunked = _Chunked() if framing == "chunked" else None
        answer = self._answer = Answer(self, code, phrase, headers, length)
        waiting, self._waiting = self._waiting, None
        waiting.callback(answer)
        if self._answer is answer and (buffer or framing == "none"):
            self._body(buffer)

    def _body(self, data: bytes) -> None:
        answer = self._answer
        assert answer is not None
        framing = self._framing
        if framing == "length":
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                answer._data(data)
                return
            self._left = 0
            if left:
                answer._data(data[:left])
            self._done(rest=data[left:])
        elif framing == "chunked":
            assert self._chunked is not None
            try:
                pieces, rest = self._chunked.feed(data)
            except AnswerError as e:
                self._broken(e)
                return
            for piece in pieces:
                answer._data(piece)
                if self._framing == "stopped":
                    return
            if rest is not None:
                self._done(rest)
        elif framing == "close":
            if data:
                answer._data(data)
        elif framing == "none":
            self._done(rest=data)
        # "stopped": the receiver wants no more; its end comes with the connection's

    def _done(self, rest: bytes) -> None:
        """The body is complete: back to the pool first, then tell its receiver."""
        answer, self._answer = self._answer, None
        assert answer is not None
        if self._closing:
            pass
        elif rest or self._sending is not None or not self._keep_alive:
            self.abort() if self._sending is not None else self._close()
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
        if self._answer is answer and self._framing != "stopped":
            self._framing = "stopped"
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._pool._lost(self)
        if self._sending is not None:
            sending, self._sending = self._sending, None
            sending.stopProducing()
        waiting, self._waiting = self._waiting, None
        retry, self._retry = self._retry, None
        if waiting is not None:
            if retry is not None and not self._heard:
                retry()
            else:
                why = f"the connection closed before an answer: {_why(reason)}"
                waiting.errback(NoAnswer(why))
        answer, self._answer = self._answer, None
        if answer is not None:
            if self._framing == "stopped":
                answer._finish(Failure(ConnectionAborted("the receiver stopped the answer")))
            elif self._framing == "close" and isinstance(reason.value, ConnectionDone):
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
    """Sends requests to consumers over kept-alive connections, at most ``max_idle`` per origin."""

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

    def request(
        self,
        method: bytes,
        url: bytes,
        fields: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | IBodyProducer | None = None,
    ) -> Deferred[Answer]:
        """Send ``method url`` with header ``fields`` and ``body``; fires with the answer's head.

        Raises ``ValueError`` or ``SchemeNotSupported`` for a URL it cannot
        use, before any I/O.  A body of ``bytes`` is sent with its
        ``Content-Length``; a producer's of unknown length is chunked; None
        sends no body.  The Deferred fails with the connection's error,
        ``NoAnswer`` or ``AnswerError``; cancelling it closes the connection.
        """
        uri = URI.fromBytes(url)
        target = uri.originForm
        if _UNSAFE_TARGET.search(target):
            raise ValueError(f"unsafe request target {target[:80]!r}")
        endpoint = self._endpoints.endpointForURI(uri)
        head = _format_head(method, target, _host(uri), fields, body)
        call = _Call()
        key = (uri.scheme, uri.host, uri.port)
        connection = self._take(key)
        if connection is None:
            self._connect(call, endpoint, key, method, head, body)
            return call.answer

        retry = None
        if method in _IDEMPOTENT and (body is None or isinstance(body, bytes)):

            def retry() -> None:
                self._connect(call, endpoint, key, method, head, body)

        call.stop = connection.cancel
        connection.send(method, head, body, call.answer, retry)
        return call.answer

    def _connect(
        self,
        call: _Call,
        endpoint: IStreamClientEndpoint,
        key: Key,
        method: bytes,
        head: bytes,
        body: Any,
    ) -> None:
        """Send on a new connection to ``endpoint``; ``call.answer`` fires as for any other."""
        factory = self._factories.get(key)
        if factory is None:
            factory = self._factories[key] = _ConnectionFactory(self, key)

        def connected(connection: _Connection) -> None:
            if call.cancelled:  # too late to stop the attempt
                connection._close()
            else:
                call.stop = connection.cancel
                connection.send(method, head, body, call.answer)

        def failed(failure: Failure) -> None:
            if not call.cancelled:  # else the caller has its CancelledError
                call.answer.errback(failure)

        connecting: Deferred[Any] = endpoint.connect(factory)
        call.stop = connecting.cancel
        connecting.addCallbacks(connected, failed)

    def _take(self, key: Key) -> _Connection | None:
        """The most recently used idle connection of ``key``, if any."""
        idle = self._idle.get(key)
        if not idle:
            return None
        connection = idle.pop()
        connection.idle_since = None
        return connection

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

    def idle_connections(self) -> int:
        """How many connections wait in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> Deferred[list[None]]:
        """Close every idle connection and keep no more; fires once they are all closed."""
        self._closed = True
        idle = [c for connections in self._idle.values() for c in connections]
        return gatherResults([c.closed() for c in idle])


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
) -> bytes:
    """The request line and headers, framing header included, up to the blank line."""
    lines = [b"%s %s HTTP/1.1\r\nHost: %s" % (method, target, host)]
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
