"""A tiny stand-in consumer: ``POST /api/synthesize`` and ``GET /api/health``.

Run as ``python -m bench.consumer [--port N]``; it prints its port on stdout
once listening, and exits on SIGTERM/SIGINT or when its stdin reaches EOF (the
benchmark holds the other end, so the consumer never outlives it).

Why blocking sockets, one thread per connection, rather than twisted.web,
http.server or an asyncio ``Protocol``: the consumer sits under all three legs
and the benchmark subtracts its time out, so it must be cheap and, above all,
steady. A thread blocked in ``recv`` answers with one ``recv`` and one
``sendall`` and no event-loop turn; measured on this 2-core machine with the
benchmark's client, it answers at p50 ~22 us / p99 ~40 us where an asyncio
``Protocol`` server gives ~47 / ~120 us (twisted.web's Request and Site cost
several times more). The few connections a run opens (the client's, nginx's
and the broker's pools, health probes) each get a thread; only one is busy at
a time, so the GIL costs nothing here. It is a separate process so it never
competes with the client for the GIL. It parses just enough HTTP/1.1 for a
proxy's requests: ``Content-Length`` and chunked bodies, pipelining,
``Connection: close`` and HTTP/1.0.

Options for the other benchmarks (the latency benchmark uses none):

- ``--work-ms MS``: each synthesize request sleeps MS in its thread before it
  is answered, as a GPU job would (the throughput benchmark: 2 ms). ``GET
  /api/stats`` tells how many jobs ran, the most that ran at once (which
  must stay 1 behind a broker with ``max_concurrency: 1``), and each idle
  time since the previous call: from a job's answer sent to the next job's
  request received, the hand-off as the GPU sees it.
- ``--loaded yes|no``: the consumer reports ``loaded`` in its health answer,
  starts as told, has ``POST /api/unload`` and ``POST /api/load`` (answered
  at once) and loads on its first synthesize request when not loaded (the
  eviction and scale benchmarks).
- ``--gpu-state FILE --vram-mib MIB`` (with ``--loaded``): the consumer holds
  MIB in the stand-in nvidia-smi's state file while loaded (``mgpu.sim``'s
  ``FileLedger``), written before the answer to a load or unload, so the
  daemon's next fresh reading sees it (the scale benchmark's swaps).
- ``--events``: print ``<route> <CLOCK_MONOTONIC ns>`` on stdout, after the
  port line, for each synthesize, load or unload request, timed when its last bytes
  were received. CLOCK_MONOTONIC is system-wide, so the benchmark compares
  these times with its own ``time.monotonic_ns()``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Protocol

#: The JSON answer to every synthesize request: small, like a real TTS job's metadata.
SYNTH_BODY = json.dumps(
    {"ok": True, "audio": "/audio/bench.wav", "duration_s": 1.25, "sample_rate": 24000},
    separators=(",", ":"),
).encode()
HEALTH_BODY = b'{"status":"ok"}'

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


def _response(status: bytes, body: bytes, *, close: bool = False) -> bytes:
    head = [
        b"HTTP/1.1 " + status,
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
    ]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


SYNTHESIZE = (b"POST", b"/api/synthesize")
UNLOAD = (b"POST", b"/api/unload")
LOAD = (b"POST", b"/api/load")
HEALTH = (b"GET", b"/api/health")
STATS = (b"GET", b"/api/stats")


def _health(body: bytes) -> dict[tuple[bytes, bytes], bytes]:
    return {
        HEALTH: _response(b"200 OK", body),
        (b"HEAD", HEALTH[1]): _response(b"200 OK", body)[: -len(body)],
    }


_ROUTES = {SYNTHESIZE: _response(b"200 OK", SYNTH_BODY), **_health(HEALTH_BODY)}
_LOADED_HEALTH = {
    loaded: _health(json.dumps({"status": "ok", "loaded": loaded}).encode())
    for loaded in (True, False)
}
_DONE = _response(b"200 OK", b'{"ok":true}')
_NOT_FOUND = _response(b"404 Not Found", b'{"error":"not_found"}')
_NOT_ALLOWED = _response(b"405 Method Not Allowed", b'{"error":"method_not_allowed"}')
_BAD = _response(b"400 Bad Request", b'{"error":"bad_request"}', close=True)


class _Incomplete(Exception):
    """More bytes are needed before the request can be answered."""


class _Malformed(Exception):
    """The request cannot be parsed; answer 400 and close."""


def _chunked_end(buf: bytearray, start: int) -> int:
    """The offset just past a chunked body that begins at ``start``."""
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        try:
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        except ValueError:
            raise _Malformed from None
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # trailers, if any, end with an empty line
            if end < 0:
                raise _Incomplete
            return end + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            raise _Incomplete
        if pos - start > MAX_BODY:
            raise _Malformed


def parse_one(buf: bytearray) -> tuple[int, tuple[bytes, bytes], bool]:
    """Parse the first request in ``buf``: (bytes it used, (method, path), close after it)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise _Malformed
        raise _Incomplete
    lines = bytes(buf[:end]).split(b"\r\n")
    try:
        method, target, version = lines[0].split(b" ")
    except ValueError:
        raise _Malformed from None
    length = 0
    chunked = False
    close = version != b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise _Malformed from None
            if not 0 <= length <= MAX_BODY:
                raise _Malformed
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            if token == b"close":
                close = True
            elif token == b"keep-alive":
                close = False
    body_start = end + 4
    if chunked:
        consumed = _chunked_end(buf, body_start)
    else:
        consumed = body_start + length
        if consumed > len(buf):
            raise _Incomplete
    return consumed, (method, target.split(b"?", 1)[0]), close


