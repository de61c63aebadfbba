# -*- test-case-name: tests.test_sim -*-
"""A simulated consumer over HTTP: its resource, JSON answers, ranged synthetic bodies.

``SimResource`` routes requests to the consumer's handlers, applies its
injected faults and serves the reserved prefix ``/_sim/``, through which tests
steer and watch a consumer:

- ``GET /_sim/log``: the work requests, ``[{"consumer", "kind", "path",
  "start", "end", "cold"}]`` (clock seconds; ``end`` null while running;
  ``start`` is the arrival, so a cold start's load is inside the interval);
  ``--log FILE`` appends the same entries, one JSON line each, as they end;
- ``GET /_sim/state``: ``{"name", "service", "loaded", "loading", "vram_mib",
  "busy"}``;
- ``GET /_sim/faults``, ``POST /_sim/faults`` with ``{"status": {path: code},
  "hang": [path], "delay_s": {path: seconds}, "free_delay_s": seconds}``:
  replaces every fault at once (``{}`` clears them).  ``status``: the route
  answers that code and does nothing else; ``hang``: it never answers;
  ``delay_s``: it answers that much later; ``free_delay_s``: an unload answers
  at once but its memory frees that much later.  ``/_sim/`` itself is never
  faulted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

if TYPE_CHECKING:
    from mgpu.sim.consumers import SimConsumer

CHUNK: Final = 64 * 1024
_PATTERN: Final = bytes(range(251)) * (CHUNK // 251 + 2)
_log = Logger()

Handler = Callable[[Request], Awaitable[None]]


class HttpError(Exception):
    """Ends a handler with this status and JSON body."""

    def __init__(self, code: int, body: object) -> None:
        super().__init__(code, body)
        self.code = code
        self.body = body


class SimResource(Resource):
    """Routes a consumer's requests, applies its faults, serves ``/_sim/``."""

    isLeaf = True

    def __init__(self, consumer: SimConsumer) -> None:
        super().__init__()
        self.consumer = consumer
        self._routes = consumer.routes()

    def render(self, request: Request) -> int:
        d = Deferred.fromCoroutine(self._handle(request))
        d.addErrback(_failed, request)
        return NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        if path.startswith("/_sim/"):
            await self._sim(request, method, path)
            return
        methods = self._routes.get(path) or self._routes.get(path[: path.rfind("/") + 1] + "*")
        if methods is None:
            raise HttpError(404, {"error": f"not found: {path}"})
        handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if handler is None:
            request.setHeader(b"Allow", ", ".join(methods).encode())
            raise HttpError(405, {"error": f"method {method} not allowed on {path}"})
        faults = self.consumer.faults
        if path in faults.delay_s:
            await self.consumer.sleep(faults.delay_s[path])
        if path in faults.hang:
            return
        if path in faults.status:
            raise HttpError(faults.status[path], {"error": "injected fault", "path": path})
        await handler(request)

    async def _sim(self, request: Request, method: str, path: str) -> None:
        # Imported here: mgpu.sim.consumers answers through this module.
        from mgpu.sim.consumers import Faults

        consumer = self.consumer
        if (method, path) == ("GET", "/_sim/log"):
            send_json(request, [entry.to_json() for entry in consumer.log])
        elif (method, path) == ("GET", "/_sim/state"):
            send_json(request, consumer.state())
        elif path == "/_sim/faults" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    consumer.faults = Faults.from_json(json_body(request))
                except ValueError as e:
                    raise HttpError(400, {"error": str(e)}) from None
            send_json(request, consumer.faults.to_json())
        else:
            raise HttpError(404, {"error": f"not found: {method} {path}"})


class _QuietSite(Site):
    """A Site without access lines: the demo probes every consumer every second."""

    def log(self, request: http.Request) -> None:
        pass


def sim_site(consumer: SimConsumer) -> Site:
    """The HTTP site of one simulated consumer."""
    return _QuietSite(SimResource(consumer), parsePOSTFormSubmission=False)


def _failed(reason: Failure, request: Request) -> None:
    """A handler's error as a JSON answer; a stream that broke after its status line is cut."""
    if not reason.check(HttpError, CancelledError):
        _log.failure("simulated consumer failed", reason)
    if request.startedWriting:
        if alive(request):
            request.loseConnection()
    elif reason.check(HttpError):
        error = cast(HttpError, reason.value)
        send_json(request, error.body, error.code)
    elif reason.check(CancelledError):
        send_json(request, {"error": "the simulator stopped"}, 503)
    else:
        send_json(request, {"error": reason.getErrorMessage()}, 500)


