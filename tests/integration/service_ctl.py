"""A tiny stand-in for ``systemctl start|stop`` of a simulated consumer (SPEC 9.6 tests).

``start PIDFILE LOG -- ARGV...`` starts ``ARGV`` in its own session, detached (its
output to LOG), writes its pid to PIDFILE and exits at once, as ``systemctl start``
of a ``Type=simple`` unit does: the service answers its health route only later.
``stop PIDFILE`` sends SIGTERM, waits up to 5 s (then SIGKILL) for it to be gone,
and removes PIDFILE. A missing or stale PIDFILE is nothing to stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_GRACE_S = 5.0


def start(pid_file: Path, log: Path, argv: list[str]) -> int:
    with open(log, "ab") as out:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    pid_file.write_text(f"{child.pid}\n")
    return 0


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie of another parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(pid_file: Path) -> int:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return 0
    deadline = time.monotonic() + STOP_GRACE_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return 0


def main(args: list[str]) -> int:
    if len(args) >= 4 and args[0] == "start" and args[3] == "--":
        return start(Path(args[1]), Path(args[2]), args[4:])
    if len(args) == 2 and args[0] == "stop":
        return stop(Path(args[1]))
    print("usage: service_ctl start PIDFILE LOG -- ARGV... | stop PIDFILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
