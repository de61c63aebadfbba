"""Tests for the simulator: mgpu.sim (ledgers, consumers, demo, CLI)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Final, cast
from unittest import mock

import ollama
import treq
from attrs import evolve
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mgpu.config import Config, load_config, parse_config
from mgpu.gpu import GpuProcess
from mgpu.ollama import parse_ps
from mgpu.sim import __main__ as sim_main
from mgpu.sim.consumers import (
    OLLAMA_MODELS,
    SPEECH_MODELS,
    VLLM,
    VLLM_MODEL,
    ConsumerSettings,
    OpenAISpeech,
    SimConsumer,
    make_consumer,
)
from mgpu.sim.demo import DEMO_TOTAL_MIB, demo_config, demo_settings, start_demo
from mgpu.sim.gpu import (
    VIRTUAL_PID_BASE,
    FileLedger,
    MemoryLedger,
    SimGpuReader,
    SpanLedger,
    span,
)
from mgpu.sim.http import CHUNK, BodyProducer, SimResource, SyntheticBody, parse_range, sim_site
from tests import fake_nvidia_smi

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parent.parent


def chunks_per_step(
    sim: Any, response: Any, steps: int = 3
) -> tuple[list[int], list[bytes], Deferred[None]]:
    """How many body chunks have arrived, then after each of ``steps`` work steps of 0.1 s;
    the chunks (growing as the body arrives), and the collection's Deferred."""
    chunks: list[bytes] = []
    done = treq.collect(response, chunks.append)
    sim.http.flush()
    seen = [len(chunks)]
    for _ in range(steps):
        sim.advance(0.1)
        seen.append(len(chunks))
    return seen, chunks, done


SMI_GPUS: Final = "--query-gpu=index,name,memory.total,memory.used,memory.free"
SMI_APPS: Final = "--query-compute-apps=pid,used_memory"


def fake_smi(path: Path, *args: str) -> str:
    """What tests/fake_nvidia_smi.py prints for the state file ``path``."""
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, {"FAKE_NVIDIA_SMI_STATE": str(path)}),
        contextlib.redirect_stdout(out),
    ):
        code = fake_nvidia_smi.main([*args, "--format=csv,noheader,nounits"])
    assert code == 0, code
    return out.getvalue()


