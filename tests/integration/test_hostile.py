"""Hostile consumers behind the real daemon: no crossed answers, no outage from one bad
reply, no GPU lease held by a slow reader (SPEC section 9.7).

A scripted consumer (``tests/integration/hostile.py``) sends exactly the bytes
each request asks for.  The clients here are blocking ``http.client``
connections in threads (the daemon and the consumers are other processes), so
hypothesis can drive them.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from tests.fuzz import examples
from tests.integration.harness import Stack, shared_stacks, start_hostile

#: Examples per property: bounded in ``make test``, thousands in ``make fuzz``.
EXAMPLES = examples(15)
#: What a consumer may hold a request before the daemon gives up on it (its timeout_s).
CONSUMER_TIMEOUT_S = 10


async def _hostile_stack() -> Stack:
    """``hostile`` (tts, keep-alive off: the default) and ``kept`` (stt, keepalive: true)."""
    stack = Stack.new("mgpu-hostile-")
    async with stack.starting():
        for name in ("hostile", "kept"):
            stack.consumers[name] = await start_hostile(name, stack.workdir)
        consumer = {
            "vram_resident_mib": 1,
            "timeout_s": CONSUMER_TIMEOUT_S,
            "max_concurrency": 1,
        }
        config = {
            "gpu": {"source": "none", "total_mib": 16384},
            "health": {"interval_s": 60, "timeout_s": 2},
            "routing": {"tts": "hostile", "stt": "kept"},
            "consumers": {
                "hostile": {
                    **consumer,
                    "url": stack.consumers["hostile"].url,
                    "paths": {"tts": {"method": "POST", "path": "/answer"}},
                    "can_coexist_with": ["kept"],
                },
                "kept": {
                    **consumer,
                    "url": stack.consumers["kept"].url,
                    "paths": {"stt": {"method": "POST", "path": "/answer"}},
                    "keepalive": True,
                },
            },
        }
        await stack.start(config)
    return stack


def answer_for(rid: str, framing: str = "length", chunk: int = 3) -> bytes:
    """A well-formed answer whose body is ``{"id": rid}``."""
    body = json.dumps({"id": rid}).encode()
    if framing == "length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    if framing == "chunked":
        pieces = [body[at : at + chunk] for at in range(0, len(body), chunk)]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\n\r\n" + body  # ends with the connection


def script(
    segments: list[bytes],
    late: bytes = b"",
    late_ms: int = 0,
    close: bool = False,
    gap_ms: int = 0,
) -> bytes:
    """The request body that makes the hostile consumer send these bytes."""
    return json.dumps(
        {
            "segments": [base64.b64encode(s).decode() for s in segments],
            "late": base64.b64encode(late).decode() if late else None,
            "late_ms": late_ms,
            "close": close,
            "gap_ms": gap_ms,
        }
    ).encode()


class Reply:
    """What one client got: status, headers and body, or how its connection ended."""

    def __init__(self, status: int | None, headers: dict[str, str], body: bytes, error: str):
        self.status = status
        self.headers = headers
        self.body = body
        self.error = error

    def json(self) -> Any:
        return json.loads(self.body)


def post(port: int, path: str, body: bytes, timeout: float = 20) -> Reply:
    """One blocking ``POST`` on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        try:
            data = response.read()
        except http.client.IncompleteRead as e:
            return Reply(response.status, headers, e.partial, "cut")
        return Reply(response.status, headers, data, "")
    except (http.client.HTTPException, OSError) as e:
        return Reply(None, {}, b"", type(e).__name__)
    finally:
        conn.close()


