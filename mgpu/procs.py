# -*- test-case-name: tests.test_procs -*-
"""Which processes are each consumer: by systemd unit, by pid file, or by listening port.

GPU memory is held per process (NVML and nvidia-smi list pids), so the broker
needs, for every consumer, the pids that are that service, children included:
Ollama's ``ollama serve`` starts ``ollama runner`` children, and those hold the
memory.  ``attribute`` never raises: whatever cannot be read becomes an
``Attribution`` with the reason, as a GPU reader's failure becomes a snapshot
with one, because the broker must say why it cannot tell rather than fail.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterator
from typing import Final, Protocol
from urllib.parse import urlsplit

from attrs import frozen

#: The kernel's ceiling on pids (``PID_MAX_LIMIT`` on 64-bit Linux): no pid is larger.
PID_MAX: Final = 4_194_304
#: A pid file longer than this holds no pid (a pid and some whitespace are far shorter).
PID_FILE_MAX_BYTES: Final = 64
#: How deep the cgroup tree is searched for a unit outside ``system.slice``.
UNIT_SEARCH_DEPTH: Final = 6
#: Ports whose listener is remembered; consumers are few, so this is never reached in use.
CACHE_PORTS: Final = 64

_LISTEN: Final = b"0A"
_UNIT_SUFFIXES: Final = frozenset(
    {
        ".service",
        ".scope",
        ".slice",
        ".socket",
        ".mount",
        ".automount",
        ".swap",
        ".target",
        ".path",
        ".timer",
        ".device",
    }
)
#: Processes that hold a listening socket for another (systemd socket activation).
_SOCKET_ACTIVATORS: Final = frozenset({"systemd"})
#: States of a process that has exited but is not yet reaped: it holds no memory.
_DEAD_STATES: Final = frozenset({b"Z", b"X", b"x"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_LOCAL_ADDRESS: Final = re.compile(rb"(?:[0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):([0-9A-Fa-f]{4})")
_DECIMAL: Final = re.compile(rb"[0-9]{1,20}")
_SOCKET_LINK: Final = re.compile(r"socket:\[([0-9]{1,20})\]")


class ProcError(Exception):
    """Something under ``/proc``, the cgroup tree or a pid file could not be read."""


@frozen
class Attribution:
    """Which processes are one consumer, and how that was found."""

    pids: frozenset[int]
    source: str
    error: str | None


@frozen
class Listener:
    """One listening TCP socket of ``/proc/net/tcp*``: its local port and socket inode."""

    port: int
    inode: int


@frozen
class _Holder:
    """A process found holding a listening socket: what the port cache remembers."""

    inode: int
    pid: int


@frozen
class _Stat:
    """What ``/proc/<pid>/stat`` says that attribution uses."""

    state: bytes
    ppid: int


class ProcessTable(Protocol):
    """What attribution reads of the host; the demo substitutes a simulated one.

    Every method raises ``ProcError`` with a clear message when something
    cannot be read.
    """

    def listening_pids(self, port: int) -> frozenset[int]:
        """Pids holding a LISTEN socket on TCP ``port`` (v4 or v6, any local address)."""
        ...

    def unit_pids(self, unit: str) -> frozenset[int]:
        """Every pid in the unit's cgroup, sub-cgroups included."""
        ...

    def read_pid_file(self, path: str) -> int:
        """The pid a pid file holds."""
        ...

    def alive(self, pid: int) -> bool:
        """Whether ``pid`` is a running (not exited, not zombie) process."""
        ...

    def descendants(self, pids: frozenset[int]) -> frozenset[int]:
        """``pids`` plus all their descendants, those alive only."""
        ...

    def name(self, pid: int) -> str | None:
        """The process's command name (``comm``); None when gone or unreadable."""
        ...


def parse_net_tcp(data: bytes, where: str) -> frozenset[Listener]:
    """The listening sockets in the text of ``/proc/net/tcp`` or ``tcp6``.

    Only LISTEN lines are read past their state; a line too short to have an
    inode, or a LISTEN line whose address or inode is not what the kernel
    writes, is a ``ProcError`` naming ``where`` and the line.
    """
    lines = data.splitlines()
    if not lines or lines[0].split()[:1] != [b"sl"]:
        raise ProcError(f"{where} has no header line: not a /proc/net/tcp table")
    listeners = set()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 10:
            raise ProcError(f"{where} line {number} is malformed")
        if fields[3] != _LISTEN:
            continue
        address = _LOCAL_ADDRESS.fullmatch(fields[1])
        if address is None or _DECIMAL.fullmatch(fields[9]) is None:
            raise ProcError(f"{where} line {number} is malformed")
        listeners.add(Listener(port=int(address.group(1), 16), inode=int(fields[9])))
    return frozenset(listeners)


