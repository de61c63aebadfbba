"""The example configurations in config/examples/: each passes ``mgpu check-config`` and
says what its comments promise."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Final

from attrs import evolve
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpu import cli
from mgpu.config import Config, ConsumerConfig, KindPath, Route, load_config
from mgpu.sim.consumers import ConsumerSettings, make_consumer
from mgpu.sim.gpu import MemoryLedger

ROOT: Final = Path(__file__).resolve().parent.parent
EXAMPLES: Final = ROOT / "config" / "examples"
NAMES: Final = (
    "full-host.yaml", "ollama-comfyui.yaml", "openai-speech.yaml", "two-cards.yaml", "vllm.yaml",
)  # fmt: skip


def _example(name: str) -> Config:
    return load_config(EXAMPLES / name)


class CheckConfigTests(SynchronousTestCase):
    def test_every_example_passes_check_config(self) -> None:
        """`mgpu check-config FILE` accepts each example (exit 0, "valid"); the folder
        holds exactly these, so a new example gets checked too."""
        self.assertEqual(sorted(p.name for p in EXAMPLES.glob("*.yaml")), list(NAMES))
        for name in NAMES:
            path = str(EXAMPLES / name)
            out, err = io.StringIO(), io.StringIO()
            code = cli.run(["check-config", path], {}, cli.Io(out, err))
            self.assertEqual((code, err.getvalue()), (0, ""), name)
            self.assertTrue(out.getvalue().startswith(f"{path}: valid, "), out.getvalue())

    def test_the_command_itself(self) -> None:
        """The installed entry point, as an operator runs it, accepts an example."""
        path = EXAMPLES / "vllm.yaml"
        result = subprocess.run(
            [sys.executable, "-m", "mgpu.cli", "check-config", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("vllm", result.stdout)


class ExampleContentTests(SynchronousTestCase):
    def test_two_cards(self) -> None:
        """Two cards: ComfyUI on card 1, voice and whisper on card 0, vLLM on both."""
        config = _example("two-cards.yaml")
        self.assertEqual(config.gpu.cards, (0, 1))
        cards = {name: c.gpus for name, c in config.consumers.items()}
        self.assertEqual(cards, {"mvoice": (0,), "whisper": (0,), "comfyui": (1,), "vllm": (0, 1)})
        self.assertTrue(config.consumers["whisper"].stopped_when_unloaded)

    def assert_comfyui_native(self, consumer: ConsumerConfig) -> None:
        """ComfyUI's web UI under /comfyui/: only a queued prompt takes the GPU, held until
        its history shows it."""
        assert consumer.native is not None and consumer.native.gpu is not None
        self.assertEqual(consumer.native.prefix, "/comfyui")
        [route] = consumer.native.gpu
        self.assertEqual((route.method, route.path), ("POST", "/prompt"))
        assert route.hold_until is not None
        self.assertEqual(route.hold_until.path, "/history/{prompt_id}")

    def test_ollama_comfyui_publishes_both_native_apis(self) -> None:
        """Ollama and ComfyUI only, each under its own prefix; Ollama's OpenAI models
        are discovered."""
        config = _example("ollama-comfyui.yaml")
        self.assertEqual(set(config.consumers), {"ollama", "comfyui"})
        ollama = config.consumers["ollama"]
        assert ollama.native is not None and ollama.openai is not None
        self.assertEqual((ollama.native.prefix, ollama.native.gpu), ("/ollama", None))
        self.assertEqual((ollama.openai.path, ollama.openai.discover), ("/v1", True))
        self.assertTrue(ollama.vram_managed)
        self.assert_comfyui_native(config.consumers["comfyui"])

    def test_full_host_is_the_shipped_layout(self) -> None:
        """full-host.yaml declares the consumers and routing of config/consumers.yaml."""
        config = _example("full-host.yaml")
        shipped = load_config(ROOT / "config" / "consumers.yaml")
        self.assertEqual(dict(config.routing), dict(shipped.routing))
        self.assertEqual(config.audio_proxy, shipped.audio_proxy)
        self.assertEqual(list(config.consumers), list(shipped.consumers))
        for name, consumer in shipped.consumers.items():
            self.assertEqual(evolve(config.consumers[name], url="-"), evolve(consumer, url="-"))

    def test_vllm_sleeps_and_wakes_and_serves_openai(self) -> None:
        """vLLM's sleep mode as unload and load; its models discovered at /v1."""
        vllm = _example("vllm.yaml").consumers["vllm"]
        assert isinstance(vllm.unload, Route) and isinstance(vllm.load, Route)
        assert vllm.openai is not None
        self.assertEqual((vllm.unload.method, vllm.unload.path), ("POST", "/sleep?level=1"))
        self.assertEqual((vllm.load.method, vllm.load.path), ("POST", "/wake_up"))
        self.assertEqual((vllm.openai.path, vllm.openai.discover), ("/v1", True))
        self.assertFalse(vllm.vram_managed)

    def test_vllm_matches_the_simulator(self) -> None:
        """Every route the example calls is one the simulated vLLM serves, with that
        method; the example evicts by cost, so the cheap-to-wake vLLM goes first."""
        config = _example("vllm.yaml")
        vllm = config.consumers["vllm"]
        assert isinstance(vllm.unload, Route) and isinstance(vllm.load, Route)
        assert vllm.openai is not None
        routes = make_consumer(ConsumerSettings.make("vllm"), MemoryLedger(), Clock()).routes()
        called: list[Route | KindPath] = [vllm.health, vllm.unload, vllm.load]
        for route in [*called, *vllm.paths.values()]:
            self.assertIn(route.method, routes.get(route.path.split("?")[0], {}), route)
        self.assertIn("GET", routes[vllm.openai.path + "/models"])
        self.assertEqual(config.scheduler.eviction, "cost")

    def test_openai_speech_routes_by_model(self) -> None:
        """The speech server's OpenAI audio routes serve tts and stt; its models and
        Ollama's are distinct."""
        config = _example("openai-speech.yaml")
        speech = config.consumers["speech"]
        self.assertEqual(speech.paths["tts"].path, "/v1/audio/speech")
        self.assertEqual(speech.paths["stt"].path, "/v1/audio/transcriptions")
        assert speech.openai is not None
        self.assertEqual(
            (speech.openai.path, speech.openai.models), ("/v1", ("tts-1", "whisper-1"))
        )
        self.assertEqual((config.routing["tts"], config.routing["llm"]), ("speech", "ollama"))
