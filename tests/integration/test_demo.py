"""``twistd mgpumanager --demo``: simulated consumers and GPU inside the daemon."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.harness import HttpClient, shared_stacks, start_daemon, wait_for


class DemoTests(TestCase):
    """The demo, as a new user runs it."""

    timeout = 60

    async def test_demo_sequence(self) -> None:
        """tts, stt, llm, image, tts all succeed; /v1/status counts them and the evictions
        that image then tts forced on the simulated 16 GiB card."""
        await shared_stacks.release()  # no other daemon competes for the CPUs
        workdir = Path(tempfile.mkdtemp(prefix="mgpu-demo-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        daemon = await start_daemon(workdir, extra_args=["--demo"])
        self.addCleanup(lambda: ensureDeferred(daemon.process.stop()))
        http = HttpClient(daemon.url)
        self.addCleanup(http.close)
        steps: list[tuple[str, dict[str, object] | bytes]] = [
            ("tts", {"text": "hello"}),
            ("stt", b"RIFF....WAVEfmt audio bytes"),
            ("llm", {"model": "llama3", "prompt": "hi"}),
            ("image", {"prompt": {}}),
            ("tts", {"text": "again"}),
        ]
        for kind, payload in steps:
            if isinstance(payload, bytes):
                response, body = await http.request("POST", f"/v1/{kind}", body=payload, timeout=30)
            else:
                response, body = await http.request(
                    "POST", f"/v1/{kind}", json_body=payload, timeout=30
                )
            self.assertTrue(
                200 <= response.code < 300,
                f"{kind}: {response.code} {body[:300]!r}\n{daemon.process.output()}",
            )
        doc = await http.status()
        self.assertEqual(doc["gpu"]["source"], "sim")
        self.assertIs(doc["gpu"]["ok"], True)
        self.assertEqual(set(doc["consumers"]), {"mvoice", "whisper", "ollama", "comfyui"})
        self.assertGreaterEqual(doc["scheduler"]["completed"], 5, doc["scheduler"])
        self.assertEqual(doc["scheduler"]["failed"], 0, doc["scheduler"])
        # comfyui (13000 MiB) cannot stay resident beside mvoice (2800) and whisper
        # (1500): the last tts must have unloaded it, and it shows unloaded.
        # tts evicts comfyui; image reclaims Ollama's model (kept 30 s after llm) and
        # evicts mvoice; the last tts evicts comfyui again.
        self.assertEqual(doc["scheduler"]["evictions"], 4, doc["scheduler"])
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], False, doc["consumers"])
        self.assertIn("victim comfyui", daemon.process.output())
        self.assertIn("reclaim for comfyui", daemon.process.output())
        self.assertEqual(doc["consumers"]["ollama"]["models"], [], doc["consumers"]["ollama"])

        async def mvoice_memory_shown() -> bool:  # the next GPU reading, at most 1 s away
            memory = (await http.status())["consumers"]["mvoice"]["memory"]
            return (memory["used_mib"], memory["source"]) == (2800, "port")

        await wait_for(mvoice_memory_shown, 5, "mvoice's 2800 MiB attributed by port")
        doc = await http.status()
        self.assertEqual(doc["consumers"]["mvoice"]["learned_mib"], 2800)
        self.assertEqual((doc["gpu"]["other_mib"], doc["gpu"]["other"]), (0, []), doc["gpu"])
