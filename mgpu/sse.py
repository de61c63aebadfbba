# -*- test-case-name: tests.test_sse -*-
"""``GET /v1/events``: the event bus as a Server-Sent Events stream.

Publishing never writes to a socket: an event published on the bus is queued,
and ``delay_s`` later (0.1 s) the events queued meanwhile are encoded once and
written to every client in one write each, at most ``per_turn`` clients a
turn of the reactor (the rest follow on the next turns). So the scheduling
code that publishes pays the same whatever the number of clients, each
client gets every event in order, and the events of a burst (an eviction's
unload, its load) share one write per client: with 1,000 clients, writing
each event on its own cost a swap a third of the daemon's throughput.

The writes also have a rate: past ``spread`` (100) clients, events gather
``delay_s`` longer for each further ``spread`` clients (1 s with 1,000
clients), so the writes never exceed ``spread`` per ``delay_s`` (1,000 a
second). A write costs the reactor about 16 µs whatever it
carries; with the rate fixed, a crowd of dashboards costs the daemon the
same small share of its time however large it grows, and pays in latency.

Each client has a bounded backlog. While its connection accepts data, the
events are written at once; while the transport says it is full
(``pauseProducing``), they wait, and once more than ``buffer`` events wait the
client is sent a last ``dropped`` event and its stream is ended: a slow reader
costs the daemon at most ``buffer`` events of memory, never holds anything
back, and an ``EventSource`` reconnects and replays what it missed.

``Last-Event-ID`` (sent by a reconnecting ``EventSource``) replays the kept
events after that id; ``?history=N`` starts a new stream with the last N.
Either way the live feed goes on from the event after the last one replayed,
none repeated or skipped.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Final

from attrs import field, frozen
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mgpu.events import Event, EventBus, iso_seconds

log = Logger()

#: Events a client may fall behind by before it is dropped.
CLIENT_BUFFER: Final = 256
#: How long published events gather before they are written (one write per client).
DELIVERY_DELAY_S: Final = 0.1
#: Clients written to per ``DELIVERY_DELAY_S``: with more, events gather longer.
SPREAD: Final = 100
#: Clients written to in one turn of the reactor; the others wait for the next.
CLIENTS_PER_TURN: Final = 200
#: A comment line this often keeps proxies from closing a quiet stream, and
#: finds clients that are gone.
KEEPALIVE_S: Final = 15.0
#: How long an ``EventSource`` waits before reconnecting.
RETRY_MS: Final = 2000
#: Why a client was sent ``dropped``.
SLOW_READER: Final = "slow_reader"


def encode(event: Event) -> bytes:
    """One event in the SSE wire format."""
    data = json.dumps(event.to_json(), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def encode_dropped(missed: int, last_id: int, at: float) -> bytes:
    """The last message to a client dropped for reading too slowly.

    It has no ``id:`` line, so an ``EventSource`` keeps the id of the last
    event it did get and replays from there when it reconnects.
    """
    data = json.dumps(
        {"kind": "dropped", "at": iso_seconds(at), "missed": missed, "reason": SLOW_READER,
         "last_id": last_id},
        separators=(",", ":"),
    )  # fmt: skip
    return f"event: dropped\ndata: {data}\n\n".encode()


@frozen
class _Batch:
    """The events of one turn, encoded once for every client: ``(id, chunk)`` oldest first."""

    chunks: tuple[tuple[int, bytes], ...]
    blob: bytes = field(init=False)

    @blob.default
    def _join(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    @property
    def last_id(self) -> int:
        return self.chunks[-1][0]

    def after(self, last_id: int) -> tuple[bytes, int]:
        """The bytes of the events after id ``last_id``, and how many they are."""
        if self.chunks[0][0] > last_id:
            return self.blob, len(self.chunks)
        newer = [chunk for id_, chunk in self.chunks if id_ > last_id]
        return b"".join(newer), len(newer)


class EventStreams:
    """Serves every ``/v1/events`` client.

    One bus subscription for all of them: each event is encoded once, however
    many clients follow. ``dropped`` counts the events that clients dropped
    for reading too slowly did not get from their stream, ``dropped_clients``
    those clients.
    """

    def __init__(
        self,
        bus: EventBus,
        clock: IReactorTime,
        buffer: int = CLIENT_BUFFER,
        per_turn: int = CLIENTS_PER_TURN,
        delay_s: float = DELIVERY_DELAY_S,
        spread: int = SPREAD,
    ) -> None:
        self._bus = bus
        self._clock = clock
        self._delay_s = delay_s
        self._spread = max(1, spread)
        self._buffer = buffer
        self._per_turn = max(1, per_turn)
        self.dropped = 0
        self.dropped_clients = 0
        self._open: dict[_Stream, None] = {}  # in the order they came: served in that order
        self._outbox: list[Event] = []  # published, not yet in a batch
        self._batch: _Batch | None = None  # being written, to the clients in _waiting
        self._waiting: deque[_Stream] = deque()
        self._turn: IDelayedCall | None = None
        bus.subscribe(self._publish)

    @property
    def clients(self) -> int:
        """How many streams are open."""
        return len(self._open)

    def _publish(self, event: Event) -> None:
        # On the publisher's time: no encoding, no writes, one timer per turn.
        if self._open:
            self._outbox.append(event)
            if self._turn is None:
                self._turn = self._clock.callLater(self.gathering_s, self._deliver)

    @property
    def gathering_s(self) -> float:
        """How long events gather before they are written: longer with more clients."""
        return self._delay_s * max(1, -(-len(self._open) // self._spread))

    def _deliver(self) -> None:
        """One turn's writing: the batch under way, then the next, up to ``per_turn`` clients."""
        self._turn = None
        budget = self._per_turn
        while budget > 0:
            if not self._waiting:
                if not self._outbox:
                    break
                chunks = _encoded(self._outbox)
                self._outbox = []
                if chunks:
                    self._batch = _Batch(chunks)
                    self._waiting = deque(self._open)
                continue
            assert self._batch is not None
            try:
                self._waiting.popleft().push(self._batch)
            except Exception:  # one broken stream must not stop the others' feed
                log.failure("writing events to a /v1/events client failed")
            budget -= 1
        if self._waiting or self._outbox:
            self._turn = self._clock.callLater(0, self._deliver)
        else:
            self._batch = None

    def end_all(self) -> None:
        """End every open stream (the token changed: each must authenticate again)."""
        for stream in list(self._open):
            stream.end()

    def render(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx in front: do not buffer
        history, lost = _history(request, self._bus)
        _Stream(self, request).start(history, lost, self._bus.last_id)
        return NOT_DONE_YET


def _encoded(events: list[Event]) -> tuple[tuple[int, bytes], ...]:
    """Each event encoded once, with its id; one that cannot be is logged and left out."""
    chunks = []
    for event in events:
        try:
            chunks.append((event.id, encode(event)))
        except Exception:
            log.failure("event {id} ({kind}) could not be encoded", id=event.id, kind=event.kind)
    return tuple(chunks)


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
    """One client's stream: its backlog and its keep-alive timer."""

    def __init__(self, streams: EventStreams, request: Request) -> None:
        self._streams = streams
        self._request = request
        self._pending: list[bytes] = []  # batches' bytes (shared with other clients)
        self._backlog = 0  # events in _pending
        self._last_id = 0  # the last event handed to this client
        self._written_id = 0  # the last event written to it
        self._paused = False
        self._done = False
        self._keepalive: IDelayedCall | None = None

    def start(self, history: list[Event], lost: int, last_id: int) -> None:
        """Begin the stream: ``history`` first, after a note of the ``lost`` events; live
        events follow from the one after ``last_id``, the bus's latest."""
        self._last_id = self._written_id = last_id
        self._streams._open[self] = None
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._closed)
        opening = [f"retry: {RETRY_MS}\n\n".encode()]
        if lost:
            opening.append(f": {lost} events dropped\n\n".encode())
        opening.extend(map(encode, history))
        self._request.write(b"".join(opening))
        self._arm()

    def push(self, batch: _Batch) -> None:
        """A turn's events: written now, kept while the client is slow, or the client dropped."""
        if self._done or batch.last_id <= self._last_id:
            return
        data, count = batch.after(self._last_id)
        self._last_id = batch.last_id
        if not self._paused:
            self._written_id = self._last_id
            self._request.write(data)
        elif self._backlog + count > self._streams._buffer:
            self._drop(self._backlog + count)
        else:
            self._pending.append(data)
            self._backlog += count

    def _drop(self, missed: int) -> None:
        """Tell the client it missed ``missed`` events, count it, and end its stream."""
        self._streams.dropped += missed
        self._streams.dropped_clients += 1
        self._pending.clear()
        self._backlog = 0
        at = self._streams._clock.seconds()
        self._request.write(encode_dropped(missed, self._written_id, at))
        self.end()

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
        if self._pending and not self._done:
            data = b"".join(self._pending)
            self._pending.clear()
            self._backlog = 0
            self._written_id = self._last_id
            self._request.write(data)

    def stopProducing(self) -> None:
        self._paused = True

    def end(self) -> None:
        """Finish the stream from our side; an ``EventSource`` reconnects."""
        if not self._request.finished:
            self._done = True
            self._request.unregisterProducer()
            self._request.finish()

    def _closed(self, _: object) -> Failure | None:
        self._done = True
        self._streams._open.pop(self, None)
        self._pending.clear()
        self._backlog = 0
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        return None
