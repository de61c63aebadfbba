"""The ``mgpu`` command against the real daemon under ``twistd`` (SPEC section 8).

Each command is the real program, ``python -m mgpu.cli``, run as a child
process in a thread (``deferToThread(subprocess.run)``, bounded) so the
reactor keeps serving the harness meanwhile; ``mgpu events`` runs in the
background as a ``ManagedProcess`` whose output file the test reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    CONSUMER_BLOCKS,
    ManagedProcess,
    Stack,
    child_env,
    free_port,
    make_config,
    shared_stacks,
    smi_gpu,
    start_daemon,
    token_auth,
    wait_for,
)

#: The longest one ``mgpu`` command may take (it is a second or less).
COMMAND_S = 30.0
#: How long a background ``mgpu events`` may take to show an event.
EVENT_S = 15.0

#: ``python -m mgpu.cli``, with SIGINT's default restored first: a shell that
#: starts the test runner in the background leaves SIGINT ignored, and an
#: ignored SIGINT stays ignored in children, so a Ctrl-C could not be tested.
FOLLOW = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'mgpu'; runpy.run_module('mgpu.cli', run_name='__main__')"
)


@dataclass
class Run:
    """One finished ``mgpu`` command."""

    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout:\n{self.out}\n--- stderr:\n{self.err}"


def cli_env(**extra: str) -> dict[str, str]:
    """The child's environment: none of the caller's ``MGPU_*`` settings, plus ``extra``.

    Output is left buffered (no ``PYTHONUNBUFFERED``), as in a pipe: ``mgpu events``
    must flush each line itself.
    """
    env = {k: v for k, v in child_env().items() if not k.startswith("MGPU_")}
    env.pop("PYTHONUNBUFFERED", None)
    env.update(extra)
    return env


async def mgpu(*args: str, env: dict[str, str] | None = None) -> Run:
    """Run ``mgpu ARGS`` to its end (at most ``COMMAND_S``)."""
    done = await deferToThread(
        subprocess.run,
        [sys.executable, "-m", "mgpu.cli", *args],
        env=env if env is not None else cli_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=COMMAND_S,
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def follow(workdir: Path, name: str, *args: str) -> ManagedProcess:
    """Start ``mgpu ARGS`` in the background; its output goes to files in ``workdir``."""
    return ManagedProcess.start(name, [sys.executable, "-c", FOLLOW, *args], workdir, cli_env())


async def _cli_stack() -> Stack:
    """mvoice (loaded at start, load and unload routes), whisper (no unload route) and
    comfyui (unloaded by one test only) on a card with room for all of them."""
    stack = Stack.new("mgpu-cli-")
    async with stack.starting():
        await stack.add_consumers("mvoice", "whisper", "comfyui", args={"mvoice": ["--preload"]})
        routing = {"tts": "mvoice", "stt": "whisper", "image": "comfyui"}
        await stack.start(make_config(stack.consumers, routing, gpu=smi_gpu()))
    return stack


class CliTests(TestCase):
    """One daemon with three simulated consumers, shared by these tests."""

    timeout = 90

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("cli", _cli_stack)
        assert self.stack.daemon is not None
        self.url = self.stack.daemon.url

    async def status_doc(self) -> dict[str, Any]:
        """``mgpu status --json``, with the URL from ``MGPU_URL``."""
        run = await mgpu("status", "--json", env=cli_env(MGPU_URL=self.url))
        self.assertEqual(run.code, 0, run)
        doc: dict[str, Any] = json.loads(run.out)
        return doc

    async def test_status_shows_every_consumer(self) -> None:
        """``status`` prints the GPU line, a row for every consumer and the scheduler line."""
        run = await mgpu("--url", self.url, "status")
        self.assertEqual((run.code, run.err), (0, ""), run)
        lines = run.out.splitlines()
        self.assertRegex(lines[0], r"^GPU 0: Fake NVIDIA RTX 4090 via nvidia-smi, \d+ / 24564 MiB")
        self.assertTrue(lines[0].endswith(")") and ", ok (read " in lines[0], lines[0])
        for name in ("mvoice", "whisper", "comfyui"):
            rows = [line for line in lines if re.match(rf"{name}\s+(yes|no|\?)\s", line)]
            self.assertEqual(len(rows), 1, f"{name}:\n{run}")
        self.assertRegex(lines[-1], r"^scheduler: holder \w+, queued \d+, running \d+,")

    async def test_unload_then_load(self) -> None:
        """``unload mvoice`` leaves it unloaded in the status; ``load mvoice`` loads it again."""

        async def loaded() -> bool:
            return (await self.status_doc())["consumers"]["mvoice"]["loaded"] is True

        await wait_for(loaded, 10, "mvoice to show loaded")  # --preload, once probed
        run = await mgpu("--url", self.url, "unload", "mvoice")
        self.assertEqual(run.code, 0, run)
        self.assertRegex(run.out, r"^mvoice: unloaded \(\d+\.\d s\)\n$")
        self.assertIs((await self.status_doc())["consumers"]["mvoice"]["loaded"], False)
        run = await mgpu("load", "mvoice", "--url", self.url)
        self.assertEqual(run.code, 0, run)
        self.assertRegex(run.out, r"^mvoice: loaded \(\d+\.\d s\)\n$")
        self.assertIs((await self.status_doc())["consumers"]["mvoice"]["loaded"], True)

    async def test_unload_unknown_consumer(self) -> None:
        """``unload`` of a name the daemon does not know exits 1 with not_found on stderr."""
        run = await mgpu("--url", self.url, "unload", "nope")
        self.assertEqual((run.code, run.out), (1, ""), run)
        self.assertRegex(run.err, r"^error: not_found: .*nope.*\n$")

    async def test_unload_without_a_route(self) -> None:
        """``unload`` of a consumer with no unload route exits 1 with bad_request."""
        run = await mgpu("--url", self.url, "unload", "whisper")
        self.assertEqual(run.code, 1, run)
        self.assertRegex(run.err, r"^error: bad_request: .*whisper")

    async def test_events_show_an_unload(self) -> None:
        """``events --history 10`` (text and ``--json``) started in the background prints
        the unload made meanwhile; Ctrl-C (SIGINT) ends it with exit 0 and nothing on
        stderr. Only this test unloads comfyui, so the line is this unload's."""
        workdir = self.stack.workdir
        text = follow(workdir, "events-text", "--url", self.url, "events", "--history", "10")
        self.addCleanup(text.stop_now)
        as_json = follow(
            workdir, "events-json", "events", "--json", "--history", "10", "--url", self.url
        )
        self.addCleanup(as_json.stop_now)
        run = await mgpu("--url", self.url, "unload", "comfyui")
        self.assertEqual(run.code, 0, run)

        line = re.compile(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  unload    comfyui unloaded \(admin\)$", re.M
        )

        def shown_as_text() -> bool:
            if not text.alive():
                raise AssertionError(f"mgpu events exited\n{text.output()}")
            return line.search(text.stdout()) is not None

        def shown_as_json() -> bool:
            if not as_json.alive():
                raise AssertionError(f"mgpu events --json exited\n{as_json.output()}")
            events = [json.loads(x) for x in as_json.stdout().splitlines()]
            return any(
                e["kind"] == "unload" and e["consumer"] == "comfyui" and e["reason"] == "admin"
                for e in events
            )

        await wait_for(shown_as_text, EVENT_S, f"the unload line\n{text.output()}")
        await wait_for(shown_as_json, EVENT_S, f"the unload event\n{as_json.output()}")
        for follower in (text, as_json):
            os.kill(follower.pid, signal.SIGINT)
            self.assertEqual(await follower.wait_exit(10), 0, follower.output())
            self.assertEqual(follower.stderr(), "", follower.output())

    async def test_check_config_of_the_running_file(self) -> None:
        """``check-config`` accepts the daemon's own file and names a broken field."""
        path = self.stack.workdir / "mgpumanager.yaml"
        run = await mgpu("check-config", str(path))
        self.assertEqual(run.code, 0, run)
        self.assertEqual(run.out.splitlines()[0], f"{path}: valid, 3 consumers")
        doc = yaml.safe_load(path.read_text("utf-8"))
        doc["consumers"]["whisper"]["url"] = "whisper.local"
        broken = write_yaml(self.stack.workdir / "broken.yaml", doc)
        run = await mgpu("check-config", str(broken))
        self.assertEqual((run.code, run.out), (1, ""), run)
        self.assertTrue(run.err.startswith(f"error: {broken}: consumers.whisper.url: "), run)


