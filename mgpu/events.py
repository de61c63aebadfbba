# -*- test-case-name: tests.test_events -*-
"""What happened in the daemon, as events: loads, unloads, evictions, health, refusals.

The scheduler, the room maker, the registry and the facade publish; the
``/v1/events`` stream, the metrics and the dashboard listen. Publishing is a
plain call on the reactor thread, made from the eviction and load paths:
listeners must not block, and what costs more than a few calls (the streams'
writes to their clients) belongs on a later turn. A listener that raises is
logged and kept, so one bad listener cannot break scheduling.
The bus keeps the latest events so a new stream can start with some history.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Final

from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mgpu.config import frozen_mapping

log = Logger()

#: The event kinds of SPEC section 8.
EVENT_KINDS: Final = ("load", "unload", "evict", "health", "rejected", "timeout")

Listener = Callable[["Event"], object]

#: Every event's own fields; the data of an event may not use these names.
_RESERVED: Final = frozenset({"id", "kind", "at"})


def iso_seconds(at: float) -> str:
    """A UTC timestamp with milliseconds, as events and the dashboard show it."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@frozen
class Event:
    """One thing that happened; ``data`` holds JSON values only."""

    id: int
    kind: str
    at: float
    data: Mapping[str, object] = field(converter=frozen_mapping)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "at": iso_seconds(self.at), **self.data}


class EventBus:
    """Numbers events, keeps the latest ``keep`` of them, and hands each to every listener."""

    def __init__(self, clock: IReactorTime, keep: int = 200) -> None:
        self._clock = clock
        self._recent: deque[Event] = deque(maxlen=keep)
        self._listeners: list[Listener] = []
        self._last_id = 0

    def publish(self, kind: str, **data: object) -> Event:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        if _RESERVED & data.keys():
            raise ValueError(f"event fields may not be named {sorted(_RESERVED & data.keys())}")
        self._last_id += 1
        event = Event(self._last_id, kind, self._clock.seconds(), data)
        self._recent.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.failure("an event listener failed on {kind}", kind=kind)
        return event

    @property
    def last_id(self) -> int:
        """The id of the latest event published, 0 before the first."""
        return self._last_id

    def recent(self, after: int = 0) -> list[Event]:
        """The kept events with an id above ``after``, oldest first."""
        return [e for e in self._recent if e.id > after]

    def lost_after(self, after: int) -> int:
        """How many events after id ``after`` are no longer kept."""
        oldest = self._recent[0].id if self._recent else self._last_id + 1
        return max(0, oldest - after - 1)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every event from now on; returns the way to stop."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe
