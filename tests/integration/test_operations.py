"""Operating the daemon end to end: admin load and unload, reload, SIGHUP, the event stream.

Each test builds its own stack (``_SchedCase.fresh``): simulated consumers on
the stand-in nvidia-smi's 16384 MiB card, and the daemon under ``twistd``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from tests.integration.harness import RawConnection, connect, get, wait_for
from tests.integration.test_scheduling import Sim, _SchedCase, ledger_owners, post

ROUTING = {"tts": "mvoice", "image": "comfyui"}


class EventReader(RawConnection):
    """A ``GET /v1/events`` client that parses the stream as it arrives."""

    def events(self) -> list[dict[str, Any]]:
        _, _, stream = self.data().partition(b"\r\n\r\n")
        found = []
        for block in stream.decode("utf-8", "replace").split("\n\n"):
            for line in block.split("\n"):
                if line.startswith("data: "):
                    found.append(json.loads(line[6:]))
        return found

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["kind"] == kind]


class _OperationsCase(_SchedCase):
    timeout = 60

    async def comfyui_and_mvoice(self, **mvoice: Any) -> None:
        """comfyui (13000 MiB) resident, on a card with 1 GiB taken; mvoice (2800 MiB) not
        resident unless ``preload`` (then nothing else is taken: both fit)."""
        preload = bool(mvoice.get("preload"))
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, **{"work_s": 0.1, "load_s": 0.05, **mvoice}),
            ],
            ROUTING,
            external_mib=0 if preload else 1024,
        )
        await wait_for(lambda: self.loaded_as({"comfyui": True, "mvoice": preload}), 5, "probes")

    async def admin(self, name: str, action: str, timeout: float = 20) -> tuple[int, Any]:
        response, body = await self.http.json(
            "POST", f"/v1/admin/consumers/{name}/{action}", timeout=timeout
        )
        return response.code, body

    async def events(self, query: str = "") -> EventReader:
        reader = await connect(self.stack.port, EventReader())
        self.addCleanup(reader.abort)
        reader.send(get(f"/v1/events{query}"))
        await wait_for(lambda: b"retry:" in reader.data(), 5, "the event stream to open")
        return reader

    @property
    def config_path(self) -> Path:
        return self.stack.workdir / "mgpumanager.yaml"

    def edit_config(self, change: Any) -> None:
        """Rewrite the daemon's configuration file with ``change(document)`` applied."""
        doc = yaml.safe_load(self.config_path.read_text("utf-8"))
        change(doc)
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")


