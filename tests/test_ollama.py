"""Tests for mgpu.ollama: reading Ollama's /api/ps and asking it to free its models."""

from __future__ import annotations

import json
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.ollama import OllamaModel, free_models, parse_ps, read_ps
from mgpu.sim.consumers import ConsumerSettings, make_consumer
from mgpu.sim.gpu import MemoryLedger
from mgpu.sim.http import SimResource
from tests.fuzz import examples
from tests.test_control import ControlTestCase, _Bytes, as_clock, consumer, refusing_client

MIB = 2**20

DOCUMENTED_PS: dict[str, Any] = {
    "models": [
        {
            "name": "mistral:latest",
            "model": "mistral:latest",
            "size": 5137025024,
            "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "7.2B",
                "quantization_level": "Q4_0",
            },
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
        }
    ]
}
"""``GET /api/ps``'s example answer in Ollama's API documentation."""

EXPIRES_POSIX = 1717537111.83753
"""2024-06-04T14:38:31.83753-07:00 as a POSIX time."""


def running(name: str, size_vram: object, **extra: object) -> dict[str, object]:
    """One /api/ps entry shaped as Ollama's, with ``extra`` keys replaced or added."""
    entry = dict(DOCUMENTED_PS["models"][0], name=name, model=name, size_vram=size_vram)
    entry.update(extra)
    return entry


def ollama(**overrides: Any) -> Any:
    """The ``ollama`` consumer of the tests, at http://consumer:8765."""
    return consumer(name="ollama", health=None, **overrides)


