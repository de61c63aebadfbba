"""What the daemon refuses or cancels: /audio path tricks, odd request targets and heads,
unrouted kinds, clients that leave, slow request heads."""

from __future__ import annotations

import json
import time
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from mgpu.tap import CACHED_CONNECTION_TIMEOUT_S
from tests.integration.harness import (
    RawConnection,
    Stack,
    closed,
    connect,
    established_connections,
    get,
    make_config,
    parse_response,
    raw_request,
    request_bytes,
    set_faults,
    shared_stacks,
    sim_log,
    sleep,
    wait_for,
)
from tests.integration.patterns import ERROR_KEYS

#: Path tricks that must never leave ``/audio/`` on the consumer (sent byte for byte).
AUDIO_TRICKS = (
    "/audio/../secret",
    "/audio/a/../../x",
    "/audio/%2e%2e/x",
    "/audio/%2E%2e%2Fx",
    "/audio/a%2fb",
    "/audio//etc/passwd",
    "/audio/http://evil/x",
    "/audio/..",
    "/audio/a/..",
    "/audio/a\\..\\..\\x",
    "/audio/%5c..%5cx",
    "/audio/.%2e/x",
)


async def _guard_stack() -> Stack:
    """mvoice (tts), the recorder (stt and /audio) and ollama (llm, 2 s timeout); no image routing.

    Probes are rare (every 60 s) so that the only connections from the daemon
    to a consumer are the ones a test makes.
    """
    stack = Stack.new("mgpu-guards-")
    async with stack.starting():
        await stack.add_consumers("mvoice", "ollama")
        await stack.add_recorder()
        config = make_config(
            stack.consumers,
            {"tts": "mvoice", "stt": "recorder", "llm": "ollama"},
            audio_proxy="recorder",
            health={"interval_s": 60, "timeout_s": 2},
            limits={"max_body_mib": 1},
            # mvoice keeps its connections (keepalive: true); the recorder does not (the default).
            overrides={"ollama": {"timeout_s": 2}, "mvoice": {"keepalive": True}},
        )
        await stack.start(config)
    return stack


