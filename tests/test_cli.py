"""Tests for mgpu.cli: rendering, the event-stream parser, check-config and the command line.

Rendering and parsing are pure and tested as such. Commands that talk to the
daemon are run through ``cli.run`` with ``Client.call`` / ``Client.stream``
replaced, so no test opens a socket; ``tests/integration/test_cli.py`` runs
the real command against the real daemon.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from mgpu import cli
from mgpu.cli import (
    Client,
    DaemonError,
    Io,
    SseMessage,
    SseParser,
    StreamLost,
    Unreachable,
    UsageError,
    ago,
    answer_of,
    build_parser,
    describe,
    parse_url,
    read_token_file,
    render_event,
    render_message,
    render_reload,
    render_status,
    request_headers,
)

NOW = datetime(2026, 11, 26, 22, 2, 5, tzinfo=UTC)

#: A status document in the shape of SPEC section 6.
STATUS: Mapping[str, Any] = {
    "gpu": {
        "source": "nvml", "ok": True, "error": None, "index": 0,
        "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564, "used_mib": 16012,
        "free_mib": 8552, "read_at": "2026-11-26T22:02:03Z",
    },
    "consumers": {
        "mvoice": {
            "healthy": True, "loaded": True, "last_probe": "2026-11-26T22:02:04Z",
            "last_error": None, "vram_resident_mib": 2800, "vram_managed": False,
            "last_used": "2026-11-26T22:00:00Z", "in_flight": 1, "queued": 2,
        },
        "whisper": {
            "healthy": False, "loaded": None, "last_probe": "2026-11-26T22:02:04Z",
            "last_error": "connection refused", "vram_resident_mib": 1500,
            "vram_managed": False, "last_used": None, "in_flight": 0, "queued": 0,
        },
        "comfyui": {
            "healthy": None, "loaded": False, "last_probe": None, "last_error": None,
            "vram_resident_mib": 13000, "vram_managed": False,
            "last_used": "2026-11-24T19:00:00Z", "in_flight": 0, "queued": 0,
        },
    },
    "scheduler": {
        "queued": 2, "running": 1, "holder": "mvoice", "completed": 12, "failed": 1,
        "rejected": 0, "evictions": 3, "loads": 2,
    },
}  # fmt: skip


class StatusRenderingTests(SynchronousTestCase):
    """``mgpu status``: the GPU line, the consumer table and the scheduler line."""

    def test_sample_document(self) -> None:
        """Every field of the document lands in its place; the unhealthy consumer's
        last error follows its row; never-used and not-yet-probed show as such."""
        self.assertEqual(
            render_status(STATUS, NOW),
            [
                "GPU 0: NVIDIA GeForce RTX 4090 via nvml, 16012 / 24564 MiB used, "
                "8552 MiB free, ok (read 2s ago)",
                "",
                "CONSUMER  HEALTHY  LOADED  RESIDENT   IN FLIGHT  QUEUED  LAST USED",
                "mvoice    yes      yes     2800 MiB   1          2       2m 5s ago",
                "whisper   no       ?       1500 MiB   0          0       never",
                "    last error: connection refused",
                "comfyui   ?        no      13000 MiB  0          0       2d 3h ago",
                "",
                "scheduler: holder mvoice, queued 2, running 1, completed 12, failed 1, "
                "rejected 0, evictions 3, loads 2",
            ],
        )

    def test_failing_gpu_reading(self) -> None:
        """A GPU that cannot be read shows its error and unknown figures, not zeros."""
        doc = dict(STATUS)
        doc["gpu"] = {
            "source": "nvidia-smi", "ok": False, "error": "nvidia-smi: exit status 9",
            "index": 1, "name": None, "total_mib": None, "used_mib": None,
            "free_mib": None, "read_at": "2026-11-26T22:00:00Z",
        }  # fmt: skip
        self.assertEqual(
            render_status(doc, NOW)[0],
            "GPU 1: unknown GPU via nvidia-smi, ? / ? MiB used, ? MiB free, "
            "error: nvidia-smi: exit status 9 (read 2m 5s ago)",
        )

    def test_no_gpu_source_chosen(self) -> None:
        """gpu.source: none reads as chosen, not as a failure with unknown figures."""
        doc = dict(STATUS)
        doc["gpu"] = {
            "source": "none", "ok": False, "error": "no GPU source configured (gpu.source: none)",
            "index": 0, "name": None, "total_mib": None, "used_mib": None,
            "free_mib": None, "read_at": "2026-11-26T22:00:00Z",
        }  # fmt: skip
        self.assertEqual(
            render_status(doc, NOW)[0],
            "GPU 0: not read (gpu.source: none), the broker's own accounting",
        )

    def test_several_cards_a_line_each(self) -> None:
        """With two cards, a line per card with its lease, queue and consumers."""
        doc = json.loads(json.dumps(STATUS))
        card = {**doc["gpu"], "holder": "comfyui", "queued": 2, "consumers": ["comfyui"]}
        doc["gpus"] = [
            {**doc["gpu"], "holder": None, "queued": 0, "consumers": ["mvoice", "ollama"]},
            {**card, "index": 1},
        ]
        lines = render_status(doc, NOW)
        self.assertTrue(lines[0].startswith("GPU 0: "), lines[0])
        self.assertTrue(lines[0].endswith("; lease free, 0 queued, on it: mvoice, ollama"))
        self.assertTrue(lines[1].startswith("GPU 1: "), lines[1])
        self.assertTrue(lines[1].endswith("; lease comfyui, 2 queued, on it: comfyui"))
        self.assertEqual(lines[2], "")
        doc["gpus"] = doc["gpus"][:1]
        self.assertEqual(render_status(doc, NOW), render_status(STATUS, NOW))

    def test_idle_scheduler_and_no_consumers(self) -> None:
        """No holder reads as none; an empty consumer map says so."""
        doc = {"gpu": {}, "consumers": {}, "scheduler": {"holder": None, "queued": 0}}
        lines = render_status(doc, NOW)
        self.assertIn("(no consumers)", lines)
        self.assertTrue(lines[-1].startswith("scheduler: holder none, queued 0, running ?"))

    def test_healthy_consumer_hides_an_old_error(self) -> None:
        """A healthy consumer's last_error (a past failure) is not shown as current."""
        doc = json.loads(json.dumps(STATUS))
        doc["consumers"]["mvoice"]["last_error"] = "timed out an hour ago"
        self.assertNotIn("timed out", "\n".join(render_status(doc, NOW)))

    def test_relative_times(self) -> None:
        """Timestamps read as time before now, in the largest sensible units."""
        cases = {
            None: "never",
            "2026-11-26T22:02:05Z": "just now",
            "2026-11-26T22:01:23Z": "42s ago",
            "2026-11-26T22:01:23.500Z": "41s ago",
            "2026-11-26T19:52:00Z": "2h 10m ago",
            "2026-11-22T19:00:00Z": "4d 3h ago",
            "2026-11-26T22:05:00Z": "just now",  # the daemon's clock ahead of ours
            "yesterday": "yesterday",
        }
        self.assertEqual({k: ago(k, NOW) for k in cases}, cases)


