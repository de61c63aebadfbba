"""The ``affinity`` policy: requests that need no swap first, bounded by ``max_skip_s``;
``min_residency_s`` keeps a fresh load resident; priority still comes first."""

from __future__ import annotations

from collections.abc import Callable

from attrs import evolve, frozen
from hypothesis import given
from hypothesis import strategies as st

from mgpu.config import ConsumerConfig, Route, SchedulerConfig
from mgpu.policy import NO_SWAP, SWAP, SWAP_YOUNG, Resident, eviction_order, next_waiting
from mgpu.scheduler import GpuScheduler
from tests.test_room import CUSHION, GIB, Harness, RoomTestCase
from tests.test_scheduler import SchedulerCase, consumer

AFFINITY = SchedulerConfig(policy="affinity", max_skip_s=10, aging_s=1000)
FIFO = SchedulerConfig(policy="fifo", aging_s=1000)


@frozen
class Ticket:
    consumer: str
    priority: int
    arrived_at: float
    prepare: bool = True


def costs(**by_name: int) -> Callable[[str], int]:
    return lambda name: by_name.get(name, SWAP)


class PolicyTests(SchedulerCase):
    """``next_waiting``, the pure rule."""

    def test_fifo_takes_the_oldest(self) -> None:
        waiting = [Ticket("b", 2, 1.0), Ticket("a", 2, 2.0)]
        chosen = next_waiting(waiting, 3.0, FIFO, costs(a=NO_SWAP))
        self.assertEqual(chosen, waiting[0])

    def test_affinity_takes_the_cheapest_then_the_oldest(self) -> None:
        waiting = [
            Ticket("young", 2, 1.0),
            Ticket("cold", 2, 2.0),
            Ticket("hot", 2, 3.0),
            Ticket("hot", 2, 4.0),
        ]
        cost = costs(young=SWAP_YOUNG, cold=SWAP, hot=NO_SWAP)
        self.assertEqual(next_waiting(waiting, 5.0, AFFINITY, cost), waiting[2])
        self.assertEqual(next_waiting(waiting[:2], 5.0, AFFINITY, cost), waiting[1])

    def test_overdue_is_never_overtaken(self) -> None:
        """Past max_skip_s the oldest overdue request goes first, whatever it costs."""
        waiting = [Ticket("cold", 2, 0.0), Ticket("cold2", 2, 0.5), Ticket("hot", 2, 9.0)]
        cost = costs(hot=NO_SWAP)
        self.assertEqual(next_waiting(waiting, 10.0, AFFINITY, cost), waiting[2])
        self.assertEqual(next_waiting(waiting, 10.1, AFFINITY, cost), waiting[0])

    def test_unload_costs_no_swap(self) -> None:
        """Work that loads nothing (an admin unload) is priced as needing no swap."""
        waiting = [Ticket("hot", 2, 1.0), Ticket("cold", 2, 0.5, prepare=False)]
        self.assertEqual(next_waiting(waiting, 2.0, AFFINITY, costs(hot=NO_SWAP)), waiting[1])

    def test_priority_first(self) -> None:
        """A higher-priority request that needs a swap beats a resident lower-priority one."""
        waiting = [Ticket("hot", 2, 0.0), Ticket("cold", 3, 5.0)]
        chosen = next_waiting(waiting, 6.0, AFFINITY, costs(hot=NO_SWAP))
        self.assertEqual(chosen, waiting[1])

    @given(
        st.lists(
            st.tuples(st.sampled_from("abcd"), st.integers(0, 2), st.floats(0, 100)),
            min_size=1,
            max_size=12,
        ),
        st.floats(0, 150),
        st.dictionaries(st.sampled_from("abcd"), st.sampled_from([NO_SWAP, SWAP, SWAP_YOUNG])),
    )
    def test_properties(
        self, raw: list[tuple[str, int, float]], later: float, cost_of: dict[str, int]
    ) -> None:
        """Whatever is waiting: the choice has the top priority; an overdue request is
        chosen over any younger one; with nobody overdue, nothing cheaper waits at its level."""
        waiting = [Ticket(name, prio, at) for name, prio, at in raw]
        now = max(t.arrived_at for t in waiting) + later
        chosen = next_waiting(waiting, now, AFFINITY, costs(**cost_of))
        assert chosen is not None
        top = max(t.priority for t in waiting)
        self.assertEqual(chosen.priority, top)
        level = [t for t in waiting if t.priority == top]
        overdue = [t for t in level if now - t.arrived_at > AFFINITY.max_skip_s]
        if overdue:
            self.assertEqual(chosen.arrived_at, min(t.arrived_at for t in overdue))
        else:
            cheapest = min(cost_of.get(t.consumer, SWAP) for t in level)
            self.assertEqual(cost_of.get(chosen.consumer, SWAP), cheapest)