class _Sim:
    """One simulated consumer behind StubTreq, on a Clock."""

    def __init__(self, test: SynchronousTestCase, service: str, **settings: Any) -> None:
        self.test = test
        self.clock = Clock()
        self.ledger = MemoryLedger()
        self.consumer: SimConsumer = make_consumer(
            ConsumerSettings.make(service, **settings), self.ledger, self.clock
        )
        self.http: Any = StubTreq(SimResource(self.consumer))

    def send(self, method: str, path: str, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.http.request(method, "http://sim" + path, **kwargs)
        self.http.flush()
        return d

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.http.flush()

    def answer(self, d: Deferred[Any]) -> tuple[int, bytes, Any]:
        """The response that has arrived: status, body bytes, the response."""
        response = self.test.successResultOf(d)
        body = treq.content(response)
        self.http.flush()
        return response.code, self.test.successResultOf(body), response

    def json(self, d: Deferred[Any]) -> tuple[int, Any]:
        code, body, _ = self.answer(d)
        return code, json.loads(body)

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """A request that answers without the clock moving."""
        return self.json(self.send(method, path, **kwargs))


class MemoryLedgerTests(SynchronousTestCase):
    def test_allocation_is_per_owner_not_additive(self) -> None:
        """Allocating twice for one owner holds the last size once; release drops only it."""
        ledger = MemoryLedger()
        ledger.allocate("a", 100)
        ledger.allocate("a", 300)
        ledger.allocate("b", 50)
        self.assertEqual(ledger.used_mib(), 350)
        ledger.release("a")
        ledger.release("nobody")
        self.assertEqual((ledger.used_mib(), ledger.owners()), (50, {"b": 50}))

    def test_virtual_pids_by_order_of_first_allocation(self) -> None:
        """Each owner holds its memory under its own virtual pid, above any real pid, kept
        across a release and a reallocation."""
        ledger = MemoryLedger()
        ledger.allocate("a", 100)
        ledger.allocate("b", 50)
        ledger.allocate("a", 300)
        self.assertGreater(VIRTUAL_PID_BASE, 2**22)
        first, second = VIRTUAL_PID_BASE, VIRTUAL_PID_BASE + 1
        self.assertEqual((ledger.pid_of("a"), ledger.pid_of("b")), (first, second))
        self.assertEqual(ledger.processes(), {first: 300, second: 50})
        ledger.release("a")
        self.assertEqual(ledger.processes(), {second: 50})
        ledger.allocate("c", 7)
        ledger.allocate("a", 1)
        self.assertEqual(ledger.processes(), {first: 1, second: 50, first + 2: 7})

    def test_pid_of_before_allocation(self) -> None:
        """Asking first gives the pid the owner's memory will show under, and holds nothing."""
        ledger = MemoryLedger()
        pid = ledger.pid_of("comfyui")
        self.assertEqual((pid, ledger.processes()), (VIRTUAL_PID_BASE, {}))
        ledger.allocate("ollama", 10)
        ledger.allocate("comfyui", 20)
        self.assertEqual(ledger.processes(), {pid: 20, pid + 1: 10})

    def test_cards_sharing_pids_give_an_owner_one_pid(self) -> None:
        """Cards of one host share their pids: an owner has the same pid on each card, and
        each card lists only the owners it holds."""
        pids: dict[str, int] = {}
        first, second = MemoryLedger(pids=pids), MemoryLedger(pids=pids)
        first.allocate("mvoice", 10)
        second.allocate("comfyui", 20)
        second.allocate("mvoice", 30)
        self.assertEqual(first.pid_of("comfyui"), second.pid_of("comfyui"))
        self.assertEqual(first.processes(), {VIRTUAL_PID_BASE: 10})
        self.assertEqual(second.processes(), {VIRTUAL_PID_BASE: 30, VIRTUAL_PID_BASE + 1: 20})


class SpanLedgerTests(SynchronousTestCase):
    def test_holds_its_size_on_each_card(self) -> None:
        """A consumer on two cards allocates and releases on both; it reads the first."""
        cards = [MemoryLedger(), MemoryLedger()]
        cards[1].allocate("other", 5)
        ledger = span(cards)
        self.assertIsInstance(ledger, SpanLedger)
        ledger.allocate("vllm", 100)
        self.assertEqual([c.owners() for c in cards], [{"vllm": 100}, {"other": 5, "vllm": 100}])
        self.assertEqual((ledger.used_mib(), ledger.owners()), (100, {"vllm": 100}))
        ledger.release("vllm")
        self.assertEqual([c.used_mib() for c in cards], [0, 5])

    def test_one_card_is_its_own_ledger(self) -> None:
        card = MemoryLedger()
        self.assertIs(span([card]), card)


class FileLedgerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def smi(self) -> str:
        """What tests/fake_nvidia_smi.py prints for the file."""
        return fake_smi(self.path, SMI_GPUS)

    def smi_apps(self) -> str:
        """What tests/fake_nvidia_smi.py prints for the file's processes on GPU 0."""
        return fake_smi(self.path, SMI_APPS, "-i", "0")

    def test_allocations_record_this_process(self) -> None:
        """An allocation records the pid of the process that made it, apart from the owners;
        a release drops it; fake_nvidia_smi lists each owner with a pid."""
        ledger = FileLedger(self.path)
        ledger.allocate("mvoice", 2800)
        ledger.allocate("ollama", 6000)
        data = json.loads(self.path.read_text())
        self.assertEqual(data["owners"], {"0": {"mvoice": 2800, "ollama": 6000}})
        self.assertEqual(data["pids"], {"0": {"mvoice": os.getpid(), "ollama": os.getpid()}})
        self.assertEqual(ledger.processes(), {os.getpid(): 8800})
        self.assertEqual(self.smi_apps(), f"{os.getpid()}, 2800\n{os.getpid()}, 6000\n")
        ledger.release("mvoice")
        self.assertEqual(json.loads(self.path.read_text())["pids"], {"0": {"ollama": os.getpid()}})
        self.assertEqual(ledger.processes(), {os.getpid(): 6000})
        ledger.release("ollama")
        self.assertEqual((ledger.processes(), self.smi_apps()), ({}, ""))

    def test_processes_per_pid_and_external_has_none(self) -> None:
        """Owners of other processes are theirs; the external memory has no process; a
        test's own processes list comes first in fake_nvidia_smi's answer."""
        state = {"gpus": [{"index": 0, "name": "X", "total_mib": 8000, "used_mib": 500}],
                 "processes": {"0": [{"pid": 3, "used_mib": None}]}}  # fmt: skip
        self.path.write_text(json.dumps(state))
        ledger = FileLedger(self.path)
        ledger.allocate("mvoice", 1000)
        data = json.loads(self.path.read_text())
        data["pids"]["0"]["comfyui"] = 4321  # another process's allocation
        data["owners"]["0"]["comfyui"] = 4000
        self.path.write_text(json.dumps(data))
        self.assertEqual(ledger.owners(), {"external": 500, "mvoice": 1000, "comfyui": 4000})
        self.assertEqual(ledger.processes(), {os.getpid(): 1000, 4321: 4000})
        self.assertEqual(self.smi_apps(), f"3, [N/A]\n{os.getpid()}, 1000\n4321, 4000\n")

    def test_indexes_apart(self) -> None:
        """Each card lists only its own processes."""
        FileLedger(self.path, index=0).allocate("a", 10)
        other = FileLedger(self.path, index=1)
        self.assertEqual(other.processes(), {})
        other.allocate("b", 20)
        self.assertEqual(FileLedger(self.path).processes(), {os.getpid(): 10})
        self.assertEqual(other.processes(), {os.getpid(): 20})

    def test_fake_nvidia_smi_reads_the_file(self) -> None:
        """The state file is what fake_nvidia_smi reads, owners kept aside."""
        ledger = FileLedger(self.path, total_mib=16384, name="Sim")
        ledger.allocate("mvoice", 2800)
        ledger.allocate("ollama", 6000)
        self.assertEqual(self.smi(), "0, Sim, 16384, 8800, 7584\n")
        data = json.loads(self.path.read_text())
        self.assertEqual(data["owners"], {"0": {"mvoice": 2800, "ollama": 6000}})
        self.assertIsNone(data["fail"])
        ledger.release("mvoice")
        self.assertEqual((ledger.used_mib(), self.smi()), (6000, "0, Sim, 16384, 6000, 10384\n"))

    def test_two_ledgers_on_one_file_lose_no_update(self) -> None:
        """Two ledgers writing one file from two threads at once keep every allocation."""
        ledgers = [FileLedger(self.path), FileLedger(self.path)]

        def write(n: int) -> None:
            for i in range(60):
                ledgers[n].allocate(f"{n}-{i}", 1)

        threads = [threading.Thread(target=write, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual((ledgers[0].used_mib(), ledgers[1].used_mib()), (120, 120))
        self.assertEqual(json.loads(self.path.read_text())["gpus"][0]["used_mib"], 120)

    def test_keeps_test_keys_and_external_usage(self) -> None:
        """A test's own keys survive updates, and memory it wrote as used becomes 'external'."""
        state = {"gpus": [{"index": 0, "name": "X", "total_mib": 8000, "used_mib": 500}]}
        self.path.write_text(json.dumps(state | {"fail": "boom", "delay_s": 0}))
        ledger = FileLedger(self.path)
        ledger.allocate("mvoice", 1000)
        data = json.loads(self.path.read_text())
        self.assertEqual((data["fail"], data["delay_s"]), ("boom", 0))
        self.assertEqual(data["gpus"][0], {"index": 0, "name": "X", "total_mib": 8000,
                                           "used_mib": 1500})  # fmt: skip
        self.assertEqual(ledger.owners(), {"external": 500, "mvoice": 1000})

    def test_used_is_clamped_to_the_card_in_the_file(self) -> None:
        """Overcommit shows as a full card to nvidia-smi, never a negative free."""
        ledger = FileLedger(self.path, total_mib=1000)
        ledger.allocate("a", 800)
        ledger.allocate("b", 800)
        self.assertEqual(ledger.used_mib(), 1600)
        self.assertEqual(self.smi().split(", ")[3:], ["1000", "0\n"])


class _Broken:
    def used_mib(self) -> int:
        raise OSError("state file gone")

    def allocate(self, owner: str, mib: int) -> None:
        raise NotImplementedError

    def release(self, owner: str) -> None:
        raise NotImplementedError

    def owners(self) -> dict[str, int]:
        raise NotImplementedError

    def processes(self) -> dict[int, int]:
        raise OSError("state file gone")


class _NoProcesses(MemoryLedger):
    """A ledger whose memory reads but whose processes do not."""

    def processes(self) -> dict[int, int]:
        raise ValueError("pids unreadable")


class SimGpuReaderTests(SynchronousTestCase):
    def test_free_is_total_minus_used(self) -> None:
        """The reading is source sim, ok, with free = total - used at the clock's time."""
        ledger, clock = MemoryLedger(), Clock()
        clock.advance(60)
        ledger.allocate("mvoice", 2800)
        snap = self.successResultOf(SimGpuReader(ledger, clock, 16384, name="Card").read())
        self.assertEqual(
            (snap.source, snap.ok, snap.error, snap.index, snap.name),
            ("sim", True, None, 0, "Card"),
        )
        self.assertEqual((snap.total_mib, snap.used_mib, snap.free_mib), (16384, 2800, 13584))
        assert snap.read_at is not None
        self.assertEqual(snap.read_at.timestamp(), 60)

    def test_processes_sorted_by_pid(self) -> None:
        """The ledger's processes, sorted by pid, with no error."""
        ledger = MemoryLedger()
        ledger.pid_of("later")
        ledger.allocate("b", 30)
        ledger.allocate("later", 20)
        snap = self.successResultOf(SimGpuReader(ledger, Clock(), 16384).read())
        self.assertEqual(
            snap.processes,
            (GpuProcess(VIRTUAL_PID_BASE, 20), GpuProcess(VIRTUAL_PID_BASE + 1, 30)),
        )
        self.assertIsNone(snap.processes_error)
        self.assertEqual(
            self.successResultOf(SimGpuReader(MemoryLedger(), Clock(), 16384).read()).processes,
            (),
        )

    def test_processes_from_a_file_ledger(self) -> None:
        """A FileLedger's reading lists this process, which made the allocations."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = FileLedger(path)
        ledger.allocate("mvoice", 2800)
        snap = self.successResultOf(SimGpuReader(ledger, Clock(), 16384).read())
        self.assertEqual(snap.processes, (GpuProcess(os.getpid(), 2800),))

    def test_processes_that_fail_leave_the_memory_reading_ok(self) -> None:
        """A ledger whose processes cannot be read: memory ok, processes None with why."""
        ledger = _NoProcesses()
        ledger.allocate("a", 100)
        snap = self.successResultOf(SimGpuReader(ledger, Clock(), 16384).read())
        self.assertEqual((snap.ok, snap.used_mib), (True, 100))
        self.assertEqual(
            (snap.processes, snap.processes_error), (None, "simulated GPU: pids unreadable")
        )

    def test_overcommit_reads_as_a_full_card(self) -> None:
        """Used beyond the card reads as used = total, free = 0."""
        ledger = MemoryLedger()
        ledger.allocate("a", 20000)
        snap = self.successResultOf(SimGpuReader(ledger, Clock(), 16384).read())
        self.assertEqual((snap.used_mib, snap.free_mib), (16384, 0))

    def test_a_ledger_that_fails_gives_a_failed_snapshot(self) -> None:
        """A ledger error is a snapshot with ok false and the reason, never an errback."""
        snap = self.successResultOf(SimGpuReader(_Broken(), Clock(), 16384).read())
        self.assertFalse(snap.ok)
        self.assertIn("state file gone", snap.error or "")


class MVoiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = _Sim(self, "mvoice", load_s=0.3, work_s=0.2)

    def test_health_reports_loaded(self) -> None:
        """GET /api/health says ok and whether the model is loaded."""
        self.assertEqual(
            self.sim.call("GET", "/api/health"), (200, {"status": "ok", "loaded": False})
        )
        self.sim.consumer.loaded = True
        self.assertEqual(self.sim.call("GET", "/api/health")[1]["loaded"], True)

    def test_cold_start_then_warm(self) -> None:
        """The first synthesis loads first (load + work); the second only works."""
        d = self.sim.send("POST", "/api/synthesize", json={"text": "hello"})
        self.assertEqual(self.sim.ledger.used_mib(), 2800)  # claimed as the load starts
        self.sim.advance(0.3)  # loaded; the work starts now
        self.sim.advance(0.19)
        self.assertNoResult(d)
        self.sim.advance(0.01)
        code, body = self.sim.json(d)
        self.assertEqual(
            (code, body), (200, {"audio": "/audio/mvoice-1.wav", "bytes": 44 + 1920 * 5})
        )
        d = self.sim.send("POST", "/api/synthesize", json={"text": "hi"})
        self.sim.advance(0.2)
        self.assertEqual(self.sim.json(d)[0], 200)
        self.assertEqual([e.cold for e in self.sim.consumer.log], [True, False])

    def test_synthesize_needs_text(self) -> None:
        """A synthesis without text is a 400 and does no work."""
        self.assertEqual(self.sim.call("POST", "/api/synthesize", json={})[0], 400)
        self.assertEqual(self.sim.call("POST", "/api/synthesize", data=b"[1]")[0], 400)
        self.assertEqual(self.sim.consumer.log, [])

    def test_transcribe_returns_text(self) -> None:
        """POST /api/transcribe answers {"text": ...} after its work time."""
        self.sim.consumer.loaded = True
        d = self.sim.send("POST", "/api/transcribe", data=b"RIFF....")
        self.sim.advance(0.2)
        self.assertEqual(self.sim.json(d), (200, {"text": "simulated transcript of 8 bytes"}))
        self.assertEqual(self.sim.consumer.log[0].kind, "stt")

    def test_admin_load_takes_load_time_and_unload_releases(self) -> None:
        """The load route answers after the load time; unload frees the memory at once."""
        d = self.sim.send("POST", "/api/admin/load")
        self.sim.advance(0.29)
        self.assertNoResult(d)
        self.sim.advance(0.01)
        self.assertEqual(self.sim.json(d), (200, {"status": "ok", "loaded": True}))
        self.assertEqual(self.sim.call("POST", "/api/admin/load")[0], 200)  # already loaded
        self.assertEqual(self.sim.ledger.used_mib(), 2800)
        self.assertEqual(self.sim.call("POST", "/api/admin/unload")[1]["loaded"], False)
        self.assertEqual(self.sim.ledger.used_mib(), 0)
        self.assertEqual(self.sim.call("GET", "/api/health")[1]["loaded"], False)

    def test_unknown_route_404_and_wrong_method_405(self) -> None:
        """An unknown path is 404, a known path with another method 405 with Allow."""
        self.assertEqual(self.sim.call("GET", "/nope")[0], 404)
        code, _, response = self.sim.answer(self.sim.send("POST", "/api/health"))
        self.assertEqual((code, response.headers.getRawHeaders("Allow")), (405, ["GET"]))


class AudioTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = _Sim(self, "mvoice", preload=True)

    def test_synthesized_file_is_a_wav_of_the_announced_size(self) -> None:
        """The audio a synthesis names is served: a RIFF/WAVE file of the announced bytes."""
        d = self.sim.send("POST", "/api/synthesize", json={"text": "abc"})
        self.sim.advance(0.2)
        url, size = self.sim.json(d)[1].values()
        code, body, response = self.sim.answer(self.sim.send("GET", url))
        self.assertEqual((code, len(body), body[:4], body[8:12]), (200, size, b"RIFF", b"WAVE"))
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["audio/wav"])
        self.assertEqual(self.sim.call("GET", "/audio/mvoice-9.wav")[0], 404)

    def test_sized_body_and_range(self) -> None:
        """/audio/sized-N.bin is N pattern bytes; a Range gets 206 and exactly that slice."""
        n = 3 * CHUNK + 17
        code, body, response = self.sim.answer(self.sim.send("GET", f"/audio/sized-{n}.bin"))
        self.assertEqual((code, len(body)), (200, n))
        self.assertEqual(body, bytes(i % 251 for i in range(n)))
        self.assertEqual(response.length, n)
        headers = {"Range": "bytes=70000-70009"}
        code, part, response = self.sim.answer(
            self.sim.send("GET", f"/audio/sized-{n}.bin", headers=headers)
        )
        self.assertEqual((code, part), (206, body[70000:70010]))
        self.assertEqual(
            response.headers.getRawHeaders("Content-Range"), [f"bytes 70000-70009/{n}"]
        )

    def test_suffix_open_and_unsatisfiable_ranges(self) -> None:
        """Suffix and open ranges are cut at the end; a range past the end is 416."""
        self.assertEqual(parse_range(b"bytes=-10", 100), (90, 100))
        self.assertEqual(parse_range(b"bytes=95-", 100), (95, 100))
        self.assertEqual(parse_range(b"bytes=90-500", 100), (90, 100))
        self.assertIsNone(parse_range(b"bytes=1-2,5-6", 100))
        self.assertIsNone(parse_range(b"items=1-2", 100))
        self.assertRaises(ValueError, parse_range, b"bytes=100-", 100)
        headers = {"Range": "bytes=1000-"}
        code, _, response = self.sim.answer(
            self.sim.send("GET", "/audio/sized-1000.bin", headers=headers)
        )
        self.assertEqual(code, 416)
        self.assertEqual(response.headers.getRawHeaders("Content-Range"), ["bytes */1000"])

    def test_head_has_length_and_no_body(self) -> None:
        """HEAD on audio answers the whole file's Content-Length and no body."""
        transport = StringTransport()
        channel = sim_site(self.sim.consumer).buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(b"HEAD /audio/sized-300.bin HTTP/1.1\r\nHost: sim\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nContent-Length: 300", head)
        self.assertEqual(body, b"")
        channel.connectionLost(Failure(ConnectionDone()))

    def test_a_300_mib_body_is_written_in_chunks_with_backpressure(self) -> None:
        """The producer writes at most 64 KiB at a time, stops when paused, never holds the body."""
        request = _PausingRequest(pause_every=2)
        size = 300 * 2**20
        BodyProducer(cast(Any, request), SyntheticBody(size), 0, size).start()
        rounds = 0
        while not request.finished:
            self.assertEqual(request.since_pause, 2)
            request.resume()
            rounds += 1
        self.assertEqual((request.total, request.largest), (size, CHUNK))
        self.assertEqual(rounds, size // CHUNK // 2)
        self.assertEqual(request.tail, bytes(i % 251 for i in range(size - 16, size)))

    def test_producer_stops_when_the_client_leaves(self) -> None:
        """stopProducing (client gone) ends the writes and never finishes the request."""
        request = _PausingRequest(pause_every=1)
        BodyProducer(cast(Any, request), SyntheticBody(10 * CHUNK), 0, 10 * CHUNK).start()
        request.producer.stopProducing()
        request.producer.resumeProducing()
        self.assertEqual((request.total, request.finished), (CHUNK, False))


class _PausingRequest:
    """A request whose transport pauses the producer after every ``pause_every`` writes."""

    def __init__(self, pause_every: int) -> None:
        self.pause_every = pause_every
        self.producer: Any = None
        self.since_pause = self.total = self.largest = 0
        self.tail = b""
        self.finished = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.largest = max(self.largest, len(data))
        self.tail = (self.tail + data)[-16:]
        self.since_pause += 1
        if self.since_pause == self.pause_every:
            self.producer.pauseProducing()

    def finish(self) -> None:
        self.finished = True

    def resume(self) -> None:
        self.since_pause = 0
        self.producer.resumeProducing()


class WhisperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = _Sim(self, "whisper", load_s=0.15, work_s=0.2)

    def test_inference_cold_starts_then_answers_text(self) -> None:
        """POST /inference loads first, then answers {"text": ...}; health says ok."""
        self.assertEqual(self.sim.call("GET", "/health"), (200, {"status": "ok"}))
        d = self.sim.send("POST", "/inference", data=b"wav")
        self.assertEqual(self.sim.call("GET", "/health")[0], 200)  # only /load makes it 503
        self.sim.advance(0.15)
        self.assertNoResult(d)
        self.sim.advance(0.2)
        self.assertEqual(self.sim.json(d), (200, {"text": " simulated transcript"}))
        self.assertEqual(self.sim.ledger.used_mib(), 1500)

    def test_load_swaps_model_health_503_meanwhile_and_no_unload(self) -> None:
        """/load reloads (health 503 'loading model' meanwhile); there is no unload route."""
        self.sim.consumer.loaded = True
        d = self.sim.send("POST", "/load", data=b"model=x")
        self.assertEqual(self.sim.call("GET", "/health"), (503, {"status": "loading model"}))
        self.sim.advance(0.15)
        code, body, _ = self.sim.answer(d)
        self.assertEqual((code, body), (200, b"Load was successful!"))
        self.assertEqual(self.sim.call("GET", "/health")[0], 200)
        self.assertEqual(self.sim.call("POST", "/unload")[0], 404)


class OllamaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = _Sim(self, "ollama", load_s=0.6, work_s=0.4, tokens=4, keep_alive_s=5)

    def test_version_and_ps(self) -> None:
        """/api/version answers a version; /api/ps lists the model only once loaded."""
        self.assertEqual(self.sim.call("GET", "/api/version"), (200, {"version": "0.0.0-sim"}))
        self.assertEqual(self.sim.call("GET", "/api/ps"), (200, {"models": []}))
        d = self.sim.send("POST", "/api/generate", json={"model": "m1", "prompt": ""})
        self.sim.advance(0.6)
        self.assertEqual(self.sim.json(d)[1]["done_reason"], "load")
        self.assertEqual([m["name"] for m in self.sim.call("GET", "/api/ps")[1]["models"]], ["m1"])

    def test_streams_one_token_per_write(self) -> None:
        """After the cold load, each token arrives on its own as an NDJSON line, then done."""
        d = self.sim.send("POST", "/api/generate", json={"model": "m", "prompt": "hi"})
        self.sim.advance(0.6)
        self.assertNoResult(d)  # headers wait for the load and the first token
        self.sim.advance(0.1)
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/x-ndjson"])
        seen, chunks, done = chunks_per_step(self.sim, response)
        self.assertEqual(seen, [1, 2, 3, 5])  # the last step sends its token and "done"
        self.successResultOf(done)
        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        self.assertEqual(
            [line["response"] for line in lines], ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
        )
        self.assertEqual([line["done"] for line in lines], [False] * 4 + [True])
        self.assertEqual([c.count(b"\n") for c in chunks], [1] * 5)

    def test_keeps_model_resident_until_keep_alive(self) -> None:
        """Ollama frees its model keep_alive seconds after the last request, not before."""
        d = self.sim.send("POST", "/api/generate", json={"prompt": "x", "stream": False})
        for step in (0.6, 0.1, 0.1, 0.1, 0.1):  # the load, then one step per token
            self.sim.advance(step)
        code, body = self.sim.json(d)
        self.assertEqual(
            (code, body["response"], body["done"]), (200, "tok0 tok1 tok2 tok3 ", True)
        )
        self.sim.advance(4.9)
        self.assertEqual(self.sim.ledger.used_mib(), 6000)
        self.sim.advance(0.1)
        self.assertEqual((self.sim.ledger.used_mib(), self.sim.consumer.loaded), (0, False))

    def test_keep_alive_zero_unloads(self) -> None:
        """{"model": m, "keep_alive": 0} unloads at once; as a request field it frees after it."""
        self.sim.consumer.loaded = True
        self.sim.ledger.allocate("ollama", 6000)
        code, body = self.sim.call("POST", "/api/generate", json={"model": "m", "keep_alive": 0})
        self.assertEqual(
            (code, body["done_reason"], self.sim.ledger.used_mib()), (200, "unload", 0)
        )
        d = self.sim.send("POST", "/api/generate", json={"prompt": "x", "keep_alive": "0s"})
        self.sim.advance(0.6)
        self.assertEqual(self.sim.ledger.used_mib(), 6000)
        for _ in range(4):
            self.sim.advance(0.1)
        self.assertEqual(self.sim.answer(d)[0], 200)
        self.assertEqual(self.sim.ledger.used_mib(), 0)
        self.assertEqual(
            self.sim.call("POST", "/api/generate", json={"keep_alive": "soon"})[0], 400
        )


class ComfyUITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = _Sim(self, "comfyui", load_s=1.3, work_s=0.8)

    def prompt(self) -> str:
        code, body = self.sim.call("POST", "/prompt", json={"prompt": {"3": {}}})
        self.assertEqual(code, 200)
        return str(body["prompt_id"])

    def test_system_stats(self) -> None:
        """GET /system_stats answers the system and its devices."""
        code, body = self.sim.call("GET", "/system_stats")
        self.assertEqual((code, body["devices"][0]["type"]), (200, "cuda"))

    def test_prompt_answers_at_once_history_fills_when_done(self) -> None:
        """/prompt answers before any GPU work; /history/<id> is {} until the job completes."""
        code, body = self.sim.call("POST", "/prompt", json={"prompt": {}})
        self.assertEqual((code, body["number"], body["node_errors"]), (200, 1, {}))
        pid = body["prompt_id"]
        self.sim.advance(1.3)  # loaded; the work starts now
        self.sim.advance(0.7)
        self.assertEqual(self.sim.call("GET", f"/history/{pid}"), (200, {}))
        self.sim.advance(0.1)
        history = self.sim.call("GET", f"/history/{pid}")[1]
        self.assertEqual(history[pid]["status"]["completed"], True)
        self.assertEqual(history[pid]["outputs"], {})
        self.assertEqual(self.sim.consumer.log[0].cold, True)

    def test_jobs_run_one_at_a_time(self) -> None:
        """Two prompts run one after the other, never at once."""
        first, second = self.prompt(), self.prompt()
        self.assertEqual(len(self.sim.call("GET", "/queue")[1]["queue_pending"]), 1)
        self.sim.advance(1.3)
        self.sim.advance(0.8)
        self.assertNotEqual(self.sim.call("GET", f"/history/{first}")[1], {})
        self.assertEqual(self.sim.call("GET", f"/history/{second}")[1], {})
        self.sim.advance(0.8)
        self.assertNotEqual(self.sim.call("GET", f"/history/{second}")[1], {})
        a, b = self.sim.consumer.log
        assert a.end is not None
        self.assertLessEqual(a.end, b.start)

    def test_free_acts_only_after_the_running_job(self) -> None:
        """/free during a job answers at once; the memory frees when the job ends."""
        self.prompt()
        self.sim.advance(1.3)
        self.sim.advance(0.4)
        code, body, _ = self.sim.answer(
            self.sim.send("POST", "/free", json={"unload_models": True, "free_memory": True})
        )
        self.assertEqual((code, body), (200, b""))
        self.sim.advance(0.3)
        self.assertEqual(self.sim.ledger.used_mib(), 13000)
        self.sim.advance(0.1)
        self.assertEqual((self.sim.ledger.used_mib(), self.sim.consumer.loaded), (0, False))

    def test_free_when_idle_is_asynchronous(self) -> None:
        """/free with no job frees on the next turn, not inside the request."""
        self.prompt()
        self.sim.advance(1.3)
        self.sim.advance(0.8)
        self.assertEqual(self.sim.consumer.busy, 0)
        free = {"unload_models": True, "free_memory": True}
        self.assertEqual(self.sim.answer(self.sim.send("POST", "/free", json=free))[0], 200)
        self.assertEqual(self.sim.ledger.used_mib(), 13000)
        self.sim.advance(0)
        self.assertEqual(self.sim.ledger.used_mib(), 0)

    def test_prompt_without_a_prompt_is_400(self) -> None:
        """A /prompt body without a prompt object is refused as ComfyUI does."""
        code, body = self.sim.call("POST", "/prompt", json={"x": 1})
        self.assertEqual((code, body["error"]["type"]), (400, "no_prompt"))


class FaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = _Sim(self, "mvoice", load_s=0.3, work_s=0.2)

    def faults(self, body: object) -> tuple[int, Any]:
        return self.sim.call("POST", "/_sim/faults", json=body)

    def test_status_fault_answers_the_code_and_does_nothing(self) -> None:
        """A status fault makes the route answer that code without doing its work."""
        self.assertEqual(self.faults({"status": {"/api/synthesize": 418}})[0], 200)
        code, body = self.sim.call("POST", "/api/synthesize", json={"text": "x"})
        self.assertEqual((code, body["error"]), (418, "injected fault"))
        self.assertEqual((self.sim.consumer.log, self.sim.ledger.used_mib()), ([], 0))
        self.faults({})
        self.assertEqual(self.sim.call("GET", "/api/health")[0], 200)

    def test_hang_never_answers(self) -> None:
        """A hung route never answers and does nothing, however long one waits."""
        self.faults({"hang": ["/api/admin/unload"]})
        self.sim.consumer.loaded = True
        d = self.sim.send("POST", "/api/admin/unload")
        self.sim.advance(3600)
        self.assertNoResult(d)
        self.assertTrue(self.sim.consumer.loaded)

    def test_delay_answers_later(self) -> None:
        """A delay fault holds the answer that long."""
        self.faults({"delay_s": {"/api/health": 2}})
        d = self.sim.send("GET", "/api/health")
        self.sim.advance(1.9)
        self.assertNoResult(d)
        self.sim.advance(0.1)
        self.assertEqual(self.sim.json(d)[0], 200)

    def test_free_delay_frees_memory_later(self) -> None:
        """With free_delay_s the unload answers at once but the memory frees that much later."""
        self.faults({"free_delay_s": 1.5})
        d = self.sim.send("POST", "/api/admin/load")
        self.sim.advance(0.3)
        self.sim.json(d)
        self.assertEqual(self.sim.call("POST", "/api/admin/unload")[0], 200)
        self.sim.advance(1.4)
        self.assertEqual(self.sim.ledger.used_mib(), 2800)
        self.sim.advance(0.1)
        self.assertEqual(self.sim.ledger.used_mib(), 0)

    def test_faults_shape_is_checked_and_readable(self) -> None:
        """A malformed fault set is a 400; GET /_sim/faults returns the one in force."""
        self.assertEqual(self.faults({"status": {"/x": "500"}})[0], 400)
        self.assertEqual(self.faults({"hang": "/x"})[0], 400)
        self.assertEqual(self.faults({"typo": 1})[0], 400)
        self.faults({"status": {"/x": 500}, "hang": ["/y"], "free_delay_s": 1})
        self.assertEqual(
            self.sim.call("GET", "/_sim/faults")[1],
            {"status": {"/x": 500}, "hang": ["/y"], "delay_s": {}, "free_delay_s": 1.0},
        )


class LogTests(SynchronousTestCase):
    def test_log_lists_work_with_start_and_end(self) -> None:
        """/_sim/log lists each work request with its start, end (null while running) and cold."""
        sim = _Sim(self, "mvoice", load_s=0.25, work_s=0.5)
        sim.clock.advance(10)
        d = sim.send("POST", "/api/synthesize", json={"text": "x"})
        sim.advance(0.25)
        sim.advance(0.25)
        entry = {"consumer": "mvoice", "kind": "tts", "path": "/api/synthesize",
                 "start": 10.0, "end": None, "cold": True}  # fmt: skip
        self.assertEqual(sim.call("GET", "/_sim/log"), (200, [entry]))
        sim.advance(0.25)
        sim.json(d)
        self.assertEqual(sim.call("GET", "/_sim/log")[1], [entry | {"end": 10.75}])
        state = sim.call("GET", "/_sim/state")[1]
        self.assertEqual((state["loaded"], state["vram_mib"], state["busy"]), (True, 2800, 0))

    def test_log_file_gets_json_lines(self) -> None:
        """With a log file each finished work request is appended as one JSON line."""
        path = Path(self.mktemp())
        clock = Clock()
        settings = ConsumerSettings.make("tts1", "mvoice", preload=True, work_s=0.25)
        consumer = make_consumer(settings, MemoryLedger(), clock, path)
        http: Any = StubTreq(SimResource(consumer))
        for text in ("a", "b"):
            d = http.post("http://sim/api/synthesize", json={"text": text})
            http.flush()
            clock.advance(0.25)
            http.flush()
            self.assertEqual(self.successResultOf(d).code, 200)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        self.assertEqual([(e["consumer"], e["start"], e["end"]) for e in lines],
                         [("tts1", 0.0, 0.25), ("tts1", 0.25, 0.5)])  # fmt: skip


class DemoSettingsTests(SynchronousTestCase):
    def test_the_sequence_needs_evictions(self) -> None:
        """On the demo card tts must evict ComfyUI, image must evict mvoice, nothing fits all."""
        settings = demo_settings()
        size = {s.name: s.vram_mib for s in settings}
        self.assertEqual(size, {"mvoice": 2800, "whisper": 1500, "ollama": 6000, "comfyui": 13000})
        total, cushion = DEMO_TOTAL_MIB, 256
        resident = sum(s.vram_mib for s in settings if s.preload)
        self.assertEqual(resident, size["whisper"] + size["comfyui"])
        self.assertGreater(size["mvoice"] + cushion, total - resident)  # tts evicts
        self.assertLessEqual(size["mvoice"] + cushion, total - size["whisper"])
        rest = total - size["whisper"] - size["mvoice"]
        self.assertGreater(size["comfyui"] + cushion, rest)  # image evicts
        self.assertLessEqual(size["comfyui"] + cushion, total - size["whisper"])
        self.assertGreater(size["ollama"] + size["whisper"] + size["comfyui"] + cushion, total)
        # Ollama keeps its model a while, as the real one does: the image reclaims it.
        self.assertGreater(size["comfyui"] + cushion, total - size["whisper"] - size["ollama"])
        self.assertGreater({s.name: s.keep_alive_s for s in settings}["ollama"] or 0, 0)


class StartDemoTests(TestCase):
    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    async def test_start_demo_binds_four_loopback_ports_and_stops(self) -> None:
        """start_demo serves four consumers on loopback with a valid Config; stop closes them."""
        demo = await start_demo(reactor)
        try:
            self.assertIsInstance(demo.config, Config)
            self.assertEqual(demo.config.gpu.total_mib, DEMO_TOTAL_MIB)
            self.assertEqual(demo.config.health.interval_s, 1)
            ports = [cast(Any, port).getHost() for port in demo.ports]
            self.assertEqual({p.host for p in ports}, {"127.0.0.1"})
            self.assertEqual(len({p.port for p in ports}), 4)
            for name, consumer in demo.config.consumers.items():
                response = await self.http.request(
                    consumer.health.method, consumer.url + consumer.health.path
                )
                await response.content()
                self.assertEqual(response.code, 200, name)
            snapshot = await demo.gpu_reader.read()
            self.assertEqual((snapshot.source, snapshot.used_mib), ("sim", 14500))  # preloaded
        finally:
            await demo.stop()

    def test_demo_config_mirrors_consumers_yaml(self) -> None:
        """The demo's consumers match config/consumers.yaml in all but their URLs."""
        shipped = load_config(ROOT / "config" / "consumers.yaml")
        demo = self.successResultOf(start_demo(reactor))
        self.addCleanup(demo.stop)
        self.assertEqual(dict(demo.config.routing), dict(shipped.routing))
        self.assertEqual(demo.config.audio_proxy, shipped.audio_proxy)
        for name, consumer in shipped.consumers.items():
            ours = demo.config.consumers[name]
            self.assertEqual(evolve(ours, url="-"), evolve(consumer, url="-"), name)


class TwoCardDemoTests(SynchronousTestCase):
    """``start_demo(gpus=2)``: ComfyUI has card 1 to itself, the others share card 0."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.demo = self.successResultOf(start_demo(self.reactor, gpus=2))
        self.addCleanup(self.demo.stop)

    def used(self) -> list[int | None]:
        """Each card's used memory, as the daemon reads it."""
        return [self.successResultOf(r.read()).used_mib for r in self.demo.gpu_readers.values()]

    def test_config_manages_both_cards(self) -> None:
        """The configuration parses with devices 0 and 1, ComfyUI on card 1 alone."""
        urls = {s.name: f"http://127.0.0.1:{n}" for n, s in enumerate(demo_settings(), 1000)}
        for config in (parse_config(demo_config(urls, gpus=2), "<test>"), self.demo.config):
            self.assertEqual(config.gpu.devices, (0, 1))
            cards = {name: c.gpus for name, c in config.consumers.items()}
            self.assertEqual(cards, {"mvoice": (0,), "whisper": (0,), "ollama": (0,),
                                     "comfyui": (1,)})  # fmt: skip

    def test_a_reader_and_a_ledger_per_card(self) -> None:
        """Each card has its own reader, of its index and size; the first is also the old
        single ``gpu_reader`` and ``ledger``."""
        readers, ledgers = self.demo.gpu_readers, self.demo.ledgers
        self.assertEqual((list(readers), list(ledgers)), ([0, 1], [0, 1]))
        for index, reader in readers.items():
            snapshot = self.successResultOf(reader.read())
            self.assertEqual((snapshot.index, snapshot.total_mib), (index, DEMO_TOTAL_MIB))
            self.assertIs(reader.ledger, ledgers[index])
        self.assertIs(self.demo.gpu_reader, readers[0])
        self.assertIs(self.demo.ledger, ledgers[0])

    def test_each_consumer_allocates_on_its_own_card(self) -> None:
        """Preloaded whisper is on card 0 and ComfyUI on card 1; the voice and language
        models load onto card 0 beside whisper, and nothing leaves card 1."""
        self.assertEqual(self.used(), [1500, 13000])
        for name in ("mvoice", "ollama"):
            Deferred.fromCoroutine(self.demo.consumers[name].load())
        self.reactor.advance(1)
        self.assertEqual(self.used(), [1500 + 2800 + 6000, 13000])
        self.assertEqual(self.demo.ledgers[1].owners(), {"comfyui": 13000})

    def test_process_table_finds_consumers_on_either_card(self) -> None:
        """Each card lists its consumers' virtual pids, one pid per consumer across cards."""
        pids = {p.pid for r in self.demo.gpu_readers.values()
                for p in self.successResultOf(r.read()).processes or ()}  # fmt: skip
        ledger = self.demo.ledgers[1]
        self.assertEqual(pids, {ledger.pid_of("whisper"), ledger.pid_of("comfyui")})
        self.assertEqual(self.demo.ledgers[0].pid_of("comfyui"), ledger.pid_of("comfyui"))
        table = self.demo.process_table
        self.assertEqual(table.name(ledger.pid_of("comfyui")), "sim-comfyui")

    def test_one_card_is_unchanged_and_three_are_refused(self) -> None:
        """gpus=1 (the default) manages one card with no devices listed; 3 is a ValueError."""
        urls = {s.name: "http://127.0.0.1:1" for s in demo_settings()}
        self.assertEqual(demo_config(urls, gpus=1), demo_config(urls))
        self.assertNotIn("devices", demo_config(urls)["gpu"])
        demo = self.successResultOf(start_demo(MemoryReactorClock()))
        self.addCleanup(demo.stop)
        self.assertEqual((list(demo.gpu_readers), demo.config.gpu.cards), ([0], (0,)))
        self.assertEqual(self.successResultOf(demo.gpu_reader.read()).used_mib, 14500)
        self.assertRaises(ValueError, start_demo, MemoryReactorClock(), gpus=3)


class _FirstLine(ProcessProtocol):
    def __init__(self) -> None:
        self.line: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.out = self.err = b""

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.line.called:
            self.line.callback(self.out.split(b"\n", 1)[0].decode())

    def processEnded(self, reason: Failure) -> None:
        if not self.line.called:
            self.line.errback(RuntimeError(f"exited before its port line: {self.err!r}"))
        self.reason = reason
        self.ended.callback(None)


class ProcessTests(TestCase):
    timeout = 30

    async def test_cli_process_serves_health_and_frees_on_exit(self) -> None:
        """`python -m mgpu.sim --name mvoice --port 0` prints its port, serves, frees on TERM."""
        state = Path(self.mktemp()).resolve()
        state.parent.mkdir(parents=True, exist_ok=True)
        proto = _FirstLine()
        args = [sys.executable, "-m", "mgpu.sim", "--name", "mvoice", "--port", "0",
                "--gpu-state", str(state), "--preload"]  # fmt: skip
        process = reactor.spawnProcess(proto, sys.executable, args, env=os.environ, path=str(ROOT))
        try:
            line = await proto.line
            self.assertRegex(line, r"^listening 127\.0\.0\.1:\d+$")
            pool = HTTPConnectionPool(reactor, persistent=False)
            self.addCleanup(pool.closeCachedConnections)
            url = f"http://{line.split()[1]}/api/health"
            response = await HTTPClient(Agent(reactor, pool=pool)).get(url)
            self.assertEqual(await response.json(), {"status": "ok", "loaded": True})
            self.assertEqual(FileLedger(state).owners(), {"mvoice": 2800})
            self.assertEqual(FileLedger(state).processes(), {process.pid: 2800})
        finally:
            with contextlib.suppress(ProcessExitedAlready):
                process.signalProcess("TERM")
            await proto.ended
        assert proto.reason is not None
        self.assertIsInstance(proto.reason.value, ProcessDone, proto.err)
        self.assertEqual(FileLedger(state).owners(), {})  # a stopped process frees its memory
        self.assertEqual(FileLedger(state).processes(), {})

    async def test_cli_process_on_two_cards_holds_its_size_on_each(self) -> None:
        """`--gpus 0,1` records the model, under the process's pid, on both cards of the
        state file, each card of `--gpu-total-mib`; fake_nvidia_smi lists it on each."""
        state = Path(self.mktemp()).resolve()
        state.parent.mkdir(parents=True, exist_ok=True)
        proto = _FirstLine()
        args = [sys.executable, "-m", "mgpu.sim", "--name", "vllm", "--port", "0", "--preload",
                "--gpu-state", str(state), "--gpus", "0,1", "--gpu-total-mib", "24000"]  # fmt: skip
        process = reactor.spawnProcess(proto, sys.executable, args, env=os.environ, path=str(ROOT))
        try:
            await proto.line
            for index in (0, 1):
                self.assertEqual(FileLedger(state, index).processes(), {process.pid: 11000})
                apps = fake_smi(state, SMI_APPS, "-i", str(index))
                self.assertEqual(apps, f"{process.pid}, 11000\n")
            self.assertEqual(fake_smi(state, "--query-gpu=index,memory.total,memory.used"),
                             "0, 24000, 11000\n1, 24000, 11000\n")  # fmt: skip
        finally:
            with contextlib.suppress(ProcessExitedAlready):
                process.signalProcess("TERM")
            await proto.ended
        self.assertEqual([FileLedger(state, i).owners() for i in (0, 1)], [{}, {}])

    def test_gpus_flag(self) -> None:
        """`--gpus` takes distinct card indexes, in any order; `0` by default."""
        base = ["--name", "vllm", "--port", "0"]
        self.assertEqual(sim_main.parse_args(base).gpus, (0,))
        self.assertEqual(sim_main.parse_args([*base, "--gpus", "1,0"]).gpus, (0, 1))
        for bad in ("", "0,0", "-1", "a", "0,"):
            with contextlib.redirect_stderr(io.StringIO()):
                self.assertRaises(SystemExit, sim_main.parse_args, [*base, "--gpus", bad])


class OllamaPsTests(SynchronousTestCase):
    """The simulated Ollama's /api/ps and unload answer have the real one's shape."""

    def setUp(self) -> None:
        self.sim = _Sim(self, "ollama", load_s=0.6, work_s=0.4, tokens=4, keep_alive_s=5)
        self.sim.advance(100.0)  # a clock away from the epoch

    def ps(self) -> list[dict[str, Any]]:
        code, body = self.sim.call("GET", "/api/ps")
        self.assertEqual((code, set(body)), (200, {"models"}))
        return cast(list[dict[str, Any]], body["models"])

    def load(self, **body: Any) -> None:
        """Ollama's idiom to load a model: a generate request without a prompt."""
        d = self.sim.send("POST", "/api/generate", json={"model": "qwen2.5:7b"} | body)
        self.sim.advance(0.6)
        self.assertEqual(self.sim.json(d)[1]["done_reason"], "load")

    def test_shape(self) -> None:
        """A loaded model is listed with Ollama's fields, sizes in bytes, and reads as
        itself through the broker's parser."""
        self.load()
        [entry] = self.ps()
        self.assertEqual(
            set(entry),
            {"name", "model", "size", "digest", "details", "expires_at", "size_vram"},
        )
        size = 6000 * 2**20
        self.assertEqual(
            (entry["name"], entry["model"], entry["size"], entry["size_vram"]),
            ("qwen2.5:7b", "qwen2.5:7b", size, size),
        )
        self.assertRegex(entry["digest"], r"\A[0-9a-f]{64}\Z")
        self.assertEqual(
            set(entry["details"]),
            {"parent_model", "format", "family", "families", "parameter_size",
             "quantization_level"},
        )  # fmt: skip
        [model] = parse_ps({"models": [entry]})
        self.assertEqual((model.name, model.size_vram_mib), ("qwen2.5:7b", 6000))

    def test_expires_keep_alive_after_last_request(self) -> None:
        """expires_at is when keep-alive frees the model, RFC 3339 with a UTC offset; the
        model is listed until then and gone at it."""
        self.load()  # ends at 100.6 s, keep_alive 5 s
        [entry] = self.ps()
        self.assertEqual(entry["expires_at"], "1970-01-01T00:01:45.600000+00:00")
        self.sim.advance(4.9)
        [model] = parse_ps({"models": self.ps()})
        self.assertAlmostEqual(cast(float, model.expires_in_s(self.sim.clock.seconds())), 0.1)
        self.sim.advance(0.1)
        self.assertEqual((self.ps(), self.sim.ledger.used_mib()), ([], 0))

    def test_far_future_while_running(self) -> None:
        """While a request runs the model shows as expiring centuries ahead (never); the
        keep-alive countdown starts when it ends."""
        d = self.sim.send("POST", "/api/generate", json={"prompt": "x", "stream": False})
        for step in (0.6, 0.1):  # the load, then one token
            self.sim.advance(step)
        [entry] = self.ps()
        self.assertGreater(int(entry["expires_at"][:4]), 2200)
        self.assertIsNone(parse_ps({"models": [entry]})[0].expires_in_s(self.sim.clock.seconds()))
        for _ in range(3):
            self.sim.advance(0.1)
        self.assertEqual(self.sim.answer(d)[0], 200)
        [model] = parse_ps({"models": self.ps()})
        self.assertAlmostEqual(cast(float, model.expires_in_s(self.sim.clock.seconds())), 5.0)

    def test_negative_keep_alive_never_expires(self) -> None:
        """After a request with keep_alive -1 the model stays, shown expiring centuries ahead."""
        self.load(keep_alive=-1)
        self.sim.advance(10_000)
        [entry] = self.ps()
        self.assertGreater(int(entry["expires_at"][:4]), 2200)
        self.assertEqual(self.sim.ledger.used_mib(), 6000)

    def test_unload_answers_like_ollama(self) -> None:
        """{"model": M, "keep_alive": 0} without a prompt frees M and answers as Ollama does:
        model, created_at, an empty response, done, done_reason "unload"."""
        self.load()
        code, body = self.sim.call(
            "POST", "/api/generate", json={"model": "qwen2.5:7b", "keep_alive": 0}
        )
        self.assertEqual(
            (code, body),
            (
                200,
                {
                    "model": "qwen2.5:7b",
                    "created_at": "1970-01-01T00:01:40.600000+00:00",
                    "response": "",
                    "done": True,
                    "done_reason": "unload",
                },
            ),
        )
        self.assertEqual((self.ps(), self.sim.ledger.used_mib()), ([], 0))


def _sse_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of a Server-Sent Events body, in order."""
    events = [event for event in body.split(b"\n\n") if event]
    for event in events:
        assert event.startswith(b"data: "), event
    return [event[len(b"data: ") :] for event in events]


def _multipart(fields: dict[str, str], file: bytes | None) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``fields`` and a ``file`` part; its Content-Type."""
    boundary = "simboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if file is not None:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        )
        parts.append(head.encode() + file + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class OllamaApiTests(SynchronousTestCase):
    """The simulated Ollama's chat, embedding and model routes, native and OpenAI's."""

    def setUp(self) -> None:
        self.sim = _Sim(self, "ollama", load_s=0.6, work_s=0.4, tokens=4, keep_alive_s=5)

    def finish(self, d: Deferred[Any]) -> tuple[int, bytes, Any]:
        """Run a cold request to its end: the load, then one step per token."""
        for step in (0.6, 0.1, 0.1, 0.1, 0.1):
            self.sim.advance(step)
        return self.sim.answer(d)

    def stream(self, path: str, body: dict[str, Any]) -> tuple[Any, list[bytes]]:
        """A streamed request: its response and its writes, checked to come one per token."""
        d = self.sim.send("POST", path, json=body)
        self.sim.advance(0.6)
        self.assertNoResult(d)
        self.sim.advance(0.1)
        response = self.successResultOf(d)
        seen, chunks, done = chunks_per_step(self.sim, response)
        self.successResultOf(done)
        self.assertEqual(seen, [1, 2, 3, 5])  # the last step writes its token, then the end
        return response, chunks

    def test_chat_streams_ndjson_messages(self) -> None:
        """/api/chat streams one NDJSON line per token with message.content, then a done line
        with done_reason and the counts; every line reads as the ollama client's ChatResponse."""
        messages = [{"role": "user", "content": "say hi"}]
        response, chunks = self.stream("/api/chat", {"model": "m", "messages": messages})
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/x-ndjson"])
        self.assertEqual([c.count(b"\n") for c in chunks], [1] * 5)
        lines = [json.loads(chunk) for chunk in chunks]
        for line in lines:
            ollama.ChatResponse.model_validate(line)
        self.assertEqual(
            [line["message"] for line in lines],
            [{"role": "assistant", "content": c} for c in ("tok0 ", "tok1 ", "tok2 ", "tok3 ", "")],
        )
        self.assertEqual([line["done"] for line in lines], [False] * 4 + [True])
        last = lines[-1]
        self.assertEqual(
            (last["done_reason"], last["eval_count"], last["prompt_eval_count"], last["model"]),
            ("stop", 4, 2, "m"),
        )
        self.assertEqual(last["total_duration"], 1_000_000_000)  # the load and 4 tokens
        self.assertEqual(last["load_duration"], 600_000_000)

    def test_chat_without_streaming_answers_one_object(self) -> None:
        """stream: false gives one JSON object holding the whole message."""
        body = {"messages": [{"role": "user", "content": "x"}], "stream": False}
        code, raw, response = self.finish(self.sim.send("POST", "/api/chat", json=body))
        answer = json.loads(raw)
        self.assertEqual((code, answer["message"]["content"]), (200, "tok0 tok1 tok2 tok3 "))
        self.assertEqual((answer["done"], answer["done_reason"]), (True, "stop"))
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])

    def test_chat_without_messages_loads_or_unloads(self) -> None:
        """As with /api/generate: no messages loads the model; with keep_alive 0 it unloads."""
        d = self.sim.send("POST", "/api/chat", json={"model": "m", "messages": []})
        self.sim.advance(0.6)
        code, body = self.sim.json(d)
        self.assertEqual((code, body["done_reason"], body["message"]["content"]), (200, "load", ""))
        self.assertEqual(self.sim.ledger.used_mib(), 6000)
        code, body = self.sim.call("POST", "/api/chat", json={"model": "m", "keep_alive": 0})
        self.assertEqual(
            (code, body["done_reason"], self.sim.ledger.used_mib()), (200, "unload", 0)
        )

    def test_embed_one_vector_per_input(self) -> None:
        """/api/embed answers one unit vector per input, a string or a list; same text, same
        vector; the ollama client's EmbedResponse reads it; anything else is a 400."""
        d = self.sim.send("POST", "/api/embed", json={"model": "e", "input": ["a", "b", "a"]})
        self.sim.advance(0.6)
        self.sim.advance(0.4)
        code, body = self.sim.json(d)
        ollama.EmbedResponse.model_validate(body)
        a, b, a_again = body["embeddings"]
        self.assertEqual((code, body["model"], a), (200, "e", a_again))
        self.assertNotEqual(a, b)
        self.assertAlmostEqual(sum(x * x for x in a), 1.0, places=4)
        d = self.sim.send("POST", "/api/embed", json={"input": "a"})
        self.sim.advance(0.4)
        self.assertEqual(self.sim.json(d)[1]["embeddings"], [a])
        self.assertEqual(self.sim.call("POST", "/api/embed", json={"input": 3})[0], 400)

    def test_tags_lists_its_models(self) -> None:
        """/api/tags lists the models it has, in the shape the ollama client reads; a model
        asked for is listed from then on."""
        code, body = self.sim.call("GET", "/api/tags")
        listed = ollama.ListResponse.model_validate(body)
        self.assertEqual((code, [m.model for m in listed.models]), (200, list(OLLAMA_MODELS)))
        self.assertEqual(listed.models[0].size, 6000 * 2**20)
        d = self.sim.send("POST", "/api/generate", json={"model": "qwen2.5:7b", "prompt": ""})
        self.sim.advance(0.6)
        self.sim.answer(d)
        names = [m["name"] for m in self.sim.call("GET", "/api/tags")[1]["models"]]
        self.assertEqual(names, [*OLLAMA_MODELS, "qwen2.5:7b"])

    def test_openai_models(self) -> None:
        """/v1/models: OpenAI's list of model objects, the same models as /api/tags."""
        code, body = self.sim.call("GET", "/v1/models")
        self.assertEqual((code, body["object"]), (200, "list"))
        models = [Model.model_validate(entry) for entry in body["data"]]
        self.assertEqual([m.id for m in models], list(OLLAMA_MODELS))
        self.assertEqual({m.object for m in models}, {"model"})

    def test_chat_completions_stream_sse_chunks_then_done(self) -> None:
        """stream: true gives one SSE event per token with choices[0].delta.content, a last
        chunk with finish_reason stop, then data: [DONE]; each chunk reads as the openai
        SDK's ChatCompletionChunk."""
        body = {"model": "llama3.1:8b", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        response, chunks = self.stream("/v1/chat/completions", body)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/event-stream"])
        events = _sse_events(b"".join(chunks))
        self.assertEqual(events[-1], b"[DONE]")
        parsed = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
        self.assertEqual(
            [c.choices[0].delta.content for c in parsed], ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
        )
        self.assertEqual([c.choices[0].finish_reason for c in parsed], [None] * 4 + ["stop"])
        self.assertEqual({(c.model, c.id) for c in parsed}, {("llama3.1:8b", "chatcmpl-1")})

    def test_chat_completions_without_streaming(self) -> None:
        """Without stream, one chat.completion with the message and its usage."""
        body = {"model": "m", "messages": [{"role": "user", "content": "two words"}]}
        code, raw, _ = self.finish(self.sim.send("POST", "/v1/chat/completions", json=body))
        answer = ChatCompletion.model_validate_json(raw)
        self.assertEqual(code, 200)
        self.assertEqual(answer.object, "chat.completion")
        self.assertEqual(answer.choices[0].message.content, "tok0 tok1 tok2 tok3 ")
        self.assertEqual(answer.choices[0].finish_reason, "stop")
        assert answer.usage is not None
        self.assertEqual((answer.usage.prompt_tokens, answer.usage.completion_tokens), (2, 4))

    def test_completions_whole_and_streamed(self) -> None:
        """/v1/completions: a text_completion with choices[0].text; streamed, the same in
        SSE chunks ending data: [DONE]."""
        code, raw, _ = self.finish(
            self.sim.send("POST", "/v1/completions", json={"model": "m", "prompt": "once"})
        )
        answer = Completion.model_validate_json(raw)
        self.assertEqual((code, answer.choices[0].text), (200, "tok0 tok1 tok2 tok3 "))
        body = {"model": "m", "prompt": "once", "stream": True}
        d = self.sim.send("POST", "/v1/completions", json=body)
        for _ in range(4):
            self.sim.advance(0.1)
        code, raw, response = self.sim.answer(d)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/event-stream"])
        events = _sse_events(raw)
        self.assertEqual(events[-1], b"[DONE]")
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual({c["object"] for c in chunks}, {"text_completion"})
        texts = [c["choices"][0]["text"] for c in chunks]
        self.assertEqual(texts, ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""])
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_openai_embeddings(self) -> None:
        """/v1/embeddings: a list of embedding objects with their index, the model and usage,
        as the openai SDK reads them; the vectors are those of /api/embed."""
        d = self.sim.send("POST", "/v1/embeddings", json={"model": "e", "input": ["a", "b c"]})
        self.sim.advance(0.6)
        self.sim.advance(0.4)
        code, raw, _ = self.sim.answer(d)
        answer = CreateEmbeddingResponse.model_validate_json(raw)
        self.assertEqual((code, answer.object, answer.model), (200, "list", "e"))
        self.assertEqual([e.index for e in answer.data], [0, 1])
        self.assertEqual((answer.usage.prompt_tokens, answer.usage.total_tokens), (3, 3))
        d = self.sim.send("POST", "/api/embed", json={"input": "a"})
        self.sim.advance(0.4)
        self.assertEqual(self.sim.json(d)[1]["embeddings"], [answer.data[0].embedding])

    def test_openai_errors_use_openai_envelope(self) -> None:
        """A request without its messages, prompt or input is a 400 in OpenAI's envelope."""
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            code, body = self.sim.call("POST", path, json={"model": "m"})
            self.assertEqual(code, 400, path)
            self.assertEqual(set(body["error"]), {"message", "type", "param", "code"}, path)
        self.assertEqual(self.sim.ledger.used_mib(), 0)


class OllamaRoutesHoldMemoryTests(SynchronousTestCase):
    """Every generating or embedding route loads the model through ``work``, holds its
    simulated memory while it runs and keeps it keep_alive seconds after."""

    ROUTES: Final[dict[str, dict[str, Any]]] = {
        "/api/chat": {"messages": [{"role": "user", "content": "x"}], "stream": False},
        "/api/embed": {"input": "x"},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}]},
        "/v1/completions": {"prompt": "x"},
        "/v1/embeddings": {"input": "x"},
    }

    def run_cold(self, path: str, body: dict[str, Any]) -> _Sim:
        """One request on a fresh Ollama (times exact in binary): a 0.5 s load, 0.5 s of
        work (four tokens, or one embedding); checks the memory is taken from its start."""
        sim = _Sim(self, "ollama", load_s=0.5, work_s=0.5, tokens=4, keep_alive_s=5)
        d = sim.send("POST", path, json={"model": "m"} | body)
        self.assertEqual((sim.ledger.used_mib(), sim.consumer.loading), (6000, True), path)
        sim.advance(0.5)
        for _ in range(4):
            self.assertNoResult(d)
            sim.advance(0.125)
        self.assertEqual(sim.answer(d)[0], 200, path)
        return sim

    def test_each_route_loads_holds_and_frees_after_keep_alive(self) -> None:
        for path, body in self.ROUTES.items():
            sim = self.run_cold(path, body)
            [entry] = sim.consumer.log
            self.assertEqual((entry.path, entry.kind, entry.cold), (path, "llm", True))
            self.assertEqual(sim.call("GET", "/api/ps")[1]["models"][0]["name"], "m", path)
            sim.advance(4.875)
            self.assertEqual(sim.ledger.used_mib(), 6000, path)
            sim.advance(0.125)
            self.assertEqual((sim.ledger.used_mib(), sim.consumer.loaded), (0, False), path)

    def test_native_keep_alive_field_applies(self) -> None:
        """keep_alive in a native request's body replaces the default: 0 frees at its end."""
        for path in ("/api/chat", "/api/embed"):
            sim = self.run_cold(path, self.ROUTES[path] | {"keep_alive": 0})
            self.assertEqual(sim.ledger.used_mib(), 0, path)


