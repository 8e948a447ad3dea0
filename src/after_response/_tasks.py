"""Who owns the running tasks: a plain set of asyncio tasks where the loop is asyncio, an
anyio task group elsewhere (trio). Either way the executor that spawns them cancels and
awaits them when it stops: no task outlives its owner."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import Context
from typing import Any, TypeAlias

import anyio
from anyio.abc import TaskGroup

logger = logging.getLogger("after_response")


class NativeTasks:
    """Tasks created straight on the running asyncio loop.

    anyio's ``start_soon`` costs several times a bare ``loop.create_task`` (it wraps each
    task in a handle and a cancel scope); this owner keeps the same lifetime rules at the
    bare cost: ``aclose()`` cancels whatever still runs and waits for it to finish.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._time = self.loop.time
        #: The loop's thread, and how another thread calls onto the loop.
        self.loop_thread = threading.get_ident()
        self.call_soon_threadsafe = self.loop.call_soon_threadsafe
        #: Each running asyncio task, and the item it runs (its first argument).
        self._tasks: dict[asyncio.Task[Any], Any] = {}
        #: Tasks this owner cancelled (closing): their CancelledError is ours, not theirs.
        self._cancelled: set[asyncio.Task[Any]] = set()
        # Deadlines: one timer for all running attempts, at the earliest deadline. Starting
        # and finishing an attempt is a dict write, where a timer each (asyncio.timeout)
        # costs a heap push and a cancel, more than running a short task.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # The done callback as one bound method, run in one empty context: by default each
        # add_done_callback() makes a bound method and a context copy, objects that live as
        # long as the task and, with hundreds of tasks waiting for the loop, set off the
        # garbage collector far more often.
        self._on_done = self._done
        self._empty_context = contextvars.Context()

    def set_deadline(self, task: asyncio.Task[Any], timeout: float) -> None:
        """Cancel ``task`` (the attempt running in it) after ``timeout`` seconds, unless
        :meth:`clear_deadline` comes first."""
        deadline = self._time() + timeout
        self._deadlines[task] = deadline
        if deadline < self._timer_at:
            self._schedule(deadline)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether the ``CancelledError`` that ``task``'s attempt just got came from its
        deadline; if so, the cancellation is taken back (the task goes on, timed out)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()  # type: ignore[attr-defined,unused-ignore]
        return True

    def clear_deadline(self, task: asyncio.Task[Any]) -> None:
        """The attempt ended: its deadline no longer applies."""
        self._deadlines.pop(task, None)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        # In the empty context: a copy of the current one (the default) would keep the task
        # that set this deadline, and its arguments, alive until the timer fires.
        self._timer = self.loop.call_at(when, self._expire, context=self._empty_context)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self.loop.time()
        earliest = math.inf
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._schedule(earliest)

    def start_soon(self, func: Callable[..., Awaitable[Any]], /, *args: Any) -> None:
        """Run ``func(*args)`` as a task of this owner (anyio's ``TaskGroup`` signature)."""
        self.spawn(func(*args), args[0] if args else None)  # type: ignore[arg-type]

    def spawn(
        self, coroutine: Coroutine[Any, Any, Any], item: Any, context: Context | None = None
    ) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task of this owner, in ``context`` (default: a copy of the
        current one), and return it; ``item`` is what ``aclose()`` returns should the task
        outlive its cancellation."""
        if context is None:
            task = self.loop.create_task(coroutine)
        elif HAS_UNCANCEL:  # 3.11+: create_task takes the context, no run() around it
            task = self.loop.create_task(coroutine, context=context)  # type: ignore[call-arg,unused-ignore]
        else:
            task = context.run(self.loop.create_task, coroutine)
        self._tasks[task] = item
        task.add_done_callback(self._on_done, context=self._empty_context)
        return task

    def let_go(self, task: asyncio.Task[Any]) -> None:
        """``task`` has finished its work: drop its item now, not when its done callback
        runs a loop turn later (the objects it holds would survive one more turn)."""
        self._tasks[task] = None

    def _done(self, task: asyncio.Task[Any]) -> None:
        del self._tasks[task]
        if self._cancelled:
            self._cancelled.discard(task)
        if self._expired:  # cancelled at its deadline, and it caught the cancellation
            self._expired.discard(task)
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - a bug
            logger.error("after-response internal error: %s", type(task.exception()).__qualname__)

    def cancelled_by_owner(self) -> bool:
        """Whether the current task's cancellation came from this owner (closing, or its
        deadline), rather than from the side effect raising ``CancelledError`` itself."""
        task = asyncio.current_task()
        return task in self._cancelled or task in self._expired

    async def aclose(
        self, grace: float | None = None, only: Callable[[Any], bool] | None = None
    ) -> list[Any]:
        """Cancel the tasks that still run and wait for them to finish, at most ``grace``
        seconds (``None``: as long as it takes); the items of those that carry on.

        With ``only``, just the tasks whose item it accepts (one request's, in a task set
        that requests without lifespan share); the owner stays open for the others.
        """
        # Which tasks to wait for: those picked, or (closing) every task, later ones too.
        picked: list[asyncio.Task[Any]] | None = None
        if only is None:
            if self._timer is not None:
                self._timer.cancel()
            self._deadlines.clear()
            self._expired.clear()
            tasks = list(self._tasks)
        else:
            tasks = picked = [task for task, item in self._tasks.items() if only(item)]
        for task in tasks:
            self._cancelled.add(task)
            task.cancel()
        with anyio.move_on_after(grace):
            while running := self._still_running(picked):
                await asyncio.wait(running)
        left = self._still_running(picked)
        for task in left:
            _forget(task)
        return [item for task in left if (item := self._tasks[task]) is not None]

    def _still_running(self, tasks: list[asyncio.Task[Any]] | None) -> list[asyncio.Task[Any]]:
        """Those of ``tasks`` not done yet (``None``: every task of this owner)."""
        if tasks is None:
            return list(self._tasks)
        return [task for task in tasks if task in self._tasks]


def _forget(task: asyncio.Task[Any]) -> None:
    """Take a task that outlived its cancellation out of the loop's registry of tasks.

    At exit, ``asyncio.run()`` and ``asyncio.Runner`` (hypercorn) cancel every task of the
    loop and wait for all of them: forever, for one that catches the cancellation and
    carries on, so the process would never exit. Forgotten, it runs on while the loop does
    and is dropped with it. ``_unregister_task`` is private: without it, nothing is done.
    """
    unregister = getattr(asyncio.tasks, "_unregister_task", None)
    if unregister is not None:
        with contextlib.suppress(Exception):
            unregister(task)
    # It was logged as left behind: no "Task was destroyed but it is pending!" at exit.
    with contextlib.suppress(AttributeError):
        task._log_destroy_pending = False  # type: ignore[attr-defined]


#: What runs a job's task: the executor's own asyncio task set, or an anyio task group.
Spawner: TypeAlias = "NativeTasks | TaskGroup"


def running_asyncio() -> bool:
    """Whether the current thread runs an asyncio loop (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


#: ``Task.uncancel`` (3.11+) lets a deadline cancel an attempt without cancelling its task.
HAS_UNCANCEL = sys.version_info >= (3, 11)


def loop_handle() -> Callable[..., Any]:
    """How another thread schedules a call on the running loop (asyncio or trio)."""
    if running_asyncio():
        return asyncio.get_running_loop().call_soon_threadsafe
    import trio  # only reached under trio

    return trio.lowlevel.current_trio_token().run_sync_soon
