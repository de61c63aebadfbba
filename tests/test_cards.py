"""Several cards: one lease per card, and consumers on several cards taking theirs in
index order without deadlock or starvation."""

from __future__ import annotations

from collections.abc import Callable

from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpu.cards import CardSchedulers
from mgpu.config import ConsumerConfig, SchedulerConfig
from mgpu.errors import BrokerError
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler, Lease, SchedulerStats
from tests.fuzz import examples
from tests.test_scheduler import consumer

#: The consumers of these tests and their cards.
CARDS = {"voice": (0,), "image": (1,), "llm": (0, 1), "wide": (0, 1, 2), "side": (2,)}


def on_cards(name: str, cards: tuple[int, ...], **kwargs: int) -> ConsumerConfig:
    return evolve(consumer(name, **kwargs), gpus=cards)


def schedulers(
    clock: Clock,
    config: SchedulerConfig | None = None,
    cards: dict[str, tuple[int, ...]] = CARDS,
    prepare: list[str] | None = None,
    priorities: dict[str, int] | None = None,
    prepare_with: Callable[[str], Deferred[None]] | None = None,
) -> tuple[Registry, CardSchedulers]:
    levels = priorities or {}
    registry = Registry(
        {n: on_cards(n, c, priority=levels.get(n, 2)) for n, c in cards.items()}, clock
    )
    stats = SchedulerStats()

    def prepared(name: str) -> Deferred[None]:
        if prepare is not None:
            prepare.append(name)
        return succeed(None) if prepare_with is None else prepare_with(name)

    lanes = {card: GpuScheduler(registry, clock, config, prepared, stats) for card in range(3)}
    return registry, CardSchedulers(registry, lanes, clock)


class Job:
    """A job that runs until told to finish, noting when it started."""

    def __init__(self, name: str, started: list[str]) -> None:
        self.name = name
        self.started = started
        self.gate: Deferred[str] = Deferred()

    def __call__(self, lease: Lease) -> Deferred[str]:
        self.started.append(self.name)
        return self.gate

    def finish(self) -> None:
        self.gate.callback(self.name)


class CardSchedulersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.prepared: list[str] = []
        self.registry, self.cards = schedulers(self.clock, prepare=self.prepared)
        self.started: list[str] = []

    def job(self, name: str) -> Job:
        return Job(name, self.started)

    def holders(self) -> list[str | None]:
        return [self.cards.lanes[card].holder for card in range(3)]

    def test_consumers_on_different_cards_run_at_once(self) -> None:
        """voice on card 0 and image on card 1 both start at once, each preparing its own."""
        voice, image = self.job("voice"), self.job("image")
        done = [self.cards.run("voice", voice), self.cards.run("image", image)]
        self.assertEqual(self.started, ["voice", "image"])
        self.assertEqual(self.holders(), ["voice", "image", None])
        self.assertEqual((self.cards.running, self.cards.queued), (2, 0))
        voice.finish()
        image.finish()
        self.assertEqual([self.successResultOf(d) for d in done], ["voice", "image"])
        self.assertEqual(self.prepared, ["voice", "image"])

    def test_two_card_consumer_waits_for_both(self) -> None:
        """llm on cards 0 and 1 takes card 0 while image runs on card 1, waits for card 1,
        and starts (prepared once, counted once) when image ends."""
        image = self.job("image")
        self.cards.run("image", image)
        llm = self.job("llm")
        done = self.cards.run("llm", llm)
        self.assertEqual(self.started, ["image"])
        self.assertEqual(self.holders(), ["llm", "image", None])
        self.assertEqual((self.cards.running, self.cards.queued), (1, 1))
        self.assertEqual(self.registry["llm"].queued, 1)
        image.finish()
        self.assertEqual(self.started, ["image", "llm"])
        self.assertEqual(self.holders(), ["llm", "llm", None])
        self.assertEqual((self.cards.running, self.registry["llm"].in_flight), (1, 1))
        self.assertEqual(self.prepared, ["image", "llm"])
        llm.finish()
        self.assertEqual(self.successResultOf(done), "llm")
        self.assertEqual(self.holders(), [None, None, None])
        self.assertEqual((self.registry["llm"].in_flight, self.cards.stats.completed), (0, 2))

    def test_priority_cannot_make_a_cycle(self) -> None:
        """wide (cards 0-2) waits for card 0; llm (cards 0-1) of higher priority arrives
        and is served first. Had wide taken cards 1 and 2 while waiting, llm would now
        wait for card 1 while holding card 0: a cycle. Taken in index order, both run."""
        _, self.cards = schedulers(self.clock, priorities={"llm": 4, "wide": 0})
        voice = self.job("voice")
        self.cards.run("voice", voice)
        wide, llm = self.job("wide"), self.job("llm")
        done = [self.cards.run("wide", wide), self.cards.run("llm", llm)]
        voice.finish()
        self.assertEqual(self.started, ["voice", "llm"])
        llm.finish()
        wide.finish()
        self.assertEqual([self.successResultOf(d) for d in done], ["wide", "llm"])

    def test_cards_held_until_the_work_held_ends(self) -> None:
        """Work the job holds the lease for (``hold_until``) keeps every card of the
        consumer, not only the last one."""
        held: Deferred[None] = Deferred()

        def job(lease: Lease) -> Deferred[str]:
            lease.hold_until(held)
            return succeed("answered")

        self.assertEqual(self.successResultOf(self.cards.run("llm", job)), "answered")
        self.assertEqual(self.holders(), ["llm", "llm", None])
        voice = self.job("voice")
        self.cards.run("voice", voice)
        self.assertEqual(self.started, [])
        held.callback(None)
        self.assertEqual(self.started, ["voice"])

    def test_leaving_while_waiting_frees_the_cards_taken(self) -> None:
        """A client that leaves while its request waits for the second card leaves that
        queue and gives back the first card at once."""
        image = self.job("image")
        self.cards.run("image", image)
        waiting = self.cards.run("llm", self.job("llm"))
        voice = self.job("voice")
        self.cards.run("voice", voice)
        self.assertEqual(self.started, ["image"])
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.started, ["image", "voice"])
        self.assertEqual((self.cards.queued, self.registry["llm"].queued), (0, 0))
        image.finish()
        self.assertEqual(self.started, ["image", "voice"])

    def test_refused_on_a_later_card_frees_the_earlier(self) -> None:
        """queue_full on the second card fails the request and frees the first card."""
        _, self.cards = schedulers(self.clock, SchedulerConfig(max_queue=1))
        self.cards.run("image", self.job("image"))
        self.cards.run("image", self.job("image"))  # card 1's queue is now full
        refused = self.cards.run("llm", self.job("llm"))
        self.assertEqual(self.failureResultOf(refused, BrokerError).value.code, "queue_full")
        self.assertEqual(self.cards.lanes[0].holder, None)

    def test_timed_out_on_a_later_card_frees_the_earlier(self) -> None:
        """A request that waits past queue_timeout_s for its second card fails with
        queue_timeout, and its first card goes to the next request."""
        _, self.cards = schedulers(self.clock, SchedulerConfig(queue_timeout_s=5))
        self.cards.run("image", self.job("image"))
        waiting = self.cards.run("llm", self.job("llm"))
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(waiting, BrokerError).value.code, "queue_timeout")
        self.assertIsNone(self.cards.lanes[0].holder)

    def test_queue_timeout_bounds_the_whole_wait(self) -> None:
        """queue_timeout_s bounds a two-card request's whole wait, not each card's: 3 s for
        card 0 and the 2 s left for card 1 make 5, then queue_timeout."""
        _, self.cards = schedulers(self.clock, SchedulerConfig(queue_timeout_s=5))
        voice = self.job("voice")
        self.cards.run("voice", voice)
        self.cards.run("image", self.job("image"))
        waiting = self.cards.run("llm", self.job("llm"))
        self.clock.advance(3)
        voice.finish()  # card 0 is llm's now; card 1 stays busy
        self.assertEqual(self.cards.lanes[0].holder, "llm")
        self.clock.advance(1.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.1)
        self.assertEqual(self.failureResultOf(waiting, BrokerError).value.code, "queue_timeout")
        self.assertIsNone(self.cards.lanes[0].holder)

    def test_leaving_during_preparation_keeps_every_card(self) -> None:
        """A client that leaves while its two-card consumer is being prepared (room on both
        cards, then the load) does not stop that preparation: both cards stay leased until
        it ends, so no other consumer prepares on card 0 meanwhile."""
        preparing: dict[str, Deferred[None]] = {}

        def prepare(name: str) -> Deferred[None]:
            preparing[name] = Deferred()
            return preparing[name]

        registry = Registry({n: on_cards(n, c) for n, c in CARDS.items()}, self.clock)
        stats = SchedulerStats()
        lanes = {
            card: GpuScheduler(registry, self.clock, None, prepare, stats) for card in range(3)
        }
        self.cards = CardSchedulers(registry, lanes, self.clock)
        leaving = self.cards.run("llm", self.job("llm"))
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.cards.run("voice", self.job("voice"))
        self.assertEqual(self.holders(), ["llm", "llm", None])
        self.assertNotIn("voice", preparing)
        preparing["llm"].callback(None)
        self.assertEqual(self.holders(), ["voice", None, None])
        self.assertIn("voice", preparing)

    def test_arrival_kept_on_later_cards(self) -> None:
        """Under fifo, llm (arrived first, waiting for card 0) goes before image (arrived
        later, waiting for card 1) once both cards free: its arrival counts on every card."""
        _, self.cards = schedulers(self.clock, SchedulerConfig(policy="fifo"))
        voice, image = self.job("voice"), self.job("image")
        self.cards.run("voice", voice)
        self.cards.run("image", image)
        self.clock.advance(1)
        self.cards.run("llm", self.job("llm"))
        self.clock.advance(1)
        self.cards.run("image", self.job("image again"))
        self.clock.advance(1)
        voice.finish()
        image.finish()
        self.assertEqual(self.started, ["voice", "image", "llm"])

    def test_refusals_on_any_card_counted(self) -> None:
        """A two-card request timed out on its first card or on its last is a rejection
        (counted, published) like any other, and never counted completed or failed."""
        _, self.cards = schedulers(self.clock, SchedulerConfig(queue_timeout_s=5))
        voice = self.job("voice")
        self.cards.run("voice", voice)
        on_first = self.cards.run("llm", self.job("llm"))
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(on_first, BrokerError).value.code, "queue_timeout")
        voice.finish()
        self.cards.run("image", self.job("image"))
        on_last = self.cards.run("llm", self.job("llm"))
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(on_last, BrokerError).value.code, "queue_timeout")
        stats = self.cards.stats
        self.assertEqual((stats.rejected, stats.completed, stats.failed), (2, 1, 0))

    def test_exclusive_work_on_every_card(self) -> None:
        """Exclusive (admin) work of a two-card consumer holds both cards alone."""
        unload = self.job("llm-unload")
        self.cards.run("llm", unload, exclusive=True, prepare=False, count=False)
        self.assertEqual(self.holders(), ["llm", "llm", None])
        self.cards.run("llm", self.job("llm"))
        self.assertEqual(self.started, ["llm-unload"])
        unload.finish()
        self.assertEqual(self.started, ["llm-unload", "llm"])

    def test_a_removed_consumer_is_refused(self) -> None:
        refused = self.cards.run("gone", self.job("gone"))
        self.assertEqual(self.failureResultOf(refused, BrokerError).value.code, "no_consumer")

    def test_two_card_consumer_never_lingers(self) -> None:
        """Under affinity with linger_s, a drained two-card lease passes on at once: another
        card's holder could unload the consumer while its lease was kept."""
        config = SchedulerConfig(policy="affinity", linger_s=5)
        self.registry, self.cards = schedulers(self.clock, config)
        self.registry.mark_loaded("llm")
        self.cards.run("llm", lambda lease: succeed("first"))
        self.clock.advance(0.1)  # a burst: the next request of llm would come soon
        second = self.job("llm")
        self.cards.run("llm", second)
        self.cards.run("image", self.job("image"))
        second.finish()
        self.assertEqual(self.started, ["llm", "image"])


