# -*- test-case-name: tests.test_fdlimit -*-
"""The daemon's own file-descriptor limit: raised at start, and what it must cover.

Every waiting client holds a socket, every running request two (the client's
and the consumer's). A shell's default of 1,024 is soon reached by a queue
of a thousand, and past it ``accept`` and ``connect`` fail with EMFILE.
Linux lets a process raise its soft limit up to the hard one, so the daemon
does that at start and logs both; it warns when even that is less than the
configuration could need, and the site sheds connections past what is left
once a reserve is kept for the daemon's own work (consumers, probes,
nvidia-smi, logs).
"""

from __future__ import annotations

import errno
import resource
from typing import Final

from attrs import frozen
from twisted.python.failure import Failure

from mgpu.config import Config
from mgpu.errors import BrokerError

#: Descriptors kept for the daemon's own work beyond the clients' connections.
RESERVE_FDS: Final = 64
#: Errors that mean the daemon, not its peer, ran out of descriptors.
EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE})
#: Used when the hard limit is unlimited: the kernel's usual ceiling (fs.nr_open).
_NR_OPEN_DEFAULT: Final = 1 << 20


@frozen
class FdLimit:
    """The soft limit before and after raising it, and the hard limit."""

    before: int
    soft: int
    hard: int

    @property
    def for_clients(self) -> int:
        """Client connections served before new ones are answered 503: three quarters of
        the ceiling, so that the last quarter can answer the clients past it."""
        return max(1, self.ceiling * 3 // 4)

    @property
    def ceiling(self) -> int:
        """Client connections (served and answered 503) at which accepting pauses."""
        return max(1, self.soft - RESERVE_FDS)


def raise_fd_limit() -> FdLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (as far as the kernel allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    else:
        target = soft
    return FdLimit(before=soft, soft=target, hard=hard)


def fds_needed(config: Config) -> int:
    """What a full queue and every consumer's running requests could hold, plus the reserve."""
    running = sum(c.max_concurrency for c in config.consumers.values())
    return config.scheduler.max_queue + 2 * running + RESERVE_FDS


def describe(limit: FdLimit, needed: int) -> tuple[str, bool]:
    """The start-up line about the limit, and whether it is a warning."""
    hard = "unlimited" if limit.hard == resource.RLIM_INFINITY else str(limit.hard)
    raised = f"raised from {limit.before} to" if limit.soft > limit.before else "at"
    line = f"file descriptors: soft limit {raised} {limit.soft} (hard {hard})"
    if limit.soft >= needed:
        return line, False
    return (
        f"{line}, below the {needed} that scheduler.max_queue and the consumers' "
        "max_concurrency could need: clients past it get 503 daemon_overloaded "
        "(raise LimitNOFILE= in the unit, or ulimit -n)",
        True,
    )


def exhausted(error: BaseException | None) -> bool:
    """Whether ``error`` (or the first reason inside it) is the daemon out of descriptors.

    Twisted reports a socket it could not create as ``ConnectBindError`` with
    the errno in ``osError``; the web client wraps errors in ``reasons``.
    """
    if error is None:
        return False
    code = getattr(error, "osError", None) or getattr(error, "errno", None)
    if code in EXHAUSTED:
        return True
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        return exhausted(reasons[0].value)
    return False


def overloaded(consumer: str | None, what: str) -> BrokerError:
    """``503 daemon_overloaded``: the daemon's own limit, never the consumer's fault."""
    return BrokerError(
        "daemon_overloaded",
        f"the daemon ran out of file descriptors {what}; try again shortly",
        consumer,
        headers={"Retry-After": "1"},
    )


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT
