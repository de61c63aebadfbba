"""``twistd mgpumanager --demo``: simulated consumers and GPU inside the daemon.

Besides the facade's sequence, ComfyUI's web UI through its native prefix
(SPEC 9.1's "Done when"): its page, its API and its ``/ws`` feed as a browser
uses them, with the ``Host`` and ``Origin`` a browser sends; the browser test
drives a headless Chromium as ``test_dashboard`` does, and is skipped where
there is none.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.harness import (
    Daemon,
    HttpClient,
    RawResponse,
    raw_request,
    shared_stacks,
    start_daemon,
    wait_for,
)
from tests.integration.test_dashboard import REQUIRE_BROWSER, Browser, browser_missing

#: A text-to-image graph: the sampler runs two steps, then one image is saved.
GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"steps": 2, "seed": 7}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}
#: How long the browser may take to show what the page's WebSocket received.
FEED_WAIT_S = 20.0


def browser_request(
    method: str,
    target: str,
    host: str,
    body: object = None,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A request as a browser on ``http://<host>/`` sends it: its ``Host`` and ``Origin``."""
    data = None if body is None else json.dumps(body).encode()
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"Origin: http://{host}",
             "Connection: close"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if data is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (data or b"")


async def start_demo(test: TestCase, *args: str) -> Daemon:
    """A daemon with ``--demo`` (and ``args``) for ``test`` alone, stopped at its cleanup."""
    await shared_stacks.release()  # no other daemon competes for the CPUs
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-demo-"))
    test.addCleanup(shutil.rmtree, workdir, True)
    daemon = await start_daemon(workdir, extra_args=["--demo", *args])
    test.addCleanup(lambda: ensureDeferred(daemon.process.stop()))
    return daemon


class DemoTests(TestCase):
    """The demo, as a new user runs it."""

    timeout = 60

    async def test_demo_sequence(self) -> None:
        """tts, stt, llm, image, tts all succeed; /v1/status counts them and the evictions
        that image then tts forced on the simulated 16 GiB card."""
        daemon = await start_demo(self)
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


class TwoCardDemoTests(TestCase):
    """``--demo --demo-gpus 2``: ComfyUI on a card of its own (SPEC 9.5)."""

    timeout = 60

    async def test_image_and_voice_no_longer_evict_each_other(self) -> None:
        """tts, image, tts on two simulated cards: each consumer loads on its own card and
        nothing is evicted; the status shows both cards and where each consumer runs."""
        daemon = await start_demo(self, "--demo-gpus", "2")
        http = HttpClient(daemon.url)
        self.addCleanup(http.close)
        for kind, payload in (("tts", {"text": "a"}), ("image", {"prompt": {}}),
                              ("tts", {"text": "b"})):  # fmt: skip
            response, body = await http.request("POST", f"/v1/{kind}", json_body=payload,
                                                timeout=30)  # fmt: skip
            self.assertEqual(response.code, 200, f"{kind}: {body[:300]!r}")

        async def both_resident() -> dict[str, Any] | None:
            doc = await http.status()
            used = [card["used_mib"] for card in doc["gpus"]]
            return doc if used[0] >= 2800 and used[1] >= 13000 else None

        doc = await wait_for(both_resident, 10, "mvoice on card 0 and ComfyUI on card 1")
        self.assertEqual([card["index"] for card in doc["gpus"]], [0, 1])
        self.assertEqual(doc["consumers"]["comfyui"]["gpus"], [1])
        self.assertEqual(doc["consumers"]["mvoice"]["gpus"], [0])
        self.assertEqual(doc["gpus"][1]["consumers"], ["comfyui"])
        self.assertEqual(doc["scheduler"]["evictions"], 0, doc["scheduler"])
        self.assertIs(doc["consumers"]["mvoice"]["loaded"], True)


