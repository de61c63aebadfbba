"""Tests for mgpu.gpu: readers, the poller, the status shape and the fake nvidia-smi."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pynvml
from attrs import define, evolve, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mgpu.config import GpuConfig
from mgpu.gpu import (
    APPS_QUOTE_CHARS,
    INIT_RETRY_S,
    MIB,
    NO_SOURCE_ERROR,
    NVML_VALUE_NOT_AVAILABLE,
    REAP_GRACE_S,
    SMI_APPS_QUERY,
    SMI_FORMAT,
    SMI_QUERY,
    AutoReader,
    GpuPoller,
    GpuProcess,
    GpuSnapshot,
    NoReader,
    NvmlReader,
    ProcessRunner,
    SmiReader,
    SmiResult,
    SmiTimeout,
    parse_smi_apps,
    reader_for,
)
from tests.fuzz import examples

FAKE_SMI = str(Path(__file__).with_name("fake_nvidia_smi.py"))
START = 1_795_000_000.0  # 2026-11-17T..., any fixed instant will do
RTX_4090 = "NVIDIA GeForce RTX 4090"


def at(seconds: float) -> datetime:
    """The aware UTC datetime a reader stamps at clock time ``seconds``."""
    return datetime.fromtimestamp(seconds, tz=UTC)


def started_clock() -> Clock:
    """A Clock set to a plausible present."""
    clock = Clock()
    clock.advance(START)
    return clock


def snapshot(
    used: int = 1000, *, source: str = "nvml", ok: bool = True, error: str = "boom"
) -> GpuSnapshot:
    """A reading of a 24 GiB card with ``used`` MiB taken, or a failed one saying ``error``."""
    if not ok:
        return GpuSnapshot(source, False, error, 0, None, None, None, None, at(START))
    return GpuSnapshot(source, True, None, 0, RTX_4090, 24564, used, 24564 - used, at(START))


class GpuSnapshotTests(SynchronousTestCase):
    """The ``gpu`` object of the status document."""

    def test_to_json_shape(self) -> None:
        """An ok reading renders exactly the SPEC section 6 fields, read_at as ``...Z``."""
        reading = GpuSnapshot(
            source="nvml",
            ok=True,
            error=None,
            index=0,
            name=RTX_4090,
            total_mib=24564,
            used_mib=16012,
            free_mib=8552,
            read_at=datetime(2026, 11, 26, 22, 0, 0, 123456, tzinfo=UTC),
        )
        self.assertEqual(
            reading.to_json(),
            {
                "source": "nvml",
                "ok": True,
                "error": None,
                "index": 0,
                "name": RTX_4090,
                "total_mib": 24564,
                "used_mib": 16012,
                "free_mib": 8552,
                "read_at": "2026-11-26T22:00:00Z",
            },
        )

    def test_to_json_failure_and_never_read(self) -> None:
        """A failed reading keeps every key, with nulls; an unread one has a null read_at."""
        rendered = NoReader(1, started_clock()).read()
        shape = self.successResultOf(rendered).to_json()
        self.assertEqual(list(shape), list(snapshot().to_json()))
        self.assertEqual(shape["name"], None)
        self.assertEqual(shape["free_mib"], None)
        poller = GpuPoller(NoReader(0, Clock()), Clock(), 2.0)
        self.assertIsNone(poller.latest.to_json()["read_at"])

    def test_to_json_leaves_processes_out(self) -> None:
        """The per-process fields stay out of to_json: the status layer adds its own keys."""
        listed = evolve(snapshot(), processes=(GpuProcess(7, 100),), processes_error="x")
        self.assertEqual(listed.to_json(), snapshot().to_json())

    def test_processes_default_to_unknown(self) -> None:
        """A snapshot built without them has no process list and no error."""
        self.assertEqual((snapshot().processes, snapshot().processes_error), (None, None))

    def test_to_json_converts_to_utc(self) -> None:
        """A read_at in another timezone is shown in UTC."""
        from datetime import timedelta, timezone

        local = datetime(2026, 11, 26, 23, 0, 0, tzinfo=timezone(timedelta(hours=1)))
        reading = evolve(snapshot(), read_at=local)
        self.assertEqual(reading.to_json()["read_at"], "2026-11-26T22:00:00Z")


@define
class FakeMemory:
    total: int
    used: int
    free: int


@define
class FakeProcessInfo:
    """An item of pynvml's running-process lists: memory in bytes, or None."""

    pid: int
    usedGpuMemory: int | None


@define
class FakeNvml:
    """A stand-in for the pynvml module that records its calls."""

    name: str | bytes = RTX_4090
    memory: FakeMemory = field(
        factory=lambda: FakeMemory(24564 * MIB + 5, 1000 * MIB + MIB - 1, 23564 * MIB)
    )
    init_error: Exception | None = None
    call_error: Exception | None = None
    compute: list[FakeProcessInfo] | Exception = field(factory=list)
    graphics: list[FakeProcessInfo] | Exception = field(factory=list)
    calls: list[object] = field(factory=list)

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self.calls.append(("handle", index))
        if self.call_error is not None:
            raise self.call_error
        return ("handle", index)

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        return self.name

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> FakeMemory:
        return self.memory

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[FakeProcessInfo]:
        self.calls.append(("compute", handle))
        if isinstance(self.compute, Exception):
            raise self.compute
        return self.compute

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[FakeProcessInfo]:
        self.calls.append(("graphics", handle))
        if isinstance(self.graphics, Exception):
            raise self.graphics
        return self.graphics


