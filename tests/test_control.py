"""Tests for mgpu.control: probes, load, unload and JSON polls against in-memory consumers."""

from __future__ import annotations

import errno
import json
from typing import Any, cast

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpu.config import ConsumerConfig, KindPath, Route
from mgpu.control import JSON_BODY_LIMIT, PROBE_BODY_LIMIT, ConsumerControl, ProbeResult
from mgpu.errors import BrokerError


class _Bytes:
    """A body producer that writes everything at once (treq's default needs the reactor).

    Duck-typed IBodyProducer: neither treq nor Agent checks ``providedBy``.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeConsumer(Resource):
    """An in-memory consumer: fixed answers by (method, path), every request recorded."""

    isLeaf = True

    def __init__(self, answers: dict[tuple[bytes, bytes], tuple[int, bytes]]) -> None:
        super().__init__()
        self.answers = answers
        self.hang_paths = {b"/hang"}
        """Paths that never answer, whatever the method."""
        self.received: list[tuple[bytes, bytes, bytes | None, bytes]] = []
        self.hanging: list[Request] = []
        self.lost: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.path is not None
        assert request.content is not None
        self.received.append(
            (
                request.method,
                request.path,
                request.getHeader(b"content-type"),
                request.content.read(),
            )
        )
        if request.path in self.hang_paths:
            return self._hang(request)
        if (request.method, request.path) == (b"GET", b"/half"):
            request.setHeader(b"content-length", b"1000")
            request.write(b'{"loaded": ')
            return self._hang(request)
        code, body = self.answers.get((request.method, request.path), (404, b"not found"))
        request.setResponseCode(code)
        return body

    def _hang(self, request: Request) -> int:
        self.hanging.append(request)
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        return NOT_DONE_YET


class _RefusingAgent:
    """An agent whose every request fails as a closed port does (a duck-typed IAgent)."""

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        return fail(ConnectionRefusedError())


class _ExhaustedAgent:
    """An agent whose daemon is out of file descriptors: the socket cannot be made."""

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        return fail(ConnectBindError(errno.EMFILE, "Too many open files"))


def refusing_client() -> HTTPClient:
    """A treq client whose every connection is refused."""
    return HTTPClient(cast(IAgent, _RefusingAgent()))


def as_clock(clock: Clock) -> IReactorTime:
    """Clock typed as the IReactorTime it provides (mypy has no zope plugin here)."""
    return cast(IReactorTime, clock)


#: What a failed probe's error starts with: the health route it called (SPEC 6 last_error).
PROBED = "GET http://consumer:8765/health"


def consumer(**overrides: Any) -> ConsumerConfig:
    """A consumer at http://consumer:8765 with a health route at /health."""
    fields: dict[str, Any] = {
        "name": "mvoice",
        "url": "http://consumer:8765",
        "paths": {"tts": KindPath("POST", "/api/synthesize")},
        "vram_resident_mib": 2800,
        "health": Route("GET", "/health"),
        "timeout_s": 30.0,
    }
    fields.update(overrides)
    return ConsumerConfig(**fields)


