# -*- test-case-name: tests.test_api -*-
"""The HTTP interface: the hot facade routes, ``/audio``, native prefixes, and Klein for the rest.

``POST /v1/<kind>``, ``/audio/*`` and each consumer's native prefix are
dispatched on the raw request before Klein: the facade is the hot path, and
proxied paths must be checked as the client sent them (werkzeug decodes
``%2F`` and merges ``//`` before routing).
Everything else goes to a small Klein app whose 404 and 405 are rendered in
the broker's error schema. A request target with a byte outside VCHAR is
refused with ``400 bad_request`` before any of them.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import re
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, cast

from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mgpu.admin import Admin
from mgpu.config import KINDS, Config, ConfigError, ConsumerConfig
from mgpu.errors import BrokerError
from mgpu.facade import Facade
from mgpu.metrics import BrokerMetrics
from mgpu.openai_api import OpenAIRoutes, is_openai_path
from mgpu.openai_api import render_error as openai_error
from mgpu.relay import RelayBroken, abort_connection, client_host
from mgpu.reload import Reloader
from mgpu.sse import EventStreams
from mgpu.status import StatusView

log = Logger()

_FACADE_PATHS = {f"/v1/{kind}".encode(): kind for kind in KINDS}
_AUDIO_PREFIX = b"/audio/"
#: ``.`` and ``..`` segments, ``//`` (absolute URLs too), backslashes, and
#: percent-encoded dots, slashes, backslashes and NULs.
_UNSAFE_PATH = re.compile(rb"(^|/)\.\.?(/|$)|//|\\|%2e|%2f|%5c|%00", re.I)
#: The visible ASCII characters (VCHAR, 0x21-0x7E): all a request target may hold.
_VCHAR = bytes(range(0x21, 0x7F))


def audio_target(uri: bytes) -> bytes:
    """The consumer path for a raw ``/audio/...`` request URI, or ``bad_request``."""
    path, sep, query = uri.partition(b"?")
    rest = path[len(_AUDIO_PREFIX) :]
    # ``rest`` starting with "/" is a ``//`` across the prefix: /audio//etc/passwd.
    if (
        not path.startswith(_AUDIO_PREFIX)
        or not rest
        or rest.startswith(b"/")
        or _UNSAFE_PATH.search(rest)
    ):
        raise BrokerError("bad_request", "the /audio path must stay under /audio/")
    return path + sep + query


def native_target(prefix: bytes, uri: bytes) -> bytes:
    """The consumer target for a raw request URI under a native ``prefix``, or ``bad_request``.

    The rest of the path after the prefix ("/" if none) with the query as
    sent; the same path tricks as for ``/audio`` are refused, so the target
    never leaves the consumer's root.
    """
    path, sep, query = uri.partition(b"?")
    rest = path[len(prefix) :]
    if not _under(path, prefix) or _UNSAFE_PATH.search(rest):
        where = prefix.decode("ascii", "replace")
        raise BrokerError("bad_request", f"the path must stay under {where}/")
    return (rest or b"/") + sep + query


def _under(path: bytes, prefix: bytes) -> bool:
    """Whether ``path`` is ``prefix`` or lies under it, segment-wise (/ollamax is not /ollama)."""
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == 0x2F)


def native_prefixes(config: Config) -> tuple[tuple[bytes, ConsumerConfig], ...]:
    """Each native prefix and its consumer (the config forbids one under another)."""
    return tuple(
        (c.native.prefix.encode("ascii"), c) for c in config.consumers.values() if c.native
    )


def _origin_path(uri: bytes) -> bytes:
    """The path of a request target: an absolute-form one's (``http://host/a?q`` -> /a) too."""
    path = uri.partition(b"?")[0]
    if path.startswith(b"/"):
        return path
    _, scheme, rest = path.partition(b"://")
    return b"/" + (rest if scheme else path).partition(b"/")[2]


def is_websocket(request: Request) -> bool:
    """Whether the request asks to upgrade its connection to a WebSocket."""
    upgrade = request.getHeader(b"upgrade") or b""
    return any(token.strip().lower() == b"websocket" for token in upgrade.split(b","))


