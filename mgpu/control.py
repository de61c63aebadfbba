# -*- test-case-name: tests.test_control -*-
"""The broker's own calls to consumers: health probes, load, unload, JSON calls.

Every call goes through an injected treq ``HTTPClient`` and is bounded as a whole
(headers *and* body) by a ``clock.callLater`` that cancels it: treq's own timeout
only covers the wait for the headers. Bodies are read by a small protocol with a
size cap whose canceller closes the connection, so a response is always either
read to its end (the connection goes back to the pool) or its connection closed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, cast
from typing import Protocol as TypingProtocol

from attrs import frozen
from treq.client import HTTPClient
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from mgpu.config import CommandRoute, ConsumerConfig, Route
from mgpu.errors import BrokerError
from mgpu.fdlimit import exhausted, overloaded
from mgpu.gpu import ProcessRunner, ReactorProcess, SmiResult, SmiTimeout

PROBE_BODY_LIMIT: Final = 64 * 1024
"""At most this much of a probe's (or a load or unload call's) answer is read."""

JSON_BODY_LIMIT: Final = 8 * 1024 * 1024
"""At most this much of a ``get_json`` or ``post_json`` answer is read (ComfyUI histories
carry the workflow)."""

STDERR_TAIL: Final = 500
"""At most this many of the last bytes of a failed command's stderr go into its error."""

HEALTH_POLL_S: Final = 0.2
"""How often a ``stopped_when_unloaded`` consumer's health is polled while it starts."""

CommandRunner = Callable[[Sequence[str], float], "Deferred[SmiResult]"]
"""Runs ``argv`` (no shell; ``argv[0]`` searched on ``PATH``) with the daemon's environment,
killed and reaped after ``timeout_s`` (``SmiTimeout``): (stdout, stderr, exit code)."""


def process_commands(reactor: ReactorProcess) -> CommandRunner:
    """The real ``CommandRunner``: ``mgpu.gpu.ProcessRunner``, bounded per command."""

    def run(argv: Sequence[str], timeout_s: float) -> Deferred[SmiResult]:
        return ProcessRunner(reactor, timeout_s)(argv[0], argv[1:])

    return run


def stderr_tail(stderr: bytes) -> str:
    """The end of a command's stderr as one printable line (control characters as spaces)."""
    text = stderr[-STDERR_TAIL:].decode("utf-8", "replace")
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def exit_text(code: int) -> str:
    """How a command ended, from a runner's exit code (negative: the signal that killed it)."""
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


