"""The clairvoyant reference: how few loads and unloads arrival order allows.

Requests are served strictly in arrival order, one consumer at a time, on a
card of ``total_mib`` of which ``external_mib`` is held by others. A request
whose consumer is resident costs nothing. Otherwise the consumer must fit:
its ``size + cushion_mib`` against what is free (the daemon's rule, SPEC
section 7); while it does not, one resident consumer is unloaded, and then it
is loaded. Who may be unloaded follows the daemon too: resident, not the
target, not ``pinned`` (no unload route, or ``vram_managed``), and not allowed
to coexist with the target (``coexist`` pairs; none: anything may go for
anything).

``belady`` picks each victim by Belady's rule: the one whose next request is
furthest in the future, one never asked for again first (the larger of those
first). With models of one size this is the optimum (every load evicts one
model; Belady's MIN). With models of different sizes it is a heuristic: evicting the
furthest-used model may free too little and cost a second unload where
another choice would not (``ABCA`` with A and C of 3 GB, B of 2 GB, on 5 GB:
for C it unloads B, never used again, then A too; unloading A alone was
enough). ``exhaustive`` finds the true optimum under the same rules.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Card:
    """The GPU as the reference sees it."""

    total_mib: int
    cushion_mib: int = 256
    external_mib: int = 0


@dataclass(frozen=True)
class Rules:
    """Who may be resident together and who may be unloaded."""

    sizes_mib: Mapping[str, int]
    card: Card
    coexist: frozenset[frozenset[str]] = frozenset()
    pinned: frozenset[str] = frozenset()

    @classmethod
    def make(
        cls,
        sizes_mib: Mapping[str, int],
        card: Card,
        coexist: Iterable[tuple[str, str]] = (),
        pinned: Iterable[str] = (),
    ) -> Rules:
        return cls(
            dict(sizes_mib),
            card,
            frozenset(frozenset(p) for p in coexist),
            frozenset(pinned),
        )

    def free_mib(self, resident: Iterable[str]) -> int:
        c = self.card
        return c.total_mib - c.external_mib - sum(self.sizes_mib[r] for r in resident)

    def fits(self, target: str, resident: Iterable[str]) -> bool:
        return self.free_mib(resident) >= self.sizes_mib[target] + self.card.cushion_mib

    def candidates(self, target: str, resident: Iterable[str]) -> list[str]:
        """Who may be unloaded to make room for ``target``, in name order."""
        return sorted(
            r
            for r in resident
            if r != target and r not in self.pinned and frozenset((r, target)) not in self.coexist
        )

    def check(self, target: str, resident: Iterable[str]) -> None:
        """``ValueError`` when ``target`` cannot fit even with every candidate gone."""
        resident = set(resident)
        rest = resident - set(self.candidates(target, resident))
        if not self.fits(target, rest):
            raise ValueError(f"{target} does not fit even with every evictable model unloaded")


@dataclass
class Swaps:
    """What serving a sequence cost: loads, unloads, and who was unloaded for whom."""

    loads: int = 0
    unloads: int = 0
    steps: list[tuple[int, str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def swaps(self) -> int:
        return self.loads + self.unloads


class _NextUse:
    """For each consumer, the positions of its requests: the next use after ``i``."""

    def __init__(self, sequence: Sequence[str]) -> None:
        self._at: dict[str, list[int]] = {}
        for i, name in enumerate(sequence):
            self._at.setdefault(name, []).append(i)

    def after(self, name: str, i: int) -> float:
        at = self._at.get(name, [])
        j = bisect.bisect_right(at, i)
        return at[j] if j < len(at) else math.inf


def belady(sequence: Sequence[str], rules: Rules, resident: Iterable[str] = ()) -> Swaps:
    """Serve ``sequence`` in order, evicting by Belady's rule; the loads and unloads counted.

    ``resident``: who is loaded at the start (default: nobody, so every
    consumer's first request is a load).
    """
    held = set(resident)
    nxt = _NextUse(sequence)
    out = Swaps()
    for i, target in enumerate(sequence):
        if target in held:
            continue
        rules.check(target, held)
        evicted: list[str] = []
        while not rules.fits(target, held):
            victim = max(
                rules.candidates(target, held),
                key=lambda r: (nxt.after(r, i), rules.sizes_mib[r], r),
            )
            held.discard(victim)
            evicted.append(victim)
        held.add(target)
        out.loads += 1
        out.unloads += len(evicted)
        out.steps.append((i, target, tuple(evicted)))
    return out


def exhaustive(sequence: Sequence[str], rules: Rules, resident: Iterable[str] = ()) -> int:
    """The fewest loads + unloads over every choice of victims: the true optimum.

    The same rules as ``belady`` (served in order, victims unloaded one at a
    time only while the target does not fit), searched exhaustively by dynamic
    programming over (position, set of resident consumers): ``len(sequence)``
    times ``2 ** consumers`` states, so it is cheap for the trace's four
    consumers and a few hundred requests. ``ValueError`` when some request can
    never fit.
    """
    seq = list(sequence)
    start = frozenset(resident)
    names = sorted(set(seq) | start)
    states = [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]
    after: dict[frozenset[str], float] = dict.fromkeys(states, 0.0)  # cost from position i + 1 on
    for i in reversed(range(len(seq))):
        target = seq[i]
        memo: dict[frozenset[str], float] = {}
        after = {
            h: after[h] if target in h else _room(rules, target, h, after, memo) for h in states
        }
    best = after[start]
    if math.isinf(best):
        raise ValueError("some request does not fit even with every evictable model unloaded")
    return int(best)


def _room(
    rules: Rules,
    target: str,
    held: frozenset[str],
    after: Mapping[frozenset[str], float],
    memo: dict[frozenset[str], float],
) -> float:
    """From ``held``: the unloads until ``target`` fits, its load, and ``after`` that."""
    if held not in memo:
        if rules.fits(target, held):
            memo[held] = 1 + after[held | {target}]
        else:
            victims = rules.candidates(target, held)
            memo[held] = 1 + min(
                (_room(rules, target, held - {v}, after, memo) for v in victims),
                default=math.inf,
            )
    return memo[held]
