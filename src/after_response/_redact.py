"""Keeping task arguments out of text: exception messages quote what a task was called with
(smtplib's ``SMTPRecipientsRefused`` holds the address), so wherever an exception's message
is written (a log line, a span event) the task's argument strings are replaced.

Only messages are redacted: a traceback's file names and source lines are code, not values,
and stay readable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import traceback
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

#: Argument strings shorter than this are not redacted (they would match ordinary words and
#: line numbers; a secret is longer).
MIN_REDACTED_LENGTH: Final = 4
REDACTED: Final = "[redacted]"
#: Items looked at inside each container argument (a bound on the work on the failure path).
_MAX_ITEMS: Final = 100

_CAUSE: Final = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT: Final = "\nDuring handling of the above exception, another exception occurred:\n\n"


def argument_strings(fn: object, args: Iterable[object], kwargs: Mapping[str, object]) -> list[str]:
    """The strings among a task's arguments (those bound by ``functools.partial`` too), and
    one level inside containers and dataclasses (a ``User`` with an ``email``), as they may
    appear in text, longest first."""
    found: set[str] = set()
    values = [*args, *kwargs.values()]
    while isinstance(fn, functools.partial):
        values += [*fn.args, *fn.keywords.values()]
        fn = fn.func

    def collect(value: object, depth: int) -> None:
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(value, str):
            if len(value) >= MIN_REDACTED_LENGTH:
                found.add(value)
                found.add(repr(value)[1:-1])  # as it appears inside a repr()
            return
        if depth > 0:
            return
        if isinstance(value, Mapping):
            items: Iterable[object] = (*value.keys(), *value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = (getattr(value, field.name) for field in dataclasses.fields(value))
        else:
            return
        for item in itertools.islice(items, _MAX_ITEMS):
            collect(item, depth + 1)

    for value in values:
        collect(value, 0)
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def safe_message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the exception's ``__str__`` itself raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__} whose str() raised>"


def redacted_exception(exc: BaseException, secrets: list[str]) -> tuple[str, str]:
    """The exception's message and its traceback, messages redacted, frames as they are.

    Never raises, whatever the exception's ``__str__`` or ``__repr__`` do.
    """
    message = redact(safe_message(exc), secrets)
    try:
        stacktrace = "".join(_traceback_lines(exc, secrets))
    except Exception:  # a pathological exception: keep its type, lose its traceback
        stacktrace = f"{type(exc).__qualname__}: {message}\n"
    return message, stacktrace


def _traceback_lines(exc: BaseException, secrets: list[str]) -> Iterator[str]:
    chain: list[tuple[traceback.TracebackException, str]] = []
    current: traceback.TracebackException | None = traceback.TracebackException.from_exception(exc)
    separator = ""
    while current is not None and len(chain) < 10:
        chain.append((current, separator))
        if current.__cause__ is not None:
            current, separator = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, separator = current.__context__, _CONTEXT
        else:
            current = None
    for te, separator in reversed(chain):
        if te.stack:
            yield "Traceback (most recent call last):\n"
            yield from te.stack.format()
        for line in te.format_exception_only():
            yield redact(line, secrets)
        yield separator


def exception_text(
    exc: BaseException, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, str]:
    """:func:`redacted_exception` for an exception of a task called as ``fn(*args, **kwargs)``."""
    return redacted_exception(exc, argument_strings(fn, args, kwargs))
