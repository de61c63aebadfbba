"""The configuration file of SPEC section 3: defaults, rules and error messages."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import (
    AuthConfig,
    Config,
    ConfigError,
    ConsumerConfig,
    GpuConfig,
    GpuRoute,
    HealthConfig,
    HoldUntil,
    KindPath,
    LimitsConfig,
    NativeConfig,
    OllamaConfig,
    OpenAIConfig,
    ProcessConfig,
    Route,
    SchedulerConfig,
    load_config,
    parse_config,
)
from tests.fuzz import examples

PRODUCTION = Path(__file__).resolve().parent.parent / "config" / "consumers.yaml"
SOURCE = "test.yaml"


def consumer(**fields: Any) -> dict[str, Any]:
    """A consumer with only the required keys, plus ``fields``."""
    spec: dict[str, Any] = {
        "url": "http://127.0.0.1:9000",
        "paths": {"tts": {"method": "POST", "path": "/tts"}},
        "vram_resident_mib": 100,
    }
    spec.update(fields)
    return spec


def document(**top: Any) -> dict[str, Any]:
    """A document with one minimal consumer ``a``, plus the top-level ``top`` keys."""
    doc: dict[str, Any] = {"consumers": {"a": consumer()}}
    doc.update(top)
    return doc


def parse(data: object) -> Config:
    return parse_config(data, SOURCE)


def parse_yaml(text: str) -> Config:
    return parse(yaml.safe_load(textwrap.dedent(text)))


#: The values SPEC section 3 gives, which are both the defaults and the production file's.
SPEC_GPU = GpuConfig(
    source="auto", index=0, nvidia_smi="nvidia-smi", cushion_mib=256,
    poll_interval_s=2.0, total_mib=None,
)  # fmt: skip
SPEC_SCHEDULER = SchedulerConfig(
    max_queue=256, aging_s=30.0, queue_timeout_s=600.0, max_evictions=5, free_wait_s=10.0
)


class _ConfigTestCase(SynchronousTestCase):
    def assertRefused(self, data: object, field: str, reason: str = "") -> ConfigError:
        """Parsing ``data`` fails on exactly ``field``, with ``reason`` in the message."""
        error = self.assertRaises(ConfigError, parse, data)
        self.assertEqual((error.source, error.field), (SOURCE, field), str(error))
        self.assertIn(reason, error.reason)
        return error

    def write(self, text: str | bytes) -> str:
        path = self.mktemp()
        data = text if isinstance(text, bytes) else textwrap.dedent(text).encode("utf-8")
        Path(path).write_bytes(data)
        return path


class _SpecValues:
    """The listen, auth, gpu and scheduler values SPEC section 3 gives: both the
    defaults and the production file's, checked by the two test cases below."""

    config: Config
    assertEqual: Any

    def test_listen(self) -> None:
        """listen is loopback port 8770."""
        self.assertEqual(self.config.listen, "tcp:8770:interface=127.0.0.1")

    def test_auth(self) -> None:
        """No token file: authentication is off."""
        self.assertEqual(self.config.auth, AuthConfig(token_file=None))

    def test_gpu(self) -> None:
        """gpu: auto, index 0, nvidia-smi, 256 MiB cushion, 2 s poll, no total."""
        self.assertEqual(self.config.gpu, SPEC_GPU)

    def test_scheduler(self) -> None:
        """scheduler: queue 256, aging 30 s, timeout 600 s, 5 evictions, 10 s wait."""
        self.assertEqual(self.config.scheduler, SPEC_SCHEDULER)


