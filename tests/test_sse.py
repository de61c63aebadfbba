"""Tests for mgpu.sse: ``GET /v1/events`` as a Server-Sent Events stream.

Each client is a real ``HTTPChannel`` over a ``StringTransport``
(``tests.test_facade.Client``); backpressure is exercised as the transport
would do it, by calling ``pauseProducing``/``resumeProducing`` on the producer
registered with it (the channel, which passes them on to the request's);
time is a ``Clock``. Published events reach the clients on the reactor's next
turn: ``clock.advance(0)`` runs that turn and any it schedules, ``one_turn``
runs one turn only, as the reactor would.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

import mgpu.sse
from mgpu.events import Event, EventBus
from mgpu.sse import CLIENT_BUFFER, DELIVERY_DELAY_S, KEEPALIVE_S, RETRY_MS, EventStreams, encode
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


def one_turn(clock: Clock) -> None:
    """Run the calls due now, but not those they schedule: one turn of a real reactor, where
    ``Clock.advance(0)`` would also run every zero-delay call scheduled on the way."""
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


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
        self.streams = EventStreams(self.bus, cast(IReactorTime, self.clock), delay_s=0)
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

    def deliver(self, count: int, kind: str = "load") -> list[Event]:
        """Publish ``count`` events and let the reactor turn, so the clients have them."""
        events = self.publish(count, kind)
        self.clock.advance(0)
        return events

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
        streams = EventStreams(bus, cast(IReactorTime, self.clock), delay_s=0)
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
    """Events written as they are published, on the reactor's next turn."""

    def test_event_wire_format(self) -> None:
        """Each event is an id:, event: and data: block; data is the event's JSON on one line."""
        client = self.connect()
        event = self.bus.publish("evict", consumer="comfyui", target="mvoice", freed_mib=13000)
        self.clock.advance(0)
        [_, frame] = frames(client)
        self.assertEqual(frame.split("\n")[:2], ["id: 1", "event: evict"])
        self.assertEqual(parse_frame(frame), {"id": 1, "event": "evict", "data": event.to_json()})
        self.assertEqual(encode(event).decode(), frame + "\n\n")
        self.assertNotIn("\n", frame.split("\n")[2])

    def test_events_written_on_the_next_turn(self) -> None:
        """Each published event reaches the client on the next turn, in order."""
        client = self.connect()
        self.bus.publish("load", consumer="mvoice")
        self.assertEqual(self.ids(client), [])
        self.clock.advance(0)
        self.assertEqual(self.ids(client), [1])
        self.bus.publish("rejected", consumer="mvoice", reason="queue_full")
        self.clock.advance(0)
        self.assertEqual(self.ids(client), [1, 2])
        self.assertEqual(
            [parse_frame(f)["event"] for f in frames(client)[1:]], ["load", "rejected"]
        )

    def test_history_then_live(self) -> None:
        """A stream started with history goes on with live events, none repeated or missed."""
        self.publish(3)
        client = self.connect(b"/v1/events?history=1")
        self.deliver(2)
        self.assertEqual(self.ids(client), [3, 4, 5])

    def test_every_client_gets_every_event(self) -> None:
        """Two clients each get every event."""
        first, second = self.connect(), self.connect()
        self.deliver(2)
        self.assertEqual((self.ids(first), self.ids(second)), ([1, 2], [1, 2]))
        self.assertEqual(self.streams.clients, 2)


