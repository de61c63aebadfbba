"""Tests for mgpu.tap: options, start-up refusals and the service tree."""

from __future__ import annotations

import io
import sys
from typing import cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import ConfigError
from mgpu.gpu import GpuPoller
from mgpu.registry import HealthProber
from mgpu.site import BrokerSite
from mgpu.tap import Options, makeService, read_token
from tests.test_config_hostile import HOSTILE, QUICK_S, deadline

CONFIG = """
gpu: {source: none, total_mib: 8000}
routing: {tts: a}
consumers:
  a: {url: "http://127.0.0.1:9", paths: {tts: {path: /t}}, vram_resident_mib: 1}
"""


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def options(self, *argv: str, config: str = CONFIG) -> Options:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(config)
        options = Options()
        options.parseOptions(["--config", path, *argv])
        return options

    def test_builds_the_services(self) -> None:
        """A good file gives a service tree with the web server, prober and poller."""
        service = makeService(self.options(), MemoryReactorClock())
        children = list(IServiceCollection(service))
        kinds = (StreamServerEndpointService, HealthProber, GpuPoller)
        for kind in kinds:
            self.assertEqual(len([s for s in children if isinstance(s, kind)]), 1, kind)

    def test_a_poller_per_card(self) -> None:
        """gpu.devices [0, 2]: one poller per card, each reading its own index."""
        config = CONFIG.replace("total_mib: 8000}", "total_mib: 8000, devices: [2, 0]}")
        self.assertNotEqual(config, CONFIG)
        service = makeService(self.options(config=config), MemoryReactorClock())
        pollers = [s for s in IServiceCollection(service) if isinstance(s, GpuPoller)]
        self.assertEqual([p.latest.index for p in pollers], [0, 2])

    def test_demo_runs_one_or_two_cards(self) -> None:
        """--demo-gpus takes 1 (the default) or 2, and refuses anything else."""
        self.assertEqual(self.options("--demo")["demo-gpus"], 1)
        self.assertEqual(self.options("--demo", "--demo-gpus", "2")["demo-gpus"], 2)
        with self.assertRaises(usage.UsageError) as raised:
            self.options("--demo", "--demo-gpus", "3")
        self.assertIn("must be 1 or 2", str(raised.exception))

    def test_site_takes_the_limits(self) -> None:
        """The web server's site takes limits.max_body_mib (in bytes) and header_timeout_s."""
        config = CONFIG + "limits: {max_body_mib: 3, header_timeout_s: 2.5}\n"
        service = makeService(self.options(config=config), MemoryReactorClock())
        [server] = [
            s for s in IServiceCollection(service) if isinstance(s, StreamServerEndpointService)
        ]
        site = cast(BrokerSite, server.factory)
        self.assertEqual((site.max_body_bytes, site.header_timeout_s), (3 * 2**20, 2.5))

    def test_bad_config_exits_2_naming_the_field(self) -> None:
        """A bad file exits with status 2 and one line naming the file and field, no traceback."""
        options = self.options(
            config=CONFIG.replace("vram_resident_mib: 1", "vram_resident_mib: x")
        )
        with self.assertRaises(SystemExit) as caught:
            makeService(options, MemoryReactorClock())
        self.assertEqual(caught.exception.code, 2)
        message = self.stderr.getvalue()
        self.assertIn(f"{options['config']}: consumers.a.vram_resident_mib:", message)
        self.assertNotIn("Traceback", message)
        self.assertEqual(message.count("\n"), 1)

    def test_hostile_files_exit_2_on_one_line(self) -> None:
        """Each hostile file of SPEC 9.7 (alias bomb, recursive alias, deep nesting, huge
        integer, user info, bare query, NUL in a path) exits with status 2 at once, with one
        line naming the file and the field and no traceback."""
        for kind, (text, field) in HOSTILE.items():
            self.stderr.seek(0)
            self.stderr.truncate()
            options = self.options(config=text)
            with deadline(QUICK_S), self.assertRaises(SystemExit) as caught:
                makeService(options, MemoryReactorClock())
            self.assertEqual(caught.exception.code, 2, kind)
            message = self.stderr.getvalue()
            self.assertTrue(
                message.startswith(f"mgpumanager: {options['config']}: {field}: "), message
            )
            self.assertEqual(message.count("\n"), 1, kind)
            self.assertNotIn("Traceback", message)

    def test_bad_listen_exits_2(self) -> None:
        """An unusable --listen endpoint exits with status 2 naming --listen."""
        with self.assertRaises(SystemExit):
            makeService(self.options("--listen", "bogus:1"), MemoryReactorClock())
        self.assertIn("--listen", self.stderr.getvalue())

    def test_systemd_listen_without_a_socket_exits_2(self) -> None:
        """``systemd:`` with no socket passed (not under socket activation) exits 2, saying so."""
        with self.assertRaises(SystemExit) as raised:
            makeService(
                self.options("--listen", "systemd:domain=INET:index=0"), MemoryReactorClock()
            )
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("no socket was passed by systemd", self.stderr.getvalue())

    def test_unreadable_token_file_exits_2(self) -> None:
        """An auth.token_file that cannot be read stops the daemon, naming auth.token_file."""
        config = CONFIG + "auth: {token_file: /nonexistent/token}\n"
        with self.assertRaises(SystemExit):
            makeService(self.options(config=config), MemoryReactorClock())
        self.assertIn("auth.token_file", self.stderr.getvalue())


class ReadTokenTests(SynchronousTestCase):
    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_no_file_no_auth(self) -> None:
        """Without auth.token_file there is no token."""
        self.assertIsNone(read_token(None, "c.yaml"))

    def test_token_stripped(self) -> None:
        """The file's trailing newline is not part of the token."""
        self.assertEqual(read_token(self.write(b"abc123\n"), "c.yaml"), b"abc123")

    def test_empty_or_spaced_token_refused(self) -> None:
        """An empty file, or one with spaces inside the token, is a configuration error."""
        for content in (b"\n", b"two words\n", b"tab\there"):
            with self.assertRaises(ConfigError) as caught:
                read_token(self.write(content), "c.yaml")
            self.assertEqual(caught.exception.field, "auth.token_file")
            if content.strip():
                self.assertNotIn(content.strip().decode(), str(caught.exception))


class ListenBacklogTests(SynchronousTestCase):
    def test_default_backlog(self) -> None:
        """TCP and UNIX endpoints get a backlog of 1024 unless they name one; others are
        left alone (a systemd socket has its own)."""
        from mgpu.tap import with_backlog

        self.assertEqual(
            with_backlog("tcp:8770:interface=127.0.0.1"),
            "tcp:8770:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(with_backlog("tcp:8770:backlog=64"), "tcp:8770:backlog=64")
        self.assertEqual(with_backlog("unix:/run/m.sock"), "unix:/run/m.sock:backlog=1024")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")
