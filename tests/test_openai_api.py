"""Tests for mgpu.openai_api: finding the model in a body, the model index, discovery,
OpenAI's error envelope, and the routes end to end through ``BrokerResource``.

The routes run over the real facade of ``tests.test_facade.Broker`` (in-memory
consumers, a ``MemoryReactorClock``); the scanners are fed bytes directly,
hypothesis-generated ones included.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import tracemalloc
from collections.abc import Iterator, Sequence
from io import BytesIO
from typing import IO, Any, cast

from attrs import evolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from mgpu import openai_api
from mgpu.api import BrokerResource
from mgpu.config import Config, ConsumerConfig, OpenAIConfig, SchedulerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.gpu import GpuPoller
from mgpu.openai_api import (
    CHUNK_BYTES,
    MAX_MODEL_BYTES,
    ROUTES,
    JsonModel,
    ModelDiscovery,
    ModelError,
    ModelIndex,
    MultipartModel,
    OpenAIRoutes,
    envelope,
    is_openai_path,
    parse_model_list,
    read_model,
    render_error,
)
from mgpu.registry import HealthProber
from mgpu.status import StatusView
from tests.fuzz import examples
from tests.test_api import CountingReader
from tests.test_facade import COMFYUI, MVOICE, OLLAMA, Broker, Client, make_config

BOUNDARY = b"----mgpu-test-boundary"
FORM_TYPE = b"multipart/form-data; boundary=" + BOUNDARY
ENVELOPE_KEYS = {"message", "type", "param", "code"}


# -- helpers -----------------------------------------------------------------


def form(*parts: tuple[str, bytes, str | None], boundary: bytes = BOUNDARY) -> bytes:
    """A multipart/form-data body: (field name, value, file name or None) per part."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--" + boundary + b"\r\n"
        out += b"Content-Disposition: " + disposition.encode() + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def scan(scanner: JsonModel | MultipartModel, body: bytes, cuts: Sequence[int] = ()) -> str:
    """Feed ``body`` cut at ``cuts``, stopping when the scanner says so; its model."""
    for piece in _pieces(body, cuts):
        if scanner.feed(piece):
            break
    return scanner.model()