class OffThePublisherTests(StreamCase):
    """Publishing queues; the reactor's next turn writes."""

    def test_publish_writes_nothing_until_the_clock_turns(self) -> None:
        """Publishing writes to no client and schedules one call for the whole turn's events;
        after ``advance(0)`` every client has every event, in order."""
        clients = [self.connect() for _ in range(3)]
        before = [client.transport.value() for client in clients]
        timers = len(self.clock.getDelayedCalls())
        self.publish(3)
        self.assertEqual([client.transport.value() for client in clients], before)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers + 1)
        self.clock.advance(0)
        self.assertEqual([self.ids(client) for client in clients], [[1, 2, 3]] * 3)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)

    def test_encoded_once_written_once_per_client(self) -> None:
        """A turn's events are encoded once each, however many clients, and each client gets
        them in one write."""
        encoded: list[int] = []

        def counting(event: Event) -> bytes:
            encoded.append(event.id)
            return encode(event)

        self.patch(mgpu.sse, "encode", counting)
        clients = [self.connect() for _ in range(4)]
        writes: list[Request] = []
        for request in self.requests:
            self.patch(request, "write", _counted(request, writes))
        self.publish(3)
        self.assertEqual((encoded, writes), ([], []))
        self.clock.advance(0)
        self.assertEqual(encoded, [1, 2, 3])
        self.assertEqual(sorted(map(id, writes)), sorted(map(id, self.requests)))
        self.assertEqual([self.ids(client) for client in clients], [[1, 2, 3]] * 4)

    def test_events_of_a_burst_share_one_write(self) -> None:
        """By default, events published within DELIVERY_DELAY_S of the first are written
        together: nothing before the delay, then one write per client with all of them."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock))
        clients = [self.connect(streams=streams) for _ in range(3)]
        writes: list[Request] = []
        for request in self.requests[-3:]:
            self.patch(request, "write", _counted(request, writes))
        self.publish(1)
        self.clock.advance(DELIVERY_DELAY_S / 2)
        self.publish(1)
        self.assertEqual(writes, [])
        self.clock.advance(DELIVERY_DELAY_S / 2)
        self.assertEqual(len(writes), 3)
        self.assertEqual([len(self.ids(client)) for client in clients], [2, 2, 2])

    def test_more_clients_gather_longer(self) -> None:
        """Past ``spread`` clients, events gather one more delay per ``spread`` clients, so
        the writes a second stay the same however many clients follow."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), spread=2)
        clients = [self.connect(streams=streams) for _ in range(5)]  # three spreads
        self.assertEqual(streams.gathering_s, 3 * DELIVERY_DELAY_S)
        self.publish(1)
        self.clock.advance(2.9 * DELIVERY_DELAY_S)
        self.assertEqual([self.ids(client) for client in clients], [[]] * 5)
        self.clock.advance(0.1 * DELIVERY_DELAY_S)
        self.assertEqual([self.ids(client) for client in clients], [[1]] * 5)
        clients[0].disconnect()
        self.assertEqual(streams.gathering_s, 2 * DELIVERY_DELAY_S)

    def test_no_clients_no_timer(self) -> None:
        """With no client connected, publishing schedules nothing."""
        self.publish(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_batches_across_turns(self) -> None:
        """With more clients than ``per_turn``, a turn writes to ``per_turn`` of them and the
        next turn goes on; an event published meanwhile follows on the same terms, in order."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), per_turn=2, delay_s=0)
        clients = [self.connect(streams=streams) for _ in range(5)]
        self.publish(2)
        one_turn(self.clock)
        self.assertEqual([self.ids(c) for c in clients], [[1, 2]] * 2 + [[]] * 3)
        self.bus.publish("unload", consumer="mvoice")
        one_turn(self.clock)
        self.assertEqual([self.ids(c) for c in clients], [[1, 2]] * 4 + [[]])
        one_turn(self.clock)  # the last client of the first batch, then the first of the next
        self.assertEqual([self.ids(c) for c in clients], [[1, 2, 3]] + [[1, 2]] * 4)
        self.assertEqual(len(self.clock.getDelayedCalls()), 5 + 1)  # keep-alives + next turn
        self.clock.advance(0)
        self.assertEqual([self.ids(c) for c in clients], [[1, 2, 3]] * 5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 5)

    def test_failing_client_spares_the_others(self) -> None:
        """A client whose write raises is logged; the others still get the turn's events."""
        broken, fine = self.connect(), self.connect()
        self.patch(self.requests[0], "write", _raise)
        self.deliver(1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual((self.ids(broken), self.ids(fine)), ([], [1]))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # the keep-alives only

    def test_event_that_cannot_be_encoded_skipped(self) -> None:
        """An event whose data is not JSON is logged and left out; the rest go on, in order."""
        client = self.connect()
        self.bus.publish("load", consumer="mvoice")
        self.bus.publish("load", consumer=object())
        self.bus.publish("load", consumer="ollama")
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(self.ids(client), [1, 3])
        self.deliver(1)
        self.assertEqual(self.ids(client), [1, 3, 4])

    def test_client_gone_before_its_turn(self) -> None:
        """A client that leaves between the publishing and its turn is skipped."""
        gone, staying = self.connect(), self.connect()
        self.publish(1)
        gone.disconnect()
        self.clock.advance(0)
        self.assertEqual((self.ids(gone), self.ids(staying)), ([], [1]))


def _raise(data: bytes) -> None:
    raise ZeroDivisionError("transport bug")


def _counted(request: Request, writes: list[Request]) -> Any:
    """``request.write``, noting each call in ``writes``."""
    write = request.write

    def counted(data: bytes) -> None:
        writes.append(request)
        write(data)

    return counted


class ReplayTests(StreamCase):
    """Replay (Last-Event-ID, ?history) against events still waiting for their turn."""

    def test_last_event_id_while_events_wait(self) -> None:
        """A stream resumed while published events wait for their turn replays them at once
        and does not get them again from the live feed."""
        first = self.connect()
        self.publish(3)
        resumed = self.connect(headers=(b"Last-Event-ID: 1",))
        self.assertEqual(self.ids(resumed), [2, 3])
        self.clock.advance(0)
        self.assertEqual((self.ids(first), self.ids(resumed)), ([1, 2, 3], [2, 3]))
        self.deliver(1)
        self.assertEqual((self.ids(first), self.ids(resumed)), ([1, 2, 3, 4], [2, 3, 4]))

    def test_history_while_events_wait(self) -> None:
        """?history=N while published events wait for their turn: each event once."""
        self.connect()
        self.publish(2)
        client = self.connect(b"/v1/events?history=5")
        self.deliver(1)
        self.assertEqual(self.ids(client), [1, 2, 3])

    def test_new_stream_during_a_round(self) -> None:
        """A stream opened while a turn's events are still being written starts after them."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), per_turn=1, delay_s=0)
        early = [self.connect(streams=streams) for _ in range(2)]
        self.publish(1)
        one_turn(self.clock)
        late = self.connect(streams=streams)
        self.publish(1)
        self.clock.advance(0)
        self.assertEqual([self.ids(c) for c in (*early, late)], [[1, 2], [1, 2], [2]])


class BackpressureTests(StreamCase):
    """A transport that says it is full."""

    def test_paused_events_buffered_then_written(self) -> None:
        """While paused nothing is written; on resume the buffered events follow in order."""
        client = self.connect()
        transport_says("pause", client)
        before = client.transport.value()
        self.deliver(3)
        self.assertEqual(client.transport.value(), before)
        transport_says("resume", client)
        self.assertEqual(self.ids(client), [1, 2, 3])
        self.assertEqual(self.streams.dropped, 0)
        self.assertFalse(any(f.startswith(":") for f in frames(client)))

    def test_backlog_up_to_the_bound_kept(self) -> None:
        """A paused client may fall ``buffer`` events behind, over several turns, and stay."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=3, delay_s=0)
        client = self.connect(streams=streams)
        transport_says("pause", client)
        self.deliver(2)
        self.deliver(1)
        self.assertEqual((streams.clients, streams.dropped, streams.dropped_clients), (1, 0, 0))
        transport_says("resume", client)
        self.deliver(1)
        self.assertEqual(self.ids(client), [1, 2, 3, 4])

    def test_past_the_bound_dropped_and_closed(self) -> None:
        """Past ``buffer`` waiting events the client gets a last ``dropped`` event, with no id,
        saying how many it missed and why; its stream is ended and released, and counted."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=2, delay_s=0)
        client = self.connect(streams=streams)
        [request] = self.requests
        self.deliver(1)
        transport_says("pause", client)
        self.deliver(2)
        self.assertFalse(request.finished)
        self.clock.advance(5)
        self.deliver(1)
        self.assertTrue(request.finished)
        self.assertTrue(client.transport.value().endswith(b"0\r\n\r\n"))  # the last chunk
        *_, last = frames(client)
        self.assertEqual(last.split("\n")[0], "event: dropped")
        self.assertNotIn("id: ", last)
        self.assertEqual(
            json.loads(last.split("\n")[1].removeprefix("data: ")),
            {"kind": "dropped", "at": "2026-11-18T11:06:45.000Z", "missed": 3,
             "reason": "slow_reader", "last_id": 1},
        )  # fmt: skip
        self.assertEqual(self.ids(client), [1])
        self.assertEqual((streams.clients, streams.dropped, streams.dropped_clients), (0, 3, 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 0)
        written = client.transport.value()
        transport_says("resume", client)
        self.deliver(1)
        self.assertEqual(client.transport.value(), written)

    def test_one_turn_past_the_bound(self) -> None:
        """More events in one turn than a paused client may hold: dropped at once."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=2, delay_s=0)
        client = self.connect(streams=streams)
        transport_says("pause", client)
        self.deliver(3)
        self.assertEqual(frames(client)[-1].split("\n")[0], "event: dropped")
        self.assertEqual((streams.clients, streams.dropped, streams.dropped_clients), (0, 3, 1))

    def test_default_bound(self) -> None:
        """By default a paused client stays up to CLIENT_BUFFER events behind, not one more."""
        client = self.connect()
        transport_says("pause", client)
        for _ in range(CLIENT_BUFFER):
            self.deliver(1)
        self.assertEqual(self.streams.clients, 1)
        self.deliver(1)
        self.assertEqual(self.streams.clients, 0)
        self.assertEqual(self.streams.dropped, CLIENT_BUFFER + 1)
        self.assertIn(f'"missed":{CLIENT_BUFFER + 1}', frames(client)[-1])

    def test_only_the_slow_client_is_dropped(self) -> None:
        """A slow client's drop touches neither a fast client nor its events."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=1, delay_s=0)
        slow, fast = self.connect(streams=streams), self.connect(streams=streams)
        transport_says("pause", slow)
        self.deliver(3)
        self.assertEqual(self.ids(fast), [1, 2, 3])
        self.assertEqual(frames(slow)[-1].split("\n")[0], "event: dropped")
        self.assertEqual((streams.clients, streams.dropped), (1, 3))
        self.deliver(1)
        self.assertEqual(self.ids(fast), [1, 2, 3, 4])

    def test_reconnect_after_drop_replays(self) -> None:
        """Reconnecting with Last-Event-ID after a drop replays what the client missed, then
        the live feed: across both streams every event once, in order."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=2, delay_s=0)
        client = self.connect(streams=streams)
        self.deliver(2)
        transport_says("pause", client)
        self.deliver(3)
        got = self.ids(client)
        self.assertEqual(got, [1, 2])
        again = self.connect(headers=(b"Last-Event-ID: %d" % got[-1],), streams=streams)
        self.deliver(1)
        self.assertEqual(got + self.ids(again), [1, 2, 3, 4, 5, 6])
        self.assertEqual(streams.clients, 1)


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
        self.clock.advance(0)
        self.assertEqual(written, [])

    def test_one_client_gone_others_stay(self) -> None:
        """One client leaving leaves the other's stream and timer alone."""
        gone, staying = self.connect(), self.connect()
        gone.disconnect()
        self.assertEqual(self.streams.clients, 1)
        self.deliver(1)
        self.assertEqual(self.ids(staying), [1])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        staying.disconnect()
        self.assertEqual((self.streams.clients, self.clock.getDelayedCalls()), (0, []))

    def test_gone_while_paused(self) -> None:
        """A paused client that leaves with events buffered is released all the same."""
        streams = EventStreams(self.bus, cast(IReactorTime, self.clock), buffer=2, delay_s=0)
        client = self.connect(streams=streams)
        transport_says("pause", client)
        self.deliver(2)
        client.disconnect()
        self.assertEqual((streams.clients, self.clock.getDelayedCalls()), (0, []))
        self.assertEqual((streams.dropped, streams.dropped_clients), (0, 0))

    def test_end_all_finishes_every_stream(self) -> None:
        """end_all ends each open stream from the daemon's side and releases it."""
        first, second = self.connect(), self.connect()
        self.streams.end_all()
        self.assertEqual((self.streams.clients, self.clock.getDelayedCalls()), (0, []))
        self.assertTrue(all(request.finished for request in self.requests))
        self.deliver(1)
        self.assertEqual((self.ids(first), self.ids(second)), ([], []))
