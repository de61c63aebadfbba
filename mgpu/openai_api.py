# -*- test-case-name: tests.test_openai_api -*-
"""OpenAI-compatible routes, routed by model (SPEC 9.2).

``POST /v1/chat/completions`` and its siblings carry the model in the body: a
JSON ``model`` member, or a ``model`` field of a multipart form for the audio
uploads. The broker finds it without holding the body: Twisted has already
read the body into ``request.content`` (in memory under 100 KB, in an unlinked
temporary file above, which is stricter than the contract's first MiB), and
the scanners here read that in chunks and keep only the short strings they
need. The body then goes to the consumer unchanged, scheduled as a
``/v1/<kind>`` request is, to ``openai.path`` + the same suffix.

Which consumer serves a model: the names each consumer declares under
``openai.models`` (one consumer per name, the configuration checks it), then
the ones read from ``GET <path>/models`` at each health probe of a consumer
with ``discover: true``. A discovered name never overrides a declared one;
between two consumers that discover the same name, the first in the file
wins; each such clash is logged once.

The broker's own errors on these routes use OpenAI's envelope,
``{"error": {"message", "type", "param", "code"}}``, which the ``openai``
SDK reads; the status and headers (``Retry-After``) are the broker's own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import IO, Any, Final
from urllib.parse import unquote

from attrs import frozen
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpu.config import Config, ConsumerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.facade import Facade

log = Logger()

MODELS_PATH: Final = b"/v1/models"
#: How much of a body is read at once to find its model.
CHUNK_BYTES: Final = 64 * 1024
#: Read this much between two turns of the reactor, so a huge body does not stall it.
YIELD_EVERY_BYTES: Final = 2**20
#: The longest model name looked at (its encoded bytes); a longer one is refused.
MAX_MODEL_BYTES: Final = 1024
#: At most this many models are taken from one consumer's ``/models``.
MAX_DISCOVERED: Final = 4096
#: How much of a client's or consumer's text goes into a message.
SHOWN_CHARS: Final = 200
#: python-multipart logs a malformed body (stdlib logging, WARNING) before raising: the
#: 400 says so already, and a client must not be able to write to the daemon's stderr.
_SILENT: Final = logging.Logger("python_multipart (silenced)", logging.CRITICAL + 1)


@frozen
class OpenAIRoute:
    """One routed OpenAI path: its suffix under ``openai.path`` and how its body is read."""

    suffix: str
    multipart: bool = False


ROUTES: Final[Mapping[bytes, OpenAIRoute]] = {
    b"/v1/chat/completions": OpenAIRoute("/chat/completions"),
    b"/v1/completions": OpenAIRoute("/completions"),
    b"/v1/embeddings": OpenAIRoute("/embeddings"),
    b"/v1/images/generations": OpenAIRoute("/images/generations"),
    b"/v1/audio/speech": OpenAIRoute("/audio/speech"),
    b"/v1/audio/transcriptions": OpenAIRoute("/audio/transcriptions", multipart=True),
    b"/v1/audio/translations": OpenAIRoute("/audio/translations", multipart=True),
}


def is_openai_path(path: bytes) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes (``/v1/models/<id>`` too)."""
    return path in ROUTES or path == MODELS_PATH or path.startswith(MODELS_PATH + b"/")


# -- errors ----------------------------------------------------------------


class ModelError(BrokerError):
    """A broker error about the request's ``model``: its envelope names that param."""

    param = "model"


