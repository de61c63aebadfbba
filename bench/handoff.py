"""``--profile handoff``: a timeline of the GPU lease hand-off inside the broker.

Run as the broker's launcher (``python -m bench.handoff ARGS`` takes twistd's
arguments): it wraps a few methods with timestamps, runs ``twistd``, and
writes the events as JSON when the reactor shuts down. Environment:
``HANDOFF_UPSTREAM_PORT`` (the consumer's port: its connections are the
upstream ones) and ``HANDOFF_OUT`` (the JSON file).

``summarize`` then lines up one hand-off per consumer answer that released
the lease: the time of each mark after the broker started reading that
answer (median and p90 over all of them). The marks, in path order:

- ``headers``: the relay has the answer's status and headers (``_Exchange._answered``);
- ``body done``: the answer is complete (``_Exchange.connectionLost``);
- ``release``: the lease is released (``GpuScheduler._release``);
- ``forward``: the next request's relay starts (``Relay.forward``);
- ``buffered``: its bytes are handed to the upstream transport (``write``);
- ``finish``: the answered client's response is finished (``Request.finish``);
- ``read done``: the reactor callback that read the answer returns;
- ``sent``: the next request's bytes go into the consumer's socket, at the
  next reactor turn, after ``client writes`` (the answered client's bytes).

A mark whose method no longer exists is left out. The wrappers cost a few
µs per event, so the timeline runs a little long; its shape is what counts.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

#: (module, class, method, mark), in path order.
MARKS = (
    ("mgpu.relay", "_Exchange", "_answered", "headers"),
    ("mgpu.relay", "_Exchange", "connectionLost", "body done"),
    ("mgpu.scheduler", "GpuScheduler", "_release", "release"),
    ("mgpu.relay", "Relay", "forward", "forward"),
    ("twisted.web.http", "Request", "finish", "finish"),
)
ORDER = ("headers", "body done", "release", "forward", "buffered", "finish", "read done", "sent")


def install(events: list[tuple[str, int, int]], upstream_port: int) -> None:
    """Wrap the reactor's reads and writes, and the marks' methods, to append events."""
    import importlib

    from twisted.internet import tcp

    now = time.monotonic_ns

    def upstream(conn: Any) -> bool:
        up = conn.__dict__.get("_bench_upstream")
        if up is None:
            try:
                up = conn.socket.getpeername()[1] == upstream_port
            except OSError:
                up = False
            conn._bench_upstream = up
        return bool(up)

    read, write, write_sequence, write_some = (
        tcp.Connection.doRead,
        tcp.Connection.write,
        tcp.Connection.writeSequence,
        tcp.Connection.writeSomeData,
    )

    def do_read(self: Any) -> Any:
        t0 = now()
        try:
            return read(self)
        finally:
            events.append(("read" if upstream(self) else "client read", t0, now()))

    def write_some_data(self: Any, data: Any) -> Any:
        t0 = now()
        try:
            return write_some(self, data)
        finally:
            events.append(("send" if upstream(self) else "client send", t0, now()))

    def buffered(self: Any, data: bytes) -> None:
        if upstream(self):
            events.append(("buffered", now(), 0))
        write(self, data)

    def buffered_sequence(self: Any, data: Any) -> None:
        if upstream(self):
            events.append(("buffered", now(), 0))
        write_sequence(self, data)

    tcp.Connection.doRead = do_read  # type: ignore[method-assign]
    tcp.Connection.writeSomeData = write_some_data  # type: ignore[method-assign]
    tcp.Connection.write = buffered  # type: ignore[method-assign]
    tcp.Connection.writeSequence = buffered_sequence  # type: ignore[method-assign]
    for module, cls_name, method, mark in MARKS:
        cls = getattr(importlib.import_module(module), cls_name, None)
        original = getattr(cls, method, None)
        if original is None:
            continue

        def wrapper(*a: Any, _original: Any = original, _mark: str = mark, **kw: Any) -> Any:
            events.append((_mark, now(), 0))
            return _original(*a, **kw)

        setattr(cls, method, functools.wraps(original)(wrapper))


def main() -> None:
    from twisted.internet import reactor
    from twisted.scripts.twistd import run

    events: list[tuple[str, int, int]] = []
    install(events, int(os.environ["HANDOFF_UPSTREAM_PORT"]))
    out = Path(os.environ["HANDOFF_OUT"])

    def dump() -> None:
        out.write_text(json.dumps(events))

    reactor.addSystemEventTrigger("after", "shutdown", dump)
    sys.argv = ["twistd", *sys.argv[1:]]
    run()


def handoffs(events: list[list[Any]]) -> list[dict[str, float]]:
    """Per answer that released the lease: each mark's µs after its read began."""
    events = sorted(events, key=lambda e: e[1])
    found = []
    for i, (kind, start, end) in enumerate(events):
        if kind != "read":
            continue
        marks: dict[str, float] = {}
        j = i + 1
        while j < len(events) and events[j][1] <= end:
            name = "sent" if events[j][0] == "send" else events[j][0]
            if name in ORDER:
                marks.setdefault(name, (events[j][1] - start) / 1000.0)
            j += 1
        if "release" not in marks:
            continue  # an answer that released no lease (or a probe's)
        marks["read done"] = (end - start) / 1000.0
        if "sent" not in marks:  # the usual: written out at the next reactor turn
            client_send = 0
            while j < len(events) and events[j][0] not in ("send", "read"):
                if events[j][0] == "client send":
                    client_send += events[j][2] - events[j][1]
                j += 1
            if j == len(events) or events[j][0] != "send":
                continue
            marks["sent"] = (events[j][1] - start) / 1000.0
            marks["client writes"] = client_send / 1000.0
        found.append(marks)
    return found


def summarize(path: Path, skip: float = 0.2) -> dict[str, Any]:
    """Medians and p90 of each mark over the hand-offs (the first ``skip`` share left out)."""
    found = handoffs(json.loads(path.read_text()))
    found = found[int(len(found) * skip) :]
    table: dict[str, Any] = {}
    for name in (*ORDER, "client writes"):
        xs = sorted(m[name] for m in found if name in m)
        if xs:
            table[name] = {
                "p50_us": statistics.median(xs),
                "p90_us": xs[int(0.9 * (len(xs) - 1))],
            }
    return {"handoffs": len(found), "marks": table}


def render(summary: dict[str, Any]) -> str:
    marks = summary["marks"]
    out = [
        f"hand-off timeline, {summary['handoffs']} hand-offs: µs after the broker starts "
        "reading the consumer's answer",
        f"  {'mark':<14} {'p50':>7} {'p90':>7}",
    ]
    for name, m in marks.items():
        out.append(f"  {name:<14} {m['p50_us']:>7.0f} {m['p90_us']:>7.0f}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
