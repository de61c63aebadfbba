"""The README's demo walk-through, run to the letter against the demo.

The commands are read from the README's "Trying it: the demo" section (its
first ``sh`` block), run with a shell exactly as written but for the
address (``localhost:8770`` becomes the test daemon's) and ``python3`` (this
interpreter), and what the README says they show is checked: every call
answers without an error, and ``/v1/status`` counts the evictions the text
after the block announces.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.harness import REPO_ROOT, shared_stacks, start_daemon

README = REPO_ROOT / "README.md"
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def demo_section(text: str) -> str:
    """The README's demo section, up to the next heading of its level."""
    start = text.index("## Trying it: the demo")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def walk_through(section: str) -> list[str]:
    """The commands of the section's first ``sh`` block, comments kept (the shell drops them)."""
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no sh block in the demo section"
    return [line for line in block.group(1).splitlines() if line.strip()]


def announced_evictions(section: str) -> int:
    """The number of evictions the text says ``/v1/status`` counts after the sequence."""
    said = re.search(r"counts (\w+) evictions", section)
    assert said is not None, "the demo section no longer says how many evictions to expect"
    return _WORDS[said.group(1)]


class ReadmeWalkThroughTests(TestCase):
    """What a newcomer types first, as the README gives it."""

    timeout = 90

    def test_parsing(self) -> None:
        """The walk-through is five curl calls ending with the status, and announces three
        evictions (this test reads what the other runs)."""
        section = demo_section(README.read_text("utf-8"))
        commands = walk_through(section)
        self.assertEqual([c.split()[0] for c in commands], ["curl"] * 5)
        self.assertIn("/v1/status", commands[-1])
        self.assertEqual(announced_evictions(section), 3)

    async def test_commands_as_written(self) -> None:
        """Each command of the walk-through succeeds against the demo, answers no broker
        error, and the status counts the evictions the README announces."""
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")
        section = demo_section(README.read_text("utf-8"))
        await shared_stacks.release()
        workdir = Path(tempfile.mkdtemp(prefix="mgpu-readme-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        daemon = await start_daemon(workdir, extra_args=["--demo"])
        self.addCleanup(lambda: ensureDeferred(daemon.process.stop()))
        outputs = []
        for command in walk_through(section):
            line = command.replace("localhost:8770", f"127.0.0.1:{daemon.port}")
            line = re.sub(r"\bpython3\b", sys.executable, line)
            done = await deferToThread(
                subprocess.run, ["bash", "-o", "pipefail", "-c", line],
                capture_output=True, timeout=60, cwd=workdir,
            )  # fmt: skip
            self.assertEqual(done.returncode, 0, (command, done.stderr, daemon.process.output()))
            self.assertTrue(done.stdout, command)
            self.assertNotIn(b'"retryable"', done.stdout, (command, done.stdout))
            outputs.append(done.stdout)
        status = json.loads(outputs[-1])
        self.assertEqual(
            status["scheduler"]["evictions"], announced_evictions(section), status["scheduler"]
        )
        self.assertEqual(status["scheduler"]["failed"], 0, status["scheduler"])