class NvmlReaderTests(SynchronousTestCase):
    """NvmlReader against a fake pynvml module."""

    def setUp(self) -> None:
        self.clock = started_clock()

    def test_reading(self) -> None:
        """A working NVML gives an ok snapshot with name, MiB figures and the clock's time."""
        nvml = FakeNvml()
        reading = self.successResultOf(NvmlReader(0, self.clock, nvml).read())
        self.assertEqual(
            reading,
            GpuSnapshot("nvml", True, None, 0, RTX_4090, 24564, 1000, 23564, at(START), ()),
        )

    def test_mib_conversion_floors(self) -> None:
        """Bytes become whole MiB, rounded down, each figure on its own."""
        nvml = FakeNvml(memory=FakeMemory(2 * MIB - 1, MIB, 0))
        reading = self.successResultOf(NvmlReader(0, self.clock, nvml).read())
        self.assertEqual((reading.total_mib, reading.used_mib, reading.free_mib), (1, 1, 0))

    def test_bytes_name_decoded(self) -> None:
        """Older bindings return the name as bytes; it is decoded to text."""
        nvml = FakeNvml(name=b"NVIDIA GeForce RTX 4090")
        reading = self.successResultOf(NvmlReader(0, self.clock, nvml).read())
        self.assertEqual(reading.name, RTX_4090)

    def test_index_and_source(self) -> None:
        """The configured index is asked for and reported; the source can be renamed (the demo)."""
        nvml = FakeNvml()
        reading = self.successResultOf(NvmlReader(2, self.clock, nvml, source="sim").read())
        self.assertIn(("handle", 2), nvml.calls)
        self.assertEqual((reading.index, reading.source), (2, "sim"))

    def processes(self, nvml: FakeNvml) -> GpuSnapshot:
        """A reading of card 1 through ``nvml``, whose memory figures are always fine."""
        reading = self.successResultOf(NvmlReader(1, self.clock, nvml).read())
        self.assertEqual((reading.ok, reading.error, reading.used_mib), (True, None, 1000))
        return reading

    def test_processes_from_both_lists(self) -> None:
        """Compute and graphics processes of the card asked for, sorted by pid, bytes as
        whole MiB rounded down."""
        nvml = FakeNvml(
            compute=[FakeProcessInfo(900, 2048 * MIB), FakeProcessInfo(12, MIB - 1)],
            graphics=[FakeProcessInfo(40, 300 * MIB + 5)],
        )
        reading = self.processes(nvml)
        self.assertEqual(
            reading.processes, (GpuProcess(12, 0), GpuProcess(40, 300), GpuProcess(900, 2048))
        )
        self.assertIsNone(reading.processes_error)
        self.assertIn(("compute", ("handle", 1)), nvml.calls)
        self.assertIn(("graphics", ("handle", 1)), nvml.calls)

    def test_pid_in_both_lists_once_with_the_larger_figure(self) -> None:
        """A process with compute and graphics work is listed once, with its larger figure,
        whichever list has it; a figure wins over "not available"."""
        nvml = FakeNvml(
            compute=[FakeProcessInfo(5, 100 * MIB), FakeProcessInfo(6, 900 * MIB),
                     FakeProcessInfo(7, None)],
            graphics=[FakeProcessInfo(5, 400 * MIB), FakeProcessInfo(6, 20 * MIB),
                      FakeProcessInfo(7, 3 * MIB)],
        )  # fmt: skip
        self.assertEqual(
            self.processes(nvml).processes,
            (GpuProcess(5, 400), GpuProcess(6, 900), GpuProcess(7, 3)),
        )

    def test_memory_not_available(self) -> None:
        """None (pynvml's own translation) and NVML_VALUE_NOT_AVAILABLE are both None."""
        self.assertEqual(NVML_VALUE_NOT_AVAILABLE, pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value)
        nvml = FakeNvml(
            compute=[FakeProcessInfo(1, None), FakeProcessInfo(2, NVML_VALUE_NOT_AVAILABLE)]
        )
        self.assertEqual(self.processes(nvml).processes, (GpuProcess(1, None), GpuProcess(2, None)))

    def test_no_processes(self) -> None:
        """Empty lists are an empty tuple: known to be none, not unknown."""
        reading = self.processes(FakeNvml())
        self.assertEqual((reading.processes, reading.processes_error), ((), None))

    def test_compute_not_supported(self) -> None:
        """A compute list NVML refuses leaves no list, with the call and NVML's message;
        the memory reading stays ok."""
        not_supported = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        nvml = FakeNvml(compute=not_supported, graphics=[FakeProcessInfo(3, MIB)])
        reading = self.processes(nvml)
        self.assertIsNone(reading.processes)
        self.assertEqual(
            reading.processes_error,
            "NVML nvmlDeviceGetComputeRunningProcesses failed: Not Supported",
        )

    def test_both_not_supported(self) -> None:
        """Both lists refused: no list, the compute call named."""
        nvml = FakeNvml(
            compute=pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED),
            graphics=pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED),
        )
        reading = self.processes(nvml)
        self.assertIsNone(reading.processes)
        self.assertIn("nvmlDeviceGetComputeRunningProcesses", reading.processes_error or "")

    def test_graphics_not_supported_keeps_compute(self) -> None:
        """Graphics refused alone (many compute cards): compute's list, and no error."""
        nvml = FakeNvml(
            compute=[FakeProcessInfo(8, 10 * MIB)],
            graphics=pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED),
        )
        reading = self.processes(nvml)
        self.assertEqual((reading.processes, reading.processes_error), ((GpuProcess(8, 10),), None))

    def test_nonsense_item_is_a_failed_list(self) -> None:
        """An item no NVML gives (a negative figure) is a failed list, not a crash."""
        reading = self.processes(FakeNvml(compute=[FakeProcessInfo(8, -1)]))
        self.assertIsNone(reading.processes)
        self.assertIn("usedGpuMemory -1", reading.processes_error or "")

    def test_failed_memory_read_lists_nothing(self) -> None:
        """When the memory cannot be read, the process lists are not asked for."""
        nvml = FakeNvml(call_error=pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST))
        reading = self.successResultOf(NvmlReader(0, self.clock, nvml).read())
        self.assertEqual(
            (reading.ok, reading.processes, reading.processes_error), (False, None, None)
        )
        self.assertNotIn("compute", [call[0] for call in nvml.calls if isinstance(call, tuple)])

    def test_init_once(self) -> None:
        """NVML is initialised on the first read only."""
        nvml = FakeNvml()
        reader = NvmlReader(0, self.clock, nvml)
        self.assertEqual(nvml.calls, [])
        reader.read()
        reader.read()
        self.assertEqual(nvml.calls.count("init"), 1)

    def test_init_failure(self) -> None:
        """A failed init is a snapshot with ok False and NVML's message, stamped with the time."""
        nvml = FakeNvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
        reading = self.successResultOf(NvmlReader(0, self.clock, nvml).read())
        self.assertFalse(reading.ok)
        self.assertEqual(reading.error, "NVML init failed: Driver Not Loaded")
        self.assertEqual((reading.total_mib, reading.read_at), (None, at(START)))

    def test_init_retried_after_a_while(self) -> None:
        """After a failed init, reads report that failure at once for INIT_RETRY_S, without
        calling nvmlInit; then one tries again, and succeeds once NVML works."""
        nvml = FakeNvml(init_error=RuntimeError("not yet"))
        reader = NvmlReader(0, self.clock, nvml)
        self.assertFalse(self.successResultOf(reader.read()).ok)
        nvml.init_error = None
        self.clock.advance(INIT_RETRY_S - 1)
        reading = self.successResultOf(reader.read())
        self.assertEqual((reading.ok, reading.error), (False, "NVML init failed: not yet"))
        self.assertEqual(reading.read_at, at(START + INIT_RETRY_S - 1))
        self.assertEqual(nvml.calls.count("init"), 1)
        self.clock.advance(1)
        self.assertTrue(self.successResultOf(reader.read()).ok)
        self.assertEqual(nvml.calls.count("init"), 2)

    def test_call_failure(self) -> None:
        """A failing device call is a snapshot with ok False naming the GPU and the error."""
        nvml = FakeNvml(call_error=pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST))
        reading = self.successResultOf(NvmlReader(0, self.clock, nvml).read())
        self.assertFalse(reading.ok)
        self.assertEqual(reading.error, "NVML read of GPU 0 failed: GPU is lost")

    def test_missing_module(self) -> None:
        """Without the pynvml module the read fails with ok False instead of raising."""
        self.addCleanup(sys.modules.__setitem__, "pynvml", pynvml)
        sys.modules["pynvml"] = None  # type: ignore[assignment]
        reading = self.successResultOf(NvmlReader(0, self.clock).read())
        self.assertFalse(reading.ok)
        assert reading.error is not None
        self.assertTrue(reading.error.startswith("NVML init failed: "), reading.error)

    def test_shutdown(self) -> None:
        """shutdown calls nvmlShutdown once, and only if NVML was initialised."""
        unused = FakeNvml()
        NvmlReader(0, self.clock, unused).shutdown()
        self.assertEqual(unused.calls, [])
        nvml = FakeNvml()
        reader = NvmlReader(0, self.clock, nvml)
        reader.read()
        reader.shutdown()
        reader.shutdown()
        self.assertEqual(nvml.calls.count("shutdown"), 1)


