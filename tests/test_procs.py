"""Which processes are a consumer: fake /proc and cgroup trees, and the real /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mgpu.procs import (
    PID_MAX,
    Attribution,
    Listener,
    ProcError,
    ProcTable,
    attribute,
    is_local_host,
    parse_net_tcp,
    unit_name,
)
from tests.fuzz import examples

_TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)
_ANYWHERE_V4 = "00000000"
_LOOPBACK_V4 = "0100007F"
_ANYWHERE_V6 = "0" * 32
_LOOPBACK_V6 = "00000000000000000000000001000000"


def _tcp_line(number: int, address: str, port: int, state: str, inode: int) -> str:
    remote = "0" * len(address)
    return (
        f"{number:4}: {address}:{port:04X} {remote}:0000 {state} 00000000:00000000"
        f" 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


class FakeHost:
    """A /proc and a cgroup tree in a temporary directory, written the kernel's way."""

    def __init__(self, root: str) -> None:
        self.proc = os.path.join(root, "proc")
        self.cgroup = os.path.join(root, "cgroup")
        os.makedirs(os.path.join(self.proc, "net"))
        os.makedirs(self.cgroup)
        self.listen(v4=[], v6=[])

    def table(self) -> ProcTable:
        return ProcTable(proc_root=self.proc, cgroup_root=self.cgroup)

    def listen(
        self, v4: list[tuple[int, int]], v6: list[tuple[int, int]], established: int = 0
    ) -> None:
        """Rewrite tcp and tcp6: the listeners given as (port, inode), plus a connected
        socket on every listened port (state 01), which must not count."""
        for name, address, items in (
            ("tcp", _LOOPBACK_V4, v4),
            ("tcp6", _ANYWHERE_V6, v6),
        ):
            lines = [_TCP_HEADER]
            for n, (port, inode) in enumerate(items):
                lines.append(_tcp_line(2 * n, address, port, "0A", inode))
                lines.append(_tcp_line(2 * n + 1, address, port, "01", inode + 100_000))
            self.write(os.path.join("net", name), "".join(lines))

    def write(self, relative: str, text: str) -> None:
        with open(os.path.join(self.proc, relative), "w") as handle:
            handle.write(text)

    def process(
        self,
        pid: int,
        ppid: int = 1,
        comm: str = "worker",
        sockets: tuple[int, ...] = (),
        state: str = "S",
    ) -> None:
        """A process directory: stat, comm, and descriptors (a file, then sockets)."""
        directory = os.path.join(self.proc, str(pid))
        os.makedirs(os.path.join(directory, "fd"), exist_ok=True)
        self.write(
            os.path.join(str(pid), "stat"),
            f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0\n",
        )
        self.write(os.path.join(str(pid), "comm"), comm + "\n")
        os.symlink("/dev/null", os.path.join(directory, "fd", "0"))
        for fd, inode in enumerate(sockets, start=3):
            os.symlink(f"socket:[{inode}]", os.path.join(directory, "fd", str(fd)))

    def drop_socket(self, pid: int, inode: int) -> None:
        fd_dir = os.path.join(self.proc, str(pid), "fd")
        for fd in os.listdir(fd_dir):
            if os.readlink(os.path.join(fd_dir, fd)) == f"socket:[{inode}]":
                os.unlink(os.path.join(fd_dir, fd))

    def gone(self, pid: int) -> None:
        directory = os.path.join(self.proc, str(pid))
        for fd in os.listdir(os.path.join(directory, "fd")):
            os.unlink(os.path.join(directory, "fd", fd))
        os.rmdir(os.path.join(directory, "fd"))
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)

    def cgroup_dir(self, relative: str, pids: tuple[int, ...] = ()) -> str:
        directory = os.path.join(self.cgroup, relative)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "cgroup.procs"), "w") as handle:
            handle.write("".join(f"{pid}\n" for pid in pids))
        return directory


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.host = FakeHost(self.mktemp())
        self.table = self.host.table()

    def pid_file(self, content: str) -> str:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(content)
        return path