class _GuardCase(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("guards", _guard_stack)
        self.http = self.stack.client()
        self.addCleanup(self.http.close)
        self.mvoice = self.stack.consumers["mvoice"]
        self.ollama = self.stack.consumers["ollama"]
        self.recorder = self.stack.consumers["recorder"]

    async def scheduler(self) -> dict[str, Any]:
        return (await self.http.status())["scheduler"]

    async def idle(self) -> None:
        async def free() -> bool:
            s = await self.scheduler()
            return s["holder"] is None and s["queued"] == 0 and s["running"] == 0

        await wait_for(free, 15, "the GPU lock to be free")

    async def mvoice_loaded_and_unconnected(self) -> int:
        """mvoice loaded, whatever ran before, and no connection of the daemon's to it left
        (kept ones close after a few seconds), so that each one counted next is the
        test's; returns the daemon's pid."""
        daemon = self.stack.daemon
        assert daemon is not None
        await self.idle()
        response, body = await self.http.json("POST", "/v1/tts", json_body={"text": "a"})
        self.assertEqual(response.code, 200, body)
        await wait_for(
            lambda: established_connections(daemon.pid, self.mvoice.port) == 0,
            CACHED_CONNECTION_TIMEOUT_S + 6,
            "the daemon's idle connections to mvoice to close",
            0.1,
        )
        return daemon.pid

    def recorded(self, since: int = 0) -> list[str]:
        """The request targets the recorder received (from entry ``since``), less health probes."""
        entries = self.recorder.log_lines()[since:]
        return [e["target"] for e in entries if e["target"] != "/"]


class AudioPathTests(_GuardCase):
    """/audio paths are checked as the client sent them."""

    async def test_path_tricks_refused_and_never_reach_the_consumer(self) -> None:
        """Every /audio path trick gets 400 bad_request and the consumer never sees it."""
        port = self.stack.port
        mark = len(self.recorder.log_lines())
        tricks = [request_bytes("GET", target) for target in AUDIO_TRICKS]
        tricks.append(request_bytes("HEAD", "/audio/../secret"))
        # Absolute-URI request lines: a proxy request for the consumer or anywhere else.
        for authority in (f"127.0.0.1:{self.recorder.port}", f"127.0.0.1:{port}", "evil"):
            tricks.append(request_bytes("GET", f"http://{authority}/audio/x"))
        failures = []
        for raw in tricks:
            line = raw.split(b"\r\n", 1)[0].decode()
            response = await raw_request(port, raw, head_only=raw.startswith(b"HEAD"))
            if response.status != 400:
                failures.append(f"{line}: {response.status} {response.body[:200]!r}")
            elif not raw.startswith(b"HEAD"):
                error = response.json()
                if set(error) != ERROR_KEYS or error["error"] != "bad_request":
                    failures.append(f"{line}: {error}")
                elif error["retryable"] is not False:
                    failures.append(f"{line}: retryable {error['retryable']}")
        # A legitimate path does reach the recorder: what it lacks, it never got.
        ok = await raw_request(port, request_bytes("GET", "/audio/ok/file.wav?x=1"))
        self.assertEqual(ok.status, 200)
        self.assertEqual(ok.json(), {"recorded": "/audio/ok/file.wav?x=1"})
        leaked = [target for target in self.recorded(mark) if "ok/file" not in target]
        failures += [f"reached the consumer as {target}" for target in leaked]
        self.assertEqual(failures, [], "\n".join(failures))

    async def test_audio_request_headers_forwarded(self) -> None:
        """/audio forwards end-to-end headers, drops hop-by-hop ones and appends X-Forwarded-For."""
        headers = {
            "X-Custom": "kept",
            "X-Forwarded-For": "10.0.0.1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eA==",
        }
        ok = await raw_request(
            self.stack.port, request_bytes("GET", "/audio/headers.wav", headers=headers)
        )
        self.assertEqual(ok.status, 200)
        entry = [e for e in self.recorder.log_lines() if e["target"] == "/audio/headers.wav"][-1]
        got = {k.lower(): v for k, v in entry["headers"].items()}
        self.assertEqual(got.get("x-custom"), "kept")
        self.assertEqual(got.get("x-forwarded-for"), "10.0.0.1, 127.0.0.1")
        self.assertEqual(got.get("host"), f"127.0.0.1:{self.recorder.port}")
        self.assertNotIn("keep-alive", got)
        self.assertNotIn("proxy-authorization", got)


class NoConsumerTests(_GuardCase):
    """A kind that routing does not name."""

    async def test_unrouted_kind_no_consumer(self) -> None:
        """POST /v1/image with no routing.image gets 404 no_consumer in the error schema."""
        response = await raw_request(
            self.stack.port, request_bytes("POST", "/v1/image", b'{"prompt": {}}')
        )
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-type"), "application/json")
        error = response.json()
        self.assertEqual(set(error), ERROR_KEYS)
        self.assertEqual(error["error"], "no_consumer")
        self.assertIs(error["retryable"], False)


class UpstreamConnectionTests(_GuardCase):
    """The relay's connections to a consumer: one per request by default; with
    ``keepalive: true`` kept alive and closed when idle."""

    async def test_one_connection_per_request_by_default(self) -> None:
        """Without keepalive, each request says Connection: close; at most one spare
        connection (opened for the next request, never used before) stays, and it closes
        once idle."""
        daemon = self.stack.daemon
        assert daemon is not None

        def unconnected() -> bool:
            return established_connections(daemon.pid, self.recorder.port) == 0

        # Probes' kept connections close after a few seconds.
        await wait_for(unconnected, CACHED_CONNECTION_TIMEOUT_S + 6, "no connection", 0.1)
        mark = len(self.recorder.log_lines())
        for n in range(3):
            response, body = await self.http.json("POST", "/v1/stt", json_body={"n": n})
            self.assertEqual(response.code, 200, body)
            await wait_for(
                lambda: established_connections(daemon.pid, self.recorder.port) <= 1,
                3,
                "only the spare connection to stay",
                0.05,
            )
        entries = self.recorder.log_lines()[mark:]
        self.assertEqual([e["headers"].get("Connection") for e in entries], ["close"] * 3)
        await wait_for(
            unconnected,
            CACHED_CONNECTION_TIMEOUT_S + 3,
            "the daemon's spare connection to the recorder to close",
            0.1,
        )

    async def test_one_connection_serves_requests_in_turn_then_closes(self) -> None:
        """With keepalive, requests one after the other share one upstream connection,
        closed once idle."""
        pid = await self.mvoice_loaded_and_unconnected()
        for n in range(5):
            response, body = await self.http.json("POST", "/v1/tts", json_body={"text": f"{n}"})
            self.assertEqual(response.code, 200, body)
            self.assertEqual(established_connections(pid, self.mvoice.port), 1)
        await wait_for(
            lambda: established_connections(pid, self.mvoice.port) == 0,
            CACHED_CONNECTION_TIMEOUT_S + 3,
            "the idle connection to close",
            0.1,
        )


class CancellationTests(_GuardCase):
    """A client that disconnects cancels its request, queued or running."""

    async def test_queued_request_dropped_when_client_leaves(self) -> None:
        """A client that leaves while queued behind a slow request never reaches the consumer."""
        await self.idle()
        since, mark = time.time(), len(self.recorder.log_lines())
        await set_faults(self.mvoice, {"delay_s": {"/api/synthesize": 2.5}})
        self.addCleanup(lambda: ensureDeferred(set_faults(self.mvoice, {})))
        slow = await connect(self.stack.port, RawConnection())
        self.addCleanup(slow.abort)
        slow.send(request_bytes("POST", "/v1/tts", b'{"text": "slow"}'))
        await wait_for(lambda: self._holder_is("mvoice"), 5, "the slow request to run")
        queued = await connect(self.stack.port, RawConnection())
        self.addCleanup(queued.abort)
        queued.send(request_bytes("POST", "/v1/stt", b"queued audio"))

        async def queued_now(n: int) -> bool:
            return bool((await self.scheduler())["queued"] == n)

        await wait_for(lambda: queued_now(1), 5, "the second request to queue")
        queued.abort()
        # It leaves the queue at once, while the slow request still holds the GPU.
        await wait_for(lambda: queued_now(0), 1, "the queue to drop the request")
        self.assertTrue(await self._holder_is("mvoice"))
        self.assertFalse(slow.closed.called, "the slow request ended too soon for this test")
        self.assertEqual(parse_response(await closed(slow, 10)).status, 200)
        await self.idle()
        await sleep(0.3)  # time for a request that was wrongly kept to reach the recorder
        self.assertEqual(self.recorded(mark), [])
        paths = [e["path"] for e in await sim_log(self.mvoice) if e["start"] >= since]
        self.assertEqual(paths, ["/api/synthesize"])
        state = json.loads(
            (await raw_request(self.mvoice.port, request_bytes("GET", "/_sim/state"))).body
        )
        self.assertEqual(state["busy"], 0)

    async def _holder_is(self, name: str | None) -> bool:
        return bool((await self.scheduler())["holder"] == name)

    async def test_running_request_closes_upstream_when_client_leaves(self) -> None:
        """A client that leaves while its request runs closes the upstream connection and
        releases the lock."""
        daemon = self.stack.daemon
        assert daemon is not None
        await self.mvoice_loaded_and_unconnected()
        await set_faults(self.mvoice, {"hang": ["/api/synthesize"]})
        self.addCleanup(lambda: ensureDeferred(set_faults(self.mvoice, {})))
        client = await connect(self.stack.port, RawConnection())
        self.addCleanup(client.abort)
        client.send(request_bytes("POST", "/v1/tts", b'{"text": "never answered"}'))
        await wait_for(
            lambda: established_connections(daemon.pid, self.mvoice.port) == 1,
            5,
            "the request to reach mvoice",
        )
        self.assertTrue(await self._holder_is("mvoice"))
        client.abort()
        await wait_for(
            lambda: established_connections(daemon.pid, self.mvoice.port) == 0,
            3,
            "the daemon to close its connection to mvoice",
        )
        await wait_for(lambda: self._holder_is(None), 3, "the lock's release")
        # The GPU is free for the next request, for another consumer and for mvoice.
        started = time.monotonic()
        response, body = await self.http.json(
            "POST", "/v1/llm", json_body={"prompt": "hi", "stream": False}, timeout=10
        )
        self.assertEqual(response.code, 200, body)
        await set_faults(self.mvoice, {})
        response, body = await self.http.json(
            "POST", "/v1/tts", json_body={"text": "a"}, timeout=10
        )
        self.assertEqual(response.code, 200, body)
        self.assertLess(time.monotonic() - started, 5)


class BodyLimitTests(_GuardCase):
    """``limits.max_body_mib`` (1 MiB here) is enforced before anything reaches a consumer."""

    async def assertTooLarge(self, raw: bytes) -> None:
        mark = len(self.recorder.log_lines())
        response = await raw_request(self.stack.port, raw, timeout=5)
        self.assertEqual(response.status, 413, response.raw[:300])
        error = response.json()
        self.assertEqual(set(error), ERROR_KEYS)
        self.assertEqual(error["error"], "payload_too_large")
        self.assertIs(error["retryable"], False)
        self.assertEqual(self.recorded(mark), [])

    async def test_content_length_over_limit_refused_at_once(self) -> None:
        """A Content-Length over the limit gets 413 payload_too_large before the body is sent."""
        head = request_bytes("POST", "/v1/stt", b"")
        head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % (2 * 2**20))
        await self.assertTooLarge(head)

    async def test_chunked_body_over_limit_refused(self) -> None:
        """A chunked body that grows past the limit gets 413 payload_too_large."""
        chunk = b"x" * 65536
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
        raw = request_bytes("POST", "/v1/stt", headers={"Transfer-Encoding": "chunked"}) + body
        await self.assertTooLarge(raw)

    async def test_body_under_limit_served(self) -> None:
        """A body just under the limit reaches the consumer whole."""
        mark = len(self.recorder.log_lines())
        body = b"y" * (2**20 - 1024)
        response = await raw_request(self.stack.port, request_bytes("POST", "/v1/stt", body))
        self.assertEqual(response.status, 200, response.raw[:300])
        self.assertEqual(self.recorded(mark), ["/record"])
        entry = self.recorder.log_lines()[-1]
        self.assertEqual(entry["headers"].get("Content-Length"), str(len(body)))


