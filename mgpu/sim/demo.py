# -*- test-case-name: tests.test_sim -*-
"""The ``--demo`` world: four simulated consumers on loopback and one or two simulated cards.

``start_demo`` runs them inside the daemon, each card a ``MemoryLedger`` that
the daemon reads through ``Demo.gpu_readers``; ``demo_config`` is the daemon's
configuration for them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from attrs import define
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort

from mgpu.config import Config, parse_config
from mgpu.gpu import ReactorTime
from mgpu.sim.consumers import ConsumerSettings, SimConsumer, make_consumer
from mgpu.sim.gpu import MemoryLedger, SimGpuReader, span
from mgpu.sim.http import sim_site
from mgpu.sim.procs import SimProcessTable

DEMO_TOTAL_MIB: Final = 16384
"""Each simulated card's memory."""
DEMO_GPUS: Final = (1, 2)
"""How many cards the demo can simulate."""
TWO_CARDS: Final[Mapping[str, tuple[int, ...]]] = {"comfyui": (1,)}
"""Where consumers go on two cards (the others stay on card 0): the image model
gets the second card to itself, so it and the voice model no longer evict each other."""


def demo_gpus(name: str, gpus: int) -> tuple[int, ...]:
    """The cards the demo's consumer ``name`` runs on when the demo has ``gpus`` cards."""
    if gpus not in DEMO_GPUS:
        raise ValueError(f"the demo simulates {' or '.join(map(str, DEMO_GPUS))} cards, not {gpus}")
    return TWO_CARDS.get(name, (0,)) if gpus == 2 else (0,)


def demo_settings() -> list[ConsumerSettings]:
    """The demo's consumers: real sizes, times a tenth of real ones.

    The card has 16384 MiB, the cushion is 256 MiB; everything resident would
    be 2800 + 1500 + 6000 + 13000 = 23300 MiB, so the sequence tts, stt, llm,
    image, tts cannot keep it all and evicts four times (three by the image):

    - at start whisper.cpp (which loads its model at start) and ComfyUI are
      resident, as the broker assumes of healthy consumers that do not report
      ``loaded``: 14500 used.  mvoice reports ``loaded: false``;
    - tts: mvoice needs 3056, 1884 free: ComfyUI is evicted (``/free``; idle,
      so it frees on its next turn), 14884 free, mvoice loads: 4300 used;
    - stt: mvoice again, warm;
    - llm: Ollama (``vram_managed``, coexists with both) loads 6000 itself,
      10300 used, and keeps it 30 s after the answer, like the real one's
      5-minute keep-alive at the demo's tenth of real time;
    - image: ComfyUI needs 13256, 6084 free, and unloading mvoice alone
      would leave it short: Ollama is asked to free its model
      (``ollama.reclaim``, 12084 free), then mvoice is evicted (14884 free),
      ComfyUI cold-starts on the prompt, 14500 used. Three evictions so far;
    - tts: mvoice needs 3056, 1884 free: ComfyUI is evicted (its memory frees
      once its job has ended), mvoice loads: 4300 used. Four evictions.

    On two cards (``TWO_CARDS``) ComfyUI has the second to itself and the
    others fit together on the first (10300 used): nothing is evicted.
    """
    return [
        ConsumerSettings.make("mvoice", load_s=0.3),
        ConsumerSettings.make("whisper", load_s=0.15, preload=True),
        ConsumerSettings.make("ollama", load_s=0.6, keep_alive_s=30),
        ConsumerSettings.make("comfyui", load_s=1.3, preload=True),
    ]


#: The consumers of ``config/consumers.yaml``, less their URLs: what the demo
#: runs, and what the integration tests build their consumers from. A test
#: keeps the two equal.
PRODUCTION_CONSUMERS: Final[Mapping[str, Mapping[str, Any]]] = {
    "mvoice": {
        "health": {"method": "GET", "path": "/api/health"},
        "paths": {
            "tts": {"method": "POST", "path": "/api/synthesize"},
            "stt": {"method": "POST", "path": "/api/transcribe"},
        },
        "vram_resident_mib": 2800,
        "unload": {"method": "POST", "path": "/api/admin/unload"},
        "load": {"method": "POST", "path": "/api/admin/load"},
        "can_coexist_with": ["ollama"],
        "priority": 2,
        "max_concurrency": 1,
        "timeout_s": 300,
    },
    "whisper": {
        "health": {"method": "GET", "path": "/health"},
        "paths": {"stt": {"method": "POST", "path": "/inference"}},
        "vram_resident_mib": 1500,
        "can_coexist_with": ["mvoice", "ollama"],
        "native": {"prefix": "/whisper"},
    },
    "ollama": {
        "health": {"method": "GET", "path": "/api/version"},
        "paths": {"llm": {"method": "POST", "path": "/api/generate"}},
        "vram_resident_mib": 6000,
        "vram_managed": True,
        "ollama": {"reclaim": True},
        "native": {"prefix": "/ollama"},
        "openai": {"path": "/v1", "models": ["llama3.1:8b"]},
    },
    "comfyui": {
        "health": {"method": "GET", "path": "/system_stats"},
        "paths": {
            "image": {
                "method": "POST",
                "path": "/prompt",
                "hold_until": {"path": "/history/{prompt_id}", "interval_s": 0.5},
            }
        },
        "vram_resident_mib": 13000,
        "unload": {
            "method": "POST",
            "path": "/free",
            "body": {"unload_models": True, "free_memory": True},
        },
        "native": {
            "prefix": "/comfyui",
            "gpu": [
                {
                    "method": "POST",
                    "path": "/prompt",
                    "hold_until": {"path": "/history/{prompt_id}", "interval_s": 0.5},
                }
            ],
        },
    },
}


