"""What the collector knows about a side-effect function, worked out once per function, and
the ``side_effect`` decorator that gives a function its default options.

``add()`` runs in the handler, on every request: checking the arguments against the
signature with ``Signature.bind`` on each call would cost more than the rest of ``add()``,
so the arity is summarised once and ``bind`` only runs when the summary cannot decide
(keyword arguments) or to word the error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import Any, Final, TypeVar

from ._options import EMPTY_OPTIONS, OPTIONS_ATTRIBUTE, UNSET, Retry, TaskOptions, _Unset

F = TypeVar("F", bound=Callable[..., Any])

_INFO_ATTRIBUTE: Final = "__after_response_info__"
_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
#: The keywords options() takes: passed to add() for a function without such a parameter,
#: they belong in .options().
_OPTION_NAMES: Final = frozenset(f.name for f in dataclasses.fields(TaskOptions) if f.init)


class CallableInfo:
    """Facts about one function: how to run it, what to call it, how it may be called."""

    __slots__ = (
        "accepts_keywords",
        "is_async",
        "max_positional",
        "min_positional",
        "name",
        "options",
        "parameters",
        "required_keywords",
        "signature",
        "target",
    )

    def __init__(self, fn: Callable[..., Any]) -> None:
        _reject_generators(fn)
        self.is_async = _is_async_callable(fn)
        self.name = _default_name(fn)
        self.target = import_name(fn)
        options = getattr(fn, OPTIONS_ATTRIBUTE, EMPTY_OPTIONS)
        self.options: TaskOptions = options if isinstance(options, TaskOptions) else EMPTY_OPTIONS
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have no signature: nothing to check
            self.signature = None
        parameters = list(self.signature.parameters.values()) if self.signature else []
        self.parameters = frozenset(p.name for p in parameters)
        self.accepts_keywords = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self.min_positional = sum(
            1 for p in parameters if p.kind in _POSITIONAL and p.default is p.empty
        )
        self.max_positional = (
            math.inf
            if any(p.kind is p.VAR_POSITIONAL for p in parameters)
            else sum(1 for p in parameters if p.kind in _POSITIONAL)
        )
        self.required_keywords = any(
            p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters
        )

    def check_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], bound_self: tuple[Any, ...], name: str
    ) -> None:
        """Raise ``TypeError`` if the call could not bind, naming parameters, never values."""
        signature = self.signature
        if signature is None:
            return
        if (
            not kwargs
            and not self.required_keywords
            and self.min_positional <= len(args) + len(bound_self) <= self.max_positional
        ):
            return
        misplaced = sorted(
            key
            for key in kwargs
            if key in _OPTION_NAMES and key not in self.parameters and not self.accepts_keywords
        )
        if misplaced:
            given = ", ".join(f"{key}=..." for key in misplaced)
            raise TypeError(
                f"add({name}, ..., {given}): {name}() has no parameter "
                f"{' or '.join(repr(key) for key in misplaced)}; task options go through "
                f"options(): request.state.after_response.options({given}).add({name}, ...)"
            )
        try:
            signature.bind(*bound_self, *args, **kwargs)
        except TypeError as exc:
            # bind()'s messages name parameters, never values: arguments carry secrets. The
            # signature is shown without its defaults, which may be secrets too (api_key=...).
            raise TypeError(
                f"add({name}, ...): the arguments do not fit {name}{_without_defaults(signature)}"
                f": {exc}"
            ) from None


def callable_info(fn: Callable[..., Any]) -> tuple[CallableInfo, tuple[Any, ...]]:
    """The facts about ``fn`` (cached on the function) and the bound ``self``, if any."""
    kind = type(fn)
    if kind is MethodType:
        target: Any = fn.__func__  # type: ignore[attr-defined]
        bound_self: tuple[Any, ...] = (fn.__self__,)  # type: ignore[attr-defined]
    else:
        target, bound_self = fn, ()
    if kind is FunctionType or kind is MethodType:
        info = target.__dict__.get(_INFO_ATTRIBUTE)
        if info is None:
            info = CallableInfo(target)
            with contextlib.suppress(AttributeError, TypeError):
                setattr(target, _INFO_ATTRIBUTE, info)
        return info, bound_self
    return CallableInfo(fn), ()  # partials, callable objects, builtins: rare, not cached


def check_callable(fn: object) -> None:
    """Raise ``TypeError``, saying what to pass instead, unless ``fn`` is callable."""
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


def import_name(fn: object) -> str | None:
    """``"module:qualname"`` where importing the module and walking the qualname finds
    ``fn`` again (a module-level function, or a method reached from one); else ``None``."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def side_effect(
    *,
    name: str | _Unset = UNSET,
    timeout: float | _Unset | None = UNSET,
    retry: Retry | _Unset | None = UNSET,
    run_on_error: bool | _Unset = UNSET,
    durable: bool | _Unset = UNSET,
    max_concurrency: int | _Unset | None = UNSET,
    rate_limit: str | _Unset | None = UNSET,
) -> Callable[[F], F]:
    """Give a side-effect function its default task options.

    The function is returned unchanged (it can still be called directly); the options
    apply whenever it is passed to ``collector.add()``::

        @side_effect(timeout=10, retry=Retry(attempts=3))
        async def send_verification_email(to: str, code: str) -> None: ...

    Args:
        name: the name used in logs, spans and metrics (default: the function's
            qualified name). Keep it low-cardinality: never put an id or an address in it.
        timeout: seconds an attempt may run before it is cancelled; ``None`` for no limit.
        retry: a :class:`Retry` policy, or ``None`` for a single attempt.
        run_on_error: run the task even when the request fails (exception or 5xx).
        durable: store the task before the response completes, so that it survives a crash
            and is replayed (needs ``store=`` on the middleware; the function must be
            importable by name and its arguments JSON data).
        max_concurrency: how many tasks of this name run at once, across all requests of
            the process (within the middleware's own bound); ``None`` for no limit.
        rate_limit: how often a task of this name may start, as ``"10/s"``, ``"100/m"``,
            ``"5/500ms"`` or ``"3600/h"``: no window of that length holds more starts.
            A task waiting for its name's limit holds no global slot; its wait shows as
            queue time.

    Raises:
        TypeError, ValueError: for an option of the wrong type or out of range, or when
            what it decorates is not a function.
    """
    options = TaskOptions(
        name=name,
        timeout=timeout,
        retry=retry,
        run_on_error=run_on_error,
        durable=durable,
        max_concurrency=max_concurrency,
        rate_limit=rate_limit,
    )

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@side_effect(...) decorates a function, got {fn!r}")
        _reject_generators(fn)
        setattr(fn, OPTIONS_ATTRIBUTE, options)
        with contextlib.suppress(AttributeError, TypeError):
            delattr(fn, _INFO_ATTRIBUTE)  # facts worked out before these options
        return fn

    return decorate


def _reject_generators(fn: object) -> None:
    unwrapped = fn
    while isinstance(unwrapped, functools.partial):
        unwrapped = unwrapped.func
    if inspect.isasyncgenfunction(unwrapped) or inspect.isgeneratorfunction(unwrapped):
        kind = "an async generator" if inspect.isasyncgenfunction(unwrapped) else "a generator"
        name = _default_name(fn)  # type: ignore[arg-type]
        raise TypeError(
            f"{name} is {kind} function (it uses yield): calling it would only create "
            "a generator and its body would never run. Make the side effect a plain "
            "function or an async def without yield (consume the generator inside it)."
        )


def _without_defaults(signature: inspect.Signature) -> inspect.Signature:
    return signature.replace(
        parameters=[
            p.replace(default=inspect.Parameter.empty) for p in signature.parameters.values()
        ]
    )


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)
    )


def _default_name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or getattr(type(fn), "__qualname__", None)
    return str(name) if name else repr(type(fn))
