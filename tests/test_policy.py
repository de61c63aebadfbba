"""Tests for mgpu.policy: the victim rule, the fit arithmetic and aging, as pure functions.

The properties are checked against oracles written from SPEC section 7, not
from the code: a consumer may be unloaded for a target when it is loaded, has
an unload route, is not the target, may not coexist with it (declared on
either side), is not ``vram_managed`` and is not busy; the candidates come
never-used first, then least recently used, ties in the given order.
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import pairwise
from random import Random

from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConsumerConfig, KindPath, Route
from mgpu.policy import (
    DEFAULT_LOAD_S,
    LOAD_TIMES_KEPT,
    LoadTimes,
    Resident,
    effective_priority,
    eviction_order,
    eviction_plan,
    fits_after_evictions,
)
from tests.fuzz import examples

NAMES = ("mvoice", "whisper", "ollama", "comfyui", "vllm", "sdxl", "piper")

#: No wall-clock deadline: a loaded CI machine must not turn a slow example into a failure.
properties = settings(deadline=None, max_examples=200)


def config(
    name: str,
    size: int = 1000,
    *,
    unload: Route | None = None,
    coexist: frozenset[str] = frozenset(),
    managed: bool = False,
) -> ConsumerConfig:
    """A consumer named ``name`` of ``size`` MiB."""
    return ConsumerConfig(
        name=name,
        url=f"http://127.0.0.1:{8000 + NAMES.index(name)}",
        paths={"tts": KindPath("POST", "/run")},
        vram_resident_mib=size,
        unload=unload,
        can_coexist_with=coexist,
        vram_managed=managed,
    )


UNLOAD = Route("POST", "/unload")

#: Times of last use: None (never used), a few values that tie, or anything.
last_used = st.one_of(
    st.none(),
    st.sampled_from([0.0, 1.0, 2.5]),
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
)


def mostly(value: bool) -> st.SearchStrategy[bool]:
    """``value`` five times in six, so that many consumers drawn may be unloaded."""
    return st.sampled_from([value] * 5 + [not value])


@st.composite
def configs(draw: st.DrawFn, name: str) -> ConsumerConfig:
    """Any configuration of the consumer ``name``, naming a few consumers as coexistent."""
    return config(
        name,
        draw(st.integers(min_value=0, max_value=80_000)),
        unload=draw(
            st.sampled_from([None] + [UNLOAD] * 3 + [Route("GET", "/free", {"all": True})] * 2)
        ),
        coexist=frozenset(draw(st.lists(st.sampled_from(NAMES), max_size=1))),
        managed=draw(mostly(False)),
    )


@st.composite
def residents(draw: st.DrawFn, name: str) -> Resident:
    """``name`` in any state: loaded or not, busy or not, used at any time or never."""
    return Resident(draw(configs(name)), draw(mostly(True)), draw(mostly(False)), draw(last_used))


@st.composite
def scenes(draw: st.DrawFn) -> tuple[ConsumerConfig, list[Resident]]:
    """A target and the consumers as eviction sees them; the target may be among them or not."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    consumers = [draw(residents(name)) for name in names]
    target_name = draw(st.sampled_from(NAMES))
    by_name = {r.config.name: r.config for r in consumers}
    target = by_name.get(target_name) or draw(configs(target_name))
    return target, consumers


def may_be_unloaded(target: ConsumerConfig, r: Resident) -> bool:
    """SPEC section 7's candidate rule, written out independently of the code under test."""
    c = r.config
    return (
        r.loaded
        and c.unload is not None
        and c.name != target.name
        and target.name not in c.can_coexist_with
        and c.name not in target.can_coexist_with
        and not c.vram_managed
        and not r.busy
    )