class UpstreamTimeoutTests(_GuardCase):
    """A consumer that does not answer within its ``timeout_s`` (ollama: 2 s here)."""

    async def test_silent_consumer_upstream_timeout(self) -> None:
        """A consumer that never answers gets the client 504 upstream_timeout after its
        timeout_s, counts as failed, and the lock goes to the next request."""
        await self.idle()
        await set_faults(self.ollama, {"hang": ["/api/generate"]})
        self.addCleanup(lambda: ensureDeferred(set_faults(self.ollama, {})))
        failed = (await self.scheduler())["failed"]
        started = time.monotonic()
        response, error = await self.http.json(
            "POST", "/v1/llm", json_body={"prompt": "hi"}, timeout=15
        )
        elapsed = time.monotonic() - started
        self.assertEqual(response.code, 504, error)
        self.assertEqual(set(error), ERROR_KEYS)
        self.assertEqual(error["error"], "upstream_timeout")
        self.assertEqual(error["consumer"], "ollama")
        self.assertIs(error["retryable"], True)
        self.assertGreaterEqual(elapsed, 1.9)
        self.assertLess(elapsed, 6)
        self.assertEqual((await self.scheduler())["failed"], failed + 1)
        response, body = await self.http.json(
            "POST", "/v1/tts", json_body={"text": "next"}, timeout=10
        )
        self.assertEqual(response.code, 200, body)


