# -*- test-case-name: tests.test_ollama -*-
"""Ollama's own models (SPEC 9.4): what ``GET /api/ps`` lists, and freeing them.

Ollama loads models on demand and frees each one by itself ``keep_alive`` after
its last request, so the broker cannot know what it holds from its own calls.
It reads ``/api/ps`` instead (status, loaded state) and, as the last resort to
make room, asks Ollama to free its models with the documented unload request,
``POST /api/generate {"model": M, "keep_alive": 0}``. Ollama answers that at
once and frees the memory afterwards: the caller waits for it like any unload.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Final

from attrs import frozen
from twisted.internet.defer import Deferred

from mgpu.config import ConsumerConfig
from mgpu.control import ConsumerControl
from mgpu.errors import BrokerError

PS_PATH: Final = "/api/ps"
GENERATE_PATH: Final = "/api/generate"
MIB: Final = 2**20
NEVER_AFTER_S: Final = 10 * 365.25 * 86400
"""An expiry further ahead than this is Ollama's "never": ``keep_alive`` < 0 makes
it the longest Go duration from now, about 292 years."""
SAID_LIMIT: Final = 200
"""At most this many characters of Ollama's answer go into an error message."""


@frozen
class OllamaModel:
    """One model Ollama holds, as ``/api/ps`` lists it."""

    name: str
    size_vram_mib: int
    """Its share of GPU memory, rounded up; 0 for a model that runs on the CPU."""
    expires_at: str | None
    """As Ollama gave it (RFC 3339 with an offset); None when absent or unreadable."""

    def expires_in_s(self, now: float) -> float | None:
        """Seconds from the POSIX time ``now`` until Ollama frees it (0 when overdue);
        None when unknown or never."""
        at = _posix(self.expires_at)
        if at is None or at - now > NEVER_AFTER_S:
            return None
        return max(0.0, at - now)

    def to_json(self) -> dict[str, object]:
        """The status document's shape for it."""
        return {
            "name": self.name,
            "size_vram_mib": self.size_vram_mib,
            "expires_at": self.expires_at,
        }


def parse_ps(body: object) -> tuple[OllamaModel, ...]:
    """The models of ``/api/ps``'s parsed JSON answer; ``ValueError`` with a short reason
    when it is not that shape. Keys it does not use are ignored."""
    if not isinstance(body, dict) or "models" not in body:
        raise ValueError('not an object with a "models" list')
    models = body["models"]
    if models is None:  # Go writes an empty slice it never filled as null
        return ()
    if not isinstance(models, list):
        raise ValueError('"models" is not a list')
    return tuple(_model(entry, f"models[{i}]") for i, entry in enumerate(models))


def _model(entry: object, where: str) -> OllamaModel:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object")
    name = entry.get("name") or entry.get("model")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} has no name")
    size = entry.get("size_vram")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{where}.size_vram is not a byte count")
    expires = entry.get("expires_at")
    readable = isinstance(expires, str) and _posix(expires) is not None
    return OllamaModel(name, -(-size // MIB), expires if readable else None)


def _posix(text: str | None) -> float | None:
    """The POSIX time of an RFC 3339 time with an offset; None when it is not one."""
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
        return None if at.tzinfo is None else at.timestamp()
    except (ValueError, OverflowError):
        return None


def read_ps(
    control: ConsumerControl, consumer: ConsumerConfig, timeout_s: float
) -> Deferred[tuple[OllamaModel, ...]]:
    """``GET /api/ps``: the models Ollama holds.

    Failures to reach it are ``get_json``'s; a non-2xx answer is a
    ``scheduler_error``, as a refused load or unload is (the consumer is there
    but said no); an answer that is not a model list is ``bad_answer``, the code
    for a consumer's malformed answer, which does not mark it unreachable.
    """

    def parsed(answer: tuple[int, object]) -> tuple[OllamaModel, ...]:
        status, body = answer
        if not 200 <= status < 300:
            raise BrokerError(
                "scheduler_error",
                f"upstream {consumer.name}: GET {PS_PATH} answered HTTP {status}{_said(body)}",
                consumer.name,
            )
        try:
            return parse_ps(body)
        except ValueError as e:
            raise BrokerError(
                "bad_answer",
                f"upstream {consumer.name}: GET {PS_PATH} answered no model list: {e}",
                consumer.name,
            ) from None

    return control.get_json(consumer, PS_PATH, timeout_s).addCallback(parsed)


def unload_body(model: str) -> dict[str, object]:
    """Ollama's documented request to free ``model`` now."""
    return {"model": model, "keep_alive": 0}


def free_models(
    control: ConsumerControl,
    consumer: ConsumerConfig,
    models: Iterable[str],
    timeout_s: float,
) -> Deferred[None]:
    """Ask Ollama to free each of ``models``, one after the other, each call bounded by
    ``timeout_s``; the first failure stops it, naming the model.

    Failures are ``post_json``'s (``consumer_unreachable`` when it cannot be
    reached, ``scheduler_error`` on a timeout); a non-2xx answer is a
    ``scheduler_error`` with Ollama's own words, as a refused unload is.
    """
    names = tuple(models)
    return Deferred.fromCoroutine(_free_each(control, consumer, names, timeout_s))


async def _free_each(
    control: ConsumerControl, consumer: ConsumerConfig, names: tuple[str, ...], timeout_s: float
) -> None:
    for name in names:
        await _free_one(control, consumer, name, timeout_s)


async def _free_one(
    control: ConsumerControl, consumer: ConsumerConfig, model: str, timeout_s: float
) -> None:
    what = f"freeing model {_short(model)} of {consumer.name} failed"
    try:
        status, body = await control.post_json(
            consumer, GENERATE_PATH, unload_body(model), timeout_s
        )
    except BrokerError as e:
        raise BrokerError(e.code, f"{what}: {e.message}", e.consumer, e.headers) from None
    if not 200 <= status < 300:
        raise BrokerError("scheduler_error", f"{what}: HTTP {status}{_said(body)}", consumer.name)


def _said(body: object) -> str:
    """``": <Ollama's words>"`` from a JSON answer (its ``error`` when it has one), or ``""``."""
    if body is None:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return ": " + _short(error)
    try:
        return ": " + _short(json.dumps(body))
    except (ValueError, RecursionError):  # nested deeper than the encoder goes
        return ""


def _short(text: str) -> str:
    """``text`` fit for one log line: unprintable characters as ``?``, cut to ``SAID_LIMIT``."""
    clean = "".join(c if c.isprintable() else "?" for c in text[: SAID_LIMIT + 1])
    return clean if len(clean) <= SAID_LIMIT else clean[: SAID_LIMIT - 1] + "…"
