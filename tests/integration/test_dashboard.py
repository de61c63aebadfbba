"""The dashboard at ``/`` (SPEC section 8), in a real headless Chromium against a real daemon.

The browser is driven through Selenium with Debian's ``chromium`` and
``chromedriver`` (never a downloaded one: the driver's path is given, so
Selenium Manager does not run). Selenium blocks, so every browser call runs in
a thread of the reactor's pool and every wait in it is bounded; the reactor
meanwhile drives the harness. Without ``chromedriver`` the browser test is
skipped, unless ``MGPU_REQUIRE_BROWSER`` is set (CI), where it fails instead.

The stack: the stand-in nvidia-smi's 24 GiB card with 3000 MiB held by
others, ollama (6000 MiB, manages its own memory) and comfyui (13000 MiB)
resident, mvoice (2800 MiB) not loaded: 2564 MiB free, so a tts request after
an image request must evict comfyui (ollama is never evicted).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.harness import (
    FAKE_GPU_NAME,
    HttpClient,
    Stack,
    get,
    make_config,
    raw_request,
    request_bytes,
    shared_stacks,
    smi_gpu,
    token_auth,
    write_gpu_state,
)

CHROMIUM = os.environ.get("MGPU_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MGPU_CHROMEDRIVER", "/usr/bin/chromedriver")
#: Set (CI): a missing browser fails the test instead of skipping it.
REQUIRE_BROWSER = bool(os.environ.get("MGPU_REQUIRE_BROWSER"))

#: Bounds on what the browser waits for.
PAGE_LOAD_S = 20.0
WAIT_S = 20.0

CONSUMERS = ("mvoice", "ollama", "comfyui")
TOKEN = "dashboard-test-token"
BODIES = {"tts": b'{"text": "hello"}', "image": b'{"prompt": {"1": {"class_type": "KSampler"}}}'}

#: What the page shows, read in one script: the test's view of the dashboard.
SNAPSHOT_JS = """
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.textContent : null; };
return {
  ready: document.body.dataset.ready === "true",
  marker: window.__mgpuTestMarker || null,
  conn: document.getElementById("conn").dataset.state,
  gpu: text(document, "#gpu-name"),
  memUsed: text(document, "#mem-used"),
  notice: document.getElementById("gpu-notice").hidden ? null : text(document, "#gpu-notice"),
  cards: [...document.querySelectorAll("#consumers [data-consumer]")].map((c) => ({
    name: c.dataset.consumer, state: text(c, ".state"), loaded: text(c, ".loaded"),
    inFlight: text(c, ".in-flight"), queued: text(c, ".queued"),
    lastUsed: text(c, ".last-used"), holder: c.classList.contains("holder"),
  })),
  segments: [...document.querySelectorAll("#mem-bar .seg")].map((s) => ({
    consumer: s.dataset.consumer || null, other: s.classList.contains("other"),
    width: s.getBoundingClientRect().width,
  })),
  stats: Object.fromEntries([...document.querySelectorAll("#stats [data-stat]")].map(
    (s) => [s.dataset.stat, text(s, ".value")])),
  events: [...document.querySelectorAll("#events li")].map((li) => ({
    id: li.dataset.id, kind: li.dataset.kind, time: text(li, "time"), summary: text(li, ".summary"),
  })),
};
"""

Snapshot = dict[str, Any]


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    missing = [p for p in (CHROMEDRIVER, CHROMIUM) if not Path(p).is_file()]
    return f"not installed: {', '.join(missing)}" if missing else None


class Browser:
    """One headless Chromium session in a fresh profile; blocking calls, run in a thread."""

    def __init__(self, log_dir: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="mgpu-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            f"--user-data-dir={self.profile}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(
            executable_path=CHROMEDRIVER, log_output=str(log_dir / "chromedriver.log")
        )
        try:
            self.driver = webdriver.Chrome(service=service, options=options)
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(PAGE_LOAD_S)
        self.driver.set_script_timeout(WAIT_S)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def snapshot(self) -> Snapshot:
        result: Snapshot = self.driver.execute_script(SNAPSHOT_JS)
        return result

    def run(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def wait(
        self, what: str, check: Callable[[Snapshot], bool], timeout: float = WAIT_S
    ) -> Snapshot:
        """Read the page until ``check`` holds; fail after ``timeout`` seconds, showing the page."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.snapshot()
            if check(snap):
                return snap
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the dashboard did not show {what} within {timeout:g} s.\n"
                    f"page: {snap}\nconsole: {self.console()}"
                )
            time.sleep(0.1)

    def console(self) -> list[dict[str, Any]]:
        """The browser's console entries since the last call."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")
        return entries

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


async def dashboard_stack() -> Stack:
    """ollama and comfyui resident, mvoice not, on the 24 GiB card with 3000 MiB taken."""
    stack = Stack.new("mgpu-dash-")
    async with stack.starting():
        write_gpu_state(stack.gpu_state, used_mib=3000)
        await stack.add_consumers(
            *CONSUMERS,
            args={
                "mvoice": ["--work-s", "0.1", "--load-s", "0.05"],
                "ollama": ["--preload", "--keep-alive-s", "-1"],
                "comfyui": ["--preload", "--work-s", "0.1"],
            },
        )
        config = make_config(
            stack.consumers,
            {"tts": "mvoice", "llm": "ollama", "image": "comfyui"},
            gpu=smi_gpu(0.3),
            health={"interval_s": 0.5, "timeout_s": 1},
        )
        await stack.start(config)
    return stack


async def token_stack() -> Stack:
    """mvoice alone behind a daemon that requires ``TOKEN``."""
    stack = Stack.new("mgpu-dash-auth-")
    async with stack.starting():
        await stack.add_consumers("mvoice")
        config = make_config(
            stack.consumers,
            {"tts": "mvoice"},
            gpu=smi_gpu(0.3),
            health={"interval_s": 0.5, "timeout_s": 1},
            auth=token_auth(stack.workdir, TOKEN),
        )
        await stack.start(config)
    return stack


def by_name(snap: Snapshot) -> dict[str, dict[str, Any]]:
    return {card["name"]: card for card in snap["cards"]}


def segment_names(snap: Snapshot) -> list[str]:
    return sorted(s["consumer"] for s in snap["segments"] if s["consumer"])


def evict_index(snap: Snapshot, victim: str, target: str) -> int | None:
    """The position of the row that says ``victim`` was evicted for ``target``, if any."""
    for i, event in enumerate(snap["events"]):
        if event["kind"] == "evict" and f"evicted {victim} for {target}" in event["summary"]:
            return i
    return None


class DashboardTests(TestCase):
    """The page as served, and as a browser shows it while the scheduler works."""

    timeout = 120

    stack: Stack

    async def start(self, build: Callable[[], Awaitable[Stack]]) -> Stack:
        """A stack for this test alone (the live test changes what is resident)."""
        await shared_stacks.release()  # one daemon at a time on this machine
        self.stack = stack = await build()
        self.addCleanup(lambda: ensureDeferred(stack.stop()))
        return stack

    async def browser(self) -> Browser:
        """A fresh headless Chromium, quit at cleanup; skipped or failed where there is none."""
        why = browser_missing()
        if why:
            if REQUIRE_BROWSER:
                self.fail(f"headless Chromium {why}, and MGPU_REQUIRE_BROWSER is set")
            raise SkipTest(f"headless Chromium {why}; set MGPU_REQUIRE_BROWSER to fail instead")
        browser = await deferToThread(Browser, self.stack.workdir)
        self.addCleanup(deferToThread, browser.quit)
        return browser

    async def post(self, http: HttpClient, kind: str) -> None:
        """``POST /v1/<kind>``; it must succeed."""
        response, body = await http.request(
            "POST",
            f"/v1/{kind}",
            body=BODIES[kind],
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        self.assertEqual(response.code, 200, (kind, body[:300], self.stack.output()))

    async def test_page_served_self_contained(self) -> None:
        """``GET /`` answers 200 text/html under a strict Content-Security-Policy, and the
        page names no external URL: no http:// or https:// anywhere, so no src or href."""
        stack = await self.start(dashboard_stack)
        response = await raw_request(stack.port, get("/"))
        self.assertEqual(response.status, 200, response.body[:300])
        self.assertTrue((response.header("content-type") or "").startswith("text/html"))
        self.assertIn("default-src 'none'", response.header("content-security-policy") or "")
        html = response.body.decode("utf-8")
        self.assertIn("<script>", html)
        self.assertIn('id="consumers"', html)
        self.assertEqual(re.findall(r"https?://", html), [])
        self.assertEqual(re.findall(r"""(?:src|href)\s*=\s*["']?\s*//""", html), [])
        self.assertLess(len(html.splitlines()), 450, "the dashboard is meant to stay small")

    async def test_live_page_follows_an_eviction(self) -> None:
        """A browser shows a card per consumer with its state, a memory segment per loaded
        consumer and the scheduler counters; after image then tts, without a reload, the
        page shows comfyui's eviction for mvoice, newest first, one eviction and mvoice in
        comfyui's place in the memory bar; after the event stream reconnects, no event shows
        twice and the next eviction still arrives; the console shows no error."""
        stack = await self.start(dashboard_stack)
        browser = await self.browser()
        http = stack.client()
        self.addCleanup(http.close)
        await deferToThread(browser.open, f"http://127.0.0.1:{stack.port}/")

        # Before: every consumer probed, ollama and comfyui resident, nothing evicted.
        def first_state(snap: Snapshot) -> bool:
            cards = by_name(snap)
            return (
                snap["ready"]
                and snap["conn"] == "live"
                and set(cards) == set(CONSUMERS)
                and all(card["state"] == "healthy" for card in cards.values())
                and cards["mvoice"]["loaded"] == "not loaded"
                and segment_names(snap) == ["comfyui", "ollama"]
            )

        snap = await deferToThread(
            browser.wait, "every consumer healthy, two resident", first_state
        )
        self.assertEqual(len(snap["cards"]), len(CONSUMERS), snap["cards"])
        cards = by_name(snap)
        self.assertEqual(cards["ollama"]["loaded"], "loaded")
        self.assertEqual(cards["comfyui"]["loaded"], "loaded")
        for card in cards.values():
            self.assertEqual((card["inFlight"], card["queued"]), ("0", "0"), card)
            self.assertFalse(card["holder"], card)
        self.assertIn(FAKE_GPU_NAME, snap["gpu"])
        self.assertIn("nvidia-smi", snap["gpu"])
        self.assertIsNone(snap["notice"])
        for segment in snap["segments"]:
            self.assertGreater(segment["width"], 0, segment)
        self.assertEqual(len(snap["segments"]), 3, "ollama, comfyui and the others' 3000 MiB")
        self.assertTrue(snap["segments"][-1]["other"], snap["segments"])
        doc = await http.status()
        self.assertEqual(doc["gpu"]["used_mib"], 22000, doc["gpu"])
        self.assertEqual(snap["memUsed"], "21.5 / 24.0 GiB")
        self.assertEqual(snap["stats"]["evictions"], "0", snap["stats"])
        self.assertEqual(snap["stats"]["holder"], "none", snap["stats"])
        self.assertIsNone(evict_index(snap, "comfyui", "mvoice"), snap["events"])
        await deferToThread(browser.run, "window.__mgpuTestMarker = 'same page';")

        # comfyui runs, then mvoice needs room: comfyui is evicted.
        for kind in ("image", "tts"):
            await self.post(http, kind)

        def evicted(snap: Snapshot) -> bool:
            cards = by_name(snap)
            return (
                evict_index(snap, "comfyui", "mvoice") is not None
                and any(e["summary"].startswith("loaded mvoice") for e in snap["events"])
                and snap["stats"]["evictions"] == "1"
                and cards["comfyui"]["loaded"] == "not loaded"
                and cards["mvoice"]["loaded"] == "loaded"
                and segment_names(snap) == ["mvoice", "ollama"]
                and cards["mvoice"]["lastUsed"] != "never"
            )

        snap = await deferToThread(browser.wait, "comfyui evicted for mvoice", evicted)
        self.assertEqual(snap["marker"], "same page", "the page was reloaded")
        self.assertEqual(snap["conn"], "live")
        index = evict_index(snap, "comfyui", "mvoice")
        assert index is not None
        row = snap["events"][index]
        self.assertRegex(row["summary"], r"freed 13,000 MiB in [0-9.]+ s")
        self.assertRegex(row["time"], r"^\d\d:\d\d:\d\d$")
        loads = [
            i
            for i, e in enumerate(snap["events"])
            if e["kind"] == "load" and e["summary"].startswith("loaded mvoice")
        ]
        self.assertEqual(len(loads), 1, snap["events"])
        self.assertLess(loads[0], index, "newest first: mvoice's load came after the eviction")
        self.assertEqual(snap["stats"]["loads"], "1", snap["stats"])
        cards = by_name(snap)
        self.assertRegex(cards["mvoice"]["lastUsed"], r"^(just now|\d+ s ago)$")
        self.assertRegex(cards["comfyui"]["lastUsed"], r"^(just now|\d+ s ago)$")
        self.assertEqual(cards["ollama"]["lastUsed"], "never")
        doc = await http.status()
        self.assertEqual(doc["scheduler"]["evictions"], 1, doc["scheduler"])

        # The page's own reconnect (as after a dropped stream) replays the history: no
        # event is shown twice, and the next eviction (mvoice for comfyui) still arrives.
        await deferToThread(browser.run, "connect();")
        await self.post(http, "image")

        def evicted_again(snap: Snapshot) -> bool:
            return (
                evict_index(snap, "mvoice", "comfyui") is not None
                and snap["stats"]["evictions"] == "2"
            )

        snap = await deferToThread(browser.wait, "mvoice evicted for comfyui", evicted_again)
        self.assertEqual(snap["marker"], "same page", "the page was reloaded")
        ids = [e["id"] for e in snap["events"]]
        self.assertEqual(len(ids), len(set(ids)), f"an event shown twice: {snap['events']}")
        newer, older = (
            evict_index(snap, "mvoice", "comfyui"),
            evict_index(snap, "comfyui", "mvoice"),
        )
        assert newer is not None and older is not None
        self.assertLess(newer, older, "newest first")
        errors = [
            e for e in await deferToThread(browser.console) if e.get("level") in ("SEVERE", "ERROR")
        ]
        self.assertEqual(errors, [], "the page logged errors")

    async def test_token_basic_credentials(self) -> None:
        """With a token, a browser that gave Basic credentials for ``/`` (the token as the
        password) gets the status and the event stream with them: the page goes live. Once
        the token changes (a reload), the page says it is unauthorized."""
        stack = await self.start(token_stack)
        browser = await self.browser()
        await deferToThread(browser.open, f"http://operator:{TOKEN}@127.0.0.1:{stack.port}/")

        def live(snap: Snapshot) -> bool:
            cards = by_name(snap)
            return (
                snap["ready"]
                and snap["conn"] == "live"
                and list(cards) == ["mvoice"]
                and cards["mvoice"]["state"] == "healthy"
            )

        await deferToThread(browser.wait, "the page live with the token", live)
        (stack.workdir / "token").write_text("another-token\n", "utf-8")
        response = await raw_request(
            stack.port,
            request_bytes("POST", "/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}),
        )
        self.assertEqual(response.status, 200, response.body[:300])
        await deferToThread(
            browser.wait, "unauthorized", lambda snap: snap["conn"] == "unauthorized"
        )