def _pieces(body: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    at = 0
    for cut in sorted({c % (len(body) + 1) for c in cuts}):
        yield body[at:cut]
        at = cut
    yield body[at:]


def json_model(body: bytes, cuts: Sequence[int] = ()) -> str:
    return scan(JsonModel(), body, cuts)


def form_model(
    body: bytes, cuts: Sequence[int] = (), content_type: bytes | None = FORM_TYPE
) -> str:
    return scan(MultipartModel(content_type), body, cuts)


def with_openai(consumer: ConsumerConfig, path: str = "/v1", *models: str,
                discover: bool = False) -> ConsumerConfig:  # fmt: skip
    return evolve(consumer, openai=OpenAIConfig(path, tuple(models), discover))


def openai_config(**consumers: ConsumerConfig) -> Config:
    """test_facade's three consumers, those named here replaced."""
    named = {c.name: c for c in (MVOICE, OLLAMA, COMFYUI)}
    named.update(consumers)
    return make_config(consumers=named)


class Captured:
    """A ``Logger`` whose events are kept, formatted."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=cast(ILogObserver, self.events.append))

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


class CountingFile:
    """A file that counts what is read from it, and the largest single read."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.read_bytes = 0
        self.largest = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.read_bytes += len(data)
        self.largest = max(self.largest, len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)


def run_read(content: object, scanner: JsonModel | MultipartModel) -> str:
    """``read_model`` without pauses: it completes at once."""
    result: list[object] = []
    d = Deferred.fromCoroutine(read_model(cast(IO[bytes], content), scanner))
    d.addBoth(result.append)
    [value] = result
    if isinstance(value, str):
        return value
    cast(Any, value).raiseException()
    raise AssertionError("unreachable")


# -- JSON ---------------------------------------------------------------------


class JsonModelTests(SynchronousTestCase):
    """JsonModel: the top-level ``model`` string, whatever else the body holds."""

    def test_finds_top_level_model(self) -> None:
        """The model of an ordinary chat body; nested "model" keys do not count."""
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "model", "model": "nested"}],
                "tools": {"model": "deeper"},
                "model": "llama3.1:8b",
                "stream": True,
            }
        ).encode()
        self.assertEqual(json_model(body), "llama3.1:8b")
        self.assertEqual(json_model(body, range(len(body))), "llama3.1:8b")  # byte by byte

    def test_escapes_and_unicode(self) -> None:
        """Escaped keys and values are decoded as JSON decodes them."""
        self.assertEqual(json_model(b'{"m\\u006fdel": "a\\"b\\\\c\\u00e9"}'), 'a"b\\c\u00e9')
        self.assertEqual(json_model('{"model": "caf\u00e9/\u2603"}'.encode()), "caf\u00e9/\u2603")
        body = b'{"x": "\\\\", "model": "m"}'  # a string that ends on an escaped backslash
        for cut in range(len(body)):
            self.assertEqual(json_model(body, [cut]), "m", cut)

    def test_last_of_repeated_keys(self) -> None:
        """A repeated model key takes its last value, as json.loads does."""
        body = b'{"model": "a", "x": 1, "model": "b"}'
        self.assertEqual(json_model(body), json.loads(body)["model"])

    def test_refusals_name_the_model_param(self) -> None:
        """Bodies without a usable model are a 400 bad_request whose param is model."""
        for body, reason in (
            (b"", "must be a JSON object"),
            (b"   ", "must be a JSON object"),
            (b"[1, 2]", "must be a JSON object"),
            (b'"model"', "must be a JSON object"),
            (b'{"model": "m"', "not a complete JSON object"),
            (b'{"messages": []}', "has no model"),
            (b'{"x": {"model": "m"}}', "has no model"),
            (b'{"model": 7}', "must be a string"),
            (b'{"model": null}', "must be a string"),
            (b'{"model": ["m"]}', "must be a string"),
            (b'{"model": "m", "model": {}}', "must be a string"),
            (b'{"model": "\\x"}', "must be a string"),
            (b'{"model": "a\nb"}', "must be a string"),
            (b'{"model": "\xff"}', "must be a string"),
            (b'{"model": "' + b"m" * (MAX_MODEL_BYTES + 1) + b'"}', "must be a string"),
        ):
            error = self.assertRaises(ModelError, json_model, body)
            self.assertEqual((error.code, error.status, error.param), ("bad_request", 400, "model"))
            self.assertIn(reason, error.message, body)

    def test_longest_model(self) -> None:
        """A model of MAX_MODEL_BYTES bytes is kept, even written all as escapes."""
        name = "m" * MAX_MODEL_BYTES
        self.assertEqual(json_model(json.dumps({"model": name}).encode()), name)
        escaped = b'{"model": "' + b"\\u006d" * MAX_MODEL_BYTES + b'"}'
        self.assertEqual(json_model(escaped), name)

    def test_stops_at_the_end_of_the_object(self) -> None:
        """Once the object closes, feed says so; what follows is the consumer's to judge."""
        scanner = JsonModel()
        self.assertFalse(scanner.feed(b'{"model": "m", "a": [1, {"b": "}"}]'))
        self.assertTrue(scanner.feed(b"} trailing"))
        self.assertEqual(scanner.model(), "m")

    @settings(max_examples=examples(300), deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(["model", "Model", "messages", "mod\"el", "x"]) | st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                lambda inner: st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                max_leaves=12,
            ),
        ),
        st.booleans(),
        st.sampled_from([None, 0, 2]),
        st.lists(st.integers(min_value=0), max_size=6),
    )  # fmt: skip
    def test_agrees_with_json_loads(
        self, document: dict[str, Any], ascii_only: bool, indent: int | None, cuts: list[int]
    ) -> None:
        """Property: for any JSON object, cut anywhere, the model found is json.loads'
        top-level "model" when that is a short string, else a clean 400."""
        body = json.dumps(document, ensure_ascii=ascii_only, indent=indent).encode()
        model = document.get("model")
        if isinstance(model, str) and len(model.encode()) <= MAX_MODEL_BYTES:
            self.assertEqual(json_model(body, cuts), model)
        else:
            error = self.assertRaises(ModelError, json_model, body, cuts)
            self.assertEqual((error.status, error.param), (400, "model"))

    @settings(max_examples=examples(300), deadline=None)
    @given(
        st.binary(max_size=300)
        | st.lists(
            st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b'"model"', b"m",
                             b"\\u00", b" ", b"\xff", b"\x00"]),
            max_size=60,
        ).map(b"".join),
        st.lists(st.integers(min_value=0), max_size=6),
    )  # fmt: skip
    def test_hostile_bytes(self, body: bytes, cuts: list[int]) -> None:
        """Property: any bytes, cut anywhere, give a model or a clean 400, the same however
        they are cut."""
        outcomes: list[str | None] = []
        for where in ((), cuts):
            try:
                outcomes.append(json_model(body, where))
            except ModelError as e:
                self.assertEqual((e.code, e.status), ("bad_request", 400))
                outcomes.append(None)
        self.assertEqual(outcomes[0], outcomes[1])


# -- multipart -----------------------------------------------------------------


