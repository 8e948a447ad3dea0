"""One attempt of a task: call it under its deadline, and say how it ended.

Everything a side effect can raise ends as an outcome here: an ``Exception``, and also a
``KeyboardInterrupt``, ``SystemExit`` (``sys.exit()`` in a sync task), ``GeneratorExit``, any
other ``BaseException``, or a ``CancelledError`` it raised itself. Only a cancellation that
came from the task's owner (the shutdown deadline, or its request's call) leaves as one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

import anyio

from ._aggregate import ATTEMPTS, LogAggregator
from ._errors import TaskTimeoutError
from ._logs import log_task_aggregated, qualified_type
from ._task import Outcome, Task
from ._tasks import HAS_UNCANCEL, NativeTasks
from ._telemetry import Telemetry
from ._threads import WorkerThreads


class Runner:
    """Runs attempts, with the telemetry around each and the worker threads for sync tasks.

    With ``lines``, the lines of attempts that failed or timed out go through that
    aggregator, keyed by task name and what happened (``failed (ConnectionError)``): when a
    downstream is down and every send fails, the first line of each in an interval is
    written in full, with its traceback, and the rest are counted in one summary.
    """

    def __init__(
        self, telemetry: Telemetry, threads: WorkerThreads, lines: LogAggregator | None = None
    ) -> None:
        self.telemetry = telemetry
        self.threads = threads
        self.lines = lines

    async def attempt(self, task: Task, *, may_retry: bool) -> tuple[Outcome, BaseException | None]:
        """Run one attempt; ``RETRY`` when it failed and another attempt is due."""
        telemetry = self.telemetry
        watched = telemetry.on  # off (no SDK): no telemetry call, no clock read
        if watched:
            started = time.perf_counter()
            span = telemetry.attempt_started(task, started - task.ready_at)
            if span is not None:
                task.span = span.span
        else:
            span = None
        exc: BaseException | None = None
        record = task.record
        try:
            # An async side effect's coroutine is awaited as it is: no wrapper per attempt,
            # and the deadline is set and cleared with plain calls around it.
            if task.is_async:
                call = task.fn(*record.args, **record.kwargs)
            else:
                call = self._in_thread(task)
            timeout = record.timeout
            owner = task.owner
            if timeout is None:
                await call
                in_time = True
            elif HAS_UNCANCEL and type(owner) is NativeTasks:
                running = task.running
                owner.set_deadline(running, timeout)
                try:
                    await call
                    in_time = True
                except asyncio.CancelledError:
                    if not owner.expired(running):
                        raise
                    in_time = False
                finally:
                    owner.clear_deadline(running)
            else:
                with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
                    await call
                in_time = not scope.cancelled_caught
            if in_time:
                outcome = Outcome.SUCCEEDED
            else:
                exc = TaskTimeoutError(f"{record.name} timed out after {timeout}s")
                outcome = Outcome.TIMED_OUT
        except BaseException as error:
            if task.done and isinstance(error, GeneratorExit):
                # Left behind at shutdown, then closed with its loop: it has its outcome.
                raise
            if isinstance(error, anyio.get_cancelled_exc_class()) and _cancelled(task):
                if watched:
                    telemetry.attempt_ended(
                        task, span, Outcome.ABANDONED, None, time.perf_counter() - started
                    )
                raise
            exc, outcome = error, Outcome.FAILED  # a CancelledError it raised itself too
        if exc is not None and may_retry and task.record.retry.should_retry(task.attempt, exc):
            if watched:
                telemetry.attempt_ended(
                    task, span, Outcome.RETRY, exc, time.perf_counter() - started
                )
            timed_out = outcome is Outcome.TIMED_OUT
            log_task_aggregated(
                self.lines,
                "timed out; retrying" if timed_out else f"failed ({qualified_type(exc)}); retrying",
                logging.WARNING,
                task,
                "attempt %d/%d %s (%s); retrying",
                task.attempt,
                task.record.retry.attempts,
                "timed out" if timed_out else "failed",
                type(exc).__qualname__,
                span=None if span is None else span.span,
                counted=ATTEMPTS,
            )
            return Outcome.RETRY, exc
        if watched:
            telemetry.attempt_ended(task, span, outcome, exc, time.perf_counter() - started)
        if outcome is Outcome.FAILED:
            assert exc is not None
            log_task_aggregated(
                self.lines,
                f"failed ({qualified_type(exc)})",
                logging.ERROR,
                task,
                "failed after %d attempt(s)%s",
                task.attempt,
                _raised_itself(exc),
                exc=exc,
                span=None if span is None else span.span,
            )
        elif outcome is Outcome.TIMED_OUT:
            log_task_aggregated(
                self.lines,
                f"timed out after {task.record.timeout}s",
                logging.ERROR,
                task,
                "timed out after %ss (attempt %d/%d)%s",
                task.record.timeout,
                task.attempt,
                task.record.retry.attempts,
                "" if task.is_async else "; its worker thread cannot be stopped and runs on",
                span=None if span is None else span.span,
            )
        return outcome, exc

    async def _in_thread(self, task: Task) -> None:
        result: Any = await self.threads.run(task.fn, task.record.args, task.record.kwargs)
        if inspect.isawaitable(result):
            # A sync callable that returned a coroutine (a lambda around an async call).
            await result


def _cancelled(task: Task) -> bool:
    """Whether the attempt's ``CancelledError`` comes from a cancellation (its owner's, or
    one from outside, as the event loop's teardown cancels every task), rather than from
    the side effect raising it itself."""
    owner = task.owner
    if type(owner) is NativeTasks:
        return owner.cancelled_by_owner() or _cancel_requested()
    return True  # an anyio task group (trio): its cancellations are the only ones we see


def _cancel_requested() -> bool:
    # Task.cancelling() (3.11+) counts the cancel() calls not yet uncancelled: none when a
    # side effect raises CancelledError itself. On 3.10 such a cancellation counts as raised.
    if not HAS_UNCANCEL:
        return False
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0  # type: ignore[attr-defined,unused-ignore]


def _raised_itself(exc: BaseException) -> str:
    if isinstance(exc, Exception):
        return ""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return (
            f" (it raised {type(exc).__qualname__} itself, without being cancelled, which is "
            "treated as a failure)"
        )
    return (
        f" (it raised {type(exc).__qualname__}, which is treated as a failure: a side effect "
        "cannot stop the server)"
    )
