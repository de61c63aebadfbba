"""Tests for mgpu.sse: ``GET /v1/events`` as a Server-Sent Events stream.

Each client is a real ``HTTPChannel`` over a ``StringTransport``
(``tests.test_facade.Client``); backpressure is exercised as the transport
would do it, by calling ``pauseProducing``/``resumeProducing`` on the producer
registered with it (the channel, which passes them on to the request's);
time is a ``Clock``.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from mgpu.events import Event, EventBus
from mgpu.sse import KEEPALIVE_S, RETRY_MS, EventStreams, encode
from tests.test_facade import Client, _Front, parse_response


def frames(client: Client) -> list[str]:
    """The SSE blocks (separated by a blank line) the client has received so far."""
    body = parse_response(client.transport.value())[2].decode("utf-8")
    assert body.endswith("\n\n"), body
    return body[:-2].split("\n\n")


def parse_frame(frame: str) -> dict[str, Any]:
    """One event block: its id, event and parsed data."""
    fields = dict(line.split(": ", 1) for line in frame.split("\n"))
    return {"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])}


def transport_says(what: str, client: Client) -> None:
    """Pause or resume the producer registered with the client's transport, as it would when
    its buffer fills or drains (the channel passes it on to the request's producer)."""
    producer = client.transport.producer
    assert producer is not None
    if what == "pause":
        producer.pauseProducing()
    else:
        producer.resumeProducing()


class StreamCase(SynchronousTestCase):
    """A bus, the streams serving it, and clients connected through a real HTTPChannel."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_000_000)
        self.bus = EventBus(cast(IReactorTime, self.clock))
        self.streams = EventStreams(self.bus, cast(IReactorTime, self.clock))
        self.requests: list[Request] = []

    def connect(
        self, uri: bytes = b"/v1/events", headers: tuple[bytes, ...] = (), streams: Any = None
    ) -> Client:
        serving: EventStreams = streams or self.streams

        def handle(request: Request) -> None:
            self.requests.append(request)
            serving.render(request)

        client = Client(_Front(handle))
        client.send(b"GET", uri, headers=headers)
        return client

    def publish(self, count: int, kind: str = "load") -> list[Event]:
        return [self.bus.publish(kind, consumer="mvoice", n=n) for n in range(count)]

    def ids(self, client: Client) -> list[int]:
        """The ids of the events the client received, in order (comments and retry skipped)."""
        return [parse_frame(f)["id"] for f in frames(client) if f.startswith("id: ")]


class OpeningTests(StreamCase):
    """The start of a stream: headers, the retry line, and history."""

    def test_headers_and_retry_line(self) -> None:
        """The answer is 200 text/event-stream, not cached nor buffered, starting with retry:."""
        self.publish(3)
        client = self.connect()
        status, headers, _ = client.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b"text/event-stream; charset=utf-8"])
        self.assertEqual(headers[b"cache-control"], [b"no-store"])
        self.assertEqual(headers[b"x-accel-buffering"], [b"no"])
        self.assertEqual(frames(client), [f"retry: {RETRY_MS}"])
        self.assertEqual(self.streams.clients, 1)

    def test_registered_as_push_producer(self) -> None:
        """The stream registers itself with the request as a streaming (push) producer."""
        self.connect()
        [request] = self.requests
        self.assertTrue(request.streamingProducer)
        self.assertTrue(IPushProducer.providedBy(request.producer))

    def test_history_n(self) -> None:
        """?history=N starts the stream with the last N kept events, oldest first."""
        self.publish(5)
        self.assertEqual(self.ids(self.connect(b"/v1/events?history=2")), [4, 5])
        self.assertEqual(self.ids(self.connect(b"/v1/events?history=99")), [1, 2, 3, 4, 5])

    def test_history_zero_negative_or_junk(self) -> None:
        """?history=0, a negative number or a non-number starts with no history."""
        self.publish(3)
        for query in (b"0", b"-2", b"abc", b""):
            client = self.connect(b"/v1/events?history=" + query)
            self.assertEqual(frames(client), [f"retry: {RETRY_MS}"], query)

    def test_last_event_id_replays(self) -> None:
        """Last-Event-ID replays the kept events after it, and wins over ?history."""
        self.publish(5)
        self.assertEqual(self.ids(self.connect(headers=(b"Last-Event-ID: 3",))), [4, 5])
        client = self.connect(b"/v1/events?history=5", headers=(b"Last-Event-ID: 4",))
        self.assertEqual(self.ids(client), [5])
        self.assertEqual(self.ids(self.connect(headers=(b"Last-Event-ID: 5",))), [])

    def test_resume_past_what_is_kept_says_so(self) -> None:
        """A Last-Event-ID older than the kept events: the client is told how many it lost."""
        bus = EventBus(cast(IReactorTime, self.clock), keep=2)
        streams = EventStreams(bus, cast(IReactorTime, self.clock))
        for n in range(5):
            bus.publish("load", n=n)
        client = self.connect(headers=(b"Last-Event-ID: 1",), streams=streams)
        self.assertEqual(frames(client)[:2], [f"retry: {RETRY_MS}", ": 2 events dropped"])
        self.assertEqual(self.ids(client), [4, 5])

    def test_junk_last_event_id_replays_nothing(self) -> None:
        """A Last-Event-ID that is not a number replays nothing."""
        self.publish(2)
        client = self.connect(b"/v1/events?history=2", headers=(b"Last-Event-ID: abc",))
        self.assertEqual(frames(client), [f"retry: {RETRY_MS}"])


class LiveTests(StreamCase):
    """Events written as they are published."""

    def test_event_wire_format(self) -> None:
        """Each event is an id:, event: and data: block; data is the event's JSON on one line."""
        client = self.connect()
        event = self.bus.publish("evict", consumer="comfyui", target="mvoice", freed_mib=13000)
        [_, frame] = frames(client)
        self.assertEqual(frame.split("\n")[:2], ["id: 1", "event: evict"])
        self.assertEqual(parse_frame(frame), {"id": 1, "event": "evict", "data": event.to_json()})
        self.assertEqual(encode(event).decode(), frame + "\n\n")
        self.assertNotIn("\n", frame.split("\n")[2])

    def test_events_written_as_published(self) -> None:
        """Each published event reaches the client at once, in order."""
        client = self.connect()
        self.bus.publish("load", consumer="mvoice")
        self.assertEqual(self.ids(client), [1])
        self.bus.publish("rejected", consumer="mvoice", reason="queue_full")
        self.assertEqual(self.ids(client), [1, 2])
        self.assertEqual(
            [parse_frame(f)["event"] for f in frames(client)[1:]], ["load", "rejected"]
        )

    def test_history_then_live(self) -> None:
        """A stream started with history goes on with live events, none repeated or missed."""
        self.publish(3)
        client = self.connect(b"/v1/events?history=1")
        self.publish(2)
        self.assertEqual(self.ids(client), [3, 4, 5])

    def test_every_client_gets_every_event(self) -> None:
        """Two clients each get every event."""
        first, second = self.connect(), self.connect()
        self.publish(2)
        self.assertEqual((self.ids(first), self.ids(second)), ([1, 2], [1, 2]))
        self.assertEqual(self.streams.clients, 2)


class BackpressureTests(StreamCase):
    """A transport that says it is full."""

    def test_paused_events_buffered_then_written(self) -> None:
        """While paused nothing is written; on resume the buffered events follow in order."""
        client = self.connect()
        transport_says("pause", client)
        before = client.transport.value()
        self.publish(3)
        self.assertEqual(client.transport.value(), before)
        transport_says("resume", client)
        self.assertEqual(self.ids(client), [1, 2, 3])
        self.assertEqual(self.streams.dropped, 0)
        self.assertFalse(any(f.startswith(":") for f in frames(client)))

    def test_full_buffer_drops_oldest_and_says_so(self) -> None:
        """Past ``buffer`` events the oldest are dropped, counted, and announced on resume."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=2)
        client = self.connect(streams=streams)
        transport_says("pause", client)
        self.publish(5)
        self.assertEqual(streams.dropped, 3)
        transport_says("resume", client)
        self.assertEqual(
            frames(client)[1:], [": 3 events dropped", *map(_frame, self.bus.recent(3))]
        )
        self.bus.publish("load")
        self.assertEqual(self.ids(client), [4, 5, 6])
        self.assertEqual(sum(f.startswith(": ") for f in frames(client)), 1)
        self.assertEqual(streams.dropped, 3)

    def test_only_the_slow_client_loses(self) -> None:
        """A slow client's drops touch neither a fast client nor its events."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=1)
        slow, fast = self.connect(streams=streams), self.connect(streams=streams)
        transport_says("pause", slow)
        self.publish(3)
        self.assertEqual(self.ids(fast), [1, 2, 3])
        self.assertEqual(streams.dropped, 2)
        transport_says("resume", slow)
        self.assertEqual(frames(slow)[1:], [": 2 events dropped", _frame(self.bus.recent(2)[0])])


def _frame(event: Event) -> str:
    return encode(event).decode()[:-2]


class KeepAliveTests(StreamCase):
    """The keep-alive comment."""

    def test_keepalive_every_period(self) -> None:
        """A comment is written every KEEPALIVE_S, not before."""
        client = self.connect()
        self.clock.advance(KEEPALIVE_S - 0.001)
        self.assertEqual(frames(client), [f"retry: {RETRY_MS}"])
        self.clock.advance(0.001)
        self.assertEqual(frames(client)[1:], [": keep-alive"])
        self.clock.advance(KEEPALIVE_S)
        self.assertEqual(frames(client)[1:], [": keep-alive", ": keep-alive"])

    def test_no_keepalive_while_paused(self) -> None:
        """A paused stream writes no keep-alive, but keeps its timer for after it resumes."""
        client = self.connect()
        transport_says("pause", client)
        self.clock.advance(KEEPALIVE_S)
        self.assertEqual(frames(client), [f"retry: {RETRY_MS}"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        transport_says("resume", client)
        self.clock.advance(KEEPALIVE_S)
        self.assertEqual(frames(client)[1:], [": keep-alive"])


class ClosingTests(StreamCase):
    """A client that goes."""

    def test_client_gone_unsubscribes_and_cancels_timer(self) -> None:
        """When the client leaves: clients back to 0, no timer left, nothing more written."""
        client = self.connect()
        [request] = self.requests
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        client.disconnect()
        self.assertEqual(self.streams.clients, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        written: list[bytes] = []
        self.patch(request, "write", written.append)
        self.publish(2)
        self.clock.advance(KEEPALIVE_S * 3)
        self.assertEqual(written, [])

    def test_one_client_gone_others_stay(self) -> None:
        """One client leaving leaves the other's stream and timer alone."""
        gone, staying = self.connect(), self.connect()
        gone.disconnect()
        self.assertEqual(self.streams.clients, 1)
        self.publish(1)
        self.assertEqual(self.ids(staying), [1])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        staying.disconnect()
        self.assertEqual((self.streams.clients, self.clock.getDelayedCalls()), (0, []))

    def test_gone_while_paused(self) -> None:
        """A paused client that leaves with events buffered is released all the same."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=2)
        client = self.connect(streams=streams)
        transport_says("pause", client)
        self.publish(3)
        client.disconnect()
        self.assertEqual((streams.clients, self.clock.getDelayedCalls()), (0, []))
        self.assertEqual(streams.dropped, 1)

    def test_end_all_finishes_every_stream(self) -> None:
        """end_all ends each open stream from the daemon's side and releases it."""
        first, second = self.connect(), self.connect()
        self.streams.end_all()
        self.assertEqual((self.streams.clients, self.clock.getDelayedCalls()), (0, []))
        self.assertTrue(all(request.finished for request in self.requests))
        self.publish(1)
        self.assertEqual((self.ids(first), self.ids(second)), ([], []))