def unit_name(unit: str) -> str:
    """``unit`` with ``.service`` appended when it has no unit suffix; refused when it
    could name a path rather than a unit."""
    if not unit or "/" in unit or "\0" in unit or unit in (".", ".."):
        raise ProcError(f"{unit!r} is not a systemd unit name")
    _, dot, suffix = unit.rpartition(".")
    return unit if dot and f".{suffix}" in _UNIT_SUFFIXES else f"{unit}.service"


def _parse_stat(data: bytes, where: str) -> _Stat:
    """State and parent pid from a stat line; the command name, in parentheses, may
    itself hold spaces and ``)``, so the fields start after the last ``)``."""
    _, paren, rest = data.rpartition(b")")
    fields = rest.split()
    if not paren or len(fields) < 2 or _DECIMAL.fullmatch(fields[1]) is None:
        raise ProcError(f"{where} is malformed")
    return _Stat(state=fields[0], ppid=int(fields[1]))


def _gone(exc: OSError) -> bool:
    """Whether an error reading under ``/proc/<pid>`` means the process has exited."""
    return exc.errno in (errno.ENOENT, errno.ESRCH)


def _subdirectories(directory: str) -> list[os.DirEntry[str]]:
    """The directories in ``directory`` (no symlinks); none when it cannot be listed."""
    try:
        with os.scandir(directory) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _find_directory(top: str, name: str, depth: int) -> str | None:
    """The shallowest directory called ``name`` at most ``depth`` levels below ``top``."""
    level = [top]
    for _ in range(depth):
        below = []
        for directory in level:
            for entry in _subdirectories(directory):
                if entry.name == name:
                    return entry.path
                below.append(entry.path)
        level = below
    return None