class ControlTestCase(SynchronousTestCase):
    """Shared set-up: a ConsumerControl over a RequestTraversalAgent and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeConsumer({})
        self.agent = RequestTraversalAgent(self.fake)
        http = HTTPClient(cast(IAgent, self.agent), data_to_body_producer=cast(Any, _Bytes))
        self.control = ConsumerControl(http, as_clock(self.clock))

    def answer(self, method: bytes, path: bytes, code: int, body: bytes) -> None:
        self.fake.answers[(method, path)] = (code, body)


class ProbeTests(ControlTestCase):
    """ConsumerControl.probe."""

    def test_daemon_out_of_descriptors_is_no_verdict(self) -> None:
        """EMFILE on connect says nothing of the consumer: daemon_overloaded, not unhealthy;
        so are a load, an unload and a GET the daemon could not make."""
        control = ConsumerControl(HTTPClient(cast(IAgent, _ExhaustedAgent())), as_clock(Clock()))
        target = consumer(load=Route("POST", "/load"))
        for d in (
            control.probe(target, 3.0),
            control.load(target),
            control.get_json(target, "/history/1", 3.0),
            control.post_json(target, "/api/generate", {"model": "m"}, 3.0),
        ):
            error = self.failureResultOf(d, BrokerError).value
            self.assertEqual((error.code, error.status), ("daemon_overloaded", 503))
            self.assertEqual(error.headers, {"Retry-After": "1"})

    def test_healthy_reporting_loaded(self) -> None:
        """A 200 with a boolean top-level "loaded" is healthy and carries it."""
        self.answer(b"GET", b"/health", 200, b'{"status": "ok", "loaded": false}')
        result = self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertEqual(result, ProbeResult(healthy=True, loaded=False, error=None))

    def test_healthy_without_loaded(self) -> None:
        """A 200 whose JSON has no "loaded" is healthy with loaded None."""
        self.answer(b"GET", b"/health", 200, b'{"version": "0.5.1"}')
        result = self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertEqual(result, ProbeResult(healthy=True, loaded=None, error=None))

    def test_loaded_not_boolean(self) -> None:
        """A "loaded" that is not a boolean is not reported."""
        self.answer(b"GET", b"/health", 200, b'{"loaded": "yes"}')
        result = self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertIsNone(result.loaded)

    def test_non_json_body(self) -> None:
        """A 2xx with a body that is not JSON is healthy, loaded unknown."""
        self.answer(b"GET", b"/health", 204, b"")
        self.answer(b"GET", b"/text", 200, b"\xffOK, not JSON")
        empty = self.successResultOf(self.control.probe(consumer(), 3.0))
        text = self.successResultOf(self.control.probe(consumer(health=Route("GET", "/text")), 3.0))
        self.assertEqual(empty, ProbeResult(healthy=True, loaded=None, error=None))
        self.assertEqual(text, ProbeResult(healthy=True, loaded=None, error=None))

    def test_non_2xx(self) -> None:
        """A 500 is unhealthy, with error "<the probed route>: HTTP 500", even with "loaded"
        in its body."""
        self.answer(b"GET", b"/health", 500, b'{"loaded": true}')
        result = self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertEqual(
            result, ProbeResult(healthy=False, loaded=None, error=f"{PROBED}: HTTP 500")
        )

    def test_configured_method_and_body(self) -> None:
        """The health route's method and JSON body are what the consumer receives."""
        self.answer(b"POST", b"/ping", 200, b"{}")
        route = Route("POST", "/ping", {"deep": True})
        self.successResultOf(self.control.probe(consumer(health=route), 3.0))
        self.assertEqual(
            self.fake.received,
            [(b"POST", b"/ping", b"application/json; charset=UTF-8", b'{"deep":true}')],
        )

    def test_connection_refused(self) -> None:
        """A refused connection is unhealthy with error "connection refused", not an errback."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        result = self.successResultOf(control.probe(consumer(), 3.0))
        self.assertEqual(
            result, ProbeResult(healthy=False, loaded=None, error=f"{PROBED}: connection refused")
        )

    def test_synchronous_raise(self) -> None:
        """A client that raises at once still gives an unhealthy result, not an exception."""

        class Broken(HTTPClient):
            def request(self, *args: Any, **kwargs: Any) -> Any:
                raise ValueError("no such scheme")

        control = ConsumerControl(Broken(cast(IAgent, _RefusingAgent())), as_clock(self.clock))
        result = self.successResultOf(control.probe(consumer(), 3.0))
        self.assertFalse(result.healthy)
        self.assertEqual(result.error, f"{PROBED}: ValueError: no such scheme")

    def test_timeout_waiting_for_headers(self) -> None:
        """A consumer that never answers: at timeout_s the probe reports it and the
        connection is closed."""
        d = self.control.probe(consumer(health=Route("GET", "/hang")), 3.0)
        self.assertNoResult(d)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = self.successResultOf(d)
        self.assertEqual(
            result,
            ProbeResult(
                healthy=False,
                loaded=None,
                error="GET http://consumer:8765/hang: timed out after 3.0 s",
            ),
        )
        self.agent.flush()
        self.assertEqual(self.fake.lost, self.fake.hanging)
        self.assertEqual(len(self.fake.lost), 1)

    def test_timeout_reading_body(self) -> None:
        """The bound covers the body too: a body that stalls times the probe out and
        closes the connection."""
        d = self.control.probe(consumer(health=Route("GET", "/half")), 3.0)
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(3.0)
        result = self.successResultOf(d)
        self.assertEqual(result.error, "GET http://consumer:8765/half: timed out after 3.0 s")
        self.agent.flush()
        self.assertEqual(len(self.fake.lost), 1)

    def test_answer_cancels_timer(self) -> None:
        """A probe that got its answer leaves no timer behind."""
        self.answer(b"GET", b"/health", 200, b"{}")
        self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nested_too_deep(self) -> None:
        """JSON nested deeper than the parser goes is no JSON: healthy, loaded unknown."""
        self.answer(b"GET", b"/health", 200, b"[" * 50_000)
        result = self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertEqual(result, ProbeResult(healthy=True, loaded=None, error=None))

    def test_body_over_limit(self) -> None:
        """Past 64 KiB the body is not read: the status decides, loaded is unknown."""
        body = b'{"loaded": true, "pad": "' + b"x" * PROBE_BODY_LIMIT + b'"}'
        self.answer(b"GET", b"/health", 200, body)
        result = self.successResultOf(self.control.probe(consumer(), 3.0))
        self.assertEqual(result, ProbeResult(healthy=True, loaded=None, error=None))


class LoadUnloadTests(ControlTestCase):
    """ConsumerControl.load and ConsumerControl.unload."""

    def test_load_sends_route(self) -> None:
        """load sends the configured method and path, without a body when none is set."""
        self.answer(b"PUT", b"/api/admin/load", 200, b'{"ok": true}')
        c = consumer(load=Route("PUT", "/api/admin/load"))
        self.assertIsNone(self.successResultOf(self.control.load(c)))
        self.assertEqual(self.fake.received, [(b"PUT", b"/api/admin/load", None, b"")])

    def test_unload_sends_json_body(self) -> None:
        """unload sends the configured method, path and JSON body."""
        self.answer(b"POST", b"/free", 200, b"")
        route = Route("POST", "/free", {"unload_models": True, "free_memory": True})
        c = consumer(name="comfyui", unload=route)
        self.assertIsNone(self.successResultOf(self.control.unload(c)))
        [(method, path, ctype, body)] = self.fake.received
        self.assertEqual(
            (method, path, ctype), (b"POST", b"/free", b"application/json; charset=UTF-8")
        )
        self.assertEqual(json.loads(body), {"unload_models": True, "free_memory": True})

    def test_load_non_2xx(self) -> None:
        """A load answered 500 is a scheduler_error naming the consumer and the status."""
        self.answer(b"POST", b"/load", 500, b"oops")
        f = self.failureResultOf(self.control.load(consumer(load=Route("POST", "/load"))))
        error = f.trap(BrokerError) and f.value
        assert isinstance(error, BrokerError)
        self.assertEqual(
            (error.code, error.consumer, error.message),
            ("scheduler_error", "mvoice", "load of mvoice failed: HTTP 500"),
        )

    def test_unload_non_2xx(self) -> None:
        """An unload answered 404 is a scheduler_error naming the consumer."""
        f = self.failureResultOf(self.control.unload(consumer(unload=Route("POST", "/gone"))))
        f.trap(BrokerError)
        self.assertEqual(f.value.code, "scheduler_error")
        self.assertEqual(f.value.message, "unload of mvoice failed: HTTP 404")

    def test_unload_refused(self) -> None:
        """A refused connection during unload is consumer_unreachable saying so."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        f = self.failureResultOf(control.unload(consumer(unload=Route("POST", "/free"))))
        f.trap(BrokerError)
        self.assertEqual(f.value.code, "consumer_unreachable")
        self.assertEqual(f.value.message, "unload of mvoice failed: connection refused")

    def test_load_refused(self) -> None:
        """A consumer gone during its load is consumer_unreachable (502), not scheduler_error."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        f = self.failureResultOf(control.load(consumer(load=Route("POST", "/load"))))
        f.trap(BrokerError)
        self.assertEqual((f.value.code, f.value.status), ("consumer_unreachable", 502))

    def test_load_timeout(self) -> None:
        """A load that outlasts the consumer's timeout_s is a scheduler_error saying so."""
        c = consumer(load=Route("GET", "/hang"), timeout_s=60)
        d = self.control.load(c)
        self.clock.advance(59)
        self.assertNoResult(d)
        self.clock.advance(1)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(f.value.message, "load of mvoice failed: timed out after 60.0 s")

    def test_unload_without_route(self) -> None:
        """A consumer with no unload route fails at once, nothing sent."""
        f = self.failureResultOf(self.control.unload(consumer()), BrokerError)
        self.assertEqual(f.value.code, "scheduler_error")
        self.assertEqual(f.value.consumer, "mvoice")
        self.assertEqual(self.fake.received, [])