def write_yaml(path: Path, doc: object) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")
    return path


class UnreachableTests(TestCase):
    """No daemon at the URL."""

    timeout = 60

    async def test_unreachable_url_exits_3(self) -> None:
        """A port nothing listens on: exit 3 and ``error: cannot reach URL: reason``."""
        url = f"http://127.0.0.1:{free_port()}"
        for command in (["status"], ["load", "mvoice"], ["events"]):
            run = await mgpu("--url", url, *command)
            self.assertEqual((run.code, run.out), (3, ""), run)
            self.assertTrue(run.err.startswith(f"error: cannot reach {url}: Connection refused"))
            self.assertIn("MGPU_URL names another address", run.err)


class DaemonGoneTests(TestCase):
    """The daemon stops while ``mgpu events`` follows it."""

    timeout = 60

    async def test_events_exit_3_when_the_daemon_stops(self) -> None:
        """The follower says it lost the stream and exits 3 (it does not hang)."""
        workdir = Path(tempfile.mkdtemp(prefix="mgpu-cli-gone-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        daemon = await start_daemon(workdir, extra_args=["--demo"])
        self.addCleanup(daemon.process.stop_now)
        follower = follow(workdir, "events", "--url", daemon.url, "events", "--history", "5")
        self.addCleanup(follower.stop_now)
        run = await mgpu("--url", daemon.url, "unload", "mvoice")
        self.assertEqual(run.code, 0, run)
        await wait_for(
            lambda: "mvoice unloaded" in follower.stdout(), EVENT_S, "the follower's unload line"
        )
        await daemon.process.stop()
        self.assertEqual(await follower.wait_exit(10), 3, follower.output())
        self.assertEqual(
            follower.stderr(),
            f"error: lost the event stream of {daemon.url}: "
            "the connection closed in the middle of the answer\n",
        )


TOKEN = "cli-t0ken-for-the-integration-tests"


async def _auth_stack() -> Stack:
    stack = Stack.new("mgpu-cli-auth-")
    async with stack.starting():
        await stack.add_consumers("mvoice")
        config = make_config(
            stack.consumers, {"tts": "mvoice"}, auth=token_auth(stack.workdir, TOKEN)
        )
        await stack.start(config)
    return stack


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, "utf-8")
    return path


class TokenTests(TestCase):
    """A daemon with ``auth.token_file``."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("cli-auth", _auth_stack)
        assert self.stack.daemon is not None
        self.url = self.stack.daemon.url
        self.good = self.stack.workdir / "token"
        self.bad = write_text(self.stack.workdir / "wrong-token", "not-the-token\n")

    def assertTokenHidden(self, run: Run) -> None:
        self.assertNotIn(TOKEN, run.out + run.err)
        self.assertNotIn("not-the-token", run.out + run.err)

    async def test_token_file(self) -> None:
        """``--token-file`` (or ``MGPU_TOKEN_FILE``) with the right token is let in."""
        run = await mgpu("--url", self.url, "--token-file", str(self.good), "status")
        self.assertEqual(run.code, 0, run)
        self.assertRegex(run.out, r"(?m)^mvoice\s")
        self.assertTokenHidden(run)
        env = cli_env(MGPU_URL=self.url, MGPU_TOKEN_FILE=str(self.good))
        run = await mgpu("status", "--json", env=env)
        self.assertEqual(run.code, 0, run)
        self.assertIn("mvoice", json.loads(run.out)["consumers"])

    async def test_wrong_or_no_token(self) -> None:
        """A wrong token, or none, exits 1 with unauthorized, for calls and the event stream."""
        commands = [
            ["--token-file", str(self.bad), "status"],
            ["--token-file", str(self.bad), "unload", "mvoice"],
            ["--token-file", str(self.bad), "events"],
            ["status"],
        ]
        for command in commands:
            run = await mgpu("--url", self.url, *command)
            self.assertEqual((run.code, run.out), (1, ""), f"{command}: {run}")
            self.assertTrue(run.err.startswith("error: unauthorized: "), f"{command}: {run}")
            self.assertTokenHidden(run)


async def _reload_stack() -> Stack:
    stack = Stack.new("mgpu-cli-reload-")
    async with stack.starting():
        await stack.add_consumers("mvoice", "whisper")
        routing = {"tts": "mvoice", "stt": "whisper"}
        await stack.start(make_config(stack.consumers, routing))
    return stack


class ReloadTests(TestCase):
    """``mgpu reload`` after the daemon's file is edited."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.stack = await shared_stacks.get("cli-reload", _reload_stack)
        assert self.stack.daemon is not None
        self.url = self.stack.daemon.url
        self.path = self.stack.workdir / "mgpumanager.yaml"
        original = self.path.read_text("utf-8")
        self.addCleanup(self.path.write_text, original, "utf-8")
        self.doc = yaml.safe_load(original)

    async def test_reload_applies_the_edit(self) -> None:
        """A changed priority and a new consumer: ``reload`` answers reloaded, names the
        added consumer, and ``status`` shows it."""
        self.doc["consumers"]["mvoice"]["priority"] = 4
        comfyui = json.loads(json.dumps(CONSUMER_BLOCKS["comfyui"]))
        self.doc["consumers"]["comfyui"] = {**comfyui, "url": f"http://127.0.0.1:{free_port()}"}
        write_yaml(self.path, self.doc)
        run = await mgpu("--url", self.url, "reload")
        self.assertEqual(run.code, 0, run)
        self.assertTrue(run.out.startswith("reloaded: added comfyui; removed none;"), run)
        run = await mgpu("--url", self.url, "status", "--json")
        self.assertIn("comfyui", json.loads(run.out)["consumers"], run)

    async def test_bad_edit_is_refused(self) -> None:
        """An invalid file: ``reload`` exits 1 with bad_request naming the field, and the
        daemon keeps running on the old file."""
        self.doc["consumers"]["whisper"]["priority"] = 9
        write_yaml(self.path, self.doc)
        run = await mgpu("--url", self.url, "reload")
        self.assertEqual((run.code, run.out), (1, ""), run)
        self.assertTrue(run.err.startswith("error: bad_request: "), run)
        self.assertIn("consumers.whisper.priority", run.err)
        run = await mgpu("--url", self.url, "status")
        self.assertEqual(run.code, 0, run)
