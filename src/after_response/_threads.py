"""Worker threads for plain (sync) side effects: a pool of their own, of daemon threads.

Daemon threads, because a sync side effect cannot be stopped: one still blocked when the
shutdown deadline passes must not keep the process alive (Python joins non-daemon threads
at exit, which kept hypercorn and granian running). The work runs in a copy of the calling
task's context, so its contextvars (the current span, ``current_task()``) are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from ._tasks import running_asyncio

_Work = tuple[
    contextvars.Context,
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any],
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
]


class WorkerThreads:
    """Up to ``max_threads`` daemon threads, started as work needs them, kept once started."""

    def __init__(self, max_threads: int) -> None:
        self._max_threads = max_threads
        self._work: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` in a worker thread and return its result.

        Cancelling the caller abandons the call: the thread runs on until ``fn`` returns.
        """
        if not running_asyncio():
            return await self._run_with_anyio(fn, args, kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._work.put((contextvars.copy_context(), fn, args, kwargs, loop, future))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._threads < self._max_threads:
                    self._threads += 1
                    threading.Thread(
                        target=self._serve, name=f"after-response-{self._threads}", daemon=True
                    ).start()
        return await future

    def _serve(self) -> None:
        while True:
            context, fn, args, kwargs, loop, future = self._work.get()
            try:
                result = context.run(fn, *args, **kwargs)
            except BaseException as exc:  # SystemExit from sys.exit() too: the task's outcome
                _resolve_soon(loop, future, None, exc)
            else:
                _resolve_soon(loop, future, result, None)
            del context, fn, args, kwargs, future
            self._idle.release()

    async def _run_with_anyio(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # trio: anyio's worker threads (not daemon threads: a blocked one delays exit).
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_threads)
        [result] = await anyio.to_thread.run_sync(
            _call_boxed, fn, args, kwargs, abandon_on_cancel=True, limiter=self._limiter
        )
        return result


def _resolve_soon(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    # RuntimeError: the loop has closed, and nobody waits for this result any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, future, result, exc)


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller was cancelled (timeout, shutdown) and moved on
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


def _call_boxed(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Boxed, because trio refuses a thread whose result is a coroutine (a sync lambda around
    an async call), which the caller then awaits."""
    return [fn(*args, **kwargs)]
