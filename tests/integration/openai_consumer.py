"""A small OpenAI-compatible consumer: ``python -m tests.integration.openai_consumer``.

It serves what the ``openai`` SDK calls, with answers that say who served
them, so a test can tell which consumer a model was routed to:

- ``GET /health``: ``{"ok": true}``;
- ``GET /v1/models``: the ``--models`` given, in OpenAI's list shape;
- ``POST /v1/chat/completions``: ``"<name> heard <model>: <last message>"``; with
  ``"stream": true``, that text as Server-Sent Events, one word per event, ``--gap``
  seconds apart, then ``data: [DONE]``;
- ``POST /v1/embeddings``: for each input, ``[len(input), 1.0, 2.0]`` (base64 of
  little-endian float32 when ``encoding_format`` is ``base64``, as the SDK asks);
- ``POST /v1/audio/transcriptions``: the ``model`` field, and the size and SHA-256 of
  the ``file`` field, as the text.

A JSON body's ``sleep_s`` makes it wait that long before answering (a slow GPU
job). Each request is appended to ``--log`` as one JSON line ``{"method",
"path", "model", "bytes", "said"}`` (``said``: a chat's last message) once its
body is read, before it is answered.
Prints ``listening 127.0.0.1:PORT`` first, as ``python -m mgpu.sim`` does.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import hashlib
import json
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    name: str
    models: list[str]
    gap_s: float
    log_path: Path
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._record(None, 0)
        if self.path == "/health":
            self._json(200, {"ok": True})
        elif self.path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": self.name}
                for m in self.models
            ]
            self._json(200, {"object": "list", "data": data})
        else:
            self._json(404, {"error": {"message": f"no {self.path}", "code": "not_found"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/audio/transcriptions":
            self._transcribe(body)
            return
        try:
            request = json.loads(body)
        except ValueError:
            self._record(None, len(body))
            self._json(400, {"error": {"message": "not JSON", "code": "bad_json"}})
            return
        messages = request.get("messages") or [{}]
        self._record(request.get("model"), len(body), messages[-1].get("content"))
        time.sleep(float(request.get("sleep_s") or 0))
        if self.path == "/v1/chat/completions":
            self._chat(request)
        elif self.path == "/v1/embeddings":
            self._embed(request)
        else:
            self._json(404, {"error": {"message": f"no {self.path}", "code": "not_found"}})

    def _chat(self, request: dict[str, Any]) -> None:
        messages = request.get("messages") or [{}]
        text = f"{self.name} heard {request.get('model')}: {messages[-1].get('content')}"
        if not request.get("stream"):
            self._json(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                "model": request.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })  # fmt: skip
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")  # the end of the stream is the close
        self.end_headers()
        self.close_connection = True
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == len(words) - 1 else word + " "
            self._event(self._chunk(request, {"content": piece}, None))
            time.sleep(self.gap_s)
        self._event(self._chunk(request, {}, "stop"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    @staticmethod
    def _chunk(request: dict[str, Any], delta: dict[str, str], finish: str | None) -> object:
        return {
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
            "model": request.get("model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }  # fmt: skip

    def _event(self, data: object) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def _embed(self, request: dict[str, Any]) -> None:
        inputs = request.get("input")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, text in enumerate(texts):
            vector = [float(len(str(text))), 1.0, 2.0]
            encoded: object = vector
            if request.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack("<3f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        self._json(200, {
            "object": "list", "data": data, "model": request.get("model"),
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        })  # fmt: skip

    def _transcribe(self, body: bytes) -> None:
        head = b"Content-Type: " + (self.headers.get("Content-Type") or "").encode() + b"\r\n\r\n"
        form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields: dict[str, bytes] = {}
        for part in form.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            fields[str(name)] = payload if isinstance(payload, bytes) else b""
        model = fields.get("model", b"").decode()
        self._record(model, len(body))
        audio = fields.get("file", b"")
        digest = hashlib.sha256(audio).hexdigest()
        self._json(200, {"text": f"{self.name} heard {model}: {len(audio)} bytes {digest}"})

    def _record(self, model: object, size: int, said: object = None) -> None:
        entry = {"method": self.command, "path": self.path, "model": model, "bytes": size,
                 "said": said}  # fmt: skip
        with self.lock, self.log_path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")

    def _json(self, code: int, value: object) -> None:
        data = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.openai_consumer")
    parser.add_argument("--name", required=True)
    parser.add_argument("--models", default="", help="comma-separated, for GET /v1/models")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between streamed words")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    handler = type(
        "Handler",
        (_Handler,),
        {
            "name": args.name,
            "models": [m for m in args.models.split(",") if m],
            "gap_s": args.gap,
            "log_path": args.log,
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
