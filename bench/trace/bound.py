"""A lower bound on the swaps of any scheduler that starts every request within a window.

Belady's rule and ``exhaustive`` answer what serving in arrival order costs;
a scheduler that reorders can do better. How much better at most, if every
request must start within ``window_s`` of its arrival (the benchmark's wait
bound, ``max_skip_s`` plus one job)? This module answers with a relaxation
that is generous everywhere: the future is known, loads, unloads and work
take no time, any number of requests run at once, and the only rules left
are the card (consumers may be resident together when their sizes and one
cushion fit) and the window (a request is served when its consumer is
resident at some instant of ``[arrival, arrival + window_s]``). A real
schedule that keeps every wait within the window is one of these schedules,
so it needs at least as many swaps (loads + unloads, less each consumer's
first load, as the benchmark counts them). Coexistence pairs and pinned
consumers are ignored: fewer rules can only lower the bound.

The relaxation is solved exactly by dynamic programming over (resident set,
consumers loaded before, oldest waiting request of each consumer):

- The resident set changes only at deadlines. A change made earlier can wait
  for the next deadline of a waiting request: requests arriving meanwhile are
  served by the old set or at the change, whose time is within their windows.
- At a deadline, a chain of sets may pass at that one instant, each serving
  its consumers' waiting requests. A set in the chain that serves no request
  due then can be skipped without raising the cost (loads and unloads obey
  the triangle inequality, and skipping loads nobody for the first time), so
  chains of at most (due consumers + 1) sets are enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bench.trace.belady import Rules

#: (resident set, ever loaded set, oldest waiting arrival per consumer or None)
_State = tuple[int, int, tuple[float | None, ...]]


def reorder_bound(arrivals: Sequence[tuple[float, str]], rules: Rules, window_s: float) -> int:
    """The fewest swaps any schedule needs that starts each request within ``window_s``.

    ``arrivals``: (time, consumer), in the same unit as ``window_s``.
    """
    names = sorted({name for _, name in arrivals})
    index = {name: i for i, name in enumerate(names)}
    card = rules.card
    room = card.total_mib - card.external_mib - card.cushion_mib
    sizes = [rules.sizes_mib[n] for n in names]
    sets = [
        m
        for m in range(1 << len(names))
        if sum(size for i, size in enumerate(sizes) if m >> i & 1) <= room
    ]
    states: dict[_State, int] = {(0, 0, (None,) * len(names)): 0}
    for at, name in sorted(arrivals):
        states = _serve_due(states, sets, window_s, before=at)
        states = _arrive(states, index[name], at)
    return min(_serve_due(states, sets, window_s, before=math.inf).values())


def _arrive(states: dict[_State, int], i: int, at: float) -> dict[_State, int]:
    """A request of consumer ``i``: served at once if resident, else it waits."""
    out: dict[_State, int] = {}
    for (resident, loaded, waiting), cost in states.items():
        if not resident >> i & 1 and waiting[i] is None:
            waiting = (*waiting[:i], at, *waiting[i + 1 :])
        _keep(out, (resident, loaded, waiting), cost)
    return out


def _serve_due(
    states: dict[_State, int], sets: Sequence[int], window_s: float, before: float
) -> dict[_State, int]:
    """Take every deadline earlier than ``before``, in order, through the cheapest chains."""
    while True:
        deadlines = [
            t + window_s
            for _, _, waiting in states
            for t in waiting
            if t is not None and t + window_s < before
        ]
        if not deadlines:
            return states
        deadline = min(deadlines)
        out: dict[_State, int] = {}
        for state, cost in states.items():
            due = _due(state[2], window_s, deadline)
            if not due:
                _keep(out, state, cost)
                continue
            frontier = {state: cost}
            for _ in range(len(due) + 1):
                frontier = _step(frontier, sets)
                for reached, c in frontier.items():
                    if not _due(reached[2], window_s, deadline):
                        _keep(out, reached, c)
        states = out


def _step(frontier: dict[_State, int], sets: Sequence[int]) -> dict[_State, int]:
    """Every state one change of resident set away, with what the change costs."""
    out: dict[_State, int] = {}
    for (resident, loaded, waiting), cost in frontier.items():
        for new in sets:
            if new == resident:
                continue
            reloads = bin(new & ~resident & loaded).count("1")
            unloads = bin(resident & ~new).count("1")
            served = tuple(None if new >> i & 1 else t for i, t in enumerate(waiting))
            _keep(out, (new, loaded | new, served), cost + reloads + unloads)
    return out


def _due(waiting: tuple[float | None, ...], window_s: float, deadline: float) -> list[int]:
    return [i for i, t in enumerate(waiting) if t is not None and t + window_s <= deadline]


def _keep(states: dict[_State, int], state: _State, cost: int) -> None:
    if cost < states.get(state, math.inf):
        states[state] = cost
