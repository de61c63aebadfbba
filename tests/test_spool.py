"""ClientSpool: an answer written at the client's pace, its unread part kept."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from mgpu.spool import ClientSpool
from tests.fuzz import examples


class _Request:
    """What the spool uses of a request: write, and one producer at a time."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.channel: object | None = object()

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None and streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


class ClientSpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.request = _Request()
        self.spool = ClientSpool(self.request, memory_bytes=100)  # type: ignore[arg-type]

    def test_written_through_while_the_client_keeps_up(self) -> None:
        """Nothing is kept while the client is not paused: each chunk goes out at once."""
        self.spool.write(b"a")
        self.spool.write(b"b")
        self.assertEqual(self.request.written, [b"a", b"b"])
        self.assertEqual(self.spool.pending, 0)
        self.successResultOf(self.spool.finish())
        self.assertIsNone(self.request.producer)

    def test_kept_while_paused_and_given_in_order(self) -> None:
        """While the client is paused chunks are kept; resumed, it gets them in order, and
        finish fires only once it has them all."""
        self.assertIs(self.request.producer, self.spool)
        self.spool.write(b"one ")
        self.spool.pauseProducing()
        self.spool.write(b"two ")
        self.spool.write(b"three")
        self.assertEqual(self.request.body, b"one ")
        done = self.spool.finish()
        self.assertNoResult(done)
        self.spool.resumeProducing()
        self.assertEqual(self.request.body, b"one two three")
        self.successResultOf(done)
        self.assertIsNone(self.request.producer)

    def test_past_memory_to_a_file_then_gone(self) -> None:
        """Past its memory limit the spool rolls over to a file, closed once drained."""
        self.spool.pauseProducing()
        self.spool.write(b"x" * 500)
        spool: Any = self.spool._spool
        self.assertTrue(spool._rolled)
        self.spool.resumeProducing()
        self.assertTrue(spool.closed)
        self.assertEqual(self.request.body, b"x" * 500)
        self.assertEqual(self.spool.peak_bytes, 500)

    def test_client_pausing_mid_drain_stops_the_drain(self) -> None:
        """A client that pauses again while kept bytes go out gets no more until it resumes."""

        class Pausing(_Request):
            def write(inner, data: bytes) -> None:
                super().write(data)
                inner.producer.pauseProducing()

        request = Pausing()
        spool = ClientSpool(request, memory_bytes=10**6)  # type: ignore[arg-type]
        spool.pauseProducing()
        spool.write(b"y" * 200_000)
        spool.resumeProducing()
        self.assertEqual(len(request.body), 64 * 1024)
        spool.resumeProducing()
        self.assertEqual(len(request.body), 128 * 1024)

    def test_client_gone_fails_finish(self) -> None:
        """A client that leaves (stopProducing) drops what is kept; finish fails, cancelled."""
        self.spool.pauseProducing()
        self.spool.write(b"kept")
        done = self.spool.finish()
        self.spool.stopProducing()
        self.failureResultOf(done, CancelledError)
        self.spool.write(b"more")
        self.assertEqual(self.request.body, b"")

    def test_abort_fails_finish_with_the_reason(self) -> None:
        """abort drops what is kept and fails finish with the given error."""
        self.spool.pauseProducing()
        self.spool.write(b"kept")
        done = self.spool.finish()
        self.spool.abort(ValueError("too slow"))
        self.failureResultOf(done, ValueError)
        self.assertIsNone(self.request.producer)

    @settings(max_examples=examples(100), deadline=None)
    @given(
        st.lists(st.binary(min_size=1, max_size=300), max_size=20),
        st.lists(st.sampled_from(["pause", "resume"]), max_size=20),
    )
    def test_any_pace_same_bytes(self, chunks: list[bytes], moves: list[str]) -> None:
        """Whatever the client's pauses and resumes between chunks, it gets the same bytes."""
        request = _Request()
        spool = ClientSpool(request, memory_bytes=256)  # type: ignore[arg-type]
        for n, chunk in enumerate(chunks):
            if n < len(moves):
                getattr(spool, f"{moves[n]}Producing")()
            spool.write(chunk)
        done = spool.finish()
        spool.resumeProducing()
        self.successResultOf(done)
        self.assertEqual(request.body, b"".join(chunks))