class EvictionOrderPropertyTests(SynchronousTestCase):
    """eviction_order: soundness, completeness and order, for any set of consumers."""

    @properties
    @given(scenes())
    def test_every_candidate_may_be_unloaded(
        self, scene: tuple[ConsumerConfig, list[Resident]]
    ) -> None:
        """Every candidate is loaded, has an unload route, is not the target, may not coexist with
        it either way, is not vram_managed and is not busy."""
        target, consumers = scene
        for c in eviction_order(target, consumers):
            self.assertTrue(c.loaded, c)
            self.assertIsNotNone(c.config.unload, c)
            self.assertNotEqual(c.config.name, target.name)
            self.assertNotIn(target.name, c.config.can_coexist_with)
            self.assertNotIn(c.config.name, target.can_coexist_with)
            self.assertFalse(c.config.vram_managed, c)
            self.assertFalse(c.busy, c)

    @properties
    @given(scenes())
    def test_every_consumer_that_may_be_unloaded_is_a_candidate(
        self, scene: tuple[ConsumerConfig, list[Resident]]
    ) -> None:
        """Every consumer meeting all the conditions is a candidate, exactly once."""
        target, consumers = scene
        order = eviction_order(target, consumers)
        expected = [r for r in consumers if may_be_unloaded(target, r)]
        self.assertEqual(sorted(map(id, order)), sorted(map(id, expected)))

    @properties
    @given(scenes())
    def test_never_used_come_first(self, scene: tuple[ConsumerConfig, list[Resident]]) -> None:
        """No never-used candidate comes after a used one."""
        target, consumers = scene
        used = [c.last_used_at is not None for c in eviction_order(target, consumers)]
        self.assertEqual(used, sorted(used))

    @properties
    @given(scenes())
    def test_least_recently_used_first(self, scene: tuple[ConsumerConfig, list[Resident]]) -> None:
        """The used candidates come in the order of their last use, oldest first."""
        target, consumers = scene
        times = [
            c.last_used_at for c in eviction_order(target, consumers) if c.last_used_at is not None
        ]
        self.assertEqual(times, sorted(times))

    @properties
    @given(scenes())
    def test_ties_keep_the_given_order(self, scene: tuple[ConsumerConfig, list[Resident]]) -> None:
        """Candidates last used at the same time (or never) keep the order they were given in."""
        target, consumers = scene
        position = {id(r): i for i, r in enumerate(consumers)}
        order = eviction_order(target, consumers)
        for a, b in pairwise(order):
            if a.last_used_at == b.last_used_at:
                self.assertLess(position[id(a)], position[id(b)])

    @properties
    @given(scenes(), st.randoms(use_true_random=False))
    def test_same_candidates_whatever_the_given_order(
        self, scene: tuple[ConsumerConfig, list[Resident]], rnd: Random
    ) -> None:
        """Shuffling the consumers changes neither the candidates nor their times of last use."""
        target, consumers = scene
        shuffled = list(consumers)
        rnd.shuffle(shuffled)
        first = eviction_order(target, consumers)
        second = eviction_order(target, shuffled)
        self.assertEqual({id(c) for c in first}, {id(c) for c in second})
        self.assertEqual([c.last_used_at for c in first], [c.last_used_at for c in second])

    @properties
    @given(scenes())
    def test_coexistence_counts_from_either_side(
        self, scene: tuple[ConsumerConfig, list[Resident]]
    ) -> None:
        """Moving every coexistence the target declares onto the other consumers' side leaves the
        candidates the same."""
        target, consumers = scene
        mirrored_target = evolve(target, can_coexist_with=frozenset())

        def mirror(c: ConsumerConfig) -> ConsumerConfig:
            if c.name == target.name:
                return mirrored_target
            if c.name in target.can_coexist_with:
                return evolve(c, can_coexist_with=c.can_coexist_with | {target.name})
            return c

        mirrored = [evolve(r, config=mirror(r.config)) for r in consumers]
        self.assertEqual(
            [c.config.name for c in eviction_order(target, consumers)],
            [c.config.name for c in eviction_order(mirrored_target, mirrored)],
        )


class FitsAfterEvictionsPropertyTests(SynchronousTestCase):
    """fits_after_evictions against the arithmetic."""

    @properties
    @given(
        st.integers(min_value=0, max_value=200_000),
        st.integers(min_value=-50_000, max_value=200_000),
        st.lists(st.builds(Resident, configs("comfyui"), st.just(True), st.just(False), last_used)),
    )
    def test_agrees_with_the_arithmetic(
        self, need: int, free: int, candidates: list[Resident]
    ) -> None:
        """It fits exactly when free memory plus every candidate's resident size covers the
        need."""
        expected = free + sum(c.config.vram_resident_mib for c in candidates) >= need
        self.assertEqual(fits_after_evictions(need, free, candidates), expected)


@st.composite
def lru_candidates(draw: st.DrawFn) -> list[Resident]:
    """Distinct candidates of any sizes, in eviction order."""
    names = draw(st.lists(st.sampled_from(NAMES), max_size=len(NAMES), unique=True))
    sizes = st.integers(min_value=0, max_value=20_000)
    return [Resident(config(n, draw(sizes), unload=UNLOAD), True, False, None) for n in names]


