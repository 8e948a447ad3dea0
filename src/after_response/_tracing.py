"""Spans: one per attempt of a task, child of the span current at ``add()``, and a
zero-length one for a task that never ran (discarded, shed or abandoned).

Spans are started and ended with plain calls, not context managers: the attempt's span is
made current with a context token that is reset when the attempt ends.
"""

from __future__ import annotations

import functools
import inspect
from types import FunctionType
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Span, SpanKind, Status
from opentelemetry.trace import StatusCode as _StatusCode

from ._errors import TaskTimeoutError
from ._logs import qualified_type
from ._redact import exception_text
from ._task import Outcome, Task

#: ``error.type`` for outcomes that have no exception type of their own.
_ERROR_TYPES: Final = {
    Outcome.TIMED_OUT: "timeout",
    Outcome.SHED: "shed",
    Outcome.ABANDONED: "abandoned",
}
_STATUS_DESCRIPTIONS: Final = {
    "timeout": "task timed out",
    "shed": "task shed: no room in the queue",
    "abandoned": "task abandoned before it could finish",
}


def is_noop_tracer_provider(provider: object) -> bool:
    return isinstance(provider, (NoOpTracerProvider, ProxyTracerProvider))


class AttemptSpan:
    """An attempt's span and the token that made it current."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self.token = token


def start_attempt(tracer: trace.Tracer, task: Task, queue_wait: float) -> AttemptSpan:
    """Start the span of ``task``'s current attempt and make it the current span.

    Runs in the task's own context, a copy of the request's at ``add()``: the span's parent
    is whatever span was current then.
    """
    span = tracer.start_span(
        f"after_response {task.record.name}",
        kind=SpanKind.INTERNAL,
        attributes={
            **span_attributes(task),
            "after_response.task.attempt": task.attempt,
            "after_response.task.queue_duration": queue_wait,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    return AttemptSpan(span, token)


def end_attempt(
    attempt: AttemptSpan, task: Task, outcome: Outcome, exc: BaseException | None
) -> None:
    """Mark the attempt's span with its outcome (and error), end it, and restore the context."""
    try:
        mark(attempt.span, task, outcome, exc)
        attempt.span.end()
    finally:
        otel_context.detach(attempt.token)  # type: ignore[arg-type]


def record_unrun(tracer: trace.Tracer, task: Task, outcome: Outcome) -> None:
    """Leave a zero-length span for a task that never ran (discarded, shed, abandoned)."""

    def record() -> None:
        span = tracer.start_span(
            f"after_response {task.record.name}",
            kind=SpanKind.INTERNAL,
            attributes={**span_attributes(task), "after_response.task.attempt": task.attempt},
        )
        mark(span, task, outcome, None)
        span.end()

    task.context.run(record)


def mark(span: Span, task: Task, outcome: Outcome, exc: BaseException | None) -> None:
    span.set_attribute("after_response.task.outcome", outcome.value)
    if isinstance(exc, TaskTimeoutError):
        # A timed-out attempt that will be retried is a timeout too, not an exception.
        exc, error_type = None, "timeout"
    elif exc is not None and outcome in (Outcome.FAILED, Outcome.RETRY):
        error_type = qualified_type(exc)
    elif outcome in (Outcome.SUCCEEDED, Outcome.DISCARDED):
        return
    else:
        error_type = _ERROR_TYPES.get(outcome, outcome.value)
    if exc is not None:
        message, stacktrace = exception_text(exc, task.fn, task.record.args, task.record.kwargs)
        span.add_event(
            "exception",
            {
                "exception.type": qualified_type(exc),
                "exception.message": message,
                "exception.stacktrace": stacktrace,
                "exception.escaped": "False",
            },
        )
    span.set_attribute("error.type", error_type)
    description = type(exc).__qualname__ if exc is not None else None
    span.set_status(
        Status(_StatusCode.ERROR, description or _STATUS_DESCRIPTIONS.get(error_type, error_type))
    )


def span_attributes(task: Task) -> dict[str, Any]:
    """Attributes shared by every span of this task."""
    fn = task.fn
    attributes = {
        **_function_attributes(
            task.record.name, fn if type(fn) is FunctionType else _code_target(fn)
        ),
        "after_response.task.id": task.record.id,
    }
    if task.record.durable:
        attributes["after_response.task.durable"] = True
        if task.recovered:
            attributes["after_response.task.recovered"] = True
    return attributes


def _code_target(fn: Any) -> Any:
    """The stable object behind ``fn``: the function of a partial or a bound method, or the
    class of a callable object, so that caching by it neither grows nor keeps instances alive."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return fn if inspect.isroutine(fn) else type(fn)


@functools.lru_cache(maxsize=1024)
def _function_attributes(name: str, target: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"after_response.task.name": name}
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    if qualname:
        attributes["code.function.name"] = f"{module}.{qualname}" if module else qualname
    return attributes