class PortTests(_Base):
    def test_ipv4_listener_and_its_children(self) -> None:
        """The process holding the socket listening on the URL's port (127.0.0.1), its
        descendants with it; another process and a connected socket do not count."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(100, comm="python3", sockets=(5001,))
        self.host.process(101, ppid=100, comm="child")
        self.host.process(102, ppid=1, comm="stranger", sockets=(105_001,))
        found = attribute(self.table, "http://127.0.0.1:8188/prompt")
        self.assertEqual(found, Attribution(frozenset({100, 101}), "port", None))

    def test_ipv6_listener(self) -> None:
        """A socket listening only in tcp6 (on ::) is found for a [::1] URL."""
        self.host.listen(v4=[(9000, 1)], v6=[(11434, 7002)])
        self.host.process(200, comm="ollama", sockets=(7002,))
        self.host.process(201, ppid=200, comm="ollama runner")
        self.host.process(300, comm="other", sockets=(1,))
        found = attribute(self.table, "http://[::1]:11434")
        self.assertEqual(found, Attribution(frozenset({200, 201}), "port", None))

    def test_default_port_of_the_scheme(self) -> None:
        """A URL without a port means 80 for http."""
        self.host.listen(v4=[(80, 9)], v6=[])
        self.host.process(10, sockets=(9,))
        self.assertEqual(attribute(self.table, "http://localhost/").pids, frozenset({10}))

    def test_cached_answer_reused_while_it_still_holds(self) -> None:
        """Once found, the holder is re-checked, not searched for again: a process that
        starts holding the same socket later is not seen while the first still holds it."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(100, sockets=(5001,))
        self.assertEqual(self.table.listening_pids(8188), frozenset({100}))
        self.host.process(300, sockets=(5001,))
        self.assertEqual(self.table.listening_pids(8188), frozenset({100}))
        self.assertEqual(self.host.table().listening_pids(8188), frozenset({100, 300}))

    def test_cache_invalidated_when_the_listener_is_replaced(self) -> None:
        """A restarted service (new socket, new pid) is found, not the remembered one."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(100, sockets=(5001,))
        self.assertEqual(self.table.listening_pids(8188), frozenset({100}))
        self.host.drop_socket(100, 5001)
        self.host.listen(v4=[(8188, 6001)], v6=[])
        self.host.process(400, sockets=(6001,))
        self.assertEqual(self.table.listening_pids(8188), frozenset({400}))

    def test_cache_invalidated_when_the_holder_exits(self) -> None:
        """Same socket, but the remembered process is gone: the one still holding it is found."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(100, sockets=(5001,))
        self.host.process(400, ppid=100, sockets=(5001,))
        self.assertEqual(self.table.listening_pids(8188), frozenset({100, 400}))
        self.host.gone(100)
        self.assertEqual(self.table.listening_pids(8188), frozenset({400}))

    def test_nothing_listening(self) -> None:
        """No LISTEN socket on the port (only a connected one): said so, source port."""
        self.host.listen(v4=[(9000, 1)], v6=[])
        self.host.process(10, sockets=(1,))
        found = attribute(self.table, "http://127.0.0.1:10000")
        self.assertEqual(found, Attribution(frozenset(), "port", "nothing listens on port 10000"))
        self.assertEqual(
            attribute(self.table, "http://127.0.0.1:9001").error, "nothing listens on port 9001"
        )

    def test_another_users_process(self) -> None:
        """The listener's descriptors cannot be listed (another user's, without root):
        the error says so and what to set instead."""
        if os.geteuid() == 0:
            self.skipTest("root reads every process's descriptors")
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(100, sockets=(5001,))
        self.host.process(101)
        fd_dir = os.path.join(self.host.proc, "100", "fd")
        os.chmod(fd_dir, 0)
        self.addCleanup(os.chmod, fd_dir, 0o755)
        found = attribute(self.table, "http://127.0.0.1:8188")
        self.assertEqual(
            found,
            Attribution(
                frozenset(),
                "port",
                "port 8188 is listened on by a process this daemon cannot inspect"
                " (another user's; run as root or set process.systemd_unit or process.pid_file)",
            ),
        )

    def test_listener_no_process_holds(self) -> None:
        """A listening socket no visible process holds is an error, not an empty success."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(100, sockets=(42,))
        found = attribute(self.table, "http://localhost:8188")
        self.assertEqual(found.pids, frozenset())
        self.assertEqual(found.source, "port")
        self.assertIn("port 8188 is listened on by a socket no process", found.error or "")

    def test_socket_activation_holder_is_not_the_service(self) -> None:
        """systemd holds a socket-activated listener too; the service is the other holder,
        and while only systemd holds it the service has not started."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        self.host.process(1, ppid=0, comm="systemd", sockets=(5001,))
        found = attribute(self.table, "http://127.0.0.1:8188")
        self.assertEqual(found.pids, frozenset())
        self.assertIn("held only by systemd", found.error or "")
        self.host.process(500, ppid=1, comm="whisper", sockets=(5001,))
        found = attribute(self.host.table(), "http://127.0.0.1:8188")
        self.assertEqual(found, Attribution(frozenset({500}), "port", None))

    def test_non_local_host(self) -> None:
        """A consumer on another machine has no processes here: source none."""
        found = attribute(self.table, "http://10.0.0.5:8188")
        self.assertEqual(
            found,
            Attribution(
                frozenset(),
                "none",
                "the URL's host 10.0.0.5 is not local: set process.systemd_unit"
                " or process.pid_file",
            ),
        )

    def test_bad_url(self) -> None:
        """A URL whose port cannot be read is an error, not an exception."""
        found = attribute(self.table, "http://127.0.0.1:99999")
        self.assertEqual((found.pids, found.source), (frozenset(), "none"))
        self.assertIn("bad URL", found.error or "")

    def test_malformed_table_is_an_error(self) -> None:
        """A truncated /proc/net/tcp line becomes the attribution's error."""
        self.host.write("net/tcp", _TCP_HEADER + "   0: 0100007F:1F90 00000000:0000 0A\n")
        found = attribute(self.table, "http://127.0.0.1:8080")
        self.assertEqual((found.pids, found.source), (frozenset(), "port"))
        self.assertIn("line 2 is malformed", found.error or "")

    def test_missing_proc_is_an_error(self) -> None:
        """A proc root without net tables: an error naming the file."""
        table = ProcTable(proc_root=self.mktemp(), cgroup_root=self.host.cgroup)
        found = attribute(table, "http://127.0.0.1:8080")
        self.assertEqual((found.pids, found.source), (frozenset(), "port"))
        self.assertIn("net/tcp does not exist", found.error or "")

    def test_missing_tcp6_means_no_ipv6(self) -> None:
        """Without tcp6 (IPv6 disabled) the v4 table alone answers."""
        self.host.listen(v4=[(8188, 5001)], v6=[])
        os.unlink(os.path.join(self.host.proc, "net", "tcp6"))
        self.host.process(100, sockets=(5001,))
        self.assertEqual(self.table.listening_pids(8188), frozenset({100}))