class EvictionPlanPropertyTests(SynchronousTestCase):
    """eviction_plan: the fewest victims worth unloading, in eviction order, first."""

    @properties
    @given(
        st.integers(min_value=0, max_value=60_000),
        st.integers(min_value=0, max_value=30_000),
        lru_candidates(),
    )
    def test_plan(self, need: int, free: int, candidates: list[Resident]) -> None:
        """The plan reorders the candidates; when room can be made, a prefix of it makes
        room, no victim of that prefix could be spared, and the prefix keeps eviction order."""

        def size(r: Resident) -> int:
            return r.config.vram_resident_mib

        plan = eviction_plan(need, free, candidates)
        self.assertEqual(sorted(map(id, plan)), sorted(map(id, candidates)))
        if not fits_after_evictions(need, free, candidates):
            self.assertEqual(plan, candidates)
            return
        total, prefix = free, []
        for r in plan:
            if total >= need:
                break
            prefix.append(r)
            total += size(r)
        self.assertGreaterEqual(total, need)
        for r in prefix:
            self.assertLess(total - size(r), need, "a victim of the plan could be spared")
        order = [candidates.index(r) for r in prefix]
        self.assertEqual(order, sorted(order))

    def test_needless_lru_victim_kept(self) -> None:
        """mvoice, whisper, ollama in LRU order: all three is the first prefix that makes room,
        but mvoice and ollama alone do; whisper, the more recently used of the two that could
        be spared, is kept."""
        mvoice, whisper, ollama = (
            Resident(config(name, size, unload=UNLOAD), True, False, used)
            for name, size, used in (("mvoice", 2800, 1.0), ("whisper", 1500, 2.0),
                                     ("ollama", 6000, 3.0))
        )  # fmt: skip
        plan = eviction_plan(13256, 6084, [mvoice, whisper, ollama])
        self.assertEqual(plan, [mvoice, ollama, whisper])


class EffectivePriorityPropertyTests(SynchronousTestCase):
    """effective_priority: one level per aging_s waited, never below the base."""

    @properties
    @given(
        st.integers(min_value=0, max_value=4),
        st.floats(min_value=0, max_value=1e7, allow_nan=False),
        st.floats(min_value=1e-3, max_value=1e4, allow_nan=False),
    )
    def test_base_plus_whole_agings_waited(
        self, priority: int, waited: float, aging: float
    ) -> None:
        """The effective priority is the base plus the number of whole aging_s waited."""
        whole = math.floor(Fraction(waited) / Fraction(aging))
        self.assertEqual(effective_priority(priority, waited, aging), priority + whole)

    @properties
    @given(
        st.integers(min_value=0, max_value=4),
        st.integers(min_value=0, max_value=2**30).map(lambda n: n / 1024),
        st.integers(min_value=1, max_value=3600),
    )
    def test_one_level_per_aging_s(self, priority: int, waited: float, aging: int) -> None:
        """Waiting aging_s longer raises the effective priority by exactly one level."""
        self.assertEqual(
            effective_priority(priority, waited + aging, aging),
            effective_priority(priority, waited, aging) + 1,
        )

    @properties
    @given(
        st.integers(min_value=0, max_value=4),
        st.floats(min_value=-1e7, max_value=1e7, allow_nan=False),
        st.floats(min_value=-1e7, max_value=1e7, allow_nan=False),
        st.floats(min_value=1e-3, max_value=1e4, allow_nan=False),
    )
    def test_never_below_base_and_never_falls(
        self, priority: int, waited: float, more: float, aging: float
    ) -> None:
        """However long (or negatively long) a request waited, its priority is at least the
        base and does not fall as it waits longer."""
        earlier, later = sorted((waited, more))
        self.assertGreaterEqual(effective_priority(priority, earlier, aging), priority)
        self.assertLessEqual(
            effective_priority(priority, earlier, aging), effective_priority(priority, later, aging)
        )

    def test_examples_with_aging_30_s(self) -> None:
        """With aging_s 30: 0 s and 29.9 s keep the base, 30 s adds one, 95 s adds three."""
        self.assertEqual(
            [effective_priority(2, w, 30.0) for w in (0.0, 29.9, 30.0, 95.0, -5.0)],
            [2, 2, 3, 5, 2],
        )