class MultipartModelTests(SynchronousTestCase):
    """MultipartModel: the ``model`` field of a form, file data never kept."""

    def test_finds_the_model_field(self) -> None:
        """Before the file, after it, byte by byte: the model field's value."""
        audio = b"RIFF" + bytes(range(256)) * 40
        first = form(("model", b"whisper-1", None), ("file", audio, "a.wav"))
        last = form(("file", audio, "a.wav"), ("language", b"en", None), ("model", b"w-2", None))
        self.assertEqual(form_model(first), "whisper-1")
        self.assertEqual(form_model(last), "w-2")
        self.assertEqual(form_model(last, range(len(last))), "w-2")
        self.assertEqual(form_model(form(("model", "caf\u00e9".encode(), None))), "caf\u00e9")
        self.assertEqual(form_model(form(("model", b"", None))), "")

    def test_first_model_field_decides(self) -> None:
        """The first model field decides; the rest of the body is not read."""
        scanner = MultipartModel(FORM_TYPE)
        body = form(("model", b"a", None), ("model", b"b", None))
        end_of_first = body.index(b"--" + BOUNDARY, 3) + 2 + len(BOUNDARY) + 2
        self.assertTrue(scanner.feed(body[:end_of_first]))
        self.assertEqual(scanner.model(), "a")

    def test_quoted_boundary_and_header_case(self) -> None:
        """A quoted boundary parameter, header names in any case, a file named model.txt."""
        body = (
            b'--xyz\r\ncontent-DISPOSITION: form-data; filename="model"; name=file\r\n\r\n'
            b"data\r\n--xyz\r\nContent-Disposition: form-data; name=model\r\n\r\nm1\r\n--xyz--\r\n"
        )
        content_type = b'Multipart/Form-Data; charset=utf-8; boundary="xyz"'
        self.assertEqual(form_model(body, content_type=content_type), "m1")

    def test_refusals(self) -> None:
        """No form, no model field, a malformed body: 400 bad_request with param model."""
        for content_type, body, reason in (
            (None, form(("model", b"m", None)), "must be multipart/form-data"),
            (b"application/json", b'{"model": "m"}', "must be multipart/form-data"),
            (b"multipart/form-data", form(("model", b"m", None)), "with a boundary"),
            (b"multipart/form-data; boundary=" + b"b" * 300, b"", "cannot be read"),
            (FORM_TYPE, form(("file", b"x", "a.wav")), "has no model field"),
            (FORM_TYPE, b"", "has no model field"),
            (FORM_TYPE, b"--other\r\n\r\nx", "malformed"),
            (FORM_TYPE, form(("model", b"\xff\xfe", None)), "UTF-8 text"),
            (FORM_TYPE, form(("model", b"m" * (MAX_MODEL_BYTES + 1), None)), "UTF-8 text"),
        ):
            error = self.assertRaises(ModelError, form_model, body, (), content_type)
            self.assertEqual((error.code, error.status, error.param), ("bad_request", 400, "model"))
            self.assertIn(reason, error.message)

    def test_large_upload_stays_out_of_memory(self) -> None:
        """A 20 MiB file part before the model field, in a temporary file: read in chunks
        of CHUNK_BYTES, no slice larger handed over, and well under a MiB allocated."""
        size = 20 * 2**20
        with tempfile.TemporaryFile() as spooled:
            spooled.write(b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file";'
                          b' filename="big.wav"\r\n\r\n')  # fmt: skip
            block = bytes(range(256)) * 4096  # 1 MiB, with CR and LF and dashes inside
            for _ in range(size // len(block)):
                spooled.write(block)
            spooled.write(b"\r\n" + form(("model", b"whisper-1", None)))
            counting = CountingFile(spooled)
            scanner = MultipartModel(FORM_TYPE)
            tracemalloc.start()
            try:
                model = run_read(counting, scanner)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertEqual(model, "whisper-1")
            self.assertGreater(counting.read_bytes, size)
            self.assertEqual(counting.largest, CHUNK_BYTES)
            self.assertLessEqual(scanner.largest_slice, CHUNK_BYTES)
            self.assertLess(peak, 2**20)
            self.assertEqual(spooled.tell(), 0)  # rewound for the relay

    def test_model_first_reads_one_chunk(self) -> None:
        """With the model field first, a 20 MiB upload is not read past its first chunk."""
        body = form(("model", b"whisper-1", None), ("file", b"\0" * (20 * 2**20), "a.wav"))
        counting = CountingFile(BytesIO(body))
        self.assertEqual(run_read(counting, MultipartModel(FORM_TYPE)), "whisper-1")
        self.assertEqual(counting.read_bytes, CHUNK_BYTES)

    @settings(
        max_examples=examples(300),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["model", "file", "Model", 'mo"del', ""]) | st.text(max_size=6),
                st.binary(max_size=64)
                | st.sampled_from([b"--" + BOUNDARY, b"\r\n--" + BOUNDARY, b"\r\n", b"m"]),
                st.none() | st.sampled_from(["a.wav", "model"]),
            ),
            max_size=5,
        ),
        st.lists(st.tuples(st.integers(min_value=0), st.binary(max_size=4)), max_size=3),
        st.integers(min_value=0),
        st.lists(st.integers(min_value=0), max_size=6),
    )  # fmt: skip
    def test_generated_forms(
        self,
        parts: list[tuple[str, bytes, str | None]],
        damage: list[tuple[int, bytes]],
        cut_at: int,
        cuts: list[int],
    ) -> None:
        """Property: a generated form, possibly damaged or cut short, cut anywhere, gives
        the first model field or a clean 400; an intact one gives what it holds."""
        safe = [(n.replace('"', "").replace("\r", "").replace("\n", ""), v, f) for n, v, f in parts]
        body = form(*safe)
        intact = not damage and not cut_at % 3
        for at, junk in damage:
            at %= len(body) + 1
            body = body[:at] + junk + body[at + len(junk) :]
        if not intact:
            body = body[: cut_at % (len(body) + 1)]
        try:
            model: str | None = form_model(body, cuts)
        except ModelError as e:
            self.assertEqual((e.code, e.status, e.param), ("bad_request", 400, "model"))
            model = None
        if intact and not any(BOUNDARY in v for _, v, _ in safe):
            values = [v for n, v, _ in safe if n == "model"]
            expected = None
            if values and len(values[0]) <= MAX_MODEL_BYTES:
                with contextlib.suppress(UnicodeDecodeError):
                    expected = values[0].decode("utf-8")
            self.assertEqual(model, expected)

    @settings(max_examples=examples(300), deadline=None)
    @given(st.binary(max_size=200), st.binary(max_size=120) | st.text(max_size=60).map(str.encode))
    def test_hostile_bytes(self, body: bytes, content_type: bytes) -> None:
        """Property: any body under any Content-Type gives a model or a clean 400."""
        for header in (content_type, FORM_TYPE, b"multipart/form-data; boundary=" + content_type):
            try:
                form_model(body, content_type=header)
            except ModelError as e:
                self.assertEqual((e.code, e.status), ("bad_request", 400))


