"""A minimal blocking HTTP/1.1 client over one keep-alive socket, for timing.

Why not http.client or treq: the client's own cost is in every leg's figure,
so it must be small and steady. This client sends a pre-built request with one
``sendall`` and reads the answer with ``recv_into`` on a reused buffer; it
parses only what it needs (status, ``Content-Length`` or chunked framing,
``Connection: close``). It reconnects if the server closes, and counts it: a
leg that reconnects is not measuring a keep-alive path.

``ConnectionPerRequestClient`` is the same client with a connection of its own
per request, as the broker with ``keepalive`` off treats its consumers: the
baseline that charges the consumer a connect, an accept and a close per request.
"""

from __future__ import annotations

import json
import socket
from typing import Any

#: The request body every leg sends: about 200 bytes of JSON, as a short TTS request.
REQUEST_BODY = json.dumps(
    {
        "text": "The quick brown fox jumps over the lazy dog. " * 3,
        "voice": "bench",
        "format": "wav",
        "speed": 1.0,
    },
    separators=(",", ":"),
).encode()


def build_request(
    method: str, path: str, host: str, port: int, body: bytes = b"", *, close: bool = False
) -> bytes:
    """The raw bytes of one HTTP/1.1 request (keep-alive is HTTP/1.1's default).

    ``close``: say ``Connection: close``, as the broker does toward a consumer
    without ``keepalive``.
    """
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if body or method in ("POST", "PUT"):
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class HttpError(RuntimeError):
    """The server's answer was not HTTP we can read, or the connection broke."""


class KeepAliveClient:
    """One persistent connection; ``request()`` returns (status, body)."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.reconnects = 0
        self._buf = bytearray(64 * 1024)
        self._pending = bytearray()
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` and read the whole answer; reconnect once if the peer had closed."""
        try:
            self._sock.sendall(raw)
            status, body, close = self._read_response()
        except (ConnectionError, HttpError) as first:
            # A keep-alive connection the server closed between requests: retry once.
            self._reopen()
            try:
                self._sock.sendall(raw)
                status, body, close = self._read_response()
            except (ConnectionError, HttpError) as e:
                raise HttpError(f"{self.host}:{self.port}: {e} (after {first})") from e
        if close:
            self._reopen()
        return status, body

    def send(self, raw: bytes) -> None:
        """Send ``raw`` without waiting for the answer (``receive`` reads it; no retry)."""
        self._sock.sendall(raw)

    def receive(self) -> tuple[int, bytes]:
        """Read the answer to what ``send`` sent."""
        status, body, close = self._read_response()
        if close:
            self._reopen()
        return status, body

    def _reopen(self) -> None:
        self._sock.close()
        self._pending.clear()
        self.reconnects += 1
        self._sock = self._connect()

    def _fill(self) -> None:
        """Append at least one more byte from the socket to the pending buffer."""
        n = self._sock.recv_into(self._buf)
        if n == 0:
            raise HttpError("connection closed by the server")
        self._pending += memoryview(self._buf)[:n]

    def _read_response(self) -> tuple[int, bytes, bool]:
        pending = self._pending
        while True:
            end = pending.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(pending) > 64 * 1024:
                raise HttpError("response head too large")
            self._fill()
        head = bytes(pending[:end]).lower()
        try:
            status = int(head[9:12])
        except ValueError:
            raise HttpError(f"bad status line {bytes(pending[:40])!r}") from None
        length = -1
        chunked = False
        close = head.startswith(b"http/1.0")
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value.strip() == b"close"
        del pending[: end + 4]
        if chunked:
            body = self._read_chunked()
        elif length >= 0:
            while len(pending) < length:
                self._fill()
            body = bytes(pending[:length])
            del pending[:length]
        else:  # body ends when the server closes
            try:
                while True:
                    self._fill()
            except HttpError:
                pass
            body = bytes(pending)
            pending.clear()
            close = True
        return status, body, close

    def _read_chunked(self) -> bytes:
        pending = self._pending
        parts: list[bytes] = []
        while True:
            while (eol := pending.find(b"\r\n")) < 0:
                self._fill()
            size = int(bytes(pending[:eol]).split(b";", 1)[0], 16)
            del pending[: eol + 2]
            if size == 0:
                while (end := pending.find(b"\r\n")) < 0:
                    self._fill()
                while end != 0:  # skip trailers up to the empty line
                    del pending[: end + 2]
                    while (end := pending.find(b"\r\n")) < 0:
                        self._fill()
                del pending[:2]
                return b"".join(parts)
            while len(pending) < size + 2:
                self._fill()
            parts.append(bytes(pending[:size]))
            del pending[: size + 2]


class ConnectionPerRequestClient(KeepAliveClient):
    """A connection of its own per request: connect, send, read the answer, close.

    The request should say ``Connection: close`` (``build_request(...,
    close=True)``). The first request uses the connection opened with the
    client; every later one connects when it is sent, so the connect is part
    of its time. ``reconnects`` stays 0: a new connection is the point here.
    """

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` on a new connection and read the whole answer; close it."""
        self.send(raw)
        return self.receive()

    def send(self, raw: bytes) -> None:
        """Connect (unless the connection opened with the client is still unused) and send."""
        if self._sock.fileno() < 0:
            self._sock = self._connect()
        try:
            self._sock.sendall(raw)
        except OSError:
            self._sock.close()
            raise

    def receive(self) -> tuple[int, bytes]:
        """Read the answer to what ``send`` sent, then close the connection."""
        try:
            status, body, _close = self._read_response()
        finally:
            self._sock.close()
            self._pending.clear()
        return status, body