def demo_config(urls: Mapping[str, str], gpus: int = 1) -> dict[str, Any]:
    """``config/consumers.yaml``'s consumers at ``urls``, with a short health and GPU poll.

    ``gpu.source`` is ``none`` (with a card's size) because the daemon reads
    ``Demo.gpu_readers`` (source ``sim``) instead: a daemon wired wrongly would
    fall back to its own accounting, never read a real card.  With ``gpus=2``
    it manages cards 0 and 1 and places consumers as ``TWO_CARDS`` says.
    """
    config: dict[str, Any] = {
        "gpu": {"source": "none", "total_mib": DEMO_TOTAL_MIB, "poll_interval_s": 1},
        "health": {"interval_s": 1, "timeout_s": 1},
        "routing": {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"},
        "audio_proxy": "mvoice",
        "consumers": {
            name: {"url": urls[name], **copy.deepcopy(dict(block))}
            for name, block in PRODUCTION_CONSUMERS.items()
        },
    }
    if gpus != 1:
        config["gpu"]["devices"] = list(range(gpus))
        for name, block in config["consumers"].items():
            block["gpus"] = list(demo_gpus(name, gpus))
    return config


class DemoReactor(ReactorTime, Protocol):
    """What the demo needs of the reactor: time, and TCP listening (structural)."""

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort: ...


@define
class Demo:
    """The running demo: its configuration, simulated cards and consumers."""

    config: Config
    gpu_readers: Mapping[int, SimGpuReader]
    """Each card's reader by index, what the daemon polls instead of NVML."""
    ledgers: Mapping[int, MemoryLedger]
    """Each card's ledger by index."""
    consumers: Mapping[str, SimConsumer]
    ports: Sequence[IListeningPort]

    @property
    def gpu_reader(self) -> SimGpuReader:
        """The first card's reader."""
        return self.gpu_readers[0]

    @property
    def ledger(self) -> MemoryLedger:
        """The first card's ledger."""
        return self.ledgers[0]

    @property
    def process_table(self) -> SimProcessTable:
        """Where the daemon finds each simulated consumer's (virtual) process.

        The cards share their virtual pids, so the first card's ledger knows them all.
        """
        numbers = {
            name: port.getHost().port  # type: ignore[attr-defined]
            for name, port in zip(self.consumers, self.ports, strict=True)
        }
        return SimProcessTable(numbers, self.ledger)

    def stop(self) -> Deferred[None]:
        """Cancel the consumers' timers and close their ports."""
        for consumer in self.consumers.values():
            consumer.stop()
        closing = [maybeDeferred(port.stopListening) for port in self.ports]
        return gatherResults(closing).addCallback(lambda _: None)

    def service(self) -> IService:
        """A service whose ``stopService`` stops the demo, for the daemon's MultiService."""
        return _DemoService(self)


class _DemoService(Service):
    def __init__(self, demo: Demo) -> None:
        self.demo = demo

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.demo.stop()


def start_demo(reactor: DemoReactor, gpus: int = 1) -> Deferred[Demo]:
    """Start the four simulated consumers on loopback ports and ``gpus`` simulated cards.

    Fires at once (binding a port is synchronous), so ``makeService`` can use
    the configuration before the reactor runs.  Consumers log nothing; each
    card is a ``MemoryLedger`` of ``DEMO_TOTAL_MIB``, and each consumer holds
    its memory on its own cards (``demo_gpus``).  See ``demo_settings`` for
    the arithmetic.  ``ValueError`` for a number of cards the demo does not
    simulate (``DEMO_GPUS``).
    """
    settings = demo_settings()
    cards = {s.name: demo_gpus(s.name, gpus) for s in settings}
    pids: dict[str, int] = {}  # one virtual pid per consumer, on every card
    ledgers = {index: MemoryLedger(pids=pids) for index in range(gpus)}
    consumers = {
        s.name: make_consumer(s, span([ledgers[i] for i in cards[s.name]]), reactor)
        for s in settings
    }
    ports: list[IListeningPort] = []
    try:
        for consumer in consumers.values():
            ports.append(reactor.listenTCP(0, sim_site(consumer), interface="127.0.0.1"))
        urls = {
            name: f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
            for name, port in zip(consumers, ports, strict=True)
        }
        config = parse_config(demo_config(urls, gpus), "<demo>")
    except Exception:
        for port in ports:
            port.stopListening()
        return fail()
    readers = {
        index: SimGpuReader(ledger, reactor, DEMO_TOTAL_MIB, index=index)
        for index, ledger in ledgers.items()
    }
    return succeed(Demo(config, readers, ledgers, consumers, ports))
