"""The per-request collector behind ``request.state.after_response`` and ``current()``."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.from_thread
from anyio.abc import TaskGroup

from ._errors import NoActiveRequestError
from ._job import Job, RequestInfo, default_name
from ._options import UNSET, Retry, TaskOptions, _Unset, options_of

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

    __slots__ = (
        "_executor",
        "_jobs",
        "_outstanding",
        "_settled",
        "_state",
        "_task_group",
        "_thread",
        "client_gone",
        "request",
        "response_complete",
        "status",
    )

    def __init__(self, executor: Executor, request: RequestInfo) -> None:
        self._executor = executor
        self.request = request
        self._jobs: list[Job] = []
        self._state = _OPEN
        self._task_group: TaskGroup | None = None
        self._outstanding = 0
        self._settled: anyio.Event | None = None
        self._thread = 0
        #: The response status once ``http.response.start`` went out (0 before).
        self.status = 0
        #: Whether the client went away before the response was complete.
        self.client_gone = False
        #: Whether the server has been given the response's last message.
        self.response_complete = False

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
        _check_callable(fn)
        options = options_of(fn)
        if call_options is not None:
            options = call_options.over(options)
        name = options.name if isinstance(options.name, str) else default_name(fn)
        _check_arguments(fn, args, kwargs, name)
        executor = self._executor
        defaults = executor.defaults
        job = Job(
            fn,
            args,
            kwargs,
            name=name,
            timeout=defaults.timeout if isinstance(options.timeout, _Unset) else options.timeout,
            retry=defaults.retry if isinstance(options.retry, _Unset) else options.retry,
            run_on_error=(
                defaults.run_on_error
                if isinstance(options.run_on_error, _Unset)
                else options.run_on_error
            ),
            context=contextvars.copy_context(),
            request=self.request,
            collector=self,
        )
        executor.note_added(job)
        if self._state == _OPEN:
            self._jobs.append(job)
        elif self._thread and threading.get_ident() != self._thread:
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

    def hand_over(self, *, failed: str | None) -> list[Job]:
        """Give the executor this request's tasks (or discard them if ``failed`` says why).

        Called once the response is complete, in background mode. Returns the tasks that
        found no room and must wait (``Executor.admit_waiting``).
        """
        jobs = self._take(failed)
        executor = self._executor
        assert executor.background is not None
        self._state = _HANDED_OVER
        self._thread = threading.get_ident()
        return executor.admit(jobs, executor.background) if jobs else jobs

    async def run_inline(self, *, failed: str | None) -> None:
        """Run this request's tasks inside its own ASGI call (no lifespan: no executor).

        The global bound still applies; the call returns when the tasks have ended, so a
        server's graceful shutdown, which waits for open calls, waits for them too.
        """
        jobs = self._take(failed)
        if not jobs:
            return
        executor = self._executor
        self._settled = anyio.Event()
        self._thread = threading.get_ident()
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            self._state = _INLINE
            try:
                overflow = executor.admit(jobs, task_group)
                if overflow:
                    await executor.admit_waiting(overflow, task_group)
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


_signatures: weakref.WeakKeyDictionary[Any, inspect.Signature | None] = weakref.WeakKeyDictionary()


def _check_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> None:
    """Raise ``TypeError`` now if the call could not bind, naming only the parameters."""
    target: Any = fn
    bound_self: tuple[Any, ...] = ()
    if inspect.ismethod(fn):
        target, bound_self = fn.__func__, (fn.__self__,)
    try:
        signature = _signatures[target]
    except (KeyError, TypeError):
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # some builtins have no signature: nothing to check
            signature = None
        with contextlib.suppress(TypeError):  # not weak-referenceable: check uncached
            _signatures[target] = signature
    if signature is None:
        return
    try:
        signature.bind(*bound_self, *args, **kwargs)
    except TypeError as exc:
        # The message names parameters, never values: arguments carry emails and tokens.
        raise TypeError(
            f"add({name}, ...): the arguments do not fit {name}{signature}: {exc}"
        ) from None