class AffinitySchedulerTests(SchedulerCase):
    """The policy inside the scheduler, on a Clock: a job takes 3 s unless a test says so."""

    def setUp(self) -> None:
        super().setUp()
        self.build(consumer("a"), consumer("b"), consumer("c"), config=AFFINITY)

    def resident(self, *names: str) -> None:
        for name in names:
            self.registry.mark_loaded(name)

    def test_resident_first(self) -> None:
        """When the lease frees, the holder's own waiting request goes before an older one of a
        consumer that is not resident; under fifo the older goes first."""
        for config, expected in ((AFFINITY, ["a1", "a2", "b"]), (FIFO, ["a1", "b", "a2"])):
            self.build(consumer("a"), consumer("b"), config=config)
            self.jobs.started.clear()
            self.resident("a")
            self.submit("a", "a1")
            self.submit("b", "b")
            self.submit("a", "a2")
            self.jobs.finish("a1")
            self.jobs.finish(self.jobs.started[-1])
            self.assertEqual(self.jobs.started, expected, config.policy)

    def test_resident_non_holder_before_cold(self) -> None:
        """A resident consumer's request goes before an older one that needs a load."""
        self.resident("a", "c")
        self.submit("a", "a1")
        self.submit("b", "b")
        self.submit("c", "c")
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "c"])

    def test_max_skip_bound(self) -> None:
        """Under a steady stream of resident requests, a cold request starts once it has
        waited max_skip_s, after at most the one job then running: never later."""
        self.resident("a")
        self.submit("a", "a0")
        self.submit("b", "b")  # arrives at 0
        running, n = "a0", 0
        while "b" not in self.jobs.started:
            n += 1
            self.submit("a", f"a{n}")  # one more resident request always waiting
            self.clock.advance(3)
            self.jobs.finish(running)
            running = self.jobs.started[-1]
        waited = self.clock.seconds()
        self.assertGreater(waited, AFFINITY.max_skip_s)
        self.assertLessEqual(waited, AFFINITY.max_skip_s + 3)

    def test_overdue_request_stops_the_holder_joining(self) -> None:
        """With free slots, the holder's new requests join its lease, but not once another
        consumer's request has waited past max_skip_s."""
        self.build(consumer("a", max_concurrency=4), consumer("b"), config=AFFINITY)
        self.resident("a")
        self.submit("a", "a1")
        self.submit("b", "b")
        self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.clock.advance(AFFINITY.max_skip_s + 1)
        self.submit("a", "a3")
        self.assertEqual(self.jobs.started, ["a1", "a2"])
        self.jobs.finish("a1")
        self.jobs.finish("a2")
        self.assertEqual(self.jobs.started, ["a1", "a2", "b"])

    def test_lower_priority_overdue_does_not_stop_joins(self) -> None:
        """An overdue request of a lower priority does not hold the holder to one slot: it
        waits for its own level, as priority comes first."""
        self.build(consumer("hi", 4, max_concurrency=4), consumer("lo", 0), config=AFFINITY)
        self.resident("hi")
        self.submit("hi", "h1")
        self.submit("lo", "lo")
        self.clock.advance(AFFINITY.max_skip_s + 1)
        self.submit("hi", "h2")
        self.assertEqual(self.jobs.started, ["h1", "h2"])

    def test_priority_before_residency(self) -> None:
        """A higher-priority consumer that needs a load goes before a resident one."""
        self.build(consumer("a"), consumer("b", priority=3), config=AFFINITY)
        self.resident("a")
        self.submit("a", "a1")
        self.submit("a", "a2")
        self.submit("b", "b")
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "b"])

    def test_young_swap_last(self) -> None:
        """A request whose swap would unload a fresh load waits for one whose swap would not."""
        cost = costs(b=SWAP_YOUNG, c=SWAP)
        self.scheduler = GpuScheduler(self.registry, self.clock, AFFINITY, swap_cost=cost)
        self.submit("a", "a1")
        self.submit("b", "b")
        self.submit("c", "c")
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a1", "c"])


