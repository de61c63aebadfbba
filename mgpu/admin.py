# -*- test-case-name: tests.test_admin -*-
"""The admin routes: load or unload a consumer now, and reload the configuration.

A load or an unload waits for the GPU lease like any request, so it never
runs beside another consumer's work. A load goes through the lease's own
preparation (room is made first); an unload holds the lease alone and makes
no room. A load counts as the consumer's use (the operator wants it resident,
so it is not the first to go); an unload does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from attrs import define
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError
from mgpu.events import EventBus
from mgpu.registry import Registry
from mgpu.room import Room
from mgpu.scheduler import Lease, Leases

T = TypeVar("T")

log = Logger()


@define
class Admin:
    """What ``/v1/admin/consumers/<name>/{load,unload}`` do."""

    registry: Registry
    scheduler: Leases
    room: Room
    control: ConsumerControl
    events: EventBus

    def _known(self, name: str) -> None:
        if name not in self.registry.states:
            raise BrokerError("not_found", f"no consumer {name!r}")

    async def load(self, name: str) -> dict[str, object]:
        """Make room for ``name`` and load it, unless the broker knows it is loaded."""
        self._known(name)
        config = self.registry[name].config
        if config.load is None:
            raise BrokerError("bad_request", f"{name} has no load route", name)
        return await self._under_lease(name, self._load_job(name), exclusive=False)

    def _load_job(self, name: str) -> Callable[[Lease], Deferred[dict[str, object]]]:
        async def job() -> dict[str, object]:
            # The lease's preparation ran first: if it knew the consumer was
            # unloaded, that load is done. If it did not know, load now.
            if self.registry[name].loaded is not True:
                await self.room.load(name, "admin")
            return {"consumer": name, "loaded": True}

        return lambda lease: _finish_anyway(lease, Deferred.fromCoroutine(job()))

    async def unload(self, name: str) -> dict[str, object]:
        """Unload ``name`` through its route; ``vram_managed`` consumers are refused."""
        self._known(name)
        config = self.registry[name].config
        if config.vram_managed:
            raise BrokerError("bad_request", f"{name} manages its own memory: not unloaded", name)
        if config.unload is None:
            raise BrokerError("bad_request", f"{name} has no unload route", name)

        async def job() -> dict[str, object]:
            try:
                await self.control.unload(config)
            except BrokerError as e:
                if e.code == "consumer_unreachable":
                    self.registry.mark_unreachable(name, e.message)
                raise
            self.registry.mark_unloaded(name)
            self.events.publish("unload", consumer=name, reason="admin")
            return {"consumer": name, "loaded": False}

        def unloading(lease: Lease) -> Deferred[dict[str, object]]:
            lease.reached_consumer = False  # an unload is not a use: LRU order unchanged
            return _finish_anyway(lease, Deferred.fromCoroutine(job()))

        return await self._under_lease(name, unloading, exclusive=True)

    async def _under_lease(
        self,
        name: str,
        job: Callable[[Lease], Deferred[dict[str, object]]],
        exclusive: bool,
    ) -> dict[str, object]:
        return await self.scheduler.run(
            name, job, exclusive=exclusive, prepare=not exclusive, count=False
        )


def _finish_anyway(lease: Lease, work: Deferred[T]) -> Deferred[T]:
    """``work``'s outcome, but a caller who leaves (cancels) does not stop it.

    A load or unload cut off half-way would leave the consumer in a state
    the broker cannot know; it goes on, holding the lease until it ends.
    """
    lease.hold_until(work)
    outcome: Deferred[T] = Deferred()

    def settle(result: object) -> None:
        if not outcome.called:
            outcome.callback(result)  # type: ignore[arg-type]  # a Failure errbacks
        elif isinstance(result, Failure):  # the caller left: nobody else will say it
            log.failure("admin work went on after its caller left, and failed", result)

    work.addBoth(settle)
    return outcome
