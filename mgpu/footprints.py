# -*- test-case-name: tests.test_footprints -*-
"""Learned footprints: the most memory each consumer's processes held while loaded.

An operator types ``vram_resident_mib``; the card says what the model really
takes. The peak seen while the consumer was loaded is its ``learned_mib``,
and room is made for the larger of the two (``scheduler.footprint: max``),
so a guess that is too low no longer overcommits the card. The sizes are
kept in ``<state_dir>/learned.json``, written atomically (a temporary file in
the same directory, ``fsync``, ``os.replace``) whenever one grows, so a
restart starts from what was learned. Without ``state_dir`` they live only
in memory. The daemon writes from a thread (``background``), one write at a
time, the last one with the newest sizes: a slow disk never stalls the reactor.

A size can only grow: a consumer that moved to a smaller model keeps its
larger footprint until the file's entry is removed (or the file is).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: The file under ``state_dir``.
FILE_NAME: Final = "learned.json"
#: A learned size this much above the configured one is worth a line in the log.
WARN_RATIO: Final = 1.25


class StateDirError(Exception):
    """``state_dir`` cannot be used: the daemon stops before it listens."""


#: Runs a blocking call off the reactor, firing with its result (``deferToThread``).
Background = Callable[[Callable[[], object]], "Deferred[Any]"]


class LearnedSizes:
    """Per consumer, the learned footprint in MiB; ``observe`` as readings come.

    ``background`` runs the file's writes (None: at once, in the caller).
    """

    def __init__(
        self,
        path: Path | None,
        sizes: Mapping[str, int] | None = None,
        background: Background | None = None,
    ) -> None:
        self._path = path
        self._sizes: dict[str, int] = dict(sizes or {})
        self._warned: set[str] = set()
        self.background = background
        self._writing = False  # a write is under way
        self._stale = False  # sizes grew since that write took its copy

    @classmethod
    def open(cls, state_dir: str | None) -> LearnedSizes:
        """The sizes kept in ``state_dir`` (created if missing); ``StateDirError`` if it
        cannot be written. A damaged file is logged and started afresh, never fatal."""
        if state_dir is None:
            return cls(None)
        directory = Path(state_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateDirError(f"cannot create {directory}: {e.strerror or e}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StateDirError(f"{directory} is not writable by this user")
        path = directory / FILE_NAME
        return cls(path, _read(path))

    def get(self, name: str) -> int | None:
        """``name``'s learned size, or None before anything was learned."""
        return self._sizes.get(name)

    def footprint(self, name: str, configured_mib: int, rule: str) -> int:
        """The size room is made for: the larger of the two with ``max``, else the configured."""
        learned = self._sizes.get(name)
        if rule != "max" or learned is None:
            return configured_mib
        return max(configured_mib, learned)

    def observe(self, name: str, used_mib: int, configured_mib: int) -> None:
        """A reading of ``name`` loaded, holding ``used_mib``: kept if it is a new peak."""
        if used_mib <= self._sizes.get(name, 0):
            return
        self._sizes[name] = used_mib
        if used_mib > configured_mib * WARN_RATIO and name not in self._warned:
            self._warned.add(name)
            log.warn(
                "{consumer} holds {used} MiB, more than its vram_resident_mib of {configured}: "
                "room is made for {used} MiB (scheduler.footprint: max); set vram_resident_mib "
                "to it",
                consumer=name, used=used_mib, configured=configured_mib,
            )  # fmt: skip
        self._save()

    def _save(self) -> None:
        """Write the sizes now, or once the write under way ends (then with the newest)."""
        path = self._path
        if path is None:
            return
        if self._writing:
            self._stale = True
            return
        document = {"learned_mib": dict(sorted(self._sizes.items()))}
        if self.background is None:
            self._written(_attempt(path, document))
            return
        self._writing = True
        self.background(lambda: _attempt(path, document)).addBoth(self._written)

    def _written(self, outcome: object) -> None:
        self._writing = False
        if isinstance(outcome, Failure):
            log.failure("writing learned sizes failed", outcome)
        elif isinstance(outcome, OSError):
            log.warn("cannot keep learned sizes in {path}: {error}", path=self._path,
                     error=outcome.strerror or outcome)  # fmt: skip
        if self._stale:
            self._stale = False
            self._save()


def _attempt(path: Path, document: object) -> OSError | None:
    """Write ``document`` to ``path``; the error rather than raising it."""
    try:
        _write_atomically(path, document)
    except OSError as e:
        return e
    return None


def _read(path: Path) -> dict[str, int]:
    """The sizes in ``path``; nothing if it is missing; damaged entries logged and left out."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warn("learned sizes in {path} unreadable ({error}): starting afresh", path=path,
                 error=getattr(e, "strerror", None) or e)  # fmt: skip
        return {}
    sizes = data.get("learned_mib") if isinstance(data, dict) else None
    if not isinstance(sizes, dict):
        log.warn("learned sizes in {path} have no learned_mib object: starting afresh", path=path)
        return {}
    kept = {
        name: mib
        for name, mib in sizes.items()
        if isinstance(name, str) and type(mib) is int and 0 < mib < 2**31
    }
    if len(kept) != len(sizes):
        log.warn("learned sizes in {path}: {n} damaged entries left out", path=path,
                 n=len(sizes) - len(kept))  # fmt: skip
    return kept


def _write_atomically(path: Path, document: object) -> None:
    """Replace ``path`` with ``document`` as JSON: readers see the old file or the new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
