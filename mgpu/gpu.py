# -*- test-case-name: tests.test_gpu -*-
"""Live GPU memory: readers (NVML, nvidia-smi, none, auto) and the poller.

The scheduler makes room against what the card really has free, and
``/v1/status`` shows the same figures, so every reader answers with one
``GpuSnapshot`` shape.  A reader never errbacks: a failure is a snapshot with
``ok=False`` and the reason, because the broker must say why it has no reading
rather than crash a timer or a request.

A reading also lists the processes holding memory on the card, where the
source can say (SPEC section 9.3).  That list is best effort: failing to get
it sets ``processes_error`` and never makes the memory reading fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from attrs import evolve, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu import child

if TYPE_CHECKING:
    from mgpu.config import GpuConfig

MIB: Final = 2**20
SMI_QUERY: Final = "--query-gpu=index,name,memory.total,memory.used,memory.free"
SMI_FORMAT: Final = "--format=csv,noheader,nounits"
SMI_APPS_QUERY: Final = "--query-compute-apps=pid,used_memory"
NO_SOURCE_ERROR: Final = "no GPU source configured (gpu.source: none)"
NOT_READ_YET: Final = "not read yet"
_MAX_OUTPUT: Final = 64 * 1024

_log = Logger()


@frozen
class GpuProcess:
    """One process holding memory on the card."""

    pid: int
    #: None: the driver does not say (NVML's "not available", nvidia-smi's [N/A]).
    used_mib: int | None


@frozen
class GpuSnapshot:
    """One reading of one GPU's memory, or why there is none.

    ``ok`` and ``error`` are about the memory figures only.  ``processes`` is
    the processes holding memory, sorted by pid, or None when the source could
    not list them this time: ``processes_error`` says why, or is None too when
    they were not asked for (NVML after a failed memory read, ``failed_snapshot``).
    """

    source: str
    ok: bool
    error: str | None
    index: int
    name: str | None
    total_mib: int | None
    used_mib: int | None
    free_mib: int | None
    read_at: datetime | None
    processes: tuple[GpuProcess, ...] | None = None
    processes_error: str | None = None

    def to_json(self) -> dict[str, object]:
        """The ``gpu`` object of the status document (SPEC section 6)."""
        return {
            "source": self.source,
            "ok": self.ok,
            "error": self.error,
            "index": self.index,
            "name": self.name,
            "total_mib": self.total_mib,
            "used_mib": self.used_mib,
            "free_mib": self.free_mib,
            "read_at": None if self.read_at is None else _iso(self.read_at),
        }


def failed_snapshot(source: str, index: int, error: str, read_at: datetime | None) -> GpuSnapshot:
    """A reading that could not be had, with the reason."""
    return GpuSnapshot(
        source=source,
        ok=False,
        error=error,
        index=index,
        name=None,
        total_mib=None,
        used_mib=None,
        free_mib=None,
        read_at=read_at,
    )


def _iso(when: datetime) -> str:
    """``2026-11-26T22:00:00Z``: UTC, whole seconds, as the status document shows it."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class ReactorTime(Protocol):
    """What this module needs of ``IReactorTime``: the reactor, a ``Clock``.

    A structural type, because mypy here has no zope plugin: any provider of
    ``IReactorTime`` fits.
    """

    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...


class ReactorProcess(ReactorTime, Protocol):
    """The reactor's ``IReactorTime`` and ``IReactorProcess`` (structural, as above)."""

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[Any, Any] | None = None,
        path: Any = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> Any: ...


def _now(clock: ReactorTime) -> datetime:
    """The clock's time as an aware UTC datetime (a test ``Clock`` gives 1970)."""
    return datetime.fromtimestamp(clock.seconds(), tz=UTC)


def _describe(exc: BaseException | None) -> str:
    """An exception's message, or its type's name when the message is empty."""
    return str(exc) or type(exc).__name__


class GpuReader(Protocol):
    """Reads one GPU's memory; ``read`` never errbacks."""

    @property
    def source(self) -> str:
        """``nvml``, ``nvidia-smi``, ``sim`` or ``none``: what the readings come from."""
        ...

    def read(self) -> Deferred[GpuSnapshot]:
        """Take a reading now."""
        ...


