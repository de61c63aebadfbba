"""Tests for mgpu.events: the event bus (numbering, history, listeners, what publishing costs)
and the event's JSON."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

import mgpu
from mgpu.events import EVENT_KINDS, Event, EventBus, iso_seconds
from mgpu.sse import EventStreams
from tests.test_facade import Client, _Front


class EventBusTests(SynchronousTestCase):
    """EventBus.publish, recent and subscribe."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_000_000.25)
        self.bus = EventBus(cast(IReactorTime, self.clock))
        self.seen: list[Event] = []
        self.bus.subscribe(self.seen.append)

    def test_publish_numbers_and_stamps(self) -> None:
        """Events are numbered 1, 2, 3 in publishing order, stamped with the clock, data kept."""
        first = self.bus.publish("load", consumer="mvoice", reason="admin")
        self.clock.advance(2)
        second = self.bus.publish("unload", consumer="mvoice", reason="admin")
        third = self.bus.publish("health", consumer="ollama", healthy=False, error="refused")
        self.assertEqual([e.id for e in (first, second, third)], [1, 2, 3])
        self.assertEqual([e.kind for e in self.seen], ["load", "unload", "health"])
        self.assertEqual((first.at, second.at), (1_795_000_000.25, 1_795_000_002.25))
        self.assertEqual(
            dict(third.data), {"consumer": "ollama", "healthy": False, "error": "refused"}
        )
        self.assertEqual(self.seen, [first, second, third])

    def test_every_spec_kind_accepted(self) -> None:
        """Each kind of SPEC section 8 can be published."""
        self.assertEqual(
            set(EVENT_KINDS), {"load", "unload", "evict", "health", "rejected", "timeout"}
        )
        for kind in EVENT_KINDS:
            self.bus.publish(kind)
        self.assertEqual([e.kind for e in self.seen], list(EVENT_KINDS))

    def test_unknown_kind_refused(self) -> None:
        """An unknown kind raises ValueError, uses no number and reaches no listener."""
        with self.assertRaises(ValueError) as caught:
            self.bus.publish("reloaded", consumer="mvoice")
        self.assertIn("reloaded", str(caught.exception))
        self.assertEqual(self.seen, [])
        self.assertEqual(self.bus.recent(), [])
        self.assertEqual(self.bus.publish("load").id, 1)

    def test_reserved_field_names_refused(self) -> None:
        """Data may not shadow an event's own id or at (``kind`` is publish's own argument)."""
        for name in ("id", "at"):
            with self.assertRaises(ValueError):
                self.bus.publish("load", **{name: 1})
        self.assertEqual(self.bus.recent(), [])

    def test_lost_after(self) -> None:
        """lost_after counts the events after an id that are no longer kept."""
        bus = EventBus(self.clock, keep=3)
        for _ in range(5):
            bus.publish("load")
        self.assertEqual([bus.lost_after(n) for n in (0, 1, 2, 5)], [2, 1, 0, 0])

    def test_last_id(self) -> None:
        """last_id is the latest event's id, 0 before the first, however few are kept."""
        bus = EventBus(cast(IReactorTime, self.clock), keep=2)
        self.assertEqual(bus.last_id, 0)
        for _ in range(5):
            bus.publish("load")
        self.assertEqual(bus.last_id, 5)

    def test_recent_after(self) -> None:
        """recent(after) holds the kept events with a higher id, oldest first."""
        events = [self.bus.publish("load", n=n) for n in range(4)]
        self.assertEqual(self.bus.recent(), events)
        self.assertEqual(self.bus.recent(after=2), events[2:])
        self.assertEqual(self.bus.recent(after=4), [])

    def test_keep_limit(self) -> None:
        """Only the latest ``keep`` events are kept; numbering goes on regardless."""
        bus = EventBus(cast(IReactorTime, self.clock), keep=3)
        for _ in range(5):
            bus.publish("evict")
        self.assertEqual([e.id for e in bus.recent()], [3, 4, 5])
        self.assertEqual(bus.publish("evict").id, 6)
        self.assertEqual([e.id for e in bus.recent()], [4, 5, 6])

    def test_raising_listener_logged_and_kept(self) -> None:
        """A listener that raises is logged; the others still get the event; it gets the next."""
        calls: list[int] = []

        def broken(event: Event) -> None:
            calls.append(event.id)
            raise ZeroDivisionError("listener bug")

        bus = EventBus(cast(IReactorTime, self.clock))
        bus.subscribe(broken)
        after: list[Event] = []
        bus.subscribe(after.append)
        first = bus.publish("timeout", consumer="ollama")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(after, [first])
        self.assertEqual(bus.recent(), [first])
        bus.publish("timeout", consumer="ollama")
        self.assertEqual(calls, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(after), 2)

    def test_unsubscribe(self) -> None:
        """After unsubscribing a listener gets nothing more; unsubscribing twice is harmless."""
        mine: list[Event] = []
        unsubscribe = self.bus.subscribe(mine.append)
        self.bus.publish("load")
        unsubscribe()
        unsubscribe()
        self.bus.publish("load")
        self.assertEqual([e.id for e in mine], [1])
        self.assertEqual([e.id for e in self.seen], [1, 2])

    def test_unsubscribe_during_publish(self) -> None:
        """A listener that unsubscribes another while an event is handed out spares the rest of
        that round: every listener subscribed at publish time gets it, and nothing after."""
        later: list[Event] = []
        stops: list[Callable[[], None]] = []
        bus = EventBus(cast(IReactorTime, self.clock))
        bus.subscribe(lambda event: stops[0]())
        stops.append(bus.subscribe(later.append))
        bus.publish("load")
        bus.publish("load")
        self.assertEqual([e.id for e in later], [1])


