"""Per-card leases: all-or-nothing grants in strict order per card, checked against a
per-card queue model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.trial.unittest import SynchronousTestCase

from mgpu.cards import CardLeases
from tests.fuzz import examples


class CardLeasesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.leases: CardLeases[str] = CardLeases(devices=[0, 1, 2])

    def ask(self, rid: str, *cards: int, key: int = 0) -> list[str]:
        self.leases.request(rid, frozenset(cards), key)
        return self.leases.grants()

    def test_different_cards_run_at_once(self) -> None:
        """Two consumers on different cards are both granted at once."""
        self.assertEqual(self.ask("comfy", 1), ["comfy"])
        self.assertEqual(self.ask("whisper", 0), ["whisper"])
        self.assertEqual((self.leases.holder(0), self.leases.holder(1)), ("whisper", "comfy"))
        self.assertIsNone(self.leases.holder(2))

    def test_two_cards_wait_for_both_and_reserve_them(self) -> None:
        """A request on {0, 1} waits while card 0 is busy, keeps card 1 from later requests,
        leaves card 2 alone, and gets both cards in one grant."""
        self.assertEqual(self.ask("a", 0), ["a"])
        self.assertEqual(self.ask("vllm", 0, 1), [])
        self.assertIsNone(self.leases.holder(1))  # no partial holding
        self.assertEqual(self.ask("b", 1), [])  # card 1 is free but reserved for vllm
        self.assertEqual(self.ask("c", 2), ["c"])  # a card nobody ahead waits for
        self.assertEqual(self.leases.waiting(1), ["vllm", "b"])
        self.leases.release("a")
        self.assertEqual(self.leases.grants(), ["vllm"])
        self.assertEqual((self.leases.holder(0), self.leases.holder(1)), ("vllm", "vllm"))
        self.leases.release("vllm")
        self.assertEqual(self.leases.grants(), ["b"])

    def test_smaller_key_goes_first_then_arrival(self) -> None:
        """On a busy card, the smaller order_key starts first; equal keys in arrival order."""
        self.ask("run", 0)
        self.ask("late", 0, key=5)
        self.ask("first", 0, key=1)
        self.ask("second", 0, key=1)
        self.assertEqual(self.leases.waiting(0), ["first", "second", "late"])

    def test_cancel_waiting_lifts_its_reservation(self) -> None:
        """Cancelling the reserving request lets the later one on the freed card start."""
        self.ask("a", 0)
        self.ask("vllm", 0, 1)
        self.ask("b", 1)
        self.leases.cancel("vllm")
        self.assertEqual(self.leases.grants(), ["b"])
        self.assertEqual(self.leases.waiting(0), [])
        self.leases.cancel("nobody")  # unknown: no-op

    def test_cancel_racing_a_grant(self) -> None:
        """A cancel after the grant but before grants() frees its cards and withdraws it."""
        self.ask("a", 0, 1)
        self.leases.request("b", frozenset({1}), 0)
        self.leases.release("a")
        self.leases.cancel("b")
        self.assertEqual(self.leases.grants(), [])
        self.assertIsNone(self.leases.holder(1))

    def test_release_frees_all_cards(self) -> None:
        """release() of a holder frees every card; of a waiting or unknown one, it's an error."""
        self.ask("vllm", 0, 1)
        self.ask("w", 1)
        self.assertRaises(KeyError, self.leases.release, "w")
        self.assertRaises(KeyError, self.leases.release, "nobody")
        self.leases.release("vllm")
        self.assertEqual(self.leases.grants(), ["w"])
        self.assertIsNone(self.leases.holder(0))

    def test_bad_requests(self) -> None:
        """No cards, unknown cards and a reused id are refused."""
        self.ask("a", 0)
        self.assertRaises(ValueError, self.leases.request, "a", frozenset({1}), 0)
        self.assertRaises(ValueError, self.leases.request, "b", frozenset(), 0)
        self.assertRaises(ValueError, self.leases.request, "c", frozenset({3}), 0)


class _Model:
    """The rule as stated: a card serves its waiting requests in rank order; a request
    starts when every card it needs is free and it is first on each."""

    def __init__(self) -> None:
        self.waiting: dict[int, tuple[frozenset[int], tuple[int, int]]] = {}
        self.held: dict[int, int] = {}

    def startable(self) -> set[int]:
        def first(card: int) -> int | None:
            on_card = [(rank, rid) for rid, (cards, rank) in self.waiting.items() if card in cards]
            return min(on_card)[1] if on_card else None

        return {
            rid
            for rid, (cards, _) in self.waiting.items()
            if all(c not in self.held and first(c) == rid for c in cards)
        }


