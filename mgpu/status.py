# -*- test-case-name: tests.test_api -*-
"""The ``/v1/status`` document, built from memory only (SPEC section 6)."""

from __future__ import annotations

from attrs import frozen

from mgpu.gpu import GpuPoller
from mgpu.registry import Registry
from mgpu.scheduler import GpuScheduler


@frozen
class StatusView:
    """Reads the poller's cached GPU figures, the registry and the scheduler; never waits."""

    gpu: GpuPoller
    registry: Registry
    scheduler: GpuScheduler

    def document(self) -> dict[str, object]:
        return {
            "gpu": self.gpu.latest.to_json(),
            "consumers": self.registry.to_json(),
            "scheduler": self.scheduler.to_json(),
        }