def _note(request: Request, **facts: object) -> None:
    """Tell the access log and the metrics about the request (see ``TimedRequest``)."""
    for name, value in facts.items():
        setattr(request, name, value)


def _absolute_audio(uri: bytes) -> bool:
    """An absolute-form request line for /audio (``GET http://host/audio/x``): refused."""
    return not uri.startswith(b"/") and b"/audio/" in uri.partition(b"?")[0]


def render_error(request: Request, error: BrokerError) -> bytes:
    """Write ``error`` as the broker's JSON error response and return its body."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return error.body()


@frozen
class Operations:
    """What the operator's routes need: admin actions, reload, events, metrics."""

    admin: Admin
    reloader: Reloader
    streams: EventStreams
    metrics: BrokerMetrics


class BrokerResource(Resource):
    """The root resource: every request of the daemon starts here."""

    isLeaf = True

    def __init__(
        self,
        facade: Facade,
        status: StatusView,
        token: bytes | None = None,
        openai: OpenAIRoutes | None = None,
    ) -> None:
        super().__init__()
        self._facade = facade
        self._status = status
        #: OpenAI's routes by model (SPEC 9.2); by default with declared models only.
        self._openai = openai or OpenAIRoutes(facade)
        self._token: bytes | None = None
        self._natives_of: Config | None = None
        self._natives: tuple[tuple[bytes, ConsumerConfig], ...] = ()
        self.serve_operations(None)
        self.set_token(token)

    def serve_operations(self, operations: Operations | None) -> None:
        """Serve the operator's routes (the dashboard, metrics, events, admin) with these."""
        self._app = BrokerApp(self._status, operations)
        self._rest = self._app.app.resource()
        self._streams = None if operations is None else operations.streams

    def set_token(self, token: bytes | None) -> None:
        """Require ``token`` from now on (None: no auth); a reload may change it.

        A changed token ends the open event streams: a client whose token was
        revoked must not go on hearing what happens.
        """
        changed = self._token != token
        self._token = token
        if changed and self._streams is not None:
            self._streams.end_all()

    def _authorized(self, request: Request) -> bool:
        token = self._token
        if token is None or request.path == b"/healthz":
            return True
        given = request.getHeader(b"authorization") or b""
        if given[:6].lower() == b"basic ":
            # Browsers cannot send a bearer token to the dashboard; they send
            # Basic credentials, with the token as the password.
            return _basic_password_is(given[6:], token)
        scheme, _, credentials = given.partition(b" ")
        # The scheme is case-insensitive (RFC 9110); the token is compared in constant time.
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials, token)

    def render(self, request: Request) -> bytes | int:
        if request.uri.translate(None, _VCHAR):
            # Control bytes, DEL and non-ASCII: refused before any route (and
            # a consumer) sees them. Twisted refuses some of them itself.
            return render_error(
                request, BrokerError("bad_request", "the request target has bytes outside VCHAR")
            )
        path = request.path
        if not self._authorized(request):
            if is_openai_path(path):
                return self._openai.unauthorized(request)
            return self._unauthorized(request, path)
        if path == b"/v1/events" and self._streams is not None:
            if request.method != b"GET":
                return _not_allowed(request, "GET")
            return self._streams.render(request)
        if is_openai_path(path):
            respond = functools.partial(self._respond, errors=openai_error)
            return self._openai.render(request, respond)
        kind = _FACADE_PATHS.get(path)
        if kind is not None:
            if request.method != b"POST":
                return _not_allowed(request, "POST")
            return self._respond(request, self._facade.serve_kind(request, kind))
        if path.startswith(_AUDIO_PREFIX) or _absolute_audio(request.uri):
            if request.method not in (b"GET", b"HEAD"):
                return _not_allowed(request, "GET, HEAD")
            try:
                target = audio_target(request.uri)
            except BrokerError as e:
                return render_error(request, e)
            return self._respond(request, self._facade.serve_audio(request, target))
        native = self._native(path)
        if native is not None:
            return self._serve_native(request, *native)
        if not path.startswith(b"/") and self._native(_origin_path(path)) is not None:
            _note(request, route="native")
            return render_error(
                request, BrokerError("bad_request", "absolute-form request targets are refused")
            )
        if b"//" in path or b"%2f" in path.lower():
            # werkzeug would merge or decode these and route them anyway (or
            # answer with an HTML redirect): the contract says unknown route.
            return render_error(request, BrokerError("not_found", "no such route"))
        return cast(bytes | int, self._rest.render(request))

    def _unauthorized(self, request: Request, path: bytes) -> bytes:
        """401; the dashboard and native routes ask for Basic credentials (a browser's prompt)."""
        browser = path == b"/" or self._native(path) is not None
        if browser and path != b"/":
            _note(request, route="native")
        scheme = b"Basic" if browser else b"Bearer"
        request.setHeader(b"www-authenticate", scheme + b' realm="mgpumanager"')
        return render_error(
            request, BrokerError("unauthorized", "a valid bearer token is required")
        )

    def _native(self, path: bytes) -> tuple[bytes, ConsumerConfig] | None:
        """The native prefix ``path`` lies under, and its consumer, in the current config."""
        config = self._facade.config
        if config is not self._natives_of:  # a reload replaced it
            self._natives_of = config
            self._natives = native_prefixes(config)
        for prefix, consumer in self._natives:
            if _under(path, prefix):
                return prefix, consumer
        return None

    def _serve_native(
        self, request: Request, prefix: bytes, consumer: ConsumerConfig
    ) -> bytes | int:
        """Hand a request under a native prefix to the facade, its WebSocket upgrade to the hook;
        a GET or HEAD of the bare prefix is redirected to ``prefix/``."""
        _note(request, route="native", consumer=consumer.name)
        if request.path == prefix and request.method in (b"GET", b"HEAD"):
            return _to_slash(request, prefix)
        try:
            target = native_target(prefix, request.uri)
            client_host(request)  # a malformed Host is refused before any wait
        except BrokerError as e:
            return render_error(request, e)
        if is_websocket(request):
            return self._serve_websocket(request, consumer, target)
        return self._respond(request, self._facade.serve_native(request, consumer, target))

    def _serve_websocket(
        self, request: Request, consumer: ConsumerConfig, target: bytes
    ) -> bytes | int:
        """Tunnel an ``Upgrade: websocket`` request through the facade's hook, if it has one.

        The hook is ``serve_websocket(request, consumer, target)``, a coroutine
        run as ``serve_native`` is: a ``BrokerError`` before the consumer's 101
        is answered as JSON, a client that leaves cancels it, and once it
        returns the request is finished, unless it is already, or the hook
        took the connection away from the channel (``channel.transport`` None).
        """
        hook = getattr(self._facade, "serve_websocket", None)
        if hook is None:
            return render_error(
                request, BrokerError("bad_request", "WebSocket upgrades are not supported yet")
            )
        return self._respond(request, hook(request, consumer, target))

    def _respond(
        self,
        request: Request,
        work: Coroutine[Any, Any, None],
        errors: Callable[[Request, BrokerError], bytes] = render_error,
    ) -> int:
        """Run a proxied request; cancel it if the client leaves; render broker errors
        with ``errors`` (OpenAI's routes have their own envelope)."""
        client_gone = False
        done: Deferred[None] | None = None

        def left(_: Failure) -> None:
            nonlocal client_gone
            client_gone = True
            if done is not None:
                done.cancel()

        # Registered before the work starts: the relay watches the same
        # request, and whichever hears of the loss first, client_gone is set
        # by then (else finish() would run on a request whose connection is gone).
        request.notifyFinish().addErrback(left)
        done = Deferred.fromCoroutine(work)
        cut = False

        def failed(failure: Failure) -> None:
            nonlocal cut
            if client_gone:
                return
            if failure.check(RelayBroken):
                cut = True
                return  # the answer had begun: the relay cut the connection
            error = failure.value
            if not isinstance(error, BrokerError):
                # CancelledError included: the client is still here, so nothing
                # of ours should have cancelled its request.
                log.failure("unexpected error serving {uri}", failure, uri=request.uri)
                error = BrokerError("internal_error", "the broker failed; see its log")
            if request.startedWriting:
                # The status line is out: an error body would be appended to the
                # answer. Cut the connection so the client sees it truncated.
                if error.code != "internal_error":
                    log.warn("{uri}: {error} after the answer began", uri=request.uri, error=error)
                cut = True
                abort_connection(request)
                return
            request.write(errors(request, error))

        def finish(_: object) -> None:
            if not client_gone and not cut and not request.finished and _still_http(request):
                request.finish()

        done.addCallbacks(lambda _: None, failed).addCallback(finish)
        return NOT_DONE_YET


