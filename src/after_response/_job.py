"""One side effect as the executor sees it: the call, its options and where it came from."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import Context
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ._options import NO_RETRY, Retry

if TYPE_CHECKING:
    from ._collector import Collector
    from ._tasks import Spawner


class RequestInfo(NamedTuple):
    """What logs say about the request a task came from: never headers, body or query."""

    method: str
    path: str


NO_REQUEST: Final = RequestInfo("-", "-")


class Job:
    """A task on its way through the executor; one object for all of its attempts."""

    __slots__ = (
        "args",
        "attempt",
        "collector",
        "context",
        "fn",
        "is_async",
        "kwargs",
        "max_attempts",
        "name",
        "ready_at",
        "request",
        "retry",
        "run_on_error",
        "task_group",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        name: str,
        timeout: float | None,
        retry: Retry | None,
        run_on_error: bool,
        context: Context,
        request: RequestInfo,
        collector: Collector,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.is_async = is_async
        self.name = name
        self.timeout = timeout
        self.retry = retry or NO_RETRY
        self.max_attempts = self.retry.attempts
        self.run_on_error = run_on_error
        self.context = context
        self.request = request
        self.collector = collector
        self.attempt = 1
        self.ready_at = 0.0
        self.task_group: Spawner | None = None

    @property
    def span_attributes(self) -> dict[str, Any]:
        """Attributes shared by every span of this task (cached per function)."""
        return _span_attributes(self.name, _code_target(self.fn))

    def __repr__(self) -> str:
        return f"<Job {self.name} attempt={self.attempt}/{self.max_attempts}>"


def _code_target(fn: Any) -> Any:
    """The stable object behind ``fn``: the function of a partial or a bound method, or the
    class of a callable object, so that caching by it neither grows nor keeps instances alive."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return fn if inspect.isroutine(fn) else type(fn)


@functools.lru_cache(maxsize=1024)
def _span_attributes(name: str, target: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"after_response.task.name": name}
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    if qualname:
        attributes["code.function.name"] = f"{module}.{qualname}" if module else qualname
    return attributes