class RealNvmlTests(SynchronousTestCase):
    """The real card, where NVML works on this machine."""

    def test_real_card(self) -> None:
        """NVML reads GPU 0: a name and figures that add up to the total."""
        reader = NvmlReader(0, started_clock())
        self.addCleanup(reader.shutdown)
        reading = self.successResultOf(reader.read())
        if reading.error is not None and reading.error.startswith("NVML init failed"):
            raise SkipTest(f"no NVML here: {reading.error}")
        self.assertTrue(reading.ok, reading.error)
        assert reading.total_mib is not None and reading.used_mib is not None
        assert reading.free_mib is not None
        self.assertTrue(reading.name)
        self.assertGreater(reading.total_mib, 0)
        # Each figure is floored on its own, and newer drivers keep some memory reserved.
        self.assertLessEqual(reading.used_mib + reading.free_mib, reading.total_mib + 2)
        if reading.processes is None:
            self.assertTrue(reading.processes_error)
        else:
            pids = [process.pid for process in reading.processes]
            self.assertEqual(pids, sorted(set(pids)))


Answer = Deferred[SmiResult] | SmiResult | Exception


@define
class ScriptedRunner:
    """An SmiRunner answering from a script, recording what it was asked to run.

    ``answer`` is the memory query's, ``apps`` the process query's (no process by default).
    """

    answer: Answer
    apps: Answer = (b"", b"", 0)
    calls: list[tuple[str, list[str]]] = field(factory=list)

    def __call__(self, executable: str, args: Sequence[str]) -> Deferred[SmiResult]:
        self.calls.append((executable, list(args)))
        answer = self.apps if args[0] == SMI_APPS_QUERY else self.answer
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)


def smi_line(index: int = 0, name: str = RTX_4090, used: int = 1000) -> bytes:
    return f"{index}, {name}, 24564, {used}, {24564 - used}\n".encode()


