"""A seeded, bursty, mixed trace of facade requests: what the trace benchmark replays.

Each kind (``tts``, ``stt``, ``llm``, ``image``) is an on/off process of its
own: an idle period (exponential, mean ``idle_s``), then a burst (exponential
length, mean ``burst_s``) in which requests arrive as a Poisson process of
rate ``rate`` per second, then idle again, and so on until ``duration_s``.
The first phase of every kind is an idle period, so the kinds start out of
step. The kinds are independent, so their bursts overlap at random: that
overlap is where strict arrival order swaps models back and forth.

Every time here is real-life seconds (a TTS job 0.3 s, loading ComfyUI about
20 s); the replay scales them all by one factor. Load times are per consumer
(``LOAD_S``: ComfyUI 20 s, Ollama 5 s, whisper 3 s, mvoice 2 s, so reloading
differs per MiB freed and ``scheduler.eviction: cost`` has something to go
by); ``load_model="size"`` keeps the older model, size x ``load_s_per_gib``,
under which cost orders exactly as LRU. Each kind draws from
its own ``random.Random`` seeded with ``"<seed>:<kind>"``, so the same seed
gives the same trace on every machine and Python, and changing one kind's
parameters leaves the others' arrivals as they were.

Scenarios (``SCENARIOS``): ``default`` is the above on a 16 GiB card;
``warm-tier`` adds a fifth kind, ``chat``, served by a vLLM in sleep mode
(11,000 MiB, woken from host RAM in ``WAKE_S`` 1 s, a cold load ``COLD_LOAD_S``
30 s that the broker never pays, as it only puts vLLM to sleep at level 1),
on a 24 GiB card: room for several small victims beside a large one, with
reload costs per MiB that differ twentyfold. The other four kinds' arrivals
are the default trace's, seed for seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

#: The routing the trace uses: facade kind -> consumer.
ROUTING: Mapping[str, str] = {
    "tts": "mvoice",
    "stt": "whisper",
    "llm": "ollama",
    "image": "comfyui",
}

#: Model sizes in MiB, as in the production configuration.
SIZES_MIB: Mapping[str, int] = {"mvoice": 2800, "whisper": 1500, "ollama": 6000, "comfyui": 13000}

#: Loading a model takes this long per GiB (a disk-to-GPU load of a few GB/s):
#: the ``size`` load model.
LOAD_S_PER_GIB = 1.0

#: Each consumer's load time in seconds: the ``mixed`` load model (the default).
#: Per MiB freed: whisper 2.0 ms, ComfyUI 1.5, Ollama 0.83, mvoice 0.71.
LOAD_S: Mapping[str, float] = {"comfyui": 20.0, "ollama": 5.0, "whisper": 3.0, "mvoice": 2.0}

#: ``mixed``: ``LOAD_S``; ``size``: size x ``load_s_per_gib`` (every MiB costs the same).
LOAD_MODELS = ("mixed", "size")

#: The ``warm-tier`` scenario's fifth consumer: vLLM in sleep mode (``POST
#: /sleep?level=1`` keeps its weights in host RAM, ``POST /wake_up`` brings them
#: back), its facade-less kind ``chat`` (OpenAI chat completions, routed by model).
VLLM = "vllm"
CHAT = "chat"
VLLM_MIB = 11000
#: Waking vLLM from host RAM: 0.09 ms per MiB freed, the cheapest reload by far.
WAKE_S = 1.0
#: Loading vLLM from disk: only at its start (preloaded), never during the trace.
COLD_LOAD_S = 30.0


@dataclass(frozen=True)
class KindSpec:
    """One kind's traffic: its GPU time per request and its on/off arrival process."""

    work_s: float  # GPU time of one request
    rate: float  # arrivals per second within a burst
    burst_s: float  # mean burst length
    idle_s: float  # mean idle period between bursts


