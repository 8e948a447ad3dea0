"""Durable side effects: what makes a task storable, and its record's round trip through a
store (``TaskRecord`` to ``StoredTask`` and back, with the trace context as W3C text)."""

from __future__ import annotations

import contextvars
import importlib
import json
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate

from ._callable import CallableInfo
from ._limits import Limits, Rate
from ._options import NO_RETRY, Retry
from ._record import RequestInfo, TaskRecord
from ._store import StoredTask

_RETRY_FIELDS: Final = ("attempts", "backoff", "multiplier", "max_backoff", "jitter")


def check_durable(name: str, *, durable: bool, has_store: bool) -> None:
    """Raise ``TypeError`` unless a call added with ``durable``/``key=`` options may be
    stored: durable (a key alone is a mistake), with a store to keep it."""
    if not durable:
        raise TypeError(
            f"add({name}, ...): key= is the idempotency key of a durable side effect; "
            f"add durable=True: options(durable=True, key=...).add({name}, ...)"
        )
    if not has_store:
        raise TypeError(
            f"add({name}, ...) with durable=True needs a durable store, and the middleware "
            "has none: AfterResponseMiddleware(app, store=SQLiteStore("
            '"after_response.sqlite3"))'
        )


def check_storable(
    fn: Callable[..., Any],
    info: CallableInfo,
    bound_self: tuple[Any, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
    retry: Retry,
) -> None:
    """Raise ``TypeError`` if the call cannot be stored (the record holds its import name,
    and its retry policy's exception types by theirs).

    Names the argument by position or keyword, never its value.
    """
    target = info.target
    if bound_self and not isinstance(bound_self[0], type):
        raise TypeError(
            f"add({name}, ...) with durable=True: {name} is a method bound to an object, which "
            "cannot be stored; pass a module-level function (or a static or class method) and "
            "the object's data as arguments"
        )
    if target is None or _unbound(resolve(target)) is not _unbound(fn):
        raise TypeError(
            f"add({name}, ...) with durable=True: a durable side effect must be importable by "
            "a stable name, so another process can find it: a module-level function, or a "
            "method reached from one; not a lambda, a closure, a local function or a "
            "functools.partial"
        )
    if retry_on_targets(retry.retry_on) is None:
        unnamed = [kind.__qualname__ for kind in retry.retry_on if _type_target(kind) is None]
        raise TypeError(
            f"add({name}, ...) with durable=True: its Retry(retry_on=...) holds "
            f"{', '.join(unnamed)}, which another process cannot import by name (defined in "
            "a function?); define the exception class at module level"
        )
    for position, value in enumerate(args, 1):
        _check_json(value, f"argument {position}", name)
    for keyword, value in kwargs.items():
        _check_json(value, f"argument {keyword}=", name)


def _check_json(value: object, which: str, name: str) -> None:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"add({name}, ...) with durable=True: {which} ({_a_type(value)}) cannot be stored "
            f"as JSON ({type(exc).__name__}); pass plain data: str, int, float, bool, None, "
            "lists and dicts with string keys"
        ) from None
    if json.loads(text) != value:
        raise TypeError(
            f"add({name}, ...) with durable=True: {which} ({_a_type(value)}) does not come "
            "back the same from JSON (a tuple becomes a list, a dict's int keys become "
            "strings); pass lists, and dicts with string keys"
        )


def _a_type(value: object) -> str:
    """The value's type with its article: ``"an int"``, ``"a tuple"``."""
    kind = type(value).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def storable(fn: Callable[..., Any], record: TaskRecord) -> bool:
    """Whether a task that was not added durable could still be stored (to spill it)."""
    if record.target is None or _unbound(resolve(record.target)) is not _unbound(fn):
        return False
    if retry_on_targets(record.retry.retry_on) is None:
        return False
    try:
        text = json.dumps([list(record.args), record.kwargs], allow_nan=False)
    except (TypeError, ValueError):
        return False
    return bool(json.loads(text) == [list(record.args), record.kwargs])


def _unbound(fn: object) -> object:
    return getattr(fn, "__func__", fn)


def import_target(target: str) -> object:
    """The object named ``"package.module:Qualified.name"``.

    Raises:
        ImportError: the module cannot be imported or the target is malformed.
        AttributeError: the module has no such attribute.
        Exception: whatever the module raises as it is imported.
    """
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise ImportError(f"the target {target!r} is not of the form 'package.module:name'")
    found: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def resolve(target: str) -> object:
    """The object named ``"module:qualname"``, or ``None`` if it cannot be found: missing,
    or its module raises as it is imported (whatever it raises: one broken module must
    not stop the tasks of the others)."""
    try:
        return import_target(target)
    except Exception:
        return None