class Ledger(Protocol):
    """Where a loaded model's memory shows: ``mgpu.sim.gpu.FileLedger``."""

    def allocate(self, owner: str, mib: int) -> None: ...

    def release(self, owner: str) -> None: ...


class Consumer:
    """What this process answers, and the state its options give it."""

    def __init__(
        self,
        work_s: float = 0.0,
        loaded: bool | None = None,
        events: bool = False,
        ledger: Ledger | None = None,
        vram_mib: int = 0,
    ):
        self.work_s = work_s
        self.events = events
        self.routes = dict(_ROUTES)
        self.loaded = loaded
        self.ledger = ledger
        self.vram_mib = vram_mib
        self.owner = f"bench-consumer-{os.getpid()}"
        if loaded is not None:
            self.routes[UNLOAD] = self.routes[LOAD] = _DONE
            self.routes.update(_LOADED_HEALTH[loaded])
            self._hold(loaded)
        self.paths = {path for _, path in self.routes} | {STATS[1]}
        self.busy = work_s > 0 or events or loaded is not None
        self._lock = threading.Lock()
        self.jobs = self.running = self.most_running = 0
        self._answered_ns: int | None = None  # when the last job's answer was sent
        self._idle_ns: list[int] = []  # from one job's answer sent to the next job's arrival

    def answer(self, key: tuple[bytes, bytes], received_ns: int) -> bytes:
        """The answer to ``key`` (method, path), once its work is done."""
        if self.busy:
            if key == SYNTHESIZE:
                self._job(received_ns)
            elif key == UNLOAD and self.loaded is not None:
                self._event("unload", received_ns)
                self._set_loaded(False)
            elif key == LOAD and self.loaded is not None:
                self._event("load", received_ns)
                self._set_loaded(True)
        if key == STATS:
            return _response(b"200 OK", json.dumps(self._stats()).encode())
        answer = self.routes.get(key)
        if answer is None:
            return _NOT_ALLOWED if key[1] in self.paths else _NOT_FOUND
        return answer

    def _stats(self) -> dict[str, object]:
        """The job counts, and the idle times since the last call (which clears them)."""
        with self._lock:
            idle, self._idle_ns = self._idle_ns, []
            self._answered_ns = None
            return {"jobs": self.jobs, "max_concurrent": self.most_running, "idle_ns": idle}

    def answered(self, key: tuple[bytes, bytes]) -> None:
        """The answer to ``key`` has been sent: a job's end starts an idle time."""
        if key == SYNTHESIZE:
            with self._lock:
                self._answered_ns = time.monotonic_ns()

    def _job(self, received_ns: int) -> None:
        with self._lock:
            self.jobs += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            if self._answered_ns is not None and self.running == 1:
                self._idle_ns.append(received_ns - self._answered_ns)
                self._answered_ns = None
        self._event("synthesize", received_ns)
        if self.loaded is False:
            self._set_loaded(True)
        if self.work_s > 0:
            time.sleep(self.work_s)
        with self._lock:
            self.running -= 1

    def _set_loaded(self, loaded: bool) -> None:
        if loaded != self.loaded:
            self._hold(loaded)
        self.loaded = loaded
        self.routes.update(_LOADED_HEALTH[loaded])

    def _hold(self, loaded: bool) -> None:
        """Show the model's memory as used (loaded) or free in the ledger, if there is one."""
        if self.ledger is None:
            return
        if loaded:
            self.ledger.allocate(self.owner, self.vram_mib)
        else:
            self.ledger.release(self.owner)

    def _event(self, what: str, at_ns: int) -> None:
        if self.events:
            os.write(1, f"{what} {at_ns}\n".encode())