def event(kind: str, **fields: object) -> dict[str, object]:
    return {"id": 7, "kind": kind, "at": "2026-11-26T22:00:01.204Z", **fields}


class EventRenderingTests(SynchronousTestCase):
    """``mgpu events``: one line per event, time, kind and a summary."""

    def check(self, doc: Mapping[str, object], summary: str) -> None:
        kind = str(doc["kind"])
        self.assertEqual(render_event(doc, UTC), f"2026-11-26 22:00:01.204  {kind:<8}  {summary}")

    def test_load(self) -> None:
        """A load names the consumer, how long it took and why."""
        self.check(
            event("load", consumer="mvoice", reason="request", took_s=0.75),
            "mvoice loaded in 0.75 s (request)",
        )

    def test_unload(self) -> None:
        """An unload names the consumer and why."""
        self.check(event("unload", consumer="mvoice", reason="admin"), "mvoice unloaded (admin)")

    def test_evict(self) -> None:
        """An eviction names victim and target, what it freed, how fast and how old the
        victim was; an unknown age is left out."""
        fields: dict[str, object] = {
            "consumer": "comfyui", "target": "mvoice",
            "reason": "mvoice needs 3056 MiB, 1884 MiB were free",
            "freed_mib": 13000, "free_s": 0.4, "age_s": 125.5,
        }  # fmt: skip
        self.check(
            event("evict", **fields),
            "comfyui evicted for mvoice: freed 13000 MiB in 400 ms, resident 2m 5s "
            "(mvoice needs 3056 MiB, 1884 MiB were free)",
        )
        self.check(
            event("evict", **{**fields, "free_s": 0.0, "age_s": None}),
            "comfyui evicted for mvoice: freed 13000 MiB at once "
            "(mvoice needs 3056 MiB, 1884 MiB were free)",
        )
        fields["age_s"] = None
        self.check(
            event("evict", **fields),
            "comfyui evicted for mvoice: freed 13000 MiB in 400 ms "
            "(mvoice needs 3056 MiB, 1884 MiB were free)",
        )

    def test_health(self) -> None:
        """A health change says healthy, or unhealthy and the error."""
        self.check(event("health", consumer="whisper", healthy=True, error=None), "whisper healthy")
        self.check(
            event("health", consumer="whisper", healthy=False, error="connection refused"),
            "whisper unhealthy: connection refused",
        )

    def test_rejected(self) -> None:
        """A rejection names the consumer when there is one, and the error code."""
        self.check(
            event("rejected", consumer="mvoice", reason="queue_full"),
            "a request for mvoice rejected: queue_full",
        )
        self.check(
            event("rejected", consumer=None, reason="payload_too_large"),
            "a request rejected: payload_too_large",
        )

    def test_timeout(self) -> None:
        """A timeout names the consumer, the limit and what timed out."""
        self.check(
            event("timeout", consumer="comfyui", reason="hold_until", after_s=300),
            "comfyui timed out after 300 s (hold_until)",
        )

    def test_unknown_kind(self) -> None:
        """A kind this client does not know still shows all its fields."""
        self.check(event("warmup", consumer="x", n=2), 'consumer="x" n=2')

    def test_time_in_the_local_zone(self) -> None:
        """The time is shown in the given zone (the local one by default)."""
        line = render_event(
            event("unload", consumer="m", reason="admin"), timezone(timedelta(hours=2))
        )
        self.assertTrue(line.startswith("2026-11-27 00:00:01.204  unload"), line)

    def test_json_mode_is_the_event(self) -> None:
        """``--json`` prints the event's own JSON, on one line."""
        doc = event("load", consumer="mvoice", reason="admin", took_s=1.5)
        line = render_message(SseMessage("load", json.dumps(doc, indent=2), "7"), True)
        self.assertNotIn("\n", line)
        self.assertEqual(json.loads(line), doc)

    def test_data_that_is_not_json(self) -> None:
        """Data that is not a JSON object is still shown, with the SSE event name as kind."""
        message = SseMessage("note", "hello", "3")
        self.assertEqual(
            json.loads(render_message(message, True)), {"id": "3", "kind": "note", "data": "hello"}
        )
        self.assertIn('note      data="hello"', render_message(message, False, UTC))


