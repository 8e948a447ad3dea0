"""Where tasks wait and run: the in-process dispatcher, one per middleware.

An exact bound on running tasks (``max_concurrency``), a bounded queue in front of it
(``max_pending``), and room for at most ``max_pending`` more tasks whose requests wait for
space (``overflow_timeout``); beyond that, tasks are shed. Retries give their slot back while
they back off. The books are kept by the :class:`~after_response._accounting.Ledger`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

import anyio

from ._accounting import Ledger, Stats
from ._dead_letters import DeadLetterHook, DeadLetters
from ._endings import Endings
from ._logs import logger
from ._options import Resolved
from ._runner import Runner
from ._task import Outcome, Task, set_running_task
from ._tasks import NativeTasks, Spawner, loop_handle, running_asyncio
from ._telemetry import Telemetry
from ._threads import WorkerThreads

#: Seconds that tasks get, once cancelled at the shutdown deadline, to finish; those still
#: running after it (a task that catches ``CancelledError`` and carries on) are abandoned.
CANCEL_GRACE: Final = 1.0


class Executor(Endings):
    """Runs tasks concurrently under an exact bound, with a bounded queue in front of it."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        max_pending: int,
        overflow_timeout: float | None,
        max_threads: int,
        on_dead_letter: DeadLetterHook | None,
        telemetry: Telemetry,
        defaults: Resolved,
    ) -> None:
        self.defaults = defaults
        self.max_concurrency = max_concurrency
        self.max_pending = max_pending
        self.overflow_timeout = overflow_timeout
        super().__init__(Ledger(), telemetry, DeadLetters(on_dead_letter))
        self.runner = Runner(telemetry, WorkerThreads(max_threads))
        self._queue: deque[Task] = deque()
        #: Tasks of requests waiting for room (at most max_pending), and their wake-ups.
        self._waiting = 0
        self._room_waiters: deque[anyio.Event] = deque()
        self._closing = False
        #: The owner of tasks between lifespan startup and shutdown, if any.
        self.background: Spawner | None = None
        #: The last lifespan's owner, kept once it stops: its tasks' cancellations are told
        #: apart from those of a request's own owner (no lifespan).
        self._lifespan_owner: Spawner | None = None
        self._stopped: anyio.Event | None = None
        self._serving_done: anyio.Event | None = None
        #: The loop's thread, and how to call onto the loop from another thread.
        self.loop_thread = 0
        self.call_soon_threadsafe: Callable[..., Any] | None = None

    def stats(self) -> Stats:
        return self.ledger.stats()

    # -- admission ----------------------------------------------------------------------------

    def submit(self, tasks: Iterable[Task], owner: Spawner | None = None) -> list[Task]:
        """Start or queue each task without waiting; return those that found no room."""
        owner = owner or self.background
        ledger = self.ledger
        overflow: list[Task] = []
        now = time.perf_counter()
        for task in tasks:
            if overflow or self._closing or owner is None:
                overflow.append(task)
            elif ledger.running < self.max_concurrency:
                self._take(task, owner, now)
                self._start(task)
            elif ledger.pending < self.max_pending:
                self._take(task, owner, now)
                self._queue.append(task)
                ledger.queued += 1
                self.telemetry.pending(task, 1)
            else:
                overflow.append(task)
        return overflow

    async def submit_waiting(self, tasks: list[Task], owner: Spawner | None = None) -> None:
        """Submit ``tasks``, waiting up to ``overflow_timeout`` for room; shed what is left.

        Called by a request's ASGI call after its response was sent. At most
        ``max_pending`` tasks wait this way; tasks beyond that are shed at once.
        """
        room = max(0, self.max_pending - self._waiting)
        if len(tasks) > room:
            # Counted with this request's own tasks that do get a place to wait.
            self.shed(
                tasks[room:],
                f"the queue was full and {self._waiting + room} task(s) already waited for "
                f"room, the most allowed (max_pending={self.max_pending})",
            )
            tasks = tasks[:room]
        if not tasks:
            return
        self._waiting += len(tasks)
        waiting = tasks
        try:
            with anyio.move_on_after(self.overflow_timeout):
                while waiting and not self._closing:
                    room_event = anyio.Event()
                    self._room_waiters.append(room_event)
                    try:
                        await room_event.wait()
                    finally:
                        if not room_event.is_set():
                            self._room_waiters.remove(room_event)
                    before = len(waiting)
                    waiting = self.submit(waiting, owner)
                    self._waiting -= before - len(waiting)
                    if waiting:
                        self._wake_room_waiter()  # ours did not all fit; the next may
        finally:
            self._waiting -= len(waiting)
            if waiting:
                self.shed(
                    waiting,
                    "shutdown began while it waited for room"
                    if self._closing
                    else f"the queue stayed full (max_pending={self.max_pending}) for "
                    f"overflow_timeout={self.overflow_timeout}s",
                )

    def _take(self, task: Task, owner: Spawner, now: float) -> None:
        task.owner = owner
        task.ready_at = now
        self.ledger.left_request += 1

    def _start(self, task: Task) -> None:
        self.ledger.running += 1
        task.slot = True
        self.telemetry.running(task, 1)
        assert task.owner is not None
        # Spawned inside the task's context: the new asyncio task runs in a copy of it, the
        # request's contextvars (and so its current span) as they were at add() time.
        owner = task.owner
        if type(owner) is NativeTasks:
            task.context.run(owner.spawn, self._run(task), task)
        else:
            task.context.run(owner.start_soon, self._run, task)

    def _release(self, task: Task) -> None:
        if not task.slot:
            return
        task.slot = False
        self.ledger.running -= 1
        self.telemetry.running(task, -1)
        queue = self._queue
        ledger = self.ledger
        while queue and ledger.running < self.max_concurrency and not self._closing:
            waiting = queue.popleft()
            ledger.queued -= 1
            self.telemetry.pending(waiting, -1)
            self._start(waiting)
            self._wake_room_waiter()

    def _wake_room_waiter(self) -> None:
        if self._room_waiters:
            self._room_waiters.popleft().set()

    # -- running ------------------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        """Run ``task`` to its end, or until it is queued again to retry."""
        set_running_task(task)
        try:
            while True:
                try:
                    outcome, exc = await self.runner.attempt(task, may_retry=not self._closing)
                except GeneratorExit:
                    raise  # left behind, then closed with its loop: no loop to ask below
                except anyio.get_cancelled_exc_class():
                    self.abandon_running(task, f"{self._cancel_cause(task)} while it ran")
                    raise
                if outcome is not Outcome.RETRY:
                    self.end(task, outcome, exc, attempts=task.attempt)
                    return
                if not await self._back_off(task):
                    return  # queued again: whoever frees a slot runs its next attempt
        finally:
            self._release(task)  # if it still holds one, whatever ended it

    async def _back_off(self, task: Task) -> bool:
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
        gives_slot_back = ledger.pending < self.max_pending
        if gives_slot_back:
            self._release(task)
            ledger.retry_waiting += 1
            self.telemetry.pending(task, 1)
        try:
            await anyio.sleep(delay)
        except anyio.get_cancelled_exc_class():
            self.abandon([task], f"{self._cancel_cause(task)} while it waited to retry", taken=True)
            raise
        finally:
            if gives_slot_back:
                ledger.retry_waiting -= 1
                self.telemetry.pending(task, -1)
        task.ready_at = time.perf_counter()
        if task.slot:
            return True
        if ledger.running < self.max_concurrency and not self._queue and not self._closing:
            ledger.running += 1
            task.slot = True
            self.telemetry.running(task, 1)
            return True
        self._queue.append(task)
        ledger.queued += 1
        self.telemetry.pending(task, 1)
        return False

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

    # -- lifecycle ----------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every task added before the call has ended, and the dead-letter hook
        has seen those that failed; ``False`` on timeout."""
        deadline = None if timeout is None else anyio.current_time() + timeout
        if not await self.ledger.drain(timeout):
            return False
        left = None if deadline is None else max(0.0, deadline - anyio.current_time())
        return await self.dead_letters.flush(left)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Own the background tasks until ``stop()``; started at lifespan startup."""
        self._stopped = anyio.Event()
        self._serving_done = anyio.Event()
        self.loop_thread = threading.get_ident()
        self.call_soon_threadsafe = loop_handle()
        self._closing = False
        try:
            if running_asyncio():
                tasks = NativeTasks()
                self.background = self._lifespan_owner = tasks
                task_status.started()
                try:
                    await self._stopped.wait()
                finally:
                    self.background = None
                    for task in await tasks.aclose(CANCEL_GRACE):
                        self.left_behind(task)
            else:
                async with anyio.create_task_group() as task_group:
                    self.background = self._lifespan_owner = task_group
                    task_status.started()
                    await self._stopped.wait()
                    task_group.cancel_scope.cancel()
        finally:
            self.background = None
            self._serving_done.set()

    async def stop(self, timeout: float | None) -> None:
        """Drain for at most ``timeout`` seconds, then abandon (log, count, cancel) the rest.

        A hard bound: tasks get :data:`CANCEL_GRACE` seconds to end once cancelled; any
        that carry on past it are left behind, abandoned.
        """
        if self._stopped is None or self._serving_done is None:
            return
        if not await self._drain_everything(timeout):
            outstanding = self.ledger.outstanding
            logger.error(
                "shutdown: %d after-response task(s) still unfinished after "
                "shutdown_timeout=%ss; abandoning them",
                outstanding,
                timeout,
                extra={"abandoned_count": outstanding},
            )
            self._closing = True
            queued, self._queue = list(self._queue), deque()
            self.ledger.queued = 0
            for task in queued:
                self.telemetry.pending(task, -1)
            self.abandon(queued, "shutdown_timeout elapsed before it started", taken=True)
            for room in self._room_waiters:
                room.set()
        self._stopped.set()
        await self._serving_done.wait()
        await self.dead_letters.flush(CANCEL_GRACE)
        self._closing = False
        self._stopped = None

    async def _drain_everything(self, timeout: float | None) -> bool:
        """Wait until nothing at all is outstanding, tasks added meanwhile included."""
        deadline = None if timeout is None else anyio.current_time() + timeout
        while self.ledger.outstanding:
            left = None if deadline is None else deadline - anyio.current_time()
            if left is not None and left <= 0:
                return False
            if not await self.ledger.drain(left):
                return False
        return True
