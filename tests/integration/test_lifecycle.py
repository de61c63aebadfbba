"""Load and unload commands with ``stopped_when_unloaded`` (SPEC 9.6), end to end: the
daemon under twistd runs ``tests/integration/service_ctl.py`` as whisper's load and
unload commands, which start and stop a real simulated whisper process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    CONSUMER_BLOCKS,
    HttpClient,
    Stack,
    free_port,
    make_config,
    shared_stacks,
    wait_for,
)
from tests.integration.service_ctl import alive

#: mvoice (2800 MiB + the 256 MiB cushion) and whisper (1500) do not fit together.
CARD_MIB = 4000


async def post(http: HttpClient, kind: str, body: bytes) -> tuple[int, Any]:
    response, content = await http.request(
        "POST", f"/v1/{kind}", body=body, headers={"Content-Type": "application/json"}
    )
    return response.code, content


class StoppedWhenUnloadedTests(TestCase):
    """whisper starts stopped; a request starts it, an eviction for mvoice stops it."""

    timeout = 90

    async def started_stack(self) -> tuple[Stack, Path]:
        await shared_stacks.release()
        stack = Stack.new("mgpu-lifecycle-")
        self.addCleanup(lambda: ensureDeferred(stack.stop()))
        pid_file = stack.workdir / "whisper.pid"
        self.addCleanup(self.kill_leftover, pid_file)
        port = free_port()
        ctl = [sys.executable, "-m", "tests.integration.service_ctl"]
        sim = [sys.executable, "-m", "mgpu.sim", "--name", "whisper", "--service", "whisper",
               "--port", str(port), "--preload"]  # fmt: skip
        async with stack.starting():
            await stack.add_consumers("mvoice")
            config = make_config(
                stack.consumers,
                {"tts": "mvoice", "stt": "whisper"},
                gpu={"source": "none", "total_mib": CARD_MIB},
            )
            config["consumers"]["whisper"] = {
                **json.loads(json.dumps(CONSUMER_BLOCKS["whisper"])),
                "url": f"http://127.0.0.1:{port}",
                "load": {
                    "command": [
                        *ctl,
                        "start",
                        str(pid_file),
                        str(stack.workdir / "whisper.log"),
                        "--",
                        *sim,
                    ],
                    "timeout_s": 20,
                },
                "unload": {"command": [*ctl, "stop", str(pid_file)], "timeout_s": 20},
                "stopped_when_unloaded": True,
            }
            await stack.start(config)
        return stack, pid_file

    @staticmethod
    def kill_leftover(pid_file: Path) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)

    async def whisper(self, http: HttpClient) -> dict[str, Any]:
        entry: dict[str, Any] = (await http.status())["consumers"]["whisper"]
        return entry

    async def test_started_on_demand_stopped_on_eviction(self) -> None:
        stack, pid_file = await self.started_stack()
        http = stack.client()
        self.addCleanup(http.close)

        async def probed_stopped() -> dict[str, Any] | None:
            entry = await self.whisper(http)
            return entry if entry["last_probe"] is not None else None

        entry = await wait_for(probed_stopped, 10, "whisper's first probe")
        self.assertEqual((entry["loaded"], entry["healthy"]), (False, True), entry)
        self.assertIn("stopped", entry["last_error"])
        self.assertFalse(pid_file.exists())

        code, body = await post(http, "stt", b"RIFF fake audio")
        self.assertEqual(code, 200, (body, stack.output()))
        pid = int(pid_file.read_text())
        self.assertTrue(alive(pid))
        entry = await self.whisper(http)
        self.assertEqual((entry["loaded"], entry["healthy"]), (True, True), entry)

        code, body = await post(http, "tts", b'{"text": "hello"}')
        self.assertEqual(code, 200, (body, stack.output()))
        await wait_for(lambda: not alive(pid), 10, "whisper's process to be gone")
        self.assertFalse(pid_file.exists())
        status = await http.status()
        whisper, mvoice = status["consumers"]["whisper"], status["consumers"]["mvoice"]
        self.assertEqual((whisper["loaded"], whisper["healthy"]), (False, True), whisper)
        self.assertIs(mvoice["loaded"], True)
        self.assertGreaterEqual(status["scheduler"]["evictions"], 1)

        async def stopped_after_probe() -> bool:
            entry = await self.whisper(http)
            return entry["healthy"] is True and "stopped" in (entry["last_error"] or "")

        # Probes of the stopped service keep it healthy, with why it does not answer.
        await wait_for(stopped_after_probe, 10, "a probe of the stopped whisper")
