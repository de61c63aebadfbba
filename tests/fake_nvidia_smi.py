#!/usr/bin/env python3
"""A stand-in ``nvidia-smi`` for tests: answers ``--query-gpu`` from a JSON file.

Usage (as the broker runs it)::

    FAKE_NVIDIA_SMI_STATE=/path/state.json fake_nvidia_smi.py \\
        --query-gpu=index,name,memory.total,memory.used,memory.free \\
        --format=csv,noheader,nounits [-i INDEX]

The state file, re-read on every run so a test can rewrite it (atomically,
with ``os.replace``) to simulate memory being freed::

    {"gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 4090",
               "total_mib": 24564, "used_mib": 1000}],
     "fail": null,        # a string: printed on stderr, exit 9
     "delay_s": 0,        # optional: sleep this long first (timeout tests)
     "raw": null}         # optional: a string printed as-is instead, exit 0

``free`` is ``total - used``.  An ``-i`` naming no GPU exits 6 with "No devices
were found" as the real tool does; a missing or unreadable state file exits 9;
bad arguments exit 2.  Standard library only, so it starts fast.
"""

from __future__ import annotations

import json
import os
import sys
import time

FIELDS = ("index", "name", "memory.total", "memory.used", "memory.free")


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


def main(argv: list[str]) -> int:
    fields: list[str] | None = None
    csv_format = False
    wanted: int | None = None
    args = iter(argv)
    for arg in args:
        if arg.startswith("--query-gpu="):
            fields = arg.split("=", 1)[1].split(",")
        elif arg == "--format=csv,noheader,nounits":
            csv_format = True
        elif arg in ("-i", "--id"):
            try:
                wanted = int(next(args))
            except (StopIteration, ValueError):
                return _die("Invalid combination of input arguments.", 2)
        else:
            return _die(f"Invalid combination of input arguments: {arg}", 2)
    if not fields or not csv_format or any(field not in FIELDS for field in fields):
        return _die("Invalid combination of input arguments.", 2)

    path = os.environ.get("FAKE_NVIDIA_SMI_STATE")
    if not path:
        return _die("fake nvidia-smi: FAKE_NVIDIA_SMI_STATE is not set", 9)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        return _die(f"fake nvidia-smi: cannot read state file {path}: {exc}", 9)

    if state.get("delay_s"):
        time.sleep(float(state["delay_s"]))
    if state.get("fail"):
        return _die(str(state["fail"]), 9)
    if state.get("raw") is not None:
        sys.stdout.write(str(state["raw"]))
        return 0
    gpus = [gpu for gpu in state.get("gpus", []) if wanted is None or gpu["index"] == wanted]
    if not gpus:
        return _die("No devices were found", 6)
    for gpu in gpus:
        sys.stdout.write(", ".join(_value(gpu, field) for field in fields) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
