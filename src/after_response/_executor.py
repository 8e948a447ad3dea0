"""The in-process dispatcher's life, one per middleware: it serves from lifespan startup
(the tasks' owner, the loop watchdog, recovery and the relay), drains on request, and stops
within ``shutdown_timeout``, abandoning what is left. What it does in between is
:class:`~after_response._dispatching.Dispatching`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ._dispatching import CANCEL_GRACE, Dispatching
from ._logs import logger
from ._options import Resolved
from ._settings import Settings
from ._tasks import NativeTasks, loop_handle, running_asyncio
from ._telemetry import Telemetry


class Executor(Dispatching):
    """Runs tasks concurrently under an exact bound, with a bounded queue in front of it;
    started at lifespan startup, stopped at shutdown."""

    def __init__(self, settings: Settings, telemetry: Telemetry, *, defaults: Resolved) -> None:
        super().__init__(settings, telemetry, defaults=defaults)
        self._stopped: anyio.Event | None = None
        self._serving_done: anyio.Event | None = None
        #: The loop's thread, and how to call onto the loop from another thread.
        self.loop_thread = 0
        self.call_soon_threadsafe: Callable[..., Any] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every task added before the call has ended, and the dead-letter hook
        has seen those that failed; ``False`` on timeout. From any thread: the books are
        kept on the serving loop, so a caller on another loop (a test beside a server in a
        thread of its own) has the drain run there."""
        call_soon, owner = self.call_soon_threadsafe, self.background
        elsewhere = threading.get_ident() != self.loop_thread
        if call_soon is not None and owner is not None and elsewhere:
            drained: concurrent.futures.Future[bool] = concurrent.futures.Future()

            async def drain_there() -> None:
                try:
                    drained.set_result(await self._drain_here(timeout))
                finally:
                    if not drained.done():  # cancelled: the server stopped meanwhile
                        drained.set_result(False)

            call_soon(owner.start_soon, drain_there)
            return await anyio.to_thread.run_sync(drained.result, abandon_on_cancel=True)
        return await self._drain_here(timeout)

    async def _drain_here(self, timeout: float | None) -> bool:
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
            if self.relay is not None:
                self.relay.engine.check()
            if self.journal is not None:
                await self.journal.open()
            if running_asyncio():
                # Lines counted in the dead-letter hook's thread are summarised on this loop.
                self.telemetry.aggregator.loop = asyncio.get_running_loop()
                tasks = NativeTasks()
                self.background = self._lifespan_owner = tasks
                self._watchdog.start()
                if self.journal is not None:
                    tasks.spawn(self._recover(), None)
                if self.relay is not None:
                    self.relay.running = True
                    tasks.spawn(self.relay.run(), None)
                task_status.started()
                try:
                    await self._stopped.wait()
                finally:
                    self._watchdog.stop()
                    self.background = None
                    for task in await tasks.aclose(CANCEL_GRACE):
                        self.left_behind(task)
                    if self.relay is not None:
                        await self.relay.stop()
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
        that carry on past it are left behind, abandoned. The dead-letter hook then gets
        what is left of ``timeout`` (at least the grace); the dead letters it has not started
        on by then are given up (logged by task name, counted).
        """
        if self._stopped is None or self._serving_done is None:
            return
        deadline = None if timeout is None else anyio.current_time() + timeout
        if not await self._drain_everything(timeout):
            self._say_unfinished(timeout)
            self._closing = True
            queued, self._queue = list(self._queue), deque()
            parked = self._limits.take_parked()
            self.ledger.queued = 0
            self.ledger.parked = 0
            for task in (*queued, *parked):
                self.telemetry.pending(task, -1)
            unstarted = [*queued, *parked]
            self.abandon(unstarted, "shutdown_timeout elapsed before it started", taken=True)
            if self.relay is not None:
                self.relay.release_all("shutdown_timeout elapsed before it was published")
            for room in (*self._room_waiters, *self._gate_waiters):
                room.set()
        self._stopped.set()
        # Shielded: bounded work that must finish (on Python 3.10 a cancellation from an
        # expired drain deadline above can arrive late, at the next await).
        with anyio.CancelScope(shield=True):
            await self._serving_done.wait()
            # The hook gets what is left of shutdown_timeout, and at least the grace.
            left = None if deadline is None else max(CANCEL_GRACE, deadline - anyio.current_time())
            if not await self.dead_letters.flush(left):
                self.ledger.dead_letters_lost += self.dead_letters.give_up(
                    "when shutdown ended", ", or give it time with a longer shutdown_timeout"
                )
            self.telemetry.aggregator.flush()
            if self.journal is not None:
                await self.journal.close()
        self._closing = False
        self._stopped = None

    def _say_unfinished(self, timeout: float | None) -> None:
        """The line about what shutdown's deadline leaves: an ERROR for the tasks it cancels,
        a WARNING alone when all that is left waits to be published (a broker outage: they
        go back to the outbox, and nothing is lost)."""
        unpublished = 0 if self.relay is None else self.relay.held
        cancelled = self.ledger.outstanding - unpublished
        if unpublished:
            logger.warning(
                "shutdown: %d durable after-response task(s) not yet published after "
                "shutdown_timeout=%ss (is the broker down?); they go back to the store's "
                "outbox, for the next process to publish",
                unpublished,
                timeout,
                extra={"released_count": unpublished},
            )
        if cancelled:
            logger.error(
                "shutdown: %d after-response task(s) still unfinished after "
                "shutdown_timeout=%ss; cancelling them (durable ones go back to the store, "
                "for the next process)",
                cancelled,
                timeout,
                extra={"abandoned_count": cancelled},
            )

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
