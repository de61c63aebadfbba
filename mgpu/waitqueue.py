# -*- test-case-name: tests.test_waitqueue -*-
"""The requests waiting for the GPU, kept so that no decision reads them all.

Every rule of the dispatch (SPEC section 7) asks about the waiting request
that ranks first by some order: the highest effective priority, the oldest,
the oldest that needs no swap, the oldest overdue.  Requests of one
consumer, one priority and one kind arrive in order, and within such a
group the oldest is also the one of highest effective priority (aging only
adds levels with waiting).  So each rule gives the same answer over the
heads of the groups as over the whole queue, and the groups are few: one
per consumer, priority and kind.  Arrival appends to a group; leaving
(cancel, timeout) marks the request and drops it when it reaches its
group's head, or rebuilds a group that holds more gone requests than
waiting ones.  Arrival, departure and every decision cost O(groups), not
O(waiting).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the queue needs of a request: its group, and two fields it sets."""

    waiting: bool
    order: int  # its place in arrival order, across groups

    @property
    def group(self) -> Hashable: ...


Q = TypeVar("Q", bound=Queued)


class WaitQueue(Generic[Q]):
    """Waiting requests in arrival order per group; ``heads()`` is the oldest of each."""

    def __init__(self) -> None:
        self._groups: dict[Hashable, deque[Q]] = {}
        self._gone: dict[Hashable, int] = {}  # departed requests still inside a group
        self._count = 0
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def add(self, request: Q) -> None:
        """Queue ``request`` behind every earlier one of its group."""
        request.waiting = True
        request.order = next(self._arrivals)
        self._groups.setdefault(request.group, deque()).append(request)
        self._count += 1

    def remove(self, request: Q) -> bool:
        """Take ``request`` out of the queue (admitted, cancelled or timed out).

        True when it was a head: only then can a decision come out differently.
        """
        if not request.waiting:
            return False
        request.waiting = False
        self._count -= 1
        key = request.group
        group = self._groups[key]
        if group[0] is request:
            group.popleft()
            self._trim(key, group)
            return True
        gone = self._gone[key] = self._gone.get(key, 0) + 1
        if gone > len(group) - gone:  # mostly gone: rebuild, so memory follows the count
            self._groups[key] = deque(r for r in group if r.waiting)
            del self._gone[key]
        return False

    def heads(self) -> list[Q]:
        """The oldest waiting request of each group, in arrival order (as ties are broken)."""
        return sorted((group[0] for group in self._groups.values()), key=_order)

    def __iter__(self) -> Iterator[Q]:
        """Every waiting request (no order across groups)."""
        for group in self._groups.values():
            yield from (r for r in group if r.waiting)

    def _trim(self, key: Hashable, group: deque[Q]) -> None:
        """Drop departed requests from the group's front; forget an empty group."""
        while group and not group[0].waiting:
            group.popleft()
            self._gone[key] -= 1
        if not group:
            del self._groups[key]
            self._gone.pop(key, None)


def _order(request: Queued) -> int:
    return request.order
