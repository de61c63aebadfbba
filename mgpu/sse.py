# -*- test-case-name: tests.test_sse -*-
"""``GET /v1/events``: the event bus as a Server-Sent Events stream.

Each client gets its own bounded buffer. While its connection accepts data,
events are written as they happen; while the transport says it is full
(``pauseProducing``), they wait in the buffer, and once the buffer is full the
oldest are dropped and counted, so a slow reader costs the daemon at most
``buffer`` events of memory and never holds anything back. The client is
told how many it missed in a comment line when it catches up.

``Last-Event-ID`` (sent by a reconnecting ``EventSource``) replays the kept
events after that id; ``?history=N`` starts a new stream with the last N.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mgpu.events import Event, EventBus

#: Events a client may fall behind by before the oldest are dropped.
CLIENT_BUFFER: Final = 256
#: A comment line this often keeps proxies from closing a quiet stream, and
#: finds clients that are gone.
KEEPALIVE_S: Final = 15.0
#: How long an ``EventSource`` waits before reconnecting.
RETRY_MS: Final = 2000


def encode(event: Event) -> bytes:
    """One event in the SSE wire format."""
    data = json.dumps(event.to_json(), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


class EventStreams:
    """Serves every ``/v1/events`` client; ``dropped`` counts events lost to slow ones.

    One bus subscription for all of them: each event is encoded once, however
    many clients follow.
    """

    def __init__(self, bus: EventBus, clock: IReactorTime, buffer: int = CLIENT_BUFFER) -> None:
        self._bus = bus
        self._clock = clock
        self._buffer = buffer
        self.dropped = 0
        self._open: set[_Stream] = set()
        bus.subscribe(self._publish)

    @property
    def clients(self) -> int:
        """How many streams are open."""
        return len(self._open)

    def _publish(self, event: Event) -> None:
        if self._open:
            chunk = encode(event)
            for stream in list(self._open):
                stream.push(chunk)

    def end_all(self) -> None:
        """End every open stream (the token changed: each must authenticate again)."""
        for stream in list(self._open):
            stream.end()

    def render(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx in front: do not buffer
        history, lost = _history(request, self._bus)
        _Stream(self, request).start(history, lost)
        return NOT_DONE_YET


def _history(request: Request, bus: EventBus) -> tuple[list[Event], int]:
    """The kept events a new stream starts with, and how many it missed that are not kept."""
    last_id = request.getHeader(b"last-event-id")
    if last_id is not None:
        try:
            after = int(last_id)
        except ValueError:
            return [], 0
        return bus.recent(after=after), bus.lost_after(after)
    try:
        count = int(request.args.get(b"history", [b"0"])[0])
    except ValueError:
        count = 0
    return (bus.recent()[-count:] if count > 0 else []), 0


@implementer(IPushProducer)
class _Stream:
    """One client's stream: its buffer and its keep-alive timer."""

    def __init__(self, streams: EventStreams, request: Request) -> None:
        self._streams = streams
        self._request = request
        self._pending: deque[bytes] = deque(maxlen=streams._buffer)
        self._missed = 0
        self._paused = False
        self._keepalive: IDelayedCall | None = None

    def start(self, history: list[Event], lost: int = 0) -> None:
        """Begin the stream: ``history`` first, after a note of the ``lost`` events."""
        self._missed = lost
        self._streams._open.add(self)
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._closed)
        self._request.write(f"retry: {RETRY_MS}\n\n".encode())
        for event in history:
            self._enqueue(encode(event))
        self._flush()
        self._arm()

    def push(self, chunk: bytes) -> None:
        """An encoded event for this client: written now, or kept while it is slow."""
        self._enqueue(chunk)
        self._flush()

    def _enqueue(self, chunk: bytes) -> None:
        if len(self._pending) == self._pending.maxlen:
            self._missed += 1
            self._streams.dropped += 1
        self._pending.append(chunk)  # the deque drops the oldest itself

    def _flush(self) -> None:
        if self._paused or self._request.finished:
            return
        if self._missed:
            self._request.write(f": {self._missed} events dropped\n\n".encode())
            self._missed = 0
        if self._pending:
            self._request.write(b"".join(self._pending))
            self._pending.clear()

    def _arm(self) -> None:
        self._keepalive = self._streams._clock.callLater(KEEPALIVE_S, self._ping)

    def _ping(self) -> None:
        self._keepalive = None
        if not self._paused:
            self._request.write(b": keep-alive\n\n")
        self._arm()

    # IPushProducer: the transport's say on whether to write.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        self._paused = True

    def end(self) -> None:
        """Finish the stream from our side; an ``EventSource`` reconnects."""
        if not self._request.finished:
            self._request.unregisterProducer()
            self._request.finish()

    def _closed(self, _: object) -> Failure | None:
        self._streams._open.discard(self)
        self._pending.clear()
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        return None