class ProductionConfigTests(_SpecValues, _ConfigTestCase):
    """config/consumers.yaml has exactly the values of SPEC section 3."""

    def setUp(self) -> None:
        self.config = load_config(PRODUCTION)

    def test_health_and_limits(self) -> None:
        """Health probes every 5 s with a 3 s timeout, and bodies are limited to 512 MiB."""
        self.assertEqual(self.config.health, HealthConfig(interval_s=5.0, timeout_s=3.0))
        self.assertEqual(self.config.limits, LimitsConfig(max_body_mib=512))

    def test_routing_and_audio_proxy(self) -> None:
        """tts and stt go to mvoice, llm to ollama, image to comfyui; mvoice serves /audio."""
        self.assertEqual(
            dict(self.config.routing),
            {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"},
        )
        self.assertEqual(self.config.audio_proxy, "mvoice")
        self.assertIs(self.config.consumer_for("llm"), self.config.consumers["ollama"])

    def test_consumer_names(self) -> None:
        """The four consumers are declared, in file order."""
        self.assertEqual(list(self.config.consumers), ["mvoice", "whisper", "ollama", "comfyui"])

    def test_mvoice(self) -> None:
        """mvoice has every field spelled out in the SPEC example."""
        self.assertEqual(
            self.config.consumers["mvoice"],
            ConsumerConfig(
                name="mvoice",
                url="http://127.0.0.1:8765",
                paths={
                    "tts": KindPath("POST", "/api/synthesize"),
                    "stt": KindPath("POST", "/api/transcribe"),
                },
                vram_resident_mib=2800,
                health=Route("GET", "/api/health"),
                unload=Route("POST", "/api/admin/unload"),
                load=Route("POST", "/api/admin/load"),
                can_coexist_with=frozenset({"ollama"}),
                vram_managed=False,
                priority=2,
                max_concurrency=1,
                timeout_s=300.0,
                gpus=(0,),
            ),
        )

    def test_whisper(self) -> None:
        """whisper has no unload or load route, coexists with mvoice and ollama, and its own
        clients reach it under /whisper."""
        self.assertEqual(
            self.config.consumers["whisper"],
            ConsumerConfig(
                name="whisper",
                url="http://127.0.0.1:8080",
                paths={"stt": KindPath("POST", "/inference")},
                vram_resident_mib=1500,
                health=Route("GET", "/health"),
                unload=None,
                load=None,
                can_coexist_with=frozenset({"mvoice", "ollama"}),
                vram_managed=False,
                priority=2,
                max_concurrency=1,
                timeout_s=300.0,
                native=NativeConfig(prefix="/whisper"),
                gpus=(0,),
            ),
        )

    def test_ollama(self) -> None:
        """ollama manages its own VRAM and has no unload route; its idle models are reclaimed;
        its own API is published under /ollama and its model under /v1."""
        self.assertEqual(
            self.config.consumers["ollama"],
            ConsumerConfig(
                name="ollama",
                url="http://127.0.0.1:11434",
                paths={"llm": KindPath("POST", "/api/generate")},
                vram_resident_mib=6000,
                health=Route("GET", "/api/version"),
                unload=None,
                load=None,
                can_coexist_with=frozenset(),
                vram_managed=True,
                priority=2,
                max_concurrency=1,
                timeout_s=300.0,
                ollama=OllamaConfig(reclaim=True),
                native=NativeConfig(prefix="/ollama"),
                openai=OpenAIConfig(path="/v1", models=("llama3.1:8b",)),
                gpus=(0,),
            ),
        )

    def test_comfyui(self) -> None:
        """comfyui holds the GPU until its history entry exists and unloads through /free;
        its web UI is published under /comfyui, where only a queued prompt takes the GPU."""
        self.assertEqual(
            self.config.consumers["comfyui"],
            ConsumerConfig(
                name="comfyui",
                url="http://127.0.0.1:8188",
                paths={
                    "image": KindPath(
                        "POST", "/prompt", hold_until=HoldUntil("/history/{prompt_id}", 0.5)
                    )
                },
                vram_resident_mib=13000,
                health=Route("GET", "/system_stats"),
                unload=Route("POST", "/free", body={"unload_models": True, "free_memory": True}),
                load=None,
                can_coexist_with=frozenset(),
                vram_managed=False,
                priority=2,
                max_concurrency=1,
                timeout_s=300.0,
                native=NativeConfig(
                    prefix="/comfyui",
                    gpu=(GpuRoute("POST", "/prompt", HoldUntil("/history/{prompt_id}", 0.5)),),
                ),
                gpus=(0,),
            ),
        )

    def test_coexistence_is_symmetric(self) -> None:
        """A pair declared on either side coexists both ways, and no other pair does."""
        consumers = self.config.consumers
        together = {
            frozenset({"mvoice", "ollama"}),
            frozenset({"whisper", "mvoice"}),
            frozenset({"whisper", "ollama"}),
        }
        for a in consumers.values():
            for b in consumers.values():
                if a is not b:
                    expected = frozenset({a.name, b.name}) in together
                    self.assertEqual(a.coexists_with(b), expected, (a.name, b.name))


class DefaultTests(_SpecValues, _ConfigTestCase):
    """Every key but url, paths and vram_resident_mib has the SPEC's default."""

    def setUp(self) -> None:
        self.config = parse(document())
        self.consumer = self.config.consumers["a"]

    def test_health(self) -> None:
        """health defaults to a 5 s interval and a 3 s timeout."""
        self.assertEqual(self.config.health, HealthConfig(interval_s=5.0, timeout_s=3.0))

    def test_limits(self) -> None:
        """limits default to 512 MiB bodies."""
        self.assertEqual(self.config.limits, LimitsConfig(max_body_mib=512))

    def test_routing_and_audio_proxy(self) -> None:
        """Without routing no kind has a consumer, and without audio_proxy nothing serves /audio."""
        self.assertEqual(dict(self.config.routing), {})
        self.assertIsNone(self.config.consumer_for("tts"))
        self.assertIsNone(self.config.audio_proxy)

    def test_consumer_health(self) -> None:
        """A consumer's health route defaults to GET /."""
        self.assertEqual(self.consumer.health, Route("GET", "/", None))

    def test_consumer_scheduling(self) -> None:
        """A consumer defaults to priority 2, one request at a time and a 300 s timeout."""
        self.assertEqual(
            (self.consumer.priority, self.consumer.max_concurrency, self.consumer.timeout_s),
            (2, 1, 300.0),
        )

    def test_consumer_memory(self) -> None:
        """A consumer defaults to broker-managed VRAM and coexisting with nobody."""
        self.assertIs(self.consumer.vram_managed, False)
        self.assertEqual(self.consumer.can_coexist_with, frozenset())

    def test_consumer_load_and_unload(self) -> None:
        """A consumer defaults to no load and no unload route."""
        self.assertIsNone(self.consumer.load)
        self.assertIsNone(self.consumer.unload)

    def test_kind_path(self) -> None:
        """A kind path without method or hold_until is a POST that does not hold the GPU."""
        doc = document(consumers={"a": consumer(paths={"tts": {"path": "/tts"}})})
        self.assertEqual(parse(doc).consumers["a"].paths["tts"], KindPath("POST", "/tts", None))

    def test_route_methods(self) -> None:
        """A health route defaults to GET, load and unload routes to POST, none with a body."""
        doc = document(
            consumers={
                "a": consumer(health={"path": "/h"}, load={"path": "/l"}, unload={"path": "/u"})
            }
        )
        a = parse(doc).consumers["a"]
        self.assertEqual(
            (a.health, a.load, a.unload),
            (Route("GET", "/h", None), Route("POST", "/l", None), Route("POST", "/u", None)),
        )

    def test_hold_until_interval(self) -> None:
        """hold_until polls every 0.5 s by default."""
        doc = document(
            consumers={
                "a": consumer(paths={"image": {"path": "/p", "hold_until": {"path": "/h/{id}"}}})
            }
        )
        self.assertEqual(
            parse(doc).consumers["a"].paths["image"].hold_until, HoldUntil("/h/{id}", 0.5)
        )

    def test_empty_sections(self) -> None:
        """Sections written empty in YAML take every default."""
        config = parse_yaml(
            """
            gpu:
            scheduler:
            health:
            limits:
            auth:
            routing:
            consumers:
              a: {url: "http://127.0.0.1:9000", paths: {tts: {path: /t}}, vram_resident_mib: 1}
            """
        )
        self.assertEqual(
            (config.gpu, config.scheduler, config.health, config.limits, config.auth),
            (GpuConfig(), SchedulerConfig(), HealthConfig(), LimitsConfig(), AuthConfig()),
        )
        self.assertEqual(dict(config.routing), {})


class UnknownKeyTests(_ConfigTestCase):
    """An unknown key is an error at every level, naming its exact path."""

    def test_top_level(self) -> None:
        """An unknown top-level key is refused."""
        self.assertRefused(document(listn="tcp:1"), "listn", "unknown key")

    def test_gpu(self) -> None:
        """An unknown key under gpu is refused."""
        self.assertRefused(document(gpu={"sourse": "nvml"}), "gpu.sourse", "unknown key")

    def test_scheduler(self) -> None:
        """An unknown key under scheduler is refused."""
        self.assertRefused(document(scheduler={"max_queu": 3}), "scheduler.max_queu", "unknown key")

    def test_health(self) -> None:
        """An unknown key under health is refused."""
        self.assertRefused(document(health={"interval": 3}), "health.interval", "unknown key")

    def test_limits(self) -> None:
        """An unknown key under limits is refused."""
        self.assertRefused(document(limits={"max_body": 3}), "limits.max_body", "unknown key")

    def test_auth(self) -> None:
        """An unknown key under auth is refused."""
        self.assertRefused(document(auth={"token": "x"}), "auth.token", "unknown key")

    def test_routing_kind(self) -> None:
        """A routing key that is not a kind is refused."""
        self.assertRefused(document(routing={"video": "a"}), "routing.video", "unknown key")

    def test_consumer(self) -> None:
        """An unknown key in a consumer is refused."""
        self.assertRefused(
            document(consumers={"a": consumer(prority=3)}), "consumers.a.prority", "unknown key"
        )

    def test_routes(self) -> None:
        """An unknown key in a health, load or unload route is refused."""
        for name in ("health", "load", "unload"):
            doc = document(consumers={"a": consumer(**{name: {"path": "/x", "verb": "GET"}})})
            self.assertRefused(doc, f"consumers.a.{name}.verb", "unknown key")

    def test_paths_kind(self) -> None:
        """A paths key that is not a kind is refused."""
        doc = document(consumers={"a": consumer(paths={"tts": {"path": "/t"}, "tts2": {}})})
        self.assertRefused(doc, "consumers.a.paths.tts2", "unknown key")

    def test_kind_path(self) -> None:
        """An unknown key in one kind's path entry is refused."""
        doc = document(consumers={"a": consumer(paths={"tts": {"path": "/t", "body": {}}})})
        self.assertRefused(doc, "consumers.a.paths.tts.body", "unknown key")

    def test_hold_until(self) -> None:
        """An unknown key in hold_until is refused."""
        hold = {"path": "/h/{id}", "interval": 1}
        doc = document(
            consumers={"a": consumer(paths={"image": {"path": "/p", "hold_until": hold}})}
        )
        self.assertRefused(doc, "consumers.a.paths.image.hold_until.interval", "unknown key")


class RequiredKeyTests(_ConfigTestCase):
    """url, paths, vram_resident_mib, consumers and every route's path are required."""

    def test_consumers(self) -> None:
        """A document without consumers is refused."""
        self.assertRefused({"listen": "tcp:1"}, "consumers", "is required")

    def test_empty_document(self) -> None:
        """An empty document is refused for its missing consumers."""
        self.assertRefused(None, "consumers", "is required")

    def test_no_consumer(self) -> None:
        """consumers must declare at least one consumer."""
        self.assertRefused({"consumers": {}}, "consumers", "at least one")

    def test_consumer_keys(self) -> None:
        """A consumer without url, paths or vram_resident_mib is refused, naming that key."""
        for key in ("url", "paths", "vram_resident_mib"):
            spec = consumer()
            del spec[key]
            self.assertRefused(document(consumers={"a": spec}), f"consumers.a.{key}", "is required")

    def test_empty_paths(self) -> None:
        """A consumer must map at least one kind in paths."""
        self.assertRefused(document(consumers={"a": consumer(paths={})}), "consumers.a.paths")

    def test_route_path(self) -> None:
        """A health, load or unload route without a path is refused."""
        for name in ("health", "load", "unload"):
            doc = document(consumers={"a": consumer(**{name: {"method": "POST"}})})
            self.assertRefused(doc, f"consumers.a.{name}.path", "is required")

    def test_kind_path(self) -> None:
        """A kind entry without a path is refused."""
        doc = document(consumers={"a": consumer(paths={"tts": {"method": "POST"}})})
        self.assertRefused(doc, "consumers.a.paths.tts.path", "is required")

    def test_hold_until_path(self) -> None:
        """hold_until without a path is refused."""
        hold = {"interval_s": 1}
        doc = document(
            consumers={"a": consumer(paths={"image": {"path": "/p", "hold_until": hold}})}
        )
        self.assertRefused(doc, "consumers.a.paths.image.hold_until.path", "is required")


class TypeAndRangeTests(_ConfigTestCase):
    """Values have the right type and range, or the field is named."""

    INTEGERS = (
        ("gpu", "index"),
        ("gpu", "cushion_mib"),
        ("gpu", "total_mib"),
        ("scheduler", "max_queue"),
        ("scheduler", "max_evictions"),
        ("limits", "max_body_mib"),
    )
    SECONDS = (
        ("gpu", "poll_interval_s"),
        ("scheduler", "aging_s"),
        ("scheduler", "queue_timeout_s"),
        ("scheduler", "free_wait_s"),
        ("health", "interval_s"),
        ("health", "timeout_s"),
    )

    def test_integers_are_not_booleans(self) -> None:
        """true is not an integer anywhere an integer is expected."""
        for section, key in self.INTEGERS:
            self.assertRefused(document(**{section: {key: True}}), f"{section}.{key}", "integer")
        for key in ("vram_resident_mib", "priority", "max_concurrency"):
            self.assertRefused(
                document(consumers={"a": consumer(**{key: True})}), f"consumers.a.{key}", "integer"
            )

    def test_integers_are_not_floats_or_strings(self) -> None:
        """1.5 and "100" are not integers."""
        for value in (1.5, "100", None):
            self.assertRefused(
                document(consumers={"a": consumer(vram_resident_mib=value)}),
                "consumers.a.vram_resident_mib",
                "integer",
            )

    def test_integer_minimums(self) -> None:
        """Counts and sizes below their minimum are refused."""
        cases: list[tuple[dict[str, Any], str]] = [
            ({"gpu": {"index": -1}}, "gpu.index"),
            ({"gpu": {"cushion_mib": -1}}, "gpu.cushion_mib"),
            ({"gpu": {"total_mib": 0}}, "gpu.total_mib"),
            ({"scheduler": {"max_queue": 0}}, "scheduler.max_queue"),
            ({"scheduler": {"max_evictions": -1}}, "scheduler.max_evictions"),
            ({"limits": {"max_body_mib": 0}}, "limits.max_body_mib"),
            ({"consumers": {"a": consumer(vram_resident_mib=-1)}}, "consumers.a.vram_resident_mib"),
        ]
        for top, field in cases:
            self.assertRefused(document(**top), field, "must be")

    def test_priority_range(self) -> None:
        """priority takes 0 to 4 and refuses -1 and 5."""
        for priority in (0, 4):
            doc = document(consumers={"a": consumer(priority=priority)})
            self.assertEqual(parse(doc).consumers["a"].priority, priority)
        for priority in (-1, 5):
            self.assertRefused(
                document(consumers={"a": consumer(priority=priority)}),
                "consumers.a.priority",
                "between 0 and 4",
            )

    def test_max_concurrency(self) -> None:
        """max_concurrency must be at least 1."""
        doc = document(consumers={"a": consumer(max_concurrency=3)})
        self.assertEqual(parse(doc).consumers["a"].max_concurrency, 3)
        self.assertRefused(
            document(consumers={"a": consumer(max_concurrency=0)}),
            "consumers.a.max_concurrency",
            ">= 1",
        )

    def test_positive_seconds(self) -> None:
        """Every duration refuses zero, negatives, infinity, NaN, booleans and strings."""

        def section(name: str, key: str) -> Callable[[object], dict[str, Any]]:
            return lambda value: document(**{name: {key: value}})

        def timeout(value: object) -> dict[str, Any]:
            return document(consumers={"a": consumer(timeout_s=value)})

        def interval(value: object) -> dict[str, Any]:
            hold = {"path": "/h", "interval_s": value}
            return document(
                consumers={"a": consumer(paths={"image": {"path": "/p", "hold_until": hold}})}
            )

        cases = [(f"{name}.{key}", section(name, key)) for name, key in self.SECONDS]
        cases += [
            ("consumers.a.timeout_s", timeout),
            ("consumers.a.paths.image.hold_until.interval_s", interval),
        ]
        for field, build in cases:
            self.assertIsInstance(parse(build(1.5)), Config)
            for bad in (0, -1, float("inf"), float("nan"), True, "5", None):
                self.assertRefused(build(bad), field, "seconds")

    def test_seconds_accept_integers_and_fractions(self) -> None:
        """Durations may be integers or fractions, and are stored as floats."""
        config = parse(document(health={"interval_s": 2, "timeout_s": 0.25}))
        self.assertEqual(config.health, HealthConfig(interval_s=2.0, timeout_s=0.25))
        self.assertIsInstance(config.health.interval_s, float)

    def test_gpu_sources(self) -> None:
        """gpu.source takes auto, nvml, nvidia-smi and none, and nothing else."""
        for source in ("auto", "nvml", "nvidia-smi", "none"):
            gpu = {"source": source, "total_mib": 8192}
            self.assertEqual(parse(document(gpu=gpu)).gpu.source, source)
        for bad in ("cuda", "NVML", "", 0):
            self.assertRefused(document(gpu={"source": bad}), "gpu.source")

    def test_total_mib_required_with_source_none(self) -> None:
        """gpu.source none needs gpu.total_mib, and uses it."""
        self.assertRefused(document(gpu={"source": "none"}), "gpu.total_mib", "is required")
        self.assertRefused(
            document(gpu={"source": "none", "total_mib": None}), "gpu.total_mib", "is required"
        )
        gpu = parse(document(gpu={"source": "none", "total_mib": 24576})).gpu
        self.assertEqual((gpu.source, gpu.total_mib), ("none", 24576))

    def test_methods(self) -> None:
        """Methods are HTTP verbs, case-insensitive and stored in capitals."""
        doc = document(consumers={"a": consumer(unload={"method": "put", "path": "/u"})})
        self.assertEqual(parse(doc).consumers["a"].unload, Route("PUT", "/u"))
        for bad in ("FETCH", "", 5):
            self.assertRefused(
                document(consumers={"a": consumer(unload={"method": bad, "path": "/u"})}),
                "consumers.a.unload.method",
            )
            self.assertRefused(
                document(consumers={"a": consumer(paths={"tts": {"method": bad, "path": "/t"}})}),
                "consumers.a.paths.tts.method",
            )

    def test_paths_start_with_slash(self) -> None:
        """Every route path must start with '/' and contain no spaces."""
        for bad in ("api/health", "/api /health", "", 7):
            for name in ("health", "load", "unload"):
                self.assertRefused(
                    document(consumers={"a": consumer(**{name: {"path": bad}})}),
                    f"consumers.a.{name}.path",
                )
            self.assertRefused(
                document(consumers={"a": consumer(paths={"tts": {"path": bad}})}),
                "consumers.a.paths.tts.path",
            )
            image = {"image": {"path": "/p", "hold_until": {"path": bad}}}
            self.assertRefused(
                document(consumers={"a": consumer(paths=image)}),
                "consumers.a.paths.image.hold_until.path",
            )

    def test_body_must_be_a_mapping(self) -> None:
        """unload.body and load.body refuse lists, strings and numbers."""
        for name in ("load", "unload"):
            for bad in ([1, 2], "unload_models=true", 3):
                doc = document(consumers={"a": consumer(**{name: {"path": "/x", "body": bad}})})
                self.assertRefused(doc, f"consumers.a.{name}.body", "must be a mapping")

    def test_body_is_sent_as_given(self) -> None:
        """A body keeps its nested values and types exactly as written."""
        body = {"unload_models": True, "n": 3, "x": 0.5, "s": "a", "none": None, "l": [1, {}]}
        doc = document(consumers={"a": consumer(unload={"path": "/free", "body": body})})
        config = parse(doc)
        body["n"] = 4  # the configuration keeps its own copy
        unload = config.consumers["a"].unload
        assert isinstance(unload, Route) and unload.body is not None
        self.assertEqual(
            dict(unload.body),
            {"unload_models": True, "n": 3, "x": 0.5, "s": "a", "none": None, "l": [1, {}]},
        )
        self.assertIs(unload.body["unload_models"], True)

    def test_body_must_be_json(self) -> None:
        """A body value that JSON cannot carry as written is refused where it is."""
        cases = [
            ("when: 2024-01-01", "consumers.a.unload.body.when"),
            ("1: x", "consumers.a.unload.body"),
            ("x: .inf", "consumers.a.unload.body.x"),
            ("l: [1, {2: 3}]", "consumers.a.unload.body.l[1]"),
        ]
        for body, field in cases:
            text = f"""
                consumers:
                  a:
                    url: http://127.0.0.1:9000
                    paths: {{tts: {{path: /t}}}}
                    vram_resident_mib: 1
                    unload: {{path: /free, body: {{{body}}}}}
                """
            self.assertRefused(yaml.safe_load(textwrap.dedent(text)), field)

    def test_url_scheme_and_host(self) -> None:
        """A consumer url must be http or https with a host and a valid port."""
        for bad in (
            "ftp://127.0.0.1:21",
            "127.0.0.1:8000",
            "http://",
            "http://:8000",
            "http://host:port",
            "http://host:99999",
            "",
            8000,
        ):
            self.assertRefused(document(consumers={"a": consumer(url=bad)}), "consumers.a.url", "")

    def test_url_without_path(self) -> None:
        """A consumer url may not carry a path, query or fragment."""
        for bad in ("http://127.0.0.1:8000/api", "http://h:1/?x=1", "http://h:1#top"):
            self.assertRefused(
                document(consumers={"a": consumer(url=bad)}), "consumers.a.url", "no path"
            )

    def test_url_accepted(self) -> None:
        """https, IPv6 and a trailing slash are accepted, the slash dropped."""
        for url, stored in (
            ("https://gpu.example:443/", "https://gpu.example:443"),
            ("http://[::1]:8080", "http://[::1]:8080"),
        ):
            doc = document(consumers={"a": consumer(url=url)})
            self.assertEqual(parse(doc).consumers["a"].url, stored)

    def test_strings(self) -> None:
        """listen, gpu.nvidia_smi and auth.token_file must be non-empty strings."""
        self.assertRefused(document(listen=8770), "listen", "string")
        self.assertRefused(document(listen=""), "listen", "string")
        self.assertRefused(document(gpu={"nvidia_smi": ""}), "gpu.nvidia_smi", "string")
        self.assertRefused(document(auth={"token_file": 5}), "auth.token_file", "string")
        self.assertEqual(
            parse(document(auth={"token_file": "/etc/t"})).auth, AuthConfig(token_file="/etc/t")
        )

    def test_vram_managed_is_boolean(self) -> None:
        """vram_managed must be true or false."""
        self.assertRefused(
            document(consumers={"a": consumer(vram_managed="yes")}),
            "consumers.a.vram_managed",
            "true or false",
        )

    def test_can_coexist_with_is_a_list(self) -> None:
        """can_coexist_with must be a list of names."""
        self.assertRefused(
            document(consumers={"a": consumer(can_coexist_with="b")}),
            "consumers.a.can_coexist_with",
            "must be a list",
        )
        self.assertRefused(
            document(consumers={"a": consumer(can_coexist_with=[3])}),
            "consumers.a.can_coexist_with[0]",
            "string",
        )

    def test_sections_are_mappings(self) -> None:
        """A section that is not a mapping is refused, naming it."""
        self.assertRefused([1], "(top level)", "mapping")
        for section in ("gpu", "scheduler", "health", "limits", "auth", "routing", "consumers"):
            self.assertRefused(document(**{section: [1]}), section, "mapping")
        self.assertRefused(document(consumers={"a": "x"}), "consumers.a", "mapping")
        self.assertRefused(
            document(consumers={"a": consumer(health="/h")}), "consumers.a.health", "mapping"
        )


class SchedulingPolicyTests(_ConfigTestCase):
    """scheduler.policy, max_skip_s, min_residency_s and linger_s."""

    def test_defaults(self) -> None:
        """affinity, a 30 s skip bound, 10 s minimum residency, no lingering."""
        scheduler = parse(document()).scheduler
        self.assertEqual(
            (scheduler.policy, scheduler.max_skip_s, scheduler.min_residency_s, scheduler.linger_s),
            ("affinity", 30.0, 10.0, 0.0),
        )

    def test_values(self) -> None:
        """Each key is read; zero turns min_residency_s and linger_s off."""
        keys = {"policy": "fifo", "max_skip_s": 5, "min_residency_s": 0, "linger_s": 0}
        scheduler = parse(document(scheduler=keys)).scheduler
        self.assertEqual(
            (scheduler.policy, scheduler.max_skip_s, scheduler.min_residency_s, scheduler.linger_s),
            ("fifo", 5.0, 0.0, 0.0),
        )

    def test_refused(self) -> None:
        """An unknown policy, a skip bound of zero, negative times are refused by name."""
        for key, value, reason in (
            ("policy", "lru", "must be one of affinity, fifo"),
            ("max_skip_s", 0, "positive number of seconds"),
            ("min_residency_s", -1, "0 or more"),
            ("linger_s", -0.5, "0 or more"),
            ("linger_s", "2s", "number of seconds"),
        ):
            self.assertRefused(document(scheduler={key: value}), f"scheduler.{key}", reason)


class ReferenceTests(_ConfigTestCase):
    """routing, audio_proxy and can_coexist_with name declared consumers and kinds."""

    def test_routing_names_declared_consumer(self) -> None:
        """routing may not name an undeclared consumer."""
        self.assertRefused(document(routing={"tts": "b"}), "routing.tts", "no declared consumer")

    def test_audio_proxy_names_declared_consumer(self) -> None:
        """audio_proxy may not name an undeclared consumer."""
        self.assertRefused(document(audio_proxy="b"), "audio_proxy", "no declared consumer")
        self.assertEqual(parse(document(audio_proxy="a")).audio_proxy, "a")

    def test_routed_kind_in_paths(self) -> None:
        """A routed kind must exist in that consumer's paths."""
        self.assertRefused(document(routing={"llm": "a"}), "routing.llm", "paths.llm")
        config = parse(document(routing={"tts": "a"}))
        self.assertIs(config.consumer_for("tts"), config.consumers["a"])

    def test_paths_kinds(self) -> None:
        """paths take only tts, stt, llm and image."""
        for kind in ("tts", "stt", "llm", "image"):
            paths = {kind: {"path": "/x"}}
            doc = document(consumers={"a": consumer(paths=paths)}, routing={kind: "a"})
            self.assertEqual(list(parse(doc).consumers["a"].paths), [kind])
        doc = document(consumers={"a": consumer(paths={"video": {"path": "/v"}})})
        self.assertRefused(doc, "consumers.a.paths.video", "unknown key")

    def test_routing_kinds(self) -> None:
        """routing takes only tts, stt, llm and image."""
        self.assertRefused(document(routing={"embed": "a"}), "routing.embed", "unknown key")

    def test_can_coexist_with_names_declared_consumers(self) -> None:
        """can_coexist_with may not name an undeclared consumer, nor the consumer itself."""
        self.assertRefused(
            document(consumers={"a": consumer(can_coexist_with=["b"])}),
            "consumers.a.can_coexist_with",
            "no declared consumer",
        )
        self.assertRefused(
            document(consumers={"a": consumer(can_coexist_with=["a"])}),
            "consumers.a.can_coexist_with",
            "itself",
        )

    def test_coexistence_declared_on_one_side(self) -> None:
        """A pair declared only on one side coexists both ways."""
        config = parse(
            {"consumers": {"a": consumer(can_coexist_with=["b"]), "b": consumer(), "c": consumer()}}
        )
        a, b, c = (config.consumers[n] for n in "abc")
        self.assertEqual(
            (a.coexists_with(b), b.coexists_with(a), a.coexists_with(c), c.coexists_with(b)),
            (True, True, False, False),
        )


class HoldUntilTests(_ConfigTestCase):
    """hold_until.path's placeholders are {field} with field a simple identifier."""

    def hold(self, path: str) -> dict[str, Any]:
        image = {"image": {"path": "/prompt", "hold_until": {"path": path}}}
        return document(consumers={"a": consumer(paths=image)})

    def test_identifiers_accepted(self) -> None:
        """Paths with none, one or several identifier placeholders are accepted as written."""
        for path in ("/history", "/history/{prompt_id}", "/j/{job}/{_n2}", "/x/{{literal}}"):
            hold_until = parse(self.hold(path)).consumers["a"].paths["image"].hold_until
            self.assertEqual(hold_until, HoldUntil(path, 0.5))

    def test_malformed_template(self) -> None:
        """An unbalanced brace is refused, naming the field."""
        for path in ("/history/{prompt_id", "/history/prompt_id}", "/h/{a{b}}"):
            self.assertRefused(self.hold(path), "consumers.a.paths.image.hold_until.path")

    def test_placeholder_not_identifier(self) -> None:
        """Empty, positional, dotted, indexed, converted or formatted placeholders are refused."""
        for path in (
            "/h/{}",
            "/h/{0}",
            "/h/{a.b}",
            "/h/{a[0]}",
            "/h/{a!r}",
            "/h/{a:>4}",
            "/h/{a-b}",
        ):
            self.assertRefused(
                self.hold(path), "consumers.a.paths.image.hold_until.path", "identifier"
            )


class FileTests(_ConfigTestCase):
    """load_config names the file in every error, with the line for YAML errors."""

    def test_error_message_format(self) -> None:
        """str(ConfigError) is exactly 'FILE: field.path: reason'."""
        text = PRODUCTION.read_text(encoding="utf-8").replace(
            "unload: {method: POST, path: /free,", "unload: {method: FETCH, path: /free,"
        )
        path = self.write(text)
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(
            str(error),
            f"{path}: consumers.comfyui.unload.method: "
            "must be an HTTP method (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)",
        )

    def test_error_without_field(self) -> None:
        """A ConfigError without a field reads 'FILE: reason'."""
        self.assertEqual(str(ConfigError("f.yaml", "", "broken")), "f.yaml: broken")
        self.assertEqual(str(ConfigError("f.yaml", "a.b", "broken")), "f.yaml: a.b: broken")

    def test_syntax_error(self) -> None:
        """A YAML syntax error names the file and the line."""
        path = self.write(
            """\
            listen: "tcp:8770"
            gpu:
              source: auto
                index: 0
            """
        )
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual((error.source, error.field), (path, ""))
        self.assertTrue(str(error).startswith(f"{path}: not valid YAML at line 4,"), str(error))

    def test_duplicate_key(self) -> None:
        """A key given twice in one mapping is an error naming the file and the line."""
        path = self.write(
            """\
            consumers:
              a: {url: "http://127.0.0.1:1", paths: {tts: {path: /t}}, vram_resident_mib: 1}
              a: {url: "http://127.0.0.1:2", paths: {tts: {path: /t}}, vram_resident_mib: 1}
            """
        )
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertIn(f"{path}: not valid YAML at line 3,", str(error))
        self.assertIn("duplicate key 'a'", str(error))

    def test_missing_file(self) -> None:
        """A file that does not exist is named in the error."""
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual((error.source, error.field), (path, ""))
        self.assertTrue(str(error).startswith(f"{path}: cannot read the file"), str(error))

    def test_unreadable_file(self) -> None:
        """A directory in place of the file is named in the error."""
        path = self.mktemp()
        Path(path).mkdir()
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertTrue(str(error).startswith(f"{path}: cannot read the file"), str(error))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 text is named in the error."""
        path = self.write(b"listen: \xff\xfe\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertTrue(str(error).startswith(f"{path}: is not UTF-8"), str(error))

    def test_rule_error_names_file(self) -> None:
        """A rule broken in a file is reported with that file's name."""
        path = self.write("consumers: {}\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: consumers: must declare at least one consumer")

    def test_load_path_object(self) -> None:
        """load_config takes a Path as well as a string."""
        path = self.write(
            """\
            consumers:
              a: {url: "http://127.0.0.1:1", paths: {tts: {path: /t}}, vram_resident_mib: 1}
            """
        )
        self.assertEqual(load_config(Path(path)), load_config(path))


class MemoryKeysTests(_ConfigTestCase):
    """SPEC 9.3 and 9.4: process, ollama, state_dir and scheduler.footprint."""

    def test_defaults(self) -> None:
        """No process key: found by port; no ollama block; not kept; footprint max."""
        config = parse(document())
        self.assertEqual(config.consumers["a"].process, ProcessConfig())
        self.assertIsNone(config.consumers["a"].ollama)
        self.assertIsNone(config.state_dir)
        self.assertEqual(config.scheduler.footprint, "max")

    def test_each_process_source(self) -> None:
        """A unit or a pid file, as written."""
        unit = parse(document(consumers={"a": consumer(process={"systemd_unit": "w.service"})}))
        self.assertEqual(unit.consumers["a"].process, ProcessConfig(systemd_unit="w.service"))
        pid = parse(document(consumers={"a": consumer(process={"pid_file": "/run/w.pid"})}))
        self.assertEqual(pid.consumers["a"].process, ProcessConfig(pid_file="/run/w.pid"))

    def test_process_refusals(self) -> None:
        """Both sources, an unknown key, a unit that is a path: each names its field."""
        both = {"systemd_unit": "w", "pid_file": "/p"}
        self.assertRefused(document(consumers={"a": consumer(process=both)}),
                           "consumers.a.process", "not both")  # fmt: skip
        self.assertRefused(document(consumers={"a": consumer(process={"pid": 3})}),
                           "consumers.a.process.pid", "unknown key")  # fmt: skip
        self.assertRefused(document(consumers={"a": consumer(process={"systemd_unit": "../x"})}),
                           "consumers.a.process.systemd_unit", "unit name")  # fmt: skip

    def test_ollama_reclaim_needs_vram_managed(self) -> None:
        """reclaim frees memory the consumer manages itself: vram_managed must say so."""
        self.assertRefused(document(consumers={"a": consumer(ollama={"reclaim": True})}),
                           "consumers.a.ollama.reclaim", "vram_managed: true")  # fmt: skip
        ok = parse(document(consumers={"a": consumer(vram_managed=True, ollama={"reclaim": True})}))
        self.assertEqual(ok.consumers["a"].ollama, OllamaConfig(reclaim=True))
        plain = parse(document(consumers={"a": consumer(ollama=None)}))
        self.assertEqual(plain.consumers["a"].ollama, OllamaConfig(reclaim=False))

    def test_footprint_and_state_dir(self) -> None:
        """footprint is max or configured; state_dir a path."""
        config = parse(document(scheduler={"footprint": "configured"}, state_dir="/var/lib/m"))
        self.assertEqual(
            (config.scheduler.footprint, config.state_dir), ("configured", "/var/lib/m")
        )
        self.assertRefused(document(scheduler={"footprint": "min"}), "scheduler.footprint",
                           "must be one of max, configured")  # fmt: skip
        self.assertRefused(document(state_dir=""), "state_dir", "non-empty string")


def natives(**blocks: object) -> dict[str, Any]:
    """A document whose consumers (named by ``blocks``) each have the ``native`` block given."""
    return document(consumers={name: consumer(native=block) for name, block in blocks.items()})


class NativeTests(_ConfigTestCase):
    """``consumers.<name>.native`` (SPEC 9.1): its prefix, its gpu entries, and every refusal."""

    def test_absent_is_none(self) -> None:
        """A consumer without native publishes no native routes."""
        self.assertIsNone(parse(document()).consumers["a"].native)

    def test_empty_block_takes_the_default_prefix(self) -> None:
        """native: {} (or a bare native:) publishes under /native/<name>; every POST scheduled."""
        block: dict[str, Any] | None
        for block in ({}, None):
            config = parse(natives(ollama=block))
            self.assertEqual(config.consumers["ollama"].native, NativeConfig("/native/ollama"))

    def test_spec_example(self) -> None:
        """SPEC 9.1's ComfyUI and Ollama blocks parse as written; methods are upper-cased."""
        config = parse_yaml("""
            consumers:
              comfyui:
                url: http://127.0.0.1:8188
                paths: {image: {path: /prompt}}
                vram_resident_mib: 13000
                native:
                  prefix: /comfyui
                  gpu:
                    - {method: post, path: /prompt,
                       hold_until: {path: "/history/{prompt_id}", interval_s: 0.5}}
                    - {path: "/api/*"}
              ollama:
                url: http://127.0.0.1:11434
                paths: {llm: {path: /api/generate}}
                vram_resident_mib: 6000
                native: {prefix: /ollama}
            """)
        self.assertEqual(
            config.consumers["comfyui"].native,
            NativeConfig(
                "/comfyui",
                (
                    GpuRoute("POST", "/prompt", HoldUntil("/history/{prompt_id}", 0.5)),
                    GpuRoute("POST", "/api/*"),
                ),
            ),
        )
        self.assertEqual(config.consumers["ollama"].native, NativeConfig("/ollama", None))

    def test_empty_gpu_list_schedules_nothing(self) -> None:
        """gpu: [] says no request of this consumer takes the lease."""
        native = parse(natives(a={"gpu": []})).consumers["a"].native
        assert native is not None
        self.assertEqual(native.gpu, ())
        self.assertIsNone(native.gpu_route("POST", "/api/generate"))

    def test_prefix_refusals(self) -> None:
        """Prefixes that are no plain path are refused on native.prefix, saying why."""
        for prefix, reason in (
            ("ollama", "starting with '/'"),
            ("/a b", "visible ASCII"),
            ("/caf\u00e9", "visible ASCII"),
            ("/a/", "must not end with '/'"),
            ("/", "must not end with '/'"),
            ("/a//b", "empty, '.' or '..' segments"),
            ("/a/../b", "empty, '.' or '..' segments"),
            ("/./a", "empty, '.' or '..' segments"),
            ("/..", "empty, '.' or '..' segments"),
            ("/a%2fb", "'%', '?', '#'"),
            ("/a?x", "'%', '?', '#'"),
            ("/a#x", "'%', '?', '#'"),
            ("/a\\b", "backslash"),
            ("", "non-empty string"),
            (7, "non-empty string"),
        ):
            self.assertRefused(natives(a={"prefix": prefix}), "consumers.a.native.prefix", reason)

    def test_prefix_clashing_with_broker_routes(self) -> None:
        """/v1, /audio, /healthz, /metrics and anything under them are the broker's own."""
        for prefix in ("/v1", "/v1/ollama", "/audio", "/audio/x", "/healthz", "/metrics/a"):
            self.assertRefused(
                natives(a={"prefix": prefix}), "consumers.a.native.prefix", "broker's own routes"
            )
        for prefix in ("/v1x", "/audiox", "/healthz2", "/V1", "/native/v1", "/ollama"):
            native = parse(natives(a={"prefix": prefix})).consumers["a"].native
            self.assertEqual(native, NativeConfig(prefix), prefix)

    def test_default_prefix_from_unusable_name(self) -> None:
        """A name that makes no path (a space, a slash at the end) needs an explicit prefix."""
        self.assertRefused(natives(**{"my model": {}}), "consumers.my model.native",
                           "the default prefix '/native/my model'")  # fmt: skip
        self.assertRefused(natives(**{"a/": {}}), "consumers.a/.native", "must not end with")
        ok = parse(natives(**{"my model": {"prefix": "/mine"}}))
        self.assertEqual(ok.consumers["my model"].native, NativeConfig("/mine"))

    def test_prefix_clashing_with_another_consumer(self) -> None:
        """Two consumers may not share a prefix, nor have one under the other's."""
        for first, second in (("/a", "/a"), ("/a", "/a/b"), ("/a/b", "/a"), ("/native", None)):
            second_block = {} if second is None else {"prefix": second}
            self.assertRefused(
                natives(a={"prefix": first}, b=second_block),
                "consumers.b.native.prefix",
                f"clashes with consumers.a.native.prefix ({first})",
            )
        config = parse(natives(a={"prefix": "/a"}, b={"prefix": "/ab"}, c={}, d=None))
        self.assertEqual(
            [c.native.prefix for c in config.consumers.values() if c.native],
            ["/a", "/ab", "/native/c", "/native/d"],
        )

    def test_gpu_refusals(self) -> None:
        """Malformed gpu entries are refused on the exact field."""
        hold = {"path": "/history/{id!r}"}
        for block, field, reason in (
            ({"gpu": {"path": "/x"}}, "consumers.a.native.gpu", "must be a list"),
            ({"gpu": ["/x"]}, "consumers.a.native.gpu[0]", "must be a mapping"),
            ({"gpu": [{"method": "GET"}]}, "consumers.a.native.gpu[0].path", "is required"),
            ({"gpu": [{"path": "/x"}, {"path": "x"}]}, "consumers.a.native.gpu[1].path",
             "starting with '/'"),
            ({"gpu": [{"path": "/x y"}]}, "consumers.a.native.gpu[0].path", "visible ASCII"),
            ({"gpu": [{"method": "FETCH", "path": "/x"}]}, "consumers.a.native.gpu[0].method",
             "HTTP method"),
            ({"gpu": [{"path": "/x", "when": 1}]}, "consumers.a.native.gpu[0].when",
             "unknown key"),
            ({"gpu": [{"path": "/x", "hold_until": hold}]},
             "consumers.a.native.gpu[0].hold_until.path", "placeholders"),
            ({"gpu": [{"path": "/x", "hold_until": {}}]},
             "consumers.a.native.gpu[0].hold_until.path", "is required"),
            ({"port": 1}, "consumers.a.native.port", "unknown key; expected one of: prefix, gpu"),
            ([], "consumers.a.native", "must be a mapping"),
        ):  # fmt: skip
            self.assertRefused(natives(a=block), field, reason)

    @settings(max_examples=examples(300), deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.sampled_from(["/", ".", "..", "v1", "audio", "metrics", "%2e", "\\", "?"]),
                st.characters(min_codepoint=0x20, max_codepoint=0x7F),
            ),
            max_size=12,
        ).map("".join)
    )
    def test_any_prefix_is_refused_or_plain(self, prefix: str) -> None:
        """Whatever the prefix, it is refused on native.prefix, or it is plain segments of
        visible ASCII with no dot segment, not under the broker's own routes."""
        try:
            config = parse(natives(a={"prefix": prefix}))
        except ConfigError as e:
            self.assertEqual(e.field, "consumers.a.native.prefix", str(e))
            return
        native = config.consumers["a"].native
        assert native is not None
        self.assertEqual(native.prefix, prefix)
        segments = prefix.split("/")
        self.assertEqual(segments[0], "")
        for segment in segments[1:]:
            self.assertNotIn(segment, ("", ".", ".."))
            self.assertTrue(all("!" <= c <= "~" and c not in "%?#\\" for c in segment), segment)
        self.assertNotIn(segments[1], ("v1", "audio", "healthz", "metrics"))

    def test_gpu_route_matching(self) -> None:
        """An entry matches its method and a glob of the whole path; gpu omitted: any POST."""
        anything = NativeConfig("/o")
        self.assertEqual(anything.gpu_route("POST", "/api/generate"), GpuRoute("POST", "*"))
        self.assertEqual(anything.gpu_route("POST", "/"), GpuRoute("POST", "*"))
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            self.assertIsNone(anything.gpu_route(method, "/api/generate"), method)
        prompt = GpuRoute("POST", "/prompt", HoldUntil("/history/{prompt_id}"))
        api = GpuRoute("PUT", "/api/*/run")
        listed = NativeConfig("/c", (prompt, api))
        self.assertIs(listed.gpu_route("POST", "/prompt"), prompt)
        self.assertIs(listed.gpu_route("PUT", "/api/x/run"), api)
        self.assertIs(listed.gpu_route("PUT", "/api/x/y/run"), api)  # fnmatch: * spans '/'
        for method, path in (
            ("GET", "/prompt"),
            ("POST", "/prompt/"),
            ("POST", "/prompts"),
            ("POST", "/Prompt"),
            ("POST", "/upload/image"),
            ("POST", "/api/x/run"),
        ):
            self.assertIsNone(listed.gpu_route(method, path), (method, path))