class _DelayedCall(TypingProtocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class _Timer(TypingProtocol):
    """``IReactorTime.callLater`` as a structural type.

    The casts to it keep mypy working with or without the mypy-zope plugin.
    """

    def callLater(
        self, delay: float, f: Callable[..., object], /, *args: object, **kw: object
    ) -> _DelayedCall: ...

    def seconds(self) -> float: ...


@frozen
class ProbeResult:
    """What one health probe found."""

    healthy: bool
    loaded: bool | None
    """The boolean top-level ``loaded`` of a JSON answer; None when not reported."""
    error: str | None


@frozen
class _Answer:
    """A consumer's status code and (at most ``limit`` bytes of) its body."""

    status: int
    body: bytes
    truncated: bool


class _TimedOut(Exception):
    """The whole exchange took longer than its bound."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"timed out after {float(timeout_s)} s")


class _BodyReader(Protocol):
    """Collects a response body up to ``limit`` bytes; past it, closes the connection.

    ``done`` fires with ``(body, truncated)``. Cancelling ``done`` closes the
    connection too, so a cancelled read never leaves a half-read response on a
    pooled connection.
    """

    def __init__(self, limit: int) -> None:
        self.done: Deferred[tuple[bytes, bool]] = Deferred(self._cancel)
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._finished = False

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        room = self._limit - self._size
        if len(data) > room:
            self._chunks.append(data[:room])
            self._finished = True
            self._close()
            self.done.callback((b"".join(self._chunks), True))
            return
        self._chunks.append(data)
        self._size += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished:
            return
        self._finished = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback((b"".join(self._chunks), False))
        else:
            self.done.errback(reason)

    def _cancel(self, d: Deferred[tuple[bytes, bool]]) -> None:
        self._finished = True
        self._close()

    def _close(self) -> None:
        # The response's transport proxy closes the connection: it will not be reused.
        if self.transport is not None:
            cast(Any, self.transport).loseConnection()


def _read_body(response: IResponse, limit: int) -> Deferred[_Answer]:
    """Read at most ``limit`` bytes of ``response``'s body."""
    reader = _BodyReader(limit)
    cast(Any, response).deliverBody(reader)
    return reader.done.addCallback(lambda got: _Answer(response.code, got[0], got[1]))


def _plain(value: object) -> object:
    """Config mappings are read-only proxies, which ``json`` cannot encode: copy them to dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def describe(failure: Failure) -> str:
    """A short human text for why a call to a consumer failed ("connection refused")."""
    return _describe(failure.value) if failure.value is not None else "unknown error"


def _describe(e: BaseException) -> str:
    # ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed: the first reason.
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        first = reasons[0].value
        if first is not None:
            return _describe(first)
    if isinstance(e, _TimedOut):
        return str(e)
    if isinstance(e, error.ConnectionRefusedError | ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, error.TCPTimedOutError | error.TimeoutError):
        return "connect timed out"
    if isinstance(e, error.ConnectionLost | ConnectionResetError):
        return "connection reset"
    if isinstance(e, error.ConnectionDone):
        return "connection closed"
    if isinstance(e, CancelledError):
        return "cancelled"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_2xx(status: int) -> bool:
    return 200 <= status < 300


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None


def _probe_result(answer: _Answer) -> ProbeResult:
    if not _is_2xx(answer.status):
        return ProbeResult(healthy=False, loaded=None, error=f"HTTP {answer.status}")
    data = None if answer.truncated else _json_or_none(answer.body)
    loaded = data.get("loaded") if isinstance(data, dict) else None
    return ProbeResult(
        healthy=True, loaded=loaded if isinstance(loaded, bool) else None, error=None
    )


class ConsumerControl:
    """The broker's own HTTP calls to consumers, through one treq client, and the
    load and unload commands (SPEC 9.6), through ``commands`` (by default real
    processes started by ``clock``, the reactor)."""

    def __init__(
        self, http: HTTPClient, clock: IReactorTime, commands: CommandRunner | None = None
    ) -> None:
        self._http = http
        self._time = clock
        self._clock = cast(_Timer, clock)
        self._commands = commands or process_commands(cast(ReactorProcess, clock))

    def probe(self, consumer: ConsumerConfig, timeout_s: float) -> Deferred[ProbeResult]:
        """Call the health route: a failure is an unhealthy result, except the daemon's
        own lack of file descriptors, which says nothing of the consumer (``daemon_overloaded``)."""

        probed = f"{consumer.health.method} {consumer.url}{consumer.health.path}"

        def failed(f: Failure) -> ProbeResult:
            if exhausted(f.value):
                raise overloaded(consumer.name, f"to probe {consumer.name}")
            return ProbeResult(healthy=False, loaded=None, error=f"{probed}: {describe(f)}")

        def answered(answer: _Answer) -> ProbeResult:
            result = _probe_result(answer)
            if result.error is None:
                return result
            return ProbeResult(healthy=False, loaded=None, error=f"{probed}: {result.error}")

        d = self._exchange(consumer, consumer.health, timeout_s, PROBE_BODY_LIMIT)
        return d.addCallbacks(answered, failed)

    def load(self, consumer: ConsumerConfig) -> Deferred[None]:
        """Call the load route: ``consumer_unreachable`` if the consumer is gone, else any
        failure (an error status, a timeout) is a ``scheduler_error``.

        A ``stopped_when_unloaded`` consumer's load (it starts the service) is
        done only once its health route answers 2xx: polled every
        ``HEALTH_POLL_S`` for up to the load's timeout, else a ``scheduler_error``.
        """
        d = self._admin("load", consumer, consumer.load)
        if consumer.stopped_when_unloaded and consumer.load is not None:
            route = consumer.load
            timeout_s = route.timeout_s if isinstance(route, CommandRoute) else consumer.timeout_s
            d.addCallback(
                lambda _: Deferred.fromCoroutine(self._until_healthy(consumer, timeout_s))
            )
        return d

    async def _until_healthy(self, consumer: ConsumerConfig, timeout_s: float) -> None:
        """Probe ``consumer`` every ``HEALTH_POLL_S`` until it answers 2xx or ``timeout_s``
        has passed (a ``scheduler_error`` with the last probe's error)."""
        deadline = self._clock.seconds() + timeout_s
        while True:
            left = max(deadline - self._clock.seconds(), HEALTH_POLL_S)
            result = await self.probe(consumer, left)
            if result.healthy:
                return
            if self._clock.seconds() + HEALTH_POLL_S > deadline:
                raise BrokerError(
                    "scheduler_error",
                    f"load of {consumer.name} failed: its health route did not answer 2xx "
                    f"within {timeout_s:g} s of the load: {result.error}",
                    consumer.name,
                )
            await deferLater(self._time, HEALTH_POLL_S)

    def unload(self, consumer: ConsumerConfig) -> Deferred[None]:
        """Call the unload route; failures as for ``load``."""
        return self._admin("unload", consumer, consumer.unload)

    def get_json(
        self, consumer: ConsumerConfig, path: str, timeout_s: float
    ) -> Deferred[tuple[int, object]]:
        """GET ``consumer.url + path``: (status, parsed JSON or None); failures are
        ``consumer_unreachable``."""
        return self._json_call(consumer, Route("GET", path), timeout_s, "consumer_unreachable")

    def post_json(
        self, consumer: ConsumerConfig, path: str, body: Mapping[str, Any], timeout_s: float
    ) -> Deferred[tuple[int, object]]:
        """POST ``body`` as JSON to ``consumer.url + path``: (status, parsed JSON or None).

        A POST is an action, so its failures are a load's or an unload's: a
        timeout is a ``scheduler_error`` (the consumer is there, only slow),
        other failures ``consumer_unreachable``.
        """
        return self._json_call(consumer, Route("POST", path, body), timeout_s, "scheduler_error")

    def _json_call(
        self, consumer: ConsumerConfig, route: Route, timeout_s: float, timed_out: str
    ) -> Deferred[tuple[int, object]]:
        """``route`` answered with (status, parsed JSON or None); a timeout is the code
        ``timed_out``, any other failure ``consumer_unreachable``."""
        call = f"{route.method} {route.path}"

        def parsed(answer: _Answer) -> tuple[int, object]:
            if answer.truncated:
                raise BrokerError(
                    "consumer_unreachable",
                    f"upstream {consumer.name}: {call} answered more than "
                    f"{JSON_BODY_LIMIT // (1024 * 1024)} MiB",
                    consumer.name,
                )
            return answer.status, _json_or_none(answer.body)

        def failed(f: Failure) -> Failure:
            if f.check(BrokerError):
                return f
            if exhausted(f.value):
                return Failure(overloaded(consumer.name, f"for {call}"))
            code = timed_out if f.check(_TimedOut) else "consumer_unreachable"
            return Failure(
                BrokerError(
                    code, f"upstream {consumer.name}: {call} failed: {describe(f)}", consumer.name
                )
            )

        d = self._exchange(consumer, route, timeout_s, JSON_BODY_LIMIT)
        return d.addCallback(parsed).addErrback(failed)

    def _admin(
        self, action: str, consumer: ConsumerConfig, route: Route | CommandRoute | None
    ) -> Deferred[None]:
        if route is None:
            return fail(
                BrokerError(
                    "scheduler_error",
                    f"{action} of {consumer.name} failed: it has no {action} route",
                    consumer.name,
                )
            )
        if isinstance(route, CommandRoute):
            return self._command(action, consumer, route)

        def why(text: str) -> BrokerError:
            return BrokerError(
                "scheduler_error", f"{action} of {consumer.name} failed: {text}", consumer.name
            )

        def checked(answer: _Answer) -> None:
            if not _is_2xx(answer.status):
                raise why(f"HTTP {answer.status}")

        def failed(f: Failure) -> Failure:
            if f.check(BrokerError):
                return f
            if f.check(_TimedOut):
                return Failure(why(describe(f)))
            if exhausted(f.value):
                return Failure(overloaded(consumer.name, f"to {action} {consumer.name}"))
            # The consumer is gone (refused, reset, closed): say so, as a request would.
            return Failure(
                BrokerError(
                    "consumer_unreachable",
                    f"{action} of {consumer.name} failed: {describe(f)}",
                    consumer.name,
                )
            )

        d = self._exchange(consumer, route, consumer.timeout_s, PROBE_BODY_LIMIT)
        return d.addCallback(checked).addErrback(failed)

    def _command(
        self, action: str, consumer: ConsumerConfig, route: CommandRoute
    ) -> Deferred[None]:
        """Run a load or unload command: exit 0 is done; anything else a ``scheduler_error``
        naming the program, how it ended and the end of its stderr."""
        program = route.argv[0]

        def why(text: str) -> BrokerError:
            return BrokerError(
                "scheduler_error",
                f"{action} of {consumer.name} failed: {program} {text}",
                consumer.name,
            )

        def checked(result: SmiResult) -> None:
            _, stderr, code = result
            if code != 0:
                tail = stderr_tail(stderr)
                raise why(exit_text(code) + (f": {tail}" if tail else ""))

        def failed(f: Failure) -> Failure:
            if f.check(BrokerError):
                return f
            if f.check(SmiTimeout):
                reaped = "" if "not reaped" not in str(f.value) else " (not reaped)"
                return Failure(why(f"timed out after {route.timeout_s:g} s and was killed{reaped}"))
            if exhausted(f.value):
                return Failure(overloaded(consumer.name, f"to {action} {consumer.name}"))
            return Failure(why(f"could not be started: {describe(f)}"))

        d = maybeDeferred(self._commands, route.argv, route.timeout_s)
        return d.addCallback(checked).addErrback(failed)

    def _exchange(
        self, consumer: ConsumerConfig, route: Route, timeout_s: float, limit: int
    ) -> Deferred[_Answer]:
        """One request and its body, the whole bounded by ``timeout_s``."""
        kwargs: dict[str, Any] = {}
        if route.body is not None:
            kwargs["json"] = _plain(route.body)
        try:
            d = self._http.request(
                route.method,
                consumer.url + route.path,
                headers=Headers({b"Accept": [b"application/json"]}),
                allow_redirects=False,
                unbuffered=True,
                # treq imports the global reactor when given none; it is only
                # used for treq's own timeout, which is not used here.
                reactor=cast(Any, self._clock),
                **kwargs,
            )
        except Exception:
            return fail()
        answer = d.addCallback(_read_body, limit)
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            answer.cancel()

        timer = self._clock.callLater(timeout_s, expire)

        def settle(result: _Answer | Failure) -> _Answer | Failure:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                return Failure(_TimedOut(timeout_s))
            return result

        return answer.addBoth(settle)