class ProcTable:
    """The host's processes, read from procfs and the cgroup v2 tree.

    Finding which process holds a listening socket means reading the
    descriptors of every process, so the answer is remembered per port and
    re-checked cheaply (the socket still listens on that port, the remembered
    process still holds it) before the next full scan.
    """

    def __init__(self, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> None:
        self._proc = proc_root
        self._cgroup = cgroup_root
        self._holders: dict[int, frozenset[_Holder]] = {}

    # -- listening sockets --------------------------------------------------

    def listening_pids(self, port: int) -> frozenset[int]:
        """Pids holding a LISTEN socket on TCP ``port``; empty when nothing listens."""
        inodes = self._listening_inodes(port)
        if not inodes:
            self._holders.pop(port, None)
            return frozenset()
        cached = self._holders.get(port)
        if cached is not None and self._still_held(cached, inodes):
            return frozenset(h.pid for h in cached)
        self._holders.pop(port, None)
        holders, hidden = self._scan_holders(inodes)
        if not holders:
            raise ProcError(self._no_holder(port, hidden))
        if len(self._holders) >= CACHE_PORTS:
            self._holders.pop(next(iter(self._holders)))
        self._holders[port] = holders
        return frozenset(h.pid for h in holders)

    def _listening_inodes(self, port: int) -> frozenset[int]:
        """Inodes of the sockets listening on ``port``, IPv4 and IPv6."""
        listeners = parse_net_tcp(self._read_net("tcp"), self._net_path("tcp"))
        try:
            tcp6 = self._read_net("tcp6")
        except FileNotFoundError:  # IPv6 disabled: no table at all
            tcp6 = None
        if tcp6 is not None:
            listeners |= parse_net_tcp(tcp6, self._net_path("tcp6"))
        return frozenset(item.inode for item in listeners if item.port == port)

    def _net_path(self, table: str) -> str:
        return os.path.join(self._proc, "net", table)

    def _read_net(self, table: str) -> bytes:
        """One ``/proc/net`` table; ``FileNotFoundError`` passes for ``tcp6`` to decide."""
        path = self._net_path(table)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            if table == "tcp6":
                raise
            raise ProcError(f"{path} does not exist") from None
        except OSError as exc:
            raise ProcError(f"{path} cannot be read: {exc.strerror or exc}") from exc

    def _still_held(self, cached: frozenset[_Holder], inodes: frozenset[int]) -> bool:
        """Whether the remembered sockets are exactly those listening, each still held
        by its remembered process (one directory listing per process)."""
        if frozenset(h.inode for h in cached) != inodes:
            return False
        try:
            return all(h.inode in self._socket_inodes(h.pid) for h in cached)
        except OSError:
            return False

    def _scan_holders(self, inodes: frozenset[int]) -> tuple[frozenset[_Holder], bool]:
        """Every readable process holding one of ``inodes``, and whether any process
        could not be inspected (another user's, without root)."""
        holders: set[_Holder] = set()
        hidden = False
        for pid in self._pids():
            try:
                held = self._socket_inodes(pid) & inodes
            except PermissionError:
                hidden = True
                continue
            except OSError:  # exited mid-scan
                continue
            holders.update(_Holder(inode=inode, pid=pid) for inode in held)
        return frozenset(holders), hidden

    def _socket_inodes(self, pid: int) -> frozenset[int]:
        """Inodes of the sockets ``pid`` holds; ``OSError`` when its descriptors cannot
        be read (``PermissionError`` for another user's process: listing them needs
        ``CAP_DAC_READ_SEARCH``, reading each link ``CAP_SYS_PTRACE``)."""
        directory = os.path.join(self._proc, str(pid), "fd")
        inodes = set()
        for fd in os.listdir(directory):
            try:
                link = os.readlink(os.path.join(directory, fd))
            except FileNotFoundError:  # closed since the listing
                continue
            match = _SOCKET_LINK.fullmatch(link)
            if match is not None:
                inodes.add(int(match.group(1)))
        return frozenset(inodes)

    @staticmethod
    def _no_holder(port: int, hidden: bool) -> str:
        if hidden:
            return (
                f"port {port} is listened on by a process this daemon cannot inspect"
                " (another user's; run as root or set process.systemd_unit"
                " or process.pid_file)"
            )
        return f"port {port} is listened on by a socket no process this daemon sees holds"

    # -- units ----------------------------------------------------------------

    def unit_pids(self, unit: str) -> frozenset[int]:
        """Every pid in the unit's cgroup and its sub-cgroups."""
        name = unit_name(unit)
        directory = self._unit_directory(name)
        if directory is None:
            raise ProcError(
                f"unit {name} is not running (or is not a systemd unit here):"
                f" no cgroup {name} under {self._cgroup}"
            )
        return self._cgroup_pids(directory)

    def _unit_directory(self, name: str) -> str | None:
        """The unit's cgroup: ``system.slice/NAME``, else under ``user.slice``, else
        anywhere in the tree down to ``UNIT_SEARCH_DEPTH``."""
        system = os.path.join(self._cgroup, "system.slice", name)
        if os.path.isdir(system):
            return system
        user = _find_directory(
            os.path.join(self._cgroup, "user.slice"), name, UNIT_SEARCH_DEPTH - 1
        )
        return user or _find_directory(self._cgroup, name, UNIT_SEARCH_DEPTH)

    def _cgroup_pids(self, directory: str) -> frozenset[int]:
        """The pids in ``cgroup.procs`` of ``directory`` and every cgroup below it."""
        pids: set[int] = set()
        for path, _, _ in os.walk(directory):
            procs = os.path.join(path, "cgroup.procs")
            try:
                with open(procs, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:  # the cgroup went away during the walk
                continue
            except OSError as exc:
                raise ProcError(f"{procs} cannot be read: {exc.strerror or exc}") from exc
            for line in data.split():
                if _DECIMAL.fullmatch(line) is None:
                    raise ProcError(f"{procs} is malformed")
                pids.add(int(line))
        return frozenset(pids)

    # -- pid files and processes ----------------------------------------------

    def read_pid_file(self, path: str) -> int:
        """The positive pid ``path`` holds, whitespace around it ignored.

        Opened without blocking and read only if it is a regular file, so a
        FIFO or a device named by mistake is refused instead of hanging.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ProcError(f"pid file {path} cannot be read: {exc.strerror or exc}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ProcError(f"pid file {path} is not a regular file")
            data = os.read(fd, PID_FILE_MAX_BYTES + 1)
        except OSError as exc:
            raise ProcError(f"pid file {path} cannot be read: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        text = data.strip()
        if not text:
            raise ProcError(f"pid file {path} is empty")
        if (
            len(data) > PID_FILE_MAX_BYTES
            or _DECIMAL.fullmatch(text) is None
            or not 0 < int(text) <= PID_MAX
        ):
            raise ProcError(f"pid file {path} does not hold a pid: {text[:32]!r}")
        return int(text)

    def alive(self, pid: int) -> bool:
        """Whether ``pid`` exists and has not exited (a zombie is not alive)."""
        if pid <= 0:
            return False
        try:
            data = self._read_stat(pid)
        except OSError as exc:
            raise ProcError(f"pid {pid} cannot be inspected: {exc.strerror or exc}") from exc
        if data is None:
            return False
        return self._stat_of(pid, data).state not in _DEAD_STATES

    def descendants(self, pids: frozenset[int]) -> frozenset[int]:
        """``pids`` and all their descendants, those alive only, from one pass over
        every process's stat; processes gone or unreadable mid-pass are skipped."""
        children: dict[int, list[int]] = {}
        living: set[int] = set()
        for pid in self._pids():
            try:
                data = self._read_stat(pid)
            except OSError:
                continue
            if data is None:
                continue
            info = self._stat_of(pid, data)
            if info.state in _DEAD_STATES:
                continue
            living.add(pid)
            children.setdefault(info.ppid, []).append(pid)
        found: set[int] = set()
        todo = [pid for pid in pids if pid in living]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, ()))
        return frozenset(found)

    def name(self, pid: int) -> str | None:
        """``/proc/<pid>/comm``; None when the process is gone or unreadable."""
        try:
            with open(os.path.join(self._proc, str(pid), "comm"), "rb") as handle:
                data = handle.read()
        except OSError:
            return None
        return data.removesuffix(b"\n").decode("utf-8", "replace")

    def _pids(self) -> Iterator[int]:
        """The pid of every process in the proc root."""
        try:
            names = os.listdir(self._proc)
        except OSError as exc:
            raise ProcError(f"{self._proc} cannot be listed: {exc.strerror or exc}") from exc
        for name in names:
            if name.isascii() and name.isdigit():
                yield int(name)

    def _read_stat(self, pid: int) -> bytes | None:
        """``/proc/<pid>/stat``; None when the process is gone, ``OSError`` otherwise."""
        try:
            with open(os.path.join(self._proc, str(pid), "stat"), "rb") as handle:
                return handle.read()
        except OSError as exc:
            if _gone(exc):
                return None
            raise

    def _stat_of(self, pid: int, data: bytes) -> _Stat:
        return _parse_stat(data, os.path.join(self._proc, str(pid), "stat"))


