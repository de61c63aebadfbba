"""The daemon's file-descriptor limit: raised at start, and what it must cover."""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from mgpu.config import parse_config
from mgpu.fdlimit import RESERVE_FDS, FdLimit, describe, fds_needed


def _config(max_queue: int, concurrencies: list[int]) -> dict[str, object]:
    consumers = {
        f"c{n}": {
            "url": f"http://127.0.0.1:{9000 + n}",
            "paths": {"tts": {"path": "/x"}},
            "vram_resident_mib": 1,
            "max_concurrency": c,
        }
        for n, c in enumerate(concurrencies)
    }
    return {"scheduler": {"max_queue": max_queue}, "consumers": consumers}


class FdLimitTests(SynchronousTestCase):
    def test_soft_limit_raised_to_the_hard_one(self) -> None:
        """A process started with a low soft limit ends with the hard one, and says from what."""
        script = (
            "import json, resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "from mgpu.fdlimit import raise_fd_limit\n"
            "limit = raise_fd_limit()\n"
            "now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
            "print(json.dumps([limit.before, limit.soft, limit.hard, now, hard]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        before, soft, hard, now, real_hard = json.loads(out)
        self.assertEqual((before, hard), (256, real_hard))
        self.assertEqual(soft, now)
        self.assertGreater(soft, 256)

    def test_what_the_configuration_could_need(self) -> None:
        """A full queue, two descriptors per running request, and the reserve."""
        config = parse_config(_config(1000, [1, 2, 4]))
        self.assertEqual(fds_needed(config), 1000 + 2 * 7 + RESERVE_FDS)

    def test_start_line(self) -> None:
        """The start-up line says what the limit was raised from, and warns when it is short."""
        line, warn = describe(FdLimit(before=1024, soft=4096, hard=4096), needed=1000)
        self.assertEqual(line, "file descriptors: soft limit raised from 1024 to 4096 (hard 4096)")
        self.assertFalse(warn)
        line, warn = describe(FdLimit(before=1024, soft=1024, hard=1024), needed=2000)
        self.assertTrue(warn)
        self.assertIn("at 1024", line)
        self.assertIn("below the 2000", line)
        self.assertIn("daemon_overloaded", line)

    def test_clients_get_what_the_reserve_leaves(self) -> None:
        """Accepting pauses at the reserve below the limit (the ceiling); served connections
        stop a quarter of the ceiling below it, so that quarter answers 503; never below one."""
        self.assertEqual(FdLimit(1024, 1024, 1024).for_clients, (1024 - RESERVE_FDS) * 3 // 4)
        self.assertEqual(FdLimit(1024, 1024, 1024).ceiling, 1024 - RESERVE_FDS)
        self.assertEqual(FdLimit(160, 160, 160).for_clients, 72)
        self.assertEqual(FdLimit(10, 10, 10).for_clients, 1)
        self.assertEqual(FdLimit(10, 10, 10).ceiling, 1)
