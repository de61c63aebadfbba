# -*- test-case-name: tests.test_errors -*-
"""The broker's own errors: one exception, one JSON shape, one status table."""

from __future__ import annotations

import json
from typing import Final

from twisted.web.http import RESPONSES

STATUS_OF: Final[dict[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "no_consumer": 404,
    "payload_too_large": 413,
    "consumer_unreachable": 502,
    "bad_consumer_url": 502,
    "bad_answer": 502,
    "model_not_found": 404,
    "daemon_overloaded": 503,
    "scheduler_error": 503,
    "queue_full": 503,
    "queue_timeout": 503,
    "upstream_timeout": 504,
    # Not a contract code: a bug in the broker itself, still in the error schema.
    "internal_error": 500,
}


class BrokerError(Exception):
    """An error the broker produces itself: ``{error, message, consumer, retryable}``."""

    def __init__(
        self,
        code: str,
        message: str,
        consumer: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if code not in STATUS_OF:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(code, message, consumer)
        self.code = code
        self.message = message
        self.consumer = consumer
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return STATUS_OF[self.code]

    @property
    def retryable(self) -> bool:
        return self.status >= 500

    def to_dict(self) -> dict[str, object]:
        return {
            "error": self.code,
            "message": self.message,
            "consumer": self.consumer,
            "retryable": self.retryable,
        }

    def body(self) -> bytes:
        return json.dumps(self.to_dict()).encode("utf-8")

    def raw_answer(self) -> bytes:
        """The whole HTTP/1.1 answer, for a connection answered before (or without) a
        request object: its headers, ``Connection: close``, the JSON body."""
        body = self.body()
        lines = [b"HTTP/1.1 %d %s" % (self.status, RESPONSES.get(self.status, b"Error"))]
        lines.append(b"Content-Type: application/json")
        lines += [f"{name}: {value}".encode("latin-1") for name, value in self.headers.items()]
        lines.append(b"Content-Length: %d\r\nConnection: close\r\n" % len(body))
        return b"\r\n".join(lines) + b"\r\n" + body

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
