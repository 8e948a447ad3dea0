"""Where tasks wait and run: one bounded executor per middleware.

Accounting, in one place: a task is *added* by a request, then ends in exactly one terminal
state (succeeded, failed, timed out, discarded, shed or abandoned). Between the two it is
*collected* (held by its request), *pending* (queued, or waiting to retry) or *running*.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.to_thread

from . import _telemetry as t
from ._errors import TaskAbandonedError, TaskShedError, TaskTimeoutError
from ._job import Job
from ._options import Retry
from ._tasks import HAS_UNCANCEL, NativeTasks, Spawner, running_asyncio

_NO_SPAN: Final = contextlib.nullcontext(None)

DeadLetterHook = Callable[[str, BaseException, int], object]
"""Called as ``hook(task_name, exception, attempts)`` for every task that ended unsuccessfully
(failed or timed out after its last attempt, shed, or abandoned at shutdown)."""


@dataclass(frozen=True)
class Defaults:
    """The middleware-wide task options that per-task options override."""

    timeout: float | None
    retry: Retry | None
    run_on_error: bool


@dataclass(frozen=True)
class Stats:
    """A snapshot of the executor's counts; see ``AfterResponseMiddleware.stats()``.

    ``added == collected + pending + running + succeeded + failed + timed_out + discarded
    + shed + abandoned`` holds at every snapshot. ``retried`` counts extra attempts, not tasks.
    """

    added: int
    collected: int
    pending: int
    running: int
    succeeded: int
    failed: int
    timed_out: int
    discarded: int
    shed: int
    abandoned: int
    retried: int

    @property
    def finished(self) -> int:
        """Tasks in a terminal state."""
        return (
            self.succeeded
            + self.failed
            + self.timed_out
            + self.discarded
            + self.shed
            + self.abandoned
        )


class Executor:
    """Runs jobs concurrently under an exact bound, with a bounded queue in front of it."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        max_pending: int,
        overflow_timeout: float | None,
        max_threads: int,
        on_dead_letter: DeadLetterHook | None,
        telemetry: t.Telemetry,
        defaults: Defaults,
    ) -> None:
        self.defaults = defaults
        #: (timeout, retry, run_on_error), unpacked by add() on every call.
        self.default_options = (defaults.timeout, defaults.retry, defaults.run_on_error)
        self.max_concurrency = max_concurrency
        self.max_pending = max_pending
        self.overflow_timeout = overflow_timeout
        self._max_threads = max_threads
        self._on_dead_letter = on_dead_letter
        self.telemetry = telemetry

        self._queue: deque[Job] = deque()
        self._running = 0
        self._retry_waiting = 0
        self._added = 0
        self._added_lock = threading.Lock()
        self._counts = dict.fromkeys(
            (t.SUCCEEDED, t.FAILED, t.TIMED_OUT, t.DISCARDED, t.SHED, t.ABANDONED), 0
        )
        self._retried = 0
        self._handed_over = 0
        self._ended_before_handover = 0
        self._overflow_held = 0
        self._room_waiters: deque[anyio.Event] = deque()
        self._idle_waiters: list[anyio.Event] = []
        self._thread_limiter: anyio.CapacityLimiter | None = None
        self._shutting_down = False
        #: The task group that runs jobs between lifespan startup and shutdown, if any.
        self.background: Spawner | None = None
        self._stopped: anyio.Event | None = None
        self._serving_done: anyio.Event | None = None
        #: The event loop's thread, to tell when add() is called from a worker thread.
        self.loop_thread = 0

    # -- counting -----------------------------------------------------------------------------

    def note_added(self, job: Job) -> None:
        """Count a task a request added (may be called from a worker thread)."""
        with self._added_lock:
            self._added += 1
        instruments = self.telemetry.instruments
        if instruments is not None:
            tally = instruments.added
            tally[job.name] = tally.get(job.name, 0) + 1

    @property
    def outstanding(self) -> int:
        """Tasks added that have not reached a terminal state yet."""
        return self._added - sum(self._counts.values())

    def stats(self) -> Stats:
        """The live counts."""
        counts = self._counts
        pending = len(self._queue) + self._retry_waiting
        # Discarded and shed tasks, and those abandoned with their request, were never
        # handed over: they leave "collected" straight for their terminal state.
        collected = self._added - self._handed_over - self._ended_before_handover
        return Stats(
            added=self._added,
            collected=collected,
            pending=pending,
            running=self._running,
            succeeded=counts[t.SUCCEEDED],
            failed=counts[t.FAILED],
            timed_out=counts[t.TIMED_OUT],
            discarded=counts[t.DISCARDED],
            shed=counts[t.SHED],
            abandoned=counts[t.ABANDONED],
            retried=self._retried,
        )

    # -- admission ----------------------------------------------------------------------------

    def admit(self, jobs: Iterable[Job], task_group: Spawner) -> list[Job]:
        """Start or queue each job without waiting; return those that found no room."""
        overflow: list[Job] = []
        now = time.perf_counter()
        for job in jobs:
            if overflow or self._shutting_down:
                overflow.append(job)
                continue
            if self._running < self.max_concurrency:
                self._hand_over(job, task_group, now)
                self._running += 1
                self._gauge_running(job, 1)
                try:
                    self._spawn(job)
                except RuntimeError:  # pragma: no cover - defensive: a closed task group
                    # Callers only pass open groups; should one have closed, keep the counts
                    # right and shed the job rather than lose it.
                    self._running -= 1
                    self._gauge_running(job, -1)
                    self._handed_over -= 1
                    job.collector.job_finished()
                    overflow.append(job)
            elif len(self._queue) + self._retry_waiting < self.max_pending:
                self._hand_over(job, task_group, now)
                self._queue.append(job)
                self._gauge_pending(job, 1)
            else:
                overflow.append(job)
        return overflow

    async def admit_waiting(self, jobs: list[Job], task_group: Spawner | None) -> None:
        """Admit ``jobs``, waiting up to ``overflow_timeout`` for room; shed what is left.

        Called by a request's ASGI call after its response has been sent, so the wait
        slows the producer, never the client. ``task_group=None`` means the background
        group as it is at each try (it may stop meanwhile). Jobs held this way are bounded
        too: once ``max_pending`` tasks already wait for room, further ones are shed at once.
        """
        waiting = jobs
        if self._overflow_held + len(waiting) > self.max_pending:
            self.shed(waiting)
            return
        self._overflow_held += len(waiting)
        try:
            with anyio.move_on_after(self.overflow_timeout):
                while waiting and not self._shutting_down:
                    room = anyio.Event()
                    self._room_waiters.append(room)
                    try:
                        await room.wait()
                    finally:
                        if not room.is_set():
                            self._room_waiters.remove(room)
                    group = task_group or self.background
                    if group is None:
                        break
                    before = len(waiting)
                    waiting = self.admit(waiting, group)
                    self._overflow_held -= before - len(waiting)
                    if waiting:
                        # The room was not enough for all of ours; the next waiter may fit.
                        self._wake_room_waiter()
        finally:
            self._overflow_held -= len(waiting)
            self.shed(waiting)

    def _hand_over(self, job: Job, task_group: Spawner, now: float) -> None:
        job.task_group = task_group
        job.ready_at = now
        self._handed_over += 1
        job.collector.job_admitted()

    def shed(self, jobs: Iterable[Job], reason: str | None = None) -> None:
        """End jobs that found no room (or no executor): logged, counted, dead-lettered."""
        for job in jobs:
            self.telemetry.log(
                logging.ERROR,
                "after-response task %s of %s %s shed: %s",
                job,
                job.name,
                job.request.method,
                job.request.path,
                reason
                or f"the pending queue stayed full (max_pending={self.max_pending}) "
                f"for overflow_timeout={self.overflow_timeout}s",
            )
            self.telemetry.record_unrun(job, t.SHED)
            self._ended_before_handover += 1
            self._end(job, t.SHED, TaskShedError(f"{job.name} was shed: pending queue full"))

    def discard(self, jobs: list[Job], reason: str) -> None:
        """End jobs of a failed request by policy (not an error): logged by name, counted.

        One line per task, as for shed and abandoned tasks, so that each line's
        ``task_name`` names the task it is about.
        """
        count = len(jobs)
        for number, job in enumerate(jobs, 1):
            self.telemetry.log(
                logging.WARNING,
                "after-response task %s of %s %s discarded (%d of %d of this request) because "
                "%s (pass run_on_error=True to run it anyway)",
                job,
                job.name,
                job.request.method,
                job.request.path,
                number,
                count,
                reason,
            )
            self.telemetry.record_unrun(job, t.DISCARDED)
            self._ended_before_handover += 1
            self._end(job, t.DISCARDED)

    def abandon_unstarted(self, jobs: Iterable[Job], reason: str) -> None:
        """End jobs that never reached the executor (their request was cancelled)."""
        for job in jobs:
            self._log_abandoned(job, reason)
            self.telemetry.record_unrun(job, t.ABANDONED)
            self._ended_before_handover += 1
            self._end(job, t.ABANDONED, TaskAbandonedError(f"{job.name} was abandoned: {reason}"))

    # -- running ------------------------------------------------------------------------------

    def _spawn(self, job: Job) -> None:
        assert job.task_group is not None
        # Spawning inside the job's context makes the new task run in a copy of it: the
        # request's contextvars (and so its current span) as they were at add() time.
        job.context.run(job.task_group.start_soon, self._run, job)

    def _release(self, job: Job) -> None:
        self._running -= 1
        self._gauge_running(job, -1)
        self._dispatch()

    def _dispatch(self) -> None:
        queue = self._queue
        while queue and self._running < self.max_concurrency and not self._shutting_down:
            job = queue.popleft()
            self._gauge_pending(job, -1)
            self._running += 1
            self._gauge_running(job, 1)
            self._spawn(job)
            self._wake_room_waiter()

    def _wake_room_waiter(self) -> None:
        if self._room_waiters:
            self._room_waiters.popleft().set()

    async def _run(self, job: Job) -> None:
        holds_slot = True
        backing_off = False
        try:
            while True:
                outcome, exc = await self._attempt(job)
                if outcome != t.RETRY:
                    self._end(job, outcome, exc)
                    return
                assert exc is not None
                delay = job.retry.delay(job.attempt)
                self._retried += 1
                instruments = self.telemetry.current_instruments
                if instruments is not None:
                    retries = instruments.retries
                    retries[job.name] = retries.get(job.name, 0) + 1
                job.attempt += 1
                if len(self._queue) + self._retry_waiting >= self.max_pending:
                    # No room to wait among the pending: back off holding the slot.
                    backing_off = True
                    await anyio.sleep(delay)
                    backing_off = False
                    job.ready_at = time.perf_counter()
                    continue
                # Backoff gives the slot back: a task waiting to retry occupies no worker.
                holds_slot = False
                self._retry_waiting += 1
                self._gauge_pending(job, 1)
                self._release(job)
                backing_off = True
                try:
                    await anyio.sleep(delay)
                finally:
                    self._retry_waiting -= 1
                    self._gauge_pending(job, -1)
                backing_off = False
                job.ready_at = time.perf_counter()
                if self._running < self.max_concurrency and not self._queue:
                    self._running += 1
                    self._gauge_running(job, 1)
                    holds_slot = True
                    continue
                self._queue.append(job)
                self._gauge_pending(job, 1)
                self._dispatch()
                return
        except anyio.get_cancelled_exc_class():
            # Cancelled by the shutdown deadline or, without lifespan, with its request's call.
            cause = (
                "shutdown_timeout elapsed"
                if self._shutting_down
                else "its request's ASGI call was cancelled"
            )
            if backing_off:
                # Its next attempt never started: leave a span for it, as for a queued task.
                self._log_abandoned(job, f"{cause} while it waited to retry")
                self.telemetry.record_unrun(job, t.ABANDONED)
            else:
                self._log_abandoned(job, f"{cause} while it ran")
            self._end(job, t.ABANDONED, TaskAbandonedError(f"{job.name} was abandoned: {cause}"))
            raise
        finally:
            if holds_slot:
                self._release(job)

    async def _attempt(self, job: Job) -> tuple[str, BaseException | None]:
        started = time.perf_counter()
        queue_wait = started - job.ready_at
        telemetry = self.telemetry
        instruments = telemetry.current_instruments
        if instruments is not None:
            instruments.queue_duration.record(queue_wait, {"after_response.task.name": job.name})
        exc: BaseException | None = None
        span_context = (
            _NO_SPAN if telemetry.tracer is None else telemetry.attempt_span(job, queue_wait)
        )
        with span_context as span:
            try:
                if await self._call_with_timeout(job):
                    outcome = t.SUCCEEDED
                else:
                    exc = TaskTimeoutError(f"{job.name} timed out after {job.timeout}s")
                    outcome = t.TIMED_OUT
            except anyio.get_cancelled_exc_class():
                telemetry.end_attempt_span(span, t.ABANDONED)
                raise
            except Exception as error:
                exc = error
                outcome = t.FAILED
            if (
                exc is not None
                and not self._shutting_down
                and job.retry.should_retry(job.attempt, exc)
            ):
                telemetry.end_attempt_span(span, t.RETRY, exc)
                telemetry.log(
                    logging.WARNING,
                    "after-response task %s of %s %s: attempt %d/%d %s (%s); retrying",
                    job,
                    job.name,
                    job.request.method,
                    job.request.path,
                    job.attempt,
                    job.max_attempts,
                    "timed out" if outcome == t.TIMED_OUT else "failed",
                    type(exc).__qualname__,
                    span=span,
                )
                outcome = t.RETRY
            else:
                telemetry.end_attempt_span(span, outcome, exc)
                if outcome == t.FAILED:
                    telemetry.log(
                        logging.ERROR,
                        "after-response task %s of %s %s failed after %d attempt(s)",
                        job,
                        job.name,
                        job.request.method,
                        job.request.path,
                        job.attempt,
                        exc=exc,
                        span=span,
                    )
                elif outcome == t.TIMED_OUT:
                    telemetry.log(
                        logging.ERROR,
                        "after-response task %s of %s %s timed out after %ss (attempt %d/%d)%s",
                        job,
                        job.name,
                        job.request.method,
                        job.request.path,
                        job.timeout,
                        job.attempt,
                        job.max_attempts,
                        "" if job.is_async else "; its worker thread cannot be stopped and runs on",
                        span=span,
                    )
        if instruments is not None:
            instruments.duration.record(
                time.perf_counter() - started,
                {"after_response.task.name": job.name, "after_response.task.outcome": outcome},
            )
        return outcome, exc

    async def _call_with_timeout(self, job: Job) -> bool:
        """Run one attempt; ``False`` if it ran out of time (and was cancelled)."""
        # An async side effect's coroutine is awaited as it is: no wrapper per attempt.
        call = job.fn(*job.args, **job.kwargs) if job.is_async else self._call_in_thread(job)
        if job.timeout is None:
            await call
            return True
        owner = job.task_group
        if HAS_UNCANCEL and type(owner) is NativeTasks:
            return await owner.run_with_deadline(job.timeout, call)
        with anyio.CancelScope(deadline=anyio.current_time() + job.timeout) as scope:
            await call
        return not scope.cancelled_caught

    async def _call_in_thread(self, job: Job) -> None:
        if self._thread_limiter is None:
            self._thread_limiter = anyio.CapacityLimiter(self._max_threads)
        call = functools.partial(_call_boxed, job.fn, job.args, job.kwargs)
        [result] = await anyio.to_thread.run_sync(
            call, abandon_on_cancel=True, limiter=self._thread_limiter
        )
        if inspect.isawaitable(result):
            # A sync callable that returned a coroutine (a lambda around an async call).
            await result

    def _end(self, job: Job, outcome: str, exc: BaseException | None = None) -> None:
        self._counts[outcome] += 1
        instruments = self.telemetry.current_instruments
        if instruments is not None:
            key = (job.name, outcome)
            finished = instruments.finished
            finished[key] = finished.get(key, 0) + 1
        job.collector.job_finished()
        if exc is not None and self._on_dead_letter is not None:
            try:
                self._on_dead_letter(job.name, exc, job.attempt)
            except Exception as hook_error:
                self.telemetry.log(
                    logging.ERROR,
                    "the on_dead_letter hook raised for task %s",
                    job,
                    job.name,
                    exc=hook_error,
                )
        if self._idle_waiters and self.outstanding == 0:
            for waiter in self._idle_waiters:
                waiter.set()
            self._idle_waiters.clear()

    def _log_abandoned(self, job: Job, reason: str) -> None:
        self.telemetry.log(
            logging.ERROR,
            "after-response task %s of %s %s abandoned: %s",
            job,
            job.name,
            job.request.method,
            job.request.path,
            reason,
        )

    def _gauge_pending(self, job: Job, delta: int) -> None:
        instruments = self.telemetry.current_instruments
        if instruments is not None:
            pending = instruments.pending
            pending[job.name] = pending.get(job.name, 0) + delta

    def _gauge_running(self, job: Job, delta: int) -> None:
        instruments = self.telemetry.current_instruments
        if instruments is not None:
            running = instruments.running
            running[job.name] = running.get(job.name, 0) + delta

    # -- lifecycle ----------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every task added so far has ended; ``False`` if ``timeout`` passed first."""
        if self.outstanding == 0:
            return True
        idle = anyio.Event()
        self._idle_waiters.append(idle)
        with anyio.move_on_after(timeout):
            await idle.wait()
            return True
        if idle in self._idle_waiters:
            self._idle_waiters.remove(idle)
        return False

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the background task group until ``stop()``; started at lifespan startup."""
        self._stopped = anyio.Event()
        self._serving_done = anyio.Event()
        self.loop_thread = threading.get_ident()
        self._shutting_down = False
        try:
            if running_asyncio():
                tasks = NativeTasks()
                self.background = tasks
                task_status.started()
                try:
                    await self._stopped.wait()
                finally:
                    await tasks.aclose()
            else:
                async with anyio.create_task_group() as task_group:
                    self.background = task_group
                    task_status.started()
                    await self._stopped.wait()
                    task_group.cancel_scope.cancel()
        finally:
            self.background = None
            self._serving_done.set()

    async def stop(self, timeout: float | None) -> None:
        """Drain for at most ``timeout`` seconds, then abandon (log, count, cancel) the rest."""
        if self._stopped is None or self._serving_done is None:
            return
        drained = await self.drain(timeout)
        if not drained:
            t.logger.error(
                "shutdown: %d after-response task(s) still unfinished after "
                "shutdown_timeout=%ss; abandoning them",
                self.outstanding,
                timeout,
                extra={"abandoned_count": self.outstanding},
            )
            self._shutting_down = True
            while self._queue:
                job = self._queue.popleft()
                self._gauge_pending(job, -1)
                self._log_abandoned(job, "shutdown_timeout elapsed before it started")
                self.telemetry.record_unrun(job, t.ABANDONED)
                self._end(job, t.ABANDONED, TaskAbandonedError(f"{job.name} never started"))
            for room in self._room_waiters:
                room.set()
        self._stopped.set()
        await self._serving_done.wait()
        self._shutting_down = False
        self._stopped = None


def _call_boxed(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Call ``fn`` in a worker thread; boxed, because trio refuses a thread whose result is a
    coroutine (a sync lambda around an async call), which the loop then awaits."""
    return [fn(*args, **kwargs)]
