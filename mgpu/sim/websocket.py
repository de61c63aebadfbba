# -*- test-case-name: tests.test_sim_websocket -*-
"""A minimal RFC 6455 WebSocket server for the simulated consumers (ComfyUI's ``/ws``).

Enough to be a real peer for real clients (the ``websockets`` library, a
browser) and for the broker's tunnel: the opening handshake's
``Sec-WebSocket-Accept``, unmasked server frames, masked client frames read
and checked, pings answered, the closing handshake.  No extensions, no
subprotocols; fragmented messages are read (their frames are checked) but
their payloads are not joined: the simulated ComfyUI only sends.

The frame codec (``encode_frame``, ``FrameDecoder``) is pure: bytes in,
frames out, ``ProtocolError`` for anything a peer must not send.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable
from typing import Final

from attrs import frozen
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpu.sim.http import HttpError
from mgpu.tunnel import Takeover, take_over

#: The GUID of RFC 6455 section 1.3, appended to the client's key.
ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
OPCODES: Final = frozenset({CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG})

#: Close codes (RFC 6455 section 7.4.1).
NORMAL_CLOSURE: Final = 1000
PROTOCOL_ERROR: Final = 1002
MESSAGE_TOO_BIG: Final = 1009

#: The largest payload a decoder accepts by default: the simulator's peers send small JSON.
MAX_PAYLOAD: Final = 1 << 20


class ProtocolError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


@frozen
class Frame:
    """One frame: its opcode, its (unmasked) payload, and whether it ends a message."""

    opcode: int
    payload: bytes = b""
    fin: bool = True


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + ACCEPT_GUID).digest())


def handshake_answer(key: bytes) -> bytes:
    """The server's ``101 Switching Protocols`` head for a client's key."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
    )


def encode_frame(frame: Frame, mask: bytes | None = None) -> bytes:
    """A frame's bytes; masked with the 4-byte ``mask`` (a client's frames), else unmasked."""
    if frame.opcode not in OPCODES:
        raise ValueError(f"unknown opcode {frame.opcode:#x}")
    if mask is not None and len(mask) != 4:
        raise ValueError("a mask is 4 bytes")
    size = len(frame.payload)
    first = (0x80 if frame.fin else 0) | frame.opcode
    bit = 0x80 if mask is not None else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if mask is None:
        return head + frame.payload
    return head + mask + _unmask(mask, frame.payload)