class ReadModelTests(SynchronousTestCase):
    """read_model: chunks, pauses for large bodies, and the rewind."""

    def test_pauses_on_large_bodies_and_rewinds(self) -> None:
        """A 3 MiB JSON body gives the reactor a turn every MiB, then is rewound."""
        body = json.dumps({"input": "x" * (3 * 2**20), "model": "e"}).encode()
        content = BytesIO(body)
        pauses: list[Deferred[None]] = []

        def pause() -> Deferred[None]:
            pauses.append(Deferred())
            return pauses[-1]

        d = Deferred.fromCoroutine(read_model(content, JsonModel(), pause))
        for _ in range(3):
            self.assertNoResult(d)
            pauses[-1].callback(None)
        self.assertEqual(self.successResultOf(d), "e")
        self.assertEqual(len(pauses), 3)
        self.assertEqual(content.tell(), 0)

    def test_large_json_stays_out_of_memory(self) -> None:
        """A 20 MiB JSON body (one long string) is scanned in well under a MiB."""
        with tempfile.TemporaryFile() as spooled:
            spooled.write(b'{"input": "')
            for _ in range(20):
                spooled.write(b"QUJD" * 2**18)
            spooled.write(b'", "model": "embed"}')
            tracemalloc.start()
            try:
                model = run_read(spooled, JsonModel())
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        self.assertEqual(model, "embed")
        self.assertLess(peak, 2**20)

    def test_no_content(self) -> None:
        """A request without a body has no model."""
        self.assertRaises(ModelError, run_read, None, JsonModel())


# -- errors ---------------------------------------------------------------------


class EnvelopeTests(SynchronousTestCase):
    """OpenAI's error envelope around the broker's codes."""

    def test_shape_and_types(self) -> None:
        """message, type, param and code; the type follows the status."""
        for error, kind, param in (
            (ModelError("model_not_found", "no such model"), "invalid_request_error", "model"),
            (BrokerError("bad_request", "bad"), "invalid_request_error", None),
            (BrokerError("unauthorized", "who"), "authentication_error", None),
            (BrokerError("queue_full", "busy", "m"), "server_error", None),
            (BrokerError("upstream_timeout", "slow", "m"), "server_error", None),
        ):
            self.assertEqual(
                envelope(error),
                {"error": {"message": error.message, "type": kind, "param": param,
                           "code": error.code}},
            )  # fmt: skip

    def test_model_not_found_is_a_404(self) -> None:
        """model_not_found is a contract code: 404, not retryable."""
        error = BrokerError("model_not_found", "x")
        self.assertEqual((error.status, error.retryable), (404, False))

    def test_render_keeps_status_and_headers(self) -> None:
        """The broker's status and Retry-After go out with the envelope."""
        request = DummyRequest([b""])
        body = render_error(
            cast(Request, request), BrokerError("queue_full", "busy", "m", {"Retry-After": "3"})
        )
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"3"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])  # fmt: skip
        self.assertEqual(json.loads(body)["error"]["code"], "queue_full")

    def test_paths(self) -> None:
        """The routed paths, /v1/models and the models under it; nothing else."""
        for path in [*ROUTES, b"/v1/models", b"/v1/models/llama3:8b"]:
            self.assertTrue(is_openai_path(path), path)
        for path in (b"/v1/tts", b"/v1/status", b"/v1/modelsx", b"/v1/chat", b"/chat/completions"):
            self.assertFalse(is_openai_path(path), path)
        self.assertEqual(
            {path: route.suffix for path, route in ROUTES.items()},
            {
                b"/v1/chat/completions": "/chat/completions",
                b"/v1/completions": "/completions",
                b"/v1/embeddings": "/embeddings",
                b"/v1/images/generations": "/images/generations",
                b"/v1/audio/speech": "/audio/speech",
                b"/v1/audio/transcriptions": "/audio/transcriptions",
                b"/v1/audio/translations": "/audio/translations",
            },
        )
        self.assertEqual([p for p, r in ROUTES.items() if r.multipart],
                         [b"/v1/audio/transcriptions", b"/v1/audio/translations"])  # fmt: skip


# -- the index and discovery ----------------------------------------------------