# The consumers of SPEC section 3's example configuration.
MVOICE = config(
    "mvoice", 2800, unload=Route("POST", "/api/admin/unload"), coexist=frozenset({"ollama"})
)
WHISPER = config("whisper", 1500, coexist=frozenset({"mvoice", "ollama"}))
OLLAMA = config("ollama", 6000, unload=Route("POST", "/api/generate"), managed=True)
COMFYUI = config(
    "comfyui", 13000, unload=Route("POST", "/free", {"unload_models": True, "free_memory": True})
)
VLLM = config("vllm", 7000, unload=Route("POST", "/sleep?level=1"))


class ExampleTests(SynchronousTestCase):
    """The design's cases, at the policy level."""

    def test_comfyui_makes_room_for_mvoice_on_16_gib(self) -> None:
        """With everything loaded, comfyui is mvoice's only candidate, and unloading it fits mvoice
        (2800 + 256 MiB) on a 16 GiB card."""
        everyone = [
            Resident(MVOICE, False, False, 10.0),
            Resident(WHISPER, True, False, None),
            Resident(OLLAMA, True, False, None),
            Resident(COMFYUI, True, False, 20.0),
        ]
        order = eviction_order(MVOICE, everyone)
        self.assertEqual([c.config.name for c in order], ["comfyui"])
        free = 16384 - 1500 - 6000 - 13000
        self.assertTrue(fits_after_evictions(2800 + 256, free, order))
        self.assertFalse(fits_after_evictions(2800 + 256, free, []))

    def test_coexistent_least_recently_used_is_passed_over(self) -> None:
        """A coexistent consumer used long ago is never a candidate; the one used just now is."""
        vllm = config("vllm", 7000, unload=UNLOAD, coexist=frozenset({"mvoice"}))
        order = eviction_order(
            MVOICE, [Resident(vllm, True, False, 1.0), Resident(COMFYUI, True, False, 99.0)]
        )
        self.assertEqual([c.config.name for c in order], ["comfyui"])

    def test_vram_managed_never_a_candidate_so_target_never_fits(self) -> None:
        """ollama (vram_managed, with an unload route) is never a candidate for comfyui, so on a
        16 GiB card comfyui could never fit beside it."""
        consumers = [Resident(OLLAMA, True, False, None), Resident(WHISPER, True, False, None)]
        order = eviction_order(COMFYUI, consumers)
        self.assertEqual(order, [])
        self.assertFalse(fits_after_evictions(13000 + 256, 16384 - 6000 - 1500, order))

    def test_lru_order_with_never_used_first(self) -> None:
        """Never-used consumers go first, then the least recently used."""
        a = config("sdxl", unload=UNLOAD)
        b = config("piper", unload=UNLOAD)
        consumers = [
            Resident(COMFYUI, True, False, 50.0),
            Resident(VLLM, True, False, 10.0),
            Resident(a, True, False, None),
            Resident(b, True, False, 30.0),
        ]
        order = eviction_order(MVOICE, consumers)
        self.assertEqual([c.config.name for c in order], ["sdxl", "vllm", "piper", "comfyui"])

    def test_ties_in_given_order(self) -> None:
        """Consumers never used, or last used at the same time, keep the order given."""
        a = config("sdxl", unload=UNLOAD)
        b = config("piper", unload=UNLOAD)
        consumers = [
            Resident(VLLM, True, False, 3.0),
            Resident(a, True, False, None),
            Resident(COMFYUI, True, False, 3.0),
            Resident(b, True, False, None),
        ]
        order = eviction_order(MVOICE, consumers)
        self.assertEqual([c.config.name for c in order], ["sdxl", "piper", "vllm", "comfyui"])

    def test_busy_and_unloaded_are_passed_over(self) -> None:
        """A busy consumer and one already unloaded are not candidates."""
        consumers = [Resident(VLLM, True, True, None), Resident(COMFYUI, False, False, None)]
        self.assertEqual(eviction_order(MVOICE, consumers), [])


# -- eviction: cost (SPEC 9.6) -------------------------------------------------

cost_properties = settings(deadline=None, max_examples=examples(200))

#: Learned load times: unknown, a few that tie, or anything.
load_times = st.one_of(
    st.none(), st.sampled_from([2.0, 5.0, 20.0]), st.floats(min_value=0.0, max_value=600.0)
)


