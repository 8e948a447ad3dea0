"""Per task name limits in a dispatcher: a task whose name is at its own ``max_concurrency``
or ``rate_limit`` waits in its name's line, holding nothing else, until a task of its name
ends or its rate allows a start (one loop timer for all names).

Two dispatchers wait there, each its own way. The executor parks a task and starts it from
its ``on_ready`` callback, holding no global slot meanwhile. An engine worker's runner awaits
:meth:`NameLimits.wait` in the task's own coroutine (its delivery is the engine's to hold).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ._limits import LimitGate
from ._task import Task


class NameLimits:
    """The gate of one dispatcher, and the timer that lets rate-limited tasks in.

    With ``on_ready``, tasks that may start now are handed to it (they hold their name's
    slot); without it, each such task wakes its coroutine, waiting in :meth:`wait`. One event
    loop's: not thread-safe.
    """

    def __init__(self, on_ready: Callable[[list[Task]], None] | None = None) -> None:
        self._gate: LimitGate[Task] = LimitGate()
        self._on_ready = on_ready or self._wake
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: Tasks parked by admit() whose coroutine awaits wait(), and what wakes each.
        self._waiters: dict[Task, asyncio.Future[None]] = {}

    @property
    def parked(self) -> int:
        return self._gate.parked

    def admit(self, task: Task) -> bool:
        """Take a slot of ``task``'s name (``True``), or park it in its name's line."""
        limits = task.record.limits
        assert limits is not None
        name = task.record.name
        now = time.monotonic()
        if self._gate.try_acquire(name, limits, now) == 0.0:
            task.gated = True
            return True
        self._gate.park(name, task)
        self._schedule()
        return False

    async def wait(self, task: Task) -> None:
        """Wait until ``task``, which :meth:`admit` parked, holds a slot of its name (without
        ``on_ready``). Cancelled, it holds nothing: it leaves its line, or passes on the slot
        it was given as it was cancelled."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[task] = future
        try:
            await future
        except asyncio.CancelledError:
            if task.gated:
                self.release(task)
            else:
                del self._waiters[task]
                self._gate.withdraw(task.record.name, task)
            raise

    def release(self, task: Task) -> None:
        """``task`` ended an attempt: its name's slot is free; start who may now."""
        task.gated = False
        self._gate.release(task.record.name)
        ready = self._gate.unpark_ready(task.record.name, time.monotonic())
        if ready:
            self._mark(ready)
            self._on_ready(ready)

    def take_parked(self) -> list[Task]:
        """Every task still waiting in a line (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._gate.take_parked()

    def _mark(self, ready: list[Task]) -> None:
        for task in ready:
            task.gated = True

    def _wake(self, ready: list[Task]) -> None:
        for task in ready:
            future = self._waiters.pop(task)
            if not future.done():  # else its waiter was cancelled: it passes the slot on
                future.set_result(None)

    def _schedule(self) -> None:
        wakeup = self._gate.next_wakeup()
        if wakeup is None:
            return
        if self._timer is not None:
            if self._timer_at <= wakeup:
                return
            self._timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - trio: starts wait for releases only
            return
        self._timer_at = wakeup
        self._timer = loop.call_later(max(0.0, wakeup - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        ready = self._gate.unpark_due(time.monotonic())
        if ready:
            self._mark(ready)
            self._on_ready(ready)
        self._schedule()
