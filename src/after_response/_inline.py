"""Without lifespan there is no shared executor: each request's own ASGI call runs its
tasks, after its response, and returns when they have ended (so a server's graceful
shutdown, which waits for open calls, waits for them too). The executor's bounds and books
still apply; only the owner of the tasks is the request's call.

On asyncio, the requests of one loop share one task set (and its one deadline timer); each
call waits for its own tasks, and cancels only its own should it be cancelled."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._accounting import Stats
from ._dispatching import CANCEL_GRACE
from ._executor import Executor
from ._task import Task
from ._tasks import NativeTasks, Spawner, loop_handle


class InlineDispatcher:
    """The dispatcher of one request's call, without lifespan."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._outstanding = 0
        self._settled: asyncio.Future[None] | anyio.Event | None = None
        self._owner: Spawner | None = None
        self._task_group: TaskGroup | None = None
        self.open = False
        #: The loop's thread, and how another thread calls onto the loop (late adds).
        self.loop_thread = 0
        self.call_soon: Callable[..., Any] | None = None

    async def __aenter__(self) -> InlineDispatcher:
        owner = _shared_owner(self._executor)
        if owner is not None:
            # An anyio task group per request costs several times more, and nothing here
            # needs more than "cancel and wait".
            self._owner = owner
            self.loop_thread, self.call_soon = owner.loop_thread, owner.call_soon_threadsafe
        else:
            self._task_group = anyio.create_task_group()
            self._owner = await self._task_group.__aenter__()
            self.loop_thread, self.call_soon = threading.get_ident(), loop_handle()
        self.open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.open = False
        owner = self._owner
        if type(owner) is NativeTasks:
            if exc_type is not None:
                ended = self._task_ended
                mine = await owner.aclose(
                    CANCEL_GRACE, only=lambda item: getattr(item, "on_end", None) == ended
                )
                for task in mine:
                    self._executor.left_behind(task)
        elif self._task_group is not None:
            await self._task_group.__aexit__(exc_type, exc, traceback)

    def submit(self, tasks: list[Task]) -> list[Task]:
        for task in tasks:
            task.on_end = self._task_ended
        self._outstanding += len(tasks)
        return self._executor.submit(tasks, self._owner)

    async def submit_waiting(self, tasks: list[Task]) -> None:
        await self._executor.submit_waiting(tasks, self._owner)

    async def stop(self, timeout: float | None) -> None:
        """Wait for this request's tasks, at most ``timeout`` seconds."""
        if not self._outstanding:
            return
        settled: Any
        if type(self._owner) is NativeTasks:
            settled = self._owner.loop.create_future()
        else:
            settled = anyio.Event()
        self._settled = settled
        wait = settled if isinstance(settled, asyncio.Future) else settled.wait()
        if timeout is None:
            await wait
            return
        with anyio.move_on_after(timeout):
            await wait

    def stats(self) -> Stats:
        return self._executor.stats()

    def _task_ended(self) -> None:
        self._outstanding -= 1
        settled = self._settled
        if self._outstanding == 0 and settled is not None:
            if isinstance(settled, asyncio.Future):
                if not settled.done():
                    settled.set_result(None)
            else:
                settled.set()


def _shared_owner(executor: Executor) -> NativeTasks | None:
    """The task set of the running asyncio loop's requests without lifespan (``None``
    under trio): one per loop and executor, made at the first such request."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    owner = executor.inline_owner
    if owner is None or owner.loop is not loop:
        owner = executor.inline_owner = NativeTasks()
        # Lines counted in the dead-letter hook's thread are summarised on this loop.
        executor.telemetry.aggregator.loop = loop
    return owner
