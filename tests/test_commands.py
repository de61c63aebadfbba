"""Load and unload commands, and ``stopped_when_unloaded`` (SPEC 9.6): the configuration,
``ConsumerControl`` running them through a fake runner, the registry and the health gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent

from mgpu.config import CommandRoute, ConfigError, Route
from mgpu.control import HEALTH_POLL_S, STDERR_TAIL, ConsumerControl, ProbeResult, stderr_tail
from mgpu.errors import BrokerError
from mgpu.gpu import SmiResult, SmiTimeout
from mgpu.registry import Registry
from tests.fuzz import examples
from tests.test_config import consumer as consumer_spec
from tests.test_config import parse
from tests.test_control import FakeConsumer, _Bytes, as_clock
from tests.test_control import consumer as consumer_config
from tests.test_facade import MVOICE, Broker, FacadeTestCase, make_config
from tests.test_registry import REFUSED, clock_at, configs

START = ["systemctl", "start", "whisper.service"]


def parsed(**fields: Any) -> Any:
    """The consumer ``a`` of a document whose consumer has ``fields``."""
    return parse({"consumers": {"a": consumer_spec(**fields)}}).consumers["a"]


def refused(test: SynchronousTestCase, field: str, **fields: Any) -> str:
    """The reason the document is refused, asserting it names ``field``."""
    with test.assertRaises(ConfigError) as caught:
        parsed(**fields)
    test.assertEqual(caught.exception.field, field)
    return caught.exception.reason


class CommandConfigTests(SynchronousTestCase):
    """``load`` / ``unload`` as ``{command, timeout_s}``, and ``stopped_when_unloaded``."""

    def test_command_route(self) -> None:
        """A command is kept as given, argument by argument; its timeout defaults to 60 s."""
        a = parsed(load={"command": START}, unload={"command": ["/bin/stop", "x"], "timeout_s": 5})
        self.assertEqual(a.load, CommandRoute(tuple(START), 60.0))
        self.assertEqual(a.unload, CommandRoute(("/bin/stop", "x"), 5.0))
        self.assertFalse(a.stopped_when_unloaded)

    def test_http_route_unchanged(self) -> None:
        """Without ``command`` a load is still an HTTP call."""
        self.assertEqual(parsed(load={"path": "/load"}).load, Route("POST", "/load"))

    def test_mixing_refused(self) -> None:
        """``command`` with ``method``, ``path`` or ``body`` is refused, naming the key."""
        for key, value in (("path", "/x"), ("method", "POST"), ("body", {})):
            reason = refused(self, f"consumers.a.load.{key}", load={"command": START, key: value})
            self.assertIn("not both", reason)

    def test_bad_commands_refused(self) -> None:
        """An empty list, a string (a shell line), a non-string or empty argument, a control
        character, and a timeout that is not positive are each refused by field."""
        for command, field in (
            ([], "consumers.a.unload.command"),
            ("systemctl stop x", "consumers.a.unload.command"),
            (None, "consumers.a.unload.command"),
            (["systemctl", 3], "consumers.a.unload.command[1]"),
            (["systemctl", ""], "consumers.a.unload.command[1]"),
            (["stop\nrm"], "consumers.a.unload.command[0]"),
        ):
            refused(self, field, unload={"command": command})
        for timeout in (0, -1, "5", float("inf")):
            refused(
                self,
                "consumers.a.unload.timeout_s",
                unload={"command": START, "timeout_s": timeout},
            )
        refused(self, "consumers.a.unload.shell", unload={"command": START, "shell": True})

    def test_stopped_when_unloaded(self) -> None:
        """``stopped_when_unloaded`` is a boolean that needs a load to start the service."""
        self.assertTrue(
            parsed(load={"command": START}, stopped_when_unloaded=True).stopped_when_unloaded
        )
        reason = refused(self, "consumers.a.stopped_when_unloaded", stopped_when_unloaded=True)
        self.assertIn("needs a load", reason)
        refused(self, "consumers.a.stopped_when_unloaded", load={"command": START},
                stopped_when_unloaded="yes")  # fmt: skip

    @settings(max_examples=examples(100), deadline=None)
    @given(st.lists(st.text(min_size=1), min_size=1, max_size=6))
    def test_any_argv(self, argv: list[str]) -> None:
        """Any list of strings is kept exactly, or refused naming the first bad argument."""
        bad = [i for i, arg in enumerate(argv) if not arg.isprintable()]
        if not bad:
            self.assertEqual(parsed(load={"command": argv}).load, CommandRoute(tuple(argv), 60.0))
            return
        with self.assertRaises(ConfigError) as caught:
            parsed(load={"command": argv})
        self.assertEqual(caught.exception.field, f"consumers.a.load.command[{bad[0]}]")
        self.assertNotIn("\n", str(caught.exception))


class FakeRunner:
    """A ``CommandRunner`` whose every run waits for the test to end it."""

    def __init__(self) -> None:
        self.runs: list[tuple[tuple[str, ...], float, Deferred[SmiResult]]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float) -> Deferred[SmiResult]:
        d: Deferred[SmiResult] = Deferred()
        self.runs.append((tuple(argv), timeout_s, d))
        return d

    def end(self, code: int, stderr: bytes = b"") -> None:
        self.runs[-1][2].callback((b"", stderr, code))


class CommandCase(SynchronousTestCase):
    """A ConsumerControl over an in-memory consumer, a Clock and a ``FakeRunner``."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeConsumer({})
        http = HTTPClient(
            cast(IAgent, RequestTraversalAgent(self.fake)), data_to_body_producer=cast(Any, _Bytes)
        )
        self.runner = FakeRunner()
        self.control = ConsumerControl(http, as_clock(self.clock), self.runner)
        self.target = consumer_config(
            load=CommandRoute(tuple(START), 7.0), unload=CommandRoute(("stop-it", "--now"), 3.0)
        )

    def error(self, d: Deferred[None]) -> BrokerError:
        error = self.failureResultOf(d, BrokerError).value
        assert isinstance(error, BrokerError)
        self.assertEqual((error.code, error.consumer), ("scheduler_error", "mvoice"))
        return error


