# -*- test-case-name: tests.test_sim -*-
"""``python -m mgpu.sim``: one simulated consumer process, for the integration tests.

``--service`` picks what it imitates (``mgpu.sim.consumers.SERVICES``: mvoice,
whisper, ollama, comfyui, openai-speech, vllm). It prints ``listening
127.0.0.1:PORT`` and serves until SIGTERM or SIGINT;
with ``--gpu-state`` its model's memory goes into a ``FileLedger`` that
``tests/fake_nvidia_smi.py`` reads, on each card ``--gpus`` names.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from mgpu.sim.consumers import SERVICES, ConsumerSettings, make_consumer
from mgpu.sim.demo import DEMO_TOTAL_MIB, DemoReactor
from mgpu.sim.gpu import FileLedger, GpuLedger, MemoryLedger, span
from mgpu.sim.http import sim_site


def card_list(text: str) -> tuple[int, ...]:
    """``--gpus``: distinct card indexes separated by commas (``0,1``), in index order."""
    try:
        cards = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not card indexes: {text!r}") from None
    if min(cards) < 0 or len(set(cards)) != len(cards):
        raise argparse.ArgumentTypeError(f"not distinct card indexes: {text!r}")
    return tuple(sorted(cards))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of one simulated consumer process."""
    p = argparse.ArgumentParser(
        prog="python -m mgpu.sim",
        description="Run one simulated consumer on 127.0.0.1; prints 'listening 127.0.0.1:PORT'.",
    )
    p.add_argument("--name", required=True, help="consumer name (ledger owner, log label)")
    p.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    p.add_argument("--service", choices=sorted(SERVICES), help="what it imitates (default: NAME)")
    p.add_argument("--gpu-state", type=Path, help="JSON state file shared with fake_nvidia_smi")
    p.add_argument("--gpus", type=card_list, default=(0,),
                   help="cards its model fills, each with its size: 0,1 (default 0)")  # fmt: skip
    p.add_argument("--gpu-total-mib", type=int, default=DEMO_TOTAL_MIB,
                   help="each card's size, written for a card the state file lacks")  # fmt: skip
    p.add_argument("--log", type=Path, help="append each finished work request as a JSON line")
    p.add_argument("--load-s", type=float, help="load time (default: 0.1 s per 1000 MiB)")
    p.add_argument("--work-s", type=float, help="work time of every kind (default per kind)")
    p.add_argument("--vram-mib", type=int, help="model size (default per service)")
    p.add_argument("--preload", action="store_true", help="load the model at start")
    p.add_argument("--wake-s", type=float,
                   help="vllm: seconds to wake from host RAM (default: --load-s / 10)")  # fmt: skip
    p.add_argument("--keep-alive-s", type=float, default=300.0,
                   help="ollama: idle seconds before freeing its model; <0: never")  # fmt: skip
    args = p.parse_args(argv)
    if args.service is None and args.name not in SERVICES:
        p.error(f"--service is required when --name is not one of {', '.join(SERVICES)}")
    return args


async def _serve(reactor: DemoReactor, args: argparse.Namespace) -> None:
    """Serve one consumer until the reactor stops; on shutdown its memory frees."""
    ledger: GpuLedger = (
        MemoryLedger()
        if args.gpu_state is None
        else span([FileLedger(args.gpu_state, index, args.gpu_total_mib) for index in args.gpus])
    )
    settings = ConsumerSettings.make(
        args.name,
        args.service,
        vram_mib=args.vram_mib,
        load_s=args.load_s,
        work_s=args.work_s,
        preload=args.preload,
        keep_alive_s=None if args.keep_alive_s < 0 else args.keep_alive_s,
        wake_s=args.wake_s,
    )
    consumer = make_consumer(settings, ledger, reactor, args.log)
    port = reactor.listenTCP(args.port, sim_site(consumer), interface="127.0.0.1")
    cast(Any, reactor).addSystemEventTrigger("before", "shutdown", ledger.release, args.name)
    print(f"listening 127.0.0.1:{port.getHost().port}", flush=True)  # type: ignore[attr-defined]
    await Deferred()  # only the first stdout line: a reader may stop reading the pipe


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mgpu.sim``: one consumer, until SIGTERM or SIGINT."""
    react(_serve, (parse_args(argv),))


if __name__ == "__main__":
    main(sys.argv[1:])
