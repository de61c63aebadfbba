"""Hostile configuration files (SPEC 9.7): refused on one line, quickly, never another error.

YAML alias bombs, deep nesting, huge integers, URLs with credentials or a bare
``?``, control characters in paths: each is a ``ConfigError`` naming the file
and the field, raised before it costs time or memory. A reload of such a file
(``POST /v1/admin/reload``, SIGHUP) answers ``400`` and keeps the running
configuration. A hypothesis property feeds the loader generated documents;
``MGPU_FUZZ_EXAMPLES`` raises its example count (``make fuzz``).
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mgpu.admin import Admin
from mgpu.api import BrokerResource, Operations
from mgpu.config import (
    MAX_DEPTH,
    MAX_NODES,
    Config,
    ConfigError,
    Route,
    load_config,
    parse_config,
    read_token,
)
from mgpu.events import EventBus
from mgpu.metrics import BrokerMetrics
from mgpu.sse import EventStreams
from mgpu.status import StatusView
from tests.fuzz import examples
from tests.test_api import ERROR_KEYS, Client, FakeAdmin, FakeMetrics
from tests.test_reload import ReloadCase

T = TypeVar("T")

#: Whatever the file, loading it takes less than this (a bomb used to take a minute or
#: more); generous, so that a loaded machine never fails a file that is refused at once.
QUICK_S = 10.0

#: ``make test`` runs this many generated documents; ``make fuzz`` sets thousands.
FUZZ_EXAMPLES = examples(200)

#: The one-consumer file the tests vary: ``{extra}`` holds more keys of consumer ``a``.
TEMPLATE = """\
gpu: {{source: none, total_mib: 8000}}
routing: {{tts: a}}
consumers:
  a:
    url: {url}
    paths: {{tts: {{path: {path}}}}}
    vram_resident_mib: {vram}
{extra}"""


def config_text(
    url: str = '"http://127.0.0.1:9"', path: str = "/t", vram: str = "1", extra: str = ""
) -> str:
    """A one-consumer file, ``extra`` being more keys of consumer ``a`` (indented by 4)."""
    return TEMPLATE.format(url=url, path=path, vram=vram, extra=extra)


def body(lines: str) -> str:
    """``extra`` for an ``unload`` route whose body holds ``lines`` (indented by 8)."""
    return "    unload:\n      path: /u\n      body:\n" + textwrap.indent(lines, " " * 8)


def laughs(levels: int, width: int = 9, name: str = "l") -> str:
    """Body lines of a billion-laughs bomb: each level lists the one below ``width`` times."""
    lines = [f"{name}0: &{name}0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels + 1):
        below = ", ".join([f"*{name}{level - 1}"] * width)
        lines.append(f"{name}{level}: &{name}{level} [{below}]")
    return "\n".join(lines) + "\n"


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


class _TookTooLong(Exception):
    """Raised in the test by an alarm: the code under test did not finish in time."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block (by SIGALRM) if it runs longer than ``seconds``."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise _TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class HostileCase(SynchronousTestCase):
    """Writes a file, loads it within ``QUICK_S``, and checks how it is refused."""

    def write(self, text: str | bytes) -> str:
        path = self.mktemp()
        Path(path).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def load(self, text: str | bytes) -> Config:
        path = self.write(text)
        return self.quickly(lambda: load_config(path))

    def quickly(self, f: Callable[[], T]) -> T:
        """``f()``, failing the test if it takes ``QUICK_S`` or more."""
        started = time.monotonic()
        try:
            with deadline(QUICK_S):
                return f()
        except _TookTooLong as e:
            self.fail(str(e))
        finally:
            self.assertLess(time.monotonic() - started, QUICK_S)

    def assertRefused(self, text: str | bytes, field: str, *reasons: str) -> ConfigError:
        """Loading ``text`` raises ConfigError on ``field`` with each of ``reasons``, as
        one line 'FILE: field: reason'."""
        path = self.write(text)
        error = self.assertRaises(ConfigError, self.quickly, lambda: load_config(path))
        self.assertEqual((error.source, error.field), (path, field), str(error))
        for reason in reasons:
            self.assertIn(reason, error.reason)
        self.assertEqual(str(error).splitlines(), [str(error)])
        self.assertTrue(str(error).startswith(f"{path}: "), str(error))
        return error


