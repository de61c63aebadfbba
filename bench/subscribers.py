"""Many ``/v1/events`` subscribers in one process, each reading its stream.

Run as ``python -m bench.subscribers --port P --count N --out FILE``: it opens
N streams on one asyncio loop, prints ``ready N`` on stdout once each has its
opening (``retry:``), and reads every stream until stdin reaches EOF or
SIGTERM comes (the benchmark holds stdin, so it never outlives it). Then it
writes FILE: for each event id, how many streams heard it, the first and the
last arrival (wall clock, ns, to compare with the event's own ``at``), and the
event's kind and ``at``; plus the ``dropped`` messages (slow readers) seen.

A process of its own, not a thread of the benchmark: every event means a read
on each of N sockets, which in the benchmark's process would hold the GIL
against the client whose swaps are being counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
#: Streams opened at once: well within the daemon's listen backlog of 1,024.
CONNECT_BATCH = 200


@dataclass
class Heard:
    """One event across every stream: how many heard it, first and last (ns)."""

    kind: str
    at: str
    streams: int = 0
    first_ns: int = 0
    last_ns: int = 0


@dataclass
class Record:
    """What every stream heard, by event id."""

    events: dict[int, Heard] = field(default_factory=dict)
    dropped: int = 0  # streams ended by the daemon for reading too slowly
    closed: int = 0  # streams that ended before the run did (the dropped ones too)

    def heard(self, message: bytes, now_ns: int) -> None:
        """One SSE message (its lines, without the blank line that ends it)."""
        fields = dict(line.partition(b": ")[::2] for line in message.split(b"\n"))
        if fields.get(b"event") == b"dropped":
            self.dropped += 1
        raw_id = fields.get(b"id")
        if raw_id is None:
            return  # the opening retry:, a keep-alive comment
        event_id = int(raw_id)
        heard = self.events.get(event_id)
        if heard is None:
            data = json.loads(fields.get(b"data", b"{}"))
            heard = self.events[event_id] = Heard(str(data.get("kind")), str(data.get("at")))
            heard.first_ns = now_ns
        heard.streams += 1
        heard.last_ns = now_ns

    def to_json(self) -> dict[str, object]:
        return {
            "dropped": self.dropped,
            "closed": self.closed,
            "events": {str(i): vars(h) for i, h in sorted(self.events.items())},
        }


class _Stream(asyncio.Protocol):
    """One subscriber: sends the GET, then reads the chunked body into SSE messages."""

    def __init__(self, request: bytes, record: Record, opened: asyncio.Future[None]) -> None:
        self.request = request
        self.record = record
        self.opened = opened
        self.raw = bytearray()  # as received: the head, then chunk framing and data
        self.text = bytearray()  # the body, unchunked: SSE messages
        self.in_body = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now_ns = time.time_ns()
        self.raw += data
        if not self.in_body and not self._head():
            return
        self._unchunk()
        while (end := self.text.find(b"\n\n")) >= 0:
            message = bytes(self.text[:end])
            del self.text[: end + 2]
            if message.startswith(b"retry: "):
                if not self.opened.done():
                    self.opened.set_result(None)
            else:
                self.record.heard(message, now_ns)

    def _head(self) -> bool:
        """Past the answer's head (a 200): whether the body has begun."""
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        if not self.raw.startswith(b"HTTP/1.1 200") and not self.opened.done():
            self.opened.set_exception(RuntimeError(bytes(self.raw[:200]).decode("latin-1")))
        self.in_body = True
        del self.raw[: end + 4]
        return True

    def _unchunk(self) -> None:
        """Move each complete chunk's data from ``raw`` to ``text``."""
        while (eol := self.raw.find(b"\r\n")) >= 0:
            size = int(bytes(self.raw[:eol]).split(b";", 1)[0], 16)
            if len(self.raw) < eol + 2 + size + 2:
                return
            self.text += self.raw[eol + 2 : eol + 2 + size]
            del self.raw[: eol + 2 + size + 2]

    def connection_lost(self, exc: Exception | None) -> None:
        self.record.closed += 1
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("the stream closed before it opened"))


def _factory(request: bytes, record: Record, opened: asyncio.Future[None]) -> Callable[[], _Stream]:
    """The protocol factory of one stream, bound to its own ``opened``."""
    return lambda: _Stream(request, record, opened)


async def subscribe(port: int, count: int, out: Path) -> None:
    """Open ``count`` streams, say ``ready``, read until told to stop, write ``out``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stdin_read() -> None:
        if not os.read(0, 4096):  # EOF: the benchmark is done with us
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, stdin_read)
    request = f"GET /v1/events HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    record = Record()
    transports = []
    for start in range(0, count, CONNECT_BATCH):
        opened = [loop.create_future() for _ in range(start, min(count, start + CONNECT_BATCH))]
        made = await asyncio.gather(
            *(loop.create_connection(_factory(request, record, f), HOST, port) for f in opened)
        )
        transports += [t for t, _ in made]
        await asyncio.gather(*opened)
    print(f"ready {len(transports)}", flush=True)
    await stop.wait()
    out.write_text(json.dumps(record.to_json()))
    for transport in transports:
        transport.abort()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True, help="the daemon's port")
    parser.add_argument("--count", type=int, required=True, help="how many streams")
    parser.add_argument("--out", type=Path, required=True, help="where the record goes (JSON)")
    args = parser.parse_args(argv)
    asyncio.run(subscribe(args.port, args.count, args.out))


if __name__ == "__main__":
    main()