def attribute(
    table: ProcessTable,
    url: str,
    *,
    systemd_unit: str | None = None,
    pid_file: str | None = None,
) -> Attribution:
    """The processes of the consumer at ``url``: from its systemd unit, else its pid
    file, else whatever listens on the URL's port when the host is local."""
    if systemd_unit is not None:
        return _by_unit(table, systemd_unit)
    if pid_file is not None:
        return _by_pid_file(table, pid_file)
    return _by_port(table, url)


def _by_unit(table: ProcessTable, unit: str) -> Attribution:
    """Every process of the unit's cgroup (children are in it already)."""
    try:
        pids = table.unit_pids(unit)
    except ProcError as exc:
        return Attribution(pids=frozenset(), source="unit", error=str(exc))
    return Attribution(
        pids=pids, source="unit", error=None if pids else f"unit {unit} has no processes"
    )


def _by_pid_file(table: ProcessTable, path: str) -> Attribution:
    """The pid file's process and its descendants."""
    try:
        pid = table.read_pid_file(path)
        if not table.alive(pid):
            return Attribution(
                pids=frozenset(), source="pid_file", error=f"pid {pid} from {path} is not running"
            )
    except ProcError as exc:
        return Attribution(pids=frozenset(), source="pid_file", error=str(exc))
    return _with_descendants(table, frozenset({pid}), "pid_file")


def _by_port(table: ProcessTable, url: str) -> Attribution:
    """The processes listening on the URL's port, and their descendants."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError as exc:
        return Attribution(pids=frozenset(), source="none", error=f"bad URL {url!r}: {exc}")
    if not host or port is None:
        return Attribution(
            pids=frozenset(), source="none", error=f"the URL {url!r} names no host and port"
        )
    if not is_local_host(host):
        return Attribution(
            pids=frozenset(),
            source="none",
            error=(
                f"the URL's host {host} is not local: set process.systemd_unit or process.pid_file"
            ),
        )
    try:
        holders = table.listening_pids(port)
    except ProcError as exc:
        return Attribution(pids=frozenset(), source="port", error=str(exc))
    if not holders:
        return Attribution(pids=frozenset(), source="port", error=f"nothing listens on port {port}")
    service = frozenset(pid for pid in holders if table.name(pid) not in _SOCKET_ACTIVATORS)
    if not service:
        return Attribution(
            pids=frozenset(),
            source="port",
            error=(
                f"port {port} is held only by systemd (socket activation): its service"
                " has not started; set process.systemd_unit"
            ),
        )
    return _with_descendants(table, service, "port")


def _with_descendants(table: ProcessTable, pids: frozenset[int], source: str) -> Attribution:
    """``pids`` and their descendants; ``pids`` alone, with the reason, when the
    process table cannot be read."""
    try:
        found = table.descendants(pids)
    except ProcError as exc:
        return Attribution(pids=pids, source=source, error=f"children not read: {exc}")
    if not found:
        listed = ", ".join(str(pid) for pid in sorted(pids))
        return Attribution(pids=found, source=source, error=f"pid {listed} exited")
    return Attribution(pids=found, source=source, error=None)


def is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine: loopback, ``localhost``, the unspecified
    address, or this host's own name (compared without a DNS lookup)."""
    name = host.removeprefix("[").removesuffix("]").rstrip(".").lower()
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return name == socket.gethostname().rstrip(".").lower()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback or address.ipv4_mapped.is_unspecified
    return address.is_loopback or address.is_unspecified