class AdminTests(_OperationsCase):
    """``POST /v1/admin/consumers/<name>/load|unload``."""

    async def test_unload_then_load(self) -> None:
        """An admin unload calls the consumer's unload route once (not an eviction) and its
        memory leaves the card; an admin load makes room and loads it back."""
        await self.comfyui_and_mvoice()
        comfyui = self.stack["comfyui"]
        stream = await self.events()
        code, body = await self.admin("comfyui", "unload")
        self.assertEqual((code, body), (200, {"consumer": "comfyui", "loaded": False}))
        self.assertEqual(len(comfyui.calls_to("/free")), 1, comfyui.calls())
        self.assertNotIn("comfyui", ledger_owners(self.stack.gpu_state))
        doc = await self.status()
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], False)
        self.assertEqual(doc["scheduler"]["evictions"], 0, doc["scheduler"])
        await wait_for(lambda: stream.of_kind("unload"), 5, "the unload event")
        self.assertEqual(
            [(e["consumer"], e["reason"]) for e in stream.of_kind("unload")], [("comfyui", "admin")]
        )

        # mvoice (no room beside comfyui) is loaded by the admin route: room is free now.
        code, body = await self.admin("mvoice", "load")
        self.assertEqual((code, body), (200, {"consumer": "mvoice", "loaded": True}))
        self.assertEqual(ledger_owners(self.stack.gpu_state), {"external": 1024, "mvoice": 2800})
        self.assertTrue((await self.stack["mvoice"].state())["loaded"])
        await wait_for(lambda: stream.of_kind("load"), 5, "the load event")
        self.assertEqual(stream.of_kind("load")[0]["consumer"], "mvoice")

    async def test_admin_load_makes_room(self) -> None:
        """Loading a consumer that does not fit evicts the resident one first, as a request
        would: the eviction is counted and streamed with its victim."""
        await self.comfyui_and_mvoice()
        stream = await self.events()
        code, body = await self.admin("mvoice", "load")
        self.assertEqual(code, 200, body)
        doc = await self.status()
        self.assertEqual(doc["scheduler"]["evictions"], 1, doc["scheduler"])
        self.assertIs(doc["consumers"]["comfyui"]["loaded"], False)
        await wait_for(lambda: stream.of_kind("evict"), 5, "the evict event")
        [evict] = stream.of_kind("evict")
        self.assertEqual((evict["consumer"], evict["target"]), ("comfyui", "mvoice"))
        self.assertEqual(evict["freed_mib"], 13000, evict)

    async def test_unload_waits_for_the_lease(self) -> None:
        """An unload asked while another consumer computes runs only once that work ended."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("mvoice", "mvoice", 2800, preload=True, work_s=1.0),
            ],
            ROUTING,
        )
        tts = self.post_later("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "mvoice to hold the GPU")
        code, body = await self.admin("comfyui", "unload")
        self.assertEqual(code, 200, body)
        self.assertEqual((await tts)[0], 200)
        [work] = await self.stack["mvoice"].work()
        [free] = self.stack["comfyui"].calls_to("/free")
        self.assertGreaterEqual(free["at"], work["end"], (free, work))

    async def test_refusals(self) -> None:
        """Unknown consumers are not_found; a vram_managed unload and a missing load route
        are bad_request; nothing is called."""
        await self.fresh(
            [
                Sim("comfyui", "comfyui", 13000, preload=True, work_s=0.1, tap=True),
                Sim("ollama", "ollama", 6000, preload=True),
            ],
            {"image": "comfyui", "llm": "ollama"},
        )
        cases = [
            ("nobody", "load", 404, "not_found"),
            ("ollama", "unload", 400, "bad_request"),
            ("comfyui", "load", 400, "bad_request"),  # comfyui loads on its first prompt
        ]
        for name, action, status, error in cases:
            code, body = await self.admin(name, action)
            self.assertEqual((code, body["error"]), (status, error), (name, action, body))
        self.assertEqual(self.stack["comfyui"].calls(), [])


class ReloadTests(_OperationsCase):
    """``POST /v1/admin/reload`` and ``SIGHUP``."""

    async def reload(self) -> tuple[int, Any]:
        response, body = await self.http.json("POST", "/v1/admin/reload")
        return response.code, body

    async def test_reload_keeps_unchanged_state(self) -> None:
        """A reload that changes one consumer's priority and removes none keeps every
        consumer's state (loaded, last used) and applies the new settings."""
        await self.comfyui_and_mvoice()
        code, _ = await post(self.http, "image")
        self.assertEqual(code, 200)
        await self.idle()
        before = (await self.status())["consumers"]["comfyui"]
        self.edit_config(lambda doc: doc["consumers"]["mvoice"].update(priority=4))
        code, body = await self.reload()
        self.assertEqual(code, 200, body)
        self.assertEqual(body["added"], [])
        self.assertEqual(body["removed"], [])
        self.assertEqual(body["restarted_state"], [])
        after = (await self.status())["consumers"]["comfyui"]
        self.assertEqual(
            (after["loaded"], after["last_used"]), (before["loaded"], before["last_used"])
        )
        self.assertIsNotNone(after["last_used"])

    async def test_bad_file_keeps_running_configuration(self) -> None:
        """A reload of a broken file is refused with the field named; the daemon goes on
        serving with the configuration it had."""
        await self.comfyui_and_mvoice()
        self.edit_config(lambda doc: doc["consumers"]["mvoice"].update(url="ftp://nowhere"))
        code, body = await self.reload()
        self.assertEqual((code, body["error"]), (400, "bad_request"), body)
        self.assertIn("consumers.mvoice.url", body["message"])
        code, answer = await post(self.http, "tts")
        self.assertEqual(code, 200, answer)

    async def test_reload_adds_and_removes(self) -> None:
        """A consumer removed from the file leaves the status and its kind's routing; the
        request that was running on it ends normally."""
        await self.comfyui_and_mvoice(work_s=1.0, preload=True)
        tts = self.post_later("tts")
        await wait_for(lambda: self.holder_is("mvoice"), 5, "mvoice to hold the GPU")

        def remove_mvoice(doc: dict[str, Any]) -> None:
            del doc["consumers"]["mvoice"]
            del doc["routing"]["tts"]

        self.edit_config(remove_mvoice)
        code, body = await self.reload()
        self.assertEqual((code, body["removed"]), (200, ["mvoice"]), body)
        self.assertEqual((await tts)[0], 200)
        doc = await self.status()
        self.assertEqual(set(doc["consumers"]), {"comfyui"})
        await self.idle()
        code, error = await post(self.http, "tts")
        self.assertEqual((code, error["error"]), (404, "no_consumer"), error)

    async def test_sighup_reloads(self) -> None:
        """SIGHUP applies the file like the admin route; a bad file on SIGHUP is logged and
        changes nothing."""
        await self.comfyui_and_mvoice()
        assert self.stack.daemon is not None
        pid = self.stack.daemon.pid
        self.edit_config(lambda doc: doc.setdefault("limits", {}).update(max_body_mib=1))
        os.kill(pid, signal.SIGHUP)

        async def limited() -> bool:
            response, _ = await self.http.request("POST", "/v1/tts", body=b"x" * (2 * 2**20))
            return bool(response.code == 413)

        await wait_for(limited, 10, "the 1 MiB body limit after SIGHUP")
        self.edit_config(lambda doc: doc["limits"].update(max_body_mib="lots"))
        os.kill(pid, signal.SIGHUP)
        output = self.stack.daemon.process

        def refused() -> bool:
            return "reload refused" in output.stdout()

        await wait_for(refused, 10, "the refused reload in the log")
        self.assertIn("limits.max_body_mib", output.stdout())
        self.assertTrue(await limited())  # still the 1 MiB limit