#: An event stream with everything the parser must handle: a byte order mark,
#: comments, ``retry``, CRLF, CR and LF line ends, data over several lines, a
#: field with no space, two spaces or no colon, non-ASCII text, an event with no data (not
#: dispatched) and an unfinished event at the end (not dispatched).
STREAM = (
    "\ufeffretry: 2000\n\n"
    ": keep-alive\n\n"
    'id: 1\nevent: unload\ndata: {"consumer": "mvoice"}\n\n'
    'id: 2\r\nevent: health\r\ndata:{"error":\r\ndata: "caf\u00e9 \u2013 d\u00e9j\u00e0"}\r\n\r\n'
    ": 3 events dropped\r\r"
    "event: load\rdata\rdata:  x \r\r"
    "event: orphan\n\n"
    "data: after orphan\n\n"
    "id: 9\nevent: unload\ndata: never finished\n"
).encode()

EXPECTED = [
    SseMessage("unload", '{"consumer": "mvoice"}', "1"),
    SseMessage("health", '{"error":\n"caf\u00e9 \u2013 d\u00e9j\u00e0"}', "2"),
    SseMessage("load", "\n x ", "2"),
    SseMessage("message", "after orphan", "2"),
]


def parse_chunks(chunks: Sequence[bytes]) -> tuple[list[SseMessage], SseParser]:
    parser = SseParser()
    messages = []
    for chunk in chunks:
        messages += parser.feed(chunk)
    return messages, parser