def envelope(error: BrokerError) -> dict[str, object]:
    """OpenAI's error object for a broker error; ``code`` is the broker's code."""
    return {
        "error": {
            "message": error.message,
            "type": _error_type(error.status),
            "param": error.param if isinstance(error, ModelError) else None,
            "code": error.code,
        }
    }


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def render_error(request: Request, error: BrokerError) -> bytes:
    """Write ``error`` in OpenAI's envelope, with the broker's status and headers."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return json.dumps(envelope(error)).encode("utf-8")


def _shown(text: str) -> str:
    """``text`` quoted for a message: unprintable characters escaped, cut to ``SHOWN_CHARS``."""
    cut = text[: SHOWN_CHARS + 1]
    shown = ascii(cut) if not cut.isprintable() else repr(cut)
    return shown if len(cut) <= SHOWN_CHARS else shown[: SHOWN_CHARS + 2] + "..."


# -- finding the model in a body ------------------------------------------

#: Outside strings, the bytes that matter at the top level, and deeper.
_TOP_LEVEL = re.compile(rb'["{}\[\]:,]')
_NESTED = re.compile(rb'["{}\[\]]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


class JsonModel:
    """The top-level ``model`` string of a JSON object, from its bytes fed in chunks.

    Only the top level is followed: strings inside nested values are skipped
    without being kept, and a top-level string is kept up to
    ``MAX_MODEL_BYTES``. A key repeated takes its last value, as ``json.loads``
    does. The rest of the JSON is the consumer's to judge.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._started = False
        self._done = False
        self._in_string = False
        self._escaped = False  # the last chunk ended on a backslash inside a string
        self._kept: bytearray | None = None  # the top-level string being read, if short
        self._key_next = False  # the next top-level string is a key
        self._key: str | None = None  # the key whose value comes next
        self._found = False  # a top-level "model" key was seen
        self._model: str | None = None  # its value, if a short string

    def feed(self, data: bytes) -> bool:
        """Read ``data``; True once the object is complete (the rest is not needed)."""
        at = 0
        while at < len(data) and not self._done:
            at = self._string(data, at) if self._in_string else self._outside(data, at)
        return self._done

    def model(self) -> str:
        """The model, once the whole body was fed; a clean ``ModelError`` when there is none."""
        if not self._started:
            raise ModelError("bad_request", "the body must be a JSON object with a model")
        if not self._done:
            raise ModelError("bad_request", "the body is not a complete JSON object")
        if not self._found:
            raise ModelError("bad_request", "the body has no model")
        if self._model is None:
            raise ModelError(
                "bad_request", f"model must be a string of at most {MAX_MODEL_BYTES} bytes"
            )
        return self._model

    def _outside(self, data: bytes, at: int) -> int:
        if not self._started:
            rest = data[at:].lstrip(_WHITESPACE)
            if not rest:
                return len(data)
            if rest[:1] != b"{":
                raise ModelError("bad_request", "the body must be a JSON object with a model")
            at = len(data) - len(rest)
        match = (_TOP_LEVEL if self._depth <= 1 else _NESTED).search(data, at)
        if match is None:
            return len(data)
        self._token(match.group())
        return match.end()

    def _token(self, token: bytes) -> None:
        if token == b'"':
            self._in_string = True
            self._kept = bytearray() if self._depth == 1 else None
        elif token in b"{[":
            self._depth += 1
            if self._depth == 1:
                self._started = self._key_next = True
        elif token in b"}]":
            self._depth -= 1
            self._done = self._depth <= 0
        elif token == b":":
            self._key_next = False
            if self._key == "model":
                self._found, self._model = True, None  # a string value sets it next
        else:  # ","
            self._key_next, self._key = True, None

    def _string(self, data: bytes, at: int) -> int:
        start = at
        if self._escaped:
            self._escaped = False
            at += 1
        match = _IN_STRING.search(data, at)
        if match is None:
            self._keep(data, start, len(data))
            return len(data)
        if match.group() == b"\\":
            end = min(match.end() + 1, len(data))
            self._escaped = end == match.end()  # the escaped byte is in the next chunk
            self._keep(data, start, end)
            return end
        self._keep(data, start, match.start())
        self._in_string = False
        self._ended_string()
        return match.end()

    def _keep(self, data: bytes, start: int, end: int) -> None:
        """Keep ``data[start:end]`` of a top-level string, unless it is too long to matter."""
        kept = self._kept
        if kept is None:
            return  # a nested string, or one already too long: not even sliced
        if len(kept) + end - start > MAX_MODEL_BYTES * 6:  # "\uXXXX" per character at most
            self._kept = None
        else:
            kept += data[start:end]

    def _ended_string(self) -> None:
        if self._depth != 1:
            return
        text = None if self._kept is None else _json_string(bytes(self._kept))
        if self._key_next:
            self._key = text
        elif self._key == "model":
            fits = (
                text is not None and len(text.encode("utf-8", "surrogatepass")) <= MAX_MODEL_BYTES
            )
            self._model = text if fits else None
        self._kept = None