def _type_target(kind: type) -> str | None:
    target = f"{kind.__module__}:{kind.__qualname__}"
    return target if resolve(target) is kind else None


@lru_cache(maxsize=256)
def retry_on_targets(kinds: tuple[type[BaseException], ...]) -> tuple[str, ...] | None:
    """The import names of a retry policy's exception types, or ``None`` if one has none
    (a class defined in a function): what a stored policy keeps of them."""
    targets = []
    for kind in kinds:
        target = _type_target(kind)
        if target is None:
            return None
        targets.append(target)
    return tuple(targets)


def _retry_on(targets: object) -> tuple[type[BaseException], ...]:
    """The exception types of stored import names; those this process cannot find are
    left out, and a policy left with none retries on any ``Exception`` (a stored task
    retries at least as often as it was added to, never less)."""
    if not isinstance(targets, list):
        return (Exception,)
    kinds = tuple(
        kind
        for kind in map(resolve, (t for t in targets if isinstance(t, str)))
        if isinstance(kind, type) and issubclass(kind, BaseException)
    )
    return kinds or (Exception,)


def _stored_limits(limits: Limits | None) -> dict[str, Any] | None:
    if limits is None:
        return None
    rate = limits.rate
    return {
        "max_concurrency": limits.max_concurrency,
        "rate": None if rate is None else [rate.count, rate.per_seconds],
    }


def _limits(stored: object) -> Limits | None:
    if not isinstance(stored, dict):
        return None
    rate = stored.get("rate")
    return Limits(stored.get("max_concurrency"), None if rate is None else Rate(*rate))


def trace_carrier(context: contextvars.Context) -> dict[str, str]:
    """The W3C trace context (``traceparent``, ``tracestate``) current in ``context``."""
    carrier: dict[str, str] = {}
    context.run(propagate.inject, carrier)
    return carrier


def context_from_carrier(carrier: dict[str, str]) -> contextvars.Context:
    """A fresh context whose current span is the remote one described by ``carrier``."""
    context = contextvars.Context()
    if carrier:
        context.run(otel_context.attach, propagate.extract(carrier))
    return context


def to_stored(
    record: TaskRecord,
    owner: str | None,
    state: str,
    *,
    attempt: int = 0,
    recovered: bool = False,
) -> StoredTask:
    assert record.target is not None
    retry = record.retry
    return StoredTask(
        id=record.id,
        name=record.name,
        target=record.target,
        args=list(record.args),
        kwargs=dict(record.kwargs),
        options={
            "timeout": record.timeout,
            "retry": {
                **{field: getattr(retry, field) for field in _RETRY_FIELDS},
                "retry_on": list(retry_on_targets(retry.retry_on) or ()),
            },
            "run_on_error": record.run_on_error,
            "limits": _stored_limits(record.limits),
        },
        request_method=record.request.method,
        request_path=record.request.path,
        trace_context=record.trace_context or {},
        key=record.key,
        state=state,
        owner=owner,
        attempt=attempt,
        recovered=recovered,
    )


def not_importable(*args: object, **kwargs: object) -> None:
    """Stands in for the function of a stored task that cannot be imported, so that it ends
    as a task (a span, its metric, the dead-letter hook): never called."""
    raise AssertionError("a task whose function cannot be imported is never run")


def from_stored(row: StoredTask) -> tuple[TaskRecord, Callable[..., Any] | None]:
    """The record of a stored task, and its function (``None`` when it cannot be imported).

    Raises:
        TypeError, ValueError: the row's options are not what :func:`to_stored` writes.
    """
    options = row.options
    retry_fields = options.get("retry")
    retry = (
        NO_RETRY
        if retry_fields is None
        else Retry(
            **{k: v for k, v in retry_fields.items() if k in _RETRY_FIELDS},
            retry_on=_retry_on(retry_fields.get("retry_on")),
        )
    )
    timeout = options.get("timeout")
    record = TaskRecord(
        row.id,
        row.name,
        row.target,
        tuple(row.args),
        dict(row.kwargs),
        None if timeout is None or not math.isfinite(timeout) else float(timeout),
        retry,
        bool(options.get("run_on_error", False)),
        RequestInfo(row.request_method or "-", row.request_path or "-"),
        dict(row.trace_context),
        True,
        row.key,
        _limits(options.get("limits")),
    )
    fn = resolve(row.target)
    return record, fn if callable(fn) else None