@st.composite
def _workloads(draw: st.DrawFn) -> list[tuple[str, str, int]]:
    """Arrivals ("arrive", consumer, 0), finishes ("finish", "", k-th running)
    and client departures ("leave", "", k-th waiting), in any order."""
    steps = st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(sorted(CARDS)), st.just(0)),
        st.tuples(st.just("finish"), st.just(""), st.integers(0, 20)),
        st.tuples(st.just("leave"), st.just(""), st.integers(0, 20)),
        st.tuples(st.just("wait"), st.just(""), st.integers(1, 40)),
        st.tuples(st.just("ready"), st.just(""), st.integers(0, 20)),
        st.tuples(st.just("break"), st.just(""), st.integers(0, 20)),
    )
    return draw(st.lists(steps, max_size=60))


_PRIORITIES = st.fixed_dictionaries({name: st.integers(0, 4) for name in CARDS})


class CardSchedulersProperties(SynchronousTestCase):
    @settings(max_examples=examples(1000), deadline=None)
    @given(
        _workloads(),
        _PRIORITIES,
        st.sampled_from(["fifo", "affinity"]),
        st.frozensets(st.sampled_from(sorted(CARDS))),
    )
    def test_no_card_shared_and_no_deadlock(
        self,
        workload: list[tuple[str, str, int]],
        priorities: dict[str, int],
        policy: str,
        refusing: frozenset[str],
    ) -> None:
        """Whatever the arrival order, priorities and departures, with preparations that
        take their time, consumers that refuse to load (``refusing``) and jobs that fail:
        no card ever runs two consumers' jobs at once, a job runs only holding all its
        consumer's cards, and once arrivals stop, finishing what runs drains every queue
        (no deadlock, nobody left behind, every count back to zero)."""
        clock = Clock()
        config = SchedulerConfig(policy=policy, aging_s=10, max_skip_s=15, queue_timeout_s=1e9)
        preparing: list[tuple[str, Deferred[None]]] = []
        running: list[tuple[str, Deferred[str]]] = []

        def prepare(name: str) -> Deferred[None]:
            # Room is made on a card by one preparation at a time, never beside a job.
            busy = {c for other, _ in preparing + running for c in CARDS[other]}
            self.assertEqual(busy & set(CARDS[name]), set(), (name, preparing, running))
            d: Deferred[None] = Deferred()
            preparing.append((name, d))
            return d

        def ready(k: int) -> None:
            name, d = preparing.pop(k % len(preparing))
            if name in refusing:
                d.errback(BrokerError("scheduler_error", f"{name} would not load", name))
            else:
                d.callback(None)

        registry, cards = schedulers(clock, config, priorities=priorities, prepare_with=prepare)
        waiting: list[Deferred[str]] = []

        def job_for(name: str) -> object:
            def job(lease: Lease) -> Deferred[str]:
                busy = {c for other, _ in preparing + running for c in CARDS[other]}
                self.assertEqual(busy & set(CARDS[name]), set(), (name, running))
                for card in CARDS[name]:
                    self.assertEqual(cards.lanes[card].holder, name)
                gate: Deferred[str] = Deferred(lambda d: running.remove((name, d)))
                running.append((name, gate))
                return gate

            return job

        for kind, name, k in workload:
            if kind == "arrive":
                waiting.append(cards.run(name, job_for(name)))  # type: ignore[arg-type]
            elif kind == "finish" and running:
                running.pop(k % len(running))[1].callback("done")
            elif kind == "leave" and waiting:
                left = waiting.pop(k % len(waiting))
                left.cancel()
                left.addErrback(lambda f: f.trap(CancelledError, BrokerError))
            elif kind == "wait":
                clock.advance(k)
            elif kind == "ready" and preparing:
                ready(k)
            elif kind == "break" and running:
                running.pop(k % len(running))[1].errback(BrokerError("bad_answer", "garbage"))
        for _ in range(10 * len(workload) + 10):
            while preparing:
                ready(0)
            if running:
                running.pop(0)[1].callback("done")
            clock.advance(1)
        self.assertEqual((running, preparing), ([], []))
        for d in waiting:
            self.assertTrue(d.called)
            d.addErrback(lambda f: f.trap(CancelledError, BrokerError))
        self.assertEqual([cards.lanes[c].holder for c in range(3)], [None, None, None])
        self.assertEqual((cards.queued, cards.running), (0, 0))
        counts = {(s.in_flight, s.queued) for s in registry.states.values()}
        self.assertEqual(counts, {(0, 0)})