class ComfyUIApiTests(SynchronousTestCase):
    """The simulated ComfyUI's page, images, node classes, queue and origin check."""

    def setUp(self) -> None:
        self.sim = _Sim(self, "comfyui", load_s=1.3, work_s=0.8)

    def get(self, url: str, **headers: str) -> tuple[int, bytes, Any]:
        d = self.sim.http.request("GET", url, headers=headers)
        self.sim.http.flush()
        return self.sim.answer(d)

    def test_index_is_a_comfyui_page_whose_feed_follows_its_path(self) -> None:
        """GET / is an HTML page titled ComfyUI that opens its feed at ws under the page's
        own path (so it works under /comfyui/), never at an absolute /ws."""
        code, body, response = self.sim.answer(self.sim.send("GET", "/"))
        page = body.decode()
        self.assertEqual(code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["text/html; charset=utf-8"]
        )
        self.assertIn("<title>ComfyUI</title>", page)
        self.assertIn("new WebSocket(", page)
        self.assertIn('location.pathname.replace(/\\/$/, "")', page)
        self.assertIn('"wss" : "ws"', page)
        self.assertIn('"/ws?clientId=" + id', page)
        self.assertNotIn('location.host + "/ws', page)

    def test_view_serves_a_png(self) -> None:
        """/view?filename=F&type=output answers a valid PNG as image/png; no file name is a
        404, a path outside the folder or an unknown type a 400."""
        code, body, response = self.sim.answer(
            self.sim.send("GET", "/view?filename=ComfyUI_00001_.png&type=output")
        )
        self.assertEqual((code, response.headers.getRawHeaders("Content-Type")),
                         (200, ["image/png"]))  # fmt: skip
        self.assertEqual(body[:8], b"\x89PNG\r\n\x1a\n")
        chunks, offset = [], 8
        while offset < len(body):
            (length,) = struct.unpack(">I", body[offset : offset + 4])
            kind, data = body[offset + 4 : offset + 8], body[offset + 8 : offset + 8 + length]
            (crc,) = struct.unpack(">I", body[offset + 8 + length : offset + 12 + length])
            self.assertEqual(crc, zlib.crc32(kind + data))
            chunks.append((kind, data))
            offset += 12 + length
        self.assertEqual([kind for kind, _ in chunks], [b"IHDR", b"IDAT", b"IEND"])
        width, height = struct.unpack(">II", chunks[0][1][:8])
        self.assertEqual(len(zlib.decompress(chunks[1][1])), height * (1 + 3 * width))
        self.assertEqual(self.sim.answer(self.sim.send("GET", "/view"))[0], 404)
        self.assertEqual(self.sim.answer(self.sim.send("GET", "/view?filename=../x.png"))[0], 400)
        bad_type = "/view?filename=x.png&type=secret"
        self.assertEqual(self.sim.answer(self.sim.send("GET", bad_type))[0], 400)

    def test_history_names_saved_images_that_view_serves(self) -> None:
        """A job with a SaveImage node lists its image in /history/<id> and /history once
        done; /view serves that file."""
        graph = {"3": {"class_type": "KSampler", "inputs": {}},
                 "9": {"class_type": "SaveImage", "inputs": {}}}  # fmt: skip
        prompt_id = self.sim.call("POST", "/prompt", json={"prompt": graph})[1]["prompt_id"]
        self.sim.advance(1.3)
        self.sim.advance(0.8)
        entry = self.sim.call("GET", f"/history/{prompt_id}")[1][prompt_id]
        self.assertEqual(self.sim.call("GET", "/history")[1], {prompt_id: entry})
        [image] = entry["outputs"]["9"]["images"]
        self.assertEqual(
            image, {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
        )
        self.assertEqual(set(entry["outputs"]), {"9"})
        code, body, _ = self.sim.answer(
            self.sim.send("GET", f"/view?filename={image['filename']}&type=output")
        )
        self.assertEqual((code, body[:4]), (200, b"\x89PNG"))

    def test_object_info_describes_node_classes(self) -> None:
        """/object_info lists node classes with their input specs and outputs;
        /object_info/<class> one of them, or {} for none."""
        code, nodes = self.sim.call("GET", "/object_info")
        self.assertEqual(code, 200)
        self.assertLessEqual({"KSampler", "CheckpointLoaderSimple", "SaveImage"}, set(nodes))
        sampler = nodes["KSampler"]
        self.assertEqual(sampler["input"]["required"]["seed"][0], "INT")
        self.assertEqual(sampler["input"]["required"]["model"], ["MODEL"])
        self.assertEqual(sampler["input_order"]["required"][0], "model")
        self.assertEqual((sampler["output"], sampler["name"], sampler["output_node"]),
                         (["LATENT"], "KSampler", False))  # fmt: skip
        self.assertTrue(nodes["SaveImage"]["output_node"])
        self.assertEqual(
            self.sim.call("GET", "/object_info/KSampler"), (200, {"KSampler": sampler})
        )
        self.assertEqual(self.sim.call("GET", "/object_info/Nope"), (200, {}))

    def test_queue_shows_running_and_pending(self) -> None:
        """/queue lists the running job in queue_running and the waiting ones after it."""
        first = self.sim.call("POST", "/prompt", json={"prompt": {}})[1]
        second = self.sim.call("POST", "/prompt", json={"prompt": {}})[1]
        code, queue = self.sim.call("GET", "/queue")
        self.assertEqual((code, set(queue)), (200, {"queue_running", "queue_pending"}))
        self.assertEqual([job[1] for job in queue["queue_running"]], [first["prompt_id"]])
        self.assertEqual([job[1] for job in queue["queue_pending"]], [second["prompt_id"]])

    def test_origin_must_match_a_loopback_host(self) -> None:
        """As ComfyUI: with a loopback Host, an Origin naming another host (or port) is 403
        with an empty body, and the request does nothing; a matching Origin, none, or one
        that leaves the port out passes; a non-loopback Host is not checked."""
        url = "http://127.0.0.1:8188/system_stats"
        self.assertEqual(self.get(url)[0], 200)
        self.assertEqual(self.get(url, Origin="http://127.0.0.1:8188")[0], 200)
        self.assertEqual(self.get(url, Origin="http://127.0.0.1")[0], 200)
        self.assertEqual(self.get(url, Origin="http://evil.example")[:2], (403, b""))
        self.assertEqual(self.get(url, Origin="http://127.0.0.1:8770")[0], 403)
        self.assertEqual(self.get(url, Origin="http://localhost:8188")[0], 403)
        self.assertEqual(self.get("http://localhost:8188/", Origin="http://x:8188")[0], 403)
        self.assertEqual(self.get("http://gpu.example:8770/", Origin="http://x")[0], 200)
        d = self.sim.http.request(
            "POST", "http://127.0.0.1:8188/prompt", json={"prompt": {}},
            headers={"Origin": "http://evil.example"},
        )  # fmt: skip
        self.sim.http.flush()
        self.assertEqual(self.sim.answer(d)[0], 403)
        self.sim.advance(5)
        self.assertEqual((self.sim.call("GET", "/history")[1], self.sim.ledger.used_mib()), ({}, 0))


class OpenAISpeechTests(SynchronousTestCase):
    """The OpenAI-style speech server: models, speech, transcriptions, through ``work``."""

    def setUp(self) -> None:
        self.sim = _Sim(self, "openai-speech", load_s=0.3, work_s=0.2)

    def test_health_and_models(self) -> None:
        """/health answers ok; /v1/models lists its models as OpenAI's list."""
        self.assertEqual(self.sim.call("GET", "/health"), (200, {"status": "ok"}))
        code, body = self.sim.call("GET", "/v1/models")
        models = [Model.model_validate(entry) for entry in body["data"]]
        self.assertEqual((code, body["object"], [m.id for m in models]),
                         (200, "list", list(SPEECH_MODELS)))  # fmt: skip

    def test_speech_cold_starts_and_answers_mpeg(self) -> None:
        """/v1/audio/speech loads the model (taking its memory), works, then answers MP3
        frames as audio/mpeg; response_format wav gives a WAV file."""
        body = {"model": "tts-1", "input": "hello", "voice": "alloy"}
        d = self.sim.send("POST", "/v1/audio/speech", json=body)
        self.assertEqual(self.sim.ledger.used_mib(), 3000)
        self.sim.advance(0.3)
        self.assertNoResult(d)
        self.sim.advance(0.2)
        code, audio, response = self.sim.answer(d)
        self.assertEqual((code, response.headers.getRawHeaders("Content-Type")),
                         (200, ["audio/mpeg"]))  # fmt: skip
        self.assertEqual((audio[:2], len(audio) % 417), (b"\xff\xfb", 0))
        [entry] = self.sim.consumer.log
        self.assertEqual((entry.kind, entry.path, entry.cold), ("tts", "/v1/audio/speech", True))
        d = self.sim.send("POST", "/v1/audio/speech", json=body | {"response_format": "wav"})
        self.sim.advance(0.2)
        code, audio, response = self.sim.answer(d)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["audio/wav"])
        self.assertEqual((audio[:4], len(audio)), (b"RIFF", 44 + 5 * 1920))

    def test_speech_refuses_bad_requests_in_openai_envelope(self) -> None:
        """No input, or an unknown response_format, is a 400 in OpenAI's error envelope."""
        for body in ({"model": "tts-1"}, {"input": "x", "response_format": "ogg"}):
            code, answer = self.sim.call("POST", "/v1/audio/speech", json=body)
            self.assertEqual(code, 400, body)
            self.assertEqual(set(answer["error"]), {"message", "type", "param", "code"})
        self.assertEqual((self.sim.ledger.used_mib(), self.sim.consumer.log), (0, []))

    def test_transcription_of_a_multipart_upload(self) -> None:
        """/v1/audio/transcriptions reads file and model from a multipart body and answers
        {"text"}; response_format text answers the text alone."""
        body, kind = _multipart({"model": "whisper-1"}, bytes(3000))
        d = self.sim.send("POST", "/v1/audio/transcriptions", data=body,
                          headers={"Content-Type": kind})  # fmt: skip
        self.sim.advance(0.3)
        self.sim.advance(0.2)
        self.assertEqual(self.sim.json(d), (200, {"text": "simulated transcript of 3000 bytes"}))
        self.assertEqual(self.sim.consumer.log[0].kind, "stt")
        body, kind = _multipart({"model": "whisper-1", "response_format": "text"}, b"abc")
        d = self.sim.send("POST", "/v1/audio/translations", data=body,
                          headers={"Content-Type": kind})  # fmt: skip
        self.sim.advance(0.2)
        code, text, response = self.sim.answer(d)
        self.assertEqual((code, text), (200, b"simulated transcript of 3 bytes"))
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["text/plain; charset=utf-8"]
        )
        self.assertEqual(self.sim.consumer.log[1].path, "/v1/audio/translations")

    def test_transcription_needs_file_model_and_multipart(self) -> None:
        """Without a file, without a model, or not multipart: a 400, nothing loaded."""
        cases = [_multipart({"model": "whisper-1"}, None), _multipart({}, b"abc"),
                 (b"{}", "application/json")]  # fmt: skip
        for body, kind in cases:
            d = self.sim.send("POST", "/v1/audio/transcriptions", data=body,
                              headers={"Content-Type": kind})  # fmt: skip
            code, answer = self.sim.json(d)
            self.assertEqual(code, 400, kind)
            self.assertIn("message", answer["error"])
        self.assertEqual(self.sim.ledger.used_mib(), 0)

    def test_selectable_from_the_command_line(self) -> None:
        """python -m mgpu.sim --service openai-speech runs this simulator."""
        args = sim_main.parse_args(
            ["--name", "speech", "--port", "0", "--service", "openai-speech"]
        )
        settings = ConsumerSettings.make(args.name, args.service)
        consumer = make_consumer(settings, MemoryLedger(), Clock())
        self.assertIsInstance(consumer, OpenAISpeech)
        self.assertEqual(settings.vram_mib, 3000)