class EventStreamTests(_OperationsCase):
    """``GET /v1/events``."""

    async def test_history_and_resume(self) -> None:
        """A new stream with ?history=N starts with the last N kept events; one that sends
        Last-Event-ID gets exactly the events after it."""
        await self.comfyui_and_mvoice()
        code, _ = await post(self.http, "tts")  # evicts comfyui, loads mvoice
        self.assertEqual(code, 200)
        started = time.monotonic()
        stream = await self.events("?history=10")
        await wait_for(lambda: len(stream.events()) >= 2, 5, "the kept events")
        kinds = [e["kind"] for e in stream.events()]
        self.assertEqual(kinds[:2], ["evict", "load"], stream.events())
        ids = [e["id"] for e in stream.events()]
        self.assertEqual(ids, sorted(ids))
        self.assertLess(time.monotonic() - started, 5)

        resumed = await connect(self.stack.port, EventReader())
        self.addCleanup(resumed.abort)
        resumed.send(get("/v1/events", headers={"Last-Event-ID": str(ids[0])}))
        await wait_for(lambda: resumed.events(), 5, "the replayed events")
        self.assertEqual([e["id"] for e in resumed.events()], ids[1:])

    async def test_headers(self) -> None:
        """The stream is text/event-stream, not cached, and not buffered by a proxy."""
        await self.comfyui_and_mvoice()
        stream = await self.events()
        head = stream.data().partition(b"\r\n\r\n")[0].decode("latin-1").lower()
        self.assertIn("content-type: text/event-stream", head)
        self.assertIn("cache-control: no-store", head)
        self.assertIn("x-accel-buffering: no", head)