class ModelIndexTests(SynchronousTestCase):
    """ModelIndex: declared names, discovered ones, clashes and reloads."""

    def setUp(self) -> None:
        self.captured = Captured()
        self.patch(openai_api, "log", self.captured.log)
        self.config = openai_config(
            mvoice=with_openai(MVOICE, "/v1", "tts-1", discover=True),
            ollama=with_openai(OLLAMA, "/v1", "llama3", discover=True),
            comfyui=with_openai(COMFYUI, "/v1", discover=True),
        )
        self.index = ModelIndex(lambda: self.config)

    def owners(self) -> dict[str, str]:
        return dict(self.index.table())

    def test_declared(self) -> None:
        """Declared names route to their consumer; unknown ones to nobody."""
        self.assertEqual(self.owners(), {"tts-1": "mvoice", "llama3": "ollama"})
        owner = self.index.owner("llama3")
        self.assertIs(owner, self.config.consumers["ollama"])
        self.assertIsNone(self.index.owner("gpt-4"))

    def test_discovered_never_override_declared(self) -> None:
        """A discovered name also declared elsewhere stays with the declaring consumer;
        the clash is logged once."""
        self.index.learn(self.config.consumers["comfyui"], ["sdxl", "llama3"])
        self.index.learn(self.config.consumers["comfyui"], ["sdxl", "llama3"])
        self.assertEqual(self.owners(), {"tts-1": "mvoice", "llama3": "ollama", "sdxl": "comfyui"})
        self.index.table()
        [line] = self.captured.lines()
        self.assertIn("'llama3' discovered on comfyui is declared by ollama", line)

    def test_discovered_clash_first_in_file_wins(self) -> None:
        """Two consumers discover one name: the first in the file serves it; logged once,
        when it is learnt, not at each lookup."""
        self.index.learn(self.config.consumers["comfyui"], ["shared", "c"])
        self.index.learn(self.config.consumers["mvoice"], ["shared", "m"])
        self.assertEqual(self.owners()["shared"], "mvoice")
        self.assertEqual((self.owners()["c"], self.owners()["m"]), ("comfyui", "mvoice"))
        for _ in range(3):
            self.index.owner("shared")
        self.index.learn(self.config.consumers["comfyui"], ["shared", "c", "d"])
        [line] = self.captured.lines()
        self.assertIn("'shared' is discovered on both mvoice and comfyui: mvoice", line)

    def test_discovery_off_or_moved(self) -> None:
        """Names read from a consumer count only while it discovers, at the same URL and path."""
        comfyui = self.config.consumers["comfyui"]
        self.index.learn(comfyui, ["sdxl"])
        self.assertIn("sdxl", self.owners())
        moved = with_openai(evolve(COMFYUI, url="http://127.0.0.1:9999"), "/v1", discover=True)
        self.config = openai_config(comfyui=moved)
        self.assertNotIn("sdxl", self.owners())
        self.config = openai_config(comfyui=with_openai(COMFYUI, "/openai/v1", discover=True))
        self.assertNotIn("sdxl", self.owners())
        self.config = openai_config(comfyui=with_openai(COMFYUI, "/v1", "x", discover=False))
        self.assertEqual(self.owners(), {"x": "comfyui"})
        self.config = openai_config(comfyui=with_openai(COMFYUI, "/v1", discover=True))
        self.assertEqual(self.owners(), {"sdxl": "comfyui"})
        self.config = openai_config()
        self.assertEqual(self.owners(), {})

    def test_learn_ignores_consumers_without_openai(self) -> None:
        """A consumer with no openai block has no models to learn."""
        self.index.learn(MVOICE, ["x"])
        self.assertNotIn("x", self.owners())


class ParseModelListTests(SynchronousTestCase):
    """parse_model_list: OpenAI's /models answer."""

    def test_ids(self) -> None:
        """Each entry's id; unusable entries skipped."""
        body = {
            "object": "list",
            "data": [
                {"id": "llama3:latest", "object": "model", "owned_by": "library"},
                {"id": ""}, {"id": 7}, "x", {"name": "y"}, {"id": "a\nb"},
                {"id": "m" * (MAX_MODEL_BYTES + 1)}, {"id": "qwen2.5:7b"},
            ],
        }  # fmt: skip
        self.assertEqual(parse_model_list(body), ("llama3:latest", "qwen2.5:7b"))
        self.assertEqual(parse_model_list({"data": []}), ())

    def test_not_a_list(self) -> None:
        bodies: list[object] = [None, [], {"models": []}, {"data": {}}, "x"]
        for body in bodies:
            self.assertRaises(ValueError, parse_model_list, body)

    def test_bounded(self) -> None:
        body = {"data": [{"id": f"m{i}"} for i in range(openai_api.MAX_DISCOVERED + 10)]}
        self.assertEqual(len(parse_model_list(body)), openai_api.MAX_DISCOVERED)


class FakeControl:
    """ConsumerControl.get_json answered from a table, calls recorded."""

    def __init__(self) -> None:
        self.answers: dict[str, Deferred[tuple[int, object]] | tuple[int, object]] = {}
        self.calls: list[tuple[str, str, float]] = []

    def get_json(
        self, consumer: ConsumerConfig, path: str, timeout_s: float
    ) -> Deferred[tuple[int, object]]:
        self.calls.append((consumer.name, path, timeout_s))
        answer = self.answers[path]
        return answer if isinstance(answer, Deferred) else succeed(answer)


