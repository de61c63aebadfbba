# -*- test-case-name: tests.test_tunnel -*-
"""WebSocket tunnels under native prefixes (SPEC 9.1): the handshake relayed, then bytes both ways.

The broker speaks no WebSocket.  An ``Upgrade: websocket`` request under a
native prefix is sent to the consumer on a connection of its own (never
pooled, never scheduled, never holding the GPU lease): ``GET`` the target
with the client's headers, ``Upgrade`` and ``Connection: Upgrade`` kept for
this request only, the client's ``Host`` kept and ``X-Forwarded-*`` set as on
every native route (``mgpu.relay``), no body.  The consumer's answer head is
read with httptools, at most ``MAX_HEAD`` bytes within the consumer's
``timeout_s``:

- any answer but ``101`` is read whole (its body up to ``MAX_REFUSAL_BODY``)
  and relayed as an ordinary answer, and the client's connection closes after
  it (bytes it sent after its head may be frames, not a next request);
- a ``101`` is written to the client byte for byte, followed by whatever the
  consumer sent after it, and the client's connection is taken from
  twisted.web (``take_over``): from then on it is a byte pipe to the
  consumer's, each side the other's producer, so a slow reader pauses the
  other side's writer instead of filling memory.

A tunnel lasts until either side closes; the other is then closed once its
pending writes are out.  An idle tunnel is never timed out (ComfyUI's ``/ws``
is silent between jobs for hours); TCP keepalive is switched on for both
connections so that a vanished peer is found eventually.  The open tunnels
are counted for ``/metrics`` and closed when the daemon stops.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, cast

from attrs import define, field, frozen
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.server import Request

from mgpu.config import ConsumerConfig
from mgpu.errors import BrokerError
from mgpu.fdlimit import exhausted, overloaded
from mgpu.relay import HOP_BY_HOP, client_host, native_headers, upstream_headers
from mgpu.upstream import MAX_FIELDS, MAX_HEAD, EndpointCache

log = Logger()

#: The body of an answer other than 101, relayed whole, may not be longer than this.
MAX_REFUSAL_BODY: Final = 1024 * 1024
#: At daemon stop, how long open tunnels may take to write what they still hold.
STOP_GRACE_S: Final = 2.0
#: How long to wait for a TCP connection to the consumer.
CONNECT_TIMEOUT_S: Final = 5.0

#: A reason phrase is HTAB, SP, VCHAR and obs-text (RFC 9112 section 4).
_REASON: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_NOT_RELAYED: Final = HOP_BY_HOP | {b"content-length"}
_NO_BODY_CODES: Final = (204, 304)
_BAD_URL: Final = (SchemeNotSupported, DNSLookupError, ValueError)

EndpointFor = Callable[[URI], IStreamClientEndpoint]


# -- the consumer's answer -----------------------------------------------------


@frozen
class Switched:
    """The consumer's ``101``: its head exactly as sent, and the bytes that followed it."""

    phrase: bytes
    head: bytes
    rest: bytes


@frozen
class Refused:
    """A consumer's answer other than ``101``, read whole, to relay as an ordinary answer."""

    code: int
    phrase: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class BadAnswer(Exception):
    """The consumer's answer to the handshake breaks HTTP, or is over the size limits."""


class NoAnswer(Exception):
    """The consumer's connection closed before any byte of an answer."""