class RequestTargetTests(_GuardCase):
    """Request targets with bytes outside VCHAR are refused before admission."""

    async def test_bytes_outside_vchar_refused_before_admission(self) -> None:
        """A 0xFF (or DEL, or 0x80) byte in a /v1/tts or /v1/stt query or an /audio path is
        400 bad_request in the error schema; nothing is admitted and no consumer sees it."""
        await self.idle()
        since, mark = time.time(), len(self.recorder.log_lines())
        before = await self.scheduler()
        targets = [
            ("POST", "/v1/tts?x=\xff"),
            ("POST", "/v1/tts?x=\x7f"),
            ("POST", "/v1/stt?x=\x80"),
            ("GET", "/audio/a\xff.wav"),
            ("GET", "/audio/a\x90.wav"),
        ]
        for method, target in targets:
            body = b'{"text": "a"}' if method == "POST" else None
            response = await raw_request(self.stack.port, request_bytes(method, target, body))
            self.assertEqual(response.status, 400, (target, response.raw[:300]))
            self.assertEqual(response.header("content-type"), "application/json", target)
            error = response.json()
            self.assertEqual(set(error), ERROR_KEYS)
            self.assertEqual((error["error"], error["retryable"]), ("bad_request", False), target)
        after = await self.scheduler()
        for key in ("completed", "failed", "rejected", "loads"):
            self.assertEqual(after[key], before[key], key)
        self.assertEqual(self.recorded(mark), [])
        self.assertEqual([e for e in await sim_log(self.mvoice) if e["start"] >= since], [])


