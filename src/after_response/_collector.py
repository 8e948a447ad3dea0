"""The per-request collector behind ``request.state.after_response`` and ``current()``."""

from __future__ import annotations

import contextvars
import inspect
import threading
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.from_thread
from starlette.types import Scope

from ._callable import callable_info
from ._errors import NoActiveRequestError
from ._job import Job, RequestInfo
from ._options import EMPTY_OPTIONS, UNSET, Retry, TaskOptions, _Unset
from ._tasks import NativeTasks, Spawner, running_asyncio

if TYPE_CHECKING:
    from ._executor import Executor

_current: Final[contextvars.ContextVar[Collector | None]] = contextvars.ContextVar(
    "after_response_collector", default=None
)

_OPEN: Final = 0  # collecting; tasks wait for the response to complete
_HANDED_OVER: Final = 1  # the request's tasks are with the executor; add() submits at once
_INLINE: Final = 2  # no lifespan: the request's own call runs its tasks in task_group


def current() -> Collector:
    """The collector of the request being handled, from anywhere in its call stack.

    Works in service layers, Quart and Django views, and in side effects themselves (a
    side effect may add follow-up side effects).

    Raises:
        NoActiveRequestError: (a ``LookupError``) outside a request handled by
            ``AfterResponseMiddleware``.
    """
    collector = _current.get()
    if collector is None:
        raise NoActiveRequestError(
            "after_response.current() was called outside a request handled by "
            "AfterResponseMiddleware. Wrap your ASGI app: app = AfterResponseMiddleware(app) "
            "(or app.add_middleware(AfterResponseMiddleware)), and call current() while a "
            "request is being handled."
        )
    return collector


