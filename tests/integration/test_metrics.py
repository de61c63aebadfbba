"""``GET /metrics`` of the real daemon, after a real eviction (SPEC section 8).

The stack is the eviction stack of ``test_scheduling``: the daemon under
``twistd`` reading a 16384 MiB card through the stand-in nvidia-smi, a 13 GiB
comfyui resident and a 2.8 GiB mvoice that does not fit beside it (1 GiB is
held by "the desktop"), so mvoice's first request evicts comfyui.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from mgpu.gpu import MIB
from tests.integration.harness import HttpClient, set_faults, shared_stacks, sleep, wait_for
from tests.integration.test_scheduling import SchedStack, Sim, build_stack, post

#: The labels of the first card's series (SPEC 9.5: GPU series carry ``gpu``).
GPU0 = frozenset({("gpu", "0")})

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def smi_children(daemon_pid: int) -> list[int]:
    """The stand-in nvidia-smi processes the daemon is running now (its direct children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"fake_nvidia_smi.py" in cmdline:
            found.append(int(entry.name))
    return found


def set_smi_delay(state_path: Path, delay_s: float) -> None:
    """Make every later stand-in nvidia-smi run take ``delay_s`` (the rest of the state kept)."""
    state = json.loads(state_path.read_text("utf-8"))
    state["delay_s"] = delay_s
    tmp = state_path.with_suffix(".delay.tmp")
    tmp.write_text(json.dumps(state), "utf-8")
    os.replace(tmp, state_path)


class MetricsTests(TestCase):
    """One stack per test: what an eviction and served requests leave in the scrape."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        await shared_stacks.release()  # one daemon at a time on this machine
        self.stack: SchedStack = await build_stack(
            "mgpu-metrics-",
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.05),
                Sim("mvoice", "mvoice", 2800, work_s=0.05, load_s=0.05),
            ],
            {"tts": "mvoice", "image": "comfyui"},
            external_mib=1024,  # 2360 MiB free; mvoice needs 2800 + 256
        )
        self.addCleanup(lambda: ensureDeferred(self.stack.stop()))
        self.http: HttpClient = self.stack.client()
        self.addCleanup(self.http.close)

        async def probed() -> bool:
            consumers = (await self.http.status())["consumers"]
            return bool(consumers["comfyui"]["loaded"] is True)

        await wait_for(probed, 10, "comfyui to be seen loaded")

    async def scrape(self) -> tuple[Any, Samples]:
        """``GET /metrics``: the response and its samples (name -> {labels: value})."""
        response, body = await self.http.request("GET", "/metrics", timeout=10)
        self.assertEqual(response.code, 200, body[:300])
        samples: Samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
        return response, samples

    def gpu_file(self) -> dict[str, Any]:
        """GPU 0 as the stand-in nvidia-smi reports it now."""
        gpu: dict[str, Any] = json.loads(self.stack.gpu_state.read_text("utf-8"))["gpus"][0]
        return gpu

    async def test_eviction_requests_and_gpu(self) -> None:
        """After mvoice's requests evict comfyui once: the text content type, one eviction of
        comfyui, one load of mvoice, the requests counted by consumer and code, and GPU gauges
        equal to the stand-in nvidia-smi's figures."""
        response, before = await self.scrape()
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()]
        )
        self.assertEqual(before.get("mgpu_evictions_total", {}), {})

        for _ in range(2):
            code, body = await post(self.http, "tts")
            self.assertEqual(code, 200, body)
        await set_faults(self.stack["mvoice"].consumer, {"status": {"/api/synthesize": 500}})
        code, body = await post(self.http, "tts")
        self.assertEqual(code, 500, body)

        _, after = await self.scrape()
        self.assertEqual(after["mgpu_evictions_total"], {labels(consumer="comfyui"): 1.0})
        self.assertEqual(after["mgpu_eviction_free_seconds_count"], {labels(consumer="comfyui"): 1})
        self.assertEqual(after["mgpu_eviction_age_seconds_count"], {labels(consumer="comfyui"): 1})
        self.assertEqual(
            after["mgpu_loads_total"], {labels(consumer="mvoice", reason="request"): 1.0}
        )
        self.assertEqual(after["mgpu_load_duration_seconds_count"], {labels(consumer="mvoice"): 1})
        self.assertEqual(after["mgpu_request_duration_seconds_count"], {
            labels(consumer="mvoice", code="200"): 2.0,
            labels(consumer="mvoice", code="500"): 1.0,
        })  # fmt: skip
        self.assertEqual(after["mgpu_queue_wait_seconds_count"], {
            labels(consumer="mvoice", code="200"): 2.0,
            labels(consumer="mvoice", code="500"): 1.0,
        })  # fmt: skip
        # Only the first request waited for the eviction and the load (over 50 ms of load_s).
        waits = after["mgpu_queue_wait_seconds_bucket"]
        self.assertEqual(waits[labels(consumer="mvoice", code="200", le="0.025")], 1.0)
        requests = after["mgpu_http_requests_total"]
        self.assertEqual(requests[labels(route="/v1/tts", code="200")], 2.0)
        self.assertEqual(requests[labels(route="/v1/tts", code="500")], 1.0)
        self.assertGreaterEqual(requests[labels(route="/v1/status", code="200")], 1.0)
        self.assertEqual(after["mgpu_consumer_loaded"], {
            labels(consumer="comfyui"): 0.0,
            labels(consumer="mvoice"): 1.0,
        })  # fmt: skip
        self.assertEqual(after["mgpu_consumer_up"], {
            labels(consumer="comfyui"): 1.0,
            labels(consumer="mvoice"): 1.0,
        })  # fmt: skip

        # The poller reads every second: wait for a reading taken after the eviction.
        expected_used = 1024 + 2800
        self.assertEqual(self.gpu_file()["used_mib"], expected_used)

        async def current() -> Samples | None:
            _, samples = await self.scrape()
            used = samples.get("mgpu_gpu_memory_used_bytes", {}).get(GPU0)
            return samples if used == expected_used * MIB else None

        samples = await wait_for(current, 5, "a GPU reading after the eviction")
        gpu = self.gpu_file()
        self.assertEqual(samples["mgpu_gpu_reading_ok"], {GPU0: 1.0})
        total = gpu["total_mib"]
        self.assertEqual(samples["mgpu_gpu_memory_total_bytes"], {GPU0: total * MIB})
        free = (total - gpu["used_mib"]) * MIB
        self.assertEqual(samples["mgpu_gpu_memory_free_bytes"], {GPU0: free})
        self.assertEqual(samples["mgpu_gpu_info"], {
            labels(gpu="0", index="0", name=gpu["name"], source="nvidia-smi"): 1.0,
        })  # fmt: skip

    async def test_scrape_does_not_wait_for_slow_nvidia_smi(self) -> None:
        """While the stand-in nvidia-smi takes 3 s to answer, a scrape answers at once with
        the last reading, and the reading is still running when it does."""

        async def read_once() -> bool:
            _, samples = await self.scrape()
            return samples["mgpu_gpu_reading_ok"] == {GPU0: 1.0}

        # A scrape serves the last reading: first make sure there is a good one.
        await wait_for(read_once, 10, "a first good GPU reading")
        set_smi_delay(self.stack.gpu_state, 3.0)
        self.addCleanup(set_smi_delay, self.stack.gpu_state, 0)
        daemon = self.stack.daemon
        assert daemon is not None

        async def slow_reading() -> set[int]:
            """The readings that were running 0.3 s ago and still are (not a quick old one)."""
            running = set(smi_children(daemon.pid))
            if not running:
                return set()
            await sleep(0.3)
            return running & set(smi_children(daemon.pid))

        [reading] = await wait_for(slow_reading, 5, "a slow nvidia-smi to be running")
        started = time.monotonic()
        _, samples = await self.scrape()
        elapsed = time.monotonic() - started
        self.assertIn(reading, smi_children(daemon.pid), "the reading ended before the scrape")
        self.assertLess(elapsed, 1.0)
        self.assertEqual(samples["mgpu_gpu_reading_ok"], {GPU0: 1.0})
        self.assertIn(GPU0, samples["mgpu_gpu_memory_used_bytes"])