class SseParserTests(SynchronousTestCase):
    """The event-stream format, whatever the chunks it arrives in."""

    def test_whole_stream(self) -> None:
        """In one chunk: every complete event with data, in order; retry is kept."""
        messages, parser = parse_chunks([STREAM])
        self.assertEqual(messages, EXPECTED)
        self.assertEqual(parser.retry_ms, 2000)

    def test_every_split_in_two(self) -> None:
        """Split anywhere (inside a CRLF, a UTF-8 character, a field name): same events."""
        failures = []
        for i in range(len(STREAM) + 1):
            messages, _ = parse_chunks([STREAM[:i], STREAM[i:]])
            if messages != EXPECTED:
                failures.append((i, messages))
        self.assertEqual(failures, [])

    def test_byte_by_byte(self) -> None:
        """One byte at a time: same events."""
        messages, parser = parse_chunks([STREAM[i : i + 1] for i in range(len(STREAM))])
        self.assertEqual(messages, EXPECTED)
        self.assertEqual(parser.retry_ms, 2000)

    def test_an_event_is_dispatched_at_its_blank_line(self) -> None:
        """An event comes out with the chunk that ends it, not later."""
        parser = SseParser()
        self.assertEqual(parser.feed(b"event: load\ndata: {}\n"), [])
        self.assertEqual(parser.feed(b"\n"), [SseMessage("load", "{}", None)])

    def test_cr_then_lf_in_the_next_chunk(self) -> None:
        """A CR that ends a chunk and the LF that starts a later one are one line end,
        not a line end and a blank line."""
        parser = SseParser()
        self.assertEqual(parser.feed(b"data: a\r"), [])
        self.assertEqual(parser.feed(b""), [])
        self.assertEqual(parser.feed(b"\n"), [])
        self.assertEqual(parser.feed(b"data: b\r\n\r"), [SseMessage("message", "a\nb", None)])
        self.assertEqual(parser.feed(b"\n\n"), [])

    def test_bad_retry_is_ignored(self) -> None:
        """A retry value that is not digits leaves the last one."""
        parser = SseParser()
        parser.feed(b"retry: 10\n\nretry: soon\n\nretry: \xd9\xa3\n\n")
        self.assertEqual(parser.retry_ms, 10)


