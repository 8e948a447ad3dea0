"""Run stored tasks in this process: what ``after-response dead-letters retry --run`` does.

A small runner of its own (no spans, no metrics, one task at a time): it imports the
task's target, calls it with the stored arguments, honours the stored timeout and retry
policy, and records the outcome in the store.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._durable import from_stored
from ._errors import TaskTimeoutError
from ._options import NO_RETRY, Retry
from ._redact import exception_text
from ._store import Store, StoredTask
from ._task import Task, _running

_RETRY_FIELDS: Final = ("attempts", "backoff", "multiplier", "max_backoff", "jitter")


@dataclass(frozen=True)
class Outcome:
    """How a replayed task ended."""

    id: str
    name: str
    succeeded: bool
    attempts: int
    error_type: str | None = None


def resolve(target: str) -> Callable[..., Any]:
    """The callable at ``"package.module:Qualified.name"``.

    Raises:
        ImportError: the module cannot be imported or the target is malformed.
        AttributeError: the module has no such attribute.
        TypeError: what was found is not callable.
    """
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise ImportError(f"the target {target!r} is not of the form 'package.module:name'")
    found: Any = importlib.import_module(module_name)
    for attribute in qualname.split("."):
        found = getattr(found, attribute)
    if not callable(found):
        raise TypeError(f"the target {target!r} is a {type(found).__name__}, not a function")
    return found  # type: ignore[no-any-return]


def _retry_policy(options: dict[str, Any]) -> Retry:
    stored = options.get("retry")
    if stored is None:
        return NO_RETRY
    return Retry(**{field: stored[field] for field in _RETRY_FIELDS if field in stored})


async def _attempt(
    fn: Callable[..., Any], task: StoredTask, attempt: int, timeout: float | None
) -> None:
    # current_task() works here as in a live process: a side effect that sends its id as an
    # idempotency key must not fail just because the command line runs it.
    live = Task(from_stored(task)[0], fn, inspect.iscoroutinefunction(fn), contextvars.Context(), 0)
    live.attempt, live.recovered = attempt, task.recovered
    token = _running.set(live)
    try:
        result = fn(*task.args, **task.kwargs)  # a sync function runs here, unbounded
        if inspect.isawaitable(result):
            try:
                await asyncio.wait_for(result, timeout)
            except asyncio.TimeoutError:
                raise TaskTimeoutError(f"the attempt timed out after {timeout} s") from None
    finally:
        _running.reset(token)


def _error(exc: Exception, fn: object, task: StoredTask) -> tuple[str, str]:
    """The exception's type and its message, redacted as the live runner redacts it."""
    message, _ = exception_text(exc, fn, tuple(task.args), task.kwargs)
    return type(exc).__name__, message


async def replay(store: Store, task: StoredTask, fn: Callable[..., Any]) -> Outcome:
    """Run ``task`` (owned by this process) to its end: succeeded, or dead again.

    ``fn`` is the function at the task's target (see :func:`resolve`). Every attempt is
    recorded (``mark_running``, ``mark_retry``), then the outcome (``mark_succeeded`` or
    ``mark_dead`` with the error type and the redacted message).
    """
    attempt = task.attempt
    try:
        retry = _retry_policy(task.options)
        timeout = task.options.get("timeout")
    except Exception as exc:  # stored options this code cannot read: dead again, not run
        store.mark_dead(task.id, attempt, *_error(exc, fn, task))
        return Outcome(task.id, task.name, False, attempt, type(exc).__name__)
    while True:
        attempt += 1
        store.mark_running(task.id, attempt)
        try:
            await _attempt(fn, task, attempt, timeout)
        except Exception as exc:
            error_type, message = _error(exc, fn, task)
            if retry.should_retry(attempt, exc):
                delay = retry.delay(attempt)
                store.mark_retry(task.id, attempt, time.time() + delay, error_type, message)
                await asyncio.sleep(delay)
                continue
            store.mark_dead(task.id, attempt, error_type, message)
            return Outcome(task.id, task.name, False, attempt, error_type)
        store.mark_succeeded(task.id)
        return Outcome(task.id, task.name, True, attempt)
