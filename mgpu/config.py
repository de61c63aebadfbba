# -*- test-case-name: tests.test_config -*-
"""The configuration file: attrs models, and a loader that checks every rule.

A bad file must stop the daemon before it listens, so every problem is a
``ConfigError`` naming the file, the dotted field path and what is wrong.
"""

from __future__ import annotations

import fnmatch
import math
import re
import string
from collections.abc import Hashable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import yaml
from attrs import field, frozen

KINDS: Final = ("tts", "stt", "llm", "image")
GPU_SOURCES: Final = ("auto", "nvml", "nvidia-smi", "none")
POLICIES: Final = ("affinity", "fifo")
FOOTPRINTS: Final = ("max", "configured")
EVICTIONS: Final = ("lru", "cost")
HTTP_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_LISTEN: Final = "tcp:8770:interface=127.0.0.1"
#: First path segments that are the broker's own routes: no native prefix may start so.
RESERVED_SEGMENTS: Final = ("v1", "audio", "healthz", "metrics")

#: What a file may hold (SPEC 9.7). Past these the loader refuses it before
#: building anything: nodes are counted with each alias expanded where used.
MAX_NODES: Final = 10_000
MAX_DEPTH: Final = 64
MAX_DIGITS: Final = 18
#: Cards one daemon manages at most, and the largest card index (NVML's own limits
#: are far below; these keep a typo from building thousands of pollers).
MAX_CARDS: Final = 64
MAX_CARD_INDEX: Final = 1023


class ConfigError(Exception):
    """A configuration file that cannot be used, and exactly why."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        super().__init__(source, field, reason)
        self.source = source
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return _one_line(f"{where}: {self.reason}")


def _one_line(text: str) -> str:
    """``text`` with every unprintable character escaped: an error is always one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@frozen
class Route:
    """An HTTP call the broker makes to a consumer: health, load or unload."""

    method: str
    path: str
    body: Mapping[str, Any] | None = None


@frozen
class CommandRoute:
    """A load or unload done by running a program (SPEC 9.6): ``argv`` as given, no shell,
    killed after ``timeout_s``; a non-zero exit or a timeout is a failed load or unload."""

    argv: tuple[str, ...]
    timeout_s: float = 60.0


@frozen
class HoldUntil:
    """Poll ``path`` (``{field}`` from the consumer's JSON answer) until the GPU work ends."""

    path: str
    interval_s: float = 0.5


@frozen
class KindPath:
    """The consumer route that serves one facade kind."""

    method: str
    path: str
    hold_until: HoldUntil | None = None


@frozen
class ProcessConfig:
    """How the consumer's processes are found (SPEC 9.3): at most one of the two;
    neither: the process listening on the URL's port, when the host is local."""

    systemd_unit: str | None = None
    pid_file: str | None = None


@frozen
class OllamaConfig:
    """An Ollama consumer: its ``/api/ps`` read at each probe, its models freed as a
    last resort with ``reclaim`` (SPEC 9.4)."""

    reclaim: bool = False


@frozen
class OpenAIConfig:
    """Where a consumer serves OpenAI's API, and the models routed to it (SPEC 9.2).

    ``models`` are declared in the file; with ``discover``, ``GET <path>/models`` adds
    the consumer's own list at each health probe.
    """

    path: str = "/v1"
    models: tuple[str, ...] = ()
    discover: bool = False

    def target(self, suffix: str) -> str:
        """The consumer path for a route suffix: ``/v1`` + ``/chat/completions``."""
        return self.path.rstrip("/") + suffix


