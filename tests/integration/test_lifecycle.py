"""Load and unload commands with ``stopped_when_unloaded`` (SPEC 9.6), end to end: the
daemon under twistd runs ``tests/integration/service_ctl.py`` as whisper's load and
unload commands, which start and stop a real simulated whisper process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from datetime import datetime
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
    sleep,
    wait_for,
)
from tests.integration.service_ctl import alive
from tests.integration.test_operations import _OperationsCase
from tests.integration.test_scheduling import Sim, ledger_owners
from tests.integration.test_scheduling import post as post_kind

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


def event_time(event: Mapping[str, Any]) -> float:
    """An event's ``at`` (ISO 8601 with milliseconds, UTC) as Unix seconds."""
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00")).timestamp()


class IdleUnloadTests(_OperationsCase):
    """mvoice with ``idle_unload_s: 1`` under the real daemon (SPEC 9.6)."""

    async def test_unloaded_after_a_second_unused_and_a_request_resets_the_timer(self) -> None:
        mvoice = Sim("mvoice", "mvoice", 2800, work_s=0.1, load_s=0.05,
                     block={"idle_unload_s": 1})  # fmt: skip
        await self.fresh([mvoice], {"tts": "mvoice"})
        self.assertEqual((await post_kind(self.http, "tts"))[0], 200)
        await sleep(0.6)
        self.assertEqual((await post_kind(self.http, "tts"))[0], 200)
        first, second = await mvoice.work()
        # The second request came before the first one's second of idleness ran out.
        self.assertLess(second["start"], first["end"] + 1.0)

        async def unloaded() -> bool:
            return (await mvoice.state())["loaded"] is False

        await wait_for(unloaded, 3, "mvoice's idle unload")
        entry = (await self.status())["consumers"]["mvoice"]
        self.assertIs(entry["loaded"], False, entry)
        reader = await self.events("?history=50")
        await wait_for(lambda: reader.of_kind("unload"), 5, "the unload event")
        (unload,) = reader.of_kind("unload")
        self.assertEqual((unload["consumer"], unload["reason"]), ("mvoice", "idle"), unload)
        # A second after the last request, not the first (events' times are to the ms).
        idle_for = event_time(unload) - second["end"]
        self.assertGreaterEqual(idle_for, 0.99, (unload, second))
        self.assertLess(idle_for, 2.5, (unload, second))
        self.assertEqual(len(await mvoice.work()), 2)


class PreloadTests(_OperationsCase):
    """Three ``preload: true`` consumers on the 16384 MiB card (cushion 256): the two with
    the highest priorities fit together and load in priority order; the third does not
    fit in what is left, and nothing is evicted for it."""

    async def test_loaded_at_start_in_priority_order_without_evicting(self) -> None:
        def voice(name: str, mib: int, priority: int) -> Sim:
            block = {"preload": True, "priority": priority}
            return Sim(name, "mvoice", mib, work_s=0.1, load_s=0.2, block=block)

        sims = [voice("low", 8000, 1), voice("mid", 4000, 2), voice("high", 6000, 3)]
        await self.fresh(sims, {"tts": "high", "stt": "mid"})
        await wait_for(lambda: self.loaded_as({"high": True, "mid": True}), 5, "the preloads")
        reader = await self.events("?history=50")
        await wait_for(lambda: len(reader.of_kind("load")) >= 2, 5, "the load events")
        loads = reader.of_kind("load")
        self.assertEqual([(e["consumer"], e["reason"]) for e in loads],
                         [("high", "preload"), ("mid", "preload")])  # fmt: skip
        self.assertEqual(reader.of_kind("unload"), [])
        status = await self.status()
        self.assertIs(status["consumers"]["low"]["loaded"], False)
        self.assertEqual(status["scheduler"]["evictions"], 0)
        self.assertEqual(
            {
                name: (await sims[i].state())["loaded"]
                for i, name in enumerate(("low", "mid", "high"))
            },
            {"low": False, "mid": True, "high": True},
        )
        self.assertEqual(ledger_owners(self.stack.gpu_state), {"high": 6000, "mid": 4000})
