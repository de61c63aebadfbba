"""A consumer that sends the bytes each request scripts: ``python -m tests.integration.hostile``.

The hostile-input tests put it behind the daemon to play a misbehaving
service: crossed and late answers, injected headers, broken framing,
connections closed at the worst moment.  A request whose JSON body is a
script ``{"segments": [b64, ...], "gap_ms", "late": b64 | null, "late_ms",
"close"}`` is answered by sending each segment (``gap_ms`` apart), then the
``late`` bytes ``late_ms`` later, then closing the connection if ``close``;
else the connection waits for its next request.  Any other request (health
probes) gets ``200 {"ok": true}``.  Prints ``listening 127.0.0.1:PORT``
first, as ``python -m mgpu.sim`` does.  Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import socket
import sys
import threading
import time
from typing import Any

_HEALTHY = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'
)


def _read_request(conn: socket.socket, buffer: bytearray) -> tuple[bytes, bytes] | None:
    """The next request's head and body from ``conn`` (``buffer`` keeps what follows)."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buffer) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return head, body


def _script(body: bytes) -> dict[str, Any] | None:
    try:
        script = json.loads(body)
    except ValueError:
        return None
    return script if isinstance(script, dict) and "segments" in script else None


def _serve(conn: socket.socket) -> None:
    buffer = bytearray()
    with conn:
        while (request := _read_request(conn, buffer)) is not None:
            head, body = request
            script = _script(body)
            if script is None:
                conn.sendall(_HEALTHY)
                if b"connection: close" in head.lower():
                    return
                continue
            for n, segment in enumerate(script["segments"]):
                if n and script.get("gap_ms"):
                    time.sleep(script["gap_ms"] / 1000)
                conn.sendall(base64.b64decode(segment))
            if script.get("late"):
                time.sleep(script.get("late_ms", 0) / 1000)
                try:
                    conn.sendall(base64.b64decode(script["late"]))
                except OSError:
                    return
            if script.get("close"):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                return


def _serve_quietly(conn: socket.socket) -> None:
    # The daemon closing its end early is one of the things being tested.
    with contextlib.suppress(OSError):
        _serve(conn)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.hostile")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = socket.create_server(("127.0.0.1", args.port), backlog=128)
    print(f"listening 127.0.0.1:{server.getsockname()[1]}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_quietly, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