LINGER = evolve(AFFINITY, linger_s=2.0)


class LingerTests(SchedulerCase):
    """``linger_s``: a drained lease waits a moment for its holder's next request, as long
    as the holder's usual gap between requests says one is coming."""

    def scene(self, config: SchedulerConfig = LINGER, gap: float = 1.0, **priorities: int) -> None:
        """a (resident) gets a0 then, ``gap`` later, a1, which runs while b (not resident)
        waits; a1 ends 1 s after that."""
        self.build(
            consumer("a", priorities.get("a", 2)), consumer("b", priorities.get("b", 2)),
            config=config,
        )  # fmt: skip
        self.registry.mark_loaded("a")
        self.submit("a", "a0")
        self.jobs.finish("a0")  # nobody waits: the lease is simply free
        self.clock.advance(gap)
        self.submit("a", "a1")
        self.submit("b", "b")
        self.clock.advance(1)
        self.jobs.finish("a1")

    def test_burst_goes_on_without_a_swap(self) -> None:
        """The holder's next request, arriving within 1.5 of its gaps, runs before b's swap."""
        self.scene()
        self.assertEqual(self.jobs.started, ["a0", "a1"])
        self.assertEqual(self.scheduler.holder, "a")
        self.clock.advance(1.0)
        self.submit("a", "a2")
        self.assertEqual(self.jobs.started, ["a0", "a1", "a2"])
        self.clock.advance(2.5)  # the lingering ended when a2 came: b waits for a2
        self.assertEqual(self.jobs.started, ["a0", "a1", "a2"])
        self.jobs.finish("a2")
        self.clock.advance(2)
        self.assertEqual(self.jobs.started, ["a0", "a1", "a2", "b"])

    def test_lease_passes_after_one_and_a_half_gaps(self) -> None:
        """Without a request of the holder, the lease passes after 1.5 of its gaps (1 s)."""
        self.scene()
        self.clock.advance(1.49)
        self.assertEqual(self.jobs.started, ["a0", "a1"])
        self.clock.advance(0.01)
        self.assertEqual(self.jobs.started, ["a0", "a1", "b"])
        self.assertEqual(self.scheduler.holder, "b")

    def test_at_most_linger_s(self) -> None:
        """A long usual gap (4 s) is cut to linger_s (2 s)."""
        self.scene(gap=4.0)
        self.clock.advance(1.99)
        self.assertEqual(self.jobs.started, ["a0", "a1"])
        self.clock.advance(0.01)
        self.assertEqual(self.jobs.started, ["a0", "a1", "b"])

    def test_never_past_the_skip_bound(self) -> None:
        """Lingering ends when the oldest waiting request would become overdue."""
        self.scene(evolve(LINGER, linger_s=60.0), gap=8.0)
        self.clock.advance(AFFINITY.max_skip_s - 1 - 0.01)
        self.assertEqual(self.jobs.started, ["a0", "a1"])
        self.clock.advance(0.01)
        self.assertEqual(self.jobs.started, ["a0", "a1", "b"])

    def test_no_linger(self) -> None:
        """Not with fifo, not with linger_s 0, not when a higher priority waits, and not when
        the holder's last gap was a pause between bursts (over max_skip_s)."""
        for config, gap, priorities in (
            (evolve(LINGER, policy="fifo"), 1.0, {}),
            (evolve(LINGER, linger_s=0.0), 1.0, {}),
            (LINGER, 1.0, {"b": 3}),
            (LINGER, AFFINITY.max_skip_s + 1, {}),
        ):
            self.jobs = type(self.jobs)()
            self.scene(config, gap, **priorities)
            self.assertEqual(self.jobs.started, ["a0", "a1", "b"], (config, gap, priorities))

    def test_no_linger_when_something_runs_without_a_swap(self) -> None:
        """A waiting request that needs no swap is served at once instead."""
        self.build(consumer("a"), consumer("b"), consumer("c"), config=LINGER)
        for name in ("a", "c"):
            self.registry.mark_loaded(name)
        self.submit("a", "a0")
        self.jobs.finish("a0")
        self.submit("a", "a1")
        self.submit("b", "b")
        self.submit("c", "c")
        self.jobs.finish("a1")
        self.assertEqual(self.jobs.started, ["a0", "a1", "c"])