class DemoComfyUITests(TestCase):
    """ComfyUI's web UI under /comfyui in the demo, as a browser uses it."""

    timeout = 90

    async def setUp(self) -> None:  # type: ignore[override]
        self.daemon = await start_demo(self)
        self.host = f"127.0.0.1:{self.daemon.port}"
        self.http = HttpClient(self.daemon.url)
        self.addCleanup(self.http.close)

    async def send(self, method: str, target: str, body: object = None) -> RawResponse:
        return await raw_request(
            self.daemon.port, browser_request(method, target, self.host, body), timeout=20
        )

    async def queue_prompt(self) -> tuple[str, dict[str, Any]]:
        """POST /comfyui/prompt as the page does; its prompt id, and the status before it."""
        before = await self.http.status()
        queued = await self.send("POST", "/comfyui/prompt", {"prompt": GRAPH})
        self.assertEqual(queued.status, 200, (queued.body, self.daemon.process.output()))
        return str(queued.json()["prompt_id"]), before

    async def test_page_api_and_prompt_through_the_broker(self) -> None:
        """/comfyui redirects to /comfyui/, ComfyUI's page (its /ws opened relative to the
        page); /comfyui/object_info; a prompt POSTed with the browser's Origin and Host is
        scheduled once (completed + 1, comfyui's last_used set) and its history appears."""
        bare = await self.send("GET", "/comfyui")
        self.assertEqual((bare.status, bare.header("location")), (301, "/comfyui/"))
        page = await self.send("GET", "/comfyui/")
        self.assertEqual(page.status, 200, page.body[:300])
        self.assertTrue((page.header("content-type") or "").startswith("text/html"))
        html = page.body.decode("utf-8")
        self.assertRegex(html, r"<title>ComfyUI</title>")
        self.assertIn('location.pathname.replace(/\\/$/, "")', html)
        self.assertRegex(html, r"new WebSocket\([^)]*base \+ \"/ws\?clientId=")
        info = await self.send("GET", "/comfyui/object_info")
        self.assertEqual(info.status, 200, info.body[:300])
        self.assertLessEqual({"KSampler", "SaveImage"}, set(info.json()))
        foreign = await raw_request(self.daemon.port, browser_request(
            "GET", "/comfyui/object_info", self.host, headers={"Origin": "http://evil.example"}
        ))  # fmt: skip
        self.assertEqual(foreign.status, 403, "ComfyUI's origin check did not run")

        prompt_id, before = await self.queue_prompt()

        async def released() -> dict[str, Any] | None:
            """The status once the lease is back: last_used is set when it ends, after
            hold_until saw the job's history (completed counts at the answer)."""
            doc = await self.http.status()
            return doc if doc["consumers"]["comfyui"]["last_used"] is not None else None

        self.assertIsNone(before["consumers"]["comfyui"]["last_used"])
        after = await wait_for(released, 20, "the prompt's GPU lease to end")
        self.assertEqual(after["scheduler"]["completed"], before["scheduler"]["completed"] + 1)
        self.assertEqual((after["scheduler"]["failed"], after["scheduler"]["holder"]), (0, None))
        history = await self.send("GET", f"/comfyui/history/{prompt_id}")
        self.assertEqual(history.status, 200, history.body[:300])
        entry = history.json()[prompt_id]
        self.assertIs(entry["status"]["completed"], True)
        [image] = entry["outputs"]["9"]["images"]
        self.assertTrue(image["filename"].endswith(".png"), image)

    async def test_page_in_a_browser_hears_its_feed(self) -> None:
        """A headless Chromium opening /comfyui lands on /comfyui/, whose WebSocket (through
        the broker's tunnel) receives ComfyUI's status message, then a queued prompt's
        progress up to its execution_success."""
        why = browser_missing()
        if why:
            if REQUIRE_BROWSER:
                self.fail(f"headless Chromium {why}, and MGPU_REQUIRE_BROWSER is set")
            raise SkipTest(f"headless Chromium {why}; set MGPU_REQUIRE_BROWSER to fail instead")
        workdir = Path(tempfile.mkdtemp(prefix="mgpu-demo-browser-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        browser = await deferToThread(Browser, workdir)
        self.addCleanup(deferToThread, browser.quit)
        await deferToThread(browser.open, f"{self.daemon.url}/comfyui")
        self.assertEqual(browser.driver.current_url, f"{self.daemon.url}/comfyui/")
        self.assertEqual(browser.driver.title, "ComfyUI")
        shown = await deferToThread(feed_until, browser, lambda m: m["type"] == "status")
        status = next(m for m in shown if m["type"] == "status")
        self.assertIn("queue_remaining", json.dumps(status["data"]))
        prompt_id, _ = await self.queue_prompt()

        def succeeded(message: dict[str, Any]) -> bool:
            data = message["data"]
            return message["type"] == "execution_success" and data["prompt_id"] == prompt_id

        shown = await deferToThread(feed_until, browser, succeeded)
        kinds = [m["type"] for m in shown if m["data"].get("prompt_id") == prompt_id]
        self.assertEqual(kinds[0], "execution_start", kinds)
        self.assertIn("progress", kinds)


def feed_until(browser: Browser, wanted: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The messages the page's feed shows, once one of them is ``wanted`` (blocking, bounded)."""
    deadline = time.monotonic() + FEED_WAIT_S
    while True:
        text = browser.run("return document.getElementById('feed').textContent")
        messages = [json.loads(line) for line in text.split("\n")[1:] if line.strip()]
        if any(wanted(m) for m in messages):
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"the page's feed showed no such message: {text[-2000:]!r}\n"
                                 f"console: {browser.console()}")  # fmt: skip
        time.sleep(0.1)