class NvmlMemory(Protocol):
    """What ``nvmlDeviceGetMemoryInfo`` returns: sizes in bytes."""

    @property
    def total(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def free(self) -> int: ...


class NvmlProcess(Protocol):
    """An item of ``nvmlDeviceGet{Compute,Graphics}RunningProcesses``."""

    @property
    def pid(self) -> int: ...
    @property
    def usedGpuMemory(self) -> int | None:
        """Bytes; None or ``NVML_VALUE_NOT_AVAILABLE`` when the driver does not say."""
        ...


class Nvml(Protocol):
    """The part of the ``pynvml`` module this reader uses (tests fake it)."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> NvmlMemory: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Sequence[NvmlProcess]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> Sequence[NvmlProcess]: ...


#: ``usedGpuMemory`` when NVML cannot tell (``NVML_VALUE_NOT_AVAILABLE``, an unsigned -1).
NVML_VALUE_NOT_AVAILABLE: Final = 2**64 - 1

ProcessList = tuple[tuple[GpuProcess, ...] | None, str | None]
"""A listing of processes and why there is none: ``(processes, None)`` or ``(None, error)``."""


def _by_pid(processes: Mapping[int, int | None]) -> tuple[GpuProcess, ...]:
    """``GpuProcess`` values sorted by pid."""
    return tuple(GpuProcess(pid, processes[pid]) for pid in sorted(processes))


def _larger(a: int | None, b: int | None) -> int | None:
    """The larger figure; a figure beats "not available"."""
    if a is None or b is None:
        return b if a is None else a
    return max(a, b)


def _nvml_mib(used: object) -> int | None:
    """NVML's ``usedGpuMemory`` in MiB, or None where it is not available."""
    if used is None or used == NVML_VALUE_NOT_AVAILABLE:
        return None
    if not isinstance(used, int) or used < 0:
        raise ValueError(f"usedGpuMemory {used!r}")
    return used // MIB


def _nvml_figures(items: Sequence[NvmlProcess]) -> dict[int, int | None]:
    """One NVML list as pid -> MiB; ``ValueError`` on an item NVML never gives."""
    figures: dict[int, int | None] = {}
    for item in items:
        pid, used = item.pid, _nvml_mib(item.usedGpuMemory)
        if not isinstance(pid, int) or pid < 0:
            raise ValueError(f"pid {pid!r}")
        figures[pid] = _larger(figures[pid], used) if pid in figures else used
    return figures


def nvml_processes(nvml: Nvml, handle: Any) -> ProcessList:
    """The processes on ``handle``: compute's and graphics', a pid in both once.

    Both lists give a process's whole memory, so a pid in both is the same
    memory seen twice: it keeps the larger figure.  Compute processes are what
    an inference service runs, so a compute call that fails leaves no list;
    graphics alone failing (``NotSupported`` on many compute cards) keeps
    compute's.
    """
    try:
        found = _nvml_figures(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except Exception as exc:
        return None, f"NVML nvmlDeviceGetComputeRunningProcesses failed: {_describe(exc)}"
    try:
        graphics = _nvml_figures(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
    except Exception:
        graphics = {}
    for pid, used in graphics.items():
        found[pid] = _larger(found[pid], used) if pid in found else used
    return _by_pid(found), None


def _import_pynvml() -> Nvml:
    """NVIDIA's own bindings (package ``nvidia-ml-py``), imported only when first needed."""
    import pynvml

    module: Nvml = pynvml
    return module


#: After a failed ``nvmlInit``, how long reads report that failure before trying again.
INIT_RETRY_S: Final = 30.0


class NvmlReader:
    """Reads through NVML: initialised lazily, once, on the reactor thread.

    NVML calls are quick C calls, so they run inline; ``nvmlInit`` can take a
    moment on a card without persistence mode, which happens once.  A failed
    init is tried again (the driver may come back), but not before
    ``INIT_RETRY_S``: the reads in between, room-making's every 100 ms
    included, report the same failure at once instead of blocking the
    reactor in ``nvmlInit`` each time.
    """

    def __init__(
        self,
        index: int,
        clock: ReactorTime,
        nvml: Nvml | None = None,
        *,
        source: str = "nvml",
    ) -> None:
        self.index = index
        self.source = source
        self._clock = clock
        self._nvml = nvml
        self._initialised = False
        self._init_failed: tuple[float, str] | None = None  # when, and why

    def read(self) -> Deferred[GpuSnapshot]:
        """Take a reading now; the Deferred has already fired."""
        return succeed(self._read_now())

    def _read_now(self) -> GpuSnapshot:
        at = _now(self._clock)
        failed = self._init_failed
        if failed is not None and self._clock.seconds() - failed[0] < INIT_RETRY_S:
            return failed_snapshot(self.source, self.index, failed[1], at)
        try:
            nvml = self._init()
        except Exception as exc:
            error = f"NVML init failed: {_describe(exc)}"
            self._init_failed = (self._clock.seconds(), error)
            return failed_snapshot(self.source, self.index, error, at)
        self._init_failed = None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            raw_name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            total, used, free = int(memory.total), int(memory.used), int(memory.free)
        except Exception as exc:
            error = f"NVML read of GPU {self.index} failed: {_describe(exc)}"
            return failed_snapshot(self.source, self.index, error, at)
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else raw_name
        processes, processes_error = nvml_processes(nvml, handle)
        return GpuSnapshot(
            source=self.source,
            ok=True,
            error=None,
            index=self.index,
            name=name,
            total_mib=total // MIB,
            used_mib=used // MIB,
            free_mib=free // MIB,
            read_at=at,
            processes=processes,
            processes_error=processes_error,
        )

    def _init(self) -> Nvml:
        """The NVML module, initialised; raises what the import or ``nvmlInit`` raised."""
        if self._nvml is None:
            self._nvml = _import_pynvml()
        if not self._initialised:
            self._nvml.nvmlInit()
            self._initialised = True
        return self._nvml

    def shutdown(self) -> None:
        """Release NVML if this reader initialised it."""
        if self._initialised and self._nvml is not None:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                _log.failure("nvmlShutdown failed")


SmiResult = tuple[bytes, bytes, int]
"""What a runner gives: stdout, stderr, exit code (minus the signal number if killed)."""

SmiRunner = Callable[[str, Sequence[str]], "Deferred[SmiResult]"]
"""Runs ``executable`` with ``args`` (argv[0] excluded) without blocking."""


#: After killing a timed-out nvidia-smi, how long to wait for it to be reaped.
REAP_GRACE_S = 2.0


class SmiTimeout(Exception):
    """The process did not finish in time; it was killed and reaped."""


class _Collect(ProcessProtocol):
    """Gathers a process's output and fires once the process is reaped."""

    def __init__(
        self,
        done: Deferred[SmiResult],
        timeout_s: float,
        call_later: Callable[..., Any],
    ) -> None:
        self.done = done
        self.timeout_s = timeout_s
        self.call_later = call_later
        self.timed_out = False
        # Any: zope interfaces (IDelayedCall, IProcessTransport) confuse mypy
        # without its zope plugin.
        self.timer: Any = None
        self.out = bytearray()
        self.err = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.out += data[: _MAX_OUTPUT - len(self.out)]

    def errReceived(self, data: bytes) -> None:
        self.err += data[: _MAX_OUTPUT - len(self.err)]

    def kill(self) -> None:
        """Kill the process; ``processEnded`` still follows once it is reaped."""
        process: Any = self.transport
        if process is None:
            return
        with contextlib.suppress(ProcessExitedAlready):
            process.signalProcess("KILL")
        process.loseConnection()

    def expire(self) -> None:
        self.timer = None
        self.timed_out = True
        self.kill()
        # A process stuck in the driver (uninterruptible sleep) is never
        # reaped: do not let the reading, and the scheduler's wait on it, hang.
        self.timer = self.call_later(REAP_GRACE_S, self.abandon)

    def abandon(self) -> None:
        self.timer = None
        if not self.done.called:
            self.done.errback(
                SmiTimeout(f"did not answer within {self.timeout_s:g}s (killed, not reaped)")
            )

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.done.called:  # cancelled by the caller
            return
        if self.timed_out:
            self.done.errback(SmiTimeout(f"did not answer within {self.timeout_s:g}s (killed)"))
            return
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if code is None:
            code = -signal if isinstance(signal, int) else -1
        self.done.callback((bytes(self.out), bytes(self.err), code))


#: Starts ``path`` with ``argv`` and ``env``, connected to the protocol; ``OSError`` if it cannot.
Spawn = Callable[[ProcessProtocol, str, Sequence[str], Mapping[str, str]], object]


def _default_spawn(reactor: ReactorProcess) -> Spawn:
    """Through a pidfd where the system has them, else Twisted's ``spawnProcess``."""
    if child.available() and hasattr(reactor, "addReader"):
        return lambda protocol, path, argv, env: child.spawn_child(
            cast("child.ReactorFDSet", reactor), protocol, path, argv, env
        )
    return lambda protocol, path, argv, env: reactor.spawnProcess(
        protocol, path, list(argv), env=dict(env)
    )


class ProcessRunner:
    """An ``SmiRunner`` that spawns a real process, killing it after ``timeout_s``.

    The result fires only after the process has been reaped, killed or not.
    ``env`` defaults to this process's environment at the time of the call.
    ``spawn`` starts it: ``mgpu.child.spawn_child`` where the system has
    pidfds (its cost does not grow with the daemon's open connections), else
    the reactor's ``spawnProcess``.
    """

    def __init__(
        self,
        reactor: ReactorProcess,
        timeout_s: float = 5.0,
        env: Mapping[str, str] | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        self._reactor = reactor
        self._spawn: Spawn = spawn or _default_spawn(reactor)
        self._timeout_s = timeout_s
        self._env = env
        #: Where each (executable, PATH) was found: a poll every few seconds, and
        #: every 100 ms while memory frees, need not search PATH each time.
        self._found: dict[tuple[str, str], str] = {}

    def _resolve(self, executable: str, search: str) -> str | None:
        key = (executable, search)
        path = self._found.get(key)
        if path is None or not os.access(path, os.X_OK):  # one check, not a search
            path = shutil.which(executable, path=search)
            if path is None:
                self._found.pop(key, None)
                return None
            self._found[key] = path
        return path

    def __call__(self, executable: str, args: Sequence[str]) -> Deferred[SmiResult]:
        env = dict(os.environ if self._env is None else self._env)
        path = self._resolve(executable, env.get("PATH", os.defpath))
        if path is None:
            return fail(FileNotFoundError(f"{executable!r} not found or not executable"))
        protocol: _Collect

        def cancel(_: Deferred[SmiResult]) -> None:
            protocol.kill()

        done: Deferred[SmiResult] = Deferred(cancel)
        protocol = _Collect(done, self._timeout_s, self._reactor.callLater)
        try:
            self._spawn(protocol, path, [executable, *args], env)
        except OSError as exc:
            return fail(exc)
        protocol.timer = self._reactor.callLater(self._timeout_s, protocol.expire)
        return done


def _first_line(*texts: str) -> str:
    """The first non-blank line of the first text that has one, shortened."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()[:200]
    return ""


def parse_smi_line(stdout: str, index: int) -> tuple[str, int, int, int]:
    """Name, total, used and free MiB from nvidia-smi's CSV; ``ValueError`` if unreadable."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"expected one line, got {len(lines)}")
    fields = [field.strip() for field in lines[0].split(",")]
    if len(fields) < 5:
        raise ValueError(f"expected 5 fields, got {len(fields)}")
    # A name could hold a comma; the numbers are the first and the last three fields.
    first, total, used, free = (int(fields[i]) for i in (0, -3, -2, -1))
    name = ", ".join(fields[1:-3])
    if first != index:
        raise ValueError(f"answered for GPU {first}, not {index}")
    if min(total, used, free) < 0:
        raise ValueError("negative memory figure")
    return name, total, used, free


#: The most characters of nvidia-smi's output an error about its process list quotes.
APPS_QUOTE_CHARS: Final = 60
#: What nvidia-smi prints for a process's memory it cannot tell.
_SMI_NOT_AVAILABLE: Final = frozenset({"[N/A]", "[Not Supported]", "N/A"})
#: Printed by some versions instead of nothing when the card runs no process.
_SMI_NO_PROCESSES: Final = "No running processes found"
_SMI_NUMBER: Final = re.compile(r"[0-9]{1,19}")


def _quote(text: str) -> str:
    """``text`` stripped, cut to ``APPS_QUOTE_CHARS`` and quoted, for an error message."""
    return repr(text.strip()[:APPS_QUOTE_CHARS])


def _smi_app(line: str) -> tuple[int, int | None]:
    """``pid, MiB`` from one line of the process query; ``ValueError`` if unreadable."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 2 or not _SMI_NUMBER.fullmatch(fields[0]):
        raise ValueError(line)
    if fields[1] in _SMI_NOT_AVAILABLE:
        return int(fields[0]), None
    if not _SMI_NUMBER.fullmatch(fields[1]):
        raise ValueError(line)
    return int(fields[0]), int(fields[1])


def parse_smi_apps(stdout: str) -> ProcessList:
    """``--query-compute-apps=pid,used_memory`` CSV as processes, or None and why.

    No output is no process.  ``[N/A]`` memory is None.  A pid on several
    lines (one per MIG instance) holds their sum, None if any is unknown.  The
    reason quotes at most ``APPS_QUOTE_CHARS`` of the output: it is a log line
    and a status field, and the output is the tool's, not ours.
    """
    figures: dict[int, int | None] = {}
    for number, line in enumerate(stdout.splitlines(), 1):
        if not line.strip() or line.strip() == _SMI_NO_PROCESSES:
            continue
        try:
            pid, used = _smi_app(line)
        except ValueError:
            return None, f"line {number} unreadable: {_quote(line)}"
        if pid in figures:
            before = figures[pid]
            used = None if before is None or used is None else before + used
        figures[pid] = used
    return _by_pid(figures), None


def _exit_text(code: int) -> str:
    """How a process ended, from a runner's exit code."""
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


class SmiReader:
    """Reads by running ``nvidia-smi --query-gpu=...`` through ``runner``.

    The process list comes from a second query, ``--query-compute-apps``, run
    at the same time through the same runner; its failure only sets
    ``processes_error``.  The reading waits for both (each has the runner's
    timeout): the two queries ask the same driver, which answers both or neither.
    """

    source = "nvidia-smi"

    def __init__(
        self,
        index: int,
        clock: ReactorTime,
        runner: SmiRunner,
        nvidia_smi: str = "nvidia-smi",
    ) -> None:
        self.index = index
        self._clock = clock
        self._runner = runner
        self._nvidia_smi = nvidia_smi

    @property
    def arguments(self) -> list[str]:
        """The arguments after the executable's name."""
        return [SMI_QUERY, SMI_FORMAT, "-i", str(self.index)]

    @property
    def apps_arguments(self) -> list[str]:
        """The process query's arguments after the executable's name."""
        return [SMI_APPS_QUERY, SMI_FORMAT, "-i", str(self.index)]

    def read_memory(self) -> Deferred[GpuSnapshot]:
        """The memory query alone (no process list): what room-making polls for."""
        return self._run(self.arguments).addCallbacks(self._parsed, self._failed)

    def read(self) -> Deferred[GpuSnapshot]:
        """Run both queries at once; a memory failure is ``ok=False``, a process one
        ``processes_error``."""
        memory = self._run(self.arguments).addCallbacks(self._parsed, self._failed)
        apps = self._run(self.apps_arguments).addCallbacks(self._parsed_apps, self._apps_failed)
        return memory.addCallback(self._with_processes, apps)

    def _run(self, arguments: list[str]) -> Deferred[SmiResult]:
        try:
            return self._runner(self._nvidia_smi, arguments)
        except Exception:
            return fail()

    def _with_processes(
        self, snapshot: GpuSnapshot, apps: Deferred[ProcessList]
    ) -> Deferred[GpuSnapshot]:
        return apps.addCallback(
            lambda found: evolve(snapshot, processes=found[0], processes_error=found[1])
        )

    def _fail(self, why: str) -> GpuSnapshot:
        return failed_snapshot(
            self.source, self.index, f"{self._nvidia_smi} {why}", _now(self._clock)
        )

    def _parsed(self, result: SmiResult) -> GpuSnapshot:
        stdout, stderr = (part.decode("utf-8", "replace") for part in result[:2])
        code = result[2]
        if code != 0:
            what = _exit_text(code)
            line = _first_line(stderr, stdout)
            return self._fail(f"{what}: {line}" if line else what)
        try:
            name, total, used, free = parse_smi_line(stdout, self.index)
        except ValueError as exc:
            shown = _first_line(stdout)
            return self._fail(f"gave unreadable output ({exc}): {shown!r}")
        return GpuSnapshot(
            source=self.source,
            ok=True,
            error=None,
            index=self.index,
            name=name,
            total_mib=total,
            used_mib=used,
            free_mib=free,
            read_at=_now(self._clock),
        )

    def _failed(self, reason: Failure) -> GpuSnapshot:
        if reason.check(SmiTimeout):
            return self._fail(reason.getErrorMessage())
        if reason.check(OSError):
            return self._fail(f"could not be run: {_describe(reason.value)}")
        _log.failure("nvidia-smi runner failed", reason)
        return self._fail(f"failed: {_describe(reason.value)}")

    def _apps_fail(self, why: str) -> ProcessList:
        return None, f"{self._nvidia_smi} --query-compute-apps {why}"

    def _parsed_apps(self, result: SmiResult) -> ProcessList:
        stdout, stderr = (part.decode("utf-8", "replace") for part in result[:2])
        code = result[2]
        if code != 0:
            line = _first_line(stderr, stdout)
            ended = _exit_text(code)
            return self._apps_fail(f"{ended}: {_quote(line)}" if line else ended)
        processes, error = parse_smi_apps(stdout)
        if error is not None:
            return self._apps_fail(f"gave unreadable output: {error}")
        return processes, None

    def _apps_failed(self, reason: Failure) -> ProcessList:
        # Not logged: the memory query ran through the same runner, and logs there.
        why = _describe(reason.value)
        if reason.check(SmiTimeout):
            return self._apps_fail(why)
        if reason.check(OSError):
            return self._apps_fail(f"could not be run: {why}")
        return self._apps_fail(f"failed: {why}")


class NoReader:
    """``gpu.source: none``: never a reading, and says so."""

    source = "none"

    def __init__(self, index: int, clock: ReactorTime) -> None:
        self.index = index
        self._clock = clock

    def read(self) -> Deferred[GpuSnapshot]:
        """A snapshot with ``ok=False`` naming the configuration."""
        return succeed(failed_snapshot(self.source, self.index, NO_SOURCE_ERROR, _now(self._clock)))


class AutoReader:
    """``gpu.source: auto``: NVML first, nvidia-smi if NVML gives no reading.

    The first reader that works is kept; when it later fails, that failure is
    reported and the next read tries NVML then nvidia-smi again.
    """

    def __init__(self, nvml: GpuReader, smi: GpuReader) -> None:
        self._nvml = nvml
        self._smi = smi
        self._chosen: GpuReader | None = None

    @property
    def source(self) -> str:
        """The source in use, or ``none`` while neither has worked."""
        return "none" if self._chosen is None else self._chosen.source

    def read(self) -> Deferred[GpuSnapshot]:
        """A reading from the kept source, or from the first of NVML, nvidia-smi that works."""
        if self._chosen is not None:
            return self._chosen.read().addCallback(self._kept)
        return self._nvml.read().addCallback(self._after_nvml)

    def _kept(self, snapshot: GpuSnapshot) -> GpuSnapshot:
        if not snapshot.ok:
            _log.warn("GPU source {source} failed: {e}", source=self.source, e=snapshot.error)
            self._chosen = None
        return snapshot

    def _after_nvml(self, first: GpuSnapshot) -> GpuSnapshot | Deferred[GpuSnapshot]:
        if first.ok:
            return self._choose(self._nvml, first)
        return self._smi.read().addCallback(self._after_smi, first)

    def _after_smi(self, second: GpuSnapshot, first: GpuSnapshot) -> GpuSnapshot:
        if second.ok:
            return self._choose(self._smi, second)
        error = f"no GPU reading: nvml: {first.error}; nvidia-smi: {second.error}"
        return failed_snapshot("none", second.index, error, second.read_at)

    def _choose(self, reader: GpuReader, snapshot: GpuSnapshot) -> GpuSnapshot:
        self._chosen = reader
        _log.info("GPU memory read through {source}", source=reader.source)
        return snapshot

    def shutdown(self) -> None:
        """Release NVML if it was initialised."""
        shutdown = getattr(self._nvml, "shutdown", None)
        if shutdown is not None:
            shutdown()


def reader_for(config: GpuConfig, reactor: ReactorProcess, index: int | None = None) -> GpuReader:
    """The reader ``gpu.source`` asks for, of card ``index`` (default ``gpu.index``),
    reading time and spawning through ``reactor``."""
    clock = reactor
    card = config.index if index is None else index

    def smi() -> SmiReader:
        return SmiReader(card, clock, ProcessRunner(reactor), config.nvidia_smi)

    if config.source == "nvml":
        return NvmlReader(card, clock)
    if config.source == "nvidia-smi":
        return smi()
    if config.source == "none":
        return NoReader(card, clock)
    if config.source == "auto":
        return AutoReader(NvmlReader(card, clock), smi())
    raise ValueError(f"unknown gpu.source {config.source!r}")


class GpuPoller(Service):
    """Keeps ``latest`` fresh every ``interval_s``, and reads on demand.

    ``/v1/status`` serves ``latest`` without waiting; the scheduler calls
    ``fresh()`` to see memory freed after an unload.  Callers that arrive while
    a read is in flight share it, so at most one read runs at a time.
    """

    def __init__(
        self, reader: GpuReader, clock: ReactorTime, interval_s: float, *, index: int = 0
    ) -> None:
        self._reader = reader
        self._clock = clock
        self._interval_s = interval_s
        self._loop: LoopingCall | None = None
        self._waiters: list[Deferred[GpuSnapshot]] = []
        self._reading = False
        self.latest: GpuSnapshot = failed_snapshot(reader.source, index, NOT_READ_YET, None)

    def fresh(self) -> Deferred[GpuSnapshot]:
        """A reading taken now (or the one in flight); updates ``latest``; never errbacks.

        Cancelling the returned Deferred only drops this caller's interest.
        """
        waiter = self._join()
        if not self._reading:
            self._reading = True
            try:
                reading = self._reader.read()
            except Exception:
                reading = fail()
            reading.addErrback(self._crashed).addCallback(self._finished)
        return waiter

    def fresh_memory(self) -> Deferred[GpuSnapshot]:
        """Memory figures read now, for room-making, which polls them while memory frees.

        A reading in flight is joined. Otherwise a reader that can read memory
        alone (nvidia-smi: one child instead of two) does, and ``latest`` is left
        as it was: its process list and its time stay those of one reading.
        """
        read_memory = getattr(self._reader, "read_memory", None)
        if self._reading or read_memory is None:
            return self.fresh()
        try:
            reading = read_memory()
        except Exception:
            reading = fail()
        return reading.addErrback(self._crashed)

    def _join(self) -> Deferred[GpuSnapshot]:
        waiter: Deferred[GpuSnapshot] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _crashed(self, reason: Failure) -> GpuSnapshot:
        _log.failure("GPU reader failed", reason)
        error = f"GPU reader failed: {_describe(reason.value)}"
        return failed_snapshot(self._reader.source, self.latest.index, error, _now(self._clock))

    def _finished(self, snapshot: GpuSnapshot) -> None:
        before, self.latest = self.latest, snapshot
        if (before.ok, before.error) != (snapshot.ok, snapshot.error):
            if snapshot.ok:
                _log.info("GPU {index} reading ok from {source}", index=snapshot.index,
                          source=snapshot.source)  # fmt: skip
            else:
                _log.warn("GPU {index} reading failed: {error}", index=snapshot.index,
                          error=snapshot.error)  # fmt: skip
        waiters, self._waiters = self._waiters, []
        self._reading = False
        for waiter in waiters:
            waiter.callback(snapshot)

    def _poll(self) -> Deferred[None]:
        return self.fresh().addCallback(lambda _: None)

    def startService(self) -> None:
        """Read now, then every ``interval_s``."""
        super().startService()
        loop = self._loop = LoopingCall(self._poll)
        loop.clock = cast(IReactorTime, self._clock)
        loop.start(self._interval_s, now=True).addErrback(
            lambda reason: _log.failure("GPU poll loop stopped", reason)
        )

    def reconfigure(self, reader: GpuReader | None, interval_s: float) -> None:
        """A reload: read through ``reader`` from the next reading on; poll at the new pace.

        The reader replaced is shut down (NVML released) once no read of it is in flight.
        """
        if reader is not None and reader is not self._reader:
            old, self._reader = self._reader, reader
            self._retire(old)
        if interval_s != self._interval_s:
            self._interval_s = interval_s
            if self._loop is not None and self._loop.running:
                self._loop.stop()
                self.startService()

    def stopService(self) -> Deferred[None] | None:
        """Stop polling and shut the reader down; fires once a read in flight has finished."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        done = self._join().addCallback(lambda _: None) if self._reading else None
        self._retire(self._reader)
        return done

    def _retire(self, reader: GpuReader) -> None:
        """Release what ``reader`` holds (NVML's init), after a read of it still in flight."""
        shutdown = getattr(reader, "shutdown", None)
        if shutdown is None:
            return
        if self._reading:
            self._join().addCallback(lambda _: shutdown())
        else:
            shutdown()