class SmiReaderTests(SynchronousTestCase):
    """SmiReader with an injected runner."""

    def setUp(self) -> None:
        self.clock = started_clock()

    def read(self, answer: Any, index: int = 0, apps: Any = (b"", b"", 0)) -> GpuSnapshot:
        reader = SmiReader(index, self.clock, ScriptedRunner(answer, apps), "nvidia-smi")
        return self.successResultOf(reader.read())

    def test_arguments(self) -> None:
        """The exact queries, format and ``-i <index>`` are passed to the configured executable."""
        runner = ScriptedRunner((smi_line(3), b"", 0))
        self.successResultOf(SmiReader(3, self.clock, runner, "/opt/bin/nvidia-smi").read())
        self.assertEqual(
            runner.calls,
            [
                (
                    "/opt/bin/nvidia-smi",
                    [
                        "--query-gpu=index,name,memory.total,memory.used,memory.free",
                        "--format=csv,noheader,nounits",
                        "-i",
                        "3",
                    ],
                ),
                (
                    "/opt/bin/nvidia-smi",
                    [
                        "--query-compute-apps=pid,used_memory",
                        "--format=csv,noheader,nounits",
                        "-i",
                        "3",
                    ],
                ),
            ],
        )
        self.assertEqual((SMI_QUERY, SMI_FORMAT), tuple(runner.calls[0][1][:2]))
        self.assertEqual((SMI_APPS_QUERY, SMI_FORMAT), tuple(runner.calls[1][1][:2]))

    def test_parse(self) -> None:
        """One CSV line becomes an ok snapshot stamped with the clock's time."""
        self.assertEqual(
            self.read((smi_line(used=16012), b"", 0)),
            GpuSnapshot("nvidia-smi", True, None, 0, RTX_4090, 24564, 16012, 8552, at(START), ()),
        )

    def test_queries_run_at_once(self) -> None:
        """Both queries start before either answers; the reading waits for both."""
        memory: Deferred[SmiResult] = Deferred()
        apps: Deferred[SmiResult] = Deferred()
        runner = ScriptedRunner(memory, apps)
        reading = SmiReader(0, self.clock, runner).read()
        self.assertEqual(len(runner.calls), 2)
        memory.callback((smi_line(), b"", 0))
        self.assertNoResult(reading)
        apps.callback((b"17, 300\n", b"", 0))
        self.assertEqual(self.successResultOf(reading).processes, (GpuProcess(17, 300),))

    def test_processes(self) -> None:
        """Each line is a process, sorted by pid; N/A memory is None."""
        apps = b"4242, 16000\n17, [N/A]\n\n99 , [Not Supported]\n5,N/A\n"
        reading = self.read((smi_line(), b"", 0), apps=(apps, b"", 0))
        self.assertEqual(
            reading.processes,
            (GpuProcess(5, None), GpuProcess(17, None), GpuProcess(99, None),
             GpuProcess(4242, 16000)),
        )  # fmt: skip
        self.assertIsNone(reading.processes_error)

    def test_pid_on_several_lines_holds_the_sum(self) -> None:
        """A pid listed twice (one line per MIG instance) holds both; unknown if one is."""
        apps = b"8, 100\n8, 250\n9, 1\n9, [N/A]\n"
        reading = self.read((smi_line(), b"", 0), apps=(apps, b"", 0))
        self.assertEqual(reading.processes, (GpuProcess(8, 350), GpuProcess(9, None)))

    def test_no_processes(self) -> None:
        """No output is no process (the real tool prints nothing); so is its own sentence."""
        for empty in (b"", b"\n", b"No running processes found\n"):
            reading = self.read((smi_line(), b"", 0), apps=(empty, b"", 0))
            self.assertEqual((reading.processes, reading.processes_error), ((), None), empty)

    def test_unreadable_processes(self) -> None:
        """A line that is not ``pid, MiB`` leaves no list, saying which line, quoting it
        shortly; the memory reading is untouched."""
        long = "x" * 500
        apps = f"1, 2\n3, 4 MiB, {long}\n".encode()
        reading = self.read((smi_line(used=16012), b"", 0), apps=(apps, b"", 0))
        self.assertEqual(
            reading,
            GpuSnapshot(
                "nvidia-smi", True, None, 0, RTX_4090, 24564, 16012, 8552, at(START), None,
                "nvidia-smi --query-compute-apps gave unreadable output: line 2 unreadable: "
                + repr(f"3, 4 MiB, {long}"[:APPS_QUOTE_CHARS]),
            ),
        )  # fmt: skip

    def test_unreadable_figures(self) -> None:
        """Negative, signed, non-ASCII or absurdly long numbers are unreadable."""
        for line in ("-1, 5", "1, -5", "+1, 5", "1, 5.0", "\u0661, 5", "1, " + "9" * 30, "1"):
            processes, error = parse_smi_apps(line + "\n")
            self.assertIsNone(processes, line)
            self.assertEqual(error, f"line 1 unreadable: {line[:APPS_QUOTE_CHARS]!r}")

    def test_processes_query_fails_beside_good_memory(self) -> None:
        """A failing process query keeps the memory reading ok, its error shortened."""
        stderr = b"Field 'used_memory' is not valid " + b"y" * 300 + b"\n"
        reading = self.read((smi_line(), b"", 0), apps=(b"", stderr, 2))
        self.assertEqual((reading.ok, reading.error, reading.used_mib), (True, None, 1000))
        self.assertIsNone(reading.processes)
        quoted = repr(stderr.decode().strip()[:APPS_QUOTE_CHARS])
        self.assertEqual(
            reading.processes_error, f"nvidia-smi --query-compute-apps exited with code 2: {quoted}"
        )

    def test_processes_query_cannot_run(self) -> None:
        """A process query that times out, is killed or cannot start says so."""
        answers: list[tuple[Answer, str]] = [
            (SmiTimeout("did not answer within 5s (killed)"), "did not answer within 5s (killed)"),
            ((b"", b"", -9), "killed by signal 9"),
            (OSError("no such file"), "could not be run: no such file"),
            (RuntimeError("bug"), "failed: bug"),
        ]
        for apps, said in answers:
            reading = self.read((smi_line(), b"", 0), apps=apps)
            self.assertTrue(reading.ok)
            self.assertEqual(
                (reading.processes, reading.processes_error),
                (None, f"nvidia-smi --query-compute-apps {said}"),
            )

    def test_failed_memory_keeps_the_processes(self) -> None:
        """The two queries are independent: a failed memory reading still lists processes."""
        reading = self.read((b"", b"No devices were found\n", 6), apps=(b"3, 30\n", b"", 0))
        self.assertEqual(reading.error, "nvidia-smi exited with code 6: No devices were found")
        self.assertEqual(reading.processes, (GpuProcess(3, 30),))

    @settings(max_examples=examples(300), deadline=None)
    @given(st.one_of(st.text(), st.lists(st.text(alphabet="0123456789, []N/A\n")).map("\n".join)))
    def test_any_processes_output(self, text: str) -> None:
        """Whatever the process query prints, the reading is ok, and its list is processes
        with non-negative figures or None with an error quoting at most 100 characters."""
        reading = self.read((smi_line(), b"", 0), apps=(text.encode(), b"", 0))
        self.assertEqual((reading.ok, reading.used_mib), (True, 1000))
        if reading.processes is None:
            error = reading.processes_error
            assert error is not None
            for start in range(len(text) - 100):
                self.assertNotIn(text[start : start + 101], error)
            return
        self.assertIsNone(reading.processes_error)
        pids = [process.pid for process in reading.processes]
        self.assertEqual(pids, sorted(set(pids)))
        for process in reading.processes:
            self.assertIsInstance(process, GpuProcess)
            self.assertGreaterEqual(process.pid, 0)
            self.assertTrue(process.used_mib is None or process.used_mib >= 0)

    def test_name_with_comma(self) -> None:
        """A comma inside the name does not shift the memory figures."""
        reading = self.read((smi_line(name="Odd, Card"), b"", 0))
        self.assertEqual(
            (reading.name, reading.total_mib, reading.free_mib), ("Odd, Card", 24564, 23564)
        )

    def test_bad_output(self) -> None:
        """Output that is not the expected line is ok False, quoting it."""
        reading = self.read((b"0, RTX, [N/A], [N/A], [N/A]\n", b"", 0))
        self.assertFalse(reading.ok)
        assert reading.error is not None
        self.assertIn("nvidia-smi gave unreadable output", reading.error)
        self.assertIn("[N/A]", reading.error)

    def test_empty_output(self) -> None:
        """No output at all is ok False."""
        reading = self.read((b"", b"", 0))
        self.assertFalse(reading.ok)
        self.assertIn("unreadable output", reading.error or "")

    def test_wrong_gpu(self) -> None:
        """An answer about another GPU than the one asked for is ok False."""
        reading = self.read((smi_line(index=1), b"", 0), index=0)
        self.assertFalse(reading.ok)
        self.assertIn("answered for GPU 1, not 0", reading.error or "")

    def test_nonzero_exit(self) -> None:
        """A non-zero exit is ok False with the code and stderr's first line."""
        reading = self.read((b"", b"\nNo devices were found\nmore\n", 6))
        self.assertFalse(reading.ok)
        self.assertEqual(reading.error, "nvidia-smi exited with code 6: No devices were found")
        self.assertEqual(reading.read_at, at(START))

    def test_nonzero_exit_stdout_message(self) -> None:
        """With nothing on stderr, stdout's first line explains (the real tool prints there)."""
        reading = self.read((b"NVIDIA-SMI has failed because it couldn't communicate\n", b"", 9))
        self.assertEqual(
            reading.error,
            "nvidia-smi exited with code 9: NVIDIA-SMI has failed because it couldn't communicate",
        )

    def test_killed(self) -> None:
        """A process killed by a signal is ok False naming the signal."""
        reading = self.read((b"", b"", -9))
        self.assertEqual(reading.error, "nvidia-smi killed by signal 9")

    def test_missing_executable(self) -> None:
        """A runner that cannot start the executable gives ok False, not an errback."""
        reading = self.read(FileNotFoundError("'nvidia-smi' not found or not executable"))
        self.assertFalse(reading.ok)
        self.assertEqual(
            reading.error,
            "nvidia-smi could not be run: 'nvidia-smi' not found or not executable",
        )

    def test_timeout(self) -> None:
        """A runner timeout gives ok False saying it did not answer."""
        reading = self.read(SmiTimeout("did not answer within 5s (killed)"))
        self.assertEqual(reading.error, "nvidia-smi did not answer within 5s (killed)")

    def test_runner_raises(self) -> None:
        """Even a runner that raises synchronously gives a snapshot with ok False."""

        def broken(executable: str, args: Sequence[str]) -> Deferred[SmiResult]:
            raise RuntimeError("bug")

        reading = self.successResultOf(SmiReader(0, self.clock, broken).read())
        self.assertFalse(reading.ok)
        self.assertIn("bug", reading.error or "")
        self.flushLoggedErrors(RuntimeError)


