# -*- test-case-name: tests.test_api -*-
"""The ``/v1/status`` document, built from memory only (SPEC section 6)."""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from mgpu.cards import Card, cards_of
from mgpu.gpu import GpuPoller
from mgpu.memory import MemoryWatch
from mgpu.registry import Registry
from mgpu.scheduler import Leases
from mgpu.upstream import UpstreamClient


@frozen
class StatusView:
    """Reads the poller's cached GPU figures, the registry and the scheduler; never waits."""

    gpu: GpuPoller  # the first card's
    registry: Registry
    scheduler: Leases
    #: The relay's client, which knows the consumers caught sending stray bytes.
    upstream: UpstreamClient | None = None
    #: What holds the card (SPEC 9.3); None: not looked at (older tests).
    watch: MemoryWatch | None = None
    #: Every managed card (SPEC 9.5), for ``gpus``; empty: none listed (older tests).
    cards: Sequence[Card] = ()

    def document(self) -> dict[str, object]:
        consumers = self.registry.to_json()
        for name, entry in consumers.items():
            entry["keepalive"] = self._keepalive(name)
            state = self.registry[name]
            load_s = state.load_times.mean
            entry["load_s"] = None if load_s is None else round(load_s, 3)
            entry["idle_unload_s"] = state.config.idle_unload_s
            entry["preload"] = state.config.preload
            if self.cards:
                entry["gpus"] = list(cards_of(self.registry, name, self.cards[0].index))
            if self.watch is not None:
                entry["learned_mib"] = self.watch.learned.get(name)
                if state.attribution is not None:
                    entry["memory"] = self.watch.now(state.attribution).to_json()
        if self.cards:
            first = self.cards[0].index
            gpus = [card.to_json(self.registry, first) for card in self.cards]
            gpu = {key: gpus[0][key] for key in (*self.gpu.latest.to_json(), "other_mib", "other")}
            return {
                "gpu": gpu,
                "gpus": gpus,
                "consumers": consumers,
                "scheduler": self.scheduler.to_json(),
            }
        gpu = self.gpu.latest.to_json()
        if self.watch is not None:
            other_mib, other = self.watch.others(self.registry.attributed_pids())
            gpu["other_mib"], gpu["other"] = other_mib, [p.to_json() for p in other]
        return {"gpu": gpu, "consumers": consumers, "scheduler": self.scheduler.to_json()}

    def _keepalive(self, name: str) -> str:
        """``off`` (the default), ``on``, or ``suspended``: caught sending stray bytes."""
        config = self.registry[name].config
        if not config.keepalive:
            return "off"
        if self.upstream is not None and self.upstream.suspended(config.url):
            return "suspended"
        return "on"