def _to_slash(request: Request, prefix: bytes) -> bytes:
    """301 from a bare native prefix to ``prefix/``, the query kept, so that a browser
    resolves the consumer's page's relative URLs (``ws``, ``api/...``) under the prefix."""
    _, sep, query = request.uri.partition(b"?")
    request.setResponseCode(301)
    request.setHeader(b"location", prefix + b"/" + sep + query)
    return b""


def _still_http(request: Request) -> bool:
    """False once a WebSocket tunnel took the connection from the request's channel."""
    channel = getattr(request, "channel", None)
    return channel is None or getattr(channel, "transport", True) is not None


def _basic_password_is(encoded: bytes, token: bytes) -> bool:
    """Basic credentials whose password is ``token`` (any user name), compared in constant time."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(decoded.partition(b":")[2], token)


def _not_allowed(request: Request, allow: str) -> bytes:
    request.setHeader(b"allow", allow.encode("ascii"))
    return render_error(
        request,
        BrokerError("method_not_allowed", f"{request.uri.decode('latin-1')} allows {allow}"),
    )


def _json(request: Request, value: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode("utf-8")


@functools.cache
def _dashboard_page() -> bytes:
    """``dashboard.html``, read once: the app is built again when operations are served."""
    return resources.files("mgpu").joinpath("dashboard.html").read_bytes()


class BrokerApp:
    """The Klein routes that are not on the hot path."""

    app = Klein()

    def __init__(self, status: StatusView, operations: Operations | None = None) -> None:
        self._status = status
        self._ops = operations
        self._dashboard = _dashboard_page()

    def _operations(self) -> Operations:
        if self._ops is None:
            raise BrokerError("not_found", "operations are not served here")
        return self._ops

    @app.route("/", methods=["GET", "HEAD"])
    def dashboard(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src data:",
        )
        return self._dashboard

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: Request) -> bytes:
        try:
            body, content_type = self._operations().metrics.render()
        except BrokerError as e:
            return render_error(request, e)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body

    @app.route("/v1/admin/consumers/<name>/<action>", methods=["POST"])
    async def consumer_action(self, request: Request, name: str, action: str) -> bytes:
        try:
            admin = self._operations().admin
            if action == "load":
                answer = await admin.load(name)
            elif action == "unload":
                answer = await admin.unload(name)
            else:
                raise BrokerError("not_found", f"no admin action {action!r}")
        except BrokerError as e:
            # The access log and metrics name known consumers only (bounded labels).
            request.consumer = e.consumer  # type: ignore[attr-defined]
            return render_error(request, e)
        request.consumer = name  # type: ignore[attr-defined]
        return _json(request, answer)

    @app.route("/v1/admin/reload", methods=["POST"])
    def reload(self, request: Request) -> bytes:
        try:
            return _json(request, self._operations().reloader.reload())
        except ConfigError as e:  # the reloader logged it
            return render_error(request, BrokerError("bad_request", f"reload refused: {e}"))
        except BrokerError as e:
            return render_error(request, e)

    @app.route("/v1/status", methods=["GET", "HEAD"])
    def status(self, request: Request) -> bytes:
        return _json(request, self._status.document())

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"status":"ok"}'

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        path = cast(Request, request).path.decode("latin-1")
        return render_error(cast(Request, request), BrokerError("not_found", f"no route {path}"))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        return _not_allowed(cast(Request, request), ", ".join(allowed))