class AliasTests(HostileCase):
    """Nodes are counted with each alias expanded where it is used: past 10,000, refused."""

    def test_billion_laughs_refused_at_once(self) -> None:
        """Nine levels of nine aliases (387 million nodes expanded) in an unload body are
        refused at once (it used to expand for a minute), naming the body field and line
        where the count ran over."""
        started = time.monotonic()
        error = self.assertRefused(
            config_text(extra=body(laughs(9))), "consumers.a.unload.body.l4[0]", "10000", "alias"
        )
        self.assertLess(time.monotonic() - started, QUICK_S)
        self.assertIn("line 15", error.reason)

    def test_small_bomb_refused(self) -> None:
        """Six levels of nine (half a million nodes, cheap enough to expand) are refused too:
        the limit is the count, not the time."""
        self.assertRefused(config_text(extra=body(laughs(6))), "consumers.a.unload.body.l4[0]")

    def test_load_body_bomb_refused(self) -> None:
        """A bomb in a load body is refused the same way, naming load.body."""
        extra = body(laughs(9)).replace("unload:", "load:")
        self.assertRefused(config_text(extra=extra), "consumers.a.load.body.l4[0]", "10000")

    def test_each_use_of_an_alias_counts(self) -> None:
        """An anchor of about 100 nodes used 50 times is accepted; used 120 times, the
        expansion passes 10,000 nodes and is refused, though the file is short."""
        anchor = "big: &big [" + ", ".join(["x"] * 99) + "]\n"
        self.assertEqual(MAX_NODES, 10_000)
        config = self.load(config_text(extra=body(anchor + "uses: [" + "*big, " * 50 + "]\n")))
        unload = config.consumers["a"].unload
        assert isinstance(unload, Route) and unload.body is not None
        self.assertEqual(len(unload.body["uses"]), 50)
        self.assertRefused(
            config_text(extra=body(anchor + "uses: [" + "*big, " * 120 + "]\n")),
            "consumers.a.unload.body.uses[98]",
            "10000",
        )

    def test_merge_key_bomb_refused(self) -> None:
        """Merge keys (<<) doubling a mapping at each of 30 levels are refused."""
        lines = ["m0: &m0 {x: 1}"]
        lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], y{i}: 1}}" for i in range(1, 30)]
        self.assertRefused(
            config_text(extra=body("\n".join(lines) + "\n")),
            "consumers.a.unload.body.m10.<<[0]",
            "10000",
        )

    def test_recursive_sequence_refused(self) -> None:
        """An alias inside its own anchor (&a [*a]) is refused, not a RecursionError."""
        self.assertRefused(
            config_text(extra=body("x: &a [*a]\n")), "consumers.a.unload.body.x[0]", "own anchor"
        )

    def test_recursive_mapping_refused(self) -> None:
        """A mapping that contains itself (&m {self: *m}) is refused."""
        self.assertRefused(
            config_text(extra=body("x: &m {self: *m}\n")),
            "consumers.a.unload.body.x.self",
            "own anchor",
        )

    def test_plain_alias_still_works(self) -> None:
        """An ordinary alias (one route reused) still loads, its value in both places."""
        extra = "    health: &route {method: GET, path: /h}\n    load: *route\n"
        config = self.load(config_text(extra=extra))
        self.assertEqual(config.consumers["a"].load, config.consumers["a"].health)