class ModelDiscoveryTests(SynchronousTestCase):
    """ModelDiscovery: the probe hook reading GET <path>/models."""

    def setUp(self) -> None:
        self.captured = Captured()
        self.patch(openai_api, "log", self.captured.log)
        self.comfyui = with_openai(COMFYUI, "/api/v1/", discover=True)
        self.config = openai_config(comfyui=self.comfyui)
        self.index = ModelIndex(lambda: self.config)
        self.control = FakeControl()
        self.discover = ModelDiscovery(self.index, cast(ConsumerControl, self.control))

    def test_reads_and_learns(self) -> None:
        """GET <path>/models, its ids learnt; a change of the list logged."""
        self.control.answers["/api/v1/models"] = (200, {"data": [{"id": "a"}, {"id": "b"}]})
        self.successResultOf(self.discover(self.comfyui, 3.0))
        self.assertEqual(self.control.calls, [("comfyui", "/api/v1/models", 3.0)])
        self.assertEqual(dict(self.index.table()), {"a": "comfyui", "b": "comfyui"})
        self.successResultOf(self.discover(self.comfyui, 3.0))
        [line] = self.captured.lines()
        self.assertIn("comfyui serves 2 models", line)

    def test_failures_keep_the_last_list(self) -> None:
        """An error status, a wrong shape or an unreachable consumer: the last list stays,
        each new reason logged once."""
        self.control.answers["/api/v1/models"] = (200, {"data": [{"id": "a"}]})
        self.successResultOf(self.discover(self.comfyui, 3.0))
        answers: list[tuple[int, object] | Deferred[tuple[int, object]]] = [
            (404, {"error": "no"}),
            (404, {"error": "no"}),
            (200, {"models": []}),
            fail(BrokerError("consumer_unreachable", "refused", "comfyui")),
        ]
        for answer in answers:
            self.control.answers["/api/v1/models"] = answer
            self.successResultOf(self.discover(self.comfyui, 3.0))
            self.assertEqual(dict(self.index.table()), {"a": "comfyui"})
        lines = self.captured.lines()[1:]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("HTTP 404", lines[0])
        self.assertIn('"data" list', lines[1])
        self.assertIn("refused", lines[2])

    def test_not_discovering(self) -> None:
        """A consumer without discover: true is never asked."""
        for consumer in (MVOICE, with_openai(MVOICE, "/v1", "m")):
            self.successResultOf(self.discover(consumer, 3.0))
        self.assertEqual(self.control.calls, [])