def alive(request: Request) -> bool:
    """Whether the response can still be written: not finished, client still there."""
    return not request.finished and not request._disconnected


def send_json(request: Request, body: object, code: int = 200) -> None:
    """Finish the request with a JSON body (headers only for HEAD)."""
    _send(request, json.dumps(body).encode(), b"application/json", code)


def send_text(request: Request, text: str, code: int = 200) -> None:
    """Finish the request with a plain text body."""
    _send(request, text.encode(), b"text/plain; charset=utf-8", code)


def send_bytes(request: Request, data: bytes, content_type: bytes, code: int = 200) -> None:
    """Finish the request with ``data`` (an image, audio) as its body."""
    _send(request, data, content_type, code)


def _send(request: Request, data: bytes, content_type: bytes, code: int) -> None:
    if not alive(request):
        return
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(data))
    request.write(data)
    request.finish()


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body; an empty body is ``{}``; anything else a 400."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise HttpError(400, {"error": "the body is not JSON"}) from None
    if not isinstance(data, dict):
        raise HttpError(400, {"error": "the body must be a JSON object"})
    return data


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as ``(start, stop)``; None: serve it all; ``ValueError``: 416.

    A malformed header, or several ranges, is ignored (RFC 9110 allows serving
    the whole body); a range that starts past the end is unsatisfiable.
    """
    if header is None:
        return None
    match = re.fullmatch(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or match.group(1) == match.group(2) == b"":
        return None
    first, last = match.group(1), match.group(2)
    if first == b"":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise ValueError("unsatisfiable")
        return max(size - suffix, 0), size
    start = int(first)
    stop = size if last == b"" else int(last) + 1
    if last != b"" and stop <= start:
        return None
    if start >= size:
        raise ValueError("unsatisfiable")
    return start, min(stop, size)


@frozen
class SyntheticBody:
    """A deterministic body of ``size`` bytes, made on demand: byte ``i`` is ``i % 251``.

    ``prefix`` replaces the first bytes (a WAV header).  Nothing is held but
    one pattern block, whatever the size.
    """

    size: int
    prefix: bytes = b""

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``offset`` to ``offset + length`` (at most ``CHUNK``), cut at the end."""
        n = max(0, min(length, CHUNK, self.size - offset))
        data = _PATTERN[offset % 251 : offset % 251 + n]
        if offset < len(self.prefix):
            head = self.prefix[offset : offset + n]
            data = head + data[len(head) :]
        return data


def send_body(request: Request, body: SyntheticBody) -> None:
    """Serve ``body``, or the one ``Range`` asked for (206; 416 past its end); HEAD: headers."""
    request.setHeader(b"Accept-Ranges", b"bytes")
    try:
        span = parse_range(request.getHeader(b"Range"), body.size)
    except ValueError:
        request.setHeader(b"Content-Range", b"bytes */%d" % body.size)
        raise HttpError(416, {"error": "range not satisfiable"}) from None
    start, stop = (0, body.size) if span is None else span
    if span is not None:
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (start, stop - 1, body.size))
    request.setHeader(b"Content-Length", b"%d" % (stop - start))
    if request.method == b"HEAD" or start == stop:
        request.finish()
        return
    BodyProducer(request, body, start, stop).start()


@implementer(IPushProducer)
class BodyProducer:
    """Writes ``body[start:stop]`` in ``CHUNK`` writes while the transport wants more.

    A push producer: the transport pauses it when its buffer fills, so memory
    stays at a chunk or two whatever the size (a 300 MiB body is never built).
    """

    def __init__(self, request: Request, body: SyntheticBody, start: int, stop: int) -> None:
        self._request = request
        self._body = body
        self._offset = start
        self._stop = stop
        self._paused = False
        self._done = False
        self._writing = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._write()

    def _write(self) -> None:
        if self._writing:
            return
        self._writing = True
        try:
            while not self._paused and not self._done:
                if self._offset >= self._stop:
                    self._done = True
                    self._request.unregisterProducer()
                    self._request.finish()
                    return
                data = self._body.read(self._offset, self._stop - self._offset)
                self._offset += len(data)
                self._request.write(data)
        finally:
            self._writing = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        self._done = True