class NestingTests(HostileCase):
    """Collections nested deeper than 64 levels are refused; no RecursionError anywhere."""

    def depth_text(self, lists: int) -> str:
        # root 1, consumers 2, a 3, unload 4, body 5: x's lists begin at level 6.
        return config_text(extra=body(f"x: {nested_lists(lists)}\n"))

    def test_limit(self) -> None:
        """A body that brings the file to 64 levels loads; one more level is refused."""
        self.assertEqual(MAX_DEPTH, 64)
        self.load(self.depth_text(59))
        self.assertRefused(self.depth_text(60), "consumers.a.unload.body.x" + "[0]" * 59, "64")

    def test_very_deep_refused(self) -> None:
        """5,000 nested lists are refused as too deep, not a RecursionError."""
        self.assertRefused(self.depth_text(5000), "consumers.a.unload.body.x" + "[0]" * 59, "64")

    def test_deep_mappings_refused(self) -> None:
        """Deep flow mappings and deep block mappings are refused alike."""
        flow = "x: " + "{k: " * 3000 + "1" + "}" * 3000
        self.assertRefused(config_text(extra=body(flow)), "consumers.a.unload.body.x" + ".k" * 59)
        block = "".join(" " * (8 + 2 * i) + f"k{i}:\n" for i in range(200))
        field = "consumers.a.unload.body.x" + "".join(f".k{i}" for i in range(59))
        self.assertRefused(config_text(extra=body("x:\n" + block)), field)

    def test_alias_adds_its_depth(self) -> None:
        """An anchor 40 levels deep used 30 levels down nests 70 deep and is refused,
        though no line of the file is written that deep."""
        text = f"x: &deep {nested_lists(40)}\ny: {'[' * 25}*deep{']' * 25}\n"
        self.assertRefused(config_text(extra=body(text)), "consumers.a.unload.body.y" + "[0]" * 25)

    def test_parse_config_refuses_deep_bodies_built_in_code(self) -> None:
        """parse_config given a body nested 5,000 deep (not from a file) refuses it too."""
        deep: list[Any] = []
        for _ in range(5000):
            deep = [deep]
        doc = yaml_document(extra={"unload": {"path": "/u", "body": {"x": deep}}})
        error = self.assertRaises(ConfigError, parse_config, doc, "code")
        self.assertIn("64", error.reason)


