"""Tests for mgpu.sim.websocket: the frame codec, the server's side, and the simulated
ComfyUI's ``/ws`` feed over a real twisted.web channel."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mgpu.sim.consumers import ComfyUI, ConsumerSettings, make_consumer
from mgpu.sim.gpu import MemoryLedger
from mgpu.sim.http import SimResource, sim_site
from mgpu.sim.websocket import (
    BINARY,
    CLOSE,
    CONTINUATION,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    OPCODES,
    PING,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    Frame,
    FrameDecoder,
    ProtocolError,
    ServerConnection,
    accept_key,
    close_payload,
    encode_frame,
    parse_close,
)

MASK = b"\x37\xfa\x21\x3d"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def masked(frame: Frame) -> bytes:
    """A client's frame, masked with the RFC's example mask."""
    return encode_frame(frame, MASK)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    """Any frame a peer may send: data frames of any size, control frames whole and short."""
    opcode = draw(st.sampled_from(sorted(OPCODES)))
    if opcode >= CLOSE:
        return Frame(opcode, draw(st.binary(max_size=125)), True)
    return Frame(opcode, draw(st.binary(max_size=300)), draw(st.booleans()))


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class CodecTests(SynchronousTestCase):
    def test_accept_key_of_the_rfc(self) -> None:
        """The RFC 6455 section 1.3 example key gives its example accept value."""
        self.assertEqual(accept_key(KEY), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_examples_of_the_rfc(self) -> None:
        """RFC 6455 section 5.7: "Hello" unmasked and masked, 256 and 65536-byte lengths."""
        self.assertEqual(encode_frame(Frame(TEXT, b"Hello")), bytes.fromhex("810548656c6c6f"))
        self.assertEqual(masked(Frame(TEXT, b"Hello")), bytes.fromhex("818537fa213d7f9f4d5158"))
        self.assertEqual(encode_frame(Frame(BINARY, b"x" * 256))[:4], bytes.fromhex("827e0100"))
        big = encode_frame(Frame(BINARY, b"x" * 65536))
        self.assertEqual(big[:10], bytes.fromhex("827f0000000000010000"))
        self.assertEqual(FrameDecoder(masked=False).feed(big), [Frame(BINARY, b"x" * 65536)])

    @given(st.lists(frames(), max_size=5), st.booleans(), st.lists(st.integers(0, 2000)))
    def test_round_trip(self, sent: list[Frame], client: bool, cuts: list[int]) -> None:
        """Frames encoded (masked or not) and fed in any pieces decode to the same frames."""
        data = b"".join(masked(f) if client else encode_frame(f) for f in sent)
        decoder = FrameDecoder(masked=client)
        got = [frame for piece in pieces(data, cuts) for frame in decoder.feed(piece)]
        self.assertEqual(got, sent)

    @given(
        st.binary(max_size=400), st.sampled_from([True, False, None]), st.lists(st.integers(0, 400))
    )
    def test_arbitrary_bytes_never_crash(
        self, data: bytes, expect_masked: bool | None, cuts: list[int]
    ) -> None:
        """Whatever a peer sends, the decoder gives frames or a ProtocolError, nothing else."""
        decoder = FrameDecoder(masked=expect_masked, max_payload=200)
        try:
            for piece in pieces(data, cuts):
                for frame in decoder.feed(piece):
                    self.assertIn(frame.opcode, OPCODES)
                    self.assertLessEqual(len(frame.payload), 200)
        except ProtocolError as e:
            self.assertIn(e.code, (PROTOCOL_ERROR, MESSAGE_TOO_BIG))

    def test_refusals(self) -> None:
        """Reserved bits, unknown opcodes, long or fragmented control frames, a wrong mask
        bit, a length with its top bit set and an oversized frame are protocol errors."""
        for data, expect_masked in (
            (b"\xc1\x00", False),  # RSV1 without an extension
            (b"\x83\x00", False),  # opcode 3
            (b"\x89\x7e\x00\x7e" + b"x" * 126, False),  # a 126-byte ping
            (b"\x09\x00", False),  # a ping without FIN
            (encode_frame(Frame(TEXT, b"hi")), True),  # unmasked from a client
            (masked(Frame(TEXT, b"hi")), False),  # masked from a server
            (b"\x82\x7f\x80" + b"\x00" * 7, False),  # 64-bit length, top bit set
        ):
            self.assertRaises(ProtocolError, FrameDecoder(masked=expect_masked).feed, data)
        too_big = FrameDecoder(masked=False, max_payload=10)
        error = self.assertRaises(ProtocolError, too_big.feed, b"\x82\x0b")
        self.assertEqual(error.code, MESSAGE_TOO_BIG)

    def test_close_payloads(self) -> None:
        """A close payload is a code and a UTF-8 reason; empty means no code."""
        self.assertEqual(parse_close(close_payload(1001, "bye")), (1001, "bye"))
        self.assertEqual(parse_close(b""), (None, ""))
        self.assertRaises(ProtocolError, parse_close, b"\x03")
        self.assertRaises(ProtocolError, parse_close, b"\x03\xe8\xff")


class ServerConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.closed: list[bool] = []
        self.messages: list[tuple[int, bytes]] = []
        self.server = ServerConnection(
            lambda: self.closed.append(True),
            lambda opcode, payload: self.messages.append((opcode, payload)),
        )
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)

    def sent(self) -> list[Frame]:
        return FrameDecoder(masked=False).feed(self.transport.value())

    def test_ping_answered(self) -> None:
        """A ping is answered by a pong with its payload."""
        self.server.dataReceived(masked(Frame(PING, b"p1")))
        self.assertEqual(self.sent(), [Frame(PONG, b"p1")])

    def test_messages_heard(self) -> None:
        """Data frames reach on_message; pongs do not."""
        self.server.dataReceived(masked(Frame(TEXT, b"hi")) + masked(Frame(PONG, b"x")))
        self.server.dataReceived(masked(Frame(BINARY, b"\x00", fin=False)))
        self.server.dataReceived(masked(Frame(CONTINUATION, b"\x01")))
        self.assertEqual(self.messages, [(TEXT, b"hi"), (BINARY, b"\x00"), (CONTINUATION, b"\x01")])

    def test_closing_handshake(self) -> None:
        """A client's close is answered with its code, then the connection closes."""
        self.server.dataReceived(masked(Frame(CLOSE, close_payload(1001))))
        self.assertEqual(self.sent(), [Frame(CLOSE, close_payload(1001))])
        self.assertTrue(self.transport.disconnecting)
        self.server.send_text("late")
        self.assertEqual(len(self.sent()), 1)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.closed, [True])

    def test_protocol_error_closes(self) -> None:
        """An unmasked client frame is answered with close 1002."""
        self.server.dataReceived(encode_frame(Frame(TEXT, b"hi")))
        [frame] = self.sent()
        self.assertEqual(parse_close(frame.payload)[0], PROTOCOL_ERROR)
        self.assertTrue(self.transport.disconnecting)

    def test_send_text_unmasked(self) -> None:
        """A server's text message is one unmasked frame."""
        self.server.send_text("hé")
        self.assertEqual(self.transport.value(), b"\x81\x03h\xc3\xa9")
        self.server.close()
        self.assertEqual(parse_close(self.sent()[-1].payload)[0], NORMAL_CLOSURE)


