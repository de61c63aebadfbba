#!/usr/bin/env python3
"""A stand-in ``nvidia-smi`` for tests: answers ``--query-gpu`` and
``--query-compute-apps`` from a JSON file.

Usage (as the broker runs it)::

    FAKE_NVIDIA_SMI_STATE=/path/state.json fake_nvidia_smi.py \\
        --query-gpu=index,name,memory.total,memory.used,memory.free \\
        --format=csv,noheader,nounits [-i INDEX]
    FAKE_NVIDIA_SMI_STATE=/path/state.json fake_nvidia_smi.py \\
        --query-compute-apps=pid,used_memory --format=csv,noheader,nounits [-i INDEX]

The state file, re-read on every run so a test can rewrite it (atomically,
with ``os.replace``) to simulate memory being freed::

    {"gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 4090",
               "total_mib": 24564, "used_mib": 1000}],
     "fail": null,        # a string: printed on stderr, exit 9 (either query)
     "delay_s": 0,        # optional: sleep this long first (timeout tests; --query-gpu)
     "raw": null,         # optional: a string printed as-is instead, exit 0 (--query-gpu)
     "processes": {"0": [{"pid": 4242, "used_mib": 1000}]},
                          # optional: the card's processes; a null used_mib prints [N/A]
     "raw_apps": null,    # optional: a string printed as-is after the processes
     "fail_apps": null,   # optional: like "fail", for --query-compute-apps only
     "delay_apps_s": 0}   # optional: like "delay_s", for --query-compute-apps only

``free`` is ``total - used``.  The processes of a card are its ``processes``,
then each owner in ``mgpu.sim``'s ``FileLedger`` keys (``owners`` and
``pids``) that has a pid, one line each; a card with none prints nothing, as
the real tool does in this format.  An ``-i`` naming no GPU exits 6 with "No
devices were found" as the real tool does; a missing or unreadable state file
exits 9; bad arguments exit 2.  Standard library only, so it starts fast.
"""

from __future__ import annotations

import json
import os
import sys
import time

FIELDS = ("index", "name", "memory.total", "memory.used", "memory.free")
APP_FIELDS = ("pid", "used_memory")


def _die(message: str, code: int) -> int:
    sys.stderr.write(message + "\n")
    return code


def _value(gpu: dict, field: str) -> str:
    total, used = int(gpu["total_mib"]), int(gpu["used_mib"])
    return str(
        {
            "index": int(gpu["index"]),
            "name": gpu["name"],
            "memory.total": total,
            "memory.used": used,
            "memory.free": total - used,
        }[field]
    )


def _apps(state: dict, index: int) -> list[dict]:
    """The card's processes: the explicit ones, then the ledger's owners that have a pid."""
    key = str(index)
    listed = list(state.get("processes", {}).get(key, []))
    owners = state.get("owners", {}).get(key, {})
    for owner, pid in state.get("pids", {}).get(key, {}).items():
        if owner in owners:
            listed.append({"pid": pid, "used_mib": owners[owner]})
    return listed


def _app_value(app: dict, field: str) -> str:
    if field == "pid":
        return str(int(app["pid"]))
    used = app.get("used_mib")
    return "[N/A]" if used is None else str(int(used))


def _parse(argv: list[str]) -> tuple[str, list[str], int | None] | int:
    """``(query, fields, index)`` from the arguments, or the exit code for bad ones."""
    query: tuple[str, list[str]] | None = None
    csv_format = False
    wanted: int | None = None
    args = iter(argv)
    for arg in args:
        if arg.startswith(("--query-gpu=", "--query-compute-apps=")) and query is None:
            name, fields = arg.split("=", 1)
            query = (name, fields.split(","))
        elif arg == "--format=csv,noheader,nounits":
            csv_format = True
        elif arg in ("-i", "--id"):
            try:
                wanted = int(next(args))
            except (StopIteration, ValueError):
                return _die("Invalid combination of input arguments.", 2)
        else:
            return _die(f"Invalid combination of input arguments: {arg}", 2)
    if query is None or not query[1] or not csv_format:
        return _die("Invalid combination of input arguments.", 2)
    known = FIELDS if query[0] == "--query-gpu" else APP_FIELDS
    if any(field not in known for field in query[1]):
        return _die("Invalid combination of input arguments.", 2)
    return query[0], query[1], wanted


def main(argv: list[str]) -> int:
    parsed = _parse(argv)
    if isinstance(parsed, int):
        return parsed
    query, fields, wanted = parsed

    path = os.environ.get("FAKE_NVIDIA_SMI_STATE")
    if not path:
        return _die("fake nvidia-smi: FAKE_NVIDIA_SMI_STATE is not set", 9)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        return _die(f"fake nvidia-smi: cannot read state file {path}: {exc}", 9)

    apps = query == "--query-compute-apps"
    delay = state.get("delay_apps_s" if apps else "delay_s")
    if delay:
        time.sleep(float(delay))
    if state.get("fail"):
        return _die(str(state["fail"]), 9)
    if apps and state.get("fail_apps"):
        return _die(str(state["fail_apps"]), 9)
    if not apps and state.get("raw") is not None:
        sys.stdout.write(str(state["raw"]))
        return 0
    gpus = [gpu for gpu in state.get("gpus", []) if wanted is None or gpu["index"] == wanted]
    if not gpus:
        return _die("No devices were found", 6)
    for gpu in gpus:
        if not apps:
            sys.stdout.write(", ".join(_value(gpu, field) for field in fields) + "\n")
            continue
        for app in _apps(state, int(gpu["index"])):
            sys.stdout.write(", ".join(_app_value(app, field) for field in fields) + "\n")
    if apps and state.get("raw_apps") is not None:
        sys.stdout.write(str(state["raw_apps"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
