"""``on_dead_letter``: called, off the event loop, for every task that ended unsuccessfully.

The hook runs in a daemon thread of its own, one call after another, so a slow hook (a
database insert, an HTTP call) never stalls request handling; one that raises is logged.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable

import anyio
from opentelemetry import trace
from opentelemetry.trace import Span

from ._aggregate import LogAggregator
from ._logs import log_task_aggregated, logger, qualified_type
from ._task import DeadLetter, Task
from ._tasks import loop_handle

DeadLetterHook = Callable[[DeadLetter], object]
"""Called as ``hook(dead_letter)`` for every task that ended unsuccessfully (failed or timed
out after its last attempt, shed, or abandoned), in a thread of its own."""


def check_hook(hook: object) -> None:
    """Raise a clear error for a hook that cannot be one."""
    if hook is None:
        return
    if not callable(hook):
        raise TypeError(f"on_dead_letter must be callable or None, got {hook!r}")
    if inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(
        getattr(hook, "__call__", None)  # noqa: B004 - a callable object's own method
    ):
        raise TypeError(
            "on_dead_letter must be a plain (def) function: it is called in a thread of its "
            "own, off the event loop, so a slow hook never stalls requests; an async def hook "
            "would never be awaited. To reach async code from it, use "
            "asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)."
        )
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(None)
    except TypeError as exc:  # bind()'s messages name parameters, never values
        raise TypeError(
            f"on_dead_letter is called with one argument, the DeadLetter, and this hook cannot "
            f"be: {exc}; for example def on_dead_letter(dead_letter): ..."
        ) from None


class DeadLetters:
    """Delivers dead letters to the hook, in order, in one daemon thread.

    With an ``aggregator``, the lines of a hook that raises go through it (keyed by task
    name and error type): a hook that fails on every task of a flood of shed tasks writes
    its first traceback in full and counts the rest, instead of one traceback per task.
    """

    def __init__(
        self, hook: DeadLetterHook | None, aggregator: LogAggregator | None = None
    ) -> None:
        self._hook = hook
        self._aggregator = aggregator
        self._queue: queue.SimpleQueue[tuple[Task, DeadLetter, Span]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._submitted = 0
        self._delivered = 0
        #: Flushes waiting: (how many must be delivered, how to wake the waiter).
        self._flushes: list[tuple[int, Callable[[], object]]] = []

    @property
    def wanted(self) -> bool:
        """Whether there is a hook: without one, no dead letter need be built (a flood sheds
        tens of thousands a second)."""
        return self._hook is not None

    def submit(self, task: Task, dead_letter: DeadLetter) -> None:
        """Queue ``dead_letter`` for the hook (called on the event loop)."""
        if self._hook is None:
            return
        # The span is looked up here, on the loop: the hook's log line carries the trace.
        span = task.context.run(trace.get_current_span)
        with self._lock:
            self._submitted += 1
            self._queue.put((task, dead_letter, span))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._deliver, name="after-response-dead-letters", daemon=True
                )
                self._thread.start()

    def _deliver(self) -> None:
        assert self._hook is not None
        while True:
            task, dead_letter, span = self._queue.get()
            try:
                self._hook(dead_letter)
            except Exception as hook_error:
                log_task_aggregated(
                    self._aggregator,
                    f"the on_dead_letter hook raised {qualified_type(hook_error)}",
                    logging.ERROR,
                    task,
                    "dead letter: the on_dead_letter hook raised",
                    exc=hook_error,
                    span=span,
                )
            with self._lock:
                self._delivered += 1
                woken = [wake for target, wake in self._flushes if target <= self._delivered]
                self._flushes = [f for f in self._flushes if f[0] > self._delivered]
            for wake in woken:
                wake()

    async def flush(self, timeout: float | None) -> bool:
        """Wait, at most ``timeout`` seconds, until the hook has seen every dead letter
        submitted before the call."""
        with self._lock:
            target = self._submitted
            if self._delivered >= target:
                return True
            delivered = anyio.Event()
            call_soon = loop_handle()
            self._flushes.append((target, lambda: call_soon(delivered.set)))
        with anyio.move_on_after(timeout):
            await delivered.wait()
            return True
        return False

    def wait(self, timeout: float) -> bool:
        """:meth:`flush` for a thread that runs no event loop (an engine worker's shutdown)."""
        with self._lock:
            target = self._submitted
            if self._delivered >= target:
                return True
            delivered = threading.Event()
            self._flushes.append((target, delivered.set))
        return delivered.wait(timeout)

    def give_up(self, when: str, more_time: str = "") -> int:
        """Take back the dead letters the hook has not started on, and log them by task
        name: ``when`` the process stops, they would die with the hook's daemon thread. The
        one the hook is in is left to it. ``more_time`` ends the advice (", or give it time
        with ..."). How many were given up."""
        lost: dict[str, int] = {}
        with self._lock:
            while True:
                try:
                    task, _, _ = self._queue.get_nowait()
                except queue.Empty:
                    break
                lost[task.record.name] = lost.get(task.record.name, 0) + 1
            given_up = sum(lost.values())
            self._submitted -= given_up
        if given_up:
            logger.error(
                "after-response: %d dead letter(s) never reached on_dead_letter: the hook was "
                "still busy %s (%s). Their tasks are counted, logged and traced as they ended; "
                "only the hook's call is lost. Make the hook faster (hand its work to a queue "
                "of your own)%s.",
                given_up,
                when,
                ", ".join(f"{name}: {count}" for name, count in sorted(lost.items())),
                more_time,
                extra={"dead_letters_lost": lost},
            )
        return given_up