def handshake(path: str = "/ws?clientId=abc", **extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1:8188",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY.decode()}",
        "Sec-WebSocket-Version: 13",
    ] + [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ComfyFeedTests(SynchronousTestCase):
    """The simulated ComfyUI's /ws on a real twisted.web channel; /prompt through StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        settings = ConsumerSettings.make("comfyui", load_s=1.0, work_s=0.8)
        self.comfy = make_consumer(settings, MemoryLedger(), self.clock)
        assert isinstance(self.comfy, ComfyUI)
        self.site = sim_site(self.comfy)
        self.http: Any = StubTreq(SimResource(self.comfy))
        self.addCleanup(self.comfy.stop)

    def run_jobs(self) -> None:
        """Let the simulated jobs run to their end (each step is a timer of its own)."""
        for _ in range(100):
            self.clock.advance(0.1)

    def connect(self, data: bytes) -> StringTransport:
        channel = self.site.buildProtocol(None)
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        transport.protocol = channel  # type: ignore[attr-defined]
        channel.dataReceived(data)
        return transport

    def messages(self, transport: StringTransport) -> list[dict[str, Any]]:
        """The JSON messages the server sent after its 101."""
        _, _, rest = transport.value().partition(b"\r\n\r\n")
        return [json.loads(f.payload) for f in FrameDecoder(masked=False).feed(rest)]

    def prompt(self, body: dict[str, Any]) -> None:
        d = self.http.post("http://sim/prompt", json=body)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_handshake_then_status(self) -> None:
        """The handshake is answered 101 with the accept key, then the status message."""
        transport = self.connect(handshake())
        head = transport.value().partition(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(head[0], b"HTTP/1.1 101 Switching Protocols")
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", head)
        status = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                             "sid": "abc"}}  # fmt: skip
        self.assertEqual(self.messages(transport), [status])

    def test_not_a_handshake(self) -> None:
        """/ws without an upgrade is 400, as aiohttp answers; a foreign Origin is 403."""
        plain = self.connect(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8188\r\n\r\n")
        self.assertTrue(plain.value().startswith(b"HTTP/1.1 400 "))
        foreign = self.connect(handshake(Origin="http://evil.example"))
        self.assertTrue(foreign.value().startswith(b"HTTP/1.1 403 "))

    def test_early_frames_read(self) -> None:
        """A ping sent in the same packet as the handshake is read and answered."""
        transport = self.connect(handshake() + masked(Frame(PING, b"early")))
        _, _, rest = transport.value().partition(b"\r\n\r\n")
        self.assertIn(Frame(PONG, b"early"), FrameDecoder(masked=False).feed(rest))

    def test_a_job_told_to_its_client(self) -> None:
        """A prompt's progress reaches the socket of its client_id, in ComfyUI's order and
        shapes, ending with executing null; another client hears only the queue's status."""
        mine = self.connect(handshake())
        other = self.connect(handshake("/ws?clientId=xyz"))
        graph = {"3": {"class_type": "KSampler", "inputs": {"steps": 2}},
                 "9": {"class_type": "SaveImage", "inputs": {}}}  # fmt: skip
        self.prompt({"prompt": graph, "client_id": "abc"})
        self.run_jobs()
        pid = "00000000-0000-4000-8000-000000000001"
        got = self.messages(mine)[1:]
        kinds = [(m["type"], m["data"].get("node")) for m in got]
        self.assertEqual(
            kinds,
            [("status", None), ("execution_start", None), ("execution_cached", None),
             ("executing", "3"), ("progress", "3"), ("progress", "3"), ("executing", "9"),
             ("executed", "9"), ("execution_success", None), ("executing", None),
             ("status", None)],
        )  # fmt: skip
        progress = [m["data"] for m in got if m["type"] == "progress"]
        step = {"max": 2, "prompt_id": pid, "node": "3"}
        self.assertEqual(progress, [{"value": 1, **step}, {"value": 2, **step}])
        self.assertEqual(got[-2]["data"], {"node": None, "prompt_id": pid})
        self.assertEqual(got[0]["data"], {"status": {"exec_info": {"queue_remaining": 1}}})
        self.assertEqual([m["type"] for m in self.messages(other)[1:]], ["status", "status"])

    def test_a_job_without_client_told_to_all(self) -> None:
        """A prompt without client_id is told to every connected client."""
        sockets = [self.connect(handshake(f"/ws?clientId={sid}")) for sid in ("a", "b")]
        self.prompt({"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}})
        self.run_jobs()
        for transport in sockets:
            types = [m["type"] for m in self.messages(transport)]
            self.assertEqual(types.count("progress"), 1)  # no "steps": one
            self.assertIn("execution_success", types)

    def test_closed_socket_forgotten(self) -> None:
        """A socket that closed hears nothing more; its connection's request is ended."""
        transport = self.connect(handshake())
        protocol: IProtocol = transport.protocol  # type: ignore[attr-defined]
        protocol.dataReceived(masked(Frame(CLOSE, close_payload(1000))))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        self.prompt({"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}})
        self.run_jobs()
        self.assertEqual(transport.value(), b"")