class VLLMTests(SynchronousTestCase):
    """vLLM with sleep mode: a cold load of 2 s, a wake from host RAM of 0.25 s (times
    exact in binary), 0.5 s of work in four tokens."""

    def setUp(self) -> None:
        self.sim = _Sim(self, "vllm", vram_mib=8000, load_s=2.0, wake_s=0.25, work_s=0.5,
                        tokens=4)  # fmt: skip
        self.chat = {"model": VLLM_MODEL, "messages": [{"role": "user", "content": "hi"}]}

    def timed(self, method: str, path: str, seconds: float, **kwargs: Any) -> tuple[int, bytes]:
        """A request that has no answer until ``seconds`` have passed (in steps of
        0.125 s, each timer firing in turn), then has one."""
        d = self.sim.send(method, path, **kwargs)
        for _ in range(round(seconds / 0.125) - 1):
            self.sim.advance(0.125)
        self.assertNoResult(d)
        self.sim.advance(0.125)
        code, body, _ = self.sim.answer(d)
        return code, body

    def sleeping(self) -> bool:
        is_sleeping: bool = self.sim.call("GET", "/is_sleeping")[1]["is_sleeping"]
        return is_sleeping

    def test_health_and_models(self) -> None:
        """/health answers 200 with no body; /v1/models lists the one served model."""
        code, body, _ = self.sim.answer(self.sim.send("GET", "/health"))
        self.assertEqual((code, body), (200, b""))
        code, models = self.sim.call("GET", "/v1/models")
        listed = [Model.model_validate(entry) for entry in models["data"]]
        self.assertEqual([(m.id, m.owned_by) for m in listed], [(VLLM_MODEL, "vllm")])

    def test_cold_start_then_warm_chat(self) -> None:
        """The first chat loads in load_s then works; the next only works."""
        code, raw = self.timed("POST", "/v1/chat/completions", 2.5, json=self.chat)
        answer = ChatCompletion.model_validate_json(raw)
        self.assertEqual((code, answer.model), (200, VLLM_MODEL))
        self.assertEqual(answer.choices[0].message.content, "tok0 tok1 tok2 tok3 ")
        self.assertEqual(self.sim.ledger.used_mib(), 8000)
        self.assertEqual(self.timed("POST", "/v1/chat/completions", 0.5, json=self.chat)[0], 200)

    def test_chat_streamed_as_sse(self) -> None:
        """stream: true: the head comes with the first token, one chunk per token, then
        data: [DONE]."""
        d = self.sim.send("POST", "/v1/chat/completions", json=self.chat | {"stream": True})
        self.sim.advance(2.0)
        self.assertNoResult(d)
        for _ in range(4):
            self.sim.advance(0.125)
        code, raw, _ = self.sim.answer(d)
        events = _sse_events(raw)
        self.assertEqual((code, events[-1]), (200, b"[DONE]"))
        parsed = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
        self.assertEqual(
            [c.choices[0].delta.content for c in parsed], ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
        )
        self.assertEqual({c.system_fingerprint for c in parsed}, {"fp_vllm"})

    def test_another_model_is_a_404(self) -> None:
        """It serves one model: another name is vLLM's 404, and nothing loads."""
        code, body = self.sim.call("POST", "/v1/chat/completions",
                                   json=self.chat | {"model": "gpt-4"})  # fmt: skip
        self.assertEqual((code, body["code"]), (404, 404))
        self.assertIn("gpt-4", body["message"])
        self.assertEqual(self.sim.ledger.used_mib(), 0)

    def test_sleep_level_1_frees_memory_and_wake_up_is_fast(self) -> None:
        """Level 1 frees the GPU memory at once and keeps the weights: /wake_up takes
        wake_s, not load_s; /is_sleeping follows."""
        self.timed("POST", "/wake_up", 2.0)
        self.assertFalse(self.sleeping())
        code, body, _ = self.sim.answer(self.sim.send("POST", "/sleep?level=1"))
        self.assertEqual((code, body), (200, b""))
        self.assertEqual((self.sim.ledger.used_mib(), self.sleeping()), (0, True))
        state = self.sim.consumer.state()
        self.assertEqual((state["loaded"], state["in_host_ram"]), (False, True))
        self.assertEqual(self.timed("POST", "/wake_up", 0.25), (200, b""))
        self.assertEqual((self.sim.ledger.used_mib(), self.sleeping()), (8000, False))

    def test_a_request_while_asleep_wakes_it(self) -> None:
        """A chat to a sleeping vLLM wakes it from host RAM first: wake_s plus the work."""
        self.timed("POST", "/wake_up", 2.0)
        self.sim.send("POST", "/sleep")  # level 1 by default
        self.assertEqual(self.timed("POST", "/v1/chat/completions", 0.75, json=self.chat)[0], 200)
        self.assertFalse(self.sleeping())

    def test_sleep_level_2_drops_the_weights(self) -> None:
        """After level 2 the next load is a cold one; a level that is not 1 or 2 is a 400."""
        self.timed("POST", "/wake_up", 2.0)
        self.sim.answer(self.sim.send("POST", "/sleep?level=2"))
        self.assertEqual(self.sim.ledger.used_mib(), 0)
        self.assertEqual(self.timed("POST", "/wake_up", 2.0)[0], 200)
        self.assertEqual(self.sim.call("POST", "/sleep?level=3")[0], 400)
        self.assertEqual(self.sim.ledger.used_mib(), 8000)

    def test_wake_s_defaults_to_a_tenth_of_load_s(self) -> None:
        """Without wake_s, a wake takes load_s / 10; from the command line, --wake-s."""
        sim = _Sim(self, "vllm", load_s=3.0)
        vllm = cast(VLLM, sim.consumer)
        self.assertEqual(vllm.load_time(), 3.0)
        vllm.in_host_ram = True
        self.assertEqual(vllm.load_time(), 0.3)
        args = sim_main.parse_args(["--name", "vllm", "--port", "0", "--wake-s", "0.5"])
        self.assertEqual((args.service, args.wake_s), (None, 0.5))
        settings = ConsumerSettings.make(args.name, args.service, wake_s=args.wake_s)
        self.assertIsInstance(make_consumer(settings, MemoryLedger(), Clock()), VLLM)
        self.assertEqual((settings.vram_mib, settings.wake_s), (11000, 0.5))
