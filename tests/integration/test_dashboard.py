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
  loading: getComputedStyle(document.getElementById("loading")).display !== "none",
  segments: [...document.querySelectorAll("#mem-bar .seg:not(.free)")].map((s) => ({
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

#: A status document with every field of SPEC 9.3 and 9.4, for 20 consumers, answered by a
#: stand-in ``fetch`` in place of the daemon's (which may not have the fields yet), then
#: drawn at once. ``window.__doc`` is what the stand-in answers; the test may change it.
STATUS_STUB_JS = """
const t = (s) => new Date(Date.now() + s * 1000).toISOString();
const base = {healthy: true, loaded: true, last_probe: t(-1), last_error: null, vram_managed: false,
  last_used: null, in_flight: 0, queued: 0};
const consumers = {
  comfyui: {...base, vram_resident_mib: 13000, learned_mib: 13400,
    memory: {used_mib: 13010, pids: [1234], source: "port"}},
  ollama: {...base, vram_resident_mib: 6000, vram_managed: true, learned_mib: 6000,
    memory: {used_mib: 5200, pids: [2222, 2223], source: "unit"},
    models: [{name: "llama3.1:8b", size_vram_mib: 4900, expires_at: t(252)},
             {name: "nomic-embed-text", size_vram_mib: 300, expires_at: "2318-01-01T00:00:00Z"}]},
  whisper: {...base, vram_resident_mib: 1500, learned_mib: null,
    memory: {used_mib: null, pids: [], source: "none"}},
  mvoice: {...base, loaded: false, vram_resident_mib: 2800, learned_mib: 3010,
    memory: {used_mib: 0, pids: [], source: "pid_file"}},
  tiny: {...base, vram_resident_mib: 300,
    memory: {used_mib: 310, pids: [5, 6, 7, 8], source: "unit"}},
};
for (let i = 0; i < 15; i++) {
  consumers["svc-" + i] = {...base, loaded: false, vram_resident_mib: 500,
    memory: {used_mib: 0, pids: [], source: "port"}};
}
const other = [[4005, "b", 40], [4003, null, 2500], [4001, "Xorg", 420], [4007, "d", 20],
  [4002, "firefox", 180], [4004, "a", 50], [4006, "c", 30],
].map(([pid, name, used_mib]) => ({pid, name, used_mib}));
window.__doc = {
  gpu: {source: "nvidia-smi", ok: true, error: null, index: 0, name: "Stub GPU", total_mib: 24564,
    used_mib: 23260, free_mib: 1304, read_at: t(0), other_mib: 3240, other},
  consumers, scheduler: {queued: 0, running: 0, holder: null, completed: 0, failed: 0, rejected: 0,
    evictions: 0, loads: 0}};
window.fetch = async () => new Response(JSON.stringify(window.__doc),
  {status: 200, headers: {"content-type": "application/json"}});
poll();
"""

#: The status document of a daemon from before SPEC 9.3 and 9.4: none of the new fields.
OLD_DOC_JS = """
const doc = JSON.parse(JSON.stringify(window.__doc));
delete doc.gpu.other_mib;
delete doc.gpu.other;
for (const c of Object.values(doc.consumers)) {
  delete c.memory;
  delete c.learned_mib;
  delete c.models;
}
window.__doc = doc;
poll();
"""

#: What the page shows of memory: the bar's segments, the cards' memory, the other processes.
MEMORY_JS = """
const norm = (t) => (t === null || t === undefined ? null : t.replace(/\\u00a0/g, " "));
const text = (root, sel) => {
  const e = root.querySelector(sel);
  return e && !e.closest("[hidden]") ? norm(e.textContent) : null;
};
const cells = (row) => [...row.children].map((x) => norm(x.textContent));
const bar = document.getElementById("mem-bar").getBoundingClientRect().width;
return {
  segments: [...document.querySelectorAll("#mem-bar .seg")].map((s) => ({
    consumer: s.dataset.consumer || null, classes: s.className.split(" "),
    label: norm(s.textContent),
    title: norm(s.title), aria: norm(s.getAttribute("aria-label")), role: s.getAttribute("role"),
    share: s.getBoundingClientRect().width / bar,
  })),
  cards: Object.fromEntries([...document.querySelectorAll("#consumers [data-consumer]")].map(
    (c) => [c.dataset.consumer, {
      memory: text(c, "dd.memory"), learned: text(c, "dd.learned"),
      models: c.querySelector(".models").hidden ? null : [...c.querySelectorAll(".models li")].map(
        (li) => (li.children.length ? cells(li) : [norm(li.textContent)])),
    }])),
  other: document.getElementById("other-procs").hidden ? null
    : [...document.querySelectorAll("#other-rows tr")].map(cells),
};
"""

#: Every "<number> MiB" (or GiB) shown, and those the layout broke across two lines.
NOWRAP_JS = """
const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let checked = 0;
const broken = [];
for (let n = walk.nextNode(); n; n = walk.nextNode()) {
  for (const m of n.data.matchAll(/[0-9][0-9,.]*\\s+[GM]iB/g)) {
    const r = document.createRange();
    r.setStart(n, m.index);
    r.setEnd(n, m.index + m[0].length);
    const rects = [...r.getClientRects()].filter((b) => b.width > 0);
    if (!rects.length) continue;
    checked += 1;
    if (new Set(rects.map((b) => Math.round(b.top))).size > 1) broken.push(m[0]);
  }
}
return {checked, broken};
"""

#: The time one redraw of the memory bar and the cards takes, in milliseconds.
RENDER_MS_JS = """
const t0 = performance.now();
for (let i = 0; i < 20; i++) {
  renderGpu(window.__doc);
  renderConsumers(window.__doc);
  void document.body.offsetHeight;
}
return (performance.now() - t0) / 20;
"""

#: Every status fetch fails while ``window.__failStatus`` holds; counted in ``__statusCalls``.
FAILING_STATUS_JS = """
window.__failStatus = true;
window.__statusCalls = 0;
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (String(url).endsWith("/v1/status")) {
    window.__statusCalls += 1;
    if (window.__failStatus) return Promise.reject(new TypeError("Failed to fetch"));
  }
  return realFetch(url, options);
};
"""

#: A status document of SPEC 9.5 with two cards, answered by a stand-in ``fetch`` (the daemon
#: that serves the page has one card), then drawn at once. vllm is spread over both cards
#: (16000 MiB in all: 8000 on each), mvoice is on card 0 with Xorg's 500 MiB, comfyui on 1.
TWO_CARDS_JS = """
const t = (s) => new Date(Date.now() + s * 1000).toISOString();
const base = {healthy: true, loaded: true, last_probe: t(-1), last_error: null, vram_managed: false,
  last_used: null, in_flight: 0, queued: 0, learned_mib: null};
const card = (index, name, used_mib, other, rest) => ({source: "nvml", ok: true, error: null, index,
  name, total_mib: 24564, used_mib, free_mib: 24564 - used_mib, read_at: t(0),
  other_mib: other.reduce((a, p) => a + p.used_mib, 0), other, ...rest});
const gpus = [
  card(0, "Stub GPU A", 11300, [{pid: 4001, name: "Xorg", used_mib: 500}],
    {holder: "vllm", queued: 2, running: 1, consumers: ["vllm", "mvoice", "whisper"]}),
  card(1, "Stub GPU B", 21000, [], {holder: "comfyui", queued: 0, running: 1,
    consumers: ["vllm", "comfyui"]}),
];
const consumers = {
  vllm: {...base, gpus: [0, 1], vram_resident_mib: 16000,
    memory: {used_mib: 16000, pids: [7001, 7002], source: "unit"}},
  comfyui: {...base, gpus: [1], vram_resident_mib: 13000,
    memory: {used_mib: 13000, pids: [1234], source: "port"}},
  mvoice: {...base, gpus: [0], vram_resident_mib: 2800,
    memory: {used_mib: 2800, pids: [3333], source: "pid_file"}},
  whisper: {...base, gpus: [0], loaded: false, vram_resident_mib: 1500,
    memory: {used_mib: 0, pids: [], source: "port"}},
};
window.__doc = {gpu: gpus[0], gpus, consumers, scheduler: {queued: 2, running: 2, holder: "vllm",
  completed: 0, failed: 0, rejected: 0, evictions: 0, loads: 0}};
window.fetch = async () => new Response(JSON.stringify(window.__doc),
  {status: 200, headers: {"content-type": "application/json"}});
poll();
"""

#: The same consumers on one card of 48 GiB: ``gpus`` with a single entry, everyone on card 0.
ONE_CARD_JS = """
const doc = JSON.parse(JSON.stringify(window.__doc));
doc.gpus = [{...doc.gpus[0], total_mib: 49152, used_mib: 32300, free_mib: 16852}];
doc.gpu = doc.gpus[0];
for (const c of Object.values(doc.consumers)) c.gpus = [0];
window.__doc = doc;
poll();
"""

#: The page drawn (at one frozen instant) from the one-card document with and without the
#: fields of SPEC 9.5: the same markup either way.
SAME_AS_OLD_JS = """
const realNow = Date.now, at = realNow();
Date.now = () => at;
try {
  const shown = (doc) => {
    renderGpu(doc); renderConsumers(doc); renderStats(doc);
    const header = document.getElementById("gpu-name").textContent;
    return document.querySelector("main").outerHTML + header;
  };
  const old = JSON.parse(JSON.stringify(window.__doc));
  delete old.gpus;
  for (const c of Object.values(old.consumers)) delete c.gpus;
  const withGpus = shown(window.__doc), without = shown(old);
  return {same: withGpus === without, withGpus, without};
} finally {
  Date.now = realNow;
}
"""

#: Each card's memory panel, the consumers' cards and the header, as shown.
CARDS_JS = """
const norm = (t) => (t === null || t === undefined ? null : t.replace(/\\u00a0/g, " "));
const shown = (root, sel) => {
  const e = root.querySelector(sel);
  return e && !e.closest("[hidden]") ? norm(e.textContent) : null;
};
return {
  header: norm(document.getElementById("gpu-name").textContent),
  holderStat: shown(document, '#stats [data-stat="holder"] .value'),
  bars: document.querySelectorAll(".bar").length,
  firstHasIds: !!document.querySelector("#memory #mem-bar")
    && document.querySelectorAll("#mem-bar").length === 1,
  panels: [...document.querySelectorAll("main section.card")].filter((s) => s.querySelector(".bar"))
  .map((sec) => {
    const bar = sec.querySelector(".bar").getBoundingClientRect().width;
    return {
      gpu: sec.dataset.gpu, label: norm(sec.querySelector("h2").textContent),
      sched: shown(sec, ".sched"), holder: shown(sec, ".g-holder"), queued: shown(sec, ".g-queued"),
      running: shown(sec, ".g-running"), used: shown(sec, ".big"),
      aria: norm(sec.querySelector(".bar").getAttribute("aria-label")),
      segments: [...sec.querySelectorAll(".seg")].map((s) => ({
        consumer: s.dataset.consumer || null, classes: s.className.split(" "), title: norm(s.title),
        share: s.getBoundingClientRect().width / bar,
      })),
      other: [...sec.querySelectorAll(".others tbody tr")].filter((r) => !r.closest("[hidden]"))
        .map((r) => [...r.children].map((x) => norm(x.textContent))),
    };
  }),
  cards: Object.fromEntries([...document.querySelectorAll("#consumers [data-consumer]")].map(
    (c) => [c.dataset.consumer,
      {gpus: shown(c, "dd.gpus"), holder: c.classList.contains("holder")}])),
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

    def preload(self, script: str) -> None:
        """Run ``script`` in every page this session opens, before the page's own."""
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})

    def viewport(self, width: int | None) -> None:
        """Lay the page out ``width`` CSS pixels wide (phone widths included); None: as opened."""
        if width is None:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        else:
            metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)

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