class ProberHookTests(SynchronousTestCase):
    """HealthProber's discover hook: after each probe that finds a consumer healthy."""

    def setUp(self) -> None:
        self.broker = Broker()
        self.seen: list[tuple[str, float]] = []
        self.result: Deferred[None] = succeed(None)
        self.prober = HealthProber(
            self.broker.registry, self.broker.control, self.broker.reactor,
            self.broker.config.health, discover=self.hook,
        )  # fmt: skip

    def hook(self, consumer: ConsumerConfig, timeout_s: float) -> Deferred[None]:
        self.seen.append((consumer.name, timeout_s))
        return self.result

    def test_after_healthy_probes_only(self) -> None:
        """A healthy probe runs the hook (the probe's waiters wait for it); a failed one not."""
        self.result = Deferred()
        probed = self.prober.probe("ollama")
        self.broker.pump()
        self.assertEqual(self.seen, [("ollama", 3.0)])
        self.assertNoResult(probed)
        self.result.callback(None)
        self.successResultOf(probed)
        self.broker.consumers["mvoice"].answer(b"GET", b"/api/health", 500, b"{}")
        self.prober.probe("mvoice")
        self.broker.pump()
        self.assertEqual(self.seen, [("ollama", 3.0)])

    def test_hook_failure_is_logged(self) -> None:
        """A failing hook is logged; the probe still ends."""
        self.result = fail(RuntimeError("boom"))
        probed = self.prober.probe("ollama")
        self.broker.pump()
        self.successResultOf(probed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# -- the routes, end to end ------------------------------------------------------


class RouteTests(SynchronousTestCase):
    """The routes through BrokerResource over the real facade of ``Broker``."""

    def setUp(self) -> None:
        self.config = openai_config(
            mvoice=with_openai(MVOICE, "/openai", "whisper-1", "tts-1"),
            ollama=with_openai(OLLAMA, "/v1", "llama3", discover=True),
        )
        self.broker = Broker(self.config)
        self.ollama = self.broker.consumers["ollama"]
        self.mvoice = self.broker.consumers["mvoice"]
        self.ollama.answer(b"GET", b"/v1/models", 200, b'{"data": [{"id": "qwen2.5:7b"}]}')
        facade = self.broker.facade
        self.index = ModelIndex(lambda: facade.config)
        facade.prober = HealthProber(
            self.broker.registry, self.broker.control, self.broker.reactor,
            self.config.health, discover=ModelDiscovery(self.index, self.broker.control),
        )  # fmt: skip
        status = StatusView(
            GpuPoller(CountingReader(), Clock(), 2.0), self.broker.registry, self.broker.scheduler
        )
        self.resource = BrokerResource(facade, status, None, OpenAIRoutes(facade, self.index))

    def send(
        self,
        method: bytes,
        uri: bytes,
        body: bytes = b"",
        content_type: bytes = b"application/json",
        headers: tuple[bytes, ...] = (),
    ) -> Client:
        client = Client(self.resource)
        lines = [b"%s %s HTTP/1.1" % (method, uri), b"Host: broker.local", *headers]
        if body or method == b"POST":
            lines += [b"Content-Type: " + content_type, b"Content-Length: %d" % len(body)]
        client.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.broker.pump()
        return client

    def reply(self, consumer: Any, code: int = 200, body: bytes = b"{}") -> None:
        upstream = consumer.held.pop(0)
        upstream.setResponseCode(code)
        upstream.setHeader(b"content-type", b"application/json")
        upstream.write(body)
        upstream.finish()
        self.broker.pump()

    def assertEnvelope(
        self, client: Client, status: int, code: str, param: str | None = None
    ) -> dict[bytes, list[bytes]]:
        got, headers, body = client.response()
        self.assertEqual(got, status, body)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        error = json.loads(body)["error"]
        self.assertEqual(set(error), ENVELOPE_KEYS)
        self.assertEqual((error["code"], error["param"]), (code, param))
        self.assertTrue(error["message"])
        return headers

    def test_chat_reaches_its_consumer_unchanged(self) -> None:
        """The body, unchanged, reaches openai.path + the suffix, query string kept; the
        consumer's answer comes back as it is, and the lease was taken and given back."""
        body = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
        client = self.send(b"POST", b"/v1/chat/completions?x=1", body.encode())
        self.assertEqual(self.ollama.received[-1], (b"POST", b"/v1/chat/completions?x=1",
                                                    body.encode()))  # fmt: skip
        self.assertEqual(self.broker.scheduler.holder, "ollama")
        self.reply(self.ollama, 200, b'{"choices": []}')
        self.assertEqual(client.response()[::2], (200, b'{"choices": []}'))
        self.assertEqual(self.broker.scheduler.holder, None)
        self.assertEqual(self.broker.scheduler.stats.completed, 1)

    def test_each_route_maps_its_suffix(self) -> None:
        """Every JSON route goes to the model's consumer at its path + the same suffix."""
        for path, route in ROUTES.items():
            if route.multipart:
                continue
            self.send(b"POST", path, b'{"model": "tts-1"}')
            self.assertEqual(self.mvoice.received[-1][:2], (b"POST", b"/openai" + path[3:]))
            self.reply(self.mvoice)

    def test_large_body_spooled_and_rewound(self) -> None:
        """A body Twisted spooled to a file (over 100 KB), the model at its end: scanned,
        then sent whole."""
        body = json.dumps({"input": ["word"] * 60_000, "model": "tts-1"}).encode()
        self.assertGreater(len(body), 300_000)
        self.send(b"POST", b"/v1/embeddings", body)
        self.assertEqual(self.mvoice.received[-1], (b"POST", b"/openai/embeddings", body))

    def test_transcription_multipart(self) -> None:
        """A multipart upload goes by its model field, its body unchanged."""
        audio = bytes(range(256)) * 1000
        body = form(("file", audio, "a.wav"), ("model", b"whisper-1", None))
        self.send(b"POST", b"/v1/audio/transcriptions", body, FORM_TYPE)
        self.assertEqual(self.mvoice.received[-1],
                         (b"POST", b"/openai/audio/transcriptions", body))  # fmt: skip
        self.reply(self.mvoice, 200, b'{"text": "hi"}')

    def test_streamed_answer_passes_chunk_by_chunk(self) -> None:
        """Server-Sent Events reach the client as the consumer writes them."""
        client = self.send(b"POST", b"/v1/chat/completions", b'{"model": "llama3", "stream": true}')
        upstream = self.ollama.held.pop(0)
        upstream.setHeader(b"content-type", b"text/event-stream")
        for n in range(3):
            event = b'data: {"n": %d}\n\n' % n
            upstream.write(event)
            self.broker.pump()
            chunk = b"%x\r\n%s\r\n" % (len(event), event)
            self.assertTrue(client.transport.value().endswith(chunk), n)
        upstream.write(b"data: [DONE]\n\n")
        upstream.finish()
        self.broker.pump()
        code, headers, body = client.response()
        self.assertEqual((code, headers[b"content-type"]), (200, [b"text/event-stream"]))
        self.assertEqual(body, b'data: {"n": 0}\n\ndata: {"n": 1}\n\ndata: {"n": 2}\n\n'
                               b"data: [DONE]\n\n")  # fmt: skip

    def test_discovered_model_before_the_first_probe(self) -> None:
        """A discovered model asked for before any probe: the consumer is probed (and its
        models read) first, then served."""
        self.send(b"POST", b"/v1/completions", b'{"model": "qwen2.5:7b"}')
        self.assertEqual(self.ollama.uris(b"GET"), [b"/api/version", b"/v1/models"])
        self.assertEqual(self.ollama.received[-1][:2], (b"POST", b"/v1/completions"))

    def test_unknown_model(self) -> None:
        """An unknown model: 404 model_not_found, param model; no consumer sees it."""
        client = self.send(b"POST", b"/v1/chat/completions", b'{"model": "gpt-5"}')
        self.assertEnvelope(client, 404, "model_not_found", "model")
        self.assertIn("'gpt-5'", json.loads(client.response()[2])["error"]["message"])
        self.assertEqual(self.ollama.uris(b"POST") + self.mvoice.uris(b"POST"), [])
        self.assertEqual(self.broker.scheduler.stats.rejected, 0)

    def test_missing_model(self) -> None:
        """No model, or not a string, or not JSON: 400 bad_request, param model."""
        for body in (b'{"messages": []}', b'{"model": 3}', b"model=llama3", b""):
            client = self.send(b"POST", b"/v1/chat/completions", body)
            self.assertEnvelope(client, 400, "bad_request", "model")
        client = self.send(b"POST", b"/v1/audio/translations", b'{"model": "whisper-1"}')
        self.assertEnvelope(client, 400, "bad_request", "model")
        self.assertEqual(self.mvoice.received, [])

    def test_wrong_methods(self) -> None:
        """405 in the envelope, with Allow."""
        client = self.send(b"GET", b"/v1/chat/completions")
        headers = self.assertEnvelope(client, 405, "method_not_allowed")
        self.assertEqual(headers[b"allow"], [b"POST"])
        client = self.send(b"POST", b"/v1/models", b"{}")
        headers = self.assertEnvelope(client, 405, "method_not_allowed")
        self.assertEqual(headers[b"allow"], [b"GET, HEAD"])

    def test_queue_full_has_retry_after(self) -> None:
        """queue_full: 503 in the envelope with Retry-After, as the broker's own error."""
        self.broker.scheduler.config = SchedulerConfig(max_queue=1)
        for _ in range(2):
            self.send(b"POST", b"/v1/chat/completions", b'{"model": "llama3"}')
        client = self.send(b"POST", b"/v1/chat/completions", b'{"model": "llama3"}')
        headers = self.assertEnvelope(client, 503, "queue_full")
        self.assertGreaterEqual(int(headers[b"retry-after"][0]), 1)
        self.assertEqual(json.loads(client.response()[2])["error"]["type"], "server_error")

    def test_consumer_errors_pass_unchanged(self) -> None:
        """A consumer's own 4xx is its own body, not wrapped."""
        client = self.send(b"POST", b"/v1/chat/completions", b'{"model": "llama3"}')
        self.reply(self.ollama, 400, b'{"error": {"message": "bad messages"}}')
        self.assertEqual(client.response()[::2], (400, b'{"error": {"message": "bad messages"}}'))

    def test_models_list(self) -> None:
        """GET /v1/models: declared and discovered models, each owned by its consumer."""
        self.broker.facade.prober.probe("ollama")
        self.broker.pump()
        code, _, body = self.send(b"GET", b"/v1/models").response()
        self.assertEqual(code, 200)
        self.assertEqual(
            json.loads(body),
            {"object": "list", "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": owner}
                for model, owner in (("whisper-1", "mvoice"), ("tts-1", "mvoice"),
                                     ("llama3", "ollama"), ("qwen2.5:7b", "ollama"))
            ]},
        )  # fmt: skip

    def test_one_model(self) -> None:
        """GET /v1/models/<id> (percent-encoded or not): the model, or model_not_found."""
        for uri in (b"/v1/models/llama3", b"/v1/models/llam%613"):
            code, _, body = self.send(b"GET", uri).response()
            self.assertEqual((code, json.loads(body)["owned_by"]), (200, "ollama"))
        client = self.send(b"GET", b"/v1/models/nope")
        self.assertEnvelope(client, 404, "model_not_found", "model")

    def test_token_required_in_the_envelope(self) -> None:
        """With a token, its absence is a 401 in the envelope; with it, the route works."""
        self.resource.set_token(b"s3cret")
        client = self.send(b"GET", b"/v1/models")
        headers = self.assertEnvelope(client, 401, "unauthorized")
        self.assertEqual(headers[b"www-authenticate"], [b'Bearer realm="mgpumanager"'])
        client = self.send(b"GET", b"/v1/models", headers=(b"Authorization: Bearer s3cret",))
        self.assertEqual(client.response()[0], 200)

    def test_facade_routes_unchanged(self) -> None:
        """/v1/tts still goes to the facade, its errors in the broker's schema."""
        self.send(b"POST", b"/v1/tts", b"{}")
        self.assertEqual(self.mvoice.received[-1][:2], (b"POST", b"/api/synthesize"))
        code, _, body = self.send(b"GET", b"/v1/tts").response()
        self.assertEqual((code, json.loads(body)["error"]), (405, "method_not_allowed"))

    def test_unreachable_consumer(self) -> None:
        """A consumer that cannot be reached: 502 in the envelope."""
        self.broker.refusing.add(11434)
        self.broker.registry["ollama"].healthy = True
        client = self.send(b"POST", b"/v1/chat/completions", b'{"model": "llama3"}')
        self.assertEnvelope(client, 502, "consumer_unreachable")
