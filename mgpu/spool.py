# -*- test-case-name: tests.test_spool -*-
"""An answer written to a client at the client's pace, its unread part spooled.

A scheduled consumer's answer must be read as fast as the consumer sends it:
the GPU lease is released when the answer is complete, and a client that
reads slowly (or not at all) must not hold the GPU meanwhile.  So the relay
registers a ``ClientSpool`` as the client's producer instead of the
consumer's connection: while the client keeps up, each chunk is written
through at once (streaming stays streaming); while the client's socket is
full, chunks are kept, in memory up to ``memory_bytes`` and in an unlinked
temporary file past that, and written out as the client takes them.
"""

from __future__ import annotations

import tempfile
from typing import IO, Final

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

#: What one request may keep in memory before its unread answer goes to a file.
MEMORY_BYTES: Final = 2**20
#: How much is read back from the spool for one write to the client.
READ_BYTES: Final = 64 * 1024


@implementer(IPushProducer)
class ClientSpool:
    """The client's producer for one answer: writes through, or keeps what cannot go yet."""

    def __init__(self, request: Request, memory_bytes: int = MEMORY_BYTES) -> None:
        self._request = request
        self._memory_bytes = memory_bytes
        self._paused = False
        self._stopped = False
        self._spool: IO[bytes] | None = None
        self._written = 0  # bytes put in the spool
        self._read = 0  # bytes taken back out of it
        self._ending: Deferred[None] | None = None
        self.peak_bytes = 0  # the most that waited at once, for tests and logs
        request.registerProducer(self, True)

    @property
    def pending(self) -> int:
        """Bytes the client has not been given yet."""
        return self._written - self._read

    def write(self, data: bytes) -> None:
        """Give ``data`` to the client now if it takes it, else keep it in order."""
        if self._stopped or not data:
            return
        if not self._paused and not self.pending:
            self._request.write(data)
            return
        spool = self._spool
        if spool is None:
            # Closed when drained or dropped, not within a block: it outlives this call.
            spool = self._spool = tempfile.SpooledTemporaryFile(max_size=self._memory_bytes)  # noqa: SIM115
        spool.seek(self._written)
        spool.write(data)
        self._written += len(data)
        self.peak_bytes = max(self.peak_bytes, self.pending)

    def finish(self) -> Deferred[None]:
        """The answer is complete: fires once the client has been given all of it.

        Fails with ``CancelledError`` if the client leaves first, or with the
        error ``abort`` is given.
        """
        if self._stopped:
            return succeed(None)
        if not self.pending:
            self._release()
            return succeed(None)
        self._ending = Deferred()
        return self._ending

    def abort(self, reason: Exception) -> None:
        """Give up: drop what is kept; ``finish``'s Deferred fails with ``reason``."""
        self._stop(reason)

    # -- IPushProducer, for the client's connection -------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        self._stop(CancelledError())

    # -- inside ------------------------------------------------------------------

    def _drain(self) -> None:
        """Write kept bytes until the client pauses again or none are left."""
        while not self._paused and not self._stopped and self.pending:
            assert self._spool is not None
            self._spool.seek(self._read)
            chunk = self._spool.read(min(READ_BYTES, self.pending))
            self._read += len(chunk)
            self._request.write(chunk)
        if not self.pending and self._spool is not None:
            self._spool.close()  # a file goes with it: it was never linked
            self._spool = None
            self._written = self._read = 0
            if self._ending is not None:
                ending, self._ending = self._ending, None
                self._release()
                ending.callback(None)

    def _stop(self, reason: Exception) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._release()
        if self._ending is not None:
            ending, self._ending = self._ending, None
            ending.errback(reason)

    def _release(self) -> None:
        """No longer the client's producer (unless the client is already gone)."""
        if getattr(self._request, "channel", None) is not None and self._request.producer is self:
            self._request.unregisterProducer()
