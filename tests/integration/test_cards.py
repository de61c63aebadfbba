"""Two cards end to end (SPEC 9.5): the daemon under ``twistd`` reads both through the
stand-in nvidia-smi (``-i 0`` and ``-i 1``); simulated consumer processes hold memory
on their own cards: mvoice on card 0, ComfyUI on card 1, a vLLM on both.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from mgpu.sim.consumers import VLLM_MODEL
from tests.integration.harness import (
    CONSUMER_BLOCKS,
    FAKE_GPU_BASE_USED_MIB,
    FAKE_GPU_NAME,
    HttpClient,
    Stack,
    read_gpu_state,
    shared_stacks,
    sim_log,
    wait_for,
)
from tests.integration.test_scheduling import post, smi_wrapper

CARD_MIB = 16384
#: Each card of the vLLM holds this much: with mvoice (2800) on card 0 or ComfyUI
#: (13000) on card 1 it does not fit, so its load makes room on both cards.
VLLM_MIB = 14000
WORK_S = 1.5

VLLM_BLOCK: dict[str, Any] = {
    "health": {"method": "GET", "path": "/health"},
    "paths": {"llm": {"method": "POST", "path": "/v1/chat/completions"}},
    "vram_resident_mib": VLLM_MIB,
    "unload": {"method": "POST", "path": "/sleep?level=1"},
    "load": {"method": "POST", "path": "/wake_up"},
    "timeout_s": 60,
    "gpus": [0, 1],
}
CHAT = json.dumps({"model": VLLM_MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


def write_two_cards(path: Path) -> None:
    """The stand-in nvidia-smi's state: two 16 GiB cards, nothing of the consumers yet."""
    gpus = [{"index": i, "name": FAKE_GPU_NAME, "total_mib": CARD_MIB,
             "used_mib": FAKE_GPU_BASE_USED_MIB} for i in (0, 1)]  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": gpus, "fail": None}), "utf-8")
    os.replace(tmp, path)


async def _two_card_stack() -> Stack:
    stack = Stack.new("mgpu-cards-")
    write_two_cards(stack.gpu_state)
    work = ["--work-s", str(WORK_S)]
    async with stack.starting():
        await stack.add_consumers(
            "mvoice", "comfyui", "vllm",
            args={
                "mvoice": ["--gpus", "0", *work],
                "comfyui": ["--gpus", "1", *work],
                "vllm": ["--gpus", "0,1", "--vram-mib", str(VLLM_MIB), "--work-s", "0.3"],
            },
        )  # fmt: skip
        blocks: dict[str, dict[str, Any]] = {
            "mvoice": {**CONSUMER_BLOCKS["mvoice"], "gpus": [0]},
            "comfyui": {**CONSUMER_BLOCKS["comfyui"], "gpus": [1]},
            "vllm": VLLM_BLOCK,
        }
        for name, block in blocks.items():
            block["url"] = stack.consumers[name].url
            block.pop("can_coexist_with", None)
        config = {
            "gpu": {
                "source": "nvidia-smi",
                "nvidia_smi": str(smi_wrapper(stack.workdir)),
                "poll_interval_s": 0.3,
                "devices": [0, 1],
            },
            "health": {"interval_s": 0.5, "timeout_s": 1},
            "routing": {"tts": "mvoice", "image": "comfyui", "llm": "vllm"},
            "consumers": blocks,
        }
        await stack.start(config)
    return stack


class TwoCardTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("two-cards", _two_card_stack)
        self.http: HttpClient = self.stack.client()
        self.addCleanup(self.http.close)
        await wait_for(self.settled, 15, "healthy consumers and two readings")

    async def settled(self) -> dict[str, Any] | None:
        doc = await self.http.status()
        healthy = all(c["healthy"] for c in doc["consumers"].values())
        idle = doc["scheduler"]["running"] == 0 and doc["scheduler"]["queued"] == 0
        read = all(card["ok"] for card in doc["gpus"])
        return doc if healthy and idle and read else None

    async def work(self, name: str, since: float) -> dict[str, Any]:
        """``name``'s one work entry begun after ``since`` (wall time, the consumers' clock),
        once it has ended (ComfyUI answers its prompt at once and works on)."""

        async def ended() -> dict[str, Any] | None:
            log = await sim_log(self.stack.consumers[name])
            [entry] = [e for e in log if e["start"] >= since]
            return entry if entry["end"] is not None else None

        return await wait_for(ended, 10, f"{name}'s work to end")

    async def test_status_reads_both_cards(self) -> None:
        """gpus[] has both cards, each read with -i and showing its own consumers' memory;
        gpu stays the first card; each consumer says where it runs."""
        doc = await self.http.status()
        self.assertEqual([card["index"] for card in doc["gpus"]], [0, 1])
        self.assertEqual(doc["gpu"]["index"], 0)
        state = read_gpu_state(self.stack.gpu_state)
        in_file = {gpu["index"]: gpu["used_mib"] for gpu in state["gpus"]}

        async def current() -> bool:
            doc = await self.http.status()
            return {c["index"]: c["used_mib"] for c in doc["gpus"]} == in_file

        await wait_for(current, 5, "both cards' readings to follow the state file")
        doc = await self.http.status()
        self.assertEqual(
            {name: c["gpus"] for name, c in doc["consumers"].items()},
            {"mvoice": [0], "comfyui": [1], "vllm": [0, 1]},
        )
        self.assertEqual(doc["gpus"][1]["consumers"], ["comfyui", "vllm"])

    async def test_consumers_on_different_cards_run_at_once(self) -> None:
        """A tts (mvoice, card 0) and an image (ComfyUI, card 1) sent together compute at the
        same time: each card has its own lease."""
        since = time.time()
        answers = await both(post(self.http, "tts"), post(self.http, "image"))
        self.assertEqual([code for code, _ in answers], [200, 200], answers)
        tts, image = await self.work("mvoice", since), await self.work("comfyui", since)
        self.assertLess(max(tts["start"], image["start"]), min(tts["end"], image["end"]))

    async def test_two_card_consumer_waits_for_both(self) -> None:
        """The vLLM on cards 0 and 1 asks while ComfyUI computes on card 1: it takes card 0
        and waits for card 1 (status shows it), starts once ComfyUI's job has ended, and
        has made room on both cards: mvoice evicted from card 0, ComfyUI from card 1."""
        self.assertEqual((await post(self.http, "tts"))[0], 200)  # mvoice resident on card 0
        since = time.time()
        image: Deferred[tuple[int, Any]] = ensureDeferred(post(self.http, "image"))

        async def computing() -> bool:
            return bool((await self.http.status())["gpus"][1]["holder"] == "comfyui")

        await wait_for(computing, 10, "ComfyUI to hold card 1")
        llm = ensureDeferred(
            self.http.request("POST", "/v1/llm", body=CHAT,
                              headers={"Content-Type": "application/json"}, timeout=30)
        )  # fmt: skip

        async def waiting() -> dict[str, Any] | None:
            doc = await self.http.status()
            holders = [card["holder"] for card in doc["gpus"]]
            return doc if holders == ["vllm", "comfyui"] else None

        doc = await wait_for(waiting, 10, "the vLLM to hold card 0 and wait for card 1")
        self.assertEqual(doc["gpus"][1]["queued"], 1)
        self.assertEqual(doc["consumers"]["vllm"]["queued"], 1)
        self.assertEqual((await image)[0], 200)
        response, _ = await llm
        self.assertEqual(response.code, 200)
        drawn, chat = await self.work("comfyui", since), await self.work("vllm", since)
        self.assertGreaterEqual(chat["start"], drawn["end"])
        doc = await self.http.status()
        loaded = {name: c["loaded"] for name, c in doc["consumers"].items()}
        self.assertEqual(loaded, {"mvoice": False, "comfyui": False, "vllm": True})
        assert self.stack.daemon is not None
        log = self.stack.daemon.process.stdout()
        self.assertRegex(log, r"evict for vllm \(needs \d+ MiB on GPU 0\): .* victim mvoice")
        self.assertRegex(log, r"evict for vllm \(needs \d+ MiB on GPU 1\): .* victim comfyui")
        owners = read_gpu_state(self.stack.gpu_state)["owners"]
        self.assertEqual((owners["0"].get("vllm"), owners["1"].get("vllm")), (VLLM_MIB,) * 2)


async def both(*calls: Any) -> list[Any]:
    started = [ensureDeferred(call) for call in calls]
    return [await d for d in started]