class ContentLengthTests(_GuardCase):
    """A Content-Length that Python's int() refuses to parse."""

    async def test_5000_digit_content_length_is_400(self) -> None:
        """A 5000-digit Content-Length is answered 400 bad_request, leaves no traceback in the
        daemon's log, and nothing reaches the consumer."""
        daemon = self.stack.daemon
        assert daemon is not None
        logged = daemon.process.stdout()
        mark = len(self.recorder.log_lines())
        head = request_bytes("POST", "/v1/stt", headers={"Content-Length": "9" * 5000})
        response = await raw_request(self.stack.port, head, timeout=5)
        self.assertEqual(response.status, 400, response.raw[:300])
        error = response.json()
        self.assertEqual(set(error), ERROR_KEYS)
        self.assertEqual(error["error"], "bad_request")
        # The daemon still serves, and the request left nothing in its log.
        self.assertEqual((await raw_request(self.stack.port, get("/healthz"))).status, 200)
        new = daemon.process.stdout()[len(logged) :]
        self.assertNotIn("Traceback", new)
        self.assertNotIn("Unhandled", new)
        self.assertEqual(self.recorded(mark), [])


HEADER_TIMEOUT_S = 1.0


async def _head_stack() -> Stack:
    """The recorder alone (stt), with request heads due within HEADER_TIMEOUT_S."""
    stack = Stack.new("mgpu-heads-")
    async with stack.starting():
        await stack.add_recorder()
        config = make_config(
            stack.consumers,
            {"stt": "recorder"},
            health={"interval_s": 60, "timeout_s": 2},
            limits={"header_timeout_s": HEADER_TIMEOUT_S},
        )
        await stack.start(config)
    return stack


class HeaderTimeoutTests(TestCase):
    """``limits.header_timeout_s`` (1 s here): request heads must arrive in time."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("heads", _head_stack)

    async def header_timeouts(self) -> float:
        """``mgpu_header_timeouts_total`` now (on a connection that closes: none is kept idle)."""
        response = await raw_request(self.stack.port, get("/metrics"))
        self.assertEqual(response.status, 200)
        for family in text_string_to_metric_families(response.body.decode("utf-8")):
            for sample in family.samples:
                if sample.name == "mgpu_header_timeouts_total":
                    return float(sample.value)
        raise AssertionError("no mgpu_header_timeouts_total in /metrics")

    async def drip(
        self, data: bytes, every: float, limit: float
    ) -> tuple[RawConnection, float, int]:
        """Connect and send ``data`` a byte every ``every`` seconds until the daemon closes
        the connection (or ``limit`` seconds pass); returns it, how long it stayed open,
        and its local port."""
        started = time.monotonic()
        conn = await connect(self.stack.port, RawConnection())
        self.addCleanup(conn.abort)
        assert conn.transport is not None
        port = cast(IPv4Address, conn.transport.getHost()).port
        for byte in data:
            if conn.closed.called or time.monotonic() - started > limit:
                break
            conn.send(bytes([byte]))
            await sleep(every)
        await closed(conn, max(0.1, limit - (time.monotonic() - started)))
        return conn, time.monotonic() - started, port

    async def test_slow_drip_closed_after_header_timeout(self) -> None:
        """A client dripping its head a byte every 0.2 s is closed about header_timeout_s
        after connecting, with no answer and no log line naming it; /metrics counts it."""
        daemon = self.stack.daemon
        assert daemon is not None
        counted = await self.header_timeouts()
        logged = daemon.process.stdout()
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 100
        conn, lasted, port = await self.drip(head, 0.2, 10)
        self.assertGreaterEqual(lasted, HEADER_TIMEOUT_S - 0.1)
        self.assertLess(lasted, HEADER_TIMEOUT_S + 2)
        self.assertEqual(conn.data(), b"")
        await sleep(0.7)  # past the access log's batching: a line would be out by now
        new = daemon.process.stdout()[len(logged) :]
        self.assertNotIn(str(port), new)
        self.assertNotIn("Traceback", new)
        self.assertEqual(await self.header_timeouts(), counted + 1)

    async def test_head_in_time_served_then_idle_connection_closed(self) -> None:
        """A head dripped over less than header_timeout_s is answered; the kept-alive
        connection, sending nothing more, is closed about header_timeout_s after the
        answer, and is not counted as a slow head."""
        counted = await self.header_timeouts()
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # kept alive
        conn, _, _ = await self.drip(head, 0.5 / len(head), 10)
        closed_at = time.monotonic()
        self.assertEqual(parse_response(conn.data()).status, 200)
        answered_at = conn.chunks[0][0]
        self.assertGreaterEqual(closed_at - answered_at, HEADER_TIMEOUT_S - 0.1)
        self.assertLess(closed_at - answered_at, HEADER_TIMEOUT_S + 2)
        self.assertEqual(await self.header_timeouts(), counted)