class NetTcpParseTests(SynchronousTestCase):
    def test_listeners_only(self) -> None:
        """LISTEN lines give (port, inode); other states are ignored."""
        text = (
            _TCP_HEADER
            + _tcp_line(0, _LOOPBACK_V4, 8188, "0A", 11)
            + _tcp_line(1, _LOOPBACK_V4, 8189, "06", 12)
            + _tcp_line(2, _LOOPBACK_V6, 0xFFFF, "0A", 13)
        ).encode()
        self.assertEqual(
            parse_net_tcp(text, "tcp"),
            frozenset({Listener(port=8188, inode=11), Listener(port=65535, inode=13)}),
        )

    def test_refused(self) -> None:
        """No header, a short line, a bad address or inode: ProcError naming the file."""
        good = _tcp_line(0, _LOOPBACK_V4, 8188, "0A", 11)
        for text in (
            "",
            good,
            _TCP_HEADER + good.replace(":1FFC", ":1_FF"),
            _TCP_HEADER + good.replace(_LOOPBACK_V4, "0100007"),
            _TCP_HEADER + good.replace(" 11 ", " 1" + "0" * 30 + " "),
            _TCP_HEADER + "   0: 0100007F:1FFC\n",
        ):
            with self.assertRaises(ProcError) as caught:
                parse_net_tcp(text.encode(), "somewhere/tcp")
            self.assertIn("somewhere/tcp", str(caught.exception))

    @settings(max_examples=examples(200), deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=400),
            st.lists(
                st.sampled_from([b"0A", b":", b"0100007F:1F90", b"12", b" ", b"\n", b"\xff"]),
                max_size=40,
            ).map(lambda parts: _TCP_HEADER.encode() + b"".join(parts)),
        )
    )
    def test_any_bytes_parse_or_raise_proc_error(self, data: bytes) -> None:
        """Whatever the bytes, parsing gives listeners with ports that fit 16 bits, or
        ProcError; never another exception."""
        try:
            listeners = parse_net_tcp(data, "tcp")
        except ProcError:
            return
        for listener in listeners:
            self.assertTrue(0 <= listener.port <= 0xFFFF)