@frozen
class GpuRoute:
    """Native requests that take the GPU lease (SPEC 9.1): a method and a glob of the path
    after the prefix (fnmatch-style, without the query), with an optional ``hold_until``."""

    method: str
    path: str
    hold_until: HoldUntil | None = None

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with this (upper-case) method and decoded path is such work."""
        return method == self.method and fnmatch.fnmatchcase(path, self.path)


#: ``native.gpu`` omitted: every POST takes the lease, whatever its path.
ANY_POST: Final = GpuRoute("POST", "*")


@frozen
class NativeConfig:
    """A consumer's own API published under ``prefix`` (SPEC 9.1).

    ``gpu`` lists the requests that are scheduled; None (omitted) means every POST.
    """

    prefix: str
    gpu: tuple[GpuRoute, ...] | None = None

    def gpu_route(self, method: str, path: str) -> GpuRoute | None:
        """The entry that schedules this request (method upper-case, path decoded), if any."""
        routes = (ANY_POST,) if self.gpu is None else self.gpu
        return next((route for route in routes if route.matches(method, path)), None)


@frozen
class ConsumerConfig:
    """One local inference service behind the broker."""

    name: str
    url: str
    paths: Mapping[str, KindPath] = field(converter=frozen_mapping)
    vram_resident_mib: int
    health: Route = Route("GET", "/")
    unload: Route | CommandRoute | None = None
    load: Route | CommandRoute | None = None
    can_coexist_with: frozenset[str] = frozenset()
    vram_managed: bool = False
    priority: int = 2
    max_concurrency: int = 1
    timeout_s: float = 300.0
    #: Reuse connections to this consumer (SPEC 9.7): off by default, since a
    #: stray late answer on a reused connection would reach the next client.
    keepalive: bool = False
    process: ProcessConfig = ProcessConfig()
    ollama: OllamaConfig | None = None
    native: NativeConfig | None = None
    openai: OpenAIConfig | None = None
    #: Unloaded after this long loaded and unused (SPEC 9.6); None: never.
    idle_unload_s: float | None = None
    #: Loaded at start, highest priority first, as room allows (SPEC 9.6).
    preload: bool = False
    #: The cards it runs on, in index order (SPEC 9.5); empty: the first device.
    gpus: tuple[int, ...] = ()
    #: Its unload stops its process (SPEC 9.6): a failing health probe then means
    #: "unloaded", not "unhealthy", and a load waits for health to answer.
    stopped_when_unloaded: bool = False

    def coexists_with(self, other: ConsumerConfig) -> bool:
        """Whether the two may be resident together; declared on either side is enough."""
        return other.name in self.can_coexist_with or self.name in other.can_coexist_with


@frozen
class AuthConfig:
    token_file: str | None = None


@frozen
class GpuConfig:
    source: str = "auto"
    index: int = 0
    nvidia_smi: str = "nvidia-smi"
    cushion_mib: int = 256
    poll_interval_s: float = 2.0
    total_mib: int | None = None
    #: The cards managed, each with its own lease, queue order and ledger (SPEC 9.5);
    #: empty: ``index`` alone.
    devices: tuple[int, ...] = ()

    @property
    def cards(self) -> tuple[int, ...]:
        """The managed cards' indexes, in index order."""
        return self.devices or (self.index,)


@frozen
class SchedulerConfig:
    max_queue: int = 256
    aging_s: float = 30.0
    queue_timeout_s: float = 600.0
    max_evictions: int = 5
    free_wait_s: float = 10.0
    #: ``affinity``: requests that need no swap go first, for at most ``max_skip_s``;
    #: ``fifo``: strict priority, then arrival.
    policy: str = "affinity"
    max_skip_s: float = 30.0
    #: A consumer loaded less than this long ago is the last to be unloaded.
    min_residency_s: float = 10.0
    #: ``affinity``: how long a drained lease waits for its holder's next request
    #: before passing to a request that needs a swap (0: not at all).
    linger_s: float = 0.0
    #: Room is made for ``max``(configured, learned) size, or the ``configured`` one.
    footprint: str = "max"
    #: Which eviction candidate goes first: ``lru`` (section 7) or ``cost``
    #: (least expected reload seconds per MiB freed, SPEC 9.6).
    eviction: str = "lru"


@frozen
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 3.0


@frozen
class LimitsConfig:
    max_body_mib: int = 512
    #: A client's request head must arrive within this long.
    header_timeout_s: float = 10.0


@frozen
class Config:
    """The whole configuration file, checked."""

    consumers: Mapping[str, ConsumerConfig] = field(converter=frozen_mapping)
    routing: Mapping[str, str] = field(converter=frozen_mapping, factory=dict)
    audio_proxy: str | None = None
    listen: str = DEFAULT_LISTEN
    auth: AuthConfig = AuthConfig()
    gpu: GpuConfig = GpuConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    health: HealthConfig = HealthConfig()
    limits: LimitsConfig = LimitsConfig()
    #: Where learned sizes are kept across restarts; None: not kept.
    state_dir: str | None = None

    def consumer_for(self, kind: str) -> ConsumerConfig | None:
        """The consumer that serves a facade kind, if routing names one."""
        name = self.routing.get(kind)
        return None if name is None else self.consumers[name]


def load_config(path: str | Path) -> Config:
    """Read and check a YAML configuration file; any problem is a ``ConfigError``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(source, "", f"cannot read the file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"is not UTF-8 text: {e.reason} at byte {e.start}") from None
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text, source)  # this checks every character already
        data = loader.get_single_data()
    except yaml.reader.ReaderError as e:  # a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        why = f"character {chr(e.character)!r} is not allowed in YAML (line {line})"
        raise ConfigError(source, "", f"not valid YAML: {why}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(source, "", f"not valid YAML{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_config(data, source)


_INT_TAG: Final = "tag:yaml.org,2002:int"
_USER_INFO: Final = re.compile(r"//[^/?#]*@")


class _Mark(Protocol):
    """Where in the file an event or a node starts (PyYAML has two such classes)."""

    line: int
    column: int


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what a configuration file never needs.

    PyYAML keeps the last of two equal keys; a second ``mvoice:`` block would
    silently replace the first, so a duplicate is a syntax error with its line.
    It also expands aliases, recurses once per nesting level and converts
    integers of any length: a few lines can cost minutes, gigabytes or a
    ``RecursionError``. So nodes are counted as they are composed (an alias
    counts its whole target again, where it is used), nesting and integer
    digits are bounded, and a refusal names the field path where it happened.
    """

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        #: Nodes composed so far, each alias counted as the nodes it stands for.
        self._nodes = 0
        #: The field path of each open collection, outermost first.
        self._open: list[str] = []
        #: Each complete node: its field path, its node count and its nesting height.
        self._done: dict[int, tuple[str, int, int]] = {}

    def refuse(self, where: str, reason: str, mark: _Mark | None) -> ConfigError:
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return ConfigError(self.source, where, reason + at)

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        where = self._child_path(index)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                if id(target) not in self._done:
                    raise self.refuse(where, "is an alias inside its own anchor", event.start_mark)
                _, nodes, height = self._done[id(target)]
                self._count(where, nodes, len(self._open) + height, event.start_mark)
            return super().compose_node(parent, cast(int, index))
        collection = isinstance(event, yaml.CollectionStartEvent)
        before = self._nodes
        self._count(where, 1, len(self._open) + collection, event.start_mark)
        if collection:
            self._open.append(where)
        try:
            node = super().compose_node(parent, cast(int, index))
        finally:
            if collection:
                self._open.pop()
        height = 0
        if isinstance(node, yaml.CollectionNode):
            items = node.value if isinstance(node, yaml.SequenceNode) else _flat(node.value)
            height = 1 + max((self._done[id(item)][2] for item in items), default=0)
        self._done[id(node)] = (where, self._nodes - before, height)
        return node

    def _child_path(self, index: object) -> str:
        """The field path of the node composed next (``index``: its key node or position)."""
        parent = self._open[-1] if self._open else ""
        if isinstance(index, int):
            return f"{parent}[{index}]"
        if isinstance(index, yaml.ScalarNode):
            return _join(parent, str(index.value))
        return parent  # the root, or a mapping's key

    def _count(self, where: str, nodes: int, depth: int, mark: _Mark | None) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            reason = f"takes the file past {MAX_NODES} YAML nodes, aliases counted where used"
            raise self.refuse(where, reason, mark)
        if depth > MAX_DEPTH:
            raise self.refuse(where, f"nests deeper than {MAX_DEPTH} levels", mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors, with anything but a YAML error made a ``ConfigError``.

        (``!!int x``, ``2024-13-01``, ``!!bool maybe`` raise ValueError, KeyError...)
        """
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, ConfigError):
            raise
        except Exception as e:
            where = self._done[id(node)][0] if id(node) in self._done else ""
            tag = node.tag.rsplit(":", 1)[-1]
            raise self.refuse(where, f"is not a valid {tag}: {e}", node.start_mark) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer of at most ``MAX_DIGITS`` digits, refused before conversion if longer."""
        digits = str(node.value).replace("_", "").replace(":", "").lstrip("+-")
        if digits[:2].lower() in ("0x", "0b"):
            digits = digits[2:]
        if len(digits) <= MAX_DIGITS:
            value = super().construct_yaml_int(node)
            if abs(value) < 10**MAX_DIGITS:  # 18 hexadecimal digits are more in decimal
                return value
        where = self._done[id(node)][0] if id(node) in self._done else ""
        raise self.refuse(where, f"is an integer of more than {MAX_DIGITS} digits", node.start_mark)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(_INT_TAG, _StrictLoader.construct_yaml_int)


def _flat(pairs: list[tuple[yaml.Node, yaml.Node]]) -> list[yaml.Node]:
    return [node for pair in pairs for node in pair]


def parse_config(data: object, source: str = "<config>") -> Config:
    """Check an already parsed document; ``source`` names it in errors."""
    return _Parser(source).config(data)


class _Parser:
    """Walks the document, checking each value against its field path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._cards: tuple[int, ...] = (0,)

    def fail(self, where: str, reason: str) -> ConfigError:
        return ConfigError(self.source, where, reason)

    # -- generic checks --------------------------------------------------

    def mapping(self, value: object, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(where or "(top level)", f"must be a mapping, not {_kind_of(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where or "(top level)", f"keys must be strings, not {key!r}")
            if key not in allowed:
                raise self.fail(
                    _join(where, key), f"unknown key; expected one of: {', '.join(allowed)}"
                )
        return value

    def string(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, not {_kind_of(value)}")
        return value

    def integer(self, value: object, where: str, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, not {_kind_of(value)}")
        self.not_huge(value, where)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(where, f"must be {bound}, not {value}")
        return value

    def not_huge(self, value: object, where: str) -> None:
        """Refuse an integer of more than ``MAX_DIGITS`` digits (the loader already does so
        for a file; a document built in code may hold one that cannot even be printed)."""
        if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
            raise self.fail(where, f"is an integer of more than {MAX_DIGITS} digits")

    def seconds(self, value: object, where: str, zero: bool = False) -> float:
        """A finite number of seconds above zero (or at least zero, with ``zero``)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"must be a number of seconds, not {_kind_of(value)}")
        self.not_huge(value, where)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            what = "a number of seconds (0 or more)" if zero else "a positive number of seconds"
            raise self.fail(where, f"must be {what}, not {value}")
        return float(value)

    def one_of(self, value: object, where: str, allowed: tuple[str, ...]) -> str:
        text = self.string(value, where)
        if text not in allowed:
            raise self.fail(where, f"must be one of {', '.join(allowed)}, not {text!r}")
        return text

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {_kind_of(value)}")
        return value

    def method(self, value: object, where: str) -> str:
        text = self.string(value, where)
        if text.upper() not in HTTP_METHODS:
            raise self.fail(where, f"must be an HTTP method ({', '.join(HTTP_METHODS)})")
        return text.upper()

    def path(self, value: object, where: str) -> str:
        """A request path as sent: visible ASCII (no space, no control character) after a '/'."""
        text = self.string(value, where)
        if not text.startswith("/") or not _visible_ascii(text):
            raise self.fail(
                where,
                "must be a path starting with '/', of visible ASCII characters "
                f"(no spaces or control characters): {text!r}",
            )
        return text

    def file_name(self, value: object, where: str) -> str:
        """A file or program name: a non-empty string without control characters."""
        text = self.string(value, where)
        if not text.isprintable():
            raise self.fail(where, f"must not contain control characters: {text!r}")
        return text

    def route(self, value: object, where: str, default_method: str) -> Route:
        data = self.mapping(value, where, ("method", "path", "body"))
        if "path" not in data:
            raise self.fail(_join(where, "path"), "is required")
        body = data.get("body")
        if body is not None:
            if not isinstance(body, dict):
                raise self.fail(_join(where, "body"), f"must be a mapping, not {_kind_of(body)}")
            body = MappingProxyType(self.json_value(body, _join(where, "body")))
        return Route(
            method=self.method(data.get("method", default_method), _join(where, "method")),
            path=self.path(data["path"], _join(where, "path")),
            body=body,
        )

    def json_value(self, value: Any, where: str, depth: int = 1) -> Any:
        """A copy of ``value``, checked to be sent as JSON exactly as written."""
        if isinstance(value, dict | list) and depth > MAX_DEPTH:
            # A file never gets here (the loader refuses it); a document built in code may.
            raise self.fail(where, f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            copy = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise self.fail(where, f"JSON object keys must be strings, not {key!r}")
                copy[key] = self.json_value(item, f"{where}.{key}", depth + 1)
            return copy
        if isinstance(value, list):
            return [
                self.json_value(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)
            ]
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(where, f"cannot be sent as JSON: {value}")
        self.not_huge(value, where)
        if value is None or isinstance(value, str | bool | int | float):
            return value
        raise self.fail(where, f"cannot be sent as JSON: {_kind_of(value)}")

    # -- sections --------------------------------------------------------

    def config(self, data: object) -> Config:
        top = self.mapping(
            data,
            "",
            (
                "listen", "auth", "gpu", "scheduler", "health",
                "limits", "routing", "audio_proxy", "consumers", "state_dir",
            ),
        )  # fmt: skip
        if "consumers" not in top:
            raise self.fail("consumers", "is required")
        gpu = self.gpu(top.get("gpu"))
        self._cards = gpu.cards  # each consumer's ``gpus`` must name managed cards
        consumers = self.consumers(top["consumers"])
        routing = self.routing(top.get("routing"), consumers)
        audio_proxy = top.get("audio_proxy")
        if audio_proxy is not None:
            audio_proxy = self.declared(audio_proxy, "audio_proxy", consumers)
        return Config(
            consumers=consumers,
            routing=routing,
            audio_proxy=audio_proxy,
            listen=self.string(top.get("listen", DEFAULT_LISTEN), "listen"),
            auth=self.auth(top.get("auth")),
            gpu=gpu,
            scheduler=self.scheduler(top.get("scheduler")),
            health=self.health(top.get("health")),
            limits=self.limits(top.get("limits")),
            state_dir=(
                None
                if top.get("state_dir") is None
                else self.file_name(top["state_dir"], "state_dir")
            ),
        )

    def auth(self, value: object) -> AuthConfig:
        data = self.mapping(value, "auth", ("token_file",))
        token_file = data.get("token_file")
        if token_file is not None:
            token_file = self.file_name(token_file, "auth.token_file")
        return AuthConfig(token_file=token_file)

    def gpu(self, value: object) -> GpuConfig:
        d = GpuConfig()
        data = self.mapping(
            value,
            "gpu",
            (
                "source", "index", "nvidia_smi", "cushion_mib", "poll_interval_s", "total_mib",
                "devices",
            ),
        )  # fmt: skip
        source = self.one_of(data.get("source", d.source), "gpu.source", GPU_SOURCES)
        total = data.get("total_mib")
        if total is not None:
            total = self.integer(total, "gpu.total_mib", 1)
        elif source == "none":
            raise self.fail("gpu.total_mib", "is required when gpu.source is none")
        return GpuConfig(
            source=source,
            index=self.integer(data.get("index", d.index), "gpu.index", 0),
            nvidia_smi=self.file_name(data.get("nvidia_smi", d.nvidia_smi), "gpu.nvidia_smi"),
            cushion_mib=self.integer(data.get("cushion_mib", d.cushion_mib), "gpu.cushion_mib", 0),
            poll_interval_s=self.seconds(
                data.get("poll_interval_s", d.poll_interval_s), "gpu.poll_interval_s"
            ),
            total_mib=total,
            devices=self.devices(data.get("devices"), "gpu.devices"),
        )

    def devices(self, value: object, where: str) -> tuple[int, ...]:
        """A non-empty list of distinct card indexes, returned in index order (None: empty)."""
        if value is None:
            return ()
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list of card indexes, not {value!r}")
        if len(value) > MAX_CARDS:
            raise self.fail(where, f"lists {len(value)} cards; at most {MAX_CARDS}")
        indexes = [self.integer(item, f"{where}[{i}]", 0, MAX_CARD_INDEX)
                   for i, item in enumerate(value)]  # fmt: skip
        if len(set(indexes)) != len(indexes):
            raise self.fail(where, f"names a card twice: {indexes}")
        return tuple(sorted(indexes))

    def gpus(self, value: object, where: str) -> tuple[int, ...]:
        """A consumer's cards: among ``gpu.devices``; by default the first of them."""
        if value is None:
            return self._cards[:1]
        cards = self.devices(value, where)
        unknown = [card for card in cards if card not in self._cards]
        if unknown:
            managed = ", ".join(map(str, self._cards))
            raise self.fail(where, f"names card {unknown[0]}, not in gpu.devices ({managed})")
        return cards

    def scheduler(self, value: object) -> SchedulerConfig:
        d = SchedulerConfig()
        data = self.mapping(
            value,
            "scheduler",
            ("max_queue", "aging_s", "queue_timeout_s", "max_evictions", "free_wait_s",
             "policy", "max_skip_s", "min_residency_s", "linger_s", "footprint", "eviction"),
        )  # fmt: skip
        policy = self.one_of(data.get("policy", d.policy), "scheduler.policy", POLICIES)
        footprint = self.one_of(data.get("footprint", d.footprint), "scheduler.footprint",
                                FOOTPRINTS)  # fmt: skip
        return SchedulerConfig(
            max_queue=self.integer(data.get("max_queue", d.max_queue), "scheduler.max_queue", 1),
            aging_s=self.seconds(data.get("aging_s", d.aging_s), "scheduler.aging_s"),
            queue_timeout_s=self.seconds(
                data.get("queue_timeout_s", d.queue_timeout_s), "scheduler.queue_timeout_s"
            ),
            max_evictions=self.integer(
                data.get("max_evictions", d.max_evictions), "scheduler.max_evictions", 0
            ),
            free_wait_s=self.seconds(
                data.get("free_wait_s", d.free_wait_s), "scheduler.free_wait_s"
            ),
            policy=policy,
            max_skip_s=self.seconds(data.get("max_skip_s", d.max_skip_s), "scheduler.max_skip_s"),
            min_residency_s=self.seconds(
                data.get("min_residency_s", d.min_residency_s),
                "scheduler.min_residency_s",
                zero=True,
            ),
            linger_s=self.seconds(
                data.get("linger_s", d.linger_s), "scheduler.linger_s", zero=True
            ),
            footprint=footprint,
            eviction=self.one_of(data.get("eviction", d.eviction), "scheduler.eviction", EVICTIONS),
        )

    def health(self, value: object) -> HealthConfig:
        d = HealthConfig()
        data = self.mapping(value, "health", ("interval_s", "timeout_s"))
        return HealthConfig(
            interval_s=self.seconds(data.get("interval_s", d.interval_s), "health.interval_s"),
            timeout_s=self.seconds(data.get("timeout_s", d.timeout_s), "health.timeout_s"),
        )

    def limits(self, value: object) -> LimitsConfig:
        d = LimitsConfig()
        data = self.mapping(value, "limits", ("max_body_mib", "header_timeout_s"))
        return LimitsConfig(
            max_body_mib=self.integer(
                data.get("max_body_mib", d.max_body_mib), "limits.max_body_mib", 1
            ),
            header_timeout_s=self.seconds(
                data.get("header_timeout_s", d.header_timeout_s), "limits.header_timeout_s"
            ),
        )

    def declared(self, value: object, where: str, consumers: Mapping[str, object]) -> str:
        name = self.string(value, where)
        if name not in consumers:
            raise self.fail(where, f"names no declared consumer: {name!r}")
        return name

    def routing(self, value: object, consumers: Mapping[str, ConsumerConfig]) -> dict[str, str]:
        data = self.mapping(value, "routing", KINDS)
        routing = {}
        for kind, name in data.items():
            where = f"routing.{kind}"
            routing[kind] = self.declared(name, where, consumers)
            if kind not in consumers[routing[kind]].paths:
                raise self.fail(where, f"consumer {name!r} has no paths.{kind}")
        return routing

    def consumers(self, value: object) -> dict[str, ConsumerConfig]:
        data = self.mapping(value, "consumers", tuple(value) if isinstance(value, dict) else ())
        if not data:
            raise self.fail("consumers", "must declare at least one consumer")
        consumers = {name: self.consumer(name, spec) for name, spec in data.items()}
        for consumer in consumers.values():
            for other in consumer.can_coexist_with:
                if other not in consumers:
                    raise self.fail(
                        f"consumers.{consumer.name}.can_coexist_with",
                        f"names no declared consumer: {other!r}",
                    )
                if other == consumer.name:
                    raise self.fail(
                        f"consumers.{consumer.name}.can_coexist_with", "names the consumer itself"
                    )
        self.distinct_prefixes(consumers)
        self.distinct_models(consumers)
        return consumers

    def distinct_models(self, consumers: Mapping[str, ConsumerConfig]) -> None:
        """No model is declared by two consumers (SPEC 9.2): a request could go to either."""
        owners: dict[str, str] = {}
        for name, consumer in consumers.items():
            for i, model in enumerate(() if consumer.openai is None else consumer.openai.models):
                other = owners.setdefault(model, name)
                if other != name:
                    raise self.fail(
                        f"consumers.{name}.openai.models[{i}]",
                        f"{model!r} is also declared by consumers.{other}.openai.models: "
                        "a model is served by one consumer",
                    )

    def distinct_prefixes(self, consumers: Mapping[str, ConsumerConfig]) -> None:
        """No native prefix equals another, or lies under another (``/a`` and ``/a/b``)."""
        seen: dict[str, str] = {}
        for name, consumer in consumers.items():
            if consumer.native is None:
                continue
            prefix = consumer.native.prefix
            for other, taken in seen.items():
                if _under(prefix, taken) or _under(taken, prefix):
                    raise self.fail(
                        f"consumers.{name}.native.prefix",
                        f"{prefix} clashes with consumers.{other}.native.prefix ({taken}): "
                        "one would hide the other's routes",
                    )
            seen[name] = prefix

    def consumer(self, name: str, value: object) -> ConsumerConfig:
        where = f"consumers.{name}"
        d = ConsumerConfig(name=name, url="http://x", paths={}, vram_resident_mib=0)
        data = self.mapping(
            value,
            where,
            (
                "url", "health", "paths", "vram_resident_mib", "unload", "load",
                "can_coexist_with", "vram_managed", "priority", "max_concurrency", "timeout_s",
                "keepalive", "process", "ollama", "native", "openai",
                "idle_unload_s", "preload", "stopped_when_unloaded", "gpus",
            ),
        )  # fmt: skip
        for required in ("url", "paths", "vram_resident_mib"):
            if required not in data:
                raise self.fail(f"{where}.{required}", "is required")
        coexist = data.get("can_coexist_with", [])
        if not isinstance(coexist, list):
            raise self.fail(f"{where}.can_coexist_with", f"must be a list, not {_kind_of(coexist)}")
        return ConsumerConfig(
            name=name,
            url=self.url(data["url"], f"{where}.url"),
            paths=self.paths(data["paths"], f"{where}.paths"),
            vram_resident_mib=self.integer(
                data["vram_resident_mib"], f"{where}.vram_resident_mib", 0
            ),
            health=(
                self.route(data["health"], f"{where}.health", "GET")
                if data.get("health") is not None
                else d.health
            ),
            unload=self.optional_route(data.get("unload"), f"{where}.unload"),
            load=self.optional_route(data.get("load"), f"{where}.load"),
            can_coexist_with=frozenset(
                self.string(other, f"{where}.can_coexist_with[{i}]")
                for i, other in enumerate(coexist)
            ),
            vram_managed=self.boolean(
                data.get("vram_managed", d.vram_managed), f"{where}.vram_managed"
            ),
            priority=self.integer(data.get("priority", d.priority), f"{where}.priority", 0, 4),
            max_concurrency=self.integer(
                data.get("max_concurrency", d.max_concurrency), f"{where}.max_concurrency", 1
            ),
            timeout_s=self.seconds(data.get("timeout_s", d.timeout_s), f"{where}.timeout_s"),
            keepalive=self.boolean(data.get("keepalive", d.keepalive), f"{where}.keepalive"),
            process=self.process(data.get("process"), f"{where}.process"),
            ollama=self.ollama(data, where),
            native=self.native(data, where, name),
            openai=self.openai(data, where),
            idle_unload_s=(
                None
                if data.get("idle_unload_s") is None
                else self.seconds(data["idle_unload_s"], f"{where}.idle_unload_s")
            ),
            preload=self.boolean(data.get("preload", d.preload), f"{where}.preload"),
            stopped_when_unloaded=self.stopped_when_unloaded(data, where),
            gpus=self.gpus(data.get("gpus"), f"{where}.gpus"),
        )

    def process(self, value: object, where: str) -> ProcessConfig:
        data = self.mapping(value, where, ("systemd_unit", "pid_file"))
        if len(data) > 1:
            raise self.fail(where, "give one of systemd_unit and pid_file, not both")
        unit, pid_file = data.get("systemd_unit"), data.get("pid_file")
        return ProcessConfig(
            systemd_unit=None if unit is None else self.unit_name(unit, f"{where}.systemd_unit"),
            pid_file=None if pid_file is None else self.file_name(pid_file, f"{where}.pid_file"),
        )

    def unit_name(self, value: object, where: str) -> str:
        """A systemd unit name: it names a directory under the cgroup tree, so no '/'."""
        text = self.file_name(value, where)
        if "/" in text or text in (".", ".."):
            raise self.fail(where, f"must be a unit name such as whisper.service: {text!r}")
        return text

    def ollama(self, data: dict[str, Any], where: str) -> OllamaConfig | None:
        if "ollama" not in data:
            return None
        at = f"{where}.ollama"
        spec = self.mapping(data["ollama"], at, ("reclaim",))
        reclaim = self.boolean(spec.get("reclaim", False), f"{at}.reclaim")
        if reclaim and data.get("vram_managed") is not True:
            raise self.fail(
                f"{at}.reclaim",
                "frees the models of a consumer that manages its own memory: "
                "it needs vram_managed: true",
            )
        return OllamaConfig(reclaim=reclaim)

    def openai(self, data: dict[str, Any], where: str) -> OpenAIConfig | None:
        """``openai``: where the consumer serves OpenAI's API, and which models it serves."""
        if "openai" not in data:
            return None
        at = f"{where}.openai"
        spec = self.mapping(data["openai"], at, ("path", "models", "discover"))
        path = self.path(spec.get("path", "/v1"), f"{at}.path")
        if "?" in path or "#" in path:
            raise self.fail(f"{at}.path", f"must have no query or fragment: {path!r}")
        models = spec.get("models", [])
        if not isinstance(models, list):
            raise self.fail(f"{at}.models", f"must be a list, not {_kind_of(models)}")
        names: list[str] = []
        for i, model in enumerate(models):
            name = self.string(model, f"{at}.models[{i}]")
            if not name.isprintable():
                raise self.fail(
                    f"{at}.models[{i}]", f"must not contain control characters: {name!r}"
                )
            if name in names:
                raise self.fail(f"{at}.models[{i}]", f"{name!r} is listed twice")
            names.append(name)
        discover = self.boolean(spec.get("discover", False), f"{at}.discover")
        if not names and not discover:
            raise self.fail(at, "needs models (a list of model names), or discover: true")
        return OpenAIConfig(path=path, models=tuple(names), discover=discover)

    def native(self, data: dict[str, Any], where: str, name: str) -> NativeConfig | None:
        """``native``: present (even empty) publishes the consumer's API under its prefix."""
        if "native" not in data:
            return None
        at = f"{where}.native"
        spec = self.mapping(data["native"], at, ("prefix", "gpu"))
        if "prefix" in spec:
            prefix = self.native_prefix(spec["prefix"], f"{at}.prefix")
        else:
            prefix = self.native_prefix(f"/native/{name}", at, default=True)
        gpu = spec.get("gpu")
        return NativeConfig(
            prefix=prefix, gpu=None if gpu is None else self.gpu_routes(gpu, f"{at}.gpu")
        )

    def native_prefix(self, value: object, where: str, default: bool = False) -> str:
        """A path to publish a consumer under: plain segments, none of them the broker's own."""
        text = self.string(value, where)
        what = f"the default prefix {text!r} (from the consumer's name)" if default else repr(text)
        if not text.startswith("/") or not _visible_ascii(text):
            raise self.fail(where, f"must be a path starting with '/', of visible ASCII: {what}")
        if text == "/" or text.endswith("/"):
            raise self.fail(where, f"must not end with '/' (nor be '/', the dashboard): {what}")
        segments = text[1:].split("/")
        if any(segment in ("", ".", "..") for segment in segments):
            raise self.fail(where, f"must have no empty, '.' or '..' segments: {what}")
        if any(c in text for c in "%?#\\"):
            raise self.fail(where, f"must not contain '%', '?', '#' or a backslash: {what}")
        if segments[0] in RESERVED_SEGMENTS:
            raise self.fail(
                where,
                f"clashes with the broker's own routes (/{segments[0]}): {what}; "
                "give a prefix outside /v1, /audio, /healthz and /metrics",
            )
        return text

    def gpu_routes(self, value: object, where: str) -> tuple[GpuRoute, ...]:
        """``native.gpu``: the requests that take the lease, each a method and a path glob."""
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, not {_kind_of(value)}")
        routes = []
        for i, item in enumerate(value):
            at = f"{where}[{i}]"
            entry = self.mapping(item, at, ("method", "path", "hold_until"))
            if "path" not in entry:
                raise self.fail(f"{at}.path", "is required")
            hold = entry.get("hold_until")
            routes.append(
                GpuRoute(
                    method=self.method(entry.get("method", "POST"), f"{at}.method"),
                    path=self.path(entry["path"], f"{at}.path"),
                    hold_until=None if hold is None else self.hold_until(hold, f"{at}.hold_until"),
                )
            )
        return tuple(routes)

    def optional_route(self, value: object, where: str) -> Route | CommandRoute | None:
        """``load`` or ``unload``: an HTTP call, or ``{command: [argv...], timeout_s}``."""
        if value is None:
            return None
        if isinstance(value, dict) and "command" in value:
            return self.command_route(value, where)
        return self.route(value, where, "POST")

    def command_route(self, value: dict[str, Any], where: str) -> CommandRoute:
        """A program to run, its arguments given one by one: no shell ever reads them."""
        http = [key for key in ("method", "path", "body") if key in value]
        if http:
            raise self.fail(
                _join(where, http[0]),
                "cannot be given with command: a load or unload is an HTTP call "
                "(method, path, body) or a command (command, timeout_s), not both",
            )
        data = self.mapping(value, where, ("command", "timeout_s"))
        at = _join(where, "command")
        argv = data["command"]
        if not isinstance(argv, list) or not argv:
            raise self.fail(
                at,
                "must be a non-empty list of strings (the program, then its arguments), "
                f"not {_kind_of(argv)}",
            )
        return CommandRoute(
            argv=tuple(self.argument(arg, f"{at}[{i}]") for i, arg in enumerate(argv)),
            timeout_s=self.seconds(data.get("timeout_s", 60.0), _join(where, "timeout_s")),
        )

    def argument(self, value: object, where: str) -> str:
        """One argument of a command: a non-empty string, no NUL or other control character."""
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, not {_kind_of(value)}")
        if not value.isprintable():
            raise self.fail(where, f"must not contain control characters: {value!r}")
        return value

    def stopped_when_unloaded(self, data: dict[str, Any], where: str) -> bool:
        """``stopped_when_unloaded``: only with a load, which must start the service again."""
        at = f"{where}.stopped_when_unloaded"
        stopped = self.boolean(data.get("stopped_when_unloaded", False), at)
        if stopped and data.get("load") is None:
            raise self.fail(
                at,
                "needs a load (such as a command that starts the service): "
                "a stopped consumer could never be started again",
            )
        return stopped

    def url(self, value: object, where: str) -> str:
        """``http[s]://host[:port]``: the broker appends each route's path to it."""
        text = self.string(value, where)
        shown = repr(_USER_INFO.sub("//***@", text))  # a password stays out of the logs
        if not _visible_ascii(text):
            # urlsplit drops tabs and newlines silently; a request could not carry the rest.
            raise self.fail(
                where,
                "must be visible ASCII (no spaces or control characters; "
                f"an international host name in its xn-- form): {shown}",
            )
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise self.fail(where, f"is not a usable URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(where, f"must be an http:// or https:// URL with a host: {shown}")
        if "@" in parts.netloc:
            raise self.fail(where, f"must have no user info (user:password@): {shown}")
        if parts.path not in ("", "/") or "?" in text or "#" in text:
            raise self.fail(where, f"must have no path, query or fragment: {shown}")
        del port
        return text.rstrip("/")

    def paths(self, value: object, where: str) -> dict[str, KindPath]:
        data = self.mapping(value, where, KINDS)
        if not data:
            raise self.fail(where, f"must map at least one of: {', '.join(KINDS)}")
        paths = {}
        for kind, spec in data.items():
            at = f"{where}.{kind}"
            entry = self.mapping(spec, at, ("method", "path", "hold_until"))
            if "path" not in entry:
                raise self.fail(f"{at}.path", "is required")
            hold = entry.get("hold_until")
            paths[kind] = KindPath(
                method=self.method(entry.get("method", "POST"), f"{at}.method"),
                path=self.path(entry["path"], f"{at}.path"),
                hold_until=None if hold is None else self.hold_until(hold, f"{at}.hold_until"),
            )
        return paths

    def hold_until(self, value: object, where: str) -> HoldUntil:
        data = self.mapping(value, where, ("path", "interval_s"))
        if "path" not in data:
            raise self.fail(f"{where}.path", "is required")
        return HoldUntil(
            path=self.template(data["path"], f"{where}.path"),
            interval_s=self.seconds(data.get("interval_s", 0.5), f"{where}.interval_s"),
        )

    def template(self, value: object, where: str) -> str:
        """A path whose ``{field}`` placeholders name fields of a JSON answer."""
        text = self.path(value, where)
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as e:
            raise self.fail(where, f"is not a valid template ({e}): {text!r}") from None
        for _, name, spec, conversion in parts:
            if name is not None and (not name.isidentifier() or spec or conversion):
                raise self.fail(
                    where, f"placeholders must be {{field}} with a simple identifier: {text!r}"
                )
        return text


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or lies under it, segment-wise."""
    return path == prefix or path.startswith(prefix + "/")


def _visible_ascii(text: str) -> bool:
    """Only VCHAR (``!`` to ``~``): what a request line may carry unencoded."""
    return all("!" <= c <= "~" for c in text)


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if value == "":
        return "an empty string"
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)  # fmt: skip


def read_token(path: str | None, source: str) -> bytes | None:
    """The bearer token of ``auth.token_file``, or None when auth is off."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        why = getattr(e, "strerror", None) or e
        raise ConfigError(source, "auth.token_file", f"cannot read {path}: {why}") from None
    if not token or any(c <= 0x20 or c >= 0x7F for c in token):
        raise ConfigError(
            source, "auth.token_file", f"{path} must hold one token of printable ASCII"
        )
    return token