class GetJsonTests(ControlTestCase):
    """ConsumerControl.get_json."""

    def test_status_and_json(self) -> None:
        """get_json GETs url+path and returns the status and the parsed body."""
        self.answer(b"GET", b"/history/abc", 200, b'{"abc": {"status": {}}}')
        result = self.successResultOf(self.control.get_json(consumer(), "/history/abc", 5.0))
        self.assertEqual(result, (200, {"abc": {"status": {}}}))
        self.assertEqual(self.fake.received[0][:2], (b"GET", b"/history/abc"))

    def test_not_json(self) -> None:
        """A body that is not JSON comes back as None with its status."""
        result = self.successResultOf(self.control.get_json(consumer(), "/missing", 5.0))
        self.assertEqual(result, (404, None))

    def test_unreachable(self) -> None:
        """A refused connection is consumer_unreachable."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        f = self.failureResultOf(control.get_json(consumer(), "/history/x", 5.0), BrokerError)
        self.assertEqual((f.value.code, f.value.consumer), ("consumer_unreachable", "mvoice"))
        self.assertIn("connection refused", f.value.message)

    def test_timeout(self) -> None:
        """A poll that outlasts timeout_s is consumer_unreachable saying it timed out."""
        d = self.control.get_json(consumer(), "/hang", 0.5)
        self.clock.advance(0.5)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(f.value.code, "consumer_unreachable")
        self.assertIn("timed out after 0.5 s", f.value.message)

    def test_nested_too_deep(self) -> None:
        """A body nested deeper than the parser goes comes back as None, not an exception."""
        self.answer(b"GET", b"/deep", 200, b'{"a": ' * 50_000)
        self.assertEqual(
            self.successResultOf(self.control.get_json(consumer(), "/deep", 5.0)), (200, None)
        )

    def test_over_limit(self) -> None:
        """An answer past JSON_BODY_LIMIT is consumer_unreachable saying how big it was."""
        self.answer(b"GET", b"/big", 200, b"[" + b" " * JSON_BODY_LIMIT + b"]")
        f = self.failureResultOf(self.control.get_json(consumer(), "/big", 5.0), BrokerError)
        self.assertEqual(f.value.code, "consumer_unreachable")
        self.assertIn("GET /big answered more than 8 MiB", f.value.message)


class PostJsonTests(ControlTestCase):
    """ConsumerControl.post_json."""

    def test_posts_json_and_returns_answer(self) -> None:
        """post_json POSTs the body as JSON to url+path and returns the status and parsed answer."""
        self.answer(b"POST", b"/api/generate", 200, b'{"done": true, "done_reason": "unload"}')
        body = {"model": "llama3.2", "keep_alive": 0}
        d = self.control.post_json(consumer(), "/api/generate", body, 5.0)
        self.assertEqual(self.successResultOf(d), (200, {"done": True, "done_reason": "unload"}))
        [(method, path, ctype, sent)] = self.fake.received
        self.assertEqual(
            (method, path, ctype), (b"POST", b"/api/generate", b"application/json; charset=UTF-8")
        )
        self.assertEqual(json.loads(sent), body)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_error_status_is_returned(self) -> None:
        """A non-2xx answer is no failure: its status and parsed body come back to the caller."""
        self.answer(b"POST", b"/api/generate", 404, b'{"error": "model not found"}')
        d = self.control.post_json(consumer(), "/api/generate", {"model": "x"}, 5.0)
        self.assertEqual(self.successResultOf(d), (404, {"error": "model not found"}))

    def test_not_json(self) -> None:
        """A body that is not JSON (ComfyUI's empty 200) comes back as None with its status."""
        self.answer(b"POST", b"/free", 200, b"")
        d = self.control.post_json(consumer(), "/free", {"unload_models": True}, 5.0)
        self.assertEqual(self.successResultOf(d), (200, None))

    def test_unreachable(self) -> None:
        """A refused connection is consumer_unreachable naming the call."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        d = control.post_json(consumer(), "/api/generate", {}, 5.0)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(
            (f.value.code, f.value.consumer, f.value.message),
            (
                "consumer_unreachable",
                "mvoice",
                "upstream mvoice: POST /api/generate failed: connection refused",
            ),
        )

    def test_timeout_is_scheduler_error(self) -> None:
        """A POST that outlasts timeout_s is a scheduler_error, as a load's timeout is: the
        consumer is there, only slow, so it is not called unreachable; the connection closes."""
        self.fake.hang_paths.add(b"/api/generate")
        d = self.control.post_json(consumer(), "/api/generate", {"model": "m"}, 2.0)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(
            (f.value.code, f.value.message),
            (
                "scheduler_error",
                "upstream mvoice: POST /api/generate failed: timed out after 2.0 s",
            ),
        )
        self.agent.flush()
        self.assertEqual(len(self.fake.lost), 1)