class AnswerTests(SynchronousTestCase):
    """Turning the daemon's HTTP answer into a result or an error."""

    def test_success(self) -> None:
        """A 2xx gives its JSON document."""
        self.assertEqual(
            answer_of(200, b'{"consumer": "m", "loaded": true}'), {"consumer": "m", "loaded": True}
        )

    def test_error_schema(self) -> None:
        """An error in the broker's schema gives its code and message."""
        body = json.dumps(
            {
                "error": "not_found",
                "message": "no consumer 'x'",
                "consumer": None,
                "retryable": False,
            }
        ).encode()
        error = self.assertRaises(DaemonError, answer_of, 404, body)
        self.assertEqual((error.code, error.message), ("not_found", "no consumer 'x'"))

    def test_not_json(self) -> None:
        """Something else in front of the daemon (an HTML 502) is shown by status and text."""
        error = self.assertRaises(DaemonError, answer_of, 502, b"<html>\n Bad   Gateway</html>")
        self.assertEqual((error.code, error.message), ("http_502", "<html> Bad Gateway</html>"))
        error = self.assertRaises(DaemonError, answer_of, 200, b"ok")
        self.assertEqual(error.code, "bad_answer")


class DescribeTests(SynchronousTestCase):
    """Why no answer came, in the words ``error: cannot reach URL: ...`` ends with."""

    def test_reasons(self) -> None:
        """Timeouts, names, refusals and broken answers each read as what happened."""
        cases = [
            (TimeoutError("timed out"), "no answer within 600 s"),
            (
                socket.gaierror(-2, "Name or service not known"),
                "cannot resolve the host: Name or service not known",
            ),
            (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
            (http.client.RemoteDisconnected("x"), "the connection closed without an answer"),
            (
                http.client.IncompleteRead(b"ab", 3),
                "the connection closed in the middle of the answer",
            ),
            (http.client.BadStatusLine("SSH-2.0"), "not an HTTP answer (BadStatusLine)"),
        ]
        self.assertEqual([describe(e, 600.0) for e, _ in cases], [why for _, why in cases])


class TokenTests(SynchronousTestCase):
    """``--token-file``: read, checked, sent as a bearer token, never shown."""

    def test_header(self) -> None:
        """A token is sent as ``Authorization: Bearer``; none, no header."""
        self.assertEqual(request_headers("abc")["Authorization"], "Bearer abc")
        self.assertNotIn("Authorization", request_headers(None))

    def test_file_is_stripped(self) -> None:
        """The file's surrounding whitespace (its newline) is not part of the token."""
        path = Path(self.mktemp())
        path.write_text("  s3cret\n")
        self.assertEqual(read_token_file(str(path)), "s3cret")

    def test_unusable_files(self) -> None:
        """A missing, empty or two-word file is a usage error that never shows the contents."""
        path = Path(self.mktemp())
        error = self.assertRaises(UsageError, read_token_file, str(path))
        self.assertIn("cannot read it", str(error))
        for text in ("\n", "two words\n"):
            path.write_text(text)
            error = self.assertRaises(UsageError, read_token_file, str(path))
            self.assertIn("printable ASCII", str(error))
            self.assertNotIn("words", str(error))

    def test_token_file_from_the_environment(self) -> None:
        """``MGPU_TOKEN_FILE`` is the default, and a missing file exits 2 before any call."""
        calls: list[object] = []
        self.patch(Client, "call", lambda *a: calls.append(a))
        result = run_cli(["status"], {"MGPU_TOKEN_FILE": "/nonexistent/token"})
        self.assertEqual(result.code, 2)
        self.assertIn("error: --token-file /nonexistent/token: cannot read it", result.err)
        self.assertEqual(calls, [])


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def run_cli(argv: list[str], environ: Mapping[str, str] | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(argv, environ or {}, Io(out, err, lambda: NOW, UTC))
    return Result(code, out.getvalue(), err.getvalue())


class Recorder:
    """Stands in for ``Client.call``: records the calls, answers or raises as told."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, str | None, str]] = []

    def __call__(self, client: Client, method: str, path: str) -> object:
        self.calls.append((method, path, client.token, client.target.url))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class CommandTests(SynchronousTestCase):
    """The daemon commands: the call each makes, what it prints, its exit status."""

    def use(self, answer: object) -> Recorder:
        recorder = Recorder(answer)

        def call(client: Client, method: str, path: str) -> object:
            return recorder(client, method, path)

        self.patch(Client, "call", call)
        return recorder

    def test_status_table(self) -> None:
        """``status`` GETs /v1/status from --url and prints the table."""
        recorder = self.use(STATUS)
        result = run_cli(["--url", "http://10.0.0.5:9000/", "status"])
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertEqual(result.out.splitlines(), render_status(STATUS, NOW))
        self.assertEqual(recorder.calls, [("GET", "/v1/status", None, "http://10.0.0.5:9000")])

    def test_status_json(self) -> None:
        """``status --json`` prints the document itself."""
        self.use(STATUS)
        result = run_cli(["status", "--json"])
        self.assertEqual(json.loads(result.out), STATUS)

    def test_load_and_unload(self) -> None:
        """``load``/``unload NAME`` POST to the admin route and print one line."""
        recorder = self.use({"consumer": "mvoice", "loaded": True})
        result = run_cli(["load", "mvoice"])
        self.assertEqual(result.code, 0)
        self.assertRegex(result.out, r"^mvoice: loaded \(\d+\.\d s\)\n$")
        recorder.answer = {"consumer": "a b", "loaded": False}
        result = run_cli(["unload", "a b"])
        self.assertRegex(result.out, r"^a b: unloaded \(")
        self.assertEqual(
            [c[:2] for c in recorder.calls],
            [
                ("POST", "/v1/admin/consumers/mvoice/load"),
                ("POST", "/v1/admin/consumers/a%20b/unload"),
            ],
        )

    def test_daemon_error(self) -> None:
        """An error answer exits 1 with ``error: CODE: MESSAGE`` on stderr only."""
        self.use(DaemonError("not_found", "no consumer 'nope'"))
        result = run_cli(["unload", "nope"])
        self.assertEqual((result.code, result.out), (1, ""))
        self.assertEqual(result.err, "error: not_found: no consumer 'nope'\n")

    def test_unreachable(self) -> None:
        """No answer exits 3 with ``error: cannot reach URL: reason``."""
        self.use(Unreachable("http://127.0.0.1:8770", "Connection refused"))
        result = run_cli(["status"])
        self.assertEqual(result.code, 3)
        self.assertTrue(
            result.err.startswith("error: cannot reach http://127.0.0.1:8770: Connection refused")
        )
        self.assertIn("MGPU_URL", result.err)  # how to name another address

    def test_unauthorized_names_the_token_option(self) -> None:
        """A 401 says how to give the token."""
        self.use(DaemonError("unauthorized", "a valid bearer token is required"))
        result = run_cli(["status"])
        self.assertEqual(result.code, 1)
        self.assertIn("--token-file", result.err)

    def test_reload(self) -> None:
        """``reload`` POSTs /v1/admin/reload and says what changed."""
        answer = {
            "reloaded": True, "added": ["whisper"], "removed": [],
            "restarted_state": ["mvoice"], "needs_restart": ["listen"],
        }  # fmt: skip
        recorder = self.use(answer)
        result = run_cli(["reload"])
        self.assertEqual(result.code, 0)
        self.assertEqual(result.out.splitlines(), render_reload(answer))
        self.assertEqual(
            render_reload(answer),
            [
                "reloaded: added whisper; removed none; state restarted for mvoice",
                "needs a restart to apply: listen",
            ],
        )
        self.assertEqual(recorder.calls[0][:2], ("POST", "/v1/admin/reload"))

    def test_token_and_url_from_the_environment(self) -> None:
        """``MGPU_URL`` and ``MGPU_TOKEN_FILE`` are used; options given after the command
        win over them."""
        token = Path(self.mktemp())
        token.write_text("tok\n")
        recorder = self.use(STATUS)
        env = {"MGPU_URL": "http://127.0.0.2:1234", "MGPU_TOKEN_FILE": str(token)}
        run_cli(["status"], env)
        run_cli(["status", "--url", "http://[::1]:99"], env)
        self.assertEqual(
            [c[2:] for c in recorder.calls],
            [("tok", "http://127.0.0.2:1234"), ("tok", "http://[::1]:99")],
        )

    def stream(self, *items: bytes | BaseException) -> list[str]:
        paths = []

        def fake(client: Client, path: str) -> Iterator[bytes]:
            paths.append(path)
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                yield item

        self.patch(Client, "stream", fake)
        return paths

    def test_events(self) -> None:
        """``events --history N`` asks for N kept events and prints each as it completes."""
        doc = event("unload", consumer="mvoice", reason="admin")
        data = json.dumps(doc).encode()
        paths = self.stream(
            b"retry: 2000\n\n: hi\n\nid: 7\nevent: unload\nda", b"ta: " + data + b"\n\n"
        )
        result = run_cli(["events", "--history", "10"])
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertEqual(result.out, render_event(doc, UTC) + "\n")
        self.assertEqual(paths, ["/v1/events?history=10"])

    def test_events_json(self) -> None:
        """``events --json`` prints each event's JSON; no history asked by default."""
        doc = event("load", consumer="mvoice", reason="admin", took_s=1.0)
        paths = self.stream(b"event: load\ndata: " + json.dumps(doc).encode() + b"\n\n")
        result = run_cli(["events", "--json"])
        self.assertEqual([json.loads(line) for line in result.out.splitlines()], [doc])
        self.assertEqual(paths, ["/v1/events"])

    def test_events_interrupted(self) -> None:
        """Ctrl-C while following exits 0 with nothing on stderr."""
        self.stream(b"data: {}\n\n", KeyboardInterrupt())
        result = run_cli(["events"])
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertEqual(len(result.out.splitlines()), 1)

    def test_events_lost(self) -> None:
        """A stream that breaks off exits 3 and says so."""
        self.stream(StreamLost("http://127.0.0.1:8770", "the connection closed"))
        result = run_cli(["events"])
        self.assertEqual(result.code, 3)
        self.assertEqual(
            result.err,
            "error: lost the event stream of http://127.0.0.1:8770: the connection closed\n",
        )


def config_doc(**consumer_fields: object) -> dict[str, Any]:
    block = {
        "url": "http://127.0.0.1:9000",
        "paths": {"tts": {"method": "POST", "path": "/tts"}},
        "vram_resident_mib": 100,
        "load": {"method": "POST", "path": "/load"},
        "unload": {"method": "POST", "path": "/unload"},
        **consumer_fields,
    }
    return {
        "consumers": {"x": block, "y": {**block, "vram_managed": True, "priority": 4}},
        "routing": {"tts": "x"},
    }


class CheckConfigTests(SynchronousTestCase):
    """``check-config PATH``: the daemon's own checks, with its messages."""

    def write(self, doc: object) -> str:
        path = Path(self.mktemp())
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        return str(path)

    def test_valid(self) -> None:
        """A valid file exits 0 with its consumers and routing."""
        path = self.write(config_doc())
        result = run_cli(["check-config", path])
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertEqual(
            result.out.splitlines(),
            [
                f"{path}: valid, 2 consumers",
                "  CONSUMER  RESIDENT  PRIORITY  ROUTES",
                "  x         100 MiB   2         load unload",
                "  y         100 MiB   4         load unload vram_managed",
                "routing: tts -> x",
                "listen: tcp:8770:interface=127.0.0.1; auth: none; gpu: auto",
            ],
        )

    def test_bad_field(self) -> None:
        """A bad field exits 1 with the file, the field path and the reason, on stderr."""
        path = self.write(config_doc(url="ftp://somewhere"))
        result = run_cli(["check-config", path])
        self.assertEqual((result.code, result.out), (1, ""))
        self.assertRegex(result.err, rf"^error: {path}: consumers\.x\.url: .+\n$")

    def test_missing_file(self) -> None:
        """A file that cannot be read exits 1 and says why."""
        path = self.mktemp()
        result = run_cli(["check-config", path])
        self.assertEqual(result.code, 1)
        self.assertEqual(
            result.err, f"error: {path}: cannot read the file: No such file or directory\n"
        )

    def test_token_file(self) -> None:
        """``auth.token_file`` must be readable, as at start; its token is never printed."""
        token = Path(self.mktemp())
        doc = {**config_doc(), "auth": {"token_file": str(token)}}
        path = self.write(doc)
        result = run_cli(["check-config", path])
        self.assertEqual(result.code, 1)
        self.assertIn(f"{path}: auth.token_file: cannot read {token}", result.err)
        token.write_text("hunter2-token\n")
        result = run_cli(["check-config", path])
        self.assertEqual(result.code, 0)
        self.assertIn(f"auth: token from {token}", result.out)
        self.assertNotIn("hunter2", result.out + result.err)

    def test_bad_listen(self) -> None:
        """A ``listen`` that is no endpoint is refused, as the daemon refuses it."""
        path = self.write({**config_doc(), "listen": "tcp:notaport"})
        result = run_cli(["check-config", path])
        self.assertEqual(result.code, 1)
        self.assertIn(f"{path}: listen: not a usable endpoint 'tcp:notaport'", result.err)


class UsageTests(SynchronousTestCase):
    """Argument errors exit 2 with a message; options go before or after the command."""

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)  # argparse writes there itself
        self.patch(Client, "call", lambda *a: self.fail("no call expected"))

    def check_usage(self, argv: list[str], message: str) -> None:
        result = run_cli(argv)
        self.assertEqual(result.code, 2, argv)
        self.assertIn(message, self.stderr.getvalue() + result.err)

    def test_no_command(self) -> None:
        """No command: exit 2."""
        self.check_usage([], "required: COMMAND")

    def test_unknown_command(self) -> None:
        """An unknown command: exit 2."""
        self.check_usage(["stauts"], "invalid choice: 'stauts'")

    def test_missing_name(self) -> None:
        """``load`` with no NAME: exit 2."""
        self.check_usage(["load"], "required: NAME")

    def test_bad_numbers(self) -> None:
        """A timeout that is not positive, a history that is not a count: exit 2."""
        self.check_usage(["--timeout", "0", "status"], "not a positive number of seconds")
        self.check_usage(["status", "--timeout", "nan"], "not a positive number of seconds")
        self.check_usage(["events", "--history", "-3"], "not a whole number")

    def test_bad_url(self) -> None:
        """A URL that is not http(s) to a host: exit 2, naming where it came from."""
        self.check_usage(["--url", "ftp://host", "status"], "error: --url 'ftp://host'")
        self.check_usage(["--url", "http://host:99999", "status"], "not a valid port")
        result = run_cli(["status"], {"MGPU_URL": "127.0.0.1:8790"})
        self.assertEqual(result.code, 2)
        self.assertIn("error: MGPU_URL '127.0.0.1:8790'", result.err)
        self.assertIn("http://127.0.0.1:8770", result.err)  # an example of the form

    def test_options_before_or_after_the_command(self) -> None:
        """A global option given before the command is kept when the command's own
        copy is not given."""
        parser = build_parser({})
        args = parser.parse_args(["--url", "http://a:1", "--timeout", "5", "status"])
        self.assertEqual((args.url, args.timeout, args.token_file), ("http://a:1", 5.0, None))
        args = parser.parse_args(["status", "--url", "http://b:2"])
        self.assertEqual((args.url, args.timeout), ("http://b:2", cli.DEFAULT_TIMEOUT_S))
        self.assertEqual(build_parser({}).parse_args(["status"]).url, "http://127.0.0.1:8770")

    def test_url_parts(self) -> None:
        """A URL keeps its host, port and path prefix; the port defaults by scheme."""
        self.assertEqual(parse_url("http://h/mgpu/").url, "http://h:80/mgpu")
        self.assertEqual(parse_url("https://h").port, 443)