class ParsePsTests(SynchronousTestCase):
    """parse_ps and OllamaModel."""

    def test_documented_answer(self) -> None:
        """The documented example parses to its name, size_vram in MiB rounded up, and
        expires_at as given."""
        self.assertEqual(
            parse_ps(DOCUMENTED_PS),
            (OllamaModel("mistral:latest", 4900, "2024-06-04T14:38:31.83753-07:00"),),
        )

    def test_several_models_in_order(self) -> None:
        """Every model is kept, in Ollama's order; one on the CPU (size_vram 0) with 0 MiB."""
        body = {"models": [running("b:7b", 7 * MIB), running("a:1b", 0), running("c", MIB)]}
        models = parse_ps(body)
        self.assertEqual(
            [(m.name, m.size_vram_mib) for m in models], [("b:7b", 7), ("a:1b", 0), ("c", 1)]
        )

    def test_bytes_to_mib_rounds_up(self) -> None:
        """size_vram bytes become MiB rounded up: a byte past a MiB is a second MiB."""
        sizes = [0, 1, MIB - 1, MIB, MIB + 1, 5 * MIB]
        body = {"models": [running(f"m{i}", size) for i, size in enumerate(sizes)]}
        self.assertEqual([m.size_vram_mib for m in parse_ps(body)], [0, 1, 1, 1, 2, 5])

    def test_no_models(self) -> None:
        """An empty list is no model; so is null (Go's empty slice)."""
        self.assertEqual(parse_ps({"models": []}), ())
        self.assertEqual(parse_ps({"models": None}), ())

    def test_extra_keys_tolerated(self) -> None:
        """Keys parse_ps does not use, at the top or in a model, are ignored."""
        entry = running("m", MIB, context_length=4096, new_field={"x": [1]})
        self.assertEqual(parse_ps({"models": [entry], "next": None})[0].name, "m")

    def test_name_falls_back_to_model(self) -> None:
        """A model without "name" is named by its "model"."""
        entry = running("m", MIB)
        del entry["name"]
        self.assertEqual(parse_ps({"models": [entry]})[0].name, "m")

    def test_expires_at_absent_or_unreadable(self) -> None:
        """A missing, non-string, unparseable or offset-less expires_at is None."""
        missing = running("m", MIB)
        del missing["expires_at"]
        odd = ["soon", 1717537111, "2024-06-04T14:38:31", "", None, "2024-13-40T00:00:00Z"]
        models = parse_ps({"models": [missing] + [running("m", MIB, expires_at=v) for v in odd]})
        self.assertEqual([m.expires_at for m in models], [None] * 7)

    def test_expires_at_forms_kept(self) -> None:
        """Z, an offset, nanoseconds: each is kept as Ollama gave it."""
        forms = ["2024-06-04T21:38:31Z", "2024-06-04T14:38:31.837530123-07:00"]
        models = parse_ps({"models": [running("m", MIB, expires_at=v) for v in forms]})
        self.assertEqual([m.expires_at for m in models], forms)

    def test_not_that_shape(self) -> None:
        """Anything but an object with a list of named models with byte counts is a
        ValueError saying what is wrong."""
        cases: list[tuple[object, str]] = [
            (None, '"models"'),
            ([], '"models"'),
            ({}, '"models"'),
            ({"error": "boom"}, '"models"'),
            ({"models": {}}, '"models" is not a list'),
            ({"models": [1]}, "models[0] is not an object"),
            ({"models": [running("m", MIB), {"size_vram": 1}]}, "models[1] has no name"),
            ({"models": [running("", MIB)]}, "models[0] has no name"),
            ({"models": [running("m", -1)]}, "models[0].size_vram"),
            ({"models": [running("m", 1.5)]}, "models[0].size_vram"),
            ({"models": [running("m", True)]}, "models[0].size_vram"),
            ({"models": [running("m", "5137025024")]}, "models[0].size_vram"),
            ({"models": [running("m", None)]}, "models[0].size_vram"),
        ]
        for body, reason in cases:
            with self.assertRaises(ValueError, msg=repr(body)) as caught:
                parse_ps(body)
            self.assertIn(reason, str(caught.exception))

    def test_expires_in_s(self) -> None:
        """Seconds from now until expires_at, whatever its offset; 0 once overdue."""
        model = parse_ps(DOCUMENTED_PS)[0]
        self.assertAlmostEqual(cast(float, model.expires_in_s(EXPIRES_POSIX - 300)), 300.0)
        utc = OllamaModel("m", 1, "2024-06-04T21:38:31.83753Z")
        self.assertAlmostEqual(cast(float, utc.expires_in_s(EXPIRES_POSIX - 0.5)), 0.5)
        self.assertEqual(model.expires_in_s(EXPIRES_POSIX + 10), 0.0)

    def test_expires_in_s_unknown_or_never(self) -> None:
        """None without an expiry, and when it is more than ten years ahead (keep_alive -1
        shows as a year such as 2318); nine years ahead is still a time."""
        year = 365.25 * 86400
        self.assertIsNone(OllamaModel("m", 1, None).expires_in_s(EXPIRES_POSIX))
        never = OllamaModel("m", 1, "2318-09-21T10:17:04.123456-07:00")
        self.assertIsNone(never.expires_in_s(EXPIRES_POSIX))
        model = parse_ps(DOCUMENTED_PS)[0]
        self.assertIsNone(model.expires_in_s(EXPIRES_POSIX - 11 * year))
        self.assertAlmostEqual(cast(float, model.expires_in_s(EXPIRES_POSIX - 9 * year)), 9 * year)

    def test_to_json(self) -> None:
        """to_json is the status document's shape."""
        self.assertEqual(
            parse_ps(DOCUMENTED_PS)[0].to_json(),
            {
                "name": "mistral:latest",
                "size_vram_mib": 4900,
                "expires_at": "2024-06-04T14:38:31.83753-07:00",
            },
        )


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_odd_times = st.sampled_from(
    ["2024-06-04T14:38:31.83753-07:00", "2318-01-01T00:00:00Z", "0001-01-01T00:00:00+23:59",
     "9999-12-31T23:59:59-23:59", "2024-06-04T14:38:31", "2024-06-04T14:38:60Z", "\x00"]
) | st.text(max_size=40)  # fmt: skip
_entries = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=10) | _json_values,
        "model": st.text(max_size=10),
        "size_vram": st.sampled_from([-(2**40), -MIB - 1, -1, 0, 1, MIB + 1, 2**70])
        | st.integers(min_value=-(2**70), max_value=2**70)
        | _json_values,
        "expires_at": _odd_times | _json_values,
        "size": st.integers(),
    },
)
_ps_like = st.fixed_dictionaries({"models": st.lists(_entries | _json_values, max_size=4)})


class ParsePsPropertyTests(SynchronousTestCase):
    """Property: parse_ps of any JSON value is models with sound fields, or ValueError."""

    @settings(max_examples=examples(300), deadline=None)
    @given(_json_values | _ps_like, st.floats(min_value=-1e12, max_value=1e12))
    def test_models_or_value_error(self, body: object, now: float) -> None:
        """Whatever the answer, parse_ps returns named models with non-negative sizes whose
        expiry is None or a non-negative number of seconds, or raises ValueError."""
        try:
            models = parse_ps(body)
        except ValueError:
            return
        for model in models:
            self.assertIsInstance(model, OllamaModel)
            self.assertTrue(isinstance(model.name, str) and model.name)
            self.assertTrue(isinstance(model.size_vram_mib, int) and model.size_vram_mib >= 0)
            left = model.expires_in_s(now)
            self.assertTrue(left is None or left >= 0, left)
            json.dumps(model.to_json())


