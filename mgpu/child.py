# -*- test-case-name: tests.test_child -*-
"""Start a child process at a cost that does not grow with the daemon's open descriptors.

Twisted's ``spawnProcess`` lists every descriptor the daemon has open and
checks each before it starts a child: with 1,000 ``/v1/events`` clients
connected, each ``nvidia-smi`` reading cost the reactor about 2 ms, two
readings a swap. ``subprocess`` starts the child with ``vfork`` and lets it
close what it must not inherit in one ``close_range`` call; the reactor then
watches the child's pipes and its pidfd (readable once it has exited), so no
thread waits on it and no ``SIGCHLD`` handler is involved.

``spawn_child`` speaks Twisted's process protocol: the ``ProcessProtocol``
gets ``makeConnection``, ``outReceived``, ``errReceived`` and
``processEnded`` with ``ProcessDone`` or ``ProcessTerminated``, as from
``spawnProcess``. Linux only (``os.pidfd_open``, kernel 5.3): elsewhere
``available()`` is false and callers use ``spawnProcess``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import IO, Protocol

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: Bytes read from a pipe at a time.
_READ_SIZE = 64 * 1024


class ReactorFDSet(Protocol):
    """The part of ``IReactorFDSet`` used here (structural: zope interfaces confuse mypy)."""

    def addReader(self, reader: IReadDescriptor) -> None: ...
    def removeReader(self, reader: IReadDescriptor) -> None: ...


def available() -> bool:
    """Whether children can be watched through a pidfd here."""
    return hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


@implementer(IReadDescriptor)
class _Watch:
    """A descriptor the reactor reads for us: ``on_readable`` runs when it is readable."""

    def __init__(self, fd: int, on_readable: Callable[[], None]) -> None:
        self.fd = fd
        self._on_readable = on_readable

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self._on_readable()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor stopped watching (it is shutting down); the child ends on its own."""

    def logPrefix(self) -> str:
        return "child"


class Child:
    """One running child: its pipes and pidfd watched, ``signalProcess`` to kill it.

    The transport handed to the protocol; it reaps the child itself, as soon
    as the pidfd says it has exited, so its pid is never reused under it.
    """

    def __init__(
        self, reactor: ReactorFDSet, protocol: ProcessProtocol, popen: subprocess.Popen[bytes]
    ) -> None:
        self._reactor = reactor
        self._protocol = protocol
        self._popen = popen
        self.pid: int | None = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)
        assert popen.stdout is not None and popen.stderr is not None
        # By descriptor: the watch, the pipe's file (which owns the descriptor: it is
        # closed through it, never twice), and where its bytes go.
        self._pipes: dict[int, tuple[_Watch, IO[bytes], Callable[[bytes], None]]] = {}
        outputs = ((popen.stdout, protocol.outReceived), (popen.stderr, protocol.errReceived))
        for pipe, deliver in outputs:
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self._pipes[fd] = (_Watch(fd, partial(self._read, fd)), pipe, deliver)
        self._exit = _Watch(self._pidfd, self._exited)
        for watch, _, _ in self._pipes.values():
            reactor.addReader(watch)
        reactor.addReader(self._exit)

    def _read(self, fd: int) -> None:
        """Pass what the pipe holds to the protocol; at its end, stop watching it."""
        deliver = self._pipes[fd][2]
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_pipe(fd)
                return
            deliver(data)

    def _close_pipe(self, fd: int) -> None:
        watch, pipe, _ = self._pipes.pop(fd)
        self._reactor.removeReader(watch)
        with contextlib.suppress(OSError):
            pipe.close()

    def _exited(self) -> None:
        """The child has exited: reap it, take what its pipes still hold, and say how it ended."""
        self._reactor.removeReader(self._exit)
        code = self._popen.wait()  # at once: the pidfd said it has exited
        os.close(self._pidfd)
        self.pid = None
        for fd in list(self._pipes):
            self._read(fd)
            if fd in self._pipes:  # a grandchild holds it open: not waited for
                self._close_pipe(fd)
        if code == 0:
            reason = Failure(ProcessDone(0))
        elif code < 0:
            reason = Failure(ProcessTerminated(signal=-code))
        else:
            reason = Failure(ProcessTerminated(exitCode=code))
        self._protocol.processEnded(reason)

    def signalProcess(self, name: str | int) -> None:
        """Send ``"KILL"``, ``"TERM"`` or a signal number to the child and what it started
        (its process group: a script's own children do not outlive a timeout);
        ``ProcessExitedAlready`` once reaped."""
        if self.pid is None:
            raise ProcessExitedAlready()
        number = name if isinstance(name, int) else getattr(signal, f"SIG{name}")
        # Not reaped yet, the child still leads its group: its pid names the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, number)
        signal.pidfd_send_signal(self._pidfd, number)

    def loseConnection(self) -> None:
        """Stop reading the child's output (its exit is still watched)."""
        for fd in list(self._pipes):
            self._close_pipe(fd)


def spawn_child(
    reactor: ReactorFDSet,
    protocol: ProcessProtocol,
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
) -> Child:
    """Start ``path`` with ``argv`` (its first item is the name it sees), stdin empty.

    ``OSError`` if it cannot be started; the protocol is connected otherwise.
    """
    popen = subprocess.Popen(  # argv from the config, never a shell
        list(argv),
        executable=path,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        process_group=0,  # its own group, so a kill reaches what it started too
    )
    try:
        child = Child(reactor, protocol, popen)
    except OSError:
        popen.kill()
        popen.wait()
        raise
    protocol.makeConnection(child)
    return child