class CommandControlTests(CommandCase):
    """``ConsumerControl.load`` / ``unload`` with a command route."""

    def test_argv_passed_exactly(self) -> None:
        """The runner gets the argv and the timeout as configured; exit 0 is done, no HTTP."""
        d = self.control.load(self.target)
        self.assertEqual([(a, t) for a, t, _ in self.runner.runs], [(tuple(START), 7.0)])
        self.assertNoResult(d)
        self.runner.end(0, b"some noise")
        self.assertIsNone(self.successResultOf(d))
        u = self.control.unload(self.target)
        self.assertEqual(self.runner.runs[-1][:2], (("stop-it", "--now"), 3.0))
        self.runner.end(0)
        self.successResultOf(u)
        self.assertEqual(self.fake.received, [])

    def test_non_zero_exit(self) -> None:
        """A non-zero exit names the program, the code and the stderr's end."""
        d = self.control.unload(self.target)
        self.runner.end(5, b"Failed to stop x.service: Access denied\n")
        self.assertEqual(
            self.error(d).message,
            "unload of mvoice failed: stop-it exited with code 5: "
            "Failed to stop x.service: Access denied",
        )

    def test_killed_by_signal(self) -> None:
        d = self.control.load(self.target)
        self.runner.end(-9)
        self.assertEqual(
            self.error(d).message, "load of mvoice failed: systemctl was killed by signal 9"
        )

    def test_timeout(self) -> None:
        """A timed-out command (the runner killed and reaped it) is a scheduler_error."""
        d = self.control.load(self.target)
        self.runner.runs[-1][2].errback(SmiTimeout("did not answer within 7s (killed)"))
        self.assertEqual(
            self.error(d).message,
            "load of mvoice failed: systemctl timed out after 7 s and was killed",
        )

    def test_not_found(self) -> None:
        control = ConsumerControl(
            cast(HTTPClient, None),
            as_clock(self.clock),
            lambda argv, t: fail(FileNotFoundError("'nope' not found or not executable")),
        )
        message = self.error(control.unload(self.target)).message
        self.assertIn("stop-it could not be started: FileNotFoundError", message)

    def test_stderr_tail(self) -> None:
        """Only the last bytes of stderr are kept, printable, on one line."""
        d = self.control.unload(self.target)
        self.runner.end(1, b"x" * 5000 + b"\x1b[31mred\x00\r\nend\t")
        message = self.error(d).message
        self.assertTrue(message.endswith("[31mred end"), message)
        self.assertTrue(message.isprintable())
        self.assertLess(len(message), STDERR_TAIL + 100)

    @settings(max_examples=examples(200), deadline=None)
    @given(st.binary(max_size=2000))
    def test_any_stderr_is_one_printable_line(self, stderr: bytes) -> None:
        tail = stderr_tail(stderr)
        self.assertTrue(tail.isprintable())
        self.assertLessEqual(len(tail), STDERR_TAIL)


