"""A consumer that records every request it receives: ``python -m tests.integration.recorder``.

The simulated consumers (``mgpu.sim``) log only their GPU work, so a test
that must show a request never reached the consumer (``/audio`` path tricks)
puts this one behind the daemon instead.  Each request, whatever its method
and path, is appended to ``--log`` as one JSON line ``{"method", "target",
"headers"}`` (the request target exactly as received) before it is answered
``200`` with a small JSON body.  Prints ``listening 127.0.0.1:PORT`` first,
as ``python -m mgpu.sim`` does.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    log_path: Path
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"

    def _record_and_answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        entry = {"method": self.command, "target": self.path, "headers": dict(self.headers)}
        with self.lock, self.log_path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        body = json.dumps({"recorded": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _record_and_answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.recorder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    handler = type("Handler", (_Handler,), {"log_path": args.log})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