class ReadPsTests(ControlTestCase):
    """read_ps through ConsumerControl.get_json."""

    def test_reads_models(self) -> None:
        """read_ps GETs /api/ps and returns its models."""
        self.answer(b"GET", b"/api/ps", 200, json.dumps(DOCUMENTED_PS).encode())
        models = self.successResultOf(read_ps(self.control, ollama(), 3.0))
        self.assertEqual([m.name for m in models], ["mistral:latest"])
        self.assertEqual([r[:2] for r in self.fake.received], [(b"GET", b"/api/ps")])

    def test_error_status(self) -> None:
        """A non-2xx answer is a scheduler_error with the status and Ollama's error text,
        not consumer_unreachable: Ollama is there and answered."""
        self.answer(b"GET", b"/api/ps", 500, b'{"error": "runner crashed"}')
        f = self.failureResultOf(read_ps(self.control, ollama(), 3.0), BrokerError)
        self.assertEqual(
            (f.value.code, f.value.consumer, f.value.message),
            (
                "scheduler_error",
                "ollama",
                "upstream ollama: GET /api/ps answered HTTP 500: runner crashed",
            ),
        )

    def test_malformed(self) -> None:
        """A 200 that is not a model list is bad_answer with the reason; so is one not JSON."""
        self.answer(b"GET", b"/api/ps", 200, b'{"models": "many"}')
        f = self.failureResultOf(read_ps(self.control, ollama(), 3.0), BrokerError)
        self.assertEqual(
            (f.value.code, f.value.message),
            (
                "bad_answer",
                'upstream ollama: GET /api/ps answered no model list: "models" is not a list',
            ),
        )
        self.answer(b"GET", b"/api/ps", 200, b"<html>")
        f = self.failureResultOf(read_ps(self.control, ollama(), 3.0), BrokerError)
        self.assertEqual(f.value.code, "bad_answer")

    def test_unreachable(self) -> None:
        """A refused connection is consumer_unreachable, as any get_json."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        f = self.failureResultOf(read_ps(control, ollama(), 3.0), BrokerError)
        self.assertEqual(f.value.code, "consumer_unreachable")
        self.assertIn("connection refused", f.value.message)

    def test_timeout(self) -> None:
        """An /api/ps that never answers fails at timeout_s, as any get_json, and its
        connection is closed."""
        self.fake.hang_paths.add(b"/api/ps")
        d = read_ps(self.control, ollama(), 3.0)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(f.value.code, "consumer_unreachable")
        self.assertIn("timed out after 3.0 s", f.value.message)
        self.agent.flush()
        self.assertEqual(len(self.fake.lost), 1)


class FakeOllama(Resource):
    """/api/generate answering per model: ``answers[model]`` or Ollama's unload answer;
    models in ``hang`` never answer. Every request is recorded."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.hang: set[str] = set()
        self.received: list[tuple[bytes, bytes, bytes | None, object]] = []
        self.lost: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.path is not None
        assert request.content is not None
        body = json.loads(request.content.read())
        self.received.append(
            (request.method, request.path, request.getHeader(b"content-type"), body)
        )
        model = body.get("model")
        if model in self.hang:
            request.notifyFinish().addErrback(lambda _: self.lost.append(request))
            return NOT_DONE_YET
        unloaded = {"model": model, "created_at": "2024-09-12T03:54:03.516566Z",
                    "response": "", "done": True, "done_reason": "unload"}  # fmt: skip
        code, answer = self.answers.get(model, (200, json.dumps(unloaded).encode()))
        request.setResponseCode(code)
        return answer


