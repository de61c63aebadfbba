"""What holds the card, end to end (SPEC 9.3): real consumer processes, the stand-in
nvidia-smi listing their pids, the daemon under twistd attributing them by port, and
learned sizes kept across a restart in ``state_dir``."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    Stack,
    make_config,
    shared_stacks,
    smi_gpu,
    wait_for,
)


def _state_file(stack: Stack) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stack.gpu_state.read_text("utf-8"))
    return data


class MemoryTests(TestCase):
    """mvoice typed at 2000 MiB but holding 2800; a stranger holding 700."""

    timeout = 90

    async def started_stack(self) -> Stack:
        await shared_stacks.release()
        stack = Stack.new("mgpu-memory-")
        self.addCleanup(lambda: ensureDeferred(stack.stop()))
        async with stack.starting():
            await stack.add_consumers("mvoice", args={"mvoice": ["--preload"]})
            state = _state_file(stack)
            state["processes"] = {"0": [{"pid": 1, "used_mib": 700}]}  # init: no consumer
            stack.gpu_state.write_text(json.dumps(state), "utf-8")
            self.state_dir = stack.workdir / "state"
            self.config = make_config(
                stack.consumers,
                {"tts": "mvoice"},
                gpu=smi_gpu(0.3),
                overrides={"mvoice": {"vram_resident_mib": 2000}},
                state_dir=str(self.state_dir),
            )
            await stack.start(self.config)
        return stack

    async def status(self, stack: Stack) -> dict[str, Any]:
        http = stack.client()
        try:
            return await http.status()
        finally:
            await http.close()

    async def test_attributed_learned_and_kept(self) -> None:
        """The consumer's own pid holds its memory, by port; the other pid is 'other';
        the learned size is written to state_dir and is there at once after a restart."""
        stack = await self.started_stack()
        mvoice_pid = stack.consumers["mvoice"].process.pid

        async def attributed() -> bool:
            entry = (await self.status(stack))["consumers"]["mvoice"]
            return entry["memory"]["used_mib"] == 2800 and entry["learned_mib"] == 2800

        await wait_for(attributed, 10, "mvoice's memory attributed and learned")
        doc = await self.status(stack)
        entry = doc["consumers"]["mvoice"]
        self.assertEqual(entry["memory"]["source"], "port")
        self.assertIn(mvoice_pid, entry["memory"]["pids"])
        self.assertIs(entry["loaded"], True)
        self.assertEqual(doc["gpu"]["other_mib"], 700)
        self.assertEqual([(p["pid"], p["used_mib"]) for p in doc["gpu"]["other"]], [(1, 700)])
        kept = json.loads((self.state_dir / "learned.json").read_text("utf-8"))
        self.assertEqual(kept, {"learned_mib": {"mvoice": 2800}})
        self.assertIn("more than its vram_resident_mib of 2000", stack.output())

        assert stack.daemon is not None
        await stack.daemon.process.stop()
        await stack.start(self.config)
        doc = await self.status(stack)
        self.assertEqual(doc["consumers"]["mvoice"]["learned_mib"], 2800)

    async def test_killed_consumer_is_not_loaded(self) -> None:
        """A consumer killed outright is unhealthy and, its process gone, not loaded."""
        stack = await self.started_stack()
        await wait_for(lambda: self._loaded(stack, True), 10, "mvoice loaded by its memory")
        consumer = stack.consumers["mvoice"]
        os.kill(consumer.process.pid, 9)
        await wait_for(lambda: self._loaded(stack, False), 10, "mvoice seen gone")
        entry = (await self.status(stack))["consumers"]["mvoice"]
        self.assertIs(entry["healthy"], False)
        self.assertEqual(entry["memory"]["pids"], [])

    async def _loaded(self, stack: Stack, want: bool) -> bool:
        entry = (await self.status(stack))["consumers"]["mvoice"]
        return bool(entry["loaded"] is want)