@st.composite
def costed_scenes(draw: st.DrawFn) -> tuple[ConsumerConfig, list[Resident]]:
    """A scene whose consumers have learned load times (or none)."""
    target, consumers = draw(scenes())
    return target, [evolve(r, load_s=draw(load_times)) for r in consumers]


def per_mib(r: Resident) -> float:
    """The oracle's reload cost per MiB freed: unknown load times cost ``DEFAULT_LOAD_S``."""
    load_s = DEFAULT_LOAD_S if r.load_s is None else r.load_s
    return load_s / max(1, r.config.vram_resident_mib)


class CostEvictionPropertyTests(SynchronousTestCase):
    """eviction_order and eviction_plan with ``eviction: cost``."""

    @cost_properties
    @given(costed_scenes())
    def test_cost_candidates_are_lrus(self, scene: tuple[ConsumerConfig, list[Resident]]) -> None:
        """Cost never picks a consumer that may not be unloaded: same candidates as lru."""
        target, consumers = scene
        order = eviction_order(target, consumers, None, "cost")
        for c in order:
            self.assertTrue(may_be_unloaded(target, c), c)
        lru = eviction_order(target, consumers)
        self.assertEqual(sorted(map(id, order)), sorted(map(id, lru)))

    @cost_properties
    @given(scenes(), load_times, st.integers(min_value=1, max_value=80_000))
    def test_equal_costs_equal_lru(
        self, scene: tuple[ConsumerConfig, list[Resident]], load_s: float | None, size: int
    ) -> None:
        """With one load time and one size for all, cost orders exactly as lru."""
        target, consumers = scene
        same = [
            evolve(r, load_s=load_s, config=evolve(r.config, vram_resident_mib=size))
            for r in consumers
        ]
        self.assertEqual(
            eviction_order(target, same, 0.0, "cost"), eviction_order(target, same, 0.0)
        )

    @cost_properties
    @given(costed_scenes(), st.floats(min_value=0.01, max_value=1.0), st.integers(0, 10_000))
    def test_plan_victim_is_cheapest_needed(
        self, scene: tuple[ConsumerConfig, list[Resident]], share: float, free: int
    ) -> None:
        """The plan's first victim costs least per MiB among the victims the plan needs (a
        cheaper one may be dropped as needless); ties among them go to the least recently used."""
        target, consumers = scene
        order = eviction_order(target, consumers, None, "cost")
        # A need that some of the candidates, together, can meet.
        need = free + math.ceil(share * sum(c.config.vram_resident_mib for c in order))
        plan = eviction_plan(need, free, order)
        if not plan or not fits_after_evictions(need, free, order) or free >= need:
            return
        needed, total = [], free
        for victim in plan:
            needed.append(victim)
            total += victim.config.vram_resident_mib
            if total >= need:
                break
        first = plan[0]
        self.assertEqual(per_mib(first), min(map(per_mib, needed)))
        for other in needed:
            if per_mib(other) == per_mib(first) and other is not first:
                self.assertFalse(_used_before(other, first), (other, first))

    @cost_properties
    @given(costed_scenes(), st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
    def test_young_still_last(
        self, scene: tuple[ConsumerConfig, list[Resident]], young_since: float
    ) -> None:
        """min_residency_s stays: a candidate loaded after ``young_since`` never precedes one
        loaded before, whatever they cost."""
        target, consumers = scene
        loaded = [evolve(r, loaded_at=r.last_used_at) for r in consumers]
        order = eviction_order(target, loaded, young_since, "cost")
        young = [c.loaded_at is not None and c.loaded_at > young_since for c in order]
        self.assertEqual(young, sorted(young))


def _used_before(a: Resident, b: Resident) -> bool:
    """Whether ``a`` is less recently used than ``b`` (never used is least)."""
    if a.last_used_at is None:
        return b.last_used_at is not None
    return b.last_used_at is not None and a.last_used_at < b.last_used_at


class LoadTimesTests(SynchronousTestCase):
    """LoadTimes: the mean of the last ten."""

    def test_none_before_any(self) -> None:
        self.assertIsNone(LoadTimes().mean)

    def test_mean_of_last_ten(self) -> None:
        """Eleven loads: the first (100 s) no longer counts."""
        times = LoadTimes().add(100.0)
        for _ in range(10):
            times = times.add(2.0)
        self.assertEqual(times.mean, 2.0)
        self.assertEqual(len(times.recent), LOAD_TIMES_KEPT)
