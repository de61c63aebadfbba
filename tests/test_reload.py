"""Tests for mgpu.reload: re-reading the configuration file (``POST /v1/admin/reload``, SIGHUP).

The file is a real YAML file in a temporary directory; the parts that take
the new configuration are real (``tests.test_facade.Broker``'s facade,
registry, scheduler and prober, a RoomMaker and a GpuPoller on its Clock),
but for the site and the resource, whose only part in a reload is an
attribute and ``set_token``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import yaml
from attrs import define, evolve, field
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from mgpu.cards import Card
from mgpu.config import Config, ConfigError, SchedulerConfig, load_config
from mgpu.footprints import LearnedSizes
from mgpu.gpu import GpuPoller, GpuReader
from mgpu.memory import MemoryWatch
from mgpu.procs import ProcTable
from mgpu.reload import LiveParts, Reloader, SighupReload
from mgpu.room import RoomMaker
from tests.test_facade import Broker
from tests.test_gpu import StaticReader, snapshot

TOKEN = b"s3cret-token"


def document() -> dict[str, Any]:
    """The configuration the daemon starts with: mvoice and ollama, no auth."""
    return {
        "listen": "tcp:8770:interface=127.0.0.1",
        "gpu": {"source": "none", "total_mib": 24564, "poll_interval_s": 2, "cushion_mib": 256},
        "scheduler": {"max_queue": 8, "queue_timeout_s": 60},
        "health": {"interval_s": 5, "timeout_s": 3},
        "limits": {"max_body_mib": 16},
        "routing": {"tts": "mvoice", "llm": "ollama"},
        "consumers": {
            "mvoice": {
                "url": "http://127.0.0.1:8765",
                "health": {"method": "GET", "path": "/api/health"},
                "paths": {"tts": {"method": "POST", "path": "/api/synthesize"}},
                "vram_resident_mib": 2800,
            },
            "ollama": {
                "url": "http://127.0.0.1:11434",
                "health": {"method": "GET", "path": "/api/version"},
                "paths": {"llm": {"method": "POST", "path": "/api/generate"}},
                "vram_resident_mib": 6000,
                "vram_managed": True,
            },
        },
    }


@define
class FakeSite:
    """What a reload changes on the site: the body limit and the head deadline."""

    max_body_bytes: int
    header_timeout_s: float


@define
class TokenRecorder:
    """What a reload changes on the resource: the token; every call recorded."""

    tokens: list[bytes | None] = field(factory=list)

    def set_token(self, token: bytes | None) -> None:
        self.tokens.append(token)


class ReloadCase(SynchronousTestCase):
    """A running daemon's parts, started from ``document()`` written to a temporary file."""

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.path = self.dir.child("consumers.yaml").path
        self.write(document())
        self.config = load_config(self.path)
        self.broker = b = Broker(self.config)
        b.scheduler.config = self.config.scheduler
        self.reader = StaticReader(snapshot())
        self.readers_for: list[Config] = []
        self.new_readers: list[StaticReader] = []
        self.poller = GpuPoller(self.reader, b.reactor, self.config.gpu.poll_interval_s)
        self.room = RoomMaker(
            b.registry, self.poller, b.control, b.reactor,
            self.config.gpu, self.config.scheduler, b.scheduler.stats, b.events,
        )  # fmt: skip
        self.site = FakeSite(
            self.config.limits.max_body_mib * 2**20, self.config.limits.header_timeout_s
        )
        self.resource = TokenRecorder()
        watch = MemoryWatch(ProcTable(), self.poller, LearnedSizes(None), b.control)
        card = Card(0, self.poller, watch, self.room, b.scheduler)
        self.parts = LiveParts(
            b.facade, b.registry, b.scheduler, [card], b.prober,
            self.site, self.resource, new_reader=self.new_reader,
        )  # fmt: skip
        self.reloader = Reloader(self.path, self.config, self.parts)

    def new_reader(self, config: Config, index: int) -> GpuReader:
        self.assertEqual(index, 0)
        self.readers_for.append(config)
        reader = StaticReader(snapshot(source=config.gpu.source))
        self.new_readers.append(reader)
        return reader

    def write(self, data: dict[str, Any] | str, path: str | None = None) -> None:
        text = data if isinstance(data, str) else yaml.safe_dump(data)
        FilePath(path or self.path).setContent(text.encode("utf-8"))

    def changed(self, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """``document()`` with ``change`` applied to it."""
        data = deepcopy(document())
        change(data)
        return data

    def token_file(self, content: bytes = TOKEN + b"\n") -> str:
        path = self.dir.child("token")
        path.setContent(content)
        return path.path

    def snapshot_of_parts(self) -> dict[str, Any]:
        """Everything a reload may change: objects (compared by identity) and values."""
        return {
            "facade.config": self.broker.facade.config,
            "scheduler.config": self.broker.scheduler.config,
            "room.config": self.room.config,
            "room.gpu_config": self.room.gpu_config,
            "reloader.running": self.reloader.running,
            "states": dict(self.broker.registry.states),
            "max_body_bytes": self.site.max_body_bytes,
            "header_timeout_s": self.site.header_timeout_s,
            "tokens": list(self.resource.tokens),
        }

    def assert_unchanged(self, before: dict[str, Any]) -> None:
        """Nothing changed since ``before``: the same objects, the same states, no reader built."""
        after = self.snapshot_of_parts()
        for key in ("facade.config", "scheduler.config", "room.config", "room.gpu_config",
                    "reloader.running"):  # fmt: skip
            self.assertIs(after[key], before[key], key)
        self.assertEqual(after["states"].keys(), before["states"].keys())
        for name, state in before["states"].items():
            self.assertIs(after["states"][name], state, name)
        for key in ("max_body_bytes", "header_timeout_s", "tokens"):
            self.assertEqual(after[key], before[key], key)
        self.assertEqual(self.readers_for, [])


class RefusedReloadTests(ReloadCase):
    """A file that cannot be used changes nothing."""

    def refused(self, field_name: str | None = None) -> ConfigError:
        before = self.snapshot_of_parts()
        with self.assertRaises(ConfigError) as caught:
            self.reloader.reload()
        if field_name is not None:
            self.assertEqual(caught.exception.field, field_name)
        self.assert_unchanged(before)
        return caught.exception

    def test_not_yaml(self) -> None:
        """A file that is not YAML raises ConfigError and changes nothing."""
        self.write("consumers: [\n")
        self.assertIn("not valid YAML", str(self.refused()))

    def test_bad_value(self) -> None:
        """A file with a bad value (and good changes beside it) changes nothing."""

        def change(data: dict[str, Any]) -> None:
            data["limits"].update(max_body_mib=1, header_timeout_s=1)
            data["scheduler"]["max_queue"] = "many"

        self.write(self.changed(change))
        self.refused("scheduler.max_queue")

    def test_other_cards_refused(self) -> None:
        """Managing other cards (SPEC 9.5) needs a restart: the reload changes nothing."""

        def change(data: dict[str, Any]) -> None:
            data["limits"].update(max_body_mib=1)
            data["gpu"]["devices"] = [0, 1]

        self.write(self.changed(change))
        self.assertIn("only at a restart", str(self.refused("gpu.devices")))

    def test_consumer_moved_to_other_cards_refused(self) -> None:
        """A running consumer's cards change only at a restart (its requests and memory
        are on the old ones); the file changes nothing."""
        name = next(iter(self.config.consumers))

        def on_card(card: int) -> Callable[[dict[str, Any]], None]:
            def change(data: dict[str, Any]) -> None:
                data["gpu"]["devices"] = [0, 1]
                data["consumers"][name]["gpus"] = [card]

            return change

        self.write(self.changed(on_card(0)))
        self.reloader = Reloader(self.path, load_config(self.path), self.parts)
        self.write(self.changed(on_card(1)))
        self.assertIn("only at a restart", str(self.refused(f"consumers.{name}.gpus")))

    def test_missing_file(self) -> None:
        """A file that is gone changes nothing."""
        os.remove(self.path)
        self.assertIn("cannot read the file", str(self.refused()))

    def test_unreadable_token_refuses_everything(self) -> None:
        """A token file that cannot be read refuses the whole reload, good changes included."""

        def change(data: dict[str, Any]) -> None:
            data["scheduler"]["max_queue"] = 2
            data["auth"] = {"token_file": self.dir.child("missing").path}

        self.write(self.changed(change))
        self.refused("auth.token_file")

    def test_empty_token_refuses_everything(self) -> None:
        """An empty token file refuses the whole reload."""
        token = self.token_file(b"\n")
        self.write(self.changed(lambda data: data.update(auth={"token_file": token})))
        self.refused("auth.token_file")

    def test_demo_refuses(self) -> None:
        """The demo (no file) refuses to reload and changes nothing."""
        self.reloader = Reloader(None, self.config, self.parts)
        self.assertIn("demo", str(self.refused()))


class AppliedReloadTests(ReloadCase):
    """A good file is applied to every part."""

    def test_answer(self) -> None:
        """The answer names the consumers added, removed and started afresh."""

        def change(data: dict[str, Any]) -> None:
            consumers = data["consumers"]
            consumers["mvoice"]["url"] = "http://127.0.0.1:8766"
            consumers["whisper"] = {
                "url": "http://127.0.0.1:8080",
                "paths": {"stt": {"method": "POST", "path": "/inference"}},
                "vram_resident_mib": 1500,
            }
            del consumers["ollama"]
            del data["routing"]["llm"]

        self.write(self.changed(change))
        self.assertEqual(
            self.reloader.reload(),
            {"reloaded": True, "added": ["whisper"], "removed": ["ollama"],
             "restarted_state": ["mvoice"], "needs_restart": []},
        )  # fmt: skip
        self.assertEqual(set(self.broker.registry.states), {"mvoice", "whisper"})

    def test_running_configuration_replaced(self) -> None:
        """The facade and the reloader hold the new configuration (a new route here)."""

        def change(data: dict[str, Any]) -> None:
            stt = {"method": "POST", "path": "/api/transcribe"}
            data["consumers"]["mvoice"]["paths"]["stt"] = stt
            data["routing"]["stt"] = "mvoice"

        self.write(self.changed(change))
        self.reloader.reload()
        self.assertIs(self.broker.facade.config, self.reloader.running)
        self.assertEqual(self.broker.facade.config.routing["stt"], "mvoice")
        self.assertEqual(self.reloader.running, load_config(self.path))

    def test_scheduler_and_room_settings(self) -> None:
        """The scheduler and the room maker take the new scheduler and gpu sections."""

        def change(data: dict[str, Any]) -> None:
            data["scheduler"] = {"max_queue": 4, "queue_timeout_s": 30, "free_wait_s": 3}
            data["gpu"]["cushion_mib"] = 512

        self.write(self.changed(change))
        self.reloader.reload()
        expected = SchedulerConfig(max_queue=4, queue_timeout_s=30.0, free_wait_s=3.0)
        self.assertEqual(self.broker.scheduler.config, expected)
        self.assertEqual(self.room.config, expected)
        self.assertEqual(self.room.gpu_config.cushion_mib, 512)

    def test_body_limit(self) -> None:
        """The site takes the new limits.max_body_mib, in bytes."""
        self.write(self.changed(lambda data: data["limits"].update(max_body_mib=2)))
        self.reloader.reload()
        self.assertEqual(self.site.max_body_bytes, 2 * 2**20)

    def test_header_timeout(self) -> None:
        """The site takes the new limits.header_timeout_s (for connections opened after it)."""
        self.write(self.changed(lambda data: data["limits"].update(header_timeout_s=2.5)))
        self.reloader.reload()
        self.assertEqual(self.site.header_timeout_s, 2.5)

    def test_token_set_and_removed(self) -> None:
        """A token file added sets its token; removed again, auth is off (None)."""
        token = self.token_file()
        self.write(self.changed(lambda data: data.update(auth={"token_file": token})))
        self.reloader.reload()
        self.assertEqual(self.resource.tokens, [TOKEN])
        self.write(document())
        self.reloader.reload()
        self.assertEqual(self.resource.tokens, [TOKEN, None])

    def test_unchanged_consumers_keep_state(self) -> None:
        """Consumers the file did not change keep their state objects and what they knew."""
        registry = self.broker.registry
        registry.mark_loaded("mvoice")
        registry.mark_used("mvoice")
        state = registry["mvoice"]
        self.write(self.changed(lambda data: data["scheduler"].update(max_queue=3)))
        self.assertEqual(self.reloader.reload()["restarted_state"], [])
        self.assertIs(registry["mvoice"], state)
        self.assertIs(state.loaded, True)
        self.assertIsNotNone(state.last_used)

    def test_poller_interval(self) -> None:
        """A running poller reads at the new gpu.poll_interval_s, through the same reader."""
        self.poller.startService()
        self.addCleanup(self.poller.stopService)
        self.write(self.changed(lambda data: data["gpu"].update(poll_interval_s=5)))
        self.reloader.reload()
        reads = self.reader.reads
        self.broker.reactor.advance(4.9)
        self.assertEqual(self.reader.reads, reads)
        self.broker.reactor.advance(0.1)
        self.assertEqual(self.reader.reads, reads + 1)
        self.assertEqual(self.readers_for, [])

    def test_gpu_source_change_makes_a_new_reader(self) -> None:
        """A new gpu.source builds a reader for the new configuration, used from then on."""
        self.poller.startService()
        self.addCleanup(self.poller.stopService)
        self.write(self.changed(lambda data: data["gpu"].update(source="nvidia-smi")))
        self.reloader.reload()
        self.assertEqual([c.gpu.source for c in self.readers_for], ["nvidia-smi"])
        self.broker.reactor.advance(2)
        self.assertEqual(self.poller.latest.source, "nvidia-smi")

    def test_prober_takes_the_new_health_section(self) -> None:
        """A running prober probes at once, then at the new health.interval_s."""
        self.broker.prober.startService()
        self.addCleanup(self.broker.prober.stopService)
        self.broker.pump()
        mvoice = self.broker.consumers["mvoice"]
        self.write(self.changed(lambda data: data["health"].update(interval_s=7)))
        self.reloader.reload()
        self.broker.pump()
        self.assertEqual(len(mvoice.uris(b"GET")), 2)
        self.broker.reactor.advance(6.9)
        self.broker.pump()
        self.assertEqual(len(mvoice.uris(b"GET")), 2)
        self.broker.reactor.advance(0.1)
        self.broker.pump()
        self.assertEqual(len(mvoice.uris(b"GET")), 3)

    def test_listen_change_needs_restart(self) -> None:
        """A new listen is not applied but named in needs_restart; the rest is applied."""
        self.write(self.moved_listen())
        self.assertEqual(self.reloader.reload()["needs_restart"], ["listen"])
        self.assertEqual(self.site.max_body_bytes, 4 * 2**20)

    def test_listen_change_still_needs_restart_at_the_next_reload(self) -> None:
        """The daemon still listens where it started after a reload that moved listen: the next
        reload still says a restart is needed."""
        self.write(self.moved_listen())
        self.reloader.reload()
        self.assertEqual(self.reloader.reload()["needs_restart"], ["listen"])

    def test_listen_moved_back_needs_no_restart(self) -> None:
        """listen moved and then back to where the daemon listens needs no restart."""
        self.write(self.moved_listen())
        self.reloader.reload()
        self.write(document())
        self.assertEqual(self.reloader.reload()["needs_restart"], [])

    def test_listen_given_on_the_command_line_never_needs_restart(self) -> None:
        """With --listen overriding the file, the file's listen never applies: no restart."""
        self.reloader = Reloader(self.path, self.config, self.parts, listening_on=None)
        self.write(self.moved_listen())
        self.assertEqual(self.reloader.reload()["needs_restart"], [])

    def moved_listen(self) -> dict[str, Any]:
        def change(data: dict[str, Any]) -> None:
            data["listen"] = "tcp:8771"
            data["limits"]["max_body_mib"] = 4

        return self.changed(change)


class ReloadLoggedTests(ReloadCase):
    """reload_logged: the SIGHUP path, which must never raise."""

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[LogEvent] = []
        observer: ILogObserver = self.logged.append  # type: ignore[assignment]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_bad_file_logged(self) -> None:
        """A bad file is logged as an error with the reason; nothing changes."""
        before = self.snapshot_of_parts()
        self.write("consumers: [\n")
        self.reloader.reload_logged()
        errors = [e for e in self.logged if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("not valid YAML", errors[0]["error"])
        self.assert_unchanged(before)

    def test_good_file_applied(self) -> None:
        """A good file is applied."""
        self.write(self.changed(lambda data: data["limits"].update(max_body_mib=3)))
        self.reloader.reload_logged()
        self.assertEqual(self.site.max_body_bytes, 3 * 2**20)

    def test_unexpected_error_logged(self) -> None:
        """An unexpected exception is logged, not raised."""

        def broken(config: Config, index: int) -> GpuReader:
            raise RuntimeError("reader broke")

        self.reloader = Reloader(self.path, self.config, evolve(self.parts, new_reader=broken))
        self.write(self.changed(lambda data: data["gpu"].update(source="nvml")))
        self.reloader.reload_logged()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


@define
class FakeReactor:
    """Records callFromThread calls instead of running them."""

    scheduled: list[tuple[Callable[..., object], tuple[object, ...]]] = field(factory=list)

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.scheduled.append((f, args))


class SighupTests(ReloadCase):
    """SighupReload: SIGHUP schedules a reload on the reactor thread."""

    def setUp(self) -> None:
        super().setUp()
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.received: list[int] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: self.received.append(signum))
        self.reactor = FakeReactor()
        self.service = SighupReload(self.reloader, self.reactor)

    def start(self) -> None:
        self.service.startService()

        def stop() -> None:
            if self.service.running:
                self.service.stopService()

        self.addCleanup(stop)

    def test_sighup_schedules_the_reload(self) -> None:
        """SIGHUP schedules reload_logged through callFromThread and does nothing more itself."""
        self.start()
        self.write(self.changed(lambda data: data["limits"].update(max_body_mib=3)))
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.reactor.scheduled, [(self.reloader.reload_logged, ())])
        self.assertEqual(self.received, [])
        self.assertIs(self.reloader.running, self.config)
        self.assertEqual(self.site.max_body_bytes, 16 * 2**20)
        f, args = self.reactor.scheduled[0]
        f(*args)
        self.assertEqual(self.site.max_body_bytes, 3 * 2**20)

    def test_each_signal_schedules_one_reload(self) -> None:
        """Two signals schedule two reloads."""
        self.start()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(len(self.reactor.scheduled), 2)

    def test_stop_restores_the_previous_handler(self) -> None:
        """After stopService, SIGHUP reaches the handler installed before, not the reloader."""
        self.start()
        self.service.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.received, [signal.SIGHUP])
        self.assertEqual(self.reactor.scheduled, [])
