"""The scheduler end to end: eviction, loads, the GPU lease and the queue (SPEC sections 5-7).

The daemon runs under ``twistd`` with ``gpu.source: nvidia-smi``: the stand-in
``tests/fake_nvidia_smi.py`` reads a state file describing a 16384 MiB card,
into which each simulated consumer process writes the memory its model holds.
Where a test must count the broker's own calls to a consumer (unload, load),
a small recording proxy (the *tap*, this module run as a script) stands between
the daemon and that consumer and logs every request it relays.

Eviction tests change what is resident, so each builds its own stack; the
lease and queue tests share one stack per class and reset faults between tests.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    CONSUMER_BLOCKS,
    FAKE_NVIDIA_SMI,
    Consumer,
    HttpClient,
    RawConnection,
    Stack,
    closed,
    connect,
    parse_response,
    request_bytes,
    set_faults,
    shared_stacks,
    sim_call,
    sim_log,
    sleep,
    start_consumer,
    start_listener,
    wait_for,
)
from tests.integration.patterns import ERROR_KEYS

#: The simulated card: 16 GiB.
CARD_MIB = 16384
CUSHION_MIB = 256
COMFYUI_FREE_BODY = {"unload_models": True, "free_memory": True}

#: What each kind's request body looks like to the simulated consumers.
BODIES: Mapping[str, bytes] = {
    "tts": b'{"text": "hello"}',
    "stt": b"RIFF fake audio",
    "llm": b'{"model": "llama3.2", "prompt": "hi", "stream": false}',
    "image": b'{"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}}',
}

#: Health routes, left out when a test counts the broker's calls through a tap.
HEALTH_PATHS = frozenset(
    block["health"]["path"] for block in CONSUMER_BLOCKS.values() if "health" in block
)


# -- the tap: a recording proxy process --------------------------------------

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer",
     "proxy-connection", "proxy-authenticate", "proxy-authorization"}
)  # fmt: skip


def _tap_main(argv: Sequence[str]) -> None:
    """``python -m tests.integration.test_scheduling --upstream PORT --log FILE``.

    Relays every request to 127.0.0.1:PORT and, once answered, appends
    ``{"method", "path", "body", "status", "at", "done"}`` (wall-clock seconds)
    to FILE as one JSON line. Prints ``listening 127.0.0.1:PORT`` first.
    Standard library only; small JSON bodies only.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.integration.test_scheduling")
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self) -> None:
            at = time.time()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in _HOP_BY_HOP | {"host", "content-length"}
            }
            upstream = http.client.HTTPConnection("127.0.0.1", args.upstream, timeout=120)
            try:
                send_body = body if body or self.command in ("POST", "PUT") else None
                upstream.request(self.command, self.path, body=send_body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            entry = {
                "method": self.command,
                "path": self.path,
                "body": body.decode("utf-8", "replace"),
                "status": answer.status,
                "at": at,
                "done": time.time(),
            }
            with lock, args.log.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP_BY_HOP | {"content-length", "date", "server"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = relay

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


async def start_tap(name: str, upstream: Consumer, workdir: Path) -> Consumer:
    """A recording proxy in front of ``upstream``; its log lines are the relayed calls."""
    log_path = workdir / f"{name}.tap.jsonl"
    log_path.touch()
    argv = [sys.executable, "-m", "tests.integration.test_scheduling"]
    argv += ["--upstream", str(upstream.port), "--log", str(log_path)]
    return await start_listener(f"tap-{name}", argv, workdir, log_path)


# -- the GPU state file ------------------------------------------------------


def write_card(path: Path, external_mib: int = 0) -> None:
    """The stand-in nvidia-smi's state: one 16384 MiB card, ``external_mib`` held by others."""
    state = {
        "gpus": [
            {"index": 0, "name": "Fake NVIDIA 16 GiB", "total_mib": CARD_MIB,
             "used_mib": external_mib}
        ],
        "fail": None,
    }  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), "utf-8")
    os.replace(tmp, path)


def ledger_owners(path: Path) -> dict[str, int]:
    """Who holds how much on GPU 0, as the shared state file says now."""
    data = json.loads(path.read_text("utf-8"))
    owners: dict[str, int] = data.get("owners", {}).get("0", {})
    return owners


def smi_wrapper(workdir: Path) -> Path:
    """``fake_nvidia_smi.py`` run by this interpreter without site imports.

    Run as a script, it goes through ``/usr/bin/env python3``, which may be a
    slow shim (pyenv): 0.1-0.2 s a reading, which would be the stand-in's
    latency, not the daemon's, in the timing of a lazy free.
    """
    path = workdir / "nvidia-smi"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "{FAKE_NVIDIA_SMI}" "$@"\n')
    path.chmod(0o755)
    return path


class LedgerWatch:
    """Reads the GPU state file every 5 ms in a thread; ``changes`` is (time, owners) per change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changes: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: dict[str, int] | None = None
        while not self._stop.is_set():
            try:
                owners = ledger_owners(self.path)
            except (OSError, ValueError):
                owners = last or {}
            if owners != last:
                self.changes.append((time.time(), owners))
                last = owners
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def first(self, what: str, test: Any) -> float:
        """When the ledger first showed ``test(owners)`` true; fails if it never did."""
        for at, owners in self.changes:
            if test(owners):
                return at
        raise AssertionError(f"the ledger never showed {what}: {self.changes}")


# -- stacks ----------------------------------------------------------------------


@dataclass
class Sim:
    """One simulated consumer of a test stack, with its config block and optional tap."""

    name: str
    service: str
    vram_mib: int
    preload: bool = False
    work_s: float | None = None
    load_s: float | None = None
    tap: bool = False
    block: dict[str, Any] = field(default_factory=dict)  # config keys over the service's
    process: Consumer | None = None
    proxy: Consumer | None = None

    @property
    def consumer(self) -> Consumer:
        assert self.process is not None
        return self.process

    @property
    def url(self) -> str:
        return (self.proxy or self.consumer).url

    def argv(self) -> list[str]:
        args = ["--vram-mib", str(self.vram_mib)]
        if self.preload:
            args.append("--preload")
        if self.work_s is not None:
            args += ["--work-s", str(self.work_s)]
        if self.load_s is not None:
            args += ["--load-s", str(self.load_s)]
        return args

    def config(self) -> dict[str, Any]:
        block: dict[str, Any] = json.loads(json.dumps(CONSUMER_BLOCKS[self.service]))
        block["vram_resident_mib"] = self.vram_mib
        block.update(self.block)
        block["url"] = self.url
        return block

    def calls(self) -> list[dict[str, Any]]:
        """The broker's calls relayed by the tap, health probes left out."""
        assert self.proxy is not None, f"{self.name} has no tap"
        return [e for e in self.proxy.log_lines() if e["path"] not in HEALTH_PATHS]

    def calls_to(self, path: str) -> list[dict[str, Any]]:
        return [e for e in self.calls() if e["path"].split("?")[0] == path]

    async def state(self) -> dict[str, Any]:
        state: dict[str, Any] = await sim_call(self.consumer, "GET", "/_sim/state")
        return state

    async def work(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Its work log entries that started at or after ``since``."""
        return [e for e in await sim_log(self.consumer) if e["start"] >= since]


@dataclass(eq=False)
class SchedStack(Stack):
    """A ``Stack`` of ``Sim`` consumers on a 16384 MiB card behind the daemon."""

    sims: dict[str, Sim] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Sim:
        return self.sims[name]


async def build_stack(
    prefix: str,
    sims: Iterable[Sim],
    routing: Mapping[str, str],
    *,
    external_mib: int = 0,
    scheduler: Mapping[str, Any] | None = None,
    health_interval_s: float = 0.5,
) -> SchedStack:
    """Start the consumers (and their taps), then the daemon with ``gpu.source: nvidia-smi``."""
    stack = SchedStack.new(prefix)
    assert isinstance(stack, SchedStack)
    by_name = stack.sims = {sim.name: sim for sim in sims}
    async with stack.starting():
        write_card(stack.gpu_state, external_mib)
        started = [
            ensureDeferred(
                start_consumer(s.name, stack.workdir, stack.gpu_state, s.service, s.argv())
            )
            for s in by_name.values()
        ]
        for sim, d in zip(by_name.values(), started, strict=True):
            sim.process = stack.consumers[sim.name] = await d
        taps = {
            s.name: ensureDeferred(start_tap(s.name, s.consumer, stack.workdir))
            for s in by_name.values()
            if s.tap
        }
        for name, d in taps.items():
            by_name[name].proxy = stack.consumers[f"tap-{name}"] = await d
            # The daemon's URL is the tap's port: its memory is found through a pid file.
            pid_file = stack.workdir / f"{name}.pid"
            pid_file.write_text(f"{by_name[name].consumer.process.pid}\n", "utf-8")
            by_name[name].block.setdefault("process", {"pid_file": str(pid_file)})
        config = {
            "gpu": {
                "source": "nvidia-smi",
                "nvidia_smi": str(smi_wrapper(stack.workdir)),
                "poll_interval_s": 1,
                "cushion_mib": CUSHION_MIB,
            },
            "scheduler": dict(scheduler or {}),
            "health": {"interval_s": health_interval_s, "timeout_s": 1},
            "routing": dict(routing),
            "consumers": {s.name: s.config() for s in by_name.values()},
        }
        await stack.start(config)
    return stack


async def post(http: HttpClient, kind: str, timeout: float = 20) -> tuple[int, Any]:
    """``POST /v1/<kind>`` with that kind's body: (status, parsed JSON answer)."""
    response, content = await http.request(
        "POST",
        f"/v1/{kind}",
        body=BODIES[kind],
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )
    try:
        return response.code, json.loads(content)
    except ValueError:
        return response.code, content


def overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two work intervals overlap (a running entry has ``end`` null: open)."""
    a_end = a["end"] if a["end"] is not None else float("inf")
    b_end = b["end"] if b["end"] is not None else float("inf")
    return a["start"] < b_end and b["start"] < a_end


def most_at_once(entries: Sequence[Mapping[str, Any]]) -> int:
    """The largest number of work intervals in progress at one moment."""
    ends = [e["end"] if e["end"] is not None else float("inf") for e in entries]
    events = sorted(
        [(e["start"], 1) for e in entries] + [(end, -1) for end in ends],
        key=lambda ev: (ev[0], ev[1]),  # an end before a start at the same instant
    )
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


class _SchedCase(TestCase):
    timeout = 40

    stack: SchedStack
    http: HttpClient

    def use(self, stack: SchedStack) -> None:
        self.stack = stack
        self.http = stack.client()
        self.addCleanup(self.http.close)

    async def status(self) -> dict[str, Any]:
        return await self.http.status()

    async def scheduler(self) -> dict[str, Any]:
        return (await self.status())["scheduler"]

    async def idle(self, timeout: float = 15) -> None:
        """Wait until nothing holds, runs or waits for the GPU and no consumer is busy."""

        async def free() -> bool:
            s = await self.scheduler()
            if s["holder"] is not None or s["queued"] or s["running"]:
                return False
            for sim in self.stack.sims.values():
                if (await sim.state())["busy"]:
                    return False
            return True

        await wait_for(free, timeout, "the GPU lock to be free and the consumers idle")

    async def holder_is(self, name: str | None) -> bool:
        return bool((await self.scheduler())["holder"] == name)

    async def queued(self, consumer: str, n: int) -> bool:
        doc = await self.status()
        return bool(doc["consumers"][consumer]["queued"] == n)

    async def loaded_as(self, expected: Mapping[str, bool]) -> bool:
        consumers = (await self.status())["consumers"]
        return all(consumers[name]["loaded"] is want for name, want in expected.items())

    def post_later(self, kind: str) -> Deferred[tuple[int, Any]]:
        """``post`` started now; cancelled at cleanup if a failed test left it running."""
        d = ensureDeferred(post(self.http, kind))

        def cancel() -> None:
            if not d.called:
                d.cancel()
                d.addErrback(lambda _: None)

        self.addCleanup(cancel)
        return d

    async def raw(self, kind: str) -> RawConnection:
        """A ``POST /v1/<kind>`` on its own connection; aborted at cleanup if still open."""
        conn = await connect(self.stack.port, RawConnection())
        self.addCleanup(conn.abort)
        conn.send(request_bytes("POST", f"/v1/{kind}", BODIES[kind]))
        return conn

    def assertBrokerError(self, code: int, error: Any, status: int, name: str, who: str) -> None:
        self.assertEqual(code, status, error)
        self.assertIsInstance(error, dict, error)
        self.assertEqual(set(error), ERROR_KEYS, error)
        self.assertEqual(error["error"], name, error)
        self.assertEqual(error["consumer"], who, error)
        self.assertIs(error["retryable"], True, error)

    async def fresh(self, sims: Iterable[Sim], routing: Mapping[str, str], **kw: Any) -> None:
        """A stack for this test alone, stopped at cleanup; waits for the first probes."""
        await shared_stacks.release()  # one daemon at a time on this machine
        stack = await build_stack("mgpu-evict-", sims, routing, **kw)
        self.addCleanup(lambda: ensureDeferred(stack.stop()))
        self.use(stack)

        async def probed() -> bool:
            consumers = (await self.status())["consumers"]
            return all(c["healthy"] is True and c["loaded"] is not None for c in consumers.values())

        await wait_for(probed, 10, "every consumer's first probe")

    def clear_faults_at_cleanup(self, *sims: Sim) -> None:
        for sim in sims:
            self.addCleanup(clear_faults, sim.consumer)


def clear_faults(consumer: Consumer) -> Any:
    """Clear a simulated consumer's faults, as a Deferred (a cleanup)."""
    return ensureDeferred(set_faults(consumer, {}))


# -- eviction: each test its own stack ----------------------------------------


class EvictionTests(_SchedCase):
    """Making room for a target on a 16384 MiB card (cushion 256 MiB)."""

    async def test_resident_target_no_unload_no_load(self) -> None:
        """A target that is already resident runs with no unload and no load, even with less
        free memory than its size plus the cushion."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, preload=True, work_s=0.1, tap=True),
            ],
            {"tts": "mvoice", "image": "comfyui"},
        )
        comfyui, mvoice = self.stack["comfyui"], self.stack["mvoice"]
        await wait_for(lambda: self.loaded_as({"comfyui": True, "mvoice": True}), 5, "both loaded")
        since = time.time()
        before = await self.scheduler()
        for kind in ("tts", "image", "tts"):
            code, body = await post(self.http, kind)
            self.assertEqual(code, 200, (kind, body))
        await self.idle()
        after = await self.scheduler()
        self.assertEqual(after["evictions"], before["evictions"], after)
        self.assertEqual(after["loads"], before["loads"], after)
        self.assertEqual(comfyui.calls_to("/free"), [])
        self.assertEqual([e["path"] for e in mvoice.calls()], ["/api/synthesize"] * 2)
        self.assertEqual([e["cold"] for e in await mvoice.work(since)], [False, False])
        self.assertEqual([e["cold"] for e in await comfyui.work(since)], [False])
        self.assertTrue((await comfyui.state())["loaded"])
        self.assertEqual(ledger_owners(self.stack.gpu_state), {"comfyui": 13000, "mvoice": 2800})

    async def test_comfyui_unloaded_to_fit_mvoice(self) -> None:
        """A 13 GiB comfyui resident is unloaded (one /free with its JSON body) to fit a
        2.8 GiB mvoice, which is loaded once and then serves the request."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, work_s=0.1, load_s=0.05, tap=True),
            ],
            {"tts": "mvoice", "image": "comfyui"},
            external_mib=1024,  # the desktop: 2360 MiB free, mvoice needs 3056
        )
        comfyui, mvoice = self.stack["comfyui"], self.stack["mvoice"]
        await wait_for(lambda: self.loaded_as({"comfyui": True, "mvoice": False}), 5, "probes")
        since = time.time()
        code, body = await post(self.http, "tts")
        self.assertEqual(code, 200, body)
        frees = comfyui.calls_to("/free")
        self.assertEqual(len(frees), 1, comfyui.calls())
        self.assertEqual(frees[0]["method"], "POST")
        self.assertEqual(json.loads(frees[0]["body"]), COMFYUI_FREE_BODY)
        self.assertEqual(frees[0]["status"], 200)
        state = await comfyui.state()
        self.assertEqual((state["loaded"], state["vram_mib"]), (False, 0), state)
        self.assertEqual(
            [(e["method"], e["path"]) for e in mvoice.calls()],
            [("POST", "/api/admin/load"), ("POST", "/api/synthesize")],
        )
        load = mvoice.calls_to("/api/admin/load")[0]
        self.assertGreaterEqual(load["at"], frees[0]["done"], "mvoice loaded before the unload")
        self.assertEqual([e["cold"] for e in await mvoice.work(since)], [False])
        doc = await self.status()
        self.assertEqual(doc["scheduler"]["evictions"], 1, doc["scheduler"])
        self.assertEqual(doc["scheduler"]["loads"], 1, doc["scheduler"])
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], False)
        self.assertIs(doc["consumers"]["mvoice"]["loaded"], True)
        self.assertEqual(ledger_owners(self.stack.gpu_state), {"external": 1024, "mvoice": 2800})

    async def test_refused_image_never_overcommits(self) -> None:
        """An image request ComfyUI refuses (a 400: no prompt graph; it loads nothing) does not
        mark ComfyUI loaded: a later image request still makes room, and the card never
        holds more than it has. Before SPEC 9.3 the 400 marked ComfyUI loaded, the next
        image skipped making room, and the card reached 16384 of 16384 MiB plus mvoice."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, work_s=0.1),
                Sim("mvoice", "mvoice", 2800, preload=True, work_s=0.1, load_s=0.05),
            ],
            {"tts": "mvoice", "image": "comfyui"},
            external_mib=500,
        )
        await wait_for(lambda: self.loaded_as({"comfyui": False, "mvoice": True}), 5, "probes")
        response, content = await self.http.request(
            "POST",
            "/v1/image",
            body=b'{"prompt": "garbage"}',
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 400, content)
        self.assertIn(b"no_prompt", content)
        self.assertIs((await self.status())["consumers"]["comfyui"]["loaded"], False)
        for kind in ("tts", "image"):
            code, body = await post(self.http, kind)
            self.assertEqual(code, 200, (kind, body))
        owners = ledger_owners(self.stack.gpu_state)
        self.assertLessEqual(sum(owners.values()), CARD_MIB, owners)
        self.assertEqual(owners, {"external": 500, "comfyui": 13000}, owners)
        doc = await self.status()
        self.assertIs(doc["consumers"]["mvoice"]["loaded"], False)
        self.assertGreaterEqual(doc["scheduler"]["evictions"], 2, doc["scheduler"])

    async def test_coexistent_lru_never_picked(self) -> None:
        """Consumers that may coexist with the target (declared on either side) are never
        unloaded, even as the least recently used; the non-coexistent one is."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                # 2184 MiB free; unloading voice2 and voice3 alone would make room (3384 MiB).
                Sim("voice2", "mvoice", 600, preload=True, work_s=0.1, tap=True,
                    block={"can_coexist_with": ["mvoice"]}),
                Sim("voice3", "mvoice", 600, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, work_s=0.1, load_s=0.05, tap=True,
                    block={"can_coexist_with": ["voice3"]}),
            ],
            {"tts": "mvoice", "stt": "voice2", "image": "comfyui"},
        )  # fmt: skip
        comfyui, voice2, voice3 = self.stack["comfyui"], self.stack["voice2"], self.stack["voice3"]
        # Least recently used first: voice3 (never used), voice2, then comfyui.
        for kind in ("stt", "image"):
            code, body = await post(self.http, kind)
            self.assertEqual(code, 200, (kind, body))
        await self.idle()
        code, body = await post(self.http, "tts")
        self.assertEqual(code, 200, body)
        self.assertEqual(voice2.calls_to("/api/admin/unload"), [])
        self.assertEqual(voice3.calls_to("/api/admin/unload"), [])
        self.assertEqual(len(comfyui.calls_to("/free")), 1, comfyui.calls())
        self.assertTrue((await voice2.state())["loaded"])
        self.assertTrue((await voice3.state())["loaded"])
        doc = await self.status()
        self.assertEqual(doc["scheduler"]["evictions"], 1, doc["scheduler"])
        self.assertIs(doc["consumers"]["voice2"]["loaded"], True)
        self.assertIs(doc["consumers"]["voice3"]["loaded"], True)
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], False)

    async def two_victims_stack(self) -> tuple[Sim, Sim, Sim]:
        """comfyui (13000 MiB) and voice2 (1000), both resident and unloadable, and an
        unloaded mvoice (2800): a second victim an impatient broker would unload too."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("voice2", "mvoice", 1000, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, work_s=0.1, load_s=0.02, tap=True),
            ],
            {"tts": "mvoice", "stt": "voice2", "image": "comfyui"},
        )
        return self.stack["comfyui"], self.stack["voice2"], self.stack["mvoice"]

    async def test_lazy_free_waits_then_runs_at_once(self) -> None:
        """Memory that frees 1.5 s after the unload answers costs exactly one unload, and the
        request reaches mvoice within 0.5 s of the memory showing free, never before."""
        comfyui, voice2, mvoice = await self.two_victims_stack()
        code, body = await post(self.http, "stt")  # voice2 used; comfyui never: comfyui first
        self.assertEqual(code, 200, body)
        await set_faults(comfyui.consumer, {"free_delay_s": 1.5})
        self.clear_faults_at_cleanup(comfyui)
        watch = LedgerWatch(self.stack.gpu_state)
        self.addCleanup(watch.stop)
        since = time.time()
        code, body = await post(self.http, "tts")
        self.assertEqual(code, 200, body)
        watch.stop()
        frees = comfyui.calls_to("/free")
        self.assertEqual(len(frees), 1, comfyui.calls())
        self.assertEqual(voice2.calls_to("/api/admin/unload"), [])
        self.assertTrue((await voice2.state())["loaded"])
        freed_at = watch.first("comfyui's memory freed", lambda owners: "comfyui" not in owners)
        self.assertGreaterEqual(freed_at, frees[0]["at"] + 1.5)
        [entry] = await mvoice.work(since)
        loaded_at = watch.first("mvoice loaded", lambda owners: "mvoice" in owners)
        self.assertGreaterEqual(loaded_at, freed_at, "mvoice was loaded before the memory freed")
        self.assertGreaterEqual(entry["start"], freed_at, "mvoice ran before the memory freed")
        self.assertLess(
            entry["start"] - freed_at, 0.5, "the request waited too long after the memory freed"
        )
        self.assertEqual((await self.scheduler())["evictions"], 1)

    async def test_two_victims_no_idle_wait(self) -> None:
        """When one victim's memory is not enough, the next is unloaded as soon as the first
        one's memory has freed, not after free_wait_s."""
        await self.fresh(
            [
                Sim("voiceA", "mvoice", 1000, preload=True, work_s=0.1, tap=True),
                Sim("voiceB", "mvoice", 1000, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, work_s=0.1, load_s=0.02, tap=True),
            ],
            {"tts": "mvoice", "stt": "voiceA"},
            external_mib=12500,  # 1884 MiB free: one 1000 MiB victim is not enough for 3056
            scheduler={"free_wait_s": 3},
        )
        voice_a, voice_b = self.stack["voiceA"], self.stack["voiceB"]
        await wait_for(lambda: self.loaded_as({"voiceA": True, "mvoice": False}), 5, "probes")
        started = time.monotonic()
        code, body = await post(self.http, "tts")
        elapsed = time.monotonic() - started
        self.assertEqual(code, 200, body)
        [first] = voice_a.calls_to("/api/admin/unload")
        [second] = voice_b.calls_to("/api/admin/unload")
        self.assertLess(
            second["at"] - first["done"],
            0.5,
            "the second victim waited for free_wait_s after the first one's memory had freed",
        )
        self.assertLess(elapsed, 1.5)
        s = await self.scheduler()
        self.assertEqual((s["evictions"], s["loads"]), (2, 1), s)

    async def test_nothing_evictable_scheduler_error_at_once(self) -> None:
        """A target bigger than what could ever be freed gets 503 scheduler_error at once,
        naming it, and nothing is unloaded."""
        await self.fresh(
            [
                Sim("ollama", "ollama", 6000, preload=True, work_s=0.1),  # vram_managed
                Sim("whisper", "whisper", 1500, preload=True, work_s=0.1),  # no unload route
                Sim("mvoice", "mvoice", 2800, preload=True, work_s=0.1, tap=True),
                # 15000 + 256 > 6084 free + 2800 of mvoice.
                Sim("huge", "mvoice", 15000, work_s=0.1, tap=True),
            ],
            {"tts": "mvoice", "stt": "huge", "llm": "ollama"},
        )
        mvoice, huge = self.stack["mvoice"], self.stack["huge"]
        await wait_for(lambda: self.loaded_as({"mvoice": True, "huge": False}), 5, "probes")
        before = await self.scheduler()
        started = time.monotonic()
        code, error = await post(self.http, "stt")
        elapsed = time.monotonic() - started
        self.assertBrokerError(code, error, 503, "scheduler_error", "huge")
        self.assertIn("huge", error["message"])
        self.assertLess(elapsed, 1.0)
        self.assertEqual(mvoice.calls(), [])
        self.assertEqual(huge.calls(), [])
        self.assertTrue((await mvoice.state())["loaded"])
        after = await self.scheduler()
        self.assertEqual(after["evictions"], before["evictions"], after)
        self.assertEqual(after["failed"], before["failed"] + 1, after)
        self.assertEqual((after["holder"], after["running"]), (None, 0), after)
        code, body = await post(self.http, "tts", timeout=5)
        self.assertEqual(code, 200, body)

    async def test_failing_unload_next_victim(self) -> None:
        """An unload that fails (HTTP 500) moves on to the next victim; the lock is released
        and the failed victim still counts as loaded."""
        comfyui, voice2, mvoice = await self.two_victims_stack()
        code, body = await post(self.http, "stt")  # comfyui, never used, is tried first
        self.assertEqual(code, 200, body)
        await set_faults(comfyui.consumer, {"status": {"/free": 500}})
        self.clear_faults_at_cleanup(comfyui)
        code, body = await post(self.http, "tts")
        self.assertEqual(code, 200, body)
        self.assertEqual([e["status"] for e in comfyui.calls_to("/free")], [500])
        self.assertEqual([e["status"] for e in voice2.calls_to("/api/admin/unload")], [200])
        self.assertLess(comfyui.calls_to("/free")[0]["at"], voice2.calls()[-1]["at"])
        self.assertEqual(len(mvoice.calls_to("/api/admin/load")), 1)
        doc = await self.status()
        self.assertEqual(doc["scheduler"]["evictions"], 1, doc["scheduler"])
        self.assertEqual(doc["scheduler"]["loads"], 1, doc["scheduler"])
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], True)
        self.assertIs(doc["consumers"]["voice2"]["loaded"], False)
        # The lock was released: another consumer (resident) runs at once.
        code, body = await post(self.http, "image", timeout=5)
        self.assertEqual(code, 200, body)

    async def test_failing_unload_no_victim_left(self) -> None:
        """When the only victim's unload fails the client gets 503 scheduler_error naming the
        target, and the lock is released for the next request to another consumer."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("whisper", "whisper", 1500, preload=True, work_s=0.1),
                Sim("mvoice", "mvoice", 2800, work_s=0.1, tap=True),
            ],
            {"tts": "mvoice", "stt": "whisper", "image": "comfyui"},
        )
        comfyui, mvoice = self.stack["comfyui"], self.stack["mvoice"]
        await set_faults(comfyui.consumer, {"status": {"/free": 500}})
        self.clear_faults_at_cleanup(comfyui)
        await wait_for(lambda: self.loaded_as({"comfyui": True, "mvoice": False}), 5, "probes")
        since = time.time()
        code, error = await post(self.http, "tts")
        self.assertBrokerError(code, error, 503, "scheduler_error", "mvoice")
        self.assertIn("mvoice", error["message"])
        self.assertEqual([e["status"] for e in comfyui.calls_to("/free")], [500])
        self.assertEqual(mvoice.calls(), [])
        self.assertEqual(await mvoice.work(since), [])
        doc = await self.status()
        self.assertEqual(doc["scheduler"]["evictions"], 0, doc["scheduler"])
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], True)
        self.assertEqual((doc["scheduler"]["holder"], doc["scheduler"]["running"]), (None, 0))
        code, body = await post(self.http, "stt", timeout=5)
        self.assertEqual(code, 200, body)


# -- the lease: one shared stack, nothing to evict ------------------------------


async def _lease_stack() -> SchedStack:
    """mvoice (max_concurrency 2, priority 2), whisper (priority 4, timeout_s 1) and
    ollama (priority 0), all resident on the card with room to spare."""
    return await build_stack(
        "mgpu-lease-",
        [
            Sim(
                "mvoice",
                "mvoice",
                2800,
                preload=True,
                work_s=0.4,
                block={"max_concurrency": 2, "priority": 2, "timeout_s": 10},
            ),
            Sim(
                "whisper",
                "whisper",
                1500,
                preload=True,
                work_s=0.15,
                block={"priority": 4, "timeout_s": 1},
            ),
            Sim(
                "ollama",
                "ollama",
                6000,
                preload=True,
                work_s=0.2,
                block={"priority": 0, "timeout_s": 10},
            ),
        ],
        {"tts": "mvoice", "stt": "whisper", "llm": "ollama"},
        health_interval_s=1,
    )


class _SharedCase(_SchedCase):
    key = ""
    build: Any = None

    async def setUp(self) -> None:  # type: ignore[override]
        stack = await shared_stacks.get(self.key, type(self).build)
        assert isinstance(stack, SchedStack)
        self.use(stack)
        for sim in self.stack.sims.values():
            await set_faults(sim.consumer, {})
        self.clear_faults_at_cleanup(*self.stack.sims.values())
        await self.idle()


class LeaseTests(_SharedCase):
    """One GPU lock, max_concurrency, priorities, timeouts and clients that leave."""

    key = "scheduling-lease"
    build = staticmethod(_lease_stack)

    async def test_hung_consumer_upstream_timeout_releases_lock(self) -> None:
        """A consumer that hangs gets the client 504 upstream_timeout after its timeout_s
        (1 s), and the lock goes to the next request."""
        whisper = self.stack["whisper"]
        await set_faults(whisper.consumer, {"hang": ["/inference"]})
        failed = (await self.scheduler())["failed"]
        started = time.monotonic()
        code, error = await post(self.http, "stt", timeout=10)
        elapsed = time.monotonic() - started
        self.assertBrokerError(code, error, 504, "upstream_timeout", "whisper")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3)
        doc = await self.status()
        s = doc["scheduler"]
        self.assertEqual((s["holder"], s["running"], s["failed"]), (None, 0, failed + 1), s)
        self.assertEqual(doc["consumers"]["whisper"]["in_flight"], 0)
        started = time.monotonic()
        code, body = await post(self.http, "tts", timeout=5)
        self.assertEqual(code, 200, body)
        self.assertLess(time.monotonic() - started, 2)

    async def test_clients_leaving_queue_never_reach_consumer(self) -> None:
        """Clients that disconnect while queued never reach their consumer and leave the queue
        at once: /v1/status queued goes back to 0 while the holder still runs."""
        mvoice, whisper = self.stack["mvoice"], self.stack["whisper"]
        since = time.time()
        await set_faults(mvoice.consumer, {"delay_s": {"/api/synthesize": 1.5}})
        holder = self.post_later("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "the slow request to hold the GPU")
        leaving = [await self.raw("stt") for _ in range(3)]
        await wait_for(lambda: self.queued("whisper", 3), 5, "three queued requests")
        for conn in leaving:
            conn.abort()
        await wait_for(lambda: self.queued("whisper", 0), 1, "the queue to drop them")
        s = await self.scheduler()
        self.assertEqual((s["queued"], s["holder"]), (0, "mvoice"), s)
        code, body = await holder
        self.assertEqual(code, 200, body)
        await self.idle()
        await sleep(0.3)  # time for a request wrongly kept to reach whisper
        self.assertEqual(await whisper.work(since), [])
        # whisper itself still works: exactly one entry for one request.
        code, body = await post(self.http, "stt")
        self.assertEqual(code, 200, body)
        self.assertEqual(len(await whisper.work(since)), 1)

    async def test_priority_order(self) -> None:
        """Behind a slow holder, a high-priority request queued after a low-priority one for
        another consumer runs first."""
        mvoice, whisper, ollama = self.stack["mvoice"], self.stack["whisper"], self.stack["ollama"]
        since = time.time()
        await set_faults(mvoice.consumer, {"delay_s": {"/api/synthesize": 1.2}})
        holder = self.post_later("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "the slow request to hold the GPU")
        low = self.post_later("llm")  # ollama, priority 0
        await wait_for(lambda: self.queued("ollama", 1), 5, "the low-priority request to queue")
        high = self.post_later("stt")  # whisper, priority 4
        await wait_for(lambda: self.queued("whisper", 1), 5, "the high-priority request to queue")
        self.assertTrue(await self.holder_is("mvoice"), "the holder ended too soon for this test")
        for d in (holder, low, high):
            code, body = await d
            self.assertEqual(code, 200, body)
        [w] = await whisper.work(since)
        [o] = await ollama.work(since)
        [m] = await mvoice.work(since)
        self.assertLess(w["start"], o["start"], "the low-priority request ran first")
        self.assertLessEqual(m["end"], w["start"])
        self.assertLessEqual(w["end"], o["start"])

    async def test_holder_admits_own_past_lower_priority(self) -> None:
        """While the holder runs below its max_concurrency and only a lower-priority request
        for another consumer waits, a new request of the holder joins it at once."""
        mvoice, ollama = self.stack["mvoice"], self.stack["ollama"]
        since = time.time()
        await set_faults(mvoice.consumer, {"delay_s": {"/api/synthesize": 0.8}})
        first = self.post_later("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "mvoice to hold the GPU")
        low = self.post_later("llm")  # ollama, priority 0 < mvoice's 2
        await wait_for(lambda: self.queued("ollama", 1), 5, "the low-priority request to queue")
        second = self.post_later("tts")
        for d in (first, second, low):
            code, body = await d
            self.assertEqual(code, 200, body)
        entries = await mvoice.work(since)
        [o] = await ollama.work(since)
        self.assertEqual(len(entries), 2, entries)
        self.assertEqual(most_at_once(entries), 2, f"mvoice's requests ran one by one: {entries}")
        self.assertGreaterEqual(o["start"], max(e["end"] for e in entries))

    async def test_holder_waits_for_higher_priority(self) -> None:
        """While a higher-priority request for another consumer waits, the holder admits no
        more of its own: that request runs before the holder's next one."""
        mvoice, whisper = self.stack["mvoice"], self.stack["whisper"]
        since = time.time()
        await set_faults(mvoice.consumer, {"delay_s": {"/api/synthesize": 0.8}})
        first = self.post_later("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "mvoice to hold the GPU")
        high = self.post_later("stt")  # whisper, priority 4 > mvoice's 2
        await wait_for(lambda: self.queued("whisper", 1), 5, "the high-priority request to queue")
        second = self.post_later("tts")
        for d in (first, second, high):
            code, body = await d
            self.assertEqual(code, 200, body)
        m1, m2 = sorted(await mvoice.work(since), key=lambda e: e["start"])
        [w] = await whisper.work(since)
        self.assertGreaterEqual(w["start"], m1["end"])
        self.assertGreaterEqual(m2["start"], w["end"], "the holder's own request jumped the queue")

    async def test_max_concurrency_two_never_three(self) -> None:
        """A consumer with max_concurrency 2 runs two of its requests at once, never three."""
        mvoice = self.stack["mvoice"]
        since = time.time()
        results = [self.post_later("tts") for _ in range(5)]
        for d in results:
            code, body = await d
            self.assertEqual(code, 200, body)
        entries = await mvoice.work(since)
        self.assertEqual(len(entries), 5, entries)
        self.assertEqual(most_at_once(entries), 2, entries)

    async def test_one_consumer_at_a_time_under_mixed_load(self) -> None:
        """Under a mixed concurrent load, no two different consumers ever work at once."""
        since = time.time()
        kinds = ["tts", "stt", "llm", "tts", "llm", "stt", "tts", "stt", "llm", "tts"]
        results = [self.post_later(kind) for kind in kinds]
        codes = []
        for d in results:
            code, body = await d
            codes.append(code)
            self.assertEqual(code, 200, body)
        entries = {name: await sim.work(since) for name, sim in self.stack.sims.items()}
        self.assertEqual(
            {name: len(e) for name, e in entries.items()}, {"mvoice": 4, "whisper": 3, "ollama": 3}
        )
        clashes = [
            (a, b)
            for name, mine in entries.items()
            for other, theirs in entries.items()
            if name < other
            for a in mine
            for b in theirs
            if overlap(a, b)
        ]
        self.assertEqual(clashes, [])
        self.assertLessEqual(most_at_once(entries["mvoice"]), 2)


# -- the queue's limits: one shared stack, max_queue 2, queue_timeout_s 1 --------


async def _queue_stack() -> SchedStack:
    return await build_stack(
        "mgpu-queue-",
        [
            Sim("mvoice", "mvoice", 2800, preload=True, work_s=0.1, block={"timeout_s": 10}),
            Sim("whisper", "whisper", 1500, preload=True, work_s=0.1, block={"timeout_s": 10}),
        ],
        {"tts": "mvoice", "stt": "whisper"},
        scheduler={"max_queue": 2, "queue_timeout_s": 1},
        health_interval_s=1,
    )


class QueueLimitTests(_SharedCase):
    """max_queue 2 and queue_timeout_s 1."""

    key = "scheduling-queue"
    build = staticmethod(_queue_stack)

    async def hold(self) -> RawConnection:
        """A request holding the GPU in mvoice, which never answers it."""
        await set_faults(self.stack["mvoice"].consumer, {"hang": ["/api/synthesize"]})
        conn = await self.raw("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "the request to hold the GPU")
        return conn

    async def test_queue_full(self) -> None:
        """With max_queue 2 behind a hung holder, the third waiting request gets 503 queue_full
        with a Retry-After of at least 1 second."""
        holder = await self.hold()
        rejected = (await self.scheduler())["rejected"]
        queued = []
        for n in (1, 2):
            queued.append(await self.raw("stt"))
            await wait_for(partial(self.queued, "whisper", n), 0.8, f"{n} queued")
        third = await self.raw("stt")
        response = parse_response(await closed(third, 2))
        self.assertBrokerError(response.status, response.json(), 503, "queue_full", "whisper")
        retry_after = response.header("Retry-After")
        self.assertIsNotNone(retry_after, response.headers)
        assert retry_after is not None
        self.assertTrue(retry_after.isdigit(), retry_after)
        self.assertGreaterEqual(int(retry_after), 1)
        self.assertEqual((await self.scheduler())["rejected"], rejected + 1)
        for conn in queued:
            self.assertFalse(conn.closed.called, "a queued request was answered")
        for conn in (*queued, holder):
            conn.abort()

    async def test_queue_timeout(self) -> None:
        """A request waiting longer than queue_timeout_s (1 s) behind a hung holder gets
        503 queue_timeout and never reaches its consumer."""
        whisper = self.stack["whisper"]
        since = time.time()
        holder = await self.hold()
        before = await self.scheduler()
        started = time.monotonic()
        code, error = await post(self.http, "stt", timeout=10)
        elapsed = time.monotonic() - started
        self.assertBrokerError(code, error, 503, "queue_timeout", "whisper")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 2.0)
        after = await self.scheduler()
        self.assertEqual(after["holder"], "mvoice", after)
        self.assertEqual(after["rejected"], before["rejected"] + 1, after)
        self.assertEqual(after["failed"], before["failed"], after)
        holder.abort()
        await self.idle()
        self.assertEqual(await whisper.work(since), [])


if __name__ == "__main__":
    _tap_main(sys.argv[1:])