def _unmask(mask: bytes, data: bytes) -> bytes:
    """``data`` XORed with the repeated 4-byte ``mask`` (masking and unmasking alike)."""
    if not data:
        return b""
    key = int.from_bytes((mask * (len(data) // 4 + 1))[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(len(data), "big")


class FrameDecoder:
    """Reads frames from a byte stream, fed in pieces of any size.

    ``masked``: True where frames come from a client (each must be masked),
    False from a server (none may be), None to accept either.
    """

    def __init__(self, *, masked: bool | None = True, max_payload: int = MAX_PAYLOAD) -> None:
        self._masked = masked
        self._max = max_payload
        self._buffer = b""

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``; ``ProtocolError`` for a frame no peer may send."""
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        fin, opcode, masked, size = (
            bool(first & 0x80),
            first & 0x0F,
            bool(second & 0x80),
            second & 0x7F,
        )
        if first & 0x70:
            raise ProtocolError("reserved bits set (no extension was agreed)")
        if opcode not in OPCODES:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if opcode >= CLOSE and (not fin or size > 125):
            raise ProtocolError("a control frame must be whole and at most 125 bytes")
        if self._masked is not None and masked != self._masked:
            raise ProtocolError(
                "client frames must be masked"
                if self._masked
                else "server frames must not be masked"
            )
        offset = 2
        if size == 126:
            if len(buffer) < 4:
                return None
            (size,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif size == 127:
            if len(buffer) < 10:
                return None
            (size,) = struct.unpack_from("!Q", buffer, 2)
            if size >> 63:
                raise ProtocolError("a payload length's most significant bit must be 0")
            offset = 10
        if size > self._max:
            raise ProtocolError(f"a frame of {size} bytes is over {self._max}", MESSAGE_TOO_BIG)
        mask = b""
        if masked:
            mask = buffer[offset : offset + 4]
            offset += 4
        if len(buffer) < offset + size:
            return None
        payload = buffer[offset : offset + size]
        self._buffer = buffer[offset + size :]
        return Frame(opcode, _unmask(mask, payload) if masked else payload, fin)


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code, then the reason in UTF-8."""
    return struct.pack("!H", code) + reason.encode("utf-8")


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """A close frame's code (None if it has none) and reason; ``ProtocolError`` if malformed."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("a close payload of one byte")
    (code,) = struct.unpack_from("!H", payload)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a close reason that is not UTF-8") from None
    return code, reason


class ServerConnection(Protocol):
    """The server's side of one WebSocket, once the handshake is answered.

    It answers pings and the closing handshake; ``on_message(opcode, payload)``
    hears each data frame, ``on_close()`` the end of the connection.
    """

    def __init__(
        self,
        on_close: Callable[[], object] = lambda: None,
        on_message: Callable[[int, bytes], object] = lambda opcode, payload: None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self._decoder = FrameDecoder(masked=True, max_payload=max_payload)
        self._on_close = on_close
        self._on_message = on_message
        self._closing = False  # our close frame is sent: nothing more is

    def dataReceived(self, data: bytes) -> None:
        if self._closing:  # the client's answer to our close frame, or late bytes
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as e:
            self.close(e.code, str(e)[:100])
            return
        for frame in frames:
            self._frame(frame)

    def _frame(self, frame: Frame) -> None:
        if frame.opcode == PING:
            self._send(Frame(PONG, frame.payload))
        elif frame.opcode == CLOSE:
            try:
                code, _ = parse_close(frame.payload)
            except ProtocolError as e:
                self.close(e.code)
                return
            self.close(NORMAL_CLOSURE if code is None else code)
        elif frame.opcode != PONG:
            self._on_message(frame.opcode, frame.payload)

    def send_text(self, text: str) -> None:
        """One text message (a single frame)."""
        self._send(Frame(TEXT, text.encode("utf-8")))

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame (once), then close the connection once it is written.

        The server closes the TCP connection first (RFC 6455 section 7.1.1);
        a client that answered with its own close frame has nothing more to say.
        """
        if not self._closing:
            self._send(Frame(CLOSE, close_payload(code, reason)))
            self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _send(self, frame: Frame) -> None:
        if not self._closing and self.transport is not None:
            self.transport.write(encode_frame(frame))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._on_close()


def accept(
    request: Request,
    on_close: Callable[[], object] = lambda: None,
    on_message: Callable[[int, bytes], object] = lambda opcode, payload: None,
) -> ServerConnection:
    """Answer a WebSocket handshake with ``101`` and take the connection from twisted.web.

    Returns the server's side of the WebSocket; the request is never
    finished.  A request that is no version-13 handshake is an ``HttpError``
    400, as aiohttp (ComfyUI's server) answers it.
    """
    upgrade = (request.getHeader(b"upgrade") or b"").lower()
    connection_tokens = (request.getHeader(b"connection") or b"").lower().split(b",")
    if (
        request.method != b"GET"
        or upgrade.strip() != b"websocket"
        or b"upgrade" not in (t.strip() for t in connection_tokens)
    ):
        raise HttpError(400, {"error": "No WebSocket UPGRADE hdr"})
    if request.getHeader(b"sec-websocket-version") != b"13":
        raise HttpError(400, {"error": "Unsupported version"})
    key = request.getHeader(b"sec-websocket-key") or b""
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        raise HttpError(400, {"error": "Handshake error: invalid Sec-WebSocket-Key"})
    taken: list[Takeover] = []

    def closed() -> None:
        on_close()
        for takeover in taken:
            takeover.release()

    server = ServerConnection(closed, on_message)
    takeover = take_over(request, server)
    taken.append(takeover)
    takeover.transport.write(handshake_answer(key))
    if takeover.pending:  # frames the client sent right after its handshake
        server.dataReceived(takeover.pending)
    return server


class Feed:
    """A server's open WebSockets by client id, and JSON messages ``{"type", "data"}`` to them.

    ComfyUI's ``/ws``: a client that connects again with the same id replaces
    its old socket; a message goes to one client id, or to every client.
    """

    def __init__(self) -> None:
        self._sockets: dict[str, ServerConnection] = {}

    def add(self, request: Request, sid: str) -> ServerConnection:
        """Accept ``request``'s handshake (``accept``) as client ``sid``'s socket."""

        def closed() -> None:
            if self._sockets.get(sid) is server:
                del self._sockets[sid]

        server = accept(request, closed)
        self._sockets[sid] = server
        return server

    def send(self, event: str, data: object, sid: str | None = None) -> None:
        """``{"type": event, "data": data}`` to client ``sid`` if connected; None: to all."""
        text = json.dumps({"type": event, "data": data})
        targets = self._sockets.values() if sid is None else [self._sockets.get(sid)]
        for server in list(targets):
            if server is not None:
                server.send_text(text)

    def __len__(self) -> int:
        return len(self._sockets)