class FreeModelsTests(SynchronousTestCase):
    """free_models through ConsumerControl.post_json."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeOllama()
        self.agent = RequestTraversalAgent(self.fake)
        http = HTTPClient(cast(IAgent, self.agent), data_to_body_producer=cast(Any, _Bytes))
        self.control = ConsumerControl(http, as_clock(self.clock))

    def posted(self) -> list[object]:
        """The bodies received, after checking each was a JSON POST to /api/generate."""
        for method, path, ctype, _ in self.fake.received:
            self.assertEqual(
                (method, path, ctype),
                (b"POST", b"/api/generate", b"application/json; charset=UTF-8"),
            )
        return [body for *_, body in self.fake.received]

    def test_posts_documented_body_for_each_in_order(self) -> None:
        """Each model gets exactly {"model": M, "keep_alive": 0}, in the order given."""
        d = free_models(self.control, ollama(), iter(["b:7b", "a:1b", "c"]), 5.0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(
            self.posted(),
            [{"model": m, "keep_alive": 0} for m in ("b:7b", "a:1b", "c")],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_to_free(self) -> None:
        """No models: nothing is sent, and it succeeds."""
        self.assertIsNone(self.successResultOf(free_models(self.control, ollama(), [], 5.0)))
        self.assertEqual(self.fake.received, [])

    def test_only_status_counts(self) -> None:
        """Any 2xx frees, whatever its body (older Ollamas answer without done_reason)."""
        self.fake.answers["m"] = (200, b"")
        self.assertIsNone(self.successResultOf(free_models(self.control, ollama(), ["m"], 5.0)))

    def test_one_after_the_other(self) -> None:
        """The next model is asked only once the previous one answered."""
        self.fake.hang.add("a")
        d = free_models(self.control, ollama(), ["a", "b"], 5.0)
        self.assertNoResult(d)
        self.assertEqual(self.posted(), [{"model": "a", "keep_alive": 0}])

    def test_stops_at_first_failure(self) -> None:
        """A refused model stops it: a scheduler_error naming the model, the status and
        Ollama's words; later models are not asked."""
        self.fake.answers["b"] = (
            404,
            b'{"error": "model \\"b\\" not found, try pulling it first"}',
        )
        d = free_models(self.control, ollama(), ["a", "b", "c"], 5.0)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(
            (f.value.code, f.value.consumer, f.value.message),
            (
                "scheduler_error",
                "ollama",
                "freeing model b of ollama failed: HTTP 404: "
                'model "b" not found, try pulling it first',
            ),
        )
        self.assertEqual([b["model"] for b in cast(Any, self.posted())], ["a", "b"])

    def test_answer_kept_short_and_on_one_line(self) -> None:
        """Ollama's answer in the message is cut short and has no line breaks."""
        self.fake.answers["m"] = (500, json.dumps({"error": "x\n" * 5000}).encode())
        f = self.failureResultOf(free_models(self.control, ollama(), ["m"], 5.0), BrokerError)
        self.assertNotIn("\n", f.value.message)
        self.assertLess(len(f.value.message), 300)
        self.fake.answers["m"] = (500, b'{"detail": "no error key"}')
        f = self.failureResultOf(free_models(self.control, ollama(), ["m"], 5.0), BrokerError)
        self.assertTrue(f.value.message.endswith('HTTP 500: {"detail": "no error key"}'))
        self.fake.answers["m"] = (502, b"Bad Gateway")
        f = self.failureResultOf(free_models(self.control, ollama(), ["m"], 5.0), BrokerError)
        self.assertTrue(f.value.message.endswith("failed: HTTP 502"))

    def test_unreachable(self) -> None:
        """A refused connection is consumer_unreachable naming the model."""
        control = ConsumerControl(refusing_client(), as_clock(self.clock))
        f = self.failureResultOf(free_models(control, ollama(), ["a", "b"], 5.0), BrokerError)
        self.assertEqual(f.value.code, "consumer_unreachable")
        self.assertEqual(
            f.value.message,
            "freeing model a of ollama failed: upstream ollama: POST /api/generate failed: "
            "connection refused",
        )

    def test_timeout(self) -> None:
        """A model whose unload never answers fails at timeout_s: a scheduler_error naming
        it (Ollama is slow, not gone); its connection is closed and the rest not asked."""
        self.fake.hang.add("b")
        d = free_models(self.control, ollama(), ["a", "b", "c"], 2.0)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, BrokerError)
        self.assertEqual(f.value.code, "scheduler_error")
        self.assertIn("freeing model b of ollama failed: ", f.value.message)
        self.assertIn("timed out after 2.0 s", f.value.message)
        self.agent.flush()
        self.assertEqual(len(self.fake.lost), 1)
        self.assertEqual([b["model"] for b in cast(Any, self.posted())], ["a", "b"])


class SimulatedOllamaTests(SynchronousTestCase):
    """read_ps and free_models against the simulated Ollama: the broker's reader and the
    simulator agree."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.ledger = MemoryLedger()
        settings_ = ConsumerSettings.make("ollama", load_s=0.5, keep_alive_s=60)
        self.sim = make_consumer(settings_, self.ledger, self.clock)
        self.agent = RequestTraversalAgent(SimResource(self.sim))
        http = HTTPClient(cast(IAgent, self.agent), data_to_body_producer=cast(Any, _Bytes))
        self.control = ConsumerControl(http, as_clock(self.clock))

    def test_read_then_free(self) -> None:
        """A loaded simulated model reads as itself with its size and keep-alive expiry;
        free_models frees it and /api/ps is empty after."""
        d = self.control.post_json(ollama(), "/api/generate", {"model": "qwen2.5:7b"}, 5.0)
        self.clock.advance(0.5)
        self.agent.flush()
        self.assertEqual(cast(Any, self.successResultOf(d))[1]["done_reason"], "load")
        d_ps = read_ps(self.control, ollama(), 5.0)
        self.agent.flush()
        [model] = self.successResultOf(d_ps)
        self.assertEqual((model.name, model.size_vram_mib), ("qwen2.5:7b", 6000))
        self.assertAlmostEqual(cast(float, model.expires_in_s(self.clock.seconds())), 60.0)
        d_free = free_models(self.control, ollama(), [model.name], 5.0)
        self.agent.flush()
        self.assertIsNone(self.successResultOf(d_free))
        self.assertEqual(self.ledger.used_mib(), 0)
        d_ps = read_ps(self.control, ollama(), 5.0)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d_ps), ())