class AnswerReader:
    """Reads the consumer's answer to a handshake, fed in pieces: a ``101`` or a whole answer.

    ``feed`` returns None until it knows, then ``Switched`` or ``Refused``;
    ``end`` (the connection closed) returns an answer whose body ran to the
    close.  Both raise ``BadAnswer`` for an answer that breaks HTTP or the
    size limits, ``end`` ``NoAnswer`` when nothing came.
    """

    def __init__(self) -> None:
        self._parser = HttpResponseParser(self)
        self._received: list[bytes] = []  # the head's bytes so far
        self._size = 0
        self._reason: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] = []
        self._code = 0
        self._head_done = False
        self._until_close = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._complete = False

    def feed(self, data: bytes) -> Switched | Refused | None:
        """Read ``data``; the answer once it is known."""
        if not self._head_done:
            self._received.append(data)
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as e:
            # llhttp stops right after a 101's head: the rest is the new protocol's.
            offset = int(e.args[0]) if e.args else len(data)
            head = b"".join(self._received)[: self._size - len(data) + offset]
            return Switched(b"".join(self._reason), head, data[offset:])
        except HttpParserError as e:
            cause = e.__context__  # a callback's own refusal
            if isinstance(cause, BadAnswer):
                raise cause from None
            raise BadAnswer(f"not an HTTP answer: {e}") from None
        if not self._head_done and self._size > MAX_HEAD:
            raise BadAnswer(f"an answer head over {MAX_HEAD // 1024} KiB")
        if self._complete:
            if self._code == 101:  # llhttp upgrades only when the 101 says Upgrade
                raise BadAnswer("a 101 without an Upgrade header")
            return self._refused()
        return None

    def end(self) -> Refused:
        """The connection closed: the answer, if its body was framed by the close."""
        if self._size == 0:
            raise NoAnswer("the connection closed before an answer")
        if self._head_done and self._until_close:
            return self._refused()
        raise BadAnswer("the connection closed inside the answer")

    def _refused(self) -> Refused:
        return Refused(
            self._code, b"".join(self._reason), tuple(self._fields), b"".join(self._body)
        )

    # httptools' callbacks

    def on_status(self, piece: bytes) -> None:
        self._reason.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))
        if len(self._fields) > MAX_FIELDS:
            raise BadAnswer(f"an answer with over {MAX_FIELDS} header fields")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._code = code = parser.get_status_code()
        self._head_done = True
        if code != 101:
            self._received = []  # only a 101's head is relayed as sent
        if not _REASON.fullmatch(b"".join(self._reason)):
            raise BadAnswer("a reason phrase with control characters")
        if code == 101 and parser.get_http_version() != "1.1":
            raise BadAnswer("a 101 that is not HTTP/1.1")
        if code < 200 and code != 101:
            raise BadAnswer(f"an interim {code} answer to a WebSocket handshake")
        framed = any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._fields
        )
        self._until_close = not framed and code not in _NO_BODY_CODES

    def on_body(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > MAX_REFUSAL_BODY:
            raise BadAnswer(f"an answer body over {MAX_REFUSAL_BODY // 1024} KiB")
        self._body.append(data)

    def on_message_complete(self) -> None:
        self._complete = True


# -- taking a connection from twisted.web -----------------------------------------


@define
class Takeover:
    """A client connection taken from twisted.web (``take_over``).

    ``pending``: what the client sent after the request's head, which the
    HTTP channel had read and kept.  ``release`` must be called once the
    connection is gone: it tells the channel (once), which ends the request
    and, for the broker's own channel, counts the connection out of the
    connection cap.
    """

    transport: Any
    pending: bytes
    _channel: Any = field(repr=False)
    _released: bool = False

    def release(self, reason: Failure = connectionDone) -> None:
        """The connection is gone: tell the HTTP channel (once)."""
        if not self._released:
            self._released = True
            self._channel.connectionLost(reason)


def take_over(request: Request, protocol: IProtocol) -> Takeover:
    """Take ``request``'s connection from its HTTP/1.1 channel and connect ``protocol`` to it.

    The technique of autobahn's ``WebSocketResource``: the channel lets go
    of its transport, whose protocol becomes ``protocol`` (the wrapped one,
    for TLS).  The channel's timers are stopped (the broker's head deadline,
    Twisted's idle timeout), it stops being the transport's producer, and the
    bytes it had read after the head are handed over.  The request is never
    finished; ``Takeover.release`` ends it when the connection closes.
    Reading is resumed (the channel pauses it while a request runs).
    """
    channel: Any = request.channel
    transport = channel.transport
    if transport is None:
        raise ValueError("the request's connection is gone or already taken")
    # Bytes read after the head: kept by the channel while the request runs,
    # or still in LineReceiver's buffer if this runs from within the head's parse.
    pending = b"".join(getattr(channel, "_dataBuffer", ())) + getattr(channel, "_buffer", b"")
    channel._dataBuffer = []
    channel._buffer = b""
    stop_timers = getattr(channel, "stop_timers", None)
    if stop_timers is not None:
        stop_timers()
    else:
        channel.setTimeout(None)
    channel.transport = None
    transport.unregisterProducer()
    if isinstance(transport, ProtocolWrapper):  # TLS: the wrapper stays, its content changes
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    transport.resumeProducing()
    return Takeover(transport, pending, channel)


def no_more_requests(request: Request) -> None:
    """Close the client's connection after this answer: what follows may be frames."""
    request.setHeader(b"connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None and hasattr(channel, "persistent"):
        channel.persistent = False


# -- the request head -----------------------------------------------------------


def upgrade_head(
    request: Request,
    target: bytes,
    default_host: bytes,
    prefix: bytes,
    *,
    drop_authorization: bool,
) -> bytes:
    """The handshake as the consumer gets it: ``GET target``, no body.

    The client's end-to-end headers, ``X-Forwarded-*`` and its ``Host`` as on
    every native route (``mgpu.relay``), plus ``Upgrade`` as the client sent
    it and ``Connection: Upgrade``: hop-by-hop, forwarded for this request only.
    """
    given = client_host(request)
    host = given or default_host
    fields = native_headers(upstream_headers(request, drop_authorization), request, given, prefix)
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade", [b"websocket"])
    lines = [b"GET %s HTTP/1.1" % target, b"Host: " + host]
    lines += [b"%s: %s" % (name, _one_line(value)) for name, value in fields]
    lines += [b"Upgrade: " + _one_line(value) for value in upgrade]
    lines.append(b"Connection: Upgrade")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _one_line(value: bytes) -> bytes:
    return value.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\0", b" ")


def _default_host(uri: URI) -> bytes:
    """The consumer's ``host[:port]``: the ``Host`` sent for a client that sent none."""
    host = b"[%s]" % uri.host if b":" in uri.host else uri.host
    default = 443 if uri.scheme == b"https" else 80
    return host if uri.port == default else b"%s:%d" % (host, uri.port)


# -- the connections --------------------------------------------------------------


class _ConsumerConnection(Protocol):
    """The connection to the consumer: the handshake sent, its answer read, then a pipe."""

    def __init__(self, head: bytes, answered: Callable[[object], None]) -> None:
        self._head = head
        self._reader = AnswerReader()
        self._answered: Callable[[object], None] | None = answered
        self.tunnel: Tunnel | None = None
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._head)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_consumer(data)
            return
        if self._answered is None:  # decided: a refusal's trailing bytes, or after an error
            return
        try:
            outcome = self._reader.feed(data)
        except BadAnswer as e:
            self._decide(e)
            return
        if outcome is not None:
            self._decide(outcome)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self.tunnel is not None:
            self.tunnel.consumer_lost(reason)
        elif self._answered is not None:
            outcome: object
            try:
                outcome = self._reader.end()
            except (BadAnswer, NoAnswer) as e:
                outcome = e
            self._decide(outcome)

    def _decide(self, outcome: object) -> None:
        answered, self._answered = self._answered, None
        if answered is not None:
            answered(outcome)

    def abort(self) -> None:
        """Close now, whatever is pending: the handshake or the tunnel is abandoned."""
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _ClientSide(Protocol):
    """The client's connection once taken from twisted.web: bytes go to the consumer."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.from_client(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tunnel.client_lost(reason)


class Tunnel:
    """One open tunnel: two connections, each the other's producer, closed together."""

    def __init__(self, hub: Tunnels, consumer: _ConsumerConnection, name: str) -> None:
        self._hub = hub
        self.name = name
        self._consumer = consumer
        self.client = _ClientSide(self)
        self._takeover: Takeover | None = None
        self._client_open = self._consumer_open = True
        self._paced = False  # each transport is the other's producer
        self._let_go: set[int] = set()  # ids of the transports being closed

    def start(self, takeover: Takeover, switched: Switched) -> None:
        """Write the consumer's 101 and what followed to the client, the client's early
        bytes to the consumer, then let each side pace the other."""
        self._takeover = takeover
        client, upstream = takeover.transport, cast(Any, self._consumer.transport)
        self._consumer.tunnel = self
        client.write(switched.head + switched.rest)
        if takeover.pending:
            upstream.write(takeover.pending)
        client.registerProducer(upstream, True)  # a slow client pauses the consumer
        upstream.registerProducer(client, True)  # a slow consumer pauses the client
        self._paced = True
        for transport in (client, upstream):
            keepalive = getattr(transport, "setTcpKeepAlive", None)
            if keepalive is not None:
                keepalive(True)

    def from_client(self, data: bytes) -> None:
        if self._consumer_open and self._consumer.transport is not None:
            self._consumer.transport.write(data)

    def from_consumer(self, data: bytes) -> None:
        if self._client_open and self._takeover is not None:
            self._takeover.transport.write(data)

    def client_lost(self, reason: Failure) -> None:
        """The client left: the consumer's connection closes once its writes are out."""
        self._client_open = False
        if self._takeover is not None:
            self._takeover.release(reason)
        if self._consumer_open and self._consumer.transport is not None:
            self._close(self._consumer.transport)
        self._maybe_closed()

    def consumer_lost(self, reason: Failure) -> None:
        """The consumer closed: the client's connection closes once its writes are out."""
        self._consumer_open = False
        if self._client_open and self._takeover is not None:
            self._close(self._takeover.transport)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if not self._client_open and not self._consumer_open:
            self._hub._closed(self)

    def close(self) -> None:
        """Close both connections once what they hold is written (the daemon stops)."""
        if self._client_open and self._takeover is not None:
            self._close(self._takeover.transport)
        if self._consumer_open and self._consumer.transport is not None:
            self._close(self._consumer.transport)

    def _close(self, transport: Any) -> None:
        """Close after pending writes (once); its producer, the other side, is gone or going."""
        if id(transport) in self._let_go:
            return
        self._let_go.add(id(transport))
        if self._paced:
            transport.unregisterProducer()
        transport.loseConnection()

    def abort(self) -> None:
        """Close both connections now, whatever they still hold."""
        if self._client_open and self._takeover is not None:
            self._takeover.transport.abortConnection()
        if self._consumer_open:
            self._consumer.abort()


# -- the handshake ------------------------------------------------------------------


class _Handshake:
    """One upgrade request until the consumer's answer: its connection, its timer, its end."""

    def __init__(
        self,
        hub: Tunnels,
        request: Request,
        consumer: ConsumerConfig,
        head: bytes,
        timeout_s: float,
    ) -> None:
        self._hub = hub
        self._request = request
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._connection = _ConsumerConnection(head, self._answered)
        self._connected = False
        self._connecting: Deferred[Any] | None = None
        self._done = False
        self._timer: IDelayedCall | None = hub.clock.callLater(timeout_s, self._timed_out)
        self.result: Deferred[None] = Deferred(self._cancel)

    def start(self, endpoint: IStreamClientEndpoint) -> Deferred[None]:
        connecting = self._connecting = connectProtocol(endpoint, self._connection)
        connecting.addCallbacks(self._made, self._not_made)
        return self.result

    def _made(self, _: object) -> None:
        self._connecting = None
        self._connected = True
        if self._done:  # cancelled or timed out as it connected
            self._connection.abort()

    def _not_made(self, failure: Failure) -> None:
        self._connecting = None
        if self._done:
            return
        name = self._consumer.name
        if exhausted(failure.value):
            self._end(overloaded(name, f"to reach {name}"))
        else:
            why = failure.getErrorMessage() or type(failure.value).__name__
            self._end(
                BrokerError("consumer_unreachable", f"consumer {name} unreachable: {why}", name)
            )

    def _answered(self, outcome: object) -> None:
        if self._done:
            return
        name = self._consumer.name
        if isinstance(outcome, Switched):
            self._switch(outcome)
        elif isinstance(outcome, Refused):
            _relay(self._request, outcome)
            self._connection.transport.loseConnection()  # type: ignore[union-attr]
            self._end(None)
        elif isinstance(outcome, NoAnswer):
            self._end(
                BrokerError("consumer_unreachable", f"consumer {name} unreachable: {outcome}", name)
            )
        else:
            self._end(
                BrokerError("bad_answer", f"consumer {name} sent a bad answer: {outcome}", name)
            )

    def _switch(self, switched: Switched) -> None:
        request = self._request
        if getattr(request.channel, "transport", None) is None:
            self._end(CancelledError())  # the client left unnoticed
            return
        if self._hub.stopped:  # no tunnel may outlive the daemon's stop
            message = "the daemon is stopping; try again shortly"
            retry = {"Retry-After": "1"}
            self._end(BrokerError("daemon_overloaded", message, self._consumer.name, retry))
            return
        request.setResponseCode(101, switched.phrase)
        request.sentLength = len(switched.head)
        _log(request)
        tunnel = Tunnel(self._hub, self._connection, self._consumer.name)
        takeover = take_over(request, tunnel.client)
        self._finish()
        tunnel.start(takeover, switched)
        self._hub._opened(tunnel)
        self.result.callback(None)

    def _timed_out(self) -> None:
        self._timer = None
        name = self._consumer.name
        message = f"{name} did not answer the WebSocket handshake within {self._timeout_s:g}s"
        self._end(BrokerError("upstream_timeout", message, name))

    def _cancel(self, result: Deferred[None]) -> None:
        """The client left: stop connecting or close the connection (the Deferred fails)."""
        self._end(None, cancelled=True)

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self, error: Exception | None, *, cancelled: bool = False) -> None:
        if self._done:
            return
        self._finish()
        if error is not None or cancelled:
            if self._connecting is not None:
                self._connecting.cancel()
            elif self._connected:
                self._connection.abort()
        if cancelled:
            return  # the Deferred fails with CancelledError by itself
        if error is None:
            self.result.callback(None)
        else:
            self.result.errback(error)


