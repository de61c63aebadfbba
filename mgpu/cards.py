# -*- test-case-name: tests.test_cards -*-
"""Per-card leases for several cards (SPEC section 9.5): who may start now.

A consumer may span several cards (vLLM on ``[0, 1]``); each card has one
lease and one queue order.  The policy, in two rules:

- **All or nothing.**  A request is granted every card it needs in one step,
  or none: nobody ever holds one card while waiting for another, so no cycle
  of waiting holders, hence no deadlock.  (Taking "in index order" is then
  moot: there is no partial holding to order.)
- **Strict order per card.**  Waiting requests rank by ``(order_key,
  arrival)`` (smaller first, as the single-card queue orders them).  A
  request is granted exactly when all its cards are free *and* it ranks
  first among the waiting requests on each of its cards.  So a request that
  cannot start because one of its cards is busy reserves its other cards:
  later-ranked requests needing them wait, while requests on cards nobody
  ahead of them waits for run freely, in parallel.

The bound this gives: while a request ``W`` waits, every request granted a
card that ``W`` needs ranks ahead of ``W``.  Nobody ranking after ``W``
ever overtakes it, whenever it arrived; with finitely many arrivals ``W``
is granted after at most as many grants on its cards as there are requests
ranking ahead of it on them.  With one card this is exactly the single
queue: the first-ranked waiting request starts when the card is free.

The price: a card reserved for a multi-card request stays idle until the
request's other cards free up, rather than being lent to a later request
whose run time nobody knows (which could delay the reserved one without
bound).

Pure logic: no reactor and no I/O; each change recomputes the grants, and
``grants()`` hands out the ones made since it was last called.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Hashable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from attrs import define, field, frozen


class Ordered(Protocol):
    """An order key: anything comparable with ``<`` (numbers, tuples of them)."""

    def __lt__(self, other: Any, /) -> bool: ...


R = TypeVar("R", bound=Hashable)


def _device_tuple(devices: Iterable[int]) -> tuple[int, ...]:
    """The cards, each once, in index order."""
    return tuple(sorted(set(devices)))


@frozen
class CardRequest(Generic[R]):
    """One request for a set of cards, and where it ranks."""

    rid: R
    cards: frozenset[int]
    order_key: Ordered
    arrival: int  # ties of order_key go to the earlier arrival

    def rank(self) -> tuple[Ordered, int]:
        """Its place among waiting requests: smaller first."""
        return (self.order_key, self.arrival)


@define
class CardLeases(Generic[R]):
    """All-or-nothing leases over a fixed set of cards, in strict order per card."""

    devices: tuple[int, ...] = field(converter=_device_tuple)
    _waiting: list[CardRequest[R]] = field(factory=list, init=False)  # kept in rank order
    _known: dict[R, CardRequest[R]] = field(factory=dict, init=False)  # waiting or holding
    _holders: dict[int, R] = field(factory=dict, init=False)
    _granted: list[R] = field(factory=list, init=False)  # not yet handed out by grants()
    _arrivals: itertools.count[int] = field(factory=itertools.count, init=False)

    def request(self, rid: R, cards: frozenset[int], order_key: Ordered) -> None:
        """Queue ``rid`` for all of ``cards``; it is granted when it can be."""
        if rid in self._known:
            raise ValueError(f"request {rid!r} is already known")
        if not cards or not cards <= set(self.devices):
            raise ValueError(f"cards {sorted(cards)} not a non-empty subset of {self.devices}")
        request = CardRequest(rid, frozenset(cards), order_key, next(self._arrivals))
        self._known[rid] = request
        bisect.insort(self._waiting, request, key=CardRequest.rank)
        self._settle()

    def cancel(self, rid: R) -> None:
        """Forget ``rid``, waiting or (a cancel racing its grant) holding; unknown is a no-op."""
        request = self._known.pop(rid, None)
        if request is None:
            return
        if self._holds(request):
            self._free(request)
            if rid in self._granted:
                self._granted.remove(rid)
        else:
            self._waiting = [r for r in self._waiting if r is not request]
        self._settle()

    def release(self, rid: R) -> None:
        """``rid``'s job ended: all its cards are free again."""
        request = self._known.get(rid)
        if request is None or not self._holds(request):
            raise KeyError(f"request {rid!r} holds no cards")
        self.cancel(rid)

    def grants(self) -> list[R]:
        """The requests granted since the last call, in the order granted: they may start."""
        granted, self._granted = self._granted, []
        return granted

    def holder(self, card: int) -> R | None:
        """Who holds ``card`` now, if anyone."""
        return self._holders.get(card)

    def waiting(self, card: int) -> list[R]:
        """The requests waiting for ``card``, first-ranked first."""
        return [r.rid for r in self._waiting if card in r.cards]

    def _settle(self) -> None:
        """Grant every waiting request whose cards are free and ranks first on each of them.

        One pass in rank order: a card is blocked once it is held or needed by a
        request ahead that stays waiting (the reservation).
        """
        blocked = set(self._holders)
        still: list[CardRequest[R]] = []
        for request in self._waiting:
            if blocked.isdisjoint(request.cards):
                self._take(request)
            else:
                still.append(request)
            blocked |= request.cards
        self._waiting = still

    def _holds(self, request: CardRequest[R]) -> bool:
        """Whether ``request`` was granted (all or nothing: holding one card is holding all)."""
        return any(self._holders.get(card) == request.rid for card in request.cards)

    def _take(self, request: CardRequest[R]) -> None:
        for card in request.cards:
            self._holders[card] = request.rid
        self._granted.append(request.rid)

    def _free(self, request: CardRequest[R]) -> None:
        for card in request.cards:
            del self._holders[card]