def openais(**blocks: object) -> dict[str, Any]:
    """A document whose consumers (named by ``blocks``) each have the ``openai`` block given."""
    return document(consumers={name: consumer(openai=block) for name, block in blocks.items()})


class OpenAIConfigTests(_ConfigTestCase):
    """``consumers.<name>.openai`` (SPEC 9.2): its path, models and discovery, and refusals."""

    def test_absent_is_none(self) -> None:
        """A consumer without openai serves no model."""
        self.assertIsNone(parse(document()).consumers["a"].openai)

    def test_spec_example(self) -> None:
        """SPEC 9.2's block parses as written; path defaults to /v1, discover to false."""
        config = parse_yaml("""
            consumers:
              ollama:
                url: http://127.0.0.1:11434
                paths: {llm: {path: /api/generate}}
                vram_resident_mib: 6000
                openai:
                  path: /v1
                  models: [llama3.1:8b, qwen2.5:7b]
              vllm:
                url: http://127.0.0.1:8000
                paths: {llm: {path: /v1/completions}}
                vram_resident_mib: 9000
                openai: {discover: true, path: /openai/v1/}
            """)
        self.assertEqual(
            config.consumers["ollama"].openai,
            OpenAIConfig("/v1", ("llama3.1:8b", "qwen2.5:7b"), discover=False),
        )
        self.assertEqual(
            config.consumers["vllm"].openai, OpenAIConfig("/openai/v1/", (), discover=True)
        )
        self.assertEqual(parse(openais(a={"models": ["m"]})).consumers["a"].openai,
                         OpenAIConfig("/v1", ("m",), False))  # fmt: skip

    def test_target_joins_path_and_suffix(self) -> None:
        """The consumer path is openai.path + the route's suffix, one slash between."""
        for path, expected in (
            ("/v1", "/v1/chat/completions"),
            ("/v1/", "/v1/chat/completions"),
            ("/", "/chat/completions"),
            ("/api/openai/v1", "/api/openai/v1/chat/completions"),
        ):
            self.assertEqual(OpenAIConfig(path, ("m",)).target("/chat/completions"), expected)

    def test_needs_models_or_discovery(self) -> None:
        """A block that names no model and discovers none serves nothing: refused."""
        blocks: list[object] = [{}, None, {"path": "/v1"}, {"models": []}, {"discover": False}]
        for block in blocks:
            self.assertRefused(openais(a=block), "consumers.a.openai", "or discover: true")

    def test_refusals(self) -> None:
        """Malformed openai blocks are refused on the exact field, saying why."""
        for block, field, reason in (
            ({"models": "m"}, "consumers.a.openai.models", "must be a list, not a string"),
            ({"models": ["m", 7]}, "consumers.a.openai.models[1]", "non-empty string"),
            ({"models": [""]}, "consumers.a.openai.models[0]", "non-empty string"),
            ({"models": ["a\nb"]}, "consumers.a.openai.models[0]", "control characters"),
            ({"models": ["m", "n", "m"]}, "consumers.a.openai.models[2]", "'m' is listed twice"),
            ({"models": ["m"], "path": "v1"}, "consumers.a.openai.path", "starting with '/'"),
            ({"models": ["m"], "path": "/v 1"}, "consumers.a.openai.path", "visible ASCII"),
            ({"models": ["m"], "path": "/v1?x=1"}, "consumers.a.openai.path", "no query"),
            ({"models": ["m"], "discover": "yes"}, "consumers.a.openai.discover",
             "true or false"),
            ({"models": ["m"], "model": "m"}, "consumers.a.openai.model",
             "unknown key; expected one of: path, models, discover"),
            ([], "consumers.a.openai", "must be a mapping"),
        ):  # fmt: skip
            self.assertRefused(openais(a=block), field, reason)

    def test_model_declared_by_two_consumers(self) -> None:
        """One model name declared by two consumers: refused on the second, naming the first."""
        error = self.assertRefused(
            openais(a={"models": ["x", "shared"]}, b={"models": ["y", "z", "shared"]}),
            "consumers.b.openai.models[2]",
            "'shared' is also declared by consumers.a.openai.models",
        )
        self.assertIn("consumers.b.openai.models[2]", str(error))
        config = parse(openais(a={"models": ["x"]}, b={"models": ["X"], "discover": True}))
        self.assertEqual([c.openai.models for c in config.consumers.values() if c.openai],
                         [("x",), ("X",)])  # fmt: skip

    def test_from_a_file(self) -> None:
        """A clash in a real file names the file and the field path."""
        path = self.write("""
            consumers:
              a: {url: "http://127.0.0.1:1", paths: {llm: {path: /x}}, vram_resident_mib: 1,
                  openai: {models: [m]}}
              b: {url: "http://127.0.0.1:2", paths: {llm: {path: /x}}, vram_resident_mib: 1,
                  openai: {models: [m]}}
            """)
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(error.field, "consumers.b.openai.models[0]")
        self.assertIn(path, str(error))