class Collector:
    """The side effects of one request, to run after its response has been sent.

    Reach it as ``request.state.after_response`` (Starlette, FastAPI, Litestar) or with
    ``after_response.current()``. Never shared between requests.
    """

    # Class-level defaults: a request that adds nothing pays for three attribute writes.
    _request: RequestInfo | None = None
    _state = _OPEN
    _outstanding = 0
    _settled: anyio.Event | None = None
    _task_group: Spawner | None = None
    _thread = 0
    #: Tasks that found no room at hand-over, waiting in the request's call.
    overflow: list[Job] | None = None

    def __init__(self, executor: Executor, scope: Scope) -> None:
        self._executor = executor
        # Not the scope itself: scope["state"] holds the collector, and a reference cycle
        # per request would leave every request to the cyclic garbage collector.
        self._method: str = scope.get("method", "WEBSOCKET")
        self._path: str = scope.get("path", "")
        self._jobs: list[Job] = []

    @property
    def request(self) -> RequestInfo:
        """The method and path that logs name (built on first use)."""
        if self._request is None:
            self._request = RequestInfo(self._method, self._path)
        return self._request

    @property
    def handed_over(self) -> bool:
        """Whether this request's tasks have left it (for the executor, or discarded)."""
        return self._state == _HANDED_OVER

    def __len__(self) -> int:
        """How many tasks wait for the response (handed-over tasks no longer count)."""
        return len(self._jobs)

    def __repr__(self) -> str:
        names = ", ".join(job.name for job in self._jobs)
        return f"<Collector {self.request.method} {self.request.path} [{names}]>"

    def add(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` after the response has been sent.

        ``fn`` may be an ``async def`` function (run on the event loop) or a plain
        function (run in a worker thread, never on the event loop). Options set with
        ``@side_effect(...)`` apply; use :meth:`options` to override them per call.

        Raises:
            TypeError: if ``fn`` is not callable, is a coroutine object (a function that
                was called instead of passed), or if ``args``/``kwargs`` do not fit its
                signature: the mistake surfaces here, in the handler, not later.
        """
        self._add(fn, args, kwargs, None)

    def options(
        self,
        *,
        name: str | _Unset = UNSET,
        timeout: float | _Unset | None = UNSET,
        retry: Retry | _Unset | None = UNSET,
        run_on_error: bool | _Unset = UNSET,
    ) -> TaskAdder:
        """Per-call options, kept apart from ``fn``'s own keyword arguments::

            collector.options(timeout=5, retry=Retry(attempts=3)).add(send_email, to, code)

        Each option overrides the ``@side_effect`` decorator and the middleware default.
        ``name`` must be low-cardinality (it names spans and metrics).
        """
        return TaskAdder(
            self, TaskOptions(name=name, timeout=timeout, retry=retry, run_on_error=run_on_error)
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
            _check_callable(fn)
        info, bound_self = callable_info(fn)
        executor = self._executor
        options = info.options
        if call_options is not None:
            options = call_options.over(options)
        if options is EMPTY_OPTIONS:
            name = info.name
            timeout, retry, run_on_error = executor.default_options
        else:
            name = options.name if isinstance(options.name, str) else info.name
            default_timeout, default_retry, default_run_on_error = executor.default_options
            timeout = default_timeout if isinstance(options.timeout, _Unset) else options.timeout
            retry = default_retry if isinstance(options.retry, _Unset) else options.retry
            run_on_error = (
                default_run_on_error
                if isinstance(options.run_on_error, _Unset)
                else options.run_on_error
            )
        info.check_arguments(args, kwargs, bound_self, name)
        job = Job(
            fn,
            args,
            kwargs,
            is_async=info.is_async,
            name=name,
            timeout=timeout,
            retry=retry,
            run_on_error=run_on_error,
            context=contextvars.copy_context(),
            request=self.request,
            collector=self,
        )
        executor.note_added(job)
        if self._state == _OPEN:
            self._jobs.append(job)
        elif (loop_thread := self._thread or executor.loop_thread) and (
            threading.get_ident() != loop_thread
        ):
            # A side effect in a worker thread adding a follow-up: admit on the loop.
            try:
                anyio.from_thread.run(self._admit_late_async, job)
            except RuntimeError:  # not an anyio worker thread: no way back to the loop
                executor.shed([job], "it was added from a thread that cannot reach the loop")
        else:
            self._admit_late(job)

    def _admit_late(self, job: Job) -> None:
        """Admit a task added after the request's tasks were handed over, without waiting."""
        executor = self._executor
        task_group = self._task_group if self._state == _INLINE else executor.background
        if task_group is None:
            executor.shed([job], "it was added after its request had ended, with no executor")
            return
        executor.shed(executor.admit([job], task_group))

    async def _admit_late_async(self, job: Job) -> None:
        self._admit_late(job)

    def hand_over(self, *, failed: str | None) -> None:
        """Give the executor this request's tasks (or discard them if ``failed`` says why).

        Called once the response is complete, in background mode. Tasks that find no room
        are left in ``overflow``, for the request's call to wait with.
        """
        jobs = self._take(failed)
        executor = self._executor
        assert executor.background is not None
        self._state = _HANDED_OVER
        if jobs:
            overflow = executor.admit(jobs, executor.background)
            if overflow:
                self.overflow = overflow

    def close(self) -> None:
        """The request's call is over: later tasks go straight to the executor."""
        if self._state == _OPEN:
            self._state = _HANDED_OVER

    async def run_inline(self, *, failed: str | None) -> None:
        """Run this request's tasks inside its own ASGI call (no lifespan: no executor).

        The global bound still applies; the call returns when the tasks have ended, so a
        server's graceful shutdown, which waits for open calls, waits for them too.
        """
        jobs = self._take(failed)
        if not jobs:
            return
        self._settled = anyio.Event()
        self._thread = threading.get_ident()
        if running_asyncio():
            # A task set of the request's own: an anyio task group per request costs
            # several times more, and nothing here needs more than "cancel and wait".
            tasks = NativeTasks()
            try:
                await self._run_inline_in(jobs, tasks)
            except BaseException:
                await tasks.aclose()
                raise
            # Settled: every task has ended its job and is only returning.
            tasks.drop_timer()
        else:
            async with anyio.create_task_group() as task_group:
                await self._run_inline_in(jobs, task_group)

    async def _run_inline_in(self, jobs: list[Job], spawner: Spawner) -> None:
        assert self._settled is not None
        executor = self._executor
        self._task_group = spawner
        self._state = _INLINE
        try:
            overflow = executor.admit(jobs, spawner)
            if overflow:
                await executor.admit_waiting(overflow, spawner)
            if self._outstanding:
                await self._settled.wait()
        finally:
            self._state = _HANDED_OVER
            self._task_group = None

    def abandon(self, reason: str) -> None:
        """End the tasks still held: the request was cancelled before handing them over."""
        jobs, self._jobs = self._jobs, []
        self._state = _HANDED_OVER
        self._executor.abandon_unstarted(jobs, reason)

    def _take(self, failed: str | None) -> list[Job]:
        jobs, self._jobs = self._jobs, []
        if failed is not None and jobs:
            kept = [job for job in jobs if job.run_on_error]
            if len(kept) != len(jobs):
                self._executor.discard([job for job in jobs if not job.run_on_error], failed)
            jobs = kept
        return jobs

    def job_admitted(self) -> None:
        self._outstanding += 1

    def job_finished(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0 and self._settled is not None:
            self._settled.set()


class TaskAdder:
    """``collector.options(...)``: adds tasks with the given options."""

    __slots__ = ("_collector", "_options")

    def __init__(self, collector: Collector, options: TaskOptions) -> None:
        self._collector = collector
        self._options = options

    def add(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Like :meth:`Collector.add`, with these options."""
        self._collector._add(fn, args, kwargs, self._options)


def _check_callable(fn: object) -> None:
    if callable(fn):
        return
    if inspect.iscoroutine(fn):
        name = fn.__qualname__
        fn.close()  # it will never run: close it so Python does not warn "never awaited"
        raise TypeError(
            f"add() expects a callable, got a coroutine object ({name}(...) was called "
            f"instead of passed); pass the function and its arguments: add({name}, *args) "
            f"instead of add({name}(*args))"
        )
    if inspect.isawaitable(fn):
        raise TypeError(
            f"add() expects a callable, got an awaitable {type(fn).__name__}; pass the "
            "function and its arguments: add(send_email, to, code)"
        )
    raise TypeError(
        f"add() expects a callable, got {type(fn).__name__}; pass the function and its "
        "arguments: add(send_email, to, code)"
    )
