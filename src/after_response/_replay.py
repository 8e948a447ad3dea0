"""Run stored tasks in this process: what ``after-response dead-letters retry --run`` does.

A small runner of its own (no spans, no metrics, one task at a time): it imports the
task's target, calls it with the stored arguments, honours the stored timeout and retry
policy, and records the outcome in the store.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._durable import from_stored, import_target
from ._errors import TaskTimeoutError
from ._logs import qualified_type
from ._record import TaskRecord
from ._redact import exception_text
from ._store import Store, StoredTask
from ._task import _running, set_running_task


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
        Exception: whatever the module raises as it is imported.
    """
    found = import_target(target)
    if not callable(found):
        raise TypeError(f"the target {target!r} is a {type(found).__name__}, not a function")
    return found


async def _attempt(
    fn: Callable[..., Any], record: TaskRecord, task: StoredTask, attempt: int
) -> None:
    # current_task() works here as in a live process: a side effect that sends its id as an
    # idempotency key must not fail just because the command line runs it.
    token = set_running_task((task.id, task.name, attempt, task.recovered))
    try:
        result = fn(*task.args, **task.kwargs)  # a sync function runs here, unbounded
        if inspect.isawaitable(result):
            try:
                await asyncio.wait_for(result, record.timeout)
            except asyncio.TimeoutError:
                raise TaskTimeoutError(f"the attempt timed out after {record.timeout} s") from None
    finally:
        _running.reset(token)


def _error(exc: Exception, fn: object, task: StoredTask) -> tuple[str, str]:
    """The exception's type (qualified, as the live runner stores it) and its message,
    redacted as the live runner redacts it."""
    message, _ = exception_text(exc, fn, tuple(task.args), task.kwargs)
    return qualified_type(exc), message


async def replay(store: Store, task: StoredTask, fn: Callable[..., Any]) -> Outcome:
    """Run ``task`` (owned by this process) to its end: succeeded, or dead again.

    ``fn`` is the function at the task's target (see :func:`resolve`). Every attempt is
    recorded (``mark_running``, ``mark_retry``), then the outcome (``mark_succeeded`` or
    ``mark_dead`` with the error type and the redacted message).
    """
    attempt = task.attempt
    try:
        record, _ = from_stored(task)
    except Exception as exc:  # stored options this code cannot read: dead again, not run
        store.mark_dead(task.id, attempt, *_error(exc, fn, task))
        return Outcome(task.id, task.name, False, attempt, type(exc).__name__)
    while True:
        attempt += 1
        store.mark_running(task.id, attempt)
        try:
            await _attempt(fn, record, task, attempt)
        except Exception as exc:
            error_type, message = _error(exc, fn, task)
            if record.retry.should_retry(attempt, exc):
                delay = record.retry.delay(attempt)
                store.mark_retry(task.id, attempt, time.time() + delay, error_type, message)
                await asyncio.sleep(delay)
                continue
            store.mark_dead(task.id, attempt, error_type, message)
            return Outcome(task.id, task.name, False, attempt, type(exc).__name__)
        store.mark_succeeded(task.id)
        return Outcome(task.id, task.name, True, attempt)
