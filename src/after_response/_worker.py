"""The engine worker's side of a hand-off: one generic runner that rebuilds a side effect
from its message and runs it with the in-process semantics.

The same pieces as in the web process do the work (``Runner`` for one attempt under its
deadline, ``Telemetry`` for the span, metrics and log lines, ``DeadLetters`` for the hook),
so a side effect behaves the same wherever it runs: its timeout, its ``Retry`` policy
(retried here, within one delivery, with the policy's backoff), its own limits
(``max_concurrency``, ``rate_limit``, per worker process, each attempt passing them as in the
executor), ``current_task()`` with the task's own id on every delivery, the same log fields
and span attributes.

A sync engine worker (Celery's prefork or thread pools) runs the coroutine on an event
loop thread this runner starts once per process (after the fork), with ``run_blocking``.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import metrics, trace

from ._callable import CallableInfo
from ._dead_letters import DeadLetterHook, DeadLetters, check_hook
from ._durable import context_from_carrier, from_stored, not_importable, trace_carrier
from ._engine import BadMessageError, decode
from ._limited import NameLimits
from ._runner import Runner
from ._settings import check_log_interval
from ._task import DeadLetter, Outcome, Task, set_running_task
from ._telemetry import Telemetry
from ._threads import WorkerThreads


@dataclass(frozen=True)
class WorkerStats:
    """What one worker process's runner did.

    ``received == succeeded + failed + timed_out + running + waiting`` holds (a delivery
    that is not an after-response message, or whose function cannot be imported, counts as
    failed). ``waiting``: deliveries waiting for their side effect's own limits
    (``max_concurrency``, ``rate_limit``) in this process, before an attempt.
    ``dead_letters_lost``: dead letters ``on_dead_letter`` never got, because it was still
    busy when the worker stopped.
    """

    received: int
    running: int
    succeeded: int
    failed: int
    timed_out: int
    retried: int
    redelivered: int
    dead_letters_lost: int = 0
    waiting: int = 0


class WorkerRunner:
    """Runs handed-off side effects in an engine worker.

    Args:
        system: the engine's name (``"celery"``, ``"taskiq"``), for log lines.
        on_dead_letter: called, in a thread of its own, with a ``DeadLetter`` for every
            task whose last attempt failed or timed out in this worker, or whose function
            cannot be imported here.
        max_threads: worker threads for plain (``def``) side effects.
        tracer_provider, meter_provider: explicit providers (default: the global ones).
        log_interval: seconds over which the lines of attempts that failed, timed out or
            will be retried, and of a raising hook, are aggregated per task name and what
            happened (the first in full, the rest counted in one summary line).

    Call :meth:`shutdown` when the worker process stops: it writes the summaries still
    pending and waits (a little) for the hook.
    """

    def __init__(
        self,
        system: str,
        *,
        on_dead_letter: DeadLetterHook | None = None,
        max_threads: int = 40,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        log_interval: float = 5.0,
    ) -> None:
        check_hook(on_dead_letter)
        check_log_interval(log_interval)
        self.system = system
        self.telemetry = Telemetry(tracer_provider, meter_provider, log_interval=log_interval)
        lines = self.telemetry.aggregator
        self.runner = Runner(self.telemetry, WorkerThreads(max_threads), lines=lines)
        self.dead_letters = DeadLetters(on_dead_letter, lines)
        self._seq = itertools.count(1)
        self._counts = dict.fromkeys(
            (
                *("received", "running", "succeeded", "failed", "timed_out", "retried"),
                *("redelivered", "dead_letters_lost", "waiting"),
            ),
            0,
        )
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_pid = 0
        #: Per task name limits, on the loop the runs run on (one per worker process).
        self._limits = NameLimits()

    def stats(self) -> WorkerStats:
        """This process's counts."""
        with self._lock:
            return WorkerStats(**self._counts)

    async def run(
        self,
        body: object,
        *,
        parent: Mapping[str, str] | None = None,
        redelivered: bool = False,
    ) -> Outcome:
        """Run the side effect ``body`` describes, all its attempts; its outcome.

        The span's parent: ``parent`` (a W3C carrier) if given; else the span current here
        (the engine's own instrumentation, continuing the publish); else the trace context
        the message carries. Never raises for the side effect's own errors: they are
        logged, counted and dead-lettered, so the engine does not redeliver a poison message.
        While its name is at its own limits in this process, an attempt waits for room,
        holding nothing; cancelled (the worker stops), this raises ``CancelledError``.
        """
        self._count("received")
        if redelivered:
            self._count("redelivered")
        lines = self.telemetry.aggregator
        try:
            row = decode(body)
        except BadMessageError as exc:
            # Aggregated, like every failure line: a misrouted queue sends thousands.
            lines.emit(
                logging.ERROR,
                (f"the {self.system} worker", str(exc)),
                "after-response %s worker: %s; not run",
                (self.system, exc),
                counted="bad messages to",
            )
            self._count("failed")
            return Outcome.FAILED
        record, fn = from_stored(row)
        if parent is not None:
            context = context_from_carrier(dict(parent))
        elif trace.get_current_span().get_span_context().is_valid:
            context = contextvars.copy_context()
        else:
            context = context_from_carrier(dict(row.trace_context))
        self.telemetry.look()
        if fn is None:
            lines.emit(
                logging.ERROR,
                (row.name, f"cannot be imported here ({row.target})"),
                "after-response task %s (%s) cannot run in this %s worker: %s cannot be "
                "imported here (deploy the same code to the workers as to the web processes)",
                (row.name, row.id, self.system, row.target),
                {"task_name": row.name, "task_id": row.id},
            )
            self._not_run(
                Task(record, not_importable, False, context, next(self._seq)), row.attempt
            )
            return Outcome.FAILED
        # Lines counted in the dead-letter hook's thread are summarised on this loop.
        self.telemetry.aggregator.loop = asyncio.get_running_loop()
        task = Task(record, fn, CallableInfo(fn).is_async, context, next(self._seq))
        self.telemetry.track(task)
        task.attempt = row.attempt + 1
        task.recovered = row.recovered or redelivered
        self._count("running")
        try:
            # The attempts run in the task's own context (its parent span, current_task()).
            return await context.run(asyncio.ensure_future, self._attempts(task))
        finally:
            self._count("running", -1)

    async def _attempts(self, task: Task) -> Outcome:
        limits = self._limits
        record = task.record
        while True:
            set_running_task((record.id, record.name, task.attempt, task.recovered))
            task.ready_at = time.perf_counter()
            # Each attempt passes its name's limits, a retry too, as in the executor.
            if record.limits is not None and not limits.admit(task):
                await self._wait_for_room(limits, task)
            try:
                outcome, exc = await self.runner.attempt(task, may_retry=True)
            finally:
                if task.gated:
                    limits.release(task)
            if outcome is not Outcome.RETRY:
                break
            delay = task.record.retry.delay(task.attempt)
            self._count("retried")
            self.telemetry.retried(task)
            task.attempt += 1
            await asyncio.sleep(delay)
        task.done = True
        self.telemetry.finished(task, outcome)
        self._count(outcome.value)
        if exc is not None:
            self.dead_letters.submit(
                task,
                DeadLetter(task.record.name, task.record.id, exc, task.attempt, outcome.value),
            )
        return outcome

    async def _wait_for_room(self, limits: NameLimits, task: Task) -> None:
        """Wait until ``task``'s name lets it start, holding nothing. Cancelled, it leaves its
        line and ``run`` raises ``CancelledError``, as when an attempt is cancelled: nothing
        here acknowledges the message. Counted as waiting, not as running; neither logged nor
        counted otherwise: waiting is normal."""
        self._shift("running", "waiting")
        try:
            await limits.wait(task)
        finally:
            self._shift("waiting", "running")

    def _not_run(self, task: Task, attempts: int) -> None:
        """A task this worker cannot run (its function cannot be imported here): it ends as
        failed, with a span and its metric, and goes to the dead-letter hook: the message
        is acknowledged, so the hook is what is left of it."""
        task.done = True
        record = task.record
        self.telemetry.track(task)
        self.telemetry.unrun_span(task, Outcome.FAILED)
        self.telemetry.finished(task, Outcome.FAILED)
        self._count("failed")
        exc = ImportError(f"{record.target} cannot be imported in this {self.system} worker")
        self.dead_letters.submit(
            task, DeadLetter(record.name, record.id, exc, attempts, Outcome.FAILED.value)
        )

    def shutdown(self, timeout: float = 5.0) -> None:
        """The worker process stops: give the dead-letter hook at most ``timeout`` seconds
        to see the dead letters submitted so far, give up (log by name, count) those it has
        not started on, and write the aggregated lines' pending summaries. From a thread
        that runs no event loop (or off the loop: it blocks while the hook works)."""
        if not self.dead_letters.wait(timeout):
            lost = self.dead_letters.give_up(f"when the {self.system} worker stopped")
            self._count("dead_letters_lost", lost)
        self.telemetry.aggregator.flush()

    def run_blocking(self, body: object, *, redelivered: bool = False) -> Outcome:
        """:meth:`run` from a sync worker: on this process's runner loop thread, under the
        span current in the calling thread (the engine's instrumentation), if any."""
        parent = trace_carrier(contextvars.copy_context())
        future = asyncio.run_coroutine_threadsafe(
            self.run(body, parent=parent or None, redelivered=redelivered), self._thread_loop()
        )
        return future.result()

    def _thread_loop(self) -> asyncio.AbstractEventLoop:
        """This process's runner loop, started on first use (a forked child starts its own,
        and its own limits: the parent's timer and waiters belong to the parent's loop)."""
        with self._lock:
            if self._loop is None or self._loop_pid != os.getpid():
                self._limits = NameLimits()
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(
                    target=serve, name=f"after-response-{self.system}-runner", daemon=True
                ).start()
                ready.wait()
                self._loop, self._loop_pid = loop, os.getpid()
            return self._loop

    def _count(self, what: str, delta: int = 1) -> None:
        with self._lock:
            self._counts[what] += delta

    def _shift(self, source: str, target: str) -> None:
        """Move one delivery from one count to another, at once (the identity holds)."""
        with self._lock:
            self._counts[source] -= 1
            self._counts[target] += 1