def status(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/v1/status")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def wait_idle(port: int, timeout: float = 10, completed: int = 0) -> dict[str, Any]:
    """The status once the GPU lease is free, nothing waits and at least ``completed``
    requests were answered (blocking)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = status(port)
        s = doc["scheduler"]
        if (s["holder"], s["queued"], s["running"]) == (None, 0, 0) and s["completed"] >= completed:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"the lease was not released: {s}")
        time.sleep(0.05)


def all_at_once(port: int, path: str, bodies: list[bytes]) -> list[Reply]:
    """Send every body at once, each on its own connection; the replies in order."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: post(port, path, body), bodies))


class _HostileCase(TestCase):
    timeout = 600

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("hostile", _hostile_stack)
        self.port = self.stack.port

    def assertOwnBytesOnly(self, replies: list[Reply], ids: list[str]) -> None:
        """No reply holds another request's id or a stray answer's marker."""
        for rid, reply in zip(ids, replies, strict=True):
            foreign = [other for other in ids if other != rid and other.encode() in reply.body]
            self.assertEqual(foreign, [], f"{rid} got bytes of {foreign}: {reply.body[:200]!r}")
            self.assertNotIn("set-cookie", reply.headers, rid)

    def assertBadAnswer(self, reply: Reply) -> None:
        self.assertEqual(reply.status, 502, reply.body)
        error = reply.json()
        self.assertEqual((error["error"], error["retryable"]), ("bad_answer", True))

    def assertStillServing(self, path: str = "/v1/tts") -> None:
        """The consumer is still in service: healthy, and a plain request gets its answer."""
        doc = wait_idle(self.port)
        name = "hostile" if path == "/v1/tts" else "kept"
        self.assertIs(doc["consumers"][name]["healthy"], True)
        reply = post(self.port, path, script([answer_for("plain")]))
        self.assertEqual((reply.status, reply.json()), (200, {"id": "plain"}))


class CrossedAnswerTests(_HostileCase):
    """Late and stray answers never reach another client."""

    def test_queued_requests_with_late_answers_get_their_own(self) -> None:
        """Twenty queued requests whose consumer sends a second, stray answer after each
        one: every client gets exactly its own answer."""
        ids = [f"req-{n:02d}" for n in range(20)]
        stray = answer_for("STRAY")
        bodies = [script([answer_for(rid)], late=stray, late_ms=20) for rid in ids]
        replies = all_at_once(self.port, "/v1/tts", bodies)
        self.assertOwnBytesOnly(replies, ids)
        self.assertEqual([(r.status, r.json()) for r in replies], [(200, {"id": i}) for i in ids])
        self.assertStillServing()

    def test_body_after_a_bodiless_answer_is_nobodys(self) -> None:
        """A 204 that declares a length and sends a body later: the client gets its 204
        without that length, and the body reaches nobody."""
        ids = [f"nc-{n}" for n in range(5)]
        bodies = [
            script(
                [b"HTTP/1.1 204 No Content\r\nContent-Length: 14\r\n\r\n"],
                late=b'{"id":"STRAY"}',
                late_ms=20,
            )
            for _ in ids
        ]
        replies = all_at_once(self.port, "/v1/tts", bodies)
        self.assertOwnBytesOnly(replies, ids)
        self.assertEqual({r.status for r in replies}, {204})
        self.assertEqual({r.headers.get("content-length") for r in replies}, {None})

    def test_kept_connection_caught_speaking_is_reused_no_more(self) -> None:
        """With keepalive, an answer followed by stray bytes in the same segment: each client
        gets its own answer, and the consumer's keep-alive is suspended (status says so)."""
        ids = [f"ka-{n}" for n in range(6)]
        bodies = [script([answer_for(rid) + answer_for("STRAY")]) for rid in ids]
        replies = all_at_once(self.port, "/v1/stt", bodies)
        self.assertOwnBytesOnly(replies, ids)
        self.assertEqual([r.status for r in replies], [200] * len(ids))
        doc = wait_idle(self.port)
        self.assertEqual(doc["consumers"]["kept"]["keepalive"], "suspended")
        self.assertEqual(doc["consumers"]["hostile"]["keepalive"], "off")
        self.assertIn("no longer reused", self.stack.output())


class BadAnswerTests(_HostileCase):
    """A malformed answer is 502 bad_answer for that request alone."""

    def test_injected_header_refused(self) -> None:
        """A status line that smuggles a header with a bare LF never reaches the client: 502
        bad_answer, no Set-Cookie, and the consumer stays in service."""
        raw = b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok"
        reply = post(self.port, "/v1/tts", script([raw], close=True))
        self.assertBadAnswer(reply)
        self.assertNotIn("set-cookie", reply.headers)
        self.assertStillServing()

    def test_control_characters_in_the_reason_phrase(self) -> None:
        """NUL or ESC in the reason phrase: 502 bad_answer, no byte of it relayed."""
        for reason in (b"O\x00K", b"O\x1b[2JK"):
            raw = b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok"
            reply = post(self.port, "/v1/tts", script([raw], close=True))
            self.assertBadAnswer(reply)
            self.assertNotIn(b"\x1b", reply.body)
        self.assertStillServing()

    def test_huge_content_length(self) -> None:
        """A 5000-digit Content-Length is 502 bad_answer, with no traceback in the log."""
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nok"
        reply = post(self.port, "/v1/tts", script([raw], close=True))
        self.assertBadAnswer(reply)
        self.assertStillServing()
        self.assertNotIn("Traceback", self.stack.output())

    def test_garbage_is_never_quoted(self) -> None:
        """Garbage that holds another client's answer: the 502's message quotes none of it."""
        raw = b"\x00garbage " + answer_for("someone-else")
        reply = post(self.port, "/v1/tts", script([raw], close=True))
        self.assertBadAnswer(reply)
        self.assertNotIn(b"someone-else", reply.body)
        self.assertIn("bad answer", self.stack.output())
        self.assertStillServing()


class ClosingConsumerTests(_HostileCase):
    """A consumer that closes right after answering, without saying so."""

    def queued_closing_posts(self, path: str) -> tuple[list[str], list[Reply]]:
        ids = [f"{path[-3:]}-{n}-{uuid.uuid4().hex}" for n in range(10)]
        bodies = [script([answer_for(rid)], close=True) for rid in ids]
        return ids, all_at_once(self.port, path, bodies)

    def test_queued_posts_all_answered(self) -> None:
        """Ten queued POSTs to a consumer that closes each connection right after its
        answer (no Connection: close): with keep-alive off (the default) all get 200."""
        ids, replies = self.queued_closing_posts("/v1/tts")
        self.assertEqual(
            [(r.status, r.body) for r in replies],
            [(200, json.dumps({"id": rid}).encode()) for rid in ids],
        )
        self.assertStillServing("/v1/tts")

    def test_kept_connections_closed_without_notice(self) -> None:
        """The same with keepalive: true: a POST sent as a kept connection closes may fail
        (502 bad_answer, never retried: it may have been acted on), at most once, since
        keep-alive is then off for that consumer; it is never marked unreachable."""
        ids, replies = self.queued_closing_posts("/v1/stt")
        self.assertOwnBytesOnly(replies, ids)
        failed = [r for r in replies if r.status != 200]
        self.assertLessEqual(len(failed), 1, [r.body for r in failed])
        for reply in failed:
            self.assertBadAnswer(reply)
        self.assertStillServing("/v1/stt")
        if failed:
            self.assertEqual(status(self.port)["consumers"]["kept"]["keepalive"], "suspended")


class SlowReaderTests(_HostileCase):
    """A client that does not read does not hold the GPU."""

    def _recv(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(1 << 20)
        except OSError as e:
            self.fail(f"{e}: {self.stack.output()[-3000:]}")

    def test_lease_released_while_the_client_reads_nothing(self) -> None:
        """A client that reads none of a 32 MiB answer: the lease is free once the consumer is
        done, another request runs meanwhile, and the slow client then reads it all."""
        size = 32 * 2**20
        body = b"x" * size
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body
        request = script([raw], close=True)
        completed = status(self.port)["scheduler"]["completed"]
        slow = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(slow.close)
        slow.sendall(
            b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(request), request)
        )
        wait_idle(self.port, completed=completed + 1)
        reply = post(self.port, "/v1/tts", script([answer_for("meanwhile")]))
        self.assertEqual((reply.status, reply.json()), (200, {"id": "meanwhile"}))
        received = bytearray()
        slow.settimeout(10)
        while (data := self._recv(slow)) != b"":
            received += data
            if received.endswith(b"x" * 64) and len(received) >= size:
                break
        head, _, got = bytes(received).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"), head[:100])
        self.assertEqual(got, body, self.stack.output()[-3000:])


#: The daemon's file-descriptor limit in the overload test: budget = limit - 64 reserved.
FD_LIMIT = 160


async def _fd_limited_stack() -> Stack:
    """The daemon under ``prlimit --nofile=160:160`` in front of one hostile consumer."""
    stack = Stack.new("mgpu-fdlimit-")
    async with stack.starting():
        stack.consumers["hostile"] = await start_hostile("hostile", stack.workdir)
        config = {
            "gpu": {"source": "none", "total_mib": 16384},
            "health": {"interval_s": 0.5, "timeout_s": 2},
            "scheduler": {"max_queue": 1000},
            "routing": {"tts": "hostile"},
            "consumers": {
                "hostile": {
                    "url": stack.consumers["hostile"].url,
                    "paths": {"tts": {"method": "POST", "path": "/answer"}},
                    "vram_resident_mib": 1,
                    "timeout_s": CONSUMER_TIMEOUT_S,
                }
            },
        }
        await stack.start(config, launcher=["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"])
    return stack


class DescriptorLimitTests(TestCase):
    """The daemon at its own file-descriptor limit."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("fdlimit", _fd_limited_stack)
        self.port = self.stack.port

    def test_every_client_answered_at_the_limit(self) -> None:
        """Twice as many clients at once as the limit allows: each gets an HTTP answer, its
        own 200 or 503 daemon_overloaded with Retry-After; the consumer stays healthy, the
        start-up log warned, and the shed connections were logged once, not one by one."""
        ids = [f"fd-{n}-{uuid.uuid4().hex}" for n in range(2 * FD_LIMIT)]
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
        bodies = []
        for rid in ids:
            body = json.dumps({"id": rid}).encode()
            bodies.append(script([head % len(body), body], gap_ms=5))
        replies = all_at_once(self.port, "/v1/tts", bodies)
        self.assertEqual([r.error for r in replies if r.status is None], [])
        statuses = {r.status for r in replies}
        self.assertLessEqual(statuses, {200, 503}, statuses)
        for rid, reply in zip(ids, replies, strict=True):
            if reply.status == 200:
                self.assertEqual(reply.json(), {"id": rid})
            else:
                self.assertEqual(reply.json()["error"], "daemon_overloaded")
                self.assertEqual(reply.headers.get("retry-after"), "1")
        self.assertIn(503, statuses)
        self.assertIn(200, statuses)
        doc = wait_idle(self.port, timeout=30)
        self.assertIs(doc["consumers"]["hostile"]["healthy"], True)
        assert self.stack.daemon is not None
        output = self.stack.daemon.process.stdout()
        self.assertIn(f"soft limit at {FD_LIMIT} (hard {FD_LIMIT}), below the", output)
        self.assertLessEqual(output.count("answered 503 daemon_overloaded"), 3)
        self.assertNotIn("Too many open files", output)


#: The ways a generated answer may be broken.
_MUTATIONS = ("none", "inject", "nul_reason", "huge_length", "bad_chunk", "garbage", "truncate")


@st.composite
def _scripted_answer(draw: st.DrawFn, rid: str) -> tuple[bytes, bool]:
    """A script for request ``rid`` and whether its answer is well formed."""
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    raw = answer_for(rid, framing, chunk=draw(st.integers(1, 8)))
    mutation = draw(st.sampled_from(_MUTATIONS))
    if mutation == "inject":
        raw = raw.replace(b"200 OK\r\n", b"200 OK\nSet-Cookie: x=1\r\n", 1)
    elif mutation == "nul_reason":
        raw = raw.replace(b"200 OK", b"200 O\x00K", 1)
    elif mutation == "huge_length":
        raw = raw.replace(
            b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 30 + b"\r\n", 1
        )
    elif mutation == "bad_chunk":
        raw = raw.replace(b"\r\n\r\n", b"\r\n\r\n 1\r\n", 1)
    elif mutation == "garbage":
        raw = draw(st.binary(min_size=1, max_size=60)) + raw
    elif mutation == "truncate":
        raw = raw[: draw(st.integers(1, len(raw) - 1))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=4))))
    cuts = [cut for cut in cuts if cut < len(raw)]
    segments = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    # Late bytes name this request only: on its own connection they may still be read
    # as its body (an answer framed by the connection's end); they must reach no other.
    late = (
        b""
        if framing == "close"
        else draw(
            st.sampled_from([b"", answer_for(f"late-{rid}"), f"junk {rid}".encode(), b"\r\n\r\n"])
        )
    )
    body = script(
        segments,
        late=late,
        late_ms=draw(st.sampled_from([0, 5, 30])),
        close=True,
        gap_ms=draw(st.sampled_from([0, 2])),
    )
    return body, mutation == "none"


class HostileAnswerProperties(_HostileCase):
    """Generated answers over real loopback connections with several requests queued."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.data(), st.integers(1, 6))
    def test_each_client_gets_its_own_answer_or_an_error(self, data: st.DataObject, n: int) -> None:
        """Whatever the consumer sends: each client gets its own answer exactly (when it was
        well formed) or a broker error, never a byte of another request's; the lease is
        released, the queue drains, and the consumer stays healthy."""
        ids = [f"gen-{uuid.uuid4().hex}" for _ in range(n)]
        drawn = [data.draw(_scripted_answer(rid)) for rid in ids]
        replies = all_at_once(self.port, "/v1/tts", [body for body, _ in drawn])
        self.assertOwnBytesOnly(replies, ids)
        for rid, (_, well_formed), reply in zip(ids, drawn, replies, strict=True):
            if well_formed:
                self.assertEqual((reply.status, reply.json()), (200, {"id": rid}), reply.error)
            elif reply.status is not None and reply.status != 200 and not reply.error:
                self.assertIn(reply.json()["error"], ("bad_answer", "upstream_timeout"))
        doc = wait_idle(self.port)
        self.assertIs(doc["consumers"]["hostile"]["healthy"], True)
