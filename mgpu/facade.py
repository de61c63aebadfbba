# -*- test-case-name: tests.test_facade -*-
"""One proxied request, from the health gate through the GPU lease to the relay.

``/v1/<kind>`` requests are scheduled: they wait for the GPU lease, are relayed
to the routed consumer, and release the lease when the consumer has answered
(or, for ``hold_until`` routes, when the consumer's job is really over).
``/audio/*`` requests go straight to the relay: they are file downloads, not
GPU work.  Requests under a consumer's native prefix (SPEC 9.1) are scheduled
the same way when they match one of its ``native.gpu`` entries, and relayed
straight otherwise.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from urllib.parse import quote, unquote_to_bytes

from attrs import Factory, define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpu.config import Config, ConsumerConfig, HoldUntil
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.registry import HealthProber, Registry
from mgpu.relay import Relay, RelayResult
from mgpu.scheduler import Lease, Leases
from mgpu.tunnel import Tunnels

log = Logger()

#: How much of a ``hold_until`` answer is kept to find the job's id in it.
HOLD_CAPTURE_BYTES = 64 * 1024


@define
class Facade:
    """Serves the facade routes with the broker's collaborators.

    ``config`` is replaced by a reload; a request keeps the consumer it started with.
    """

    config: Config
    registry: Registry
    prober: HealthProber
    scheduler: Leases
    relay: Relay
    control: ConsumerControl
    clock: IReactorTime
    events: EventBus
    #: The WebSocket tunnels of native routes (their own connections, never scheduled).
    tunnels: Tunnels = field(default=Factory(lambda self: Tunnels(self.clock), takes_self=True))

    async def serve_kind(self, request: Request, kind: str) -> None:
        """Schedule ``POST /v1/<kind>`` and relay it to the routed consumer."""
        consumer = self.config.consumer_for(kind)
        if consumer is None:
            raise BrokerError("no_consumer", f"routing names no consumer for {kind!r}")
        _note(request, consumer=consumer.name)
        await self._admit(consumer)
        route = consumer.paths[kind]
        target = _with_query(route.path.encode("ascii"), request.uri)
        await self._scheduled(
            request, consumer, route.method.encode("ascii"), target, route.hold_until
        )

    async def serve_native(self, request: Request, consumer: ConsumerConfig, target: bytes) -> None:
        """Relay a request under ``consumer``'s native prefix to ``target`` on the consumer.

        A request matching one of ``native.gpu`` (any POST when omitted) is
        scheduled as ``/v1/<kind>`` requests are, with that entry's
        ``hold_until``; any other passes without the lease, bounded by the
        silence between two chunks as ``/audio`` is.
        """
        native = consumer.native
        if native is None:  # the router only sends consumers that publish one
            raise BrokerError("not_found", f"{consumer.name} has no native routes")
        _note(request, consumer=consumer.name)
        await self._admit(consumer)
        method = request.method
        prefix = native.prefix.encode("ascii")
        gpu = native.gpu_route(method.decode("latin-1").upper(), _match_path(target))
        if gpu is None:
            await self._forward(
                request, consumer, method, target, idle_timeout=True, native_prefix=prefix
            )
        else:
            await self._scheduled(
                request, consumer, method, target, gpu.hold_until, native_prefix=prefix
            )

    async def serve_model(self, request: Request, consumer: ConsumerConfig, target: bytes) -> None:
        """Schedule an OpenAI-compatible ``POST`` (SPEC 9.2) and relay it to ``target``."""
        _note(request, consumer=consumer.name)
        await self._admit(consumer)
        await self._scheduled(request, consumer, b"POST", target, None)

    async def _scheduled(
        self,
        request: Request,
        consumer: ConsumerConfig,
        method: bytes,
        target: bytes,
        hold: HoldUntil | None,
        *,
        native_prefix: bytes | None = None,
    ) -> None:
        """Wait for the GPU lease, relay, and keep the lease for ``hold`` if the answer says so."""
        asked_at = self.clock.seconds()

        def job(lease: Lease) -> Deferred[RelayResult]:
            _note(request, queue_wait_s=self.clock.seconds() - asked_at)
            forwarded = self._forward(
                request,
                consumer,
                method,
                target,
                capture=HOLD_CAPTURE_BYTES if hold else 0,
                spool=True,
                native_prefix=native_prefix,
            )
            forwarded.addCallback(self._served, consumer)
            if hold is not None:
                forwarded.addCallback(self._hold_lease, lease, consumer, hold)
            return forwarded

        try:
            result = await self.scheduler.run(consumer.name, job)
        finally:
            if getattr(request, "queue_wait_s", None) is None:
                # It never reached the consumer (timed out in the queue, or room
                # could not be made): all of its time was waiting.
                _note(request, queue_wait_s=self.clock.seconds() - asked_at)
        # The lease is released; a slow client may still be reading what was spooled.
        await result.delivered

    async def serve_audio(self, request: Request, target: bytes) -> None:
        """Relay ``GET``/``HEAD /audio/...`` to the audio consumer, unscheduled."""
        name = self.config.audio_proxy
        if name is None:
            raise BrokerError("no_consumer", "audio_proxy names no consumer")
        consumer = self.config.consumers[name]
        _note(request, consumer=name)
        await self._admit(consumer)
        await self._forward(request, consumer, request.method, target, idle_timeout=True)

    async def serve_websocket(
        self, request: Request, consumer: ConsumerConfig, target: bytes
    ) -> None:
        """Tunnel an ``Upgrade: websocket`` request under a native prefix (``mgpu.tunnel``).

        Health-gated as every route, but never scheduled: the tunnel holds no
        lease however long it stays open (ComfyUI's ``/ws`` lasts for hours).
        Returns once the tunnel is open (the connection is no longer the
        request's) or the consumer's refusal is written.
        """
        _note(request, consumer=consumer.name)
        await self._admit(consumer)
        prefix = consumer.native.prefix.encode("ascii") if consumer.native else b""
        drop = self.config.auth.token_file is not None
        try:
            await self.tunnels.open(
                request, consumer, target, prefix=prefix, drop_authorization=drop
            )
        except BrokerError as e:
            if e.code == "consumer_unreachable":
                self.registry.mark_unreachable(consumer.name, e.message)
            elif e.code == "upstream_timeout":
                self.events.publish(
                    "timeout", consumer=consumer.name, reason="upstream", after_s=consumer.timeout_s
                )
            elif e.code == "bad_answer":
                log.warn("{consumer}: {message}", consumer=consumer.name, message=e.message)
            raise

    async def _admit(self, consumer: ConsumerConfig) -> None:
        """Refuse at once a consumer whose last probe failed; probe it first if never probed."""
        state = self.registry[consumer.name]
        if state.healthy is None:
            await self.prober.probe(consumer.name)
        if state.healthy is False:
            self.scheduler.reject("consumer_unreachable", consumer.name)
            raise BrokerError(
                "consumer_unreachable",
                f"upstream {consumer.name} last probe failed: {state.last_error}",
                consumer.name,
            )

    def _forward(
        self,
        request: Request,
        consumer: ConsumerConfig,
        method: bytes,
        target: bytes,
        *,
        capture: int = 0,
        idle_timeout: bool = False,
        spool: bool = False,
        native_prefix: bytes | None = None,
    ) -> Deferred[RelayResult]:
        d = self.relay.forward(
            request,
            consumer,
            method,
            target,
            timeout_s=consumer.timeout_s,
            idle_timeout=idle_timeout,
            capture=capture,
            drop_authorization=self.config.auth.token_file is not None,
            spool=spool,
            native_prefix=native_prefix,
        )

        def failed(failure: Failure) -> Failure:
            error = failure.value
            # Only a consumer that cannot be reached is out of service for
            # everyone; a bad answer fails this request alone.
            if isinstance(error, BrokerError) and error.code == "consumer_unreachable":
                self.registry.mark_unreachable(consumer.name, error.message)
            elif isinstance(error, BrokerError) and error.code == "bad_answer":
                log.warn("{consumer}: {message}", consumer=consumer.name, message=error.message)
            elif isinstance(error, BrokerError) and error.code == "upstream_timeout":
                self.events.publish(
                    "timeout", consumer=consumer.name, reason="upstream", after_s=consumer.timeout_s
                )
            return failure

        return d.addErrback(failed)

    def _served(self, result: RelayResult, consumer: ConsumerConfig) -> RelayResult:
        """A scheduled request was done: its consumer loaded itself to do the work.

        Only a 2xx says so (SPEC 9.3): ComfyUI refuses a bad prompt with a 400
        before it loads anything, and a consumer's 5xx proves nothing either.
        Only GPU requests count; an ``/audio`` download is served from disk
        whether or not the model is resident.
        """
        if 200 <= result.status < 300:
            self.registry.mark_loaded(consumer.name)
        return result

    def _hold_lease(
        self, result: RelayResult, lease: Lease, consumer: ConsumerConfig, hold: HoldUntil
    ) -> RelayResult:
        """Keep the lease until the consumer's job shows as done, if it was accepted."""
        if 200 <= result.status < 300:
            path = _hold_path(hold.path, result.body_head)
            if path is None:
                log.warn(
                    "{consumer}: cannot fill {path} from its answer; lease released",
                    consumer=consumer.name,
                    path=hold.path,
                )
            else:
                lease.hold_until(Deferred.fromCoroutine(self._poll_done(consumer, hold, path)))
        return result

    async def _poll_done(self, consumer: ConsumerConfig, hold: HoldUntil, path: str) -> None:
        """Poll ``path`` until it returns a non-empty JSON object, or ``timeout_s`` passes."""
        deadline = self.clock.seconds() + consumer.timeout_s
        while True:
            remaining = deadline - self.clock.seconds()
            try:
                status, body = await self.control.get_json(
                    consumer, path, max(0.001, min(hold.interval_s * 4, remaining))
                )
            except BrokerError as e:
                log.warn("{consumer}: polling {path}: {error}", consumer=consumer.name,
                         path=path, error=e.message)  # fmt: skip
            else:
                if status == 200 and isinstance(body, dict) and body:
                    return
            if self.clock.seconds() + hold.interval_s > deadline:
                log.warn(
                    "{consumer}: {path} not done after {timeout} s; lease released",
                    consumer=consumer.name, path=path, timeout=consumer.timeout_s,
                )  # fmt: skip
                self.events.publish(
                    "timeout",
                    consumer=consumer.name,
                    reason="hold_until",
                    after_s=consumer.timeout_s,
                )
                return
            await deferLater(self.clock, hold.interval_s, lambda: None)


def _note(request: Request, **facts: object) -> None:
    """Tell the access log and the metrics about the request (see ``TimedRequest``)."""
    for name, value in facts.items():
        setattr(request, name, value)


def _with_query(path: bytes, uri: bytes) -> bytes:
    """The consumer path with the client's query string, unchanged."""
    _, sep, query = uri.partition(b"?")
    return path + sep + query if sep else path


def _match_path(target: bytes) -> str:
    """The path ``native.gpu`` globs are matched against: decoded, without the query.

    Decoded, so that ``/api/gen%65rate`` cannot pass as something else than
    ``/api/generate`` and escape the lease (encoded slashes never get here).
    """
    return unquote_to_bytes(target.partition(b"?")[0]).decode("latin-1")


def _hold_path(template: str, answer: bytes) -> str | None:
    """``template`` with each ``{field}`` taken from the JSON answer, or None."""
    try:
        data = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, Mapping):
        return None
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    values = {name: data.get(name) for name in fields}
    if any(not isinstance(v, str | int) or isinstance(v, bool) for v in values.values()):
        return None
    return template.format_map({k: quote(str(v), safe="") for k, v in values.items()})