class MinResidencyTests(RoomTestCase):
    """``min_residency_s`` in room-making and in the swap cost."""

    def scene(self, min_residency_s: float) -> None:
        """A 24 GiB card: vllm loaded at 0 and used at 40; comfyui loaded at 50 and not
        used yet. At 55 mvoice needs room that unloading either one would make."""
        config = SchedulerConfig(min_residency_s=min_residency_s)
        self.h = Harness(total_mib=24 * GIB, scheduler=config)
        self.h.resident("vllm", last_used_at=40.0)
        self.h.clock.advance(50)
        self.h.resident("comfyui")
        self.h.gpu.other_mib = 24 * GIB - 13000 - 7000 - 2000  # 2000 MiB free
        self.h.absent("mvoice")
        self.h.clock.advance(5)

    def test_fresh_load_unloaded_last(self) -> None:
        """comfyui, never used, would go first by LRU; loaded 5 s ago, it is kept and
        vllm (loaded 55 s ago) is unloaded instead."""
        self.scene(min_residency_s=10)
        self.assertEqual(self.h.room.swap_cost("mvoice"), SWAP)
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["vllm"])

    def test_without_min_residency_lru_decides(self) -> None:
        """With min_residency_s 0, plain LRU: the never-used comfyui goes first."""
        self.scene(min_residency_s=0)
        self.successResultOf(self.h.prepare("mvoice"))
        self.assertEqual(self.h.actions("unload"), ["comfyui"])

    def test_young_victim_when_nothing_else_makes_room(self) -> None:
        """When only the fresh load can make room, it is unloaded, and the swap is priced
        SWAP_YOUNG until its residency has passed."""
        self.scene(min_residency_s=10)
        self.h.registry["vllm"].in_flight = 1  # busy: not a candidate
        self.assertEqual(self.h.room.swap_cost("mvoice"), SWAP_YOUNG)
        self.h.clock.advance(6)  # comfyui loaded 11 s ago
        self.assertEqual(self.h.room.swap_cost("mvoice"), SWAP)
        self.h.registry["vllm"].in_flight = 0

    def test_resident_costs_nothing(self) -> None:
        self.scene(min_residency_s=10)
        self.assertEqual(self.h.room.swap_cost("comfyui"), NO_SWAP)

    def test_fits_without_eviction_is_a_plain_swap(self) -> None:
        self.scene(min_residency_s=10)
        self.h.gpu.other_mib = 0
        self.assertGreaterEqual(self.h.gpu.free_mib, 2800 + CUSHION)
        self.assertEqual(self.h.room.swap_cost("mvoice"), SWAP)


class EvictionOrderTests(SchedulerCase):
    def test_young_last_then_lru(self) -> None:
        target = consumer("t")
        old_lru, old_mru, young = (
            Resident(_unloadable(n), True, False, used, loaded)
            for n, used, loaded in (("x", 1.0, 0.0), ("y", 9.0, 0.0), ("z", 0.5, 95.0))
        )
        order = eviction_order(target, [young, old_mru, old_lru], young_since=90.0)
        self.assertEqual([r.config.name for r in order], ["x", "y", "z"])
        order = eviction_order(target, [young, old_mru, old_lru])
        self.assertEqual([r.config.name for r in order], ["z", "x", "y"])


def _unloadable(name: str) -> ConsumerConfig:
    return evolve(consumer(name), unload=Route("POST", "/unload"))