def yaml_document(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parsed form of ``config_text()``, with ``extra`` keys for consumer ``a``."""
    consumer: dict[str, Any] = {"url": "http://127.0.0.1:9", "paths": {"tts": {"path": "/t"}}}
    consumer |= {"vram_resident_mib": 1, **(extra or {})}
    return {"gpu": {"source": "none", "total_mib": 8000}, "consumers": {"a": consumer}}


class IntegerTests(HostileCase):
    """Integers of more than 18 digits are refused before Python converts them."""

    def test_thousands_of_digits_refused(self) -> None:
        """5,000 digits (past Python's own 4,300-digit limit) are a ConfigError naming
        the field, not a ValueError."""
        self.assertRefused(config_text(vram="9" * 5000), "consumers.a.vram_resident_mib", "18")

    def test_limit(self) -> None:
        """18 digits load; 19 digits are refused."""
        loaded = self.load(config_text(vram="9" * 18))
        self.assertEqual(loaded.consumers["a"].vram_resident_mib, 10**18 - 1)
        self.assertRefused(config_text(vram="1" + "0" * 18), "consumers.a.vram_resident_mib", "18")

    def test_other_bases_refused(self) -> None:
        """Hexadecimal, binary and octal integers of more than 18 digits, as written or in
        decimal, are refused; underscores are not digits."""
        for written in ("0x" + "f" * 5000, "0xFFFFFFFFFFFFFFFF", "0b" + "1" * 70, "0" + "7" * 30):
            self.assertRefused(config_text(vram=written), "consumers.a.vram_resident_mib", "18")
        loaded = self.load(config_text(vram="1_000"))
        self.assertEqual(loaded.consumers["a"].vram_resident_mib, 1000)

    def test_in_a_body(self) -> None:
        """A long integer in an unload body is refused, naming its place in the body."""
        self.assertRefused(
            config_text(extra=body("x: [1, " + "9" * 5000 + "]\n")),
            "consumers.a.unload.body.x[1]",
            "18",
        )

    def test_explicit_tag(self) -> None:
        """!!int on a long string is refused the same way."""
        text = config_text(vram='!!int "' + "9" * 5000 + '"')
        self.assertRefused(text, "consumers.a.vram_resident_mib", "18")

    def test_parse_config_refuses_huge_integers_built_in_code(self) -> None:
        """parse_config given integers of 5,000 digits names the field instead of failing
        to print them."""
        huge = 10**5000
        for extra in (
            {"priority": huge},
            {"timeout_s": huge},
            {"unload": {"path": "/u", "body": {"n": -huge}}},
        ):
            error = self.assertRaises(ConfigError, parse_config, yaml_document(extra), "code")
            self.assertIn("18 digits", error.reason)


class ConstructorTests(HostileCase):
    """Values PyYAML cannot build (it raises ValueError, KeyError...) are ConfigErrors."""

    def test_bad_tagged_values(self) -> None:
        """!!int, !!float, !!bool, !!timestamp on values they cannot read, and an impossible
        date, are each refused naming the field."""
        values = ("!!int abc", '!!int ""', "!!float x", "!!bool maybe", "!!timestamp x")
        for value in (*values, "2024-13-45"):
            self.assertRefused(
                config_text(extra=body(f"x: {value}\n")), "consumers.a.unload.body.x"
            )

    def test_control_character_in_the_file(self) -> None:
        """A character YAML does not allow is refused on one line with its line number."""
        error = self.assertRefused(config_text(extra="    priority: 1\x01\n"), "", "line 8")
        self.assertIn("\\x01", str(error))


class UrlTests(HostileCase):
    """A consumer url is scheme, host and port only: no user info, query, fragment or controls."""

    FIELD = "consumers.a.url"

    def test_user_info_refused_without_echoing_it(self) -> None:
        """http://user:secret@host is refused, and the message does not repeat the secret."""
        for url in ("http://user:secret@127.0.0.1:9", "http://secret@h:1", "http://u:p@h:1@x"):
            error = self.assertRefused(config_text(url=url), self.FIELD, "user info")
            self.assertNotIn("secret", str(error))
            self.assertNotIn("u:p", str(error))

    def test_bare_query_or_fragment_refused(self) -> None:
        """A bare '?' or '#' (an empty query or fragment) is refused like a full one."""
        for url in ("http://h:1/?", "http://h:1?", "http://h:1/#", "http://h:1#", "http://h:1?#"):
            self.assertRefused(config_text(url=f'"{url}"'), self.FIELD, "query or fragment")

    def test_control_characters_and_spaces_refused(self) -> None:
        """Tabs, newlines, NUL, DEL, spaces and non-ASCII letters are refused, not dropped
        (urlsplit removes tabs and newlines silently)."""
        urls = ("http://h:1\\t", "http://h:1\\n", "http://h\\0:1", "http://h:1\\x7f")
        for url in (*urls, "http://h :1", "http://h\\u00e9:1"):
            self.assertRefused(config_text(url=f'"{url}"'), self.FIELD, "visible ASCII")

    def test_good_urls_still_load(self) -> None:
        """http and https with a host, a port, a trailing slash still load."""
        for url in ("http://127.0.0.1:9", "https://gpu.example/", "http://[::1]:8080"):
            self.assertEqual(self.load(config_text(url=url)).consumers["a"].url, url.rstrip("/"))


class PathTests(HostileCase):
    """Every consumer path and template is visible ASCII after '/': a control character in
    any of them is refused, naming that field."""

    BAD = ("\\0", "\\x7f", "\\x1b", "\\t", "\\r\\n", "\\x85", "\\u2028", "\\u00e9", " ")

    def places(self, path: str) -> Iterator[tuple[str, str]]:
        """(file text, field) for ``path`` in each place a consumer path goes."""
        q = f'"{path}"'
        yield config_text(path=q), "consumers.a.paths.tts.path"
        for route in ("health", "load", "unload"):
            yield config_text(extra=f"    {route}: {{path: {q}}}\n"), f"consumers.a.{route}.path"
        hold = f"{{path: /p, hold_until: {{path: {q}}}}}"
        yield (
            config_text(extra=f"    paths: {{image: {hold}}}\n")
            .replace("    paths: {tts: {path: /t}}\n", "")
            .replace("routing: {tts: a}", "routing: {image: a}"),
            "consumers.a.paths.image.hold_until.path",
        )

    def test_control_characters_refused_everywhere(self) -> None:
        """NUL, DEL, ESC, tab, CR LF, C1, a line separator, non-ASCII or a space in the
        middle of any path is refused naming that path's field."""
        for bad in self.BAD:
            for text, field in self.places(f"/a{bad}b"):
                self.assertRefused(text, field, "visible ASCII")

    def test_visible_ascii_paths_load(self) -> None:
        """Paths of visible ASCII, percent-encoded bytes and templates included, load."""
        for text, _ in self.places("/a-b_c.d~e%20f/{x}"):
            if "hold_until" not in text:
                text = text.replace("{x}", "x")
            self.load(text)


class FileNameTests(HostileCase):
    """auth.token_file and gpu.nvidia_smi are names of files: no control characters."""

    def test_nul_in_token_file_refused(self) -> None:
        """A NUL in auth.token_file is refused by the loader, and read_token refuses it as a
        ConfigError too (open() would raise ValueError)."""
        self.assertRefused(
            config_text() + 'auth: {token_file: "/etc/tok\\0en"}\n', "auth.token_file", "control"
        )
        error = self.assertRaises(ConfigError, read_token, "/etc/tok\0en", "f.yaml")
        self.assertEqual(error.field, "auth.token_file")
        self.assertEqual(str(error).splitlines(), [str(error)])

    def test_control_character_in_nvidia_smi_refused(self) -> None:
        """A newline in gpu.nvidia_smi is refused."""
        text = config_text().replace("source: none", 'source: none, nvidia_smi: "a\\nb"')
        self.assertRefused(text, "gpu.nvidia_smi", "control")


class OneLineTests(HostileCase):
    """A ConfigError is one line whatever the file holds."""

    def test_control_characters_in_names_escaped(self) -> None:
        """A consumer named with a newline, and a file name with one, give a one-line
        error with the newline escaped."""
        text = config_text().replace("  a:\n", '  "a\\nb":\n').replace("tts: a}", 'tts: "a\\nb"}')
        error = self.assertRefused(
            text.replace("vram_resident_mib: 1", "vram_resident_mib: x"),
            "consumers.a\nb.vram_resident_mib",
        )
        self.assertIn("consumers.a\\nb.vram_resident_mib", str(error))
        self.assertEqual(str(ConfigError("f\n.yaml", "", "x\u2028y")), "f\\n.yaml: x\\u2028y")


#: One hostile file of each kind of SPEC 9.7, with the field its refusal names.
HOSTILE: dict[str, tuple[str, str]] = {
    "billion laughs": (config_text(extra=body(laughs(9))), "consumers.a.unload.body.l4[0]"),
    "recursive alias": (config_text(extra=body("x: &a [*a]\n")), "consumers.a.unload.body.x[0]"),
    "deep nesting": (
        config_text(extra=body(f"x: {nested_lists(5000)}\n")),
        "consumers.a.unload.body.x" + "[0]" * 59,
    ),
    "huge integer": (config_text(vram="9" * 5000), "consumers.a.vram_resident_mib"),
    "user info": (config_text(url="http://u:p@127.0.0.1:9"), "consumers.a.url"),
    "bare query": (config_text(url='"http://127.0.0.1:9/?"'), "consumers.a.url"),
    "NUL in a path": (config_text(path='"/t\\0"'), "consumers.a.paths.tts.path"),
}


class HostileReloadTests(ReloadCase):
    """A reload of a hostile file raises ConfigError quickly and changes nothing; the
    reload route answers it 400 bad_request JSON."""

    def setUp(self) -> None:
        super().setUp()
        b = self.broker
        status = StatusView(self.poller, b.registry, b.scheduler)
        self.api = BrokerResource(b.facade, status)
        streams = EventStreams(EventBus(b.reactor), b.reactor, delay_s=0)
        self.api.serve_operations(
            Operations(
                cast(Admin, FakeAdmin()), self.reloader, streams, cast(BrokerMetrics, FakeMetrics())
            )
        )
        self.logged: list[LogEvent] = []
        observer = cast(ILogObserver, self.logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_reload_refused_quickly(self) -> None:
        """Each hostile file makes reload() raise ConfigError naming its field, within
        QUICK_S (the event loop is not frozen), and changes nothing."""
        for kind, (text, field) in HOSTILE.items():
            self.write(text)
            before = self.snapshot_of_parts()
            started = time.monotonic()
            with deadline(QUICK_S):
                error = self.assertRaises(ConfigError, self.reloader.reload)
            self.assertLess(time.monotonic() - started, QUICK_S, kind)
            self.assertEqual(error.field, field, kind)
            self.assert_unchanged(before)

    def test_reload_route_answers_400_json(self) -> None:
        """POST /v1/admin/reload of each hostile file answers 400 bad_request in the
        broker's JSON schema, naming the field; the running configuration stays."""
        for kind, (text, field) in HOSTILE.items():
            self.write(text)
            before = self.snapshot_of_parts()
            client = Client(self.api)
            with deadline(QUICK_S):
                client.send(b"POST", b"/v1/admin/reload", b"", ())
            status, headers, answer = client.response()
            self.assertEqual(status, 400, f"{kind}: {answer[:200]!r}")
            self.assertEqual(headers[b"content-type"], [b"application/json"], kind)
            document = json.loads(answer)
            self.assertEqual(set(document), ERROR_KEYS)
            self.assertEqual((document["error"], document["retryable"]), ("bad_request", False))
            self.assertIn(f"{field}: ", document["message"], kind)
            self.assert_unchanged(before)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_sighup_reload_logs_one_error(self) -> None:
        """reload_logged (the SIGHUP path) of each hostile file logs one error with the
        reason and no traceback, and changes nothing."""
        for text, field in HOSTILE.values():
            self.write(text)
            before = self.snapshot_of_parts()
            del self.logged[:]
            with deadline(QUICK_S):
                self.reloader.reload_logged()
            errors = [e for e in self.logged if e.get("log_level") == LogLevel.error]
            self.assertEqual(len(errors), 1)
            self.assertIn(f"{field}: ", errors[0]["error"])
            self.assertNotIn("log_failure", errors[0])
            self.assert_unchanged(before)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_good_file_after_a_hostile_one(self) -> None:
        """After a refused bomb, a good file reloads as usual."""
        self.write(HOSTILE["billion laughs"][0])
        with deadline(QUICK_S):
            self.assertRaises(ConfigError, self.reloader.reload)
        self.write(self.changed(lambda data: data["limits"].update(max_body_mib=3)))
        self.reloader.reload()
        self.assertEqual(self.site.max_body_bytes, 3 * 2**20)


# -- generated documents -------------------------------------------------------

#: Characters the generated text favours: controls, separators, YAML's indicators.
_ODD = "\0\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\ufeff &*!|>'\"%@`{}[],:#?-<=~\\é"
_odd_text = st.text(st.sampled_from(_ODD) | st.characters(), max_size=40)


def _quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(text)


_urls = st.one_of(
    st.sampled_from(["http://127.0.0.1:9", "https://h", "http://h:1/", "http://[::1]:8080"]),
    st.builds(
        lambda scheme, user, host, port, tail: f"{scheme}://{user}{host}{port}{tail}",
        st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
        st.sampled_from(["", "u@", "u:p@", "@", ":@"]),
        st.sampled_from(["h", "127.0.0.1", "[::1]", "[::1", "", "h\0", "é"]),
        st.sampled_from(["", ":1", ":0", ":99999", ":x", ":"]),
        st.sampled_from(["", "/", "/?", "#", "/#f", "?q=1", "//", "/p", "\t", "\n"]),
    ),
    _odd_text,
).map(_quoted)

_paths = st.one_of(
    st.builds(lambda text: "/" + text, _odd_text),
    _odd_text,
    st.sampled_from(["/t", "/h/{id}", "/h/{", "/h/{0}"]),
).map(_quoted)

_integers = st.one_of(
    st.integers(-(10**25), 10**25).map(str),
    st.text("0123456789_", min_size=1, max_size=30),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.builds(
        lambda prefix, n: prefix + "f" * n,
        st.sampled_from(["0x", "-0x", "0b", "0o"]),
        st.integers(1, 40),
    ),
    st.sampled_from(["!!int x", "!!float y", "1e999", ".nan", "2024-13-45", "0:0:0:1"]),
)


def _flow(depth: int, leaves: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Flow YAML nested up to ``depth`` levels, with ``leaves`` for scalars."""
    if depth == 0:
        return leaves
    inner = _flow(depth - 1, leaves)
    return st.one_of(
        leaves,
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(st.from_regex(r"[a-z]{1,3}", fullmatch=True), inner), max_size=4).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
        ),
    )


_scalars = st.one_of(_integers, _odd_text.map(_quoted), st.sampled_from(["x", "null", "true"]))


def _mostly(good: str, hostile: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``good`` about half the time, so that more documents reach the later checks."""
    return st.one_of(st.just(good), hostile)


@st.composite
def _bodies(draw: st.DrawFn) -> str:
    """Body lines: values, anchors, aliases (fanned out, nested, recursive), deep nesting."""
    lines = []
    anchors: list[str] = []
    kinds = ["value"] * 4 + ["alias fan"] * 3 + ["laughs", "deep", "recursive", "merge"]
    for i in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(kinds))
        if kind == "alias fan" and anchors:
            used = draw(st.lists(st.sampled_from(anchors), min_size=1, max_size=12))
            value = "[" + ", ".join(f"*{a}" for a in used) + "]"
        elif kind == "laughs":
            lines.append(laughs(draw(st.integers(1, 10)), draw(st.integers(1, 12)), f"b{i}_"))
            continue
        elif kind == "deep":
            depth = draw(st.integers(1, 200))
            opener, closer = draw(st.sampled_from([("[", "]"), ("{k: ", "}")]))
            value = opener * depth + "1" + closer * depth
        elif kind == "recursive":
            value = f"&r{i} [*r{i}]"
        elif kind == "merge" and anchors:
            value = "{<<: [" + ", ".join(f"*{a}" for a in anchors[-3:]) + "], z: 1}"
        else:
            value = draw(_flow(3, _scalars))
        if draw(st.booleans()) and not value.startswith("&"):
            value = f"&a{i} {value}"
            anchors.append(f"a{i}")
        lines.append(f"k{i}: {value}\n")
    return "".join(lines)


@st.composite
def _documents(draw: st.DrawFn) -> str:
    """A file: random text, or the one-consumer file with hostile values in its places."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=300))
    extra = ""
    if draw(st.booleans()):
        route = draw(st.sampled_from(["load", "unload"]))
        lines = draw(_bodies())
        extra = body(lines or "x: 1\n").replace("unload:", f"{route}:")
    if draw(st.booleans()):
        extra += f"    health: {{path: {draw(_mostly('/h', _paths))}}}\n"
    if draw(st.booleans()):
        extra += f"    priority: {draw(_mostly('3', _integers))}\n"
    cards = st.one_of(_flow(2, _scalars), st.lists(_integers, max_size=70).map(", ".join))
    if draw(st.booleans()):  # the cards it runs on (SPEC 9.5): lists, huge, repeated, odd
        extra += f"    gpus: {draw(_mostly('[0, 1]', cards.map(lambda v: f'[{v}]')))}\n"
    text = config_text(
        url=draw(_mostly("http://127.0.0.1:9", _urls)),
        path=draw(_mostly("/t", _paths)),
        vram=draw(_mostly("1", _integers)),
        extra=extra,
    )
    if draw(st.booleans()):  # the cards managed
        devices = draw(_mostly("[0, 1]", cards.map(lambda v: f"[{v}]")))
        text = text.replace("total_mib: 8000}", f"total_mib: 8000, devices: {devices}}}", 1)
    if draw(st.integers(0, 4)) == 0:  # cut or splice the file somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_odd_text) + text[at + draw(st.integers(0, 5)) :]
    return text


class GeneratedDocumentTests(HostileCase):
    """Property: whatever the file, loading it succeeds or raises a one-line ConfigError,
    within QUICK_S; no other exception escapes."""

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_documents())
    def test_loads_or_refuses_on_one_line(self, text: str) -> None:
        """load_config of a generated document returns a Config or raises ConfigError whose
        str() is one line naming the file, in less than QUICK_S."""
        path = self.path()
        Path(path).write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            config = self.quickly(lambda: load_config(path))
        except ConfigError as e:
            message = str(e)
            self.assertEqual(message.splitlines(), [message])
            self.assertTrue(message.startswith(f"{path}: "), message)
        else:
            self.assertIsInstance(config, Config)

    def path(self) -> str:
        """One file for all examples (mktemp per example would make thousands of folders)."""
        if not hasattr(self, "_path"):
            self._path = self.mktemp()
        return self._path
