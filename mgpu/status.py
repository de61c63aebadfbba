# -*- test-case-name: tests.test_api -*-
"""The ``/v1/status`` document, built from memory only (SPEC section 6)."""

from __future__ import annotations

from attrs import frozen

from mgpu.gpu import GpuPoller
from mgpu.memory import MemoryWatch
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler
from mgpu.upstream import UpstreamClient


@frozen
class StatusView:
    """Reads the poller's cached GPU figures, the registry and the scheduler; never waits."""

    gpu: GpuPoller
    registry: Registry
    scheduler: GpuScheduler
    #: The relay's client, which knows the consumers caught sending stray bytes.
    upstream: UpstreamClient | None = None
    #: What holds the card (SPEC 9.3); None: not looked at (older tests).
    watch: MemoryWatch | None = None

    def document(self) -> dict[str, object]:
        consumers = self.registry.to_json()
        for name, entry in consumers.items():
            entry["keepalive"] = self._keepalive(name)
            state = self.registry[name]
            load_s = state.load_times.mean
            entry["load_s"] = None if load_s is None else round(load_s, 3)
            entry["idle_unload_s"] = state.config.idle_unload_s
            entry["preload"] = state.config.preload
            if self.watch is not None:
                entry["learned_mib"] = self.watch.learned.get(name)
                if state.attribution is not None:
                    entry["memory"] = self.watch.now(state.attribution).to_json()
        gpu = self.gpu.latest.to_json()
        if self.watch is not None:
            other_mib, other = self.watch.others(self.registry.attributed_pids())
            gpu["other_mib"], gpu["other"] = other_mib, [p.to_json() for p in other]
        return {
            "gpu": gpu,
            "consumers": consumers,
            "scheduler": self.scheduler.to_json(),
        }

    def _keepalive(self, name: str) -> str:
        """``off`` (the default), ``on``, or ``suspended``: caught sending stray bytes."""
        config = self.registry[name].config
        if not config.keepalive:
            return "off"
        if self.upstream is not None and self.upstream.suspended(config.url):
            return "suspended"
        return "on"