#: The default traffic: a voice assistant (tts bursts), dictation (stt), chat
#: sessions (llm) and image sessions (a few prompts, seconds apart).
DEFAULT_KINDS: Mapping[str, KindSpec] = {
    "tts": KindSpec(work_s=0.3, rate=1.0, burst_s=20.0, idle_s=60.0),
    "stt": KindSpec(work_s=0.5, rate=0.5, burst_s=15.0, idle_s=60.0),
    "llm": KindSpec(work_s=1.0, rate=0.3, burst_s=30.0, idle_s=60.0),
    "image": KindSpec(work_s=3.0, rate=0.15, burst_s=30.0, idle_s=90.0),
}

#: ``warm-tier``'s chat sessions on the vLLM: the same shape as ``llm``'s.
CHAT_KIND = KindSpec(work_s=1.0, rate=0.3, burst_s=30.0, idle_s=60.0)

#: The scenarios and their cards (MiB): ``default`` (four consumers) and
#: ``warm-tier`` (a fifth, vLLM in sleep mode, on 24 GiB).
SCENARIOS: Mapping[str, int] = {"default": 16384, "warm-tier": 24576}


@dataclass(frozen=True)
class TraceParams:
    """What a trace is generated from (all times real-life seconds)."""

    seed: int = 1
    duration_s: float = 600.0
    kinds: Mapping[str, KindSpec] = field(default_factory=lambda: dict(DEFAULT_KINDS))
    routing: Mapping[str, str] = field(default_factory=lambda: dict(ROUTING))
    sizes_mib: Mapping[str, int] = field(default_factory=lambda: dict(SIZES_MIB))
    load_s_per_gib: float = LOAD_S_PER_GIB
    load_model: str = "mixed"
    load_times_s: Mapping[str, float] = field(default_factory=lambda: dict(LOAD_S))
    #: A load from disk where it differs from ``load_s`` (vLLM: ``load_s`` is its wake).
    cold_load_s: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.load_model not in LOAD_MODELS:
            raise ValueError(f"load_model must be one of {LOAD_MODELS}, not {self.load_model!r}")

    def busier(self, factor: float) -> TraceParams:
        """The same kinds with idle periods ``factor`` times shorter: bursts overlap more."""
        kinds = {k: replace(spec, idle_s=spec.idle_s / factor) for k, spec in self.kinds.items()}
        return replace(self, kinds=kinds)

    def cold_s(self, consumer: str) -> float:
        """How long a load from disk takes (real-life seconds): ``load_s`` unless set apart."""
        return float(self.cold_load_s.get(consumer, self.load_s(consumer)))

    def load_s(self, consumer: str) -> float:
        """How long loading ``consumer``'s model takes (real-life seconds)."""
        if self.load_model == "mixed" and consumer in self.load_times_s:
            return float(self.load_times_s[consumer])
        return round(self.sizes_mib[consumer] / 1024.0 * self.load_s_per_gib, 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "kinds": {k: asdict(v) for k, v in self.kinds.items()},
            "routing": dict(self.routing),
            "sizes_mib": dict(self.sizes_mib),
            "load_s_per_gib": self.load_s_per_gib,
            "load_model": self.load_model,
            "load_times_s": dict(self.load_times_s),
            # Only where set: the default trace's file stays as it was.
            **({"cold_load_s": dict(self.cold_load_s)} if self.cold_load_s else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TraceParams:
        return cls(
            seed=int(data["seed"]),
            duration_s=float(data["duration_s"]),
            kinds={k: KindSpec(**v) for k, v in data["kinds"].items()},
            routing=dict(data["routing"]),
            sizes_mib={k: int(v) for k, v in data["sizes_mib"].items()},
            load_s_per_gib=float(data["load_s_per_gib"]),
            # A trace written before per-consumer load times: the size model.
            load_model=str(data.get("load_model", "size")),
            load_times_s={k: float(v) for k, v in data.get("load_times_s", LOAD_S).items()},
            cold_load_s={k: float(v) for k, v in data.get("cold_load_s", {}).items()},
        )


def scenario_params(
    scenario: str, seed: int = 1, duration_s: float = 600.0, load_model: str = "mixed"
) -> TraceParams:
    """The trace parameters of a scenario (``SCENARIOS``); its card is ``SCENARIOS[scenario]``.

    ``warm-tier``: the default four kinds plus ``chat`` -> ``vllm`` (11,000 MiB,
    loaded in ``WAKE_S`` from host RAM, ``COLD_LOAD_S`` from disk).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {tuple(SCENARIOS)}, not {scenario!r}")
    params = TraceParams(seed=seed, duration_s=duration_s, load_model=load_model)
    if scenario == "default":
        return params
    return replace(
        params,
        kinds={**params.kinds, CHAT: CHAT_KIND},
        routing={**params.routing, CHAT: VLLM},
        sizes_mib={**params.sizes_mib, VLLM: VLLM_MIB},
        load_times_s={**params.load_times_s, VLLM: WAKE_S},
        cold_load_s={VLLM: COLD_LOAD_S},
    )


@dataclass(frozen=True)
class Arrival:
    """One request: when it arrives (seconds from the trace's start) and its kind."""

    t: float
    kind: str


@dataclass(frozen=True)
class Burst:
    """One burst of one kind: ``[start, end)`` in seconds from the trace's start."""

    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Trace:
    """The arrivals in time order, the bursts they came from, and the parameters."""

    params: TraceParams
    arrivals: tuple[Arrival, ...]
    bursts: tuple[Burst, ...]

    def consumers(self) -> list[str]:
        """The consumer of every arrival, in arrival order: what Belady's rule reads."""
        return [self.params.routing[a.kind] for a in self.arrivals]

    def timed(self, scale: float) -> list[tuple[float, str]]:
        """(arrival time x ``scale``, consumer) of every arrival: what the bound reads."""
        return [(a.t * scale, self.params.routing[a.kind]) for a in self.arrivals]

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params.to_json(),
            "arrivals": [[round(a.t, 6), a.kind] for a in self.arrivals],
            "bursts": [[b.kind, round(b.start, 6), round(b.end, 6)] for b in self.bursts],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Trace:
        return cls(
            TraceParams.from_json(data["params"]),
            tuple(Arrival(float(t), str(k)) for t, k in data["arrivals"]),
            tuple(Burst(str(k), float(s), float(e)) for k, s, e in data["bursts"]),
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def kind_arrivals(
    rng: random.Random, kind: str, spec: KindSpec, duration_s: float
) -> tuple[list[Arrival], list[Burst]]:
    """One kind's on/off process over ``[0, duration_s)``: its arrivals and its bursts."""
    arrivals: list[Arrival] = []
    bursts: list[Burst] = []
    t = rng.expovariate(1.0 / spec.idle_s)
    while t < duration_s:
        end = min(t + rng.expovariate(1.0 / spec.burst_s), duration_s)
        bursts.append(Burst(kind, t, end))
        a = t + rng.expovariate(spec.rate)
        while a < end:
            arrivals.append(Arrival(a, kind))
            a += rng.expovariate(spec.rate)
        t = end + rng.expovariate(1.0 / spec.idle_s)
    return arrivals, bursts


def generate(params: TraceParams) -> Trace:
    """The trace of ``params``: every kind's arrivals merged in time order."""
    arrivals: list[Arrival] = []
    bursts: list[Burst] = []
    for kind in sorted(params.kinds):
        rng = random.Random(f"{params.seed}:{kind}")
        got, windows = kind_arrivals(rng, kind, params.kinds[kind], params.duration_s)
        arrivals += got
        bursts += windows
    arrivals.sort(key=lambda a: (a.t, a.kind))
    bursts.sort(key=lambda b: (b.start, b.kind))
    return Trace(params, tuple(arrivals), tuple(bursts))
