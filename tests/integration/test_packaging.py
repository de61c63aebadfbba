"""The wheel as users install it: the twistd plugin is found from a fresh virtual environment."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.harness import REPO_ROOT, shared_stacks

#: Left out of the copy the wheel is built from: local state, never part of a release.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "_trial_temp*", "*.egg-info", "__pycache__",
    ".mypy_cache", ".ruff_cache", ".hypothesis", "dropin.cache", "out",
)  # fmt: skip
#: pip's words when no package index (or the one it needs) can be reached.
_NO_INDEX = re.compile(
    r"No matching distribution found|Could not find a version that satisfies"
    r"|Failed to establish a new connection|Network is unreachable|Temporary failure in name"
    r"|Max retries exceeded|ProxyError|connection refused",
    re.IGNORECASE,
)


def _run(argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command to its end; its output, or ``AssertionError`` with it on failure."""
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    output = result.stdout.decode("utf-8", "replace")
    if result.returncode != 0:
        if _NO_INDEX.search(output):
            raise SkipTest(f"no package index reachable: {' '.join(argv[:4])}...\n{output[-1500:]}")
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{output[-4000:]}")
    return output


def _clean_env() -> dict[str, str]:
    """This environment without anything that points Python at the working tree or our venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class PackagingTests(TestCase):
    """Build the wheel, install it in a new venv, ask its twistd for the plugin."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        await shared_stacks.release()  # no daemon competes for the CPUs with the build
        self.tmp = Path(tempfile.mkdtemp(prefix="mgpu-packaging-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def build_wheel(self) -> Path:
        """Build from a copy of the tree, so the build leaves nothing in the working tree."""
        source = self.tmp / "src"
        shutil.copytree(REPO_ROOT, source, ignore=_NOT_SOURCES, symlinks=True)
        dist = self.tmp / "dist"
        if importlib.util.find_spec("build") is not None:
            argv = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)]
        else:
            argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)]
        _run(argv, self.tmp, 240, _clean_env())
        wheels = list(dist.glob("mgpumanager-*.whl"))
        self.assertEqual(len(wheels), 1, wheels)
        return wheels[0]

    def check_wheel(self, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
        self.assertIn("twisted/plugins/mgpumanager_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/plugins/dropin.cache", names)
        modules = {
            path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "mgpu").rglob("*.py")
        }
        self.assertIn("mgpu/tap.py", modules)
        self.assertEqual(modules - names, set(), "modules missing from the wheel")
        self.assertFalse([n for n in names if n.startswith("tests/")], "tests in the wheel")

    def install_and_ask_twistd(self, wheel: Path) -> tuple[str, str]:
        venv = self.tmp / "venv"
        env = _clean_env()
        _run([sys.executable, "-m", "venv", str(venv)], self.tmp, 120, env)
        python = venv / "bin" / "python"
        _run([str(python), "-m", "pip", "install", "-q", str(wheel)], self.tmp, 240, env)
        elsewhere = self.tmp / "elsewhere"
        elsewhere.mkdir()
        twistd = str(venv / "bin" / "twistd")
        listing = _run([twistd, "--help"], elsewhere, 60, env)
        options = _run([twistd, "mgpumanager", "--help"], elsewhere, 60, env)
        return listing, options

    async def test_wheel_installs_a_working_twistd_plugin(self) -> None:
        """The built wheel holds every mgpu module and the plugin without twisted/__init__.py,
        and a fresh venv's twistd lists mgpumanager from another directory."""
        wheel = await deferToThread(self.build_wheel)
        self.check_wheel(wheel)
        listing, options = await deferToThread(self.install_and_ask_twistd, wheel)
        self.assertRegex(listing, r"(?m)^\s+mgpumanager\s", listing)
        self.assertIn("--config", options)
        self.assertIn("--demo", options)