class StoppedLoadTests(CommandCase):
    """A ``stopped_when_unloaded`` consumer's load waits for its health to answer."""

    def setUp(self) -> None:
        super().setUp()
        self.target = evolve(self.target, stopped_when_unloaded=True)

    def health_answers(self) -> int:
        return sum(1 for method, path, _, _ in self.fake.received if path == b"/health")

    def test_waits_for_health(self) -> None:
        """After the command, health is polled every 0.2 s; the load is done at its first 2xx."""
        self.fake.answers[(b"GET", b"/health")] = (503, b"starting")
        d = self.control.load(self.target)
        self.runner.end(0)
        self.assertEqual(self.health_answers(), 1)
        self.clock.advance(HEALTH_POLL_S)
        self.clock.advance(HEALTH_POLL_S)
        self.assertEqual(self.health_answers(), 3)
        self.assertNoResult(d)
        self.fake.answers[(b"GET", b"/health")] = (200, b"{}")
        self.clock.advance(HEALTH_POLL_S)
        self.successResultOf(d)
        self.assertEqual(self.health_answers(), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_health_never_answers(self) -> None:
        """Health that never answers 2xx within the load's timeout fails the load."""
        d = self.control.load(self.target)  # /health answers 404
        self.runner.end(0)
        self.clock.pump([HEALTH_POLL_S] * 40)
        error = self.error(d)
        self.assertEqual(
            error.message,
            "load of mvoice failed: its health route did not answer 2xx within 7 s of the load: "
            "GET http://consumer:8765/health: HTTP 404",
        )
        self.assertEqual(self.health_answers(), 35)  # 7 s / 0.2 s

    def test_failed_command_polls_nothing(self) -> None:
        d = self.control.load(self.target)
        self.runner.end(1)
        self.failureResultOf(d, BrokerError)
        self.assertEqual(self.health_answers(), 0)

    def test_http_load_waits_up_to_consumer_timeout(self) -> None:
        """With an HTTP load route the wait is bounded by the consumer's ``timeout_s``."""
        self.fake.answers[(b"POST", b"/load")] = (200, b"{}")
        target = evolve(self.target, load=Route("POST", "/load"), timeout_s=1.0)
        d = self.control.load(target)
        self.clock.pump([HEALTH_POLL_S] * 10)
        self.assertIn("within 1 s", self.failureResultOf(d, BrokerError).value.message)


class StoppedRegistryTests(SynchronousTestCase):
    """A failing probe of a ``stopped_when_unloaded`` consumer means unloaded, not unhealthy."""

    def setUp(self) -> None:
        self.clock = clock_at()
        consumers = configs("whisper", "other")
        consumers["whisper"] = evolve(
            consumers["whisper"], load=CommandRoute(tuple(START), 60.0), stopped_when_unloaded=True
        )
        self.registry = Registry(consumers, as_clock(self.clock))

    def test_failed_probe_is_stopped(self) -> None:
        state = self.registry["whisper"]
        self.registry.record_probe("whisper", state.generation, REFUSED)
        self.assertEqual((state.healthy, state.loaded), (True, False))
        self.assertEqual(state.last_error, "stopped (stopped_when_unloaded): connection refused")
        self.assertIsNotNone(state.last_probe)
        # Without the option the same probe is unhealthy.
        other = self.registry["other"]
        self.registry.record_probe("other", other.generation, REFUSED)
        self.assertEqual((other.healthy, other.loaded), (False, None))

    def test_stale_failed_probe_cannot_undo_load(self) -> None:
        state = self.registry["whisper"]
        sent = state.generation
        self.registry.mark_loaded("whisper")
        self.registry.record_probe("whisper", sent, REFUSED)
        self.assertEqual((state.healthy, state.loaded), (True, True))

    def test_healthy_again_is_loaded(self) -> None:
        state = self.registry["whisper"]
        self.registry.record_probe("whisper", state.generation, REFUSED)
        self.registry.mark_loaded("whisper")
        self.registry.record_probe("whisper", state.generation, ProbeResult(True, None, None))
        self.assertEqual((state.healthy, state.loaded, state.last_error), (True, True, None))

    def test_unreachable_is_unloaded(self) -> None:
        """A request that finds it gone marks it unloaded; it stays schedulable."""
        self.registry.mark_loaded("whisper")
        self.registry.mark_unreachable("whisper", "connection refused")
        state = self.registry["whisper"]
        self.assertEqual((state.healthy, state.loaded), (None, False))
        self.assertIn("stopped", state.last_error or "")
        entry = self.registry.to_json()["whisper"]
        self.assertEqual((entry["loaded"], entry["healthy"] is False), (False, False))


class StoppedGateTests(FacadeTestCase):
    """The facade's health gate lets a stopped consumer's request through to be scheduled."""

    def make_broker(self) -> Broker:
        mvoice = evolve(MVOICE, load=CommandRoute(tuple(START), 60.0), stopped_when_unloaded=True)
        config = make_config()
        consumers = dict(config.consumers)
        consumers["mvoice"] = mvoice
        return Broker(evolve(config, consumers=consumers))

    def test_stopped_is_not_refused(self) -> None:
        self.mvoice.answer(b"GET", b"/api/health", 503, b"stopped")
        self.successResultOf(self.broker.prober.probe("mvoice"))
        state = self.registry["mvoice"]
        self.assertEqual((state.healthy, state.loaded), (True, False))
        self.broker.post("tts")
        self.assertEqual(self.mvoice.uris(b"POST"), [b"/api/synthesize"])
        self.assertEqual(self.scheduler.stats.rejected, 0)