class UnitTests(_Base):
    def test_unit_with_children_cgroups(self) -> None:
        """Every pid of the unit's cgroup and of the cgroups below it; ``.service``
        appended to a bare name."""
        self.host.cgroup_dir("system.slice/comfyui.service", (100,))
        self.host.cgroup_dir("system.slice/comfyui.service/worker", (101, 102))
        self.host.cgroup_dir("system.slice/comfyui.service/worker/deep", (103,))
        self.host.cgroup_dir("system.slice/other.service", (200,))
        found = attribute(self.table, "http://127.0.0.1:8188", systemd_unit="comfyui")
        self.assertEqual(found, Attribution(frozenset({100, 101, 102, 103}), "unit", None))

    def test_user_unit(self) -> None:
        """A user's service is found under user.slice."""
        self.host.cgroup_dir(
            "user.slice/user-1000.slice/user@1000.service/app.slice/ollama.service", (7, 8)
        )
        found = attribute(self.table, "http://127.0.0.1:11434", systemd_unit="ollama.service")
        self.assertEqual(found, Attribution(frozenset({7, 8}), "unit", None))

    def test_unit_in_another_slice(self) -> None:
        """A unit placed in its own slice is found by the bounded search of the tree."""
        self.host.cgroup_dir("gpu.slice/vllm.service", (9,))
        self.assertEqual(self.table.unit_pids("vllm"), frozenset({9}))

    def test_unit_missing(self) -> None:
        """A unit with no cgroup is named and said not to be running."""
        self.host.cgroup_dir("system.slice/other.service", (200,))
        found = attribute(self.table, "http://127.0.0.1:8188", systemd_unit="comfyui")
        self.assertEqual((found.pids, found.source), (frozenset(), "unit"))
        self.assertIn("unit comfyui.service is not running", found.error or "")

    def test_unit_without_processes(self) -> None:
        """A unit whose cgroup is empty has no processes, and says so."""
        self.host.cgroup_dir("system.slice/comfyui.service")
        found = attribute(self.table, "x", systemd_unit="comfyui.service")
        self.assertEqual(
            found, Attribution(frozenset(), "unit", "unit comfyui.service has no processes")
        )

    def test_malformed_cgroup_procs(self) -> None:
        """cgroup.procs that is not a list of pids is an error, not an exception."""
        self.host.cgroup_dir("system.slice/comfyui.service")
        with open(
            os.path.join(self.host.cgroup, "system.slice/comfyui.service/cgroup.procs"), "w"
        ) as handle:
            handle.write("12\nnope\n")
        found = attribute(self.table, "x", systemd_unit="comfyui")
        self.assertIn("is malformed", found.error or "")

    def test_unit_names(self) -> None:
        """A known suffix is kept, anything else gets ``.service``; path-like names refused."""
        self.assertEqual(unit_name("ollama"), "ollama.service")
        self.assertEqual(unit_name("app-1.2"), "app-1.2.service")
        self.assertEqual(unit_name("run-x.scope"), "run-x.scope")
        for bad in ("", "..", "../etc", "a/b", "a\0b"):
            self.assertRaises(ProcError, unit_name, bad)


