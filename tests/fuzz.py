"""How many examples the hypothesis properties try: bounded in ``make test``, more in
``make fuzz`` (``MGPU_FUZZ_EXAMPLES``)."""

from __future__ import annotations

import os


def examples(default: int) -> int:
    """``default``, or ``MGPU_FUZZ_EXAMPLES`` when set (``make fuzz`` sets thousands)."""
    return int(os.environ.get("MGPU_FUZZ_EXAMPLES") or default)