async def mvoice_stack(token: str | None = None) -> Stack:
    """mvoice alone: a daemon to serve the page, requiring ``token`` when one is given."""
    stack = Stack.new("mgpu-dash-auth-" if token else "mgpu-dash-one-")
    async with stack.starting():
        await stack.add_consumers("mvoice")
        config = make_config(
            stack.consumers,
            {"tts": "mvoice"},
            gpu=smi_gpu(0.3),
            health={"interval_s": 0.5, "timeout_s": 1},
        )
        if token is not None:
            config["auth"] = token_auth(stack.workdir, token)
        await stack.start(config)
    return stack


async def token_stack() -> Stack:
    """mvoice alone behind a daemon that requires ``TOKEN``."""
    return await mvoice_stack(TOKEN)


async def single_stack() -> Stack:
    """mvoice alone, no token: a daemon to serve the page."""
    return await mvoice_stack()


def segment(memory: Snapshot, consumer: str) -> dict[str, Any] | None:
    """The memory bar's segment of ``consumer``, if it has one."""
    return next((s for s in memory["segments"] if s["consumer"] == consumer), None)


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
        self.assertLess(len(html.splitlines()), 700, "the dashboard is meant to stay small")
        # A loading state before the first status, and the status fields of SPEC 9.3 and 9.4.
        self.assertIn('id="loading"', html)
        self.assertIn("connecting…", html)
        for field in (
            "memory",
            "used_mib",
            "pids",
            "learned_mib",
            "models",
            "size_vram_mib",
            "expires_at",
            "other_mib",
            "gpu.other",
        ):
            self.assertIn(field, html)
        self.assertIn('setAttribute("aria-label"', html)

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
        self.assertRegex(row["summary"], r"freed 13,000\u00a0MiB (in [0-9.]+ m?s|at once)")
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

    async def test_memory_fields_drawn(self) -> None:
        """With a status of SPEC 9.3 and 9.4 for 20 consumers: a bar segment per consumer
        holding memory (measured, or hatched as an estimate when only loaded), one for the
        other processes and one for free; narrow segments carry their figures in a tooltip
        and aria-label only; no "<n> MiB" ever breaks across lines, wide or narrow window;
        each card shows its memory and source, a learned size that differs, and Ollama's
        models with a countdown that moves every second; the other processes are listed,
        largest first; a redraw stays fast. A status without these fields still draws."""
        stack = await self.start(single_stack)
        browser = await self.browser()
        await deferToThread(browser.open, f"http://127.0.0.1:{stack.port}/")
        await deferToThread(browser.wait, "the page ready", lambda snap: snap["ready"])
        await deferToThread(browser.run, STATUS_STUB_JS)
        await deferToThread(
            browser.wait, "20 consumers", lambda snap: len(snap["cards"]) == 20, WAIT_S
        )
        memory = await deferToThread(browser.run, MEMORY_JS)

        # The bar: comfyui, ollama and tiny measured, whisper an estimate, mvoice and the
        # svc-* consumers hold nothing; then the other processes and free.
        self.assertEqual(
            [s["consumer"] for s in memory["segments"] if s["consumer"]],
            ["comfyui", "ollama", "whisper", "tiny"],
            memory["segments"],
        )
        for seg in memory["segments"]:
            self.assertEqual(seg["role"], "img", seg)
            self.assertTrue(seg["aria"], seg)
            self.assertEqual(seg["aria"], seg["title"], seg)
        comfyui, whisper, tiny = (segment(memory, n) for n in ("comfyui", "whisper", "tiny"))
        assert comfyui is not None and whisper is not None and tiny is not None
        self.assertEqual(comfyui["label"], "comfyui 13,010 MiB")
        self.assertNotIn("est", comfyui["classes"])
        self.assertIn("port, pid 1234", comfyui["title"])
        self.assertLess(abs(comfyui["share"] - 13010 / 24564), 0.01, comfyui)
        self.assertIn("est", whisper["classes"])
        self.assertIn("estimate", whisper["title"])
        self.assertEqual(tiny["label"], "", "under 6% of the bar: no inline label")
        self.assertIn("tiny: 310 MiB", tiny["title"])
        self.assertIn("unit, 4 pids", tiny["title"])
        other = [s for s in memory["segments"] if "other" in s["classes"]]
        self.assertEqual(len(other), 1, memory["segments"])
        self.assertTrue(other[0]["title"].startswith("other processes: 3,240 MiB"), other)
        free = [s for s in memory["segments"] if "free" in s["classes"]]
        self.assertEqual(len(free), 1, memory["segments"])
        self.assertIn("1,304 MiB", free[0]["title"])

        # The cards.
        cards = memory["cards"]
        self.assertEqual(cards["comfyui"]["memory"], "13,010 MiB (port, pid 1234)")
        self.assertEqual(cards["comfyui"]["learned"], "13,400 MiB")
        self.assertEqual(cards["ollama"]["memory"], "5,200 MiB (unit, pids 2222, 2223)")
        self.assertIsNone(cards["ollama"]["learned"], "learned equals the configured size")
        self.assertEqual(cards["mvoice"]["learned"], "3,010 MiB")
        self.assertEqual(cards["mvoice"]["memory"], "0 MiB (pid_file)")
        self.assertEqual(cards["whisper"]["memory"], "not attributed")
        self.assertIsNone(cards["comfyui"]["models"])
        models = cards["ollama"]["models"]
        self.assertEqual(
            [m[:2] for m in models], [["llama3.1:8b", "4,900 MiB"], ["nomic-embed-text", "300 MiB"]]
        )
        self.assertRegex(models[0][2], r"^expires in 4m \d+s$")
        self.assertEqual(models[1][2], "kept")
        await deferToThread(time.sleep, 1.5)
        later = (await deferToThread(browser.run, MEMORY_JS))["cards"]["ollama"]["models"]
        self.assertRegex(later[0][2], r"^expires in 4m \d+s$")
        self.assertNotEqual(later[0][2], models[0][2], "the countdown did not move")

        # The other processes: the largest five, then the rest in one line.
        self.assertEqual(
            memory["other"],
            [
                ["4003", "unknown", "2,500 MiB"],
                ["4001", "Xorg", "420 MiB"],
                ["4002", "firefox", "180 MiB"],
                ["4004", "a", "50 MiB"],
                ["4005", "b", "40 MiB"],
                ["and 2 more", "50 MiB"],
            ],
        )

        # No figure breaks across lines ("13,000 / MiB"), from a phone's width to a desktop's.
        # (The page before this check split "24,564 MiB" at 320 to 340 px.)
        for width in range(320, 1321, 40):
            await deferToThread(browser.viewport, width)
            await deferToThread(
                browser.run, "renderGpu(window.__doc); renderConsumers(window.__doc);"
            )
            wraps = await deferToThread(browser.run, NOWRAP_JS)
            self.assertGreater(wraps["checked"], 30, wraps)
            self.assertEqual(wraps["broken"], [], f"figures broken across lines at {width} px")
        await deferToThread(browser.viewport, None)

        # Fast with 20 consumers (a redraw is a few milliseconds; the bound is generous).
        ms = await deferToThread(browser.run, RENDER_MS_JS)
        self.assertLess(ms, 100, f"one redraw took {ms:.1f} ms")

        # A daemon without the new fields: consumers loaded are estimates, the rest of the
        # reading is "other"; no memory rows, no model lists, no list of other processes.
        await deferToThread(browser.run, OLD_DOC_JS)

        def old_doc(snap: Snapshot) -> bool:
            return all(
                "est" in s["classes"] for s in browser.run(MEMORY_JS)["segments"] if s["consumer"]
            )

        await deferToThread(browser.wait, "estimates only", old_doc)
        memory = await deferToThread(browser.run, MEMORY_JS)
        # ollama manages its own memory: it is given what the reading leaves unexplained.
        self.assertEqual(
            [s["consumer"] for s in memory["segments"] if s["consumer"]],
            ["comfyui", "whisper", "tiny", "ollama"],
        )
        other = [s for s in memory["segments"] if "other" in s["classes"]]
        self.assertEqual(len(other), 1, memory["segments"])
        self.assertTrue(other[0]["title"].startswith("other: 2,460 MiB"), other)
        self.assertIsNone(memory["other"])
        for name, card in memory["cards"].items():
            self.assertIsNone(card["memory"], name)
            self.assertIsNone(card["learned"], name)
            self.assertIsNone(card["models"], name)
        errors = [
            e for e in await deferToThread(browser.console) if e.get("level") in ("SEVERE", "ERROR")
        ]
        self.assertEqual(errors, [], "the page logged errors")

    async def test_several_cards(self) -> None:
        """With a status of two cards (SPEC 9.5): a memory panel per card, labelled
        "GPU <index> · <name>", with that card's lease holder, queue and running count, its
        consumers' segments (one spread over both cards shows half its memory on each), its
        other processes; each consumer's card says which GPU(s) it runs on, and the holder of
        either card's lease is marked. With one card the page shows one bar, exactly as for a
        daemon without ``gpus``."""
        stack = await self.start(single_stack)
        browser = await self.browser()
        await deferToThread(browser.open, f"http://127.0.0.1:{stack.port}/")
        await deferToThread(browser.wait, "the page ready", lambda snap: snap["ready"])
        await deferToThread(browser.run, TWO_CARDS_JS)
        await deferToThread(browser.wait, "two cards", lambda snap: "vllm" in by_name(snap), WAIT_S)
        shown = await deferToThread(browser.run, CARDS_JS)

        self.assertEqual(shown["bars"], 2, shown)
        self.assertTrue(shown["firstHasIds"], "the first card keeps the page's ids, alone")
        self.assertEqual(shown["header"], "2 GPUs · source nvml")
        self.assertEqual(shown["holderStat"], "vllm, comfyui")
        first, second = shown["panels"]
        self.assertEqual((first["gpu"], first["label"]), ("0", "GPU 0 · Stub GPU A"))
        self.assertEqual((second["gpu"], second["label"]), ("1", "GPU 1 · Stub GPU B"))
        self.assertEqual(first["sched"], "lease vllm · queued 2 · running 1")
        self.assertEqual((first["holder"], first["queued"], first["running"]), ("vllm", "2", "1"))
        self.assertEqual(second["sched"], "lease comfyui · queued 0 · running 1")
        self.assertEqual((second["holder"], second["queued"]), ("comfyui", "0"))
        self.assertEqual(first["used"], "11.0 / 24.0 GiB")
        self.assertEqual(second["used"], "20.5 / 24.0 GiB")
        self.assertTrue(first["aria"].startswith("GPU 0 memory use: 11,300 MiB"), first["aria"])
        self.assertTrue(second["aria"].startswith("GPU 1 memory use: 21,000 MiB"), second["aria"])

        def consumers(panel: dict[str, Any]) -> list[str]:
            return [s["consumer"] for s in panel["segments"] if s["consumer"]]

        self.assertEqual(consumers(first), ["vllm", "mvoice"], first["segments"])
        self.assertEqual(consumers(second), ["vllm", "comfyui"], second["segments"])
        for panel in (first, second):
            vllm = segment(panel, "vllm")
            assert vllm is not None
            self.assertTrue(vllm["title"].startswith("vllm: 8,000 MiB"), vllm)
            self.assertLess(abs(vllm["share"] - 8000 / 24564), 0.01, vllm)
            free = [s for s in panel["segments"] if "free" in s["classes"]]
            self.assertEqual(len(free), 1, panel["segments"])
        comfyui = segment(second, "comfyui")
        assert comfyui is not None
        self.assertLess(abs(comfyui["share"] - 13000 / 24564), 0.01, comfyui)
        other = [s for s in first["segments"] if "other" in s["classes"]]
        self.assertEqual(len(other), 1, first["segments"])
        self.assertTrue(other[0]["title"].startswith("other processes: 500 MiB"), other)
        self.assertEqual(first["other"], [["4001", "Xorg", "500 MiB"]])
        self.assertFalse([s for s in second["segments"] if "other" in s["classes"]])
        self.assertEqual(second["other"], [])

        cards = shown["cards"]
        self.assertEqual(cards["vllm"], {"gpus": "GPUs 0, 1", "holder": True})
        self.assertEqual(cards["comfyui"], {"gpus": "GPU 1", "holder": True})
        self.assertEqual(cards["mvoice"], {"gpus": "GPU 0", "holder": False})
        self.assertEqual(cards["whisper"], {"gpus": "GPU 0", "holder": False})

        # No figure breaks across lines with two panels either.
        for width in (320, 480, 800, 1280):
            await deferToThread(browser.viewport, width)
            await deferToThread(
                browser.run, "renderGpu(window.__doc); renderConsumers(window.__doc);"
            )
            wraps = await deferToThread(browser.run, NOWRAP_JS)
            self.assertEqual(wraps["broken"], [], f"figures broken across lines at {width} px")
        await deferToThread(browser.viewport, None)

        # One card: a single bar, no per-card line, no "Runs on" row.
        await deferToThread(browser.run, ONE_CARD_JS)
        await deferToThread(
            browser.wait,
            "one card",
            lambda snap: browser.run("return document.querySelectorAll('.bar').length;") == 1,
        )
        shown = await deferToThread(browser.run, CARDS_JS)
        self.assertEqual(shown["bars"], 1, shown)
        self.assertTrue(shown["firstHasIds"])
        self.assertEqual(shown["header"], "Stub GPU A · source nvml")
        self.assertEqual(shown["holderStat"], "vllm")
        (only,) = shown["panels"]
        vllm = segment(only, "vllm")
        assert vllm is not None
        self.assertEqual(only["label"], "GPU memory")
        self.assertIsNone(only["sched"])
        self.assertEqual(only["used"], "31.5 / 48.0 GiB")
        self.assertLess(abs(vllm["share"] - 16000 / 49152), 0.01, vllm)
        self.assertTrue(only["aria"].startswith("GPU memory use: "), only["aria"])
        self.assertEqual(consumers(only), ["vllm", "comfyui", "mvoice"], only["segments"])
        self.assertTrue(vllm["title"].startswith("vllm: 16,000 MiB"), vllm)
        for name, card in shown["cards"].items():
            self.assertIsNone(card["gpus"], name)
        self.assertEqual(
            [n for n, c in shown["cards"].items() if c["holder"]], ["vllm"], shown["cards"]
        )
        same = await deferToThread(browser.run, SAME_AS_OLD_JS)
        self.assertTrue(same["same"], f"one card drawn differently with gpus: {same}")
        errors = [
            e for e in await deferToThread(browser.console) if e.get("level") in ("SEVERE", "ERROR")
        ]
        self.assertEqual(errors, [], "the page logged errors")

    async def test_loading_state_then_retry(self) -> None:
        """Before the first status the page shows "connecting…" with a spinner, not empty
        cards; a failing fetch is said on the page and retried; once the status answers,
        the page shows it."""
        stack = await self.start(single_stack)
        browser = await self.browser()
        await deferToThread(browser.preload, FAILING_STATUS_JS)
        await deferToThread(browser.open, f"http://127.0.0.1:{stack.port}/")
        snap = await deferToThread(browser.snapshot)
        self.assertTrue(snap["loading"], snap)
        self.assertFalse(snap["ready"], snap)
        self.assertEqual(snap["cards"], [])
        shown = await deferToThread(
            browser.run,
            """const loading = document.getElementById("loading");
            return {text: document.body.innerText, spinner: !!loading.querySelector(".spinner"),
              live: loading.getAttribute("aria-live")};""",
        )
        self.assertIn("connecting…", shown["text"])
        self.assertNotIn("—", shown["text"], "an empty skeleton shows before the first status")
        self.assertTrue(shown["spinner"])
        self.assertEqual(shown["live"], "polite")

        def retried(snap: Snapshot) -> bool:
            error = browser.run("return document.getElementById('loading-error').textContent;")
            return bool(
                "Failed to fetch" in error and browser.run("return window.__statusCalls;") >= 3
            )

        snap = await deferToThread(browser.wait, "the error, retried", retried)
        self.assertTrue(snap["loading"], snap)
        await deferToThread(browser.run, "window.__failStatus = false;")
        snap = await deferToThread(
            browser.wait,
            "the status once the fetch answers",
            lambda snap: snap["ready"] and not snap["loading"] and len(snap["cards"]) == 1,
        )
        self.assertEqual(list(by_name(snap)), ["mvoice"])
