"""A bad configuration stops the daemon before it listens, with one readable line."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    CONSUMER_BLOCKS,
    free_port,
    port_open,
    sleep,
    start_daemon_process,
)


def _good_config() -> dict[str, Any]:
    """A valid configuration (nothing listens at the consumers' URLs: it never gets that far)."""
    consumers = {}
    for port, name in enumerate(("mvoice", "comfyui"), start=1):
        block = yaml.safe_load(yaml.safe_dump(dict(CONSUMER_BLOCKS[name])))
        block["url"] = f"http://127.0.0.1:{port}"
        consumers[name] = block
    return {
        "gpu": {"source": "none", "total_mib": 16384},
        "routing": {"tts": "mvoice", "image": "comfyui"},
        "audio_proxy": "mvoice",
        "consumers": consumers,
    }


def _with_unload_body(lines: list[str]) -> str:
    """The good configuration's text, comfyui's unload body replaced by ``lines`` of YAML."""
    config = _good_config()
    config["consumers"]["comfyui"]["unload"]["body"] = {"placeholder": 0}
    text = yaml.safe_dump(config, sort_keys=False)
    indent = " " * 8
    placeholder = f"{indent}placeholder: 0\n"
    assert placeholder in text
    return text.replace(placeholder, "".join(f"{indent}{line}\n" for line in lines))


class BadConfigTests(TestCase):
    """Each test starts the daemon on a bad configuration and watches it exit."""

    timeout = 30

    def setUp(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mgpu-badconfig-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.config_path = self.workdir / "consumers.yaml"

    def write(self, config: dict[str, Any] | str) -> Path:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text, "utf-8")
        return self.config_path

    async def assertRefused(
        self, *expected: str, config: Path | None = None, listen: str = ""
    ) -> str:
        """Run the daemon; it must exit non-zero without ever listening, and say ``expected``
        on one stderr line without a traceback.  Returns that line."""
        port = free_port()
        args = ["--config", str(config or self.config_path)]
        args += ["--listen", listen or f"tcp:{port}:interface=127.0.0.1"]
        proc = start_daemon_process(self.workdir, args)
        self.addCleanup(proc.stop_now)
        listened = False
        deadline = time.monotonic() + 15
        while proc.alive() and time.monotonic() < deadline:
            listened = listened or port_open(port)
            await sleep(0.02)
        listened = listened or port_open(port)
        self.assertFalse(proc.alive(), f"still running after 15 s\n{proc.output()}")
        self.assertFalse(listened, f"the daemon listened on {port}\n{proc.output()}")
        self.assertNotEqual(proc.popen.returncode, 0, proc.output())
        self.assertEqual(proc.popen.returncode, 2, proc.output())
        stderr, stdout = proc.stderr(), proc.stdout()
        self.assertNotIn("Traceback", stderr + stdout)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, f"not one line on stderr:\n{stderr}")
        line = lines[0]
        self.assertTrue(line.startswith("mgpumanager: "), line)
        for text in expected:
            self.assertIn(text, line)
        return line

    async def test_unknown_key(self) -> None:
        """An unknown key is named with its field path."""
        config = _good_config()
        config["consumers"]["mvoice"]["vram_resident"] = 2800
        line = await self.assertRefused(
            str(self.write(config)), "consumers.mvoice.vram_resident", "unknown key"
        )
        self.assertIn("vram_resident_mib", line)  # the keys it expected instead

    async def test_bad_unload_method(self) -> None:
        """A bad HTTP method at consumers.comfyui.unload.method is named with the reason."""
        config = _good_config()
        config["consumers"]["comfyui"]["unload"]["method"] = "FETCH"
        await self.assertRefused(
            str(self.write(config)), "consumers.comfyui.unload.method", "HTTP method"
        )

    async def test_routing_to_undeclared_consumer(self) -> None:
        """Routing a kind to a consumer that is not declared names routing.<kind> and it."""
        config = _good_config()
        config["routing"]["stt"] = "whisper"
        await self.assertRefused(str(self.write(config)), "routing.stt", "'whisper'", "declared")

    async def test_yaml_syntax_error(self) -> None:
        """A YAML syntax error names the file and the line."""
        text = yaml.safe_dump(_good_config(), sort_keys=False) + "routing: [unclosed\n"
        path = self.write(text)
        line = await self.assertRefused(str(path), "YAML")
        self.assertRegex(line, r"line \d+")

    async def test_missing_file(self) -> None:
        """A configuration file that does not exist is named, with the reason."""
        missing = self.workdir / "nowhere" / "consumers.yaml"
        await self.assertRefused(str(missing), "No such file", config=missing)

    async def test_unreadable_token_file(self) -> None:
        """An auth.token_file that cannot be read stops the daemon, naming the field."""
        config = _good_config()
        config["auth"] = {"token_file": str(self.workdir / "no-token")}
        await self.assertRefused(str(self.write(config)), "auth.token_file", "no-token")

    async def test_bad_listen_endpoint(self) -> None:
        """A --listen that is not a Twisted endpoint string is refused, naming it."""
        path = self.write(_good_config())
        await self.assertRefused("--listen", "tcp:notaport", config=path, listen="tcp:notaport")

    async def test_unknown_listen_endpoint_type(self) -> None:
        """A --listen of an unknown endpoint type is refused, naming it."""
        path = self.write(_good_config())
        await self.assertRefused("--listen", "nosuch:1234", config=path, listen="nosuch:1234")

    async def test_port_in_use_exits(self) -> None:
        """A --listen port that another process holds makes the daemon exit non-zero, saying so,
        instead of running without listening."""
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        args = ["--config", str(self.write(_good_config()))]
        args += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        proc = start_daemon_process(self.workdir, args)
        self.addCleanup(proc.stop_now)
        deadline = time.monotonic() + 6
        while proc.alive() and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertFalse(proc.alive(), f"still running, not listening, after 6 s\n{proc.output()}")
        self.assertNotEqual(proc.popen.returncode, 0, proc.output())
        said = proc.stdout() + proc.stderr()
        self.assertIn("already in use", said)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", said)
        self.assertIn("--listen", said)

    async def test_alias_bomb(self) -> None:
        """Nine levels of nine YAML aliases in an unload body (billions of nodes once
        expanded) are refused at once, naming the body field, not expanded."""
        lines = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
        lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
        path = self.write(_with_unload_body(lines))
        started = time.monotonic()
        await self.assertRefused(str(path), "consumers.comfyui.unload.body.l4", "10000 YAML nodes")
        self.assertLess(time.monotonic() - started, 10)

    async def test_recursive_alias(self) -> None:
        """An alias inside its own anchor is refused naming the field, not a RecursionError."""
        path = self.write(_with_unload_body(["x: &a [*a]"]))
        await self.assertRefused(str(path), "consumers.comfyui.unload.body.x[0]", "own anchor")

    async def test_deep_nesting(self) -> None:
        """Lists nested 5,000 deep are refused as deeper than 64 levels."""
        path = self.write(_with_unload_body(["x: " + "[" * 5000 + "]" * 5000]))
        await self.assertRefused(str(path), "consumers.comfyui.unload.body.x[0]", "64 levels")

    async def test_huge_integer(self) -> None:
        """An integer of 5,000 digits is refused naming its field, not a ValueError."""
        text = yaml.safe_dump(_good_config(), sort_keys=False)
        path = self.write(
            text.replace("vram_resident_mib: 2800", "vram_resident_mib: " + "9" * 5000)
        )
        await self.assertRefused(str(path), "consumers.mvoice.vram_resident_mib", "18 digits")

    async def test_url_with_user_info(self) -> None:
        """A consumer url with user:password@ is refused without repeating the password."""
        config = _good_config()
        config["consumers"]["mvoice"]["url"] = "http://user:hunter2@127.0.0.1:1"
        line = await self.assertRefused(
            str(self.write(config)), "consumers.mvoice.url", "user info"
        )
        self.assertNotIn("hunter2", line)

    async def test_control_character_in_a_path(self) -> None:
        """A NUL in a consumer path is refused naming that path."""
        config = _good_config()
        config["consumers"]["mvoice"]["health"]["path"] = "/api/\0health"
        await self.assertRefused(str(self.write(config)), "consumers.mvoice.health.path", "ASCII")

    async def test_good_config_listens(self) -> None:
        """The same good configuration does start and listen (the refusals are the errors')."""
        port = free_port()
        args = ["--config", str(self.write(_good_config()))]
        args += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        proc = start_daemon_process(self.workdir, args)
        self.addCleanup(proc.stop_now)
        deadline = time.monotonic() + 15
        while proc.alive() and not port_open(port) and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertTrue(port_open(port), proc.output())
        await proc.stop()
        self.assertFalse(proc.alive())