_MGPU = str(Path(mgpu.__file__).parent)


class PublishCostTests(SynchronousTestCase):
    """What publishing costs its caller (the eviction and load paths) with ``/v1/events``
    clients following."""

    def cost(self, clients: int) -> tuple[int, Counter[str], int]:
        """Publish one event with ``clients`` streams open: the writes to them done inside
        publish, the calls into the daemon's own code, and the timers it scheduled."""
        clock = Clock()
        bus = EventBus(cast(IReactorTime, clock))
        streams = EventStreams(bus, cast(IReactorTime, clock), delay_s=0)
        writes: list[bytes] = []

        def follow(request: Request) -> None:
            streams.render(request)
            self.patch(request, "write", writes.append)

        for _ in range(clients):
            Client(_Front(follow)).send(b"GET", b"/v1/events")
        self.assertEqual(streams.clients, clients)
        timers = len(clock.getDelayedCalls())
        calls: Counter[str] = Counter()

        def profile(frame: FrameType, event: str, _: object) -> None:
            code = frame.f_code
            if event == "call" and code.co_filename.startswith(_MGPU):
                calls[f"{Path(code.co_filename).name}:{code.co_name}"] += 1

        before = sys.getprofile()
        sys.setprofile(profile)
        try:
            bus.publish("evict", consumer="comfyui", target="mvoice", freed_mib=13000)
        finally:
            sys.setprofile(before)
        published, scheduled = len(writes), len(clock.getDelayedCalls()) - timers
        clock.advance(0)
        self.assertEqual(len(writes), published + clients)  # all written on the next turn
        return published, calls, scheduled

    def test_same_cost_for_one_client_or_a_thousand(self) -> None:
        """Publishing writes to no client, schedules one call, and makes the same calls with
        1 client as with 1,000: the fan-out is the next turn's work, not the publisher's."""
        one, thousand = self.cost(1), self.cost(1000)
        self.assertEqual((one[0], thousand[0]), (0, 0))
        self.assertEqual((one[2], thousand[2]), (1, 1))
        self.assertEqual(one[1], thousand[1])
        self.assertLessEqual(sum(one[1].values()), 10, one[1])


class EventJsonTests(SynchronousTestCase):
    """Event.to_json and iso_seconds."""

    def test_to_json(self) -> None:
        """to_json is id, kind, a UTC millisecond timestamp and the data's fields."""
        event = Event(7, "evict", 1_795_000_000.5, {"consumer": "comfyui", "freed_mib": 13000})
        self.assertEqual(
            event.to_json(),
            {"id": 7, "kind": "evict", "at": "2026-11-18T11:06:40.500Z",
             "consumer": "comfyui", "freed_mib": 13000},
        )  # fmt: skip

    def test_data_is_a_frozen_copy(self) -> None:
        """The event keeps a read-only copy: changing the dict given later changes nothing."""
        given: dict[str, object] = {"consumer": "mvoice"}
        event = Event(1, "load", 0.0, given)
        given["consumer"] = "ollama"
        self.assertEqual(event.data["consumer"], "mvoice")
        with self.assertRaises(TypeError):
            event.data["consumer"] = "x"  # type: ignore[index]

    def test_iso_seconds(self) -> None:
        """iso_seconds is UTC with exactly three decimals and a Z."""
        self.assertEqual(iso_seconds(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso_seconds(0.0015), "1970-01-01T00:00:00.001Z")
        self.assertEqual(iso_seconds(86399.999), "1970-01-01T23:59:59.999Z")
