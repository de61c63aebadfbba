"""Many HTTP connections from one process: the scale benchmark's clients.

The blocking client (``bench.client``) runs one thread per connection, which
is fine for 16 connections and not for 10,000: a thread's stack and a GIL
hand-off per answer each. Here one asyncio event loop holds every connection,
each an ``asyncio.Protocol`` that parses just enough HTTP/1.1 for the
daemon's answers (status line, ``Content-Length`` or chunked framing).

- ``Crowd``: N keep-alive connections, each with one request always
  outstanding: the request is sent again as soon as its answer is in, so the
  daemon's queue stays N deep. The loop runs in a thread of its own; ``grow``
  adds connections while the others keep going.
- ``burst``: N connections at once, one request each (``Connection: close``),
  and what came back on each: a status and the error code of a JSON error
  body, or no HTTP answer at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from dataclasses import dataclass

#: Connections being opened at once while a crowd grows: the daemon's listen
#: backlog is 1,024, and a connect past it waits a second for its SYN to be sent again.
CONNECT_BATCH = 256


def take_answer(buf: bytearray) -> tuple[int, bytes] | None:
    """Remove the first complete answer from ``buf``: (status, body); None if incomplete.

    The body is framed by ``Content-Length`` or chunked (the daemon's own
    errors on a relayed request); an answer with neither has no body.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
    framed = _chunked(buf, end + 4) if chunked else _sized(buf, end + 4, length)
    if framed is None:
        return None
    body, used = framed
    del buf[:used]
    return int(head[9:12]), body


def _sized(buf: bytearray, start: int, length: int) -> tuple[bytes, int] | None:
    """A body of ``length`` bytes from ``start``, and where it ends; None if incomplete."""
    if len(buf) < start + length:
        return None
    return bytes(buf[start : start + length]), start + length


def _chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body from ``start``, and where it ends (trailers included); None if incomplete."""
    parts: list[bytes] = []
    pos = start
    while (eol := buf.find(b"\r\n", pos)) >= 0:
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return None if end < 0 else (b"".join(parts), end + 4)
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return None
        parts.append(bytes(buf[eol + 2 : eol + 2 + size]))
    return None


def error_code(body: bytes) -> str | None:
    """The daemon's error code (``{"error": ...}``) in an answer body, if it has one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    code = doc.get("error") if isinstance(doc, dict) else None
    return code if isinstance(code, str) else None


class _Repeater(asyncio.Protocol):
    """One connection with one request outstanding: each answer sends the next request."""

    def __init__(self, crowd: Crowd) -> None:
        self.crowd = crowd
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.crowd.raw)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (answer := take_answer(self.buf)) is not None:
            self.crowd.answers[answer[0]] += 1
            assert self.transport is not None
            self.transport.write(self.crowd.raw)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.crowd.closing:
            self.crowd.lost += 1


class Crowd:
    """Keep-alive connections that each keep one request outstanding, on a loop in a thread."""

    def __init__(self, host: str, port: int, raw: bytes) -> None:
        self.host = host
        self.port = port
        self.raw = raw
        self.answers: Counter[int] = Counter()  # by status, since the start
        self.lost = 0  # connections the server closed
        self.closing = False
        self._open: list[_Repeater] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="crowd", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return len(self._open)

    def grow(self, size: int, timeout_s: float = 120.0) -> None:
        """Open connections (each sends its request at once) until there are ``size``."""
        future = asyncio.run_coroutine_threadsafe(self._grow(size), self._loop)
        future.result(timeout_s)

    async def _grow(self, size: int) -> None:
        while len(self._open) < size:
            batch = min(CONNECT_BATCH, size - len(self._open))
            opened = await asyncio.gather(*(self._connect() for _ in range(batch)))
            self._open.extend(opened)

    async def _connect(self) -> _Repeater:
        _, protocol = await self._loop.create_connection(
            lambda: _Repeater(self), self.host, self.port
        )
        return protocol

    def close(self) -> None:
        """Drop every connection at once (their queued requests leave the queue) and stop."""
        self.closing = True

        def drop() -> None:
            for repeater in self._open:
                if repeater.transport is not None:
                    repeater.transport.abort()
            self._open.clear()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(drop)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30.0)
        if not self._thread.is_alive():
            self._loop.close()


@dataclass(frozen=True)
class Outcome:
    """What one client of a burst got: a status and error code, or ``failure`` instead."""

    status: int | None = None
    error: str | None = None  # the daemon's error code, for an error answer
    failure: str | None = None  # no HTTP answer: why


async def _one(host: str, port: int, raw: bytes, timeout_s: float) -> Outcome:
    """One connection, one request, the whole answer (the server closes after it)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            data = bytearray(await reader.read())
    except TimeoutError:
        return Outcome(failure="no answer within the timeout")
    except OSError as e:
        return Outcome(failure=f"{type(e).__name__}: {e}")
    finally:
        if writer is not None:
            writer.close()
    answer = take_answer(data)
    if answer is None:
        return Outcome(failure=f"no complete answer ({len(data)} bytes)")
    status, body = answer
    return Outcome(status, error_code(body) if status >= 400 else None)


def burst(host: str, port: int, raw: bytes, clients: int, timeout_s: float) -> list[Outcome]:
    """``clients`` connections opened at once, each sending ``raw`` (``Connection: close``)."""

    async def all_at_once() -> list[Outcome]:
        return list(
            await asyncio.gather(*(_one(host, port, raw, timeout_s) for _ in range(clients)))
        )

    with contextlib.closing(asyncio.new_event_loop()) as loop:
        return loop.run_until_complete(all_at_once())