class LeasesAgreeWithTheModel(RuleBasedStateMachine):
    """Random requests, cancels and releases on 1-4 cards: the grants are the model's, no
    card is held twice, something runs whenever something waits, nobody ranking after a
    waiting request is granted one of its cards, and releasing repeatedly drains all."""

    @initialize(cards=st.integers(1, 4))
    def start(self, cards: int) -> None:
        self.devices = list(range(cards))
        self.leases: CardLeases[int] = CardLeases(devices=self.devices)
        self.model = _Model()
        self.running: dict[int, frozenset[int]] = {}
        self.count = 0

    def settle(self) -> None:
        """Take the grants; check them against the model and the no-overtaking bound."""
        expected = self.model.startable()
        granted = self.leases.grants()
        assert set(granted) == expected, (granted, expected)
        assert len(granted) == len(set(granted))
        for rid in granted:
            cards, rank = self.model.waiting.pop(rid)
            for other, (other_cards, other_rank) in self.model.waiting.items():
                if cards & other_cards:  # overtaking a waiting request on a shared card
                    assert rank < other_rank, (rid, other)
            for card in cards:
                self.model.held[card] = rid
            self.running[rid] = cards

    @rule(data=st.data(), key=st.integers(0, 3))
    def request(self, data: st.DataObject, key: int) -> None:
        cards = data.draw(st.sets(st.sampled_from(self.devices), min_size=1).map(frozenset))
        self.count += 1
        self.leases.request(self.count, cards, key)
        self.model.waiting[self.count] = (cards, (key, self.count))
        self.settle()

    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        waiting = sorted(self.model.waiting)
        if waiting:
            rid = waiting[pick % len(waiting)]
            self.leases.cancel(rid)
            del self.model.waiting[rid]
            self.settle()

    @rule(pick=st.integers(0, 10**6))
    def release(self, pick: int) -> None:
        running = sorted(self.running)
        if running:
            self.end(running[pick % len(running)])
            self.settle()

    @rule()
    def drain(self) -> None:
        """With no more arrivals, releasing everything running, round after round, grants
        every waiting request within as many rounds as there are waiting requests."""
        rounds = len(self.model.waiting)
        for _ in range(rounds):
            for rid in sorted(self.running):
                self.end(rid)
            self.settle()
        assert not self.model.waiting, self.model.waiting

    def end(self, rid: int) -> None:
        self.leases.release(rid)
        for card in self.running.pop(rid):
            del self.model.held[card]

    @invariant()
    def safe(self) -> None:
        """Each card has at most one holder, and a running request holds all its cards."""
        seen: set[int] = set()
        for rid, cards in self.running.items():
            assert not cards & seen
            seen |= cards
            assert all(self.leases.holder(c) == rid for c in cards)
        assert all(self.leases.holder(c) is None for c in set(self.devices) - seen)

    @invariant()
    def no_deadlock(self) -> None:
        """Whenever something waits, something runs."""
        assert self.running or not self.model.waiting

    @invariant()
    def status_agrees(self) -> None:
        for card in self.devices:
            on_card = sorted(
                (rank, rid) for rid, (cards, rank) in self.model.waiting.items() if card in cards
            )
            assert self.leases.waiting(card) == [rid for _, rid in on_card]


LeasesAgreeWithTheModel.TestCase.settings = settings(
    max_examples=examples(200), stateful_step_count=40, deadline=None
)


class RandomLeasesTests(LeasesAgreeWithTheModel.TestCase):  # type: ignore[valid-type,misc]
    def test_leases_agree_with_the_model(self) -> None:
        """Safety, no deadlock, no overtaking and draining hold whatever happens (see
        LeasesAgreeWithTheModel)."""
        self.runTest()


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.integers(0, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 10**6)),
        st.tuples(st.just("release"), st.just(0)),
    ),
    max_size=40,
)


class OneCardIsOneQueue(SynchronousTestCase):
    @settings(max_examples=examples(200), deadline=None)
    @given(_OPS)
    def test_grants_follow_order_key(self, ops: list[tuple[str, int]]) -> None:
        """With one card, grants come in exactly the order a single queue ordered by
        (order_key, arrival) gives: the smallest waiting one starts when the card frees."""
        leases: CardLeases[int] = CardLeases(devices=[0])
        queue: list[tuple[int, int]] = []
        running: int | None = None
        for n, (op, arg) in enumerate(ops):
            if op == "request":
                leases.request(n, frozenset({0}), arg)
                queue.append((arg, n))
            elif op == "cancel" and queue:
                rank = queue.pop(arg % len(queue))
                leases.cancel(rank[1])
            elif op == "release" and running is not None:
                leases.release(running)
                running = None
            expected = []
            if running is None and queue:
                queue.sort()
                running = queue.pop(0)[1]
                expected = [running]
            self.assertEqual(leases.grants(), expected)
            self.assertEqual(leases.holder(0), running)
