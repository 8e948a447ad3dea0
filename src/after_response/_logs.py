"""Log lines about tasks, on the ``after_response`` logger, never with task arguments.

Every line about a task starts ``after-response task <name> of <method> <path>`` and carries,
as ``extra``: ``task_name``, ``task_id``, ``request_method``, ``request_path``, and
``trace_id``/``span_id`` when a span is known, so a log backend can link the line to its
trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span

from ._aggregate import TASKS, LogAggregator
from ._redact import exception_text
from ._task import Task

logger: Final = logging.getLogger("after_response")

_PREFIX: Final = "after-response task %s of %s %s "


def log_task(
    level: int,
    task: Task,
    what: str,
    *args: object,
    exc: BaseException | None = None,
    span: Span | None = None,
) -> None:
    """Log ``what % args`` about ``task``, prefixed with its name and request.

    With ``exc``, the record carries the traceback as text (``exc_text``, which every
    ``logging.Formatter`` prints) with the task's arguments redacted from the exception
    messages, and the exception type as ``error_type``; not the exception object
    (``exc_info`` stays empty), which formatters would render unredacted.
    """
    if not logger.isEnabledFor(level):
        return
    message, arguments, extra = task_line(task, what, args, span)
    if exc is None:
        logger.log(level, message, *arguments, extra=extra)
        return
    extra["error_type"] = qualified_type(exc)
    log_record = logger.makeRecord(
        logger.name, level, __file__, 0, message, arguments, None, "log_task", extra
    )
    _, stacktrace = exception_text(exc, task.fn, task.record.args, task.record.kwargs)
    log_record.exc_text = stacktrace.rstrip("\n")
    logger.handle(log_record)


def log_task_aggregated(
    aggregator: LogAggregator | None,
    reason: str,
    level: int,
    task: Task,
    what: str,
    *args: object,
    exc: BaseException | None = None,
    span: Span | None = None,
    count: int = 1,
    counted: str = TASKS,
) -> None:
    """:func:`log_task`, through ``aggregator`` (none: written as it is): keyed by the task's
    name and ``reason``, the first line of a key in an interval is written, the others are
    counted in its summary line (``counted``: what it counts). ``count`` lines at once (tasks
    that ended together), of which the first may be written; the line is built only when it
    is."""
    key = (task.record.name, reason)
    if aggregator is None or aggregator.admit(level, key, count=count, counted=counted):
        log_task(level, task, what, *args, exc=exc, span=span)


def task_line(
    task: Task, what: str, args: tuple[object, ...], span: Span | None = None
) -> tuple[str, tuple[object, ...], dict[str, Any]]:
    """The message, its arguments and the ``extra`` fields of a line about ``task``."""
    record = task.record
    extra: dict[str, Any] = {
        "task_name": record.name,
        "task_id": record.id,
        "request_method": record.request.method,
        "request_path": record.request.path,
    }
    extra.update(trace_ids(span if span is not None else task.context.run(trace.get_current_span)))
    message = _PREFIX + what + " [task %s]"
    return (
        message,
        (record.name, record.request.method, record.request.path, *args, record.id),
        extra,
    )


def trace_ids(span: Span) -> Mapping[str, str]:
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }


def qualified_type(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module == "builtins" else f"{module}.{name}"
