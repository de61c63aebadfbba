"""Tests for mgpu.systemd, the systemd unit files in config/ and ``make deploy``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import yaml
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mgpu.systemd import SystemdNotifier, notify_address, watchdog_interval

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_UNIT = REPO_ROOT / "config" / "mgpumanager.service"
SOCKET_UNIT = REPO_ROOT / "config" / "mgpumanager.socket"
PRODUCTION_CONFIG = REPO_ROOT / "config" / "consumers.yaml"

#: The twistd ``--listen`` that takes the socket systemd passes.
SYSTEMD_LISTEN = "systemd:domain=INET:index=0"


class _Port:
    """What a listening endpoint's Deferred gives: something with ``getHost``."""

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8770)


class _Receiver:
    """A Unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram that arrived since the last call."""
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096).decode("utf-8"))
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()
        if isinstance(self.address, str) and os.path.exists(self.address):
            os.unlink(self.address)


class NotifierTests(SynchronousTestCase):
    """A ``SystemdNotifier`` on a ``Clock``, sending to a real socket in a temp dir."""

    def setUp(self) -> None:
        # A short directory: a Unix socket path must fit in 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="mgpu-sd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "notify")
        self.receiver = self.receive_at(self.path)
        self.clock = Clock()
        self.listening_calls = 0
        self.port: Deferred[object] = Deferred()

    def receive_at(self, address: str | bytes) -> _Receiver:
        receiver = _Receiver(address)
        self.addCleanup(receiver.close)
        return receiver

    def listening(self) -> Deferred[object]:
        self.listening_calls += 1
        return self.port

    def notifier(self, **environ: str) -> SystemdNotifier:
        """A notifier told ``NOTIFY_SOCKET`` (the receiver's path) and ``environ``."""
        env = {"NOTIFY_SOCKET": self.path, **environ}
        notifier = SystemdNotifier(self.clock, self.listening, env)
        self.addCleanup(self.stop, notifier)
        return notifier

    def stop(self, notifier: SystemdNotifier) -> None:
        if notifier.running:
            notifier.stopService()

    def started(self, **environ: str) -> SystemdNotifier:
        notifier = self.notifier(**environ)
        notifier.startService()
        return notifier

    def watchdog_pings(self) -> int:
        return sum(m == "WATCHDOG=1" for m in self.receiver.messages())

    def test_ready_only_after_listening(self) -> None:
        """READY=1 (with the address in STATUS=) is sent once the port listens, not before."""
        self.started()
        self.assertEqual(self.listening_calls, 1)
        self.assertEqual(self.receiver.messages(), [])
        self.port.callback(_Port())
        self.assertEqual(self.receiver.messages(), ["READY=1\nSTATUS=listening on 127.0.0.1:8770"])

    def test_listening_not_asked_before_start(self) -> None:
        """Building the notifier neither asks for the port nor sends anything."""
        self.notifier()
        self.port.callback(_Port())
        self.assertEqual(self.listening_calls, 0)
        self.assertEqual(self.receiver.messages(), [])

    def test_watchdog_at_half_the_interval(self) -> None:
        """With WATCHDOG_USEC=10 s for our pid, WATCHDOG=1 goes out at start and every 5 s."""
        self.started(WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid()))
        self.assertEqual(self.watchdog_pings(), 1)
        self.clock.advance(4.9)
        self.assertEqual(self.watchdog_pings(), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.watchdog_pings(), 1)
        for _ in range(4):
            self.clock.advance(5)
        self.assertEqual(self.watchdog_pings(), 4)

    def test_watchdog_without_pid(self) -> None:
        """WATCHDOG_PID unset: the watchdog is ours (systemd before v209 set none)."""
        self.started(WATCHDOG_USEC="2000000")
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.watchdog_pings(), 3)

    def test_watchdog_pid_mismatch(self) -> None:
        """WATCHDOG_PID naming another process: no pings, and no timer left on the clock."""
        self.started(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1))
        self.port.callback(_Port())
        self.clock.advance(10)
        messages = self.receiver.messages()
        self.assertEqual([m for m in messages if "WATCHDOG" in m], [])
        self.assertTrue(messages[0].startswith("READY=1"), messages)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_watchdog_asked(self) -> None:
        """Without WATCHDOG_USEC no pings are scheduled."""
        self.started()
        self.clock.advance(100)
        self.assertEqual(self.receiver.messages(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_without_notify_socket_nothing_at_all(self) -> None:
        """No NOTIFY_SOCKET: the port is not asked for, nothing is sent, scheduled or logged."""
        notifier = SystemdNotifier(self.clock, self.listening, {"WATCHDOG_USEC": "1000000"})
        with capturedLogs() as events:
            notifier.startService()
            self.port.callback(_Port())
            self.clock.advance(10)
            notifier.stopService()
        self.assertEqual(self.listening_calls, 0)
        self.assertEqual(self.receiver.messages(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(list(events), [])

    def test_not_a_unix_socket(self) -> None:
        """A NOTIFY_SOCKET that is no Unix socket path (vsock:...) sends nothing, says so once."""
        notifier = SystemdNotifier(self.clock, self.listening, {"NOTIFY_SOCKET": "vsock:2:99"})
        with capturedLogs() as events:
            notifier.startService()
            notifier.stopService()
        self.assertEqual(self.listening_calls, 0)
        self.assertEqual(len(events), 1)
        self.assertIn("vsock:2:99", formatEvent(events[0]))

    def test_abstract_namespace(self) -> None:
        """NOTIFY_SOCKET=@name reaches the socket bound to NUL+name (the abstract namespace)."""
        name = f"mgpu-test-{uuid.uuid4().hex}"
        abstract = self.receive_at(b"\0" + name.encode())
        self.path = "@" + name
        self.started()
        self.port.callback(_Port())
        self.assertEqual(len(abstract.messages()), 1)
        self.assertEqual(self.receiver.messages(), [])

    def test_stopping_on_stop(self) -> None:
        """stopService sends STOPPING=1 and stops the watchdog loop."""
        notifier = self.started(WATCHDOG_USEC="2000000")
        self.port.callback(_Port())
        self.receiver.messages()
        notifier.stopService()
        messages = self.receiver.messages()
        self.assertEqual(len(messages), 1)
        self.assertTrue(messages[0].startswith("STOPPING=1\n"), messages)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.receiver.messages(), [])

    def test_stop_before_listening(self) -> None:
        """Stopped before the port listens: no READY=1 ever, STOPPING=1, nothing logged."""
        notifier = self.started()
        with capturedLogs() as events:
            notifier.stopService()
        self.assertEqual(self.receiver.messages(), ["STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(list(events), [])

    def test_listen_failure_is_logged_not_ready(self) -> None:
        """The port failing to listen is logged; READY=1 is never sent."""
        self.started()
        self.port.errback(OSError("address in use"))
        self.assertEqual(self.receiver.messages(), [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_vanished_socket_logged_once(self) -> None:
        """A notify socket that went away: one warning, no exception; a new one is used again."""
        self.started(WATCHDOG_USEC="2000000")
        self.assertEqual(self.watchdog_pings(), 1)
        self.receiver.close()
        with capturedLogs() as events:
            self.port.callback(_Port())
            for _ in range(5):
                self.clock.advance(1)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, [formatEvent(e) for e in events])
        self.assertIn(self.path, formatEvent(warnings[0]))
        self.assertEqual(len(events), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 6)  # the loop goes on
        back = self.receive_at(self.path)
        self.clock.advance(1)
        self.assertEqual(back.messages(), ["WATCHDOG=1"])
        back.close()
        with capturedLogs() as again:
            self.clock.advance(1)
        self.assertEqual(len(again), 1, "a new run of failures is logged again")


class EnvironmentTests(SynchronousTestCase):
    """Reading systemd's variables."""

    def test_notify_address(self) -> None:
        """A path is taken as is, @ means the abstract namespace, anything else is not ours."""
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "/run/x"}), b"/run/x")
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@x/y"}), b"\0x/y")
        self.assertIsNone(notify_address({"NOTIFY_SOCKET": "vsock:2:1"}))
        self.assertIsNone(notify_address({"NOTIFY_SOCKET": ""}))
        self.assertIsNone(notify_address({}))

    def test_watchdog_interval(self) -> None:
        """WATCHDOG_USEC in seconds, only when positive, numeric and for our pid."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 30.0)
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "7"}, 7), 0.5
        )
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "8"}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 7))
        self.assertIsNone(watchdog_interval({}, 7))


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value it is given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = iter(path.read_text("utf-8").splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


class UnitFileTests(SynchronousTestCase):
    """config/mgpumanager.service and config/mgpumanager.socket."""

    def setUp(self) -> None:
        self.service = parse_unit(SERVICE_UNIT)["Service"]
        self.unit = parse_unit(SERVICE_UNIT)["Unit"]
        self.socket = parse_unit(SOCKET_UNIT)["Socket"]

    def one(self, section: Mapping[str, list[str]], key: str) -> str:
        values = section.get(key, [])
        self.assertEqual(len(values), 1, f"{key}: {values}")
        return values[0]

    def test_exec_start_takes_the_passed_socket(self) -> None:
        """ExecStart runs twistd in the foreground, no pidfile, on systemd's socket 0."""
        argv = self.one(self.service, "ExecStart").split()
        self.assertEqual(argv[0], "/opt/mgpumanager/.venv/bin/twistd")
        self.assertEqual(argv[1:4], ["-n", "--pidfile=", "mgpumanager"])
        self.assertEqual(argv[argv.index("--listen") + 1], SYSTEMD_LISTEN)
        self.assertEqual(argv[argv.index("--config") + 1], "/etc/mgpumanager/consumers.yaml")

    def test_notify_and_watchdog(self) -> None:
        """Type=notify for the main process only, a 30 s watchdog, restarted on failure."""
        self.assertEqual(self.one(self.service, "Type"), "notify")
        self.assertEqual(self.one(self.service, "NotifyAccess"), "main")
        self.assertEqual(self.one(self.service, "WatchdogSec"), "30")
        self.assertEqual(self.one(self.service, "Restart"), "on-failure")

    def test_reload_is_sighup(self) -> None:
        """systemctl reload sends SIGHUP to the daemon, which re-reads its configuration."""
        self.assertEqual(self.one(self.service, "ExecReload"), "/bin/kill -HUP $MAINPID")

    def test_service_needs_its_socket(self) -> None:
        """The service requires and follows the socket unit, which names it back."""
        self.assertIn("mgpumanager.socket", self.one(self.unit, "Requires").split())
        self.assertIn("mgpumanager.socket", " ".join(self.unit["After"]).split())
        self.assertEqual(self.one(self.socket, "Service"), "mgpumanager.service")

    def test_one_socket_on_the_configured_port(self) -> None:
        """One ListenStream (index 0), at the address of config/consumers.yaml's listen."""
        self.assertEqual(self.one(self.socket, "ListenStream"), "127.0.0.1:8770")
        for other in ("ListenDatagram", "ListenSequentialPacket", "ListenFIFO"):
            self.assertNotIn(other, self.socket)
        listen = yaml.safe_load(PRODUCTION_CONFIG.read_text("utf-8"))["listen"]
        self.assertEqual(listen, "tcp:8770:interface=127.0.0.1")

    def test_hardened_but_reaches_the_gpu(self) -> None:
        """Hardening is on; the NVIDIA devices stay reachable (no PrivateDevices=yes)."""
        for key, value in {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "SystemCallFilter": "@system-service",
            "DevicePolicy": "closed",
        }.items():
            self.assertEqual(self.one(self.service, key), value, key)
        families = self.one(self.service, "RestrictAddressFamilies").split()
        self.assertEqual(sorted(families), ["AF_INET", "AF_INET6", "AF_UNIX"])
        self.assertNotEqual(self.service.get("PrivateDevices", ["no"]), ["yes"])
        devices = dict(v.split() for v in self.service["DeviceAllow"])
        for device in ("char-nvidia-frontend", "char-nvidia-uvm", "/dev/nvidiactl"):
            self.assertEqual(sorted(devices.get(device, "")), ["r", "w"], device)
        self.assertNotIn("root", self.service.get("User", ["root"]))

    def test_logs_to_the_journal(self) -> None:
        """stdout (twistd -n's log) goes to the journal."""
        self.assertEqual(self.service.get("StandardOutput", ["journal"]), ["journal"])

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify finds nothing to say about either unit."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        work = Path(tempfile.mkdtemp(prefix="mgpu-units-"))
        self.addCleanup(shutil.rmtree, work, True)
        # The install paths do not exist here: point them at ones that do.
        service = SERVICE_UNIT.read_text("utf-8")
        service = service.replace("/opt/mgpumanager/.venv/bin/twistd", "/bin/true")
        service = service.replace("WorkingDirectory=/opt/mgpumanager", "WorkingDirectory=/")
        (work / SERVICE_UNIT.name).write_text(service, "utf-8")
        shutil.copy(SOCKET_UNIT, work / SOCKET_UNIT.name)
        try:
            done = subprocess.run(
                [analyze, "verify", "--man=no", SOCKET_UNIT.name, SERVICE_UNIT.name],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            raise SkipTest("systemd-analyze verify did not finish offline") from None
        said = done.stdout + done.stderr
        if done.returncode != 0 and "mgpumanager" not in said:
            raise SkipTest(f"systemd-analyze verify does not work here: {said.strip()}")
        ours = [line for line in said.splitlines() if "mgpumanager" in line]
        self.assertEqual(ours, [], said)
        self.assertEqual(done.returncode, 0, said)


class DeployTests(SynchronousTestCase):
    """The Makefile's deploy target."""

    def setUp(self) -> None:
        self.make = shutil.which("make")
        if self.make is None:
            raise SkipTest("make is not installed")

    def make_deploy(self, *args: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
        assert self.make is not None
        done = subprocess.run(
            [self.make, "--no-print-directory", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(env) if env is not None else None,
        )
        return done.returncode, done.stdout + done.stderr

    def test_dry_run_names_every_step(self) -> None:
        """make -n deploy prints the rsync, the venv, the unit install and the restarts."""
        code, out = self.make_deploy("-n", "deploy", "HOST=x@example.invalid")
        self.assertEqual(code, 0, out)
        self.assertIn("rsync ", out)
        self.assertIn("x@example.invalid:/opt/mgpumanager/", out)
        for excluded in (".venv", ".git", "'_trial_temp*'", "bench/out"):
            self.assertIn(f"--exclude {excluded} ", out)
        self.assertIn("ssh x@example.invalid ", out)
        self.assertIn("python3 -m venv .venv", out)
        self.assertIn(".venv/bin/pip install -q .;", out)
        self.assertIn(
            "install -m 0644 config/mgpumanager.service config/mgpumanager.socket "
            "/etc/systemd/system/",
            out,
        )
        steps = [
            "systemctl daemon-reload",
            "systemctl enable --now mgpumanager.socket",
            "systemctl restart mgpumanager.service",
        ]
        where = [out.find(step) for step in steps]
        self.assertNotIn(-1, where, out)
        self.assertEqual(where, sorted(where), "daemon-reload, enable the socket, restart")
        self.assertLess(out.find("rsync "), where[0])

    def test_without_host_fails_before_anything(self) -> None:
        """make deploy without HOST stops with a message naming HOST; no ssh or rsync runs."""
        bin_dir = Path(tempfile.mkdtemp(prefix="mgpu-deploy-"))
        self.addCleanup(shutil.rmtree, bin_dir, True)
        ran = bin_dir / "ran"
        for tool in ("ssh", "rsync", "scp"):
            fake = bin_dir / tool
            fake.write_text(f"#!/bin/sh\necho {tool} >> {ran}\n", "utf-8")
            fake.chmod(0o755)
        env = {**os.environ, "PATH": str(bin_dir)}
        env.pop("HOST", None)
        code, out = self.make_deploy("deploy", env=env)
        self.assertNotEqual(code, 0, out)
        self.assertIn("HOST is not set", out)
        self.assertIn("make deploy HOST=user@host", out)
        self.assertFalse(ran.exists(), ran.exists() and ran.read_text())
