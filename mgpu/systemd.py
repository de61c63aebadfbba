# -*- test-case-name: tests.test_systemd -*-
"""systemd's notify protocol: ``READY=1`` once listening, ``WATCHDOG=1`` while the reactor turns.

The protocol is one datagram per message to the Unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace): no library
needed. Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) the
service does nothing. A message that cannot be sent is dropped and logged once:
the daemon serves with or without systemd listening.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def notify_address(environ: Mapping[str, str]) -> bytes | None:
    """The address ``$NOTIFY_SOCKET`` names, ``@`` turned into the abstract namespace's NUL.

    None when it is unset or not a Unix socket path (newer systemd also speaks vsock).
    """
    name = environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return os.fsencode(name)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between the watchdog deadlines systemd asked us to meet, if it asked *us*.

    ``WATCHDOG_PID`` names the process meant; another pid's watchdog is not ours.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner is not None and owner != str(pid)):
        return None
    return usec / 1_000_000


@define(eq=False)
class SystemdNotifier(Service):
    """Tells systemd we are ready once ``listening()`` fires, pings its watchdog, says stopping.

    The pings come from a ``LoopingCall`` on ``clock`` at half the watchdog
    interval, so a reactor that stops turning stops them and systemd restarts us.
    """

    _clock: IReactorTime
    _listening: Callable[[], Deferred[object]]
    _environ: Mapping[str, str]
    _address: bytes | None = field(init=False, default=None)
    _socket: socket.socket | None = field(init=False, default=None)
    _waiting: Deferred[object] | None = field(init=False, default=None)
    _loop: LoopingCall | None = field(init=False, default=None)
    _failing: bool = field(init=False, default=False)

    def startService(self) -> None:
        super().startService()
        self._address = notify_address(self._environ)
        if self._address is None:
            if self._environ.get("NOTIFY_SOCKET"):
                log.warn(
                    "NOTIFY_SOCKET={name} is not a Unix socket: systemd is not notified",
                    name=self._environ["NOTIFY_SOCKET"],
                )
            return
        sock = self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)  # a full queue drops a message; it never blocks the reactor
        waiting = self._waiting = self._listening()
        waiting.addCallbacks(self._ready, self._not_listening)
        interval = watchdog_interval(self._environ, os.getpid())
        if interval is not None:
            loop = self._loop = LoopingCall(self.notify, "WATCHDOG=1")
            loop.clock = self._clock
            loop.start(interval / 2, now=True).addErrback(
                lambda f: log.failure("systemd watchdog pings stopped", f)
            )

    def _ready(self, port: object) -> None:
        self._waiting = None
        self.notify(f"READY=1\nSTATUS=listening on {_where(port)}")

    def _not_listening(self, reason: Failure) -> None:
        self._waiting = None
        if not reason.check(CancelledError):
            log.failure("not listening: systemd is not told we are ready", reason)

    def stopService(self) -> None:
        super().stopService()
        if self._waiting is not None:
            self._waiting.cancel()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._socket is not None:
            self.notify("STOPPING=1\nSTATUS=stopping")
            self._socket.close()
            self._socket = None

    def notify(self, message: str) -> None:
        """Send one message; a failure is logged the first time in a row, never raised."""
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto(message.encode("utf-8"), self._address)
        except OSError as e:
            if not self._failing:
                log.warn(
                    "cannot notify systemd at {address}: {error}; "
                    "further failures are not logged until one succeeds",
                    address=self._environ.get("NOTIFY_SOCKET"),
                    error=e,
                )
            self._failing = True
        else:
            self._failing = False


def _where(port: object) -> str:
    """``HOST:PORT`` of a listening port, for the ``STATUS=`` line."""
    get_host = getattr(port, "getHost", None)
    host = get_host() if callable(get_host) else port
    if hasattr(host, "host") and hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(host)
