"""What the tests compare against: the error schema, the sim's body pattern, a slow reader."""

from __future__ import annotations

import socket
import time
from typing import Final

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from tests.integration.harness import RawConnection, reactor

#: The keys of every error the broker produces itself (SPEC section 5).
ERROR_KEYS: Final = {"error", "message", "consumer", "retryable"}

_BLOCK: Final = 64 * 1024
_PATTERN: Final = bytes(range(251)) * (2 * _BLOCK // 251 + 2)


def pattern(offset: int, length: int) -> bytes:
    """Bytes ``offset`` to ``offset + length`` of ``mgpu.sim``'s ``sized-N`` bodies (i % 251)."""
    out = bytearray()
    while length > 0:
        n = min(length, _BLOCK)
        start = offset % 251
        out += _PATTERN[start : start + n]
        offset += n
        length -= n
    return bytes(out)


def matches_pattern(offset: int, data: bytes) -> bool:
    """Whether ``data`` is the pattern at ``offset``, without building a copy of it."""
    view = memoryview(data)
    for i in range(0, len(data), _BLOCK):
        piece = view[i : i + _BLOCK]
        start = (offset + i) % 251
        if piece != _PATTERN[start : start + len(piece)]:
            return False
    return True


class SlowReader(RawConnection):
    """Reads one response at ``rate_bytes_s`` at most, counting and checking the body.

    Nothing is kept: the body is counted and compared with the pattern as it
    arrives.  The transport is paused whenever the reader is ahead of its
    rate, and its receive buffer is small, so the server side has to hold
    back instead of pushing the body into the client's kernel buffers.
    """

    def __init__(self, rate_bytes_s: float) -> None:
        super().__init__()
        self.keep = False
        self.rate = rate_bytes_s
        self.head = b""
        self.status: int | None = None
        self.content_length: int | None = None
        self.received = 0
        self.mismatch_at: int | None = None
        self.started = 0.0
        self.elapsed = 0.0
        self._resume: IDelayedCall | None = None

    def connectionMade(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.started = time.monotonic()

    def dataReceived(self, data: bytes) -> None:
        if self.status is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ")[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    self.content_length = int(value.strip())
        if data:
            if self.mismatch_at is None and not matches_pattern(self.received, data):
                self.mismatch_at = self.received
            self.received += len(data)
        if self.content_length is not None and self.received >= self.content_length:
            self.elapsed = time.monotonic() - self.started
            assert self.transport is not None
            self.transport.loseConnection()
            return
        ahead = self.started + self.received / self.rate - time.monotonic()
        if ahead > 0.005 and self._resume is None:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self._resume = reactor.callLater(ahead, self._go_on)

    def _go_on(self) -> None:
        self._resume = None
        if self.transport is not None and self.reason is None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        if not self.elapsed:
            self.elapsed = time.monotonic() - self.started
        super().connectionLost(reason)