def serve_connection(conn: socket.socket, consumer: Consumer) -> None:
    """Answer each request on ``conn`` as soon as it is complete, until the peer closes."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    scratch = bytearray(65536)
    timed = consumer.busy
    try:
        while True:
            n = conn.recv_into(scratch)
            if not n:
                return
            received_ns = time.monotonic_ns() if timed else 0
            buf += memoryview(scratch)[:n]
            while buf:
                try:
                    consumed, key, close = parse_one(buf)
                except _Incomplete:
                    if len(buf) > MAX_HEAD + MAX_BODY:
                        conn.sendall(_BAD)
                        return
                    break
                except _Malformed:
                    conn.sendall(_BAD)
                    return
                del buf[:consumed]
                answer = consumer.answer(key, received_ns)
                if close:
                    answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                conn.sendall(answer)
                if timed:
                    consumer.answered(key)
                if close:
                    return
    except OSError:
        return
    finally:
        conn.close()


def exit_on_stdin_eof() -> None:
    """Wait for EOF on stdin (the parent closed it, or died), then stop like SIGTERM."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM or SIGINT handler: leave through SystemExit, so ``finally`` blocks run."""
    raise SystemExit(0)


def serve(host: str, port: int, watch_stdin: bool, consumer: Consumer) -> None:
    """Listen, report the port on stdout, and serve until told to stop."""
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    if watch_stdin:
        threading.Thread(target=exit_on_stdin_eof, name="stdin-watch", daemon=True).start()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        sys.stdout.write(f"{listener.getsockname()[1]}\n")
        sys.stdout.flush()
        while True:  # ends with SystemExit from stop_on_signal
            conn, _ = listener.accept()
            threading.Thread(target=serve_connection, args=(conn, consumer), daemon=True).start()


def _ledger(path: Path | None) -> Ledger | None:
    """The shared state file's ledger (imported only when asked for: it brings Twisted)."""
    if path is None:
        return None
    from mgpu.sim.gpu import FileLedger

    return FileLedger(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument(
        "--no-stdin-watch", action="store_true", help="do not exit when stdin reaches EOF"
    )
    parser.add_argument(
        "--work-ms", type=float, default=0.0, help="sleep this long in each synthesize request"
    )
    parser.add_argument(
        "--loaded",
        choices=["yes", "no"],
        help="report loaded in health answers, starting so; serve POST /api/unload",
    )
    parser.add_argument(
        "--events",
        action="store_true",
        help="print each synthesize, load and unload, timed, on stdout",
    )
    parser.add_argument(
        "--gpu-state", type=Path, help="with --loaded: hold --vram-mib in this state file"
    )
    parser.add_argument("--vram-mib", type=int, default=0, help="the model's size, MiB")
    args = parser.parse_args(argv)
    if args.gpu_state is not None and args.loaded is None:
        parser.error("--gpu-state needs --loaded")
    loaded = None if args.loaded is None else args.loaded == "yes"
    consumer = Consumer(
        args.work_ms / 1000.0, loaded, args.events, _ledger(args.gpu_state), args.vram_mib
    )
    serve(args.host, args.port, not args.no_stdin_watch, consumer)


if __name__ == "__main__":
    main()
