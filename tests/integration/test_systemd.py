"""The real daemon under twistd, as systemd runs it: notify socket, watchdog, socket activation.

The notify socket is a Unix datagram socket this test binds; socket activation
is ``systemd-socket-activate``, which holds the port, passes it as fd 3 with
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, and execs the daemon on the
first connection.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.harness import (
    DAEMON_START_S,
    ManagedProcess,
    child_env,
    daemon_argv,
    free_port,
    get,
    make_config,
    port_open,
    raw_request,
    reactor,
    request_bytes,
    sim_log,
    start_consumer,
    start_daemon,
    wait_for,
    write_config,
)

#: Where Debian's systemd package puts it (older releases: /lib/systemd/).
SOCKET_ACTIVATE_PATHS = ("/usr/bin/systemd-socket-activate", "/lib/systemd/systemd-socket-activate")


def socket_activate() -> str:
    """The ``systemd-socket-activate`` executable; skip without it unless CI requires it."""
    found = shutil.which("systemd-socket-activate") or next(
        (p for p in SOCKET_ACTIVATE_PATHS if os.access(p, os.X_OK)), None
    )
    if found is not None:
        return found
    if os.environ.get("MGPU_REQUIRE_SYSTEMD"):
        raise AssertionError("MGPU_REQUIRE_SYSTEMD is set but systemd-socket-activate is missing")
    raise SkipTest("systemd-socket-activate is not installed (Debian: apt-get install systemd)")


def short_workdir(test: TestCase) -> Path:
    """A temp dir short enough for a Unix socket path (108 bytes), removed after the test."""
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-sd-"))
    test.addCleanup(shutil.rmtree, workdir, True)
    return workdir


class NotifySocket(DatagramProtocol):
    """Stands in for systemd's notify socket.

    On ``READY=1`` it checks at once that the port its ``STATUS=`` line names
    accepts connections.
    """

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.ready_port: int | None = None
        self.listening_at_ready: bool | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        message = datagram.decode("utf-8")
        if message.startswith("READY=1\n") and self.ready_port is None:
            status = message.split("\n", 1)[1]
            self.ready_port = int(status.rsplit(":", 1)[1])
            self.listening_at_ready = port_open(self.ready_port)
        self.messages.append(message)

    def count(self, first_line: str) -> int:
        """How many messages so far begin with ``first_line``."""
        return sum(m.split("\n", 1)[0] == first_line for m in self.messages)


def quiet_config(workdir: Path) -> Path:
    """A configuration whose one consumer nothing serves: enough to start, listen and notify."""
    block: dict[str, Any] = {
        "url": "http://127.0.0.1:9",
        "health": {"method": "GET", "path": "/health"},
        "paths": {"tts": {"method": "POST", "path": "/tts"}},
        "vram_resident_mib": 100,
    }
    config = {
        "gpu": {"source": "none", "total_mib": 16384},
        "health": {"interval_s": 5, "timeout_s": 1},
        "routing": {"tts": "quiet"},
        "consumers": {"quiet": block},
    }
    return write_config(workdir / "mgpumanager.yaml", config)


class NotifyTests(TestCase):
    """``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` given to the daemon, as systemd does."""

    timeout = 60

    async def test_ready_once_listening_then_watchdog_then_stopping(self) -> None:
        """READY=1 arrives once the port accepts connections, naming it in STATUS=;
        WATCHDOG=1 every 0.1 s for WATCHDOG_USEC=200000; STOPPING=1 on SIGTERM."""
        workdir = short_workdir(self)
        notify_path = workdir / "notify"
        notify = NotifySocket()
        listener = reactor.listenUNIXDatagram(str(notify_path), notify)
        self.addCleanup(listener.stopListening)
        env = child_env(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
        env.pop("WATCHDOG_PID", None)

        daemon = await start_daemon(workdir, quiet_config(workdir), env=env)
        self.addCleanup(daemon.process.stop_now)
        await wait_for(lambda: notify.count("READY=1"), 10, "READY=1")
        self.assertEqual(notify.ready_port, daemon.port, notify.messages)
        self.assertTrue(notify.listening_at_ready, daemon.process.output())

        before = notify.count("WATCHDOG=1")
        started = time.monotonic()
        await wait_for(lambda: notify.count("WATCHDOG=1") >= before + 5, 5, "5 WATCHDOG=1")
        # Five pings 0.1 s apart take about 0.4 s: a pace, not a burst.
        self.assertGreater(time.monotonic() - started, 0.3)
        self.assertEqual(notify.count("READY=1"), 1)
        self.assertEqual(notify.count("STOPPING=1"), 0)

        await daemon.process.stop()
        # twistd ends by re-raising SIGTERM on itself: systemd counts that a clean stop.
        self.assertIn(daemon.process.popen.returncode, (0, -15), daemon.process.output())
        await wait_for(lambda: notify.count("STOPPING=1"), 5, "STOPPING=1")
        self.assertNotIn("Traceback", daemon.process.output())


class SocketActivationTests(TestCase):
    """The daemon under ``systemd-socket-activate``, taking the port it passes."""

    timeout = 90

    async def setUp(self) -> None:  # type: ignore[override]
        self.activate = socket_activate()
        self.workdir = short_workdir(self)
        self.consumer = await start_consumer("mvoice", self.workdir)
        self.addCleanup(self.consumer.process.stop_now)
        # The file's own listen: must stay closed, the passed socket is used instead.
        self.file_port = free_port()
        config = make_config({"mvoice": self.consumer}, {"tts": "mvoice"}, audio_proxy="mvoice")
        config["listen"] = f"tcp:{self.file_port}:interface=127.0.0.1"
        self.config = write_config(self.workdir / "mgpumanager.yaml", config)

    def start(self, listen: str, *activate_args: str) -> tuple[ManagedProcess, int]:
        """``systemd-socket-activate -l 127.0.0.1:PORT ARGS twistd ... --listen LISTEN``.

        It passes on only the variables it is given with ``-E`` (and PATH, HOME, TERM).
        """
        port = free_port()
        argv = [self.activate, "-l", f"127.0.0.1:{port}", *activate_args]
        for name in ("PYTHONPATH", "PYTHONUNBUFFERED"):
            argv += ["-E", f"{name}={child_env()[name]}"]
        argv += daemon_argv("--config", str(self.config), "--listen", listen)
        proc = ManagedProcess.start("activated", argv, self.workdir, child_env())
        self.addCleanup(proc.stop_now)
        return proc, port

    async def wait_listening(self, proc: ManagedProcess, port: int) -> None:
        """systemd-socket-activate holds the port before it runs anything."""
        await wait_for(
            lambda: port_open(port) or not proc.alive(), 10, "systemd-socket-activate to listen"
        )
        self.assertTrue(proc.alive(), proc.output())

    async def assertServes(self, listen: str, *activate_args: str) -> None:
        """The first connection starts the daemon on the passed socket; /healthz and
        POST /v1/tts work through it; the file's own port is never opened."""
        proc, port = self.start(listen, *activate_args)
        await self.wait_listening(proc, port)
        # This connection waits in the passed socket's queue while the daemon starts.
        health = await raw_request(port, get("/healthz"), timeout=DAEMON_START_S)
        self.assertEqual(health.status, 200, proc.output())
        self.assertEqual(health.json(), {"status": "ok"})
        self.assertIn("twistd", Path(f"/proc/{proc.pid}/cmdline").read_text(), "not exec'd")

        body = json.dumps({"text": "hello"}).encode()
        headers = {"Content-Type": "application/json"}
        response = await raw_request(
            port, request_bytes("POST", "/v1/tts", body, headers), timeout=30
        )
        self.assertEqual(response.status, 200, (response.body, proc.output()))
        self.assertEqual(response.json()["bytes"], 44 + 1920 * len("hello"))
        self.assertEqual(len(await sim_log(self.consumer)), 1)
        self.assertFalse(port_open(self.file_port), "the file's listen: was used")
        self.assertIn("BrokerSite starting on", proc.stdout())

    async def test_index(self) -> None:
        """``--listen systemd:domain=INET:index=0``, the form the unit file uses.

        Twisted's ListenFDs drops the fds unless LISTEN_FDNAMES names each one, which
        systemd (v227+) always does; systemd-socket-activate only with --fdname.
        """
        await self.assertServes("systemd:domain=INET:index=0", "--fdname=mgpumanager.socket")

    async def test_name(self) -> None:
        """``--listen systemd:domain=INET:name=http`` with the socket named by ``--fdname=http``."""
        await self.assertServes("systemd:domain=INET:name=http", "--fdname=http")

    async def test_unnamed_fd_is_not_taken(self) -> None:
        """Without LISTEN_FDNAMES (no --fdname) Twisted finds no fd 0: the daemon exits non-zero
        at the first connection instead of serving (systemd itself always names its fds)."""
        proc, port = self.start("systemd:domain=INET:index=0")
        await self.wait_listening(proc, port)
        try:
            answer = await raw_request(port, get("/healthz"), timeout=DAEMON_START_S)
        except Exception:
            answer = None
        self.assertIsNone(answer, proc.output())
        code = await proc.wait_exit(DAEMON_START_S)
        self.assertNotEqual(code, 0, proc.output())
