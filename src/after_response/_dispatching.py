"""Where tasks wait and run: admission, running and retries of the in-process dispatcher.

An exact bound on running tasks (``max_concurrency``), a bounded queue in front of it
(``max_pending``), and room for at most ``max_pending`` more tasks whose requests wait for
space (``overflow_timeout``); beyond that, tasks are shed. Retries give their slot back while
they back off. The books are kept by the :class:`~after_response._accounting.Ledger`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from types import FrameType
from typing import Final

import anyio

from ._accounting import Ledger, Stats
from ._dead_letters import DeadLetters
from ._journal import Journal
from ._limited import NameLimits
from ._options import Resolved
from ._relay import Relay
from ._runner import Runner
from ._settings import Settings
from ._store import OUTBOX
from ._task import Outcome, Task, set_running_task
from ._tasks import NativeTasks, Spawner
from ._telemetry import Telemetry
from ._threads import WorkerThreads
from ._waiting import Waiting
from ._watchdog import Watchdog

#: Seconds that tasks get, once cancelled at the shutdown deadline, to finish; those still
#: running after it (a task that catches ``CancelledError`` and carries on) are abandoned.
CANCEL_GRACE: Final = 1.0


class Dispatching(Waiting):
    """Runs tasks concurrently under an exact bound, with a bounded queue in front of it:
    admission, running, retries. Its life (serve, drain, stop) is the executor's."""

    def __init__(self, settings: Settings, telemetry: Telemetry, *, defaults: Resolved) -> None:
        self.defaults = defaults
        self.max_concurrency = settings.max_concurrency
        self.max_pending = settings.max_pending
        self.overflow_timeout = settings.overflow_timeout
        #: Backpressure: a request's tasks wait for room as long as it takes, never shed.
        self.backpressure = settings.overflow == "backpressure"
        self.spill = settings.overflow == "spill"
        journal = None if settings.store is None else Journal(settings.store, telemetry.aggregator)
        dead_letters = DeadLetters(settings.on_dead_letter, telemetry.aggregator)
        super().__init__(Ledger(), telemetry, dead_letters, journal)
        #: With an engine: durable tasks wait in the store's outbox and are published, not run.
        self.relay: Relay | None = None
        if settings.engine is not None:
            assert journal is not None  # Settings checked it
            journal.durable_state = OUTBOX
            self.relay = Relay(settings.engine, self)
        self.runner = Runner(
            telemetry, WorkerThreads(settings.max_threads), lines=telemetry.aggregator
        )
        #: New requests held by backpressure, and how many were answered 503.
        self._gate_waiters: deque[anyio.Event] = deque()
        self.held = 0
        self.refused = 0
        self._limits = NameLimits(self._limits_ready)
        self._watchdog: Watchdog[Task] = Watchdog(settings.loop_block_threshold, self._blocked)
        self._watchdog.register_runner(Dispatching._run.__code__, _task_of_frame)
        self._queue: deque[Task] = deque()
        #: Tasks of requests waiting for room (at most max_pending), and their wake-ups.
        self._waiting = 0
        self._room_waiters: deque[anyio.Event] = deque()
        #: The owner of tasks between lifespan startup and shutdown, if any.
        self.background: Spawner | None = None
        #: The last lifespan's owner, kept once it stops: its tasks' cancellations are told
        #: apart from those of a request's own owner (no lifespan).
        self._lifespan_owner: Spawner | None = None
        #: Without lifespan: the task set the requests of one asyncio loop share.
        self.inline_owner: NativeTasks | None = None

    def stats(self) -> Stats:
        return self.ledger.stats()

    # -- admission ----------------------------------------------------------------------------

    def submit(self, tasks: Iterable[Task], owner: Spawner | None = None) -> list[Task]:
        """Start or queue each task without waiting; return those that found no room."""
        owner = owner or self.background
        ledger = self.ledger
        overflow: list[Task] = []
        if self.relay is not None:
            tasks = self.relay.take(tasks)
        now = time.perf_counter()
        for task in tasks:
            if overflow or self._closing or owner is None:
                overflow.append(task)
                continue
            if ledger.running < self.max_concurrency:
                start = True
            elif ledger.waiting < self.max_pending:
                start = False
            else:
                overflow.append(task)
                continue
            task.owner = owner
            task.ready_at = now
            ledger.left_request += 1
            if start:
                self._start(task)  # or parks it, to wait for its name's own limits
            else:
                self._queue.append(task)
                ledger.queued += 1
                self.telemetry.pending(task, 1)
        return overflow

    def _start(self, task: Task) -> None:
        """Give ``task`` a slot and run it; or, if its name is at its own limits, park it
        in its name's line (pending, holding no slot)."""
        if task.record.limits is not None and not task.gated and not self._limits.admit(task):
            self.ledger.parked += 1
            self.telemetry.pending(task, 1)
            return
        self.ledger.running += 1
        task.slot = True
        owner = task.owner
        # The new asyncio task runs in a copy of the task's context: the request's contextvars
        # (and so its current span) as they were at add() time. A copy, because logs and dead
        # letters read the task's own context while it runs.
        if type(owner) is NativeTasks:
            task.running = owner.spawn(self._run(task), task, task.context.copy())
        else:
            task.context.run(owner.start_soon, self._run, task)

    def _release(self, task: Task) -> None:
        """Give back the slots ``task`` holds (if any), and start what may start now."""
        if task.gated:
            self._limits.release(task)
        if task.slot:
            task.slot = False
            self.ledger.running -= 1
        if self._queue or self._gate_waiters or self.backlog:
            self._dispatch()

    def _dispatch(self) -> None:
        """Start queued tasks while there are free slots."""
        queue = self._queue
        ledger = self.ledger
        while queue and ledger.running < self.max_concurrency and not self._closing:
            waiting = queue.popleft()
            ledger.queued -= 1
            self.telemetry.pending(waiting, -1)
            self._start(waiting)
            self._wake_room_waiter()
        if self._gate_waiters:
            self._wake_gate()
        if self.backlog and not queue and self.room_freed is not None:
            self.room_freed.set()  # the store holds tasks that wait for room

    def _limits_ready(self, tasks: list[Task]) -> None:
        """Tasks whose name's limits let them start: first in the queue (they waited)."""
        for task in reversed(tasks):
            self.ledger.parked -= 1
            self._queue.appendleft(task)
            self.ledger.queued += 1
        self._dispatch()

    # -- running ------------------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        """Run ``task`` to its end, or until it is queued again to retry."""
        record = task.record
        journal = self.journal if record.durable else None
        try:
            while True:
                set_running_task((record.id, record.name, task.attempt, task.recovered))
                try:
                    if journal is not None:
                        await journal.running(task)
                    outcome, exc = await self.runner.attempt(task, may_retry=not self._closing)
                except GeneratorExit:
                    raise  # left behind, then closed with its loop: no loop to ask below
                except anyio.get_cancelled_exc_class():
                    self.abandon_running(task, f"{self._cancel_cause(task)} while it ran")
                    raise
                if outcome is not Outcome.RETRY:
                    self.end(task, outcome, exc, attempts=task.attempt)
                    return
                if not await self._back_off(task, exc):
                    return  # queued again: whoever frees a slot runs its next attempt
        finally:
            if task.running is not None:
                # Let go of the task now: its asyncio task lives one more loop turn, until
                # its done callback runs, and with it whatever it refers to.
                task.owner.let_go(task.running)
                task.running = None
            self._release(task)  # if it still holds one, whatever ended it

    async def _back_off(self, task: Task, exc: BaseException | None) -> bool:
        """Wait out the delay before the next attempt; ``True`` when the task holds a slot
        for it, ``False`` when it was queued again.

        A task waiting to retry gives its slot back and waits among the pending, if there is
        room there; if not, it keeps its slot while it waits, so pending stays bounded.
        """
        ledger = self.ledger
        delay = task.record.retry.delay(task.attempt)
        ledger.retried += 1
        self.telemetry.retried(task)
        task.attempt += 1
        if self.journal is not None and task.record.durable and exc is not None:
            self.journal.retrying(task, delay, exc)  # a restart keeps the attempt and delay
        gives_slot_back = ledger.waiting < self.max_pending
        if gives_slot_back:
            self._release(task)
            ledger.retry_waiting += 1
        self.telemetry.pending(task, 1)  # waiting to retry, with or without its slot
        try:
            await anyio.sleep(delay)
        except anyio.get_cancelled_exc_class():
            cause = self._cancel_cause(task)
            self.abandon([task], f"{cause} while it waited to retry", taken=True)
            raise
        finally:
            if gives_slot_back:
                ledger.retry_waiting -= 1
            self.telemetry.pending(task, -1)
        task.ready_at = time.perf_counter()
        if task.slot:
            return True
        if (
            ledger.running < self.max_concurrency
            and not self._queue
            and not self._closing
            and task.record.limits is None  # a limited task passes its name's gate again
        ):
            ledger.running += 1
            task.slot = True
            return True
        self._queue.append(task)
        ledger.queued += 1
        self.telemetry.pending(task, 1)
        return False  # the caller's release starts it, if a slot is free

    def _cancel_cause(self, task: Task) -> str:
        if self._closing:
            return "shutdown_timeout elapsed"
        if task.owner is None or task.owner is not self._lifespan_owner:
            return "its request's ASGI call was cancelled"
        # Not the deadline: something else cancelled it, or its owner (the lifespan's task
        # was cancelled: the server, or its event loop's teardown, ended it without shutdown).
        if self.background is None:
            return "it was cancelled from outside after-response, without a lifespan shutdown"
        return "it was cancelled from outside after-response"

    def left_behind(self, task: Task) -> None:
        """End a task that went on running after it was cancelled (it caught the
        cancellation): its owner stops waiting for it."""
        self._release(task)
        self.abandon_running(
            task,
            f"{self._cancel_cause(task)}, and it went on running {CANCEL_GRACE}s after it was "
            "cancelled; left behind",
        )

    def _blocked(self, task: Task | None, blocked_for: float) -> None:
        threshold = self._watchdog.threshold
        assert threshold is not None
        self.telemetry.loop_blocked(task, blocked_for, threshold)


def _task_of_frame(frame: FrameType) -> Task | None:
    """The task an ``Executor._run`` frame runs (for the loop watchdog, in its thread): marked,
    so that its attempt's span gets an event when the attempt ends."""
    task = frame.f_locals.get("task")
    if not isinstance(task, Task):
        return None
    task.blocked = True
    return task
