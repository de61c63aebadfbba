# -*- test-case-name: tests.test_cli -*-
"""``mgpu``: the daemon's command line client.

``status``, ``load``, ``unload``, ``reload`` and ``events`` talk to a running
daemon over HTTP; ``check-config`` checks a configuration file the way the
daemon does, with no network. It is a plain synchronous program (stdlib HTTP,
no reactor). The rendering functions are pure, document in and lines out.

Exit codes: 0 done; 1 the daemon answered with an error, or the file is
invalid; 2 a usage error; 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, Final, TextIO, cast
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from mgpu.config import Config

DEFAULT_URL: Final = "http://127.0.0.1:8770"
#: Long enough for a load that waits for the GPU lease and then loads a model.
DEFAULT_TIMEOUT_S: Final = 600.0

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3


class UsageError(Exception):
    """The command line cannot be acted on (exit 2)."""


class DaemonError(Exception):
    """The daemon answered with an error (exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer from the daemon (exit 3)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url = url
        self.reason = reason


# -- talking to the daemon -------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the daemon listens: ``http(s)://host:port`` and an optional path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def parse_url(text: str, source: str = "--url") -> Target:
    """The daemon's URL, checked; a usage error naming ``source`` (``--url`` or
    ``MGPU_URL``) if it is not an ``http(s)`` URL of a host."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"{source} {text!r}: not an http:// or https:// URL of a host (such as {DEFAULT_URL})"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(f"{source} {text!r}: give only the scheme, host, port and a path prefix")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"{source} {text!r}: not a valid port") from None
    return Target(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def read_token_file(path: str) -> str:
    """The bearer token held in ``path``; a usage error if it cannot be used."""
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise UsageError(f"--token-file {path}: cannot read it: {e.strerror or e}") from None
    if not token or any(c <= 0x20 or c >= 0x7F for c in token):
        raise UsageError(f"--token-file {path}: must hold one token of printable ASCII")
    return token.decode("ascii")


def request_headers(token: str | None) -> dict[str, str]:
    """The headers of every call: the bearer token when there is one."""
    headers = {"Accept": "application/json", "User-Agent": "mgpu"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def describe(error: BaseException, timeout: float) -> str:
    """Why a connection gave no answer, in a few words."""
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host: {error.strerror}"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the connection closed without an answer"
    if isinstance(error, http.client.IncompleteRead):
        return "the connection closed in the middle of the answer"
    if isinstance(error, http.client.HTTPException):
        return f"not an HTTP answer ({type(error).__name__})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def answer_of(status: int, body: bytes) -> Any:
    """The JSON answer of a 2xx; otherwise raise the daemon's error as ``DaemonError``."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if 200 <= status < 300:
        if doc is None:
            raise DaemonError("bad_answer", f"HTTP {status} with a body that is not JSON")
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        raise DaemonError(doc["error"], str(doc.get("message", "")))
    text = body[:200].decode("utf-8", "replace").strip() or "(no body)"
    raise DaemonError(f"http_{status}", " ".join(text.split()))


@dataclass
class Client:
    """Blocking HTTP calls to one daemon."""

    target: Target
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S

    def _connection(self) -> http.client.HTTPConnection:
        if self.target.scheme == "https":
            return http.client.HTTPSConnection(
                self.target.host, self.target.port, timeout=self.timeout
            )
        return http.client.HTTPConnection(self.target.host, self.target.port, timeout=self.timeout)

    def _send(
        self, method: str, path: str, extra: Mapping[str, str] | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connection()
        headers = {**request_headers(self.token), **(extra or {})}
        try:
            conn.request(method, self.target.prefix + path, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise Unreachable(self.target.url, describe(e, self.timeout)) from None

    def call(self, method: str, path: str) -> Any:
        """One request; the JSON answer, or ``DaemonError`` / ``Unreachable``."""
        conn, response = self._send(method, path)
        try:
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(self.target.url, describe(e, self.timeout)) from None
        finally:
            conn.close()
        return answer_of(response.status, body)

    def stream(self, path: str) -> Iterator[bytes]:
        """A ``text/event-stream``'s bytes as they arrive; no timeout once it has begun."""
        conn, response = self._send("GET", path, {"Accept": "text/event-stream"})
        content_type = response.getheader("content-type", "")
        if response.status != 200 or not content_type.startswith("text/event-stream"):
            try:
                answer_of(response.status, response.read())
            except (OSError, http.client.HTTPException) as e:
                raise Unreachable(self.target.url, describe(e, self.timeout)) from None
            finally:
                conn.close()
            raise DaemonError("bad_answer", f"{path} is not an event stream ({content_type})")
        if conn.sock is not None:
            conn.sock.settimeout(None)  # a quiet stream is not a dead one
        return self._chunks(conn, response)

    def _chunks(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> Iterator[bytes]:
        try:
            while True:
                try:
                    chunk = response.read1(65536)
                except (OSError, http.client.HTTPException) as e:
                    raise StreamLost(self.target.url, describe(e, self.timeout)) from None
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()


class StreamLost(Unreachable):
    """The event stream broke off (exit 3)."""


# -- Server-Sent Events ----------------------------------------------------

_EOL: Final = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class SseMessage:
    """One dispatched event of an event stream."""

    event: str
    data: str
    id: str | None = None


@dataclass
class SseParser:
    """The event-stream format (WHATWG HTML 9.2), fed bytes in chunks of any size.

    Lines end with CRLF, LF or CR; a line starting with ``:`` is a comment;
    ``data:`` lines are joined with newlines; a blank line dispatches the
    event, unless it has no data. ``retry`` is kept in ``retry_ms``.
    """

    retry_ms: int | None = None
    last_id: str | None = None
    _buffer: bytes = b""
    _skip_lf: bool = False
    _first: bool = True
    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> list[SseMessage]:
        """The events that ``chunk`` completes."""
        messages = []
        for line in self._lines(chunk):
            message = self._line(line)
            if message is not None:
                messages.append(message)
        return messages

    def _lines(self, chunk: bytes) -> list[str]:
        if not chunk:
            return []
        data = self._buffer + chunk
        if self._skip_lf:
            # The last chunk ended with CR: an LF now is the rest of that CRLF.
            data = data.removeprefix(b"\n")
        lines, start = [], 0
        for eol in _EOL.finditer(data):
            lines.append(data[start : eol.start()].decode("utf-8", "replace"))
            start = eol.end()
        self._buffer = data[start:]
        self._skip_lf = data.endswith(b"\r")  # perhaps the first half of a CRLF
        if lines and self._first:
            lines[0] = lines[0].removeprefix("\ufeff")
            self._first = False
        return lines

    def _line(self, line: str) -> SseMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SseMessage | None:
        data, self._data = self._data, []
        event, self._event = self._event, ""
        if not data:
            return None
        return SseMessage(event or "message", "\n".join(data), self.last_id)


# -- rendering (pure) ------------------------------------------------------


def parse_time(text: object) -> datetime | None:
    """An ISO 8601 timestamp of the daemon (``...Z``), or None."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def duration(seconds: float) -> str:
    """``42s``, ``3m 5s``, ``2h 10m``, ``4d 3h``."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def ago(text: object, now: datetime) -> str:
    """A status timestamp as time before ``now``: ``never`` for null."""
    if text is None:
        return "never"
    when = parse_time(text)
    if when is None:
        return str(text)
    seconds = (now - when).total_seconds()
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"


def _num(value: object) -> str:
    """A number as shown: ``?`` for null, floats without trailing zeros."""
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _yes_no(value: object) -> str:
    """``yes``, ``no``, or ``?`` for null (not known yet)."""
    return "yes" if value is True else "no" if value is False else "?"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render_gpu(gpu: Mapping[str, Any], now: datetime) -> str:
    """The GPU line of ``mgpu status``."""
    name = gpu.get("name") or "unknown GPU"
    memory = (
        f"{_num(gpu.get('used_mib'))} / {_num(gpu.get('total_mib'))} MiB used, "
        f"{_num(gpu.get('free_mib'))} MiB free"
    )
    where = f"GPU {_num(gpu.get('index'))}: {name} via {gpu.get('source') or '?'}"
    if gpu.get("source") == "none" and not gpu.get("ok"):
        # Chosen, not broken: the scheduler accounts for gpu.total_mib itself.
        index = _num(gpu.get("index"))
        return f"GPU {index}: not read (gpu.source: none), the broker's own accounting"
    state = "ok" if gpu.get("ok") else f"error: {gpu.get('error') or 'no reading'}"
    read = "" if gpu.get("read_at") is None else f" (read {ago(gpu['read_at'], now)})"
    return f"{where}, {memory}, {state}{read}"


def render_consumers(consumers: Mapping[str, Mapping[str, Any]], now: datetime) -> list[str]:
    """One row per consumer; an unhealthy one's last error on the line below."""
    if not consumers:
        return ["(no consumers)"]
    header = ("CONSUMER", "HEALTHY", "LOADED", "RESIDENT", "IN FLIGHT", "QUEUED", "LAST USED")
    rows = [
        (
            name,
            _yes_no(c.get("healthy")),
            _yes_no(c.get("loaded")),
            f"{_num(c.get('vram_resident_mib'))} MiB",
            _num(c.get("in_flight")),
            _num(c.get("queued")),
            ago(c.get("last_used"), now),
        )
        for name, c in consumers.items()
    ]
    head, *lines = table(header, rows)
    out = [head]
    for line, c in zip(lines, consumers.values(), strict=True):
        out.append(line)
        if c.get("healthy") is not True and c.get("last_error"):
            out.append(f"    last error: {c['last_error']}")
    return out


def render_scheduler(scheduler: Mapping[str, Any]) -> str:
    """The scheduler line of ``mgpu status``."""
    counters = ("queued", "running", "completed", "failed", "rejected", "evictions", "loads")
    parts = [f"holder {scheduler.get('holder') or 'none'}"]
    parts += [f"{key} {_num(scheduler.get(key))}" for key in counters]
    return "scheduler: " + ", ".join(parts)


def render_cards(doc: Mapping[str, Any], now: datetime) -> list[str]:
    """The GPU line; with several cards (SPEC 9.5), one per card with its lease."""
    cards = doc.get("gpus") or []
    if len(cards) < 2:
        return [render_gpu(doc.get("gpu") or {}, now)]
    return [
        f"{render_gpu(card, now)}; lease {card.get('holder') or 'free'}, "
        f"{_num(card.get('queued'))} queued, on it: {', '.join(card.get('consumers') or [])}"
        for card in cards
    ]


def render_status(doc: Mapping[str, Any], now: datetime) -> list[str]:
    """``mgpu status``: the GPU line(s), the consumer table, the scheduler line."""
    return [
        *render_cards(doc, now),
        "",
        *render_consumers(doc.get("consumers") or {}, now),
        "",
        render_scheduler(doc.get("scheduler") or {}),
    ]


def event_time(text: object, tz: tzinfo | None) -> str:
    """An event's ``at`` in ``tz`` (None: local time), to the millisecond."""
    when = parse_time(text)
    if when is None:
        return str(text) if text is not None else "?"
    when = when.astimezone(tz)
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}"


def _load(e: Mapping[str, Any]) -> str:
    return f"{e.get('consumer')} loaded in {_num(e.get('took_s'))} s ({e.get('reason')})"


def _unload(e: Mapping[str, Any]) -> str:
    return f"{e.get('consumer')} unloaded ({e.get('reason')})"


def _evict(e: Mapping[str, Any]) -> str:
    age = e.get("age_s")
    resident = "" if not isinstance(age, int | float) else f", resident {duration(age)}"
    return (
        f"{e.get('consumer')} evicted for {e.get('target')}: freed {_num(e.get('freed_mib'))} MiB"
        f" {_took(e.get('free_s'))}{resident} ({e.get('reason')})"
    )


def _took(seconds: object) -> str:
    """``in 1.2 s``, ``in 40 ms``, or ``at once`` (the memory showed free at the first look)."""
    if not isinstance(seconds, int | float):
        return "in ? s"
    if seconds < 0.001:
        return "at once"
    return f"in {seconds * 1000:.0f} ms" if seconds < 1 else f"in {seconds:.1f} s"


def _health(e: Mapping[str, Any]) -> str:
    healthy = e.get("healthy")
    if healthy is True:
        return f"{e.get('consumer')} healthy"
    state = "unhealthy" if healthy is False else "health unknown"
    error = e.get("error")
    return f"{e.get('consumer')} {state}" + (f": {error}" if error else "")


def _rejected(e: Mapping[str, Any]) -> str:
    consumer = e.get("consumer")
    whose = f"a request for {consumer}" if consumer else "a request"
    return f"{whose} rejected: {e.get('reason')}"


def _timeout(e: Mapping[str, Any]) -> str:
    return f"{e.get('consumer')} timed out after {_num(e.get('after_s'))} s ({e.get('reason')})"


_SUMMARIES: Final[Mapping[str, Callable[[Mapping[str, Any]], str]]] = {
    "load": _load,
    "unload": _unload,
    "evict": _evict,
    "health": _health,
    "rejected": _rejected,
    "timeout": _timeout,
}


def _fields(e: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in e.items() if k not in ("id", "kind", "at"))


def render_event(event: Mapping[str, Any], tz: tzinfo | None = None) -> str:
    """One line of ``mgpu events``: time, kind and what happened."""
    kind = str(event.get("kind") or "?")
    summary = _SUMMARIES.get(kind, _fields)(event)
    return f"{event_time(event.get('at'), tz)}  {kind:<8}  {summary}"


def render_message(message: SseMessage, as_json: bool, tz: tzinfo | None = None) -> str:
    """One event of the stream as ``mgpu events`` prints it."""
    try:
        doc = json.loads(message.data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {"id": message.id, "kind": message.event, "data": message.data}
    doc.setdefault("kind", message.event)
    if as_json:
        return json.dumps(doc, separators=(",", ":"))
    return render_event(doc, tz)


def render_action(answer: Mapping[str, Any], elapsed_s: float) -> str:
    """``mgpu load|unload``: the consumer's state and how long the call took."""
    state = "loaded" if answer.get("loaded") else "unloaded"
    return f"{answer.get('consumer')}: {state} ({elapsed_s:.1f} s)"


def _names(value: object) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) and value else "none"


def render_reload(answer: Mapping[str, Any]) -> list[str]:
    """``mgpu reload``: what changed, and what waits for a restart."""
    lines = [
        f"reloaded: added {_names(answer.get('added'))}; removed {_names(answer.get('removed'))}; "
        f"state restarted for {_names(answer.get('restarted_state'))}"
    ]
    if answer.get("needs_restart"):
        lines.append(f"needs a restart to apply: {_names(answer['needs_restart'])}")
    return lines


def render_config(config: Config, path: str) -> list[str]:
    """``mgpu check-config``: a valid file's consumers and routing."""
    rows = []
    for name, c in config.consumers.items():
        routes = [r for r in ("load", "unload") if getattr(c, r) is not None]
        routes += ["vram_managed"] if c.vram_managed else []
        rows.append((name, f"{c.vram_resident_mib} MiB", str(c.priority), " ".join(routes) or "-"))
    routing = ", ".join(f"{kind} -> {name}" for kind, name in config.routing.items()) or "none"
    audio = f"; audio -> {config.audio_proxy}" if config.audio_proxy else ""
    auth = f"token from {config.auth.token_file}" if config.auth.token_file else "none"
    return [
        f"{path}: valid, {len(config.consumers)} consumers",
        *("  " + line for line in table(("CONSUMER", "RESIDENT", "PRIORITY", "ROUTES"), rows)),
        f"routing: {routing}{audio}",
        f"listen: {config.listen}; auth: {auth}; gpu: {config.gpu.source}",
    ]


# -- the commands ------------------------------------------------------------


def check_config(path: str) -> Config:
    """What the daemon checks before it starts; raises ``ConfigError``."""
    from mgpu.config import ConfigError, load_config, read_token

    config = load_config(path)
    read_token(config.auth.token_file, path)
    if not config.listen.startswith("systemd:"):  # only checkable under systemd
        from twisted.internet.endpoints import serverFromString

        try:
            serverFromString(cast(Any, None), config.listen)  # parsed, not listened on
        except Exception as e:
            why = f"not a usable endpoint {config.listen!r}: {e}"
            raise ConfigError(path, "listen", why) from None
    return config


@dataclass
class Io:
    """Where a command writes, and its clock."""

    out: TextIO
    err: TextIO
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    tz: tzinfo | None = None

    def print(self, *lines: str) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()


def _client(args: argparse.Namespace) -> Client:
    """The client the global options describe (the token is read here, before any call)."""
    token = None if args.token_file is None else read_token_file(args.token_file)
    from_env = args.url_from_env is not None and args.url == args.url_from_env
    return Client(parse_url(args.url, "MGPU_URL" if from_env else "--url"), token, args.timeout)


def _dump(doc: object) -> str:
    return json.dumps(doc, indent=2)


def cmd_status(args: argparse.Namespace, io: Io) -> int:
    """``mgpu status [--json]``."""
    doc = _client(args).call("GET", "/v1/status")
    io.print(_dump(doc) if args.json else "\n".join(render_status(doc, io.now())))
    return EXIT_OK


def cmd_action(args: argparse.Namespace, io: Io) -> int:
    """``mgpu load NAME`` and ``mgpu unload NAME``: they wait for the GPU lease."""
    client = _client(args)
    started = time.monotonic()
    answer = client.call("POST", f"/v1/admin/consumers/{quote(args.name, safe='')}/{args.command}")
    io.print(_dump(answer) if args.json else render_action(answer, time.monotonic() - started))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace, io: Io) -> int:
    """``mgpu reload``: the daemon re-reads its file, or keeps the old one and says why."""
    answer = _client(args).call("POST", "/v1/admin/reload")
    io.print(_dump(answer) if args.json else "\n".join(render_reload(answer)))
    return EXIT_OK


def cmd_events(args: argparse.Namespace, io: Io) -> int:
    """``mgpu events``: one line per event, flushed, until Ctrl-C or the stream's end."""
    client = _client(args)
    path = "/v1/events" + (f"?history={args.history}" if args.history else "")
    parser = SseParser()
    try:
        for chunk in client.stream(path):
            for message in parser.feed(chunk):
                io.print(render_message(message, args.json, io.tz))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace, io: Io) -> int:
    """``mgpu check-config PATH``: no network; exit 1 with the daemon's message if bad."""
    from mgpu.config import ConfigError

    try:
        config = check_config(args.path)
    except ConfigError as e:
        io.err.write(f"error: {e}\n")
        return EXIT_ERROR
    io.print(*render_config(config, args.path))
    return EXIT_OK


COMMANDS: Final[Mapping[str, Callable[[argparse.Namespace, Io], int]]] = {
    "status": cmd_status,
    "load": cmd_action,
    "unload": cmd_action,
    "reload": cmd_reload,
    "events": cmd_events,
    "check-config": cmd_check_config,
}


# -- the command line --------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return int(text)


def _add_globals(parser: argparse.ArgumentParser, environ: Mapping[str, str], top: bool) -> None:
    """``--url``, ``--token-file``, ``--timeout``: before or after the command.

    A command's own copy defaults to "not given", so it never hides the value
    given before the command.
    """

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        default=default(environ.get("MGPU_URL") or DEFAULT_URL),
        help=f"the daemon (default: $MGPU_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=default(environ.get("MGPU_TOKEN_FILE") or None),
        help="a file holding the bearer token (default: $MGPU_TOKEN_FILE)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT_S),
        help=f"for each call but events (default: {DEFAULT_TIMEOUT_S:g})",
    )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The ``mgpu`` command line."""
    parser = argparse.ArgumentParser(
        prog="mgpu", description="Command line client of the mgpumanager daemon."
    )
    _add_globals(parser, environ, top=True)
    # To name MGPU_URL, not --url, when the environment's URL is the one refused.
    parser.set_defaults(url_from_env=environ.get("MGPU_URL") or None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, json_help: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        _add_globals(sub, environ, top=False)
        if json_help is not None:
            sub.add_argument("--json", action="store_true", help=json_help)
        return sub

    command("status", "GPU memory, consumers and the scheduler.", "print the status document")
    for action in ("load", "unload"):
        sub = command(action, f"{action.capitalize()} a consumer now.", "print the answer")
        sub.add_argument("name", metavar="NAME", help="the consumer")
    command("reload", "Re-read the daemon's configuration file.", "print the answer")
    events = command("events", "Follow the daemon's events.", "print each event's JSON")
    events.add_argument(
        "--history", type=_count, default=0, metavar="N", help="start with the last N events"
    )
    check = command("check-config", "Check a configuration file (no network).")
    check.add_argument("path", metavar="PATH", help="the YAML file")
    return parser


def run(argv: Sequence[str], environ: Mapping[str, str], io: Io) -> int:
    """Parse ``argv`` and run the command; the exit status."""
    try:
        args = build_parser(environ).parse_args(list(argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return COMMANDS[args.command](args, io)
    except UsageError as e:
        io.err.write(f"error: {e}\n")
        return EXIT_USAGE
    except DaemonError as e:
        hint = " (give the token with --token-file PATH or MGPU_TOKEN_FILE)"
        io.err.write(f"error: {e.code}: {e.message}{hint if e.code == 'unauthorized' else ''}\n")
        return EXIT_ERROR
    except StreamLost as e:
        io.err.write(f"error: lost the event stream of {e.url}: {e.reason}\n")
        return EXIT_UNREACHABLE
    except Unreachable as e:
        io.err.write(
            f"error: cannot reach {e.url}: {e.reason} (is the daemon running there? "
            "--url or MGPU_URL names another address)\n"
        )
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """The ``mgpu`` console script."""
    try:
        return run(sys.argv[1:] if argv is None else argv, os.environ, Io(sys.stdout, sys.stderr))
    except BrokenPipeError:  # ``mgpu events | head``: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