class CardsTests(_ConfigTestCase):
    """gpu.devices and each consumer's gpus (SPEC 9.5)."""

    def test_defaults(self) -> None:
        """No devices: gpu.index alone; a consumer without gpus runs on the first card."""
        config = parse(document(gpu={"index": 3}))
        self.assertEqual((config.gpu.devices, config.gpu.cards), ((), (3,)))
        self.assertEqual(config.consumers["a"].gpus, (3,))

    def test_devices_in_index_order_and_gpus_among_them(self) -> None:
        doc = document(gpu={"devices": [2, 0]})
        doc["consumers"]["b"] = consumer(gpus=[2, 0])
        config = parse(doc)
        self.assertEqual(config.gpu.cards, (0, 2))
        self.assertEqual((config.consumers["a"].gpus, config.consumers["b"].gpus), ((0,), (0, 2)))

    def test_refused(self) -> None:
        """Not a list, empty, repeated, negative, too many: refused naming the field."""
        cases = [
            ({"devices": 0}, "gpu.devices", "non-empty list"),
            ({"devices": []}, "gpu.devices", "non-empty list"),
            ({"devices": [0, 0]}, "gpu.devices", "names a card twice"),
            ({"devices": [-1]}, "gpu.devices[0]", ""),
            ({"devices": list(range(65))}, "gpu.devices", "at most 64"),
        ]
        for gpu, field, reason in cases:
            self.assertRefused(document(gpu=gpu), field, reason)

    def test_consumer_on_an_unmanaged_card_refused(self) -> None:
        doc = document(gpu={"devices": [0, 1]})
        doc["consumers"]["a"]["gpus"] = [1, 2]
        error = self.assertRefused(doc, "consumers.a.gpus", "names card 2, not in gpu.devices")
        self.assertIn("(0, 1)", str(error))
        doc["consumers"]["a"]["gpus"] = [1, 1]
        self.assertRefused(doc, "consumers.a.gpus", "names a card twice")