class PidFileTests(_Base):
    def test_good_pid_file_with_descendants(self) -> None:
        """The pid in the file, whitespace ignored, and its descendants."""
        self.host.process(100)
        self.host.process(101, ppid=100)
        self.host.process(102, ppid=101)
        self.host.process(103, ppid=1)
        found = attribute(self.table, "http://x", pid_file=self.pid_file("  100\n"))
        self.assertEqual(found, Attribution(frozenset({100, 101, 102}), "pid_file", None))

    def test_refused_contents(self) -> None:
        """Empty, garbage, zero, negative, huge: each a clear error."""
        for content, expected in (
            ("", "is empty"),
            (" \n", "is empty"),
            ("abc\n", "does not hold a pid: b'abc'"),
            ("12 13", "does not hold a pid"),
            ("0", "does not hold a pid"),
            ("-5", "does not hold a pid"),
            (str(PID_MAX + 1), "does not hold a pid"),
            ("9" * 5000, "does not hold a pid"),
            ("1" + " " * 100, "does not hold a pid"),
        ):
            found = attribute(self.table, "x", pid_file=self.pid_file(content))
            self.assertEqual((found.pids, found.source), (frozenset(), "pid_file"))
            self.assertIn(expected, found.error or "", content[:20])

    def test_missing_file_and_fifo(self) -> None:
        """A missing file says why; a FIFO is refused at once instead of blocking."""
        found = attribute(self.table, "x", pid_file="/nonexistent/x.pid")
        self.assertIn("cannot be read: No such file", found.error or "")
        fifo = self.mktemp()
        os.mkfifo(fifo)
        found = attribute(self.table, "x", pid_file=fifo)
        self.assertIn("is not a regular file", found.error or "")

    def test_dead_pid(self) -> None:
        """A pid with no process, or a zombie, is not running."""
        self.host.process(300, state="Z")
        for pid in ("200", "300"):
            path = self.pid_file(pid)
            found = attribute(self.table, "x", pid_file=path)
            self.assertEqual(
                found,
                Attribution(frozenset(), "pid_file", f"pid {pid} from {path} is not running"),
            )

    @settings(max_examples=examples(200), deadline=None)
    @given(st.binary(max_size=100))
    def test_any_pid_file_is_a_pid_or_proc_error(self, data: bytes) -> None:
        """Any bytes: a pid in range, or ProcError."""
        path = os.path.join(self.host.proc, "fuzz.pid")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            pid = self.table.read_pid_file(path)
        except ProcError:
            return
        self.assertTrue(0 < pid <= PID_MAX)
        self.assertEqual(pid, int(data.strip()))


class DescendantsTests(_Base):
    def test_awkward_names_and_zombies(self) -> None:
        """Command names with spaces and ')' do not shift the parent field; zombies and
        processes that vanished mid-scan are left out; unrelated processes too."""
        self.host.process(100, comm="a) (b c")
        self.host.process(101, ppid=100, comm="x) S 999 (")
        self.host.process(102, ppid=101, comm=")")
        self.host.process(103, ppid=100, comm="dead", state="Z")
        self.host.process(104, ppid=103, comm="orphan-to-be")
        self.host.process(105, ppid=999, comm="other")
        os.makedirs(os.path.join(self.host.proc, "106"))  # vanished: no stat left
        self.assertEqual(self.table.descendants(frozenset({100, 106})), frozenset({100, 101, 102}))
        self.assertEqual(self.table.name(101), "x) S 999 (")
        self.assertIsNone(self.table.name(106))

    def test_malformed_stat_is_an_error(self) -> None:
        """A stat line without a parent field is ProcError, not a wrong tree."""
        self.host.process(100)
        self.host.write("100/stat", "100 (x)\n")
        self.assertRaises(ProcError, self.table.descendants, frozenset({100}))

    def test_children_not_read_keeps_the_pid(self) -> None:
        """When the table cannot be scanned for children, the pid itself is kept and the
        reason given."""
        self.host.process(100)
        self.host.process(101, ppid=100)
        self.host.write("101/stat", "garbage")
        found = attribute(self.table, "x", pid_file=self.pid_file("100"))
        self.assertEqual(found.pids, frozenset({100}))
        self.assertIn("children not read", found.error or "")


class LocalHostTests(SynchronousTestCase):
    def test_local_hosts(self) -> None:
        """Loopback, localhost, unspecified addresses and this host's own name."""
        for host in (
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST.",
            "api.localhost",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            socket.gethostname(),
            socket.gethostname().upper(),
        ):
            self.assertTrue(is_local_host(host), host)

    def test_other_hosts(self) -> None:
        for host in (
            "10.0.0.1",
            "192.168.1.2",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "example.com",
            "",
        ):
            self.assertFalse(is_local_host(host), host)


class RealProcTests(SynchronousTestCase):
    """Against this host's /proc: the test process itself and a child of it."""

    def test_own_listening_socket(self) -> None:
        """A socket this process listens on is attributed to this process, by port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        found = attribute(ProcTable(), f"http://127.0.0.1:{port}")
        self.assertEqual((found.source, found.error), ("port", None))
        self.assertIn(os.getpid(), found.pids)

    def test_child_is_a_descendant(self) -> None:
        """A child process started here is among this process's descendants, and alive."""
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        table = ProcTable()
        self.assertTrue(table.alive(child.pid))
        self.assertIn(child.pid, table.descendants(frozenset({os.getpid()})))
