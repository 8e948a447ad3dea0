"""The per-request collector behind ``request.state.after_response``, ``current()`` and
``get(request)``: it builds a task for each ``add()`` and hands them to a dispatcher once
the response is complete."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any, Final, ParamSpec

from . import _mode
from ._callable import callable_info, check_callable
from ._dispatch import Dispatcher
from ._durable import check_durable, check_storable, trace_carrier
from ._inline import InlineDispatcher
from ._logs import log_task
from ._mode import CapturedCall
from ._options import EMPTY_OPTIONS, UNSET, Retry, TaskOptions, _Unset
from ._record import RequestInfo, TaskRecord, task_ids
from ._task import Task

if TYPE_CHECKING:
    from ._executor import Executor

P = ParamSpec("P")

#: A collector holding no task holds this list (never appended to: add() makes a new one).
_NO_TASKS: Final[list[Task]] = []
#: The keyword arguments of every task added without any: a record is never changed, and
#: one empty dict less per waiting task keeps the garbage collector quieter.
_NO_KWARGS: Final[dict[str, Any]] = {}
_OPEN: Final = 0  # collecting; tasks wait for the response to complete
_HANDED_OVER: Final = 1  # the tasks went to a dispatcher; add() submits at once


class Collector:
    """The side effects of one request, to run after its response has been sent.

    Reach it as ``request.state.after_response`` (Starlette, FastAPI, Litestar), with
    ``after_response.get(request)``, or with ``after_response.current()``. Never shared
    between requests.
    """

    # Class-level defaults for what a request that adds nothing never reads: it pays for
    # none of them. What every request reads is set in __init__: Python 3.11 specialises a
    # read that finds the attribute on the instance, not one that falls back to the class.
    _request: RequestInfo | None = None
    _state: int
    _dispatcher: Dispatcher | None = None
    _failed: str | None = None
    _loop_thread = 0
    _call_soon: Callable[..., Any] | None = None
    #: Tasks that found no room at hand-over, for the request's call to wait with.
    overflow: list[Task] | None
    #: Durable tasks added since the last save.
    unsaved: list[Task] | None = None
    #: The tasks that wait here for the response to complete (read it, never change it): a
    #: list of its own from the first add(); the shared empty one is never appended to.
    held: list[Task]

    def __init__(self, executor: Executor, method: str, path: str) -> None:
        self._executor = executor
        self._method = method
        self._path = path
        self.held = _NO_TASKS
        self.overflow = None
        self._state = _OPEN

    @property
    def request(self) -> RequestInfo:
        """The method and path that logs name (built on first use)."""
        if self._request is None:
            self._request = RequestInfo(self._method, self._path)
        return self._request

    @property
    def holding(self) -> bool:
        """Whether tasks wait here for the response to complete (``held`` is quicker)."""
        return bool(self.held)

    @property
    def handed_over(self) -> bool:
        """Whether this request's tasks have left it (for a dispatcher, or discarded)."""
        return self._state == _HANDED_OVER

    def __len__(self) -> int:
        """How many tasks wait for the response (handed-over tasks no longer count)."""
        return len(self.held)

    def __repr__(self) -> str:
        names = ", ".join(task.record.name for task in self.held)
        return f"<Collector {self.request.method} {self.request.path} [{names}]>"

    def add(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` after the response has been sent.

        ``fn`` may be an ``async def`` function (run on the event loop) or a plain
        function (run in a worker thread, never on the event loop). Options set with
        ``@side_effect(...)`` apply; use :meth:`options` to override them per call.

        Raises:
            TypeError: if ``fn`` is not callable, is a coroutine object (a function that
                was called instead of passed), is a generator function, or if
                ``args``/``kwargs`` do not fit its signature: the mistake surfaces here,
                in the handler, not later.
        """
        self._add(fn, args, kwargs, None)

    def options(
        self,
        *,
        name: str | _Unset = UNSET,
        timeout: float | _Unset | None = UNSET,
        retry: Retry | _Unset | None = UNSET,
        run_on_error: bool | _Unset = UNSET,
        durable: bool | _Unset = UNSET,
        key: str | _Unset | None = UNSET,
        max_concurrency: int | _Unset | None = UNSET,
        rate_limit: str | _Unset | None = UNSET,
    ) -> TaskAdder:
        """Per-call options, kept apart from ``fn``'s own keyword arguments::

            collector.options(timeout=5, retry=Retry(attempts=3)).add(send_email, to, code)

        Each option overrides the ``@side_effect`` decorator and the middleware default
        (see :func:`~after_response.side_effect` for what each means). ``name`` must be
        low-cardinality (it names spans and metrics). ``key`` (durable tasks only) is an
        idempotency key: a durable add whose key matches a stored, unfinished or recently
        succeeded task is not stored again.
        """
        return TaskAdder(
            self,
            TaskOptions(
                name=name,
                timeout=timeout,
                retry=retry,
                run_on_error=run_on_error,
                durable=durable,
                key=key,
                max_concurrency=max_concurrency,
                rate_limit=rate_limit,
            ),
        )

    # -- internals ---------------------------------------------------------------------------

    def _add(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        call_options: TaskOptions | None,
    ) -> None:
        if type(fn) is not FunctionType and type(fn) is not MethodType:
            check_callable(fn)
        info, bound_self = callable_info(fn)
        executor = self._executor
        options = info.options if call_options is None else call_options.over(info.options)
        if options is EMPTY_OPTIONS:
            _, timeout, retry, run_on_error, durable, key, limits = executor.defaults
            name = info.name
        else:
            name, timeout, retry, run_on_error, durable, key, limits = options.resolve(
                executor.defaults, info.name
            )
        if (
            kwargs
            or info.required_keywords
            or not info.min_positional <= len(args) + len(bound_self) <= info.max_positional
        ):
            info.check_arguments(args, kwargs, bound_self, name)  # the fast case is above
        context = contextvars.copy_context()
        carrier = None
        if durable or key is not None:
            check_durable(name, durable=durable, has_store=executor.journal is not None)
            check_storable(fn, info, bound_self, args, kwargs, name, retry)
            carrier = trace_carrier(context)
        request = self._request
        if request is None:
            # tuple.__new__ straight, not the named tuple's own __new__ (a Python lambda).
            request = self._request = tuple.__new__(RequestInfo, (self._method, self._path))
        if _mode.captured is not None:
            _mode.captured.append(
                CapturedCall(name, fn, args, kwargs, timeout, retry, run_on_error, *request)
            )
            return
        record = TaskRecord(
            task_ids.next(),
            name,
            info.target,
            args,
            kwargs or _NO_KWARGS,
            timeout,
            retry,
            run_on_error,
            request,
            carrier,
            durable,
            key,
            limits,
        )
        task = Task(record, fn, info.is_async, context, executor.ledger.add())
        executor.telemetry.added(task)
        if self._state == _OPEN:
            if self.held:
                self.held.append(task)
            else:
                self.held = [task]
            if durable:
                if self.unsaved is None:
                    self.unsaved = []
                self.unsaved.append(task)
            return
        call_soon = self._call_soon or executor.call_soon_threadsafe
        if call_soon is not None and threading.get_ident() != (
            self._loop_thread or executor.loop_thread
        ):
            # From another thread (a sync side effect adding a follow-up): on the loop.
            call_soon(self._add_late, task)
        else:
            self._add_late(task)

    def take_unsaved(self) -> list[Task]:
        """The durable tasks not stored yet (the middleware stores them before the response
        starts, and again before its last message)."""
        unsaved, self.unsaved = self.unsaved or [], None
        return unsaved

    def forget(self, tasks: set[Task]) -> None:
        """Drop ``tasks`` from those held (durable adds deduplicated, or not stored)."""
        self.held = [task for task in self.held if task not in tasks]

    def _add_late(self, task: Task) -> None:
        """A task added after the response was complete: one rule, whoever adds it (a side
        effect, a stray task, a thread): discarded if its request failed (unless
        ``run_on_error``), else submitted at once, without waiting for room."""
        executor = self._executor
        if self._failed is not None and not task.record.run_on_error:
            executor.discard([task], f"{self._failed} (it was added after the response)")
            return
        dispatcher = self._dispatcher
        if isinstance(dispatcher, InlineDispatcher) and not dispatcher.open:
            dispatcher = None  # its request's call has returned
        if dispatcher is None and executor.background is not None:
            dispatcher = executor
        if dispatcher is None:
            executor.shed([task], "it was added after its request had ended, with no executor")
            return
        log_task(logging.DEBUG, task, "added after its response was complete; submitted now")
        if task.record.durable:
            executor.save_then_submit(task, dispatcher)
            return
        overflow = dispatcher.submit([task])
        if overflow:
            executor.shed(overflow, "it was added after its response, and the queue was full")

    def hand_over(self, dispatcher: Dispatcher, *, failed: str | None) -> None:
        """Give ``dispatcher`` this request's tasks (or discard them if ``failed`` says why).

        Called once the response is complete. Tasks that find no room are left in
        ``overflow``, for the request's call to wait with.
        """
        tasks = self._take(failed)
        self._dispatcher = dispatcher
        self._state = _HANDED_OVER
        if tasks:
            overflow = dispatcher.submit(tasks)
            if overflow:
                self.overflow = overflow

    def close(self, failed: str | None = None) -> None:
        """The request's call is over: later tasks go straight to the executor, or are
        discarded if the request failed (``failed`` says why) and it held no tasks then."""
        if self._state == _OPEN:
            self._failed = failed
        self._state = _HANDED_OVER

    async def run_inline(self, *, failed: str | None) -> None:
        """Run this request's tasks inside its own ASGI call (no lifespan: no executor)."""
        tasks = self._take(failed)
        if not tasks:
            return
        async with InlineDispatcher(self._executor) as dispatcher:
            self._dispatcher = dispatcher
            self._state = _HANDED_OVER
            self._loop_thread, self._call_soon = dispatcher.loop_thread, dispatcher.call_soon
            overflow = dispatcher.submit(tasks)
            if overflow:
                await dispatcher.submit_waiting(overflow)
            await dispatcher.stop(None)

    def abandon(self, reason: str) -> None:
        """End the tasks still held: the request was cancelled before handing them over."""
        tasks, self.held = self.held, _NO_TASKS
        self._state = _HANDED_OVER
        self._executor.abandon(tasks, reason, taken=False)

    def _take(self, failed: str | None) -> list[Task]:
        tasks, self.held = self.held, _NO_TASKS
        self._failed = failed
        if failed is not None and tasks:
            kept = [task for task in tasks if task.record.run_on_error]
            if len(kept) != len(tasks):
                self._executor.discard(
                    [task for task in tasks if not task.record.run_on_error], failed
                )
            tasks = kept
        return tasks


class TaskAdder:
    """``collector.options(...)``: adds tasks with the given options."""

    __slots__ = ("_collector", "_options")

    def __init__(self, collector: Collector, options: TaskOptions) -> None:
        self._collector = collector
        self._options = options

    def add(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Like :meth:`Collector.add`, with these options."""
        self._collector._add(fn, args, kwargs, self._options)