def _relay(request: Request, refused: Refused) -> None:
    """A consumer's refusal of the handshake as the client's answer (the caller finishes it)."""
    request.setResponseCode(refused.code, refused.phrase)
    out = request.responseHeaders
    for name, value in refused.headers:
        low = name.lower()
        if low not in _NOT_RELAYED and not low.startswith(b"proxy-"):
            out.addRawHeader(name, value)
    if refused.code not in _NO_BODY_CODES:
        out.setRawHeaders(b"content-length", [b"%d" % len(refused.body)])
    request.defaultContentType = None  # no text/html the consumer did not send
    if refused.body:
        request.write(refused.body)


def _log(request: Request) -> None:
    """The access-log line and the metrics of a switched request: it is never finished."""
    site = getattr(request.channel, "factory", None)
    if site is not None and hasattr(site, "log"):
        site.log(request)


# -- the open tunnels ------------------------------------------------------------------


class Tunnels:
    """Opens tunnels and keeps the open ones: counted for ``/metrics``, closed at stop.

    ``endpoint_for`` gives the endpoint of a consumer's URL (by default:
    plain TCP, TLS for https, as the relay's).
    """

    def __init__(self, clock: IReactorTime, endpoint_for: EndpointFor | None = None) -> None:
        self.clock = clock
        self._endpoint_for = endpoint_for or EndpointCache(clock, CONNECT_TIMEOUT_S).endpointForURI
        self._open: set[Tunnel] = set()
        self._closing: list[Deferred[None]] = []  # close_all's, fired once none is open
        self._cut: IDelayedCall | None = None  # close_all's deadline
        #: Tunnels opened since the daemon started.
        self.opened_total = 0
        self.stopped = False

    @property
    def open_count(self) -> int:
        """Tunnels open now."""
        return len(self._open)

    def open(
        self,
        request: Request,
        consumer: ConsumerConfig,
        target: bytes,
        *,
        prefix: bytes,
        drop_authorization: bool,
    ) -> Deferred[None]:
        """Tunnel ``request`` (an ``Upgrade: websocket`` GET) to ``target`` on ``consumer``.

        Fires once the tunnel is open (the connection is no longer the
        request's: do not finish it) or the consumer's refusal is written (the
        caller finishes the request).  Fails with ``BrokerError`` before
        anything is written (the caller answers it), or ``CancelledError``;
        either way the consumer's connection is closed.  Every answer that is
        not a tunnel closes the client's connection after it.
        """
        no_more_requests(request)
        if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
            return _failed(BrokerError("bad_request", "a WebSocket handshake is an HTTP/1.1 GET"))
        try:
            uri = URI.fromBytes(consumer.url.encode("ascii"))
            endpoint = self._endpoint_for(uri)
        except _BAD_URL as e:
            message = f"consumer {consumer.name} has an unusable URL {consumer.url!r}: {e}"
            return _failed(BrokerError("bad_consumer_url", message, consumer.name))
        try:
            head = upgrade_head(
                request, target, _default_host(uri), prefix, drop_authorization=drop_authorization
            )
        except BrokerError as e:
            return _failed(e)
        handshake = _Handshake(self, request, consumer, head, consumer.timeout_s)
        return handshake.start(endpoint)

    def _opened(self, tunnel: Tunnel) -> None:
        self._open.add(tunnel)
        self.opened_total += 1

    def _closed(self, tunnel: Tunnel) -> None:
        self._open.discard(tunnel)
        if not self._open:
            if self._cut is not None:
                self._cut.cancel()
                self._cut = None
            closing, self._closing = self._closing, []
            for done in closing:
                done.callback(None)

    def close_all(self) -> Deferred[None]:
        """Close every tunnel, and open no more; fires once all are closed.

        What they hold is written first, for ``STOP_GRACE_S`` at most: then
        the rest are cut.
        """
        self.stopped = True
        if not self._open:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._closing.append(done)
        for tunnel in list(self._open):
            tunnel.close()
        if not done.called and self._cut is None:
            self._cut = self.clock.callLater(STOP_GRACE_S, self._abort_all)
        return done

    def _abort_all(self) -> None:
        self._cut = None
        for tunnel in list(self._open):
            tunnel.abort()


def _failed(error: Exception) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.errback(error)
    return d


class TunnelService(Service):
    """Closes the open tunnels when the daemon stops."""

    def __init__(self, tunnels: Tunnels) -> None:
        self._tunnels = tunnels

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._tunnels.close_all()