def _json_string(raw: bytes) -> str | None:
    """The text of a JSON string's raw contents (between its quotes), or None if invalid."""
    try:
        text = json.loads('"' + raw.decode("utf-8") + '"')
    except ValueError:  # UnicodeDecodeError included
        return None
    return text if isinstance(text, str) else None


class MultipartModel:
    """The ``model`` field of a ``multipart/form-data`` body, from its bytes fed in chunks.

    python-multipart's streaming parser hands each part's data to a callback
    as slices of the chunk being parsed: file data is never copied, only the
    ``model`` field is kept (up to ``MAX_MODEL_BYTES``). The first ``model``
    field decides; nothing after it is read.
    """

    def __init__(self, content_type: bytes | None) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise ModelError(
                "bad_request", "the body must be multipart/form-data (with a boundary) with a model"
            )
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._in_model = False
        self._value: bytearray | None = None
        self._model: str | None = None
        self._done = False
        #: The largest slice of data the parser handed over at once (for the tests).
        self.largest_slice = 0
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begins,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value_part,
                    "on_header_end": self._header_ends,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_ends,
                },
            )
        except FormParserError as e:
            raise ModelError("bad_request", f"the multipart body cannot be read: {e}") from None
        self._parser.logger = _SILENT

    def feed(self, data: bytes) -> bool:
        """Parse ``data``; True once the model field was read (the rest is not needed)."""
        try:
            self._parser.write(data)
        except (FormParserError, ValueError) as e:
            raise ModelError("bad_request", f"the multipart body is malformed: {e}") from None
        return self._done

    def model(self) -> str:
        """The model field, once read; a clean ``ModelError`` when there is none."""
        if not self._done:
            raise ModelError("bad_request", "the form has no model field")
        if self._model is None:
            raise ModelError(
                "bad_request", f"model must be UTF-8 text of at most {MAX_MODEL_BYTES} bytes"
            )
        return self._model

    def _part_begins(self) -> None:
        self._in_model = False
        self._header_name.clear()
        self._header_value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_ends(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            kind, options = parse_options_header(bytes(self._header_value))
            self._in_model = kind == b"form-data" and options.get(b"name") == b"model"
        self._header_name.clear()
        self._header_value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.largest_slice = max(self.largest_slice, end - start)
        if not self._in_model or self._done:
            return
        if self._value is None:
            self._value = bytearray()
        if len(self._value) <= MAX_MODEL_BYTES:
            self._value += data[start : min(end, start + MAX_MODEL_BYTES + 1)]

    def _part_ends(self) -> None:
        if not self._in_model or self._done:
            return
        self._done = True
        value = bytes(self._value or b"")
        if len(value) <= MAX_MODEL_BYTES:
            try:
                self._model = value.decode("utf-8")
            except UnicodeDecodeError:
                self._model = None


async def read_model(
    content: IO[bytes] | None,
    scanner: JsonModel | MultipartModel,
    pause: Callable[[], Deferred[None]] | None = None,
) -> str:
    """Feed ``content`` to ``scanner`` chunk by chunk until it has the model, then rewind.

    ``pause`` is awaited after each ``YIELD_EVERY_BYTES``, so that a huge body
    does not stall the reactor.
    """
    if content is None:
        return scanner.model()
    content.seek(0)
    try:
        since_pause = 0
        while chunk := content.read(CHUNK_BYTES):
            if scanner.feed(chunk):
                break
            since_pause += len(chunk)
            if pause is not None and since_pause >= YIELD_EVERY_BYTES:
                since_pause = 0
                await pause()
        return scanner.model()
    finally:
        content.seek(0)  # the relay sends the body from where the file stands


# -- which consumer serves a model ----------------------------------------


@frozen
class _Discovered:
    """A consumer's ``/models`` as last read, and where it was read from."""

    url: str
    path: str
    models: tuple[str, ...]


class ModelIndex:
    """Which consumer serves each model: declared in the file, then discovered.

    ``config_of`` gives the configuration in force (a reload replaces it). The
    table is built again when it or a discovered list changes.
    """

    def __init__(self, config_of: Callable[[], Config]) -> None:
        self._config_of = config_of
        self._discovered: dict[str, _Discovered] = {}
        self._version = 0
        self._built: tuple[Config, int] | None = None
        self._table: dict[str, str] = {}
        self._logged: set[tuple[str, str, str]] = set()

    def learn(self, consumer: ConsumerConfig, models: Iterable[str]) -> None:
        """``consumer``'s own list of models, just read from it."""
        openai = consumer.openai
        if openai is None:
            return
        found = _Discovered(consumer.url, openai.path, tuple(dict.fromkeys(models)))
        if self._discovered.get(consumer.name) != found:
            self._discovered[consumer.name] = found
            self._version += 1
            self.table()  # a new clash is logged now, not at the next request

    def discovered(self, consumer: ConsumerConfig) -> tuple[str, ...]:
        """What was last read from ``consumer`` (its present URL and path) with discovery on."""
        openai = consumer.openai
        found = self._discovered.get(consumer.name)
        if openai is None or not openai.discover or found is None:
            return ()
        if (found.url, found.path) != (consumer.url, openai.path):
            return ()  # read from what it was before a reload moved it
        return found.models

    def table(self) -> Mapping[str, str]:
        """Model name -> consumer name, declared names first, then discovered, in file order."""
        config = self._config_of()
        if self._built != (config, self._version):
            self._table = self._build(config)
            self._built = (config, self._version)
        return self._table

    def owner(self, model: str) -> ConsumerConfig | None:
        """The consumer that serves ``model``, if any."""
        name = self.table().get(model)
        return None if name is None else self._config_of().consumers[name]

    def _build(self, config: Config) -> dict[str, str]:
        table: dict[str, str] = {}
        declared: set[str] = set()
        for name, consumer in config.consumers.items():
            if consumer.openai is not None:
                for model in consumer.openai.models:
                    table.setdefault(model, name)
                    declared.add(model)
        for name, consumer in config.consumers.items():
            for model in self.discovered(consumer):
                winner = table.setdefault(model, name)
                if winner != name:
                    self._clash(model, winner, name, model in declared)
        return table

    def _clash(self, model: str, winner: str, loser: str, declared: bool) -> None:
        if (model, winner, loser) in self._logged:
            return
        self._logged.add((model, winner, loser))
        if declared:
            log.warn(
                "model {model} discovered on {loser} is declared by {winner}, which serves it",
                model=_shown(model), loser=loser, winner=winner,
            )  # fmt: skip
        else:
            log.warn(
                "model {model} is discovered on both {winner} and {loser}: {winner}, "
                "first in the file, serves it",
                model=_shown(model), loser=loser, winner=winner,
            )  # fmt: skip


def parse_model_list(body: object) -> tuple[str, ...]:
    """The model ids of an OpenAI ``/models`` answer; ``ValueError`` when it is not one.

    Entries without a usable id (not a string, empty, unprintable, too long)
    are skipped; at most ``MAX_DISCOVERED`` are taken.
    """
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError('not an object with a "data" list')
    models = []
    for entry in body["data"][:MAX_DISCOVERED]:
        model = entry.get("id") if isinstance(entry, dict) else None
        if (
            isinstance(model, str)
            and model
            and model.isprintable()
            and len(model.encode("utf-8", "surrogatepass")) <= MAX_MODEL_BYTES
        ):
            models.append(model)
    return tuple(models)


class ModelDiscovery:
    """The health prober's hook: reads ``GET <path>/models`` of consumers with ``discover``.

    A failed read keeps the last list (the consumer may be restarting); each
    new reason is logged once, as is each change of the list.
    """

    def __init__(self, index: ModelIndex, control: ConsumerControl) -> None:
        self._index = index
        self._control = control
        self._said: dict[str, str] = {}

    def __call__(self, consumer: ConsumerConfig, timeout_s: float) -> Deferred[None]:
        openai = consumer.openai
        if openai is None or not openai.discover:
            return succeed(None)
        path = openai.target("/models")
        read = self._control.get_json(consumer, path, timeout_s)
        return read.addCallback(self._read, consumer, path).addErrback(self._unread, consumer, path)

    def _read(self, answer: tuple[int, object], consumer: ConsumerConfig, path: str) -> None:
        status, body = answer
        if not 200 <= status < 300:
            raise ValueError(f"HTTP {status}")
        models = parse_model_list(body)
        if models != self._index.discovered(consumer):
            log.info(
                "{consumer} serves {count} models by its {path}",
                consumer=consumer.name,
                count=len(models),
                path=path,
            )
        self._index.learn(consumer, models)
        self._said.pop(consumer.name, None)

    def _unread(self, failure: Failure, consumer: ConsumerConfig, path: str) -> None:
        error = failure.value
        why = error.message if isinstance(error, BrokerError) else failure.getErrorMessage()
        if self._said.get(consumer.name) != why:
            self._said[consumer.name] = why
            log.warn(
                "cannot read the models of {consumer} from GET {path}: {why}; "
                "keeping the last list read",
                consumer=consumer.name,
                path=path,
                why=why,
            )


# -- the routes ------------------------------------------------------------

Respond = Callable[[Request, Coroutine[Any, Any, None]], int]


class OpenAIRoutes:
    """Serves the OpenAI-compatible routes with the facade's scheduled path."""

    def __init__(self, facade: Facade, index: ModelIndex | None = None) -> None:
        self._facade = facade
        self.index = index or ModelIndex(lambda: facade.config)

    def render(self, request: Request, respond: Respond) -> bytes | int:
        """Answer one request on an OpenAI path; ``respond`` runs a proxied one."""
        path = request.path
        if path in ROUTES:
            _note(request, route=path.decode("ascii"))
            if request.method != b"POST":
                return _not_allowed(request, "POST")
            return respond(request, self.serve(request, ROUTES[path]))
        _note(request, route=MODELS_PATH.decode("ascii"))
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed(request, "GET, HEAD")
        if path == MODELS_PATH:
            return _json(request, self.models())
        wanted = unquote(path[len(MODELS_PATH) + 1 :].decode("ascii", "replace"))
        for model in self.models()["data"]:
            if model["id"] == wanted:
                return _json(request, model)
        return render_error(request, _not_found(wanted))

    def unauthorized(self, request: Request) -> bytes:
        """401 in OpenAI's envelope: the SDK's ``api_key`` is the broker's token."""
        request.setHeader(b"www-authenticate", b'Bearer realm="mgpumanager"')
        error = BrokerError("unauthorized", "a valid bearer token is required (the api_key)")
        return render_error(request, error)

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: every model of every consumer, in OpenAI's list shape."""
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": consumer}
            for model, consumer in self.index.table().items()
        ]
        return {"object": "list", "data": data}

    async def serve(self, request: Request, route: OpenAIRoute) -> None:
        """Find the request's model and its consumer; relay it there, scheduled."""
        facade = self._facade
        scanner: JsonModel | MultipartModel = (
            MultipartModel(request.getHeader(b"content-type")) if route.multipart else JsonModel()
        )
        model = await read_model(
            request.content, scanner, lambda: deferLater(facade.clock, 0, lambda: None)
        )
        consumer = await self._owner(model)
        openai = consumer.openai
        assert openai is not None  # only such consumers own models
        _, sep, query = request.uri.partition(b"?")
        target = openai.target(route.suffix).encode("ascii") + sep + query
        await facade.serve_model(request, consumer, target)

    async def _owner(self, model: str) -> ConsumerConfig:
        """The consumer of ``model``; consumers that discover models and were never probed
        are probed first (the daemon just started, or a reload added them)."""
        consumer = self.index.owner(model)
        if consumer is None and await self._probe_unprobed():
            consumer = self.index.owner(model)
        if consumer is None:
            raise _not_found(model)
        return consumer

    async def _probe_unprobed(self) -> bool:
        facade = self._facade
        names = [
            name
            for name, consumer in facade.config.consumers.items()
            if consumer.openai is not None
            and consumer.openai.discover
            and (state := facade.registry.get(name)) is not None
            and state.healthy is None
        ]
        if names:
            await gatherResults([facade.prober.probe(name) for name in names])
        return bool(names)


def _not_found(model: str) -> ModelError:
    return ModelError("model_not_found", f"the model {_shown(model)} is served by no consumer")


def _not_allowed(request: Request, allow: str) -> bytes:
    request.setHeader(b"allow", allow.encode("ascii"))
    path = request.path.decode("latin-1")
    return render_error(request, BrokerError("method_not_allowed", f"{path} allows {allow}"))


def _json(request: Request, value: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode("utf-8")


def _note(request: Request, **facts: object) -> None:
    """Tell the access log and the metrics about the request (see ``TimedRequest``)."""
    for name, value in facts.items():
        setattr(request, name, value)