class FakeProcess:
    """The transport of a spawned process, recording signals."""

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.lost = False
        self.exited = False

    def signalProcess(self, signal: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def loseConnection(self) -> None:
        self.lost = True


class FakeProcessReactor(Clock):
    """A Clock that also records spawnProcess calls instead of running anything."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[ProcessProtocol, str, list[str], Any, FakeProcess]] = []

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Any = None,
        path: Any = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcess:
        process = FakeProcess()
        self.spawned.append(
            (processProtocol, str(executable), [str(a) for a in args], env, process)
        )
        processProtocol.makeConnection(process)
        return process


class ProcessRunnerTests(SynchronousTestCase):
    """ProcessRunner's use of the reactor: output, exit codes, the timeout and reaping."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.runner = ProcessRunner(self.reactor, timeout_s=5.0, env={"PATH": "/nowhere", "X": "1"})

    def spawn(self) -> tuple[Deferred[SmiResult], ProcessProtocol, FakeProcess]:
        result = self.runner(sys.executable, ["--flag"])
        protocol, executable, args, env, process = self.reactor.spawned[-1]
        self.assertEqual((executable, args), (sys.executable, [sys.executable, "--flag"]))
        self.assertEqual(env, {"PATH": "/nowhere", "X": "1"})
        return result, protocol, process

    def test_output_and_exit(self) -> None:
        """Stdout, stderr and the exit code come back once the process has ended."""
        result, protocol, _ = self.spawn()
        protocol.outReceived(b"0, GPU")
        protocol.outReceived(b", 1, 0, 1\n")
        protocol.errReceived(b"warn\n")
        self.assertNoResult(result)
        protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(result), (b"0, GPU, 1, 0, 1\n", b"warn\n", 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_found_executable_kept_while_it_stays(self) -> None:
        """A name found on PATH is run from there while it stays executable; once it is
        gone, PATH is searched again and a copy further on is found."""
        first, second = Path(self.mktemp()), Path(self.mktemp())
        for directory in (first, second):
            directory.mkdir()
            tool = directory / "smi"
            tool.write_text("#!/bin/sh\n")
            tool.chmod(0o755)
        runner = ProcessRunner(self.reactor, env={"PATH": f"{first}:{second}"})
        runner("smi", [])
        (second / "smi").chmod(0o644)  # not executable any more: not looked at again
        runner("smi", [])
        (first / "smi").unlink()
        (second / "smi").chmod(0o755)
        runner("smi", [])
        ran = [executable for _, executable, *_ in self.reactor.spawned]
        self.assertEqual(ran, [str(first / "smi")] * 2 + [str(second / "smi")])

    def test_nonzero_exit(self) -> None:
        """A failing process gives its exit code as a result, not an errback."""
        result, protocol, _ = self.spawn()
        protocol.processEnded(Failure(ProcessTerminated(exitCode=6)))
        self.assertEqual(self.successResultOf(result), (b"", b"", 6))

    def test_unreapable_process_abandoned(self) -> None:
        """A killed process that is never reaped (stuck in the driver) still ends the read."""
        result, _, process = self.spawn()
        self.reactor.advance(5.0)
        self.assertEqual(process.signals, ["KILL"])
        self.reactor.advance(REAP_GRACE_S - 0.1)
        self.assertNoResult(result)
        self.reactor.advance(0.1)
        self.assertIn("not reaped", str(self.failureResultOf(result, SmiTimeout).value))

    def test_timeout_kills_then_waits_for_reaping(self) -> None:
        """After timeout_s the process is killed, and the result waits until it has ended."""
        result, protocol, process = self.spawn()
        self.reactor.advance(4.9)
        self.assertEqual(process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual((process.signals, process.lost), (["KILL"], True))
        self.assertNoResult(result)
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.failureResultOf(result, SmiTimeout)

    def test_cancel_kills(self) -> None:
        """Cancelling the result kills the process and drops the timer once it ends."""
        result, protocol, process = self.spawn()
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.assertEqual(process.signals, ["KILL"])
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_missing_executable(self) -> None:
        """An executable that is not on PATH fails at once and spawns nothing."""
        result = self.runner("nvidia-smi", ["-L"])
        self.failureResultOf(result, FileNotFoundError)
        self.assertEqual(self.reactor.spawned, [])


class StaticReader:
    """A reader answering with a fixed snapshot, counting its reads."""

    def __init__(self, answer: GpuSnapshot) -> None:
        self.answer = answer
        self.source = answer.source
        self.reads = 0

    def read(self) -> Deferred[GpuSnapshot]:
        self.reads += 1
        return succeed(self.answer)


class AutoReaderTests(SynchronousTestCase):
    """AutoReader: NVML first, nvidia-smi as the fallback."""

    def test_nvml_first(self) -> None:
        """When NVML works it is used and nvidia-smi is never run."""
        nvml, smi = StaticReader(snapshot()), StaticReader(snapshot(source="nvidia-smi"))
        auto = AutoReader(nvml, smi)
        self.assertEqual(self.successResultOf(auto.read()).source, "nvml")
        self.assertEqual((smi.reads, auto.source), (0, "nvml"))

    def test_fallback_remembered(self) -> None:
        """When NVML fails nvidia-smi answers, and later reads go straight to nvidia-smi."""
        nvml = StaticReader(snapshot(ok=False))
        smi = StaticReader(snapshot(2000, source="nvidia-smi"))
        auto = AutoReader(nvml, smi)
        self.assertEqual(auto.source, "none")
        first = self.successResultOf(auto.read())
        self.assertEqual((first.source, first.used_mib), ("nvidia-smi", 2000))
        self.successResultOf(auto.read())
        self.assertEqual((nvml.reads, smi.reads, auto.source), (1, 2, "nvidia-smi"))

    def test_both_fail(self) -> None:
        """When both fail the snapshot is ok False and its error names both failures."""
        nvml = StaticReader(snapshot(ok=False, error="NVML init failed: X"))
        smi = StaticReader(
            snapshot(ok=False, error="nvidia-smi could not be run: Y", source="nvidia-smi")
        )
        reading = self.successResultOf(AutoReader(nvml, smi).read())
        self.assertFalse(reading.ok)
        self.assertEqual(reading.source, "none")
        self.assertEqual(
            reading.error,
            "no GPU reading: nvml: NVML init failed: X; nvidia-smi: nvidia-smi could not be run: Y",
        )
        self.assertEqual(reading.read_at, at(START))

    def test_chosen_source_failing_starts_over(self) -> None:
        """A kept source that fails is reported as such, and the next read tries NVML again."""
        nvml = StaticReader(snapshot(ok=False))
        smi = StaticReader(snapshot(source="nvidia-smi"))
        auto = AutoReader(nvml, smi)
        self.successResultOf(auto.read())
        smi.answer = snapshot(ok=False, error="gone", source="nvidia-smi")
        self.assertEqual(self.successResultOf(auto.read()).error, "gone")
        self.assertEqual(nvml.reads, 1)
        nvml.answer = snapshot()
        self.assertEqual(self.successResultOf(auto.read()).source, "nvml")
        self.assertEqual((nvml.reads, auto.source), (2, "nvml"))


class NoReaderTests(SynchronousTestCase):
    """NoReader: gpu.source none."""

    def test_says_why(self) -> None:
        """Every read is ok False, source none, naming the configuration, stamped with the time."""
        reading = self.successResultOf(NoReader(1, started_clock()).read())
        self.assertEqual(
            reading,
            GpuSnapshot("none", False, NO_SOURCE_ERROR, 1, None, None, None, None, at(START)),
        )
        self.assertEqual(NO_SOURCE_ERROR, "no GPU source configured (gpu.source: none)")


class ReaderForTests(SynchronousTestCase):
    """reader_for builds the reader gpu.source names."""

    def test_sources(self) -> None:
        """Each source value gives its reader, with the configured index."""
        reactor = FakeProcessReactor()
        for source, kind in [
            ("nvml", NvmlReader),
            ("nvidia-smi", SmiReader),
            ("none", NoReader),
            ("auto", AutoReader),
        ]:
            reader = reader_for(GpuConfig(source=source, index=1), reactor)
            self.assertIsInstance(reader, kind)
        self.assertRaises(ValueError, reader_for, GpuConfig(source="cuda"), reactor)

    def test_nvidia_smi_executable(self) -> None:
        """gpu.nvidia_smi names the executable that is run."""
        reactor = FakeProcessReactor()
        config = GpuConfig(source="nvidia-smi", nvidia_smi="/definitely/not/nvidia-smi")
        reading = self.successResultOf(reader_for(config, reactor).read())
        self.assertIn("/definitely/not/nvidia-smi could not be run", reading.error or "")

    def test_global_reactor_fits(self) -> None:
        """The real reactor is accepted as it is (this also type-checks the structural types)."""
        from twisted.internet import reactor

        self.assertIsInstance(reader_for(GpuConfig(source="auto"), reactor), AutoReader)


class ControlledReader:
    """A reader whose reads the test fires by hand, counting its shutdowns."""

    source = "nvml"

    def __init__(self) -> None:
        self.pending: list[Deferred[GpuSnapshot]] = []
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1

    def read(self) -> Deferred[GpuSnapshot]:
        self.pending.append(Deferred())
        return self.pending[-1]


class PollerCase(SynchronousTestCase):
    """A GpuPoller with a Clock and a hand-driven reader, stopped at cleanup."""

    def setUp(self) -> None:
        self.clock = started_clock()
        self.reader = ControlledReader()
        self.poller = GpuPoller(self.reader, self.clock, 2.0)

    def start(self) -> None:
        self.poller.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.poller.running:
            for pending in self.reader.pending:
                if not pending.called:
                    pending.callback(snapshot())
            self.poller.stopService()


class GpuPollerTests(PollerCase):
    """GpuPoller with a Clock and a hand-driven reader."""

    def test_not_read_yet(self) -> None:
        """Before the first read, latest says so."""
        self.assertEqual(
            self.poller.latest,
            GpuSnapshot("nvml", False, "not read yet", 0, None, None, None, None, None),
        )

    def test_polls_every_interval(self) -> None:
        """Starting reads at once, then once per interval, updating latest each time."""
        self.start()
        self.assertEqual(len(self.reader.pending), 1)
        self.reader.pending[0].callback(snapshot(1000))
        self.assertEqual(self.poller.latest.used_mib, 1000)
        self.clock.advance(1.9)
        self.assertEqual(len(self.reader.pending), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.reader.pending), 2)
        self.reader.pending[1].callback(snapshot(3000))
        self.assertEqual(self.poller.latest.used_mib, 3000)

    def test_slow_read_not_doubled(self) -> None:
        """A read slower than the interval is not joined by a second concurrent read."""
        self.start()
        self.clock.advance(5.0)
        self.assertEqual(len(self.reader.pending), 1)

    def test_failed_reading_shown_and_loop_continues(self) -> None:
        """A failed reading becomes latest, and the next interval reads again."""
        self.start()
        self.reader.pending[0].callback(snapshot(ok=False))
        self.assertEqual((self.poller.latest.ok, self.poller.latest.error), (False, "boom"))
        self.clock.advance(2.0)
        self.reader.pending[1].callback(snapshot())
        self.assertTrue(self.poller.latest.ok)

    def test_errback_recorded_and_loop_continues(self) -> None:
        """A reader that breaks its promise and errbacks is recorded in latest; polling goes on."""
        self.start()
        self.reader.pending[0].errback(RuntimeError("driver exploded"))
        self.assertFalse(self.poller.latest.ok)
        self.assertEqual(self.poller.latest.error, "GPU reader failed: driver exploded")
        self.assertEqual(self.poller.latest.read_at, at(START))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(2.0)
        self.assertEqual(len(self.reader.pending), 2)

    def test_raising_reader_recorded(self) -> None:
        """A reader whose read raises is recorded in latest, and fresh still answers."""

        class Raising:
            source = "nvml"

            def read(self) -> Deferred[GpuSnapshot]:
                raise ValueError("bad")

        poller = GpuPoller(Raising(), self.clock, 2.0)
        reading = self.successResultOf(poller.fresh())
        self.assertEqual(reading.error, "GPU reader failed: bad")
        self.assertIs(poller.latest, reading)
        self.flushLoggedErrors(ValueError)

    def test_fresh_shares_in_flight_read(self) -> None:
        """Callers arriving while a read is in flight share it: one read, same snapshot."""
        first, second = self.poller.fresh(), self.poller.fresh()
        self.assertEqual(len(self.reader.pending), 1)
        self.assertNoResult(first)
        reading = snapshot(4000)
        self.reader.pending[0].callback(reading)
        self.assertIs(self.successResultOf(first), reading)
        self.assertIs(self.successResultOf(second), reading)
        self.assertIs(self.poller.latest, reading)

    def test_fresh_joins_poll(self) -> None:
        """fresh() while a poll is in flight shares that poll's read."""
        self.start()
        result = self.poller.fresh()
        self.assertEqual(len(self.reader.pending), 1)
        self.reader.pending[0].callback(snapshot(500))
        self.assertEqual(self.successResultOf(result).used_mib, 500)

    def test_fresh_after_read_reads_again(self) -> None:
        """Once a read has finished, the next fresh() takes a new one."""
        self.poller.fresh()
        self.reader.pending[0].callback(snapshot())
        later = self.poller.fresh()
        self.assertEqual(len(self.reader.pending), 2)
        self.assertNoResult(later)

    def test_cancel_one_caller(self) -> None:
        """Cancelling one caller's Deferred leaves the shared read and the other caller alone."""
        first, second = self.poller.fresh(), self.poller.fresh()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.reader.pending[0].callback(snapshot(700))
        self.assertEqual(self.successResultOf(second).used_mib, 700)
        self.assertEqual(self.poller.latest.used_mib, 700)

    def test_memory_alone_for_room_making(self) -> None:
        """fresh_memory() with a reader that can read memory alone: one query, the answer
        to the caller, latest (its process list and its time) left as it was; a reading
        in flight is joined instead; a reader without it reads in full."""
        clock = started_clock()
        runner = ScriptedRunner((smi_line(used=9000), b"", 0), (b"42, 9000\n", b"", 0))
        poller = GpuPoller(SmiReader(0, clock, runner, "nvidia-smi"), clock, 2.0)
        full = self.successResultOf(poller.fresh())
        self.assertEqual(len(runner.calls), 2)
        runner.answer = (smi_line(used=1000), b"", 0)
        memory = self.successResultOf(poller.fresh_memory())
        self.assertEqual(len(runner.calls), 3)
        self.assertEqual(runner.calls[-1][1][0], SMI_QUERY)
        self.assertEqual((memory.used_mib, memory.processes), (1000, None))
        self.assertIs(poller.latest, full)
        pending = self.poller.fresh()
        joined = self.poller.fresh_memory()  # the hand-driven reader has no read_memory
        self.assertEqual(len(self.reader.pending), 1)
        self.reader.pending[0].callback(snapshot(700))
        self.assertEqual([self.successResultOf(d).used_mib for d in (pending, joined)], [700, 700])

    def test_stop_stops_polling(self) -> None:
        """After stopService no more reads are started."""
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.assertIsNone(self.poller.stopService())
        self.clock.advance(60.0)
        self.assertEqual(len(self.reader.pending), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_waits_for_in_flight_read(self) -> None:
        """stopService's Deferred fires only once the read in flight has finished."""
        self.start()
        stopped = self.poller.stopService()
        assert stopped is not None
        self.assertNoResult(stopped)
        self.reader.pending[0].callback(snapshot(900))
        self.successResultOf(stopped)
        self.assertEqual(self.poller.latest.used_mib, 900)

    def test_index_for_unread(self) -> None:
        """The not-yet-read placeholder carries the configured index."""
        poller = GpuPoller(self.reader, self.clock, 2.0, index=3)
        self.assertEqual(poller.latest.index, 3)


class FakeSmiProcessTests(TestCase):
    """SmiReader running tests/fake_nvidia_smi.py as a real process on the real reactor."""

    timeout = 30

    def setUp(self) -> None:
        self.state = self.mktemp()

    def write_state(self, **state: object) -> None:
        """Write the fake's state file atomically, as integration tests must."""
        temp = self.state + ".tmp"
        with open(temp, "w", encoding="utf-8") as f:
            json.dump({"fail": None, **state}, f)
        os.replace(temp, self.state)

    def reader(self, index: int = 0, timeout_s: float = 10.0) -> SmiReader:
        from twisted.internet import reactor

        env = {**os.environ, "FAKE_NVIDIA_SMI_STATE": self.state}
        return SmiReader(index, reactor, ProcessRunner(reactor, timeout_s, env), FAKE_SMI)

    def gpus(self, used: int) -> list[dict[str, object]]:
        return [{"index": 0, "name": RTX_4090, "total_mib": 24564, "used_mib": used}]

    async def test_reads_and_sees_memory_freed(self) -> None:
        """The fake answers like nvidia-smi, and a rewritten state file shows memory freed."""
        self.write_state(gpus=self.gpus(16012))
        reader = self.reader()
        first = await reader.read()
        self.assertEqual(
            (first.ok, first.source, first.name, first.total_mib, first.used_mib, first.free_mib),
            (True, "nvidia-smi", RTX_4090, 24564, 16012, 8552),
        )
        self.write_state(gpus=self.gpus(1000))
        second = await reader.read()
        self.assertEqual((second.used_mib, second.free_mib), (1000, 23564))

    async def test_no_such_gpu(self) -> None:
        """An index with no GPU exits 6 and the reading says "No devices were found"."""
        self.write_state(gpus=self.gpus(0))
        reading = await self.reader(index=1).read()
        self.assertFalse(reading.ok)
        self.assertEqual(reading.error, f"{FAKE_SMI} exited with code 6: No devices were found")

    async def test_fail_text(self) -> None:
        """A "fail" text in the state file comes back as the error, with exit code 9."""
        self.write_state(gpus=self.gpus(0), fail="Unable to determine the device handle")
        reading = await self.reader().read()
        self.assertEqual(
            reading.error, f"{FAKE_SMI} exited with code 9: Unable to determine the device handle"
        )

    async def test_missing_state_file(self) -> None:
        """Without its state file the fake exits 9, and the reading fails."""
        reading = await self.reader().read()
        self.assertFalse(reading.ok)
        self.assertIn(
            "exited with code 9: fake nvidia-smi: cannot read state file", reading.error or ""
        )

    async def test_garbage_output(self) -> None:
        """Garbage on stdout with exit 0 is an unreadable-output failure."""
        self.write_state(raw="this is not csv\n")
        reading = await self.reader().read()
        self.assertIn("gave unreadable output", reading.error or "")

    async def test_missing_executable(self) -> None:
        """A nvidia_smi path that does not exist is a clear failure."""
        from twisted.internet import reactor

        reader = SmiReader(0, reactor, ProcessRunner(reactor), self.state + "-nvidia-smi")
        reading = await reader.read()
        self.assertFalse(reading.ok)
        self.assertIn("could not be run", reading.error or "")
        self.assertIn("not found or not executable", reading.error or "")

    async def test_timeout_kills_and_reaps(self) -> None:
        """A hung nvidia-smi is killed after the timeout and reaped (trial fails on leftovers)."""
        self.write_state(gpus=self.gpus(0), delay_s=30)
        reading = await self.reader(timeout_s=0.3).read()
        self.assertFalse(reading.ok)
        self.assertEqual(reading.error, f"{FAKE_SMI} did not answer within 0.3s (killed)")

    async def test_processes_of_the_card_asked_for(self) -> None:
        """The process query lists the card's processes, sorted by pid, a null figure as None,
        and nothing of another card."""
        gpus = [*self.gpus(3000), {"index": 1, "name": "B", "total_mib": 100, "used_mib": 0}]
        processes = {
            "0": [{"pid": 4242, "used_mib": 2000}, {"pid": 17, "used_mib": None}],
            "1": [{"pid": 99, "used_mib": 1}],
        }
        self.write_state(gpus=gpus, processes=processes)
        reading = await self.reader().read()
        self.assertEqual((reading.ok, reading.used_mib), (True, 3000))
        self.assertEqual(reading.processes, (GpuProcess(17, None), GpuProcess(4242, 2000)))
        self.assertIsNone(reading.processes_error)

    async def test_no_processes(self) -> None:
        """A card running nothing lists no process: the tool prints nothing."""
        self.write_state(gpus=self.gpus(0))
        reading = await self.reader().read()
        self.assertEqual((reading.ok, reading.processes, reading.processes_error), (True, (), None))

    async def test_malformed_processes(self) -> None:
        """Malformed process output leaves no list, quoting it shortly; the memory is read."""
        self.write_state(gpus=self.gpus(1000), raw_apps="4242, lots\n" + "z" * 300)
        reading = await self.reader().read()
        self.assertEqual((reading.ok, reading.used_mib, reading.processes), (True, 1000, None))
        self.assertEqual(
            reading.processes_error,
            f"{FAKE_SMI} --query-compute-apps gave unreadable output: "
            "line 1 unreadable: '4242, lots'",
        )

    async def test_failing_processes_query_beside_good_memory(self) -> None:
        """A process query that fails (exit 9) leaves the memory reading ok."""
        self.write_state(gpus=self.gpus(1000), fail_apps="Not supported on this card")
        reading = await self.reader().read()
        self.assertEqual((reading.ok, reading.error, reading.used_mib), (True, None, 1000))
        self.assertEqual(
            reading.processes_error,
            f"{FAKE_SMI} --query-compute-apps exited with code 9: 'Not supported on this card'",
        )

    async def test_hung_processes_query_killed(self) -> None:
        """A hung process query is killed after the timeout (long enough for the memory query
        to answer under load); the memory reading stays ok."""
        self.write_state(gpus=self.gpus(1000), delay_apps_s=30)
        reading = await self.reader(timeout_s=2.0).read()
        self.assertEqual((reading.ok, reading.used_mib, reading.processes), (True, 1000, None))
        self.assertEqual(
            reading.processes_error,
            f"{FAKE_SMI} --query-compute-apps did not answer within 2s (killed)",
        )


class GpuPollerReconfigureTests(PollerCase):
    """GpuPoller.reconfigure: a reload's new reader and interval."""

    def read_times(self, reader: ControlledReader, until: float) -> list[float]:
        """Advance ``until`` seconds in small steps, answering reads; the times of new reads."""
        start, seen, times = self.clock.seconds(), len(reader.pending), []
        while self.clock.seconds() < start + until - 1e-9:
            self.clock.advance(0.5)
            for pending in reader.pending[seen:]:
                times.append(round(self.clock.seconds() - start, 3))
                pending.callback(snapshot())
            seen = len(reader.pending)
        return times

    def test_new_reader_from_the_next_reading_on(self) -> None:
        """A new reader (same interval) is used from the next poll on, without an extra read now."""
        self.start()
        self.reader.pending[0].callback(snapshot(1000))
        new = StaticReader(snapshot(2000, source="nvidia-smi"))
        self.poller.reconfigure(new, 2.0)
        self.assertEqual((new.reads, len(self.reader.pending)), (0, 1))
        self.clock.advance(2.0)
        self.assertEqual((new.reads, len(self.reader.pending)), (1, 1))
        self.assertEqual(
            (self.poller.latest.source, self.poller.latest.used_mib), ("nvidia-smi", 2000)
        )
        self.assertEqual(self.successResultOf(self.poller.fresh()).used_mib, 2000)
        self.assertEqual(new.reads, 2)

    def test_no_reader_keeps_the_reader(self) -> None:
        """reconfigure(None, ...) keeps reading through the reader it had."""
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.poller.reconfigure(None, 2.0)
        self.clock.advance(2.0)
        self.assertEqual(len(self.reader.pending), 2)

    def test_new_interval_takes_effect(self) -> None:
        """A new interval restarts polling: a read now, then at the new pace only."""
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.clock.advance(0.5)
        self.poller.reconfigure(None, 5.0)
        self.assertEqual(len(self.reader.pending), 2)
        self.reader.pending[1].callback(snapshot())
        self.assertEqual(self.read_times(self.reader, until=12), [5.0, 10.0])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_same_interval_no_restart(self) -> None:
        """The same interval neither reads at once nor shifts the pace."""
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.clock.advance(0.5)
        self.poller.reconfigure(None, 2.0)
        self.assertEqual(len(self.reader.pending), 1)
        self.assertEqual(self.read_times(self.reader, until=4), [1.5, 3.5])

    def test_new_interval_while_a_read_is_in_flight(self) -> None:
        """A restart while a read is in flight shares it rather than reading twice."""
        self.start()
        self.poller.reconfigure(None, 5.0)
        self.assertEqual(len(self.reader.pending), 1)
        self.reader.pending[0].callback(snapshot(700))
        self.assertEqual(self.poller.latest.used_mib, 700)
        self.assertEqual(self.read_times(self.reader, until=5), [5.0])

    def test_replaced_reader_shut_down_after_its_read(self) -> None:
        """The old reader is shut down once its read in flight is done; the new one is not."""
        old = self.reader
        self.start()
        new = StaticReader(snapshot(2000))
        self.poller.reconfigure(new, 2.0)
        self.assertEqual(old.shutdowns, 0)
        old.pending[0].callback(snapshot())
        self.assertEqual(old.shutdowns, 1)
        self.poller.reconfigure(new, 2.0)  # the same reader again: nothing to retire
        self.assertEqual(old.shutdowns, 1)

    def test_reader_shut_down_with_the_service(self) -> None:
        """Stopping the poller shuts its reader down, at once when no read is in flight."""
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.poller.stopService()
        self.assertEqual(self.reader.shutdowns, 1)

    def test_stopped_poller_takes_the_interval_for_later(self) -> None:
        """A poller not running reads nothing on reconfigure and polls at the new pace once
        started."""
        self.poller.reconfigure(None, 3.0)
        self.assertEqual((self.reader.pending, self.clock.getDelayedCalls()), ([], []))
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.assertEqual(self.read_times(self.reader, until=6), [3.0, 6.0])

    def test_stop_after_reconfigure(self) -> None:
        """stopService after a reconfigure leaves no timer and no more reads."""
        self.start()
        self.reader.pending[0].callback(snapshot())
        self.poller.reconfigure(None, 5.0)
        self.reader.pending[1].callback(snapshot())
        self.assertIsNone(self.poller.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(len(self.reader.pending), 2)
