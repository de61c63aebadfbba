"""``auth.token_file``: every route but /healthz needs the bearer token; it is never passed on."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    Stack,
    make_config,
    raw_request,
    request_bytes,
    shared_stacks,
    token_auth,
)
from tests.integration.patterns import ERROR_KEYS

TOKEN = "s3cr3t-t0ken-for-the-integration-tests"


async def _auth_stack() -> Stack:
    """The recorder serves tts and /audio, so the test sees every header that reaches it."""
    stack = Stack.new("mgpu-auth-")
    async with stack.starting():
        await stack.add_recorder()
        config = make_config(
            stack.consumers,
            {"tts": "recorder"},
            audio_proxy="recorder",
            auth=token_auth(stack.workdir, TOKEN),
        )
        await stack.start(config)
    return stack


class AuthTests(TestCase):
    """One daemon with a token, shared by these tests."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("auth", _auth_stack)
        self.recorder = self.stack.consumers["recorder"]

    def requests_seen(self) -> list[dict[str, object]]:
        return [e for e in self.recorder.log_lines() if e["target"] != "/"]

    async def test_routes_refused_without_the_token(self) -> None:
        """Without the token, or with a wrong one, every route but /healthz gets 401
        unauthorized and nothing reaches the consumer."""
        seen = len(self.requests_seen())
        routes = [
            ("GET", "/v1/status", None),
            ("POST", "/v1/tts", b'{"text": "x"}'),
            ("GET", "/audio/file.wav", None),
            ("HEAD", "/audio/file.wav", None),
            ("GET", "/nope", None),
        ]
        failures = []
        for authorization in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
            headers = {"Authorization": authorization} if authorization else None
            for method, path, body in routes:
                response = await raw_request(
                    self.stack.port,
                    request_bytes(method, path, body, headers),
                    head_only=method == "HEAD",
                )
                where = f"{method} {path} with {authorization!r}"
                if response.status != 401:
                    failures.append(f"{where}: {response.status}")
                elif method != "HEAD":
                    error = response.json()
                    if set(error) != ERROR_KEYS or error["error"] != "unauthorized":
                        failures.append(f"{where}: {error}")
                    elif TOKEN in response.body.decode():
                        failures.append(f"{where}: the answer shows the token")
        self.assertEqual(failures, [], "\n".join(failures))
        self.assertEqual(self.requests_seen()[seen:], [])

    async def test_healthz_needs_no_token(self) -> None:
        """/healthz answers without a token."""
        response = await raw_request(self.stack.port, request_bytes("GET", "/healthz"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"status": "ok"})

    async def test_token_accepted_and_not_forwarded(self) -> None:
        """With the token, requests are served, and the consumer never sees the client's
        Authorization header."""
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Trace": "abc"}
        status = await raw_request(
            self.stack.port, request_bytes("GET", "/v1/status", headers=headers)
        )
        self.assertEqual(status.status, 200)
        tts = await raw_request(
            self.stack.port, request_bytes("POST", "/v1/tts?voice=a", b'{"text": "x"}', headers)
        )
        self.assertEqual(tts.status, 200, tts.body)
        self.assertEqual(tts.json(), {"recorded": "/record?voice=a"})
        audio = await raw_request(
            self.stack.port, request_bytes("GET", "/audio/file.wav", headers=headers)
        )
        self.assertEqual(audio.status, 200, audio.body)
        entries = self.requests_seen()[-2:]
        self.assertEqual([e["target"] for e in entries], ["/record?voice=a", "/audio/file.wav"])
        for entry in entries:
            got = {str(k).lower(): v for k, v in entry["headers"].items()}  # type: ignore[attr-defined]
            self.assertNotIn("authorization", got, entry)
            self.assertEqual(got.get("x-trace"), "abc", entry)

    def test_token_never_logged(self) -> None:
        """The daemon's log never shows the token."""
        assert self.stack.daemon is not None
        self.assertNotIn(TOKEN, self.stack.daemon.process.stdout())
        self.assertNotIn(TOKEN, self.stack.daemon.process.stderr())
