"""mgpu.footprints: learned sizes, the footprint rule, and their file in state_dir."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mgpu.footprints import FILE_NAME, LearnedSizes, StateDirError
from tests.fuzz import examples


class LearnedSizesTests(SynchronousTestCase):
    """Peaks kept, the rule applied, the file written atomically and read back."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.warnings: list[str] = []

        def seen(event: LogEvent) -> None:
            if event.get("log_level") == LogLevel.warn:
                self.warnings.append(str(event.get("log_format")))

        observer = cast(ILogObserver, seen)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_peak_kept_and_survives_a_restart(self) -> None:
        """Only a new peak is kept; a fresh LearnedSizes over the same dir starts from it."""
        sizes = LearnedSizes.open(str(self.dir))
        sizes.observe("comfyui", 9000, 13000)
        sizes.observe("comfyui", 12000, 13000)
        sizes.observe("comfyui", 11000, 13000)
        self.assertEqual(sizes.get("comfyui"), 12000)
        again = LearnedSizes.open(str(self.dir))
        self.assertEqual(again.get("comfyui"), 12000)
        self.assertIsNone(again.get("mvoice"))
        document = json.loads((self.dir / FILE_NAME).read_text())
        self.assertEqual(document, {"learned_mib": {"comfyui": 12000}})

    def test_written_in_the_background_one_write_at_a_time(self) -> None:
        """With a background runner the file is written there, never two writes at once; peaks
        seen meanwhile are written after, once, the newest."""
        pending: list[tuple[Callable[[], object], Deferred[object]]] = []

        def background(work: Callable[[], object]) -> Deferred[object]:
            d: Deferred[object] = Deferred()
            pending.append((work, d))
            return d

        def finish() -> None:
            work, d = pending.pop(0)
            d.callback(work())

        path = Path(self.mktemp())
        path.mkdir()
        sizes = LearnedSizes.open(str(path))
        sizes.background = background
        sizes.observe("mvoice", 3000, 2800)
        sizes.observe("mvoice", 3100, 2800)
        sizes.observe("whisper", 1600, 1500)
        self.assertEqual(len(pending), 1)
        self.assertFalse((path / FILE_NAME).exists())
        finish()
        self.assertEqual(len(pending), 1)  # the peaks seen meanwhile, in one write
        finish()
        self.assertEqual(pending, [])
        written = json.loads((path / FILE_NAME).read_text())
        self.assertEqual(written, {"learned_mib": {"mvoice": 3100, "whisper": 1600}})

    def test_footprint_rule(self) -> None:
        """max: the larger of configured and learned; configured: the configured size."""
        sizes = LearnedSizes(None, {"mvoice": 4000})
        self.assertEqual(sizes.footprint("mvoice", 3000, "max"), 4000)
        self.assertEqual(sizes.footprint("mvoice", 5000, "max"), 5000)
        self.assertEqual(sizes.footprint("mvoice", 3000, "configured"), 3000)
        self.assertEqual(sizes.footprint("whisper", 1500, "max"), 1500)

    def test_warned_once_past_a_quarter_above(self) -> None:
        """A learned size more than 25% above the configured one is logged, once."""
        sizes = LearnedSizes(None)
        sizes.observe("mvoice", 3750, 3000)  # exactly 25% above: no warning
        self.assertEqual(self.warnings, [])
        sizes.observe("mvoice", 3800, 3000)
        sizes.observe("mvoice", 4000, 3000)
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("vram_resident_mib", self.warnings[0])

    def test_without_state_dir_nothing_is_written(self) -> None:
        """No state_dir: sizes live in memory only."""
        sizes = LearnedSizes.open(None)
        sizes.observe("a", 100, 50)
        self.assertEqual(sizes.get("a"), 100)
        self.assertFalse(self.dir.exists())

    def test_state_dir_created(self) -> None:
        """A missing state_dir is created, parents included."""
        nested = self.dir / "a" / "b"
        LearnedSizes.open(str(nested)).observe("x", 1, 1)
        self.assertTrue((nested / FILE_NAME).is_file())

    def test_unusable_state_dir(self) -> None:
        """A state_dir that is a file, or not writable, is refused at open."""
        self.dir.mkdir()
        blocker = self.dir / "file"
        blocker.write_text("x")
        self.assertRaises(StateDirError, LearnedSizes.open, str(blocker / "sub"))
        if os.geteuid() != 0:  # root writes anywhere
            locked = self.dir / "locked"
            locked.mkdir(mode=0o500)
            self.assertRaises(StateDirError, LearnedSizes.open, str(locked))

    def test_damaged_file_starts_afresh(self) -> None:
        """Bad JSON, a wrong shape, or damaged entries are logged, never fatal."""
        self.dir.mkdir()
        path = self.dir / FILE_NAME
        for text, kept in (
            ("{not json", {}),
            ("[1, 2]", {}),
            ('{"learned_mib": {"a": 10, "b": "x", "c": -1, "d": true, "e": 1e3}}', {"a": 10}),
        ):
            path.write_text(text)
            sizes = LearnedSizes.open(str(self.dir))
            self.assertEqual({n: sizes.get(n) for n in kept}, kept)
            self.assertIsNone(sizes.get("b"))
        self.assertEqual(len(self.warnings), 3)

    def test_write_failure_is_logged(self) -> None:
        """A file that cannot be written (the dir gone) is logged; the size is still kept."""
        sizes = LearnedSizes.open(str(self.dir))
        self.dir.rmdir()
        sizes.observe("a", 10, 10)
        self.assertEqual(sizes.get("a"), 10)
        self.assertTrue(any("cannot keep" in w for w in self.warnings))

    def test_no_temporary_left_behind(self) -> None:
        """The atomic write leaves only the file itself."""
        sizes = LearnedSizes.open(str(self.dir))
        for mib in range(1, 20):
            sizes.observe("a", mib, 100)
        self.assertEqual(os.listdir(self.dir), [FILE_NAME])

    @settings(max_examples=examples(200), deadline=None)
    @given(st.binary(max_size=300))
    def test_any_file_content_opens(self, content: bytes) -> None:
        """Whatever the file holds, opening gives sizes that are positive ints, or none."""
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / FILE_NAME).write_bytes(content)
        sizes = LearnedSizes.open(str(directory))
        for name, mib in sizes._sizes.items():
            self.assertIsInstance(name, str)
            self.assertGreater(mib, 0)
