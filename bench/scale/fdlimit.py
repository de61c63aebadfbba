"""The fd-limit run: more clients at once than the daemon's descriptors allow.

The daemon starts under ``prlimit --nofile=1024:1024 --`` (util-linux), so
it cannot raise its own limit, in front of one consumer of 20 ms jobs with
``scheduler.max_queue: 2000`` and a health probe every 0.5 s. Then 1,100
clients connect at once, each sending one request (``Connection: close``)
and reading until the daemon closes. Past its budget (the limit less 64
kept for its own work) the daemon should answer ``503 daemon_overloaded``
rather than fail ``accept``; every other client waits its turn for a 200.

Counted: the 200s, the 503s by error code (``daemon_overloaded``,
``queue_full``), anything else, and the clients with no HTTP answer at all
(target: none). Meanwhile one keep-alive connection, opened before the
burst, polls ``/v1/status`` every 100 ms: was the consumer ever marked
unhealthy (target: never)? The daemon's log is searched for the
connections that Twisted's listening port closed unanswered when ``accept``
itself hit EMFILE (``EMFILE recovery: Closed socket``), and for ``Too many
open files``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import broker as broker_mod
from bench.client import REQUEST_BODY, HttpError, KeepAliveClient, build_request
from bench.common import Bench
from bench.crowd import burst
from bench.servers import proc_nofile, start_consumer

HOST = "127.0.0.1"
#: How often the health poller reads ``/v1/status``.
POLL_EVERY_S = 0.1


@dataclass(frozen=True)
class FdSettings:
    """What the fd-limit part runs."""

    limit: int = 1024
    clients: int = 1100
    max_queue: int = 2000
    work_ms: float = 20.0
    timeout_s: float = 120.0  # per client: the last of 1,100 waits about 20 s


#: What the daemon's log says when ``accept`` hit EMFILE and a connection was closed unanswered.
EMFILE_CLOSED = "EMFILE recovery: Closed socket"


class HealthWatch:
    """Polls ``/v1/status`` in a thread over a connection opened before the burst."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.polls = 0
        self.unhealthy = 0  # polls that showed the consumer unhealthy
        self.failed = 0  # polls with no answer
        self.most_queued = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        client = KeepAliveClient(HOST, self.port)  # connected now, before the daemon is full
        self._thread = threading.Thread(target=self._run, args=(client,), daemon=True)
        self._thread.start()

    def _run(self, client: KeepAliveClient) -> None:
        raw = build_request("GET", "/v1/status", HOST, self.port)
        with client:
            while not self._stop.wait(POLL_EVERY_S):
                self._poll(client, raw)

    def _poll(self, client: KeepAliveClient, raw: bytes) -> None:
        self.polls += 1
        try:
            status, body = client.request(raw)
            doc = json.loads(body) if status == 200 else None
        except (OSError, HttpError, ValueError):
            doc = None
        if not isinstance(doc, dict):
            self.failed += 1
            return
        self.unhealthy += doc["consumers"]["mvoice"]["healthy"] is not True
        self.most_queued = max(self.most_queued, int(doc["scheduler"]["queued"]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)


class FdRun(Bench):
    """The daemon under prlimit, its consumer, the burst and the health watch."""

    def __init__(self, settings: FdSettings, tmp: Path, log: Callable[[str], None]) -> None:
        super().__init__(tmp, log, max_seconds=settings.timeout_s + 60.0)
        self.settings = settings
        self.port = 0
        self.log_path: Path | None = None
        self.daemon_nofile: tuple[str, str] | None = None
        self.outcomes: Counter[str] = Counter()
        self.no_answer: list[str] = []
        self.watch: HealthWatch | None = None
        self.took_s = 0.0

    def start(self) -> None:
        s = self.settings
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise RuntimeError("prlimit (util-linux) is not installed: the fd-limit run needs it")
        _, consumer_port = start_consumer(
            self.group, self.tmp, "consumer", ["--work-ms", f"{s.work_ms:g}"]
        )
        config = broker_mod.one_consumer_config(
            consumer_port, scheduler={"max_queue": s.max_queue}, health_interval_s=0.5
        )
        launcher = [prlimit, f"--nofile={s.limit}:{s.limit}", "--", broker_mod.twistd_path()]
        proc, self.port = broker_mod.start_broker(self.group, self.tmp, config, launcher=launcher)
        self.log_path = proc.log_path
        self.daemon_nofile = proc_nofile(proc.pid)
        self.log(
            f"daemon: {HOST}:{self.port} (pid {proc.pid}) under prlimit, open files soft/hard "
            f"{'/'.join(self.daemon_nofile or ('?', '?'))}; {s.clients:,} clients at once"
        )

    def measure(self) -> None:
        s = self.settings
        raw = build_request("POST", "/v1/tts", HOST, self.port, REQUEST_BODY, close=True)
        self.watch = HealthWatch(self.port)
        self.watch.start()
        t0 = time.monotonic()
        try:
            outcomes = burst(HOST, self.port, raw, s.clients, s.timeout_s)
        finally:
            self.took_s = time.monotonic() - t0
            time.sleep(3 * POLL_EVERY_S)
            self.watch.stop()
        for outcome in outcomes:
            if outcome.failure is not None:
                self.outcomes["no answer"] += 1
                self.no_answer.append(outcome.failure)
            else:
                code = f" {outcome.error}" if outcome.error else ""
                self.outcomes[f"{outcome.status}{code}"] += 1
        self.log(f"  {dict(self.outcomes)} in {self.took_s:.1f} s")

    def _log_counts(self) -> dict[str, int] | None:
        """How often the daemon's log tells of descriptors running out."""
        if self.log_path is None or not self.log_path.is_file():
            return None
        text = self.log_path.read_text("utf-8", "replace")
        return {what: text.count(what) for what in (EMFILE_CLOSED, "Too many open files")}

    def result(self) -> dict[str, Any]:
        """The part's record: settings, the outcomes, the health watch."""
        watch = self.watch
        return {
            "settings": asdict(self.settings),
            "daemon_nofile": list(self.daemon_nofile) if self.daemon_nofile else None,
            "outcomes": dict(self.outcomes),
            "no_answer_reasons": dict(Counter(self.no_answer).most_common(5)),
            "took_s": round(self.took_s, 2),
            "health": None
            if watch is None
            else {
                "polls": watch.polls,
                "unhealthy": watch.unhealthy,
                "failed": watch.failed,
                "most_queued": watch.most_queued,
            },
            "daemon_log": self._log_counts(),
            "failures": self.failures,
        }
