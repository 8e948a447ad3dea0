"""What the collector knows about a side-effect function, worked out once per function.

``add()`` runs in the handler, on every request: checking the arguments against the
signature with ``Signature.bind`` on each call would cost more than the rest of ``add()``,
so the arity is summarised once and ``bind`` only runs when the summary cannot decide
(keyword arguments) or to word the error.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import Any, Final

from ._options import EMPTY_OPTIONS, OPTIONS_ATTRIBUTE, TaskOptions

_INFO_ATTRIBUTE: Final = "__after_response_info__"
_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class CallableInfo:
    """Facts about one function: how to run it, what to call it, how it may be called."""

    __slots__ = (
        "is_async",
        "max_positional",
        "min_positional",
        "name",
        "options",
        "required_keywords",
        "signature",
    )

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.is_async = _is_async_callable(fn)
        self.name = _default_name(fn)
        options = getattr(fn, OPTIONS_ATTRIBUTE, EMPTY_OPTIONS)
        self.options: TaskOptions = options if isinstance(options, TaskOptions) else EMPTY_OPTIONS
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have no signature: nothing to check
            self.signature = None
        parameters = self.signature.parameters.values() if self.signature else ()
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
        try:
            signature.bind(*bound_self, *args, **kwargs)
        except TypeError as exc:
            # bind()'s messages name parameters, never values: arguments carry secrets.
            raise TypeError(
                f"add({name}, ...): the arguments do not fit {name}{signature}: {exc}"
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


def forget(fn: Callable[..., Any]) -> None:
    """Drop cached facts (``@side_effect`` calls this when it changes a function's options)."""
    with contextlib.suppress(AttributeError, TypeError):
        delattr(fn, _INFO_ATTRIBUTE)


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
