"""mgpu.child: real children started through subprocess and watched by the reactor."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mgpu import child

reactor: Any = _reactor


class _Gather(ProcessProtocol):
    """Keeps what the child wrote and how it ended."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[BaseException] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        assert reason.value is not None
        self.ended.callback(reason.value)  # the exception: a Failure would errback


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class SpawnChildTests(TestCase):
    """Output, exit codes, signals and descriptors, against the real reactor."""

    if not child.available():
        skip = "no pidfd on this system"

    def spawn(self, code: str) -> tuple[_Gather, child.Child]:
        gather = _Gather()
        argv = ["python-child", "-c", code]
        started = child.spawn_child(reactor, gather, sys.executable, argv, dict(os.environ))
        return gather, started

    def our_readers(self) -> list[object]:
        return [r for r in reactor.getReaders() if r.__class__.__module__ == child.__name__]

    async def test_output_and_exit_code(self) -> None:
        """Stdout and stderr reach the protocol, then the exit code as ProcessTerminated;
        nothing of the child stays on the reactor."""
        gather, _ = self.spawn("import sys; print('out'); sys.stderr.write('err'); sys.exit(3)")
        reason = await gather.ended
        assert isinstance(reason, ProcessTerminated)
        self.assertEqual(reason.exitCode, 3)
        self.assertEqual((bytes(gather.out), bytes(gather.err)), (b"out\n", b"err"))
        self.assertEqual(self.our_readers(), [])

    async def test_clean_exit_is_process_done(self) -> None:
        """Exit code 0 is ProcessDone, as from spawnProcess."""
        gather, _ = self.spawn("pass")
        self.assertIsInstance(await gather.ended, ProcessDone)

    async def test_more_output_than_a_pipe_holds(self) -> None:
        """Output past the pipe's buffer is read while the child runs, all of it."""
        gather, _ = self.spawn("import sys; sys.stdout.write('x' * (1 << 20))")
        await gather.ended
        self.assertEqual(len(gather.out), 1 << 20)

    async def test_killed(self) -> None:
        """A killed child ends with its signal; once reaped, signalling it says so."""
        gather, started = self.spawn("import time; time.sleep(60)")
        started.signalProcess("KILL")
        reason = await gather.ended
        assert isinstance(reason, ProcessTerminated)
        self.assertEqual(reason.signal, 9)
        self.assertRaises(ProcessExitedAlready, started.signalProcess, "KILL")
        self.assertIsNone(started.pid)

    async def test_killed_with_what_it_started(self) -> None:
        """Killing a child kills the processes it started too (its process group): a
        load command's script leaves nothing running after its timeout."""
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        code = (
            "import subprocess, time\n"
            f"grandchild = subprocess.Popen({sleeper!r})\n"
            "print(grandchild.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        gather, started = self.spawn(code)
        while not gather.out.endswith(b"\n") and not gather.ended.called:
            await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(gather.ended.called, bytes(gather.err))
        grandchild = int(gather.out)
        started.signalProcess("KILL")
        await gather.ended
        for _ in range(250):  # its end is its new parent's to reap: wait until it is
            if not _running(grandchild):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(_running(grandchild), f"pid {grandchild} outlived its parent's kill")

    async def test_descriptors_not_inherited(self) -> None:
        """A descriptor the daemon made inheritable is still closed in the child."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        os.set_inheritable(write_end, True)
        gather, _ = self.spawn("import os; print(sorted(map(int, os.listdir('/proc/self/fd'))))")
        await gather.ended
        seen = eval(bytes(gather.out))  # a printed list of ints
        self.assertNotIn(write_end, seen)
        self.assertLessEqual(len(seen), 4)  # stdin, stdout, stderr, listdir's own

    async def test_stopped_reading(self) -> None:
        """After loseConnection the output is not read (the child's write fails), and
        its exit still comes."""
        gather, started = self.spawn("import time; time.sleep(0.2); print('late')")
        started.loseConnection()
        await gather.ended
        self.assertEqual(bytes(gather.out), b"")

    def test_missing_executable(self) -> None:
        """A path that cannot be run is an OSError, and nothing is watched."""
        gather = _Gather()
        with self.assertRaises(OSError):
            child.spawn_child(reactor, gather, "/nonexistent/x", ["x"], {})
        self.assertEqual(self.our_readers(), [])
