# -*- test-case-name: tests.test_reload -*-
"""Reloading the configuration file: on ``SIGHUP`` and ``POST /v1/admin/reload``.

The new file is read and checked in full first (the token file too); on any
error nothing changes, and the reason is logged and returned. Otherwise each
part takes its new settings: consumers that did not change keep their state,
and requests already admitted or queued end as they began. ``listen`` cannot
move under a running server: a change to it waits for the next restart.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

from attrs import Factory, define, field, frozen
from twisted.application.service import Service
from twisted.logger import Logger

from mgpu.cards import Card
from mgpu.config import Config, ConfigError, load_config, read_token
from mgpu.facade import Facade
from mgpu.gpu import GpuReader
from mgpu.registry import HealthProber, Registry
from mgpu.scheduler import Leases

log = Logger()


class _Tokened(Protocol):
    def set_token(self, token: bytes | None) -> None: ...


class _Limited(Protocol):
    max_body_bytes: int
    header_timeout_s: float


@frozen
class LiveParts:
    """The parts of a running daemon that take a new configuration."""

    facade: Facade
    registry: Registry
    scheduler: Leases
    cards: Sequence[Card]
    prober: HealthProber
    site: _Limited
    resource: _Tokened
    new_reader: Callable[[Config, int], GpuReader]

    def apply(self, old: Config, new: Config, token: bytes | None) -> list[str]:
        """Switch every part to ``new``; returns the consumers whose state started afresh."""
        # What may fail comes first, so that a failure changes nothing.
        gpu_moved = _reading_part(old) != _reading_part(new)
        readers = {card.index: self.new_reader(new, card.index) for card in self.cards
                   if gpu_moved}  # fmt: skip
        fresh = self.registry.reconfigure(new.consumers)
        self.facade.config = new
        self.scheduler.config = new.scheduler
        for card in self.cards:
            card.room.config = new.scheduler
            card.room.gpu_config = new.gpu
            card.poller.reconfigure(readers.get(card.index), new.gpu.poll_interval_s)
        self.site.max_body_bytes = new.limits.max_body_mib * 2**20
        self.site.header_timeout_s = new.limits.header_timeout_s
        self.resource.set_token(token)
        self.prober.reconfigure(new.health)  # last: it probes the consumers now
        return fresh


def _same_cards(path: str, running: Config, new: Config) -> None:
    """Refuse a reload that moves cards (SPEC 9.5): the managed ones, or a running
    consumer's, whose requests and memory are on the old cards until a restart."""
    if new.gpu.cards != running.gpu.cards:
        why = "the cards managed change only at a restart (SPEC 9.5)"
        raise ConfigError(path, "gpu.devices", why)
    for name, consumer in new.consumers.items():
        before = running.consumers.get(name)
        if before is not None and before.gpus != consumer.gpus:
            why = "a consumer's cards change only at a restart (SPEC 9.5)"
            raise ConfigError(path, f"consumers.{name}.gpus", why)


def _reading_part(config: Config) -> tuple[object, ...]:
    gpu = config.gpu
    return (gpu.source, gpu.index, gpu.nvidia_smi)


@define
class Reloader:
    """Re-reads ``path`` and applies it; ``running`` is the configuration in force.

    ``listening_on`` is the file's ``listen`` the server started with (None when
    ``--listen`` overrode it, and the file's ``listen`` never applies).
    """

    path: str | None
    running: Config
    parts: LiveParts
    listening_on: str | None = field(
        default=Factory(lambda self: self.running.listen, takes_self=True)
    )

    def reload(self) -> dict[str, object]:
        """Apply the file now; raises ``ConfigError`` (and changes nothing) if it is bad."""
        try:
            if self.path is None:
                raise ConfigError("--demo", "", "the demo has no configuration file to reload")
            new = load_config(self.path)
            token = read_token(new.auth.token_file, self.path)
            _same_cards(self.path, self.running, new)
        except ConfigError as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            raise
        fresh = self.parts.apply(self.running, new, token)
        moved = self.listening_on is not None and new.listen != self.listening_on
        restart = ["listen"] if moved else []
        old_names, new_names = set(self.running.consumers), set(new.consumers)
        self.running = new
        answer = {
            "reloaded": True,
            "added": sorted(new_names - old_names),
            "removed": sorted(old_names - new_names),
            "restarted_state": sorted(set(fresh) & old_names),
            "needs_restart": restart,
        }
        log.info("configuration reloaded from {path}: {answer}", path=self.path, answer=answer)
        if restart:
            log.warn(
                "listen changed in {path}: it takes effect at the next restart", path=self.path
            )
        return answer

    def reload_logged(self) -> None:
        """``reload``, with a bad file logged rather than raised (the SIGHUP path)."""
        try:
            self.reload()
        except ConfigError:
            pass  # reload logged why
        except Exception:
            log.failure("reload failed; the running configuration stays")


class SighupReload(Service):
    """``SIGHUP`` reloads, on the reactor thread (the handler only schedules it)."""

    def __init__(self, reloader: Reloader, reactor: Any) -> None:
        self._reloader = reloader
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._reloader.reload_logged)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
