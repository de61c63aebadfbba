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
from types import FrameType

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


_ROUTES = {
    (b"POST", b"/api/synthesize"): _response(b"200 OK", SYNTH_BODY),
    (b"GET", b"/api/health"): _response(b"200 OK", HEALTH_BODY),
    (b"HEAD", b"/api/health"): _response(b"200 OK", HEALTH_BODY)[: -len(HEALTH_BODY)],
}
_PATHS = {path for _, path in _ROUTES}
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


def parse_one(buf: bytearray) -> tuple[int, bytes, bool]:
    """Parse the first request in ``buf``: (bytes it used, the answer, close after it)."""
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
    path = target.split(b"?", 1)[0]
    answer = _ROUTES.get((method, path))
    if answer is None:
        answer = _NOT_ALLOWED if path in _PATHS else _NOT_FOUND
    if close:
        answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    return consumed, answer, close


def serve_connection(conn: socket.socket) -> None:
    """Answer each request on ``conn`` as soon as it is complete, until the peer closes."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    scratch = bytearray(65536)
    try:
        while True:
            n = conn.recv_into(scratch)
            if not n:
                return
            buf += memoryview(scratch)[:n]
            while buf:
                try:
                    consumed, answer, close = parse_one(buf)
                except _Incomplete:
                    if len(buf) > MAX_HEAD + MAX_BODY:
                        conn.sendall(_BAD)
                        return
                    break
                except _Malformed:
                    conn.sendall(_BAD)
                    return
                del buf[:consumed]
                conn.sendall(answer)
                if close:
                    return
    except OSError:
        return
    finally:
        conn.close()


def _exit_on_stdin_eof() -> None:
    """Wait for EOF on stdin (the benchmark closed it, or died), then stop like SIGTERM."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(host: str, port: int, watch_stdin: bool) -> None:
    """Listen, report the port on stdout, and serve until told to stop."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if watch_stdin:
        threading.Thread(target=_exit_on_stdin_eof, name="stdin-watch", daemon=True).start()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        sys.stdout.write(f"{listener.getsockname()[1]}\n")
        sys.stdout.flush()
        while True:  # ends with SystemExit from _stop
            conn, _ = listener.accept()
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument(
        "--no-stdin-watch", action="store_true", help="do not exit when stdin reaches EOF"
    )
    args = parser.parse_args(argv)
    serve(args.host, args.port, not args.no_stdin_watch)


if __name__ == "__main__":
    main()
